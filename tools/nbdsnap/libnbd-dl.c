/* nbdsnap: loading libnbd at run time (see libnbd-dl.h). */
#include <config.h>

#include <dlfcn.h>
#include <stddef.h>

#include "libnbd-dl.h"
#include "nbdsnap.h"
#include "util.h"

/* Here the names are the struct members and the symbols, not the
 * macros of libnbd-dl.h.
 */
#undef nbd_create
#undef nbd_close
#undef nbd_get_error
#undef nbd_connect_uri
#undef nbd_shutdown
#undef nbd_poll
#undef nbd_aio_in_flight
#undef nbd_aio_pread
#undef nbd_get_size
#undef nbd_get_export_name
#undef nbd_get_block_size
#undef nbd_can_meta_context
#undef nbd_block_status
#undef nbd_add_meta_context
#undef nbd_set_uri_allow_local_file

struct libnbd_functions libnbd;

int
libnbd_load (void)
{
  static const char soname[] = "libnbd.so.0";
  void *h;

  if (libnbd.nbd_create)
    return 0;
  h = dlopen (soname, RTLD_NOW | RTLD_LOCAL);
  if (h == NULL) {
    snap_error ("cannot load %s (install libnbd0): %s", soname, dlerror ());
    return -1;
  }
#define LIBNBD_RESOLVE(f)                                               \
  if ((*(void **) &libnbd.f = dlsym (h, #f)) == NULL) {                 \
    snap_error ("%s: no symbol %s: %s", soname, #f, dlerror ());        \
    dlclose (h);                                                        \
    libnbd.nbd_create = NULL;                                           \
    return -1;                                                          \
  }
  LIBNBD_FUNCTIONS (LIBNBD_RESOLVE)
#undef LIBNBD_RESOLVE
  return 0;
}
