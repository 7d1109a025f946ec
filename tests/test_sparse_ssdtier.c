/*
 * test_sparse_ssdtier.c - SSD-tier tables (ember/ssdtier.h) on a real RocksDB in a
 * mkdtemp directory: rows round-trip through eviction and reload bitwise equal to an
 * in-memory em_dyn trained on the same batches (SGD, AdaGrad, row-wise AdaGrad; sum and
 * mean pooling; 1-3 threads), the cache's byte limit, LRU and LFU eviction order,
 * prefetch changes no value, a restart in the middle of training equals the
 * uninterrupted run, corrupt or mismatched checkpoints are refused, allocation failures
 * leak nothing and change nothing, invalid arguments.
 */
#define _GNU_SOURCE /* nftw flags */
#include "test.h"
#include "scratch_util.h"

#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ember/dyntable.h"
#include "ember/ssdtier.h"

static const char *tdir(const char *name, char *buf, size_t cap) {
    snprintf(buf, cap, "%s/%s", t_scratch_dir("ssd"), name);
    return buf;
}

typedef struct {
    int T, D, B;
    uint64_t *ids;
    int64_t *off;
    float *dout;
    size_t nnz;
} batch;

static batch make_batch(em_rng *r, int T, int D, int B, int maxlen, const uint64_t *pool, size_t npool) {
    batch bt = {T, D, B, NULL, NULL, NULL, 0};
    bt.off = malloc(((size_t)T * B + 1) * sizeof(int64_t));
    bt.off[0] = 0;
    for (int u = 0; u < T * B; u++) bt.off[u + 1] = bt.off[u] + (int64_t)em_rng_below(r, (uint64_t)maxlen + 1);
    bt.nnz = (size_t)bt.off[T * B];
    bt.ids = malloc((bt.nnz + 1) * sizeof(uint64_t));
    /* skewed: half the draws from the first tenth of the pool */
    for (size_t k = 0; k < bt.nnz; k++)
        bt.ids[k] = pool[em_rng_below(r, 2) ? em_rng_below(r, npool / 10 + 1) : em_rng_below(r, npool)];
    bt.dout = malloc((size_t)B * T * D * sizeof(float));
    for (size_t i = 0; i < (size_t)B * T * D; i++) bt.dout[i] = (float)(em_rng_uniform(r) * 2 - 1);
    return bt;
}

static void free_batch(batch *bt) { free(bt->ids), free(bt->off), free(bt->dout); }

/* A fixed training sequence: nsteps batches drawn from a pool of npool ids. */
typedef struct {
    int n;
    batch *b;
    uint64_t *pool;
    size_t npool;
} seq;

static seq make_seq(uint64_t seed, int nsteps, int T, int D, int B, int maxlen, size_t npool) {
    seq q = {nsteps, calloc((size_t)nsteps, sizeof(batch)), malloc(npool * sizeof(uint64_t)), npool};
    em_rng r;
    em_rng_seed(&r, seed);
    for (size_t i = 0; i < npool; i++) q.pool[i] = em_rng_u64(&r);
    q.pool[0] = 0, q.pool[1] = UINT64_MAX, q.pool[2] = 1;
    for (int s = 0; s < nsteps; s++) q.b[s] = make_batch(&r, T, D, B, maxlen, q.pool, npool);
    return q;
}

static void free_seq(seq *q) {
    for (int s = 0; s < q->n; s++) free_batch(&q->b[s]);
    free(q->b), free(q->pool);
}

static em_ssd_cfg ssd_cfg(int T, int D, em_optim_kind k, em_pooling pool, const char *path, size_t cache) {
    em_optim_cfg o = em_optim_default(k, 0.05f);
    if (k != EM_OPT_SGD) o.init_accum = 0.01f;
    o.weight_decay = k == EM_OPT_SGD ? 0.01f : 0.f;
    em_ssd_cfg c = em_ssd_default(T, D, o, path, cache);
    c.pooling = pool;
    c.seed = 42;
    c.init_scale = 0.1f;
    return c;
}

static em_dyn_cfg dyn_cfg_of(const em_ssd_cfg *c) {
    em_dyn_cfg d = em_dyn_default(c->num_tables, c->dim, c->opt);
    d.pooling = c->pooling;
    d.seed = c->seed;
    d.init_scale = c->init_scale;
    return d;
}

static int state_size(const em_ssd_cfg *c) {
    return c->opt.kind == EM_OPT_SGD ? 0 : c->opt.kind == EM_OPT_ADAGRAD ? c->dim : 1;
}

/* Every row of the reference equals the store's (weights, state, count, last). */
static int rows_equal(em_ssd *s, em_dyn *d, const em_ssd_cfg *c) {
    int ok = 1, S = state_size(c);
    float *w = malloc((size_t)c->dim * 4), *st = malloc((size_t)(S + 1) * 4);
    for (int t = 0; t < c->num_tables; t++) {
        int64_t n = em_dyn_ids(d, t, NULL, 0);
        uint64_t *ids = malloc((size_t)(n + 1) * 8);
        em_dyn_ids(d, t, ids, n);
        for (int64_t i = 0; i < n; i++) {
            em_dyn_row r;
            em_dyn_lookup(d, t, ids[i], &r);
            int found = 0;
            int64_t cnt = -9, last = -9;
            CHECK_OK(em_ssd_read_row(s, t, ids[i], w, st, &cnt, &last, &found));
            if (!found || memcmp(w, r.w, (size_t)c->dim * 4) || (S && memcmp(st, r.state, (size_t)S * 4)) ||
                cnt != r.count || last != r.last) {
                if (ok) fprintf(stderr, "  row t%d id %llu differs (found %d)\n", t, (unsigned long long)ids[i], found);
                ok = 0;
            }
        }
        free(ids);
    }
    free(w), free(st);
    return ok;
}

/* Train both on the sequence [from, to), forward outputs compared bitwise. */
static int train_both(em_ssd *s, em_dyn *d, const seq *q, int from, int to, em_pool *pool, int prefetch) {
    int ok = 1;
    const batch *b0 = &q->b[from];
    size_t osz = (size_t)b0->B * b0->T * b0->D;
    float *o1 = malloc(osz * 4), *o2 = malloc(osz * 4);
    for (int i = from; i < to; i++) {
        const batch *b = &q->b[i];
        CHECK_OK(em_ssd_forward(s, o1, b->ids, b->off, b->B, EM_SSD_TRAIN, pool));
        if (prefetch && i + 1 < to) CHECK_OK(em_ssd_prefetch(s, q->b[i + 1].ids, q->b[i + 1].off, q->b[i + 1].B));
        if (d) {
            CHECK_OK(em_dyn_forward(d, o2, b->ids, b->off, b->B, EM_DYN_TRAIN, NULL));
            if (memcmp(o1, o2, osz * 4)) {
                if (ok) fprintf(stderr, "  step %d: forward differs\n", i);
                ok = 0;
            }
            CHECK_OK(em_dyn_backward_update(d, b->dout, b->ids, b->off, b->B, NULL));
        }
        CHECK_OK(em_ssd_backward_update(s, b->dout, b->ids, b->off, b->B, pool));
    }
    free(o1), free(o2);
    return ok;
}

static void check_limits(em_ssd *s, const em_ssd_cfg *c) {
    em_ssd_stats st = em_ssd_get_stats(s);
    CHECK(st.cache_rows <= st.capacity_rows);
    CHECK(st.cache_bytes <= c->cache_bytes);
}

/* ------------------------------------------------ round trip vs em_dyn */

static void roundtrip(em_optim_kind k, em_pooling pl, int D, int nth) {
    char wd[96];
    em_ssd_cfg c = ssd_cfg(3, D, k, pl, tdir("rt", wd, sizeof wd), 0);
    c.cache_bytes = 0;
    em_ssd *probe = NULL;
    /* a cache of about 150 rows for 3 tables x ~600 ids seen: most rows live on disk */
    c.cache_bytes = 1 << 20;
    CHECK_OK(em_ssd_create(&probe, &c));
    size_t rb = em_ssd_row_bytes(probe);
    em_ssd_free(probe);
    c.cache_bytes = 150 * rb + 4096;
    em_ssd *s = NULL;
    CHECK_OK(em_ssd_create(&s, &c));
    em_dyn_cfg dc = dyn_cfg_of(&c);
    em_dyn *d = NULL;
    CHECK_OK(em_dyn_create(&d, &dc));
    em_pool *pool = NULL;
    if (nth > 1) CHECK_OK(em_pool_create(&pool, nth));
    seq q = make_seq(7 + (uint64_t)k, 30, 3, D, 16, 3, 600);
    CHECK(train_both(s, d, &q, 0, q.n, pool, 0));
    check_limits(s, &c);
    em_ssd_stats st = em_ssd_get_stats(s);
    CHECK(st.evictions > 0 && st.misses > 0 && st.hits > 0 && st.disk_rows > 0 && st.bytes_written > 0 && st.bytes_read > 0);
    CHECK(st.rows == em_dyn_get_stats(d, -1).rows);
    for (int t = 0; t < 3; t++) CHECK(em_ssd_table_rows(s, t) == em_dyn_get_stats(d, t).rows);
    CHECK(em_ssd_step(s) == 30);
    CHECK(rows_equal(s, d, &c));
    /* eval: unseen ids read zeros, seen ones their rows; nothing is created */
    {
        batch b = q.b[3];
        uint64_t *ids2 = malloc((b.nnz + 1) * 8);
        for (size_t i = 0; i < b.nnz; i++) ids2[i] = i % 2 ? b.ids[i] : b.ids[i] ^ 0x5555555555555555ull;
        size_t osz = (size_t)b.B * 3 * (size_t)D;
        float *o1 = malloc(osz * 4), *o2 = malloc(osz * 4);
        CHECK_OK(em_ssd_forward(s, o1, ids2, b.off, b.B, EM_SSD_EVAL, pool));
        CHECK_OK(em_dyn_forward(d, o2, ids2, b.off, b.B, EM_DYN_EVAL, NULL));
        CHECK(memcmp(o1, o2, osz * 4) == 0);
        CHECK(em_ssd_get_stats(s).rows == st.rows);
        /* training after an eval that cached absent ids still matches */
        CHECK(train_both(s, d, &q, 0, 5, pool, 0));
        CHECK(rows_equal(s, d, &c));
        free(ids2), free(o1), free(o2);
    }
    /* flush writes everything: the disk then holds every row */
    CHECK_OK(em_ssd_flush(s));
    CHECK(em_ssd_get_stats(s).disk_rows == em_dyn_get_stats(d, -1).rows);
    free_seq(&q);
    em_pool_free(pool);
    em_dyn_free(d);
    em_ssd_free(s);
    struct stat sb;
    CHECK(stat(wd, &sb) != 0); /* the working directory is removed */
}

static void test_roundtrip_sgd(void) { roundtrip(EM_OPT_SGD, EM_POOL_SUM, 8, 1); }
static void test_roundtrip_adagrad(void) { roundtrip(EM_OPT_ADAGRAD, EM_POOL_MEAN, 12, 2); }
static void test_roundtrip_rowwise(void) { roundtrip(EM_OPT_ROWWISE_ADAGRAD, EM_POOL_SUM, 16, 3); }
static void test_roundtrip_rowwise_mean(void) { roundtrip(EM_OPT_ROWWISE_ADAGRAD, EM_POOL_MEAN, 5, 2); }

/* --------------------------------------------------------- cache limit */

static void test_cache_limit(void) {
    char wd[96];
    em_ssd_cfg c = ssd_cfg(2, 16, EM_OPT_ROWWISE_ADAGRAD, EM_POOL_SUM, tdir("lim", wd, sizeof wd), 64 << 10);
    em_ssd *s = NULL;
    CHECK_OK(em_ssd_create(&s, &c));
    int64_t cap = em_ssd_capacity_rows(s);
    CHECK(cap > 100 && (size_t)cap * em_ssd_row_bytes(s) <= c.cache_bytes);
    size_t base = em_mem_in_use();
    seq q = make_seq(3, 60, 2, 16, 20, 3, 3000);
    for (int i = 0; i < q.n; i++) {
        CHECK(train_both(s, NULL, &q, i, i + 1, NULL, 0));
        check_limits(s, &c);
    }
    em_ssd_stats st = em_ssd_get_stats(s);
    CHECK(st.cache_rows > cap / 2 && st.rows > 2 * cap); /* the tables outgrew the cache */
    (void)base;
    /* a batch with more unique rows than the cache is refused and changes nothing */
    {
        int B = (int)cap + 1;
        int64_t *off = malloc(((size_t)2 * B + 1) * 8);
        uint64_t *ids = malloc((size_t)2 * B * 8);
        off[0] = 0;
        for (int i = 0; i < 2 * B; i++) off[i + 1] = i < B ? i + 1 : B, ids[i] = 1000000 + (uint64_t)i;
        float *o = malloc((size_t)B * 2 * 16 * 4);
        em_status e = em_ssd_forward(s, o, ids, off, B, EM_SSD_TRAIN, NULL);
        CHECK(e == EM_ERR_INVALID && strstr(em_last_error(), "cache holds"));
        CHECK(em_ssd_get_stats(s).rows == st.rows);
        CHECK(train_both(s, NULL, &q, 0, 2, NULL, 0)); /* still usable */
        free(off), free(ids), free(o);
    }
    free_seq(&q);
    em_ssd_free(s);
}

/* ------------------------------------------------------- eviction order */

/* One table, one id per step (B = 1, bag of 1). */
static void touch(em_ssd *s, uint64_t id) {
    int64_t off[2] = {0, 1};
    float o[4], g[4] = {0};
    CHECK_OK(em_ssd_forward(s, o, &id, off, 1, EM_SSD_TRAIN, NULL));
    CHECK_OK(em_ssd_backward_update(s, g, &id, off, 1, NULL));
}

static em_ssd *small_store(em_ssd_policy pol, const char *name, int64_t *cap) {
    char wd[96];
    em_ssd_cfg c = ssd_cfg(1, 4, EM_OPT_SGD, EM_POOL_SUM, tdir(name, wd, sizeof wd), 1 << 20);
    em_ssd *s = NULL;
    CHECK_OK(em_ssd_create(&s, &c));
    size_t rb = em_ssd_row_bytes(s);
    em_ssd_free(s);
    c.cache_bytes = 12 * rb + 300; /* room for about 12 rows and the minimum index */
    c.policy = pol;
    c.evict_slack = 0.f;
    s = NULL;
    CHECK_OK(em_ssd_create(&s, &c));
    *cap = em_ssd_capacity_rows(s);
    return s;
}

static void test_evict_lru(void) {
    int64_t cap;
    em_ssd *s = small_store(EM_SSD_LRU, "lru", &cap);
    CHECK(cap >= 4 && cap <= 16);
    for (int64_t i = 0; i < cap; i++) touch(s, 100 + (uint64_t)i); /* fill: 100 .. 100+cap-1 */
    for (int64_t i = 0; i < cap; i++) CHECK(em_ssd_cached(s, 0, 100 + (uint64_t)i));
    touch(s, 100); /* 100 is now the most recent; 101 the least */
    touch(s, 500); /* evicts 101 */
    CHECK(!em_ssd_cached(s, 0, 101) && em_ssd_cached(s, 0, 100) && em_ssd_cached(s, 0, 500));
    touch(s, 501); /* evicts 102 */
    CHECK(!em_ssd_cached(s, 0, 102) && em_ssd_cached(s, 0, 103));
    /* the evicted rows come back from disk with their metadata */
    int found = 0;
    int64_t cnt, last;
    CHECK_OK(em_ssd_read_row(s, 0, 101, NULL, NULL, &cnt, &last, &found));
    CHECK(found && cnt == 1 && last == 1);
    touch(s, 101);
    CHECK_OK(em_ssd_read_row(s, 0, 101, NULL, NULL, &cnt, &last, &found));
    CHECK(found && cnt == 2 && last == cap + 3);
    CHECK(em_ssd_get_stats(s).evictions == 3);
    em_ssd_free(s);
}

static void test_evict_lfu(void) {
    int64_t cap;
    em_ssd *s = small_store(EM_SSD_LFU, "lfu", &cap);
    /* id 100+i touched (cap - i) times: 100+cap-1 is the least frequent */
    for (int64_t i = 0; i < cap; i++)
        for (int64_t r = 0; r < cap - i; r++) touch(s, 100 + (uint64_t)i);
    touch(s, 100 + (uint64_t)cap - 2); /* now cap-2 and cap-1... counts 3 and 1 */
    touch(s, 900);                      /* evicts the least frequent: 100+cap-1 */
    CHECK(!em_ssd_cached(s, 0, 100 + (uint64_t)cap - 1));
    for (int64_t i = 0; i < cap - 1; i++) CHECK(em_ssd_cached(s, 0, 100 + (uint64_t)i));
    touch(s, 901); /* 900 (count 1) is least frequent now */
    CHECK(!em_ssd_cached(s, 0, 900) && em_ssd_cached(s, 0, 901));
    /* a count survives eviction: 100+cap-1 comes back with count 1, evicting 901 (count 1,
     * older step) rather than anything hotter */
    touch(s, 100 + (uint64_t)cap - 1);
    CHECK(!em_ssd_cached(s, 0, 901));
    int found;
    int64_t cnt;
    CHECK_OK(em_ssd_read_row(s, 0, 100 + (uint64_t)cap - 1, NULL, NULL, &cnt, NULL, &found));
    CHECK(found && cnt == 2);
    em_ssd_free(s);
}

/* ------------------------------------------------------------- prefetch */

static void test_prefetch_identical(void) {
    char w1[96], w2[96];
    em_ssd_cfg c = ssd_cfg(3, 8, EM_OPT_ADAGRAD, EM_POOL_SUM, tdir("pfa", w1, sizeof w1), 48 << 10);
    em_ssd_cfg c2 = c;
    c2.path = tdir("pfb", w2, sizeof w2);
    em_ssd *a = NULL, *b = NULL;
    CHECK_OK(em_ssd_create(&a, &c));
    CHECK_OK(em_ssd_create(&b, &c2));
    em_pool *pool = NULL;
    CHECK_OK(em_pool_create(&pool, 2));
    seq q = make_seq(11, 40, 3, 8, 24, 3, 2000);
    em_dyn_cfg dc = dyn_cfg_of(&c);
    em_dyn *d = NULL;
    CHECK_OK(em_dyn_create(&d, &dc));
    CHECK(train_both(a, d, &q, 0, q.n, NULL, 0));
    /* b: prefetch of the next batch overlaps each backward */
    em_dyn *d2 = NULL;
    CHECK_OK(em_dyn_create(&d2, &dc));
    CHECK(train_both(b, d2, &q, 0, q.n, pool, 1));
    CHECK(rows_equal(a, d, &c) && rows_equal(b, d, &c2));
    em_ssd_stats sa = em_ssd_get_stats(a), sb = em_ssd_get_stats(b);
    CHECK(sb.prefetched > 0 && sb.prefetch_hits > 0);
    CHECK(sb.hit_rate > sa.hit_rate);
    CHECK(sa.rows == sb.rows);
    check_limits(b, &c2);
    /* a prefetch left running is waited for by free, and by save */
    CHECK_OK(em_ssd_prefetch(b, q.b[0].ids, q.b[0].off, q.b[0].B));
    CHECK_OK(em_ssd_wait(b));
    CHECK_OK(em_ssd_prefetch(b, q.b[1].ids, q.b[1].off, q.b[1].B));
    free_seq(&q);
    em_dyn_free(d), em_dyn_free(d2);
    em_pool_free(pool);
    em_ssd_free(a);
    em_ssd_free(b);
}

/* ------------------------------------------------------------- restart */

static void test_restart_mid_training(void) {
    char w1[96], w2[96], w3[96], ck[96];
    em_ssd_cfg c = ssd_cfg(2, 8, EM_OPT_ROWWISE_ADAGRAD, EM_POOL_MEAN, tdir("ra", w1, sizeof w1), 40 << 10);
    const int N = 20;
    seq q = make_seq(5, 2 * N, 2, 8, 24, 4, 2500);
    tdir("ckpt", ck, sizeof ck);
    /* uninterrupted */
    em_ssd *u = NULL;
    CHECK_OK(em_ssd_create(&u, &c));
    em_dyn_cfg dc = dyn_cfg_of(&c);
    em_dyn *d = NULL;
    CHECK_OK(em_dyn_create(&d, &dc));
    CHECK(train_both(u, d, &q, 0, 2 * N, NULL, 0));
    /* interrupted: N steps, save (twice: the second replaces the first), free */
    em_ssd_cfg c1 = c;
    c1.path = tdir("rb", w2, sizeof w2);
    em_ssd *a = NULL;
    CHECK_OK(em_ssd_create(&a, &c1));
    CHECK(train_both(a, NULL, &q, 0, N / 2, NULL, 1));
    CHECK_OK(em_ssd_save(a, ck));
    CHECK(train_both(a, NULL, &q, N / 2, N, NULL, 1));
    CHECK_OK(em_ssd_prefetch(a, q.b[N].ids, q.b[N].off, q.b[N].B)); /* saved while a prefetch runs */
    CHECK_OK(em_ssd_save(a, ck));
    em_ssd_stats sa = em_ssd_get_stats(a);
    em_ssd_free(a);
    /* resume in a new store with another cache size and policy */
    em_ssd_cfg c2 = c;
    c2.path = tdir("rc", w3, sizeof w3);
    c2.cache_bytes = 80 << 10;
    c2.policy = EM_SSD_LFU;
    em_ssd *b = NULL;
    CHECK_OK(em_ssd_create(&b, &c2));
    CHECK_OK(em_ssd_load(b, ck));
    CHECK(em_ssd_step(b) == N);
    em_ssd_stats sb = em_ssd_get_stats(b);
    CHECK(sb.rows == sa.rows && sb.disk_rows == sa.rows && sb.cache_rows == 0);
    CHECK(train_both(b, NULL, &q, N, 2 * N, NULL, 1));
    CHECK(rows_equal(b, d, &c) && rows_equal(u, d, &c));
    CHECK(em_ssd_step(b) == em_ssd_step(u));
    CHECK(em_ssd_get_stats(b).rows == em_ssd_get_stats(u).rows);
    for (int t = 0; t < 2; t++) CHECK(em_ssd_table_rows(b, t) == em_dyn_get_stats(d, t).rows);
    /* loading again rewinds to step N */
    CHECK_OK(em_ssd_load(b, ck));
    CHECK(em_ssd_step(b) == N);
    struct stat st;
    char p[160];
    snprintf(p, sizeof p, "%s.tmp-ssd", ck);
    CHECK(stat(p, &st) != 0);
    snprintf(p, sizeof p, "%s.old-ssd", ck);
    CHECK(stat(p, &st) != 0);
    em_ssd_free(b);
    em_ssd_free(u);
    em_dyn_free(d);
    free_seq(&q);
    t_rmtree(ck);
}

/* ---------------------------------------------------- corrupt metadata */

static void test_corrupt_refused(void) {
    char w1[96], w2[96], ck[96], bad[96], meta[160];
    em_ssd_cfg c = ssd_cfg(2, 8, EM_OPT_SGD, EM_POOL_SUM, tdir("ca", w1, sizeof w1), 32 << 10);
    seq q = make_seq(9, 8, 2, 8, 16, 3, 800);
    em_ssd *a = NULL;
    CHECK_OK(em_ssd_create(&a, &c));
    CHECK(train_both(a, NULL, &q, 0, 4, NULL, 0));
    tdir("cck", ck, sizeof ck);
    CHECK_OK(em_ssd_save(a, ck));
    CHECK(train_both(a, NULL, &q, 4, 8, NULL, 0));
    float w0[8], w1r[8];
    int found;
    CHECK_OK(em_ssd_read_row(a, 0, q.b[7].ids[0], w0, NULL, NULL, NULL, &found));

    /* a mismatched config is refused, naming the field */
    em_ssd_cfg c2 = c;
    c2.path = tdir("cb", w2, sizeof w2);
    c2.seed = 43;
    em_ssd *b = NULL;
    CHECK_OK(em_ssd_create(&b, &c2));
    CHECK(em_ssd_load(b, ck) == EM_ERR_INVALID && strstr(em_last_error(), "seed"));
    em_ssd_free(b);
    c2.seed = c.seed, c2.dim = 4;
    CHECK_OK(em_ssd_create(&b, &c2));
    CHECK(em_ssd_load(b, ck) == EM_ERR_INVALID && strstr(em_last_error(), "dim"));
    em_ssd_free(b);
    c2.dim = 8, c2.opt.kind = EM_OPT_ADAGRAD;
    CHECK_OK(em_ssd_create(&b, &c2));
    CHECK(em_ssd_load(b, ck) == EM_ERR_INVALID && strstr(em_last_error(), "optimizer"));
    em_ssd_free(b);

    /* a flipped byte in the metadata's data, a truncated file, no file, no db */
    snprintf(meta, sizeof meta, "%s/ssd.meta", ck);
    FILE *f = fopen(meta, "r+b");
    CHECK(f != NULL);
    fseek(f, -3, SEEK_END);
    int ch = fgetc(f);
    fseek(f, -3, SEEK_END);
    fputc(ch ^ 0x10, f);
    fclose(f);
    CHECK(em_ssd_load(a, ck) == EM_ERR_CORRUPT);
    CHECK(strstr(em_last_error(), "ssd.meta") != NULL);
    f = fopen(meta, "r+b");
    fseek(f, -3, SEEK_END);
    fputc(ch, f);
    fclose(f);
    CHECK(truncate(meta, 40) == 0);
    CHECK(em_ssd_load(a, ck) != EM_OK);
    unlink(meta);
    CHECK(em_ssd_load(a, ck) != EM_OK && strstr(em_last_error(), "ssd.meta"));
    tdir("nothing", bad, sizeof bad);
    CHECK(em_ssd_load(a, bad) != EM_OK);
    /* a good meta without its db */
    tdir("cck2", bad, sizeof bad);
    CHECK_OK(em_ssd_save(a, bad));
    char dbp[160];
    snprintf(dbp, sizeof dbp, "%s/db", bad);
    t_rmtree(dbp);
    CHECK(em_ssd_load(a, bad) == EM_ERR_CORRUPT);
    /* a damaged db: CURRENT names no manifest */
    CHECK_OK(em_ssd_save(a, bad));
    snprintf(dbp, sizeof dbp, "%s/db/CURRENT", bad);
    f = fopen(dbp, "w");
    fputs("MANIFEST-999999\n", f);
    fclose(f);
    CHECK(em_ssd_load(a, bad) == EM_ERR_CORRUPT);

    /* after every refusal the store is as it was */
    CHECK_OK(em_ssd_read_row(a, 0, q.b[7].ids[0], w1r, NULL, NULL, NULL, &found));
    CHECK(found && memcmp(w0, w1r, sizeof w0) == 0);
    CHECK(em_ssd_step(a) == 8);
    CHECK(train_both(a, NULL, &q, 0, 2, NULL, 0));
    em_ssd_free(a);
    t_rmtree(ck), t_rmtree(bad);
    free_seq(&q);
}

/* ------------------------------------------------------ allocation failures */

/* Create, train (with prefetch), save, load, train; returns the first failure. */
static em_status scenario(const seq *q, const em_ssd_cfg *c, const char *ck, float *final_row) {
    em_ssd *s = NULL;
    em_status st = em_ssd_create(&s, c);
    if (st) return st;
    size_t osz = (size_t)q->b[0].B * q->b[0].T * q->b[0].D;
    float *o = malloc(osz * 4);
    for (int i = 0; i < q->n && !st; i++) {
        const batch *b = &q->b[i];
        st = em_ssd_forward(s, o, b->ids, b->off, b->B, EM_SSD_TRAIN, NULL);
        if (!st && i + 1 < q->n) st = em_ssd_prefetch(s, q->b[i + 1].ids, q->b[i + 1].off, q->b[i + 1].B);
        if (!st) st = em_ssd_backward_update(s, b->dout, b->ids, b->off, b->B, NULL);
        if (!st && i == q->n / 2) st = em_ssd_save(s, ck);
    }
    if (!st) st = em_ssd_load(s, ck);
    int found = 0;
    if (!st) st = em_ssd_read_row(s, 0, q->b[q->n - 1].ids[0], final_row, NULL, NULL, NULL, &found);
    free(o);
    em_ssd_free(s);
    return st;
}

static void test_alloc_failures(void) {
    char wd[96], ck[96];
    em_ssd_cfg c = ssd_cfg(2, 8, EM_OPT_ADAGRAD, EM_POOL_SUM, tdir("af", wd, sizeof wd), 24 << 10);
    tdir("afck", ck, sizeof ck);
    seq q = make_seq(13, 6, 2, 8, 12, 3, 600);
    float ref[8], row[8];
    size_t base = em_mem_in_use();
    CHECK_OK(scenario(&q, &c, ck, ref));
    CHECK(em_mem_in_use() == base);
    int failures = 0, n;
    for (n = 0; n < 2000; n++) {
        em_mem_fail_after(n);
        em_status st = scenario(&q, &c, ck, row);
        em_mem_fail_after(-1);
        if (em_mem_in_use() != base) {
            fprintf(stderr, "  leak after failing at allocation %d (%s)\n", n, em_last_error());
            CHECK(0);
            break;
        }
        if (st == EM_OK) break;
        if (st != EM_ERR_NOMEM) {
            fprintf(stderr, "  allocation %d: %s (%s)\n", n, em_status_str(st), em_last_error());
            CHECK(0);
        }
        failures++;
    }
    CHECK(n < 2000 && failures > 10);
    CHECK(memcmp(ref, row, sizeof ref) == 0);
    free_seq(&q);
    t_rmtree(ck);
}

/* ------------------------------------------------------------- invalid */

static void test_invalid(void) {
    char wd[96], p[160];
    em_ssd_cfg c = ssd_cfg(2, 8, EM_OPT_SGD, EM_POOL_SUM, tdir("inv", wd, sizeof wd), 1 << 20);
    em_ssd *s = NULL;
    em_ssd_cfg b = c;
    b.dim = 0;
    CHECK(em_ssd_create(&s, &b) == EM_ERR_INVALID && strstr(em_last_error(), "dim"));
    b = c, b.opt.kind = EM_OPT_ADAM;
    CHECK(em_ssd_create(&s, &b) == EM_ERR_INVALID && strstr(em_last_error(), "opt.kind"));
    b = c, b.cache_bytes = 100;
    CHECK(em_ssd_create(&s, &b) == EM_ERR_INVALID && strstr(em_last_error(), "cache_bytes"));
    b = c, b.path = NULL;
    CHECK(em_ssd_create(&s, &b) == EM_ERR_INVALID);
    b = c, b.evict_slack = 0.9f;
    CHECK(em_ssd_create(&s, &b) == EM_ERR_INVALID && strstr(em_last_error(), "evict_slack"));
    b = c, b.path = "/nonexistent-dir-for-ember/x";
    CHECK(em_ssd_create(&s, &b) == EM_ERR_IO);
    CHECK(s == NULL);
    /* a non-empty directory that is not ours is refused and left alone */
    CHECK(mkdir(wd, 0755) == 0);
    snprintf(p, sizeof p, "%s/precious.txt", wd);
    FILE *f = fopen(p, "w");
    fputs("keep me\n", f);
    fclose(f);
    CHECK(em_ssd_create(&s, &c) == EM_ERR_INVALID && strstr(em_last_error(), "refusing"));
    CHECK(access(p, F_OK) == 0);
    unlink(p);
    /* a previous store's directory is reused */
    CHECK_OK(em_ssd_create(&s, &c));
    em_ssd *s2 = NULL;
    CHECK(em_ssd_create(&s2, &c) == EM_ERR_INVALID && strstr(em_last_error(), "in use")); /* one store per dir */
    em_ssd_free(s2);
    uint64_t ids[2] = {1, 2};
    int64_t off[5] = {0, 1, 2, 2, 2};
    float o[2 * 2 * 8], g[2 * 2 * 8] = {0};
    CHECK(em_ssd_backward_update(s, g, ids, off, 2, NULL) == EM_ERR_INVALID);
    int64_t bad[5] = {0, 2, 1, 2, 2};
    CHECK(em_ssd_forward(s, o, ids, bad, 2, EM_SSD_TRAIN, NULL) == EM_ERR_INVALID && strstr(em_last_error(), "offsets"));
    CHECK(em_ssd_prefetch(s, ids, bad, 2) == EM_ERR_INVALID);
    CHECK_OK(em_ssd_forward(s, o, ids, off, 2, EM_SSD_TRAIN, NULL));
    uint64_t other[2] = {1, 3};
    CHECK(em_ssd_backward_update(s, g, other, off, 2, NULL) == EM_ERR_INVALID);
    CHECK_OK(em_ssd_backward_update(s, g, ids, off, 2, NULL));
    CHECK(em_ssd_backward_update(s, g, ids, off, 2, NULL) == EM_ERR_INVALID);
    int found = 1;
    CHECK(em_ssd_read_row(s, 5, 1, NULL, NULL, NULL, NULL, &found) == EM_ERR_INVALID);
    CHECK_OK(em_ssd_read_row(s, 1, 77, NULL, NULL, NULL, NULL, &found));
    CHECK(found == 0);
    em_ssd_free(s);
    em_ssd_free(NULL);
}

static void test_cleanup(void) {
    if (t_scratch[0]) t_rmtree(t_scratch);
    struct stat st;
    CHECK(!t_scratch[0] || stat(t_scratch, &st) != 0);
}

TEST_MAIN({"roundtrip_sgd", test_roundtrip_sgd}, {"roundtrip_adagrad", test_roundtrip_adagrad},
          {"roundtrip_rowwise", test_roundtrip_rowwise}, {"roundtrip_rowwise_mean", test_roundtrip_rowwise_mean},
          {"cache_limit", test_cache_limit}, {"evict_lru", test_evict_lru}, {"evict_lfu", test_evict_lfu},
          {"prefetch_identical", test_prefetch_identical}, {"restart_mid_training", test_restart_mid_training},
          {"corrupt_refused", test_corrupt_refused}, {"alloc_failures", test_alloc_failures},
          {"invalid", test_invalid}, {"cleanup", test_cleanup})
