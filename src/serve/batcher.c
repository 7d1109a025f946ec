/*
 * batcher.c - dynamic batching: one thread that owns the model and the pool and runs
 * every forward pass of the server.
 *
 * HTTP workers queue parsed requests (em__submit) with their connection suspended and
 * go back to their other connections; the batcher resumes each connection when its
 * answer is in (while the server stops, a worker instead waits for the answer on
 * its slot's condition variable, so no connection is left suspended). The batcher
 * takes the oldest request, then keeps taking queued requests while they fit in
 * max_batch, sleeping at most max_wait_us after the first one for more to arrive. It
 * never reorders: a request that does not fit waits for the next batch (FIFO keeps
 * tail latency bounded). A request larger than max_batch runs alone, in max_batch
 * chunks. The batch is laid out exactly as the data reader does (table-major offsets,
 * ids reduced modulo the table's rows, missing = empty bag) into buffers allocated
 * once at create time, so the hot path allocates nothing.
 *
 * An example's answer does not depend on which other examples share its batch (em_infer
 * computes every row alone, in the same order; AVX-512 builds).
 *
 * Models and hot reload: the batcher reads the served model (s->cur) without the
 * lock because only it replaces that pointer while it runs. A reloader prepares a
 * complete model (loaded, quantized, warmed up) on its own thread, posts it in
 * s->pending and waits; the batcher swaps it in at the top of its loop, i.e. between
 * two batches, hands the old one back in s->retired and wakes the reloader, which
 * frees it: by then no batch can be using it. The batcher also swaps a pending model
 * before it exits, so a reloader never waits on a batcher that has gone.
 * With quantized tables the batcher pools from the em_qbag into the model's pooled
 * buffer and runs em_infer_forward on it; otherwise em_infer_forward pools itself.
 *
 * The forward pass is em_infer (infer.c, ember/serve.h): row chunks through the whole
 * network, one pool launch a pass, and a batch of at most 24 examples (single-example
 * traffic at low load) on the batcher thread alone, without waking the pool: for one
 * example a launch's wake-up of the other worker costs more than its share of the
 * work (ember bench --infer --batch 1, 2 threads: p50 54-876 us against 41-48 us on
 * one thread, on the shared machine). Quantized tables are pooled with em_qbag first,
 * without the pool up to INLINE_BATCH examples. An example's answer does not depend on
 * its batch, so the cut changes no bits.
 *
 * Teacher mode: after each forward pass the batcher appends one DAS record per
 * example that came with an id (the raw logit, the request's vertical, the served
 * model's step as version) to the log's in-memory buffer; the flusher thread
 * (server.c) writes it out. Chunks of a large request are logged as they are run.
 */
#include <errno.h>
#include <math.h>
#include <string.h>
#include <time.h>

#include <microhttpd.h>

#include "serve/serve_internal.h"

#define INLINE_BATCH 4

float em__sigmoid(float z) {
    double e = (double)z;
    return (float)(e >= 0 ? 1.0 / (1.0 + exp(-e)) : exp(e) / (1.0 + exp(e)));
}

em_status em__batch_alloc(em_server *s) {
    size_t B = (size_t)s->cfg.max_batch, ND = (size_t)s->nd, T = (size_t)s->ns;
    memset(&s->b, 0, sizeof s->b);
    s->b.num_dense = s->nd, s->b.num_sparse = s->ns;
    s->b.label = em_calloc(B, sizeof(float));
    s->b.dense = em_calloc(B * ND, sizeof(float));
    s->b.indices = em_calloc(B * T + 1, sizeof(int64_t));
    s->b.offsets = em_calloc(B * T + 1, sizeof(int64_t));
    s->logits = em_calloc(B, sizeof(float));
    s->taken = em_calloc(B, sizeof(em__req *));
    s->logrecs = em_malloc(B * sizeof(em_das_rec));
    if (!s->b.label || !s->b.dense || !s->b.indices || !s->b.offsets || !s->logits || !s->taken || !s->logrecs)
        return em_errorf(EM_ERR_NOMEM, "serve: no memory for batches of %zu examples", B);
    return EM_OK;
}

void em__batch_free(em_server *s) {
    em_free(s->b.label), em_free(s->b.dense), em_free(s->b.indices), em_free(s->b.offsets);
    em_free(s->logits), em_free(s->taken), em_free(s->logrecs);
    s->logrecs = NULL;
    s->b.label = s->b.dense = NULL;
    s->b.indices = s->b.offsets = NULL;
    s->logits = NULL, s->taken = NULL;
}

void em__model_free(em__model *mm) {
    if (!mm) return;
    em_qbag_free(mm->q);
    em_infer_free(mm->inf);
    em_free(mm->pooled);
    em_dlrm_free(mm->m);
    em_free(mm);
}

/* Forward of batch b on model mm into logits: em_infer (infer.c), which pools the
 * model's fp32 tables itself and runs a small batch on this thread alone; quantized
 * tables are pooled first (on this thread alone for a tiny batch). */
static em_status model_forward(em__model *mm, const em_batch *b, float *logits, em_pool *pool) {
    if (!mm->q) return em_infer_forward(mm->inf, b, NULL, logits, pool);
    em_status st = em_qbag_forward(mm->q, mm->pooled, b->indices, b->offsets, b->per_id_w, b->B,
                                   b->B <= INLINE_BATCH ? NULL : pool);
    return st ? st : em_infer_forward(mm->inf, b, mm->pooled, logits, pool);
}

em_status em__model_make(em_server *s, em_dlrm *m, em_pool *pool, em__model **out) {
    *out = NULL;
    const em_dlrm_cfg *c = em_dlrm_config(m);
    const size_t B = (size_t)s->cfg.max_batch, T = (size_t)c->num_tables, D = (size_t)c->dim;
    if (c->seq.num_seq) { /* requests carry no history yet */
        em_dlrm_free(m);
        return em_errorf(EM_ERR_UNSUPPORTED, "the checkpoint is a sequence model (it reads a user history); "
                                             "ember serve answers plain DLRMs only for now");
    }
    if (c->num_dense != s->nd || c->num_tables != s->ns) {
        em_status st = em_errorf(EM_ERR_INVALID, "serve: the checkpoint has %d dense / %d sparse features, the server %d / %d",
                                 c->num_dense, c->num_tables, s->nd, s->ns);
        em_dlrm_free(m);
        return st;
    }
    em__model *mm = em_calloc(1, sizeof *mm);
    if (!mm) {
        em_dlrm_free(m);
        return em_errorf(EM_ERR_NOMEM, "serve: out of memory");
    }
    mm->m = m;
    mm->step = em_dlrm_step_count(m);
    em_status st = EM_OK;
    em_batch wb;
    memset(&wb, 0, sizeof wb);
    if (s->cfg.tables != EM_QT_FP32) {
        if ((st = em_qbag_create(&mm->q, em_dlrm_embbag(m), s->cfg.tables, c->pooling, pool))) goto fail;
        em_dlrm_release_tables(m);
        if (!(mm->pooled = em_malloc(B * T * D * sizeof(float)))) goto nomem;
        mm->table_bytes = em_qbag_bytes(mm->q);
    } else {
        for (size_t t = 0; t < T; t++) mm->table_bytes += (size_t)c->rows[t] * D * sizeof(float);
    }
    if ((st = em_infer_create(&mm->inf, m, (int)B, s->pool ? em_pool_nth(s->pool) : 1))) goto fail;
    /* warm-up: a full batch of all-missing examples makes the model allocate its
     * activations for max_batch now rather than on the first busy request */
    wb.B = (int)B, wb.num_dense = s->nd, wb.num_sparse = s->ns;
    wb.dense = em_calloc(B * (size_t)s->nd, sizeof(float));
    wb.label = em_calloc(B, sizeof(float));
    wb.offsets = em_calloc(B * T + 1, sizeof(int64_t));
    float *logits = em_malloc(B * sizeof(float));
    if (!wb.dense || !wb.label || !wb.offsets || !logits) {
        em_free(wb.dense), em_free(wb.label), em_free(wb.offsets), em_free(logits);
        goto nomem;
    }
    st = model_forward(mm, &wb, logits, pool);
    em_free(wb.dense), em_free(wb.label), em_free(wb.offsets), em_free(logits);
    if (st) goto fail;
    *out = mm;
    return EM_OK;
nomem:
    st = em_errorf(EM_ERR_NOMEM, "serve: no memory for the model's inference buffers");
fail:
    em__model_free(mm);
    return st;
}

/* Lay examples [lo, lo + cnt) of each of the k requests (whole requests when k > 1)
 * out as one batch and run the forward pass; answers land in each request's prob. */
static em_status run_batch(em_server *s, em__req **reqs, int k, int lo, int cnt) {
    const int ND = s->nd, T = s->ns;
    const int64_t *rows = em_dlrm_config(s->cur->m)->rows;
    int B = 0;
    for (int j = 0; j < k; j++) {
        int n = k == 1 ? cnt : reqs[j]->n, first = k == 1 ? lo : 0;
        memcpy(s->b.dense + (size_t)B * ND, reqs[j]->dense + (size_t)first * ND, (size_t)n * ND * sizeof(float));
        B += n;
    }
    s->b.B = B;
    int64_t nnz = 0;
    s->b.offsets[0] = 0;
    size_t o = 1;
    for (int t = 0; t < T; t++)
        for (int j = 0; j < k; j++) {
            const em__req *r = reqs[j];
            int n = k == 1 ? cnt : r->n, first = k == 1 ? lo : 0;
            for (int i = first; i < first + n; i++) {
                if (!(r->miss[i] >> t & 1)) s->b.indices[nnz++] = (int64_t)(r->ids[(size_t)i * T + t] % (uint64_t)rows[t]);
                s->b.offsets[o++] = nnz;
            }
        }
    em_status st = model_forward(s->cur, &s->b, s->logits, s->pool);
    if (st) return st;
    em__hist_observe(&s->m.batch, (double)B);
    uint64_t mb = atomic_load(&s->m.max_batch);
    while ((uint64_t)B > mb && !atomic_compare_exchange_weak(&s->m.max_batch, &mb, (uint64_t)B)) {}
    atomic_fetch_add(&s->m.examples, (uint64_t)B);
    B = 0;
    size_t nlog = 0;
    for (int j = 0; j < k; j++) {
        const em__req *r = reqs[j];
        int n = k == 1 ? cnt : r->n, first = k == 1 ? lo : 0;
        for (int i = 0; i < n; i++) r->prob[first + i] = em__sigmoid(s->logits[B + i]);
        if (s->das && r->has_exid)
            for (int i = 0; i < n; i++)
                s->logrecs[nlog++] = (em_das_rec){r->exid[first + i], r->vertical, s->logits[B + i], (uint32_t)s->cur->step};
        B += n;
    }
    if (nlog) { /* a buffered copy; the flusher thread does the I/O */
        if (em_das_append(s->das, s->logrecs, nlog) == EM_OK) atomic_fetch_add(&s->m.logged, nlog);
        else atomic_fetch_add(&s->m.log_errors, nlog);
    }
    return EM_OK;
}

static em__req *pop(em_server *s) {
    em__req *r = s->q_head;
    s->q_head = r->next;
    if (!s->q_head) s->q_tail = NULL;
    r->next = NULL;
    return r;
}

void *em__batcher_main(void *arg) {
    em_server *s = arg;
    const int cap = s->cfg.max_batch;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (!s->q_head && !s->stop && !s->pending) pthread_cond_wait(&s->queue_cv, &s->mu);
        if (s->pending) { /* between two batches: swap in the reloaded model */
            while (s->busy) pthread_cond_wait(&s->idle_cv, &s->mu); /* an inline pass may use cur */
            s->retired = s->cur;
            s->cur = s->pending;
            s->pending = NULL;
            pthread_cond_broadcast(&s->reload_cv);
        }
        if (!s->q_head) {
            if (s->stop) break; /* stopping and nothing left */
            continue;
        }
        int k = 0, total = 0;
        s->taken[k++] = pop(s);
        total = s->taken[0]->n;
        s->gathering = 1;
        if (total < cap && s->cfg.max_wait_us > 0) {
            struct timespec dl;
            clock_gettime(CLOCK_REALTIME, &dl);
            long long ns = dl.tv_nsec + (long long)s->cfg.max_wait_us * 1000;
            dl.tv_sec += (time_t)(ns / 1000000000), dl.tv_nsec = (long)(ns % 1000000000);
            for (;;) {
                while (s->q_head && total + s->q_head->n <= cap) {
                    total += s->q_head->n;
                    s->taken[k++] = pop(s);
                }
                if (total >= cap || s->q_head || s->stop) break; /* full, or the next does not fit */
                if (pthread_cond_timedwait(&s->queue_cv, &s->mu, &dl) == ETIMEDOUT) {
                    while (s->q_head && total + s->q_head->n <= cap) {
                        total += s->q_head->n;
                        s->taken[k++] = pop(s);
                    }
                    break;
                }
            }
        } else {
            while (s->q_head && total + s->q_head->n <= cap) {
                total += s->q_head->n;
                s->taken[k++] = pop(s);
            }
        }
        while (s->busy) pthread_cond_wait(&s->idle_cv, &s->mu); /* an inline pass is running */
        s->gathering = 0;
        s->busy = 1;
        pthread_mutex_unlock(&s->mu);

        em_status st = EM_OK;
        if (k == 1 && total > cap) {
            for (int lo = 0; lo < total && !st; lo += cap)
                st = run_batch(s, s->taken, 1, lo, total - lo < cap ? total - lo : cap);
        } else {
            st = run_batch(s, s->taken, k, 0, total);
        }

        pthread_mutex_lock(&s->mu);
        s->busy = 0;
        pthread_cond_broadcast(&s->idle_cv);
        int nsusp = 0;
        for (int j = 0; j < k; j++) {
            em__req *r = s->taken[j];
            memcpy(r->version, s->cur->version, sizeof s->cur->version);
            r->st = st;
            r->done = 1;
            if (r->queued) s->taken[nsusp++] = r; /* its worker is not waiting: resume it below */
            else pthread_cond_signal(&r->cv);
        }
        if (nsusp) {
            /* outside the lock: a resumed request's handler takes it. A suspended slot
             * stays ours until it is resumed, so taken[j] is still valid here */
            pthread_mutex_unlock(&s->mu);
            for (int j = 0; j < nsusp; j++) MHD_resume_connection(s->taken[j]->conn);
            pthread_mutex_lock(&s->mu);
            s->suspended -= nsusp;
            if (!s->suspended) pthread_cond_broadcast(&s->idle_cv);
        }
    }
    s->batcher_live = 0; /* pending was swapped above, under the same lock hold */
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

em_status em__submit(em_server *s, em__req *r, struct MHD_Connection *c, int *queued) {
    *queued = 0;
    pthread_mutex_lock(&s->mu);
    r->done = 0, r->queued = 0, r->next = NULL;
    if (s->stop) {
        pthread_mutex_unlock(&s->mu);
        return em_errorf(EM_ERR_INVALID, "server is stopping");
    }
    if (r->n <= s->cfg.inline_max && r->n <= s->cfg.max_batch && !s->busy && !s->gathering && !s->q_head && !s->pending && s->batcher_live) {
        /* idle: run it here, now (no handoff to the batcher and back, no max_wait) */
        s->busy = 1;
        pthread_mutex_unlock(&s->mu);
        em_status st = run_batch(s, &r, 1, 0, r->n);
        pthread_mutex_lock(&s->mu);
        memcpy(r->version, s->cur->version, sizeof s->cur->version);
        r->st = st, r->done = 1;
        s->busy = 0;
        pthread_cond_broadcast(&s->idle_cv);
        pthread_mutex_unlock(&s->mu);
        return st;
    }
    if (c && !s->draining) {
        /* suspend before queueing, so the batcher's resume always follows it; the
         * worker goes back to its other connections meanwhile */
        MHD_suspend_connection(c);
        r->conn = c, r->queued = 1;
        s->suspended++;
    }
    if (s->q_tail) s->q_tail->next = r;
    else s->q_head = r;
    s->q_tail = r;
    pthread_cond_signal(&s->queue_cv);
    if (r->queued) {
        *queued = 1;
        pthread_mutex_unlock(&s->mu);
        return EM_OK;
    }
    while (!r->done) pthread_cond_wait(&r->cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
    return r->st;
}
