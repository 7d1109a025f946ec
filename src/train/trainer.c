/*
 * trainer.c - the training loop: epochs, progress events, periodic evaluation and
 * checkpoints, exact resume.
 *
 * Resume protocol: a checkpoint's metadata records "train.epoch" and "train.pos" (the
 * reader position after the last trained batch of that epoch). Resuming opens the
 * training file at that position, so batch boundaries and order are exactly those
 * of an uninterrupted run. Checkpoints are written atomically (em_st_write), so a run
 * killed while writing leaves the previous checkpoint intact.
 *
 * Lookahead (SSD tables, unless cfg->no_lookahead): the loop takes batch i + 1 from the
 * reader (em_reader_cfg.hold = 2 keeps batch i valid meanwhile) before it trains batch
 * i, and the training step of batch i starts the background load of batch i + 1's rows
 * (em_dlrm_prefetch from a head hook: after batch i's forward has pinned its rows,
 * before its backward), so RocksDB reads overlap batch i's backward and update. The
 * hook changes no value, batches and their order are the reader's, and the position
 * recorded is still that of the last trained batch; reader statistics reported are
 * those of the trained batches (the looked-ahead one is not counted until trained).
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ember/train.h"

em_train_cfg em_train_default(void) {
    em_train_cfg c;
    memset(&c, 0, sizeof c);
    c.model = em_dlrm_kaggle(0);
    c.batch = 128;
    c.epochs = 1;
    c.prefetch = 4;
    c.progress_every_s = 0.5;
    return c;
}

static em_status mkdir_p(const char *dir) {
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", dir);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) return em_errorf(EM_ERR_IO, "%s: %s", buf, strerror(errno));
        *p = '/';
    }
    if (mkdir(buf, 0755) != 0 && errno != EEXIST) return em_errorf(EM_ERR_IO, "%s: %s", buf, strerror(errno));
    return EM_OK;
}

void em_model_reader_seq(const em_dlrm_cfg *mc, em_reader_cfg *rc) {
    if (!mc->seq.num_seq) return;
    rc->num_seq = mc->seq.num_seq;
    rc->seq_rows = &mc->seq.rows;
    rc->seq_max_len = mc->seq.max_len;
}

static float sigmoidf_(float z) { return z >= 0 ? 1.f / (1.f + expf(-z)) : expf(z) / (1.f + expf(z)); }

em_status em_evaluate(em_dlrm *m, const char *path, int batch, uint64_t limit, em_pool *pool, em_metrics *out,
                      float **probs_out, float **labels_out, size_t *n_out) {
    const em_dlrm_cfg *mc = em_dlrm_config(m);
    em_reader_cfg rc = {.path = path, .batch_size = batch, .num_dense = mc->num_dense, .num_sparse = mc->num_tables,
                        .table_rows = mc->rows, .prefetch = 2, .limit = limit};
    em_model_reader_seq(mc, &rc);
    em_reader *r = NULL;
    em_status st = em_reader_open(&r, &rc);
    if (st) return st;
    size_t cap = 1 << 16, n = 0;
    float *p = em_malloc(cap * sizeof(float)), *y = em_malloc(cap * sizeof(float));
    const em_batch *b;
    if (!p || !y) st = EM_ERR_NOMEM;
    while (st == EM_OK && (st = em_reader_next(r, &b)) == EM_OK) {
        if (n + (size_t)b->B > cap) {
            while (n + (size_t)b->B > cap) cap *= 2;
            float *p2 = em_realloc(p, cap * sizeof(float));
            if (p2) p = p2;
            float *y2 = p2 ? em_realloc(y, cap * sizeof(float)) : NULL;
            if (y2) y = y2;
            if (!p2 || !y2) {
                st = EM_ERR_NOMEM;
                break;
            }
        }
        if ((st = em_dlrm_forward(m, b, p + n, pool))) break;
        for (int i = 0; i < b->B; i++) p[n + (size_t)i] = sigmoidf_(p[n + (size_t)i]);
        memcpy(y + n, b->label, (size_t)b->B * sizeof(float));
        n += (size_t)b->B;
    }
    if (st == EM_ERR_EOF) st = EM_OK;
    em_reader_free(r);
    if (st == EM_OK) st = em_metrics_compute(p, y, n, out);
    if (st == EM_OK && probs_out) {
        *probs_out = p, *labels_out = y, *n_out = n;
        return EM_OK;
    }
    em_free(p), em_free(y);
    return st;
}

em_status em_read_probs(const char *path, float **probs, size_t *n_out) {
    *probs = NULL, *n_out = 0;
    FILE *f = fopen(path, "r");
    if (!f) return em_errorf(EM_ERR_IO, "%s: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    float *p = em_malloc(cap * sizeof(float));
    char line[128];
    em_status st = p ? EM_OK : EM_ERR_NOMEM;
    while (st == EM_OK && fgets(line, sizeof line, f)) {
        char *end;
        double v = strtod(line, &end);
        if (end == line || !(v >= 0 && v <= 1)) {
            st = em_errorf(EM_ERR_PARSE, "%s:%zu: expected a probability in [0, 1]", path, n + 1);
            break;
        }
        if (n == cap) {
            float *p2 = em_realloc(p, 2 * cap * sizeof(float));
            if (!p2) {
                st = EM_ERR_NOMEM;
                break;
            }
            p = p2, cap *= 2;
        }
        p[n++] = (float)v;
    }
    fclose(f);
    if (st) {
        em_free(p);
        return st;
    }
    *probs = p, *n_out = n;
    return EM_OK;
}

typedef struct {
    const em_train_cfg *cfg;
    em_pool *pool;
    em_dlrm *m;
    FILE *metrics;
    int epoch;
    uint64_t pos;       /* reader position after the last trained batch */
    uint64_t examples;
    double t0, train_s;
    em_reader_stats rstats;
    char ckpt_path[1024];
} run_state;

static void emit(run_state *s, em_train_event *ev) {
    if (s->cfg->on_event) s->cfg->on_event(s->cfg->ud, ev);
}

static em_status checkpoint(run_state *s) {
    char epoch[32], pos[32];
    snprintf(epoch, sizeof epoch, "%d", s->epoch);
    snprintf(pos, sizeof pos, "%llu", (unsigned long long)s->pos);
    em_st_meta meta[] = {{"train.epoch", epoch}, {"train.pos", pos}, {"train.batch", NULL}};
    char batch[32];
    snprintf(batch, sizeof batch, "%d", s->cfg->batch);
    meta[2].value = batch;
    em_status st = em_dlrm_save(s->m, s->ckpt_path, meta, 3);
    if (st) return st;
    em_train_event ev = {.kind = EM_EV_CHECKPOINT, .step = em_dlrm_step_count(s->m), .epoch = s->epoch,
                         .examples = s->examples, .path = s->ckpt_path, .fraction = -1};
    emit(s, &ev);
    return EM_OK;
}

static em_status evaluate(run_state *s, em_metrics *out, double train_loss) {
    em_status st = em_evaluate(s->m, s->cfg->test_path, s->cfg->batch < 1024 ? 1024 : s->cfg->batch,
                               s->cfg->test_limit, s->pool, out, NULL, NULL, NULL);
    if (st) return st;
    if (s->metrics) {
        char buf[512];
        em_metrics_json(out, buf, sizeof buf);
        fprintf(s->metrics, "{\"step\":%lld,\"epoch\":%d,\"examples\":%llu,\"train_loss\":%.6f,\"test\":%s}\n",
                (long long)em_dlrm_step_count(s->m), s->epoch, (unsigned long long)s->examples, train_loss, buf);
        fflush(s->metrics);
    }
    em_train_event ev = {.kind = EM_EV_EVAL, .step = em_dlrm_step_count(s->m), .epoch = s->epoch,
                         .examples = s->examples, .metrics = *out, .train_loss = train_loss, .fraction = -1};
    emit(s, &ev);
    return EM_OK;
}

/* The lookahead's head hook: start loading the next batch's rows (changes nothing). A
 * prefetch that cannot start (no memory, no thread) only loses the overlap, so it does
 * not fail the step; errors of the load itself come back from the next forward. */
typedef struct {
    em_dlrm *m;
    const em_batch *next;
} lookahead;

static em_status lookahead_fn(void *ud, const em_batch *b, const float *h, int H, const float *logits, float *dlogit,
                              const float **dh, em_pool *pool) {
    (void)b, (void)h, (void)H, (void)logits, (void)dlogit, (void)dh, (void)pool;
    const lookahead *la = ud;
    if (la->next) (void)em_dlrm_prefetch(la->m, la->next);
    return EM_OK;
}

em_status em_train_run(const em_train_cfg *cfg, em_pool *pool, em_train_result *res, em_dlrm **model_out) {
    memset(res, 0, sizeof *res);
    if (model_out) *model_out = NULL;
    if (!cfg->train_path || cfg->batch < 1 || cfg->epochs < 1)
        return em_errorf(EM_ERR_INVALID, "train: need a training file, batch >= 1 and epochs >= 1");
    run_state s = {.cfg = cfg, .pool = pool};
    em_status st = EM_OK;
    em_reader *r = NULL;
    if (cfg->out_dir) {
        if ((st = mkdir_p(cfg->out_dir))) return st;
        snprintf(s.ckpt_path, sizeof s.ckpt_path, "%s/checkpoint.safetensors", cfg->out_dir);
    }
    if (cfg->resume) {
        em_st *f = NULL;
        if ((st = em_dlrm_load(&s.m, cfg->resume, &f, pool))) return st;
        const char *ep = em_st_meta_get(f, "train.epoch"), *pos = em_st_meta_get(f, "train.pos");
        if (!ep || !pos) {
            em_st_close(f);
            em_dlrm_free(s.m);
            return em_errorf(EM_ERR_CORRUPT, "%s: no training position (train.epoch/train.pos) to resume from",
                             cfg->resume);
        }
        s.epoch = atoi(ep);
        s.pos = strtoull(pos, NULL, 10);
        em_st_close(f);
    } else if ((st = em_dlrm_create(&s.m, &cfg->model, pool))) {
        return st;
    }
    if (cfg->out_dir) {
        char mpath[1100];
        snprintf(mpath, sizeof mpath, "%s/metrics.jsonl", cfg->out_dir);
        s.metrics = fopen(mpath, cfg->resume ? "a" : "w");
        if (!s.metrics) {
            st = em_errorf(EM_ERR_IO, "%s: %s", mpath, strerror(errno));
            goto done;
        }
    }
    const em_dlrm_cfg *mc = em_dlrm_config(s.m);
    uint64_t lines = 0; /* for progress and ETA only: 0 = unknown */
    if (em_data_count(cfg->train_path, &lines) != EM_OK) lines = 0;
    if (cfg->train_limit && (lines == 0 || cfg->train_limit < lines)) lines = cfg->train_limit;
    double total_lines = lines ? (double)lines * cfg->epochs : 0;
    s.t0 = em_now();
    double last_progress = s.t0, loss_sum = 0, last_loss = NAN;
    int64_t loss_n = 0;
    int stop = 0;
    const int look = !cfg->no_lookahead && mc->tables.kind == EM_TABLES_SSD;
    lookahead la = {s.m, NULL};
    const em_dlrm_head_hook la_hook = {lookahead_fn, &la};
    for (; s.epoch < cfg->epochs && !stop; s.epoch++, s.pos = 0) {
        em_reader_cfg rc = {.path = cfg->train_path, .batch_size = cfg->batch, .num_dense = mc->num_dense,
                            .num_sparse = mc->num_tables, .table_rows = mc->rows, .strict = cfg->strict,
                            .prefetch = cfg->prefetch, .skip = s.pos, .limit = cfg->train_limit,
                            .hold = look ? 2 : 1};
        em_model_reader_seq(mc, &rc);
        if ((st = em_reader_open(&r, &rc))) goto done;
        const em_batch *b, *nb = NULL;
        em_reader_stats trained; /* the reader's counters up to batch b */
        double ts = em_now();
        st = em_reader_next(r, &b);
        while (st == EM_OK) {
            double loss;
            em_reader_stats_get(r, &trained);
            em_status nst = EM_OK; /* the next batch's status; an error is returned after b is trained */
            if (look) nst = em_reader_next(r, &nb);
            la.next = look && nst == EM_OK ? nb : NULL;
            if ((st = em_dlrm_train_step_hook(s.m, b, look ? &la_hook : NULL, &loss, pool))) goto done;
            s.pos = b->end_pos;
            s.examples += (uint64_t)b->B;
            loss_sum += loss, loss_n++;
            int64_t step = em_dlrm_step_count(s.m);
            double now = em_now();
            int last_step = cfg->max_steps && step >= cfg->max_steps;
            if (now - last_progress >= (cfg->progress_every_s > 0 ? cfg->progress_every_s : 0.5) || last_step) {
                s.rstats = trained;
                last_loss = loss_sum / (double)loss_n;
                em_train_event ev = {.kind = EM_EV_PROGRESS, .step = step, .epoch = s.epoch, .examples = s.examples,
                                     .train_loss = last_loss, .elapsed_s = now - s.t0,
                                     .examples_per_s = (double)s.examples / (s.train_s + now - ts),
                                     .fraction = total_lines > 0 ? ((double)s.epoch * (double)lines + (double)s.pos) / total_lines : -1,
                                     .reader = s.rstats};
                emit(&s, &ev);
                loss_sum = 0, loss_n = 0, last_progress = now;
            }
            int want_eval = cfg->test_path && cfg->eval_every && step % cfg->eval_every == 0;
            int want_ckpt = cfg->out_dir && cfg->ckpt_every && step % cfg->ckpt_every == 0;
            if (want_eval || want_ckpt || last_step) {
                s.train_s += em_now() - ts;
                if (want_ckpt && (st = checkpoint(&s))) goto done;
                em_metrics mt;
                if (want_eval && (st = evaluate(&s, &mt, loss_n ? loss_sum / (double)loss_n : last_loss))) goto done;
                ts = em_now();
            }
            if (last_step) {
                stop = 1;
                break;
            }
            if (!look) st = em_reader_next(r, &b);
            else if ((st = nst) == EM_OK || st == EM_ERR_EOF) b = nb;
            else st = em_reader_next(r, &b); /* the reader repeats the error with its detail */
        }
        s.train_s += em_now() - ts;
        if (st != EM_OK && st != EM_ERR_EOF) goto done;
        st = EM_OK;
        if (stop) s.rstats = trained; /* not the batch looked at beyond the last step */
        else em_reader_stats_get(r, &s.rstats);
        em_reader_free(r);
        r = NULL;
        if (stop) break;
    }
    if (!stop) { /* finished every epoch: the position is the start of the next one */
        s.pos = 0;
    }
    res->steps = em_dlrm_step_count(s.m);
    res->examples = s.examples;
    res->train_s = s.train_s;
    res->examples_per_s = s.train_s > 0 ? (double)s.examples / s.train_s : 0;
    res->reader = s.rstats;
    if (cfg->out_dir) {
        if ((st = checkpoint(&s))) goto done;
        snprintf(res->checkpoint, sizeof res->checkpoint, "%s", s.ckpt_path);
    }
    if (cfg->test_path && (st = evaluate(&s, &res->test, loss_n ? loss_sum / (double)loss_n : last_loss))) goto done;
    em_train_event ev = {.kind = EM_EV_DONE, .step = res->steps, .epoch = s.epoch, .examples = s.examples,
                         .metrics = res->test, .examples_per_s = res->examples_per_s, .elapsed_s = em_now() - s.t0,
                         .fraction = 1, .reader = s.rstats};
    emit(&s, &ev);
done:
    em_reader_free(r);
    if (s.metrics) fclose(s.metrics);
    if (st == EM_OK && model_out) *model_out = s.m;
    else em_dlrm_free(s.m);
    return st;
}
