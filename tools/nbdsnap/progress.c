/* nbdsnap: progress bars and "N/100" lines (see progress.h). */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "util.h"
#include "nbdsnap.h"
#include "progress.h"

#define BAR_WIDTH 40

int
progress_init (struct progress *p)
{
  *p = (struct progress) { .shown = -1, .fd = progress_fd };

  if (progress_fd >= 0) {
    int fl = fcntl (progress_fd, F_GETFL);

    if (fl == -1) {
      snap_error ("--progress=%d: %m", progress_fd);
      return -1;
    }
    if ((fl & O_ACCMODE) == O_RDONLY) {
      snap_error ("--progress=%d: not open for writing", progress_fd);
      return -1;
    }
    /* A reader that goes away must not kill the command. */
    signal (SIGPIPE, SIG_IGN);
  }
  else
    p->bar = progress_bar || isatty (STDERR_FILENO);
  return 0;
}

bool
progress_active (const struct progress *p)
{
  return p->bar || p->fd >= 0;
}

/* Write a "N/100" line to FD. */
static void
write_line (struct progress *p, int percent)
{
  char line[16];
  int len = snprintf (line, sizeof line, "%d/100\n", percent);
  const char *s = line;

  while (len > 0) {
    ssize_t r = write (p->fd, s, len);

    if (r == -1) {
      if (errno == EINTR)
        continue;
      p->fd = -1;
      return;
    }
    s += r;
    len -= r;
  }
}

static void
draw_bar (struct progress *p, int percent, bool finished)
{
  char bar[BAR_WIDTH + 1];
  int fill = percent * BAR_WIDTH / 100;

  memset (bar, '#', fill);
  memset (bar + fill, '.', BAR_WIDTH - fill);
  bar[BAR_WIDTH] = '\0';
  fprintf (stderr, "\r[%s] %3d%%", bar, percent);
  if (finished)
    fputc ('\n', stderr);
  p->bar_open = !finished;
  fflush (stderr);
}

static void
show (struct progress *p, int percent, bool finished)
{
  if (!progress_active (p) || percent == p->shown)
    return;
  p->shown = percent;
  if (p->fd >= 0)
    write_line (p, percent);
  if (p->bar)
    draw_bar (p, percent, finished);
}

void
progress_update (struct progress *p, uint64_t done, uint64_t total)
{
  int percent;

  p->done = done;
  p->total = total;
  /* double: done * 100 could overflow a uint64_t. */
  percent = total ? (int) ((double) done * 100 / total) : 0;
  show (p, MIN (percent, 99), false);
}

void
progress_add (struct progress *p, uint64_t bytes)
{
  progress_update (p, p->done + bytes, p->total);
}

void
progress_finish (struct progress *p)
{
  show (p, 100, true);
}

void
progress_abandon (struct progress *p)
{
  if (p->bar_open) {
    fputc ('\n', stderr);
    p->bar_open = false;
  }
}
