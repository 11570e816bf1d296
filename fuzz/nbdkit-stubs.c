/* nbdkit-snapshot fuzzing: what nbdkit provides to the filter, for
 * harnesses that link the filter's code into the fuzzer.
 *
 * Messages are formatted (so that a bad argument is found) and printed
 * only with FUZZ_VERBOSE.  The plugin below the filter is a volume in
 * memory (fuzz_origin_*): every context nbdkit_next_context_open
 * returns reads and writes it.
 */
#include <config.h>

#include <errno.h>
#include <pthread.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <nbdkit-filter.h>

#include "filterhost.h"
#include "fuzz.h"
#include "util.h"

/* ---- Messages ---- */

/* nbdkit's header gives these their format attribute only where
 * HAVE_VFPRINTF_PERCENT_M is defined.
 */
void nbdkit_verror (const char *fs, va_list args)
  __attribute__ ((__format__ (__printf__, 1, 0)));
void nbdkit_error (const char *fs, ...)
  __attribute__ ((__format__ (__printf__, 1, 2)));
void nbdkit_debug (const char *fs, ...)
  __attribute__ ((__format__ (__printf__, 1, 2)));

/* The last messages, for a harness to show when a check fails. */
#define NLAST 16
static char last[NLAST][512];
static unsigned nlast;
static pthread_mutex_t last_lock = PTHREAD_MUTEX_INITIALIZER;

/* Format a message of kind ("error", "debug"), keep it, and print it
 * with FUZZ_VERBOSE.
 */
static void message (const char *kind, const char *fs, va_list args)
  __attribute__ ((__format__ (__printf__, 2, 0)));

static void
message (const char *kind, const char *fs, va_list args)
{
  char buf[2048];

  vsnprintf (buf, sizeof buf, fs, args);
  if (fuzz_verbose ())
    fprintf (stderr, "nbdkit: %s: %s\n", kind, buf);
  pthread_mutex_lock (&last_lock);
  snprintf (last[nlast++ % NLAST], sizeof last[0], "%s: %s", kind, buf);
  pthread_mutex_unlock (&last_lock);
}

void
fuzz_print_errors (void)
{
  pthread_mutex_lock (&last_lock);
  for (unsigned i = nlast > NLAST ? nlast - NLAST : 0; i < nlast; ++i)
    fprintf (stderr, "nbdkit: %s\n", last[i % NLAST]);
  pthread_mutex_unlock (&last_lock);
}

void
nbdkit_verror (const char *fs, va_list args)
{
  message ("error", fs, args);
}

void
nbdkit_error (const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  message ("error", fs, args);
  va_end (args);
}

void
nbdkit_debug (const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  message ("debug", fs, args);
  va_end (args);
}

/* ---- Parsing (what the filter's parameters need) ---- */

int64_t
nbdkit_parse_size (const char *str)
{
  char *end;
  int64_t v;

  errno = 0;
  v = strtoll (str, &end, 10);
  if (errno || end == str || v < 0)
    return -1;
  switch (*end) {
  case '\0': return v;
  case 'K': case 'k': return *++end ? -1 : v << 10;
  case 'M': case 'm': return *++end ? -1 : v << 20;
  case 'G': case 'g': return *++end ? -1 : v << 30;
  default: return -1;
  }
}

int
nbdkit_parse_bool (const char *str)
{
  if (strcasecmp (str, "true") == 0 || strcmp (str, "1") == 0)
    return 1;
  if (strcasecmp (str, "false") == 0 || strcmp (str, "0") == 0)
    return 0;
  return -1;
}

/* Interned strings live until the process ends (as in nbdkit, until
 * the connection does): a fixed pool, reused round robin.
 */
const char *
nbdkit_strdup_intern (const char *str)
{
  static char *pool[64];
  static unsigned next;
  char *s = strdup (str);

  if (s == NULL)
    return NULL;
  free (pool[next % 64]);
  pool[next++ % 64] = s;
  return s;
}

/* ---- Exports and extents ---- */

int
nbdkit_add_export (struct nbdkit_exports *exports, const char *name,
                   const char *description)
{
  return 0;
}

struct nbdkit_extents {
  uint64_t start, end;
  size_t n, alloc;
  struct nbdkit_extent *e;
};

struct nbdkit_extents *
nbdkit_extents_new (uint64_t start, uint64_t end)
{
  struct nbdkit_extents *x = calloc (1, sizeof *x);

  if (x == NULL)
    return NULL;
  x->start = start;
  x->end = end;
  return x;
}

void
nbdkit_extents_free (struct nbdkit_extents *x)
{
  if (x) {
    free (x->e);
    free (x);
  }
}

size_t
nbdkit_extents_count (const struct nbdkit_extents *x)
{
  return x->n;
}

struct nbdkit_extent
nbdkit_get_extent (const struct nbdkit_extents *x, size_t i)
{
  if (i >= x->n)
    abort ();
  return x->e[i];
}

int
nbdkit_add_extent (struct nbdkit_extents *x, uint64_t offset,
                   uint64_t length, uint32_t type)
{
  uint64_t expect = x->n ? x->e[x->n - 1].offset + x->e[x->n - 1].length
    : x->start;

  /* nbdkit's rules: extents are contiguous from the start. */
  if (length == 0 || offset + length <= x->start || offset >= x->end)
    return 0;
  if (offset != expect && !(x->n == 0 && offset < x->start)) {
    nbdkit_error ("nbdkit_add_extent: %" PRIu64 " is not contiguous "
                  "with %" PRIu64, offset, expect);
    errno = ERANGE;
    return -1;
  }
  if (x->n == x->alloc) {
    size_t a = x->alloc ? 2 * x->alloc : 16;
    struct nbdkit_extent *e = realloc (x->e, a * sizeof *e);
    if (e == NULL)
      return -1;
    x->e = e;
    x->alloc = a;
  }
  x->e[x->n++] = (struct nbdkit_extent) { offset, length, type };
  return 0;
}

/* ---- The origin: a volume in memory ---- */

static uint8_t *origin;
static uint64_t origin_size;

void
fuzz_origin_set (const uint8_t *data, uint64_t size)
{
  free (origin);
  origin = malloc (size ? size : 1);
  if (origin == NULL)
    abort ();
  if (data)
    memcpy (origin, data, size);
  else {
    /* Every page different: it starts with its number. */
    memset (origin, 0, size);
    for (uint64_t p = 0; p * 4096 < size; ++p)
      snprintf ((char *) origin + p * 4096, MIN (size - p * 4096, 24),
                "page %" PRIu64, p);
  }
  origin_size = size;
}

const uint8_t *
fuzz_origin_get (uint64_t *size)
{
  *size = origin_size;
  return origin;
}

static int
o_prepare (nbdkit_next *next)
{
  return 0;
}

static int64_t
o_get_size (nbdkit_next *next)
{
  return origin_size;
}

static const char *
o_export_description (nbdkit_next *next)
{
  return NULL;
}

static int
o_one (nbdkit_next *next)
{
  return 1;
}

static int
o_zero_cap (nbdkit_next *next)
{
  return 0;
}

static int
o_fua (nbdkit_next *next)
{
  return NBDKIT_FUA_NATIVE;
}

static int
o_block_size (nbdkit_next *next, uint32_t *minimum, uint32_t *preferred,
              uint32_t *maximum)
{
  *minimum = *preferred = *maximum = 0;
  return 0;
}

static int
in_range (uint32_t count, uint64_t offset, int *err)
{
  if (offset > origin_size || count > origin_size - offset) {
    *err = EIO;
    return 0;
  }
  return 1;
}

static int
o_pread (nbdkit_next *next, void *buf, uint32_t count, uint64_t offset,
         uint32_t flags, int *err)
{
  if (!in_range (count, offset, err))
    return -1;
  memcpy (buf, origin + offset, count);
  return 0;
}

static int
o_pwrite (nbdkit_next *next, const void *buf, uint32_t count,
          uint64_t offset, uint32_t flags, int *err)
{
  if (!in_range (count, offset, err))
    return -1;
  memcpy (origin + offset, buf, count);
  return 0;
}

static int
o_flush (nbdkit_next *next, uint32_t flags, int *err)
{
  return 0;
}

static int
o_trim (nbdkit_next *next, uint32_t count, uint64_t offset, uint32_t flags,
        int *err)
{
  return in_range (count, offset, err) ? 0 : -1;
}

static int
o_zero (nbdkit_next *next, uint32_t count, uint64_t offset, uint32_t flags,
        int *err)
{
  if (!in_range (count, offset, err))
    return -1;
  memset (origin + offset, 0, count);
  return 0;
}

static int
o_extents (nbdkit_next *next, uint32_t count, uint64_t offset,
           uint32_t flags, struct nbdkit_extents *extents, int *err)
{
  if (!in_range (count, offset, err))
    return -1;
  return nbdkit_add_extent (extents, offset, count, 0);
}

static int
o_cache (nbdkit_next *next, uint32_t count, uint64_t offset, uint32_t flags,
         int *err)
{
  return in_range (count, offset, err) ? 0 : -1;
}

static struct nbdkit_next_ops origin_ops = {
  .prepare = o_prepare,
  .finalize = o_prepare,
  .get_size = o_get_size,
  .export_description = o_export_description,
  .block_size = o_block_size,
  .can_write = o_one,
  .can_flush = o_one,
  .is_rotational = o_zero_cap,
  .can_trim = o_one,
  .can_zero = o_one,
  .can_fast_zero = o_zero_cap,
  .can_extents = o_one,
  .can_fua = o_fua,
  .can_multi_conn = o_one,
  .can_cache = o_zero_cap,
  .pread = o_pread,
  .pwrite = o_pwrite,
  .flush = o_flush,
  .trim = o_trim,
  .zero = o_zero,
  .extents = o_extents,
  .cache = o_cache,
};

nbdkit_next *
fuzz_origin_next (void)
{
  return &origin_ops;
}

nbdkit_next *
nbdkit_next_context_open (nbdkit_backend *backend, int readonly,
                          const char *exportname, int shared)
{
  return &origin_ops;
}

void
nbdkit_next_context_close (nbdkit_next *next)
{
}
