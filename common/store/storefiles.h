/* nbdkit-snapshot: the files of a store, and the rules that every
 * reader and writer of the format must apply the same way.
 *
 * docs/store-format.md describes the store.  Its files are named by
 * kind and id ("layer-N.data", "layer-N.map", "dirty-N.map",
 * "revert-N.map"), or have fixed names ("manifest", "lock", "boot-id",
 * "intent.map", "control.sock"); a few are transient (".manifest.tmp",
 * ".boot-id.tmp", "layer-N.data.link").  The filter, the snapstore
 * plugin and nbdsnap (backup chains, check) recognise names with
 * store_file_classify, so that they agree on what belongs in a store.
 *
 * Two checks that more than one program makes also live here:
 *
 * - store_layer_holes: the pages a layer holds that are holes in its
 *   data file, kept in the seal of its map (mapfile.h, extra[]), so a
 *   hole punched into a sealed layer from outside is found;
 * - store_origin_sample: the hash of 16 pages of the origin that the
 *   manifest's "origin-sample" line records, so an origin that is not
 *   the one the store was made over is refused.
 *
 * Thread safety: every function is thread-safe (no shared state).
 */
#ifndef SNAP_STOREFILES_H
#define SNAP_STOREFILES_H

#include <stdbool.h>
#include <stdint.h>

#include "sbitmap.h"

/* Layers hold data in pages of this size (docs/store-format.md). */
#define STORE_PAGE_SIZE 4096
#define STORE_PAGE_SHIFT 12

enum store_file {
  STORE_FILE_OTHER = 0,         /* not a name of the store format */
  STORE_FILE_LAYER_DATA,        /* layer-N.data */
  STORE_FILE_LAYER_MAP,         /* layer-N.map */
  STORE_FILE_DIRTY_MAP,         /* dirty-N.map */
  STORE_FILE_REVERT_MAP,        /* revert-N.map (cbw, while a revert runs) */
  STORE_FILE_DATA_LINK,         /* layer-N.data.link (transient) */
  STORE_FILE_MANIFEST,          /* manifest */
  STORE_FILE_LOCK,              /* lock */
  STORE_FILE_BOOT_ID,           /* boot-id */
  STORE_FILE_INTENT,            /* intent.map */
  STORE_FILE_CONTROL,           /* control.sock */
  STORE_FILE_TEMP,              /* .manifest.tmp, .boot-id.tmp */
};

/* What the file name (a directory entry, no '/') is in a store; for
 * the kinds named after an id (layer, dirty and revert files, data
 * links), set *id.  A name with an id no manifest can have (at least
 * MANIFEST_ID_MAX) is STORE_FILE_OTHER.
 */
extern enum store_file store_file_classify (const char *name, uint64_t *id)
  __attribute__ ((__nonnull__ (1, 2)));

/* Whether kind is one of the files named after an id. */
static inline bool
store_file_has_id (enum store_file kind)
{
  return kind >= STORE_FILE_LAYER_DATA && kind <= STORE_FILE_DATA_LINK;
}

/* The path of file kind (one with an id) for id in dir, malloc'd, or
 * NULL with errno set.
 */
extern char *store_file_path (const char *dir, enum store_file kind,
                              uint64_t id)
  __attribute__ ((__nonnull__ (1)));

/* The pages that map says a layer holds and that lie wholly in holes
 * of its data file fd (a volume of size bytes): their number, and the
 * sum over their runs [s, e) of mix64 (s) xor mix64 (not e).  A hole is
 * any stretch without written data: not allocated, or allocated but
 * unwritten (fallocate), as FIEMAP reports them, so that the answer
 * does not depend on what the page cache holds; SEEK_HOLE where FIEMAP
 * is not supported.  Costs an ioctl per 256 extents of the file.
 * Return 0, or -1 with errno set.
 */
extern int store_layer_holes (int fd, const struct sbitmap *map,
                              uint64_t size, uint64_t *count, uint64_t *sum)
  __attribute__ ((__nonnull__ (2, 4, 5)));

/* The sample of an origin of size bytes: 16 pages (page 0, and 15
 * chosen from the size by a fixed rule), read with
 * read (opaque, buf, len, offset), which returns 0 or -1 with errno
 * set, hashed into *hash.  Return 0, or -1 (the read's error).
 */
extern int store_origin_sample (uint64_t size,
                                int (*read) (void *opaque, void *buf,
                                             uint32_t len, uint64_t offset),
                                void *opaque, uint64_t *hash)
  __attribute__ ((__nonnull__ (2, 4)));

#endif /* SNAP_STOREFILES_H */
