/*
 * metrics.c - the server's counters and their Prometheus text exposition (format
 * 0.0.4: # HELP / # TYPE lines, cumulative histogram buckets with le="+Inf", _sum and
 * _count).
 *
 * Every counter is a relaxed atomic bumped by the thread that saw the event, so
 * recording costs a few uncontended atomic adds and never takes the server's lock.
 * A scrape reads each counter once; it is consistent per counter, not across them.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "serve/serve_internal.h"

static const char *const EP_NAME[EM_SERVE_EP__COUNT] = {"predict", "predict_bin", "healthz", "metrics", "other",
                                                             "reload"};
#define N_ERR 7
static const int ERR_CODE[N_ERR] = {400, 403, 404, 405, 413, 500, 503};

void em__metrics_init(em__metrics *m, int max_batch) {
    static const double lat[] = {50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0};
    m->latency.n = 0;
    for (size_t i = 0; i < sizeof lat / sizeof lat[0]; i++) m->latency.le[m->latency.n++] = lat[i];
    m->latency.le[m->latency.n++] = INFINITY;
    /* batch sizes: powers of two up to max_batch (which gets its own bucket) */
    m->batch.n = 0;
    for (double b = 1; b < max_batch && m->batch.n < EM__HIST_MAX - 2; b *= 2) m->batch.le[m->batch.n++] = b;
    m->batch.le[m->batch.n++] = max_batch;
    m->batch.le[m->batch.n++] = INFINITY;
}

void em__hist_observe(em__hist *h, double v) {
    int i = 0;
    while (i < h->n - 1 && v > h->le[i]) i++;
    atomic_fetch_add_explicit(&h->count[i], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->sum_ns, (uint64_t)llround(v * 1e9), memory_order_relaxed);
}

void em__metrics_response(em__metrics *m, int endpoint, int status, double seconds) {
    atomic_fetch_add_explicit(&m->requests[endpoint], 1, memory_order_relaxed);
    if (status >= 400) {
        int k = 5; /* anything unexpected counts as 500 */
        for (int i = 0; i < N_ERR; i++)
            if (ERR_CODE[i] == status) k = i;
        atomic_fetch_add_explicit(&m->errors[k], 1, memory_order_relaxed);
    }
    if (endpoint == EM_SERVE_EP_PREDICT || endpoint == EM_SERVE_EP_PREDICT_BIN) em__hist_observe(&m->latency, seconds);
}

void em_serve_stats_get(const em_server *s, em_serve_stats *out) {
    em__metrics *m = (em__metrics *)&s->m;
    memset(out, 0, sizeof *out);
    for (int i = 0; i < EM_SERVE_EP__COUNT; i++) out->requests[i] = atomic_load(&m->requests[i]);
    for (int i = 0; i < N_ERR; i++) out->errors += atomic_load(&m->errors[i]);
    out->examples = atomic_load(&m->examples);
    for (int i = 0; i < m->batch.n; i++) out->batches += atomic_load(&m->batch.count[i]);
    out->max_batch_seen = atomic_load(&m->max_batch);
    out->model_step = atomic_load(&((em_server *)s)->step);
    out->reloads = atomic_load(&m->reloads);
    out->reload_failures = atomic_load(&m->reload_failures);
    out->reloading = atomic_load(&m->reloading);
    out->table_bytes = atomic_load(&((em_server *)s)->table_bytes);
    out->logged = atomic_load(&m->logged);
    out->log_errors = atomic_load(&m->log_errors);
}

typedef struct {
    char *buf;
    size_t cap, len;
} sbuf;

static void put(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(sbuf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b->len < b->cap ? b->buf + b->len : NULL, b->len < b->cap ? b->cap - b->len : 0, fmt, ap);
    va_end(ap);
    if (n > 0) b->len += (size_t)n;
}

static void put_hist(sbuf *b, const char *name, const char *help, em__hist *h, int integral) {
    put(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int i = 0; i < h->n; i++) {
        cum += atomic_load(&h->count[i]);
        if (isinf(h->le[i])) put(b, "%s_bucket{le=\"+Inf\"} %llu\n", name, (unsigned long long)cum);
        else if (integral) put(b, "%s_bucket{le=\"%.0f\"} %llu\n", name, h->le[i], (unsigned long long)cum);
        else put(b, "%s_bucket{le=\"%g\"} %llu\n", name, h->le[i], (unsigned long long)cum);
    }
    double sum = (double)atomic_load(&h->sum_ns) * 1e-9;
    if (integral) put(b, "%s_sum %.0f\n", name, sum);
    else put(b, "%s_sum %.9f\n", name, sum);
    put(b, "%s_count %llu\n", name, (unsigned long long)cum);
}

size_t em_serve_metrics_text(const em_server *s, char *buf, size_t cap) {
    em__metrics *m = (em__metrics *)&s->m;
    sbuf b = {buf, cap, 0};
    if (cap) buf[0] = 0;
    put(&b, "# HELP ember_requests_total HTTP responses sent, by endpoint.\n# TYPE ember_requests_total counter\n");
    for (int i = 0; i < EM_SERVE_EP__COUNT; i++)
        put(&b, "ember_requests_total{endpoint=\"%s\"} %llu\n", EP_NAME[i], (unsigned long long)atomic_load(&m->requests[i]));
    put(&b, "# HELP ember_request_errors_total Responses with an error status, by status code.\n"
            "# TYPE ember_request_errors_total counter\n");
    for (int i = 0; i < N_ERR; i++)
        put(&b, "ember_request_errors_total{code=\"%d\"} %llu\n", ERR_CODE[i], (unsigned long long)atomic_load(&m->errors[i]));
    put(&b, "# HELP ember_examples_total Examples predicted.\n# TYPE ember_examples_total counter\n"
            "ember_examples_total %llu\n", (unsigned long long)atomic_load(&m->examples));
    put_hist(&b, "ember_request_latency_seconds", "Time from a predict request's headers to its response being queued.",
             &m->latency, 0);
    put_hist(&b, "ember_batch_size", "Examples per forward pass.", &m->batch, 1);
    put(&b, "# HELP ember_model_step Optimizer steps of the served checkpoint.\n# TYPE ember_model_step gauge\n"
            "ember_model_step %lld\n", (long long)atomic_load(&((em_server *)s)->step));
    put(&b, "# HELP ember_model_reloads_total Successful hot reloads.\n# TYPE ember_model_reloads_total counter\n"
            "ember_model_reloads_total %llu\n", (unsigned long long)atomic_load(&m->reloads));
    put(&b, "# HELP ember_model_reload_failures_total Reloads that failed (the old model kept serving).\n"
            "# TYPE ember_model_reload_failures_total counter\n"
            "ember_model_reload_failures_total %llu\n", (unsigned long long)atomic_load(&m->reload_failures));
    put(&b, "# HELP ember_model_reloading A reload is loading a checkpoint now (1) or not (0).\n"
            "# TYPE ember_model_reloading gauge\nember_model_reloading %llu\n", (unsigned long long)atomic_load(&m->reloading));
    put(&b, "# HELP ember_embedding_table_bytes Bytes of the served embedding tables (%s rows).\n"
            "# TYPE ember_embedding_table_bytes gauge\nember_embedding_table_bytes %zu\n",
        em_qtype_name(s->cfg.tables), atomic_load(&((em_server *)s)->table_bytes));
    if (s->das) {
        put(&b, "# HELP ember_teacher_logged_total Predictions appended to the teacher log.\n"
                "# TYPE ember_teacher_logged_total counter\nember_teacher_logged_total %llu\n",
            (unsigned long long)atomic_load(&m->logged));
        put(&b, "# HELP ember_teacher_log_errors_total Predictions that could not be appended to the teacher log.\n"
                "# TYPE ember_teacher_log_errors_total counter\nember_teacher_log_errors_total %llu\n",
            (unsigned long long)atomic_load(&m->log_errors));
    }
    return b.len;
}
