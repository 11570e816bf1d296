/* Fuzz the job journal: the manifest's "job" line, which the filter
 * reads at start-up and resumes (manifest.c, then job.c: job_resume,
 * and the kind's plan in row.c or cbw.c).
 *
 * Input:
 *   u8 flags   bit 0: a copy-before-write store (else row);
 *              bit 1: snapshot-adopt-origin=true;
 *              bit 2: stop at once, cancelling the job (else let it
 *                     end first)
 *   the rest   lines added to the manifest of a template store (the
 *              checkpoints s2, s3, s4 and b1: filterhost.h) before its
 *              crc line, which is then recomputed; "@DIR@" stands for
 *              a directory beside the store (for output=)
 *
 * The filter is started on the store, which resumes the job, and
 * stopped.  A store it started and stopped cleanly must start again
 * and open at rest (fh_stop_and_check).
 */
#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "filterhost.h"
#include "fuzz.h"
#include "manifest.h"
#include "util.h"

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  const int fds = fuzz_fds ();
  const char *dir, *store;
  const char *params[3] = { NULL };
  char path[512], *buf;
  FILE *fp;
  long mlen;
  size_t n, cut;
  uint8_t flags;

  if (size < 1 || size > 16384)
    return 0;
  flags = data[0];
  dir = fuzz_mkdir ();
  store = fh_template_copy (flags & 1, dir);
  if (flags & 2)
    params[0] = "snapshot-adopt-origin=true";

  /* The template's manifest, without its crc line, then the input. */
  snprintf (path, sizeof path, "%s/%s", store, MANIFEST_NAME);
  fp = fopen (path, "r");
  if (fp == NULL || fseek (fp, 0, SEEK_END) == -1 || (mlen = ftell (fp)) < 0)
    abort ();
  rewind (fp);
  /* Room for the input with every byte a "@DIR@", and a crc line. */
  buf = malloc (mlen + (size - 1) * (strlen (dir) + 1) + 64);
  if (buf == NULL || fread (buf, 1, mlen, fp) != (size_t) mlen)
    abort ();
  fclose (fp);
  cut = mlen;
  while (cut > 0 && buf[cut - 1] == '\n')
    cut--;
  while (cut > 0 && buf[cut - 1] != '\n')
    cut--;                      /* the crc line */
  n = cut;
  n += fuzz_subst (&buf[n], (const char *) data + 1, size - 1, dir);
  if (n > 0 && buf[n - 1] != '\n')
    buf[n++] = '\n';
  memcpy (&buf[n], "crc 0\n", 6);
  n = fuzz_fix_manifest (buf, n + 6);
  fuzz_write_file (store, MANIFEST_NAME, buf, n);
  free (buf);

  if (fh_start (store, params) == 0)
    fh_stop_and_check (store, params, flags & 4 ? 0 : 5000, true);
  fuzz_done (dir, fds);
  return 0;
}
