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
#include <time.h>

#include <nbdkit-filter.h>

#include "cleanup.h"
#include "control.h"
#include "job.h"
#include "origin.h"
#include "store.h"
#include "util.h"

/* Parameters. */
const char *store_param;
const char *control_param;
const char *create_param;
uint32_t block_size_param;
int mode_param = -1;
uint64_t max_size_param;
int full_param = -1;
bool adopt_origin_param;
/* 256 MiB/s: with 4K random reads going on, that kept their p99 within
 * about twice its idle figure here (docs/benchmarks.md), where a job
 * copying at full speed tripled it.
 */
uint64_t job_rate_param = UINT64_C (256) << 20;

uint64_t client_requests;

/* Count one client request (see store.h). */
static inline void
note_request (void)
{
  __atomic_add_fetch (&client_requests, 1, __ATOMIC_RELAXED);
}

/* -D snapshot.verbose=1 logs each control request (with nbdkit -v). */
NBDKIT_DLL_PUBLIC int snapshot_debug_verbose = 0;

/* -D snapshot.job_delay=US sleeps US microseconds after each 1 MiB
 * step of a background job (to give crash tests time to strike).
 */
NBDKIT_DLL_PUBLIC int snapshot_debug_job_delay = 0;

/* -D snapshot.job_hold=1 parks every job before its first step, and
 * again whenever the steps the control request "job-release" allowed
 * it are used up (job_park), so tests can look at a running job, or
 * kill nbdkit at a known point of it, however fast the machine is.
 */
NBDKIT_DLL_PUBLIC int snapshot_debug_job_hold = 0;

/* -D snapshot.apply_delay_ms=MS: the thread that applies deferred cbw
 * writes to the origin waits MS before each batch (pending.c), so that
 * tests find writes pending.
 */
NBDKIT_DLL_PUBLIC int snapshot_debug_apply_delay_ms = 0;

/* -D snapshot.revert_save_delay_ms=MS: saving a cbw revert's progress
 * waits MS after the origin flush, before the map is written, so that
 * tests can have the job go on in between.
 */
NBDKIT_DLL_PUBLIC int snapshot_debug_revert_save_delay_ms = 0;

/* -D snapshot.job_busy=1: jobs take clients to be busy all the time
 * (so tests can check snapshot-job-rate without depending on how fast
 * a client manages to send requests).
 */
NBDKIT_DLL_PUBLIC int snapshot_debug_job_busy = 0;

/* -D snapshot.intent_clear_ms=MS: the least time between two clears of
 * the write-intent regions on client flushes (intent.c).
 */
NBDKIT_DLL_PUBLIC int snapshot_debug_intent_clear_ms = 5000;

/* -D snapshot.origin_probe_ms=MS: how long start-up waits for the
 * origin to take a second connection (probe_origin).
 */
NBDKIT_DLL_PUBLIC int snapshot_debug_origin_probe_ms = 10000;

/* common/ code reports errors through this (and snap_error, util.c). */
void
snap_verror (const char *fs, va_list args)
{
  nbdkit_verror (fs, args);
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
      mode_param = MODE_ROW;
    else if (strcmp (value, "cbw") == 0)
      mode_param = MODE_CBW;
    else {
      nbdkit_error ("snapshot-mode=%s: expected row or cbw", value);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "snapshot-block-size") == 0) {
    int64_t r = nbdkit_parse_size (value);
    if (r == -1) {
      nbdkit_error ("snapshot-block-size=%s: not a size (a power of 2 "
                    "from 4K to 2M)", value);
      return -1;
    }
    if (!is_power_of_2 (r) || r < 4096 || r > 2 * 1024 * 1024) {
      nbdkit_error ("snapshot-block-size=%s: must be a power of 2 from 4K "
                    "to 2M", value);
      return -1;
    }
    block_size_param = r;
    return 0;
  }
  if (strcmp (key, "snapshot-job-rate") == 0) {
    int64_t r = nbdkit_parse_size (value);
    if (r == -1) {
      nbdkit_error ("snapshot-job-rate=%s: not a size (bytes per second, "
                    "0 for no limit)", value);
      return -1;
    }
    job_rate_param = r;
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
  if (strcmp (key, "snapshot-max-size") == 0) {
    int64_t r = nbdkit_parse_size (value);
    if (r == -1) {
      nbdkit_error ("snapshot-max-size=%s: not a size (the most data the "
                    "store may hold; 0 for no limit)", value);
      return -1;
    }
    max_size_param = r;
    return 0;
  }
  if (strcmp (key, "snapshot-full") == 0) {
    if (strcmp (value, "invalidate") == 0)
      full_param = FULL_INVALIDATE;
    else if (strcmp (value, "error") == 0)
      full_param = FULL_ERROR;
    else {
      nbdkit_error ("snapshot-full=%s: expected invalidate or error", value);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "snapshot-adopt-origin") == 0) {
    int r = nbdkit_parse_bool (value);
    if (r == -1) {
      nbdkit_error ("snapshot-adopt-origin=%s: expected true or false",
                    value);
      return -1;
    }
    adopt_origin_param = r;
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
  /* The plugin's parameters identify the origin (file=PATH). */
  origin_note_config (key, value);
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
  "snapshot-job-rate=SIZE     Job copy rate per second while clients do I/O\n" \
  "                           (default 256M; 0 = no limit).\n" \
  "snapshot-create=NAME       Take snapshot NAME at start-up.\n" \
  "snapshot-max-size=SIZE     The most data the store may hold (0: no limit).\n" \
  "snapshot-full=invalidate|error\n" \
  "                           When full: drop the oldest snapshot (cbw;\n" \
  "                           the default there) or fail the write.\n" \
  "snapshot-adopt-origin=true Accept an origin that does not match the\n" \
  "                           store (moved or replaced on purpose)."

static int
snapshot_thread_model (void)
{
  return NBDKIT_THREAD_MODEL_PARALLEL;
}

/* Runs before nbdkit forks, so a locked store fails on the command line. */
static int
snapshot_get_ready (int thread_model)
{
  origin_set_parallel (thread_model == NBDKIT_THREAD_MODEL_PARALLEL);
  if (store_lock (store_param) == -1 || store_load () == -1)
    return -1;
  if (store_check_full_policy () == -1)
    return -1;
  /* Refuse a duplicate before forking, so the command line says so. */
  if (create_param &&
      manifest_find_checkpoint (&store.m, create_param) >= 0) {
    nbdkit_error ("snapshot-create=%s: checkpoint '%s' already exists",
                  create_param, create_param);
    return -1;
  }
  /* nbdkit writes its pid file and starts its --run command after this
   * and before .after_fork: the control socket must accept connections
   * by then.  Requests wait in its backlog until .after_fork has opened
   * the store and started the control thread (descriptors and the
   * store's flock survive the fork, threads do not).
   */
  return control_listen (control_param);
}

static int open_store (nbdkit_backend *backend);

static int
snapshot_after_fork (nbdkit_backend *backend)
{
  if (open_store (backend) == -1 || control_start () == -1) {
    /* nbdkit exits without calling .cleanup: leave no socket behind. */
    control_stop ();
    return -1;
  }
  return 0;
}

/* Open the background context on the origin, then the store; resume
 * an interrupted job and take snapshot-create.
 */
static int
open_store (nbdkit_backend *backend)
{
  int64_t size;
  char *errmsg;

  if (origin_open (backend, &size) == -1 ||
      origin_identity_check (size, adopt_origin_param) == -1 ||
      store_open (size) == -1 || origin_identity_open () == -1)
    return -1;
  /* An interrupted job resumes before anything else can be asked of
   * the store (a revert must be in place before a snapshot is taken or
   * another job is started).
   */
  if (job_resume () == -1)
    return -1;
  if (create_param) {
    if (store_create_checkpoint (create_param, false, origin_flush,
                                 &errmsg) == -1) {
      nbdkit_error ("snapshot-create=%s: %s", create_param,
                    errmsg ? errmsg : "out of memory");
      free (errmsg);
      return -1;
    }
  }
  return 0;
}

static void
snapshot_cleanup (nbdkit_backend *backend)
{
  control_stop ();
  job_stop ();
  /* The kind's last saves (a cbw revert's progress) flush the origin
   * first: before its context goes.
   */
  if (store.kind && store.kind->close)
    store.kind->close ();
  origin_identity_close ();
  origin_close ();
  store_close ();
}

/* ---- Exports ---- */

/* A connection's handle: which view it reads. */
enum export_kind { EXPORT_LIVE, EXPORT_SNAP, EXPORT_DIRTY };

struct handle {
  enum export_kind kind;
  char name[SNAP_NAME_MAX + 1]; /* SNAP: the snapshot; DIRTY: FROM */
  char to[SNAP_NAME_MAX + 1];   /* DIRTY: snapshot TO, or "" for live */
  struct ckpt_map *refs[2];     /* maps this connection keeps alive */
};

#define SNAP_PREFIX "snap/"
#define DIRTY_PREFIX "dirty/"

static char *
live_description (void)
{
  size_t nsnaps = 0;
  char *s;

  for (size_t i = 0; i < store.m.nckpts; ++i)
    nsnaps += store.m.ckpts[i].kind == CKPT_SNAPSHOT;
  if (asprintf (&s, "live volume (%s, %zu snapshot%s, %zu bitmap-only "
                "checkpoint%s)", store.kind->name, nsnaps,
                nsnaps == 1 ? "" : "s",
                store.m.nckpts - nsnaps,
                store.m.nckpts - nsnaps == 1 ? "" : "s") == -1)
    return NULL;
  return s;
}

/* "row snapshot taken T, N blocks (SIZE) changed since" (or "cbw
 * snapshot", by the store's kind), or for a dirty/ export "changes
 * since row snapshot taken T: N blocks (SIZE)".
 */
static char *
checkpoint_description (size_t i, bool dirty)
{
  const struct manifest_checkpoint *c = &store.m.ckpts[i];
  uint64_t changed = ckpt_count_changed (i, store.m.nckpts);
  char when[64], size[32], kind[32], *s;
  int r;

  if (c->kind == CKPT_SNAPSHOT)
    snprintf (kind, sizeof kind, "%s snapshot", store.kind->name);
  else
    snprintf (kind, sizeof kind, "bitmap-only checkpoint");

  iso_time (when, sizeof when, c->created);
  human_size (size, sizeof size, MIN (changed * store.block_size,
                                      store.size));
  if (dirty)
    r = asprintf (&s, "changes since %s taken %s: %" PRIu64 " block%s (%s)",
                  kind, when, changed, changed == 1 ? "" : "s", size);
  else
    r = asprintf (&s, "%s taken %s, %" PRIu64 " block%s (%s) changed since",
                  kind, when, changed, changed == 1 ? "" : "s", size);
  return r == -1 ? NULL : s;
}

static int
add_export (struct nbdkit_exports *exports, const char *prefix, size_t i,
            bool dirty)
{
  CLEANUP_FREE char *name = NULL;
  CLEANUP_FREE char *desc = checkpoint_description (i, dirty);

  if (asprintf (&name, "%s%s", prefix, store.m.ckpts[i].name) == -1)
    return -1;
  return nbdkit_add_export (exports, name, desc);
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
  for (size_t i = 0; i < store.m.nckpts; ++i)
    if (store.m.ckpts[i].kind == CKPT_SNAPSHOT &&
        add_export (exports, SNAP_PREFIX, i, false) == -1)
      return -1;
  for (size_t i = 0; i < store.m.nckpts; ++i)
    if (add_export (exports, DIRTY_PREFIX, i, true) == -1)
      return -1;
  return 0;
}

static const char *
snapshot_default_export (nbdkit_next_default_export *next,
                         nbdkit_backend *nxdata, int readonly, int is_tls)
{
  return "";
}

/* Look up a checkpoint named in an export name.  Return its index or
 * -1 after reporting why not.
 */
static ssize_t
export_checkpoint (const char *exportname, const char *name)
{
  const char *why = snap_name_invalid (name);
  ssize_t i;

  if (why) {
    nbdkit_error ("export '%s': invalid name '%s': %s",
                  exportname, name, why);
    return -1;
  }
  i = manifest_find_checkpoint (&store.m, name);
  if (i == -1)
    nbdkit_error ("export '%s': no checkpoint named '%s'", exportname, name);
  return i;
}

/* Parse exportname into h and take references on the checkpoints it
 * names (store.lock held shared).  Return 0 or -1 (error reported).
 */
static int
parse_export (const char *exportname, struct handle *h)
{
  ssize_t i, j;

  if (exportname[0] == '\0') {
    h->kind = EXPORT_LIVE;
    return 0;
  }
  /* Every name this filter serves is short printable ASCII: anything
   * else is refused here, and written to the log escaped, cut short.
   */
  if (!snap_printable (exportname) || strlen (exportname) > 256) {
    char shown[300];
    nbdkit_error ("unknown export '%s': export names are printable ASCII "
                  "('', 'snap/NAME', 'dirty/FROM' or 'dirty/FROM/TO')",
                  snap_escape (exportname, shown, sizeof shown));
    return -1;
  }
  if (strncmp (exportname, SNAP_PREFIX, strlen (SNAP_PREFIX)) == 0) {
    const char *name = exportname + strlen (SNAP_PREFIX);
    i = export_checkpoint (exportname, name);
    if (i == -1)
      return -1;
    if (store.m.ckpts[i].kind != CKPT_SNAPSHOT) {
      nbdkit_error ("export '%s': '%s' is a bitmap-only checkpoint, which "
                    "keeps no data to read (use dirty/%s for its changed "
                    "blocks)", exportname, name, name);
      return -1;
    }
    h->kind = EXPORT_SNAP;
    strcpy (h->name, name);
    h->refs[0] = store.maps[i];
  }
  else if (strncmp (exportname, DIRTY_PREFIX, strlen (DIRTY_PREFIX)) == 0) {
    const char *from = exportname + strlen (DIRTY_PREFIX);
    const char *slash = strchr (from, '/');
    char fromname[SNAP_NAME_MAX + 2] = "";

    if (slash == NULL)
      i = export_checkpoint (exportname, from);
    else {
      if ((size_t) (slash - from) >= sizeof fromname)
        i = export_checkpoint (exportname, from);   /* too long: report */
      else {
        memcpy (fromname, from, slash - from);
        i = export_checkpoint (exportname, fromname);
      }
    }
    if (i == -1)
      return -1;
    h->kind = EXPORT_DIRTY;
    strcpy (h->name, store.m.ckpts[i].name);
    h->refs[0] = store.maps[i];
    if (slash) {
      j = export_checkpoint (exportname, slash + 1);
      if (j == -1)
        return -1;
      if (store.m.ckpts[j].kind != CKPT_SNAPSHOT) {
        nbdkit_error ("export '%s': '%s' is a bitmap-only checkpoint: the "
                      "end of a dirty/FROM/TO range must be a snapshot, "
                      "which keeps the data", exportname, slash + 1);
        return -1;
      }
      if (j < i) {
        /* Swapped, if FROM is a snapshot; else no range ends at it. */
        if (store.m.ckpts[i].kind == CKPT_SNAPSHOT)
          nbdkit_error ("export '%s': '%s' is older than '%s': use "
                        "dirty/%s/%s", exportname, slash + 1, fromname,
                        slash + 1, fromname);
        else
          nbdkit_error ("export '%s': '%s' is older than '%s', and '%s' is "
                        "a bitmap-only checkpoint, which cannot end a "
                        "range: use dirty/%s for the changes since '%s' "
                        "with the live contents", exportname, slash + 1,
                        fromname, fromname, slash + 1, slash + 1);
        return -1;
      }
      strcpy (h->to, slash + 1);
      h->refs[1] = store.maps[j];
    }
  }
  else {
    nbdkit_error ("unknown export '%s': expected '' (the live volume), "
                  "'snap/NAME', 'dirty/FROM' or 'dirty/FROM/TO'",
                  exportname);
    return -1;
  }
  /* A snapshot being deleted cannot be opened: its view changes as
   * the merge runs, and it goes away at the end.  (Connections open
   * when the delete was asked for make it refuse to start.)
   */
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&store.job_lock);
    const struct job *job = store.job ? store.job
      : store.stuck.id ? &store.stuck : NULL;
    if (job && job->kind == JOB_DELETE &&
        (strcmp (job->name, h->name) == 0 ||
         strcmp (job->name, h->to) == 0)) {
      nbdkit_error ("export '%s': snapshot '%s' is being deleted (job %"
                    PRIu64 ")", exportname, job->name, job->id);
      return -1;
    }
  }
  for (int k = 0; k < 2; ++k)
    if (h->refs[k])
      __atomic_add_fetch (&h->refs[k]->refs, 1, __ATOMIC_SEQ_CST);
  return 0;
}

static void
snapshot_close (void *handle)
{
  struct handle *h = handle;

  for (int k = 0; k < 2; ++k)
    if (h->refs[k])
      __atomic_sub_fetch (&h->refs[k]->refs, 1, __ATOMIC_SEQ_CST);
  free (h);
}

static void *
snapshot_open (nbdkit_next_open *next, nbdkit_context *context,
               int readonly, const char *exportname, int is_tls)
{
  struct handle *h = calloc (1, sizeof *h);

  if (h == NULL) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  {
    ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
    if (parse_export (exportname, h) == -1) {
      free (h);
      return NULL;
    }
  }

  /* The plugin always serves its default export; only the live view
   * ever writes to it.
   */
  if (next (context, readonly || h->kind != EXPORT_LIVE, "") == -1) {
    snapshot_close (h);
    return NULL;
  }
  return h;
}

/* Where a connection reads from (store.lock held shared). */
struct route {
  struct view view;             /* what it reads */
  struct view below;            /* the view under it, during a revert */
  ssize_t from, to;             /* DIRTY: checkpoint range [from, to) */
};

/* A snapshot a connection reads stopped being one: the store was full
 * and it was invalidated (snapshot-full=invalidate).
 */
static int
invalidated (const char *name, int *err)
{
  nbdkit_error ("snapshot '%s' was invalidated (the store was full): its "
                "data is gone", name);
  *err = EIO;
  return -1;
}

/* Where a connection reads from.  Return 0, or -1 with *err set. */
static int
route (struct handle *h, struct route *r, int *err)
{
  ssize_t i;

  r->from = r->to = -1;
  switch (h->kind) {
  case EXPORT_LIVE:
    store.kind->live_view (&r->view, &r->below);
    return 0;
  case EXPORT_SNAP:
    /* References keep the checkpoint from being deleted. */
    i = manifest_find_checkpoint (&store.m, h->name);
    assert (i >= 0);
    if (store.m.ckpts[i].kind != CKPT_SNAPSHOT)
      return invalidated (h->name, err);
    store.kind->snapshot_view (i, &r->view);
    return 0;
  case EXPORT_DIRTY:
    r->from = manifest_find_checkpoint (&store.m, h->name);
    assert (r->from >= 0);
    if (h->to[0]) {
      r->to = manifest_find_checkpoint (&store.m, h->to);
      assert (r->to >= 0);
      if (store.m.ckpts[r->to].kind != CKPT_SNAPSHOT)
        return invalidated (h->to, err);
      store.kind->snapshot_view (r->to, &r->view);
    }
    else {
      r->to = store.m.nckpts;
      store.kind->live_view (&r->view, &r->below);
    }
    return 0;
  }
  abort ();
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

  if (h->kind == EXPORT_LIVE)
    s = live_description ();
  else {
    ssize_t i = manifest_find_checkpoint (&store.m, h->name);
    assert (i >= 0);
    s = checkpoint_description (i, h->kind == EXPORT_DIRTY);
  }
  if (s == NULL)
    return NULL;
  return nbdkit_strdup_intern (s);
}

static int
snapshot_can_write (nbdkit_next *next, void *handle)
{
  struct handle *h = handle;
  ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);

  if (h->kind != EXPORT_LIVE)
    return 0;
  return store.kind->can_write (next);
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

  return store.kind->can_multi_conn (next);
}

/* ---- Data ---- */

static int
snapshot_pread (nbdkit_next *next, void *handle, void *buf,
                uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
  struct route r;

  note_request ();
  if (route (handle, &r, err) == -1)
    return -1;
  if (r.from >= 0)
    return dirty_pread (next, r.from, r.to, &r.view, buf, count, offset,
                        err);
  return view_pread (next, &r.view, buf, count, offset, err);
}

/* A write, zero or trim of the live volume.  When the store is full
 * and the policy is to invalidate snapshots (snapshot-full), the kind
 * says STORE_FULL: make room with the store unlocked, and try again.
 */
enum write_op { WRITE_DATA, WRITE_ZERO, WRITE_TRIM };

static int
live_write (nbdkit_next *next, void *handle, enum write_op op,
            const void *buf, uint32_t count, uint64_t offset, uint32_t flags,
            int *err)
{
  assert (((struct handle *) handle)->kind == EXPORT_LIVE);
  note_request ();
  if (store_refuses (op == WRITE_DATA ? "write"
                     : op == WRITE_ZERO ? "zero" : "trim", err))
    return -1;
  for (;;) {
    int r;

    {
      ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
      switch (op) {
      case WRITE_DATA:
        r = store.kind->pwrite (next, buf, count, offset, flags, err);
        break;
      case WRITE_ZERO:
        r = store.kind->zero (next, count, offset, flags, err);
        break;
      case WRITE_TRIM:
        r = store.kind->trim (next, count, offset, flags, err);
        break;
      default:
        abort ();
      }
    }
    if (r != STORE_FULL)
      return r;
    if (store_invalidate_oldest (err) == -1)
      return -1;
  }
}

static int
snapshot_pwrite (nbdkit_next *next, void *handle, const void *buf,
                 uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  return live_write (next, handle, WRITE_DATA, buf, count, offset, flags,
                     err);
}

static int
snapshot_zero (nbdkit_next *next, void *handle, uint32_t count,
               uint64_t offset, uint32_t flags, int *err)
{
  return live_write (next, handle, WRITE_ZERO, NULL, count, offset, flags,
                     err);
}

static int
snapshot_trim (nbdkit_next *next, void *handle, uint32_t count,
               uint64_t offset, uint32_t flags, int *err)
{
  return live_write (next, handle, WRITE_TRIM, NULL, count, offset, flags,
                     err);
}

static int
snapshot_flush (nbdkit_next *next, void *handle, uint32_t flags, int *err)
{
  ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);

  note_request ();
  /* A flush after a failed sync must not report what it covered as
   * durable (store.h).
   */
  if (store_refuses ("flush", err))
    return -1;
  if (store.kind->flush (next, flags, err) == -1)
    return -1;
  /* A good moment to shrink the write-intent regions (intent.c). */
  if (intent_clear (true) == -1) {
    *err = errno;
    nbdkit_error ("flush: clearing the write-intent regions: %m");
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
  struct route r;

  note_request ();
  if (route (handle, &r, err) == -1)
    return -1;
  if (r.from >= 0)
    return dirty_extents (r.from, r.to, count, offset, flags, extents, err);
  return view_extents (next, &r.view, count, offset, flags, extents, err);
}

static int
snapshot_cache (nbdkit_next *next, void *handle, uint32_t count,
                uint64_t offset, uint32_t flags, int *err)
{
  ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
  struct route r;

  note_request ();
  if (route (handle, &r, err) == -1)
    return -1;
  return view_cache (next, &r.view, count, offset, err);
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
