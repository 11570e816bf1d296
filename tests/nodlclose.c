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

/* AddressSanitizer, preloaded into an uninstrumented nbdkit, starts up
 * at the first malloc of the process.  That first malloc happens in
 * p11-kit's constructor (p11-kit comes with GnuTLS, which nbdkit
 * links), inside newlocale(3), while newlocale holds glibc's internal
 * locale lock for writing.  During its start-up ASan looks up the
 * optional "swift_demangle" with dlsym; when it is missing, the
 * dlerror(3) that clears the failure translates its message, and
 * gettext takes and releases the same lock for reading.  That release
 * leaves the lock's reader count below zero, so the next writer, the
 * freelocale(3) in p11-kit's destructor at exit, waits for ever and
 * nbdkit never exits.  With the symbol present the lookup does not
 * fail, nothing is translated and the lock stays balanced.  ASan calls
 * it to demangle Swift names; NULL means "not a Swift name", and it
 * goes on to demangle C++ names as before.
 */
char *swift_demangle (const char *name, size_t len, char *out,
                      size_t *out_len, unsigned flags);

char *
swift_demangle (const char *name, size_t len, char *out, size_t *out_len,
                unsigned flags)
{
  (void) name; (void) len; (void) out; (void) out_len; (void) flags;
  return NULL;
}
