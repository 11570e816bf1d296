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

int
dlclose (void *handle)
{
  (void) handle;
  return 0;
}
