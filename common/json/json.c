/* nbdkit-snapshot: a small JSON reader and writer (see json.h).
 *
 * Notes on the design
 *
 * The reader is a strict recursive-descent parser for RFC 8259.  It
 * accepts exactly one value, with white space (space, tab, CR, LF)
 * around it and nothing else.  It refuses:
 *
 *   - raw control characters (U+0000 to U+001F) inside strings;
 *   - bytes that are not well-formed UTF-8 (overlong forms, encoded
 *     surrogates and code points above U+10FFFF included), anywhere
 *     inside strings;
 *   - unknown escapes, \u escapes that are not four hex digits, unpaired
 *     surrogates, and \u0000 (strings are NUL-terminated in memory);
 *   - numbers outside the grammar (leading zeros, "+1", ".5", "1.",
 *     "1e") and numbers that overflow a double;
 *   - nesting deeper than JSON_MAX_DEPTH arrays and objects.
 *
 * Recursion is bounded by the depth limit, so the C stack is safe.
 *
 * Error messages have the form "at byte N: WHAT", N counting from 0 at
 * the start of the text, and point at the first byte that is wrong
 * (at the end of the text for truncated input).
 *
 * Numbers are converted without regard to the C locale: integers are
 * accumulated by hand (exactly, when they fit int64_t) and other
 * numbers go through strtod_l in the "C" locale.
 *
 * The writer appends to a growing buffer that is always NUL-terminated.
 * It keeps, for each open container, whether it is an object and
 * whether it has a member yet, which gives commas automatically and
 * lets misuse (a value in an object without a key, a key in an array,
 * unbalanced ends, two top-level values) be caught.  The first error
 * sets w->error and every later call does nothing.
 */
#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <locale.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"

#define JSON_MAX_DEPTH 64

/* ---- Reading ---- */

struct parser {
  const unsigned char *text;
  size_t len;
  size_t pos;                   /* next byte to look at */
  int depth;                    /* containers currently open */
  char *errmsg;                 /* first error, malloc'd */
  bool failed;                  /* an error (or out of memory) happened */
};

static void error_at (struct parser *p, size_t pos, const char *fs, ...)
  __attribute__ ((format (printf, 3, 4)));

/* Record the first error only: later ones are consequences. */
static void
error_at (struct parser *p, size_t pos, const char *fs, ...)
{
  va_list args;
  char *what = NULL;

  if (p->failed)
    return;
  p->failed = true;
  va_start (args, fs);
  if (vasprintf (&what, fs, args) == -1)
    what = NULL;
  va_end (args);
  if (what == NULL)
    return;                     /* Out of memory: *errmsg stays NULL. */
  if (asprintf (&p->errmsg, "at byte %zu: %s", pos, what) == -1)
    p->errmsg = NULL;
  free (what);
}

static void
out_of_memory (struct parser *p)
{
  p->failed = true;
}

static void
skip_space (struct parser *p)
{
  while (p->pos < p->len) {
    unsigned char c = p->text[p->pos];
    if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
      break;
    p->pos++;
  }
}

/* Suffix for "expected X" messages: says so when input has run out. */
static const char *
found (struct parser *p)
{
  return p->pos >= p->len ? " before end of input" : "";
}

static struct json *
new_value (struct parser *p, enum json_type type)
{
  struct json *v = calloc (1, sizeof *v);

  if (v == NULL)
    out_of_memory (p);
  else
    v->type = type;
  return v;
}

/* A growing byte buffer for decoded strings. */
struct sbuf {
  char *s;
  size_t len, alloc;
};

static bool
sbuf_add (struct parser *p, struct sbuf *b, const void *data, size_t n)
{
  if (b->len + n + 1 > b->alloc) {
    size_t alloc = b->alloc ? b->alloc : 16;
    char *s;

    while (b->len + n + 1 > alloc)
      alloc *= 2;
    s = realloc (b->s, alloc);
    if (s == NULL) {
      out_of_memory (p);
      return false;
    }
    b->s = s;
    b->alloc = alloc;
  }
  memcpy (b->s + b->len, data, n);
  b->len += n;
  b->s[b->len] = '\0';
  return true;
}

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

/* Encode code point cp (not a surrogate, not 0) as UTF-8 into out,
 * returning the length.
 */
static size_t
utf8_encode (uint32_t cp, char *out)
{
  if (cp < 0x80) {
    out[0] = cp;
    return 1;
  }
  if (cp < 0x800) {
    out[0] = 0xc0 | (cp >> 6);
    out[1] = 0x80 | (cp & 0x3f);
    return 2;
  }
  if (cp < 0x10000) {
    out[0] = 0xe0 | (cp >> 12);
    out[1] = 0x80 | ((cp >> 6) & 0x3f);
    out[2] = 0x80 | (cp & 0x3f);
    return 3;
  }
  out[0] = 0xf0 | (cp >> 18);
  out[1] = 0x80 | ((cp >> 12) & 0x3f);
  out[2] = 0x80 | ((cp >> 6) & 0x3f);
  out[3] = 0x80 | (cp & 0x3f);
  return 4;
}

/* Read the four hex digits of a \u escape at p->pos.  Return the
 * value, or -1 with the error set.
 */
static int32_t
parse_hex4 (struct parser *p)
{
  int32_t v = 0;

  for (int i = 0; i < 4; ++i) {
    unsigned char c;

    if (p->pos >= p->len) {
      error_at (p, p->pos, "expected hex digit before end of input");
      return -1;
    }
    c = p->text[p->pos];
    v <<= 4;
    if (c >= '0' && c <= '9')
      v |= c - '0';
    else if (c >= 'a' && c <= 'f')
      v |= c - 'a' + 10;
    else if (c >= 'A' && c <= 'F')
      v |= c - 'A' + 10;
    else {
      error_at (p, p->pos, "expected hex digit");
      return -1;
    }
    p->pos++;
  }
  return v;
}

/* Parse a string starting at the opening quote.  On success return the
 * decoded NUL-terminated UTF-8 and set *lenp.
 */
static char *
parse_string (struct parser *p, size_t *lenp)
{
  struct sbuf b = { NULL, 0, 0 };

  if (p->pos >= p->len || p->text[p->pos] != '"') {
    error_at (p, p->pos, "expected string%s", found (p));
    return NULL;
  }
  p->pos++;
  if (!sbuf_add (p, &b, "", 0))
    return NULL;

  for (;;) {
    size_t start = p->pos;
    unsigned char c;

    if (p->pos >= p->len) {
      error_at (p, p->pos, "expected '\"' before end of input");
      goto fail;
    }
    c = p->text[p->pos];
    if (c == '"') {
      p->pos++;
      break;
    }
    if (c < 0x20) {
      error_at (p, p->pos,
                "expected escape sequence, not raw control character 0x%02x",
                c);
      goto fail;
    }
    if (c != '\\') {
      size_t n = utf8_length (p->text + p->pos, p->len - p->pos);

      if (n == 0) {
        error_at (p, p->pos, "invalid UTF-8");
        goto fail;
      }
      if (!sbuf_add (p, &b, p->text + p->pos, n))
        goto fail;
      p->pos += n;
      continue;
    }

    /* An escape. */
    p->pos++;
    if (p->pos >= p->len) {
      error_at (p, p->pos, "expected escape character before end of input");
      goto fail;
    }
    c = p->text[p->pos++];
    switch (c) {
    case '"': case '\\': case '/':
      if (!sbuf_add (p, &b, &c, 1)) goto fail;
      break;
    case 'b': if (!sbuf_add (p, &b, "\b", 1)) goto fail; break;
    case 'f': if (!sbuf_add (p, &b, "\f", 1)) goto fail; break;
    case 'n': if (!sbuf_add (p, &b, "\n", 1)) goto fail; break;
    case 'r': if (!sbuf_add (p, &b, "\r", 1)) goto fail; break;
    case 't': if (!sbuf_add (p, &b, "\t", 1)) goto fail; break;
    case 'u': {
      int32_t cp = parse_hex4 (p);
      char utf8[4];

      if (cp == -1)
        goto fail;
      if (cp == 0) {
        error_at (p, start, "\\u0000 is not allowed in strings");
        goto fail;
      }
      if (cp >= 0xdc00 && cp <= 0xdfff) {
        error_at (p, start, "expected a high surrogate before \\u%04x", cp);
        goto fail;
      }
      if (cp >= 0xd800 && cp <= 0xdbff) {
        size_t low_start = p->pos;
        int32_t low;

        if (p->len - p->pos < 2 ||
            p->text[p->pos] != '\\' || p->text[p->pos + 1] != 'u') {
          error_at (p, p->pos,
                    "expected a low surrogate escape after \\u%04x", cp);
          goto fail;
        }
        p->pos += 2;
        low = parse_hex4 (p);
        if (low == -1)
          goto fail;
        if (low < 0xdc00 || low > 0xdfff) {
          error_at (p, low_start,
                    "expected a low surrogate after \\u%04x", cp);
          goto fail;
        }
        cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
      }
      if (!sbuf_add (p, &b, utf8, utf8_encode (cp, utf8)))
        goto fail;
      break;
    }
    default:
      error_at (p, p->pos - 1, "expected one of \"\\/bfnrtu after '\\'");
      goto fail;
    }
  }

  *lenp = b.len;
  return b.s;

 fail:
  free (b.s);
  return NULL;
}

/* The "C" locale, for strtod_l: created once, never changed. */
static locale_t c_locale;
static pthread_once_t c_locale_once = PTHREAD_ONCE_INIT;

static void
make_c_locale (void)
{
  c_locale = newlocale (LC_ALL_MASK, "C", (locale_t) 0);
}

static struct json *
parse_number (struct parser *p)
{
  size_t start = p->pos;
  bool negative = false, integral = true, fits = true;
  uint64_t mag = 0;             /* magnitude of the integer part */
  struct json *v;

  if (p->pos < p->len && p->text[p->pos] == '-') {
    negative = true;
    p->pos++;
  }
  if (p->pos >= p->len ||
      p->text[p->pos] < '0' || p->text[p->pos] > '9') {
    error_at (p, p->pos, "expected digit%s", found (p));
    return NULL;
  }
  if (p->text[p->pos] == '0')
    p->pos++;                   /* A leading zero stands alone. */
  else {
    while (p->pos < p->len &&
           p->text[p->pos] >= '0' && p->text[p->pos] <= '9') {
      unsigned d = p->text[p->pos] - '0';

      if (mag > (UINT64_MAX - d) / 10)
        fits = false;
      else
        mag = mag * 10 + d;
      p->pos++;
    }
  }
  if (p->pos < p->len && p->text[p->pos] == '.') {
    integral = false;
    p->pos++;
    if (p->pos >= p->len ||
        p->text[p->pos] < '0' || p->text[p->pos] > '9') {
      error_at (p, p->pos, "expected digit after '.'%s", found (p));
      return NULL;
    }
    while (p->pos < p->len &&
           p->text[p->pos] >= '0' && p->text[p->pos] <= '9')
      p->pos++;
  }
  if (p->pos < p->len &&
      (p->text[p->pos] == 'e' || p->text[p->pos] == 'E')) {
    integral = false;
    p->pos++;
    if (p->pos < p->len &&
        (p->text[p->pos] == '+' || p->text[p->pos] == '-'))
      p->pos++;
    if (p->pos >= p->len ||
        p->text[p->pos] < '0' || p->text[p->pos] > '9') {
      error_at (p, p->pos, "expected digit in exponent%s", found (p));
      return NULL;
    }
    while (p->pos < p->len &&
           p->text[p->pos] >= '0' && p->text[p->pos] <= '9')
      p->pos++;
  }

  v = new_value (p, JSON_NUMBER);
  if (v == NULL)
    return NULL;

  if (integral && fits &&
      (negative ? mag <= (uint64_t) INT64_MAX + 1 : mag <= INT64_MAX)) {
    v->is_integer = true;
    /* -(INT64_MAX + 1) cannot be written as a negated int64_t. */
    if (negative)
      v->integer = mag == (uint64_t) INT64_MAX + 1
        ? INT64_MIN : -(int64_t) mag;
    else
      v->integer = mag;
    v->number = v->integer;
  }
  else {
    /* The text was checked above: copy it to NUL-terminate it. */
    size_t n = p->pos - start;
    char *copy = malloc (n + 1);

    if (copy == NULL) {
      out_of_memory (p);
      free (v);
      return NULL;
    }
    memcpy (copy, p->text + start, n);
    copy[n] = '\0';
    pthread_once (&c_locale_once, make_c_locale);
    errno = 0;
    if (c_locale != (locale_t) 0)
      v->number = strtod_l (copy, NULL, c_locale);
    else
      v->number = strtod (copy, NULL);
    free (copy);
    /* Underflow to zero or a denormal is harmless; overflow is not. */
    if (isinf (v->number)) {
      error_at (p, start, "number out of range");
      free (v);
      return NULL;
    }
  }
  return v;
}

/* Match a literal word such as "true". */
static bool
parse_word (struct parser *p, const char *word)
{
  size_t n = strlen (word);

  for (size_t i = 0; i < n; ++i) {
    if (p->pos + i >= p->len) {
      error_at (p, p->pos + i, "expected '%s' before end of input", word);
      return false;
    }
    if (p->text[p->pos + i] != (unsigned char) word[i]) {
      error_at (p, p->pos, "expected value");
      return false;
    }
  }
  p->pos += n;
  return true;
}

static struct json *parse_value (struct parser *p);

/* Append item (and key for objects) to container v. */
static bool
add_item (struct parser *p, struct json *v, size_t *alloc,
          struct json *item, char *key)
{
  if (v->len == *alloc) {
    size_t n = *alloc ? *alloc * 2 : 4;
    struct json **items = realloc (v->items, n * sizeof *items);

    if (items == NULL)
      goto oom;
    v->items = items;
    if (v->type == JSON_OBJECT) {
      char **keys = realloc (v->keys, n * sizeof *keys);

      if (keys == NULL)
        goto oom;
      v->keys = keys;
    }
    *alloc = n;
  }
  v->items[v->len] = item;
  if (v->type == JSON_OBJECT)
    v->keys[v->len] = key;
  v->len++;
  return true;

 oom:
  out_of_memory (p);
  json_free (item);
  free (key);
  return false;
}

/* Parse an array or object starting at its opening bracket. */
static struct json *
parse_container (struct parser *p, enum json_type type)
{
  const char close = type == JSON_ARRAY ? ']' : '}';
  struct json *v;
  size_t alloc = 0;

  if (p->depth >= JSON_MAX_DEPTH) {
    error_at (p, p->pos, "nesting deeper than %d levels", JSON_MAX_DEPTH);
    return NULL;
  }
  v = new_value (p, type);
  if (v == NULL)
    return NULL;
  p->depth++;
  p->pos++;                     /* '[' or '{' */

  skip_space (p);
  if (p->pos < p->len && p->text[p->pos] == close) {
    p->pos++;
    goto done;
  }
  for (;;) {
    char *key = NULL;
    struct json *item;

    skip_space (p);
    if (type == JSON_OBJECT) {
      size_t keylen;

      size_t at = p->pos;

      if (p->pos >= p->len || p->text[p->pos] != '"') {
        error_at (p, p->pos, "expected string key%s", found (p));
        goto fail;
      }
      key = parse_string (p, &keylen);
      if (key == NULL)
        goto fail;
      /* A key given twice is ambiguous (which one counts?): refused. */
      for (size_t i = 0; i < v->len; ++i)
        if (strcmp (v->keys[i], key) == 0) {
          error_at (p, at, "duplicate key \"%s\"", key);
          free (key);
          goto fail;
        }
      skip_space (p);
      if (p->pos >= p->len || p->text[p->pos] != ':') {
        error_at (p, p->pos, "expected ':'%s", found (p));
        free (key);
        goto fail;
      }
      p->pos++;
    }
    item = parse_value (p);
    if (item == NULL) {
      free (key);
      goto fail;
    }
    if (!add_item (p, v, &alloc, item, key))
      goto fail;

    skip_space (p);
    if (p->pos < p->len && p->text[p->pos] == ',') {
      p->pos++;
      continue;
    }
    if (p->pos < p->len && p->text[p->pos] == close) {
      p->pos++;
      break;
    }
    error_at (p, p->pos, "expected ',' or '%c'%s", close, found (p));
    goto fail;
  }

 done:
  p->depth--;
  return v;

 fail:
  p->depth--;
  json_free (v);
  return NULL;
}

/* Parse one value, with white space before it. */
static struct json *
parse_value (struct parser *p)
{
  struct json *v;

  skip_space (p);
  if (p->pos >= p->len) {
    error_at (p, p->pos, "expected value before end of input");
    return NULL;
  }
  switch (p->text[p->pos]) {
  case '{':
    return parse_container (p, JSON_OBJECT);
  case '[':
    return parse_container (p, JSON_ARRAY);
  case '"': {
    size_t len;
    char *s = parse_string (p, &len);

    if (s == NULL)
      return NULL;
    v = new_value (p, JSON_STRING);
    if (v == NULL) {
      free (s);
      return NULL;
    }
    v->string = s;
    v->len = len;
    return v;
  }
  case 't':
    if (!parse_word (p, "true"))
      return NULL;
    v = new_value (p, JSON_BOOL);
    if (v)
      v->boolean = true;
    return v;
  case 'f':
    if (!parse_word (p, "false"))
      return NULL;
    v = new_value (p, JSON_BOOL);
    if (v)
      v->boolean = false;
    return v;
  case 'n':
    if (!parse_word (p, "null"))
      return NULL;
    return new_value (p, JSON_NULL);
  case '-': case '0': case '1': case '2': case '3': case '4':
  case '5': case '6': case '7': case '8': case '9':
    return parse_number (p);
  default:
    error_at (p, p->pos, "expected value");
    return NULL;
  }
}

struct json *
json_parse (const char *text, size_t len, char **errmsg)
{
  struct parser p = {
    .text = (const unsigned char *) text, .len = len,
  };
  struct json *v;

  v = parse_value (&p);
  if (v != NULL) {
    skip_space (&p);
    if (p.pos < p.len) {
      error_at (&p, p.pos, "expected end of input");
      json_free (v);
      v = NULL;
    }
  }
  /* p.errmsg is NULL unless v is NULL. */
  if (errmsg)
    *errmsg = p.errmsg;
  else
    free (p.errmsg);
  return v;
}

void
json_free (struct json *v)
{
  if (v == NULL)
    return;
  for (size_t i = 0; i < v->len && v->items; ++i) {
    json_free (v->items[i]);
    if (v->keys)
      free (v->keys[i]);
  }
  free (v->items);
  free (v->keys);
  free (v->string);
  free (v);
}

const struct json *
json_get (const struct json *v, const char *key)
{
  if (v == NULL || v->type != JSON_OBJECT)
    return NULL;
  /* Keys are unique (json_parse). */
  for (size_t i = v->len; i > 0; --i)
    if (strcmp (v->keys[i - 1], key) == 0)
      return v->items[i - 1];
  return NULL;
}

const char *
json_get_string (const struct json *v, const char *key)
{
  const struct json *m = json_get (v, key);

  return m && m->type == JSON_STRING ? m->string : NULL;
}

bool
json_get_int (const struct json *v, const char *key, int64_t *out)
{
  const struct json *m = json_get (v, key);

  if (m == NULL || m->type != JSON_NUMBER || !m->is_integer)
    return false;
  *out = m->integer;
  return true;
}

bool
json_get_bool (const struct json *v, const char *key, bool *out)
{
  const struct json *m = json_get (v, key);

  if (m == NULL || m->type != JSON_BOOL)
    return false;
  *out = m->boolean;
  return true;
}

/* ---- Writing ---- */

void
jw_init (struct jw *w)
{
  memset (w, 0, sizeof *w);
}

static void
jw_append (struct jw *w, const char *s, size_t n)
{
  if (w->error)
    return;
  if (w->len + n + 1 > w->alloc) {
    size_t alloc = w->alloc ? w->alloc : 64;
    char *buf;

    while (w->len + n + 1 > alloc)
      alloc *= 2;
    buf = realloc (w->buf, alloc);
    if (buf == NULL) {
      w->error = true;
      return;
    }
    w->buf = buf;
    w->alloc = alloc;
  }
  memcpy (w->buf + w->len, s, n);
  w->len += n;
  w->buf[w->len] = '\0';
}

static void
jw_puts (struct jw *w, const char *s)
{
  jw_append (w, s, strlen (s));
}

/* Called before every value: checks the value is allowed here and
 * writes the comma that separates it from the previous array element.
 */
static void
jw_before_value (struct jw *w)
{
  if (w->error)
    return;
  if (w->depth == 0) {
    if (w->len > 0)             /* A second top-level value. */
      w->error = true;
    return;
  }
  if (w->in_object[w->depth - 1]) {
    if (!w->after_key)          /* A member value needs jw_key first. */
      w->error = true;
    w->after_key = false;
    return;
  }
  if (!w->first[w->depth - 1])
    jw_puts (w, ",");
  w->first[w->depth - 1] = false;
}

/* Write s as a JSON string.  Bytes that are not well-formed UTF-8 are
 * replaced by U+FFFD so that the output is always valid JSON.
 */
static void
jw_quoted (struct jw *w, const char *str)
{
  const unsigned char *s = (const unsigned char *) str;
  size_t n = strlen (str);

  jw_puts (w, "\"");
  while (n > 0) {
    size_t run = 0, len;

    /* Copy the longest run of bytes that need no escaping. */
    while (run < n && s[run] >= 0x20 && s[run] != '"' && s[run] != '\\' &&
           (len = utf8_length (s + run, n - run)) != 0)
      run += len;
    jw_append (w, (const char *) s, run);
    s += run;
    n -= run;
    if (n == 0)
      break;

    if (*s == '"')
      jw_puts (w, "\\\"");
    else if (*s == '\\')
      jw_puts (w, "\\\\");
    else if (*s < 0x20) {
      char esc[8];

      snprintf (esc, sizeof esc, "\\u%04x", *s);
      jw_puts (w, esc);
    }
    else
      jw_puts (w, "\xef\xbf\xbd");      /* U+FFFD for a bad byte */
    s++;
    n--;
  }
  jw_puts (w, "\"");
}

static void
jw_begin (struct jw *w, bool object)
{
  jw_before_value (w);
  if (w->error)
    return;
  if (w->depth >= JSON_MAX_DEPTH) {
    w->error = true;
    return;
  }
  jw_puts (w, object ? "{" : "[");
  w->in_object[w->depth] = object;
  w->first[w->depth] = true;
  w->depth++;
}

static void
jw_end (struct jw *w, bool object)
{
  if (w->error)
    return;
  if (w->depth == 0 || w->in_object[w->depth - 1] != object ||
      w->after_key) {
    w->error = true;
    return;
  }
  w->depth--;
  jw_puts (w, object ? "}" : "]");
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
  if (key == NULL || w->depth == 0 || !w->in_object[w->depth - 1] ||
      w->after_key) {
    w->error = true;
    return;
  }
  if (!w->first[w->depth - 1])
    jw_puts (w, ",");
  w->first[w->depth - 1] = false;
  jw_quoted (w, key);
  jw_puts (w, ":");
  w->after_key = true;
}

void
jw_string (struct jw *w, const char *s)
{
  if (s == NULL) {
    jw_null (w);
    return;
  }
  jw_before_value (w);
  jw_quoted (w, s);
}

void
jw_int (struct jw *w, int64_t i)
{
  char buf[32];

  jw_before_value (w);
  snprintf (buf, sizeof buf, "%" PRIi64, i);
  jw_puts (w, buf);
}

void
jw_uint (struct jw *w, uint64_t u)
{
  char buf[32];

  jw_before_value (w);
  snprintf (buf, sizeof buf, "%" PRIu64, u);
  jw_puts (w, buf);
}

/* Format d with prec significant digits into out, always with '.' as
 * the decimal point whatever the locale.
 */
static void
format_double (char *out, size_t outlen, double d, int prec)
{
  char buf[64];
  size_t j = 0;

  snprintf (buf, sizeof buf, "%.*g", prec, d);
  /* Keep the characters of the JSON grammar and put '.' in place of
   * anything else (the locale's decimal point, perhaps multibyte).
   */
  for (size_t i = 0; buf[i] != '\0' && j < outlen - 1; ++i) {
    char c = buf[i];

    if ((c >= '0' && c <= '9') || c == '-' || c == '+' ||
        c == 'e' || c == 'E')
      out[j++] = c;
    else if (j == 0 || out[j - 1] != '.')
      out[j++] = '.';
  }
  out[j] = '\0';
}

void
jw_double (struct jw *w, double d)
{
  char out[64];

  jw_before_value (w);
  if (w->error)
    return;
  if (!isfinite (d)) {          /* JSON has no NaN or infinity. */
    w->error = true;
    return;
  }
  pthread_once (&c_locale_once, make_c_locale);
  /* 17 significant digits always read back as the same double; fewer
   * often do and look better (0.1 rather than 0.10000000000000001).
   */
  for (int prec = 15; prec <= 17; ++prec) {
    format_double (out, sizeof out, d, prec);
    if (prec == 17 || c_locale == (locale_t) 0 ||
        strtod_l (out, NULL, c_locale) == d)
      break;
  }
  jw_puts (w, out);
}

void
jw_bool (struct jw *w, bool b)
{
  jw_before_value (w);
  jw_puts (w, b ? "true" : "false");
}

void
jw_null (struct jw *w)
{
  jw_before_value (w);
  jw_puts (w, "null");
}

char *
jw_finish (struct jw *w)
{
  char *ret = NULL;

  /* Complete means exactly one top-level value, every container closed. */
  if (!w->error && w->depth == 0 && w->len > 0) {
    ret = w->buf;
    w->buf = NULL;
  }
  jw_free (w);
  return ret;
}

void
jw_free (struct jw *w)
{
  free (w->buf);
  jw_init (w);
}
