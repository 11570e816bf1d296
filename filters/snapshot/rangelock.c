/* nbdkit-snapshot: locks over ranges of pages (see rangelock.h). */
#include <config.h>

#include <assert.h>
#include <stdbool.h>

#include "cleanup.h"
#include "rangelock.h"

void
rangelock_init (struct rangelock *rl)
{
  pthread_mutex_init (&rl->lock, NULL);
  pthread_cond_init (&rl->cond, NULL);
  rl->held = NULL;
}

void
rangelock_destroy (struct rangelock *rl)
{
  assert (rl->held == NULL);
  pthread_cond_destroy (&rl->cond);
  pthread_mutex_destroy (&rl->lock);
}

static bool
overlaps (const struct rangelock *rl, uint64_t first, uint64_t last)
{
  for (const struct range *r = rl->held; r; r = r->next)
    if (r->first <= last && first <= r->last)
      return true;
  return false;
}

void
rangelock_acquire (struct rangelock *rl, struct range *r,
                   uint64_t first, uint64_t last)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&rl->lock);

  assert (first <= last);
  while (overlaps (rl, first, last))
    pthread_cond_wait (&rl->cond, &rl->lock);
  r->first = first;
  r->last = last;
  r->next = rl->held;
  rl->held = r;
}

void
rangelock_release (struct rangelock *rl, struct range *r)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&rl->lock);
  struct range **pp;

  for (pp = &rl->held; *pp != r; pp = &(*pp)->next)
    assert (*pp != NULL);
  *pp = r->next;
  pthread_cond_broadcast (&rl->cond);
}
