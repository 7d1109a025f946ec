/*
 * linear_impl.h - the linear layer's register-blocked AVX-512 path (linear_avx512.c),
 * behind em_linear_* (linear.c). Internal to src/nn.
 */
#ifndef EMBER_NN_LINEAR_IMPL_H
#define EMBER_NN_LINEAR_IMPL_H

#include "ember/core.h"
#include "ember/nn.h"

/* out(B,O) = relu?(in(B,I) W(O,I)^T + b). Returns 0 when done, -1 when this path is
 * not available (no AVX-512 in the build, or no memory for the packed weights): the
 * caller then runs the OpenBLAS tiles. */
int em__linear_fwd_avx512(float *out, const float *in, const float *W, const float *b, int B, int I, int O, int relu,
                          em_pool *pool);

/* din(B,I) (+)= (dout W) [* (in > 0) when mask_in], dW(O,I) (+)= dout^T in,
 * db(O) (+)= sum_b dout; += when accumulate, else =. din/dW/db nullable. Returns 0
 * when done, -1 as above. */
int em__linear_bwd_avx512(float *din, float *dW, float *db, const float *dout, const float *in, const float *W, int B,
                          int I, int O, int accumulate, int mask_in, em_pool *pool);

/* em_mlp_forward / em_mlp_backward on the kernels; 0 when done, -1 as above. */
int em__mlp_fwd_avx512(const em_mlp_layer *L, int n, const float *in, int B, em_pool *pool);
int em__mlp_bwd_avx512(const em_mlp_layer *L, int n, const float *in, const float *dout, int B, em_pool *pool);

#endif
