/* nbdkit-snapshot: JSON for the control protocol (one JSON object per
 * line) and nbdsnap --json, over json-c.
 *
 * A parsed value is json-c's struct json_object.  Read objects with
 * the lookups below, which apply this project's typing rules; read
 * arrays and types with json-c's own accessors (json_object_is_type,
 * json_object_array_length, json_object_array_get_idx).  As in json-c,
 * a JSON null is a NULL pointer.
 *
 * Text is written with the jw_* writer, which builds a json-c tree and
 * has json-c serialise it.
 *
 * Thread safety: a parsed value or a writer belongs to one thread at a
 * time; there is no global state (json.c creates one read-only "C"
 * locale object, once, to format numbers whatever the locale).
 */
#ifndef SNAP_JSON_H
#define SNAP_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <json-c/json.h>

/* Containers nest at most this deep, in what is read and written. */
#define JSON_MAX_DEPTH 64

/* ---- Reading ---- */

/* Parse exactly one JSON value (RFC 8259) from text[0..len), with
 * white space around it and nothing else.  Refused as well: nesting
 * deeper than JSON_MAX_DEPTH, NaN and Infinity, integers below
 * INT64_MIN or above UINT64_MAX, other numbers beyond a double's
 * range, bytes that are not well-formed UTF-8, NUL bytes and \u0000,
 * and a key repeated in one object.  An unpaired surrogate escape
 * (\ud800) reads as U+FFFD.  Strings read are therefore well-formed
 * UTF-8 without NUL.
 *
 * On error return NULL and, if errmsg is not NULL, set *errmsg to a
 * malloc'd message such as "at byte 12: unexpected character" (byte
 * offsets count from 0; NULL if out of memory).  On success *errmsg is
 * set to NULL.  Free the value with json_free.
 */
extern struct json_object *json_parse (const char *text, size_t len,
                                       char **errmsg);

extern void json_free (struct json_object *v);

/* Whether object v has key, whatever its value (null included). */
extern bool json_has (const struct json_object *v, const char *key);

/* The value of key in object v; NULL if v is not an object, has no
 * such key, or its value is null.
 */
extern const struct json_object *json_get (const struct json_object *v,
                                           const char *key);

/* Typed lookups: NULL / false when the key is absent or its value has
 * another type.  json_get_int wants an integer (no fraction or
 * exponent) that fits int64_t; json_get_number any number.
 */
extern const char *json_get_string (const struct json_object *v,
                                    const char *key);
extern bool json_get_int (const struct json_object *v, const char *key,
                          int64_t *out);
extern bool json_get_number (const struct json_object *v, const char *key,
                             double *out);
extern bool json_get_bool (const struct json_object *v, const char *key,
                           bool *out);

/* ---- Writing ---- */

/* A writer builds one JSON value.  Call jw_key before each value inside
 * an object.  Errors (out of memory, misuse) are sticky and reported by
 * jw_finish.  Misuse is: a value in an object without jw_key, jw_key
 * outside an object or twice in a row, a key repeated in one object,
 * an end that does not match its begin, nesting deeper than
 * JSON_MAX_DEPTH, or a second top-level value.
 */
struct jw {
  struct json_object *root;     /* the value written (NULL: none, or null) */
  bool has_root;
  struct json_object *open[JSON_MAX_DEPTH]; /* containers open, in root */
  int depth;
  char *key;                    /* from jw_key, for the next value */
  bool error;
};

extern void jw_init (struct jw *w);
extern void jw_begin_object (struct jw *w);
extern void jw_end_object (struct jw *w);
extern void jw_begin_array (struct jw *w);
extern void jw_end_array (struct jw *w);
/* jw_key and jw_string write bytes that are not well-formed UTF-8 as
 * U+FFFD, so the output always parses.  jw_string (w, NULL) writes
 * null.
 */
extern void jw_key (struct jw *w, const char *key);
extern void jw_string (struct jw *w, const char *s);
extern void jw_int (struct jw *w, int64_t i);
extern void jw_uint (struct jw *w, uint64_t u);
/* A finite double, in the shortest form that reads back exactly with
 * at most 17 digits ("0.5", "1e+300", "3"); NaN or infinity is an
 * error.
 */
extern void jw_double (struct jw *w, double d);
extern void jw_bool (struct jw *w, bool b);
extern void jw_null (struct jw *w);
/* A parsed value (NULL is null), shared with the parse: the writer
 * takes a reference.  Its numbers are written as they were spelt.
 */
extern void jw_value (struct jw *w, const struct json_object *v);

/* Return the text (malloc'd, NUL-terminated, on one line, no newline)
 * or NULL if any call failed or the value is incomplete (none, or a
 * container left open); the writer is freed and reset either way.
 */
extern char *jw_finish (struct jw *w);

/* Free a writer without taking its text. */
extern void jw_free (struct jw *w);

#endif /* SNAP_JSON_H */
