/*
 * ember/nn.h - dense layers as forward/backward pairs on flat fp32 buffers.
 *
 * Conventions (llm.c style):
 *   - shapes are given in comments as (rows, cols), row-major;
 *   - backward ACCUMULATES into every gradient it writes (din, dW, db): callers zero
 *     gradients separately; any gradient pointer documented "nullable" may be NULL
 *     to skip it;
 *   - `pool` may be NULL (single-threaded). Results are bitwise identical for any
 *     number of threads: every output element is computed by exactly one worker with
 *     a fixed reduction order.
 */
#ifndef EMBER_NN_H
#define EMBER_NN_H

#include "core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Linear: out(B,O) = in(B,I) @ W(O,I)^T + b(O). W has PyTorch's (out, in) layout.
 * b nullable. AVX-512 builds run ember's register-blocked kernels (one FMA per k in
 * order for every output element); other builds cblas_sgemm tiles (single-threaded
 * BLAS, split over the pool). Either way bitwise independent of the thread count. */
/* Which implementation em_linear_* use: 0 = the default, 1 = the OpenBLAS tiles (for
 * benchmarks and tests). em_linear_impl() says which one runs (0 kernels, 1 BLAS). */
void em_linear_set_impl(int blas);
int em_linear_impl(void);
void em_linear_forward(float *out, const float *in, const float *W, const float *b,
                       int B, int I, int O, em_pool *pool);
/* out = relu(in @ W^T + b), the ReLU fused into each output tile (bitwise equal to
 * em_linear_forward followed by em_relu_forward). */
void em_linear_relu_forward(float *out, const float *in, const float *W, const float *b,
                            int B, int I, int O, em_pool *pool);
/* din(B,I) += dout @ W; dW(O,I) += dout^T @ in; db(O) += sum_b dout. din/db nullable. */
void em_linear_backward(float *din, float *dW, float *db, const float *dout, const float *in,
                        const float *W, int B, int I, int O, em_pool *pool);
/* The same, but din, dW and db are overwritten instead of accumulated into: for
 * callers that own those buffers exclusively, it saves a zeroing pass over each. */
void em_linear_backward_set(float *din, float *dW, float *db, const float *dout, const float *in,
                            const float *W, int B, int I, int O, em_pool *pool);
/* em_linear_backward_set with the ReLU backward of the layer below fused into din:
 * din = (dout @ W) * (in > 0), for an `in` that is that layer's ReLU output. */
void em_linear_backward_set_relu_in(float *din, float *dW, float *db, const float *dout, const float *in,
                                    const float *W, int B, int I, int O, em_pool *pool);

/* An MLP: a chain of linear layers, layer l > 0 reading layer l-1's output. Run as a
 * chain, a worker takes a block of rows through every layer while they are in its
 * cache (AVX-512 builds; elsewhere layer by layer); bitwise the same as the layer-by-
 * layer calls named below. */
typedef struct {
    int I, O;
    int relu;            /* ReLU on this layer's output */
    const float *W, *b;  /* (O, I) and (O); b nullable */
    float *out;          /* (B, O) */
    float *dW, *db;      /* backward: overwritten; db nullable */
    float *din;          /* backward: (B, I), overwritten; may be NULL for layer 0 only */
} em_mlp_layer;
/* Layer 0 reads in (B, L[0].I): em_linear_(relu_)forward for l = 0..n-1. */
void em_mlp_forward(const em_mlp_layer *L, int n, const float *in, int B, em_pool *pool);
/* dout (B, L[n-1].O): the gradient of the last layer's output, any ReLU of it already
 * applied by the caller. For l = n-1..0 em_linear_backward_set(_relu_in) with dout_l =
 * L[l+1].din, the ReLU backward of layer l-1 fused into din when L[l-1].relu. */
void em_mlp_backward(const em_mlp_layer *L, int n, const float *in, const float *dout, int B, em_pool *pool);

/* ReLU: out = max(in, 0). In place (out == in) allowed. */
void em_relu_forward(float *out, const float *in, size_t n);
/* din += dout * (out > 0). `out` is the forward output. */
void em_relu_backward(float *din, const float *dout, const float *out, size_t n);

/* Sigmoid: out = 1 / (1 + exp(-in)), numerically stable for large |in|. */
void em_sigmoid_forward(float *out, const float *in, size_t n);
/* din += dout * out * (1 - out). */
void em_sigmoid_backward(float *din, const float *dout, const float *out, size_t n);

/* DLRM dot interaction over F+1 vectors of size D per example: x = bottom(B,D) and
 * the F pooled embeddings emb(B,F,D). out(B, D + F(F+1)/2) = [x, Z] where Z lists
 * the strictly-lower triangle of the (F+1)x(F+1) Gram matrix of [x, emb_0..emb_{F-1}]
 * row by row: (1,0), (2,0), (2,1), (3,0), ... (torch.tril_indices(F+1, F+1, -1)). */
static inline int em_dot_interact_out_dim(int F, int D) { return D + F * (F + 1) / 2; }
void em_dot_interact_forward(float *out, const float *bot, const float *emb, int B, int F, int D,
                             em_pool *pool);
/* The forward on M rows, single-threaded: out rows ldo apart, bottom rows ldb apart,
 * emb (M, F, D) contiguous. Each output is a function of its own row only. */
void em_dot_interact_rows(float *out, int ldo, const float *bot, int ldb, const float *emb, int F, int D, int M);
/* dbot(B,D) += ..., demb(B,F,D) += ... */
void em_dot_interact_backward(float *dbot, float *demb, const float *dout, const float *bot,
                              const float *emb, int B, int F, int D, em_pool *pool);
/* The same, overwriting dbot and demb (no zeroing pass needed). */
void em_dot_interact_backward_set(float *dbot, float *demb, const float *dout, const float *bot, const float *emb, int B,
                                  int F, int D, em_pool *pool);

/* Binary cross-entropy with logits, mean over n: returns the loss (computed in double,
 * stable: max(z,0) - z*y + log1p(exp(-|z|))). */
double em_bce_logits_forward(const float *logit, const float *y, size_t n);
/* dlogit[i] += scale * (sigmoid(z_i) - y_i); pass scale = 1/n for the mean loss. */
void em_bce_logits_backward(float *dlogit, const float *logit, const float *y, size_t n, float scale);

#ifdef __cplusplus
}
#endif
#endif
