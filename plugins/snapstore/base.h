/* nbdkit-snapstore-plugin: the base, the origin a store was made over.
 *
 * A view reads the pages no layer of it holds from the base: a raw
 * file or a block device (read with pread), or any NBD server (libnbd:
 * qcow2 through qemu-nbd, a remote nbdkit).  A store whose origin was
 * retired (a backup chain, or a stream of its oldest snapshot) has no
 * base.  base_open checks the base against what the manifest records
 * about the origin: its size, the device and inode of its file, and
 * the hash of 16 sampled pages (storefiles.h).
 *
 * Thread safety: after base_open, base_pread and base_extents may be
 * called from any number of threads (pread on one descriptor; libnbd
 * handles are thread-safe and serialise their commands).
 */
#ifndef SNAPSTORE_BASE_H
#define SNAPSTORE_BASE_H

#include <stdbool.h>
#include <stdint.h>

#include "manifest.h"

struct nbdkit_extents;

/* Open the base spec (a path, or an NBD URI: anything with "://") for
 * the store in dir whose manifest is m, and check it is the store's
 * origin.  given: spec came from base= (else from the manifest's
 * origin-path).  Return 0, or -1 after nbdkit_error.
 */
extern int base_open (const char *spec, bool given, const char *dir,
                      const struct manifest *m)
  __attribute__ ((__nonnull__ (1, 3, 4)));

extern void base_close (void);

/* What base_open opened, for messages ("" if none). */
extern const char *base_name (void);

/* Read [offset, offset+count) of the base.  Return 0, or -1 with *err
 * set (reported).
 */
extern int base_pread (void *buf, uint32_t count, uint64_t offset, int *err)
  __attribute__ ((__nonnull__ (1, 4)));

/* Add the allocation of [offset, end) of the base to extents (all data
 * when the base cannot tell).  Return the offset up to which extents
 * were added (at least one byte further), or -1 with *err set.
 */
extern int64_t base_extents (uint64_t offset, uint64_t end, uint32_t flags,
                             struct nbdkit_extents *extents, int *err)
  __attribute__ ((__nonnull__ (4, 5)));

#endif /* SNAPSTORE_BASE_H */
