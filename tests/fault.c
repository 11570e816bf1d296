/* nbdkit-snapshot tests: faults injected under the filter with
 * LD_PRELOAD (nbdkit --filter=... with LD_PRELOAD=.libs/libfault.so).
 * Each fault is armed by a variable naming a trigger file, and acts
 * only while that file exists, so a test turns it on and off with
 * touch and rm.
 *
 * FAULT_MANIFEST_DIRSYNC=FILE: the fsync of a directory that follows a
 * rename onto a file named "manifest" fails with EIO, as on a store
 * whose disk fails just then.
 *
 * FAULT_STORE_EIO=FILE with FAULT_STORE_DIR=DIR: calls on the regular
 * files under DIR (the store) fail with EIO, as on a failing disk.
 * The calls are those the filter makes on its files, of three kinds:
 *
 *   read    pread, preadv
 *   write   pwrite, pwritev, fallocate
 *   sync    fsync, fdatasync, sync_file_range
 *
 * (The active dirty map is also written through a shared mapping,
 * where no call can fail: a disk that loses those pages reports it
 * when the file is synced, which is covered.)  FILE may narrow the
 * fault with words, read at each call, so a test changes it while
 * nbdkit runs:
 *
 *   ops=LIST    the kinds that fail, comma-separated (default: all);
 *   files=TEXT  only files whose name contains TEXT (".data",
 *               "dirty-"; default: any);
 *   every=N     only every Nth call that qualifies fails (default 1:
 *               each one).  The count goes on from one FILE to the
 *               next, so which call fails depends on the calls made,
 *               not on time.
 *
 * A call that fails does nothing.  FAULT_STORE_EIO_LOG=LOG appends a
 * line for each failure to LOG ("fdatasync layer-3.data"), so a test
 * can tell what failed.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

/* The real function name, found once. */
#define REAL(name) \
  static __typeof__ (name) *real_##name; \
  if (real_##name == NULL) \
    real_##name = dlsym (RTLD_NEXT, #name)

static bool
triggered (const char *var)
{
  const char *path = getenv (var);
  struct stat st;

  return path && stat (path, &st) == 0;
}

/* ---- FAULT_MANIFEST_DIRSYNC ---- */

/* Set by a rename onto a manifest while the trigger file exists. */
static __thread bool fail_next_dir_fsync;

int
rename (const char *from, const char *to)
{
  REAL (rename);
  const char *base = strrchr (to, '/');
  int r;

  r = real_rename (from, to);
  if (r == 0 && strcmp (base ? base + 1 : to, "manifest") == 0 &&
      triggered ("FAULT_MANIFEST_DIRSYNC"))
    fail_next_dir_fsync = true;
  return r;
}

static bool
dir_fsync_fails (int fd)
{
  struct stat st;

  if (fail_next_dir_fsync && fstat (fd, &st) == 0 && S_ISDIR (st.st_mode)) {
    fail_next_dir_fsync = false;
    return true;
  }
  return false;
}

/* ---- FAULT_STORE_EIO ---- */

/* The words of the trigger file (above), or false if it is not there. */
struct store_fault {
  char ops[64];
  char files[64];
  unsigned long every;
};

static bool
store_fault_read (struct store_fault *f)
{
  const char *path = getenv ("FAULT_STORE_EIO");
  char buf[256];
  char *word, *save;
  ssize_t n;
  int fd;

  if (path == NULL)
    return false;
  fd = open (path, O_RDONLY | O_CLOEXEC);
  if (fd == -1)
    return false;
  n = read (fd, buf, sizeof buf - 1);
  close (fd);
  buf[n > 0 ? n : 0] = '\0';
  memset (f, 0, sizeof *f);
  f->every = 1;
  for (word = strtok_r (buf, " \t\n", &save); word;
       word = strtok_r (NULL, " \t\n", &save)) {
    if (strncmp (word, "ops=", 4) == 0)
      snprintf (f->ops, sizeof f->ops, "%s", word + 4);
    else if (strncmp (word, "files=", 6) == 0)
      snprintf (f->files, sizeof f->files, "%s", word + 6);
    else if (strncmp (word, "every=", 6) == 0)
      f->every = strtoul (word + 6, NULL, 10);
    else
      abort ();                 /* a mistake in the test */
  }
  if (f->every == 0)
    f->every = 1;
  return true;
}

/* Whether the kind of call op ("read", "write", "sync") is in ops. */
static bool
op_chosen (const char *ops, const char *op)
{
  size_t n = strlen (op);

  if (*ops == '\0')
    return true;
  for (const char *p = ops; *p; p += strcspn (p, ",")) {
    p += *p == ',';
    if (strncmp (p, op, n) == 0 && (p[n] == ',' || p[n] == '\0'))
      return true;
  }
  return false;
}

/* Append "call name" to FAULT_STORE_EIO_LOG, if set. */
static void
log_failure (const char *call, const char *name)
{
  const char *log = getenv ("FAULT_STORE_EIO_LOG");
  char line[PATH_MAX + 64];
  int fd, n;

  if (log == NULL)
    return;
  n = snprintf (line, sizeof line, "%s %s\n", call, name);
  fd = open (log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  if (fd >= 0) {
    if (write (fd, line, n) != n)
      abort ();
    close (fd);
  }
}

/* Whether call (of kind op) on fd fails now: the trigger file is there
 * and chooses op, fd is a regular file in the store whose name it
 * chooses, and this call's turn has come.
 */
static bool
store_fails (int fd, const char *op, const char *call)
{
  static unsigned long count;
  const char *dir = getenv ("FAULT_STORE_DIR");
  char real_dir[PATH_MAX], link[64], path[PATH_MAX];
  struct store_fault f;
  const char *name;
  struct stat st;
  size_t len;
  ssize_t r;

  if (dir == NULL || !store_fault_read (&f) || !op_chosen (f.ops, op) ||
      fstat (fd, &st) == -1 || !S_ISREG (st.st_mode) ||
      realpath (dir, real_dir) == NULL)
    return false;
  snprintf (link, sizeof link, "/proc/self/fd/%d", fd);
  r = readlink (link, path, sizeof path - 1);
  if (r == -1)
    return false;
  path[r] = '\0';
  len = strlen (real_dir);
  if (strncmp (path, real_dir, len) != 0 || path[len] != '/')
    return false;
  name = path + len + 1;
  if (strstr (name, f.files) == NULL)
    return false;
  if (__atomic_add_fetch (&count, 1, __ATOMIC_SEQ_CST) % f.every != 0)
    return false;
  log_failure (call, name);
  return true;
}

/* Define the function name, of kind op, with the parameters params
 * (fd first) passed on to the real one as args: it fails with EIO when
 * store_fails says so.
 */
#define STORE_CALL(type, name, op, params, args) \
  type \
  name params \
  { \
    REAL (name); \
    if (store_fails (fd, op, #name)) { \
      errno = EIO; \
      return -1; \
    } \
    return real_##name args; \
  }

STORE_CALL (ssize_t, pread, "read",
            (int fd, void *buf, size_t count, off_t offset),
            (fd, buf, count, offset))
STORE_CALL (ssize_t, preadv, "read",
            (int fd, const struct iovec *iov, int iovcnt, off_t offset),
            (fd, iov, iovcnt, offset))
STORE_CALL (ssize_t, pwrite, "write",
            (int fd, const void *buf, size_t count, off_t offset),
            (fd, buf, count, offset))
STORE_CALL (ssize_t, pwritev, "write",
            (int fd, const struct iovec *iov, int iovcnt, off_t offset),
            (fd, iov, iovcnt, offset))
STORE_CALL (int, fallocate, "write",
            (int fd, int mode, off_t offset, off_t len),
            (fd, mode, offset, len))
STORE_CALL (int, fdatasync, "sync", (int fd), (fd))
STORE_CALL (int, sync_file_range, "sync",
            (int fd, off_t offset, off_t nbytes, unsigned int flags),
            (fd, offset, nbytes, flags))

/* For both faults: a directory's (FAULT_MANIFEST_DIRSYNC), a store file's. */
int
fsync (int fd)
{
  REAL (fsync);
  if (dir_fsync_fails (fd) || store_fails (fd, "sync", "fsync")) {
    errno = EIO;
    return -1;
  }
  return real_fsync (fd);
}
