/*
 * gdpa.c - Kunlun's generalized dot-product attention (GDPA) on jagged sequences,
 * forward and backward; the API and the math are in ember/kunlun.h.
 *
 * GDPA replaces the softmax by an elementwise activation and has no normalisation, so
 * unlike Jagged Flash Attention (jattn.c) there is no running max and no rescaling:
 * every key tile's contribution is simply added.
 *
 * Forward. One unit = (sample, head, TQ-row query tile). Per key tile (TK rows; causal:
 * only tiles at or left of the diagonal):
 *   S = s Q_t K_j^T                  one cblas_sgemm into the worker's TQ x TK scratch
 *   A = act(S), masked entries 0     in place, fixed blocks of 8 (vectorised)
 *   O_t += scale_out A V_j           one cblas_sgemm with beta = 1 straight into O
 * Q/K/V/O are addressed in place with lda = H*dh: nothing is gathered or padded.
 *
 * Backward. One unit = (sample, head), which owns every dQ/dK/dV element of its head
 * and sample, so there are no write conflicts and the summation order is fixed. For
 * each query tile (outer) and each key tile it sees (inner), S is recomputed and
 *   A = act(S), G = act'(S)            (masked: both 0)
 *   dV_j += scale_out A^T dO_t;  dA = scale_out dO_t V_j^T;  dS = dA * G
 *   dQ_t += s dS K_j;  dK_j += s dS^T Q_t
 * with sgemm beta = 1 into the caller's buffers. Scratch: 3 TQ x TK tiles per worker.
 *
 * Activations are branch-free scalar formulas over blocks of 8 with a fixed trip count,
 * which GCC vectorises at -O2; exp is em__fexp (attn_util.h), a Cephes-style polynomial
 * (relative error ~2e-7) saturating at both ends, since activations see any argument. erf (GELU) uses Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7) in its
 * erfc form for negative arguments, so Phi(x) has no cancellation in the left tail;
 * tanh switches to its Taylor series below |x| = 0.125 for the same reason.
 *
 * Scheduling and determinism as jattn.c (the unit list and runner are shared in
 * attn_util.c): units sorted longest sample first, handed out by an atomic counter;
 * what a unit computes never depends on which worker runs it or on the thread count,
 * so outputs are bitwise identical for any pool.
 */
#include <math.h>

#include "core/blas.h"
#include "core/simd.h"
#include "ember/jagged.h"
#include "ember/kunlun.h"
#include "nn/attn_util.h"

#define TQ 128 /* query tile rows */
#define TK 128 /* key tile rows (== TQ: causal key tiles then start at or before i0) */

/* ---------------------------------------------------------- activations */

/* Each act_X(x, &d) returns act(x) and stores act'(x) in d. */
static inline float act_identity(float x, float *d) {
    *d = 1.f;
    return x;
}
static inline float act_relu(float x, float *d) {
    *d = x > 0.f ? 1.f : 0.f;
    return x > 0.f ? x : 0.f;
}
static inline float act_relu2(float x, float *d) {
    const float r = x > 0.f ? x : 0.f;
    *d = 2.f * r;
    return r * r;
}
static inline float act_silu(float x, float *d) {
    const float sg = 1.f / (1.f + em__fexp(-x));
    *d = sg * (1.f + x * (1.f - sg));
    return x * sg;
}
static inline float act_gelu(float x, float *d) {
    /* Phi(x) = 0.5 erfc(-x/sqrt2); erfc(y) ~ poly(t) exp(-y^2), t = 1/(1 + p y), y >= 0 */
    const float y = (x < 0.f ? -x : x) * 0.70710678118654752f;
    const float t = 1.f / (1.f + 0.3275911f * y);
    const float ey = em__fexp(-y * y);
    const float q = t * (0.254829592f +
                         t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f)))) *
                    ey;
    const float phi = x < 0.f ? 0.5f * q : 1.f - 0.5f * q;
    *d = phi + x * 0.39894228040143268f * ey; /* Phi + x phi, phi(x) = exp(-x^2/2)/sqrt(2 pi) */
    return x * phi;
}
static inline float act_tanh(float x, float *d) {
    const float ax = x < 0.f ? -x : x;
    const float e = em__fexp(-2.f * ax);
    const float big = (1.f - e) / (1.f + e);
    const float x2 = ax * ax;
    const float small = ax * (1.f + x2 * (-0.33333333333f + x2 * (0.13333333333f - x2 * 0.053968253968f)));
    const float ta = ax < 0.125f ? small : big;
    const float t = x < 0.f ? -ta : ta;
    *d = 1.f - t * t;
    return t;
}

/* s[c] = act(s[c]) for c < n and, when WANT_G, g[c] = act'(s[c]); then both are 0 for
 * c in [vis, n) (the causal mask). Blocks of 8 with a fixed trip count vectorise. */
#define DEF_ROW(NAME, F, WANT_G)                                                         \
    static void NAME(float *restrict s, float *restrict g, int n, int vis) {              \
        int c = 0;                                                                        \
        for (; c + 8 <= vis; c += 8)                                                      \
            for (int k = 0; k < 8; k++) {                                                 \
                float d;                                                                  \
                s[c + k] = F(s[c + k], &d);                                               \
                if (WANT_G) g[c + k] = d;                                                 \
            }                                                                             \
        for (; c < vis; c++) {                                                            \
            float d;                                                                      \
            s[c] = F(s[c], &d);                                                           \
            if (WANT_G) g[c] = d;                                                         \
        }                                                                                 \
        for (; c < n; c++) {                                                              \
            s[c] = 0.f;                                                                   \
            if (WANT_G) g[c] = 0.f;                                                       \
        }                                                                                 \
    }
#define DEF_ACT(X) DEF_ROW(row_##X, act_##X, 0) DEF_ROW(rowg_##X, act_##X, 1)
DEF_ACT(identity)
DEF_ACT(relu)
DEF_ACT(relu2)
DEF_ACT(silu)
DEF_ACT(gelu)
DEF_ACT(tanh)

typedef void (*row_fn)(float *restrict, float *restrict, int, int);
static const row_fn ROW_F[6] = {row_identity, row_relu, row_relu2, row_silu, row_gelu, row_tanh};
static const row_fn ROW_G[6] = {rowg_identity, rowg_relu, rowg_relu2, rowg_silu, rowg_gelu, rowg_tanh};

/* ------------------------------------------------------------- helpers */

em_status em_gdpa_check(const em_gdpa_cfg *c) {
    if (!c) return em_errorf(EM_ERR_INVALID, "gdpa: NULL config");
    em_status st = em_jattn_check(&c->attn);
    if (st) return st;
    if ((int)c->act < EM_GDPA_IDENTITY || (int)c->act > EM_GDPA_TANH)
        return em_errorf(EM_ERR_INVALID, "gdpa: unknown activation %d", (int)c->act);
    if (!isfinite(c->scale_out) || !isfinite(c->attn.scale))
        return em_errorf(EM_ERR_INVALID, "gdpa: non-finite scale");
    return EM_OK;
}

typedef em__attn_unit unit;

typedef struct {
    const em_jattn_cfg *c;
    float scale, scale_out;
    row_fn rowf, rowg;
    em__attn_sched s; /* scratch per worker: TQ x TK (forward) or 3 x TQ x TK (backward) */
    float *O, *dQ, *dK, *dV;
    const float *Q, *K, *V, *dO;
} job;

/* ------------------------------------------------------------- forward */

static void fwd_unit(const void *p, unit u, int ith) {
    const job *j = p;
    const em_jattn_cfg *c = j->c;
    const int dh = c->dh, ld = c->H * dh;
    const int64_t base = c->offsets[u.b];
    const int L = (int)(c->offsets[u.b + 1] - base);
    const int i0 = u.t * TQ, mq = L - i0 < TQ ? L - i0 : TQ;
    const size_t col = (size_t)u.h * dh;
    const float *Qt = j->Q + (size_t)(base + i0) * ld + col;
    float *Ot = j->O + (size_t)(base + i0) * ld + col;
    float *S = j->s.scratch + (size_t)ith * TQ * TK;
    for (int r = 0; r < mq; r++)
        for (int d = 0; d < dh; d++) Ot[(size_t)r * ld + d] = 0.f;
    const int nkeys = c->causal ? i0 + mq : L;
    for (int j0 = 0; j0 < nkeys; j0 += TK) {
        const int nk = nkeys - j0 < TK ? nkeys - j0 : TK;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mq, nk, dh, j->scale, Qt, ld,
                    j->K + (size_t)(base + j0) * ld + col, ld, 0.f, S, TK);
        for (int r = 0; r < mq; r++) {
            int vis = c->causal ? i0 + r - j0 + 1 : nk;
            vis = vis < 0 ? 0 : vis > nk ? nk : vis;
            j->rowf(S + (size_t)r * TK, NULL, nk, vis);
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mq, dh, nk, j->scale_out, S, TK,
                    j->V + (size_t)(base + j0) * ld + col, ld, 1.f, Ot, ld);
    }
}

/* Fill the scales of j from cfg. */
static void job_scales(job *j, const em_gdpa_cfg *cfg) {
    const em_jattn_cfg *c = &cfg->attn;
    j->c = c;
    j->scale = em__attn_scale(c);
    if (cfg->scale_out > 0.f) j->scale_out = cfg->scale_out;
    else {
        const int64_t mx = c->B ? em_jagged_max_len(c->offsets, c->B) : 0;
        j->scale_out = mx > 0 ? (float)(1.0 / (double)mx) : 1.f;
    }
    j->rowf = ROW_F[cfg->act];
    j->rowg = ROW_G[cfg->act];
}

em_status em_gdpa_forward(float *O, const float *Q, const float *K, const float *V,
                          const em_gdpa_cfg *cfg, em_pool *pool) {
    em_status st = em_gdpa_check(cfg);
    if (st) return st;
    job j = {.O = O, .Q = Q, .K = K, .V = V};
    job_scales(&j, cfg);
    return em__attn_run(&j.s, j.c, TQ, (size_t)TQ * TK, pool, fwd_unit, &j, "gdpa");
}

/* ------------------------------------------------------------ backward */

static void bwd_unit(const void *p, unit u, int ith) {
    const job *j = p;
    const em_jattn_cfg *c = j->c;
    const int dh = c->dh, ld = c->H * dh;
    const int64_t base = c->offsets[u.b];
    const int L = (int)(c->offsets[u.b + 1] - base);
    const size_t col = (size_t)u.h * dh;
    float *A = j->s.scratch + (size_t)ith * 3 * TQ * TK, *G = A + TQ * TK, *dA = G + TQ * TK;
    const int want_ds = j->dQ || j->dK;
#define ROW(ptr, i) ((ptr) + (size_t)(base + (i)) * ld + col)
    for (int i0 = 0; i0 < L; i0 += TQ) {
        const int mq = L - i0 < TQ ? L - i0 : TQ;
        const int nkeys = c->causal ? i0 + mq : L;
        for (int j0 = 0; j0 < nkeys; j0 += TK) {
            const int nk = nkeys - j0 < TK ? nkeys - j0 : TK;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mq, nk, dh, j->scale,
                        ROW(j->Q, i0), ld, ROW(j->K, j0), ld, 0.f, A, TK);
            for (int r = 0; r < mq; r++) {
                int vis = c->causal ? i0 + r - j0 + 1 : nk;
                vis = vis < 0 ? 0 : vis > nk ? nk : vis;
                j->rowg(A + (size_t)r * TK, G + (size_t)r * TK, nk, vis);
            }
            if (j->dV)
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, dh, mq, j->scale_out, A,
                            TK, ROW(j->dO, i0), ld, 1.f, ROW(j->dV, j0), ld);
            if (!want_ds) continue;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mq, nk, dh, j->scale_out,
                        ROW(j->dO, i0), ld, ROW(j->V, j0), ld, 0.f, dA, TK);
            for (int r = 0; r < mq; r++) {
                float *restrict g = dA + (size_t)r * TK;
                const float *restrict d = G + (size_t)r * TK;
                int cc = 0;
                for (; cc + 8 <= nk; cc += 8)
                    for (int k = 0; k < 8; k++) g[cc + k] *= d[cc + k];
                for (; cc < nk; cc++) g[cc] *= d[cc];
            }
            em__attn_dqdk(dA, TK, mq, nk, dh, j->scale, ROW(j->Q, i0), ROW(j->K, j0), ld,
                          j->dQ ? ROW(j->dQ, i0) : NULL, j->dK ? ROW(j->dK, j0) : NULL);
        }
    }
#undef ROW
}

em_status em_gdpa_backward(float *dQ, float *dK, float *dV, const float *dO, const float *Q,
                           const float *K, const float *V, const em_gdpa_cfg *cfg, em_pool *pool) {
    em_status st = em_gdpa_check(cfg);
    if (st) return st;
    if (!dQ && !dK && !dV) return EM_OK;
    job j = {.dQ = dQ, .dK = dK, .dV = dV, .dO = dO, .Q = Q, .K = K, .V = V};
    job_scales(&j, cfg);
    return em__attn_run(&j.s, j.c, 0, (size_t)3 * TQ * TK, pool, bwd_unit, &j, "gdpa");
}
