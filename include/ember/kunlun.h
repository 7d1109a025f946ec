/*
 * ember/kunlun.h - Kunlun's attention blocks on jagged sequences (forward and
 * backward): GDPA (generalized dot-product attention, an elementwise activation in
 * place of the softmax) and sliding-window softmax attention.
 *
 * Layout and conventions are those of ember/jattn.h (both configs embed an
 * em_jattn_cfg, validated by em_jattn_check):
 *   offsets  (B+1) int64, offsets[0] = 0, non-decreasing; sample b owns rows
 *            [offsets[b], offsets[b+1]) of every jagged tensor; total = offsets[B].
 *   Q, K, V, O, dQ, dK, dV   (total, H*dh) fp32 row-major; head h occupies columns
 *            [h*dh, (h+1)*dh).
 *   lse      (total, H), sliding window only: forward saves it, backward reads it.
 * Backward ACCUMULATES into dQ, dK, dV; forward overwrites its outputs. `pool` may be
 * NULL; results are bitwise identical for any number of threads. Length-0 samples
 * produce nothing; length 1 is ordinary. Bad offsets / dims / config values ->
 * EM_ERR_INVALID with a detail (nothing written); scratch allocation -> EM_ERR_NOMEM.
 *
 * GDPA, per sample b and head h (L = L_b, i, j in [0, L)):
 *   A_ij = act(s * q_i . k_j)        [causal: A_ij = 0 for j > i]
 *   O_b  = scale_out * A V_b
 * No normalisation, hence no running max: forward accumulates act(S) V over key tiles
 * and never materialises L x L. attn.scale <= 0 means s = 1/sqrt(dh); scale_out <= 0
 * means 1/max_b L_b over the batch (Kunlun's "scale ~ 1/max length"; 1 when every
 * sample is empty). Backward recomputes S per tile:
 *   dV += scale_out A^T dO;  dA = scale_out dO V^T;  dS = dA * act'(S);
 *   dQ += s dS K;  dK += s dS^T Q.
 * Activations (x = the scaled score):
 *   IDENTITY x;  RELU max(x, 0);  RELU2 max(x, 0)^2;  SILU x * sigmoid(x);
 *   GELU x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))  - the exact (erf) form, PyTorch's
 *        default F.gelu (approximate='none'), not the tanh approximation;
 *   TANH tanh(x).
 * ReLU's derivative at 0 is taken as 0 (as PyTorch).
 *
 * Sliding-window attention, per sample and head: query i attends to keys
 *   j in [i - w, i + w]  (causal: [i - w, i])  intersected with [0, L),
 *   O_i = softmax_j(s * q_i . k_j) V,  lse_i = log sum_j exp(s * q_i . k_j).
 * Every query sees at least itself, so lse is always finite. w = window >= 0; w >= L-1
 * is full (causal) attention. Forward visits only the key tiles that intersect a query
 * tile's window (cost O(L (w + tile)), never L x L; the tile height follows w) with an
 * online softmax; backward recomputes P = exp(S - lse) over the same tiles
 * (FlashAttention-2 style). Windows w <= 7 take a per-row path without tiles (see
 * src/nn/swa.c).
 */
#ifndef EMBER_KUNLUN_H
#define EMBER_KUNLUN_H

#include "core.h"
#include "jattn.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    EM_GDPA_IDENTITY = 0,
    EM_GDPA_RELU = 1,
    EM_GDPA_RELU2 = 2,
    EM_GDPA_SILU = 3,
    EM_GDPA_GELU = 4, /* erf form */
    EM_GDPA_TANH = 5,
} em_gdpa_act;

typedef struct {
    em_jattn_cfg attn; /* B, H, dh, offsets, scale (s), causal */
    em_gdpa_act act;
    float scale_out;   /* <= 0: 1 / max length over the batch */
} em_gdpa_cfg;

/* EM_ERR_INVALID with a detail unless attn passes em_jattn_check and act is known. */
em_status em_gdpa_check(const em_gdpa_cfg *cfg);

/* O (total, H*dh) <- GDPA of (Q, K, V). */
em_status em_gdpa_forward(float *O, const float *Q, const float *K, const float *V,
                          const em_gdpa_cfg *cfg, em_pool *pool);

/* dQ, dK, dV += gradients of sum(dO * O); each may be NULL to skip it. Needs no
 * forward output (S is recomputed). */
em_status em_gdpa_backward(float *dQ, float *dK, float *dV, const float *dO, const float *Q,
                           const float *K, const float *V, const em_gdpa_cfg *cfg, em_pool *pool);

typedef struct {
    em_jattn_cfg attn; /* B, H, dh, offsets, scale (<= 0: 1/sqrt(dh)), causal */
    int window;        /* w >= 0: keys [i - w, i + w] (causal: [i - w, i]) */
} em_swa_cfg;

/* EM_ERR_INVALID with a detail unless attn passes em_jattn_check and window >= 0. */
em_status em_swa_check(const em_swa_cfg *cfg);

/* O (total, H*dh), lse (total, H) <- sliding-window attention of (Q, K, V). */
em_status em_swa_forward(float *O, float *lse, const float *Q, const float *K, const float *V,
                         const em_swa_cfg *cfg, em_pool *pool);

/* dQ, dK, dV += gradients of sum(dO * O), each nullable. O and lse are forward's
 * outputs. */
em_status em_swa_backward(float *dQ, float *dK, float *dV, const float *dO, const float *Q,
                          const float *K, const float *V, const float *O, const float *lse,
                          const em_swa_cfg *cfg, em_pool *pool);

#ifdef __cplusplus
}
#endif
#endif
