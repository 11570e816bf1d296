/* Unit tests for the store manifest. */
#include <config.h>

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#undef NDEBUG
#include <assert.h>

#include "manifest.h"

static char last_error[1024];

void
snap_verror (const char *fs, va_list args)
{
  vsnprintf (last_error, sizeof last_error, fs, args);
  fprintf (stderr, "error: %s\n", last_error);
}

/* Parse text and expect an error containing want. */
static void
expect_error (const char *text, const char *want)
{
  struct manifest m;

  last_error[0] = '\0';
  assert (manifest_parse ("t", text, strlen (text), &m) == -1);
  if (strstr (last_error, want) == NULL) {
    fprintf (stderr, "wanted '%s' in '%s'\n", want, last_error);
    abort ();
  }
}

/* Re-render text with a correct crc line appended. */
static char *
with_crc (const char *body)
{
  char *s;
  assert (asprintf (&s, "%scrc 0x%08x\n", body,
                    snap_crc32 (0, body, strlen (body))) > 0);
  return s;
}

/* Expect an error containing want from body with its crc line. */
static void
expect_body_error (const char *body, const char *want)
{
  char *s = with_crc (body);

  expect_error (s, want);
  free (s);
}

int
main (void)
{
  struct manifest m = { 0 }, m2;
  char dir[] = "/tmp/test-manifest.XXXXXX";
  char *text, *s;
  size_t len;

  m.mode = MODE_ROW;
  m.block_size = 65536;
  m.size = 1ULL << 40;
  m.next_id = 10;
  assert (manifest_add_layer (&m, 1) == 0);
  assert (manifest_add_layer (&m, 4) == 0);
  {
    struct manifest_checkpoint c1 = { .name = "nightly",
      .kind = CKPT_SNAPSHOT, .created = 1764383400, .layer = 1, .map = 2 };
    struct manifest_checkpoint c2 = { .name = "bk",
      .kind = CKPT_BITMAP, .created = 1764385000, .map = 3 };
    struct manifest_checkpoint c3 = { .name = "a.b-c_9",
      .kind = CKPT_SNAPSHOT, .created = 1764387000, .layer = 4, .map = 5 };
    assert (manifest_add_checkpoint (&m, &c1) == 0);
    assert (manifest_add_checkpoint (&m, &c2) == 0);
    assert (manifest_add_checkpoint (&m, &c3) == 0);
  }

  m.origin_retired = true;
  m.job.kind = JOB_DELETE;
  m.job.id = 9;
  strcpy (m.job.name, "nightly");
  m.job.strategy = STRATEGY_STREAM;
  m.job.keep_bitmap = true;
  strcpy (m.job.output, "/var/tmp/new.img");
  m.has_origin_file = true;
  m.origin_dev = 65024;
  m.origin_ino = 10952929;
  strcpy (m.origin_path, "/srv/images/vm.img");

  /* Round trip through text. */
  text = manifest_format (&m, &len);
  assert (text);
  assert (manifest_parse ("t", text, len, &m2) == 0);
  assert (m2.mode == MODE_ROW && m2.block_size == 65536);
  assert (m2.size == 1ULL << 40 && m2.next_id == 10);
  assert (m2.nlayers == 2 && m2.layers[0] == 1 && m2.layers[1] == 4);
  assert (m2.nckpts == 3);
  assert (m2.ckpts[1].kind == CKPT_BITMAP && m2.ckpts[1].map == 3);
  assert (m2.ckpts[1].layer == 0);
  assert (strcmp (m2.ckpts[2].name, "a.b-c_9") == 0);
  assert (m2.ckpts[2].kind == CKPT_SNAPSHOT);
  assert (m2.ckpts[2].created == 1764387000 && m2.ckpts[2].layer == 4);
  assert (m2.ckpts[2].map == 5);
  assert (manifest_find_checkpoint (&m2, "nightly") == 0);
  assert (manifest_find_checkpoint (&m2, "nope") == -1);
  assert (m2.origin_retired);
  assert (m2.job.kind == JOB_DELETE && m2.job.id == 9);
  assert (strcmp (m2.job.name, "nightly") == 0);
  assert (m2.job.strategy == STRATEGY_STREAM && m2.job.keep_bitmap);
  assert (strcmp (m2.job.output, "/var/tmp/new.img") == 0);
  assert (m2.has_origin_file && m2.origin_dev == 65024 &&
          m2.origin_ino == 10952929);
  assert (strcmp (m2.origin_path, "/srv/images/vm.img") == 0);
  {
    struct manifest m3;
    assert (manifest_dup (&m2, &m3) == 0);
    manifest_remove_layer (&m3, 1);
    assert (m3.nlayers == 1 && m3.layers[0] == 4);
    assert (m2.nlayers == 2 && m2.layers[0] == 1);   /* a real copy */
    assert (m3.nckpts == 3 && m3.ckpts != m2.ckpts);
    manifest_free (&m3);
  }
  manifest_remove_checkpoint (&m2, 1);
  assert (m2.nckpts == 2 && strcmp (m2.ckpts[1].name, "a.b-c_9") == 0);
  manifest_free (&m2);

  /* Every single-byte corruption is refused. */
  for (size_t i = 0; i < len; ++i) {
    char saved = text[i];
    text[i] ^= 0x01;
    assert (manifest_parse ("t", text, len, &m2) == -1);
    text[i] = saved;
  }
  /* Truncation at any point is refused. */
  for (size_t i = 0; i < len; ++i)
    assert (manifest_parse ("t", text, i, &m2) == -1);
  free (text);

  expect_error ("", "empty file");
  expect_error ("hello world\n", "not an nbdkit-snapshot store manifest");
  s = with_crc ("nbdkit-snapshot-store 2\n");
  expect_error (s, "store format version 2, expected 1");
  free (s);
  s = with_crc ("nbdkit-snapshot-store 1\ngeneration 1\nmode row\n"
                "block-size 3000\nsize 1\nnext-id 1\n");
  expect_error (s, "block size 3000");
  free (s);
  s = with_crc ("nbdkit-snapshot-store 1\ngeneration 1\nmode xyz\n");
  expect_error (s, "unknown mode 'xyz'");
  free (s);
  s = with_crc ("nbdkit-snapshot-store 1\ngeneration 1\nmode row\n"
                "block-size 4096\nsize 1\n");
  expect_error (s, "required key is missing");
  free (s);
  s = with_crc ("nbdkit-snapshot-store 1\ngeneration 1\nmode row\n"
                "block-size 4096\nsize 1\nnext-id 3\ncheckpoint ../x "
                "kind=bitmap created=1 map=1\n");
  expect_error (s, "invalid name '../x'");
  free (s);
  s = with_crc ("nbdkit-snapshot-store 1\ngeneration 1\nmode row\n"
                "block-size 4096\nsize 1\nnext-id 3\nlayer 2\nlayer 1\n");
  expect_error (s, "layer ids must increase");
  free (s);
  s = with_crc ("nbdkit-snapshot-store 1\ngeneration 1\nmode row\n"
                "block-size 4096\nsize 1\nnext-id 2\nlayer 2\n");
  expect_error (s, "next-id 2 is not above");
  free (s);
  expect_error ("nbdkit-snapshot-store 1\ncrc 0x00000000\n", "damaged");
  s = with_crc ("nbdkit-snapshot-store 1\ngeneration 1\nmode row\n"
                "block-size 4096\nsize 1\nnext-id 3\n"
                "job 1 revert a\njob 2 revert b\n");
  expect_error (s, "a second job");
  free (s);
  s = with_crc ("nbdkit-snapshot-store 1\ngeneration 1\nmode row\n"
                "block-size 4096\nsize 1\nnext-id 3\n"
                "job 1 delete a strategy=sideways keep-bitmap=0 output=-\n");
  expect_error (s, "bad job line");
  free (s);
  /* A job line: the name is read whole (not cut at 65 characters into
   * the next field), and checked; the job's id is one of the store's;
   * the strategy is the mode's.
   */
  {
    static const char *const bad_jobs[][2] = {
      { "job 2 revert aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        "aaaaaaaaa\n", "invalid name" },
      { "job 2 delete ../x strategy=stream keep-bitmap=0 output=-\n",
        "invalid name" },
      { "job 2 delete s strategy=stream keep-bitmap=2 output=-\n",
        "bad job line" },
      { "job 2 delete s strategy=stream keep-bitmap=0 output=rel.img\n",
        "bad job line" },
      { "job 3 revert s\n", "outside 1..next-id" },
      { "job 0 revert s\n", "outside 1..next-id" },
      { "job 2 delete s strategy=move keep-bitmap=0 output=-\n",
        "delete by move, which a row store" },
    };
    for (size_t i = 0; i < sizeof bad_jobs / sizeof bad_jobs[0]; ++i) {
      char *body;
      assert (asprintf (&body, "nbdkit-snapshot-store 1\ngeneration 1\n"
                        "mode row\nblock-size 4096\nsize 1\nnext-id 3\n"
                        "layer 1\ncheckpoint s kind=snapshot created=1 "
                        "layer=1 map=2\n%s", bad_jobs[i][0]) > 0);
      expect_body_error (body, bad_jobs[i][1]);
      free (body);
    }
    expect_body_error ("nbdkit-snapshot-store 1\ngeneration 1\nmode cbw\n"
                       "block-size 4096\nsize 1\nnext-id 4\nlayer 1\n"
                       "checkpoint s kind=snapshot created=1 layer=1 "
                       "map=2\njob 3 delete s strategy=stream "
                       "keep-bitmap=0 output=-\n",
                       "delete by stream, which a cbw store");
  }
  /* Duplicates anywhere in the lists (found on sorted copies). */
  expect_body_error ("nbdkit-snapshot-store 1\ngeneration 1\nmode row\n"
                     "block-size 4096\nsize 1\nnext-id 9\n"
                     "checkpoint x kind=bitmap created=1 map=1\n"
                     "checkpoint y kind=bitmap created=1 map=2\n"
                     "checkpoint x kind=bitmap created=1 map=3\n",
                     "checkpoint 'x' appears twice");
  expect_body_error ("nbdkit-snapshot-store 1\ngeneration 1\nmode row\n"
                     "block-size 4096\nsize 1\nnext-id 9\n"
                     "checkpoint x kind=bitmap created=1 map=4\n"
                     "checkpoint y kind=bitmap created=1 map=2\n"
                     "checkpoint z kind=bitmap created=1 map=4\n",
                     "map 4 is named by two checkpoints");
  expect_body_error ("nbdkit-snapshot-store 1\ngeneration 1\nmode row\n"
                     "block-size 4096\nsize 1\nnext-id 9\nlayer 3\n"
                     "checkpoint x kind=bitmap created=1 map=3\n",
                     "names map 3, which is a layer");
  {
    /* Drops are kept once each, in order. */
    char *t = with_crc ("nbdkit-snapshot-store 1\ngeneration 1\n"
                        "mode row\nblock-size 4096\nsize 1\nnext-id 9\n"
                        "drop 5\ndrop 2\ndrop 5\ndrop 8\n");
    assert (manifest_parse ("t", t, strlen (t), &m2) == 0);
    assert (m2.ndrops == 3 && m2.drops[0] == 2 && m2.drops[1] == 5 &&
            m2.drops[2] == 8);
    manifest_free (&m2);
    free (t);
  }
  {
    /* Many checkpoints: every check is O(n log n) (comparing each
     * line with every other would take seconds here).
     */
    const size_t n = 50000;
    FILE *fp;
    char *body = NULL, *t;
    size_t blen = 0;

    assert ((fp = open_memstream (&body, &blen)) != NULL);
    fprintf (fp, "nbdkit-snapshot-store 1\ngeneration 1\nmode row\n"
             "block-size 4096\nsize 1\nnext-id %zu\n", 2 * n + 1);
    for (size_t i = 0; i < n; ++i)
      fprintf (fp, "layer %zu\n", 2 * i + 1);
    for (size_t i = 0; i < n; ++i)
      fprintf (fp, "checkpoint c%zu kind=snapshot created=1 layer=%zu "
               "map=%zu\n", i, 2 * i + 1, 2 * i + 2);
    assert (fclose (fp) == 0);
    t = with_crc (body);
    assert (manifest_parse ("t", t, strlen (t), &m2) == 0);
    assert (m2.nckpts == n && m2.nlayers == n);
    manifest_free (&m2);
    free (t);
    free (body);
  }
  /* Sizes and ids past what a volume and the id counter can reach. */
  expect_body_error ("nbdkit-snapshot-store 1\ngeneration 1\nmode row\n"
                     "block-size 4096\nsize 9223372036854775808\n"
                     "next-id 3\n", "size 9223372036854775808 is too large");
  expect_body_error ("nbdkit-snapshot-store 1\ngeneration 1\nmode row\n"
                     "block-size 4096\nsize 1\n"
                     "next-id 9223372036854775808\n",
                     "next-id 9223372036854775808 is too large");
  /* The crc line is "0x" and at most 8 hex digits, nothing else. */
  {
    static const char *const bad_crcs[] = {
      "crc -0x1\n", "crc 0x\n", "crc 0x0x1\n", "crc  0x1\n",
      "crc 0x123456789\n", "crc 0x1 \n", "crc 12\n",
    };
    for (size_t i = 0; i < sizeof bad_crcs / sizeof bad_crcs[0]; ++i)
      expect_error (bad_crcs[i], "bad crc line");
  }
  s = with_crc ("nbdkit-snapshot-store 1\ngeneration 1\nmode row\n"
                "block-size 4096\nsize 1\nnext-id 3\ncheckpoint x "
                "kind=snapshot created=1 layer=1 map=7\n");
  expect_error (s, "names map 7");
  free (s);
  s = with_crc ("nbdkit-snapshot-store 1\ngeneration 1\nmode row\n"
                "block-size 4096\nsize 1\nnext-id 3\ncheckpoint x "
                "kind=weird created=1 map=1\n");
  expect_error (s, "bad checkpoint line");
  free (s);
  s = with_crc ("nbdkit-snapshot-store 1\ngeneration 1\nmode row\n"
                "block-size 4096\nsize 1\nnext-id 3\n"
                "origin-path relative/vm.img\n");
  expect_error (s, "bad origin-path line");
  free (s);
  s = with_crc ("nbdkit-snapshot-store 1\ngeneration 1\nmode row\n"
                "block-size 4096\nsize 1\nnext-id 3\n"
                "origin-path /a b\n");
  expect_error (s, "bad origin-path line");
  free (s);
  /* A manifest refused leaves nothing behind in m: not the path read
   * before the line was found wrong, nor the keys before it.
   */
  s = with_crc ("nbdkit-snapshot-store 1\ngeneration 7\nmode cbw\n"
                "block-size 4096\nsize 1\nnext-id 3\n"
                "origin-path relative/vm.img\n");
  {
    static const struct manifest empty;
    memset (&m2, 0xa5, sizeof m2);
    assert (manifest_parse ("t", s, strlen (s), &m2) == -1);
    assert (memcmp (&m2, &empty, sizeof m2) == 0);
  }
  free (s);

  /* Save and load, generation increments. */
  assert (mkdtemp (dir) != NULL);
  memset (&m2, 0xa5, sizeof m2);
  assert (manifest_load (dir, &m2) == 0);        /* none yet: empty */
  assert (m2.generation == 0 && m2.nckpts == 0 && m2.ckpts == NULL &&
          m2.origin_path[0] == '\0' && m2.job.kind == JOB_NONE);
  assert (manifest_save (dir, &m) == 0);
  assert (m.generation == 1);
  assert (manifest_save (dir, &m) == 0);
  assert (manifest_load (dir, &m2) == 1);
  assert (m2.generation == 2 && m2.nckpts == 3);
  manifest_free (&m2);
  {
    char path[256];
    snprintf (path, sizeof path, "%s/%s", dir, MANIFEST_NAME);
    unlink (path);
  }
  rmdir (dir);
  manifest_free (&m);
  printf ("test-manifest: ok\n");
  return 0;
}
