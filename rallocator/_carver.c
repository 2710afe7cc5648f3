/* The fine-grained level's hot path: SLUB-style object allocation inside borrowed slabs.
 *
 * Why C: allocate/free is the operation the two-level design exists to make cheap (no
 * network round trip); in Python the bookkeeping alone cost ~2.5 us per pair, a twentieth
 * of a loopback RPC. Here a pair costs a few hundred ns. Everything runs under the GIL
 * (no callback is made while the state is inconsistent), so no lock is needed.
 *
 * A handle is a 64-bit int: slab id << 32 | object index, or slab id << 32 | 0xFFFFFFFF
 * for an allocation that has a whole slab. The Python side (finegrained.py) owns the
 * slabs themselves and is called back to fetch one (need_slab), to give one back
 * (give_back) and for whole-slab allocations (big_alloc / big_free).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MIN_SHIFT 6           /* 64-byte objects */
#define NCLASSES 26           /* up to 2^31 */
#define WHOLE 0xFFFFFFFFu

typedef struct {
    int64_t bytes;            /* slab size; 0 = slot unused */
    int32_t shift;            /* object size = 1 << shift; -1 = on the empty list */
    int32_t cap, bump, used, nfree;
    int32_t *free;            /* freed indices (a stack) */
    uint8_t *in_use;
    int32_t in_partial;       /* 1 if listed in its class's partial stack */
} slab_t;

typedef struct {
    PyObject_HEAD
    slab_t *slabs; int64_t nslabs;                 /* indexed by slab id */
    int64_t *partial[NCLASSES]; int64_t npartial[NCLASSES], cpartial[NCLASSES];
    int64_t *empty; int64_t nempty, cempty;        /* FIFO-ish: oldest at 0 */
    int64_t empty_threshold, max_object;
    PyObject *need_slab, *give_back, *big_alloc, *big_free;
} Carver;

static int push(int64_t **arr, int64_t *n, int64_t *cap, int64_t v) {
    if (*n == *cap) {
        int64_t nc = *cap ? *cap * 2 : 16;
        int64_t *na = PyMem_Realloc(*arr, nc * sizeof(int64_t));
        if (!na) { PyErr_NoMemory(); return -1; }
        *arr = na; *cap = nc;
    }
    (*arr)[(*n)++] = v;
    return 0;
}

static int class_of(int64_t size) {
    int s = MIN_SHIFT;
    while (((int64_t)1 << s) < size) s++;
    return s;
}

static int format_slab(Carver *c, int64_t id, int shift) {
    slab_t *sl = &c->slabs[id];
    int32_t cap = (int32_t)(sl->bytes >> shift);
    PyMem_Free(sl->free); PyMem_Free(sl->in_use);
    sl->free = PyMem_Malloc(sizeof(int32_t) * (cap ? cap : 1));
    sl->in_use = PyMem_Calloc(cap ? cap : 1, 1);
    if (!sl->free || !sl->in_use) { PyErr_NoMemory(); return -1; }
    sl->shift = shift; sl->cap = cap; sl->bump = 0; sl->used = 0; sl->nfree = 0;
    int k = shift - MIN_SHIFT;
    if (push(&c->partial[k], &c->npartial[k], &c->cpartial[k], id) < 0) return -1;
    sl->in_partial = 1;
    return 0;
}

static int add_slab_id(Carver *c, int64_t id, int64_t bytes) {
    if (id < 0) { PyErr_SetString(PyExc_ValueError, "bad slab id"); return -1; }
    if (id >= c->nslabs) {
        int64_t n = id + 1 > c->nslabs * 2 ? id + 1 : c->nslabs * 2;
        slab_t *ns = PyMem_Realloc(c->slabs, n * sizeof(slab_t));
        if (!ns) { PyErr_NoMemory(); return -1; }
        memset(ns + c->nslabs, 0, (n - c->nslabs) * sizeof(slab_t));
        c->slabs = ns; c->nslabs = n;
    }
    if (c->slabs[id].bytes) { PyErr_SetString(PyExc_ValueError, "slab id in use"); return -1; }
    c->slabs[id].bytes = bytes;
    return 0;
}

/* alloc(size) -> handle */
static PyObject *Carver_alloc(Carver *c, PyObject *arg) {
    int64_t size = PyLong_AsLongLong(arg);
    if (size == -1 && PyErr_Occurred()) return NULL;
    if (size <= 0) { PyErr_SetString(PyExc_ValueError, "allocation size must be positive"); return NULL; }
    int shift = class_of(size);
    if (((int64_t)1 << shift) > c->max_object || shift - MIN_SHIFT >= NCLASSES)
        return PyObject_CallOneArg(c->big_alloc, arg);
    int k = shift - MIN_SHIFT;
    for (;;) {
        while (c->npartial[k]) {
            int64_t id = c->partial[k][c->npartial[k] - 1];
            slab_t *sl = &c->slabs[id];
            if (sl->shift != shift || (!sl->nfree && sl->bump == sl->cap)) {
                c->npartial[k]--; sl->in_partial = 0;  /* stale or full: unlist */
                continue;
            }
            int32_t idx = sl->nfree ? sl->free[--sl->nfree] : sl->bump++;
            sl->in_use[idx] = 1;
            sl->used++;
            if (!sl->nfree && sl->bump == sl->cap) { c->npartial[k]--; sl->in_partial = 0; }
            return PyLong_FromLongLong((id << 32) | (int64_t)idx);
        }
        /* reuse an empty slab that is big enough, else ask Python for a new one */
        int64_t found = -1;
        for (int64_t i = 0; i < c->nempty; i++) {
            if ((c->slabs[c->empty[i]].bytes >> shift) >= 4) {
                found = c->empty[i];
                memmove(c->empty + i, c->empty + i + 1, (c->nempty - i - 1) * sizeof(int64_t));
                c->nempty--;
                break;
            }
        }
        if (found >= 0) {
            if (format_slab(c, found, shift) < 0) return NULL;
            continue;
        }
        PyObject *r = PyObject_CallFunction(c->need_slab, "L", (long long)1 << shift);
        if (!r) return NULL;
        long long id, bytes;
        if (!PyArg_ParseTuple(r, "LL", &id, &bytes)) { Py_DECREF(r); return NULL; }
        Py_DECREF(r);
        if (add_slab_id(c, id, bytes) < 0 || format_slab(c, id, shift) < 0) return NULL;
    }
}

/* free(handle) */
static PyObject *Carver_free(Carver *c, PyObject *arg) {
    int64_t h = PyLong_AsLongLong(arg);
    if (h == -1 && PyErr_Occurred()) return NULL;
    int64_t id = h >> 32; uint32_t idx = (uint32_t)(h & 0xFFFFFFFF);
    if (idx == WHOLE) return PyObject_CallOneArg(c->big_free, arg);
    if (id < 0 || id >= c->nslabs || !c->slabs[id].bytes || c->slabs[id].shift < 0
        || idx >= (uint32_t)c->slabs[id].cap || !c->slabs[id].in_use[idx]) {
        PyErr_SetString(PyExc_ValueError, "double free (or not a live handle)");
        return NULL;
    }
    slab_t *sl = &c->slabs[id];
    sl->in_use[idx] = 0;
    sl->free[sl->nfree++] = (int32_t)idx;
    sl->used--;
    int k = sl->shift - MIN_SHIFT;
    if (sl->used == 0) {  /* empty: off its class, onto the empty list */
        sl->shift = -1;   /* its partial entry (if any) is now stale */
        sl->in_partial = 0;
        if (push(&c->empty, &c->nempty, &c->cempty, id) < 0) return NULL;
        if (c->nempty > c->empty_threshold) {
            int64_t victim = c->empty[0];
            memmove(c->empty, c->empty + 1, (c->nempty - 1) * sizeof(int64_t));
            c->nempty--;
            slab_t *v = &c->slabs[victim];
            PyMem_Free(v->free); PyMem_Free(v->in_use);
            memset(v, 0, sizeof(slab_t));
            return PyObject_CallFunction(c->give_back, "L", (long long)victim);
        }
    } else if (!sl->in_partial) {
        if (push(&c->partial[k], &c->npartial[k], &c->cpartial[k], id) < 0) return NULL;
        sl->in_partial = 1;
    }
    Py_RETURN_NONE;
}

/* object_size(handle) -> bytes of the object behind a live handle (0: whole slab) */
static PyObject *Carver_object_size(Carver *c, PyObject *arg) {
    int64_t h = PyLong_AsLongLong(arg);
    if (h == -1 && PyErr_Occurred()) return NULL;
    int64_t id = h >> 32; uint32_t idx = (uint32_t)(h & 0xFFFFFFFF);
    if (idx == WHOLE) return PyLong_FromLong(0);
    if (id < 0 || id >= c->nslabs || c->slabs[id].shift < 0 || idx >= (uint32_t)c->slabs[id].cap
        || !c->slabs[id].in_use[idx]) {
        PyErr_SetString(PyExc_ValueError, "not a live handle");
        return NULL;
    }
    return PyLong_FromLongLong((int64_t)1 << c->slabs[id].shift);
}

/* stats() -> (partial, full, empty, bytes_in_objects) */
static PyObject *Carver_stats(Carver *c, PyObject *unused) {
    int64_t partial = 0, full = 0, bytes = 0;
    for (int64_t i = 0; i < c->nslabs; i++) {
        slab_t *sl = &c->slabs[i];
        if (!sl->bytes || sl->shift < 0) continue;
        if (!sl->nfree && sl->bump == sl->cap) full++; else partial++;
        bytes += (int64_t)sl->used << sl->shift;
    }
    return Py_BuildValue("LLLL", (long long)partial, (long long)full, (long long)c->nempty,
                         (long long)bytes);
}

static int Carver_init(Carver *c, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"need_slab", "give_back", "big_alloc", "big_free",
                             "empty_threshold", "max_object", NULL};
    long long thr, maxo;
    PyObject *a, *b, *d, *e;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOLL", kwlist, &a, &b, &d, &e, &thr, &maxo))
        return -1;
    Py_INCREF(a); Py_INCREF(b); Py_INCREF(d); Py_INCREF(e);
    c->need_slab = a; c->give_back = b; c->big_alloc = d; c->big_free = e;
    c->empty_threshold = thr; c->max_object = maxo;
    return 0;
}

static void Carver_dealloc(Carver *c) {
    for (int64_t i = 0; i < c->nslabs; i++) { PyMem_Free(c->slabs[i].free); PyMem_Free(c->slabs[i].in_use); }
    PyMem_Free(c->slabs);
    for (int k = 0; k < NCLASSES; k++) PyMem_Free(c->partial[k]);
    PyMem_Free(c->empty);
    Py_XDECREF(c->need_slab); Py_XDECREF(c->give_back); Py_XDECREF(c->big_alloc); Py_XDECREF(c->big_free);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyMethodDef Carver_methods[] = {
    {"alloc", (PyCFunction)Carver_alloc, METH_O, "alloc(size) -> handle"},
    {"free", (PyCFunction)Carver_free, METH_O, "free(handle)"},
    {"object_size", (PyCFunction)Carver_object_size, METH_O, "object_size(handle) -> int"},
    {"stats", (PyCFunction)Carver_stats, METH_NOARGS, "stats() -> (partial, full, empty, bytes)"},
    {NULL, NULL, 0, NULL}};

static PyTypeObject CarverType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "rallocator._carver.Carver",
    .tp_basicsize = sizeof(Carver),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Carver_init,
    .tp_dealloc = (destructor)Carver_dealloc,
    .tp_methods = Carver_methods,
    .tp_doc = "SLUB-style object allocator over slabs identified by integers",
};

static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_carver", "fine-grained allocation core", -1, NULL};

PyMODINIT_FUNC PyInit__carver(void) {
    if (PyType_Ready(&CarverType) < 0) return NULL;
    PyObject *m = PyModule_Create(&mod);
    if (!m) return NULL;
    Py_INCREF(&CarverType);
    PyModule_AddObject(m, "Carver", (PyObject *)&CarverType);
    return m;
}
