/*
 * cmd_data.c - `ember gen` (synthetic data with a planted ground truth) and
 * `ember convert` (Criteo TSV -> ember binary).
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
} gen_ctx;

static int set_card(void *c, const cli_opt *o, const char *v) {
    gen_ctx *g = c;
    return cli_int_list("gen", o->name, "positive counts", v, g->card, EM_DLRM_MAX_TABLES, &g->ncard);
}

static const cli_opt gen_opts[] = {
    OPT_STR("out", "DIR", "output directory: train.tsv, test.tsv, test.prob (true probability per test line)", gen_ctx, out),
    OPT_UINT("rows", "N", "training rows (default 1000000)", gen_ctx, g.train_rows, 0, 1LL << 40),
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
};

int cmd_gen(int argc, char **argv) {
    gen_ctx c;
    memset(&c, 0, sizeof c);
    c.g = em_gen_default();
    c.g.train_rows = 1000000, c.g.test_rows = 100000;
    c.threads = 2;
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
