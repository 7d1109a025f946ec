/*
 * attn_padded.c - padded dense multi-head self attention (ember/attn_padded.h): the
 * formulation PyTorch users write for variable-length sequences, in ember's style, so
 * that Jagged Flash Attention can be compared with a padded path that has the same
 * BLAS, threads and allocator, and tested against an independent implementation.
 *
 * Per unit (sample b, head h), all matrices Lmax wide, five sgemms (two forward, four
 * backward with dP; QK^T is not recomputed because P is saved):
 *   forward   P = scale Q K^T (straight into the caller's P), masked row softmax in
 *             place, O = P V;
 *   backward  dV += P^T dO; dS = dO V^T (worker scratch); dS = P (dS - rowsum(P dS));
 *             dQ += scale dS K; dK += scale dS^T Q.
 * The padded cost is deliberate: every sgemm runs over the full Lmax rows and columns
 * whatever L_b is; only the softmax skips masked entries (they are written as exact 0,
 * which is what exp(-inf) gives in the PyTorch formulation). A length-0 sample still
 * runs its sgemms over P = 0, like a padded batch does.
 *
 * Why rowsum(P dP) and not dO . O for the softmax backward's D: it is what autograd of
 * softmax computes from the saved P, so the baseline does the same work as the peer.
 *
 * exp: the softmax needs B*H*L^2 exponentials; exp_row() is a Cephes-style polynomial
 * (relative error ~2e-7) in blocks of 8 with no branches or calls so GCC vectorises it
 * at -O2; masked entries are skipped, not exponentiated.
 *
 * Threads: units are split statically (em_split over B*H; all units cost the same, the
 * padded Lmax), each writes only its own slices, OpenBLAS is single-threaded
 * (core/blas.h): bitwise identical results for any thread count.
 */
#include <math.h>
#include <string.h>

#include "core/blas.h"
#include "nn/attn_util.h"
#include "ember/attn_padded.h"

#define LMAX_LIMIT 32768 /* keeps Lmax^2 and the sgemm leading dimensions far from int overflow */

/* row[0..n) <- softmax(row[0..n)); row[n..w) <- 0. n >= 1. Fixed summation order. */
static void softmax_row(float *row, int n, int w) {
    const float m = em__row_max(row, n, row[0]);
    const float sum = em__exp_sub_row(row, n, m);
    const float inv = 1.0f / sum;
    for (int j = 0; j < n; j++) row[j] *= inv;
    if (w > n) memset(row + n, 0, sizeof(float) * (size_t)(w - n));
}

/* dS[0..n) <- P (dS - sum_j P_j dS_j); dS[n..w) <- 0 (P is 0 there). */
static void softmax_bwd_row(float *restrict ds, const float *restrict p, int n, int w) {
    float part[8] = {0};
    int c = 0;
    for (; c + 8 <= n; c += 8)
        for (int k = 0; k < 8; k++) part[k] += p[c + k] * ds[c + k];
    for (int k = 0; c + k < n; k++) part[k] += p[c + k] * ds[c + k];
    const float D = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
    for (int j = 0; j < n; j++) ds[j] = p[j] * (ds[j] - D);
    if (w > n) memset(ds + n, 0, sizeof(float) * (size_t)(w - n));
}

int em_attn_padded_maxlen(const em_jattn_cfg *c) {
    int64_t m = 0;
    for (int b = 0; b < c->B; b++) {
        const int64_t L = c->offsets[b + 1] - c->offsets[b];
        m = L > m ? L : m;
    }
    return (int)m;
}

static em_status check(const em_jattn_cfg *c, int Lmax) {
    em_status st = em_jattn_check(c);
    if (st) return st;
    if (Lmax < 1 || Lmax > LMAX_LIMIT)
        return em_errorf(EM_ERR_INVALID, "attn_padded: Lmax = %d outside [1, %d]", Lmax, LMAX_LIMIT);
    const int m = em_attn_padded_maxlen(c);
    if (m > Lmax)
        return em_errorf(EM_ERR_INVALID, "attn_padded: a sample has %d rows, more than Lmax = %d", m, Lmax);
    return EM_OK;
}

typedef struct {
    const em_jattn_cfg *c;
    int Lmax;
    float scale;
    float *O, *P, *dQ, *dK, *dV, *scratch;
    const float *Q, *K, *V, *dO, *Pc;
    float *dst;
    const float *src;
    int unpad;
} job;

static float cfg_scale(const em_jattn_cfg *c) { return c->scale > 0 ? c->scale : 1.0f / sqrtf((float)c->dh); }

/* ---------------------------------------------------------- pad / unpad */

static void pad_task(void *p, int ith, int nth) {
    const job *j = p;
    const em_jattn_cfg *c = j->c;
    const size_t H = (size_t)c->H, dh = (size_t)c->dh, Lm = (size_t)j->Lmax, ld = H * dh;
    size_t lo, hi;
    em_split((size_t)c->B * H, ith, nth, &lo, &hi);
    for (size_t u = lo; u < hi; u++) {
        const size_t b = u / H, h = u % H;
        const size_t L = (size_t)(c->offsets[b + 1] - c->offsets[b]);
        float *const jag_w = j->dst + (size_t)c->offsets[b] * ld + h * dh; /* unpad */
        const float *const jag_r = j->src + (size_t)c->offsets[b] * ld + h * dh; /* pad */
        const size_t pad = u * Lm * dh;
        for (size_t i = 0; i < L; i++) {
            if (j->unpad)
                memcpy(jag_w + i * ld, j->src + pad + i * dh, dh * sizeof(float));
            else
                memcpy(j->dst + pad + i * dh, jag_r + i * ld, dh * sizeof(float));
        }
        if (!j->unpad) memset(j->dst + pad + L * dh, 0, (Lm - L) * dh * sizeof(float));
    }
}

static em_status pad_run(float *dst, const float *src, const em_jattn_cfg *c, int Lmax, em_pool *pool, int unpad) {
    em_status st = check(c, Lmax);
    if (st) return st;
    job j = {.c = c, .Lmax = Lmax, .dst = dst, .src = src, .unpad = unpad};
    em_pool_run(pool, pad_task, &j);
    return EM_OK;
}

em_status em_attn_pad(float *dst, const float *src, const em_jattn_cfg *c, int Lmax, em_pool *pool) {
    return pad_run(dst, src, c, Lmax, pool, 0);
}

em_status em_attn_unpad(float *dst, const float *src, const em_jattn_cfg *c, int Lmax, em_pool *pool) {
    return pad_run(dst, src, c, Lmax, pool, 1);
}

/* ------------------------------------------------------------- forward */

static void fwd_task(void *p, int ith, int nth) {
    const job *j = p;
    const em_jattn_cfg *c = j->c;
    const int Lm = j->Lmax, dh = c->dh;
    const size_t H = (size_t)c->H, tile = (size_t)Lm * (size_t)dh, sq = (size_t)Lm * (size_t)Lm;
    size_t lo, hi;
    em_split((size_t)c->B * H, ith, nth, &lo, &hi);
    for (size_t u = lo; u < hi; u++) {
        const int L = (int)(c->offsets[u / H + 1] - c->offsets[u / H]);
        float *P = j->P + u * sq;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Lm, Lm, dh, j->scale, j->Q + u * tile, dh,
                    j->K + u * tile, dh, 0.f, P, Lm);
        for (int i = 0; i < Lm; i++) {
            float *row = P + (size_t)i * Lm;
            if (i >= L) {
                memset(row, 0, sizeof(float) * (size_t)Lm);
                continue;
            }
            softmax_row(row, c->causal ? i + 1 : L, Lm);
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Lm, dh, Lm, 1.f, P, Lm, j->V + u * tile, dh, 0.f,
                    j->O + u * tile, dh);
    }
}

em_status em_attn_padded_forward(float *O, float *P, const float *Q, const float *K, const float *V,
                                 const em_jattn_cfg *c, int Lmax, em_pool *pool) {
    em_status st = check(c, Lmax);
    if (st) return st;
    if (c->B == 0) return EM_OK;
    em_blas_init();
    job j = {.c = c, .Lmax = Lmax, .scale = cfg_scale(c), .O = O, .P = P, .Q = Q, .K = K, .V = V};
    em_pool_run(pool, fwd_task, &j);
    return EM_OK;
}

/* ------------------------------------------------------------ backward */

static void bwd_task(void *p, int ith, int nth) {
    const job *j = p;
    const em_jattn_cfg *c = j->c;
    const int Lm = j->Lmax, dh = c->dh;
    const size_t H = (size_t)c->H, tile = (size_t)Lm * (size_t)dh, sq = (size_t)Lm * (size_t)Lm;
    float *dS = j->scratch + (size_t)ith * sq;
    size_t lo, hi;
    em_split((size_t)c->B * H, ith, nth, &lo, &hi);
    for (size_t u = lo; u < hi; u++) {
        const int L = (int)(c->offsets[u / H + 1] - c->offsets[u / H]);
        const float *P = j->Pc + u * sq, *Q = j->Q + u * tile, *K = j->K + u * tile, *V = j->V + u * tile,
                    *dO = j->dO + u * tile;
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Lm, dh, Lm, 1.f, P, Lm, dO, dh, 1.f, j->dV + u * tile, dh);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Lm, Lm, dh, 1.f, dO, dh, V, dh, 0.f, dS, Lm);
        for (int i = 0; i < Lm; i++) {
            float *row = dS + (size_t)i * Lm;
            if (i >= L) {
                memset(row, 0, sizeof(float) * (size_t)Lm);
                continue;
            }
            softmax_bwd_row(row, P + (size_t)i * Lm, c->causal ? i + 1 : L, Lm);
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Lm, dh, Lm, j->scale, dS, Lm, K, dh, 1.f,
                    j->dQ + u * tile, dh);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Lm, dh, Lm, j->scale, dS, Lm, Q, dh, 1.f,
                    j->dK + u * tile, dh);
    }
}

em_status em_attn_padded_backward(float *dQ, float *dK, float *dV, const float *dO, const float *Q,
                                  const float *K, const float *V, const float *P,
                                  const em_jattn_cfg *c, int Lmax, em_pool *pool) {
    em_status st = check(c, Lmax);
    if (st) return st;
    if (c->B == 0) return EM_OK;
    const int nth = em_pool_nth(pool);
    float *scratch = em_malloc(sizeof(float) * (size_t)nth * (size_t)Lmax * (size_t)Lmax);
    if (!scratch) return em_errorf(EM_ERR_NOMEM, "attn_padded: %d x %d x %d backward scratch", nth, Lmax, Lmax);
    em_blas_init();
    job j = {.c = c, .Lmax = Lmax, .scale = cfg_scale(c), .dQ = dQ, .dK = dK, .dV = dV, .scratch = scratch,
             .Q = Q, .K = K, .V = V, .dO = dO, .Pc = P};
    em_pool_run(pool, bwd_task, &j);
    em_free(scratch);
    return EM_OK;
}
