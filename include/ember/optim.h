/*
 * ember/optim.h - optimizers. Dense ones step a flat parameter block; the sparse
 * (embedding-row) ones are fused into the embedding-bag backward (ember/embbag.h)
 * and share this configuration.
 *
 * Update rules (g = gradient, t = 1-based step count):
 *   SGD:               w -= lr * (g + wd * w)
 *   AdaGrad:           s += g^2;  w -= lr * g / (sqrt(s) + eps)               (torch.optim.Adagrad)
 *   row-wise AdaGrad:  m[r] += mean_d(g[d]^2);  w[r] -= lr * g / (sqrt(m[r]) + eps)  (FBGEMM)
 *   Adam:              g += wd*w; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
 *                      w -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)  (torch.optim.Adam)
 *   AdamW:             w *= 1 - lr*wd, then Adam without the wd term          (torch.optim.AdamW)
 */
#ifndef EMBER_OPTIM_H
#define EMBER_OPTIM_H

#include "core.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    EM_OPT_SGD = 0,
    EM_OPT_ADAGRAD,
    EM_OPT_ROWWISE_ADAGRAD, /* embeddings only */
    EM_OPT_ADAM,            /* dense only */
    EM_OPT_ADAMW,           /* dense only */
} em_optim_kind;

typedef struct {
    em_optim_kind kind;
    float lr;
    float eps;          /* AdaGrad default 1e-10, Adam 1e-8 */
    float beta1, beta2; /* Adam: 0.9, 0.999 */
    float weight_decay; /* 0 by default; AdamW default 0.01 */
    float init_accum;   /* AdaGrad initial accumulator value, default 0 */
    int replicas;       /* row-wise AdaGrad under 2D sparse parallelism with M replica groups
                           (momentum-scaled, Zhang et al. 2025): w -= lr g / sqrt(m / M + eps)
                           when > 1; 0 or 1: plain row-wise AdaGrad. Set by ember/dist.h. */
} em_optim_cfg;

/* Defaults of the matching torch.optim class for `kind` with learning rate lr. */
em_optim_cfg em_optim_default(em_optim_kind kind, float lr);
const char *em_optim_name(em_optim_kind kind);            /* "sgd", "adagrad", "rowwise_adagrad", "adam", "adamw" */
em_status em_optim_parse(const char *name, em_optim_kind *out); /* inverse of em_optim_name */

/* Number of fp32 state values per parameter of a dense optimizer (0, 1 or 2). */
int em_optim_state_per_param(em_optim_kind kind);

/* One dense step over a flat block of n parameters: w(n), g(n), state(n * per_param),
 * t = 1-based step count (Adam bias correction). Split over the pool elementwise, so
 * the result is independent of the thread count. Fails with EM_ERR_INVALID for
 * row-wise AdaGrad (not a dense optimizer). */
em_status em_optim_dense_step(const em_optim_cfg *cfg, float *w, const float *g, float *state,
                              size_t n, int64_t t, em_pool *pool);

#ifdef __cplusplus
}
#endif
#endif
