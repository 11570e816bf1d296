/* nbdkit-snapshot: a small JSON reader and writer for the control
 * protocol (one JSON object per line) and nbdsnap --json.
 *
 * Thread safety: a parsed value or a writer belongs to one thread at a
 * time; there is no global state (json.c creates one read-only "C"
 * locale object, once, to convert numbers whatever the locale).
 */
#ifndef SNAP_JSON_H
#define SNAP_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- Reading ---- */

enum json_type {
  JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT,
};

struct json {
  enum json_type type;
  bool boolean;                 /* JSON_BOOL */
  double number;                /* JSON_NUMBER */
  bool is_integer;              /* JSON_NUMBER written without . e E and
                                   fits int64_t: then integer is exact */
  int64_t integer;
  char *string;                 /* JSON_STRING, NUL-terminated UTF-8; a
                                   \u0000 escape is rejected */
  size_t len;                   /* JSON_STRING bytes; ARRAY/OBJECT items */
  struct json **items;          /* JSON_ARRAY and JSON_OBJECT values */
  char **keys;                  /* JSON_OBJECT keys, parallel to items */
};

/* Parse exactly one JSON value from text[0..len) (surrounding white
 * space allowed, nothing else).  Nesting deeper than 64 levels is
 * refused, and so are strings that are not valid UTF-8 and numbers
 * too large for a double.  On error return NULL and, if errmsg is not
 * NULL, set *errmsg to a malloc'd message such as "at byte 12:
 * expected ':'" (byte offsets count from 0; NULL if out of memory).
 * On success *errmsg is set to NULL.
 */
extern struct json *json_parse (const char *text, size_t len, char **errmsg);

extern void json_free (struct json *v);

/* Look up key in an object (json_parse refuses repeated keys).  NULL if v
 * is not an object or has no such key.
 */
extern const struct json *json_get (const struct json *v, const char *key);

/* Convenience lookups: NULL / false when the key is absent or has
 * another type.
 */
extern const char *json_get_string (const struct json *v, const char *key);
extern bool json_get_int (const struct json *v, const char *key,
                          int64_t *out);
extern bool json_get_bool (const struct json *v, const char *key, bool *out);

/* ---- Writing ---- */

/* A writer builds one JSON text in memory.  Commas and nesting are
 * handled for you: call jw_key before each value inside an object.
 * Errors (out of memory, misuse) are sticky and reported by jw_finish.
 * Misuse is: a value in an object without jw_key, jw_key outside an
 * object or twice in a row, an end that does not match its begin,
 * nesting deeper than 64, or a second top-level value.
 */
struct jw {
  char *buf;                    /* the text so far, NUL-terminated */
  size_t len, alloc;
  bool error;
  int depth;                    /* containers open */
  bool first[64];               /* container depth-1 has no member yet */
  bool in_object[64];           /* container depth-1 is an object */
  bool after_key;               /* jw_key was called, the value is due */
};

extern void jw_init (struct jw *w);
extern void jw_begin_object (struct jw *w);
extern void jw_end_object (struct jw *w);
extern void jw_begin_array (struct jw *w);
extern void jw_end_array (struct jw *w);
extern void jw_key (struct jw *w, const char *key);
/* jw_string: NULL writes null; ", \ and control characters are
 * escaped (\" \\ \u00XX) and bytes that are not valid UTF-8 are
 * written as U+FFFD, so the output always parses.
 */
extern void jw_string (struct jw *w, const char *s);
extern void jw_int (struct jw *w, int64_t i);
extern void jw_uint (struct jw *w, uint64_t u);
/* A finite double, in the shortest form that reads back exactly with
 * at most 17 digits ("0.5", "1e+300"); NaN or infinity is an error.
 * Used to re-serialise parsed numbers that are not integers.
 */
extern void jw_double (struct jw *w, double d);
extern void jw_bool (struct jw *w, bool b);
extern void jw_null (struct jw *w);

/* Return the text (malloc'd, NUL-terminated, no newline) and reset the
 * writer, or NULL if any call failed or the text is incomplete (no
 * value, or a container left open); the writer is freed either way.
 */
extern char *jw_finish (struct jw *w);

/* Free a writer without taking its text. */
extern void jw_free (struct jw *w);

#endif /* SNAP_JSON_H */
