/* nbdkit-snapshot: implementations behind cleanup.h. */
#include <config.h>

#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

#include "cleanup.h"

void
cleanup_free (void *ptr)
{
  free (* (void **) ptr);
}

void
cleanup_close (int *fd)
{
  int saved = errno;            /* Keep errno for the caller's message. */

  if (*fd >= 0)
    close (*fd);
  errno = saved;
}

void
cleanup_unlock (pthread_mutex_t **ptr)
{
  int r = pthread_mutex_unlock (*ptr);
  assert (r == 0);
  (void) r;
}

void
cleanup_rwunlock (pthread_rwlock_t **ptr)
{
  int r = pthread_rwlock_unlock (*ptr);
  assert (r == 0);
  (void) r;
}
