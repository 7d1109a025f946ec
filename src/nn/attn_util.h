/*
 * attn_util.h - private helpers shared by the jagged attention kernels (jattn.c,
 * gdpa.c, swa.c): the polynomial exp, the softmax row primitives, the (sample, head
 * [, query tile]) work-unit list and the atomic-counter scheduler that hands units out.
 * Not part of the public API (include/ember/ stays untouched); names carry em__.
 *
 * Design choices:
 *   - The per-element helpers are static inline here so that each kernel compiles them
 *     into its own loops exactly as when it carried a private copy (GCC vectorises the
 *     fixed-trip-count blocks of 8 only once inlined); the cold pieces (unit list, run
 *     with scratch) live in attn_util.c.
 *   - One exp polynomial, em__exp_poly(), with the clamping left to its callers: the
 *     softmax kernels subtract a row max or an lse, so their arguments are <= ~0 and
 *     only the underflow side is clamped (em__exp8_sub), while GDPA's activations see
 *     arbitrary arguments and also saturate above 88 (em__fexp). Folding both into one
 *     clamp would change results for out-of-contract lse inputs and add an instruction
 *     to the hottest loop, so the two callers stay distinct.
 *   - Determinism: every helper sums in a fixed order (8 lanes, then a fixed fold); the
 *     scheduler only decides which worker runs a unit, never what the unit computes.
 */
#ifndef EMBER_NN_ATTN_UTIL_H
#define EMBER_NN_ATTN_UTIL_H

#include <math.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "core/blas.h"
#include "core/simd.h"
#include "ember/core.h"
#include "ember/jattn.h"

/* ------------------------------------------------------------------ exp */

/* The polynomial part of exp(v) for v already clamped to [-87, 88]: returns p with
 * exp(v) = p * *pow2, *pow2 = 2^round(v / ln 2) built in the exponent bits. Cephes-
 * style (relative error ~2e-7), round-to-nearest by the 1.5*2^23 trick, no branches or
 * calls, so loops over it vectorise at -O2. The final product is left to the callers
 * on purpose: with it inside this function GCC contracts the callers' arithmetic into
 * FMAs differently and GDPA's SiLU gradient changes in the last bit. */
static inline float em__exp_poly(float v, float *pow2) {
    const float n = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float z = v - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * z + 1.3981999507e-3f;
    p = p * z + 8.3334519073e-3f;
    p = p * z + 4.1665795894e-2f;
    p = p * z + 1.6666665459e-1f;
    p = p * z + 5.0000001201e-1f;
    p = p * z * z + z + 1.0f;
    union { float f; int32_t i; } e;
    e.i = ((int32_t)n + 127) * (1 << 23);
    *pow2 = e.f;
    return p;
}

/* exp(a), a in any range: below -87 (and NaN) gives 0, above 88 saturates at exp(88). */
static inline float em__fexp(float a) {
    const float v = a > -87.0f ? (a < 88.0f ? a : 88.0f) : -87.0f;
    float e;
    const float p = em__exp_poly(v, &e);
    return a > -87.0f ? p * e : 0.f;
}

/* x[k] = exp(x[k] - sub), k < 8, and part[k] += the result. Arguments below -87 (the
 * mask's -inf included) give exactly 0; callers subtract a row max or the lse, so
 * arguments are <= ~0 and there is no overflow clamp (em__fexp's would cost an
 * instruction in the hottest loop and change results for out-of-contract lse). */
static inline void em__exp8_sub(float *restrict x, float sub, float *restrict part) {
    for (int k = 0; k < 8; k++) {
        const float a = x[k] - sub;
        float e;
        const float p = em__exp_poly(a > -87.0f ? a : -87.0f, &e);
        const float y = a > -87.0f ? p * e : 0.f;
        x[k] = y;
        part[k] += y;
    }
}

/* row[c] = exp(row[c] - sub) for c < n (masked -inf -> 0); returns the sum in a fixed
 * order (8 partial sums, then a fixed fold). */
static inline float em__exp_sub_row(float *row, int n, float sub) {
    float part[8] = {0};
    int c = 0;
    for (; c + 8 <= n; c += 8) em__exp8_sub(row + c, sub, part);
    if (c < n) {
        float tmp[8];
        const int m = n - c;
        for (int k = 0; k < 8; k++) tmp[k] = k < m ? row[c + k] : -INFINITY;
        em__exp8_sub(tmp, sub, part);
        for (int k = 0; k < m; k++) row[c + k] = tmp[k];
    }
    return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

/* max(init, row[0..n)), 8 lanes then a fixed fold (a plain running max does not
 * vectorise without -ffast-math). */
static inline float em__row_max(const float *row, int n, float init) {
    float mx[8];
    for (int k = 0; k < 8; k++) mx[k] = init;
    int c = 0;
    for (; c + 8 <= n; c += 8)
        for (int k = 0; k < 8; k++) mx[k] = row[c + k] > mx[k] ? row[c + k] : mx[k];
    for (int k = 0; c + k < n; k++) mx[k] = row[c + k] > mx[k] ? row[c + k] : mx[k];
    for (int k = 1; k < 8; k++) mx[0] = mx[k] > mx[0] ? mx[k] : mx[0];
    return mx[0];
}

/* One online-softmax step (FlashAttention) for a query row: s[0..n) are this key
 * chunk's scores (masked ones -inf, at least one finite), *m and *l the row's running
 * max and sum, o[0..dh) its output accumulator. Afterwards s holds exp(s - m'), and
 *   m' = max(m, max s),  alpha = exp(m - m'),  l = alpha l + sum s,  o *= alpha
 * (alpha is 0 on the first chunk, where m = -inf; o is skipped when alpha is 1). */
static inline void em__softmax_online_row(float *s, int n, float *m, float *l, float *o,
                                          int dh) {
    const float mx = em__row_max(s, n, *m);
    const float alpha = expf(*m - mx);
    const float sum = em__exp_sub_row(s, n, mx);
    *l = *l * alpha + sum;
    *m = mx;
    if (alpha != 1.f) em_vscale(o, alpha, (size_t)dh);
}

/* Softmax backward on one row: g[c] = p[c] * (g[c] - D), c < n (dS = P * (dP - D)).
 * Blocks of 8 with a fixed trip count vectorise at -O2. */
static inline void em__softmax_ds_row(const float *restrict p, float *restrict g, int n, float D) {
    int c = 0;
    for (; c + 8 <= n; c += 8)
        for (int k = 0; k < 8; k++) g[c + k] = p[c + k] * (g[c + k] - D);
    for (; c < n; c++) g[c] = p[c] * (g[c] - D);
}

/* The last step of every kernel's tile backward, from the score gradient dS (mq x nk,
 * row stride lds) of query rows Q_t and key rows K_j (row stride ld, dh wide):
 *   dQ_t += s dS K_j;  dK_j += s dS^T Q_t
 * accumulated by sgemm with beta = 1; a NULL dQ_t or dK_j is skipped (not wanted). */
static inline void em__attn_dqdk(const float *dS, int lds, int mq, int nk, int dh, float s,
                                 const float *Q_t, const float *K_j, int ld, float *dQ_t,
                                 float *dK_j) {
    if (dQ_t)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mq, dh, nk, s, dS, lds, K_j, ld,
                    1.f, dQ_t, ld);
    if (dK_j)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, dh, mq, s, dS, lds, Q_t, ld, 1.f,
                    dK_j, ld);
}

/* The score scale s: cfg's when > 0, else 1/sqrt(dh). */
static inline float em__attn_scale(const em_jattn_cfg *c) {
    return c->scale > 0.f ? c->scale : 1.f / sqrtf((float)c->dh);
}

/* ------------------------------------------------------- units, schedule */

/* One work unit: sample b, head h, query tile t (0 for per-(sample, head) units). */
typedef struct {
    int32_t b, h, t;
} em__attn_unit;

/* Scheduler state; each kernel's job struct embeds one. Workers pull unit indices
 * from `next` until n_units; scratch holds the per-worker tiles (NULL when none). */
typedef struct {
    const em__attn_unit *units;
    size_t n_units;
    atomic_size_t next;
    float *scratch;
} em__attn_sched;

/* Next unit index for the calling worker into *k; 0 once all are handed out. */
static inline int em__attn_take(em__attn_sched *s, size_t *k) {
    return (*k = atomic_fetch_add(&s->next, 1)) < s->n_units;
}

/* Runs fn(job, ith, nth) on every worker with the counter of s reset. */
static inline void em__attn_go(em__attn_sched *s, em_pool *pool, em_task_fn fn, void *job) {
    atomic_init(&s->next, 0);
    em_pool_run(pool, fn, job);
}

/* Unit list into *out (em_malloc'd, NULL when empty; *n units), samples longest first
 * (ties by index), then per sample its query tiles highest first (under a causal mask
 * those cost most), then heads. tq > 0: one unit per (sample, tq-row query tile, head);
 * tq == 0: one per (sample, head) of a non-empty sample. `who` prefixes error details.
 * Allocates the sort keys, then the list (EM_ERR_NOMEM on either). */
em_status em__attn_units(em__attn_unit **out, size_t *n, const em_jattn_cfg *c, int tq,
                         const char *who);

/* Runs unit u of a kernel: job is the kernel's job, ith the calling worker (for its
 * scratch). Must touch only the outputs owned by u. */
typedef void (*em__attn_unit_fn)(const void *job, em__attn_unit u, int ith);

/* Lists units as em__attn_units(c, tq), allocates scratch_floats per pool worker into
 * s->scratch (nothing when 0), calls em_blas_init() and has the pool's workers pull
 * units from the atomic counter of s and run fn(job, unit, ith) on each (s lives inside
 * job, so units find the scratch there); frees the list and scratch. With no units fn
 * never runs. EM_ERR_NOMEM (detail prefixed by `who`) when an allocation fails; nothing
 * leaks. Which worker runs a unit depends on timing, what it computes does not. */
em_status em__attn_run(em__attn_sched *s, const em_jattn_cfg *c, int tq, size_t scratch_floats,
                       em_pool *pool, em__attn_unit_fn fn, const void *job, const char *who);

#endif
