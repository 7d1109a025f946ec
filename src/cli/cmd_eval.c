/*
 * cmd_eval.c - `ember eval` (metrics of a checkpoint on labelled data) and
 * `ember predict` (a probability for every input line).
 *
 * predict keeps output lines aligned with input lines: a malformed line gets "nan"
 * (and is counted and reported), unless --strict makes it fatal. Lines may carry the
 * label (40 fields, like the training data) or not (39 fields, like Criteo's test.txt).
 *
 * eval --tables fp16|int8|int8c measures serving accuracy with quantized tables: it pools
 * from an em_qbag (ember/quant.h) and runs em_dlrm_forward_with, exactly the forward
 * `ember serve --tables` runs, and reports the tables' bytes next to fp32's.
 *
 * A sequence model (ember/seqtower.h) reads its history column(s) after the
 * categoricals in both verbs (eval through em_evaluate's reader; predict parses each
 * line with em_seq_parse_line and keeps the most recent seq.max_len events, as the
 * reader does). Its quantized evaluation needs the history's own item table: a history
 * that shares the candidate's table would lose its fp32 rows.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "ember/quant.h"

typedef struct {
    const char *model, *test, *input, *output, *tables;
    int threads, batch, strict;
    int64_t limit;
} eval_ctx;

/* eval and predict share a context; each table lists the options its verb takes. */
#define OPT_MODEL OPT_STR("model", "CKPT", "checkpoint written by ember train", eval_ctx, model)
#define OPT_BATCH OPT_INT("batch", "N", "examples per forward pass (default 4096)", eval_ctx, batch, 1, 1 << 20)
#define OPT_THREADS OPT_INT("threads", "N", "worker threads (default 2)", eval_ctx, threads, 1, 256)

static const cli_opt eval_opts[] = {
    OPT_MODEL,
    OPT_STR("test", "PATH", "labelled data (Criteo TSV or ember binary)", eval_ctx, test),
    OPT_INT("limit", "N", "use only the first N lines", eval_ctx, limit, 0, 1LL << 60),
    OPT_STR("tables", "fp32|fp16|int8|int8c", "embedding tables to evaluate with, as ember serve --tables (default fp32)",
            eval_ctx, tables),
    OPT_BATCH,
    OPT_THREADS,
};

static const cli_opt predict_opts[] = {
    OPT_MODEL,
    OPT_STR("input", "PATH", "Criteo TSV lines, with or without the label column, and a sequence model's history "
            "column after the categoricals ('-' = stdin)", eval_ctx, input),
    OPT_STR("output", "PATH", "where to write one probability per line (default stdout)", eval_ctx, output),
    OPT_FLAG("strict", "stop at the first malformed line (default: write nan for it and go on)", eval_ctx, strict),
    OPT_BATCH,
    OPT_THREADS,
};

static int open_model(eval_ctx *c, const char *verb, em_pool **pool, em_dlrm **m) {
    if (!c->model) {
        fprintf(stderr, "ember %s: --model CKPT is required\n", verb);
        return 2;
    }
    em_status st = em_pool_create(pool, c->threads);
    if (st == EM_OK && (st = em_dlrm_load(m, c->model, NULL, *pool)) != EM_OK) em_pool_free(*pool);
    if (st) {
        cli_fail(verb, st);
        return 1;
    }
    return 0;
}

/* em_evaluate with the model's tables quantized to qt (which frees the fp32 ones). */
static em_status eval_quant(em_dlrm *m, em_qtype qt, const eval_ctx *c, em_pool *pool, em_metrics *out,
                            size_t *bytes) {
    const em_dlrm_cfg *mc = em_dlrm_config(m);
    em_qbag *q = NULL;
    if (mc->seq.num_seq && mc->seq.share)
        return em_errorf(EM_ERR_UNSUPPORTED, "--tables %s: the history shares table C%d, whose fp32 rows quantization frees "
                         "(evaluate with fp32 tables)", em_qtype_name(qt), mc->seq.cand + 1);
    em_status st = em_qbag_create(&q, em_dlrm_embbag(m), qt, mc->pooling, pool);
    if (st) return st;
    *bytes = em_qbag_bytes(q);
    em_dlrm_release_tables(m);
    em_reader_cfg rc = {.path = c->test, .batch_size = c->batch, .num_dense = mc->num_dense,
                        .num_sparse = mc->num_tables, .table_rows = mc->rows, .prefetch = 2, .limit = (uint64_t)c->limit};
    em_model_reader_seq(mc, &rc);
    em_reader *r = NULL;
    size_t cap = 1 << 16, n = 0;
    float *p = em_malloc(cap * sizeof(float)), *y = em_malloc(cap * sizeof(float));
    float *pooled = em_malloc((size_t)c->batch * (size_t)mc->num_tables * (size_t)mc->dim * sizeof(float));
    if (!p || !y || !pooled) st = em_errorf(EM_ERR_NOMEM, "eval: out of memory");
    if (!st) st = em_reader_open(&r, &rc);
    const em_batch *b;
    while (st == EM_OK && (st = em_reader_next(r, &b)) == EM_OK) {
        if (n + (size_t)b->B > cap) {
            while (n + (size_t)b->B > cap) cap *= 2;
            float *p2 = em_realloc(p, cap * sizeof(float)), *y2 = p2 ? em_realloc(y, cap * sizeof(float)) : NULL;
            if (p2) p = p2;
            if (y2) y = y2;
            if (!p2 || !y2) {
                st = em_errorf(EM_ERR_NOMEM, "eval: out of memory");
                break;
            }
        }
        if ((st = em_qbag_forward(q, pooled, b->indices, b->offsets, b->per_id_w, b->B, pool)) ||
            (st = em_dlrm_forward_with(m, b, pooled, p + n, pool)))
            break;
        for (int i = 0; i < b->B; i++) { /* the sigmoid em_evaluate applies */
            float z = p[n + (size_t)i];
            p[n + (size_t)i] = z >= 0 ? 1.f / (1.f + expf(-z)) : expf(z) / (1.f + expf(z));
        }
        memcpy(y + n, b->label, (size_t)b->B * sizeof(float));
        n += (size_t)b->B;
    }
    if (st == EM_ERR_EOF) st = EM_OK;
    em_reader_free(r);
    if (st == EM_OK) st = em_metrics_compute(p, y, n, out);
    em_free(p), em_free(y), em_free(pooled);
    em_qbag_free(q);
    return st;
}

int cmd_eval(int argc, char **argv) {
    eval_ctx c = {.threads = 2, .batch = 4096};
    char *pos[1];
    int npos;
    int rc = cli_parse("eval", "--model CKPT --test PATH", eval_opts, CLI_NOPTS(eval_opts), &c,
                       argc, argv, pos, &npos, 0);
    if (rc) return rc < 0 ? 2 : 0;
    if (!c.test) {
        fprintf(stderr, "ember eval: --test PATH is required\n");
        return 2;
    }
    em_qtype qt = EM_QT_FP32;
    if (c.tables && em_qtype_parse(c.tables, &qt)) {
        fprintf(stderr, "ember eval: --tables must be fp32, fp16, int8 or int8c (got '%s')\n", c.tables);
        return 2;
    }
    em_pool *pool;
    em_dlrm *m;
    if ((rc = open_model(&c, "eval", &pool, &m))) return rc;
    em_metrics mt;
    em_status st;
    size_t fp32_bytes = 0, q_bytes = 0;
    em_dlrm_table_stats ts;
    if (em_dlrm_table_stats_get(m, -1, &ts) == EM_OK) fp32_bytes = ts.bytes - ts.state_bytes;
    if (qt != EM_QT_FP32 && em_dlrm_config(m)->tables.kind != EM_TABLES_DENSE) {
        fprintf(stderr, "ember eval: --tables %s: quantization needs dense tables, %s has %s tables\n", c.tables, c.model,
                em_table_kind_name(em_dlrm_config(m)->tables.kind));
        em_dlrm_free(m);
        em_pool_free(pool);
        return 2;
    }
    if (qt == EM_QT_FP32) st = em_evaluate(m, c.test, c.batch, (uint64_t)c.limit, pool, &mt, NULL, NULL, NULL);
    else st = eval_quant(m, qt, &c, pool, &mt, &q_bytes);
    if (st == EM_OK) {
        char buf[512];
        int n = em_metrics_json(&mt, buf, sizeof buf);
        if (n > 0 && (size_t)n < sizeof buf && buf[n - 1] == '}')
            snprintf(buf + n - 1, sizeof buf - (size_t)n + 1, ", \"tables\": \"%s\", \"table_bytes\": %zu, "
                     "\"fp32_table_bytes\": %zu}", em_qtype_name(qt), qt == EM_QT_FP32 ? fp32_bytes : q_bytes, fp32_bytes);
        printf("%s\n", buf);
    } else {
        cli_fail("eval", st);
    }
    em_dlrm_free(m);
    em_pool_free(pool);
    return st ? 1 : 0;
}

/* A batch assembled by hand from parsed lines (predict needs per-line control). */
typedef struct {
    em_batch b;
    int cap, T, ND;
    const int64_t *rows;
    int64_t nidx;
    uint64_t *ids, *miss;
    /* the history of a sequence model: line i's events in slots [i*smax, i*smax + slen[i]) */
    int nseq, smax;
    int64_t srows;
    uint64_t *sitem;
    int64_t *sage, *soff;
    int32_t *stype;
    int *slen;
    em_batch_seq seq;
} pbatch;

static int pb_init(pbatch *p, int cap, const em_dlrm_cfg *mc) {
    const int T = mc->num_tables, ND = mc->num_dense;
    memset(p, 0, sizeof *p);
    p->cap = cap, p->T = T, p->ND = ND, p->rows = mc->rows;
    p->b.num_dense = ND, p->b.num_sparse = T;
    p->b.label = em_malloc((size_t)cap * sizeof(float));
    p->b.dense = em_malloc((size_t)cap * (size_t)ND * sizeof(float));
    p->b.indices = em_malloc((size_t)cap * (size_t)T * sizeof(int64_t));
    p->b.offsets = em_malloc(((size_t)cap * (size_t)T + 1) * sizeof(int64_t));
    p->ids = em_malloc((size_t)cap * (size_t)T * sizeof(uint64_t));
    p->miss = em_malloc((size_t)cap * sizeof(uint64_t));
    if (!p->b.label || !p->b.dense || !p->b.indices || !p->b.offsets || !p->ids || !p->miss) return -1;
    if (!mc->seq.num_seq) return 0;
    p->nseq = 1, p->smax = mc->seq.max_len, p->srows = mc->seq.rows;
    size_t ev = (size_t)cap * (size_t)p->smax;
    p->sitem = em_malloc(ev * sizeof(uint64_t));
    p->sage = em_malloc(ev * sizeof(int64_t));
    p->stype = em_malloc(ev * sizeof(int32_t));
    p->soff = em_malloc(((size_t)cap + 1) * sizeof(int64_t));
    p->slen = em_malloc((size_t)cap * sizeof(int));
    p->b.num_seq = 1, p->b.seq = &p->seq;
    return p->sitem && p->sage && p->stype && p->soff && p->slen ? 0 : -1;
}

static void pb_free(pbatch *p) {
    em_free(p->b.label), em_free(p->b.dense), em_free(p->b.indices), em_free(p->b.offsets), em_free(p->ids),
        em_free(p->miss);
    em_free(p->sitem), em_free(p->sage), em_free(p->stype), em_free(p->soff), em_free(p->slen);
}

/* Lay the parsed ids out table-major with modulo, as the reader does. */
static void pb_finish(pbatch *p) {
    int B = p->b.B;
    int64_t k = 0;
    p->b.offsets[0] = 0;
    for (int t = 0; t < p->T; t++)
        for (int i = 0; i < B; i++) {
            if (p->miss[i] >> t & 1) { /* missing: an empty bag */
            } else if (p->rows[t] == EM_ROWS_RAW) { /* dynamic tables take the raw id */
                p->b.indices[k++] = (int64_t)p->ids[(size_t)i * (size_t)p->T + (size_t)t];
            } else {
                p->b.indices[k++] = (int64_t)(p->ids[(size_t)i * (size_t)p->T + (size_t)t] % (uint64_t)p->rows[t]);
            }
            p->b.offsets[(size_t)t * (size_t)B + (size_t)i + 1] = k;
        }
    if (!p->nseq) return;
    /* pack the histories jagged (moving events down: slot i*smax >= soff[i]); items
     * reduced modulo the item table's rows in place */
    int64_t *items = (int64_t *)p->sitem;
    p->soff[0] = 0;
    for (int i = 0; i < B; i++) {
        size_t src = (size_t)i * (size_t)p->smax, dst = (size_t)p->soff[i], n = (size_t)p->slen[i];
        for (size_t j = 0; j < n; j++) {
            items[dst + j] = (int64_t)(p->sitem[src + j] % (uint64_t)p->srows);
            p->sage[dst + j] = p->sage[src + j];
            p->stype[dst + j] = p->stype[src + j];
        }
        p->soff[i + 1] = (int64_t)(dst + n);
    }
    p->seq = (em_batch_seq){items, p->sage, p->stype, p->soff};
}

static int flush(pbatch *p, em_dlrm *m, em_pool *pool, FILE *out, const char *status, float *logits) {
    if (p->b.B) {
        pb_finish(p);
        em_status st = em_dlrm_forward(m, &p->b, logits, pool);
        if (st) {
            cli_fail("predict", st);
            return -1;
        }
    }
    /* status: one char per line since the last flush: 'o' = example, 'x' = malformed */
    int j = 0;
    for (const char *s = status; *s; s++) {
        if (*s == 'x') {
            fputs("nan\n", out);
            continue;
        }
        float z = logits[j++];
        fprintf(out, "%.6f\n", z >= 0 ? 1.0 / (1.0 + exp(-z)) : exp(z) / (1.0 + exp(z)));
    }
    p->b.B = 0;
    return 0;
}

int cmd_predict(int argc, char **argv) {
    eval_ctx c = {.threads = 2, .batch = 4096};
    char *pos[1];
    int npos;
    int rc = cli_parse("predict", "--model CKPT --input PATH [--output PATH]", predict_opts, CLI_NOPTS(predict_opts), &c, argc, argv, pos, &npos, 0);
    if (rc) return rc < 0 ? 2 : 0;
    if (!c.input) {
        fprintf(stderr, "ember predict: --input PATH is required ('-' for stdin)\n");
        return 2;
    }
    FILE *in = strcmp(c.input, "-") == 0 ? stdin : fopen(c.input, "r");
    if (!in) {
        fprintf(stderr, "ember predict: %s: %s\n", c.input, strerror(errno));
        return 1;
    }
    FILE *out = c.output ? fopen(c.output, "w") : stdout;
    if (!out) {
        fprintf(stderr, "ember predict: %s: %s\n", c.output, strerror(errno));
        if (in != stdin) fclose(in);
        return 1;
    }
    em_pool *pool;
    em_dlrm *m;
    if ((rc = open_model(&c, "predict", &pool, &m))) {
        if (in != stdin) fclose(in);
        if (out != stdout) fclose(out);
        return rc;
    }
    const em_dlrm_cfg *mc = em_dlrm_config(m);
    pbatch p;
    float *logits = em_malloc((size_t)c.batch * sizeof(float));
    char *status = em_malloc((size_t)c.batch * 4 + 1);
    char *line = NULL, *fixed = NULL;
    size_t cap = 0, fixed_cap = 0, ns = 0;
    unsigned long long lineno = 0, bad = 0;
    rc = 0;
    if (pb_init(&p, c.batch, mc) != 0 || !logits || !status) {
        fprintf(stderr, "ember predict: out of memory\n");
        rc = 1;
        goto done;
    }
    ssize_t len;
    while ((len = getline(&line, &cap, in)) > 0) {
        lineno++;
        const char *l = line;
        size_t n = (size_t)len, tabs = 0;
        for (size_t i = 0; i < n; i++) tabs += line[i] == '\t';
        if (tabs == (size_t)(mc->num_dense + mc->num_tables + mc->seq.num_seq - 1)) { /* no label column: add one */
            if (fixed_cap < n + 3) {
                fixed_cap = 2 * n + 3;
                char *f2 = realloc(fixed, fixed_cap);
                if (!f2) { rc = 1; break; }
                fixed = f2;
            }
            fixed[0] = '0', fixed[1] = '\t';
            memcpy(fixed + 2, line, n);
            l = fixed, n += 2;
        }
        int i = p.b.B, bad_field;
        em_seq_events ev = {0};
        if (p.nseq) {
            size_t o = (size_t)i * (size_t)p.smax;
            ev = (em_seq_events){p.sitem + o, p.sage + o, p.stype + o, p.smax, 0, 0};
        }
        em_status st = em_seq_parse_line(l, n, mc->num_dense, mc->num_tables, p.nseq, &p.b.label[i],
                                         &p.b.dense[(size_t)i * (size_t)mc->num_dense],
                                         &p.ids[(size_t)i * (size_t)mc->num_tables], &p.miss[i], &ev, &bad_field);
        if (st == EM_OK && p.nseq) p.slen[i] = ev.len;
        if (st) {
            bad++;
            if (c.strict || bad == 1) fprintf(stderr, "ember predict: %s:%llu: %s\n", c.input, lineno, em_last_error());
            if (c.strict) { rc = 1; break; }
            status[ns++] = 'x';
        } else {
            status[ns++] = 'o';
            p.b.B++;
        }
        if (p.b.B == c.batch || ns == (size_t)c.batch * 4) {
            status[ns] = 0;
            if (flush(&p, m, pool, out, status, logits)) { rc = 1; break; }
            ns = 0;
        }
    }
    if (rc == 0) {
        status[ns] = 0;
        if (flush(&p, m, pool, out, status, logits)) rc = 1;
    }
    if (bad && !c.strict) fprintf(stderr, "ember predict: %llu malformed lines got 'nan'\n", bad);
done:
    free(line), free(fixed);
    em_free(logits), em_free(status);
    pb_free(&p);
    em_dlrm_free(m);
    em_pool_free(pool);
    if (in != stdin) fclose(in);
    if (out != stdout && fclose(out) != 0) {
        fprintf(stderr, "ember predict: %s: %s\n", c.output, strerror(errno));
        rc = 1;
    }
    return rc;
}
