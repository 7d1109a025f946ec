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

#define G ((gen_ctx *)c)
static int g_rows(void *c, const char *v) {
    long long x;
    if (cli_int("rows", v, 0, 1LL << 40, &x)) return -1;
    G->g.train_rows = (uint64_t)x;
    return 0;
}
static int g_test_rows(void *c, const char *v) {
    long long x;
    if (cli_int("test-rows", v, 0, 1LL << 40, &x)) return -1;
    G->g.test_rows = (uint64_t)x;
    return 0;
}
static int g_seed(void *c, const char *v) {
    long long x;
    if (cli_int("seed", v, 0, 1LL << 62, &x)) return -1;
    G->g.seed = (uint64_t)x;
    return 0;
}
static int g_threads(void *c, const char *v) {
    long long x;
    if (cli_int("threads", v, 1, 256, &x)) return -1;
    G->threads = (int)x;
    return 0;
}
static int g_out(void *c, const char *v) { return G->out = v, 0; }
static int g_zipf(void *c, const char *v) { return cli_float("zipf", v, &G->g.zipf_s); }
static int g_bias(void *c, const char *v) { return cli_float("bias", v, &G->g.bias); }
static int g_inter(void *c, const char *v) { return cli_float("interaction-scale", v, &G->g.interaction_scale); }
static int g_idscale(void *c, const char *v) { return cli_float("id-scale", v, &G->g.id_scale); }
static int g_latent(void *c, const char *v) {
    long long x;
    if (cli_int("latent-dim", v, 1, 1024, &x)) return -1;
    G->g.latent_dim = (int)x;
    return 0;
}
static int g_card(void *c, const char *v) {
    int n = 0;
    const char *s = v;
    while (*s) {
        char *end;
        long long x = strtoll(s, &end, 10);
        if (end == s || x < 1 || n == EM_DLRM_MAX_TABLES || (*end && *end != ',')) {
            fprintf(stderr, "ember gen: --cardinality: expected a comma-separated list of positive counts, got '%s'\n", v);
            return -1;
        }
        G->card[n++] = x;
        s = *end ? end + 1 : end;
    }
    G->ncard = n;
    return 0;
}

static const cli_opt gen_opts[] = {
    {"out", "DIR", "output directory: train.tsv, test.tsv, test.prob (true probability per test line)", g_out},
    {"rows", "N", "training rows (default 1000000)", g_rows},
    {"test-rows", "N", "test rows (default 100000)", g_test_rows},
    {"seed", "N", "seed of the ground truth and the sampling", g_seed},
    {"cardinality", "LIST", "distinct ids per categorical field, 26 comma-separated (default: Criteo Kaggle's)", g_card},
    {"zipf", "S", "Zipf exponent of id popularity", g_zipf},
    {"latent-dim", "K", "rank of the planted pairwise interactions", g_latent},
    {"interaction-scale", "F", "weight of the pairwise interaction term", g_inter},
    {"id-scale", "F", "standard deviation of the per-id weights", g_idscale},
    {"bias", "F", "logit bias (sets the base click rate)", g_bias},
    {"threads", "N", "worker threads (default 2; output is the same for any count)", g_threads},
};

int cmd_gen(int argc, char **argv) {
    gen_ctx c;
    memset(&c, 0, sizeof c);
    c.g = em_gen_default();
    c.g.train_rows = 1000000, c.g.test_rows = 100000;
    c.threads = 2;
    char *pos[1];
    int npos;
    int rc = cli_parse("gen", "--out DIR [options]", gen_opts, (int)(sizeof gen_opts / sizeof gen_opts[0]), &c, argc, argv,
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
static int cv_strict(void *c, const char *v) { return ((conv_ctx *)c)->strict = 1, 0; }
static const cli_opt conv_opts[] = {
    {"strict", NULL, "stop at the first malformed line instead of counting and skipping it", cv_strict},
};

int cmd_convert(int argc, char **argv) {
    conv_ctx c = {0};
    char *pos[2];
    int npos;
    int rc = cli_parse("convert", "IN.tsv OUT.bin [--strict]", conv_opts, 1, &c, argc, argv, pos, &npos, 2);
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
