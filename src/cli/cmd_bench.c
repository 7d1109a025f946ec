/*
 * cmd_bench.c - `ember bench`: training throughput on synthetic in-memory batches,
 * the same workloads as bench/dlrm_torch.py's `speed` so the two can be compared
 * step for step:
 *   kaggle    13 dense, 26 tables with the Criteo Kaggle cardinalities, D=16,
 *             bottom 13-512-256-64-16, top 367-512-256-1, one id per bag
 *   embheavy  26 tables of 100k rows, D=64, 20 ids per bag,
 *             bottom 13-512-256-64, top 415-512-256-1
 * Ids are uniform random, dense features uniform in [0, 1), labels Bernoulli(0.5);
 * 8 distinct batches are generated up front and cycled, so only training is timed.
 * Prints one JSON line.
 */
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "cli/cli.h"

typedef struct {
    const char *config, *opt;
    int batch, threads;
    long long steps, warmup;
    double lr;
} bench_ctx;

static const cli_opt bench_opts[] = {
    OPT_STR("workload", "NAME", "kaggle | embheavy (default kaggle)", bench_ctx, config),
    OPT_INT("batch", "N", "examples per step (default 2048)", bench_ctx, batch, 1, 1 << 20),
    OPT_STR("opt", "NAME", "sgd (dense and sparse SGD) | adagrad | rowwise_adagrad (dense AdaGrad) (default sgd)", bench_ctx,
            opt),
    OPT_INT("steps", "N", "timed steps (default 50)", bench_ctx, steps, 1, 1LL << 40),
    OPT_INT("warmup", "N", "untimed steps first (default 5)", bench_ctx, warmup, 0, 1LL << 40),
    OPT_INT("threads", "N", "worker threads (default 2)", bench_ctx, threads, 1, 256),
    OPT_DOUBLE("lr", "F", "learning rate (default 0.01)", bench_ctx, lr),
};

int cmd_bench(int argc, char **argv) {
    bench_ctx c = {.config = "kaggle", .opt = "sgd", .batch = 2048, .threads = 2, .steps = 50, .warmup = 5, .lr = 0.01};
    char *pos[1];
    int npos;
    int rc = cli_parse("bench", "[options]", bench_opts, CLI_NOPTS(bench_opts), &c, argc, argv,
                       pos, &npos, 0);
    if (rc) return rc < 0 ? 2 : 0;
    em_dlrm_cfg m = em_dlrm_kaggle(0);
    int per_bag = 1;
    if (strcmp(c.config, "embheavy") == 0) {
        for (int t = 0; t < 26; t++) m.rows[t] = 100000;
        m.dim = 64;
        int bot[] = {13, 512, 256, 64}, top[] = {415, 512, 256, 1};
        m.n_bot = 4, m.n_top = 4;
        memcpy(m.bot, bot, sizeof bot);
        memcpy(m.top, top, sizeof top);
        per_bag = 20;
    } else if (strcmp(c.config, "kaggle") != 0) {
        fprintf(stderr, "ember bench: --workload: expected kaggle or embheavy, got '%s'\n", c.config);
        return 2;
    }
    em_optim_kind sk;
    if (em_optim_parse(c.opt, &sk) || sk == EM_OPT_ADAM || sk == EM_OPT_ADAMW) {
        fprintf(stderr, "ember bench: --opt: expected sgd, adagrad or rowwise_adagrad, got '%s'\n", c.opt);
        return 2;
    }
    m.sparse_opt = em_optim_default(sk, (float)c.lr);
    m.dense_opt = em_optim_default(sk == EM_OPT_SGD ? EM_OPT_SGD : EM_OPT_ADAGRAD, (float)c.lr);
    em_pool *pool = NULL;
    em_dlrm *model = NULL;
    em_status st = em_pool_create(&pool, c.threads);
    if (st == EM_OK) st = em_dlrm_create(&model, &m, pool);
    if (st) {
        cli_fail("bench", st);
        em_pool_free(pool);
        return 1;
    }
    enum { NB = 8 };
    const int B = c.batch, T = m.num_tables;
    em_batch batches[NB];
    em_rng r;
    em_rng_seed(&r, 12345);
    for (int k = 0; k < NB; k++) {
        em_batch *b = &batches[k];
        memset(b, 0, sizeof *b);
        b->B = B, b->num_dense = m.num_dense, b->num_sparse = T;
        b->dense = em_malloc((size_t)B * (size_t)m.num_dense * sizeof(float));
        b->label = em_malloc((size_t)B * sizeof(float));
        b->indices = em_malloc((size_t)B * (size_t)T * (size_t)per_bag * sizeof(int64_t));
        b->offsets = em_malloc(((size_t)B * (size_t)T + 1) * sizeof(int64_t));
        if (!b->dense || !b->label || !b->indices || !b->offsets) {
            fprintf(stderr, "ember bench: out of memory\n");
            return 1;
        }
        for (size_t i = 0; i < (size_t)B * (size_t)m.num_dense; i++) b->dense[i] = (float)em_rng_uniform(&r);
        for (int i = 0; i < B; i++) b->label[i] = (float)(em_rng_u64(&r) & 1);
        int64_t n = 0;
        b->offsets[0] = 0;
        for (int t = 0; t < T; t++)
            for (int i = 0; i < B; i++) {
                for (int j = 0; j < per_bag; j++) b->indices[n++] = (int64_t)em_rng_below(&r, (uint64_t)m.rows[t]);
                b->offsets[(size_t)t * (size_t)B + (size_t)i + 1] = n;
            }
    }
    double loss = 0, t0 = 0;
    for (long long s = 0; s < c.warmup + c.steps; s++) {
        if (s == c.warmup) t0 = em_now();
        if ((st = em_dlrm_train_step(model, &batches[s % NB], &loss, pool))) {
            cli_fail("bench", st);
            return 1;
        }
    }
    double secs = em_now() - t0;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("{\"config\":\"%s\",\"batch\":%d,\"opt\":\"%s\",\"threads\":%d,\"examples_per_s\":%.1f,\"ms_per_step\":%.3f,"
           "\"steps\":%lld,\"final_loss\":%.5f,\"state_mb\":%.1f,\"peak_rss_mb\":%.1f}\n",
           c.config, B, c.opt, c.threads, (double)B * (double)c.steps / secs, 1e3 * secs / (double)c.steps, c.steps, loss,
           (double)em_dlrm_state_bytes(model) / 1048576.0, (double)ru.ru_maxrss / 1024.0);
    for (int k = 0; k < NB; k++)
        em_free(batches[k].dense), em_free(batches[k].label), em_free(batches[k].indices), em_free(batches[k].offsets);
    em_dlrm_free(model);
    em_pool_free(pool);
    return 0;
}
