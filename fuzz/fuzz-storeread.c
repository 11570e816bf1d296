/* Fuzz the opening of a store at rest (common/store/storeread.c), as
 * the snapstore plugin and nbdsnap check do it.
 *
 * Input: a flag byte (bit 0: recompute checksums; bit 1: open like the
 * plugin, sr_open, which stops at the first problem; else like
 * nbdsnap check: every layer and map, whatever failed before), then a
 * store directory as an archive (fuzz.h: fuzz_unpack).  Every view
 * that can be read gets its index built and looked up page by page
 * against the layers' maps.
 */
#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fuzz.h"
#include "storefiles.h"
#include "storeread.h"

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

static void
count_report (void *opaque, const char *name, const char *problem)
{
  ++*(size_t *) opaque;
}

/* Look every page of snapshot ci's view up in its index, and check the
 * answer against the maps.
 */
static void
check_view (struct storeread *s, size_t ci)
{
  struct sr_index ix;
  size_t lo, hi;
  bool asc;

  sr_snapshot_view (&s->m, ci, &lo, &hi, &asc);
  if (sr_view_index (s, ci, &ix) == -1)
    return;
  for (uint64_t p = 0; p < s->npages && p < 4096; ) {
    uint64_t end;
    int32_t src = sr_index_find (&ix, p, &end);
    int32_t want = -1;

    if (end <= p || end > s->npages)
      abort ();
    for (size_t k = 0; k < hi - lo; ++k) {
      size_t i = asc ? lo + k : hi - 1 - k;
      if (sbitmap_test (&s->layers[i].map, p)) {
        want = i;
        break;
      }
    }
    if (src != want) {
      fprintf (stderr, "view index: page %lu from %d, expected %d\n",
               (unsigned long) p, src, want);
      abort ();
    }
    p++;
  }
  sr_index_free (&ix);
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  const int fds = fuzz_fds ();
  struct storeread s;
  const char *dir;
  uint8_t flags;

  if (size < 1)
    return 0;
  flags = data[0];
  dir = fuzz_mkdir ();
  fuzz_unpack (dir, data + 1, size - 1, flags & 1);

  if (flags & 2) {
    /* The plugin. */
    if (sr_open (&s, dir, true) == 0)
      for (size_t i = 0; i < s.m.nckpts; ++i)
        if (sr_readable (&s.m, i, NULL))
          check_view (&s, i);
    sr_close (&s);
  }
  else if (sr_load (&s, dir) == 0) {
    /* nbdsnap check. */
    size_t problems = 0;
    bool *ok = calloc (s.nlayers + 1, sizeof *ok);

    if (ok == NULL)
      abort ();
    sr_scan (&s, count_report, &problems);
    for (size_t i = 0; i < s.nlayers; ++i) {
      char *path = store_file_path (s.dir, STORE_FILE_LAYER_MAP,
                                    s.layers[i].id);
      struct stat st;

      if (path && stat (path, &st) == 0)
        ok[i] = sr_open_layer (&s, i) == 0;
      free (path);
    }
    for (size_t i = 0; i < s.m.nckpts; ++i)
      sr_open_map (&s, i);
    for (size_t i = 0; i < s.m.nckpts; ++i)
      if (sr_readable (&s.m, i, NULL)) {
        size_t lo, hi;
        bool asc, all = true;

        sr_snapshot_view (&s.m, i, &lo, &hi, &asc);
        for (size_t k = lo; k < hi; ++k)
          all &= ok[k];
        if (all)
          check_view (&s, i);
      }
    free (ok);
    sr_close (&s);
  }
  else
    sr_close (&s);
  fuzz_done (dir, fds);
  return 0;
}
