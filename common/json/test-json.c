/* Unit tests for common/json: the parser, the lookups and the writer. */
#include <config.h>

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#undef NDEBUG
#include <assert.h>

#include "json.h"
#include "util.h"

void
snap_verror (const char *fs, va_list args)
{
  vfprintf (stderr, fs, args);
  fputc ('\n', stderr);
}

void
snap_error (const char *fs, ...)
{
  va_list args;
  va_start (args, fs);
  snap_verror (fs, args);
  va_end (args);
}

/* Parse a NUL-terminated text that must be valid. */
static struct json *
parse_ok (const char *text)
{
  char *err = (char *) "unset";
  struct json *v = json_parse (text, strlen (text), &err);

  if (v == NULL) {
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
  struct json *v = json_parse (text, len, &err);

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

/* Write any parsed value back out (as nbdsnap --json does). */
static void
write_value (struct jw *w, const struct json *v)
{
  switch (v->type) {
  case JSON_NULL: jw_null (w); break;
  case JSON_BOOL: jw_bool (w, v->boolean); break;
  case JSON_NUMBER:
    if (v->is_integer)
      jw_int (w, v->integer);
    else
      jw_double (w, v->number);
    break;
  case JSON_STRING: jw_string (w, v->string); break;
  case JSON_ARRAY:
    jw_begin_array (w);
    for (size_t i = 0; i < v->len; ++i)
      write_value (w, v->items[i]);
    jw_end_array (w);
    break;
  case JSON_OBJECT:
    jw_begin_object (w);
    for (size_t i = 0; i < v->len; ++i) {
      jw_key (w, v->keys[i]);
      write_value (w, v->items[i]);
    }
    jw_end_object (w);
    break;
  default:
    abort ();
  }
}

/* Parse text, write it out again and compare with want (NULL: text). */
static void
reserialise (const char *text, const char *want)
{
  struct json *v = parse_ok (text);
  struct jw w;
  char *out;

  jw_init (&w);
  write_value (&w, v);
  out = jw_finish (&w);
  assert (out != NULL);
  if (strcmp (out, want ? want : text) != 0) {
    fprintf (stderr, "test-json: %s re-serialised as %s\n", text, out);
    abort ();
  }
  json_free (v);
  free (out);
}

static void
test_valid (void)
{
  struct json *v;
  int64_t i;
  bool b;

  /* Literals. */
  v = parse_ok ("null");
  assert (v->type == JSON_NULL);
  json_free (v);
  v = parse_ok ("true");
  assert (v->type == JSON_BOOL && v->boolean);
  json_free (v);
  v = parse_ok (" \t\r\nfalse\n ");
  assert (v->type == JSON_BOOL && !v->boolean);
  json_free (v);

  /* Integers, up to the int64_t limits. */
  v = parse_ok ("0");
  assert (v->type == JSON_NUMBER && v->is_integer && v->integer == 0);
  json_free (v);
  v = parse_ok ("-0");
  assert (v->is_integer && v->integer == 0);
  json_free (v);
  v = parse_ok ("1764383400");
  assert (v->is_integer && v->integer == 1764383400);
  assert (v->number == 1764383400.0);
  json_free (v);
  v = parse_ok ("-42");
  assert (v->is_integer && v->integer == -42);
  json_free (v);
  v = parse_ok ("9223372036854775807");
  assert (v->is_integer && v->integer == INT64_MAX);
  json_free (v);
  v = parse_ok ("-9223372036854775808");
  assert (v->is_integer && v->integer == INT64_MIN);
  json_free (v);

  /* Integers past int64_t are numbers, not integers. */
  v = parse_ok ("9223372036854775808");
  assert (v->type == JSON_NUMBER && !v->is_integer);
  assert (v->number == 9223372036854775808.0);
  json_free (v);
  v = parse_ok ("-9223372036854775809");
  assert (!v->is_integer && v->number < -9.2e18);
  json_free (v);
  v = parse_ok ("18446744073709551616");
  assert (!v->is_integer && v->number == 18446744073709551616.0);
  json_free (v);
  v = parse_ok ("123456789012345678901234567890123456789");
  assert (!v->is_integer && v->number > 1.2e38 && v->number < 1.3e38);
  json_free (v);

  /* Fractions and exponents. */
  v = parse_ok ("1.5");
  assert (!v->is_integer && v->number == 1.5);
  json_free (v);
  v = parse_ok ("-0.25");
  assert (!v->is_integer && v->number == -0.25);
  json_free (v);
  v = parse_ok ("1E+2");
  assert (!v->is_integer && v->number == 100.0);
  json_free (v);
  v = parse_ok ("25e-2");
  assert (v->number == 0.25);
  json_free (v);
  v = parse_ok ("1.0");
  assert (!v->is_integer && v->number == 1.0);
  json_free (v);
  v = parse_ok ("1e-400");      /* underflows to zero: allowed */
  assert (v->number == 0.0);
  json_free (v);
  v = parse_ok ("1.7976931348623157e308");
  assert (v->number == 1.7976931348623157e308);
  json_free (v);

  /* Strings and escapes. */
  v = parse_ok ("\"\"");
  assert (v->type == JSON_STRING && v->len == 0 && strcmp (v->string, "") == 0);
  json_free (v);
  v = parse_ok ("\"snap/s1\"");
  assert (v->len == 7 && strcmp (v->string, "snap/s1") == 0);
  json_free (v);
  v = parse_ok ("\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"");
  assert (strcmp (v->string, "\"\\/\b\f\n\r\t") == 0 && v->len == 8);
  json_free (v);
  v = parse_ok ("\"\\u0041\\u00e9\\u20AC\"");   /* A, e acute, euro */
  assert (strcmp (v->string, "A\xc3\xa9\xe2\x82\xac") == 0);
  json_free (v);
  v = parse_ok ("\"\\u0001\\u001F\\u007f\"");
  assert (strcmp (v->string, "\x01\x1f\x7f") == 0);
  json_free (v);
  v = parse_ok ("\"\\ud83d\\ude00\"");          /* surrogate pair: U+1F600 */
  assert (strcmp (v->string, "\xf0\x9f\x98\x80") == 0 && v->len == 4);
  json_free (v);
  v = parse_ok ("\"\\uD800\\uDC00|\\uDBFF\\uDFFF\""); /* U+10000, U+10FFFF */
  assert (strcmp (v->string, "\xf0\x90\x80\x80|\xf4\x8f\xbf\xbf") == 0);
  json_free (v);
  v = parse_ok ("\"h\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \x7f\"");
  assert (strcmp (v->string, "h\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \x7f")
          == 0);
  json_free (v);
  v = parse_ok ("\"\xef\xbf\xbf\xee\x80\x80\"");  /* U+FFFF, U+E000 */
  assert (v->len == 6);
  json_free (v);

  /* Containers. */
  v = parse_ok ("[]");
  assert (v->type == JSON_ARRAY && v->len == 0);
  json_free (v);
  v = parse_ok ("{ }");
  assert (v->type == JSON_OBJECT && v->len == 0);
  assert (json_get (v, "x") == NULL);
  json_free (v);
  v = parse_ok ("[1, \"two\", [3], {\"four\": 4}, null]");
  assert (v->len == 5);
  assert (v->items[0]->integer == 1);
  assert (strcmp (v->items[1]->string, "two") == 0);
  assert (v->items[2]->type == JSON_ARRAY && v->items[2]->len == 1);
  assert (json_get_int (v->items[3], "four", &i) && i == 4);
  assert (v->items[4]->type == JSON_NULL);
  json_free (v);

  /* A protocol reply, and the lookup helpers. */
  v = parse_ok ("{\"ok\":true,\"store\":\"/abs/dir\",\"mode\":\"row\","
                "\"block_size\":65536,\"size\":1073741824,"
                "\"checkpoints\":[{\"name\":\"s1\",\"created\":1764383400}]}");
  assert (json_get_bool (v, "ok", &b) && b);
  assert (strcmp (json_get_string (v, "store"), "/abs/dir") == 0);
  assert (json_get_int (v, "size", &i) && i == 1073741824);
  assert (json_get_string (v, "size") == NULL);         /* wrong type */
  assert (!json_get_int (v, "store", &i));
  assert (!json_get_bool (v, "mode", &b));
  assert (json_get_string (v, "missing") == NULL);
  assert (json_get (v, "checkpoints")->type == JSON_ARRAY);
  assert (json_get_int (json_get (v, "checkpoints")->items[0],
                        "created", &i) && i == 1764383400);
  assert (json_get (v->items[0], "ok") == NULL);         /* not an object */
  assert (json_get (NULL, "ok") == NULL);
  json_free (v);

  /* Floats are not integers for json_get_int. */
  v = parse_ok ("{\"a\":1.5,\"b\":1e2}");
  assert (!json_get_int (v, "a", &i));
  assert (!json_get_int (v, "b", &i));
  json_free (v);

  /* Keys with escapes. */
  v = parse_ok ("{\"a\\nb\":\"x\",\"\\u00e9\":\"y\"}");
  assert (strcmp (json_get_string (v, "a\nb"), "x") == 0);
  assert (strcmp (json_get_string (v, "\xc3\xa9"), "y") == 0);
  json_free (v);

  /* Exactly 64 levels of nesting are allowed. */
  {
    char text[64 * 2 + 1];

    memset (text, '[', 64);
    memset (text + 64, ']', 64);
    text[128] = '\0';
    v = parse_ok (text);
    json_free (v);
  }
  {
    /* {"a":{"a":...{}}} */
    char text[64 * 5 + 64 + 1];
    size_t n = 0;

    for (int d = 0; d < 63; ++d) {
      memcpy (text + n, "{\"a\":", 5);
      n += 5;
    }
    text[n++] = '{';
    memset (text + n, '}', 64);
    n += 64;
    text[n] = '\0';
    v = parse_ok (text);
    json_free (v);
  }

  /* A text need not be NUL-terminated: only len bytes are read. */
  v = json_parse ("[1]garbage", 3, NULL);
  assert (v && v->type == JSON_ARRAY && v->len == 1);
  json_free (v);
}

static void
test_invalid (void)
{
  /* Empty and truncated input. */
  parse_bad ("", "at byte 0: expected value before end of input");
  parse_bad ("  \n", "at byte 3: expected value before end of input");
  parse_bad ("[", "at byte 1: expected value before end of input");
  parse_bad ("[1,2", "at byte 4: expected ',' or ']' before end of input");
  parse_bad ("{\"a\":[1,{\"b\":", NULL);
  parse_bad ("{\"a\"", "at byte 4: expected ':' before end of input");
  parse_bad ("{", "at byte 1: expected string key before end of input");
  parse_bad ("\"abc", "at byte 4: expected '\"' before end of input");
  parse_bad ("\"abc\\", NULL);
  parse_bad ("\"\\u00e", "at byte 6: expected hex digit before end of input");
  parse_bad ("tru", "at byte 3: expected 'true' before end of input");
  parse_bad ("nul", NULL);
  parse_bad ("-", "at byte 1: expected digit before end of input");

  /* A key given twice, at any depth. */
  parse_bad ("{\"cmd\":\"list\",\"cmd\":\"create\"}",
             "at byte 14: duplicate key \"cmd\"");
  parse_bad ("{\"a\":{\"b\":1,\"c\":2,\"b\":3}}",
             "at byte 18: duplicate key \"b\"");

  /* Literals. */
  parse_bad ("True", "at byte 0: expected value");
  parse_bad ("nulL", "at byte 0: expected value");
  parse_bad ("NaN", "at byte 0: expected value");
  parse_bad ("Infinity", NULL);
  parse_bad ("'a'", NULL);
  parse_bad ("undefined", NULL);

  /* Numbers outside the grammar. */
  parse_bad ("01", "at byte 1: expected end of input");
  parse_bad ("-01", "at byte 2: expected end of input");
  parse_bad ("+1", "at byte 0: expected value");
  parse_bad (".5", NULL);
  parse_bad ("1.", "at byte 2: expected digit after '.' before end of input");
  parse_bad ("1.e5", "at byte 2: expected digit after '.'");
  parse_bad ("1e", NULL);
  parse_bad ("1e+",
             "at byte 3: expected digit in exponent before end of input");
  parse_bad ("0x10", "at byte 1: expected end of input");
  parse_bad ("--1", "at byte 1: expected digit");
  parse_bad ("- 1", "at byte 1: expected digit");
  parse_bad ("1e400", "at byte 0: number out of range");
  parse_bad ("-1e400", "at byte 0: number out of range");

  /* Structure. */
  parse_bad ("[1,]", "at byte 3: expected value");
  parse_bad ("[,1]", "at byte 1: expected value");
  parse_bad ("[1 2]", "at byte 3: expected ',' or ']'");
  parse_bad ("{\"a\":1,}", "at byte 7: expected string key");
  parse_bad ("{a:1}", "at byte 1: expected string key");
  parse_bad ("{\"a\" 1}", "at byte 5: expected ':'");
  parse_bad ("{\"a\":}", "at byte 5: expected value");
  parse_bad ("{\"a\":1 \"b\":2}", "at byte 7: expected ',' or '}'");
  parse_bad ("[1}", "at byte 2: expected ',' or ']'");
  parse_bad ("{1:2}", NULL);

  /* Trailing data. */
  parse_bad ("1 2", "at byte 2: expected end of input");
  parse_bad ("{} x", "at byte 3: expected end of input");
  parse_bad ("[1]]", "at byte 3: expected end of input");
  parse_bad ("null,", "at byte 4: expected end of input");
  parse_bad ("\"a\"\"b\"", "at byte 3: expected end of input");
  parse_bad_len ("null\0", 5, "at byte 4: expected end of input");
  parse_bad ("{}\f", "at byte 2: expected end of input");  /* not space */

  /* Strings: escapes. */
  parse_bad ("\"\\x\"", "at byte 2: expected one of \"\\/bfnrtu after '\\'");
  parse_bad ("\"\\'\"", NULL);
  parse_bad ("\"\\U0041\"", NULL);
  parse_bad ("\"\\u12\"", "at byte 5: expected hex digit");
  parse_bad ("\"\\u12G4\"", "at byte 5: expected hex digit");
  parse_bad ("\"\\u0000\"", "at byte 1: \\u0000 is not allowed in strings");
  parse_bad ("{\"a\\u0000\":1}", NULL);

  /* Strings: surrogates. */
  parse_bad ("\"\\ud800\"",
             "at byte 7: expected a low surrogate escape after \\ud800");
  parse_bad ("\"\\ud800x\"", NULL);
  parse_bad ("\"\\ud800\\u0041\"",
             "at byte 7: expected a low surrogate after \\ud800");
  parse_bad ("\"\\ud800\\ud800\"", NULL);
  parse_bad ("\"\\udc00\"",
             "at byte 1: expected a high surrogate before \\udc00");
  parse_bad ("\"\\ude00\\ud83d\"", NULL);
  parse_bad ("\"\\ud83d\\", NULL);

  /* Strings: raw control characters and bad UTF-8. */
  parse_bad ("\"a\nb\"",
     "at byte 2: expected escape sequence, not raw control character 0x0a");
  parse_bad ("\"\t\"", NULL);
  parse_bad ("\"\x01\"", NULL);
  parse_bad ("\"\x1f\"", NULL);
  parse_bad_len ("\"a\0b\"", 5, NULL);
  parse_bad ("\"\xff\"", "at byte 1: invalid UTF-8");
  parse_bad ("\"\x80\"", NULL);                    /* lone continuation */
  parse_bad ("\"\xc0\xaf\"", NULL);                /* overlong '/' */
  parse_bad ("\"\xe0\x80\xaf\"", NULL);            /* overlong, 3 bytes */
  parse_bad ("\"\xed\xa0\x80\"", NULL);            /* encoded surrogate */
  parse_bad ("\"\xf4\x90\x80\x80\"", NULL);        /* above U+10FFFF */
  parse_bad ("\"\xe2\x82\"", NULL);                /* truncated sequence */
  parse_bad ("\"\xc3\"", NULL);
  parse_bad_len ("\"\xe2\x82", 3, NULL);           /* truncated at end */

  /* Nesting deeper than 64. */
  {
    char text[65 * 2 + 1];

    memset (text, '[', 65);
    memset (text + 65, ']', 65);
    text[130] = '\0';
    parse_bad (text, "at byte 64: nesting deeper than 64 levels");
  }
  {
    char text[65 * 5 + 1];
    size_t n = 0;

    for (int d = 0; d < 65; ++d) {
      memcpy (text + n, "{\"a\":", 5);
      n += 5;
    }
    text[n] = '\0';
    parse_bad (text, "at byte 320: nesting deeper than 64 levels");
  }
  {
    /* Very deep input must not exhaust the stack. */
    size_t n = 1000000;
    char *text = malloc (n);

    assert (text);
    memset (text, '[', n);
    parse_bad_len (text, n, "at byte 64: nesting deeper than 64 levels");
    free (text);
  }

  /* Every proper prefix of an object is refused. */
  {
    const char *doc =
      "{\"ok\":true,\"checkpoint\":{\"name\":\"s1\",\"kind\":\"snapshot\","
      "\"created\":1764383400,\"x\":[1.5e3,-2,null,false,\"\\u00e9\"]}}";
    size_t len = strlen (doc);

    for (size_t n = 0; n < len; ++n)
      parse_bad_len (doc, n, NULL);
    json_free (parse_ok (doc));
  }
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
  assert (w->buf == NULL && w->len == 0 && w->depth == 0 && !w->error);
}

static void
test_writer (void)
{
  struct jw w;

  /* A request. */
  jw_init (&w);
  jw_begin_object (&w);
  jw_key (&w, "cmd");
  jw_string (&w, "create");
  jw_key (&w, "name");
  jw_string (&w, "s1");
  jw_end_object (&w);
  jw_expect (&w, "{\"cmd\":\"create\",\"name\":\"s1\"}");

  /* Commas at every level, every value type. */
  jw_init (&w);
  jw_begin_object (&w);
  jw_key (&w, "a");
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
  jw_key (&w, "d");
  jw_double (&w, 0.5);
  jw_end_object (&w);
  jw_expect (&w, "{\"a\":[1,-2,{},[],{\"b\":null,\"c\":null}],\"t\":true,"
             "\"f\":false,\"min\":-9223372036854775808,"
             "\"umax\":18446744073709551615,\"d\":0.5}");

  /* Top-level scalars. */
  jw_init (&w);
  jw_string (&w, "");
  jw_expect (&w, "\"\"");
  jw_init (&w);
  jw_int (&w, 0);
  jw_expect (&w, "0");

  /* Escapes: quote, backslash, control characters; '/' and DEL and
   * UTF-8 pass through.
   */
  jw_init (&w);
  jw_string (&w, "q\" b\\ n\n t\t \x01\x1f / \x7f \xc3\xa9 \xf0\x9f\x98\x80");
  jw_expect (&w, "\"q\\\" b\\\\ n\\u000a t\\u0009 \\u0001\\u001f / \x7f "
             "\xc3\xa9 \xf0\x9f\x98\x80\"");
  jw_init (&w);
  jw_begin_object (&w);
  jw_key (&w, "k\"\n");
  jw_int (&w, 1);
  jw_end_object (&w);
  jw_expect (&w, "{\"k\\\"\\u000a\":1}");

  /* Invalid UTF-8 becomes U+FFFD, one per bad byte. */
  jw_init (&w);
  jw_string (&w, "a\xff" "b\xc3" "\xed\xa0\x80" "c\xe2\x82");
  jw_expect (&w, "\"a\xef\xbf\xbd" "b\xef\xbf\xbd"
             "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"
             "c\xef\xbf\xbd\xef\xbf\xbd\"");

  /* Doubles. */
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
  jw_end_object (&w);
  assert (w.error);
  assert (jw_finish (&w) == NULL);
  jw_init (&w);
  jw_begin_array (&w);
  jw_key (&w, "k");                                     /* key in array */
  assert (w.error);
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
  jw_int (&w, 2);                                       /* two values */
  assert (jw_finish (&w) == NULL);
  jw_init (&w);
  jw_begin_object (&w);
  jw_key (&w, NULL);
  assert (jw_finish (&w) == NULL);
  jw_init (&w);
  jw_double (&w, NAN);
  assert (jw_finish (&w) == NULL);
  jw_init (&w);
  jw_double (&w, INFINITY);
  assert (jw_finish (&w) == NULL);

  /* The error stays set even if later calls would be valid. */
  jw_init (&w);
  jw_begin_array (&w);
  jw_key (&w, "x");
  jw_int (&w, 1);
  jw_end_array (&w);
  assert (w.error);
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
  struct json *v;
  char *out;
  int64_t i;
  bool b;
  char all[256];
  size_t n = 0;

  /* Writer -> parser: every byte 1..127 plus UTF-8 survives. */
  for (int c = 1; c < 128; ++c)
    all[n++] = c;
  strcpy (all + n, "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\xf4\x8f\xbf\xbf");
  n = strlen (all);

  jw_init (&w);
  jw_begin_object (&w);
  jw_key (&w, "ok");
  jw_bool (&w, true);
  jw_key (&w, all);
  jw_string (&w, all);
  jw_key (&w, "n");
  jw_begin_array (&w);
  jw_int (&w, INT64_MAX);
  jw_int (&w, INT64_MIN);
  jw_uint (&w, UINT64_MAX);
  jw_double (&w, 0.1);
  jw_double (&w, -1.5e-300);
  jw_end_array (&w);
  jw_key (&w, "empty");
  jw_string (&w, "");
  jw_end_object (&w);
  out = jw_finish (&w);
  assert (out);

  v = parse_ok (out);
  assert (json_get_bool (v, "ok", &b) && b);
  assert (strcmp (json_get_string (v, all), all) == 0);
  assert (json_get (v, all)->len == n);
  {
    const struct json *a = json_get (v, "n");

    assert (a && a->type == JSON_ARRAY && a->len == 5);
    assert (a->items[0]->is_integer && a->items[0]->integer == INT64_MAX);
    assert (a->items[1]->is_integer && a->items[1]->integer == INT64_MIN);
    assert (!a->items[2]->is_integer &&
            a->items[2]->number == 18446744073709551615.0);
    assert (a->items[3]->number == 0.1);
    assert (a->items[4]->number == -1.5e-300);
  }
  assert (strcmp (json_get_string (v, "empty"), "") == 0);
  assert (!json_get_int (v, "empty", &i));
  json_free (v);
  free (out);

  /* Parser -> writer -> same text, for canonical texts. */
  reserialise ("{\"ok\":false,\"error\":\"checkpoint 's1' already exists\"}",
               NULL);
  reserialise ("[null,true,false,0,-1,9223372036854775807,\"\",[],{}]", NULL);
  reserialise ("{\"a\":{\"b\":{\"c\":[[[1]]]}}}", NULL);
  reserialise ("\"\\u0001\\\"\\\\\"", NULL);
  reserialise ("[0.5,1e+300,-2.5]", NULL);
  /* Non-canonical texts come out canonical. */
  reserialise (" { \"a\" : [ 1 , 2 ] } ", "{\"a\":[1,2]}");
  reserialise ("\"\\/\\n\\t\\u00e9\"", "\"/\\u000a\\u0009\xc3\xa9\"");
  reserialise ("\"\\ud83d\\ude00\"", "\"\xf0\x9f\x98\x80\"");
  reserialise ("[1.0,1E2,-0]", "[1,100,0]");

  /* Every code point in a \u escape (surrogates as pairs) round-trips
   * through the writer, which emits it as raw UTF-8.
   */
  for (uint32_t cp = 1; cp <= 0x10ffff; cp += (cp < 0x800 ? 1 : 251)) {
    char text[32], *s;

    if (cp >= 0xd800 && cp <= 0xdfff)
      continue;
    if (cp < 0x10000)
      snprintf (text, sizeof text, "\"\\u%04" PRIx32 "\"", cp);
    else
      snprintf (text, sizeof text, "\"\\u%04" PRIx32 "\\u%04" PRIx32 "\"",
                0xd800 + ((cp - 0x10000) >> 10),
                0xdc00 + ((cp - 0x10000) & 0x3ff));
    v = parse_ok (text);
    jw_init (&w);
    jw_string (&w, v->string);
    s = jw_finish (&w);
    assert (s);
    {
      struct json *v2 = parse_ok (s);
      assert (strcmp (v2->string, v->string) == 0);
      json_free (v2);
    }
    json_free (v);
    free (s);
  }
}

int
main (void)
{
  test_valid ();
  test_invalid ();
  test_writer ();
  test_round_trip ();
  printf ("test-json: ok\n");
  return 0;
}
