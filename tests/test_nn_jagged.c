/*
 * test_nn_jagged.c - the jagged ops of include/ember/jagged.h.
 *
 * Every op, forward and backward, runs on one batch mixing lengths 0, 1 and 300 and
 * is compared with naive float64 loops written here (backward starts from non-zero
 * gradients to check that it accumulates). Softmax and both matmuls are also checked
 * against central finite differences of their own fp32 forward. Malformed offsets
 * must give EM_ERR_INVALID; 1, 2 and 3 threads must give bitwise equal results; and
 * tests/golden/jagged.safetensors (tools/make_golden_jagged.py, PyTorch) must match
 * within 1e-5 (forward) and 1e-4 (gradients), relative to each tensor's max.
 */
#include "ember/jagged.h"

#include "test.h"

#define CHECK_RELD(a, ref, n, tol)                                                        \
    do {                                                                                  \
        double e_ = rel_err_fd((a), (ref), (n), 1e-6);                                    \
        t_checks++;                                                                       \
        if (!(e_ <= (tol))) {                                                             \
            t_failures++;                                                                 \
            fprintf(stderr, "  FAIL %s:%d: %s vs %s: rel err %.3g > %g\n", __FILE__,      \
                    __LINE__, #a, #ref, e_, (double)(tol));                               \
        }                                                                                 \
    } while (0)

static const int LENS[] = {0, 1, 300, 5, 0, 17, 64, 33, 2, 1};
#define NB ((int)(sizeof LENS / sizeof LENS[0]))

static int64_t *make_offsets(const int *lens, int B) {
    int64_t *o = malloc(sizeof(int64_t) * (size_t)(B + 1));
    o[0] = 0;
    for (int b = 0; b < B; b++) o[b + 1] = o[b] + lens[b];
    return o;
}

static float *randn(size_t n, uint64_t seed, double scale) {
    em_rng r;
    em_rng_seed(&r, seed);
    float *x = malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) x[i] = (float)(scale * em_rng_normal(&r));
    return x;
}

static double *dcopy(const float *x, size_t n) {
    double *d = malloc(sizeof(double) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) d[i] = x[i];
    return d;
}

static float *fcopy(const float *x, size_t n) {
    float *f = malloc(sizeof(float) * (n ? n : 1));
    memcpy(f, x, sizeof(float) * n);
    return f;
}

/* ------------------------------------------------------ float64 references */

static void ref_softmax(double *y, const float *x, const int64_t *o, int B, int D) {
    for (int b = 0; b < B; b++)
        for (int d = 0; d < D; d++) {
            double mx = -INFINITY, s = 0;
            for (int64_t t = o[b]; t < o[b + 1]; t++) mx = fmax(mx, x[t * D + d]);
            for (int64_t t = o[b]; t < o[b + 1]; t++) s += exp(x[t * D + d] - mx);
            for (int64_t t = o[b]; t < o[b + 1]; t++) y[t * D + d] = exp(x[t * D + d] - mx) / s;
        }
}

/* dx += y * (dy - sum dy*y), y from the float64 forward */
static void ref_softmax_bwd(double *dx, const float *dy, const double *y, const int64_t *o, int B, int D) {
    for (int b = 0; b < B; b++)
        for (int d = 0; d < D; d++) {
            double s = 0;
            for (int64_t t = o[b]; t < o[b + 1]; t++) s += dy[t * D + d] * y[t * D + d];
            for (int64_t t = o[b]; t < o[b + 1]; t++) dx[t * D + d] += y[t * D + d] * (dy[t * D + d] - s);
        }
}

static void ref_jj(double *S, const float *Q, const float *K, const int64_t *o, const int64_t *bo, int B, int D) {
    for (int b = 0; b < B; b++) {
        int64_t L = o[b + 1] - o[b];
        for (int64_t i = 0; i < L; i++)
            for (int64_t j = 0; j < L; j++) {
                double s = 0;
                for (int d = 0; d < D; d++) s += (double)Q[(o[b] + i) * D + d] * K[(o[b] + j) * D + d];
                S[bo[b] + i * L + j] = s;
            }
    }
}

static void ref_jj_bwd(double *dQ, double *dK, const float *dS, const float *Q, const float *K, const int64_t *o,
                       const int64_t *bo, int B, int D) {
    for (int b = 0; b < B; b++) {
        int64_t L = o[b + 1] - o[b];
        for (int64_t i = 0; i < L; i++)
            for (int64_t j = 0; j < L; j++) {
                double g = dS[bo[b] + i * L + j];
                for (int d = 0; d < D; d++) {
                    dQ[(o[b] + i) * D + d] += g * K[(o[b] + j) * D + d];
                    dK[(o[b] + j) * D + d] += g * Q[(o[b] + i) * D + d];
                }
            }
    }
}

/* ------------------------------------------------------------------- tests */

static void test_padded(void) {
    int64_t *o = make_offsets(LENS, NB);
    const int D = 13, ML = 40;
    size_t T = (size_t)o[NB], np = (size_t)NB * ML * D;
    float *x = randn(T * D, 1, 1.0), *pad = randn(np, 2, 1.0), *dpad = randn(np, 3, 1.0);
    float *dx = randn(T * D, 4, 1.0);
    double *rpad = malloc(sizeof(double) * np), *rdx = dcopy(dx, T * D);

    /* jagged -> padded, truncating the 300 and 64 sequences */
    CHECK_OK(em_jagged_to_padded_forward(pad, x, o, NB, ML, D, -2.f, 1, NULL));
    for (int b = 0; b < NB; b++)
        for (int t = 0; t < ML; t++)
            for (int d = 0; d < D; d++) {
                size_t i = ((size_t)b * ML + t) * D + d;
                rpad[i] = t < LENS[b] ? x[(o[b] + t) * D + d] : -2.0;
                if (t < LENS[b]) rdx[(o[b] + t) * D + d] += dpad[i];
            }
    CHECK_RELD(pad, rpad, np, 0);
    CHECK_OK(em_jagged_to_padded_backward(dx, dpad, o, NB, ML, D, 1, NULL));
    CHECK_RELD(dx, rdx, T * D, 1e-6);
    CHECK(em_jagged_to_padded_forward(pad, x, o, NB, ML, D, 0.f, 0, NULL) == EM_ERR_INVALID);
    CHECK(strstr(em_last_error(), "max_len") != NULL);
    /* no truncation needed with max_len = 300 */
    float *pad2 = malloc(sizeof(float) * NB * 300 * D);
    CHECK_OK(em_jagged_to_padded_forward(pad2, x, o, NB, 300, D, 0.f, 0, NULL));
    CHECK(memcmp(pad2 + (size_t)2 * 300 * D, x + o[2] * D, sizeof(float) * 300 * D) == 0);
    CHECK(pad2[(size_t)(3 * 300 + 5) * D] == 0.f && pad2[0] == 0.f);
    free(pad2);

    /* padded -> jagged: rows past max_len become 0 */
    float *pj = randn(T * D, 5, 1.0), *dpj = randn(T * D, 6, 1.0), *dp = randn(np, 7, 1.0);
    double *rpj = malloc(sizeof(double) * T * D), *rdp = dcopy(dp, np);
    CHECK_OK(em_padded_to_jagged_forward(pj, pad, o, NB, ML, D, 1, NULL));
    for (int b = 0; b < NB; b++)
        for (int t = 0; t < LENS[b]; t++)
            for (int d = 0; d < D; d++) {
                size_t pi = ((size_t)b * ML + t) * D + d, ji = (size_t)(o[b] + t) * D + d;
                rpj[ji] = t < ML ? pad[pi] : 0.0;
                if (t < ML) rdp[pi] += dpj[ji];
            }
    CHECK_RELD(pj, rpj, T * D, 0);
    CHECK_OK(em_padded_to_jagged_backward(dp, dpj, o, NB, ML, D, 1, NULL));
    CHECK_RELD(dp, rdp, np, 1e-6);
    CHECK(em_padded_to_jagged_forward(pj, pad, o, NB, ML, D, 0, NULL) == EM_ERR_INVALID);
    free(x), free(pad), free(dpad), free(dx), free(rpad), free(rdx), free(pj), free(dpj), free(dp), free(rpj),
        free(rdp), free(o);
}

static void test_pool(void) {
    int64_t *o = make_offsets(LENS, NB);
    const int D = 21;
    size_t T = (size_t)o[NB];
    float *x = randn(T * D, 11, 1.0), *out = randn((size_t)NB * D, 12, 1.0), *dout = randn((size_t)NB * D, 13, 1.0);
    for (int mode = 0; mode < 2; mode++) {
        float *dx = randn(T * D, 14, 1.0);
        double *rout = malloc(sizeof(double) * NB * D), *rdx = dcopy(dx, T * D);
        for (int b = 0; b < NB; b++)
            for (int d = 0; d < D; d++) {
                double s = 0, sc = mode && LENS[b] ? 1.0 / LENS[b] : 1.0;
                for (int64_t t = o[b]; t < o[b + 1]; t++) s += x[t * D + d], rdx[t * D + d] += sc * dout[b * D + d];
                rout[b * D + d] = s * sc;
            }
        CHECK_OK(em_jagged_pool_forward(out, x, o, NB, D, (em_jagged_reduce)mode, NULL));
        CHECK_RELD(out, rout, (size_t)NB * D, 1e-5);
        CHECK(out[0] == 0.f && out[4 * D + 3] == 0.f); /* empty sequences */
        CHECK_OK(em_jagged_pool_backward(dx, dout, o, NB, D, (em_jagged_reduce)mode, NULL));
        CHECK_RELD(dx, rdx, T * D, 1e-6);
        free(dx), free(rout), free(rdx);
    }
    CHECK(em_jagged_pool_forward(out, x, o, NB, D, (em_jagged_reduce)7, NULL) == EM_ERR_INVALID);
    free(x), free(out), free(dout), free(o);
}

static void test_softmax(void) {
    int64_t *o = make_offsets(LENS, NB);
    const int D = 70; /* two column chunks, the second partial */
    size_t T = (size_t)o[NB], n = T * D;
    float *x = randn(n, 21, 4.0), *y = malloc(sizeof(float) * n), *dy = randn(n, 22, 1.0), *dx = randn(n, 23, 1.0);
    x[(o[2] + 7) * D + 3] = 80.f; /* expf(80) overflows float: must be max-subtracted */
    double *ry = malloc(sizeof(double) * n), *rdx = dcopy(dx, n);
    ref_softmax(ry, x, o, NB, D);
    ref_softmax_bwd(rdx, dy, ry, o, NB, D);
    CHECK_OK(em_jagged_softmax_forward(y, x, o, NB, D, NULL));
    CHECK_RELD(y, ry, n, 1e-5);
    CHECK(y[(o[1]) * D + 5] == 1.f); /* a length-1 sequence is all ones */
    CHECK_OK(em_jagged_softmax_backward(dx, dy, y, o, NB, D, NULL));
    CHECK_RELD(dx, rdx, n, 1e-4);
    float *y2 = fcopy(x, n); /* in place */
    CHECK_OK(em_jagged_softmax_forward(y2, y2, o, NB, D, NULL));
    CHECK(memcmp(y, y2, sizeof(float) * n) == 0);
    free(x), free(y), free(dy), free(dx), free(ry), free(rdx), free(y2), free(o);
}

static void test_jagged_dense(void) {
    int64_t *o = make_offsets(LENS, NB);
    const int K = 20, N = 70;
    size_t T = (size_t)o[NB];
    float *x = randn(T * K, 31, 1.0), *W = randn((size_t)K * N, 32, 1.0), *y = malloc(sizeof(float) * T * N);
    float *dy = randn(T * N, 33, 1.0), *dx = randn(T * K, 34, 1.0), *dW = randn((size_t)K * N, 35, 1.0);
    double *ry = malloc(sizeof(double) * T * N), *rdx = dcopy(dx, T * K), *rdW = dcopy(dW, (size_t)K * N);
    for (size_t r = 0; r < T; r++)
        for (int c = 0; c < N; c++) {
            double s = 0;
            for (int k = 0; k < K; k++) {
                s += (double)x[r * K + k] * W[k * N + c];
                rdx[r * K + k] += (double)dy[r * N + c] * W[k * N + c];
                rdW[k * N + c] += (double)x[r * K + k] * dy[r * N + c];
            }
            ry[r * N + c] = s;
        }
    CHECK_OK(em_jagged_dense_matmul_forward(y, x, W, o, NB, K, N, NULL));
    CHECK_RELD(y, ry, T * N, 1e-5);
    CHECK_OK(em_jagged_dense_matmul_backward(dx, dW, dy, x, W, o, NB, K, N, NULL));
    CHECK_RELD(dx, rdx, T * K, 1e-5);
    CHECK_RELD(dW, rdW, (size_t)K * N, 1e-5);
    /* nullable gradients */
    float *dx2 = randn(T * K, 34, 1.0);
    CHECK_OK(em_jagged_dense_matmul_backward(dx2, NULL, dy, x, W, o, NB, K, N, NULL));
    CHECK_RELD(dx2, rdx, T * K, 1e-5);
    free(x), free(W), free(y), free(dy), free(dx), free(dW), free(ry), free(rdx), free(rdW), free(dx2), free(o);
}

static void test_jagged_jagged(void) {
    int64_t *o = make_offsets(LENS, NB), bo[NB + 1];
    const int D = 13;
    CHECK_OK(em_jagged_block_offsets(bo, o, NB));
    int64_t expect = 0;
    for (int b = 0; b < NB; b++) expect += (int64_t)LENS[b] * LENS[b];
    CHECK(bo[NB] == expect && bo[3] == 1 + 90000);
    size_t T = (size_t)o[NB], ns = (size_t)bo[NB];
    float *Q = randn(T * D, 41, 1.0), *K = randn(T * D, 42, 1.0), *S = malloc(sizeof(float) * ns);
    float *dS = randn(ns, 43, 1.0), *dQ = randn(T * D, 44, 1.0), *dK = randn(T * D, 45, 1.0);
    double *rS = malloc(sizeof(double) * ns), *rdQ = dcopy(dQ, T * D), *rdK = dcopy(dK, T * D);
    ref_jj(rS, Q, K, o, bo, NB, D);
    ref_jj_bwd(rdQ, rdK, dS, Q, K, o, bo, NB, D);
    CHECK_OK(em_jagged_jagged_matmul_forward(S, Q, K, o, bo, NB, D, NULL));
    CHECK_RELD(S, rS, ns, 1e-5);
    CHECK_OK(em_jagged_jagged_matmul_backward(dQ, dK, dS, Q, K, o, bo, NB, D, NULL));
    CHECK_RELD(dQ, rdQ, T * D, 1e-5);
    CHECK_RELD(dK, rdK, T * D, 1e-5);
    free(Q), free(K), free(S), free(dS), free(dQ), free(dK), free(rS), free(rdQ), free(rdK), free(o);
}

/* ------------------------------------------------------ finite differences */

/* Central differences of loss = sum w * f(x) over every input coordinate, in fp32
 * forwards, against the analytic gradient (the backward from a zero gradient). */
typedef void (*fwd_fn)(float *out, float *const *in, const int64_t *o, int B);

static const int FD_LENS[] = {0, 1, 3, 5};
#define FD_B 4
#define FD_D 3
#define FD_N 4

static void fd_softmax(float *out, float *const *in, const int64_t *o, int B) {
    CHECK_OK(em_jagged_softmax_forward(out, in[0], o, B, FD_D, NULL));
}
static void fd_jd(float *out, float *const *in, const int64_t *o, int B) {
    CHECK_OK(em_jagged_dense_matmul_forward(out, in[0], in[1], o, B, FD_D, FD_N, NULL));
}
static void fd_jj(float *out, float *const *in, const int64_t *o, int B) {
    int64_t bo[FD_B + 1];
    CHECK_OK(em_jagged_block_offsets(bo, o, B));
    CHECK_OK(em_jagged_jagged_matmul_forward(out, in[0], in[1], o, bo, B, FD_D, NULL));
}

static double fd_loss(fwd_fn f, float *const *in, const int64_t *o, const float *w, size_t nout, float *buf) {
    f(buf, in, o, FD_B);
    double s = 0;
    for (size_t i = 0; i < nout; i++) s += (double)w[i] * buf[i];
    return s;
}

static void fd_check(const char *what, fwd_fn f, float *const *in, const size_t *nin, float *const *grad, int nins,
                     const int64_t *o, const float *w, size_t nout, double eps) {
    float *buf = malloc(sizeof(float) * nout);
    double worst = 0;
    for (int k = 0; k < nins; k++)
        for (size_t i = 0; i < nin[k]; i++) {
            float keep = in[k][i];
            in[k][i] = keep + (float)eps;
            double lp = fd_loss(f, in, o, w, nout, buf);
            in[k][i] = keep - (float)eps;
            double lm = fd_loss(f, in, o, w, nout, buf);
            in[k][i] = keep;
            double fd = (lp - lm) / (2 * eps), e = fabs(fd - grad[k][i]) / fmax(1.0, fabs(fd));
            if (e > worst) worst = e;
        }
    t_checks++;
    if (!(worst <= 2e-3)) {
        t_failures++;
        fprintf(stderr, "  FAIL %s: finite differences off by %.3g\n", what, worst);
    }
    free(buf);
}

static void test_finite_diff(void) {
    int64_t *o = make_offsets(FD_LENS, FD_B), bo[FD_B + 1];
    size_t T = (size_t)o[FD_B], nx = T * FD_D;
    /* softmax */
    float *x = randn(nx, 51, 1.5), *y = malloc(sizeof(float) * nx), *w = randn(nx, 52, 1.0);
    float *dx = calloc(nx, sizeof(float));
    CHECK_OK(em_jagged_softmax_forward(y, x, o, FD_B, FD_D, NULL));
    CHECK_OK(em_jagged_softmax_backward(dx, w, y, o, FD_B, FD_D, NULL));
    fd_check("softmax", fd_softmax, (float *[]){x}, (size_t[]){nx}, (float *[]){dx}, 1, o, w, nx, 1e-2);
    /* jagged x dense */
    float *W = randn(FD_D * FD_N, 53, 1.0), *wj = randn(T * FD_N, 54, 1.0), *dW = calloc(FD_D * FD_N, sizeof(float));
    memset(dx, 0, sizeof(float) * nx);
    CHECK_OK(em_jagged_dense_matmul_backward(dx, dW, wj, x, W, o, FD_B, FD_D, FD_N, NULL));
    fd_check("jagged_dense", fd_jd, (float *[]){x, W}, (size_t[]){nx, FD_D * FD_N}, (float *[]){dx, dW}, 2, o, wj,
             T * FD_N, 1e-2);
    /* jagged x jagged */
    CHECK_OK(em_jagged_block_offsets(bo, o, FD_B));
    float *K = randn(nx, 55, 1.0), *ws = randn((size_t)bo[FD_B], 56, 1.0), *dK = calloc(nx, sizeof(float));
    memset(dx, 0, sizeof(float) * nx);
    CHECK_OK(em_jagged_jagged_matmul_backward(dx, dK, ws, x, K, o, bo, FD_B, FD_D, NULL));
    fd_check("jagged_jagged", fd_jj, (float *[]){x, K}, (size_t[]){nx, nx}, (float *[]){dx, dK}, 2, o, ws,
             (size_t)bo[FD_B], 1e-2);
    free(x), free(y), free(w), free(dx), free(W), free(wj), free(dW), free(K), free(ws), free(dK), free(o);
}

/* ------------------------------------------------------------ bad offsets */

static void test_bad_offsets(void) {
    float buf[64] = {0}, g[64] = {0};
    int64_t bad[][4] = {{1, 2, 3, 4}, {0, 3, 2, 4}, {0, 1, 2, -1}};
    int64_t good[4] = {0, 1, 1, 3}, bo[4];
    for (int k = 0; k < 4; k++) {
        const int64_t *o = k < 3 ? bad[k] : NULL;
        em_clear_error();
        CHECK(em_jagged_check(o, 3) == EM_ERR_INVALID);
        CHECK(em_last_error()[0] != '\0');
        CHECK(em_jagged_to_padded_forward(buf, g, o, 3, 4, 2, 0.f, 1, NULL) == EM_ERR_INVALID);
        CHECK(em_jagged_to_padded_backward(buf, g, o, 3, 4, 2, 1, NULL) == EM_ERR_INVALID);
        CHECK(em_padded_to_jagged_forward(buf, g, o, 3, 4, 2, 1, NULL) == EM_ERR_INVALID);
        CHECK(em_padded_to_jagged_backward(buf, g, o, 3, 4, 2, 1, NULL) == EM_ERR_INVALID);
        CHECK(em_jagged_pool_forward(buf, g, o, 3, 2, EM_JAGGED_SUM, NULL) == EM_ERR_INVALID);
        CHECK(em_jagged_pool_backward(buf, g, o, 3, 2, EM_JAGGED_MEAN, NULL) == EM_ERR_INVALID);
        CHECK(em_jagged_softmax_forward(buf, g, o, 3, 2, NULL) == EM_ERR_INVALID);
        CHECK(em_jagged_softmax_backward(buf, g, g, o, 3, 2, NULL) == EM_ERR_INVALID);
        CHECK(em_jagged_dense_matmul_forward(buf, g, g, o, 3, 2, 2, NULL) == EM_ERR_INVALID);
        CHECK(em_jagged_dense_matmul_backward(buf, buf, g, g, g, o, 3, 2, 2, NULL) == EM_ERR_INVALID);
        CHECK(em_jagged_block_offsets(bo, o, 3) == EM_ERR_INVALID);
        CHECK(em_jagged_jagged_matmul_forward(buf, g, g, o, good, 3, 2, NULL) == EM_ERR_INVALID);
        CHECK(em_jagged_jagged_matmul_backward(buf, buf, g, g, g, o, good, 3, 2, NULL) == EM_ERR_INVALID);
    }
    CHECK(strstr(em_last_error(), "NULL") != NULL);
    CHECK(em_jagged_check(good, -1) == EM_ERR_INVALID);
    CHECK(em_jagged_softmax_forward(buf, g, good, 3, -2, NULL) == EM_ERR_INVALID);
    /* block offsets that do not match the lengths */
    int64_t wrong[4] = {0, 1, 2, 6};
    CHECK(em_jagged_jagged_matmul_forward(buf, g, g, good, wrong, 3, 2, NULL) == EM_ERR_INVALID);
    CHECK(em_jagged_jagged_matmul_forward(buf, g, g, good, NULL, 3, 2, NULL) == EM_ERR_INVALID);
    CHECK_OK(em_jagged_block_offsets(bo, good, 3));
    CHECK(bo[0] == 0 && bo[1] == 1 && bo[2] == 1 && bo[3] == 5);
    CHECK_OK(em_jagged_jagged_matmul_forward(buf, g, g, good, bo, 3, 2, NULL));
    CHECK(em_jagged_max_len(good, 3) == 2);
    /* B = 0: valid, nothing to do */
    CHECK_OK(em_jagged_softmax_forward(buf, g, good, 0, 2, NULL));
    CHECK_OK(em_jagged_dense_matmul_forward(buf, g, g, good, 0, 2, 2, NULL));
}

/* ------------------------------------------------------------ thread count */

typedef struct {
    float *pad, *dx_pad, *pj, *dp, *pool, *dx_pool, *sm, *dx_sm, *jd, *dx_jd, *dW, *jj, *dQ, *dK;
} outs;

#define TD 70
#define TML 50
#define TN 70

static void run_all(outs *r, const float *x, const float *W, const float *g, const int64_t *o, const int64_t *bo,
                    em_pool *pool) {
    size_t T = (size_t)o[NB], np = (size_t)NB * TML * TD;
    r->pad = malloc(sizeof(float) * np), r->dx_pad = calloc(T * TD, 4), r->pj = malloc(sizeof(float) * T * TD);
    r->dp = calloc(np, 4), r->pool = malloc(sizeof(float) * NB * TD), r->dx_pool = calloc(T * TD, 4);
    r->sm = malloc(sizeof(float) * T * TD), r->dx_sm = calloc(T * TD, 4), r->jd = malloc(sizeof(float) * T * TN);
    r->dx_jd = calloc(T * TD, 4), r->dW = calloc(TD * TN, 4), r->jj = malloc(sizeof(float) * (size_t)bo[NB]);
    r->dQ = calloc(T * TD, 4), r->dK = calloc(T * TD, 4);
    CHECK_OK(em_jagged_to_padded_forward(r->pad, x, o, NB, TML, TD, 0.5f, 1, pool));
    CHECK_OK(em_jagged_to_padded_backward(r->dx_pad, g, o, NB, TML, TD, 1, pool));
    CHECK_OK(em_padded_to_jagged_forward(r->pj, g, o, NB, TML, TD, 1, pool));
    CHECK_OK(em_padded_to_jagged_backward(r->dp, x, o, NB, TML, TD, 1, pool));
    CHECK_OK(em_jagged_pool_forward(r->pool, x, o, NB, TD, EM_JAGGED_MEAN, pool));
    CHECK_OK(em_jagged_pool_backward(r->dx_pool, g, o, NB, TD, EM_JAGGED_MEAN, pool));
    CHECK_OK(em_jagged_softmax_forward(r->sm, x, o, NB, TD, pool));
    CHECK_OK(em_jagged_softmax_backward(r->dx_sm, g, r->sm, o, NB, TD, pool));
    CHECK_OK(em_jagged_dense_matmul_forward(r->jd, x, W, o, NB, TD, TN, pool));
    CHECK_OK(em_jagged_dense_matmul_backward(r->dx_jd, r->dW, g, x, W, o, NB, TD, TN, pool));
    CHECK_OK(em_jagged_jagged_matmul_forward(r->jj, x, g, o, bo, NB, TD, pool));
    CHECK_OK(em_jagged_jagged_matmul_backward(r->dQ, r->dK, g, x, W, o, bo, NB, TD, pool));
}

static void test_threads(void) {
    int64_t *o = make_offsets(LENS, NB), bo[NB + 1];
    CHECK_OK(em_jagged_block_offsets(bo, o, NB));
    size_t T = (size_t)o[NB], big = (size_t)bo[NB] + T * TD + (size_t)NB * TML * TD;
    /* g is large enough to serve as every upstream gradient; W as K for dK */
    float *x = randn(T * TD, 61, 1.0), *W = randn(big, 62, 1.0), *g = randn(big, 63, 1.0);
    outs r[3];
    for (int k = 0; k < 3; k++) {
        em_pool *pool = NULL;
        if (k > 0) CHECK_OK(em_pool_create(&pool, k + 1));
        run_all(&r[k], x, W, g, o, bo, pool);
        em_pool_free(pool);
    }
    size_t np = (size_t)NB * TML * TD;
    for (int k = 1; k < 3; k++) {
#define SAME(f, n) CHECK(memcmp(r[0].f, r[k].f, sizeof(float) * (n)) == 0)
        SAME(pad, np); SAME(dx_pad, T * TD); SAME(pj, T * TD); SAME(dp, np); SAME(pool, NB * TD);
        SAME(dx_pool, T * TD); SAME(sm, T * TD); SAME(dx_sm, T * TD); SAME(jd, T * TN); SAME(dx_jd, T * TD);
        SAME(dW, TD * TN); SAME(jj, (size_t)bo[NB]); SAME(dQ, T * TD); SAME(dK, T * TD);
#undef SAME
    }
    for (int k = 0; k < 3; k++) {
        float **p = (float **)&r[k];
        for (size_t i = 0; i < sizeof(outs) / sizeof(float *); i++) free(p[i]);
    }
    free(x), free(W), free(g), free(o);
}

/* ------------------------------------------------------------------ golden */

static const float *gget(em_st *st, const char *name, int64_t n) {
    const float *p = em_st_expect(st, name, EM_F32, n);
    if (!p) fprintf(stderr, "  golden: %s\n", em_last_error());
    CHECK(p != NULL);
    return p;
}

static void golden_cmp(const char *name, const float *got, const float *ref, size_t n, double tol) {
    double e = rel_err_f(got, ref, n, 1e-6);
    t_checks++;
    if (!(e <= tol)) {
        t_failures++;
        fprintf(stderr, "  FAIL golden %s: rel err %.3g > %g\n", name, e, tol);
    }
}

static void test_golden(void) {
    char path[4096];
    em_st *st = NULL;
    CHECK_OK(em_st_open(&st, em_test_path("golden/jagged.safetensors", path, sizeof path)));
    if (!st) return;
    const int B = 8, D = 12, ML = 40, K = 12, N = 10;
    const int64_t *o = em_st_expect(st, "offsets", EM_I64, B + 1);
    const int64_t *gbo = em_st_expect(st, "block_offsets", EM_I64, B + 1);
    CHECK(o && gbo);
    if (!o || !gbo) goto done;
    int64_t bo[9];
    CHECK_OK(em_jagged_block_offsets(bo, o, B));
    CHECK(memcmp(bo, gbo, sizeof bo) == 0);
    size_t T = (size_t)o[B], np = (size_t)B * ML * D, ns = (size_t)bo[B];
    em_pool *pool = NULL;
    CHECK_OK(em_pool_create(&pool, 3));
    float *buf = malloc(sizeof(float) * (np + ns)), *grad = malloc(sizeof(float) * (np + ns));
    const float *a, *b, *c, *d, *e, *f;

#define ZERO(n) memset(grad, 0, sizeof(float) * (n))
    if ((a = gget(st, "tp_x", T * D)) && (b = gget(st, "tp_out", np)) && (c = gget(st, "tp_dout", np)) &&
        (d = gget(st, "tp_dx", T * D))) {
        CHECK_OK(em_jagged_to_padded_forward(buf, a, o, B, ML, D, -1.5f, 1, pool));
        golden_cmp("tp_out", buf, b, np, 1e-5);
        ZERO(T * D);
        CHECK_OK(em_jagged_to_padded_backward(grad, c, o, B, ML, D, 1, pool));
        golden_cmp("tp_dx", grad, d, T * D, 1e-4);
    }
    if ((a = gget(st, "pj_x", np)) && (b = gget(st, "pj_out", T * D)) && (c = gget(st, "pj_dout", T * D)) &&
        (d = gget(st, "pj_dx", np))) {
        CHECK_OK(em_padded_to_jagged_forward(buf, a, o, B, ML, D, 1, pool));
        golden_cmp("pj_out", buf, b, T * D, 1e-5);
        ZERO(np);
        CHECK_OK(em_padded_to_jagged_backward(grad, c, o, B, ML, D, 1, pool));
        golden_cmp("pj_dx", grad, d, np, 1e-4);
    }
    static const char *modes[2][3] = {{"sum_out", "sum_dout", "sum_dx"}, {"mean_out", "mean_dout", "mean_dx"}};
    for (int m = 0; m < 2; m++)
        if ((a = gget(st, "pool_x", T * D)) && (b = gget(st, modes[m][0], B * D)) &&
            (c = gget(st, modes[m][1], B * D)) && (d = gget(st, modes[m][2], T * D))) {
            CHECK_OK(em_jagged_pool_forward(buf, a, o, B, D, (em_jagged_reduce)m, pool));
            golden_cmp(modes[m][0], buf, b, (size_t)B * D, 1e-5);
            ZERO(T * D);
            CHECK_OK(em_jagged_pool_backward(grad, c, o, B, D, (em_jagged_reduce)m, pool));
            golden_cmp(modes[m][2], grad, d, T * D, 1e-4);
        }
    if ((a = gget(st, "sm_x", T * D)) && (b = gget(st, "sm_out", T * D)) && (c = gget(st, "sm_dout", T * D)) &&
        (d = gget(st, "sm_dx", T * D))) {
        CHECK_OK(em_jagged_softmax_forward(buf, a, o, B, D, pool));
        golden_cmp("sm_out", buf, b, T * D, 1e-5);
        ZERO(T * D);
        CHECK_OK(em_jagged_softmax_backward(grad, c, buf, o, B, D, pool));
        golden_cmp("sm_dx", grad, d, T * D, 1e-4);
    }
    if ((a = gget(st, "jd_x", T * K)) && (b = gget(st, "jd_W", K * N)) && (c = gget(st, "jd_out", T * N)) &&
        (d = gget(st, "jd_dout", T * N)) && (e = gget(st, "jd_dx", T * K)) && (f = gget(st, "jd_dW", K * N))) {
        CHECK_OK(em_jagged_dense_matmul_forward(buf, a, b, o, B, K, N, pool));
        golden_cmp("jd_out", buf, c, T * N, 1e-5);
        memset(buf, 0, sizeof(float) * K * N), ZERO(T * K);
        CHECK_OK(em_jagged_dense_matmul_backward(grad, buf, d, a, b, o, B, K, N, pool));
        golden_cmp("jd_dx", grad, e, T * K, 1e-4);
        golden_cmp("jd_dW", buf, f, (size_t)K * N, 1e-4);
    }
    if ((a = gget(st, "jj_q", T * D)) && (b = gget(st, "jj_k", T * D)) && (c = gget(st, "jj_s", ns)) &&
        (d = gget(st, "jj_ds", ns)) && (e = gget(st, "jj_dq", T * D)) && (f = gget(st, "jj_dk", T * D))) {
        CHECK_OK(em_jagged_jagged_matmul_forward(buf, a, b, o, bo, B, D, pool));
        golden_cmp("jj_s", buf, c, ns, 1e-5);
        memset(buf, 0, sizeof(float) * T * D), ZERO(T * D);
        CHECK_OK(em_jagged_jagged_matmul_backward(grad, buf, d, a, b, o, bo, B, D, pool));
        golden_cmp("jj_dq", grad, e, T * D, 1e-4);
        golden_cmp("jj_dk", buf, f, T * D, 1e-4);
    }
#undef ZERO
    free(buf), free(grad);
    em_pool_free(pool);
done:
    em_st_close(st);
}

TEST_MAIN({"padded", test_padded}, {"pool", test_pool}, {"softmax", test_softmax},
          {"jagged_dense", test_jagged_dense}, {"jagged_jagged", test_jagged_jagged},
          {"finite_diff", test_finite_diff}, {"bad_offsets", test_bad_offsets}, {"threads", test_threads},
          {"golden", test_golden})
