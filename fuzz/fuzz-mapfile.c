/* Fuzz the map file loader (common/bitmap/mapfile.c): layer maps,
 * dirty maps, the intent map and a revert's map are all map files.
 *
 * Input: a flag byte, then the file.
 *   bit 0: recompute the header's and the seal's CRCs (fuzz.h);
 *   bit 1: open it writable;
 *   bit 2: what the caller expects (kind, granularity, nbits) follows
 *          as u8 kind, u8 log2 of the granularity, u32 nbits; else
 *          the caller expects what the header says.
 * The file is loaded with mapfile_open_sealed.  A map that loads must
 * hold exactly the bits of its pages, none past nbits, and survive
 * being written out again (collect, write, seal) and reloaded.
 */
#include <config.h>

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fuzz.h"
#include "mapfile.h"
#include "sbitmap.h"

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

static uint32_t
le32 (const uint8_t *p)
{
  return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t) p[3] << 24;
}

static uint64_t
le64 (const uint8_t *p)
{
  return le32 (p) | (uint64_t) le32 (p + 4) << 32;
}

/* The bits set in the file's pages (below nbits: others fail to load). */
static uint64_t
count_file_bits (const uint8_t *file, size_t size, uint64_t nbits)
{
  uint64_t n = 0;

  for (size_t i = MAPFILE_HEADER_SIZE; i < size; ++i) {
    uint64_t bit0 = (uint64_t) (i - MAPFILE_HEADER_SIZE) * 8;
    if (bit0 >= nbits)
      break;
    n += __builtin_popcount (file[i]);
  }
  return n;
}

static void
check_reload (const char *dir, struct sbitmap *bm, uint32_t kind,
              uint32_t granularity)
{
  char path[512];
  struct mapfile_batch batch = { 0 };
  struct mapfile_seal seal = { 0 }, seal2;
  struct sbitmap bm2;
  bool sealed;
  int fd;

  snprintf (path, sizeof path, "%s/copy.map", dir);
  fd = mapfile_create (path, kind, granularity, bm->nbits);
  if (fd == -1)
    return;                     /* too large for a file: fine */
  sbitmap_mark_all_dirty (bm);
  if (mapfile_collect (bm, &batch) == -1 || mapfile_write (fd, &batch) == -1)
    abort ();
  mapfile_batch_free (&batch);
  mapfile_seal_compute (bm, &seal);
  if (mapfile_set_seal (fd, &seal) == -1)
    abort ();
  close (fd);
  fd = mapfile_open_sealed (path, kind, granularity, bm->nbits, 0, &bm2,
                            &sealed, &seal2);
  if (fd == -1 || !sealed || seal2.nset != seal.nset ||
      sbitmap_count (&bm2) != sbitmap_count (bm)) {
    fprintf (stderr, "a map written out again does not reload\n");
    abort ();
  }
  for (uint64_t b = sbitmap_find_next_set (bm, 0); b < bm->nbits;
       b = sbitmap_find_next_set (bm, b + 1))
    if (!sbitmap_test (&bm2, b))
      abort ();
  close (fd);
  sbitmap_free (&bm2);
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  const int fds = fuzz_fds ();
  struct fuzz_in in = { data, size };
  uint8_t flags = fuzz_u8 (&in);
  uint32_t kind, granularity;
  uint64_t nbits;
  uint8_t *file;
  const char *dir;
  char path[512];
  struct sbitmap bm;
  struct mapfile_seal seal;
  bool sealed;
  int fd;

  if (flags & 4) {
    kind = fuzz_u8 (&in);
    granularity = UINT32_C (1) << (fuzz_u8 (&in) % 32);
    nbits = fuzz_u32 (&in);
  }
  file = malloc (in.left + 1);
  if (file == NULL)
    abort ();
  memcpy (file, in.p, in.left);
  if (flags & 1)
    fuzz_fix_mapfile (file, in.left);
  if (!(flags & 4)) {
    if (in.left < 32) {
      free (file);
      return 0;
    }
    kind = le32 (&file[12]);
    granularity = le32 (&file[16]);
    nbits = le64 (&file[24]);
  }

  dir = fuzz_mkdir ();
  fuzz_write_file (dir, "test.map", file, in.left);
  snprintf (path, sizeof path, "%s/test.map", dir);
  fd = mapfile_open_sealed (path, kind, granularity, nbits, flags & 2, &bm,
                            &sealed, &seal);
  if (fd >= 0) {
    uint64_t n = sbitmap_count (&bm);

    if (bm.nbits != nbits ||
        n != count_file_bits (file, in.left, nbits) ||
        (sealed && n != seal.nset) ||
        (nbits > 0 && sbitmap_find_next_set (&bm, 0) < nbits &&
         !sbitmap_test (&bm, sbitmap_find_next_set (&bm, 0)))) {
      fprintf (stderr, "the loaded map does not hold the file's bits\n");
      abort ();
    }
    close (fd);
    check_reload (dir, &bm, kind, granularity);
    sbitmap_free (&bm);
  }
  free (file);
  fuzz_done (dir, fds);
  return 0;
}
