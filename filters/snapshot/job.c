/* nbdkit-snapshot: background jobs: deleting a snapshot (merge) and
 * reverting to one.
 *
 * Notes on the design
 * -------------------
 *
 * Deleting snapshot S folds two neighbouring layers into one: "upper",
 * the layer S started (the first layer not in S's view), and "lower",
 * the newest layer of S's view, or the origin if S is the oldest.  Only
 * S's view tells them apart, so once S is gone either direction gives
 * every other view the same contents:
 *
 *   commit  copy upper's pages down into lower, then drop upper.
 *           Cost: the pages upper holds.
 *   stream  copy lower's pages that upper lacks up into upper, then drop
 *           lower (for the origin: the origin is never read again; with
 *           --output upper's data file gets its final name).
 *           Cost: the pages lower holds that upper lacks.
 *
 * auto picks the one that moves fewer bytes.  Committing into the
 * origin needs it writable.  A commit needs a quiet upper, so when upper
 * is the live top layer the job first starts a new empty top layer.
 *
 * Reverting to S starts a new empty top layer and, until the job is
 * done, reads the pages it lacks from S's view instead of the layers
 * below it ("revert_depth"): clients see S's contents at once.  The job
 * copies every page changed since S (held by a layer outside S's view)
 * into the new layer, then the override ends.  Blocks changed since S
 * are marked in the active dirty map before the revert takes effect.
 *
 * Every view reads the same at every moment: a page moves into a layer
 * that is only read where the other layer already gives the same bytes,
 * or under the page range lock where a client may write it.
 *
 * Crashes: the manifest's "job" line is the journal.  All copying is
 * idempotent (copy what is still missing, or copy again what is there),
 * and the manifest changes that end a job are one atomic save; so after
 * kill -9 the job simply runs again from the start of its scan,
 * skipping what is done, and every view reads as before throughout.
 *
 * One job runs at a time (store.job): another delete or revert is
 * refused with the job's id.  Checkpoints may be taken while a delete
 * runs (new layers go on top, where the plan does not look), but no
 * snapshot while a revert runs (the revert owns the newest layer), and
 * the snapshot being deleted cannot be opened.
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
#include "mapfile.h"
#include "store.h"
#include "util.h"

#define CHUNK_PAGES 256                 /* 1 MiB per locked step */
/* Correctness needs only the sync at the end of a job (before the
 * manifest changes): a copy that a crash loses was never visible.
 * Syncing on the way only bounds the work redone after a crash, and
 * each sync stalls the copy, so it is rare, and only done when there
 * is no flusher (below), whose syncs do it without stalling the copy.
 */
#define SYNC_EVERY_PAGES (1024 * 256)   /* flush progress every GiB */

static pthread_t job_thread;
static bool job_thread_running;

/* Finished jobs, newest last, for "jobs" (protected by store.job_lock). */
#define MAX_HISTORY 64
static struct job history[MAX_HISTORY];
static size_t nhistory;

static int64_t
now_ns (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * INT64_C (1000000000) + ts.tv_nsec;
}

/* ---- Planning (store.lock held) ---- */

/* Index of the first layer not in snapshot c's view. */
static size_t
upper_index (const struct manifest_checkpoint *c)
{
  return store_snapshot_depth (c);
}

/* Pages held by layer lo that layer up lacks (lo < 0: the origin). */
static uint64_t
pages_missing (ssize_t lo, size_t up)
{
  const struct sbitmap *u = &store.layers[up]->map;
  uint64_t n = 0, p;

  if (lo < 0)
    return store.npages - sbitmap_count (u);
  p = sbitmap_find_next_set (&store.layers[lo]->map, 0);
  while (p < store.npages) {
    uint64_t e = sbitmap_find_next_clear (&store.layers[lo]->map, p);
    n += (e - p) - sbitmap_count_range (u, p, e - p);
    p = sbitmap_find_next_set (&store.layers[lo]->map, e);
  }
  return n;
}

/* Pages a revert copies: those held by a layer outside the reverted-to
 * view (below the newest), each once, that the newest layer lacks.
 */
static uint64_t
revert_pages (void)
{
  const struct sbitmap *top = &store.layers[store.nlayers - 1]->map;
  uint64_t n = 0, p = 0;

  while (p < store.npages) {
    uint64_t s = store.npages, e;
    bool more;

    for (size_t i = store.revert_depth; i + 1 < store.nlayers; ++i)
      s = MIN (s, sbitmap_find_next_set (&store.layers[i]->map, p));
    if (s >= store.npages)
      break;
    /* The run goes on while any of the layers holds the page. */
    e = s;
    do {
      more = false;
      for (size_t i = store.revert_depth; i + 1 < store.nlayers; ++i)
        if (e < store.npages && sbitmap_test (&store.layers[i]->map, e)) {
          e = sbitmap_find_next_clear (&store.layers[i]->map, e);
          more = true;
        }
    } while (more);
    n += (e - s) - sbitmap_count_range (top, s, e - s);
    p = e;
  }
  return n;
}

static uint64_t
pages_bytes (uint64_t pages)
{
  return MIN (pages * PAGE_SIZE_BYTES, store.size);
}

/* ---- Copying ---- */

/* Copying goes by runs of consecutive pages (at most a chunk), so a
 * chunk costs a few large reads and writes rather than one per page.
 */
static char job_buf[CHUNK_PAGES * PAGE_SIZE_BYTES];

static bool
is_zero (const char *buf, size_t len)
{
  static const char zero[PAGE_SIZE_BYTES];

  for (size_t o = 0; o < len; o += PAGE_SIZE_BYTES)
    if (memcmp (buf + o, zero, MIN ((size_t) PAGE_SIZE_BYTES, len - o)))
      return false;
  return true;
}

/* Byte range of pages [p, q), clipped to the volume. */
static inline uint64_t
run_off (uint64_t p)
{
  return p << PAGE_SHIFT;
}

static inline uint64_t
run_len (uint64_t p, uint64_t q)
{
  return MIN (q << PAGE_SHIFT, store.size) - (p << PAGE_SHIFT);
}

/* Store pages [p, q) from buf into layer l and set their bits.  An
 * all-zero run becomes a hole (it reads as zeros and takes no space).
 */
static int
layer_put (struct layer *l, const char *buf, uint64_t p, uint64_t q)
{
  uint64_t off = run_off (p), len = run_len (p, q);

  if (!is_zero (buf, len) ||
      fallocate (l->data_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                 off, len) == -1) {
    if (full_pwrite (l->data_fd, buf, len, off) == -1)
      return -1;
  }
  __atomic_store_n (&l->data_dirty, 1, __ATOMIC_SEQ_CST);
  return sbitmap_set_range (&l->map, p, q - p) == -1 ? -1 : 0;
}

/* What a job copies, page by page (store.lock shared, pages locked). */
static bool
want_commit (struct job *j, uint64_t p)
{
  return sbitmap_test (&store.layers[j->upper]->map, p);
}

static bool
want_stream (struct job *j, uint64_t p)
{
  if (sbitmap_test (&store.layers[j->upper]->map, p))
    return false;               /* upper has it (maybe a client wrote it) */
  return j->lower < 0 || sbitmap_test (&store.layers[j->lower]->map, p);
}

static bool
want_revert (struct job *j, uint64_t p)
{
  if (sbitmap_test (&store.layers[store.nlayers - 1]->map, p))
    return false;
  /* Changed since the snapshot: held by a layer outside its view. */
  for (size_t i = store.revert_depth; i < store.nlayers - 1; ++i)
    if (sbitmap_test (&store.layers[i]->map, p))
      return true;
  return false;
}

/* Copy one run [p, q) for job j. */
static int
copy_run (struct job *j, uint64_t p, uint64_t q)
{
  const uint64_t off = run_off (p), len = run_len (p, q);
  int err = 0, r;

  if (j->kind == JOB_REVERT) {
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&bg_lock);
      r = view_pread (bg_next, store.revert_depth, job_buf, len, off, &err);
    }
    if (r == -1) {
      errno = err;
      return -1;
    }
    return layer_put (store.layers[store.nlayers - 1], job_buf, p, q);
  }
  if (j->strategy == STRATEGY_COMMIT) {
    if (full_pread (store.layers[j->upper]->data_fd, job_buf, len, off) == -1)
      return -1;
    if (j->lower >= 0)
      return layer_put (store.layers[j->lower], job_buf, p, q);
    return origin_pwrite (job_buf, len, off);
  }
  if (j->lower >= 0
      ? full_pread (store.layers[j->lower]->data_fd, job_buf, len, off)
      : origin_pread (job_buf, len, off))
    return -1;
  return layer_put (store.layers[j->upper], job_buf, p, q);
}

struct flusher;
static void flusher_note (struct flusher *f, uint64_t off, uint64_t len);

/* One step: copy every wanted page of [p, e) in runs, noting each with
 * the flusher f of a layer, if any.
 */
static int
job_step (struct job *j, struct flusher *f, uint64_t p, uint64_t e)
{
  bool (*want) (struct job *, uint64_t) =
    j->kind == JOB_REVERT ? want_revert
    : j->strategy == STRATEGY_COMMIT ? want_commit : want_stream;

  while (p < e) {
    uint64_t q;

    while (p < e && !want (j, p))
      p++;
    for (q = p; q < e && want (j, q); ++q)
      ;
    if (q > p) {
      if (copy_run (j, p, q) == -1)
        return -1;
      if (f)
        flusher_note (f, run_off (p), run_len (p, q));
      __atomic_add_fetch (&j->bytes_done, run_len (p, q), __ATOMIC_SEQ_CST);
    }
    p = q;
  }
  return 0;
}

/* The layer that must be made durable as the job goes, or NULL. */
static struct layer *
job_target (struct job *j)
{
  if (j->kind == JOB_REVERT)
    return store.layers[store.nlayers - 1];
  if (j->strategy == STRATEGY_STREAM)
    return store.layers[j->upper];
  return j->lower >= 0 ? store.layers[j->lower] : NULL;
}

static int
job_sync (struct job *j)
{
  struct layer *l = job_target (j);

  if (l)
    return layer_flush (l);
  return origin_flush ();
}

/* The first page at or after p that job j might copy (store.lock
 * held): lets the scan skip empty stretches without locking them.
 */
static uint64_t
next_candidate (struct job *j, uint64_t p)
{
  uint64_t n = store.npages;

  if (j->kind == JOB_REVERT) {
    for (size_t i = store.revert_depth; i < store.nlayers - 1; ++i)
      n = MIN (n, sbitmap_find_next_set (&store.layers[i]->map, p));
    return n;
  }
  if (j->strategy == STRATEGY_COMMIT)
    return sbitmap_find_next_set (&store.layers[j->upper]->map, p);
  if (j->lower >= 0)
    return sbitmap_find_next_set (&store.layers[j->lower]->map, p);
  return sbitmap_find_next_clear (&store.layers[j->upper]->map, p);
}

/* ---- Writing back while copying ---- */

/* What a job copies sits in the page cache until its final sync, and
 * on an otherwise idle machine the disk would wait for the whole copy
 * before writing any of it.  A flusher thread syncs the job's target
 * (the origin, or the layer it fills) each time FLUSH_AHEAD_BYTES more
 * have been copied, while the copy goes on, so copying and writing back
 * overlap and the final sync finds little left to write.  On the bench
 * machine a 95% commit of 1 GiB went from 0.86 to 0.64 s, a 5% stream
 * from 0.95 to 0.79 s, a 50% one from 0.58 to 0.46 s.  What a crash may
 * lose still rests on the final job_sync alone.  A layer's sync also
 * writes its map (layer_flush_fd), which records the job's progress:
 * the job thread then needs no periodic sync of its own, which stalled
 * the copy while the disk caught up (its fdatasync calls, the final one
 * included, took 1.3 s of a 2.65 s stream of 2 GiB, session 6).
 *
 * Into a layer, the flusher also starts write-back of each step as soon
 * as it is copied (sync_file_range, SYNC_FILE_RANGE_WRITE), so that a
 * job smaller than FLUSH_AHEAD_BYTES overlaps too: a 95% stream of
 * 1 GiB (51 MiB copied) took 0.095 s instead of 0.103 s (medians of 6
 * interleaved runs, docs/benchmarks.md, session 5), its final fdatasync
 * 32 ms instead of 68 ms.  That call is not free: it submits the I/O
 * and waits for room in the disk's queue (362 us a call, 1.4 s in all
 * of a stream of 2 GiB under strace -w, session 6), so the job thread
 * only reports how far it has copied and goes on copying.
 */
#define FLUSH_AHEAD_BYTES (UINT64_C (64) << 20)

/* A byte range of the layer that a job wrote. */
struct run {
  uint64_t off, len;
};

struct flusher {
  struct layer *l;              /* the layer to sync, or NULL: the origin */
  int fd;                       /* the flusher's own descriptor of l's data */
  pthread_t thread;
  pthread_mutex_t lock;
  pthread_cond_t cond;
  bool kicked;                  /* a sync was asked for since the last */
  uint64_t upto;                /* bytes before this offset are copied */
  uint64_t started;             /* write-back is started up to here */
  struct run *runs;             /* what the job wrote since the last sync */
  size_t nruns, cap;
  bool stop;
  int err;                      /* errno of the first failed sync, or 0 */
};

static int
flusher_sync (struct flusher *f)
{
  /* A layer: its data, then its map, which is the job's progress. */
  if (f->l) {
    ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
    return layer_flush_fd (f->l, f->fd);
  }
  /* Without bg_lock: only started when the plugin is parallel. */
  return origin_flush_unlocked ();
}

/* What the job wrote, once on disk, may leave the page cache: a merge
 * passes over data no client asked for, and the freed pages serve the
 * rest of the copy: on a VM that hands free memory back to its host,
 * writing into pages just freed costs far less than into new ones
 * (docs/benchmarks.md, session 3).  Only the runs the job wrote: the
 * rest of the layer is the clients' data, and may be what they read.
 * (Clean pages only: a client's dirty ones stay.)
 */
static void
flusher_drop (struct flusher *f, const struct run *runs, size_t n)
{
  for (size_t i = 0; i < n; ++i)
    posix_fadvise (f->fd, runs[i].off, runs[i].len, POSIX_FADV_DONTNEED);
}

static void *
flusher_main (void *arg)
{
  struct flusher *f = arg;

  for (;;) {
    CLEANUP_FREE struct run *runs = NULL;
    size_t nruns = 0;
    uint64_t upto;
    bool kicked;

    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&f->lock);
      while (!f->kicked && !f->stop && !(f->l && f->upto > f->started))
        pthread_cond_wait (&f->cond, &f->lock);
      if (f->stop)
        return NULL;            /* The job does the final sync. */
      kicked = f->kicked;
      f->kicked = false;
      upto = f->upto;
      if (kicked) {
        /* Written before this sync starts, so covered by it. */
        runs = f->runs;
        nruns = f->nruns;
        f->runs = NULL;
        f->nruns = f->cap = 0;
      }
    }
    /* A layer: start writing back what was copied since the last time
     * (asynchronous; errors are the syncs' to report).
     */
    if (f->l && upto > f->started) {
      sync_file_range (f->fd, f->started, upto - f->started,
                       SYNC_FILE_RANGE_WRITE);
      f->started = upto;
    }
    if (!kicked)
      continue;
    /* A failed sync may report its error only once per open file, so
     * the final sync could miss it: keep it for the job.
     */
    if (flusher_sync (f) == -1) {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&f->lock);
      if (f->err == 0)
        f->err = errno ? errno : EIO;
    }
    else
      flusher_drop (f, runs, nruns);
  }
}

/* Start a flusher for job j's target; false if there is none (the
 * origin of a plugin that is not parallel: bg_next must then be used
 * by one thread at a time).
 */
static bool
flusher_start (struct flusher *f, struct job *j)
{
  int e;

  {
    ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
    f->l = job_target (j);
  }
  if (f->l == NULL && !origin_parallel ())
    return false;
  /* A descriptor of its own: a failed write-back reports its error once
   * per open file, and clients share the layer's data_fd (a revert, a
   * stream into the live layer).  The flusher must not take the error
   * that a client's flush is owed.
   */
  f->fd = -1;
  if (f->l) {
    CLEANUP_FREE char *path = layer_path (f->l->id, "data");
    f->fd = path ? open (path, O_RDWR | O_CLOEXEC) : -1;
    if (f->fd == -1) {
      nbdkit_debug ("snapshot: job flusher not started: %s: %m",
                    path ? path : "layer path");
      return false;
    }
  }
  pthread_mutex_init (&f->lock, NULL);
  pthread_cond_init (&f->cond, NULL);
  f->kicked = f->stop = false;
  f->err = 0;
  f->upto = f->started = 0;
  f->runs = NULL;
  f->nruns = f->cap = 0;
  e = pthread_create (&f->thread, NULL, flusher_main, f);
  if (e != 0) {
    nbdkit_debug ("snapshot: job flusher not started: %s", strerror (e));
    pthread_cond_destroy (&f->cond);
    pthread_mutex_destroy (&f->lock);
    if (f->fd >= 0)
      close (f->fd);
    return false;
  }
  return true;
}

/* The job has copied everything before offset upto; sync is true to
 * ask for a sync as well.  The flusher is woken only if it has work:
 * a sync, or write-back to start in a layer (not after every step of a
 * commit into the origin).
 */
static void
flusher_kick (struct flusher *f, uint64_t upto, bool sync)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&f->lock);
  f->kicked |= sync;
  f->upto = upto;
  if (sync || f->l)
    pthread_cond_signal (&f->cond);
}

/* The job wrote [off, off+len) of the layer (merged with the last run
 * when they touch).  Without memory the run is not noted, and stays
 * cached: only a hint is lost.
 */
static void
flusher_note (struct flusher *f, uint64_t off, uint64_t len)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&f->lock);
  struct run *last = f->nruns > 0 ? &f->runs[f->nruns - 1] : NULL;

  if (last && last->off + last->len == off) {
    last->len += len;
    return;
  }
  if (f->nruns == f->cap) {
    size_t cap = f->cap ? 2 * f->cap : 256;
    struct run *r = realloc (f->runs, cap * sizeof *r);
    if (r == NULL)
      return;
    f->runs = r;
    f->cap = cap;
  }
  f->runs[f->nruns++] = (struct run) { .off = off, .len = len };
}

/* Stop and join the flusher; its first error (errno), or 0. */
static int
flusher_stop (struct flusher *f)
{
  int err;

  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&f->lock);
    f->stop = true;
    pthread_cond_signal (&f->cond);
  }
  pthread_join (f->thread, NULL);
  err = f->err;
  free (f->runs);
  pthread_cond_destroy (&f->cond);
  pthread_mutex_destroy (&f->lock);
  if (f->fd >= 0)
    close (f->fd);
  return err;
}

/* ---- Giving way to clients ---- */

/* While clients are doing I/O, a job copies at most job_rate_param
 * bytes a second (snapshot-job-rate); once no client request has come
 * for CLIENTS_IDLE_NS, it copies at full speed again, like md's resync
 * between speed_limit_min and speed_limit_max.  At full speed a commit
 * dirties the page cache faster than the disk takes it, and the
 * write-back, the copying and the guest's own stalls under heavy I/O
 * tripled the p99 of 4K random reads on the bench machine; at 256 MiB/s
 * it stayed within about twice idle (docs/benchmarks.md, session 7).
 */
#define CLIENTS_IDLE_NS (INT64_C (100) * 1000000)
/* Time not used while clients were busy is not saved up for longer
 * than this: after a slow stretch, the job does not burst.
 */
#define PACE_SLACK_NS (INT64_C (100) * 1000000)
/* The longest single sleep, so a cancel or a shutdown is seen soon. */
#define PACE_SLICE_NS (INT64_C (50) * 1000000)

struct pace {
  uint64_t requests;            /* client_requests when last read */
  int64_t busy_ns;              /* when clients were last seen busy (0: never) */
  int64_t start_ns;             /* start of the paced stretch (0: none) */
  uint64_t bytes;               /* copied since start_ns */
};

static void
pace_init (struct pace *pc)
{
  *pc = (struct pace) {
    .requests = __atomic_load_n (&client_requests, __ATOMIC_RELAXED),
  };
}

static bool
job_stopping (struct job *j)
{
  return __atomic_load_n (&j->shutdown, __ATOMIC_SEQ_CST) ||
    __atomic_load_n (&j->cancel, __ATOMIC_SEQ_CST);
}

/* Set while a new job starts or nbdkit stops: a dropped layer still
 * being deleted (delete_gently) is then unlinked at once.
 */
static bool job_hurry;

/* After a step that copied BYTES: if clients are busy, sleep until the
 * job is back down to job_rate_param.  J is the job (NULL: deleting a
 * dropped layer's files, after the job).
 */
static void
pace_step (struct job *j, struct pace *pc, uint64_t bytes)
{
  uint64_t req;
  int64_t now, due;

  if (job_rate_param == 0)
    return;
  now = now_ns ();
  req = __atomic_load_n (&client_requests, __ATOMIC_RELAXED);
  if (req != pc->requests || snapshot_debug_job_busy) {
    pc->requests = req;
    pc->busy_ns = now;
  }
  if (pc->busy_ns == 0 || now - pc->busy_ns >= CLIENTS_IDLE_NS) {
    pc->start_ns = 0;           /* clients idle: full speed */
    if (j)
      __atomic_store_n (&j->paced, false, __ATOMIC_RELAXED);
    return;
  }
  if (j)
    __atomic_store_n (&j->paced, true, __ATOMIC_RELAXED);
  if (pc->start_ns == 0) {
    pc->start_ns = now;
    pc->bytes = 0;
    return;
  }
  pc->bytes += bytes;
  due = pc->start_ns +
    (int64_t) ((double) pc->bytes * 1e9 / (double) job_rate_param);
  if (due < now - PACE_SLACK_NS) {
    pc->start_ns = now;         /* slower than the rate anyway */
    pc->bytes = 0;
    return;
  }
  while (now < due &&
         !(j ? job_stopping (j) : __atomic_load_n (&job_hurry,
                                                  __ATOMIC_SEQ_CST))) {
    int64_t ns = MIN (due - now, PACE_SLICE_NS);
    struct timespec ts = {
      .tv_sec = ns / 1000000000,
      .tv_nsec = ns % 1000000000,
    };

    nanosleep (&ts, NULL);
    now = now_ns ();
  }
}

/* The rate a job reports while it runs is over the last
 * RATE_WINDOW_NS: held back while clients are busy, then at full
 * speed, its average would match neither.
 */
#define RATE_WINDOW_NS (INT64_C (500) * 1000000)

struct rate_window {
  int64_t start_ns;
  uint64_t start_bytes;
};

static void
rate_step (struct job *j, struct rate_window *rw, uint64_t done)
{
  const int64_t now = now_ns ();

  if (now - rw->start_ns < RATE_WINDOW_NS)
    return;
  __atomic_store_n (&j->recent_rate,
                    (uint64_t) ((done - rw->start_bytes) * 1e9 /
                                (now - rw->start_ns)), __ATOMIC_RELAXED);
  rw->start_ns = now;
  rw->start_bytes = done;
}

/* Copy what the job needs in chunks, each with the page range locked
 * and store.lock shared, so clients keep going between chunks.
 */
static int
job_copy (struct job *j, struct flusher *f)
{
  uint64_t p = 0, since_sync = 0, kicked_at = 0;
  uint64_t done = __atomic_load_n (&j->bytes_done, __ATOMIC_SEQ_CST);
  struct pace pc;
  struct rate_window rw = { .start_ns = now_ns (), .start_bytes = done };

  pace_init (&pc);
  while (p < store.npages) {
    uint64_t e;
    struct range r;
    int ret;

    {
      ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
      p = next_candidate (j, p);
    }
    if (p >= store.npages)
      break;
    e = MIN (p + CHUNK_PAGES, store.npages);

    if (__atomic_load_n (&j->shutdown, __ATOMIC_SEQ_CST)) {
      errno = ESHUTDOWN;
      return -1;
    }
    if (__atomic_load_n (&j->cancel, __ATOMIC_SEQ_CST)) {
      errno = ECANCELED;
      return -1;
    }
    {
      ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
      rangelock_acquire (&store.pages, &r, p, e - 1);
      ret = job_step (j, f && f->l ? f : NULL, p, e);
      rangelock_release (&store.pages, &r);
      if (ret == 0 && !f && (since_sync += e - p) >= SYNC_EVERY_PAGES) {
        ret = job_sync (j);
        since_sync = 0;
      }
    }
    if (ret == -1)
      return -1;
    p = e;
    {
      uint64_t was = done;

      done = __atomic_load_n (&j->bytes_done, __ATOMIC_SEQ_CST);
      pace_step (j, &pc, done - was);
      rate_step (j, &rw, done);
    }
    if (f) {
      bool sync = done - kicked_at >= FLUSH_AHEAD_BYTES;

      flusher_kick (f, MIN (p << PAGE_SHIFT, store.size), sync);
      if (sync)
        kicked_at = done;
    }
    /* -D snapshot.job_delay=US slows jobs down, for crash tests. */
    if (snapshot_debug_job_delay > 0) {
      struct timespec ts = {
        .tv_sec = snapshot_debug_job_delay / 1000000,
        .tv_nsec = snapshot_debug_job_delay % 1000000 * 1000,
      };
      nanosleep (&ts, NULL);
    }
  }
  return 0;
}

static int
job_scan (struct job *j)
{
  struct flusher f;
  bool flushing;
  int r, err;

  /* The layer the job fills must not keep a seal that its changes
   * would break.
   */
  {
    ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
    struct layer *l = job_target (j);
    if (l && layer_unseal (l) == -1)
      return -1;
  }
  flushing = flusher_start (&f, j);

  r = job_copy (j, flushing ? &f : NULL);
  err = errno;
  /* The final sync is not held back. */
  __atomic_store_n (&j->paced, false, __ATOMIC_RELAXED);
  if (flushing) {
    int ferr = flusher_stop (&f);
    if (r == 0 && ferr != 0) {
      r = -1;
      err = ferr;
    }
  }
  if (r == -1) {
    errno = err;
    return -1;
  }
  ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
  return job_sync (j);
}

/* ---- Finishing (store.lock exclusive) ---- */

/* Files of dropped layers, deleted after store.lock is released:
 * deleting a big sparse file can take seconds, and clients must not
 * wait for it.  (After a crash in between, the manifest's drop lines
 * say they may go, and the next start deletes them.)  Used by the job
 * thread only.
 */
static char *doomed[4];
static size_t ndoomed;

/* Remove layer index i from store.layers (the manifest is updated by
 * the caller); its files are deleted later by delete_doomed.
 */
static void
drop_layer (size_t i)
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
delete_files (char **paths, size_t n)
{
  for (size_t i = 0; i < n; ++i) {
    if (paths[i] && store_remove_path (paths[i]) == -1)
      nbdkit_debug ("snapshot: %s: left in place: %m", paths[i]);
    free (paths[i]);
  }
}

/* Unlinking a large file frees all its extents at once: on a file
 * system mounted with discard, a burst of discards.  Here a 2 GiB file
 * took 0.7 s to unlink, and the reads of a busy client stalled for
 * 10-22 ms every 100 ms meanwhile; shrunk 64 MiB at a time at
 * 256 MiB/s, their worst was 4-5 ms (docs/benchmarks.md, session 7).
 * So a dropped layer's files are shrunk in SHRINK_STEP_BYTES steps,
 * paced like a job's copy while clients are busy (RocksDB's
 * SstFileManager rate-limits file deletion for the same reason), then
 * unlinked.  job_hurry cuts that short.
 */
#define SHRINK_STEP_BYTES (INT64_C (64) << 20)

static void
delete_gently (char **paths, size_t n)
{
  for (size_t i = 0; i < n; ++i) {
    struct stat st;
    int fd;

    if (paths[i] == NULL)
      continue;
    /* Only the store's own file: not through a symlink (a layer given
     * its --output name is one, to the user's image), nor an inode
     * with another name.
     */
    fd = open (paths[i], O_WRONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd >= 0 && fstat (fd, &st) == 0 && S_ISREG (st.st_mode) &&
        st.st_nlink == 1) {
      off_t size = st.st_size;
      struct pace pc;

      pace_init (&pc);
      while (size > 0 && !__atomic_load_n (&job_hurry, __ATOMIC_SEQ_CST)) {
        off_t step = MIN (size, (off_t) SHRINK_STEP_BYTES);

        size -= step;
        if (ftruncate (fd, size) == -1)
          break;
        pace_step (NULL, &pc, step);
      }
    }
    if (fd >= 0)
      close (fd);
  }
  delete_files (paths, n);
}

static void
delete_doomed (void)
{
  delete_files (doomed, ndoomed);
  ndoomed = 0;
}

/* Give upper's data file its final name, atomically: hard link it as
 * output, then replace the store's name with a symlink to it.  Done
 * again after a crash, it finds the link in place.
 */
static int
give_output_name (struct layer *l, const char *output)
{
  CLEANUP_FREE char *data = layer_path (l->id, "data");
  CLEANUP_FREE char *tmp = NULL;
  CLEANUP_FREE char *target = NULL;
  struct stat st1, st2;

  if (data == NULL || asprintf (&tmp, "%s.link", data) == -1)
    return -1;
  target = realpath (data, NULL);
  if (target && strcmp (target, output) == 0)
    return 0;                   /* Already done. */
  if (link (data, output) == -1) {
    if (errno != EEXIST || stat (data, &st1) == -1 ||
        stat (output, &st2) == -1 || st1.st_ino != st2.st_ino)
      return -1;
  }
  /* The new name must be durable before the store's name points at
   * it.
   */
  {
    CLEANUP_FREE char *odir = strdup (output);
    char *slash = odir ? strrchr (odir, '/') : NULL;
    if (slash == NULL)
      return -1;                /* output is absolute (control.c) */
    slash[slash == odir ? 1 : 0] = '\0';
    if (fsync_dir (odir) == -1)
      return -1;
  }
  unlink (tmp);
  if (symlink (output, tmp) == -1 || rename (tmp, data) == -1 ||
      fsync_dir (store.dir) == -1)
    return -1;
  return 0;
}

static int
finish_delete (struct job *j, char **errmsg)
{
  ssize_t ci = manifest_find_checkpoint (&store.m, j->name);
  const size_t nckpts = store.m.nckpts;
  struct manifest saved;
  bool forget;

  assert (ci >= 0);
  if (manifest_dup (&store.m, &saved) == -1)
    goto err;

  if (j->strategy == STRATEGY_COMMIT) {
    /* Upper's pages are all in lower now. */
    manifest_remove_layer (&store.m, store.layers[j->upper]->id);
    if (store_drop_id (store.layers[j->upper]->id) == -1)
      goto err_restore;
  }
  else {
    uint64_t up_id = store.layers[j->upper]->id;
    if (j->lower >= 0) {
      uint64_t lo_id = store.layers[j->lower]->id;
      manifest_remove_layer (&store.m, lo_id);
      if (store_drop_id (lo_id) == -1)
        goto err_restore;
      /* A snapshot bound to lower keeps its view bound to upper. */
      for (size_t i = 0; i < store.m.nckpts; ++i)
        if (store.m.ckpts[i].kind == CKPT_SNAPSHOT &&
            store.m.ckpts[i].layer == lo_id)
          store.m.ckpts[i].layer = up_id;
    }
    else {
      store.m.origin_retired = true;
      store.m.has_sample = store.m.has_origin_file = false;
      if (j->output[0] &&
          give_output_name (store.layers[j->upper], j->output) == -1)
        goto err_restore;
    }
  }
  /* A commit into the origin that leaves a layer freezes it again (the
   * job has synced it).
   */
  if (j->strategy == STRATEGY_COMMIT && j->lower < 0 &&
      store.m.nlayers > 0 && origin_freeze () == -1)
    goto err_restore;

  /* Bits set in memory only while a snapshot was the newest checkpoint
   * must be on disk before it stops being one (store.maps still matches
   * the checkpoint list here).
   */
  if (ckpt_persist_active () == -1)
    goto err_restore;

  /* The snapshot goes; its checkpoint stays as bitmap-only with
   * --keep-bitmap, else its bits fold into the next older one.
   */
  forget = !j->keep_bitmap;
  if (j->keep_bitmap) {
    store.m.ckpts[ci].kind = CKPT_BITMAP;
    store.m.ckpts[ci].layer = 0;
  }
  else {
    if (ckpt_fold (ci) == -1 || store_drop_id (store.m.ckpts[ci].map) == -1)
      goto err_restore;
    manifest_remove_checkpoint (&store.m, ci);
  }
  store.m.job.kind = JOB_NONE;
  if (store_save () == -1)
    goto err_restore;
  manifest_free (&saved);

  /* Now the in-memory structures follow the manifest. */
  if (forget)
    ckpt_forget (ci, nckpts);
  if (j->strategy == STRATEGY_COMMIT)
    drop_layer (j->upper);
  else if (j->lower >= 0)
    drop_layer (j->lower);
  return 0;

 err_restore:
  {
    int e = errno;
    manifest_free (&store.m);
    store.m = saved;
    errno = e;
  }
 err:
  set_errmsg (errmsg, "finishing the delete of '%s': %s",
              j->name, strerror (errno));
  return -1;
}

static int
finish_revert (struct job *j, char **errmsg)
{
  store.m.job.kind = JOB_NONE;
  if (store_save () == -1) {
    store.m.job.kind = JOB_REVERT;
    set_errmsg (errmsg, "finishing the revert to '%s': %s",
                j->name, strerror (errno));
    return -1;
  }
  store.revert_depth = -1;
  return 0;
}

/* Whether job j cannot stop half way: a revert (clients already see
 * the reverted volume), or a commit (it writes into the layer or
 * origin below, which the snapshot being deleted reads through).
 */
static bool
job_must_finish (const struct job *j)
{
  return j->kind == JOB_REVERT || j->strategy == STRATEGY_COMMIT;
}

/* Stop a job that failed or was cancelled (store.lock exclusive).
 * A stream leaves every view intact at every step, so forgetting the
 * job is enough.  A job that must finish stays in the manifest (the
 * snapshot stays "being deleted") and runs again at the next start.
 */
static void
abandon_job (struct job *j)
{
  if (job_must_finish (j))
    return;
  store.m.job.kind = JOB_NONE;
  if (store_save () == -1)
    nbdkit_error ("snapshot: job %" PRIu64 ": saving the manifest: %m",
                  j->id);
}

/* ---- The job thread ---- */

static void
job_done (struct job *j, int state, char *error)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&store.job_lock);

  j->state = state;
  j->error = error;
  j->finished_ns = now_ns ();
  if (nhistory == MAX_HISTORY) {
    free (history[0].error);
    memmove (&history[0], &history[1], (MAX_HISTORY - 1) * sizeof history[0]);
    nhistory--;
  }
  history[nhistory++] = *j;
  if (state == JOB_STATE_FAILED && job_must_finish (j)) {
    store.stuck = *j;
    store.stuck.error = NULL;
  }
  store.job = NULL;
  free (j);
  pthread_cond_broadcast (&store.job_cond);
  control_job_ended ();
}

static void *
job_main (void *arg)
{
  struct job *j = arg;
  char *errmsg = NULL;
  char *dead[sizeof doomed / sizeof doomed[0]];
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
    ACQUIRE_WRLOCK_FOR_CURRENT_SCOPE (&store.lock);
    if (r == 0)
      r = j->kind == JOB_REVERT ? finish_revert (j, &errmsg)
        : finish_delete (j, &errmsg);
    else {
      if (errno != ECANCELED)
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

/* Fill in the plan of job j from the manifest (store.lock held). */
static int
job_plan (struct job *j)
{
  ssize_t ci = manifest_find_checkpoint (&store.m, j->name);

  if (ci < 0 || store.m.ckpts[ci].kind != CKPT_SNAPSHOT) {
    errno = ENOENT;
    return -1;
  }
  if (j->kind == JOB_REVERT) {
    store.revert_depth = upper_index (&store.m.ckpts[ci]);
    j->bytes_total = pages_bytes (revert_pages ());
    return 0;
  }
  j->upper = upper_index (&store.m.ckpts[ci]);
  assert (j->upper < store.nlayers);
  j->lower = (ssize_t) j->upper - 1;
  /* The costs as they are now (after a restart: what is left). */
  j->commit_bytes = pages_bytes (sbitmap_count (&store.layers[j->upper]->map));
  j->stream_bytes = pages_bytes (pages_missing (j->lower, j->upper));
  j->bytes_total = j->strategy == STRATEGY_COMMIT
    ? j->commit_bytes : j->stream_bytes;
  return 0;
}

/* Wait for the job thread, if any, to end; it may still be deleting
 * a dropped layer's files, which job_hurry makes it finish at once.
 */
static void
join_job_thread (void)
{
  if (!job_thread_running)
    return;
  __atomic_store_n (&job_hurry, true, __ATOMIC_SEQ_CST);
  pthread_join (job_thread, NULL);
  __atomic_store_n (&job_hurry, false, __ATOMIC_SEQ_CST);
  job_thread_running = false;
}

static int
job_spawn (struct job *j)
{
  int err;

  j->state = JOB_STATE_RUNNING;
  j->started_ns = now_ns ();
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

/* Give job j an id, record it in the journal (after starting a new
 * top layer if push), plan it and start it (store.lock exclusive).  j
 * is consumed.  Return its id, or 0 with *errmsg set and the store as
 * it was.
 */
static uint64_t
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
  job_plan (j);                 /* a revert sets store.revert_depth */
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
      drop_layer (store.nlayers - 1);
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

uint64_t
job_start_delete (const char *name, int strategy, const char *output,
                  bool keep_bitmap, bool origin_writable,
                  uint64_t *commit_bytes, uint64_t *stream_bytes,
                  char **errmsg)
{
  ACQUIRE_WRLOCK_FOR_CURRENT_SCOPE (&store.lock);
  ssize_t ci = manifest_find_checkpoint (&store.m, name);
  struct job *j;
  bool is_auto;
  size_t up;
  ssize_t lo;
  unsigned refs;

  if (ci < 0) {
    set_errmsg (errmsg, "no checkpoint named '%s'", name);
    return 0;
  }
  if (store.m.ckpts[ci].kind != CKPT_SNAPSHOT) {
    set_errmsg (errmsg, "'%s' is a bitmap-only checkpoint: it has no data "
                "to merge (--strategy, --output and --keep-bitmap apply "
                "to snapshots)", name);
    return 0;
  }
  refs = store_connections (ci);
  if (refs > 0) {
    set_errmsg (errmsg, "snapshot '%s' is in use by %u connection%s "
                "(snap/ or dirty/ exports): disconnect first", name, refs,
                refs == 1 ? "" : "s");
    return 0;
  }
  up = upper_index (&store.m.ckpts[ci]);
  lo = (ssize_t) up - 1;
  *commit_bytes = pages_bytes (sbitmap_count (&store.layers[up]->map));
  *stream_bytes = pages_bytes (pages_missing (lo, up));

  is_auto = strategy < 0;
  /* auto: --output means a stream; else the fewer bytes, and a commit
   * on a tie: it writes into space already allocated and frees the
   * upper layer (deleted after the job ends, outside every lock),
   * while a stream allocates new space in the sparse upper layer,
   * which bench/merge measured slower per byte.
   */
  if (is_auto)
    strategy = output || *stream_bytes < *commit_bytes
      ? STRATEGY_STREAM : STRATEGY_COMMIT;
  if (strategy == STRATEGY_COMMIT && lo < 0 && !origin_writable) {
    if (!is_auto) {
      set_errmsg (errmsg, "cannot commit '%s' into the origin: the origin "
                  "is read-only (nbdkit -r, or a read-only plugin); use "
                  "--strategy=stream", name);
      return 0;
    }
    strategy = STRATEGY_STREAM; /* the only way without writing it */
  }
  if (output && (strategy != STRATEGY_STREAM || lo >= 0)) {
    set_errmsg (errmsg, "--output applies only when '%s' is streamed "
                "into the oldest layer (the oldest snapshot, with "
                "--strategy=stream)", name);
    return 0;
  }

  j = calloc (1, sizeof *j);
  if (j == NULL) {
    set_errmsg (errmsg, "calloc: %s", strerror (errno));
    return 0;
  }
  j->kind = JOB_DELETE;
  strcpy (j->name, name);
  j->strategy = strategy;
  j->keep_bitmap = keep_bitmap;
  if (output)
    strcpy (j->output, output);
  j->commit_bytes = *commit_bytes;
  j->stream_bytes = *stream_bytes;
  /* A commit into the origin writes it: its sample goes first, in the
   * manifest that starts the job.
   */
  if (strategy == STRATEGY_COMMIT && lo < 0)
    origin_thaw ();
  /* A commit needs upper quiet: if clients write it, start a new top. */
  return job_launch (j, strategy == STRATEGY_COMMIT &&
                     up == store.nlayers - 1, errmsg);
}

uint64_t
job_start_revert (const char *name, char **errmsg)
{
  ACQUIRE_WRLOCK_FOR_CURRENT_SCOPE (&store.lock);
  ssize_t ci = manifest_find_checkpoint (&store.m, name);
  struct job *j;
  size_t d;

  if (ci < 0) {
    set_errmsg (errmsg, "no checkpoint named '%s'", name);
    return 0;
  }
  if (store.m.ckpts[ci].kind != CKPT_SNAPSHOT) {
    set_errmsg (errmsg, "'%s' is a bitmap-only checkpoint: it keeps no "
                "data to revert to", name);
    return 0;
  }
  d = upper_index (&store.m.ckpts[ci]);

  /* The live volume's blocks that change are those changed since S:
   * record them first, durably (guarantee 3).
   */
  for (size_t i = d; i < store.nlayers; ++i) {
    const struct sbitmap *map = &store.layers[i]->map;
    uint64_t p = sbitmap_find_next_set (map, 0);
    while (p < store.npages) {
      uint64_t e = sbitmap_find_next_clear (map, p);
      if (ckpt_mark_range (p << PAGE_SHIFT,
                           MIN (e << PAGE_SHIFT, store.size)
                           - (p << PAGE_SHIFT)) == -1)
        goto err;
      p = sbitmap_find_next_set (map, e);
    }
  }
  if (ckpt_persist_active () == -1)
    goto err;

  j = calloc (1, sizeof *j);
  if (j == NULL)
    goto err;
  j->kind = JOB_REVERT;
  strcpy (j->name, name);
  /* The new top layer takes the reverted pages; until the job ends,
   * pages it lacks come from the snapshot's view (job_plan).
   */
  return job_launch (j, true, errmsg);

 err:
  set_errmsg (errmsg, "cannot start reverting to '%s': %s", name,
              strerror (errno));
  return 0;
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
    ACQUIRE_WRLOCK_FOR_CURRENT_SCOPE (&store.lock);
    if (job_plan (j) == -1) {
      nbdkit_error ("snapshot: the manifest names job %" PRIu64 " on '%s', "
                    "which is not a snapshot (the store is damaged)",
                    j->id, j->name);
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

int
job_cancel (uint64_t id, char **errmsg)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&store.job_lock);
  struct job *j = store.job;

  if (j == NULL || j->id != id) {
    set_errmsg (errmsg, "no running job %" PRIu64, id);
    return -1;
  }
  if (j->kind == JOB_REVERT) {
    set_errmsg (errmsg, "job %" PRIu64 " is a revert, which cannot stop "
                "half way (clients already see the reverted volume)", id);
    return -1;
  }
  if (job_must_finish (j)) {
    set_errmsg (errmsg, "job %" PRIu64 " commits '%s' into the %s below, "
                "which cannot stop half way (the snapshot's view is "
                "already partly merged): wait for it", id, j->name,
                j->lower < 0 ? "origin" : "layer");
    return -1;
  }
  __atomic_store_n (&j->cancel, true, __ATOMIC_SEQ_CST);
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

int64_t
job_now_ns (void)
{
  return now_ns ();
}
