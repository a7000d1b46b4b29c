/* Duplicate keys in a JSON document, found in one pass at C speed without building the document.

   find(buffer) -> int: the byte offset of the opening quote of the first key that repeats an
   earlier key of the same object, or -1 when no object repeats a key. Keys are compared as the
   strings they decode to ("a" and "\u0061" are the same key). The document must already be
   valid JSON (validate.json_error checks syntax and UTF-8 first): on anything else the answer
   is meaningless, but memory is never read outside the buffer. The GIL is released while
   scanning, so a large document does not hold up the daemon's other threads.

   Each open object has a hash table of its keys, one table per nesting depth, reused by the
   next object at that depth: a slot belongs to the current object when its stamp is that
   object's serial number, so opening an object costs nothing and closing one frees nothing. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    size_t start;  /* offset of the key's first byte, after the quote */
    uint32_t len;  /* raw length, escapes included */
    uint32_t hash; /* of the decoded key */
    uint64_t stamp;
    int escaped;
} Slot;

typedef struct {
    int is_object;
    int expect_key;
    uint64_t stamp;
    size_t count;
    size_t cap; /* slots in the table, a power of two, or 0 */
    Slot *slots;
} Level;

typedef struct {
    const unsigned char *p;
    size_t n;
    Level *levels;
    size_t depth, levels_cap;
    uint64_t serial;
    unsigned char *scratch[2];
    size_t scratch_cap[2];
    int nomem;
} Scan;

static int hexval(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static long hex4(const unsigned char *s, size_t avail) {
    if (avail < 4) return -1;
    long v = 0;
    for (int k = 0; k < 4; k++) {
        int h = hexval(s[k]);
        if (h < 0) return -1;
        v = (v << 4) | h;
    }
    return v;
}

static size_t put_utf8(unsigned char *out, long cp) {
    if (cp < 0x80) { out[0] = (unsigned char)cp; return 1; }
    if (cp < 0x800) { out[0] = 0xC0 | (cp >> 6); out[1] = 0x80 | (cp & 0x3F); return 2; }
    if (cp < 0x10000) {
        out[0] = 0xE0 | (cp >> 12); out[1] = 0x80 | ((cp >> 6) & 0x3F); out[2] = 0x80 | (cp & 0x3F);
        return 3;
    }
    out[0] = 0xF0 | (cp >> 18); out[1] = 0x80 | ((cp >> 12) & 0x3F);
    out[2] = 0x80 | ((cp >> 6) & 0x3F); out[3] = 0x80 | (cp & 0x3F);
    return 4;
}

/* The decoded bytes of the raw key s[0..len) into scratch buffer k; returns their length. A
   decoded key is never longer than its raw form. */
static const unsigned char *decode_key(Scan *sc, int k, const unsigned char *s, size_t len, size_t *out_len) {
    if (sc->scratch_cap[k] < len + 4) {
        unsigned char *grown = realloc(sc->scratch[k], len + 4);
        if (grown == NULL) { sc->nomem = 1; *out_len = 0; return s; }
        sc->scratch[k] = grown;
        sc->scratch_cap[k] = len + 4;
    }
    unsigned char *out = sc->scratch[k];
    size_t i = 0, o = 0;
    while (i < len) {
        unsigned char c = s[i];
        if (c != '\\' || i + 1 >= len) { out[o++] = c; i++; continue; }
        unsigned char e = s[i + 1];
        i += 2;
        switch (e) {
        case 'b': out[o++] = '\b'; break;
        case 'f': out[o++] = '\f'; break;
        case 'n': out[o++] = '\n'; break;
        case 'r': out[o++] = '\r'; break;
        case 't': out[o++] = '\t'; break;
        case 'u': {
            long cp = hex4(s + i, len - i);
            if (cp < 0) { out[o++] = 'u'; break; }
            i += 4;
            if (cp >= 0xD800 && cp < 0xDC00 && i + 6 <= len && s[i] == '\\' && s[i + 1] == 'u') {
                long low = hex4(s + i + 2, len - i - 2);
                if (low >= 0xDC00 && low < 0xE000) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                    i += 6;
                }
            }
            o += put_utf8(out + o, cp);
            break;
        }
        default: out[o++] = e; /* \" \\ \/ */
        }
    }
    *out_len = o;
    return out;
}

static uint32_t fnv1a(const unsigned char *s, size_t len) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++) h = (h ^ s[i]) * 16777619u;
    return h;
}

static int same_key(Scan *sc, const Slot *a, const Slot *b) {
    if (!a->escaped && !b->escaped)
        return a->len == b->len && memcmp(sc->p + a->start, sc->p + b->start, a->len) == 0;
    size_t la, lb;
    const unsigned char *da = a->escaped ? decode_key(sc, 0, sc->p + a->start, a->len, &la) : sc->p + a->start;
    if (!a->escaped) la = a->len;
    const unsigned char *db = b->escaped ? decode_key(sc, 1, sc->p + b->start, b->len, &lb) : sc->p + b->start;
    if (!b->escaped) lb = b->len;
    return !sc->nomem && la == lb && memcmp(da, db, la) == 0;
}

static int grow_table(Level *lv) {
    size_t cap = lv->cap ? lv->cap * 2 : 16;
    Slot *slots = calloc(cap, sizeof(Slot));
    if (slots == NULL) return -1;
    for (size_t i = 0; i < lv->cap; i++) {
        Slot *s = &lv->slots[i];
        if (s->stamp != lv->stamp) continue;
        size_t j = s->hash & (cap - 1);
        while (slots[j].stamp == lv->stamp) j = (j + 1) & (cap - 1);
        slots[j] = *s;
    }
    free(lv->slots);
    lv->slots = slots;
    lv->cap = cap;
    return 0;
}

/* Adds the key to the current object; returns 1 if the object had it already. */
static int add_key(Scan *sc, Level *lv, size_t start, size_t len, int escaped) {
    Slot key = {start, (uint32_t)len, 0, lv->stamp, escaped};
    if (escaped) {
        size_t dlen;
        const unsigned char *d = decode_key(sc, 0, sc->p + start, len, &dlen);
        if (sc->nomem) return 0;
        key.hash = fnv1a(d, dlen);
    } else {
        key.hash = fnv1a(sc->p + start, len);
    }
    if ((lv->count + 1) * 2 > lv->cap && grow_table(lv) < 0) { sc->nomem = 1; return 0; }
    size_t j = key.hash & (lv->cap - 1);
    while (lv->slots[j].stamp == lv->stamp) {
        if (lv->slots[j].hash == key.hash && same_key(sc, &lv->slots[j], &key)) return 1;
        j = (j + 1) & (lv->cap - 1);
    }
    lv->slots[j] = key;
    lv->count++;
    return 0;
}

static int push(Scan *sc, int is_object) {
    if (sc->depth == sc->levels_cap) {
        size_t cap = sc->levels_cap ? sc->levels_cap * 2 : 32;
        Level *grown = realloc(sc->levels, cap * sizeof(Level));
        if (grown == NULL) return -1;
        memset(grown + sc->levels_cap, 0, (cap - sc->levels_cap) * sizeof(Level));
        sc->levels = grown;
        sc->levels_cap = cap;
    }
    Level *lv = &sc->levels[sc->depth++];
    lv->is_object = is_object;
    lv->expect_key = is_object;
    lv->count = 0;
    lv->stamp = ++sc->serial; /* slots of earlier objects at this depth are free now */
    return 0;
}

/* What a byte means to the scan: 0 for bytes it steps over (numbers, literals, whitespace). */
enum { SKIP, QUOTE, OPEN_OBJECT, OPEN_ARRAY, CLOSE, COMMA };
static unsigned char byte_class[256];

/* The offset of the quote that ends the string whose first byte is at `start`, or n: the next
   quote not escaped by an odd run of backslashes before it. */
static size_t string_end(const unsigned char *p, size_t n, size_t start) {
    size_t from = start;
    for (;;) {
        const unsigned char *q = memchr(p + from, '"', n - from);
        if (q == NULL) return n;
        size_t at = q - p, back = at;
        while (back > start && p[back - 1] == '\\') back--;
        if (((at - back) & 1) == 0) return at;
        from = at + 1;
    }
}

static Py_ssize_t scan(Scan *sc) {
    const unsigned char *p = sc->p;
    size_t n = sc->n, i = 0;
    while (i < n) {
        switch (byte_class[p[i]]) {
        case SKIP:
            i++;
            break;
        case QUOTE: {
            size_t start = i + 1;
            size_t end = string_end(p, n, start);
            if (end >= n) return -1;
            if (sc->depth > 0) {
                Level *lv = &sc->levels[sc->depth - 1];
                if (lv->expect_key) {
                    lv->expect_key = 0;
                    int escaped = memchr(p + start, '\\', end - start) != NULL;
                    if (add_key(sc, lv, start, end - start, escaped)) return (Py_ssize_t)start - 1;
                    if (sc->nomem) return -1;
                }
            }
            i = end + 1;
            break;
        }
        case OPEN_OBJECT:
        case OPEN_ARRAY:
            if (push(sc, byte_class[p[i]] == OPEN_OBJECT) < 0) { sc->nomem = 1; return -1; }
            i++;
            break;
        case CLOSE:
            if (sc->depth > 0) sc->depth--;
            i++;
            break;
        case COMMA:
            if (sc->depth > 0 && sc->levels[sc->depth - 1].is_object) sc->levels[sc->depth - 1].expect_key = 1;
            i++;
            break;
        }
    }
    return -1;
}

static PyObject *find(PyObject *module, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    Scan sc;
    memset(&sc, 0, sizeof sc);
    sc.p = view.buf;
    sc.n = (size_t)view.len;
    Py_ssize_t found;
    Py_BEGIN_ALLOW_THREADS
    found = scan(&sc);
    Py_END_ALLOW_THREADS
    for (size_t d = 0; d < sc.levels_cap; d++) free(sc.levels[d].slots);
    free(sc.levels);
    free(sc.scratch[0]);
    free(sc.scratch[1]);
    PyBuffer_Release(&view);
    if (sc.nomem) return PyErr_NoMemory();
    return PyLong_FromSsize_t(found);
}

static PyMethodDef methods[] = {
    {"find", find, METH_O,
     "find(buffer) -> int: offset of the opening quote of the first key that repeats an earlier key of its "
     "object in the valid JSON document `buffer`, or -1."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_dupkeys", NULL, 0, methods};

PyMODINIT_FUNC PyInit__dupkeys(void) {
    byte_class['"'] = QUOTE;
    byte_class['{'] = OPEN_OBJECT;
    byte_class['['] = OPEN_ARRAY;
    byte_class['}'] = byte_class[']'] = CLOSE;
    byte_class[','] = COMMA;
    return PyModule_Create(&module);
}
