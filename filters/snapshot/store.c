/* nbdkit-snapshot: the store, its layers and snapshots (see store.h). */
#include <config.h>

#include <assert.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <nbdkit-filter.h>

#include "cleanup.h"
#include "mapfile.h"
#include "store.h"
#include "util.h"

struct store store = { .lock_fd = -1 };

/* ---- Locking the store ---- */

int
store_lock (const char *dir)
{
  CLEANUP_FREE char *lockpath = NULL;
  pthread_rwlockattr_t attr;

  if (mkdir (dir, 0700) == -1 && errno != EEXIST) {
    nbdkit_error ("snapshot-store=%s: cannot create the store directory: %m",
                  dir);
    return -1;
  }
  store.dir = realpath (dir, NULL);
  if (store.dir == NULL) {
    nbdkit_error ("snapshot-store=%s: %m", dir);
    return -1;
  }
  if (asprintf (&lockpath, "%s/lock", store.dir) == -1) {
    nbdkit_error ("asprintf: %m");
    return -1;
  }
  store.lock_fd = open (lockpath, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (store.lock_fd == -1) {
    nbdkit_error ("snapshot-store=%s: %s: %m", dir, lockpath);
    return -1;
  }
  if (flock (store.lock_fd, LOCK_EX | LOCK_NB) == -1) {
    if (errno == EWOULDBLOCK)
      nbdkit_error ("snapshot-store=%s: the store is locked by another "
                    "process (is another nbdkit serving it?)", store.dir);
    else
      nbdkit_error ("snapshot-store=%s: flock: %m", store.dir);
    return -1;
  }

  pthread_rwlockattr_init (&attr);
  pthread_rwlockattr_setkind_np (&attr,
                                 PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  pthread_rwlock_init (&store.lock, &attr);
  pthread_rwlockattr_destroy (&attr);
  rangelock_init (&store.pages);
  pthread_mutex_init (&store.control_lock, NULL);
  pthread_mutex_init (&store.job_lock, NULL);
  pthread_cond_init (&store.job_cond, NULL);
  store.revert_depth = -1;
  return 0;
}

/* ---- Layers ---- */

char *
layer_path (uint64_t id, const char *ext)
{
  char *path;

  if (asprintf (&path, "%s/layer-%" PRIu64 ".%s", store.dir, id, ext) == -1)
    return NULL;
  return path;
}

void
layer_free (struct layer *l)
{
  if (l == NULL)
    return;
  if (l->data_fd >= 0)
    close (l->data_fd);
  if (l->map_fd >= 0)
    close (l->map_fd);
  sbitmap_free (&l->map);
  pthread_mutex_destroy (&l->flush_lock);
  sbitmap_free (&l->regions);
  free (l);
}

static struct layer *
layer_alloc (uint64_t id)
{
  struct layer *l = calloc (1, sizeof *l);

  if (l == NULL) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  l->id = id;
  l->data_fd = l->map_fd = -1;
  pthread_mutex_init (&l->flush_lock, NULL);
  if (sbitmap_init (&l->regions, (store.size + LAYER_REGION_BYTES - 1) /
                    LAYER_REGION_BYTES) == -1) {
    nbdkit_error ("sbitmap_init: %m");
    layer_free (l);
    return NULL;
  }
  return l;
}

/* Open existing layer id.  The newest layer keeps its map writable. */
static struct layer *
layer_open (uint64_t id, bool newest)
{
  CLEANUP_FREE char *data = layer_path (id, "data");
  CLEANUP_FREE char *map = layer_path (id, "map");
  struct layer *l = layer_alloc (id);
  struct stat st;

  if (l == NULL || data == NULL || map == NULL)
    goto err;
  l->data_fd = open (data, O_RDWR | O_CLOEXEC);
  if (l->data_fd == -1) {
    nbdkit_error ("%s: %m (the store is incomplete)", data);
    goto err;
  }
  if (fstat (l->data_fd, &st) == -1 || (uint64_t) st.st_size != store.size) {
    nbdkit_error ("%s: size %" PRIi64 " does not match the volume size %"
                  PRIu64 " (the store is damaged)",
                  data, (int64_t) st.st_size, store.size);
    goto err;
  }
  l->map_fd = mapfile_open (map, MAPFILE_KIND_LAYER, PAGE_SIZE_BYTES,
                            store.npages, newest, &l->map);
  if (l->map_fd == -1)
    goto err;
  if (!newest) {
    close (l->map_fd);
    l->map_fd = -1;
  }
  return l;

 err:
  layer_free (l);
  return NULL;
}

/* Create new empty layer id: O(1) whatever the volume size. */
struct layer *
layer_create (uint64_t id)
{
  CLEANUP_FREE char *data = layer_path (id, "data");
  CLEANUP_FREE char *map = layer_path (id, "map");
  struct layer *l = layer_alloc (id);

  if (l == NULL || data == NULL || map == NULL)
    goto err;
  /* A file left by a create that crashed before the manifest named it
   * holds nothing of value.
   */
  unlink (data);
  unlink (map);
  l->data_fd = open (data, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (l->data_fd == -1) {
    nbdkit_error ("%s: %m", data);
    goto err;
  }
  if (ftruncate (l->data_fd, store.size) == -1) {
    nbdkit_error ("%s: ftruncate: %m", data);
    goto err_unlink;
  }
  l->map_fd = mapfile_create (map, MAPFILE_KIND_LAYER, PAGE_SIZE_BYTES,
                              store.npages);
  if (l->map_fd == -1)
    goto err_unlink;
  if (sbitmap_init (&l->map, store.npages) == -1) {
    nbdkit_error ("sbitmap_init: %m");
    goto err_unlink;
  }
  if (fsync (l->data_fd) == -1 || fsync_dir (store.dir) == -1) {
    nbdkit_error ("%s: fsync: %m", data);
    goto err_unlink;
  }
  return l;

 err_unlink:
  unlink (data);
  unlink (map);
 err:
  layer_free (l);
  return NULL;
}

int
layer_flush (struct layer *l)
{
  return layer_flush_fd (l, l->data_fd);
}

int
layer_flush_fd (struct layer *l, int fd)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&l->flush_lock);
  struct mapfile_batch batch = { 0 };
  const bool own = fd == l->data_fd;
  unsigned data_dirty;
  int r = -1;

  /* Order matters: clear the data flag and take the map pages first,
   * then sync the data they describe, then write the map pages.  The
   * flag is l->data_fd's own: another descriptor's sync leaves it set,
   * so that the next flush through l->data_fd still syncs and reports
   * a failed write-back to its caller.
   */
  data_dirty = own
    ? __atomic_exchange_n (&l->data_dirty, 0, __ATOMIC_SEQ_CST)
    : __atomic_load_n (&l->data_dirty, __ATOMIC_SEQ_CST);
  if (mapfile_collect (&l->map, &batch) == -1)
    goto out;
  /* The dirty bits of the writes behind these pages were set before
   * the pages: make them durable before the layer claims the data.
   */
  if (batch.n > 0 && ckpt_persist_active () == -1)
    goto out;
  if ((data_dirty || batch.n > 0) && fdatasync (fd) == -1)
    goto out;
  if (batch.n > 0) {
    /* A frozen layer gains pages only from a merge job; its map file
     * is opened just for the write.
     */
    int mfd = l->map_fd;
    if (mfd == -1) {
      CLEANUP_FREE char *path = layer_path (l->id, "map");
      mfd = path ? open (path, O_RDWR | O_CLOEXEC) : -1;
      if (mfd == -1)
        goto out;
    }
    if (mapfile_write (mfd, &batch) == -1) {
      if (mfd != l->map_fd) {
        int e = errno;
        close (mfd);
        errno = e;
      }
      goto out;
    }
    if (mfd != l->map_fd)
      close (mfd);
  }
  r = 0;
 out:
  if (r == -1) {
    int e = errno;
    mapfile_batch_restore (&l->map, &batch);
    if (own)
      __atomic_store_n (&l->data_dirty, 1, __ATOMIC_SEQ_CST);
    errno = e;
  }
  mapfile_batch_free (&batch);
  return r;
}

/* ---- Opening the store ---- */

/* Each layer keeps one descriptor open; allow many snapshots. */
static void
raise_fd_limit (void)
{
  struct rlimit rl;

  if (getrlimit (RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit (RLIMIT_NOFILE, &rl);
  }
}

/* Whether the manifest was loaded (false: a new store). */
static bool have_manifest;

int
store_load (void)
{
  int r = manifest_load (store.dir, &store.m);

  if (r == -1)
    return -1;
  have_manifest = r == 1;
  if (!have_manifest)
    return 0;
  if (store.m.mode != MODE_ROW) {
    nbdkit_error ("snapshot-store=%s: the store is in cbw mode, which is "
                  "not available in this release", store.dir);
    return -1;
  }
  if (block_size_param && block_size_param != store.m.block_size) {
    nbdkit_error ("snapshot-block-size=%" PRIu32 " does not match the "
                  "block size of the store %s (%" PRIu32 ")",
                  block_size_param, store.dir, store.m.block_size);
    return -1;
  }
  return 0;
}

/* Whether the manifest names file id as a layer or a dirty map. */
static bool
store_references (uint64_t id)
{
  for (size_t i = 0; i < store.m.nlayers; ++i)
    if (store.m.layers[i] == id)
      return true;
  for (size_t i = 0; i < store.m.nckpts; ++i)
    if (store.m.ckpts[i].map == id)
      return true;
  return false;
}

/* If name is layer-ID.data, layer-ID.map or dirty-ID.map, set *id. */
static bool
store_file_id (const char *name, uint64_t *id)
{
  static const char *const forms[][2] = {
    { "layer-", ".data" }, { "layer-", ".map" }, { "dirty-", ".map" },
  };

  for (size_t i = 0; i < sizeof forms / sizeof forms[0]; ++i) {
    const size_t plen = strlen (forms[i][0]);
    char *end;

    if (strncmp (name, forms[i][0], plen) != 0 ||
        name[plen] < '0' || name[plen] > '9')
      continue;
    errno = 0;
    *id = strtoull (name + plen, &end, 10);
    if (errno == 0 && strcmp (end, forms[i][1]) == 0)
      return true;
  }
  return false;
}

/* Delete the layer and dirty map files the manifest does not name:
 * left by a crash after a merge job dropped a layer (job.c deletes
 * them after the job ends) or before a new checkpoint reached the
 * manifest.  An output symlink goes, never its target.
 */
static void
store_sweep (void)
{
  DIR *dir = opendir (store.dir);
  struct dirent *e;

  if (dir == NULL)
    return;
  while ((e = readdir (dir)) != NULL) {
    uint64_t id;

    if (!store_file_id (e->d_name, &id))
      continue;
    if (store_references (id))
      continue;
    if (unlinkat (dirfd (dir), e->d_name, 0) == 0)
      nbdkit_debug ("snapshot: removed %s (not in the manifest)", e->d_name);
  }
  closedir (dir);
}

int
store_open (uint64_t origin_size)
{
  raise_fd_limit ();
  if (!have_manifest) {
    store.m.mode = MODE_ROW;
    store.m.block_size = block_size_param ? block_size_param : 65536;
    store.m.size = origin_size;
    store.m.next_id = 1;
    if (manifest_save (store.dir, &store.m) == -1) {
      nbdkit_error ("%s: cannot write the manifest: %m", store.dir);
      return -1;
    }
    have_manifest = true;
    nbdkit_debug ("snapshot: created store %s", store.dir);
  }
  if (origin_size != store.m.size) {
    nbdkit_error ("snapshot-store=%s: the origin size %" PRIu64
                  " does not match the origin size recorded in the store (%"
                  PRIu64 "): is this the right origin?",
                  store.dir, origin_size, store.m.size);
    return -1;
  }
  store.size = store.m.size;
  store.block_size = store.m.block_size;
  store.npages = (store.size + PAGE_SIZE_BYTES - 1) >> PAGE_SHIFT;
  store.nblocks = (store.size + store.block_size - 1) / store.block_size;

  store_sweep ();
  store.layers = calloc (store.m.nlayers + 1, sizeof *store.layers);
  if (store.layers == NULL) {
    nbdkit_error ("calloc: %m");
    return -1;
  }
  for (size_t i = 0; i < store.m.nlayers; ++i) {
    bool newest = i == store.m.nlayers - 1;
    store.layers[i] = layer_open (store.m.layers[i], newest);
    if (store.layers[i] == NULL)
      return -1;
    store.nlayers++;
  }
  store.maps = calloc (store.m.nckpts + 1, sizeof *store.maps);
  if (store.maps == NULL) {
    nbdkit_error ("calloc: %m");
    return -1;
  }
  for (size_t i = 0; i < store.m.nckpts; ++i) {
    store.maps[i] = ckpt_map_open (store.m.ckpts[i].map,
                                   i == store.m.nckpts - 1);
    if (store.maps[i] == NULL)
      return -1;
  }
  if (intent_open () == -1)
    return -1;
  if (ckpt_recover_active () == -1) {
    nbdkit_error ("%s: recovering the newest dirty map: %m", store.dir);
    return -1;
  }
  nbdkit_debug ("snapshot: store %s: %zu layers, %zu checkpoints, "
                "block size %" PRIu32,
                store.dir, store.nlayers, store.m.nckpts, store.block_size);
  return 0;
}

void
store_close (void)
{
  if (store.nlayers > 0 && layer_flush (store.layers[store.nlayers - 1]) == -1)
    nbdkit_error ("snapshot: flushing the newest layer: %m");
  if (store.maps && ckpt_persist_active () == -1)
    nbdkit_error ("snapshot: saving the active dirty map: %m");
  else if (store.maps && intent_clear (false) == -1)
    nbdkit_error ("snapshot: clearing the write-intent regions: %m");
  intent_close ();
  for (size_t i = 0; store.maps && i < store.m.nckpts; ++i)
    ckpt_map_free (store.maps[i]);
  free (store.maps);
  store.maps = NULL;
  for (size_t i = 0; i < store.nlayers; ++i)
    layer_free (store.layers[i]);
  free (store.layers);
  store.layers = NULL;
  store.nlayers = 0;
  manifest_free (&store.m);
  if (store.lock_fd >= 0)
    close (store.lock_fd);
  store.lock_fd = -1;
  free (store.dir);
  store.dir = NULL;
}

/* ---- Snapshots ---- */

size_t
store_snapshot_depth (const struct manifest_checkpoint *s)
{
  size_t n = 0;

  while (n < store.nlayers && store.layers[n]->id < s->layer)
    n++;
  return n;
}

void
set_errmsg (char **errmsg, const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  if (vasprintf (errmsg, fs, args) == -1)
    *errmsg = NULL;
  va_end (args);
}

/* Undo the in-memory effects of a failed create, and its files. */
static void
create_rollback (uint64_t next_id, size_t nlayers, size_t nckpts,
                 struct layer *l, struct ckpt_map *d)
{
  for (uint64_t id = next_id; id < store.m.next_id; ++id) {
    CLEANUP_FREE char *data = layer_path (id, "data");
    CLEANUP_FREE char *map = layer_path (id, "map");
    CLEANUP_FREE char *dirty = ckpt_map_path (id);
    if (data) unlink (data);
    if (map) unlink (map);
    if (dirty) unlink (dirty);
  }
  store.m.next_id = next_id;
  store.m.nlayers = nlayers;
  store.m.nckpts = nckpts;
  layer_free (l);
  ckpt_map_free (d);
}

ssize_t
store_create_checkpoint (const char *name, bool bitmap_only,
                         int (*flush_origin) (void), char **errmsg)
{
  ACQUIRE_WRLOCK_FOR_CURRENT_SCOPE (&store.lock);
  const char *why = snap_name_invalid (name);
  const uint64_t next_id = store.m.next_id;
  const size_t nlayers = store.m.nlayers, nckpts = store.m.nckpts;
  struct manifest_checkpoint c = { .created = time (NULL) };
  struct layer *l = NULL, **layers;
  struct ckpt_map *d = NULL, **maps;

  *errmsg = NULL;
  if (why) {
    set_errmsg (errmsg, "invalid name '%s': %s", name, why);
    return -1;
  }
  if (manifest_find_checkpoint (&store.m, name) >= 0) {
    set_errmsg (errmsg, "checkpoint '%s' already exists", name);
    return -1;
  }
  if (!bitmap_only && store.revert_depth >= 0) {
    set_errmsg (errmsg, "a revert to '%s' is in progress (job %" PRIu64
                "): wait for it before taking a snapshot",
                store.m.job.name, store.m.job.id);
    return -1;
  }

  /* Everything acknowledged so far belongs before the checkpoint: make
   * the live volume and the active map durable first.  A bitmap-only
   * checkpoint is a point in time too: a write it counts as older must
   * not vanish in a crash, or the blocks changed since it would not
   * include the block that then reads as it was before.
   */
  if (store.nlayers == 0 && flush_origin () == -1) {
    set_errmsg (errmsg, "flushing the origin failed: %s", strerror (errno));
    return -1;
  }
  if (store.nlayers > 0 &&
      layer_flush (store.layers[store.nlayers - 1]) == -1) {
    set_errmsg (errmsg, "flushing layer %" PRIu64 ": %s",
                store.layers[store.nlayers - 1]->id, strerror (errno));
    return -1;
  }
  if (ckpt_persist_active () == -1 || intent_clear (false) == -1) {
    set_errmsg (errmsg, "saving the active dirty map: %s", strerror (errno));
    return -1;
  }

  layers = realloc (store.layers, (store.nlayers + 2) * sizeof *layers);
  if (layers)
    store.layers = layers;
  maps = realloc (store.maps, (store.m.nckpts + 2) * sizeof *maps);
  if (maps)
    store.maps = maps;
  if (layers == NULL || maps == NULL) {
    set_errmsg (errmsg, "realloc: %s", strerror (errno));
    return -1;
  }

  strcpy (c.name, name);
  c.kind = bitmap_only ? CKPT_BITMAP : CKPT_SNAPSHOT;
  if (!bitmap_only) {
    c.layer = store.m.next_id++;
    l = layer_create (c.layer);
    if (l == NULL)
      goto err_files;
  }
  c.map = store.m.next_id++;
  d = ckpt_map_create (c.map);
  if (d == NULL)
    goto err_files;
  if (fsync_dir (store.dir) == -1 ||
      (l && manifest_add_layer (&store.m, c.layer) == -1) ||
      manifest_add_checkpoint (&store.m, &c) == -1 ||
      manifest_save (store.dir, &store.m) == -1) {
    int e = errno;
    create_rollback (next_id, nlayers, nckpts, l, d);
    set_errmsg (errmsg, "cannot save the manifest in %s: %s",
                store.dir, strerror (e));
    return -1;
  }

  /* The old newest layer and dirty map are frozen from now on. */
  if (l && store.nlayers > 0) {
    struct layer *old = store.layers[store.nlayers - 1];
    if (old->map_fd >= 0) {
      close (old->map_fd);
      old->map_fd = -1;
    }
  }
  if (nckpts > 0)
    ckpt_map_close_file (store.maps[nckpts - 1]);
  if (l)
    store.layers[store.nlayers++] = l;
  store.maps[nckpts] = d;
  nbdkit_debug ("snapshot: created %s %s (map %" PRIu64 ", layer %" PRIu64 ")",
                bitmap_only ? "checkpoint" : "snapshot", name, c.map, c.layer);
  return nckpts;

 err_files:
  create_rollback (next_id, nlayers, nckpts, l, d);
  set_errmsg (errmsg, "cannot create the files of '%s' in %s (see the "
              "server log)", name, store.dir);
  return -1;
}

int
store_delete_checkpoint (const char *name, char **errmsg)
{
  ACQUIRE_WRLOCK_FOR_CURRENT_SCOPE (&store.lock);
  ssize_t i = manifest_find_checkpoint (&store.m, name);
  unsigned refs;

  *errmsg = NULL;
  if (i == -1) {
    set_errmsg (errmsg, "no checkpoint named '%s'", name);
    return -1;
  }
  if (store.m.ckpts[i].kind == CKPT_SNAPSHOT) {
    set_errmsg (errmsg, "'%s' is a snapshot: deleting it is a merge job "
                "(job_start_delete)", name);
    return -1;
  }
  refs = store_connections (i);
  if (refs > 0) {
    set_errmsg (errmsg, "checkpoint '%s' is in use by %u connection%s "
                "(a dirty/ export): disconnect first", name, refs,
                refs == 1 ? "" : "s");
    return -1;
  }
  return ckpt_delete_bitmap (i, errmsg);
}

uint64_t
store_layer_bytes (uint64_t id)
{
  for (size_t i = 0; i < store.nlayers; ++i)
    if (store.layers[i]->id == id) {
      uint64_t bytes = sbitmap_count (&store.layers[i]->map) * PAGE_SIZE_BYTES;
      return MIN (bytes, store.size);
    }
  return 0;
}

unsigned
store_connections (size_t i)
{
  return __atomic_load_n (&store.maps[i]->refs, __ATOMIC_SEQ_CST);
}
