/* nbdkit-snapshot: sparse, thread-safe bitmaps.
 *
 * A bitmap of nbits bits is divided into pages of SBITMAP_PAGE_BITS
 * bits (4 KiB, the unit of a map file, mapfile.h), and each page into
 * SBITMAP_PAGE_CHUNKS chunks of SBITMAP_CHUNK_BITS bits (256 bytes).
 * Memory is allocated a chunk at a time, the first time one of its
 * bits is set, with a small array of chunk pointers for each page that
 * has one.  So an empty bitmap over a 1 TiB volume at 4 KiB
 * granularity costs 64 KiB of page pointers, a full one 35 MiB (32 MiB
 * of bits), and a bit set alone in its page about 400 bytes (a chunk
 * and the page's chunk pointers) instead of a whole 4 KiB page: bits
 * scattered over a large volume, as random writes leave them in layer
 * and dirty maps, cost 10 times less than with whole pages.
 *
 * Bit i lives in word i / 64 of the bitmap, at bit position i % 64
 * (least significant first).  Written out in little-endian words, page
 * by page (sbitmap_copy_page), this is "bit i of the bitmap is bit
 * (i % 8) of byte i / 8", the on-disk order mapfile.h uses.
 *
 * Every page also has a dirty flag, set whenever a bit of that page
 * changes, which mapfile.h uses to write back only changed pages.
 *
 * Thread safety: sbitmap_test, _set, _clear, _set_range, _clear_range,
 * _find_next_set, _find_next_clear, _count, _count_range,
 * _take_dirty, _copy_page, _page_present and _chunks may be called
 * concurrently with each other (bit updates are atomic word
 * operations; pages and chunks are installed with compare-and-swap).
 * A find or count that runs concurrently with updates sees each word
 * either before or after each update.  sbitmap_init, _free and
 * _load_page must not run concurrently with anything else on the same
 * bitmap.
 */
#ifndef SNAP_SBITMAP_H
#define SNAP_SBITMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SBITMAP_PAGE_BYTES 4096
#define SBITMAP_PAGE_WORDS (SBITMAP_PAGE_BYTES / 8)
#define SBITMAP_PAGE_BITS (SBITMAP_PAGE_BYTES * 8)
#define SBITMAP_CHUNK_WORDS 32
#define SBITMAP_CHUNK_BITS (SBITMAP_CHUNK_WORDS * 64)
#define SBITMAP_PAGE_CHUNKS (SBITMAP_PAGE_WORDS / SBITMAP_CHUNK_WORDS)

/* A page that has at least one chunk: its chunk pointers, NULL for a
 * chunk whose bits are all clear.
 */
struct sbitmap_page {
  uint64_t *chunks[SBITMAP_PAGE_CHUNKS];
};

struct sbitmap {
  uint64_t nbits;               /* Number of bits. */
  size_t npages;                /* Number of pages (last may be partial). */
  struct sbitmap_page **pages;  /* npages pointers; NULL means all zero. */
  uint8_t *dirty;               /* npages flags, 1 = changed since taken. */
  uint64_t count;               /* Number of set bits (atomic). */
};

/* Mask of bits [lo, hi) of a word, 0 <= lo < hi <= 64. */
static inline uint64_t
sbitmap_word_mask (unsigned lo, unsigned hi)
{
  uint64_t m = hi == 64 ? ~UINT64_C (0) : (UINT64_C (1) << hi) - 1;

  return m & (~UINT64_C (0) << lo);
}

/* Initialise an all-zero bitmap of nbits bits.  Return 0, or -1 with
 * errno set (ENOMEM).
 */
extern int sbitmap_init (struct sbitmap *bm, uint64_t nbits)
  __attribute__ ((__nonnull__ (1)));

/* Free the pages.  The struct may be initialised again afterwards. */
extern void sbitmap_free (struct sbitmap *bm)
  __attribute__ ((__nonnull__ (1)));

/* Return the value of bit (bit < nbits). */
extern bool sbitmap_test (const struct sbitmap *bm, uint64_t bit)
  __attribute__ ((__nonnull__ (1)));

/* Set bit.  Return the previous value (0 or 1), or -1 with errno set
 * if a page could not be allocated.
 */
extern int sbitmap_set (struct sbitmap *bm, uint64_t bit)
  __attribute__ ((__nonnull__ (1)));

/* Clear bit.  Never allocates.  Returns the previous value. */
extern int sbitmap_clear (struct sbitmap *bm, uint64_t bit)
  __attribute__ ((__nonnull__ (1)));

/* Set bits [first, first + n).  Return the number of bits that were
 * clear before, or -1 with errno set (a page could not be allocated;
 * the bits in the pages before it are then already set and counted).
 * Whole words at a time.
 */
extern int64_t sbitmap_set_range (struct sbitmap *bm,
                                  uint64_t first, uint64_t n)
  __attribute__ ((__nonnull__ (1)));

/* Clear bits [first, first + n).  Return the number of bits that were
 * set before.  A page that becomes all zero stays allocated.
 */
extern uint64_t sbitmap_clear_range (struct sbitmap *bm,
                                     uint64_t first, uint64_t n)
  __attribute__ ((__nonnull__ (1)));

/* Return the first set (clear) bit at or after from, or nbits if there
 * is none.  Absent pages are skipped whole; within a page the search
 * goes a 64-bit word at a time.
 */
extern uint64_t sbitmap_find_next_set (const struct sbitmap *bm,
                                       uint64_t from)
  __attribute__ ((__nonnull__ (1)));
extern uint64_t sbitmap_find_next_clear (const struct sbitmap *bm,
                                         uint64_t from)
  __attribute__ ((__nonnull__ (1)));

/* The same, looking no further than limit: return the first set
 * (clear) bit in [from, limit), or limit (at most nbits) if none.  The
 * cost is bounded by the range, not by the rest of the bitmap.
 */
extern uint64_t sbitmap_find_next_set_before (const struct sbitmap *bm,
                                              uint64_t from, uint64_t limit)
  __attribute__ ((__nonnull__ (1)));
extern uint64_t sbitmap_find_next_clear_before (const struct sbitmap *bm,
                                                uint64_t from, uint64_t limit)
  __attribute__ ((__nonnull__ (1)));

/* Number of set bits. */
extern uint64_t sbitmap_count (const struct sbitmap *bm)
  __attribute__ ((__nonnull__ (1)));

/* Count the set bits in [first, first + n). */
extern uint64_t sbitmap_count_range (const struct sbitmap *bm,
                                     uint64_t first, uint64_t n)
  __attribute__ ((__nonnull__ (1)));

/* The union of n bitmaps of the same length (get (i, opaque) returns
 * the i-th): set *any to whether bit b is set in any of them, and
 * return the first bit after b, at most limit (b < limit <= nbits),
 * where that answer changes.  Costs a find per bitmap and run, a
 * 64-bit word at a time: a changed-block query over many checkpoints'
 * dirty maps (dirty/FROM/TO exports).
 */
extern uint64_t sbitmap_union_run (size_t n,
                                   const struct sbitmap *(*get) (size_t i,
                                                                 void *opaque),
                                   void *opaque, uint64_t b, uint64_t limit,
                                   bool *any)
  __attribute__ ((__nonnull__ (2, 6)));

/* If page p is marked dirty, clear the mark and copy the page's words
 * into out (zeros for an absent page), in that order, and return true.
 * Return false if the page is clean.  A bit set concurrently is either
 * in the copy or leaves the page marked dirty again.
 */
extern bool sbitmap_take_dirty (struct sbitmap *bm, size_t p,
                                uint64_t out[SBITMAP_PAGE_WORDS])
  __attribute__ ((__nonnull__ (1, 3)));

/* Copy the words of page p into out (zeros for absent chunks).  Return
 * whether the page has any chunk (false: out is all zero).
 */
extern bool sbitmap_copy_page (const struct sbitmap *bm, size_t p,
                               uint64_t out[SBITMAP_PAGE_WORDS])
  __attribute__ ((__nonnull__ (1, 3)));

/* Whether page p has any chunk allocated (a page none of whose bits
 * was ever set, or that sbitmap_load_page found all zero, has none).
 */
extern bool sbitmap_page_present (const struct sbitmap *bm, size_t p)
  __attribute__ ((__nonnull__ (1)));

/* The number of chunks allocated (each SBITMAP_CHUNK_WORDS words). */
extern uint64_t sbitmap_chunks (const struct sbitmap *bm)
  __attribute__ ((__nonnull__ (1)));

/* Mark page p dirty (e.g. after a failed write-back). */
extern void sbitmap_mark_dirty (struct sbitmap *bm, size_t p)
  __attribute__ ((__nonnull__ (1)));

/* Mark every page dirty (after a load, to rewrite everything). */
extern void sbitmap_mark_all_dirty (struct sbitmap *bm)
  __attribute__ ((__nonnull__ (1)));

/* Install the words of page p (used when loading from disk; bits past
 * nbits must be zero).  The page is not marked dirty.  Only the chunks
 * holding a set bit are allocated (none for an all-zero page).  Return 0, or -1 with errno set (EINVAL if a
 * bit past nbits is set; the bitmap is then unchanged).
 */
extern int sbitmap_load_page (struct sbitmap *bm, size_t p,
                              const uint64_t words[SBITMAP_PAGE_WORDS])
  __attribute__ ((__nonnull__ (1, 3)));

#endif /* SNAP_SBITMAP_H */
