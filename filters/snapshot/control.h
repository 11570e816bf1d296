/* nbdkit-snapshot: the control socket (control.c). */
#ifndef SNAPSHOT_CONTROL_H
#define SNAPSHOT_CONTROL_H

#include <stddef.h>

/* Bind and listen on the control socket (before nbdkit forks), then
 * serve it from a thread of its own (after).  control_stop stops both
 * and removes the socket.  Return 0, or -1 after nbdkit_error.
 */
extern int control_listen (const char *path);
extern int control_start (void);
extern void control_stop (void);

/* Handle one request line (len bytes, no newline) as a client's, and
 * return the reply line (malloc'd, no newline), or NULL when a "wait"
 * was left pending (only for a client of the socket) or out of memory.
 * The store must be open.
 */
extern char *handle_request (const char *line, size_t len);

/* Describe checkpoint index i as JSON members.  Store lock held. */
struct jw;
extern void describe_checkpoint (struct jw *w, size_t i);

#endif /* SNAPSHOT_CONTROL_H */
