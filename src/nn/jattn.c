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
 * matmul, so libm expf would dominate. exp_sub_rows() uses a Cephes-style polynomial
 * (relative error ~2e-7) in plain C over fixed blocks of 8, which GCC vectorises; inputs
 * below -87 (including the -inf of the mask) give exactly 0.
 *
 * Target attention (one query per sample and head) is a matrix-vector problem: it uses
 * em_vdot / em_vaxpy over key chunks of TK with the same online softmax; a unit is
 * (sample, head) and owns its o, lse, dq rows and its sample's dK/dV head columns.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "core/blas.h"
#include "core/simd.h"
#include "ember/jattn.h"

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

static float cfg_scale(const em_jattn_cfg *c) {
    return c->scale > 0.f ? c->scale : 1.f / sqrtf((float)c->dh);
}

/* x[k] = exp(x[k] - sub), k < 8, and part[k] += the result. One loop with a fixed trip
 * count and no calls (round-to-nearest by the 1.5*2^23 trick, the power of two built
 * in the exponent bits) so that GCC vectorises it at -O2. Arguments below -87 (the
 * mask's -inf included) give exactly 0; arguments are <= ~0 here (a row max or the
 * lse is subtracted), so there is no overflow branch. */
static inline void exp8_sub(float *restrict x, float sub, float *restrict part) {
    for (int k = 0; k < 8; k++) {
        const float a = x[k] - sub;
        const float v = a > -87.0f ? a : -87.0f;
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
        const float y = a > -87.0f ? p * e.f : 0.f;
        x[k] = y;
        part[k] += y;
    }
}

/* row[c] = exp(row[c] - sub) for c < n (masked -inf -> 0); returns the sum in a fixed
 * order (8 partial sums, then a fixed fold). */
static float exp_sub_row(float *row, int n, float sub) {
    float part[8] = {0};
    int c = 0;
    for (; c + 8 <= n; c += 8) exp8_sub(row + c, sub, part);
    if (c < n) {
        float tmp[8];
        const int m = n - c;
        for (int k = 0; k < 8; k++) tmp[k] = k < m ? row[c + k] : -INFINITY;
        exp8_sub(tmp, sub, part);
        for (int k = 0; k < m; k++) row[c + k] = tmp[k];
    }
    return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

/* max(init, row[0..n)), 8 lanes then a fixed fold (a plain running max does not
 * vectorise without -ffast-math). */
static float row_max(const float *row, int n, float init) {
    float mx[8];
    for (int k = 0; k < 8; k++) mx[k] = init;
    int c = 0;
    for (; c + 8 <= n; c += 8)
        for (int k = 0; k < 8; k++) mx[k] = row[c + k] > mx[k] ? row[c + k] : mx[k];
    for (int k = 0; c + k < n; k++) mx[k] = row[c + k] > mx[k] ? row[c + k] : mx[k];
    for (int k = 1; k < 8; k++) mx[0] = mx[k] > mx[0] ? mx[k] : mx[0];
    return mx[0];
}

/* Unit list: samples longest first; per sample `tiles` entries of t (query tile index,
 * highest first: under a causal mask those cost most) times H heads. */
typedef struct {
    int32_t b, h, t;
} unit;

typedef struct {
    const int64_t *off;
    int b;
} len_key;

static int cmp_len_desc(const void *pa, const void *pb) {
    const len_key *a = pa, *b = pb;
    int64_t la = a->off[a->b + 1] - a->off[a->b], lb = b->off[b->b + 1] - b->off[b->b];
    if (la != lb) return la > lb ? -1 : 1;
    return (a->b > b->b) - (a->b < b->b);
}

/* Build the unit list into *out (em_malloc'd; *n units). per_tile: one unit per query
 * tile (forward), else one per (sample, head). */
static em_status make_units(unit **out, size_t *n, const em_jattn_cfg *c, int per_tile) {
    *out = NULL;
    *n = 0;
    if (c->B == 0) return EM_OK;
    len_key *keys = em_malloc((size_t)c->B * sizeof *keys);
    if (!keys) return em_errorf(EM_ERR_NOMEM, "jattn: unit sort (%d samples)", c->B);
    size_t cnt = 0;
    for (int b = 0; b < c->B; b++) {
        int64_t L = c->offsets[b + 1] - c->offsets[b];
        keys[b] = (len_key){c->offsets, b};
        cnt += (size_t)c->H * (size_t)(per_tile ? (L + TQ - 1) / TQ : (L > 0));
    }
    qsort(keys, (size_t)c->B, sizeof *keys, cmp_len_desc);
    unit *u = cnt ? em_malloc(cnt * sizeof *u) : NULL;
    if (cnt && !u) {
        em_free(keys);
        return em_errorf(EM_ERR_NOMEM, "jattn: unit list (%zu units)", cnt);
    }
    size_t k = 0;
    for (int i = 0; i < c->B; i++) {
        int b = keys[i].b;
        int64_t L = c->offsets[b + 1] - c->offsets[b];
        int nt = per_tile ? (int)((L + TQ - 1) / TQ) : (L > 0);
        for (int t = nt - 1; t >= 0; t--)
            for (int h = 0; h < c->H; h++) u[k++] = (unit){b, h, t};
    }
    em_free(keys);
    *out = u;
    *n = cnt;
    return EM_OK;
}

typedef struct {
    const em_jattn_cfg *c;
    float scale;
    const unit *units;
    size_t n_units;
    atomic_size_t next;
    float *scratch; /* per worker: TQ x TK (forward) or 2 x TQ x TK (backward) */
    float *O, *lse, *dQ, *dK, *dV;
    const float *Q, *K, *V, *dO, *Oin, *lsein;
} job;

static void run_units(job *j, em_pool *pool, em_task_fn fn) {
    atomic_init(&j->next, 0);
    em_pool_run(pool, fn, j);
}

/* -------------------------------------------------------- self: forward */

static void fwd_unit(const job *j, unit u, int ith) {
    const em_jattn_cfg *c = j->c;
    const int dh = c->dh, ld = c->H * dh;
    const int64_t base = c->offsets[u.b];
    const int L = (int)(c->offsets[u.b + 1] - base);
    const int i0 = u.t * TQ, mq = L - i0 < TQ ? L - i0 : TQ;
    const size_t col = (size_t)u.h * dh;
    const float *Qt = j->Q + (size_t)(base + i0) * ld + col;
    float *Ot = j->O + (size_t)(base + i0) * ld + col;
    float *S = j->scratch + (size_t)ith * TQ * TK, m[TQ], l[TQ];
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
            const float mx = row_max(s, nk, m[r]);
            const float alpha = expf(m[r] - mx); /* 0 on the first tile (m = -inf) */
            const float sum = exp_sub_row(s, nk, mx);
            l[r] = l[r] * alpha + sum;
            m[r] = mx;
            if (alpha != 1.f) em_vscale(Ot + (size_t)r * ld, alpha, (size_t)dh);
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mq, dh, nk, 1.f, S, TK, Vj, ld, 1.f,
                    Ot, ld);
    }
    for (int r = 0; r < mq; r++) {
        em_vscale(Ot + (size_t)r * ld, 1.f / l[r], (size_t)dh);
        j->lse[(size_t)(base + i0 + r) * c->H + u.h] = m[r] + logf(l[r]);
    }
}

static void fwd_task(void *p, int ith, int nth) {
    job *j = p;
    size_t k;
    while ((k = atomic_fetch_add(&j->next, 1)) < j->n_units) fwd_unit(j, j->units[k], ith);
}

em_status em_jattn_forward(float *O, float *lse, const float *Q, const float *K, const float *V,
                           const em_jattn_cfg *cfg, em_pool *pool) {
    em_status st = em_jattn_check(cfg);
    if (st) return st;
    em_blas_init();
    job j = {.c = cfg, .scale = cfg_scale(cfg), .O = O, .lse = lse, .Q = Q, .K = K, .V = V};
    unit *units;
    if ((st = make_units(&units, &j.n_units, cfg, 1))) return st;
    j.units = units;
    if (j.n_units) {
        const size_t per = (size_t)1 * TQ * TK;
        j.scratch = em_malloc((size_t)em_pool_nth(pool) * per * sizeof(float));
        if (!j.scratch) {
            em_free(units);
            return em_errorf(EM_ERR_NOMEM, "jattn: %d x %zu floats of tile scratch",
                             em_pool_nth(pool), per);
        }
        run_units(&j, pool, fwd_task);
        em_free(j.scratch);
    }
    em_free(units);
    return EM_OK;
}

/* ------------------------------------------------------- self: backward */

static void bwd_unit(const job *j, unit u, int ith) {
    const em_jattn_cfg *c = j->c;
    const int dh = c->dh, H = c->H, ld = H * dh;
    const int64_t base = c->offsets[u.b];
    const int L = (int)(c->offsets[u.b + 1] - base);
    const size_t col = (size_t)u.h * dh;
    const float scale = j->scale;
    float *P = j->scratch + (size_t)ith * 2 * TQ * TK, *dP = P + TQ * TK, D[TQ];
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
                exp_sub_row(s, nk, j->lsein[(size_t)(base + i0 + r) * H + u.h]);
                D[r] = em_vdot(ROW(j->dO, i0 + r), ROW(j->Oin, i0 + r), (size_t)dh);
            }
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, dh, mq, 1.f, P, TK,
                        ROW(j->dO, i0), ld, 1.f, ROW(j->dV, j0), ld);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mq, nk, dh, 1.f, ROW(j->dO, i0),
                        ld, ROW(j->V, j0), ld, 0.f, dP, TK);
            for (int r = 0; r < mq; r++) {
                const float *p = P + (size_t)r * TK;
                float *g = dP + (size_t)r * TK;
                const float Dr = D[r];
                int cc = 0; /* blocks of 8: a fixed trip count vectorises at -O2 */
                for (; cc + 8 <= nk; cc += 8)
                    for (int k = 0; k < 8; k++) g[cc + k] = p[cc + k] * (g[cc + k] - Dr);
                for (; cc < nk; cc++) g[cc] = p[cc] * (g[cc] - Dr);
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mq, dh, nk, scale, dP, TK,
                        ROW(j->K, j0), ld, 1.f, ROW(j->dQ, i0), ld);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, dh, mq, scale, dP, TK,
                        ROW(j->Q, i0), ld, 1.f, ROW(j->dK, j0), ld);
        }
    }
#undef ROW
}

static void bwd_task(void *p, int ith, int nth) {
    job *j = p;
    size_t k;
    while ((k = atomic_fetch_add(&j->next, 1)) < j->n_units) bwd_unit(j, j->units[k], ith);
}

em_status em_jattn_backward(float *dQ, float *dK, float *dV, const float *dO, const float *Q,
                            const float *K, const float *V, const float *O, const float *lse,
                            const em_jattn_cfg *cfg, em_pool *pool) {
    em_status st = em_jattn_check(cfg);
    if (st) return st;
    em_blas_init();
    job j = {.c = cfg, .scale = cfg_scale(cfg), .dQ = dQ, .dK = dK, .dV = dV, .dO = dO,
             .Q = Q, .K = K, .V = V, .Oin = O, .lsein = lse};
    unit *units;
    if ((st = make_units(&units, &j.n_units, cfg, 0))) return st;
    j.units = units;
    if (j.n_units) {
        const size_t per = (size_t)2 * TQ * TK;
        j.scratch = em_malloc((size_t)em_pool_nth(pool) * per * sizeof(float));
        if (!j.scratch) {
            em_free(units);
            return em_errorf(EM_ERR_NOMEM, "jattn: %d x %zu floats of tile scratch",
                             em_pool_nth(pool), per);
        }
        run_units(&j, pool, bwd_task);
        em_free(j.scratch);
    }
    em_free(units);
    return EM_OK;
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
        l = l * alpha + exp_sub_row(s, nk, mx);
        m = mx;
        if (alpha != 1.f) em_vscale(o, alpha, (size_t)dh);
        for (int k = 0; k < nk; k++) em_vaxpy(o, s[k], Vj + (size_t)k * ld, (size_t)dh);
    }
    if (L > 0) em_vscale(o, 1.f / l, (size_t)dh);
    j->lse[(size_t)u.b * H + u.h] = L > 0 ? m + logf(l) : -INFINITY;
}

static void tfwd_task(void *p, int ith, int nth) {
    job *j = p;
    size_t k, n = (size_t)j->c->B * j->c->H;
    while ((k = atomic_fetch_add(&j->next, 1)) < n)
        tfwd_unit(j, (unit){(int32_t)(k / j->c->H), (int32_t)(k % j->c->H), 0});
}

em_status em_jattn_target_forward(float *o, float *lse, const float *q, const float *K,
                                  const float *V, const em_jattn_cfg *cfg, em_pool *pool) {
    em_status st = em_jattn_check(cfg);
    if (st) return st;
    job j = {.c = cfg, .scale = cfg_scale(cfg), .O = o, .lse = lse, .Q = q, .K = K, .V = V};
    if (cfg->B) run_units(&j, pool, tfwd_task);
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
        exp_sub_row(s, nk, lse);
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
    size_t k, n = (size_t)j->c->B * j->c->H;
    while ((k = atomic_fetch_add(&j->next, 1)) < n)
        tbwd_unit(j, (unit){(int32_t)(k / j->c->H), (int32_t)(k % j->c->H), 0});
}

em_status em_jattn_target_backward(float *dq, float *dK, float *dV, const float *do_,
                                   const float *q, const float *K, const float *V,
                                   const float *o, const float *lse, const em_jattn_cfg *cfg,
                                   em_pool *pool) {
    em_status st = em_jattn_check(cfg);
    if (st) return st;
    job j = {.c = cfg, .scale = cfg_scale(cfg), .dQ = dq, .dK = dK, .dV = dV, .dO = do_,
             .Q = q, .K = K, .V = V, .Oin = o, .lsein = lse};
    if (cfg->B) run_units(&j, pool, tbwd_task);
    return EM_OK;
}
