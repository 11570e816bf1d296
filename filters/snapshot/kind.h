/* nbdkit-snapshot: snapshot kinds.
 *
 * A kind is one table of operations: where each view reads, how a
 * write to the live volume lands, what must be flushed before a
 * checkpoint, and the plan of each merge.  The store picks its kind
 * when it is created (snapshot-mode) and keeps it for life; the rest
 * of the filter calls store.kind and never asks which kind it is.
 *
 *   row (row.c)  redirect-on-write: once a snapshot exists the origin
 *                is frozen and writes land in the newest layer.
 *   cbw (cbw.c)  copy-before-write: writes go to the origin in place,
 *                after the old contents of the pages they overwrite
 *                are kept in the newest snapshot's layer.
 */
#ifndef SNAPSHOT_KIND_H
#define SNAPSHOT_KIND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <nbdkit-filter.h>

#include "manifest.h"
#include "sbitmap.h"

/* What a connection reads: a range of store.layers searched in order
 * (ascending: lo first; else hi - 1 first), then the origin.  While a
 * revert runs, the pages set in top come from top_src (a layer index,
 * or -1 for the origin) and the others from the view below.
 */
struct view {
  size_t lo, hi;
  bool ascending;
  const struct sbitmap *top;
  int top_src;
  const struct view *below;
  /* The origin under this view is written while it is read (cbw): a
   * page read from the origin is looked up again afterwards, and read
   * from a layer that got it meanwhile (its old contents, kept there
   * before the origin was overwritten).
   */
  bool recheck;
  /* The live volume of a cbw store: the origin reads with the writes
   * deferred over it (pending.c).
   */
  bool pending;
};

struct job;

struct kind {
  const char *name;             /* "row" or "cbw" */
  enum snap_mode mode;

  /* Views (store.lock held).  live_view may point v->below at *below. */
  void (*live_view) (struct view *v, struct view *below);
  void (*snapshot_view) (size_t ci, struct view *v);

  /* Client requests on the live volume (store.lock shared).  Each
   * records the change in the active dirty map itself.
   */
  int (*pwrite) (nbdkit_next *next, const void *buf, uint32_t count,
                 uint64_t offset, uint32_t flags, int *err);
  int (*zero) (nbdkit_next *next, uint32_t count, uint64_t offset,
               uint32_t flags, int *err);
  int (*trim) (nbdkit_next *next, uint32_t count, uint64_t offset,
               uint32_t flags, int *err);
  int (*flush) (nbdkit_next *next, uint32_t flags, int *err);
  int (*can_write) (nbdkit_next *next);
  int (*can_multi_conn) (nbdkit_next *next);

  /* Whether the layer maps record every write since the newest
   * checkpoint (then its dirty map need not be durable before each
   * write, see checkpoint.c).
   */
  bool (*active_is_layered) (void);

  /* Make the live volume durable before a checkpoint is taken
   * (store.lock exclusive).  Return 0, or -1 with errno set.
   */
  int (*flush_live) (int (*flush_origin) (void));

  /* Whether the first snapshot freezes the origin (its identity is
   * then sampled, origin.c).
   */
  bool snapshots_freeze_origin;

  /* Jobs (store.lock exclusive).  prepare_delete checks the request
   * to delete snapshot ci (strategy STRATEGY_* or -1 for auto; output
   * NULL or a path) and fills in j (strategy, costs, output); set
   * *push if a new empty newest layer must be started first.
   * prepare_revert does the same for a revert to snapshot ci.  plan
   * sets j->ops and the job's figures from the store as it is (when
   * the job starts, and when it resumes after a restart).  Each
   * returns 0, or -1 with *errmsg set.
   */
  int (*prepare_delete) (struct job *j, size_t ci, int strategy,
                         const char *output, bool origin_writable,
                         bool *push, char **errmsg);
  int (*prepare_revert) (struct job *j, size_t ci, bool *push,
                         char **errmsg);
  int (*plan) (struct job *j, char **errmsg);

  /* At a clean stop, after the last client and the job, while the
   * origin is still open; called again by store_close, where it must do
   * nothing more (may be NULL).
   */
  void (*close) (void);
};

extern const struct kind row_kind;
extern const struct kind cbw_kind;

#endif /* SNAPSHOT_KIND_H */
