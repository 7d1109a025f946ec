/*
 * test_sparse_dyntable.c - dynamic embedding tables (ember/dyntable.h): no id lost or
 * merged under hash collisions and deletions (against a naive reference map), eval
 * lookups read zeros and insert nothing, eviction order by age and by frequency (rows
 * made room for before a batch's new ones go in, never the batch's own), the budget in
 * rows and in bytes after every step and at the peak inside it, slot reuse, admission (count sketch, probability), forward
 * and fused backward + SGD / AdaGrad / row-wise AdaGrad against float64 references,
 * bitwise determinism over thread counts, checkpoint round trips, allocation failures.
 */
#include "test.h"

#include <unistd.h>

#include "ember/dyntable.h"

static em_optim_cfg opt_cfg(em_optim_kind k, float lr) { return em_optim_default(k, lr); }

static em_dyn *make_dyn(const em_dyn_cfg *c) {
    em_dyn *d = NULL;
    CHECK_OK(em_dyn_create(&d, c));
    return d;
}

/* One step on a batch: train forward then backward with dout (random if NULL). */
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
    for (size_t k = 0; k < bt.nnz; k++) bt.ids[k] = pool[em_rng_below(r, npool)];
    bt.dout = malloc((size_t)B * T * D * sizeof(float));
    for (size_t i = 0; i < (size_t)B * T * D; i++) bt.dout[i] = (float)(em_rng_uniform(r) * 2 - 1);
    return bt;
}

static void free_batch(batch *bt) { free(bt->ids), free(bt->off), free(bt->dout); }

static void step(em_dyn *d, const batch *bt, float *out, em_pool *pool) {
    CHECK_OK(em_dyn_forward(d, out, bt->ids, bt->off, bt->B, EM_DYN_TRAIN, pool));
    CHECK_OK(em_dyn_backward_update(d, bt->dout, bt->ids, bt->off, bt->B, pool));
}

/* Ids whose home bucket is the same for every capacity up to 2^bits. */
static void colliding_ids(uint64_t *out, size_t n, int bits, uint64_t start) {
    size_t i = 0;
    for (uint64_t x = start; i < n; x++)
        if ((em_mix64(x) & ((1ull << bits) - 1)) == 0) out[i++] = x;
}

/* ------------------------------------------------------ ids, collisions */

/* Ids that all share a home bucket (long probe runs), their neighbours (id+1, high bit
 * flipped), random 64-bit ids: each must keep its own row, through inserts and
 * evictions (backward-shift deletions inside the colliding runs). */
static void test_no_id_lost_or_merged(void) {
    enum { NC = 300, NR = 300, N = 2 * NC + NR };
    uint64_t *all = malloc(N * sizeof(uint64_t));
    colliding_ids(all, NC, 10, 12345);
    for (int i = 0; i < NC; i++) all[NC + i] = all[i] ^ (1ull << 63);
    em_rng r;
    em_rng_seed(&r, 7);
    for (int i = 0; i < NR; i++) all[2 * NC + i] = em_rng_u64(&r);
    all[2 * NC] = 0, all[2 * NC + 1] = UINT64_MAX; /* extremes */

    em_dyn_cfg c = em_dyn_default(2, 4, opt_cfg(EM_OPT_SGD, 0.0f));
    c.init_scale = 1.0f;
    c.max_rows = 500;
    c.evict = EM_DYN_EVICT_LFU;
    em_dyn *d = make_dyn(&c);
    /* reference: ids present (per table) and their initial row */
    uint8_t *present = calloc(2 * N, 1);
    float *first = calloc(2 * N * 4, sizeof(float));
    int64_t *count = calloc(2 * N, sizeof(int64_t));
    float *out = malloc(64 * 2 * 4 * sizeof(float));
    for (int s = 0; s < 12; s++) {
        batch bt = make_batch(&r, 2, 4, 64, 4, all, N);
        CHECK_OK(em_dyn_forward(d, out, bt.ids, bt.off, 64, EM_DYN_TRAIN, NULL));
        for (int t = 0; t < 2; t++)
            for (int64_t k = bt.off[t * 64]; k < bt.off[(t + 1) * 64]; k++) {
                int j = 0;
                while (all[j] != bt.ids[k]) j++;
                em_dyn_row row;
                CHECK(em_dyn_lookup(d, t, all[j], &row));
                if (!present[t * N + j]) {
                    present[t * N + j] = 1;
                    memcpy(first + (t * N + j) * 4, row.w, 4 * sizeof(float));
                    count[t * N + j] = 0;
                }
                count[t * N + j]++;
            }
        CHECK_OK(em_dyn_backward_update(d, bt.dout, bt.ids, bt.off, 64, NULL));
        for (int t = 0; t < 2; t++) {
            int64_t nref = 0;
            uint32_t *slots = calloc(N, sizeof(uint32_t));
            for (int j = 0; j < N; j++) {
                em_dyn_row row;
                int in = em_dyn_lookup(d, t, all[j], &row);
                if (present[t * N + j] && !in) present[t * N + j] = 0; /* evicted */
                CHECK(in == present[t * N + j]);
                if (in) {
                    CHECK(memcmp(row.w, first + (t * N + j) * 4, 4 * sizeof(float)) == 0); /* lr 0 */
                    CHECK(row.count == count[t * N + j]);
                    slots[nref++] = row.slot;
                }
            }
            em_dyn_stats st = em_dyn_get_stats(d, t);
            CHECK(st.rows == nref && nref <= 500);
            CHECK(em_dyn_ids(d, t, NULL, 0) == nref);
            /* distinct slots: nothing merged */
            for (int64_t i = 0; i < nref; i++)
                for (int64_t j = i + 1; j < nref; j++) CHECK(slots[i] != slots[j]);
            free(slots);
        }
        free_batch(&bt);
    }
    CHECK(em_dyn_get_stats(d, -1).evictions > 0);
    em_dyn_free(d);
    free(all), free(present), free(first), free(count), free(out);
}

/* Row values depend on (seed, table, id) only; the hash layout does not leak in. */
static void test_init_order_independent(void) {
    em_dyn_cfg c = em_dyn_default(2, 3, opt_cfg(EM_OPT_SGD, 0.0f));
    c.seed = 99;
    em_dyn *a = make_dyn(&c), *b = make_dyn(&c);
    uint64_t ids[40];
    colliding_ids(ids, 40, 8, 1);
    for (int i = 0; i < 40; i++) {
        uint64_t x[2] = {ids[i], ids[i]}, y[2] = {ids[39 - i], ids[39 - i]};
        int64_t off[3] = {0, 1, 2};
        float o[6];
        CHECK_OK(em_dyn_forward(a, o, x, off, 1, EM_DYN_TRAIN, NULL));
        em_dyn_end_step(a);
        CHECK_OK(em_dyn_forward(b, o, y, off, 1, EM_DYN_TRAIN, NULL));
        em_dyn_end_step(b);
    }
    int differ_t = 0;
    for (int i = 0; i < 40; i++) {
        em_dyn_row ra, rb, r1;
        CHECK(em_dyn_lookup(a, 0, ids[i], &ra) && em_dyn_lookup(b, 0, ids[i], &rb));
        CHECK(memcmp(ra.w, rb.w, 3 * sizeof(float)) == 0);
        for (int j = 0; j < 3; j++) CHECK(fabsf(ra.w[j]) <= 0.01f);
        CHECK(em_dyn_lookup(a, 1, ids[i], &r1));
        differ_t += memcmp(ra.w, r1.w, 3 * sizeof(float)) != 0;
    }
    CHECK(differ_t == 40); /* tables draw their own streams */
    em_dyn_free(a), em_dyn_free(b);
}

/* ----------------------------------------------------------------- eval */

static void test_eval_reads_zeros(void) {
    em_dyn_cfg c = em_dyn_default(1, 8, opt_cfg(EM_OPT_SGD, 0.1f));
    c.init_scale = 0.5f;
    c.pooling = EM_POOL_MEAN;
    em_dyn *d = make_dyn(&c);
    uint64_t seen[3] = {10, 20, 30};
    int64_t off1[2] = {0, 3};
    float o[16];
    CHECK_OK(em_dyn_forward(d, o, seen, off1, 1, EM_DYN_TRAIN, NULL));
    em_dyn_end_step(d);
    em_dyn_stats s0 = em_dyn_get_stats(d, -1);
    /* bag 0: unseen only -> zeros; bag 1: seen 20 and unseen 7 -> mean over 2 */
    uint64_t q[3] = {5, 20, 7};
    int64_t off2[3] = {0, 1, 3};
    CHECK_OK(em_dyn_forward(d, o, q, off2, 2, EM_DYN_EVAL, NULL));
    em_dyn_row r20;
    CHECK(em_dyn_lookup(d, 0, 20, &r20));
    for (int j = 0; j < 8; j++) {
        CHECK(o[j] == 0.0f);
        CHECK(o[8 + j] == r20.w[j] * 0.5f);
    }
    em_dyn_stats s1 = em_dyn_get_stats(d, -1);
    CHECK(s1.rows == s0.rows && s1.inserts == s0.inserts && s1.rejections == s0.rejections && s1.rows == 3);
    CHECK(!em_dyn_lookup(d, 0, 5, NULL) && !em_dyn_lookup(d, 0, 7, NULL));
    CHECK(r20.count == 1 && r20.last == 0); /* eval does not count */
    /* a backward after an eval forward has nothing to update */
    float dout[16] = {0};
    CHECK(em_dyn_backward_update(d, dout, q, off2, 2, NULL) == EM_ERR_INVALID);
    em_dyn_free(d);
}

/* ------------------------------------------------------------- eviction */

static void run_bag(em_dyn *d, const uint64_t *ids, int n) {
    int64_t off[2] = {0, n};
    float o[4];
    float dout[4] = {0};
    CHECK_OK(em_dyn_forward(d, o, ids, off, 1, EM_DYN_TRAIN, NULL));
    CHECK_OK(em_dyn_backward_update(d, dout, ids, off, 1, NULL));
}

static int has(em_dyn *d, uint64_t id) { return em_dyn_lookup(d, 0, id, NULL); }

static void test_evict_age(void) {
    em_dyn_cfg c = em_dyn_default(1, 2, opt_cfg(EM_OPT_SGD, 0.1f));
    c.max_rows = 4;
    em_dyn *d = make_dyn(&c);
    uint64_t s0[3] = {1, 2, 3}, s1[2] = {5, 4}, s2[2] = {2, 6}, s3[3] = {9, 8, 7};
    run_bag(d, s0, 3);
    em_dyn_row r1;
    CHECK(em_dyn_lookup(d, 0, 1, &r1) && r1.slot == 0);
    run_bag(d, s1, 2); /* 3 rows + 2 new > 4: the oldest, smallest id goes first: 1 */
    CHECK(!has(d, 1) && has(d, 2) && has(d, 3) && has(d, 4) && has(d, 5));
    CHECK(em_dyn_get_stats(d, 0).rows == 4);
    run_bag(d, s2, 2); /* 2 is the batch's (kept); oldest of the others: 3 */
    CHECK(!has(d, 3) && has(d, 2) && has(d, 4) && has(d, 5) && has(d, 6));
    run_bag(d, s3, 3); /* 4 rows + 3 new: evict (1,4), (1,5), (2,2) */
    CHECK(has(d, 6) && has(d, 7) && has(d, 8) && has(d, 9));
    CHECK(!has(d, 2) && !has(d, 4) && !has(d, 5));
    em_dyn_stats st = em_dyn_get_stats(d, 0);
    CHECK(st.rows == 4 && st.evictions == 5 && st.inserts == 9);
    CHECK(st.slots == EM_DYN_PAGE_ROWS);
    /* slots: 1,2,3 -> 0,1,2; 1 evicted before 5, 4 go in: 5 reuses 0, 4 takes fresh 3;
     * 3 evicted: 6 reuses 2; 4, 5, 2 (slots 3, 0, 1) evicted in that order, popped LIFO:
     * 9 -> 1, 8 -> 0, 7 -> 3 */
    uint64_t live[4] = {6, 9, 8, 7};
    uint32_t want[4] = {2, 1, 0, 3};
    for (int i = 0; i < 4; i++) {
        em_dyn_row rr;
        CHECK(em_dyn_lookup(d, 0, live[i], &rr) && rr.slot == want[i]);
    }
    em_dyn_free(d);
}

static void test_evict_lfu(void) {
    em_dyn_cfg c = em_dyn_default(1, 2, opt_cfg(EM_OPT_ADAGRAD, 0.1f));
    c.max_rows = 3;
    c.evict = EM_DYN_EVICT_LFU;
    em_dyn *d = make_dyn(&c);
    uint64_t s0[6] = {1, 1, 1, 2, 2, 3}, s1[1] = {4}, s2[2] = {4, 5}, s3[3] = {6, 6, 6};
    run_bag(d, s0, 6);
    em_dyn_row rr;
    CHECK(em_dyn_lookup(d, 0, 1, &rr) && rr.count == 3);
    run_bag(d, s1, 1); /* 4 is new: of 1:3 2:2 3:1 the least used goes: 3 */
    CHECK(!has(d, 3) && has(d, 4));
    run_bag(d, s2, 2); /* 4 (the batch's) kept, 5 new: of 1:3 2:2 the least used: 2 */
    CHECK(!has(d, 2) && has(d, 1) && has(d, 4) && has(d, 5));
    run_bag(d, s3, 3); /* 6 new: of 1:3 4:2 5:1 -> evict 5 */
    CHECK(has(d, 1) && has(d, 4) && has(d, 6) && !has(d, 5));
    em_dyn_row r6;
    CHECK(em_dyn_lookup(d, 0, 6, &r6) && r6.count == 3);
    CHECK(em_dyn_get_stats(d, 0).rows == 3 && em_dyn_get_stats(d, 0).evictions == 3);
    em_dyn_free(d);
}

/* Streams of continuously new ids (and some repeated ones) under a byte budget, with
 * batches of up to about the budget's size: rows <= budget and table bytes <= max_bytes
 * after every train forward (the peak of a step: nothing is allocated after it) and
 * after every step; the budget uses most of max_bytes; every insert is an eviction or a
 * live row. Byte budgets from below one page of rows to several, both policies, slack. */
static void test_budget_stream(void) {
    static const struct {
        int D;
        em_optim_kind opt;
        size_t bytes;
        em_dyn_evict ev;
        float slack;
        int B, maxlen;
    } cases[] = {{8, EM_OPT_ROWWISE_ADAGRAD, 200 * 1000, EM_DYN_EVICT_AGE, 0.1f, 32, 6},
                 {8, EM_OPT_ROWWISE_ADAGRAD, 200 * 1000, EM_DYN_EVICT_LFU, 0.0f, 300, 6},
                 {16, EM_OPT_ADAGRAD, 3 << 20, EM_DYN_EVICT_LFU, 0.05f, 512, 8},
                 {4, EM_OPT_SGD, 6000, EM_DYN_EVICT_AGE, 0.0f, 16, 3},
                 {64, EM_OPT_ROWWISE_ADAGRAD, 5 << 20, EM_DYN_EVICT_AGE, 0.02f, 256, 20}};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        const int T = 3, D = cases[ci].D, B = cases[ci].B;
        em_dyn_cfg c = em_dyn_default(T, D, opt_cfg(cases[ci].opt, 0.05f));
        c.max_bytes = cases[ci].bytes;
        c.evict = cases[ci].ev;
        c.evict_slack = cases[ci].slack;
        em_dyn *d = make_dyn(&c);
        if (!d) continue;
        const int64_t budget = em_dyn_budget_rows(d), approx = (int64_t)(c.max_bytes / em_dyn_row_bytes(d));
        CHECK(budget >= 1 && budget <= approx && (approx < 1000 || budget >= approx * 7 / 10));
        em_rng r;
        em_rng_seed(&r, 3 + ci);
        enum { NP = 4000 };
        uint64_t *pool = malloc(NP * sizeof(uint64_t));
        float *out = malloc((size_t)B * T * D * sizeof(float));
        for (int i = 0; i < NP; i++) pool[i] = em_rng_u64(&r);
        size_t peak = 0, over = 0;
        int64_t peak_rows = 0;
        for (int s = 0; s < 30; s++) {
            for (int i = 0; i < NP; i++)
                if (i % 4) pool[i] = em_rng_u64(&r); /* 3 of 4 new, the rest repeat */
            batch bt = make_batch(&r, T, D, B, cases[ci].maxlen, pool, NP);
            CHECK_OK(em_dyn_forward(d, out, bt.ids, bt.off, B, EM_DYN_TRAIN, NULL));
            for (int pass = 0; pass < 2; pass++) {
                for (int t = 0; t < T; t++) {
                    em_dyn_stats st = em_dyn_get_stats(d, t);
                    over += st.rows > budget || st.bytes > c.max_bytes;
                    if (st.bytes > peak) peak = st.bytes;
                    if (st.rows > peak_rows) peak_rows = st.rows;
                }
                if (!pass) CHECK_OK(em_dyn_backward_update(d, bt.dout, bt.ids, bt.off, B, NULL));
            }
            free_batch(&bt);
        }
        em_dyn_stats all = em_dyn_get_stats(d, -1);
        fprintf(stderr, "  D %d, %zu bytes: budget %lld rows (~%lld), peak %lld rows, %zu bytes\n", D, c.max_bytes,
                (long long)budget, (long long)approx, (long long)peak_rows, peak);
        CHECK(over == 0);
        CHECK(peak_rows <= budget && peak_rows >= budget - (int64_t)((double)budget * cases[ci].slack)); /* filled */
        CHECK(all.evictions > 0 && all.inserts == all.evictions + (uint64_t)all.rows);
        free(pool), free(out);
        em_dyn_free(d);
    }
}

/* A batch with more distinct ids in a table than the budget: the first `budget` of
 * them (order of first occurrence) get rows, the others read as zeros, get no update
 * and count as rejections; the table stays within its budget. */
static void test_budget_batch_too_large(void) {
    em_dyn_cfg c = em_dyn_default(1, 2, opt_cfg(EM_OPT_SGD, 0.1f));
    c.max_rows = 3;
    c.init_scale = 1.0f;
    em_dyn *d = make_dyn(&c);
    uint64_t s0[2] = {10, 11}, s1[6] = {5, 6, 5, 7, 8, 9};
    run_bag(d, s0, 2);
    int64_t off[2] = {0, 6};
    float o[2], dout[2] = {1, 1};
    CHECK_OK(em_dyn_forward(d, o, s1, off, 1, EM_DYN_TRAIN, NULL));
    CHECK(em_dyn_get_stats(d, 0).rows == 3); /* 10, 11 evicted; 5, 6, 7 in; 8, 9 not */
    CHECK(has(d, 5) && has(d, 6) && has(d, 7) && !has(d, 8) && !has(d, 9) && !has(d, 10) && !has(d, 11));
    em_dyn_row r5, r6, r7;
    em_dyn_lookup(d, 0, 5, &r5), em_dyn_lookup(d, 0, 6, &r6), em_dyn_lookup(d, 0, 7, &r7);
    for (int i = 0; i < 2; i++) CHECK(o[i] == 2 * r5.w[i] + r6.w[i] + r7.w[i]);
    CHECK_OK(em_dyn_backward_update(d, dout, s1, off, 1, NULL));
    em_dyn_stats st = em_dyn_get_stats(d, 0);
    CHECK(st.rows == 3 && st.rejections == 2 && st.evictions == 2 && st.inserts == 5);
    em_dyn_free(d);
}

/* ------------------------------------------------------------ admission */

static void test_admit_count(void) {
    em_dyn_cfg c = em_dyn_default(1, 4, opt_cfg(EM_OPT_SGD, 0.5f));
    c.admit = EM_DYN_ADMIT_COUNT;
    c.admit_min_count = 3;
    c.cms_width = 1024;
    c.init_scale = 0.0f;
    em_dyn *d = make_dyn(&c);
    uint64_t a[1] = {42}, b2[2] = {7, 7};
    float o[4], dout[4] = {1, 1, 1, 1};
    int64_t off1[2] = {0, 1};
    for (int s = 0; s < 2; s++) {
        CHECK_OK(em_dyn_forward(d, o, a, off1, 1, EM_DYN_TRAIN, NULL));
        CHECK(o[0] == 0.0f && !has(d, 42));
        CHECK_OK(em_dyn_backward_update(d, dout, a, off1, 1, NULL));
        CHECK(!has(d, 42)); /* rejected ids get no row and no update */
    }
    CHECK(em_dyn_get_stats(d, 0).rejections == 2);
    CHECK_OK(em_dyn_forward(d, o, a, off1, 1, EM_DYN_TRAIN, NULL)); /* third sighting */
    CHECK(has(d, 42));
    CHECK_OK(em_dyn_backward_update(d, dout, a, off1, 1, NULL));
    em_dyn_row rr;
    CHECK(em_dyn_lookup(d, 0, 42, &rr) && rr.w[0] == -0.5f && rr.count == 1);
    /* two sightings in one batch count twice */
    int64_t off2[2] = {0, 2};
    CHECK_OK(em_dyn_forward(d, o, b2, off2, 1, EM_DYN_TRAIN, NULL));
    CHECK(!has(d, 7));
    CHECK_OK(em_dyn_backward_update(d, dout, b2, off2, 1, NULL));
    CHECK_OK(em_dyn_forward(d, o, b2, off1, 1, EM_DYN_TRAIN, NULL));
    CHECK(has(d, 7));
    em_dyn_end_step(d);
    em_dyn_free(d);
}

static void test_admit_prob(void) {
    em_dyn_cfg c = em_dyn_default(1, 2, opt_cfg(EM_OPT_SGD, 0.1f));
    c.admit = EM_DYN_ADMIT_PROB;
    c.admit_prob = 0.25f;
    c.seed = 5;
    em_dyn *d = make_dyn(&c), *d2 = make_dyn(&c);
    enum { N = 4000 };
    uint64_t *ids = malloc(N * sizeof(uint64_t));
    for (int i = 0; i < N; i++) ids[i] = (uint64_t)i * 1000003u;
    int64_t off[2] = {0, N};
    float o[2];
    CHECK_OK(em_dyn_forward(d, o, ids, off, 1, EM_DYN_TRAIN, NULL));
    em_dyn_end_step(d);
    for (int i = N - 1; i >= 0; i--) { /* the other order, one at a time */
        int64_t o1[2] = {0, 1};
        CHECK_OK(em_dyn_forward(d2, o, &ids[i], o1, 1, EM_DYN_TRAIN, NULL));
        em_dyn_end_step(d2);
    }
    int64_t n = em_dyn_get_stats(d, 0).rows;
    CHECK(n > N / 4 - 150 && n < N / 4 + 150);
    CHECK(em_dyn_get_stats(d, 0).rejections == (uint64_t)(N - n));
    for (int i = 0; i < N; i++) CHECK(has(d, ids[i]) == em_dyn_lookup(d2, 0, ids[i], NULL));
    free(ids);
    em_dyn_free(d), em_dyn_free(d2);
}

/* -------------------------------------------------- float64 references */

/* Per table: forward out against rows read right after the train forward (rows as
 * before the update), then the fused update against a float64 update of those rows. */
static void check_step_ref(em_optim_kind kind, em_pooling pk, float wd, float init_accum) {
    const int T = 3, D = 5, B = 16;
    em_optim_cfg oc = opt_cfg(kind, 0.05f);
    oc.weight_decay = wd;
    oc.init_accum = init_accum;
    em_dyn_cfg c = em_dyn_default(T, D, oc);
    c.pooling = pk;
    c.init_scale = 0.3f;
    em_dyn *d = make_dyn(&c);
    em_pool *pool = NULL;
    CHECK_OK(em_pool_create(&pool, 2));
    em_rng r;
    em_rng_seed(&r, 11 + kind);
    uint64_t idpool[20];
    for (int i = 0; i < 20; i++) idpool[i] = em_rng_u64(&r);
    const int S = kind == EM_OPT_SGD ? 0 : kind == EM_OPT_ADAGRAD ? D : 1;
    float *out = malloc((size_t)B * T * D * sizeof(float));
    for (int s = 0; s < 4; s++) {
        batch bt = make_batch(&r, T, D, B, 4, idpool, 20);
        CHECK_OK(em_dyn_forward(d, out, bt.ids, bt.off, B, EM_DYN_TRAIN, pool));
        /* snapshot of every pool id's row and state (float64) */
        double w0[3][20][5], s0[3][20][5], g[3][20][5];
        int in[3][20];
        memset(g, 0, sizeof g);
        for (int t = 0; t < T; t++)
            for (int i = 0; i < 20; i++) {
                em_dyn_row rr;
                in[t][i] = em_dyn_lookup(d, t, idpool[i], &rr);
                for (int j = 0; j < D; j++) {
                    w0[t][i][j] = in[t][i] ? rr.w[j] : 0.0;
                    s0[t][i][j] = in[t][i] && S ? rr.state[j < S ? j : 0] : 0.0;
                }
            }
        double maxerr = 0;
        for (int t = 0; t < T; t++)
            for (int b = 0; b < B; b++) {
                int64_t k0 = bt.off[t * B + b], k1 = bt.off[t * B + b + 1];
                double inv = pk == EM_POOL_MEAN && k1 > k0 ? 1.0 / (double)(k1 - k0) : 1.0;
                for (int j = 0; j < D; j++) {
                    double acc = 0;
                    for (int64_t k = k0; k < k1; k++) {
                        int i = 0;
                        while (idpool[i] != bt.ids[k]) i++;
                        CHECK(in[t][i]);
                        acc += w0[t][i][j];
                        g[t][i][j] += inv * bt.dout[((size_t)b * T + t) * D + j];
                    }
                    double e = fabs(acc * inv - out[((size_t)b * T + t) * D + j]);
                    if (e > maxerr) maxerr = e;
                }
            }
        CHECK(maxerr < 1e-5);
        CHECK_OK(em_dyn_backward_update(d, bt.dout, bt.ids, bt.off, B, pool));
        double werr = 0, serr = 0;
        for (int t = 0; t < T; t++)
            for (int i = 0; i < 20; i++) {
                if (!in[t][i]) continue;
                int touched = 0;
                for (int64_t k = bt.off[t * B]; k < bt.off[(t + 1) * B]; k++) touched |= bt.ids[k] == idpool[i];
                double w[5], st[5], gg[5];
                for (int j = 0; j < D; j++) w[j] = w0[t][i][j], st[j] = s0[t][i][j], gg[j] = g[t][i][j] + wd * w0[t][i][j];
                if (touched) {
                    if (kind == EM_OPT_SGD) {
                        for (int j = 0; j < D; j++) w[j] -= 0.05 * gg[j];
                    } else if (kind == EM_OPT_ADAGRAD) {
                        for (int j = 0; j < D; j++) {
                            st[j] += gg[j] * gg[j];
                            w[j] -= 0.05 * gg[j] / (sqrt(st[j]) + oc.eps);
                        }
                    } else {
                        double m = 0;
                        for (int j = 0; j < D; j++) m += gg[j] * gg[j];
                        st[0] += m / D;
                        for (int j = 0; j < D; j++) w[j] -= 0.05 * gg[j] / (sqrt(st[0]) + oc.eps);
                    }
                }
                em_dyn_row rr;
                CHECK(em_dyn_lookup(d, t, idpool[i], &rr));
                for (int j = 0; j < D; j++) {
                    double e = fabs(rr.w[j] - w[j]) / (fabs(w[j]) > 1e-2 ? fabs(w[j]) : 1e-2);
                    if (e > werr) werr = e;
                }
                for (int j = 0; j < S; j++) {
                    double e = fabs(rr.state[j] - st[j]) / (fabs(st[j]) > 1e-3 ? fabs(st[j]) : 1e-3);
                    if (e > serr) serr = e;
                }
            }
        CHECK(werr < 1e-4);
        CHECK(serr < 1e-4);
        free_batch(&bt);
    }
    free(out);
    em_pool_free(pool);
    em_dyn_free(d);
}

static void test_ref_sgd(void) {
    check_step_ref(EM_OPT_SGD, EM_POOL_SUM, 0.0f, 0.0f);
    check_step_ref(EM_OPT_SGD, EM_POOL_MEAN, 0.01f, 0.0f);
}
static void test_ref_adagrad(void) {
    check_step_ref(EM_OPT_ADAGRAD, EM_POOL_SUM, 0.0f, 0.1f);
    check_step_ref(EM_OPT_ADAGRAD, EM_POOL_MEAN, 0.0f, 0.0f);
}
static void test_ref_rowwise(void) {
    check_step_ref(EM_OPT_ROWWISE_ADAGRAD, EM_POOL_SUM, 0.0f, 0.0f);
    check_step_ref(EM_OPT_ROWWISE_ADAGRAD, EM_POOL_MEAN, 0.0f, 0.05f);
}

/* ----------------------------------------------------------- determinism */

/* Full state as one buffer: per table, ids in slot order with count, last, row, state. */
static float *dump(em_dyn *d, size_t *len) {
    const int T = em_dyn_num_tables(d), D = em_dyn_dim(d);
    size_t cap = 1024, n = 0;
    float *buf = malloc(cap * sizeof(float));
    for (int t = 0; t < T; t++) {
        int64_t nr = em_dyn_ids(d, t, NULL, 0);
        uint64_t *ids = malloc(((size_t)nr + 1) * sizeof(uint64_t));
        em_dyn_ids(d, t, ids, nr);
        for (int64_t i = 0; i < nr; i++) {
            em_dyn_row rr;
            CHECK(em_dyn_lookup(d, t, ids[i], &rr));
            size_t need = n + 8 + 2 * (size_t)D;
            if (need > cap) {
                cap = need * 2;
                buf = realloc(buf, cap * sizeof(float));
            }
            memcpy(buf + n, &ids[i], 8), n += 2;
            memcpy(buf + n, &rr.count, 8), n += 2;
            memcpy(buf + n, &rr.last, 8), n += 2;
            memcpy(buf + n, &rr.slot, 4), n += 1;
            memcpy(buf + n, rr.w, (size_t)D * 4), n += (size_t)D;
            if (rr.state) memcpy(buf + n, rr.state, 4), n += 1; /* first state value */
        }
        free(ids);
    }
    *len = n;
    return buf;
}

static void test_threads_bitwise(void) {
    const int T = 4, D = 12, B = 64;
    float *ref = NULL, *refout = NULL;
    size_t reflen = 0;
    for (int nth = 1; nth <= 3; nth++) {
        em_pool *pool = NULL;
        CHECK_OK(em_pool_create(&pool, nth));
        em_dyn_cfg c = em_dyn_default(T, D, opt_cfg(EM_OPT_ADAGRAD, 0.05f));
        c.max_rows = 300;
        c.admit = EM_DYN_ADMIT_COUNT;
        c.admit_min_count = 2;
        c.cms_width = 256;
        c.pooling = EM_POOL_MEAN;
        em_dyn *d = make_dyn(&c);
        em_rng r;
        em_rng_seed(&r, 21);
        uint64_t idpool[1500];
        for (int i = 0; i < 1500; i++) idpool[i] = em_rng_u64(&r) >> (i % 40);
        float *out = malloc((size_t)B * T * D * sizeof(float));
        float *outs = malloc((size_t)6 * B * T * D * sizeof(float));
        for (int s = 0; s < 6; s++) {
            batch bt = make_batch(&r, T, D, B, 8, idpool + (s * 150) % 1000, 500);
            step(d, &bt, out, pool);
            memcpy(outs + (size_t)s * B * T * D, out, (size_t)B * T * D * sizeof(float));
            free_batch(&bt);
        }
        em_dyn_stats st = em_dyn_get_stats(d, -1);
        CHECK(st.evictions > 0 && st.rejections > 0);
        size_t len;
        float *dmp = dump(d, &len);
        if (nth == 1) {
            ref = dmp, reflen = len, refout = outs;
        } else {
            CHECK(len == reflen && memcmp(dmp, ref, len * sizeof(float)) == 0);
            CHECK(memcmp(outs, refout, (size_t)6 * B * T * D * sizeof(float)) == 0);
            free(dmp), free(outs);
        }
        free(out);
        em_dyn_free(d);
        em_pool_free(pool);
    }
    free(ref), free(refout);
}

/* ----------------------------------------------------------- checkpoints */

static void tmp_file(char *buf, size_t cap, const char *name) {
    snprintf(buf, cap, "/tmp/em_dyn_test_%d_%s.safetensors", (int)getpid(), name);
}

static em_dyn_cfg ckpt_cfg(void) {
    em_dyn_cfg c = em_dyn_default(2, 6, opt_cfg(EM_OPT_ROWWISE_ADAGRAD, 0.1f));
    c.admit = EM_DYN_ADMIT_COUNT;
    c.admit_min_count = 2;
    c.cms_width = 64;
    c.max_rows = 100;
    c.evict = EM_DYN_EVICT_LFU;
    return c;
}

static void test_checkpoint_roundtrip(void) {
    em_dyn_cfg c = ckpt_cfg();
    em_dyn *d = make_dyn(&c);
    em_rng r;
    em_rng_seed(&r, 8);
    uint64_t idpool[400];
    for (int i = 0; i < 400; i++) idpool[i] = em_rng_u64(&r);
    float *out = malloc(32 * 2 * 6 * sizeof(float)), *out2 = malloc(32 * 2 * 6 * sizeof(float));
    for (int s = 0; s < 5; s++) {
        batch bt = make_batch(&r, 2, 6, 32, 5, idpool, 400);
        step(d, &bt, out, NULL);
        free_batch(&bt);
    }
    char path[256];
    tmp_file(path, sizeof path, "rt");
    CHECK_OK(em_dyn_save(d, path));
    em_dyn *e = make_dyn(&c);
    CHECK_OK(em_dyn_load(e, path));
    CHECK(em_dyn_step(e) == em_dyn_step(d));
    em_dyn_stats sd = em_dyn_get_stats(d, -1), se = em_dyn_get_stats(e, -1);
    CHECK(sd.rows == se.rows && sd.inserts == se.inserts && sd.evictions == se.evictions && sd.rejections == se.rejections);
    for (int t = 0; t < 2; t++) {
        int64_t n = em_dyn_ids(d, t, NULL, 0);
        uint64_t *ids = malloc(((size_t)n + 1) * sizeof(uint64_t)), *ids2 = malloc(((size_t)n + 1) * sizeof(uint64_t));
        em_dyn_ids(d, t, ids, n);
        CHECK(em_dyn_ids(e, t, ids2, n) == n);
        CHECK(memcmp(ids, ids2, (size_t)n * sizeof(uint64_t)) == 0); /* slot order kept: the free list is compacted */
        for (int64_t i = 0; i < n; i++) {
            em_dyn_row a, b;
            CHECK(em_dyn_lookup(d, t, ids[i], &a) && em_dyn_lookup(e, t, ids[i], &b));
            CHECK(memcmp(a.w, b.w, 6 * sizeof(float)) == 0 && a.state[0] == b.state[0]);
            CHECK(a.count == b.count && a.last == b.last);
        }
        free(ids), free(ids2);
    }
    /* both continue identically (the sketch was saved too) */
    for (int s = 0; s < 3; s++) {
        batch bt = make_batch(&r, 2, 6, 32, 5, idpool, 400);
        step(d, &bt, out, NULL);
        step(e, &bt, out2, NULL);
        CHECK(memcmp(out, out2, 32 * 2 * 6 * sizeof(float)) == 0);
        free_batch(&bt);
    }
    sd = em_dyn_get_stats(d, -1), se = em_dyn_get_stats(e, -1);
    CHECK(sd.rows == se.rows && sd.inserts == se.inserts && sd.evictions == se.evictions);
    /* a mismatched object refuses, unchanged */
    em_dyn_cfg c2 = c;
    c2.dim = 7;
    em_dyn *f = make_dyn(&c2);
    CHECK(em_dyn_load(f, path) == EM_ERR_INVALID);
    CHECK(em_dyn_get_stats(f, -1).rows == 0);
    /* empty tables round-trip too */
    CHECK_OK(em_dyn_save(f, path));
    em_dyn *g = make_dyn(&c2);
    CHECK_OK(em_dyn_load(g, path));
    CHECK(em_dyn_get_stats(g, -1).rows == 0 && em_dyn_step(g) == 0);
    em_dyn_free(g);
    em_dyn_free(f);
    unlink(path);
    CHECK(em_dyn_load(e, path) != EM_OK); /* missing file */
    CHECK(em_dyn_get_stats(e, -1).rows == se.rows);
    em_dyn_free(d), em_dyn_free(e);
    free(out), free(out2);
}

/* ---------------------------------------------------- allocation failure */

static void test_alloc_failures(void) {
    em_dyn_cfg c = ckpt_cfg();
    em_rng r;
    em_rng_seed(&r, 4);
    uint64_t idpool[300];
    for (int i = 0; i < 300; i++) idpool[i] = em_rng_u64(&r);
    batch bt = make_batch(&r, 2, 6, 16, 6, idpool, 300);
    float *out = malloc(16 * 2 * 6 * sizeof(float));
    char path[256];
    tmp_file(path, sizeof path, "fail");
    size_t base = em_mem_in_use();
    int reached = 0;
    for (long k = 0; k < 200 && !reached; k++) {
        em_dyn *d = NULL, *e = NULL;
        em_mem_fail_after(k);
        em_status st = em_dyn_create(&d, &c);
        if (!st) st = em_dyn_forward(d, out, bt.ids, bt.off, 16, EM_DYN_TRAIN, NULL);
        if (!st) st = em_dyn_backward_update(d, bt.dout, bt.ids, bt.off, 16, NULL);
        if (!st) st = em_dyn_forward(d, out, bt.ids, bt.off, 16, EM_DYN_TRAIN, NULL);
        if (!st) st = em_dyn_backward_update(d, bt.dout, bt.ids, bt.off, 16, NULL);
        if (!st) st = em_dyn_save(d, path);
        if (!st) st = em_dyn_create(&e, &c);
        if (!st) st = em_dyn_load(e, path);
        em_mem_fail_after(-1);
        if (st == EM_OK) {
            reached = 1;
            CHECK(em_dyn_get_stats(e, -1).rows == em_dyn_get_stats(d, -1).rows);
        } else {
            CHECK(st == EM_ERR_NOMEM || st == EM_ERR_IO);
            if (d && e == NULL && st == EM_ERR_NOMEM) {
                /* a failed forward leaves the tables as they were: the object stays usable */
                CHECK_OK(em_dyn_forward(d, out, bt.ids, bt.off, 16, EM_DYN_TRAIN, NULL));
                CHECK_OK(em_dyn_backward_update(d, bt.dout, bt.ids, bt.off, 16, NULL));
            }
        }
        em_dyn_free(d), em_dyn_free(e);
        CHECK(em_mem_in_use() == base);
    }
    CHECK(reached);
    unlink(path);
    free(out);
    free_batch(&bt);
}

static void test_invalid(void) {
    em_dyn *d = NULL;
    em_dyn_cfg c = em_dyn_default(1, 4, opt_cfg(EM_OPT_ADAM, 0.1f));
    CHECK(em_dyn_create(&d, &c) == EM_ERR_INVALID && d == NULL);
    c = em_dyn_default(0, 4, opt_cfg(EM_OPT_SGD, 0.1f));
    CHECK(em_dyn_create(&d, &c) == EM_ERR_INVALID);
    c = em_dyn_default(1, 4, opt_cfg(EM_OPT_SGD, 0.1f));
    c.admit = EM_DYN_ADMIT_COUNT;
    c.cms_width = 100;
    CHECK(em_dyn_create(&d, &c) == EM_ERR_INVALID);
    c.cms_width = 0;
    d = make_dyn(&c);
    uint64_t ids[2] = {1, 2};
    int64_t bad[3] = {0, 2, 1};
    float o[8];
    CHECK(em_dyn_forward(d, o, ids, bad, 2, EM_DYN_TRAIN, NULL) == EM_ERR_INVALID);
    CHECK(em_dyn_get_stats(d, -1).rows == 0);
    /* eval on a table that never trained: zeros */
    int64_t good[3] = {0, 1, 2};
    for (int j = 0; j < 8; j++) o[j] = 1.0f;
    CHECK_OK(em_dyn_forward(d, o, ids, good, 2, EM_DYN_EVAL, NULL));
    for (int j = 0; j < 8; j++) CHECK(o[j] == 0.0f);
    /* a backward must see the batch of the train forward */
    float dout[8] = {0};
    uint64_t other[2] = {1, 3};
    CHECK_OK(em_dyn_forward(d, o, ids, good, 2, EM_DYN_TRAIN, NULL));
    CHECK(em_dyn_backward_update(d, dout, other, good, 2, NULL) == EM_ERR_INVALID);
    CHECK(em_dyn_backward_update(d, dout, ids, good, 1, NULL) == EM_ERR_INVALID);
    CHECK(em_dyn_step(d) == 0);
    CHECK_OK(em_dyn_backward_update(d, dout, ids, good, 2, NULL));
    CHECK(em_dyn_step(d) == 1);
    em_dyn_free(d);
}

TEST_MAIN({"no_id_lost_or_merged", test_no_id_lost_or_merged}, {"init_order_independent", test_init_order_independent},
          {"eval_reads_zeros", test_eval_reads_zeros}, {"evict_age", test_evict_age}, {"evict_lfu", test_evict_lfu},
          {"budget_stream", test_budget_stream}, {"budget_batch_too_large", test_budget_batch_too_large}, {"admit_count", test_admit_count}, {"admit_prob", test_admit_prob},
          {"ref_sgd", test_ref_sgd}, {"ref_adagrad", test_ref_adagrad}, {"ref_rowwise", test_ref_rowwise},
          {"threads_bitwise", test_threads_bitwise}, {"checkpoint_roundtrip", test_checkpoint_roundtrip},
          {"alloc_failures", test_alloc_failures}, {"invalid", test_invalid})
