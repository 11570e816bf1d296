/* nbdkit-snapshot: jobs give way to clients (job.h). */
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
#include "store.h"
#include "util.h"


/* While clients are doing I/O, a job copies at most job_rate_param
 * bytes a second (snapshot-job-rate); once no client request has come
 * for CLIENTS_IDLE_NS, it copies at full speed again, like md's resync
 * between speed_limit_min and speed_limit_max.  At full speed a commit
 * dirties the page cache faster than the disk takes it, and the
 * write-back, the copying and the guest's own stalls under heavy I/O
 * tripled the p99 of 4K random reads on the bench machine; at 256 MiB/s
 * it stayed within about twice idle (docs/benchmarks.md).
 */
#define CLIENTS_IDLE_NS (INT64_C (100) * 1000000)
/* Time not used while clients were busy is not saved up for longer
 * than this: after a slow stretch, the job does not burst.
 */
#define PACE_SLACK_NS (INT64_C (100) * 1000000)
/* The longest single sleep, so a cancel or a shutdown is seen soon. */
#define PACE_SLICE_NS (INT64_C (50) * 1000000)


void
pace_init (struct pace *pc)
{
  *pc = (struct pace) {
    .requests = __atomic_load_n (&client_requests, __ATOMIC_RELAXED),
  };
}

bool
job_stopping (struct job *j)
{
  return __atomic_load_n (&j->shutdown, __ATOMIC_SEQ_CST) ||
    __atomic_load_n (&j->cancel, __ATOMIC_SEQ_CST);
}

/* Set while a new job starts or nbdkit stops (pace_hurry): a dropped
 * layer still being deleted (delete_gently) is then unlinked at once.
 */
static bool job_hurry;

void
pace_hurry (bool hurry)
{
  __atomic_store_n (&job_hurry, hurry, __ATOMIC_SEQ_CST);
}

/* After a step that copied BYTES: if clients are busy, sleep until the
 * job is back down to job_rate_param.  J is the job (NULL: deleting a
 * dropped layer's files, after the job).
 */
void
pace_step (struct job *j, struct pace *pc, uint64_t bytes)
{
  uint64_t req;
  int64_t now, due;

  if (job_rate_param == 0)
    return;
  now = snap_now_ns ();
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
    now = snap_now_ns ();
  }
}

/* The rate a job reports while it runs is over the last
 * RATE_WINDOW_NS: held back while clients are busy, then at full
 * speed, its average would match neither.
 */
#define RATE_WINDOW_NS (INT64_C (500) * 1000000)


void
rate_step (struct job *j, struct rate_window *rw, uint64_t done)
{
  const int64_t now = snap_now_ns ();

  if (now - rw->start_ns < RATE_WINDOW_NS)
    return;
  __atomic_store_n (&j->recent_rate,
                    (uint64_t) ((done - rw->start_bytes) * 1e9 /
                                (now - rw->start_ns)), __ATOMIC_RELAXED);
  rw->start_ns = now;
  rw->start_bytes = done;
}

void
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
 * 256 MiB/s, their worst was 4-5 ms (docs/benchmarks.md).
 * So a dropped layer's files are shrunk in SHRINK_STEP_BYTES steps,
 * paced like a job's copy while clients are busy (RocksDB's
 * SstFileManager rate-limits file deletion for the same reason), then
 * unlinked.  job_hurry cuts that short.
 */
#define SHRINK_STEP_BYTES (INT64_C (64) << 20)

void
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
