/* Synthetic generator: determinism across thread counts, the Zipf sampler, the planted
 * probabilities (line count, AUC well above chance, base CTR), and that its output is
 * valid Criteo for the reader. */
#include <math.h>
#include <unistd.h>

#include "data/data_internal.h"
#include "test.h"

static char g_dir[256];

static void cleanup(void) {
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
}

static const char *tmp(const char *name) {
    static char buf[8][512];
    static int k;
    if (!g_dir[0]) {
        strcpy(g_dir, "/tmp/ember_gen_XXXXXX");
        if (!mkdtemp(g_dir)) abort();
        atexit(cleanup);
    }
    char *b = buf[k++ & 7];
    snprintf(b, 512, "%s/%s", g_dir, name);
    return b;
}

static char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    char *p = malloc(*n + 1);
    if (fread(p, 1, *n, f) != *n) *n = 0;
    p[*n] = 0;
    fclose(f);
    return p;
}

static int same_file(const char *a, const char *b) {
    size_t na, nb;
    char *pa = slurp(a, &na), *pb = slurp(b, &nb);
    int same = pa && pb && na == nb && memcmp(pa, pb, na) == 0;
    free(pa), free(pb);
    return same;
}

static void test_determinism(void) {
    em_gen_cfg c = em_gen_default();
    c.train_rows = 5000, c.test_rows = 2100, c.seed = 7; /* not multiples of the block */
    size_t base = em_mem_in_use();
    CHECK_OK(em_gen_write(&c, tmp("a.tr"), tmp("a.te"), tmp("a.pr"), NULL));
    CHECK(em_mem_in_use() == base);
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    CHECK_OK(em_gen_write(&c, tmp("b.tr"), tmp("b.te"), tmp("b.pr"), pool));
    CHECK(same_file(tmp("a.tr"), tmp("b.tr")));
    CHECK(same_file(tmp("a.te"), tmp("b.te")));
    CHECK(same_file(tmp("a.pr"), tmp("b.pr")));
    CHECK(!same_file(tmp("a.tr"), tmp("a.te")));
    c.seed = 8;
    CHECK_OK(em_gen_write(&c, tmp("c.tr"), NULL, NULL, pool));
    CHECK(!same_file(tmp("a.tr"), tmp("c.tr")));
    /* the files are valid Criteo for the reader */
    int64_t rows[26];
    for (int f = 0; f < 26; f++) rows[f] = 1000003;
    em_reader_cfg rc = {.path = tmp("a.tr"), .batch_size = 512, .num_dense = 13, .num_sparse = 26,
                        .table_rows = rows, .strict = 1, .prefetch = 1};
    em_reader *r;
    CHECK_OK(em_reader_open(&r, &rc));
    const em_batch *b;
    em_status s;
    while ((s = em_reader_next(r, &b)) == EM_OK) {
    }
    CHECK(s == EM_ERR_EOF);
    em_reader_stats st;
    em_reader_stats_get(r, &st);
    CHECK(st.examples == 5000 && st.malformed == 0);
    em_reader_free(r);
    em_pool_free(pool);
}

/* Zipf(s) on [0, n): empirical frequencies of the head ids match the exact pmf. */
static void test_zipf(void) {
    const double ss[4] = {0.5, 1.0, 1.05, 2.0};
    const uint64_t n = 50;
    const int draws = 200000;
    for (int i = 0; i < 4; i++) {
        em__zipf z;
        em__zipf_init(&z, n, ss[i]);
        em_rng r;
        em_rng_seed(&r, 100 + (uint64_t)i);
        long cnt[50] = {0};
        for (int d = 0; d < draws; d++) {
            uint64_t k = em__zipf_sample(&z, &r);
            if (k >= n) { CHECK(k < n); break; }
            cnt[k]++;
        }
        double H = 0;
        for (uint64_t k = 1; k <= n; k++) H += pow((double)k, -ss[i]);
        for (int k = 0; k < 5; k++) {
            double p = pow(k + 1.0, -ss[i]) / H, sd = sqrt(p * (1 - p) / draws);
            CHECK_NEAR((double)cnt[k] / draws, p, 5 * sd);
        }
        /* most frequent / second most frequent ~ 2^s */
        CHECK_NEAR((double)cnt[0] / (double)cnt[1], pow(2.0, ss[i]), 0.08 * pow(2.0, ss[i]));
    }
    /* a huge support (Criteo's largest field) */
    em__zipf z;
    em__zipf_init(&z, 10131227, 1.05);
    em_rng r;
    em_rng_seed(&r, 5);
    long c0 = 0, c1 = 0, big = 0;
    for (int d = 0; d < draws; d++) {
        uint64_t k = em__zipf_sample(&z, &r);
        c0 += k == 0, c1 += k == 1, big += k >= 1000000;
        if (k >= 10131227) { CHECK(k < 10131227); break; }
    }
    CHECK_NEAR((double)c0 / (double)c1, pow(2.0, 1.05), 0.15);
    CHECK(big > 0); /* the tail is reached */
    em__zipf_init(&z, 1, 1.2);
    for (int d = 0; d < 100; d++) CHECK(em__zipf_sample(&z, &r) == 0);
}

static void test_norm_inv(void) {
    CHECK_NEAR(em__norm_inv(0.5), 0.0, 1e-12);
    CHECK_NEAR(em__norm_inv(0.975), 1.959963985, 1e-7);
    CHECK_NEAR(em__norm_inv(0.01), -2.326347874, 1e-7);
    CHECK_NEAR(em__norm_inv(1e-10), -6.361340902, 1e-6);
}

typedef struct {
    double p;
    int y;
} scored;

static int cmp_scored(const void *a, const void *b) {
    double x = ((const scored *)a)->p, y = ((const scored *)b)->p;
    return (x > y) - (x < y);
}

/* Mann-Whitney AUC with mid-ranks for ties: O(n log n). */
static double auc(scored *s, size_t n) {
    qsort(s, n, sizeof *s, cmp_scored);
    double rank_sum = 0, pos = 0;
    for (size_t i = 0; i < n;) {
        size_t j = i;
        while (j < n && s[j].p == s[i].p) j++;
        double mid = (double)(i + j + 1) / 2.0;
        for (size_t k = i; k < j; k++)
            if (s[k].y) rank_sum += mid, pos++;
        i = j;
    }
    double neg = (double)n - pos;
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg);
}

static void test_planted_truth(void) {
    em_gen_cfg c = em_gen_default();
    c.train_rows = 0, c.test_rows = 40000;
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    const char *te = tmp("t.te"), *pr = tmp("t.pr");
    CHECK_OK(em_gen_write(&c, tmp("t.tr"), te, pr, pool));
    em_pool_free(pool);
    FILE *ft = fopen(te, "r"), *fp = fopen(pr, "r");
    scored *s = calloc(c.test_rows + 1, sizeof *s);
    char line[2048];
    size_t n = 0;
    double ctr = 0, meanp = 0;
    /* distinct written ids of the small fields C9 (3 ids), C20 (4), C17 (10) */
    const int fields[3] = {9, 20, 17}, card[3] = {3, 4, 10};
    char seen[3][16][17];
    int nseen[3] = {0, 0, 0}, bad_card = 0;
    while (fgets(line, sizeof line, ft)) {
        double p;
        if (n >= c.test_rows || fscanf(fp, "%lf", &p) != 1) break;
        CHECK(p > 0 && p < 1);
        s[n].p = p;
        s[n].y = line[0] == '1';
        ctr += s[n].y, meanp += p;
        for (int k = 0; k < 3; k++) {
            const char *q = line;
            for (int t = 0; t < 13 + fields[k]; t++) q = strchr(q, '\t') + 1;
            size_t len = strcspn(q, "\t\n");
            if (!len) continue;
            CHECK(len == 8);
            int found = 0;
            for (int i = 0; i < nseen[k]; i++) found |= !strncmp(seen[k][i], q, 8);
            if (!found) {
                if (nseen[k] == card[k]) bad_card = 1;
                else memcpy(seen[k][nseen[k]++], q, 8), seen[k][nseen[k] - 1][8] = 0;
            }
        }
        n++;
    }
    double extra;
    CHECK(fscanf(fp, "%lf", &extra) != 1); /* exactly test_rows probabilities */
    fclose(ft), fclose(fp);
    CHECK(n == c.test_rows);
    CHECK(!bad_card && nseen[0] == 3 && nseen[1] == 4 && nseen[2] == 10);
    ctr /= (double)n, meanp /= (double)n;
    double a = auc(s, n);
    fprintf(stderr, "    planted: ctr %.4f mean p %.4f auc %.4f\n", ctr, meanp, a);
    CHECK(ctr > 0.2 && ctr < 0.3);
    CHECK_NEAR(meanp, ctr, 0.01); /* the probabilities are calibrated */
    CHECK(a > 0.75 && a < 0.85);
    free(s);
}

static void test_errors(void) {
    em_gen_cfg c = em_gen_default();
    c.train_rows = 10, c.test_rows = 10;
    c.latent_dim = 0;
    CHECK(em_gen_write(&c, tmp("e.tr"), NULL, NULL, NULL) == EM_ERR_INVALID);
    c = em_gen_default();
    c.train_rows = 10, c.test_rows = 10;
    c.zipf_s = 0;
    CHECK(em_gen_write(&c, tmp("e.tr"), NULL, NULL, NULL) == EM_ERR_INVALID);
    c.zipf_s = 1.1;
    int64_t card[26] = {0};
    c.cardinality = card;
    CHECK(em_gen_write(&c, tmp("e.tr"), NULL, NULL, NULL) == EM_ERR_INVALID);
    c.cardinality = NULL;
    CHECK(em_gen_write(&c, tmp("nodir/e.tr"), NULL, NULL, NULL) == EM_ERR_IO);
    CHECK(strstr(em_last_error(), "nodir/e.tr") != NULL);
    for (long k = 0; k < 16; k++) {
        size_t base = em_mem_in_use();
        em_mem_fail_after(k);
        em_status s = em_gen_write(&c, tmp("e.tr"), tmp("e.te"), tmp("e.pr"), NULL);
        em_mem_fail_after(-1);
        CHECK(s == EM_OK || s == EM_ERR_NOMEM);
        CHECK(em_mem_in_use() == base);
        if (s == EM_OK) break;
    }
}

TEST_MAIN({"determinism", test_determinism}, {"zipf", test_zipf}, {"norm_inv", test_norm_inv},
          {"planted_truth", test_planted_truth}, {"errors", test_errors})
