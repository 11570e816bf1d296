/* nbdsnap: the progress of a long command (backup, consolidate, wait,
 * delete or revert with --wait), one look for all of them.
 *
 * With --progress=FD it writes "N/100" lines to FD, one per change of
 * the percentage; otherwise, with --progress or when stderr is a
 * terminal, it draws a bar on stderr, "\r[####....]  42%".  Until
 * progress_finish, the percentage stops at 99: a command is done only
 * when its work is durable.  Failures to write the lines are ignored
 * (the work matters more than its progress), but after one FD is no
 * longer used.  Not thread-safe: one thread updates a progress.
 */
#ifndef NBDSNAP_PROGRESS_H
#define NBDSNAP_PROGRESS_H

#include <stdbool.h>
#include <stdint.h>

struct progress {
  uint64_t total;               /* the work, in bytes */
  uint64_t done;                /* of which done */
  int shown;                    /* percentage last shown, -1 if none */
  bool bar;                     /* draw a bar on stderr */
  bool bar_open;                /* the bar's line has no newline yet */
  int fd;                       /* --progress=FD, or -1 */
};

/* Set up *p from the options (progress_bar, progress_fd).  Return 0,
 * or -1 after an error message if FD is not open for writing.
 */
extern int progress_init (struct progress *p)
  __attribute__ ((__nonnull__ (1)));

/* Whether anything is shown at all. */
extern bool progress_active (const struct progress *p)
  __attribute__ ((__nonnull__ (1)));

/* done of total bytes are done: show it if the percentage changed. */
extern void progress_update (struct progress *p, uint64_t done,
                             uint64_t total)
  __attribute__ ((__nonnull__ (1)));

/* bytes more are done. */
extern void progress_add (struct progress *p, uint64_t bytes)
  __attribute__ ((__nonnull__ (1)));

/* The work is done: show 100 and end the bar's line. */
extern void progress_finish (struct progress *p)
  __attribute__ ((__nonnull__ (1)));

/* The work failed: end the bar's line, so that an error message
 * starts on its own.
 */
extern void progress_abandon (struct progress *p)
  __attribute__ ((__nonnull__ (1)));

#endif /* NBDSNAP_PROGRESS_H */
