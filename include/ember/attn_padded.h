/*
 * ember/attn_padded.h - padded dense multi-head self attention, forward and backward:
 * the way attention is usually written for variable-length sequences (pad every sample
 * to the longest, materialise the full score matrix, mask the padding), kept in ember
 * as the baseline Jagged Flash Attention (ember/jattn.h) is measured against and as an
 * independent reference for its tests.
 *
 * Layout (fp32, row-major):
 *   jagged  (total, H*dh) with offsets (B+1), exactly as ember/jattn.h;
 *   padded  (B, H, Lmax, dh): sample b, head h, row i at ((b*H + h)*Lmax + i)*dh;
 *           rows i >= L_b are padding;
 *   P       (B, H, Lmax, Lmax): the softmax probabilities, saved by forward for
 *           backward (this is the memory the padded formulation costs: 4*B*H*Lmax^2 bytes).
 *
 * Semantics, per (b, h), L = L_b (same as em_jattn_forward on the unpadded rows):
 *   S = scale * Q K^T over all Lmax x Lmax pairs (one sgemm: the padded compute);
 *   keys j >= L masked (and j > i under cfg->causal), softmax per row -> P;
 *   padding query rows i >= L get P = 0, hence O = 0 and no gradient;
 *   O = P V (one sgemm over all Lmax rows).
 * Backward through the saved P (the textbook softmax backward, ACCUMULATING like every
 * ember backward): dV += P^T dO, dP = dO V^T, dS = P * (dP - rowsum(P*dP)),
 * dQ += scale dS K, dK += scale dS^T Q. Gradients of padding rows receive 0 added.
 *
 * Work units are (sample, head) pairs, split statically over the pool; each unit owns
 * its O/P/dQ/dK/dV slices and runs single-threaded sgemms in a fixed order, so results
 * are bitwise identical for any thread count (or a NULL pool).
 *
 * Errors: em_jattn_check failures, Lmax < the longest sample or Lmax > 32768, or
 * Lmax < 1 -> EM_ERR_INVALID; backward allocates one Lmax x Lmax float scratch per
 * worker (EM_ERR_NOMEM if that fails, nothing written). Forward allocates nothing.
 */
#ifndef EMBER_ATTN_PADDED_H
#define EMBER_ATTN_PADDED_H

#include "core.h"
#include "jattn.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The longest sample of cfg (0 for an empty batch); cfg must pass em_jattn_check. */
int em_attn_padded_maxlen(const em_jattn_cfg *cfg);

/* dst (B, H, Lmax, dh) <- src jagged (total, H*dh); padding rows are set to 0. */
em_status em_attn_pad(float *dst, const float *src, const em_jattn_cfg *cfg, int Lmax, em_pool *pool);

/* dst jagged (total, H*dh) <- the unpadded rows of src (B, H, Lmax, dh) (overwrites). */
em_status em_attn_unpad(float *dst, const float *src, const em_jattn_cfg *cfg, int Lmax, em_pool *pool);

/* O (B, H, Lmax, dh), P (B, H, Lmax, Lmax) <- padded self attention of (Q, K, V). */
em_status em_attn_padded_forward(float *O, float *P, const float *Q, const float *K, const float *V,
                                 const em_jattn_cfg *cfg, int Lmax, em_pool *pool);

/* dQ, dK, dV (B, H, Lmax, dh) += gradients of sum(dO * O); P is forward's output. */
em_status em_attn_padded_backward(float *dQ, float *dK, float *dV, const float *dO, const float *Q,
                                  const float *K, const float *V, const float *P,
                                  const em_jattn_cfg *cfg, int Lmax, em_pool *pool);

#ifdef __cplusplus
}
#endif
#endif
