/* nbdkit-snapshot: the control socket.
 *
 * One thread serves a Unix socket: each client sends one JSON object
 * per line and gets one JSON object per line back, in order.  Clients
 * are multiplexed with poll(2) on non-blocking sockets, so a slow or
 * broken client cannot stop the others (control_thread).  A line longer than CONTROL_MAX_LINE gets an error reply
 * and is skipped up to its newline; a client that closes its side
 * after a partial line gets a reply to that line, then is closed.
 *
 * Requests change the store under store.control_lock (serialised
 * against each other) and store.lock (against I/O).
 */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <nbdkit-filter.h>

#include "cleanup.h"
#include "control.h"
#include "job.h"
#include "json.h"
#include "origin.h"
#include "store.h"
#include "util.h"

#define CONTROL_MAX_LINE (64 * 1024)
#define CONTROL_MAX_CLIENTS 32

/* Replies a client may leave unread before its requests are no
 * longer read.
 */
#define CONTROL_MAX_BACKLOG (256 * 1024)

struct client {
  int fd;                       /* non-blocking */
  bool skipping;                /* discarding an over-long line */
  bool waiting;                 /* a "wait" awaits its reply */
  bool eof;                     /* no more requests: close when sent */
  bool dead;                    /* gone away: close now */
  uint64_t wait_job;
  int64_t wait_until;           /* snap_now_ns () deadline */
  char *out;                    /* replies not yet sent: */
  size_t out_off, out_len, out_cap;   /* [out_off, out_len) of out */
  size_t len;
  char buf[CONTROL_MAX_LINE + 1];
};

static void client_flush (struct client *c);

static int listen_fd = -1;
static int wake_pipe[2] = { -1, -1 };
static pthread_t thread;
static bool thread_running;
static char *socket_path;       /* what we bound, unlinked at stop */
static struct client *clients[CONTROL_MAX_CLIENTS];
/* Written to (one byte) when a job ends, to answer "wait" requests. */
static int job_pipe[2] = { -1, -1 };
/* The client whose request is being handled (control thread only). */
static struct client *current;

/* ---- Replies ---- */

void
describe_checkpoint (struct jw *w, size_t i)
{
  const struct manifest_checkpoint *c = &store.m.ckpts[i];
  const bool snap = c->kind == CKPT_SNAPSHOT;
  uint64_t changed = ckpt_count_changed (i, store.m.nckpts);
  char when[64];
  CLEANUP_FREE char *export = NULL, *dirty = NULL;

  if (snap && asprintf (&export, "snap/%s", c->name) == -1)
    export = NULL;
  if (asprintf (&dirty, "dirty/%s", c->name) == -1)
    dirty = NULL;
  jw_key (w, "name");
  jw_string (w, c->name);
  jw_key (w, "kind");
  jw_string (w, snap ? "snapshot" : "bitmap");
  jw_key (w, "mode");
  jw_string (w, store.kind->name);
  jw_key (w, "created");
  jw_int (w, c->created);
  jw_key (w, "created_iso");
  jw_string (w, iso_time (when, sizeof when, c->created));
  jw_key (w, "export");
  jw_string (w, export);        /* null for bitmap-only checkpoints */
  jw_key (w, "dirty_export");
  jw_string (w, dirty);
  jw_key (w, "changed_blocks");
  jw_uint (w, changed);
  jw_key (w, "changed_bytes");
  jw_uint (w, MIN (changed * store.block_size, store.size));
  jw_key (w, "layer_bytes");
  jw_uint (w, snap ? store_layer_bytes (c->layer) : 0);
  jw_key (w, "disk_bytes");
  jw_uint (w, store_checkpoint_disk_bytes (i));
  jw_key (w, "connections");
  jw_uint (w, store_connections (i));
  /* Snapshots invalidated when the store was full, and when. */
  jw_key (w, "invalidated");
  if (c->invalidated)
    jw_string (w, iso_time (when, sizeof when, c->invalidated));
  else
    jw_null (w);
}

static char *
error_reply (const char *fs, ...) __attribute__ ((format (printf, 1, 2)));

static char *
error_reply (const char *fs, ...)
{
  CLEANUP_FREE char *msg = NULL;
  struct jw w;
  va_list args;
  int r;

  va_start (args, fs);
  r = vasprintf (&msg, fs, args);
  va_end (args);
  jw_init (&w);
  jw_begin_object (&w);
  jw_key (&w, "ok");
  jw_bool (&w, false);
  jw_key (&w, "error");
  jw_string (&w, r == -1 ? "out of memory" : msg);
  jw_end_object (&w);
  return jw_finish (&w);
}

/* The reply to a request that would change the store after a failed
 * sync (store.h), or NULL if none failed.
 */
static char *
refuse_changes (void)
{
  const char *why = store_failure ();

  if (why == NULL)
    return NULL;
  return error_reply ("the store had an I/O error (%s): it takes no more "
                      "changes until nbdkit restarts", why);
}

static char *
checkpoint_reply (size_t i)
{
  struct jw w;

  jw_init (&w);
  jw_begin_object (&w);
  jw_key (&w, "ok");
  jw_bool (&w, true);
  jw_key (&w, "checkpoint");
  jw_begin_object (&w);
  describe_checkpoint (&w, i);
  jw_end_object (&w);
  jw_end_object (&w);
  return jw_finish (&w);
}

/* ---- Commands ---- */

static char *
cmd_list (const struct json_object *req)
{
  ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
  struct jw w;

  jw_init (&w);
  jw_begin_object (&w);
  jw_key (&w, "ok");
  jw_bool (&w, true);
  jw_key (&w, "store");
  jw_string (&w, store.dir);
  jw_key (&w, "mode");
  jw_string (&w, store.kind->name);
  jw_key (&w, "block_size");
  jw_uint (&w, store.block_size);
  jw_key (&w, "size");
  jw_uint (&w, store.size);
  jw_key (&w, "disk_bytes");
  jw_uint (&w, store_disk_bytes ());
  jw_key (&w, "max_size");
  if (max_size_param)
    jw_uint (&w, max_size_param);
  else
    jw_null (&w);
  jw_key (&w, "checkpoints");
  jw_begin_array (&w);
  for (size_t i = 0; i < store.m.nckpts; ++i) {
    jw_begin_object (&w);
    describe_checkpoint (&w, i);
    jw_end_object (&w);
  }
  jw_end_array (&w);
  jw_end_object (&w);
  return jw_finish (&w);
}

/* The "name" member, validated.  On error return NULL and set *reply. */
static const char *
get_name (const struct json_object *req, char **reply)
{
  const char *name = json_get_string (req, "name");
  const char *why;

  if (name == NULL) {
    *reply = error_reply ("missing \"name\"");
    return NULL;
  }
  why = snap_name_invalid (name);
  if (why) {
    *reply = error_reply ("invalid name '%s': %s", name, why);
    return NULL;
  }
  return name;
}

static char *
cmd_info (const struct json_object *req)
{
  ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
  char *reply = NULL;
  const char *name = get_name (req, &reply);
  ssize_t i;

  if (name == NULL)
    return reply;
  i = manifest_find_checkpoint (&store.m, name);
  if (i == -1)
    return error_reply ("no checkpoint named '%s'", name);
  return checkpoint_reply (i);
}

static char *
cmd_create (const struct json_object *req)
{
  char *reply = NULL;
  const char *name = get_name (req, &reply);
  CLEANUP_FREE char *errmsg = NULL;
  bool bitmap_only = false;
  ssize_t i;

  if (name == NULL || (reply = refuse_changes ()) != NULL)
    return reply;
  if (json_has (req, "bitmap_only") &&
      !json_get_bool (req, "bitmap_only", &bitmap_only))
    return error_reply ("invalid request: \"bitmap_only\" must be true "
                        "or false");
  i = store_create_checkpoint (name, bitmap_only, origin_flush, &errmsg);
  if (i == -1)
    return error_reply ("%s", errmsg ? errmsg : "out of memory");
  {
    ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
    return checkpoint_reply (i);
  }
}

static char *
ok_job_reply (const struct job *j);

/* A client that has just disconnected from snap/NAME or dirty/NAME is
 * still counted until nbdkit has closed its side of the connection,
 * which follows at once.  So "nbdcopy ... snap/s1 ... && nbdsnap delete
 * s1" would fail now and then.  Give connections that are going away
 * up to UNUSED_GRACE_MS to go before a delete looks at them (without
 * store.lock held meanwhile: clients go on).  A connection that stays
 * open still gets the delete refused, just that much later.
 */
#define UNUSED_GRACE_MS 1000

static void
wait_unused (const char *name)
{
  const struct timespec step = { .tv_sec = 0, .tv_nsec = 5000000 };

  for (int waited = 0; waited < UNUSED_GRACE_MS; waited += 5) {
    unsigned refs;

    {
      ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
      ssize_t i = manifest_find_checkpoint (&store.m, name);

      if (i < 0)
        return;
      refs = store_connections (i);
    }
    if (refs == 0)
      return;
    if (waited == 0)
      nbdkit_debug ("delete '%s': waiting up to %d ms for %u connection%s "
                    "to close", name, UNUSED_GRACE_MS, refs,
                    refs == 1 ? "" : "s");
    nanosleep (&step, NULL);
  }
}

/* --output=PATH of a delete: an absolute path (no white space) where
 * nothing is yet, in an existing directory outside the store.  (The
 * kind checks that it is on the file system of what it will name.)
 * Return NULL if it will do, else the error reply.
 */
static char *
check_output (const char *output)
{
  CLEANUP_FREE char *parent = NULL, *dir = NULL;
  const size_t slen = strlen (store.dir);
  struct stat st;
  char *slash;

  if (output[0] != '/')
    return error_reply ("--output=%s: the path must be absolute", output);
  if (strpbrk (output, " \t\n\r") || strlen (output) >= 4096)
    return error_reply ("--output=%s: the path must be shorter than "
                        "4096 bytes and contain no white space", output);
  if (lstat (output, &st) == 0)
    return error_reply ("--output=%s: the file exists; the final image "
                        "is never written over an existing file", output);
  parent = strdup (output);
  if (parent == NULL)
    return error_reply ("out of memory");
  slash = strrchr (parent, '/');
  if (slash[1] == '\0')
    return error_reply ("--output=%s: the path names a directory, not a "
                        "file", output);
  slash[slash == parent ? 1 : 0] = '\0';
  dir = realpath (parent, NULL);
  if (dir == NULL || stat (dir, &st) == -1)
    return error_reply ("--output=%s: %s: %s", output, parent,
                        strerror (errno));
  if (strncmp (dir, store.dir, slen) == 0 &&
      (dir[slen] == '\0' || dir[slen] == '/'))
    return error_reply ("--output=%s: the path is inside the store (%s), "
                        "whose files are its own: choose a path outside "
                        "it", output, store.dir);
  return NULL;
}

static char *
cmd_delete (const struct json_object *req)
{
  char *reply = NULL;
  const char *name = get_name (req, &reply);
  const char *strategy = json_get_string (req, "strategy");
  const char *output = json_get_string (req, "output");
  bool keep_bitmap = false;
  CLEANUP_FREE char *errmsg = NULL;
  uint64_t commit_bytes, stream_bytes, id;
  ssize_t i;
  int strat = -1;
  bool is_snapshot;

  if (name == NULL || (reply = refuse_changes ()) != NULL)
    return reply;
  if (json_has (req, "keep_bitmap") &&
      !json_get_bool (req, "keep_bitmap", &keep_bitmap))
    return error_reply ("invalid request: \"keep_bitmap\" must be true "
                        "or false");
  if (strategy == NULL || strcmp (strategy, "auto") == 0)
    strat = -1;
  else if (strcmp (strategy, "commit") == 0)
    strat = STRATEGY_COMMIT;
  else if (strcmp (strategy, "stream") == 0)
    strat = STRATEGY_STREAM;
  else
    return error_reply ("invalid strategy '%s': expected auto, commit or "
                        "stream", strategy);
  if (output && (reply = check_output (output)) != NULL)
    return reply;
  if (job_busy (name, &errmsg))
    return error_reply ("%s", errmsg ? errmsg : "a job is running");

  {
    ACQUIRE_RDLOCK_FOR_CURRENT_SCOPE (&store.lock);
    i = manifest_find_checkpoint (&store.m, name);
    if (i == -1)
      return error_reply ("no checkpoint named '%s'", name);
    is_snapshot = store.m.ckpts[i].kind == CKPT_SNAPSHOT;
  }
  wait_unused (name);
  if (!is_snapshot) {
    struct jw w;
    if (strategy || output || keep_bitmap)
      return error_reply ("'%s' is a bitmap-only checkpoint: it has no data "
                          "to merge (--strategy, --output and --keep-bitmap "
                          "apply to snapshots)", name);
    if (store_delete_checkpoint (name, &errmsg) == -1)
      return error_reply ("%s", errmsg ? errmsg : "out of memory");
    jw_init (&w);
    jw_begin_object (&w);
    jw_key (&w, "ok");
    jw_bool (&w, true);
    jw_key (&w, "deleted");
    jw_string (&w, name);
    jw_end_object (&w);
    return jw_finish (&w);
  }

  id = job_start_delete (name, strat, output, keep_bitmap,
                         origin_writable (), &commit_bytes, &stream_bytes,
                         &errmsg);
  if (id == 0)
    return error_reply ("%s", errmsg ? errmsg : "out of memory");
  {
    /* The job may have finished already: find it in the list. */
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&store.job_lock);
    return ok_job_reply (job_find (id));
  }
}

static char *
cmd_revert (const struct json_object *req)
{
  char *reply = NULL;
  const char *name = get_name (req, &reply);
  CLEANUP_FREE char *errmsg = NULL;
  uint64_t id;

  if (name == NULL || (reply = refuse_changes ()) != NULL)
    return reply;
  if (job_busy (name, &errmsg))
    return error_reply ("%s", errmsg ? errmsg : "a job is running");
  id = job_start_revert (name, &errmsg);
  if (id == 0)
    return error_reply ("%s", errmsg ? errmsg : "out of memory");
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&store.job_lock);
    return ok_job_reply (job_find (id));
  }
}

static const char *const state_names[] = {
  "running", "done", "failed", "cancelled",
};

/* Describe job j as JSON members (store.job_lock held). */
static void
describe_job (struct jw *w, const struct job *j)
{
  uint64_t done = __atomic_load_n (&j->bytes_done, __ATOMIC_SEQ_CST);
  uint64_t recent = __atomic_load_n (&j->recent_rate, __ATOMIC_RELAXED);
  int64_t end = j->state == JOB_STATE_RUNNING ? snap_now_ns ()
    : j->finished_ns;
  double secs = (end - j->started_ns) / 1e9;
  double average = secs > 0 ? done / secs : 0;
  /* Running: the rate of late (the average mixes held-back and
   * full-speed stretches); ended: the average.
   */
  double rate = j->state == JOB_STATE_RUNNING && recent ? recent : average;

  jw_key (w, "id");
  jw_uint (w, j->id);
  jw_key (w, "kind");
  jw_string (w, j->kind == JOB_REVERT ? "revert" : "delete");
  jw_key (w, "name");
  jw_string (w, j->name);
  if (j->kind == JOB_DELETE) {
    static const char *const strategies[] = { "commit", "stream", "move" };
    jw_key (w, "strategy");
    jw_string (w, strategies[j->strategy]);
    jw_key (w, "commit_bytes");
    jw_uint (w, j->commit_bytes);
    jw_key (w, "stream_bytes");
    jw_uint (w, j->stream_bytes);
    if (j->strategy == STRATEGY_MOVE) {
      jw_key (w, "move_bytes");
      jw_uint (w, j->move_bytes);
    }
    jw_key (w, "keep_bitmap");
    jw_bool (w, j->keep_bitmap);
    jw_key (w, "output");
    jw_string (w, j->output[0] ? j->output : NULL);
  }
  jw_key (w, "state");
  jw_string (w, state_names[j->state]);
  jw_key (w, "resumed");
  jw_bool (w, j->resumed);
  jw_key (w, "bytes_done");
  jw_uint (w, done);
  jw_key (w, "bytes_total");
  jw_uint (w, j->bytes_total);
  jw_key (w, "elapsed_seconds");
  jw_double (w, secs);
  jw_key (w, "rate_bytes_per_second");
  jw_uint (w, (uint64_t) rate);
  jw_key (w, "average_bytes_per_second");
  jw_uint (w, (uint64_t) average);
  jw_key (w, "paced");
  jw_bool (w, j->state == JOB_STATE_RUNNING &&
           __atomic_load_n (&j->paced, __ATOMIC_RELAXED));
  if (snapshot_debug_job_hold) {
    /* Only with -D snapshot.job_hold=1 (tests): see job_park. */
    jw_key (w, "held");
    jw_bool (w, j->state == JOB_STATE_RUNNING && j->held);
    jw_key (w, "steps");
    jw_uint (w, j->steps);
  }
  jw_key (w, "eta_seconds");
  if (j->state == JOB_STATE_RUNNING && rate > 0 && j->bytes_total >= done)
    jw_double (w, (j->bytes_total - done) / rate);
  else if (j->state == JOB_STATE_RUNNING)
    jw_null (w);
  else
    jw_int (w, 0);
  jw_key (w, "error");
  jw_string (w, j->error);
}

static char *
ok_job_reply (const struct job *j)
{
  struct jw w;

  if (j == NULL)
    return error_reply ("the job has vanished");
  jw_init (&w);
  jw_begin_object (&w);
  jw_key (&w, "ok");
  jw_bool (&w, true);
  jw_key (&w, "job");
  jw_begin_object (&w);
  describe_job (&w, j);
  jw_end_object (&w);
  jw_end_object (&w);
  return jw_finish (&w);
}

static void
list_one_job (const struct job *j, void *opaque)
{
  struct jw *w = opaque;

  jw_begin_object (w);
  describe_job (w, j);
  jw_end_object (w);
}

static char *
cmd_jobs (const struct json_object *req)
{
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&store.job_lock);
  struct jw w;

  jw_init (&w);
  jw_begin_object (&w);
  jw_key (&w, "ok");
  jw_bool (&w, true);
  jw_key (&w, "jobs");
  jw_begin_array (&w);
  job_list (list_one_job, &w);
  jw_end_array (&w);
  jw_end_object (&w);
  return jw_finish (&w);
}

/* The "job" member: a job id. */
static bool
get_job_id (const struct json_object *req, uint64_t *id, char **reply)
{
  int64_t v;

  if (!json_get_int (req, "job", &v) || v <= 0) {
    *reply = error_reply ("invalid request: \"job\" must be a job id");
    return false;
  }
  *id = v;
  return true;
}

static char *
cmd_cancel (const struct json_object *req)
{
  CLEANUP_FREE char *errmsg = NULL;
  char *reply = NULL;
  uint64_t id;

  if (!get_job_id (req, &id, &reply))
    return reply;
  if (job_cancel (id, &errmsg) == -1)
    return error_reply ("%s", errmsg ? errmsg : "out of memory");
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&store.job_lock);
    return ok_job_reply (job_find (id));
  }
}

/* Longest wait a client may ask for, so it can show progress. */
#define WAIT_MAX_MS 60000

/* {"cmd":"wait","job":N,"timeout_ms":T}: reply with the job's line as
 * soon as it is no longer running, or after T ms (default 1000) with
 * it still running.  The reply is sent by the control thread's loop
 * (control_thread), which holds the client's later requests until then.
 */
static char *
cmd_wait (const struct json_object *req)
{
  char *reply = NULL;
  int64_t ms = 1000;
  uint64_t id;

  if (!get_job_id (req, &id, &reply))
    return reply;
  if (json_has (req, "timeout_ms") &&
      (!json_get_int (req, "timeout_ms", &ms) || ms < 0 || ms > WAIT_MAX_MS))
    return error_reply ("invalid request: \"timeout_ms\" must be 0 to %d",
                        WAIT_MAX_MS);
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&store.job_lock);
    const struct job *j = job_find (id);
    if (j == NULL)
      return error_reply ("no job %" PRIu64, id);
    if (j->state != JOB_STATE_RUNNING || ms == 0 || current == NULL)
      return ok_job_reply (j);
  }
  current->waiting = true;
  current->wait_job = id;
  current->wait_until = snap_now_ns () + ms * INT64_C (1000000);
  return NULL;
}

/* {"cmd":"job-release","job":N[,"steps":K]}: let job N, held by
 * -D snapshot.job_hold=1, take K more steps (then it parks again), or
 * run to its end without "steps".  A request for tests: without the
 * debug flag it is an unknown command.
 */
static char *
cmd_job_release (const struct json_object *req)
{
  CLEANUP_FREE char *errmsg = NULL;
  char *reply = NULL;
  int64_t steps = -1;
  uint64_t id;

  if (!snapshot_debug_job_hold)
    return error_reply ("unknown command 'job-release'");
  if (!get_job_id (req, &id, &reply))
    return reply;
  if (json_has (req, "steps") &&
      (!json_get_int (req, "steps", &steps) || steps < 0))
    return error_reply ("invalid request: \"steps\" must be 0 or more");
  if (job_release (id, steps, &errmsg) == -1)
    return error_reply ("%s", errmsg ? errmsg : "out of memory");
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&store.job_lock);
    return ok_job_reply (job_find (id));
  }
}

static const struct {
  const char *name;
  char *(*fn) (const struct json_object *req);
} commands[] = {
  { "list", cmd_list },
  { "info", cmd_info },
  { "create", cmd_create },
  { "delete", cmd_delete },
  { "revert", cmd_revert },
  { "jobs", cmd_jobs },
  { "cancel", cmd_cancel },
  { "wait", cmd_wait },
  { "job-release", cmd_job_release },
};

/* Handle one request line; return the reply (malloc'd) or NULL. */
char *
handle_request (const char *line, size_t len)
{
  CLEANUP_FREE char *errmsg = NULL;
  struct json_object *req;
  const char *cmd;
  char *reply = NULL;

  req = json_parse (line, len, &errmsg);
  if (req == NULL)
    return error_reply ("invalid request: %s",
                        errmsg ? errmsg : "out of memory");
  if (!json_object_is_type (req, json_type_object)) {
    json_free (req);
    return error_reply ("invalid request: expected a JSON object");
  }
  cmd = json_get_string (req, "cmd");
  if (cmd == NULL)
    reply = error_reply ("invalid request: missing \"cmd\"");
  else {
    size_t i;
    for (i = 0; i < sizeof commands / sizeof commands[0]; ++i)
      if (strcmp (cmd, commands[i].name) == 0)
        break;
    if (i == sizeof commands / sizeof commands[0])
      reply = error_reply ("unknown command '%s'", cmd);
    else {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&store.control_lock);
      if (snapshot_debug_verbose)
        nbdkit_debug ("snapshot: control: %s", cmd);
      reply = commands[i].fn (req);
    }
  }
  json_free (req);
  return reply;
}

/* ---- The socket ---- */

/* Append reply and a newline to c's output, and send what the socket
 * takes now.  Never blocks: what it does not take waits for POLLOUT.
 * A client gone away is marked dead.  reply is freed.
 */
static void
send_reply (struct client *c, char *reply)
{
  size_t n;

  if (reply == NULL)
    reply = error_reply ("out of memory");
  if (reply == NULL)
    return;
  n = strlen (reply);
  if (c->out_len + n + 1 > c->out_cap) {
    size_t cap = MAX (c->out_cap * 2, c->out_len + n + 1);
    char *p = realloc (c->out, cap);
    if (p == NULL) {
      c->dead = true;           /* cannot keep its replies in order */
      free (reply);
      return;
    }
    c->out = p;
    c->out_cap = cap;
  }
  memcpy (c->out + c->out_len, reply, n);
  c->out[c->out_len + n] = '\n';
  c->out_len += n + 1;
  free (reply);
  client_flush (c);
}

static void
client_flush (struct client *c)
{
  while (c->out_off < c->out_len && !c->dead) {
    ssize_t r = send (c->fd, c->out + c->out_off, c->out_len - c->out_off,
                      MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK)
        c->dead = true;         /* The client went away. */
      break;
    }
    c->out_off += r;
  }
  if (c->out_off == c->out_len)
    c->out_off = c->out_len = 0;
}

/* Whether c has so many replies unread that its requests are left in
 * the socket until it reads them.
 */
static bool
client_backlogged (const struct client *c)
{
  return c->out_len - c->out_off > CONTROL_MAX_BACKLOG;
}

static void
client_close (size_t i)
{
  close (clients[i]->fd);
  free (clients[i]->out);
  free (clients[i]);
  clients[i] = NULL;
}

/* Answer a request; a "wait" may leave c waiting, with no reply yet. */
static void
answer (struct client *c, const char *line, size_t len)
{
  char *reply;

  current = c;
  reply = handle_request (line, len);
  current = NULL;
  if (reply || !c->waiting)
    send_reply (c, reply);
}

/* Answer each complete line in c->buf (one at a time while a wait is
 * pending, so replies keep the order of requests; none while c has
 * too many replies unread).
 */
static void
process_lines (struct client *c)
{
  char *nl;

  while (!c->waiting && !c->dead && !client_backlogged (c) &&
         (nl = memchr (c->buf, '\n', c->len)) != NULL) {
    size_t linelen = nl - c->buf;

    if (c->skipping)
      c->skipping = false;
    else
      answer (c, c->buf, linelen);
    memmove (c->buf, nl + 1, c->len - linelen - 1);
    c->len -= linelen + 1;
  }
  if (c->len > CONTROL_MAX_LINE && memchr (c->buf, '\n', c->len) == NULL) {
    if (!c->skipping)
      send_reply (c, error_reply ("request too long (more than %d bytes)",
                                  CONTROL_MAX_LINE));
    c->skipping = true;
    c->len = 0;
  }
}

static void
client_read (struct client *c)
{
  ssize_t r;

  if (c->len == sizeof c->buf)
    return;                     /* full of requests not yet answered */
  r = recv (c->fd, c->buf + c->len, sizeof c->buf - c->len, MSG_DONTWAIT);

  if (r == -1 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
    return;
  if (r <= 0) {
    /* Half-closed: answer a final unterminated request, then close
     * once the replies are out (a wait is not waited for: nobody could
     * read its reply).
     */
    if (r == 0 && c->len > 0 && !c->skipping && !c->waiting) {
      answer (c, c->buf, c->len);
      c->waiting = false;
    }
    c->len = 0;
    c->eof = true;
    if (r == -1)
      c->dead = true;
    return;
  }
  c->len += r;
  process_lines (c);
}

static void
client_accept (void)
{
  int fd = accept4 (listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
  size_t i;

  if (fd == -1)
    return;
  for (i = 0; i < CONTROL_MAX_CLIENTS; ++i)
    if (clients[i] == NULL)
      break;
  if (i == CONTROL_MAX_CLIENTS) {
    struct client tmp = { .fd = fd };
    send_reply (&tmp, error_reply ("too many control clients"));
    free (tmp.out);
    close (fd);
    return;
  }
  clients[i] = calloc (1, sizeof *clients[i]);
  if (clients[i] == NULL) {
    close (fd);
    return;
  }
  clients[i]->fd = fd;
}

/* Answer the waits whose job ended or whose time is up; return the
 * poll timeout (ms) until the next deadline, or -1.
 */
static int
answer_waits (void)
{
  const int64_t now = snap_now_ns ();
  int64_t next = -1;

  for (size_t i = 0; i < CONTROL_MAX_CLIENTS; ++i) {
    struct client *c = clients[i];
    char *reply = NULL;

    if (c == NULL || !c->waiting)
      continue;
    {
      ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&store.job_lock);
      const struct job *j = job_find (c->wait_job);
      if (j == NULL || j->state != JOB_STATE_RUNNING || now >= c->wait_until)
        reply = ok_job_reply (j);
    }
    if (reply == NULL) {
      int64_t left = (c->wait_until - now + 999999) / 1000000;
      if (next == -1 || left < next)
        next = left;
      continue;
    }
    c->waiting = false;
    send_reply (c, reply);
    process_lines (c);          /* requests held while it waited */
    if (c->waiting) {
      next = 0;                 /* a new wait: look again at once */
    }
  }
  return next > INT_MAX ? INT_MAX : (int) next;
}

/* The control thread: one poll(2) loop over the listening socket, the
 * clients and two wake-up pipes.  Every socket is non-blocking, so one
 * client can hold up no other: a client that does not read its
 * replies keeps them in its output buffer, and past
 * CONTROL_MAX_BACKLOG its requests wait in its socket.
 */
static void *
control_thread (void *arg)
{
  name_thread ("snap-control");
  for (;;) {
    struct pollfd fds[CONTROL_MAX_CLIENTS + 3];
    size_t idx[CONTROL_MAX_CLIENTS];
    size_t n = 3, nc = 0;
    int timeout = answer_waits ();

    /* Close the clients that are done: gone away, or at end of input
     * with every reply sent.
     */
    for (size_t i = 0; i < CONTROL_MAX_CLIENTS; ++i)
      if (clients[i] &&
          (clients[i]->dead ||
           (clients[i]->eof && clients[i]->out_len == 0)))
        client_close (i);

    fds[0] = (struct pollfd) { .fd = wake_pipe[0], .events = POLLIN };
    fds[1] = (struct pollfd) { .fd = listen_fd, .events = POLLIN };
    fds[2] = (struct pollfd) { .fd = job_pipe[0], .events = POLLIN };
    for (size_t i = 0; i < CONTROL_MAX_CLIENTS; ++i) {
      struct client *c = clients[i];
      short events = 0;

      if (c == NULL)
        continue;
      /* A client waiting for a job is not read meanwhile: its later
       * requests wait in the socket, in order.  Nor is one that has
       * left too many replies unread.
       */
      if (!c->waiting && !c->eof && !client_backlogged (c))
        events |= POLLIN;
      if (c->out_len > 0)
        events |= POLLOUT;
      if (events) {
        fds[n++] = (struct pollfd) { .fd = c->fd, .events = events };
        idx[nc++] = i;
      }
    }
    if (poll (fds, n, timeout) == -1) {
      if (errno == EINTR)
        continue;
      nbdkit_error ("snapshot: control: poll: %m");
      break;
    }
    if (fds[0].revents)
      break;
    if (fds[2].revents) {
      char buf[64];
      ssize_t r = read (job_pipe[0], buf, sizeof buf);   /* drain */
      (void) r;
    }
    for (size_t k = 0; k < nc; ++k) {
      struct client *c = clients[idx[k]];
      const short rev = fds[k + 3].revents;

      if (rev & POLLOUT) {
        client_flush (c);
        process_lines (c);      /* requests held while it was behind */
      }
      if (rev & POLLIN)
        client_read (c);
      else if (rev & (POLLHUP | POLLERR))
        c->dead = true;         /* gone, and nothing left to read */
    }
    if (fds[1].revents & POLLIN)
      client_accept ();
  }
  for (size_t i = 0; i < CONTROL_MAX_CLIENTS; ++i)
    if (clients[i])
      client_close (i);
  return NULL;
}

/* Make path free for our socket.  Nothing there: fine.  A socket that
 * nobody listens on was left by a server that was killed: remove it.
 * Anything else (a live socket, a file, a directory) is not ours to
 * remove: refuse, saying why.  what names the parameter for messages.
 */
static int
claim_socket_path (const char *what, const char *path)
{
  struct sockaddr_un addr = { .sun_family = AF_UNIX };
  struct stat st;
  int fd, r, e;

  if (lstat (path, &st) == -1) {
    if (errno == ENOENT)
      return 0;
    nbdkit_error ("%s=%s: %m", what, path);
    return -1;
  }
  if (S_ISLNK (st.st_mode) && strcmp (what, "snapshot-store") == 0) {
    /* The store's link to a socket elsewhere (below): ours. */
    if (unlink (path) == -1) {
      nbdkit_error ("%s: %m", path);
      return -1;
    }
    return 0;
  }
  if (!S_ISSOCK (st.st_mode)) {
    nbdkit_error ("%s=%s: the path exists and is not a socket: it is left "
                  "alone (remove it, or choose another path)", what, path);
    return -1;
  }
  strcpy (addr.sun_path, path);
  fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd == -1) {
    nbdkit_error ("socket: %m");
    return -1;
  }
  r = connect (fd, (struct sockaddr *) &addr, sizeof addr);
  e = errno;
  close (fd);
  if (r == 0 || e == EAGAIN || e == EINPROGRESS) {
    nbdkit_error ("%s=%s: the socket is in use: another process is "
                  "listening on it (another nbdkit?)", what, path);
    return -1;
  }
  if (e != ECONNREFUSED) {
    errno = e;
    nbdkit_error ("%s=%s: connect: %m", what, path);
    return -1;
  }
  /* Stale: nobody listens. */
  if (unlink (path) == -1 && errno != ENOENT) {
    nbdkit_error ("%s=%s: removing the stale socket: %m", what, path);
    return -1;
  }
  return 0;
}

int
control_listen (const char *path)
{
  struct sockaddr_un addr = { .sun_family = AF_UNIX };
  CLEANUP_FREE char *link = NULL;

  if (asprintf (&link, "%s/control.sock", store.dir) == -1) {
    nbdkit_error ("asprintf: %m");
    return -1;
  }
  if (path == NULL)
    path = link;
  if (strlen (path) >= sizeof addr.sun_path) {
    nbdkit_error ("snapshot-control: the socket path %s is too long "
                  "(%zu bytes, at most %zu): use snapshot-control=SOCKET "
                  "with a shorter path", path, strlen (path),
                  sizeof addr.sun_path - 1);
    return -1;
  }
  strcpy (addr.sun_path, path);
  if (claim_socket_path (path == link ? "snapshot-store" : "snapshot-control",
                         path) == -1 ||
      (path != link && claim_socket_path ("snapshot-store", link) == -1))
    return -1;

  listen_fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listen_fd == -1 ||
      bind (listen_fd, (struct sockaddr *) &addr, sizeof addr) == -1) {
    nbdkit_error ("snapshot-control=%s: %m", path);
    return -1;
  }
  socket_path = strdup (path);
  if (socket_path == NULL) {
    nbdkit_error ("strdup: %m");
    return -1;
  }
  if (chmod (path, 0600) == -1 || listen (listen_fd, 64) == -1) {
    nbdkit_error ("snapshot-control=%s: %m", path);
    return -1;
  }
  if (path != link) {
    CLEANUP_FREE char *abs = realpath (path, NULL);
    if (abs == NULL || symlink (abs, link) == -1) {
      nbdkit_error ("%s: cannot link to the control socket: %m", link);
      return -1;
    }
  }
  nbdkit_debug ("snapshot: control socket %s", path);
  return 0;
}

/* Wake the control thread: a job ended ("wait" requests). */
static void
control_job_ended (void)
{
  /* A full pipe (EAGAIN) means the control thread will wake anyway. */
  if (job_pipe[1] >= 0) {
    ssize_t r = write (job_pipe[1], "j", 1);
    (void) r;
  }
}

int
control_start (void)
{
  int err;

  /* The job thread may write to job_pipe until it is joined, after
   * control_stop: the pipe stays open for the life of the process.
   */
  if (job_pipe[0] == -1 && pipe2 (job_pipe, O_CLOEXEC | O_NONBLOCK) == -1) {
    nbdkit_error ("pipe2: %m");
    return -1;
  }
  if (pipe2 (wake_pipe, O_CLOEXEC) == -1) {
    nbdkit_error ("pipe2: %m");
    return -1;
  }
  job_set_end_notify (control_job_ended);
  err = pthread_create (&thread, NULL, control_thread, NULL);
  if (err) {
    errno = err;
    nbdkit_error ("pthread_create: %m");
    return -1;
  }
  thread_running = true;
  return 0;
}

void
control_stop (void)
{
  if (thread_running) {
    ssize_t r = write (wake_pipe[1], "x", 1);
    (void) r;
    pthread_join (thread, NULL);
    thread_running = false;
  }
  for (int i = 0; i < 2; ++i)
    if (wake_pipe[i] >= 0) {
      close (wake_pipe[i]);
      wake_pipe[i] = -1;
    }
  if (listen_fd >= 0) {
    close (listen_fd);
    listen_fd = -1;
    if (socket_path)
      unlink (socket_path);
  }
  free (socket_path);
  socket_path = NULL;
}
