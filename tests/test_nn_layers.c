/*
 * test_nn_layers.c - every ember/nn.h layer against a float64 reference written here
 * with naive loops, finite-difference gradients of that reference against the fp32
 * backward, odd shapes (B = 1, I = 1, sizes that are not multiples of 8 or 16, shapes
 * that cut into several sgemm tiles), accumulation into non-zero gradients, NULL
 * optional gradients, and bitwise equality across 1, 2 and 3 threads.
 */
#include "test.h"

/* ------------------------------------------------------------------ helpers */

static float *randv(em_rng *r, size_t n, float scale) {
    float *p = em_malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = (float)((em_rng_uniform(r) * 2.0 - 1.0) * scale);
    return p;
}

static float *copyv(const float *x, size_t n) {
    float *p = em_malloc((n ? n : 1) * sizeof(float));
    if (n) memcpy(p, x, n * sizeof(float));
    return p;
}

static double *dvec(size_t n) { return em_calloc(n ? n : 1, sizeof(double)); }

static void to_double(double *d, const float *f, size_t n) {
    for (size_t i = 0; i < n; i++) d[i] = f[i];
}

static int same_bits(const float *a, const float *b, size_t n) { return memcmp(a, b, n * sizeof(float)) == 0; }

/* Pools of 2 and 3 workers, created once; index 0 is the NULL (1-thread) pool. */
static em_pool *pools[3];
static void nop_task(void *arg, int ith, int nth) { (void)arg, (void)ith, (void)nth; }
static void make_pools(void) {
    if (!pools[1]) {
        CHECK_OK(em_pool_create(&pools[1], 2));
        CHECK_OK(em_pool_create(&pools[2], 3));
        /* one run makes sure every worker has started (and freed its start-up
         * argument), so em_mem_in_use() is steady from here on */
        em_pool_run(pools[1], nop_task, NULL);
        em_pool_run(pools[2], nop_task, NULL);
    }
}

/* ------------------------------------------------------------------ linear */

/* out(B,O) = in @ W^T + b, in double. */
static void ref_linear(double *out, const double *in, const double *W, const double *b, int B, int I, int O) {
    for (int r = 0; r < B; r++)
        for (int o = 0; o < O; o++) {
            double s = b ? b[o] : 0.0;
            for (int i = 0; i < I; i++) s += in[(size_t)r * I + i] * W[(size_t)o * I + i];
            out[(size_t)r * O + o] = s;
        }
}

/* sum(R * linear(in, W, b)) in double: the scalar whose gradient backward(dout = R) is. */
static double lin_loss(const double *R, const double *in, const double *W, const double *b, int B, int I, int O) {
    double *out = dvec((size_t)B * O), L = 0;
    ref_linear(out, in, W, b, B, I, O);
    for (size_t k = 0; k < (size_t)B * O; k++) L += R[k] * out[k];
    em_free(out);
    return L;
}

static void check_linear_shape(int B, int I, int O, int with_bias, int with_din, int with_db) {
    em_rng r;
    em_rng_seed(&r, (uint64_t)(B * 1000003 + I * 1009 + O));
    const size_t nin = (size_t)B * I, nw = (size_t)O * I, nout = (size_t)B * O;
    float *in = randv(&r, nin, 1.f), *W = randv(&r, nw, 0.5f), *b = with_bias ? randv(&r, (size_t)O, 1.f) : NULL;
    float *dout = randv(&r, nout, 1.f);
    float *din0 = randv(&r, nin, 0.1f), *dW0 = randv(&r, nw, 0.1f), *db0 = randv(&r, (size_t)O, 0.1f);
    double *in_d = dvec(nin), *W_d = dvec(nw), *b_d = dvec((size_t)O), *dout_d = dvec(nout);
    to_double(in_d, in, nin), to_double(W_d, W, nw), to_double(dout_d, dout, nout);
    if (b) to_double(b_d, b, (size_t)O);

    /* forward vs float64 reference */
    double *ref = dvec(nout);
    ref_linear(ref, in_d, W_d, b ? b_d : NULL, B, I, O);
    float *out[3];
    for (int p = 0; p < 3; p++) {
        out[p] = randv(&r, nout, 100.f); /* garbage: forward must overwrite, not accumulate */
        em_linear_forward(out[p], in, W, b, B, I, O, pools[p]);
    }
    CHECK(rel_err_fd(out[0], ref, nout, 1e-3) < 1e-5);
    CHECK(same_bits(out[0], out[1], nout) && same_bits(out[0], out[2], nout));

    /* backward: accumulate onto non-zero gradients */
    double *rdin = dvec(nin), *rdW = dvec(nw), *rdb = dvec((size_t)O);
    for (int rr = 0; rr < B; rr++)
        for (int o = 0; o < O; o++) {
            double g = dout_d[(size_t)rr * O + o];
            rdb[o] += g;
            for (int i = 0; i < I; i++) {
                rdin[(size_t)rr * I + i] += g * W_d[(size_t)o * I + i];
                rdW[(size_t)o * I + i] += g * in_d[(size_t)rr * I + i];
            }
        }
    for (size_t k = 0; k < nin; k++) rdin[k] += din0[k];
    for (size_t k = 0; k < nw; k++) rdW[k] += dW0[k];
    for (int o = 0; o < O; o++) rdb[o] += db0[o];
    float *din[3], *dW[3], *db[3];
    for (int p = 0; p < 3; p++) {
        din[p] = copyv(din0, nin), dW[p] = copyv(dW0, nw), db[p] = copyv(db0, (size_t)O);
        em_linear_backward(with_din ? din[p] : NULL, dW[p], with_db ? db[p] : NULL, dout, in, W, B, I, O, pools[p]);
    }
    if (with_din) CHECK(rel_err_fd(din[0], rdin, nin, 1e-3) < 1e-5);
    else CHECK(same_bits(din[0], din0, nin));
    CHECK(rel_err_fd(dW[0], rdW, nw, 1e-3) < 1e-5);
    if (with_db) CHECK(rel_err_fd(db[0], rdb, (size_t)O, 1e-3) < 1e-5);
    else CHECK(same_bits(db[0], db0, (size_t)O));
    for (int p = 1; p < 3; p++) {
        CHECK(same_bits(din[0], din[p], nin));
        CHECK(same_bits(dW[0], dW[p], nw));
        CHECK(same_bits(db[0], db[p], (size_t)O));
    }

    /* finite differences of the float64 forward against the fp32 backward, a few
     * coordinates of each input (the loss is linear in each, so central differences
     * are exact up to rounding) */
    if (with_din && with_db) {
        const double h = 1e-3;
        double maxerr = 0, scale = 1e-3;
        for (int t = 0; t < 6; t++) {
            double *vars[3] = {in_d, W_d, b_d};
            const size_t lens[3] = {nin, nw, (size_t)O};
            const float *got[3] = {din[0], dW[0], db[0]}, *base[3] = {din0, dW0, db0};
            for (int v = 0; v < (with_bias ? 3 : 2); v++) {
                size_t k = (size_t)em_rng_below(&r, lens[v]);
                double keep = vars[v][k];
                vars[v][k] = keep + h;
                double lp = lin_loss(dout_d, in_d, W_d, with_bias ? b_d : NULL, B, I, O);
                vars[v][k] = keep - h;
                double lm = lin_loss(dout_d, in_d, W_d, with_bias ? b_d : NULL, B, I, O);
                vars[v][k] = keep;
                double fd = (lp - lm) / (2 * h), g = (double)got[v][k] - (double)base[v][k];
                if (fabs(fd - g) > maxerr) maxerr = fabs(fd - g);
                if (fabs(fd) > scale) scale = fabs(fd);
            }
        }
        CHECK(maxerr / scale < 1e-4);
    }

    for (int p = 0; p < 3; p++) em_free(out[p]), em_free(din[p]), em_free(dW[p]), em_free(db[p]);
    em_free(in), em_free(W), em_free(b), em_free(dout), em_free(din0), em_free(dW0), em_free(db0);
    em_free(in_d), em_free(W_d), em_free(b_d), em_free(dout_d), em_free(ref), em_free(rdin), em_free(rdW), em_free(rdb);
}

static void test_linear(void) {
    make_pools();
    size_t base = em_mem_in_use();
    /* both implementations: the AVX-512 kernels (where built) and the OpenBLAS tiles */
    for (int impl = 0; impl < 2; impl++) {
        em_linear_set_impl(impl);
        check_linear_shape(1, 1, 1, 1, 1, 1);
        check_linear_shape(3, 5, 7, 1, 1, 1);
        check_linear_shape(1, 13, 512, 1, 1, 1);
        check_linear_shape(17, 33, 9, 0, 1, 1);
        check_linear_shape(5, 1, 3, 1, 1, 1);        /* I = 1 */
        check_linear_shape(9, 64, 1, 1, 1, 1);       /* O = 1, the logit layer */
        check_linear_shape(301, 600, 1, 1, 1, 1);    /* O = 1, several column blocks */
        check_linear_shape(37, 21, 11, 1, 0, 0);     /* din, db skipped */
        check_linear_shape(600, 100, 300, 1, 1, 1);  /* several row tiles, batch chunks */
        check_linear_shape(45, 30, 700, 1, 1, 1);    /* column tiles, several db blocks */
        check_linear_shape(130, 367, 257, 1, 1, 1);  /* Kaggle-like width, odd O */
        check_linear_shape(2053, 13, 515, 1, 1, 1);  /* first layer at training batch, ragged */
        check_linear_shape(259, 70, 17, 1, 1, 1);    /* 16-wide panels plus one column */
    }
    em_linear_set_impl(0);
    CHECK(em_mem_in_use() == base);              /* the layer itself allocates nothing */
}

/* em_linear_backward_set_relu_in is backward_set followed by the ReLU mask of its
 * input, bitwise, in both implementations and for any thread count. */
static void test_linear_relu_in(void) {
    make_pools();
    const int shapes[][3] = {{300, 37, 70}, {2049, 64, 16}, {97, 256, 1}, {50, 13, 33}};
    for (int impl = 0; impl < 2; impl++) {
        em_linear_set_impl(impl);
        for (int s = 0; s < 4; s++) {
            const int B = shapes[s][0], I = shapes[s][1], O = shapes[s][2];
            em_rng r;
            em_rng_seed(&r, (uint64_t)(31 * s + impl));
            float *x = randv(&r, (size_t)B * I, 1.f), *W = randv(&r, (size_t)O * I, 0.5f), *dy = randv(&r, (size_t)B * O, 1.f);
            for (int i = 0; i < B * I; i += 3) x[i] = 0.f; /* exact zeros are masked too */
            float *dx1 = randv(&r, (size_t)B * I, 9.f), *dW1 = randv(&r, (size_t)O * I, 9.f), *db1 = randv(&r, (size_t)O, 9.f);
            em_linear_backward_set(dx1, dW1, db1, dy, x, W, B, I, O, pools[1]);
            for (int i = 0; i < B * I; i++) dx1[i] = x[i] > 0.f ? dx1[i] : 0.f;
            for (int p = 0; p < 3; p++) {
                float *dx2 = randv(&r, (size_t)B * I, 9.f), *dW2 = randv(&r, (size_t)O * I, 9.f), *db2 = randv(&r, (size_t)O, 9.f);
                em_linear_backward_set_relu_in(dx2, dW2, db2, dy, x, W, B, I, O, pools[p]);
                CHECK(same_bits(dx1, dx2, (size_t)B * I));
                CHECK(same_bits(dW1, dW2, (size_t)O * I));
                CHECK(same_bits(db1, db2, (size_t)O));
                em_free(dx2), em_free(dW2), em_free(db2);
            }
            em_free(x), em_free(W), em_free(dy), em_free(dx1), em_free(dW1), em_free(db1);
        }
    }
    em_linear_set_impl(0);
}

/* em_mlp_forward / em_mlp_backward are bitwise the layer-by-layer calls, in both
 * implementations and for any thread count (the DLRM's bottom and top shapes, odd
 * batch). */
static void test_mlp_chain(void) {
    make_pools();
    const int nl = 4, dims[2][5] = {{13, 512, 256, 64, 16}, {367, 512, 256, 1, 0}};
    const int B = 301;
    for (int impl = 0; impl < 2; impl++) {
        em_linear_set_impl(impl);
        for (int which = 0; which < 2; which++) {
            const int n = which ? 3 : nl;
            const int *d = dims[which];
            em_rng r;
            em_rng_seed(&r, (uint64_t)(7 + which));
            float *in = randv(&r, (size_t)B * d[0], 1.f), *dout = randv(&r, (size_t)B * d[n], 1.f);
            float *W[4], *b[4], *y[2][4], *dW[2][4], *db[2][4], *dx[2][4];
            for (int l = 0; l < n; l++) {
                W[l] = randv(&r, (size_t)d[l] * d[l + 1], 0.3f), b[l] = randv(&r, (size_t)d[l + 1], 0.3f);
                for (int v = 0; v < 2; v++) {
                    y[v][l] = randv(&r, (size_t)B * d[l + 1], 5.f), dW[v][l] = randv(&r, (size_t)d[l] * d[l + 1], 5.f);
                    db[v][l] = randv(&r, (size_t)d[l + 1], 5.f), dx[v][l] = randv(&r, (size_t)B * d[l], 5.f);
                }
            }
            /* layer by layer, one thread; last layer without ReLU; layer 0's din only on the top MLP */
            for (int l = 0; l < n; l++)
                (l < n - 1 ? em_linear_relu_forward : em_linear_forward)(y[0][l], l ? y[0][l - 1] : in, W[l], b[l], B, d[l],
                                                                       d[l + 1], NULL);
            for (int l = n - 1; l >= 0; l--)
                (l ? em_linear_backward_set_relu_in : em_linear_backward_set)(
                    l || which ? dx[0][l] : NULL, dW[0][l], db[0][l], l == n - 1 ? dout : dx[0][l + 1], l ? y[0][l - 1] : in,
                    W[l], B, d[l], d[l + 1], NULL);
            for (int p = 0; p < 3; p++) {
                em_mlp_layer ml[4];
                for (int l = 0; l < n; l++)
                    ml[l] = (em_mlp_layer){.I = d[l], .O = d[l + 1], .relu = l < n - 1, .W = W[l], .b = b[l], .out = y[1][l],
                                           .dW = dW[1][l], .db = db[1][l], .din = l || which ? dx[1][l] : NULL};
                em_mlp_forward(ml, n, in, B, pools[p]);
                em_mlp_backward(ml, n, in, dout, B, pools[p]);
                for (int l = 0; l < n; l++) {
                    CHECK(same_bits(y[0][l], y[1][l], (size_t)B * d[l + 1]));
                    CHECK(same_bits(dW[0][l], dW[1][l], (size_t)d[l] * d[l + 1]));
                    CHECK(same_bits(db[0][l], db[1][l], (size_t)d[l + 1]));
                    if (l || which) CHECK(same_bits(dx[0][l], dx[1][l], (size_t)B * d[l]));
                }
            }
            for (int l = 0; l < n; l++) {
                em_free(W[l]), em_free(b[l]);
                for (int v = 0; v < 2; v++) em_free(y[v][l]), em_free(dW[v][l]), em_free(db[v][l]), em_free(dx[v][l]);
            }
            em_free(in), em_free(dout);
        }
    }
    em_linear_set_impl(0);
}

static void test_linear_degenerate(void) {
    /* B = 0 touches nothing; I = 0 gives out = b and leaves dW (empty) alone */
    float out[4] = {9, 9, 9, 9}, b[2] = {1.5f, -2.f}, db[2] = {0, 0}, dout[4] = {1, 2, 3, 4};
    em_linear_forward(out, NULL, NULL, b, 0, 3, 2, NULL);
    CHECK(out[0] == 9 && out[3] == 9);
    em_linear_forward(out, NULL, NULL, b, 2, 0, 2, NULL);
    CHECK(out[0] == 1.5f && out[1] == -2.f && out[2] == 1.5f && out[3] == -2.f);
    em_linear_forward(out, NULL, NULL, NULL, 2, 0, 2, NULL);
    CHECK(out[0] == 0 && out[3] == 0);
    em_linear_backward(NULL, NULL, db, dout, NULL, NULL, 2, 0, 2, NULL);
    CHECK(db[0] == 4 && db[1] == 6);
}

/* ------------------------------------------------------------- activations */

static void test_relu(void) {
    em_rng r;
    em_rng_seed(&r, 7);
    for (size_t n = 0; n < 40; n += 3) {
        float *x = randv(&r, n, 1.f), *out = randv(&r, n, 1.f), *dout = randv(&r, n, 1.f), *din = randv(&r, n, 1.f);
        if (n > 2) x[1] = 0.f, x[2] = -0.f;
        float *din0 = copyv(din, n), *inplace = copyv(x, n);
        em_relu_forward(out, x, n);
        em_relu_forward(inplace, inplace, n);
        int ok = 1;
        for (size_t i = 0; i < n; i++) ok &= out[i] == (x[i] > 0 ? x[i] : 0.f) && out[i] == inplace[i];
        CHECK(ok);
        em_relu_backward(din, dout, out, n);
        ok = 1;
        for (size_t i = 0; i < n; i++) ok &= din[i] == din0[i] + (out[i] > 0 ? dout[i] : 0.f);
        CHECK(ok);
        em_free(x), em_free(out), em_free(dout), em_free(din), em_free(din0), em_free(inplace);
    }
    float nan_in = NAN, nan_out;
    em_relu_forward(&nan_out, &nan_in, 1);
    CHECK(isnan(nan_out)); /* like torch.relu: divergence stays visible */

    /* finite differences away from the kink: d/dx sum(R * relu(x)) */
    float x[5] = {-0.7f, -0.2f, 0.3f, 1.1f, 2.5f}, o[5], R[5] = {0.3f, -1.f, 0.5f, 2.f, -0.25f}, g[5] = {0};
    em_relu_forward(o, x, 5);
    em_relu_backward(g, R, o, 5);
    for (int i = 0; i < 5; i++) {
        const double h = 1e-3, xp = x[i] + h, xm = x[i] - h;
        double fd = R[i] * ((xp > 0 ? xp : 0) - (xm > 0 ? xm : 0)) / (2 * h);
        CHECK_NEAR(g[i], fd, 1e-6);
    }
}

static void test_sigmoid(void) {
    em_rng r;
    em_rng_seed(&r, 11);
    const size_t n = 37;
    float *x = randv(&r, n, 8.f), *out = em_malloc(n * sizeof(float)), *dout = randv(&r, n, 1.f);
    float *din = randv(&r, n, 1.f), *din0 = copyv(din, n);
    x[0] = 0.f, x[1] = 100.f, x[2] = -100.f, x[3] = 1000.f, x[4] = -1000.f, x[5] = 88.8f, x[6] = -88.8f;
    em_sigmoid_forward(out, x, n);
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double s = 1.0 / (1.0 + exp(-(double)x[i]));
        CHECK(isfinite(out[i]) && out[i] >= 0.f && out[i] <= 1.f);
        double e = fabs(out[i] - s) / (s > 1e-30 ? s : 1e-30);
        if (s > 1e-30 && e > worst) worst = e;
    }
    CHECK(worst < 1e-6); /* relative, so tiny probabilities must be accurate too */
    CHECK(out[0] == 0.5f && out[1] == 1.f && out[3] == 1.f && out[4] == 0.f);
    CHECK(out[2] > 0.f && out[2] < 1e-43f); /* e^-100 is a float denormal, not 0 */
    em_sigmoid_backward(din, dout, out, n);
    worst = 0;
    for (size_t i = 0; i < n; i++) {
        double want = (double)din0[i] + (double)dout[i] * out[i] * (1.0 - out[i]);
        if (fabs(din[i] - want) > worst) worst = fabs(din[i] - want);
    }
    CHECK(worst < 1e-6);
    /* finite differences of the float64 sigmoid vs the backward */
    for (size_t i = 7; i < 17; i++) {
        const double h = 1e-5, xi = x[i];
        double fd = dout[i] * (1 / (1 + exp(-(xi + h))) - 1 / (1 + exp(-(xi - h)))) / (2 * h);
        CHECK_NEAR((double)din[i] - din0[i], fd, 1e-5);
    }
    em_free(x), em_free(out), em_free(dout), em_free(din), em_free(din0);
}

/* ------------------------------------------------------------- interaction */

static void ref_interact(double *out, const double *bot, const double *emb, int B, int F, int D) {
    const int W = em_dot_interact_out_dim(F, D);
    for (int b = 0; b < B; b++) {
        double *o = out + (size_t)b * W;
        const double *T[F + 1];
        T[0] = bot + (size_t)b * D;
        for (int f = 0; f < F; f++) T[f + 1] = emb + ((size_t)b * F + f) * D;
        for (int d = 0; d < D; d++) o[d] = T[0][d];
        int k = D;
        for (int i = 1; i <= F; i++)
            for (int j = 0; j < i; j++) {
                double s = 0;
                for (int d = 0; d < D; d++) s += T[i][d] * T[j][d];
                o[k++] = s;
            }
    }
}

static void ref_interact_backward(double *dbot, double *demb, const double *dout, const double *bot,
                                  const double *emb, int B, int F, int D) {
    const int W = em_dot_interact_out_dim(F, D);
    for (int b = 0; b < B; b++) {
        const double *T[F + 1];
        double *dT[F + 1];
        T[0] = bot + (size_t)b * D, dT[0] = dbot + (size_t)b * D;
        for (int f = 0; f < F; f++) T[f + 1] = emb + ((size_t)b * F + f) * D, dT[f + 1] = demb + ((size_t)b * F + f) * D;
        const double *g = dout + (size_t)b * W;
        for (int d = 0; d < D; d++) dT[0][d] += g[d];
        int k = D;
        for (int i = 1; i <= F; i++)
            for (int j = 0; j < i; j++, k++)
                for (int d = 0; d < D; d++) dT[i][d] += g[k] * T[j][d], dT[j][d] += g[k] * T[i][d];
    }
}

static double inter_loss(const double *R, const double *bot, const double *emb, int B, int F, int D) {
    const size_t n = (size_t)B * em_dot_interact_out_dim(F, D);
    double *out = dvec(n), L = 0;
    ref_interact(out, bot, emb, B, F, D);
    for (size_t k = 0; k < n; k++) L += R[k] * out[k];
    em_free(out);
    return L;
}

static void check_interact_shape(int B, int F, int D) {
    em_rng r;
    em_rng_seed(&r, (uint64_t)(B * 7919 + F * 131 + D));
    const int W = em_dot_interact_out_dim(F, D);
    const size_t nb = (size_t)B * D, ne = (size_t)B * F * D, no = (size_t)B * W;
    float *bot = randv(&r, nb, 1.f), *emb = randv(&r, ne, 1.f), *dout = randv(&r, no, 1.f);
    float *dbot0 = randv(&r, nb, 0.1f), *demb0 = randv(&r, ne, 0.1f);
    double *bot_d = dvec(nb), *emb_d = dvec(ne), *dout_d = dvec(no), *ref = dvec(no);
    to_double(bot_d, bot, nb), to_double(emb_d, emb, ne), to_double(dout_d, dout, no);
    ref_interact(ref, bot_d, emb_d, B, F, D);
    float *out[3], *dbot[3], *demb[3];
    for (int p = 0; p < 3; p++) {
        out[p] = randv(&r, no, 100.f);
        em_dot_interact_forward(out[p], bot, emb, B, F, D, pools[p]);
        dbot[p] = copyv(dbot0, nb), demb[p] = copyv(demb0, ne);
        em_dot_interact_backward(dbot[p], demb[p], dout, bot, emb, B, F, D, pools[p]);
    }
    CHECK(rel_err_fd(out[0], ref, no, 1e-3) < 1e-6);
    double *rdbot = dvec(nb), *rdemb = dvec(ne);
    to_double(rdbot, dbot0, nb), to_double(rdemb, demb0, ne);
    ref_interact_backward(rdbot, rdemb, dout_d, bot_d, emb_d, B, F, D);
    CHECK(rel_err_fd(dbot[0], rdbot, nb, 1e-3) < 1e-6);
    if (F > 0) CHECK(rel_err_fd(demb[0], rdemb, ne, 1e-3) < 1e-6);
    for (int p = 1; p < 3; p++) {
        CHECK(same_bits(out[0], out[p], no));
        CHECK(same_bits(dbot[0], dbot[p], nb));
        CHECK(same_bits(demb[0], demb[p], ne));
    }
    { /* the overwriting variant: the accumulating one's result on zeroed gradients */
        float *zb = calloc(nb ? nb : 1, sizeof(float)), *ze = calloc(ne ? ne : 1, sizeof(float));
        float *sb = randv(&r, nb, 50.f), *se = randv(&r, ne, 50.f);
        em_dot_interact_backward(zb, ze, dout, bot, emb, B, F, D, pools[1]);
        em_dot_interact_backward_set(sb, se, dout, bot, emb, B, F, D, pools[2]);
        CHECK(same_bits(zb, sb, nb));
        CHECK(same_bits(ze, se, ne));
        free(zb), free(ze), em_free(sb), em_free(se);
    }
    /* finite differences of the float64 forward (a quadratic: central differences are
     * exact up to rounding) against the fp32 backward */
    const double h = 1e-3;
    double maxerr = 0, scale = 1e-3;
    for (int t = 0; t < 8; t++) {
        int in_emb = F > 0 && (t & 1);
        double *v = in_emb ? emb_d : bot_d;
        size_t k = (size_t)em_rng_below(&r, in_emb ? ne : nb);
        double keep = v[k];
        v[k] = keep + h;
        double lp = inter_loss(dout_d, bot_d, emb_d, B, F, D);
        v[k] = keep - h;
        double lm = inter_loss(dout_d, bot_d, emb_d, B, F, D);
        v[k] = keep;
        double fd = (lp - lm) / (2 * h);
        double g = in_emb ? (double)demb[0][k] - demb0[k] : (double)dbot[0][k] - dbot0[k];
        if (fabs(fd - g) > maxerr) maxerr = fabs(fd - g);
        if (fabs(fd) > scale) scale = fabs(fd);
    }
    CHECK(maxerr / scale < 1e-5);
    for (int p = 0; p < 3; p++) em_free(out[p]), em_free(dbot[p]), em_free(demb[p]);
    em_free(bot), em_free(emb), em_free(dout), em_free(dbot0), em_free(demb0);
    em_free(bot_d), em_free(emb_d), em_free(dout_d), em_free(ref), em_free(rdbot), em_free(rdemb);
}

static void test_interact_order(void) {
    /* F = 2, D = 1: T = [x, e0, e1] -> [x, e0 x, e1 x, e1 e0] (torch.tril_indices(3, 3, -1)) */
    float bot[1] = {2.f}, emb[2] = {3.f, 5.f}, out[4];
    CHECK(em_dot_interact_out_dim(2, 1) == 4 && em_dot_interact_out_dim(26, 16) == 367 &&
          em_dot_interact_out_dim(26, 64) == 415);
    em_dot_interact_forward(out, bot, emb, 1, 2, 1, NULL);
    CHECK(out[0] == 2.f && out[1] == 6.f && out[2] == 10.f && out[3] == 15.f);
    /* backward of dZ = e_(1,0): d x += e0, d e0 += x; plus dout[:, :D] into dbot */
    float dout[4] = {0.5f, 1.f, 0.f, 0.f}, dbot[1] = {0}, demb[2] = {0};
    em_dot_interact_backward(dbot, demb, dout, bot, emb, 1, 2, 1, NULL);
    CHECK(dbot[0] == 3.5f && demb[0] == 2.f && demb[1] == 0.f);
}

static void test_interact(void) {
    make_pools();
    size_t base = em_mem_in_use();
    check_interact_shape(1, 1, 1);
    check_interact_shape(3, 26, 16);   /* Kaggle: width 367 */
    check_interact_shape(5, 3, 7);     /* D < 16, not a multiple of 8 */
    check_interact_shape(4, 26, 64);   /* width 415 */
    check_interact_shape(2, 5, 20);    /* one 16-column tile + a 4-column remainder */
    check_interact_shape(7, 4, 33);
    check_interact_shape(3, 0, 8);     /* no embeddings: out = bottom */
    check_interact_shape(2, 130, 16);  /* S too large for the stack: the plain path */
    check_interact_shape(37, 26, 16);  /* batch split unevenly over 2 and 3 workers */
    CHECK(em_mem_in_use() == base);
}

/* ---------------------------------------------------------------------- BCE */

static void test_bce(void) {
    em_rng r;
    em_rng_seed(&r, 5);
    const size_t n = 29;
    float *z = randv(&r, n, 6.f), *y = em_malloc(n * sizeof(float)), *dz = randv(&r, n, 1.f), *dz0 = copyv(dz, n);
    for (size_t i = 0; i < n; i++) y[i] = em_rng_uniform(&r) < 0.5 ? 0.f : 1.f;
    y[3] = 0.3f; /* soft labels are allowed */
    double want = 0;
    for (size_t i = 0; i < n; i++) {
        double s = 1 / (1 + exp(-(double)z[i]));
        want += -(y[i] * log(s) + (1 - y[i]) * log1p(-s));
    }
    want /= (double)n;
    CHECK_NEAR(em_bce_logits_forward(z, y, n), want, 1e-12 * fabs(want) + 1e-15);
    const float scale = 1.f / (float)n;
    em_bce_logits_backward(dz, z, y, n, scale);
    for (size_t i = 0; i < n; i++) {
        double s = 1 / (1 + exp(-(double)z[i]));
        CHECK_NEAR(dz[i], dz0[i] + scale * (s - y[i]), 1e-7);
    }
    /* finite differences of the (double) forward against the backward */
    for (size_t i = 0; i < 6; i++) {
        float zp[1] = {z[i] + 1e-2f}, zm[1] = {z[i] - 1e-2f}, g[1] = {0};
        double fd = (em_bce_logits_forward(zp, y + i, 1) - em_bce_logits_forward(zm, y + i, 1)) /
                    ((double)zp[0] - (double)zm[0]);
        em_bce_logits_backward(g, z + i, y + i, 1, 1.f);
        CHECK_NEAR(g[0], fd, 1e-4);
    }
    /* extreme logits: finite and exact */
    float ze[4] = {100.f, -100.f, 1000.f, -1000.f}, ye[4] = {0.f, 1.f, 1.f, 0.f}, ge[4] = {0};
    double le = em_bce_logits_forward(ze, ye, 4);
    CHECK(isfinite(le));
    CHECK_NEAR(le, (100.0 + 100.0) / 4.0, 1e-9);
    em_bce_logits_backward(ge, ze, ye, 4, 1.f);
    CHECK(ge[0] == 1.f && ge[1] == -1.f && ge[2] == 0.f && ge[3] == 0.f);
    CHECK(em_bce_logits_forward(z, y, 0) == 0.0);
    em_free(z), em_free(y), em_free(dz), em_free(dz0);
}

static void test_cleanup(void) {
    em_pool_free(pools[1]), em_pool_free(pools[2]);
    pools[1] = pools[2] = NULL;
}

/* The fused linear + ReLU and the overwrite-mode backward are bitwise the plain
 * kernels composed (relu after forward; accumulate into zeros). */
static void test_linear_fused_variants(void) {
    const int B = 300, I = 37, O = 70;
    em_rng r;
    em_rng_seed(&r, 77);
    float *x = malloc(sizeof(float) * B * I), *W = malloc(sizeof(float) * O * I), *b = malloc(sizeof(float) * O);
    float *y1 = malloc(sizeof(float) * B * O), *y2 = malloc(sizeof(float) * B * O), *dy = malloc(sizeof(float) * B * O);
    float *dx1 = calloc((size_t)B * I, sizeof(float)), *dx2 = malloc(sizeof(float) * B * I);
    float *dW1 = calloc((size_t)O * I, sizeof(float)), *dW2 = malloc(sizeof(float) * O * I);
    float *db1 = calloc((size_t)O, sizeof(float)), *db2 = malloc(sizeof(float) * O);
    for (int i = 0; i < B * I; i++) x[i] = (float)em_rng_normal(&r);
    for (int i = 0; i < O * I; i++) W[i] = (float)em_rng_normal(&r);
    for (int i = 0; i < O; i++) b[i] = (float)em_rng_normal(&r);
    for (int i = 0; i < B * O; i++) dy[i] = (float)em_rng_normal(&r);
    for (int i = 0; i < O * I; i++) dW2[i] = 123.f; /* garbage: must be overwritten */
    for (int i = 0; i < B * I; i++) dx2[i] = -5.f;
    for (int i = 0; i < O; i++) db2[i] = 9.f;
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    em_linear_forward(y1, x, W, b, B, I, O, pool);
    em_relu_forward(y1, y1, (size_t)B * O);
    em_linear_relu_forward(y2, x, W, b, B, I, O, pool);
    CHECK(memcmp(y1, y2, sizeof(float) * B * O) == 0);
    em_linear_backward(dx1, dW1, db1, dy, x, W, B, I, O, pool);
    em_linear_backward_set(dx2, dW2, db2, dy, x, W, B, I, O, pool);
    CHECK(memcmp(dx1, dx2, sizeof(float) * B * I) == 0);
    CHECK(memcmp(dW1, dW2, sizeof(float) * O * I) == 0);
    CHECK(memcmp(db1, db2, sizeof(float) * O) == 0);
    em_pool_free(pool);
    free(x), free(W), free(b), free(y1), free(y2), free(dy), free(dx1), free(dx2), free(dW1), free(dW2), free(db1), free(db2);
}

TEST_MAIN({"linear", test_linear}, {"linear_relu_in", test_linear_relu_in}, {"mlp_chain", test_mlp_chain}, {"linear_fused_variants", test_linear_fused_variants}, {"linear_degenerate", test_linear_degenerate}, {"relu", test_relu},
          {"sigmoid", test_sigmoid}, {"interact_order", test_interact_order}, {"interact", test_interact},
          {"bce", test_bce}, {"cleanup", test_cleanup})
