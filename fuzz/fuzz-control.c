/* Fuzz the control protocol: each line of the input is a request, as a
 * client of the control socket sends it, handed to the filter's entry
 * point for one request line (control.c: handle_request).
 *
 * Input:
 *   u8 flags   bit 0: a copy-before-write store (else row);
 *              bit 1: wait for a job a request started before the
 *                     next request (else they run alongside)
 *   the rest   request lines; "@DIR@" stands for a directory beside
 *              the store (for "output")
 *
 * The store is a fresh copy of a template (filterhost.h) for each
 * input.  Every request gets exactly one reply line, a JSON object.
 * Then the filter is stopped, and must start again on the store
 * (fh_stop_and_check).
 */
#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "control.h"
#include "filterhost.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  const int fds = fuzz_fds ();
  const char *dir, *store;
  const char *const params[] = { NULL };
  const char *p, *end;
  uint8_t flags;
  char *line;
  unsigned nreq = 0;

  if (size < 1 || size > 65536)
    return 0;
  flags = data[0];
  dir = fuzz_mkdir ();
  store = fh_template_copy (flags & 1, dir);
  if (fh_start (store, params) == -1) {
    fuzz_print_errors ();
    fprintf (stderr, "the template store does not start\n");
    abort ();
  }
  line = malloc ((size - 1) * (strlen (dir) + 1) + 1);
  if (line == NULL)
    abort ();
  for (p = (const char *) data + 1, end = (const char *) data + size;
       p < end && nreq < 16; ++nreq) {
    const char *nl = memchr (p, '\n', end - p);
    size_t len;
    char *reply;

    if (nl == NULL)
      nl = end;
    len = fuzz_subst (line, p, nl - p, dir);
    line[len] = '\0';
    reply = handle_request (line, len);
    if (reply == NULL || reply[0] != '{' || strchr (reply, '\n') ||
        reply[strlen (reply) - 1] != '}') {
      fprintf (stderr, "request: %s\nreply: %s\n", line,
               reply ? reply : "(none)");
      abort ();
    }
    free (reply);
    if (flags & 2)
      fh_wait_job (5000);
    p = nl + 1;
  }
  free (line);
  fh_stop_and_check (store, params, 5000, true);
  fuzz_done (dir, fds);
  return 0;
}
