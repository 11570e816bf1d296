/* nbdkit-snapstore-plugin: serve the snapshots of a store at rest, and
 * the restore points of a backup chain, read-only, over NBD.
 *
 * Notes on the design
 * -------------------
 *
 * The store is read with the same code as the filter's
 * (common/store/storeread.h over manifest.h and mapfile.h): one reader
 * of the format.  It is opened, checked and locked in .get_ready, so
 * that a damaged store, a wrong base or a store in use fails the
 * command line, and nothing changes it afterwards: no filter can open
 * it while the plugin holds its lock (shared), and the plugin refuses a
 * store a filter holds (exclusively).  A live store is refused rather
 * than served: in a cbw store the origin the snapshots read is written
 * in place, and a merge moves pages between layers and deletes files;
 * what the plugin loaded at start would go stale under it.
 *
 * Exports (one per connection, chosen by name):
 *
 *   snap/NAME       the view of snapshot (restore point) NAME
 *   dirty/FROM/TO   the blocks changed between checkpoint FROM and
 *                   snapshot TO, with TO's contents; others read as
 *                   zeros and are reported as holes
 *   ""              the newest snapshot (the default export)
 *
 * Each view is read through its index (storeread.h), built once, when
 * the view is first opened (the newest at start-up), and kept: views of
 * a store at rest never change.  index_lock serialises building; the
 * indexes themselves are read without a lock once built.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "base.h"
#include "cleanup.h"
#include "storefiles.h"
#include "storeread.h"
#include "util.h"

/* Parameters. */
static const char *dir_param;
static const char *base_param;

/* The store, open from .get_ready on and never changed. */
static struct storeread store;
static bool have_base;          /* views may read the base */
static size_t newest;           /* the default export's snapshot */

/* The index of each checkpoint's view (parallel to store.m.ckpts),
 * built on first use.  index_lock protects building (the built flag
 * is written with release semantics, so a reader that sees it set
 * sees the index).
 */
struct view_index {
  bool built;
  struct sr_index ix;
};
static struct view_index *views;
static pthread_mutex_t index_lock = PTHREAD_MUTEX_INITIALIZER;

/* common/ code reports errors through this (and snap_error, util.c). */
void
snap_verror (const char *fs, va_list args)
{
  nbdkit_verror (fs, args);
}

static int
snapstore_config (const char *key, const char *value)
{
  if (strcmp (key, "dir") == 0) {
    if (*value == '\0') {
      nbdkit_error ("dir: the store directory name is empty");
      return -1;
    }
    dir_param = value;
    return 0;
  }
  if (strcmp (key, "base") == 0) {
    if (*value == '\0') {
      nbdkit_error ("base: empty (expected a file, a block device or an "
                    "NBD URI)");
      return -1;
    }
    base_param = value;
    return 0;
  }
  nbdkit_error ("unknown parameter '%s' (expected DIR and base=PATH|URI)",
                key);
  return -1;
}

static int
snapstore_config_complete (void)
{
  if (dir_param == NULL) {
    nbdkit_error ("the store directory is required: nbdkit snapstore DIR");
    return -1;
  }
  return 0;
}

#define snapstore_config_help \
  "[dir=]DIR                 (required) The store or backup chain to serve.\n" \
  "base=PATH|URI             The origin the store was made over (default:\n" \
  "                          the one the store records)."

static int
snapstore_thread_model (void)
{
  return NBDKIT_THREAD_MODEL_PARALLEL;
}

/* The index of checkpoint ci's view, built if needed.  NULL after
 * nbdkit_error.
 */
static const struct sr_index *
view_index (size_t ci)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&index_lock);
  struct view_index *v = &views[ci];

  if (__atomic_load_n (&v->built, __ATOMIC_ACQUIRE))
    return &v->ix;
  if (sr_view_index (&store, ci, &v->ix) == -1) {
    nbdkit_error ("%s: building the index of snapshot '%s': %m",
                  store.dir, store.m.ckpts[ci].name);
    return NULL;
  }
  /* Without a base, every page must come from a layer. */
  if (!have_base)
    for (size_t r = 0; r < v->ix.nruns; ++r)
      if (v->ix.src[r] < 0) {
        nbdkit_error ("%s: snapshot '%s' reads page %" PRIu64 " from the "
                      "origin, which the store records as retired (its "
                      "oldest layer should hold every page): the store is "
                      "damaged", store.dir, store.m.ckpts[ci].name,
                      v->ix.start[r]);
        sr_index_free (&v->ix);
        return NULL;
      }
  nbdkit_debug ("snapstore: snapshot '%s': index of %zu runs",
                store.m.ckpts[ci].name, v->ix.nruns);
  __atomic_store_n (&v->built, true, __ATOMIC_RELEASE);
  return &v->ix;
}

/* Open and check the store and its base, before nbdkit forks, so
 * that errors fail the command line.
 */
static int
snapstore_get_ready (void)
{
  const char *spec;
  bool found = false;

  raise_fd_limit ();
  if (sr_open (&store, dir_param, true) == -1) {
    if (errno == EBUSY)
      nbdkit_error ("%s: the store is in use: a running nbdkit holds it "
                    "(its lock, %s/lock, is taken).  The snapstore plugin "
                    "serves stores at rest only: read the snapshots from "
                    "that server (export snap/NAME), or stop it first",
                    dir_param, dir_param);
    return -1;
  }
  for (size_t i = store.m.nckpts; i-- > 0; )
    if (sr_readable (&store.m, i, NULL)) {
      newest = i;
      found = true;
      break;
    }
  if (!found) {
    nbdkit_error ("%s: the store holds no snapshot to serve", store.dir);
    return -1;
  }

  if (store.m.origin_retired) {
    if (base_param) {
      nbdkit_error ("base=%s: the store %s needs no base: its oldest layer "
                    "holds every page (a backup chain, or a store whose "
                    "origin was retired by a stream)", base_param,
                    store.dir);
      return -1;
    }
  }
  else {
    spec = base_param ? base_param : store.m.origin_path;
    if (spec[0] == '\0') {
      nbdkit_error ("%s: the store does not record where its origin is "
                    "(the filter records it only when the file plugin "
                    "serves the origin): give base=PATH|URI", store.dir);
      return -1;
    }
    if (base_open (spec, base_param != NULL, store.dir, &store.m) == -1)
      return -1;
    have_base = true;
  }

  views = calloc (store.m.nckpts, sizeof *views);
  if (views == NULL) {
    nbdkit_error ("calloc: %m");
    return -1;
  }
  /* The default export is ready before the first client. */
  if (view_index (newest) == NULL)
    return -1;
  nbdkit_debug ("snapstore: %s: %s store, %zu layers, %zu checkpoints, "
                "newest snapshot '%s'", store.dir,
                store.m.mode == MODE_CBW ? "cbw" : "row", store.nlayers,
                store.m.nckpts, store.m.ckpts[newest].name);
  return 0;
}

static void
snapstore_unload (void)
{
  for (size_t i = 0; views && i < store.m.nckpts; ++i)
    sr_index_free (&views[i].ix);
  free (views);
  views = NULL;
  base_close ();
  sr_close (&store);
}

/* ---- Exports ---- */

#define SNAP_PREFIX "snap/"
#define DIRTY_PREFIX "dirty/"

/* Blocks changed between checkpoints from and to (exclusive). */
static const struct sbitmap *
map_of (size_t i, void *from)
{
  return &store.maps[*(size_t *) from + i];
}

static uint64_t
changed_blocks (size_t from, size_t to)
{
  uint64_t b = 0, n = 0;

  while (from < to && b < store.nblocks) {
    bool changed;
    uint64_t end = sbitmap_union_run (to - from, map_of, &from, b,
                                      store.nblocks, &changed);
    if (changed)
      n += end - b;
    b = end;
  }
  return n;
}

/* "row snapshot taken T; N blocks (SIZE) changed since 'PREV'" or, for
 * dirty/FROM/TO, "blocks changed from 'FROM' to 'TO': N (SIZE)".
 */
static char *
description (ssize_t from, size_t to)
{
  const struct manifest_checkpoint *c = &store.m.ckpts[to];
  const char *kind = store.m.mode == MODE_CBW ? "cbw" : "row";
  char when[64], size[32], *s;
  uint64_t n;
  int r;

  iso_time (when, sizeof when, c->created);
  if (from >= 0) {
    n = changed_blocks (from, to);
    human_size (size, sizeof size, MIN (n * store.block_size, store.size));
    r = asprintf (&s, "blocks changed from '%s' to %s snapshot '%s' taken "
                  "%s: %" PRIu64 " (%s)", store.m.ckpts[from].name, kind,
                  c->name, when, n, size);
  }
  else if (to == 0)
    r = asprintf (&s, "%s snapshot taken %s, the oldest", kind, when);
  else {
    n = changed_blocks (to - 1, to);
    human_size (size, sizeof size, MIN (n * store.block_size, store.size));
    r = asprintf (&s, "%s snapshot taken %s, %" PRIu64 " block%s (%s) "
                  "changed since '%s'", kind, when, n, n == 1 ? "" : "s",
                  size, store.m.ckpts[to - 1].name);
  }
  return r == -1 ? NULL : s;
}

static int
snapstore_list_exports (int readonly, int is_tls,
                        struct nbdkit_exports *exports)
{
  for (size_t i = 0; i < store.m.nckpts; ++i) {
    CLEANUP_FREE char *name = NULL;
    CLEANUP_FREE char *desc = NULL;

    if (!sr_readable (&store.m, i, NULL))
      continue;
    desc = description (-1, i);
    if (asprintf (&name, SNAP_PREFIX "%s", store.m.ckpts[i].name) == -1 ||
        nbdkit_add_export (exports, name, desc) == -1)
      return -1;
  }
  /* The changes of each snapshot since the checkpoint before it (any
   * other pair can be asked for by name).
   */
  for (size_t i = 1; i < store.m.nckpts; ++i) {
    CLEANUP_FREE char *name = NULL;
    CLEANUP_FREE char *desc = NULL;

    if (!sr_readable (&store.m, i, NULL))
      continue;
    desc = description (i - 1, i);
    if (asprintf (&name, DIRTY_PREFIX "%s/%s", store.m.ckpts[i - 1].name,
                  store.m.ckpts[i].name) == -1 ||
        nbdkit_add_export (exports, name, desc) == -1)
      return -1;
  }
  return 0;
}

static const char *
snapstore_default_export (int readonly, int is_tls)
{
  char *name;

  if (asprintf (&name, SNAP_PREFIX "%s", store.m.ckpts[newest].name) == -1)
    return NULL;
  {
    const char *r = nbdkit_strdup_intern (name);
    free (name);
    return r;
  }
}

/* A connection's handle. */
struct handle {
  size_t to;                    /* the snapshot whose view it reads */
  ssize_t from;                 /* dirty/: checkpoint FROM, else -1 */
  const struct sr_index *ix;    /* the view's index */
};

/* The checkpoint named name in export exportname: its index, or -1
 * after an error.
 */
static ssize_t
find (const char *exportname, const char *name)
{
  const char *why = snap_name_invalid (name);
  ssize_t i;

  if (why) {
    nbdkit_error ("export '%s': invalid name '%s': %s", exportname, name,
                  why);
    return -1;
  }
  i = manifest_find_checkpoint (&store.m, name);
  if (i == -1)
    nbdkit_error ("export '%s': the store has no snapshot or checkpoint "
                  "named '%s'", exportname, name);
  return i;
}

/* Checkpoint i can be read as a snapshot, or say why not. */
static bool
readable (const char *exportname, size_t i)
{
  const char *why;

  if (sr_readable (&store.m, i, &why))
    return true;
  nbdkit_error ("export '%s': '%s' cannot be read: %s", exportname,
                store.m.ckpts[i].name, why);
  return false;
}

static int
parse_export (const char *exportname, struct handle *h)
{
  h->from = -1;
  if (exportname[0] == '\0') {
    h->to = newest;
    return 0;
  }
  if (!snap_printable (exportname) || strlen (exportname) > 256) {
    char shown[300];
    nbdkit_error ("unknown export '%s': export names are 'snap/NAME' or "
                  "'dirty/FROM/TO'",
                  snap_escape (exportname, shown, sizeof shown));
    return -1;
  }
  if (strncmp (exportname, SNAP_PREFIX, strlen (SNAP_PREFIX)) == 0) {
    ssize_t i = find (exportname, exportname + strlen (SNAP_PREFIX));
    if (i == -1 || !readable (exportname, i))
      return -1;
    h->to = i;
    return 0;
  }
  if (strncmp (exportname, DIRTY_PREFIX, strlen (DIRTY_PREFIX)) == 0) {
    const char *from = exportname + strlen (DIRTY_PREFIX);
    const char *slash = strchr (from, '/');
    char name[SNAP_NAME_MAX + 2];
    ssize_t i, j;

    if (slash == NULL) {
      nbdkit_error ("export '%s': a store at rest has no live volume: ask "
                    "for the changes up to a snapshot, dirty/%s/TO (the "
                    "newest is '%s')", exportname, from,
                    store.m.ckpts[newest].name);
      return -1;
    }
    snprintf (name, sizeof name, "%.*s",
              (int) MIN ((size_t) (slash - from), sizeof name - 1), from);
    i = find (exportname, name);
    if (i == -1)
      return -1;
    j = find (exportname, slash + 1);
    if (j == -1 || !readable (exportname, j))
      return -1;
    if (j <= i) {
      nbdkit_error ("export '%s': '%s' is not newer than '%s': the range "
                    "goes from an older checkpoint to a newer snapshot",
                    exportname, slash + 1, name);
      return -1;
    }
    h->from = i;
    h->to = j;
    return 0;
  }
  nbdkit_error ("unknown export '%s': expected 'snap/NAME', "
                "'dirty/FROM/TO' or '' (the newest snapshot, '%s')",
                exportname, store.m.ckpts[newest].name);
  return -1;
}

static void *
snapstore_open (int readonly)
{
  const char *exportname = nbdkit_export_name ();
  struct handle *h = calloc (1, sizeof *h);

  if (exportname == NULL)
    exportname = "";
  if (h == NULL) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  if (parse_export (exportname, h) == -1 ||
      (h->ix = view_index (h->to)) == NULL) {
    free (h);
    return NULL;
  }
  return h;
}

static void
snapstore_close (void *handle)
{
  free (handle);
}

static const char *
snapstore_export_description (void *handle)
{
  struct handle *h = handle;
  CLEANUP_FREE char *s = description (h->from, h->to);

  return s ? nbdkit_strdup_intern (s) : NULL;
}

static int64_t
snapstore_get_size (void *handle)
{
  return store.size;
}

static int
snapstore_can_write (void *handle)
{
  return 0;
}

static int
snapstore_can_multi_conn (void *handle)
{
  return 1;
}

static int
snapstore_can_extents (void *handle)
{
  return 1;
}

static int
snapstore_can_cache (void *handle)
{
  return NBDKIT_CACHE_NATIVE;
}

/* ---- Data ---- */

static inline uint64_t
page_off (uint64_t p)
{
  return p << STORE_PAGE_SHIFT;
}

/* Read [offset, offset+count) of the view indexed by ix. */
static int
view_pread (const struct sr_index *ix, char *buf, uint32_t count,
            uint64_t offset, int *err)
{
  const uint64_t end = offset + count;

  while (offset < end) {
    uint64_t run_end, len;
    int32_t src = sr_index_find (ix, offset >> STORE_PAGE_SHIFT, &run_end);

    len = MIN (end, page_off (run_end)) - offset;
    if (src >= 0) {
      if (full_pread (store.layers[src].data_fd, buf, len, offset) == -1) {
        *err = errno;
        nbdkit_error ("layer %" PRIu64 ": read at %" PRIu64 ": %m",
                      store.layers[src].id, offset);
        return -1;
      }
    }
    else if (base_pread (buf, len, offset, err) == -1)
      return -1;
    buf += len;
    offset += len;
  }
  return 0;
}

static int
dirty_pread (struct handle *h, void *buf, uint32_t count, uint64_t offset,
             int *err)
{
  char *p = buf;
  const uint64_t end = offset + count;
  const uint64_t limit = (end - 1) / store.block_size + 1;
  size_t from = h->from;

  while (offset < end) {
    bool changed;
    uint64_t b = offset / store.block_size;
    uint64_t run_end = sbitmap_union_run (h->to - from, map_of, &from, b,
                                          limit, &changed);
    uint64_t len = MIN (end, run_end * store.block_size) - offset;

    if (!changed)
      memset (p, 0, len);       /* unchanged blocks read as zeros */
    else if (view_pread (h->ix, p, len, offset, err) == -1)
      return -1;
    p += len;
    offset += len;
  }
  return 0;
}

static int
add_extent (struct nbdkit_extents *extents, uint64_t offset, uint64_t len,
            uint32_t type, int *err)
{
  if (nbdkit_add_extent (extents, offset, len, type) == -1) {
    *err = errno;
    return -1;
  }
  return 0;
}

static int
view_extents (const struct sr_index *ix, uint32_t count, uint64_t offset,
              uint32_t flags, struct nbdkit_extents *extents, int *err)
{
  const uint64_t end = offset + count;

  while (offset < end) {
    uint64_t run_end, stop;
    int32_t src = sr_index_find (ix, offset >> STORE_PAGE_SHIFT, &run_end);

    stop = MIN (end, page_off (run_end));
    if (src >= 0) {
      /* A layer's pages that are holes in its file read as zeros. */
      while (offset < stop) {
        bool data;
        uint64_t e = sr_data_run (store.layers[src].data_fd, offset, stop,
                                  &data);
        if (add_extent (extents, offset, e - offset,
                        data ? 0 : NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO,
                        err) == -1)
          return -1;
        offset = e;
        if (flags & NBDKIT_FLAG_REQ_ONE)
          return 0;
      }
    }
    else {
      int64_t reached = base_extents (offset, stop, flags, extents, err);
      if (reached == -1)
        return -1;
      if ((uint64_t) reached < stop)
        return 0;               /* a short answer is allowed */
      offset = stop;
    }
    if (flags & NBDKIT_FLAG_REQ_ONE)
      break;
  }
  return 0;
}

static int
dirty_extents (struct handle *h, uint32_t count, uint64_t offset,
               uint32_t flags, struct nbdkit_extents *extents, int *err)
{
  const uint64_t end = offset + count;
  /* As in the filter: the last run may reach up to 4 GiB past the
   * request, so a client walking a mostly unchanged volume needs fewer
   * requests.
   */
  const uint64_t reach = (flags & NBDKIT_FLAG_REQ_ONE) ? end
    : MIN (store.size, end + UINT32_MAX);
  const uint64_t limit = (reach - 1) / store.block_size + 1;
  size_t from = h->from;

  while (offset < end) {
    bool changed;
    uint64_t b = offset / store.block_size;
    uint64_t run_end = sbitmap_union_run (h->to - from, map_of, &from, b,
                                          limit, &changed);
    uint64_t stop = MIN (reach, run_end * store.block_size);

    if (add_extent (extents, offset, stop - offset,
                    changed ? 0 : NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO,
                    err) == -1)
      return -1;
    offset = stop;
    if (flags & NBDKIT_FLAG_REQ_ONE)
      break;
  }
  return 0;
}

static int
snapstore_pread (void *handle, void *buf, uint32_t count, uint64_t offset,
                 uint32_t flags)
{
  struct handle *h = handle;
  int err = 0, r;

  if (h->from < 0)
    r = view_pread (h->ix, buf, count, offset, &err);
  else
    r = dirty_pread (h, buf, count, offset, &err);
  if (r == -1)
    nbdkit_set_error (err ? err : EIO);
  return r;
}

static int
snapstore_extents (void *handle, uint32_t count, uint64_t offset,
                   uint32_t flags, struct nbdkit_extents *extents)
{
  struct handle *h = handle;
  int err = 0, r;

  if (h->from < 0)
    r = view_extents (h->ix, count, offset, flags, extents, &err);
  else
    r = dirty_extents (h, count, offset, flags, extents, &err);
  if (r == -1)
    nbdkit_set_error (err ? err : EIO);
  return r;
}

static int
snapstore_cache (void *handle, uint32_t count, uint64_t offset,
                 uint32_t flags)
{
  struct handle *h = handle;
  const uint64_t end = offset + count;

  /* Advisory: prefetch what the layers hold; failures do not matter. */
  while (offset < end) {
    uint64_t run_end, stop;
    int32_t src = sr_index_find (h->ix, offset >> STORE_PAGE_SHIFT,
                                 &run_end);

    stop = MIN (end, page_off (run_end));
    if (src >= 0)
      posix_fadvise (store.layers[src].data_fd, offset, stop - offset,
                     POSIX_FADV_WILLNEED);
    offset = stop;
  }
  return 0;
}

static struct nbdkit_plugin plugin = {
  .name               = "snapstore",
  .longname           = "nbdkit snapshot store plugin",
  .version            = PACKAGE_VERSION,
  .magic_config_key   = "dir",
  .config             = snapstore_config,
  .config_complete    = snapstore_config_complete,
  .config_help        = snapstore_config_help,
  .thread_model       = snapstore_thread_model,
  .get_ready          = snapstore_get_ready,
  .unload             = snapstore_unload,
  .list_exports       = snapstore_list_exports,
  .default_export     = snapstore_default_export,
  .open               = snapstore_open,
  .close              = snapstore_close,
  .export_description = snapstore_export_description,
  .get_size           = snapstore_get_size,
  .can_write          = snapstore_can_write,
  .can_multi_conn     = snapstore_can_multi_conn,
  .can_extents        = snapstore_can_extents,
  .can_cache          = snapstore_can_cache,
  .pread              = snapstore_pread,
  .extents            = snapstore_extents,
  .cache              = snapstore_cache,
};

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL
NBDKIT_REGISTER_PLUGIN (plugin)
