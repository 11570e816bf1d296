/* nbdkit-snapshot: background jobs: deleting a snapshot (merge) and
 * reverting to one.
 *
 * A job runs in a thread of its own.  Its plan (struct job_ops) comes
 * from the store's kind (kind.h), chosen once when the job is planned;
 * the rest is shared by every kind:
 *
 *   job.c      its lifecycle and journal (the manifest's job line),
 *   copy.c     the copy engine: the scan, in steps with pages locked,
 *   flusher.c  write-back of what it copies while it copies,
 *   pace.c     giving way to busy clients, and deleting dropped files.
 */
#ifndef SNAPSHOT_JOB_H
#define SNAPSHOT_JOB_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "manifest.h"

struct layer;
struct job;

/* A job's plan.  Every function runs with store.lock held (shared
 * while copying, with the pages locked; exclusive to finish).
 */
struct job_ops {
  const char *what;             /* "commit", "stream", "revert", ... */
  /* The first page at or after p the job might copy. */
  uint64_t (*next_candidate) (struct job *j, uint64_t p);
  /* Whether page p is still to be copied. */
  bool (*want) (struct job *j, uint64_t p);
  /* Copy pages [p, q), using buf (CHUNK_PAGES pages). */
  int (*copy_run) (struct job *j, char *buf, uint64_t p, uint64_t q);
  /* The layer the job fills (synced as it goes, then at the end), or
   * NULL when it writes the origin.
   */
  struct layer *(*target) (struct job *j);
  /* The job has copied everything: change the manifest and the store
   * (store.lock exclusive).  Return 0, or -1 with *errmsg set.
   */
  int (*finish) (struct job *j, char **errmsg);
  /* NULL if the job can be cancelled and forgotten; else it cannot
   * stop half way (clients already see its result, or the view of the
   * snapshot being deleted is partly changed): it stays in the journal
   * when it fails, and this sets *errmsg to say why it cannot stop.
   */
  void (*cannot_cancel) (struct job *j, char **errmsg);
};

enum job_state { JOB_STATE_RUNNING, JOB_STATE_DONE, JOB_STATE_FAILED,
                 JOB_STATE_CANCELLED };

struct job {
  uint64_t id;
  enum job_kind kind;           /* JOB_DELETE or JOB_REVERT */
  char name[SNAP_NAME_MAX + 1]; /* the snapshot */
  enum job_strategy strategy;   /* delete: commit or stream */
  bool keep_bitmap;
  char output[4096];
  uint64_t commit_bytes, stream_bytes; /* delete (row): the two costs */
  uint64_t move_bytes;          /* delete (cbw): the bytes moved */
  int state;                    /* enum job_state */
  uint64_t bytes_total;         /* what the plan copies (set to
                                   bytes_done when the job ends: clients
                                   may have written some pages first) */
  uint64_t bytes_done;          /* atomic: copied by this run of it */
  uint64_t recent_rate;         /* atomic: bytes a second over the last
                                   RATE_WINDOW_NS, 0 until one passed */
  int64_t started_ns, finished_ns;
  char *error;                  /* failed: why */
  bool cancel, shutdown;        /* atomic requests to stop */
  bool resumed;                 /* resumed after a restart */
  bool paced;                   /* atomic: held to snapshot-job-rate
                                   because clients are busy */
  /* -D snapshot.job_hold=1 only (job_park; store.job_lock): */
  uint64_t steps;               /* steps copied so far */
  uint64_t hold_budget;         /* steps it may still take before it
                                   parks (UINT64_MAX: released) */
  bool held;                    /* parked, waiting for "job-release" */
  const struct job_ops *ops;    /* its plan (set by the kind's plan) */
  size_t upper;                 /* delete: layer indexes of the plan; */
  ssize_t lower;                /* lower < 0 means the origin */
};

/* ---- job.c: lifecycle and journal ---- */

/* Whether a job runs; if so set *errmsg (naming the job, or saying
 * that snapshot name already has one) and return true.
 */
extern bool job_busy (const char *name, char **errmsg);

/* Start deleting snapshot name (strategy: STRATEGY_* or -1 for auto).
 * Sets the two costs.  Return the job's id, or 0 with *errmsg set.
 */
extern uint64_t job_start_delete (const char *name, int strategy,
                                     const char *output, bool keep_bitmap,
                                     bool origin_writable,
                                     uint64_t *commit_bytes,
                                     uint64_t *stream_bytes, char **errmsg);
extern uint64_t job_start_revert (const char *name, char **errmsg);

/* Resume the job the manifest names, if any (at start-up). */
extern int job_resume (void);

/* Ask running job id to stop.  Return 0, or -1 with *errmsg set. */
extern int job_cancel (uint64_t id, char **errmsg);

/* Stop the job thread at shutdown (the journal keeps the job). */
extern void job_stop (void);

/* Call fn for every job, finished ones first (store.job_lock held). */
extern void job_list (void (*fn) (const struct job *j, void *opaque),
                      void *opaque);

/* Job id, running or finished (store.job_lock held), or NULL. */
extern const struct job *job_find (uint64_t id);

/* -D snapshot.job_hold=1 (tests): job_park parks job j (in its thread)
 * while it has no steps left to take, until "job-release" gives it
 * some (job_release: steps more, or all of them if steps < 0) or it is
 * asked to stop; job_stepped counts a step taken.  job_release returns
 * 0, or -1 with *errmsg set.
 */
extern void job_park (struct job *j);
extern void job_stepped (struct job *j);
extern int job_release (uint64_t id, int64_t steps, char **errmsg);

/* Call fn when a job ends ("wait" requests are answered then). */
extern void job_set_end_notify (void (*fn) (void));

/* Run job j from its journal entry, which the manifest saved by the
 * caller names (store.lock exclusive).  push: start a new empty newest
 * layer first, in the same save.  j is consumed.  Return its id, or 0
 * with *errmsg set and the store as it was.
 */
extern uint64_t job_launch (struct job *j, bool push, char **errmsg);

/* The end of a delete of checkpoint ci, once the kind has changed the
 * manifest's layers (store.lock exclusive): the snapshot goes (kept as
 * a bitmap-only checkpoint with --keep-bitmap, else its bits folded
 * into the next older map), the job line goes, in one save; then layer
 * index drop (unless -1) is dropped.  saved is the manifest as it was
 * before the kind's changes: on error it is put back (job_undo_end)
 * and *errmsg set.  Return 0 or -1.
 */
extern int job_end_delete (struct job *j, size_t ci, ssize_t drop,
                           struct manifest *saved, char **errmsg);
extern int job_undo_end (struct job *j, struct manifest *saved,
                         char **errmsg);

/* A dropped layer (store.lock exclusive): remove store.layers[i], the
 * manifest having stopped naming it; its files are deleted once the
 * job has ended.
 */
extern void job_drop_layer (size_t i);

/* ---- copy.c: the copy engine ---- */

/* Pages copied in one locked step (1 MiB). */
#define CHUNK_PAGES 256

/* Copy everything j's plan wants, then sync what it wrote.  Return 0,
 * or -1 with errno set (ESHUTDOWN: nbdkit stops; ECANCELED).
 */
extern int job_scan (struct job *j);

/* Store pages [p, q) from buf into layer l and set their bits; runs of
 * all-zero pages become holes.  Return 0, or -1 with errno set.
 */
extern int layer_put (struct layer *l, const char *buf, uint64_t p,
                      uint64_t q);

/* Pages held by layer lo (lo < 0: the origin) that layer up lacks. */
extern uint64_t pages_missing (ssize_t lo, size_t up);

/* Bytes of pages, clipped to the volume; byte range of pages [p, q). */
extern uint64_t pages_bytes (uint64_t pages);
extern uint64_t run_off (uint64_t p);
extern uint64_t run_len (uint64_t p, uint64_t q);

/* ---- flusher.c: write-back while copying ---- */

/* A job asks its flusher to sync each time it has copied this much. */
#define FLUSH_AHEAD_BYTES (UINT64_C (64) << 20)

struct flusher;

/* Start a flusher for job j's target; false if there is none.  Kick it
 * once everything before upto is copied (sync: sync as well); note a
 * range the job wrote; stop it, returning its first error (errno) or
 * 0.  See flusher.c.
 */
extern struct flusher *flusher_start (struct job *j);
extern void flusher_kick (struct flusher *f, uint64_t upto, bool sync);
extern void flusher_note (struct flusher *f, uint64_t off, uint64_t len);
extern int flusher_stop (struct flusher *f);
/* Whether f syncs a layer (else the origin). */
extern bool flusher_has_layer (const struct flusher *f);

/* ---- pace.c: giving way to clients ---- */

struct pace {
  uint64_t requests;            /* client_requests when last read */
  int64_t busy_ns;              /* when clients were last seen busy (0: never) */
  int64_t start_ns;             /* start of the paced stretch (0: none) */
  uint64_t bytes;               /* copied since start_ns */
};

extern void pace_init (struct pace *pc);
/* After a step that copied bytes: if clients are busy, sleep until the
 * job (j; NULL: deleting files) is back down to snapshot-job-rate.
 */
extern void pace_step (struct job *j, struct pace *pc, uint64_t bytes);
/* Whether j was asked to stop. */
extern bool job_stopping (struct job *j);

/* The rate a running job reports (over the last RATE_WINDOW_NS). */
struct rate_window {
  int64_t start_ns;
  uint64_t start_bytes;
};
extern void rate_step (struct job *j, struct rate_window *rw, uint64_t done);

/* Set while a new job starts or nbdkit stops: a dropped layer still
 * being deleted is then unlinked at once.
 */
extern void pace_hurry (bool hurry);

/* Delete the files paths[0..n) (freed) gently: shrunk a step at a
 * time, paced while clients are busy, then unlinked.
 */
extern void delete_gently (char **paths, size_t n);
/* The same at once. */
extern void delete_files (char **paths, size_t n);

#endif /* SNAPSHOT_JOB_H */
