/* nbdkit-snapshot: write-intent regions for the active dirty map.
 *
 * Where a write lands in place (on the origin with no snapshot, or in
 * a layer older than the newest checkpoint), nothing else records that
 * the block changed, so its bit in the active dirty map must be on
 * disk before the write is issued (guarantee 3).  Syncing the map for
 * every newly dirtied block costs one fdatasync per new block, which
 * caps random writes at the disk's sync rate.  Instead (as md RAID's
 * write-intent bitmap does), a write first makes durable a coarse
 * "intent" bit for its region (64 MiB or more, see intent_open), and
 * writes its fine bit to the dirty map file without syncing:
 *
 *   1. set the block's bit in memory (ckpt_mark);
 *   2. store it into the map file, no sync: into the file's shared
 *      mapping (checkpoint.c, ckpt_map_store_bits), or where the file
 *      could not be mapped, by pwrite (ckpt_map_persist, sync false);
 *   3. intent_ensure: if the region's intent bit is not yet on disk,
 *      set it and fdatasync intent.map (group commit);
 *   4. issue the write.
 *
 * A write pays one sync per region it is the first to touch, and a
 * memory store per newly dirtied block.  After a crash:
 *
 * - kill -9 (the kernel lived on): every step-2 write is in the page
 *   cache, so the fine map read back is exact.  The store records the
 *   boot it ran in (boot-id); at start-up in the same boot the map is
 *   synced and used as it is.
 * - power loss or kernel crash (another boot): fine bits of writes
 *   since the last sync may be lost, but each such write's region is
 *   set in intent.map, so every block of every set region is marked
 *   (over-marking allowed, never missing a block).
 *
 * Clearing (intent_clear, on a client flush at most every 5 s (-D
 * snapshot.intent_clear_ms), when a checkpoint is taken, and at a
 * clean stop):
 * bump the epoch, fdatasync the fine map, then clear every region not
 * touched since the bump.  A writer touches its region (step 3, under
 * lock) after its step-2 write completed, so a region last touched
 * before the bump has all its fine bits covered by that fdatasync.
 * The in-memory "durable" flag of a region is dropped before the file
 * is rewritten without it, so no writer trusts a bit that may vanish.
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <nbdkit-filter.h>

#include "cleanup.h"
#include "mapfile.h"
#include "store.h"
#include "util.h"

#define INTENT_FILE "intent.map"
#define BOOT_ID_FILE "boot-id"
#define INTENT_MIN_REGION (UINT64_C (64) << 20)
#define INTENT_MAX_REGIONS UINT64_C (65536)

static struct {
  int fd;
  uint64_t region_blocks;       /* blocks per region */
  uint64_t nregions;
  pthread_mutex_t lock;         /* protects everything below */
  pthread_cond_t cond;
  uint8_t *want;                /* regions the file should hold */
  uint8_t *durable;             /* regions known to be in the file */
  uint32_t *touched;            /* epoch of each region's last use */
  uint32_t epoch;
  uint64_t seq, synced;         /* group commit, as ckpt_map_persist */
  bool busy;
  int64_t last_clear_ns;
} intent = { .fd = -1, .lock = PTHREAD_MUTEX_INITIALIZER,
             .cond = PTHREAD_COND_INITIALIZER };

/* The kernel's boot id (36 characters), or "" if it cannot be read. */
static void
read_boot_id (const char *path, char id[64])
{
  FILE *fp = fopen (path, "r");

  id[0] = '\0';
  if (fp == NULL)
    return;
  if (fgets (id, 64, fp) == NULL)
    id[0] = '\0';
  id[strcspn (id, "\n")] = '\0';
  fclose (fp);
}

/* Write the whole bitmap want (taken under the lock) to the file and
 * sync it.
 */
static int
intent_write (const uint8_t *want)
{
  const size_t bytes = (intent.nregions + 7) / 8;
  CLEANUP_FREE uint8_t *bits = calloc (1, bytes);

  if (bits == NULL)
    return -1;
  for (uint64_t r = 0; r < intent.nregions; ++r)
    if (want[r])
      bits[r / 8] |= 1 << (r % 8);
  /* Bit r of the sbitmap page lives in little-endian word r/64, which
   * is byte r/8, bit r%8: the same layout as bytes.
   */
  if (full_pwrite (intent.fd, bits, bytes, MAPFILE_HEADER_SIZE) == -1)
    return -1;
  return fdatasync (intent.fd);
}

/* Group commit of the current want set.  Called and returns with the
 * lock held; the caller's request must be counted in intent.seq.
 */
static int
intent_sync_locked (uint64_t mine)
{
  while (intent.synced < mine) {
    if (!intent.busy) {
      const uint64_t target = intent.seq;
      CLEANUP_FREE uint8_t *snap = malloc (intent.nregions);
      int r;

      if (snap == NULL)
        return -1;
      memcpy (snap, intent.want, intent.nregions);
      intent.busy = true;
      pthread_mutex_unlock (&intent.lock);
      r = intent_write (snap);
      pthread_mutex_lock (&intent.lock);
      intent.busy = false;
      pthread_cond_broadcast (&intent.cond);
      if (r == -1)
        return -1;
      /* A region is durable if the file now has it and nobody has
       * cleared it since (a clear drops want first).
       */
      for (uint64_t i = 0; i < intent.nregions; ++i)
        if (snap[i] && intent.want[i])
          __atomic_store_n (&intent.durable[i], 1, __ATOMIC_SEQ_CST);
      intent.synced = target;
    }
    else
      pthread_cond_wait (&intent.cond, &intent.lock);
  }
  return 0;
}

/* Touch regions [r0, r1] in the current epoch and make them durable
 * (takes the lock).
 */
static int
intent_ensure_slow (uint64_t r0, uint64_t r1)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&intent.lock);
  bool need = false;

  if (intent.fd == -1)
    return 0;
  for (uint64_t r = r0; r <= r1 && r < intent.nregions; ++r) {
    __atomic_store_n (&intent.touched[r], intent.epoch, __ATOMIC_SEQ_CST);
    if (!intent.durable[r]) {
      intent.want[r] = 1;
      need = true;
    }
  }
  if (!need)
    return 0;
  return intent_sync_locked (++intent.seq);
}

int
intent_ensure (uint64_t first_block, uint64_t last_block)
{
  const uint64_t r0 = first_block / intent.region_blocks;
  const uint64_t r1 = last_block / intent.region_blocks;

  if (intent.fd == -1)
    return 0;
  /* Without the lock: a region durable and touched in the current
   * epoch stays durable until a clear bumps the epoch, and that clear
   * syncs the fine bits this writer stored before reading the epoch.
   */
  for (uint64_t r = r0; r <= r1 && r < intent.nregions; ++r)
    if (!__atomic_load_n (&intent.durable[r], __ATOMIC_SEQ_CST) ||
        __atomic_load_n (&intent.touched[r], __ATOMIC_SEQ_CST) !=
        __atomic_load_n (&intent.epoch, __ATOMIC_SEQ_CST))
      return intent_ensure_slow (r0, r1);
  return 0;
}

int
intent_clear (bool rate_limited)
{
  struct ckpt_map *d;
  uint32_t t;
  bool changed = false;

  if (intent.fd == -1 || store.m.nckpts == 0)
    return 0;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&intent.lock);
    int64_t now = snap_now_ns ();
    bool any = false;

    /* The time first: a client flush rarely needs to scan the regions. */
    if (rate_limited && now - intent.last_clear_ns <
        snapshot_debug_intent_clear_ms * INT64_C (1000000))
      return 0;
    for (uint64_t r = 0; r < intent.nregions && !any; ++r)
      any = intent.want[r];
    if (!any)
      return 0;
    intent.last_clear_ns = now;
    t = __atomic_add_fetch (&intent.epoch, 1, __ATOMIC_SEQ_CST);
  }
  /* Every fine bit written before the bump is now made durable. */
  d = store.maps[store.m.nckpts - 1];
  if (ckpt_map_persist (d, true) == -1)
    return -1;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&intent.lock);

    for (uint64_t r = 0; r < intent.nregions; ++r)
      if (intent.want[r] && intent.touched[r] < t) {
        intent.want[r] = 0;
        __atomic_store_n (&intent.durable[r], 0, __ATOMIC_SEQ_CST);
        changed = true;
      }
    if (!changed)
      return 0;
    return intent_sync_locked (++intent.seq);
  }
}

/* After an unclean stop in another boot: mark every block of every
 * region set in the file in the active map.  Return the number of
 * regions, or -1.
 */
static int64_t
intent_expand (const struct sbitmap *bm)
{
  int64_t n = 0;

  for (uint64_t r = sbitmap_find_next_set (bm, 0); r < intent.nregions;
       r = sbitmap_find_next_set (bm, r + 1)) {
    uint64_t first = r * intent.region_blocks;
    uint64_t count = MIN (intent.region_blocks, store.nblocks - first);
    if (ckpt_mark_range (first * store.block_size,
                         MIN (count * store.block_size,
                              store.size - first * store.block_size)) == -1)
      return -1;
    n++;
  }
  return n;
}

int
intent_open (void)
{
  CLEANUP_FREE char *path = NULL, *bpath = NULL;
  char prev[64], cur[64];
  uint64_t region = INTENT_MIN_REGION;
  struct sbitmap bm;
  int fd;

  while (region < store.block_size ||
         (region < (UINT64_C (1) << 31) &&
          store.size / region >= INTENT_MAX_REGIONS))
    region <<= 1;
  intent.region_blocks = region / store.block_size;
  intent.nregions = (store.nblocks + intent.region_blocks - 1)
    / intent.region_blocks;
  intent.want = calloc (intent.nregions, 1);
  intent.durable = calloc (intent.nregions, 1);
  intent.touched = calloc (intent.nregions, sizeof *intent.touched);
  if (intent.want == NULL || intent.durable == NULL ||
      intent.touched == NULL) {
    nbdkit_error ("calloc: %m");
    return -1;
  }
  if (asprintf (&path, "%s/" INTENT_FILE, store.dir) == -1) {
    nbdkit_error ("asprintf: %m");
    return -1;
  }

  read_boot_id ("/proc/sys/kernel/random/boot_id", cur);
  if (asprintf (&bpath, "%s/" BOOT_ID_FILE, store.dir) == -1) {
    nbdkit_error ("asprintf: %m");
    return -1;
  }
  read_boot_id (bpath, prev);
  if (access (path, F_OK) == -1) {
    fd = mapfile_create (path, MAPFILE_KIND_INTENT, region, intent.nregions);
    if (fd == -1)
      return -1;
    /* Allocate the bits now: rewriting them never needs space. */
    if ((fallocate (fd, 0, MAPFILE_HEADER_SIZE, (intent.nregions + 7) / 8)
         == -1 && errno != EOPNOTSUPP) || fsync_dir (store.dir) == -1) {
      nbdkit_error ("%s: %m", path);
      close (fd);
      unlink (path);
      return -1;
    }
  }
  else {
    struct ckpt_map *d = store.m.nckpts > 0
      ? store.maps[store.m.nckpts - 1] : NULL;
    int64_t n = 0;

    fd = mapfile_open (path, MAPFILE_KIND_INTENT, region, intent.nregions,
                       1, &bm);
    if (fd == -1)
      return -1;
    if (sbitmap_find_next_set (&bm, 0) < intent.nregions) {
      /* An unclean stop.  In the same boot the page cache kept every
       * fine bit; in another, expand the regions.
       */
      if (d && (cur[0] == '\0' || strcmp (prev, cur) != 0))
        n = intent_expand (&bm);
      /* Sync the whole file: the kernel may hold fine bits that were
       * written before the stop but never synced.
       */
      if (d)
        d->unsynced = true;
      if (n == -1 || (d && ckpt_map_persist (d, true) == -1)) {
        nbdkit_error ("%s: recovering the write-intent regions: %m",
                      store.dir);
        sbitmap_free (&bm);
        close (fd);
        return -1;
      }
      if (d)
        nbdkit_debug ("snapshot: unclean stop: %s", n > 0
                      ? "marked the blocks of every region written "
                      "(another boot)"
                      : "the dirty map is exact (same boot)");
      if (n > 0)
        nbdkit_debug ("snapshot: %" PRIi64 " regions of %" PRIu64
                      " bytes marked", n, region);
      /* Start from an empty intent file (everything is durable now). */
      intent.fd = fd;
      if (intent_write (intent.want) == -1) {
        nbdkit_error ("%s: %m", path);
        sbitmap_free (&bm);
        close (fd);
        intent.fd = -1;
        return -1;
      }
    }
    sbitmap_free (&bm);
  }
  intent.fd = fd;
  /* Record the boot this run is in.  If that fails (a full disk), drop
   * the old record: without one, the next start assumes another boot,
   * which only marks more.
   */
  if (cur[0] != '\0' && strcmp (prev, cur) != 0) {
    char line[80];
    snprintf (line, sizeof line, "%s\n", cur);
    if (write_file_atomic (store.dir, BOOT_ID_FILE, line, strlen (line))
        == -1) {
      nbdkit_debug ("%s: %m (ignored)", bpath);
      if (unlink (bpath) == -1 && errno != ENOENT) {
        nbdkit_error ("%s: %m", bpath);
        return -1;
      }
    }
  }
  return 0;
}

void
intent_distrust (void)
{
  CLEANUP_FREE char *bpath = NULL;

  /* A failed sync of the dirty map may have lost fine bits from the
   * page cache (a failed write-back leaves the pages clean, free to be
   * dropped), so the next start must not take the map as exact, as it
   * would in the same boot.  Without a boot record it assumes another
   * boot: every region set in intent.map, where every such bit's
   * region is, gets all its blocks marked.
   */
  if (asprintf (&bpath, "%s/" BOOT_ID_FILE, store.dir) == -1)
    bpath = NULL;
  if (bpath == NULL ||
      (unlink (bpath) == -1 && errno != ENOENT) ||
      fsync_dir (store.dir) == -1)
    nbdkit_error ("%s/" BOOT_ID_FILE ": dropping the boot record: %m: "
                  "remove it before the next start, so that it marks the "
                  "regions written", store.dir);
}

void
intent_close (void)
{
  if (intent.fd >= 0)
    close (intent.fd);
  intent.fd = -1;
  free (intent.want);
  free (intent.durable);
  free (intent.touched);
  intent.want = intent.durable = NULL;
  intent.touched = NULL;
}
