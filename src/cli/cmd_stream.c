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
    int64_t vertical_rows; /* > 0: the vertical as a feature, a last table of these rows */
    int rows_given, bot_given, top_given;
    double alpha, beta, w, w_adapter, head_lr, adapter_lr, poll_ms;
} stream_ctx;

#define CTX ((stream_ctx *)c)

static int set_bot(void *c, const cli_opt *o, const char *v) {
    return cli_layers("stream", o->name, v, CTX->sc.model.bot, &CTX->sc.model.n_bot, &CTX->bot_given);
}
static int set_top(void *c, const cli_opt *o, const char *v) {
    return cli_layers("stream", o->name, v, CTX->sc.model.top, &CTX->sc.model.n_top, &CTX->top_given);
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
    OPT_UINT("from", "POS", "begin at global position POS (earlier examples are passed over)", stream_ctx, sc.start_pos, 0,
             1LL << 48),
    OPT_INT("vertical", "V", "train on vertical V only (column 1 of each data file's .side sidecar; default: all)",
            stream_ctx, sc.vertical, -1, 0xffff),
    OPT_INT("vertical-feature", "N", "give the model the example's vertical (the sidecar's) as a feature: one more "
            "table of N rows, after the data's (default: none)", stream_ctx, vertical_rows, 0, 1 << 20),
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
    OPT_FN("dense-opt", "NAME", "sgd | adagrad | adam | adamw (default sgd)", cli_set_optim, offsetof(stream_ctx, dense_kind)),
    OPT_FN("sparse-opt", "NAME", "sgd | adagrad | rowwise_adagrad (default sgd)", cli_set_optim,
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
    if (c.vertical_rows > 0) {
        if (m->num_tables >= EM_DLRM_MAX_TABLES) {
            fprintf(stderr, "ember stream: --vertical-feature: no room for one more table\n");
            return 2;
        }
        m->rows[m->num_tables++] = c.vertical_rows;
        s->vertical_feature = 1;
    }
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
           "\"log_s\":%.3f,\"checkpoint\":\"%s\"}\n",
           (long long)r.windows, (long long)r.windows_run, (unsigned long long)r.examples,
           (unsigned long long)r.skipped_vertical, (unsigned long long)r.malformed, (unsigned long long)r.files,
           (unsigned long long)r.pos, r.resumed, r.train_s, r.eval_s, r.read_s, r.join_s, r.log_s, r.checkpoint);
    return 0;
}

/* ------------------------------------------------------------------ ember exfm */
/*
 * `ember exfm`: the ExFM pipeline on one stream (a file or directory with sidecars):
 * a teacher (the larger model) streams every vertical and logs each example's
 * progressive prediction to <out>/teacher.das; then, for each of the first --students
 * verticals and each distillation mode of --modes, a student streams its vertical
 * joined with that log. Prints one JSON object: per run the progressive NE over the
 * whole stream (example-weighted: total log loss / entropy of the overall CTR) and
 * over its second half (after the warm-up), AUC likewise, and the timings.
 */

typedef struct {
    stream_ctx s;               /* the students' model and stream options (s.out: the run directory) */
    int students;
    const char *modes, *bot, *top, *tbot, *ttop;
    int tdim;
    int64_t trows_cap, tvrows;
    int skip_teacher;
    uint64_t student_from;
    double tlr, tdlr, tslr;          /* NAN = not given */
    em_optim_kind tdense, tsparse; /* -1 = the students' */
} exfm_ctx;

typedef struct {
    const stream_ctx *c;
    const char *who;
} exfm_who;

static void exfm_window(void *ud, const em_stream_window *w) {
    const exfm_who *a = ud;
    if (!a->c->quiet)
        fprintf(stderr, "%s window %lld: %llu examples, AUC %.4f NE %.4f, %.0f ex/s\n", a->who, (long long)w->window,
                (unsigned long long)w->examples, w->eval.auc, w->eval.ne,
                w->train_s > 0 ? (double)w->examples / w->train_s : 0.0);
}

/* Progressive totals of a run from its windows.jsonl (all windows, resumed ones too):
 * over the whole stream and over its second half (windows >= count / 2). */
typedef struct {
    double n, loss, clicks, auc_sum, auc_n;
} ne_acc;

static void acc_file(const char *dir, ne_acc *all, ne_acc *half) {
    memset(all, 0, sizeof *all), memset(half, 0, sizeof *half);
    char path[1300], line[8192];
    snprintf(path, sizeof path, "%s/windows.jsonl", dir);
    FILE *f = fopen(path, "r");
    if (!f) return;
    int64_t total = 0;
    while (fgets(line, sizeof line, f)) total++;
    rewind(f);
    for (int64_t w = 0; fgets(line, sizeof line, f); w++) {
        const char *e = strstr(line, "\"eval\":{"); /* the run's own (a student's teacher block comes later) */
        if (!e || !strstr(e, "\"n\":") || !strstr(e, "\"logloss\":") || !strstr(e, "\"ctr\":") || !strstr(e, "\"auc\":"))
            continue;
        double n = atof(strstr(e, "\"n\":") + 4), ll = atof(strstr(e, "\"logloss\":") + 10),
               ctr = atof(strstr(e, "\"ctr\":") + 6);
        const char *au = strstr(e, "\"auc\":") + 6;
        for (ne_acc *a = all; a; a = (a == all && w >= total / 2) ? half : NULL) {
            a->n += n, a->loss += n * ll, a->clicks += n * ctr;
            if (strncmp(au, "null", 4) != 0) a->auc_sum += n * atof(au), a->auc_n += n;
        }
    }
    fclose(f);
}

static double ne_of(const ne_acc *a) {
    if (a->n <= 0) return NAN;
    double p = a->clicks / a->n;
    if (p <= 0 || p >= 1) return NAN;
    double h = -(p * log(p) + (1 - p) * log(1 - p));
    return a->loss / a->n / h;
}

#define XCTX ((exfm_ctx *)c)
static int x_set_optim(void *c, const cli_opt *o, const char *v) { return cli_set_optim(&XCTX->s, o, v); }

static const cli_opt xopts[] = {
    OPT_CONFIG("JSON object of these options (keys with - or _); later flags override it"),
    OPT_STR("data", "PATH", "the stream (file or directory) with .side sidecars, e.g. ember gen --drift's stream.tsv",
            exfm_ctx, s.sc.source),
    OPT_STR("out", "DIR", "run directory: teacher/, teacher.das, v<V>-<mode>/ (default runs/exfm)", exfm_ctx, s.out),
    OPT_INT("students", "N", "students: verticals 0..N-1 (default 3)", exfm_ctx, students, 1, 0xffff),
    OPT_STR("modes", "LIST", "distillation modes of each student, comma-separated (default none,serving,aux,aux+adapter)",
            exfm_ctx, modes),
    OPT_FLAG("skip-teacher", "reuse <out>/teacher.das from an earlier run", exfm_ctx, skip_teacher),
    OPT_UINT("student-from", "POS", "students begin at global position POS: the teacher has streamed the examples before it "
             "(its history) when they start (default 0)", exfm_ctx, student_from, 0, 1LL << 48),
    OPT_DOUBLE_POS("teacher-lr", "F", "teacher's learning rate (default: --lr)", exfm_ctx, tlr),
    OPT_FN("teacher-dense-opt", "NAME", "teacher's dense optimizer (default: --dense-opt)", cli_set_optim,
           offsetof(exfm_ctx, tdense)),
    OPT_FN("teacher-sparse-opt", "NAME", "teacher's embedding optimizer (default: --sparse-opt)", cli_set_optim,
           offsetof(exfm_ctx, tsparse)),
    OPT_DOUBLE_POS("teacher-dense-lr", "F", "teacher's dense learning rate (default: --teacher-lr)", exfm_ctx, tdlr),
    OPT_DOUBLE_POS("teacher-sparse-lr", "F", "teacher's embedding learning rate (default: --teacher-lr)", exfm_ctx, tslr),
    OPT_INT("window", "N", "examples per window (default 100000; a student's windows hold its vertical only)", exfm_ctx,
            s.sc.window, 1, 1LL << 34),
    OPT_INT("batch", "N", "examples per training step (default 128)", exfm_ctx, s.sc.batch, 1, 1 << 20),
    OPT_INT("ckpt-every", "K", "checkpoint every K windows (default 10; 0 = at the end only)", exfm_ctx, s.sc.ckpt_every, 0,
            BIG),
    OPT_DOUBLE_POS("alpha", "F", "soft label min(alpha * p_teacher, 1) (default 1)", exfm_ctx, s.alpha),
    OPT_DOUBLE("beta", "F", "distillation head's gradient scale into the backbone (default 1)", exfm_ctx, s.beta),
    OPT_DOUBLE("distill-weight", "F", "weight w of the distillation loss (default 1)", exfm_ctx, s.w),
    OPT_DOUBLE("adapter-weight", "F", "weight of the adapter's target (default 1)", exfm_ctx, s.w_adapter),
    OPT_DOUBLE_POS("adapter-lr", "F", "student adapter learning rate (default 0.05)", exfm_ctx, s.adapter_lr),
    OPT_DOUBLE_POS("lr", "F", "learning rate of both optimizers, teacher and students (default 0.1)", exfm_ctx, s.lr),
    OPT_FN("dense-opt", "NAME", "sgd | adagrad | adam | adamw (default sgd)", x_set_optim, offsetof(stream_ctx, dense_kind)),
    OPT_FN("sparse-opt", "NAME", "sgd | adagrad | rowwise_adagrad (default sgd)", x_set_optim,
           offsetof(stream_ctx, sparse_kind)),
    OPT_INT("dim", "D", "students' embedding dimension (default 8)", exfm_ctx, s.sc.model.dim, 1, 4096),
    OPT_INT("rows-cap", "N", "students' rows per table (default 50000)", exfm_ctx, s.rows_cap, 1, 1LL << 40),
    OPT_STR("bot", "SIZES", "students' bottom MLP hidden sizes (default 32; 13-32-D)", exfm_ctx, bot),
    OPT_STR("top", "SIZES", "students' top MLP after the interaction (default 32-1)", exfm_ctx, top),
    OPT_INT("teacher-dim", "D", "teacher's embedding dimension (default 16)", exfm_ctx, tdim, 1, 4096),
    OPT_INT("teacher-rows-cap", "N", "teacher's rows per table (default 200000)", exfm_ctx, trows_cap, 1, 1LL << 40),
    OPT_INT("teacher-vertical-feature", "N", "give the teacher the vertical as a feature: one more table of N rows "
            "(default 0: the teacher does not see it)", exfm_ctx, tvrows, 0, 1 << 20),
    OPT_STR("teacher-bot", "SIZES", "teacher's bottom MLP hidden sizes (default 128-64)", exfm_ctx, tbot),
    OPT_STR("teacher-top", "SIZES", "teacher's top MLP after the interaction (default 128-64-1)", exfm_ctx, ttop),
    OPT_UINT("seed", "N", "initialisation seed (default 1)", exfm_ctx, s.sc.model.seed, 0, 1LL << 62),
    OPT_INT("threads", "N", "worker threads (default 2)", exfm_ctx, s.threads, 1, 256),
    OPT_FLAG("quiet", "no per-window lines on stderr", exfm_ctx, s.quiet),
};

/* A model: Kaggle tables capped at rows_cap (and, vrows > 0, a last table of vrows rows
 * for the vertical), 13-<bot>-D, <inter>-<top>. */
static int exfm_model(em_dlrm_cfg *m, int dim, int64_t rows_cap, int64_t vrows, const char *bot, const char *top,
                      em_optim_cfg dopt, em_optim_cfg sopt, uint64_t seed) {
    *m = em_dlrm_kaggle(rows_cap);
    if (vrows > 0) m->rows[m->num_tables++] = vrows;
    m->dim = dim;
    int h[EM_DLRM_MAX_LAYERS + 1], nh = em_parse_layers(bot, h, EM_DLRM_MAX_LAYERS - 1);
    int t[EM_DLRM_MAX_LAYERS + 1], nt = em_parse_layers(top, t, EM_DLRM_MAX_LAYERS);
    if (nh < 1 || nt < 1 || t[nt - 1] != 1) {
        fprintf(stderr, "ember exfm: bad MLP sizes '%s' / '%s' (hidden sizes; the top ends in 1)\n", bot, top);
        return -1;
    }
    m->n_bot = nh + 2;
    m->bot[0] = m->num_dense;
    for (int i = 0; i < nh; i++) m->bot[i + 1] = h[i];
    m->bot[nh + 1] = dim;
    m->n_top = nt + 1;
    m->top[0] = em_dot_interact_out_dim(m->num_tables, dim);
    for (int i = 0; i < nt; i++) m->top[i + 1] = t[i];
    m->dense_opt = dopt, m->sparse_opt = sopt, m->seed = seed;
    em_status st = em_dlrm_cfg_validate(m);
    if (st) {
        cli_fail("exfm", st);
        return -1;
    }
    return 0;
}

static const char *jnum(char *buf, double x) {
    if (isfinite(x)) snprintf(buf, 32, "%.6f", x);
    else snprintf(buf, 32, "null");
    return buf;
}

static void print_run(const char *key, const char *dir, const em_stream_result *r, int last) {
    ne_acc all, half;
    acc_file(dir, &all, &half);
    char b[4][32];
    printf("\"%s\":{\"examples\":%.0f,\"ne\":%s,\"ne_second_half\":%s,\"auc\":%s,\"auc_second_half\":%s,"
           "\"train_s\":%.3f,\"eval_s\":%.3f,\"read_s\":%.3f,\"join_s\":%.3f,\"log_s\":%.3f}%s",
           key, all.n, jnum(b[0], ne_of(&all)), jnum(b[1], ne_of(&half)),
           jnum(b[2], all.auc_n > 0 ? all.auc_sum / all.auc_n : NAN), jnum(b[3], half.auc_n > 0 ? half.auc_sum / half.auc_n : NAN),
           r->train_s, r->eval_s, r->read_s, r->join_s, r->log_s, last ? "" : ",");
    fflush(stdout);
}

int cmd_exfm(int argc, char **argv) {
    exfm_ctx x;
    memset(&x, 0, sizeof x);
    stream_ctx *c = &x.s;
    c->sc = em_stream_default();
    c->out = "runs/exfm";
    c->threads = 2;
    c->lr = c->dense_lr = c->sparse_lr = NAN;
    c->alpha = c->beta = c->w = c->w_adapter = c->head_lr = c->adapter_lr = NAN;
    c->dense_kind = c->sparse_kind = EM_OPT_SGD;
    c->rows_cap = 50000;
    c->sc.model.dim = 8;
    x.students = 3;
    c->sc.ckpt_every = 10;
    x.modes = "none,serving,aux,aux+adapter";
    x.bot = "32", x.top = "32-1", x.tbot = "128-64", x.ttop = "128-64-1";
    x.tdim = 16, x.trows_cap = 200000;
    x.tlr = x.tdlr = x.tslr = NAN;
    x.tdense = x.tsparse = (em_optim_kind)-1;
    char *pos[1];
    int npos;
    int rc = cli_parse("exfm", "--data PATH [options]", xopts, CLI_NOPTS(xopts), &x, argc, argv, pos, &npos, 0);
    if (rc) return rc < 0 ? 2 : 0;
    if (!c->sc.source) {
        fprintf(stderr, "ember exfm: --data is required (a stream with .side sidecars, e.g. from ember gen --drift)\n");
        return 2;
    }
    em_distill_mode modes[16];
    int nmodes = 0;
    {
        char buf[256];
        snprintf(buf, sizeof buf, "%s", x.modes);
        for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
            if (nmodes == 16 || em_distill_parse(tok, &modes[nmodes]) != EM_OK) {
                fprintf(stderr, "ember exfm: --modes: expected a list of none, serving, aux, aux+adapter; got '%s'\n", x.modes);
                return 2;
            }
            nmodes++;
        }
    }
    double lr = !isnan(c->lr) ? c->lr : 0.1;
    em_optim_cfg dopt = em_optim_default(c->dense_kind, (float)lr), sopt = em_optim_default(c->sparse_kind, (float)lr);
    em_dlrm_cfg tm, sm;
    uint64_t seed = c->sc.model.seed;
    double tlr = !isnan(x.tlr) ? x.tlr : lr;
    double tdlr = !isnan(x.tdlr) ? x.tdlr : tlr, tslr = !isnan(x.tslr) ? x.tslr : tlr;
    em_optim_cfg tdopt = em_optim_default((int)x.tdense >= 0 ? x.tdense : c->dense_kind, (float)tdlr),
                 tsopt = em_optim_default((int)x.tsparse >= 0 ? x.tsparse : c->sparse_kind, (float)tslr);
    if (exfm_model(&tm, x.tdim, x.trows_cap, x.tvrows, x.tbot, x.ttop, tdopt, tsopt, seed) ||
        exfm_model(&sm, c->sc.model.dim, c->rows_cap, 0, x.bot, x.top, dopt, sopt, seed))
        return 2;
    em_student_cfg stc = em_student_default();
    if (!isnan(c->alpha)) stc.alpha = (float)c->alpha;
    if (!isnan(c->beta)) stc.beta = (float)c->beta;
    if (!isnan(c->w)) stc.w = (float)c->w;
    if (!isnan(c->w_adapter)) stc.w_adapter = (float)c->w_adapter;
    if (!isnan(c->adapter_lr)) stc.adapter_lr = (float)c->adapter_lr;
    em_status st = em_student_cfg_validate(&stc);
    if (st) {
        cli_fail("exfm", st);
        return 2;
    }
    em_pool *pool = NULL;
    if ((st = em_pool_create(&pool, c->threads))) {
        cli_fail("exfm", st);
        return 1;
    }
    char dir[1200], das[1200];
    snprintf(das, sizeof das, "%s/teacher.das", c->out);
    /* the teacher */
    em_stream_cfg tc = c->sc;
    tc.model = tm;
    tc.vertical_feature = x.tvrows > 0;
    snprintf(dir, sizeof dir, "%s/teacher", c->out);
    tc.out_dir = dir;
    tc.log_predictions = das;
    tc.resume = 1; /* a fresh directory starts fresh; a killed pipeline continues */
    exfm_who tw = {c, "teacher"};
    em_stream_result tr;
    memset(&tr, 0, sizeof tr);
    printf("{");
    if (!x.skip_teacher) {
        tc.on_window = exfm_window, tc.ud = &tw;
        if ((st = em_stream_run(&tc, pool, &tr, NULL))) {
            printf("}\n");
            cli_fail("exfm teacher", st);
            em_pool_free(pool);
            return 1;
        }
    }
    print_run("teacher", dir, &tr, 0);
    printf("\"students\":[");
    for (int v = 0; v < x.students; v++) {
        printf("%s{\"vertical\":%d,", v ? "," : "", v);
        for (int k = 0; k < nmodes; k++) {
            em_stream_cfg sc = c->sc;
            sc.model = sm;
            sc.vertical = v;
            sc.start_pos = x.student_from;
            sc.teacher_log = das;
            sc.student = stc;
            sc.student.mode = modes[k];
            snprintf(dir, sizeof dir, "%s/v%d-%s", c->out, v, em_distill_name(modes[k]));
            sc.out_dir = dir;
            sc.resume = 1;
            char who[64];
            snprintf(who, sizeof who, "v%d %s", v, em_distill_name(modes[k]));
            exfm_who sw = {c, who};
            sc.on_window = exfm_window, sc.ud = &sw;
            em_stream_result r;
            if ((st = em_stream_run(&sc, pool, &r, NULL))) {
                printf("]}\n");
                cli_fail(who, st);
                em_pool_free(pool);
                return 1;
            }
            print_run(em_distill_name(modes[k]), dir, &r, k == nmodes - 1);
        }
        printf("}");
    }
    printf("]}\n");
    em_pool_free(pool);
    return 0;
}
