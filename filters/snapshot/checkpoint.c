/* nbdkit-snapshot: checkpoints and their dirty maps.
 *
 * Every checkpoint (a snapshot, or a bitmap-only checkpoint) owns a
 * dirty map: one bit per block, set for every block written from the
 * moment it was taken until the next checkpoint was taken.  Only the
 * newest map, the "active" one, ever gains bits.  The blocks changed
 * since checkpoint C are the union of the maps of C and of every newer
 * checkpoint; between checkpoints FROM and TO, the union of FROM's map
 * up to (not including) TO's.
 *
 * Never missing a changed block (guarantee 3):
 *
 * - A write first sets its blocks' bits in the active map, in memory.
 * - When the newest checkpoint is bitmap-only, or the write goes to the
 *   origin in place (no snapshot), nothing else will record the change
 *   (the newest layer may already hold the page and overwrite it in
 *   place), so before the write is issued its bits are stored into the
 *   shared mapping of the active map's file (page cache: they survive
 *   kill -9), and its region's write-intent bit is made durable
 *   (intent.c; one fdatasync per region, shared by concurrent writers),
 *   which covers a power loss.  A write to a block already marked
 *   checks both cheaply and pays nothing more.  A sequential writer
 *   gets a window of blocks marked ahead of it (ckpt_mark).
 * - When the newest checkpoint is a snapshot, every write since it went
 *   into a layer it started (or a newer one), and those layers' page
 *   maps say exactly which pages they hold: the layer map itself is
 *   the durable record.  The bits are set in memory only, and
 *   layer_flush writes them before the layer map that makes the pages
 *   visible; as a second line, ckpt_recover_active ORs those layers'
 *   pages back into the map at start-up.  This keeps writes after a
 *   snapshot free of bitmap syncs.
 * - layer_flush also persists the active map before it writes the
 *   layer map (a no-op when nothing is pending), so no layer map on
 *   disk is ever ahead of the dirty maps.
 * - Taking a checkpoint persists the active map before the manifest
 *   names the new one, and deleting a checkpoint folds its bits into
 *   the next older map (durably) before the manifest forgets it: a
 *   crash in between leaves extra bits, never missing ones.
 *
 * Locking: the maps array changes only with store.lock held
 * exclusively; everything else runs with it shared.  The bitmaps are
 * lock-free; each map's group-commit state has its own mutex.
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
#include <endian.h>
#include <sys/mman.h>

#include <nbdkit-filter.h>

#include "cleanup.h"
#include "mapfile.h"
#include "store.h"
#include "util.h"

/* Bounds of the window marked ahead of a sequential writer (blocks). */
#define MARK_AHEAD_MIN UINT64_C (16)
#define MARK_AHEAD_MAX UINT64_C (256)

char *
ckpt_map_path (uint64_t id)
{
  char *path;

  if (asprintf (&path, "%s/dirty-%" PRIu64 ".map", store.dir, id) == -1)
    return NULL;
  return path;
}

static struct ckpt_map *
ckpt_map_alloc (uint64_t id)
{
  struct ckpt_map *d = calloc (1, sizeof *d);

  if (d == NULL) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  d->id = id;
  d->fd = -1;
  pthread_mutex_init (&d->lock, NULL);
  pthread_cond_init (&d->cond, NULL);
  return d;
}

/* OR bits (host order) into word *to of a shared map file mapping,
 * skipping the atomic write when they are all there already.
 */
static inline void
mm_or (uint64_t *to, uint64_t bits)
{
  if ((le64toh (__atomic_load_n (to, __ATOMIC_RELAXED)) & bits) != bits)
    __atomic_fetch_or (to, htole64 (bits), __ATOMIC_SEQ_CST);
}

/* Map the bitmap pages of the active map's file shared, so that a
 * newly set bit reaches the page cache (and survives the process) with
 * a store instead of a system call (ckpt_mark).  The pages are
 * allocated first, so a store never faults on a full disk.  Without
 * fallocate (EOPNOTSUPP), or without room for the map, bits go through
 * pwrite instead.
 */
static int
ckpt_map_mmap (struct ckpt_map *d)
{
  const size_t len = d->bm.npages * (size_t) SBITMAP_PAGE_BYTES;
  void *p;

  if (len == 0)
    return 0;
  if (fallocate (d->fd, 0, MAPFILE_HEADER_SIZE, len) == -1) {
    /* No fallocate here, or no room for the map (a full disk): go on
     * without the mapping; a write whose bits cannot be written then
     * fails with the error, as any write to a full store does.
     */
    if (errno == EOPNOTSUPP || errno == ENOSPC) {
      nbdkit_debug ("dirty-%" PRIu64 ".map: not mapped: fallocate: %m",
                    d->id);
      return 0;
    }
    nbdkit_error ("dirty-%" PRIu64 ".map: allocating %zu bytes: %m",
                  d->id, len);
    return -1;
  }
  p = mmap (NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, d->fd,
            MAPFILE_HEADER_SIZE);
  if (p == MAP_FAILED) {
    nbdkit_error ("dirty-%" PRIu64 ".map: mmap: %m", d->id);
    return -1;
  }
  d->mm = p;
  d->mm_len = len;
  return 0;
}

void
ckpt_map_close_file (struct ckpt_map *d)
{
  if (d->mm)
    munmap (d->mm, d->mm_len);
  d->mm = NULL;
  d->mm_len = 0;
  if (d->fd >= 0)
    close (d->fd);
  d->fd = -1;
}

/* Set (or with seal NULL clear) the seal of d's file. */
static int
seal_file (struct ckpt_map *d, const struct mapfile_seal *seal)
{
  CLEANUP_FREE char *path = ckpt_map_path (d->id);

  if (path == NULL)
    return -1;
  return mapfile_set_seal_path (d->fd, path, seal);
}

int
ckpt_map_unseal (struct ckpt_map *d)
{
  if (!d->sealed)
    return 0;
  if (seal_file (d, NULL) == -1)
    return -1;
  d->sealed = false;
  return 0;
}

int
ckpt_map_seal (struct ckpt_map *d)
{
  struct mapfile_seal seal = { .nset = 0 };

  if (d->sealed)
    return 0;
  /* The seal describes the bits in memory: the file must have them all.
   * A frozen map may lack some: a fold into it (deleting a checkpoint)
   * that failed to write them left them set in memory only.
   */
  if (ckpt_map_write_all (d) == -1)
    return -1;
  mapfile_seal_compute (&d->bm, &seal);
  if (seal_file (d, &seal) == -1)
    return -1;
  d->sealed = true;
  return 0;
}

void
ckpt_map_free (struct ckpt_map *d)
{
  if (d == NULL)
    return;
  ckpt_map_close_file (d);
  sbitmap_free (&d->bm);
  pthread_cond_destroy (&d->cond);
  pthread_mutex_destroy (&d->lock);
  free (d);
}

struct ckpt_map *
ckpt_map_open (uint64_t id, bool active)
{
  CLEANUP_FREE char *path = ckpt_map_path (id);
  struct ckpt_map *d = ckpt_map_alloc (id);
  struct mapfile_seal seal;

  if (d == NULL || path == NULL)
    goto err;
  d->fd = mapfile_open_sealed (path, MAPFILE_KIND_DIRTY, store.block_size,
                               store.nblocks, active, &d->bm, &d->sealed,
                               &seal);
  if (d->fd == -1)
    goto err;
  /* The active map takes bits from now on. */
  if (active && ckpt_map_unseal (d) == -1) {
    nbdkit_error ("%s: clearing the seal: %m", path);
    goto err;
  }
  if (!active) {
    close (d->fd);
    d->fd = -1;
  }
  else if (ckpt_map_mmap (d) == -1)
    goto err;
  return d;

 err:
  ckpt_map_free (d);
  return NULL;
}

struct ckpt_map *
ckpt_map_create (uint64_t id)
{
  CLEANUP_FREE char *path = ckpt_map_path (id);
  struct ckpt_map *d = ckpt_map_alloc (id);

  if (d == NULL || path == NULL)
    goto err;
  d->fd = mapfile_create (path, MAPFILE_KIND_DIRTY, store.block_size,
                          store.nblocks);
  if (d->fd == -1)
    goto err;
  if (sbitmap_init (&d->bm, store.nblocks) == -1) {
    nbdkit_error ("sbitmap_init: %m");
    store_remove_path (path);
    goto err;
  }
  if (ckpt_map_mmap (d) == -1) {
    store_remove_path (path);
    goto err;
  }
  return d;

 err:
  ckpt_map_free (d);
  return NULL;
}

/* Write the dirty pages of d to its file; with sync, then fdatasync
 * it (also when earlier writes were left unsynced).
 */
static int
ckpt_map_write (struct ckpt_map *d, bool sync)
{
  struct mapfile_batch batch = { 0 };
  int r;

  /* After a failed sync no sync of a dirty map may succeed (store.h). */
  if (store_failed ()) {
    errno = EIO;
    return -1;
  }
  if (mapfile_collect (&d->bm, &batch) == -1)
    return -1;
  if (d->mm) {
    /* Bits only ever get set in a map file, and a writer may be
     * storing newer bits into the same words (ckpt_mark): OR them in.
     */
    uint64_t words[SBITMAP_PAGE_WORDS];

    for (size_t i = 0; i < batch.n; ++i) {
      uint64_t *to = &d->mm[batch.index[i] * SBITMAP_PAGE_WORDS];

      mapfile_batch_page (&batch, i, words);
      for (size_t w = 0; w < SBITMAP_PAGE_WORDS; ++w)
        if (words[w])
          mm_or (&to[w], words[w]);
    }
    r = 0;
  }
  else
    r = mapfile_write_pages (d->fd, &batch);
  if (r == 0 && sync && (batch.n > 0 || d->unsynced) &&
      (r = fdatasync (d->fd)) == -1)
    store_fail ("dirty-%" PRIu64 ".map: fdatasync", d->id);
  if (r == -1) {
    int e = errno;
    mapfile_batch_restore (&d->bm, &batch);
    errno = e;
  }
  else if (!sync && batch.n > 0)
    d->unsynced = true;
  else if (sync)
    d->unsynced = false;
  mapfile_batch_free (&batch);
  return r;
}

int
ckpt_map_persist (struct ckpt_map *d, bool sync)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&d->lock);
  /* Every bit set before this point is covered by a write (and, with
   * sync, a sync) that starts after it.  Writes are serialised (busy),
   * so one round writes every request made before it started.
   */
  const uint64_t mine = ++d->seq;

  if (sync)
    d->sync_req = mine;
  while (sync ? d->synced < mine : d->written < mine) {
    if (!d->busy) {
      const uint64_t target = d->seq;
      const bool do_sync = d->sync_req > d->synced;
      int r;

      d->busy = true;
      pthread_mutex_unlock (&d->lock);
      r = ckpt_map_write (d, do_sync);
      pthread_mutex_lock (&d->lock);
      d->busy = false;
      pthread_cond_broadcast (&d->cond);
      if (r == -1)
        return -1;
      d->written = target;
      if (do_sync)
        d->synced = target;
    }
    else
      pthread_cond_wait (&d->cond, &d->lock);
  }
  return 0;
}

int
ckpt_map_write_all (struct ckpt_map *d)
{
  CLEANUP_FREE char *path = NULL;
  int r, e;

  if (d->fd >= 0)
    return ckpt_map_persist (d, true);
  /* Frozen: the file is opened for the write. */
  path = ckpt_map_path (d->id);
  if (path == NULL || (d->fd = open (path, O_RDWR | O_CLOEXEC)) == -1)
    return -1;
  r = ckpt_map_write (d, true);
  e = errno;
  close (d->fd);
  d->fd = -1;
  errno = e;
  return r;
}

int
ckpt_persist_active (void)
{
  if (store.m.nckpts == 0)
    return 0;
  return ckpt_map_persist (store.maps[store.m.nckpts - 1], true);
}

/* Set bits [first, last] in the shared mapping of d's file. */
static void
ckpt_map_store_bits (struct ckpt_map *d, uint64_t first, uint64_t last)
{
  for (uint64_t w = first / 64; w <= last / 64; ++w) {
    unsigned lo = w == first / 64 ? first % 64 : 0;
    unsigned hi = w == last / 64 ? last % 64 + 1 : 64;
    mm_or (&d->mm[w], sbitmap_word_mask (lo, hi));
  }
}

/* Where a sequential writer's next newly dirtied block would start
 * (atomic; a hint, so races only cost a missed or extra window).
 */
static uint64_t seq_next = UINT64_MAX;

/* A sequential writer (this write, blocks [first, last], starts where
 * the last newly dirtied range, or the window marked ahead of it,
 * ended) will dirty the next blocks soon: mark a window ahead now, so
 * it pays for one window rather than one request at a time.  Marking
 * a block that then does not change is allowed (a backup reads it for
 * nothing); missing one never is.  Random writes do not match, so
 * they get no extra marks.  The window is at most MARK_AHEAD_MAX
 * blocks.  Set *next past the blocks marked.  Return 0, or -1.
 */
static int
mark_ahead (struct ckpt_map *d, uint64_t first, uint64_t last,
            uint64_t *next)
{
  const uint64_t expected = __atomic_load_n (&seq_next, __ATOMIC_RELAXED);

  *next = last + 1;
  if ((first == expected || first + 1 == expected) &&
      last + 1 < store.nblocks) {
    uint64_t n = last - first + 1;
    uint64_t ahead = MIN (MAX (MARK_AHEAD_MIN, 4 * n), MARK_AHEAD_MAX);
    ahead = MIN (ahead, store.nblocks - last - 1);
    if (sbitmap_set_range (&d->bm, last + 1, ahead) == -1)
      return -1;
    *next += ahead;
  }
  __atomic_store_n (&seq_next, *next, __ATOMIC_RELAXED);
  return 0;
}

int
ckpt_mark (uint64_t offset, uint64_t count, bool durable)
{
  struct ckpt_map *d;
  uint64_t first, last, next;
  int64_t added;

  if (store.m.nckpts == 0 || count == 0)
    return 0;
  d = store.maps[store.m.nckpts - 1];
  first = offset / store.block_size;
  last = (offset + count - 1) / store.block_size;
  added = sbitmap_set_range (&d->bm, first, last - first + 1);
  if (added == -1)
    return -1;
  next = last + 1;
  if (added > 0 && mark_ahead (d, first, last, &next) == -1)
    return -1;
  if (!durable)
    return 0;
  /* The fine bits reach the page cache first, then the regions' intent
   * bits reach the disk (intent.c).  Bits already set in memory are
   * checked too (cheap when they are there): another writer may have
   * set them and not yet stored them or made their region durable.
   */
  if (d->mm)
    ckpt_map_store_bits (d, first, next - 1);
  else if (ckpt_map_persist (d, false) == -1)
    return -1;
  return intent_ensure (first, next - 1);
}

int
ckpt_mark_write (uint32_t count, uint64_t offset, int *err)
{
  if (ckpt_mark (offset, count, !store.kind->active_is_layered ()) == -1) {
    *err = errno;
    nbdkit_error ("recording changed blocks: %m");
    return -1;
  }
  return 0;
}

int
ckpt_recover_active (void)
{
  const struct manifest_checkpoint *c;

  if (!store.kind->active_is_layered ())
    return 0;
  c = &store.m.ckpts[store.m.nckpts - 1];
  for (size_t i = 0; i < store.nlayers; ++i) {
    const struct sbitmap *map = &store.layers[i]->map;
    uint64_t p;

    if (store.layers[i]->id < c->layer)
      continue;
    p = sbitmap_find_next_set (map, 0);
    while (p < store.npages) {
      uint64_t e = sbitmap_find_next_clear (map, p);
      if (ckpt_mark_range (p << PAGE_SHIFT,
                           MIN (e << PAGE_SHIFT, store.size)
                           - (p << PAGE_SHIFT)) == -1)
        return -1;
      p = sbitmap_find_next_set (map, e);
    }
  }
  return ckpt_persist_active ();
}

int
ckpt_mark_range (uint64_t offset, uint64_t count)
{
  uint64_t first, last;

  if (store.m.nckpts == 0 || count == 0)
    return 0;
  first = offset / store.block_size;
  last = (offset + count - 1) / store.block_size;
  return sbitmap_set_range (&store.maps[store.m.nckpts - 1]->bm, first,
                            last - first + 1) == -1 ? -1 : 0;
}

/* ---- Queries ---- */

/* The map of checkpoint from + i, for sbitmap_union_run. */
static const struct sbitmap *
map_of (size_t i, void *from)
{
  return &store.maps[*(size_t *) from + i]->bm;
}

uint64_t
ckpt_run (size_t from, size_t to, uint64_t b, uint64_t limit, bool *changed)
{
  return sbitmap_union_run (to > from ? to - from : 0, map_of, &from, b,
                            limit, changed);
}

uint64_t
ckpt_count_changed (size_t from, size_t to)
{
  uint64_t b = 0, n = 0;

  if (from >= to)
    return 0;
  while (b < store.nblocks) {
    bool changed;
    uint64_t end = ckpt_run (from, to, b, store.nblocks, &changed);
    if (changed)
      n += end - b;
    b = end;
  }
  return n;
}

/* ---- Deleting a checkpoint ---- */

int
ckpt_fold (size_t i)
{
  struct ckpt_map *d = store.maps[i], *older;
  CLEANUP_FREE char *opath = NULL;
  uint64_t b;

  if (i == 0)
    return 0;                   /* Nothing older needs its bits. */
  older = store.maps[i - 1];
  opath = ckpt_map_path (older->id);
  if (opath == NULL || ckpt_map_unseal (older) == -1)
    return -1;
  b = sbitmap_find_next_set (&d->bm, 0);
  while (b < store.nblocks) {
    uint64_t e = sbitmap_find_next_clear (&d->bm, b);
    if (sbitmap_set_range (&older->bm, b, e - b) == -1)
      return -1;
    b = sbitmap_find_next_set (&d->bm, e);
  }
  if (older->fd == -1) {
    int r;
    older->fd = open (opath, O_RDWR | O_CLOEXEC);
    if (older->fd == -1)
      return -1;
    r = ckpt_map_write (older, true);
    /* It stays frozen unless it becomes the active map.  Then it is
     * mapped like any active map (without that, if allocating fails,
     * its bits go through pwrite instead).
     */
    if (i != store.m.nckpts - 1) {
      int e = errno;
      close (older->fd);
      older->fd = -1;
      errno = e;
    }
    else if (r == 0)
      ckpt_map_mmap (older);
    return r;
  }
  return ckpt_map_write (older, true);
}

void
ckpt_forget (size_t i, size_t nckpts)
{
  struct ckpt_map *d = store.maps[i];
  CLEANUP_FREE char *path = ckpt_map_path (d->id);

  memmove (&store.maps[i], &store.maps[i + 1],
           (nckpts - i - 1) * sizeof store.maps[0]);
  ckpt_map_free (d);
  if (path)
    store_remove_path (path);
}

int
ckpt_delete_bitmap (size_t i, char **errmsg)
{
  const size_t nckpts = store.m.nckpts;
  struct manifest_checkpoint saved = store.m.ckpts[i];

  assert (saved.kind == CKPT_BITMAP);
  /* Fold its bits into the next older map, durably, first: a crash
   * after this leaves extra bits, never missing ones.
   */
  if (ckpt_fold (i) == -1)
    goto err;
  manifest_remove_checkpoint (&store.m, i);
  if (store_drop_id (saved.map) == -1 || store_save () == -1) {
    int e = errno;
    memmove (&store.m.ckpts[i + 1], &store.m.ckpts[i],
             (store.m.nckpts - i) * sizeof store.m.ckpts[0]);
    store.m.ckpts[i] = saved;
    store.m.nckpts++;
    errno = e;
    goto err;
  }
  ckpt_forget (i, nckpts);
  return 0;

 err:
  set_errmsg (errmsg, "cannot delete checkpoint '%s': %s",
              saved.name, strerror (errno));
  return -1;
}
