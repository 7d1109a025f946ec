/*
 * test_train_lookahead.c - the training loop's lookahead for SSD tables: a reader
 * holding two batches (em_reader_cfg.hold = 2) delivers the same batches as one
 * holding one and keeps the previous batch intact; em_train_run with SSD tables
 * prefetches every next batch's rows (prefetch counters non-zero) and ends with the
 * parameters, every row and the test metrics bitwise those of the same run without
 * lookahead and of the dynamic kind; a run stopped by max_steps and resumed from its
 * checkpoint ends bitwise as the uninterrupted run.
 */
#define _GNU_SOURCE /* nftw flags */
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include "test.h"
#include "scratch_util.h"

enum { NT = 26, ND = 13, D = 8, BATCH = 50, ROWS = 8000 };

static const char *tdir(void) { return t_scratch_dir("look"); }

static char train_path[128], test_path[128];

static void make_data(em_pool *pool) {
    if (train_path[0]) return;
    static const int64_t card[NT] = {9, 12, 30, 5, 40, 3, 8, 25, 4, 60000, 7, 11, 20,
                                     6, 15, 50, 3, 9, 60000, 4, 35, 6, 10, 18, 5, 60000};
    snprintf(train_path, sizeof train_path, "%s/train.tsv", tdir());
    snprintf(test_path, sizeof test_path, "%s/test.tsv", tdir());
    char prob[128];
    snprintf(prob, sizeof prob, "%s/test.prob", tdir());
    em_gen_cfg g = em_gen_default();
    g.train_rows = ROWS, g.test_rows = 1000, g.seed = 4, g.cardinality = card;
    CHECK_OK(em_gen_write(&g, train_path, test_path, prob, pool));
}

/* ------------------------------------------------------------------ reader */

static uint64_t batch_sum(const em_batch *b) {
    uint64_t h = (uint64_t)b->B * 0x9e3779b97f4a7c15ull ^ b->first_pos ^ (b->end_pos << 20);
    const size_t nnz = (size_t)b->offsets[(size_t)b->num_sparse * (size_t)b->B];
    for (size_t i = 0; i < nnz; i++) h = em_mix64(h ^ (uint64_t)b->indices[i]);
    for (int i = 0; i < b->B; i++) {
        uint32_t u;
        memcpy(&u, &b->label[i], 4);
        h = em_mix64(h ^ u ^ b->pos[i]);
        for (int j = 0; j < b->num_dense; j++) {
            memcpy(&u, &b->dense[(size_t)i * (size_t)b->num_dense + (size_t)j], 4);
            h = em_mix64(h ^ u);
        }
    }
    return h;
}

/* hold = 2: the same batches as hold = 1, and the previous batch is unchanged after the
 * next call (with and without the reader's own prefetch thread). */
static void test_reader_hold(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    make_data(pool);
    int64_t rows[NT];
    for (int t = 0; t < NT; t++) rows[t] = EM_ROWS_RAW;
    uint64_t ref[256];
    int nref = 0;
    for (int pf = 0; pf <= 3; pf += 3)
        for (int hold = 1; hold <= 2; hold++) {
            em_reader_cfg rc = {.path = train_path, .batch_size = 64, .num_dense = ND, .num_sparse = NT,
                                .table_rows = rows, .prefetch = pf, .skip = 7, .hold = hold};
            em_reader *r = NULL;
            CHECK_OK(em_reader_open(&r, &rc));
            if (!r) continue;
            const em_batch *b, *prev = NULL;
            uint64_t prev_sum = 0;
            int n = 0, ok = 1;
            while (em_reader_next(r, &b) == EM_OK) {
                if (hold == 2 && prev) ok &= prev != b && batch_sum(prev) == prev_sum;
                uint64_t h = batch_sum(b);
                if (pf == 0 && hold == 1 && n < 256) ref[nref++] = h;
                else ok &= n < nref && ref[n] == h;
                prev = b, prev_sum = h, n++;
            }
            CHECK(ok);
            CHECK(n == nref && n == (ROWS - 7 + 63) / 64);
            em_reader_free(r);
        }
    em_reader_cfg bad = {.path = train_path, .batch_size = 64, .num_dense = ND, .num_sparse = NT, .table_rows = rows,
                         .hold = 3};
    em_reader *r = NULL;
    CHECK(em_reader_open(&r, &bad) == EM_ERR_INVALID);
    em_pool_free(pool);
}

/* ---------------------------------------------------------------- training */

static em_train_cfg train_cfg(em_table_kind kind, const char *tag) {
    em_train_cfg c = em_train_default();
    em_dlrm_cfg *m = &c.model;
    memset(m, 0, sizeof *m);
    m->num_dense = ND, m->num_tables = NT, m->dim = D;
    int bot[] = {ND, 32, D}, top[] = {D + (NT + 1) * NT / 2, 32, 1};
    m->n_bot = 3, m->n_top = 3;
    memcpy(m->bot, bot, sizeof bot);
    memcpy(m->top, top, sizeof top);
    m->dense_opt = em_optim_default(EM_OPT_ADAM, 0.01f);
    m->sparse_opt = em_optim_default(EM_OPT_ROWWISE_ADAGRAD, 0.05f);
    m->seed = 11;
    m->tables = em_tables_default(kind, D);
    for (int t = 0; t < NT; t++) m->rows[t] = EM_ROWS_RAW;
    if (kind == EM_TABLES_SSD) {
        snprintf(m->tables.ssd_dir, sizeof m->tables.ssd_dir, "%s/stores", tdir());
        m->tables.ssd_cache_bytes = 480 << 10; /* ~2.9k rows: an evaluation batch (1024) holds ~2k unique */
    }
    c.train_path = train_path, c.test_path = test_path;
    c.batch = BATCH, c.epochs = 2, c.prefetch = 2;
    static char outs[8][128];
    static int no;
    if (tag) {
        char *o = outs[no++ & 7];
        snprintf(o, 128, "%s/%s", tdir(), tag);
        c.out_dir = o;
    }
    return c;
}

/* Dense parameters and optimizer state equal; every row of the dynamic model's tables
 * read the same from the SSD model (weights, state, count, last). */
static int same_model(em_dlrm *ssd, em_dlrm *ref) {
    int ok = 1;
    for (int w = 0; w < 3; w += 2) {
        size_t na, nb;
        float *a = em_dlrm_dense_block(ssd, w, &na), *b = em_dlrm_dense_block(ref, w, &nb);
        ok &= na == nb && (!na || memcmp(a, b, na * sizeof(float)) == 0);
    }
    ok &= em_dlrm_step_count(ssd) == em_dlrm_step_count(ref);
    em_ssd *s = em_dlrm_ssd(ssd);
    em_dyn *d = em_dlrm_dyn(ref);
    for (int t = 0; t < NT && ok && s && d; t++) {
        int64_t n = em_dyn_ids(d, t, NULL, 0);
        uint64_t *ids = malloc(sizeof(uint64_t) * (size_t)(n + 1));
        em_dyn_ids(d, t, ids, n);
        for (int64_t i = 0; i < n && ok; i++) {
            em_dyn_row x;
            float wv[D], st[D];
            int64_t cnt, last;
            int found = 0;
            em_dyn_lookup(d, t, ids[i], &x);
            ok = em_ssd_read_row(s, t, ids[i], wv, st, &cnt, &last, &found) == EM_OK && found && cnt == x.count &&
                 last == x.last && !memcmp(wv, x.w, sizeof wv) && (!x.state || st[0] == x.state[0]);
        }
        ok &= em_ssd_table_rows(s, t) == n;
        free(ids);
    }
    return ok;
}

/* SSD with lookahead == SSD without == dynamic, bitwise; the lookahead prefetched. */
static void test_lookahead_same_bits(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    make_data(pool);
    em_train_cfg cl = train_cfg(EM_TABLES_SSD, NULL), cn = cl, cd = train_cfg(EM_TABLES_DYNAMIC, NULL);
    cn.no_lookahead = 1;
    cn.prefetch = 0; /* the reader inline, too: batches do not depend on it */
    em_train_result rl, rn, rd;
    em_dlrm *ml = NULL, *mn = NULL, *md = NULL;
    CHECK_OK(em_train_run(&cl, pool, &rl, &ml));
    CHECK_OK(em_train_run(&cn, pool, &rn, &mn));
    CHECK_OK(em_train_run(&cd, pool, &rd, &md));
    if (ml && mn && md) {
        em_ssd_stats sl = em_ssd_get_stats(em_dlrm_ssd(ml)), sn = em_ssd_get_stats(em_dlrm_ssd(mn));
        fprintf(stderr, "  lookahead: hit rate %.3f (prefetched %llu, prefetch hits %llu); without: %.3f; rows %lld, cache %lld\n",
                sl.hit_rate, (unsigned long long)sl.prefetched, (unsigned long long)sl.prefetch_hits, sn.hit_rate,
                (long long)sl.rows, (long long)sl.capacity_rows);
        CHECK(sl.prefetched > 0 && sl.prefetch_hits > 0);
        CHECK(sn.prefetched == 0 && sn.prefetch_hits == 0);
        CHECK(sl.rows > 2 * sl.capacity_rows && sl.evictions > 0);
        CHECK(sl.hit_rate > sn.hit_rate);
        CHECK(rl.steps == 2 * ROWS / BATCH && rl.steps == rn.steps && rl.examples == rn.examples);
        CHECK(rl.reader.examples == rn.reader.examples && rl.reader.lines == rn.reader.lines);
        CHECK(rl.test.logloss == rn.test.logloss && rl.test.auc == rn.test.auc && rl.test.auc == rd.test.auc &&
              rl.test.logloss == rd.test.logloss);
        CHECK(same_model(ml, md));
        CHECK(same_model(mn, md));
    }
    em_dlrm_free(ml), em_dlrm_free(mn), em_dlrm_free(md);
    em_pool_free(pool);
}

/* Stop after 37 steps (checkpoint at the stop), resume to the end: the same bits as the
 * uninterrupted run, and the position recorded is that of the last trained batch (not
 * of the batch looked at beyond it). */
static void test_lookahead_resume(void) {
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    make_data(pool);
    em_train_cfg cu = train_cfg(EM_TABLES_SSD, "u"), ca = train_cfg(EM_TABLES_SSD, "a"),
                 cb = train_cfg(EM_TABLES_SSD, "b"), cd = train_cfg(EM_TABLES_DYNAMIC, NULL);
    ca.max_steps = 37;
    char ck[256];
    snprintf(ck, sizeof ck, "%s/checkpoint.safetensors", ca.out_dir);
    cb.resume = ck;
    em_train_result ru, ra, rb, rd;
    em_dlrm *mu = NULL, *mb = NULL, *md = NULL;
    CHECK_OK(em_train_run(&cu, pool, &ru, &mu));
    CHECK_OK(em_train_run(&ca, pool, &ra, NULL));
    CHECK(ra.steps == 37 && ra.reader.examples == 37 * BATCH);
    em_dlrm *mc = NULL;
    em_st *f = NULL;
    CHECK_OK(em_dlrm_load(&mc, ck, &f, pool));
    if (f) {
        const char *pos = em_st_meta_get(f, "train.pos"), *ep = em_st_meta_get(f, "train.epoch");
        CHECK(pos && ep && strtoull(pos, NULL, 10) == 37 * BATCH && atoi(ep) == 0);
        em_st_close(f);
    }
    em_dlrm_free(mc);
    CHECK_OK(em_train_run(&cb, pool, &rb, &mb));
    CHECK_OK(em_train_run(&cd, pool, &rd, &md));
    CHECK(rb.steps == ru.steps && rb.test.logloss == ru.test.logloss && rb.test.auc == ru.test.auc);
    if (mu && mb && md) {
        CHECK(same_model(mu, md));
        CHECK(same_model(mb, md));
        CHECK(em_ssd_get_stats(em_dlrm_ssd(mb)).prefetched > 0);
    }
    em_dlrm_free(mu), em_dlrm_free(mb), em_dlrm_free(md);
    em_pool_free(pool);
}

static void cleanup(void) {
    if (t_scratch[0]) t_rmtree(t_scratch);
}

static void test_zz_cleanup(void) { cleanup(); }

TEST_MAIN({"reader_hold", test_reader_hold}, {"lookahead_same_bits", test_lookahead_same_bits},
          {"lookahead_resume", test_lookahead_resume}, {"zz_cleanup", test_zz_cleanup})
