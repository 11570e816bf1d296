/* nbdsnap: option parsing and command dispatch. */
#include <config.h>

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"
#include "nbdsnap.h"

const char *control = NULL;
bool json_output = false;
const char *backup_to = NULL;
const char *backup_since = NULL;
const char *backup_name = NULL;
const char *backup_base = NULL;
unsigned backup_requests = 16;
bool progress_bar = false;
int progress_fd = -1;
bool bitmap_only = false;

/* The commands, in the order usage lists them.  A command that talks
 * to the control socket with a request of the plain form
 * {"cmd":NAME[,"name":NAME]} needs only a print function; others
 * provide their own run function.
 */
static const struct command commands[] = {
  { .name = "list", .operands = "",
    .min_operands = 0, .max_operands = 0,
    .description = "list checkpoints, oldest first",
    .run = run_control, .print = print_list },
  { .name = "info", .operands = "NAME",
    .min_operands = 1, .max_operands = 1, .name_operand = true,
    .description = "show checkpoint NAME",
    .run = run_control, .print = print_info },
  { .name = "create", .operands = "NAME", .options = "[--bitmap-only]",
    .min_operands = 1, .max_operands = 1, .name_operand = true,
    .description = "take snapshot (or bitmap-only checkpoint) NAME now",
    .run = run_control, .print = print_create },
  { .name = "delete", .operands = "NAME",
    .options = "[--strategy=auto|commit|stream] [--output=FILE] "
               "[--keep-bitmap] [--wait [--progress[=FD]]]",
    .min_operands = 1, .max_operands = 1, .name_operand = true,
    .description = "delete checkpoint NAME (a snapshot: merge its data)",
    .run = run_delete },
  { .name = "revert", .operands = "NAME",
    .options = "[--wait [--progress[=FD]]]",
    .min_operands = 1, .max_operands = 1, .name_operand = true,
    .description = "make the live volume snapshot NAME",
    .run = run_revert },
  { .name = "jobs", .operands = "",
    .min_operands = 0, .max_operands = 0,
    .description = "list background jobs",
    .run = run_control, .print = print_jobs },
  { .name = "wait", .operands = "[JOB]", .options = "[--progress[=FD]]",
    .min_operands = 0, .max_operands = 1,
    .description = "wait for job JOB (default: every running job)",
    .run = run_wait },
  { .name = "cancel", .operands = "JOB",
    .min_operands = 1, .max_operands = 1,
    .description = "stop job JOB, leaving every view intact",
    .run = run_cancel },
  { .name = "backup", .operands = "URI",
    .options = "--to FILE|DIR [--since CHECKPOINT] [--name NAME] "
               "[--base FILE] [--progress[=FD]] [--requests N]",
    .min_operands = 1, .max_operands = 1,
    .description = "copy NBD export URI, or its changes, to a file or chain",
    .run = run_backup },
  { .name = "chain", .operands = "DIR",
    .min_operands = 1, .max_operands = 1, .offline = true,
    .description = "list the restore points of backup chain (or store) DIR",
    .run = run_chain },
  { .name = "consolidate", .operands = "DIR NAME",
    .options = "[--strategy=auto|commit|stream] [--progress[=FD]]",
    .min_operands = 2, .max_operands = 2, .offline = true,
    .description = "merge restore point NAME's data into the next one's",
    .run = run_consolidate },
  { .name = "discard", .operands = "DIR NAME",
    .min_operands = 2, .max_operands = 2, .offline = true,
    .description = "drop the newest restore point NAME and its data",
    .run = run_discard },
  { .name = "check", .operands = "DIR",
    .min_operands = 1, .max_operands = 1, .offline = true,
    .description = "verify store or backup chain DIR offline",
    .run = run_check },
};
#define NR_COMMANDS (sizeof commands / sizeof commands[0])

enum {
  BITMAP_ONLY_OPTION = CHAR_MAX + 1,
  KEEP_BITMAP_OPTION,
  OUTPUT_OPTION,
  STRATEGY_OPTION,
  HELP_OPTION,
  JSON_OPTION,
  LONG_OPTIONS,
  NAME_OPTION,
  BASE_OPTION,
  PROGRESS_OPTION,
  REQUESTS_OPTION,
  SHORT_OPTIONS,
  SINCE_OPTION,
  TO_OPTION,
  WAIT_OPTION,
};

static const char short_options[] = "c:V";
static const struct option long_options[] = {
  { "bitmap-only",   no_argument,       NULL, BITMAP_ONLY_OPTION },
  { "keep-bitmap",   no_argument,       NULL, KEEP_BITMAP_OPTION },
  { "output",        required_argument, NULL, OUTPUT_OPTION },
  { "strategy",      required_argument, NULL, STRATEGY_OPTION },
  { "control",       required_argument, NULL, 'c' },
  { "help",          no_argument,       NULL, HELP_OPTION },
  { "json",          no_argument,       NULL, JSON_OPTION },
  { "long-options",  no_argument,       NULL, LONG_OPTIONS },
  { "name",          required_argument, NULL, NAME_OPTION },
  { "base",          required_argument, NULL, BASE_OPTION },
  { "progress",      optional_argument, NULL, PROGRESS_OPTION },
  { "requests",      required_argument, NULL, REQUESTS_OPTION },
  { "short-options", no_argument,       NULL, SHORT_OPTIONS },
  { "since",         required_argument, NULL, SINCE_OPTION },
  { "to",            required_argument, NULL, TO_OPTION },
  { "version",       no_argument,       NULL, 'V' },
  { "wait",          no_argument,       NULL, WAIT_OPTION },
  { NULL }
};

void (*snap_error_hook) (const char *msg);

void
snap_verror (const char *fs, va_list args)
{
  int saved = errno;            /* for %m in fs */

  if (snap_error_hook) {
    char *msg;

    if (vasprintf (&msg, fs, args) != -1) {
      snap_error_hook (msg);
      free (msg);
    }
    errno = saved;
    return;
  }
  fputs ("nbdsnap: ", stderr);
  errno = saved;
  vfprintf (stderr, fs, args);
  fputc ('\n', stderr);
}

static void usage (FILE *fp, int exit_code) __attribute__ ((noreturn));

static void
usage (FILE *fp, int exit_code)
{
  fprintf (fp,
"nbdsnap: control a running nbdkit-snapshot-filter\n"
"\n"
"Usage:\n"
"  nbdsnap [-c SOCKET|STORE-DIR] [--json] COMMAND [OPERANDS]\n"
"\n"
"Commands:\n");
  for (size_t i = 0; i < NR_COMMANDS; ++i) {
    char buf[64];

    snprintf (buf, sizeof buf, "%s%s%s", commands[i].name,
              commands[i].operands[0] ? " " : "", commands[i].operands);
    /* A long synopsis gets a line of its own. */
    if (strlen (buf) >= 18)
      fprintf (fp, "  %s\n  %-18s%s\n", buf, "", commands[i].description);
    else
      fprintf (fp, "  %-18s%s\n", buf, commands[i].description);
  }
  fprintf (fp,
"\n"
"Options:\n"
"  -c, --control SOCKET|STORE-DIR\n"
"                    the control socket, or the store directory that\n"
"                    holds control.sock (default: $NBDSNAP_CONTROL)\n"
"  --json            print results as one line of JSON\n"
"  --help            print this help and exit\n"
"  -V, --version     print the version and exit\n"
"\n"
"Offline commands (chain, consolidate, discard, check) work on the\n"
"directory DIR itself, with no server.\n"
"\n"
"Options of delete and revert:\n"
"  --wait            wait for the job they start to end, as wait JOB\n"
"                    does (with --progress[=FD] as wait has it)\n"
"\n"
"Options of backup (which does not use the control socket):\n"
"  --to FILE|DIR     the file to write, or the backup chain (a directory,\n"
"                    or a path ending in '/') to add a restore point to\n"
"                    (required)\n"
"  --since CHECKPOINT\n"
"                    copy only the blocks changed since CHECKPOINT onto\n"
"                    FILE, which holds the previous backup, or into DIR,\n"
"                    whose newest restore point is CHECKPOINT\n"
"  --name NAME       the chain's new restore point (default: the NAME of\n"
"                    an export snap/NAME)\n"
"  --base FILE       start chain DIR over FILE, the full backup of\n"
"                    CHECKPOINT (with --since)\n"
"  --progress[=FD]   draw a progress bar, or write N/100 lines to FD\n"
"  --requests N      reads in flight, 1 to 64 (default 16)\n"
"\n"
"Examples:\n"
"  nbdsnap -c disk.snap create nightly\n"
"  nbdsnap -c disk.snap/control.sock --json list\n"
"  nbdsnap backup 'nbd+unix:///snap/s2?socket=/tmp/sock' \\\n"
"          --since s1 --to disk.bak\n"
"  nbdsnap backup 'nbd+unix:///snap/s2?socket=/tmp/sock' \\\n"
"          --since s1 --to disk.chain/\n"
"  nbdsnap check disk.chain\n"
"\n"
"Please read the nbdsnap(1) manual page for full usage.\n");
  exit (exit_code);
}

/* Misuse of one command: say what is wrong and show its synopsis. */
static void command_usage (const struct command *cmd, const char *fs, ...)
  __attribute__ ((noreturn, format (printf, 2, 3)));

static void
command_usage (const struct command *cmd, const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  snap_verror (fs, args);
  va_end (args);
  fprintf (stderr, "Usage: nbdsnap %s[--json] %s%s%s%s%s\n",
           cmd->run != run_backup && !cmd->offline
           ? "[-c SOCKET|STORE-DIR] " : "",
           cmd->name, cmd->operands[0] ? " " : "", cmd->operands,
           cmd->options ? " " : "", cmd->options ? cmd->options : "");
  exit (EXIT_FAILURE);
}

/* Parse the number given to option: digits only, from min to max. */
static unsigned
parse_number (const char *option, const char *arg, unsigned min,
              unsigned max)
{
  unsigned long v;
  char *end;

  errno = 0;
  v = strtoul (arg, &end, 10);
  if (arg[0] < '0' || arg[0] > '9' || *end != '\0' || errno != 0 ||
      v < min || v > max) {
    snap_error ("%s: invalid value '%s' (expected a number from %u to %u)",
                option, arg, min, max);
    exit (EXIT_FAILURE);
  }
  return v;
}

const struct command *
find_command (const char *name)
{
  for (size_t i = 0; i < NR_COMMANDS; ++i)
    if (strcmp (commands[i].name, name) == 0)
      return &commands[i];
  return NULL;
}

/* Run cmd with its results spooled in memory, then copy them to
 * stdout only if it succeeded.
 */
static int
run_spooled (const struct command *cmd, char **operands)
{
  char *buf = NULL;
  size_t size = 0;
  FILE *out;
  int r;

  out = open_memstream (&buf, &size);
  if (out == NULL) {
    snap_error ("open_memstream: %m");
    return -1;
  }
  r = cmd->run (cmd, operands, out);
  if (fclose (out) == EOF) {
    snap_error ("%s: spooling output: %m", cmd->name);
    r = -1;
  }
  /* 2 (check: problems found) is a result too. */
  if (r >= 0 && size > 0 &&
      fwrite (buf, 1, size, stdout) != size) {
    snap_error ("stdout: %m");
    r = -1;
  }
  free (buf);
  return r;
}

int
main (int argc, char *argv[])
{
  const struct command *cmd;
  const char *backup_option = NULL;     /* one given, for messages */
  const char *delete_option = NULL;     /* likewise */
  char **operands;
  int c, nr_operands, r;

  /* getopt prefixes its messages with argv[0]: make them
   * "nbdsnap: ..." like every other message, whatever the path.
   */
  if (argc > 0)
    argv[0] = (char *) "nbdsnap";

  /* Options may come before or after the command (getopt_long
   * permutes); "--" ends them.
   */
  while ((c = getopt_long (argc, argv, short_options, long_options,
                           NULL)) != -1) {
    switch (c) {
    case 'c':
      control = optarg;
      break;
    case JSON_OPTION:
      json_output = true;
      break;
    case BITMAP_ONLY_OPTION:
      bitmap_only = true;
      break;
    case KEEP_BITMAP_OPTION:
      delete_keep_bitmap = true;
      delete_option = "--keep-bitmap";
      break;
    case OUTPUT_OPTION:
      delete_output = optarg;
      delete_option = "--output";
      break;
    case STRATEGY_OPTION:
      delete_strategy = optarg;
      delete_option = "--strategy";
      break;
    case WAIT_OPTION:
      job_wait = true;
      break;
    case TO_OPTION:
      backup_to = optarg;
      backup_option = "--to";
      break;
    case SINCE_OPTION:
      backup_since = optarg;
      backup_option = "--since";
      break;
    case NAME_OPTION:
      backup_name = optarg;
      backup_option = "--name";
      break;
    case BASE_OPTION:
      backup_base = optarg;
      backup_option = "--base";
      break;
    case PROGRESS_OPTION:
      if (optarg)
        progress_fd = parse_number ("--progress", optarg, 0, INT_MAX);
      else
        progress_bar = true;
      backup_option = "--progress";
      break;
    case REQUESTS_OPTION:
      backup_requests = parse_number ("--requests", optarg, 1, 64);
      backup_option = "--requests";
      break;
    case HELP_OPTION:
      usage (stdout, EXIT_SUCCESS);
    case 'V':
      printf ("nbdsnap %s\n", PACKAGE_VERSION);
      fflush (stdout);
      exit (EXIT_SUCCESS);
    case LONG_OPTIONS:
      for (size_t i = 0; long_options[i].name != NULL; ++i)
        if (strcmp (long_options[i].name, "long-options") != 0 &&
            strcmp (long_options[i].name, "short-options") != 0)
          printf ("--%s\n", long_options[i].name);
      exit (EXIT_SUCCESS);
    case SHORT_OPTIONS:
      for (size_t i = 0; short_options[i]; ++i)
        if (short_options[i] != ':')
          printf ("-%c\n", short_options[i]);
      exit (EXIT_SUCCESS);
    default:                    /* getopt has printed the reason */
      usage (stderr, EXIT_FAILURE);
    }
  }

  if (optind >= argc) {
    snap_error ("no command given");
    usage (stderr, EXIT_FAILURE);
  }
  cmd = find_command (argv[optind]);
  if (cmd == NULL) {
    snap_error ("unknown command '%s'", argv[optind]);
    usage (stderr, EXIT_FAILURE);
  }
  operands = &argv[optind + 1];
  nr_operands = argc - optind - 1;
  if (nr_operands < cmd->min_operands)
    command_usage (cmd, "%s: missing %s", cmd->name, cmd->operands);
  if (nr_operands > cmd->max_operands)
    command_usage (cmd, "%s: unexpected operand '%s'",
                   cmd->name, operands[cmd->max_operands]);

  if (job_wait && cmd->run != run_delete && cmd->run != run_revert)
    command_usage (cmd, "%s: --wait is an option of delete and revert only",
                   cmd->name);
  if (cmd->run == run_backup) {
    if (backup_to == NULL)
      command_usage (cmd, "%s: missing --to FILE|DIR", cmd->name);
  }
  else if (cmd->run == run_wait || job_wait || cmd->run == run_consolidate) {
    if (backup_to || backup_since || backup_requests != 16 || backup_name ||
        backup_base)
      command_usage (cmd, "%s: %s is an option of backup only",
                     cmd->name, backup_option);
  }
  else if (backup_option && strcmp (backup_option, "--progress") == 0)
    command_usage (cmd, "%s: --progress is an option of backup, wait, "
                   "and delete or revert with --wait", cmd->name);
  else if (backup_option)
    command_usage (cmd, "%s: %s is an option of backup only",
                   cmd->name, backup_option);
  if (cmd->run == run_consolidate && (delete_output || delete_keep_bitmap))
    command_usage (cmd, "%s: %s is an option of delete only", cmd->name,
                   delete_output ? "--output" : "--keep-bitmap");
  if (delete_option && cmd->run != run_delete &&
      cmd->run != run_consolidate)
    command_usage (cmd, "%s: %s is an option of delete only",
                   cmd->name, delete_option);
  if (bitmap_only && strcmp (cmd->name, "create") != 0)
    command_usage (cmd, "%s: --bitmap-only is an option of create only",
                   cmd->name);

  /* Refuse a bad name here, without contacting the server. */
  if (cmd->name_operand) {
    const char *why = snap_name_invalid (operands[0]);

    if (why) {
      snap_error ("%s: invalid name '%s': %s", cmd->name, operands[0], why);
      exit (EXIT_FAILURE);
    }
  }

  r = run_spooled (cmd, operands);
  if (r == -1)
    exit (EXIT_FAILURE);
  if (fclose (stdout) == EOF) {
    snap_error ("stdout: %m");
    exit (EXIT_FAILURE);
  }
  exit (r == 2 ? 2 : EXIT_SUCCESS);
}
