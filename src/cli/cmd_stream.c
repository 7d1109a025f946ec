/*
 * cmd_stream.c - `ember stream`: streaming training over a file, a growing directory
 * or stdin in windows with progressive evaluation (ember/stream.h); as an ExFM teacher
 * (--log-predictions) or student (--teacher-log, --vertical, --distill).
 *
 *   ember stream --data runs/drift/stream.tsv --out runs/s --window 100000 --ckpt-every 5
 *   ember stream --data incoming/ --idle-timeout 600 --out runs/s --resume
 *   ember stream --data d/stream.tsv --out runs/teacher --log-predictions runs/teacher.das
 *   ember stream --data d/stream.tsv --out runs/v0 --vertical 0 --teacher-log runs/teacher.das \
 *                --distill aux+adapter
 *
 * Each window's report is a JSON line in <out>/windows.jsonl (and a short line on
 * stderr); a summary JSON object is printed on stdout at the end.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"

typedef struct {
    em_stream_cfg sc;
    const char *out;
    int threads, quiet;
    double lr, dense_lr, sparse_lr; /* NAN = not given */
    em_optim_kind dense_kind, sparse_kind;
    int64_t rows_cap;
    int rows_given, bot_given, top_given;
    double alpha, beta, w, w_adapter, head_lr, adapter_lr, poll_ms;
} stream_ctx;

#define CTX ((stream_ctx *)c)

static int set_optim(void *c, const cli_opt *o, const char *v) {
    em_optim_kind k;
    if (em_optim_parse(v, &k) != EM_OK) {
        fprintf(stderr, "ember stream: --%s: unknown optimizer '%s' (sgd, adagrad, rowwise_adagrad, adam, adamw)\n",
                o->name, v);
        return -1;
    }
    memcpy((char *)c + o->off, &k, sizeof k);
    return 0;
}
static int set_layers(const char *opt, const char *v, int *sizes, int *n, int *given) {
    int k = em_parse_layers(v, sizes, EM_DLRM_MAX_LAYERS + 1);
    if (k < 2) {
        fprintf(stderr, "ember stream: --%s: expected sizes like 13-512-256-64-16, got '%s'\n", opt, v);
        return -1;
    }
    *n = k, *given = 1;
    return 0;
}
static int set_bot(void *c, const cli_opt *o, const char *v) {
    return set_layers(o->name, v, CTX->sc.model.bot, &CTX->sc.model.n_bot, &CTX->bot_given);
}
static int set_top(void *c, const cli_opt *o, const char *v) {
    return set_layers(o->name, v, CTX->sc.model.top, &CTX->sc.model.n_top, &CTX->top_given);
}
static int set_rows(void *c, const cli_opt *o, const char *v) {
    em_dlrm_cfg *m = &CTX->sc.model;
    if (cli_int_list("stream", o->name, "table sizes", v, m->rows, EM_DLRM_MAX_TABLES, &m->num_tables)) return -1;
    CTX->rows_given = 1;
    return 0;
}
static int set_distill(void *c, const cli_opt *o, const char *v) {
    if (em_distill_parse(v, &CTX->sc.student.mode) != EM_OK) {
        fprintf(stderr, "ember stream: --%s: expected none, serving, aux or aux+adapter, got '%s'\n", o->name, v);
        return -1;
    }
    return 0;
}

#define BIG (1LL << 60)
static const cli_opt opts[] = {
    OPT_CONFIG("JSON object of these options (keys with - or _); later flags override it"),
    OPT_STR("data", "PATH", "the stream: a data file (TSV or binary), a directory of *.tsv/*.bin files taken in name order "
            "as they arrive, or - for TSV on stdin", stream_ctx, sc.source),
    OPT_STR("out", "DIR", "run directory: checkpoint.safetensors, windows.jsonl (default runs/stream)", stream_ctx, out),
    OPT_FLAG("resume", "continue from <out>/checkpoint.safetensors if it exists (exactly where it stopped)", stream_ctx,
             sc.resume),
    OPT_INT("window", "N", "examples per window (default 100000)", stream_ctx, sc.window, 1, 1LL << 34),
    OPT_INT("batch", "N", "examples per training step (default 128)", stream_ctx, sc.batch, 1, 1 << 20),
    OPT_INT("eval-batch", "N", "examples per forward pass of the window's evaluation (default 1024)", stream_ctx,
            sc.eval_batch, 1, 1 << 20),
    OPT_INT("ckpt-every", "K", "write the checkpoint every K windows (default 1; 0 = at the end only)", stream_ctx,
            sc.ckpt_every, 0, BIG),
    OPT_INT("max-windows", "N", "stop after N windows in all (default: the end of the stream)", stream_ctx, sc.max_windows,
            0, BIG),
    OPT_DOUBLE_POS("poll-ms", "MS", "directory: milliseconds between scans for new files (default 200)", stream_ctx, poll_ms),
    OPT_DOUBLE("idle-timeout", "S", "directory: end the stream after S seconds without a new file (default: never)",
               stream_ctx, sc.idle_timeout_s),
    OPT_STR("end-file", "NAME", "directory: the stream ends once this file exists and every data file is read "
            "(default _END)", stream_ctx, sc.end_file),
    OPT_INT("vertical", "V", "train on vertical V only (column 1 of each data file's .side sidecar; default: all)",
            stream_ctx, sc.vertical, -1, 0xffff),
    OPT_UINT("stream-id", "N", "16-bit stream number of example ids in prediction logs (default 0)", stream_ctx,
             sc.stream_id, 0, 0xffff),
    OPT_STR("log-predictions", "DAS", "teacher: append every example's progressive prediction to this log", stream_ctx,
            sc.log_predictions),
    OPT_STR("teacher-log", "DAS", "student: join each window with this teacher log (followed as it grows)", stream_ctx,
            sc.teacher_log),
    OPT_DOUBLE("teacher-wait", "S", "student: wait up to S seconds for a window's teacher predictions (default 0)",
               stream_ctx, sc.teacher_wait_s),
    OPT_FN("distill", "MODE", "student: none | serving | aux | aux+adapter (default aux+adapter with --teacher-log)",
           set_distill, 0),
    OPT_DOUBLE_POS("alpha", "F", "soft label min(alpha * p_teacher, 1) (default 1)", stream_ctx, alpha),
    OPT_DOUBLE("beta", "F", "distillation head's gradient scale into the backbone (default 1)", stream_ctx, beta),
    OPT_DOUBLE("distill-weight", "F", "weight w of the distillation loss (default 1)", stream_ctx, w),
    OPT_DOUBLE("adapter-weight", "F", "weight of the adapter's target (default 1)", stream_ctx, w_adapter),
    OPT_INT("adapter-hidden", "K", "hidden units of the student adapter (default 8)", stream_ctx, sc.student.adapter_hidden,
            2, 256),
    OPT_DOUBLE_POS("head-lr", "F", "distillation head learning rate (default: the dense one)", stream_ctx, head_lr),
    OPT_DOUBLE_POS("adapter-lr", "F", "student adapter learning rate (default 0.05)", stream_ctx, adapter_lr),
    OPT_DOUBLE_POS("lr", "F", "learning rate of both optimizers (default 0.1)", stream_ctx, lr),
    OPT_DOUBLE_POS("dense-lr", "F", "learning rate of the dense optimizer", stream_ctx, dense_lr),
    OPT_DOUBLE_POS("sparse-lr", "F", "learning rate of the embedding optimizer", stream_ctx, sparse_lr),
    OPT_FN("dense-opt", "NAME", "sgd | adagrad | adam | adamw (default sgd)", set_optim, offsetof(stream_ctx, dense_kind)),
    OPT_FN("sparse-opt", "NAME", "sgd | adagrad | rowwise_adagrad (default sgd)", set_optim,
           offsetof(stream_ctx, sparse_kind)),
    OPT_INT("dim", "D", "embedding dimension (default 16)", stream_ctx, sc.model.dim, 1, 4096),
    OPT_FN("bot", "SIZES", "bottom MLP, e.g. 13-512-256-64-16 (ends at D)", set_bot, 0),
    OPT_FN("top", "SIZES", "top MLP, e.g. 367-512-256-1 (starts at D + T(T+1)/2)", set_top, 0),
    OPT_FN("rows", "LIST", "rows of each table, comma-separated (default: Criteo Kaggle cardinalities)", set_rows, 0),
    OPT_INT("rows-cap", "N", "cap every table at N rows (default 1000000; ids are reduced modulo the rows)", stream_ctx,
            rows_cap, 0, 1LL << 40),
    OPT_UINT("seed", "N", "initialisation seed (default 1)", stream_ctx, sc.model.seed, 0, 1LL << 62),
    OPT_INT("threads", "N", "worker threads (default 2)", stream_ctx, threads, 1, 256),
    OPT_INT("prefetch", "N", "batches parsed ahead by the reader thread (default 4)", stream_ctx, sc.prefetch, 0, 64),
    OPT_FLAG("strict", "stop at the first malformed input line instead of counting and skipping it", stream_ctx, sc.strict),
    OPT_FLAG("quiet", "no per-window line on stderr", stream_ctx, quiet),
};

static void on_window(void *ud, const em_stream_window *w) {
    const stream_ctx *c = ud;
    if (c->quiet) return;
    fprintf(stderr, "window %lld: %llu examples, AUC %.4f NE %.4f calibration %.3f (before training), train loss %.4f, "
                    "%.0f ex/s",
            (long long)w->window, (unsigned long long)w->examples, w->eval.auc, w->eval.ne, w->eval.calibration,
            w->train_loss, w->train_s > 0 ? (double)w->examples / w->train_s : 0.0);
    if (c->sc.teacher_log)
        fprintf(stderr, ", teacher %llu/%llu (AUC %.4f)", (unsigned long long)w->teacher_present,
                (unsigned long long)(w->teacher_present + w->teacher_missing), w->teacher.auc);
    fputc('\n', stderr);
}

int cmd_stream(int argc, char **argv) {
    stream_ctx c;
    memset(&c, 0, sizeof c);
    c.sc = em_stream_default();
    c.sc.student.mode = (em_distill_mode)-1; /* not given */
    c.out = "runs/stream";
    c.threads = 2;
    c.lr = c.dense_lr = c.sparse_lr = NAN;
    c.alpha = c.beta = c.w = c.w_adapter = c.head_lr = c.adapter_lr = NAN;
    c.dense_kind = c.sparse_kind = EM_OPT_SGD;
    c.rows_cap = 1000000;
    char *pos[1];
    int npos;
    int rc = cli_parse("stream", "--data PATH [options]", opts, CLI_NOPTS(opts), &c, argc, argv, pos, &npos, 0);
    if (rc) return rc < 0 ? 2 : 0;
    if (!c.sc.source) {
        fprintf(stderr, "ember stream: --data is required (a file, a directory, or - for stdin)\n");
        return 2;
    }
    em_stream_cfg *s = &c.sc;
    if ((int)s->student.mode < 0) s->student.mode = s->teacher_log ? EM_DISTILL_AUX_ADAPTER : EM_DISTILL_NONE;
    if (!isnan(c.alpha)) s->student.alpha = (float)c.alpha;
    if (!isnan(c.beta)) s->student.beta = (float)c.beta;
    if (!isnan(c.w)) s->student.w = (float)c.w;
    if (!isnan(c.w_adapter)) s->student.w_adapter = (float)c.w_adapter;
    if (!isnan(c.head_lr)) s->student.head_lr = (float)c.head_lr;
    if (!isnan(c.adapter_lr)) s->student.adapter_lr = (float)c.adapter_lr;
    if (c.poll_ms > 0) s->poll_s = c.poll_ms / 1000.0;
    if (s->idle_timeout_s < 0 || s->teacher_wait_s < 0) {
        fprintf(stderr, "ember stream: --idle-timeout and --teacher-wait must be >= 0\n");
        return 2;
    }

    em_dlrm_cfg *m = &s->model;
    if (!c.rows_given) {
        em_dlrm_cfg k = em_dlrm_kaggle(0);
        m->num_tables = k.num_tables;
        memcpy(m->rows, k.rows, sizeof k.rows);
    }
    for (int t = 0; t < m->num_tables; t++)
        if (c.rows_cap > 0 && m->rows[t] > c.rows_cap) m->rows[t] = c.rows_cap;
    if (!c.bot_given) m->bot[0] = m->num_dense, m->bot[m->n_bot - 1] = m->dim;
    if (!c.top_given) m->top[0] = em_dot_interact_out_dim(m->num_tables, m->dim);
    double dlr = !isnan(c.dense_lr) ? c.dense_lr : !isnan(c.lr) ? c.lr : 0.1;
    double slr = !isnan(c.sparse_lr) ? c.sparse_lr : !isnan(c.lr) ? c.lr : 0.1;
    m->dense_opt = em_optim_default(c.dense_kind, (float)dlr);
    m->sparse_opt = em_optim_default(c.sparse_kind, (float)slr);
    em_status st = em_dlrm_cfg_validate(m);
    if (st) {
        cli_fail("stream", st);
        return 2;
    }
    s->out_dir = c.out;
    s->on_window = on_window;
    s->ud = &c;

    em_pool *pool = NULL;
    if ((st = em_pool_create(&pool, c.threads))) {
        cli_fail("stream", st);
        return 1;
    }
    em_stream_result r;
    st = em_stream_run(s, pool, &r, NULL);
    em_pool_free(pool);
    if (st) {
        cli_fail("stream", st);
        return 1;
    }
    if (r.malformed)
        fprintf(stderr, "warning: %llu malformed lines skipped; first: %s\n", (unsigned long long)r.malformed,
                r.first_error);
    printf("{\"windows\":%lld,\"windows_run\":%lld,\"examples\":%llu,\"skipped_vertical\":%llu,\"malformed\":%llu,"
           "\"files\":%llu,\"pos\":%llu,\"resumed\":%d,\"train_s\":%.3f,\"eval_s\":%.3f,\"read_s\":%.3f,\"join_s\":%.3f,"
           "\"checkpoint\":\"%s\"}\n",
           (long long)r.windows, (long long)r.windows_run, (unsigned long long)r.examples,
           (unsigned long long)r.skipped_vertical, (unsigned long long)r.malformed, (unsigned long long)r.files,
           (unsigned long long)r.pos, r.resumed, r.train_s, r.eval_s, r.read_s, r.join_s, r.checkpoint);
    return 0;
}
