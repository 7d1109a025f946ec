/*
 * dtrainer.c - the training loop of `mpirun -np N ember train ...` (ember/dist.h).
 *
 * Data: the training file's records [0, n) (n = its record count, or --train-limit)
 * are cut into N contiguous slices, rank r reading [r n / N, (r+1) n / N) with its own
 * reader (skip + limit). Every step each rank takes its next local batch; a rank whose
 * slice has run out joins with an empty batch until all have, so every rank makes the
 * same collective calls. The global batch is N local batches.
 * Evaluation: each rank forwards its slice of the test file; logits and labels are
 * gathered on rank 0 in file order and scored there (exact AUC over the whole file).
 * Checkpoints (em_dist_save, rank 0 writes): the single-process layout plus
 * dist.world and dist.slice_pos (records consumed in each rank's slice this epoch);
 * resuming at the same world size continues exactly where the run stopped. At another
 * world size (or in one process) the model and optimizer state carry over and the
 * epoch restarts from its beginning (train.pos = 0).
 * Only rank 0 reports events and writes metrics.jsonl.
 */
#include <errno.h>
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ember/dist.h"
#include "ember/train.h"

typedef struct {
    const em_train_cfg *cfg;
    const em_dist_opts *o;
    em_dist *d;
    em_pool *pool;
    int rank, world;
    uint64_t lo, hi;        /* this rank's slice of the training records */
    uint64_t slice_pos;     /* records consumed in the slice this epoch */
    int epoch;
    uint64_t examples;      /* global, this run */
    double train_s, t0;
    FILE *metrics;
    char ckpt[1024];
    em_train_result *res;
} dstate;

static void emit(dstate *s, const em_train_event *ev) {
    if (s->rank == 0 && s->cfg->on_event) s->cfg->on_event(s->cfg->ud, ev);
}

static int any(int mine) {
    int all = 0;
    MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    return all;
}

/* Collective: the same status on every rank. */
static em_status agree(em_status st) {
    int mine = (int)st, worst = 0;
    MPI_Allreduce(&mine, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    if (!worst || st) return st;
    return em_errorf((em_status)worst, "dist: another rank failed (status %s)", em_status_str((em_status)worst));
}

static void slice(uint64_t n, int r, int w, uint64_t *lo, uint64_t *hi) {
    *lo = n * (uint64_t)r / (uint64_t)w;
    *hi = n * (uint64_t)(r + 1) / (uint64_t)w;
}

static em_status count_records(const char *path, uint64_t limit, uint64_t *n) {
    em_status st = em_data_count(path, n);
    if (st) return st;
    if (limit && limit < *n) *n = limit;
    return EM_OK;
}

/* Evaluate on the test file: every rank its slice; metrics (and, when wanted, the labels
 * in file order) on rank 0, metrics broadcast. */
static em_status evaluate(dstate *s, em_metrics *out, float **labels_out, size_t *n_out) {
    const em_train_cfg *cfg = s->cfg;
    const em_dlrm_cfg *mc = &s->o->place.model;
    uint64_t n = 0, lo, hi;
    em_status st = agree(count_records(cfg->test_path, cfg->test_limit, &n));
    if (st) return st;
    slice(n, s->rank, s->world, &lo, &hi);
    em_reader *r = NULL;
    em_reader_cfg rc = {.path = cfg->test_path, .batch_size = 4096, .num_dense = mc->num_dense,
                        .num_sparse = mc->num_tables, .table_rows = mc->rows, .prefetch = 2, .skip = lo, .limit = hi};
    if (lo < hi) st = em_reader_open(&r, &rc);
    if ((st = agree(st))) return st;
    size_t cap = (size_t)(hi - lo) + 1, k = 0;
    float *p = em_malloc(cap * sizeof(float)), *y = em_malloc(cap * sizeof(float)), *logit = em_malloc(4096 * sizeof(float));
    if (!p || !y || !logit) st = em_errorf(EM_ERR_NOMEM, "dist: out of memory for %zu test predictions", cap);
    st = agree(st);
    for (int more = 1; !st && more;) {
        const em_batch *b = NULL;
        em_status rs = r ? em_reader_next(r, &b) : EM_ERR_EOF;
        if (rs != EM_OK && rs != EM_ERR_EOF) st = rs;
        if (rs == EM_ERR_EOF) b = NULL;
        if (b && k + (size_t)b->B > cap) st = em_errorf(EM_ERR_INVALID, "dist: %s: more test records than counted", cfg->test_path);
        if ((st = agree(st))) break;
        if (!(more = any(b != NULL))) break;
        if ((st = em_dist_forward(s->d, b, logit, s->pool))) break;
        for (int i = 0; b && i < b->B; i++, k++) {
            const double z = logit[i];
            p[k] = (float)(z >= 0 ? 1.0 / (1.0 + exp(-z)) : exp(z) / (1.0 + exp(z)));
            y[k] = b->label[i];
        }
    }
    em_reader_free(r);
    em_free(logit);
    if (st) {
        em_free(p), em_free(y);
        return st;
    }
    /* gather in rank order = file order */
    int kn = (int)k, *cnt = em_malloc((size_t)s->world * sizeof(int)), *dis = em_malloc((size_t)s->world * sizeof(int));
    if (!cnt || !dis) st = em_errorf(EM_ERR_NOMEM, "dist: out of memory");
    if ((st = agree(st))) {
        em_free(p), em_free(y), em_free(cnt), em_free(dis);
        return st;
    }
    MPI_Gather(&kn, 1, MPI_INT, cnt, 1, MPI_INT, 0, MPI_COMM_WORLD);
    float *ap = NULL, *ay = NULL;
    size_t total = 0;
    if (s->rank == 0) {
        for (int q = 0; q < s->world; q++) dis[q] = (int)total, total += (size_t)cnt[q];
        ap = em_malloc((total + 1) * sizeof(float)), ay = em_malloc((total + 1) * sizeof(float));
        if (!ap || !ay) st = em_errorf(EM_ERR_NOMEM, "dist: out of memory for %zu test predictions", total);
    }
    if (!(st = agree(st))) {
        MPI_Gatherv(p, kn, MPI_FLOAT, ap, cnt, dis, MPI_FLOAT, 0, MPI_COMM_WORLD);
        MPI_Gatherv(y, kn, MPI_FLOAT, ay, cnt, dis, MPI_FLOAT, 0, MPI_COMM_WORLD);
        if (s->rank == 0) st = em_metrics_compute(ap, ay, total, out);
        st = agree(st);
        MPI_Bcast(out, (int)sizeof *out, MPI_BYTE, 0, MPI_COMM_WORLD);
    }
    em_free(p), em_free(y), em_free(cnt), em_free(dis), em_free(ap);
    if (!st && s->rank == 0 && labels_out) {
        *labels_out = ay, *n_out = total;
    } else {
        em_free(ay);
    }
    return st;
}

static em_status checkpoint(dstate *s) {
    char epoch[32], pos[32], world[32], sp[32], batch[32];
    snprintf(epoch, sizeof epoch, "%d", s->epoch);
    snprintf(pos, sizeof pos, "0");
    snprintf(world, sizeof world, "%d", s->world);
    snprintf(sp, sizeof sp, "%llu", (unsigned long long)s->slice_pos);
    snprintf(batch, sizeof batch, "%d", s->cfg->batch);
    em_st_meta meta[] = {{"train.epoch", epoch}, {"train.pos", pos}, {"train.batch", batch},
                         {"dist.world", world}, {"dist.slice_pos", sp}};
    em_status st = em_dist_save(s->d, s->ckpt, meta, 5, s->pool);
    if (st) return st;
    em_train_event ev = {.kind = EM_EV_CHECKPOINT, .step = em_dist_step_count(s->d), .epoch = s->epoch,
                         .examples = s->examples, .path = s->ckpt, .fraction = -1};
    emit(s, &ev);
    return EM_OK;
}

static void log_eval(dstate *s, const em_metrics *m, double loss) {
    if (!s->metrics) return;
    char buf[512];
    em_metrics_json(m, buf, sizeof buf);
    fprintf(s->metrics, "{\"step\":%lld,\"epoch\":%d,\"examples\":%llu,\"train_loss\":%.6f,\"world\":%d,\"test\":%s}\n",
            (long long)em_dist_step_count(s->d), s->epoch, (unsigned long long)s->examples, loss, s->world, buf);
    fflush(s->metrics);
}

/* Resume: the model config and the position from the checkpoint (rank 0 reads, all learn). */
static em_status resume_meta(const char *path, em_dlrm_cfg *mc, int *epoch, int *world, uint64_t *slice_pos) {
    char buf[65536];
    int len = 0;
    long long v[3] = {0, 0, 0};
    em_status st = EM_OK;
    if (em_dist_rank() == 0) {
        em_st *f = NULL;
        if (!(st = em_st_open(&f, path))) {
            const char *js = em_st_meta_get(f, "ember.model"), *ep = em_st_meta_get(f, "train.epoch");
            const char *w = em_st_meta_get(f, "dist.world"), *sp = em_st_meta_get(f, "dist.slice_pos");
            if (!js || !ep) st = em_errorf(EM_ERR_CORRUPT, "%s: no model configuration or training position to resume from", path);
            else if ((len = snprintf(buf, sizeof buf, "%s", js)) >= (int)sizeof buf)
                st = em_errorf(EM_ERR_UNSUPPORTED, "%s: model configuration over %zu bytes", path, sizeof buf);
            v[0] = ep ? atoll(ep) : 0, v[1] = w ? atoll(w) : 1, v[2] = sp ? atoll(sp) : 0;
            em_st_close(f);
        }
    }
    if ((st = agree(st))) return st;
    MPI_Bcast(&len, 1, MPI_INT, 0, MPI_COMM_WORLD);
    MPI_Bcast(buf, len + 1, MPI_CHAR, 0, MPI_COMM_WORLD);
    MPI_Bcast(v, 3, MPI_LONG_LONG, 0, MPI_COMM_WORLD);
    *epoch = (int)v[0], *world = (int)v[1], *slice_pos = (uint64_t)v[2];
    return em_dlrm_cfg_from_json(buf, mc);
}

static em_status mkdir_one(const char *p) {
    if (mkdir(p, 0755) == 0 || errno == EEXIST) return EM_OK;
    return em_errorf(EM_ERR_IO, "%s: cannot create directory: %s", p, strerror(errno));
}

em_status em_dist_train_run(const em_train_cfg *cfg, em_dist_opts *o, em_pool *pool, em_train_result *res,
                            float **test_labels, size_t *n_test) {
    memset(res, 0, sizeof *res);
    if (test_labels) *test_labels = NULL, *n_test = 0;
    if (!cfg->train_path || cfg->batch < 1 || cfg->epochs < 1)
        return em_errorf(EM_ERR_INVALID, "train: need a training file, batch >= 1 and epochs >= 1");
    dstate s = {.cfg = cfg, .o = o, .pool = pool, .rank = em_dist_rank(), .world = em_dist_world(), .res = res};
    em_status st = EM_OK;
    em_reader *r = NULL;
    int saved_world = s.world;
    uint64_t saved_pos = 0;
    o->place.prec = o->prec;
    o->place.group = o->group, o->place.sync_every = o->sync_every;
    o->place.bucket_kb = o->bucket_kb;
    if (cfg->resume) {
        if ((st = resume_meta(cfg->resume, &o->place.model, &s.epoch, &saved_world, &saved_pos))) return st;
    } else {
        o->place.model = cfg->model;
    }
    if (o->sharding == EM_SHARD_AUTO) {
        em_plan *p = NULL;
        if ((st = agree(em_dist_plan(&o->place, s.world, cfg->batch, &p)))) return st;
        o->plan_allreduce = p->allreduce_bytes;
        if (s.rank == 0) {
            o->plan_send = em_calloc((size_t)p->group, sizeof(double));
            o->plan_recv = em_calloc((size_t)p->group, sizeof(double));
            for (int q = 0; q < p->group && o->plan_send && o->plan_recv; q++)
                o->plan_send[q] = p->ranks[q].send_bytes, o->plan_recv[q] = p->ranks[q].recv_bytes;
        }
        em_plan_free(p);
    } else {
        const int g = o->group > 0 ? o->group : s.world;
        for (int t = 0; t < o->place.model.num_tables; t++) o->place.type[t] = o->sharding, o->place.owner[t] = t % g;
    }
    if (cfg->out_dir) {
        if (s.rank == 0) st = mkdir_one(cfg->out_dir);
        if ((st = agree(st))) return st;
        if (snprintf(s.ckpt, sizeof s.ckpt, "%s/checkpoint.safetensors", cfg->out_dir) >= (int)sizeof s.ckpt)
            st = em_errorf(EM_ERR_INVALID, "train: --out %.100s...: path too long", cfg->out_dir);
        if ((st = agree(st))) return st;
    }
    st = cfg->resume ? em_dist_load(&s.d, &o->place, cfg->resume, pool) : em_dist_create(&s.d, &o->place, pool);
    if (st) return st;
    if (cfg->resume && saved_world == s.world) s.slice_pos = saved_pos;
    if (cfg->out_dir && s.rank == 0) {
        char mpath[1200];
        snprintf(mpath, sizeof mpath, "%s/metrics.jsonl", cfg->out_dir);
        if (!(s.metrics = fopen(mpath, cfg->resume ? "a" : "w"))) st = em_errorf(EM_ERR_IO, "%s: %s", mpath, strerror(errno));
    }
    uint64_t n = 0;
    if (!st) st = count_records(cfg->train_path, cfg->train_limit, &n);
    if ((st = agree(st))) goto done;
    slice(n, s.rank, s.world, &s.lo, &s.hi);
    const em_dlrm_cfg *mc = &o->place.model;
    s.t0 = em_now();
    double last_progress = s.t0, loss_sum = 0, last_loss = NAN;
    em_dist_bytes bsum = {0};
    double tsum[2] = {0, 0};
    int64_t loss_n = 0, steps_run = 0;
    int stop = 0;
    for (; s.epoch < cfg->epochs && !stop; s.epoch++, s.slice_pos = 0) {
        em_reader_cfg rc = {.path = cfg->train_path, .batch_size = cfg->batch, .num_dense = mc->num_dense,
                            .num_sparse = mc->num_tables, .table_rows = mc->rows, .strict = cfg->strict,
                            .prefetch = cfg->prefetch, .skip = s.lo + s.slice_pos, .limit = s.hi};
        st = s.lo + s.slice_pos < s.hi ? em_reader_open(&r, &rc) : EM_OK;
        if ((st = agree(st))) goto done;
        double ts = em_now();
        for (;;) {
            const em_batch *b = NULL;
            em_status rs = r ? em_reader_next(r, &b) : EM_ERR_EOF;
            if (rs == EM_ERR_EOF) b = NULL, rs = EM_OK;
            if ((st = agree(rs))) goto done;
            if (!any(b != NULL)) break;
            double loss = 0;
            if ((st = em_dist_train_step(s.d, b, &loss, pool))) goto done;
            em_dist_bytes by;
            em_dist_last_bytes(s.d, &by);
            bsum.ids += by.ids, bsum.pooled += by.pooled, bsum.grads += by.grads, bsum.dp += by.dp;
            bsum.allreduce += by.allreduce, bsum.sync += by.sync, bsum.total += by.total;
            double tb, tw;
            em_dist_last_times(s.d, &tb, &tw);
            tsum[0] += tb, tsum[1] += tw;
            steps_run++;
            if (b) s.slice_pos = b->end_pos - s.lo;
            int g = b ? b->B : 0, gsum = 0;
            MPI_Allreduce(&g, &gsum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
            s.examples += (uint64_t)gsum;
            loss_sum += loss, loss_n++;
            const int64_t step = em_dist_step_count(s.d);
            const double now = em_now();
            const int last_step = cfg->max_steps && step >= cfg->max_steps;
            if (now - last_progress >= (cfg->progress_every_s > 0 ? cfg->progress_every_s : 0.5) || last_step) {
                last_loss = loss_sum / (double)loss_n;
                em_train_event ev = {.kind = EM_EV_PROGRESS, .step = step, .epoch = s.epoch, .examples = s.examples,
                                     .train_loss = last_loss, .elapsed_s = now - s.t0,
                                     .examples_per_s = (double)s.examples / (s.train_s + now - ts),
                                     .fraction = n ? ((double)s.epoch * (double)n + (double)s.slice_pos * s.world) /
                                                         ((double)n * cfg->epochs)
                                                   : -1};
                emit(&s, &ev);
                loss_sum = 0, loss_n = 0, last_progress = now;
            }
            const int want_eval = cfg->test_path && cfg->eval_every && step % cfg->eval_every == 0;
            const int want_ckpt = cfg->out_dir && cfg->ckpt_every && step % cfg->ckpt_every == 0;
            if (want_eval || want_ckpt) {
                s.train_s += em_now() - ts;
                if (want_ckpt && (st = checkpoint(&s))) goto done;
                em_metrics mt;
                if (want_eval) {
                    if ((st = evaluate(&s, &mt, NULL, NULL))) goto done;
                    log_eval(&s, &mt, loss_n ? loss_sum / (double)loss_n : last_loss);
                    em_train_event ev = {.kind = EM_EV_EVAL, .step = step, .epoch = s.epoch, .examples = s.examples,
                                         .metrics = mt, .fraction = -1};
                    emit(&s, &ev);
                }
                ts = em_now();
            }
            if (last_step) {
                stop = 1;
                break;
            }
        }
        s.train_s += em_now() - ts;
        em_reader_free(r);
        r = NULL;
        if (stop) break;
    }
    if (!stop) s.slice_pos = 0;
    res->steps = em_dist_step_count(s.d);
    res->examples = s.examples;
    res->train_s = s.train_s;
    res->examples_per_s = s.train_s > 0 ? (double)s.examples / s.train_s : 0;
    if (steps_run) {
        const double k = 1.0 / (double)steps_run;
        o->mean_bytes = (em_dist_bytes){bsum.ids * k, bsum.pooled * k, bsum.grads * k, bsum.dp * k, bsum.allreduce * k,
                                        bsum.sync * k, bsum.total * k};
        o->mean_bwd_s = tsum[0] * k, o->mean_ar_wait_s = tsum[1] * k;
    }
    o->buckets = em_dist_buckets(s.d);
    if (s.rank == 0 && (!(o->rank_bytes = em_calloc((size_t)s.world, sizeof(em_dist_bytes))) ||
                        !(o->rank_times = em_calloc(2 * (size_t)s.world, sizeof(double)))))
        st = em_errorf(EM_ERR_NOMEM, "dist: out of memory");
    if ((st = agree(st))) goto done;
    MPI_Gather(&o->mean_bytes, (int)sizeof(em_dist_bytes), MPI_BYTE, o->rank_bytes, (int)sizeof(em_dist_bytes), MPI_BYTE, 0,
               MPI_COMM_WORLD);
    const double tm[2] = {o->mean_bwd_s, o->mean_ar_wait_s};
    MPI_Gather(tm, 2, MPI_DOUBLE, o->rank_times, 2, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    if ((st = em_dist_sync(s.d))) goto done; /* 2D: the replicas' average is the model */
    if (cfg->out_dir) {
        if ((st = checkpoint(&s))) goto done;
        snprintf(res->checkpoint, sizeof res->checkpoint, "%s", s.ckpt);
    }
    if (cfg->test_path) {
        if ((st = evaluate(&s, &res->test, test_labels, n_test))) goto done;
        log_eval(&s, &res->test, loss_n ? loss_sum / (double)loss_n : last_loss);
    }
    em_train_event ev = {.kind = EM_EV_DONE, .step = res->steps, .epoch = s.epoch, .examples = s.examples,
                         .metrics = res->test, .examples_per_s = res->examples_per_s, .elapsed_s = em_now() - s.t0,
                         .fraction = 1};
    emit(&s, &ev);
done:
    em_reader_free(r);
    if (s.metrics) fclose(s.metrics);
    em_dist_free(s.d);
    return st;
}
