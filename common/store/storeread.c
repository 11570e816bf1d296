/* nbdkit-snapshot: reading a store at rest (see storeread.h). */
#include <config.h>

#include <assert.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cleanup.h"
#include "mapfile.h"
#include "storefiles.h"
#include "storeread.h"
#include "util.h"

/* ---- Locking and loading ---- */

int
sr_lock (const char *dir, int *fd)
{
  CLEANUP_FREE char *path = NULL;

  *fd = -1;
  if (asprintf (&path, "%s/lock", dir) == -1) {
    snap_error ("asprintf: %m");
    return -1;
  }
  *fd = open (path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (*fd == -1 && errno == ENOENT) {
    /* A store nobody has served yet (a backup chain): make the lock a
     * server would take, unless the directory is read-only, and then
     * nobody can serve it either.
     */
    *fd = open (path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (*fd == -1 && (errno == EROFS || errno == EACCES || errno == EPERM))
      return 0;
  }
  if (*fd == -1) {
    snap_error ("%s: %m", path);
    return -1;
  }
  if (flock (*fd, LOCK_SH | LOCK_NB) == -1) {
    int e = errno;
    close (*fd);
    *fd = -1;
    if (e == EWOULDBLOCK) {
      errno = EBUSY;
      return -1;
    }
    errno = e;
    snap_error ("%s: flock: %m", path);
    return -1;
  }
  return 0;
}

int
sr_load (struct storeread *s, const char *dir)
{
  int r;

  memset (s, 0, sizeof *s);
  s->lock_fd = -1;
  s->dir = realpath (dir, NULL);
  if (s->dir == NULL) {
    snap_error ("%s: %m", dir);
    return -1;
  }
  r = manifest_load (s->dir, &s->m);
  if (r == -1)
    return -1;
  if (r == 0) {
    snap_error ("%s: no manifest: not a store (or it has lost its "
                "manifest)", s->dir);
    return -1;
  }
  if (s->m.size == 0) {
    snap_error ("%s/%s: the volume size is 0", s->dir, MANIFEST_NAME);
    return -1;
  }
  s->size = s->m.size;
  s->block_size = s->m.block_size;
  s->npages = (s->size + STORE_PAGE_SIZE - 1) >> STORE_PAGE_SHIFT;
  s->nblocks = (s->size + s->block_size - 1) / s->block_size;
  s->layers = calloc (s->m.nlayers + 1, sizeof *s->layers);
  s->maps = calloc (s->m.nckpts + 1, sizeof *s->maps);
  s->maps_sealed = calloc (s->m.nckpts + 1, sizeof *s->maps_sealed);
  if (s->layers == NULL || s->maps == NULL || s->maps_sealed == NULL) {
    snap_error ("calloc: %m");
    return -1;
  }
  for (size_t i = 0; i < s->m.nlayers; ++i) {
    s->layers[i].id = s->m.layers[i];
    s->layers[i].data_fd = -1;
  }
  s->nlayers = s->m.nlayers;
  return 0;
}

/* ---- The files of the store ---- */

static bool
has_layer (const struct manifest *m, uint64_t id)
{
  for (size_t i = 0; i < m->nlayers; ++i)
    if (m->layers[i] == id)
      return true;
  return false;
}

static bool
is_map (const struct manifest *m, uint64_t id)
{
  for (size_t i = 0; i < m->nckpts; ++i)
    if (m->ckpts[i].map == id)
      return true;
  return false;
}

static bool
is_dropped (const struct manifest *m, uint64_t id)
{
  for (size_t i = 0; i < m->ndrops; ++i)
    if (m->drops[i] == id)
      return true;
  return false;
}

/* Whether entry name of the store is explained by the manifest. */
static bool
expected (const struct manifest *m, const char *name, const struct stat *st,
          const char **why)
{
  uint64_t id = 0;
  enum store_file kind = store_file_classify (name, &id);

  *why = "not a file of the store format";
  if (store_file_has_id (kind) && is_dropped (m, id))
    return true;                /* dropped: may be deleted any time */
  switch (kind) {
  case STORE_FILE_OTHER:
    return false;
  case STORE_FILE_LAYER_DATA:
  case STORE_FILE_LAYER_MAP:
  case STORE_FILE_DATA_LINK:
    *why = "not named by the manifest (no layer with this id)";
    return has_layer (m, id);
  case STORE_FILE_DIRTY_MAP:
    *why = "not named by the manifest (no checkpoint has this map)";
    return is_map (m, id);
  case STORE_FILE_REVERT_MAP:
    /* The map of a revert that has ended (an id below next_id) holds
     * no data: the filter deletes it at its next start.
     */
    *why = "not named by the manifest (no revert job has this id)";
    return (m->job.kind == JOB_REVERT && m->job.id == id) ||
      id < m->next_id;
  case STORE_FILE_CONTROL:
    /* A socket, or the symlink to one elsewhere (snapshot-control). */
    *why = "not a socket or a symbolic link";
    return S_ISSOCK (st->st_mode) || S_ISLNK (st->st_mode);
  case STORE_FILE_MANIFEST:
  case STORE_FILE_LOCK:
  case STORE_FILE_BOOT_ID:
  case STORE_FILE_INTENT:
  case STORE_FILE_TEMP:
    *why = "not a regular file";
    return S_ISREG (st->st_mode);
  }
  abort ();
}

ssize_t
sr_scan (const struct storeread *s,
         void (*report) (void *opaque, const char *name, const char *problem),
         void *opaque)
{
  DIR *dir = opendir (s->dir);
  struct dirent *e;
  ssize_t n = 0;

  if (dir == NULL) {
    snap_error ("%s: %m", s->dir);
    return -1;
  }
  /* Every entry is explained. */
  while ((e = readdir (dir)) != NULL) {
    struct stat st;
    const char *why;

    if (strcmp (e->d_name, ".") == 0 || strcmp (e->d_name, "..") == 0)
      continue;
    if (fstatat (dirfd (dir), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == -1)
      continue;                 /* gone meanwhile */
    if (!expected (&s->m, e->d_name, &st, &why)) {
      CLEANUP_FREE char *msg = NULL;
      if (asprintf (&msg, "unexpected %s: %s",
                    S_ISDIR (st.st_mode) ? "directory" : "file", why) == -1)
        msg = NULL;
      report (opaque, e->d_name, msg ? msg : why);
      n++;
    }
  }
  closedir (dir);

  /* Every file the manifest names is there. */
  for (size_t i = 0; i < s->m.nlayers; ++i) {
    static const enum store_file kinds[] = {
      STORE_FILE_LAYER_DATA, STORE_FILE_LAYER_MAP
    };
    for (size_t k = 0; k < 2; ++k) {
      CLEANUP_FREE char *path = store_file_path (s->dir, kinds[k],
                                                 s->m.layers[i]);
      struct stat st;

      if (path && stat (path, &st) == -1) {
        CLEANUP_FREE char *msg = NULL;
        if (asprintf (&msg, "missing: the manifest names layer %" PRIu64
                      " (%m)", s->m.layers[i]) == -1)
          msg = NULL;
        report (opaque, strrchr (path, '/') + 1, msg ? msg : "missing");
        n++;
      }
    }
  }
  for (size_t i = 0; i < s->m.nckpts; ++i) {
    CLEANUP_FREE char *path = store_file_path (s->dir, STORE_FILE_DIRTY_MAP,
                                               s->m.ckpts[i].map);
    struct stat st;

    if (path && stat (path, &st) == -1) {
      CLEANUP_FREE char *msg = NULL;
      if (asprintf (&msg, "missing: the dirty map of checkpoint '%s' (%m)",
                    s->m.ckpts[i].name) == -1)
        msg = NULL;
      report (opaque, strrchr (path, '/') + 1, msg ? msg : "missing");
      n++;
    }
  }
  return n;
}

int
sr_open_layer (struct storeread *s, size_t i)
{
  struct sr_layer *l = &s->layers[i];
  CLEANUP_FREE char *data = store_file_path (s->dir, STORE_FILE_LAYER_DATA,
                                             l->id);
  CLEANUP_FREE char *map = store_file_path (s->dir, STORE_FILE_LAYER_MAP,
                                            l->id);
  struct mapfile_seal seal;
  struct stat st;
  int fd;

  if (data == NULL || map == NULL) {
    snap_error ("asprintf: %m");
    return -1;
  }
  l->data_fd = open (data, O_RDONLY | O_CLOEXEC);
  if (l->data_fd == -1) {
    snap_error ("%s: %m (the store is incomplete)", data);
    return -1;
  }
  if (fstat (l->data_fd, &st) == -1) {
    snap_error ("%s: fstat: %m", data);
    return -1;
  }
  if (!S_ISREG (st.st_mode)) {
    snap_error ("%s: not a regular file (the store is damaged)", data);
    return -1;
  }
  if ((uint64_t) st.st_size != s->size) {
    snap_error ("%s: size %" PRIi64 " does not match the volume size %"
                PRIu64 " (the store is damaged)",
                data, (int64_t) st.st_size, s->size);
    return -1;
  }
  fd = mapfile_open_sealed (map, MAPFILE_KIND_LAYER, STORE_PAGE_SIZE,
                            s->npages, 0, &l->map, &l->sealed, &seal);
  if (fd == -1)
    return -1;
  close (fd);
  if (l->sealed) {
    uint64_t holes, sum;

    if (store_layer_holes (l->data_fd, &l->map, s->size, &holes,
                           &sum) == -1) {
      snap_error ("%s: looking for holes: %m", data);
      return -1;
    }
    if (holes != seal.extra[0] || sum != seal.extra[1]) {
      snap_error ("%s: %" PRIu64 " of the pages the layer holds are "
                  "holes in its data file, %" PRIu64 " were when it was "
                  "sealed%s: the layer's data is damaged",
                  data, holes, seal.extra[0],
                  holes == seal.extra[0] ? " (at other places)" : "");
      return -1;
    }
  }
  return 0;
}

int
sr_open_map (struct storeread *s, size_t i)
{
  CLEANUP_FREE char *path = store_file_path (s->dir, STORE_FILE_DIRTY_MAP,
                                             s->m.ckpts[i].map);
  struct mapfile_seal seal;
  int fd;

  if (path == NULL) {
    snap_error ("asprintf: %m");
    return -1;
  }
  fd = mapfile_open_sealed (path, MAPFILE_KIND_DIRTY, s->block_size,
                            s->nblocks, 0, &s->maps[i], &s->maps_sealed[i],
                            &seal);
  if (fd == -1)
    return -1;
  close (fd);
  return 0;
}

/* Start reading the data of file path (its allocated stretches only:
 * readahead of a hole would fill the page cache with zeros) without
 * waiting for it.
 */
static void
prefetch (const char *path)
{
  int fd = open (path, O_RDONLY | O_CLOEXEC);
  off_t pos = 0, end;

  if (fd == -1)
    return;
  end = lseek (fd, 0, SEEK_END);
  while (end > 0 && pos < end) {
    off_t data = lseek (fd, pos, SEEK_DATA), hole;
    if (data == -1)
      break;
    hole = lseek (fd, data, SEEK_HOLE);
    if (hole == -1 || hole <= data)
      hole = end;
    posix_fadvise (fd, data, hole - data, POSIX_FADV_WILLNEED);
    pos = hole;
  }
  close (fd);
}

/* Ask for every map of the store at once, so that the disk reads them
 * in parallel, before they are loaded one by one: opening a long chain
 * from a cold cache reads a few scattered pages of each map.
 */
static void
prefetch_maps (const struct storeread *s)
{
  for (size_t i = 0; i < s->nlayers; ++i) {
    CLEANUP_FREE char *p = store_file_path (s->dir, STORE_FILE_LAYER_MAP,
                                            s->layers[i].id);
    if (p)
      prefetch (p);
  }
  for (size_t i = 0; i < s->m.nckpts; ++i) {
    CLEANUP_FREE char *p = store_file_path (s->dir, STORE_FILE_DIRTY_MAP,
                                            s->m.ckpts[i].map);
    if (p)
      prefetch (p);
  }
}

/* sr_scan's report for sr_open: the first problem is the error. */
struct first_problem {
  const char *dir;
  bool reported;
};

static void
report_first (void *opaque, const char *name, const char *problem)
{
  struct first_problem *f = opaque;

  if (f->reported)
    return;
  snap_error ("%s/%s: %s (nbdsnap check %s lists every problem)",
              f->dir, name, problem, f->dir);
  f->reported = true;
}

int
sr_open (struct storeread *s, const char *dir, bool lock)
{
  struct first_problem first;
  int lock_fd = -1;
  ssize_t n;

  if (lock && sr_lock (dir, &lock_fd) == -1) {
    memset (s, 0, sizeof *s);
    s->lock_fd = -1;
    return -1;
  }
  if (sr_load (s, dir) == -1) {
    if (lock_fd >= 0)
      close (lock_fd);
    return -1;
  }
  s->lock_fd = lock_fd;
  first = (struct first_problem) { .dir = s->dir };
  n = sr_scan (s, report_first, &first);
  if (n != 0)
    return -1;
  prefetch_maps (s);
  for (size_t i = 0; i < s->nlayers; ++i)
    if (sr_open_layer (s, i) == -1)
      return -1;
  for (size_t i = 0; i < s->m.nckpts; ++i)
    if (sr_open_map (s, i) == -1)
      return -1;
  return 0;
}

void
sr_close (struct storeread *s)
{
  for (size_t i = 0; s->layers && i < s->nlayers; ++i) {
    if (s->layers[i].data_fd >= 0)
      close (s->layers[i].data_fd);
    sbitmap_free (&s->layers[i].map);
  }
  for (size_t i = 0; s->maps && i < s->m.nckpts; ++i)
    sbitmap_free (&s->maps[i]);
  free (s->layers);
  free (s->maps);
  free (s->maps_sealed);
  manifest_free (&s->m);
  if (s->lock_fd >= 0)
    close (s->lock_fd);
  free (s->dir);
  memset (s, 0, sizeof *s);
  s->lock_fd = -1;
}

/* ---- Views ---- */

size_t
sr_snapshot_depth (const struct manifest *m,
                   const struct manifest_checkpoint *c)
{
  size_t n = 0;

  while (n < m->nlayers && m->layers[n] < c->layer)
    n++;
  return n;
}

void
sr_snapshot_view (const struct manifest *m, size_t ci, size_t *lo,
                  size_t *hi, bool *ascending)
{
  const size_t d = sr_snapshot_depth (m, &m->ckpts[ci]);

  if (m->mode == MODE_CBW) {
    /* Its own layer, then each newer snapshot's, oldest first. */
    *lo = d;
    *hi = m->nlayers;
    *ascending = true;
  }
  else {
    /* The layers older than it, newest first. */
    *lo = 0;
    *hi = d;
    *ascending = false;
  }
}

bool
sr_readable (const struct manifest *m, size_t ci, const char **why)
{
  const struct manifest_checkpoint *c = &m->ckpts[ci];

  if (c->kind != CKPT_SNAPSHOT) {
    if (why)
      *why = c->invalidated
        ? "it was invalidated when the store was full: its data is gone"
        : "it is a bitmap-only checkpoint, which keeps no data";
    return false;
  }
  if (m->job.kind == JOB_DELETE && strcmp (m->job.name, c->name) == 0) {
    if (why)
      *why = "a delete of it was interrupted: its view is partly merged "
        "(start the filter on the store to finish the job)";
    return false;
  }
  return true;
}

/* ---- The index ---- */

/* A min-heap of (page, map) events. */
struct event {
  uint64_t page;
  size_t k;
};

static void
heap_push (struct event *h, size_t *n, struct event ev)
{
  size_t i = (*n)++;

  while (i > 0 && h[(i - 1) / 2].page > ev.page) {
    h[i] = h[(i - 1) / 2];
    i = (i - 1) / 2;
  }
  h[i] = ev;
}

static struct event
heap_pop (struct event *h, size_t *n)
{
  struct event top = h[0], last = h[--*n];
  size_t i = 0;

  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= *n)
      break;
    if (c + 1 < *n && h[c + 1].page < h[c].page)
      c++;
    if (last.page <= h[c].page)
      break;
    h[i] = h[c];
    i = c;
  }
  if (*n > 0)
    h[i] = last;
  return top;
}

/* Append run (start, src) to ix. */
static int
add_run (struct sr_index *ix, size_t *alloc, uint64_t start, int32_t src)
{
  if (ix->nruns + 1 >= *alloc) {
    size_t n = *alloc ? *alloc * 2 : 64;
    uint64_t *s = realloc (ix->start, n * sizeof *s);
    int32_t *r;

    if (s == NULL)
      return -1;
    ix->start = s;
    r = realloc (ix->src, n * sizeof *r);
    if (r == NULL)
      return -1;
    ix->src = r;
    *alloc = n;
  }
  ix->start[ix->nruns] = start;
  ix->src[ix->nruns++] = src;
  return 0;
}

int
sr_index_build (size_t n, const struct sbitmap *const *maps,
                const int32_t *src, uint64_t npages, struct sr_index *ix)
{
  const size_t nwords = (n + 63) / 64;
  CLEANUP_FREE uint64_t *holding = calloc (nwords + 1, sizeof *holding);
  CLEANUP_FREE struct event *heap = malloc ((n + 1) * sizeof *heap);
  size_t nheap = 0, alloc = 0, nchunks;
  uint64_t p = 0;
  int32_t last = INT32_MIN;

  memset (ix, 0, sizeof *ix);
  ix->npages = npages;
  if (holding == NULL || heap == NULL)
    return -1;
  assert (npages > 0);

  /* Every map's first change after page 0. */
  for (size_t k = 0; k < n; ++k) {
    bool set = sbitmap_test (maps[k], 0);
    uint64_t next = set ? sbitmap_find_next_clear (maps[k], 0)
      : sbitmap_find_next_set (maps[k], 0);

    assert (maps[k]->nbits == npages);
    if (set)
      holding[k / 64] |= UINT64_C (1) << (k % 64);
    if (next < npages)
      heap_push (heap, &nheap, (struct event) { next, k });
  }

  /* Sweep: at each page where some map changes, the source is the
   * first map (in search order) that holds the page.
   */
  for (;;) {
    int32_t s = -1;

    for (size_t w = 0; w < nwords; ++w)
      if (holding[w]) {
        s = src[w * 64 + __builtin_ctzll (holding[w])];
        break;
      }
    if (s != last) {
      if (add_run (ix, &alloc, p, s) == -1)
        goto err;
      last = s;
    }
    if (nheap == 0)
      break;
    p = heap[0].page;
    while (nheap > 0 && heap[0].page == p) {
      struct event ev = heap_pop (heap, &nheap);
      const size_t k = ev.k;
      uint64_t next;

      holding[k / 64] ^= UINT64_C (1) << (k % 64);
      next = holding[k / 64] & (UINT64_C (1) << (k % 64))
        ? sbitmap_find_next_clear (maps[k], p)
        : sbitmap_find_next_set (maps[k], p);
      if (next < npages)
        heap_push (heap, &nheap, (struct event) { next, k });
    }
  }
  ix->start[ix->nruns] = npages;
  if (ix->nruns > UINT32_MAX) {
    errno = EFBIG;
    goto err;
  }

  /* The chunk directory: at most 2^19 chunks of at least 64 pages. */
  ix->shift = 6;
  while ((npages >> ix->shift) >= (UINT64_C (1) << 19))
    ix->shift++;
  nchunks = ((npages - 1) >> ix->shift) + 1;
  ix->chunk = malloc ((nchunks + 1) * sizeof *ix->chunk);
  if (ix->chunk == NULL)
    goto err;
  {
    size_t r = 0;
    for (size_t c = 0; c < nchunks; ++c) {
      const uint64_t first = (uint64_t) c << ix->shift;
      while (ix->start[r + 1] <= first)
        r++;
      ix->chunk[c] = r;
    }
    ix->chunk[nchunks] = ix->nruns - 1;
  }
  return 0;

 err:
  {
    int e = errno;
    sr_index_free (ix);
    errno = e;
  }
  return -1;
}

int
sr_view_index (const struct storeread *s, size_t ci, struct sr_index *ix)
{
  size_t lo, hi, n;
  bool ascending;
  CLEANUP_FREE const struct sbitmap **maps = NULL;
  CLEANUP_FREE int32_t *src = NULL;

  sr_snapshot_view (&s->m, ci, &lo, &hi, &ascending);
  n = hi - lo;
  maps = malloc ((n + 1) * sizeof *maps);
  src = malloc ((n + 1) * sizeof *src);
  if (maps == NULL || src == NULL)
    return -1;
  for (size_t k = 0; k < n; ++k) {
    size_t i = ascending ? lo + k : hi - 1 - k;
    maps[k] = &s->layers[i].map;
    src[k] = i;
  }
  return sr_index_build (n, maps, src, s->npages, ix);
}

void
sr_index_free (struct sr_index *ix)
{
  free (ix->start);
  free (ix->src);
  free (ix->chunk);
  memset (ix, 0, sizeof *ix);
}

/* ---- Data ---- */

uint64_t
sr_data_run (int fd, uint64_t offset, uint64_t end, bool *data)
{
  off_t d = lseek (fd, offset, SEEK_DATA), h;

  if (d == -1) {
    if (errno == ENXIO) {       /* a hole up to the end of the file */
      *data = false;
      return end;
    }
    *data = true;               /* no SEEK_DATA here */
    return end;
  }
  if ((uint64_t) d > offset) {
    *data = false;
    return MIN (end, (uint64_t) d);
  }
  *data = true;
  h = lseek (fd, offset, SEEK_HOLE);
  if (h == -1 || (uint64_t) h <= offset)
    return end;
  return MIN (end, (uint64_t) h);
}
