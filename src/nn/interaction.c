/*
 * interaction.c - DLRM's dot interaction: per example, the pairwise dot products of the
 * F+1 vectors T = [bottom, emb_0 .. emb_{F-1}] (each of size D), strictly-lower
 * triangle in torch.tril_indices order, appended to the bottom vector.
 *
 * Layout of one output row (width D + F(F+1)/2):
 *   [0, D)                     the bottom vector, copied
 *   D + i(i-1)/2 + j, j < i    Z_ij = T_i . T_j   for i = 1..F
 *
 * Forward (em_dot_interact_rows, also em_infer's). D = 16 on AVX-512 (F <= 31): per
 * example the Gram rows of the embeddings against [bottom, embeddings] as one small
 * register-blocked product (the right operand: the vectors transposed into a 16 x 32
 * panel with two 16x16 register transposes), each Z_ij an FMA chain over d = 0..15,
 * row i stored straight into its place in the triangle. Otherwise, as before this
 * path existed: one em_vdot (simd.h: two 8-lane FMA chains and a horizontal sum) per pair.
 * Measured per example at B=128 (in cache), one thread, F=26: 0.61 us for D=16 and
 * 1.1 us for D=64. Rejected after measuring: transposing T into a D x (F+1) scratch
 * and building the Gram matrix 4 rows x 16 columns at a time from register tiles
 * (0.71 / 1.9 us: the scalar transpose and the tiles straddling the diagonal cost more
 * than the horizontal sums they save), a per-example cblas_sgemm of T T^T (0.73 /
 * 1.27 us) and cblas_ssyrk (0.95 / 2.4 us); call overhead dominates at this size.
 *
 * Backward. dT = S @ T where S is the symmetric (F+1)x(F+1) matrix holding dZ_ij at
 * (i,j) and (j,i) and 0 on the diagonal, built per example on the stack. dT is made of
 * 4-row x 16-column register tiles (8 ymm accumulators, j = 0..F ascending), each
 * added once into dbot / demb; the bottom vector's gradient also receives dout[:, :D].
 * 0.49 us per example for D=16 (B=128, one thread), against 1.0 us for one axpy per
 * (i, j) pair. D not a multiple of 16 takes a plain loop for the remainder columns.
 *
 * Both directions split the batch over the pool; every example is computed by one
 * worker in a fixed order, so results do not depend on the thread count. Per-example
 * row pointers live in stack arrays of F+1 entries (fine for any realistic F).
 */
#include <string.h>

#include "core/simd.h"
#include "ember/nn.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* Largest backward S matrix kept on the stack (floats): 64 KiB. */
#define S_MAX 16384

typedef struct {
    float *out;
    float *dbot, *demb;
    const float *dout, *bot, *emb;
    int B, F, D;
    int set; /* backward: overwrite dbot / demb instead of adding */
} inter_arg;

static inline const float *row_of(const float *bot, const float *emb, int b, int F, int D, int i) {
    return i == 0 ? bot + (size_t)b * D : emb + ((size_t)b * F + (size_t)(i - 1)) * D;
}

/* ------------------------------------------------------------------ forward */

#define GMR 12 /* Gram rows per register block */

#if defined(__AVX512F__)
/* 16x16 transpose of r[0..16) in place (rows of 16 floats). */
static inline void tr16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
#define EM_LO(x, y) _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(x), _mm512_castps_pd(y)))
#define EM_HI(x, y) _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(x), _mm512_castps_pd(y)))
    for (int i = 0; i < 16; i += 4) {
        r[i] = EM_LO(t[i], t[i + 2]), r[i + 1] = EM_HI(t[i], t[i + 2]);
        r[i + 2] = EM_LO(t[i + 1], t[i + 3]), r[i + 3] = EM_HI(t[i + 1], t[i + 3]);
    }
#undef EM_LO
#undef EM_HI
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
    }
}
#endif

#if defined(__AVX512F__)
/* Rows i = i0 .. i0 + mr - 1 of the strict lower triangle for D = 16: Z_ij = e[i-1] .
 * T_j for j < i (e: the pooled vectors, 16 floats apart; P: the transposed T_0..T_31,
 * 16 x 32, zero beyond T), each an FMA chain over d = 0..15 from zero, as kern's with a
 * zero bias; row i stored at z + i (i - 1) / 2, its i entries only (masked). NV = 1
 * (rows up to i = 16) computes the first 16 columns only. */
static inline __attribute__((always_inline)) void gram_rows(const int mr, const int NV, const float *e, const float *P,
                                                            float *z, int i0) {
    __m512 acc[GMR][2];
#pragma GCC unroll 12
    for (int r = 0; r < mr; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int k = 0; k < 16; k++) {
        const __m512 w0 = _mm512_load_ps(P + 32 * k), w1 = NV > 1 ? _mm512_load_ps(P + 32 * k + 16) : w0;
#pragma GCC unroll 12
        for (int r = 0; r < mr; r++) {
            const __m512 a = _mm512_set1_ps(e[16 * r + k]);
            acc[r][0] = _mm512_fmadd_ps(a, w0, acc[r][0]);
            if (NV > 1) acc[r][1] = _mm512_fmadd_ps(a, w1, acc[r][1]);
        }
    }
#pragma GCC unroll 12
    for (int r = 0; r < mr; r++) {
        const int i = i0 + r;
        float *zi = z + (size_t)i * (i - 1) / 2;
        _mm512_mask_storeu_ps(zi, i >= 16 ? 0xffff : (__mmask16)((1u << i) - 1), acc[r][0]);
        if (NV > 1 && i > 16) _mm512_mask_storeu_ps(zi + 16, (__mmask16)((1u << (i - 16)) - 1), acc[r][1]);
    }
}
#define EM_GRAM(mr, nv) \
    static void gram_##mr##_##nv(const float *e, const float *P, float *z, int i0) { gram_rows(mr, nv, e, P, z, i0); }
EM_GRAM(12, 1)
EM_GRAM(4, 1)
EM_GRAM(1, 1)
EM_GRAM(12, 2)
EM_GRAM(8, 2)
EM_GRAM(4, 2)
EM_GRAM(2, 2)
EM_GRAM(1, 2)
#undef EM_GRAM
#endif

/* out row = [bot (D), Z_ij = T_i . T_j for i = 1..T, j < i], T_0 = bot, T_i = emb[i-1].
 * D = 16 (AVX-512, T <= 31): per example the Gram rows of emb against [bot, emb] as one
 * small register-blocked product (gram_rows; the 16 x 32 right operand is the
 * transposed vectors), each row stored straight into its part of the strict lower
 * triangle; each Z_ij is an FMA chain over d = 0..15. Otherwise one em_vdot per pair. */
void em_dot_interact_rows(float *out, int ldo, const float *bot, int ldb, const float *emb, int T, int D, int M) {
#if defined(__AVX512F__)
    if (D == 16 && T <= 31) {
        float P[16 * 32] __attribute__((aligned(64)));
        for (int r = 0; r < M; r++) {
            const float *e = emb + (size_t)r * T * 16, *v0 = bot + (size_t)r * ldb;
            float *o = out + (size_t)r * ldo, *z = o + 16;
            __m512 a[16], b[16];
            a[0] = _mm512_loadu_ps(v0);
            for (int i = 1; i < 16; i++) a[i] = i <= T ? _mm512_loadu_ps(e + (size_t)(i - 1) * 16) : _mm512_setzero_ps();
            for (int i = 0; i < 16; i++) b[i] = 16 + i <= T ? _mm512_loadu_ps(e + (size_t)(15 + i) * 16) : _mm512_setzero_ps();
            tr16(a), tr16(b);
            for (int k = 0; k < 16; k++) _mm512_store_ps(P + 32 * k, a[k]), _mm512_store_ps(P + 32 * k + 16, b[k]);
            _mm512_storeu_ps(o, _mm512_loadu_ps(v0));
            /* Z row i (1..T): emb[i-1] . T_j for j < i, stored at z + i (i - 1) / 2; rows
             * i <= 16 (e rows r0 < 16) need the first 16 columns only */
            int r0 = 0;
            const int h = T < 16 ? T : 16;
            for (; r0 + GMR <= h; r0 += GMR) gram_12_1(e + (size_t)r0 * 16, P, z, r0 + 1);
            for (; r0 + 4 <= h; r0 += 4) gram_4_1(e + (size_t)r0 * 16, P, z, r0 + 1);
            for (; r0 < h; r0++) gram_1_1(e + (size_t)r0 * 16, P, z, r0 + 1);
            for (; r0 + GMR <= T; r0 += GMR) gram_12_2(e + (size_t)r0 * 16, P, z, r0 + 1);
            for (; r0 + 8 <= T; r0 += 8) gram_8_2(e + (size_t)r0 * 16, P, z, r0 + 1);
            for (; r0 + 4 <= T; r0 += 4) gram_4_2(e + (size_t)r0 * 16, P, z, r0 + 1);
            for (; r0 + 2 <= T; r0 += 2) gram_2_2(e + (size_t)r0 * 16, P, z, r0 + 1);
            for (; r0 < T; r0++) gram_1_2(e + (size_t)r0 * 16, P, z, r0 + 1);
        }
        return;
    }
#endif
    const float *V[T + 1];
    for (int r = 0; r < M; r++) {
        float *o = out + (size_t)r * ldo, *z = o + D;
        V[0] = bot + (size_t)r * ldb;
        for (int t = 0; t < T; t++) V[t + 1] = emb + ((size_t)r * T + t) * D;
        memcpy(o, V[0], (size_t)D * sizeof(float));
        for (int i = 1; i <= T; i++)
            for (int j = 0; j < i; j++) *z++ = em_vdot(V[i], V[j], (size_t)D);
    }
}


static void fwd_task(void *p, int ith, int nth) {
    const inter_arg *a = p;
    const int F = a->F, D = a->D;
    const size_t width = (size_t)em_dot_interact_out_dim(F, D);
    size_t lo, hi;
    em_split((size_t)a->B, ith, nth, &lo, &hi);
    if (hi > lo)
        em_dot_interact_rows(a->out + lo * width, (int)width, a->bot + lo * (size_t)D, D, a->emb + lo * (size_t)F * D, F, D,
                             (int)(hi - lo));
}

void em_dot_interact_forward(float *out, const float *bot, const float *emb, int B, int F, int D,
                             em_pool *pool) {
    if (B <= 0 || F < 0 || D <= 0) return;
    inter_arg a = {.out = out, .bot = bot, .emb = emb, .B = B, .F = F, .D = D};
    em_pool_run(pool, fwd_task, &a);
}

/* ----------------------------------------------------------------- backward */

/* Without S: g[0..m) = sum_j S_ij T_j[d0 .. d0+m), j ascending, S_ii = 0 as in the
 * tiled path so that both treat non-finite inputs alike. */
static void grad_row_plain(float *restrict g, const float *restrict dz, const float *const *T, int n,
                           int i, int d0, int m) {
    for (int k = 0; k < m; k++) g[k] = 0.f;
    for (int j = 0; j < n; j++) {
        const float s = j == i ? 0.f
                        : j < i ? dz[(size_t)i * (i - 1) / 2 + j]
                                : dz[(size_t)j * (j - 1) / 2 + i];
        const float *restrict tj = T[j] + d0;
        for (int k = 0; k < m; k++) g[k] += s * tj[k];
    }
}

/* Fill S (n4 x n, n4 = n rounded up to 4): the symmetric matrix with dZ_ij at (i,j) and
 * (j,i), zeros on the diagonal and in the padding rows. */
static void build_s(float *restrict S, const float *restrict dz, int n, int n4) {
    for (int i = 0; i < n; i++) {
        S[(size_t)i * n + i] = 0.f;
        const float *restrict zi = dz + (size_t)i * (i - 1) / 2;
        for (int j = 0; j < i; j++) S[(size_t)i * n + j] = S[(size_t)j * n + i] = zi[j];
    }
    for (size_t k = (size_t)n * n; k < (size_t)n4 * n; k++) S[k] = 0.f;
}

/* g_r[0..16) = sum_j S[i0+r][j] T_j[d0 .. d0+16) for r < 4, j = 0..n-1 ascending:
 * 8 register accumulators, 2 loads and 4 broadcasts per j. The diagonal term is an
 * exact 0 * T_i, kept rather than branched around (as in torch, it turns an inf in
 * T_i into a NaN gradient). */
static void grad_tile16(float g[4][16], const float *restrict S, const float *const *T, int n, int i0,
                        int d0) {
    float a00[8] = {0}, a01[8] = {0}, a10[8] = {0}, a11[8] = {0};
    float a20[8] = {0}, a21[8] = {0}, a30[8] = {0}, a31[8] = {0};
    const float *restrict s0 = S + (size_t)i0 * n, *restrict s1 = s0 + n, *restrict s2 = s1 + n,
                          *restrict s3 = s2 + n;
    for (int j = 0; j < n; j++) {
        const float *restrict t = T[j] + d0;
        const float c0 = s0[j], c1 = s1[j], c2 = s2[j], c3 = s3[j];
        for (int k = 0; k < 8; k++) {
            a00[k] += c0 * t[k], a01[k] += c0 * t[k + 8];
            a10[k] += c1 * t[k], a11[k] += c1 * t[k + 8];
            a20[k] += c2 * t[k], a21[k] += c2 * t[k + 8];
            a30[k] += c3 * t[k], a31[k] += c3 * t[k + 8];
        }
    }
    for (int k = 0; k < 8; k++) {
        g[0][k] = a00[k], g[0][k + 8] = a01[k];
        g[1][k] = a10[k], g[1][k + 8] = a11[k];
        g[2][k] = a20[k], g[2][k + 8] = a21[k];
        g[3][k] = a30[k], g[3][k + 8] = a31[k];
    }
}

/* dst[0..m) += g[0..m) (+ dob[0..m) for the bottom vector, whose output copy also
 * feeds back). */
static void add_grad(float *restrict dst, const float *restrict g, const float *restrict dob, int m, int set) {
    if (set && dob)
        for (int k = 0; k < m; k++) dst[k] = dob[k] + g[k];
    else if (set)
        for (int k = 0; k < m; k++) dst[k] = g[k];
    else if (dob)
        for (int k = 0; k < m; k++) dst[k] += dob[k] + g[k];
    else
        for (int k = 0; k < m; k++) dst[k] += g[k];
}

#if defined(__AVX512F__)
/* D = 16: rows i0 .. i0 + R - 1 of dT = S T, each one zmm accumulated over j = 0..n-1
 * ascending (one FMA per j, the diagonal's exact 0 * T_i kept), then written or added
 * into dst (the bottom vector's also receiving dob). R is a constant after inlining. */
static inline __attribute__((always_inline)) void grad_rows16(const int R, const float *restrict S, const float *const *T,
                                                              int n, int i0, float *const *dst, const float *dob,
                                                              int set) {
    __m512 acc[9];
#pragma GCC unroll 9
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int j = 0; j < n; j++) {
        const __m512 t = _mm512_loadu_ps(T[j]);
#pragma GCC unroll 9
        for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(S[(size_t)(i0 + r) * n + j]), t, acc[r]);
    }
#pragma GCC unroll 9
    for (int r = 0; r < R; r++) {
        float *d = dst[i0 + r];
        if (!d) continue;
        __m512 v = acc[r];
        if (i0 + r == 0) v = _mm512_add_ps(_mm512_loadu_ps(dob), v);
        if (!set) v = _mm512_add_ps(_mm512_loadu_ps(d), v);
        _mm512_storeu_ps(d, v);
    }
}
static void grad_rows16_9(const float *S, const float *const *T, int n, int i0, float *const *dst, const float *dob, int set) {
    grad_rows16(9, S, T, n, i0, dst, dob, set);
}
static void grad_rows16_1(const float *S, const float *const *T, int n, int i0, float *const *dst, const float *dob, int set) {
    grad_rows16(1, S, T, n, i0, dst, dob, set);
}
#endif

static void bwd_task(void *p, int ith, int nth) {
    const inter_arg *a = p;
    const int F = a->F, D = a->D, n = F + 1, n4 = (n + 3) / 4 * 4;
    const size_t width = (size_t)em_dot_interact_out_dim(F, D);
    const int use_s = (size_t)n4 * (size_t)n <= S_MAX;
    float S[use_s ? (size_t)n4 * n : 1];
    const float *T[n];
    size_t lo, hi;
    em_split((size_t)a->B, ith, nth, &lo, &hi);
    for (size_t b = lo; b < hi; b++) {
        for (int i = 0; i < n; i++) T[i] = row_of(a->bot, a->emb, (int)b, F, D, i);
        const float *dob = a->dout + b * width, *dz = dob + D;
        float *dst[n4];
        for (int i = 0; i < n4; i++)
            dst[i] = i >= n ? NULL
                     : i == 0 ? (a->dbot ? a->dbot + b * D : NULL)
                              : (a->demb ? a->demb + (b * F + (size_t)(i - 1)) * D : NULL);
        int d0 = 0;
#if defined(__AVX512F__)
        if (use_s && D == 16) {
            build_s(S, dz, n, n4);
            int i0 = 0;
            for (; i0 + 9 <= n; i0 += 9) grad_rows16_9(S, T, n, i0, dst, dob, a->set);
            for (; i0 < n; i0++) grad_rows16_1(S, T, n, i0, dst, dob, a->set);
            d0 = 16;
        }
#endif
        if (use_s && D >= 16 && d0 == 0) {
            build_s(S, dz, n, n4);
            for (; d0 + 16 <= D; d0 += 16)
                for (int i0 = 0; i0 < n; i0 += 4) {
                    float g[4][16];
                    grad_tile16(g, S, T, n, i0, d0);
                    for (int r = 0; r < 4; r++)
                        if (dst[i0 + r]) add_grad(dst[i0 + r] + d0, g[r], i0 + r == 0 ? dob + d0 : NULL, 16, a->set);
                }
        }
        for (; d0 < D; d0 += 16) { /* D not a multiple of 16, or S too large for the stack */
            const int m = D - d0 < 16 ? D - d0 : 16;
            for (int i = 0; i < n; i++) {
                if (!dst[i]) continue;
                float g[16];
                grad_row_plain(g, dz, T, n, i, d0, m);
                add_grad(dst[i] + d0, g, i == 0 ? dob + d0 : NULL, m, a->set);
            }
        }
    }
}

static void interact_backward(float *dbot, float *demb, const float *dout, const float *bot, const float *emb, int B,
                              int F, int D, int set, em_pool *pool) {
    if (B <= 0 || F < 0 || D <= 0 || (!dbot && !demb)) return;
    inter_arg a = {.dbot = dbot, .demb = demb, .dout = dout, .bot = bot, .emb = emb, .B = B, .F = F, .D = D, .set = set};
    em_pool_run(pool, bwd_task, &a);
}

void em_dot_interact_backward(float *dbot, float *demb, const float *dout, const float *bot,
                              const float *emb, int B, int F, int D, em_pool *pool) {
    interact_backward(dbot, demb, dout, bot, emb, B, F, D, 0, pool);
}

void em_dot_interact_backward_set(float *dbot, float *demb, const float *dout, const float *bot, const float *emb, int B,
                                  int F, int D, em_pool *pool) {
    interact_backward(dbot, demb, dout, bot, emb, B, F, D, 1, pool);
}
