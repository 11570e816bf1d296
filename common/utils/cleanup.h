/* nbdkit-snapshot: scope-bound cleanup of memory, descriptors and locks.
 *
 * Thread safety: the macros only act on the variable they are attached to.
 */
#ifndef SNAP_CLEANUP_H
#define SNAP_CLEANUP_H

#include <assert.h>
#include <pthread.h>
#include <stdlib.h>

extern void cleanup_free (void *ptr);
#define CLEANUP_FREE __attribute__ ((cleanup (cleanup_free)))

extern void cleanup_close (int *fd);
#define CLEANUP_CLOSE __attribute__ ((cleanup (cleanup_close)))

extern void cleanup_unlock (pthread_mutex_t **ptr);
#define CLEANUP_UNLOCK __attribute__ ((cleanup (cleanup_unlock)))

extern void cleanup_rwunlock (pthread_rwlock_t **ptr);
#define CLEANUP_RWUNLOCK __attribute__ ((cleanup (cleanup_rwunlock)))

#define SNAP_UNIQUE_NAME_(name, counter) name##counter
#define SNAP_UNIQUE_NAME(name, counter) SNAP_UNIQUE_NAME_ (name, counter)

/* Hold mutex m until the end of the enclosing C block.  (The variable
 * is only there for its cleanup: clang would call it unused.)
 */
#define ACQUIRE_LOCK_FOR_CURRENT_SCOPE(m) \
  CLEANUP_UNLOCK __attribute__ ((__unused__)) \
  pthread_mutex_t *SNAP_UNIQUE_NAME (_lock, __COUNTER__) = (m); \
  do { int _r = pthread_mutex_lock (m); assert (_r == 0); (void) _r; } while (0)

/* Hold rwlock l shared / exclusive until the end of the enclosing block. */
#define ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE(l) \
  CLEANUP_RWUNLOCK __attribute__ ((__unused__)) \
  pthread_rwlock_t *SNAP_UNIQUE_NAME (_rdlock, __COUNTER__) = (l); \
  do { int _r = pthread_rwlock_rdlock (l); assert (_r == 0); (void) _r; } while (0)
#define ACQUIRE_WRLOCK_FOR_CURRENT_SCOPE(l) \
  CLEANUP_RWUNLOCK __attribute__ ((__unused__)) \
  pthread_rwlock_t *SNAP_UNIQUE_NAME (_wrlock, __COUNTER__) = (l); \
  do { int _r = pthread_rwlock_wrlock (l); assert (_r == 0); (void) _r; } while (0)

#endif /* SNAP_CLEANUP_H */
