/* Unit tests for common/bitmap/mapfile.c. */
#include <config.h>

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#undef NDEBUG
#include <assert.h>

#include "mapfile.h"
#include "sbitmap.h"
#include "util.h"

/* The last error message, so tests can check its text. */
static char last_error[1024];
static int nr_errors;

void
snap_verror (const char *fs, va_list args)
{
  va_list copy;

  va_copy (copy, args);
  vsnprintf (last_error, sizeof last_error, fs, copy);
  va_end (copy);
  nr_errors++;
  fprintf (stderr, "test-mapfile: (expected) %s\n", last_error);
}

#define PB SBITMAP_PAGE_BITS

static char dir[] = "/tmp/test-mapfile.XXXXXX";

static uint64_t rng_state = 0x0123456789abcdefULL;

static uint64_t
rnd (void)
{
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * 0x2545f4914f6cdd1dULL;
}

static char *
path_of (const char *name)
{
  static char buf[256];
  snprintf (buf, sizeof buf, "%s/%s", dir, name);
  return buf;
}

/* Assert that the last error mentions each of the strings. */
static void
expect_error (const char *s1, const char *s2, const char *s3)
{
  const char *s[] = { s1, s2, s3 };

  for (int i = 0; i < 3; ++i) {
    if (s[i] && strstr (last_error, s[i]) == NULL) {
      fprintf (stderr, "error \"%s\" does not contain \"%s\"\n",
               last_error, s[i]);
      abort ();
    }
  }
}

/* Open must fail and report an error containing the strings. */
static void
expect_open_fails (const char *path, uint32_t kind, uint32_t gran,
                   uint64_t nbits, const char *s1, const char *s2,
                   const char *s3)
{
  struct sbitmap bm;
  int errs = nr_errors;

  last_error[0] = '\0';
  assert (mapfile_open (path, kind, gran, nbits, 1, &bm) == -1);
  assert (nr_errors == errs + 1);
  assert (strstr (last_error, path) != NULL);
  expect_error (s1, s2, s3);
  assert (bm.pages == NULL);    /* Nothing left allocated. */
}

static void
assert_equal (const struct sbitmap *a, const struct sbitmap *b)
{
  assert (a->nbits == b->nbits);
  assert (sbitmap_count (a) == sbitmap_count (b));
  for (size_t p = 0; p < a->npages; ++p) {
    uint64_t wa[SBITMAP_PAGE_WORDS], wb[SBITMAP_PAGE_WORDS];

    sbitmap_copy_page (a, p, wa);
    sbitmap_copy_page (b, p, wb);
    assert (memcmp (wa, wb, sizeof wa) == 0);
  }
}

/* Collect the dirty pages of bm and write them to fd. */
static void
flush (int fd, struct sbitmap *bm)
{
  struct mapfile_batch batch = { 0 };

  assert (mapfile_collect (bm, &batch) == 0);
  assert (mapfile_write (fd, &batch) == 0);
  mapfile_batch_free (&batch);
}

static void
set_random_bits (struct sbitmap *bm, uint64_t n)
{
  for (uint64_t i = 0; i < n && bm->nbits; ++i)
    assert (sbitmap_set (bm, rnd () % bm->nbits) >= 0);
}

/*----------------------------------------------------------------*/

static void
test_round_trip (uint64_t nbits, uint32_t gran)
{
  const char *path = path_of ("rt.map");
  struct sbitmap bm, loaded;
  struct stat st;
  int fd;

  unlink (path);
  fd = mapfile_create (path, MAPFILE_KIND_LAYER, gran, nbits);
  assert (fd >= 0);
  assert (fstat (fd, &st) == 0);
  assert (st.st_size ==
          (off_t) (MAPFILE_HEADER_SIZE +
                   (nbits + PB - 1) / PB * SBITMAP_PAGE_BYTES));

  /* A fresh file loads as all clear. */
  {
    int rofd = mapfile_open (path, MAPFILE_KIND_LAYER, gran, nbits, 0,
                             &loaded);
    assert (rofd >= 0);
    assert (close (rofd) == 0);
  }
  assert (loaded.nbits == nbits && sbitmap_count (&loaded) == 0);
  for (size_t p = 0; p < loaded.npages; ++p)
    assert (!sbitmap_page_present (&loaded, p));
  sbitmap_free (&loaded);

  /* Random bits, including the last one, written and read back. */
  assert (sbitmap_init (&bm, nbits) == 0);
  set_random_bits (&bm, nbits / 7 + 3);
  if (nbits) {
    sbitmap_set (&bm, nbits - 1);
    sbitmap_set (&bm, 0);
  }
  flush (fd, &bm);
  assert (close (fd) == 0);
  fd = mapfile_open (path, MAPFILE_KIND_LAYER, gran, nbits, 1, &loaded);
  assert (fd >= 0);
  assert_equal (&bm, &loaded);
  /* Loaded pages are clean. */
  {
    struct mapfile_batch batch = { 0 };
    assert (mapfile_collect (&loaded, &batch) == 0);
    assert (batch.n == 0);
    mapfile_batch_free (&batch);
  }

  /* Change the loaded copy (clear a whole page's worth, so a page
   * becomes zero on disk, and set others), write through the
   * descriptor open returned, and read back again.
   */
  sbitmap_clear_range (&loaded, 0, nbits < PB ? nbits : PB);
  set_random_bits (&loaded, 100);
  flush (fd, &loaded);
  assert (close (fd) == 0);
  sbitmap_free (&bm);
  fd = mapfile_open (path, MAPFILE_KIND_LAYER, gran, nbits, 0, &bm);
  assert (fd >= 0);
  assert_equal (&bm, &loaded);
  assert (close (fd) == 0);

  sbitmap_free (&bm);
  sbitmap_free (&loaded);
  unlink (path);
}

static void
test_large_sparse (void)
{
  const uint64_t nbits = UINT64_C (1) << 28;  /* 1 TiB at 4 KiB */
  const char *path = path_of ("big.map");
  struct sbitmap bm;
  struct stat st;
  struct timespec t0, t1;
  double secs;
  int fd;

  clock_gettime (CLOCK_MONOTONIC, &t0);
  fd = mapfile_create (path, MAPFILE_KIND_DIRTY, 4096, nbits);
  assert (fd >= 0);
  assert (fstat (fd, &st) == 0);
  assert (st.st_size == MAPFILE_HEADER_SIZE + (off_t) (nbits / 8));
  /* Sparse: far less allocated than the 32 MiB size. */
  assert ((off_t) st.st_blocks * 512 < st.st_size / 4);
  assert (close (fd) == 0);

  fd = mapfile_open (path, MAPFILE_KIND_DIRTY, 4096, nbits, 1, &bm);
  assert (fd >= 0);
  assert (sbitmap_count (&bm) == 0);
  assert (sbitmap_find_next_set (&bm, 0) == nbits);
  assert (sbitmap_set (&bm, 0) == 0);
  assert (sbitmap_set (&bm, nbits / 2 + 77) == 0);
  assert (sbitmap_set (&bm, nbits - 1) == 0);
  flush (fd, &bm);
  assert (close (fd) == 0);
  sbitmap_free (&bm);

  fd = mapfile_open (path, MAPFILE_KIND_DIRTY, 4096, nbits, 0, &bm);
  assert (fd >= 0);
  assert (sbitmap_count (&bm) == 3);
  assert (sbitmap_find_next_set (&bm, 1) == nbits / 2 + 77);
  assert (sbitmap_find_next_set (&bm, nbits / 2 + 78) == nbits - 1);
  /* Only the three written pages were loaded. */
  {
    size_t present = 0;
    for (size_t p = 0; p < bm.npages; ++p)
      present += sbitmap_page_present (&bm, p);
    assert (present == 3);
    /* And in each, only the chunk holding the bit. */
    assert (sbitmap_chunks (&bm) == 3);
  }
  assert (fstat (fd, &st) == 0);
  assert ((off_t) st.st_blocks * 512 < st.st_size / 4);
  assert (close (fd) == 0);
  sbitmap_free (&bm);
  clock_gettime (CLOCK_MONOTONIC, &t1);
  secs = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
  printf ("test-mapfile: 2^28-bit map created, written and reopened "
          "twice in %.3f s\n", secs);
  unlink (path);
}

/* A short file is refused; pages after a hole load. */
static void
test_short_file_and_holes (void)
{
  const uint64_t nbits = 10 * PB;
  const char *path = path_of ("short.map");
  struct sbitmap bm, loaded;
  int fd;

  unlink (path);
  fd = mapfile_create (path, MAPFILE_KIND_LAYER, 65536, nbits);
  assert (fd >= 0);
  assert (sbitmap_init (&bm, nbits) == 0);
  /* Pages 1, 2 (adjacent), 5 and 9 hold bits; 0, 3, 4, 6-8 are holes. */
  sbitmap_set (&bm, PB + 3);
  sbitmap_set_range (&bm, 2 * PB - 10, 20);
  sbitmap_set (&bm, 5 * PB + 4095);
  sbitmap_set (&bm, 10 * PB - 1);
  flush (fd, &bm);
  assert (close (fd) == 0);
  fd = mapfile_open (path, MAPFILE_KIND_LAYER, 65536, nbits, 1, &loaded);
  assert (fd >= 0);
  assert_equal (&bm, &loaded);
  sbitmap_free (&loaded);

  /* A file cut short (here after page 5), or down to its header, has
   * lost pages: it is refused, whatever the pages held.
   */
  assert (ftruncate (fd, MAPFILE_HEADER_SIZE + 6 * SBITMAP_PAGE_BYTES) == 0);
  assert (close (fd) == 0);
  expect_open_fails (path, MAPFILE_KIND_LAYER, 65536, nbits,
                     "file is truncated", "expected 45056", NULL);
  fd = open (path, O_RDWR);
  assert (fd >= 0);
  assert (ftruncate (fd, MAPFILE_HEADER_SIZE) == 0);
  expect_open_fails (path, MAPFILE_KIND_LAYER, 65536, nbits,
                     "file is truncated", "4096 bytes", NULL);
  /* Back to full length: the pages are holes, and load as zero. */
  assert (ftruncate (fd, MAPFILE_HEADER_SIZE + 10 * SBITMAP_PAGE_BYTES) == 0);
  assert (close (fd) == 0);
  fd = mapfile_open (path, MAPFILE_KIND_LAYER, 65536, nbits, 0, &loaded);
  assert (fd >= 0);
  assert (sbitmap_count (&loaded) == 0);
  assert (close (fd) == 0);
  sbitmap_free (&loaded);

  /* A page written with zeros (data, not a hole) loads as absent. */
  {
    char zero[SBITMAP_PAGE_BYTES] = { 0 };
    fd = open (path, O_RDWR);
    assert (fd >= 0);
    assert (full_pwrite (fd, zero, sizeof zero,
                         MAPFILE_HEADER_SIZE + 3 * SBITMAP_PAGE_BYTES) == 0);
    assert (close (fd) == 0);
    fd = mapfile_open (path, MAPFILE_KIND_LAYER, 65536, nbits, 0, &loaded);
    assert (fd >= 0);
    assert (sbitmap_count (&loaded) == 0);
    for (size_t p = 0; p < loaded.npages; ++p)
      assert (!sbitmap_page_present (&loaded, p));
    assert (close (fd) == 0);
    sbitmap_free (&loaded);
  }

  sbitmap_free (&bm);
  unlink (path);
}

/* The bytes on disk are little-endian in sbitmap.h order. */
static void
test_disk_format (void)
{
  const char *path = path_of ("fmt.map");
  unsigned char h[64], page[16];
  struct sbitmap bm;
  uint32_t v32;
  uint64_t v64;
  int fd;

  unlink (path);
  fd = mapfile_create (path, MAPFILE_KIND_DIRTY, 2097152, 1000);
  assert (fd >= 0);
  assert (full_pread (fd, h, sizeof h, 0) == 0);
  assert (memcmp (h, "NBDSNAPM", 8) == 0);
  assert (h[8] == 1 && h[9] == 0 && h[10] == 0 && h[11] == 0);
  assert (h[12] == MAPFILE_KIND_DIRTY && h[13] == 0);
  assert (h[16] == 0 && h[17] == 0 && h[18] == 0x20 && h[19] == 0);
  memcpy (&v32, &h[20], 4);
  assert (v32 == 0);
  memcpy (&v64, &h[24], 8);
  assert (le64toh (v64) == 1000);
  memcpy (&v32, &h[32], 4);
  assert (le32toh (v32) == snap_crc32 (0, h, 32));
  for (size_t i = 36; i < sizeof h; ++i)
    assert (h[i] == 0);

  /* Bit i is bit i % 8 of byte i / 8 of the page area. */
  assert (sbitmap_init (&bm, 1000) == 0);
  sbitmap_set (&bm, 0);
  sbitmap_set (&bm, 9);
  sbitmap_set (&bm, 63);
  sbitmap_set (&bm, 64 + 7);
  flush (fd, &bm);
  assert (full_pread (fd, page, sizeof page, MAPFILE_HEADER_SIZE) == 0);
  assert (page[0] == 0x01 && page[1] == 0x02 && page[7] == 0x80);
  assert (page[8] == 0x80 && page[9] == 0);
  assert (close (fd) == 0);
  sbitmap_free (&bm);
  unlink (path);
}

/*----------------------------------------------------------------
 * Corrupt and mismatched files.
 */

/* Write a fresh valid map and return its path. */
static const char *
make_valid (uint64_t nbits)
{
  const char *path = path_of ("bad.map");
  struct sbitmap bm;
  int fd;

  unlink (path);
  fd = mapfile_create (path, MAPFILE_KIND_LAYER, 4096, nbits);
  assert (fd >= 0);
  assert (sbitmap_init (&bm, nbits) == 0);
  set_random_bits (&bm, 50);
  flush (fd, &bm);
  assert (close (fd) == 0);
  sbitmap_free (&bm);
  return path;
}

static void
poke (const char *path, off_t off, const void *data, size_t len)
{
  int fd = open (path, O_RDWR);
  assert (fd >= 0);
  assert (full_pwrite (fd, data, len, off) == 0);
  assert (close (fd) == 0);
}

/* Recompute the header checksum after a poke. */
static void
fix_crc (const char *path)
{
  unsigned char h[32];
  uint32_t crc;
  int fd = open (path, O_RDWR);

  assert (fd >= 0);
  assert (full_pread (fd, h, sizeof h, 0) == 0);
  crc = htole32 (snap_crc32 (0, h, sizeof h));
  assert (full_pwrite (fd, &crc, 4, 32) == 0);
  assert (close (fd) == 0);
}

static void
test_corruption (void)
{
  const uint64_t nbits = 2 * PB + 50;
  const char *path;
  struct sbitmap bm;
  char want[64];
  int fd;

  /* The valid file opens. */
  path = make_valid (nbits);
  fd = mapfile_open (path, MAPFILE_KIND_LAYER, 4096, nbits, 1, &bm);
  assert (fd >= 0);
  assert (close (fd) == 0);
  sbitmap_free (&bm);

  /* Magic. */
  poke (path, 3, "X", 1);
  expect_open_fails (path, MAPFILE_KIND_LAYER, 4096, nbits,
                     "bad magic", "\"NBDXNAPM\"", "expected \"NBDSNAPM\"");
  poke (path, 0, "\x01\xff", 2);
  expect_open_fails (path, MAPFILE_KIND_LAYER, 4096, nbits,
                     "bad magic", "\\x01\\xff", NULL);

  /* Version: flipped, and a consistent version-2 header. */
  path = make_valid (nbits);
  poke (path, 8, "\x03", 1);
  expect_open_fails (path, MAPFILE_KIND_LAYER, 4096, nbits,
                     "version 3", "expected 1", NULL);
  poke (path, 8, "\x02", 1);
  fix_crc (path);
  expect_open_fails (path, MAPFILE_KIND_LAYER, 4096, nbits,
                     "unsupported version 2", "expected 1", NULL);

  /* Checksum: the crc itself, and any byte it covers. */
  path = make_valid (nbits);
  poke (path, 33, "\x5a", 1);
  expect_open_fails (path, MAPFILE_KIND_LAYER, 4096, nbits,
                     "header checksum 0x", "does not match 0x", NULL);
  path = make_valid (nbits);
  poke (path, 20, "\x01", 1);   /* reserved */
  expect_open_fails (path, MAPFILE_KIND_LAYER, 4096, nbits,
                     "header checksum", NULL, NULL);
  path = make_valid (nbits);
  poke (path, 25, "\x77", 1);   /* nbits, without fixing the crc */
  expect_open_fails (path, MAPFILE_KIND_LAYER, 4096, nbits,
                     "header checksum", NULL, NULL);
  /* The checksum shown is the one stored. */
  {
    unsigned char h[36];
    uint32_t stored;
    fd = open (path, O_RDONLY);
    assert (fd >= 0);
    assert (full_pread (fd, h, sizeof h, 0) == 0);
    close (fd);
    memcpy (&stored, &h[32], 4);
    snprintf (want, sizeof want, "checksum 0x%08" PRIx32 " does not match "
              "0x%08" PRIx32, le32toh (stored), snap_crc32 (0, h, 32));
    expect_error (want, NULL, NULL);
  }

  /* Mismatches with the caller (valid checksum). */
  path = make_valid (nbits);
  expect_open_fails (path, MAPFILE_KIND_DIRTY, 4096, nbits,
                     "kind 1 (layer)", "expected 2 (dirty)", NULL);
  expect_open_fails (path, MAPFILE_KIND_LAYER, 65536, nbits,
                     "granularity 4096", "expected 65536", NULL);
  snprintf (want, sizeof want, "expected %" PRIu64, nbits + 1);
  expect_open_fails (path, MAPFILE_KIND_LAYER, 4096, nbits + 1,
                     "nbits 65586", want, NULL);
  expect_open_fails (path, MAPFILE_KIND_LAYER, 4096, nbits - 64,
                     "nbits 65586", "expected 65522", NULL);
  /* A kind unknown to this program, consistent otherwise. */
  poke (path, 12, "\x09", 1);
  fix_crc (path);
  expect_open_fails (path, MAPFILE_KIND_LAYER, 4096, nbits,
                     "kind 9 (unknown)", "expected 1 (layer)", NULL);

  /* Truncated files. */
  path = make_valid (nbits);
  assert (truncate (path, 100) == 0);
  expect_open_fails (path, MAPFILE_KIND_LAYER, 4096, nbits,
                     "truncated", "100 bytes", "at least 4096");
  assert (truncate (path, 0) == 0);
  expect_open_fails (path, MAPFILE_KIND_LAYER, 4096, nbits,
                     "truncated", "0 bytes", NULL);
  assert (truncate (path, 4095) == 0);
  expect_open_fails (path, MAPFILE_KIND_LAYER, 4096, nbits,
                     "truncated", "4095 bytes", NULL);

  /* Bits set past nbits in the last page. */
  path = make_valid (nbits);
  {
    /* nbits = 2 PB + 50: bit 50 of page 2 is the first past the end. */
    uint64_t w = htole64 (UINT64_C (1) << 50);
    poke (path, MAPFILE_HEADER_SIZE + 2 * SBITMAP_PAGE_BYTES, &w, 8);
    expect_open_fails (path, MAPFILE_KIND_LAYER, 4096, nbits,
                       "page 2", "past the end", "65586");
    /* Bit 49 is the last valid one and is fine. */
    w = htole64 (UINT64_C (1) << 49);
    poke (path, MAPFILE_HEADER_SIZE + 2 * SBITMAP_PAGE_BYTES, &w, 8);
    fd = mapfile_open (path, MAPFILE_KIND_LAYER, 4096, nbits, 0, &bm);
    assert (fd >= 0);
    assert (sbitmap_test (&bm, nbits - 1));
    close (fd);
    sbitmap_free (&bm);
    /* A bit in a later word of the last page. */
    w = htole64 (1);
    poke (path, MAPFILE_HEADER_SIZE + 3 * SBITMAP_PAGE_BYTES - 8, &w, 8);
    expect_open_fails (path, MAPFILE_KIND_LAYER, 4096, nbits,
                       "page 2", "past the end", NULL);
  }

  /* Missing file. */
  unlink (path);
  expect_open_fails (path, MAPFILE_KIND_LAYER, 4096, nbits,
                     "No such file", NULL, NULL);
}

static void
test_create_errors (void)
{
  const char *path = path_of ("excl.map");
  int errs, fd;
  struct stat st;

  unlink (path);
  fd = mapfile_create (path, MAPFILE_KIND_LAYER, 4096, 100);
  assert (fd >= 0);
  assert (close (fd) == 0);

  /* O_EXCL: an existing file is neither reused nor damaged. */
  errs = nr_errors;
  assert (mapfile_create (path, MAPFILE_KIND_DIRTY, 65536, 5) == -1);
  assert (nr_errors == errs + 1);
  expect_error (path, "File exists", NULL);
  {
    struct sbitmap bm;
    fd = mapfile_open (path, MAPFILE_KIND_LAYER, 4096, 100, 0, &bm);
    assert (fd >= 0);
    close (fd);
    sbitmap_free (&bm);
  }

  /* Granularity not a power of two: nothing is created. */
  unlink (path);
  assert (mapfile_create (path, MAPFILE_KIND_LAYER, 3000, 100) == -1);
  expect_error (path, "granularity 3000", NULL);
  assert (stat (path, &st) == -1 && errno == ENOENT);

  /* Directory missing. */
  assert (mapfile_create ("/nonexistent-dir/x.map", MAPFILE_KIND_LAYER,
                          4096, 100) == -1);
  expect_error ("/nonexistent-dir/x.map", "No such file", NULL);
}

static void
test_batches (void)
{
  const uint64_t nbits = 40 * PB;
  const char *path = path_of ("batch.map");
  struct sbitmap bm, loaded;
  struct mapfile_batch batch = { 0 };
  uint64_t out[SBITMAP_PAGE_WORDS];
  int fd, rofd;

  unlink (path);
  fd = mapfile_create (path, MAPFILE_KIND_LAYER, 4096, nbits);
  assert (fd >= 0);
  assert (sbitmap_init (&bm, nbits) == 0);

  /* Empty batch: no writes, no sync, so even a bad fd succeeds. */
  assert (mapfile_collect (&bm, &batch) == 0);
  assert (batch.n == 0);
  assert (mapfile_write (-1, &batch) == 0);
  assert (mapfile_write (fd, &batch) == 0);

  /* Every page dirty: the batch grows past its first allocation. */
  for (uint64_t p = 0; p < 40; ++p)
    sbitmap_set (&bm, p * PB + p);
  assert (mapfile_collect (&bm, &batch) == 0);
  assert (batch.n == 40 && batch.alloc >= 40);
  for (size_t i = 0; i < batch.n; ++i) {
    uint64_t words[SBITMAP_PAGE_WORDS];

    assert (batch.index[i] == i);
    mapfile_batch_page (&batch, i, words);
    for (size_t w = 0; w < SBITMAP_PAGE_WORDS; ++w)
      assert (words[w] == (w == i / 64 ? UINT64_C (1) << (i % 64) : 0));
  }
  /* Each page is held as its one non-zero chunk. */
  assert (batch.nwords == 40 * SBITMAP_CHUNK_WORDS);
  /* Nothing is dirty any more; collecting again appends nothing. */
  assert (mapfile_collect (&bm, &batch) == 0);
  assert (batch.n == 40);

  /* A failed write: restore marks the pages dirty again. */
  errno = 0;
  assert (mapfile_write (-1, &batch) == -1);
  assert (errno == EBADF);
  /* Read-only descriptors fail too. */
  rofd = open (path, O_RDONLY);
  assert (rofd >= 0);
  assert (mapfile_write (rofd, &batch) == -1);
  close (rofd);
  mapfile_batch_restore (&bm, &batch);
  mapfile_batch_free (&batch);
  assert (batch.n == 0 && batch.index == NULL && batch.words == NULL);
  for (size_t p = 0; p < 40; ++p) {
    assert (sbitmap_take_dirty (&bm, p, out));
    sbitmap_mark_dirty (&bm, p);
  }

  /* Collect, change a page, collect again into the same batch: the
   * page appears twice and the later copy wins on disk.
   */
  assert (mapfile_collect (&bm, &batch) == 0);
  assert (batch.n == 40);
  sbitmap_set (&bm, 7 * PB + 1000);
  assert (mapfile_collect (&bm, &batch) == 0);
  assert (batch.n == 41 && batch.index[40] == 7);
  assert (mapfile_write (fd, &batch) == 0);
  mapfile_batch_free (&batch);
  assert (close (fd) == 0);

  fd = mapfile_open (path, MAPFILE_KIND_LAYER, 4096, nbits, 0, &loaded);
  assert (fd >= 0);
  assert_equal (&bm, &loaded);
  assert (sbitmap_count (&loaded) == 41);
  /* Writing through a read-only open fails. */
  sbitmap_set (&loaded, 5);
  assert (mapfile_collect (&loaded, &batch) == 0);
  assert (batch.n == 1);
  assert (mapfile_write (fd, &batch) == -1 && errno == EBADF);
  mapfile_batch_free (&batch);
  close (fd);

  /* mark_all_dirty after a load rewrites everything. */
  sbitmap_free (&loaded);
  fd = mapfile_open (path, MAPFILE_KIND_LAYER, 4096, nbits, 1, &loaded);
  assert (fd >= 0);
  sbitmap_mark_all_dirty (&loaded);
  assert (mapfile_collect (&loaded, &batch) == 0);
  assert (batch.n == 40);
  assert (mapfile_write (fd, &batch) == 0);
  mapfile_batch_free (&batch);
  close (fd);

  sbitmap_free (&bm);
  sbitmap_free (&loaded);
  unlink (path);
}

/* A sealed map loads only as sealed: a flipped bit, a zeroed page or
 * a seal with a bad checksum is refused; an unsealed one loads.
 */
static void
test_seal (void)
{
  const uint64_t nbits = 8 * PB;
  const char *path = path_of ("seal.map");
  struct sbitmap bm, loaded;
  struct mapfile_seal seal, got;
  bool sealed;
  int fd;
  uint64_t w;

  unlink (path);
  fd = mapfile_create (path, MAPFILE_KIND_DIRTY, 65536, nbits);
  assert (fd >= 0);
  assert (sbitmap_init (&bm, nbits) == 0);
  sbitmap_set (&bm, 5);
  sbitmap_set_range (&bm, 3 * PB - 7, 100);
  flush (fd, &bm);
  mapfile_seal_compute (&bm, &seal);
  assert (seal.nset == 101);
  seal.extra[0] = 7;
  seal.extra[1] = 9;
  assert (mapfile_set_seal (fd, &seal) == 0);
  assert (close (fd) == 0);

  /* Intact: loads, and reports the seal. */
  fd = mapfile_open_sealed (path, MAPFILE_KIND_DIRTY, 65536, nbits, 0,
                            &loaded, &sealed, &got);
  assert (fd >= 0 && sealed);
  assert (got.nset == 101 && got.body_sum == seal.body_sum);
  assert (got.extra[0] == 7 && got.extra[1] == 9);
  assert_equal (&bm, &loaded);
  sbitmap_free (&loaded);
  assert (close (fd) == 0);

  /* Bits moved in page 2 (its last word held bits 57-63: the same
   * number of bits, in other places).
   */
  w = htole64 (UINT64_C (0x7f) << 56);
  poke (path, MAPFILE_HEADER_SIZE + 3 * SBITMAP_PAGE_BYTES - 8, &w, 8);
  expect_open_fails (path, MAPFILE_KIND_DIRTY, 65536, nbits,
                     "does not match its seal", "the pages differ", NULL);
  /* A zeroed page: fewer bits. */
  {
    char zero[SBITMAP_PAGE_BYTES] = { 0 };
    poke (path, MAPFILE_HEADER_SIZE + 2 * SBITMAP_PAGE_BYTES, zero,
          sizeof zero);
    expect_open_fails (path, MAPFILE_KIND_DIRTY, 65536, nbits,
                       "does not match its seal", "bits set", NULL);
  }
  /* Unsealed, the same file loads as it is. */
  fd = open (path, O_RDWR);
  assert (fd >= 0);
  assert (mapfile_set_seal (fd, NULL) == 0);
  assert (close (fd) == 0);
  fd = mapfile_open_sealed (path, MAPFILE_KIND_DIRTY, 65536, nbits, 0,
                            &loaded, &sealed, &got);
  assert (fd >= 0 && !sealed);
  assert (sbitmap_count (&loaded) == 94);   /* page 2 held 7 */
  sbitmap_free (&loaded);
  assert (close (fd) == 0);
  /* A seal whose own checksum is wrong. */
  fd = open (path, O_RDWR);
  assert (fd >= 0);
  assert (mapfile_set_seal (fd, &seal) == 0);
  assert (close (fd) == 0);
  w = htole64 (102);
  poke (path, 48, &w, 8);
  expect_open_fails (path, MAPFILE_KIND_DIRTY, 65536, nbits,
                     "seal checksum", "header is damaged", NULL);

  sbitmap_free (&bm);
  unlink (path);
}

int
main (void)
{
  const uint64_t sizes[] = { 0, 1, 100, PB - 1, PB, PB + 1, 3 * PB + 5,
                             1000000 };
  const uint32_t grans[] = { 4096, 65536, 2097152 };

  assert (mkdtemp (dir) != NULL);

  for (size_t g = 0; g < 3; ++g)
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; ++i)
      test_round_trip (sizes[i], grans[g]);
  test_large_sparse ();
  test_short_file_and_holes ();
  test_disk_format ();
  test_corruption ();
  test_create_errors ();
  test_batches ();
  test_seal ();

  unlink (path_of ("bad.map"));
  assert (rmdir (dir) == 0);
  printf ("test-mapfile: ok\n");
  return 0;
}
