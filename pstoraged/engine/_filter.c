/*
 * A blocked Bloom filter over SHA-256 fingerprints: "is this fingerprint
 * possibly in the dedupe index's B-tree?" answered from one cache line.
 *
 * Why: most blocks written are new, and each new block cost a B-tree lookup
 * that misses (~2.4 us on the engine thread, ~12 % of its time on 128k
 * sequential writes). A "no" from the filter skips that lookup; a "maybe" is
 * wrong with a probability of about 0.5 % at the designed load of 12 bits
 * per entry, and only costs the lookup it would have cost anyway.
 *
 * Layout: `nbytes` (a power of two) of 64-byte lines. A fingerprint picks its
 * line with bytes 0..7 and K bits inside it with 9-bit slices of bytes 8..15;
 * SHA-256 output is uniform, so no further hashing is needed. Nothing is ever
 * removed (a freed chunk's bits stay): fpindex.py rebuilds the filter from the
 * B-tree when it has taken more entries than it was sized for.
 *
 * Not thread-safe: the engine thread alone uses it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define LINE_BITS 512
#define K 6

typedef struct {
    PyObject_HEAD
    uint64_t *bits;       /* nbytes / 8 words; line i is words 8i..8i+7 */
    Py_ssize_t nbytes;
    uint64_t line_mask;   /* lines - 1 */
    unsigned long long added;
} Filter;

static int Filter_init(Filter *self, PyObject *args, PyObject *kw)
{
    static char *names[] = {"nbytes", NULL};
    Py_ssize_t nbytes;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "n", names, &nbytes))
        return -1;
    if (nbytes < 64 || (nbytes & (nbytes - 1))) {
        PyErr_SetString(PyExc_ValueError, "nbytes must be a power of two of at least 64");
        return -1;
    }
    free(self->bits);
    /* calloc: large sizes come from mmap, so untouched pages cost no memory */
    self->bits = calloc((size_t)nbytes / 8, 8);
    if (self->bits == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->nbytes = nbytes;
    self->line_mask = (uint64_t)(nbytes / 64) - 1;
    self->added = 0;
    return 0;
}

static void Filter_dealloc(Filter *self)
{
    free(self->bits);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* the line's words and the K bit numbers (0..511) of a fingerprint */
static uint64_t *locate(Filter *self, const unsigned char *fp, unsigned *bitno)
{
    uint64_t w0, w1;
    memcpy(&w0, fp, 8);
    memcpy(&w1, fp + 8, 8);
    for (int i = 0; i < K; i++)
        bitno[i] = (unsigned)(w1 >> (9 * i)) & (LINE_BITS - 1);
    return self->bits + (w0 & self->line_mask) * (LINE_BITS / 64);
}

static void set_fp(Filter *self, const unsigned char *fp)
{
    unsigned b[K];
    uint64_t *line = locate(self, fp, b);
    for (int i = 0; i < K; i++)
        line[b[i] >> 6] |= (uint64_t)1 << (b[i] & 63);
    self->added++;
}

static int get_fp(PyObject *obj, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0)
        return -1;
    if (view->len < 16) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "a fingerprint has at least 16 bytes");
        return -1;
    }
    return 0;
}

static int ready(Filter *self)
{
    if (self->bits == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "FingerprintFilter not initialised");
        return 0;
    }
    return 1;
}

static PyObject *Filter_add(Filter *self, PyObject *fp)
{
    Py_buffer v;
    if (!ready(self) || get_fp(fp, &v) < 0)
        return NULL;
    set_fp(self, v.buf);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

static PyObject *Filter_add_many(Filter *self, PyObject *iterable)
{
    if (!ready(self))
        return NULL;
    PyObject *it = PyObject_GetIter(iterable), *item;
    if (it == NULL)
        return NULL;
    while ((item = PyIter_Next(it)) != NULL) {
        Py_buffer v;
        int bad = get_fp(item, &v);
        Py_DECREF(item);
        if (bad) {
            Py_DECREF(it);
            return NULL;
        }
        set_fp(self, v.buf);
        PyBuffer_Release(&v);
    }
    Py_DECREF(it);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Filter_maybe(Filter *self, PyObject *fp)
{
    Py_buffer v;
    if (!ready(self) || get_fp(fp, &v) < 0)
        return NULL;
    unsigned b[K];
    uint64_t *line = locate(self, v.buf, b);
    PyBuffer_Release(&v);
    for (int i = 0; i < K; i++)
        if (!(line[b[i] >> 6] & ((uint64_t)1 << (b[i] & 63))))
            Py_RETURN_FALSE;
    Py_RETURN_TRUE;
}

static PyObject *Filter_get_nbytes(Filter *self, void *closure)
{
    return PyLong_FromSsize_t(self->nbytes);
}

static PyObject *Filter_get_added(Filter *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(self->added);
}

static PyMethodDef Filter_methods[] = {
    {"add", (PyCFunction)Filter_add, METH_O, "add(fp): fp is in the B-tree from now on"},
    {"add_many", (PyCFunction)Filter_add_many, METH_O, "add_many(iterable of fps)"},
    {"maybe", (PyCFunction)Filter_maybe, METH_O,
     "maybe(fp) -> False if fp was never added; True if it may have been"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Filter_getset[] = {
    {"nbytes", (getter)Filter_get_nbytes, NULL, "size of the bit array", NULL},
    {"added", (getter)Filter_get_added, NULL, "fingerprints added (repeats included)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject FilterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pstoraged.engine._filter.FingerprintFilter",
    .tp_basicsize = sizeof(Filter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = PyDoc_STR("Blocked Bloom filter of fingerprints: FingerprintFilter(nbytes)"),
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Filter_init,
    .tp_dealloc = (destructor)Filter_dealloc,
    .tp_methods = Filter_methods,
    .tp_getset = Filter_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pstoraged.engine._filter",
    "A blocked Bloom filter in front of the dedupe index's B-tree.", -1, NULL,
};

PyMODINIT_FUNC PyInit__filter(void)
{
    if (PyType_Ready(&FilterType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "FingerprintFilter", (PyObject *)&FilterType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
