/*
 * test_model_ssdtables.c - the DLRM with SSD-tier tables (EM_TABLES_SSD, a real
 * RocksDB in a mkdtemp directory): training is bitwise the dynamic kind without a
 * budget (losses, logits, every row) though the cache holds a fraction of the rows,
 * with or without prefetch of the next batch; a checkpoint round trip continues
 * bitwise; an evaluation creates no rows; a checkpoint whose tables are of another
 * step is refused; the configuration's JSON keeps the SSD fields.
 */
#define _GNU_SOURCE /* nftw flags */
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include "test.h"
#include "scratch_util.h"

enum { NT = 3, ND = 3, D = 8, B = 32 };

static const char *tdir(void) { return t_scratch_dir("ssdm"); }

static em_dlrm_cfg cfg_for(em_table_kind kind, em_optim_kind sk, int64_t cache) {
    em_dlrm_cfg c;
    memset(&c, 0, sizeof c);
    c.num_dense = ND, c.num_tables = NT, c.dim = D;
    int bot[] = {ND, 16, D}, top[] = {D + (NT + 1) * NT / 2, 16, 1};
    c.n_bot = 3, c.n_top = 3;
    memcpy(c.bot, bot, sizeof bot);
    memcpy(c.top, top, sizeof top);
    c.dense_opt = em_optim_default(EM_OPT_ADAM, 0.01f);
    c.sparse_opt = em_optim_default(sk, 0.05f);
    c.seed = 11;
    c.tables = em_tables_default(kind, D);
    for (int t = 0; t < NT; t++) c.rows[t] = EM_ROWS_RAW;
    if (kind == EM_TABLES_SSD) {
        snprintf(c.tables.ssd_dir, sizeof c.tables.ssd_dir, "%s/stores", tdir());
        c.tables.ssd_cache_bytes = cache;
    }
    return c;
}

typedef struct {
    float dense[B * ND], label[B];
    int64_t idx[B * NT * 3], off[B * NT + 1];
    em_batch b;
} tbatch;

/* Raw 64-bit ids: cardinalities 40, 500, 7 hashed (plus `fresh` for unseen ids). */
static void make_batch(em_rng *r, tbatch *tb, uint64_t fresh) {
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
            for (int j = 0; j < len; j++)
                tb->idx[k++] = (int64_t)em_mix64(em_rng_below(r, card[t]) + fresh + 1000003u * (uint64_t)t);
            tb->off[t * B + i + 1] = k;
        }
}

static void eval_logits(em_dlrm *m, em_pool *pool, float *out) {
    em_rng r;
    em_rng_seed(&r, 999);
    tbatch tb;
    make_batch(&r, &tb, 0);
    CHECK_OK(em_dlrm_forward(m, &tb.b, out, pool));
}

/* Every row of the dynamic model equals the SSD model's. */
static int same_rows(em_dlrm *ssd, em_dlrm *dyn) {
    em_dyn *d = em_dlrm_dyn(dyn);
    em_ssd *s = em_dlrm_ssd(ssd);
    int ok = 1;
    for (int t = 0; t < NT && ok; t++) {
        int64_t n = em_dyn_ids(d, t, NULL, 0);
        uint64_t *ids = malloc(sizeof(uint64_t) * (size_t)(n + 1));
        em_dyn_ids(d, t, ids, n);
        for (int64_t i = 0; i < n && ok; i++) {
            em_dyn_row x;
            float w[D], st[D];
            int64_t cnt, last;
            int found = 0;
            em_dyn_lookup(d, t, ids[i], &x);
            ok = em_ssd_read_row(s, t, ids[i], w, st, &cnt, &last, &found) == EM_OK && found && cnt == x.count &&
                 last == x.last && !memcmp(w, x.w, sizeof w) && (!x.state || st[0] == x.state[0]);
        }
        ok = ok && em_ssd_table_rows(s, t) == n;
        free(ids);
    }
    return ok;
}

/* SSD == dynamic, bitwise, with a cache of a fraction of the rows, with and without
 * prefetch of the next batch. */
static void test_equals_dynamic(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    const em_optim_kind ok[3] = {EM_OPT_SGD, EM_OPT_ADAGRAD, EM_OPT_ROWWISE_ADAGRAD};
    for (int o = 0; o < 3; o++)
        for (int pf = 0; pf < 2; pf++) {
            em_dlrm_cfg cs = cfg_for(EM_TABLES_SSD, ok[o], 24 << 10), cd = cfg_for(EM_TABLES_DYNAMIC, ok[o], 0);
            em_dlrm *a = NULL, *b = NULL;
            CHECK_OK(em_dlrm_create(&a, &cs, pool));
            CHECK_OK(em_dlrm_create(&b, &cd, pool));
            if (!a || !b) continue;
            em_rng r;
            em_rng_seed(&r, 5);
            tbatch tb[2];
            make_batch(&r, &tb[0], 0);
            int same = 1;
            for (int s = 0; s < 40; s++) {
                make_batch(&r, &tb[(s + 1) & 1], 0);
                double la = 0, lb = 0;
                CHECK_OK(em_dlrm_train_step(a, &tb[s & 1].b, &la, pool));
                if (pf) CHECK_OK(em_dlrm_prefetch(a, &tb[(s + 1) & 1].b));
                CHECK_OK(em_dlrm_train_step(b, &tb[s & 1].b, &lb, pool));
                same &= la == lb;
            }
            CHECK(same);
            float la[B], lb[B];
            eval_logits(a, pool, la), eval_logits(b, pool, lb);
            CHECK(memcmp(la, lb, sizeof la) == 0);
            CHECK(same_rows(a, b));
            em_dlrm_table_stats sa, sb;
            CHECK_OK(em_dlrm_table_stats_get(a, -1, &sa));
            CHECK_OK(em_dlrm_table_stats_get(b, -1, &sb));
            em_ssd_stats ss = em_ssd_get_stats(em_dlrm_ssd(a));
            CHECK(sa.kind == EM_TABLES_SSD && sa.rows == sb.rows && sa.hit_rate > 0 && sa.hit_rate < 1);
            CHECK(ss.rows > 2 * ss.capacity_rows && ss.evictions > 0 && sa.bytes <= (size_t)cs.tables.ssd_cache_bytes);
            CHECK(!pf || ss.prefetched > 0);
            em_dlrm_free(a), em_dlrm_free(b);
        }
    em_pool_free(pool);
}

static void ckpt_path(char *buf, size_t cap, const char *tag) { snprintf(buf, cap, "%s/%s.safetensors", tdir(), tag); }

/* Save at step 20, load, 20 more steps on both: bitwise equal. */
static void test_roundtrip_and_continue(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    em_dlrm_cfg c = cfg_for(EM_TABLES_SSD, EM_OPT_ROWWISE_ADAGRAD, 24 << 10);
    em_dlrm *a = NULL, *b = NULL;
    CHECK_OK(em_dlrm_create(&a, &c, pool));
    em_rng r;
    em_rng_seed(&r, 6);
    tbatch tb;
    for (int s = 0; s < 20; s++) {
        make_batch(&r, &tb, 0);
        CHECK_OK(em_dlrm_train_step(a, &tb.b, NULL, pool));
    }
    char path[128], dir[140];
    ckpt_path(path, sizeof path, "rt");
    CHECK_OK(em_dlrm_save(a, path, NULL, 0));
    snprintf(dir, sizeof dir, "%s.ssd", path);
    struct stat sb;
    CHECK(stat(dir, &sb) == 0 && S_ISDIR(sb.st_mode));
    em_st *f = NULL;
    CHECK_OK(em_dlrm_load(&b, path, &f, pool));
    if (!b) goto out;
    CHECK(f && em_st_meta_get(f, "ember.ssd_step") && strcmp(em_st_meta_get(f, "ember.ssd_step"), "20") == 0);
    em_st_close(f);
    const em_dlrm_cfg *bc = em_dlrm_config(b);
    CHECK(bc->tables.kind == EM_TABLES_SSD && bc->tables.ssd_cache_bytes == c.tables.ssd_cache_bytes &&
          strcmp(bc->tables.ssd_dir, c.tables.ssd_dir) == 0);
    float la[B], lb[B];
    eval_logits(a, pool, la), eval_logits(b, pool, lb);
    CHECK(memcmp(la, lb, sizeof la) == 0);
    em_rng r2 = r;
    for (int s = 0; s < 20; s++) {
        double l1, l2;
        make_batch(&r, &tb, 0);
        CHECK_OK(em_dlrm_train_step(a, &tb.b, &l1, pool));
        make_batch(&r2, &tb, 0);
        CHECK_OK(em_dlrm_train_step(b, &tb.b, &l2, pool));
        CHECK(l1 == l2);
    }
    eval_logits(a, pool, la), eval_logits(b, pool, lb);
    CHECK(memcmp(la, lb, sizeof la) == 0);
    em_dlrm_table_stats sa, sb2;
    CHECK_OK(em_dlrm_table_stats_get(a, 1, &sa));
    CHECK_OK(em_dlrm_table_stats_get(b, 1, &sb2));
    CHECK(sa.rows == sb2.rows && sa.rows > 100);

    /* tables of another step (a save interrupted between the tables and the file) */
    char path2[128], dir2[140];
    ckpt_path(path2, sizeof path2, "rt2");
    snprintf(dir2, sizeof dir2, "%s.ssd", path2);
    CHECK_OK(em_dlrm_save(a, path2, NULL, 0));
    t_rmtree(dir);
    CHECK(rename(dir2, dir) == 0);
    em_dlrm *c2 = NULL;
    CHECK(em_dlrm_load(&c2, path, NULL, pool) == EM_ERR_CORRUPT && strstr(em_last_error(), "step"));
    CHECK(c2 == NULL);
    /* no tables at all */
    t_rmtree(dir);
    CHECK(em_dlrm_load(&c2, path, NULL, pool) != EM_OK && c2 == NULL);
out:
    em_dlrm_free(a), em_dlrm_free(b);
    em_pool_free(pool);
}

/* An evaluation forward of unseen ids creates no rows. */
static void test_eval_creates_no_rows(void) {
    em_dlrm_cfg c = cfg_for(EM_TABLES_SSD, EM_OPT_SGD, 1 << 20);
    em_dlrm *m = NULL;
    CHECK_OK(em_dlrm_create(&m, &c, NULL));
    em_rng r;
    em_rng_seed(&r, 7);
    tbatch tb;
    make_batch(&r, &tb, 0);
    CHECK_OK(em_dlrm_train_step(m, &tb.b, NULL, NULL));
    em_dlrm_table_stats s0, s1;
    CHECK_OK(em_dlrm_table_stats_get(m, -1, &s0));
    make_batch(&r, &tb, 1u << 30);
    float lg[B];
    CHECK_OK(em_dlrm_forward(m, &tb.b, lg, NULL));
    CHECK_OK(em_dlrm_table_stats_get(m, -1, &s1));
    CHECK(s0.rows == s1.rows && s0.rows > 0);
    em_dlrm_free(m);
}

static void test_config(void) {
    em_dlrm_cfg c = cfg_for(EM_TABLES_SSD, EM_OPT_SGD, 5 << 20), d;
    c.tables.ssd_policy = EM_SSD_LFU;
    char *j = em_dlrm_cfg_to_json(&c);
    CHECK(j && strstr(j, "\"ssd_dir\"") && strstr(j, "\"lfu\""));
    CHECK_OK(em_dlrm_cfg_from_json(j, &d));
    CHECK(d.tables.kind == EM_TABLES_SSD && d.tables.ssd_policy == EM_SSD_LFU && d.tables.ssd_cache_bytes == 5 << 20 &&
          strcmp(d.tables.ssd_dir, c.tables.ssd_dir) == 0);
    em_free(j);
    CHECK(em_table_kind_parse("ssd", &d.tables.kind) == EM_OK && d.tables.kind == EM_TABLES_SSD);
    CHECK(strcmp(em_table_kind_name(EM_TABLES_SSD), "ssd") == 0);
    /* no directory, no cache, ids reduced modulo rows: refused */
    em_dlrm *m = NULL;
    d = c, d.tables.ssd_dir[0] = 0;
    CHECK(em_dlrm_create(&m, &d, NULL) == EM_ERR_INVALID && strstr(em_last_error(), "ssd_dir"));
    d = c, d.tables.ssd_cache_bytes = 0;
    CHECK(em_dlrm_create(&m, &d, NULL) == EM_ERR_INVALID);
    d = c, d.rows[1] = 100;
    CHECK(em_dlrm_create(&m, &d, NULL) == EM_ERR_INVALID && strstr(em_last_error(), "raw"));
    CHECK(m == NULL);
}

static void test_cleanup(void) {
    if (t_scratch[0]) t_rmtree(t_scratch);
    struct stat st;
    CHECK(!t_scratch[0] || stat(t_scratch, &st) != 0);
}

TEST_MAIN({"equals_dynamic", test_equals_dynamic}, {"roundtrip_and_continue", test_roundtrip_and_continue},
          {"eval_creates_no_rows", test_eval_creates_no_rows}, {"config", test_config}, {"cleanup", test_cleanup})
