/*
 * test_sparse_fiited.c - FIITED tables (ember/fiited.h): prefix property and budget
 * after pruning, LIFO slot reuse, zero reads for pruned dims, forward/backward against
 * a float64 masked dense reference for the three optimizers, compaction (values and
 * hash intact, pages released, RSS drop on a 1M x 64 table), thread-count
 * independence, checkpoint round trip, allocation-failure injection.
 */
#include <unistd.h>

#include "ember/fiited.h"
#include "test.h"

static em_optim_cfg opt_of(em_optim_kind k) {
    em_optim_cfg o = em_optim_default(k, 0.05f);
    o.eps = 1e-6f;
    o.init_accum = 0.1f;
    return o;
}

/* A random table-batched batch: bags of 0..maxlen indices (repeats likely). */
typedef struct {
    int B, T;
    int64_t *idx, *off;
    float *pw, *dout;
    size_t nnz;
} batch;

static void make_batch(batch *b, int T, int B, const int64_t *rows, int D, int maxlen, uint64_t seed) {
    em_rng r;
    em_rng_seed(&r, seed);
    b->B = B, b->T = T;
    b->off = malloc(((size_t)T * B + 1) * sizeof(int64_t));
    b->off[0] = 0;
    for (int u = 0; u < T * B; u++) b->off[u + 1] = b->off[u] + (int64_t)em_rng_below(&r, (uint64_t)maxlen + 1);
    b->nnz = (size_t)b->off[T * B];
    b->idx = malloc((b->nnz + 1) * sizeof(int64_t));
    b->pw = malloc((b->nnz + 1) * sizeof(float));
    for (int u = 0; u < T * B; u++)
        for (int64_t k = b->off[u]; k < b->off[u + 1]; k++) {
            int64_t R = rows[u / B];
            b->idx[k] = (int64_t)em_rng_below(&r, (uint64_t)(R < 12 ? R : 12)); /* hot rows: repeats */
            if (em_rng_below(&r, 3) == 0) b->idx[k] = (int64_t)em_rng_below(&r, (uint64_t)R);
            b->pw[k] = (float)(0.5 + em_rng_uniform(&r));
        }
    b->dout = malloc((size_t)B * T * D * sizeof(float));
    for (size_t i = 0; i < (size_t)B * T * D; i++) b->dout[i] = (float)(em_rng_uniform(&r) - 0.5);
}

static void free_batch(batch *b) { free(b->idx), free(b->off), free(b->pw), free(b->dout); }

/* Every row: chunk j has a slot iff j < live, and the slots are distinct. */
static void check_prefix(em_fiited *f) {
    int K = em_fiited_chunks(f);
    em_fiited_stats s = em_fiited_get_stats(f, -1);
    char *seen = calloc((size_t)s.slots + 1, 1);
    int bad = 0;
    for (int t = 0; t < em_fiited_num_tables(f); t++)
        for (int64_t r = 0; r < em_fiited_rows(f, t); r++) {
            int c = em_fiited_live(f, t, r);
            for (int j = 0; j < K; j++) {
                int64_t sl = em_fiited_slot(f, t, r, j);
                if ((sl >= 0) != (j < c)) bad++;
                if (sl >= 0) {
                    if (sl >= s.slots || seen[sl]) bad++;
                    else seen[sl] = 1;
                }
            }
        }
    CHECK(bad == 0);
    free(seen);
}

static void train_steps(em_fiited *f, int nsteps, int B, int maxlen, uint64_t seed, em_pool *pool) {
    int T = em_fiited_num_tables(f), D = em_fiited_dim(f);
    int64_t rows[8];
    for (int t = 0; t < T; t++) rows[t] = em_fiited_rows(f, t);
    float *out = malloc((size_t)B * T * D * sizeof(float));
    for (int s = 0; s < nsteps; s++) {
        batch b;
        make_batch(&b, T, B, rows, D, maxlen, seed + (uint64_t)s);
        CHECK_OK(em_fiited_forward(f, out, b.idx, b.off, b.pw, B, pool));
        CHECK_OK(em_fiited_backward_update(f, b.dout, b.idx, b.off, b.pw, NULL, B, pool));
        free_batch(&b);
    }
    free(out);
}

static void test_prune_prefix_budget(void) {
    int64_t rows[2] = {50, 37};
    em_fiited_cfg c = em_fiited_default(2, rows, 16, 4, opt_of(EM_OPT_ROWWISE_ADAGRAD));
    c.page_bytes = 64 << 10;
    em_fiited *f;
    CHECK_OK(em_fiited_create(&f, &c));
    const int64_t M = (50 + 37) * 4;
    CHECK(em_fiited_get_stats(f, -1).live_chunks == M);
    double fr[] = {0.5, 0.3, 0.1, 0.6, 0.0, 1.0, 0.25};
    for (int i = 0; i < 7; i++) {
        train_steps(f, 3, 8, 4, 100 + (uint64_t)i * 10, NULL);
        CHECK_OK(em_fiited_prune(f, 0, fr[i], NULL));
        check_prefix(f);
        em_fiited_stats s = em_fiited_get_stats(f, -1);
        int64_t N = fr[i] > 0 ? (int64_t)floor(fr[i] * (double)M) : M;
        CHECK(s.live_chunks == N); /* exactly the budget (never more) */
        CHECK(s.live_chunks == em_fiited_get_stats(f, 0).live_chunks + em_fiited_get_stats(f, 1).live_chunks);
        /* the kept set follows the rule: every live chunk's prefix-min utility >= theta of
         * its position, every pruned one at most it */
        for (int t = 0; t < 2; t++)
            for (int64_t r = 0; r < rows[t]; r++) {
                float p = INFINITY;
                int c0 = em_fiited_live(f, t, r);
                for (int j = 0; j < 4; j++) {
                    float u = em_fiited_utility(f, t, r, j);
                    p = u < p ? u : p;
                    if (j < c0 && s.threshold[j] > 0) CHECK(p >= s.threshold[j]);
                }
            }
    }
    /* byte budget */
    size_t sb = em_fiited_slot_bytes(f);
    CHECK(sb == (16 / 4 + 1) * sizeof(float));
    CHECK_OK(em_fiited_prune(f, 100 * sb + 3, 0, NULL));
    CHECK(em_fiited_get_stats(f, -1).live_chunks == 100);
    check_prefix(f);
    em_fiited_free(f);
}

static void test_lifo_reuse(void) {
    int64_t rows[1] = {10};
    em_fiited_cfg c = em_fiited_default(1, rows, 8, 4, opt_of(EM_OPT_SGD));
    c.page_bytes = 64 << 10;
    em_fiited *f;
    CHECK_OK(em_fiited_create(&f, &c));
    /* creation allocates fresh slots in (row, chunk) order */
    CHECK(em_fiited_slot(f, 0, 3, 2) == 3 * 4 + 2);
    int64_t a1 = em_fiited_slot(f, 0, 2, 1), a2 = em_fiited_slot(f, 0, 2, 2), a3 = em_fiited_slot(f, 0, 2, 3);
    int64_t b2 = em_fiited_slot(f, 0, 5, 2), b3 = em_fiited_slot(f, 0, 5, 3);
    CHECK_OK(em_fiited_set_live(f, 0, 2, 1)); /* pushes a3, a2, a1 */
    CHECK_OK(em_fiited_set_live(f, 0, 5, 2)); /* pushes b3, b2 */
    CHECK(em_fiited_live(f, 0, 2) == 1 && em_fiited_slot(f, 0, 2, 1) == -1);
    CHECK_OK(em_fiited_set_live(f, 0, 2, 3)); /* chunks 1, 2 pop b2, b3 */
    CHECK(em_fiited_slot(f, 0, 2, 1) == b2 && em_fiited_slot(f, 0, 2, 2) == b3);
    CHECK_OK(em_fiited_set_live(f, 0, 2, 4)); /* pops a1 */
    CHECK(em_fiited_slot(f, 0, 2, 3) == a1);
    CHECK_OK(em_fiited_set_live(f, 0, 5, 4)); /* pops a2, then a3 */
    CHECK(em_fiited_slot(f, 0, 5, 2) == a2 && em_fiited_slot(f, 0, 5, 3) == a3);
    CHECK_OK(em_fiited_set_live(f, 0, 7, 4)); /* full: nothing changes */
    CHECK(em_fiited_get_stats(f, -1).free_slots == em_fiited_get_stats(f, -1).slots - 40);
    check_prefix(f);
    CHECK(em_fiited_set_live(f, 0, 10, 1) == EM_ERR_INVALID);
    CHECK(em_fiited_set_live(f, 0, 1, 5) == EM_ERR_INVALID);
    em_fiited_free(f);
}

/* Dense float64 mirror of a table with pruned dims masked. */
typedef struct {
    double *w, *s; /* rows x D; state rows x D (AdaGrad) or rows (row-wise) */
    int *live;
} dref;

static void test_reference(void) {
    em_optim_kind kinds[3] = {EM_OPT_SGD, EM_OPT_ADAGRAD, EM_OPT_ROWWISE_ADAGRAD};
    for (int ki = 0; ki < 3; ki++)
        for (int pm = 0; pm < 2; pm++) {
            const int T = 2, D = 12, K = 3, Dc = 4, B = 6;
            int64_t rows[2] = {20, 9};
            em_fiited_cfg c = em_fiited_default(T, rows, D, K, opt_of(kinds[ki]));
            c.pooling = pm ? EM_POOL_MEAN : EM_POOL_SUM;
            c.init_scale = 0.5f;
            em_fiited *f;
            CHECK_OK(em_fiited_create(&f, &c));
            /* an irregular pruning */
            for (int t = 0; t < T; t++)
                for (int64_t r = 0; r < rows[t]; r++) CHECK_OK(em_fiited_set_live(f, t, r, (int)((r * 7 + t) % (K + 1))));
            em_fiited_compact(f);
            dref ref[2];
            for (int t = 0; t < T; t++) {
                ref[t].w = calloc((size_t)rows[t] * D, sizeof(double));
                ref[t].s = calloc((size_t)rows[t] * D, sizeof(double));
                ref[t].live = calloc((size_t)rows[t], sizeof(int));
                float row[12];
                for (int64_t r = 0; r < rows[t]; r++) {
                    em_fiited_read_row(f, t, r, row);
                    int cl = ref[t].live[r] = em_fiited_live(f, t, r);
                    for (int d = 0; d < D; d++) {
                        if (d >= cl * Dc) CHECK(row[d] == 0.f); /* zero reads */
                        ref[t].w[r * D + d] = row[d];
                        ref[t].s[r * D + d] = 0.1;
                    }
                }
            }
            for (int step = 0; step < 3; step++) {
                batch b;
                make_batch(&b, T, B, rows, D, 5, 7 + (uint64_t)step);
                float *out = malloc((size_t)B * T * D * sizeof(float));
                float *dpw = calloc(b.nnz + 1, sizeof(float));
                CHECK_OK(em_fiited_forward(f, out, b.idx, b.off, b.pw, B, NULL));
                double *go = calloc((size_t)B * T * D, sizeof(double));
                double max_fw = 0, max_dp = 0;
                for (int t = 0; t < T; t++) {
                    double *g = calloc((size_t)rows[t] * D, sizeof(double));
                    for (int bb = 0; bb < B; bb++) {
                        int64_t k0 = b.off[t * B + bb], k1 = b.off[t * B + bb + 1];
                        double inv = pm && k1 > k0 ? 1.0 / (double)(k1 - k0) : 1.0;
                        const float *dd = b.dout + ((size_t)bb * T + t) * D;
                        for (int d = 0; d < D; d++) {
                            double acc = 0;
                            for (int64_t k = k0; k < k1; k++) acc += b.pw[k] * ref[t].w[b.idx[k] * D + d];
                            double e = fabs(acc * inv - out[((size_t)bb * T + t) * D + d]);
                            if (e > max_fw) max_fw = e;
                        }
                        for (int64_t k = k0; k < k1; k++) {
                            double dp = 0;
                            for (int d = 0; d < D; d++) {
                                g[b.idx[k] * D + d] += b.pw[k] * inv * dd[d];
                                dp += inv * dd[d] * ref[t].w[b.idx[k] * D + d];
                            }
                            go[k] = dp;
                        }
                    }
                    for (int64_t r = 0; r < rows[t]; r++) {
                        int any = 0;
                        for (int64_t k = b.off[t * B]; k < b.off[(t + 1) * B]; k++) any |= b.idx[k] == r;
                        if (!any) continue;
                        int cl = ref[t].live[r];
                        double *w = ref[t].w + r * D, *gr = g + r * D;
                        if (kinds[ki] == EM_OPT_SGD) {
                            for (int d = 0; d < cl * Dc; d++) w[d] -= 0.05 * gr[d];
                        } else if (kinds[ki] == EM_OPT_ADAGRAD) {
                            for (int d = 0; d < cl * Dc; d++) {
                                ref[t].s[r * D + d] += gr[d] * gr[d];
                                w[d] -= 0.05 * gr[d] / (sqrt(ref[t].s[r * D + d]) + 1e-6);
                            }
                        } else if (cl > 0) {
                            double ss = 0;
                            for (int d = 0; d < cl * Dc; d++) ss += gr[d] * gr[d];
                            ref[t].s[r * D] += ss / (cl * Dc);
                            for (int d = 0; d < cl * Dc; d++) w[d] -= 0.05 * gr[d] / (sqrt(ref[t].s[r * D]) + 1e-6);
                        }
                    }
                    free(g);
                }
                CHECK(max_fw < 1e-5);
                CHECK_OK(em_fiited_backward_update(f, b.dout, b.idx, b.off, b.pw, dpw, B, NULL));
                for (size_t k = 0; k < b.nnz; k++) {
                    double e = fabs(go[k] - dpw[k]);
                    if (e > max_dp) max_dp = e;
                }
                CHECK(max_dp < 1e-5);
                double max_w = 0;
                for (int t = 0; t < T; t++) {
                    float row[12];
                    for (int64_t r = 0; r < rows[t]; r++) {
                        em_fiited_read_row(f, t, r, row);
                        for (int d = 0; d < D; d++) {
                            double e = fabs(row[d] - ref[t].w[r * D + d]);
                            if (e > max_w) max_w = e;
                        }
                    }
                }
                CHECK(max_w < 1e-5);
                free(go), free(out), free(dpw);
                free_batch(&b);
            }
            /* a touched, fully pruned row still earned utility on its pruned chunks */
            int found = 0;
            for (int64_t r = 0; r < rows[0] && !found; r++)
                if (em_fiited_live(f, 0, r) == 0 && em_fiited_utility(f, 0, r, 1) > 0) found = 1;
            CHECK(found);
            for (int t = 0; t < T; t++) free(ref[t].w), free(ref[t].s), free(ref[t].live);
            em_fiited_free(f);
        }
}

static void test_compaction(void) {
    int64_t rows[2] = {3000, 1000};
    em_fiited_cfg c = em_fiited_default(2, rows, 32, 4, opt_of(EM_OPT_ADAGRAD));
    c.page_bytes = 64 << 10;
    em_fiited *f;
    CHECK_OK(em_fiited_create(&f, &c));
    train_steps(f, 2, 16, 6, 55, NULL);
    em_fiited_stats s0 = em_fiited_get_stats(f, -1);
    /* holes everywhere: prune odd rows to 1 chunk and every 3rd to 0 */
    for (int t = 0; t < 2; t++)
        for (int64_t r = 0; r < rows[t]; r++)
            if (r % 3 == 0) CHECK_OK(em_fiited_set_live(f, t, r, 0));
            else if (r % 2) CHECK_OK(em_fiited_set_live(f, t, r, 1));
    CHECK(em_fiited_get_stats(f, -1).pages == s0.pages); /* set_live does not compact */
    /* snapshot every live chunk (weights + state) */
    int64_t L = em_fiited_get_stats(f, -1).live_chunks;
    float *snap = malloc((size_t)L * 16 * sizeof(float));
    size_t i = 0;
    for (int t = 0; t < 2; t++)
        for (int64_t r = 0; r < rows[t]; r++)
            for (int j = 0; j < em_fiited_live(f, t, r); j++, i++) {
                float *st, *w = em_fiited_chunk(f, t, r, j, &st);
                memcpy(snap + i * 16, w, 8 * sizeof(float)), memcpy(snap + i * 16 + 8, st, 8 * sizeof(float));
            }
    em_fiited_compact(f);
    em_fiited_stats s1 = em_fiited_get_stats(f, -1);
    CHECK(s1.pages < s0.pages && s1.pool_bytes < s0.pool_bytes && s1.held_bytes < s0.held_bytes);
    CHECK(s1.pages == (L + s1.slots / s1.pages - 1) / (s1.slots / s1.pages));
    i = 0;
    int bad = 0;
    for (int t = 0; t < 2; t++)
        for (int64_t r = 0; r < rows[t]; r++)
            for (int j = 0; j < em_fiited_live(f, t, r); j++, i++) {
                float *st, *w = em_fiited_chunk(f, t, r, j, &st);
                bad += memcmp(snap + i * 16, w, 8 * sizeof(float)) != 0;
                bad += memcmp(snap + i * 16 + 8, st, 8 * sizeof(float)) != 0;
                bad += em_fiited_slot(f, t, r, j) >= L; /* dense: live slots are [0, L) */
            }
    CHECK(bad == 0);
    check_prefix(f);
    /* the table still trains and regrows after compaction */
    train_steps(f, 2, 16, 6, 77, NULL);
    CHECK_OK(em_fiited_prune(f, 0, 0.9, NULL));
    CHECK(em_fiited_get_stats(f, -1).live_chunks == (int64_t)floor(0.9 * 16000));
    check_prefix(f);
    free(snap);
    em_fiited_free(f);
}

static long rss_bytes(void) {
    FILE *fp = fopen("/proc/self/statm", "r");
    long size = 0, res = 0;
    if (!fp) return -1;
    if (fscanf(fp, "%ld %ld", &size, &res) != 2) res = -1;
    fclose(fp);
    return res < 0 ? -1 : res * sysconf(_SC_PAGESIZE);
}

static void test_rss_drop(void) {
    int64_t rows[1] = {1000000};
    em_fiited_cfg c = em_fiited_default(1, rows, 64, 4, opt_of(EM_OPT_SGD));
    em_fiited *f;
    double t0 = em_now();
    CHECK_OK(em_fiited_create(&f, &c));
    double t1 = em_now();
    em_fiited_stats s0 = em_fiited_get_stats(f, -1);
    long r0 = rss_bytes();
    CHECK_OK(em_fiited_prune(f, 0, 0.10, NULL));
    double t2 = em_now();
    em_fiited_stats s1 = em_fiited_get_stats(f, -1);
    long r1 = rss_bytes();
    CHECK(s1.live_chunks == 400000);
    CHECK(s1.pool_bytes * 8 < s0.pool_bytes);
#ifdef __SANITIZE_ADDRESS__
    const long want = 50l << 20; /* ASan keeps freed scratch in quarantine */
#else
    const long want = 200l << 20; /* 220 MiB of pages are unmapped */
#endif
    CHECK(r0 > 0 && r1 > 0 && r0 - r1 > want);
    fprintf(stderr, "  1M x 64, k=4, sgd, pruned to 10%%: held %.1f -> %.1f MiB (pool %.1f -> %.1f), RSS %.1f -> %.1f MiB;"
                    " create %.2f s, prune+compact %.2f s\n",
            s0.held_bytes / 1048576.0, s1.held_bytes / 1048576.0, s0.pool_bytes / 1048576.0,
            s1.pool_bytes / 1048576.0, r0 / 1048576.0, r1 / 1048576.0, t1 - t0, t2 - t1);
    em_fiited_free(f);
}

/* Run a fixed training + pruning script and return a digest of everything. */
static void run_script(em_pool *pool, float *outs, float *rowsout) {
    int64_t rows[3] = {300, 40, 1000};
    em_fiited_cfg c = em_fiited_default(3, rows, 16, 4, opt_of(EM_OPT_ROWWISE_ADAGRAD));
    c.pooling = EM_POOL_MEAN;
    c.page_bytes = 64 << 10;
    em_fiited *f;
    CHECK_OK(em_fiited_create(&f, &c));
    const int B = 32;
    for (int s = 0; s < 6; s++) {
        batch b;
        make_batch(&b, 3, B, rows, 16, 7, 900 + (uint64_t)s);
        CHECK_OK(em_fiited_forward(f, outs + (size_t)s * B * 3 * 16, b.idx, b.off, b.pw, B, pool));
        CHECK_OK(em_fiited_backward_update(f, b.dout, b.idx, b.off, b.pw, NULL, B, pool));
        if (s % 2 == 1) CHECK_OK(em_fiited_prune(f, 0, s == 3 ? 0.6 : 0.2, pool));
        free_batch(&b);
    }
    size_t i = 0;
    for (int t = 0; t < 3; t++)
        for (int64_t r = 0; r < rows[t]; r++, i++) em_fiited_read_row(f, t, r, rowsout + i * 16);
    em_fiited_free(f);
}

static void test_threads_bitwise(void) {
    const size_t no = 6 * 32 * 3 * 16, nr = 1340 * 16;
    float *o[3], *w[3];
    for (int n = 1; n <= 3; n++) {
        em_pool *pool;
        CHECK_OK(em_pool_create(&pool, n));
        o[n - 1] = malloc(no * sizeof(float)), w[n - 1] = malloc(nr * sizeof(float));
        run_script(pool, o[n - 1], w[n - 1]);
        em_pool_free(pool);
    }
    for (int n = 1; n < 3; n++) {
        CHECK(memcmp(o[0], o[n], no * sizeof(float)) == 0);
        CHECK(memcmp(w[0], w[n], nr * sizeof(float)) == 0);
    }
    for (int n = 0; n < 3; n++) free(o[n]), free(w[n]);
}

static void tmp_path(char *buf, size_t cap, const char *name) {
    snprintf(buf, cap, "/tmp/em_fiited_test_%d_%s.safetensors", (int)getpid(), name);
}

static void test_checkpoint(void) {
    em_optim_kind kinds[3] = {EM_OPT_SGD, EM_OPT_ADAGRAD, EM_OPT_ROWWISE_ADAGRAD};
    for (int ki = 0; ki < 3; ki++) {
        int64_t rows[2] = {200, 30};
        em_fiited_cfg c = em_fiited_default(2, rows, 16, 4, opt_of(kinds[ki]));
        c.page_bytes = 64 << 10;
        em_fiited *f, *g;
        CHECK_OK(em_fiited_create(&f, &c));
        train_steps(f, 3, 16, 5, 31, NULL);
        CHECK_OK(em_fiited_prune(f, 0, 0.35, NULL));
        train_steps(f, 2, 16, 5, 41, NULL);
        char path[256];
        tmp_path(path, sizeof path, "rt");
        CHECK_OK(em_fiited_save(f, path));
        c.seed = 99; /* different initial content: everything must come from the file */
        CHECK_OK(em_fiited_create(&g, &c));
        CHECK_OK(em_fiited_load(g, path));
        CHECK(em_fiited_step(g) == em_fiited_step(f));
        int bad = 0;
        for (int t = 0; t < 2; t++)
            for (int64_t r = 0; r < rows[t]; r++) {
                bad += em_fiited_live(f, t, r) != em_fiited_live(g, t, r);
                for (int j = 0; j < 4; j++) {
                    float u1 = em_fiited_utility(f, t, r, j), u2 = em_fiited_utility(g, t, r, j);
                    bad += memcmp(&u1, &u2, 4) != 0;
                    float *s1, *s2, *w1 = em_fiited_chunk(f, t, r, j, &s1), *w2 = em_fiited_chunk(g, t, r, j, &s2);
                    if (!w1 || !w2) {
                        bad += (w1 != NULL) != (w2 != NULL);
                        continue;
                    }
                    bad += memcmp(w1, w2, 4 * sizeof(float)) != 0;
                    if (s1) bad += memcmp(s1, s2, (ki == 1 ? 4 : 1) * sizeof(float)) != 0;
                }
            }
        CHECK(bad == 0);
        check_prefix(g);
        /* both continue identically: the same outputs after training, and a prune makes
         * the same decisions (regrown chunks differ by design: their content comes from
         * the config's seed, which is not part of a checkpoint) */
        float *o1 = malloc(16 * 2 * 16 * sizeof(float)), *o2 = malloc(16 * 2 * 16 * sizeof(float));
        train_steps(f, 2, 16, 5, 51, NULL);
        train_steps(g, 2, 16, 5, 51, NULL);
        batch b;
        make_batch(&b, 2, 16, rows, 16, 5, 61);
        CHECK_OK(em_fiited_forward(f, o1, b.idx, b.off, NULL, 16, NULL));
        CHECK_OK(em_fiited_forward(g, o2, b.idx, b.off, NULL, 16, NULL));
        CHECK(memcmp(o1, o2, 16 * 2 * 16 * sizeof(float)) == 0);
        free_batch(&b);
        CHECK_OK(em_fiited_prune(f, 0, 0.15, NULL));
        CHECK_OK(em_fiited_prune(g, 0, 0.15, NULL));
        bad = 0;
        for (int t = 0; t < 2; t++)
            for (int64_t r = 0; r < rows[t]; r++) bad += em_fiited_live(f, t, r) != em_fiited_live(g, t, r);
        CHECK(bad == 0);
        free(o1), free(o2);
        /* mismatched config: refused, object unchanged */
        int64_t rows2[2] = {200, 30};
        em_fiited_cfg c2 = em_fiited_default(2, rows2, 16, 2, opt_of(kinds[ki]));
        em_fiited *h;
        CHECK_OK(em_fiited_create(&h, &c2));
        CHECK(em_fiited_load(h, path) == EM_ERR_INVALID);
        CHECK(em_fiited_live(h, 0, 0) == 2);
        em_fiited_free(h);
        unlink(path);
        em_fiited_free(f);
        em_fiited_free(g);
    }
}

static void test_invalid(void) {
    int64_t rows[1] = {10};
    em_fiited_cfg c = em_fiited_default(1, rows, 12, 5, opt_of(EM_OPT_SGD));
    em_fiited *f;
    CHECK(em_fiited_create(&f, &c) == EM_ERR_INVALID); /* 5 does not divide 12 */
    c.chunks = c.init_live = 3;
    c.opt = opt_of(EM_OPT_ADAM);
    CHECK(em_fiited_create(&f, &c) == EM_ERR_INVALID);
    c.opt = opt_of(EM_OPT_SGD);
    CHECK_OK(em_fiited_create(&f, &c));
    int64_t idx[2] = {3, 10}, off[2] = {0, 2};
    float out[12], dout[12] = {0};
    CHECK(em_fiited_forward(f, out, idx, off, NULL, 1, NULL) == EM_ERR_INVALID);
    CHECK(em_fiited_backward_update(f, dout, idx, off, NULL, NULL, 1, NULL) == EM_ERR_INVALID);
    CHECK(em_fiited_step(f) == 0);
    em_fiited_free(f);
}

/* Every em_malloc of create/forward/backward/prune/set_live/save/load made to fail in
 * turn: EM_ERR_NOMEM, and nothing leaks once the object is freed (pool pages are
 * mmap'd outside the counting allocator and are unmapped by em_fiited_free). */
static void test_nomem(void) {
    int64_t rows[2] = {300, 20};
    char path[256];
    tmp_path(path, sizeof path, "nomem");
    size_t base = em_mem_in_use();
    int failures = 0, leaks = 0, done = 0;
    for (long n = 0; n < 200 && !done; n++) {
        em_fiited_cfg c = em_fiited_default(2, rows, 8, 4, opt_of(EM_OPT_ADAGRAD));
        c.page_bytes = 64 << 10;
        em_fiited *f = NULL, *g = NULL;
        em_mem_fail_after(n);
        em_status st = em_fiited_create(&f, &c);
        batch b;
        make_batch(&b, 2, 8, rows, 8, 4, 5);
        float out[8 * 2 * 8];
        if (st == EM_OK) st = em_fiited_forward(f, out, b.idx, b.off, NULL, 8, NULL);
        if (st == EM_OK) st = em_fiited_backward_update(f, b.dout, b.idx, b.off, NULL, NULL, 8, NULL);
        if (st == EM_OK) st = em_fiited_prune(f, 0, 0.3, NULL);
        if (st == EM_OK) st = em_fiited_set_live(f, 0, 0, 4);
        if (st == EM_OK) st = em_fiited_prune(f, 0, 0.8, NULL);
        if (st == EM_OK) st = em_fiited_save(f, path);
        if (st == EM_OK) st = em_fiited_create(&g, &c);
        if (st == EM_OK) st = em_fiited_load(g, path);
        em_mem_fail_after(-1);
        if (st == EM_OK) done = 1;
        else if (st == EM_ERR_NOMEM) failures++;
        else CHECK(st == EM_ERR_NOMEM);
        if (f) check_prefix(f);
        if (g) check_prefix(g);
        em_fiited_free(f);
        em_fiited_free(g);
        free_batch(&b);
        leaks += em_mem_in_use() != base;
    }
    CHECK(done);
    CHECK(failures > 10);
    CHECK(leaks == 0);
    unlink(path);
}

TEST_MAIN({"prune_prefix_budget", test_prune_prefix_budget}, {"lifo_reuse", test_lifo_reuse},
          {"reference", test_reference}, {"compaction", test_compaction}, {"rss_drop", test_rss_drop},
          {"threads_bitwise", test_threads_bitwise}, {"checkpoint", test_checkpoint}, {"invalid", test_invalid},
          {"nomem", test_nomem})
