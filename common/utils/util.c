/* nbdkit-snapshot: small helpers shared by the filter, the tool and tests. */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <libgen.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cleanup.h"
#include "util.h"

/* Slicing by 8: table[k][b] is the CRC of byte b followed by k zero
 * bytes, so eight bytes are folded in with eight lookups.  About five
 * times as fast as a byte at a time; seals sum the CRC of every map
 * page that holds a bit (32 MiB for a full layer of 1 TiB).
 */
static uint32_t crc_table[8][256];

static void
crc_table_init (void)
{
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k)
      c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
    crc_table[0][i] = c;
  }
  for (uint32_t i = 0; i < 256; ++i)
    for (int k = 1; k < 8; ++k)
      crc_table[k][i] = (crc_table[k - 1][i] >> 8) ^
        crc_table[0][crc_table[k - 1][i] & 0xff];
}

uint32_t
snap_crc32 (uint32_t crc, const void *buf, size_t len)
{
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  const unsigned char *p = buf;

  pthread_once (&once, crc_table_init);
  crc = ~crc;
  while (len >= 8) {
    /* The bytes in order, whatever the host's byte order. */
    uint32_t lo = crc ^ ((uint32_t) p[0] | (uint32_t) p[1] << 8 |
                         (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24);
    crc = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^
      crc_table[5][(lo >> 16) & 0xff] ^ crc_table[4][lo >> 24] ^
      crc_table[3][p[4]] ^ crc_table[2][p[5]] ^
      crc_table[1][p[6]] ^ crc_table[0][p[7]];
    p += 8;
    len -= 8;
  }
  while (len--)
    crc = crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
  return ~crc;
}

int
full_pread (int fd, void *buf, size_t count, off_t offset)
{
  char *p = buf;

  while (count > 0) {
    ssize_t r = pread (fd, p, count, offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    if (r == 0) {               /* End of file: the rest reads as zeros. */
      memset (p, 0, count);
      return 0;
    }
    p += r;
    offset += r;
    count -= r;
  }
  return 0;
}

int
full_pwrite (int fd, const void *buf, size_t count, off_t offset)
{
  const char *p = buf;

  while (count > 0) {
    ssize_t r = pwrite (fd, p, count, offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    p += r;
    offset += r;
    count -= r;
  }
  return 0;
}

int64_t
snap_now_ns (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * INT64_C (1000000000) + ts.tv_nsec;
}

void
snap_sleep_ms (int ms)
{
  struct timespec ts = { .tv_sec = ms / 1000,
                         .tv_nsec = (ms % 1000) * 1000000L };

  nanosleep (&ts, NULL);
}

int
fsync_dir (const char *dir)
{
  CLEANUP_CLOSE int fd = open (dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

  if (fd == -1)
    return -1;
  return fsync (fd);
}

int
mkdir_durable (const char *dir, mode_t mode)
{
  CLEANUP_FREE char *copy = strdup (dir);

  if (copy == NULL)
    return -1;
  if (mkdir (dir, mode) == -1 && errno != EEXIST)
    return -1;
  return fsync_dir (dirname (copy));
}

int
write_file_atomic (const char *dir, const char *name,
                   const void *data, size_t len)
{
  CLEANUP_FREE char *tmp = NULL, *path = NULL;
  int fd;

  if (asprintf (&tmp, "%s/.%s.tmp", dir, name) == -1 ||
      asprintf (&path, "%s/%s", dir, name) == -1)
    return -1;
  fd = open (tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd == -1)
    return -1;
  if (full_pwrite (fd, data, len, 0) == -1 || fsync (fd) == -1) {
    int e = errno;
    close (fd);
    unlink (tmp);
    errno = e;
    return -1;
  }
  if (close (fd) == -1 || rename (tmp, path) == -1) {
    int e = errno;
    unlink (tmp);
    errno = e;
    return -1;
  }
  /* The new file is in place: say so even if syncing the directory
   * fails, so the caller does not act as if the old one were.
   */
  return fsync_dir (dir) == -1 ? 1 : 0;
}

const char *
snap_name_invalid (const char *name)
{
  size_t len = strlen (name);

  if (len == 0)
    return "name is empty";
  if (len > SNAP_NAME_MAX)
    return "name is longer than 64 characters";
  if (name[0] == '.' || name[0] == '-')
    return "name must not start with '.' or '-'";
  for (size_t i = 0; i < len; ++i) {
    char c = name[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
          (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-'))
      return "name may contain only letters, digits, '.', '_' and '-'";
  }
  return NULL;
}

char *
snap_escape (const char *s, char *buf, size_t buflen)
{
  size_t n = 0;

  for (; *s && n + 8 < buflen; ++s) {
    unsigned char c = *s;
    if (c >= 0x20 && c < 0x7f && c != '\\')
      buf[n++] = c;
    else
      n += snprintf (&buf[n], buflen - n, "\\x%02x", c);
  }
  if (*s)
    n += snprintf (&buf[n], buflen - n, "...");
  buf[n] = '\0';
  return buf;
}

bool
snap_printable (const char *s)
{
  for (; *s; ++s)
    if ((unsigned char) *s < 0x20 || (unsigned char) *s >= 0x7f)
      return false;
  return true;
}

char *
human_size (char *buf, size_t buflen, uint64_t bytes)
{
  static const char *units[] = { "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
  double v = bytes;
  int u = -1;

  if (bytes < 1024) {
    snprintf (buf, buflen, "%" PRIu64 " B", bytes);
    return buf;
  }
  while (v >= 1024 && u < 5) {
    v /= 1024;
    u++;
  }
  snprintf (buf, buflen, "%.1f %s", v, units[u]);
  return buf;
}

char *
iso_time (char *buf, size_t buflen, int64_t t)
{
  time_t tt = t;
  struct tm tm;

  if (gmtime_r (&tt, &tm) == NULL ||
      strftime (buf, buflen, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
    snprintf (buf, buflen, "%" PRIi64, t);
  return buf;
}

void
raise_fd_limit (void)
{
  struct rlimit rl;

  if (getrlimit (RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit (RLIMIT_NOFILE, &rl);
  }
}

void
name_thread (const char *name)
{
  (void) pthread_setname_np (pthread_self (), name);
}

void
snap_error (const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  snap_verror (fs, args);
  va_end (args);
}
