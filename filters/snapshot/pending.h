/* nbdkit-snapshot: writes of a cbw live volume acknowledged before
 * they reach the origin (see pending.c).
 */
#ifndef SNAPSHOT_PENDING_H
#define SNAPSHOT_PENDING_H

#include <stdbool.h>
#include <stdint.h>

struct layer;

/* Most pages pending at once, and in one deferred write. */
#define PENDING_MAX_PAGES 2048
#define PENDING_MAX_WRITE_PAGES 16

/* Pages pending now (a hint: 0 means none were when it was read). */
extern uint64_t pending_count (void);

/* Reserve room for n pages; false if there is none (write in place
 * then).  pending_unreserve gives it back after a failure.
 */
extern bool pending_reserve (uint64_t n);
extern void pending_unreserve (uint64_t n);

/* Queue a reserved write: pages [first, first+n) of the origin get
 * data (n whole pages, malloc'd, taken over) once layer l, which holds
 * their old contents, is durable.  Return 0, or -1 with errno set (data
 * freed, room given back).
 */
extern int pending_add (struct layer *l, uint64_t first, uint64_t n,
                        char *data);

/* Wait until no page of [first, last] is pending.  Return 0, or -1
 * with errno EIO if a write to them keeps failing to reach the origin.
 */
extern int pending_wait_range (uint64_t first, uint64_t last);

/* Copy the pending contents of pages [first, first+n) into
 * buf (n pages; page first at buf), setting mask[i] for each page
 * copied.  Return how many.
 */
extern uint64_t pending_collect (uint64_t first, uint64_t n, char *buf,
                                 unsigned char *mask);

/* The first pending page of [first, end), or end; and the end of the
 * run of pending pages from p.
 */
extern uint64_t pending_find (uint64_t first, uint64_t end);
extern uint64_t pending_run_end (uint64_t p, uint64_t end);

/* Wait until every write queued before the call is in the origin.
 * Return 0, or -1 with errno set if one keeps failing to get there, or
 * if pending_settle dropped one since the last flush.
 */
extern int pending_flush (void);

/* Wait until nothing is pending (store.lock exclusive: nothing new
 * can come); writes still failing to reach the origin after about a
 * second of tries are dropped (logged; the next flush fails).
 */
extern void pending_settle (void);

/* Settle, then stop the thread that applies writes. */
extern void pending_stop (void);

#endif /* SNAPSHOT_PENDING_H */
