/* nbdkit-snapstore-plugin: the base (see base.h). */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libnbd.h>
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "base.h"
#include "cleanup.h"
#include "storefiles.h"
#include "storeread.h"
#include "util.h"

/* Set by base_open, read-only afterwards. */
static char *name;              /* the spec, for messages */
static int fd = -1;             /* a file or block device */
static bool fd_is_file;         /* a regular file (SEEK_DATA works) */
static struct nbd_handle *nbd;  /* an NBD server */
static bool nbd_status;         /* it answers base:allocation */
static uint32_t nbd_max;        /* largest read it takes */

const char *
base_name (void)
{
  return name ? name : "";
}

/* Open a file or block device: set *size and *st. */
static int
open_file (const char *path, uint64_t *size, struct stat *st)
{
  off_t end;

  fd = open (path, O_RDONLY | O_CLOEXEC);
  if (fd == -1) {
    nbdkit_error ("base %s: %m", path);
    return -1;
  }
  if (fstat (fd, st) == -1) {
    nbdkit_error ("base %s: fstat: %m", path);
    return -1;
  }
  if (!S_ISREG (st->st_mode) && !S_ISBLK (st->st_mode)) {
    nbdkit_error ("base %s: not a regular file or a block device "
                  "(for an NBD server give an NBD URI)", path);
    return -1;
  }
  fd_is_file = S_ISREG (st->st_mode);
  end = lseek (fd, 0, SEEK_END);
  if (end == -1) {
    nbdkit_error ("base %s: lseek: %m", path);
    return -1;
  }
  *size = end;
  return 0;
}

static int
open_nbd (const char *uri, uint64_t *size)
{
  int64_t r;

  nbd = nbd_create ();
  if (nbd == NULL ||
      nbd_add_meta_context (nbd, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1 ||
      nbd_connect_uri (nbd, uri) == -1) {
    nbdkit_error ("base %s: %s", uri, nbd_get_error ());
    return -1;
  }
  r = nbd_get_size (nbd);
  if (r == -1) {
    nbdkit_error ("base %s: %s", uri, nbd_get_error ());
    return -1;
  }
  *size = r;
  nbd_status = nbd_can_meta_context (nbd, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
  /* Servers must take 32 MiB; a smaller maximum they state wins. */
  nbd_max = 32 * 1024 * 1024;
  r = nbd_get_block_size (nbd, LIBNBD_SIZE_MAXIMUM);
  if (r > 0 && r < nbd_max)
    nbd_max = r;
  return 0;
}

/* Read for store_origin_sample. */
static int
sample_read (void *opaque, void *buf, uint32_t len, uint64_t offset)
{
  int err = 0;

  if (base_pread (buf, len, offset, &err) == -1) {
    errno = err;
    return -1;
  }
  return 0;
}

int
base_open (const char *spec, bool given, const char *dir,
           const struct manifest *m)
{
  const char *where = given ? "base=" : "the store's origin ";
  struct stat st = { 0 };
  uint64_t size, hash;

  name = strdup (spec);
  if (name == NULL) {
    nbdkit_error ("strdup: %m");
    return -1;
  }
  if (strstr (spec, "://") ? open_nbd (spec, &size) == -1
      : open_file (spec, &size, &st) == -1) {
    if (!given)
      nbdkit_error ("%s: the store's origin, %s, cannot be opened: give "
                    "base=PATH|URI if it is elsewhere", dir, spec);
    return -1;
  }

  /* The checks the filter makes at start-up, in its order: size,
   * file, sample.
   */
  if (size != m->size) {
    nbdkit_error ("%s%s: size %" PRIu64 " does not match the volume size %"
                  PRIu64 " recorded in the store %s: it is not the origin "
                  "the store was made over",
                  where, spec, size, m->size, dir);
    return -1;
  }
  if (fd >= 0 && fd_is_file && m->has_origin_file &&
      ((uint64_t) st.st_dev != m->origin_dev ||
       (uint64_t) st.st_ino != m->origin_ino)) {
    nbdkit_error ("%s%s: device %" PRIu64 ", inode %" PRIu64 " is not the "
                  "file the store %s was made over (device %" PRIu64
                  ", inode %" PRIu64 "): a copy or another file would make "
                  "every view wrong.  A copy can be served over NBD "
                  "(base=nbd+unix:///?socket=... from nbdkit file COPY), "
                  "where only its contents are checked",
                  where, spec, (uint64_t) st.st_dev, (uint64_t) st.st_ino,
                  dir, m->origin_dev, m->origin_ino);
    return -1;
  }
  if (m->has_sample) {
    if (store_origin_sample (m->size, sample_read, NULL, &hash) == -1) {
      nbdkit_error ("%s%s: reading its samples: %m", where, spec);
      return -1;
    }
    if (hash != m->origin_sample) {
      nbdkit_error ("%s%s: does not read as the origin did when the store "
                    "%s was last used (16 sampled pages differ): it is not "
                    "the origin the store was made over, or something "
                    "wrote to it since", where, spec, dir);
      return -1;
    }
  }
  nbdkit_debug ("snapstore: base %s: %" PRIu64 " bytes%s", spec, size,
                m->has_sample ? ", samples match" : "");
  return 0;
}

void
base_close (void)
{
  if (fd >= 0)
    close (fd);
  fd = -1;
  if (nbd) {
    nbd_shutdown (nbd, 0);
    nbd_close (nbd);
  }
  nbd = NULL;
  free (name);
  name = NULL;
}

int
base_pread (void *buf, uint32_t count, uint64_t offset, int *err)
{
  if (fd >= 0) {
    if (full_pread (fd, buf, count, offset) == -1) {
      *err = errno;
      nbdkit_error ("base %s: read of %" PRIu32 " bytes at %" PRIu64 ": %m",
                    name, count, offset);
      return -1;
    }
    return 0;
  }
  if (nbd) {
    char *p = buf;

    while (count > 0) {
      uint32_t n = MIN (count, nbd_max);

      if (nbd_pread (nbd, p, n, offset, 0) == -1) {
        *err = nbd_get_errno () ? nbd_get_errno () : EIO;
        nbdkit_error ("base %s: read of %" PRIu32 " bytes at %" PRIu64
                      ": %s", name, n, offset, nbd_get_error ());
        return -1;
      }
      p += n;
      offset += n;
      count -= n;
    }
    return 0;
  }
  *err = EIO;
  nbdkit_error ("no base: the store has no origin to read");
  return -1;
}

/* Block status of the NBD base: add the entries to extents. */
struct status {
  struct nbdkit_extents *extents;
  uint64_t end;
  uint64_t reached;
};

static int
got_status (void *opaque, const char *context, uint64_t offset,
            uint32_t *entries, size_t nr_entries, int *error)
{
  struct status *s = opaque;

  if (strcmp (context, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
    return 0;
  for (size_t i = 0; i + 1 < nr_entries && offset < s->end; i += 2) {
    uint64_t len = MIN ((uint64_t) entries[i], s->end - offset);
    uint32_t type = 0;

    if (len == 0)
      break;
    if (entries[i + 1] & LIBNBD_STATE_HOLE)
      type |= NBDKIT_EXTENT_HOLE;
    if (entries[i + 1] & LIBNBD_STATE_ZERO)
      type |= NBDKIT_EXTENT_ZERO;
    if (nbdkit_add_extent (s->extents, offset, len, type) == -1) {
      *error = errno;
      return -1;
    }
    offset += len;
    s->reached = offset;
  }
  return 0;
}

int64_t
base_extents (uint64_t offset, uint64_t end, uint32_t flags,
              struct nbdkit_extents *extents, int *err)
{
  if (fd >= 0 && fd_is_file) {
    bool data;
    uint64_t stop = sr_data_run (fd, offset, end, &data);

    if (nbdkit_add_extent (extents, offset, stop - offset,
                           data ? 0
                           : NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO) == -1) {
      *err = errno;
      return -1;
    }
    return stop;
  }
  if (nbd && nbd_status) {
    struct status s = { .extents = extents, .end = end, .reached = offset };
    uint64_t count = MIN (end - offset, (uint64_t) 1 << 30);

    if (nbd_block_status (nbd, count, offset,
                          (nbd_extent_callback) { .callback = got_status,
                                                  .user_data = &s },
                          flags & NBDKIT_FLAG_REQ_ONE
                          ? LIBNBD_CMD_FLAG_REQ_ONE : 0) == -1) {
      *err = nbd_get_errno () ? nbd_get_errno () : EIO;
      nbdkit_error ("base %s: block status at %" PRIu64 ": %s",
                    name, offset, nbd_get_error ());
      return -1;
    }
    if (s.reached > offset)
      return s.reached;
  }
  /* A block device, or a server that cannot tell: data. */
  if (nbdkit_add_extent (extents, offset, end - offset, 0) == -1) {
    *err = errno;
    return -1;
  }
  return end;
}
