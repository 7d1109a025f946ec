/*
 * simd.h - the only place with intrinsics. Small fp32 vector helpers with an AVX2+FMA
 * path and a scalar fallback (selected at compile time). Logic files call these.
 *
 * Reduction order is fixed for a given build (8 lanes, then a fixed horizontal sum),
 * so results are deterministic, though not bitwise equal to the scalar fallback.
 */
#ifndef EMBER_SIMD_H
#define EMBER_SIMD_H

#include <stddef.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define EM_SIMD_AVX2 1
#endif

/* sum_i a[i] * b[i] */
static inline float em_vdot(const float *a, const float *b, size_t n) {
    size_t i = 0;
    float s = 0.f;
#ifdef EM_SIMD_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc0 = _mm256_add_ps(acc0, acc1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc0), _mm256_extractf128_ps(acc0, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    s = _mm_cvtss_f32(h);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y[i] += a * x[i] */
static inline void em_vaxpy(float *y, float a, const float *x, size_t n) {
    size_t i = 0;
#ifdef EM_SIMD_AVX2
    __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += a * x[i];
}

/* y[i] += x[i] */
static inline void em_vadd(float *y, const float *x, size_t n) {
    size_t i = 0;
#ifdef EM_SIMD_AVX2
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(x + i)));
#endif
    for (; i < n; i++) y[i] += x[i];
}

/* y[i] *= a */
static inline void em_vscale(float *y, float a, size_t n) {
    size_t i = 0;
#ifdef EM_SIMD_AVX2
    __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(va, _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] *= a;
}

/* sum_i x[i]^2 */
static inline float em_vsumsq(const float *x, size_t n) { return em_vdot(x, x, n); }

/* sum_i x[i] */
static inline float em_vsum(const float *x, size_t n) {
    size_t i = 0;
    float s = 0.f;
#ifdef EM_SIMD_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + i));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    s = _mm_cvtss_f32(h);
#endif
    for (; i < n; i++) s += x[i];
    return s;
}

/* d[i] = out[i] > 0 ? d[i] : 0   (ReLU backward in place, from the ReLU's output) */
static inline void em_vrelu_mask(float *d, const float *out, size_t n) {
    size_t i = 0;
#ifdef EM_SIMD_AVX2
    const __m256 z = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256 keep = _mm256_cmp_ps(_mm256_loadu_ps(out + i), z, _CMP_GT_OQ);
        _mm256_storeu_ps(d + i, _mm256_and_ps(keep, _mm256_loadu_ps(d + i)));
    }
#endif
    for (; i < n; i++) d[i] = out[i] > 0.f ? d[i] : 0.f;
}

#endif
