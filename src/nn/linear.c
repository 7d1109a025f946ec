/*
 * linear.c - the fully connected layer, out(B,O) = in(B,I) @ W(O,I)^T + b(O), and its
 * backward, and the MLP chains (em_mlp_*). AVX-512 builds hand every call to ember's
 * own kernels (linear_avx512.c); what follows here is the OpenBLAS path they fall back
 * to (other builds, em_linear_set_impl(1), or no memory for their workspace), on top
 * of single-threaded cblas_sgemm.
 *
 * Parallelism and determinism. Every output (out, dW, din, db) is cut into tiles
 * whose boundaries depend only on the shape (B, I, O), never on the thread count;
 * each tile is one sgemm call (or one column-sum loop) and is computed by exactly one
 * worker. OpenBLAS's blocking inside a call may make an element's rounding depend on
 * the call's shape, so fixing the tiles is what makes the result bitwise identical for
 * any nth. Workers pull tiles from a shared atomic counter: which worker computes a
 * tile is not deterministic, but what the tile holds is, and dynamic pulling keeps the
 * uneven backward task mix (dW tiles, din tiles, db columns) balanced.
 *
 * Tile shapes. Each sgemm call packs both of its operands, so a tile of m x n outputs
 * with reduction length k costs (m + n) k of packing for m n k FMAs: tiles want to be
 * large and square-ish, but there must be enough of them to feed the pool
 * (make_tiling). Tuned on the Kaggle DLRM layers at batch 128 and 2048 on 2 cores:
 * up to 256 x 512 tiles, split until there are 4 per op, reach ~88% (B=2048) and
 * ~76% (B=128) of two perfectly scaled single-threaded full-size sgemm calls; a
 * target of 8 or 16 tiles costs 5-15% there from repeated packing.
 *
 * Backward reduces over the batch inside one sgemm per dW tile (dW = dout^T @ in), so
 * no per-thread partial gradients and no second reduction pass are needed; db sums
 * each column in batch order b = 0..B-1.
 */
#include <stdatomic.h>
#include <string.h>

#include "ember/nn.h"
#include "core/blas.h"
#include "core/simd.h"
#include "nn/linear_impl.h"
/* OpenBLAS's cblas.h pulls in <complex.h>, whose macro I would clobber our shape names. */
#undef I

/* Tile planning: start from TILE_M_MAX x TILE_N_MAX tiles (big tiles amortise the
 * operand packing), then halve the longer side, in multiples of 16, until there are
 * TILE_TARGET tiles or a tile would fall under TILE_MIN_FMAS multiply-adds. */
#ifndef TILE_M_MAX
#define TILE_M_MAX 256
#endif
#ifndef TILE_N_MAX
#define TILE_N_MAX 512
#endif
#ifndef TILE_TARGET
#define TILE_TARGET 4
#endif
#ifndef TILE_MIN_FMAS
#define TILE_MIN_FMAS (1 << 18)
#endif
/* em_linear_set_impl: 1 = OpenBLAS tiles even where the AVX-512 kernels are built. */
static atomic_int force_blas;

void em_linear_set_impl(int blas) { atomic_store(&force_blas, blas); }
int em_linear_impl(void) {
    return atomic_load(&force_blas) || em__linear_fwd_avx512(NULL, NULL, NULL, NULL, 0, 0, 0, 0, NULL) < 0;
}

/* Output columns per db task. */
#define DB_COLS 256

typedef struct {
    int rows, cols;       /* extent of the tiled matrix */
    int tm, tn;           /* tile size */
    int nr, nc;           /* tile grid */
} tiling;

static int cdiv(int a, int b) { return (a + b - 1) / b; }
static int halve16(int x) { int h = cdiv(cdiv(x, 2), 16) * 16; return h < 16 ? 16 : h; }

/* The tiling of a rows x cols output whose elements each reduce over k products.
 * Depends on the shape only, never on the thread count. */
static tiling make_tiling(int rows, int cols, int k) {
    tiling t;
    t.rows = rows;
    t.cols = cols;
    t.tm = rows < TILE_M_MAX ? rows : TILE_M_MAX;
    t.tn = cols < TILE_N_MAX ? cols : TILE_N_MAX;
    if (t.tm < 1) t.tm = 1;
    if (t.tn < 1) t.tn = 1;
    for (;;) {
        if (cdiv(rows, t.tm) * cdiv(cols, t.tn) >= TILE_TARGET) break;
        if ((double)t.tm * t.tn * (k > 1 ? k : 1) < 2.0 * TILE_MIN_FMAS) break;
        if (t.tm >= t.tn && t.tm > 16) t.tm = halve16(t.tm);
        else if (t.tn > 16) t.tn = halve16(t.tn);
        else if (t.tm > 16) t.tm = halve16(t.tm);
        else break;
    }
    t.nr = cdiv(rows, t.tm);
    t.nc = cdiv(cols, t.tn);
    return t;
}

static int tiling_count(const tiling *t) { return t->rows > 0 && t->cols > 0 ? t->nr * t->nc : 0; }

/* Bounds of tile `k` of `t`: rows [*r0, *r1), cols [*c0, *c1). */
static void tile_bounds(const tiling *t, int k, int *r0, int *r1, int *c0, int *c1) {
    int ir = k / t->nc, ic = k % t->nc;
    *r0 = ir * t->tm;
    *r1 = *r0 + t->tm < t->rows ? *r0 + t->tm : t->rows;
    *c0 = ic * t->tn;
    *c1 = *c0 + t->tn < t->cols ? *c0 + t->tn : t->cols;
}

/* ------------------------------------------------------------------ forward */

typedef struct {
    float *out;
    const float *in, *W, *b;
    int B, I, O;
    int relu; /* apply ReLU to each tile right after its sgemm, while it is in cache */
    tiling t;
    atomic_int next;
} fwd_arg;

static void fwd_task(void *p, int ith, int nth) {
    (void)ith, (void)nth;
    fwd_arg *a = p;
    const int n = tiling_count(&a->t);
    for (;;) {
        int k = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (k >= n) break;
        int r0, r1, c0, c1;
        tile_bounds(&a->t, k, &r0, &r1, &c0, &c1);
        float *out = a->out + (size_t)r0 * a->O + c0;
        float beta = 0.f;
        if (a->b) { /* bias first, then sgemm accumulates onto it (torch addmm order) */
            for (int r = r0; r < r1; r++)
                memcpy(a->out + (size_t)r * a->O + c0, a->b + c0, (size_t)(c1 - c0) * sizeof(float));
            beta = 1.f;
        }
        if (a->I == 0) {
            if (!a->b)
                for (int r = r0; r < r1; r++) memset(a->out + (size_t)r * a->O + c0, 0, (size_t)(c1 - c0) * sizeof(float));
            continue;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, r1 - r0, c1 - c0, a->I, 1.f,
                    a->in + (size_t)r0 * a->I, a->I, a->W + (size_t)c0 * a->I, a->I, beta, out, a->O);
        if (a->relu)
            for (int r = r0; r < r1; r++) em_relu_forward(a->out + (size_t)r * a->O + c0, a->out + (size_t)r * a->O + c0, (size_t)(c1 - c0));
    }
}

static void linear_forward(float *out, const float *in, const float *W, const float *b, int B, int I, int O, int relu,
                           em_pool *pool) {
    if (B <= 0 || O <= 0) return;
    if (!atomic_load(&force_blas) && em__linear_fwd_avx512(out, in, W, b, B, I, O, relu, pool) == 0) return;
    em_blas_init();
    fwd_arg a = {.out = out, .in = in, .W = W, .b = b, .B = B, .I = I, .O = O, .relu = relu, .t = make_tiling(B, O, I)};
    atomic_init(&a.next, 0);
    if (tiling_count(&a.t) == 1) fwd_task(&a, 0, 1); /* skip the pool wake-up for one tile */
    else em_pool_run(pool, fwd_task, &a);
}

void em_linear_forward(float *out, const float *in, const float *W, const float *b,
                       int B, int I, int O, em_pool *pool) {
    linear_forward(out, in, W, b, B, I, O, 0, pool);
}

void em_linear_relu_forward(float *out, const float *in, const float *W, const float *b,
                            int B, int I, int O, em_pool *pool) {
    linear_forward(out, in, W, b, B, I, O, 1, pool);
}

/* ----------------------------------------------------------------- backward */

typedef struct {
    float *din, *dW, *db;
    const float *dout, *in, *W;
    int B, I, O;
    float beta;    /* 1: accumulate into din/dW/db, 0: overwrite them */
    int mask_in;   /* din *= (in > 0) */
    tiling tw, ti; /* dW(O,I) tiles, din(B,I) tiles */
    int nw, ni, nb; /* task counts: dW tiles, din tiles, db column blocks */
    atomic_int next;
} bwd_arg;

/* db[c0:c1) (+)= sum_b dout[b, c0:c1), each column summed in order b = 0..B-1. */
static void db_block(bwd_arg *a, int c0, int c1) {
    float s[DB_COLS];
    const size_t n = (size_t)(c1 - c0);
    memset(s, 0, n * sizeof(float));
    for (int r = 0; r < a->B; r++) em_vadd(s, a->dout + (size_t)r * a->O + c0, n);
    if (a->beta != 0.f) em_vadd(a->db + c0, s, n);
    else memcpy(a->db + c0, s, n * sizeof(float));
}

static void bwd_task(void *p, int ith, int nth) {
    (void)ith, (void)nth;
    bwd_arg *a = p;
    const int n = a->nw + a->ni + a->nb;
    for (;;) {
        int k = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (k >= n) break;
        int r0, r1, c0, c1;
        if (k < a->nw) { /* dW[r0:r1, c0:c1] += dout[:, r0:r1]^T @ in[:, c0:c1] */
            tile_bounds(&a->tw, k, &r0, &r1, &c0, &c1);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r1 - r0, c1 - c0, a->B, 1.f,
                        a->dout + r0, a->O, a->in + c0, a->I, a->beta, a->dW + (size_t)r0 * a->I + c0, a->I);
        } else if (k < a->nw + a->ni) { /* din[r0:r1, c0:c1] += dout[r0:r1, :] @ W[:, c0:c1] */
            tile_bounds(&a->ti, k - a->nw, &r0, &r1, &c0, &c1);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, r1 - r0, c1 - c0, a->O, 1.f,
                        a->dout + (size_t)r0 * a->O, a->O, a->W + c0, a->I, a->beta,
                        a->din + (size_t)r0 * a->I + c0, a->I);
            if (a->mask_in)
                for (int r = r0; r < r1; r++)
                    em_vrelu_mask(a->din + (size_t)r * a->I + c0, a->in + (size_t)r * a->I + c0, (size_t)(c1 - c0));
        } else {
            c0 = (k - a->nw - a->ni) * DB_COLS;
            c1 = c0 + DB_COLS < a->O ? c0 + DB_COLS : a->O;
            db_block(a, c0, c1);
        }
    }
}

static void linear_backward(float *din, float *dW, float *db, const float *dout, const float *in, const float *W,
                            int B, int I, int O, float beta, int mask_in, em_pool *pool) {
    if (B <= 0 || O <= 0) return;
    if (!atomic_load(&force_blas) && em__linear_bwd_avx512(din, dW, db, dout, in, W, B, I, O, beta != 0.f, mask_in, pool) == 0)
        return;
    em_blas_init();
    bwd_arg a = {.din = din, .dW = dW, .db = db, .dout = dout, .in = in, .W = W, .B = B, .I = I, .O = O, .beta = beta,
                 .mask_in = mask_in};
    a.tw = make_tiling(O, I, B);
    a.ti = make_tiling(B, I, O);
    a.nw = dW && I > 0 ? tiling_count(&a.tw) : 0; /* NULL dW (a frozen layer) is tolerated */
    a.ni = din && I > 0 ? tiling_count(&a.ti) : 0;
    a.nb = db ? (O + DB_COLS - 1) / DB_COLS : 0;
    atomic_init(&a.next, 0);
    if (a.nw + a.ni + a.nb == 1) bwd_task(&a, 0, 1);
    else em_pool_run(pool, bwd_task, &a);
}

void em_linear_backward(float *din, float *dW, float *db, const float *dout, const float *in,
                        const float *W, int B, int I, int O, em_pool *pool) {
    linear_backward(din, dW, db, dout, in, W, B, I, O, 1.f, 0, pool);
}

void em_linear_backward_set(float *din, float *dW, float *db, const float *dout, const float *in,
                            const float *W, int B, int I, int O, em_pool *pool) {
    linear_backward(din, dW, db, dout, in, W, B, I, O, 0.f, 0, pool);
}

void em_linear_backward_set_relu_in(float *din, float *dW, float *db, const float *dout, const float *in,
                                    const float *W, int B, int I, int O, em_pool *pool) {
    linear_backward(din, dW, db, dout, in, W, B, I, O, 0.f, 1, pool);
}

/* ------------------------------------------------------------------- MLP */

void em_mlp_forward(const em_mlp_layer *L, int n, const float *in, int B, em_pool *pool) {
    if (n <= 0 || B <= 0) return;
    if (!atomic_load(&force_blas) && em__mlp_fwd_avx512(L, n, in, B, pool) == 0) return;
    for (int l = 0; l < n; l++)
        linear_forward(L[l].out, l ? L[l - 1].out : in, L[l].W, L[l].b, B, L[l].I, L[l].O, L[l].relu, pool);
}

void em_mlp_backward(const em_mlp_layer *L, int n, const float *in, const float *dout, int B, em_pool *pool) {
    if (n <= 0 || B <= 0) return;
    if (!atomic_load(&force_blas) && em__mlp_bwd_avx512(L, n, in, dout, B, pool) == 0) return;
    for (int l = n - 1; l >= 0; l--)
        linear_backward(L[l].din, L[l].dW, L[l].db, l == n - 1 ? dout : L[l + 1].din, l ? L[l - 1].out : in, L[l].W, B,
                        L[l].I, L[l].O, 0.f, l > 0 && L[l - 1].relu, pool);
}
