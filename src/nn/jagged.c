/*
 * jagged.c - jagged sequence ops (include/ember/jagged.h): jagged <-> padded,
 * sum/mean pooling, per-column softmax along each sequence, jagged x dense matmul and
 * the per-sample jagged x jagged matmul, each with its backward.
 *
 * Design:
 *   - Every op cuts its output into fixed work items that depend only on the shapes
 *     (padded rows, sequences, (sequence, 64-column chunk), 64-row blocks, ...), and
 *     em_split() hands each worker a contiguous range of items. An output element is
 *     therefore always produced by the same code with the same operands in the same
 *     order, whatever nth is: results are bitwise independent of the thread count.
 *     In particular sgemm is always called on the same sub-shapes, so OpenBLAS's
 *     shape-dependent kernel choice cannot leak the thread count into the result.
 *   - Nothing allocates: softmax keeps its per-column running state in stack arrays
 *     of one column chunk, so the only failure mode is bad arguments, reported
 *     before anything is written.
 *   - Softmax runs column chunks over the rows of a sequence (rows are contiguous,
 *     so each pass streams memory) in three passes: max, exp and sum, scale.
 *   - jagged x jagged: blocks with L_b >= JJ_GEMM_MIN go through sgemm in 64-row
 *     slabs (one item each, so one long sequence is shared among workers); smaller
 *     blocks, where sgemm's call overhead dominates, use em_vdot / em_vaxpy.
 */
#include <limits.h>
#include <math.h>
#include <string.h>

#include "core/blas.h"
#include "core/simd.h"
#include "ember/jagged.h"

#define ROW_BLOCK 64   /* rows per sgemm item (jagged x dense, jagged x jagged) */
#define COL_CHUNK 64   /* columns per softmax / dW item */
#define JJ_GEMM_MIN 32 /* per-sample blocks at least this long use sgemm */

/* ------------------------------------------------------------- validation */

em_status em_jagged_check(const int64_t *offsets, int B) {
    if (B < 0) return em_errorf(EM_ERR_INVALID, "jagged: batch size %d < 0", B);
    if (!offsets) return em_errorf(EM_ERR_INVALID, "jagged: offsets is NULL");
    if (offsets[0] != 0)
        return em_errorf(EM_ERR_INVALID, "jagged: offsets[0] = %lld, must be 0", (long long)offsets[0]);
    for (int b = 0; b < B; b++)
        if (offsets[b + 1] < offsets[b])
            return em_errorf(EM_ERR_INVALID, "jagged: offsets[%d] = %lld < offsets[%d] = %lld (must be non-decreasing)",
                             b + 1, (long long)offsets[b + 1], b, (long long)offsets[b]);
    return EM_OK;
}

int64_t em_jagged_max_len(const int64_t *offsets, int B) {
    int64_t m = 0;
    for (int b = 0; b < B; b++)
        if (offsets[b + 1] - offsets[b] > m) m = offsets[b + 1] - offsets[b];
    return m;
}

/* Offsets plus one non-negative size (D, K or N) per call site. */
static em_status check_dim(const char *op, const char *what, int v) {
    if (v < 0) return em_errorf(EM_ERR_INVALID, "%s: %s = %d < 0", op, what, v);
    return EM_OK;
}

static em_status check_padded(const char *op, const int64_t *offsets, int B, int max_len, int D, int truncate) {
    em_status s = em_jagged_check(offsets, B);
    if (s) return s;
    if ((s = check_dim(op, "max_len", max_len)) || (s = check_dim(op, "D", D))) return s;
    if (!truncate)
        for (int b = 0; b < B; b++)
            if (offsets[b + 1] - offsets[b] > max_len)
                return em_errorf(EM_ERR_INVALID, "%s: sequence %d has length %lld > max_len %d and truncate is off",
                                 op, b, (long long)(offsets[b + 1] - offsets[b]), max_len);
    return EM_OK;
}

/* sgemm takes int sizes: every sequence (and total_len for row blocks) must fit. */
static em_status check_int_lengths(const char *op, const int64_t *offsets, int B) {
    for (int b = 0; b < B; b++)
        if (offsets[b + 1] - offsets[b] > INT_MAX)
            return em_errorf(EM_ERR_INVALID, "%s: sequence %d is longer than INT_MAX", op, b);
    return EM_OK;
}

static int64_t cdiv64(int64_t a, int64_t b) { return (a + b - 1) / b; }
static int min_i(int64_t a, int64_t b) { return (int)(a < b ? a : b); }

/* One argument block for every task: unused fields stay zero. */
typedef struct {
    float *out, *out2;
    const float *a, *b, *c;
    const int64_t *offsets, *boffs;
    int B, max_len, D, K, N, truncate, mode;
    float pad;
} job;

static void run(em_pool *pool, em_task_fn fn, job *j) {
    if (pool) em_pool_run(pool, fn, j);
    else fn(j, 0, 1);
}

/* ------------------------------------------------------ jagged <-> padded */

/* Items: padded rows (b, t), B * max_len of them. */
static void to_padded_fwd_task(void *p, int ith, int nth) {
    const job *j = p;
    size_t lo, hi, D = (size_t)j->D;
    em_split((size_t)j->B * (size_t)j->max_len, ith, nth, &lo, &hi);
    for (size_t r = lo; r < hi; r++) {
        size_t b = r / (size_t)j->max_len, t = r % (size_t)j->max_len;
        float *dst = j->out + r * D;
        int64_t L = j->offsets[b + 1] - j->offsets[b];
        if ((int64_t)t < L) memcpy(dst, j->a + ((size_t)j->offsets[b] + t) * D, D * sizeof(float));
        else
            for (size_t d = 0; d < D; d++) dst[d] = j->pad;
    }
}

static void to_padded_bwd_task(void *p, int ith, int nth) {
    const job *j = p;
    size_t lo, hi, D = (size_t)j->D;
    em_split((size_t)j->B * (size_t)j->max_len, ith, nth, &lo, &hi);
    for (size_t r = lo; r < hi; r++) {
        size_t b = r / (size_t)j->max_len, t = r % (size_t)j->max_len;
        if ((int64_t)t < j->offsets[b + 1] - j->offsets[b])
            em_vadd(j->out + ((size_t)j->offsets[b] + t) * D, j->a + r * D, D);
    }
}

em_status em_jagged_to_padded_forward(float *padded, const float *values, const int64_t *offsets,
                                      int B, int max_len, int D, float pad_value, int truncate,
                                      em_pool *pool) {
    em_status s = check_padded("jagged_to_padded", offsets, B, max_len, D, truncate);
    if (s) return s;
    job j = {.out = padded, .a = values, .offsets = offsets, .B = B, .max_len = max_len, .D = D, .pad = pad_value};
    if (max_len > 0) run(pool, to_padded_fwd_task, &j);
    return EM_OK;
}

em_status em_jagged_to_padded_backward(float *dvalues, const float *dpadded, const int64_t *offsets,
                                       int B, int max_len, int D, int truncate, em_pool *pool) {
    em_status s = check_padded("jagged_to_padded_backward", offsets, B, max_len, D, truncate);
    if (s) return s;
    job j = {.out = dvalues, .a = dpadded, .offsets = offsets, .B = B, .max_len = max_len, .D = D};
    if (max_len > 0) run(pool, to_padded_bwd_task, &j);
    return EM_OK;
}

/* Items: sequences. Forward copies (or zeroes past max_len); backward accumulates. */
static void to_jagged_task(void *p, int ith, int nth) {
    const job *j = p;
    size_t lo, hi, D = (size_t)j->D;
    em_split((size_t)j->B, ith, nth, &lo, &hi);
    for (size_t b = lo; b < hi; b++) {
        int64_t L = j->offsets[b + 1] - j->offsets[b];
        for (int64_t t = 0; t < L; t++) {
            size_t row = (size_t)(j->offsets[b] + t);
            size_t prow = b * (size_t)j->max_len + (size_t)t; /* valid only if t < max_len */
            if (j->mode == 0) { /* forward: out = values, a = padded */
                if (t < j->max_len) memcpy(j->out + row * D, j->a + prow * D, D * sizeof(float));
                else memset(j->out + row * D, 0, D * sizeof(float));
            } else if (t < j->max_len) { /* backward: out = dpadded, a = dvalues */
                em_vadd(j->out + prow * D, j->a + row * D, D);
            }
        }
    }
}

em_status em_padded_to_jagged_forward(float *values, const float *padded, const int64_t *offsets,
                                      int B, int max_len, int D, int truncate, em_pool *pool) {
    em_status s = check_padded("padded_to_jagged", offsets, B, max_len, D, truncate);
    if (s) return s;
    job j = {.out = values, .a = padded, .offsets = offsets, .B = B, .max_len = max_len, .D = D, .mode = 0};
    run(pool, to_jagged_task, &j);
    return EM_OK;
}

em_status em_padded_to_jagged_backward(float *dpadded, const float *dvalues, const int64_t *offsets,
                                       int B, int max_len, int D, int truncate, em_pool *pool) {
    em_status s = check_padded("padded_to_jagged_backward", offsets, B, max_len, D, truncate);
    if (s) return s;
    job j = {.out = dpadded, .a = dvalues, .offsets = offsets, .B = B, .max_len = max_len, .D = D,
             .mode = 1};
    run(pool, to_jagged_task, &j);
    return EM_OK;
}

/* ---------------------------------------------------------------- pooling */

/* Items: sequences; rows are added in order, so the sum order is fixed. */
static void pool_fwd_task(void *p, int ith, int nth) {
    const job *j = p;
    size_t lo, hi, D = (size_t)j->D;
    em_split((size_t)j->B, ith, nth, &lo, &hi);
    for (size_t b = lo; b < hi; b++) {
        float *o = j->out + b * D;
        memset(o, 0, D * sizeof(float));
        int64_t L = j->offsets[b + 1] - j->offsets[b];
        for (int64_t t = 0; t < L; t++) em_vadd(o, j->a + (size_t)(j->offsets[b] + t) * D, D);
        if (j->mode == EM_JAGGED_MEAN && L > 0) em_vscale(o, 1.f / (float)L, D);
    }
}

static void pool_bwd_task(void *p, int ith, int nth) {
    const job *j = p;
    size_t lo, hi, D = (size_t)j->D;
    em_split((size_t)j->B, ith, nth, &lo, &hi);
    for (size_t b = lo; b < hi; b++) {
        int64_t L = j->offsets[b + 1] - j->offsets[b];
        float scale = j->mode == EM_JAGGED_MEAN && L > 0 ? 1.f / (float)L : 1.f;
        for (int64_t t = 0; t < L; t++) em_vaxpy(j->out + (size_t)(j->offsets[b] + t) * D, scale, j->a + b * D, D);
    }
}

static em_status check_pool(const char *op, const int64_t *offsets, int B, int D, em_jagged_reduce mode) {
    em_status s = em_jagged_check(offsets, B);
    if (s || (s = check_dim(op, "D", D))) return s;
    if (mode != EM_JAGGED_SUM && mode != EM_JAGGED_MEAN)
        return em_errorf(EM_ERR_INVALID, "%s: unknown reduction %d", op, (int)mode);
    return EM_OK;
}

em_status em_jagged_pool_forward(float *out, const float *values, const int64_t *offsets, int B,
                                 int D, em_jagged_reduce mode, em_pool *pool) {
    em_status s = check_pool("jagged_pool", offsets, B, D, mode);
    if (s) return s;
    job j = {.out = out, .a = values, .offsets = offsets, .B = B, .D = D, .mode = (int)mode};
    run(pool, pool_fwd_task, &j);
    return EM_OK;
}

em_status em_jagged_pool_backward(float *dvalues, const float *dout, const int64_t *offsets, int B,
                                  int D, em_jagged_reduce mode, em_pool *pool) {
    em_status s = check_pool("jagged_pool_backward", offsets, B, D, mode);
    if (s) return s;
    job j = {.out = dvalues, .a = dout, .offsets = offsets, .B = B, .D = D, .mode = (int)mode};
    run(pool, pool_bwd_task, &j);
    return EM_OK;
}

/* ---------------------------------------------------------------- softmax */

/* Items: (sequence b, column chunk c), B * ceil(D / COL_CHUNK) of them. */
static void softmax_fwd_task(void *p, int ith, int nth) {
    const job *j = p;
    size_t D = (size_t)j->D, nc = (size_t)cdiv64(j->D, COL_CHUNK), lo, hi;
    em_split((size_t)j->B * nc, ith, nth, &lo, &hi);
    float mx[COL_CHUNK], sum[COL_CHUNK];
    for (size_t it = lo; it < hi; it++) {
        size_t b = it / nc, c0 = (it % nc) * COL_CHUNK, w = D - c0 < COL_CHUNK ? D - c0 : COL_CHUNK;
        int64_t L = j->offsets[b + 1] - j->offsets[b];
        if (L == 0) continue;
        const float *x = j->a + (size_t)j->offsets[b] * D + c0;
        float *y = j->out + (size_t)j->offsets[b] * D + c0;
        for (size_t d = 0; d < w; d++) mx[d] = -INFINITY, sum[d] = 0.f;
        for (int64_t t = 0; t < L; t++)
            for (size_t d = 0; d < w; d++) mx[d] = fmaxf(mx[d], x[(size_t)t * D + d]);
        for (int64_t t = 0; t < L; t++)
            for (size_t d = 0; d < w; d++) {
                float e = expf(x[(size_t)t * D + d] - mx[d]);
                y[(size_t)t * D + d] = e;
                sum[d] += e;
            }
        for (size_t d = 0; d < w; d++) sum[d] = 1.f / sum[d];
        for (int64_t t = 0; t < L; t++)
            for (size_t d = 0; d < w; d++) y[(size_t)t * D + d] *= sum[d];
    }
}

static void softmax_bwd_task(void *p, int ith, int nth) {
    const job *j = p; /* out = dvalues, a = dout, b = y */
    size_t D = (size_t)j->D, nc = (size_t)cdiv64(j->D, COL_CHUNK), lo, hi;
    em_split((size_t)j->B * nc, ith, nth, &lo, &hi);
    float dot[COL_CHUNK];
    for (size_t it = lo; it < hi; it++) {
        size_t b = it / nc, c0 = (it % nc) * COL_CHUNK, w = D - c0 < COL_CHUNK ? D - c0 : COL_CHUNK;
        int64_t L = j->offsets[b + 1] - j->offsets[b];
        size_t base = (size_t)j->offsets[b] * D + c0;
        const float *dy = j->a + base, *y = j->b + base;
        float *dx = j->out + base;
        for (size_t d = 0; d < w; d++) dot[d] = 0.f;
        for (int64_t t = 0; t < L; t++)
            for (size_t d = 0; d < w; d++) dot[d] += dy[(size_t)t * D + d] * y[(size_t)t * D + d];
        for (int64_t t = 0; t < L; t++)
            for (size_t d = 0; d < w; d++) {
                size_t i = (size_t)t * D + d;
                dx[i] += y[i] * (dy[i] - dot[d]);
            }
    }
}

em_status em_jagged_softmax_forward(float *out, const float *values, const int64_t *offsets, int B,
                                    int D, em_pool *pool) {
    em_status s = em_jagged_check(offsets, B);
    if (s || (s = check_dim("jagged_softmax", "D", D))) return s;
    job j = {.out = out, .a = values, .offsets = offsets, .B = B, .D = D};
    if (D > 0) run(pool, softmax_fwd_task, &j);
    return EM_OK;
}

em_status em_jagged_softmax_backward(float *dvalues, const float *dout, const float *out,
                                     const int64_t *offsets, int B, int D, em_pool *pool) {
    em_status s = em_jagged_check(offsets, B);
    if (s || (s = check_dim("jagged_softmax_backward", "D", D))) return s;
    job j = {.out = dvalues, .a = dout, .b = out, .offsets = offsets, .B = B, .D = D};
    if (D > 0) run(pool, softmax_bwd_task, &j);
    return EM_OK;
}

/* ------------------------------------------------- jagged x dense matmul */

static em_status check_jd(const char *op, const int64_t *offsets, int B, int K, int N) {
    em_status s = em_jagged_check(offsets, B);
    if (s || (s = check_dim(op, "K", K)) || (s = check_dim(op, "N", N))) return s;
    return EM_OK;
}

/* Items: ROW_BLOCK-row blocks of out. */
static void jd_fwd_task(void *p, int ith, int nth) {
    const job *j = p;
    int64_t T = j->offsets[j->B];
    size_t lo, hi;
    em_split((size_t)cdiv64(T, ROW_BLOCK), ith, nth, &lo, &hi);
    for (size_t it = lo; it < hi; it++) {
        int64_t r0 = (int64_t)it * ROW_BLOCK;
        int rows = min_i(T - r0, ROW_BLOCK);
        float *o = j->out + (size_t)r0 * (size_t)j->N;
        if (j->K == 0) memset(o, 0, (size_t)rows * (size_t)j->N * sizeof(float));
        else
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, j->N, j->K, 1.f, j->a + (size_t)r0 * (size_t)j->K,
                        j->K, j->b, j->N, 0.f, o, j->N);
    }
}

/* Items: the row blocks of dvalues, then the COL_CHUNK x COL_CHUNK tiles of dW (each
 * tile reduces over all total_len rows in one sgemm). */
static void jd_bwd_task(void *p, int ith, int nth) {
    const job *j = p; /* out = dvalues, out2 = dW, a = dout, b = values, c = W */
    int64_t T = j->offsets[j->B];
    size_t n_rows = j->out ? (size_t)cdiv64(T, ROW_BLOCK) : 0;
    size_t tk = (size_t)cdiv64(j->K, COL_CHUNK), tn = (size_t)cdiv64(j->N, COL_CHUNK);
    size_t n_tiles = j->out2 ? tk * tn : 0, lo, hi;
    em_split(n_rows + n_tiles, ith, nth, &lo, &hi);
    for (size_t it = lo; it < hi; it++) {
        if (it < n_rows) {
            int64_t r0 = (int64_t)it * ROW_BLOCK;
            int rows = min_i(T - r0, ROW_BLOCK);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, j->K, j->N, 1.f, j->a + (size_t)r0 * (size_t)j->N,
                        j->N, j->c, j->N, 1.f, j->out + (size_t)r0 * (size_t)j->K, j->K);
        } else {
            size_t t = it - n_rows;
            int k0 = (int)(t / tn) * COL_CHUNK, n0 = (int)(t % tn) * COL_CHUNK;
            int kr = min_i(j->K - k0, COL_CHUNK), nr = min_i(j->N - n0, COL_CHUNK);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, kr, nr, (int)T, 1.f, j->b + k0, j->K, j->a + n0, j->N,
                        1.f, j->out2 + (size_t)k0 * (size_t)j->N + n0, j->N);
        }
    }
}

em_status em_jagged_dense_matmul_forward(float *out, const float *values, const float *W,
                                         const int64_t *offsets, int B, int K, int N, em_pool *pool) {
    em_status s = check_jd("jagged_dense_matmul", offsets, B, K, N);
    if (s) return s;
    if (offsets[B] == 0 || N == 0) return EM_OK;
    em_blas_init();
    job j = {.out = out, .a = values, .b = W, .offsets = offsets, .B = B, .K = K, .N = N};
    run(pool, jd_fwd_task, &j);
    return EM_OK;
}

em_status em_jagged_dense_matmul_backward(float *dvalues, float *dW, const float *dout,
                                          const float *values, const float *W,
                                          const int64_t *offsets, int B, int K, int N,
                                          em_pool *pool) {
    em_status s = check_jd("jagged_dense_matmul_backward", offsets, B, K, N);
    if (s) return s;
    if (offsets[B] > INT_MAX && dW)
        return em_errorf(EM_ERR_INVALID, "jagged_dense_matmul_backward: total_len %lld > INT_MAX",
                         (long long)offsets[B]);
    if (offsets[B] == 0 || N == 0 || K == 0) return EM_OK; /* every product is empty */
    em_blas_init();
    job j = {.out = dvalues, .out2 = dW, .a = dout, .b = values, .c = W, .offsets = offsets, .B = B, .K = K, .N = N};
    run(pool, jd_bwd_task, &j);
    return EM_OK;
}

/* --------------------------------------------- jagged x jagged (per sample) */

em_status em_jagged_block_offsets(int64_t *block_offsets, const int64_t *offsets, int B) {
    em_status s = em_jagged_check(offsets, B);
    if (s || (s = check_int_lengths("jagged_block_offsets", offsets, B))) return s;
    int64_t acc = 0;
    block_offsets[0] = 0;
    for (int b = 0; b < B; b++) {
        int64_t L = offsets[b + 1] - offsets[b];
        if (__builtin_add_overflow(acc, L * L, &acc))
            return em_errorf(EM_ERR_INVALID, "jagged_block_offsets: sum of L^2 overflows int64 at sequence %d", b);
        block_offsets[b + 1] = acc;
    }
    return EM_OK;
}

static em_status check_jj(const char *op, const int64_t *offsets, const int64_t *boffs, int B, int D) {
    em_status s = em_jagged_check(offsets, B);
    if (s || (s = check_int_lengths(op, offsets, B)) || (s = check_dim(op, "D", D))) return s;
    if (!boffs) return em_errorf(EM_ERR_INVALID, "%s: block_offsets is NULL", op);
    if (boffs[0] != 0) return em_errorf(EM_ERR_INVALID, "%s: block_offsets[0] = %lld, must be 0", op, (long long)boffs[0]);
    for (int b = 0; b < B; b++) {
        int64_t L = offsets[b + 1] - offsets[b];
        if (boffs[b + 1] - boffs[b] != L * L)
            return em_errorf(EM_ERR_INVALID, "%s: block %d spans %lld entries, expected L^2 = %lld", op, b,
                             (long long)(boffs[b + 1] - boffs[b]), (long long)(L * L));
    }
    return EM_OK;
}

/* Items: (sequence b, ROW_BLOCK-row slab of its block). Each worker counts items from
 * the start to find its first one: O(B), against O(L^2 D) work per sequence. */
typedef void (*jj_item_fn)(const job *j, int64_t o, int64_t bo, int L, int r0, int r1);

static void jj_for_items(const job *j, int ith, int nth, jj_item_fn fn) {
    size_t total = 0, lo, hi;
    for (int b = 0; b < j->B; b++) total += (size_t)cdiv64(j->offsets[b + 1] - j->offsets[b], ROW_BLOCK);
    em_split(total, ith, nth, &lo, &hi);
    size_t k = 0;
    for (int b = 0; b < j->B && k < hi; b++) {
        int L = (int)(j->offsets[b + 1] - j->offsets[b]);
        size_t nb = (size_t)cdiv64(L, ROW_BLOCK);
        for (size_t s = 0; s < nb; s++, k++) {
            if (k < lo || k >= hi) continue;
            int r0 = (int)s * ROW_BLOCK;
            fn(j, j->offsets[b], j->boffs[b], L, r0, min_i(L, (int64_t)r0 + ROW_BLOCK));
        }
    }
}

static void jj_fwd_item(const job *j, int64_t o, int64_t bo, int L, int r0, int r1) {
    const size_t D = (size_t)j->D;
    const float *Q = j->a + (size_t)o * D, *K = j->b + (size_t)o * D;
    float *S = j->out + (size_t)bo;
    if (D == 0) {
        memset(S + (size_t)r0 * (size_t)L, 0, (size_t)(r1 - r0) * (size_t)L * sizeof(float));
    } else if (L >= JJ_GEMM_MIN) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, r1 - r0, L, j->D, 1.f, Q + (size_t)r0 * D, j->D, K,
                    j->D, 0.f, S + (size_t)r0 * (size_t)L, L);
    } else {
        for (int r = r0; r < r1; r++)
            for (int c = 0; c < L; c++) S[(size_t)r * (size_t)L + (size_t)c] = em_vdot(Q + (size_t)r * D, K + (size_t)c * D, D);
    }
}

/* Rows r0..r1 of dQ_b (from rows of dS_b) and of dK_b (from columns of dS_b). */
static void jj_bwd_item(const job *j, int64_t o, int64_t bo, int L, int r0, int r1) {
    const size_t D = (size_t)j->D, Ls = (size_t)L; /* out = dQ, out2 = dK, c = dS, a = Q, b = K */
    const float *Q = j->a + (size_t)o * D, *K = j->b + (size_t)o * D, *dS = j->c + (size_t)bo;
    float *dQ = j->out ? j->out + (size_t)o * D : NULL, *dK = j->out2 ? j->out2 + (size_t)o * D : NULL;
    if (L >= JJ_GEMM_MIN) {
        if (dQ)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, r1 - r0, j->D, L, 1.f, dS + (size_t)r0 * Ls, L, K,
                        j->D, 1.f, dQ + (size_t)r0 * D, j->D);
        if (dK)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r1 - r0, j->D, L, 1.f, dS + r0, L, Q, j->D, 1.f,
                        dK + (size_t)r0 * D, j->D);
        return;
    }
    for (int r = r0; r < r1; r++) {
        if (dQ)
            for (int c = 0; c < L; c++) em_vaxpy(dQ + (size_t)r * D, dS[(size_t)r * Ls + (size_t)c], K + (size_t)c * D, D);
        if (dK)
            for (int i = 0; i < L; i++) em_vaxpy(dK + (size_t)r * D, dS[(size_t)i * Ls + (size_t)r], Q + (size_t)i * D, D);
    }
}

static void jj_fwd_task(void *p, int ith, int nth) { jj_for_items(p, ith, nth, jj_fwd_item); }
static void jj_bwd_task(void *p, int ith, int nth) { jj_for_items(p, ith, nth, jj_bwd_item); }

em_status em_jagged_jagged_matmul_forward(float *scores, const float *Q, const float *K,
                                          const int64_t *offsets, const int64_t *block_offsets,
                                          int B, int D, em_pool *pool) {
    em_status s = check_jj("jagged_jagged_matmul", offsets, block_offsets, B, D);
    if (s) return s;
    em_blas_init();
    job j = {.out = scores, .a = Q, .b = K, .offsets = offsets, .boffs = block_offsets, .B = B, .D = D};
    run(pool, jj_fwd_task, &j);
    return EM_OK;
}

em_status em_jagged_jagged_matmul_backward(float *dQ, float *dK, const float *dscores,
                                           const float *Q, const float *K,
                                           const int64_t *offsets, const int64_t *block_offsets,
                                           int B, int D, em_pool *pool) {
    em_status s = check_jj("jagged_jagged_matmul_backward", offsets, block_offsets, B, D);
    if (s) return s;
    if (D == 0 || (!dQ && !dK)) return EM_OK;
    em_blas_init();
    job j = {.out = dQ, .out2 = dK, .a = Q, .b = K, .c = dscores, .offsets = offsets, .boffs = block_offsets, .B = B,
             .D = D};
    run(pool, jj_bwd_task, &j);
    return EM_OK;
}
