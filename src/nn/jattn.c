/*
 * jattn.c - Jagged Flash Attention (self and target attention) forward and backward on
 * jagged (values + offsets) sequences; the API and layout are in ember/jattn.h.
 *
 * Self-attention forward. One unit = (sample, head, TQ-row query tile). The unit walks
 * the key tiles (TK rows; causal: only those at or left of the diagonal) and per tile:
 *   S = scale * Q_t K_j^T          one cblas_sgemm into the worker's TQ x TK scratch
 *   online softmax per row         m' = max(m, rowmax S), alpha = exp(m - m'),
 *                                  P = exp(S - m'), l = alpha*l + rowsum P,
 *                                  O_t *= alpha (the output rows are the accumulator)
 *   O_t += P V_j                   one cblas_sgemm with beta = 1 straight into O
 * then O_t /= l and lse = m + log l. Q/K/V/O tiles are addressed in place with
 * lda = H*dh, so nothing is gathered or padded. Every row of every processed tile has
 * at least one visible key (key tiles start at multiples of TK <= the query tile's
 * start), so m is finite after the first tile and no row needs a special case.
 *
 * Self-attention backward (FlashAttention-2 recomputation). One unit = (sample, head):
 * for each key tile j (outer) and each query tile t it can see (inner):
 *   P  = exp(scale Q_t K_j^T - lse_t)    (masked entries exactly 0)
 *   dV_j += P^T dO_t;  dP = dO_t V_j^T;  dS = P * (dP - D_t), D_i = dO_i . O_i
 *   dQ_t += scale dS K_j;  dK_j += scale dS^T Q_t
 * all accumulated with sgemm beta = 1 directly into the caller's buffers. A unit owns
 * all dQ/dK/dV elements of its (sample, head), so there are no write conflicts and the
 * summation order is fixed. Why (sample, head) and not key tiles: splitting dQ's sum
 * over key tiles between workers would need either a second recomputation pass or a
 * reduction buffer; with units sorted longest-first the dynamic schedule balances
 * well as long as B*H is large compared with the thread count (the DLRM case).
 *
 * Tiles: TQ = TK = 128. Measured single-threaded at B=256, H=2, dh=32 (lognormal
 * lengths, mean 64, one of 1024): 64x64 tiles cost ~10% more (per-call sgemm packing
 * and the softmax bookkeeping per tile), 32x32 ~35% more; larger tiles only add masked
 * waste under causal. Scratch (one tile per worker forward, two backward) is one
 * em_malloc per call, next to the unit list.
 *
 * Scheduling. Units are listed longest sample first (a one-time sort of B lengths) and
 * handed out by an atomic counter: which worker runs a unit changes with timing, what
 * the unit computes never does, so outputs are bitwise independent of the thread count.
 *
 * exp. The softmax needs ~L^2 exponentials per head, as many as the FMAs of one small
 * matmul, so libm expf would dominate. em__exp_sub_row() (attn_util.h, shared with
 * gdpa.c and swa.c like the unit list and the scheduler) uses a Cephes-style polynomial
 * (relative error ~2e-7) in plain C over fixed blocks of 8, which GCC vectorises; inputs
 * below -87 (including the -inf of the mask) give exactly 0.
 *
 * Target attention (one query per sample and head) is a matrix-vector problem: it uses
 * em_vdot / em_vaxpy over key chunks of TK with the same online softmax; a unit is
 * (sample, head) and owns its o, lse, dq rows and its sample's dK/dV head columns.
 */
#include <math.h>

#include "core/blas.h"
#include "core/simd.h"
#include "ember/jattn.h"
#include "nn/attn_util.h"

#define TQ 128 /* query tile rows */
#define TK 128 /* key tile rows (a multiple of TQ: see the causal notes in the units) */

/* ------------------------------------------------------------------ helpers */

em_status em_jattn_check(const em_jattn_cfg *c) {
    if (!c) return em_errorf(EM_ERR_INVALID, "jattn: NULL config");
    if (c->B < 0 || c->H <= 0 || c->dh <= 0)
        return em_errorf(EM_ERR_INVALID, "jattn: bad dims B=%d H=%d dh=%d", c->B, c->H, c->dh);
    if (!c->offsets) return em_errorf(EM_ERR_INVALID, "jattn: NULL offsets");
    if (c->offsets[0] != 0)
        return em_errorf(EM_ERR_INVALID, "jattn: offsets[0] = %lld, expected 0",
                         (long long)c->offsets[0]);
    for (int b = 0; b < c->B; b++) {
        int64_t L = c->offsets[b + 1] - c->offsets[b];
        if (L < 0)
            return em_errorf(EM_ERR_INVALID, "jattn: offsets decrease at %d (%lld -> %lld)", b,
                             (long long)c->offsets[b], (long long)c->offsets[b + 1]);
        if (L > INT32_MAX / 2)
            return em_errorf(EM_ERR_INVALID, "jattn: sequence %d too long (%lld)", b, (long long)L);
    }
    return EM_OK;
}

typedef em__attn_unit unit;

typedef struct {
    em__attn_sched s; /* units (forward: per query tile; backward: per (sample, head));
                       * scratch per worker: TQ x TK (forward) or 2 x TQ x TK (backward) */
    const em_jattn_cfg *c;
    float scale;
    float *O, *lse, *dQ, *dK, *dV;
    const float *Q, *K, *V, *dO, *Oin, *lsein;
} job;

/* -------------------------------------------------------- self: forward */

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
    float *S = j->s.scratch + (size_t)ith * TQ * TK, m[TQ], l[TQ];
    for (int r = 0; r < mq; r++) {
        m[r] = -INFINITY, l[r] = 0.f;
        for (int d = 0; d < dh; d++) Ot[(size_t)r * ld + d] = 0.f;
    }
    const int nkeys = c->causal ? i0 + mq : L;
    for (int j0 = 0; j0 < nkeys; j0 += TK) { /* j0 <= i0: every row sees a key */
        const int nk = nkeys - j0 < TK ? nkeys - j0 : TK;
        const float *Kj = j->K + (size_t)(base + j0) * ld + col;
        const float *Vj = j->V + (size_t)(base + j0) * ld + col;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mq, nk, dh, j->scale, Qt, ld, Kj, ld,
                    0.f, S, TK);
        const int diag = c->causal && j0 + nk > i0;
        for (int r = 0; r < mq; r++) {
            float *s = S + (size_t)r * TK;
            if (diag)
                for (int cc = i0 + r - j0 + 1; cc < nk; cc++) s[cc] = -INFINITY;
            em__softmax_online_row(s, nk, &m[r], &l[r], Ot + (size_t)r * ld, dh);
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mq, dh, nk, 1.f, S, TK, Vj, ld, 1.f,
                    Ot, ld);
    }
    for (int r = 0; r < mq; r++) {
        em_vscale(Ot + (size_t)r * ld, 1.f / l[r], (size_t)dh);
        j->lse[(size_t)(base + i0 + r) * c->H + u.h] = m[r] + logf(l[r]);
    }
}

em_status em_jattn_forward(float *O, float *lse, const float *Q, const float *K, const float *V,
                           const em_jattn_cfg *cfg, em_pool *pool) {
    em_status st = em_jattn_check(cfg);
    if (st) return st;
    job j = {.c = cfg, .scale = em__attn_scale(cfg), .O = O, .lse = lse, .Q = Q, .K = K, .V = V};
    return em__attn_run(&j.s, cfg, TQ, (size_t)TQ * TK, pool, fwd_unit, &j, "jattn");
}

/* ------------------------------------------------------- self: backward */

static void bwd_unit(const void *p, unit u, int ith) {
    const job *j = p;
    const em_jattn_cfg *c = j->c;
    const int dh = c->dh, H = c->H, ld = H * dh;
    const int64_t base = c->offsets[u.b];
    const int L = (int)(c->offsets[u.b + 1] - base);
    const size_t col = (size_t)u.h * dh;
    const float scale = j->scale;
    float *P = j->s.scratch + (size_t)ith * 2 * TQ * TK, *dP = P + TQ * TK, D[TQ];
#define ROW(ptr, i) ((ptr) + (size_t)(base + (i)) * ld + col)
    for (int j0 = 0; j0 < L; j0 += TK) {
        const int nk = L - j0 < TK ? L - j0 : TK;
        /* causal: start at the query tile holding row j0 (= j0, TK being a multiple of
         * TQ), so every row sees at least key j0 */
        for (int i0 = c->causal ? j0 : 0; i0 < L; i0 += TQ) {
            const int mq = L - i0 < TQ ? L - i0 : TQ;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mq, nk, dh, scale, ROW(j->Q, i0),
                        ld, ROW(j->K, j0), ld, 0.f, P, TK);
            const int diag = c->causal && j0 + nk > i0;
            for (int r = 0; r < mq; r++) {
                float *s = P + (size_t)r * TK;
                if (diag)
                    for (int cc = i0 + r - j0 + 1; cc < nk; cc++) s[cc] = -INFINITY;
                em__exp_sub_row(s, nk, j->lsein[(size_t)(base + i0 + r) * H + u.h]);
                D[r] = em_vdot(ROW(j->dO, i0 + r), ROW(j->Oin, i0 + r), (size_t)dh);
            }
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, dh, mq, 1.f, P, TK,
                        ROW(j->dO, i0), ld, 1.f, ROW(j->dV, j0), ld);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mq, nk, dh, 1.f, ROW(j->dO, i0),
                        ld, ROW(j->V, j0), ld, 0.f, dP, TK);
            for (int r = 0; r < mq; r++)
                em__softmax_ds_row(P + (size_t)r * TK, dP + (size_t)r * TK, nk, D[r]);
            em__attn_dqdk(dP, TK, mq, nk, dh, scale, ROW(j->Q, i0), ROW(j->K, j0), ld,
                          ROW(j->dQ, i0), ROW(j->dK, j0));
        }
    }
#undef ROW
}

em_status em_jattn_backward(float *dQ, float *dK, float *dV, const float *dO, const float *Q,
                            const float *K, const float *V, const float *O, const float *lse,
                            const em_jattn_cfg *cfg, em_pool *pool) {
    em_status st = em_jattn_check(cfg);
    if (st) return st;
    job j = {.c = cfg, .scale = em__attn_scale(cfg), .dQ = dQ, .dK = dK, .dV = dV, .dO = dO,
             .Q = Q, .K = K, .V = V, .Oin = O, .lsein = lse};
    return em__attn_run(&j.s, cfg, 0, (size_t)2 * TQ * TK, pool, bwd_unit, &j, "jattn");
}

/* --------------------------------------------------------------- target */

static void tfwd_unit(const job *j, unit u) {
    const em_jattn_cfg *c = j->c;
    const int dh = c->dh, H = c->H, ld = H * dh;
    const int64_t base = c->offsets[u.b];
    const int L = (int)(c->offsets[u.b + 1] - base);
    const size_t col = (size_t)u.h * dh;
    const float *q = j->Q + (size_t)u.b * ld + col;
    float *o = j->O + (size_t)u.b * ld + col;
    for (int d = 0; d < dh; d++) o[d] = 0.f;
    float m = -INFINITY, l = 0.f, s[TK];
    for (int j0 = 0; j0 < L; j0 += TK) {
        const int nk = L - j0 < TK ? L - j0 : TK;
        const float *Kj = j->K + (size_t)(base + j0) * ld + col;
        const float *Vj = j->V + (size_t)(base + j0) * ld + col;
        float mx = m;
        for (int k = 0; k < nk; k++) {
            s[k] = j->scale * em_vdot(q, Kj + (size_t)k * ld, (size_t)dh);
            mx = s[k] > mx ? s[k] : mx;
        }
        const float alpha = expf(m - mx);
        l = l * alpha + em__exp_sub_row(s, nk, mx);
        m = mx;
        if (alpha != 1.f) em_vscale(o, alpha, (size_t)dh);
        for (int k = 0; k < nk; k++) em_vaxpy(o, s[k], Vj + (size_t)k * ld, (size_t)dh);
    }
    if (L > 0) em_vscale(o, 1.f / l, (size_t)dh);
    j->lse[(size_t)u.b * H + u.h] = L > 0 ? m + logf(l) : -INFINITY;
}

static void tfwd_task(void *p, int ith, int nth) {
    job *j = p;
    size_t k;
    while (em__attn_take(&j->s, &k))
        tfwd_unit(j, (unit){(int32_t)(k / j->c->H), (int32_t)(k % j->c->H), 0});
}

em_status em_jattn_target_forward(float *o, float *lse, const float *q, const float *K,
                                  const float *V, const em_jattn_cfg *cfg, em_pool *pool) {
    em_status st = em_jattn_check(cfg);
    if (st) return st;
    job j = {.c = cfg, .scale = em__attn_scale(cfg), .O = o, .lse = lse, .Q = q, .K = K, .V = V};
    j.s.n_units = (size_t)cfg->B * cfg->H; /* unit k = (k / H, k % H): no list needed */
    if (cfg->B) em__attn_go(&j.s, pool, tfwd_task, &j);
    return EM_OK;
}

static void tbwd_unit(const job *j, unit u) {
    const em_jattn_cfg *c = j->c;
    const int dh = c->dh, H = c->H, ld = H * dh;
    const int64_t base = c->offsets[u.b];
    const int L = (int)(c->offsets[u.b + 1] - base);
    const size_t col = (size_t)u.h * dh;
    const float *q = j->Q + (size_t)u.b * ld + col, *go = j->dO + (size_t)u.b * ld + col;
    const float *o = j->Oin + (size_t)u.b * ld + col;
    float *dq = j->dQ + (size_t)u.b * ld + col;
    const float lse = j->lsein[(size_t)u.b * H + u.h];
    const float D = em_vdot(go, o, (size_t)dh);
    float s[TK];
    for (int j0 = 0; j0 < L; j0 += TK) {
        const int nk = L - j0 < TK ? L - j0 : TK;
        const size_t r0 = (size_t)(base + j0) * ld + col;
        for (int k = 0; k < nk; k++) s[k] = j->scale * em_vdot(q, j->K + r0 + (size_t)k * ld, (size_t)dh);
        em__exp_sub_row(s, nk, lse);
        for (int k = 0; k < nk; k++) {
            const size_t r = r0 + (size_t)k * ld;
            em_vaxpy(j->dV + r, s[k], go, (size_t)dh);
            const float ds = j->scale * s[k] * (em_vdot(go, j->V + r, (size_t)dh) - D);
            em_vaxpy(dq, ds, j->K + r, (size_t)dh);
            em_vaxpy(j->dK + r, ds, q, (size_t)dh);
        }
    }
}

static void tbwd_task(void *p, int ith, int nth) {
    job *j = p;
    size_t k;
    while (em__attn_take(&j->s, &k))
        tbwd_unit(j, (unit){(int32_t)(k / j->c->H), (int32_t)(k % j->c->H), 0});
}

em_status em_jattn_target_backward(float *dq, float *dK, float *dV, const float *do_,
                                   const float *q, const float *K, const float *V,
                                   const float *o, const float *lse, const em_jattn_cfg *cfg,
                                   em_pool *pool) {
    em_status st = em_jattn_check(cfg);
    if (st) return st;
    job j = {.c = cfg, .scale = em__attn_scale(cfg), .dQ = dq, .dK = dK, .dV = dV, .dO = do_,
             .Q = q, .K = K, .V = V, .Oin = o, .lsein = lse};
    j.s.n_units = (size_t)cfg->B * cfg->H;
    if (cfg->B) em__attn_go(&j.s, pool, tbwd_task, &j);
    return EM_OK;
}
