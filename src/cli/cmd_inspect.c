/*
 * cmd_inspect.c - `ember inspect CHECKPOINT [--json]`: what a DLRM checkpoint holds:
 * the model (tables' kind, D, optimizers, step, dense parameters) and per embedding
 * table its rows, live chunks (FIITED), bytes, optimizer state and counters
 * (dynamic). The checkpoint is loaded as em_dlrm_load would for training, so
 * everything shown has been validated (a corrupt file is refused, not shown).
 *
 * Columns by kind: dense tables have rows = capacity; dynamic tables show live rows
 * against their budget and inserted / evicted / rejected ids; FIITED tables show
 * the rows with any live chunk and live chunks of rows x k. A tier with a cache (the
 * SSD tier) reports its hit rate in the "hit_rate" column; others show "-" (JSON
 * null).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"

typedef struct {
    int json;
} inspect_ctx;

static const cli_opt opts[] = {
    OPT_FLAG("json", "one JSON object on stdout instead of a table", inspect_ctx, json),
};

static void row_json(FILE *f, const char *name, const em_dlrm_table_stats *s, int last) {
    fprintf(f, "    {\"table\": %s, \"rows\": %lld, \"max_rows\": %lld, \"live_chunks\": %lld, \"chunks\": %lld, "
               "\"bytes\": %zu, \"state_bytes\": %zu, \"inserts\": %llu, \"evictions\": %llu, \"rejections\": %llu, "
               "\"hit_rate\": ",
            name, (long long)s->rows, (long long)s->max_rows, (long long)s->live_chunks, (long long)s->chunks, s->bytes,
            s->state_bytes, (unsigned long long)s->inserts, (unsigned long long)s->evictions,
            (unsigned long long)s->rejections);
    if (s->hit_rate >= 0) fprintf(f, "%.6f}%s\n", s->hit_rate, last ? "" : ",");
    else fprintf(f, "null}%s\n", last ? "" : ",");
}

static void row_text(FILE *f, const char *name, const em_dlrm_table_stats *s) {
    char chunks[48] = "-", counters[64] = "-", hit[16] = "-", maxr[24] = "-";
    if (s->kind == EM_TABLES_FIITED)
        snprintf(chunks, sizeof chunks, "%lld/%lld", (long long)s->live_chunks, (long long)s->chunks);
    if (s->kind == EM_TABLES_DYNAMIC)
        snprintf(counters, sizeof counters, "%llu/%llu/%llu", (unsigned long long)s->inserts,
                 (unsigned long long)s->evictions, (unsigned long long)s->rejections);
    if (s->hit_rate >= 0) snprintf(hit, sizeof hit, "%.4f", s->hit_rate);
    if (s->max_rows > 0) snprintf(maxr, sizeof maxr, "%lld", (long long)s->max_rows);
    fprintf(f, "%-6s %12lld %12s %22s %12.3f %10.3f %24s %8s\n", name, (long long)s->rows, maxr, chunks,
            (double)s->bytes / 1048576.0, (double)s->state_bytes / 1048576.0, counters, hit);
}

int cmd_inspect(int argc, char **argv) {
    inspect_ctx c = {0};
    char *pos[2];
    int npos = 0;
    int rc = cli_parse("inspect", "CHECKPOINT [--json]", opts, CLI_NOPTS(opts), &c, argc, argv, pos, &npos, 2);
    if (rc) return rc < 0 ? 2 : 0;
    if (npos != 1) {
        fprintf(stderr, "ember inspect: give one checkpoint (ember inspect CHECKPOINT [--json])\n");
        return 2;
    }
    em_pool *pool = NULL;
    em_dlrm *m = NULL;
    em_st *f = NULL;
    em_status st = em_pool_create(&pool, 1);
    if (st == EM_OK) st = em_dlrm_load(&m, pos[0], &f, pool);
    if (st) {
        cli_fail("inspect", st);
        em_pool_free(pool);
        return 1;
    }
    const em_dlrm_cfg *mc = em_dlrm_config(m);
    const int T = mc->num_tables;
    em_dlrm_table_stats tot, *ts = malloc(sizeof *ts * (size_t)T);
    st = ts ? em_dlrm_table_stats_get(m, -1, &tot) : EM_ERR_NOMEM;
    for (int t = 0; st == EM_OK && t < T; t++) st = em_dlrm_table_stats_get(m, t, &ts[t]);
    if (st) {
        cli_fail("inspect", st);
        free(ts);
        em_st_close(f);
        em_dlrm_free(m);
        em_pool_free(pool);
        return 1;
    }
    const size_t dense = em_dlrm_state_bytes(m) - tot.bytes; /* the MLPs (and a sequence tower) */
    const char *epoch = em_st_meta_get(f, "train.epoch"), *tpos = em_st_meta_get(f, "train.pos");
    const char *kind = em_table_kind_name(mc->tables.kind);
    if (c.json) {
        printf("{\"checkpoint\": \"");
        for (const char *p = pos[0]; *p; p++) /* a JSON string: escape what must be */
            if (*p == '"' || *p == '\\') printf("\\%c", *p);
            else if ((unsigned char)*p < 0x20) printf("\\u%04x", (unsigned char)*p);
            else putchar(*p);
        printf("\", \"kind\": \"%s\", \"dim\": %d, \"tables\": %d, \"step\": %lld, "
               "\"sparse_opt\": \"%s\", \"dense_opt\": \"%s\", \"dense_state_bytes\": %zu,",
               kind, mc->dim, T, (long long)em_dlrm_step_count(m), em_optim_name(mc->sparse_opt.kind),
               em_optim_name(mc->dense_opt.kind), dense);
        if (epoch && tpos) printf(" \"train_epoch\": %s, \"train_pos\": %s,", epoch, tpos);
        if (mc->tables.kind == EM_TABLES_FIITED)
            printf(" \"fiited\": {\"chunks\": %d, \"budget_bytes\": %lld, \"budget_frac\": %g, \"prune_every\": %lld},",
                   mc->tables.chunks, (long long)mc->tables.budget_bytes, mc->tables.budget_frac,
                   (long long)mc->tables.prune_every);
        if (mc->tables.kind == EM_TABLES_DYNAMIC)
            printf(" \"dynamic\": {\"max_rows\": %lld, \"max_bytes\": %lld, \"evict\": \"%s\"},",
                   (long long)mc->tables.max_rows, (long long)mc->tables.max_bytes,
                   mc->tables.evict == EM_DYN_EVICT_LFU ? "lfu" : "age");
        printf("\n  \"per_table\": [\n");
        char name[16];
        for (int t = 0; t < T; t++) {
            snprintf(name, sizeof name, "%d", t);
            row_json(stdout, name, &ts[t], 0);
        }
        row_json(stdout, "\"all\"", &tot, 1);
        printf("  ]}\n");
    } else {
        printf("checkpoint %s: %s tables, D=%d, %d tables, step %lld, sparse optimizer %s, dense %s\n", pos[0], kind,
               mc->dim, T, (long long)em_dlrm_step_count(m), em_optim_name(mc->sparse_opt.kind),
               em_optim_name(mc->dense_opt.kind));
        if (epoch && tpos) printf("training position: epoch %s, record %s\n", epoch, tpos);
        if (mc->tables.kind == EM_TABLES_FIITED)
            printf("fiited: k=%d chunks of %d dims, budget %lld bytes / %g of full, prune every %lld steps\n",
                   mc->tables.chunks, mc->dim / mc->tables.chunks, (long long)mc->tables.budget_bytes,
                   mc->tables.budget_frac, (long long)mc->tables.prune_every);
        if (mc->tables.kind == EM_TABLES_DYNAMIC)
            printf("dynamic: budget %lld rows / %lld bytes per table, %s eviction\n", (long long)mc->tables.max_rows,
                   (long long)mc->tables.max_bytes, mc->tables.evict == EM_DYN_EVICT_LFU ? "lfu" : "age");
        printf("dense parameters + gradients + optimizer state: %.3f MB\n", (double)dense / 1048576.0);
        printf("%-6s %12s %12s %22s %12s %10s %24s %8s\n", "table", "rows", "max_rows", "live_chunks", "MB", "state_MB",
               "ins/evict/reject", "hit_rate");
        char name[16];
        for (int t = 0; t < T; t++) {
            snprintf(name, sizeof name, "%d", t);
            row_text(stdout, name, &ts[t]);
        }
        row_text(stdout, "all", &tot);
    }
    free(ts);
    em_st_close(f);
    em_dlrm_free(m);
    em_pool_free(pool);
    return 0;
}
