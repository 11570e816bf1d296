/* nbdsnap backup: copy an NBD export, or the blocks changed in it,
 * into a file, or as a restore point into a backup chain (chain.c).
 *
 * Notes on the design
 *
 * The command talks NBD only (libnbd), never the control socket.  Two
 * modes share one copy loop:
 *
 *   full        (no --since) FILE is created or truncated to the
 *               export's size, so it starts as zeros: every extent
 *               whose base:allocation status has the ZERO bit is
 *               skipped, and so is a buffer read back as all zeros,
 *               which keeps FILE sparse.
 *   incremental (--since CP) URI's export "snap/TO" becomes
 *               "dirty/CP/TO" and "" (the live volume) becomes
 *               "dirty/CP".  A dirty export reports changed blocks as
 *               data (0) and unchanged ones as hole|zero (3).  Every
 *               extent other than hole|zero is read and written over
 *               the previous backup, zeros included: a changed block
 *               that became all zeros must replace the old data.
 *               hole|zero ranges of FILE are left alone.
 *
 *   chain       (--to DIR, a directory or a path ending in '/') the
 *               copy goes into a new layer of the chain DIR, a sparse
 *               file that starts as zeros like a full backup's FILE.
 *               A full backup fills every page; an incremental one
 *               records the pages of every changed extent (chain.c),
 *               then chain_commit makes the restore point.
 *
 * The loop asks for block status synchronously, up to STATUS_SIZE at a
 * time, and continues from wherever the server's answer stopped (it
 * may answer for less than asked, or for more).  Data extents are
 * split into reads of at most REQUEST_SIZE issued with nbd_aio_pread,
 * keeping up to --requests of them in flight; each completion callback
 * writes its buffer to FILE with pwrite, and the request's free
 * callback releases the buffer (libnbd calls it on every path,
 * including a failed submission or nbd_close with reads in flight).
 * Callbacks run inside nbd_poll or the synchronous block status call,
 * in this single thread, with libnbd's lock held: they call no nbd_*
 * function and record a failure in struct backup instead.
 *
 * Write-back of FILE runs beside the copy: every WRITEBACK_BATCH bytes
 * written, a second thread (struct writeback) starts writing back what
 * is dirty, without waiting for it.  Starting write-back submits the
 * pages to the disk and can block for milliseconds when its queue is
 * full; in that thread the copy goes on meanwhile, and the final fsync
 * (or the chain's fdatasync of its new layer) waits only for the last
 * batch.
 *
 * Progress counts bytes of the export dealt with: skipped extents when
 * they are seen, data when its write completes.  It shows 100% only
 * after the final fsync.
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "libnbd-dl.h"

#include "cleanup.h"
#include "util.h"
#include "nbdsnap.h"
#include "progress.h"

/* Largest read request.  Servers must accept 32 MiB; a smaller
 * maximum advertised by the server wins.
 */
#define REQUEST_SIZE (4 * 1024 * 1024)

/* Block status is asked for this much at a time (well below the 4 GiB
 * that some servers cannot handle).
 */
#define STATUS_SIZE (UINT64_C (1024) * 1024 * 1024)

/* ---- URIs ---- */

/* Find the path of an NBD URI: after "scheme://authority", up to the
 * query ('?') or fragment ('#').  Return false if uri does not start
 * with a scheme and "://".
 */
static bool
uri_path (const char *uri, size_t *start, size_t *end)
{
  size_t scheme = strspn (uri, "abcdefghijklmnopqrstuvwxyz"
                          "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-");
  const char *p;

  if (scheme == 0 || strncmp (uri + scheme, "://", 3) != 0)
    return false;
  p = uri + scheme + 3;
  p += strcspn (p, "/?#");      /* the authority */
  *start = p - uri;
  *end = *start + strcspn (p, "?#");
  return true;
}

static int
hex_digit (char c)
{
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

/* The export name a URI path stands for: the path without its leading
 * '/', %-escapes decoded.  Malloc'd, or NULL with errno set (EINVAL
 * for a bad escape or an escaped NUL).
 */
static char *
export_from_path (const char *path, size_t len)
{
  char *ret, *q;

  if (len > 0 && path[0] == '/') {
    path++;
    len--;
  }
  ret = q = malloc (len + 1);
  if (ret == NULL)
    return NULL;
  for (size_t i = 0; i < len; ++i) {
    if (path[i] == '%') {
      int hi = i + 2 < len ? hex_digit (path[i + 1]) : -1;
      int lo = i + 2 < len ? hex_digit (path[i + 2]) : -1;

      if (hi == -1 || lo == -1 || (hi == 0 && lo == 0)) {
        free (ret);
        errno = EINVAL;
        return NULL;
      }
      *q++ = hi * 16 + lo;
      i += 2;
    }
    else
      *q++ = path[i];
  }
  *q = '\0';
  return ret;
}

/* The URI of the dirty export that holds the changes since checkpoint
 * since, for the volume or snapshot that uri serves: uri with its path
 * replaced.  Malloc'd, or NULL after printing an error.
 */
static char *
dirty_uri (const char *uri, const char *since)
{
  CLEANUP_FREE char *export = NULL;
  const char *to;
  size_t start, end;
  char *ret;
  int r;

  if (!uri_path (uri, &start, &end)) {
    snap_error ("backup: %s: not an NBD URI", uri);
    return NULL;
  }
  export = export_from_path (uri + start, end - start);
  if (export == NULL) {
    if (errno == EINVAL)
      snap_error ("backup: %s: invalid %%-escape in the export name", uri);
    else
      snap_error ("malloc: %m");
    return NULL;
  }

  if (export[0] == '\0')
    r = asprintf (&ret, "%.*s/dirty/%s%s",
                  (int) start, uri, since, uri + end);
  else if (strncmp (export, "snap/", 5) == 0 &&
           snap_name_invalid (to = export + 5) == NULL)
    /* to is a valid name, so it needs no %-escape. */
    r = asprintf (&ret, "%.*s/dirty/%s/%s%s",
                  (int) start, uri, since, to, uri + end);
  else {
    snap_error ("backup: %s: --since needs the live volume (export '') "
                "or a snapshot (export 'snap/NAME'), not export '%s'",
                uri, export);
    return NULL;
  }
  if (r == -1) {
    snap_error ("asprintf: %m");
    return NULL;
  }
  return ret;
}

/* ---- Copying ---- */

struct backup {
  struct nbd_handle *nbd;
  const char *uri;              /* the URI connected to, for messages */
  const char *file;             /* --to */
  int fd;                       /* FILE, open for writing */
  bool full;                    /* no --since: FILE started as zeros */
  bool dest_zero;               /* FILE started as zeros (full, chain) */
  struct chain *chain;          /* --to DIR: the chain written, or NULL */
  const char *point;            /* the chain's new restore point */
  uint64_t size;                /* of the export and FILE */
  size_t request_size;          /* largest read */
  int max_requests;             /* reads in flight at most */

  /* The entries of the last block status reply (length, flags pairs). */
  uint32_t *entries;
  size_t nr_entries, alloc_entries;

  uint64_t bytes_copied;        /* data read (and written unless zero) */
  uint64_t extents;             /* data extents read */
  uint64_t data_end;            /* end of the last one, to merge across
                                   block status calls; UINT64_MAX: none */
  bool started;                 /* the copy has begun */
  bool written;                 /* FILE has been changed */
  bool failed;                  /* an error has been printed */
  uint64_t unkicked;            /* bytes written since the last kick */
  struct writeback *writeback;  /* or NULL */
  struct progress progress;
};

/* A read in flight. */
struct request {
  struct backup *b;
  void *buf;
  uint64_t offset;
  size_t count;
};

/* Report a libnbd failure, unless an earlier one was reported (a dead
 * connection fails the reads in flight first, then the next call).
 */
static void
nbd_failure (struct backup *b, const char *what)
{
  if (!b->failed) {
    progress_abandon (&b->progress);
    snap_error ("backup: %s: %s: %s", b->uri, what, nbd_get_error ());
  }
  b->failed = true;
}

/* Write-back of FILE starts every this many bytes written. */
#define WRITEBACK_BATCH (2 * 1024 * 1024)

/* The thread that starts write-back of FILE when asked. */
struct writeback {
  pthread_t thread;
  pthread_mutex_t lock;
  pthread_cond_t cond;
  int fd;
  bool kick;                    /* asked to start write-back */
  bool stop;
};

static void *
writeback_thread (void *vp)
{
  struct writeback *w = vp;

  pthread_mutex_lock (&w->lock);
  for (;;) {
    while (!w->kick && !w->stop)
      pthread_cond_wait (&w->cond, &w->lock);
    if (!w->kick)
      break;
    w->kick = false;
    pthread_mutex_unlock (&w->lock);
    /* A failure here is harmless: fsync reports errors of the data. */
#ifdef SYNC_FILE_RANGE_WRITE
    (void) sync_file_range (w->fd, 0, 0, SYNC_FILE_RANGE_WRITE);
#endif
    pthread_mutex_lock (&w->lock);
  }
  pthread_mutex_unlock (&w->lock);
  return NULL;
}

/* Start the write-back thread of b->fd.  Without it (no memory, no
 * thread) the copy works the same, and the final sync writes all.
 */
static void
writeback_start (struct backup *b)
{
  struct writeback *w = calloc (1, sizeof *w);

  if (w == NULL)
    return;
  pthread_mutex_init (&w->lock, NULL);
  pthread_cond_init (&w->cond, NULL);
  w->fd = b->fd;
  if (pthread_create (&w->thread, NULL, writeback_thread, w) != 0) {
    pthread_cond_destroy (&w->cond);
    pthread_mutex_destroy (&w->lock);
    free (w);
    return;
  }
  b->writeback = w;
}

/* Stop the thread, once any write-back it is starting is started. */
static void
writeback_stop (struct backup *b)
{
  struct writeback *w = b->writeback;

  if (w == NULL)
    return;
  pthread_mutex_lock (&w->lock);
  w->stop = true;
  pthread_cond_signal (&w->cond);
  pthread_mutex_unlock (&w->lock);
  pthread_join (w->thread, NULL);
  pthread_cond_destroy (&w->cond);
  pthread_mutex_destroy (&w->lock);
  free (w);
  b->writeback = NULL;
}

/* Count n bytes just written to FILE; every WRITEBACK_BATCH bytes ask
 * the write-back thread to start writing back what is dirty.
 */
static void
wrote (struct backup *b, uint64_t n)
{
  struct writeback *w = b->writeback;

  b->unkicked += n;
  if (b->unkicked < WRITEBACK_BATCH || w == NULL)
    return;
  b->unkicked = 0;
  pthread_mutex_lock (&w->lock);
  w->kick = true;
  pthread_cond_signal (&w->cond);
  pthread_mutex_unlock (&w->lock);
}

static bool
is_zero (const char *buf, size_t count)
{
  return count == 0 || (buf[0] == 0 && memcmp (buf, buf + 1, count - 1) == 0);
}

/* A chain's layer holds the pages of zeros it copies as holes (the
 * file starts as one), as the filter's layers hold zeroed pages: write
 * only the runs of pages that are not all zeros.  A copy of the chain
 * that makes holes of zeros (cp, rsync -S) then has the same holes,
 * which the seal of each layer's map records.
 */
static int
write_pages (struct backup *b, const struct request *req)
{
  const char *buf = req->buf;
  const uint64_t page = 4096;
  size_t i = 0;

  while (i < req->count) {
    size_t s, e;

    /* Skip zero pages (page-aligned in the volume). */
    for (s = i; s < req->count; ) {
      size_t n = MIN (req->count - s,
                      (size_t) (page - (req->offset + s) % page));
      if (!is_zero (buf + s, n))
        break;
      s += n;
    }
    for (e = s; e < req->count; ) {
      size_t n = MIN (req->count - e,
                      (size_t) (page - (req->offset + e) % page));
      if (is_zero (buf + e, n))
        break;
      e += n;
    }
    if (e > s &&
        full_pwrite (b->fd, buf + s, e - s, req->offset + s) == -1) {
      progress_abandon (&b->progress);
      snap_error ("backup: %s: write of %zu bytes at offset %" PRIu64 ": %m",
                  b->file, e - s, req->offset + s);
      b->failed = true;
      return -1;
    }
    wrote (b, e - s);
    i = e;
  }
  return 0;
}

/* Completion of a read: write its buffer to FILE.  Returning 1 retires
 * the command.
 */
static int
read_done (void *vp, int *error)
{
  struct request *req = vp;
  struct backup *b = req->b;

  if (b->failed)
    return 1;                   /* the backup is lost anyway */
  if (*error) {
    progress_abandon (&b->progress);
    errno = *error;
    snap_error ("backup: %s: read of %zu bytes at offset %" PRIu64 ": %m",
                b->uri, req->count, req->offset);
    b->failed = true;
    return 1;
  }

  /* In a full backup (and in a chain's new layer) FILE is already zero
   * there.
   */
  if (b->chain) {
    if (write_pages (b, req) == -1)
      return 1;
  }
  else if (!(b->dest_zero && is_zero (req->buf, req->count))) {
    b->written = true;
    if (full_pwrite (b->fd, req->buf, req->count, req->offset) == -1) {
      progress_abandon (&b->progress);
      snap_error ("backup: %s: write of %zu bytes at offset %" PRIu64 ": %m",
                  b->file, req->count, req->offset);
      b->failed = true;
      return 1;
    }
    wrote (b, req->count);
  }
  b->bytes_copied += req->count;
  progress_add (&b->progress, req->count);
  return 1;
}

static void
free_request (void *vp)
{
  struct request *req = vp;

  free (req->buf);
  free (req);
}

/* Wait until fewer than limit reads are in flight (limit 1: none). */
static int
wait_for_reads (struct backup *b, int limit)
{
  for (;;) {
    int n = nbd_aio_in_flight (b->nbd);

    if (n == -1) {
      nbd_failure (b, "nbd_aio_in_flight");
      return -1;
    }
    if (b->failed)
      return -1;
    if (n < limit)
      return 0;
    if (nbd_poll (b->nbd, -1) == -1) {
      nbd_failure (b, "poll");
      return -1;
    }
  }
}

static int
issue_read (struct backup *b, uint64_t offset, size_t count)
{
  struct request *req;

  if (wait_for_reads (b, b->max_requests) == -1)
    return -1;

  req = malloc (sizeof *req);
  if (req == NULL) {
    snap_error ("malloc: %m");
    b->failed = true;
    return -1;
  }
  *req = (struct request) { .b = b, .offset = offset, .count = count };
  req->buf = malloc (count);
  if (req->buf == NULL) {
    snap_error ("malloc: %m");
    free (req);
    b->failed = true;
    return -1;
  }
  /* On failure libnbd has called free_request already. */
  if (nbd_aio_pread (b->nbd, req->buf, count, offset,
                     (nbd_completion_callback) {
                       .callback = read_done,
                       .user_data = req,
                       .free = free_request,
                     }, 0) == -1) {
    nbd_failure (b, "read");
    return -1;
  }
  return 0;
}

/* Deal with one extent at offset, of len bytes within the export. */
static int
copy_extent (struct backup *b, uint64_t offset, uint64_t len,
             uint32_t flags)
{
  const uint32_t hole_zero = LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO;
  bool skip;

  if (b->full)
    skip = (flags & LIBNBD_STATE_ZERO) != 0;
  else
    /* Only unchanged blocks of the dirty export are hole|zero: every
     * other status means data to apply, even zeros.
     */
    skip = (flags & hole_zero) == hole_zero;
  if (skip) {
    progress_add (&b->progress, len);
    return 0;
  }
  /* A changed extent of an incremental backup into a chain: its pages
   * are the new layer's, zeros included.
   */
  if (b->chain && !b->full && chain_record (b->chain, offset, len) == -1) {
    b->failed = true;
    return -1;
  }

  if (offset != b->data_end)
    b->extents++;
  b->data_end = offset + len;
  while (len > 0) {
    size_t n = MIN (len, (uint64_t) b->request_size);

    if (issue_read (b, offset, n) == -1)
      return -1;
    offset += n;
    len -= n;
  }
  return 0;
}

/* Block status callback: keep the base:allocation entries. */
static int
got_extents (void *vp, const char *context, uint64_t offset,
             uint32_t *entries, size_t nr_entries, int *error)
{
  struct backup *b = vp;

  if (strcmp (context, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
    return 0;
  if (b->nr_entries + nr_entries > b->alloc_entries) {
    size_t n = MAX (b->nr_entries + nr_entries, 2 * b->alloc_entries);
    uint32_t *p = realloc (b->entries, n * sizeof *p);

    if (p == NULL) {
      *error = errno;
      return -1;
    }
    b->entries = p;
    b->alloc_entries = n;
  }
  memcpy (&b->entries[b->nr_entries], entries,
          nr_entries * sizeof *entries);
  b->nr_entries += nr_entries;
  return 0;
}

/* Copy every extent of the export that needs copying, then wait for
 * the last reads.  have_status: the server supports base:allocation
 * (without it, a full backup reads everything).
 */
static int
copy_export (struct backup *b, bool have_status)
{
  uint64_t offset = 0;

  while (offset < b->size) {
    uint64_t count = MIN (b->size - offset, STATUS_SIZE);
    uint64_t end = offset;

    if (!have_status) {
      if (copy_extent (b, offset, count, 0) == -1)
        return -1;
      offset += count;
      continue;
    }

    b->nr_entries = 0;
    if (nbd_block_status (b->nbd, count, offset,
                          (nbd_extent_callback) {
                            .callback = got_extents,
                            .user_data = b,
                          }, 0) == -1) {
      char what[64];

      snprintf (what, sizeof what, "block status at offset %" PRIu64,
                offset);
      nbd_failure (b, what);
      return -1;
    }
    if (b->failed)              /* a read failed meanwhile */
      return -1;

    /* The reply may cover less than asked, or run past it: take what
     * it covers, up to the end of the export, and continue from there.
     */
    for (size_t i = 0; i + 1 < b->nr_entries && end < b->size; i += 2) {
      uint64_t len = MIN ((uint64_t) b->entries[i], b->size - end);

      if (len == 0)
        break;
      if (copy_extent (b, end, len, b->entries[i + 1]) == -1)
        return -1;
      end += len;
    }
    if (end == offset) {
      /* We must make forward progress. */
      progress_abandon (&b->progress);
      snap_error ("backup: %s: block status at offset %" PRIu64 ": "
                  "the server described no extent", b->uri, offset);
      b->failed = true;
      return -1;
    }
    offset = end;
  }

  return wait_for_reads (b, 1);
}

/* ---- The command ---- */

/* Connect to b->uri asking for base:allocation.  Set b->nbd, b->size,
 * *have_status and *export (malloc'd).
 */
static int
connect_export (struct backup *b, bool *have_status, char **export)
{
  int64_t size, max;
  int r;

  b->nbd = nbd_create ();
  if (b->nbd == NULL) {
    snap_error ("backup: nbd_create: %s", nbd_get_error ());
    return -1;
  }
  /* URI is the user's, as for nbdcopy and nbdinfo: it may name local
   * files, as in nbds://...?tls-psk-file=FILE.
   */
  if (nbd_add_meta_context (b->nbd, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1 ||
      nbd_set_uri_allow_local_file (b->nbd, true) == -1 ||
      nbd_connect_uri (b->nbd, b->uri) == -1) {
    nbd_failure (b, "connect");
    return -1;
  }

  size = nbd_get_size (b->nbd);
  if (size == -1) {
    nbd_failure (b, "size");
    return -1;
  }
  b->size = size;

  r = nbd_can_meta_context (b->nbd, LIBNBD_CONTEXT_BASE_ALLOCATION);
  if (r == -1) {
    nbd_failure (b, "base:allocation");
    return -1;
  }
  *have_status = r == 1;

  max = nbd_get_block_size (b->nbd, LIBNBD_SIZE_MAXIMUM);
  b->request_size = REQUEST_SIZE;
  if (max > 0 && max < REQUEST_SIZE)
    b->request_size = max;

  *export = nbd_get_export_name (b->nbd);
  if (*export == NULL) {
    nbd_failure (b, "export name");
    return -1;
  }
  return 0;
}

/* Open FILE: in a full backup, create or truncate it to the export's
 * size; in an incremental one it must be the previous backup, of the
 * same size.  Set b->fd.
 */
static int
open_file (struct backup *b)
{
  struct stat st;

  if (b->full) {
    b->fd = open (b->file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (b->fd == -1) {
      snap_error ("backup: %s: %m", b->file);
      return -1;
    }
    b->written = true;          /* truncated: the old contents are gone */
    if (ftruncate (b->fd, b->size) == -1) {
      snap_error ("backup: %s: truncate to %" PRIu64 " bytes: %m",
                  b->file, b->size);
      return -1;
    }
    return 0;
  }

  b->fd = open (b->file, O_WRONLY | O_CLOEXEC);
  if (b->fd == -1) {
    snap_error ("backup: %s: %m", b->file);
    return -1;
  }
  if (fstat (b->fd, &st) == -1) {
    snap_error ("backup: %s: fstat: %m", b->file);
    return -1;
  }
  if (!S_ISREG (st.st_mode) || (uint64_t) st.st_size != b->size) {
    snap_error ("backup: %s: size %" PRIu64 ", expected %" PRIu64
                " (the previous backup of this volume)",
                b->file, S_ISREG (st.st_mode) ? (uint64_t) st.st_size : 0,
                b->size);
    return -1;
  }
  return 0;
}

/* Disconnect and free the handle.  After a failure, reads may still
 * be in flight: let them finish (read_done ignores them) rather than
 * close the socket while the server is sending, which nbdkit 1.32
 * does not always survive (an assertion in raw_send_socket aborts the
 * whole server).  Errors here lose nothing and are ignored.
 */
static void
disconnect (struct backup *b)
{
  if (b->nbd == NULL)
    return;
  b->failed = true;
  while (nbd_aio_in_flight (b->nbd) > 0 && nbd_poll (b->nbd, -1) != -1)
    ;
  nbd_shutdown (b->nbd, 0);
  nbd_close (b->nbd);             /* frees any reads left in flight */
  b->nbd = NULL;
}

/* Say what a failure left in FILE. */
static void
report_failure (const struct backup *b)
{
  if (b->chain)
    snap_error ("backup: %s: the chain is unchanged (the new restore "
                "point's files were removed)", chain_dir (b->chain));
  else if (b->full && b->written)
    snap_error ("backup: %s: the backup is incomplete and must not be "
                "used (%" PRIu64 " bytes copied before the failure)",
                b->file, b->bytes_copied);
  else if (b->written)
    snap_error ("backup: %s: the incremental backup was only partly "
                "applied (%" PRIu64 " bytes): the file is neither the "
                "previous backup nor the new one; run the same command "
                "again to complete it", b->file, b->bytes_copied);
  else if (b->started)
    snap_error ("backup: %s: unchanged, still the previous backup",
                b->file);
}

static int
print_result (const struct backup *b, const char *export, FILE *out)
{
  char h1[32], h2[32];

  if (json_output) {
    struct jw w;
    char *text;

    jw_init (&w);
    jw_begin_object (&w);
    jw_key (&w, "bytes_copied");
    jw_uint (&w, b->bytes_copied);
    jw_key (&w, "extents");
    jw_uint (&w, b->extents);
    jw_key (&w, "size");
    jw_uint (&w, b->size);
    jw_key (&w, "since");
    jw_string (&w, backup_since);       /* NULL writes null */
    jw_key (&w, "export");
    jw_string (&w, export);
    if (b->chain) {
      jw_key (&w, "chain");
      jw_string (&w, chain_dir (b->chain));
      jw_key (&w, "restore_point");
      jw_string (&w, b->point);
    }
    jw_end_object (&w);
    text = jw_finish (&w);
    if (text == NULL) {
      snap_error ("backup: cannot write the result as JSON "
                  "(out of memory?)");
      return -1;
    }
    fprintf (out, "%s\n", text);
    free (text);
    return 0;
  }

  fprintf (out, "copied %" PRIu64 " bytes (%s) in %" PRIu64
           " extents of %" PRIu64 " (%s)",
           b->bytes_copied, human_size (h1, sizeof h1, b->bytes_copied),
           b->extents, b->size, human_size (h2, sizeof h2, b->size));
  if (backup_since)
    fprintf (out, " since %s", backup_since);
  if (b->chain)
    fprintf (out, ": restore point '%s' of %s", b->point,
             chain_dir (b->chain));
  fputc ('\n', out);
  return 0;
}

/* The name of the restore point a backup of uri makes in a chain:
 * --name, or NAME of an export snap/NAME.  Malloc'd, or NULL after an
 * error.
 */
static char *
point_name (const char *uri)
{
  CLEANUP_FREE char *export = NULL;
  const char *why;
  size_t start, end;

  if (backup_name) {
    why = snap_name_invalid (backup_name);
    if (why) {
      snap_error ("backup: --name: invalid name '%s': %s", backup_name, why);
      return NULL;
    }
    return strdup (backup_name);
  }
  if (!uri_path (uri, &start, &end)) {
    snap_error ("backup: %s: not an NBD URI", uri);
    return NULL;
  }
  export = export_from_path (uri + start, end - start);
  if (export && strncmp (export, "snap/", 5) == 0 &&
      snap_name_invalid (export + 5) == NULL)
    return strdup (export + 5);
  snap_error ("backup: %s: the restore point is named after the snapshot "
              "of export snap/NAME; for export '%s' give --name NAME",
              uri, export ? export : "?");
  return NULL;
}

int
run_backup (const struct command *cmd, char **operands, FILE *out)
{
  CLEANUP_FREE char *dirty = NULL;
  CLEANUP_FREE char *export = NULL;
  CLEANUP_FREE char *point = NULL;
  /* --name and --base only make sense for a chain: with them, a new
   * path is a chain to create.
   */
  const bool to_chain = is_chain_target (backup_to) ||
    ((backup_name || backup_base) && access (backup_to, F_OK) == -1);
  struct backup b = {
    .file = backup_to,
    .fd = -1,
    .full = backup_since == NULL,
    .dest_zero = backup_since == NULL || to_chain,
    .max_requests = backup_requests,
    .data_end = UINT64_MAX,
  };
  bool have_status;
  int r = -1;

  if (!to_chain && (backup_name || backup_base)) {
    snap_error ("%s: %s applies to a backup into a chain (--to DIR: a "
                "directory, or a path ending in '/'), and %s is a file",
                cmd->name, backup_name ? "--name" : "--base", backup_to);
    return -1;
  }
  if (backup_base && backup_since == NULL) {
    snap_error ("%s: --base FILE needs --since: it starts a chain over "
                "FILE, the full backup of that checkpoint", cmd->name);
    return -1;
  }
  if (to_chain && (point = point_name (operands[0])) == NULL)
    return -1;
  if (libnbd_load () == -1)
    return -1;
  if (backup_since) {
    const char *why = snap_name_invalid (backup_since);

    if (why) {
      snap_error ("%s: invalid name '%s': %s", cmd->name, backup_since, why);
      return -1;
    }
    dirty = dirty_uri (operands[0], backup_since);
    if (dirty == NULL)
      return -1;
  }
  b.uri = dirty ? dirty : operands[0];
  b.point = point;

  if (progress_init (&b.progress) == -1)
    return -1;

  if (connect_export (&b, &have_status, &export) == -1)
    goto out;
  if (!have_status && !b.full) {
    snap_error ("backup: %s: the server does not report base:allocation, "
                "which says what changed", b.uri);
    goto out;
  }
  if (to_chain) {
    b.chain = chain_begin (backup_to, b.size, backup_since, point,
                           backup_base);
    if (b.chain == NULL)
      goto out;
    b.fd = chain_fd (b.chain);
    b.file = chain_dir (b.chain);
  }
  else if (open_file (&b) == -1)
    goto out;

  b.started = true;
  progress_update (&b.progress, 0, b.size);
  writeback_start (&b);
  if (copy_export (&b, have_status) == -1)
    goto out;
  writeback_stop (&b);
  if (b.chain) {
    if (chain_commit (b.chain) == -1) {
      progress_abandon (&b.progress);
      goto out;
    }
    b.fd = -1;                  /* the chain's: closed by chain_end */
  }
  else {
    if (fsync (b.fd) == -1) {
      progress_abandon (&b.progress);
      snap_error ("backup: %s: fsync: %m", b.file);
      goto out;
    }
    if (close (b.fd) == -1) {
      b.fd = -1;
      progress_abandon (&b.progress);
      snap_error ("backup: %s: close: %m", b.file);
      goto out;
    }
    b.fd = -1;
  }
  progress_finish (&b.progress);
  r = print_result (&b, export, out);

 out:
  if (r == -1) {
    progress_abandon (&b.progress);
    report_failure (&b);
  }
  /* Reads still in flight write to b.fd until they are done. */
  disconnect (&b);
  writeback_stop (&b);
  if (b.chain) {
    b.fd = -1;
    if (r == -1)
      chain_abort (b.chain);
    else
      chain_end (b.chain);
  }
  if (b.fd >= 0)
    close (b.fd);
  free (b.entries);
  return r;
}
