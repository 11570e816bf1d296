/* nbdkit-snapshot: writes of a cbw live volume acknowledged before
 * they reach the origin (pending.h).
 *
 * Notes on the design
 * -------------------
 *
 * A cbw write to pages the newest layer does not hold yet must keep
 * their old contents durably before the origin changes (guarantee 2).
 * Done in the client's request, that costs a sync of the layer per
 * write (shared by the writes in flight, but nbdkit runs at most
 * --threads of them), and most of the time goes waiting for it.
 *
 * So a small write (PENDING_MAX_WRITE_PAGES at most, without FUA) to
 * such pages is acknowledged once their old contents are in the layer
 * (in the page cache, their bits set): its new pages go into a table
 * here instead of the origin.  A thread ("snap-apply") takes
 * everything queued, syncs the layer once (layer_sync) and only then
 * writes the pages into the origin, through the filter's own origin
 * context, and drops them from the table.  The client's next write no
 * longer waits for the disk; the disk sees one sync for all the writes
 * queued meanwhile.
 *
 * What clients see is unchanged:
 * - a read of the live volume looks here for each page first, then
 *   reads the origin and puts the pending pages over it (view.c): a
 *   page looked up here and not found is either in the origin already
 *   or written concurrently with the read;
 * - block status of the live volume reports pending pages as data;
 * - a write, zero or trim that is not deferred waits for the pending
 *   pages it touches to reach the origin first (pending_wait_range,
 *   under the page range lock), so writes to a page land in order;
 * - a flush waits for every write queued before it to reach the origin
 *   (pending_flush), then flushes the origin;
 * - everything that takes store.lock exclusively (snapshots,
 *   checkpoints, jobs, a full store's invalidation) waits until nothing
 *   is pending (pending_settle): the views and layers it changes never
 *   have writes in flight.  They take the lock with
 *   ACQUIRE_STORE_EXCLUSIVE_FOR_CURRENT_SCOPE (store.h), which does both;
 * - a crash loses only writes no flush covered, which NBD allows.
 *
 * A deferred write whose layer sync or origin write fails stays in the
 * table, readable, and is tried again (every RETRY_MS while only
 * failed ones wait).  Meanwhile a flush that covers it, and a write
 * that touches its pages, wait for one more try and fail with EIO if
 * that fails too: the error reaches the client at its next request
 * that depends on the write, as a file system reports a failed
 * write-back at fsync, and the client may retry.  After a failed sync
 * of the store (store.h) no deferred write can reach the origin any
 * more (its old contents may not be durable): they stay readable
 * until the server stops, and every flush fails.  Only an exclusive
 * operation (pending_settle) that finds writes still failing after
 * about a second of tries drops them, logged, and the next flush
 * reports it.
 */
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <nbdkit-filter.h>

#include "cleanup.h"
#include "origin.h"
#include "pending.h"
#include "store.h"
#include "util.h"

/* One deferred write: pages [first, first+n). */
struct pend {
  struct pend *next;            /* in the queue or in a batch */
  struct layer *layer;
  uint64_t first, n;
  uint64_t seq;                 /* order of queueing, from 1 */
  uint64_t tries;               /* failed tries */
  char *data;
  struct node {                 /* one per page, in the table */
    struct node *next;
    uint64_t page;
    struct pend *pend;
  } nodes[];
};

#define BUCKETS 4096            /* power of 2 */
#define RETRY_MS 10

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t work = PTHREAD_COND_INITIALIZER;  /* the thread */
static pthread_cond_t done = PTHREAD_COND_INITIALIZER;  /* waiters */
static struct node *table[BUCKETS];
static struct pend *queue, **queue_tail = &queue;
static uint64_t npending;       /* pages in the table; atomic reads */
static uint64_t reserved;       /* pages reserved, in the table or not */
static uint64_t seq;            /* of the newest write queued */
static uint64_t cycles;         /* batches the thread finished */
static int lost;                /* errno of writes dropped, to report */
static bool running, stopping;
static bool busy;               /* the thread holds a batch */
static pthread_t thread;

static struct node **
bucket (uint64_t page)
{
  return &table[(page ^ (page >> 12)) & (BUCKETS - 1)];
}

/* The node of page p, or NULL (lock held). */
static struct node *
lookup (uint64_t p)
{
  for (struct node *n = *bucket (p); n; n = n->next)
    if (n->page == p)
      return n;
  return NULL;
}

/* A write that can never reach the origin: the store failed a sync. */
static bool
stuck (const struct pend *p)
{
  return p->tries > 0 && store_failed ();
}

uint64_t
pending_count (void)
{
  return __atomic_load_n (&npending, __ATOMIC_ACQUIRE);
}

bool
pending_reserve (uint64_t n)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);

  if (n > PENDING_MAX_WRITE_PAGES || reserved + n > PENDING_MAX_PAGES ||
      stopping)
    return false;
  reserved += n;
  return true;
}

void
pending_unreserve (uint64_t n)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);

  reserved -= n;
}

/* Try a batch of n writes: sync each layer it names once, then write
 * the pages of each write whose layer synced into the origin.  Set
 * ok[i] for the writes that reached the origin; sync[] (n entries) is
 * scratch.
 */
static void
apply (struct pend *batch, size_t n, bool *ok, bool *sync)
{
  size_t i = 0;

  for (struct pend *p = batch; p; p = p->next, ++i) {
    size_t j = 0;
    struct pend *q;

    for (q = batch; q != p && q->layer != p->layer; q = q->next)
      j++;
    if (q != p)
      sync[i] = sync[j];        /* its layer's sync was tried already */
    else if (layer_sync (p->layer) == 0)
      sync[i] = true;
    else {
      nbdkit_error ("snapshot: keeping the old contents of deferred "
                    "writes: %m (tried again later)");
      sync[i] = false;
    }
  }
  assert (i == n);
  i = 0;
  for (struct pend *p = batch; p; p = p->next, ++i) {
    const uint64_t off = p->first << PAGE_SHIFT;
    const uint64_t len = MIN (p->n << PAGE_SHIFT, store.size - off);

    ok[i] = sync[i] && origin_pwrite (p->data, len, off) == 0;
    if (sync[i] && !ok[i])
      nbdkit_error ("snapshot: deferred write of %" PRIu64 " bytes at "
                    "offset %" PRIu64 ": %m (tried again later)", len, off);
    if (!ok[i])
      p->tries++;
  }
}

/* Take write p out of the table and free it (lock held). */
static void
forget (struct pend *p)
{
  for (uint64_t i = 0; i < p->n; ++i) {
    struct node **pp = bucket (p->nodes[i].page);
    while (*pp != &p->nodes[i])
      pp = &(*pp)->next;
    *pp = p->nodes[i].next;
  }
  reserved -= p->n;
  __atomic_sub_fetch (&npending, p->n, __ATOMIC_RELEASE);
  free (p->data);
  free (p);
}

static void *
apply_thread (void *arg)
{
  name_thread ("snap-apply");
  pthread_mutex_lock (&lock);
  for (;;) {
    struct pend *batch, **tail;
    size_t n = 0, i;
    bool *ok, failed = false;

    while (queue == NULL && !stopping)
      pthread_cond_wait (&work, &lock);
    if (queue == NULL)
      break;
    pthread_mutex_unlock (&lock);
    if (snapshot_debug_apply_delay_ms > 0)
      snap_sleep_ms (snapshot_debug_apply_delay_ms);
    pthread_mutex_lock (&lock);
    batch = queue;
    queue = NULL;
    queue_tail = &queue;
    busy = true;
    for (struct pend *p = batch; p; p = p->next)
      n++;
    pthread_mutex_unlock (&lock);

    ok = calloc (2 * n, sizeof *ok);
    if (ok)
      apply (batch, n, ok, ok + n);
    else
      nbdkit_error ("calloc: %m (deferred writes tried again later)");

    pthread_mutex_lock (&lock);
    /* The writes that failed go back to the front of the queue, in
     * their order; those that can never go, nowhere (they stay in the
     * table).
     */
    tail = &batch;
    for (i = 0; *tail; ++i) {
      struct pend *p = *tail;

      if (ok && ok[i]) {
        *tail = p->next;
        forget (p);
      }
      else {
        if (!ok)
          p->tries++;
        failed = true;
        if (stuck (p))
          *tail = p->next;
        else
          tail = &p->next;
      }
    }
    if (batch) {
      *tail = queue;
      if (queue == NULL)
        queue_tail = tail;
      queue = batch;
    }
    free (ok);
    busy = false;
    cycles++;
    pthread_cond_broadcast (&done);
    if (failed && !stopping) {
      pthread_mutex_unlock (&lock);
      snap_sleep_ms (RETRY_MS);
      pthread_mutex_lock (&lock);
    }
  }
  pthread_mutex_unlock (&lock);
  return NULL;
}

int
pending_add (struct layer *l, uint64_t first, uint64_t n, char *data)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  struct pend *p;

  if (!running) {
    int e = pthread_create (&thread, NULL, apply_thread, NULL);
    if (e != 0) {
      free (data);
      reserved -= n;
      errno = e;
      nbdkit_error ("snapshot: starting the thread of deferred writes: %m");
      return -1;
    }
    running = true;
  }
  p = malloc (sizeof *p + n * sizeof p->nodes[0]);
  if (p == NULL) {
    free (data);
    reserved -= n;
    nbdkit_error ("malloc: %m");
    return -1;
  }
  *p = (struct pend) { .layer = l, .first = first, .n = n, .data = data,
                       .seq = ++seq };
  for (uint64_t i = 0; i < n; ++i) {
    struct node **b = bucket (first + i);
    p->nodes[i] = (struct node) { .next = *b, .page = first + i, .pend = p };
    *b = &p->nodes[i];
  }
  *queue_tail = p;
  queue_tail = &p->next;
  __atomic_add_fetch (&npending, n, __ATOMIC_RELEASE);
  pthread_cond_signal (&work);
  return 0;
}

/* Scan the writes in the table that match: pages [first, last] (with
 * last - first below PENDING_MAX_PAGES), or queued up to target (with
 * target != 0).  Return whether any matches; set *failed if a match
 * failed its last try, *stuck if one can never go (lock held).
 */
static bool
scan (uint64_t first, uint64_t last, uint64_t target,
      bool *failed, bool *never)
{
  bool any = false;

  *failed = *never = false;
  if (target == 0) {
    for (uint64_t p = first; p <= last; ++p) {
      const struct node *nd = lookup (p);
      if (nd) {
        any = true;
        *failed |= nd->pend->tries > 0;
        *never |= stuck (nd->pend);
      }
    }
    return any;
  }
  for (size_t b = 0; b < BUCKETS; ++b)
    for (const struct node *nd = table[b]; nd; nd = nd->next)
      if (nd->pend->seq <= target) {
        any = true;
        *failed |= nd->pend->tries > 0;
        *never |= stuck (nd->pend);
      }
  return any;
}

/* Wait until no write matches (see scan), or one has failed a try
 * after the call: then return -1 with errno EIO (lock held).
 */
static int
wait_for (uint64_t first, uint64_t last, uint64_t target)
{
  const uint64_t c0 = cycles;
  bool failed, never;

  while (scan (first, last, target, &failed, &never)) {
    /* A failed write gets one more try (two cycles: the one running
     * may have taken its batch before the call) before the caller
     * hears of it.
     */
    if (never || (failed && cycles >= c0 + 2)) {
      errno = EIO;
      return -1;
    }
    pthread_cond_wait (&done, &lock);
  }
  return 0;
}

int
pending_wait_range (uint64_t first, uint64_t last)
{
  if (pending_count () == 0)
    return 0;

  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  /* A long range (a trim of the whole volume, say) waits for all. */
  if (last - first >= PENDING_MAX_PAGES)
    return wait_for (0, 0, seq ? seq : 1);
  return wait_for (first, last, 0);
}

uint64_t
pending_collect (uint64_t first, uint64_t n, char *buf, unsigned char *mask)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  uint64_t found = 0;

  for (uint64_t i = 0; i < n && found < npending; ++i) {
    struct node *nd = lookup (first + i);

    if (nd) {
      const struct pend *p = nd->pend;
      memcpy (buf + (i << PAGE_SHIFT),
              p->data + ((nd->page - p->first) << PAGE_SHIFT),
              PAGE_SIZE_BYTES);
      mask[i] = 1;
      found++;
    }
  }
  return found;
}

uint64_t
pending_find (uint64_t first, uint64_t end)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);

  if (npending == 0)
    return end;
  /* A long range (block status of a large volume): look through the
   * table instead, which holds PENDING_MAX_PAGES at most.
   */
  if (end - first > BUCKETS) {
    uint64_t best = end;
    for (size_t b = 0; b < BUCKETS; ++b)
      for (const struct node *n = table[b]; n; n = n->next)
        if (n->page >= first && n->page < best)
          best = n->page;
    return best;
  }
  for (uint64_t p = first; p < end; ++p)
    if (lookup (p))
      return p;
  return end;
}

uint64_t
pending_run_end (uint64_t p, uint64_t end)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);

  while (p < end && lookup (p))
    p++;
  return p;
}

int
pending_flush (void)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);

  if (lost) {
    errno = lost;
    lost = 0;
    return -1;
  }
  if (seq == 0)
    return 0;
  return wait_for (0, 0, seq);
}

/* Tries a failing write gets in pending_settle (about a second). */
#define SETTLE_TRIES 50

void
pending_settle (void)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);

  for (int i = 0; seq != 0 && wait_for (0, 0, seq) == -1; ++i)
    if (i == SETTLE_TRIES)
      goto drop;
  return;

 drop:
  /* Writes that cannot reach the origin: drop them, as nothing that
   * changes the views may run while they wait.
   */
  while (busy)
    pthread_cond_wait (&done, &lock);
  for (size_t b = 0; b < BUCKETS; ++b)
    while (table[b]) {
      struct pend *p = table[b]->pend, **pp;

      nbdkit_error ("snapshot: deferred write of %" PRIu64 " pages at "
                    "page %" PRIu64 " could not reach the origin: lost",
                    p->n, p->first);
      for (pp = &queue; *pp && *pp != p; pp = &(*pp)->next)
        ;
      if (*pp) {
        *pp = p->next;
        if (queue_tail == &p->next)
          queue_tail = pp;
      }
      forget (p);
    }
  lost = EIO;
}

void
pending_stop (void)
{
  pending_settle ();
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);

    stopping = true;
    if (!running)
      return;
    pthread_cond_signal (&work);
  }
  pthread_join (thread, NULL);
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&lock);
  running = false;
}
