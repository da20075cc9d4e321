/* HMAC-SHA256 for the trusted core's hot path: runtime._hmac.
 *
 * The reference is runtime/trusted/capability.py (hmac_sha256_py, hmac_chain_py, both
 * Python's own hmac); tests/unit/test_native_hmac.py holds this module to it over random
 * inputs. Only the speed differs: hashlib's HMAC looks the digest up in OpenSSL on every call,
 * which costs more than hashing a short message; here it is OpenSSL's SHA-256 (with the CPU's
 * SHA instructions where there are any) called directly, with nothing looked up per call.
 */
#define PY_SSIZE_T_CLEAN
#define OPENSSL_SUPPRESS_DEPRECATED /* SHA256_Init and friends: deprecated in OpenSSL 3 for EVP, kept, and free of EVP's per-call lookup */
#include <Python.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <string.h>

#define BLOCK 64

static void hmac_sha256(const unsigned char *key, size_t key_len, const unsigned char *msg, size_t msg_len,
                        unsigned char out[SHA256_DIGEST_LENGTH])
{
    unsigned char k[BLOCK] = {0}, pad[BLOCK], inner[SHA256_DIGEST_LENGTH];
    SHA256_CTX ctx;
    if (key_len > BLOCK)
        SHA256(key, key_len, k); /* RFC 2104: a key longer than a block is hashed first */
    else
        memcpy(k, key, key_len);
    for (int i = 0; i < BLOCK; i++)
        pad[i] = k[i] ^ 0x36;
    SHA256_Init(&ctx);
    SHA256_Update(&ctx, pad, BLOCK);
    SHA256_Update(&ctx, msg, msg_len);
    SHA256_Final(inner, &ctx);
    for (int i = 0; i < BLOCK; i++)
        pad[i] = k[i] ^ 0x5c;
    SHA256_Init(&ctx);
    SHA256_Update(&ctx, pad, BLOCK);
    SHA256_Update(&ctx, inner, sizeof inner);
    SHA256_Final(out, &ctx);
    OPENSSL_cleanse(k, sizeof k);
    OPENSSL_cleanse(pad, sizeof pad);
    OPENSSL_cleanse(&ctx, sizeof ctx);
}

/* hmac_sha256(key: bytes-like, msg: bytes-like) -> bytes */
static PyObject *py_hmac_sha256(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "hmac_sha256(key, msg)");
        return NULL;
    }
    Py_buffer key, msg;
    if (PyObject_GetBuffer(args[0], &key, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &msg, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&key);
        return NULL;
    }
    unsigned char out[SHA256_DIGEST_LENGTH];
    hmac_sha256(key.buf, (size_t)key.len, msg.buf, (size_t)msg.len, out);
    PyBuffer_Release(&msg);
    PyBuffer_Release(&key);
    return PyBytes_FromStringAndSize((const char *)out, sizeof out);
}

/* hmac_chain(tag: bytes, blobs: tuple[bytes, ...]) -> list[bytes]: tag_i = HMAC(tag_{i-1}, blob_i) */
static PyObject *py_hmac_chain(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[0]) || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "hmac_chain(tag: bytes, blobs: tuple of bytes)");
        return NULL;
    }
    PyObject *blobs = args[1];
    Py_ssize_t n = PyTuple_GET_SIZE(blobs);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyBytes_Check(PyTuple_GET_ITEM(blobs, i))) {
            PyErr_SetString(PyExc_TypeError, "hmac_chain: every blob must be bytes");
            return NULL;
        }
    }
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    const unsigned char *key = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    size_t key_len = (size_t)PyBytes_GET_SIZE(args[0]);
    unsigned char tag[SHA256_DIGEST_LENGTH];
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *blob = PyTuple_GET_ITEM(blobs, i);
        hmac_sha256(key, key_len, (const unsigned char *)PyBytes_AS_STRING(blob), (size_t)PyBytes_GET_SIZE(blob),
                    tag);
        PyObject *item = PyBytes_FromStringAndSize((const char *)tag, sizeof tag);
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, item);
        key = (const unsigned char *)PyBytes_AS_STRING(item); /* the next link's key is this tag */
        key_len = sizeof tag;
    }
    return out;
}

static PyMethodDef methods[] = {
    {"hmac_sha256", (PyCFunction)(void (*)(void))py_hmac_sha256, METH_FASTCALL, "HMAC-SHA256(key, msg)."},
    {"hmac_chain", (PyCFunction)(void (*)(void))py_hmac_chain, METH_FASTCALL,
     "The tag after each blob of a chain starting at tag: tag_i = HMAC-SHA256(tag_{i-1}, blob_i)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "runtime._hmac", "HMAC-SHA256 (see capability.py).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__hmac(void) { return PyModule_Create(&module); }
