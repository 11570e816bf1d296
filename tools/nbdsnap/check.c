/* nbdsnap check: verify a store or a backup chain offline.
 *
 * Like qemu-img check, thin_check and era_check: it reads everything
 * and changes nothing.  The store is read with the same code as the
 * snapstore plugin and the filter (storeread.h), but where they stop at
 * the first problem, check goes on and reports each one, with what it
 * found and what it expected:
 *
 *   - the manifest: its syntax, checksum and consistency (manifest.c);
 *   - the files: each one the manifest names is there, and nothing else
 *     is (sr_scan);
 *   - each layer: its data file is the volume's size, its map's header,
 *     size and seal (with the body checksum) match, the holes of its
 *     data file match the seal, and every page it holds can be read;
 *   - each checkpoint's dirty map: header, size (it covers the volume)
 *     and seal;
 *   - each snapshot's view: built as the plugin builds it; a store
 *     whose origin is retired must hold every page in its layers;
 *   - the origin, when the store records its file: size, inode and
 *     sampled pages.
 *
 * Messages from the common code (snap_error) are caught while a file
 * is checked (main.c's snap_error_hook) and become problems.  Exit
 * status: 0 clean, 2 problems found, 1 error (nothing could be checked).
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cleanup.h"
#include "manifest.h"
#include "storefiles.h"
#include "storeread.h"
#include "util.h"
#include "nbdsnap.h"

#define READ_CHUNK (1024 * 1024)

struct item {
  char *file;                   /* the file concerned, or NULL */
  char *text;
};

struct check {
  const char *dir;              /* absolute */
  const char *file;             /* the file being checked, for messages */
  struct item *problems;
  size_t nproblems;
  struct item *notes;
  size_t nnotes;
  uint64_t bytes_read;
};

/* The check in progress, for the hook. */
static struct check *current;

static void
add_item (struct item **items, size_t *n, const char *file, const char *text)
{
  struct item *p = realloc (*items, (*n + 1) * sizeof *p);

  if (p == NULL)
    return;                     /* out of memory: one less line */
  *items = p;
  p[*n].file = file ? strdup (file) : NULL;
  p[*n].text = strdup (text);
  if (p[*n].text)
    (*n)++;
}

/* Append the formatted text to a list (problems or notes). */
static void
add_vitem (struct item **items, size_t *n, const char *file,
           const char *fs, va_list args)
{
  char *text;

  if (vasprintf (&text, fs, args) == -1)
    return;
  add_item (items, n, file, text);
  free (text);
}

static void
problem (struct check *ck, const char *file, const char *fs, ...)
  __attribute__ ((format (printf, 3, 4)));

static void
problem (struct check *ck, const char *file, const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  add_vitem (&ck->problems, &ck->nproblems, file, fs, args);
  va_end (args);
}

static void
note (struct check *ck, const char *file, const char *fs, ...)
  __attribute__ ((format (printf, 3, 4)));

static void
note (struct check *ck, const char *file, const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  add_vitem (&ck->notes, &ck->nnotes, file, fs, args);
  va_end (args);
}

/* An error from the common code while a file is checked: a problem.
 * "DIR/NAME: what" becomes file NAME, "what".
 */
static void
caught (const char *msg)
{
  struct check *ck = current;
  const size_t dlen = strlen (ck->dir);
  CLEANUP_FREE char *file = NULL;

  if (strncmp (msg, ck->dir, dlen) == 0 && msg[dlen] == '/') {
    const char *name = msg + dlen + 1;
    const char *colon = strstr (name, ": ");

    if (colon) {
      file = strndup (name, colon - name);
      msg = colon + 2;
    }
  }
  add_item (&ck->problems, &ck->nproblems, file ? file : ck->file, msg);
}

static void
scan_report (void *opaque, const char *name, const char *text)
{
  struct check *ck = opaque;

  add_item (&ck->problems, &ck->nproblems, name, text);
}

/* Read every page layer i holds that has data in its file. */
static void
read_layer (struct check *ck, struct storeread *s, size_t i)
{
  const struct sr_layer *l = &s->layers[i];
  CLEANUP_FREE char *buf = malloc (READ_CHUNK);
  CLEANUP_FREE char *data = store_file_path (s->dir, STORE_FILE_LAYER_DATA,
                                             l->id);
  uint64_t p = sbitmap_find_next_set (&l->map, 0);

  if (buf == NULL || data == NULL) {
    problem (ck, NULL, "out of memory reading layer %" PRIu64, l->id);
    return;
  }
  while (p < s->npages) {
    uint64_t e = sbitmap_find_next_clear (&l->map, p);
    uint64_t off = p << STORE_PAGE_SHIFT;
    const uint64_t end = MIN (e << STORE_PAGE_SHIFT, s->size);

    while (off < end) {
      bool is_data;
      uint64_t stop = sr_data_run (l->data_fd, off, end, &is_data);

      for (; is_data && off < stop; ) {
        size_t n = MIN ((uint64_t) READ_CHUNK, stop - off);
        if (full_pread (l->data_fd, buf, n, off) == -1) {
          problem (ck, strrchr (data, '/') + 1, "page %" PRIu64 " the "
                   "layer holds cannot be read: %m (read of %zu bytes at "
                   "offset %" PRIu64 ")", off >> STORE_PAGE_SHIFT, n, off);
          return;               /* one is enough */
        }
        ck->bytes_read += n;
        off += n;
      }
      off = stop;
    }
    p = sbitmap_find_next_set (&l->map, e);
  }
}

/* A view of a store whose origin is retired reads nothing from it. */
static void
check_view (struct check *ck, struct storeread *s, size_t ci)
{
  struct sr_index ix;

  if (sr_view_index (s, ci, &ix) == -1) {
    problem (ck, NULL, "snapshot '%s': building its index: %m",
             s->m.ckpts[ci].name);
    return;
  }
  if (s->m.origin_retired)
    for (size_t r = 0; r < ix.nruns; ++r)
      if (ix.src[r] < 0) {
        problem (ck, MANIFEST_NAME, "snapshot '%s' finds page %" PRIu64
                 " in no layer, but the origin is retired (the oldest layer "
                 "should hold every page)", s->m.ckpts[ci].name,
                 ix.start[r]);
        break;
      }
  sr_index_free (&ix);
}

static int
sample_read (void *opaque, void *buf, uint32_t len, uint64_t offset)
{
  return full_pread (*(int *) opaque, buf, len, offset);
}

/* The origin, when the store records its file. */
static void
check_origin (struct check *ck, const struct manifest *m)
{
  CLEANUP_CLOSE int fd = -1;
  struct stat st;
  uint64_t hash;

  if (m->origin_retired)
    return;
  if (m->origin_path[0] == '\0') {
    note (ck, NULL, "the store does not record its origin's path: not "
          "checked (the snapstore plugin needs base=)");
    return;
  }
  fd = open (m->origin_path, O_RDONLY | O_CLOEXEC);
  if (fd == -1 || fstat (fd, &st) == -1) {
    problem (ck, NULL, "the origin %s: %m", m->origin_path);
    return;
  }
  if (S_ISREG (st.st_mode) && (uint64_t) st.st_size != m->size) {
    problem (ck, NULL, "the origin %s: size %" PRIu64 ", expected %" PRIu64,
             m->origin_path, (uint64_t) st.st_size, m->size);
    return;
  }
  if (S_ISREG (st.st_mode) && m->has_origin_file &&
      ((uint64_t) st.st_dev != m->origin_dev ||
       (uint64_t) st.st_ino != m->origin_ino)) {
    problem (ck, NULL, "the origin %s: device %" PRIu64 ", inode %" PRIu64
             ", expected device %" PRIu64 ", inode %" PRIu64 " (another "
             "file, or a copy)", m->origin_path, (uint64_t) st.st_dev,
             (uint64_t) st.st_ino, m->origin_dev, m->origin_ino);
    return;
  }
  if (m->has_sample) {
    if (store_origin_sample (m->size, sample_read, &fd, &hash) == -1)
      problem (ck, NULL, "the origin %s: read: %m", m->origin_path);
    else if (hash != m->origin_sample)
      problem (ck, NULL, "the origin %s: sampled pages hash to 0x%016"
               PRIx64 ", expected 0x%016" PRIx64 " (it was changed, or it "
               "is another volume)", m->origin_path, hash, m->origin_sample);
  }
}

/* Check everything of the loaded store s. */
static void
check_store (struct check *ck, struct storeread *s)
{
  CLEANUP_FREE bool *ok = calloc (s->nlayers + 1, sizeof *ok);

  if (ok == NULL) {
    problem (ck, NULL, "calloc: %m");
    return;
  }
  if (sr_scan (s, scan_report, ck) == -1)
    problem (ck, NULL, "cannot read the directory");
  for (size_t i = 0; i < s->nlayers; ++i) {
    CLEANUP_FREE char *data = store_file_path (s->dir, STORE_FILE_LAYER_DATA,
                                               s->layers[i].id);
    CLEANUP_FREE char *map = store_file_path (s->dir, STORE_FILE_LAYER_MAP,
                                              s->layers[i].id);
    struct stat st;

    if (data == NULL || map == NULL || stat (data, &st) == -1 ||
        stat (map, &st) == -1)
      continue;                 /* reported missing by the scan */
    ck->file = strrchr (map, '/') + 1;
    if (sr_open_layer (s, i) == 0) {
      ok[i] = true;
      if (!s->layers[i].sealed)
        note (ck, ck->file, "not sealed (the store was not stopped "
              "cleanly): its pages cannot be verified against a checksum");
      read_layer (ck, s, i);
    }
  }
  for (size_t i = 0; i < s->m.nckpts; ++i) {
    CLEANUP_FREE char *path = store_file_path (s->dir, STORE_FILE_DIRTY_MAP,
                                               s->m.ckpts[i].map);
    struct stat st;

    if (path == NULL || stat (path, &st) == -1)
      continue;
    ck->file = strrchr (path, '/') + 1;
    if (sr_open_map (s, i) == 0 && !s->maps_sealed[i])
      note (ck, ck->file, "not sealed (the store was not stopped cleanly)");
  }
  ck->file = NULL;
  for (size_t i = 0; i < s->m.nckpts; ++i) {
    const char *why;

    if (sr_readable (&s->m, i, &why)) {
      size_t lo, hi;
      bool asc, all = true;

      sr_snapshot_view (&s->m, i, &lo, &hi, &asc);
      for (size_t k = lo; k < hi; ++k)
        all &= ok[k];
      if (all)
        check_view (ck, s, i);
    }
    else if (s->m.ckpts[i].kind == CKPT_SNAPSHOT)
      note (ck, NULL, "snapshot '%s' cannot be read: %s",
            s->m.ckpts[i].name, why);
  }
  if (s->m.job.kind != JOB_NONE)
    note (ck, MANIFEST_NAME, "a %s of '%s' (job %" PRIu64 ") was "
          "interrupted: the filter finishes it when it next serves the "
          "store", s->m.job.kind == JOB_DELETE ? "delete" : "revert",
          s->m.job.name, s->m.job.id);
  check_origin (ck, &s->m);
}

static void
print_items (struct jw *w, const struct item *items, size_t n,
             const char *key)
{
  jw_begin_array (w);
  for (size_t i = 0; i < n; ++i) {
    jw_begin_object (w);
    jw_key (w, "file");
    jw_string (w, items[i].file);        /* NULL writes null */
    jw_key (w, key);
    jw_string (w, items[i].text);
    jw_end_object (w);
  }
  jw_end_array (w);
}

static void
free_items (struct item *items, size_t n)
{
  for (size_t i = 0; i < n; ++i) {
    free (items[i].file);
    free (items[i].text);
  }
  free (items);
}

int
run_check (const struct command *cmd, char **operands, FILE *out)
{
  struct check ck = { 0 };
  struct storeread s = { .lock_fd = -1 };
  CLEANUP_FREE char *dir = realpath (operands[0], NULL);
  CLEANUP_FREE char *mpath = NULL;
  struct stat st;
  int lock_fd = -1, r = -1;
  bool loaded;

  if (dir == NULL || stat (dir, &st) == -1) {
    snap_error ("%s: %s: %m", cmd->name, operands[0]);
    return -1;
  }
  if (!S_ISDIR (st.st_mode)) {
    snap_error ("%s: %s: not a directory (a store or a backup chain)",
                cmd->name, operands[0]);
    return -1;
  }
  ck.dir = dir;
  if (sr_lock (dir, &lock_fd) == -1) {
    if (errno == EBUSY)
      snap_error ("%s: %s: the store is in use by a running server: check "
                  "it when the server has stopped", cmd->name, dir);
    return -1;
  }
  if (asprintf (&mpath, "%s/%s", dir, MANIFEST_NAME) == -1) {
    snap_error ("asprintf: %m");
    goto out;
  }
  if (stat (mpath, &st) == -1) {
    /* A store that lost its manifest, or no store at all. */
    ssize_t n;
    s.dir = dir;
    n = sr_scan (&s, scan_report, &ck);
    s.dir = NULL;
    if (n <= 0) {
      snap_error ("%s: %s: no manifest: not a store or a backup chain",
                  cmd->name, dir);
      goto out;
    }
    free_items (ck.problems, ck.nproblems);
    ck.problems = NULL;
    ck.nproblems = 0;
    problem (&ck, MANIFEST_NAME, "missing: the directory holds store "
             "files, but no manifest names them");
  }
  else {
    current = &ck;
    ck.file = MANIFEST_NAME;
    snap_error_hook = caught;
    loaded = sr_load (&s, dir) == 0;
    if (loaded)
      check_store (&ck, &s);
    snap_error_hook = NULL;
    current = NULL;
  }

  if (json_output) {
    struct jw w;
    char *text;

    jw_init (&w);
    jw_begin_object (&w);
    jw_key (&w, "store");
    jw_string (&w, dir);
    jw_key (&w, "clean");
    jw_bool (&w, ck.nproblems == 0);
    jw_key (&w, "problems");
    print_items (&w, ck.problems, ck.nproblems, "problem");
    jw_key (&w, "notes");
    print_items (&w, ck.notes, ck.nnotes, "note");
    jw_key (&w, "layers");
    jw_uint (&w, s.m.nlayers);
    jw_key (&w, "checkpoints");
    jw_uint (&w, s.m.nckpts);
    jw_key (&w, "bytes_read");
    jw_uint (&w, ck.bytes_read);
    jw_end_object (&w);
    text = jw_finish (&w);
    if (text == NULL) {
      snap_error ("%s: out of memory", cmd->name);
      goto out;
    }
    fprintf (out, "%s\n", text);
    free (text);
  }
  else {
    char h[32];

    for (size_t i = 0; i < ck.nproblems; ++i)
      fprintf (out, "%s%s%s\n", ck.problems[i].file ? ck.problems[i].file
               : "", ck.problems[i].file ? ": " : "", ck.problems[i].text);
    for (size_t i = 0; i < ck.nnotes; ++i)
      fprintf (out, "note: %s%s%s\n", ck.notes[i].file ? ck.notes[i].file
               : "", ck.notes[i].file ? ": " : "", ck.notes[i].text);
    if (ck.nproblems)
      fprintf (out, "%s: %zu problem%s found\n", dir, ck.nproblems,
               ck.nproblems == 1 ? "" : "s");
    else
      fprintf (out, "%s: no problems found (%s store, %zu layers, %zu "
               "checkpoints, %s of data read)\n", dir,
               s.m.mode == MODE_CBW ? "cbw" : "row", s.m.nlayers,
               s.m.nckpts, human_size (h, sizeof h, ck.bytes_read));
  }
  r = ck.nproblems ? 2 : 0;

 out:
  if (s.dir)
    sr_close (&s);
  if (lock_fd >= 0)
    close (lock_fd);
  free_items (ck.problems, ck.nproblems);
  free_items (ck.notes, ck.nnotes);
  return r;
}
