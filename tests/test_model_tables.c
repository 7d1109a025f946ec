/*
 * test_model_tables.c - the DLRM with each embedding backend (dense, dynamic, FIITED):
 * training, checkpoint round trip and bitwise continuation (what --resume relies on),
 * thread-count independence, evaluation that creates no rows, a dynamic budget held
 * on a stream of new ids, FIITED pruning that returns memory to the OS (pool bytes and
 * the process's resident set), refused mismatched checkpoints, allocation failures.
 */
#include <unistd.h>

#include "test.h"

enum { NT = 3, ND = 3, D = 8, B = 32 };

static em_dlrm_cfg cfg_for(em_table_kind kind, em_optim_kind sk) {
    em_dlrm_cfg c;
    memset(&c, 0, sizeof c);
    c.num_dense = ND, c.num_tables = NT, c.dim = D;
    int64_t rows[NT] = {40, 500, 7};
    memcpy(c.rows, rows, sizeof rows);
    int bot[] = {ND, 16, D}, top[] = {D + (NT + 1) * NT / 2, 16, 1};
    c.n_bot = 3, c.n_top = 3;
    memcpy(c.bot, bot, sizeof bot);
    memcpy(c.top, top, sizeof top);
    c.dense_opt = em_optim_default(EM_OPT_ADAM, 0.01f);
    c.sparse_opt = em_optim_default(sk, 0.05f);
    c.seed = 11;
    c.tables = em_tables_default(kind, D);
    if (kind == EM_TABLES_DYNAMIC)
        for (int t = 0; t < NT; t++) c.rows[t] = EM_ROWS_RAW;
    if (kind == EM_TABLES_FIITED) c.tables.chunks = 4, c.tables.budget_frac = 0.4, c.tables.prune_every = 5;
    return c;
}

/* A batch: ids of table t drawn from [0, card[t]) (dynamic: hashed to 64 bits, offset
 * by `fresh` so a stream can bring new ids). */
typedef struct {
    float dense[B * ND], label[B];
    int64_t idx[B * NT * 3], off[B * NT + 1];
    em_batch b;
} tbatch;

static void make_batch(em_rng *r, tbatch *tb, const em_dlrm_cfg *c, uint64_t fresh) {
    static const uint64_t card[NT] = {40, 500, 7};
    em_batch *b = &tb->b;
    memset(b, 0, sizeof *b);
    b->B = B, b->num_dense = ND, b->num_sparse = NT;
    b->dense = tb->dense, b->label = tb->label, b->indices = tb->idx, b->offsets = tb->off;
    for (int i = 0; i < B * ND; i++) tb->dense[i] = (float)em_rng_uniform(r);
    for (int i = 0; i < B; i++) tb->label[i] = (float)(em_rng_u64(r) & 1);
    int64_t k = 0;
    tb->off[0] = 0;
    for (int t = 0; t < NT; t++)
        for (int i = 0; i < B; i++) {
            int len = (int)em_rng_below(r, 3);
            for (int j = 0; j < len; j++) {
                uint64_t id = em_rng_below(r, card[t]);
                if (c->tables.kind == EM_TABLES_DYNAMIC) tb->idx[k++] = (int64_t)em_mix64(id + fresh + 1000003u * (uint64_t)t);
                else tb->idx[k++] = (int64_t)(id % (uint64_t)c->rows[t]);
            }
            tb->off[t * B + i + 1] = k;
        }
}

static void run_steps(em_dlrm *m, int n, em_rng *r, em_pool *pool, double *last_loss) {
    tbatch tb;
    for (int s = 0; s < n; s++) {
        make_batch(r, &tb, em_dlrm_config(m), 0);
        double loss = 0;
        CHECK_OK(em_dlrm_train_step(m, &tb.b, &loss, pool));
        if (last_loss) *last_loss = loss;
    }
}

/* Logits of a fixed evaluation batch: equal logits and equal saved tables = same model. */
static void eval_logits(em_dlrm *m, em_pool *pool, float *out) {
    em_rng r;
    em_rng_seed(&r, 999);
    tbatch tb;
    make_batch(&r, &tb, em_dlrm_config(m), 0);
    CHECK_OK(em_dlrm_forward(m, &tb.b, out, pool));
}

static void tmp_path(char *buf, size_t cap, const char *tag) {
    snprintf(buf, cap, "/tmp/ember_test_tables_%d_%s.safetensors", (int)getpid(), tag);
}

/* Every table's content compared (dense: weights + state; dynamic: each id's row,
 * state, count, last; FIITED: live counts, rows as read, utilities), and the MLPs. */
static int same_model(em_dlrm *a, em_dlrm *b) {
    const em_dlrm_cfg *c = em_dlrm_config(a);
    if (em_dlrm_step_count(a) != em_dlrm_step_count(b)) return 0;
    char name[32];
    for (int l = 0; l < 2; l++)
        for (int top = 0; top < 2; top++) {
            snprintf(name, sizeof name, "%s.%d.weight", top ? "top" : "bot", l);
            size_t n;
            float *x = em_dlrm_param(a, name, 0, &n), *y = em_dlrm_param(b, name, 0, NULL);
            if (!x || !y || memcmp(x, y, n * sizeof(float))) return 0;
        }
    if (c->tables.kind == EM_TABLES_DENSE) {
        for (int t = 0; t < NT; t++)
            if (memcmp(em_embbag_weights(em_dlrm_embbag(a), t), em_embbag_weights(em_dlrm_embbag(b), t),
                       (size_t)c->rows[t] * D * sizeof(float)))
                return 0;
    } else if (c->tables.kind == EM_TABLES_DYNAMIC) {
        em_dyn *da = em_dlrm_dyn(a), *db = em_dlrm_dyn(b);
        for (int t = 0; t < NT; t++) {
            int64_t n = em_dyn_ids(da, t, NULL, 0);
            if (n != em_dyn_ids(db, t, NULL, 0)) return 0;
            uint64_t *ids = malloc(sizeof(uint64_t) * (size_t)(n + 1));
            em_dyn_ids(da, t, ids, n);
            int ok = 1;
            for (int64_t i = 0; i < n && ok; i++) {
                em_dyn_row x, y;
                ok = em_dyn_lookup(da, t, ids[i], &x) && em_dyn_lookup(db, t, ids[i], &y) && x.count == y.count &&
                     x.last == y.last && !memcmp(x.w, y.w, D * sizeof(float)) && (!x.state || x.state[0] == y.state[0]);
            }
            free(ids);
            if (!ok) return 0;
        }
    } else {
        em_fiited *fa = em_dlrm_fiited(a), *fb = em_dlrm_fiited(b);
        float ra[D], rb[D];
        for (int t = 0; t < NT; t++)
            for (int64_t r = 0; r < c->rows[t]; r++) {
                if (em_fiited_live(fa, t, r) != em_fiited_live(fb, t, r)) return 0;
                em_fiited_read_row(fa, t, r, ra);
                em_fiited_read_row(fb, t, r, rb);
                if (memcmp(ra, rb, sizeof ra)) return 0;
                for (int j = 0; j < c->tables.chunks; j++)
                    if (em_fiited_utility(fa, t, r, j) != em_fiited_utility(fb, t, r, j)) return 0;
            }
    }
    return 1;
}

static const em_table_kind kinds[3] = {EM_TABLES_DENSE, EM_TABLES_DYNAMIC, EM_TABLES_FIITED};

/* Train each kind, save at step 20, load, and run both 20 more steps: bitwise equal. */
static void test_roundtrip_and_continue(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    for (int k = 0; k < 3; k++)
        for (int o = 0; o < 3; o++) {
            const em_optim_kind ok[3] = {EM_OPT_SGD, EM_OPT_ADAGRAD, EM_OPT_ROWWISE_ADAGRAD};
            em_dlrm_cfg c = cfg_for(kinds[k], ok[o]);
            em_dlrm *a = NULL, *b = NULL;
            CHECK_OK(em_dlrm_create(&a, &c, pool));
            em_rng r;
            em_rng_seed(&r, 5);
            double l0 = 0, l1 = 0;
            run_steps(a, 1, &r, pool, &l0);
            run_steps(a, 19, &r, pool, &l1);
            CHECK(isfinite(l0) && isfinite(l1));
            char path[256];
            tmp_path(path, sizeof path, "rt");
            em_st_meta extra = {"train.pos", "123"};
            CHECK_OK(em_dlrm_save(a, path, &extra, 1));
            em_st *f = NULL;
            CHECK_OK(em_dlrm_load(&b, path, &f, pool));
            if (!b) continue;
            CHECK(f && em_st_meta_get(f, "train.pos") && strcmp(em_st_meta_get(f, "train.pos"), "123") == 0);
            const char *mj = em_st_meta_get(f, "ember.model");
            CHECK(mj && (kinds[k] == EM_TABLES_DENSE) == (strstr(mj, "\"tables\"") == NULL));
            CHECK((em_st_find(f, "emb.0.weight") != NULL) == (kinds[k] == EM_TABLES_DENSE));
            CHECK((em_st_find(f, "dyn.0.ids") != NULL) == (kinds[k] == EM_TABLES_DYNAMIC));
            CHECK((em_st_find(f, "fiited.0.live") != NULL) == (kinds[k] == EM_TABLES_FIITED));
            em_st_close(f);
            CHECK(em_dlrm_config(b)->tables.kind == kinds[k]);
            CHECK(same_model(a, b));
            float la[B], lb[B];
            eval_logits(a, pool, la), eval_logits(b, pool, lb);
            CHECK(memcmp(la, lb, sizeof la) == 0);
            em_dlrm_table_stats sa, sb;
            CHECK_OK(em_dlrm_table_stats_get(a, -1, &sa));
            CHECK_OK(em_dlrm_table_stats_get(b, -1, &sb));
            CHECK(sa.rows == sb.rows && sa.live_chunks == sb.live_chunks && sa.inserts == sb.inserts);
            em_rng r2 = r;
            run_steps(a, 20, &r, pool, NULL);
            run_steps(b, 20, &r2, pool, NULL);
            CHECK(same_model(a, b));
            eval_logits(a, pool, la), eval_logits(b, pool, lb);
            CHECK(memcmp(la, lb, sizeof la) == 0);
            unlink(path);
            em_dlrm_free(a), em_dlrm_free(b);
        }
    em_pool_free(pool);
}

/* 1 and 3 threads give the same bits for every kind. */
static void test_threads_bitwise(void) {
    for (int k = 0; k < 3; k++) {
        em_dlrm_cfg c = cfg_for(kinds[k], EM_OPT_ROWWISE_ADAGRAD);
        em_dlrm *m[2] = {NULL, NULL};
        for (int i = 0; i < 2; i++) {
            em_pool *pool;
            CHECK_OK(em_pool_create(&pool, i ? 3 : 1));
            CHECK_OK(em_dlrm_create(&m[i], &c, pool));
            em_rng r;
            em_rng_seed(&r, 77);
            run_steps(m[i], 23, &r, pool, NULL);
            em_pool_free(pool);
        }
        CHECK(same_model(m[0], m[1]));
        em_dlrm_free(m[0]), em_dlrm_free(m[1]);
    }
}

/* An evaluation forward of a dynamic model creates no rows; absent ids pool to 0. */
static void test_eval_creates_no_rows(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    em_dlrm_cfg c = cfg_for(EM_TABLES_DYNAMIC, EM_OPT_ADAGRAD);
    em_dlrm *m = NULL;
    CHECK_OK(em_dlrm_create(&m, &c, pool));
    em_rng r;
    em_rng_seed(&r, 3);
    run_steps(m, 10, &r, pool, NULL);
    em_dlrm_table_stats s0, s1;
    CHECK_OK(em_dlrm_table_stats_get(m, -1, &s0));
    tbatch tb;
    float logits[B], logits2[B];
    make_batch(&r, &tb, &c, 1u << 30); /* ids never seen */
    CHECK_OK(em_dlrm_forward(m, &tb.b, logits, pool));
    CHECK_OK(em_dlrm_table_stats_get(m, -1, &s1));
    CHECK(s1.rows == s0.rows && s1.inserts == s0.inserts && s1.bytes == s0.bytes);
    /* unseen ids read as zeros: the same as empty bags */
    for (size_t i = 0; i <= (size_t)B * NT; i++) tb.off[i] = 0;
    CHECK_OK(em_dlrm_forward(m, &tb.b, logits2, pool));
    CHECK(memcmp(logits, logits2, sizeof logits) == 0);
    /* a training step does create them */
    make_batch(&r, &tb, &c, 1u << 30);
    CHECK_OK(em_dlrm_train_step(m, &tb.b, NULL, pool));
    CHECK_OK(em_dlrm_table_stats_get(m, -1, &s1));
    CHECK(s1.rows > s0.rows && s1.inserts > s0.inserts);
    em_dlrm_free(m);
    em_pool_free(pool);
}

/* A stream of continuously new ids: live rows stay under the budget after every step
 * and memory stops growing once the budget is reached. */
static void test_dynamic_budget_stream(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    em_dlrm_cfg c = cfg_for(EM_TABLES_DYNAMIC, EM_OPT_ROWWISE_ADAGRAD);
    c.tables.max_rows = 100;
    c.tables.evict_slack = 0.1f;
    em_dlrm *m = NULL;
    CHECK_OK(em_dlrm_create(&m, &c, pool));
    em_rng r;
    em_rng_seed(&r, 9);
    tbatch tb;
    size_t bytes_at_100 = 0, state_at_100 = 0;
    int over = 0;
    for (int s = 0; s < 200; s++) {
        make_batch(&r, &tb, &c, (uint64_t)s * 7919u); /* shifting ids: most are new */
        CHECK_OK(em_dlrm_train_step(m, &tb.b, NULL, pool));
        for (int t = 0; t < NT; t++) {
            em_dlrm_table_stats ts;
            CHECK_OK(em_dlrm_table_stats_get(m, t, &ts));
            over += ts.rows > 100;
        }
        em_dlrm_table_stats all;
        CHECK_OK(em_dlrm_table_stats_get(m, -1, &all));
        if (s == 100) bytes_at_100 = all.bytes, state_at_100 = em_dlrm_state_bytes(m);
        if (s == 199) {
            CHECK(all.evictions > 1000 && all.inserts > 1000);
            CHECK(all.bytes == bytes_at_100); /* pages and hash stopped growing */
            CHECK(em_dlrm_state_bytes(m) == state_at_100);
        }
    }
    CHECK(over == 0);
    em_dlrm_free(m);
    em_pool_free(pool);
}

static double rss_mb(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    long a = 0, b = 0;
    if (!f) return -1;
    if (fscanf(f, "%ld %ld", &a, &b) != 2) b = -1;
    fclose(f);
    return (double)b * 4096.0 / 1048576.0;
}

/* FIITED pruning during training frees pool pages: the pool's bytes and the process's
 * resident memory both drop by about the pruned chunks' share. */
static void test_fiited_prune_shrinks_rss(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    em_dlrm_cfg c = cfg_for(EM_TABLES_FIITED, EM_OPT_ROWWISE_ADAGRAD);
    c.dim = 32, c.bot[2] = 32, c.top[0] = 32 + 6;
    c.rows[0] = 600000; /* 600k x 32 floats + state: ~80 MB of chunk slots */
    c.tables.chunks = 4, c.tables.budget_frac = 0.05, c.tables.prune_every = 10;
    em_dlrm *m = NULL;
    CHECK_OK(em_dlrm_create(&m, &c, pool));
    if (!m) return;
    em_fiited_stats f0 = em_fiited_get_stats(em_dlrm_fiited(m), -1);
    double rss0 = rss_mb();
    em_rng r;
    em_rng_seed(&r, 1);
    tbatch tb;
    for (int s = 0; s < 10; s++) { /* the 10th step prunes */
        make_batch(&r, &tb, &c, 0);
        CHECK_OK(em_dlrm_train_step(m, &tb.b, NULL, pool));
    }
    em_fiited_stats f1 = em_fiited_get_stats(em_dlrm_fiited(m), -1);
    double rss1 = rss_mb();
    const double pool_drop = (double)(f0.pool_bytes - f1.pool_bytes) / 1048576.0;
    fprintf(stderr, "  pool %.1f -> %.1f MB, RSS %.1f -> %.1f MB\n", f0.pool_bytes / 1048576.0, f1.pool_bytes / 1048576.0,
            rss0, rss1);
    CHECK(f1.live_chunks <= (int64_t)(0.05 * (double)(600000 + 500 + 7) * 4) + 1);
    CHECK(f1.pool_bytes < f0.pool_bytes / 10);
    CHECK(pool_drop > 50);
#ifdef __SANITIZE_ADDRESS__
    const double share = 0.1; /* ASan keeps the freed hash and scratch in its quarantine */
#else
    const double share = 0.7;
#endif
    CHECK(rss0 - rss1 > share * pool_drop); /* unmapped pages really left the process */
    em_dlrm_table_stats ts;
    CHECK_OK(em_dlrm_table_stats_get(m, -1, &ts));
    CHECK(ts.live_chunks == f1.live_chunks && ts.bytes == f1.held_bytes);
    em_dlrm_free(m);
    em_pool_free(pool);
}

/* Checkpoints whose tables disagree with their own configuration are refused. */
static void test_mismatch_refused(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 1));
    char pd[256], pbad[256];
    tmp_path(pd, sizeof pd, "dense");
    tmp_path(pbad, sizeof pbad, "bad");
    em_dlrm_cfg cd = cfg_for(EM_TABLES_DENSE, EM_OPT_ADAGRAD);
    em_dlrm *m = NULL, *x = NULL;
    CHECK_OK(em_dlrm_create(&m, &cd, pool));
    CHECK_OK(em_dlrm_save(m, pd, NULL, 0));
    em_dlrm_free(m);
    /* the dense file's tensors under a dynamic, then a FIITED configuration */
    for (int k = 1; k < 3; k++) {
        em_dlrm_cfg c2 = cfg_for(kinds[k], EM_OPT_ADAGRAD);
        char *json = em_dlrm_cfg_to_json(&c2);
        em_st *f = NULL;
        CHECK_OK(em_st_open(&f, pd));
        int n = em_st_count(f);
        em_st_tensor *ts = calloc((size_t)n, sizeof *ts);
        for (int i = 0; i < n; i++) ts[i] = *em_st_at(f, i);
        em_st_meta meta[3] = {{"ember.format", "dlrm/1"}, {"ember.model", json}, {"ember.step", "0"}};
        CHECK_OK(em_st_write(pbad, ts, n, meta, 3));
        em_st_close(f);
        free(ts);
        em_free(json);
        CHECK(em_dlrm_load(&x, pbad, NULL, pool) != EM_OK && x == NULL);
        CHECK(strstr(em_last_error(), k == 1 ? "dyn." : "fiited") != NULL);
    }
    /* a FIITED file whose chunk count disagrees with its configuration */
    em_dlrm_cfg cf = cfg_for(EM_TABLES_FIITED, EM_OPT_SGD);
    CHECK_OK(em_dlrm_create(&m, &cf, pool));
    CHECK_OK(em_dlrm_save(m, pd, NULL, 0));
    em_dlrm_free(m);
    {
        em_st *f = NULL;
        CHECK_OK(em_st_open(&f, pd));
        cf.tables.chunks = 2;
        char *json = em_dlrm_cfg_to_json(&cf);
        int n = em_st_count(f);
        em_st_tensor *ts = calloc((size_t)n, sizeof *ts);
        for (int i = 0; i < n; i++) ts[i] = *em_st_at(f, i);
        em_st_meta meta[9];
        int nm = 0;
        const char *keys[] = {"fiited.version", "fiited.tables", "fiited.dim", "fiited.chunks", "fiited.opt", "fiited.step"};
        for (int i = 0; i < 6; i++) meta[nm++] = (em_st_meta){keys[i], em_st_meta_get(f, keys[i])};
        meta[nm++] = (em_st_meta){"ember.format", "dlrm/1"};
        meta[nm++] = (em_st_meta){"ember.model", json};
        meta[nm++] = (em_st_meta){"ember.step", "0"};
        CHECK_OK(em_st_write(pbad, ts, n, meta, nm));
        em_st_close(f);
        free(ts);
        em_free(json);
        CHECK(em_dlrm_load(&x, pbad, NULL, pool) != EM_OK && x == NULL);
    }
    /* configurations: raw ids need dynamic tables; dynamic tables need them */
    em_dlrm_cfg bad = cfg_for(EM_TABLES_DENSE, EM_OPT_SGD);
    bad.rows[1] = EM_ROWS_RAW;
    CHECK(em_dlrm_cfg_validate(&bad) == EM_ERR_INVALID);
    bad = cfg_for(EM_TABLES_DYNAMIC, EM_OPT_SGD);
    bad.rows[2] = 10;
    CHECK(em_dlrm_cfg_validate(&bad) == EM_ERR_INVALID);
    bad = cfg_for(EM_TABLES_FIITED, EM_OPT_SGD);
    bad.tables.chunks = 3;
    CHECK(em_dlrm_cfg_validate(&bad) == EM_ERR_INVALID);
    unlink(pd), unlink(pbad);
    em_pool_free(pool);
}

/* Every allocation of create, train steps (with a prune), save and load can fail:
 * an error comes back and nothing leaks. */
static void test_alloc_failure(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    char path[256];
    tmp_path(path, sizeof path, "nomem");
    for (int k = 1; k < 3; k++) {
        em_dlrm_cfg c = cfg_for(kinds[k], EM_OPT_ADAGRAD);
        c.tables.prune_every = 2;
        size_t base = em_mem_in_use();
        int ok_seen = 0, fails = 0;
        for (long n = 0; n < 100000 && !ok_seen; n += n < 200 ? 1 : 7) {
            em_mem_fail_after(n);
            em_dlrm *m = NULL, *l = NULL;
            em_status st = em_dlrm_create(&m, &c, pool);
            em_rng r;
            em_rng_seed(&r, 4);
            tbatch tb;
            for (int s = 0; s < 4 && st == EM_OK; s++) {
                make_batch(&r, &tb, &c, 0);
                st = em_dlrm_train_step(m, &tb.b, NULL, pool);
            }
            if (st == EM_OK) st = em_dlrm_save(m, path, NULL, 0);
            if (st == EM_OK) st = em_dlrm_load(&l, path, NULL, pool);
            em_mem_fail_after(-1);
            if (st == EM_OK) ok_seen = 1;
            else {
                fails++;
                CHECK(st == EM_ERR_NOMEM || st == EM_ERR_IO);
            }
            em_dlrm_free(m), em_dlrm_free(l);
            CHECK(em_mem_in_use() == base);
        }
        CHECK(ok_seen && fails > 20);
    }
    unlink(path);
    em_pool_free(pool);
}

TEST_MAIN({"roundtrip_and_continue", test_roundtrip_and_continue}, {"threads_bitwise", test_threads_bitwise},
          {"eval_creates_no_rows", test_eval_creates_no_rows}, {"dynamic_budget_stream", test_dynamic_budget_stream},
          {"fiited_prune_shrinks_rss", test_fiited_prune_shrinks_rss}, {"mismatch_refused", test_mismatch_refused},
          {"alloc_failure", test_alloc_failure})
