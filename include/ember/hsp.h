/*
 * ember/hsp.h - Kunlun's hierarchical seed pooling (HSP) on jagged sequences, forward
 * and backward: m learnable seed queries attend over each sample's sequence (seed
 * attention, compressing L_b rows to m), then a sum of k Kronecker-structured linear
 * maps compresses the m x D seed outputs further to m2 x D2 (Kronecker compression).
 *
 * Layout (fp32 row-major; jagged tensors as in ember/jattn.h; D = H*dh):
 *   offsets  (B+1) int64, offsets[0] = 0, non-decreasing; sample b owns rows
 *            [offsets[b], offsets[b+1]) of K, V, dK, dV; total = offsets[B], L_b its length.
 *   K, V, dK, dV  (total, D); head h occupies columns [h*dh, (h+1)*dh).
 *   Sq, dSq  (m, D): the seeds, one parameter shared by every sample; seed i of head h
 *            is Sq[i, h*dh : (h+1)*dh].
 *   Z, dZ    (B, m, D): the seed attention's output (the pooled tokens), per sample.
 *   lse      (B, m, H): log-sum-exp of each (sample, seed, head)'s scaled scores,
 *            saved by the forward for the backward's recomputation.
 *   A, dA    (k, m, m2): the seed-side maps A_i.
 *   W, dW    (k, D, D2): the feature-side maps W_i.
 *   Y, dY    (B, m2, D2): HSP's output.
 *
 * 1. Seed attention, per sample b and head h (no mask: seeds have no position):
 *      Z_b,h = softmax(s Sq_h K_b,h^T) V_b,h        (m x L_b scores, softmax over keys)
 *      lse_b,i,h = log sum_j exp(s Sq_h,i . K_b,h,j)
 *    s = attn.scale, or 1/sqrt(dh) when attn.scale <= 0 (as jattn). Computed in 128-key
 *    tiles with an online softmax (128-seed tiles when m > 128), so the m x L score
 *    matrix is never materialised. An empty sample (L_b = 0) has nothing to attend to:
 *    we define Z_b = 0 and lse = -inf (as jattn's target attention does for an empty
 *    history, and as sum pooling of nothing), and it contributes no gradient.
 *    Backward recomputes P = exp(s Sq K^T - lse) per tile (FlashAttention-2):
 *      D_i = dZ_i . Z_i,  dV += P^T dZ,  dS = P * (dZ V^T - D),
 *      dSq += s sum_b dS_b K_b,  dK += s dS^T Sq.
 *
 * 2. Kronecker compression, per sample b:
 *      Y_b = sum_{i<k} A_i^T Z_b W_i                (m2 x D2)
 *    i.e. vec(Y_b) = sum_i (A_i^T (x) W_i^T) vec(Z_b) with row-major vec: a sum of k
 *    Kronecker products acting on the flattened m x D tokens. TECHNIQUES.md writes it
 *    Y = sum_i Z_i^T X W_i; here X is the seed output Z_b and the seed-side maps are
 *    called A_i. No bias and no activation: callers compose those. Backward:
 *      dZ_b += sum_i A_i dY_b W_i^T,  dA_i += sum_b Z_b W_i dY_b^T,
 *      dW_i += sum_b Z_b^T A_i dY_b.
 *
 * Conventions (as the other nn kernels):
 *   - forward overwrites its outputs; backward ACCUMULATES into every gradient, and
 *     each gradient pointer may be NULL to skip it (all NULL: nothing is done).
 *   - `pool` may be NULL. Results are bitwise identical for any number of threads:
 *     every output element has one owner computing it in a fixed order, and the batch
 *     sums (dSq, dA, dW) are formed from per-sample / per-block partials, or owned
 *     tiles, whose boundaries depend only on the shapes, added in a fixed order (see
 *     src/nn/hsp.c).
 *   - The config is passed by value. Seed calls read attn and m; Kronecker calls read
 *     attn.B, attn.H, attn.dh, m, m2, D2 and k (not offsets); em_hsp_check and the
 *     composed calls check everything. Bad values -> EM_ERR_INVALID with a detail,
 *     nothing written. attn.causal must be 0.
 *   - Scratch comes from em_malloc; when that fails: EM_ERR_NOMEM, nothing leaked, and
 *     the separate calls leave every gradient untouched (they allocate before they
 *     compute; seed forward may already have zeroed the Z rows of empty samples).
 *     em_hsp_backward runs the Kronecker part before the seed part allocates, so on its
 *     failure dA and dW may already hold their accumulation. Sizes: seed forward one
 *     128x128 tile per worker plus the unit list; seed backward two tiles per worker,
 *     the unit list and B x m x D floats of per-sample dSq partials (when dSq is
 *     wanted); Kronecker calls nb x m2 x D floats per worker (nb samples per block,
 *     see hsp.c) plus, backward, the per-block dA partials; em_hsp_backward also a
 *     B x m x D dZ.
 */
#ifndef EMBER_HSP_H
#define EMBER_HSP_H

#include "core.h"
#include "jattn.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    em_jattn_cfg attn; /* B, H, dh, offsets, scale (s; <= 0: 1/sqrt(dh)); causal = 0 */
    int m;             /* seeds (pooled tokens per sample) */
    int m2;            /* rows of Y_b */
    int D2;            /* columns of Y_b */
    int k;             /* Kronecker terms */
} em_hsp_cfg;

/* EM_ERR_INVALID with a detail unless attn passes em_jattn_check, attn.causal is 0,
 * attn.scale is finite, m, m2, D2, k >= 1 and the sizes fit the BLAS int dims. */
em_status em_hsp_check(em_hsp_cfg cfg);

/* Z (B, m, D), lse (B, m, H) <- seed attention of the seeds Sq (m, D) over K, V
 * (total, D). Empty samples: Z_b = 0, lse = -inf. */
em_status em_hsp_seed_forward(float *Z, float *lse, const float *Sq, const float *K,
                              const float *V, em_hsp_cfg cfg, em_pool *pool);

/* dSq (m, D), dK, dV (total, D) += gradients of sum(dZ * Z); each nullable. Z and lse
 * are the forward's outputs. */
em_status em_hsp_seed_backward(float *dSq, float *dK, float *dV, const float *dZ,
                               const float *Sq, const float *K, const float *V, const float *Z,
                               const float *lse, em_hsp_cfg cfg, em_pool *pool);

/* Y (B, m2, D2) <- sum_i A_i^T Z_b W_i for Z (B, m, D), A (k, m, m2), W (k, D, D2). */
em_status em_hsp_kron_forward(float *Y, const float *Z, const float *A, const float *W,
                              em_hsp_cfg cfg, em_pool *pool);

/* dZ (B, m, D), dA (k, m, m2), dW (k, D, D2) += gradients of sum(dY * Y); each nullable. */
em_status em_hsp_kron_backward(float *dZ, float *dA, float *dW, const float *dY, const float *Z,
                               const float *A, const float *W, em_hsp_cfg cfg, em_pool *pool);

/* The whole block: Z, lse <- seed attention (kept for the backward), Y <- Kronecker
 * compression of Z. */
em_status em_hsp_forward(float *Y, float *Z, float *lse, const float *Sq, const float *K,
                         const float *V, const float *A, const float *W, em_hsp_cfg cfg,
                         em_pool *pool);

/* dSq, dK, dV, dA, dW += gradients of sum(dY * Y), each nullable; Z and lse from
 * em_hsp_forward. dZ is formed in a B x m x D scratch (only when dSq, dK or dV is
 * wanted) and not returned. */
em_status em_hsp_backward(float *dSq, float *dK, float *dV, float *dA, float *dW, const float *dY,
                          const float *Sq, const float *K, const float *V, const float *A,
                          const float *W, const float *Z, const float *lse, em_hsp_cfg cfg,
                          em_pool *pool);

#ifdef __cplusplus
}
#endif
#endif
