/* nbdsnap: libnbd, loaded only by the commands that need it.
 *
 * Linking libnbd pulls in GnuTLS, libxml2 and ICU, whose start-up
 * costs every nbdsnap run about 10 ms, even a one-line control request
 * ("nbdsnap create" must stay well under 20 ms).  Only "backup" talks
 * NBD, so it loads libnbd with dlopen (libnbd_load) and calls it
 * through the pointers below; the names stay those of <libnbd.h>.
 * Include this instead of <libnbd.h>.
 */
#ifndef NBDSNAP_LIBNBD_DL_H
#define NBDSNAP_LIBNBD_DL_H

#include <libnbd.h>

#define LIBNBD_FUNCTIONS(F) \
  F (nbd_create) F (nbd_close) F (nbd_get_error) F (nbd_connect_uri) \
  F (nbd_shutdown) F (nbd_poll) F (nbd_aio_in_flight) F (nbd_aio_pread) \
  F (nbd_get_size) F (nbd_get_export_name) F (nbd_get_block_size) \
  F (nbd_can_meta_context) F (nbd_block_status) F (nbd_add_meta_context) \
  F (nbd_set_uri_allow_local_file)

struct libnbd_functions {
#define LIBNBD_POINTER(f) __typeof__ (f) *f;
  LIBNBD_FUNCTIONS (LIBNBD_POINTER)
#undef LIBNBD_POINTER
};
extern struct libnbd_functions libnbd;

/* Load libnbd.so.0 and every function above.  Return 0, or -1 after
 * snap_error saying what is missing.
 */
extern int libnbd_load (void);

#define nbd_create (libnbd.nbd_create)
#define nbd_close (libnbd.nbd_close)
#define nbd_get_error (libnbd.nbd_get_error)
#define nbd_connect_uri (libnbd.nbd_connect_uri)
#define nbd_shutdown (libnbd.nbd_shutdown)
#define nbd_poll (libnbd.nbd_poll)
#define nbd_aio_in_flight (libnbd.nbd_aio_in_flight)
#define nbd_aio_pread (libnbd.nbd_aio_pread)
#define nbd_get_size (libnbd.nbd_get_size)
#define nbd_get_export_name (libnbd.nbd_get_export_name)
#define nbd_get_block_size (libnbd.nbd_get_block_size)
#define nbd_can_meta_context (libnbd.nbd_can_meta_context)
#define nbd_block_status (libnbd.nbd_block_status)
#define nbd_add_meta_context (libnbd.nbd_add_meta_context)
#define nbd_set_uri_allow_local_file (libnbd.nbd_set_uri_allow_local_file)

#endif /* NBDSNAP_LIBNBD_DL_H */
