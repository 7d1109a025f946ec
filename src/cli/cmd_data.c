/*
 * cmd_data.c - `ember gen` (synthetic data with a planted ground truth) and
 * `ember convert` (Criteo TSV -> ember binary).
 * `ember gen --drift` writes a time-ordered multi-vertical stream whose ground truth
 * drifts (em_gen_drift_write): stream.tsv, stream.side, stream.summary in --out.
 * `ember gen --seq-len-mean F` adds a history column and a planted history term;
 * `ember convert --seq N` converts lines with N sequence columns (binary version 2);
 * `ember convert --otto` turns OTTO session JSON lines into (history, candidate,
 * label) examples (em_otto_convert). docs/FORMATS.md describes every output.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli.h"

typedef struct {
    em_gen_cfg g;
    const char *out;
    int threads;
    int64_t card[EM_DLRM_MAX_TABLES];
    int ncard;
    int drift_on;       /* --drift */
    em_drift_cfg d;     /* its options (d.base is filled from g at the end) */
    double shares[EM_DRIFT_MAX_VERTICALS];
    int nshares;
    int seq_field;      /* --seq-field, 1-based (C<k>) */
} gen_ctx;

/* --shares 0.5,0.3,0.2: comma-separated non-negative numbers. */
static int set_shares(void *c, const cli_opt *o, const char *v) {
    gen_ctx *g = c;
    char buf[1024];
    if (strlen(v) >= sizeof buf) {
        fprintf(stderr, "ember gen: --%s: list too long\n", o->name);
        return -1;
    }
    strcpy(buf, v);
    g->nshares = 0;
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        double x;
        if (cli_float(o->name, tok, &x)) return -1;
        if (x < 0 || g->nshares == EM_DRIFT_MAX_VERTICALS) {
            fprintf(stderr, "ember gen: --%s: expected at most %d non-negative shares, got '%s'\n", o->name,
                    EM_DRIFT_MAX_VERTICALS, v);
            return -1;
        }
        g->shares[g->nshares++] = x;
    }
    if (!g->nshares) {
        fprintf(stderr, "ember gen: --%s: expected a comma-separated list of shares\n", o->name);
        return -1;
    }
    return 0;
}

static int set_type_w(void *c, const cli_opt *o, const char *v) {
    double *w = ((gen_ctx *)c)->g.seq_type_w;
    char tail;
    if (sscanf(v, "%lf,%lf,%lf%c", &w[0], &w[1], &w[2], &tail) != 3 || !(w[0] >= 0 && w[1] >= 0 && w[2] >= 0) ||
        !(w[0] <= 1e6 && w[1] <= 1e6 && w[2] <= 1e6)) {
        fprintf(stderr, "ember gen: --%s: expected three weights 0..1e6 like 1,2,3, got '%s'\n", o->name, v);
        return -1;
    }
    return 0;
}

static int set_card(void *c, const cli_opt *o, const char *v) {
    gen_ctx *g = c;
    return cli_int_list("gen", o->name, "positive counts", v, g->card, EM_DLRM_MAX_TABLES, &g->ncard);
}

static const cli_opt gen_opts[] = {
    OPT_STR("out", "DIR", "output directory: train.tsv, test.tsv, test.prob (true probability per test line)", gen_ctx, out),
    OPT_UINT("rows", "N", "training rows; with --drift, examples in the stream (default 1000000)", gen_ctx, g.train_rows, 0, 1LL << 40),
    OPT_UINT("test-rows", "N", "test rows (default 100000)", gen_ctx, g.test_rows, 0, 1LL << 40),
    OPT_UINT("seed", "N", "seed of the ground truth and the sampling", gen_ctx, g.seed, 0, 1LL << 62),
    OPT_FN("cardinality", "LIST", "distinct ids per categorical field, 26 comma-separated (default: Criteo Kaggle's)",
           set_card, 0),
    OPT_DOUBLE("zipf", "S", "Zipf exponent of id popularity", gen_ctx, g.zipf_s),
    OPT_INT("latent-dim", "K", "rank of the planted pairwise interactions", gen_ctx, g.latent_dim, 1, 1024),
    OPT_DOUBLE("interaction-scale", "F", "weight of the pairwise interaction term", gen_ctx, g.interaction_scale),
    OPT_DOUBLE("id-scale", "F", "standard deviation of the per-id weights", gen_ctx, g.id_scale),
    OPT_DOUBLE("bias", "F", "logit bias (sets the base click rate)", gen_ctx, g.bias),
    OPT_INT("threads", "N", "worker threads (default 2; output is the same for any count)", gen_ctx, threads, 1, 256),
    OPT_FLAG("drift", "write a drifting multi-vertical stream instead: stream.tsv (--rows examples in time order), "
             "stream.side (vertical, window, true probability per line), stream.summary (per window and vertical)",
             gen_ctx, drift_on),
    OPT_INT("windows", "W", "--drift: windows in the stream (default 30)", gen_ctx, d.windows, 1, 1 << 30),
    OPT_INT("verticals", "V", "--drift: verticals (products) (default 3)", gen_ctx, d.verticals, 1, EM_DRIFT_MAX_VERTICALS),
    OPT_FN("shares", "LIST", "--drift: traffic share per vertical, comma-separated (default 0.5,0.3,0.2)", set_shares, 0),
    OPT_DOUBLE("turnover", "F", "--drift: fraction of each field's id ranks moving to a new id per window (default 0.05)",
               gen_ctx, d.turnover),
    OPT_DOUBLE("drift-rate", "RAD", "--drift: rotation of the per-id weights per window, radians (default 0.05)",
               gen_ctx, d.drift),
    OPT_DOUBLE("vertical-scale", "F", "--drift: std of the per-vertical per-id weights (default 0.15)", gen_ctx,
               d.vertical_scale),
    OPT_DOUBLE("vertical-bias", "F", "--drift: std of the per-vertical logit offsets (default 0.3)", gen_ctx,
               d.vertical_bias),
    OPT_INT("churn-min-card", "N", "--drift: fields with fewer ids never churn (default 100)", gen_ctx,
            d.churn_min_card, 1, 1LL << 62),
    OPT_DOUBLE("seq-len-mean", "F", "add a history column (item:age:type events after the categoricals) with this mean "
               "length; the candidate item is categorical --seq-field and the planted truth gains a history term "
               "(default 0: no history, output as before)", gen_ctx, g.seq_len_mean),
    OPT_INT("seq-max", "N", "cap on the history length (default 256)", gen_ctx, g.seq_max, 1, 16384),
    OPT_DOUBLE("seq-len-sigma", "F", "lognormal sigma of the history lengths (default 1)", gen_ctx, g.seq_len_sigma),
    OPT_INT("seq-field", "K", "categorical C<K> holds the candidate item (default 10)", gen_ctx, seq_field, 1, 64),
    OPT_DOUBLE("seq-scale", "F", "weight of the history term in the logit (default 1)", gen_ctx, g.seq_scale),
    OPT_DOUBLE_POS("seq-decay", "SEC", "recency time constant of the history term, seconds (default 86400)", gen_ctx,
                   g.seq_decay),
    OPT_DOUBLE("seq-repeat", "P", "probability that the candidate is one of the history's items (default 0.2)", gen_ctx,
               g.seq_repeat),
    OPT_FN("seq-type-weights", "W0,W1,W2", "weights of event types 0, 1, 2 (click 85%, cart 10%, order 5%) in the "
           "history term (default 1,2,3)", set_type_w, 0),
};

static int run_drift(gen_ctx *c) {
    c->d.base = c->g;
    c->d.rows = c->g.train_rows;
    if (c->nshares) {
        if (c->nshares != c->d.verticals) {
            fprintf(stderr, "ember gen: --shares lists %d shares, expected %d (--verticals)\n", c->nshares,
                    c->d.verticals);
            return 2;
        }
        c->d.shares = c->shares;
    }
    char da[1100], si[1100], su[1100];
    snprintf(da, sizeof da, "%s/stream.tsv", c->out);
    snprintf(si, sizeof si, "%s/stream.side", c->out);
    snprintf(su, sizeof su, "%s/stream.summary", c->out);
    em_pool *pool;
    em_status st = em_pool_create(&pool, c->threads);
    if (st == EM_OK) {
        double t0 = em_now();
        st = em_gen_drift_write(&c->d, da, si, su, pool);
        em_pool_free(pool);
        if (st == EM_OK) {
            printf("wrote %s (%llu rows in %d windows, %d verticals), %s, %s in %.1f s\n", da,
                   (unsigned long long)c->d.rows, c->d.windows, c->d.verticals, si, su, em_now() - t0);
            return 0;
        }
    }
    cli_fail("gen", st);
    return 1;
}

int cmd_gen(int argc, char **argv) {
    gen_ctx c;
    memset(&c, 0, sizeof c);
    c.g = em_gen_default();
    c.g.train_rows = 1000000, c.g.test_rows = 100000;
    c.threads = 2;
    c.d = em_drift_default();
    char *pos[1];
    int npos;
    int rc = cli_parse("gen", "--out DIR [options]", gen_opts, CLI_NOPTS(gen_opts), &c, argc, argv,
                       pos, &npos, 0);
    if (rc) return rc < 0 ? 2 : 0;
    if (!c.out) {
        fprintf(stderr, "ember gen: --out DIR is required\n");
        return 2;
    }
    if (c.ncard) {
        if (c.ncard != c.g.num_sparse) {
            fprintf(stderr, "ember gen: --cardinality lists %d fields, expected %d\n", c.ncard, c.g.num_sparse);
            return 2;
        }
        c.g.cardinality = c.card;
    }
    if (c.seq_field) c.g.seq_field = c.seq_field - 1;
    if (c.drift_on && c.g.seq_len_mean > 0) {
        fprintf(stderr, "ember gen: --seq-len-mean does not combine with --drift\n");
        return 2;
    }
    if (mkdir(c.out, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "ember gen: %s: %s\n", c.out, strerror(errno));
        return 1;
    }
    if (c.drift_on) return run_drift(&c);
    char tr[1100], te[1100], pr[1100];
    snprintf(tr, sizeof tr, "%s/train.tsv", c.out);
    snprintf(te, sizeof te, "%s/test.tsv", c.out);
    snprintf(pr, sizeof pr, "%s/test.prob", c.out);
    em_pool *pool;
    em_status st = em_pool_create(&pool, c.threads);
    if (st == EM_OK) {
        double t0 = em_now();
        st = em_gen_write(&c.g, tr, te, pr, pool);
        em_pool_free(pool);
        if (st == EM_OK) {
            printf("wrote %s (%llu rows), %s (%llu rows), %s in %.1f s\n", tr, (unsigned long long)c.g.train_rows, te,
                   (unsigned long long)c.g.test_rows, pr, em_now() - t0);
            if (c.g.seq_len_mean > 0)
                printf("each line has a history column after C%d (read with num_seq 1); the candidate item is C%d\n",
                       c.g.num_sparse, c.g.seq_field + 1);
            return 0;
        }
    }
    cli_fail("gen", st);
    return 1;
}

typedef struct {
    int strict;
    int dense, sparse, seq, seq_max;
    int otto;
    const char *labels;
    int negatives;
    uint64_t seed;
} conv_ctx;
static const cli_opt conv_opts[] = {
    OPT_FLAG("strict", "stop at the first malformed line instead of counting and skipping it", conv_ctx, strict),
    OPT_INT("dense", "N", "integer fields per line (default 13)", conv_ctx, dense, 0, 4096),
    OPT_INT("sparse", "N", "categorical fields per line (default 26)", conv_ctx, sparse, 0, 64),
    OPT_INT("seq", "N", "sequence columns after the categoricals (item:age:type,...); N > 0 writes binary version 2 "
            "(default 0)", conv_ctx, seq, 0, EM_SEQ_MAX_FEATURES),
    OPT_INT("seq-max", "N", "keep the most recent N events of each sequence (default 0: as many as the format holds)",
            conv_ctx, seq_max, 0, EM_SEQ_MAX_LEN),
    OPT_FLAG("otto", "IN is OTTO session JSON lines: write (history, candidate, label) examples, TSV or (OUT ending in "
             ".bin) binary; lines are label, C1 candidate aid, C2 predicted type (0 clicks, 1 carts, 2 orders), S1 history",
             conv_ctx, otto),
    OPT_STR("labels", "FILE", "--otto: positives from this OTTO labels file (against whole sessions) instead of each "
            "session's own events", conv_ctx, labels),
    OPT_INT("negatives", "K", "--otto: negatives per positive, drawn by popularity from items outside the session "
            "(default 4)", conv_ctx, negatives, 0, 1000),
    OPT_UINT("seed", "N", "--otto: seed of the negative sampling (default 1)", conv_ctx, seed, 0, 1LL << 62),
};

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

static int convert_otto(const conv_ctx *c, char **pos) {
    em_otto_cfg oc = em_otto_default();
    oc.labels_path = c->labels;
    oc.negatives = c->negatives;
    oc.seed = c->seed;
    oc.seq_max_len = c->seq_max;
    oc.binary = ends_with(pos[1], ".bin");
    oc.strict = c->strict;
    em_otto_stats os;
    double t0 = em_now();
    em_status st = em_otto_convert(pos[0], pos[1], &oc, &os);
    if (st) {
        cli_fail("convert --otto", st);
        return 1;
    }
    printf("converted %llu sessions (%llu events, %llu items) from %s to %s (%s) in %.1f s: %llu examples, %llu positives, "
           "%llu negatives",
           (unsigned long long)os.sessions, (unsigned long long)os.events, (unsigned long long)os.items, pos[0], pos[1],
           oc.binary ? "binary" : "TSV", em_now() - t0, (unsigned long long)os.examples,
           (unsigned long long)os.positives, (unsigned long long)os.negatives);
    if (os.short_negatives) printf("; %llu positives with fewer negatives", (unsigned long long)os.short_negatives);
    if (os.unmatched_labels) printf("; %llu labels without a session", (unsigned long long)os.unmatched_labels);
    if (os.malformed) printf("; %llu malformed lines skipped (first: %s)", (unsigned long long)os.malformed, os.first_error);
    printf("\nread it with num_dense 0, num_sparse 2, num_seq 1\n");
    return 0;
}

int cmd_convert(int argc, char **argv) {
    conv_ctx c = {.dense = EM_CRITEO_DENSE, .sparse = EM_CRITEO_SPARSE, .negatives = 4, .seed = 1};
    char *pos[2];
    int npos;
    int rc = cli_parse("convert", "IN.tsv OUT.bin [--seq N] [--strict] | --otto SESSIONS.jsonl OUT.tsv|OUT.bin [options]",
                       conv_opts, CLI_NOPTS(conv_opts), &c, argc, argv, pos, &npos, 2);
    if (rc) return rc < 0 ? 2 : 0;
    if (npos != 2) {
        fprintf(stderr, "ember convert: need IN and OUT (see ember convert --help)\n");
        return 2;
    }
    if (c.otto) return convert_otto(&c, pos);
    if (c.labels) {
        fprintf(stderr, "ember convert: --labels needs --otto\n");
        return 2;
    }
    em_reader_stats rs;
    memset(&rs, 0, sizeof rs);
    double t0 = em_now();
    em_convert_cfg cc = {.num_dense = c.dense, .num_sparse = c.sparse, .num_seq = c.seq, .seq_max_len = c.seq_max,
                         .strict = c.strict};
    em_status st = em_convert_tsv(pos[0], pos[1], &cc, &rs);
    if (st) {
        cli_fail("convert", st);
        return 1;
    }
    printf("converted %llu examples from %s to %s in %.1f s", (unsigned long long)rs.examples, pos[0], pos[1],
           em_now() - t0);
    if (c.seq) {
        printf("; %llu sequence events", (unsigned long long)rs.seq_events);
        if (rs.seq_dropped) printf(" (%llu older ones beyond --seq-max left out)", (unsigned long long)rs.seq_dropped);
    }
    if (rs.malformed) printf("; %llu malformed lines skipped (first: %s)", (unsigned long long)rs.malformed, rs.first_error);
    printf("\n");
    return 0;
}
