/* Fuzz the store manifest's loader (common/store/manifest.c).
 *
 * Input: one flag byte (bit 0: recompute the crc line, fuzz.h), then
 * the manifest's text, written to DIR/manifest and loaded with
 * manifest_load.  A manifest that loads must survive a round trip:
 * manifest_format of it parses again into the same text.
 */
#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "manifest.h"

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  const int fds = fuzz_fds ();
  const char *dir;
  struct manifest m, m2, m3;
  char *text, *text2, *buf;
  size_t len, len2;
  bool fix;

  if (size < 1)
    return 0;
  fix = data[0] & 1;
  data++, size--;
  buf = malloc (size + 32);
  if (buf == NULL)
    abort ();
  memcpy (buf, data, size);
  if (fix)
    size = fuzz_fix_manifest (buf, size);

  dir = fuzz_mkdir ();
  fuzz_write_file (dir, MANIFEST_NAME, buf, size);
  free (buf);
  if (manifest_load (dir, &m) == 1) {
    /* What the store would save parses back to the same. */
    text = manifest_format (&m, &len);
    if (text == NULL)
      abort ();
    if (manifest_parse ("round trip", text, len, &m2) == -1) {
      fprintf (stderr, "a loaded manifest does not parse once saved:\n%.*s",
               (int) len, text);
      abort ();
    }
    text2 = manifest_format (&m2, &len2);
    if (text2 == NULL)
      abort ();
    /* The generation differs in no way; everything else must match. */
    if (len != len2 || memcmp (text, text2, len) != 0) {
      fprintf (stderr, "round trip changed the manifest:\n%.*s---\n%.*s",
               (int) len, text, (int) len2, text2);
      abort ();
    }
    if (manifest_dup (&m2, &m3) == 0)
      manifest_free (&m3);
    /* The lookups the store makes. */
    for (size_t i = 0; i < m.nckpts; ++i)
      if (manifest_find_checkpoint (&m, m.ckpts[i].name) != (ssize_t) i)
        abort ();
    for (uint64_t id = 0; id < 64 && id < m.next_id; ++id)
      (void) manifest_uses (&m, id);
    free (text);
    free (text2);
    manifest_free (&m2);
    manifest_free (&m);
  }
  fuzz_done (dir, fds);
  return 0;
}
