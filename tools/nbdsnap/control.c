/* nbdsnap: talking to the filter's control socket.
 *
 * The protocol (docs in nbdkit-snapshot-filter(1)) is one JSON object
 * per line each way.  nbdsnap makes one connection per command: it
 * sends one request line, reads one reply line of at most REPLY_MAX
 * bytes and closes the connection.  It does not half-close its side
 * after the request, so a server that reads until the newline and a
 * server that reads until EOF both answer.
 */
#include <config.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "cleanup.h"
#include "util.h"
#include "nbdsnap.h"

/* Longest reply accepted, newline excluded. */
#define REPLY_MAX (1024 * 1024)

char *
control_socket_path (void)
{
  const char *path = control;
  struct stat st;
  char *ret;

  if (path == NULL)
    path = getenv ("NBDSNAP_CONTROL");
  if (path == NULL || path[0] == '\0') {
    snap_error ("no control socket: use -c SOCKET or -c STORE-DIR");
    return NULL;
  }

  /* A store directory names its socket DIR/control.sock. */
  if (stat (path, &st) == 0 && S_ISDIR (st.st_mode)) {
    size_t len = strlen (path);

    while (len > 1 && path[len - 1] == '/')
      len--;
    if (asprintf (&ret, "%.*s%scontrol.sock", (int) len, path,
                  path[len - 1] == '/' ? "" : "/") == -1) {
      snap_error ("asprintf: %m");
      return NULL;
    }
    return ret;
  }

  ret = strdup (path);
  if (ret == NULL)
    snap_error ("strdup: %m");
  return ret;
}

/* Connect to the Unix socket at path.  Return the fd or -1. */
static int
connect_socket (const char *path)
{
  struct sockaddr_un addr = { .sun_family = AF_UNIX };
  int fd;

  if (strlen (path) >= sizeof addr.sun_path) {
    errno = ENAMETOOLONG;
    snap_error ("%s: connect: %m", path);
    return -1;
  }
  strcpy (addr.sun_path, path);

  fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd == -1) {
    snap_error ("socket: %m");
    return -1;
  }
  if (connect (fd, (struct sockaddr *) &addr, sizeof addr) == -1) {
    snap_error ("%s: connect: %m", path);
    close (fd);
    return -1;
  }
  return fd;
}

/* Send all of buf.  MSG_NOSIGNAL: a server that went away gives EPIPE,
 * not a fatal SIGPIPE.
 */
static int
send_all (int fd, const char *path, const char *buf, size_t len)
{
  while (len > 0) {
    ssize_t r = send (fd, buf, len, MSG_NOSIGNAL);

    if (r == -1) {
      if (errno == EINTR)
        continue;
      snap_error ("%s: send: %m", path);
      return -1;
    }
    buf += r;
    len -= r;
  }
  return 0;
}

/* Read one line (up to the first newline, or to EOF if the server
 * closes without one).  Return it malloc'd and NUL-terminated, without
 * the newline, and set *lenp; or NULL after printing an error.
 */
static char *
read_line (int fd, const char *path, size_t *lenp)
{
  char *buf = NULL;
  size_t len = 0, alloc = 0;

  for (;;) {
    char *nl;
    ssize_t r;

    if (alloc - len < 4096) {
      size_t n = alloc ? alloc * 2 : 16384;
      char *p;

      if (n > REPLY_MAX + 2)
        n = REPLY_MAX + 2;      /* room for the newline and a NUL */
      p = realloc (buf, n);
      if (p == NULL) {
        snap_error ("realloc: %m");
        goto fail;
      }
      buf = p;
      alloc = n;
    }
    r = recv (fd, buf + len, alloc - 1 - len, 0);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      snap_error ("%s: recv: %m", path);
      goto fail;
    }
    if (r == 0) {
      if (len == 0) {
        snap_error ("%s: the server closed the connection without replying",
                    path);
        goto fail;
      }
      break;                    /* a last line without a newline */
    }
    nl = memchr (buf + len, '\n', r);
    len += r;
    if (nl) {
      len = nl - buf;
      break;
    }
    if (len > REPLY_MAX) {
      snap_error ("%s: reply longer than 1 MiB", path);
      goto fail;
    }
  }
  if (len > REPLY_MAX) {
    snap_error ("%s: reply longer than 1 MiB", path);
    goto fail;
  }
  buf[len] = '\0';
  *lenp = len;
  return buf;

 fail:
  free (buf);
  return NULL;
}

/* Copy a message from the server, replacing control characters so that
 * it cannot play tricks on the terminal.
 */
static char *
printable (const char *s)
{
  char *ret = strdup (s);

  if (ret)
    for (char *p = ret; *p; ++p)
      if ((unsigned char) *p < 0x20 || *p == 0x7f)
        *p = '?';
  return ret;
}

void
bad_reply (const struct command *cmd, const char *what)
{
  snap_error ("%s: invalid reply from the server: %s", cmd->name, what);
}

struct json_object *
control_request (const struct command *cmd, struct jw *req)
{
  CLEANUP_FREE char *request = NULL;
  CLEANUP_FREE char *path = NULL;
  CLEANUP_FREE char *line = NULL;
  CLEANUP_FREE char *err = NULL;
  CLEANUP_CLOSE int fd = -1;
  struct json_object *reply;
  size_t len;
  bool ok;

  request = jw_finish (req);
  if (request == NULL) {
    snap_error ("%s: cannot build the request (out of memory?)", cmd->name);
    return NULL;
  }

  path = control_socket_path ();
  if (path == NULL)
    return NULL;
  fd = connect_socket (path);
  if (fd == -1)
    return NULL;
  if (send_all (fd, path, request, strlen (request)) == -1 ||
      send_all (fd, path, "\n", 1) == -1)
    return NULL;
  line = read_line (fd, path, &len);
  if (line == NULL)
    return NULL;

  reply = json_parse (line, len, &err);
  if (reply == NULL) {
    bad_reply (cmd, err ? err : "out of memory");
    return NULL;
  }
  if (!json_object_is_type (reply, json_type_object) ||
      !json_get_bool (reply, "ok", &ok)) {
    bad_reply (cmd, "no boolean \"ok\"");
    json_free (reply);
    return NULL;
  }
  if (!ok) {
    const char *msg = json_get_string (reply, "error");
    CLEANUP_FREE char *copy = printable (msg ? msg : "");

    if (msg == NULL || copy == NULL)
      snap_error ("%s: the server reported an error without a message",
                  cmd->name);
    else
      snap_error ("%s: %s", cmd->name, copy);
    json_free (reply);
    return NULL;
  }
  return reply;
}

int
run_control (const struct command *cmd, char **operands, FILE *out)
{
  struct jw req;

  plain_request (&req, cmd, operands);
  return control_print (cmd, &req, out, cmd->print);
}

void
plain_request (struct jw *req, const struct command *cmd, char **operands)
{
  jw_init (req);
  jw_begin_object (req);
  jw_key (req, "cmd");
  jw_string (req, cmd->name);
  if (cmd->name_operand) {
    jw_key (req, "name");
    jw_string (req, operands[0]);
  }
  if (bitmap_only) {
    jw_key (req, "bitmap_only");
    jw_bool (req, true);
  }
  jw_end_object (req);
}

int
control_print (const struct command *cmd, struct jw *req, FILE *out,
               int (*print) (const struct command *cmd,
                             const struct json_object *reply, FILE *out))
{
  struct json_object *reply = control_request (cmd, req);
  int r;

  if (reply == NULL)
    return -1;
  r = json_output ? print_json_reply (cmd, reply, out)
    : print (cmd, reply, out);
  json_free (reply);
  return r;
}
