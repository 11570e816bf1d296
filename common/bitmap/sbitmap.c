/* nbdkit-snapshot: sparse, thread-safe bitmaps.
 *
 * Notes on the design
 * -------------------
 *
 * The bitmap is an array of npages page pointers, and each page an
 * array of SBITMAP_PAGE_CHUNKS chunk pointers.  A NULL pointer, page
 * or chunk, stands for bits that are all clear.  A chunk is allocated
 * (zeroed) by the first operation that sets one of its bits, its page
 * too if it has none yet; each is installed with compare-and-swap, so
 * two threads racing to allocate the same one agree on one copy and
 * the loser frees its own.  Pages and chunks are never removed while
 * the bitmap is in use (only sbitmap_free and sbitmap_load_page, which
 * must not run concurrently with anything, free them), so a pointer
 * once read stays valid.
 *
 * Why chunks: a page of 4 KiB covers 128 MiB of a volume at 4 KiB
 * granularity (2 GiB of 64 KiB blocks).  Random writes over a large
 * volume leave one or two bits in most pages they touch, and with
 * whole pages each such bit cost 4 KiB: 10 snapshots and 10
 * checkpoints of 1000 random blocks each over 1 TiB took 96 MiB of
 * pages.  A chunk of 256 bytes and the page's 128 bytes of chunk
 * pointers cost a tenth of that, and a full page 4.2 KiB instead of 4
 * (plus the allocator's overhead): the bits set decide the memory, not
 * how far apart they are.
 *
 * Every word is updated with an atomic fetch-or / fetch-and.  The value
 * returned is the word before the update, so the bits that actually
 * flipped are known exactly (popcount (~old & mask) when setting,
 * popcount (old & mask) when clearing) and the global count is kept
 * with an atomic add of that number.  The count is therefore exact
 * once all updates have returned, whatever they raced with.
 *
 * Bits at or past nbits (in the last, partial chunk) are never set:
 * the range operations assert they stay inside the bitmap, and
 * sbitmap_load_page refuses pages with such bits.  The find functions
 * still never report a bit >= nbits (find_next_clear would otherwise
 * see the clear padding bits).
 *
 * All atomic operations use __ATOMIC_SEQ_CST.  The dirty-page protocol
 * (see sbitmap_take_dirty) needs the single total order of sequentially
 * consistent operations; the other loads use it too so there is only
 * one rule to reason about (on x86-64 a seq_cst load is a plain load).
 *
 * Cost: test/set/clear O(1) (two pointer loads, then the word);
 * set_range/clear_range/count_range one atomic operation or load per
 * 64-bit word touched; find_next_* one load per word in present
 * chunks and O(1) per absent chunk or page.
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

/* Global chunk index ci: its page and its place in the page. */
#define CHUNK_PAGE(ci) ((size_t) ((ci) / SBITMAP_PAGE_CHUNKS))
#define CHUNK_SLOT(ci) ((size_t) ((ci) % SBITMAP_PAGE_CHUNKS))

/* Number of chunks: the last (partial) one included. */
static inline uint64_t
nchunks (const struct sbitmap *bm)
{
  return (bm->nbits + SBITMAP_CHUNK_BITS - 1) / SBITMAP_CHUNK_BITS;
}

/* Number of words of chunk ci that hold bits below nbits. */
static inline size_t
words_in_chunk (const struct sbitmap *bm, uint64_t ci)
{
  uint64_t first = ci * SBITMAP_CHUNK_BITS;
  uint64_t left = bm->nbits - first;

  if (left >= SBITMAP_CHUNK_BITS)
    return SBITMAP_CHUNK_WORDS;
  return (left + 63) / 64;
}

static inline struct sbitmap_page *
get_page (const struct sbitmap *bm, size_t p)
{
  return __atomic_load_n (&bm->pages[p], ORDER);
}

/* Chunk ci, or NULL if absent. */
static inline uint64_t *
get_chunk (const struct sbitmap *bm, uint64_t ci)
{
  struct sbitmap_page *page = get_page (bm, CHUNK_PAGE (ci));

  if (page == NULL)
    return NULL;
  return __atomic_load_n (&page->chunks[CHUNK_SLOT (ci)], ORDER);
}

/* Return chunk ci, allocating and installing it (and its page) if
 * absent, or NULL with errno set.
 */
static uint64_t *
get_chunk_alloc (struct sbitmap *bm, uint64_t ci)
{
  size_t p = CHUNK_PAGE (ci);
  struct sbitmap_page *page = get_page (bm, p), *pexp = NULL;
  uint64_t *chunk, *cexp = NULL;

  if (page == NULL) {
    page = calloc (1, sizeof *page);
    if (page == NULL)
      return NULL;
    if (!__atomic_compare_exchange_n (&bm->pages[p], &pexp, page,
                                      false, ORDER, ORDER)) {
      /* Another thread installed the page first: use theirs. */
      free (page);
      page = pexp;
    }
  }
  chunk = __atomic_load_n (&page->chunks[CHUNK_SLOT (ci)], ORDER);
  if (chunk)
    return chunk;
  chunk = calloc (SBITMAP_CHUNK_WORDS, sizeof (uint64_t));
  if (chunk == NULL)
    return NULL;
  if (__atomic_compare_exchange_n (&page->chunks[CHUNK_SLOT (ci)], &cexp,
                                   chunk, false, ORDER, ORDER))
    return chunk;
  free (chunk);
  return cexp;
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
  if (npages > SIZE_MAX / sizeof (struct sbitmap_page *)) {
    errno = ENOMEM;
    return -1;
  }
  /* Allocate at least one element so an empty bitmap has non-NULL
   * arrays (calloc (0) may return NULL).
   */
  bm->pages = calloc (npages ? npages : 1, sizeof (struct sbitmap_page *));
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

static void
page_free (struct sbitmap_page *page)
{
  if (page == NULL)
    return;
  for (size_t c = 0; c < SBITMAP_PAGE_CHUNKS; ++c)
    free (page->chunks[c]);
  free (page);
}

void
sbitmap_free (struct sbitmap *bm)
{
  if (bm->pages) {
    for (size_t p = 0; p < bm->npages; ++p)
      page_free (bm->pages[p]);
  }
  free (bm->pages);
  free (bm->dirty);
  memset (bm, 0, sizeof *bm);
}

bool
sbitmap_test (const struct sbitmap *bm, uint64_t bit)
{
  const uint64_t *chunk;
  size_t i;

  assert (bit < bm->nbits);
  chunk = get_chunk (bm, bit / SBITMAP_CHUNK_BITS);
  if (chunk == NULL)
    return false;
  i = (bit % SBITMAP_CHUNK_BITS) / 64;
  return (__atomic_load_n (&chunk[i], ORDER) >> (bit % 64)) & 1;
}

int
sbitmap_set (struct sbitmap *bm, uint64_t bit)
{
  uint64_t ci = bit / SBITMAP_CHUNK_BITS;
  uint64_t mask = UINT64_C (1) << (bit % 64);
  uint64_t *chunk, old;

  assert (bit < bm->nbits);
  chunk = get_chunk_alloc (bm, ci);
  if (chunk == NULL)
    return -1;
  /* Set the bit first, then mark the page dirty (see
   * sbitmap_take_dirty for why this order matters).
   */
  old = __atomic_fetch_or (&chunk[(bit % SBITMAP_CHUNK_BITS) / 64], mask,
                           ORDER);
  if (old & mask)
    return 1;
  __atomic_add_fetch (&bm->count, 1, ORDER);
  mark_changed (bm, CHUNK_PAGE (ci));
  return 0;
}

int
sbitmap_clear (struct sbitmap *bm, uint64_t bit)
{
  uint64_t ci = bit / SBITMAP_CHUNK_BITS;
  uint64_t mask = UINT64_C (1) << (bit % 64);
  uint64_t *chunk, old;

  assert (bit < bm->nbits);
  chunk = get_chunk (bm, ci);
  if (chunk == NULL)
    return 0;
  old = __atomic_fetch_and (&chunk[(bit % SBITMAP_CHUNK_BITS) / 64], ~mask,
                            ORDER);
  if (!(old & mask))
    return 0;
  __atomic_sub_fetch (&bm->count, 1, ORDER);
  mark_changed (bm, CHUNK_PAGE (ci));
  return 1;
}

/* Set (set = true) or clear bits [first, first + n) of a chunk, which
 * must hold the whole range, and return the number of bits flipped.
 * The first and last words may be partial; the words in between are
 * updated whole.
 */
static uint64_t
chunk_update (uint64_t *chunk, uint64_t first, uint64_t n, bool set)
{
  size_t w = first / 64, wend = (first + n - 1) / 64;
  unsigned lo = first % 64;
  uint64_t flipped = 0;

  for (; w <= wend; ++w, lo = 0) {
    unsigned hi = w == wend ? (first + n - 1) % 64 + 1 : 64;
    uint64_t mask = sbitmap_word_mask (lo, hi), old;

    if (set) {
      old = __atomic_fetch_or (&chunk[w], mask, ORDER);
      flipped += __builtin_popcountll (~old & mask);
    }
    else {
      old = __atomic_fetch_and (&chunk[w], ~mask, ORDER);
      flipped += __builtin_popcountll (old & mask);
    }
  }
  return flipped;
}

/* Common part of set_range and clear_range: walk the range a chunk at
 * a time.  When setting, chunks are allocated (and -1 returned if that
 * fails, with the bits before already set and counted); when clearing,
 * absent chunks are skipped.
 */
static int64_t
range_update (struct sbitmap *bm, uint64_t first, uint64_t n, bool set)
{
  uint64_t total = 0;

  assert (first <= bm->nbits && n <= bm->nbits - first);
  while (n > 0) {
    uint64_t ci = first / SBITMAP_CHUNK_BITS;
    uint64_t off = first % SBITMAP_CHUNK_BITS;
    uint64_t len = SBITMAP_CHUNK_BITS - off;
    uint64_t *chunk, flipped;

    if (len > n)
      len = n;
    chunk = set ? get_chunk_alloc (bm, ci) : get_chunk (bm, ci);
    if (chunk == NULL && set)
      return -1;
    if (chunk) {
      /* Word updates first, then count and dirty mark. */
      flipped = chunk_update (chunk, off, len, set);
      if (flipped) {
        if (set)
          __atomic_add_fetch (&bm->count, flipped, ORDER);
        else
          __atomic_sub_fetch (&bm->count, flipped, ORDER);
        mark_changed (bm, CHUNK_PAGE (ci));
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
 * in [from, limit).
 */
static uint64_t
find_next (const struct sbitmap *bm, uint64_t from, uint64_t limit,
           bool invert)
{
  const uint64_t flip = invert ? ~UINT64_C (0) : 0;
  const uint64_t n = nchunks (bm);
  uint64_t ci;

  if (limit > bm->nbits)
    limit = bm->nbits;
  if (from >= limit)
    return limit;

  ci = from / SBITMAP_CHUNK_BITS;
  while (ci < n) {
    const struct sbitmap_page *page = get_page (bm, CHUNK_PAGE (ci));
    const uint64_t *chunk;
    uint64_t base = ci * SBITMAP_CHUNK_BITS;
    size_t nwords, w;
    uint64_t word;

    if (base >= limit)
      break;
    if (from < base)
      from = base;
    if (page == NULL) {
      /* An absent page is all clear: skip to the next page. */
      if (invert)
        return from;
      ci = (CHUNK_PAGE (ci) + 1) * (uint64_t) SBITMAP_PAGE_CHUNKS;
      continue;
    }
    chunk = __atomic_load_n (&page->chunks[CHUNK_SLOT (ci)], ORDER);
    if (chunk == NULL) {
      if (invert)
        return from;
      ++ci;
      continue;
    }
    nwords = words_in_chunk (bm, ci);
    w = (from - base) / 64;
    /* Ignore the bits before from in the first word. */
    word = (__atomic_load_n (&chunk[w], ORDER) ^ flip) &
      (~UINT64_C (0) << (from % 64));
    for (;;) {
      if (word) {
        uint64_t r = base + w * 64 + __builtin_ctzll (word);
        /* A clear padding bit past nbits is not a result. */
        return r < limit ? r : limit;
      }
      if (++w >= nwords || base + w * 64 >= limit)
        break;
      word = __atomic_load_n (&chunk[w], ORDER) ^ flip;
    }
    ++ci;
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
    uint64_t ci = first / SBITMAP_CHUNK_BITS;
    uint64_t off = first % SBITMAP_CHUNK_BITS;
    uint64_t len = SBITMAP_CHUNK_BITS - off;
    const uint64_t *chunk;

    if (off == 0 && get_page (bm, CHUNK_PAGE (ci)) == NULL) {
      /* An absent page: skip the rest of it at once. */
      len = (uint64_t) (CHUNK_PAGE (ci) + 1) * SBITMAP_PAGE_BITS - first;
      if (len > n)
        len = n;
      first += len;
      n -= len;
      continue;
    }
    if (len > n)
      len = n;
    chunk = get_chunk (bm, ci);
    if (chunk) {
      size_t w = off / 64, wend = (off + len - 1) / 64;
      unsigned lo = off % 64;

      for (; w <= wend; ++w, lo = 0) {
        unsigned hi = w == wend ? (off + len - 1) % 64 + 1 : 64;

        total += __builtin_popcountll (__atomic_load_n (&chunk[w], ORDER) &
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
 * 0, then (4) load the page and chunk pointers and the words.  All
 * four are
 * seq_cst, so they fall in one total order that respects each
 * thread's program order: (1) before (2), and (3) before (4).
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
 * or chunk installed concurrently: the install precedes (1), so a NULL
 * page or chunk pointer seen at (4) means (4) < (1).
 */
bool
sbitmap_take_dirty (struct sbitmap *bm, size_t p,
                    uint64_t out[SBITMAP_PAGE_WORDS])
{
  assert (p < bm->npages);
  /* A plain load first so clean pages cost no write. */
  if (__atomic_load_n (&bm->dirty[p], ORDER) == 0)
    return false;
  if (__atomic_exchange_n (&bm->dirty[p], 0, ORDER) == 0)
    return false;
  sbitmap_copy_page (bm, p, out);
  return true;
}

bool
sbitmap_copy_page (const struct sbitmap *bm, size_t p,
                   uint64_t out[SBITMAP_PAGE_WORDS])
{
  const struct sbitmap_page *page;

  assert (p < bm->npages);
  page = get_page (bm, p);
  if (page == NULL) {
    memset (out, 0, SBITMAP_PAGE_BYTES);
    return false;
  }
  for (size_t c = 0; c < SBITMAP_PAGE_CHUNKS; ++c) {
    const uint64_t *chunk = __atomic_load_n (&page->chunks[c], ORDER);
    uint64_t *o = &out[c * SBITMAP_CHUNK_WORDS];

    if (chunk == NULL)
      memset (o, 0, SBITMAP_CHUNK_WORDS * sizeof (uint64_t));
    else {
      for (size_t w = 0; w < SBITMAP_CHUNK_WORDS; ++w)
        o[w] = __atomic_load_n (&chunk[w], ORDER);
    }
  }
  return true;
}

bool
sbitmap_page_present (const struct sbitmap *bm, size_t p)
{
  assert (p < bm->npages);
  return get_page (bm, p) != NULL;
}

uint64_t
sbitmap_chunks (const struct sbitmap *bm)
{
  uint64_t n = 0;

  for (size_t p = 0; p < bm->npages; ++p) {
    const struct sbitmap_page *page = get_page (bm, p);

    if (page == NULL)
      continue;
    for (size_t c = 0; c < SBITMAP_PAGE_CHUNKS; ++c)
      n += __atomic_load_n (&page->chunks[c], ORDER) != NULL;
  }
  return n;
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
  uint64_t bits = 0, old = 0;
  uint64_t *fresh[SBITMAP_PAGE_CHUNKS] = { NULL };
  struct sbitmap_page *page;
  bool any = false;

  assert (p < bm->npages);
  /* Refuse bits past nbits: the rest of this file relies on them being
   * clear.
   */
  nwords = (bm->nbits - (uint64_t) p * SBITMAP_PAGE_BITS + 63) / 64;
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

  /* Not concurrent with anything: plain accesses are enough.  Allocate
   * what the new contents need before changing anything, so that a
   * failure leaves the bitmap as it was.
   */
  page = bm->pages[p];
  for (size_t c = 0; c < SBITMAP_PAGE_CHUNKS; ++c) {
    const uint64_t *src = &words[c * SBITMAP_CHUNK_WORDS];
    bool nonzero = false;

    for (size_t w = 0; w < SBITMAP_CHUNK_WORDS && !nonzero; ++w)
      nonzero = src[w] != 0;
    if (!nonzero)
      continue;
    any = true;
    if (page && page->chunks[c])
      continue;
    fresh[c] = malloc (SBITMAP_CHUNK_WORDS * sizeof (uint64_t));
    if (fresh[c] == NULL)
      goto nomem;
  }
  if (page == NULL && any) {
    page = calloc (1, sizeof *page);
    if (page == NULL)
      goto nomem;
    bm->pages[p] = page;
  }

  if (page) {
    for (size_t c = 0; c < SBITMAP_PAGE_CHUNKS; ++c) {
      const uint64_t *src = &words[c * SBITMAP_CHUNK_WORDS];
      uint64_t *chunk = page->chunks[c];

      if (chunk) {
        for (size_t w = 0; w < SBITMAP_CHUNK_WORDS; ++w)
          old += __builtin_popcountll (chunk[w]);
      }
      else
        chunk = fresh[c];
      if (chunk == NULL)
        continue;               /* Absent and all zero. */
      if (fresh[c] == NULL) {
        bool nonzero = false;

        for (size_t w = 0; w < SBITMAP_CHUNK_WORDS && !nonzero; ++w)
          nonzero = src[w] != 0;
        if (!nonzero) {
          free (chunk);
          page->chunks[c] = NULL;
          continue;
        }
      }
      memcpy (chunk, src, SBITMAP_CHUNK_WORDS * sizeof (uint64_t));
      page->chunks[c] = chunk;
    }
    if (!any) {
      free (page);
      bm->pages[p] = NULL;
    }
  }
  bm->count = bm->count - old + bits;
  return 0;

 nomem:
  for (size_t c = 0; c < SBITMAP_PAGE_CHUNKS; ++c)
    free (fresh[c]);
  errno = ENOMEM;
  return -1;
}
