/*
 * activation.c - elementwise ReLU and sigmoid, forward and backward.
 *
 * These run single-threaded over flat buffers: in DLRM they touch B x width floats
 * once, next to sgemm calls that do width times more work, so a pool dispatch would
 * cost more than it saves. Loops are plain C over restrict pointers, split into a
 * main part whose trip count is a multiple of 8 and a tail, because gcc at -O2 (its
 * "very cheap" cost model) only vectorises loops it can prove need no scalar epilogue
 * and no runtime alias check.
 *
 * ReLU's backward reads the forward OUTPUT (out > 0), not the input, so the model can
 * run ReLU in place on the linear output and keep one buffer per layer. Sigmoid is
 * evaluated on whichever side of 0 keeps exp() from overflowing. ReLU passes NaN
 * through (x < 0 is false for NaN), as torch.relu does, so divergence stays visible.
 */
#include <math.h>

#include "ember/nn.h"

__attribute__((noinline)) static void relu_inplace(float *restrict x, size_t n) {
    size_t n8 = n & ~(size_t)7;
    for (size_t i = 0; i < n8; i++) x[i] = x[i] < 0.f ? 0.f : x[i];
    for (size_t i = n8; i < n; i++) x[i] = x[i] < 0.f ? 0.f : x[i];
}

__attribute__((noinline)) static void relu_copy(float *restrict out, const float *restrict in, size_t n) {
    size_t n8 = n & ~(size_t)7;
    for (size_t i = 0; i < n8; i++) out[i] = in[i] < 0.f ? 0.f : in[i];
    for (size_t i = n8; i < n; i++) out[i] = in[i] < 0.f ? 0.f : in[i];
}

/* Contract: out == in (in place) or the two do not overlap. The helpers stay out of
 * line: inlined, gcc drops their restrict and with it the vectorisation. */
void em_relu_forward(float *out, const float *in, size_t n) {
    if (out == in) relu_inplace(out, n);
    else relu_copy(out, in, n);
}

void em_relu_backward(float *restrict din, const float *restrict dout, const float *restrict out,
                      size_t n) {
    size_t n8 = n & ~(size_t)7;
    for (size_t i = 0; i < n8; i++) din[i] += out[i] > 0.f ? dout[i] : 0.f;
    for (size_t i = n8; i < n; i++) din[i] += out[i] > 0.f ? dout[i] : 0.f;
}

/* 1 / (1 + e^-x) for x >= 0, e^x / (1 + e^x) for x < 0: exp never sees a positive
 * argument, so it cannot overflow, and tiny outputs keep their relative precision. */
static inline float sigmoidf(float x) {
    if (x >= 0.f) return 1.f / (1.f + expf(-x));
    float e = expf(x);
    return e / (1.f + e);
}

/* Scalar: libm's expf does not vectorise at -O2, and in DLRM this runs on B logits. */
void em_sigmoid_forward(float *out, const float *in, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = sigmoidf(in[i]);
}

void em_sigmoid_backward(float *restrict din, const float *restrict dout, const float *restrict out,
                         size_t n) {
    size_t n8 = n & ~(size_t)7;
    for (size_t i = 0; i < n8; i++) din[i] += dout[i] * out[i] * (1.f - out[i]);
    for (size_t i = n8; i < n; i++) din[i] += dout[i] * out[i] * (1.f - out[i]);
}
