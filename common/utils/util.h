/* nbdkit-snapshot: small helpers shared by the filter, the tool and tests.
 *
 * Every function here is thread-safe unless it says otherwise.
 */
#ifndef SNAP_UTIL_H
#define SNAP_UTIL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* MIN and MAX evaluate each argument once, and nest (unique names). */
#define SNAP_MINMAX_(a, b, op, u) ({ __typeof__ (a) _a##u = (a);      \
      __typeof__ (b) _b##u = (b); _a##u op _b##u ? _a##u : _b##u; })
#define SNAP_MINMAX(a, b, op, u) SNAP_MINMAX_ (a, b, op, u)
#define MIN(a, b) SNAP_MINMAX (a, b, <, __COUNTER__)
#define MAX(a, b) SNAP_MINMAX (a, b, >, __COUNTER__)

/* Round to a multiple of a power of two. */
#define ROUND_UP(i, n) ({ __typeof__ (n) _n = (n); \
                          ((i) + _n - 1) & ~(__typeof__ (i)) (_n - 1); })
#define ROUND_DOWN(i, n) ((i) & ~(__typeof__ (i)) ((n) - 1))
#define IS_ALIGNED(i, n) (((i) & ((n) - 1)) == 0)

static inline bool
is_power_of_2 (uint64_t v)
{
  return v != 0 && (v & (v - 1)) == 0;
}

/* A 64-bit mix of x (the splitmix64 finaliser): spreads every bit of
 * x over the result, for checksums that add up many small values.
 */
static inline uint64_t
snap_mix64 (uint64_t x)
{
  x ^= x >> 30;
  x *= UINT64_C (0xbf58476d1ce4e5b9);
  x ^= x >> 27;
  x *= UINT64_C (0x94d049bb133111eb);
  x ^= x >> 31;
  return x;
}

/* CLOCK_MONOTONIC in nanoseconds: the clock jobs, pacing and the
 * control socket's waits are timed with.
 */
extern int64_t snap_now_ns (void);

/* Sleep ms milliseconds. */
extern void snap_sleep_ms (int ms);

/* Error reporting used by common/ code.  snap_error is defined here,
 * on top of snap_verror, which each program (the filter, the plugin,
 * nbdsnap, the unit tests) provides: the filter and the plugin forward
 * to nbdkit_verror, nbdsnap prints "nbdsnap: ...".
 */
extern void snap_error (const char *fs, ...)
  __attribute__ ((format (printf, 1, 2)));
extern void snap_verror (const char *fs, va_list args)
  __attribute__ ((format (printf, 1, 0)));

/* CRC-32 (IEEE 802.3, as zlib's crc32) of len bytes, continuing crc
 * (start with 0).
 */
extern uint32_t snap_crc32 (uint32_t crc, const void *buf, size_t len);

/* pread/pwrite the whole buffer, retrying short transfers and EINTR.
 * A read past end of file fills the rest with zeros.  Return 0, or -1
 * with errno set.
 */
extern int full_pread (int fd, void *buf, size_t count, off_t offset);
extern int full_pwrite (int fd, const void *buf, size_t count, off_t offset);

/* Replace the file dir/name with contents atomically: write
 * dir/.name.tmp (mode 0600), fsync it, rename over dir/name, fsync dir.
 * Return 0; -1 with errno set if dir/name is still the old file; 1
 * with errno set if it is the new one but syncing dir failed (the
 * rename may not survive a power failure).
 */
extern int write_file_atomic (const char *dir, const char *name,
                              const void *data, size_t len);

/* fsync the directory dir.  Return 0, or -1 with errno set. */
extern int fsync_dir (const char *dir);

/* Make directory dir (mode) if it does not exist, and fsync the
 * directory that holds it, so that its name survives a power loss
 * (also when an earlier run made it and stopped before that sync).
 * Return 0, or -1 with errno set.
 */
extern int mkdir_durable (const char *dir, mode_t mode);

/* Checkpoint and snapshot names: 1 to 64 of [A-Za-z0-9._-], not
 * starting with '.' or '-'.  Return NULL if name is valid, or a static
 * string saying why not (for "invalid name '%s': %s").
 */
#define SNAP_NAME_MAX 64
extern const char *snap_name_invalid (const char *name);

/* Copy s into buf for a message: printable ASCII as it is, every
 * other byte (and backslash) as \xNN, cut short with "..." if it does
 * not fit.  Returns buf.
 */
extern char *snap_escape (const char *s, char *buf, size_t buflen);

/* Whether s holds only printable ASCII (space to '~'). */
extern bool snap_printable (const char *s);

/* Format an unsigned byte count for humans: "512 B", "4.0 KiB", "1.5 GiB".
 * Returns buf.
 */
extern char *human_size (char *buf, size_t buflen, uint64_t bytes);

/* Format a Unix time as ISO 8601 UTC ("2026-11-29T02:30:00Z").  Returns buf. */
extern char *iso_time (char *buf, size_t buflen, int64_t t);

/* Raise the soft limit on open files to the hard limit: each layer of
 * a store keeps a descriptor open, so many snapshots or a long chain
 * need many.  Failure is ignored (opening then reports EMFILE).
 */
extern void raise_fd_limit (void);

/* Name the calling thread (at most 15 bytes), as ps -L and top -H
 * show it: the filter's own threads are "snap-" something, nbdkit's
 * keep nbdkit's name.  Failure is ignored.
 */
extern void name_thread (const char *name);

#endif /* SNAP_UTIL_H */
