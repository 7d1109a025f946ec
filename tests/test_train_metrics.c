/*
 * test_train_metrics.c - em_metrics_compute against a float64 O(n^2) pair-counting AUC
 * on random data with many ties, the edge cases (all ties, perfect, one class, NaN,
 * n = 0), hand-computed log loss / NE / calibration / accuracy on tiny examples whose
 * values were checked with sklearn (roc_auc_score, log_loss, accuracy_score(y, p > 0.5)),
 * order invariance, the JSON form, and allocation failure.
 */
#include "test.h"

/* Brute force: over all (positive, negative) pairs, 1 if p_pos > p_neg, 1/2 if equal. */
static double auc_ref(const float *p, const float *y, size_t n) {
    double num = 0, np = 0, nn = 0;
    for (size_t i = 0; i < n; i++) {
        if (y[i] > 0.5f) np++;
        else nn++;
        if (y[i] <= 0.5f) continue;
        for (size_t j = 0; j < n; j++) {
            if (y[j] > 0.5f) continue;
            num += p[i] > p[j] ? 1.0 : p[i] == p[j] ? 0.5 : 0.0;
        }
    }
    return np && nn ? num / (np * nn) : NAN;
}

static void test_hand_examples(void) {
    em_metrics m;
    /* sklearn: roc_auc 0.75, log_loss 0.472287957239, accuracy 0.75 */
    const float p1[] = {0.1f, 0.4f, 0.35f, 0.8f}, y1[] = {0, 0, 1, 1};
    CHECK_OK(em_metrics_compute(p1, y1, 4, &m));
    CHECK(m.n == 4);
    CHECK_NEAR(m.auc, 0.75, 1e-12);
    /* -(ln .9 + ln .6 + ln .35 + ln .8) / 4 */
    CHECK_NEAR(m.logloss, 0.472287957239, 1e-9);
    CHECK_NEAR(m.ne, 0.472287957239 / log(2.0), 1e-9); /* ctr 0.5: entropy ln 2 */
    CHECK_NEAR(m.calibration, 1.65 / 2, 1e-7);
    CHECK_NEAR(m.accuracy, 0.75, 1e-12);
    CHECK_NEAR(m.ctr, 0.5, 1e-12);

    /* ties across classes: pairs (.5,.5)=1/2 (.5,.2)=1 (.8,.5)=1 (.8,.2)=1 (.2,.5)=0
     * (.2,.2)=1/2 -> 4/6; sklearn roc_auc 0.666666666667, log_loss 0.688403870021 */
    const float p2[] = {0.5f, 0.5f, 0.2f, 0.8f, 0.2f}, y2[] = {1, 0, 0, 1, 1};
    CHECK_OK(em_metrics_compute(p2, y2, 5, &m));
    CHECK_NEAR(m.auc, 4.0 / 6.0, 1e-12);
    CHECK_NEAR(m.logloss, 0.688403870021, 1e-9);
    CHECK_NEAR(m.ctr, 0.6, 1e-12);
    CHECK_NEAR(m.ne, 0.688403870021 / 0.673011667009, 1e-9); /* H(0.6) = 0.673011667009 */
    CHECK_NEAR(m.calibration, 2.2 / 3.0, 1e-7);
    CHECK_NEAR(m.accuracy, 0.6, 1e-12); /* 0.5 is predicted negative */

    /* clamping: p = 1e-9 for a positive and 1.0 for a negative each cost -ln(1e-7);
     * sklearn log_loss(y, clip(p, 1e-7, 1-1e-7)) = 8.449209757000, roc_auc 0.125 */
    const float p3[] = {1e-9f, 1.0f, 0.3f, 0.3f}, y3[] = {1, 0, 1, 0};
    CHECK_OK(em_metrics_compute(p3, y3, 4, &m));
    CHECK_NEAR(m.logloss, (2 * -log(1e-7) - log(0.3f) - log(1 - 0.3f)) / 4, 1e-8);
    CHECK_NEAR(m.logloss, 8.449209757, 1e-8);
    CHECK_NEAR(m.auc, 0.125, 1e-12);
    CHECK_NEAR(m.accuracy, 0.25, 1e-12);
}

static void test_edge_cases(void) {
    em_metrics m;
    float p[64], y[64];
    for (int i = 0; i < 64; i++) p[i] = 0.25f, y[i] = (float)(i % 3 == 0);
    CHECK_OK(em_metrics_compute(p, y, 64, &m)); /* all tied */
    CHECK(m.auc == 0.5);
    for (int i = 0; i < 64; i++) p[i] = y[i] ? 0.9f - 0.001f * (float)i : 0.1f + 0.001f * (float)i;
    CHECK_OK(em_metrics_compute(p, y, 64, &m)); /* perfect */
    CHECK(m.auc == 1.0 && m.accuracy == 1.0);
    for (int i = 0; i < 64; i++) p[i] = 1.0f - p[i];
    CHECK_OK(em_metrics_compute(p, y, 64, &m)); /* perfectly wrong */
    CHECK(m.auc == 0.0 && m.accuracy == 0.0);

    for (int i = 0; i < 64; i++) y[i] = 0;
    CHECK_OK(em_metrics_compute(p, y, 64, &m)); /* one class: no AUC, NE, calibration */
    CHECK(isnan(m.auc) && isnan(m.ne) && isnan(m.calibration));
    CHECK(m.ctr == 0 && isfinite(m.logloss) && isfinite(m.accuracy));
    for (int i = 0; i < 64; i++) y[i] = 1;
    CHECK_OK(em_metrics_compute(p, y, 64, &m));
    CHECK(isnan(m.auc) && isnan(m.ne) && m.ctr == 1 && isfinite(m.calibration));

    CHECK_OK(em_metrics_compute(NULL, NULL, 0, &m)); /* empty */
    CHECK(m.n == 0 && isnan(m.auc) && isnan(m.logloss) && isnan(m.ctr) && isnan(m.accuracy));
    CHECK(em_metrics_compute(NULL, y, 3, &m) == EM_ERR_INVALID);

    for (int i = 0; i < 64; i++) p[i] = 0.01f * (float)i, y[i] = (float)(i & 1);
    p[7] = NAN; /* a NaN score has no rank and poisons the log loss */
    CHECK_OK(em_metrics_compute(p, y, 64, &m));
    CHECK(isnan(m.auc) && isnan(m.logloss) && isnan(m.ne));

    /* scores need not be probabilities for the AUC: logits with signs and -0 == +0 */
    const float s[] = {-3.0f, -0.0f, 0.0f, 2.0f, -1e30f, 1e30f, -INFINITY, INFINITY};
    const float ys[] = {0, 1, 0, 1, 1, 0, 0, 1};
    CHECK_OK(em_metrics_compute(s, ys, 8, &m));
    CHECK_NEAR(m.auc, auc_ref(s, ys, 8), 1e-15);
}

static void test_vs_brute_force(void) {
    em_rng r;
    em_rng_seed(&r, 7);
    enum { N = 3000 };
    static float p[N], y[N], p2[N], y2[N];
    for (int rep = 0; rep < 6; rep++) {
        size_t n = rep < 3 ? N : 1 + em_rng_below(&r, 200);
        int levels = rep == 0 ? 7 : rep == 1 ? 100 : 0; /* few levels: many ties */
        double rate = rep == 2 ? 0.03 : 0.3;
        for (size_t i = 0; i < n; i++) {
            double u = em_rng_uniform(&r);
            y[i] = (float)(em_rng_uniform(&r) < rate + 0.4 * u * (rep != 4)); /* informative */
            p[i] = levels ? (float)em_rng_below(&r, (uint64_t)levels) / (float)levels : (float)u;
        }
        em_metrics m;
        CHECK_OK(em_metrics_compute(p, y, n, &m));
        double ref = auc_ref(p, y, n);
        CHECK_NEAR(m.auc, ref, 1e-12);
        /* log loss, CTR, calibration against plain double loops */
        double ll = 0, sp = 0, sy = 0, acc = 0;
        for (size_t i = 0; i < n; i++) {
            double pc = fmin(fmax(p[i], 1e-7), 1 - 1e-7);
            ll -= y[i] ? log(pc) : log(1 - pc);
            sp += p[i], sy += y[i];
            acc += (p[i] > 0.5f) == (y[i] > 0.5f);
        }
        double c = sy / (double)n;
        CHECK_NEAR(m.logloss, ll / (double)n, 1e-12);
        CHECK_NEAR(m.ctr, c, 1e-15);
        CHECK_NEAR(m.accuracy, acc / (double)n, 1e-15);
        if (sy > 0) CHECK_NEAR(m.calibration, sp / sy, 1e-12);
        if (c > 0 && c < 1) CHECK_NEAR(m.ne, ll / (double)n / -(c * log(c) + (1 - c) * log(1 - c)), 1e-12);

        /* a permutation gives the bitwise same AUC (and accuracy, CTR) */
        for (size_t i = 0; i < n; i++) p2[i] = p[i], y2[i] = y[i];
        for (size_t i = n - 1; i > 0; i--) {
            size_t j = (size_t)em_rng_below(&r, i + 1);
            float t = p2[i];
            p2[i] = p2[j], p2[j] = t;
            t = y2[i], y2[i] = y2[j], y2[j] = t;
        }
        em_metrics m2;
        CHECK_OK(em_metrics_compute(p2, y2, n, &m2));
        CHECK(m2.auc == m.auc && m2.accuracy == m.accuracy && m2.n == m.n);
    }
}

typedef struct {
    float p, y;
} py;

static int py_cmp(const void *a, const void *b) {
    float x = ((const py *)a)->p, z = ((const py *)b)->p;
    return (x > z) - (x < z);
}

/* 10^6 scores: speed, and agreement with a rank-sum reference at a size where the
 * radix sort runs all its passes. */
static void test_large(void) {
    size_t n = 1000000;
    float *p = malloc(n * sizeof *p), *y = malloc(n * sizeof *y);
    em_rng r;
    em_rng_seed(&r, 11);
    for (size_t i = 0; i < n; i++) {
        double u = em_rng_uniform(&r);
        y[i] = (float)(em_rng_uniform(&r) < 0.1 + 0.5 * u);
        p[i] = (float)(0.05 + 0.6 * u * u);
    }
    em_metrics m;
    double t0 = em_now();
    CHECK_OK(em_metrics_compute(p, y, n, &m));
    double dt = em_now() - t0;
    fprintf(stderr, "  1e6 examples in %.1f ms: auc %.6f logloss %.6f\n", dt * 1e3, m.auc, m.logloss);
    CHECK(m.auc > 0.6 && m.auc < 0.9);
    CHECK(dt < 2.0);
    /* an independent O(n log n) reference: qsort, then the mid-rank (Mann-Whitney) sum */
    py *v = malloc(n * sizeof *v);
    for (size_t i = 0; i < n; i++) v[i] = (py){p[i], y[i]};
    qsort(v, n, sizeof *v, py_cmp);
    double rank_sum = 0, np = 0;
    for (size_t i = 0; i < n;) {
        size_t j = i, pos = 0;
        while (j < n && v[j].p == v[i].p) pos += v[j].y > 0.5f, j++;
        rank_sum += (double)pos * ((double)(i + 1) + (double)j) / 2; /* mid-rank of i+1..j */
        np += (double)pos;
        i = j;
    }
    double nn = (double)n - np;
    CHECK_NEAR(m.auc, (rank_sum - np * (np + 1) / 2) / (np * nn), 1e-12);
    free(v), free(p), free(y);
}

static void test_json(void) {
    const float p[] = {0.1f, 0.4f, 0.35f, 0.8f}, y[] = {0, 0, 1, 1};
    em_metrics m;
    CHECK_OK(em_metrics_compute(p, y, 4, &m));
    char buf[512];
    int len = em_metrics_json(&m, buf, sizeof buf);
    CHECK(len == (int)strlen(buf));
    CHECK(strcmp(buf, "{\"n\":4,\"auc\":0.750000,\"logloss\":0.472288,\"ne\":0.681367,\"calibration\":0.825000,"
                      "\"accuracy\":0.750000,\"ctr\":0.500000}") == 0);
    if (strncmp(buf, "{\"n\":4,", 7)) fprintf(stderr, "  %s\n", buf);
    char small[10];
    CHECK(em_metrics_json(&m, small, sizeof small) == len && strlen(small) == 9);
    const float y0[] = {0, 0, 0, 0};
    CHECK_OK(em_metrics_compute(p, y0, 4, &m));
    em_metrics_json(&m, buf, sizeof buf);
    CHECK(strstr(buf, "\"auc\":null") && strstr(buf, "\"ne\":null") && strstr(buf, "\"calibration\":null"));
    CHECK(strstr(buf, "\"ctr\":0.000000") != NULL);
}

static void test_alloc_failure(void) {
    float p[100], y[100];
    for (int i = 0; i < 100; i++) p[i] = (float)i / 100, y[i] = (float)(i % 2);
    size_t base = em_mem_in_use();
    em_metrics m;
    for (long k = 0; k < 2; k++) {
        em_mem_fail_after(k);
        em_status s = em_metrics_compute(p, y, 100, &m);
        em_mem_fail_after(-1);
        CHECK(s == EM_ERR_NOMEM && em_last_error()[0]);
        CHECK(em_mem_in_use() == base);
    }
    CHECK_OK(em_metrics_compute(p, y, 100, &m));
    CHECK(em_mem_in_use() == base);
}

TEST_MAIN({"hand_examples", test_hand_examples}, {"edge_cases", test_edge_cases},
          {"vs_brute_force", test_vs_brute_force}, {"large", test_large}, {"json", test_json},
          {"alloc_failure", test_alloc_failure})
