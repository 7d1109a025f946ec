/*
 * test_optim_dense.c - the dense optimizers against a float64 re-implementation of the
 * torch.optim update rules (10 steps, with and without weight decay, odd sizes), the
 * torch defaults, names and parsing, argument errors, and bitwise independence of the
 * thread count (block sizes on both sides of the serial threshold).
 */
#include "test.h"

static float *randv(em_rng *r, size_t n, double lo, double hi) {
    float *p = em_malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = (float)(lo + (hi - lo) * em_rng_uniform(r));
    return p;
}

/* Hyperparameters as a torch user writes them: Python doubles. */
typedef struct {
    em_optim_kind kind;
    double lr, wd, eps, b1, b2, init;
} hparams;

static em_optim_cfg cfg_of(const hparams *h) {
    em_optim_cfg c = em_optim_default(h->kind, (float)h->lr);
    c.weight_decay = (float)h->wd, c.eps = (float)h->eps, c.beta1 = (float)h->b1, c.beta2 = (float)h->b2;
    c.init_accum = (float)h->init;
    return c;
}

/* One step of the textbook rule in double (ember/optim.h's table). */
static void ref_step(const hparams *c, double *w, const double *g, double *s1, double *s2, size_t n,
                     int64_t t) {
    const double lr = c->lr, wd = c->wd, eps = c->eps, b1 = c->b1, b2 = c->b2;
    for (size_t i = 0; i < n; i++) {
        double gi = g[i];
        switch (c->kind) {
        case EM_OPT_SGD: w[i] -= lr * (gi + wd * w[i]); break;
        case EM_OPT_ADAGRAD:
            gi += wd * w[i];
            s1[i] += gi * gi;
            w[i] -= lr * gi / (sqrt(s1[i]) + eps);
            break;
        case EM_OPT_ADAM:
        case EM_OPT_ADAMW:
            if (c->kind == EM_OPT_ADAMW) w[i] *= 1 - lr * wd;
            else gi += wd * w[i];
            s1[i] = b1 * s1[i] + (1 - b1) * gi;
            s2[i] = b2 * s2[i] + (1 - b2) * gi * gi;
            w[i] -= lr * (s1[i] / (1 - pow(b1, (double)t))) / (sqrt(s2[i] / (1 - pow(b2, (double)t))) + eps);
            break;
        default: break;
        }
    }
}

/* 10 steps of cfg on n parameters vs the double reference; returns the relative error
 * of the weights (max |diff| / max |w|). */
static double run_vs_ref(hparams h, size_t n, uint64_t seed) {
    const em_optim_cfg c = cfg_of(&h);
    em_rng r;
    em_rng_seed(&r, seed);
    const int per = em_optim_state_per_param(c.kind);
    float *w = randv(&r, n, -1, 1), *g = randv(&r, n, -1, 1), *st = em_calloc(n * 2 + 1, sizeof(float));
    double *wd = em_calloc(n + 1, sizeof(double)), *gd = em_calloc(n + 1, sizeof(double));
    double *s1 = em_calloc(n + 1, sizeof(double)), *s2 = em_calloc(n + 1, sizeof(double));
    for (size_t i = 0; i < n; i++) wd[i] = w[i];
    if (c.kind == EM_OPT_ADAGRAD)
        for (size_t i = 0; i < n; i++) st[i] = c.init_accum, s1[i] = h.init;
    for (int64_t t = 1; t <= 10; t++) {
        /* fresh gradients each step, with a few exact zeros (AdaGrad's eps path) */
        for (size_t i = 0; i < n; i++) {
            g[i] = (float)(em_rng_uniform(&r) * 2 - 1) * (i % 3 == 0 ? 0.01f : 1.f);
            if (i % 17 == 5) g[i] = 0.f;
            gd[i] = g[i];
        }
        CHECK_OK(em_optim_dense_step(&c, w, g, per ? st : NULL, n, t, NULL));
        ref_step(&h, wd, gd, s1, s2, n, t);
    }
    double err = rel_err_fd(w, wd, n, 1e-3);
    /* state too: AdaGrad's sum, Adam's m and v */
    if (per >= 1) {
        double e1 = rel_err_fd(st, s1, n, 1e-6);
        if (e1 > err) err = e1;
    }
    if (per == 2) {
        double e2 = rel_err_fd(st + n, s2, n, 1e-9);
        if (e2 > err) err = e2;
    }
    em_free(w), em_free(g), em_free(st), em_free(wd), em_free(gd), em_free(s1), em_free(s2);
    return err;
}

static void test_defaults_and_names(void) {
    em_optim_cfg c = em_optim_default(EM_OPT_SGD, 0.1f);
    CHECK(c.kind == EM_OPT_SGD && c.lr == 0.1f && c.weight_decay == 0.f);
    c = em_optim_default(EM_OPT_ADAGRAD, 0.01f);
    CHECK(c.eps == 1e-10f && c.init_accum == 0.f && c.weight_decay == 0.f);
    c = em_optim_default(EM_OPT_ROWWISE_ADAGRAD, 0.01f);
    CHECK(c.eps == 1e-10f && c.init_accum == 0.f);
    c = em_optim_default(EM_OPT_ADAM, 1e-3f);
    CHECK(c.beta1 == 0.9f && c.beta2 == 0.999f && c.eps == 1e-8f && c.weight_decay == 0.f && c.lr == 1e-3f);
    c = em_optim_default(EM_OPT_ADAMW, 1e-3f);
    CHECK(c.beta1 == 0.9f && c.beta2 == 0.999f && c.eps == 1e-8f && c.weight_decay == 0.01f);

    CHECK(em_optim_state_per_param(EM_OPT_SGD) == 0 && em_optim_state_per_param(EM_OPT_ADAGRAD) == 1 &&
          em_optim_state_per_param(EM_OPT_ADAM) == 2 && em_optim_state_per_param(EM_OPT_ADAMW) == 2 &&
          em_optim_state_per_param(EM_OPT_ROWWISE_ADAGRAD) == 0);

    const char *want[] = {"sgd", "adagrad", "rowwise_adagrad", "adam", "adamw"};
    for (int k = EM_OPT_SGD; k <= EM_OPT_ADAMW; k++) {
        CHECK(strcmp(em_optim_name((em_optim_kind)k), want[k]) == 0);
        em_optim_kind back = (em_optim_kind)-1;
        CHECK_OK(em_optim_parse(want[k], &back));
        CHECK(back == (em_optim_kind)k);
    }
    CHECK(strcmp(em_optim_name((em_optim_kind)99), "unknown") == 0);
    em_optim_kind out = EM_OPT_ADAM;
    CHECK(em_optim_parse("adamx", &out) == EM_ERR_INVALID && out == EM_OPT_ADAM);
    CHECK(strstr(em_last_error(), "adamx") != NULL);
    CHECK(em_optim_parse("", &out) == EM_ERR_INVALID);
    CHECK(em_optim_parse("SGD", &out) == EM_ERR_INVALID); /* names are exact */
    CHECK(em_optim_parse(NULL, &out) == EM_ERR_INVALID);
}

static void test_bad_args(void) {
    float w[4] = {1, 2, 3, 4}, g[4] = {1, 1, 1, 1}, st[8] = {0};
    em_optim_cfg c = em_optim_default(EM_OPT_ROWWISE_ADAGRAD, 0.1f);
    CHECK(em_optim_dense_step(&c, w, g, st, 4, 1, NULL) == EM_ERR_INVALID);
    c.kind = (em_optim_kind)42;
    CHECK(em_optim_dense_step(&c, w, g, st, 4, 1, NULL) == EM_ERR_INVALID);
    CHECK(em_optim_dense_step(NULL, w, g, st, 4, 1, NULL) == EM_ERR_INVALID);
    c = em_optim_default(EM_OPT_ADAM, 0.1f);
    CHECK(em_optim_dense_step(&c, w, g, st, 4, 0, NULL) == EM_ERR_INVALID); /* t is 1-based */
    CHECK(em_optim_dense_step(&c, w, g, NULL, 4, 1, NULL) == EM_ERR_INVALID);
    c = em_optim_default(EM_OPT_ADAGRAD, 0.1f);
    CHECK(em_optim_dense_step(&c, w, g, NULL, 4, 1, NULL) == EM_ERR_INVALID);
    /* out-of-range hyperparameters, as torch.optim's constructors reject them */
    c = em_optim_default(EM_OPT_ADAM, 0.1f);
    c.beta2 = 1.f;
    CHECK(em_optim_dense_step(&c, w, g, st, 4, 1, NULL) == EM_ERR_INVALID);
    c = em_optim_default(EM_OPT_ADAMW, 0.1f);
    c.beta1 = -0.1f;
    CHECK(em_optim_dense_step(&c, w, g, st, 4, 1, NULL) == EM_ERR_INVALID);
    c = em_optim_default(EM_OPT_SGD, -0.1f);
    CHECK(em_optim_dense_step(&c, w, g, st, 4, 1, NULL) == EM_ERR_INVALID);
    c = em_optim_default(EM_OPT_SGD, NAN);
    CHECK(em_optim_dense_step(&c, w, g, st, 4, 1, NULL) == EM_ERR_INVALID);
    c = em_optim_default(EM_OPT_ADAGRAD, 0.1f);
    c.init_accum = -1.f;
    CHECK(em_optim_dense_step(&c, w, g, st, 4, 1, NULL) == EM_ERR_INVALID);
    c = em_optim_default(EM_OPT_ADAGRAD, 0.1f);
    c.weight_decay = -0.5f;
    CHECK(em_optim_dense_step(&c, w, g, st, 4, 1, NULL) == EM_ERR_INVALID);
    CHECK(w[0] == 1 && w[3] == 4 && st[0] == 0); /* failures change nothing */
    c = em_optim_default(EM_OPT_SGD, 0.5f);
    CHECK_OK(em_optim_dense_step(&c, w, g, NULL, 4, 1, NULL)); /* SGD needs no state */
    CHECK(w[0] == 0.5f && w[3] == 3.5f);
    CHECK_OK(em_optim_dense_step(&c, NULL, NULL, NULL, 0, 1, NULL)); /* empty block */
}

static void test_vs_reference(void) {
    const size_t sizes[] = {1, 7, 8, 61, 1000};
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        size_t n = sizes[si];
        /* torch defaults, then everything non-default (weight decay, AdaGrad's initial
         * accumulator, other betas/eps) */
        const hparams hs[] = {
            {EM_OPT_SGD, 0.05, 0, 0, 0, 0, 0},
            {EM_OPT_SGD, 0.05, 0.1, 0, 0, 0, 0},
            {EM_OPT_ADAGRAD, 0.05, 0, 1e-10, 0, 0, 0},
            {EM_OPT_ADAGRAD, 0.05, 0.1, 1e-10, 0, 0, 0.1},
            {EM_OPT_ADAM, 0.01, 0, 1e-8, 0.9, 0.999, 0},
            {EM_OPT_ADAM, 0.01, 0.1, 1e-6, 0.8, 0.99, 0},
            {EM_OPT_ADAMW, 0.01, 0.01, 1e-8, 0.9, 0.999, 0},
            {EM_OPT_ADAMW, 0.01, 0.5, 1e-8, 0.95, 0.9999, 0},
        };
        for (int k = 0; k < (int)(sizeof hs / sizeof hs[0]); k++) {
            double e = run_vs_ref(hs[k], n, (uint64_t)(k + 1));
            const double tol = hs[k].kind == EM_OPT_SGD ? 1e-6 : 3e-6; /* worst seen: 5e-7 */
            CHECK(e < tol);
            if (!(e < tol)) fprintf(stderr, "    %s n=%zu case %d: rel err %.3g\n", em_optim_name(hs[k].kind), n, k, e);
        }
    }
}

/* A hand-checked first Adam step: m = 0.1 g, v = 0.001 g^2, so the bias-corrected update
 * is lr * g / (|g| + eps), i.e. a step of ~lr against the sign of the gradient. */
static void test_adam_first_step(void) {
    float w[2] = {1.f, -2.f}, g[2] = {0.5f, -4.f}, st[4] = {0};
    em_optim_cfg c = em_optim_default(EM_OPT_ADAM, 0.1f);
    CHECK_OK(em_optim_dense_step(&c, w, g, st, 2, 1, NULL));
    CHECK_NEAR(w[0], 0.9, 1e-6);
    CHECK_NEAR(w[1], -1.9, 1e-6);
    CHECK_NEAR(st[0], 0.05, 1e-8);
    CHECK_NEAR(st[3], 0.016, 1e-8);
}

static void test_thread_independence(void) {
    em_pool *pools[3] = {NULL, NULL, NULL};
    CHECK_OK(em_pool_create(&pools[1], 2));
    CHECK_OK(em_pool_create(&pools[2], 3));
    const size_t sizes[] = {1001, 100003}; /* under and over the serial threshold */
    const em_optim_kind kinds[] = {EM_OPT_SGD, EM_OPT_ADAGRAD, EM_OPT_ADAM, EM_OPT_ADAMW};
    for (size_t si = 0; si < 2; si++)
        for (int k = 0; k < 4; k++) {
            size_t n = sizes[si];
            em_optim_cfg c = em_optim_default(kinds[k], 0.01f);
            c.weight_decay = 0.05f;
            float *w[3], *st[3];
            em_rng r;
            em_rng_seed(&r, 99);
            float *w0 = randv(&r, n, -1, 1), *g = randv(&r, n, -1, 1);
            for (int p = 0; p < 3; p++) {
                w[p] = em_malloc(n * sizeof(float));
                memcpy(w[p], w0, n * sizeof(float));
                st[p] = em_calloc(2 * n, sizeof(float));
                for (int64_t t = 1; t <= 3; t++)
                    CHECK_OK(em_optim_dense_step(&c, w[p], g, st[p], n, t, pools[p]));
            }
            for (int p = 1; p < 3; p++) {
                CHECK(memcmp(w[0], w[p], n * sizeof(float)) == 0);
                CHECK(memcmp(st[0], st[p], 2 * n * sizeof(float)) == 0);
            }
            CHECK(memcmp(w[0], w0, n * sizeof(float)) != 0);
            for (int p = 0; p < 3; p++) em_free(w[p]), em_free(st[p]);
            em_free(w0), em_free(g);
        }
    em_pool_free(pools[1]), em_pool_free(pools[2]);
}

TEST_MAIN({"defaults_and_names", test_defaults_and_names}, {"bad_args", test_bad_args},
          {"vs_reference", test_vs_reference}, {"adam_first_step", test_adam_first_step},
          {"thread_independence", test_thread_independence})
