/*
 * loss.c - binary cross-entropy on logits (torch.nn.BCEWithLogitsLoss, mean reduction).
 *
 * The loss is  l(z, y) = max(z, 0) - z y + log1p(exp(-|z|)),  which equals
 * -y log s(z) - (1-y) log(1 - s(z)) without ever taking the log of a rounded-to-0
 * probability or overflowing exp. It is evaluated and summed in double in index order:
 * the returned mean is a reported metric, so it should not drift with batch size.
 * The gradient, s(z) - y, uses the same overflow-free sigmoid as activation.c.
 * Single-threaded: it runs over the B logits of a batch, i.e. a few thousand values.
 */
#include <math.h>

#include "ember/nn.h"

double em_bce_logits_forward(const float *logit, const float *y, size_t n) {
    if (n == 0) return 0.0;
    double sum = 0.0;
    for (size_t i = 0; i < n; i++) {
        const double z = logit[i], t = y[i];
        sum += (z > 0.0 ? z : 0.0) - z * t + log1p(exp(-fabs(z)));
    }
    return sum / (double)n;
}

void em_bce_logits_backward(float *dlogit, const float *logit, const float *y, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) {
        const float z = logit[i];
        float s;
        if (z >= 0.f) {
            s = 1.f / (1.f + expf(-z));
        } else {
            const float e = expf(z);
            s = e / (1.f + e);
        }
        dlogit[i] += scale * (s - y[i]);
    }
}
