/* nbdsnap: the command-line client of nbdkit-snapshot-filter.
 *
 * main.c parses options and dispatches through the command table;
 * control.c talks to the filter's control socket; output.c prints
 * replies for humans or as JSON; backup.c copies an export, or its
 * changed blocks, into a file over NBD.  Results are written to the
 * FILE * passed in, a memory stream that main.c copies to stdout only
 * when the command succeeded, so a failure leaves stdout empty.  Errors
 * go to stderr as "nbdsnap: WHAT: WHY" and commands return -1.
 */
#ifndef NBDSNAP_H
#define NBDSNAP_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "json.h"

/* Options (set by main.c, read-only afterwards). */
extern const char *control;     /* -c: socket or store dir; NULL: env */
extern bool json_output;        /* --json: print replies as JSON */
extern bool bitmap_only;        /* create --bitmap-only */
extern const char *delete_strategy; /* delete --strategy=S, or NULL */
extern const char *delete_output; /* delete --output=FILE, or NULL */
extern bool delete_keep_bitmap; /* delete --keep-bitmap */
/* Options of backup only (main.c refuses them with other commands). */
extern const char *backup_to;   /* --to FILE; required */
extern const char *backup_since; /* --since CHECKPOINT, or NULL: full */
extern unsigned backup_requests; /* --requests N: reads in flight */
extern const char *backup_name; /* --name NAME: the chain's new point */
extern const char *backup_base; /* --base FILE: a chain over FILE */
extern bool progress_bar;       /* --progress: a bar even if not a tty */
extern int progress_fd;         /* --progress=FD: "N/100" lines; or -1 */

/* One command: "nbdsnap [OPTIONS] NAME OPERANDS...". */
struct command {
  const char *name;             /* as typed; also the request's "cmd" */
  const char *operands;         /* synopsis of operands, for usage */
  const char *options;          /* synopsis of its own options, or NULL */
  int min_operands, max_operands; /* how many operands are accepted */
  bool name_operand;            /* operand 0 is a checkpoint NAME */
  bool offline;                 /* works on a store directory itself
                                   (operand 0), not a control socket */
  const char *description;      /* one line, for usage */
  /* Run the command, printing results on out.  Return 0 or -1. */
  int (*run) (const struct command *cmd, char **operands, FILE *out);
  /* For control-socket commands using run_control: print a successful
   * reply for humans.  Return 0 or -1.
   */
  int (*print) (const struct command *cmd, const struct json_object *reply,
                FILE *out);
};

/* control.c */
/* The run function of plain control commands: send
 * {"cmd":NAME[,"name":OPERAND0]} and print the reply with cmd->print,
 * or as JSON with --json.
 */
extern int run_control (const struct command *cmd, char **operands,
                        FILE *out);
/* Build that request, {"cmd":NAME[,"name":OPERAND0]}, in *req. */
extern void plain_request (struct jw *req, const struct command *cmd,
                           char **operands);
/* The socket path chosen by -c or $NBDSNAP_CONTROL (a store directory
 * means DIR/control.sock), malloc'd; NULL after printing an error.
 */
extern char *control_socket_path (void);
/* Send the request built in *req (which is consumed) to the control
 * socket and return the parsed reply, whose "ok" is true.  Any failure,
 * including an error reply, is printed as "nbdsnap: WHAT: WHY" (WHAT
 * is cmd->name for errors from the server) and gives NULL.
 */
extern struct json_object *control_request (const struct command *cmd,
                                            struct jw *req);
/* Send *req (consumed) and print the reply with print, or as JSON
 * with --json.  Return 0 or -1.
 */
extern int control_print (const struct command *cmd, struct jw *req,
                          FILE *out,
                          int (*print) (const struct command *cmd,
                                        const struct json_object *reply,
                                        FILE *out));
/* Report a reply that lacks what the command needs. */
extern void bad_reply (const struct command *cmd, const char *what);

/* backup.c */
/* The run function of backup: copy export operands[0], or with --since
 * its changes, into --to FILE over NBD (no control socket).
 */
extern int run_backup (const struct command *cmd, char **operands,
                       FILE *out);

/* chain.c: backup chains. */
struct chain;
/* Whether backup --to names a chain: an existing directory, or a path
 * ending in '/'.
 */
extern bool is_chain_target (const char *to);
/* Start a backup of an export of size bytes into the chain dir (made
 * if missing): the restore point name, built on since (NULL: a full
 * backup, the chain's first), over base (--base FILE, or NULL).  Locks
 * the chain and creates the new layer.  NULL after an error.
 */
extern struct chain *chain_begin (const char *dir, uint64_t size,
                                  const char *since, const char *name,
                                  const char *base);
/* The descriptor of the new layer's data: the copy writes there. */
extern int chain_fd (const struct chain *c);
extern const char *chain_dir (const struct chain *c);
/* An incremental backup's changed extent [offset, offset+len): its
 * pages are the new layer's.  Return 0 or -1 (reported).
 */
extern int chain_record (struct chain *c, uint64_t offset, uint64_t len);
/* Make the new restore point (sync, seal, one manifest save).  Return
 * 0 or -1 (reported; chain_abort then removes the new files).
 */
extern int chain_commit (struct chain *c);
/* Release c: after a failure (chain_abort removes the new files), or
 * after chain_commit (chain_end).
 */
extern void chain_abort (struct chain *c);
extern void chain_end (struct chain *c);
/* Offline commands on a chain or a store at rest. */
extern int run_chain (const struct command *cmd, char **operands,
                      FILE *out);
extern int run_consolidate (const struct command *cmd, char **operands,
                            FILE *out);
extern int run_discard (const struct command *cmd, char **operands,
                        FILE *out);

/* check.c */
/* Verify a store or chain offline.  Return 0 when clean, 2 when
 * problems were found (printed on out), -1 on error.
 */
extern int run_check (const struct command *cmd, char **operands,
                      FILE *out);

/* main.c */
extern const struct command *find_command (const char *name);
/* While set, messages of snap_error go to it instead of stderr (check
 * collects them as problems).
 */
extern void (*snap_error_hook) (const char *msg);

/* jobs.c */
extern bool job_wait;           /* delete, revert --wait */
/* Run functions of delete, revert, cancel and wait; print function of
 * jobs.
 */
extern int run_delete (const struct command *cmd, char **operands,
                       FILE *out);
extern int run_revert (const struct command *cmd, char **operands,
                       FILE *out);
extern int run_cancel (const struct command *cmd, char **operands,
                       FILE *out);
extern int run_wait (const struct command *cmd, char **operands, FILE *out);
extern int print_jobs (const struct command *cmd,
                       const struct json_object *reply, FILE *out);

/* output.c */
/* Print reply minus its "ok" member as one line of JSON. */
extern int print_json_reply (const struct command *cmd,
                             const struct json_object *reply, FILE *out);
/* Human output of list, info, create and delete replies. */
extern int print_delete (const struct command *cmd,
                         const struct json_object *reply, FILE *out);
extern int print_list (const struct command *cmd,
                       const struct json_object *reply, FILE *out);
extern int print_info (const struct command *cmd,
                       const struct json_object *reply, FILE *out);
extern int print_create (const struct command *cmd,
                         const struct json_object *reply, FILE *out);

#endif /* NBDSNAP_H */
