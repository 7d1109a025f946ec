/*
 * test_nn_jattn.c - Jagged Flash Attention (ember/jattn.h) against references.
 *
 *   - a padded-free dense float64 reference written here (full L x L scores per sample
 *     and head, softmax, matmuls, textbook backward) for O, lse, dQ, dK, dV, with
 *     lengths 0, 1, 5, 64, 65, 200 mixed in one batch, H = 2, dh = 8 and 32, causal
 *     and not, and for the target (one query per sample) variant;
 *   - central finite differences of the float64 reference (validates the analytic
 *     backward formulas) and of the float kernel itself on tiny cases;
 *   - bitwise equality for pools of 1, 2, 3 threads and a NULL pool;
 *   - bad offsets / dims -> EM_ERR_INVALID; allocation failures -> EM_ERR_NOMEM with
 *     nothing leaked;
 *   - tests/golden/jattn.safetensors from tools/make_golden_jattn.py (PyTorch autograd).
 * Tolerances: 1e-5 relative (to the largest reference magnitude) forward and lse,
 * 1e-4 gradients. Backward is checked as an accumulation: gradients start non-zero.
 */
#include "test.h"
#include "ember/jattn.h"

#define TOL_FWD 1e-5
#define TOL_GRAD 1e-4

/* ------------------------------------------------------- float64 reference */

/* Self (target = 0) or target attention in double. Q is (total, H*dh) for self and
 * (B, H*dh) for target. Outputs are overwritten; dQ/dK/dV may be NULL (no backward). */
static void ref_attn(int target, const int64_t *off, int B, int H, int dh, double scale, int causal,
                     const float *Q, const float *K, const float *V, const float *dO, double *O,
                     double *lse, double *dQ, double *dK, double *dV) {
    const int ld = H * dh;
    const int64_t total = off[B];
    const int64_t nq = target ? B : total;
    for (int64_t i = 0; i < nq * ld; i++) {
        O[i] = 0;
        if (dQ) dQ[i] = 0;
    }
    if (dK)
        for (int64_t i = 0; i < total * ld; i++) dK[i] = dV[i] = 0;
    for (int b = 0; b < B; b++) {
        const int L = (int)(off[b + 1] - off[b]), M = target ? 1 : L;
        if (L == 0) {
            if (target)
                for (int h = 0; h < H; h++) lse[(size_t)b * H + h] = -INFINITY;
            continue;
        }
        double *P = malloc(sizeof(double) * M * L), *dP = malloc(sizeof(double) * M * L);
        for (int h = 0; h < H; h++) {
            const size_t col = (size_t)h * dh;
#define QR(i) ((target ? (size_t)b : (size_t)(off[b] + (i))) * ld + col)
#define KR(j) ((size_t)(off[b] + (j)) * ld + col)
            for (int i = 0; i < M; i++) {
                double mx = -INFINITY;
                for (int j = 0; j < L; j++) {
                    double s = -INFINITY;
                    if (!(causal && !target && j > i)) {
                        s = 0;
                        for (int d = 0; d < dh; d++) s += (double)Q[QR(i) + d] * K[KR(j) + d];
                        s *= scale;
                    }
                    P[(size_t)i * L + j] = s;
                    if (s > mx) mx = s;
                }
                double sum = 0;
                for (int j = 0; j < L; j++) sum += exp(P[(size_t)i * L + j] - mx);
                for (int j = 0; j < L; j++) P[(size_t)i * L + j] = exp(P[(size_t)i * L + j] - mx) / sum;
                lse[(target ? (size_t)b : (size_t)(off[b] + i)) * H + h] = mx + log(sum);
                for (int j = 0; j < L; j++)
                    for (int d = 0; d < dh; d++) O[QR(i) + d] += P[(size_t)i * L + j] * V[KR(j) + d];
            }
            if (!dQ) continue;
            for (int i = 0; i < M; i++) {
                double Di = 0;
                for (int j = 0; j < L; j++) {
                    double g = 0;
                    for (int d = 0; d < dh; d++) g += (double)dO[QR(i) + d] * V[KR(j) + d];
                    dP[(size_t)i * L + j] = g;
                    Di += g * P[(size_t)i * L + j];
                }
                for (int j = 0; j < L; j++) {
                    const double p = P[(size_t)i * L + j];
                    const double ds = scale * p * (dP[(size_t)i * L + j] - Di);
                    for (int d = 0; d < dh; d++) {
                        dV[KR(j) + d] += p * dO[QR(i) + d];
                        dQ[QR(i) + d] += ds * K[KR(j) + d];
                        dK[KR(j) + d] += ds * Q[QR(i) + d];
                    }
                }
            }
#undef QR
#undef KR
        }
        free(P);
        free(dP);
    }
}

/* ------------------------------------------------------------- test cases */

static void fill(float *x, size_t n, em_rng *r, double s) {
    for (size_t i = 0; i < n; i++) x[i] = (float)(s * em_rng_normal(r));
}

typedef struct {
    int B, H, dh, causal, target;
    int64_t off[16];
    size_t nq, nk; /* elements of Q (and O, dO, dQ) and of K (V, dK, dV) */
    float *Q, *K, *V, *dO, *O, *lse, *dQ, *dK, *dV;
} tcase;

static void tcase_init(tcase *c, const int *lens, int B, int H, int dh, int causal, int target,
                       uint64_t seed) {
    memset(c, 0, sizeof *c);
    c->B = B, c->H = H, c->dh = dh, c->causal = causal, c->target = target;
    for (int b = 0; b < B; b++) c->off[b + 1] = c->off[b] + lens[b];
    const size_t ld = (size_t)H * dh, total = (size_t)c->off[B];
    c->nq = (target ? (size_t)B : total) * ld;
    c->nk = total * ld;
    c->Q = malloc(sizeof(float) * (c->nq + 1));
    c->O = malloc(sizeof(float) * (c->nq + 1));
    c->dO = malloc(sizeof(float) * (c->nq + 1));
    c->dQ = malloc(sizeof(float) * (c->nq + 1));
    c->K = malloc(sizeof(float) * (c->nk + 1));
    c->V = malloc(sizeof(float) * (c->nk + 1));
    c->dK = malloc(sizeof(float) * (c->nk + 1));
    c->dV = malloc(sizeof(float) * (c->nk + 1));
    c->lse = malloc(sizeof(float) * (c->nq / ld * H + 1));
    em_rng r;
    em_rng_seed(&r, seed);
    fill(c->Q, c->nq, &r, 1.0);
    fill(c->K, c->nk, &r, 1.0);
    fill(c->V, c->nk, &r, 1.0);
    fill(c->dO, c->nq, &r, 1.0);
}

static void tcase_free(tcase *c) {
    free(c->Q), free(c->K), free(c->V), free(c->dO), free(c->O), free(c->lse);
    free(c->dQ), free(c->dK), free(c->dV);
}

static em_jattn_cfg tcase_cfg(const tcase *c, float scale) {
    return (em_jattn_cfg){.B = c->B, .H = c->H, .dh = c->dh, .offsets = c->off, .scale = scale,
                          .causal = c->causal};
}

static em_status run_fwd(tcase *c, const em_jattn_cfg *cfg, em_pool *pool) {
    return c->target ? em_jattn_target_forward(c->O, c->lse, c->Q, c->K, c->V, cfg, pool)
                     : em_jattn_forward(c->O, c->lse, c->Q, c->K, c->V, cfg, pool);
}
static em_status run_bwd(tcase *c, const em_jattn_cfg *cfg, em_pool *pool) {
    return c->target ? em_jattn_target_backward(c->dQ, c->dK, c->dV, c->dO, c->Q, c->K, c->V, c->O,
                                                c->lse, cfg, pool)
                     : em_jattn_backward(c->dQ, c->dK, c->dV, c->dO, c->Q, c->K, c->V, c->O, c->lse,
                                         cfg, pool);
}

/* Gradients start at a fixed non-zero pattern g0(i) so that accumulation is checked. */
static float g0(size_t i) { return (float)((int)(i % 7) - 3) * 0.25f; }

static void check_case(const int *lens, int B, int H, int dh, int causal, int target, float scale,
                       em_pool *pool) {
    tcase c;
    tcase_init(&c, lens, B, H, dh, causal, target, 1000 + 31 * dh + 7 * causal + target);
    em_jattn_cfg cfg = tcase_cfg(&c, scale);
    const double sc = scale > 0 ? scale : 1.0 / sqrt((double)dh);
    const size_t nl = c.nq / ((size_t)H * dh) * H;
    double *O = malloc(sizeof(double) * (c.nq + 1)), *lse = malloc(sizeof(double) * (nl + 1));
    double *dQ = malloc(sizeof(double) * (c.nq + 1)), *dK = malloc(sizeof(double) * (c.nk + 1)),
           *dV = malloc(sizeof(double) * (c.nk + 1));
    ref_attn(target, c.off, B, H, dh, sc, causal, c.Q, c.K, c.V, c.dO, O, lse, dQ, dK, dV);
    for (size_t i = 0; i < c.nq; i++) dQ[i] += g0(i), c.dQ[i] = g0(i);
    for (size_t i = 0; i < c.nk; i++) dK[i] += g0(i + 1), c.dK[i] = g0(i + 1);
    for (size_t i = 0; i < c.nk; i++) dV[i] += g0(i + 2), c.dV[i] = g0(i + 2);
    CHECK_OK(run_fwd(&c, &cfg, pool));
    CHECK_OK(run_bwd(&c, &cfg, pool));
    double eo = rel_err_fd(c.O, O, c.nq, 1e-6), el = 0, eq = rel_err_fd(c.dQ, dQ, c.nq, 1e-6),
           ek = rel_err_fd(c.dK, dK, c.nk, 1e-6), ev = rel_err_fd(c.dV, dV, c.nk, 1e-6);
    /* lse: -inf (empty target history) must match exactly, the rest relatively */
    double lmax = 1e-6;
    for (size_t i = 0; i < nl; i++)
        if (isfinite(lse[i]) && fabs(lse[i]) > lmax) lmax = fabs(lse[i]);
    for (size_t i = 0; i < nl; i++) {
        if (!isfinite(lse[i])) {
            if (c.lse[i] != (float)lse[i]) el = INFINITY;
        } else if (fabs(c.lse[i] - lse[i]) / lmax > el) el = fabs(c.lse[i] - lse[i]) / lmax;
    }
    t_checks++;
    if (!(eo <= TOL_FWD && el <= TOL_FWD && eq <= TOL_GRAD && ek <= TOL_GRAD && ev <= TOL_GRAD)) {
        t_failures++;
        fprintf(stderr, "  FAIL %s dh=%d causal=%d scale=%g: O %.3g lse %.3g dQ %.3g dK %.3g dV %.3g\n",
                target ? "target" : "self", dh, causal, scale, eo, el, eq, ek, ev);
    }
    free(O), free(lse), free(dQ), free(dK), free(dV);
    tcase_free(&c);
}

static const int LENS[] = {5, 0, 200, 1, 65, 64, 257};
#define NLENS 7

static void test_self_vs_ref(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    for (int dh = 8; dh <= 32; dh += 24)
        for (int causal = 0; causal < 2; causal++)
            check_case(LENS, NLENS, 2, dh, causal, 0, 0.f, pool);
    check_case(LENS, NLENS, 2, 8, 1, 0, 0.7f, pool); /* explicit scale */
    em_pool_free(pool);
}

static void test_target_vs_ref(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    check_case(LENS, NLENS, 2, 8, 0, 1, 0.f, pool);
    check_case(LENS, NLENS, 2, 32, 0, 1, 0.f, NULL);
    check_case(LENS, NLENS, 2, 32, 0, 1, 0.4f, pool);
    em_pool_free(pool);
}

/* Finite differences of loss = sum(dO * O) (double) in direction of each input element. */
static double ref_loss(const tcase *c, double sc) {
    const size_t nl = c->nq / ((size_t)c->H * c->dh) * c->H;
    double *O = malloc(sizeof(double) * (c->nq + 1)), *lse = malloc(sizeof(double) * (nl + 1));
    ref_attn(c->target, c->off, c->B, c->H, c->dh, sc, c->causal, c->Q, c->K, c->V, NULL, O, lse,
             NULL, NULL, NULL);
    double s = 0;
    for (size_t i = 0; i < c->nq; i++) s += O[i] * c->dO[i];
    free(O), free(lse);
    return s;
}

static double kern_loss(tcase *c, const em_jattn_cfg *cfg) {
    run_fwd(c, cfg, NULL);
    double s = 0;
    for (size_t i = 0; i < c->nq; i++) s += (double)c->O[i] * c->dO[i];
    return s;
}

static void fd_case(int target, int causal) {
    const int lens[] = {3, 0, 1, 4};
    tcase c;
    tcase_init(&c, lens, 4, 2, 4, causal, target, 77 + target + 2 * causal);
    em_jattn_cfg cfg = tcase_cfg(&c, 0.f);
    const double sc = 0.5;
    const size_t nl = c.nq / 8 * 2;
    double *O = malloc(sizeof(double) * c.nq), *lse = malloc(sizeof(double) * nl);
    double *dQ = malloc(sizeof(double) * c.nq), *dK = malloc(sizeof(double) * c.nk),
           *dV = malloc(sizeof(double) * c.nk);
    ref_attn(target, c.off, c.B, c.H, c.dh, sc, causal, c.Q, c.K, c.V, c.dO, O, lse, dQ, dK, dV);
    memset(c.dQ, 0, sizeof(float) * c.nq);
    memset(c.dK, 0, sizeof(float) * c.nk);
    memset(c.dV, 0, sizeof(float) * c.nk);
    CHECK_OK(run_fwd(&c, &cfg, NULL));
    CHECK_OK(run_bwd(&c, &cfg, NULL));
    float *in[3] = {c.Q, c.K, c.V}, *kg[3] = {c.dQ, c.dK, c.dV};
    double *rg[3] = {dQ, dK, dV};
    size_t n[3] = {c.nq, c.nk, c.nk};
    double worst_ref = 0, worst_kern = 0;
    for (int t = 0; t < 3; t++)
        for (size_t i = 0; i < n[t]; i++) {
            const float x = in[t][i];
            /* reference: inputs are float, so perturb by a float-representable step */
            const float h = 1.0f / 1024;
            in[t][i] = x + h;
            double lp = ref_loss(&c, sc), kp = kern_loss(&c, &cfg);
            in[t][i] = x - h;
            double lm = ref_loss(&c, sc), km = kern_loss(&c, &cfg);
            in[t][i] = x;
            double fr = (lp - lm) / (2.0 * h), fk = (kp - km) / (2.0 * h);
            double er = fabs(fr - rg[t][i]), ek = fabs(fk - kg[t][i]);
            if (er > worst_ref) worst_ref = er;
            if (ek > worst_kern) worst_kern = ek;
        }
    CHECK(worst_ref < 1e-5); /* O(h^2) truncation with h ~ 1e-3 */
    CHECK(worst_kern < 2e-3); /* float forward: rounding / h */
    free(O), free(lse), free(dQ), free(dK), free(dV);
    tcase_free(&c);
}

static void test_finite_diff(void) {
    fd_case(0, 0);
    fd_case(0, 1);
    fd_case(1, 0);
}

static void test_threads_bitwise(void) {
    for (int target = 0; target < 2; target++)
        for (int causal = 0; causal < 2 - target; causal++) {
            tcase c[4];
            for (int k = 0; k < 4; k++) {
                tcase_init(&c[k], LENS, NLENS, 2, 8, causal, target, 5 + causal);
                for (size_t i = 0; i < c[k].nq; i++) c[k].dQ[i] = g0(i);
                for (size_t i = 0; i < c[k].nk; i++) c[k].dK[i] = c[k].dV[i] = g0(i);
                em_pool *pool = NULL;
                if (k > 0) CHECK_OK(em_pool_create(&pool, k));
                em_jattn_cfg cfg = tcase_cfg(&c[k], 0.f);
                CHECK_OK(run_fwd(&c[k], &cfg, pool));
                CHECK_OK(run_bwd(&c[k], &cfg, pool));
                em_pool_free(pool);
            }
            const size_t nl = c[0].nq / 16 * 2;
            for (int k = 1; k < 4; k++) {
                CHECK(!memcmp(c[0].O, c[k].O, c[0].nq * sizeof(float)));
                CHECK(!memcmp(c[0].lse, c[k].lse, nl * sizeof(float)));
                CHECK(!memcmp(c[0].dQ, c[k].dQ, c[0].nq * sizeof(float)));
                CHECK(!memcmp(c[0].dK, c[k].dK, c[0].nk * sizeof(float)));
                CHECK(!memcmp(c[0].dV, c[k].dV, c[0].nk * sizeof(float)));
            }
            for (int k = 0; k < 4; k++) tcase_free(&c[k]);
        }
}

static void test_invalid(void) {
    float x[64] = {0}, l[8];
    int64_t off[4] = {0, 2, 1, 3};
    em_jattn_cfg cfg = {.B = 3, .H = 1, .dh = 4, .offsets = off};
    CHECK(em_jattn_forward(x, l, x, x, x, &cfg, NULL) == EM_ERR_INVALID);
    CHECK(strstr(em_last_error(), "decrease") != NULL);
    CHECK(em_jattn_backward(x, x, x, x, x, x, x, x, l, &cfg, NULL) == EM_ERR_INVALID);
    CHECK(em_jattn_target_forward(x, l, x, x, x, &cfg, NULL) == EM_ERR_INVALID);
    CHECK(em_jattn_target_backward(x, x, x, x, x, x, x, x, l, &cfg, NULL) == EM_ERR_INVALID);
    int64_t off2[4] = {1, 2, 3, 4};
    cfg.offsets = off2;
    CHECK(em_jattn_check(&cfg) == EM_ERR_INVALID);
    cfg.offsets = NULL;
    CHECK(em_jattn_check(&cfg) == EM_ERR_INVALID);
    int64_t ok[4] = {0, 1, 1, 3};
    cfg.offsets = ok;
    CHECK_OK(em_jattn_check(&cfg));
    cfg.H = 0;
    CHECK(em_jattn_check(&cfg) == EM_ERR_INVALID);
    cfg.H = 1, cfg.dh = -1;
    CHECK(em_jattn_check(&cfg) == EM_ERR_INVALID);
    cfg.dh = 4, cfg.B = -1;
    CHECK(em_jattn_check(&cfg) == EM_ERR_INVALID);
    CHECK(em_jattn_check(NULL) == EM_ERR_INVALID);
    cfg.B = 0; /* an empty batch is fine and touches nothing */
    CHECK_OK(em_jattn_forward(NULL, NULL, NULL, NULL, NULL, &cfg, NULL));
    CHECK_OK(em_jattn_backward(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, &cfg, NULL));
}

static void test_nomem(void) {
    tcase c;
    tcase_init(&c, LENS, NLENS, 2, 8, 1, 0, 9);
    em_jattn_cfg cfg = tcase_cfg(&c, 0.f);
    const size_t before = em_mem_in_use();
    int failed = 0;
    for (long k = 0; k < 8; k++) {
        em_mem_fail_after(k);
        em_status sf = em_jattn_forward(c.O, c.lse, c.Q, c.K, c.V, &cfg, NULL);
        em_mem_fail_after(k);
        em_status sb = em_jattn_backward(c.dQ, c.dK, c.dV, c.dO, c.Q, c.K, c.V, c.O, c.lse, &cfg, NULL);
        em_mem_fail_after(-1);
        CHECK(sf == EM_OK || sf == EM_ERR_NOMEM);
        CHECK(sb == EM_OK || sb == EM_ERR_NOMEM);
        failed += (sf == EM_ERR_NOMEM) + (sb == EM_ERR_NOMEM);
        CHECK(em_mem_in_use() == before);
    }
    CHECK(failed >= 4); /* both allocations of both calls were exercised */
    tcase_free(&c);
}

/* ------------------------------------------------------------------ golden */

static void golden_case(em_st *st, const char *pfx, int target, int H, int dh, int causal,
                        float scale) {
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
    const size_t ld = (size_t)H * dh, nk = (size_t)off[B] * ld, nq = (target ? (size_t)B : (size_t)off[B]) * ld;
    const size_t nl = nq / ld * H;
    const float *Q, *K, *V, *dO, *O, *lse, *dQ, *dK, *dV;
    G(Q, "q", EM_F32, nq);
    G(K, "k", EM_F32, nk);
    G(V, "v", EM_F32, nk);
    G(dO, "do", EM_F32, nq);
    G(O, "o", EM_F32, nq);
    G(lse, "lse", EM_F32, nl);
    G(dQ, "dq", EM_F32, nq);
    G(dK, "dk", EM_F32, nk);
    G(dV, "dv", EM_F32, nk);
#undef G
    em_jattn_cfg cfg = {.B = B, .H = H, .dh = dh, .offsets = off, .scale = scale, .causal = causal};
    float *o = malloc(sizeof(float) * (nq + 1)), *l = malloc(sizeof(float) * (nl + 1));
    float *gq = calloc(nq + 1, sizeof(float)), *gk = calloc(nk + 1, sizeof(float)),
          *gv = calloc(nk + 1, sizeof(float));
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    if (target) {
        CHECK_OK(em_jattn_target_forward(o, l, Q, K, V, &cfg, pool));
        CHECK_OK(em_jattn_target_backward(gq, gk, gv, dO, Q, K, V, o, l, &cfg, pool));
    } else {
        CHECK_OK(em_jattn_forward(o, l, Q, K, V, &cfg, pool));
        CHECK_OK(em_jattn_backward(gq, gk, gv, dO, Q, K, V, o, l, &cfg, pool));
    }
    em_pool_free(pool);
    /* torch writes -inf lse for empty histories too; compare finite ones relatively */
    float *lf = malloc(sizeof(float) * (nl + 1)), *lr = malloc(sizeof(float) * (nl + 1));
    for (size_t i = 0; i < nl; i++) {
        CHECK(isfinite(lse[i]) == isfinite(l[i]));
        lf[i] = isfinite(l[i]) ? l[i] : 0.f;
        lr[i] = isfinite(lse[i]) ? lse[i] : 0.f;
    }
    CHECK_REL(o, O, nq, TOL_FWD);
    CHECK_REL(lf, lr, nl, TOL_FWD);
    CHECK_REL(gq, dQ, nq, TOL_GRAD);
    CHECK_REL(gk, dK, nk, TOL_GRAD);
    CHECK_REL(gv, dV, nk, TOL_GRAD);
    free(o), free(l), free(gq), free(gk), free(gv), free(lf), free(lr);
}

static void test_golden(void) {
    char path[1024];
    em_st *st = NULL;
    CHECK_OK(em_st_open(&st, em_test_path("golden/jattn.safetensors", path, sizeof path)));
    if (!st) return;
    /* the cases of tools/make_golden_jattn.py */
    golden_case(st, "self_d8_causal", 0, 2, 8, 1, 0.3f);
    golden_case(st, "self_d32", 0, 2, 32, 0, 0.f);
    golden_case(st, "target_d8", 1, 2, 8, 0, 0.f);
    em_st_close(st);
}

TEST_MAIN({"self_vs_ref", test_self_vs_ref}, {"target_vs_ref", test_target_vs_ref},
          {"finite_diff", test_finite_diff}, {"threads_bitwise", test_threads_bitwise},
          {"invalid", test_invalid}, {"nomem", test_nomem}, {"golden", test_golden})
