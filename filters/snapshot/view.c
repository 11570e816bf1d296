/* nbdkit-snapshot: reading and writing through views (see store.h).
 *
 * Every function here is called with store.lock held shared, so the
 * layer list cannot change underneath.  A view (store.h) searches a
 * range of store.layers in the order its kind wants, then the origin
 * (next).
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <nbdkit-filter.h>

#include "cleanup.h"
#include "pending.h"
#include "store.h"
#include "util.h"

static const char zero_page[PAGE_SIZE_BYTES];

/* Byte offset of page p, and its length (the last page may be short). */
static inline uint64_t
page_off (uint64_t p)
{
  return p << PAGE_SHIFT;
}

static inline uint32_t
page_len (uint64_t p)
{
  return MIN ((uint64_t) PAGE_SIZE_BYTES, store.size - page_off (p));
}

int
view_source (const struct view *v, uint64_t p, uint64_t limit,
             uint64_t *run_end)
{
  int src = -1;
  uint64_t end = limit;

  /* While a revert runs: the pages in v->top come from v->top_src,
   * the others from the view below.
   */
  if (v->top) {
    if (sbitmap_test (v->top, p)) {
      *run_end = MIN (limit, sbitmap_find_next_clear (v->top, p));
      return v->top_src;
    }
    return view_source (v->below, p,
                        MIN (limit, sbitmap_find_next_set (v->top, p)),
                        run_end);
  }

  /* The first layer of the view, in its order, that holds the page;
   * the run ends where that layer loses the page, or where a layer
   * searched before it gains one.
   */
  for (size_t k = 0; k < v->hi - v->lo; ++k) {
    size_t i = v->ascending ? v->lo + k : v->hi - 1 - k;
    if (sbitmap_test (&store.layers[i]->map, p)) {
      src = i;
      end = MIN (end, sbitmap_find_next_clear (&store.layers[i]->map, p));
      break;
    }
    end = MIN (end, sbitmap_find_next_set (&store.layers[i]->map, p));
  }
  assert (end > p);
  *run_end = end;
  return src;
}

void
view_of_layers (struct view *v, size_t lo, size_t hi, bool ascending)
{
  *v = (struct view) { .lo = lo, .hi = hi, .ascending = ascending };
}

/* Read [offset, offset+count) from one source. */
static int
source_pread (nbdkit_next *next, int src, void *buf, uint32_t count,
              uint64_t offset, int *err)
{
  if (src < 0)
    return next->pread (next, buf, count, offset, 0, err);
  if (full_pread (store.layers[src]->data_fd, buf, count, offset) == -1) {
    *err = errno;
    nbdkit_error ("layer %" PRIu64 ": pread: %m", store.layers[src]->id);
    return -1;
  }
  return 0;
}

/* Read [offset, offset+count) of the origin for a view, with the
 * deferred writes of the live volume over it (pending.c): they are
 * looked up first, so that a page applied meanwhile is read from the
 * origin after it was written there.
 */
static int
origin_pread_pending (nbdkit_next *next, char *buf, uint32_t count,
                      uint64_t offset, int *err)
{
  const uint64_t first = offset >> PAGE_SHIFT;
  const uint64_t n = ((offset + count - 1) >> PAGE_SHIFT) - first + 1;
  CLEANUP_FREE char *pages = NULL;
  CLEANUP_FREE unsigned char *mask = NULL;

  if (pending_count () == 0 || pending_find (first, first + n) == first + n)
    return source_pread (next, -1, buf, count, offset, err);
  pages = malloc (n << PAGE_SHIFT);
  mask = calloc (n, 1);
  if (pages == NULL || mask == NULL) {
    *err = errno;
    nbdkit_error ("malloc: %m");
    return -1;
  }
  pending_collect (first, n, pages, mask);
  if (source_pread (next, -1, buf, count, offset, err) == -1)
    return -1;
  for (uint64_t i = 0; i < n; ++i) {
    uint64_t from, to;

    if (!mask[i])
      continue;
    from = MAX (offset, page_off (first + i));
    to = MIN (offset + count, page_off (first + i + 1));
    memcpy (buf + (from - offset), pages + (from - page_off (first)),
            to - from);
  }
  return 0;
}

int
view_pread (nbdkit_next *next, const struct view *v, void *buf,
            uint32_t count, uint64_t offset, int *err)
{
  char *p = buf;
  const uint64_t end = offset + count;

  while (offset < end) {
    uint64_t pg = offset >> PAGE_SHIFT, run_end, len;
    const uint64_t last = ((end - 1) >> PAGE_SHIFT) + 1;
    int src = view_source (v, pg, last, &run_end);

    len = MIN (end, page_off (run_end)) - offset;
    if ((src < 0 && v->pending
         ? origin_pread_pending (next, p, len, offset, err)
         : source_pread (next, src, p, len, offset, err)) == -1)
      return -1;
    /* A page kept in a layer while the origin was read: that copy is
     * what the view holds.
     */
    if (src < 0 && v->recheck) {
      for (uint64_t q = pg; q < run_end; ) {
        uint64_t e, from, to;
        int s2 = view_source (v, q, run_end, &e);
        if (s2 >= 0) {
          from = MAX (offset, page_off (q));
          to = MIN (offset + len, page_off (e));
          if (source_pread (next, s2, p + (from - offset), to - from, from,
                            err) == -1)
            return -1;
        }
        q = e;
      }
    }
    p += len;
    offset += len;
  }
  return 0;
}

/* Add the extents of layer src over [offset, end): holes punched in the
 * layer's data file read as zeros.
 */
static int
layer_extents (int src, uint64_t offset, uint64_t end,
               struct nbdkit_extents *extents, int *err)
{
  int fd = store.layers[src]->data_fd;

  while (offset < end) {
    off_t data = lseek (fd, offset, SEEK_DATA);
    uint64_t hole_end;

    if (data == -1 && errno != ENXIO) {
      /* No SEEK_DATA here: say everything is data. */
      return nbdkit_add_extent (extents, offset, end - offset, 0) == -1
        ? (*err = errno, -1) : 0;
    }
    hole_end = data == -1 ? end : MIN (end, (uint64_t) data);
    if (hole_end > offset) {
      if (nbdkit_add_extent (extents, offset, hole_end - offset,
                             NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO) == -1) {
        *err = errno;
        return -1;
      }
      offset = hole_end;
      if (offset >= end)
        break;
    }
    {
      off_t hole = lseek (fd, offset, SEEK_HOLE);
      uint64_t data_end = hole == -1 ? end : MIN (end, (uint64_t) hole);
      if (data_end <= offset)
        data_end = end;
      if (nbdkit_add_extent (extents, offset, data_end - offset, 0) == -1) {
        *err = errno;
        return -1;
      }
      offset = data_end;
    }
  }
  return 0;
}

/* Add the origin's extents over [offset, end).  Return the offset up to
 * which extents were added (the origin may answer for less), or -1.
 */
static int64_t
origin_extents (nbdkit_next *next, uint64_t offset, uint64_t end,
                uint32_t flags, struct nbdkit_extents *extents, int *err)
{
  struct nbdkit_extents *sub;
  uint64_t reached = offset;

  if (!next->can_extents (next)) {
    if (nbdkit_add_extent (extents, offset, end - offset, 0) == -1) {
      *err = errno;
      return -1;
    }
    return end;
  }
  sub = nbdkit_extents_new (offset, end);
  if (sub == NULL) {
    *err = errno;
    return -1;
  }
  if (next->extents (next, end - offset, offset,
                     flags & ~NBDKIT_FLAG_REQ_ONE, sub, err) == -1) {
    nbdkit_extents_free (sub);
    return -1;
  }
  for (size_t i = 0; i < nbdkit_extents_count (sub); ++i) {
    struct nbdkit_extent e = nbdkit_get_extent (sub, i);
    uint64_t s = MAX (e.offset, offset), t = MIN (e.offset + e.length, end);
    if (t <= s)
      continue;
    if (nbdkit_add_extent (extents, s, t - s, e.type) == -1) {
      *err = errno;
      nbdkit_extents_free (sub);
      return -1;
    }
    reached = t;
  }
  nbdkit_extents_free (sub);
  return reached;
}

int
view_extents (nbdkit_next *next, const struct view *v, uint32_t count,
              uint64_t offset, uint32_t flags,
              struct nbdkit_extents *extents, int *err)
{
  const uint64_t end = offset + count;
  const uint64_t last = ((end - 1) >> PAGE_SHIFT) + 1;

  while (offset < end) {
    uint64_t run_end, stop;
    int src = view_source (v, offset >> PAGE_SHIFT, last, &run_end);

    stop = MIN (end, page_off (run_end));
    if (src >= 0) {
      if (layer_extents (src, offset, stop, extents, err) == -1)
        return -1;
    }
    else {
      int64_t reached;
      /* Deferred writes of the live volume are data (pending.c); the
       * origin answers up to the first.
       */
      const uint64_t pend_end = ((stop - 1) >> PAGE_SHIFT) + 1;
      const uint64_t pf = v->pending
        ? pending_find (offset >> PAGE_SHIFT, pend_end) : pend_end;

      if (page_off (pf) <= offset) {
        uint64_t e = MIN (stop, page_off (pending_run_end (pf, run_end)));
        if (nbdkit_add_extent (extents, offset, e - offset, 0) == -1) {
          *err = errno;
          return -1;
        }
        offset = e;
        if (flags & NBDKIT_FLAG_REQ_ONE)
          break;
        continue;
      }
      stop = MIN (stop, page_off (pf));
      reached = origin_extents (next, offset, stop, flags, extents, err);
      if (reached == -1)
        return -1;
      if ((uint64_t) reached < stop)
        break;                  /* A short answer is allowed. */
    }
    offset = stop;
    if (flags & NBDKIT_FLAG_REQ_ONE)
      break;
  }
  return 0;
}

int
view_cache (nbdkit_next *next, const struct view *v, uint32_t count,
            uint64_t offset, int *err)
{
  const uint64_t end = offset + count;
  const uint64_t last = ((end - 1) >> PAGE_SHIFT) + 1;
  int origin_cache = next->can_cache (next);

  while (offset < end) {
    uint64_t run_end, stop;
    int src = view_source (v, offset >> PAGE_SHIFT, last, &run_end);

    stop = MIN (end, page_off (run_end));
    if (src >= 0)
      /* Advisory: failure to prefetch is not an error. */
      posix_fadvise (store.layers[src]->data_fd, offset, stop - offset,
                     POSIX_FADV_WILLNEED);
    else if (origin_cache == NBDKIT_CACHE_NATIVE) {
      if (next->cache (next, stop - offset, offset, 0, err) == -1)
        return -1;
    }
    offset = stop;
  }
  return 0;
}

/* ---- Writing to the newest layer ---- */

/* Write one page-bounded piece [offset, offset+count) within page pg
 * into the newest layer.  buf NULL means zeros.  When the layer lacks
 * the page and the piece does not cover it, fill the rest of the page
 * from the view below first (read-modify-write).  The caller holds the
 * page in store.pages.
 */
static int
top_write_partial (nbdkit_next *next, const void *buf, uint32_t count,
                   uint64_t offset, uint64_t pg, int *err)
{
  struct layer *top = store.layers[store.nlayers - 1];
  char page[PAGE_SIZE_BYTES];
  struct view below;
  const uint64_t poff = page_off (pg);
  const uint32_t plen = page_len (pg);

  if (sbitmap_test (&top->map, pg)) {
    if (full_pwrite (top->data_fd, buf ? buf : zero_page, count, offset) == -1)
      goto err;
    __atomic_store_n (&top->data_dirty, 1, __ATOMIC_SEQ_CST);
    /* A page that is all zeros now becomes a hole (layer_store). */
    if ((buf == NULL || pages_are_zero (buf, count)) &&
        full_pread (top->data_fd, page, plen, poff) == 0 &&
        pages_are_zero (page, plen) &&
        layer_store (top, page, pg, pg + 1) == -1)
      goto err;
    return 0;
  }
  /* Below the newest layer: the layers under it, or during a revert
   * the reverted-to snapshot's view.
   */
  row_below_view (&below);
  if (view_pread (next, &below, page, plen, poff, err) == -1)
    return -1;
  memcpy (page + (offset - poff), buf ? buf : zero_page, count);
  if (layer_store (top, page, pg, pg + 1) == -1)
    goto err;
  if (sbitmap_set (&top->map, pg) == -1)
    goto err;
  return 0;

 err:
  *err = errno;
  nbdkit_error ("layer %" PRIu64 ": write: %m", top->id);
  return -1;
}

/* Write whole pages [pg, pg+npg) into the newest layer.  buf NULL means
 * zeros: punch a hole, which reads as zeros, else write zeros.
 */
static int
top_write_pages (const void *buf, uint64_t pg, uint64_t npg, int *err)
{
  struct layer *top = store.layers[store.nlayers - 1];
  const uint64_t off = page_off (pg);
  const uint64_t len = MIN (page_off (pg + npg), store.size) - off;

  if (buf) {
    if (layer_store (top, buf, pg, pg + npg) == -1)
      goto err;
  }
  else if (fallocate (top->data_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      off, len) == -1) {
    if (errno != EOPNOTSUPP)
      goto err;
    for (uint64_t o = 0; o < len; o += PAGE_SIZE_BYTES)
      if (full_pwrite (top->data_fd, zero_page,
                       MIN ((uint64_t) PAGE_SIZE_BYTES, len - o),
                       off + o) == -1)
        goto err;
  }
  __atomic_store_n (&top->data_dirty, 1, __ATOMIC_SEQ_CST);
  if (sbitmap_set_range (&top->map, pg, npg) == -1)
    goto err;
  return 0;

 err:
  *err = errno;
  nbdkit_error ("layer %" PRIu64 ": write: %m", top->id);
  return -1;
}

/* Give the newest layer the whole space of an allocation unit when a
 * write brings a second page into it: allocate the unit, as unwritten
 * space that reads as zeros.  The unit is the block
 * (snapshot-block-size), or PREALLOC_MAX if blocks are larger: a
 * block size chosen for small dirty maps must not make a layer grow by
 * 2 MiB at a time.  With 4 KiB blocks a unit is one page, and nothing
 * is ever allocated ahead.  Only a hint, so errors are ignored (a full
 * disk then fails the write itself, or not, as without it), and a file
 * system that cannot allocate ahead is not asked again.
 *
 * Why: a write of a few pages into a hole of a sparse file is slow on
 * extent-based file systems with delayed allocation (ext4): each page
 * becomes a delayed extent of its own, reserved and looked up one by
 * one.  Into allocated space, the later writes of the unit's pages
 * only map what is there.  Random 4K writes into a fresh layer on ext4
 * run 10-20% faster with the unit allocated ahead (fio, the bench
 * machine of docs/benchmarks.md).
 *
 * Why the second page and not the first: a unit that gets only one
 * page (sequential 4K writes at a stride, or a lone change) would pay
 * a fallocate call for nothing and hold a whole unit of disk; the
 * allocation pays off only for units written again.  Not for a unit
 * the write covers whole (a run of whole pages is allocated as one
 * extent anyway), nor for a write to the page the unit already holds
 * (a rewrite of one page in place must not call fallocate each time).
 * So a layer grows by pages while its units are sparse, by whole units
 * once they are not, as a qcow2 image grows by clusters.
 *
 * Regions: when a unit gets its second page and the region
 * (PREALLOC_REGION, 1 MiB) around it already holds PREALLOC_DENSE
 * pages (32 KiB), the whole region is allocated instead, once.  Under
 * writes spread over the volume, most units of a region then find
 * their space allocated before their first page comes: one fallocate
 * call per region instead of one per unit, and no page written into a
 * hole.  Random 4K writes after a snapshot run about 12% faster (median
 * of 6 interleaved pairs of runs, docs/benchmarks.md, "Writes into a
 * fresh layer").  A region is allocated only where it already holds 8
 * pages and a unit in it gets its second: at most 1 MiB of disk for 36 KiB
 * written, where qcow2 with 2 MiB clusters allocates 2 MiB on the first
 * write.  The regions allocated are remembered in memory only (a
 * restart forgets them, and at worst asks again for space that is
 * there).
 */
#define PREALLOC_MAX (64 * 1024)
#define PREALLOC_REGION LAYER_REGION_BYTES
#define PREALLOC_DENSE 8

static bool prealloc_unsupported;

static uint64_t
prealloc_unit (void)
{
  return MIN ((uint64_t) store.block_size, (uint64_t) PREALLOC_MAX);
}

/* The unit [*off, *end) is getting its second page: widen the range
 * to the unit's region if the region is dense, or return false if the
 * region was allocated whole already (nothing to do).  The region is
 * marked before it is allocated; if that fails (a full disk), its
 * units are not asked for again either.
 */
static bool
top_region (struct layer *top, uint64_t *off, uint64_t *end)
{
  const uint64_t r = *off / PREALLOC_REGION, roff = r * PREALLOC_REGION;
  const uint64_t first = roff >> PAGE_SHIFT;
  const uint64_t npg = MIN ((uint64_t) PREALLOC_REGION >> PAGE_SHIFT,
                            store.npages - first);
  int was;

  if (sbitmap_test (&top->regions, r))
    return false;
  if (sbitmap_count_range (&top->map, first, npg) < PREALLOC_DENSE)
    return true;
  was = sbitmap_set (&top->regions, r);
  if (was == 1)
    return false;               /* another writer got there first */
  if (was == -1)
    return true;                /* no memory for the bit: the unit only */
  *off = roff;
  *end = MIN (roff + PREALLOC_REGION, store.size);
  return true;
}

static void
top_preallocate_unit (struct layer *top, uint64_t u, uint64_t pg,
                      uint64_t offset, uint64_t end)
{
  const uint64_t us = prealloc_unit (), ppu = us >> PAGE_SHIFT;
  const uint64_t first = u * ppu;
  uint64_t uoff = u * us, uend = MIN (uoff + us, store.size);

  if ((offset <= uoff && end >= uend) || sbitmap_test (&top->map, pg) ||
      sbitmap_count_range (&top->map, first,
                           MIN (ppu, store.npages - first)) != 1 ||
      !top_region (top, &uoff, &uend))
    return;
  if (fallocate (top->data_fd, FALLOC_FL_KEEP_SIZE, uoff, uend - uoff) == -1
      && errno == EOPNOTSUPP)
    __atomic_store_n (&prealloc_unsupported, true, __ATOMIC_RELAXED);
}

static void
top_preallocate (struct layer *top, uint64_t offset, uint64_t end)
{
  const uint64_t first = offset / prealloc_unit ();
  const uint64_t last = (end - 1) / prealloc_unit ();

  if (__atomic_load_n (&prealloc_unsupported, __ATOMIC_RELAXED))
    return;
  top_preallocate_unit (top, first, offset >> PAGE_SHIFT, offset, end);
  if (last != first)
    top_preallocate_unit (top, last, (end - 1) >> PAGE_SHIFT, offset, end);
}

/* Split [offset, offset+count) into partial head and tail pages and a
 * run of whole pages, and write each with the page range locked.
 */
static int
top_write (nbdkit_next *next, const char *buf, uint32_t count,
           uint64_t offset, uint32_t flags, int *err)
{
  const uint64_t end = offset + count;
  const uint64_t first = offset >> PAGE_SHIFT, last = (end - 1) >> PAGE_SHIFT;
  struct range r;
  int ret = 0;

  if (buf)
    top_preallocate (store.layers[store.nlayers - 1], offset, end);
  rangelock_acquire (&store.pages, &r, first, last);
  while (offset < end) {
    uint64_t pg = offset >> PAGE_SHIFT;
    uint64_t in_page = offset - page_off (pg);
    uint64_t piece = MIN (end, page_off (pg) + page_len (pg)) - offset;

    if (in_page == 0 && piece == page_len (pg)) {
      /* Whole pages up to the last one the request covers entirely. */
      uint64_t stop = end == store.size ? end : ROUND_DOWN (end,
                                                            (uint64_t) PAGE_SIZE_BYTES);
      uint64_t npg = (stop - offset + PAGE_SIZE_BYTES - 1) >> PAGE_SHIFT;
      if (top_write_pages (buf, pg, npg, err) == -1) {
        ret = -1;
        break;
      }
      piece = stop - offset;
    }
    else if (top_write_partial (next, buf, piece, offset, pg, err) == -1) {
      ret = -1;
      break;
    }
    if (buf)
      buf += piece;
    offset += piece;
  }
  rangelock_release (&store.pages, &r);

  if (ret == 0 && (flags & NBDKIT_FLAG_FUA) &&
      layer_flush (store.layers[store.nlayers - 1]) == -1) {
    *err = errno;
    nbdkit_error ("flush: %m");
    ret = -1;
  }
  return ret;
}

int
top_pwrite (nbdkit_next *next, const void *buf, uint32_t count,
            uint64_t offset, uint32_t flags, int *err)
{
  assert (buf != NULL);
  return top_write (next, buf, count, offset, flags, err);
}

int
top_zero (nbdkit_next *next, uint32_t count, uint64_t offset,
          uint32_t flags, int *err)
{
  return top_write (next, NULL, count, offset, flags, err);
}

int
top_trim (uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  struct layer *top = store.layers[store.nlayers - 1];
  const uint64_t end = offset + count;
  uint64_t pg = (offset + PAGE_SIZE_BYTES - 1) >> PAGE_SHIFT;
  const uint64_t stop = end == store.size ? store.npages : end >> PAGE_SHIFT;
  struct range r;

  /* Trim is advisory: free the space of whole pages the newest layer
   * holds (they then read as zeros); leave everything else alone.
   */
  if (pg >= stop)
    return 0;
  rangelock_acquire (&store.pages, &r, pg, stop - 1);
  while (pg < stop) {
    uint64_t s = sbitmap_find_next_set (&top->map, pg), e;
    if (s >= stop)
      break;
    e = MIN (stop, sbitmap_find_next_clear (&top->map, s));
    if (fallocate (top->data_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                   page_off (s), MIN (page_off (e), store.size) - page_off (s))
        == -1 && errno != EOPNOTSUPP) {
      *err = errno;
      nbdkit_error ("layer %" PRIu64 ": trim: %m", top->id);
      rangelock_release (&store.pages, &r);
      return -1;
    }
    __atomic_store_n (&top->data_dirty, 1, __ATOMIC_SEQ_CST);
    pg = e;
  }
  rangelock_release (&store.pages, &r);
  if ((flags & NBDKIT_FLAG_FUA) && layer_flush (top) == -1) {
    *err = errno;
    nbdkit_error ("flush: %m");
    return -1;
  }
  return 0;
}

/* ---- dirty/ exports ---- */

int
dirty_pread (nbdkit_next *next, size_t from, size_t to,
             const struct view *v, void *buf, uint32_t count,
             uint64_t offset, int *err)
{
  char *p = buf;
  const uint64_t end = offset + count;
  const uint64_t limit = (end - 1) / store.block_size + 1;

  while (offset < end) {
    bool changed;
    uint64_t b = offset / store.block_size;
    uint64_t run_end = ckpt_run (from, to, b, limit, &changed);
    uint64_t len = MIN (end, run_end * store.block_size) - offset;

    if (!changed)
      memset (p, 0, len);       /* Unchanged blocks read as zeros. */
    else if (view_pread (next, v, p, len, offset, err) == -1)
      return -1;
    p += len;
    offset += len;
  }
  return 0;
}

int
dirty_extents (size_t from, size_t to, uint32_t count, uint64_t offset,
               uint32_t flags, struct nbdkit_extents *extents, int *err)
{
  const uint64_t end = offset + count;
  /* The last run may go on past the request, up to 4 GiB more: the
   * NBD protocol lets the final extent of a reply extend beyond the
   * requested range, and nbdkit passes it on, so a client walking a
   * huge, mostly unchanged volume (nbdinfo --map) needs fewer
   * requests.  The runs come from the bitmaps, so this costs little.
   */
  const uint64_t reach = (flags & NBDKIT_FLAG_REQ_ONE) ? end
    : MIN (store.size, end + UINT32_MAX);
  const uint64_t limit = (reach - 1) / store.block_size + 1;

  while (offset < end) {
    bool changed;
    uint64_t b = offset / store.block_size;
    uint64_t run_end = ckpt_run (from, to, b, limit, &changed);
    uint64_t stop = MIN (reach, run_end * store.block_size);

    if (nbdkit_add_extent (extents, offset, stop - offset,
                           changed ? 0
                           : NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO) == -1) {
      *err = errno;
      return -1;
    }
    offset = stop;
    if (flags & NBDKIT_FLAG_REQ_ONE)
      break;
  }
  return 0;
}
