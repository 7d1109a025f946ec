/*
 * metrics.c - evaluation metrics of a binary classifier (include/ember/metrics.h).
 *
 * AUC is computed exactly, as the Mann-Whitney statistic with tied scores sharing
 * their mid-rank (equal to sklearn.metrics.roc_auc_score):
 *
 *   AUC = (#{pos > neg} + 1/2 #{pos == neg}) / (P * N)   over all positive/negative pairs.
 *
 * Design choices:
 * - Scores are mapped to order-preserving u32 keys (sign-flipped float bits, -0 folded
 *   into +0), positives and negatives go into two halves of one buffer, and each half
 *   is sorted by an LSD radix sort (3 passes of 11/11/10 bits, passes whose digit is
 *   constant skipped). O(n), ~8n bytes of em_malloc'd scratch, fast at n = 10^7.
 * - One merge walk over the two sorted lists counts, for each group of equal positive
 *   scores, the negatives strictly below and equal. The pair count is kept doubled in
 *   a u64 (ties count 1 each), so the numerator is exact and the result does not
 *   depend on the order of the input.
 * - Labels: y > 0.5 is a positive for AUC and accuracy; log loss, CTR and calibration
 *   use y as given (soft labels work there).
 * - Log loss clamps p to [1e-7, 1 - 1e-7] in double with comparisons (not fmin/fmax),
 *   so a NaN score propagates to NaN instead of being clamped away; a NaN score also
 *   makes the AUC NaN, since it has no rank. All sums are sequential doubles:
 *   deterministic.
 * - Accuracy predicts positive for p > 0.5 (0.5 itself is a negative, as rounding
 *   half-to-even does in the DLRM reference).
 * - n == 0 gives NaN for every ratio.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "ember/metrics.h"

/* Order-preserving map of a float to u32: negative floats reversed, positives above. */
static inline uint32_t float_key(float f) {
    if (f == 0.0f) f = 0.0f; /* -0 ties with +0 */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* Sorts a[0..n) ascending; tmp has room for n keys. */
static void radix_sort_u32(uint32_t *a, uint32_t *tmp, size_t n) {
    if (n < 2) return;
    static const int shift[3] = {0, 11, 22};
    size_t hist[3][2048];
    memset(hist, 0, sizeof hist);
    for (size_t i = 0; i < n; i++) {
        uint32_t k = a[i];
        hist[0][k & 2047]++;
        hist[1][(k >> 11) & 2047]++;
        hist[2][k >> 22]++;
    }
    uint32_t *src = a, *dst = tmp;
    for (int pass = 0; pass < 3; pass++) {
        size_t *h = hist[pass];
        int sh = shift[pass];
        if (h[(src[0] >> sh) & 2047] == n) continue; /* every key has the same digit */
        size_t sum = 0;
        for (int d = 0; d < 2048; d++) {
            size_t c = h[d];
            h[d] = sum;
            sum += c;
        }
        for (size_t i = 0; i < n; i++) {
            uint32_t k = src[i];
            dst[h[(k >> sh) & 2047]++] = k;
        }
        uint32_t *t = src;
        src = dst, dst = t;
    }
    if (src != a) memcpy(a, src, n * sizeof *a);
}

/* Doubled Mann-Whitney count over sorted positive keys pos[0..np) and negatives
 * neg[0..nn): sum over pairs of 2 if pos > neg, 1 if equal. */
static uint64_t pair_count2(const uint32_t *pos, size_t np, const uint32_t *neg, size_t nn) {
    uint64_t num2 = 0;
    size_t j = 0;
    for (size_t i = 0; i < np;) {
        uint32_t k = pos[i];
        size_t cp = 0;
        while (i < np && pos[i] == k) i++, cp++;
        while (j < nn && neg[j] < k) j++;
        size_t e = j;
        while (e < nn && neg[e] == k) e++;
        num2 += (uint64_t)cp * (2 * (uint64_t)j + (uint64_t)(e - j));
        j = e;
    }
    return num2;
}

em_status em_metrics_compute(const float *p, const float *y, size_t n, em_metrics *out) {
    const double nan = NAN;
    *out = (em_metrics){.n = n, .auc = nan, .logloss = nan, .ne = nan, .calibration = nan, .accuracy = nan, .ctr = nan};
    if (n == 0) return EM_OK;
    if (!p || !y) return em_errorf(EM_ERR_INVALID, "em_metrics_compute: NULL p or y with n = %zu", n);
    if (n > SIZE_MAX / (2 * sizeof(uint32_t)))
        return em_errorf(EM_ERR_NOMEM, "em_metrics_compute: n = %zu is too large", n);
    uint32_t *keys = em_malloc(n * sizeof *keys), *tmp = em_malloc(n * sizeof *tmp);
    if (!keys || !tmp) {
        em_free(keys), em_free(tmp);
        return em_errorf(EM_ERR_NOMEM, "em_metrics_compute: out of memory for %zu scores", n);
    }

    /* One pass: sums, log loss, accuracy, and the keys (positives from the front,
     * negatives from the back). */
    const double lo = 1e-7, hi = 1.0 - 1e-7;
    double sum_p = 0, sum_y = 0, sum_loss = 0;
    size_t np = 0, nn = 0, correct = 0;
    int any_nan = 0;
    for (size_t i = 0; i < n; i++) {
        double pi = p[i], yi = y[i];
        int pos = yi > 0.5;
        sum_p += pi, sum_y += yi;
        correct += (pi > 0.5) == pos;
        double pc = pi;
        if (pc < lo) pc = lo;
        if (pc > hi) pc = hi;
        if (yi == 1.0) sum_loss -= log(pc);
        else if (yi == 0.0) sum_loss -= log(1.0 - pc);
        else sum_loss -= yi * log(pc) + (1.0 - yi) * log(1.0 - pc);
        any_nan |= pi != pi;
        if (pos) keys[np++] = float_key(p[i]);
        else keys[n - 1 - nn++] = float_key(p[i]);
    }
    out->logloss = sum_loss / (double)n;
    out->ctr = sum_y / (double)n;
    out->accuracy = (double)correct / (double)n;
    if (sum_y != 0) out->calibration = sum_p / sum_y;
    double c = out->ctr;
    if (c > 0 && c < 1) out->ne = out->logloss / -(c * log(c) + (1 - c) * log(1 - c));
    if (np && nn && !any_nan) {
        radix_sort_u32(keys, tmp, np);
        radix_sort_u32(keys + np, tmp, nn);
        uint64_t num2 = pair_count2(keys, np, keys + np, nn);
        out->auc = (double)num2 / (2.0 * (double)np * (double)nn);
    }
    em_free(keys), em_free(tmp);
    return EM_OK;
}

static const char *num6(double x, char *buf, size_t cap) {
    if (isfinite(x)) snprintf(buf, cap, fabs(x) < 1e15 ? "%.6f" : "%.6e", x);
    else snprintf(buf, cap, "null"); /* JSON has no NaN */
    return buf;
}

int em_metrics_json(const em_metrics *m, char *buf, size_t cap) {
    char a[6][40];
    return snprintf(buf, cap,
                    "{\"n\":%llu,\"auc\":%s,\"logloss\":%s,\"ne\":%s,\"calibration\":%s,\"accuracy\":%s,\"ctr\":%s}",
                    (unsigned long long)m->n, num6(m->auc, a[0], 40), num6(m->logloss, a[1], 40),
                    num6(m->ne, a[2], 40), num6(m->calibration, a[3], 40), num6(m->accuracy, a[4], 40),
                    num6(m->ctr, a[5], 40));
}
