/* nbdkit-snapshot: the copy engine of jobs (job.h).
 *
 * A job's scan goes over the volume in steps of CHUNK_PAGES pages, each
 * with store.lock shared and the step's pages locked (store.pages), so
 * clients keep going between steps and never see a page half moved.
 * Within a step it copies runs of consecutive pages the plan wants
 * (j->ops), so a step costs a few large reads and writes rather than
 * one per page.  Its flusher writes back what it copies as it goes
 * (flusher.c); pace.c holds it back while clients are busy.  All the
 * copying is idempotent: after a crash the job runs again from the
 * start of its scan and copies what is still wanted.
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

/* Correctness needs only the sync at the end of a job (before the
 * manifest changes): a copy that a crash loses was never visible.
 * Syncing on the way only bounds the work redone after a crash, and
 * each sync stalls the copy, so it is rare, and only done when there
 * is no flusher (flusher.c), whose syncs do it without stalling the
 * copy.
 */
#define SYNC_EVERY_PAGES (1024 * 256)   /* flush progress every GiB */

/* The buffer of the job thread's steps (one job runs at a time). */
static char job_buf[CHUNK_PAGES * PAGE_SIZE_BYTES];

uint64_t
run_off (uint64_t p)
{
  return p << PAGE_SHIFT;
}

uint64_t
run_len (uint64_t p, uint64_t q)
{
  return MIN (q << PAGE_SHIFT, store.size) - (p << PAGE_SHIFT);
}

/* Pages held by layer lo that layer up lacks (lo < 0: the origin). */
uint64_t
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

uint64_t
pages_bytes (uint64_t pages)
{
  return MIN (pages * PAGE_SIZE_BYTES, store.size);
}

int
layer_put (struct layer *l, const char *buf, uint64_t p, uint64_t q)
{
  if (layer_store (l, buf, p, q) == -1)
    return -1;
  return sbitmap_set_range (&l->map, p, q - p) == -1 ? -1 : 0;
}

/* One step: copy every wanted page of [p, e) in runs, noting each with
 * the flusher f of a layer, if any.
 */
static int
job_step (struct job *j, struct flusher *f, uint64_t p, uint64_t e)
{
  bool (*want) (struct job *, uint64_t) = j->ops->want;

  while (p < e) {
    uint64_t q;

    while (p < e && !want (j, p))
      p++;
    for (q = p; q < e && want (j, q); ++q)
      ;
    if (q > p) {
      if (j->ops->copy_run (j, job_buf, p, q) == -1)
        return -1;
      if (f)
        flusher_note (f, run_off (p), run_len (p, q));
      __atomic_add_fetch (&j->bytes_done, run_len (p, q), __ATOMIC_SEQ_CST);
    }
    p = q;
  }
  return 0;
}

/* Make what job j wrote durable: its layer, or the origin. */
static int
job_sync (struct job *j)
{
  struct layer *l = j->ops->target (j);

  if (l)
    return layer_flush (l);
  return origin_flush ();
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
  struct rate_window rw = { .start_ns = snap_now_ns (), .start_bytes = done };

  pace_init (&pc);
  while (p < store.npages) {
    uint64_t e;
    struct range r;
    int ret;

    /* -D snapshot.job_hold=1: wait here for "job-release". */
    job_park (j);
    {
      ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
      p = j->ops->next_candidate (j, p);
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
    /* After a failed sync the store takes no more changes (store.h). */
    if (store_failed ()) {
      errno = EIO;
      return -1;
    }
    {
      ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
      rangelock_acquire (&store.pages, &r, p, e - 1);
      ret = job_step (j, f && flusher_has_layer (f) ? f : NULL, p, e);
      rangelock_release (&store.pages, &r);
      if (ret == 0 && !f && (since_sync += e - p) >= SYNC_EVERY_PAGES) {
        ret = job_sync (j);
        since_sync = 0;
      }
    }
    if (ret == -1)
      return -1;
    p = e;
    job_stepped (j);
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
    /* -D snapshot.job_delay=US slows jobs down, to watch them. */
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

int
job_scan (struct job *j)
{
  struct flusher *f;
  int r, err;

  /* The layer the job fills must not keep a seal that its changes
   * would break.
   */
  {
    ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
    struct layer *l = j->ops->target (j);
    if (l && layer_unseal (l) == -1)
      return -1;
  }
  f = flusher_start (j);

  r = job_copy (j, f);
  err = errno;
  /* The final sync is not held back. */
  __atomic_store_n (&j->paced, false, __ATOMIC_RELAXED);
  if (f) {
    int ferr = flusher_stop (f);
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
