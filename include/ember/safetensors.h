/*
 * ember/safetensors.h - read and write tensor files in the safetensors layout.
 *
 * Used for checkpoints and for the PyTorch golden files of the tests. Layout:
 *
 *   OFFSET  SIZE  DESCRIPTION
 *   0       8     N: little-endian u64, length of the JSON header
 *   8       N     JSON object: {"__metadata__": {str: str, ...},
 *                   "<name>": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}, ...}
 *                 padded with spaces to a multiple of 8
 *   8+N     ...   raw little-endian tensor data; offsets are relative to 8+N
 *
 * ember adds "ember.xxh64" to __metadata__ when writing: the hex xxHash64 of the data
 * section, checked on open, so a truncated or bit-flipped file is refused (files
 * without the key, e.g. from numpy/PyTorch scripts, are accepted after bounds checks).
 * Files are written atomically: a temporary file beside the target, fsync, rename,
 * fsync of the directory.
 */
#ifndef EMBER_SAFETENSORS_H
#define EMBER_SAFETENSORS_H

#include "core.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { EM_F32 = 0, EM_F64, EM_I32, EM_I64, EM_U64, EM_U8, EM_F16, EM_BF16 } em_dtype;
size_t em_dtype_size(em_dtype t);
const char *em_dtype_name(em_dtype t); /* "F32", "I64", ... */

#define EM_ST_MAX_DIMS 8

typedef struct {
    const char *name;
    em_dtype dtype;
    int ndim;
    int64_t shape[EM_ST_MAX_DIMS];
    const void *data; /* nbytes = product(shape) * em_dtype_size(dtype) */
} em_st_tensor;

typedef struct {
    const char *key, *value;
} em_st_meta;

/* Write tensors and metadata to `path` atomically. Tensors are stored grouped by
 * element size, largest first, in the given order within a group, so every tensor is
 * naturally aligned when the file is loaded. */
em_status em_st_write(const char *path, const em_st_tensor *tensors, int n_tensors,
                      const em_st_meta *meta, int n_meta);

/* A file opened for reading: the whole file is loaded and validated (header JSON,
 * dtypes, shapes vs offsets, offsets within the file, no overlaps, checksum). */
typedef struct em_st em_st;

em_status em_st_open(em_st **out, const char *path);
void em_st_close(em_st *st); /* NULL is a no-op */
int em_st_count(const em_st *st);
const em_st_tensor *em_st_at(const em_st *st, int i);
const em_st_tensor *em_st_find(const em_st *st, const char *name); /* NULL if absent */
const char *em_st_meta_get(const em_st *st, const char *key);      /* NULL if absent */
/* Find `name`, check its dtype and element count, and return its data; on mismatch
 * returns NULL and sets em_last_error() naming the file and tensor. */
const void *em_st_expect(const em_st *st, const char *name, em_dtype dtype, int64_t numel);

#ifdef __cplusplus
}
#endif
#endif
