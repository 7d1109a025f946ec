/*
 * test_model_seq_events.c - the sequence tower's event-level personalization (Kunlun;
 * ember/seqtower.h: groups of event types with their own sub-towers):
 *   - forward (logits, loss, interaction, the tower's vectors), every dense gradient
 *     and the tables' gradients (one SGD step with lr 1) against PyTorch
 *     (tools/make_golden_seq_events.py), shared and own item tables, groups wider and
 *     narrower than D and of width D, a type in no group, sub-sequences of length 0,
 *     1 and 132 (two tiles), for 1, 2 and 3 threads; 5 training steps each;
 *   - one group of every type at width D is bitwise the tower without groups;
 *   - finite differences of the loss for the groups' parameters;
 *   - 1, 2 and 3 threads train bitwise the same model (histories up to 300 events);
 *   - checkpoint round trip (the groups in the configuration JSON, the tensors);
 *   - allocation failures on create, train step and forward: an error, nothing leaked;
 *   - specs: parsing, canonical form, precise errors; validation against the config;
 *   - FLOPs (per-group statistics, the formula), batches where every history is empty,
 *     where a group has no event in the whole batch, or where every event is dropped.
 */
#include <unistd.h>

#include "test.h"

static em_st *open_golden(void) {
    char buf[1024];
    em_st *st = NULL;
    em_status s = em_st_open(&st, em_test_path("golden/seq_events.safetensors", buf, sizeof buf));
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
        size_t numel;
        float *p = em_dlrm_param(m, t->name + pl + 1, 0, &numel);
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
    CHECK(c.seq.n_groups >= 2);
    c.dense_opt = em_optim_default(EM_OPT_SGD, 0.f);
    c.sparse_opt = em_optim_default(EM_OPT_SGD, 1.f);
    char pre[64], name[400];
    for (int nth = 1; nth <= 3; nth++) {
        em_pool *pool;
        CHECK_OK(em_pool_create(&pool, nth));
        em_dlrm *m;
        CHECK_OK(em_dlrm_create(&m, &c, pool));
        const em_seq_param *sp;
        int np = em_seqtower_params(em_dlrm_seqtower(m), &sp);
        CHECK(load_params(m, st, pfx) == 8 + c.num_tables + !c.seq.share + np);
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
        CHECK(ngrad == 8 + np);
        /* table gradients: one SGD step with lr 1 (dense lr 0) */
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
    int n = 0;
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
        n++;
    }
    CHECK(n > 30);
    /* the shared tables' optimizer state (the own item table's: through a checkpoint) */
    char tn[8][32];
    int nt = table_names(&c, tn);
    for (int k = 0; k < nt; k++) {
        size_t cnt;
        const float *s = NULL;
        em_st *f = NULL;
        char path[] = "/tmp/ember_evst_XXXXXX";
        if (strcmp(tn[k], "seq.items.weight") == 0) {
            int fd = mkstemp(path);
            close(fd);
            CHECK_OK(em_dlrm_save(m, path, NULL, 0));
            CHECK_OK(em_st_open(&f, path));
            const em_st_tensor *tt = f ? em_st_find(f, "optim.seq.items") : NULL;
            CHECK(tt);
            s = tt ? tt->data : NULL;
            cnt = tt ? (size_t)tt->shape[0] * (size_t)(tt->ndim == 2 ? tt->shape[1] : 1) : 0;
        } else {
            s = em_embbag_state(em_dlrm_embbag(m), k, &cnt);
        }
        snprintf(name, sizeof name, "%s.final_state.%s", pfx, tn[k]);
        const float *w = em_st_expect(st, name, EM_F32, (int64_t)cnt);
        CHECK(s && w);
        if (s && w) CHECK_REL(s, w, cnt, 3e-4);
        if (f) {
            em_st_close(f);
            unlink(path);
        }
    }
    em_dlrm_free(want);
    em_dlrm_free(m);
    em_pool_free(pool);
    em_st_close(st);
}

static void test_train_share(void) { golden_train("share"); }
static void test_train_own(void) { golden_train("own"); }

/* ------------------------------------------------------- random models and batches */

/* 4 tables, D = 8; groups from spec (NULL: no groups, blocks from `blocks`). */
static em_dlrm_cfg small_cfg(int share, const char *blocks, const char *events) {
    em_dlrm_cfg c;
    memset(&c, 0, sizeof c);
    c.num_dense = 3, c.num_tables = 4, c.dim = 8;
    int64_t rows[] = {50, 7, 100, 30};
    memcpy(c.rows, rows, sizeof rows);
    c.seq = em_seq_default();
    c.seq.max_len = 300, c.seq.cand = 3, c.seq.share = share, c.seq.rows = share ? 30 : 40;
    c.seq.hsp_m = 3, c.seq.hsp_m2 = 2, c.seq.hsp_k = 2;
    c.seq.num_types = 5;
    CHECK_OK(em_seq_parse_blocks(&c.seq, blocks, EM_GDPA_SILU, 3));
    if (events) CHECK_OK(em_seq_parse_events(&c.seq, events, EM_GDPA_SILU, 3));
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

/* B examples with up to 2 ids per bag and histories of 0..maxlen events of types
 * 0..ntypes-1 (the first example: maxlen events, mostly type 0). */
static void make_batch(em_rng *r, int B, int maxlen, int ntypes, const em_dlrm_cfg *c, rbatch *x) {
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
            x->type[n] = i == 0 && em_rng_uniform(r) < 0.9 ? 0 : (int32_t)em_rng_below(r, (uint64_t)ntypes);
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
        make_batch(&r, B, maxlen, 7, em_dlrm_config(m), x);
        double loss;
        CHECK_OK(em_dlrm_train_step(m, &x->b, &loss, pool));
        CHECK(isfinite(loss));
    }
    free(x);
}

/* Save both models and compare every tensor bitwise. */
static int same_model(em_dlrm *a, em_dlrm *b) {
    char pa[] = "/tmp/ember_eva_XXXXXX", pb[] = "/tmp/ember_evb_XXXXXX";
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

#define EVENTS3 "0:w12:h3:compskip:2;1,4:w4:h1:gdpa:tanh,hsp,jattn:causal;2:h2:swa:2"

static void test_threads_bitwise(void) {
    const char *specs[] = {EVENTS3, "0-1:w16:h2:full:1;2-3:w4:h2:none"};
    for (int k = 0; k < 2; k++) {
        em_dlrm_cfg c = small_cfg(k == 0, "none", specs[k]);
        em_dlrm *ref = NULL;
        for (int nth = 1; nth <= 3; nth++) {
            em_pool *pool;
            CHECK_OK(em_pool_create(&pool, nth));
            em_dlrm *m;
            CHECK_OK(em_dlrm_create(&m, &c, pool));
            run_steps(m, 5, 37, 300, 99, pool);
            if (!ref) ref = m;
            else {
                CHECK(same_model(ref, m));
                em_dlrm_free(m);
            }
            em_pool_free(pool);
        }
        em_dlrm_free(ref);
    }
}

/* One group of every type at width D with the tower's blocks is the tower without
 * groups, bit for bit (the gather is the identity; the same kernels run). */
static void test_one_group_is_the_tower(void) {
    const char *blocks = "jattn:causal,gdpa:gelu,hsp,swa:3";
    em_dlrm_cfg a = small_cfg(1, blocks, NULL), b = small_cfg(1, blocks, "0-4:h2");
    CHECK(b.seq.n_groups == 1 && b.seq.groups[0].n_blocks == 4);
    CHECK(em_seq_num_params(&a.seq, 8) == em_seq_num_params(&b.seq, 8) && em_seq_extra(&a.seq) == em_seq_extra(&b.seq));
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    em_dlrm *ma, *mb;
    CHECK_OK(em_dlrm_create(&ma, &a, pool));
    CHECK_OK(em_dlrm_create(&mb, &b, pool));
    /* same layout, renamed: copy the tower's block of parameters over */
    const em_seq_param *pa, *pb;
    int na = em_seqtower_params(em_dlrm_seqtower(ma), &pa), nb = em_seqtower_params(em_dlrm_seqtower(mb), &pb);
    CHECK(na == nb);
    CHECK(strcmp(pb[2].name, "seq.g0.0.q.weight") == 0 && strcmp(pb[nb - 1].name, "seq.g0.tgt.v.weight") == 0);
    for (int i = 0; i < na && i < nb; i++) {
        size_t n1, n2;
        float *x = em_dlrm_param(ma, pa[i].name, 0, &n1), *y = em_dlrm_param(mb, pb[i].name, 0, &n2);
        CHECK(x && y && n1 == n2 && pa[i].off == pb[i].off);
        if (x && y && n1 == n2) CHECK(memcmp(x, y, n1 * sizeof(float)) == 0); /* same init streams */
    }
    rbatch *x = malloc(sizeof *x);
    em_rng r;
    em_rng_seed(&r, 4);
    for (int s = 0; s < 3; s++) {
        make_batch(&r, 20, 150, 7, &a, x);
        double la, lb;
        CHECK_OK(em_dlrm_train_step(ma, &x->b, &la, pool));
        CHECK_OK(em_dlrm_train_step(mb, &x->b, &lb, pool));
        CHECK(la == lb);
    }
    float za[32], zb[32];
    CHECK_OK(em_dlrm_forward(ma, &x->b, za, pool));
    CHECK_OK(em_dlrm_forward(mb, &x->b, zb, pool));
    CHECK(memcmp(za, zb, 20 * sizeof(float)) == 0);
    for (int i = 0; i < na && i < nb; i++) {
        size_t n;
        const float *u = em_dlrm_param(ma, pa[i].name, 0, &n), *v = em_dlrm_param(mb, pb[i].name, 0, NULL);
        CHECK(u && v && memcmp(u, v, n * sizeof(float)) == 0);
    }
    free(x);
    em_dlrm_free(ma), em_dlrm_free(mb);
    em_pool_free(pool);
}

/* -------------------------------------------------- finite differences */

static double loss_of(em_dlrm *m, const em_batch *b, em_pool *pool) {
    float z[64];
    CHECK_OK(em_dlrm_forward(m, b, z, pool));
    return em_bce_logits_forward(z, b->label, (size_t)b->B);
}

static void test_finite_differences(void) {
    em_dlrm_cfg c = small_cfg(1, "none", "0:w12:h3:jattn:causal,gdpa:silu,hsp;1-2:w4:h2:swa:1,gdpa:tanh:causal;3:h1:hsp");
    c.seq.max_len = 7;
    em_dlrm *m;
    CHECK_OK(em_dlrm_create(&m, &c, NULL));
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
    make_batch(&r, 6, 7, 5, &c, x);
    double l0;
    CHECK_OK(em_dlrm_forward_backward(m, &x->b, &l0, NULL));
    int checked = 0, bad = 0;
    for (int i = 0; i < np; i++) {
        size_t n;
        float *w = em_dlrm_param(m, p[i].name, 0, &n);
        const float *g = em_dlrm_param(m, p[i].name, 1, NULL);
        float *gc = malloc(n * sizeof(float));
        memcpy(gc, g, n * sizeof(float));
        for (size_t j = 0; j < n; j += 1 + n / 4) {
            const float h = 1e-2f, w0 = w[j];
            w[j] = w0 + h;
            double lp = loss_of(m, &x->b, NULL);
            w[j] = w0 - h;
            double lm = loss_of(m, &x->b, NULL);
            w[j] = w0;
            double fd = (lp - lm) / (2.0 * (double)h);
            checked++;
            if (fabs(fd - gc[j]) > 3e-2 * fabs(fd) + 5e-4) {
                bad++;
                fprintf(stderr, "  %s[%zu]: finite difference %.6g, backward %.6g\n", p[i].name, j, fd, gc[j]);
            }
        }
        free(gc);
    }
    fprintf(stderr, "  %d finite differences checked (loss %.4f)\n", checked, l0);
    CHECK(checked > 80 && bad == 0);
    free(x);
    em_dlrm_free(m);
}

/* ------------------------------------------------------------ checkpoints */

static void test_checkpoint_roundtrip(void) {
    em_dlrm_cfg c = small_cfg(0, "gdpa", EVENTS3);
    c.dense_opt = em_optim_default(EM_OPT_ADAGRAD, 0.02f);
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    em_dlrm *a, *b = NULL;
    CHECK_OK(em_dlrm_create(&a, &c, pool));
    run_steps(a, 4, 20, 60, 1, pool);
    char path[] = "/tmp/ember_evck_XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    CHECK_OK(em_dlrm_save(a, path, NULL, 0));
    em_st *st = NULL;
    CHECK_OK(em_dlrm_load(&b, path, &st, pool));
    const char *js = st ? em_st_meta_get(st, "ember.model") : NULL;
    CHECK(js && strstr(js, "\"events\":\"0:w12:h3:gdpa:silu,hsp,swa:3;1,4:w4:h1:gdpa:tanh,hsp,jattn:causal;2:h2:swa:2\""));
    CHECK(st && em_st_find(st, "seq.g0.in.weight") && em_st_find(st, "seq.g1.out.weight") &&
          em_st_find(st, "optim.sum.seq.g2.0.q.weight") && !em_st_find(st, "seq.g2.in.weight") &&
          !em_st_find(st, "seq.0.q.weight"));
    em_st_close(st);
    if (b) {
        const em_dlrm_cfg *cb = em_dlrm_config(b);
        CHECK(cb->seq.n_groups == 3 && cb->seq.groups[1].types == 0x12 && cb->seq.groups[0].width == 12 &&
              cb->seq.groups[2].width == 0 && cb->seq.groups[1].heads == 1 && cb->seq.groups[1].blocks[2].causal == 1);
        CHECK(same_model(a, b));
        run_steps(a, 3, 20, 60, 2, pool);
        run_steps(b, 3, 20, 60, 2, pool);
        CHECK(same_model(a, b));
        char *j1 = em_dlrm_cfg_to_json(&c), *j2 = em_dlrm_cfg_to_json(cb);
        CHECK(j1 && j2 && strcmp(j1, j2) == 0);
        em_free(j1), em_free(j2);
    }
    /* a configuration with a bad "events" string is refused, naming it */
    char *j = em_dlrm_cfg_to_json(&c), *k = j ? strstr(j, "1,4:w4") : NULL;
    if (k) k[2] = '0'; /* "1,0:...": type 0 in two groups */
    em_dlrm_cfg d;
    CHECK(j && em_dlrm_cfg_from_json(j, &d) == EM_ERR_CORRUPT && strstr(em_last_error(), "type 0"));
    em_free(j);
    unlink(path);
    em_dlrm_free(a), em_dlrm_free(b);
    em_pool_free(pool);
}

/* ------------------------------------------------------ allocation failures */

static void test_alloc_failure(void) {
    em_dlrm_cfg c = small_cfg(1, "none", EVENTS3);
    size_t base = em_mem_in_use();
    int ok = 0;
    rbatch *x = malloc(sizeof *x);
    long k = 0;
    for (; k < 5000 && !ok; k++) { /* until every allocation got through once */
        em_rng r;
        em_rng_seed(&r, 3);
        make_batch(&r, 9, 140, 7, &c, x);
        em_dlrm *m = NULL;
        em_mem_fail_after(k);
        em_status s = em_dlrm_create(&m, &c, NULL);
        if (s == EM_OK) {
            s = em_dlrm_train_step(m, &x->b, NULL, NULL);
            CHECK(s == EM_OK || s == EM_ERR_NOMEM);
            if (s == EM_OK) {
                make_batch(&r, 12, 200, 7, &c, x); /* larger: the arenas grow */
                float z[16];
                s = em_dlrm_forward(m, &x->b, z, NULL);
                CHECK(s == EM_OK || s == EM_ERR_NOMEM);
                if (s == EM_OK) s = em_dlrm_train_step(m, &x->b, NULL, NULL);
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
    fprintf(stderr, "  failures injected at each of the first %ld allocations\n", k - 1);
    CHECK(ok > 0);
    free(x);
}

/* ------------------------------------------------- specs, FLOPs, odd batches */

static void test_specs(void) {
    em_seq_cfg c = em_seq_default();
    char buf[1024];
    CHECK_OK(em_seq_parse_events(&c, "2:w32:h4:full:2;1:w16:h2:gdpa:relu,hsp;0:w8:h1:swa:4", EM_GDPA_GELU, 5));
    CHECK(c.n_groups == 3 && c.groups[0].types == 4 && c.groups[0].width == 32 && c.groups[0].heads == 4 &&
          c.groups[0].n_blocks == 4 && c.groups[2].blocks[0].window == 4);
    em_seq_format_events(&c, buf, sizeof buf);
    CHECK(strcmp(buf, "2:w32:h4:gdpa:gelu,hsp,gdpa:gelu,hsp;1:w16:h2:gdpa:relu,hsp;0:w8:h1:swa:4") == 0);
    em_seq_cfg d = em_seq_default();
    CHECK_OK(em_seq_parse_events(&d, buf, EM_GDPA_IDENTITY, 0));
    CHECK(memcmp(d.groups, c.groups, sizeof c.groups) == 0 && d.n_groups == 3);
    /* defaults: width D, the tower's heads and blocks; ranges and lists of types */
    CHECK_OK(em_seq_parse_events(&c, "0-2,5", EM_GDPA_SILU, 8));
    CHECK(c.n_groups == 1 && c.groups[0].types == 0x27 && c.groups[0].width == 0 && c.groups[0].heads == 2 &&
          c.groups[0].n_blocks == c.n_blocks);
    em_seq_format_events(&c, buf, sizeof buf);
    CHECK(strcmp(buf, "0,1,2,5:h2:gdpa:silu,hsp,swa:8") == 0);
    CHECK_OK(em_seq_parse_events(&c, "3:h1:none;1", EM_GDPA_SILU, 8));
    CHECK(c.n_groups == 2 && c.groups[0].n_blocks == 0 && em_seq_extra(&c) == 1 + 3);
    CHECK_OK(em_seq_parse_events(&c, "none", EM_GDPA_SILU, 8));
    CHECK(c.n_groups == 0);
    em_seq_format_events(&c, buf, sizeof buf);
    CHECK(strcmp(buf, "none") == 0);
    /* bad specs: an error naming the problem, c unchanged */
    struct {
        const char *spec, *msg;
    } bad[] = {{"0;0", "type 0 is in groups 1 and 2"},
               {"1,1", "names type 1 twice"},
               {"x:w8", "bad event type 'x'"},
               {"64", "bad event type '64'"},
               {"3-1", "bad event type '3-1'"},
               {"0:w8:w9", "gives w twice"},
               {"0:w0", "width 0 outside"},
               {"0:h5000", "heads 5000 outside"},
               {"0:gdpa:w8", "bad option 'w8'"},
               {"0:bogus", "unknown block 'bogus'"},
               {"0:h2:", "empty or too long block list"},
               {";", "group 1 names no event type"},
               {"0;1;2;3;4;5;6;7;8", "more than 8 groups"},
               {"0,", "bad event type ''"}};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        em_seq_cfg e = em_seq_default();
        CHECK_OK(em_seq_parse_events(&e, "1:w4:h1", EM_GDPA_SILU, 8));
        CHECK(em_seq_parse_events(&e, bad[i].spec, EM_GDPA_SILU, 8) == EM_ERR_INVALID);
        CHECK(e.n_groups == 1 && e.groups[0].width == 4);
        if (!strstr(em_last_error(), bad[i].msg)) fprintf(stderr, "  '%s': %s\n", bad[i].spec, em_last_error());
        CHECK(strstr(em_last_error(), bad[i].msg) != NULL);
    }
    /* validation against the model: types told apart, heads dividing the width */
    em_seq_cfg v = em_seq_default();
    v.max_len = 10, v.rows = 5;
    CHECK_OK(em_seq_parse_events(&v, "4:w8", EM_GDPA_SILU, 8));
    CHECK(em_seq_cfg_validate(&v, 16, 1) == EM_ERR_INVALID && strstr(em_last_error(), "only 4 event types"));
    v.num_types = 5;
    CHECK_OK(em_seq_cfg_validate(&v, 16, 1));
    CHECK_OK(em_seq_parse_events(&v, "0:w12:h5", EM_GDPA_SILU, 8));
    CHECK(em_seq_cfg_validate(&v, 16, 1) == EM_ERR_INVALID && strstr(em_last_error(), "5 heads do not divide its width 12"));
    CHECK_OK(em_seq_parse_events(&v, "0:h3", EM_GDPA_SILU, 8));
    CHECK(em_seq_cfg_validate(&v, 16, 1) == EM_ERR_INVALID && strstr(em_last_error(), "width 16"));
    v.heads = 5; /* the tower's own heads are not used with groups */
    CHECK_OK(em_seq_parse_events(&v, "0:w12:h3", EM_GDPA_SILU, 8));
    CHECK_OK(em_seq_cfg_validate(&v, 16, 1));
}

static void test_flops(void) {
    em_seq_cfg c = em_seq_default();
    const int D = 16;
    CHECK_OK(em_seq_parse_events(&c, "0:w8:h1:gdpa:silu,hsp;1,2:h2:swa:4", EM_GDPA_SILU, 8));
    int64_t L[2] = {10, 30};
    /* by hand: group 0 at W = 8 (in 2 L D W, gdpa 3 proj + 4 W L^2, hsp 2 proj + 4 W m L +
     * kron, target 2 D W + 2 proj + 4 W L, out 2 E W D with E = 3); group 1 at W = D, no
     * projections (swa over +-4: pairs) */
    double W = 8, l = 10, pj = 2 * l * W * W;
    double g0 = 2 * l * D * W + (3 * pj + 4 * W * l * l) + (2 * pj + 4 * W * 4 * l + 2 * (2.0 * 2 * 4 * W + 2.0 * 2 * W * W)) +
                (2 * D * W + 2 * pj + 4 * W * l) + 2 * 3 * W * D;
    double l1 = 30, DD = (double)D * D, pj1 = 2 * l1 * DD, pairs = l1 + 2 * (4 * l1 - 4 * 5 / 2.0);
    double g1 = (3 * pj1 + 4 * D * pairs) + (2 * DD + 2 * pj1 + 4 * D * l1);
    CHECK_NEAR(em_seq_flops_groups(&c, D, L), g0 + g1, 1e-9 * (g0 + g1));
    /* the tower's statistics add up per group and example */
    em_dlrm_cfg mc = small_cfg(1, "none", EVENTS3);
    em_dlrm *m;
    CHECK_OK(em_dlrm_create(&m, &mc, NULL));
    rbatch *x = malloc(sizeof *x);
    em_rng r;
    em_rng_seed(&r, 11);
    make_batch(&r, 10, 50, 7, &mc, x);
    float z[16];
    CHECK_OK(em_dlrm_forward(m, &x->b, z, NULL));
    em_seq_stats ss;
    em_seqtower_stats(em_dlrm_seqtower(m), &ss);
    double want = 0, ev[3] = {0, 0, 0};
    const int gof[7] = {0, 1, 2, -1, 1, 1, 1}; /* 3 in no group; types >= 4 count as 4 (5 types) */
    for (int b = 0; b < 10; b++) {
        int64_t Lg[3] = {0, 0, 0};
        for (int64_t i = x->soff[b]; i < x->soff[b + 1]; i++)
            if (gof[x->type[i]] >= 0) Lg[gof[x->type[i]]]++;
        for (int g = 0; g < 3; g++) ev[g] += (double)Lg[g];
        want += em_seq_flops_groups(&mc.seq, mc.dim, Lg);
    }
    CHECK_NEAR(ss.last_flops, want, 1e-9 * want);
    CHECK(ss.group_events[0] == ev[0] && ss.group_events[1] == ev[1] && ss.group_events[2] == ev[2]);
    CHECK_NEAR(ss.group_flops[0] + ss.group_flops[1] + ss.group_flops[2], want, 1e-9 * want);
    CHECK(ss.examples == 10 && ss.events == (double)x->soff[10] && ss.block_flops[0] == 0);
    free(x);
    em_dlrm_free(m);
}

/* Batches where every history is empty, a group has no event at all, or every event is
 * dropped; a batch of one. Dropped events' items get no update. */
static void test_odd_batches(void) {
    em_dlrm_cfg c = small_cfg(0, "none", "0:w12:h3:compskip:2;2:w4:h1:jattn,hsp");
    em_dlrm *m;
    CHECK_OK(em_dlrm_create(&m, &c, NULL));
    rbatch *x = malloc(sizeof *x);
    em_rng r;
    em_rng_seed(&r, 2);
    make_batch(&r, 5, 10, 7, &c, x);
    for (int i = 0; i <= 5; i++) x->soff[i] = 0;
    CHECK_OK(em_dlrm_train_step(m, &x->b, NULL, NULL));
    /* only types 1 and 3 (in no group): nothing reaches the groups, no item moves */
    make_batch(&r, 6, 20, 7, &c, x);
    for (int64_t i = 0; i < x->soff[6]; i++) x->type[i] = i % 2 ? 1 : 3;
    size_t n;
    float *items = em_dlrm_param(m, "seq.items.weight", 0, &n), *keep = malloc(n * sizeof(float));
    memcpy(keep, items, n * sizeof(float));
    double loss;
    CHECK_OK(em_dlrm_train_step(m, &x->b, &loss, NULL));
    CHECK(isfinite(loss) && memcmp(keep, items, n * sizeof(float)) == 0);
    /* only type 0: group 2 is empty in the whole batch */
    for (int64_t i = 0; i < x->soff[6]; i++) x->type[i] = 0;
    CHECK_OK(em_dlrm_train_step(m, &x->b, &loss, NULL));
    CHECK(isfinite(loss) && memcmp(keep, items, n * sizeof(float)) != 0);
    float *g = em_dlrm_param(m, "seq.g1.0.q.weight", 1, &n);
    double s = 0;
    for (size_t i = 0; i < n; i++) s += fabs(g[i]);
    CHECK(g && s == 0); /* no events: no gradient for its blocks */
    make_batch(&r, 1, 10, 7, &c, x);
    CHECK_OK(em_dlrm_train_step(m, &x->b, NULL, NULL));
    free(keep);
    free(x);
    em_dlrm_free(m);
}

TEST_MAIN({"golden_share", test_golden_share}, {"golden_own", test_golden_own}, {"train_share", test_train_share},
          {"train_own", test_train_own}, {"one_group_is_the_tower", test_one_group_is_the_tower},
          {"finite_differences", test_finite_differences}, {"threads_bitwise", test_threads_bitwise},
          {"checkpoint_roundtrip", test_checkpoint_roundtrip}, {"alloc_failure", test_alloc_failure},
          {"specs", test_specs}, {"flops", test_flops}, {"odd_batches", test_odd_batches})
