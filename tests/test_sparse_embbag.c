/*
 * test_sparse_embbag.c - embedding bags and the fused sparse optimizers against
 * float64 references: forward (sum, mean, per-id weights, empty bags, duplicates,
 * odd D, B = 1), backward + SGD / AdaGrad / row-wise AdaGrad (with weight decay and
 * init_accum) against a reference that materialises the dense table gradient, per-id
 * weight gradients, bitwise determinism over thread counts, validation (tables
 * untouched on error), allocation-failure injection, the radix sort.
 */
#include "test.h"

#include "sparse/radix.h"

/* ------------------------------------------------------------ a batch */

typedef struct {
    int T, D, B;
    int64_t *rows;
    int64_t *idx, *off; /* off: T*B + 1 */
    float *pw;          /* NULL or one per index */
    float *dout;        /* (B, T, D) */
    size_t nnz;
} batch;

/* Bags of 0..maxlen ids (maxlen < 0: 0..-maxlen in even tables, 0..1 in odd ones, so
 * some tables take the dout-copy path and others not); `dup_rows` > 0 draws ids from the first dup_rows rows only
 * (duplicates inside bags and across the batch). */
static batch make_batch(em_rng *r, int T, const int64_t *rows, int D, int B, int maxlen, int64_t dup_rows, int weighted) {
    batch bt = {T, D, B, NULL, NULL, NULL, NULL, NULL, 0};
    bt.rows = malloc((size_t)T * sizeof(int64_t));
    memcpy(bt.rows, rows, (size_t)T * sizeof(int64_t));
    bt.off = malloc(((size_t)T * B + 1) * sizeof(int64_t));
    bt.off[0] = 0;
    for (int u = 0; u < T * B; u++) {
        int ml = maxlen >= 0 ? maxlen : (u / B) % 2 ? 1 : -maxlen;
        bt.off[u + 1] = bt.off[u] + (int64_t)em_rng_below(r, (uint64_t)ml + 1);
    }
    bt.nnz = (size_t)bt.off[T * B];
    bt.idx = malloc((bt.nnz + 1) * sizeof(int64_t));
    bt.pw = weighted ? malloc((bt.nnz + 1) * sizeof(float)) : NULL;
    for (int t = 0; t < T; t++)
        for (int64_t k = bt.off[t * B]; k < bt.off[(t + 1) * B]; k++) {
            int64_t lim = dup_rows > 0 && dup_rows < rows[t] ? dup_rows : rows[t];
            bt.idx[k] = (int64_t)em_rng_below(r, (uint64_t)lim);
            if (weighted) bt.pw[k] = (float)(em_rng_uniform(r) * 2 - 0.5);
        }
    bt.dout = malloc((size_t)B * T * D * sizeof(float));
    for (size_t i = 0; i < (size_t)B * T * D; i++) bt.dout[i] = (float)(em_rng_uniform(r) * 2 - 1);
    return bt;
}

static void free_batch(batch *bt) {
    free(bt->rows), free(bt->idx), free(bt->off), free(bt->pw), free(bt->dout);
}

static em_embbag *make_bag(int T, const int64_t *rows, int D, em_pooling pool_kind, em_optim_cfg opt) {
    em_embbag_cfg c = {T, rows, D, pool_kind, opt};
    em_embbag *e = NULL;
    CHECK_OK(em_embbag_create(&e, &c));
    return e;
}

static em_optim_cfg opt_cfg(em_optim_kind k, float lr) {
    em_optim_cfg o;
    memset(&o, 0, sizeof o);
    o.kind = k;
    o.lr = lr;
    o.eps = 1e-10f;
    return o;
}

/* All weights (or states) of e concatenated, as a malloc'd copy. */
static float *snapshot(em_embbag *e, int state, size_t *n_out) {
    size_t n = 0;
    for (int t = 0; t < em_embbag_num_tables(e); t++) {
        size_t c = (size_t)em_embbag_rows(e, t) * em_embbag_dim(e);
        if (state) em_embbag_state(e, t, &c);
        n += c;
    }
    float *s = malloc((n + 1) * sizeof(float)), *p = s;
    for (int t = 0; t < em_embbag_num_tables(e); t++) {
        size_t c = (size_t)em_embbag_rows(e, t) * em_embbag_dim(e);
        const float *src = em_embbag_weights(e, t);
        if (state) src = em_embbag_state(e, t, &c);
        if (c) memcpy(p, src, c * sizeof(float));
        p += c;
    }
    *n_out = n;
    return s;
}

/* ------------------------------------------------------- references */

static void ref_forward(em_embbag *e, const batch *bt, double *out) {
    int T = bt->T, D = bt->D, B = bt->B;
    for (int t = 0; t < T; t++) {
        const float *W = em_embbag_weights(e, t);
        for (int b = 0; b < B; b++) {
            double *o = out + ((size_t)b * T + t) * D;
            for (int d = 0; d < D; d++) o[d] = 0;
            int64_t k0 = bt->off[t * B + b], k1 = bt->off[t * B + b + 1];
            for (int64_t k = k0; k < k1; k++)
                for (int d = 0; d < D; d++) o[d] += (bt->pw ? bt->pw[k] : 1.0) * W[bt->idx[k] * D + d];
        }
    }
}

static void ref_mean(const batch *bt, double *out) {
    for (int t = 0; t < bt->T; t++)
        for (int b = 0; b < bt->B; b++) {
            int64_t len = bt->off[t * bt->B + b + 1] - bt->off[t * bt->B + b];
            if (len)
                for (int d = 0; d < bt->D; d++) out[((size_t)b * bt->T + t) * bt->D + d] /= (double)len;
        }
}

/* One step of the sparse optimizer on float64 copies W, S of every table (flattened in
 * table order), through the dense table gradient; rows with no occurrence untouched. */
static void ref_step(const batch *bt, em_pooling pk, em_optim_cfg o, double *W, double *S, double *dpw) {
    int T = bt->T, D = bt->D, B = bt->B;
    size_t total = 0;
    for (int t = 0; t < T; t++) total += (size_t)bt->rows[t];
    double *G = calloc(total * D, sizeof(double));
    int *cnt = calloc(total, sizeof(int));
    size_t r0 = 0;
    for (int t = 0; t < T; t++) {
        for (int b = 0; b < B; b++) {
            int64_t k0 = bt->off[t * B + b], k1 = bt->off[t * B + b + 1];
            double inv = pk == EM_POOL_MEAN && k1 > k0 ? 1.0 / (double)(k1 - k0) : 1.0;
            const float *dr = bt->dout + ((size_t)b * T + t) * D;
            for (int64_t k = k0; k < k1; k++) {
                size_t row = r0 + (size_t)bt->idx[k];
                double s = inv * (bt->pw ? bt->pw[k] : 1.0), dot = 0;
                for (int d = 0; d < D; d++) {
                    G[row * D + d] += s * dr[d];
                    dot += (double)dr[d] * W[row * D + d];
                }
                if (dpw) dpw[k] += inv * dot;
                cnt[row]++;
            }
        }
        r0 += (size_t)bt->rows[t];
    }
    for (size_t row = 0; row < total; row++) {
        if (!cnt[row]) continue;
        double *w = W + row * D, *g = G + row * D;
        for (int d = 0; d < D; d++) g[d] += o.weight_decay * w[d];
        if (o.kind == EM_OPT_SGD) {
            for (int d = 0; d < D; d++) w[d] -= o.lr * g[d];
        } else if (o.kind == EM_OPT_ADAGRAD) {
            for (int d = 0; d < D; d++) {
                S[row * D + d] += g[d] * g[d];
                w[d] -= o.lr * g[d] / (sqrt(S[row * D + d]) + o.eps);
            }
        } else {
            double m = 0;
            for (int d = 0; d < D; d++) m += g[d] * g[d];
            S[row] += m / D;
            for (int d = 0; d < D; d++) w[d] -= o.lr * g[d] / (sqrt(S[row]) + o.eps);
        }
    }
    free(G), free(cnt);
}

static double *to_double(const float *x, size_t n) {
    double *y = malloc((n + 1) * sizeof(double));
    for (size_t i = 0; i < n; i++) y[i] = x[i];
    return y;
}

/* -------------------------------------------------------------- tests */

static void test_forward(void) {
    em_pool *pools[2];
    CHECK_OK(em_pool_create(&pools[0], 1));
    CHECK_OK(em_pool_create(&pools[1], 2));
    struct { int T, D, B, maxlen; int64_t dup; int weighted; em_pooling pk; } cases[] = {
        {3, 16, 37, 5, 0, 0, EM_POOL_SUM},  {3, 13, 37, 5, 4, 0, EM_POOL_SUM},
        {2, 64, 19, 9, 3, 1, EM_POOL_SUM},  {4, 7, 23, 4, 0, 0, EM_POOL_MEAN},
        {2, 24, 11, 6, 2, 1, EM_POOL_MEAN}, {1, 5, 1, 3, 0, 0, EM_POOL_SUM},
        {2, 1, 1, 0, 0, 0, EM_POOL_MEAN},   {5, 33, 64, 2, 0, 1, EM_POOL_SUM},
    };
    em_rng r;
    em_rng_seed(&r, 11);
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        int64_t rows[5] = {50, 7, 300, 1, 1000};
        int T = cases[c].T, D = cases[c].D, B = cases[c].B;
        em_embbag *e = make_bag(T, rows, D, cases[c].pk, opt_cfg(EM_OPT_SGD, 0.1f));
        if (!e) continue;
        em_embbag_init_uniform(e, 5 + c, pools[1]);
        batch bt = make_batch(&r, T, rows, D, B, cases[c].maxlen, cases[c].dup, cases[c].weighted);
        double *ref = malloc((size_t)B * T * D * sizeof(double));
        ref_forward(e, &bt, ref);
        if (cases[c].pk == EM_POOL_MEAN) ref_mean(&bt, ref);
        for (int p = 0; p < 2; p++) {
            float *out = malloc((size_t)B * T * D * sizeof(float));
            for (size_t i = 0; i < (size_t)B * T * D; i++) out[i] = NAN; /* every output is written */
            CHECK_OK(em_embbag_forward(e, out, bt.idx, bt.off, bt.pw, B, pools[p]));
            double err = rel_err_fd(out, ref, (size_t)B * T * D, 1e-3);
            CHECK(err < 1e-6);
            if (!(err < 1e-6)) fprintf(stderr, "    case %zu nth %d: rel err %g\n", c, p + 1, err);
            /* empty bags pool to exact zeros */
            for (int t = 0; t < T; t++)
                for (int b = 0; b < B; b++)
                    if (bt.off[t * B + b] == bt.off[t * B + b + 1])
                        for (int d = 0; d < D; d++) CHECK(out[((size_t)b * T + t) * D + d] == 0.f);
            free(out);
        }
        free(ref);
        free_batch(&bt);
        em_embbag_free(e);
    }
    em_pool_free(pools[0]);
    em_pool_free(pools[1]);
}

/* One backward step against the reference for the given optimizer settings. */
static void check_step_len(em_optim_cfg o, em_pooling pk, int D, int weighted, int64_t dup, int steps, em_pool *pool,
                           int maxlen) {
    int64_t rows[3] = {40, 3, 500};
    int T = 3, B = 29;
    em_embbag *e = make_bag(T, rows, D, pk, o);
    if (!e) return;
    em_embbag_init_uniform(e, 99, pool);
    size_t nw, ns;
    float *w0 = snapshot(e, 0, &nw), *s0 = snapshot(e, 1, &ns);
    double *W = to_double(w0, nw), *S = to_double(s0, ns);
    em_rng r;
    em_rng_seed(&r, 1234 + D);
    for (int step = 0; step < steps; step++) {
        batch bt = make_batch(&r, T, rows, D, B, maxlen, dup, weighted);
        CHECK_OK(em_embbag_backward_update(e, bt.dout, bt.idx, bt.off, bt.pw, NULL, B, pool));
        ref_step(&bt, pk, o, W, S, NULL);
        free_batch(&bt);
    }
    size_t nw1, ns1;
    float *w1 = snapshot(e, 0, &nw1), *s1 = snapshot(e, 1, &ns1);
    CHECK(nw1 == nw && ns1 == ns);
    double ew = rel_err_fd(w1, W, nw, 1e-2), es = ns ? rel_err_fd(s1, S, ns, 1e-2) : 0;
    CHECK(ew < 2e-5 && es < 2e-5);
    if (!(ew < 2e-5 && es < 2e-5))
        fprintf(stderr, "    opt %d pool %d D %d w %d: weight err %g, state err %g\n", (int)o.kind, (int)pk, D, weighted, ew, es);
    /* Rows the reference left alone are bitwise untouched. */
    for (size_t i = 0; i < nw; i++)
        if (W[i] == (double)w0[i] && w1[i] != w0[i]) {
            CHECK(0);
            break;
        }
    free(w0), free(s0), free(w1), free(s1), free(W), free(S);
    em_embbag_free(e);
}

/* Bags of up to 6 ids: the backward reads a contiguous copy of dout. */
static void check_step(em_optim_cfg o, em_pooling pk, int D, int weighted, int64_t dup, int steps, em_pool *pool) {
    check_step_len(o, pk, D, weighted, dup, steps, pool, 6);
}

static void test_backward_sgd(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    check_step(opt_cfg(EM_OPT_SGD, 0.1f), EM_POOL_SUM, 16, 0, 0, 3, pool);
    check_step(opt_cfg(EM_OPT_SGD, 0.1f), EM_POOL_SUM, 13, 0, 5, 3, pool);
    check_step(opt_cfg(EM_OPT_SGD, 0.1f), EM_POOL_MEAN, 64, 1, 4, 2, pool);
    em_optim_cfg o = opt_cfg(EM_OPT_SGD, 0.05f);
    o.weight_decay = 0.01f;
    check_step(o, EM_POOL_SUM, 9, 1, 0, 3, NULL);
    /* about one id per bag (Criteo): dout is read in place */
    check_step_len(opt_cfg(EM_OPT_SGD, 0.1f), EM_POOL_SUM, 16, 0, 3, 3, pool, 2);
    check_step_len(opt_cfg(EM_OPT_SGD, 0.1f), EM_POOL_MEAN, 10, 1, 0, 3, pool, 2);
    check_step_len(opt_cfg(EM_OPT_SGD, 0.1f), EM_POOL_MEAN, 16, 1, 0, 3, pool, -7);
    em_pool_free(pool);
}

static void test_backward_adagrad(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    check_step(opt_cfg(EM_OPT_ADAGRAD, 0.05f), EM_POOL_SUM, 16, 0, 0, 3, pool);
    check_step(opt_cfg(EM_OPT_ADAGRAD, 0.05f), EM_POOL_MEAN, 11, 1, 3, 3, pool);
    em_optim_cfg o = opt_cfg(EM_OPT_ADAGRAD, 0.02f);
    o.init_accum = 0.1f;
    o.weight_decay = 0.001f;
    o.eps = 1e-6f;
    check_step(o, EM_POOL_SUM, 64, 1, 6, 3, NULL);
    check_step_len(opt_cfg(EM_OPT_ADAGRAD, 0.05f), EM_POOL_SUM, 12, 0, 0, 3, pool, 2);
    em_pool_free(pool);
}

static void test_backward_rowwise(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 3));
    check_step(opt_cfg(EM_OPT_ROWWISE_ADAGRAD, 0.05f), EM_POOL_SUM, 64, 0, 0, 3, pool);
    check_step(opt_cfg(EM_OPT_ROWWISE_ADAGRAD, 0.05f), EM_POOL_MEAN, 5, 1, 2, 3, pool);
    em_optim_cfg o = opt_cfg(EM_OPT_ROWWISE_ADAGRAD, 0.03f);
    o.init_accum = 0.5f;
    o.weight_decay = 0.002f;
    o.eps = 1e-8f;
    check_step(o, EM_POOL_SUM, 16, 1, 0, 3, NULL);
    check_step_len(opt_cfg(EM_OPT_ROWWISE_ADAGRAD, 0.05f), EM_POOL_MEAN, 64, 1, 5, 3, pool, 2);
    check_step_len(opt_cfg(EM_OPT_ROWWISE_ADAGRAD, 0.05f), EM_POOL_SUM, 32, 0, 0, 3, pool, -8);
    em_pool_free(pool);
}

static void test_dper_id_w(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    for (int c = 0; c < 4; c++) {
        int pk = c & 1, maxlen = c < 2 ? 5 : 2; /* with and without the dout copy */
        int64_t rows[2] = {30, 200};
        int T = 2, D = 20, B = 17;
        em_optim_cfg o = opt_cfg(EM_OPT_ROWWISE_ADAGRAD, 0.1f);
        em_embbag *e = make_bag(T, rows, D, (em_pooling)pk, o);
        if (!e) continue;
        em_embbag_init_uniform(e, 3, pool);
        em_rng r;
        em_rng_seed(&r, 77);
        batch bt = make_batch(&r, T, rows, D, B, maxlen, 6, 1);
        size_t nw, ns;
        float *w0 = snapshot(e, 0, &nw), *s0 = snapshot(e, 1, &ns);
        double *W = to_double(w0, nw), *S = to_double(s0, ns);
        double *dref = calloc(bt.nnz + 1, sizeof(double));
        float *dpw = malloc((bt.nnz + 1) * sizeof(float));
        for (size_t k = 0; k < bt.nnz; k++) dpw[k] = 0.25f, dref[k] = 0.25; /* accumulates */
        CHECK_OK(em_embbag_backward_update(e, bt.dout, bt.idx, bt.off, bt.pw, dpw, B, pool));
        ref_step(&bt, (em_pooling)pk, o, W, S, dref);
        CHECK(rel_err_fd(dpw, dref, bt.nnz, 1e-2) < 1e-5);
        size_t nw1;
        float *w1 = snapshot(e, 0, &nw1);
        CHECK(rel_err_fd(w1, W, nw, 1e-2) < 2e-5);
        /* dper_id_w without per_id_w is a contract violation */
        CHECK(em_embbag_backward_update(e, bt.dout, bt.idx, bt.off, NULL, dpw, B, pool) == EM_ERR_INVALID);
        free(w0), free(s0), free(w1), free(W), free(S), free(dref), free(dpw);
        free_batch(&bt);
        em_embbag_free(e);
    }
    em_pool_free(pool);
}

static void test_determinism(void) {
    int64_t rows[4] = {1000, 17, 1, 5000};
    int T = 4, D = 24, B = 64;
    const em_optim_kind kinds[3] = {EM_OPT_SGD, EM_OPT_ADAGRAD, EM_OPT_ROWWISE_ADAGRAD};
    for (int ki = 0; ki < 3; ki++) {
        float *ref_w = NULL, *ref_s = NULL, *ref_out = NULL;
        size_t nw = 0, ns = 0;
        for (int nth = 1; nth <= 3; nth++) {
            em_pool *pool;
            CHECK_OK(em_pool_create(&pool, nth));
            em_optim_cfg o = opt_cfg(kinds[ki], 0.05f);
            o.weight_decay = ki == 1 ? 1e-3f : 0.f;
            em_embbag *e = make_bag(T, rows, D, ki == 2 ? EM_POOL_MEAN : EM_POOL_SUM, o);
            em_embbag_init_uniform(e, 42, pool);
            em_rng r;
            em_rng_seed(&r, 5);
            float *out = malloc((size_t)B * T * D * sizeof(float));
            for (int step = 0; step < 4; step++) {
                batch bt = make_batch(&r, T, rows, D, B, step == 2 ? -9 : 30, step == 1 ? 10 : 0, ki == 0);
                CHECK_OK(em_embbag_forward(e, out, bt.idx, bt.off, bt.pw, B, pool));
                CHECK_OK(em_embbag_backward_update(e, bt.dout, bt.idx, bt.off, bt.pw, NULL, B, pool));
                free_batch(&bt);
            }
            size_t n1, n2;
            float *w = snapshot(e, 0, &n1), *s = snapshot(e, 1, &n2);
            if (nth == 1) {
                ref_w = w, ref_s = s, ref_out = out, nw = n1, ns = n2;
            } else {
                CHECK(n1 == nw && memcmp(w, ref_w, nw * sizeof(float)) == 0);
                CHECK(n2 == ns && (ns == 0 || memcmp(s, ref_s, ns * sizeof(float)) == 0));
                CHECK(memcmp(out, ref_out, (size_t)B * T * D * sizeof(float)) == 0);
                free(w), free(s), free(out);
            }
            em_embbag_free(e);
            em_pool_free(pool);
        }
        free(ref_w), free(ref_s), free(ref_out);
    }
}

static void test_init_uniform(void) {
    int64_t rows[3] = {70000, 10, 200000}; /* several init chunks */
    int D = 3;
    float *ref = NULL;
    size_t n = 0;
    for (int nth = 1; nth <= 3; nth++) {
        em_pool *pool;
        CHECK_OK(em_pool_create(&pool, nth));
        em_embbag *e = make_bag(3, rows, D, EM_POOL_SUM, opt_cfg(EM_OPT_SGD, 0.1f));
        em_embbag_init_uniform(e, 7, pool);
        size_t m;
        float *w = snapshot(e, 0, &m);
        if (!ref) {
            ref = w, n = m;
            size_t at = 0;
            for (int t = 0; t < 3; t++) {
                double bound = sqrt(1.0 / rows[t]), sum = 0, mx = 0;
                for (size_t i = 0; i < (size_t)rows[t] * D; i++) {
                    sum += w[at + i];
                    if (fabs(w[at + i]) > mx) mx = fabs(w[at + i]);
                }
                CHECK(mx <= bound && (rows[t] < 1000 || mx > 0.99 * bound));
                CHECK(fabs(sum / ((double)rows[t] * D)) < 0.1 * bound);
                at += (size_t)rows[t] * D;
            }
            /* chunks draw from different streams */
            CHECK(memcmp(w, w + 65536 * D, 64 * sizeof(float)) != 0);
        } else {
            CHECK(m == n && memcmp(w, ref, n * sizeof(float)) == 0);
            free(w);
        }
        /* another seed gives other values */
        em_embbag_init_uniform(e, 8, pool);
        CHECK(em_embbag_weights(e, 0)[0] != ref[0]);
        em_embbag_free(e);
        em_pool_free(pool);
    }
    free(ref);
}

static void test_invalid(void) {
    int64_t rows[2] = {50, 10};
    int T = 2, D = 8, B = 4;
    em_pool *pools[3];
    for (int i = 0; i < 3; i++) CHECK_OK(em_pool_create(&pools[i], i + 1));
    em_embbag *e = make_bag(T, rows, D, EM_POOL_SUM, opt_cfg(EM_OPT_ADAGRAD, 0.1f));
    em_embbag_init_uniform(e, 1, NULL);
    em_rng r;
    em_rng_seed(&r, 3);
    batch bt = make_batch(&r, T, rows, D, B, 4, 0, 0);
    size_t nw, ns;
    float *w0 = snapshot(e, 0, &nw), *s0 = snapshot(e, 1, &ns);
    float *out = malloc((size_t)B * T * D * sizeof(float));
    /* make sure table 1 example 2 has an index, then corrupt it (and a later one) */
    int64_t k_bad = bt.off[1 * B + 2];
    if (bt.off[1 * B + 3] == k_bad) {
        for (int u = 1 * B + 3; u <= T * B; u++) bt.off[u]++;
        bt.nnz++;
        bt.idx = realloc(bt.idx, (bt.nnz + 1) * sizeof(int64_t));
        memmove(bt.idx + k_bad + 1, bt.idx + k_bad, (bt.nnz - 1 - (size_t)k_bad) * sizeof(int64_t));
    }
    int64_t saved = bt.idx[k_bad];
    bt.idx[k_bad] = 10;
    if ((size_t)k_bad + 1 < bt.nnz) bt.idx[bt.nnz - 1] = -1; /* a later error is not the one reported */
    char want[160];
    snprintf(want, sizeof want, "table 1, example 2, index %lld: row 10 out of range [0, 10)", (long long)k_bad);
    for (int p = 0; p < 3; p++) {
        CHECK(em_embbag_forward(e, out, bt.idx, bt.off, NULL, B, pools[p]) == EM_ERR_INVALID);
        CHECK(strstr(em_last_error(), want) != NULL);
        CHECK(em_embbag_backward_update(e, bt.dout, bt.idx, bt.off, NULL, NULL, B, pools[p]) == EM_ERR_INVALID);
        CHECK(strstr(em_last_error(), want) != NULL);
    }
    bt.idx[k_bad] = saved;
    /* a negative index in table 0 comes first */
    int64_t saved0 = bt.idx[0];
    if (bt.off[B] > 0) {
        bt.idx[0] = -3;
        CHECK(em_embbag_backward_update(e, bt.dout, bt.idx, bt.off, NULL, NULL, B, pools[1]) == EM_ERR_INVALID);
        CHECK(strstr(em_last_error(), "table 0, example") && strstr(em_last_error(), "row -3 out of range [0, 50)"));
        bt.idx[0] = saved0;
    }
    bt.idx[bt.nnz - 1] = 0;
    /* bad offsets (reported before any index) */
    int64_t o3 = bt.off[3];
    bt.off[3] = bt.off[2] - 1 < 0 ? -1 : bt.off[2] - 1;
    if (bt.off[3] < bt.off[2]) {
        CHECK(em_embbag_forward(e, out, bt.idx, bt.off, NULL, B, pools[1]) == EM_ERR_INVALID);
        CHECK(strstr(em_last_error(), "table 0, example 2") != NULL);
        CHECK(em_embbag_backward_update(e, bt.dout, bt.idx, bt.off, NULL, NULL, B, pools[1]) == EM_ERR_INVALID);
    }
    bt.off[3] = o3;
    bt.off[0] = 1;
    CHECK(em_embbag_forward(e, out, bt.idx, bt.off, NULL, B, pools[1]) == EM_ERR_INVALID);
    CHECK(em_embbag_backward_update(e, bt.dout, bt.idx, bt.off, NULL, NULL, B, pools[1]) == EM_ERR_INVALID);
    bt.off[0] = 0;
    CHECK(em_embbag_forward(e, out, bt.idx, bt.off, NULL, -1, NULL) == EM_ERR_INVALID);
    CHECK(em_embbag_forward(e, out, bt.idx, NULL, NULL, B, NULL) == EM_ERR_INVALID);
    /* nothing was written to the tables */
    size_t n1, n2;
    float *w1 = snapshot(e, 0, &n1), *s1 = snapshot(e, 1, &n2);
    CHECK(memcmp(w0, w1, nw * sizeof(float)) == 0 && memcmp(s0, s1, ns * sizeof(float)) == 0);
    /* and the fixed batch goes through */
    CHECK_OK(em_embbag_forward(e, out, bt.idx, bt.off, NULL, B, pools[2]));
    CHECK_OK(em_embbag_backward_update(e, bt.dout, bt.idx, bt.off, NULL, NULL, B, pools[2]));
    free(w0), free(s0), free(w1), free(s1), free(out);
    free_batch(&bt);
    em_embbag_free(e);
    for (int i = 0; i < 3; i++) em_pool_free(pools[i]);
}

static void test_bad_config(void) {
    em_embbag_free(NULL);
    int64_t rows[2] = {5, 0};
    em_embbag *e = (em_embbag *)1;
    em_embbag_cfg c = {2, rows, 4, EM_POOL_SUM, opt_cfg(EM_OPT_SGD, 0.1f)};
    CHECK(em_embbag_create(&e, &c) == EM_ERR_INVALID && e == NULL);
    CHECK(strstr(em_last_error(), "table 1") != NULL);
    rows[1] = 3;
    c.dim = 0;
    CHECK(em_embbag_create(&e, &c) == EM_ERR_INVALID);
    c.dim = 4;
    c.opt.kind = EM_OPT_ADAM;
    CHECK(em_embbag_create(&e, &c) == EM_ERR_INVALID);
    c.opt.kind = EM_OPT_ROWWISE_ADAGRAD;
    c.opt.init_accum = 0.25f;
    c.num_tables = 0;
    CHECK(em_embbag_create(&e, &c) == EM_ERR_INVALID);
    c.num_tables = 2;
    CHECK_OK(em_embbag_create(&e, &c));
    size_t cnt;
    float *s = em_embbag_state(e, 1, &cnt);
    CHECK(cnt == 3 && s[0] == 0.25f && s[2] == 0.25f);
    CHECK(em_embbag_num_tables(e) == 2 && em_embbag_dim(e) == 4 && em_embbag_rows(e, 1) == 3);
    CHECK(em_embbag_weights(e, 1) == em_embbag_weights(e, 0) + 20 && em_embbag_weights(e, 2) == NULL);
    CHECK(em_embbag_weights(e, 0)[19] == 0.f);
    em_embbag_free(e);
    c.opt.kind = EM_OPT_SGD;
    CHECK_OK(em_embbag_create(&e, &c));
    CHECK(em_embbag_state(e, 0, &cnt) == NULL && cnt == 0);
    em_embbag_free(e);
}

static void noop_task(void *arg, int ith, int nth) { (void)arg, (void)ith, (void)nth; }

static void test_alloc_failure(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    int64_t rows[3] = {100, 20, 3000};
    em_rng r;
    em_rng_seed(&r, 9);
    batch bt = make_batch(&r, 3, rows, 8, 16, 5, 0, 1);
    float *out = malloc((size_t)16 * 3 * 8 * sizeof(float)), *dpw = calloc(bt.nnz + 1, sizeof(float));
    em_pool_run(pool, noop_task, NULL); /* workers free their start-up argument when they first run */
    size_t base = em_mem_in_use();
    int created = 0;
    for (long k = 0; k < 20 && !created; k++) {
        em_embbag_cfg c = {3, rows, 8, EM_POOL_MEAN, opt_cfg(EM_OPT_ADAGRAD, 0.1f)};
        em_embbag *e = NULL;
        em_mem_fail_after(k);
        em_status st = em_embbag_create(&e, &c);
        em_mem_fail_after(-1);
        if (st == EM_OK) {
            created = 1;
            em_embbag_free(e);
        } else {
            CHECK(st == EM_ERR_NOMEM && e == NULL);
        }
        CHECK(em_mem_in_use() == base);
    }
    CHECK(created);
    /* the first forward / backward grow the scratch */
    for (int which = 0; which < 2; which++) {
        int done = 0;
        for (long k = 0; k < 20 && !done; k++) {
            em_embbag_cfg c = {3, rows, 8, EM_POOL_SUM, opt_cfg(EM_OPT_ROWWISE_ADAGRAD, 0.1f)};
            em_embbag *e = NULL;
            CHECK_OK(em_embbag_create(&e, &c));
            em_embbag_init_uniform(e, 1, pool);
            size_t nw, ns;
            float *w0 = snapshot(e, 0, &nw), *s0 = snapshot(e, 1, &ns);
            em_mem_fail_after(k);
            em_status st = which == 0 ? em_embbag_forward(e, out, bt.idx, bt.off, bt.pw, 16, pool)
                                      : em_embbag_backward_update(e, bt.dout, bt.idx, bt.off, bt.pw, dpw, 16, pool);
            em_mem_fail_after(-1);
            if (st == EM_OK) {
                done = 1;
            } else {
                CHECK(st == EM_ERR_NOMEM);
                size_t n1, n2;
                float *w1 = snapshot(e, 0, &n1), *s1 = snapshot(e, 1, &n2);
                CHECK(memcmp(w0, w1, nw * sizeof(float)) == 0 && memcmp(s0, s1, ns * sizeof(float)) == 0);
                free(w1), free(s1);
                /* the object stays usable */
                CHECK_OK(em_embbag_backward_update(e, bt.dout, bt.idx, bt.off, bt.pw, dpw, 16, pool));
            }
            free(w0), free(s0);
            em_embbag_free(e);
            CHECK(em_mem_in_use() == base);
        }
        CHECK(done);
    }
    free(out), free(dpw);
    free_batch(&bt);
    em_pool_free(pool);
}

/* A large table (24 key bits) with few ids: the 3-pass radix path, plus a row-1 table
 * (0 key bits) where every id is the same row. */
static void test_large_table(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    int64_t rows[2] = {5000000, 1};
    int T = 2, D = 2, B = 700;
    em_optim_cfg o = opt_cfg(EM_OPT_SGD, 0.5f);
    em_embbag *e = make_bag(T, rows, D, EM_POOL_SUM, o);
    if (e) {
        em_embbag_init_uniform(e, 2, pool);
        em_rng r;
        em_rng_seed(&r, 8);
        batch bt = make_batch(&r, T, rows, D, B, 2, 0, 0);
        for (size_t k = 0; k < bt.nnz / 4; k++) bt.idx[k] = 4999999 - (int64_t)(k % 3); /* duplicates at the top */
        size_t nw;
        float *w0 = snapshot(e, 0, &nw);
        double *W = to_double(w0, nw);
        CHECK_OK(em_embbag_backward_update(e, bt.dout, bt.idx, bt.off, NULL, NULL, B, pool));
        ref_step(&bt, EM_POOL_SUM, o, W, NULL, NULL);
        float *w1 = snapshot(e, 0, &nw);
        CHECK(rel_err_fd(w1, W, nw, 1e-2) < 1e-5);
        free(w0), free(w1), free(W);
        free_batch(&bt);
        em_embbag_free(e);
    }
    em_pool_free(pool);
}

static int cmp_pair(const void *a, const void *b) {
    const uint64_t *x = a, *y = b; /* (key, original position) */
    if (x[0] != y[0]) return x[0] < y[0] ? -1 : 1;
    return x[1] < y[1] ? -1 : x[1] > y[1];
}

static void test_radix(void) {
    em_rng r;
    em_rng_seed(&r, 4);
    uint32_t *hist = malloc(EM__RADIX_HIST_WORDS * sizeof(uint32_t));
    size_t sizes[] = {0, 1, 2, 30, 49, 1000, 40960, 3000};
    int bits[] = {0, 1, 5, 7, 9, 17, 24, 32};
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++)
        for (size_t bi = 0; bi < sizeof bits / sizeof bits[0]; bi++) {
            size_t n = sizes[si];
            int kb = bits[bi];
            uint64_t *a = malloc((n + 1) * 8), *b = malloc((n + 1) * 8), *pairs = malloc((n + 1) * 16);
            for (size_t i = 0; i < n; i++) {
                uint64_t key = kb ? em_rng_u64(&r) & ((1ull << kb) - 1) : 0;
                if (i % 5 == 1) key &= 0xff; /* many equal keys */
                a[i] = key << 32 | (uint64_t)i;
                pairs[2 * i] = key, pairs[2 * i + 1] = i;
            }
            qsort(pairs, n, 16, cmp_pair);
            uint64_t *s = em__radix_sort(a, b, n, 32, kb, hist);
            int ok = 1;
            for (size_t i = 0; i < n; i++)
                if (s[i] != (pairs[2 * i] << 32 | pairs[2 * i + 1])) ok = 0;
            CHECK(ok);
            free(a), free(b), free(pairs);
        }
    free(hist);
}

/* em_embbag_update_rows is the fused backward of bags of one id each: bitwise the same
 * tables and state, for any thread count; bad rows are refused before any write. */
static void test_update_rows(void) {
    const int64_t rows[2] = {40, 300};
    const int D = 13, n = 700;
    em_rng r;
    em_rng_seed(&r, 17);
    int64_t *ids = malloc((size_t)n * sizeof(int64_t)), *off = malloc(((size_t)2 * n + 1) * sizeof(int64_t));
    float *g = malloc((size_t)n * D * sizeof(float)), *dout = calloc((size_t)n * 2 * D, sizeof(float));
    for (int j = 0; j < n; j++) {
        ids[j] = (int64_t)em_rng_below(&r, 60); /* many duplicates in table 1 */
        for (int d = 0; d < D; d++) g[(size_t)j * D + d] = dout[((size_t)j * 2 + 1) * D + d] = (float)(em_rng_uniform(&r) - 0.5);
    }
    for (int u = 0; u <= 2 * n; u++) off[u] = u <= n ? 0 : u - n; /* table 0 empty, table 1 one id per bag */
    em_optim_kind kinds[3] = {EM_OPT_SGD, EM_OPT_ADAGRAD, EM_OPT_ROWWISE_ADAGRAD};
    for (int k = 0; k < 3; k++) {
        em_optim_cfg o = opt_cfg(kinds[k], 0.05f);
        o.weight_decay = 0.01f;
        em_embbag *a = make_bag(2, rows, D, EM_POOL_SUM, o), *b = make_bag(2, rows, D, EM_POOL_SUM, o);
        em_embbag_init_uniform(a, 3, NULL);
        em_embbag_init_uniform(b, 3, NULL);
        CHECK_OK(em_embbag_backward_update(a, dout, ids, off, NULL, NULL, n, NULL));
        for (int nth = 1; nth <= 3; nth++) {
            em_embbag *c = make_bag(2, rows, D, EM_POOL_SUM, o);
            em_embbag_init_uniform(c, 3, NULL);
            em_pool *pool;
            CHECK_OK(em_pool_create(&pool, nth));
            CHECK_OK(em_embbag_update_rows(c, 1, ids, g, (size_t)n, pool));
            size_t sa, sc;
            CHECK(memcmp(em_embbag_weights(a, 1), em_embbag_weights(c, 1), (size_t)rows[1] * D * sizeof(float)) == 0);
            const float *xa = em_embbag_state(a, 1, &sa), *xc = em_embbag_state(c, 1, &sc);
            CHECK(sa == sc && (!sa || memcmp(xa, xc, sa * sizeof(float)) == 0));
            em_pool_free(pool);
            em_embbag_free(c);
        }
        /* a bad row: refused, naming the pair; nothing written */
        float *before = malloc((size_t)rows[1] * D * sizeof(float));
        memcpy(before, em_embbag_weights(b, 1), (size_t)rows[1] * D * sizeof(float));
        ids[5] = 300;
        CHECK(em_embbag_update_rows(b, 1, ids, g, (size_t)n, NULL) == EM_ERR_INVALID && strstr(em_last_error(), "pair 5"));
        ids[5] = 1;
        CHECK(memcmp(before, em_embbag_weights(b, 1), (size_t)rows[1] * D * sizeof(float)) == 0);
        CHECK(em_embbag_update_rows(b, 2, ids, g, (size_t)n, NULL) == EM_ERR_INVALID);
        CHECK_OK(em_embbag_update_rows(b, 0, NULL, NULL, 0, NULL));
        free(before);
        em_embbag_free(a), em_embbag_free(b);
    }
    free(ids), free(off), free(g), free(dout);
}

TEST_MAIN({"forward", test_forward}, {"update_rows", test_update_rows}, {"backward_sgd", test_backward_sgd}, {"backward_adagrad", test_backward_adagrad},
          {"backward_rowwise", test_backward_rowwise}, {"dper_id_w", test_dper_id_w},
          {"determinism", test_determinism}, {"init_uniform", test_init_uniform}, {"invalid", test_invalid},
          {"bad_config", test_bad_config}, {"alloc_failure", test_alloc_failure}, {"large_table", test_large_table},
          {"radix", test_radix})
