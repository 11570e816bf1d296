/* Unit tests for common/utils. */
#include <config.h>

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#undef NDEBUG
#include <assert.h>

#include "util.h"

void
snap_verror (const char *fs, va_list args)
{
  vfprintf (stderr, fs, args);
  fputc ('\n', stderr);
}

/* CRC-32 a bit at a time: the definition the fast one must match. */
static uint32_t
crc_bitwise (uint32_t crc, const unsigned char *p, size_t len)
{
  crc = ~crc;
  while (len--) {
    crc ^= *p++;
    for (int k = 0; k < 8; ++k)
      crc = (crc & 1) ? 0xedb88320u ^ (crc >> 1) : crc >> 1;
  }
  return ~crc;
}

int
main (void)
{
  char buf[64];
  char dir[] = "/tmp/test-util.XXXXXX";

  /* CRC-32 check value from the standard. */
  assert (snap_crc32 (0, "123456789", 9) == 0xcbf43926);
  assert (snap_crc32 (snap_crc32 (0, "1234", 4), "56789", 5) == 0xcbf43926);
  {
    /* Every length and alignment around the 8-byte steps. */
    static unsigned char data[4200];
    for (size_t i = 0; i < sizeof data; ++i)
      data[i] = (i * 2654435761u) >> 13;
    for (size_t off = 0; off < 9; ++off)
      for (size_t len = 0; len < 40; ++len)
        assert (snap_crc32 (7, data + off, len) ==
                crc_bitwise (7, data + off, len));
    assert (snap_crc32 (0, data + 3, 4096) == crc_bitwise (0, data + 3, 4096));
  }

  /* Names. */
  assert (snap_name_invalid ("nightly") == NULL);
  assert (snap_name_invalid ("a.b_c-D9") == NULL);
  assert (snap_name_invalid ("") != NULL);
  assert (snap_name_invalid (".hidden") != NULL);
  assert (snap_name_invalid ("-opt") != NULL);
  assert (snap_name_invalid ("../x") != NULL);
  assert (snap_name_invalid ("a/b") != NULL);
  assert (snap_name_invalid ("sp ace") != NULL);
  {
    char longname[80];
    memset (longname, 'x', sizeof longname);
    longname[64] = '\0';
    assert (snap_name_invalid (longname) == NULL);   /* 64: the limit */
    longname[64] = 'x';
    longname[65] = '\0';
    assert (snap_name_invalid (longname) != NULL);   /* 65: too long */
  }

  /* Sizes and times. */
  assert (strcmp (human_size (buf, sizeof buf, 512), "512 B") == 0);
  assert (strcmp (human_size (buf, sizeof buf, 1536), "1.5 KiB") == 0);
  assert (strcmp (human_size (buf, sizeof buf, 1ULL << 30), "1.0 GiB") == 0);
  assert (strcmp (iso_time (buf, sizeof buf, 0), "1970-01-01T00:00:00Z") == 0);

  /* Escaping for messages. */
  assert (strcmp (snap_escape ("snap/a", buf, sizeof buf), "snap/a") == 0);
  assert (strcmp (snap_escape ("a\nb\\c\xff", buf, sizeof buf),
                  "a\\x0ab\\x5cc\\xff") == 0);
  {
    char small[16], longs[100];
    memset (longs, 'y', sizeof longs - 1);
    longs[sizeof longs - 1] = '\0';
    snap_escape (longs, small, sizeof small);
    assert (strlen (small) < sizeof small);
    assert (strcmp (small + strlen (small) - 3, "...") == 0);
  }
  assert (snap_printable ("dirty/a/b c~"));
  assert (!snap_printable ("x\ty"));
  assert (!snap_printable ("\xc3\xa9"));

  /* Atomic replace. */
  assert (mkdtemp (dir) != NULL);
  assert (write_file_atomic (dir, "f", "one", 3) == 0);
  assert (write_file_atomic (dir, "f", "two!", 4) == 0);
  {
    char path[128], got[8] = { 0 };
    FILE *fp;
    snprintf (path, sizeof path, "%s/f", dir);
    fp = fopen (path, "r");
    assert (fp);
    assert (fread (got, 1, sizeof got, fp) == 4);
    fclose (fp);
    assert (strcmp (got, "two!") == 0);
    unlink (path);
    snprintf (path, sizeof path, "%s/.f.tmp", dir);
    assert (access (path, F_OK) == -1);
  }
  rmdir (dir);
  printf ("test-util: ok\n");
  return 0;
}
