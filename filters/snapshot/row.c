/* nbdkit-snapshot: redirect-on-write snapshots (the row kind, kind.h).
 *
 * Notes on the design
 * -------------------
 *
 * With no snapshot, the origin is the live volume and writes pass
 * through to the plugin.  Taking snapshot S freezes the newest layer
 * (or the origin) and starts a new empty layer, whose id S records.
 * Views are prefixes of the layer list, newest layer first:
 *
 *   live:   every layer, then the origin;
 *   snap S: the layers with id < S.layer, then the origin.
 *
 * Only the newest layer is ever written by clients (view.c, top_*), so
 * every snapshot's view is fixed when it is taken.
 *
 * Merges.  Deleting snapshot S folds two neighbouring layers into one:
 * "upper", the layer S started (the first layer not in S's view), and
 * "lower", the newest layer of S's view, or the origin if S is the
 * oldest.  Only S's view tells them apart, so once S is gone either
 * direction gives every other view the same contents:
 *
 *   commit  copy upper's pages down into lower, then drop upper.
 *           Cost: the pages upper holds.
 *   stream  copy lower's pages that upper lacks up into upper, then drop
 *           lower (for the origin: the origin is never read again; with
 *           --output upper's data file gets its final name).
 *           Cost: the pages lower holds that upper lacks.
 *
 * auto picks the one that moves fewer bytes.  Committing into the
 * origin needs it writable.  A commit needs a quiet upper, so when upper
 * is the live top layer the job first starts a new empty top layer.
 *
 * Reverting to S starts a new empty top layer and, until the job is
 * done, reads the pages it lacks from S's view instead of the layers
 * below it ("revert_depth"): clients see S's contents at once.  The job
 * copies every page changed since S (held by a layer outside S's view)
 * into the new layer, then the override ends.  Blocks changed since S
 * are marked in the active dirty map before the revert takes effect.
 *
 * Every view reads the same at every moment: a page moves into a layer
 * that is only read where the other layer already gives the same bytes,
 * or under the page range lock where a client may write it.  Checkpoints
 * may be taken while a delete runs (new layers go on top, where the plan
 * does not look), but no snapshot while a revert runs (the revert owns
 * the newest layer), and the snapshot being deleted cannot be opened.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nbdkit-filter.h>

#include "cleanup.h"
#include "job.h"
#include "kind.h"
#include "origin.h"
#include "store.h"
#include "util.h"

/* ---- Views ---- */

static void
row_live_view (struct view *v, struct view *below)
{
  size_t n = store.nlayers;

  /* While a revert runs, the live view is the newest layer over the
   * reverted-to snapshot's view.
   */
  if (n > 0 && store.revert_depth >= 0) {
    view_of_layers (below, 0, store.revert_depth, false);
    *v = (struct view) { .top = &store.layers[n - 1]->map,
                         .top_src = n - 1, .below = below };
    return;
  }
  view_of_layers (v, 0, n, false);
}

static void
row_snapshot_view (size_t ci, struct view *v)
{
  view_of_layers (v, 0, store_snapshot_depth (&store.m.ckpts[ci]), false);
}

void
row_below_view (struct view *v)
{
  view_of_layers (v, 0, store.revert_depth >= 0
                  ? (size_t) store.revert_depth : store.nlayers - 1, false);
}

/* ---- Writes to the live volume ---- */

/* Whether the pages of [offset, offset+count) that the newest layer
 * lacks fit in the store (snapshot-max-size).  Return 0, or -1 with
 * *err set.
 */
static int
row_room (uint32_t count, uint64_t offset, int *err)
{
  const struct sbitmap *top;
  uint64_t first, n;

  if (max_size_param == 0 || store.nlayers == 0)
    return 0;
  top = &store.layers[store.nlayers - 1]->map;
  first = offset >> PAGE_SHIFT;
  n = ((offset + count - 1) >> PAGE_SHIFT) - first + 1;
  /* A row store cannot make room: the result is 0 or -1. */
  return store_room (n - sbitmap_count_range (top, first, n), err);
}

static int
row_pwrite (nbdkit_next *next, const void *buf, uint32_t count,
            uint64_t offset, uint32_t flags, int *err)
{
  if (row_room (count, offset, err) == -1 ||
      ckpt_mark_write (count, offset, err) == -1)
    return -1;
  if (store.nlayers == 0)
    return origin_client_pwrite (next, buf, count, offset, flags, err);
  return top_pwrite (next, buf, count, offset, flags, err);
}

static int
row_zero (nbdkit_next *next, uint32_t count, uint64_t offset,
          uint32_t flags, int *err)
{
  /* Layers zero by punching holes, which is fast; the plugin may not. */
  if (store.nlayers == 0 && (flags & NBDKIT_FLAG_FAST_ZERO) &&
      !next->can_fast_zero (next)) {
    *err = ENOTSUP;
    return -1;
  }
  if (row_room (count, offset, err) == -1 ||
      ckpt_mark_write (count, offset, err) == -1)
    return -1;
  if (store.nlayers == 0)
    return origin_client_zero (next, count, offset, flags, err);
  return top_zero (next, count, offset, flags, err);
}

static int
row_trim (nbdkit_next *next, uint32_t count, uint64_t offset,
          uint32_t flags, int *err)
{
  if (ckpt_mark_write (count, offset, err) == -1)
    return -1;
  if (store.nlayers == 0)
    return origin_client_trim (next, count, offset, flags, err);
  return top_trim (count, offset, flags, err);
}

static int
row_flush (nbdkit_next *next, uint32_t flags, int *err)
{
  if (store.nlayers == 0)
    return origin_client_flush (next, flags, err);
  if (layer_flush (store.layers[store.nlayers - 1]) == -1) {
    *err = errno;
    nbdkit_error ("flush: %m");
    return -1;
  }
  return 0;
}

static int
row_can_write (nbdkit_next *next)
{
  if (store.nlayers > 0)
    return 1;
  return next->can_write (next);
}

static int
row_can_multi_conn (nbdkit_next *next)
{
  /* A layer flush syncs the one shared layer; before the first
   * snapshot, flushes go to the plugin, so follow it.
   */
  if (store.nlayers > 0)
    return 1;
  return next->can_multi_conn (next);
}

static bool
row_active_is_layered (void)
{
  const struct manifest_checkpoint *c;

  if (store.m.nckpts == 0 || store.nlayers == 0)
    return false;
  c = &store.m.ckpts[store.m.nckpts - 1];
  return c->kind == CKPT_SNAPSHOT &&
    store.layers[store.nlayers - 1]->id >= c->layer;
}

static int
row_flush_live (int (*flush_origin) (void))
{
  if (store.nlayers == 0)
    return flush_origin ();
  return layer_flush (store.layers[store.nlayers - 1]);
}

/* ---- Planning merges (store.lock held) ---- */

/* ---- Planning (store.lock held) ---- */

/* Index of the first layer not in snapshot c's view. */
static size_t
upper_index (const struct manifest_checkpoint *c)
{
  return store_snapshot_depth (c);
}


/* Pages a revert copies: those held by a layer outside the reverted-to
 * view (below the newest), each once, that the newest layer lacks.
 */
static uint64_t
revert_pages (void)
{
  const struct sbitmap *top = &store.layers[store.nlayers - 1]->map;
  uint64_t n = 0, p = 0;

  while (p < store.npages) {
    uint64_t s = store.npages, e;
    bool more;

    for (size_t i = store.revert_depth; i + 1 < store.nlayers; ++i)
      s = MIN (s, sbitmap_find_next_set (&store.layers[i]->map, p));
    if (s >= store.npages)
      break;
    /* The run goes on while any of the layers holds the page. */
    e = s;
    do {
      more = false;
      for (size_t i = store.revert_depth; i + 1 < store.nlayers; ++i)
        if (e < store.npages && sbitmap_test (&store.layers[i]->map, e)) {
          e = sbitmap_find_next_clear (&store.layers[i]->map, e);
          more = true;
        }
    } while (more);
    n += (e - s) - sbitmap_count_range (top, s, e - s);
    p = e;
  }
  return n;
}

/* ---- Commit: upper's pages into lower (or the origin) ---- */

/* What a job copies, page by page (store.lock shared, pages locked). */
static bool
want_commit (struct job *j, uint64_t p)
{
  return sbitmap_test (&store.layers[j->upper]->map, p);
}

static uint64_t
commit_next (struct job *j, uint64_t p)
{
  return sbitmap_find_next_set (&store.layers[j->upper]->map, p);
}

static int
commit_copy (struct job *j, char *buf, uint64_t p, uint64_t q)
{
  const uint64_t off = run_off (p), len = run_len (p, q);

  if (full_pread (store.layers[j->upper]->data_fd, buf, len, off) == -1)
    return -1;
  if (j->lower >= 0)
    return layer_put (store.layers[j->lower], buf, p, q);
  return origin_pwrite (buf, len, off);
}

static struct layer *
commit_target (struct job *j)
{
  return j->lower >= 0 ? store.layers[j->lower] : NULL;
}

static void
commit_cannot_cancel (struct job *j, char **errmsg)
{
  set_errmsg (errmsg, "job %" PRIu64 " commits '%s' into the %s below, "
              "which cannot stop half way (the snapshot's view is "
              "already partly merged): wait for it", j->id, j->name,
              j->lower < 0 ? "origin" : "layer");
}

/* ---- Layers no snapshot separates ----
 *
 * Two neighbouring layers are told apart only by a snapshot bound to
 * the upper one (the layer it started).  A job that leaves the live top
 * layer with no snapshot bound to it above another layer would leave
 * layers that every view reads together, one more each time: a commit
 * of the newest snapshot starts a new top layer that outlives it, and a
 * revert starts one above the layers it makes unread.  So each ends
 * with one layer there, in the same manifest save.
 */

/* Whether a snapshot is bound to layer index i (reads the layers below
 * it and not i).
 */
static bool
layer_starts_snapshot (size_t i)
{
  for (size_t c = 0; c < store.m.nckpts; ++c)
    if (store.m.ckpts[c].kind == CKPT_SNAPSHOT &&
        store.m.ckpts[c].layer == store.layers[i]->id)
      return true;
  return false;
}

/* Drop layers [a, b) from the manifest, and bind the snapshots bound
 * to one of them to layer b instead (their views are unchanged: no
 * view reads those layers).
 */
static int
manifest_drop_layers (size_t a, size_t b)
{
  for (size_t i = a; i < b; ++i) {
    uint64_t id = store.layers[i]->id;

    manifest_remove_layer (&store.m, id);
    if (store_drop_id (id) == -1)
      return -1;
    for (size_t c = 0; c < store.m.nckpts; ++c)
      if (store.m.ckpts[c].kind == CKPT_SNAPSHOT &&
          store.m.ckpts[c].layer == id)
        store.m.ckpts[c].layer = store.layers[b]->id;
  }
  return 0;
}

/* After the commit of upper into lower (clients held): if the live top
 * layer is the one the job started above upper, no snapshot is bound to
 * it, so it would stay beside lower with nothing between them.  Copy
 * its pages (what clients wrote while the job ran) into lower too, and
 * set *absorb: the save that ends the job drops it with upper, and
 * lower becomes the live top layer.  Every view that can be opened and
 * reads lower reads the top layer above it, so the copy changes none.
 */
static int
commit_absorb_top (struct job *j, bool *absorb)
{
  const size_t top = store.nlayers - 1;
  static char buf[CHUNK_PAGES * PAGE_SIZE_BYTES];
  struct layer *t, *lo;

  *absorb = false;
  if (j->lower < 0 || top != j->upper + 1 || layer_starts_snapshot (top))
    return 0;
  t = store.layers[top];
  lo = store.layers[j->lower];
  for (uint64_t p = sbitmap_find_next_set (&t->map, 0); p < store.npages; ) {
    uint64_t q = MIN (sbitmap_find_next_clear (&t->map, p),
                      MIN (p + CHUNK_PAGES, store.npages));

    if (full_pread (t->data_fd, buf, run_len (p, q), run_off (p)) == -1 ||
        layer_put (lo, buf, p, q) == -1)
      return -1;
    p = sbitmap_find_next_set (&t->map, q);
  }
  if (layer_flush (lo) == -1)
    return -1;
  *absorb = true;
  return 0;
}

/* lower is the live top layer again: clients write it, so its map is
 * open for writing.
 */
static int
reopen_top_map (struct layer *l)
{
  CLEANUP_FREE char *path = layer_path (l->id, "map");

  if (l->map_fd >= 0)
    return 0;
  if (path == NULL || (l->map_fd = open (path, O_RDWR | O_CLOEXEC)) == -1)
    return -1;
  return 0;
}

/* ---- Stream: lower's pages (or the origin's) that upper lacks ---- */

static bool
want_stream (struct job *j, uint64_t p)
{
  if (sbitmap_test (&store.layers[j->upper]->map, p))
    return false;               /* upper has it (maybe a client wrote it) */
  return j->lower < 0 || sbitmap_test (&store.layers[j->lower]->map, p);
}

static uint64_t
stream_next (struct job *j, uint64_t p)
{
  if (j->lower >= 0)
    return sbitmap_find_next_set (&store.layers[j->lower]->map, p);
  return sbitmap_find_next_clear (&store.layers[j->upper]->map, p);
}

static int
stream_copy (struct job *j, char *buf, uint64_t p, uint64_t q)
{
  const uint64_t off = run_off (p), len = run_len (p, q);

  if (j->lower >= 0
      ? full_pread (store.layers[j->lower]->data_fd, buf, len, off)
      : origin_pread (buf, len, off))
    return -1;
  return layer_put (store.layers[j->upper], buf, p, q);
}

static struct layer *
stream_target (struct job *j)
{
  return store.layers[j->upper];
}

/* Give the file path a second name, output, durably: a hard link in
 * output's directory (already there after a crash: fine).
 */
static int
link_output (const char *path, const char *output)
{
  struct stat st1, st2;

  if (link (path, output) == -1) {
    if (errno != EEXIST || stat (path, &st1) == -1 ||
        stat (output, &st2) == -1 || st1.st_ino != st2.st_ino ||
        st1.st_dev != st2.st_dev)
      return -1;
  }
  {
    CLEANUP_FREE char *odir = strdup (output);
    char *slash = odir ? strrchr (odir, '/') : NULL;
    if (slash == NULL)
      return -1;                /* output is absolute (control.c) */
    slash[slash == odir ? 1 : 0] = '\0';
    return fsync_dir (odir);
  }
}

/* Give upper's data file its final name, atomically: hard link it as
 * output, then replace the store's name with a symlink to it.  Done
 * again after a crash, it finds the link in place.
 */
static int
give_output_name (struct layer *l, const char *output)
{
  CLEANUP_FREE char *data = layer_path (l->id, "data");
  CLEANUP_FREE char *tmp = NULL;
  CLEANUP_FREE char *target = NULL;

  if (data == NULL || asprintf (&tmp, "%s.link", data) == -1)
    return -1;
  target = realpath (data, NULL);
  if (target && strcmp (target, output) == 0)
    return 0;                   /* Already done. */
  /* The new name must be durable before the store's name points at
   * it.
   */
  if (link_output (data, output) == -1)
    return -1;
  unlink (tmp);
  if (symlink (output, tmp) == -1 || rename (tmp, data) == -1 ||
      fsync_dir (store.dir) == -1)
    return -1;
  return 0;
}

/* The end of a commit or a stream (store.lock exclusive). */
static int
finish_delete (struct job *j, char **errmsg)
{
  ssize_t ci = manifest_find_checkpoint (&store.m, j->name);
  struct manifest saved;
  ssize_t drop = -1;
  bool absorb = false;

  assert (ci >= 0);
  if (manifest_dup (&store.m, &saved) == -1) {
    set_errmsg (errmsg, "finishing the delete of '%s': %s",
                j->name, strerror (errno));
    return -1;
  }

  if (j->strategy == STRATEGY_COMMIT) {
    /* Upper's pages are all in lower now. */
    if (commit_absorb_top (j, &absorb) == -1)
      goto err;
    manifest_remove_layer (&store.m, store.layers[j->upper]->id);
    if (store_drop_id (store.layers[j->upper]->id) == -1)
      goto err;
    if (absorb) {
      uint64_t top_id = store.layers[j->upper + 1]->id;
      manifest_remove_layer (&store.m, top_id);
      if (store_drop_id (top_id) == -1)
        goto err;
    }
    drop = j->upper;
  }
  else {
    uint64_t up_id = store.layers[j->upper]->id;
    if (j->lower >= 0) {
      uint64_t lo_id = store.layers[j->lower]->id;
      manifest_remove_layer (&store.m, lo_id);
      if (store_drop_id (lo_id) == -1)
        goto err;
      drop = j->lower;
      /* A snapshot bound to lower keeps its view bound to upper. */
      for (size_t i = 0; i < store.m.nckpts; ++i)
        if (store.m.ckpts[i].kind == CKPT_SNAPSHOT &&
            store.m.ckpts[i].layer == lo_id)
          store.m.ckpts[i].layer = up_id;
    }
    else {
      store.m.origin_retired = true;
      store.m.has_sample = store.m.has_origin_file = false;
      if (j->output[0] &&
          give_output_name (store.layers[j->upper], j->output) == -1)
        goto err;
    }
  }
  /* A commit into the origin that leaves a layer freezes it again (the
   * job has synced it); with --output, the origin's file (now the
   * merged image) gets that name too.
   */
  if (j->strategy == STRATEGY_COMMIT && j->lower < 0) {
    if (store.m.nlayers > 0 && origin_freeze () == -1)
      goto err;
    if (j->output[0] &&
        (origin_file () == NULL ||
         link_output (origin_file (), j->output) == -1))
      goto err;
  }
  if (job_end_delete (j, ci, drop, &saved, errmsg) == -1)
    return -1;
  if (absorb) {
    /* The absorbed top layer is now where upper was. */
    job_drop_layer (j->upper);
    if (reopen_top_map (store.layers[store.nlayers - 1]) == -1)
      nbdkit_error ("snapshot: layer %" PRIu64 ": opening its map to take "
                    "writes: %m", store.layers[store.nlayers - 1]->id);
  }
  return 0;

 err:
  return job_undo_end (j, &saved, errmsg);
}

static const struct job_ops commit_ops = {
  .what = "commit",
  .next_candidate = commit_next,
  .want = want_commit,
  .copy_run = commit_copy,
  .target = commit_target,
  .finish = finish_delete,
  .cannot_cancel = commit_cannot_cancel,
};

static const struct job_ops stream_ops = {
  .what = "stream",
  .next_candidate = stream_next,
  .want = want_stream,
  .copy_run = stream_copy,
  .target = stream_target,
  .finish = finish_delete,
};

/* ---- Revert: the pages changed since S, from S's view ---- */

static bool
want_revert (struct job *j, uint64_t p)
{
  if (sbitmap_test (&store.layers[store.nlayers - 1]->map, p))
    return false;
  /* Changed since the snapshot: held by a layer outside its view. */
  for (size_t i = store.revert_depth; i < store.nlayers - 1; ++i)
    if (sbitmap_test (&store.layers[i]->map, p))
      return true;
  return false;
}

static uint64_t
revert_next (struct job *j, uint64_t p)
{
  uint64_t n = store.npages;

  for (size_t i = store.revert_depth; i < store.nlayers - 1; ++i)
    n = MIN (n, sbitmap_find_next_set (&store.layers[i]->map, p));
  return n;
}

static int
revert_copy (struct job *j, char *buf, uint64_t p, uint64_t q)
{
  const uint64_t off = run_off (p), len = run_len (p, q);
  struct view v;
  int err = 0, r;

  view_of_layers (&v, 0, store.revert_depth, false);
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&bg_lock);
    r = view_pread (bg_next, &v, buf, len, off, &err);
  }
  if (r == -1) {
    errno = err;
    return -1;
  }
  return layer_put (store.layers[store.nlayers - 1], buf, p, q);
}

static struct layer *
revert_target (struct job *j)
{
  return store.layers[store.nlayers - 1];
}

static void
revert_cannot_cancel (struct job *j, char **errmsg)
{
  set_errmsg (errmsg, "job %" PRIu64 " is a revert, which cannot stop "
              "half way (clients already see the reverted volume)", j->id);
}

/* The end of a revert (clients held).  The new top layer now holds
 * every page a layer outside the snapshot's view holds; those layers
 * that no snapshot's view reads either (above every layer a snapshot
 * is bound to) are read by nothing: they go in the save that ends the
 * job.
 */
static int
finish_revert (struct job *j, char **errmsg)
{
  const size_t top = store.nlayers - 1;
  size_t a = store.revert_depth;
  struct manifest saved;

  for (size_t c = 0; c < store.m.nckpts; ++c)
    if (store.m.ckpts[c].kind == CKPT_SNAPSHOT)
      a = MAX (a, store_snapshot_depth (&store.m.ckpts[c]));
  if (manifest_dup (&store.m, &saved) == -1)
    goto err;
  store.m.job.kind = JOB_NONE;
  if ((a < top && manifest_drop_layers (a, top) == -1) ||
      store_save () == -1) {
    store_restore (&saved);
    goto err;
  }
  manifest_free (&saved);
  store.revert_depth = -1;
  for (size_t i = a; i < top; ++i)
    job_drop_layer (a);
  return 0;

 err:
  set_errmsg (errmsg, "finishing the revert to '%s': %s",
              j->name, strerror (errno));
  return -1;
}

static const struct job_ops revert_ops = {
  .what = "revert",
  .next_candidate = revert_next,
  .want = want_revert,
  .copy_run = revert_copy,
  .target = revert_target,
  .finish = finish_revert,
  .cannot_cancel = revert_cannot_cancel,
};

/* ---- Starting and planning jobs (store.lock exclusive) ---- */

/* Whether --output=output can name what a merge leaves: a hard link
 * to path, which must then be on output's file system.  If not, set
 * *errmsg (what names the thing) and return false.
 */
static bool
output_can_name (const char *output, const char *path, const char *what,
                 char **errmsg)
{
  CLEANUP_FREE char *dir = strdup (output);
  char *slash = dir ? strrchr (dir, '/') : NULL;
  struct stat st, pst;

  if (slash == NULL)
    return false;
  slash[slash == dir ? 1 : 0] = '\0';
  if (stat (dir, &st) == -1 || stat (path, &pst) == -1) {
    set_errmsg (errmsg, "--output=%s: %s", output, strerror (errno));
    return false;
  }
  if (st.st_dev != pst.st_dev) {
    set_errmsg (errmsg, "--output=%s: %s is on another file system than "
                "%s (%s): the merged image gets its name by a hard link, "
                "which needs the same file system", output, dir, what,
                path);
    return false;
  }
  return true;
}

static int
row_prepare_delete (struct job *j, size_t ci, int strategy,
                    const char *output, bool origin_writable, bool *push,
                    char **errmsg)
{
  const char *name = store.m.ckpts[ci].name;
  const size_t up = upper_index (&store.m.ckpts[ci]);
  const ssize_t lo = (ssize_t) up - 1;
  const bool is_auto = strategy < 0;
  CLEANUP_FREE char *why_commit = NULL, *why_stream = NULL;
  bool can_commit = lo >= 0 || origin_writable;
  bool can_stream = true;

  j->commit_bytes = pages_bytes (sbitmap_count (&store.layers[up]->map));
  j->stream_bytes = pages_bytes (pages_missing (lo, up));

  /* --output names the merged image, the volume as it is: the origin
   * after a commit into it (a hard link to its file), the oldest layer
   * after a stream of the origin into it.  So only when the oldest
   * snapshot is merged with the origin, and only where the name can be
   * given.
   */
  if (output) {
    if (lo >= 0) {
      set_errmsg (errmsg, "--output applies only to the oldest snapshot "
                  "(merged with the origin into one image), not to '%s'",
                  name);
      return -1;
    }
    if (!origin_writable)
      set_errmsg (&why_commit, "cannot commit '%s' into the origin: the "
                  "origin is read-only (nbdkit -r, or a read-only plugin)",
                  name);
    else if (origin_file () == NULL)
      set_errmsg (&why_commit, "--output=%s after a commit would name the "
                  "origin's file, and the filter does not know it (only the "
                  "file plugin's file=PATH tells it)", output);
    else {
      char *e = NULL;
      if (!output_can_name (output, origin_file (), "the origin", &e))
        why_commit = e;
    }
    {
      CLEANUP_FREE char *data = layer_path (store.layers[up]->id, "data");
      char *e = NULL;
      if (data == NULL || !output_can_name (output, data, "the store", &e))
        why_stream = e ? e : strdup ("out of memory");
    }
    can_commit = why_commit == NULL;
    can_stream = why_stream == NULL;
    if (!can_commit && !can_stream) {
      set_errmsg (errmsg, "%s; and %s", why_commit, why_stream);
      return -1;
    }
  }

  /* auto: the fewer bytes, and a commit on a tie: it writes into space
   * already allocated and frees the upper layer (deleted after the job
   * ends, outside every lock), while a stream allocates new space in
   * the sparse upper layer, which bench/merge measured slower per
   * byte.  A direction that cannot run (a read-only origin, an output
   * name it cannot give) leaves the other.
   */
  if (is_auto) {
    strategy = j->stream_bytes < j->commit_bytes
      ? STRATEGY_STREAM : STRATEGY_COMMIT;
    if (strategy == STRATEGY_COMMIT && lo < 0 && !can_commit)
      strategy = STRATEGY_STREAM;
    else if (strategy == STRATEGY_STREAM && !can_stream)
      strategy = STRATEGY_COMMIT;
  }
  if (strategy == STRATEGY_COMMIT && lo < 0 && !origin_writable) {
    set_errmsg (errmsg, "cannot commit '%s' into the origin: the origin "
                "is read-only (nbdkit -r, or a read-only plugin); use "
                "--strategy=stream", name);
    return -1;
  }
  if (output && strategy == STRATEGY_COMMIT && !can_commit) {
    set_errmsg (errmsg, "%s", why_commit);
    return -1;
  }
  if (output && strategy == STRATEGY_STREAM && !can_stream) {
    set_errmsg (errmsg, "%s", why_stream);
    return -1;
  }
  j->strategy = strategy;
  if (output)
    strcpy (j->output, output);
  /* A commit into the origin writes it: its sample goes first, in the
   * manifest that starts the job.
   */
  if (strategy == STRATEGY_COMMIT && lo < 0)
    origin_thaw ();
  /* A commit needs upper quiet: if clients write it, start a new top. */
  *push = strategy == STRATEGY_COMMIT && up == store.nlayers - 1;
  return 0;
}

static int
row_prepare_revert (struct job *j, size_t ci, bool *push, char **errmsg)
{
  const size_t d = upper_index (&store.m.ckpts[ci]);

  /* The live volume's blocks that change are those changed since S:
   * record them first, durably (guarantee 3).
   */
  for (size_t i = d; i < store.nlayers; ++i) {
    const struct sbitmap *map = &store.layers[i]->map;
    uint64_t p = sbitmap_find_next_set (map, 0);
    while (p < store.npages) {
      uint64_t e = sbitmap_find_next_clear (map, p);
      if (ckpt_mark_range (p << PAGE_SHIFT,
                           MIN (e << PAGE_SHIFT, store.size)
                           - (p << PAGE_SHIFT)) == -1)
        goto err;
      p = sbitmap_find_next_set (map, e);
    }
  }
  if (ckpt_persist_active () == -1)
    goto err;
  /* The new top layer takes the reverted pages; until the job ends,
   * pages it lacks come from the snapshot's view (row_plan).
   */
  *push = true;
  return 0;

 err:
  set_errmsg (errmsg, "cannot start reverting to '%s': %s", j->name,
              strerror (errno));
  return -1;
}

static int
row_plan (struct job *j, char **errmsg)
{
  ssize_t ci = manifest_find_checkpoint (&store.m, j->name);

  if (ci < 0 || store.m.ckpts[ci].kind != CKPT_SNAPSHOT) {
    set_errmsg (errmsg, "'%s' is not a snapshot", j->name);
    return -1;
  }
  if (j->kind == JOB_REVERT) {
    store.revert_depth = upper_index (&store.m.ckpts[ci]);
    j->ops = &revert_ops;
    j->bytes_total = pages_bytes (revert_pages ());
    return 0;
  }
  j->upper = upper_index (&store.m.ckpts[ci]);
  if (j->upper >= store.nlayers) {
    set_errmsg (errmsg, "'%s' has no layer after it", j->name);
    return -1;
  }
  j->lower = (ssize_t) j->upper - 1;
  j->ops = j->strategy == STRATEGY_COMMIT ? &commit_ops : &stream_ops;
  /* The costs as they are now (after a restart: what is left). */
  j->commit_bytes = pages_bytes (sbitmap_count (&store.layers[j->upper]->map));
  j->stream_bytes = pages_bytes (pages_missing (j->lower, j->upper));
  j->bytes_total = j->strategy == STRATEGY_COMMIT
    ? j->commit_bytes : j->stream_bytes;
  return 0;
}

const struct kind row_kind = {
  .name = "row",
  .mode = MODE_ROW,
  .live_view = row_live_view,
  .snapshot_view = row_snapshot_view,
  .pwrite = row_pwrite,
  .zero = row_zero,
  .trim = row_trim,
  .flush = row_flush,
  .can_write = row_can_write,
  .can_multi_conn = row_can_multi_conn,
  .active_is_layered = row_active_is_layered,
  .flush_live = row_flush_live,
  .snapshots_freeze_origin = true,
  .prepare_delete = row_prepare_delete,
  .prepare_revert = row_prepare_revert,
  .plan = row_plan,
};
