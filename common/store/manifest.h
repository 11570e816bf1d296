/* nbdkit-snapshot: the store manifest.
 *
 * The manifest is a small text file, STORE/manifest, that names
 * everything else in the store.  It is replaced atomically
 * (write_file_atomic: temp file, fsync, rename, fsync dir) and carries
 * a generation number that goes up by one with each save, and a CRC
 * of its text so a damaged file is refused rather than misread.
 *
 *   nbdkit-snapshot-store 1
 *   generation 12
 *   mode row
 *   block-size 65536
 *   size 1073741824
 *   next-id 6
 *   layer 1
 *   layer 4
 *   checkpoint nightly kind=snapshot created=1764383400 layer=1 map=2
 *   checkpoint backup kind=bitmap created=1764385000 map=3
 *   checkpoint hourly kind=snapshot created=1764387000 layer=4 map=5
 *   crc 0x8c2a61f0
 *
 * A bitmap-only checkpoint that was a snapshot until the store was
 * full (snapshot-full=invalidate) ends with "invalidated=TIME".
 *
 * Layers and checkpoints are listed oldest first.  A snapshot's
 * "layer" is the id of the layer that was started when it was taken:
 * in row mode its view is every layer with a smaller id, then the
 * origin.  Every checkpoint has a dirty map, "dirty-M.map", with one
 * bit per block set for each block written from the time it was taken
 * until the next checkpoint was taken; the blocks changed since
 * checkpoint C are the union of the maps of C and every newer one.
 * Ids of layers, maps and jobs come from one counter, next-id.
 *
 * Optional lines: "origin retired" once a stream has made the oldest
 * layer complete; "job ID delete NAME strategy=commit|stream|move
 * keep-bitmap=0|1 output=PATH|-" or "job ID revert NAME" while a
 * background job runs (output paths contain no white space); "drop ID"
 * for each id whose files (layer-ID.*, dirty-ID.map) the store no
 * longer uses and may delete (a crash can leave them behind after the
 * manifest stopped naming them); "origin-sample 0xHASH", a hash of
 * sampled blocks of the origin, present only while nothing writes the
 * origin; "origin-file dev=D ino=I", the device and inode of the file
 * the origin was served from, when known; "origin-path PATH", the
 * absolute path of that file (no white space), when known, so that a
 * reader of the store at rest (the snapstore plugin) can find its
 * origin.  The crc line is the CRC-32 (util.h) of every byte before
 * it.
 *
 * Checks beyond the syntax: ids are below next-id, which is at most
 * MANIFEST_ID_MAX, and the size at most INT64_MAX; every snapshot names
 * a listed layer, and no two the same; no two checkpoints share a map,
 * and no map is a layer; a job names a snapshot, with an id of its
 * own, and a delete's strategy is one the store's mode makes (row:
 * commit or stream, with an absolute output path or "-"; cbw: move,
 * no output); a dropped id is not in use.
 *
 * Thread safety: none; the filter serialises manifest changes.
 */
#ifndef SNAP_MANIFEST_H
#define SNAP_MANIFEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util.h"

#define MANIFEST_NAME "manifest"
#define MANIFEST_VERSION 1

/* The largest next-id: every id is below it, so id + 1 never wraps. */
#define MANIFEST_ID_MAX ((uint64_t) INT64_MAX)

enum snap_mode { MODE_ROW = 0, MODE_CBW = 1 };

enum ckpt_kind { CKPT_SNAPSHOT = 0, CKPT_BITMAP = 1 };

struct manifest_checkpoint {
  char name[SNAP_NAME_MAX + 1];
  enum ckpt_kind kind;
  int64_t created;              /* Unix time it was taken. */
  uint64_t layer;               /* Snapshots: id of the layer started
                                   when taken.  Bitmaps: 0. */
  uint64_t map;                 /* Id of its dirty map. */
  int64_t invalidated;          /* Bitmaps: when it stopped being a
                                   snapshot because the store was full
                                   (Unix time), else 0. */
};

/* The background job in progress, if any (the journal: a job named
 * here is resumed after a crash; its work is idempotent).
 */
enum job_kind { JOB_NONE = 0, JOB_DELETE, JOB_REVERT };
enum job_strategy { STRATEGY_COMMIT = 0, STRATEGY_STREAM, STRATEGY_MOVE };

struct manifest_job {
  enum job_kind kind;
  uint64_t id;
  char name[SNAP_NAME_MAX + 1]; /* the snapshot */
  enum job_strategy strategy;   /* JOB_DELETE (move: cbw) */
  bool keep_bitmap;             /* JOB_DELETE */
  char output[4096];            /* JOB_DELETE stream: final name, or "" */
};

struct manifest {
  uint64_t generation;
  enum snap_mode mode;
  uint32_t block_size;
  uint64_t size;                /* Volume size in bytes. */
  uint64_t next_id;             /* Next layer id to hand out (>= 1). */
  size_t nlayers;
  uint64_t *layers;             /* Layer ids, oldest first, increasing. */
  size_t nckpts;
  struct manifest_checkpoint *ckpts; /* Oldest first. */
  bool origin_retired;          /* the oldest layer is complete: the
                                   origin is never read again */
  struct manifest_job job;
  size_t ndrops;
  uint64_t *drops;              /* ids whose files may be deleted */
  bool has_sample;              /* origin_sample is valid */
  uint64_t origin_sample;
  bool has_origin_file;         /* origin_dev and origin_ino are valid */
  uint64_t origin_dev, origin_ino;
  char origin_path[4096];       /* absolute path of the origin's file,
                                   or "" when not known */
};

/* Render m as text (malloc'd, *len set).  NULL with errno on ENOMEM. */
extern char *manifest_format (const struct manifest *m, size_t *len)
  __attribute__ ((__nonnull__ (1, 2)));

/* Parse text into m (which this initialises).  On error return -1,
 * with m empty, and call snap_error with "LINE N: what is wrong"
 * prefixed by where.
 */
extern int manifest_parse (const char *where, const char *text, size_t len,
                           struct manifest *m)
  __attribute__ ((__nonnull__ (1, 2, 4)));

/* Load DIR/manifest into m (which this initialises: empty unless
 * loaded).  Return 1 if loaded, 0 if there is no manifest (a new
 * store), -1 on error (reported with snap_error).
 */
extern int manifest_load (const char *dir, struct manifest *m)
  __attribute__ ((__nonnull__ (1, 2)));

/* Increment m->generation and replace DIR/manifest atomically.
 * Return 0, or -1 with errno set (m->generation is restored, and the
 * old manifest is in place).  When the new manifest is in place but
 * the directory could not be synced, the error is reported and 0 is
 * returned: the store goes on from the new one.
 */
extern int manifest_save (const char *dir, struct manifest *m)
  __attribute__ ((__nonnull__ (1, 2)));

/* Deep copy src into dst.  Return 0, or -1 with errno set. */
extern int manifest_dup (const struct manifest *src, struct manifest *dst)
  __attribute__ ((__nonnull__ (1, 2)));

/* Remove layer id if present. */
extern void manifest_remove_layer (struct manifest *m, uint64_t id)
  __attribute__ ((__nonnull__ (1)));

/* Free the arrays of m. */
extern void manifest_free (struct manifest *m)
  __attribute__ ((__nonnull__ (1)));

/* Lookups.  Return the index, or -1. */
extern ssize_t manifest_find_checkpoint (const struct manifest *m,
                                       const char *name)
  __attribute__ ((__nonnull__ (1, 2)));

/* Append a layer id / a checkpoint.  Return 0, or -1 with errno. */
extern int manifest_add_layer (struct manifest *m, uint64_t id)
  __attribute__ ((__nonnull__ (1)));
extern int manifest_add_checkpoint (struct manifest *m,
                                    const struct manifest_checkpoint *c)
  __attribute__ ((__nonnull__ (1, 2)));

/* Add id to the drop list.  Return 0, or -1 with errno. */
extern int manifest_add_drop (struct manifest *m, uint64_t id)
  __attribute__ ((__nonnull__ (1)));

/* Whether the manifest uses id: a layer, a checkpoint's map, or the
 * running revert's map (named after its job).
 */
extern bool manifest_uses (const struct manifest *m, uint64_t id)
  __attribute__ ((__nonnull__ (1)));

/* Remove checkpoint i (later ones move down). */
extern void manifest_remove_checkpoint (struct manifest *m, size_t i)
  __attribute__ ((__nonnull__ (1)));

#endif /* SNAP_MANIFEST_H */
