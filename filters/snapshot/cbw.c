/* nbdkit-snapshot: copy-before-write snapshots (the cbw kind, kind.h).
 *
 * Notes on the design
 * -------------------
 *
 * The origin stays the live volume: clients' writes go to it in place,
 * so other readers of the origin see current data.  Each snapshot S
 * has a layer of its own, started when S is taken, which keeps the old
 * contents of the pages first overwritten while S is the newest
 * snapshot.  Snapshots S1 (oldest) ... Sn own layers L1 ... Ln:
 *
 *   live:   the origin;
 *   snap S: S's layer, then each newer snapshot's layer, then the
 *           origin (the first that holds the page).
 *
 * A page first overwritten after Sn was taken is kept in Ln; the older
 * snapshots read it from there too, unless their own layers kept an
 * older copy.  So each page is copied at most once per snapshot taken
 * (classic LVM snapshots copy it once per snapshot that exists).
 *
 * Preserving.  Before a write (zero, trim) reaches the origin, each of
 * its pages that Ln lacks is read from the origin and written to Ln,
 * its bit set, and Ln made durable, data then map (layer_sync: one
 * flush shared by the concurrent writers), so the old contents are on
 * disk before the origin is overwritten.  A small write to pages Ln
 * lacks, all of them, is acknowledged before that sync: its pages
 * wait in pending.c, which syncs Ln once for all the writes waiting
 * and then writes them into the origin (see there for what clients
 * see meanwhile).  The write's pages are locked
 * (store.pages) from the preserve to the end of the origin write, so
 * two writes to one page preserve it once; writes to other pages go
 * on.  A reader of a snapshot that finds no layer holding a page reads
 * the origin, then looks again: a page kept meanwhile is read from the
 * layer (view.c, recheck), since it was kept before the origin
 * changed.  Dirty bits reach the disk before each write (checkpoint.c,
 * the layer maps record no writes here).
 *
 * Delete S (not the oldest): every page S's layer holds and the next
 * older snapshot's layer lacks moves into that layer (the older
 * snapshots read S's layer for exactly those pages), then S's layer
 * goes.  Every view reads the same at every step, so the job can be
 * cancelled.  If S is the newest, writes keep preserving into S's layer
 * meanwhile: the end of the job, with clients held, moves what came
 * after the scan.  The oldest snapshot's layer just goes.
 *
 * Revert to S: the origin gets S's contents back.  Until the job ends,
 * the live view reads S's view for the pages changed since S that the
 * origin does not hold back yet (revert_done); the job writes them into
 * the origin, each after preserving the origin's page for the newer
 * snapshots as any write does.  A client writing such a page first
 * writes S's page into the origin; every page a client writes is done
 * from then on (the job must not copy S's page over it, even one that
 * the write itself kept for the newer snapshots).  revert_done is
 * saved on a client's
 * flush, so a restarted job never writes over a page a client wrote
 * and flushed; pages it copied back again read the same.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

#include <nbdkit-filter.h>

#include "cleanup.h"
#include "job.h"
#include "kind.h"
#include "mapfile.h"
#include "origin.h"
#include "pending.h"
#include "store.h"
#include "util.h"

/* Pages read and kept at a time by a preserve. */
#define PRESERVE_PAGES 256

/* ---- Views ---- */

/* The layers of snapshot index ci's view: its own, then the newer. */
static void
cbw_snapshot_view (size_t ci, struct view *v)
{
  view_of_layers (v, store_snapshot_depth (&store.m.ckpts[ci]),
                  store.nlayers, true);
  v->recheck = true;
}

/* The view of the snapshot a revert goes back to. */
static void
revert_view (struct view *v)
{
  view_of_layers (v, store.revert_depth, store.nlayers, true);
  v->recheck = true;
}

static void
cbw_live_view (struct view *v, struct view *below)
{
  if (store.revert_depth >= 0) {
    revert_view (below);
    *v = (struct view) { .top = &store.revert_done, .top_src = -1,
                         .below = below };
    return;
  }
  view_of_layers (v, 0, 0, false);      /* the origin */
  v->pending = true;
}

/* ---- Preserving ---- */

/* Read pages [p, q) of the origin into buf: through the client's
 * context next, or the filter's own if next is NULL.
 */
static int
origin_read_pages (nbdkit_next *next, char *buf, uint64_t p, uint64_t q,
                   int *err)
{
  if (next)
    return next->pread (next, buf, run_len (p, q), run_off (p), 0, err);
  if (origin_pread (buf, run_len (p, q), run_off (p)) == -1) {
    *err = errno;
    return -1;
  }
  return 0;
}

/* Keep the origin's pages [first, last] that the newest snapshot's
 * layer lacks in that layer (the pages are locked by the caller), and
 * if durable, make it durable.  into, if not NULL, has room for the
 * pages [first, last] and receives the old contents of those kept.
 * Return 0, STORE_FULL (nothing kept), or -1 with *err set (nothing
 * kept either).
 */
static int
keep_pages (nbdkit_next *next, uint64_t first, uint64_t last, char *into,
            bool durable, int *err)
{
  struct layer *l;
  CLEANUP_FREE char *own = NULL;
  CLEANUP_FREE uint8_t *fresh = NULL;   /* pages kept here: 1 */
  bool kept = false;
  uint64_t p = first;

  if (store.nlayers == 0)
    return 0;
  l = store.layers[store.nlayers - 1];
  /* Room for the pages to keep (snapshot-max-size): if not, the
   * origin is not written.
   */
  if (max_size_param) {
    uint64_t n = last - first + 1;
    int r = store_room (n - sbitmap_count_range (&l->map, first, n), err);
    if (r != 0)
      return r;
  }
  if (sbitmap_count_range (&l->map, first, last - first + 1) ==
      last - first + 1)
    return 0;                   /* all kept already */
  fresh = calloc (last - first + 1, 1);
  if (fresh == NULL) {
    *err = errno;
    nbdkit_error ("calloc: %m");
    return -1;
  }
  while (p <= last) {
    uint64_t q;
    char *buf;

    p = sbitmap_find_next_clear (&l->map, p);
    if (p > last)
      break;
    q = MIN (last + 1, sbitmap_find_next_set (&l->map, p));
    if (into)
      buf = into + run_off (p - first);
    else {
      q = MIN (q, p + PRESERVE_PAGES);
      if (own == NULL &&
          (own = malloc (PRESERVE_PAGES * PAGE_SIZE_BYTES)) == NULL)
        goto err;
      buf = own;
    }
    if (origin_read_pages (next, buf, p, q, err) == -1) {
      errno = *err;
      goto err;
    }
    /* Data, then bits: a reader that sees the bit finds the data.
     * Zeros (a hole of the origin, say) stay holes.
     */
    memset (&fresh[p - first], 1, q - p);
    if (layer_put (l, buf, p, q) == -1)
      goto err;
    kept = true;
    p = q;
  }
  /* Durable before the origin is overwritten (guarantee 2).  If that
   * fails (a full disk), forget the pages kept here: the origin is not
   * written, and the next write to them keeps them again rather than
   * trusting a copy that may not be on disk.
   */
  if (durable && kept && layer_sync (l) == -1)
    goto err;
  return 0;

 err:
  *err = errno;
  nbdkit_error ("layer %" PRIu64 ": keeping the old contents: %m", l->id);
  for (p = first; p <= last; ++p)
    if (fresh[p - first])
      sbitmap_clear (&l->map, p);
  return -1;
}

/* Keep them durably, before a write in place. */
static int
preserve (nbdkit_next *next, uint64_t first, uint64_t last, int *err)
{
  return keep_pages (next, first, last, NULL, true, err);
}

/* ---- Reverting ---- */

/* Whether page p changed since the reverted-to snapshot and is not
 * back in the origin yet (a revert runs).
 */
static bool
revert_wanted (uint64_t p)
{
  if (sbitmap_test (&store.revert_done, p))
    return false;
  for (size_t i = store.revert_depth; i < store.nlayers; ++i)
    if (sbitmap_test (&store.layers[i]->map, p))
      return true;
  return false;
}

/* Write the reverted-to snapshot's pages [p, q) (all wanted) into the
 * origin, through next (or the filter's own context), after keeping
 * the origin's for the newer snapshots; mark them done.  buf holds
 * q - p pages.  Pages locked by the caller.
 */
static int
revert_pages (nbdkit_next *next, char *buf, uint64_t p, uint64_t q,
              int *err)
{
  struct view v;
  int r;

  revert_view (&v);
  if (next)
    r = view_pread (next, &v, buf, run_len (p, q), run_off (p), err);
  else {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&bg_lock);
    r = view_pread (bg_next, &v, buf, run_len (p, q), run_off (p), err);
  }
  if (r == -1)
    return -1;
  /* No snapshot is invalidated while a revert runs: a full store fails
   * the revert's write.
   */
  r = preserve (next, p, q - 1, err);
  if (r == STORE_FULL)
    *err = ENOSPC;
  if (r != 0)
    return -1;
  if (next)
    r = next->pwrite (next, buf, run_len (p, q), run_off (p), 0, err);
  else if ((r = origin_pwrite (buf, run_len (p, q), run_off (p))) == -1)
    *err = errno;
  if (r == -1)
    return -1;
  if (sbitmap_set_range (&store.revert_done, p, q - p) == -1) {
    *err = errno;
    return -1;
  }
  return 0;
}

/* Before a client writes pages [first, last] during a revert: put the
 * snapshot's contents of the wanted ones into the origin first, so the
 * write lands on them (pages locked by the caller).
 */
static int
revert_before_write (nbdkit_next *next, uint64_t first, uint64_t last,
                     int *err)
{
  CLEANUP_FREE char *buf = NULL;

  for (uint64_t p = first; p <= last; ) {
    uint64_t q;

    while (p <= last && !revert_wanted (p))
      p++;
    for (q = p; q <= last && q < p + PRESERVE_PAGES && revert_wanted (q); ++q)
      ;
    if (q == p)
      break;
    if (buf == NULL && (buf = malloc (PRESERVE_PAGES * PAGE_SIZE_BYTES))
        == NULL) {
      *err = errno;
      return -1;
    }
    if (revert_pages (next, buf, p, q, err) == -1)
      return -1;
    p = q;
  }
  return 0;
}

/* Make revert_done durable: on a client's flush or FUA write (a page
 * it wrote must not be copied back over after a restart), before a
 * checkpoint, and at a clean stop.  Return 0, or -1 with errno set.
 *
 * Order: take the bits first (mapfile_collect copies them), then flush
 * the origin (the client's context next, if given, and the filter's
 * own, which the job writes through), then write and sync the map.  A
 * bit says that the origin holds the page's final contents, so it may
 * reach the disk only after the origin's write of that page has: a bit
 * set after the collect (by the job, or by a client's write that is
 * not flushed yet) waits for the next save, and its origin write may
 * land after the flush.  Taking the bits after the flush would sync
 * such a bit over a page the origin may still lose: after a power loss
 * the resumed revert would skip it, and the live volume would read the
 * origin's old page there.
 */
static int
revert_save (nbdkit_next *next)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&store.revert_lock);
  struct mapfile_batch batch = { 0 };
  int r = -1, err = 0;

  if (store.revert_fd == -1)
    return 0;
  if (mapfile_collect (&store.revert_done, &batch) == -1)
    return -1;
  if (batch.n > 0) {
    if (next && next->can_flush (next) == 1 &&
        next->flush (next, 0, &err) == -1) {
      errno = err ? err : EIO;
      goto out;
    }
    if (origin_flush () == -1)
      goto out;
  }
  /* The bits in the batch were taken before the flush: a page that the
   * job puts back, or a client writes, from here on is not in it, since
   * its write to the origin is not flushed yet.
   */
  if (snapshot_debug_revert_save_delay_ms > 0) {
    nbdkit_debug ("snapshot: revert progress: origin flushed, "
                  "waiting %d ms", snapshot_debug_revert_save_delay_ms);
    snap_sleep_ms (snapshot_debug_revert_save_delay_ms);
  }
  r = mapfile_write (store.revert_fd, &batch);
 out:
  if (r == -1) {
    int e = errno;
    mapfile_batch_restore (&store.revert_done, &batch);
    errno = e;
  }
  mapfile_batch_free (&batch);
  return r;
}

static char *
revert_map_path (uint64_t id)
{
  char *path;

  if (asprintf (&path, "%s/revert-%" PRIu64 ".map", store.dir, id) == -1)
    return NULL;
  return path;
}

/* ---- Writes to the live volume ---- */

enum op { OP_WRITE, OP_ZERO, OP_TRIM };

/* Defer a write to pages [first, last] if they are all new to the
 * newest layer (pending.c): keep their old contents in the layer, put
 * the new pages in the table, and return 1 (done: the write is
 * acknowledged).  Return 0 if the write is not for deferring, STORE_FULL
 * or -1 (*err set) as preserve does.  The pages are locked.
 */
static int
defer_write (nbdkit_next *next, const void *buf, uint32_t count,
             uint64_t offset, uint64_t first, uint64_t last, int *err)
{
  struct layer *l = store.layers[store.nlayers - 1];
  const uint64_t n = last - first + 1;
  char *data;
  int r;

  if (sbitmap_count_range (&l->map, first, n) != 0 || !pending_reserve (n))
    return 0;
  data = malloc (n * PAGE_SIZE_BYTES);
  if (data == NULL) {
    *err = errno;
    nbdkit_error ("malloc: %m");
    pending_unreserve (n);
    return -1;
  }
  /* The old pages, kept in the layer (a short last page of the
   * volume: the rest stays zero), not durably yet.
   */
  memset (data + (n - 1) * PAGE_SIZE_BYTES, 0, PAGE_SIZE_BYTES);
  r = keep_pages (next, first, last, data, false, err);
  if (r != 0) {
    free (data);
    pending_unreserve (n);
    return r;
  }
  /* The new pages: the old ones with the write over them. */
  memcpy (data + (offset - run_off (first)), buf, count);
  if (pending_add (l, first, n, data) == -1) {
    *err = errno;
    /* Kept, not durably, for a write that fails: forget them as
     * keep_pages does on failure, so that the next write to these
     * pages keeps them again, durably, before it goes in place.
     */
    sbitmap_clear_range (&l->map, first, n);
    return -1;
  }
  return 1;
}

static int
cbw_write (nbdkit_next *next, enum op op, const void *buf, uint32_t count,
           uint64_t offset, uint32_t flags, int *err)
{
  const uint64_t first = offset >> PAGE_SHIFT;
  const uint64_t last = (offset + count - 1) >> PAGE_SHIFT;
  const bool reverting = store.revert_depth >= 0;
  struct range r;
  int ret = 0;

  if (ckpt_mark_write (count, offset, err) == -1)
    return -1;
  if (store.nlayers > 0 || reverting) {
    rangelock_acquire (&store.pages, &r, first, last);
    if (op == OP_WRITE && !reverting && !(flags & NBDKIT_FLAG_FUA) &&
        last - first < PENDING_MAX_WRITE_PAGES) {
      ret = defer_write (next, buf, count, offset, first, last, err);
      if (ret != 0) {
        rangelock_release (&store.pages, &r);
        return ret == 1 ? 0 : ret;
      }
    }
    /* Deferred writes to these pages go first. */
    if (pending_wait_range (first, last) == -1) {
      *err = errno;
      nbdkit_error ("an earlier write to these pages has not reached the "
                    "origin yet: %m");
      rangelock_release (&store.pages, &r);
      return -1;
    }
    if (reverting)
      ret = revert_before_write (next, first, last, err);
    if (ret == 0)
      ret = preserve (next, first, last, err);
  }
  /* STORE_FULL: nothing was written; the caller makes room. */
  if (ret == 0) {
    switch (op) {
    case OP_WRITE:
      ret = origin_client_pwrite (next, buf, count, offset, flags, err);
      break;
    case OP_ZERO:
      ret = origin_client_zero (next, count, offset, flags, err);
      break;
    case OP_TRIM:
      ret = origin_client_trim (next, count, offset, flags, err);
      break;
    }
  }
  /* During a revert, the origin now holds what the live volume must
   * read for these pages: the job must not copy the snapshot's over
   * them (the page kept just now for the newer snapshots would
   * otherwise look like one changed since the snapshot).
   */
  if (ret == 0 && reverting &&
      sbitmap_set_range (&store.revert_done, first, last - first + 1) == -1) {
    *err = errno;
    ret = -1;
  }
  if (store.nlayers > 0 || reverting)
    rangelock_release (&store.pages, &r);
  if (ret == 0 && reverting && (flags & NBDKIT_FLAG_FUA) &&
      revert_save (next) == -1) {
    *err = errno;
    nbdkit_error ("flush: saving the revert's progress: %m");
    ret = -1;
  }
  return ret;
}

static int
cbw_pwrite (nbdkit_next *next, const void *buf, uint32_t count,
            uint64_t offset, uint32_t flags, int *err)
{
  return cbw_write (next, OP_WRITE, buf, count, offset, flags, err);
}

static int
cbw_zero (nbdkit_next *next, uint32_t count, uint64_t offset,
          uint32_t flags, int *err)
{
  /* Keeping the old contents first is not fast. */
  if ((flags & NBDKIT_FLAG_FAST_ZERO) &&
      (store.nlayers > 0 || store.revert_depth >= 0 ||
       !next->can_fast_zero (next))) {
    *err = ENOTSUP;
    return -1;
  }
  return cbw_write (next, OP_ZERO, NULL, count, offset, flags, err);
}

static int
cbw_trim (nbdkit_next *next, uint32_t count, uint64_t offset,
          uint32_t flags, int *err)
{
  return cbw_write (next, OP_TRIM, NULL, count, offset, flags, err);
}

static int
cbw_flush (nbdkit_next *next, uint32_t flags, int *err)
{
  if (pending_flush () == -1) {
    *err = errno;
    nbdkit_error ("flush: a deferred write was lost: %m");
    return -1;
  }
  if (origin_client_flush (next, flags, err) == -1)
    return -1;
  if (store.revert_depth >= 0 && revert_save (next) == -1) {
    *err = errno;
    nbdkit_error ("flush: saving the revert's progress: %m");
    return -1;
  }
  return 0;
}

static int
cbw_can_write (nbdkit_next *next)
{
  return next->can_write (next);
}

static int
cbw_can_multi_conn (nbdkit_next *next)
{
  return next->can_multi_conn (next);
}

static bool
cbw_active_is_layered (void)
{
  return false;
}

static int
cbw_flush_live (int (*flush_origin) (void))
{
  if (flush_origin () == -1)
    return -1;
  /* As a client's flush (cbw_flush): during a revert, the pages clients
   * wrote must not be copied back over after a restart.
   */
  if (store.revert_depth >= 0 && revert_save (NULL) == -1)
    return -1;
  return 0;
}

/* ---- Delete: move the pages only S's layer keeps into the next
 * older snapshot's layer ---- */

static uint64_t
move_next (struct job *j, uint64_t p)
{
  if (j->lower < 0)
    return store.npages;        /* the oldest: nothing moves */
  return sbitmap_find_next_set (&store.layers[j->upper]->map, p);
}

static bool
move_want (struct job *j, uint64_t p)
{
  return j->lower >= 0 &&
    sbitmap_test (&store.layers[j->upper]->map, p) &&
    !sbitmap_test (&store.layers[j->lower]->map, p);
}

static int
move_copy (struct job *j, char *buf, uint64_t p, uint64_t q)
{
  if (full_pread (store.layers[j->upper]->data_fd, buf, run_len (p, q),
                  run_off (p)) == -1)
    return -1;
  return layer_put (store.layers[j->lower], buf, p, q);
}

static struct layer *
move_target (struct job *j)
{
  return j->lower >= 0 ? store.layers[j->lower] : NULL;
}

static int
move_finish (struct job *j, char **errmsg)
{
  ssize_t ci = manifest_find_checkpoint (&store.m, j->name);
  struct manifest saved;
  static char buf[CHUNK_PAGES * PAGE_SIZE_BYTES];

  assert (ci >= 0);
  /* Clients are held (store.lock exclusive): move what was kept in S's
   * layer after the scan went past (S was the newest).
   */
  if (j->lower >= 0) {
    for (uint64_t p = move_next (j, 0); p < store.npages; ) {
      uint64_t q;

      if (!move_want (j, p)) {
        p = move_next (j, p + 1);
        continue;
      }
      for (q = p; q < store.npages && q < p + CHUNK_PAGES && move_want (j, q);
           ++q)
        ;
      if (move_copy (j, buf, p, q) == -1)
        goto err;
      p = q;
    }
    if (layer_flush (store.layers[j->lower]) == -1)
      goto err;
  }
  if (manifest_dup (&store.m, &saved) == -1)
    goto err;
  manifest_remove_layer (&store.m, store.layers[j->upper]->id);
  if (store_drop_id (store.layers[j->upper]->id) == -1)
    return job_undo_end (j, &saved, errmsg);
  return job_end_delete (j, ci, j->upper, &saved, errmsg);

 err:
  set_errmsg (errmsg, "finishing the delete of '%s': %s", j->name,
              strerror (errno));
  return -1;
}

static const struct job_ops move_ops = {
  .what = "move",
  .next_candidate = move_next,
  .want = move_want,
  .copy_run = move_copy,
  .target = move_target,
  .finish = move_finish,
};

/* ---- Revert ---- */

static uint64_t
revert_next (struct job *j, uint64_t p)
{
  uint64_t n = store.npages;

  for (size_t i = store.revert_depth; i < store.nlayers; ++i)
    n = MIN (n, sbitmap_find_next_set (&store.layers[i]->map, p));
  return n;
}

static bool
revert_want (struct job *j, uint64_t p)
{
  return revert_wanted (p);
}

static int
revert_copy (struct job *j, char *buf, uint64_t p, uint64_t q)
{
  int err = 0;

  if (revert_pages (NULL, buf, p, q, &err) == -1) {
    errno = err ? err : EIO;
    return -1;
  }
  return 0;
}

static struct layer *
revert_target (struct job *j)
{
  return NULL;                  /* the origin */
}

/* Open (or create) the revert's map of pages done, for job id. */
static int
revert_open (uint64_t id)
{
  CLEANUP_FREE char *path = revert_map_path (id);
  struct stat st;
  int fd;

  if (path == NULL)
    return -1;
  /* A map no longer than its header is one whose creation a crash cut
   * short (mapfile_create writes the header, then sizes the file): the
   * job had not started, so nothing was recorded in it.  Make it again.
   */
  if (lstat (path, &st) == 0 && S_ISREG (st.st_mode) &&
      st.st_size <= MAPFILE_HEADER_SIZE) {
    nbdkit_debug ("%s: left incomplete by a crash, made again", path);
    if (store_remove_path (path) == -1)
      return -1;
  }
  if (access (path, F_OK) == 0)
    fd = mapfile_open (path, MAPFILE_KIND_LAYER, PAGE_SIZE_BYTES,
                       store.npages, 1, &store.revert_done);
  else {
    fd = mapfile_create (path, MAPFILE_KIND_LAYER, PAGE_SIZE_BYTES,
                         store.npages);
    if (fd >= 0 && (sbitmap_init (&store.revert_done, store.npages) == -1 ||
                    fsync_dir (store.dir) == -1)) {
      close (fd);
      store_remove_path (path);
      fd = -1;
    }
  }
  if (fd == -1)
    return -1;
  store.revert_fd = fd;
  return 0;
}

static void
revert_close (void)
{
  if (store.revert_fd >= 0)
    close (store.revert_fd);
  store.revert_fd = -1;
  sbitmap_free (&store.revert_done);
}

static int
revert_finish (struct job *j, char **errmsg)
{
  CLEANUP_FREE char *path = revert_map_path (j->id);

  store.m.job.kind = JOB_NONE;
  if (path == NULL || store_drop_id (j->id) == -1 || store_save () == -1) {
    store.m.job.kind = JOB_REVERT;
    set_errmsg (errmsg, "finishing the revert to '%s': %s",
                j->name, strerror (errno));
    return -1;
  }
  store.revert_depth = -1;
  revert_close ();
  store_remove_path (path);
  return 0;
}

static void
revert_cannot_cancel (struct job *j, char **errmsg)
{
  set_errmsg (errmsg, "job %" PRIu64 " is a revert, which cannot stop "
              "half way (clients already see the reverted volume)", j->id);
}

static const struct job_ops revert_ops = {
  .what = "revert",
  .next_candidate = revert_next,
  .want = revert_want,
  .copy_run = revert_copy,
  .target = revert_target,
  .finish = revert_finish,
  .cannot_cancel = revert_cannot_cancel,
};

/* ---- Starting and planning jobs (store.lock exclusive) ---- */

static int
cbw_prepare_delete (struct job *j, size_t ci, int strategy,
                    const char *output, bool origin_writable, bool *push,
                    char **errmsg)
{
  const char *name = store.m.ckpts[ci].name;
  const size_t li = store_snapshot_depth (&store.m.ckpts[ci]);

  if (strategy >= 0 || output) {
    set_errmsg (errmsg, "'%s' is a copy-before-write snapshot: deleting "
                "it moves the blocks it kept into the next older snapshot "
                "(or drops them, for the oldest); --strategy=commit|stream "
                "and --output apply to redirect-on-write stores", name);
    return -1;
  }
  j->strategy = STRATEGY_MOVE;
  j->move_bytes = li > 0 ? pages_bytes (pages_missing (li, li - 1)) : 0;
  *push = false;
  return 0;
}

static int
cbw_prepare_revert (struct job *j, size_t ci, bool *push, char **errmsg)
{
  const size_t li = store_snapshot_depth (&store.m.ckpts[ci]);

  /* The live volume's blocks that change are those changed since S,
   * the pages a layer of its view holds: record them first, durably
   * (guarantee 3).
   */
  for (size_t i = li; i < store.nlayers; ++i) {
    const struct sbitmap *map = &store.layers[i]->map;
    uint64_t p = sbitmap_find_next_set (map, 0);
    while (p < store.npages) {
      uint64_t e = sbitmap_find_next_clear (map, p);
      if (ckpt_mark_range (run_off (p), run_len (p, e)) == -1)
        goto err;
      p = sbitmap_find_next_set (map, e);
    }
  }
  if (ckpt_persist_active () == -1)
    goto err;
  *push = false;
  return 0;

 err:
  set_errmsg (errmsg, "cannot start reverting to '%s': %s", j->name,
              strerror (errno));
  return -1;
}

static int
cbw_plan (struct job *j, char **errmsg)
{
  ssize_t ci = manifest_find_checkpoint (&store.m, j->name);
  size_t li;

  if (ci < 0 || store.m.ckpts[ci].kind != CKPT_SNAPSHOT) {
    set_errmsg (errmsg, "'%s' is not a snapshot", j->name);
    return -1;
  }
  li = store_snapshot_depth (&store.m.ckpts[ci]);
  if (li >= store.nlayers) {
    set_errmsg (errmsg, "snapshot '%s' has no layer", j->name);
    return -1;
  }
  if (j->kind == JOB_REVERT) {
    uint64_t n = 0;

    if (revert_open (j->id) == -1) {
      set_errmsg (errmsg, "the revert's map: %s", strerror (errno));
      return -1;
    }
    store.revert_depth = li;
    j->ops = &revert_ops;
    for (uint64_t p = revert_next (j, 0); p < store.npages;
         p = revert_next (j, p + 1))
      n += revert_wanted (p);
    j->bytes_total = pages_bytes (n);
    return 0;
  }
  if (j->strategy != STRATEGY_MOVE) {
    set_errmsg (errmsg, "a delete of a copy-before-write snapshot moves "
                "blocks (not %s)",
                j->strategy == STRATEGY_COMMIT ? "commit" : "stream");
    return -1;
  }
  j->upper = li;
  j->lower = (ssize_t) li - 1;
  j->ops = &move_ops;
  j->move_bytes = j->lower >= 0
    ? pages_bytes (pages_missing (j->upper, j->lower)) : 0;
  j->bytes_total = j->move_bytes;
  return 0;
}

/* A revert interrupted by the stop resumes at the next start: keep
 * what clients wrote since it began.
 */
static void
cbw_close (void)
{
  pending_stop ();
  if (store.revert_fd >= 0 && revert_save (NULL) == -1)
    nbdkit_error ("snapshot: saving the revert's progress: %m");
  revert_close ();
}

const struct kind cbw_kind = {
  .name = "cbw",
  .mode = MODE_CBW,
  .live_view = cbw_live_view,
  .snapshot_view = cbw_snapshot_view,
  .pwrite = cbw_pwrite,
  .zero = cbw_zero,
  .trim = cbw_trim,
  .flush = cbw_flush,
  .can_write = cbw_can_write,
  .can_multi_conn = cbw_can_multi_conn,
  .active_is_layered = cbw_active_is_layered,
  .flush_live = cbw_flush_live,
  .snapshots_freeze_origin = false,
  .prepare_delete = cbw_prepare_delete,
  .prepare_revert = cbw_prepare_revert,
  .plan = cbw_plan,
  .close = cbw_close,
};
