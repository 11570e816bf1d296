/* nbdkit-snapshot: background jobs: their lifecycle and journal.
 *
 * Notes on the design
 * -------------------
 *
 * A job deletes a snapshot (merges its data away) or reverts the live
 * volume to one.  What it copies and how it ends is its plan (job.h,
 * struct job_ops), which the store's kind chooses (kind.h): row.c and
 * cbw.c say what each kind's merges do.  This file runs them:
 *
 * - Journal.  The manifest's "job" line: the save that starts a job
 *   writes it, and the save that ends it (the plan's finish, one
 *   atomic save) removes it.  All copying is idempotent, so after
 *   kill -9 the job simply runs again at start-up (job_resume), and
 *   every view reads as before throughout.
 * - One job at a time (store.job): another delete or revert is refused
 *   with the job's id.
 * - A job that can be cancelled leaves every view as it was at every
 *   step, so forgetting it is enough; one that cannot (its plan's
 *   cannot_cancel) stays in the journal if it fails, and runs again at
 *   the next start.
 * - The layers a job drops are deleted once it is reported done, gently
 *   (pace.c); the manifest's drop lines cover a crash in between.
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
#include "origin.h"
#include "pending.h"
#include "store.h"
#include "util.h"

static pthread_t job_thread;
static bool job_thread_running;

/* Finished jobs, newest last, for "jobs" (protected by store.job_lock). */
#define MAX_HISTORY 64
static struct job history[MAX_HISTORY];
static size_t nhistory;

/* Called when a job ends (control.c answers "wait" requests). */
static void (*end_notify) (void);

void
job_set_end_notify (void (*fn) (void))
{
  end_notify = fn;
}

/* Files of dropped layers, deleted after store.lock is released:
 * deleting a big sparse file can take seconds, and clients must not
 * wait for it.  (After a crash in between, the manifest's drop lines
 * say they may go, and the next start deletes them.)  Used by the job
 * thread only.
 */
static char *doomed[64];
static size_t ndoomed;

void
job_drop_layer (size_t i)
{
  struct layer *l = store.layers[i];

  if (ndoomed + 2 <= sizeof doomed / sizeof doomed[0]) {
    doomed[ndoomed++] = layer_path (l->id, "data");
    doomed[ndoomed++] = layer_path (l->id, "map");
  }
  memmove (&store.layers[i], &store.layers[i + 1],
           (store.nlayers - i - 1) * sizeof store.layers[0]);
  store.nlayers--;
  layer_free (l);
}

static void
delete_doomed (void)
{
  delete_files (doomed, ndoomed);
  ndoomed = 0;
}

/* Stop a job that failed or was cancelled (store.lock exclusive).
 * One that can be cancelled leaves every view intact at every step, so
 * forgetting it is enough.  One that must finish stays in the manifest
 * (the snapshot stays "being deleted") and runs again at the next
 * start.
 */
static void
abandon_job (struct job *j)
{
  if (j->ops->cannot_cancel)
    return;
  store.m.job.kind = JOB_NONE;
  if (store_save () == -1)
    nbdkit_error ("snapshot: job %" PRIu64 ": saving the manifest: %m",
                  j->id);
}

/* ---- Ending a delete (store.lock exclusive) ---- */

int
job_undo_end (struct job *j, struct manifest *saved, char **errmsg)
{
  int e;

  store_restore (saved);
  e = errno;
  set_errmsg (errmsg, "finishing the delete of '%s': %s", j->name,
              strerror (e));
  errno = e;
  return -1;
}

int
job_end_delete (struct job *j, size_t ci, ssize_t drop,
                struct manifest *saved, char **errmsg)
{
  const size_t nckpts = store.m.nckpts;
  const bool forget = !j->keep_bitmap;

  /* Bits set in memory only while a snapshot was the newest checkpoint
   * must be on disk before it stops being one (store.maps still matches
   * the checkpoint list here).
   */
  if (ckpt_persist_active () == -1)
    return job_undo_end (j, saved, errmsg);

  /* The snapshot goes; its checkpoint stays as bitmap-only with
   * --keep-bitmap, else its bits fold into the next older one.
   */
  if (j->keep_bitmap) {
    store.m.ckpts[ci].kind = CKPT_BITMAP;
    store.m.ckpts[ci].layer = 0;
  }
  else {
    if (ckpt_fold (ci) == -1 || store_drop_id (store.m.ckpts[ci].map) == -1)
      return job_undo_end (j, saved, errmsg);
    manifest_remove_checkpoint (&store.m, ci);
  }
  store.m.job.kind = JOB_NONE;
  if (store_save () == -1)
    return job_undo_end (j, saved, errmsg);
  manifest_free (saved);

  /* Now the in-memory structures follow the manifest. */
  if (forget)
    ckpt_forget (ci, nckpts);
  if (drop >= 0)
    job_drop_layer (drop);
  return 0;
}

/* ---- The job thread ---- */

static void
job_done (struct job *j, int state, char *error)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&store.job_lock);

  j->state = state;
  j->error = error;
  j->finished_ns = snap_now_ns ();
  if (nhistory == MAX_HISTORY) {
    free (history[0].error);
    memmove (&history[0], &history[1], (MAX_HISTORY - 1) * sizeof history[0]);
    nhistory--;
  }
  history[nhistory++] = *j;
  if (state == JOB_STATE_FAILED && j->ops->cannot_cancel) {
    store.stuck = *j;
    store.stuck.error = NULL;
  }
  store.job = NULL;
  free (j);
  pthread_cond_broadcast (&store.job_cond);
  if (end_notify)
    end_notify ();
}

static void *
job_main (void *arg)
{
  struct job *j = arg;
  char *errmsg = NULL;
  char *dead[sizeof doomed / sizeof doomed[0]];

  name_thread ("snap-job");
  size_t ndead = 0;
  int r;

  nbdkit_debug ("snapshot: job %" PRIu64 " started", j->id);
  r = job_scan (j);
  if (r == -1 && errno == ESHUTDOWN) {
    /* nbdkit is stopping: the journal keeps the job for next time. */
    nbdkit_debug ("snapshot: job %" PRIu64 " interrupted by shutdown",
                  j->id);
    job_done (j, JOB_STATE_CANCELLED, NULL);
    return NULL;
  }
  {
    ACQUIRE_STORE_EXCLUSIVE_FOR_CURRENT_SCOPE ();
    if (r == 0)
      r = j->ops->finish (j, &errmsg);
    else {
      if (errno != ECANCELED && store_failed ())
        set_errmsg (&errmsg, "the store had an I/O error (%s): it takes "
                    "no more changes until nbdkit restarts",
                    store_failure ());
      else if (errno != ECANCELED)
        set_errmsg (&errmsg, "%s", strerror (errno));
      abandon_job (j);
    }
    /* Take the dropped layers' files, to delete them once the job is
     * reported done: unlinking a large sparse file can take seconds,
     * and neither clients (store.lock) nor "nbdsnap wait" need to wait
     * for it.  A crash before leaves them for store_sweep.
     */
    ndead = ndoomed;
    memcpy (dead, doomed, ndoomed * sizeof doomed[0]);
    ndoomed = 0;
  }
  if (r == 0) {
    /* Done: what it copied is the whole of it (clients may have
     * written pages it planned to copy).
     */
    j->bytes_total = __atomic_load_n (&j->bytes_done, __ATOMIC_SEQ_CST);
    nbdkit_debug ("snapshot: job %" PRIu64 " done", j->id);
    job_done (j, JOB_STATE_DONE, NULL);
  }
  else if (errmsg == NULL) {
    nbdkit_debug ("snapshot: job %" PRIu64 " cancelled", j->id);
    job_done (j, JOB_STATE_CANCELLED, NULL);
  }
  else {
    nbdkit_error ("snapshot: job %" PRIu64 " failed: %s", j->id, errmsg);
    job_done (j, JOB_STATE_FAILED, errmsg);
  }
  delete_gently (dead, ndead);
  return NULL;
}

/* Wait for the job thread, if any, to end; it may still be deleting
 * a dropped layer's files, which job_hurry makes it finish at once.
 */
static void
join_job_thread (void)
{
  if (!job_thread_running)
    return;
  pace_hurry (true);
  pthread_join (job_thread, NULL);
  pace_hurry (false);
  job_thread_running = false;
}

static int
job_spawn (struct job *j)
{
  int err;

  j->state = JOB_STATE_RUNNING;
  j->started_ns = snap_now_ns ();
  join_job_thread ();
  store.job = j;
  err = pthread_create (&job_thread, NULL, job_main, j);
  if (err) {
    store.job = NULL;
    errno = err;
    return -1;
  }
  job_thread_running = true;
  return 0;
}

/* ---- Starting jobs (control thread, store.control_lock held) ---- */

/* Refuse a request while a job runs.  Return true if refused. */
bool
job_busy (const char *name, char **errmsg)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&store.job_lock);
  struct job *j = store.job;

  if (j == NULL) {
    /* A job that must finish and failed stays in the journal until the
     * next start resumes it.
     */
    if (store.stuck.id == 0)
      return false;
    set_errmsg (errmsg, "job %" PRIu64 " (%s %s) failed and must finish "
                "before another job starts: see the server log, then "
                "restart nbdkit to resume it", store.stuck.id,
                store.stuck.kind == JOB_REVERT ? "revert" : "delete",
                store.stuck.name);
    return true;
  }
  if (name && strcmp (name, j->name) == 0)
    set_errmsg (errmsg, "snapshot '%s' already has a job running (job %"
                PRIu64 ", %s): wait for it or cancel it",
                name, j->id, j->kind == JOB_REVERT ? "revert" : "delete");
  else
    set_errmsg (errmsg, "job %" PRIu64 " (%s %s) is running: one job at a "
                "time; wait for it or cancel it", j->id,
                j->kind == JOB_REVERT ? "revert" : "delete", j->name);
  return true;
}

/* Start a new empty top layer (store.lock exclusive); the manifest is
 * saved by the caller.
 */
static int
push_layer (void)
{
  struct layer *l, **layers;
  uint64_t id = store.m.next_id;

  if (store.nlayers > 0 && layer_flush (store.layers[store.nlayers - 1]) == -1)
    return -1;
  layers = realloc (store.layers, (store.nlayers + 2) * sizeof *layers);
  if (layers == NULL)
    return -1;
  store.layers = layers;
  l = layer_create (id);
  if (l == NULL)
    return -1;
  if (manifest_add_layer (&store.m, id) == -1) {
    layer_free (l);
    return -1;
  }
  store.m.next_id++;
  if (store.nlayers > 0) {
    struct layer *old = store.layers[store.nlayers - 1];
    if (old->map_fd >= 0) {
      close (old->map_fd);
      old->map_fd = -1;
    }
  }
  store.layers[store.nlayers++] = l;
  return 0;
}

uint64_t
job_launch (struct job *j, bool push, char **errmsg)
{
  const char *what = j->kind == JOB_REVERT ? "reverting to" : "deleting";
  struct manifest saved;
  uint64_t id;

  if (manifest_dup (&store.m, &saved) == -1)
    goto err;
  id = j->id = store.m.next_id++;
  if (push && push_layer () == -1)
    goto err_restore;
  store.m.job = (struct manifest_job) {
    .kind = j->kind, .id = id, .strategy = j->strategy,
    .keep_bitmap = j->keep_bitmap,
  };
  strcpy (store.m.job.name, j->name);
  strcpy (store.m.job.output, j->output);
  if (store_save () == -1)
    goto err_restore;
  manifest_free (&saved);
  /* Planned on the store as the saved manifest has it (a revert also
   * sets the live view's override here).  It cannot fail on a store
   * that prepare_* accepted.
   */
  if (store.kind->plan (j, errmsg) == -1) {
    free (j);
    return 0;
  }
  if (job_spawn (j) == -1) {
    /* The journal names the job: the next start resumes it. */
    set_errmsg (errmsg, "starting job %" PRIu64 ": %s", id,
                strerror (errno));
    free (j);
    return 0;
  }
  return id;

 err_restore:
  {
    int e = errno;
    /* The manifest on disk is the old one: so is the store. */
    if (store.m.nlayers != saved.nlayers) {
      job_drop_layer (store.nlayers - 1);
      delete_doomed ();         /* just created: empty, quick */
    }
    manifest_free (&store.m);
    store.m = saved;
    errno = e;
  }
 err:
  set_errmsg (errmsg, "cannot start %s '%s': %s", what, j->name,
              strerror (errno));
  free (j);
  return 0;
}

/* The checkpoint named name, if it is a snapshot that no connection
 * uses (store.lock held); else -1 with *errmsg set.  what: "delete" or
 * "revert to".
 */
static ssize_t
job_snapshot (const char *name, bool in_use_ok, char **errmsg)
{
  ssize_t ci = manifest_find_checkpoint (&store.m, name);
  unsigned refs;

  if (ci < 0) {
    set_errmsg (errmsg, "no checkpoint named '%s'", name);
    return -1;
  }
  if (store.m.ckpts[ci].kind != CKPT_SNAPSHOT) {
    if (in_use_ok)
      set_errmsg (errmsg, "'%s' is a bitmap-only checkpoint: it keeps no "
                  "data to revert to", name);
    else
      set_errmsg (errmsg, "'%s' is a bitmap-only checkpoint: it has no "
                  "data to merge (--strategy, --output and --keep-bitmap "
                  "apply to snapshots)", name);
    return -1;
  }
  refs = store_connections (ci);
  if (!in_use_ok && refs > 0) {
    set_errmsg (errmsg, "snapshot '%s' is in use by %u connection%s "
                "(snap/ or dirty/ exports): disconnect first", name, refs,
                refs == 1 ? "" : "s");
    return -1;
  }
  return ci;
}

uint64_t
job_start_delete (const char *name, int strategy, const char *output,
                  bool keep_bitmap, bool origin_writable,
                  uint64_t *commit_bytes, uint64_t *stream_bytes,
                  char **errmsg)
{
  ACQUIRE_STORE_EXCLUSIVE_FOR_CURRENT_SCOPE ();
  ssize_t ci = job_snapshot (name, false, errmsg);
  struct job *j;
  bool push = false;

  if (ci < 0)
    return 0;
  j = calloc (1, sizeof *j);
  if (j == NULL) {
    set_errmsg (errmsg, "calloc: %s", strerror (errno));
    return 0;
  }
  j->kind = JOB_DELETE;
  strcpy (j->name, name);
  j->keep_bitmap = keep_bitmap;
  if (store.kind->prepare_delete (j, ci, strategy, output, origin_writable,
                                  &push, errmsg) == -1) {
    free (j);
    return 0;
  }
  *commit_bytes = j->commit_bytes;
  *stream_bytes = j->stream_bytes;
  return job_launch (j, push, errmsg);
}

uint64_t
job_start_revert (const char *name, char **errmsg)
{
  ACQUIRE_STORE_EXCLUSIVE_FOR_CURRENT_SCOPE ();
  ssize_t ci = job_snapshot (name, true, errmsg);
  struct job *j;
  bool push = false;

  if (ci < 0)
    return 0;
  j = calloc (1, sizeof *j);
  if (j == NULL) {
    set_errmsg (errmsg, "calloc: %s", strerror (errno));
    return 0;
  }
  j->kind = JOB_REVERT;
  strcpy (j->name, name);
  if (store.kind->prepare_revert (j, ci, &push, errmsg) == -1) {
    free (j);
    return 0;
  }
  return job_launch (j, push, errmsg);
}

int
job_resume (void)
{
  const struct manifest_job *mj = &store.m.job;
  struct job *j;

  if (mj->kind == JOB_NONE)
    return 0;
  j = calloc (1, sizeof *j);
  if (j == NULL) {
    nbdkit_error ("calloc: %m");
    return -1;
  }
  j->id = mj->id;
  j->kind = mj->kind;
  strcpy (j->name, mj->name);
  j->strategy = mj->strategy;
  j->keep_bitmap = mj->keep_bitmap;
  strcpy (j->output, mj->output);
  j->resumed = true;
  {
    ACQUIRE_STORE_EXCLUSIVE_FOR_CURRENT_SCOPE ();
    CLEANUP_FREE char *errmsg = NULL;

    if (store.kind->plan (j, &errmsg) == -1) {
      nbdkit_error ("snapshot: resuming job %" PRIu64 " on '%s': %s "
                    "(the store is damaged)", j->id, j->name,
                    errmsg ? errmsg : "out of memory");
      free (j);
      return -1;
    }
  }
  nbdkit_debug ("snapshot: resuming job %" PRIu64 " (%s %s)", j->id,
                j->kind == JOB_REVERT ? "revert" : "delete", j->name);
  if (job_spawn (j) == -1) {
    nbdkit_error ("snapshot: resuming job %" PRIu64 ": %m", j->id);
    free (j);
    return -1;
  }
  return 0;
}

/* ---- Holding jobs for tests: -D snapshot.job_hold=1 ---- */

/* Broadcast when a held job may go on (store.job_lock). */
static pthread_cond_t hold_cond = PTHREAD_COND_INITIALIZER;

void
job_park (struct job *j)
{
  if (!snapshot_debug_job_hold)
    return;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&store.job_lock);
  if (j->hold_budget > 0 || job_stopping (j))
    return;
  j->held = true;
  nbdkit_debug ("snapshot: job %" PRIu64 " held after %" PRIu64 " steps",
                j->id, j->steps);
  while (j->hold_budget == 0 && !job_stopping (j))
    pthread_cond_wait (&hold_cond, &store.job_lock);
  j->held = false;
}

void
job_stepped (struct job *j)
{
  if (!snapshot_debug_job_hold)
    return;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&store.job_lock);
  j->steps++;
  if (j->hold_budget > 0 && j->hold_budget != UINT64_MAX)
    j->hold_budget--;
}

int
job_release (uint64_t id, int64_t steps, char **errmsg)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&store.job_lock);
  struct job *j = store.job;

  if (j == NULL || j->id != id) {
    set_errmsg (errmsg, "no running job %" PRIu64, id);
    return -1;
  }
  if (steps < 0 || j->hold_budget == UINT64_MAX)
    j->hold_budget = UINT64_MAX;
  else
    j->hold_budget += steps;
  /* Not held from now on (until it parks again), so the caller can
   * wait for it to be held again.
   */
  if (j->hold_budget > 0)
    j->held = false;
  pthread_cond_broadcast (&hold_cond);
  return 0;
}

int
job_cancel (uint64_t id, char **errmsg)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&store.job_lock);
  struct job *j = store.job;

  if (j == NULL || j->id != id) {
    set_errmsg (errmsg, "no running job %" PRIu64, id);
    return -1;
  }
  if (j->ops->cannot_cancel) {
    j->ops->cannot_cancel (j, errmsg);
    return -1;
  }
  __atomic_store_n (&j->cancel, true, __ATOMIC_SEQ_CST);
  pthread_cond_broadcast (&hold_cond);     /* a held job stops too */
  return 0;
}

void
job_stop (void)
{
  /* At shutdown a running job is cancelled; its journal entry stays,
   * so the next start resumes it (a revert) or it is simply gone (a
   * delete that did not finish leaves every view as it was, and the
   * manifest still names it, so it resumes too).
   */
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&store.job_lock);
    if (store.job)
      __atomic_store_n (&store.job->shutdown, true, __ATOMIC_SEQ_CST);
    pthread_cond_broadcast (&hold_cond);
  }
  join_job_thread ();
  for (size_t i = 0; i < nhistory; ++i)
    free (history[i].error);
  nhistory = 0;
}

/* Describe the jobs (store.job_lock held by the caller). */
void
job_list (void (*fn) (const struct job *j, void *opaque), void *opaque)
{
  for (size_t i = 0; i < nhistory; ++i)
    fn (&history[i], opaque);
  if (store.job)
    fn (store.job, opaque);
}

const struct job *
job_find (uint64_t id)
{
  if (store.job && store.job->id == id)
    return store.job;
  for (size_t i = nhistory; i-- > 0; )
    if (history[i].id == id)
      return &history[i];
  return NULL;
}
