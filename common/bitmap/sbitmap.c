/* nbdkit-snapshot: sparse, thread-safe bitmaps.
 *
 * Notes on the design
 * -------------------
 *
 * The bitmap is an array of npages page pointers.  A NULL pointer is a
 * page whose bits are all clear; a page is allocated (zeroed) by the
 * first operation that sets one of its bits and is then installed with
 * compare-and-swap, so two threads racing to allocate the same page
 * agree on one copy and the loser frees its own.  Pages are never
 * removed while the bitmap is in use (only sbitmap_free and
 * sbitmap_load_page, which must not run concurrently with anything,
 * free them), so a pointer once read stays valid.
 *
 * Every word is updated with an atomic fetch-or / fetch-and.  The value
 * returned is the word before the update, so the bits that actually
 * flipped are known exactly (popcount (~old & mask) when setting,
 * popcount (old & mask) when clearing) and the global count is kept
 * with an atomic add of that number.  The count is therefore exact
 * once all updates have returned, whatever they raced with.
 *
 * Bits at or past nbits (in the last, partial page) are never set: the
 * range operations assert they stay inside the bitmap, and
 * sbitmap_load_page refuses pages with such bits.  The find functions
 * still never report a bit >= nbits (find_next_clear would otherwise
 * see the clear padding bits).
 *
 * All atomic operations use __ATOMIC_SEQ_CST.  The dirty-page protocol
 * (see sbitmap_take_dirty) needs the single total order of sequentially
 * consistent operations; the other loads use it too so there is only
 * one rule to reason about (on x86-64 a seq_cst load is a plain load).
 *
 * Cost: test/set/clear O(1); set_range/clear_range/count_range one
 * atomic operation or load per 64-bit word touched; find_next_* one
 * load per word in present pages and O(1) per absent page.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "sbitmap.h"
#include "util.h"

#define ORDER __ATOMIC_SEQ_CST

/* Number of words of page p that hold bits below nbits. */
static inline size_t
words_in_page (const struct sbitmap *bm, size_t p)
{
  uint64_t first = (uint64_t) p * SBITMAP_PAGE_BITS;
  uint64_t left = bm->nbits - first;

  if (left >= SBITMAP_PAGE_BITS)
    return SBITMAP_PAGE_WORDS;
  return (left + 63) / 64;
}

static inline uint64_t *
get_page (const struct sbitmap *bm, size_t p)
{
  return __atomic_load_n (&bm->pages[p], ORDER);
}

/* Return page p, allocating and installing it if absent, or NULL with
 * errno set.
 */
static uint64_t *
get_page_alloc (struct sbitmap *bm, size_t p)
{
  uint64_t *page = get_page (bm, p);
  uint64_t *expected = NULL;

  if (page)
    return page;
  page = calloc (SBITMAP_PAGE_WORDS, sizeof (uint64_t));
  if (page == NULL)
    return NULL;
  if (__atomic_compare_exchange_n (&bm->pages[p], &expected, page,
                                   false, ORDER, ORDER))
    return page;
  /* Another thread installed the page first: use theirs. */
  free (page);
  return expected;
}

/* Mark page p dirty after one of its bits changed.  This must come
 * after the atomic word update (see sbitmap_take_dirty).  The flag is
 * only stored when it reads clear, to keep busy pages from bouncing
 * the flag's cache line between threads.  Skipping the store is safe:
 * a seq_cst load that sees 1 comes after our word update in the total
 * order, so at that point the page is still dirty and any later
 * take_dirty copies the words after our update.
 */
static inline void
mark_changed (struct sbitmap *bm, size_t p)
{
  if (__atomic_load_n (&bm->dirty[p], ORDER) == 0)
    __atomic_store_n (&bm->dirty[p], 1, ORDER);
}

int
sbitmap_init (struct sbitmap *bm, uint64_t nbits)
{
  uint64_t npages = nbits / SBITMAP_PAGE_BITS +
    (nbits % SBITMAP_PAGE_BITS != 0);

  memset (bm, 0, sizeof *bm);
  if (npages > SIZE_MAX / sizeof (uint64_t *)) {
    errno = ENOMEM;
    return -1;
  }
  /* Allocate at least one element so an empty bitmap has non-NULL
   * arrays (calloc (0) may return NULL).
   */
  bm->pages = calloc (npages ? npages : 1, sizeof (uint64_t *));
  bm->dirty = calloc (npages ? npages : 1, sizeof (uint8_t));
  if (bm->pages == NULL || bm->dirty == NULL) {
    free (bm->pages);
    free (bm->dirty);
    memset (bm, 0, sizeof *bm);
    errno = ENOMEM;
    return -1;
  }
  bm->nbits = nbits;
  bm->npages = npages;
  bm->count = 0;
  return 0;
}

void
sbitmap_free (struct sbitmap *bm)
{
  if (bm->pages) {
    for (size_t p = 0; p < bm->npages; ++p)
      free (bm->pages[p]);
  }
  free (bm->pages);
  free (bm->dirty);
  memset (bm, 0, sizeof *bm);
}

bool
sbitmap_test (const struct sbitmap *bm, uint64_t bit)
{
  const uint64_t *page;
  size_t i;

  assert (bit < bm->nbits);
  page = get_page (bm, bit / SBITMAP_PAGE_BITS);
  if (page == NULL)
    return false;
  i = (bit % SBITMAP_PAGE_BITS) / 64;
  return (__atomic_load_n (&page[i], ORDER) >> (bit % 64)) & 1;
}

int
sbitmap_set (struct sbitmap *bm, uint64_t bit)
{
  size_t p = bit / SBITMAP_PAGE_BITS;
  uint64_t mask = UINT64_C (1) << (bit % 64);
  uint64_t *page, old;

  assert (bit < bm->nbits);
  page = get_page_alloc (bm, p);
  if (page == NULL)
    return -1;
  /* Set the bit first, then mark the page dirty (see
   * sbitmap_take_dirty for why this order matters).
   */
  old = __atomic_fetch_or (&page[(bit % SBITMAP_PAGE_BITS) / 64], mask,
                           ORDER);
  if (old & mask)
    return 1;
  __atomic_add_fetch (&bm->count, 1, ORDER);
  mark_changed (bm, p);
  return 0;
}

int
sbitmap_clear (struct sbitmap *bm, uint64_t bit)
{
  size_t p = bit / SBITMAP_PAGE_BITS;
  uint64_t mask = UINT64_C (1) << (bit % 64);
  uint64_t *page, old;

  assert (bit < bm->nbits);
  page = get_page (bm, p);
  if (page == NULL)
    return 0;
  old = __atomic_fetch_and (&page[(bit % SBITMAP_PAGE_BITS) / 64], ~mask,
                            ORDER);
  if (!(old & mask))
    return 0;
  __atomic_sub_fetch (&bm->count, 1, ORDER);
  mark_changed (bm, p);
  return 1;
}

/* Set (set = true) or clear bits [first, first + n) of page p, which
 * must hold the whole range, and return the number of bits flipped.
 * The first and last words may be partial; the words in between are
 * updated whole.
 */
static uint64_t
page_update (uint64_t *page, uint64_t first, uint64_t n, bool set)
{
  size_t w = first / 64, wend = (first + n - 1) / 64;
  unsigned lo = first % 64;
  uint64_t flipped = 0;

  for (; w <= wend; ++w, lo = 0) {
    unsigned hi = w == wend ? (first + n - 1) % 64 + 1 : 64;
    uint64_t mask = sbitmap_word_mask (lo, hi), old;

    if (set) {
      old = __atomic_fetch_or (&page[w], mask, ORDER);
      flipped += __builtin_popcountll (~old & mask);
    }
    else {
      old = __atomic_fetch_and (&page[w], ~mask, ORDER);
      flipped += __builtin_popcountll (old & mask);
    }
  }
  return flipped;
}

/* Common part of set_range and clear_range: walk the range a page at
 * a time.  When setting, pages are allocated (and -1 returned if that
 * fails, with the bits before already set and counted); when clearing,
 * absent pages are skipped.
 */
static int64_t
range_update (struct sbitmap *bm, uint64_t first, uint64_t n, bool set)
{
  uint64_t total = 0;

  assert (first <= bm->nbits && n <= bm->nbits - first);
  while (n > 0) {
    size_t p = first / SBITMAP_PAGE_BITS;
    uint64_t off = first % SBITMAP_PAGE_BITS;
    uint64_t len = SBITMAP_PAGE_BITS - off;
    uint64_t *page, flipped;

    if (len > n)
      len = n;
    page = set ? get_page_alloc (bm, p) : get_page (bm, p);
    if (page == NULL && set)
      return -1;
    if (page) {
      /* Word updates first, then count and dirty mark. */
      flipped = page_update (page, off, len, set);
      if (flipped) {
        if (set)
          __atomic_add_fetch (&bm->count, flipped, ORDER);
        else
          __atomic_sub_fetch (&bm->count, flipped, ORDER);
        mark_changed (bm, p);
        total += flipped;
      }
    }
    first += len;
    n -= len;
  }
  return total;
}

int64_t
sbitmap_set_range (struct sbitmap *bm, uint64_t first, uint64_t n)
{
  return range_update (bm, first, n, true);
}

uint64_t
sbitmap_clear_range (struct sbitmap *bm, uint64_t first, uint64_t n)
{
  return range_update (bm, first, n, false);
}

/* Find the first set bit (invert = false) or clear bit (invert = true)
 * at or after from.
 */
static uint64_t
find_next (const struct sbitmap *bm, uint64_t from, uint64_t limit,
           bool invert)
{
  const uint64_t flip = invert ? ~UINT64_C (0) : 0;

  if (limit > bm->nbits)
    limit = bm->nbits;
  if (from >= limit)
    return limit;

  for (size_t p = from / SBITMAP_PAGE_BITS; p < bm->npages; ++p) {
    const uint64_t *page = get_page (bm, p);
    uint64_t base = (uint64_t) p * SBITMAP_PAGE_BITS;
    size_t nwords, w;
    uint64_t word;

    if (base >= limit)
      break;
    if (from < base)
      from = base;
    if (page == NULL) {
      /* An absent page is all clear. */
      if (invert)
        return from;
      continue;
    }
    nwords = words_in_page (bm, p);
    w = (from - base) / 64;
    /* Ignore the bits before from in the first word. */
    word = (__atomic_load_n (&page[w], ORDER) ^ flip) &
      (~UINT64_C (0) << (from % 64));
    for (;;) {
      if (word) {
        uint64_t r = base + w * 64 + __builtin_ctzll (word);
        /* A clear padding bit past nbits is not a result. */
        return r < limit ? r : limit;
      }
      if (++w >= nwords || base + w * 64 >= limit)
        break;
      word = __atomic_load_n (&page[w], ORDER) ^ flip;
    }
  }
  return limit;
}

uint64_t
sbitmap_find_next_set (const struct sbitmap *bm, uint64_t from)
{
  return find_next (bm, from, bm->nbits, false);
}

uint64_t
sbitmap_find_next_clear (const struct sbitmap *bm, uint64_t from)
{
  return find_next (bm, from, bm->nbits, true);
}

uint64_t
sbitmap_find_next_set_before (const struct sbitmap *bm, uint64_t from,
                              uint64_t limit)
{
  return find_next (bm, from, limit, false);
}

uint64_t
sbitmap_find_next_clear_before (const struct sbitmap *bm, uint64_t from,
                                uint64_t limit)
{
  return find_next (bm, from, limit, true);
}

uint64_t
sbitmap_count (const struct sbitmap *bm)
{
  return __atomic_load_n (&bm->count, ORDER);
}

uint64_t
sbitmap_count_range (const struct sbitmap *bm, uint64_t first, uint64_t n)
{
  uint64_t total = 0;

  assert (first <= bm->nbits && n <= bm->nbits - first);
  while (n > 0) {
    size_t p = first / SBITMAP_PAGE_BITS;
    uint64_t off = first % SBITMAP_PAGE_BITS;
    uint64_t len = SBITMAP_PAGE_BITS - off;
    const uint64_t *page = get_page (bm, p);

    if (len > n)
      len = n;
    if (page) {
      size_t w = off / 64, wend = (off + len - 1) / 64;
      unsigned lo = off % 64;

      for (; w <= wend; ++w, lo = 0) {
        unsigned hi = w == wend ? (off + len - 1) % 64 + 1 : 64;

        total += __builtin_popcountll (__atomic_load_n (&page[w], ORDER) &
                                       sbitmap_word_mask (lo, hi));
      }
    }
    first += len;
    n -= len;
  }
  return total;
}

uint64_t
sbitmap_union_run (size_t n,
                   const struct sbitmap *(*get) (size_t i, void *opaque),
                   void *opaque, uint64_t b, uint64_t limit, bool *any)
{
  uint64_t end;

  assert (b < limit);
  *any = false;
  for (size_t i = 0; i < n; ++i)
    if (sbitmap_test (get (i, opaque), b)) {
      *any = true;
      break;
    }

  if (!*any) {
    /* Clear in every bitmap up to the first bit any of them has set. */
    end = limit;
    for (size_t i = 0; i < n; ++i)
      end = MIN (end, sbitmap_find_next_set (get (i, opaque), b));
    return end;
  }

  /* Set in one of them up to the first bit every one has clear: each
   * pass jumps over the runs that cover end, until none does.
   */
  end = b;
  for (;;) {
    uint64_t next = end;
    for (size_t i = 0; i < n && next < limit; ++i) {
      const struct sbitmap *bm = get (i, opaque);
      if (sbitmap_test (bm, next))
        next = sbitmap_find_next_clear (bm, next);
    }
    if (next == end || next >= limit)
      return MIN (next, limit);
    end = next;
  }
}

/* Why nothing is lost
 * -------------------
 *
 * A setter does (1) fetch-or the bit into its word, then (2) store the
 * page's dirty flag = 1.  take_dirty does (3) exchange the flag with
 * 0, then (4) load the page pointer and the words.  All four are
 * seq_cst, so they fall in one total order that respects each thread's
 * program order: (1) before (2), and (3) before (4).
 *
 * - If (1) comes before (4), the copy contains the bit.
 * - Otherwise (4) comes before (1), so (3) < (4) < (1) < (2): the flag
 *   is set again after we cleared it, and the next take_dirty copies
 *   the page again.
 *
 * Either way the bit reaches a later write-back.  Doing the steps in
 * the other order on either side would open a window: a setter that
 * marks the page before setting the bit could have its mark cleared
 * by (3) and its bit missed by (4).  The same reasoning covers a page
 * installed concurrently: the install precedes (1), so a NULL page
 * pointer seen at (4) means (4) < (1).
 */
bool
sbitmap_take_dirty (struct sbitmap *bm, size_t p,
                    uint64_t out[SBITMAP_PAGE_WORDS])
{
  const uint64_t *page;

  assert (p < bm->npages);
  /* A plain load first so clean pages cost no write. */
  if (__atomic_load_n (&bm->dirty[p], ORDER) == 0)
    return false;
  if (__atomic_exchange_n (&bm->dirty[p], 0, ORDER) == 0)
    return false;
  page = get_page (bm, p);
  if (page == NULL)
    memset (out, 0, SBITMAP_PAGE_BYTES);
  else {
    for (size_t w = 0; w < SBITMAP_PAGE_WORDS; ++w)
      out[w] = __atomic_load_n (&page[w], ORDER);
  }
  return true;
}

void
sbitmap_mark_dirty (struct sbitmap *bm, size_t p)
{
  assert (p < bm->npages);
  __atomic_store_n (&bm->dirty[p], 1, ORDER);
}

void
sbitmap_mark_all_dirty (struct sbitmap *bm)
{
  for (size_t p = 0; p < bm->npages; ++p)
    __atomic_store_n (&bm->dirty[p], 1, ORDER);
}

int
sbitmap_load_page (struct sbitmap *bm, size_t p,
                   const uint64_t words[SBITMAP_PAGE_WORDS])
{
  size_t nwords;
  uint64_t bits = 0, *page;

  assert (p < bm->npages);
  /* Refuse bits past nbits: the rest of this file relies on them being
   * clear.
   */
  nwords = words_in_page (bm, p);
  for (size_t w = 0; w < SBITMAP_PAGE_WORDS; ++w) {
    uint64_t valid;

    if (w + 1 < nwords)
      valid = ~UINT64_C (0);
    else if (w + 1 == nwords) {
      uint64_t end = bm->nbits - (uint64_t) p * SBITMAP_PAGE_BITS - w * 64;
      valid = sbitmap_word_mask (0, end < 64 ? end : 64);
    }
    else
      valid = 0;
    if (words[w] & ~valid) {
      errno = EINVAL;
      return -1;
    }
    bits += __builtin_popcountll (words[w]);
  }

  /* Not concurrent with anything: plain accesses are enough. */
  page = bm->pages[p];
  if (page) {
    for (size_t w = 0; w < SBITMAP_PAGE_WORDS; ++w)
      bm->count -= __builtin_popcountll (page[w]);
  }
  if (bits == 0) {
    free (page);
    bm->pages[p] = NULL;
    return 0;
  }
  if (page == NULL) {
    page = malloc (SBITMAP_PAGE_BYTES);
    if (page == NULL)
      return -1;
    bm->pages[p] = page;
  }
  memcpy (page, words, SBITMAP_PAGE_BYTES);
  bm->count += bits;
  return 0;
}
