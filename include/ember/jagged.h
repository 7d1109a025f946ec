/*
 * ember/jagged.h - jagged (variable-length) sequence tensors: conversions, pooling,
 * softmax and matmuls, as forward/backward pairs on flat fp32 buffers.
 *
 * Layout. A jagged tensor of B sequences with D features per position is
 *
 *   values   (total_len, D) fp32, row-major: all sequences' rows back to back
 *   offsets  (B + 1) int64: offsets[0] = 0, non-decreasing, total_len = offsets[B]
 *
 * and sequence b is rows offsets[b] .. offsets[b+1]-1 of `values` (length
 * L_b = offsets[b+1] - offsets[b], possibly 0). This is FBGEMM's layout with one
 * jagged dimension: sequences are never padded to the longest one.
 *
 *   offsets = {0, 2, 2, 5}     B = 3: lengths 2, 0, 3; values has 5 rows of D floats
 *
 * The per-sample product Q_b K_b^T (L_b x L_b) is stored as a "jagged block" array:
 * the blocks of all samples back to back, block b row-major at block_offsets[b] =
 * sum_{c<b} L_c^2 (em_jagged_block_offsets() computes them; B + 1 entries).
 *
 * Conventions (as ember/nn.h): backward ACCUMULATES into every gradient it writes,
 * gradient pointers documented "nullable" may be NULL to skip them, `pool` may be
 * NULL, and results are bitwise identical for any number of threads (each output
 * element is computed by one worker, over fixed blocks that do not depend on nth).
 * Every function that takes offsets validates them (O(B)) and returns
 * EM_ERR_INVALID with a detail in em_last_error() when they are malformed or a size
 * is out of range; nothing is written in that case.
 */
#ifndef EMBER_JAGGED_H
#define EMBER_JAGGED_H

#include "core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* EM_OK iff B >= 0, offsets != NULL, offsets[0] == 0 and offsets is non-decreasing. */
em_status em_jagged_check(const int64_t *offsets, int B);
/* max_b L_b (0 for B == 0). Contract: offsets valid. */
int64_t em_jagged_max_len(const int64_t *offsets, int B);

/* ------------------------------------------------------ jagged <-> padded */
/*
 * jagged -> padded: padded (B, max_len, D); padded[b, t] = values[offsets[b] + t] for
 * t < min(L_b, max_len), pad_value elsewhere. A sequence longer than max_len is an
 * error unless `truncate` is non-zero, in which case its first max_len rows are kept.
 */
em_status em_jagged_to_padded_forward(float *padded, const float *values, const int64_t *offsets,
                                      int B, int max_len, int D, float pad_value, int truncate,
                                      em_pool *pool);
/* dvalues (total_len, D) += dpadded at the copied positions (truncated rows get nothing). */
em_status em_jagged_to_padded_backward(float *dvalues, const float *dpadded, const int64_t *offsets,
                                       int B, int max_len, int D, int truncate, em_pool *pool);

/*
 * padded -> jagged: values (total_len, D); values[offsets[b] + t] = padded[b, t] for
 * t < min(L_b, max_len). With `truncate` non-zero, rows t >= max_len of a longer
 * sequence are set to 0 (the padded tensor holds nothing for them); without it such a
 * sequence is an error.
 */
em_status em_padded_to_jagged_forward(float *values, const float *padded, const int64_t *offsets,
                                      int B, int max_len, int D, int truncate, em_pool *pool);
/* dpadded (B, max_len, D) += dvalues at the copied positions. */
em_status em_padded_to_jagged_backward(float *dpadded, const float *dvalues, const int64_t *offsets,
                                       int B, int max_len, int D, int truncate, em_pool *pool);

/* ---------------------------------------------------------------- pooling */

typedef enum { EM_JAGGED_SUM = 0, EM_JAGGED_MEAN = 1 } em_jagged_reduce;

/* out (B, D) = sum (or mean) over each sequence's rows; an empty sequence gives 0. */
em_status em_jagged_pool_forward(float *out, const float *values, const int64_t *offsets, int B,
                                 int D, em_jagged_reduce mode, em_pool *pool);
/* dvalues (total_len, D) += dout[b] (times 1/L_b for the mean) on every row of b. */
em_status em_jagged_pool_backward(float *dvalues, const float *dout, const int64_t *offsets, int B,
                                  int D, em_jagged_reduce mode, em_pool *pool);

/* ---------------------------------------------------------------- softmax */
/*
 * out (total_len, D): for each sequence b and column d, softmax of values[rows of b, d]
 * along the sequence axis (max-subtracted, so any finite input is safe). Empty
 * sequences produce nothing. out == values (in place) is allowed.
 */
em_status em_jagged_softmax_forward(float *out, const float *values, const int64_t *offsets, int B,
                                    int D, em_pool *pool);
/* dvalues += out * (dout - sum_t dout * out), per sequence and column; `out` is the
 * forward output. dvalues must not alias dout or out. */
em_status em_jagged_softmax_backward(float *dvalues, const float *dout, const float *out,
                                     const int64_t *offsets, int B, int D, em_pool *pool);

/* ------------------------------------------------- jagged x dense matmul */
/*
 * out (total_len, N) = values (total_len, K) @ W (K, N), with cblas_sgemm over fixed
 * blocks of rows. The offsets only give total_len (and are validated): every row is
 * multiplied by the same W.
 */
em_status em_jagged_dense_matmul_forward(float *out, const float *values, const float *W,
                                         const int64_t *offsets, int B, int K, int N, em_pool *pool);
/* dvalues (total_len, K) += dout @ W^T; dW (K, N) += values^T @ dout. Both nullable. */
em_status em_jagged_dense_matmul_backward(float *dvalues, float *dW, const float *dout,
                                          const float *values, const float *W,
                                          const int64_t *offsets, int B, int K, int N,
                                          em_pool *pool);

/* --------------------------------------------- jagged x jagged (per sample) */

/* block_offsets (B + 1): block_offsets[b] = sum_{c<b} L_c^2. Validates offsets. */
em_status em_jagged_block_offsets(int64_t *block_offsets, const int64_t *offsets, int B);

/*
 * For each sample b: S_b (L_b, L_b) = Q_b (L_b, D) @ K_b^T, where Q and K are jagged
 * (total_len, D) with the same offsets, written into `scores` at block_offsets[b]
 * (row-major). block_offsets must be what em_jagged_block_offsets() returns (it is
 * checked). Large blocks go through cblas_sgemm, small ones through dot products.
 */
em_status em_jagged_jagged_matmul_forward(float *scores, const float *Q, const float *K,
                                          const int64_t *offsets, const int64_t *block_offsets,
                                          int B, int D, em_pool *pool);
/* dQ_b += dS_b @ K_b; dK_b += dS_b^T @ Q_b. dQ, dK nullable. */
em_status em_jagged_jagged_matmul_backward(float *dQ, float *dK, const float *dscores,
                                           const float *Q, const float *K,
                                           const int64_t *offsets, const int64_t *block_offsets,
                                           int B, int D, em_pool *pool);

#ifdef __cplusplus
}
#endif
#endif
