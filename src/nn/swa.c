/*
 * swa.c - sliding-window softmax attention (Kunlun) on jagged sequences, forward and
 * backward; the API is in ember/kunlun.h. Query i of a sample sees keys
 * [i - w, i + w] (causal: [i - w, i]) of its own sequence.
 *
 * Forward. One unit = (sample, head, tq-row query tile). The keys any row of the tile
 * can see form one contiguous range [i0 - w, i0 + mq - 1 + w] (clipped to [0, L)); the
 * unit walks only that range in chunks of TK keys, so the cost per query row is
 * O(tq + 2w), never O(L). Per chunk, as in jattn.c:
 *   S = s Q_t K_j^T                    one cblas_sgemm into the worker's scratch
 *   keys outside the row's window -> -inf; a row with no visible key in the chunk is
 *   zeroed and leaves its running max m and sum l untouched (m may still be -inf)
 *   online softmax per row             m' = max(m, rowmax), alpha = exp(m - m'), ...
 *   O_t += P V_j                       cblas_sgemm with beta = 1 straight into O
 * then O_t /= l, lse = m + log l. Every query sees itself, so l > 0 at the end.
 *
 * The query tile height adapts to the window: tq = clamp(roundup8(2w + 1), 16, 128).
 * A 128-row tile with w = 3 would compute ~134 scores per row to use 7; with tq ~ 2w
 * the useful fraction stays around one half or better for any w, while large windows
 * keep jattn's 128 x 128 tiles (the sgemm-efficient size measured there).
 *
 * Narrow windows (w <= NARROW_W = 7, at most 15 keys per query) skip the tiles: per
 * query row, the window's scores are em_vdot products into a 16-float stack array, an
 * exact softmax (no running max needed), and O_i = sum_j p_j V_j by em_vaxpy; the
 * backward does the same per row (the target-attention scheme of jattn.c). At B = 256,
 * H = 2, dh = 32 (lognormal lengths, mean ~64) 16-row sgemm tiles with w = 3 measured
 * ~1.5-2x slower than this (call overhead, 22 scores computed per row for 7 used); at
 * w = 7 vs 8 the two paths cost about the same, hence the threshold.
 *
 * Backward (FlashAttention-2 recomputation). One unit = (sample, head), which owns all
 * dQ/dK/dV elements of its head and sample (fixed summation order, no conflicts). For
 * each query tile (outer) and each key chunk of its window range (inner):
 *   P = exp(S - lse) (masked -> exactly 0);  D_i = dO_i . O_i
 *   dV_j += P^T dO_t;  dP = dO_t V_j^T;  dS = P * (dP - D)
 *   dQ_t += s dS K_j;  dK_j += s dS^T Q_t
 *
 * exp is a Cephes-style polynomial over blocks of 8 (vectorised by GCC at -O2; relative
 * error ~2e-7; arguments below -87, the mask's -inf included, give exactly 0), shared
 * with jattn.c in attn_util.h together with the row max, the unit list and the runner.
 * Scheduling and determinism as jattn.c: units longest sample first from an atomic
 * counter, each unit's arithmetic independent of the worker, so results are bitwise
 * identical for any thread count.
 */
#include <math.h>

#include "core/blas.h"
#include "core/simd.h"
#include "ember/kunlun.h"
#include "nn/attn_util.h"

#define TQMAX 128 /* largest query tile */
#define TK 128    /* key chunk */
#define NARROW_W 7 /* windows up to this use the per-row path (<= 15 keys) */

/* ------------------------------------------------------------- helpers */

em_status em_swa_check(const em_swa_cfg *c) {
    if (!c) return em_errorf(EM_ERR_INVALID, "swa: NULL config");
    em_status st = em_jattn_check(&c->attn);
    if (st) return st;
    if (c->window < 0) return em_errorf(EM_ERR_INVALID, "swa: window %d < 0", c->window);
    if (!isfinite(c->attn.scale)) return em_errorf(EM_ERR_INVALID, "swa: non-finite scale");
    return EM_OK;
}

static int tile_rows(int w) {
    const int64_t t = ((2 * (int64_t)w + 1) + 7) / 8 * 8;
    return t < 16 ? 16 : t > TQMAX ? TQMAX : (int)t;
}

typedef em__attn_unit unit;

typedef struct {
    const em_jattn_cfg *c;
    int64_t wl, wr; /* key j visible from query i iff i - wl <= j <= i + wr */
    int tq, narrow;
    float scale;
    em__attn_sched s; /* scratch per worker: tq x TK (forward) or 2 x tq x TK (backward) */
    float *O, *lse, *dQ, *dK, *dV;
    const float *Q, *K, *V, *dO, *Oin, *lsein;
} job;

/* Key range [*lo, *hi) seen by query rows [i0, i0 + mq) of a length-L sample. */
static void key_range(const job *j, int i0, int mq, int L, int *lo, int *hi) {
    const int64_t a = (int64_t)i0 - j->wl, b = (int64_t)i0 + mq + j->wr;
    *lo = a < 0 ? 0 : (int)a;
    *hi = b > L ? L : (int)b;
}

/* Masks row r (query i) of a chunk starting at key j0 with nk keys: entries outside
 * the window become -inf. Returns the number of visible keys. */
static int mask_row(const job *j, float *s, int i, int j0, int nk) {
    int64_t lo = (int64_t)i - j->wl - j0, hi = (int64_t)i + j->wr + 1 - j0;
    lo = lo < 0 ? 0 : lo > nk ? nk : lo;
    hi = hi < lo ? lo : hi > nk ? nk : hi;
    for (int c = 0; c < (int)lo; c++) s[c] = -INFINITY;
    for (int c = (int)hi; c < nk; c++) s[c] = -INFINITY;
    return (int)(hi - lo);
}

/* ------------------------------------------------------- narrow windows */

/* s[k] = scale * q_i . k_{lo+k}, k < n, for query i of the sample at row `base` and
 * the head at column `col`. */
static void narrow_scores(const job *j, float *s, int64_t base, int i, int lo, int n, size_t col) {
    const int dh = j->c->dh, ld = j->c->H * dh;
    const float *q = j->Q + (size_t)(base + i) * ld + col;
    for (int k = 0; k < n; k++)
        s[k] = j->scale * em_vdot(q, j->K + (size_t)(base + lo + k) * ld + col, (size_t)dh);
}

/* Window [*lo, *lo + *n) of query i in a length-L sample. */
static void narrow_window(const job *j, int i, int L, int *lo, int *n) {
    const int64_t a = (int64_t)i - j->wl, b = (int64_t)i + j->wr + 1;
    *lo = a < 0 ? 0 : (int)a;
    *n = (int)((b > L ? L : b) - *lo);
}

static void narrow_fwd(const void *p, unit u, int ith) {
    (void)ith;
    const job *j = p;
    const em_jattn_cfg *c = j->c;
    const int dh = c->dh, ld = c->H * dh, tq = j->tq;
    const int64_t base = c->offsets[u.b];
    const int L = (int)(c->offsets[u.b + 1] - base);
    const int i0 = u.t * tq, i1 = L - i0 < tq ? L : i0 + tq;
    const size_t col = (size_t)u.h * dh;
    float s[16];
    for (int i = i0; i < i1; i++) {
        int lo, n;
        narrow_window(j, i, L, &lo, &n);
        narrow_scores(j, s, base, i, lo, n, col);
        const float mx = em__row_max(s, n, -INFINITY);
        const float sum = em__exp_sub_row(s, n, mx);
        float *o = j->O + (size_t)(base + i) * ld + col;
        for (int d = 0; d < dh; d++) o[d] = 0.f;
        for (int k = 0; k < n; k++) em_vaxpy(o, s[k], j->V + (size_t)(base + lo + k) * ld + col, (size_t)dh);
        em_vscale(o, 1.f / sum, (size_t)dh);
        j->lse[(size_t)(base + i) * c->H + u.h] = mx + logf(sum);
    }
}

static void narrow_bwd(const void *p, unit u, int ith) {
    (void)ith;
    const job *j = p;
    const em_jattn_cfg *c = j->c;
    const int dh = c->dh, H = c->H, ld = H * dh;
    const int64_t base = c->offsets[u.b];
    const int L = (int)(c->offsets[u.b + 1] - base);
    const size_t col = (size_t)u.h * dh;
    float s[16];
    for (int i = 0; i < L; i++) {
        int lo, n;
        narrow_window(j, i, L, &lo, &n);
        narrow_scores(j, s, base, i, lo, n, col);
        em__exp_sub_row(s, n, j->lsein[(size_t)(base + i) * H + u.h]);
        const size_t ri = (size_t)(base + i) * ld + col;
        const float *go = j->dO + ri, *q = j->Q + ri;
        const float D = em_vdot(go, j->Oin + ri, (size_t)dh);
        for (int k = 0; k < n; k++) {
            const size_t rk = (size_t)(base + lo + k) * ld + col;
            if (j->dV) em_vaxpy(j->dV + rk, s[k], go, (size_t)dh);
            if (!j->dQ && !j->dK) continue;
            const float ds = j->scale * s[k] * (em_vdot(go, j->V + rk, (size_t)dh) - D);
            if (j->dQ) em_vaxpy(j->dQ + ri, ds, j->K + rk, (size_t)dh);
            if (j->dK) em_vaxpy(j->dK + rk, ds, q, (size_t)dh);
        }
    }
}

/* ------------------------------------------------------------- forward */

static void fwd_unit(const void *p, unit u, int ith) {
    const job *j = p;
    const em_jattn_cfg *c = j->c;
    const int dh = c->dh, ld = c->H * dh, tq = j->tq;
    const int64_t base = c->offsets[u.b];
    const int L = (int)(c->offsets[u.b + 1] - base);
    const int i0 = u.t * tq, mq = L - i0 < tq ? L - i0 : tq;
    const size_t col = (size_t)u.h * dh;
    const float *Qt = j->Q + (size_t)(base + i0) * ld + col;
    float *Ot = j->O + (size_t)(base + i0) * ld + col;
    float *S = j->s.scratch + (size_t)ith * tq * TK, m[TQMAX], l[TQMAX];
    for (int r = 0; r < mq; r++) {
        m[r] = -INFINITY, l[r] = 0.f;
        for (int d = 0; d < dh; d++) Ot[(size_t)r * ld + d] = 0.f;
    }
    int klo, khi;
    key_range(j, i0, mq, L, &klo, &khi);
    for (int j0 = klo; j0 < khi; j0 += TK) {
        const int nk = khi - j0 < TK ? khi - j0 : TK;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mq, nk, dh, j->scale, Qt, ld,
                    j->K + (size_t)(base + j0) * ld + col, ld, 0.f, S, TK);
        for (int r = 0; r < mq; r++) {
            float *s = S + (size_t)r * TK;
            if (mask_row(j, s, i0 + r, j0, nk) == 0) {
                for (int cc = 0; cc < nk; cc++) s[cc] = 0.f;
                continue;
            }
            em__softmax_online_row(s, nk, &m[r], &l[r], Ot + (size_t)r * ld, dh);
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, mq, dh, nk, 1.f, S, TK,
                    j->V + (size_t)(base + j0) * ld + col, ld, 1.f, Ot, ld);
    }
    for (int r = 0; r < mq; r++) {
        em_vscale(Ot + (size_t)r * ld, 1.f / l[r], (size_t)dh);
        j->lse[(size_t)(base + i0 + r) * c->H + u.h] = m[r] + logf(l[r]);
    }
}

static void job_init(job *j, const em_swa_cfg *cfg) {
    const em_jattn_cfg *c = &cfg->attn;
    j->c = c;
    j->wl = cfg->window;
    j->wr = c->causal ? 0 : cfg->window;
    j->tq = tile_rows(cfg->window);
    j->narrow = cfg->window <= NARROW_W;
    j->scale = em__attn_scale(c);
}

/* Runs fn over the units (per tq-row query tile or per (sample, head)) with `tiles`
 * tq x TK scratch tiles per worker (none for narrow windows: the per-row path keeps
 * its scores on the stack). */
static em_status run(job *j, em_pool *pool, int per_tile, int tiles, em__attn_unit_fn fn) {
    const size_t per = j->narrow ? 0 : (size_t)tiles * j->tq * TK;
    return em__attn_run(&j->s, j->c, per_tile ? j->tq : 0, per, pool, fn, j, "swa");
}

em_status em_swa_forward(float *O, float *lse, const float *Q, const float *K, const float *V,
                         const em_swa_cfg *cfg, em_pool *pool) {
    em_status st = em_swa_check(cfg);
    if (st) return st;
    job j = {.O = O, .lse = lse, .Q = Q, .K = K, .V = V};
    job_init(&j, cfg);
    return run(&j, pool, 1, 1, j.narrow ? narrow_fwd : fwd_unit);
}

/* ------------------------------------------------------------ backward */

static void bwd_unit(const void *p, unit u, int ith) {
    const job *j = p;
    const em_jattn_cfg *c = j->c;
    const int dh = c->dh, H = c->H, ld = H * dh, tq = j->tq;
    const int64_t base = c->offsets[u.b];
    const int L = (int)(c->offsets[u.b + 1] - base);
    const size_t col = (size_t)u.h * dh;
    const float scale = j->scale;
    float *P = j->s.scratch + (size_t)ith * 2 * tq * TK, *dP = P + (size_t)tq * TK, D[TQMAX];
#define ROW(ptr, i) ((ptr) + (size_t)(base + (i)) * ld + col)
    for (int i0 = 0; i0 < L; i0 += tq) {
        const int mq = L - i0 < tq ? L - i0 : tq;
        for (int r = 0; r < mq; r++)
            D[r] = em_vdot(ROW(j->dO, i0 + r), ROW(j->Oin, i0 + r), (size_t)dh);
        int klo, khi;
        key_range(j, i0, mq, L, &klo, &khi);
        for (int j0 = klo; j0 < khi; j0 += TK) {
            const int nk = khi - j0 < TK ? khi - j0 : TK;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mq, nk, dh, scale, ROW(j->Q, i0),
                        ld, ROW(j->K, j0), ld, 0.f, P, TK);
            for (int r = 0; r < mq; r++) {
                float *s = P + (size_t)r * TK;
                mask_row(j, s, i0 + r, j0, nk); /* an empty row becomes all 0 below */
                em__exp_sub_row(s, nk, j->lsein[(size_t)(base + i0 + r) * H + u.h]);
            }
            if (j->dV)
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, dh, mq, 1.f, P, TK,
                            ROW(j->dO, i0), ld, 1.f, ROW(j->dV, j0), ld);
            if (!j->dQ && !j->dK) continue;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mq, nk, dh, 1.f, ROW(j->dO, i0),
                        ld, ROW(j->V, j0), ld, 0.f, dP, TK);
            for (int r = 0; r < mq; r++)
                em__softmax_ds_row(P + (size_t)r * TK, dP + (size_t)r * TK, nk, D[r]);
            em__attn_dqdk(dP, TK, mq, nk, dh, scale, ROW(j->Q, i0), ROW(j->K, j0), ld,
                          j->dQ ? ROW(j->dQ, i0) : NULL, j->dK ? ROW(j->dK, j0) : NULL);
        }
    }
#undef ROW
}

em_status em_swa_backward(float *dQ, float *dK, float *dV, const float *dO, const float *Q,
                          const float *K, const float *V, const float *O, const float *lse,
                          const em_swa_cfg *cfg, em_pool *pool) {
    em_status st = em_swa_check(cfg);
    if (st) return st;
    if (!dQ && !dK && !dV) return EM_OK;
    job j = {.dQ = dQ, .dK = dK, .dV = dV, .dO = dO, .Q = Q, .K = K, .V = V, .Oin = O,
             .lsein = lse};
    job_init(&j, cfg);
    return run(&j, pool, 0, 2, j.narrow ? narrow_bwd : bwd_unit);
}
