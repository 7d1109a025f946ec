/*
 * test_nn_kunlun.c - Kunlun's GDPA and sliding-window attention (ember/kunlun.h)
 * against references.
 *
 *   - a dense float64 reference written here: the full L x L masked scores per sample
 *     and head, then either act(S) V * scale_out (GDPA) or softmax(S) V (window mask),
 *     with a textbook backward, for O, lse, dQ, dK, dV; lengths 0, 1, 5, 64, 65, 200 in
 *     one batch, H = 2, dh = 8 and 16, every activation, windows 0, 1, 7, 300, causal
 *     and not;
 *   - a window wider than every sequence against em_jattn_forward / _backward;
 *   - central finite differences of the float64 reference (validates the analytic
 *     backward) and of the float kernels on tiny cases;
 *   - bitwise equality for pools of 1, 2, 3 threads and a NULL pool;
 *   - bad offsets / config -> EM_ERR_INVALID; allocation failures -> EM_ERR_NOMEM with
 *     nothing leaked;
 *   - tests/golden/kunlun.safetensors from tools/make_golden_kunlun.py (PyTorch autograd).
 * Tolerances: 1e-5 relative (to the largest reference magnitude) forward and lse,
 * 1e-4 gradients. Backward is checked as an accumulation: gradients start non-zero.
 */
#include "test.h"
#include "ember/kunlun.h"

#define TOL_FWD 1e-5
#define TOL_GRAD 1e-4

/* ------------------------------------------------------- float64 reference */

static double ref_act(int act, double x, double *d) {
    switch (act) {
    case EM_GDPA_IDENTITY: *d = 1; return x;
    case EM_GDPA_RELU: *d = x > 0; return x > 0 ? x : 0;
    case EM_GDPA_RELU2: *d = x > 0 ? 2 * x : 0; return x > 0 ? x * x : 0;
    case EM_GDPA_SILU: {
        double sg = 1 / (1 + exp(-x));
        *d = sg * (1 + x * (1 - sg));
        return x * sg;
    }
    case EM_GDPA_GELU: {
        double phi = 0.5 * (1 + erf(x / sqrt(2.0)));
        *d = phi + x * exp(-0.5 * x * x) / sqrt(2 * M_PI);
        return x * phi;
    }
    default: {
        double t = tanh(x);
        *d = 1 - t * t;
        return t;
    }
    }
}

typedef struct {
    int gdpa;      /* 1: GDPA with act; 0: softmax attention */
    int act;
    int window;    /* < 0: none */
    int causal;
    double s, so;  /* score scale, GDPA output scale */
} refcfg;

static int visible(const refcfg *r, int i, int j) {
    if (r->causal && j > i) return 0;
    if (r->window >= 0 && (j < i - r->window || j > i + r->window)) return 0;
    return 1;
}

/* Outputs overwritten; dQ == NULL skips the backward; lse may be NULL. */
static void ref_run(const refcfg *rc, const int64_t *off, int B, int H, int dh, const float *Q,
                    const float *K, const float *V, const float *dO, double *O, double *lse,
                    double *dQ, double *dK, double *dV) {
    const int ld = H * dh;
    const int64_t total = off[B];
    for (int64_t i = 0; i < total * ld; i++) {
        O[i] = 0;
        if (dQ) dQ[i] = dK[i] = dV[i] = 0;
    }
    for (int b = 0; b < B; b++) {
        const int L = (int)(off[b + 1] - off[b]);
        if (L == 0) continue;
        double *P = malloc(sizeof(double) * L * L), *G = malloc(sizeof(double) * L * L);
        for (int h = 0; h < H; h++) {
#define R(i) ((size_t)(off[b] + (i)) * ld + (size_t)h * dh)
            for (int i = 0; i < L; i++) {
                double mx = -INFINITY;
                for (int j = 0; j < L; j++) {
                    double s = 0;
                    for (int d = 0; d < dh; d++) s += (double)Q[R(i) + d] * K[R(j) + d];
                    s *= rc->s;
                    double *p = &P[(size_t)i * L + j], *g = &G[(size_t)i * L + j];
                    if (rc->gdpa) {
                        *p = visible(rc, i, j) ? ref_act(rc->act, s, g) : 0;
                        if (!visible(rc, i, j)) *g = 0;
                    } else {
                        *p = visible(rc, i, j) ? s : -INFINITY;
                        if (*p > mx) mx = *p;
                    }
                }
                if (!rc->gdpa) {
                    double sum = 0;
                    for (int j = 0; j < L; j++) sum += exp(P[(size_t)i * L + j] - mx);
                    for (int j = 0; j < L; j++) P[(size_t)i * L + j] = exp(P[(size_t)i * L + j] - mx) / sum;
                    if (lse) lse[(size_t)(off[b] + i) * H + h] = mx + log(sum);
                }
                const double so = rc->gdpa ? rc->so : 1.0;
                for (int j = 0; j < L; j++)
                    for (int d = 0; d < dh; d++) O[R(i) + d] += so * P[(size_t)i * L + j] * V[R(j) + d];
            }
            if (!dQ) continue;
            for (int i = 0; i < L; i++) {
                double Di = 0;
                double *dP = malloc(sizeof(double) * L);
                for (int j = 0; j < L; j++) {
                    double g = 0;
                    for (int d = 0; d < dh; d++) g += (double)dO[R(i) + d] * V[R(j) + d];
                    dP[j] = g;
                    Di += g * P[(size_t)i * L + j];
                }
                for (int j = 0; j < L; j++) {
                    const double p = P[(size_t)i * L + j];
                    const double ds = rc->gdpa ? rc->s * rc->so * dP[j] * G[(size_t)i * L + j]
                                               : rc->s * p * (dP[j] - Di);
                    const double pv = rc->gdpa ? rc->so * p : p;
                    for (int d = 0; d < dh; d++) {
                        dV[R(j) + d] += pv * dO[R(i) + d];
                        dQ[R(i) + d] += ds * K[R(j) + d];
                        dK[R(j) + d] += ds * Q[R(i) + d];
                    }
                }
                free(dP);
            }
#undef R
        }
        free(P);
        free(G);
    }
}

/* ------------------------------------------------------------- test cases */

static void fill(float *x, size_t n, em_rng *r, double s) {
    for (size_t i = 0; i < n; i++) x[i] = (float)(s * em_rng_normal(r));
}

typedef struct {
    int B, H, dh;
    int64_t off[16];
    size_t n, nl; /* elements of Q (K, V, O, ...) and of lse */
    float *Q, *K, *V, *dO, *O, *lse, *dQ, *dK, *dV;
} tcase;

static void tcase_init(tcase *c, const int *lens, int B, int H, int dh, uint64_t seed) {
    memset(c, 0, sizeof *c);
    c->B = B, c->H = H, c->dh = dh;
    for (int b = 0; b < B; b++) c->off[b + 1] = c->off[b] + lens[b];
    c->n = (size_t)c->off[B] * H * dh;
    c->nl = (size_t)c->off[B] * H;
    float **bufs[] = {&c->Q, &c->K, &c->V, &c->dO, &c->O, &c->dQ, &c->dK, &c->dV};
    for (int k = 0; k < 8; k++) *bufs[k] = malloc(sizeof(float) * (c->n + 1));
    c->lse = malloc(sizeof(float) * (c->nl + 1));
    em_rng r;
    em_rng_seed(&r, seed);
    fill(c->Q, c->n, &r, 1.0);
    fill(c->K, c->n, &r, 1.0);
    fill(c->V, c->n, &r, 1.0);
    fill(c->dO, c->n, &r, 1.0);
}

static void tcase_free(tcase *c) {
    free(c->Q), free(c->K), free(c->V), free(c->dO), free(c->O), free(c->lse);
    free(c->dQ), free(c->dK), free(c->dV);
}

/* Gradients start at a fixed non-zero pattern g0(i) so that accumulation is checked. */
static float g0(size_t i) { return (float)((int)(i % 7) - 3) * 0.25f; }

/* max_i |(got_i - g0(i + shift)) - want_i| / max(max_i |want_i|, 0.1). The floor is
 * for exactly-zero gradients (w = 0: softmax over one key has dQ = dK = 0), where the
 * kernel leaves rounding noise of the order of eps * |dO| |V|; it then asks for an
 * absolute error <= 1e-5 (noise seen: ~1e-6). */
static double grad_err(const float *got, const double *want, size_t n, size_t shift) {
    double num = 0, den = 0.1;
    for (size_t i = 0; i < n; i++) {
        double d = fabs(((double)got[i] - g0(i + shift)) - want[i]);
        if (d > num || d != d) num = d;
        if (fabs(want[i]) > den) den = fabs(want[i]);
    }
    return num / den;
}

static void grads_init(tcase *c) {
    for (size_t i = 0; i < c->n; i++) c->dQ[i] = g0(i), c->dK[i] = g0(i + 1), c->dV[i] = g0(i + 2);
}

/* Kernel config for a reference config. scale/scale_out 0 = defaults. */
static em_jattn_cfg attn_cfg(const tcase *c, float scale, int causal) {
    return (em_jattn_cfg){.B = c->B, .H = c->H, .dh = c->dh, .offsets = c->off, .scale = scale,
                          .causal = causal};
}

static em_status kern_fwd(tcase *c, int gdpa, int act, int window, int causal, float scale,
                          float scale_out, em_pool *pool) {
    if (gdpa) {
        em_gdpa_cfg g = {.attn = attn_cfg(c, scale, causal), .act = act, .scale_out = scale_out};
        return em_gdpa_forward(c->O, c->Q, c->K, c->V, &g, pool);
    }
    em_swa_cfg w = {.attn = attn_cfg(c, scale, causal), .window = window};
    return em_swa_forward(c->O, c->lse, c->Q, c->K, c->V, &w, pool);
}

static em_status kern_bwd(tcase *c, int gdpa, int act, int window, int causal, float scale,
                          float scale_out, em_pool *pool) {
    if (gdpa) {
        em_gdpa_cfg g = {.attn = attn_cfg(c, scale, causal), .act = act, .scale_out = scale_out};
        return em_gdpa_backward(c->dQ, c->dK, c->dV, c->dO, c->Q, c->K, c->V, &g, pool);
    }
    em_swa_cfg w = {.attn = attn_cfg(c, scale, causal), .window = window};
    return em_swa_backward(c->dQ, c->dK, c->dV, c->dO, c->Q, c->K, c->V, c->O, c->lse, &w, pool);
}

static int64_t max_len(const tcase *c) {
    int64_t m = 0;
    for (int b = 0; b < c->B; b++)
        if (c->off[b + 1] - c->off[b] > m) m = c->off[b + 1] - c->off[b];
    return m;
}

static void check_case(const int *lens, int B, int H, int dh, int gdpa, int act, int window,
                       int causal, float scale, float scale_out, em_pool *pool) {
    tcase c;
    tcase_init(&c, lens, B, H, dh, 1000 + 31 * dh + 7 * causal + 3 * act + window);
    refcfg rc = {.gdpa = gdpa, .act = act, .window = gdpa ? -1 : window, .causal = causal,
                 .s = scale > 0 ? scale : 1.0 / sqrt((double)dh),
                 .so = scale_out > 0 ? scale_out : 1.0 / (double)max_len(&c)};
    double *O = malloc(sizeof(double) * (c.n + 1)), *lse = malloc(sizeof(double) * (c.nl + 1));
    double *dQ = malloc(sizeof(double) * (c.n + 1)), *dK = malloc(sizeof(double) * (c.n + 1)),
           *dV = malloc(sizeof(double) * (c.n + 1));
    ref_run(&rc, c.off, B, H, dh, c.Q, c.K, c.V, c.dO, O, lse, dQ, dK, dV);
    grads_init(&c);
    CHECK_OK(kern_fwd(&c, gdpa, act, window, causal, scale, scale_out, pool));
    CHECK_OK(kern_bwd(&c, gdpa, act, window, causal, scale, scale_out, pool));
    /* compare what was accumulated (kernel - g0) with the reference gradient, so the
     * tolerance is relative to the gradient's own magnitude, not to g0's */
    double eo = rel_err_fd(c.O, O, c.n, 1e-6), el = gdpa ? 0 : rel_err_fd(c.lse, lse, c.nl, 1e-6);
    double eq = grad_err(c.dQ, dQ, c.n, 0), ek = grad_err(c.dK, dK, c.n, 1),
           ev = grad_err(c.dV, dV, c.n, 2);
    if (getenv("EMBER_TEST_VERBOSE"))
        fprintf(stderr, "  %s act=%d w=%d dh=%d causal=%d: O %.2g lse %.2g dQ %.2g dK %.2g dV %.2g\n",
                gdpa ? "gdpa" : "swa", act, window, dh, causal, eo, el, eq, ek, ev);
    t_checks++;
    if (!(eo <= TOL_FWD && el <= TOL_FWD && eq <= TOL_GRAD && ek <= TOL_GRAD && ev <= TOL_GRAD)) {
        t_failures++;
        fprintf(stderr,
                "  FAIL %s act=%d w=%d dh=%d causal=%d scale=%g/%g: O %.3g lse %.3g dQ %.3g dK %.3g "
                "dV %.3g\n",
                gdpa ? "gdpa" : "swa", act, window, dh, causal, scale, scale_out, eo, el, eq, ek, ev);
    }
    free(O), free(lse), free(dQ), free(dK), free(dV);
    tcase_free(&c);
}

static const int LENS[] = {5, 0, 200, 1, 65, 64};
#define NLENS 6

static void test_gdpa_vs_ref(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    for (int dh = 8; dh <= 16; dh += 8)
        for (int act = EM_GDPA_IDENTITY; act <= EM_GDPA_TANH; act++)
            for (int causal = 0; causal < 2; causal++)
                check_case(LENS, NLENS, 2, dh, 1, act, 0, causal, 0.f, 0.f, pool);
    /* explicit scales */
    check_case(LENS, NLENS, 2, 8, 1, EM_GDPA_SILU, 0, 1, 0.7f, 0.05f, pool);
    check_case(LENS, NLENS, 2, 16, 1, EM_GDPA_GELU, 0, 0, 0.2f, 1.0f, NULL);
    em_pool_free(pool);
}

static void test_swa_vs_ref(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    const int ws[] = {0, 1, 7, 300};
    for (int dh = 8; dh <= 16; dh += 8)
        for (int k = 0; k < 4; k++)
            for (int causal = 0; causal < 2; causal++)
                check_case(LENS, NLENS, 2, dh, 0, 0, ws[k], causal, 0.f, 0.f, pool);
    /* narrow (w <= 7: per-row path) and tiled windows of every tile height: tq = 24
     * (w 8), 64 (w 30), 128 (w 100) */
    check_case(LENS, NLENS, 2, 8, 0, 0, 3, 0, 0.6f, 0.f, pool);
    check_case(LENS, NLENS, 2, 8, 0, 0, 8, 0, 0.f, 0.f, pool);
    check_case(LENS, NLENS, 2, 16, 0, 0, 9, 1, 0.f, 0.f, pool);
    check_case(LENS, NLENS, 2, 8, 0, 0, 30, 1, 0.f, 0.f, pool);
    check_case(LENS, NLENS, 2, 8, 0, 0, 100, 0, 0.f, 0.f, NULL);
    em_pool_free(pool);
}

/* A window wider than every sequence is full attention: compare with jattn. */
static void test_swa_full_is_jattn(void) {
    for (int causal = 0; causal < 2; causal++) {
        tcase a, b;
        tcase_init(&a, LENS, NLENS, 2, 16, 55 + causal);
        tcase_init(&b, LENS, NLENS, 2, 16, 55 + causal);
        grads_init(&a), grads_init(&b);
        em_jattn_cfg jc = attn_cfg(&b, 0.f, causal);
        CHECK_OK(kern_fwd(&a, 0, 0, 300, causal, 0.f, 0.f, NULL));
        CHECK_OK(kern_bwd(&a, 0, 0, 300, causal, 0.f, 0.f, NULL));
        CHECK_OK(em_jattn_forward(b.O, b.lse, b.Q, b.K, b.V, &jc, NULL));
        CHECK_OK(em_jattn_backward(b.dQ, b.dK, b.dV, b.dO, b.Q, b.K, b.V, b.O, b.lse, &jc, NULL));
        CHECK_REL(a.O, b.O, a.n, 2e-6);
        CHECK_REL(a.lse, b.lse, a.nl, 2e-6);
        CHECK_REL(a.dQ, b.dQ, a.n, 1e-5);
        CHECK_REL(a.dK, b.dK, a.n, 1e-5);
        CHECK_REL(a.dV, b.dV, a.n, 1e-5);
        tcase_free(&a), tcase_free(&b);
    }
}

/* Finite differences of loss = sum(dO * O) (double) in the direction of each input. */
static double ref_loss(const tcase *c, const refcfg *rc) {
    double *O = malloc(sizeof(double) * c->n), *lse = malloc(sizeof(double) * c->nl);
    ref_run(rc, c->off, c->B, c->H, c->dh, c->Q, c->K, c->V, NULL, O, lse, NULL, NULL, NULL);
    double s = 0;
    for (size_t i = 0; i < c->n; i++) s += O[i] * c->dO[i];
    free(O), free(lse);
    return s;
}

static double kern_loss(tcase *c, const refcfg *rc) {
    kern_fwd(c, rc->gdpa, rc->act, rc->window, rc->causal, (float)rc->s, (float)rc->so, NULL);
    double s = 0;
    for (size_t i = 0; i < c->n; i++) s += (double)c->O[i] * c->dO[i];
    return s;
}

static void fd_case(const refcfg *rc) {
    const int lens[] = {3, 0, 1, 4};
    tcase c;
    tcase_init(&c, lens, 4, 2, 4, 77 + rc->act + 2 * rc->causal + 5 * rc->gdpa);
    double *O = malloc(sizeof(double) * c.n), *lse = malloc(sizeof(double) * c.nl);
    double *dQ = malloc(sizeof(double) * c.n), *dK = malloc(sizeof(double) * c.n),
           *dV = malloc(sizeof(double) * c.n);
    ref_run(rc, c.off, c.B, c.H, c.dh, c.Q, c.K, c.V, c.dO, O, lse, dQ, dK, dV);
    memset(c.dQ, 0, sizeof(float) * c.n);
    memset(c.dK, 0, sizeof(float) * c.n);
    memset(c.dV, 0, sizeof(float) * c.n);
    CHECK_OK(kern_fwd(&c, rc->gdpa, rc->act, rc->window, rc->causal, (float)rc->s, (float)rc->so, NULL));
    CHECK_OK(kern_bwd(&c, rc->gdpa, rc->act, rc->window, rc->causal, (float)rc->s, (float)rc->so, NULL));
    float *in[3] = {c.Q, c.K, c.V}, *kg[3] = {c.dQ, c.dK, c.dV};
    double *rg[3] = {dQ, dK, dV};
    double worst_ref = 0, worst_kern = 0;
    for (int t = 0; t < 3; t++)
        for (size_t i = 0; i < c.n; i++) {
            const float x = in[t][i], h = 1.0f / 1024;
            in[t][i] = x + h;
            double lp = ref_loss(&c, rc), kp = kern_loss(&c, rc);
            in[t][i] = x - h;
            double lm = ref_loss(&c, rc), km = kern_loss(&c, rc);
            in[t][i] = x;
            double fr = (lp - lm) / (2.0 * h), fk = (kp - km) / (2.0 * h);
            double er = fabs(fr - rg[t][i]), ek = fabs(fk - kg[t][i]);
            if (er > worst_ref) worst_ref = er;
            if (ek > worst_kern) worst_kern = ek;
        }
    t_checks++;
    if (!(worst_ref < 1e-5 && worst_kern < 2e-3)) {
        t_failures++;
        fprintf(stderr, "  FAIL fd gdpa=%d act=%d w=%d causal=%d: ref %.3g kern %.3g\n", rc->gdpa,
                rc->act, rc->window, rc->causal, worst_ref, worst_kern);
    }
    free(O), free(lse), free(dQ), free(dK), free(dV);
    tcase_free(&c);
}

static void test_finite_diff(void) {
    const int acts[] = {EM_GDPA_IDENTITY, EM_GDPA_RELU2, EM_GDPA_SILU, EM_GDPA_GELU, EM_GDPA_TANH};
    for (int k = 0; k < 5; k++)
        for (int causal = 0; causal < 2; causal++) {
            refcfg rc = {.gdpa = 1, .act = acts[k], .window = -1, .causal = causal, .s = 0.5, .so = 0.25};
            fd_case(&rc);
        }
    const int ws[4] = {0, 1, 2, 8}; /* 8: the tiled path */
    for (int k = 0; k < 4; k++)
        for (int causal = 0; causal < 2; causal++) {
            refcfg rc = {.gdpa = 0, .window = ws[k], .causal = causal, .s = 0.5};
            fd_case(&rc);
        }
}

static void test_threads_bitwise(void) {
    const struct {
        int gdpa, act, window, causal;
    } cfgs[] = {{1, EM_GDPA_GELU, 0, 1}, {1, EM_GDPA_SILU, 0, 0}, {0, 0, 7, 0}, {0, 0, 1, 1}, {0, 0, 300, 0}, {0, 0, 20, 1}};
    for (int q = 0; q < 6; q++) {
        tcase c[4];
        for (int k = 0; k < 4; k++) {
            tcase_init(&c[k], LENS, NLENS, 2, 8, 5 + q);
            grads_init(&c[k]);
            em_pool *pool = NULL;
            if (k > 0) CHECK_OK(em_pool_create(&pool, k));
            CHECK_OK(kern_fwd(&c[k], cfgs[q].gdpa, cfgs[q].act, cfgs[q].window, cfgs[q].causal, 0.f,
                              0.f, pool));
            CHECK_OK(kern_bwd(&c[k], cfgs[q].gdpa, cfgs[q].act, cfgs[q].window, cfgs[q].causal, 0.f,
                              0.f, pool));
            em_pool_free(pool);
        }
        for (int k = 1; k < 4; k++) {
            CHECK(!memcmp(c[0].O, c[k].O, c[0].n * sizeof(float)));
            if (!cfgs[q].gdpa) CHECK(!memcmp(c[0].lse, c[k].lse, c[0].nl * sizeof(float)));
            CHECK(!memcmp(c[0].dQ, c[k].dQ, c[0].n * sizeof(float)));
            CHECK(!memcmp(c[0].dK, c[k].dK, c[0].n * sizeof(float)));
            CHECK(!memcmp(c[0].dV, c[k].dV, c[0].n * sizeof(float)));
        }
        for (int k = 0; k < 4; k++) tcase_free(&c[k]);
    }
}

/* Nullable gradients: skipping some leaves them untouched and the others unchanged. */
static void test_null_grads(void) {
    for (int gdpa = 0; gdpa < 2; gdpa++) {
        tcase a, b;
        tcase_init(&a, LENS, NLENS, 2, 8, 91);
        tcase_init(&b, LENS, NLENS, 2, 8, 91);
        grads_init(&a), grads_init(&b);
        CHECK_OK(kern_fwd(&a, gdpa, EM_GDPA_TANH, 5, 0, 0.f, 0.f, NULL));
        CHECK_OK(kern_fwd(&b, gdpa, EM_GDPA_TANH, 5, 0, 0.f, 0.f, NULL));
        CHECK_OK(kern_bwd(&a, gdpa, EM_GDPA_TANH, 5, 0, 0.f, 0.f, NULL));
        float *dK = b.dK;
        b.dK = NULL;
        CHECK_OK(kern_bwd(&b, gdpa, EM_GDPA_TANH, 5, 0, 0.f, 0.f, NULL));
        b.dK = dK;
        CHECK(!memcmp(a.dQ, b.dQ, a.n * sizeof(float)));
        CHECK(!memcmp(a.dV, b.dV, a.n * sizeof(float)));
        int untouched = 1;
        for (size_t i = 0; i < a.n; i++) untouched &= b.dK[i] == g0(i + 1);
        CHECK(untouched);
        tcase_free(&a), tcase_free(&b);
    }
}

static void test_invalid(void) {
    float x[64] = {0}, l[16];
    int64_t bad[4] = {0, 2, 1, 3};
    em_gdpa_cfg g = {.attn = {.B = 3, .H = 1, .dh = 4, .offsets = bad}, .act = EM_GDPA_SILU};
    em_swa_cfg w = {.attn = {.B = 3, .H = 1, .dh = 4, .offsets = bad}, .window = 2};
    CHECK(em_gdpa_forward(x, x, x, x, &g, NULL) == EM_ERR_INVALID);
    CHECK(strstr(em_last_error(), "decrease") != NULL);
    CHECK(em_gdpa_backward(x, x, x, x, x, x, x, &g, NULL) == EM_ERR_INVALID);
    CHECK(em_swa_forward(x, l, x, x, x, &w, NULL) == EM_ERR_INVALID);
    CHECK(em_swa_backward(x, x, x, x, x, x, x, x, l, &w, NULL) == EM_ERR_INVALID);
    int64_t nz[4] = {1, 2, 3, 4};
    g.attn.offsets = w.attn.offsets = nz;
    CHECK(em_gdpa_check(&g) == EM_ERR_INVALID);
    CHECK(em_swa_check(&w) == EM_ERR_INVALID);
    g.attn.offsets = w.attn.offsets = NULL;
    CHECK(em_gdpa_check(&g) == EM_ERR_INVALID);
    CHECK(em_swa_check(&w) == EM_ERR_INVALID);
    int64_t ok[4] = {0, 1, 1, 3};
    g.attn.offsets = w.attn.offsets = ok;
    CHECK_OK(em_gdpa_check(&g));
    CHECK_OK(em_swa_check(&w));
    g.act = (em_gdpa_act)6;
    CHECK(em_gdpa_forward(x, x, x, x, &g, NULL) == EM_ERR_INVALID);
    CHECK(strstr(em_last_error(), "activation") != NULL);
    g.act = (em_gdpa_act)-1;
    CHECK(em_gdpa_check(&g) == EM_ERR_INVALID);
    g.act = EM_GDPA_RELU, g.scale_out = NAN;
    CHECK(em_gdpa_check(&g) == EM_ERR_INVALID);
    g.scale_out = 0.f, g.attn.H = 0;
    CHECK(em_gdpa_check(&g) == EM_ERR_INVALID);
    w.window = -1;
    CHECK(em_swa_forward(x, l, x, x, x, &w, NULL) == EM_ERR_INVALID);
    CHECK(strstr(em_last_error(), "window") != NULL);
    w.window = 0, w.attn.dh = 0;
    CHECK(em_swa_check(&w) == EM_ERR_INVALID);
    CHECK(em_gdpa_check(NULL) == EM_ERR_INVALID);
    CHECK(em_swa_check(NULL) == EM_ERR_INVALID);
    /* an empty batch, and a batch of empty samples, touch nothing */
    w.attn.dh = 4, w.attn.B = 0, g.attn.H = 1, g.attn.B = 0;
    CHECK_OK(em_gdpa_forward(NULL, NULL, NULL, NULL, &g, NULL));
    CHECK_OK(em_swa_forward(NULL, NULL, NULL, NULL, NULL, &w, NULL));
    int64_t empty[3] = {0, 0, 0};
    g.attn.B = w.attn.B = 2, g.attn.offsets = w.attn.offsets = empty;
    CHECK_OK(em_gdpa_forward(NULL, NULL, NULL, NULL, &g, NULL));
    CHECK_OK(em_gdpa_backward(x, x, x, NULL, NULL, NULL, NULL, &g, NULL));
    CHECK_OK(em_swa_backward(x, x, x, NULL, NULL, NULL, NULL, NULL, NULL, &w, NULL));
}

static void test_nomem(void) {
    /* GDPA, a tiled window (3 allocations per call) and a narrow one (2: no scratch) */
    const int windows[3] = {0, 30, 3}, expect[3] = {6, 6, 4};
    for (int q = 0; q < 3; q++) {
        const int gdpa = q == 0;
        tcase c;
        tcase_init(&c, LENS, NLENS, 2, 8, 9);
        const size_t before = em_mem_in_use();
        int failed = 0;
        for (long k = 0; k < 8; k++) {
            em_mem_fail_after(k);
            em_status sf = kern_fwd(&c, gdpa, EM_GDPA_RELU, windows[q], 1, 0.f, 0.f, NULL);
            em_mem_fail_after(k);
            em_status sb = kern_bwd(&c, gdpa, EM_GDPA_RELU, windows[q], 1, 0.f, 0.f, NULL);
            em_mem_fail_after(-1);
            CHECK(sf == EM_OK || sf == EM_ERR_NOMEM);
            CHECK(sb == EM_OK || sb == EM_ERR_NOMEM);
            failed += (sf == EM_ERR_NOMEM) + (sb == EM_ERR_NOMEM);
            CHECK(em_mem_in_use() == before);
        }
        CHECK(failed == expect[q]); /* each allocation of both calls failed once */
        tcase_free(&c);
    }
}

/* ------------------------------------------------------------------ golden */

/* gdpa: act >= 0; sliding window: act < 0. */
static void golden_case(em_st *st, const char *pfx, int H, int dh, int act, float scale,
                        float scale_out, int window, int causal) {
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
    snprintf(name, sizeof name, "%s_offsets", pfx);
    const em_st_tensor *to = em_st_find(st, name);
    CHECK(to != NULL);
    if (!to) return;
    const int B = (int)to->shape[0] - 1;
    const int64_t *off;
    G(off, "offsets", EM_I64, B + 1);
    const size_t n = (size_t)off[B] * H * dh, nl = (size_t)off[B] * H;
    const float *Q, *K, *V, *dO, *O, *lse = NULL, *dQ, *dK, *dV;
    G(Q, "q", EM_F32, n);
    G(K, "k", EM_F32, n);
    G(V, "v", EM_F32, n);
    G(dO, "do", EM_F32, n);
    G(O, "o", EM_F32, n);
    if (act < 0) G(lse, "lse", EM_F32, nl);
    G(dQ, "dq", EM_F32, n);
    G(dK, "dk", EM_F32, n);
    G(dV, "dv", EM_F32, n);
#undef G
    em_jattn_cfg ac = {.B = B, .H = H, .dh = dh, .offsets = off, .scale = scale, .causal = causal};
    float *o = malloc(sizeof(float) * (n + 1)), *l = malloc(sizeof(float) * (nl + 1));
    float *gq = calloc(n + 1, sizeof(float)), *gk = calloc(n + 1, sizeof(float)),
          *gv = calloc(n + 1, sizeof(float));
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    if (act >= 0) {
        em_gdpa_cfg g = {.attn = ac, .act = act, .scale_out = scale_out};
        CHECK_OK(em_gdpa_forward(o, Q, K, V, &g, pool));
        CHECK_OK(em_gdpa_backward(gq, gk, gv, dO, Q, K, V, &g, pool));
    } else {
        em_swa_cfg w = {.attn = ac, .window = window};
        CHECK_OK(em_swa_forward(o, l, Q, K, V, &w, pool));
        CHECK_OK(em_swa_backward(gq, gk, gv, dO, Q, K, V, o, l, &w, pool));
        CHECK_REL(l, lse, nl, TOL_FWD);
    }
    em_pool_free(pool);
    CHECK_REL(o, O, n, TOL_FWD);
    CHECK_REL(gq, dQ, n, TOL_GRAD);
    CHECK_REL(gk, dK, n, TOL_GRAD);
    CHECK_REL(gv, dV, n, TOL_GRAD);
    free(o), free(l), free(gq), free(gk), free(gv);
}

static void test_golden(void) {
    char path[1024];
    em_st *st = NULL;
    CHECK_OK(em_st_open(&st, em_test_path("golden/kunlun.safetensors", path, sizeof path)));
    if (!st) return;
    /* the cases of tools/make_golden_kunlun.py */
    golden_case(st, "gdpa_silu_causal", 2, 8, EM_GDPA_SILU, 0.f, 0.f, 0, 1);
    golden_case(st, "gdpa_gelu", 2, 8, EM_GDPA_GELU, 0.3f, 0.05f, 0, 0);
    golden_case(st, "swa_w3", 2, 8, -1, 0.f, 0.f, 3, 0);
    golden_case(st, "swa_w3_causal", 2, 8, -1, 0.f, 0.f, 3, 1);
    em_st_close(st);
}

TEST_MAIN({"gdpa_vs_ref", test_gdpa_vs_ref}, {"swa_vs_ref", test_swa_vs_ref},
          {"swa_full_is_jattn", test_swa_full_is_jattn}, {"finite_diff", test_finite_diff},
          {"threads_bitwise", test_threads_bitwise}, {"null_grads", test_null_grads},
          {"invalid", test_invalid}, {"nomem", test_nomem}, {"golden", test_golden})
