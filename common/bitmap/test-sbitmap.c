/* Unit tests for common/bitmap/sbitmap.c. */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#undef NDEBUG
#include <assert.h>

#include "sbitmap.h"
#include "util.h"

void
snap_verror (const char *fs, va_list args)
{
  vfprintf (stderr, fs, args);
  fputc ('\n', stderr);
}

#define PB SBITMAP_PAGE_BITS

/* A small deterministic PRNG (xorshift64*), so runs are repeatable. */
static uint64_t rng_state = 0x9e3779b97f4a7c15;

static uint64_t
rnd (void)
{
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * 0x2545f4914f6cdd1dULL;
}

/* Random number in [0, n). */
static uint64_t
rnd_below (uint64_t n)
{
  return n ? rnd () % n : 0;
}

static bool
page_present (const struct sbitmap *bm, size_t p)
{
  return sbitmap_page_present (bm, p);
}

/* Word w of page p (0 where absent). */
static uint64_t
word_at (const struct sbitmap *bm, size_t p, size_t w)
{
  uint64_t words[SBITMAP_PAGE_WORDS];

  sbitmap_copy_page (bm, p, words);
  return words[w];
}

/*----------------------------------------------------------------*/

static void
test_single_bits (void)
{
  /* Not a multiple of 64 nor of a page. */
  const uint64_t nbits = 3 * PB + 100;
  const uint64_t bits[] = { 0, 63, 64, 65, 32767, 32768, 32769,
                            2 * PB - 1, 2 * PB, nbits - 1 };
  const size_t nb = sizeof bits / sizeof bits[0];
  struct sbitmap bm;

  assert (sbitmap_init (&bm, nbits) == 0);
  assert (bm.nbits == nbits);
  assert (bm.npages == 4);
  assert (sbitmap_count (&bm) == 0);
  for (size_t p = 0; p < bm.npages; ++p)
    assert (!page_present (&bm, p));

  /* Clearing never allocates. */
  assert (sbitmap_clear (&bm, 5) == 0);
  assert (!page_present (&bm, 0));

  for (size_t i = 0; i < nb; ++i) {
    assert (!sbitmap_test (&bm, bits[i]));
    assert (sbitmap_set (&bm, bits[i]) == 0);
    assert (sbitmap_test (&bm, bits[i]));
    assert (sbitmap_set (&bm, bits[i]) == 1);
    assert (sbitmap_count (&bm) == i + 1);
    /* Neighbours untouched. */
    if (bits[i] > 0 && (i == 0 || bits[i - 1] != bits[i] - 1))
      assert (!sbitmap_test (&bm, bits[i] - 1));
    if (bits[i] + 1 < nbits && (i + 1 == nb || bits[i + 1] != bits[i] + 1))
      assert (!sbitmap_test (&bm, bits[i] + 1));
  }
  for (size_t p = 0; p < bm.npages; ++p)
    assert (page_present (&bm, p));

  /* Check the sbitmap.h memory layout: bit i is bit i % 64 of word
   * i / 64 of its page.
   */
  assert (word_at (&bm, 0, 0) == (UINT64_C (1) | UINT64_C (1) << 63));
  assert (word_at (&bm, 0, 1) == 3);
  assert (word_at (&bm, 0, SBITMAP_PAGE_WORDS - 1) == UINT64_C (1) << 63);
  assert (word_at (&bm, 1, 0) == 3);
  assert (word_at (&bm, 3, 1) == UINT64_C (1) << 35); /* nbits - 1 = 3PB+99 */
  /* Memory: only the chunks holding these bits (pages 0 and 1: their
   * first and last; pages 2 and 3: their first).
   */
  assert (sbitmap_chunks (&bm) == 6);

  /* find_next_set enumerates exactly these bits. */
  {
    uint64_t b = sbitmap_find_next_set (&bm, 0);
    for (size_t i = 0; i < nb; ++i) {
      assert (b == bits[i]);
      b = sbitmap_find_next_set (&bm, b + 1);
    }
    assert (b == nbits);
  }

  for (size_t i = 0; i < nb; ++i) {
    assert (sbitmap_clear (&bm, bits[i]) == 1);
    assert (!sbitmap_test (&bm, bits[i]));
    assert (sbitmap_clear (&bm, bits[i]) == 0);
    assert (sbitmap_count (&bm) == nb - i - 1);
  }
  /* Pages that became zero stay allocated. */
  for (size_t p = 0; p < bm.npages; ++p)
    assert (page_present (&bm, p));
  assert (sbitmap_find_next_set (&bm, 0) == nbits);

  sbitmap_free (&bm);
  assert (bm.pages == NULL && bm.npages == 0);

  /* Empty bitmap. */
  assert (sbitmap_init (&bm, 0) == 0);
  assert (bm.npages == 0);
  assert (sbitmap_find_next_set (&bm, 0) == 0);
  assert (sbitmap_find_next_clear (&bm, 0) == 0);
  assert (sbitmap_set_range (&bm, 0, 0) == 0);
  assert (sbitmap_clear_range (&bm, 0, 0) == 0);
  assert (sbitmap_count_range (&bm, 0, 0) == 0);
  sbitmap_free (&bm);

  /* One bit. */
  assert (sbitmap_init (&bm, 1) == 0);
  assert (sbitmap_find_next_clear (&bm, 0) == 0);
  assert (sbitmap_set (&bm, 0) == 0);
  assert (sbitmap_find_next_clear (&bm, 0) == 1);
  assert (sbitmap_find_next_set (&bm, 0) == 0);
  assert (sbitmap_find_next_set (&bm, 1) == 1);
  sbitmap_free (&bm);

  /* Re-initialise after free. */
  assert (sbitmap_init (&bm, 64) == 0);
  sbitmap_free (&bm);
  sbitmap_free (&bm);           /* Freeing twice is harmless. */
}

static void
test_find (void)
{
  const uint64_t nbits = 5 * PB + 77;
  struct sbitmap bm;

  assert (sbitmap_init (&bm, nbits) == 0);

  /* All absent. */
  assert (sbitmap_find_next_set (&bm, 0) == nbits);
  assert (sbitmap_find_next_set (&bm, nbits - 1) == nbits);
  assert (sbitmap_find_next_set (&bm, nbits) == nbits);
  assert (sbitmap_find_next_set (&bm, UINT64_MAX) == nbits);
  assert (sbitmap_find_next_clear (&bm, 0) == 0);
  assert (sbitmap_find_next_clear (&bm, 12345) == 12345);
  assert (sbitmap_find_next_clear (&bm, nbits - 1) == nbits - 1);
  assert (sbitmap_find_next_clear (&bm, nbits) == nbits);

  /* One bit in page 3, everything else absent: the search skips the
   * absent pages before it.
   */
  assert (sbitmap_set (&bm, 3 * PB + 200) == 0);
  assert (!page_present (&bm, 0) && !page_present (&bm, 1) &&
          !page_present (&bm, 2) && page_present (&bm, 3) &&
          !page_present (&bm, 4) && !page_present (&bm, 5));
  assert (sbitmap_find_next_set (&bm, 0) == 3 * PB + 200);
  assert (sbitmap_find_next_set (&bm, 3 * PB) == 3 * PB + 200);
  assert (sbitmap_find_next_set (&bm, 3 * PB + 200) == 3 * PB + 200);
  assert (sbitmap_find_next_set (&bm, 3 * PB + 201) == nbits);
  assert (sbitmap_find_next_clear (&bm, 3 * PB + 200) == 3 * PB + 201);
  assert (sbitmap_find_next_clear (&bm, 3 * PB + 199) == 3 * PB + 199);

  /* Fill page 3 fully: find_next_clear crosses into absent page 4. */
  assert (sbitmap_set_range (&bm, 3 * PB, PB) == PB - 1);
  assert (sbitmap_find_next_clear (&bm, 3 * PB) == 4 * PB);
  assert (sbitmap_find_next_clear (&bm, 3 * PB + 5000) == 4 * PB);
  assert (sbitmap_find_next_set (&bm, 2 * PB + 17) == 3 * PB);
  assert (sbitmap_find_next_set (&bm, 4 * PB) == nbits);

  /* Fill page 4 too and the partial last page: no clear bit left
   * from 3 * PB, and the clear padding past nbits is never reported.
   */
  assert (sbitmap_set_range (&bm, 4 * PB, nbits - 4 * PB) ==
          (int64_t) (nbits - 4 * PB));
  assert (sbitmap_find_next_clear (&bm, 3 * PB) == nbits);
  assert (sbitmap_find_next_clear (&bm, nbits - 1) == nbits);
  assert (sbitmap_find_next_clear (&bm, 0) == 0);
  assert (sbitmap_find_next_set (&bm, nbits - 1) == nbits - 1);

  /* Clear the last bit: it is found. */
  assert (sbitmap_clear (&bm, nbits - 1) == 1);
  assert (sbitmap_find_next_clear (&bm, 3 * PB) == nbits - 1);
  assert (sbitmap_find_next_set (&bm, nbits - 1) == nbits);

  /* Word edges in a present page. */
  assert (sbitmap_clear_range (&bm, 3 * PB, PB) == PB);
  assert (sbitmap_set (&bm, 3 * PB + 63) == 0);
  assert (sbitmap_set (&bm, 3 * PB + 64) == 0);
  assert (sbitmap_set (&bm, 3 * PB + 128 + 64 * 10) == 0);
  assert (sbitmap_find_next_set (&bm, 3 * PB) == 3 * PB + 63);
  assert (sbitmap_find_next_set (&bm, 3 * PB + 64) == 3 * PB + 64);
  assert (sbitmap_find_next_set (&bm, 3 * PB + 65) == 3 * PB + 128 + 640);
  assert (sbitmap_find_next_clear (&bm, 3 * PB + 63) == 3 * PB + 65);
  /* The last word of a present page, then the next page. */
  assert (sbitmap_set (&bm, 4 * PB - 1) == 0);
  assert (sbitmap_find_next_set (&bm, 3 * PB + 769) == 4 * PB - 1);
  assert (sbitmap_find_next_set (&bm, 4 * PB - 1) == 4 * PB - 1);
  assert (sbitmap_find_next_set (&bm, 4 * PB - 64) == 4 * PB - 1);
  assert (sbitmap_find_next_set (&bm, 4 * PB) == 4 * PB);   /* page 4 full */

  sbitmap_free (&bm);

  /* A bitmap exactly one page, completely full. */
  assert (sbitmap_init (&bm, PB) == 0);
  assert (sbitmap_set_range (&bm, 0, PB) == PB);
  assert (sbitmap_find_next_clear (&bm, 0) == PB);
  assert (sbitmap_count (&bm) == PB);
  assert (sbitmap_count_range (&bm, 1, PB - 2) == PB - 2);
  sbitmap_free (&bm);
}

static void
test_large_range (void)
{
  /* 1M-bit ranges go word by word, not bit by bit. */
  const uint64_t nbits = 40 * PB + 12345;
  struct sbitmap bm;

  assert (sbitmap_init (&bm, nbits) == 0);
  assert (sbitmap_set_range (&bm, 7, 1000000) == 1000000);
  assert (sbitmap_count (&bm) == 1000000);
  assert (sbitmap_set_range (&bm, 0, nbits) == (int64_t) (nbits - 1000000));
  assert (sbitmap_count (&bm) == nbits);
  assert (sbitmap_count_range (&bm, 3, nbits - 3) == nbits - 3);
  assert (sbitmap_find_next_clear (&bm, 0) == nbits);
  assert (sbitmap_clear_range (&bm, 100, 1000000) == 1000000);
  assert (sbitmap_count (&bm) == nbits - 1000000);
  assert (sbitmap_find_next_clear (&bm, 0) == 100);
  assert (sbitmap_find_next_set (&bm, 100) == 1000100);
  assert (sbitmap_clear_range (&bm, 0, nbits) == nbits - 1000000);
  assert (sbitmap_count (&bm) == 0);
  sbitmap_free (&bm);
}

/* Memory is allocated by chunk (SBITMAP_CHUNK_BITS bits), and absent
 * chunks inside a present page read, find, count and copy as zeros.
 */
static void
test_chunks (void)
{
  const uint64_t CB = SBITMAP_CHUNK_BITS;
  const uint64_t nbits = 2 * PB + CB + 5;  /* last page: one chunk + 5 */
  struct sbitmap bm;
  uint64_t words[SBITMAP_PAGE_WORDS];

  assert (SBITMAP_PAGE_CHUNKS * SBITMAP_CHUNK_WORDS == SBITMAP_PAGE_WORDS);
  assert (sbitmap_init (&bm, nbits) == 0);
  assert (sbitmap_chunks (&bm) == 0);

  /* One bit: one chunk. */
  assert (sbitmap_set (&bm, 3 * CB + 7) == 0);
  assert (sbitmap_chunks (&bm) == 1);
  assert (page_present (&bm, 0) && !page_present (&bm, 1));
  /* Clearing and testing absent chunks allocate nothing. */
  assert (sbitmap_clear (&bm, 5 * CB) == 0);
  assert (sbitmap_clear_range (&bm, 4 * CB, 3 * CB) == 0);
  assert (!sbitmap_test (&bm, 9 * CB + 1));
  assert (sbitmap_chunks (&bm) == 1);

  /* Finds skip the absent chunks of a present page, and find clear
   * bits in them.
   */
  assert (sbitmap_set (&bm, PB - 1) == 0);     /* the page's last chunk */
  assert (sbitmap_chunks (&bm) == 2);
  assert (sbitmap_find_next_set (&bm, 0) == 3 * CB + 7);
  assert (sbitmap_find_next_set (&bm, 3 * CB + 8) == PB - 1);
  assert (sbitmap_find_next_set_before (&bm, 3 * CB + 8, PB - 1) == PB - 1);
  assert (sbitmap_find_next_set (&bm, PB) == nbits);
  assert (sbitmap_set_range (&bm, 0, CB) == (int64_t) CB);
  assert (sbitmap_chunks (&bm) == 3);
  assert (sbitmap_find_next_clear (&bm, 0) == CB);     /* absent chunk 1 */
  assert (sbitmap_find_next_clear (&bm, PB - 1) == PB);  /* absent page */
  assert (sbitmap_count_range (&bm, 0, nbits) == CB + 2);
  assert (sbitmap_count_range (&bm, 1, PB - 2) == CB - 1 + 1);

  /* A range across a chunk boundary: two chunks. */
  assert (sbitmap_set_range (&bm, PB + CB - 3, 6) == 6);
  assert (sbitmap_chunks (&bm) == 5);
  assert (sbitmap_count_range (&bm, PB, PB) == 6);
  assert (sbitmap_find_next_clear (&bm, PB + CB - 3) == PB + CB + 3);

  /* The last, partial page: its one whole chunk, then 5 bits. */
  assert (sbitmap_set (&bm, nbits - 1) == 0);
  assert (sbitmap_find_next_set (&bm, PB + CB + 3) == nbits - 1);
  assert (sbitmap_find_next_clear (&bm, nbits - 1) == nbits);

  /* A copy has zeros where chunks are absent; take_dirty the same. */
  assert (sbitmap_copy_page (&bm, 0, words));
  for (size_t w = 0; w < SBITMAP_PAGE_WORDS; ++w) {
    uint64_t want = 0;
    if (w < SBITMAP_CHUNK_WORDS)
      want = ~UINT64_C (0);
    if (w == 3 * SBITMAP_CHUNK_WORDS)
      want = UINT64_C (1) << 7;
    if (w == SBITMAP_PAGE_WORDS - 1)
      want = UINT64_C (1) << 63;
    assert (words[w] == want);
  }
  assert (sbitmap_take_dirty (&bm, 1, words));
  assert (words[SBITMAP_CHUNK_WORDS - 1] == UINT64_C (7) << 61);
  assert (words[SBITMAP_CHUNK_WORDS] == 7);
  assert (words[0] == 0 && words[SBITMAP_PAGE_WORDS - 1] == 0);

  /* Loading installs only the chunks with bits, frees the chunks that
   * become zero, and the page once none is left.
   */
  memset (words, 0, sizeof words);
  words[5 * SBITMAP_CHUNK_WORDS + 1] = 0x10;
  assert (sbitmap_load_page (&bm, 0, words) == 0);
  assert (sbitmap_count_range (&bm, 0, PB) == 1);
  assert (sbitmap_find_next_set (&bm, 0) == 5 * CB + 64 + 4);
  assert (sbitmap_chunks (&bm) == 1 + 2 + 1);
  memset (words, 0, sizeof words);
  assert (sbitmap_load_page (&bm, 1, words) == 0);
  assert (!page_present (&bm, 1));
  assert (sbitmap_chunks (&bm) == 2);
  assert (sbitmap_count (&bm) == 2);
  /* A bit past nbits is refused, and nothing changes. */
  words[SBITMAP_CHUNK_WORDS + 1] = 1;      /* bit CB + 64 + 0 > CB + 5 */
  assert (sbitmap_load_page (&bm, 2, words) == -1 && errno == EINVAL);
  assert (sbitmap_chunks (&bm) == 2 && sbitmap_count (&bm) == 2);
  sbitmap_free (&bm);

  /* Bits scattered over a large bitmap cost a chunk each, not a page:
   * 1000 random bits over 2^28 (a 1 TiB layer map).
   */
  assert (sbitmap_init (&bm, UINT64_C (1) << 28) == 0);
  for (int i = 0; i < 1000; ++i)
    assert (sbitmap_set (&bm, rnd_below (bm.nbits)) >= 0);
  assert (sbitmap_chunks (&bm) <= 1000);
  assert (sbitmap_chunks (&bm) >= 990);   /* collisions are rare */
  sbitmap_free (&bm);
}

/*----------------------------------------------------------------
 * Randomised comparison against a plain bool array.
 */

struct ref {
  uint64_t nbits;
  bool *bit;
  uint64_t count;
};

static void
check_all (const struct sbitmap *bm, const struct ref *ref)
{
  uint64_t n = ref->nbits;
  uint64_t *next_set = malloc ((n + 1) * sizeof (uint64_t));
  uint64_t *next_clear = malloc ((n + 1) * sizeof (uint64_t));
  uint64_t *prefix = malloc ((n + 1) * sizeof (uint64_t));

  assert (next_set && next_clear && prefix);
  assert (sbitmap_count (bm) == ref->count);

  next_set[n] = next_clear[n] = n;
  for (uint64_t i = n; i-- > 0;) {
    next_set[i] = ref->bit[i] ? i : next_set[i + 1];
    next_clear[i] = ref->bit[i] ? next_clear[i + 1] : i;
  }
  prefix[0] = 0;
  for (uint64_t i = 0; i < n; ++i) {
    prefix[i + 1] = prefix[i] + ref->bit[i];
    assert (sbitmap_test (bm, i) == ref->bit[i]);
  }
  assert (prefix[n] == ref->count);

  /* Enumerate all set and all clear bits. */
  {
    uint64_t b, k = 0;
    for (b = sbitmap_find_next_set (bm, 0); b < n;
         b = sbitmap_find_next_set (bm, b + 1)) {
      assert (ref->bit[b]);
      k++;
    }
    assert (b == n && k == ref->count);
    k = 0;
    for (b = sbitmap_find_next_clear (bm, 0); b < n;
         b = sbitmap_find_next_clear (bm, b + 1)) {
      assert (!ref->bit[b]);
      k++;
    }
    assert (b == n && k == n - ref->count);
  }

  /* Finds and counts from random places and from every word edge. */
  for (int i = 0; i < 500; ++i) {
    uint64_t from = rnd_below (n + 1);
    uint64_t len = rnd_below (n - from + 1);
    assert (sbitmap_find_next_set (bm, from) == next_set[from]);
    assert (sbitmap_find_next_clear (bm, from) == next_clear[from]);
    assert (sbitmap_count_range (bm, from, len) ==
            prefix[from + len] - prefix[from]);
  }
  for (uint64_t e = 0; e <= n; e += 64) {
    for (uint64_t from = e ? e - 1 : 0; from <= e + 1 && from <= n; ++from) {
      assert (sbitmap_find_next_set (bm, from) == next_set[from]);
      assert (sbitmap_find_next_clear (bm, from) == next_clear[from]);
    }
  }
  free (next_set);
  free (next_clear);
  free (prefix);
}

/* A random range: often short and near word/page edges, sometimes
 * long.
 */
static void
random_range (uint64_t nbits, uint64_t *first, uint64_t *n)
{
  uint64_t f, len;

  switch (rnd_below (4)) {
  case 0:                       /* Short, anywhere. */
    f = rnd_below (nbits);
    len = rnd_below (200);
    break;
  case 1: {                     /* Around a word or page edge. */
    uint64_t unit = rnd_below (2) ? 64 : PB;
    uint64_t edge = rnd_below (nbits / unit + 1) * unit;
    f = edge >= 70 ? edge - rnd_below (70) : 0;
    len = rnd_below (300);
    break;
  }
  case 2:                       /* Long. */
    f = rnd_below (nbits);
    len = rnd_below (nbits);
    break;
  default:                      /* Up to a page. */
    f = rnd_below (nbits);
    len = rnd_below (PB + 1);
  }
  if (f > nbits)
    f = nbits;
  if (len > nbits - f)
    len = nbits - f;
  *first = f;
  *n = len;
}

static void
test_random (uint64_t nbits, int nops)
{
  struct sbitmap bm;
  struct ref ref = { .nbits = nbits, .count = 0 };

  ref.bit = calloc (nbits ? nbits : 1, sizeof (bool));
  assert (ref.bit);
  assert (sbitmap_init (&bm, nbits) == 0);
  check_all (&bm, &ref);

  for (int op = 0; op < nops; ++op) {
    uint64_t first, n, expect = 0;

    switch (nbits ? rnd_below (4) : 4) {
    case 0: {
      uint64_t b = rnd_below (nbits);
      int r = sbitmap_set (&bm, b);
      assert (r == ref.bit[b]);
      if (!ref.bit[b])
        ref.count++;
      ref.bit[b] = true;
      break;
    }
    case 1: {
      uint64_t b = rnd_below (nbits);
      int r = sbitmap_clear (&bm, b);
      assert (r == ref.bit[b]);
      if (ref.bit[b])
        ref.count--;
      ref.bit[b] = false;
      break;
    }
    case 2:
      random_range (nbits, &first, &n);
      for (uint64_t i = first; i < first + n; ++i) {
        if (!ref.bit[i])
          expect++;
        ref.bit[i] = true;
      }
      ref.count += expect;
      assert (sbitmap_set_range (&bm, first, n) == (int64_t) expect);
      break;
    case 3:
      random_range (nbits, &first, &n);
      for (uint64_t i = first; i < first + n; ++i) {
        if (ref.bit[i])
          expect++;
        ref.bit[i] = false;
      }
      ref.count -= expect;
      assert (sbitmap_clear_range (&bm, first, n) == expect);
      break;
    default:
      break;
    }
    assert (sbitmap_count (&bm) == ref.count);
    if (nbits) {
      /* A cheap spot check every op. */
      uint64_t b = rnd_below (nbits);
      uint64_t limit = b + rnd_below (nbits - b + 2);

      assert (sbitmap_test (&bm, b) == ref.bit[b]);
      /* The bounded finds agree with the unbounded ones, cut short. */
      assert (sbitmap_find_next_set_before (&bm, b, limit) ==
              MIN (sbitmap_find_next_set (&bm, b), MIN (limit, nbits)));
      assert (sbitmap_find_next_clear_before (&bm, b, limit) ==
              MIN (sbitmap_find_next_clear (&bm, b), MIN (limit, nbits)));
    }
    if (op % 250 == 249)
      check_all (&bm, &ref);
  }
  check_all (&bm, &ref);
  sbitmap_free (&bm);
  free (ref.bit);
}

/*----------------------------------------------------------------*/

static void
test_dirty (void)
{
  const uint64_t nbits = 3 * PB + 10;
  struct sbitmap bm;
  uint64_t out[SBITMAP_PAGE_WORDS];
  uint64_t words[SBITMAP_PAGE_WORDS];

  assert (sbitmap_init (&bm, nbits) == 0);
  for (size_t p = 0; p < bm.npages; ++p)
    assert (!sbitmap_take_dirty (&bm, p, out));

  /* A set marks its page dirty; taking clears the mark and copies. */
  assert (sbitmap_set (&bm, PB + 65) == 0);
  assert (!sbitmap_take_dirty (&bm, 0, out));
  memset (out, 0xff, sizeof out);
  assert (sbitmap_take_dirty (&bm, 1, out));
  assert (out[0] == 0 && out[1] == 2);
  for (size_t w = 2; w < SBITMAP_PAGE_WORDS; ++w)
    assert (out[w] == 0);
  assert (!sbitmap_take_dirty (&bm, 1, out));

  /* Setting an already set bit changes nothing: still clean. */
  assert (sbitmap_set (&bm, PB + 65) == 1);
  assert (!sbitmap_take_dirty (&bm, 1, out));
  assert (sbitmap_set_range (&bm, PB + 65, 1) == 0);
  assert (!sbitmap_take_dirty (&bm, 1, out));
  /* Clearing a clear bit / absent page: clean. */
  assert (sbitmap_clear (&bm, PB + 66) == 0);
  assert (sbitmap_clear_range (&bm, 0, PB) == 0);
  assert (!sbitmap_take_dirty (&bm, 1, out));
  assert (!sbitmap_take_dirty (&bm, 0, out));

  /* Clearing a set bit marks dirty and the copy shows it clear. */
  assert (sbitmap_clear (&bm, PB + 65) == 1);
  assert (sbitmap_take_dirty (&bm, 1, out));
  assert (out[1] == 0);

  /* A range over pages marks each page it changes. */
  assert (sbitmap_set_range (&bm, PB - 1, PB + 2) == PB + 2);
  assert (sbitmap_take_dirty (&bm, 0, out));
  assert (out[SBITMAP_PAGE_WORDS - 1] == UINT64_C (1) << 63);
  assert (sbitmap_take_dirty (&bm, 1, out));
  assert (out[0] == ~UINT64_C (0) && out[SBITMAP_PAGE_WORDS - 1] == ~UINT64_C (0));
  assert (sbitmap_take_dirty (&bm, 2, out));
  assert (out[0] == 1 && out[1] == 0);
  assert (!sbitmap_take_dirty (&bm, 3, out));

  /* Explicit marks, including an absent page (copied as zeros). */
  assert (!page_present (&bm, 3));
  sbitmap_mark_dirty (&bm, 3);
  memset (out, 0xff, sizeof out);
  assert (sbitmap_take_dirty (&bm, 3, out));
  for (size_t w = 0; w < SBITMAP_PAGE_WORDS; ++w)
    assert (out[w] == 0);
  sbitmap_mark_all_dirty (&bm);
  for (size_t p = 0; p < bm.npages; ++p) {
    assert (sbitmap_take_dirty (&bm, p, out));
    assert (!sbitmap_take_dirty (&bm, p, out));
  }

  /* load_page: not marked dirty, count updated, zero pages not
   * allocated, replacing an existing page adjusts the count.
   */
  memset (words, 0, sizeof words);
  words[0] = 0xf0;
  words[SBITMAP_PAGE_WORDS - 1] = UINT64_C (1) << 63;
  assert (sbitmap_load_page (&bm, 0, words) == 0);
  assert (!sbitmap_take_dirty (&bm, 0, out));
  assert (sbitmap_count (&bm) == 5 + (PB + 2 - 1));
  assert (sbitmap_test (&bm, 4) && !sbitmap_test (&bm, 3));
  assert (sbitmap_test (&bm, PB - 1));
  memset (words, 0, sizeof words);
  assert (sbitmap_load_page (&bm, 0, words) == 0);
  assert (!page_present (&bm, 0));
  assert (sbitmap_count (&bm) == PB + 1);

  /* Page 3 has 10 bits: anything past them is refused. */
  words[0] = 0x3ff;
  assert (sbitmap_load_page (&bm, 3, words) == 0);
  assert (sbitmap_count (&bm) == PB + 11);
  assert (sbitmap_find_next_clear (&bm, 3 * PB) == nbits);
  words[0] = 0x400;
  errno = 0;
  assert (sbitmap_load_page (&bm, 3, words) == -1);
  assert (errno == EINVAL);
  words[0] = 0;
  words[1] = 1;
  assert (sbitmap_load_page (&bm, 3, words) == -1);
  assert (sbitmap_count (&bm) == PB + 11);      /* unchanged on error */
  assert (sbitmap_test (&bm, 3 * PB + 9));

  sbitmap_free (&bm);
}

/*----------------------------------------------------------------
 * Threads: 4 setters on disjoint and overlapping bits, and a collector
 * taking dirty pages meanwhile.  At the end the count equals the
 * distinct bits, each bit was reported newly set exactly once, and the
 * collected copies (plus a final collection) equal the bitmap, so
 * nothing was lost by the dirty protocol.
 */

#define NTHREADS 4
#define T_NBITS (8 * PB + 1000)
#define T_DISJOINT (4 * PB)     /* bits [0, 4PB): bit i by thread i % 4 */

struct thread_arg {
  struct sbitmap *bm;
  int id;
  uint64_t newly;               /* Bits this thread flipped. */
};

static void *
setter (void *argv)
{
  struct thread_arg *arg = argv;
  struct sbitmap *bm = arg->bm;
  uint64_t state = 12345 + arg->id;

  /* Disjoint: every 4th bit. */
  for (uint64_t i = arg->id; i < T_DISJOINT; i += NTHREADS) {
    int r = sbitmap_set (bm, i);
    assert (r == 0);
    arg->newly++;
  }
  /* Overlapping: every thread sets the same bits of [4PB, nbits) in a
   * different order, singly and in ranges.
   */
  for (int k = 0; k < 20000; ++k) {
    uint64_t b;
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    b = T_DISJOINT + (state >> 33) % (T_NBITS - T_DISJOINT);
    if (k % 8 == 0) {
      uint64_t len = (state >> 20) % 500;
      int64_t r;
      if (len > T_NBITS - b)
        len = T_NBITS - b;
      r = sbitmap_set_range (bm, b, len);
      assert (r >= 0);
      arg->newly += r;
    }
    else {
      int r = sbitmap_set (bm, b);
      assert (r == 0 || r == 1);
      arg->newly += r == 0;
    }
  }
  return NULL;
}

static volatile bool collector_stop;

struct collector_arg {
  struct sbitmap *bm;
  uint64_t *shadow;             /* npages * PAGE_WORDS words */
};

static void
collect_once (struct collector_arg *arg)
{
  uint64_t out[SBITMAP_PAGE_WORDS];

  for (size_t p = 0; p < arg->bm->npages; ++p) {
    if (sbitmap_take_dirty (arg->bm, p, out))
      /* A later copy replaces an earlier one, as a write-back would. */
      memcpy (&arg->shadow[p * SBITMAP_PAGE_WORDS], out, sizeof out);
  }
}

static void *
collector (void *argv)
{
  struct collector_arg *arg = argv;

  while (!__atomic_load_n (&collector_stop, __ATOMIC_SEQ_CST))
    collect_once (arg);
  return NULL;
}

static void
test_threads (void)
{
  struct sbitmap bm;
  pthread_t th[NTHREADS], coll;
  struct thread_arg args[NTHREADS];
  struct collector_arg carg;
  uint64_t newly = 0, distinct = 0;

  assert (sbitmap_init (&bm, T_NBITS) == 0);
  carg.bm = &bm;
  carg.shadow = calloc (bm.npages * SBITMAP_PAGE_WORDS, sizeof (uint64_t));
  assert (carg.shadow);
  collector_stop = false;
  assert (pthread_create (&coll, NULL, collector, &carg) == 0);
  for (int i = 0; i < NTHREADS; ++i) {
    args[i] = (struct thread_arg) { .bm = &bm, .id = i };
    assert (pthread_create (&th[i], NULL, setter, &args[i]) == 0);
  }
  for (int i = 0; i < NTHREADS; ++i) {
    assert (pthread_join (th[i], NULL) == 0);
    newly += args[i].newly;
  }
  __atomic_store_n (&collector_stop, true, __ATOMIC_SEQ_CST);
  assert (pthread_join (coll, NULL) == 0);
  collect_once (&carg);         /* What a final flush would write. */

  for (uint64_t i = 0; i < T_NBITS; ++i)
    distinct += sbitmap_test (&bm, i);
  assert (sbitmap_count (&bm) == distinct);
  assert (newly == distinct);
  assert (sbitmap_count_range (&bm, 0, T_NBITS) == distinct);
  assert (sbitmap_find_next_clear (&bm, 0) >= T_DISJOINT);
  for (size_t p = 0; p < bm.npages; ++p) {
    uint64_t words[SBITMAP_PAGE_WORDS];

    sbitmap_copy_page (&bm, p, words);
    for (size_t w = 0; w < SBITMAP_PAGE_WORDS; ++w)
      assert (carg.shadow[p * SBITMAP_PAGE_WORDS + w] == words[w]);
  }
  free (carg.shadow);
  sbitmap_free (&bm);
}

int
main (void)
{
  const uint64_t CB = SBITMAP_CHUNK_BITS;
  const uint64_t sizes[] = { 1, 63, 64, 65, 1000, CB - 1, CB, CB + 1,
                             3 * CB + 70, PB, PB + 1, 2 * PB - 3,
                             3 * PB + 100 };

  test_single_bits ();
  test_find ();
  test_large_range ();
  test_chunks ();
  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; ++i)
    test_random (sizes[i], sizes[i] >= PB ? 4000 : 2000);
  test_dirty ();
  test_threads ();
  printf ("test-sbitmap: ok\n");
  return 0;
}
