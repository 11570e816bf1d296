/* nbdsnap: commands that start and follow background jobs: delete (of
 * snapshots: a merge), revert, jobs, wait and cancel.  delete and
 * revert --wait start the job, then wait for it as "wait JOB" does.
 *
 * "wait" sends the server a "wait" request for one job it waits for,
 * which returns as soon as that job ends, or after WAIT_BAR_MS (with a
 * progress bar) or WAIT_QUIET_MS, then asks for the job list, until
 * every job it waits for has ended.  It shows the jobs' progress as
 * backup does (progress.c): a bar on stderr when that is a terminal (or
 * with --progress), or "N/100" lines on --progress=FD.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cleanup.h"
#include "json.h"
#include "util.h"
#include "nbdsnap.h"
#include "progress.h"

#define WAIT_BAR_MS 100
#define WAIT_QUIET_MS 1000

/* Options of these commands (main.c). */
const char *delete_strategy = NULL;
const char *delete_output = NULL;
bool delete_keep_bitmap = false;
bool job_wait = false;

static int start_job (const struct command *cmd, struct jw *req, FILE *out,
                      int (*print) (const struct command *cmd,
                                    const struct json_object *reply,
                                    FILE *out));

/* Print one job for humans. */
static void
print_job (FILE *out, const struct json_object *j)
{
  int64_t id = 0, done = 0, total = 0, rate = 0;
  const char *kind = json_get_string (j, "kind");
  const char *name = json_get_string (j, "name");
  const char *state = json_get_string (j, "state");
  const char *strategy = json_get_string (j, "strategy");
  const char *error = json_get_string (j, "error");
  char h1[32], h2[32], h3[32];
  double eta;
  bool paced;

  json_get_int (j, "id", &id);
  json_get_int (j, "bytes_done", &done);
  json_get_int (j, "bytes_total", &total);
  json_get_int (j, "rate_bytes_per_second", &rate);
  fprintf (out, "job %" PRIi64 ": %s %s%s%s: %s, %s of %s (%s/s)",
           id, kind ? kind : "?", name ? name : "?",
           strategy ? " by " : "", strategy ? strategy : "",
           state ? state : "?",
           human_size (h1, sizeof h1, done), human_size (h2, sizeof h2, total),
           human_size (h3, sizeof h3, rate));
  if (json_get_number (j, "eta_seconds", &eta) && state &&
      strcmp (state, "running") == 0)
    fprintf (out, ", %.0f s left", eta);
  if (json_get_bool (j, "paced", &paced) && paced)
    fprintf (out, ", held to snapshot-job-rate while clients are busy");
  if (error)
    fprintf (out, ": %s", error);
  fputc ('\n', out);
}

static int
print_job_reply (const struct command *cmd, const struct json_object *reply,
                 FILE *out)
{
  const struct json_object *j = json_get (reply, "job");
  int64_t cb, sb, mb;

  if (!json_object_is_type (j, json_type_object)) {
    bad_reply (cmd, "missing object \"job\"");
    return -1;
  }
  if (json_get_int (j, "move_bytes", &mb)) {
    char h1[32];
    /* A copy-before-write snapshot: its blocks move to the older one. */
    fprintf (out, "deleting snapshot '%s' by move: %s move into the next "
             "older snapshot\n", json_get_string (j, "name"),
             human_size (h1, sizeof h1, mb));
  }
  else if (json_get_int (j, "commit_bytes", &cb) &&
           json_get_int (j, "stream_bytes", &sb)) {
    char h1[32], h2[32];
    const char *strategy = json_get_string (j, "strategy");
    fprintf (out, "deleting snapshot '%s' by %s: commit moves %s, "
             "stream moves %s\n", json_get_string (j, "name"),
             strategy ? strategy : "?",
             human_size (h1, sizeof h1, cb), human_size (h2, sizeof h2, sb));
    if (json_get_string (j, "output"))
      fprintf (out, "%s will name the merged image: a hard link to %s\n",
               json_get_string (j, "output"),
               strategy && strcmp (strategy, "commit") == 0
               ? "the origin's file" : "the store's merged layer");
  }
  print_job (out, j);
  return 0;
}

/* A snapshot's delete starts a job; a bitmap-only one is just gone. */
static int
print_deleted (const struct command *cmd, const struct json_object *reply,
               FILE *out)
{
  if (json_get (reply, "job"))
    return print_job_reply (cmd, reply, out);
  return print_delete (cmd, reply, out);
}

int
run_delete (const struct command *cmd, char **operands, FILE *out)
{
  CLEANUP_FREE char *abs = NULL;
  struct jw req;

  if (delete_strategy && strcmp (delete_strategy, "auto") != 0 &&
      strcmp (delete_strategy, "commit") != 0 &&
      strcmp (delete_strategy, "stream") != 0) {
    snap_error ("%s: --strategy=%s: expected auto, commit or stream",
                cmd->name, delete_strategy);
    return -1;
  }
  if (delete_output) {
    /* The server needs an absolute path; the file need not exist. */
    CLEANUP_FREE char *d = strdup (delete_output);
    CLEANUP_FREE char *b = strdup (delete_output);
    CLEANUP_FREE char *dir = NULL;

    if (d == NULL || b == NULL) {
      snap_error ("strdup: %m");
      return -1;
    }
    dir = realpath (dirname (d), NULL);
    if (dir == NULL) {
      snap_error ("%s: --output=%s: %m", cmd->name, delete_output);
      return -1;
    }
    if (asprintf (&abs, "%s/%s", strcmp (dir, "/") ? dir : "",
                  basename (b)) == -1) {
      snap_error ("asprintf: %m");
      return -1;
    }
  }

  jw_init (&req);
  jw_begin_object (&req);
  jw_key (&req, "cmd");
  jw_string (&req, "delete");
  jw_key (&req, "name");
  jw_string (&req, operands[0]);
  if (delete_strategy) {
    jw_key (&req, "strategy");
    jw_string (&req, delete_strategy);
  }
  if (abs) {
    jw_key (&req, "output");
    jw_string (&req, abs);
  }
  if (delete_keep_bitmap) {
    jw_key (&req, "keep_bitmap");
    jw_bool (&req, true);
  }
  jw_end_object (&req);
  return start_job (cmd, &req, out, print_deleted);
}

int
run_revert (const struct command *cmd, char **operands, FILE *out)
{
  struct jw req;

  plain_request (&req, cmd, operands);
  return start_job (cmd, &req, out, print_job_reply);
}

int
print_jobs (const struct command *cmd, const struct json_object *reply,
            FILE *out)
{
  const struct json_object *list = json_get (reply, "jobs");
  size_t n;

  if (!json_object_is_type (list, json_type_array)) {
    bad_reply (cmd, "missing array \"jobs\"");
    return -1;
  }
  n = json_object_array_length (list);
  if (n == 0)
    fprintf (out, "no jobs\n");
  for (size_t i = 0; i < n; ++i)
    print_job (out, json_object_array_get_idx (list, i));
  return 0;
}

/* Parse a job id operand. */
static int
parse_job_id (const struct command *cmd, const char *s, int64_t *id)
{
  char *end;

  errno = 0;
  *id = strtoll (s, &end, 10);
  if (errno || *end || end == s || *id <= 0) {
    snap_error ("%s: '%s' is not a job id", cmd->name, s);
    return -1;
  }
  return 0;
}

int
run_cancel (const struct command *cmd, char **operands, FILE *out)
{
  struct jw req;
  int64_t id;

  if (parse_job_id (cmd, operands[0], &id) == -1)
    return -1;
  jw_init (&req);
  jw_begin_object (&req);
  jw_key (&req, "cmd");
  jw_string (&req, "cancel");
  jw_key (&req, "job");
  jw_int (&req, id);
  jw_end_object (&req);
  return control_print (cmd, &req, out, print_job_reply);
}

/* Ask for the job list.  NULL after printing an error. */
static struct json_object *
get_jobs (const struct command *cmd, const struct json_object **list)
{
  struct json_object *reply;
  struct jw req;

  jw_init (&req);
  jw_begin_object (&req);
  jw_key (&req, "cmd");
  jw_string (&req, "jobs");
  jw_end_object (&req);
  reply = control_request (cmd, &req);
  if (reply == NULL)
    return NULL;
  *list = json_get (reply, "jobs");
  if (!json_object_is_type (*list, json_type_array)) {
    bad_reply (cmd, "missing array \"jobs\"");
    json_free (reply);
    return NULL;
  }
  return reply;
}

/* Block until job id ends or ms milliseconds pass (a "wait" request;
 * the caller then reads the job list).  Return 0, or -1 after an
 * error message.
 */
static int
wait_for_job (const struct command *cmd, int64_t id, int ms)
{
  struct json_object *reply;
  struct jw req;

  jw_init (&req);
  jw_begin_object (&req);
  jw_key (&req, "cmd");
  jw_string (&req, "wait");
  jw_key (&req, "job");
  jw_int (&req, id);
  jw_key (&req, "timeout_ms");
  jw_int (&req, ms);
  jw_end_object (&req);
  reply = control_request (cmd, &req);
  if (reply == NULL)
    return -1;
  json_free (reply);
  return 0;
}

static const struct json_object *
find_job (const struct json_object *list, int64_t id)
{
  for (size_t i = 0; i < json_object_array_length (list); ++i) {
    const struct json_object *j = json_object_array_get_idx (list, i);
    int64_t v;
    if (json_get_int (j, "id", &v) && v == id)
      return j;
  }
  return NULL;
}

static bool
is_running (const struct json_object *j)
{
  const char *state = json_get_string (j, "state");
  return state && strcmp (state, "running") == 0;
}

/* Wait until none of the jobs ids[0..nids) is running, showing their
 * progress.  *reply is the last job list asked for (*list in it); the
 * caller frees it.  Return 0, or -1 after an error message (and with
 * *reply freed, and the bar's line ended).
 */
static int
wait_for_jobs (const struct command *cmd, const int64_t *ids, size_t nids,
               struct json_object **reply, const struct json_object **list,
               struct progress *progress)
{
  for (;;) {
    int64_t done = 0, total = 0, running_id = 0;
    bool running = false;

    for (size_t k = 0; k < nids; ++k) {
      const struct json_object *j = find_job (*list, ids[k]);
      int64_t d = 0, t = 0;
      if (j && is_running (j)) {
        running = true;
        running_id = ids[k];
        json_get_int (j, "bytes_done", &d);
        json_get_int (j, "bytes_total", &t);
        done += d;
        total += t;
      }
    }
    if (!running)
      return 0;
    progress_update (progress, done, total);
    json_free (*reply);
    *reply = NULL;
    if (wait_for_job (cmd, running_id,
                      progress_active (progress) ? WAIT_BAR_MS : WAIT_QUIET_MS)
        == -1 ||
        (*reply = get_jobs (cmd, list)) == NULL) {
      progress_abandon (progress);
      return -1;
    }
  }
}

/* A job that ended other than done is an error: say so on stderr,
 * with its line (stdout is dropped on error).  Return 0 or -1.
 */
static int
job_outcome (const struct command *cmd, int64_t id,
             const struct json_object *j)
{
  const char *state = json_get_string (j, "state");

  if (state && strcmp (state, "done") == 0)
    return 0;
  snap_error ("%s: job %" PRIi64 " %s", cmd->name, id,
              state ? state : "ended oddly");
  print_job (stderr, j);
  return -1;
}

/* The jobs ids[0..nids) have ended: finish the progress if every one
 * is done, else end the bar's line for the errors job_outcome prints.
 */
static void
end_progress (struct progress *progress, const struct json_object *list,
              const int64_t *ids, size_t nids)
{
  for (size_t k = 0; k < nids; ++k) {
    const struct json_object *j = find_job (list, ids[k]);
    const char *state = j ? json_get_string (j, "state") : "done";

    if (state == NULL || strcmp (state, "done") != 0) {
      progress_abandon (progress);
      return;
    }
  }
  progress_finish (progress);
}

int
run_wait (const struct command *cmd, char **operands, FILE *out)
{
  struct progress progress;
  CLEANUP_FREE int64_t *ids = NULL;
  size_t nids = 0;
  int ret = 0;
  struct json_object *reply;
  const struct json_object *list;
  struct jw w;

  if (progress_init (&progress) == -1)
    return -1;
  /* The jobs to wait for: JOB, or every job running now. */
  reply = get_jobs (cmd, &list);
  if (reply == NULL)
    return -1;
  ids = calloc (json_object_array_length (list) + 1, sizeof *ids);
  if (ids == NULL) {
    snap_error ("calloc: %m");
    json_free (reply);
    return -1;
  }
  if (operands[0]) {
    if (parse_job_id (cmd, operands[0], &ids[0]) == -1 ||
        find_job (list, ids[0]) == NULL) {
      if (ids[0] > 0)
        snap_error ("%s: no job %" PRIi64, cmd->name, ids[0]);
      json_free (reply);
      return -1;
    }
    nids = 1;
  }
  else
    for (size_t i = 0; i < json_object_array_length (list); ++i) {
      const struct json_object *j = json_object_array_get_idx (list, i);
      if (is_running (j))
        json_get_int (j, "id", &ids[nids++]);
    }

  if (wait_for_jobs (cmd, ids, nids, &reply, &list, &progress) == -1)
    return -1;
  end_progress (&progress, list, ids, nids);

  /* Report each job; one that failed or was cancelled is an error. */
  if (json_output) {
    jw_init (&w);
    jw_begin_object (&w);
    jw_key (&w, "jobs");
    jw_begin_array (&w);
  }
  for (size_t k = 0; k < nids; ++k) {
    const struct json_object *j = find_job (list, ids[k]);

    if (j == NULL)
      continue;                 /* gone from the history: long done */
    if (json_output)
      jw_value (&w, j);
    else
      print_job (out, j);
    if (job_outcome (cmd, ids[k], j) == -1)
      ret = -1;
  }
  if (json_output) {
    CLEANUP_FREE char *text = NULL;
    jw_end_array (&w);
    jw_end_object (&w);
    text = jw_finish (&w);
    if (text)
      fprintf (out, "%s\n", text);
  }
  if (nids == 0 && !json_output)
    fprintf (out, "no jobs running\n");
  json_free (reply);
  return ret;
}

/* Send the request that starts a job (delete, revert) and print the
 * reply with print (or as JSON).  With --wait, then wait for the job:
 * humans get the reply, the progress bar and the job's last line; JSON
 * gets one object, {"job":{...}}, the job as it ended.  A reply without
 * a job (deleting a bitmap-only checkpoint) has nothing to wait for.
 */
static int
start_job (const struct command *cmd, struct jw *req, FILE *out,
           int (*print) (const struct command *cmd,
                         const struct json_object *reply, FILE *out))
{
  struct progress progress;
  struct json_object *reply, *jobs;
  const struct json_object *list, *j;
  int64_t id;
  int r;

  if (job_wait && progress_init (&progress) == -1)
    return -1;
  reply = control_request (cmd, req);
  if (reply == NULL)
    return -1;
  if (!job_wait || (j = json_get (reply, "job")) == NULL ||
      !json_get_int (j, "id", &id)) {
    r = json_output ? print_json_reply (cmd, reply, out)
      : print (cmd, reply, out);
    json_free (reply);
    return r;
  }
  r = json_output ? 0 : print (cmd, reply, out);
  json_free (reply);
  if (r == -1)
    return -1;

  jobs = get_jobs (cmd, &list);
  if (jobs == NULL ||
      wait_for_jobs (cmd, &id, 1, &jobs, &list, &progress) == -1) {
    snap_error ("%s: job %" PRIi64 " was started, but could not be waited "
                "for (see 'nbdsnap jobs')", cmd->name, id);
    return -1;
  }
  j = find_job (list, id);
  if (j == NULL)
    progress_abandon (&progress);
  else
    end_progress (&progress, list, &id, 1);
  if (j == NULL) {
    snap_error ("%s: job %" PRIi64 " is gone from the job list", cmd->name,
                id);
    r = -1;
  }
  else {
    if (json_output) {
      struct jw w;
      CLEANUP_FREE char *text = NULL;

      jw_init (&w);
      jw_begin_object (&w);
      jw_key (&w, "job");
      jw_value (&w, j);
      jw_end_object (&w);
      text = jw_finish (&w);
      if (text)
        fprintf (out, "%s\n", text);
    }
    else
      print_job (out, j);
    r = job_outcome (cmd, id, j);
  }
  json_free (jobs);
  return r;
}
