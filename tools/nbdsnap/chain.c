/* nbdsnap: backup chains, written by "backup --to DIR", listed by
 * "chain", trimmed by "consolidate" and "discard".
 *
 * Notes on the design
 * -------------------
 *
 * A backup chain is a store (docs/store-format.md) in redirect-on-write
 * terms, so that one reader serves both (the snapstore plugin) and one
 * implementation merges both (the filter's delete):
 *
 * - each backup is a restore point: a snapshot checkpoint;
 * - each backup's data is a layer: the first (full) backup's layer
 *   holds every page, zeros as holes, and the origin is "retired", so
 *   the chain needs nothing outside its directory; an incremental
 *   backup's layer holds the pages of the blocks that changed;
 * - a snapshot names the first layer not in its view, so each restore
 *   point names the next one's layer, and the newest names an empty
 *   top layer (the "live" layer of a row store, where nothing is ever
 *   written);
 * - a restore point's dirty map holds the blocks changed between it and
 *   the next one (the blocks of the next layer), so dirty/FROM/TO
 *   exports work between any two;
 * - a chain can also start over an existing full backup FILE (--base):
 *   then the oldest restore point is FILE itself, the store's origin
 *   (origin-path, origin-file and origin-sample record it), and its view
 *   has no layer.
 *
 * Writing an increment, crash-safely: every file is new (ids from
 * next-id, created O_EXCL); the data and maps are synced and sealed;
 * one atomic manifest save makes the new restore point and drops the
 * old empty top layer and the previous point's old dirty map (replaced
 * by one with the changed blocks); only then are the dropped files
 * deleted.  A crash before the save leaves files with ids at or above
 * the manifest's next-id, which no manifest ever named: the next backup
 * deletes them.  Failures remove the files made so far.
 *
 * A writer holds DIR/lock exclusively, as the filter does, so a backup
 * never runs beside a server or another writer.
 */
#include <config.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cleanup.h"
#include "manifest.h"
#include "mapfile.h"
#include "sbitmap.h"
#include "storefiles.h"
#include "storeread.h"
#include "util.h"
#include "nbdsnap.h"

/* The block size of new chains: the filter's default. */
#define CHAIN_BLOCK_SIZE 65536

struct chain {
  char *dir;                    /* absolute */
  int lock_fd;
  struct manifest m;            /* as loaded, or new */
  bool fresh;                   /* no manifest: the first backup */
  bool full;                    /* a full backup: every page */
  const char *name;             /* the new restore point */
  const char *since;            /* the point it builds on, or NULL */
  uint64_t size, npages, nblocks;
  uint32_t block_size;

  uint64_t layer_id;            /* the new layer, written by the copy */
  int data_fd;
  struct sbitmap pages;         /* the pages it holds */
  uint64_t ids[4];              /* every id taken, for cleaning up */
  size_t nids;

  /* The base of a chain started over a full backup (--base). */
  char *base_path;
  struct stat base_st;
};

bool
is_chain_target (const char *to)
{
  struct stat st;
  size_t len = strlen (to);

  return (len > 0 && to[len - 1] == '/') ||
    (stat (to, &st) == 0 && S_ISDIR (st.st_mode));
}

/* ---- Locking and loading ---- */

/* Lock dir exclusively (as a server does).  Return the descriptor, or
 * -1 after an error.
 */
static int
lock_exclusive (const char *dir)
{
  CLEANUP_FREE char *path = NULL;
  int fd;

  if (asprintf (&path, "%s/lock", dir) == -1) {
    snap_error ("asprintf: %m");
    return -1;
  }
  fd = open (path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd == -1) {
    snap_error ("%s: %m", path);
    return -1;
  }
  if (flock (fd, LOCK_EX | LOCK_NB) == -1) {
    if (errno == EWOULDBLOCK)
      snap_error ("%s: the store is in use (a server or another nbdsnap "
                  "holds its lock)", dir);
    else
      snap_error ("%s: flock: %m", path);
    close (fd);
    return -1;
  }
  return fd;
}

/* Whether dir holds nothing but (maybe) a lock file. */
static int
dir_is_empty (const char *dir, bool *empty)
{
  DIR *d = opendir (dir);
  struct dirent *e;

  if (d == NULL) {
    snap_error ("%s: %m", dir);
    return -1;
  }
  *empty = true;
  while ((e = readdir (d)) != NULL)
    if (strcmp (e->d_name, ".") && strcmp (e->d_name, "..") &&
        strcmp (e->d_name, "lock"))
      *empty = false;
  closedir (d);
  return 0;
}

/* Delete the files of ids at or above next-id: left by a backup that
 * was interrupted before its manifest save (no manifest ever named
 * them).  Only regular files are deleted.
 */
static void
remove_leftovers (struct chain *c)
{
  DIR *d = opendir (c->dir);
  struct dirent *e;

  if (d == NULL)
    return;
  while ((e = readdir (d)) != NULL) {
    uint64_t id;
    struct stat st;
    enum store_file kind = store_file_classify (e->d_name, &id);

    if (!store_file_has_id (kind) || id < c->m.next_id ||
        fstatat (dirfd (d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == -1 ||
        !S_ISREG (st.st_mode))
      continue;
    if (unlinkat (dirfd (d), e->d_name, 0) == 0)
      fprintf (stderr, "nbdsnap: %s/%s: removed, left by an interrupted "
               "backup\n", c->dir, e->d_name);
  }
  closedir (d);
}

/* The index of the newest checkpoint, which must be a snapshot. */
static ssize_t
newest_point (const struct manifest *m)
{
  if (m->nckpts == 0 || m->ckpts[m->nckpts - 1].kind != CKPT_SNAPSHOT)
    return -1;
  return m->nckpts - 1;
}

/* Check that the loaded manifest is a chain a backup can extend: the
 * newest checkpoint is snapshot since, naming the newest layer, which
 * is empty.
 */
static int
check_extendable (struct chain *c)
{
  ssize_t n = newest_point (&c->m);
  struct storeread s;
  size_t top;

  if (c->m.job.kind != JOB_NONE) {
    snap_error ("backup: %s: a job (%s of '%s') was interrupted: start the "
                "filter on the store to finish it first", c->dir,
                c->m.job.kind == JOB_DELETE ? "delete" : "revert",
                c->m.job.name);
    return -1;
  }
  if (c->m.mode != MODE_ROW || n < 0 || c->m.nlayers == 0 ||
      c->m.ckpts[n].layer != c->m.layers[c->m.nlayers - 1]) {
    snap_error ("backup: %s: not a backup chain (its newest checkpoint is "
                "not a snapshot of a row store naming its newest layer)",
                c->dir);
    return -1;
  }
  if (strcmp (c->m.ckpts[n].name, c->since) != 0) {
    snap_error ("backup: --since %s: the newest restore point of %s is "
                "'%s': an incremental backup must build on it",
                c->since, c->dir, c->m.ckpts[n].name);
    return -1;
  }
  if (c->m.size != c->size) {
    snap_error ("backup: %s: the export is %" PRIu64 " bytes, the chain's "
                "volume %" PRIu64, c->dir, c->size, c->m.size);
    return -1;
  }
  /* The top layer must be empty: nothing is written after a point. */
  if (sr_load (&s, c->dir) == -1)
    return -1;
  top = s.nlayers - 1;
  if (sr_open_layer (&s, top) == -1) {
    sr_close (&s);
    return -1;
  }
  if (sbitmap_count (&s.layers[top].map) != 0) {
    snap_error ("backup: %s: its newest layer holds data written after "
                "'%s' (the store was used as a live volume): not a backup "
                "chain", c->dir, c->since);
    sr_close (&s);
    return -1;
  }
  sr_close (&s);
  return 0;
}

/* ---- Files ---- */

static char *
path_of (struct chain *c, enum store_file kind, uint64_t id)
{
  char *p = store_file_path (c->dir, kind, id);

  if (p == NULL)
    snap_error ("asprintf: %m");
  return p;
}

static uint64_t
take_id (struct chain *c)
{
  uint64_t id = c->m.next_id++;

  c->ids[c->nids++] = id;
  return id;
}

/* Create layer id's data file, empty, of the volume's size.  Return
 * the descriptor or -1.
 */
static int
create_data (struct chain *c, uint64_t id)
{
  CLEANUP_FREE char *path = path_of (c, STORE_FILE_LAYER_DATA, id);
  int fd;

  if (path == NULL)
    return -1;
  fd = open (path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd == -1) {
    snap_error ("%s: %m", path);
    return -1;
  }
  if (ftruncate (fd, c->size) == -1) {
    snap_error ("%s: ftruncate: %m", path);
    close (fd);
    return -1;
  }
  return fd;
}

/* Write bm into the new map file path (kind, granularity), synced and
 * sealed (with extra for a layer).  Return 0 or -1.
 */
static int
write_map (const char *path, uint32_t kind, uint32_t granularity,
           struct sbitmap *bm, const uint64_t extra[2])
{
  struct mapfile_batch batch = { 0 };
  struct mapfile_seal seal;
  int fd, r = -1;

  fd = mapfile_create (path, kind, granularity, bm->nbits);
  if (fd == -1)
    return -1;
  /* The file is new: its pages are holes.  Write the pages that hold
   * bits, not the absent ones (a map of 1 TiB of pages is 32 MiB).
   */
  for (size_t p = 0; p < bm->npages; ++p)
    if (sbitmap_page_present (bm, p))
      sbitmap_mark_dirty (bm, p);
  if (mapfile_collect (bm, &batch) == -1 || mapfile_write (fd, &batch) == -1) {
    snap_error ("%s: write: %m", path);
    goto out;
  }
  mapfile_seal_compute (bm, &seal);
  seal.extra[0] = extra ? extra[0] : 0;
  seal.extra[1] = extra ? extra[1] : 0;
  if (mapfile_set_seal (fd, &seal) == -1) {
    snap_error ("%s: seal: %m", path);
    goto out;
  }
  r = 0;
 out:
  mapfile_batch_free (&batch);
  close (fd);
  return r;
}

/* Finish layer id whose data is in fd and pages in bm: sync the data,
 * then write and seal its map.
 */
static int
finish_layer (struct chain *c, uint64_t id, int fd, struct sbitmap *bm)
{
  CLEANUP_FREE char *data = path_of (c, STORE_FILE_LAYER_DATA, id);
  CLEANUP_FREE char *map = path_of (c, STORE_FILE_LAYER_MAP, id);
  uint64_t extra[2];

  if (data == NULL || map == NULL)
    return -1;
  if (fdatasync (fd) == -1) {
    snap_error ("%s: fdatasync: %m", data);
    return -1;
  }
  if (store_layer_holes (fd, bm, c->size, &extra[0], &extra[1]) == -1) {
    snap_error ("%s: looking for holes: %m", data);
    return -1;
  }
  return write_map (map, MAPFILE_KIND_LAYER, STORE_PAGE_SIZE, bm, extra);
}

/* Remove the files of every id this backup took. */
static void
remove_new_files (struct chain *c)
{
  static const enum store_file kinds[] = {
    STORE_FILE_LAYER_DATA, STORE_FILE_LAYER_MAP, STORE_FILE_DIRTY_MAP
  };

  for (size_t i = 0; i < c->nids; ++i)
    for (size_t k = 0; k < 3; ++k) {
      CLEANUP_FREE char *p = store_file_path (c->dir, kinds[k], c->ids[i]);
      if (p)
        unlink (p);
    }
  c->nids = 0;
}

/* ---- The base of a chain started over a full backup ---- */

static int
base_read (void *opaque, void *buf, uint32_t len, uint64_t offset)
{
  return full_pread (*(int *) opaque, buf, len, offset);
}

/* Record base (a raw file, the backup of c->since) as the origin. */
static int
record_base (struct chain *c, const char *base)
{
  CLEANUP_CLOSE int fd = -1;
  uint64_t hash;

  c->base_path = realpath (base, NULL);
  if (c->base_path == NULL) {
    snap_error ("backup: --base %s: %m", base);
    return -1;
  }
  fd = open (c->base_path, O_RDONLY | O_CLOEXEC);
  if (fd == -1 || fstat (fd, &c->base_st) == -1) {
    snap_error ("backup: --base %s: %m", base);
    return -1;
  }
  if (!S_ISREG (c->base_st.st_mode) ||
      (uint64_t) c->base_st.st_size != c->size) {
    snap_error ("backup: --base %s: %s %" PRIu64 " bytes, expected a file "
                "of %" PRIu64 " (the backup of '%s')", base,
                S_ISREG (c->base_st.st_mode) ? "size" : "not a file of",
                (uint64_t) c->base_st.st_size, c->size, c->since);
    return -1;
  }
  if (strlen (c->base_path) >= sizeof c->m.origin_path ||
      strpbrk (c->base_path, " \t\n\r\v\f")) {
    snap_error ("backup: --base %s: the path must be shorter than 4096 "
                "bytes and hold no white space", c->base_path);
    return -1;
  }
  if (store_origin_sample (c->size, base_read, &fd, &hash) == -1) {
    snap_error ("backup: --base %s: read: %m", base);
    return -1;
  }
  strcpy (c->m.origin_path, c->base_path);
  c->m.has_origin_file = true;
  c->m.origin_dev = c->base_st.st_dev;
  c->m.origin_ino = c->base_st.st_ino;
  c->m.has_sample = true;
  c->m.origin_sample = hash;
  return 0;
}

/* ---- The backup ---- */

struct chain *
chain_begin (const char *dir, uint64_t size, const char *since,
             const char *name, const char *base)
{
  struct chain *c = calloc (1, sizeof *c);
  bool empty;
  int r;

  if (c == NULL) {
    snap_error ("calloc: %m");
    return NULL;
  }
  c->lock_fd = c->data_fd = -1;
  c->name = name;
  c->since = since;
  c->size = size;
  if (size == 0) {
    snap_error ("backup: the export is empty");
    goto err;
  }
  if (mkdir_durable (dir, 0700) == -1) {
    snap_error ("backup: %s: %m", dir);
    goto err;
  }
  c->dir = realpath (dir, NULL);
  if (c->dir == NULL) {
    snap_error ("backup: %s: %m", dir);
    goto err;
  }
  c->lock_fd = lock_exclusive (c->dir);
  if (c->lock_fd == -1)
    goto err;
  r = manifest_load (c->dir, &c->m);
  if (r == -1)
    goto err;
  c->fresh = r == 0;

  if (c->fresh) {
    if (dir_is_empty (c->dir, &empty) == -1)
      goto err;
    if (!empty) {
      snap_error ("backup: %s: the directory holds files but no manifest: "
                  "not a backup chain (a chain starts in an empty or a new "
                  "directory)", c->dir);
      goto err;
    }
    if (since && base == NULL) {
      snap_error ("backup: %s: the chain is empty: its first backup is a "
                  "full one (no --since), or give --base FILE, the full "
                  "backup of '%s' to build on", c->dir, since);
      goto err;
    }
    c->m.mode = MODE_ROW;
    c->m.block_size = CHAIN_BLOCK_SIZE;
    c->m.size = size;
    c->m.next_id = 1;
    c->m.origin_retired = since == NULL;
    if (base && record_base (c, base) == -1)
      goto err;
  }
  else {
    if (base) {
      snap_error ("backup: --base: %s already holds a chain (--base starts "
                  "one)", c->dir);
      goto err;
    }
    if (since == NULL) {
      snap_error ("backup: %s already holds a chain: back up only what "
                  "changed, with --since %s", c->dir,
                  newest_point (&c->m) >= 0
                  ? c->m.ckpts[newest_point (&c->m)].name : "NEWEST");
      goto err;
    }
    if (check_extendable (c) == -1)
      goto err;
    remove_leftovers (c);
  }
  if (manifest_find_checkpoint (&c->m, name) >= 0 ||
      (since && strcmp (since, name) == 0)) {
    snap_error ("backup: %s already has a restore point named '%s' (give "
                "another with --name)", c->dir, name);
    goto err;
  }
  c->full = since == NULL;
  c->block_size = c->m.block_size;
  c->npages = (size + STORE_PAGE_SIZE - 1) >> STORE_PAGE_SHIFT;
  c->nblocks = (size + c->block_size - 1) / c->block_size;
  if (sbitmap_init (&c->pages, c->npages) == -1) {
    snap_error ("sbitmap_init: %m");
    goto err;
  }
  c->layer_id = take_id (c);
  c->data_fd = create_data (c, c->layer_id);
  if (c->data_fd == -1)
    goto err;
  return c;

 err:
  chain_abort (c);
  return NULL;
}

int
chain_fd (const struct chain *c)
{
  return c->data_fd;
}

int
chain_record (struct chain *c, uint64_t offset, uint64_t len)
{
  const uint64_t end = offset + len;

  /* A layer holds whole pages: a partial one would need the rest of the
   * page from the restore point below, which the copy does not read.
   */
  if (!IS_ALIGNED (offset, STORE_PAGE_SIZE) ||
      (!IS_ALIGNED (end, STORE_PAGE_SIZE) && end != c->size)) {
    snap_error ("backup: the server reports a changed extent [%" PRIu64
                ", %" PRIu64 ") that is not aligned to %d bytes: a chain "
                "holds whole pages", offset, end, STORE_PAGE_SIZE);
    return -1;
  }
  if (sbitmap_set_range (&c->pages, offset >> STORE_PAGE_SHIFT,
                         ((end + STORE_PAGE_SIZE - 1) >> STORE_PAGE_SHIFT)
                         - (offset >> STORE_PAGE_SHIFT)) == -1) {
    snap_error ("sbitmap_set_range: %m");
    return -1;
  }
  return 0;
}

/* The blocks of the pages in bm, ORed into blocks. */
static int
pages_to_blocks (const struct sbitmap *bm, uint32_t block_size,
                 struct sbitmap *blocks)
{
  const uint64_t ppb = block_size >> STORE_PAGE_SHIFT;
  uint64_t p = sbitmap_find_next_set (bm, 0);

  while (p < bm->nbits) {
    uint64_t e = sbitmap_find_next_clear (bm, p);
    uint64_t b = p / ppb, be = (e - 1) / ppb + 1;
    if (sbitmap_set_range (blocks, b, be - b) == -1)
      return -1;
    p = sbitmap_find_next_set (bm, e);
  }
  return 0;
}

/* Create a dirty map of id holding the blocks in bm (NULL: none). */
static int
create_dirty (struct chain *c, uint64_t id, struct sbitmap *bm)
{
  CLEANUP_FREE char *path = path_of (c, STORE_FILE_DIRTY_MAP, id);
  struct sbitmap empty;
  int r;

  if (path == NULL)
    return -1;
  if (bm)
    return write_map (path, MAPFILE_KIND_DIRTY, c->block_size, bm, NULL);
  if (sbitmap_init (&empty, c->nblocks) == -1) {
    snap_error ("sbitmap_init: %m");
    return -1;
  }
  r = write_map (path, MAPFILE_KIND_DIRTY, c->block_size, &empty, NULL);
  sbitmap_free (&empty);
  return r;
}

/* Create the empty top layer id. */
static int
create_top (struct chain *c, uint64_t id)
{
  CLEANUP_FREE char *map = path_of (c, STORE_FILE_LAYER_MAP, id);
  struct sbitmap empty;
  int fd, r = -1;

  if (map == NULL)
    return -1;
  fd = create_data (c, id);
  if (fd == -1)
    return -1;
  if (sbitmap_init (&empty, c->npages) == -1) {
    snap_error ("sbitmap_init: %m");
    goto out;
  }
  r = finish_layer (c, id, fd, &empty);
  sbitmap_free (&empty);
 out:
  close (fd);
  return r;
}

/* Load the dirty map of checkpoint i (to OR its bits into the new). */
static int
load_dirty (struct chain *c, size_t i, struct sbitmap *bm)
{
  CLEANUP_FREE char *path = path_of (c, STORE_FILE_DIRTY_MAP,
                                     c->m.ckpts[i].map);
  struct mapfile_seal seal;
  bool sealed;
  int fd;

  if (path == NULL)
    return -1;
  fd = mapfile_open_sealed (path, MAPFILE_KIND_DIRTY, c->block_size,
                            c->nblocks, 0, bm, &sealed, &seal);
  if (fd == -1)
    return -1;
  close (fd);
  return 0;
}

/* Delete the files of a dropped id (regular files and symlinks only),
 * then forget the drop.
 */
static void
delete_dropped (struct chain *c)
{
  static const enum store_file kinds[] = {
    STORE_FILE_LAYER_DATA, STORE_FILE_LAYER_MAP, STORE_FILE_DIRTY_MAP
  };
  size_t n = 0;

  for (size_t i = 0; i < c->m.ndrops; ++i) {
    bool gone = true;
    for (size_t k = 0; k < 3; ++k) {
      CLEANUP_FREE char *p = store_file_path (c->dir, kinds[k],
                                              c->m.drops[i]);
      struct stat st;
      if (p == NULL || lstat (p, &st) == -1)
        continue;
      if ((S_ISREG (st.st_mode) && st.st_nlink == 1) || S_ISLNK (st.st_mode))
        unlink (p);
      if (lstat (p, &st) == 0)
        gone = false;
    }
    if (!gone)
      c->m.drops[n++] = c->m.drops[i];
  }
  if (n != c->m.ndrops) {
    c->m.ndrops = n;
    manifest_save (c->dir, &c->m);      /* best effort: drops are hints */
  }
}

int
chain_commit (struct chain *c)
{
  struct manifest_checkpoint point = { .kind = CKPT_SNAPSHOT };
  struct sbitmap blocks = { 0 };
  const ssize_t prev = c->fresh ? -1 : newest_point (&c->m);
  uint64_t top, map_new, map_prev = 0;
  int r = -1;

  if (c->full &&
      sbitmap_set_range (&c->pages, 0, c->npages) == -1) {
    snap_error ("sbitmap_set_range: %m");
    return -1;
  }
  if (finish_layer (c, c->layer_id, c->data_fd, &c->pages) == -1)
    return -1;
  top = take_id (c);
  if (create_top (c, top) == -1)
    return -1;

  /* The point this backup builds on gets the changed blocks. */
  if (!c->full) {
    if (prev >= 0 ? load_dirty (c, prev, &blocks) == -1
        : sbitmap_init (&blocks, c->nblocks) == -1)
      goto out;
    if (pages_to_blocks (&c->pages, c->block_size, &blocks) == -1) {
      snap_error ("sbitmap_set_range: %m");
      goto out;
    }
    map_prev = take_id (c);
    if (create_dirty (c, map_prev, &blocks) == -1)
      goto out;
  }
  map_new = take_id (c);
  if (create_dirty (c, map_new, NULL) == -1)
    goto out;
  if (fsync_dir (c->dir) == -1) {
    snap_error ("%s: fsync: %m", c->dir);
    goto out;
  }

  /* One save makes the new point. */
  if (prev >= 0) {
    /* The old top layer and the previous point's old map go. */
    uint64_t old_top = c->m.layers[c->m.nlayers - 1];
    if (manifest_add_drop (&c->m, old_top) == -1 ||
        manifest_add_drop (&c->m, c->m.ckpts[prev].map) == -1)
      goto nomem;
    manifest_remove_layer (&c->m, old_top);
    c->m.ckpts[prev].layer = c->layer_id;
    c->m.ckpts[prev].map = map_prev;
  }
  else if (!c->full) {
    /* A chain over --base: the base is its first restore point. */
    struct manifest_checkpoint first = {
      .kind = CKPT_SNAPSHOT, .created = c->base_st.st_mtime,
      .layer = c->layer_id, .map = map_prev,
    };
    strcpy (first.name, c->since);
    if (manifest_add_checkpoint (&c->m, &first) == -1)
      goto nomem;
  }
  strcpy (point.name, c->name);
  point.created = time (NULL);
  point.layer = top;
  point.map = map_new;
  if (manifest_add_layer (&c->m, c->layer_id) == -1 ||
      manifest_add_layer (&c->m, top) == -1 ||
      manifest_add_checkpoint (&c->m, &point) == -1)
    goto nomem;
  if (manifest_save (c->dir, &c->m) == -1) {
    snap_error ("%s/%s: save: %m", c->dir, MANIFEST_NAME);
    goto out;
  }
  c->nids = 0;                  /* the files are the chain's now */
  delete_dropped (c);
  r = 0;
  goto out;

 nomem:
  snap_error ("realloc: %m");
 out:
  sbitmap_free (&blocks);
  return r;
}

void
chain_abort (struct chain *c)
{
  if (c == NULL)
    return;
  if (c->data_fd >= 0)
    close (c->data_fd);
  c->data_fd = -1;
  remove_new_files (c);
  sbitmap_free (&c->pages);
  manifest_free (&c->m);
  if (c->lock_fd >= 0)
    close (c->lock_fd);
  free (c->base_path);
  free (c->dir);
  free (c);
}

void
chain_end (struct chain *c)
{
  chain_abort (c);              /* after a commit, nothing to remove */
}

const char *
chain_dir (const struct chain *c)
{
  return c->dir;
}

/* ---- Listing ---- */

/* Blocks changed between checkpoints from and to (exclusive). */
static const struct sbitmap *
map_of (size_t i, void *opaque)
{
  const struct storeread *s = ((void **) opaque)[0];
  const size_t from = *(size_t *) ((void **) opaque)[1];

  return &s->maps[from + i];
}

static uint64_t
changed_blocks (const struct storeread *s, size_t from, size_t to)
{
  void *opaque[2] = { (void *) s, &from };
  uint64_t b = 0, n = 0;

  while (from < to && b < s->nblocks) {
    bool changed;
    uint64_t end = sbitmap_union_run (to - from, map_of, opaque, b,
                                      s->nblocks, &changed);
    if (changed)
      n += end - b;
    b = end;
  }
  return n;
}

static uint64_t
file_disk_bytes (const char *dir, enum store_file kind, uint64_t id)
{
  CLEANUP_FREE char *p = store_file_path (dir, kind, id);
  struct stat st;

  if (p == NULL || stat (p, &st) == -1)
    return 0;
  return (uint64_t) st.st_blocks * 512;
}

/* The layers [*lo, *hi) that snapshot i adds to the one before it: in
 * a row store, the layers of its view that the previous snapshot's
 * view lacks (its increment); in a cbw store, its own layer.
 */
static void
own_layers (const struct manifest *m, size_t i, size_t *lo, size_t *hi)
{
  const size_t d = sr_snapshot_depth (m, &m->ckpts[i]);
  size_t prev = 0;

  if (m->mode == MODE_CBW) {
    *lo = d;
    *hi = d < m->nlayers ? d + 1 : d;
    return;
  }
  for (size_t k = i; k-- > 0; )
    if (m->ckpts[k].kind == CKPT_SNAPSHOT) {
      prev = sr_snapshot_depth (m, &m->ckpts[k]);
      break;
    }
  *lo = prev;
  *hi = d;
}

int
run_chain (const struct command *cmd, char **operands, FILE *out)
{
  struct storeread s;
  struct jw w;
  char h1[32], h2[32], h3[32], when[64];
  int r = -1;

  if (sr_open (&s, operands[0], true) == -1) {
    if (errno == EBUSY)
      snap_error ("%s: %s: the store is in use by a running server: ask it "
                  "(nbdsnap -c %s list)", cmd->name, operands[0],
                  operands[0]);
    sr_close (&s);
    return -1;
  }
  if (json_output) {
    jw_init (&w);
    jw_begin_object (&w);
    jw_key (&w, "store");
    jw_string (&w, s.dir);
    jw_key (&w, "mode");
    jw_string (&w, s.m.mode == MODE_CBW ? "cbw" : "row");
    jw_key (&w, "block_size");
    jw_uint (&w, s.block_size);
    jw_key (&w, "size");
    jw_uint (&w, s.size);
    jw_key (&w, "origin");
    if (s.m.origin_retired || s.m.origin_path[0] == '\0')
      jw_null (&w);
    else
      jw_string (&w, s.m.origin_path);
    jw_key (&w, "origin_retired");
    jw_bool (&w, s.m.origin_retired);
    jw_key (&w, "points");
    jw_begin_array (&w);
  }
  else {
    fprintf (out, "%s: %s store of %s (%" PRIu64 " bytes), blocks of %s; "
             "origin: %s\n", s.dir, s.m.mode == MODE_CBW ? "cbw" : "row",
             human_size (h1, sizeof h1, s.size), s.size,
             human_size (h2, sizeof h2, s.block_size),
             s.m.origin_retired ? "none (the oldest layer holds every page)"
             : s.m.origin_path[0] ? s.m.origin_path : "(not recorded)");
    fprintf (out, "%-20s %-8s %-20s %-24s %s\n", "NAME", "KIND", "CREATED",
             "CHANGED SINCE PREVIOUS", "DATA (DISK)");
  }
  for (size_t i = 0; i < s.m.nckpts; ++i) {
    const struct manifest_checkpoint *c = &s.m.ckpts[i];
    const bool snap = c->kind == CKPT_SNAPSHOT;
    uint64_t changed = i > 0 ? changed_blocks (&s, i - 1, i) : 0;
    uint64_t changed_bytes = MIN (changed * s.block_size, s.size);
    uint64_t data = 0, disk = 0;
    size_t lo = 0, hi = 0;

    if (snap)
      own_layers (&s.m, i, &lo, &hi);
    for (size_t k = lo; k < hi; ++k) {
      data += sbitmap_count (&s.layers[k].map) * STORE_PAGE_SIZE;
      disk += file_disk_bytes (s.dir, STORE_FILE_LAYER_DATA, s.m.layers[k])
        + file_disk_bytes (s.dir, STORE_FILE_LAYER_MAP, s.m.layers[k]);
    }
    disk += file_disk_bytes (s.dir, STORE_FILE_DIRTY_MAP, c->map);
    data = MIN (data, s.size);
    iso_time (when, sizeof when, c->created);
    if (json_output) {
      CLEANUP_FREE char *export = NULL;

      jw_begin_object (&w);
      jw_key (&w, "name");
      jw_string (&w, c->name);
      jw_key (&w, "kind");
      jw_string (&w, snap ? "snapshot" : "bitmap");
      jw_key (&w, "created");
      jw_int (&w, c->created);
      jw_key (&w, "created_iso");
      jw_string (&w, when);
      jw_key (&w, "export");
      if (sr_readable (&s.m, i, NULL) &&
          asprintf (&export, "snap/%s", c->name) > 0)
        jw_string (&w, export);
      else
        jw_null (&w);
      jw_key (&w, "changed_blocks");
      jw_uint (&w, changed);
      jw_key (&w, "changed_bytes");
      jw_uint (&w, changed_bytes);
      jw_key (&w, "data_bytes");
      jw_uint (&w, data);
      jw_key (&w, "disk_bytes");
      jw_uint (&w, disk);
      jw_end_object (&w);
    }
    else {
      char changes[64];

      if (i == 0)
        snprintf (changes, sizeof changes, "%s",
                  !snap ? "-" : s.m.origin_retired ? "(full)" : "(base)");
      else
        snprintf (changes, sizeof changes, "%" PRIu64 " blocks (%s)",
                  changed, human_size (h1, sizeof h1, changed_bytes));
      fprintf (out, "%-20s %-8s %-20s %-24s %s (%s)\n", c->name,
               snap ? "snapshot" : "bitmap", when, changes,
               human_size (h2, sizeof h2, data),
               human_size (h3, sizeof h3, disk));
    }
  }
  if (json_output) {
    char *text;

    jw_end_array (&w);
    jw_end_object (&w);
    text = jw_finish (&w);
    if (text == NULL) {
      snap_error ("%s: out of memory", cmd->name);
      goto out;
    }
    fprintf (out, "%s\n", text);
    free (text);
  }
  r = 0;
 out:
  sr_close (&s);
  return r;
}

/* ---- Consolidating: the filter's merge, offline ---- */

/* Wait for nbdkit pid to have written pidfile (its control socket then
 * takes requests) or to exit.  Return 0 when ready, -1 after an error.
 */
static int
wait_ready (pid_t pid, const char *pidfile)
{
  for (int i = 0; i < 6000; ++i) {
    struct stat st;
    int status;

    if (waitpid (pid, &status, WNOHANG) == pid) {
      snap_error ("nbdkit with the snapshot filter exited during start-up "
                  "(status %d): see its messages above",
                  WIFEXITED (status) ? WEXITSTATUS (status) : -1);
      return -1;
    }
    if (stat (pidfile, &st) == 0 && st.st_size > 0)
      return 0;
    usleep (10000);
  }
  snap_error ("nbdkit with the snapshot filter did not start within 60 s");
  kill (pid, SIGKILL);
  waitpid (pid, NULL, 0);
  return -1;
}

/* Stop nbdkit pid cleanly (it seals the store).  Return 0 or -1. */
static int
stop_nbdkit (pid_t pid)
{
  int status;

  kill (pid, SIGTERM);
  if (waitpid (pid, &status, 0) == -1) {
    snap_error ("waitpid: %m");
    return -1;
  }
  if (!WIFEXITED (status) || WEXITSTATUS (status) != 0) {
    snap_error ("nbdkit with the snapshot filter did not stop cleanly "
                "(status 0x%x)", status);
    return -1;
  }
  return 0;
}

int
run_consolidate (const struct command *cmd, char **operands, FILE *out)
{
  const char *name = operands[1];
  const char *filter = getenv ("NBDSNAP_FILTER");
  const char *nbdkit = getenv ("NBDSNAP_NBDKIT");
  CLEANUP_FREE char *tmpdir = NULL;
  CLEANUP_FREE char *sock = NULL, *pidfile = NULL, *filter_opt = NULL;
  CLEANUP_FREE char *store_opt = NULL, *size_opt = NULL, *file_opt = NULL;
  const char *why;
  struct manifest m;
  ssize_t ci;
  const char *argv[16];
  size_t argc = 0;
  pid_t pid;
  int r = -1, lr;

  why = snap_name_invalid (name);
  if (why) {
    snap_error ("%s: invalid name '%s': %s", cmd->name, name, why);
    return -1;
  }
  lr = manifest_load (operands[0], &m);
  if (lr == 0)
    snap_error ("%s: %s: no manifest: not a store", cmd->name, operands[0]);
  if (lr != 1)
    return -1;
  ci = manifest_find_checkpoint (&m, name);
  if (ci < 0 || m.ckpts[ci].kind != CKPT_SNAPSHOT) {
    snap_error ("%s: %s has no restore point (snapshot) named '%s'",
                cmd->name, operands[0], name);
    goto out;
  }
  {
    bool newer = false;
    for (size_t i = ci + 1; i < m.nckpts; ++i)
      newer |= m.ckpts[i].kind == CKPT_SNAPSHOT;
    if (!newer) {
      snap_error ("%s: '%s' is the newest restore point: there is no newer "
                  "one to merge its data into (discard drops it with its "
                  "data)", cmd->name, name);
      goto out;
    }
  }
  if (m.job.kind != JOB_NONE) {
    snap_error ("%s: %s: a job (%s of '%s') was interrupted: start the "
                "filter on the store to finish it first", cmd->name,
                operands[0], m.job.kind == JOB_DELETE ? "delete" : "revert",
                m.job.name);
    goto out;
  }
  if (!m.origin_retired && m.origin_path[0] == '\0') {
    snap_error ("%s: %s does not record its origin's path: start nbdkit "
                "with the snapshot filter over its origin and use "
                "nbdsnap -c %s delete %s", cmd->name, operands[0],
                operands[0], name);
    goto out;
  }

  /* nbdkit with the filter on the store: over the origin's file, or
   * over a null origin of the right size when the origin is retired
   * (nothing reads it then).  Its control socket is the store's.
   */
  tmpdir = strdup ("/tmp/nbdsnap.XXXXXX");
  if (tmpdir == NULL || mkdtemp (tmpdir) == NULL) {
    snap_error ("mkdtemp: %m");
    goto out;
  }
  if (asprintf (&sock, "%s/sock", tmpdir) == -1 ||
      asprintf (&pidfile, "%s/pid", tmpdir) == -1 ||
      asprintf (&filter_opt, "--filter=%s", filter ? filter
                : FILTERDIR "/nbdkit-snapshot-filter.so") == -1 ||
      asprintf (&store_opt, "snapshot-store=%s", operands[0]) == -1 ||
      asprintf (&size_opt, "size=%" PRIu64, m.size) == -1 ||
      asprintf (&file_opt, "file=%s", m.origin_path) == -1) {
    snap_error ("asprintf: %m");
    goto cleanup;
  }
  argv[argc++] = nbdkit ? nbdkit : "nbdkit";
  argv[argc++] = "-f";
  argv[argc++] = "-U";
  argv[argc++] = sock;
  argv[argc++] = "-P";
  argv[argc++] = pidfile;
  argv[argc++] = filter_opt;
  if (m.origin_retired) {
    argv[argc++] = "null";
    argv[argc++] = size_opt;
  }
  else {
    argv[argc++] = "file";
    argv[argc++] = file_opt;
  }
  argv[argc++] = store_opt;
  argv[argc++] = "snapshot-job-rate=0";
  argv[argc] = NULL;

  fflush (stderr);
  pid = fork ();
  if (pid == -1) {
    snap_error ("fork: %m");
    goto cleanup;
  }
  if (pid == 0) {
    /* nbdkit's messages go to stderr; our stdout is the result. */
    dup2 (STDERR_FILENO, STDOUT_FILENO);
    execvp (argv[0], (char **) argv);
    fprintf (stderr, "nbdsnap: %s: %s: %m\n", cmd->name, argv[0]);
    _exit (127);
  }
  if (wait_ready (pid, pidfile) == 0) {
    /* The filter's delete, and wait for its job. */
    const char *saved = control;
    control = operands[0];
    job_wait = true;
    r = run_delete (cmd, &operands[1], out);
    control = saved;
    if (stop_nbdkit (pid) == -1)
      r = -1;
  }

 cleanup:
  if (sock)
    unlink (sock);
  if (pidfile)
    unlink (pidfile);
  rmdir (tmpdir);
 out:
  manifest_free (&m);
  return r;
}

/* ---- Discarding the newest restore point ---- */

int
run_discard (const struct command *cmd, char **operands, FILE *out)
{
  const char *name = operands[1];
  struct chain c = { .lock_fd = -1, .data_fd = -1 };
  struct storeread s = { .lock_fd = -1 };
  const char *why = snap_name_invalid (name);
  ssize_t n;
  uint64_t from, to, map_prev;
  size_t removed = 0;
  int r = -1;

  if (why) {
    snap_error ("%s: invalid name '%s': %s", cmd->name, name, why);
    return -1;
  }
  c.dir = realpath (operands[0], NULL);
  if (c.dir == NULL) {
    snap_error ("%s: %s: %m", cmd->name, operands[0]);
    return -1;
  }
  c.lock_fd = lock_exclusive (c.dir);
  if (c.lock_fd == -1)
    goto out;
  if (sr_load (&s, c.dir) == -1)
    goto out;
  n = newest_point (&s.m);
  if (n < 0 || strcmp (s.m.ckpts[n].name, name) != 0) {
    snap_error ("%s: '%s' is not the newest restore point of %s%s%s%s: "
                "only the newest can be discarded (consolidate merges "
                "another into the next)", cmd->name, name, c.dir,
                n >= 0 ? " (that is '" : "", n >= 0 ? s.m.ckpts[n].name : "",
                n >= 0 ? "')" : "");
    goto out;
  }
  if (n == 0 || s.m.ckpts[n - 1].kind != CKPT_SNAPSHOT) {
    snap_error ("%s: '%s' is the only restore point of %s: remove the "
                "directory to discard the chain", cmd->name, name, c.dir);
    goto out;
  }
  if (s.m.job.kind != JOB_NONE || s.m.mode != MODE_ROW ||
      s.m.ckpts[n].layer != s.m.layers[s.nlayers - 1]) {
    snap_error ("%s: %s is not a backup chain at rest (a job is pending, "
                "or it is not a row store whose newest layer follows its "
                "newest snapshot)", cmd->name, c.dir);
    goto out;
  }
  if (sr_open_layer (&s, s.nlayers - 1) == -1)
    goto out;
  if (sbitmap_count (&s.layers[s.nlayers - 1].map) != 0) {
    snap_error ("%s: %s: its newest layer holds data written after '%s' "
                "(a live volume's): not a backup chain", cmd->name, c.dir,
                name);
    goto out;
  }

  /* The layers of name's increment go, and the point before it becomes
   * the newest: it names the empty top layer, and nothing changed since
   * it (a new, empty dirty map).
   */
  c.m = s.m;
  memset (&s.m, 0, sizeof s.m);
  c.size = c.m.size;
  c.block_size = c.m.block_size;
  c.npages = (c.size + STORE_PAGE_SIZE - 1) >> STORE_PAGE_SHIFT;
  c.nblocks = (c.size + c.block_size - 1) / c.block_size;
  from = c.m.ckpts[n - 1].layer;
  to = c.m.ckpts[n].layer;
  map_prev = take_id (&c);
  if (create_dirty (&c, map_prev, NULL) == -1 || fsync_dir (c.dir) == -1)
    goto out;
  for (size_t i = 0; i < c.m.nlayers; )
    if (c.m.layers[i] >= from && c.m.layers[i] < to) {
      if (manifest_add_drop (&c.m, c.m.layers[i]) == -1)
        goto nomem;
      manifest_remove_layer (&c.m, c.m.layers[i]);
      removed++;
    }
    else
      i++;
  if (manifest_add_drop (&c.m, c.m.ckpts[n - 1].map) == -1 ||
      manifest_add_drop (&c.m, c.m.ckpts[n].map) == -1)
    goto nomem;
  c.m.ckpts[n - 1].layer = to;
  c.m.ckpts[n - 1].map = map_prev;
  manifest_remove_checkpoint (&c.m, n);
  if (manifest_save (c.dir, &c.m) == -1) {
    snap_error ("%s/%s: save: %m", c.dir, MANIFEST_NAME);
    goto out;
  }
  c.nids = 0;
  delete_dropped (&c);
  if (json_output)
    fprintf (out, "{\"discarded\":\"%s\",\"layers\":%zu}\n", name, removed);
  else
    fprintf (out, "discarded restore point '%s' and its data (%zu layer%s); "
             "the newest is '%s'\n", name, removed, removed == 1 ? "" : "s",
             c.m.ckpts[n - 1].name);
  r = 0;
  goto out;

 nomem:
  snap_error ("realloc: %m");
 out:
  remove_new_files (&c);
  sr_close (&s);
  manifest_free (&c.m);
  if (c.lock_fd >= 0)
    close (c.lock_fd);
  free (c.dir);
  return r;
}
