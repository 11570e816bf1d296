/* nbdsnap: printing replies, for humans or as JSON.
 *
 * Human output is for reading and may change; --json output is the
 * server's reply without "ok", and its fields are documented as stable
 * in nbdsnap(1).
 */
#include <config.h>

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"
#include "nbdsnap.h"

/* ---- JSON ---- */

int
print_json_reply (const struct command *cmd, const struct json_object *reply,
                  FILE *out)
{
  struct jw w;
  char *text;

  jw_init (&w);
  jw_begin_object (&w);
  {
    json_object_object_foreach ((struct json_object *) reply, key, value) {
      if (strcmp (key, "ok") != 0) {
        jw_key (&w, key);
        jw_value (&w, value);
      }
    }
  }
  jw_end_object (&w);
  text = jw_finish (&w);
  if (text == NULL) {
    snap_error ("%s: cannot write the reply as JSON (out of memory?)",
                cmd->name);
    return -1;
  }
  fprintf (out, "%s\n", text);
  free (text);
  return 0;
}

/* ---- Checkpoints ---- */

/* The members of a checkpoint object (CP in the protocol) that human
 * output uses.  Strings point into the reply.
 */
struct checkpoint {
  const char *name;
  const char *kind;             /* "snapshot", ... */
  const char *mode;             /* "row", ... */
  char created[64];             /* ISO 8601 */
  const char *export;           /* NULL if it has no export */
  const char *dirty_export;     /* dirty/NAME, or NULL */
  uint64_t changed_blocks, changed_bytes, layer_bytes;
  uint64_t disk_bytes;          /* 0 if the server did not say */
  const char *invalidated;      /* when, or NULL */
  int64_t connections;          /* -1 if the server did not say */
};

static bool
need_string (const struct command *cmd, const struct json_object *v,
             const char *key, const char **out)
{
  *out = json_get_string (v, key);
  if (*out == NULL) {
    char what[128];

    snprintf (what, sizeof what, "missing string \"%s\"", key);
    bad_reply (cmd, what);
    return false;
  }
  return true;
}

static bool
need_count (const struct command *cmd, const struct json_object *v,
            const char *key, uint64_t *out)
{
  int64_t i;

  if (!json_get_int (v, key, &i) || i < 0) {
    char what[128];

    snprintf (what, sizeof what, "missing count \"%s\"", key);
    bad_reply (cmd, what);
    return false;
  }
  *out = i;
  return true;
}

static int
get_checkpoint (const struct command *cmd, const struct json_object *v,
                struct checkpoint *cp)
{
  const char *iso;
  int64_t created;

  if (!json_object_is_type (v, json_type_object)) {
    bad_reply (cmd, "a checkpoint is not an object");
    return -1;
  }
  if (!need_string (cmd, v, "name", &cp->name) ||
      !need_string (cmd, v, "kind", &cp->kind) ||
      !need_string (cmd, v, "mode", &cp->mode) ||
      !need_count (cmd, v, "changed_blocks", &cp->changed_blocks) ||
      !need_count (cmd, v, "changed_bytes", &cp->changed_bytes) ||
      !need_count (cmd, v, "layer_bytes", &cp->layer_bytes))
    return -1;
  cp->export = json_get_string (v, "export");
  cp->dirty_export = json_get_string (v, "dirty_export");
  if (!json_get_int (v, "connections", &cp->connections))
    cp->connections = -1;
  {
    int64_t d;
    cp->disk_bytes = json_get_int (v, "disk_bytes", &d) && d > 0 ? d : 0;
  }
  cp->invalidated = json_get_string (v, "invalidated");

  /* Prefer the server's rendering of the time; make one if absent. */
  iso = json_get_string (v, "created_iso");
  if (iso)
    snprintf (cp->created, sizeof cp->created, "%s", iso);
  else if (json_get_int (v, "created", &created))
    iso_time (cp->created, sizeof cp->created, created);
  else {
    bad_reply (cmd, "missing \"created\"");
    return -1;
  }
  return 0;
}

static void
format_changed (char *buf, size_t len, const struct checkpoint *cp)
{
  char human[32];

  snprintf (buf, len, "%" PRIu64 " blocks (%s)", cp->changed_blocks,
            human_size (human, sizeof human, cp->changed_bytes));
}

int
print_list (const struct command *cmd, const struct json_object *reply,
            FILE *out)
{
  const struct json_object *list = json_get (reply, "checkpoints");
  struct checkpoint *cps;
  int name_w = 4, kind_w = 4, created_w = 7;   /* the headings */
  size_t n;

  if (!json_object_is_type (list, json_type_array)) {
    bad_reply (cmd, "missing array \"checkpoints\"");
    return -1;
  }
  n = json_object_array_length (list);
  cps = calloc (n ? n : 1, sizeof *cps);
  if (cps == NULL) {
    snap_error ("calloc: %m");
    return -1;
  }
  for (size_t i = 0; i < n; ++i) {
    if (get_checkpoint (cmd, json_object_array_get_idx (list, i),
                        &cps[i]) == -1) {
      free (cps);
      return -1;
    }
    name_w = MAX (name_w, (int) strlen (cps[i].name));
    kind_w = MAX (kind_w, (int) strlen (cps[i].kind));
    created_w = MAX (created_w, (int) strlen (cps[i].created));
  }

  fprintf (out, "%-*s  %-*s  %-*s  %-9s  %s\n",
           name_w, "NAME", kind_w, "KIND", created_w, "CREATED", "SPACE",
           "CHANGED");
  for (size_t i = 0; i < n; ++i) {
    char changed[64], space[32];

    format_changed (changed, sizeof changed, &cps[i]);
    fprintf (out, "%-*s  %-*s  %-*s  %-9s  %s\n",
             name_w, cps[i].name, kind_w, cps[i].kind,
             created_w, cps[i].created,
             human_size (space, sizeof space, cps[i].disk_bytes), changed);
  }
  for (size_t i = 0; i < n; ++i)
    if (cps[i].invalidated)
      fprintf (out, "%s: snapshot invalidated at %s (the store was full)\n",
               cps[i].name, cps[i].invalidated);
  {
    int64_t total;
    char space[32];
    if (json_get_int (reply, "disk_bytes", &total) && total >= 0)
      fprintf (out, "store: %s on disk\n",
               human_size (space, sizeof space, total));
  }
  free (cps);
  return 0;
}

int
print_info (const struct command *cmd, const struct json_object *reply,
            FILE *out)
{
  struct checkpoint cp;
  char h1[32], h2[32];

  if (get_checkpoint (cmd, json_get (reply, "checkpoint"), &cp) == -1)
    return -1;
  fprintf (out, "name: %s\n", cp.name);
  fprintf (out, "kind: %s\n", cp.kind);
  fprintf (out, "mode: %s\n", cp.mode);
  fprintf (out, "created: %s\n", cp.created);
  fprintf (out, "export: %s\n", cp.export ? cp.export : "(none)");
  if (cp.dirty_export)
    fprintf (out, "dirty export: %s\n", cp.dirty_export);
  fprintf (out, "changed blocks: %" PRIu64 "\n", cp.changed_blocks);
  fprintf (out, "changed bytes: %" PRIu64 " (%s)\n", cp.changed_bytes,
           human_size (h1, sizeof h1, cp.changed_bytes));
  fprintf (out, "layer bytes: %" PRIu64 " (%s)\n", cp.layer_bytes,
           human_size (h2, sizeof h2, cp.layer_bytes));
  fprintf (out, "disk bytes: %" PRIu64 " (%s)\n", cp.disk_bytes,
           human_size (h2, sizeof h2, cp.disk_bytes));
  if (cp.connections >= 0)
    fprintf (out, "connections: %" PRIi64 "\n", cp.connections);
  if (cp.invalidated)
    fprintf (out, "invalidated: %s (a snapshot until the store was full; "
             "its data is gone)\n", cp.invalidated);
  return 0;
}

int
print_create (const struct command *cmd, const struct json_object *reply,
              FILE *out)
{
  struct checkpoint cp;

  if (get_checkpoint (cmd, json_get (reply, "checkpoint"), &cp) == -1)
    return -1;
  if (cp.export)
    fprintf (out, "created %s '%s' (export %s)\n",
             cp.kind, cp.name, cp.export);
  else
    fprintf (out, "created %s '%s'\n", cp.kind, cp.name);
  return 0;
}

int
print_delete (const struct command *cmd, const struct json_object *reply,
              FILE *out)
{
  const char *name;

  if (!need_string (cmd, reply, "deleted", &name))
    return -1;
  fprintf (out, "deleted checkpoint '%s'\n", name);
  return 0;
}
