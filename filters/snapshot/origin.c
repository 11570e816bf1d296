/* nbdkit-snapshot: the origin, the plugin below the filter.
 *
 * The filter keeps a context of its own on the plugin, bg_next, opened
 * in .after_fork: the control thread flushes the origin through it
 * when a snapshot freezes it, jobs read and write it, and start-up
 * reads samples of it.  Everything that touches the origin outside a
 * client's request goes through this file.
 *
 * The origin's identity.  A store belongs to one origin: over another
 * one every view would read wrong.  Besides the size, the manifest
 * records (manifest.h):
 *
 * - "origin-file": the device and inode of the file the origin is
 *   served from, when the plugin was given file=PATH of a regular file
 *   (a copy or a replacement has another inode; a block device's
 *   numbers can change at boot, so they are not recorded);
 * - "origin-sample": a hash of 16 pages read from the origin (the
 *   first one, and 15 spread over the volume by a fixed rule), present
 *   only while nothing writes the origin: while a snapshot has frozen
 *   it, and between a clean stop and the next start.  It is dropped
 *   before the origin can be written (at start-up when no snapshot
 *   exists, when a commit into the origin starts) and taken again when
 *   the origin is frozen (the first snapshot, the end of such a
 *   commit, a clean stop).
 *
 * A mismatch at start-up refuses the store, unless
 * snapshot-adopt-origin=true says the origin was moved or changed on
 * purpose.  Nothing is paid per request.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <nbdkit-filter.h>

#include "cleanup.h"
#include "origin.h"
#include "store.h"
#include "storefiles.h"
#include "util.h"

/* The filter's context on the plugin.  Protected by bg_lock. */
nbdkit_next *bg_next;
pthread_mutex_t bg_lock = PTHREAD_MUTEX_INITIALIZER;
static bool bg_writable;        /* bg_next was opened read-write */
/* nbdkit runs the plugin in the parallel thread model: bg_next may
 * then be called from two threads at once (a job's flusher).
 */
static bool bg_parallel;

/* nbdkit 1.32 does not tell filters about -r, and the background
 * context is opened before any connection says: read it from our own
 * command line.  nbdkit options that take an argument are skipped with
 * it; the first operand (the plugin) ends the options.
 */
static bool
server_readonly (void)
{
  static const char with_arg[] = "DegiPptUu";
  static const char *const long_with_arg[] = {
    "--debug", "--exportname", "--filter", "--group", "--ipaddr", "--log",
    "--mask-handshake", "--pidfile", "--port", "--run", "--selinux-label",
    "--threads", "--timeout", "--tls", "--tls-certificates", "--tls-psk",
    "--tls-verify-peer", "--unix", "--user", "--vsock", NULL
  };
  CLEANUP_FREE char *buf = NULL;
  size_t len = 0;
  FILE *fp = fopen ("/proc/self/cmdline", "r");
  bool ro = false;

  if (fp == NULL)
    return false;
  if (getdelim (&buf, &len, '\0', fp) == -1) {   /* argv[0] */
    fclose (fp);
    return false;
  }
  while (getdelim (&buf, &len, '\0', fp) != -1) {
    if (strcmp (buf, "-r") == 0 || strcmp (buf, "--readonly") == 0 ||
        strcmp (buf, "--read-only") == 0) {
      ro = true;
      continue;
    }
    if (strncmp (buf, "--", 2) == 0) {
      if (strcmp (buf, "--") == 0)
        break;
      if (strchr (buf, '=') == NULL)
        for (size_t i = 0; long_with_arg[i]; ++i)
          if (strcmp (buf, long_with_arg[i]) == 0) {
            if (getdelim (&buf, &len, '\0', fp) == -1)
              goto out;
            break;
          }
      continue;
    }
    if (buf[0] != '-' || buf[1] == '\0')
      break;                    /* The plugin name: options end. */
    for (size_t i = 1; buf[i]; ++i) {
      if (buf[i] == 'r')
        ro = true;
      if (strchr (with_arg, buf[i])) {
        if (buf[i + 1] == '\0' && getdelim (&buf, &len, '\0', fp) == -1)
          goto out;
        break;
      }
    }
  }
 out:
  fclose (fp);
  return ro;
}

bool
origin_writable (void)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&bg_lock);

  return bg_writable && !server_readonly ();
}


/* The filter keeps a context of its own on the plugin (bg_next) beside
 * the clients' ones.  An origin that serves one connection at a time
 * would leave every client waiting for ever behind it: qemu-nbd with
 * its default --shared=1 queues a second connection without ever
 * answering it, and the nbd plugin, unless shared=true, opens one
 * connection per context.  So at start-up open a second context from
 * a thread of its own, and refuse to start if it does not open within
 * snapshot_debug_origin_probe_ms.
 */
struct probe {
  nbdkit_backend *backend;
  pthread_mutex_t lock;
  pthread_cond_t cond;
  bool done;
  bool abandoned;               /* timed out: the thread frees it */
};

static void *
probe_main (void *arg)
{
  struct probe *p = arg;
  nbdkit_next *ctx;
  bool abandoned;

  name_thread ("snap-probe");
  ctx = nbdkit_next_context_open (p->backend, 1, "", 0);
  if (ctx)
    nbdkit_next_context_close (ctx);
  pthread_mutex_lock (&p->lock);
  p->done = true;
  abandoned = p->abandoned;
  pthread_cond_signal (&p->cond);
  pthread_mutex_unlock (&p->lock);
  if (abandoned)
    free (p);
  return NULL;
}

static int
probe_origin (nbdkit_backend *backend)
{
  struct probe *p = calloc (1, sizeof *p);
  struct timespec deadline;
  pthread_t thread;
  bool done;
  int err;

  if (p == NULL) {
    nbdkit_error ("calloc: %m");
    return -1;
  }
  p->backend = backend;
  pthread_mutex_init (&p->lock, NULL);
  pthread_cond_init (&p->cond, NULL);
  err = pthread_create (&thread, NULL, probe_main, p);
  if (err) {
    free (p);
    return 0;                   /* no probe: go on as before */
  }
  pthread_detach (thread);
  clock_gettime (CLOCK_REALTIME, &deadline);
  deadline.tv_sec += snapshot_debug_origin_probe_ms / 1000;
  deadline.tv_nsec += snapshot_debug_origin_probe_ms % 1000 * 1000000L;
  if (deadline.tv_nsec >= 1000000000) {
    deadline.tv_sec++;
    deadline.tv_nsec -= 1000000000;
  }
  pthread_mutex_lock (&p->lock);
  while (!p->done &&
         pthread_cond_timedwait (&p->cond, &p->lock, &deadline) == 0)
    ;
  done = p->done;
  p->abandoned = !done;
  pthread_mutex_unlock (&p->lock);
  if (done) {
    free (p);
    return 0;
  }
  nbdkit_error ("snapshot: the origin did not take a second connection "
                "within %d ms: the filter needs one of its own besides the "
                "clients' (for flushes and jobs), and with an origin that "
                "serves one connection at a time every client would wait "
                "for ever.  If the origin is qemu-nbd, start it with "
                "--shared=0 (or --shared=N with N > 1); or give the nbd "
                "plugin shared=true",
                snapshot_debug_origin_probe_ms);
  return -1;
}


void
origin_set_parallel (bool parallel)
{
  bg_parallel = parallel;
}

bool
origin_parallel (void)
{
  return bg_parallel;
}

int
origin_open (nbdkit_backend *backend, int64_t *size)
{
  /* Prefer a writable context so a flush reaches the origin; a
   * read-only plugin still works (the origin is never written once a
   * snapshot exists).
   */
  bg_next = nbdkit_next_context_open (backend, 0, "", 0);
  bg_writable = bg_next != NULL;
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
  if (probe_origin (backend) == -1)
    return -1;
  *size = bg_next->get_size (bg_next);
  if (*size == -1)
    return -1;
  /* nbdkit checks a context's capabilities before data calls: ask now. */
  if (bg_writable && bg_next->can_write (bg_next) != 1)
    bg_writable = false;
  if (bg_next->can_flush (bg_next) == -1)
    return -1;
  return 0;
}

void
origin_close (void)
{
  if (bg_next) {
    bg_next->finalize (bg_next);
    nbdkit_next_context_close (bg_next);
    bg_next = NULL;
  }
}

int
origin_flush (void)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&bg_lock);

  return origin_flush_unlocked ();
}

int
origin_flush_unlocked (void)
{
  int err = 0;

  if (bg_next == NULL || bg_next->can_flush (bg_next) != 1)
    return 0;
  if (bg_next->flush (bg_next, 0, &err) == -1) {
    errno = err ? err : EIO;
    return -1;
  }
  return 0;
}

int
origin_pread (void *buf, uint32_t len, uint64_t off)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&bg_lock);
  int err = 0;

  if (bg_next->pread (bg_next, buf, len, off, 0, &err) == -1) {
    errno = err ? err : EIO;
    return -1;
  }
  return 0;
}

int
origin_pwrite (const void *buf, uint32_t len, uint64_t off)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&bg_lock);
  int err = 0;

  if (bg_next->pwrite (bg_next, buf, len, off, 0, &err) == -1) {
    errno = err ? err : EIO;
    return -1;
  }
  return 0;
}

/* ---- A client's requests on the origin ---- */

/* FUA goes to the plugin as a flush after the write when it cannot do
 * FUA itself.
 */
static int
client_fua (nbdkit_next *next, uint32_t flags, int *err)
{
  if ((flags & NBDKIT_FLAG_FUA) && next->can_fua (next) == NBDKIT_FUA_NONE)
    return next->flush (next, 0, err);
  return 0;
}

static uint32_t
client_flags (nbdkit_next *next, uint32_t flags)
{
  if (next->can_fua (next) == NBDKIT_FUA_NONE)
    flags &= ~NBDKIT_FLAG_FUA;
  return flags;
}

int
origin_client_pwrite (nbdkit_next *next, const void *buf, uint32_t count,
                      uint64_t offset, uint32_t flags, int *err)
{
  if (next->pwrite (next, buf, count, offset, client_flags (next, flags),
                    err) == -1)
    return -1;
  return client_fua (next, flags, err);
}

int
origin_client_zero (nbdkit_next *next, uint32_t count, uint64_t offset,
                    uint32_t flags, int *err)
{
  static const char zeros[65536];
  uint32_t wflags;

  if (next->can_zero (next) != NBDKIT_ZERO_NONE) {
    if (next->zero (next, count, offset, client_flags (next, flags),
                    err) == -1)
      return -1;
    return client_fua (next, flags, err);
  }
  wflags = client_flags (next, flags) &
    ~(NBDKIT_FLAG_MAY_TRIM | NBDKIT_FLAG_FAST_ZERO);
  while (count > 0) {
    uint32_t n = MIN (count, (uint32_t) sizeof zeros);
    if (next->pwrite (next, zeros, n, offset, wflags, err) == -1)
      return -1;
    count -= n;
    offset += n;
  }
  return client_fua (next, flags, err);
}

int
origin_client_trim (nbdkit_next *next, uint32_t count, uint64_t offset,
                    uint32_t flags, int *err)
{
  if (next->can_trim (next) &&
      next->trim (next, count, offset, client_flags (next, flags),
                  err) == -1)
    return -1;
  return client_fua (next, flags, err);
}

int
origin_client_flush (nbdkit_next *next, uint32_t flags, int *err)
{
  if (next->can_flush (next) && next->flush (next, flags, err) == -1)
    return -1;
  return 0;
}

/* ---- Identity ---- */

/* file=PATH given to the plugin, if a regular file: its identity. */
static bool have_file;
static char *file_path;
static uint64_t file_dev, file_ino;

void
origin_note_config (const char *key, const char *value)
{
  struct stat st;

  if (strcmp (key, "file") != 0 || stat (value, &st) == -1 ||
      !S_ISREG (st.st_mode))
    return;
  free (file_path);
  file_path = realpath (value, NULL);
  if (file_path == NULL)
    return;
  have_file = true;
  file_dev = st.st_dev;
  file_ino = st.st_ino;
}

const char *
origin_file (void)
{
  return have_file ? file_path : NULL;
}

/* Read the origin for store_origin_sample. */
static int
sample_read (void *opaque, void *buf, uint32_t len, uint64_t offset)
{
  return origin_pread (buf, len, offset);
}

/* The hash of the sample pages of the origin as it reads now (a
 * volume of store.m.size bytes; storefiles.h).
 */
static int
origin_sample (uint64_t *hash)
{
  return store_origin_sample (store.m.size, sample_read, NULL, hash);
}

int
origin_freeze (void)
{
  uint64_t hash;

  if (store.m.origin_retired)
    return 0;
  if (origin_sample (&hash) == -1)
    return -1;
  store.m.has_sample = true;
  store.m.origin_sample = hash;
  return 0;
}

void
origin_thaw (void)
{
  store.m.has_sample = false;
}

/* Whether the origin may be written while this server runs (from the
 * manifest): clients write it while no snapshot exists, and a commit
 * of the oldest snapshot into it writes it.
 */
static bool
origin_is_live (void)
{
  ssize_t ci;

  if (store.m.origin_retired)
    return false;
  if (store.m.nlayers == 0 || !store.kind->snapshots_freeze_origin)
    return true;
  if (store.m.job.kind != JOB_DELETE ||
      store.m.job.strategy != STRATEGY_COMMIT)
    return false;
  ci = manifest_find_checkpoint (&store.m, store.m.job.name);
  return ci >= 0 && store.m.ckpts[ci].layer == store.m.layers[0];
}

int
origin_identity_check (int64_t size, bool adopt)
{
  uint64_t hash;

  /* A new store, one that holds nothing yet, or one whose origin was
   * retired cannot be mismatched; a size that differs is store_open's
   * to report.
   */
  if (adopt || store.m.next_id == 0 || store.m.origin_retired ||
      (store.m.nlayers == 0 && store.m.nckpts == 0) ||
      (uint64_t) size != store.m.size)
    return 0;
  if (have_file && store.m.has_origin_file &&
      (store.m.origin_dev != file_dev || store.m.origin_ino != file_ino)) {
    nbdkit_error ("snapshot-store=%s: the origin file %s (device %" PRIu64
                  ", inode %" PRIu64 ") is not the file this store was "
                  "made over (device %" PRIu64 ", inode %" PRIu64 "): a "
                  "copy or another file would make every view wrong.  If "
                  "the file was moved or restored on purpose, start once "
                  "with snapshot-adopt-origin=true",
                  store.dir, file_path, file_dev, file_ino,
                  store.m.origin_dev, store.m.origin_ino);
    return -1;
  }
  if (!store.m.has_sample)
    return 0;
  if (origin_sample (&hash) == -1) {
    nbdkit_error ("snapshot-store=%s: reading the origin: %m", store.dir);
    return -1;
  }
  if (hash != store.m.origin_sample) {
    nbdkit_error ("snapshot-store=%s: the origin does not read as it did "
                  "when the store last saw it (sampled blocks differ): is "
                  "it the origin the store was made over?  Over another "
                  "one every view would be wrong.  If the origin was "
                  "changed or replaced on purpose, start once with "
                  "snapshot-adopt-origin=true", store.dir);
    return -1;
  }
  return 0;
}

int
origin_identity_open (void)
{
  const bool was_sample = store.m.has_sample;
  const bool was_file = store.m.has_origin_file;
  const uint64_t was_hash = store.m.origin_sample;
  const uint64_t was_dev = store.m.origin_dev, was_ino = store.m.origin_ino;
  CLEANUP_FREE char *was_path = NULL;

  if (store.m.origin_retired)
    return 0;
  was_path = strdup (store.m.origin_path);
  if (was_path == NULL) {
    nbdkit_error ("strdup: %m");
    return -1;
  }
  if (have_file) {
    store.m.has_origin_file = true;
    store.m.origin_dev = file_dev;
    store.m.origin_ino = file_ino;
    /* The path, for readers of the store at rest (the snapstore
     * plugin's default base), when the manifest can hold it.
     */
    if (strlen (file_path) < sizeof store.m.origin_path &&
        strpbrk (file_path, " \t\n\r\v\f") == NULL)
      strcpy (store.m.origin_path, file_path);
  }
  if (origin_is_live ())
    origin_thaw ();
  else if (origin_freeze () == -1) {
    nbdkit_error ("snapshot-store=%s: reading the origin: %m", store.dir);
    return -1;
  }
  if ((was_sample != store.m.has_sample || was_hash != store.m.origin_sample ||
       was_file != store.m.has_origin_file || was_dev != store.m.origin_dev ||
       was_ino != store.m.origin_ino ||
       strcmp (was_path, store.m.origin_path) != 0) && store_save () == -1) {
    nbdkit_error ("%s: cannot write the manifest: %m", store.dir);
    return -1;
  }
  return 0;
}

void
origin_identity_close (void)
{
  if (bg_next == NULL || store.maps == NULL || store.m.origin_retired ||
      store.m.has_sample)
    return;
  /* A commit into the origin left in the journal goes on writing it at
   * the next start.
   */
  if (store.m.job.kind == JOB_DELETE && origin_is_live () &&
      store.m.nlayers > 0)
    return;
  if (origin_flush () == -1 || origin_freeze () == -1 || store_save () == -1)
    nbdkit_error ("snapshot: recording the origin's identity: %m");
}
