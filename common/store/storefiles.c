/* nbdkit-snapshot: the files of a store (see storefiles.h). */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <linux/fiemap.h>
#include <linux/fs.h>

#include "cleanup.h"
#include "manifest.h"
#include "storefiles.h"
#include "util.h"

/* The files named after an id: prefix, id, suffix. */
static const struct {
  const char *prefix, *suffix;
  enum store_file kind;
} id_forms[] = {
  { "layer-", ".data", STORE_FILE_LAYER_DATA },
  { "layer-", ".map", STORE_FILE_LAYER_MAP },
  { "dirty-", ".map", STORE_FILE_DIRTY_MAP },
  { "revert-", ".map", STORE_FILE_REVERT_MAP },
  { "layer-", ".data.link", STORE_FILE_DATA_LINK },
};

static const struct {
  const char *name;
  enum store_file kind;
} fixed[] = {
  { MANIFEST_NAME, STORE_FILE_MANIFEST },
  { "lock", STORE_FILE_LOCK },
  { "boot-id", STORE_FILE_BOOT_ID },
  { "intent.map", STORE_FILE_INTENT },
  { "control.sock", STORE_FILE_CONTROL },
  { "." MANIFEST_NAME ".tmp", STORE_FILE_TEMP },
  { ".boot-id.tmp", STORE_FILE_TEMP },
};

enum store_file
store_file_classify (const char *name, uint64_t *id)
{
  for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; ++i)
    if (strcmp (name, fixed[i].name) == 0)
      return fixed[i].kind;
  for (size_t i = 0; i < sizeof id_forms / sizeof id_forms[0]; ++i) {
    const size_t plen = strlen (id_forms[i].prefix);
    char *end;

    if (strncmp (name, id_forms[i].prefix, plen) != 0 ||
        name[plen] < '0' || name[plen] > '9')
      continue;
    errno = 0;
    *id = strtoull (name + plen, &end, 10);
    /* An id no manifest can have (manifest.h) is no store file. */
    if (errno == 0 && *id < MANIFEST_ID_MAX &&
        strcmp (end, id_forms[i].suffix) == 0)
      return id_forms[i].kind;
  }
  return STORE_FILE_OTHER;
}

char *
store_file_path (const char *dir, enum store_file kind, uint64_t id)
{
  char *path;

  for (size_t i = 0; i < sizeof id_forms / sizeof id_forms[0]; ++i)
    if (id_forms[i].kind == kind) {
      if (asprintf (&path, "%s/%s%" PRIu64 "%s", dir, id_forms[i].prefix,
                    id, id_forms[i].suffix) == -1)
        return NULL;
      return path;
    }
  errno = EINVAL;
  return NULL;
}

/* Add the pages map holds within [hole, data) of a volume of npages
 * pages (data == end: to the last page) to *count and *sum.
 */
static void
count_held (const struct sbitmap *map, uint64_t npages, uint64_t hole,
            uint64_t data, uint64_t end, uint64_t *count, uint64_t *sum)
{
  uint64_t p = (hole + STORE_PAGE_SIZE - 1) >> STORE_PAGE_SHIFT;
  const uint64_t q = data >= end ? npages : data >> STORE_PAGE_SHIFT;

  while (p < q) {
    uint64_t s = sbitmap_find_next_set_before (map, p, q), e;
    if (s >= q)
      break;
    e = sbitmap_find_next_clear_before (map, s, q);
    *count += e - s;
    *sum += snap_mix64 (s) ^ snap_mix64 (~e);
    p = e;
  }
}

/* The holes from SEEK_HOLE and SEEK_DATA, where FIEMAP is missing. */
static int
holes_by_seek (int fd, const struct sbitmap *map, uint64_t size,
               uint64_t *count, uint64_t *sum)
{
  const off_t end = size;
  const uint64_t npages = (size + STORE_PAGE_SIZE - 1) >> STORE_PAGE_SHIFT;
  off_t pos = 0;

  while (pos < end) {
    off_t hole = lseek (fd, pos, SEEK_HOLE), data;

    if (hole == -1)
      return errno == ENXIO ? 0 : -1;
    if (hole >= end)
      break;
    data = lseek (fd, hole, SEEK_DATA);
    if (data == -1) {
      if (errno != ENXIO)
        return -1;
      data = end;
    }
    if (data > end)
      data = end;
    count_held (map, npages, hole, data, size, count, sum);
    pos = data;
  }
  return 0;
}

#define FIEMAP_BATCH 256

int
store_layer_holes (int fd, const struct sbitmap *map, uint64_t size,
                   uint64_t *count, uint64_t *sum)
{
  const uint64_t npages = (size + STORE_PAGE_SIZE - 1) >> STORE_PAGE_SHIFT;
  CLEANUP_FREE struct fiemap *fm =
    malloc (sizeof *fm + FIEMAP_BATCH * sizeof (struct fiemap_extent));
  uint64_t pos = 0, written = 0; /* data ends at written so far */
  bool first = true;

  *count = *sum = 0;
  if (fm == NULL)
    return -1;
  /* Written extents, from FIEMAP.  Not SEEK_HOLE: on ext4 and XFS,
   * SEEK_DATA counts a page of an unwritten (preallocated) extent as
   * data once it is in the page cache, so a read would change the
   * answer.  Unwritten extents read as zeros, and count as holes here
   * whatever the page cache holds.
   */
  while (pos < size) {
    /* All of it, the extents too: the kernel fills them in, but
     * valgrind (3.19) knows only that it writes the header, and would
     * take every extent we read for uninitialised memory.
     */
    memset (fm, 0, sizeof *fm + FIEMAP_BATCH * sizeof (struct fiemap_extent));
    fm->fm_start = pos;
    fm->fm_length = size - pos;
    fm->fm_flags = FIEMAP_FLAG_SYNC;
    fm->fm_extent_count = FIEMAP_BATCH;
    if (ioctl (fd, FS_IOC_FIEMAP, fm) == -1) {
      if (first && (errno == EOPNOTSUPP || errno == ENOTTY ||
                    errno == EINVAL || errno == ENOSYS))
        return holes_by_seek (fd, map, size, count, sum);
      return -1;
    }
    first = false;
    if (fm->fm_mapped_extents == 0)
      break;
    for (uint32_t i = 0; i < fm->fm_mapped_extents; ++i) {
      const struct fiemap_extent *x = &fm->fm_extents[i];
      const uint64_t s = x->fe_logical, e = s + x->fe_length;

      if (!(x->fe_flags & FIEMAP_EXTENT_UNWRITTEN) && s < size) {
        if (s > written)
          count_held (map, npages, written, s, size, count, sum);
        written = MAX (written, MIN (e, size));
      }
      pos = MAX (pos, e);
      if (x->fe_flags & FIEMAP_EXTENT_LAST)
        pos = size;
    }
  }
  if (written < size)
    count_held (map, npages, written, size, size, count, sum);
  return 0;
}

#define SAMPLES 16

int
store_origin_sample (uint64_t size,
                     int (*read) (void *opaque, void *buf, uint32_t len,
                                  uint64_t offset),
                     void *opaque, uint64_t *hash)
{
  const uint64_t npages = (size + STORE_PAGE_SIZE - 1) / STORE_PAGE_SIZE;
  char buf[STORE_PAGE_SIZE];

  *hash = 0;
  for (uint64_t i = 0; i < SAMPLES; ++i) {
    uint64_t p = i == 0 ? 0 : snap_mix64 (i ^ size) % npages;
    uint32_t len = MIN ((uint64_t) sizeof buf, size - p * STORE_PAGE_SIZE);

    if (read (opaque, buf, len, p * STORE_PAGE_SIZE) == -1)
      return -1;
    *hash = snap_mix64 (*hash ^ (i << 32) ^ snap_crc32 (0, buf, len));
  }
  return 0;
}
