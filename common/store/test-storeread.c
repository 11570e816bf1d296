/* Unit tests for the store reader's index, the names of store files
 * and the union of bitmaps (storeread.h, storefiles.h, sbitmap.h).
 */
#include <config.h>

#include <fcntl.h>
#include <linux/falloc.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#undef NDEBUG
#include <assert.h>

#include "storefiles.h"
#include "storeread.h"
#include "util.h"

void
snap_verror (const char *fs, va_list args)
{
  fprintf (stderr, "error: ");
  vfprintf (stderr, fs, args);
  fputc ('\n', stderr);
}

static uint64_t rng_state = 0x9e3779b97f4a7c15;

static uint64_t
rnd (void)
{
  rng_state += 0x9e3779b97f4a7c15;
  return snap_mix64 (rng_state);
}

/* The source of page p by testing each map in turn (the slow way the
 * index replaces).
 */
static int32_t
brute (size_t n, const struct sbitmap *const *maps, const int32_t *src,
       uint64_t p)
{
  for (size_t k = 0; k < n; ++k)
    if (sbitmap_test (maps[k], p))
      return src[k];
  return -1;
}

/* Random maps over npages: runs of random lengths, some maps dense,
 * some sparse, some empty, one maybe full; check every page and every
 * run end against brute.
 */
static void
test_index (size_t n, uint64_t npages, bool full_last)
{
  struct sbitmap *bms = calloc (n + 1, sizeof *bms);
  const struct sbitmap **maps = calloc (n + 1, sizeof *maps);
  int32_t *src = calloc (n + 1, sizeof *src);
  struct sr_index ix;

  assert (bms && maps && src);
  for (size_t k = 0; k < n; ++k) {
    uint64_t density = rnd () % 4, p = 0;

    assert (sbitmap_init (&bms[k], npages) == 0);
    if (full_last && k == n - 1)
      assert (sbitmap_set_range (&bms[k], 0, npages) >= 0);
    else if (density > 0)
      while (p < npages) {
        uint64_t gap = rnd () % (density == 1 ? 5000 : 300);
        uint64_t len = 1 + rnd () % (density == 3 ? 200 : 20);
        p += gap;
        if (p >= npages)
          break;
        len = MIN (len, npages - p);
        assert (sbitmap_set_range (&bms[k], p, len) >= 0);
        p += len;
      }
    maps[k] = &bms[k];
    src[k] = (int32_t) (n - 1 - k);     /* like a row view */
  }
  assert (sr_index_build (n, maps, src, npages, &ix) == 0);
  assert (ix.nruns >= 1 && ix.start[0] == 0 && ix.start[ix.nruns] == npages);
  for (size_t r = 0; r + 1 < ix.nruns; ++r) {
    assert (ix.start[r] < ix.start[r + 1]);
    assert (ix.src[r] != ix.src[r + 1]);        /* runs are maximal */
  }
  for (uint64_t p = 0; p < npages; ) {
    uint64_t end;
    int32_t s = sr_index_find (&ix, p, &end);

    assert (end > p && end <= npages);
    for (uint64_t q = p; q < end; ++q)
      assert (brute (n, maps, src, q) == s);
    assert (end == npages || brute (n, maps, src, end) != s);
    /* A lookup in the middle of the run agrees. */
    if (end - p > 2) {
      uint64_t e2;
      assert (sr_index_find (&ix, p + (end - p) / 2, &e2) == s && e2 == end);
    }
    p = end;
  }
  sr_index_free (&ix);
  for (size_t k = 0; k < n; ++k)
    sbitmap_free (&bms[k]);
  free (bms);
  free (maps);
  free (src);
}

static void
test_classify (void)
{
  uint64_t id = 0;
  char *path;

  assert (store_file_classify ("layer-12.data", &id) == STORE_FILE_LAYER_DATA
          && id == 12);
  assert (store_file_classify ("layer-3.map", &id) == STORE_FILE_LAYER_MAP
          && id == 3);
  assert (store_file_classify ("dirty-7.map", &id) == STORE_FILE_DIRTY_MAP
          && id == 7);
  assert (store_file_classify ("revert-9.map", &id) == STORE_FILE_REVERT_MAP
          && id == 9);
  assert (store_file_classify ("layer-4.data.link", &id) ==
          STORE_FILE_DATA_LINK && id == 4);
  assert (store_file_classify ("manifest", &id) == STORE_FILE_MANIFEST);
  assert (store_file_classify ("lock", &id) == STORE_FILE_LOCK);
  assert (store_file_classify ("boot-id", &id) == STORE_FILE_BOOT_ID);
  assert (store_file_classify ("intent.map", &id) == STORE_FILE_INTENT);
  assert (store_file_classify ("control.sock", &id) == STORE_FILE_CONTROL);
  assert (store_file_classify (".manifest.tmp", &id) == STORE_FILE_TEMP);
  assert (store_file_classify (".boot-id.tmp", &id) == STORE_FILE_TEMP);
  assert (store_file_classify ("layer-x.data", &id) == STORE_FILE_OTHER);
  assert (store_file_classify ("layer-1.data~", &id) == STORE_FILE_OTHER);
  assert (store_file_classify ("layer--1.data", &id) == STORE_FILE_OTHER);
  assert (store_file_classify ("dirty-1.data", &id) == STORE_FILE_OTHER);
  assert (store_file_classify ("README", &id) == STORE_FILE_OTHER);
  /* Ids no manifest can have (the filter's sweep would set next-id
   * past them: id + 1 must not wrap).
   */
  assert (store_file_classify ("layer-9223372036854775806.map", &id) ==
          STORE_FILE_LAYER_MAP && id == UINT64_C (9223372036854775806));
  assert (store_file_classify ("layer-9223372036854775807.map", &id) ==
          STORE_FILE_OTHER);
  assert (store_file_classify ("dirty-18446744073709551615.map", &id) ==
          STORE_FILE_OTHER);
  assert (store_file_classify ("dirty-18446744073709551616.map", &id) ==
          STORE_FILE_OTHER);
  path = store_file_path ("/s", STORE_FILE_DIRTY_MAP, 42);
  assert (path && strcmp (path, "/s/dirty-42.map") == 0);
  free (path);
  path = store_file_path ("/s", STORE_FILE_DATA_LINK, 5);
  assert (path && strcmp (path, "/s/layer-5.data.link") == 0);
  free (path);
  assert (store_file_path ("/s", STORE_FILE_LOCK, 1) == NULL);
}

static const struct sbitmap *
get_bm (size_t i, void *opaque)
{
  return &((struct sbitmap *) opaque)[i];
}

static void
test_union (void)
{
  struct sbitmap bms[3];
  const uint64_t nbits = 100000;

  for (int k = 0; k < 3; ++k)
    assert (sbitmap_init (&bms[k], nbits) == 0);
  for (int i = 0; i < 300; ++i) {
    int k = rnd () % 3;
    uint64_t p = rnd () % nbits, len = 1 + rnd () % 100;
    assert (sbitmap_set_range (&bms[k], p, MIN (len, nbits - p)) >= 0);
  }
  for (uint64_t b = 0; b < nbits; ) {
    bool any;
    uint64_t end = sbitmap_union_run (3, get_bm, bms, b, nbits, &any);
    assert (end > b && end <= nbits);
    for (uint64_t q = b; q < end; ++q)
      assert ((sbitmap_test (&bms[0], q) || sbitmap_test (&bms[1], q) ||
               sbitmap_test (&bms[2], q)) == any);
    b = end;
  }
  {
    bool any = true;
    assert (sbitmap_union_run (0, get_bm, bms, 5, 10, &any) == 10 && !any);
  }
  for (int k = 0; k < 3; ++k)
    sbitmap_free (&bms[k]);
}

static void
test_data_run (void)
{
  char path[] = "/tmp/test-storeread.XXXXXX";
  int fd = mkstemp (path);
  char buf[4096];
  bool data;
  uint64_t end;

  assert (fd >= 0);
  unlink (path);
  assert (ftruncate (fd, 1 << 20) == 0);
  memset (buf, 1, sizeof buf);
  assert (pwrite (fd, buf, sizeof buf, 65536) == sizeof buf);
  end = sr_data_run (fd, 0, 1 << 20, &data);
  /* A file system without holes says data everywhere. */
  if (data)
    assert (end == 1 << 20);
  else {
    assert (end == 65536);
    end = sr_data_run (fd, 65536, 1 << 20, &data);
    assert (data && end > 65536 && end <= 1 << 20);
  }
  close (fd);
}

/* The holes of a layer do not depend on the page cache: a page of an
 * unwritten (preallocated) extent counts as a hole before and after it
 * is read.
 */
static void
test_holes (void)
{
  char path[] = "/tmp/test-storeread-holes.XXXXXX";
  int fd = mkstemp (path);
  const uint64_t size = 1 << 20, npages = size / STORE_PAGE_SIZE;
  struct sbitmap map;
  char buf[STORE_PAGE_SIZE];
  uint64_t n1, s1, n2, s2;

  assert (fd >= 0);
  unlink (path);
  assert (ftruncate (fd, size) == 0);
  assert (sbitmap_init (&map, npages) == 0);
  /* Pages 0-3 data, 4-7 a hole, 16-31 preallocated, all held. */
  memset (buf, 7, sizeof buf);
  for (int p = 0; p < 4; ++p)
    assert (pwrite (fd, buf, sizeof buf, p * STORE_PAGE_SIZE) == sizeof buf);
  assert (sbitmap_set_range (&map, 0, 8) >= 0);
  assert (sbitmap_set_range (&map, 16, 16) >= 0);
  if (fallocate (fd, FALLOC_FL_KEEP_SIZE, 16 * STORE_PAGE_SIZE,
                 16 * STORE_PAGE_SIZE) == -1) {
    close (fd);
    sbitmap_free (&map);
    return;                     /* no preallocation here */
  }
  assert (fdatasync (fd) == 0);
  assert (store_layer_holes (fd, &map, size, &n1, &s1) == 0);
  assert (pread (fd, buf, sizeof buf, 20 * STORE_PAGE_SIZE) == sizeof buf);
  assert (store_layer_holes (fd, &map, size, &n2, &s2) == 0);
  assert (n1 == n2 && s1 == s2);
  /* 4-7 and (unless the file system has no unwritten extents) 16-31. */
  assert (n1 == 4 || n1 == 20);
  close (fd);
  sbitmap_free (&map);
}

int
main (void)
{
  test_holes ();
  test_classify ();
  test_union ();
  test_data_run ();
  test_index (0, 1000, false);
  test_index (1, 1, false);
  test_index (1, 100000, true);
  for (int i = 0; i < 20; ++i)
    test_index (1 + rnd () % 12, 1 + rnd () % 300000, i % 3 == 0);
  test_index (70, 200000, true);        /* more than 64 layers */
  printf ("test-storeread: ok\n");
  return 0;
}
