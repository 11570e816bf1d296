/* nbdkit-snapshot: reading a store at rest.
 *
 * The snapstore plugin serves the snapshots of a store that no filter
 * holds open, and nbdsnap reads stores (backup chains, check) without
 * a server.  Both read the store through this file, which reads the
 * format with the same code as the filter: the manifest (manifest.h),
 * the map files with their seals (mapfile.h), and the rules of
 * storefiles.h.  Nothing here writes to the store.
 *
 * Notes on the design
 * -------------------
 *
 * Opening.  sr_open locks the store shared (a filter, which locks it
 * exclusively, is then refused, and a store a filter holds is refused
 * here), loads the manifest, checks that every file the manifest names
 * is there and that no other file is (sr_scan), then opens each layer
 * (its data file read-only, of the volume's size; its page map, whose
 * seal and holes are checked as the filter checks them) and each
 * checkpoint's dirty map.  Every error names the file, what was found
 * and what was expected.  The pieces are separate functions so that a
 * checker (nbdsnap check) can report every problem, not just the
 * first.
 *
 * Views.  A snapshot's view is a range of layers searched in order,
 * then the origin (kind.h in the filter): in a row store the layers
 * older than the snapshot, newest first; in a cbw store the snapshot's
 * own layer, then each newer one, oldest first.
 *
 * The index.  Finding the layer that holds page p by testing each
 * layer's map in turn costs O(depth) per page, which a long backup
 * chain makes slow.  sr_index_build instead sweeps the layers' maps
 * once and records the view as runs of pages with the same source
 * (start page, source), sorted; a directory with one entry per chunk
 * of 2^shift pages gives the first run of each chunk, so a lookup is
 * a binary search among the runs of one chunk: at most `shift` steps
 * whatever the depth of the chain.  The sweep visits each run of set
 * bits of each map once (events ordered by a heap), and keeps the set
 * of layers holding the current page as a bitset in search order, so
 * building costs O(R log n + R n / 64) for R runs over n layers, and
 * O(runs + chunks) memory.  Memory: 12 bytes per run and 4 per chunk;
 * the shift is chosen so a view of any size has at most 2^19 chunks
 * (2 MiB): for 1 TiB, chunks of 2 MiB of the volume.
 *
 * Thread safety: a struct storeread is not changed after sr_open, so
 * any number of threads may read it and look up indexes concurrently.
 * Building an index only reads the store.
 */
#ifndef SNAP_STOREREAD_H
#define SNAP_STOREREAD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "manifest.h"
#include "sbitmap.h"

struct sr_layer {
  uint64_t id;
  int data_fd;                  /* layer-N.data, read-only, or -1 */
  struct sbitmap map;           /* the pages it holds */
  bool sealed;                  /* its map was sealed (and checked) */
};

struct storeread {
  char *dir;                    /* absolute path */
  int lock_fd;                  /* DIR/lock, flock'd shared, or -1 */
  struct manifest m;
  uint64_t size;                /* volume size in bytes */
  uint64_t npages;              /* pages of STORE_PAGE_SIZE */
  uint64_t nblocks;             /* blocks of m.block_size */
  uint32_t block_size;
  size_t nlayers;               /* == m.nlayers once open */
  struct sr_layer *layers;      /* parallel to m.layers */
  struct sbitmap *maps;         /* dirty maps, parallel to m.ckpts */
  bool *maps_sealed;
};

/* Take a shared lock on DIR/lock (created if missing and the directory
 * is writable; a store with no lock file that cannot have one is not
 * held by anybody).  Set *fd to the locked descriptor, or -1.  Return
 * 0; -1 with errno EBUSY, and nothing reported, when a server holds
 * the store (its exclusive lock); -1 after snap_error otherwise.
 */
extern int sr_lock (const char *dir, int *fd)
  __attribute__ ((__nonnull__ (1, 2)));

/* Load DIR/manifest into s (which this initialises).  Return 0; -1
 * after snap_error (no manifest: "not a store").
 */
extern int sr_load (struct storeread *s, const char *dir)
  __attribute__ ((__nonnull__ (1, 2)));

/* Check the files of the store against the manifest: each file it
 * names is there (a layer's data and map, each checkpoint's dirty map),
 * and every other entry of the directory is a file the format allows
 * (storefiles.h: fixed and transient names, files of dropped ids).
 * Call report once per problem, with the name of the file and what is
 * wrong.  Return the number of problems, or -1 after snap_error if the
 * directory cannot be read.
 */
extern ssize_t sr_scan (const struct storeread *s,
                        void (*report) (void *opaque, const char *name,
                                        const char *problem),
                        void *opaque)
  __attribute__ ((__nonnull__ (1, 2)));

/* Open layer i of s.m.layers into s->layers[i] (s->layers allocated by
 * the caller, or by sr_open): its data file (a regular file of the
 * volume's size, or a symbolic link to one), its map (header, size,
 * seal) and, for a sealed map, the holes of its data file against the
 * seal.  Return 0; -1 after snap_error naming the file.
 */
extern int sr_open_layer (struct storeread *s, size_t i)
  __attribute__ ((__nonnull__ (1)));

/* Open the dirty map of checkpoint i into s->maps[i].  Return 0; -1
 * after snap_error naming the file.
 */
extern int sr_open_map (struct storeread *s, size_t i)
  __attribute__ ((__nonnull__ (1)));

/* Lock (if lock), load, scan, then open every layer and dirty map,
 * stopping at the first problem.  A store held by a server gives -1
 * with errno EBUSY and nothing reported.  Return 0; -1 after
 * snap_error.
 */
extern int sr_open (struct storeread *s, const char *dir, bool lock)
  __attribute__ ((__nonnull__ (1, 2)));

/* Close everything (also after a failed sr_open or sr_load). */
extern void sr_close (struct storeread *s)
  __attribute__ ((__nonnull__ (1)));

/* ---- Views ---- */

/* The number of layers of m that are older than snapshot c (with an id
 * below c->layer).
 */
extern size_t sr_snapshot_depth (const struct manifest *m,
                                 const struct manifest_checkpoint *c)
  __attribute__ ((__nonnull__ (1, 2)));

/* The layers of snapshot ci's view: indexes [*lo, *hi) of m->layers,
 * searched from *lo up if *ascending, else from *hi - 1 down; then the
 * origin.
 */
extern void sr_snapshot_view (const struct manifest *m, size_t ci,
                              size_t *lo, size_t *hi, bool *ascending)
  __attribute__ ((__nonnull__ (1, 3, 4, 5)));

/* Whether checkpoint ci can be read as a snapshot at rest: it keeps a
 * view (kind snapshot) and no job is deleting it.  If not, and why is
 * not NULL, set *why to a static reason.
 */
extern bool sr_readable (const struct manifest *m, size_t ci,
                         const char **why)
  __attribute__ ((__nonnull__ (1)));

/* The index of a view (see the notes above). */
struct sr_index {
  uint64_t npages;
  size_t nruns;
  uint64_t *start;              /* nruns + 1: start[nruns] = npages */
  int32_t *src;                 /* nruns: a layer index, or -1 (origin) */
  unsigned shift;               /* a chunk is 2^shift pages */
  uint32_t *chunk;              /* nchunks + 1: the run of each chunk's
                                   first page; chunk[nchunks] = nruns-1 */
};

/* Build the index of the view that searches maps[0], maps[1], ...,
 * maps[n - 1] (each of npages bits) in that order, then the origin;
 * page p's source is src[k] for the first maps[k] that has bit p set,
 * or -1.  Return 0, or -1 with errno set (ENOMEM).
 */
extern int sr_index_build (size_t n, const struct sbitmap *const *maps,
                           const int32_t *src, uint64_t npages,
                           struct sr_index *ix)
  __attribute__ ((__nonnull__ (5)));

/* Build the index of snapshot ci's view in s (layer indexes of
 * s->layers as sources).  Return 0, or -1 with errno set.
 */
extern int sr_view_index (const struct storeread *s, size_t ci,
                          struct sr_index *ix)
  __attribute__ ((__nonnull__ (1, 3)));

extern void sr_index_free (struct sr_index *ix)
  __attribute__ ((__nonnull__ (1)));

/* The source of page p (< ix->npages): a layer index, or -1 for the
 * origin; *run_end is set to the first page after p whose source
 * differs (or npages).
 */
static inline int32_t
sr_index_find (const struct sr_index *ix, uint64_t p, uint64_t *run_end)
{
  size_t lo = ix->chunk[p >> ix->shift], hi = ix->chunk[(p >> ix->shift) + 1];

  /* The last run of [lo, hi] that starts at or before p. */
  while (lo < hi) {
    size_t mid = lo + (hi - lo + 1) / 2;
    if (ix->start[mid] <= p)
      lo = mid;
    else
      hi = mid - 1;
  }
  *run_end = ix->start[lo + 1];
  return ix->src[lo];
}

/* ---- Data ---- */

/* Whether [offset, end) of file fd starts with data or a hole (which
 * reads as zeros): set *data and return the end of that stretch (at
 * most end).  Without SEEK_DATA, everything is data.
 */
extern uint64_t sr_data_run (int fd, uint64_t offset, uint64_t end,
                             bool *data)
  __attribute__ ((__nonnull__ (4)));

#endif /* SNAP_STOREREAD_H */
