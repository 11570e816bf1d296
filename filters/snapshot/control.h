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

/* Describe checkpoint index i as JSON members.  Store lock held. */
struct jw;
extern void describe_checkpoint (struct jw *w, size_t i);

#endif /* SNAPSHOT_CONTROL_H */
