/* Unit tests for common/json: what it adds to json-c (the checks
 * json_parse makes on top of json-c's strict mode, its error messages,
 * the lookups' typing rules) and the writer.
 */
#include <config.h>

#include <inttypes.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#undef NDEBUG
#include <assert.h>

#include "json.h"

/* Parse a NUL-terminated text that must be valid. */
static struct json_object *
parse_ok (const char *text)
{
  char *err = (char *) "unset";
  struct json_object *v = json_parse (text, strlen (text), &err);

  if (v == NULL && err != NULL) {
    fprintf (stderr, "test-json: rejected valid %s: %s\n", text, err);
    abort ();
  }
  assert (err == NULL);
  return v;
}

/* Parse len bytes that must be refused; if want is not NULL the error
 * message must be exactly want.
 */
static void
parse_bad_len (const char *text, size_t len, const char *want)
{
  char *err = NULL;
  struct json_object *v = json_parse (text, len, &err);

  if (v != NULL) {
    fprintf (stderr, "test-json: accepted invalid %.*s\n", (int) len, text);
    abort ();
  }
  assert (err != NULL);
  assert (strncmp (err, "at byte ", 8) == 0);
  if (want && strcmp (err, want) != 0) {
    fprintf (stderr, "test-json: %.*s: got error \"%s\", wanted \"%s\"\n",
             (int) len, text, err, want);
    abort ();
  }
  free (err);

  /* The message is optional. */
  assert (json_parse (text, len, NULL) == NULL);
}

static void
parse_bad (const char *text, const char *want)
{
  parse_bad_len (text, strlen (text), want);
}

/* Text with n levels of [ ], or of {"a": }. */
static char *
nested (int n, bool object)
{
  char *text = malloc (n * 6 + 1);
  size_t len = 0;

  assert (text);
  for (int d = 0; d < n; ++d) {
    const char *open = object ? (d < n - 1 ? "{\"a\":" : "{") : "[";
    memcpy (text + len, open, strlen (open));
    len += strlen (open);
  }
  memset (text + len, object ? '}' : ']', n);
  text[len + n] = '\0';
  return text;
}

static void
test_parse (void)
{
  struct json_object *v;
  char *text;

  /* One value, white space around it. */
  v = parse_ok (" \t\r\n{\"cmd\":\"list\"}\n ");
  assert (json_object_is_type (v, json_type_object));
  json_free (v);
  v = parse_ok ("null");                /* null is NULL, as in json-c */
  assert (v == NULL);
  json_free (v);

  /* The RFC 8259 forms json-c's strict mode lets through. */
  parse_bad ("NaN", "at byte 0: unexpected character");
  parse_bad ("[Infinity]", "at byte 1: unexpected character");
  parse_bad ("-Infinity", "at byte 0: number expected");
  parse_bad ("-01", "at byte 0: number expected");
  parse_bad ("1.", "at byte 0: number expected");
  parse_bad ("[1.e5]", "at byte 1: number expected");
  parse_bad ("\"a\tb\"", "at byte 2: control character 0x09 must be escaped");
  parse_bad ("{\"a\":\"\x01\"}", NULL);

  /* Numbers: integers exact from INT64_MIN to UINT64_MAX, doubles
   * finite.
   */
  v = parse_ok ("[-9223372036854775808,18446744073709551615,-0,1e-400,"
                "0,1.5,-0.25,1E+2,25e-2,1.0,0.5e-3,10,-7]");
  assert (json_object_array_length (v) == 13);
  json_free (v);
  parse_bad ("-9223372036854775809", "at byte 0: integer out of range");
  parse_bad ("[18446744073709551616]", "at byte 1: integer out of range");
  parse_bad ("123456789012345678901234567890", NULL);
  parse_bad ("1e400", "at byte 0: number out of range");
  parse_bad ("{\"x\":-2e308 }", "at byte 5: number out of range");

  /* UTF-8: well formed only, by RFC 3629. */
  v = parse_ok ("\"h\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \xf4\x8f\xbf\xbf\"");
  json_free (v);
  parse_bad ("\"a\xff\"", "at byte 2: invalid UTF-8");
  parse_bad ("\"\x80\"", NULL);                    /* lone continuation */
  parse_bad ("\"\xc0\xaf\"", "at byte 1: invalid UTF-8");  /* overlong */
  parse_bad ("\"\xe0\x80\xaf\"", NULL);            /* overlong, 3 bytes */
  parse_bad ("\"\xed\xa0\x80\"", NULL);            /* encoded surrogate */
  parse_bad ("\"\xf4\x90\x80\x80\"", NULL);        /* above U+10FFFF */
  parse_bad ("{\"k\xe2\x82\":1}", NULL);           /* in a key */
  parse_bad ("\xef\xbb\xbf{}", NULL);              /* no BOM either */

  /* Escapes decode; \u0000 and NUL bytes are refused; an unpaired
   * surrogate reads as U+FFFD.
   */
  v = parse_ok ("[\"\\u00e9\\ud83d\\ude00\\/\\n\", \"\\ud800x\", \"\\udc00\"]");
  assert (strcmp (json_object_get_string (json_object_array_get_idx (v, 0)),
                  "\xc3\xa9\xf0\x9f\x98\x80/\n") == 0);
  assert (strcmp (json_object_get_string (json_object_array_get_idx (v, 1)),
                  "\xef\xbf\xbdx") == 0);
  assert (strcmp (json_object_get_string (json_object_array_get_idx (v, 2)),
                  "\xef\xbf\xbd") == 0);
  json_free (v);
  parse_bad ("\"ab\\u0000\"", "at byte 3: \\u0000 is not allowed in strings");
  parse_bad ("{\"a\\u0000b\":1}", NULL);
  parse_bad_len ("\"a\0b\"", 5, "at byte 2: NUL byte");
  parse_bad_len ("{}\0", 3, "at byte 2: NUL byte");

  /* A key given twice, however it is spelt, at any depth; the same key
   * in different objects is fine.
   */
  parse_bad ("{\"cmd\":\"list\",\"cmd\":\"create\"}",
             "at byte 14: repeated key \"cmd\"");
  parse_bad ("{\"cmd\":\"list\", \"c\\u006dd\":\"list\"}",
             "at byte 15: repeated key \"cmd\"");
  parse_bad ("[{\"a\":{\"b\":1,\"c\":[{\"b\":2}],\"b\":3}}]",
             "at byte 27: repeated key \"b\"");
  v = parse_ok ("{\"a\":{\"a\":1},\"b\":{\"a\":[{\"a\":2},{\"a\":3}]},\"A\":4}");
  json_free (v);

  /* json-c's errors, at the byte where it stopped (the end of the text
   * for truncated input).
   */
  parse_bad ("", "at byte 0: unexpected end of data");
  parse_bad ("  \n", "at byte 3: unexpected end of data");
  parse_bad ("[1,2", "at byte 4: unexpected end of data");
  parse_bad ("{\"a\":12", "at byte 7: unexpected end of data");
  parse_bad ("{\"a\" 1}",
             "at byte 5: object property name separator ':' expected");
  parse_bad ("[1,]", "at byte 3: unexpected character");
  parse_bad ("{a:1}", "at byte 1: quoted object property name expected");
  parse_bad ("\"\\x\"", "at byte 2: invalid string sequence");

  /* Exactly one value: trailing data is refused. */
  parse_bad ("{} x", "at byte 3: unexpected character");
  parse_bad ("1 2", "at byte 2: unexpected character");
  parse_bad ("[1]]", "at byte 3: unexpected character");
  parse_bad ("{}\f", "at byte 2: unexpected character");

  /* A text need not be NUL-terminated: only len bytes are read. */
  v = json_parse ("[12]garbage", 4, NULL);
  assert (json_object_array_length (v) == 1);
  json_free (v);
  v = json_parse ("12345", 2, NULL);
  assert (json_object_get_int64 (v) == 12);
  json_free (v);

  /* Every proper prefix of a document is refused. */
  {
    const char *doc =
      "{\"ok\":true,\"checkpoint\":{\"name\":\"s1\",\"kind\":\"snapshot\","
      "\"created\":1764383400,\"x\":[1.5e3,-2,null,false,\"\\u00e9\"]}}";
    size_t len = strlen (doc);

    for (size_t n = 0; n < len; ++n)
      parse_bad_len (doc, n, NULL);
    json_free (parse_ok (doc));
  }

  /* Nesting: 64 levels, not 65. */
  text = nested (64, false);
  json_free (parse_ok (text));
  free (text);
  text = nested (64, true);
  json_free (parse_ok (text));
  free (text);
  text = nested (65, false);
  parse_bad (text, "at byte 64: nesting too deep");
  free (text);
  text = nested (65, true);
  parse_bad (text, "at byte 320: nesting too deep");
  free (text);
  {
    /* Very deep input must not exhaust the stack. */
    size_t n = 1000000;

    text = malloc (n);
    assert (text);
    memset (text, '[', n);
    parse_bad_len (text, n, "at byte 64: nesting too deep");
    free (text);
  }
}

static void
test_lookups (void)
{
  struct json_object *v;
  int64_t i;
  double d;
  bool b;

  v = parse_ok ("{\"ok\":true,\"store\":\"/abs/dir\",\"size\":1073741824,"
                "\"max\":9223372036854775807,\"min\":-9223372036854775808,"
                "\"big\":9223372036854775808,\"umax\":18446744073709551615,"
                "\"half\":1.5,\"e\":1e2,\"nothing\":null,"
                "\"list\":[{\"created\":1764383400}]}");
  assert (json_get_bool (v, "ok", &b) && b);
  assert (strcmp (json_get_string (v, "store"), "/abs/dir") == 0);
  assert (json_get_int (v, "size", &i) && i == 1073741824);
  assert (json_get_int (v, "max", &i) && i == INT64_MAX);
  assert (json_get_int (v, "min", &i) && i == INT64_MIN);

  /* Integers past int64_t, and numbers with a fraction or exponent,
   * are numbers but not int64_t integers.
   */
  assert (!json_get_int (v, "big", &i));
  assert (!json_get_int (v, "umax", &i));
  assert (json_get_number (v, "umax", &d) && d == 18446744073709551615.0);
  assert (!json_get_int (v, "half", &i));
  assert (!json_get_int (v, "e", &i));
  assert (json_get_number (v, "half", &d) && d == 1.5);
  assert (json_get_number (v, "e", &d) && d == 100.0);
  assert (json_get_number (v, "size", &d) && d == 1073741824.0);

  /* Wrong types. */
  assert (json_get_string (v, "size") == NULL);
  assert (!json_get_int (v, "store", &i));
  assert (!json_get_bool (v, "store", &b));
  assert (!json_get_number (v, "ok", &d));

  /* Absent, and null: json_has tells them apart. */
  assert (json_get (v, "missing") == NULL && !json_has (v, "missing"));
  assert (json_get (v, "nothing") == NULL && json_has (v, "nothing"));
  assert (json_get_string (v, "nothing") == NULL);
  assert (!json_get_int (v, "nothing", &i));

  /* Not an object. */
  {
    const struct json_object *list = json_get (v, "list");

    assert (json_object_is_type (list, json_type_array));
    assert (json_get (list, "created") == NULL && !json_has (list, "x"));
    assert (json_get_int (json_object_array_get_idx (list, 0), "created", &i)
            && i == 1764383400);
  }
  assert (json_get (NULL, "ok") == NULL && !json_has (NULL, "ok"));
  json_free (v);
}

/* Finish a writer that must have succeeded and compare the text. */
static void
jw_expect (struct jw *w, const char *want)
{
  char *out = jw_finish (w);

  assert (out != NULL);
  if (strcmp (out, want) != 0) {
    fprintf (stderr, "test-json: writer gave %s, wanted %s\n", out, want);
    abort ();
  }
  free (out);
  /* jw_finish reset the writer. */
  assert (w->root == NULL && !w->has_root && w->depth == 0 && !w->error);
}

static void
test_writer (void)
{
  struct jw w;

  /* Commas at every level, every value type, keys in order. */
  jw_init (&w);
  jw_begin_object (&w);
  jw_key (&w, "z");
  jw_begin_array (&w);
  jw_int (&w, 1);
  jw_int (&w, -2);
  jw_begin_object (&w);
  jw_end_object (&w);
  jw_begin_array (&w);
  jw_end_array (&w);
  jw_begin_object (&w);
  jw_key (&w, "b");
  jw_null (&w);
  jw_key (&w, "c");
  jw_string (&w, NULL);
  jw_end_object (&w);
  jw_end_array (&w);
  jw_key (&w, "t");
  jw_bool (&w, true);
  jw_key (&w, "f");
  jw_bool (&w, false);
  jw_key (&w, "min");
  jw_int (&w, INT64_MIN);
  jw_key (&w, "umax");
  jw_uint (&w, UINT64_MAX);
  jw_key (&w, "a");
  jw_string (&w, "s/1");
  jw_end_object (&w);
  jw_expect (&w, "{\"z\":[1,-2,{},[],{\"b\":null,\"c\":null}],\"t\":true,"
             "\"f\":false,\"min\":-9223372036854775808,"
             "\"umax\":18446744073709551615,\"a\":\"s/1\"}");

  /* Top-level scalars. */
  jw_init (&w);
  jw_string (&w, "");
  jw_expect (&w, "\"\"");
  jw_init (&w);
  jw_null (&w);
  jw_expect (&w, "null");

  /* Escapes; DEL and UTF-8 pass through; the text is one line. */
  jw_init (&w);
  jw_string (&w, "q\" b\\ n\n t\t \x01\x1f \x7f \xc3\xa9 \xf0\x9f\x98\x80");
  jw_expect (&w, "\"q\\\" b\\\\ n\\n t\\t \\u0001\\u001f \x7f "
             "\xc3\xa9 \xf0\x9f\x98\x80\"");

  /* Invalid UTF-8 becomes U+FFFD, one per bad byte, in keys too. */
  jw_init (&w);
  jw_begin_object (&w);
  jw_key (&w, "k\xff");
  jw_string (&w, "a\xff" "b\xc3" "\xed\xa0\x80" "c\xe2\x82");
  jw_end_object (&w);
  jw_expect (&w, "{\"k\xef\xbf\xbd\":\"a\xef\xbf\xbd" "b\xef\xbf\xbd"
             "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"
             "c\xef\xbf\xbd\xef\xbf\xbd\"}");

  /* Doubles: the shortest text that reads back exactly. */
  jw_init (&w);
  jw_begin_array (&w);
  jw_double (&w, 0.1);
  jw_double (&w, -2.5e-7);
  jw_double (&w, 1e300);
  jw_double (&w, 3.0);
  jw_double (&w, 1.0 / 3.0);
  jw_end_array (&w);
  jw_expect (&w, "[0.1,-2.5e-07,1e+300,3,0.3333333333333333]");

  /* Misuse is sticky and makes jw_finish fail. */
  jw_init (&w);
  assert (jw_finish (&w) == NULL);                      /* nothing */
  jw_init (&w);
  jw_begin_object (&w);
  assert (jw_finish (&w) == NULL);                      /* left open */
  jw_init (&w);
  jw_begin_object (&w);
  jw_int (&w, 1);                                       /* no key */
  assert (w.error);
  jw_end_object (&w);
  assert (jw_finish (&w) == NULL);
  jw_init (&w);
  jw_begin_array (&w);
  jw_key (&w, "k");                                     /* key in array */
  assert (w.error);
  jw_int (&w, 1);
  jw_end_array (&w);
  assert (jw_finish (&w) == NULL);
  jw_init (&w);
  jw_key (&w, "k");                                     /* key at top */
  assert (jw_finish (&w) == NULL);
  jw_init (&w);
  jw_begin_object (&w);
  jw_key (&w, "a");
  jw_key (&w, "b");                                     /* key twice */
  assert (w.error);
  jw_free (&w);
  jw_init (&w);
  jw_begin_object (&w);
  jw_key (&w, "a");
  jw_int (&w, 1);
  jw_key (&w, "a");
  jw_int (&w, 2);                                       /* repeated key */
  assert (w.error);
  jw_free (&w);
  jw_init (&w);
  jw_begin_object (&w);
  jw_key (&w, "a");
  jw_end_object (&w);                                   /* value missing */
  assert (jw_finish (&w) == NULL);
  jw_init (&w);
  jw_begin_object (&w);
  jw_end_array (&w);                                    /* mismatched */
  assert (jw_finish (&w) == NULL);
  jw_init (&w);
  jw_end_array (&w);                                    /* nothing open */
  assert (jw_finish (&w) == NULL);
  jw_init (&w);
  jw_int (&w, 1);
  jw_null (&w);                                         /* two values */
  assert (jw_finish (&w) == NULL);
  jw_init (&w);
  jw_begin_object (&w);
  jw_key (&w, NULL);
  assert (jw_finish (&w) == NULL);
  jw_init (&w);
  jw_double (&w, NAN);
  assert (jw_finish (&w) == NULL);
  jw_init (&w);
  jw_double (&w, -INFINITY);
  assert (jw_finish (&w) == NULL);

  /* 64 levels can be written, not 65. */
  jw_init (&w);
  for (int d = 0; d < 64; ++d)
    jw_begin_array (&w);
  for (int d = 0; d < 64; ++d)
    jw_end_array (&w);
  {
    char *out = jw_finish (&w);
    assert (out && strlen (out) == 128);
    json_free (parse_ok (out));
    free (out);
  }
  jw_init (&w);
  for (int d = 0; d < 65; ++d)
    jw_begin_array (&w);
  assert (w.error);
  assert (jw_finish (&w) == NULL);
}

static void
test_round_trip (void)
{
  struct jw w;
  struct json_object *v;
  char *out;
  char all[256];
  size_t n = 0;

  /* Writer -> parser: every byte 1..127 plus UTF-8 survives, in keys
   * and values.
   */
  for (int c = 1; c < 128; ++c)
    all[n++] = c;
  strcpy (all + n, "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xf4\x8f\xbf\xbf");
  n = strlen (all);

  jw_init (&w);
  jw_begin_object (&w);
  jw_key (&w, all);
  jw_string (&w, all);
  jw_key (&w, "n");
  jw_begin_array (&w);
  jw_int (&w, INT64_MIN);
  jw_uint (&w, UINT64_MAX);
  jw_double (&w, 0.1);
  jw_double (&w, -1.5e-300);
  jw_end_array (&w);
  jw_end_object (&w);
  out = jw_finish (&w);
  assert (out && strchr (out, '\n') == NULL);

  v = parse_ok (out);
  assert (strcmp (json_get_string (v, all), all) == 0);
  {
    const struct json_object *a = json_get (v, "n");
    int64_t i;

    assert (json_object_array_length (a) == 4);
    assert (json_object_get_int64 (json_object_array_get_idx (a, 0)) ==
            INT64_MIN);
    assert (json_object_get_uint64 (json_object_array_get_idx (a, 1)) ==
            UINT64_MAX);
    assert (json_object_get_double (json_object_array_get_idx (a, 2)) ==
            0.1);
    assert (json_object_get_double (json_object_array_get_idx (a, 3)) ==
            -1.5e-300);
    assert (!json_get_int (v, all, &i));
  }
  json_free (v);
  free (out);

  /* Parser -> jw_value -> writer: a parsed value is written as it was
   * read (numbers as spelt), and outlives the parse it came from.
   */
  v = parse_ok ("{\"ok\":true,\"job\":{\"id\":3,\"eta_seconds\":1.50,"
                "\"x\":[1E2,null,\"\\u00e9\"],\"error\":null}}");
  jw_init (&w);
  jw_begin_object (&w);
  jw_key (&w, "job");
  jw_value (&w, json_get (v, "job"));
  jw_key (&w, "none");
  jw_value (&w, json_get (v, "missing"));
  jw_end_object (&w);
  json_free (v);
  jw_expect (&w, "{\"job\":{\"id\":3,\"eta_seconds\":1.50,"
             "\"x\":[1E2,null,\"\xc3\xa9\"],\"error\":null},\"none\":null}");
}

int
main (void)
{
  test_parse ();
  test_lookups ();
  test_writer ();
  test_round_trip ();
  printf ("test-json: ok\n");
  return 0;
}
