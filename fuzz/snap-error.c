/* nbdkit-snapshot fuzzing: the error reporting of common/ (util.h) for
 * the harnesses that do not link the filter (which has its own).
 * Every message is formatted, so that a bad argument is found, and
 * printed only with FUZZ_VERBOSE.
 */
#include <config.h>

#include <stdarg.h>
#include <stdio.h>

#include "fuzz.h"
#include "util.h"

void
snap_verror (const char *fs, va_list args)
{
  char buf[1024];

  vsnprintf (buf, sizeof buf, fs, args);
  if (fuzz_verbose ())
    fprintf (stderr, "error: %s\n", buf);
}

