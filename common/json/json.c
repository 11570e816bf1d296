/* nbdkit-snapshot: JSON over json-c (see json.h).
 *
 * Reading
 *
 * json-c parses: its tokener, in strict mode (JSON_TOKENER_STRICT:
 * exactly one value, nothing after it but white space) and with a depth
 * limit, checks the syntax, builds the tree and decodes escapes.  It is
 * a widely used and fuzzed parser, which one of our own would not be.
 *
 * Its strict mode still lets some things through (json-c 0.16):
 * NaN, Infinity and -Infinity; "-01", "1." and "1.e5"; numbers too
 * large for a double (they become infinity); integers below INT64_MIN
 * or above UINT64_MAX (silently clamped to those limits); raw control
 * characters in strings; overlong UTF-8, encoded surrogates and code
 * points above U+10FFFF (even with JSON_TOKENER_VALIDATE_UTF8); \u0000
 * (a NUL inside a value, a key cut short at it); and a key repeated in
 * one object (json-c keeps the last value, and the tree cannot tell).
 * json_parse refuses all of these.  Once json-c has accepted the text,
 * its brackets match and its strings and escapes are well formed, so
 * finding them takes one lexical pass over the text (check_text), not
 * a second parser: it checks each number against the RFC 8259 grammar
 * and its range, the bytes of each string, and keeps the keys of each
 * open object, decoded by json-c, to find a repeated one.  An unpaired
 * surrogate escape is left as json-c decodes it, U+FFFD.  A NUL byte is
 * refused before json-c sees the text, which it would end there.
 *
 * Error messages are "at byte N: WHAT", N counting from 0: json-c's
 * description of its error (json_tokener_error_desc) at the byte where
 * it stopped (json_tokener_get_parse_end; the end of the text for
 * truncated input), or the check's.
 *
 * Writing
 *
 * The writer builds a json-c tree and serialises it with
 * json_object_to_json_string_ext (JSON_C_TO_STRING_PLAIN |
 * JSON_C_TO_STRING_NOSLASHESCAPE): one line, "/" not escaped.  What
 * is left to us: json-c copies strings' bytes as they are, so bytes
 * that are not well-formed UTF-8 are replaced by U+FFFD first, and
 * json-c writes doubles with 17 digits (0.10000000000000001), so
 * jw_double gives it the shortest form that reads back exactly, which
 * json-c then writes as it is (json_object_new_double_s).  The writer
 * keeps a stack of the containers open, which lets it catch misuse;
 * the first error sets w->error and every later call does nothing.
 *
 * Doubles are formatted in the "C" locale whatever the process's is:
 * jw_double switches its thread to a "C" locale object created once
 * (json-c's tokener does the same while it parses).
 */
#include <config.h>

#include <limits.h>
#include <locale.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"

/* Length of the well-formed UTF-8 sequence at s[0..n), or 0 if it is
 * not one (RFC 3629 table 3-7: no overlong forms, no surrogates,
 * nothing above U+10FFFF).
 */
static size_t
utf8_length (const unsigned char *s, size_t n)
{
  unsigned char c = s[0];
  size_t len;
  unsigned char lo = 0x80, hi = 0xbf;   /* range of the second byte */

  if (c < 0x80)
    return 1;
  else if (c >= 0xc2 && c <= 0xdf)
    len = 2;
  else if (c >= 0xe0 && c <= 0xef) {
    len = 3;
    if (c == 0xe0) lo = 0xa0;
    if (c == 0xed) hi = 0x9f;
  }
  else if (c >= 0xf0 && c <= 0xf4) {
    len = 4;
    if (c == 0xf0) lo = 0x90;
    if (c == 0xf4) hi = 0x8f;
  }
  else
    return 0;

  if (n < len)
    return 0;
  if (s[1] < lo || s[1] > hi)
    return 0;
  for (size_t i = 2; i < len; ++i)
    if (s[i] < 0x80 || s[i] > 0xbf)
      return 0;
  return len;
}

/* ---- Reading ---- */

static void error_at (char **errmsg, size_t pos, const char *fs, ...)
  __attribute__ ((format (printf, 3, 4)));

static void
error_at (char **errmsg, size_t pos, const char *fs, ...)
{
  va_list args;
  char *what;

  if (errmsg == NULL || *errmsg != NULL)
    return;
  va_start (args, fs);
  if (vasprintf (&what, fs, args) == -1)
    what = NULL;
  va_end (args);
  if (what == NULL)
    return;                     /* Out of memory: *errmsg stays NULL. */
  if (asprintf (errmsg, "at byte %zu: %s", pos, what) == -1)
    *errmsg = NULL;
  free (what);
}

/* Parse text[0..len) with json-c, all of it.  A value that runs to the
 * end (a number) is ended by a NUL byte, as json-c wants.  On error
 * return NULL and set the error, at start + the offset where json-c
 * stopped.
 */
static struct json_object *
tokenise (struct json_tokener *tok, const char *text, size_t len,
          size_t start, char **errmsg)
{
  struct json_object *v;
  enum json_tokener_error err;
  size_t end;

  json_tokener_reset (tok);
  v = json_tokener_parse_ex (tok, text, len);
  err = json_tokener_get_error (tok);
  end = json_tokener_get_parse_end (tok);
  if (err == json_tokener_continue) {
    v = json_tokener_parse_ex (tok, "", 1);
    err = json_tokener_get_error (tok);
    end = len;
  }
  if (err == json_tokener_success && end < len) {
    json_object_put (v);                /* Not expected in strict mode. */
    err = json_tokener_error_parse_unexpected;
  }
  if (err != json_tokener_success) {
    error_at (errmsg, start + end, "%s", json_tokener_error_desc (err));
    return NULL;
  }
  return v;
}

/* Length of the number at s[0..n) by the RFC 8259 grammar, or 0 if
 * it does not follow it.  *integer says it has no fraction or exponent.
 */
static size_t
number_length (const unsigned char *s, size_t n, bool *integer)
{
#define DIGIT(i) ((i) < n && s[i] >= '0' && s[i] <= '9')
  size_t i = 0;

  *integer = true;
  if (i < n && s[i] == '-')
    i++;
  if (i < n && s[i] == '0')
    i++;                        /* A leading zero stands alone. */
  else if (DIGIT (i))
    while (DIGIT (i))
      i++;
  else
    return 0;
  if (i < n && s[i] == '.') {
    *integer = false;
    i++;
    if (!DIGIT (i))
      return 0;
    while (DIGIT (i))
      i++;
  }
  if (i < n && (s[i] == 'e' || s[i] == 'E')) {
    *integer = false;
    i++;
    if (i < n && (s[i] == '+' || s[i] == '-'))
      i++;
    if (!DIGIT (i))
      return 0;
    while (DIGIT (i))
      i++;
  }
  /* json-c took more: "01", "1.", "1.e5". */
  if (DIGIT (i) || (i < n && s[i] != '\0' && strchr (".eE+-", s[i])))
    return 0;
  return i;
#undef DIGIT
}

/* Whether the integer s[0..n) (by the grammar, so no leading zeros) is
 * one json-c holds exactly: INT64_MIN to UINT64_MAX.
 */
static bool
integer_fits (const unsigned char *s, size_t n)
{
  const char *max = "18446744073709551615";
  size_t maxlen;

  if (s[0] == '-') {
    s++;
    n--;
    max = "9223372036854775808";
  }
  maxlen = strlen (max);
  return n < maxlen || (n == maxlen && memcmp (s, max, n) <= 0);
}

/* Check the number at text[start], by the grammar and its range.
 * Return its length, or 0 after setting the error.
 */
static size_t
check_number (struct json_tokener *tok, const char *text, size_t len,
              size_t start, char **errmsg)
{
  const unsigned char *s = (const unsigned char *) text + start;
  bool integer, finite;
  size_t n = number_length (s, len - start, &integer);
  struct json_object *v;

  if (n == 0) {
    error_at (errmsg, start, "number expected");
    return 0;
  }
  if (integer) {
    if (!integer_fits (s, n)) {
      error_at (errmsg, start, "integer out of range");
      return 0;
    }
    return n;
  }
  v = tokenise (tok, text + start, n, start, errmsg);
  if (v == NULL)
    return 0;
  finite = isfinite (json_object_get_double (v));
  json_object_put (v);
  if (!finite) {
    error_at (errmsg, start, "number out of range");
    return 0;
  }
  return n;
}

/* Check the bytes of the string whose opening quote is text[start].
 * Return the offset just past its closing quote, or 0 after setting
 * the error.
 */
static size_t
check_string (const char *text, size_t len, size_t start, char **errmsg)
{
  const unsigned char *s = (const unsigned char *) text;
  size_t i = start + 1, n;

  while (i < len && s[i] != '"') {
    if (s[i] == '\\') {
      if (len - i >= 6 && memcmp (s + i + 1, "u0000", 5) == 0) {
        error_at (errmsg, i, "\\u0000 is not allowed in strings");
        return 0;
      }
      i += 2;           /* The escaped character; \u's digits are ASCII. */
    }
    else if (s[i] < 0x20) {
      error_at (errmsg, i, "control character 0x%02x must be escaped",
                s[i]);
      return 0;
    }
    else if ((n = utf8_length (s + i, len - i)) == 0) {
      error_at (errmsg, i, "invalid UTF-8");
      return 0;
    }
    else
      i += n;
  }
  if (i >= len) {
    error_at (errmsg, len, "unexpected end of data");  /* Not expected. */
    return 0;
  }
  return i + 1;
}

/* The key text[start..end), a string token, met in an object whose
 * keys so far are in the set seen (a json-c object): refuse it if it
 * is there, else add it.  json-c decodes it, so "a" and "\u0061" are
 * the same key.  Return 0 or -1 (error set, or out of memory).
 */
static int
check_key (struct json_tokener *tok, const char *text, size_t start,
           size_t end, struct json_object *seen, char **errmsg)
{
  struct json_object *k = tokenise (tok, text + start, end - start, start,
                                    errmsg);
  const char *key;
  int r = -1;

  if (k == NULL)
    return -1;
  key = json_object_get_string (k);
  if (json_object_object_get_ex (seen, key, NULL))
    error_at (errmsg, start, "repeated key \"%s\"", key);
  else
    r = json_object_object_add (seen, key, NULL);
  json_object_put (k);
  return r;
}

/* The checks that json-c's strict mode leaves to us (see the top of
 * this file), over text[0..len) that json-c has accepted.  Return 0,
 * or -1 (error set, or out of memory).
 */
static int
check_text (struct json_tokener *tok, const char *text, size_t len,
            char **errmsg)
{
  /* For each open container: the keys met so far in it if it is an
   * object (as a json-c object), NULL if it is an array.
   */
  struct json_object *keys[JSON_MAX_DEPTH];
  int depth = 0;
  bool want_key = false;        /* the next string is a key */
  size_t i = 0, n;
  int r = -1;

  while (i < len) {
    switch (text[i]) {
    case '{': case '[':
      if (depth == JSON_MAX_DEPTH) {
        error_at (errmsg, i, "nesting too deep");   /* Not expected. */
        goto out;
      }
      want_key = text[i] == '{';
      keys[depth] = want_key ? json_object_new_object () : NULL;
      if (want_key && keys[depth] == NULL)
        goto out;
      depth++;
      i++;
      break;
    case '}': case ']':
      if (depth > 0)
        json_object_put (keys[--depth]);
      i++;
      break;
    case ',':
      want_key = depth > 0 && keys[depth - 1] != NULL;
      i++;
      break;
    case '"':
      n = check_string (text, len, i, errmsg);
      if (n == 0)
        goto out;
      if (want_key && depth > 0 &&
          check_key (tok, text, i, n, keys[depth - 1], errmsg) == -1)
        goto out;
      want_key = false;
      i = n;
      break;
    case '-': case '0': case '1': case '2': case '3': case '4':
    case '5': case '6': case '7': case '8': case '9':
      n = check_number (tok, text, len, i, errmsg);
      if (n == 0)
        goto out;
      i += n;
      break;
    case 't': case 'f': case 'n':       /* true, false, null */
      while (i < len && text[i] >= 'a' && text[i] <= 'z')
        i++;
      break;
    case ' ': case '\t': case '\n': case '\r': case ':':
      i++;
      break;
    default:                            /* NaN, Infinity */
      error_at (errmsg, i, "unexpected character");
      goto out;
    }
  }
  r = 0;

 out:
  while (depth > 0)
    json_object_put (keys[--depth]);
  return r;
}

struct json_object *
json_parse (const char *text, size_t len, char **errmsg)
{
  struct json_tokener *tok;
  struct json_object *v = NULL;
  const char *nul = memchr (text, '\0', len);
  char *err = NULL;

  if (nul)
    error_at (&err, nul - text, "NUL byte");
  else if (len >= INT_MAX)
    error_at (&err, 0, "text too long");
  else if ((tok = json_tokener_new_ex (JSON_MAX_DEPTH)) != NULL) {
    json_tokener_set_flags (tok, JSON_TOKENER_STRICT);
    v = tokenise (tok, text, len, 0, &err);
    if (v && check_text (tok, text, len, &err) == -1) {
      json_object_put (v);
      v = NULL;
    }
    json_tokener_free (tok);
  }
  /* err is NULL unless v is NULL. */
  if (errmsg)
    *errmsg = err;
  else
    free (err);
  return v;
}

void
json_free (struct json_object *v)
{
  json_object_put (v);
}

bool
json_has (const struct json_object *v, const char *key)
{
  return json_object_object_get_ex (v, key, NULL);
}

const struct json_object *
json_get (const struct json_object *v, const char *key)
{
  struct json_object *m;

  return json_object_object_get_ex (v, key, &m) ? m : NULL;
}

const char *
json_get_string (const struct json_object *v, const char *key)
{
  const struct json_object *m = json_get (v, key);

  if (!json_object_is_type (m, json_type_string))
    return NULL;
  return json_object_get_string ((struct json_object *) m);
}

bool
json_get_int (const struct json_object *v, const char *key, int64_t *out)
{
  const struct json_object *m = json_get (v, key);
  int64_t i;

  if (!json_object_is_type (m, json_type_int))
    return false;
  /* Above INT64_MAX json-c holds a uint64_t, and gives INT64_MAX. */
  i = json_object_get_int64 (m);
  if (i == INT64_MAX && json_object_get_uint64 (m) != (uint64_t) INT64_MAX)
    return false;
  *out = i;
  return true;
}

bool
json_get_number (const struct json_object *v, const char *key, double *out)
{
  const struct json_object *m = json_get (v, key);

  if (!json_object_is_type (m, json_type_int) &&
      !json_object_is_type (m, json_type_double))
    return false;
  *out = json_object_get_double (m);
  return true;
}

bool
json_get_bool (const struct json_object *v, const char *key, bool *out)
{
  const struct json_object *m = json_get (v, key);

  if (!json_object_is_type (m, json_type_boolean))
    return false;
  *out = json_object_get_boolean (m);
  return true;
}

/* ---- Writing ---- */

void
jw_init (struct jw *w)
{
  memset (w, 0, sizeof *w);
}

/* Add v, which the writer now owns (NULL is null), as the next value. */
static void
jw_put (struct jw *w, struct json_object *v)
{
  struct json_object *top;
  char *key = w->key;
  int r = -1;

  w->key = NULL;
  if (w->error)
    ;
  else if (w->depth == 0) {
    if (!w->has_root) {                 /* Not a second value. */
      w->root = v;
      w->has_root = true;
      return;
    }
  }
  else if (json_object_is_type (top = w->open[w->depth - 1],
                                json_type_array))
    r = json_object_array_add (top, v); /* (jw_key refuses keys here) */
  else if (key != NULL && !json_object_object_get_ex (top, key, NULL))
    r = json_object_object_add (top, key, v);
  free (key);
  if (r == -1) {
    w->error = true;
    json_object_put (v);
  }
}

/* jw_put for a value just made: NULL means out of memory. */
static void
jw_add (struct jw *w, struct json_object *v)
{
  if (v == NULL)
    w->error = true;
  else
    jw_put (w, v);
}

/* A malloc'd copy of s with U+FFFD for each byte that is not part of a
 * well-formed UTF-8 sequence (json-c would copy it as it is).
 */
static char *
utf8_copy (const char *str)
{
  const unsigned char *s = (const unsigned char *) str;
  size_t n = strlen (str), len;
  char *out = malloc (3 * n + 1), *p = out;

  if (out == NULL)
    return NULL;
  for (size_t i = 0; i < n; i += len) {
    len = utf8_length (s + i, n - i);
    if (len == 0) {
      memcpy (p, "\xef\xbf\xbd", 3);
      p += 3;
      len = 1;
    }
    else {
      memcpy (p, s + i, len);
      p += len;
    }
  }
  *p = '\0';
  return out;
}

static void
jw_begin (struct jw *w, bool object)
{
  struct json_object *c;

  if (w->error)
    return;
  if (w->depth == JSON_MAX_DEPTH) {
    w->error = true;
    return;
  }
  c = object ? json_object_new_object () : json_object_new_array ();
  jw_add (w, c);
  if (!w->error)
    w->open[w->depth++] = c;
}

static void
jw_end (struct jw *w, bool object)
{
  if (w->error)
    return;
  if (w->depth == 0 || w->key != NULL ||
      json_object_is_type (w->open[w->depth - 1], json_type_object) !=
      object) {
    w->error = true;
    return;
  }
  w->depth--;
}

void
jw_begin_object (struct jw *w)
{
  jw_begin (w, true);
}

void
jw_end_object (struct jw *w)
{
  jw_end (w, true);
}

void
jw_begin_array (struct jw *w)
{
  jw_begin (w, false);
}

void
jw_end_array (struct jw *w)
{
  jw_end (w, false);
}

void
jw_key (struct jw *w, const char *key)
{
  if (w->error)
    return;
  if (key == NULL || w->depth == 0 || w->key != NULL ||
      !json_object_is_type (w->open[w->depth - 1], json_type_object)) {
    w->error = true;
    return;
  }
  w->key = utf8_copy (key);
  if (w->key == NULL)
    w->error = true;
}

void
jw_string (struct jw *w, const char *s)
{
  char *copy;

  if (s == NULL) {
    jw_null (w);
    return;
  }
  copy = utf8_copy (s);
  jw_add (w, copy ? json_object_new_string (copy) : NULL);
  free (copy);
}

void
jw_int (struct jw *w, int64_t i)
{
  jw_add (w, json_object_new_int64 (i));
}

void
jw_uint (struct jw *w, uint64_t u)
{
  jw_add (w, json_object_new_uint64 (u));
}

/* The "C" locale, for formatting doubles: created once, never
 * changed.
 */
static locale_t c_locale;
static pthread_once_t c_locale_once = PTHREAD_ONCE_INIT;

static void
make_c_locale (void)
{
  c_locale = newlocale (LC_ALL_MASK, "C", (locale_t) 0);
}

void
jw_double (struct jw *w, double d)
{
  char out[32];
  locale_t old;

  pthread_once (&c_locale_once, make_c_locale);
  if (!isfinite (d) ||          /* JSON has no NaN or infinity. */
      c_locale == (locale_t) 0) {
    w->error = true;
    return;
  }
  old = uselocale (c_locale);
  /* 17 significant digits always read back as the same double; fewer
   * often do and look better (0.1 rather than 0.10000000000000001).
   */
  for (int prec = 15; prec <= 17; ++prec) {
    snprintf (out, sizeof out, "%.*g", prec, d);
    if (strtod (out, NULL) == d)
      break;
  }
  uselocale (old);
  jw_add (w, json_object_new_double_s (d, out));
}

void
jw_bool (struct jw *w, bool b)
{
  jw_add (w, json_object_new_boolean (b));
}

void
jw_null (struct jw *w)
{
  jw_put (w, NULL);
}

void
jw_value (struct jw *w, const struct json_object *v)
{
  jw_put (w, json_object_get ((struct json_object *) v));
}

char *
jw_finish (struct jw *w)
{
  char *ret = NULL;

  /* Complete means one top-level value, every container closed. */
  if (!w->error && w->depth == 0 && w->has_root) {
    const char *text =
      json_object_to_json_string_ext (w->root,
                                      JSON_C_TO_STRING_PLAIN |
                                      JSON_C_TO_STRING_NOSLASHESCAPE);
    if (text)
      ret = strdup (text);
  }
  jw_free (w);
  return ret;
}

void
jw_free (struct jw *w)
{
  json_object_put (w->root);
  free (w->key);
  jw_init (w);
}
