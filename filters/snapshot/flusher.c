/* nbdkit-snapshot: jobs write back what they copy while they copy
 * (job.h).
 *
 * What a job copies sits in the page cache until its final sync, and
 * on an otherwise idle machine the disk would wait for the whole copy
 * before writing any of it.  A flusher thread syncs the job's target
 * (the origin, or the layer it fills) each time FLUSH_AHEAD_BYTES more
 * have been copied, while the copy goes on, so copying and writing back
 * overlap and the final sync finds little left to write.  On the bench
 * machine a 95% commit of 1 GiB takes 0.64 s with it against 0.86 s
 * without, a 5% stream 0.79 s against 0.95 s, a 50% one 0.46 s against
 * 0.58 s.  What a crash may
 * lose still rests on the final job_sync alone.  A layer's sync also
 * writes its map (layer_flush_fd), which records the job's progress:
 * the job thread then needs no periodic sync of its own, which would
 * stall the copy while the disk caught up (such fdatasync calls, the
 * final one included, take 1.3 s of a 2.65 s stream of 2 GiB).
 *
 * Into a layer, the flusher also starts write-back of each step as soon
 * as it is copied (sync_file_range, SYNC_FILE_RANGE_WRITE), so that a
 * job smaller than FLUSH_AHEAD_BYTES overlaps too: a 95% stream of
 * 1 GiB (51 MiB copied) takes 0.095 s instead of 0.103 s (medians of 6
 * interleaved runs on the bench machine), its final fdatasync 32 ms
 * instead of 68 ms.  That call is not free: it submits the I/O
 * and waits for room in the disk's queue (362 us a call, 1.4 s in all
 * of a stream of 2 GiB under strace -w), so the job thread
 * only reports how far it has copied and goes on copying.
 */
#include <config.h>

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
#include "store.h"
#include "util.h"

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
 * (docs/benchmarks.md, "New page-cache pages on this VM").  Only the runs the job wrote: the
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

  name_thread ("snap-flush");
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

/* Start a flusher for job j's target, or return NULL if there is
 * none (the origin of a plugin that is not parallel: bg_next must then
 * be used by one thread at a time).
 */
struct flusher *
flusher_start (struct job *j)
{
  struct flusher *f = calloc (1, sizeof *f);
  int e;

  if (f == NULL)
    return NULL;
  {
    ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
    f->l = j->ops->target (j);
  }
  if (f->l == NULL && !origin_parallel ()) {
    free (f);
    return NULL;
  }
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
      free (f);
      return NULL;
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
    free (f);
    return NULL;
  }
  return f;
}

/* The job has copied everything before offset upto; sync is true to
 * ask for a sync as well.  The flusher is woken only if it has work:
 * a sync, or write-back to start in a layer (not after every step of a
 * commit into the origin).
 */
void
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
void
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
int
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
  free (f);
  return err;
}

bool
flusher_has_layer (const struct flusher *f)
{
  return f->l != NULL;
}
