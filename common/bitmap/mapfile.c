/* nbdkit-snapshot: bitmaps persisted in files ("map files").
 *
 * See mapfile.h for the layout and the durability protocol.  The
 * header is packed and unpacked field by field at fixed offsets in
 * little-endian order, so the format does not depend on the host's
 * byte order or on struct layout.  Page words are converted too (a
 * no-op on little-endian hosts).
 */
#include <config.h>

#include <assert.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "mapfile.h"
#include "sbitmap.h"
#include "util.h"

#define MAPFILE_MAGIC "NBDSNAPM"

/* Header field offsets. */
#define OFF_MAGIC 0
#define OFF_VERSION 8
#define OFF_KIND 12
#define OFF_GRANULARITY 16
#define OFF_RESERVED 20
#define OFF_NBITS 24
#define OFF_CRC 32
#define CRC_LEN 32              /* The CRC covers bytes 0..31. */
#define OFF_SEAL 40
#define OFF_NSET 48
#define OFF_BODY_SUM 56
#define OFF_EXTRA 64
#define OFF_SEAL_CRC 80
#define SEAL_LEN 40             /* The seal's CRC covers bytes 40..79. */
#define MAPFILE_SEAL_MAGIC UINT32_C (0x4c414553)     /* "SEAL" */

/* Pages read at a time when loading. */
#define LOAD_CHUNK_PAGES 32

/* Number of bitmap pages for nbits (the same as sbitmap_init). */
static uint64_t
npages_for (uint64_t nbits)
{
  return nbits / SBITMAP_PAGE_BITS + (nbits % SBITMAP_PAGE_BITS != 0);
}

static off_t
page_offset (uint64_t p)
{
  return MAPFILE_HEADER_SIZE + (off_t) p * SBITMAP_PAGE_BYTES;
}

static const char *
kind_name (uint32_t kind)
{
  switch (kind) {
  case MAPFILE_KIND_LAYER: return "layer";
  case MAPFILE_KIND_DIRTY: return "dirty";
  case MAPFILE_KIND_INTENT: return "intent";
  default: return "unknown";
  }
}

/*----------------------------------------------------------------
 * Header packing
 */

static void
put_le32 (unsigned char *buf, size_t off, uint32_t v)
{
  v = htole32 (v);
  memcpy (&buf[off], &v, sizeof v);
}

static void
put_le64 (unsigned char *buf, size_t off, uint64_t v)
{
  v = htole64 (v);
  memcpy (&buf[off], &v, sizeof v);
}

static uint32_t
get_le32 (const unsigned char *buf, size_t off)
{
  uint32_t v;

  memcpy (&v, &buf[off], sizeof v);
  return le32toh (v);
}

static uint64_t
get_le64 (const unsigned char *buf, size_t off)
{
  uint64_t v;

  memcpy (&v, &buf[off], sizeof v);
  return le64toh (v);
}

static void
pack_header (unsigned char buf[MAPFILE_HEADER_SIZE], uint32_t kind,
             uint32_t granularity, uint64_t nbits)
{
  memset (buf, 0, MAPFILE_HEADER_SIZE);
  memcpy (&buf[OFF_MAGIC], MAPFILE_MAGIC, 8);
  put_le32 (buf, OFF_VERSION, MAPFILE_VERSION);
  put_le32 (buf, OFF_KIND, kind);
  put_le32 (buf, OFF_GRANULARITY, granularity);
  put_le32 (buf, OFF_RESERVED, 0);
  put_le64 (buf, OFF_NBITS, nbits);
  put_le32 (buf, OFF_CRC, snap_crc32 (0, buf, CRC_LEN));
}

/*----------------------------------------------------------------
 * Header validation
 *
 * Checked in this order: magic (is it a map file at all), version (a
 * newer version may lay out or checksum the header differently),
 * checksum (is the header intact), then kind, granularity and nbits
 * against what the caller wants.  Each error names the path and shows
 * the value found and the value wanted.
 */

/* Render the 8 magic bytes printably for an error message. */
static void
format_magic (char *out, size_t outlen, const unsigned char *magic)
{
  size_t n = 0;

  out[0] = '\0';
  for (size_t i = 0; i < 8 && n + 5 < outlen; ++i) {
    unsigned char c = magic[i];
    if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\')
      out[n++] = c;
    else
      n += snprintf (&out[n], outlen - n, "\\x%02x", c);
    out[n] = '\0';
  }
}

static int
check_header (const char *path, const unsigned char *buf, uint32_t kind,
              uint32_t granularity, uint64_t nbits)
{
  uint32_t v, crc, want_crc;
  uint64_t v64;

  if (memcmp (&buf[OFF_MAGIC], MAPFILE_MAGIC, 8) != 0) {
    char found[40];

    format_magic (found, sizeof found, &buf[OFF_MAGIC]);
    snap_error ("%s: bad magic \"%s\", expected \"%s\" (not a map file)",
                path, found, MAPFILE_MAGIC);
    return -1;
  }
  v = get_le32 (buf, OFF_VERSION);
  if (v != MAPFILE_VERSION) {
    snap_error ("%s: unsupported version %" PRIu32 ", expected %d",
                path, v, MAPFILE_VERSION);
    return -1;
  }
  crc = get_le32 (buf, OFF_CRC);
  want_crc = snap_crc32 (0, buf, CRC_LEN);
  if (crc != want_crc) {
    snap_error ("%s: header checksum 0x%08" PRIx32 " does not match "
                "0x%08" PRIx32 " (header is corrupt)",
                path, crc, want_crc);
    return -1;
  }
  v = get_le32 (buf, OFF_KIND);
  if (v != kind) {
    snap_error ("%s: kind %" PRIu32 " (%s), expected %" PRIu32 " (%s)",
                path, v, kind_name (v), kind, kind_name (kind));
    return -1;
  }
  v = get_le32 (buf, OFF_GRANULARITY);
  if (v != granularity) {
    snap_error ("%s: granularity %" PRIu32 ", expected %" PRIu32,
                path, v, granularity);
    return -1;
  }
  v64 = get_le64 (buf, OFF_NBITS);
  if (v64 != nbits) {
    snap_error ("%s: nbits %" PRIu64 ", expected %" PRIu64,
                path, v64, nbits);
    return -1;
  }
  return 0;
}

/*----------------------------------------------------------------
 * Create
 */

int
mapfile_create (const char *path, uint32_t kind,
                uint32_t granularity, uint64_t nbits)
{
  unsigned char header[MAPFILE_HEADER_SIZE];
  uint64_t npages = npages_for (nbits);
  int fd;

  if (!is_power_of_2 (granularity)) {
    snap_error ("%s: granularity %" PRIu32 " is not a power of 2",
                path, granularity);
    return -1;
  }
  /* The file size must fit in off_t. */
  if (npages > (INT64_MAX - MAPFILE_HEADER_SIZE) / SBITMAP_PAGE_BYTES) {
    snap_error ("%s: nbits %" PRIu64 " is too large", path, nbits);
    return -1;
  }

  fd = open (path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd == -1) {
    snap_error ("%s: create: %m", path);
    return -1;
  }
  pack_header (header, kind, granularity, nbits);
  if (full_pwrite (fd, header, sizeof header, 0) == -1) {
    snap_error ("%s: write header: %m", path);
    goto err;
  }
  /* Sparse: every page is a hole until written. */
  if (ftruncate (fd, page_offset (npages)) == -1) {
    snap_error ("%s: ftruncate: %m", path);
    goto err;
  }
  if (fsync (fd) == -1) {
    snap_error ("%s: fsync: %m", path);
    goto err;
  }
  return fd;

 err:
  /* We created the file, so remove the half-made one. */
  close (fd);
  unlink (path);
  return -1;
}

/*----------------------------------------------------------------
 * Seals
 */

/* What page p with these words (host order) adds to body_sum. */
static uint64_t
page_sum (uint64_t p, const uint64_t *words)
{
  uint64_t buf[SBITMAP_PAGE_WORDS];

  for (size_t w = 0; w < SBITMAP_PAGE_WORDS; ++w)
    buf[w] = htole64 (words[w]);
  return snap_mix64 ((p << 32) ^ snap_crc32 (0, buf, sizeof buf));
}

static bool
page_is_zero (const uint64_t *words)
{
  for (size_t w = 0; w < SBITMAP_PAGE_WORDS; ++w)
    if (words[w])
      return false;
  return true;
}

void
mapfile_seal_compute (const struct sbitmap *bm, struct mapfile_seal *seal)
{
  uint64_t words[SBITMAP_PAGE_WORDS];

  seal->nset = sbitmap_count (bm);
  seal->body_sum = 0;
  for (size_t p = 0; p < bm->npages; ++p)
    if (sbitmap_copy_page (bm, p, words) && !page_is_zero (words))
      seal->body_sum += page_sum (p, words);
}

int
mapfile_set_seal_path (int fd, const char *path,
                       const struct mapfile_seal *seal)
{
  int r, e;

  if (fd >= 0)
    return mapfile_set_seal (fd, seal);
  fd = open (path, O_RDWR | O_CLOEXEC);
  if (fd == -1)
    return -1;
  r = mapfile_set_seal (fd, seal);
  e = errno;
  close (fd);
  errno = e;
  return r;
}

int
mapfile_set_seal (int fd, const struct mapfile_seal *seal)
{
  unsigned char buf[SEAL_LEN + 4];

  memset (buf, 0, sizeof buf);
  if (seal) {
    put_le32 (buf, OFF_SEAL - OFF_SEAL, MAPFILE_SEAL_MAGIC);
    put_le64 (buf, OFF_NSET - OFF_SEAL, seal->nset);
    put_le64 (buf, OFF_BODY_SUM - OFF_SEAL, seal->body_sum);
    put_le64 (buf, OFF_EXTRA - OFF_SEAL, seal->extra[0]);
    put_le64 (buf, OFF_EXTRA + 8 - OFF_SEAL, seal->extra[1]);
    put_le32 (buf, OFF_SEAL_CRC - OFF_SEAL, snap_crc32 (0, buf, SEAL_LEN));
  }
  if (full_pwrite (fd, buf, sizeof buf, OFF_SEAL) == -1)
    return -1;
  return fdatasync (fd);
}

/* Read the seal from header: 1 if sealed (*seal set), 0 if not, -1
 * if the seal is damaged (reported).
 */
static int
read_seal (const char *path, const unsigned char *header,
           struct mapfile_seal *seal)
{
  uint32_t crc, want;

  if (get_le32 (header, OFF_SEAL) != MAPFILE_SEAL_MAGIC)
    return 0;
  crc = get_le32 (header, OFF_SEAL_CRC);
  want = snap_crc32 (0, &header[OFF_SEAL], SEAL_LEN);
  if (crc != want) {
    snap_error ("%s: seal checksum 0x%08" PRIx32 " does not match "
                "0x%08" PRIx32 " (the header is damaged)", path, crc, want);
    return -1;
  }
  seal->nset = get_le64 (header, OFF_NSET);
  seal->body_sum = get_le64 (header, OFF_BODY_SUM);
  seal->extra[0] = get_le64 (header, OFF_EXTRA);
  seal->extra[1] = get_le64 (header, OFF_EXTRA + 8);
  return 1;
}

/*----------------------------------------------------------------
 * Open and load
 */

/* Read pages [p, pend) into bm, a chunk at a time.  buf holds
 * LOAD_CHUNK_PAGES pages.  Reads past end of file give zeros.
 */
static int
load_pages (const char *path, int fd, struct sbitmap *bm,
            uint64_t p, uint64_t pend, uint64_t *buf)
{
  while (p < pend) {
    uint64_t n = pend - p;

    if (n > LOAD_CHUNK_PAGES)
      n = LOAD_CHUNK_PAGES;
    if (full_pread (fd, buf, n * SBITMAP_PAGE_BYTES, page_offset (p)) == -1) {
      snap_error ("%s: read page %" PRIu64 ": %m", path, p);
      return -1;
    }
    for (uint64_t i = 0; i < n; ++i) {
      uint64_t *words = &buf[i * SBITMAP_PAGE_WORDS];
      bool zero = true;

      for (size_t w = 0; w < SBITMAP_PAGE_WORDS; ++w) {
        words[w] = le64toh (words[w]);
        if (words[w])
          zero = false;
      }
      if (zero)
        continue;
      if (sbitmap_load_page (bm, p + i, words) == -1) {
        if (errno == EINVAL)
          snap_error ("%s: page %" PRIu64 " has bits set past the end "
                      "of the bitmap (nbits %" PRIu64 "; map file is "
                      "corrupt)", path, p + i, bm->nbits);
        else
          snap_error ("%s: load page %" PRIu64 ": %m", path, p + i);
        return -1;
      }
    }
    p += n;
  }
  return 0;
}

/* Load every page that holds data, skipping holes with SEEK_DATA and
 * SEEK_HOLE.  Pages past end of file are zero.  If the file system
 * does not support SEEK_DATA (EINVAL), read every page.
 */
static int
load_bitmap (const char *path, int fd, off_t size, struct sbitmap *bm)
{
  uint64_t npages = bm->npages;
  off_t end = page_offset (npages), pos = MAPFILE_HEADER_SIZE;
  uint64_t *buf;
  int r = -1;

  if (end > size)
    end = size;
  if (end <= pos)
    return 0;                   /* No pages in the file. */

  buf = malloc (LOAD_CHUNK_PAGES * SBITMAP_PAGE_BYTES);
  if (buf == NULL) {
    snap_error ("%s: malloc: %m", path);
    return -1;
  }

  while (pos < end) {
    off_t data, hole;
    uint64_t p, pend;

    data = lseek (fd, pos, SEEK_DATA);
    if (data == -1) {
      if (errno == ENXIO)       /* No more data after pos. */
        break;
      if (errno == EINVAL) {    /* SEEK_DATA not supported. */
        r = load_pages (path, fd, bm, (pos - MAPFILE_HEADER_SIZE) /
                        SBITMAP_PAGE_BYTES, npages, buf);
        goto out;
      }
      snap_error ("%s: lseek SEEK_DATA: %m", path);
      goto out;
    }
    if (data >= end)
      break;
    hole = lseek (fd, data, SEEK_HOLE);
    if (hole == -1) {
      snap_error ("%s: lseek SEEK_HOLE: %m", path);
      goto out;
    }
    if (hole > end || hole <= data)
      hole = end;
    /* The pages overlapping [data, hole). */
    p = (data - MAPFILE_HEADER_SIZE) / SBITMAP_PAGE_BYTES;
    pend = (hole - MAPFILE_HEADER_SIZE + SBITMAP_PAGE_BYTES - 1) /
      SBITMAP_PAGE_BYTES;
    if (pend > npages)
      pend = npages;
    if (load_pages (path, fd, bm, p, pend, buf) == -1)
      goto out;
    pos = page_offset (pend);
  }
  r = 0;

 out:
  free (buf);
  return r;
}

int
mapfile_open (const char *path, uint32_t kind,
              uint32_t granularity, uint64_t nbits,
              int writable, struct sbitmap *bm)
{
  struct mapfile_seal seal;
  bool sealed;

  return mapfile_open_sealed (path, kind, granularity, nbits, writable, bm,
                              &sealed, &seal);
}

int
mapfile_open_sealed (const char *path, uint32_t kind,
                     uint32_t granularity, uint64_t nbits,
                     int writable, struct sbitmap *bm,
                     bool *sealed, struct mapfile_seal *seal)
{
  unsigned char header[MAPFILE_HEADER_SIZE];
  struct mapfile_seal now;
  struct stat st;
  int fd, r;

  memset (bm, 0, sizeof *bm);
  fd = open (path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
  if (fd == -1) {
    snap_error ("%s: open: %m", path);
    return -1;
  }
  if (fstat (fd, &st) == -1) {
    snap_error ("%s: fstat: %m", path);
    goto err;
  }
  if (st.st_size < MAPFILE_HEADER_SIZE) {
    snap_error ("%s: file is truncated: %jd bytes, expected at least %d "
                "(the header)", path, (intmax_t) st.st_size,
                MAPFILE_HEADER_SIZE);
    goto err;
  }
  if (full_pread (fd, header, sizeof header, 0) == -1) {
    snap_error ("%s: read header: %m", path);
    goto err;
  }
  if (check_header (path, header, kind, granularity, nbits) == -1)
    goto err;
  if (st.st_size < page_offset (npages_for (nbits))) {
    snap_error ("%s: file is truncated: %jd bytes, expected %jd (the map "
                "is damaged)", path, (intmax_t) st.st_size,
                (intmax_t) page_offset (npages_for (nbits)));
    goto err;
  }
  r = read_seal (path, header, seal);
  if (r == -1)
    goto err;
  *sealed = r == 1;

  if (sbitmap_init (bm, nbits) == -1) {
    snap_error ("%s: cannot allocate a bitmap of %" PRIu64 " bits: %m",
                path, nbits);
    goto err;
  }
  if (load_bitmap (path, fd, st.st_size, bm) == -1)
    goto err;
  if (*sealed) {
    mapfile_seal_compute (bm, &now);
    if (now.nset != seal->nset || now.body_sum != seal->body_sum) {
      snap_error ("%s: the bitmap does not match its seal (%" PRIu64
                  " bits set, %" PRIu64 " when sealed%s): the map is "
                  "damaged", path, now.nset, seal->nset,
                  now.nset == seal->nset ? ", and the pages differ" : "");
      goto err;
    }
  }
  return fd;

 err:
  sbitmap_free (bm);
  close (fd);
  return -1;
}

/*----------------------------------------------------------------
 * Write-back
 */

/* A page's chunks held in a batch are a 16-bit mask. */
_Static_assert (SBITMAP_PAGE_CHUNKS <= 16, "chunk mask too small");

/* Make room in batch for one more page, and for all of its words.
 * (The counts double from small: reallocarray fails long before they
 * could wrap.)
 */
static int
batch_reserve (struct mapfile_batch *batch)
{
  void *p;

  if (batch->n == batch->alloc) {
    size_t alloc = batch->alloc ? batch->alloc * 2 : 16;

    if ((p = reallocarray (batch->index, alloc, sizeof (size_t))) == NULL)
      return -1;
    batch->index = p;
    if ((p = reallocarray (batch->first, alloc, sizeof (size_t))) == NULL)
      return -1;
    batch->first = p;
    if ((p = reallocarray (batch->chunks, alloc, sizeof (uint16_t))) == NULL)
      return -1;
    batch->chunks = p;
    batch->alloc = alloc;
  }
  if (batch->walloc - batch->nwords < SBITMAP_PAGE_WORDS) {
    size_t walloc = batch->walloc ? batch->walloc * 2 : SBITMAP_PAGE_WORDS;

    if ((p = reallocarray (batch->words, walloc, sizeof (uint64_t))) == NULL)
      return -1;
    batch->words = p;
    batch->walloc = walloc;
  }
  return 0;
}

/* Append page p, whose words are in page, keeping its non-zero chunks
 * (batch_reserve made room).
 */
static void
batch_append (struct mapfile_batch *batch, size_t p,
              const uint64_t page[SBITMAP_PAGE_WORDS])
{
  uint16_t held = 0;

  batch->index[batch->n] = p;
  batch->first[batch->n] = batch->nwords;
  for (size_t c = 0; c < SBITMAP_PAGE_CHUNKS; ++c) {
    const uint64_t *chunk = &page[c * SBITMAP_CHUNK_WORDS];
    bool zero = true;

    for (size_t w = 0; w < SBITMAP_CHUNK_WORDS && zero; ++w)
      zero = chunk[w] == 0;
    if (zero)
      continue;
    memcpy (&batch->words[batch->nwords], chunk,
            SBITMAP_CHUNK_WORDS * sizeof *chunk);
    batch->nwords += SBITMAP_CHUNK_WORDS;
    held |= 1u << c;
  }
  batch->chunks[batch->n++] = held;
}

void
mapfile_batch_page (const struct mapfile_batch *batch, size_t i,
                    uint64_t out[SBITMAP_PAGE_WORDS])
{
  const uint64_t *from = &batch->words[batch->first[i]];

  assert (i < batch->n);
  for (size_t c = 0; c < SBITMAP_PAGE_CHUNKS; ++c) {
    uint64_t *to = &out[c * SBITMAP_CHUNK_WORDS];

    if (batch->chunks[i] & (1u << c)) {
      memcpy (to, from, SBITMAP_CHUNK_WORDS * sizeof *to);
      from += SBITMAP_CHUNK_WORDS;
    }
    else
      memset (to, 0, SBITMAP_CHUNK_WORDS * sizeof *to);
  }
}

int
mapfile_collect (struct sbitmap *bm, struct mapfile_batch *batch)
{
  uint64_t page[SBITMAP_PAGE_WORDS];

  for (size_t p = 0; p < bm->npages; ++p) {
    /* Cheap check first, so room is only made for dirty pages. */
    if (__atomic_load_n (&bm->dirty[p], __ATOMIC_SEQ_CST) == 0)
      continue;
    /* Reserve before taking: a page is only taken (its dirty mark
     * cleared) once there is room to hold it.
     */
    if (batch_reserve (batch) == -1)
      return -1;
    if (sbitmap_take_dirty (bm, p, page))
      batch_append (batch, p, page);
  }
  return 0;
}

int
mapfile_write_pages (int fd, const struct mapfile_batch *batch)
{
  uint64_t buf[SBITMAP_PAGE_WORDS];

  for (size_t i = 0; i < batch->n; ++i) {
    mapfile_batch_page (batch, i, buf);
    for (size_t w = 0; w < SBITMAP_PAGE_WORDS; ++w)
      buf[w] = htole64 (buf[w]);
    if (full_pwrite (fd, buf, sizeof buf, page_offset (batch->index[i])) == -1)
      return -1;
  }
  return 0;
}

int
mapfile_write (int fd, const struct mapfile_batch *batch)
{
  if (batch->n == 0)
    return 0;
  if (mapfile_write_pages (fd, batch) == -1)
    return -1;
  return fdatasync (fd);
}

void
mapfile_batch_restore (struct sbitmap *bm, const struct mapfile_batch *batch)
{
  for (size_t i = 0; i < batch->n; ++i)
    sbitmap_mark_dirty (bm, batch->index[i]);
}

void
mapfile_batch_free (struct mapfile_batch *batch)
{
  free (batch->index);
  free (batch->first);
  free (batch->chunks);
  free (batch->words);
  memset (batch, 0, sizeof *batch);
}
