/*
 * test_model_seq.c - the DLRM with its sequence tower (ember/seqtower.h):
 *   - forward (logits, loss, interaction), every dense gradient and the tables'
 *     gradients (one SGD step with lr 1) against PyTorch (tools/make_golden_seq.py),
 *     with the history's items in the candidate's table and in their own, for 1, 2
 *     and 3 threads; 5 training steps with Adam + row-wise AdaGrad and SGD + AdaGrad;
 *   - finite differences of the loss for the tower's dense parameters;
 *   - 1, 2 and 3 threads train bitwise the same model (long histories: several tiles);
 *   - checkpoint round trip (configuration, tower, its table and optimizer state);
 *   - allocation failures on create, train step and forward: an error, nothing leaked;
 *   - block lists (parsing, CompSkip / full presets, formatting), FLOPs counts, bad
 *     configurations and batches without a history.
 */
#include <unistd.h>

#include "test.h"

static em_st *open_golden(void) {
    char buf[1024];
    em_st *st = NULL;
    em_status s = em_st_open(&st, em_test_path("golden/seq_model.safetensors", buf, sizeof buf));
    if (s) fprintf(stderr, "  cannot open %s: %s\n", buf, em_last_error());
    return st;
}

/* Copy every tensor "<pfx>.<name>" of the file that names a parameter of m. */
static int load_params(em_dlrm *m, const em_st *st, const char *pfx) {
    int n = 0;
    size_t pl = strlen(pfx);
    for (int i = 0; i < em_st_count(st); i++) {
        const em_st_tensor *t = em_st_at(st, i);
        if (strncmp(t->name, pfx, pl) != 0 || t->name[pl] != '.') continue;
        const char *name = t->name + pl + 1;
        size_t numel;
        float *p = em_dlrm_param(m, name, 0, &numel);
        if (!p) continue;
        const float *src = em_st_expect(st, t->name, EM_F32, (int64_t)numel);
        CHECK(src != NULL);
        if (src) memcpy(p, src, numel * sizeof(float)), n++;
    }
    return n;
}

/* The batch "<pfx>" with its history; seq must outlive b. */
static int golden_batch(const em_st *st, const char *pfx, const em_dlrm_cfg *c, em_batch *b, em_batch_seq *seq) {
    char n[96];
    memset(b, 0, sizeof *b);
    snprintf(n, sizeof n, "%slabel", pfx);
    const em_st_tensor *lt = em_st_find(st, n);
    if (!lt) return -1;
    b->B = (int)lt->shape[0];
    b->num_dense = c->num_dense, b->num_sparse = c->num_tables;
    b->label = (float *)lt->data;
#define GET(field, suffix, dt, cnt)                                                                                    \
    snprintf(n, sizeof n, "%s" suffix, pfx);                                                                           \
    field = (void *)em_st_expect(st, n, dt, cnt)
    GET(b->dense, "dense", EM_F32, (int64_t)b->B * c->num_dense);
    GET(b->offsets, "offsets", EM_I64, (int64_t)b->B * c->num_tables + 1);
    GET(seq->offsets, "seq_offsets", EM_I64, b->B + 1);
    if (!b->dense || !b->offsets || !seq->offsets) return -1;
    GET(b->indices, "indices", EM_I64, b->offsets[(size_t)b->B * c->num_tables]);
    int64_t N = seq->offsets[b->B];
    GET(seq->items, "seq_items", EM_I64, N);
    GET(seq->age, "seq_age", EM_I64, N);
    GET(seq->type, "seq_type", EM_I32, N);
#undef GET
    b->num_seq = 1, b->seq = seq;
    return b->indices && seq->items && seq->age && seq->type ? 0 : -1;
}

static int golden_cfg(const em_st *st, const char *pfx, em_dlrm_cfg *c) {
    char key[64];
    snprintf(key, sizeof key, "%s.config", pfx);
    const char *json = em_st_meta_get(st, key);
    CHECK(json != NULL);
    if (!json) return -1;
    em_status s = em_dlrm_cfg_from_json(json, c);
    CHECK_OK(s);
    return s ? -1 : 0;
}

/* The tables the model updates sparsely: "emb.{t}.weight" and its own item table. */
static int table_names(const em_dlrm_cfg *c, char names[][32]) {
    int n = 0;
    for (int t = 0; t < c->num_tables; t++) snprintf(names[n++], 32, "emb.%d.weight", t);
    if (!c->seq.share) snprintf(names[n++], 32, "seq.items.weight");
    return n;
}

static void golden_forward_backward(const char *pfx) {
    em_st *st = open_golden();
    CHECK(st);
    if (!st) return;
    em_dlrm_cfg c;
    if (golden_cfg(st, pfx, &c)) {
        em_st_close(st);
        return;
    }
    c.dense_opt = em_optim_default(EM_OPT_SGD, 0.f);
    c.sparse_opt = em_optim_default(EM_OPT_SGD, 1.f);
    char pre[64], name[400];
    for (int nth = 1; nth <= 3; nth++) {
        em_pool *pool;
        CHECK_OK(em_pool_create(&pool, nth));
        em_dlrm *m;
        CHECK_OK(em_dlrm_create(&m, &c, pool));
        CHECK(load_params(m, st, pfx) > 20);
        em_batch b;
        em_batch_seq seq;
        snprintf(pre, sizeof pre, "%s.", pfx);
        CHECK(golden_batch(st, pre, &c, &b, &seq) == 0);
        double loss;
        CHECK_OK(em_dlrm_forward_backward(m, &b, &loss, pool));
        snprintf(name, sizeof name, "%s.out.loss", pfx);
        const float *wl = em_st_expect(st, name, EM_F32, 1);
        CHECK(wl && fabs(loss - wl[0]) < 1e-5 * fabs(wl[0]) + 1e-6);
        snprintf(name, sizeof name, "%s.out.interaction", pfx);
        const float *wi = em_st_expect(st, name, EM_F32, (int64_t)b.B * c.top[0]);
        if (wi) CHECK_REL(em_dlrm_interaction(m), wi, (size_t)b.B * (size_t)c.top[0], 1e-5);
        float logits[16];
        snprintf(name, sizeof name, "%s.out.logits", pfx);
        const float *wlog = em_st_expect(st, name, EM_F32, b.B);
        CHECK_OK(em_dlrm_forward(m, &b, logits, pool));
        if (wlog) CHECK_REL(logits, wlog, (size_t)b.B, 1e-5);
        CHECK_OK(em_dlrm_forward_backward(m, &b, &loss, pool));
        /* every dense gradient */
        snprintf(pre, sizeof pre, "%s.grad.", pfx);
        int ngrad = 0;
        for (int i = 0; i < em_st_count(st); i++) {
            const em_st_tensor *t = em_st_at(st, i);
            if (strncmp(t->name, pre, strlen(pre)) != 0) continue;
            const char *pn = t->name + strlen(pre);
            if (strncmp(pn, "emb.", 4) == 0 || strcmp(pn, "seq.items.weight") == 0) continue;
            size_t numel;
            float *g = em_dlrm_param(m, pn, 1, &numel);
            CHECK(g != NULL);
            if (!g) {
                fprintf(stderr, "  no gradient for %s\n", pn);
                continue;
            }
            double e = rel_err_f(g, t->data, numel, 1e-6);
            if (e > 1e-4) fprintf(stderr, "  %s %s: rel err %.3g\n", pfx, pn, e);
            CHECK(e <= 1e-4);
            ngrad++;
        }
        CHECK(ngrad >= 15);
        /* table gradients: one SGD step with lr 1 (dense lr 0); the shared table gets
         * the candidate bags' and the history's gradients in one update */
        char tn[8][32];
        int nt = table_names(&c, tn);
        float *before[8];
        size_t sz[8];
        for (int k = 0; k < nt; k++) {
            float *w = em_dlrm_param(m, tn[k], 0, &sz[k]);
            before[k] = malloc(sz[k] * sizeof(float));
            memcpy(before[k], w, sz[k] * sizeof(float));
        }
        CHECK_OK(em_dlrm_train_step(m, &b, &loss, pool));
        for (int k = 0; k < nt; k++) {
            const float *w = em_dlrm_param(m, tn[k], 0, NULL);
            for (size_t j = 0; j < sz[k]; j++) before[k][j] -= w[j];
            snprintf(name, sizeof name, "%s.grad.%s", pfx, tn[k]);
            const float *g = em_st_expect(st, name, EM_F32, (int64_t)sz[k]);
            CHECK(g);
            if (g) {
                double e = rel_err_f(before[k], g, sz[k], 1e-6);
                if (e > 1e-4) fprintf(stderr, "  %s %s: rel err %.3g\n", pfx, tn[k], e);
                CHECK(e <= 1e-4);
            }
            free(before[k]);
        }
        em_dlrm_free(m);
        em_pool_free(pool);
    }
    em_st_close(st);
}

static void test_golden_share(void) { golden_forward_backward("share"); }
static void test_golden_own(void) { golden_forward_backward("own"); }

static void golden_train(const char *pfx) {
    em_st *st = open_golden();
    CHECK(st);
    if (!st) return;
    em_dlrm_cfg c;
    if (golden_cfg(st, pfx, &c)) {
        em_st_close(st);
        return;
    }
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    em_dlrm *m, *want;
    CHECK_OK(em_dlrm_create(&m, &c, pool));
    CHECK_OK(em_dlrm_create(&want, &c, pool));
    load_params(m, st, pfx);
    char name[400], pre[64];
    snprintf(name, sizeof name, "%s.train.losses", pfx);
    const float *losses = em_st_expect(st, name, EM_F32, 5);
    CHECK(losses);
    for (int k = 0; k < 5 && losses; k++) {
        snprintf(pre, sizeof pre, "%s.train.%d.", pfx, k);
        em_batch b;
        em_batch_seq seq;
        CHECK(golden_batch(st, pre, &c, &b, &seq) == 0);
        double loss;
        CHECK_OK(em_dlrm_train_step(m, &b, &loss, pool));
        CHECK_NEAR(loss, losses[k], 1e-4 * fabs(losses[k]) + 1e-6);
    }
    snprintf(pre, sizeof pre, "%s.final", pfx);
    CHECK(load_params(want, st, pre) > 20);
    snprintf(pre, sizeof pre, "%s.final.", pfx);
    for (int i = 0; i < em_st_count(st); i++) {
        const em_st_tensor *t = em_st_at(st, i);
        if (strncmp(t->name, pre, strlen(pre)) != 0) continue;
        size_t numel;
        const float *a = em_dlrm_param(m, t->name + strlen(pre), 0, &numel);
        const float *w = em_dlrm_param(want, t->name + strlen(pre), 0, NULL);
        CHECK(a && w);
        if (!a || !w) continue;
        double e = rel_err_f(a, w, numel, 1e-3);
        if (e > 3e-4) fprintf(stderr, "  %s %s: rel err %.3g\n", pfx, t->name, e);
        CHECK(e <= 3e-4);
    }
    /* the sparse optimizer's state of every table */
    char tn[8][32];
    int nt = table_names(&c, tn);
    for (int k = 0; k < nt; k++) {
        size_t cnt;
        const float *s = strcmp(tn[k], "seq.items.weight") == 0 ? NULL : em_embbag_state(em_dlrm_embbag(m), k, &cnt);
        if (!s) { /* the own item table's state is only reachable through a checkpoint */
            char path[] = "/tmp/ember_seqst_XXXXXX";
            int fd = mkstemp(path);
            close(fd);
            CHECK_OK(em_dlrm_save(m, path, NULL, 0));
            em_st *f = NULL;
            CHECK_OK(em_st_open(&f, path));
            const em_st_tensor *tt = f ? em_st_find(f, "optim.seq.items") : NULL;
            snprintf(name, sizeof name, "%s.final_state.%s", pfx, tn[k]);
            const em_st_tensor *w = em_st_find(st, name);
            CHECK(tt && w);
            if (tt && w) {
                size_t n = 1;
                for (int d = 0; d < w->ndim; d++) n *= (size_t)w->shape[d];
                CHECK_REL((const float *)tt->data, (const float *)w->data, n, 3e-4);
            }
            em_st_close(f);
            unlink(path);
            continue;
        }
        snprintf(name, sizeof name, "%s.final_state.%s", pfx, tn[k]);
        const float *w = em_st_expect(st, name, EM_F32, (int64_t)cnt);
        CHECK(w);
        if (w) CHECK_REL(s, w, cnt, 3e-4);
    }
    em_dlrm_free(want);
    em_dlrm_free(m);
    em_pool_free(pool);
    em_st_close(st);
}

static void test_train_share(void) { golden_train("share"); }
static void test_train_own(void) { golden_train("own"); }

/* ------------------------------------------------------- random models and batches */

static em_dlrm_cfg small_cfg(int share, const char *blocks) {
    em_dlrm_cfg c;
    memset(&c, 0, sizeof c);
    c.num_dense = 3, c.num_tables = 4, c.dim = 8;
    int64_t rows[] = {50, 7, 100, 30};
    memcpy(c.rows, rows, sizeof rows);
    c.seq = em_seq_default();
    c.seq.max_len = 300, c.seq.cand = 3, c.seq.share = share, c.seq.rows = share ? 30 : 40;
    c.seq.hsp_m = 3, c.seq.hsp_m2 = 2, c.seq.hsp_k = 2;
    em_status s = em_seq_parse_blocks(&c.seq, blocks, EM_GDPA_SILU, 3);
    CHECK_OK(s);
    int F = c.num_tables + em_seq_extra(&c.seq);
    int bot[] = {3, 16, 8}, top[] = {8 + F * (F + 1) / 2, 16, 1};
    c.n_bot = 3, c.n_top = 3;
    memcpy(c.bot, bot, sizeof bot);
    memcpy(c.top, top, sizeof top);
    c.dense_opt = em_optim_default(EM_OPT_ADAM, 0.01f);
    c.sparse_opt = em_optim_default(EM_OPT_ROWWISE_ADAGRAD, 0.05f);
    c.seed = 7;
    return c;
}

typedef struct {
    em_batch b;
    em_batch_seq s;
    float dense[64 * 3], label[64];
    int64_t idx[64 * 4 * 3], off[64 * 4 + 1];
    int64_t items[64 * 300], age[64 * 300], soff[65];
    int32_t type[64 * 300];
} rbatch;

/* B examples with up to 2 ids per bag and histories of 0..maxlen events. */
static void make_batch(em_rng *r, int B, int maxlen, const em_dlrm_cfg *c, rbatch *x) {
    em_batch *b = &x->b;
    b->B = B, b->num_dense = c->num_dense, b->num_sparse = c->num_tables;
    b->dense = x->dense, b->label = x->label, b->indices = x->idx, b->offsets = x->off, b->per_id_w = NULL;
    for (int i = 0; i < B * c->num_dense; i++) x->dense[i] = (float)em_rng_uniform(r);
    for (int i = 0; i < B; i++) x->label[i] = (float)(em_rng_u64(r) & 1);
    int64_t k = 0;
    x->off[0] = 0;
    for (int t = 0; t < c->num_tables; t++)
        for (int i = 0; i < B; i++) {
            int len = (int)em_rng_below(r, 3);
            for (int j = 0; j < len; j++) x->idx[k++] = (int64_t)em_rng_below(r, (uint64_t)c->rows[t]);
            x->off[t * B + i + 1] = k;
        }
    int64_t n = 0;
    x->soff[0] = 0;
    for (int i = 0; i < B; i++) {
        int L = (int)em_rng_below(r, (uint64_t)maxlen + 1);
        if (i == 0) L = maxlen;
        int64_t a = (int64_t)em_rng_below(r, 1000000);
        for (int j = 0; j < L; j++, n++) {
            x->items[n] = (int64_t)em_rng_below(r, (uint64_t)c->seq.rows);
            a -= (int64_t)em_rng_below(r, 3000);
            x->age[n] = a > 0 ? a : 0;
            x->type[n] = (int32_t)em_rng_below(r, 6);
        }
        x->soff[i + 1] = n;
    }
    x->s = (em_batch_seq){x->items, x->age, x->type, x->soff};
    b->num_seq = 1, b->seq = &x->s;
}

static void run_steps(em_dlrm *m, int nsteps, int B, int maxlen, uint64_t seed, em_pool *pool) {
    rbatch *x = malloc(sizeof *x);
    em_rng r;
    em_rng_seed(&r, seed);
    for (int s = 0; s < nsteps; s++) {
        make_batch(&r, B, maxlen, em_dlrm_config(m), x);
        double loss;
        CHECK_OK(em_dlrm_train_step(m, &x->b, &loss, pool));
        CHECK(isfinite(loss));
    }
    free(x);
}

/* Save both models and compare every tensor bitwise. */
static int same_model(em_dlrm *a, em_dlrm *b) {
    char pa[] = "/tmp/ember_seqa_XXXXXX", pb[] = "/tmp/ember_seqb_XXXXXX";
    int fa = mkstemp(pa), fb = mkstemp(pb);
    close(fa), close(fb);
    em_st *x = NULL, *y = NULL;
    int same = em_dlrm_save(a, pa, NULL, 0) == EM_OK && em_dlrm_save(b, pb, NULL, 0) == EM_OK &&
               em_st_open(&x, pa) == EM_OK && em_st_open(&y, pb) == EM_OK && em_st_count(x) == em_st_count(y);
    for (int i = 0; same && i < em_st_count(x); i++) {
        const em_st_tensor *t = em_st_at(x, i), *u = em_st_find(y, t->name);
        size_t n = em_dtype_size(t->dtype);
        for (int d = 0; d < t->ndim; d++) n *= (size_t)t->shape[d];
        same = u && memcmp(t->data, u->data, n) == 0;
        if (!same) fprintf(stderr, "  tensor %s differs\n", t->name);
    }
    em_st_close(x), em_st_close(y);
    unlink(pa), unlink(pb);
    return same;
}

static void threads_bitwise(int share, const char *blocks) {
    em_dlrm_cfg c = small_cfg(share, blocks);
    em_dlrm *ref = NULL;
    for (int nth = 1; nth <= 3; nth++) {
        em_pool *pool;
        CHECK_OK(em_pool_create(&pool, nth));
        em_dlrm *m;
        CHECK_OK(em_dlrm_create(&m, &c, pool));
        run_steps(m, 6, 37, 300, 99, pool);
        if (!ref) ref = m;
        else {
            CHECK(same_model(ref, m));
            em_dlrm_free(m);
        }
        em_pool_free(pool);
    }
    em_dlrm_free(ref);
}

static void test_threads_bitwise(void) {
    threads_bitwise(1, "jattn:causal,gdpa:gelu,hsp,swa:3:causal,jattn");
    threads_bitwise(0, "compskip:3");
}

/* -------------------------------------------------- finite differences */

/* The loss in double from a forward with the current parameters. */
static double loss_of(em_dlrm *m, const em_batch *b, em_pool *pool) {
    float z[64];
    CHECK_OK(em_dlrm_forward(m, b, z, pool));
    return em_bce_logits_forward(z, b->label, (size_t)b->B);
}

static void test_finite_differences(void) {
    /* smooth activations only (the MLPs' ReLUs are rarely at a kink for 6 examples) */
    em_dlrm_cfg c = small_cfg(1, "jattn:causal,gdpa:silu,hsp,swa:1,gdpa:tanh:causal");
    c.seq.max_len = 7;
    em_dlrm *m;
    CHECK_OK(em_dlrm_create(&m, &c, NULL));
    /* larger weights than the initialisation, so attention is far from uniform */
    const em_seq_param *p;
    int np = em_seqtower_params(em_dlrm_seqtower(m), &p);
    em_rng r;
    em_rng_seed(&r, 5);
    for (int i = 0; i < np; i++) {
        size_t n;
        float *w = em_dlrm_param(m, p[i].name, 0, &n);
        for (size_t j = 0; j < n; j++) w[j] = (float)(0.4 * em_rng_normal(&r));
    }
    float *tab = em_dlrm_param(m, "emb.3.weight", 0, NULL);
    for (int j = 0; j < 30 * 8; j++) tab[j] = (float)(0.5 * em_rng_normal(&r));
    rbatch *x = malloc(sizeof *x);
    make_batch(&r, 6, 7, &c, x);
    double l0;
    CHECK_OK(em_dlrm_forward_backward(m, &x->b, &l0, NULL));
    float z0[8];
    CHECK_OK(em_dlrm_forward(m, &x->b, z0, NULL));
    fprintf(stderr, "  loss %.4f, logits %.3f %.3f %.3f ...\n", l0, z0[0], z0[1], z0[2]);
    int checked = 0, bad = 0;
    for (int i = 0; i < np; i++) {
        size_t n;
        float *w = em_dlrm_param(m, p[i].name, 0, &n);
        const float *g = em_dlrm_param(m, p[i].name, 1, NULL);
        float *gc = malloc(n * sizeof(float));
        memcpy(gc, g, n * sizeof(float));
        for (size_t j = 0; j < n; j += 1 + n / 5) {
            const float h = 1e-2f, w0 = w[j];
            w[j] = w0 + h;
            double lp = loss_of(m, &x->b, NULL);
            w[j] = w0 - h;
            double lm = loss_of(m, &x->b, NULL);
            w[j] = w0;
            double fd = (lp - lm) / (2.0 * (double)h);
            double tol = 3e-2 * fabs(fd) + 5e-4;
            checked++;
            if (fabs(fd - gc[j]) > tol) {
                bad++;
                fprintf(stderr, "  %s[%zu]: finite difference %.6g, backward %.6g\n", p[i].name, j, fd, gc[j]);
            }
        }
        free(gc);
    }
    fprintf(stderr, "  %d finite differences checked\n", checked);
    CHECK(checked > 60 && bad == 0);
    free(x);
    em_dlrm_free(m);
}

/* ------------------------------------------------------------ checkpoints */

static void test_checkpoint_roundtrip(void) {
    for (int share = 0; share <= 1; share++) {
        em_dlrm_cfg c = small_cfg(share, "gdpa:relu,hsp,swa:2,jattn:causal");
        c.dense_opt = em_optim_default(EM_OPT_ADAGRAD, 0.02f);
        em_pool *pool;
        CHECK_OK(em_pool_create(&pool, 2));
        em_dlrm *a, *b;
        CHECK_OK(em_dlrm_create(&a, &c, pool));
        run_steps(a, 4, 20, 40, 1, pool);
        char path[] = "/tmp/ember_seqck_XXXXXX";
        int fd = mkstemp(path);
        close(fd);
        em_st_meta extra[] = {{"train.pos", "77"}};
        CHECK_OK(em_dlrm_save(a, path, extra, 1));
        em_st *st = NULL;
        CHECK_OK(em_dlrm_load(&b, path, &st, pool));
        if (!b) {
            em_dlrm_free(a);
            em_pool_free(pool);
            continue;
        }
        const char *js = st ? em_st_meta_get(st, "ember.model") : NULL;
        CHECK(js && strstr(js, "\"seq\"") && strstr(js, "gdpa:relu,hsp,swa:2,jattn:causal"));
        CHECK(st && em_st_find(st, "seq.1.kron_a") && em_st_find(st, "optim.sum.seq.tgt.v.weight"));
        CHECK(st && (em_st_find(st, "seq.items.weight") != NULL) == !share);
        em_st_close(st);
        const em_dlrm_cfg *cb = em_dlrm_config(b);
        CHECK(cb->seq.num_seq == 1 && cb->seq.share == share && cb->seq.n_blocks == 4 && cb->seq.max_len == 300 &&
              cb->seq.blocks[2].window == 2 && cb->seq.blocks[3].causal == 1 && cb->seq.blocks[0].act == EM_GDPA_RELU);
        CHECK(em_dlrm_step_count(b) == 4);
        CHECK(same_model(a, b));
        run_steps(a, 3, 20, 40, 2, pool);
        run_steps(b, 3, 20, 40, 2, pool);
        CHECK(same_model(a, b));
        /* the config JSON round trip */
        char *j1 = em_dlrm_cfg_to_json(&c), *j2 = em_dlrm_cfg_to_json(cb);
        CHECK(j1 && j2 && strcmp(j1, j2) == 0);
        em_free(j1), em_free(j2);
        /* a corrupt tower tensor is refused */
        FILE *f = fopen(path, "r+b");
        fseek(f, -40, SEEK_END);
        fputc('x', f);
        fclose(f);
        em_dlrm *d = NULL;
        CHECK(em_dlrm_load(&d, path, NULL, pool) == EM_ERR_CORRUPT && d == NULL);
        unlink(path);
        em_dlrm_free(a), em_dlrm_free(b);
        em_pool_free(pool);
    }
    /* a plain DLRM's configuration has no "seq" key */
    em_dlrm_cfg p = small_cfg(0, "none");
    memset(&p.seq, 0, sizeof p.seq);
    p.top[0] = 8 + 4 * 5 / 2;
    CHECK_OK(em_dlrm_cfg_validate(&p));
    char *j = em_dlrm_cfg_to_json(&p);
    CHECK(j && !strstr(j, "seq"));
    em_free(j);
}

/* ------------------------------------------------------ allocation failures */

static void test_alloc_failure(void) {
    for (int share = 0; share <= 1; share++) {
        em_dlrm_cfg c = small_cfg(share, "jattn,gdpa,hsp,swa:2");
        size_t base = em_mem_in_use();
        int ok = 0;
        rbatch *x = malloc(sizeof *x);
        for (long k = 0; k < 120; k++) {
            em_rng r;
            em_rng_seed(&r, 3);
            make_batch(&r, 9, 140, &c, x);
            em_dlrm *m = NULL;
            em_mem_fail_after(k);
            em_status s = em_dlrm_create(&m, &c, NULL);
            if (s == EM_OK) {
                s = em_dlrm_train_step(m, &x->b, NULL, NULL);
                CHECK(s == EM_OK || s == EM_ERR_NOMEM);
                if (s == EM_OK) {
                    float z[16];
                    s = em_dlrm_forward(m, &x->b, z, NULL);
                    CHECK(s == EM_OK || s == EM_ERR_NOMEM);
                    ok += s == EM_OK;
                }
                em_dlrm_free(m);
            } else {
                CHECK(s == EM_ERR_NOMEM && m == NULL);
            }
            em_mem_fail_after(-1);
            CHECK(em_mem_in_use() == base);
        }
        CHECK(ok > 0);
        free(x);
    }
}

/* ------------------------------------------------- configuration and misc */

static void test_blocks_and_flops(void) {
    em_seq_cfg c = em_seq_default();
    char buf[512];
    CHECK_OK(em_seq_parse_blocks(&c, "compskip:4", EM_GDPA_GELU, 5));
    em_seq_format_blocks(&c, buf, sizeof buf);
    CHECK(strcmp(buf, "gdpa:gelu,hsp,swa:5,gdpa:gelu,hsp,swa:5") == 0);
    CHECK_OK(em_seq_parse_blocks(&c, "full:2", EM_GDPA_SILU, 8));
    em_seq_format_blocks(&c, buf, sizeof buf);
    CHECK(strcmp(buf, "gdpa:silu,hsp,gdpa:silu,hsp") == 0);
    CHECK_OK(em_seq_parse_blocks(&c, "jattn:causal,swa:causal:16,gdpa:causal:relu2,hsp", EM_GDPA_SILU, 8));
    em_seq_format_blocks(&c, buf, sizeof buf);
    CHECK(strcmp(buf, "jattn:causal,swa:16:causal,gdpa:relu2:causal,hsp") == 0);
    em_seq_cfg d = c;
    CHECK_OK(em_seq_parse_blocks(&d, buf, EM_GDPA_IDENTITY, 0));
    CHECK(memcmp(d.blocks, c.blocks, sizeof c.blocks[0] * 4) == 0 && d.n_blocks == 4);
    CHECK_OK(em_seq_parse_blocks(&c, "none", EM_GDPA_SILU, 8));
    CHECK(c.n_blocks == 0 && em_seq_extra(&c) == 1);
    em_seq_format_blocks(&c, buf, sizeof buf);
    CHECK(strcmp(buf, "none") == 0);
    const char *bad[] = {"gdpa:foo", "attn", "swa:-1", "hsp:causal", "compskip:0", "full:x", "gdpa,,swa", "jattn:3"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        em_seq_cfg e = em_seq_default();
        int before = e.n_blocks;
        CHECK(em_seq_parse_blocks(&e, bad[i], EM_GDPA_SILU, 8) == EM_ERR_INVALID);
        CHECK(e.n_blocks == before && strlen(em_last_error()) > 0);
    }
    /* FLOPs: CompSkip's odd layers visit (2w+1) keys per query and skip the pooling */
    em_seq_cfg full = em_seq_default(), skip = em_seq_default();
    CHECK_OK(em_seq_parse_blocks(&full, "full:4", EM_GDPA_SILU, 8));
    CHECK_OK(em_seq_parse_blocks(&skip, "compskip:4", EM_GDPA_SILU, 8));
    const int D = 16;
    double ff = em_seq_flops_example(&full, D, 64), fs = em_seq_flops_example(&skip, D, 64);
    /* by hand: per gdpa layer 3 projections + 4 D L^2, hsp 2 projections + 4 D m L + kron,
     * swa 3 projections + 4 D (pairs of a +-8 window in 64), target 2 D^2 + 2 proj + 4 D L */
    double L = 64, DD = D * D, proj = 2 * L * DD, gd = 3 * proj + 4 * D * L * L;
    double hs = 2 * proj + 4.0 * D * 4 * L + 2 * (2.0 * 2 * 4 * D + 2.0 * 2 * DD);
    double pairs = L + 2 * (8 * L - 8 * 9 / 2.0), sw = 3 * proj + 4 * D * pairs, tg = 2 * DD + 2 * proj + 4 * D * L;
    CHECK_NEAR(ff, 4 * (gd + hs) + tg, 1e-6 * ff);
    CHECK_NEAR(fs, 2 * (gd + hs) + 2 * sw + tg, 1e-6 * fs);
    CHECK(fs < 0.75 * ff);
    /* the tower's statistics add up per example */
    em_dlrm_cfg mc = small_cfg(1, "compskip:2");
    em_dlrm *m;
    CHECK_OK(em_dlrm_create(&m, &mc, NULL));
    rbatch *x = malloc(sizeof *x);
    em_rng r;
    em_rng_seed(&r, 11);
    make_batch(&r, 10, 50, &mc, x);
    float z[16];
    CHECK_OK(em_dlrm_forward(m, &x->b, z, NULL));
    em_seq_stats ss;
    em_seqtower_stats(em_dlrm_seqtower(m), &ss);
    double want = 0;
    for (int b = 0; b < 10; b++) want += em_seq_flops_example(&mc.seq, mc.dim, x->soff[b + 1] - x->soff[b]);
    CHECK_NEAR(ss.last_flops, want, 1e-9 * want);
    CHECK(ss.examples == 10 && ss.events == (double)x->soff[10]);
    free(x);
    em_dlrm_free(m);
}

static void test_bad_config_and_batch(void) {
    em_dlrm_cfg c = small_cfg(1, "gdpa,hsp");
    em_dlrm *m = NULL;
    em_dlrm_cfg e = c;
    e.top[0] -= 1;
    CHECK(em_dlrm_create(&m, &e, NULL) == EM_ERR_INVALID && strstr(em_last_error(), "sequence vectors"));
    e = c, e.seq.heads = 3;
    CHECK(em_dlrm_create(&m, &e, NULL) == EM_ERR_INVALID && strstr(em_last_error(), "heads"));
    e = c, e.seq.rows = 31;
    CHECK(em_dlrm_create(&m, &e, NULL) == EM_ERR_INVALID && strstr(em_last_error(), "shares"));
    e = c, e.seq.cand = 4;
    CHECK(em_dlrm_create(&m, &e, NULL) == EM_ERR_INVALID);
    e = c, e.seq.num_seq = 2;
    CHECK(em_dlrm_create(&m, &e, NULL) == EM_ERR_INVALID);
    e = c, e.seq.max_len = 0;
    CHECK(em_dlrm_create(&m, &e, NULL) == EM_ERR_INVALID);
    CHECK_OK(em_dlrm_create(&m, &c, NULL));
    rbatch *x = malloc(sizeof *x);
    em_rng r;
    em_rng_seed(&r, 2);
    make_batch(&r, 5, 10, &c, x);
    float z[8];
    /* no history in the batch */
    x->b.num_seq = 0, x->b.seq = NULL;
    CHECK(em_dlrm_forward(m, &x->b, z, NULL) == EM_ERR_INVALID && strstr(em_last_error(), "history"));
    x->b.num_seq = 1, x->b.seq = &x->s;
    /* an item out of range is named */
    int64_t keep = x->items[3];
    x->items[3] = 30;
    CHECK(em_dlrm_train_step(m, &x->b, NULL, NULL) == EM_ERR_INVALID && strstr(em_last_error(), "item 30"));
    x->items[3] = keep;
    /* every history empty, and a batch of one */
    for (int i = 0; i <= 5; i++) x->soff[i] = 0;
    CHECK_OK(em_dlrm_train_step(m, &x->b, NULL, NULL));
    make_batch(&r, 1, 10, &c, x);
    CHECK_OK(em_dlrm_train_step(m, &x->b, NULL, NULL));
    free(x);
    em_dlrm_free(m);
}

TEST_MAIN({"golden_share", test_golden_share}, {"golden_own", test_golden_own}, {"train_share", test_train_share},
          {"train_own", test_train_own}, {"finite_differences", test_finite_differences},
          {"threads_bitwise", test_threads_bitwise}, {"checkpoint_roundtrip", test_checkpoint_roundtrip},
          {"alloc_failure", test_alloc_failure}, {"blocks_and_flops", test_blocks_and_flops},
          {"bad_config_and_batch", test_bad_config_and_batch})
