/*
 * test_nn_hsp.c - Kunlun's hierarchical seed pooling (ember/hsp.h) against references.
 *
 *   - a float64 reference written here: the full m x L scores per sample and head with
 *     a textbook softmax and backward (Z, lse, dSq, dK, dV), and the Kronecker sum as
 *     plain loops (Y, dZ, dA, dW); seed attention, compression and the composed block
 *     are each compared, with lengths 0, 1, 5, 64, 130 and 700 in one batch, m = 3 and
 *     m = 130 (two seed tiles), several block / dW-tile layouts of the compression;
 *   - central finite differences of the float64 reference (validates its analytic
 *     backward) and of the float kernels on a tiny case, for Sq, K, V, A, W;
 *   - bitwise equality for pools of 1, 2, 3 threads and a NULL pool;
 *   - nullable gradients; empty batch and all-empty samples;
 *   - bad configs -> EM_ERR_INVALID; allocation failures -> EM_ERR_NOMEM with nothing
 *     leaked and (separate calls) every gradient untouched;
 *   - tests/golden/hsp.safetensors from tools/make_golden_hsp.py (PyTorch autograd).
 * Tolerances: relative to the largest reference magnitude, 1e-5 for forward outputs
 * (Z, lse, Y), 1e-4 for gradients (sums over up to 700 keys and over the batch).
 * Backward is checked as an accumulation: gradients start at a non-zero pattern.
 */
#include "test.h"
#include "ember/hsp.h"

#define TOL_FWD 1e-5
#define TOL_GRAD 1e-4

/* ------------------------------------------------------------------ case */

typedef struct {
    int B, H, dh, m, m2, D2, k, D;
    float scale; /* as passed to the kernels; <= 0: 1/sqrt(dh) */
    int64_t *off;
    size_t nkv, nsq, nz, nl, na, nw, ny; /* element counts */
    float *Sq, *K, *V, *A, *W, *dY, *dZin; /* inputs; dZin: upstream of seed-only tests */
    float *Z, *lse, *Y;                    /* outputs */
    float *dSq, *dK, *dV, *dA, *dW, *dZ;   /* gradients (dZ: the compression's) */
} hcase;

static void fill(float *x, size_t n, em_rng *r, double s) {
    for (size_t i = 0; i < n; i++) x[i] = (float)(s * em_rng_normal(r));
}

static float *fbuf(size_t n) { return malloc(sizeof(float) * (n + 1)); }
static double *dbuf(size_t n) { return malloc(sizeof(double) * (n + 1)); }

static void hcase_init(hcase *c, const int *lens, int B, int H, int dh, int m, int m2, int D2,
                       int k, float scale, uint64_t seed) {
    memset(c, 0, sizeof *c);
    c->B = B, c->H = H, c->dh = dh, c->m = m, c->m2 = m2, c->D2 = D2, c->k = k, c->D = H * dh;
    c->scale = scale;
    c->off = malloc(sizeof(int64_t) * (size_t)(B + 1));
    c->off[0] = 0;
    for (int b = 0; b < B; b++) c->off[b + 1] = c->off[b] + lens[b];
    c->nkv = (size_t)c->off[B] * c->D;
    c->nsq = (size_t)m * c->D;
    c->nz = (size_t)B * m * c->D;
    c->nl = (size_t)B * m * H;
    c->na = (size_t)k * m * m2;
    c->nw = (size_t)k * c->D * D2;
    c->ny = (size_t)B * m2 * D2;
    c->Sq = fbuf(c->nsq), c->K = fbuf(c->nkv), c->V = fbuf(c->nkv), c->A = fbuf(c->na);
    c->W = fbuf(c->nw), c->dY = fbuf(c->ny), c->dZin = fbuf(c->nz);
    c->Z = fbuf(c->nz), c->lse = fbuf(c->nl), c->Y = fbuf(c->ny);
    c->dSq = fbuf(c->nsq), c->dK = fbuf(c->nkv), c->dV = fbuf(c->nkv), c->dA = fbuf(c->na);
    c->dW = fbuf(c->nw), c->dZ = fbuf(c->nz);
    em_rng r;
    em_rng_seed(&r, seed);
    fill(c->Sq, c->nsq, &r, 1.0);
    fill(c->K, c->nkv, &r, 1.0);
    fill(c->V, c->nkv, &r, 1.0);
    fill(c->A, c->na, &r, 1.0 / sqrt((double)m));
    fill(c->W, c->nw, &r, 1.0 / sqrt((double)c->D));
    fill(c->dY, c->ny, &r, 1.0);
    fill(c->dZin, c->nz, &r, 1.0);
}

static void hcase_free(hcase *c) {
    float *bufs[] = {c->Sq, c->K, c->V, c->A, c->W, c->dY, c->dZin, c->Z, c->lse, c->Y,
                     c->dSq, c->dK, c->dV, c->dA, c->dW, c->dZ};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) free(bufs[i]);
    free(c->off);
}

static em_hsp_cfg cfg_of(const hcase *c) {
    return (em_hsp_cfg){.attn = {.B = c->B, .H = c->H, .dh = c->dh, .offsets = c->off,
                                 .scale = c->scale},
                        .m = c->m, .m2 = c->m2, .D2 = c->D2, .k = c->k};
}

/* Gradients start at a fixed non-zero pattern g0(i + shift) so that accumulation is
 * checked. */
static float g0(size_t i) { return (float)((int)(i % 7) - 3) * 0.25f; }

static void grads_init(hcase *c) {
    for (size_t i = 0; i < c->nsq; i++) c->dSq[i] = g0(i);
    for (size_t i = 0; i < c->nkv; i++) c->dK[i] = g0(i + 1), c->dV[i] = g0(i + 2);
    for (size_t i = 0; i < c->na; i++) c->dA[i] = g0(i + 3);
    for (size_t i = 0; i < c->nw; i++) c->dW[i] = g0(i + 4);
    for (size_t i = 0; i < c->nz; i++) c->dZ[i] = g0(i + 5);
}

/* max_i |(got_i - g0(i + shift)) - want_i| / max(max_i |want_i|, 0.1). */
static double grad_err(const float *got, const double *want, size_t n, size_t shift) {
    double num = 0, den = 0.1;
    for (size_t i = 0; i < n; i++) {
        double d = fabs(((double)got[i] - g0(i + shift)) - want[i]);
        if (d > num || d != d) num = d;
        if (fabs(want[i]) > den) den = fabs(want[i]);
    }
    return num / den;
}

/* rel_err_fd for lse, where -inf (empty samples) must match exactly. */
static double lse_err(const float *got, const double *want, size_t n) {
    double num = 0, den = 1e-6;
    for (size_t i = 0; i < n; i++) {
        if (isinf(want[i])) {
            if (!(isinf(got[i]) && got[i] < 0)) num = INFINITY;
            continue;
        }
        double d = fabs((double)got[i] - want[i]);
        if (d > num || d != d) num = d;
        if (fabs(want[i]) > den) den = fabs(want[i]);
    }
    return num / den;
}

/* ------------------------------------------------------- float64 reference */

typedef struct {
    double *Z, *lse, *Y, *dSq, *dK, *dV, *dA, *dW, *dZ;
} ref;

static void ref_alloc(ref *r, const hcase *c) {
    r->Z = dbuf(c->nz), r->lse = dbuf(c->nl), r->Y = dbuf(c->ny), r->dSq = dbuf(c->nsq);
    r->dK = dbuf(c->nkv), r->dV = dbuf(c->nkv), r->dA = dbuf(c->na), r->dW = dbuf(c->nw);
    r->dZ = dbuf(c->nz);
}

static void ref_free(ref *r) {
    free(r->Z), free(r->lse), free(r->Y), free(r->dSq), free(r->dK), free(r->dV), free(r->dA);
    free(r->dW), free(r->dZ);
}

static double ref_scale(const hcase *c) {
    return c->scale > 0 ? (double)c->scale : 1.0 / sqrt((double)c->dh);
}

/* Seed attention: Z, lse overwritten; with dZ (B, m, D) also dSq, dK, dV overwritten. */
static void ref_seed(const hcase *c, const double *dZ, double *Z, double *lse, double *dSq,
                     double *dK, double *dV) {
    const int D = c->D, dh = c->dh, m = c->m, H = c->H;
    const double s = ref_scale(c);
    for (size_t i = 0; i < c->nz; i++) Z[i] = 0;
    if (dZ) {
        for (size_t i = 0; i < c->nsq; i++) dSq[i] = 0;
        for (size_t i = 0; i < c->nkv; i++) dK[i] = dV[i] = 0;
    }
    int Lmax = 1;
    for (int b = 0; b < c->B; b++)
        if (c->off[b + 1] - c->off[b] > Lmax) Lmax = (int)(c->off[b + 1] - c->off[b]);
    double *P = dbuf((size_t)Lmax), *dP = dbuf((size_t)Lmax);
    for (int b = 0; b < c->B; b++) {
        const int L = (int)(c->off[b + 1] - c->off[b]);
        for (int h = 0; h < H; h++)
            for (int i = 0; i < m; i++) {
                const size_t zr = ((size_t)b * m + i) * D + (size_t)h * dh, qr = (size_t)i * D + (size_t)h * dh;
                double *lp = &lse[((size_t)b * m + i) * H + h];
                if (L == 0) {
                    *lp = -INFINITY;
                    continue;
                }
                double mx = -INFINITY;
                for (int j = 0; j < L; j++) {
                    const size_t kr = (size_t)(c->off[b] + j) * D + (size_t)h * dh;
                    double sc = 0;
                    for (int d = 0; d < dh; d++) sc += (double)c->Sq[qr + d] * c->K[kr + d];
                    P[j] = s * sc;
                    if (P[j] > mx) mx = P[j];
                }
                double sum = 0;
                for (int j = 0; j < L; j++) sum += exp(P[j] - mx);
                for (int j = 0; j < L; j++) P[j] = exp(P[j] - mx) / sum;
                *lp = mx + log(sum);
                for (int j = 0; j < L; j++) {
                    const size_t kr = (size_t)(c->off[b] + j) * D + (size_t)h * dh;
                    for (int d = 0; d < dh; d++) Z[zr + d] += P[j] * c->V[kr + d];
                }
                if (!dZ) continue;
                double Dv = 0;
                for (int j = 0; j < L; j++) {
                    const size_t kr = (size_t)(c->off[b] + j) * D + (size_t)h * dh;
                    double g = 0;
                    for (int d = 0; d < dh; d++) g += dZ[zr + d] * c->V[kr + d];
                    dP[j] = g;
                    Dv += P[j] * g;
                }
                for (int j = 0; j < L; j++) {
                    const size_t kr = (size_t)(c->off[b] + j) * D + (size_t)h * dh;
                    const double ds = s * P[j] * (dP[j] - Dv);
                    for (int d = 0; d < dh; d++) {
                        dV[kr + d] += P[j] * dZ[zr + d];
                        dSq[qr + d] += ds * c->K[kr + d];
                        dK[kr + d] += ds * c->Sq[qr + d];
                    }
                }
            }
    }
    free(P), free(dP);
}

/* Kronecker compression of Z (B, m, D): Y overwritten; with dY also dZ, dA, dW. */
static void ref_kron(const hcase *c, const double *Z, const float *dY, double *Y, double *dZ,
                     double *dA, double *dW) {
    const int m = c->m, m2 = c->m2, D = c->D, D2 = c->D2;
    for (size_t i = 0; i < c->ny; i++) Y[i] = 0;
    if (dY) {
        for (size_t i = 0; i < c->nz; i++) dZ[i] = 0;
        for (size_t i = 0; i < c->na; i++) dA[i] = 0;
        for (size_t i = 0; i < c->nw; i++) dW[i] = 0;
    }
    double *T = dbuf((size_t)m * D2), *G = dbuf((size_t)m2 * D);
    for (int b = 0; b < c->B; b++) {
        const double *Zb = Z + (size_t)b * m * D;
        for (int i = 0; i < c->k; i++) {
            const float *Ai = c->A + (size_t)i * m * m2, *Wi = c->W + (size_t)i * D * D2;
            /* T = Z_b W_i (m x D2); Y_b += A_i^T T */
            for (int j = 0; j < m; j++)
                for (int q = 0; q < D2; q++) {
                    double t = 0;
                    for (int d = 0; d < D; d++) t += Zb[(size_t)j * D + d] * Wi[(size_t)d * D2 + q];
                    T[(size_t)j * D2 + q] = t;
                }
            for (int p = 0; p < m2; p++)
                for (int q = 0; q < D2; q++) {
                    double y = 0;
                    for (int j = 0; j < m; j++) y += (double)Ai[(size_t)j * m2 + p] * T[(size_t)j * D2 + q];
                    Y[((size_t)b * m2 + p) * D2 + q] += y;
                }
            if (!dY) continue;
            const float *dYb = dY + (size_t)b * m2 * D2;
            /* dA_i[j,p] += sum_q T[j,q] dY[p,q]; G = dY W_i^T (m2 x D) */
            for (int j = 0; j < m; j++)
                for (int p = 0; p < m2; p++) {
                    double a = 0;
                    for (int q = 0; q < D2; q++) a += T[(size_t)j * D2 + q] * dYb[(size_t)p * D2 + q];
                    dA[((size_t)i * m + j) * m2 + p] += a;
                }
            for (int p = 0; p < m2; p++)
                for (int d = 0; d < D; d++) {
                    double g = 0;
                    for (int q = 0; q < D2; q++) g += (double)dYb[(size_t)p * D2 + q] * Wi[(size_t)d * D2 + q];
                    G[(size_t)p * D + d] = g;
                }
            /* dZ_b[j,d] += sum_p A[j,p] G[p,d]; dW_i[d,q] += sum_p (A^T Z_b)[p,d] dY[p,q] */
            for (int j = 0; j < m; j++)
                for (int d = 0; d < D; d++) {
                    double z = 0;
                    for (int p = 0; p < m2; p++) z += (double)Ai[(size_t)j * m2 + p] * G[(size_t)p * D + d];
                    dZ[((size_t)b * m + j) * D + d] += z;
                }
            for (int d = 0; d < D; d++)
                for (int p = 0; p < m2; p++) {
                    double u = 0;
                    for (int j = 0; j < m; j++) u += (double)Ai[(size_t)j * m2 + p] * Zb[(size_t)j * D + d];
                    for (int q = 0; q < D2; q++) dW[((size_t)i * D + d) * D2 + q] += u * dYb[(size_t)p * D2 + q];
                }
        }
    }
    free(T), free(G);
}

/* The whole block: Z, lse, Y, and with dY every gradient (dZ: the compression's). */
static void ref_hsp(const hcase *c, const float *dY, ref *r) {
    ref_seed(c, NULL, r->Z, r->lse, NULL, NULL, NULL);
    ref_kron(c, r->Z, dY, r->Y, r->dZ, r->dA, r->dW);
    if (dY) ref_seed(c, r->dZ, r->Z, r->lse, r->dSq, r->dK, r->dV);
}

static double *to_double(const float *x, size_t n) {
    double *d = dbuf(n);
    for (size_t i = 0; i < n; i++) d[i] = x[i];
    return d;
}

/* ----------------------------------------------------------- vs reference */

#define REPORT(what, ok, ...)                                                             \
    do {                                                                                  \
        t_checks++;                                                                       \
        if (getenv("EMBER_TEST_VERBOSE")) fprintf(stderr, "  " what "\n", __VA_ARGS__);   \
        if (!(ok)) {                                                                      \
            t_failures++;                                                                 \
            fprintf(stderr, "  FAIL " what "\n", __VA_ARGS__);                            \
        }                                                                                 \
    } while (0)

static const int LENS[] = {5, 0, 700, 1, 130, 64};
#define NLENS 6

static void seed_case(int H, int dh, int m, float scale, em_pool *pool) {
    hcase c;
    hcase_init(&c, LENS, NLENS, H, dh, m, 1, 1, 1, scale, 100 + 7 * m + dh);
    const em_hsp_cfg cfg = cfg_of(&c);
    ref r;
    ref_alloc(&r, &c);
    double *dZ = to_double(c.dZin, c.nz);
    ref_seed(&c, dZ, r.Z, r.lse, r.dSq, r.dK, r.dV);
    grads_init(&c);
    CHECK_OK(em_hsp_seed_forward(c.Z, c.lse, c.Sq, c.K, c.V, cfg, pool));
    CHECK_OK(em_hsp_seed_backward(c.dSq, c.dK, c.dV, c.dZin, c.Sq, c.K, c.V, c.Z, c.lse, cfg, pool));
    const double ez = rel_err_fd(c.Z, r.Z, c.nz, 1e-6), el = lse_err(c.lse, r.lse, c.nl);
    const double eq = grad_err(c.dSq, r.dSq, c.nsq, 0), ek = grad_err(c.dK, r.dK, c.nkv, 1),
                 ev = grad_err(c.dV, r.dV, c.nkv, 2);
    REPORT("seed H=%d dh=%d m=%d scale=%g: Z %.2g lse %.2g dSq %.2g dK %.2g dV %.2g",
           ez <= TOL_FWD && el <= TOL_FWD && eq <= TOL_GRAD && ek <= TOL_GRAD && ev <= TOL_GRAD,
           H, dh, m, scale, ez, el, eq, ek, ev);
    /* the empty sample (b = 1) pools to exactly 0; the length-1 sample (b = 3) to V's row */
    int zero = 1;
    for (size_t i = 0; i < (size_t)m * c.D; i++) zero &= c.Z[(size_t)m * c.D + i] == 0.f;
    CHECK(zero);
    double e1 = 0;
    for (int i = 0; i < m; i++)
        for (int d = 0; d < c.D; d++)
            e1 = fmax(e1, fabs(c.Z[((size_t)3 * m + i) * c.D + d] - c.V[(size_t)c.off[3] * c.D + d]));
    CHECK(e1 <= 1e-6);
    free(dZ);
    ref_free(&r);
    hcase_free(&c);
}

static void test_seed_vs_ref(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    seed_case(2, 8, 3, 0.f, pool);
    seed_case(2, 16, 3, 0.f, pool);
    seed_case(1, 8, 130, 0.f, pool); /* two seed tiles */
    seed_case(3, 4, 7, 0.5f, NULL);
    em_pool_free(pool);
}

static void kron_case(int B, int H, int dh, int m, int m2, int D2, int k, em_pool *pool) {
    int *lens = calloc((size_t)B + 1, sizeof(int));
    hcase c;
    hcase_init(&c, lens, B, H, dh, m, m2, D2, k, 0.f, 300 + B + 11 * m2 + k);
    em_rng rg;
    em_rng_seed(&rg, 5 + B);
    fill(c.Z, c.nz, &rg, 1.0); /* Z is an input here */
    const em_hsp_cfg cfg = cfg_of(&c);
    ref r;
    ref_alloc(&r, &c);
    double *Z = to_double(c.Z, c.nz);
    ref_kron(&c, Z, c.dY, r.Y, r.dZ, r.dA, r.dW);
    grads_init(&c);
    CHECK_OK(em_hsp_kron_forward(c.Y, c.Z, c.A, c.W, cfg, pool));
    CHECK_OK(em_hsp_kron_backward(c.dZ, c.dA, c.dW, c.dY, c.Z, c.A, c.W, cfg, pool));
    const double ey = rel_err_fd(c.Y, r.Y, c.ny, 1e-6), ez = grad_err(c.dZ, r.dZ, c.nz, 5),
                 ea = grad_err(c.dA, r.dA, c.na, 3), ew = grad_err(c.dW, r.dW, c.nw, 4);
    REPORT("kron B=%d D=%d m=%d m2=%d D2=%d k=%d: Y %.2g dZ %.2g dA %.2g dW %.2g",
           ey <= TOL_FWD && ez <= TOL_GRAD && ea <= TOL_GRAD && ew <= TOL_GRAD, B, H * dh, m, m2,
           D2, k, ey, ez, ea, ew);
    free(Z);
    ref_free(&r);
    hcase_free(&c);
    free(lens);
}

static void test_kron_vs_ref(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    kron_case(1, 2, 8, 5, 2, 7, 1, pool);     /* one block of one sample */
    kron_case(6, 2, 8, 5, 3, 7, 3, pool);     /* one block */
    kron_case(200, 2, 8, 5, 2, 7, 2, pool);   /* 7 blocks of 32, the last of 8 */
    kron_case(75, 3, 40, 4, 1, 5, 2, pool);   /* D = 120: dW tiles of 64 and 56 */
    kron_case(9000, 1, 4, 2, 1, 3, 1, NULL);  /* blocks capped at 64 (141 samples each) */
    kron_case(20, 4, 32, 6, 6, 129, 2, NULL); /* m2 = m, D2 > D */
    em_pool_free(pool);
}

/* The composed block (em_hsp_forward / _backward) against the chained reference. */
static void hsp_case(const int *lens, int B, int H, int dh, int m, int m2, int D2, int k,
                     float scale, em_pool *pool) {
    hcase c;
    hcase_init(&c, lens, B, H, dh, m, m2, D2, k, scale, 700 + m + 3 * k);
    const em_hsp_cfg cfg = cfg_of(&c);
    ref r;
    ref_alloc(&r, &c);
    ref_hsp(&c, c.dY, &r);
    grads_init(&c);
    CHECK_OK(em_hsp_forward(c.Y, c.Z, c.lse, c.Sq, c.K, c.V, c.A, c.W, cfg, pool));
    CHECK_OK(em_hsp_backward(c.dSq, c.dK, c.dV, c.dA, c.dW, c.dY, c.Sq, c.K, c.V, c.A, c.W, c.Z,
                             c.lse, cfg, pool));
    const double ez = rel_err_fd(c.Z, r.Z, c.nz, 1e-6), el = lse_err(c.lse, r.lse, c.nl),
                 ey = rel_err_fd(c.Y, r.Y, c.ny, 1e-6);
    const double eq = grad_err(c.dSq, r.dSq, c.nsq, 0), ek = grad_err(c.dK, r.dK, c.nkv, 1),
                 ev = grad_err(c.dV, r.dV, c.nkv, 2), ea = grad_err(c.dA, r.dA, c.na, 3),
                 ew = grad_err(c.dW, r.dW, c.nw, 4);
    REPORT("hsp m=%d m2=%d D2=%d k=%d: Z %.2g lse %.2g Y %.2g dSq %.2g dK %.2g dV %.2g dA %.2g "
           "dW %.2g",
           ez <= TOL_FWD && el <= TOL_FWD && ey <= TOL_FWD && eq <= TOL_GRAD && ek <= TOL_GRAD &&
               ev <= TOL_GRAD && ea <= TOL_GRAD && ew <= TOL_GRAD,
           m, m2, D2, k, ez, el, ey, eq, ek, ev, ea, ew);
    ref_free(&r);
    hcase_free(&c);
}

static void test_hsp_vs_ref(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    hsp_case(LENS, NLENS, 2, 8, 4, 2, 6, 2, 0.f, pool);
    hsp_case(LENS, NLENS, 1, 16, 8, 3, 16, 3, 0.3f, NULL);
    em_pool_free(pool);
}

/* ------------------------------------------------------- finite differences */

static double ref_loss(const hcase *c) {
    ref r;
    ref_alloc(&r, c);
    ref_hsp(c, NULL, &r);
    double s = 0;
    for (size_t i = 0; i < c->ny; i++) s += r.Y[i] * c->dY[i];
    ref_free(&r);
    return s;
}

static double kern_loss(hcase *c) {
    em_hsp_forward(c->Y, c->Z, c->lse, c->Sq, c->K, c->V, c->A, c->W, cfg_of(c), NULL);
    double s = 0;
    for (size_t i = 0; i < c->ny; i++) s += (double)c->Y[i] * c->dY[i];
    return s;
}

static void test_finite_diff(void) {
    const int lens[] = {3, 0, 1, 4};
    hcase c;
    hcase_init(&c, lens, 4, 2, 4, 3, 2, 3, 2, 0.7f, 41);
    ref r;
    ref_alloc(&r, &c);
    ref_hsp(&c, c.dY, &r);
    memset(c.dSq, 0, sizeof(float) * c.nsq);
    memset(c.dK, 0, sizeof(float) * c.nkv);
    memset(c.dV, 0, sizeof(float) * c.nkv);
    memset(c.dA, 0, sizeof(float) * c.na);
    memset(c.dW, 0, sizeof(float) * c.nw);
    const em_hsp_cfg cfg = cfg_of(&c);
    CHECK_OK(em_hsp_forward(c.Y, c.Z, c.lse, c.Sq, c.K, c.V, c.A, c.W, cfg, NULL));
    CHECK_OK(em_hsp_backward(c.dSq, c.dK, c.dV, c.dA, c.dW, c.dY, c.Sq, c.K, c.V, c.A, c.W, c.Z,
                             c.lse, cfg, NULL));
    float *in[5] = {c.Sq, c.K, c.V, c.A, c.W}, *kg[5] = {c.dSq, c.dK, c.dV, c.dA, c.dW};
    const double *rg[5] = {r.dSq, r.dK, r.dV, r.dA, r.dW};
    const size_t n[5] = {c.nsq, c.nkv, c.nkv, c.na, c.nw};
    double worst_ref = 0, worst_kern = 0;
    for (int t = 0; t < 5; t++)
        for (size_t i = 0; i < n[t]; i++) {
            /* the float64 reference takes a small step (truncation error ~h^2), the
             * float kernels a larger one (their loss is rounded to ~1e-7) */
            const float x = in[t][i], hr = 1.0f / 8192, hk = 1.0f / 1024;
            in[t][i] = x + hr;
            const double lp = ref_loss(&c);
            in[t][i] = x - hr;
            const double lm = ref_loss(&c);
            in[t][i] = x + hk;
            const double kp = kern_loss(&c);
            in[t][i] = x - hk;
            const double km = kern_loss(&c);
            in[t][i] = x;
            const double fr = (lp - lm) / (2.0 * hr), fk = (kp - km) / (2.0 * hk);
            worst_ref = fmax(worst_ref, fabs(fr - rg[t][i]));
            worst_kern = fmax(worst_kern, fabs(fk - kg[t][i]));
        }
    REPORT("finite differences: ref %.3g kern %.3g", worst_ref < 1e-7 && worst_kern < 2e-3,
           worst_ref, worst_kern);
    ref_free(&r);
    hcase_free(&c);
}

/* ------------------------------------------------------------ determinism */

/* B samples, lengths in [0, 300) with every 7th empty and one of 700. */
static int *random_lens(int B, uint64_t seed) {
    int *lens = malloc(sizeof(int) * (size_t)B);
    em_rng r;
    em_rng_seed(&r, seed);
    for (int b = 0; b < B; b++) lens[b] = b % 7 == 3 ? 0 : (int)em_rng_below(&r, 300);
    lens[B / 2] = 700;
    return lens;
}

static void test_threads_bitwise(void) {
    const struct {
        int B, H, dh, m, m2, D2, k;
    } cfgs[] = {{70, 2, 8, 5, 2, 6, 2}, {40, 3, 40, 130, 3, 9, 1}};
    for (int q = 0; q < 2; q++) {
        int *lens = random_lens(cfgs[q].B, 17 + q);
        hcase c[4];
        for (int t = 0; t < 4; t++) {
            hcase_init(&c[t], lens, cfgs[q].B, cfgs[q].H, cfgs[q].dh, cfgs[q].m, cfgs[q].m2,
                       cfgs[q].D2, cfgs[q].k, 0.f, 23 + q);
            grads_init(&c[t]);
            em_pool *pool = NULL;
            if (t > 0) CHECK_OK(em_pool_create(&pool, t));
            const em_hsp_cfg cfg = cfg_of(&c[t]);
            CHECK_OK(em_hsp_forward(c[t].Y, c[t].Z, c[t].lse, c[t].Sq, c[t].K, c[t].V, c[t].A,
                                    c[t].W, cfg, pool));
            CHECK_OK(em_hsp_backward(c[t].dSq, c[t].dK, c[t].dV, c[t].dA, c[t].dW, c[t].dY, c[t].Sq,
                                     c[t].K, c[t].V, c[t].A, c[t].W, c[t].Z, c[t].lse, cfg, pool));
            /* the compression's own dZ, from the kernel alone */
            CHECK_OK(em_hsp_kron_backward(c[t].dZ, NULL, NULL, c[t].dY, c[t].Z, c[t].A, c[t].W,
                                          cfg, pool));
            em_pool_free(pool);
        }
        for (int t = 1; t < 4; t++) {
            CHECK(!memcmp(c[0].Z, c[t].Z, c[0].nz * sizeof(float)));
            CHECK(!memcmp(c[0].lse, c[t].lse, c[0].nl * sizeof(float)));
            CHECK(!memcmp(c[0].Y, c[t].Y, c[0].ny * sizeof(float)));
            CHECK(!memcmp(c[0].dSq, c[t].dSq, c[0].nsq * sizeof(float)));
            CHECK(!memcmp(c[0].dK, c[t].dK, c[0].nkv * sizeof(float)));
            CHECK(!memcmp(c[0].dV, c[t].dV, c[0].nkv * sizeof(float)));
            CHECK(!memcmp(c[0].dA, c[t].dA, c[0].na * sizeof(float)));
            CHECK(!memcmp(c[0].dW, c[t].dW, c[0].nw * sizeof(float)));
            CHECK(!memcmp(c[0].dZ, c[t].dZ, c[0].nz * sizeof(float)));
        }
        for (int t = 0; t < 4; t++) hcase_free(&c[t]);
        free(lens);
    }
}

/* Nullable gradients: skipping some leaves them untouched and the others unchanged. */
static void test_null_grads(void) {
    hcase a, b;
    hcase_init(&a, LENS, NLENS, 2, 8, 4, 2, 5, 2, 0.f, 91);
    hcase_init(&b, LENS, NLENS, 2, 8, 4, 2, 5, 2, 0.f, 91);
    grads_init(&a), grads_init(&b);
    const em_hsp_cfg cfg = cfg_of(&a), cfgb = cfg_of(&b);
    CHECK_OK(em_hsp_forward(a.Y, a.Z, a.lse, a.Sq, a.K, a.V, a.A, a.W, cfg, NULL));
    CHECK_OK(em_hsp_forward(b.Y, b.Z, b.lse, b.Sq, b.K, b.V, b.A, b.W, cfgb, NULL));
    CHECK_OK(em_hsp_backward(a.dSq, a.dK, a.dV, a.dA, a.dW, a.dY, a.Sq, a.K, a.V, a.A, a.W, a.Z,
                             a.lse, cfg, NULL));
    /* in b: dK and dW skipped in one call, then the rest in separate ones */
    CHECK_OK(em_hsp_backward(b.dSq, NULL, b.dV, b.dA, NULL, b.dY, b.Sq, b.K, b.V, b.A, b.W, b.Z,
                             b.lse, cfgb, NULL));
    CHECK(!memcmp(a.dSq, b.dSq, a.nsq * sizeof(float)));
    CHECK(!memcmp(a.dV, b.dV, a.nkv * sizeof(float)));
    CHECK(!memcmp(a.dA, b.dA, a.na * sizeof(float)));
    int untouched = 1;
    for (size_t i = 0; i < a.nkv; i++) untouched &= b.dK[i] == g0(i + 1);
    for (size_t i = 0; i < a.nw; i++) untouched &= b.dW[i] == g0(i + 4);
    CHECK(untouched);
    /* only dW: the compression alone (no dZ, no seed pass) */
    CHECK_OK(em_hsp_backward(NULL, NULL, NULL, NULL, b.dW, b.dY, b.Sq, b.K, b.V, b.A, b.W, b.Z,
                             b.lse, cfgb, NULL));
    CHECK(!memcmp(a.dW, b.dW, a.nw * sizeof(float)));
    /* only dK through the seed kernel, from a's dZ: the same as inside the composed call */
    memset(b.dZ, 0, sizeof(float) * b.nz);
    CHECK_OK(em_hsp_kron_backward(b.dZ, NULL, NULL, b.dY, b.Z, b.A, b.W, cfgb, NULL));
    CHECK_OK(em_hsp_seed_backward(NULL, b.dK, NULL, b.dZ, b.Sq, b.K, b.V, b.Z, b.lse, cfgb, NULL));
    CHECK(!memcmp(a.dK, b.dK, a.nkv * sizeof(float)));
    /* all NULL: nothing */
    CHECK_OK(em_hsp_backward(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                             NULL, cfgb, NULL));
    hcase_free(&a), hcase_free(&b);
}

/* ----------------------------------------------------------------- errors */

static void test_invalid(void) {
    float x[256] = {0};
    int64_t ok[4] = {0, 2, 2, 3};
    const em_hsp_cfg good = {.attn = {.B = 3, .H = 2, .dh = 4, .offsets = ok}, .m = 2, .m2 = 2,
                             .D2 = 3, .k = 2};
    CHECK_OK(em_hsp_check(good));
    em_hsp_cfg c = good;
    int64_t bad[4] = {0, 2, 1, 3};
    c.attn.offsets = bad;
    CHECK(em_hsp_seed_forward(x, x, x, x, x, c, NULL) == EM_ERR_INVALID);
    CHECK(strstr(em_last_error(), "decrease") != NULL);
    CHECK(em_hsp_seed_backward(x, x, x, x, x, x, x, x, x, c, NULL) == EM_ERR_INVALID);
    CHECK(em_hsp_forward(x, x, x, x, x, x, x, x, c, NULL) == EM_ERR_INVALID);
    CHECK(em_hsp_backward(x, x, x, x, x, x, x, x, x, x, x, x, x, c, NULL) == EM_ERR_INVALID);
    /* the compression reads no offsets */
    CHECK_OK(em_hsp_kron_forward(x, x, x, x, c, NULL));
    c.attn.offsets = NULL;
    CHECK(em_hsp_check(c) == EM_ERR_INVALID);
    CHECK_OK(em_hsp_kron_backward(x, x, x, x, x, x, x, c, NULL));
    int64_t nz[4] = {1, 2, 3, 4};
    c.attn.offsets = nz;
    CHECK(em_hsp_check(c) == EM_ERR_INVALID);
    c = good, c.attn.causal = 1;
    CHECK(em_hsp_seed_forward(x, x, x, x, x, c, NULL) == EM_ERR_INVALID);
    CHECK(strstr(em_last_error(), "causal") != NULL);
    c = good, c.attn.scale = NAN;
    CHECK(em_hsp_check(c) == EM_ERR_INVALID);
    c = good, c.attn.scale = INFINITY;
    CHECK(em_hsp_seed_backward(x, x, x, x, x, x, x, x, x, c, NULL) == EM_ERR_INVALID);
    /* every dimension, through the check and the calls that read it */
    int *dims[] = {&c.attn.H, &c.attn.dh, &c.m, &c.m2, &c.D2, &c.k};
    for (int d = 0; d < 6; d++) {
        c = good;
        *dims[d] = 0;
        CHECK(em_hsp_check(c) == EM_ERR_INVALID);
        CHECK(em_hsp_forward(x, x, x, x, x, x, x, x, c, NULL) == EM_ERR_INVALID);
        CHECK(em_hsp_kron_backward(x, x, x, x, x, x, x, c, NULL) == EM_ERR_INVALID);
        *dims[d] = -3;
        CHECK(em_hsp_kron_forward(x, x, x, x, c, NULL) == EM_ERR_INVALID);
    }
    c = good, c.attn.B = -1;
    CHECK(em_hsp_kron_forward(x, x, x, x, c, NULL) == EM_ERR_INVALID);
    CHECK(em_hsp_seed_forward(x, x, x, x, x, c, NULL) == EM_ERR_INVALID);
    /* seed calls read no m2, D2, k */
    c = good, c.k = 0;
    CHECK_OK(em_hsp_seed_forward(x, x, x, x, x, c, NULL));
    c = good, c.m = 0;
    CHECK(em_hsp_seed_forward(x, x, x, x, x, c, NULL) == EM_ERR_INVALID);
    c = good, c.attn.H = 65536, c.attn.dh = 65536;
    CHECK(em_hsp_check(c) == EM_ERR_INVALID);
    CHECK(strstr(em_last_error(), "large") != NULL);
    CHECK(em_hsp_kron_forward(x, x, x, x, c, NULL) == EM_ERR_INVALID);
    c = good, c.attn.B = 1 << 20, c.m2 = 1 << 12;
    CHECK(em_hsp_kron_forward(x, x, x, x, c, NULL) == EM_ERR_INVALID);
    /* an empty batch touches nothing */
    c = good, c.attn.B = 0;
    CHECK_OK(em_hsp_forward(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, c, NULL));
    CHECK_OK(em_hsp_backward(x, x, x, x, x, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, c,
                             NULL));
}

/* Every sample empty: Z = 0, lse = -inf, Y = 0; only dA/dW-free gradients (none). */
static void test_all_empty(void) {
    const int lens[3] = {0, 0, 0};
    hcase c;
    hcase_init(&c, lens, 3, 2, 4, 2, 2, 3, 2, 0.f, 5);
    grads_init(&c);
    for (size_t i = 0; i < c.nz; i++) c.Z[i] = 7.f;
    const em_hsp_cfg cfg = cfg_of(&c);
    CHECK_OK(em_hsp_forward(c.Y, c.Z, c.lse, NULL, NULL, NULL, c.A, c.W, cfg, NULL));
    int ok = 1;
    for (size_t i = 0; i < c.nz; i++) ok &= c.Z[i] == 0.f;
    for (size_t i = 0; i < c.nl; i++) ok &= isinf(c.lse[i]) && c.lse[i] < 0;
    for (size_t i = 0; i < c.ny; i++) ok &= c.Y[i] == 0.f;
    CHECK(ok);
    CHECK_OK(em_hsp_backward(c.dSq, NULL, NULL, c.dA, c.dW, c.dY, NULL, NULL, NULL, c.A, c.W, c.Z,
                             c.lse, cfg, NULL));
    ok = 1;
    for (size_t i = 0; i < c.nsq; i++) ok &= c.dSq[i] == g0(i);
    for (size_t i = 0; i < c.na; i++) ok &= c.dA[i] == g0(i + 3); /* Z = 0: dA gets 0 */
    CHECK(ok);
    hcase_free(&c);
}

/* Allocation failures: EM_ERR_NOMEM, nothing leaked, gradients untouched by the
 * separate calls; every allocation of every call fails once. */
static void test_nomem(void) {
    hcase c;
    hcase_init(&c, LENS, NLENS, 2, 8, 3, 2, 5, 2, 0.f, 9);
    grads_init(&c);
    const em_hsp_cfg cfg = cfg_of(&c);
    CHECK_OK(em_hsp_forward(c.Y, c.Z, c.lse, c.Sq, c.K, c.V, c.A, c.W, cfg, NULL));
    float *save = fbuf(c.nsq + 2 * c.nkv + c.na + c.nw + c.nz);
    const size_t before = em_mem_in_use();
    /* allocations per call: seed forward 3 (sort keys, unit list, tiles), seed backward
     * 4 (+ dSq partials), each Kronecker call 1, forward 4, backward 6 (+ dZ) */
    const int expect[6] = {3, 4, 1, 1, 4, 6};
    for (int call = 0; call < 6; call++) {
        int failed = 0;
        for (long k = 0; k < 10; k++) {
            float *g[6] = {c.dSq, c.dK, c.dV, c.dA, c.dW, c.dZ};
            const size_t n[6] = {c.nsq, c.nkv, c.nkv, c.na, c.nw, c.nz};
            float *p = save;
            for (int t = 0; t < 6; t++) memcpy(p, g[t], sizeof(float) * n[t]), p += n[t];
            em_mem_fail_after(k);
            em_status st = EM_OK;
            switch (call) {
            case 0: st = em_hsp_seed_forward(c.Z, c.lse, c.Sq, c.K, c.V, cfg, NULL); break;
            case 1:
                st = em_hsp_seed_backward(c.dSq, c.dK, c.dV, c.dZin, c.Sq, c.K, c.V, c.Z, c.lse,
                                          cfg, NULL);
                break;
            case 2: st = em_hsp_kron_forward(c.Y, c.Z, c.A, c.W, cfg, NULL); break;
            case 3: st = em_hsp_kron_backward(c.dZ, c.dA, c.dW, c.dY, c.Z, c.A, c.W, cfg, NULL); break;
            case 4: st = em_hsp_forward(c.Y, c.Z, c.lse, c.Sq, c.K, c.V, c.A, c.W, cfg, NULL); break;
            default:
                st = em_hsp_backward(c.dSq, c.dK, c.dV, c.dA, c.dW, c.dY, c.Sq, c.K, c.V, c.A, c.W,
                                     c.Z, c.lse, cfg, NULL);
            }
            em_mem_fail_after(-1);
            CHECK(st == EM_OK || st == EM_ERR_NOMEM);
            CHECK(em_mem_in_use() == before);
            if (st == EM_ERR_NOMEM) {
                failed++;
                if (call == 1 || call == 3) { /* separate backward calls touch nothing */
                    int same = 1;
                    p = save;
                    for (int t = 0; t < 6; t++) same &= !memcmp(p, g[t], sizeof(float) * n[t]), p += n[t];
                    CHECK(same);
                }
            }
        }
        t_checks++;
        if (failed != expect[call]) {
            t_failures++;
            fprintf(stderr, "  FAIL nomem call %d: %d failures, expected %d\n", call, failed,
                    expect[call]);
        }
    }
    free(save);
    hcase_free(&c);
}

/* ------------------------------------------------------------------ golden */

static void golden_case(em_st *st, const char *pfx) {
    char name[64];
#define G(var, nm, dt, n)                                                                 \
    do {                                                                                  \
        snprintf(name, sizeof name, "%s_%s", pfx, nm);                                    \
        var = em_st_expect(st, name, dt, (int64_t)(n));                                   \
        t_checks++;                                                                       \
        if (!var) {                                                                       \
            t_failures++;                                                                 \
            fprintf(stderr, "  FAIL golden %s: %s\n", name, em_last_error());             \
            return;                                                                       \
        }                                                                                 \
    } while (0)
    const int64_t *dims, *off;
    const float *scale;
    G(dims, "dims", EM_I64, 7); /* B, H, dh, m, m2, D2, k */
    G(scale, "scale", EM_F32, 1);
    const int B = (int)dims[0], H = (int)dims[1], dh = (int)dims[2], m = (int)dims[3],
              m2 = (int)dims[4], D2 = (int)dims[5], k = (int)dims[6], D = H * dh;
    G(off, "offsets", EM_I64, B + 1);
    const size_t nkv = (size_t)off[B] * D, nsq = (size_t)m * D, nz = (size_t)B * m * D,
                 nl = (size_t)B * m * H, na = (size_t)k * m * m2, nw = (size_t)k * D * D2,
                 ny = (size_t)B * m2 * D2;
    const float *Sq, *K, *V, *A, *W, *dY, *Z, *lse, *Y, *dSq, *dK, *dV, *dA, *dW;
    G(Sq, "sq", EM_F32, nsq);
    G(K, "k", EM_F32, nkv);
    G(V, "v", EM_F32, nkv);
    G(A, "a", EM_F32, na);
    G(W, "w", EM_F32, nw);
    G(dY, "dy", EM_F32, ny);
    G(Z, "z", EM_F32, nz);
    G(lse, "lse", EM_F32, nl);
    G(Y, "y", EM_F32, ny);
    G(dSq, "dsq", EM_F32, nsq);
    G(dK, "dk", EM_F32, nkv);
    G(dV, "dv", EM_F32, nkv);
    G(dA, "da", EM_F32, na);
    G(dW, "dw", EM_F32, nw);
#undef G
    const em_hsp_cfg cfg = {.attn = {.B = B, .H = H, .dh = dh, .offsets = off, .scale = *scale},
                            .m = m, .m2 = m2, .D2 = D2, .k = k};
    float *z = fbuf(nz), *l = fbuf(nl), *y = fbuf(ny);
    float *gq = calloc(nsq + 1, sizeof(float)), *gk = calloc(nkv + 1, sizeof(float)),
          *gv = calloc(nkv + 1, sizeof(float)), *ga = calloc(na + 1, sizeof(float)),
          *gw = calloc(nw + 1, sizeof(float));
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    CHECK_OK(em_hsp_forward(y, z, l, Sq, K, V, A, W, cfg, pool));
    CHECK_OK(em_hsp_backward(gq, gk, gv, ga, gw, dY, Sq, K, V, A, W, z, l, cfg, pool));
    em_pool_free(pool);
    double *ld = to_double(lse, nl);
    const double el = lse_err(l, ld, nl);
    REPORT("golden %s lse: rel err %.3g", el <= TOL_FWD, pfx, el);
    free(ld);
    CHECK_REL(z, Z, nz, TOL_FWD);
    CHECK_REL(y, Y, ny, TOL_FWD);
    CHECK_REL(gq, dSq, nsq, TOL_GRAD);
    CHECK_REL(gk, dK, nkv, TOL_GRAD);
    CHECK_REL(gv, dV, nkv, TOL_GRAD);
    CHECK_REL(ga, dA, na, TOL_GRAD);
    CHECK_REL(gw, dW, nw, TOL_GRAD);
    free(z), free(l), free(y), free(gq), free(gk), free(gv), free(ga), free(gw);
}

static void test_golden(void) {
    char path[1024];
    em_st *st = NULL;
    CHECK_OK(em_st_open(&st, em_test_path("golden/hsp.safetensors", path, sizeof path)));
    if (!st) return;
    /* the cases of tools/make_golden_hsp.py */
    golden_case(st, "hsp_small");
    golden_case(st, "hsp_long");
    em_st_close(st);
}

TEST_MAIN({"seed_vs_ref", test_seed_vs_ref}, {"kron_vs_ref", test_kron_vs_ref},
          {"hsp_vs_ref", test_hsp_vs_ref}, {"finite_diff", test_finite_diff},
          {"threads_bitwise", test_threads_bitwise}, {"null_grads", test_null_grads},
          {"invalid", test_invalid}, {"all_empty", test_all_empty}, {"nomem", test_nomem},
          {"golden", test_golden})
