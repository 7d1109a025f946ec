/*
 * ember/jattn.h - Jagged Flash Attention on CPU (forward and backward), for sequence
 * features kept jagged (values + offsets), never padded to the longest sequence.
 *
 * Layout (all fp32, row-major):
 *   offsets  (B+1) int64, offsets[0] = 0, non-decreasing; sample b owns rows
 *            [offsets[b], offsets[b+1]) of every jagged tensor; total = offsets[B].
 *   Q, K, V, O, dQ, dK, dV   (total, H*dh); head h occupies columns [h*dh, (h+1)*dh).
 *   lse      (total, H): the log-sum-exp of each query row's scaled scores, saved by
 *            forward and consumed by backward.
 *
 * Self attention, per sample b and head h (L = L_b):
 *   O_b = softmax(scale * Q_b K_b^T  [+ causal mask: key j visible iff j <= query i]) V_b
 * A length-0 sample produces nothing; length 1 is ordinary (O = V).
 *
 * Target (cross) attention: per sample one query per head (the candidate item),
 *   q, o, dq (B, H*dh);  lse (B, H);  o_b = softmax(scale * q_b K_b^T) V_b
 * over the jagged history K_b, V_b. A sample with an empty history gets o_b = 0 and
 * lse = -inf, and contributes no gradient. No causal mask (there is one query).
 *
 * Choices:
 *   - scale <= 0 in the config means 1/sqrt(dh).
 *   - Forward works in tiles of 128 query x 128 key rows with an online softmax (running
 *     max and sum per query row, accumulator rescaled when the max grows); the L x L
 *     score matrix is never materialised (working set: one 128x128 tile per worker).
 *   - Backward recomputes P = exp(scale*QK^T - lse) tile by tile (FlashAttention-2):
 *     D_i = dO_i . O_i, dV += P^T dO, dP = dO V^T, dS = P*(dP - D),
 *     dQ += scale dS K, dK += scale dS^T Q.
 *   - Backward ACCUMULATES into dQ, dK, dV (dq for the target variant), as every ember
 *     backward does; forward overwrites O and lse.
 *   - Determinism: forward work units are (sample, head, 128-row query tile), backward
 *     units are (sample, head); each unit writes a disjoint set of output elements with
 *     a fixed arithmetic order, workers take units from an atomic counter, so results
 *     are bitwise identical for any thread count (or a NULL pool).
 *   - Bad offsets (offsets[0] != 0, decreasing, NULL) or dims <= 0 -> EM_ERR_INVALID.
 *     Each self-attention call allocates a unit list and 64 or 128 KiB of tile scratch
 *     per worker (EM_ERR_NOMEM when that fails); the target variant allocates nothing.
 */
#ifndef EMBER_JATTN_H
#define EMBER_JATTN_H

#include "core.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int B;                   /* number of samples */
    int H;                   /* heads */
    int dh;                  /* head dimension */
    const int64_t *offsets;  /* (B+1) */
    float scale;             /* <= 0: 1/sqrt(dh) */
    int causal;              /* self attention only: key j visible iff j <= query i */
} em_jattn_cfg;

/* Check cfg (offsets well formed, dims positive); EM_ERR_INVALID with a detail if not. */
em_status em_jattn_check(const em_jattn_cfg *cfg);

/* O, lse <- self attention of (Q, K, V). */
em_status em_jattn_forward(float *O, float *lse, const float *Q, const float *K, const float *V,
                           const em_jattn_cfg *cfg, em_pool *pool);

/* dQ, dK, dV += gradients of sum(dO * O). O and lse are forward's outputs. */
em_status em_jattn_backward(float *dQ, float *dK, float *dV, const float *dO, const float *Q,
                            const float *K, const float *V, const float *O, const float *lse,
                            const em_jattn_cfg *cfg, em_pool *pool);

/* Target attention: o (B, H*dh), lse (B, H) <- one query q_b per sample over K_b, V_b.
 * cfg->causal is ignored. */
em_status em_jattn_target_forward(float *o, float *lse, const float *q, const float *K,
                                  const float *V, const em_jattn_cfg *cfg, em_pool *pool);

/* dq (B, H*dh), dK, dV (total, H*dh) += gradients of sum(do_ * o). */
em_status em_jattn_target_backward(float *dq, float *dK, float *dV, const float *do_,
                                   const float *q, const float *K, const float *V,
                                   const float *o, const float *lse, const em_jattn_cfg *cfg,
                                   em_pool *pool);

#ifdef __cplusplus
}
#endif
#endif
