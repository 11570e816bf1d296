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
#include "origin.h"
#include "pending.h"
#include "store.h"
#include "storefiles.h"
#include "util.h"

struct store store = { .lock_fd = -1 };

/* ---- Locking the store ---- */

int
store_lock (const char *dir)
{
  CLEANUP_FREE char *lockpath = NULL;
  pthread_rwlockattr_t attr;

  /* A store whose name a power loss could take would start afresh,
   * without the snapshots it had.
   */
  if (mkdir_durable (dir, 0700) == -1) {
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
  store.revert_fd = -1;
  pthread_mutex_init (&store.revert_lock, NULL);
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
  pthread_cond_destroy (&l->gc_cond);
  pthread_mutex_destroy (&l->gc_lock);
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
  pthread_mutex_init (&l->gc_lock, NULL);
  pthread_cond_init (&l->gc_cond, NULL);
  if (sbitmap_init (&l->regions, (store.size + LAYER_REGION_BYTES - 1) /
                    LAYER_REGION_BYTES) == -1) {
    nbdkit_error ("sbitmap_init: %m");
    layer_free (l);
    return NULL;
  }
  return l;
}

/* The pages l holds that are holes in its data file (wholly): their
 * number, and a sum over their runs (storefiles.h).
 */
static int
layer_holes (struct layer *l, uint64_t *count, uint64_t *sum)
{
  return store_layer_holes (l->data_fd, &l->map, store.size, count, sum);
}

/* Set (or with seal NULL clear) the seal of l's map file. */
static int
layer_set_seal (struct layer *l, const struct mapfile_seal *seal)
{
  CLEANUP_FREE char *path = layer_path (l->id, "map");

  if (path == NULL)
    return -1;
  return mapfile_set_seal_path (l->map_fd, path, seal);
}

int
layer_unseal (struct layer *l)
{
  if (!l->sealed)
    return 0;
  if (layer_set_seal (l, NULL) == -1)
    return -1;
  l->sealed = false;
  return 0;
}

int
layer_seal (struct layer *l)
{
  struct mapfile_seal seal;

  if (l->sealed)
    return 0;
  if (layer_flush (l) == -1)
    return -1;
  mapfile_seal_compute (&l->map, &seal);
  if (layer_holes (l, &seal.extra[0], &seal.extra[1]) == -1 ||
      layer_set_seal (l, &seal) == -1)
    return -1;
  l->sealed = true;
  return 0;
}

/* Open existing layer id.  The newest layer keeps its map writable. */
static struct layer *
layer_open (uint64_t id, bool newest)
{
  CLEANUP_FREE char *data = layer_path (id, "data");
  CLEANUP_FREE char *map = layer_path (id, "map");
  struct layer *l = layer_alloc (id);
  struct mapfile_seal seal;
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
  l->map_fd = mapfile_open_sealed (map, MAPFILE_KIND_LAYER, PAGE_SIZE_BYTES,
                                   store.npages, newest, &l->map, &l->sealed,
                                   &seal);
  if (l->map_fd == -1)
    goto err;
  if (l->sealed) {
    uint64_t holes, sum;
    if (layer_holes (l, &holes, &sum) == -1) {
      nbdkit_error ("%s: looking for holes: %m", data);
      goto err;
    }
    if (holes != seal.extra[0] || sum != seal.extra[1]) {
      nbdkit_error ("%s: %" PRIu64 " of the pages the layer holds are "
                    "holes in its data file, %" PRIu64 " were when it was "
                    "sealed%s: the layer's data is damaged",
                    data, holes, seal.extra[0],
                    holes == seal.extra[0] ? " (at other places)" : "");
      goto err;
    }
  }
  /* The newest layer takes writes from now on. */
  if (newest && layer_unseal (l) == -1) {
    nbdkit_error ("%s: clearing the seal: %m", map);
    goto err;
  }
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
  /* Ids are never reused, and start-up hands out new ones above any
   * file it found: a file already there is not ours to replace.
   */
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
  store_remove_path (data);
  store_remove_path (map);
 err:
  layer_free (l);
  return NULL;
}

bool
pages_are_zero (const char *buf, size_t len)
{
  static const char zero[PAGE_SIZE_BYTES];

  for (size_t o = 0; o < len; o += PAGE_SIZE_BYTES)
    if (memcmp (buf + o, zero, MIN ((size_t) PAGE_SIZE_BYTES, len - o)))
      return false;
  return true;
}

/* Length of page p (the last one of the volume may be short). */
static size_t
page_bytes (uint64_t p)
{
  return MIN ((uint64_t) PAGE_SIZE_BYTES, store.size - (p << PAGE_SHIFT));
}

int
layer_store (struct layer *l, const char *buf, uint64_t p, uint64_t q)
{
  while (p < q) {
    const uint64_t off = p << PAGE_SHIFT;
    const bool zero = pages_are_zero (buf, page_bytes (p));
    uint64_t e = p + 1, len;

    while (e < q &&
           pages_are_zero (buf + ((e - p) << PAGE_SHIFT), page_bytes (e))
           == zero)
      e++;
    len = MIN (e << PAGE_SHIFT, store.size) - off;
    if (!zero ||
        fallocate (l->data_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                   off, len) == -1) {
      if (full_pwrite (l->data_fd, buf, len, off) == -1)
        return -1;
    }
    buf += len;
    p = e;
  }
  __atomic_store_n (&l->data_dirty, 1, __ATOMIC_SEQ_CST);
  return 0;
}

int
layer_flush (struct layer *l)
{
  return layer_flush_fd (l, l->data_fd);
}

int
layer_sync (struct layer *l)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&l->gc_lock);
  /* A flush that starts after this point covers every page set
   * before it; one that is running may not.
   */
  const uint64_t mine = ++l->gc_seq;

  while (l->gc_synced < mine) {
    if (!l->gc_busy) {
      const uint64_t target = l->gc_seq;
      int r;

      l->gc_busy = true;
      pthread_mutex_unlock (&l->gc_lock);
      r = layer_flush (l);
      pthread_mutex_lock (&l->gc_lock);
      l->gc_busy = false;
      pthread_cond_broadcast (&l->gc_cond);
      if (r == -1)
        return -1;
      l->gc_synced = target;
    }
    else
      pthread_cond_wait (&l->gc_cond, &l->gc_lock);
  }
  return 0;
}

int
layer_flush_fd (struct layer *l, int fd)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&l->flush_lock);
  struct mapfile_batch batch = { 0 };
  const bool own = fd == l->data_fd;
  unsigned data_dirty;
  int r = -1;

  /* After a failed sync no sync of a layer may succeed (store.h). */
  if (store_failed ()) {
    errno = EIO;
    return -1;
  }
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
   * the pages: make them durable before the layer claims the data
   * (unless every write makes its bits durable itself, kind.h).
   */
  if (batch.n > 0 && store.kind->active_is_layered () &&
      ckpt_persist_active () == -1)
    goto out;
  if ((data_dirty || batch.n > 0) && fdatasync (fd) == -1) {
    store_fail ("layer-%" PRIu64 ".data: fdatasync", l->id);
    goto out;
  }
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

/* Whether the manifest was loaded (false: a new store). */
static bool have_manifest;

/* If name is layer-ID.data, layer-ID.map, dirty-ID.map or
 * revert-ID.map, set *id.
 */
static bool
store_file_id (const char *name, uint64_t *id)
{
  switch (store_file_classify (name, id)) {
  case STORE_FILE_LAYER_DATA:
  case STORE_FILE_LAYER_MAP:
  case STORE_FILE_DIRTY_MAP:
  case STORE_FILE_REVERT_MAP:
    return true;
  default:
    return false;
  }
}

/* Whether name is one of the files a store that has been used holds
 * besides its manifest.
 */
static bool
is_store_file (const char *name)
{
  uint64_t id;

  return store_file_id (name, &id) || strcmp (name, "intent.map") == 0;
}

int
store_load (void)
{
  int r = manifest_load (store.dir, &store.m);

  if (r == -1)
    return -1;
  have_manifest = r == 1;
  if (!have_manifest) {
    /* A directory with store files and no manifest is a store that
     * lost its manifest, not a new one: starting afresh would make
     * every file in it unexplained.  Leave it all alone.
     */
    DIR *dir = opendir (store.dir);
    struct dirent *e;

    if (dir == NULL) {
      nbdkit_error ("snapshot-store=%s: %m", store.dir);
      return -1;
    }
    while ((e = readdir (dir)) != NULL)
      if (is_store_file (e->d_name)) {
        nbdkit_error ("snapshot-store=%s: the directory holds store files "
                      "(%s) but no manifest: refusing to start a new "
                      "store over them, nothing was changed (put back %s/"
                      MANIFEST_NAME ", or move the files away)",
                      store.dir, e->d_name, store.dir);
        closedir (dir);
        return -1;
      }
    closedir (dir);
    return 0;
  }
  store.kind = store.m.mode == MODE_CBW ? &cbw_kind : &row_kind;
  if (mode_param >= 0 && (enum snap_mode) mode_param != store.m.mode) {
    nbdkit_error ("snapshot-mode=%s does not match the store %s, which is "
                  "%s: a store keeps its kind for life",
                  mode_param == MODE_CBW ? "cbw" : "row", store.dir,
                  store.kind->name);
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

/* ---- Deleting files ---- */

/* The files of the store that a symlink in it points to (the final
 * name of an image given with --output is one), as st_dev/st_ino
 * pairs, so that no sweep ever removes one.
 */
struct inode_set {
  size_t n;
  dev_t dev[64];
  ino_t ino[64];
};

static void
link_targets (DIR *dir, struct inode_set *set)
{
  struct dirent *e;

  set->n = 0;
  rewinddir (dir);
  while ((e = readdir (dir)) != NULL && set->n < 64) {
    struct stat st;

    if (fstatat (dirfd (dir), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
        S_ISLNK (st.st_mode) &&
        fstatat (dirfd (dir), e->d_name, &st, 0) == 0) {
      set->dev[set->n] = st.st_dev;
      set->ino[set->n++] = st.st_ino;
    }
  }
  rewinddir (dir);
}

/* Delete name (in directory dirfd) if that is safe: a symlink (only
 * the link goes, never what it points to), or a regular file with one
 * link that no symlink in targets points to.  Return 0 (deleted, or
 * not there), or -1 with errno set (EMLINK: not safe to delete).
 */
static int
remove_file (int dirfd, const char *name, const struct inode_set *targets)
{
  struct stat st;

  if (fstatat (dirfd, name, &st, AT_SYMLINK_NOFOLLOW) == -1)
    return errno == ENOENT ? 0 : -1;
  if (!S_ISLNK (st.st_mode)) {
    if (!S_ISREG (st.st_mode) || st.st_nlink != 1) {
      errno = EMLINK;
      return -1;
    }
    for (size_t i = 0; i < targets->n; ++i)
      if (targets->dev[i] == st.st_dev && targets->ino[i] == st.st_ino) {
        errno = EMLINK;
        return -1;
      }
  }
  return unlinkat (dirfd, name, 0);
}

int
store_remove_path (const char *path)
{
  const char *name = strrchr (path, '/');
  struct inode_set targets;
  DIR *dir;
  int r, e;

  if (name == NULL || (size_t) (name - path) != strlen (store.dir) ||
      strncmp (path, store.dir, name - path) != 0) {
    errno = EINVAL;             /* not a file of the store */
    return -1;
  }
  dir = opendir (store.dir);
  if (dir == NULL)
    return -1;
  link_targets (dir, &targets);
  r = remove_file (dirfd (dir), name + 1, &targets);
  e = errno;
  closedir (dir);
  errno = e;
  return r;
}

/* Whether the store's file name holds no data: a layer data file with
 * no allocated data, a map file whose bits are all clear.  Anything
 * that cannot be read, or is not a regular file, holds data.
 */
static bool
file_is_empty (int dirfd, const char *name)
{
  CLEANUP_CLOSE int fd = openat (dirfd, name,
                                 O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  struct stat st;
  char buf[65536];
  off_t off;

  if (fd == -1 || fstat (fd, &st) == -1 || !S_ISREG (st.st_mode))
    return false;
  if (st.st_size == 0)
    return true;
  if (strstr (name, ".data")) {
    off = lseek (fd, 0, SEEK_DATA);
    return off == -1 && errno == ENXIO;
  }
  /* A map: every byte after the header is zero. */
  for (off = MAPFILE_HEADER_SIZE; off < st.st_size; off += sizeof buf) {
    size_t n = MIN ((off_t) sizeof buf, st.st_size - off);
    if (full_pread (fd, buf, n, off) == -1)
      return false;
    for (size_t i = 0; i < n; ++i)
      if (buf[i])
        return false;
  }
  return true;
}

/* Look at every file of the store at start-up:
 *
 * - the files the manifest uses, and its own files, are made 0600;
 * - the files of ids the manifest drops (a layer a merge dropped, a
 *   checkpoint's map deleted, a revert's map, then a crash before the
 *   files went) are deleted, and the drop lines with them; so is the
 *   map of a revert that has ended (below);
 * - any other layer or map file is deleted only if it holds nothing
 *   (left by a create that a crash stopped before the manifest named
 *   it); else it is reported and left alone, and new ids are handed
 *   out above it.
 *
 * Only regular files with one link that no symlink in the store points
 * to are ever deleted (symlinks themselves may be).
 */
static int
store_sweep (void)
{
  DIR *dir = opendir (store.dir);
  const uint64_t next_id = store.m.next_id;
  struct inode_set targets;
  struct dirent *e;

  if (dir == NULL) {
    nbdkit_error ("snapshot-store=%s: %m", store.dir);
    return -1;
  }
  link_targets (dir, &targets);
  while ((e = readdir (dir)) != NULL) {
    struct stat st;
    uint64_t id;
    bool drop = false;

    if (fstatat (dirfd (dir), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == -1 ||
        !S_ISREG (st.st_mode)) {
      if (!store_file_id (e->d_name, &id) || !S_ISLNK (st.st_mode))
        continue;
    }
    else if ((st.st_mode & 0777) != 0600 &&
             (is_store_file (e->d_name) ||
              strcmp (e->d_name, MANIFEST_NAME) == 0 ||
              strcmp (e->d_name, "boot-id") == 0 ||
              strcmp (e->d_name, "lock") == 0))
      fchmodat (dirfd (dir), e->d_name, 0600, 0);
    if (!store_file_id (e->d_name, &id) || manifest_uses (&store.m, id))
      continue;
    for (size_t i = 0; i < store.m.ndrops; ++i)
      drop |= store.m.drops[i] == id;
    /* A revert's map records only which pages its job has done, never
     * data: once the job has ended (an id the manifest handed out that
     * is not the job it names) the map is of no use, drop line or not.
     */
    if (store_file_classify (e->d_name, &id) == STORE_FILE_REVERT_MAP &&
        id < next_id &&
        !(store.m.job.kind == JOB_REVERT && store.m.job.id == id))
      drop = true;
    if (drop || file_is_empty (dirfd (dir), e->d_name)) {
      if (remove_file (dirfd (dir), e->d_name, &targets) == 0) {
        nbdkit_debug ("snapshot: removed %s (%s)", e->d_name,
                      drop ? "dropped" : "empty, not in the manifest");
        continue;
      }
      if (errno != EMLINK) {
        nbdkit_error ("snapshot-store=%s: removing %s: %m",
                      store.dir, e->d_name);
        closedir (dir);
        return -1;
      }
    }
    if (drop)
      nbdkit_error ("snapshot-store=%s: %s belongs to a dropped layer or "
                    "map, but another name or a symlink in the store "
                    "refers to it: it is left alone", store.dir, e->d_name);
    else
      nbdkit_error ("snapshot-store=%s: %s is not named by the manifest "
                    "and holds data: it is left alone (move it away if it "
                    "is not needed)", store.dir, e->d_name);
    /* New files are never created over it. */
    if (id >= store.m.next_id)
      store.m.next_id = id + 1;
  }
  closedir (dir);
  /* The drop lines of files now gone go with the next save. */
  return 0;
}

/* Whether a file of id is still in the store. */
static bool
id_has_files (uint64_t id)
{
  CLEANUP_FREE char *data = layer_path (id, "data");
  CLEANUP_FREE char *map = layer_path (id, "map");
  CLEANUP_FREE char *dirty = ckpt_map_path (id);
  CLEANUP_FREE char *revert = NULL;
  struct stat st;

  if (asprintf (&revert, "%s/revert-%" PRIu64 ".map", store.dir, id) == -1)
    revert = NULL;
  return data == NULL || map == NULL || dirty == NULL || revert == NULL ||
    lstat (data, &st) == 0 || lstat (map, &st) == 0 ||
    lstat (dirty, &st) == 0 || lstat (revert, &st) == 0;
}

int
store_save (void)
{
  size_t n = 0;


  /* Forget the drops whose files are gone (or that are in use again,
   * after a change that failed).
   */
  for (size_t i = 0; i < store.m.ndrops; ++i)
    if (!manifest_uses (&store.m, store.m.drops[i]) &&
        id_has_files (store.m.drops[i]))
      store.m.drops[n++] = store.m.drops[i];
  store.m.ndrops = n;
  return manifest_save (store.dir, &store.m);
}

void
store_restore (struct manifest *saved)
{
  int e = errno;

  manifest_free (&store.m);
  store.m = *saved;
  errno = e;
}

int
store_drop_id (uint64_t id)
{
  return manifest_add_drop (&store.m, id);
}

/* Close the layers, the checkpoints' maps and the intent map (what
 * store_open opens), as store_load left the store.
 */
static void
close_files (void)
{
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
}

int
store_open (uint64_t origin_size)
{
  raise_fd_limit ();
  if (origin_size == 0) {
    nbdkit_error ("snapshot-store=%s: the origin is empty (0 bytes): "
                  "there is nothing to take snapshots of", store.dir);
    return -1;
  }
  if (!have_manifest) {
    store.kind = mode_param == MODE_CBW ? &cbw_kind : &row_kind;
    store.m.mode = store.kind->mode;
    store.m.block_size = block_size_param ? block_size_param : 65536;
    store.m.size = origin_size;
    store.m.next_id = 1;
    if (store_save () == -1) {
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

  if (store_sweep () == -1)
    return -1;
  store.layers = calloc (store.m.nlayers + 1, sizeof *store.layers);
  if (store.layers == NULL) {
    nbdkit_error ("calloc: %m");
    return -1;
  }
  for (size_t i = 0; i < store.m.nlayers; ++i) {
    bool newest = i == store.m.nlayers - 1;
    store.layers[i] = layer_open (store.m.layers[i], newest);
    if (store.layers[i] == NULL)
      goto err;
    store.nlayers++;
  }
  store.maps = calloc (store.m.nckpts + 1, sizeof *store.maps);
  if (store.maps == NULL) {
    nbdkit_error ("calloc: %m");
    goto err;
  }
  for (size_t i = 0; i < store.m.nckpts; ++i) {
    store.maps[i] = ckpt_map_open (store.m.ckpts[i].map,
                                   i == store.m.nckpts - 1);
    if (store.maps[i] == NULL)
      goto err;
  }
  if (intent_open () == -1)
    goto err;
  if (ckpt_recover_active () == -1) {
    nbdkit_error ("%s: recovering the newest dirty map: %m", store.dir);
    goto err;
  }
  nbdkit_debug ("snapshot: store %s: %zu layers, %zu checkpoints, "
                "block size %" PRIu32,
                store.dir, store.nlayers, store.m.nckpts, store.block_size);
  return 0;

 err:
  close_files ();
  return -1;
}

/* Seal every layer and map that is not (a clean stop: nothing changes
 * them until the next start, which checks them).
 */
static void
store_seal_all (void)
{
  for (size_t i = 0; i < store.nlayers; ++i)
    if (layer_seal (store.layers[i]) == -1)
      nbdkit_error ("snapshot: sealing layer %" PRIu64 ": %m",
                    store.layers[i]->id);
  for (size_t i = 0; i < store.m.nckpts; ++i)
    if (ckpt_map_seal (store.maps[i]) == -1)
      nbdkit_error ("snapshot: sealing dirty map %" PRIu64 ": %m",
                    store.maps[i]->id);
}

void
store_close (void)
{
  bool persisted = false;

  if (store.kind && store.kind->close)
    store.kind->close ();

  if (!store_failed () && store.nlayers > 0 &&
      layer_flush (store.layers[store.nlayers - 1]) == -1)
    nbdkit_error ("snapshot: flushing the newest layer: %m");
  /* After a failed sync nothing is synced, cleared or sealed: the store
   * stays as a crash would leave it, for the next start to recover.
   */
  if (store_failed ())
    nbdkit_error ("snapshot: %s: the store is left as after a crash (not "
                  "sealed): the next start recovers it", store_failure ());
  else if (store.maps && ckpt_persist_active () == -1)
    nbdkit_error ("snapshot: saving the active dirty map: %m");
  else if (store.maps && intent_clear (false) == -1)
    nbdkit_error ("snapshot: clearing the write-intent regions: %m");
  else
    persisted = store.maps != NULL;
  if (persisted)
    store_seal_all ();
  close_files ();
  manifest_free (&store.m);
  if (store.lock_fd >= 0)
    close (store.lock_fd);
  store.lock_fd = -1;
  free (store.dir);
  store.dir = NULL;
}

/* ---- A store whose disk failed a sync (store.h) ---- */

static pthread_mutex_t failure_lock = PTHREAD_MUTEX_INITIALIZER;
static bool failed;             /* atomic; failure is set before it */
static char failure[256];

void
store_fail (const char *fs, ...)
{
  const int e = errno;
  char what[128];
  va_list args;

  va_start (args, fs);
  vsnprintf (what, sizeof what, fs, args);
  va_end (args);
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&failure_lock);
    if (failed) {
      errno = e;
      return;
    }
    snprintf (failure, sizeof failure, "%s: %s", what, strerror (e));
    nbdkit_error ("snapshot: %s: what the sync covered may be lost, so the "
                  "store takes no more changes until nbdkit restarts: "
                  "writes and flushes fail with EIO, reads go on; the next "
                  "start recovers the store as after a crash", failure);
    /* Before anything can act on the failure (the stop, say). */
    intent_distrust ();
    __atomic_store_n (&failed, true, __ATOMIC_SEQ_CST);
  }
  errno = e;
}

bool
store_failed (void)
{
  return __atomic_load_n (&failed, __ATOMIC_SEQ_CST);
}

const char *
store_failure (void)
{
  return store_failed () ? failure : NULL;
}

bool
store_refuses (const char *what, int *err)
{
  if (!store_failed ())
    return false;
  nbdkit_error ("%s: the store had an I/O error (%s): it takes no more "
                "changes until nbdkit restarts", what, failure);
  *err = EIO;
  return true;
}

/* ---- A full store ---- */

/* The policy in force. */
static enum full_policy
full_policy (void)
{
  if (full_param >= 0)
    return full_param;
  /* Classic LVM snapshots are invalidated when full: the live volume
   * keeps working.  A row store's live data is in the store: nothing
   * can go to make room for it.
   */
  return store.kind == &cbw_kind ? FULL_INVALIDATE : FULL_ERROR;
}

int
store_check_full_policy (void)
{
  const struct kind *kind = store.kind;

  if (kind == NULL)             /* a new store */
    kind = mode_param == MODE_CBW ? &cbw_kind : &row_kind;
  if (full_param == FULL_INVALIDATE && kind != &cbw_kind) {
    nbdkit_error ("snapshot-full=invalidate: the store %s is %s "
                  "(redirect-on-write), whose live volume's data is in the "
                  "store: dropping a snapshot cannot make room for it.  "
                  "Use snapshot-full=error (the default for row stores)",
                  store.dir, kind->name);
    return -1;
  }
  return 0;
}

/* The data the layers hold, in bytes (store.lock held). */
static uint64_t
store_data_bytes (void)
{
  uint64_t pages = 0;

  for (size_t i = 0; i < store.nlayers; ++i)
    pages += sbitmap_count (&store.layers[i]->map);
  return pages * PAGE_SIZE_BYTES;
}

/* The pages the last write of this thread found no room for. */
static __thread uint64_t room_wanted;

int
store_room (uint64_t npages, int *err)
{
  uint64_t used;

  if (max_size_param == 0 || npages == 0)
    return 0;
  used = store_data_bytes ();
  if (used + npages * PAGE_SIZE_BYTES <= max_size_param)
    return 0;
  if (full_policy () == FULL_INVALIDATE && store.nlayers > 0) {
    room_wanted = npages;
    return STORE_FULL;
  }
  nbdkit_error ("snapshot-max-size=%" PRIu64 ": the store is full (it "
                "holds %" PRIu64 " bytes, and a write needs %" PRIu64
                " more): the write fails, every snapshot is kept",
                max_size_param, used, npages * PAGE_SIZE_BYTES);
  *err = ENOSPC;
  return -1;
}

int
store_invalidate_oldest (int *err)
{
  struct layer *l;
  struct manifest saved;
  CLEANUP_FREE char *data = NULL, *map = NULL;
  ssize_t ci = -1;

  {
    ACQUIRE_STORE_EXCLUSIVE_FOR_CURRENT_SCOPE ();
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&store.job_lock);

    /* Room may have been made meanwhile (another writer). */
    if (max_size_param == 0 || store.nlayers == 0 ||
        store_data_bytes () + room_wanted * PAGE_SIZE_BYTES <= max_size_param)
      return 0;
    /* The oldest snapshot: the one whose own layer is the first. */
    for (size_t i = 0; i < store.m.nckpts; ++i)
      if (store.m.ckpts[i].kind == CKPT_SNAPSHOT &&
          store.m.ckpts[i].layer == store.layers[0]->id) {
        ci = i;
        break;
      }
    if (ci < 0 || store.job || store.stuck.id) {
      nbdkit_error ("snapshot-max-size=%" PRIu64 ": the store is full, "
                    "and %s: the write fails", max_size_param,
                    ci < 0 ? "no snapshot can be invalidated"
                    : "a job runs on the snapshots");
      *err = ENOSPC;
      return -1;
    }
    l = store.layers[0];
    data = layer_path (l->id, "data");
    map = layer_path (l->id, "map");
    if (data == NULL || map == NULL || manifest_dup (&store.m, &saved) == -1)
      goto err;
    store.m.ckpts[ci].kind = CKPT_BITMAP;
    store.m.ckpts[ci].layer = 0;
    store.m.ckpts[ci].invalidated = time (NULL);
    manifest_remove_layer (&store.m, l->id);
    if (store_drop_id (l->id) == -1 || store_save () == -1) {
      store_restore (&saved);
      goto err;
    }
    manifest_free (&saved);
    memmove (&store.layers[0], &store.layers[1],
             (store.nlayers - 1) * sizeof store.layers[0]);
    store.nlayers--;
    nbdkit_error ("snapshot-max-size=%" PRIu64 ": the store is full: "
                  "snapshot '%s' was invalidated to make room (its data "
                  "is gone; it goes on as a bitmap-only checkpoint)",
                  max_size_param, store.m.ckpts[ci].name);
  }
  /* Outside the lock: freeing a large file takes time. */
  layer_free (l);
  store_remove_path (data);
  store_remove_path (map);
  return 0;

 err:
  *err = errno;
  nbdkit_error ("snapshot: invalidating a snapshot to make room: %m");
  return -1;
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
    if (data) store_remove_path (data);
    if (map) store_remove_path (map);
    if (dirty) store_remove_path (dirty);
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
  ACQUIRE_STORE_EXCLUSIVE_FOR_CURRENT_SCOPE ();
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
  if (store.kind->flush_live (flush_origin) == -1) {
    set_errmsg (errmsg, "flushing the live volume failed: %s",
                strerror (errno));
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
  /* The first snapshot freezes the origin: record its sample (after
   * the flush above, so a crash cannot take the origin back from it).
   */
  if (l && store.nlayers == 0 && store.kind->snapshots_freeze_origin &&
      origin_freeze () == -1)
    goto err_files;
  if (fsync_dir (store.dir) == -1 ||
      (l && manifest_add_layer (&store.m, c.layer) == -1) ||
      manifest_add_checkpoint (&store.m, &c) == -1 ||
      store_save () == -1) {
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
  ACQUIRE_STORE_EXCLUSIVE_FOR_CURRENT_SCOPE ();
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

/* Bytes of disk the file path takes (0 if it is not there). */
static uint64_t
disk_bytes (const char *path)
{
  struct stat st;

  if (path == NULL || lstat (path, &st) == -1 || !S_ISREG (st.st_mode))
    return 0;
  return (uint64_t) st.st_blocks * 512;
}

uint64_t
store_checkpoint_disk_bytes (size_t i)
{
  const struct manifest_checkpoint *c = &store.m.ckpts[i];
  CLEANUP_FREE char *dirty = ckpt_map_path (c->map);
  uint64_t n = disk_bytes (dirty);

  if (c->kind == CKPT_SNAPSHOT) {
    CLEANUP_FREE char *data = layer_path (c->layer, "data");
    CLEANUP_FREE char *map = layer_path (c->layer, "map");
    n += disk_bytes (data) + disk_bytes (map);
  }
  return n;
}

uint64_t
store_disk_bytes (void)
{
  DIR *dir = opendir (store.dir);
  struct dirent *e;
  uint64_t n = 0;

  if (dir == NULL)
    return 0;
  while ((e = readdir (dir)) != NULL) {
    struct stat st;
    if (fstatat (dirfd (dir), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
        S_ISREG (st.st_mode))
      n += (uint64_t) st.st_blocks * 512;
  }
  closedir (dir);
  return n;
}

unsigned
store_connections (size_t i)
{
  return __atomic_load_n (&store.maps[i]->refs, __ATOMIC_SEQ_CST);
}
