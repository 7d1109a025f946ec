/*
 * ember/metrics.h - evaluation metrics of a binary classifier.
 *
 * AUC is exact: examples are sorted by score and tied scores share their mid-rank
 * (Mann-Whitney U), so it equals sklearn.metrics.roc_auc_score. Log loss clamps p to
 * [1e-7, 1 - 1e-7]. NE = log loss / entropy of the mean label. Calibration =
 * sum(p) / sum(y). Accuracy thresholds p at 0.5. All sums in double.
 */
#ifndef EMBER_METRICS_H
#define EMBER_METRICS_H

#include "core.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    uint64_t n;
    double auc;         /* NaN when only one class is present */
    double logloss;
    double ne;          /* NaN when only one class is present */
    double calibration; /* NaN when sum(y) == 0 */
    double accuracy;
    double ctr;         /* mean label */
} em_metrics;

/* p: probabilities, y: labels in {0,1}. Allocates O(n) scratch (EM_ERR_NOMEM). */
em_status em_metrics_compute(const float *p, const float *y, size_t n, em_metrics *out);

/* Writes one JSON object (no newline) into buf; returns the length snprintf would. */
int em_metrics_json(const em_metrics *m, char *buf, size_t cap);

#ifdef __cplusplus
}
#endif
#endif
