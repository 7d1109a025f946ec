/*
 * cmd_plan.c - `ember plan`: shard embedding tables over N ranks (1D) or over groups
 * of G ranks replicated M = N/G times (2D), print the placement with the predicted
 * per-rank load and memory; `--simulate` sweeps N = 8 ... 4096 and compares 1D with
 * 2D step time and memory under the stated hardware model.
 *
 * Human units on the command line (GB/s, microseconds, TFLOP/s, GiB) are converted
 * into the SI units of em_hw_model here; the defaults are em_hw_default()'s.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "ember/plan.h"

typedef struct {
    const char *tables, *preset;
    int world, group, json, simulate, max_world;
    em_plan_cfg cfg;
    double mem_bw, intra_bw, inter_bw, intra_lat, inter_lat, tflops, mem_gib; /* human units */
} plan_ctx;

static int set_algo(void *c, const cli_opt *o, const char *v) {
    plan_ctx *x = c;
    if (!strcmp(v, "greedy")) x->cfg.algo = EM_PLAN_GREEDY;
    else if (!strcmp(v, "kk")) x->cfg.algo = EM_PLAN_KK;
    else {
        fprintf(stderr, "ember plan: --%s: expected greedy or kk, got '%s'\n", o->name, v);
        return -1;
    }
    return 0;
}

static const cli_opt plan_opts[] = {
    OPT_STR("tables", "FILE", "JSON list of table specs (rows, dim, pooling, zipf, bytes, opt_bytes, sharding)",
            plan_ctx, tables),
    OPT_STR("preset", "NAME", "kaggle | large (default large when no --tables)", plan_ctx, preset),
    OPT_INT("world", "N", "world size (ranks)", plan_ctx, world, 1, 1 << 20),
    OPT_INT("group", "G", "2D: ranks per replica group (default N: fully sharded 1D; --simulate: 64)", plan_ctx,
            group, 1, 1 << 20),
    OPT_FN("algo", "NAME", "greedy | kk (Karmarkar-Karp) placement (default greedy)", set_algo, 0),
    OPT_FLAG("json", "print the plan as one JSON object", plan_ctx, json),
    OPT_FLAG("simulate", "sweep N = 8..4096: 1D vs 2D step time and memory per rank", plan_ctx, simulate),
    OPT_INT("max-world", "N", "--simulate: largest N (default 4096)", plan_ctx, max_world, 8, 1 << 20),
    OPT_INT("batch", "B", "examples per rank per step (default 512)", plan_ctx, cfg.batch, 1, 1 << 24),
    OPT_INT("comm-bytes", "E", "bytes per all-to-all element (4 fp32, 2 fp16/bf16; default 4)", plan_ctx,
            cfg.comm_bytes, 1, 8),
    OPT_INT("sync-every", "K", "2D: replica sync period in steps (default 20)", plan_ctx, cfg.sync_every, 1, 1 << 24),
    OPT_DOUBLE("dense-params", "P", "dense parameters (default: the preset's; 0 with --tables)", plan_ctx, cfg.dense_params),
    OPT_DOUBLE("dense-flops", "F", "dense forward flops per example (default: the preset's; 2 x params with --tables)", plan_ctx,
               cfg.dense_flops),
    OPT_DOUBLE_POS("mem-bw", "GB/s", "embedding gather/update bandwidth per rank (default 80)", plan_ctx, mem_bw),
    OPT_DOUBLE_POS("intra-bw", "GB/s", "intra-node link bandwidth per rank (default 50)", plan_ctx, intra_bw),
    OPT_DOUBLE_POS("inter-bw", "GB/s", "inter-node bandwidth per rank (default 25)", plan_ctx, inter_bw),
    OPT_DOUBLE("intra-lat", "US", "intra-node latency per message, microseconds (default 1)", plan_ctx, intra_lat),
    OPT_DOUBLE("inter-lat", "US", "inter-node latency per message, microseconds (default 5)", plan_ctx, inter_lat),
    OPT_INT("ranks-per-node", "R", "ranks per node (default 8)", plan_ctx, cfg.hw.ranks_per_node, 1, 1 << 16),
    OPT_DOUBLE_POS("tflops", "T", "dense compute rate per rank, TFLOP/s (default 2)", plan_ctx, tflops),
    OPT_DOUBLE_POS("mem-gib", "GIB", "memory capacity per rank, GiB (default 256)", plan_ctx, mem_gib),
    OPT_DOUBLE("dp-max-bytes", "BYTES", "rule: tables up to this size are data-parallel (default 1 MiB)", plan_ctx,
               cfg.dp_max_bytes),
    OPT_INT("cw-min-dim", "D", "rule: tables with dim >= D are column-wise (default 512)", plan_ctx, cfg.cw_min_dim,
            1, 1 << 20),
    OPT_INT("cw-width", "W", "rule: columns per column-wise shard (default 128)", plan_ctx, cfg.cw_width, 1, 1 << 20),
    OPT_DOUBLE_POS("rw-share", "X", "rule: row-wise when bytes or cost > X x per-rank mean (default 1)", plan_ctx,
                   cfg.rw_share),
    OPT_CONFIG("read options from a JSON object"),
};

static double ms(double s) { return s * 1e3; }

static double max_comm(const em_plan *p) {
    double m = 0;
    for (int r = 0; r < p->group; r++) m = p->ranks[r].comm_s > m ? p->ranks[r].comm_s : m;
    return m;
}

static void print_assumptions(const em_plan_cfg *c, const char *what, int nt) {
    const em_hw_model *h = &c->hw;
    printf("assumptions: %s (%d tables); batch %d per rank; all-to-all %d bytes/elem; dense part %.3g params, "
           "%.3g fwd flops/example (x3 with backward), %.0f bytes/param of state\n",
           what, nt, c->batch, c->comm_bytes, c->dense_params, c->dense_flops, c->dense_state_bytes);
    printf("hardware per rank: lookups %.0f GB/s, intra-node %.0f GB/s + %.1f us/msg, inter-node %.0f GB/s + %.1f "
           "us/msg, %d ranks/node, dense %.2f TFLOP/s, memory %.0f GiB\n",
           h->mem_bw / 1e9, h->intra_bw / 1e9, h->intra_lat * 1e6, h->inter_bw / 1e9, h->inter_lat * 1e6,
           h->ranks_per_node, h->flops / 1e12, h->mem_capacity / (1 << 30));
    printf("rules: data-parallel <= %.0f bytes; column-wise dim >= %d in %d-column shards; row-wise when bytes or "
           "cost > %.2f x per-rank mean; 2D replica sync every %d steps (touched rows + optimizer state); no overlap "
           "(step = emb + dense + all-reduce + sync)\n",
           c->dp_max_bytes, c->cw_min_dim, c->cw_width, c->rw_share, c->sync_every);
}

static void print_plan(const em_plan *p, const em_table_spec *t, const em_plan_cfg *c, const char *what) {
    int cnt[5] = {0};
    for (int i = 0; i < p->ntables; i++) cnt[p->type[i]]++;
    printf("plan: %s, %d tables, world %d, group %d (%d replica group%s), %s%s\n", what, p->ntables, p->world,
           p->group, p->replicas, p->replicas > 1 ? "s" : "", c->algo == EM_PLAN_KK ? "kk" : "greedy",
           p->fallback & 1 ? " (kk broke a memory cap: greedy used)" : p->fallback & 2 ? " (cost order stranded a shard: placed by memory order)" : "");
    printf("sharding: %d table-wise, %d row-wise, %d column-wise, %d data-parallel\n", cnt[EM_SHARD_TABLE],
           cnt[EM_SHARD_ROW], cnt[EM_SHARD_COLUMN], cnt[EM_SHARD_DATA]);
    printf("\n%-20s %-7s %s\n", "table", "type", "placement (rank:rows x cols)");
    for (int i = 0, s = 0; i < p->ntables; i++) {
        printf("%-20s %-7s", t[i].name, em_shard_name(p->type[i]));
        for (; s < p->nshards && p->shards[s].table == i; s++) {
            const em_shard *h = &p->shards[s];
            if (h->type == EM_SHARD_DATA) printf(" all:%lldx%d", (long long)h->rows, h->cols);
            else if (h->type == EM_SHARD_ROW && h->part > 0) continue;
            else if (h->type == EM_SHARD_ROW) printf(" 0..%d:~%lldx%d", p->group - 1, (long long)h->rows, h->cols);
            else printf(" %d:%lldx%d", h->rank, (long long)h->rows, h->cols);
        }
        printf("\n");
    }
    printf("\n%5s %8s %10s %10s %10s %10s %10s %10s\n", "rank", "shards", "lookup_GB", "a2a_out_MB", "a2a_in_MB",
           "lookup_ms", "a2a_ms", "mem_GB");
    for (int r = 0; r < p->group; r++) {
        const em_rank_load *l = &p->ranks[r];
        int n = 0;
        for (int s = 0; s < p->nshards; s++) n += p->shards[s].rank == r;
        printf("%5d %8d %10.3f %10.2f %10.2f %10.2f %10.2f %10.2f\n", r, n, l->lookup_bytes / 1e9, l->send_bytes / 1e6,
               l->recv_bytes / 1e6, ms(l->lookup_s), ms(l->comm_s), l->mem_bytes / 1e9);
    }
    printf("\nimbalance (max/mean of lookup+a2a): %.3f; memory per rank: max %.2f GB, mean %.2f GB\n", p->imbalance,
           p->mem_max / 1e9, p->mem_mean / 1e9);
    printf("predicted step: %.1f ms = embeddings %.1f + dense %.1f + all-reduce %.1f + replica sync %.1f\n",
           ms(p->t_step), ms(p->t_emb), ms(p->t_dense), ms(p->t_allreduce), ms(p->t_sync));
}

static void print_json(const em_plan *p, const em_table_spec *t, const em_plan_cfg *c) {
    printf("{\"world\":%d,\"group\":%d,\"replicas\":%d,\"algo\":\"%s\",\"fallback\":%d,\"tables\":[", p->world,
           p->group, p->replicas, c->algo == EM_PLAN_KK ? "kk" : "greedy", p->fallback);
    for (int i = 0, s = 0; i < p->ntables; i++) {
        printf("%s{\"name\":\"", i ? "," : "");
        for (const char *q = t[i].name; *q; q++) printf(*q == '"' || *q == '\\' ? "\\%c" : "%c", *q);
        printf("\",\"type\":\"%s\",\"shards\":[", em_shard_name(p->type[i]));
        for (int first = 1; s < p->nshards && p->shards[s].table == i; s++, first = 0) {
            const em_shard *h = &p->shards[s];
            printf("%s{\"rank\":%d,\"rows\":%lld,\"col0\":%d,\"cols\":%d,\"mem_bytes\":%.0f,\"lookup_bytes\":%.0f,"
                   "\"send_bytes\":%.0f,\"cost_s\":%.6g}",
                   first ? "" : ",", h->rank, (long long)h->rows, h->col0, h->cols, h->mem_bytes, h->lookup_bytes,
                   h->send_bytes, h->cost);
        }
        printf("]}");
    }
    printf("],\"ranks\":[");
    for (int r = 0; r < p->group; r++) {
        const em_rank_load *l = &p->ranks[r];
        printf("%s{\"rank\":%d,\"lookup_bytes\":%.0f,\"send_bytes\":%.0f,\"recv_bytes\":%.0f,\"mem_bytes\":%.0f,"
               "\"sync_bytes\":%.0f,\"lookup_s\":%.6g,\"comm_s\":%.6g}",
               r ? "," : "", r, l->lookup_bytes, l->send_bytes, l->recv_bytes, l->mem_bytes, l->sync_bytes,
               l->lookup_s, l->comm_s);
    }
    printf("],\"imbalance\":%.6g,\"mem_max\":%.0f,\"mem_mean\":%.0f,\"t_emb\":%.6g,\"t_dense\":%.6g,"
           "\"t_allreduce\":%.6g,\"t_sync\":%.6g,\"t_step\":%.6g}\n",
           p->imbalance, p->mem_max, p->mem_mean, p->t_emb, p->t_dense, p->t_allreduce, p->t_sync, p->t_step);
}

/* One sweep row per N; 2D needs N a multiple of G (N >= G). */
static int simulate(const em_table_spec *t, int nt, const plan_ctx *x, const char *what) {
    int G = x->group ? x->group : 64, maxN = x->max_world ? x->max_world : 4096;
    print_assumptions(&x->cfg, what, nt);
    printf("1D: fully sharded over all N ranks (all-to-all across N). 2D: groups of G = %d ranks (all-to-all inside a "
           "group), M = N/G replicas synced every %d steps. Times in ms per step; memory in GB per rank (max); "
           "kex/s = N x batch / step, thousands of examples per second.\n\n",
           G, x->cfg.sync_every);
    printf("| N | 1D step | 1D a2a | 1D mem | 1D kex/s | 2D step | 2D a2a | 2D sync | 2D mem | 2D kex/s |\n");
    printf("|---|---|---|---|---|---|---|---|---|---|\n");
    for (int N = 8; N <= maxN; N *= 2) {
        em_plan *p1 = NULL, *p2 = NULL;
        em_plan_cfg c1 = x->cfg, c2 = x->cfg;
        c1.world = N, c1.group = N, c2.world = N, c2.group = G;
        em_status st = em_plan_create(&p1, t, nt, &c1);
        if (st) {
            cli_fail("plan --simulate (1D)", st);
            return 1;
        }
        double b = x->cfg.batch;
        printf("| %d | %.1f | %.1f | %.1f | %.0f |", N, ms(p1->t_step), ms(max_comm(p1)), p1->mem_max / 1e9,
               N * b / p1->t_step / 1e3);
        if (N % G == 0 && (st = em_plan_create(&p2, t, nt, &c2)) == EM_OK)
            printf(" %.1f | %.1f | %.1f | %.1f | %.0f |\n", ms(p2->t_step), ms(max_comm(p2)), ms(p2->t_sync),
                   p2->mem_max / 1e9, N * b / p2->t_step / 1e3);
        else if (N % G) printf(" - | - | - | - | - |\n");
        else printf(" does not fit: %s |\n", em_last_error());
        em_plan_free(p1), em_plan_free(p2);
    }
    return 0;
}

int cmd_plan(int argc, char **argv) {
    em_hw_model hw = em_hw_default();
    plan_ctx x = {.cfg = em_plan_cfg_default(1, 0)};
    x.cfg.dense_params = -1, x.cfg.dense_flops = -1; /* -1: take the preset's */
    x.mem_bw = hw.mem_bw / 1e9, x.intra_bw = hw.intra_bw / 1e9, x.inter_bw = hw.inter_bw / 1e9;
    x.intra_lat = hw.intra_lat * 1e6, x.inter_lat = hw.inter_lat * 1e6, x.tflops = hw.flops / 1e12;
    x.mem_gib = hw.mem_capacity / (1 << 30);
    char *pos[1];
    int npos;
    int rc = cli_parse("plan", "(--tables FILE | --preset kaggle|large) --world N [--group G] [--algo greedy|kk] "
                       "[--json] | --simulate",
                       plan_opts, CLI_NOPTS(plan_opts), &x, argc, argv, pos, &npos, 0);
    if (rc) return rc < 0 ? 2 : 0;
    if (x.tables && x.preset) {
        fprintf(stderr, "ember plan: give --tables or --preset, not both\n");
        return 2;
    }
    if (!x.simulate && !x.world) {
        fprintf(stderr, "ember plan: --world N is required (or --simulate)\n");
        return 2;
    }
    if (x.intra_lat < 0 || x.inter_lat < 0 || x.cfg.dp_max_bytes < 0) {
        fprintf(stderr, "ember plan: latencies and --dp-max-bytes must be >= 0\n");
        return 2;
    }
    x.cfg.hw.mem_bw = x.mem_bw * 1e9, x.cfg.hw.intra_bw = x.intra_bw * 1e9, x.cfg.hw.inter_bw = x.inter_bw * 1e9;
    x.cfg.hw.intra_lat = x.intra_lat * 1e-6, x.cfg.hw.inter_lat = x.inter_lat * 1e-6, x.cfg.hw.flops = x.tflops * 1e12;
    x.cfg.hw.mem_capacity = x.mem_gib * (1 << 30);

    em_table_spec *t = NULL;
    int nt = 0;
    char what[512];
    double dp = x.cfg.dense_params, df = x.cfg.dense_flops;
    em_status st;
    if (x.tables) {
        st = em_plan_load_tables(x.tables, &t, &nt);
        snprintf(what, sizeof what, "tables from %s", x.tables);
        if (dp < 0) dp = 0;
        if (df < 0) df = 2 * (dp > 0 ? dp : 0);
    } else {
        const char *name = x.preset ? x.preset : "large";
        st = em_plan_preset(name, &t, &nt, &x.cfg);
        snprintf(what, sizeof what, "preset %s%s", name,
                 !strcmp(name, "large") ? " (800 tables, rows max(1000, 1e9/(t+1)^1.8), dim 128, pooling 20-100, "
                                          "Zipf 1.05, fp32 + 4 B/row AdaGrad state; 100M-param dense part)"
                                        : " (Criteo Kaggle: 26 tables, dim 16, pooling 1, Zipf 1.05; DLRM MLPs)");
        if (dp >= 0) x.cfg.dense_params = dp;
        if (df >= 0) x.cfg.dense_flops = df;
        dp = x.cfg.dense_params, df = x.cfg.dense_flops;
    }
    if (st) {
        cli_fail("plan", st);
        return st == EM_ERR_INVALID ? 2 : 1;
    }
    x.cfg.dense_params = dp, x.cfg.dense_flops = df;
    if (x.simulate) {
        rc = simulate(t, nt, &x, what);
        em_free(t);
        return rc;
    }
    x.cfg.world = x.world, x.cfg.group = x.group ? x.group : x.world;
    em_plan *p;
    st = em_plan_create(&p, t, nt, &x.cfg);
    if (st) {
        cli_fail("plan", st);
        em_free(t);
        return 1;
    }
    if (x.json) {
        print_json(p, t, &x.cfg);
    } else {
        print_assumptions(&x.cfg, what, nt);
        printf("\n");
        print_plan(p, t, &x.cfg, what);
    }
    em_plan_free(p);
    em_free(t);
    return 0;
}
