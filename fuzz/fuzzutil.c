/* nbdkit-snapshot fuzzing: helpers shared by the harnesses (fuzz.h). */
#include <config.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fuzz.h"
#include "util.h"

uint8_t
fuzz_u8 (struct fuzz_in *in)
{
  uint8_t v = 0;

  if (in->left > 0) {
    v = in->p[0];
    in->p++;
    in->left--;
  }
  return v;
}

uint16_t
fuzz_u16 (struct fuzz_in *in)
{
  uint16_t lo = fuzz_u8 (in);

  return lo | (uint16_t) fuzz_u8 (in) << 8;
}

uint32_t
fuzz_u32 (struct fuzz_in *in)
{
  uint32_t lo = fuzz_u16 (in);

  return lo | (uint32_t) fuzz_u16 (in) << 16;
}

uint64_t
fuzz_u64 (struct fuzz_in *in)
{
  uint64_t lo = fuzz_u32 (in);

  return lo | (uint64_t) fuzz_u32 (in) << 32;
}

static void
die (const char *what)
{
  perror (what);
  abort ();
}

bool
fuzz_verbose (void)
{
  static int v = -1;

  if (v == -1)
    v = getenv ("FUZZ_VERBOSE") && *getenv ("FUZZ_VERBOSE");
  return v;
}

/* One directory per process, holding one subdirectory per input. */
static char root[256];

static void
remove_root (void)
{
  if (root[0])
    fuzz_rmtree (root);
}

const char *
fuzz_root (void)
{
  if (root[0] == '\0') {
    const char *tmp = getenv ("FUZZ_TMPDIR");
    struct stat st;

    if (tmp == NULL || *tmp == '\0')
      tmp = stat ("/dev/shm", &st) == 0 && S_ISDIR (st.st_mode)
        ? "/dev/shm" : "/tmp";
    snprintf (root, sizeof root, "%s/nbdsnap-fuzz.XXXXXX", tmp);
    if (mkdtemp (root) == NULL)
      die (root);
    atexit (remove_root);
    /* Absolute: the filter compares paths with it (filterhost.c). */
    {
      char *abs = realpath (root, NULL);
      if (abs == NULL || strlen (abs) >= sizeof root)
        die (root);
      strcpy (root, abs);
      free (abs);
    }
  }
  return root;
}

const char *
fuzz_mkdir (void)
{
  static char dir[sizeof root + 16];
  static unsigned n;

  /* A new name each time: a store left behind by a failed cleanup
   * never turns up in the next input.
   */
  snprintf (dir, sizeof dir, "%s/%u", fuzz_root (), n++ % 1000000);
  fuzz_rmtree (dir);
  if (mkdir (dir, 0700) == -1)
    die (dir);
  return dir;
}

static void
rmtree_at (int parent, const char *name)
{
  int fd = openat (parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW |
                   O_CLOEXEC);
  DIR *d;
  struct dirent *e;

  if (fd >= 0) {
    d = fdopendir (fd);
    if (d == NULL) {
      close (fd);
      return;
    }
    while ((e = readdir (d)) != NULL) {
      if (strcmp (e->d_name, ".") == 0 || strcmp (e->d_name, "..") == 0)
        continue;
      if (unlinkat (dirfd (d), e->d_name, 0) == -1 &&
          (errno == EISDIR || errno == EPERM))
        rmtree_at (dirfd (d), e->d_name);
    }
    closedir (d);
    unlinkat (parent, name, AT_REMOVEDIR);
  }
  else
    unlinkat (parent, name, 0);
}

void
fuzz_rmtree (const char *path)
{
  /* FUZZ_KEEP=1 leaves the files for a look (replaying one input). */
  if (getenv ("FUZZ_KEEP") && *getenv ("FUZZ_KEEP")) {
    fprintf (stderr, "fuzz: kept %s\n", path);
    return;
  }
  rmtree_at (AT_FDCWD, path);
}

void
fuzz_write_file (const char *dir, const char *name, const void *data,
                 size_t len)
{
  char path[512];
  int fd;

  snprintf (path, sizeof path, "%s/%s", dir, name);
  fd = open (path, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC,
             0600);
  if (fd == -1)
    die (path);
  if (len > 0 && full_pwrite (fd, data, len, 0) == -1)
    die (path);
  close (fd);
}

size_t
fuzz_fix_manifest (char *buf, size_t len)
{
  size_t line = len, tail;
  char crc[32];

  /* The start of the last line beginning "crc ". */
  for (size_t i = len; i-- > 0; )
    if ((i == 0 || buf[i - 1] == '\n') && len - i >= 4 &&
        memcmp (&buf[i], "crc ", 4) == 0) {
      line = i;
      break;
    }
  if (line == len)
    return len;
  /* Keep what follows that line's end (text after the crc line). */
  tail = line;
  while (tail < len && buf[tail] != '\n')
    tail++;
  snprintf (crc, sizeof crc, "crc 0x%08" PRIx32,
            snap_crc32 (0, buf, line));
  memmove (&buf[line + strlen (crc)], &buf[tail], len - tail);
  memcpy (&buf[line], crc, strlen (crc));
  return line + strlen (crc) + (len - tail);
}

/* The layout of mapfile.h. */
#define MAP_MAGIC "NBDSNAPM"
#define MAP_CRC_OFF 32
#define MAP_SEAL_OFF 40
#define MAP_SEAL_CRC_OFF 80
#define MAP_SEAL_MAGIC 0x4c414553

static void
put_le32 (uint8_t *p, uint32_t v)
{
  p[0] = v;
  p[1] = v >> 8;
  p[2] = v >> 16;
  p[3] = v >> 24;
}

void
fuzz_fix_mapfile (uint8_t *buf, size_t len)
{
  uint32_t seal;

  if (len < MAP_SEAL_CRC_OFF + 4 || memcmp (buf, MAP_MAGIC, 8) != 0)
    return;
  put_le32 (&buf[MAP_CRC_OFF], snap_crc32 (0, buf, MAP_CRC_OFF));
  seal = buf[MAP_SEAL_OFF] | buf[MAP_SEAL_OFF + 1] << 8 |
    buf[MAP_SEAL_OFF + 2] << 16 | (uint32_t) buf[MAP_SEAL_OFF + 3] << 24;
  if (seal == MAP_SEAL_MAGIC)
    put_le32 (&buf[MAP_SEAL_CRC_OFF],
              snap_crc32 (0, &buf[MAP_SEAL_OFF],
                          MAP_SEAL_CRC_OFF - MAP_SEAL_OFF));
}

/* Whether name is a plain file name we are willing to create. */
static bool
good_name (const char *name)
{
  if (name[0] == '\0' || strcmp (name, ".") == 0 || strcmp (name, "..") == 0)
    return false;
  for (const char *p = name; *p; ++p)
    if (*p == '/' || (unsigned char) *p < 0x20 || (unsigned char) *p > 0x7e)
      return false;
  return true;
}

static bool
ends_with (const char *s, const char *suffix)
{
  size_t n = strlen (s), m = strlen (suffix);

  return n >= m && strcmp (s + n - m, suffix) == 0;
}

#define UNPACK_MAX_SIZE (64 * 1024 * 1024)

void
fuzz_unpack (const char *dir, const uint8_t *data, size_t size, bool fix)
{
  struct fuzz_in in = { data, size };

  while (in.left > 0) {
    char name[256], path[512];
    uint8_t namelen = fuzz_u8 (&in);
    uint32_t fsize;
    uint8_t nextents;
    int fd;
    bool is_manifest, is_map;

    if (namelen > in.left)
      namelen = in.left;
    memcpy (name, in.p, namelen);
    name[namelen] = '\0';
    in.p += namelen;
    in.left -= namelen;
    fsize = fuzz_u32 (&in) % (UNPACK_MAX_SIZE + 1);
    nextents = fuzz_u8 (&in);
    is_manifest = strcmp (name, "manifest") == 0;
    is_map = ends_with (name, ".map");

    fd = -1;
    if (good_name (name)) {
      snprintf (path, sizeof path, "%s/%s", dir, name);
      fd = open (path, O_RDWR | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC,
                 0600);
      if (fd >= 0 && ftruncate (fd, fsize) == -1)
        die (path);
    }
    for (unsigned e = 0; e < nextents && in.left > 0; ++e) {
      uint32_t off = fuzz_u32 (&in);
      size_t len = fuzz_u16 (&in);

      if (len > in.left)
        len = in.left;
      if (fd >= 0 && off < fsize) {
        size_t n = len < fsize - off ? len : fsize - off;
        uint8_t *copy = malloc (n + 32);

        if (copy == NULL)
          die ("malloc");
        memcpy (copy, in.p, n);
        if (fix && is_map && off == 0)
          fuzz_fix_mapfile (copy, n);
        if (fix && is_manifest && off == 0 && n == fsize) {
          /* The whole manifest in one extent: it may change length. */
          n = fuzz_fix_manifest ((char *) copy, n);
          if (ftruncate (fd, n) == -1)
            die (path);
        }
        if (full_pwrite (fd, copy, n, off) == -1)
          die (path);
        free (copy);
      }
      in.p += len;
      in.left -= len;
    }
    if (fd >= 0)
      close (fd);
  }
}

/* Call fn (fd, target) for every open descriptor but pipes; return how
 * many.
 */
static int
each_fd (void (*fn) (const char *fd, const char *target))
{
  DIR *d = opendir ("/proc/self/fd");
  struct dirent *e;
  int n = 0;

  if (d == NULL)
    return 0;
  while ((e = readdir (d)) != NULL) {
    char path[64], target[512];
    ssize_t r;

    if (e->d_name[0] == '.' || atoi (e->d_name) == dirfd (d))
      continue;
    snprintf (path, sizeof path, "/proc/self/fd/%s", e->d_name);
    r = readlink (path, target, sizeof target - 1);
    if (r < 0)
      continue;
    target[r] = '\0';
    if (strncmp (target, "pipe:", 5) == 0)
      continue;
    if (fn)
      fn (e->d_name, target);
    n++;
  }
  closedir (d);
  return n;
}

int
fuzz_fds (void)
{
  return each_fd (NULL);
}

static void
print_fd (const char *fd, const char *target)
{
  fprintf (stderr, "  fd %s: %s\n", fd, target);
}

void
fuzz_fds_check (int before)
{
  if (fuzz_fds () > before) {
    fprintf (stderr, "descriptors leaked: %d open before, now:\n", before);
    each_fd (print_fd);
    abort ();
  }
}

void
fuzz_done (const char *dir, int fds)
{
  fuzz_rmtree (dir);
  fuzz_fds_check (fds);
}

size_t
fuzz_subst (char *out, const char *text, size_t len, const char *dir)
{
  const size_t dlen = strlen (dir);
  size_t n = 0;

  for (size_t i = 0; i < len; ) {
    if (len - i >= 5 && memcmp (&text[i], "@DIR@", 5) == 0) {
      memcpy (&out[n], dir, dlen);
      n += dlen;
      i += 5;
    }
    else
      out[n++] = text[i++];
  }
  return n;
}
