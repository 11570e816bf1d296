/* nbdkit-snapshot: the store manifest (see manifest.h for the format). */
#include <config.h>

#include <ctype.h>
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

static const char *mode_names[] = { "row", "cbw" };
static const char *strategy_names[] = { "commit", "stream", "move" };

static bool manifest_has_layer (const struct manifest *m, uint64_t id);

char *
manifest_format (const struct manifest *m, size_t *len)
{
  char *buf = NULL;
  size_t size = 0;
  FILE *fp = open_memstream (&buf, &size);
  uint32_t crc;

  if (fp == NULL)
    return NULL;
  fprintf (fp, "nbdkit-snapshot-store %d\n", MANIFEST_VERSION);
  fprintf (fp, "generation %" PRIu64 "\n", m->generation);
  fprintf (fp, "mode %s\n", mode_names[m->mode]);
  fprintf (fp, "block-size %" PRIu32 "\n", m->block_size);
  fprintf (fp, "size %" PRIu64 "\n", m->size);
  fprintf (fp, "next-id %" PRIu64 "\n", m->next_id);
  for (size_t i = 0; i < m->nlayers; ++i)
    fprintf (fp, "layer %" PRIu64 "\n", m->layers[i]);
  for (size_t i = 0; i < m->nckpts; ++i) {
    const struct manifest_checkpoint *c = &m->ckpts[i];
    if (c->kind == CKPT_SNAPSHOT)
      fprintf (fp, "checkpoint %s kind=snapshot created=%" PRIi64
               " layer=%" PRIu64 " map=%" PRIu64 "\n",
               c->name, c->created, c->layer, c->map);
    else if (c->invalidated)
      fprintf (fp, "checkpoint %s kind=bitmap created=%" PRIi64
               " map=%" PRIu64 " invalidated=%" PRIi64 "\n",
               c->name, c->created, c->map, c->invalidated);
    else
      fprintf (fp, "checkpoint %s kind=bitmap created=%" PRIi64
               " map=%" PRIu64 "\n", c->name, c->created, c->map);
  }
  if (m->origin_retired)
    fprintf (fp, "origin retired\n");
  if (m->job.kind == JOB_DELETE)
    fprintf (fp, "job %" PRIu64 " delete %s strategy=%s keep-bitmap=%d "
             "output=%s\n", m->job.id, m->job.name,
             strategy_names[m->job.strategy],
             m->job.keep_bitmap, m->job.output[0] ? m->job.output : "-");
  else if (m->job.kind == JOB_REVERT)
    fprintf (fp, "job %" PRIu64 " revert %s\n", m->job.id, m->job.name);
  for (size_t i = 0; i < m->ndrops; ++i)
    fprintf (fp, "drop %" PRIu64 "\n", m->drops[i]);
  if (m->has_sample)
    fprintf (fp, "origin-sample 0x%016" PRIx64 "\n", m->origin_sample);
  if (m->has_origin_file)
    fprintf (fp, "origin-file dev=%" PRIu64 " ino=%" PRIu64 "\n",
             m->origin_dev, m->origin_ino);
  if (m->origin_path[0])
    fprintf (fp, "origin-path %s\n", m->origin_path);
  if (fflush (fp) == EOF) {
    fclose (fp);
    free (buf);
    return NULL;
  }
  crc = snap_crc32 (0, buf, size);
  fprintf (fp, "crc 0x%08" PRIx32 "\n", crc);
  if (fclose (fp) == EOF) {
    free (buf);
    return NULL;
  }
  *len = size;
  return buf;
}

/* Append id to the array *ids of *n (a drop line: duplicates are
 * removed by check_refs).  Return 0, or -1 with errno set.
 */
static int
add_id (uint64_t **ids, size_t *n, uint64_t id)
{
  uint64_t *p = realloc (*ids, (*n + 1) * sizeof *p);

  if (p == NULL)
    return -1;
  *ids = p;
  p[(*n)++] = id;
  return 0;
}

static int
cmp_u64 (const void *a, const void *b)
{
  const uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;

  return x < y ? -1 : x > y;
}

/* Checkpoints by name, and in the list's order among equal names. */
static int
cmp_ckpt_name (const void *a, const void *b)
{
  const struct manifest_checkpoint *x = *(const struct manifest_checkpoint
                                          *const *) a;
  const struct manifest_checkpoint *y = *(const struct manifest_checkpoint
                                          *const *) b;
  const int r = strcmp (x->name, y->name);

  return r ? r : (x < y ? -1 : x > y);
}

/* Whether the ascending array ids of n holds id. */
static bool
sorted_has (const uint64_t *ids, size_t n, uint64_t id)
{
  return n > 0 && bsearch (&id, ids, n, sizeof *ids, cmp_u64) != NULL;
}

/* The checks beyond the syntax (manifest.h) of the parsed m, on sorted
 * copies of its names and ids, so that a manifest of n lines costs
 * O(n log n) however many checkpoints it lists.  The drop list is
 * sorted and loses its duplicates.  Return 0, or -1 after snap_error.
 */
static int
check_refs (const char *where, struct manifest *m)
{
  CLEANUP_FREE const struct manifest_checkpoint **by_name = NULL;
  CLEANUP_FREE uint64_t *maps = NULL;
  const struct manifest_checkpoint *last_snap = NULL;
  size_t n;

  /* Layer ids increase (the parser checks), so m->layers is sorted. */
  if (m->nlayers > 0 && m->layers[m->nlayers - 1] >= m->next_id) {
    snap_error ("%s: next-id %" PRIu64 " is not above every layer id",
                where, m->next_id);
    return -1;
  }
  by_name = malloc ((m->nckpts + 1) * sizeof *by_name);
  maps = malloc ((m->nckpts + 1) * sizeof *maps);
  if (by_name == NULL || maps == NULL) {
    snap_error ("%s: %m", where);
    return -1;
  }
  for (size_t i = 0; i < m->nckpts; ++i) {
    by_name[i] = &m->ckpts[i];
    maps[i] = m->ckpts[i].map;
  }
  qsort (by_name, m->nckpts, sizeof *by_name, cmp_ckpt_name);
  for (size_t i = 1; i < m->nckpts; ++i)
    if (strcmp (by_name[i - 1]->name, by_name[i]->name) == 0) {
      snap_error ("%s: checkpoint '%s' appears twice", where,
                  by_name[i]->name);
      return -1;
    }

  for (size_t i = 0; i < m->nckpts; ++i) {
    const struct manifest_checkpoint *c = &m->ckpts[i];
    if (c->map == 0 || c->map >= m->next_id) {
      snap_error ("%s: checkpoint '%s' names map %" PRIu64
                  " outside 1..next-id", where, c->name, c->map);
      return -1;
    }
    if (sorted_has (m->layers, m->nlayers, c->map)) {
      snap_error ("%s: checkpoint '%s' names map %" PRIu64 ", which is "
                  "a layer (the store is damaged)", where, c->name, c->map);
      return -1;
    }
    if (c->kind != CKPT_SNAPSHOT)
      continue;
    /* Snapshots name layers in order: two naming the same are next to
     * each other.
     */
    if (c->layer >= m->next_id || (last_snap && c->layer < last_snap->layer)) {
      snap_error ("%s: snapshot '%s' names layer %" PRIu64
                  " out of order", where, c->name, c->layer);
      return -1;
    }
    if (!sorted_has (m->layers, m->nlayers, c->layer)) {
      snap_error ("%s: snapshot '%s' names layer %" PRIu64 ", which the "
                  "manifest does not list (the store is damaged)",
                  where, c->name, c->layer);
      return -1;
    }
    if (last_snap && last_snap->layer == c->layer) {
      snap_error ("%s: snapshots '%s' and '%s' both name layer %" PRIu64
                  " (the store is damaged)", where, last_snap->name,
                  c->name, c->layer);
      return -1;
    }
    last_snap = c;
  }
  qsort (maps, m->nckpts, sizeof *maps, cmp_u64);
  for (size_t i = 1; i < m->nckpts; ++i)
    if (maps[i - 1] == maps[i]) {
      snap_error ("%s: map %" PRIu64 " is named by two checkpoints "
                  "(the store is damaged)", where, maps[i]);
      return -1;
    }

  if (m->job.kind != JOB_NONE) {
    ssize_t ci = manifest_find_checkpoint (m, m->job.name);
    if (ci < 0 || m->ckpts[ci].kind != CKPT_SNAPSHOT) {
      snap_error ("%s: job %" PRIu64 " names '%s', which is not a snapshot "
                  "(the store is damaged)", where, m->job.id, m->job.name);
      return -1;
    }
    /* Its id came from next-id like any other (a revert's map is named
     * after it, and dropped once it ends).
     */
    if (m->job.id == 0 || m->job.id >= m->next_id) {
      snap_error ("%s: job %" PRIu64 " has an id outside 1..next-id "
                  "(the store is damaged)", where, m->job.id);
      return -1;
    }
    /* A row delete commits or streams; a cbw delete moves, and has no
     * output.
     */
    if (m->job.kind == JOB_DELETE &&
        (m->mode == MODE_CBW
         ? m->job.strategy != STRATEGY_MOVE || m->job.output[0] != '\0'
         : m->job.strategy == STRATEGY_MOVE)) {
      snap_error ("%s: job %" PRIu64 " is a delete by %s%s, which a %s "
                  "store does not make (the store is damaged)",
                  where, m->job.id, strategy_names[m->job.strategy],
                  m->job.output[0] ? " with an output" : "",
                  mode_names[m->mode]);
      return -1;
    }
  }

  if (m->ndrops > 0)
    qsort (m->drops, m->ndrops, sizeof *m->drops, cmp_u64);
  n = 0;
  for (size_t i = 0; i < m->ndrops; ++i) {
    const uint64_t id = m->drops[i];
    if (n > 0 && m->drops[n - 1] == id)
      continue;
    if (id >= m->next_id || sorted_has (m->layers, m->nlayers, id) ||
        sorted_has (maps, m->nckpts, id) ||
        (m->job.kind == JOB_REVERT && m->job.id == id)) {
      snap_error ("%s: drop %" PRIu64 " names an id %s (the store is "
                  "damaged)", where, id,
                  id >= m->next_id ? "not below next-id" : "in use");
      return -1;
    }
    m->drops[n++] = id;
  }
  m->ndrops = n;
  return 0;
}

/* Parse an unsigned decimal number that fills the whole string. */
static int
parse_u64 (const char *s, uint64_t *out)
{
  char *end;

  if (*s < '0' || *s > '9')
    return -1;
  errno = 0;
  *out = strtoull (s, &end, 10);
  if (errno || *end)
    return -1;
  return 0;
}

int
manifest_parse (const char *where, const char *text, size_t len,
                struct manifest *m)
{
  CLEANUP_FREE char *copy = NULL;
  char *line, *next;
  int lineno = 0;
  bool seen_crc = false, seen_header = false;
  unsigned seen = 0;            /* bit mask of required keys seen */
  enum { K_GEN = 1, K_MODE = 2, K_BS = 4, K_SIZE = 8, K_NEXT = 16 };

  memset (m, 0, sizeof *m);
  copy = malloc (len + 1);
  if (copy == NULL) {
    snap_error ("%s: %m", where);
    return -1;
  }
  memcpy (copy, text, len);
  copy[len] = '\0';
  if (strlen (copy) != len) {
    snap_error ("%s: contains a NUL byte: not a manifest", where);
    return -1;
  }

  for (line = copy; *line; line = next) {
    char key[32], arg[128], extra[2];
    uint64_t v;
    int n;

    lineno++;
    next = strchr (line, '\n');
    if (next == NULL) {
      snap_error ("%s: line %d: missing newline (truncated file?)",
                  where, lineno);
      goto err;
    }
    *next++ = '\0';
    if (seen_crc) {
      snap_error ("%s: line %d: text after the crc line", where, lineno);
      goto err;
    }

    if (strncmp (line, "crc ", 4) == 0) {
      uint32_t want = snap_crc32 (0, text, line - copy), found = 0;
      const char *h = line + 6;
      /* "0x" and 1 to 8 hex digits, as manifest_format writes it. */
      if (strncmp (line + 4, "0x", 2) != 0 || *h == '\0' ||
          strlen (h) > 8 ||
          strspn (h, "0123456789abcdefABCDEF") != strlen (h)) {
        snap_error ("%s: line %d: bad crc line", where, lineno);
        goto err;
      }
      for (; *h; ++h)
        found = found << 4 |
          (isdigit ((unsigned char) *h) ? *h - '0' : (*h | 0x20) - 'a' + 10);
      if (found != want) {
        snap_error ("%s: checksum 0x%08" PRIx32 " does not match the "
                    "contents (0x%08" PRIx32 "): the manifest is damaged",
                    where, found, want);
        goto err;
      }
      seen_crc = true;
      continue;
    }

    n = sscanf (line, "%31s %127s %1s", key, arg, extra);
    if (!seen_header) {
      if (n != 2 || strcmp (key, "nbdkit-snapshot-store") != 0) {
        snap_error ("%s: not an nbdkit-snapshot store manifest", where);
        goto err;
      }
      if (parse_u64 (arg, &v) == -1 || v != MANIFEST_VERSION) {
        snap_error ("%s: store format version %s, expected %d",
                    where, arg, MANIFEST_VERSION);
        goto err;
      }
      seen_header = true;
      continue;
    }

    if (strcmp (key, "checkpoint") == 0) {
      struct manifest_checkpoint c = { .layer = 0 };
      char name[SNAP_NAME_MAX + 2];
      int end = -1;
      if (sscanf (line, "checkpoint %65s kind=snapshot created=%" SCNi64
                  " layer=%" SCNu64 " map=%" SCNu64 "%n",
                  name, &c.created, &c.layer, &c.map, &end) == 4 &&
          end >= 0 && line[end] == '\0' && c.layer > 0)
        c.kind = CKPT_SNAPSHOT;
      else if ((end = -1,
                sscanf (line, "checkpoint %65s kind=bitmap created=%" SCNi64
                        " map=%" SCNu64 "%n",
                        name, &c.created, &c.map, &end) == 3) &&
               end >= 0 && line[end] == '\0')
        c.kind = CKPT_BITMAP;
      else if ((end = -1,
                sscanf (line, "checkpoint %65s kind=bitmap created=%" SCNi64
                        " map=%" SCNu64 " invalidated=%" SCNi64 "%n",
                        name, &c.created, &c.map, &c.invalidated,
                        &end) == 4) &&
               end >= 0 && line[end] == '\0' && c.invalidated > 0)
        c.kind = CKPT_BITMAP;
      else {
        snap_error ("%s: line %d: bad checkpoint line", where, lineno);
        goto err;
      }
      if (snap_name_invalid (name)) {
        snap_error ("%s: line %d: invalid name '%s': %s",
                    where, lineno, name, snap_name_invalid (name));
        goto err;
      }
      strcpy (c.name, name);
      if (manifest_add_checkpoint (m, &c) == -1) {
        snap_error ("%s: %m", where);
        goto err;
      }
      continue;
    }

    if (strcmp (key, "job") == 0) {
      struct manifest_job *j = &m->job;
      /* One byte more than a name may have, so a longer one shows. */
      char name[SNAP_NAME_MAX + 2], strat[16], out[4096];
      int kb, end = -1;
      if (j->kind != JOB_NONE) {
        snap_error ("%s: line %d: a second job", where, lineno);
        goto err;
      }
      if (sscanf (line, "job %" SCNu64 " delete %65s strategy=%15s "
                  "keep-bitmap=%d output=%4095s%n",
                  &j->id, name, strat, &kb, out, &end) == 5 &&
          end >= 0 && line[end] == '\0' &&
          (strcmp (strat, "commit") == 0 || strcmp (strat, "stream") == 0 ||
           strcmp (strat, "move") == 0) &&
          (kb == 0 || kb == 1) &&
          (strcmp (out, "-") == 0 || out[0] == '/')) {
        j->kind = JOB_DELETE;
        j->strategy = strcmp (strat, "commit") == 0 ? STRATEGY_COMMIT
          : strcmp (strat, "stream") == 0 ? STRATEGY_STREAM : STRATEGY_MOVE;
        j->keep_bitmap = kb != 0;
        if (strcmp (out, "-") != 0)
          strcpy (j->output, out);
      }
      else if ((end = -1,
                sscanf (line, "job %" SCNu64 " revert %65s%n",
                        &j->id, name, &end) == 2) &&
               end >= 0 && line[end] == '\0')
        j->kind = JOB_REVERT;
      else {
        snap_error ("%s: line %d: bad job line", where, lineno);
        goto err;
      }
      if (snap_name_invalid (name)) {
        snap_error ("%s: line %d: invalid name '%s': %s",
                    where, lineno, name, snap_name_invalid (name));
        goto err;
      }
      strcpy (j->name, name);
      continue;
    }
    if (strcmp (key, "origin") == 0 && n == 2 &&
        strcmp (arg, "retired") == 0) {
      m->origin_retired = true;
      continue;
    }
    if (strcmp (key, "origin-file") == 0) {
      int end = -1;
      if (sscanf (line, "origin-file dev=%" SCNu64 " ino=%" SCNu64 "%n",
                  &m->origin_dev, &m->origin_ino, &end) != 2 ||
          end < 0 || line[end] != '\0') {
        snap_error ("%s: line %d: bad origin-file line", where, lineno);
        goto err;
      }
      m->has_origin_file = true;
      continue;
    }
    if (strcmp (key, "origin-path") == 0) {
      int end = -1;
      if (sscanf (line, "origin-path %4095s%n", m->origin_path, &end) != 1 ||
          end < 0 || line[end] != '\0' || m->origin_path[0] != '/') {
        snap_error ("%s: line %d: bad origin-path line (an absolute path "
                    "without white space)", where, lineno);
        goto err;
      }
      continue;
    }
    if (strcmp (key, "origin-sample") == 0) {
      char *end;
      errno = 0;
      m->origin_sample = strtoull (arg, &end, 16);
      if (n != 2 || strncmp (arg, "0x", 2) != 0 || errno || *end) {
        snap_error ("%s: line %d: bad origin-sample line", where, lineno);
        goto err;
      }
      m->has_sample = true;
      continue;
    }

    if (n != 2) {
      snap_error ("%s: line %d: expected 'KEY VALUE'", where, lineno);
      goto err;
    }
    if (strcmp (key, "mode") == 0) {
      if (strcmp (arg, "row") == 0)
        m->mode = MODE_ROW;
      else if (strcmp (arg, "cbw") == 0)
        m->mode = MODE_CBW;
      else {
        snap_error ("%s: line %d: unknown mode '%s'", where, lineno, arg);
        goto err;
      }
      seen |= K_MODE;
      continue;
    }
    if (parse_u64 (arg, &v) == -1) {
      snap_error ("%s: line %d: '%s' is not a number", where, lineno, arg);
      goto err;
    }
    if (strcmp (key, "generation") == 0)
      m->generation = v, seen |= K_GEN;
    else if (strcmp (key, "block-size") == 0) {
      if (!is_power_of_2 (v) || v < 4096 || v > 2 * 1024 * 1024) {
        snap_error ("%s: line %d: block size %" PRIu64
                    " is not a power of 2 from 4096 to 2097152",
                    where, lineno, v);
        goto err;
      }
      m->block_size = v, seen |= K_BS;
    }
    else if (strcmp (key, "size") == 0) {
      /* The most an NBD export (and a file) can hold. */
      if (v > INT64_MAX) {
        snap_error ("%s: line %d: size %" PRIu64 " is too large",
                    where, lineno, v);
        goto err;
      }
      m->size = v, seen |= K_SIZE;
    }
    else if (strcmp (key, "next-id") == 0) {
      if (v > MANIFEST_ID_MAX) {
        snap_error ("%s: line %d: next-id %" PRIu64 " is too large",
                    where, lineno, v);
        goto err;
      }
      m->next_id = v, seen |= K_NEXT;
    }
    else if (strcmp (key, "drop") == 0) {
      if (v == 0 || add_id (&m->drops, &m->ndrops, v) == -1) {
        snap_error ("%s: line %d: %s", where, lineno,
                    v == 0 ? "bad drop line" : strerror (errno));
        goto err;
      }
    }
    else if (strcmp (key, "layer") == 0) {
      if (v == 0 || (m->nlayers > 0 && v <= m->layers[m->nlayers - 1])) {
        snap_error ("%s: line %d: layer ids must increase", where, lineno);
        goto err;
      }
      if (manifest_add_layer (m, v) == -1) {
        snap_error ("%s: %m", where);
        goto err;
      }
    }
    else {
      snap_error ("%s: line %d: unknown key '%s'", where, lineno, key);
      goto err;
    }
  }

  if (!seen_header || !seen_crc) {
    snap_error ("%s: %s", where,
                seen_header ? "no crc line (truncated file?)"
                : "empty file: not a manifest");
    goto err;
  }
  if (seen != (K_GEN | K_MODE | K_BS | K_SIZE | K_NEXT)) {
    snap_error ("%s: a required key is missing", where);
    goto err;
  }
  if (check_refs (where, m) == -1)
    goto err;
  return 0;

 err:
  /* Nothing of a manifest that failed stays (an origin-path read
   * before its line was found wrong, say).
   */
  manifest_free (m);
  memset (m, 0, sizeof *m);
  return -1;
}

int
manifest_load (const char *dir, struct manifest *m)
{
  CLEANUP_FREE char *path = NULL, *buf = NULL;
  CLEANUP_CLOSE int fd = -1;
  struct stat st;

  memset (m, 0, sizeof *m);
  if (asprintf (&path, "%s/%s", dir, MANIFEST_NAME) == -1) {
    snap_error ("asprintf: %m");
    return -1;
  }
  fd = open (path, O_RDONLY | O_CLOEXEC);
  if (fd == -1) {
    if (errno == ENOENT)
      return 0;
    snap_error ("%s: %m", path);
    return -1;
  }
  if (fstat (fd, &st) == -1) {
    snap_error ("%s: fstat: %m", path);
    return -1;
  }
  if (st.st_size > 16 * 1024 * 1024) {
    snap_error ("%s: %" PRIi64 " bytes is too large for a manifest",
                path, (int64_t) st.st_size);
    return -1;
  }
  buf = malloc (st.st_size + 1);
  if (buf == NULL || full_pread (fd, buf, st.st_size, 0) == -1) {
    snap_error ("%s: read: %m", path);
    return -1;
  }
  if (manifest_parse (path, buf, st.st_size, m) == -1)
    return -1;
  return 1;
}

int
manifest_save (const char *dir, struct manifest *m)
{
  CLEANUP_FREE char *text = NULL;
  size_t len;

  int r;

  m->generation++;
  text = manifest_format (m, &len);
  r = text ? write_file_atomic (dir, MANIFEST_NAME, text, len) : -1;
  if (r == -1) {
    m->generation--;
    return -1;
  }
  /* The new manifest is the one in place: the caller must go on from
   * it (undoing the change would leave the files it names missing).
   */
  if (r == 1)
    snap_error ("%s/%s: saved, but syncing the directory failed: %m "
                "(the change may not survive a power failure)",
                dir, MANIFEST_NAME);
  return 0;
}

void
manifest_free (struct manifest *m)
{
  free (m->layers);
  free (m->ckpts);
  free (m->drops);
  m->layers = NULL;
  m->ckpts = NULL;
  m->drops = NULL;
  m->nlayers = m->nckpts = m->ndrops = 0;
}

static bool
manifest_has_layer (const struct manifest *m, uint64_t id)
{
  for (size_t i = 0; i < m->nlayers; ++i)
    if (m->layers[i] == id)
      return true;
  return false;
}

bool
manifest_uses (const struct manifest *m, uint64_t id)
{
  if (manifest_has_layer (m, id))
    return true;
  /* A revert's own map (cbw) is named after its job. */
  if (m->job.kind == JOB_REVERT && m->job.id == id)
    return true;
  for (size_t i = 0; i < m->nckpts; ++i)
    if (m->ckpts[i].map == id)
      return true;
  return false;
}

int
manifest_add_drop (struct manifest *m, uint64_t id)
{
  uint64_t *p;

  for (size_t i = 0; i < m->ndrops; ++i)
    if (m->drops[i] == id)
      return 0;
  p = realloc (m->drops, (m->ndrops + 1) * sizeof *p);
  if (p == NULL)
    return -1;
  m->drops = p;
  m->drops[m->ndrops++] = id;
  return 0;
}

ssize_t
manifest_find_checkpoint (const struct manifest *m, const char *name)
{
  for (size_t i = 0; i < m->nckpts; ++i)
    if (strcmp (m->ckpts[i].name, name) == 0)
      return i;
  return -1;
}

int
manifest_add_layer (struct manifest *m, uint64_t id)
{
  uint64_t *p = realloc (m->layers, (m->nlayers + 1) * sizeof *p);

  if (p == NULL)
    return -1;
  m->layers = p;
  m->layers[m->nlayers++] = id;
  return 0;
}

int
manifest_add_checkpoint (struct manifest *m,
                         const struct manifest_checkpoint *c)
{
  struct manifest_checkpoint *p;

  p = realloc (m->ckpts, (m->nckpts + 1) * sizeof *p);
  if (p == NULL)
    return -1;
  m->ckpts = p;
  m->ckpts[m->nckpts++] = *c;
  return 0;
}

void
manifest_remove_checkpoint (struct manifest *m, size_t i)
{
  memmove (&m->ckpts[i], &m->ckpts[i + 1],
           (m->nckpts - i - 1) * sizeof m->ckpts[0]);
  m->nckpts--;
}

int
manifest_dup (const struct manifest *src, struct manifest *dst)
{
  *dst = *src;
  dst->layers = malloc ((src->nlayers + 1) * sizeof *dst->layers);
  dst->ckpts = malloc ((src->nckpts + 1) * sizeof *dst->ckpts);
  dst->drops = malloc ((src->ndrops + 1) * sizeof *dst->drops);
  if (dst->layers == NULL || dst->ckpts == NULL || dst->drops == NULL) {
    manifest_free (dst);
    return -1;
  }
  /* An empty list may be NULL, which memcpy must not be given even
   * for 0 bytes.
   */
  if (src->nlayers > 0)
    memcpy (dst->layers, src->layers, src->nlayers * sizeof *dst->layers);
  if (src->nckpts > 0)
    memcpy (dst->ckpts, src->ckpts, src->nckpts * sizeof *dst->ckpts);
  if (src->ndrops > 0)
    memcpy (dst->drops, src->drops, src->ndrops * sizeof *dst->drops);
  return 0;
}

void
manifest_remove_layer (struct manifest *m, uint64_t id)
{
  for (size_t i = 0; i < m->nlayers; ++i)
    if (m->layers[i] == id) {
      memmove (&m->layers[i], &m->layers[i + 1],
               (m->nlayers - i - 1) * sizeof m->layers[0]);
      m->nlayers--;
      return;
    }
}
