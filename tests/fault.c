/* nbdkit-snapshot tests: faults injected under the filter with
 * LD_PRELOAD (nbdkit --filter=... with LD_PRELOAD=.libs/libfault.so).
 *
 * FAULT_MANIFEST_DIRSYNC=FILE: while FILE exists, the fsync of a
 * directory that follows a rename onto a file named "manifest" fails
 * with EIO, as on a store whose disk fails just then.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Set by a rename onto a manifest while the trigger file exists. */
static __thread bool fail_next_dir_fsync;

static bool
triggered (const char *var)
{
  const char *path = getenv (var);
  struct stat st;

  return path && stat (path, &st) == 0;
}

int
rename (const char *from, const char *to)
{
  static int (*real) (const char *, const char *);
  const char *base = strrchr (to, '/');
  int r;

  if (real == NULL)
    real = dlsym (RTLD_NEXT, "rename");
  r = real (from, to);
  if (r == 0 && strcmp (base ? base + 1 : to, "manifest") == 0 &&
      triggered ("FAULT_MANIFEST_DIRSYNC"))
    fail_next_dir_fsync = true;
  return r;
}

int
fsync (int fd)
{
  static int (*real) (int);
  struct stat st;

  if (real == NULL)
    real = dlsym (RTLD_NEXT, "fsync");
  if (fail_next_dir_fsync && fstat (fd, &st) == 0 && S_ISDIR (st.st_mode)) {
    fail_next_dir_fsync = false;
    errno = EIO;
    return -1;
  }
  return real (fd);
}
