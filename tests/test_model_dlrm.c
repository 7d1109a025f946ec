/*
 * test_model_dlrm.c - the whole DLRM against PyTorch golden files
 * (tools/make_golden.py): forward (interaction, logits, loss), every dense gradient,
 * the embedding gradients (through an SGD step with lr 1), and 10 training steps for
 * several optimizer pairs. Also: thread-count independence, checkpoint round trip.
 */
#include <unistd.h>

#include "test.h"

static em_st *open_golden(const char *name) {
    char buf[1024];
    em_st *st = NULL;
    em_status s = em_st_open(&st, em_test_path(name, buf, sizeof buf));
    if (s) fprintf(stderr, "  cannot open %s: %s\n", buf, em_last_error());
    return st;
}

static int meta_int(const em_st *st, const char *key) {
    const char *v = em_st_meta_get(st, key);
    return v ? atoi(v) : -1;
}

/* Model config from the golden file's metadata. */
static em_dlrm_cfg golden_cfg(const em_st *st, em_optim_cfg dense, em_optim_cfg sparse) {
    em_dlrm_cfg c;
    memset(&c, 0, sizeof c);
    c.num_dense = meta_int(st, "num_dense");
    c.dim = meta_int(st, "dim");
    const char *rows = em_st_meta_get(st, "rows");
    for (const char *p = rows; p && *p;) {
        c.rows[c.num_tables++] = strtoll(p, (char **)&p, 10);
        if (*p == ',') p++;
    }
    c.n_bot = em_parse_layers(em_st_meta_get(st, "bot"), c.bot, EM_DLRM_MAX_LAYERS + 1);
    c.n_top = em_parse_layers(em_st_meta_get(st, "top"), c.top, EM_DLRM_MAX_LAYERS + 1);
    c.pooling = EM_POOL_SUM;
    c.dense_opt = dense;
    c.sparse_opt = sparse;
    return c;
}

/* Copy every parameter named in the model from the file (prefix "" or "final."). */
static void load_params(em_dlrm *m, const em_st *st, const char *prefix) {
    const em_dlrm_cfg *c = em_dlrm_config(m);
    char name[96], full[128];
    for (int pass = 0; pass < 2; pass++) {
        int n = pass == 0 ? c->n_bot - 1 : c->n_top - 1;
        for (int i = 0; i < n; i++)
            for (int bias = 0; bias < 2; bias++) {
                snprintf(name, sizeof name, "%s.%d.%s", pass ? "top" : "bot", i, bias ? "bias" : "weight");
                size_t numel;
                float *p = em_dlrm_param(m, name, 0, &numel);
                snprintf(full, sizeof full, "%s%s", prefix, name);
                const float *src = em_st_expect(st, full, EM_F32, (int64_t)numel);
                CHECK(p && src);
                if (p && src) memcpy(p, src, numel * sizeof(float));
            }
    }
    for (int t = 0; t < c->num_tables; t++) {
        snprintf(name, sizeof name, "emb.%d.weight", t);
        snprintf(full, sizeof full, "%s%s", prefix, name);
        size_t numel;
        float *p = em_dlrm_param(m, name, 0, &numel);
        const float *src = em_st_expect(st, full, EM_F32, (int64_t)numel);
        CHECK(p && src);
        if (p && src) memcpy(p, src, numel * sizeof(float));
    }
}

/* A batch view of tensors "<prefix>dense", "label", "indices", "offsets". */
static int golden_batch(const em_st *st, const char *prefix, const em_dlrm_cfg *c, em_batch *b) {
    char n[64];
    memset(b, 0, sizeof *b);
    snprintf(n, sizeof n, "%slabel", prefix);
    const em_st_tensor *lt = em_st_find(st, n);
    if (!lt) return -1;
    b->B = (int)lt->shape[0];
    b->num_dense = c->num_dense, b->num_sparse = c->num_tables;
    b->label = (float *)lt->data;
    snprintf(n, sizeof n, "%sdense", prefix);
    b->dense = (float *)em_st_expect(st, n, EM_F32, (int64_t)b->B * c->num_dense);
    snprintf(n, sizeof n, "%soffsets", prefix);
    b->offsets = (int64_t *)em_st_expect(st, n, EM_I64, (int64_t)b->B * c->num_tables + 1);
    snprintf(n, sizeof n, "%sindices", prefix);
    const em_st_tensor *it = em_st_find(st, n);
    b->indices = it ? (int64_t *)it->data : NULL;
    return b->dense && b->offsets && b->indices ? 0 : -1;
}

static void test_forward_backward(void) {
    em_st *st = open_golden("golden/dlrm.safetensors");
    CHECK(st);
    if (!st) return;
    /* dense lr tiny-but-nonzero is irrelevant: forward_backward does not step */
    em_dlrm_cfg c = golden_cfg(st, em_optim_default(EM_OPT_SGD, 0.1f), em_optim_default(EM_OPT_SGD, 1.0f));
    for (int nth = 1; nth <= 3; nth++) {
        em_pool *pool;
        CHECK_OK(em_pool_create(&pool, nth));
        em_dlrm *m;
        CHECK_OK(em_dlrm_create(&m, &c, pool));
        load_params(m, st, "");
        em_batch b;
        CHECK(golden_batch(st, "", &c, &b) == 0);
        double loss;
        CHECK_OK(em_dlrm_forward_backward(m, &b, &loss, pool));
        const float *want_loss = em_st_expect(st, "out.loss", EM_F32, 1);
        CHECK(want_loss && fabs(loss - want_loss[0]) < 1e-5 * fabs(want_loss[0]) + 1e-6);
        const float *inter = em_st_expect(st, "out.interaction", EM_F32, (int64_t)b.B * c.top[0]);
        CHECK(inter);
        if (inter) CHECK_REL(em_dlrm_interaction(m), inter, (size_t)b.B * (size_t)c.top[0], 1e-5);
        float logits[64];
        CHECK_OK(em_dlrm_forward(m, &b, logits, pool));
        const float *wl = em_st_expect(st, "out.logits", EM_F32, b.B);
        if (wl) CHECK_REL(logits, wl, (size_t)b.B, 1e-5);
        CHECK_OK(em_dlrm_forward_backward(m, &b, &loss, pool));
        /* every dense gradient */
        for (int i = 0; i < em_st_count(st); i++) {
            const em_st_tensor *t = em_st_at(st, i);
            if (strncmp(t->name, "grad.", 5) != 0 || strncmp(t->name, "grad.emb.", 9) == 0) continue;
            size_t numel;
            float *g = em_dlrm_param(m, t->name + 5, 1, &numel);
            CHECK(g != NULL);
            if (g) {
                double e = rel_err_f(g, t->data, numel, 1e-6);
                if (e > 1e-4) fprintf(stderr, "  %s: rel err %.3g\n", t->name, e);
                CHECK(e <= 1e-4);
            }
        }
        /* embedding gradients: one SGD step with lr 1 on the tables (dense lr 0) */
        em_dlrm_set_lr(m, 0.0f, 1.0f);
        float *before[EM_DLRM_MAX_TABLES];
        for (int t = 0; t < c.num_tables; t++) {
            size_t n = (size_t)c.rows[t] * (size_t)c.dim;
            before[t] = malloc(n * sizeof(float));
            memcpy(before[t], em_embbag_weights(em_dlrm_embbag(m), t), n * sizeof(float));
        }
        CHECK_OK(em_dlrm_train_step(m, &b, &loss, pool));
        for (int t = 0; t < c.num_tables; t++) {
            size_t n = (size_t)c.rows[t] * (size_t)c.dim;
            const float *w = em_embbag_weights(em_dlrm_embbag(m), t);
            for (size_t k = 0; k < n; k++) before[t][k] -= w[k]; /* = grad */
            char name[64];
            snprintf(name, sizeof name, "grad.emb.%d.weight", t);
            const float *g = em_st_expect(st, name, EM_F32, (int64_t)n);
            CHECK(g);
            if (g) CHECK_REL(before[t], g, n, 1e-4);
            free(before[t]);
        }
        em_dlrm_free(m);
        em_pool_free(pool);
    }
    em_st_close(st);
}

static void train_golden(const char *file, em_optim_kind dk, em_optim_kind sk) {
    em_st *st = open_golden(file);
    CHECK(st);
    if (!st) return;
    const char *dlr = em_st_meta_get(st, "dense_lr"), *slr = em_st_meta_get(st, "sparse_lr");
    CHECK(dlr && slr);
    if (!dlr || !slr) {
        em_st_close(st);
        return;
    }
    em_dlrm_cfg c = golden_cfg(st, em_optim_default(dk, (float)atof(dlr)), em_optim_default(sk, (float)atof(slr)));
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    em_dlrm *m;
    CHECK_OK(em_dlrm_create(&m, &c, pool));
    load_params(m, st, "");
    int steps = meta_int(st, "steps");
    const float *losses = em_st_expect(st, "losses", EM_F32, steps);
    CHECK(steps == 10 && losses);
    for (int k = 0; k < steps && losses; k++) {
        char prefix[32];
        snprintf(prefix, sizeof prefix, "batch.%d.", k);
        em_batch b;
        CHECK(golden_batch(st, prefix, &c, &b) == 0);
        double loss;
        CHECK_OK(em_dlrm_train_step(m, &b, &loss, pool));
        CHECK_NEAR(loss, losses[k], 1e-4 * fabs(losses[k]) + 1e-6);
    }
    /* final parameters and table state */
    em_dlrm *want;
    CHECK_OK(em_dlrm_create(&want, &c, pool));
    load_params(want, st, "final.");
    char name[96];
    for (int pass = 0; pass < 3; pass++) {
        int n = pass == 0 ? c.n_bot - 1 : pass == 1 ? c.n_top - 1 : c.num_tables;
        for (int i = 0; i < n; i++)
            for (int bias = 0; bias < (pass == 2 ? 1 : 2); bias++) {
                if (pass == 2) snprintf(name, sizeof name, "emb.%d.weight", i);
                else snprintf(name, sizeof name, "%s.%d.%s", pass ? "top" : "bot", i, bias ? "bias" : "weight");
                size_t numel;
                const float *a = em_dlrm_param(m, name, 0, &numel), *w = em_dlrm_param(want, name, 0, NULL);
                double e = rel_err_f(a, w, numel, 1e-3);
                if (e > 2e-4) fprintf(stderr, "  %s %s: rel err %.3g\n", file, name, e);
                CHECK(e <= 2e-4);
            }
    }
    for (int t = 0; t < c.num_tables && sk != EM_OPT_SGD; t++) {
        snprintf(name, sizeof name, "final_state.emb.%d", t);
        size_t cnt;
        const float *s = em_embbag_state(em_dlrm_embbag(m), t, &cnt);
        const float *w = em_st_expect(st, name, EM_F32, (int64_t)cnt);
        CHECK(s && w);
        if (s && w) CHECK_REL(s, w, cnt, 2e-4);
    }
    em_dlrm_free(want);
    em_dlrm_free(m);
    em_pool_free(pool);
    em_st_close(st);
}

static void test_train_sgd(void) { train_golden("golden/dlrm_train_sgd_sgd.safetensors", EM_OPT_SGD, EM_OPT_SGD); }
static void test_train_adagrad(void) {
    train_golden("golden/dlrm_train_adagrad_adagrad.safetensors", EM_OPT_ADAGRAD, EM_OPT_ADAGRAD);
}
static void test_train_adam_rowwise(void) {
    train_golden("golden/dlrm_train_adam_rowwise_adagrad.safetensors", EM_OPT_ADAM, EM_OPT_ROWWISE_ADAGRAD);
}

/* Random small model and batches: training is bitwise identical for 1, 2, 3 threads,
 * and a checkpoint round trip restores everything (continuing gives the same bits). */
static void make_batch(em_rng *r, int B, const em_dlrm_cfg *c, em_batch *b, float *dense, float *label, int64_t *idx,
                       int64_t *off) {
    b->B = B, b->num_dense = c->num_dense, b->num_sparse = c->num_tables;
    b->dense = dense, b->label = label, b->indices = idx, b->offsets = off, b->per_id_w = NULL;
    for (int i = 0; i < B * c->num_dense; i++) dense[i] = (float)em_rng_uniform(r);
    for (int i = 0; i < B; i++) label[i] = (float)(em_rng_u64(r) & 1);
    int64_t k = 0;
    off[0] = 0;
    for (int t = 0; t < c->num_tables; t++)
        for (int i = 0; i < B; i++) {
            int len = (int)em_rng_below(r, 3);
            for (int j = 0; j < len; j++) idx[k++] = (int64_t)em_rng_below(r, (uint64_t)c->rows[t]);
            off[t * B + i + 1] = k;
        }
}

static em_dlrm_cfg small_cfg(void) {
    em_dlrm_cfg c;
    memset(&c, 0, sizeof c);
    c.num_dense = 3, c.num_tables = 5, c.dim = 8;
    int64_t rows[] = {50, 7, 100, 3, 20};
    memcpy(c.rows, rows, sizeof rows);
    int bot[] = {3, 16, 8}, top[] = {8 + 15, 32, 16, 1};
    c.n_bot = 3, c.n_top = 4;
    memcpy(c.bot, bot, sizeof bot);
    memcpy(c.top, top, sizeof top);
    c.dense_opt = em_optim_default(EM_OPT_ADAM, 0.01f);
    c.sparse_opt = em_optim_default(EM_OPT_ROWWISE_ADAGRAD, 0.05f);
    c.seed = 7;
    return c;
}

static void run_steps(em_dlrm *m, int nsteps, uint64_t seed, em_pool *pool) {
    const em_dlrm_cfg *c = em_dlrm_config(m);
    enum { B = 33 };
    float dense[B * 3], label[B];
    int64_t idx[B * 5 * 3], off[B * 5 + 1];
    em_rng r;
    em_rng_seed(&r, seed);
    for (int s = 0; s < nsteps; s++) {
        em_batch b;
        make_batch(&r, B, c, &b, dense, label, idx, off);
        double loss;
        CHECK_OK(em_dlrm_train_step(m, &b, &loss, pool));
    }
}

static int same_params(em_dlrm *a, em_dlrm *b) {
    const em_dlrm_cfg *c = em_dlrm_config(a);
    char name[64];
    for (int l = 0; l < c->n_bot - 1 + c->n_top - 1; l++)
        for (int bias = 0; bias < 2; bias++) {
            int top = l >= c->n_bot - 1;
            snprintf(name, sizeof name, "%s.%d.%s", top ? "top" : "bot", top ? l - (c->n_bot - 1) : l,
                     bias ? "bias" : "weight");
            size_t n;
            float *x = em_dlrm_param(a, name, 0, &n), *y = em_dlrm_param(b, name, 0, NULL);
            if (memcmp(x, y, n * sizeof(float))) return 0;
        }
    for (int t = 0; t < c->num_tables; t++) {
        size_t n = (size_t)c->rows[t] * (size_t)c->dim, ns, ns2;
        if (memcmp(em_embbag_weights(em_dlrm_embbag(a), t), em_embbag_weights(em_dlrm_embbag(b), t), n * sizeof(float)))
            return 0;
        const float *s1 = em_embbag_state(em_dlrm_embbag(a), t, &ns), *s2 = em_embbag_state(em_dlrm_embbag(b), t, &ns2);
        if (ns != ns2 || (ns && memcmp(s1, s2, ns * sizeof(float)))) return 0;
    }
    return 1;
}

static void test_threads_bitwise(void) {
    em_dlrm_cfg c = small_cfg();
    em_dlrm *ref = NULL;
    for (int nth = 1; nth <= 3; nth++) {
        em_pool *pool;
        CHECK_OK(em_pool_create(&pool, nth));
        em_dlrm *m;
        CHECK_OK(em_dlrm_create(&m, &c, pool));
        run_steps(m, 20, 99, pool);
        if (!ref) ref = m;
        else {
            CHECK(same_params(ref, m));
            em_dlrm_free(m);
        }
        em_pool_free(pool);
    }
    em_dlrm_free(ref);
}

static void test_checkpoint_roundtrip(void) {
    em_dlrm_cfg c = small_cfg();
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    em_dlrm *a, *b;
    CHECK_OK(em_dlrm_create(&a, &c, pool));
    run_steps(a, 5, 1, pool);
    char path[] = "/tmp/ember_ckpt_XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    close(fd);
    em_st_meta extra[] = {{"train.pos", "123"}};
    CHECK_OK(em_dlrm_save(a, path, extra, 1));
    em_st *st = NULL;
    CHECK_OK(em_dlrm_load(&b, path, &st, pool));
    CHECK(st && strcmp(em_st_meta_get(st, "train.pos"), "123") == 0);
    em_st_close(st);
    CHECK(em_dlrm_step_count(b) == 5);
    CHECK(same_params(a, b));
    run_steps(a, 5, 2, pool);
    run_steps(b, 5, 2, pool);
    CHECK(same_params(a, b)); /* optimizer state and step count came back too */
    em_dlrm_free(b);
    /* a model of another shape is refused, naming the tensor */
    em_dlrm_cfg c2 = c;
    c2.rows[0] = 51;
    em_dlrm *d;
    CHECK_OK(em_dlrm_create(&d, &c2, pool));
    CHECK_OK(em_dlrm_save(d, path, NULL, 0));
    em_dlrm_free(d);
    /* a corrupt file is refused */
    FILE *f = fopen(path, "r+b");
    fseek(f, -10, SEEK_END);
    fputc('x', f);
    fclose(f);
    em_status s = em_dlrm_load(&d, path, NULL, pool);
    CHECK(s == EM_ERR_CORRUPT && d == NULL);
    CHECK(strstr(em_last_error(), path) != NULL || strstr(em_last_error(), "corrupt") != NULL);
    /* truncated */
    CHECK(truncate(path, 200) == 0);
    CHECK(em_dlrm_load(&d, path, NULL, pool) == EM_ERR_CORRUPT);
    unlink(path);
    em_dlrm_free(a);
    em_pool_free(pool);
}

static void test_bad_config_and_batch(void) {
    em_dlrm_cfg c = small_cfg();
    c.top[0] = 24;
    em_dlrm *m;
    CHECK(em_dlrm_create(&m, &c, NULL) == EM_ERR_INVALID);
    CHECK(strstr(em_last_error(), "top MLP") != NULL);
    c = small_cfg();
    CHECK_OK(em_dlrm_create(&m, &c, NULL));
    em_batch b = {.B = 2, .num_dense = 4, .num_sparse = 5};
    CHECK(em_dlrm_train_step(m, &b, NULL, NULL) == EM_ERR_INVALID);
    em_dlrm_free(m);
    em_dlrm_free(NULL);
}

static void test_alloc_failure(void) {
    em_dlrm_cfg c = small_cfg();
    size_t base = em_mem_in_use();
    for (long k = 0; k < 40; k++) {
        em_dlrm *m = NULL;
        em_mem_fail_after(k);
        em_status s = em_dlrm_create(&m, &c, NULL);
        if (s == EM_OK) {
            float dense[3], label[1];
            int64_t idx[15], off[6];
            em_rng r;
            em_rng_seed(&r, 1);
            em_batch b;
            make_batch(&r, 1, &c, &b, dense, label, idx, off);
            s = em_dlrm_train_step(m, &b, NULL, NULL);
            CHECK(s == EM_OK || s == EM_ERR_NOMEM);
            em_dlrm_free(m);
        } else {
            CHECK(s == EM_ERR_NOMEM && m == NULL);
        }
        em_mem_fail_after(-1);
        CHECK(em_mem_in_use() == base);
    }
}

TEST_MAIN({"forward_backward", test_forward_backward}, {"train_sgd", test_train_sgd},
          {"train_adagrad", test_train_adagrad}, {"train_adam_rowwise", test_train_adam_rowwise},
          {"threads_bitwise", test_threads_bitwise}, {"checkpoint_roundtrip", test_checkpoint_roundtrip},
          {"bad_config_and_batch", test_bad_config_and_batch}, {"alloc_failure", test_alloc_failure})
