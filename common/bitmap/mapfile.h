/* nbdkit-snapshot: bitmaps persisted in files ("map files").
 *
 * Layout (all integers little-endian):
 *
 *   offset 0     header, 4096 bytes:
 *     0   magic       8 bytes  "NBDSNAPM"
 *     8   version     u32      1
 *     12  kind        u32      MAPFILE_KIND_* (what the bits mean)
 *     16  granularity u32      bytes covered by one bit (power of 2)
 *     20  reserved    u32      0
 *     24  nbits       u64      number of bits
 *     32  crc         u32      CRC-32 (util.h) of bytes 0..31
 *     36  zero
 *     40  seal        u32      MAPFILE_SEAL_MAGIC if sealed, else 0
 *     44  reserved    u32      0
 *     48  nset        u64      sealed: number of bits set
 *     56  body_sum    u64      sealed: checksum of the pages (below)
 *     64  extra[2]    u64      sealed: the caller's own figures
 *     80  seal_crc    u32      CRC-32 of bytes 40..79
 *     84  zero to 4096
 *   offset 4096 + p * 4096   page p of the bitmap (sbitmap.h order)
 *
 * The file is sparse: pages never written are holes and read as zero,
 * so creating a map for a huge volume is O(1) and loading skips holes
 * with SEEK_DATA / SEEK_HOLE.  Its size is always the header plus every
 * page, so a shorter file has been truncated.
 *
 * The seal.  The pages change in place while a map is in use, and a
 * checksum kept with each page could be torn from it by a crash.  So
 * a map is sealed once it stops changing (at a clean stop, say): the
 * seal records how many bits are set and body_sum, the sum over every
 * page holding a set bit of mix (p, CRC-32 of its bytes), so a flipped
 * bit, a zeroed or lost page, or a truncated file no longer matches.
 * A writer clears the seal (durably) before it changes a sealed map.
 * mapfile_open checks the seal of a sealed map; an unsealed one
 * (changed since, or left by a crash) is only checked for its size.
 * Clearing and checking cost a header write and a pass over the pages
 * already read at load: nothing per write.
 *
 * Durability protocol (see docs/store-format.md): a writer sets bits in
 * memory (sbitmap_set); mapfile_collect takes the dirty pages; the
 * caller makes whatever data the bits describe durable; then
 * mapfile_write stores the pages and fdatasyncs the file.  A crash
 * between leaves the old pages, which never claim data that is not
 * there.
 *
 * Thread safety: mapfile_collect may run concurrently with bit updates
 * (sbitmap_take_dirty guarantees nothing is lost).  Callers serialise
 * collect+write per file.
 */
#ifndef SNAP_MAPFILE_H
#define SNAP_MAPFILE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "sbitmap.h"

#define MAPFILE_HEADER_SIZE 4096
#define MAPFILE_VERSION 1

enum {
  MAPFILE_KIND_LAYER = 1,       /* bit set = layer holds this unit */
  MAPFILE_KIND_DIRTY = 2,       /* bit set = unit changed since checkpoint */
  MAPFILE_KIND_INTENT = 3,      /* bit set = a write may be in flight there */
};

/* Create (O_EXCL) the map file path with a header and no pages, fsync
 * it, and return an open read-write descriptor, or -1 after calling
 * snap_error with the path and reason.
 */
extern int mapfile_create (const char *path, uint32_t kind,
                           uint32_t granularity, uint64_t nbits);

/* Open the existing map file path, validate its header against kind,
 * granularity and nbits, and load its pages into bm (which this
 * initialises).  On success return a descriptor (read-write if
 * writable, else read-only).  On any error call snap_error naming the
 * path and the field, with the value found and the value wanted (e.g.
 * "layer-3.map: bad magic", "... granularity 4096, expected 65536",
 * "... header checksum 0x1234 does not match 0x5678"), and return -1.
 */
extern int mapfile_open (const char *path, uint32_t kind,
                         uint32_t granularity, uint64_t nbits,
                         int writable, struct sbitmap *bm)
  __attribute__ ((__nonnull__ (1, 6)));

/* What a seal records.  extra[] is the caller's (the filter keeps the
 * holes of a layer's data file there); mapfile_open only returns it.
 */
struct mapfile_seal {
  uint64_t nset;
  uint64_t body_sum;
  uint64_t extra[2];
};

/* The nset and body_sum of bm as it is now (extra is left alone). */
extern void mapfile_seal_compute (const struct sbitmap *bm,
                                  struct mapfile_seal *seal)
  __attribute__ ((__nonnull__ (1, 2)));

/* Seal the map file fd with seal, or with seal NULL clear its seal;
 * fdatasync either way.  Return 0, or -1 with errno set.
 */
extern int mapfile_set_seal (int fd, const struct mapfile_seal *seal);

/* The same through fd if it is open (>= 0), else through the file
 * path, opened for the call.
 */
extern int mapfile_set_seal_path (int fd, const char *path,
                                  const struct mapfile_seal *seal)
  __attribute__ ((__nonnull__ (2)));

/* Like mapfile_open; also check the file's seal, if it has one, and
 * report it: *sealed, and the seal in *seal.  A seal that does not
 * match the pages is an error ("... does not match its seal").
 */
extern int mapfile_open_sealed (const char *path, uint32_t kind,
                                uint32_t granularity, uint64_t nbits,
                                int writable, struct sbitmap *bm,
                                bool *sealed, struct mapfile_seal *seal)
  __attribute__ ((__nonnull__ (1, 6, 7, 8)));

/* The dirty pages of a bitmap taken by mapfile_collect.  Each page is
 * held as its non-zero chunks only (sbitmap.h): a page with one bit
 * set takes 256 bytes, not 4 KiB.  mapfile_batch_page gives it whole.
 */
struct mapfile_batch {
  size_t n;                     /* Number of pages held. */
  size_t alloc;                 /* Room for this many pages. */
  size_t *index;                /* Page numbers. */
  size_t *first;                /* Per page: where its chunks start in words. */
  uint16_t *chunks;             /* Per page: bit c set = chunk c is held. */
  size_t nwords, walloc;        /* Words held; room for this many. */
  uint64_t *words;              /* The chunks held, page after page. */
};

/* Copy page i of batch (i < batch->n), whole, into out. */
extern void mapfile_batch_page (const struct mapfile_batch *batch, size_t i,
                                uint64_t out[SBITMAP_PAGE_WORDS])
  __attribute__ ((__nonnull__ (1, 3)));

/* Take every dirty page of bm into batch (appending).  Return 0, or -1
 * with errno set (ENOMEM; the pages taken stay in the batch so nothing
 * is lost if the caller writes it anyway, or re-marked dirty).
 */
extern int mapfile_collect (struct sbitmap *bm, struct mapfile_batch *batch)
  __attribute__ ((__nonnull__ (1, 2)));

/* Write the pages of batch to fd without syncing (they survive the
 * process, not a power loss).  Return 0, or -1 with errno set.
 */
extern int mapfile_write_pages (int fd, const struct mapfile_batch *batch)
  __attribute__ ((__nonnull__ (2)));

/* Write the pages of batch to fd and fdatasync fd (even when batch is
 * empty, nothing is written and no sync is done).  Return 0, or -1 with
 * errno set.
 */
extern int mapfile_write (int fd, const struct mapfile_batch *batch)
  __attribute__ ((__nonnull__ (2)));

/* Mark the pages of batch dirty again in bm (after a failed write). */
extern void mapfile_batch_restore (struct sbitmap *bm,
                                   const struct mapfile_batch *batch)
  __attribute__ ((__nonnull__ (1, 2)));

/* Empty the batch and free its memory. */
extern void mapfile_batch_free (struct mapfile_batch *batch)
  __attribute__ ((__nonnull__ (1)));

#endif /* SNAP_MAPFILE_H */
