/*
 * cmd_data.c - `ember gen` (synthetic data with a planted ground truth) and
 * `ember convert` (Criteo TSV -> ember binary).
 * `ember gen --drift` writes a time-ordered multi-vertical stream whose ground truth
 * drifts (em_gen_drift_write): stream.tsv, stream.side, stream.summary in --out.
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
            return 0;
        }
    }
    cli_fail("gen", st);
    return 1;
}

typedef struct {
    int strict;
} conv_ctx;
static const cli_opt conv_opts[] = {
    OPT_FLAG("strict", "stop at the first malformed line instead of counting and skipping it", conv_ctx, strict),
};

int cmd_convert(int argc, char **argv) {
    conv_ctx c = {0};
    char *pos[2];
    int npos;
    int rc = cli_parse("convert", "IN.tsv OUT.bin [--strict]", conv_opts, CLI_NOPTS(conv_opts), &c, argc, argv, pos, &npos, 2);
    if (rc) return rc < 0 ? 2 : 0;
    if (npos != 2) {
        fprintf(stderr, "ember convert: need IN.tsv and OUT.bin (see ember convert --help)\n");
        return 2;
    }
    em_reader_stats rs;
    memset(&rs, 0, sizeof rs);
    double t0 = em_now();
    em_status st = em_convert_tsv_to_bin(pos[0], pos[1], EM_CRITEO_DENSE, EM_CRITEO_SPARSE, c.strict, &rs);
    if (st) {
        cli_fail("convert", st);
        return 1;
    }
    printf("converted %llu examples from %s to %s in %.1f s", (unsigned long long)rs.examples, pos[0], pos[1],
           em_now() - t0);
    if (rs.malformed) printf("; %llu malformed lines skipped (first: %s)", (unsigned long long)rs.malformed, rs.first_error);
    printf("\n");
    return 0;
}
