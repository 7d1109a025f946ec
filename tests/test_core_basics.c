#include "test.h"

static void test_status(void) {
    for (int s = 0; s < EM_ERR__COUNT; s++) CHECK(em_status_str((em_status)s)[0] != 0);
    CHECK(em_errorf(EM_ERR_PARSE, "x.tsv:%d: field %d", 3, 7) == EM_ERR_PARSE);
    CHECK(strcmp(em_last_error(), "x.tsv:3: field 7") == 0);
}

static void test_alloc_counts_and_fails(void) {
    size_t base = em_mem_in_use();
    float *p = em_malloc(1000 * sizeof(float));
    CHECK(p && ((uintptr_t)p % 64) == 0);
    CHECK(em_mem_in_use() == base + 4000);
    p = em_realloc(p, 8000);
    CHECK(p && em_mem_in_use() == base + 8000);
    em_free(p);
    CHECK(em_mem_in_use() == base);
    em_mem_fail_after(2);
    void *a = em_malloc(8), *b = em_malloc(8), *c = em_malloc(8);
    CHECK(a && b && !c);
    em_mem_fail_after(-1);
    c = em_malloc(8);
    CHECK(c != NULL);
    em_free(a), em_free(b), em_free(c);
    em_free(NULL);
}

typedef struct {
    long *sums;
    size_t n;
} sum_arg;

static void sum_task(void *p, int ith, int nth) {
    sum_arg *a = p;
    size_t lo, hi;
    em_split(a->n, ith, nth, &lo, &hi);
    long s = 0;
    for (size_t i = lo; i < hi; i++) s += (long)i;
    a->sums[ith] = s;
}

static void test_pool(void) {
    for (int nth = 1; nth <= 4; nth++) {
        em_pool *pool;
        CHECK_OK(em_pool_create(&pool, nth));
        CHECK(em_pool_nth(pool) == nth);
        long sums[4];
        sum_arg a = {sums, 100001};
        for (int rep = 0; rep < 200; rep++) {
            memset(sums, 0, sizeof sums);
            em_pool_run(pool, sum_task, &a);
            long s = 0;
            for (int i = 0; i < nth; i++) s += sums[i];
            if (s != 100000L * 100001L / 2) { CHECK(0); break; }
        }
        em_pool_free(pool);
    }
    size_t lo, hi, covered = 0;
    for (int i = 0; i < 3; i++) {
        em_split(10, i, 3, &lo, &hi);
        CHECK(lo == covered);
        covered = hi;
    }
    CHECK(covered == 10);
}

static void test_pool_alloc_failure(void) {
    for (long k = 0; k < 3; k++) {
        size_t base = em_mem_in_use();
        em_pool *pool = NULL;
        em_mem_fail_after(k);
        em_status st = em_pool_create(&pool, 3);
        em_mem_fail_after(-1);
        if (st == EM_OK) em_pool_free(pool);
        else CHECK(pool == NULL && st == EM_ERR_NOMEM);
        CHECK(em_mem_in_use() == base);
    }
}

static void test_rng(void) {
    em_rng a, b;
    em_rng_seed(&a, 42);
    em_rng_seed(&b, 42);
    for (int i = 0; i < 100; i++) CHECK(em_rng_u64(&a) == em_rng_u64(&b));
    double s = 0, s2 = 0;
    for (int i = 0; i < 100000; i++) {
        double x = em_rng_normal(&a);
        s += x, s2 += x * x;
    }
    CHECK_NEAR(s / 1e5, 0.0, 0.02);
    CHECK_NEAR(s2 / 1e5, 1.0, 0.02);
    for (int i = 0; i < 1000; i++) CHECK(em_rng_below(&a, 7) < 7);
}

TEST_MAIN({"status", test_status}, {"alloc", test_alloc_counts_and_fails}, {"pool", test_pool},
          {"pool_alloc_failure", test_pool_alloc_failure}, {"rng", test_rng})
