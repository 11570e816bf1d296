/* nbdkit-snapshot: locks over ranges of pages.
 *
 * A writer that may read-modify-write a partial page holds the range of
 * pages it touches, so two requests that share a page run one after the
 * other while requests on disjoint ranges run in parallel.  Waiters
 * sleep on one condition variable; the list of held ranges is as long
 * as the number of requests in flight, which nbdkit bounds.
 *
 * Thread safety: all functions may be called from any thread.
 */
#ifndef SNAPSHOT_RANGELOCK_H
#define SNAPSHOT_RANGELOCK_H

#include <pthread.h>
#include <stdint.h>

struct range {
  uint64_t first, last;         /* Inclusive page numbers. */
  struct range *next;
};

struct rangelock {
  pthread_mutex_t lock;         /* Protects held. */
  pthread_cond_t cond;          /* Signalled when a range is released. */
  struct range *held;
};

extern void rangelock_init (struct rangelock *rl);
extern void rangelock_destroy (struct rangelock *rl);

/* Wait until [first, last] overlaps no held range, then hold it using
 * the caller's storage r (which must stay valid until release).
 */
extern void rangelock_acquire (struct rangelock *rl, struct range *r,
                               uint64_t first, uint64_t last)
  __attribute__ ((__nonnull__ (1, 2)));
extern void rangelock_release (struct rangelock *rl, struct range *r)
  __attribute__ ((__nonnull__ (1, 2)));

#endif /* SNAPSHOT_RANGELOCK_H */
