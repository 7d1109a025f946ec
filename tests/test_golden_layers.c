/*
 * test_golden_layers.c - ember's layers, embedding bags and optimizers against PyTorch.
 *
 * The expected values come from tests/golden/layers.safetensors and
 * tests/golden/optim.safetensors, written by tools/make_golden.py with PyTorch's own
 * kernels and autograd (float32). The test needs no PyTorch.
 *
 * Tolerances are relative to the largest magnitude of the reference tensor
 * (rel_err_f in test.h), chosen per op from where the rounding differs:
 *   - ReLU: exact (0): a max and a mask multiply have one correct answer;
 *   - single-pass forwards (linear, sigmoid, interaction, pooling, BCE): 1e-5, a few
 *     float ulps for the differently ordered sums of length <= 8 (BLAS blocking,
 *     exp implementations);
 *   - gradients: 1e-4: reductions over the batch in another order, and the embedding
 *     gradient is recovered as a weight delta (w - (w - g)), which loses up to one ulp
 *     of |w| relative to |g|;
 *   - 10-step optimizer trajectories: 1e-4: the rounding of each step feeds the next,
 *     and AdaGrad/Adam divide by sqrt of small accumulators.
 * Each layer also runs with a pool of 3 threads and must match the single-threaded
 * result bitwise (ember's determinism contract).
 *
 * ember never materialises an embedding table's gradient (the optimizer is fused into
 * the backward), so the table gradient is checked as the weight change of an SGD step
 * with lr = 1 on a copy of the table.
 */
#include "test.h"

#define TOL_FWD 1e-5
#define TOL_GRAD 1e-4
#define TOL_TRAJ 1e-4

static const char *golden_path(const char *name, char *buf, size_t cap) {
    char rel[256];
    snprintf(rel, sizeof rel, "golden/%s", name);
    return em_test_path(rel, buf, cap);
}

static em_st *open_golden(const char *name) {
    char path[1024];
    em_st *st = NULL;
    em_status s = em_st_open(&st, golden_path(name, path, sizeof path));
    t_checks++;
    if (s != EM_OK) {
        t_failures++;
        fprintf(stderr, "  FAIL cannot open %s: %s (%s)\n", path, em_status_str(s), em_last_error());
        return NULL;
    }
    return st;
}

/* A golden tensor of the given dtype and element count; a failed lookup counts as a
 * failure and makes the case bail out (goto done) rather than read garbage. */
#define GET(var, st, name, dtype, n)                                                      \
    do {                                                                                  \
        var = em_st_expect((st), (name), (dtype), (int64_t)(n));                          \
        t_checks++;                                                                       \
        if (!var) {                                                                       \
            t_failures++;                                                                 \
            fprintf(stderr, "  FAIL %s:%d: golden tensor %s: %s\n", __FILE__, __LINE__,   \
                    (name), em_last_error());                                             \
            goto done;                                                                    \
        }                                                                                 \
    } while (0)

static float *zeros(size_t n) { return em_calloc(n ? n : 1, sizeof(float)); }

static float *copy_of(const float *src, size_t n) {
    float *p = em_malloc((n ? n : 1) * sizeof(float));
    if (p && n) memcpy(p, src, n * sizeof(float));
    return p;
}

static int same_bits(const float *a, const float *b, size_t n) {
    return memcmp(a, b, n * sizeof(float)) == 0;
}

static em_pool *make_pool(int nth) {
    em_pool *pool = NULL;
    CHECK_OK(em_pool_create(&pool, nth));
    return pool;
}

/* ------------------------------------------------------------------ linear */

static void test_linear(void) {
    enum { B = 5, I = 7, O = 3 };
    em_st *st = open_golden("layers.safetensors");
    em_pool *pool = make_pool(3);
    float *y = zeros(B * O), *dx = zeros(B * I), *dW = zeros(O * I), *db = zeros(O);
    float *y3 = zeros(B * O), *dx3 = zeros(B * I), *dW3 = zeros(O * I), *db3 = zeros(O);
    const float *x, *W, *b, *ry, *dy, *rdx, *rdW, *rdb;
    if (!st) goto done;
    GET(x, st, "linear.x", EM_F32, B * I);
    GET(W, st, "linear.W", EM_F32, O * I);
    GET(b, st, "linear.b", EM_F32, O);
    GET(ry, st, "linear.y", EM_F32, B * O);
    GET(dy, st, "linear.dy", EM_F32, B * O);
    GET(rdx, st, "linear.dx", EM_F32, B * I);
    GET(rdW, st, "linear.dW", EM_F32, O * I);
    GET(rdb, st, "linear.db", EM_F32, O);

    em_linear_forward(y, x, W, b, B, I, O, NULL);
    CHECK_REL(y, ry, B * O, TOL_FWD);
    em_linear_backward(dx, dW, db, dy, x, W, B, I, O, NULL);
    CHECK_REL(dx, rdx, B * I, TOL_GRAD);
    CHECK_REL(dW, rdW, O * I, TOL_GRAD);
    CHECK_REL(db, rdb, O, TOL_GRAD);

    /* backward accumulates: a second call doubles every gradient */
    float *dx2 = copy_of(dx, B * I), *dW2 = copy_of(dW, O * I), *db2 = copy_of(db, O);
    em_linear_backward(dx2, dW2, db2, dy, x, W, B, I, O, NULL);
    for (int i = 0; i < B * I; i++) dx2[i] *= 0.5f;
    for (int i = 0; i < O * I; i++) dW2[i] *= 0.5f;
    for (int i = 0; i < O; i++) db2[i] *= 0.5f;
    CHECK_REL(dx2, rdx, B * I, TOL_GRAD);
    CHECK_REL(dW2, rdW, O * I, TOL_GRAD);
    CHECK_REL(db2, rdb, O, TOL_GRAD);
    em_free(dx2), em_free(dW2), em_free(db2);

    /* nullable din/db, and the same bits with 3 threads */
    float *dWonly = zeros(O * I);
    em_linear_backward(NULL, dWonly, NULL, dy, x, W, B, I, O, NULL);
    CHECK(same_bits(dWonly, dW, O * I));
    em_free(dWonly);
    em_linear_forward(y3, x, W, b, B, I, O, pool);
    em_linear_backward(dx3, dW3, db3, dy, x, W, B, I, O, pool);
    CHECK(same_bits(y3, y, B * O));
    CHECK(same_bits(dx3, dx, B * I) && same_bits(dW3, dW, O * I) && same_bits(db3, db, O));
done:
    em_free(y), em_free(dx), em_free(dW), em_free(db);
    em_free(y3), em_free(dx3), em_free(dW3), em_free(db3);
    em_pool_free(pool);
    em_st_close(st);
}

/* ------------------------------------------------------ relu and sigmoid */

static void test_relu(void) {
    enum { N = 24 };
    em_st *st = open_golden("layers.safetensors");
    float *y = zeros(N), *dx = zeros(N), *inplace = zeros(N);
    const float *x, *ry, *dy, *rdx;
    if (!st) goto done;
    GET(x, st, "relu.x", EM_F32, N);
    GET(ry, st, "relu.y", EM_F32, N);
    GET(dy, st, "relu.dy", EM_F32, N);
    GET(rdx, st, "relu.dx", EM_F32, N);
    em_relu_forward(y, x, N);
    CHECK_REL(y, ry, N, 0.0);
    memcpy(inplace, x, N * sizeof(float));
    em_relu_forward(inplace, inplace, N);
    CHECK(same_bits(inplace, y, N));
    em_relu_backward(dx, dy, y, N);
    CHECK_REL(dx, rdx, N, 0.0);
done:
    em_free(y), em_free(dx), em_free(inplace);
    em_st_close(st);
}

static void test_sigmoid(void) {
    enum { N = 24 };
    em_st *st = open_golden("layers.safetensors");
    float *y = zeros(N), *dx = zeros(N);
    const float *x, *ry, *dy, *rdx;
    if (!st) goto done;
    GET(x, st, "sigmoid.x", EM_F32, N);
    GET(ry, st, "sigmoid.y", EM_F32, N);
    GET(dy, st, "sigmoid.dy", EM_F32, N);
    GET(rdx, st, "sigmoid.dx", EM_F32, N);
    em_sigmoid_forward(y, x, N);
    CHECK_REL(y, ry, N, TOL_FWD);
    /* saturated inputs (|x| = 30, 90) stay finite and inside [0, 1] */
    for (int i = 0; i < N; i++) CHECK(y[i] >= 0.0f && y[i] <= 1.0f);
    em_sigmoid_backward(dx, dy, y, N);
    CHECK_REL(dx, rdx, N, TOL_GRAD);
    for (int i = 0; i < N; i++) CHECK(isfinite(dx[i]));
done:
    em_free(y), em_free(dx);
    em_st_close(st);
}

/* ------------------------------------------------------- dot interaction */

static void test_interact(void) {
    enum { B = 3, F = 4, D = 5 };
    const int W = em_dot_interact_out_dim(F, D);
    em_st *st = open_golden("layers.safetensors");
    em_pool *pool = make_pool(3);
    float *out = zeros((size_t)B * W), *dx = zeros(B * D), *demb = zeros(B * F * D);
    float *out3 = zeros((size_t)B * W), *dx3 = zeros(B * D), *demb3 = zeros(B * F * D);
    const float *x, *emb, *rout, *dout, *rdx, *rdemb;
    CHECK(W == 15);
    if (!st) goto done;
    GET(x, st, "interact.x", EM_F32, B * D);
    GET(emb, st, "interact.emb", EM_F32, B * F * D);
    GET(rout, st, "interact.out", EM_F32, B * W);
    GET(dout, st, "interact.dout", EM_F32, B * W);
    GET(rdx, st, "interact.dx", EM_F32, B * D);
    GET(rdemb, st, "interact.demb", EM_F32, B * F * D);
    em_dot_interact_forward(out, x, emb, B, F, D, NULL);
    CHECK_REL(out, rout, (size_t)B * W, TOL_FWD);
    em_dot_interact_backward(dx, demb, dout, x, emb, B, F, D, NULL);
    CHECK_REL(dx, rdx, B * D, TOL_GRAD);
    CHECK_REL(demb, rdemb, B * F * D, TOL_GRAD);
    em_dot_interact_forward(out3, x, emb, B, F, D, pool);
    em_dot_interact_backward(dx3, demb3, dout, x, emb, B, F, D, pool);
    CHECK(same_bits(out3, out, (size_t)B * W));
    CHECK(same_bits(dx3, dx, B * D) && same_bits(demb3, demb, B * F * D));
done:
    em_free(out), em_free(dx), em_free(demb);
    em_free(out3), em_free(dx3), em_free(demb3);
    em_pool_free(pool);
    em_st_close(st);
}

/* ------------------------------------------------------------------- BCE */

static void test_bce(void) {
    enum { N = 16 };
    em_st *st = open_golden("layers.safetensors");
    float *dz = zeros(N);
    const float *z, *y, *rloss, *rdz;
    if (!st) goto done;
    GET(z, st, "bce.logits", EM_F32, N);
    GET(y, st, "bce.labels", EM_F32, N);
    GET(rloss, st, "bce.loss", EM_F32, 1);
    GET(rdz, st, "bce.dlogit", EM_F32, N);
    double loss = em_bce_logits_forward(z, y, N);
    CHECK_NEAR(loss, rloss[0], TOL_FWD * fabs(rloss[0]));
    em_bce_logits_backward(dz, z, y, N, 1.0f / N);
    CHECK_REL(dz, rdz, N, TOL_GRAD);
done:
    em_free(dz);
    em_st_close(st);
}

/* ---------------------------------------------------------- embedding bags */

enum { EB_T = 3, EB_B = 4, EB_D = 5 };

/* One pooling mode of the layers file: forward output, table gradients (as the weight
 * change of SGD lr=1) and, for the weighted mode, the per-id weight gradient. */
static void check_embbag_mode(em_st *st, const char *mode, em_pooling pooling, int weighted,
                              em_pool *pool) {
    char name[64];
    const int64_t *rows, *idx, *off;
    const float *W0[EB_T], *psw, *dout, *rout, *rdW, *rdpsw;
    em_embbag *e = NULL;
    float *out = zeros(EB_B * EB_T * EB_D), *dpsw = NULL;
    int64_t nidx;

    GET(rows, st, "embbag.rows", EM_I64, EB_T);
    GET(off, st, "embbag.offsets", EM_I64, EB_T * EB_B + 1);
    nidx = off[EB_T * EB_B];
    GET(idx, st, "embbag.indices", EM_I64, nidx);
    GET(psw, st, "embbag.per_sample_weights", EM_F32, nidx);
    GET(dout, st, "embbag.dout", EM_F32, EB_B * EB_T * EB_D);
    for (int t = 0; t < EB_T; t++) {
        snprintf(name, sizeof name, "embbag.W.%d", t);
        GET(W0[t], st, name, EM_F32, rows[t] * EB_D);
    }
    snprintf(name, sizeof name, "embbag.%s.out", mode);
    GET(rout, st, name, EM_F32, EB_B * EB_T * EB_D);

    em_embbag_cfg cfg = {.num_tables = EB_T, .rows = rows, .dim = EB_D, .pooling = pooling,
                         .opt = em_optim_default(EM_OPT_SGD, 1.0f)};
    CHECK_OK(em_embbag_create(&e, &cfg));
    if (!e) goto done;
    for (int t = 0; t < EB_T; t++) {
        CHECK(em_embbag_rows(e, t) == rows[t]);
        memcpy(em_embbag_weights(e, t), W0[t], (size_t)rows[t] * EB_D * sizeof(float));
    }
    const float *w = weighted ? psw : NULL;
    CHECK_OK(em_embbag_forward(e, out, idx, off, w, EB_B, pool));
    CHECK_REL(out, rout, EB_B * EB_T * EB_D, TOL_FWD);

    if (weighted) dpsw = zeros((size_t)nidx);
    CHECK_OK(em_embbag_backward_update(e, dout, idx, off, w, dpsw, EB_B, pool));
    for (int t = 0; t < EB_T; t++) {
        size_t n = (size_t)rows[t] * EB_D;
        const float *Wt = em_embbag_weights(e, t);
        float *delta = zeros(n);
        for (size_t i = 0; i < n; i++) delta[i] = W0[t][i] - Wt[i];
        snprintf(name, sizeof name, "embbag.%s.dW.%d", mode, t);
        rdW = em_st_expect(st, name, EM_F32, (int64_t)n);
        CHECK(rdW != NULL);
        if (rdW) {
            CHECK_REL(delta, rdW, n, TOL_GRAD);
            /* rows no bag touched are left bit-for-bit alone */
            for (int64_t r = 0; r < rows[t]; r++) {
                int touched = 0;
                for (int64_t k = off[t * EB_B]; k < off[(t + 1) * EB_B]; k++) touched |= idx[k] == r;
                if (!touched) CHECK(same_bits(Wt + r * EB_D, W0[t] + r * EB_D, EB_D));
            }
        }
        em_free(delta);
    }
    if (weighted) {
        snprintf(name, sizeof name, "embbag.%s.dpsw", mode);
        GET(rdpsw, st, name, EM_F32, nidx);
        CHECK_REL(dpsw, rdpsw, (size_t)nidx, TOL_GRAD);
    }
done:
    em_embbag_free(e);
    em_free(out), em_free(dpsw);
}

static void test_embbag_sum(void) {
    em_st *st = open_golden("layers.safetensors");
    if (st) check_embbag_mode(st, "sum", EM_POOL_SUM, 0, NULL);
    em_st_close(st);
}

static void test_embbag_mean(void) {
    em_st *st = open_golden("layers.safetensors");
    if (st) check_embbag_mode(st, "mean", EM_POOL_MEAN, 0, NULL);
    em_st_close(st);
}

static void test_embbag_weighted(void) {
    em_st *st = open_golden("layers.safetensors");
    if (st) check_embbag_mode(st, "weighted", EM_POOL_SUM, 1, NULL);
    em_st_close(st);
}

static void test_embbag_threads(void) {
    em_st *st = open_golden("layers.safetensors");
    em_pool *pool = make_pool(3);
    if (st && pool) {
        check_embbag_mode(st, "sum", EM_POOL_SUM, 0, pool);
        check_embbag_mode(st, "mean", EM_POOL_MEAN, 0, pool);
        check_embbag_mode(st, "weighted", EM_POOL_SUM, 1, pool);
    }
    em_pool_free(pool);
    em_st_close(st);
}

/* ------------------------------------------------------ dense optimizers */

enum { OPT_N = 37, OPT_STEPS = 10 };

/* Run 10 steps of `cfg` on the golden parameter vector and compare after step 1 and
 * step 10; the 3-thread run must give the same bits. */
static void check_dense_opt(em_st *st, const char *name, em_optim_cfg cfg, em_pool *pool) {
    char key[64];
    const float *w0, *grads, *rw1, *rw10, *rstate;
    float *w = NULL, *state = NULL, *w_mt = NULL, *state_mt = NULL;
    int per = em_optim_state_per_param(cfg.kind);
    size_t ns = (size_t)OPT_N * per;

    GET(w0, st, "dense.w0", EM_F32, OPT_N);
    GET(grads, st, "dense.grads", EM_F32, OPT_STEPS * OPT_N);
    snprintf(key, sizeof key, "dense.%s.w1", name);
    GET(rw1, st, key, EM_F32, OPT_N);
    snprintf(key, sizeof key, "dense.%s.w10", name);
    GET(rw10, st, key, EM_F32, OPT_N);

    w = copy_of(w0, OPT_N), w_mt = copy_of(w0, OPT_N);
    state = zeros(ns), state_mt = zeros(ns);
    for (int k = 0; k < OPT_STEPS; k++) {
        CHECK_OK(em_optim_dense_step(&cfg, w, grads + k * OPT_N, state, OPT_N, k + 1, NULL));
        CHECK_OK(em_optim_dense_step(&cfg, w_mt, grads + k * OPT_N, state_mt, OPT_N, k + 1, pool));
        if (k == 0) CHECK_REL(w, rw1, OPT_N, TOL_FWD);
    }
    CHECK_REL(w, rw10, OPT_N, TOL_TRAJ);
    CHECK(same_bits(w, w_mt, OPT_N) && same_bits(state, state_mt, ns));
    if (cfg.kind == EM_OPT_ADAGRAD) {
        GET(rstate, st, "dense.adagrad.state10", EM_F32, OPT_N);
        CHECK_REL(state, rstate, OPT_N, TOL_TRAJ);
    }
done:
    em_free(w), em_free(state), em_free(w_mt), em_free(state_mt);
}

static void test_optim_dense(void) {
    em_st *st = open_golden("optim.safetensors");
    em_pool *pool = make_pool(3);
    if (!st || !pool) goto done;
    em_optim_cfg sgd = em_optim_default(EM_OPT_SGD, 0.1f);
    sgd.weight_decay = 0.01f;
    check_dense_opt(st, "sgd", sgd, pool);
    check_dense_opt(st, "adagrad", em_optim_default(EM_OPT_ADAGRAD, 0.1f), pool);
    check_dense_opt(st, "adam", em_optim_default(EM_OPT_ADAM, 0.01f), pool);
    em_optim_cfg adamw = em_optim_default(EM_OPT_ADAMW, 0.01f);
    adamw.weight_decay = 0.01f;
    check_dense_opt(st, "adamw", adamw, pool);

    /* row-wise AdaGrad is an embedding optimizer only */
    em_optim_cfg rw = em_optim_default(EM_OPT_ROWWISE_ADAGRAD, 0.1f);
    float w = 1.0f, g = 1.0f, s = 0.0f;
    CHECK(em_optim_dense_step(&rw, &w, &g, &s, 1, 1, NULL) == EM_ERR_INVALID);
done:
    em_pool_free(pool);
    em_st_close(st);
}

/* ----------------------------------------------------- sparse optimizers */

enum { SP_T = 2, SP_B = 3, SP_D = 4 };

/* 10 steps of `kind` (lr 0.1, eps 1e-10) through a sum-pooled embedding bag with the
 * loss sum(out * dout_k): compare each step's loss (forward on the evolving tables),
 * then the final tables and optimizer state. */
static void check_sparse_opt(em_st *st, const char *name, em_optim_kind kind, em_pool *pool) {
    char key[64];
    const int64_t *rows, *idx, *off;
    const float *W0, *dout, *rlosses, *rW, *rstate;
    em_embbag *e = NULL;
    float *out = zeros(SP_B * SP_T * SP_D);

    GET(rows, st, "sparse.rows", EM_I64, SP_T);
    snprintf(key, sizeof key, "sparse.%s.losses", name);
    GET(rlosses, st, key, EM_F32, OPT_STEPS);
    em_embbag_cfg cfg = {.num_tables = SP_T, .rows = rows, .dim = SP_D, .pooling = EM_POOL_SUM,
                         .opt = em_optim_default(kind, 0.1f)};
    cfg.opt.eps = 1e-10f;
    CHECK_OK(em_embbag_create(&e, &cfg));
    if (!e) goto done;
    for (int t = 0; t < SP_T; t++) {
        snprintf(key, sizeof key, "sparse.W0.%d", t);
        GET(W0, st, key, EM_F32, rows[t] * SP_D);
        memcpy(em_embbag_weights(e, t), W0, (size_t)rows[t] * SP_D * sizeof(float));
    }
    for (int k = 0; k < OPT_STEPS; k++) {
        snprintf(key, sizeof key, "sparse.batch.%d.offsets", k);
        GET(off, st, key, EM_I64, SP_T * SP_B + 1);
        snprintf(key, sizeof key, "sparse.batch.%d.indices", k);
        GET(idx, st, key, EM_I64, off[SP_T * SP_B]);
        snprintf(key, sizeof key, "sparse.batch.%d.dout", k);
        GET(dout, st, key, EM_F32, SP_B * SP_T * SP_D);
        CHECK_OK(em_embbag_forward(e, out, idx, off, NULL, SP_B, pool));
        double loss = 0;
        for (int i = 0; i < SP_B * SP_T * SP_D; i++) loss += (double)out[i] * dout[i];
        CHECK_NEAR(loss, rlosses[k], TOL_TRAJ * fmax(1.0, fabs(rlosses[k])));
        CHECK_OK(em_embbag_backward_update(e, dout, idx, off, NULL, NULL, SP_B, pool));
    }
    for (int t = 0; t < SP_T; t++) {
        snprintf(key, sizeof key, "sparse.%s.W.%d", name, t);
        GET(rW, st, key, EM_F32, rows[t] * SP_D);
        CHECK_REL(em_embbag_weights(e, t), rW, (size_t)rows[t] * SP_D, TOL_TRAJ);
        size_t ns = 0;
        float *state = em_embbag_state(e, t, &ns);
        if (kind == EM_OPT_SGD) {
            CHECK(state == NULL && ns == 0);
            continue;
        }
        size_t want = kind == EM_OPT_ADAGRAD ? (size_t)rows[t] * SP_D : (size_t)rows[t];
        CHECK(state != NULL && ns == want);
        snprintf(key, sizeof key, "sparse.%s.state.%d", name, t);
        GET(rstate, st, key, EM_F32, want);
        if (state && ns == want) CHECK_REL(state, rstate, want, TOL_TRAJ);
    }
done:
    em_embbag_free(e);
    em_free(out);
}

static void test_optim_sparse(void) {
    em_st *st = open_golden("optim.safetensors");
    if (!st) return;
    check_sparse_opt(st, "sgd", EM_OPT_SGD, NULL);
    check_sparse_opt(st, "adagrad", EM_OPT_ADAGRAD, NULL);
    check_sparse_opt(st, "rowwise_adagrad", EM_OPT_ROWWISE_ADAGRAD, NULL);
    em_st_close(st);
}

static void test_optim_sparse_threads(void) {
    em_st *st = open_golden("optim.safetensors");
    em_pool *pool = make_pool(3);
    if (st && pool) {
        check_sparse_opt(st, "sgd", EM_OPT_SGD, pool);
        check_sparse_opt(st, "adagrad", EM_OPT_ADAGRAD, pool);
        check_sparse_opt(st, "rowwise_adagrad", EM_OPT_ROWWISE_ADAGRAD, pool);
    }
    em_pool_free(pool);
    em_st_close(st);
}

TEST_MAIN({"linear", test_linear}, {"relu", test_relu}, {"sigmoid", test_sigmoid},
          {"interact", test_interact}, {"bce", test_bce}, {"embbag_sum", test_embbag_sum},
          {"embbag_mean", test_embbag_mean}, {"embbag_weighted", test_embbag_weighted},
          {"embbag_threads", test_embbag_threads}, {"optim_dense", test_optim_dense},
          {"optim_sparse", test_optim_sparse}, {"optim_sparse_threads", test_optim_sparse_threads})
