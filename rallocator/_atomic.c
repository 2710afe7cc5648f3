/* 64-bit atomic verbs on any writable buffer (an mmap of a blade region).
 *
 * Why C: the shm transport performs fetch_add / compare_swap on a mapping shared
 * between processes; Python has no atomics, and the `atomics` package costs ~20 us
 * per operation. These are the GCC __atomic builtins, sequentially consistent, on
 * 8-byte aligned words.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static int get_word(PyObject *buf, Py_ssize_t off, Py_buffer *view, uint64_t **word) {
    if (PyObject_GetBuffer(buf, view, PyBUF_WRITABLE) < 0) return -1;
    if (off < 0 || off % 8 != 0 || off + 8 > view->len) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "atomic word offset %zd out of range or unaligned", off);
        return -1;
    }
    *word = (uint64_t *)((char *)view->buf + off);
    return 0;
}

static PyObject *fetch_add(PyObject *self, PyObject *args) {
    PyObject *buf; Py_ssize_t off; unsigned long long delta; Py_buffer v; uint64_t *w;
    if (!PyArg_ParseTuple(args, "OnK", &buf, &off, &delta)) return NULL;
    if (get_word(buf, off, &v, &w) < 0) return NULL;
    uint64_t old = __atomic_fetch_add(w, (uint64_t)delta, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLongLong(old);
}

static PyObject *compare_swap(PyObject *self, PyObject *args) {
    PyObject *buf; Py_ssize_t off; unsigned long long expected, desired; Py_buffer v; uint64_t *w;
    if (!PyArg_ParseTuple(args, "OnKK", &buf, &off, &expected, &desired)) return NULL;
    if (get_word(buf, off, &v, &w) < 0) return NULL;
    uint64_t exp = expected;
    __atomic_compare_exchange_n(w, &exp, (uint64_t)desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLongLong(exp);  /* the old value: == expected on success */
}

static PyObject *load(PyObject *self, PyObject *args) {
    PyObject *buf; Py_ssize_t off; Py_buffer v; uint64_t *w;
    if (!PyArg_ParseTuple(args, "On", &buf, &off)) return NULL;
    if (get_word(buf, off, &v, &w) < 0) return NULL;
    uint64_t val = __atomic_load_n(w, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&v);
    return PyLong_FromUnsignedLongLong(val);
}

static PyObject *store(PyObject *self, PyObject *args) {
    PyObject *buf; Py_ssize_t off; unsigned long long val; Py_buffer v; uint64_t *w;
    if (!PyArg_ParseTuple(args, "OnK", &buf, &off, &val)) return NULL;
    if (get_word(buf, off, &v, &w) < 0) return NULL;
    __atomic_store_n(w, (uint64_t)val, __ATOMIC_SEQ_CST);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"fetch_add", fetch_add, METH_VARARGS, "fetch_add(buf, offset, delta) -> old value"},
    {"compare_swap", compare_swap, METH_VARARGS, "compare_swap(buf, offset, expected, new) -> old value"},
    {"load", load, METH_VARARGS, "load(buf, offset) -> value"},
    {"store", store, METH_VARARGS, "store(buf, offset, value)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_atomic", "64-bit atomics on shared buffers", -1, methods};

PyMODINIT_FUNC PyInit__atomic(void) { return PyModule_Create(&mod); }
