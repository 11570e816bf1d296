/* Fuzz the filter's opening of a store directory: the manifest, every
 * layer's map and data, every checkpoint's dirty map, intent.map,
 * boot-id, a revert's map, the files it sweeps, and the job journal
 * (filters/snapshot/store.c: store_load, store_open; job.c).
 *
 * Input: a flag byte, then the store as an archive (fuzz.h).
 *   bit 0: recompute the checksums of the manifest and map files;
 *   bit 1: snapshot-adopt-origin=true;
 *   bit 2: an origin of zeros (else one that differs in every page)
 * The origin has the size the manifest says (at most 64 MiB).  The
 * filter is started, left to finish a job it resumed, and stopped; a
 * store it started and stopped cleanly must start again
 * (fh_stop_and_check; not necessarily open at rest: the input may hold
 * files the filter leaves alone and the plugin refuses).
 */
#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "filterhost.h"
#include "fuzz.h"
#include "manifest.h"

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

#define MAX_ORIGIN (64 * 1024 * 1024)

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  const int fds = fuzz_fds ();
  const char *dir;
  const char *params[3] = { NULL };
  char store[512];
  struct manifest m;
  uint64_t osize = 1024 * 1024;
  uint8_t flags;

  if (size < 1)
    return 0;
  flags = data[0];
  dir = fuzz_mkdir ();
  snprintf (store, sizeof store, "%s/store", dir);
  if (mkdir (store, 0700) == -1)
    abort ();
  fuzz_unpack (store, data + 1, size - 1, flags & 1);
  if (flags & 2)
    params[0] = "snapshot-adopt-origin=true";

  /* An origin of the size the store expects, when that is small. */
  if (manifest_load (store, &m) == 1) {
    if (m.size > 0 && m.size <= MAX_ORIGIN)
      osize = m.size;
    manifest_free (&m);
  }
  fuzz_origin_set (NULL, osize);
  if (flags & 4) {
    uint8_t *zero = calloc (1, osize);
    if (zero == NULL)
      abort ();
    fuzz_origin_set (zero, osize);
    free (zero);
  }

  if (fh_start (store, params) == 0)
    fh_stop_and_check (store, params, 5000, false);
  fuzz_done (dir, fds);
  return 0;
}
