/*
 * test.h - a tiny test harness. A test file defines its cases and a table:
 *
 *   static void test_foo(void) { CHECK(1 + 1 == 2); CHECK_NEAR(x, 1.0, 1e-6); }
 *   TEST_MAIN({"foo", test_foo}, {"bar", test_bar})
 *
 * `./test_x` runs every case, `./test_x foo` runs one by name. Failures print
 * file:line and the expression, the run continues, and the exit code is non-zero.
 * Helpers: em_test_path() resolves a path under tests/ (ctest runs there);
 * rel_err() for relative-tolerance comparisons.
 */
#ifndef EMBER_TEST_H
#define EMBER_TEST_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ember.h"

static int t_failures, t_checks;

#define CHECK(x)                                                                          \
    do {                                                                                  \
        t_checks++;                                                                       \
        if (!(x)) {                                                                       \
            t_failures++;                                                                 \
            fprintf(stderr, "  FAIL %s:%d: %s\n", __FILE__, __LINE__, #x);                \
        }                                                                                 \
    } while (0)

#define CHECK_OK(expr)                                                                    \
    do {                                                                                  \
        em_status st_ = (expr);                                                           \
        t_checks++;                                                                       \
        if (st_ != EM_OK) {                                                               \
            t_failures++;                                                                 \
            fprintf(stderr, "  FAIL %s:%d: %s -> %s (%s)\n", __FILE__, __LINE__, #expr,   \
                    em_status_str(st_), em_last_error());                                 \
        }                                                                                 \
    } while (0)

#define CHECK_NEAR(a, b, tol)                                                             \
    do {                                                                                  \
        double a_ = (a), b_ = (b);                                                        \
        t_checks++;                                                                       \
        if (!(fabs(a_ - b_) <= (tol))) {                                                  \
            t_failures++;                                                                 \
            fprintf(stderr, "  FAIL %s:%d: %s = %.9g vs %s = %.9g (tol %g)\n", __FILE__,  \
                    __LINE__, #a, a_, #b, b_, (double)(tol));                             \
        }                                                                                 \
    } while (0)

/* max_i |a_i - b_i| / max(max_i |b_i|, floor): a relative error for whole tensors. */
static inline double rel_err_f(const float *a, const float *b, size_t n, double floor_) {
    double num = 0, den = floor_;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (d > num || d != d) num = d;
        if (fabs((double)b[i]) > den) den = fabs((double)b[i]);
    }
    return num / den;
}
static inline double rel_err_fd(const float *a, const double *b, size_t n, double floor_) {
    double num = 0, den = floor_;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > num || d != d) num = d;
        if (fabs(b[i]) > den) den = fabs(b[i]);
    }
    return num / den;
}

#define CHECK_REL(a, b, n, tol)                                                           \
    do {                                                                                  \
        double e_ = rel_err_f((a), (b), (n), 1e-6);                                       \
        t_checks++;                                                                       \
        if (!(e_ <= (tol))) {                                                             \
            t_failures++;                                                                 \
            fprintf(stderr, "  FAIL %s:%d: %s vs %s: rel err %.3g > %g\n", __FILE__,      \
                    __LINE__, #a, #b, e_, (double)(tol));                                 \
        }                                                                                 \
    } while (0)

static inline const char *em_test_path(const char *rel, char *buf, size_t cap) {
    const char *src = getenv("EMBER_SRC");
    if (src) snprintf(buf, cap, "%s/tests/%s", src, rel);
    else snprintf(buf, cap, "%s", rel);
    return buf;
}

typedef struct {
    const char *name;
    void (*fn)(void);
} t_case;

static inline int t_run(const t_case *cases, int n, int argc, char **argv) {
    int ran = 0;
    for (int i = 0; i < n; i++) {
        if (argc > 1 && strcmp(argv[1], cases[i].name) != 0) continue;
        int before = t_failures;
        em_clear_error();
        cases[i].fn();
        ran++;
        fprintf(stderr, "%s %s\n", t_failures == before ? "ok  " : "FAIL", cases[i].name);
    }
    if (ran == 0) {
        fprintf(stderr, "no test named %s\n", argc > 1 ? argv[1] : "(none)");
        return 2;
    }
    fprintf(stderr, "%d checks, %d failed\n", t_checks, t_failures);
    return t_failures ? 1 : 0;
}

#define TEST_MAIN(...)                                                                    \
    int main(int argc, char **argv) {                                                     \
        static const t_case cases_[] = {__VA_ARGS__};                                     \
        return t_run(cases_, (int)(sizeof cases_ / sizeof cases_[0]), argc, argv);       \
    }

#endif
