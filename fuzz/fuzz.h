/* nbdkit-snapshot fuzzing: helpers shared by the harnesses.
 *
 * Every harness writes its input into files in a private directory
 * under FUZZ_TMPDIR (default /dev/shm, else /tmp) and calls the real
 * loader on them.  Store-shaped inputs use a small archive format
 * (fuzz_unpack) so that one input can hold a whole store directory,
 * sparse files included.
 *
 * Checksums: a mutated manifest or map header would nearly always
 * fail its CRC, so the fuzzer would never get past it.  Inputs carry a
 * flag that asks for the CRCs to be recomputed before the files are
 * written (fuzz_fix_manifest, fuzz_fix_mapfile); without it, the
 * input is written exactly as it is, and the checksum checks are
 * fuzzed too.
 */
#ifndef SNAP_FUZZ_H
#define SNAP_FUZZ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A byte reader over the fuzz input. */
struct fuzz_in {
  const uint8_t *p;
  size_t left;
};

extern uint8_t fuzz_u8 (struct fuzz_in *in);
extern uint16_t fuzz_u16 (struct fuzz_in *in);
extern uint32_t fuzz_u32 (struct fuzz_in *in);
extern uint64_t fuzz_u64 (struct fuzz_in *in);

/* Make a fresh private directory (mkdtemp) for one input and return
 * its path (static storage, valid until the next call), or abort.
 */
extern const char *fuzz_mkdir (void);

/* The directory of this process that holds those (made on first use). */
extern const char *fuzz_root (void);

/* Remove directory path and everything in it (no symlink followed). */
extern void fuzz_rmtree (const char *path);

/* Write len bytes to dir/name (created 0600, replaced if there). */
extern void fuzz_write_file (const char *dir, const char *name,
                             const void *data, size_t len);

/* Recompute the crc line of a manifest's text in buf (len bytes, room
 * for at least len + 32): the last line starting "crc " gets the
 * CRC-32 of every byte before it.  Return the new length.
 */
extern size_t fuzz_fix_manifest (char *buf, size_t len);

/* Recompute the header CRC of a map file in buf (len bytes), and the
 * seal's CRC if the header has a seal, when buf starts with the map
 * magic.
 */
extern void fuzz_fix_mapfile (uint8_t *buf, size_t len);

/* Copy len bytes of text to out with each "@DIR@" replaced by dir (a
 * path an input cannot know in advance).  out has room for len times
 * (strlen (dir) + 1) bytes.  Return the length written.
 */
extern size_t fuzz_subst (char *out, const char *text, size_t len,
                          const char *dir);

/* Unpack an archive into directory dir.  The format, repeated to the
 * end of the input:
 *
 *   u8 namelen, name[namelen]    a file name (no '/'; others skipped)
 *   u32 size                     the file's size (at most 64 MiB)
 *   u8 nextents, then for each:  data at offsets, the rest are holes
 *     u32 offset, u16 len, data[len]
 *
 * Integers are little-endian; what runs past the end is cut short.
 * With fix, manifests and map files get their checksums recomputed.
 */
extern void fuzz_unpack (const char *dir, const uint8_t *data, size_t size,
                         bool fix);

/* Descriptor leaks: fuzz_fds counts the open descriptors (pipes left
 * out: the filter keeps one open for the life of the process), and
 * fuzz_fds_check aborts, naming them, if more are open than before.
 */
extern int fuzz_fds (void);
extern void fuzz_fds_check (int before);

/* The end of an input: remove its directory dir, check that no
 * descriptor was left open since fuzz_fds gave fds.
 */
extern void fuzz_done (const char *dir, int fds);

/* Whether FUZZ_VERBOSE is set in the environment: then the product's
 * error messages are printed (they are formatted either way).
 */
extern bool fuzz_verbose (void);

#endif /* SNAP_FUZZ_H */
