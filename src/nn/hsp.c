/*
 * hsp.c - Kunlun's hierarchical seed pooling: seed attention (m shared seed queries
 * over each jagged sequence) and sum-of-Kronecker compression, forward and backward.
 * The API and the math are in ember/hsp.h.
 *
 * Seed attention is Jagged Flash Attention (jattn.c) whose queries are the same m
 * seeds for every sample, so it shares jattn's machinery through attn_util.h: the
 * (sample, head) unit list sorted longest sample first, the atomic-counter runner with
 * per-worker tile scratch, the online softmax rows and the dQ/dK sgemm step.
 *   Forward, unit = (sample, head): per 128-seed tile, per 128-key tile
 *     S = s Sq_t K_j^T (sgemm), online softmax per seed row, Z_t += P V_j (sgemm with
 *     beta = 1 into Z, the accumulator), then Z_t /= l and lse = max + log l.
 *   Backward, unit = (sample, head): per key tile (outer) and seed tile (inner), P is
 *     recomputed from lse, then dV_j += P^T dZ_t, dS = P * (dZ_t V_j^T - D), and
 *     dK_j += s dS^T Sq_t, part_b += s dS K_j.
 * The unit owns its sample's dK/dV head columns. dSq is a sum over the batch, so each
 * unit writes its sample's contribution into its own slice of a (B, m, D) partial
 * buffer, and a second pass adds the slices into dSq in sample order b = 0..B-1, split
 * over the pool by dSq element: each element has one owner and a fixed order, so the
 * result does not depend on the thread count (dynamic scheduling only decides who runs
 * a unit). Why per-sample partials and not per-worker ones: which samples a worker
 * runs depends on timing, so per-worker sums would not be reproducible; per-sample
 * slices cost B x m x D floats, the size of dZ itself.
 *
 * Kronecker compression. Samples are cut into blocks of nb (nb depends only on B and
 * m2: at least KRON_MIN_ROWS rows of Y per block, at most KRON_MAX_BLOCKS blocks), and
 * the seed-side maps are applied first, U_b = A_i^T Z_b (m2 x D, one small sgemm per
 * sample), so that a block's Y rows, contiguous in memory, come from one sgemm
 * Y_blk += U_blk W_i. (Contracting A first costs k m2 D (m + D2) per sample against
 * k m D2 (D + m2) for W first: cheaper whenever the block compresses the seeds,
 * m2 < m; W first would pay only for m2 close to m with D2 << D. We keep one order.)
 *   Forward, unit = block: for each i, U_blk = A_i^T Z_b per sample, Y_blk (+)= U_blk W_i.
 *   Backward has two kinds of unit, handed out from one counter:
 *     dW tile (i, columns [d0, d0 + dt) of D): dW_i[d0:] += U^T dY over the whole batch,
 *       block by block in sample order, U restricted to those columns (A_i^T Z_b[:, d0:]);
 *       every dW element has one owner, so no partials and no second pass.
 *     block: G = dY_blk W_i^T (one sgemm, m2 x D per sample), then per sample
 *       dZ_b += A_i G_b and the block's partial dA_i (+)= Z_b G_b^T (beta = 0 on the
 *       block's first sample); the caller adds the nblk partials into dA in block order
 *       (k m m2 floats each, tiny).
 *   Blocks and tiles have shape-only boundaries and every sgemm call has a shape fixed
 *   by them (OpenBLAS's rounding may depend on a call's shape), so results are bitwise
 *   independent of the thread count.
 */
#include <math.h>
#include <string.h>

#include "core/blas.h"
#include "core/simd.h"
#include "ember/hsp.h"
#include "nn/attn_util.h"

#define TQ 128             /* seed rows per tile */
#define TK 128             /* key rows per tile */
#define KRON_MIN_ROWS 64   /* Y rows per block at least (sgemm M of Y_blk += U W_i) */
#define KRON_MAX_BLOCKS 64 /* blocks per batch at most (caps the dA partials) */
#define KRON_DT 64         /* dW columns of D per backward tile */

/* ------------------------------------------------------------ checks */

static em_status check_seed(const em_hsp_cfg *c) {
    em_status st = em_jattn_check(&c->attn);
    if (st) return st;
    if (c->attn.causal)
        return em_errorf(EM_ERR_INVALID, "hsp: causal = %d, but seed queries have no position",
                         c->attn.causal);
    if (!isfinite(c->attn.scale)) return em_errorf(EM_ERR_INVALID, "hsp: non-finite scale");
    if (c->m <= 0) return em_errorf(EM_ERR_INVALID, "hsp: m = %d seeds, need >= 1", c->m);
    if ((int64_t)c->attn.H * c->attn.dh > INT32_MAX)
        return em_errorf(EM_ERR_INVALID, "hsp: width H*dh = %lld too large",
                         (long long)c->attn.H * c->attn.dh);
    return EM_OK;
}

static em_status check_kron(const em_hsp_cfg *c) {
    const em_jattn_cfg *a = &c->attn;
    if (a->B < 0 || a->H <= 0 || a->dh <= 0 || c->m <= 0 || c->m2 <= 0 || c->D2 <= 0 || c->k <= 0)
        return em_errorf(EM_ERR_INVALID, "hsp: bad dims B=%d H=%d dh=%d m=%d m2=%d D2=%d k=%d",
                         a->B, a->H, a->dh, c->m, c->m2, c->D2, c->k);
    const int64_t D = (int64_t)a->H * a->dh;
    if (D > INT32_MAX || (int64_t)a->B * c->m2 > INT32_MAX || (int64_t)a->B * c->m > INT32_MAX)
        return em_errorf(EM_ERR_INVALID, "hsp: sizes too large (B=%d m=%d m2=%d D=%lld)", a->B,
                         c->m, c->m2, (long long)D);
    return EM_OK;
}

em_status em_hsp_check(em_hsp_cfg cfg) {
    em_status st = check_seed(&cfg);
    return st ? st : check_kron(&cfg);
}

/* ---------------------------------------------------- seed attention */

typedef em__attn_unit unit;

typedef struct {
    em__attn_sched s; /* units per (sample, head); scratch: 1 (fwd) or 2 (bwd) TQ x TK */
    const em_hsp_cfg *c;
    float scale;
    float *Z, *lse, *part, *dK, *dV; /* part: (B, m, D) per-sample dSq, NULL if unwanted */
    const float *Sq, *K, *V, *dZ, *Zin, *lsein;
} sjob;

static void sfwd_unit(const void *p, unit u, int ith) {
    const sjob *j = p;
    const em_jattn_cfg *c = &j->c->attn;
    const int m = j->c->m, dh = c->dh, H = c->H, ld = H * dh;
    const int64_t base = c->offsets[u.b];
    const int L = (int)(c->offsets[u.b + 1] - base);
    const size_t col = (size_t)u.h * dh;
    float *S = j->s.scratch + (size_t)ith * TQ * TK, mx[TQ], l[TQ];
    for (int i0 = 0; i0 < m; i0 += TQ) {
        const int mq = m - i0 < TQ ? m - i0 : TQ;
        const float *St = j->Sq + (size_t)i0 * ld + col;
        float *Zt = j->Z + ((size_t)u.b * m + i0) * ld + col;
        for (int r = 0; r < mq; r++) {
            mx[r] = -INFINITY, l[r] = 0.f;
            memset(Zt + (size_t)r * ld, 0, sizeof(float) * (size_t)dh);
        }
        for (int j0 = 0; j0 < L; j0 += TK) { /* L >= 1: every row's max is finite */
            const int nk = L - j0 < TK ? L - j0 : TK;
            const float *Kj = j->K + (size_t)(base + j0) * ld + col;
            const float *Vj = j->V + (size_t)(base + j0) * ld + col;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mq, nk, dh, j->scale, St, ld, Kj,
                        ld, 0.f, S, TK);
            for (int r = 0; r < mq; r++)
                em__softmax_online_row(S + (size_t)r * TK, nk, &mx[r], &l[r], Zt + (size_t)r * ld, dh);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mq, dh, nk, 1.f, S, TK, Vj, ld,
                        1.f, Zt, ld);
        }
        for (int r = 0; r < mq; r++) {
            em_vscale(Zt + (size_t)r * ld, 1.f / l[r], (size_t)dh);
            j->lse[((size_t)u.b * m + i0 + r) * H + u.h] = mx[r] + logf(l[r]);
        }
    }
}

em_status em_hsp_seed_forward(float *Z, float *lse, const float *Sq, const float *K,
                              const float *V, em_hsp_cfg cfg, em_pool *pool) {
    em_status st = check_seed(&cfg);
    if (st) return st;
    const em_jattn_cfg *c = &cfg.attn;
    const size_t ld = (size_t)c->H * c->dh, m = (size_t)cfg.m;
    for (int b = 0; b < c->B; b++) /* empty samples have no unit: Z_b = 0, lse = -inf */
        if (c->offsets[b + 1] == c->offsets[b]) {
            memset(Z + (size_t)b * m * ld, 0, sizeof(float) * m * ld);
            for (size_t i = 0; i < m * (size_t)c->H; i++) lse[(size_t)b * m * c->H + i] = -INFINITY;
        }
    sjob j = {.c = &cfg, .scale = em__attn_scale(c), .Z = Z, .lse = lse, .Sq = Sq, .K = K, .V = V};
    return em__attn_run(&j.s, c, 0, (size_t)TQ * TK, pool, sfwd_unit, &j, "hsp seed forward");
}

static void sbwd_unit(const void *p, unit u, int ith) {
    const sjob *j = p;
    const em_jattn_cfg *c = &j->c->attn;
    const int m = j->c->m, dh = c->dh, H = c->H, ld = H * dh;
    const int64_t base = c->offsets[u.b];
    const int L = (int)(c->offsets[u.b + 1] - base);
    const size_t col = (size_t)u.h * dh, zb = (size_t)u.b * m; /* first Z row of sample b */
    const float s = j->scale;
    float *P = j->s.scratch + (size_t)ith * 2 * TQ * TK, *dP = P + TQ * TK, D[TQ];
    float *part = j->part ? j->part + zb * ld + col : NULL; /* (m, dh) slice, stride ld */
    const int want_ds = part || j->dK;
    if (part)
        for (int i = 0; i < m; i++) memset(part + (size_t)i * ld, 0, sizeof(float) * (size_t)dh);
    for (int j0 = 0; j0 < L; j0 += TK) {
        const int nk = L - j0 < TK ? L - j0 : TK;
        const size_t kr = (size_t)(base + j0) * ld + col;
        for (int i0 = 0; i0 < m; i0 += TQ) {
            const int mq = m - i0 < TQ ? m - i0 : TQ;
            const float *St = j->Sq + (size_t)i0 * ld + col;
            const size_t zr = (zb + i0) * ld + col;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mq, nk, dh, s, St, ld, j->K + kr,
                        ld, 0.f, P, TK);
            for (int r = 0; r < mq; r++) {
                em__exp_sub_row(P + (size_t)r * TK, nk, j->lsein[(zb + i0 + r) * H + u.h]);
                if (want_ds)
                    D[r] = em_vdot(j->dZ + zr + (size_t)r * ld, j->Zin + zr + (size_t)r * ld,
                                   (size_t)dh);
            }
            if (j->dV)
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, dh, mq, 1.f, P, TK,
                            j->dZ + zr, ld, 1.f, j->dV + kr, ld);
            if (!want_ds) continue;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mq, nk, dh, 1.f, j->dZ + zr, ld,
                        j->V + kr, ld, 0.f, dP, TK);
            for (int r = 0; r < mq; r++)
                em__softmax_ds_row(P + (size_t)r * TK, dP + (size_t)r * TK, nk, D[r]);
            em__attn_dqdk(dP, TK, mq, nk, dh, s, St, j->K + kr, ld,
                          part ? part + (size_t)i0 * ld : NULL, j->dK ? j->dK + kr : NULL);
        }
    }
}

typedef struct {
    float *dSq;
    const float *part;
    const int64_t *off;
    int B;
    size_t n; /* m * D */
} sreduce;

/* dSq[e] += part_b[e] for b = 0..B-1 in order, skipping empty samples (no slice). */
static void sreduce_task(void *p, int ith, int nth) {
    const sreduce *r = p;
    size_t lo, hi;
    em_split(r->n, ith, nth, &lo, &hi);
    if (lo == hi) return;
    for (int b = 0; b < r->B; b++)
        if (r->off[b + 1] > r->off[b]) em_vadd(r->dSq + lo, r->part + (size_t)b * r->n + lo, hi - lo);
}

em_status em_hsp_seed_backward(float *dSq, float *dK, float *dV, const float *dZ,
                               const float *Sq, const float *K, const float *V, const float *Z,
                               const float *lse, em_hsp_cfg cfg, em_pool *pool) {
    em_status st = check_seed(&cfg);
    if (st) return st;
    if (!dSq && !dK && !dV) return EM_OK;
    const em_jattn_cfg *c = &cfg.attn;
    const size_t n = (size_t)cfg.m * c->H * c->dh;
    sjob j = {.c = &cfg, .scale = em__attn_scale(c), .dK = dK, .dV = dV, .Sq = Sq, .K = K, .V = V,
              .dZ = dZ, .Zin = Z, .lsein = lse};
    if (dSq && c->B && c->offsets[c->B] > 0) {
        j.part = em_malloc(sizeof(float) * (size_t)c->B * n);
        if (!j.part)
            return em_errorf(EM_ERR_NOMEM, "hsp seed backward: %d x %zu floats of dSq partials",
                             c->B, n);
    }
    st = em__attn_run(&j.s, c, 0, (size_t)2 * TQ * TK, pool, sbwd_unit, &j, "hsp seed backward");
    if (!st && j.part) {
        sreduce r = {dSq, j.part, c->offsets, c->B, n};
        em_pool_run(pool, sreduce_task, &r);
    }
    em_free(j.part);
    return st;
}

/* ----------------------------------------------- Kronecker compression */

typedef struct {
    em__attn_sched s; /* units: forward blocks; backward dW tiles then blocks */
    int B, m, m2, D, D2, k;
    int nb, nblk;     /* samples per block, blocks */
    int dt, ntile;    /* backward dW columns per tile, tiles per term */
    size_t per_worker; /* scratch floats per worker */
    float *Y, *dZ, *dA, *dW, *pA; /* pA: (nblk, k, m, m2) partial dA, NULL if unwanted */
    const float *Z, *A, *W, *dY;
} kjob;

static void kjob_init(kjob *j, const em_hsp_cfg *c) {
    j->B = c->attn.B, j->m = c->m, j->m2 = c->m2, j->D = c->attn.H * c->attn.dh;
    j->D2 = c->D2, j->k = c->k;
    int nb = (j->B + KRON_MAX_BLOCKS - 1) / KRON_MAX_BLOCKS;
    const int rows = (KRON_MIN_ROWS + j->m2 - 1) / j->m2;
    nb = nb > rows ? nb : rows;
    j->nb = j->B < nb ? (j->B ? j->B : 1) : nb;
    j->nblk = (j->B + j->nb - 1) / j->nb;
    j->dt = j->D < KRON_DT ? j->D : KRON_DT;
    j->ntile = (j->D + j->dt - 1) / j->dt;
    j->per_worker = (size_t)j->nb * j->m2 * j->D;
}

/* U (nbk x m2, w), row stride w <- A_i^T Z_b[:, d0:d0+w] for the nbk samples from b0. */
static void kron_u(const kjob *j, float *U, const float *Ai, int b0, int nbk, int d0, int w) {
    for (int t = 0; t < nbk; t++)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, j->m2, w, j->m, 1.f, Ai, j->m2,
                    j->Z + (size_t)(b0 + t) * j->m * j->D + d0, j->D, 0.f,
                    U + (size_t)t * j->m2 * w, w);
}

static void kfwd_task(void *p, int ith, int nth) {
    (void)nth;
    kjob *j = p;
    float *U = j->s.scratch + (size_t)ith * j->per_worker;
    size_t blk;
    while (em__attn_take(&j->s, &blk)) {
        const int b0 = (int)blk * j->nb, nbk = j->B - b0 < j->nb ? j->B - b0 : j->nb;
        float *Yb = j->Y + (size_t)b0 * j->m2 * j->D2;
        for (int i = 0; i < j->k; i++) {
            kron_u(j, U, j->A + (size_t)i * j->m * j->m2, b0, nbk, 0, j->D);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nbk * j->m2, j->D2, j->D, 1.f, U,
                        j->D, j->W + (size_t)i * j->D * j->D2, j->D2, i ? 1.f : 0.f, Yb, j->D2);
        }
    }
}

em_status em_hsp_kron_forward(float *Y, const float *Z, const float *A, const float *W,
                              em_hsp_cfg cfg, em_pool *pool) {
    em_status st = check_kron(&cfg);
    if (st) return st;
    kjob j = {.Y = Y, .Z = Z, .A = A, .W = W};
    kjob_init(&j, &cfg);
    if (!j.B) return EM_OK;
    const int nth = em_pool_nth(pool);
    j.s.scratch = em_malloc(sizeof(float) * (size_t)nth * j.per_worker);
    if (!j.s.scratch)
        return em_errorf(EM_ERR_NOMEM, "hsp kron forward: %d x %zu floats of scratch", nth,
                         j.per_worker);
    em_blas_init();
    j.s.n_units = (size_t)j.nblk;
    em__attn_go(&j.s, pool, kfwd_task, &j);
    em_free(j.s.scratch);
    return EM_OK;
}

/* dW_i[:, d0:d0+w] += sum_b (A_i^T Z_b[:, d0:])^T dY_b, blocks in sample order. */
static void kbwd_dw_tile(const kjob *j, float *U, int i, int tile) {
    const int d0 = tile * j->dt, w = j->D - d0 < j->dt ? j->D - d0 : j->dt;
    const float *Ai = j->A + (size_t)i * j->m * j->m2;
    float *dWt = j->dW + (size_t)i * j->D * j->D2 + (size_t)d0 * j->D2;
    for (int b0 = 0; b0 < j->B; b0 += j->nb) {
        const int nbk = j->B - b0 < j->nb ? j->B - b0 : j->nb;
        kron_u(j, U, Ai, b0, nbk, d0, w);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, w, j->D2, nbk * j->m2, 1.f, U, w,
                    j->dY + (size_t)b0 * j->m2 * j->D2, j->D2, 1.f, dWt, j->D2);
    }
}

/* Block blk: dZ_b += A_i G_b and the block's dA partials, G = dY_blk W_i^T. */
static void kbwd_block(const kjob *j, float *G, int blk) {
    const int b0 = blk * j->nb, nbk = j->B - b0 < j->nb ? j->B - b0 : j->nb;
    const int m = j->m, m2 = j->m2, D = j->D;
    for (int i = 0; i < j->k; i++) {
        const float *Ai = j->A + (size_t)i * m * m2;
        float *pA = j->pA ? j->pA + ((size_t)blk * j->k + i) * m * m2 : NULL;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nbk * m2, D, j->D2, 1.f,
                    j->dY + (size_t)b0 * m2 * j->D2, j->D2, j->W + (size_t)i * D * j->D2, j->D2,
                    0.f, G, D);
        for (int t = 0; t < nbk; t++) {
            const float *Gb = G + (size_t)t * m2 * D;
            const size_t zo = (size_t)(b0 + t) * m * D;
            if (j->dZ)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, D, m2, 1.f, Ai, m2, Gb, D,
                            1.f, j->dZ + zo, D);
            if (pA)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, m2, D, 1.f, j->Z + zo, D, Gb,
                            D, t ? 1.f : 0.f, pA, m2);
        }
    }
}

static void kbwd_task(void *p, int ith, int nth) {
    (void)nth;
    kjob *j = p;
    float *buf = j->s.scratch + (size_t)ith * j->per_worker;
    const size_t ntiles = j->dW ? (size_t)j->k * j->ntile : 0;
    size_t u;
    while (em__attn_take(&j->s, &u)) {
        if (u < ntiles) kbwd_dw_tile(j, buf, (int)(u / j->ntile), (int)(u % j->ntile));
        else kbwd_block(j, buf, (int)(u - ntiles));
    }
}

em_status em_hsp_kron_backward(float *dZ, float *dA, float *dW, const float *dY, const float *Z,
                               const float *A, const float *W, em_hsp_cfg cfg, em_pool *pool) {
    em_status st = check_kron(&cfg);
    if (st) return st;
    kjob j = {.dZ = dZ, .dA = dA, .dW = dW, .dY = dY, .Z = Z, .A = A, .W = W};
    kjob_init(&j, &cfg);
    if (!j.B || (!dZ && !dA && !dW)) return EM_OK;
    const int nth = em_pool_nth(pool);
    const size_t npa = dA ? (size_t)j.nblk * j.k * j.m * j.m2 : 0;
    j.s.scratch = em_malloc(sizeof(float) * ((size_t)nth * j.per_worker + npa));
    if (!j.s.scratch)
        return em_errorf(EM_ERR_NOMEM, "hsp kron backward: %d x %zu + %zu floats of scratch", nth,
                         j.per_worker, npa);
    j.pA = dA ? j.s.scratch + (size_t)nth * j.per_worker : NULL;
    em_blas_init();
    j.s.n_units = (dW ? (size_t)j.k * j.ntile : 0) + (dZ || dA ? (size_t)j.nblk : 0);
    em__attn_go(&j.s, pool, kbwd_task, &j);
    for (int blk = 0; blk < j.nblk && dA; blk++) /* block order: fixed */
        em_vadd(dA, j.pA + (size_t)blk * j.k * j.m * j.m2, (size_t)j.k * j.m * j.m2);
    em_free(j.s.scratch);
    return EM_OK;
}

/* ------------------------------------------------------------ composed */

em_status em_hsp_forward(float *Y, float *Z, float *lse, const float *Sq, const float *K,
                         const float *V, const float *A, const float *W, em_hsp_cfg cfg,
                         em_pool *pool) {
    em_status st = em_hsp_check(cfg);
    if (!st) st = em_hsp_seed_forward(Z, lse, Sq, K, V, cfg, pool);
    if (!st) st = em_hsp_kron_forward(Y, Z, A, W, cfg, pool);
    return st;
}

em_status em_hsp_backward(float *dSq, float *dK, float *dV, float *dA, float *dW, const float *dY,
                          const float *Sq, const float *K, const float *V, const float *A,
                          const float *W, const float *Z, const float *lse, em_hsp_cfg cfg,
                          em_pool *pool) {
    em_status st = em_hsp_check(cfg);
    if (st) return st;
    float *dZ = NULL;
    const size_t nz = (size_t)cfg.attn.B * cfg.m * cfg.attn.H * cfg.attn.dh;
    if ((dSq || dK || dV) && nz) {
        dZ = em_calloc(nz, sizeof(float));
        if (!dZ) return em_errorf(EM_ERR_NOMEM, "hsp backward: %zu floats of dZ", nz);
    }
    st = em_hsp_kron_backward(dZ, dA, dW, dY, Z, A, W, cfg, pool);
    if (!st && dZ) st = em_hsp_seed_backward(dSq, dK, dV, dZ, Sq, K, V, Z, lse, cfg, pool);
    em_free(dZ);
    return st;
}
