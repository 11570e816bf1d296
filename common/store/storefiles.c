/* nbdkit-snapshot: the files of a store (see storefiles.h). */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
    if (errno == 0 && strcmp (end, id_forms[i].suffix) == 0)
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

int
store_layer_holes (int fd, const struct sbitmap *map, uint64_t size,
                   uint64_t *count, uint64_t *sum)
{
  const off_t end = size;
  const uint64_t npages = (size + STORE_PAGE_SIZE - 1) >> STORE_PAGE_SHIFT;
  off_t pos = 0;

  *count = *sum = 0;
  while (pos < end) {
    off_t hole = lseek (fd, pos, SEEK_HOLE), data;
    uint64_t p, q;

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
    p = ((uint64_t) hole + STORE_PAGE_SIZE - 1) >> STORE_PAGE_SHIFT;
    q = data == end ? npages : (uint64_t) data >> STORE_PAGE_SHIFT;
    while (p < q) {
      uint64_t s = sbitmap_find_next_set (map, p), e;
      if (s >= q)
        break;
      e = MIN (q, sbitmap_find_next_clear (map, s));
      *count += e - s;
      *sum += snap_mix64 (s) ^ snap_mix64 (~e);
      p = e;
    }
    pos = data;
  }
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
