/*
 * cli_tables.c - the embedding-backend options (--tables, --dyn-*, --fiited-*) shared
 * by the verbs that build a model: CLI_TABLES_OPTS in cli.h declares them, and
 * cli_tables_apply turns them into em_dlrm_cfg.tables.
 */
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"

int64_t cli_bytes(const char *s) {
    char *end;
    double v = strtod(s, &end);
    if (end == s || !(v >= 0)) return -1;
    double mul = 1;
    if (*end == 'K' || *end == 'k') mul = 1024.0, end++;
    else if (*end == 'M' || *end == 'm') mul = 1048576.0, end++;
    else if (*end == 'G' || *end == 'g') mul = 1073741824.0, end++;
    if (*end == 'B' || *end == 'b') end++;
    if (*end || v * mul > 9e18) return -1;
    return (int64_t)(v * mul);
}

int cli_tables_apply(const char *verb, const cli_tables_opts *o, em_dlrm_cfg *m) {
    em_table_kind kind = EM_TABLES_DENSE;
    if (o->kind && em_table_kind_parse(o->kind, &kind)) {
        fprintf(stderr, "ember %s: --tables: expected dense, dynamic, fiited or ssd, got '%s'\n", verb, o->kind);
        return -1;
    }
    const int dyn_given = o->max_rows || o->max_bytes || o->evict || o->admit_count || o->admit_prob > 0 || o->slack > 0;
    const int fit_given = o->chunks || o->budget || o->prune_every || o->decay > 0;
    if ((dyn_given && kind != EM_TABLES_DYNAMIC) || (fit_given && kind != EM_TABLES_FIITED)) {
        fprintf(stderr, "ember %s: the --%s options need --tables %s\n", verb, dyn_given && kind != EM_TABLES_DYNAMIC ? "dyn-*" : "fiited-*",
                dyn_given && kind != EM_TABLES_DYNAMIC ? "dynamic" : "fiited");
        return -1;
    }
    if ((o->ssd_dir || o->ssd_cache_mb || o->ssd_policy) && kind != EM_TABLES_SSD) {
        fprintf(stderr, "ember %s: the --ssd-* options need --tables ssd\n", verb);
        return -1;
    }
    em_tables_cfg t = em_tables_default(kind, m->dim);
    if (kind == EM_TABLES_DENSE) {
        m->tables = t;
        return 0;
    }
    if (o->init_scale > 0) t.init_scale = (float)o->init_scale;
    if (kind == EM_TABLES_SSD) {
        if (!o->ssd_dir || !*o->ssd_dir || strlen(o->ssd_dir) >= sizeof t.ssd_dir) {
            fprintf(stderr, "ember %s: --tables ssd needs --ssd-dir DIR (a directory on the disk for the tables)\n", verb);
            return -1;
        }
        if (o->ssd_policy && strcmp(o->ssd_policy, "lru") && strcmp(o->ssd_policy, "lfu")) {
            fprintf(stderr, "ember %s: --ssd-policy: expected lru or lfu, got '%s'\n", verb, o->ssd_policy);
            return -1;
        }
        snprintf(t.ssd_dir, sizeof t.ssd_dir, "%s", o->ssd_dir);
        if (o->ssd_cache_mb) t.ssd_cache_bytes = o->ssd_cache_mb << 20;
        t.ssd_policy = o->ssd_policy && !strcmp(o->ssd_policy, "lfu") ? EM_SSD_LFU : EM_SSD_LRU;
        for (int i = 0; i < m->num_tables; i++) m->rows[i] = EM_ROWS_RAW;
        m->tables = t;
        return 0;
    }
    if (kind == EM_TABLES_DYNAMIC) {
        t.max_rows = o->max_rows;
        if (o->max_bytes && (t.max_bytes = cli_bytes(o->max_bytes)) < 0) {
            fprintf(stderr, "ember %s: --dyn-bytes: expected bytes like 64M, got '%s'\n", verb, o->max_bytes);
            return -1;
        }
        if (o->evict && strcmp(o->evict, "age") && strcmp(o->evict, "lfu")) {
            fprintf(stderr, "ember %s: --dyn-evict: expected age or lfu, got '%s'\n", verb, o->evict);
            return -1;
        }
        if (o->evict && !strcmp(o->evict, "lfu")) t.evict = EM_DYN_EVICT_LFU;
        if (o->admit_count && o->admit_prob > 0) {
            fprintf(stderr, "ember %s: give --dyn-admit-count or --dyn-admit-prob, not both\n", verb);
            return -1;
        }
        if (o->admit_count) t.admit = EM_DYN_ADMIT_COUNT, t.admit_min_count = (uint32_t)o->admit_count;
        if (o->admit_prob > 0) t.admit = EM_DYN_ADMIT_PROB, t.admit_prob = (float)o->admit_prob;
        if (o->admit_prob > 1 || o->slack > 0.5) {
            fprintf(stderr, "ember %s: --dyn-admit-prob must be <= 1 and --dyn-slack <= 0.5\n", verb);
            return -1;
        }
        t.evict_slack = o->slack > 0 ? (float)o->slack : 0.05f;
        for (int i = 0; i < m->num_tables; i++) m->rows[i] = EM_ROWS_RAW;
    } else {
        if (o->chunks) t.chunks = o->chunks;
        if (o->prune_every) t.prune_every = o->prune_every;
        if (o->decay > 0) t.util_decay = (float)o->decay;
        if (o->decay >= 1) {
            fprintf(stderr, "ember %s: --fiited-decay must be < 1\n", verb);
            return -1;
        }
        if (o->budget) {
            char *end;
            double f = strtod(o->budget, &end);
            if (end != o->budget && !*end && f > 0 && f <= 1) t.budget_frac = f;
            else if ((t.budget_bytes = cli_bytes(o->budget)) <= 0) {
                fprintf(stderr, "ember %s: --fiited-budget: expected bytes like 200M or a fraction in (0, 1], got '%s'\n",
                        verb, o->budget);
                return -1;
            }
        }
    }
    m->tables = t;
    return 0;
}

double cli_rss_now_mb(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    long pages = 0, rss = 0;
    if (!f) return -1;
    int n = fscanf(f, "%ld %ld", &pages, &rss);
    fclose(f);
    return n == 2 ? (double)rss * 4096.0 / 1048576.0 : -1;
}

void cli_tables_report(FILE *f, em_dlrm *m) {
    em_dlrm_table_stats s;
    if (em_dlrm_table_stats_get(m, -1, &s) != EM_OK || s.kind == EM_TABLES_DENSE) return;
    if (s.kind == EM_TABLES_FIITED)
        fprintf(f, "tables: fiited, %lld of %lld chunks live (%.1f%%), %lld rows with any, %.1f MB held\n",
                (long long)s.live_chunks, (long long)s.chunks, s.chunks ? 100.0 * (double)s.live_chunks / (double)s.chunks : 0,
                (long long)s.rows, (double)s.bytes / 1048576.0);
    else if (s.kind == EM_TABLES_SSD)
        fprintf(f, "tables: ssd, %lld rows (on disk and cached), cache %.1f MB, hit rate %.4f, %llu evicted\n",
                (long long)s.rows, (double)s.bytes / 1048576.0, s.hit_rate, (unsigned long long)s.evictions);
    else
        fprintf(f, "tables: dynamic, %lld rows, %.1f MB held; %llu inserted, %llu evicted, %llu rejected\n", (long long)s.rows,
                (double)s.bytes / 1048576.0, (unsigned long long)s.inserts, (unsigned long long)s.evictions,
                (unsigned long long)s.rejections);
}
