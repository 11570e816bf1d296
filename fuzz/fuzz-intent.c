/* Fuzz the filter's loading of the write-intent map, intent.map
 * (filters/snapshot/intent.c: intent_open), and its recovery after an
 * unclean stop.
 *
 * Input:
 *   u8 flags   bit 0: recompute the map's CRCs (fuzz.h);
 *              bit 1: the store last ran in another boot (the regions
 *                     set in the file are expanded into the dirty map);
 *              bit 2: the store has no checkpoint;
 *              bit 3: size the volume to what the file's header says
 *                     (else from the next field)
 *   u8 block   the block size: 4096 << (block % 10)
 *   u64 size   the volume size (cut to at most 2^24 blocks)
 *   the rest   intent.map (none: no file, intent_open creates it)
 *
 * The store around it is the least intent_open needs: its size and
 * block size, and an active dirty map.  After a recovery from another
 * boot every block of every region the file set must be marked.
 */
#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "mapfile.h"
#include "store.h"

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

#define MAX_BLOCKS (UINT64_C (1) << 24)
/* As intent.c. */
#define REGION_MIN (UINT64_C (64) << 20)
#define MAX_REGIONS UINT64_C (65536)

static uint64_t
le64 (const uint8_t *p)
{
  uint64_t v = 0;

  for (int i = 7; i >= 0; --i)
    v = v << 8 | p[i];
  return v;
}

/* The region intent_open picks for the store. */
static uint64_t
region_of (void)
{
  uint64_t region = REGION_MIN;

  while (region < store.block_size ||
         (region < (UINT64_C (1) << 31) &&
          store.size / region >= MAX_REGIONS))
    region <<= 1;
  return region;
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  const int fds = fuzz_fds ();
  struct fuzz_in in = { data, size };
  uint8_t flags = fuzz_u8 (&in);
  uint32_t block_size = UINT32_C (4096) << (fuzz_u8 (&in) % 10);
  uint64_t vsize = fuzz_u64 (&in);
  struct manifest_checkpoint ckpt = { .name = "c", .map = 1 };
  struct ckpt_map *maps[2] = { NULL, NULL };
  uint8_t *file = NULL;
  const char *dir;
  char boot[64] = "";

  if (in.left > 0) {
    file = malloc (in.left);
    if (file == NULL)
      abort ();
    memcpy (file, in.p, in.left);
    if (flags & 1)
      fuzz_fix_mapfile (file, in.left);
  }
  if ((flags & 8) && file && in.left >= 32) {
    /* A volume whose regions are what the header says. */
    uint64_t g = file[16] | file[17] << 8 | file[18] << 16 |
      (uint64_t) file[19] << 24;
    uint64_t n = le64 (&file[24]);

    if (g >= REGION_MIN && g <= (UINT64_C (1) << 31) &&
        (g & (g - 1)) == 0 && n >= 1 && n <= 2 * MAX_REGIONS)
      vsize = (n - 1) * g + 1 + vsize % g;
  }
  if (vsize == 0)
    vsize = 1;
  while (vsize / block_size >= MAX_BLOCKS && block_size < 2 * 1024 * 1024)
    block_size <<= 1;
  if (vsize / block_size >= MAX_BLOCKS)
    vsize = (MAX_BLOCKS - 1) * block_size;

  dir = fuzz_mkdir ();
  store.dir = strdup (dir);
  if (store.dir == NULL)
    abort ();
  store.size = store.m.size = vsize;
  store.block_size = store.m.block_size = block_size;
  store.npages = (vsize + 4095) / 4096;
  store.nblocks = (vsize + block_size - 1) / block_size;
  store.m.next_id = 2;
  store.maps = maps;
  if (!(flags & 4)) {
    store.m.ckpts = &ckpt;
    store.m.nckpts = 1;
    maps[0] = ckpt_map_create (1);
    if (maps[0] == NULL)
      abort ();
  }

  /* The boot the store last ran in. */
  if (flags & 2)
    strcpy (boot, "00000000-0000-0000-0000-000000000000\n");
  else {
    FILE *fp = fopen ("/proc/sys/kernel/random/boot_id", "r");
    if (fp) {
      if (fgets (boot, sizeof boot, fp) == NULL)
        boot[0] = '\0';
      fclose (fp);
    }
  }
  fuzz_write_file (dir, "boot-id", boot, strlen (boot));
  if (file)
    fuzz_write_file (dir, "intent.map", file, in.left);

  if (intent_open () == 0) {
    const uint64_t region = region_of ();
    const uint64_t rblocks = region / block_size;
    const uint64_t nregions = (store.nblocks + rblocks - 1) / rblocks;

    /* After another boot, every block of a region set is marked. */
    if ((flags & 2) && maps[0] && file && in.left > MAPFILE_HEADER_SIZE)
      for (uint64_t r = 0; r < nregions; ++r) {
        const uint64_t byte = MAPFILE_HEADER_SIZE + r / 8;
        if (byte >= in.left || !(file[byte] & (1 << (r % 8))))
          continue;
        for (uint64_t b = r * rblocks;
             b < (r + 1) * rblocks && b < store.nblocks; ++b)
          if (!sbitmap_test (&maps[0]->bm, b)) {
            fprintf (stderr, "region %lu was set, block %lu not marked\n",
                     (unsigned long) r, (unsigned long) b);
            abort ();
          }
      }
    /* Writes everywhere, then a clear. */
    if (intent_ensure (0, store.nblocks - 1) == -1 ||
        intent_clear (false) == -1)
      abort ();
  }
  intent_close ();

  ckpt_map_free (maps[0]);
  store.maps = NULL;
  store.m.ckpts = NULL;
  store.m.nckpts = 0;
  free (store.dir);
  store.dir = NULL;
  free (file);
  fuzz_done (dir, fds);
  return 0;
}
