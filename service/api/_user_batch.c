/* StreamUsers' hot path in C: rows of repositories.users.USER_COLUMNS -> the serialized bytes of
 * one shop.v1.UserBatch, byte for byte what
 * users_convert.user_rows_to_batch(rows, token).SerializeToString() gives (upb): fields in
 * number order, proto3 defaults omitted, created_at and updated_at always present (empty when
 * zero, as upb writes a submessage that was set), deleted_at only when not None.
 *
 * Plain C rather than Cython: no build dependency beyond the compiler (pip would fetch Cython
 * into every isolated build), nothing generated to keep out of git, and the loop is a handful
 * of CPython calls whose references and UTF-8 caches are easier to reason about written out.
 * Built optionally by setup.py; users_encode.py falls back to upb when it is missing.
 *
 *   encode_user_batch(rows, resume_token) -> bytes
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define USER_COLUMNS 8
#define MICROS_PER_SECOND 1000000

/* Keys: field number << 3 | wire type (0 varint, 2 length-delimited). */
enum {
    BATCH_USERS = 1 << 3 | 2,
    BATCH_RESUME_TOKEN = 2 << 3 | 2,
    USER_ID = 1 << 3 | 0,
    USER_EMAIL = 2 << 3 | 2,
    USER_FIRST_NAME = 3 << 3 | 2,
    USER_LAST_NAME = 4 << 3 | 2,
    USER_FULL_NAME = 5 << 3 | 2,
    USER_IS_ACTIVE = 6 << 3 | 0,
    USER_CREATED_AT = 7 << 3 | 2,
    USER_UPDATED_AT = 8 << 3 | 2,
    USER_DELETED_AT = 9 << 3 | 2,
    TIMESTAMP_SECONDS = 1 << 3 | 0,
    TIMESTAMP_NANOS = 2 << 3 | 0,
};

static inline Py_ssize_t varint_size(uint64_t v) {
    Py_ssize_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

static inline char *put_varint(char *p, uint64_t v) {
    while (v >= 0x80) {
        *p++ = (char)(v | 0x80);
        v >>= 7;
    }
    *p++ = (char)v;
    return p;
}

/* A string field's bytes on the wire (key, length, UTF-8); nothing when empty. */
static inline Py_ssize_t string_field_size(Py_ssize_t n) {
    return n ? 1 + varint_size((uint64_t)n) + n : 0;
}

static inline char *put_string_field(char *p, char key, const char *s, Py_ssize_t n) {
    if (n) {
        *p++ = key;
        p = put_varint(p, (uint64_t)n);
        memcpy(p, s, (size_t)n);
        p += n;
    }
    return p;
}

/* google.protobuf.Timestamp from epoch microseconds, split as Python's divmod does (floor:
 * nanos never negative). `size` is its body's length, at most 17 bytes: one length byte. */
typedef struct {
    int64_t seconds;
    int32_t nanos;
    Py_ssize_t size;
} Stamp;

static int stamp_from(PyObject *value, const char *column, Stamp *ts) {
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "%s: expected int epoch microseconds, got %.100s", column,
                     Py_TYPE(value)->tp_name);
        return -1;
    }
    long long micros = PyLong_AsLongLong(value);
    if (micros == -1 && PyErr_Occurred())
        return -1;
    long long seconds = micros / MICROS_PER_SECOND;
    long long rest = micros % MICROS_PER_SECOND;
    if (rest < 0) {
        rest += MICROS_PER_SECOND;
        seconds -= 1;
    }
    ts->seconds = seconds;
    ts->nanos = (int32_t)(rest * 1000);
    ts->size = (seconds ? 1 + varint_size((uint64_t)seconds) : 0) +
               (ts->nanos ? 1 + varint_size((uint64_t)ts->nanos) : 0);
    return 0;
}

static inline char *put_stamp_field(char *p, char key, const Stamp *ts) {
    *p++ = key;
    *p++ = (char)ts->size;
    if (ts->seconds) {
        *p++ = TIMESTAMP_SECONDS;
        p = put_varint(p, (uint64_t)ts->seconds);
    }
    if (ts->nanos) {
        *p++ = TIMESTAMP_NANOS;
        p = put_varint(p, (uint64_t)ts->nanos);
    }
    return p;
}

static int utf8_of(PyObject *value, const char *column, const char **s, Py_ssize_t *n) {
    if (!PyUnicode_Check(value)) {
        PyErr_Format(PyExc_TypeError, "%s: expected str, got %.100s", column,
                     Py_TYPE(value)->tp_name);
        return -1;
    }
    /* ASCII: the str's own buffer; otherwise UTF-8 encoded once and cached in the str. */
    *s = PyUnicode_AsUTF8AndSize(value, n);
    return *s ? 0 : -1;
}

/* One row, its values checked and converted, before anything is written. */
typedef struct {
    long long id;
    const char *email, *first_name, *last_name;
    Py_ssize_t email_n, first_name_n, last_name_n;
    int is_active, has_deleted;
    Stamp created, updated, deleted;
    Py_ssize_t size; /* the User message's body */
} User;

static int user_from(PyObject *const *v, User *u) {
    u->id = PyLong_AsLongLong(v[0]);
    if (u->id == -1 && PyErr_Occurred())
        return -1;
    if (utf8_of(v[1], "email", &u->email, &u->email_n) < 0 ||
        utf8_of(v[2], "first_name", &u->first_name, &u->first_name_n) < 0 ||
        utf8_of(v[3], "last_name", &u->last_name, &u->last_name_n) < 0)
        return -1;
    if (v[4] == Py_True || v[4] == Py_False)
        u->is_active = v[4] == Py_True;
    else if ((u->is_active = PyObject_IsTrue(v[4])) < 0)
        return -1;
    if (stamp_from(v[5], "created_at", &u->created) < 0 ||
        stamp_from(v[6], "updated_at", &u->updated) < 0)
        return -1;
    u->has_deleted = v[7] != Py_None;
    if (u->has_deleted && stamp_from(v[7], "deleted_at", &u->deleted) < 0)
        return -1;
    u->size = (u->id ? 1 + varint_size((uint64_t)u->id) : 0) + string_field_size(u->email_n) +
              string_field_size(u->first_name_n) + string_field_size(u->last_name_n) +
              /* full_name: first_name, one space, last_name; never empty */
              string_field_size(u->first_name_n + 1 + u->last_name_n) + (u->is_active ? 2 : 0) +
              2 + u->created.size + 2 + u->updated.size +
              (u->has_deleted ? 2 + u->deleted.size : 0);
    return 0;
}

static char *put_user(char *p, const User *u) {
    *p++ = BATCH_USERS;
    p = put_varint(p, (uint64_t)u->size);
    if (u->id) {
        *p++ = USER_ID;
        p = put_varint(p, (uint64_t)u->id);
    }
    p = put_string_field(p, USER_EMAIL, u->email, u->email_n);
    p = put_string_field(p, USER_FIRST_NAME, u->first_name, u->first_name_n);
    p = put_string_field(p, USER_LAST_NAME, u->last_name, u->last_name_n);
    *p++ = USER_FULL_NAME;
    p = put_varint(p, (uint64_t)(u->first_name_n + 1 + u->last_name_n));
    memcpy(p, u->first_name, (size_t)u->first_name_n);
    p += u->first_name_n;
    *p++ = ' ';
    memcpy(p, u->last_name, (size_t)u->last_name_n);
    p += u->last_name_n;
    if (u->is_active) {
        *p++ = USER_IS_ACTIVE;
        *p++ = 1;
    }
    p = put_stamp_field(p, USER_CREATED_AT, &u->created);
    p = put_stamp_field(p, USER_UPDATED_AT, &u->updated);
    if (u->has_deleted)
        p = put_stamp_field(p, USER_DELETED_AT, &u->deleted);
    return p;
}

/* The output: a bytes object grown as rows are written and cut to size at the end. */
typedef struct {
    PyObject *bytes;
    Py_ssize_t used, capacity;
} Out;

static char *reserve(Out *out, Py_ssize_t n) {
    if (out->used + n > out->capacity) {
        Py_ssize_t capacity = out->capacity * 2;
        if (capacity < out->used + n)
            capacity = out->used + n;
        if (_PyBytes_Resize(&out->bytes, capacity) < 0)
            return NULL;
        out->capacity = capacity;
    }
    return PyBytes_AS_STRING(out->bytes) + out->used;
}

/* A row's columns, borrowed from a tuple: the row itself, or (*owned, released by the caller)
 * a tuple made of any other sequence: asyncpg Record, SQLAlchemy Row, list. */
static PyObject *const *columns_of(PyObject *row, Py_ssize_t index, PyObject **owned) {
    *owned = NULL;
    if (!PyTuple_CheckExact(row)) {
        row = *owned = PySequence_Tuple(row);
        if (row == NULL)
            return NULL;
    }
    if (PyTuple_GET_SIZE(row) != USER_COLUMNS) {
        PyErr_Format(PyExc_ValueError, "row %zd: expected %d columns (USER_COLUMNS), got %zd",
                     index, USER_COLUMNS, PyTuple_GET_SIZE(row));
        Py_CLEAR(*owned);
        return NULL;
    }
    return (PyObject *const *)PySequence_Fast_ITEMS(row);
}

static int put_row(Out *out, PyObject *row, Py_ssize_t index) {
    PyObject *owned;
    PyObject *const *columns = columns_of(row, index, &owned);
    if (columns == NULL)
        return -1;
    User u;
    int rc = -1;
    if (user_from(columns, &u) == 0) {
        char *p = reserve(out, 1 + varint_size((uint64_t)u.size) + u.size);
        if (p != NULL) {
            out->used = put_user(p, &u) - PyBytes_AS_STRING(out->bytes);
            rc = 0;
        }
    }
    /* The UTF-8 pointers in u belong to the columns: released only after the copy. */
    Py_XDECREF(owned);
    return rc;
}

static PyObject *encode_user_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError,
                     "encode_user_batch(rows, resume_token) takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    const char *token;
    Py_ssize_t token_n;
    if (utf8_of(args[1], "resume_token", &token, &token_n) < 0)
        return NULL;
    /* A tuple of the rows (the list the cursor fetched, copied): nothing a row's own code might
     * run can change what is being walked. */
    PyObject *rows = PySequence_Tuple(args[0]);
    if (rows == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(rows);
    /* ~100 bytes per user with short names: one allocation for most batches. */
    Out out = {NULL, 0, n * 128 + string_field_size(token_n) + 16};
    out.bytes = PyBytes_FromStringAndSize(NULL, out.capacity);
    if (out.bytes == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (put_row(&out, PyTuple_GET_ITEM(rows, i), i) < 0)
            goto fail;
    }
    char *p = reserve(&out, string_field_size(token_n));
    if (p == NULL)
        goto fail;
    out.used = put_string_field(p, BATCH_RESUME_TOKEN, token, token_n) -
               PyBytes_AS_STRING(out.bytes);
    Py_DECREF(rows);
    if (_PyBytes_Resize(&out.bytes, out.used) < 0)
        return NULL;
    return out.bytes;
fail:
    Py_DECREF(rows);
    Py_XDECREF(out.bytes);
    return NULL;
}

static PyMethodDef methods[] = {
    {"encode_user_batch", (PyCFunction)(void (*)(void))encode_user_batch, METH_FASTCALL,
     "encode_user_batch(rows, resume_token) -> bytes\n\n"
     "The serialized shop.v1.UserBatch of rows of USER_COLUMNS and the resume token."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_user_batch",
    .m_doc = "StreamUsers' batches encoded in C (see users_encode.py).",
    .m_size = 0,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__user_batch(void) { return PyModuleDef_Init(&module); }
