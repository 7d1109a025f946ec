/*
 * infer.c - the inference-only forward pass of a plain DLRM (em_infer, ember/serve.h):
 * what the server's batcher and `ember bench --infer` run.
 *
 * The training forward (model/dlrm.c) cuts every layer's GEMM into tiles that depend
 * on the shape only, each one single-threaded sgemm call, and launches the pool once
 * per layer (about 10 launches and barriers a pass). That keeps training bitwise
 * independent of the thread count, but at inference shapes (K = 13 for the first
 * layer, N = 16 and N = 1 at the ends, a 367-wide interaction) it ran at ~60% of the
 * large-GEMM rate. Here:
 *
 *  - Row chunks. The batch is cut into chunks of CHUNK (48) examples (the last ~2 nth
 *    CHUNK rows into chunks of 12, so the workers finish together); a worker takes a
 *    whole chunk through the pooling, the bottom MLP, the interaction and the top MLP
 *    before taking the next (an atomic counter), with its activations in two
 *    per-worker buffers that stay in its L2. One pool launch a pass, no barrier
 *    between layers; batches of at most SINGLE run on the caller alone.
 *  - Packed weights, fused bias and ReLU (AVX-512 builds). Each layer's weights are
 *    packed once, at create, into panels of 32 (or 16) output columns, k-major, zero-
 *    padded to the panel width; a register-blocked kernel computes 12 rows x 32
 *    columns at a time (24 zmm accumulators) starting from the bias, one FMA per k in
 *    order k = 0..K-1, and applies the ReLU as it stores. The activations are read in
 *    place (broadcast loads), never packed or copied. A layer with one output (the
 *    logit) is a dot product per row instead: 16 lanes of partial sums over k = l,
 *    l + 16, ... in order, then a fixed reduction tree and the bias (a 16-wide panel
 *    spent 16 FMA lanes per useful one: ~8x slower).
 *  - Interaction (em_dot_interact_rows, nn/interaction.c, which the training forward
 *    shares): per example, the Gram rows of the T pooled vectors against [bottom,
 *    pooled] as one small product with the kernel's register blocking (D = 16: the
 *    vectors transposed into a 16 x 32 panel with two 16x16 register transposes), each
 *    row's part of the strict lower triangle stored straight into its place in
 *    torch.tril_indices order, rows up to 16 computing 16 columns, not 32 (1.4x
 *    faster than the kernel into a scratch matrix and a copy); other D: em_vdot per
 *    pair.
 *
 * Determinism. Every output element of every layer is bias + sum_k x_k w_k with the
 * FMAs in k order (the logit: in the dot product's fixed order), whatever the chunk,
 * the row block or the worker: an example's logit depends on the example alone,
 * bitwise, not on the batch it shares, the batch size or the thread count. It differs from the training forward's (OpenBLAS's
 * K-blocking, bias added first) only by float rounding (tests: 1e-5 relative).
 * Without AVX-512 the same chunks run OpenBLAS (bias, sgemm with beta = 1, ReLU);
 * their answers then depend on the chunk shapes, i.e. on the batch size and the
 * thread count (deterministic for a given pair).
 *
 * Pooling. With the model's own fp32 tables a worker pools its chunk's bags itself,
 * just before computing the chunk (as em_embbag_forward does: index order, the same
 * adds, rows a few indices ahead prefetched), into a per-worker buffer of one chunk's
 * rows, so a pass is one pool launch and the pooled rows are written to the same L2
 * lines chunk after chunk and still there for the interaction (pooling into a (B, T,
 * D) buffer wrote cold lines every chunk: 3% slower). Tried and dropped: prefetching
 * the next chunk's rows a few at a time between kernel calls, to overlap the random
 * row reads with the GEMMs (more CPU time per batch, not less: the rows were evicted
 * again before use and the prefetches slowed the kernel), and a prefetch pass over
 * the whole chunk before pooling it (no better), a longer or shorter prefetch
 * distance (8, 32: no different). Quantized tables are pooled by the caller
 * (em_qbag_forward) and passed in.
 *
 * Also tried and dropped (no gain measurable, same-process A/B): the layers panel by
 * panel with K blocks of 128 through all of a chunk's row blocks (each panel read
 * from L2 once per chunk instead of once per 12 rows), chunks of 24 or 96, prefetching
 * the activations' lines or the weights into L2 further ahead, Gram calls of up to 16
 * rows.
 */
#include <stdatomic.h>
#include <string.h>

#include "core/blas.h"
#include "core/simd.h"
#include "ember/embbag.h"
#include "ember/nn.h"
#include "ember/serve.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#define EM_INFER_AVX512 1
#endif

#define CHUNK 48   /* examples per work chunk (4 row blocks of 12) */
#define MR 12      /* rows per register block */
#define SINGLE 24  /* batches up to this run as one chunk on the caller (no pool launch) */
#define PF_AHEAD 16 /* embedding rows prefetched ahead of the pooling */
#define PF_K 16     /* packed weight rows (k) prefetched into L1 ahead of the kernel's loads */
#define MAXL (2 * EM_DLRM_MAX_LAYERS + 2)

typedef struct {
    int in, out, relu;
    const float *w, *b; /* the model's (out, in) weights and (out) bias */
    float *pk;          /* packed panels (AVX-512): panel p at pk + in * 32 * p, width pw[p] */
    float *pb;          /* bias padded to the packed width */
    int np;             /* panels */
} ilayer;

struct em_infer {
    em_dlrm *m;
    int nd, T, D, n_bot, n_top, width; /* width: widest activation (incl. interaction) */
    ilayer L[MAXL];
    const float *tw[EM_DLRM_MAX_TABLES]; /* the model's fp32 tables (fused pooling) */
    int64_t rows[EM_DLRM_MAX_TABLES];
    em_pooling pooling;
    float *scratch;     /* per worker: 2 x CHUNK x width activations, then CHUNK x T x D pooled */
    size_t per_worker;  /* floats of scratch per worker */
    int cap_nth;
};

/* ------------------------------------------------------------------ kernels */

#ifdef EM_INFER_AVX512
/* C[r, 0 .. 16 NV) for r < mr (mr <= MR, a compile-time constant after inlining) =
 * relu?(bias + A[r, :] . panel), the panel k-major with 16 NV floats per k; columns at
 * or beyond ncol are not stored. */
static inline __attribute__((always_inline)) void kern(const int mr, const int NV, const float *A, int lda,
                                                       const float *P, const float *bias, int K, float *C, int ldc,
                                                       int ncol, int relu) {
    __m512 acc[MR][2];
    const __m512 b0 = _mm512_loadu_ps(bias), b1 = NV > 1 ? _mm512_loadu_ps(bias + 16) : b0;
#pragma GCC unroll 12
    for (int r = 0; r < mr; r++) acc[r][0] = b0, acc[r][1] = b1;
    for (int k = 0; k < K; k++) {
        /* the panel PF_K rows ahead (past its end: the next panel's start) */
        _mm_prefetch((const char *)(P + (size_t)(k + PF_K) * 16 * NV), _MM_HINT_T0);
        if (NV > 1) _mm_prefetch((const char *)(P + (size_t)(k + PF_K) * 16 * NV + 16), _MM_HINT_T0);
        const __m512 w0 = _mm512_loadu_ps(P + (size_t)k * 16 * NV);
        const __m512 w1 = NV > 1 ? _mm512_loadu_ps(P + (size_t)k * 16 * NV + 16) : w0;
#pragma GCC unroll 12
        for (int r = 0; r < mr; r++) {
            const __m512 a = _mm512_set1_ps(A[(size_t)r * lda + k]);
            acc[r][0] = _mm512_fmadd_ps(a, w0, acc[r][0]);
            if (NV > 1) acc[r][1] = _mm512_fmadd_ps(a, w1, acc[r][1]);
        }
    }
    const __m512 z = _mm512_setzero_ps();
    const __mmask16 m0 = ncol >= 16 ? 0xffff : (__mmask16)((1u << ncol) - 1);
    const __mmask16 m1 = ncol >= 32 ? 0xffff : ncol <= 16 ? 0 : (__mmask16)((1u << (ncol - 16)) - 1);
#pragma GCC unroll 12
    for (int r = 0; r < mr; r++) {
        __m512 v0 = acc[r][0], v1 = acc[r][1];
        if (relu) v0 = _mm512_max_ps(v0, z), v1 = _mm512_max_ps(v1, z);
        _mm512_mask_storeu_ps(C + (size_t)r * ldc, m0, v0);
        if (NV > 1) _mm512_mask_storeu_ps(C + (size_t)r * ldc + 16, m1, v1);
    }
}

static void kern_12_2(const float *A, int lda, const float *P, const float *b, int K, float *C, int ldc, int n, int relu) {
    kern(12, 2, A, lda, P, b, K, C, ldc, n, relu);
}
static void kern_4_2(const float *A, int lda, const float *P, const float *b, int K, float *C, int ldc, int n, int relu) {
    kern(4, 2, A, lda, P, b, K, C, ldc, n, relu);
}
static void kern_1_2(const float *A, int lda, const float *P, const float *b, int K, float *C, int ldc, int n, int relu) {
    kern(1, 2, A, lda, P, b, K, C, ldc, n, relu);
}
static void kern_12_1(const float *A, int lda, const float *P, const float *b, int K, float *C, int ldc, int n, int relu) {
    kern(12, 1, A, lda, P, b, K, C, ldc, n, relu);
}
static void kern_4_1(const float *A, int lda, const float *P, const float *b, int K, float *C, int ldc, int n, int relu) {
    kern(4, 1, A, lda, P, b, K, C, ldc, n, relu);
}
static void kern_1_1(const float *A, int lda, const float *P, const float *b, int K, float *C, int ldc, int n, int relu) {
    kern(1, 1, A, lda, P, b, K, C, ldc, n, relu);
}

/* A layer with one output (the logit): C[r * ldc] = relu?(b + A[r, :] . w) for r < mr,
 * w the model's weight row; 16 lanes of partial sums (lane l: k = l, l + 16, ... in
 * order, the K % 16 tail through masked loads) added up by the fixed shuffle tree of
 * _mm512_reduce_add_ps, then the bias. A 16-wide panel would spend 16 FMA lanes per
 * useful one. */
static inline __attribute__((always_inline)) void kern_dot(const int mr, const float *A, int lda, const float *w,
                                                           float b, int K, float *C, int ldc, int relu) {
    __m512 acc[MR];
#pragma GCC unroll 12
    for (int r = 0; r < mr; r++) acc[r] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m512 wv = _mm512_loadu_ps(w + k);
#pragma GCC unroll 12
        for (int r = 0; r < mr; r++) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(A + (size_t)r * lda + k), wv, acc[r]);
    }
    if (k < K) {
        const __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
        const __m512 wv = _mm512_maskz_loadu_ps(m, w + k);
#pragma GCC unroll 12
        for (int r = 0; r < mr; r++) acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, A + (size_t)r * lda + k), wv, acc[r]);
    }
#pragma GCC unroll 12
    for (int r = 0; r < mr; r++) {
        const float v = _mm512_reduce_add_ps(acc[r]) + b;
        C[(size_t)r * ldc] = relu && !(v > 0.f) ? 0.f : v;
    }
}

static void dot_12(const float *A, int lda, const float *w, float b, int K, float *C, int ldc, int relu) {
    kern_dot(12, A, lda, w, b, K, C, ldc, relu);
}
static void dot_1(const float *A, int lda, const float *w, float b, int K, float *C, int ldc, int relu) {
    kern_dot(1, A, lda, w, b, K, C, ldc, relu);
}

/* Panel p of a layer covers columns [32 p, 32 p + 32); the last one is 16 wide when
 * at most 16 columns are left. */
static int panel_width(const ilayer *L, int p) { return L->out - 32 * p > 16 ? 32 : 16; }

/* out(M, O) = relu?(in(M, I) W^T + b), rows of `in` ldi apart, of out ldo apart. */
static void layer_fwd(const ilayer *L, const float *in, int ldi, float *out, int ldo, int M) {
    const int K = L->in;
    if (L->out == 1) {
        int r0 = 0;
        for (; r0 + MR <= M; r0 += MR) dot_12(in + (size_t)r0 * ldi, ldi, L->w, L->b[0], K, out + (size_t)r0 * ldo, ldo, L->relu);
        for (; r0 < M; r0++) dot_1(in + (size_t)r0 * ldi, ldi, L->w, L->b[0], K, out + (size_t)r0 * ldo, ldo, L->relu);
        return;
    }
    for (int r0 = 0; r0 < M;) {
        const int mr = M - r0 >= MR ? MR : M - r0 >= 4 ? 4 : 1;
        for (int p = 0; p < L->np; p++) {
            const int c0 = 32 * p, pw = panel_width(L, p), n = L->out - c0;
            const float *P = L->pk + (size_t)K * 32 * p, *b = L->pb + c0;
            const float *A = in + (size_t)r0 * ldi;
            float *C = out + (size_t)r0 * ldo + c0;
            if (pw == 32) {
                if (mr == MR) kern_12_2(A, ldi, P, b, K, C, ldo, n, L->relu);
                else if (mr == 4) kern_4_2(A, ldi, P, b, K, C, ldo, n, L->relu);
                else kern_1_2(A, ldi, P, b, K, C, ldo, n, L->relu);
            } else {
                if (mr == MR) kern_12_1(A, ldi, P, b, K, C, ldo, n, L->relu);
                else if (mr == 4) kern_4_1(A, ldi, P, b, K, C, ldo, n, L->relu);
                else kern_1_1(A, ldi, P, b, K, C, ldo, n, L->relu);
            }
        }
        r0 += mr;
    }
}

static int pack_layer(ilayer *L) {
    const int K = L->in, O = L->out;
    L->np = (O + 31) / 32;
    const size_t cols = (size_t)32 * L->np;
    L->pk = em_calloc(cols * (size_t)(K > 0 ? K : 1) + 32 * PF_K, sizeof(float)); /* + the prefetches past the end */
    L->pb = em_calloc(cols, sizeof(float));
    if (!L->pk || !L->pb) return -1;
    for (int p = 0; p < L->np; p++) {
        const int pw = panel_width(L, p);
        float *P = L->pk + (size_t)K * 32 * p;
        for (int k = 0; k < K; k++)
            for (int c = 0; c < pw && 32 * p + c < O; c++) P[(size_t)k * pw + c] = L->w[(size_t)(32 * p + c) * K + k];
    }
    memcpy(L->pb, L->b, (size_t)O * sizeof(float));
    return 0;
}

static inline float dot16(const float *a, const float *b) {
    return _mm512_reduce_add_ps(_mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b)));
}
#else
static void layer_fwd(const ilayer *L, const float *in, int ldi, float *out, int ldo, int M) {
    for (int r = 0; r < M; r++) memcpy(out + (size_t)r * ldo, L->b, (size_t)L->out * sizeof(float));
    if (L->in > 0)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, L->out, L->in, 1.f, in, ldi, L->w, L->in, 1.f, out,
                    ldo);
    if (L->relu)
        for (int r = 0; r < M; r++) em_relu_forward(out + (size_t)r * ldo, out + (size_t)r * ldo, (size_t)L->out);
}
static int pack_layer(ilayer *L) {
    (void)L;
    return 0;
}
#endif

/* Pool rows [r0, r1) of the batch from the model's fp32 tables into pooled (r1 - r0,
 * T, D), as em_embbag_forward does (in index order, em_vadd / em_vaxpy, mean scaled
 * after); -1 on an index out of range. */
static int pool_rows(const em_infer *inf, float *pooled, const int64_t *idx, const int64_t *off, const float *pw, int B,
                     int r0, int r1) {
    const int T = inf->T;
    const size_t D = (size_t)inf->D;
    /* the prefetch cursor runs PF_AHEAD indices ahead through the chunk's bags, table
     * after table (tp: its table, kp its index, kp_end the end of tp's bags) */
    int tp = 0;
    int64_t kp = off[r0], kp_end = off[r1];
    for (int n = 0; n < PF_AHEAD; n++) {
        while (kp >= kp_end && tp < T) {
            if (++tp < T) kp = off[(size_t)tp * B + r0], kp_end = off[(size_t)tp * B + r1];
        }
        if (tp >= T) break;
        const uint64_t rp = (uint64_t)idx[kp++];
        if (rp < (uint64_t)inf->rows[tp]) __builtin_prefetch(inf->tw[tp] + rp * D, 0, 3);
    }
    for (int t = 0; t < T; t++) {
        const float *W = inf->tw[t];
        const uint64_t rows = (uint64_t)inf->rows[t];
        const int64_t *o = off + (size_t)t * B;
        for (int b = r0; b < r1; b++) {
            float *dst = pooled + ((size_t)(b - r0) * T + t) * D;
            const int64_t k0 = o[b], k1 = o[b + 1];
            memset(dst, 0, D * sizeof(float));
            for (int64_t k = k0; k < k1; k++) {
                while (kp >= kp_end && tp < T) {
                    if (++tp < T) kp = off[(size_t)tp * B + r0], kp_end = off[(size_t)tp * B + r1];
                }
                if (tp < T) {
                    const uint64_t rp = (uint64_t)idx[kp++];
                    if (rp < (uint64_t)inf->rows[tp]) __builtin_prefetch(inf->tw[tp] + rp * D, 0, 3);
                }
                const uint64_t r = (uint64_t)idx[k];
                if (r >= rows) return -1;
                if (pw) em_vaxpy(dst, pw[k], W + r * D, D);
                else em_vadd(dst, W + r * D, D);
            }
            if (inf->pooling == EM_POOL_MEAN && k1 > k0) em_vscale(dst, 1.0f / (float)(k1 - k0), D);
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- the pass */

typedef struct {
    em_infer *inf;
    const em_batch *b;
    const float *dense, *pooled; /* pooled: the caller's (B, T, D), or NULL: pool the model's own tables */
    float *logits;
    int B, cs, nchunks; /* cs: rows per chunk (<= CHUNK) */
    int big, nbig;      /* rows [0, big) in nbig chunks of cs, the rest in chunks of MR */
    atomic_int next;
    atomic_int bad;     /* an index out of range: the chunk's first row */
} pass_arg;

/* Rows [r0, r0 + M) of the batch; pooled: their (M, T, D) pooled embeddings. */
static void run_chunk(em_infer *inf, const float *dense, const float *pooled, float *logits, int r0, int M,
                      float *buf0, float *buf1) {
    const int W = inf->width, nb = inf->n_bot - 1, nt = inf->n_top - 1;
    const float *in = dense + (size_t)r0 * inf->nd;
    int ldi = inf->nd;
    float *cur = buf0, *nxt = buf1;
    for (int l = 0; l < nb; l++) {
        layer_fwd(&inf->L[l], in, ldi, cur, W, M);
        in = cur, ldi = W;
        float *t = cur;
        cur = nxt, nxt = t;
    }
    /* in: the bottom output (M, D) with stride W; the interaction into cur */
    em_dot_interact_rows(cur, W, in, W, pooled, inf->T, inf->D, M);
    in = cur, ldi = W;
    {
        float *t = cur;
        cur = nxt, nxt = t;
    }
    for (int l = 0; l < nt; l++) {
        const ilayer *L = &inf->L[nb + l];
        if (l == nt - 1) { /* the logit column straight into logits */
            layer_fwd(L, in, ldi, logits + r0, 1, M);
            break;
        }
        layer_fwd(L, in, ldi, cur, W, M);
        in = cur, ldi = W;
        float *t = cur;
        cur = nxt, nxt = t;
    }
}

/* Workers take chunks from a shared counter; each pools its chunk's bags first when
 * the pass pools the model's own tables, into its own scratch (the same lines chunk
 * after chunk, still in its L2: not a fresh part of a (B, T, D) buffer each time). */
static void pass_task(void *p, int ith, int nth) {
    (void)nth;
    pass_arg *a = p;
    em_infer *inf = a->inf;
    float *buf0 = inf->scratch + (size_t)ith * inf->per_worker, *buf1 = buf0 + (size_t)CHUNK * inf->width,
          *pbuf = buf1 + (size_t)CHUNK * inf->width;
    const em_batch *b = a->b;
    for (;;) {
        const int c = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (c >= a->nchunks) break;
        const int cs = c < a->nbig || !a->big ? a->cs : MR;
        const int r0 = c < a->nbig || !a->big ? c * cs : a->big + (c - a->nbig) * MR;
        const int M = a->B - r0 < cs ? a->B - r0 : cs;
        if (!a->pooled && pool_rows(inf, pbuf, b->indices, b->offsets, b->per_id_w, a->B, r0, r0 + M)) {
            atomic_store(&a->bad, 1);
            return;
        }
        run_chunk(inf, a->dense, a->pooled ? a->pooled + (size_t)r0 * inf->T * inf->D : pbuf, a->logits, r0, M, buf0, buf1);
    }
}

/* ------------------------------------------------------------------- API */

void em_infer_free(em_infer *inf) {
    if (!inf) return;
    for (int l = 0; l < MAXL; l++) em_free(inf->L[l].pk), em_free(inf->L[l].pb);
    em_free(inf->scratch);
    em_free(inf);
}

static int reserve(em_infer *inf, int nth) {
    if (nth > inf->cap_nth) {
        float *s = em_malloc((size_t)nth * inf->per_worker * sizeof(float));
        if (!s) return -1;
        em_free(inf->scratch);
        inf->scratch = s, inf->cap_nth = nth;
    }
    return 0;
}

em_status em_infer_create(em_infer **out, em_dlrm *m, int max_batch, int nth) {
    *out = NULL;
    if (!m) return em_errorf(EM_ERR_INVALID, "infer: NULL model");
    const em_dlrm_cfg *c = em_dlrm_config(m);
    if (c->seq.num_seq) return em_errorf(EM_ERR_UNSUPPORTED, "infer: sequence models are not supported");
    em_infer *inf = em_calloc(1, sizeof *inf);
    if (!inf) return em_errorf(EM_ERR_NOMEM, "infer: out of memory");
    inf->m = m;
    inf->nd = c->num_dense, inf->T = c->num_tables, inf->D = c->dim;
    inf->n_bot = c->n_bot, inf->n_top = c->n_top;
    inf->pooling = c->pooling;
    for (int t = 0; t < c->num_tables; t++) inf->rows[t] = c->rows[t];
    inf->width = em_dot_interact_out_dim(c->num_tables, c->dim);
    const int nb = c->n_bot - 1, nt = c->n_top - 1;
    for (int l = 0; l < nb + nt; l++) {
        ilayer *L = &inf->L[l];
        char name[32];
        const int top = l >= nb, i = top ? l - nb : l;
        snprintf(name, sizeof name, "%s.%d.weight", top ? "top" : "bot", i);
        L->w = em_dlrm_param(m, name, 0, NULL);
        snprintf(name, sizeof name, "%s.%d.bias", top ? "top" : "bot", i);
        L->b = em_dlrm_param(m, name, 0, NULL);
        L->in = top ? c->top[i] : c->bot[i];
        L->out = top ? c->top[i + 1] : c->bot[i + 1];
        L->relu = l != nb + nt - 1;
        if (!L->w || !L->b) {
            em_infer_free(inf);
            return em_errorf(EM_ERR_INVALID, "infer: the model has no %s", name);
        }
        if (L->out > inf->width) inf->width = L->out;
        if (pack_layer(L)) {
            em_infer_free(inf);
            return em_errorf(EM_ERR_NOMEM, "infer: out of memory");
        }
    }
    inf->width = (inf->width + 15) / 16 * 16; /* rows of the scratch start on 64 bytes */
    /* per worker: two activation buffers and the chunk's pooled rows; nothing depends
     * on the batch size (max_batch), only on the thread count */
    (void)max_batch;
    inf->per_worker = (size_t)2 * CHUNK * inf->width + ((size_t)CHUNK * inf->T * inf->D + 15) / 16 * 16;
    if (reserve(inf, nth < 1 ? 1 : nth)) {
        em_infer_free(inf);
        return em_errorf(EM_ERR_NOMEM, "infer: out of memory");
    }
    *out = inf;
    return EM_OK;
}

em_status em_infer_forward(em_infer *inf, const em_batch *b, const float *pooled, float *logits, em_pool *pool) {
    if (!inf || !b || !logits) return em_errorf(EM_ERR_INVALID, "infer: NULL argument");
    if (b->B < 0 || b->num_dense != inf->nd || b->num_sparse != inf->T)
        return em_errorf(EM_ERR_INVALID, "infer: batch of %d examples with %d dense / %d sparse features, the model has %d / %d",
                         b->B, b->num_dense, b->num_sparse, inf->nd, inf->T);
    const int B = b->B;
    if (B == 0) return EM_OK;
    const int nth = em_pool_nth(pool);
    if (!pooled && !em_dlrm_embbag(inf->m))
        return em_errorf(EM_ERR_INVALID, "infer: the model's tables were released; pass the pooled embeddings");
    if (reserve(inf, nth)) return em_errorf(EM_ERR_NOMEM, "infer: out of memory");
    if (!pooled) { /* pool the model's own tables chunk by chunk, in the same pass */
        em_embbag *e = em_dlrm_embbag(inf->m);
        const int64_t *off = b->offsets;
        if (!off || off[0] != 0) return em_errorf(EM_ERR_INVALID, "infer: offsets must start at 0");
        for (size_t u = 0; u < (size_t)B * inf->T; u++)
            if (off[u + 1] < off[u]) return em_errorf(EM_ERR_INVALID, "infer: offsets decrease at bag %zu", u);
        if (off[(size_t)B * inf->T] && !b->indices) return em_errorf(EM_ERR_INVALID, "infer: indices is NULL");
        for (int t = 0; t < inf->T; t++) inf->tw[t] = em_embbag_weights(e, t);
    }
    em_blas_init();
    /* chunks: at most CHUNK rows, at least 2 per worker when the batch allows, and
     * one (no pool launch) up to SINGLE rows; answers do not depend on the cut */
    int cs = CHUNK, big = 0;
    if (B <= SINGLE) cs = B;
    else {
        int want = ((B + 2 * nth - 1) / (2 * nth) + MR - 1) / MR * MR;
        if (want < cs) cs = want;
        /* the last ~2 nth CHUNK rows in chunks of MR, so that the workers finish
         * within one small chunk of each other */
        if (nth > 1 && cs > MR && B > 2 * nth * CHUNK) big = (B - 2 * nth * CHUNK) / cs * cs;
    }
    const int nbig = big / cs;
    pass_arg a = {.inf = inf, .b = b, .dense = b->dense, .pooled = pooled, .logits = logits, .B = B,
                  .cs = cs, .big = big, .nbig = nbig,
                  .nchunks = big ? nbig + (B - big + MR - 1) / MR : (B + cs - 1) / cs};
    atomic_init(&a.next, 0);
    atomic_init(&a.bad, 0);
    if (a.nchunks == 1) pass_task(&a, 0, 1);
    else em_pool_run(pool, pass_task, &a);
    if (atomic_load(&a.bad)) { /* em_embbag_forward names the bad index */
        float *tmp = em_malloc((size_t)B * inf->T * inf->D * sizeof(float));
        em_status st = tmp ? em_embbag_forward(em_dlrm_embbag(inf->m), tmp, b->indices, b->offsets, b->per_id_w, B, NULL)
                           : em_errorf(EM_ERR_INVALID, "infer: an embedding index is out of range");
        em_free(tmp);
        return st;
    }
    return EM_OK;
}
