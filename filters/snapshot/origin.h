/* nbdkit-snapshot: the origin, the plugin below the filter (origin.c). */
#ifndef SNAPSHOT_ORIGIN_H
#define SNAPSHOT_ORIGIN_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include <nbdkit-filter.h>

/* The filter's own context on the plugin, and the lock that serialises
 * its use.
 */
extern nbdkit_next *bg_next;
extern pthread_mutex_t bg_lock;

/* Whether nbdkit runs the plugin in the parallel thread model (then
 * bg_next may be called from two threads at once).
 */
extern void origin_set_parallel (bool parallel);
extern bool origin_parallel (void);

/* Open the context (in .after_fork), make sure the origin takes a
 * second connection, and get its size.  Return 0, or -1 after
 * nbdkit_error.
 */
extern int origin_open (nbdkit_backend *backend, int64_t *size);
extern void origin_close (void);

/* Whether the origin can be written by a job: the context is writable
 * and nbdkit was not started with -r.
 */
extern bool origin_writable (void);

/* Flush, read and write the origin through the context (with bg_lock;
 * origin_flush_unlocked without it, for a parallel plugin).  Return 0,
 * or -1 with errno set.
 */
extern int origin_flush (void);
extern int origin_flush_unlocked (void);
extern int origin_pread (void *buf, uint32_t len, uint64_t off);
extern int origin_pwrite (const void *buf, uint32_t len, uint64_t off);

/* Identity.  origin_note_config sees every plugin parameter (.config);
 * origin_identity_check checks an origin of size bytes against the
 * manifest at start-up, before the store is opened and changes (adopt:
 * accept it); origin_identity_open records it once the store is open;
 * origin_freeze records the sample in store.m when the origin stops
 * being written, origin_thaw drops it before it may be (the caller
 * saves the manifest, store.lock held exclusively);
 * origin_identity_close records it at a clean stop.
 */
extern void origin_note_config (const char *key, const char *value);

/* The absolute path of the origin's file (file=PATH of a regular
 * file), or NULL when it is not known.
 */
extern const char *origin_file (void);
extern int origin_identity_check (int64_t size, bool adopt);
extern int origin_identity_open (void);
extern int origin_freeze (void);
extern void origin_thaw (void);
extern void origin_identity_close (void);

/* A client's write, zero, trim and flush of the origin through its own
 * context next: FUA becomes a flush when the plugin cannot do it, and
 * a zero is written as zeros when it cannot zero.  Return 0, or -1
 * with *err set.
 */
extern int origin_client_pwrite (nbdkit_next *next, const void *buf,
                                 uint32_t count, uint64_t offset,
                                 uint32_t flags, int *err);
extern int origin_client_zero (nbdkit_next *next, uint32_t count,
                               uint64_t offset, uint32_t flags, int *err);
extern int origin_client_trim (nbdkit_next *next, uint32_t count,
                               uint64_t offset, uint32_t flags, int *err);
extern int origin_client_flush (nbdkit_next *next, uint32_t flags,
                                int *err);

#endif /* SNAPSHOT_ORIGIN_H */
