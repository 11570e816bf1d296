/* nbdkit-snapshot: the store, its layers and checkpoints.
 *
 * Notes on the design
 * -------------------
 *
 * A store is a directory: "manifest" (common/store/manifest.h) names
 * the layers and snapshots; each layer N is "layer-N.data", a sparse
 * file as large as the volume that holds page p at offset p * 4096,
 * and "layer-N.map", a bitmap file (common/bitmap/mapfile.h) with one
 * bit per 4 KiB page: set = the layer holds that page.
 *
 * Layers allocate 4 KiB pages, not whole blocks (snapshot-block-size
 * is the unit of change tracking and reporting), so a 4 KiB write into
 * a fresh 64 KiB block copies nothing; only a write smaller than a page
 * reads the rest of its page from below (read-modify-write).
 *
 * The store's kind (kind.h) says what its layers hold and how views
 * read them: row.c (redirect-on-write, the newest layer takes the
 * writes) and cbw.c (copy-before-write, each snapshot's layer keeps
 * what writes overwrote).  A view (kind.h) is a range of layers
 * searched in order, then the origin.
 *
 * Ordering and durability.  A write pwrites the page data into a
 * layer, then sets the page bits in memory.  A flush (and FUA)
 * takes the dirty map pages (mapfile_collect), fdatasyncs the layer
 * data, then writes the map pages and fdatasyncs the map: a map on
 * disk never claims a page whose data is not durable.  Taking a
 * checkpoint first flushes the live volume (store.kind->flush_live),
 * so what it must hold is durable before the manifest names it.
 * After kill -9 the maps hold every page flushed before; pages written
 * and not flushed may be lost, as on a disk with a volatile cache.
 *
 * Locking.
 *   store.lock (rwlock): shared by every I/O request and flush for its
 *     whole duration, exclusive while a snapshot is created, so the
 *     switch to a new layer waits for writes in flight and no write is
 *     split between the old and new layer.  Writer-preferring, so a
 *     snapshot is not starved by a stream of requests.  Every change of
 *     layers, checkpoints or jobs takes it exclusive through
 *     ACQUIRE_STORE_EXCLUSIVE_FOR_CURRENT_SCOPE, which also waits until
 *     no deferred cbw write is held (pending.h), so the views and layers
 *     it changes never have one in flight.
 *   store.pages (rangelock.h): held over the pages a write touches, so
 *     a read-modify-write of a partial page cannot interleave with
 *     another write to the same page.
 *   layer.flush_lock: serialises flushes of one layer.
 *   The page bitmaps themselves are lock-free (sbitmap.h).
 *   store.control_lock: serialises control requests against each other.
 */
#ifndef SNAPSHOT_STORE_H
#define SNAPSHOT_STORE_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include <nbdkit-filter.h>

#include "cleanup.h"
#include "job.h"
#include "kind.h"
#include "manifest.h"
#include "pending.h"
#include "rangelock.h"
#include "sbitmap.h"

#define PAGE_SIZE_BYTES 4096
#define PAGE_SHIFT 12

struct layer {
  uint64_t id;
  int data_fd;                  /* layer-N.data, read-write */
  int map_fd;                   /* layer-N.map; -1 once frozen */
  struct sbitmap map;           /* page bits */
  pthread_mutex_t flush_lock;   /* serialises layer_flush */
  unsigned data_dirty;          /* atomic: data written since last flush */
  struct sbitmap regions;       /* regions of LAYER_REGION_BYTES allocated
                                   whole (view.c, top_region) */
  bool sealed;                  /* its map file is sealed (mapfile.h):
                                   unseal before changing the layer */
  /* Group commit of layer_sync (cbw preserves): */
  pthread_mutex_t gc_lock;
  pthread_cond_t gc_cond;
  uint64_t gc_seq, gc_synced;   /* requests made; made durable */
  bool gc_busy;                 /* a sync runs */
};

/* The region a layer's data file is allocated ahead by (view.c). */
#define LAYER_REGION_BYTES (1024 * 1024)

/* A checkpoint's dirty map (checkpoint.c). */
struct ckpt_map {
  uint64_t id;                  /* dirty-ID.map */
  int fd;                       /* open read-write while active, else -1 */
  uint64_t *mm;                 /* active: the file's bitmap pages, shared */
  size_t mm_len;
  struct sbitmap bm;            /* one bit per block */
  pthread_mutex_t lock;         /* protects the group-commit state: */
  pthread_cond_t cond;
  uint64_t seq;                 /* requests to write (and sync) */
  uint64_t written, synced;     /* last request written; synced */
  uint64_t sync_req;            /* last request that asked for a sync */
  bool busy;                    /* a write is running */
  bool unsynced;                /* pages written but not yet synced */
  unsigned refs;                /* atomic: connections using it */
  bool sealed;                  /* its file is sealed (mapfile.h) */
};

struct job;

struct store {
  const struct kind *kind;      /* the store's kind (kind.h), for life */
  char *dir;                    /* absolute path */
  int lock_fd;                  /* flock'd DIR/lock */
  struct manifest m;            /* protected by lock (write: exclusive) */
  uint64_t size;                /* volume size in bytes */
  uint64_t npages;              /* ceil (size / 4096) */
  uint64_t nblocks;             /* ceil (size / block_size) */
  uint32_t block_size;

  pthread_rwlock_t lock;        /* see "Locking" above */
  size_t nlayers;               /* == m.nlayers */
  struct layer **layers;        /* parallel to m.layers, oldest first */
  struct ckpt_map **maps;       /* parallel to m.ckpts */

  struct rangelock pages;
  pthread_mutex_t control_lock;

  /* While a revert runs, live reads of pages the newest layer lacks
   * come from this many layers (the reverted-to snapshot's view)
   * instead of the layers below; else -1.  Changes only with lock held
   * exclusively.
   */
  ssize_t revert_depth;

  /* cbw, while a revert runs: the pages the origin already holds as
   * the reverted-to snapshot has them (copied back by the job, or
   * written since by a client), kept in DIR/revert-JOB.map (cbw.c).
   * Bits change with the pages locked; revert_lock serialises saving.
   */
  struct sbitmap revert_done;
  int revert_fd;
  pthread_mutex_t revert_lock;

  pthread_mutex_t job_lock;     /* protects job and the job history */
  pthread_cond_t job_cond;      /* broadcast when a job ends */
  struct job *job;              /* the running job, or NULL */
  struct job stuck;             /* a failed job left in the journal, to
                                   resume at the next start (id 0: none) */
};

/* The one store of this nbdkit process. */
extern struct store store;

/* Parameters (snapshot.c). */
extern const char *store_param;
extern const char *control_param;
extern const char *create_param;
extern uint32_t block_size_param;     /* 0 = not given */
extern int mode_param;                /* enum snap_mode, -1 = not given */
extern uint64_t max_size_param;       /* snapshot-max-size, 0 = none */
enum full_policy { FULL_ERROR, FULL_INVALIDATE };
extern int full_param;                /* enum full_policy, -1 = default */
extern bool adopt_origin_param;       /* snapshot-adopt-origin=true */
/* snapshot-job-rate: bytes per second a background job may copy while
 * clients are doing I/O (0 = no limit).
 */
extern uint64_t job_rate_param;
/* Client requests served so far (any export); a job reads it to tell
 * whether clients are busy.  Updated with relaxed atomics.
 */
extern uint64_t client_requests;
extern int snapshot_debug_verbose;
extern int snapshot_debug_job_delay;
extern int snapshot_debug_job_hold;
extern int snapshot_debug_apply_delay_ms;
extern int snapshot_debug_revert_save_delay_ms;
extern int snapshot_debug_job_busy;
extern int snapshot_debug_origin_probe_ms;
extern int snapshot_debug_intent_clear_ms;

/* Lock DIR (creating it if needed).  Called before forking so a second
 * server fails on the command line.  Return 0 or -1 (error reported).
 */
extern int store_lock (const char *dir)
  __attribute__ ((__nonnull__ (1)));

/* Load and check the manifest, if any (before forking).  Return 0 or
 * -1 (error reported).
 */
extern int store_load (void);

/* Open or create the store for an origin of the given size.  Return 0
 * or -1 (error reported; what it opened is closed again, and
 * store_close ends the rest).
 */
extern int store_open (uint64_t origin_size);

/* Save the manifest (store.m), dropping the drop lines of ids whose
 * files are gone.  Return 0, or -1 with errno set (the manifest on
 * disk is then the old one).
 */
extern int store_save (void);

/* Put *saved (a copy of the manifest before a change that could not
 * be saved) back in store.m, keeping errno; *saved is used up.
 */
extern void store_restore (struct manifest *saved);

/* Record that id's files are no longer used (saved with the next
 * store_save, which makes them deletable after a crash).  Return 0, or
 * -1 with errno set.
 */
extern int store_drop_id (uint64_t id);

/* Delete path, a file of the store, if that is safe: a symlink, or a
 * regular file with one link that no symlink in the store points to.
 * Return 0 (deleted, or not there), or -1 with errno set (EMLINK: not
 * safe; EINVAL: not in the store).
 */
extern int store_remove_path (const char *path)
  __attribute__ ((__nonnull__ (1)));

/* The full-store policy (snapshot-max-size, snapshot-full).  Check it
 * against the store's kind (before forking).  Return 0, or -1 after
 * nbdkit_error.
 */
extern int store_check_full_policy (void);

/* What a kind's write returns when the store is full and snapshots are
 * to be invalidated: the caller calls store_invalidate_oldest with the
 * store unlocked, then tries again.
 */
#define STORE_FULL (-2)

/* Hold store.lock exclusive until the end of the enclosing block, once
 * every deferred write is in the origin (pending_settle).
 */
#define ACQUIRE_STORE_EXCLUSIVE_FOR_CURRENT_SCOPE() \
  ACQUIRE_WRLOCK_FOR_CURRENT_SCOPE (&store.lock); \
  pending_settle ()

/* Whether npages more pages fit in the store (store.lock shared):
 * 0 if they do; -1 with *err = ENOSPC if not (reported); STORE_FULL if
 * not and the oldest snapshot is to be invalidated.
 */
extern int store_room (uint64_t npages, int *err);

/* Invalidate the oldest snapshot to make room (store.lock not held):
 * it becomes a bitmap-only checkpoint (its changed blocks are still
 * tracked) and its layer goes.  Return 0, or -1 with *err = ENOSPC if
 * nothing can go.
 */
extern int store_invalidate_oldest (int *err);

/* Flush and close everything (clean shutdown). */
extern void store_close (void);

/* Number of layers in snapshot S's view (the store lock must be held). */
extern size_t store_snapshot_depth (const struct manifest_checkpoint *s)
  __attribute__ ((__nonnull__ (1)));

/* Layer files: path of layer id's "data" or "map" (malloc'd); create
 * a new empty layer (O(1)); free one (closing its files).
 */
extern char *layer_path (uint64_t id, const char *ext);
extern struct layer *layer_create (uint64_t id);
extern void layer_free (struct layer *l);

/* Seals (mapfile.h).  A layer's seal also keeps the pages it holds
 * that are holes in its data file (zeroed or trimmed), so that a hole
 * punched into its data from outside is found at the next start.
 * layer_unseal clears the seal of l before anything changes it (a
 * no-op when unsealed); layer_seal flushes l and seals it.  Return 0,
 * or -1 with errno set.
 */
extern int layer_unseal (struct layer *l) __attribute__ ((__nonnull__ (1)));
extern int layer_seal (struct layer *l) __attribute__ ((__nonnull__ (1)));

/* Whether buf's len bytes are all zero. */
extern bool pages_are_zero (const char *buf, size_t len);

/* Write pages [p, q) from buf (page p first, the last one short at the
 * end of the volume) into layer l's data, without setting their bits.
 * All-zero pages become holes: they read as zeros, take no space, are
 * reported as holes, and a copy of the store that makes holes of
 * zeros (cp, rsync -S) leaves them as they were.  Return 0, or -1
 * with errno set.
 */
extern int layer_store (struct layer *l, const char *buf, uint64_t p,
                        uint64_t q)
  __attribute__ ((__nonnull__ (1, 2)));

/* Make the writes to layer l durable (see "Ordering" above).  Return 0,
 * or -1 with errno set.
 */
extern int layer_flush (struct layer *l)
  __attribute__ ((__nonnull__ (1)));

/* Make every page set in l so far durable, data then map, sharing one
 * layer_flush with the concurrent callers (group commit: the cost is
 * paid once per batch of writers, not once per writer).  Return 0, or
 * -1 with errno set.
 */
extern int layer_sync (struct layer *l)
  __attribute__ ((__nonnull__ (1)));

/* The same with the data synced through fd, another descriptor of l's
 * data file (a merge job's flusher): an error that sync reports is then
 * not taken from the next flush through l->data_fd.  Caller holds
 * store.lock (shared).
 */
extern int layer_flush_fd (struct layer *l, int fd)
  __attribute__ ((__nonnull__ (1)));

/* Take checkpoint name now: a snapshot, or with bitmap_only a
 * bitmap-only checkpoint.  flush_origin is called when the origin is
 * the live volume.  Return the index of the new checkpoint in
 * store.m.ckpts, or -1 with *errmsg set to a malloc'd message.
 */
extern ssize_t store_create_checkpoint (const char *name, bool bitmap_only,
                                        int (*flush_origin) (void),
                                        char **errmsg)
  __attribute__ ((__nonnull__ (1, 3, 4)));

/* Delete checkpoint name (store.lock must not be held).  Return 0, or
 * -1 with *errmsg set.
 */
extern int store_delete_checkpoint (const char *name, char **errmsg)
  __attribute__ ((__nonnull__ (1, 2)));

/* Bytes held by layer id, or 0 (the store lock must be held). */
extern uint64_t store_layer_bytes (uint64_t id);
/* Disk space taken by checkpoint i's files (the layer it started and
 * its dirty map), and by the whole store (store.lock held).
 */
extern uint64_t store_checkpoint_disk_bytes (size_t i);
extern uint64_t store_disk_bytes (void);
/* Open snap/ and dirty/ connections that use checkpoint i (store.lock
 * held): while there are any, it cannot be deleted.
 */
extern unsigned store_connections (size_t i);

/* ---- A store whose disk failed a sync ----
 *
 * The data of a layer, and the bits of a dirty map (stored into its
 * shared mapping, or written without a sync), are written once and
 * made durable by a later sync.  If that sync fails, what it covered
 * may never reach the disk: the kernel may drop the pages it failed to
 * write back, and reports the error once, so the next sync of the same
 * file succeeds without them (retrying would report a loss as
 * durable).  So the first such failure stops the store from taking
 * changes until nbdkit restarts: client writes, zeroes, trims and
 * flushes, and every later sync of a layer or a dirty map, fail with
 * EIO; control requests that change the store are refused; reads go
 * on.  The stop then leaves the store as a crash would, and the next
 * start recovers it: the layer maps name only data synced before the
 * failure, and the dirty map is rebuilt from the write-intent regions
 * as after a power loss (intent_distrust).
 *
 * Failed reads and writes, and failed syncs of files that are written
 * whole again before the next try (the manifest, a layer's map pages,
 * intent.map, seals, new files), fail only the request that met them.
 */

/* Record a failed sync (errno is its error; fs names the file and the
 * call) and stop taking changes.  Keeps errno.
 */
extern void store_fail (const char *fs, ...)
  __attribute__ ((format (printf, 1, 2)));

/* Whether a sync failed (then the caller fails with EIO). */
extern bool store_failed (void);

/* If a sync failed: report it for a client's change that is refused,
 * set *err to EIO and return true.
 */
extern bool store_refuses (const char *what, int *err)
  __attribute__ ((__nonnull__ (1, 2)));

/* The failed sync, as text for a message ("layer-3.data: fdatasync:
 * Input/output error"), or NULL if none failed.
 */
extern const char *store_failure (void);

/* Format a message into *errmsg (malloc'd; NULL if out of memory). */
extern void set_errmsg (char **errmsg, const char *fs, ...)
  __attribute__ ((format (printf, 2, 3)));

/* ---- intent.c: write-intent regions (see there) ---- */

/* At start-up, after the maps are open: recover from an unclean stop,
 * start an empty intent file.  Return 0, or -1 after nbdkit_error.
 */
extern int intent_open (void);
extern void intent_close (void);

/* Make the intent bits of the regions of blocks [first, last] durable
 * before a write to them is issued.  Return 0, or -1 with errno set.
 */
extern int intent_ensure (uint64_t first_block, uint64_t last_block);

/* Sync the active map and clear the regions no write touched since;
 * with rate_limited, at most every few seconds.  Return 0, or -1 with
 * errno set.
 */
extern int intent_clear (bool rate_limited);

/* After a failed sync (store_fail): make the next start treat the
 * dirty map as after a power loss, even in this boot, by dropping the
 * record of the boot.
 */
extern void intent_distrust (void);

/* ---- checkpoint.c (store.lock held, shared unless stated) ---- */

extern char *ckpt_map_path (uint64_t id);
extern struct ckpt_map *ckpt_map_open (uint64_t id, bool active);
extern struct ckpt_map *ckpt_map_create (uint64_t id);
extern void ckpt_map_free (struct ckpt_map *d);
/* Unmap and close the map's file (when it stops being active). */
extern void ckpt_map_close_file (struct ckpt_map *d);

/* Clear d's seal before changing it; seal it as it is (after it was
 * persisted).  Return 0, or -1 with errno set.
 */
extern int ckpt_map_unseal (struct ckpt_map *d)
  __attribute__ ((__nonnull__ (1)));
extern int ckpt_map_seal (struct ckpt_map *d)
  __attribute__ ((__nonnull__ (1)));

/* Write every bit set so far in d to its file, and with sync make it
 * durable (group commit).
 */
extern int ckpt_map_persist (struct ckpt_map *d, bool sync)
  __attribute__ ((__nonnull__ (1)));
extern int ckpt_persist_active (void);

/* The same for any map, active or frozen (its file then opened for
 * the call).
 */
extern int ckpt_map_write_all (struct ckpt_map *d)
  __attribute__ ((__nonnull__ (1)));

/* Mark the blocks of [offset, offset+count) in the active map; with
 * durable, make newly set bits durable before returning.  Return 0, or
 * -1 with errno set.
 */
extern int ckpt_mark (uint64_t offset, uint64_t count, bool durable);

/* Record a client's write of [offset, offset+count) in the active dirty
 * map before it is issued: durably unless the kind's layer maps record
 * it (see there).  Return 0, or -1 with *err set (reported).
 */
extern int ckpt_mark_write (uint32_t count, uint64_t offset, int *err);

/* At start-up: put back into the newest checkpoint's map every page of
 * the layers it started (see checkpoint.c), and persist it.
 */
extern int ckpt_recover_active (void);

/* Mark blocks in the active map without syncing (the caller then calls
 * ckpt_persist_active).  Return 0, or -1 with errno set.
 */
extern int ckpt_mark_range (uint64_t offset, uint64_t count);

/* Is block b changed between checkpoints from and to (exclusive)?  Set
 * *changed and return the first block at or after b (at most limit)
 * where that answer differs.
 */
extern uint64_t ckpt_run (size_t from, size_t to, uint64_t b,
                          uint64_t limit, bool *changed);

/* Number of blocks changed between checkpoints from and to (exclusive). */
extern uint64_t ckpt_count_changed (size_t from, size_t to);

/* Fold the bits of checkpoint i into the next older map, durably
 * (store.lock exclusive).  Return 0, or -1 with errno set.
 */
extern int ckpt_fold (size_t i);

/* After the manifest no longer names checkpoint i (it had nckpts):
 * drop its map from store.maps and delete its file.
 */
extern void ckpt_forget (size_t i, size_t nckpts);

/* Delete bitmap-only checkpoint i (store.lock exclusive). */
extern int ckpt_delete_bitmap (size_t i, char **errmsg);

/* ---- view.c: I/O through a view (kind.h; store.lock held shared) ---- */

/* A view of layers [lo, hi), searched in the given order. */
extern void view_of_layers (struct view *v, size_t lo, size_t hi,
                            bool ascending)
  __attribute__ ((__nonnull__ (1)));

/* Find the source of page p in view v: the index of a layer, or -1
 * for the origin.  Also return in *run_end the first page at or after
 * p (and at most limit) whose source differs.
 */
extern int view_source (const struct view *v, uint64_t p, uint64_t limit,
                        uint64_t *run_end)
  __attribute__ ((__nonnull__ (1, 4)));

extern int view_pread (nbdkit_next *next, const struct view *v, void *buf,
                       uint32_t count, uint64_t offset, int *err);
extern int view_extents (nbdkit_next *next, const struct view *v,
                         uint32_t count, uint64_t offset, uint32_t flags,
                         struct nbdkit_extents *extents, int *err);
extern int view_cache (nbdkit_next *next, const struct view *v,
                       uint32_t count, uint64_t offset, int *err);

/* dirty/ exports: blocks changed between checkpoints from and to
 * (exclusive) read from view v; others read as zeros and are reported
 * as holes.
 */
extern int dirty_pread (nbdkit_next *next, size_t from, size_t to,
                        const struct view *v, void *buf, uint32_t count,
                        uint64_t offset, int *err);
extern int dirty_extents (size_t from, size_t to, uint32_t count,
                          uint64_t offset, uint32_t flags,
                          struct nbdkit_extents *extents, int *err);

/* Writes go to the newest layer (store.nlayers >= 1): redirect-on-write
 * (row.c) reads the rest of a partial page from row_below_view.
 */
extern void row_below_view (struct view *v);
extern int top_pwrite (nbdkit_next *next, const void *buf, uint32_t count,
                       uint64_t offset, uint32_t flags, int *err);
extern int top_zero (nbdkit_next *next, uint32_t count, uint64_t offset,
                     uint32_t flags, int *err);
extern int top_trim (uint32_t count, uint64_t offset, uint32_t flags,
                     int *err);

#endif /* SNAPSHOT_STORE_H */
