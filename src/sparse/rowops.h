/*
 * rowops.h - row kernels of the fused sparse optimizers that core/simd.h lacks
 * (internal to the sparse layer), and a spin-wait hint: the elementwise AdaGrad update
 * needs a vector square root, and the library is built with math errno on, under which the compiler will not
 * vectorise sqrtf. AVX2 path with a scalar fallback, like core/simd.h (where this would
 * move if another layer needs it).
 *
 * The vector and scalar paths compute the same IEEE operations (fma, sqrt, add, div,
 * fma), each correctly rounded, so the result does not depend on how many elements
 * fall in the vector part.
 */
#ifndef EMBER_SPARSE_ROWOPS_H
#define EMBER_SPARSE_ROWOPS_H

#include <math.h>
#include <stddef.h>

#include "core/simd.h"

/* torch.optim.Adagrad on one row of n values:
 *   s += g*g;  w += -lr * (g / (sqrt(s) + eps)) */
static inline void em__adagrad_row(float *restrict w, float *restrict s, const float *restrict g, size_t n, float lr,
                                   float eps) {
    size_t i = 0;
#ifdef EM_SIMD_AVX2
    const __m256 vnlr = _mm256_set1_ps(-lr), veps = _mm256_set1_ps(eps);
    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        __m256 sv = _mm256_fmadd_ps(gv, gv, _mm256_loadu_ps(s + i));
        _mm256_storeu_ps(s + i, sv);
        __m256 q = _mm256_div_ps(gv, _mm256_add_ps(_mm256_sqrt_ps(sv), veps));
        _mm256_storeu_ps(w + i, _mm256_fmadd_ps(vnlr, q, _mm256_loadu_ps(w + i)));
    }
    for (; i < n; i++) {
        float sd = fmaf(g[i], g[i], s[i]);
        s[i] = sd;
        w[i] = fmaf(-lr, g[i] / (sqrtf(sd) + eps), w[i]);
    }
#else
    for (; i < n; i++) {
        float sd = s[i] + g[i] * g[i];
        s[i] = sd;
        w[i] += -lr * (g[i] / (sqrtf(sd) + eps));
    }
#endif
}

/* Spin-wait hint (a worker waiting a few microseconds for another's result). */
static inline void em__cpu_relax(void) {
#ifdef EM_SIMD_AVX2
    _mm_pause();
#endif
}

#endif
