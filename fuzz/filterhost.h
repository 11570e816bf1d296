/* nbdkit-snapshot fuzzing: the filter run in the fuzzer's process, as
 * nbdkit runs it (its callbacks, in nbdkit's order), over a volume in
 * memory (nbdkit-stubs.c).
 */
#ifndef SNAP_FUZZ_FILTERHOST_H
#define SNAP_FUZZ_FILTERHOST_H

#include <stdbool.h>
#include <stdint.h>

#include <nbdkit-filter.h>

/* The origin: a copy of size bytes of data (with data NULL, a pattern
 * that differs in every page); what it holds now.  fuzz_origin_next
 * returns the context a client request would be given.
 */
extern void fuzz_origin_set (const uint8_t *data, uint64_t size);
extern const uint8_t *fuzz_origin_get (uint64_t *size);
extern nbdkit_next *fuzz_origin_next (void);

/* Print the filter's last few messages (nbdkit-stubs.c). */
extern void fuzz_print_errors (void);

/* The filter's callbacks. */
extern struct nbdkit_filter *fh_filter (void);

/* Start the filter over the store directory dir with the parameters
 * params ("key=value" strings, NULL-terminated; snapshot-store is
 * added): .config, .config_complete, .get_ready, .after_fork.  Return
 * 0, or -1 after cleaning up (the filter reported why).
 */
extern int fh_start (const char *dir, const char *const *params);

/* Stop it: .cleanup. */
extern void fh_stop (void);

/* Wait up to ms milliseconds for the running job, if any, to end. */
extern void fh_wait_job (int ms);

/* A client's connection to export name: open and prepare it (NULL if
 * the filter refuses), use it, close it.
 */
extern void *fh_open (const char *exportname, bool readonly);
extern void fh_close (void *handle);

/* Build a store in dir with the filter: the origin (size bytes) filled
 * with a pattern, then for each character of script: 'w' writes a few
 * pages, 's' takes a snapshot, 'b' a bitmap-only checkpoint, 'd'
 * deletes the oldest snapshot and waits for the merge.  mode is "row"
 * or "cbw".  Return 0 or -1.
 */
extern int fh_build_store (const char *dir, const char *mode, uint64_t size,
                           const char *script);

/* Copy the files of directory from into directory to (created). */
extern void fh_copy_dir (const char *from, const char *to);

/* The template stores the journal and control harnesses start from,
 * built with the filter on first use: row (cbw false) or cbw, a volume
 * of 1 MiB with writes between snapshots s1 to s4 and a bitmap-only
 * checkpoint b1, then s1 deleted (merged).
 * fh_template_copy puts a copy of one in dir/store and its origin in
 * place, and returns the store's path (static storage).
 */
extern const char *fh_template_copy (bool cbw, const char *dir);

/* Wait up to wait_ms for the running job to end, stop the filter, and
 * check the store it stopped cleanly: it starts again with params, and
 * with at_rest, the snapstore plugin's reader opens it (which refuses
 * files the store format does not explain, where the filter leaves
 * them alone).  Abort if not.
 */
extern void fh_stop_and_check (const char *store, const char *const *params,
                               int wait_ms, bool at_rest);

#endif /* SNAP_FUZZ_FILTERHOST_H */
