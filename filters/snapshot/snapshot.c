/* nbdkit-snapshot-filter: named snapshots and exports of any volume.
 *
 * This file holds the nbdkit callbacks; store.h explains the design,
 * store.c the store and layers, view.c the I/O paths and control.c the
 * control socket.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <nbdkit-filter.h>

#include "cleanup.h"
#include "json.h"
#include "store.h"
#include "util.h"

/* Parameters. */
const char *store_param;
const char *control_param;
const char *create_param;
uint32_t block_size_param;

/* -D snapshot.verbose=1 logs each request's routing. */
NBDKIT_DLL_PUBLIC int snapshot_debug_verbose = 0;

/* A context on the plugin opened in .after_fork, used by the control
 * thread (to flush the origin when the first snapshot freezes it).
 * Protected by bg_lock.
 */
static nbdkit_next *bg_next;
static pthread_mutex_t bg_lock = PTHREAD_MUTEX_INITIALIZER;

/* common/ code reports errors through these. */
void
snap_verror (const char *fs, va_list args)
{
  nbdkit_verror (fs, args);
}

void
snap_error (const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  nbdkit_verror (fs, args);
  va_end (args);
}

static int
snapshot_config (nbdkit_next_config *next, nbdkit_backend *nxdata,
                 const char *key, const char *value)
{
  if (strcmp (key, "snapshot-store") == 0) {
    if (*value == '\0') {
      nbdkit_error ("snapshot-store: the directory name is empty");
      return -1;
    }
    store_param = value;
    return 0;
  }
  if (strcmp (key, "snapshot-mode") == 0) {
    if (strcmp (value, "row") == 0)
      return 0;
    if (strcmp (value, "cbw") == 0)
      nbdkit_error ("snapshot-mode=cbw: copy-before-write mode is not "
                    "available in this release; use row");
    else
      nbdkit_error ("snapshot-mode=%s: expected row or cbw", value);
    return -1;
  }
  if (strcmp (key, "snapshot-block-size") == 0) {
    int64_t r = nbdkit_parse_size (value);
    if (r == -1)
      return -1;
    if (!is_power_of_2 (r) || r < 4096 || r > 2 * 1024 * 1024) {
      nbdkit_error ("snapshot-block-size=%s: must be a power of 2 from 4K "
                    "to 2M", value);
      return -1;
    }
    block_size_param = r;
    return 0;
  }
  if (strcmp (key, "snapshot-control") == 0) {
    if (*value == '\0') {
      nbdkit_error ("snapshot-control: the socket path is empty");
      return -1;
    }
    control_param = value;
    return 0;
  }
  if (strcmp (key, "snapshot-create") == 0) {
    const char *why = snap_name_invalid (value);
    if (why) {
      nbdkit_error ("snapshot-create=%s: invalid name '%s': %s",
                    value, value, why);
      return -1;
    }
    create_param = value;
    return 0;
  }
  return next (nxdata, key, value);
}

static int
snapshot_config_complete (nbdkit_next_config_complete *next,
                          nbdkit_backend *nxdata)
{
  if (store_param == NULL) {
    nbdkit_error ("snapshot-store=DIR is required");
    return -1;
  }
  return next (nxdata);
}

#define snapshot_config_help \
  "snapshot-store=DIR         (required) Store directory (created if missing).\n" \
  "snapshot-mode=row|cbw      Snapshot kind (default row; fixed per store).\n" \
  "snapshot-block-size=SIZE   Tracking block size, 4K-2M (default 64K).\n" \
  "snapshot-control=SOCKET    Control socket (default DIR/control.sock).\n" \
  "snapshot-create=NAME       Take snapshot NAME at start-up."

static int
snapshot_thread_model (void)
{
  return NBDKIT_THREAD_MODEL_PARALLEL;
}

/* Runs before nbdkit forks, so a locked store fails on the command line. */
static int
snapshot_get_ready (int thread_model)
{
  if (store_lock (store_param) == -1)
    return -1;
  return store_load ();
}

int
flush_origin_bg (void)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&bg_lock);
  int err = 0;

  if (bg_next == NULL || !bg_next->can_flush (bg_next))
    return 0;
  if (bg_next->flush (bg_next, 0, &err) == -1) {
    errno = err;
    return -1;
  }
  return 0;
}

static int
snapshot_after_fork (nbdkit_backend *backend)
{
  int64_t size;
  char *errmsg;

  /* Prefer a writable context so a flush reaches the origin; a
   * read-only plugin still works (the origin is never written once a
   * snapshot exists).
   */
  bg_next = nbdkit_next_context_open (backend, 0, "", 0);
  if (bg_next == NULL)
    bg_next = nbdkit_next_context_open (backend, 1, "", 0);
  if (bg_next == NULL) {
    nbdkit_error ("snapshot: cannot open the origin");
    return -1;
  }
  if (bg_next->prepare (bg_next) == -1) {
    nbdkit_next_context_close (bg_next);
    bg_next = NULL;
    return -1;
  }
  size = bg_next->get_size (bg_next);
  if (size == -1)
    return -1;
  if (store_open (size) == -1)
    return -1;
  if (create_param) {
    if (store_create_snapshot (create_param, flush_origin_bg, &errmsg) == -1) {
      nbdkit_error ("snapshot-create=%s: %s", create_param,
                    errmsg ? errmsg : "out of memory");
      free (errmsg);
      return -1;
    }
  }
  return control_start (control_param);
}

static void
snapshot_cleanup (nbdkit_backend *backend)
{
  control_stop ();
  if (bg_next) {
    bg_next->finalize (bg_next);
    nbdkit_next_context_close (bg_next);
    bg_next = NULL;
  }
  store_close ();
}

/* ---- Exports ---- */

/* A connection's handle: which view it reads. */
struct handle {
  bool live;
  char name[SNAP_NAME_MAX + 1]; /* snapshot name when !live */
};

#define SNAP_PREFIX "snap/"

static char *
live_description (void)
{
  char *s;

  if (asprintf (&s, "live volume (row, %zu snapshot%s)", store.m.nsnaps,
                store.m.nsnaps == 1 ? "" : "s") == -1)
    return NULL;
  return s;
}

static char *
snapshot_description (const struct manifest_snapshot *snap)
{
  char when[64], size[32], *s;
  uint64_t changed = store_changed_blocks (snap);

  iso_time (when, sizeof when, snap->created);
  human_size (size, sizeof size, changed * store.block_size);
  if (asprintf (&s, "row snapshot taken %s, %" PRIu64 " block%s (%s) "
                "changed since", when, changed, changed == 1 ? "" : "s",
                size) == -1)
    return NULL;
  return s;
}

static int
snapshot_list_exports (nbdkit_next_list_exports *next,
                       nbdkit_backend *nxdata, int readonly, int is_tls,
                       struct nbdkit_exports *exports)
{
  ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
  CLEANUP_FREE char *live = live_description ();

  if (nbdkit_add_export (exports, "", live) == -1)
    return -1;
  for (size_t i = 0; i < store.m.nsnaps; ++i) {
    CLEANUP_FREE char *name = NULL;
    CLEANUP_FREE char *desc = snapshot_description (&store.m.snaps[i]);
    if (asprintf (&name, SNAP_PREFIX "%s", store.m.snaps[i].name) == -1 ||
        nbdkit_add_export (exports, name, desc) == -1)
      return -1;
  }
  return 0;
}

static const char *
snapshot_default_export (nbdkit_next_default_export *next,
                         nbdkit_backend *nxdata, int readonly, int is_tls)
{
  return "";
}

static void *
snapshot_open (nbdkit_next_open *next, nbdkit_context *context,
               int readonly, const char *exportname, int is_tls)
{
  struct handle *h;
  bool live = exportname[0] == '\0';

  if (!live) {
    const char *name = exportname + strlen (SNAP_PREFIX);
    ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);

    if (strncmp (exportname, SNAP_PREFIX, strlen (SNAP_PREFIX)) != 0) {
      nbdkit_error ("unknown export '%s': expected '' (the live volume) "
                    "or 'snap/NAME'", exportname);
      return NULL;
    }
    if (manifest_find_snapshot (&store.m, name) == -1) {
      nbdkit_error ("unknown export '%s': no snapshot named '%s'",
                    exportname, name);
      return NULL;
    }
  }

  /* The plugin always serves its default export; snapshot views never
   * write to it.
   */
  if (next (context, readonly || !live, "") == -1)
    return NULL;
  h = calloc (1, sizeof *h);
  if (h == NULL) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  h->live = live;
  if (!live)
    strcpy (h->name, exportname + strlen (SNAP_PREFIX));
  return h;
}

static void
snapshot_close (void *handle)
{
  free (handle);
}

/* Depth of the handle's view (store.lock held shared), or -1 if its
 * snapshot has gone.
 */
static ssize_t
view_depth (struct handle *h)
{
  ssize_t i;

  if (h->live)
    return store.nlayers;
  i = manifest_find_snapshot (&store.m, h->name);
  if (i == -1)
    return -1;
  return store_snapshot_depth (&store.m.snaps[i]);
}

static int64_t
snapshot_get_size (nbdkit_next *next, void *handle)
{
  /* Asking the plugin also lets nbdkit range-check our calls to it. */
  int64_t size = next->get_size (next);

  if (size == -1)
    return -1;
  if ((uint64_t) size != store.size) {
    nbdkit_error ("the origin size changed from %" PRIu64 " to %" PRIi64
                  " while the store was open", store.size, size);
    return -1;
  }
  return size;
}

static const char *
snapshot_export_description (nbdkit_next *next, void *handle)
{
  struct handle *h = handle;
  ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
  CLEANUP_FREE char *s = NULL;
  const char *ret;
  ssize_t i;

  if (h->live)
    s = live_description ();
  else if ((i = manifest_find_snapshot (&store.m, h->name)) >= 0)
    s = snapshot_description (&store.m.snaps[i]);
  if (s == NULL)
    return NULL;
  ret = nbdkit_strdup_intern (s);
  return ret;
}

static int
snapshot_can_write (nbdkit_next *next, void *handle)
{
  struct handle *h = handle;
  ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);

  if (!h->live)
    return 0;
  if (store.nlayers > 0)
    return 1;
  return next->can_write (next);
}

static int
snapshot_can_flush (nbdkit_next *next, void *handle)
{
  return 1;
}

static int
snapshot_can_fua (nbdkit_next *next, void *handle)
{
  return NBDKIT_FUA_NATIVE;
}

static int
snapshot_can_trim (nbdkit_next *next, void *handle)
{
  return 1;
}

static int
snapshot_can_zero (nbdkit_next *next, void *handle)
{
  return NBDKIT_ZERO_NATIVE;
}

static int
snapshot_can_fast_zero (nbdkit_next *next, void *handle)
{
  /* Layers zero by punching holes.  With no snapshot a fast zero the
   * plugin cannot do fails with ENOTSUP, as the protocol allows.
   */
  return 1;
}

static int
snapshot_can_extents (nbdkit_next *next, void *handle)
{
  return 1;
}

static int
snapshot_can_cache (nbdkit_next *next, void *handle)
{
  return NBDKIT_CACHE_NATIVE;
}

static int
snapshot_can_multi_conn (nbdkit_next *next, void *handle)
{
  ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);

  /* A layer flush syncs the one shared layer; before the first
   * snapshot, flushes go to the plugin, so follow it.
   */
  if (store.nlayers > 0)
    return 1;
  return next->can_multi_conn (next);
}

/* ---- Data ---- */

static int
snapshot_pread (nbdkit_next *next, void *handle, void *buf,
                uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
  ssize_t n = view_depth (handle);

  if (n == -1) {
    *err = ESHUTDOWN;
    nbdkit_error ("the snapshot of this export has been deleted");
    return -1;
  }
  if (n == 0)
    return next->pread (next, buf, count, offset, flags, err);
  return view_pread (next, n, buf, count, offset, err);
}

/* With no snapshot, FUA goes to the plugin as a flush after the write
 * when it cannot do FUA itself.
 */
static int
origin_fua (nbdkit_next *next, uint32_t flags, int *err)
{
  if ((flags & NBDKIT_FLAG_FUA) && next->can_fua (next) == NBDKIT_FUA_NONE)
    return next->flush (next, 0, err);
  return 0;
}

static uint32_t
origin_flags (nbdkit_next *next, uint32_t flags)
{
  if (next->can_fua (next) == NBDKIT_FUA_NONE)
    flags &= ~NBDKIT_FLAG_FUA;
  return flags;
}

static int
snapshot_pwrite (nbdkit_next *next, void *handle, const void *buf,
                 uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);

  assert (((struct handle *) handle)->live);
  if (store.nlayers == 0) {
    if (next->pwrite (next, buf, count, offset, origin_flags (next, flags),
                      err) == -1)
      return -1;
    return origin_fua (next, flags, err);
  }
  return top_pwrite (next, buf, count, offset, flags, err);
}

static int
snapshot_zero (nbdkit_next *next, void *handle, uint32_t count,
               uint64_t offset, uint32_t flags, int *err)
{
  ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);

  assert (((struct handle *) handle)->live);
  if (store.nlayers == 0) {
    if ((flags & NBDKIT_FLAG_FAST_ZERO) && !next->can_fast_zero (next)) {
      *err = ENOTSUP;
      return -1;
    }
    if (next->can_zero (next) == NBDKIT_ZERO_NONE) {
      /* The plugin cannot zero: write zeros through the top path is
       * not available, so emulate with writes.
       */
      static const char zeros[65536];
      uint32_t flags2 = origin_flags (next, flags & ~NBDKIT_FLAG_MAY_TRIM);
      while (count > 0) {
        uint32_t n = MIN (count, (uint32_t) sizeof zeros);
        if (next->pwrite (next, zeros, n, offset,
                          flags2 & ~NBDKIT_FLAG_FAST_ZERO, err) == -1)
          return -1;
        count -= n;
        offset += n;
      }
      return origin_fua (next, flags, err);
    }
    if (next->zero (next, count, offset, origin_flags (next, flags),
                    err) == -1)
      return -1;
    return origin_fua (next, flags, err);
  }
  return top_zero (next, count, offset, flags, err);
}

static int
snapshot_trim (nbdkit_next *next, void *handle, uint32_t count,
               uint64_t offset, uint32_t flags, int *err)
{
  ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);

  assert (((struct handle *) handle)->live);
  if (store.nlayers == 0) {
    if (next->can_trim (next) &&
        next->trim (next, count, offset, origin_flags (next, flags),
                    err) == -1)
      return -1;
    return origin_fua (next, flags, err);
  }
  return top_trim (count, offset, flags, err);
}

static int
snapshot_flush (nbdkit_next *next, void *handle, uint32_t flags, int *err)
{
  ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);

  if (store.nlayers == 0)
    return next->can_flush (next) ? next->flush (next, flags, err) : 0;
  if (layer_flush (store.layers[store.nlayers - 1]) == -1) {
    *err = errno;
    nbdkit_error ("flush: %m");
    return -1;
  }
  return 0;
}

static int
snapshot_extents (nbdkit_next *next, void *handle, uint32_t count,
                  uint64_t offset, uint32_t flags,
                  struct nbdkit_extents *extents, int *err)
{
  ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
  ssize_t n = view_depth (handle);

  if (n == -1) {
    *err = ESHUTDOWN;
    nbdkit_error ("the snapshot of this export has been deleted");
    return -1;
  }
  return view_extents (next, n, count, offset, flags, extents, err);
}

static int
snapshot_cache (nbdkit_next *next, void *handle, uint32_t count,
                uint64_t offset, uint32_t flags, int *err)
{
  ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
  ssize_t n = view_depth (handle);

  if (n == -1) {
    *err = ESHUTDOWN;
    return -1;
  }
  return view_cache (next, n, count, offset, err);
}

static struct nbdkit_filter filter = {
  .name               = "snapshot",
  .longname           = "nbdkit snapshot filter",
  .config             = snapshot_config,
  .config_complete    = snapshot_config_complete,
  .config_help        = snapshot_config_help,
  .thread_model       = snapshot_thread_model,
  .get_ready          = snapshot_get_ready,
  .after_fork         = snapshot_after_fork,
  .cleanup            = snapshot_cleanup,
  .list_exports       = snapshot_list_exports,
  .default_export     = snapshot_default_export,
  .open               = snapshot_open,
  .close              = snapshot_close,
  .get_size           = snapshot_get_size,
  .export_description = snapshot_export_description,
  .can_write          = snapshot_can_write,
  .can_flush          = snapshot_can_flush,
  .can_fua            = snapshot_can_fua,
  .can_trim           = snapshot_can_trim,
  .can_zero           = snapshot_can_zero,
  .can_fast_zero      = snapshot_can_fast_zero,
  .can_extents        = snapshot_can_extents,
  .can_cache          = snapshot_can_cache,
  .can_multi_conn     = snapshot_can_multi_conn,
  .pread              = snapshot_pread,
  .pwrite             = snapshot_pwrite,
  .zero               = snapshot_zero,
  .trim               = snapshot_trim,
  .flush              = snapshot_flush,
  .extents            = snapshot_extents,
  .cache              = snapshot_cache,
};

NBDKIT_REGISTER_FILTER (filter)
