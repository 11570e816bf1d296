/* nbdkit-snapshot fuzzing: the filter run in the fuzzer's process (see
 * filterhost.h).
 */
#include <config.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <nbdkit-filter.h>

#include "control.h"
#include "filterhost.h"
#include "fuzz.h"
#include "job.h"
#include "store.h"
#include "storeread.h"
#include "util.h"

extern struct nbdkit_filter *filter_init (void);

struct nbdkit_filter *
fh_filter (void)
{
  static struct nbdkit_filter *f;

  if (f == NULL)
    f = filter_init ();
  return f;
}

/* nbdkit's side of .config and .config_complete: the plugin takes
 * every parameter the filter passes on.
 */
static int
next_config (nbdkit_backend *nxdata, const char *key, const char *value)
{
  return 0;
}

static int
next_config_complete (nbdkit_backend *nxdata)
{
  return 0;
}

static int
next_open (nbdkit_context *context, int readonly, const char *exportname)
{
  return 0;
}

/* The parameters' strings must outlive the filter's run. */
static char store_dir[512];
static char param_buf[8][512];

/* Put the filter's parameters back to their defaults (as a fresh
 * nbdkit process has them).
 */
static void
reset_params (void)
{
  store_param = NULL;
  control_param = NULL;
  create_param = NULL;
  block_size_param = 0;
  mode_param = -1;
  max_size_param = 0;
  full_param = -1;
  adopt_origin_param = false;
  job_rate_param = UINT64_C (256) << 20;
}

static bool running;

int
fh_start (const char *dir, const char *const *params)
{
  struct nbdkit_filter *f = fh_filter ();
  nbdkit_backend *backend = (nbdkit_backend *) store_dir;  /* opaque */

  reset_params ();
  snprintf (store_dir, sizeof store_dir, "%s", dir);
  if (f->config (next_config, backend, "snapshot-store", store_dir) == -1)
    return -1;
  for (size_t i = 0; params && params[i] && i < 8; ++i) {
    char *eq;

    snprintf (param_buf[i], sizeof param_buf[i], "%s", params[i]);
    eq = strchr (param_buf[i], '=');
    if (eq == NULL)
      abort ();
    *eq = '\0';
    if (f->config (next_config, backend, param_buf[i], eq + 1) == -1)
      return -1;
  }
  if (f->config_complete (next_config_complete, backend) == -1)
    return -1;
  running = true;
  if (f->get_ready (NBDKIT_THREAD_MODEL_PARALLEL) == -1) {
    nbdkit_debug ("fuzz: .get_ready failed (errno %d)", errno);
    fh_stop ();
    return -1;
  }
  if (f->after_fork (backend) == -1) {
    nbdkit_debug ("fuzz: .after_fork failed (errno %d)", errno);
    fh_stop ();
    return -1;
  }
  return 0;
}

void
fh_stop (void)
{
  if (running)
    fh_filter ()->cleanup ((nbdkit_backend *) store_dir);
  running = false;
  /* What outlives .cleanup in the process, as a new nbdkit would not
   * have it: a failed job kept for the next start.
   */
  memset (&store.stuck, 0, sizeof store.stuck);
}

void
fh_wait_job (int ms)
{
  const struct timespec step = { .tv_sec = 0, .tv_nsec = 1000000 };

  for (int i = 0; i < ms; ++i) {
    bool busy;

    pthread_mutex_lock (&store.job_lock);
    busy = store.job != NULL && store.job->state == JOB_STATE_RUNNING;
    pthread_mutex_unlock (&store.job_lock);
    if (!busy)
      return;
    nanosleep (&step, NULL);
  }
}

void *
fh_open (const char *exportname, bool readonly)
{
  return fh_filter ()->open (next_open, NULL, readonly, exportname, 0);
}

void
fh_close (void *handle)
{
  if (handle)
    fh_filter ()->close (handle);
}

/* Send one control request; the reply is dropped. */
static void
request (const char *line)
{
  free (handle_request (line, strlen (line)));
}

int
fh_build_store (const char *dir, const char *mode, uint64_t size,
                const char *script)
{
  struct nbdkit_filter *f = fh_filter ();
  char mode_arg[32], line[256];
  const char *params[] = { mode_arg, NULL };
  unsigned nsnap = 0, oldest = 0, nbitmap = 0, nwrite = 0;
  void *h;

  fuzz_origin_set (NULL, size);
  snprintf (mode_arg, sizeof mode_arg, "snapshot-mode=%s", mode);
  if (fh_start (dir, params) == -1)
    return -1;
  h = fh_open ("", false);
  if (h == NULL) {
    fh_stop ();
    return -1;
  }
  for (const char *c = script; *c; ++c) {
    switch (*c) {
    case 'w': {
      char buf[4096];
      int err = 0;

      /* A few pages somewhere, and a partial one. */
      nwrite++;
      for (int k = 0; k < 3; ++k) {
        uint64_t off = ((nwrite * 7 + k * 13) * 4096) % size;
        memset (buf, 'A' + (nwrite + k) % 26, sizeof buf);
        f->pwrite (fuzz_origin_next (), h, buf,
                   MIN ((uint64_t) sizeof buf, size - off), off, 0, &err);
      }
      f->pwrite (fuzz_origin_next (), h, buf, 100, (nwrite * 4096 + 50) % size,
                 0, &err);
      f->flush (fuzz_origin_next (), h, 0, &err);
      break;
    }
    case 's':
      snprintf (line, sizeof line,
                "{\"cmd\":\"create\",\"name\":\"s%u\"}", ++nsnap);
      request (line);
      break;
    case 'b':
      snprintf (line, sizeof line,
                "{\"cmd\":\"create\",\"name\":\"b%u\","
                "\"bitmap_only\":true}", ++nbitmap);
      request (line);
      break;
    case 'd':
      snprintf (line, sizeof line,
                "{\"cmd\":\"delete\",\"name\":\"s%u\"}", ++oldest);
      request (line);
      fh_wait_job (5000);
      break;
    default:
      abort ();
    }
  }
  fh_close (h);
  fh_stop ();
  return 0;
}

void
fh_copy_dir (const char *from, const char *to)
{
  DIR *d = opendir (from);
  struct dirent *e;
  static char buf[65536];

  if (d == NULL || (mkdir (to, 0700) == -1 && errno != EEXIST)) {
    perror (from);
    abort ();
  }
  while ((e = readdir (d)) != NULL) {
    char src[512], dst[512];
    struct stat st;
    int in, out;
    off_t off = 0;

    snprintf (src, sizeof src, "%s/%s", from, e->d_name);
    snprintf (dst, sizeof dst, "%s/%s", to, e->d_name);
    if (lstat (src, &st) == -1 || !S_ISREG (st.st_mode) ||
        strcmp (e->d_name, "lock") == 0)
      continue;
    in = open (src, O_RDONLY | O_CLOEXEC);
    out = open (dst, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (in == -1 || out == -1 || ftruncate (out, st.st_size) == -1) {
      perror (dst);
      abort ();
    }
    /* Only the data: holes stay holes. */
    while (off < st.st_size) {
      off_t data = lseek (in, off, SEEK_DATA), hole;
      if (data == -1)
        break;
      hole = lseek (in, data, SEEK_HOLE);
      if (hole == -1)
        hole = st.st_size;
      for (off = data; off < hole; ) {
        size_t n = MIN ((off_t) sizeof buf, hole - off);
        if (full_pread (in, buf, n, off) == -1 ||
            full_pwrite (out, buf, n, off) == -1) {
          perror (dst);
          abort ();
        }
        off += n;
      }
    }
    close (in);
    close (out);
  }
  closedir (d);
}

/* A safety net: the filter makes hard links only at the output path a
 * merge was given (control.c, the manifest's job line).  Inputs may
 * name any path: refuse one outside the fuzzer's own directory, as a
 * link to another file system would be.
 */
static bool
link_allowed (const char *path)
{
  const char *root = fuzz_root ();

  return strncmp (path, root, strlen (root)) == 0 &&
    path[strlen (root)] == '/' && strstr (path, "/..") == NULL;
}

int
link (const char *from, const char *to)
{
  if (!link_allowed (to)) {
    errno = EXDEV;
    return -1;
  }
  return syscall (SYS_linkat, AT_FDCWD, from, AT_FDCWD, to, 0);
}

int
linkat (int fromfd, const char *from, int tofd, const char *to, int flags)
{
  if (tofd != AT_FDCWD || !link_allowed (to)) {
    errno = EXDEV;
    return -1;
  }
  return syscall (SYS_linkat, fromfd, from, tofd, to, flags);
}

/* ---- Templates ---- */

#define TEMPLATE_SIZE (1024 * 1024)

static struct {
  char dir[512];
  uint8_t *origin;
} templates[2];

const char *
fh_template_copy (bool cbw, const char *dir)
{
  static char path[512];
  const uint8_t *o;
  uint64_t size;

  if (templates[cbw].origin == NULL) {
    snprintf (templates[cbw].dir, sizeof templates[cbw].dir,
              "%s/template-%s", fuzz_root (), cbw ? "cbw" : "row");
    if (fh_build_store (templates[cbw].dir, cbw ? "cbw" : "row",
                        TEMPLATE_SIZE, "wswbwswswswdw") == -1) {
      fprintf (stderr, "cannot build the template store\n");
      abort ();
    }
    o = fuzz_origin_get (&size);
    templates[cbw].origin = malloc (size);
    if (templates[cbw].origin == NULL)
      abort ();
    memcpy (templates[cbw].origin, o, size);
  }
  snprintf (path, sizeof path, "%s/store", dir);
  fh_copy_dir (templates[cbw].dir, path);
  fuzz_origin_set (templates[cbw].origin, TEMPLATE_SIZE);
  return path;
}

void
fh_stop_and_check (const char *dir, const char *const *params, int wait_ms,
                   bool at_rest)
{
  struct storeread s;

  fh_wait_job (wait_ms);
  fh_stop ();
  if (at_rest && sr_open (&s, dir, true) == -1) {
    fuzz_print_errors ();
    fprintf (stderr, "a store the filter stopped cleanly does not open "
                     "at rest\n");
    abort ();
  }
  if (at_rest)
    sr_close (&s);
  if (fh_start (dir, params) == -1) {
    fuzz_print_errors ();
    fprintf (stderr, "a store the filter stopped cleanly does not start "
                     "again\n");
    abort ();
  }
  fh_wait_job (5000);
  fh_stop ();
}
