/*
 * cmd_train.c - `ember train`: configure a DLRM and a run from flags and/or a JSON
 * file, draw a progress bar on stderr, print held-out metrics beside the planted
 * optimum (when the data came from `ember gen`), and write report.json.
 *
 * With no --train, ember trains on its embedded default: the synthetic Criteo-like
 * dataset generated deterministically into <out>/data (once; reused afterwards).
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/cli.h"
#include "ember/dist.h"

/* cmd_train_dist.c: the rest of `ember train` under mpirun. */

typedef struct {
    em_train_cfg tc;
    int threads;
    const char *out;
    const char *test_prob;
    double lr, dense_lr, sparse_lr; /* NAN = not given */
    em_optim_kind dense_kind, sparse_kind;
    int64_t rows_cap;
    int rows_given, bot_given, top_given;
    int quiet;
    int64_t gen_rows, gen_test_rows;
    /* sequence tower (seqtower.h); seq = -1: not given */
    int seq, seq_max, seq_heads, seq_window, seq_age_buckets, seq_types, seq_share, seq_cand;
    int64_t seq_rows;
    const char *seq_blocks, *seq_act, *seq_groups;
    int hsp[3], hsp_given;
    double seq_flops, seq_events; /* forward FLOPs and events per example, for the report */
    cli_tables_opts tab;          /* --tables, --dyn-*, --fiited-* (cli_tables.c) */
    cli_dist_args dist; /* under mpirun (cmd_train_dist.c) */
    char out_buf[1024], train_buf[1200], test_buf[1200], prob_buf[1200];
    /* curves for report.html: (examples, value) points, thinned 2:1 when full */
    int n_loss, n_auc;
    double loss_x[512], loss_y[512], auc_x[512], auc_y[512];
} train_ctx;

static void add_point(double *xs, double *ys, int *n, double x, double y) {
    if (*n == 512) { /* keep every other point: the curve keeps its shape at half the density */
        for (int i = 0; i < 256; i++) xs[i] = xs[2 * i + 1], ys[i] = ys[2 * i + 1];
        *n = 256;
    }
    xs[*n] = x, ys[*n] = y, (*n)++;
}

/* Options with logic of their own; the rest are plain typed fields (table below). */
#define CTX ((train_ctx *)c)
static int set_bot(void *c, const cli_opt *o, const char *v) {
    return cli_layers("train", o->name, v, CTX->tc.model.bot, &CTX->tc.model.n_bot, &CTX->bot_given);
}
static int set_top(void *c, const cli_opt *o, const char *v) {
    return cli_layers("train", o->name, v, CTX->tc.model.top, &CTX->tc.model.n_top, &CTX->top_given);
}
static int set_rows(void *c, const cli_opt *o, const char *v) {
    em_dlrm_cfg *m = &CTX->tc.model;
    if (cli_int_list("train", o->name, "table sizes", v, m->rows, EM_DLRM_MAX_TABLES, &m->num_tables)) return -1;
    CTX->rows_given = 1;
    return 0;
}
static int set_pooling(void *c, const cli_opt *o, const char *v) {
    if (strcmp(v, "sum") == 0) CTX->tc.model.pooling = EM_POOL_SUM;
    else if (strcmp(v, "mean") == 0) CTX->tc.model.pooling = EM_POOL_MEAN;
    else {
        fprintf(stderr, "ember train: --%s: expected sum or mean, got '%s'\n", o->name, v);
        return -1;
    }
    return 0;
}

/* "C10" or "10": the 1-based categorical field. */
static int set_field(void *c, const cli_opt *o, const char *v) {
    const char *p = (v[0] == 'C' || v[0] == 'c') ? v + 1 : v;
    long long k;
    if (cli_int(o->name, p, 1, EM_DLRM_MAX_TABLES, &k)) return -1;
    memcpy((char *)c + o->off, &(int){(int)k}, sizeof(int));
    return 0;
}
static int set_hsp(void *c, const cli_opt *o, const char *v) {
    int64_t x[3];
    int n = 0;
    if (cli_int_list("train", o->name, "sizes (seeds,tokens,terms)", v, x, 3, &n)) return -1;
    if (n != 3 || x[0] > 1024 || x[1] > 1024 || x[2] > 64) {
        fprintf(stderr, "ember train: --%s: expected SEEDS,TOKENS,TERMS (<= 1024, 1024, 64), got '%s'\n", o->name, v);
        return -1;
    }
    for (int i = 0; i < 3; i++) CTX->hsp[i] = (int)x[i];
    CTX->hsp_given = 1;
    return 0;
}

#define BIG (1LL << 60)
static const cli_opt opts[] = {
    OPT_CONFIG("JSON object of these options (keys with - or _); later flags override it"),
    OPT_STR("train", "PATH", "training data: Criteo TSV or ember binary (default: generate the embedded dataset)", train_ctx,
            tc.train_path),
    OPT_STR("test", "PATH", "held-out data evaluated periodically and at the end", train_ctx, tc.test_path),
    OPT_STR("test-prob", "PATH", "true probabilities of the test lines (from ember gen): report the optimum", train_ctx,
            test_prob),
    OPT_STR("out", "DIR", "run directory for checkpoint, metrics.jsonl, report.json (default runs/default)", train_ctx, out),
    OPT_STR("resume", "CKPT", "continue a run from its checkpoint (same data, same thread count: bitwise the same)",
            train_ctx, tc.resume),
    OPT_INT("batch", "N", "examples per step (default 128; under mpirun: per rank)", train_ctx, tc.batch, 1, 1 << 20),
    OPT_STR("sharding", "KIND", "under mpirun: auto (the planner's placement) | table | row | column | data (default auto)", train_ctx,
            dist.sharding),
    OPT_STR("comm-prec", "P", "under mpirun: fp32 | fp16 | bf16 pooled embeddings and their gradients (default fp32)",
            train_ctx, dist.comm_prec),
    OPT_INT("group", "G", "under mpirun: 2D sparse parallelism, replica groups of G ranks (default: one group of all)",
            train_ctx, dist.group, 1, 1 << 20),
    OPT_INT("sync-every", "K", "under mpirun with --group: average the table replicas every K steps (default 1)", train_ctx,
            dist.sync_every, 1, 1 << 30),
    OPT_INT("bucket-kb", "N", "under mpirun: the dense all-reduce in buckets of whole layers of about N KiB, each started "
            "as soon as the backward has its gradients (default 512); 0: one bucket after the whole backward",
            train_ctx, dist.bucket_kb, 0, 1 << 20),
    OPT_INT("epochs", "N", "passes over the training data (default 1)", train_ctx, tc.epochs, 1, 1000),
    OPT_DOUBLE_POS("lr", "F", "learning rate of both optimizers (default 0.1)", train_ctx, lr),
    OPT_DOUBLE_POS("dense-lr", "F", "learning rate of the dense optimizer", train_ctx, dense_lr),
    OPT_DOUBLE_POS("sparse-lr", "F", "learning rate of the embedding optimizer", train_ctx, sparse_lr),
    OPT_FN("dense-opt", "NAME", "sgd | adagrad | adam | adamw (default sgd)", cli_set_optim, offsetof(train_ctx, dense_kind)),
    OPT_FN("sparse-opt", "NAME", "sgd | adagrad | rowwise_adagrad (default sgd)", cli_set_optim,
           offsetof(train_ctx, sparse_kind)),
    OPT_INT("dim", "D", "embedding dimension (default 16)", train_ctx, tc.model.dim, 1, 4096),
    OPT_FN("bot", "SIZES", "bottom MLP, e.g. 13-512-256-64-16 (ends at D)", set_bot, 0),
    OPT_FN("top", "SIZES", "top MLP, e.g. 367-512-256-1 (starts at D + T(T+1)/2)", set_top, 0),
    OPT_FN("rows", "LIST", "rows of each table, comma-separated (default: Criteo Kaggle cardinalities)", set_rows, 0),
    OPT_INT("rows-cap", "N", "cap every table at N rows (ids are reduced modulo the rows)", train_ctx, rows_cap, 0,
            1LL << 40),
    OPT_INT("num-dense", "N", "dense features per example (default 13)", train_ctx, tc.model.num_dense, 1, 4096),
    OPT_FN("pooling", "sum|mean", "embedding bag pooling (default sum)", set_pooling, 0),
    OPT_INT("threads", "N", "worker threads (default 2)", train_ctx, threads, 1, 256),
    OPT_UINT("seed", "N", "initialisation seed (default 1)", train_ctx, tc.model.seed, 0, 1LL << 62),
    OPT_INT("prefetch", "N", "batches parsed ahead by the reader thread (default 4)", train_ctx, tc.prefetch, 0, 64),
    OPT_FLAG("strict", "stop at the first malformed input line instead of counting and skipping it", train_ctx, tc.strict),
    OPT_INT("max-steps", "N", "stop after N steps in total", train_ctx, tc.max_steps, 0, BIG),
    OPT_INT("eval-every", "N", "evaluate on --test every N steps (default: at the end; 2000 for the default dataset)", train_ctx, tc.eval_every, 0, BIG),
    OPT_INT("ckpt-every", "N", "write the checkpoint every N steps (default: at the end)", train_ctx, tc.ckpt_every, 0,
            BIG),
    OPT_UINT("train-limit", "N", "use only the first N lines of the training data", train_ctx, tc.train_limit, 0, BIG),
    OPT_UINT("test-limit", "N", "use only the first N lines of the test data", train_ctx, tc.test_limit, 0, BIG),
    OPT_INT("gen-rows", "N", "default dataset: training rows (default 1000000)", train_ctx, gen_rows, 1, 1LL << 40),
    OPT_INT("gen-test-rows", "N", "default dataset: test rows (default 100000)", train_ctx, gen_test_rows, 1, 1LL << 40),
    OPT_FLAG("quiet", "no progress bar", train_ctx, quiet),
    CLI_TABLES_OPTS(train_ctx, tab),
    OPT_INT("seq", "N", "sequence features: 1 = read a history column after the categoricals and add the sequence "
            "tower (default 0; on when --seq-share or --seq-cand is given)", train_ctx, seq, 0, 1),
    OPT_FN("seq-share", "CK", "the history's items are ids of categorical C<K> (e.g. C10) and share its table; its "
           "pooled embedding queries the history", set_field, offsetof(train_ctx, seq_share)),
    OPT_FN("seq-cand", "CK", "like --seq-share, but the history gets its own item table (--seq-rows)", set_field,
           offsetof(train_ctx, seq_cand)),
    OPT_INT("seq-rows", "N", "rows of the history's own item table (default: the candidate table's)", train_ctx, seq_rows,
            1, 1LL << 32),
    OPT_INT("seq-max", "L", "keep the most recent L events of each history (default 64)", train_ctx, seq_max, 1,
            EM_SEQ_MAX_LEN),
    OPT_STR("seq-blocks", "LIST", "blocks over the history, in order: jattn[:causal], gdpa[:ACT][:causal], "
            "swa[:W][:causal], hsp; or compskip:N (Kunlun CompSkip, N layers: even gdpa+hsp, odd swa) or full:N "
            "(N x gdpa+hsp) or none (default compskip:2)", train_ctx, seq_blocks),
    OPT_INT("seq-heads", "H", "attention heads, dividing D (default 2)", train_ctx, seq_heads, 1, 4096),
    OPT_INT("seq-window", "W", "sliding-window half width of swa blocks (default 8)", train_ctx, seq_window, 0, 1 << 20),
    OPT_STR("seq-act", "NAME", "GDPA activation: identity relu relu2 silu gelu tanh (default silu)", train_ctx, seq_act),
    OPT_FN("seq-hsp", "M,M2,K", "hierarchical seed pooling: seeds, output tokens (each one more vector in the "
           "interaction), Kronecker terms (default 4,2,2)", set_hsp, 0),
    OPT_INT("seq-age-buckets", "N", "log2 age buckets of the history events (default 32)", train_ctx, seq_age_buckets, 1, 64),
    OPT_INT("seq-types", "N", "event types embedded; larger types share the last row (default 4)", train_ctx, seq_types, 1,
            EM_SEQ_MAX_TYPE + 1),
    OPT_STR("seq-events", "SPEC", "event-level personalization (Kunlun): per group of event types its own sub-tower, "
            "groups separated by ';', each TYPES[:wW][:hH][:BLOCKS]: types (0,2 or 1-3; < --seq-types), width W "
            "(default D), H heads (default --seq-heads), blocks as --seq-blocks (default --seq-blocks); types in no "
            "group are dropped. E.g. \"2:w32:h4:full:2;1:w16:h2:gdpa,hsp;0:w8:h1:swa:4\"", train_ctx, seq_groups),
};

/* The sequence tower's configuration from the --seq-* options (num_seq stays 0 when
 * none is on); needs the tables' rows. */
static int seq_config(train_ctx *c, em_dlrm_cfg *m) {
    int on = c->seq > 0 || (c->seq < 0 && (c->seq_share || c->seq_cand));
    if (!on) {
        if (c->seq_share || c->seq_cand || c->seq_blocks)
            fprintf(stderr, "ember train: --seq 0: the --seq-* options are ignored\n");
        return 0;
    }
    if (c->seq_share && c->seq_cand) {
        fprintf(stderr, "ember train: give --seq-share or --seq-cand, not both\n");
        return -1;
    }
    int field = c->seq_share ? c->seq_share : c->seq_cand;
    if (!field) {
        fprintf(stderr, "ember train: --seq needs the candidate field: --seq-share CK (shared item table) or --seq-cand CK\n");
        return -1;
    }
    if (field > m->num_tables) {
        fprintf(stderr, "ember train: candidate field C%d, but there are %d categoricals\n", field, m->num_tables);
        return -1;
    }
    em_seq_cfg q = em_seq_default();
    q.max_len = c->seq_max ? c->seq_max : 64;
    q.cand = field - 1;
    q.share = c->seq_share != 0;
    q.rows = q.share || !c->seq_rows ? m->rows[q.cand] : c->seq_rows;
    if (q.share && c->seq_rows && c->seq_rows != q.rows)
        fprintf(stderr, "ember train: --seq-rows is ignored: the shared table C%d has %lld rows\n", field, (long long)q.rows);
    if (c->seq_heads) q.heads = c->seq_heads;
    if (c->seq_age_buckets) q.age_buckets = c->seq_age_buckets;
    if (c->seq_types) q.num_types = c->seq_types;
    if (c->hsp_given) q.hsp_m = c->hsp[0], q.hsp_m2 = c->hsp[1], q.hsp_k = c->hsp[2];
    em_gdpa_act act = EM_GDPA_SILU;
    if (c->seq_act && em_gdpa_act_parse(c->seq_act, &act)) {
        fprintf(stderr, "ember train: --seq-act: %s\n", em_last_error());
        return -1;
    }
    if (em_seq_parse_blocks(&q, c->seq_blocks ? c->seq_blocks : "compskip:2", act, c->seq_window >= 0 ? c->seq_window : 8)) {
        fprintf(stderr, "ember train: --seq-blocks: %s\n", em_last_error());
        return -1;
    }
    if (c->seq_groups && (em_seq_parse_events(&q, c->seq_groups, act, c->seq_window >= 0 ? c->seq_window : 8) ||
                          em_seq_cfg_validate(&q, m->dim, m->num_tables))) {
        fprintf(stderr, "ember train: --seq-events: %s\n", em_last_error());
        return -1;
    }
    m->seq = q;
    return 0;
}

static void fmt_count(char *buf, size_t cap, double x) {
    if (x >= 1e6) snprintf(buf, cap, "%.2fM", x / 1e6);
    else if (x >= 1e3) snprintf(buf, cap, "%.1fk", x / 1e3);
    else snprintf(buf, cap, "%.0f", x);
}

static void on_event(void *ud, const em_train_event *ev) {
    train_ctx *c = ud;
    int tty = isatty(2);
    char ex[32], rate[32];
    fmt_count(ex, sizeof ex, (double)ev->examples);
    fmt_count(rate, sizeof rate, ev->examples_per_s);
    switch (ev->kind) {
    case EM_EV_PROGRESS: {
        add_point(c->loss_x, c->loss_y, &c->n_loss, (double)ev->examples, ev->train_loss);
        if (c->quiet) return;
        static double last_line;
        if (!tty && ev->elapsed_s - last_line < 10) return; /* logs: a line every 10 s */
        last_line = ev->elapsed_s;
        char bar[32] = "", eta[32] = "?";
        if (ev->fraction >= 0) {
            int w = 24, k = (int)(ev->fraction * w + 0.5);
            for (int i = 0; i < w; i++) bar[i] = i < k ? '=' : ' ';
            bar[w] = 0;
            if (ev->fraction > 0) {
                double rest = ev->elapsed_s * (1 - ev->fraction) / ev->fraction;
                snprintf(eta, sizeof eta, "%d:%02d", (int)rest / 60, (int)rest % 60);
            }
        }
        fprintf(stderr, "%s[%s] %3.0f%%  epoch %d  step %lld  %s ex  %s ex/s  loss %.4f  ETA %s%s", tty ? "\r" : "", bar,
                ev->fraction >= 0 ? 100 * ev->fraction : 0, ev->epoch + 1, (long long)ev->step, ex, rate, ev->train_loss,
                eta, tty ? "\033[K" : "\n");
        break;
    }
    case EM_EV_EVAL:
        add_point(c->auc_x, c->auc_y, &c->n_auc, (double)ev->examples, ev->metrics.auc);
        fprintf(stderr, "%sstep %lld: test AUC %.4f  NE %.4f  logloss %.4f\n", tty && !c->quiet ? "\r\033[K" : "",
                (long long)ev->step, ev->metrics.auc, ev->metrics.ne, ev->metrics.logloss);
        break;
    case EM_EV_CHECKPOINT:
        if (!c->quiet && tty) fprintf(stderr, "\r\033[K");
        break;
    case EM_EV_DONE:
        if (!c->quiet && tty) fprintf(stderr, "\r\033[K");
        break;
    }
}

static int file_exists(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0;
}

/* Generate the embedded default dataset into <out>/data once. */
static int ensure_default_data(train_ctx *c, em_pool *pool) {
    char dir[1050], stamp[1200], want[256];
    snprintf(dir, sizeof dir, "%s/data", c->out);
    snprintf(c->train_buf, sizeof c->train_buf, "%s/train.tsv", dir);
    snprintf(c->test_buf, sizeof c->test_buf, "%s/test.tsv", dir);
    snprintf(c->prob_buf, sizeof c->prob_buf, "%s/test.prob", dir);
    snprintf(stamp, sizeof stamp, "%s/GENERATED", dir);
    em_gen_cfg g = em_gen_default();
    g.train_rows = (uint64_t)c->gen_rows;
    g.test_rows = (uint64_t)c->gen_test_rows;
    snprintf(want, sizeof want, "ember gen --rows %llu --test-rows %llu --seed %llu\n", (unsigned long long)g.train_rows,
             (unsigned long long)g.test_rows, (unsigned long long)g.seed);
    FILE *f = fopen(stamp, "r");
    char have[256] = "";
    if (f) {
        if (!fgets(have, sizeof have, f)) have[0] = 0;
        fclose(f);
    }
    c->tc.train_path = c->train_buf, c->tc.test_path = c->test_buf, c->test_prob = c->prob_buf;
    if (strcmp(have, want) == 0 && file_exists(c->train_buf) && file_exists(c->test_buf) && file_exists(c->prob_buf))
        return 0;
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "%s", dir);
    for (char *p = cmd + 1; *p; p++)
        if (*p == '/') *p = 0, mkdir(cmd, 0755), *p = '/';
    if (mkdir(cmd, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "ember train: %s: %s\n", dir, strerror(errno));
        return -1;
    }
    fprintf(stderr, "generating the default dataset (%s train / %s test rows, planted ground truth) into %s ...\n",
            (fmt_count(cmd, 32, (double)g.train_rows), cmd), (fmt_count(cmd + 32, 32, (double)g.test_rows), cmd + 32), dir);
    double t0 = em_now();
    em_status st = em_gen_write(&g, c->train_buf, c->test_buf, c->prob_buf, pool);
    if (st) {
        cli_fail("gen", st);
        return -1;
    }
    fprintf(stderr, "  done in %.1f s\n", em_now() - t0);
    if ((f = fopen(stamp, "w"))) fputs(want, f), fclose(f);
    return 0;
}

static void print_metrics(FILE *f, const char *label, const em_metrics *m) {
    fprintf(f, "%-8s AUC %.4f  NE %.4f  logloss %.4f  calibration %.3f  accuracy %.4f  (n=%llu)\n", label, m->auc, m->ne,
            m->logloss, m->calibration, m->accuracy, (unsigned long long)m->n);
}

/* s as a JSON string literal (also safe inside HTML text when < and & are absent;
 * html_text() handles those). */
static void json_str(FILE *f, const char *s) {
    fputc('"', f);
    for (; s && *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') fprintf(f, "\\%c", ch);
        else if (ch < 0x20) fprintf(f, "\\u%04x", ch);
        else fputc(ch, f);
    }
    fputc('"', f);
}

static void html_text(FILE *f, const char *s) {
    for (; s && *s; s++) {
        if (*s == '<') fputs("&lt;", f);
        else if (*s == '>') fputs("&gt;", f);
        else if (*s == '&') fputs("&amp;", f);
        else fputc(*s, f);
    }
}

/* One line chart as inline SVG: points (xs, ys), optional horizontal reference line. */
static void svg_chart(FILE *f, const char *title, const double *xs, const double *ys, int n, double ref,
                      const char *ref_label) {
    const double W = 560, H = 240, L = 60, R = 28, T = 28, Bm = 36;
    double x0 = 0, x1 = 1, y0 = 1e300, y1 = -1e300;
    for (int i = 0; i < n; i++) {
        if (xs[i] > x1) x1 = xs[i];
        if (ys[i] < y0) y0 = ys[i];
        if (ys[i] > y1) y1 = ys[i];
    }
    if (!isnan(ref)) y0 = ref < y0 ? ref : y0, y1 = ref > y1 ? ref : y1;
    if (n == 0 || !(y1 > y0)) y0 -= 0.5, y1 += 0.5;
    double pad = (y1 - y0) * 0.08;
    y0 -= pad, y1 += pad;
#define SX(x) (L + ((x) - x0) / (x1 - x0) * (W - L - R))
#define SY(y) (T + (y1 - (y)) / (y1 - y0) * (H - T - Bm))
    fprintf(f, "<svg width='%.0f' height='%.0f' xmlns='http://www.w3.org/2000/svg' font-family='sans-serif' font-size='11'>\n", W, H);
    fprintf(f, "<text x='%.0f' y='16' font-size='13'>%s</text>\n", L, title);
    fprintf(f, "<rect x='%.0f' y='%.0f' width='%.0f' height='%.0f' fill='none' stroke='#999'/>\n", L, T, W - L - R, H - T - Bm);
    for (int k = 0; k <= 4; k++) {
        double y = y0 + (y1 - y0) * k / 4, x = x0 + (x1 - x0) * k / 4;
        fprintf(f, "<text x='%.0f' y='%.1f' text-anchor='end'>%.4g</text>\n", L - 4, SY(y) + 4, y);
        fprintf(f, "<text x='%.1f' y='%.0f' text-anchor='middle'>%.3g</text>\n", SX(x), H - Bm + 14, x);
    }
    fprintf(f, "<text x='%.0f' y='%.0f' text-anchor='middle'>examples</text>\n", (L + W - R) / 2, H - 4);
    if (!isnan(ref))
        fprintf(f, "<line x1='%.0f' x2='%.0f' y1='%.1f' y2='%.1f' stroke='#2a2' stroke-dasharray='4'/><text x='%.0f' y='%.1f' fill='#2a2'>%s</text>\n",
                L, W - R, SY(ref), SY(ref), L + 6, SY(ref) - 4, ref_label);
    fprintf(f, "<polyline fill='none' stroke='#c33' stroke-width='1.5' points='");
    for (int i = 0; i < n; i++) fprintf(f, "%.1f,%.1f ", SX(xs[i]), SY(ys[i]));
    fprintf(f, "'/>\n");
    for (int i = 0; i < n && n <= 40; i++) fprintf(f, "<circle cx='%.1f' cy='%.1f' r='2.5' fill='#c33'/>", SX(xs[i]), SY(ys[i]));
    fprintf(f, "</svg>\n");
#undef SX
#undef SY
}

/* report.html: self-contained (inline SVG, no scripts): results beside the optimum,
 * training loss and test AUC curves, the configuration. */
static void write_html(const train_ctx *c, const char *cfg_json, const em_train_result *r, const em_metrics *opt,
                       double rss_mb, double state_mb) {
    char path[1100];
    snprintf(path, sizeof path, "%s/report.html", c->out);
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "ember train: %s: %s\n", path, strerror(errno));
        return;
    }
    fprintf(f, "<!doctype html><html><head><meta charset='utf-8'><title>ember run report</title><style>"
               "body{font-family:sans-serif;margin:24px;max-width:1200px}td,th{padding:3px 10px;text-align:right}"
               "th:first-child,td:first-child{text-align:left}table{border-collapse:collapse}tr:nth-child(even){background:#f4f4f4}"
               "code{word-break:break-all}</style></head><body>\n<h2>ember training run</h2>\n<p>data: <code>");
    html_text(f, c->tc.train_path);
    fprintf(f, "</code>; %lld steps, %llu examples in %.1f s (%.0f examples/s); peak RSS %.0f MB, model state %.0f MB.</p>\n",
            (long long)r->steps, (unsigned long long)r->examples, r->train_s, r->examples_per_s, rss_mb, state_mb);
    fprintf(f, "<table><tr><th></th><th>AUC</th><th>NE</th><th>log loss</th><th>calibration</th><th>accuracy</th><th>n</th></tr>\n");
    const em_metrics *rows[2] = {r->test.n ? &r->test : NULL, opt};
    const char *names[2] = {"test", "planted optimum"};
    for (int i = 0; i < 2; i++)
        if (rows[i])
            fprintf(f, "<tr><td>%s</td><td>%.4f</td><td>%.4f</td><td>%.4f</td><td>%.3f</td><td>%.4f</td><td>%llu</td></tr>\n",
                    names[i], rows[i]->auc, rows[i]->ne, rows[i]->logloss, rows[i]->calibration, rows[i]->accuracy,
                    (unsigned long long)rows[i]->n);
    fprintf(f, "</table>\n<div>\n");
    svg_chart(f, "training loss (mean since the previous point)", c->loss_x, c->loss_y, c->n_loss, NAN, "");
    if (c->n_auc) svg_chart(f, "test AUC", c->auc_x, c->auc_y, c->n_auc, opt ? opt->auc : NAN, "planted optimum");
    fprintf(f, "</div>\n<h3>model</h3><p><code>");
    html_text(f, cfg_json);
    fprintf(f, "</code></p>\n<p>checkpoint: <code>");
    html_text(f, r->checkpoint);
    fprintf(f, "</code></p></body></html>\n");
    fclose(f);
}

static void write_report(const train_ctx *c, const em_dlrm_cfg *mc, const em_train_result *r, const em_metrics *opt,
                         int threads, double rss_mb, double state_mb) {
    char path[1100], buf[512];
    snprintf(path, sizeof path, "%s/report.json", c->out);
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "ember train: %s: %s\n", path, strerror(errno));
        return;
    }
    char *cfg = em_dlrm_cfg_to_json(mc);
    fprintf(f, "{\"model\":%s,\n \"data\":{\"train\":", cfg ? cfg : "null");
    json_str(f, c->tc.train_path);
    fprintf(f, ",\"test\":");
    json_str(f, c->tc.test_path ? c->tc.test_path : "");
    fprintf(f, "},\n");
    fprintf(f, " \"run\":{\"batch\":%d,\"epochs\":%d,\"threads\":%d,\"steps\":%lld,\"examples\":%llu,\"train_seconds\":%.3f,"
               "\"examples_per_s\":%.1f,\"malformed_lines\":%llu,\"peak_rss_mb\":%.1f,\"state_mb\":%.1f},\n",
            c->tc.batch, c->tc.epochs, threads, (long long)r->steps, (unsigned long long)r->examples, r->train_s,
            r->examples_per_s, (unsigned long long)r->reader.malformed, rss_mb, state_mb);
    if (mc->seq.num_seq)
        fprintf(f, " \"seq\":{\"forward_flops_per_example\":%.1f,\"events_per_example\":%.3f},\n", c->seq_flops, c->seq_events);
    em_metrics_json(&r->test, buf, sizeof buf);
    fprintf(f, " \"test\":%s,\n", r->test.n ? buf : "null");
    if (opt) em_metrics_json(opt, buf, sizeof buf);
    fprintf(f, " \"optimum\":%s,\n \"checkpoint\":", opt ? buf : "null");
    json_str(f, r->checkpoint);
    fprintf(f, "}\n");
    fclose(f);
    write_html(c, cfg ? cfg : "", r, opt, rss_mb, state_mb);
    em_free(cfg);
}

int cmd_train(int argc, char **argv) {
    train_ctx c;
    memset(&c, 0, sizeof c);
    c.tc = em_train_default();
    c.threads = 2;
    c.dist.bucket_kb = 512;
    c.lr = c.dense_lr = c.sparse_lr = NAN;
    c.dense_kind = c.sparse_kind = EM_OPT_SGD;
    c.gen_rows = 1000000, c.gen_test_rows = 100000;
    c.seq = -1, c.seq_window = -1;
    c.out = "runs/default";
    char *pos[1];
    int npos;
    int rc = cli_parse("train", "[options]", opts, CLI_NOPTS(opts), &c, argc, argv, pos, &npos, 0);
    if (rc) return rc < 0 ? 2 : 0;

    /* Assemble the model configuration: Kaggle defaults, then what was given. */
    em_dlrm_cfg *m = &c.tc.model;
    if (!c.rows_given) {
        em_dlrm_cfg k = em_dlrm_kaggle(0);
        m->num_tables = k.num_tables;
        memcpy(m->rows, k.rows, sizeof k.rows);
    }
    for (int t = 0; t < m->num_tables; t++)
        if (c.rows_cap > 0 && m->rows[t] > c.rows_cap) m->rows[t] = c.rows_cap;
    if (!c.bot_given) m->bot[0] = m->num_dense, m->bot[m->n_bot - 1] = m->dim;
    if (cli_tables_apply("train", &c.tab, m)) return 2;
    if (seq_config(&c, m)) return 2;
    if (!c.top_given) m->top[0] = em_dot_interact_out_dim(m->num_tables + em_seq_extra(&m->seq), m->dim);
    double dlr = !isnan(c.dense_lr) ? c.dense_lr : !isnan(c.lr) ? c.lr : 0.1;
    double slr = !isnan(c.sparse_lr) ? c.sparse_lr : !isnan(c.lr) ? c.lr : 0.1;
    m->dense_opt = em_optim_default(c.dense_kind, (float)dlr);
    m->sparse_opt = em_optim_default(c.sparse_kind, (float)slr);
    em_status st = em_dlrm_cfg_validate(m);
    if (st) {
        cli_fail("train", st);
        return 2;
    }
    snprintf(c.out_buf, sizeof c.out_buf, "%s", c.out);
    c.tc.out_dir = c.out_buf;

    if (em_dist_launched()) /* mpirun -np N ember train ... */
        return cli_train_dist(&c.tc, c.threads, &c.dist, c.test_prob, c.quiet);
    em_pool *pool = NULL;
    if ((st = em_pool_create(&pool, c.threads))) {
        cli_fail("train", st);
        return 1;
    }
    if (!c.tc.train_path && c.tc.eval_every == 0) c.tc.eval_every = 2000; /* the default job shows a learning curve */
    if (!c.tc.train_path && ensure_default_data(&c, pool) != 0) {
        em_pool_free(pool);
        return 1;
    }
    c.tc.on_event = on_event;
    c.tc.ud = &c;
    fprintf(stderr, "training %s: %d tables, D=%d, bottom %d layers, top %d layers, batch %d, %s/%s, %d threads\n",
            c.tc.train_path, m->num_tables, m->dim, m->n_bot - 1, m->n_top - 1, c.tc.batch,
            em_optim_name(m->dense_opt.kind), em_optim_name(m->sparse_opt.kind), c.threads);
    if (m->seq.num_seq) {
        char blocks[2048];
        int n = m->seq.n_groups ? snprintf(blocks, sizeof blocks, "event groups ")
                                : snprintf(blocks, sizeof blocks, "%d heads, blocks ", m->seq.heads);
        if (m->seq.n_groups) em_seq_format_events(&m->seq, blocks + n, sizeof blocks - (size_t)n);
        else em_seq_format_blocks(&m->seq, blocks + n, sizeof blocks - (size_t)n);
        fprintf(stderr, "sequence tower: history of C%d (%s item table, %lld rows), last %d events, %s, "
                "%d vectors into the interaction\n", m->seq.cand + 1, m->seq.share ? "shared" : "own", (long long)m->seq.rows,
                m->seq.max_len, blocks, em_seq_extra(&m->seq));
    }
    em_train_result res;
    em_dlrm *model = NULL;
    st = em_train_run(&c.tc, pool, &res, &model);
    if (st) {
        cli_fail("train", st);
        em_pool_free(pool);
        return 1;
    }
    if (res.reader.malformed)
        fprintf(stderr, "warning: %llu malformed training lines skipped; first: %s\n",
                (unsigned long long)res.reader.malformed, res.reader.first_error);
    printf("trained %lld steps, %llu examples in %.1f s (%.0f examples/s)\n", (long long)res.steps,
           (unsigned long long)res.examples, res.train_s, res.examples_per_s);
    em_metrics opt_m, *opt = NULL;
    if (c.tc.test_path) {
        print_metrics(stdout, "test", &res.test);
        if (c.test_prob) {
            /* The optimum: the planted probabilities scored on the same labels. */
            float *tp = NULL, *p = NULL, *y = NULL;
            size_t ntp = 0, n = 0;
            st = em_read_probs(c.test_prob, &tp, &ntp);
            if (st == EM_OK) st = em_evaluate(model, c.tc.test_path, 4096, c.tc.test_limit, pool, &opt_m, &p, &y, &n);
            if (st == EM_OK && ntp >= n && em_metrics_compute(tp, y, n, &opt_m) == EM_OK) {
                opt = &opt_m;
                print_metrics(stdout, "optimum", opt);
                printf("gap      AUC %+.4f  NE %+.4f  (model - planted optimum)\n", res.test.auc - opt->auc,
                       res.test.ne - opt->ne);
            } else if (st) {
                cli_fail("optimum", st);
            } else {
                fprintf(stderr, "ember train: %s has %zu lines but the test data %zu examples: optimum not shown\n",
                        c.test_prob, ntp, n);
            }
            em_free(tp), em_free(p), em_free(y);
        }
    }
    if (em_dlrm_seqtower(model)) {
        em_seq_stats ss;
        em_seqtower_stats(em_dlrm_seqtower(model), &ss);
        c.seq_flops = ss.examples > 0 ? ss.total_flops / ss.examples : 0;
        c.seq_events = ss.examples > 0 ? ss.events / ss.examples : 0;
        printf("sequence tower: %.3f MFLOP per example forward, %.1f history events per example\n", c.seq_flops / 1e6,
               c.seq_events);
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double rss_mb = (double)ru.ru_maxrss / 1024.0, state_mb = (double)em_dlrm_state_bytes(model) / 1048576.0;
    printf("memory: peak RSS %.0f MB, now %.0f MB; parameters + gradients + optimizer state %.0f MB\n", rss_mb,
           cli_rss_now_mb(), state_mb);
    cli_tables_report(stdout, model);
    write_report(&c, em_dlrm_config(model), &res, opt, c.threads, rss_mb, state_mb);
    printf("checkpoint: %s\nmetrics:    %s/metrics.jsonl\nreport:     %s/report.json, %s/report.html\n", res.checkpoint,
           c.out, c.out, c.out);
    em_dlrm_free(model);
    em_pool_free(pool);
    return 0;
}
