/* nbdkit-snapshot tests: dlclose(3) that keeps the library loaded.
 *
 * Preloaded into nbdkit by make check-valgrind and by make check in a
 * build with --enable-sanitizers (tests/functions.sh.in).  nbdkit
 * unloads its plugin and filters at exit, before valgrind and
 * LeakSanitizer report what was leaked; a leak in a library that is
 * gone then has no names in its stack ("<unknown module>", "???"), so
 * it can be neither understood nor told apart from nbdkit's own.
 * Leaving them loaded, as the process is about to exit anyway, keeps
 * every frame named.
 */
#include <config.h>

#include <dlfcn.h>
#include <stdlib.h>

/* nbdkit's children (the scripts of the sh and eval plugins) must not
 * inherit what the test wrapper preloaded into nbdkit (the sanitizers'
 * runtimes would report the leaks of every shell, or fail to load): at
 * start-up, give LD_PRELOAD back the value the test gave, which the
 * wrapper passes in SNAPSHOT_TEST_CHILD_PRELOAD.  The loader has read
 * LD_PRELOAD already, so nbdkit itself keeps what was preloaded.
 */
__attribute__ ((constructor))
static void
restore_preload (void)
{
  const char *p = getenv ("SNAPSHOT_TEST_CHILD_PRELOAD");

  if (p == NULL)
    return;
  if (*p)
    setenv ("LD_PRELOAD", p, 1);
  else
    unsetenv ("LD_PRELOAD");
  unsetenv ("SNAPSHOT_TEST_CHILD_PRELOAD");
}

int
dlclose (void *handle)
{
  (void) handle;
  return 0;
}
