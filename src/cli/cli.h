/*
 * cli.h - shared pieces of the ember command-line tool: option tables, parsing
 * (flags and JSON config files share one path), error reporting.
 *
 * Options are data, not code: each verb declares a table of typed descriptors that
 * name a field of its context struct by offset, and one parser (args.c) converts,
 * range-checks and stores every value. A verb writes code only for options whose
 * value needs interpretation (optimizer names, layer lists, ...), through CLI_FN.
 *
 *   typedef struct { int batch; const char *out; int quiet; } my_ctx;
 *   static const cli_opt opts[] = {
 *       OPT_STR("out", "DIR", "run directory", my_ctx, out),
 *       OPT_INT("batch", "N", "examples per step", my_ctx, batch, 1, 1 << 20),
 *       OPT_FLAG("quiet", "no progress bar", my_ctx, quiet),
 *   };
 *   cli_parse("verb", "[options]", opts, CLI_NOPTS(opts), &ctx, argc, argv, pos, &npos, 0);
 */
#ifndef EMBER_CLI_H
#define EMBER_CLI_H

#include <stddef.h>
#include <stdio.h>

#include "ember.h"

typedef enum {
    CLI_STR,    /* const char *: the argv/config string itself (lives as long as argv/ctx) */
    CLI_INT,    /* signed integer of 4 or 8 bytes, checked against [lo, hi] */
    CLI_UINT,   /* unsigned integer of 4 or 8 bytes, checked against [lo, hi] (lo >= 0) */
    CLI_DOUBLE, /* double; `positive` demands > 0 */
    CLI_FLAG,   /* int set to 1 by the flag; "true"/"1" also set it, "false"/"0" leave it */
    CLI_FN,     /* custom: fn(ctx, opt, value) interprets the value itself */
    CLI_CONFIG, /* --config FILE: read a JSON object of the other options */
} cli_kind;

typedef struct cli_opt cli_opt;

/* A CLI_FN setter: store `value` (never NULL) into ctx, or print what is wrong to
 * stderr (naming --<o->name> and the value) and return -1. o->off is free for the
 * setter's use, usually the offset of its target. */
typedef int (*cli_setter)(void *ctx, const cli_opt *o, const char *value);

/* One option of a verb. Build these with the OPT_* macros below. */
struct cli_opt {
    const char *name; /* long name without dashes, e.g. "batch" */
    const char *arg;  /* metavar, or NULL for a boolean flag */
    const char *help;
    cli_kind kind;
    size_t off;       /* offset of the target in the verb's context struct */
    int size;         /* CLI_INT/CLI_UINT: sizeof the target (4 or 8) */
    int positive;     /* CLI_DOUBLE: reject values <= 0 */
    long long lo, hi; /* CLI_INT/CLI_UINT: accepted range, inclusive */
    cli_setter fn;    /* CLI_FN only */
};

/* offsetof(T, f), and a compile error unless T.f has exactly type `type`. */
#define CLI_OFF_AS(T, f, type) (offsetof(T, f) + 0 * sizeof(&((T *)0)->f - (type *)0))
/* sizeof T.f, and a compile error unless T.f is an integer of 4 or 8 bytes. */
#define CLI_INT_SIZE(T, f)                                                                                             \
    (int)(sizeof(((T *)0)->f % 2) * 0 +                                                                                \
          sizeof(char[sizeof(((T *)0)->f) == 4 || sizeof(((T *)0)->f) == 8 ? 1 : -1]) * 0 + sizeof(((T *)0)->f))

#define OPT_STR(name, arg, help, T, f) {name, arg, help, CLI_STR, CLI_OFF_AS(T, f, const char *), 0, 0, 0, 0, NULL}
#define OPT_INT(name, arg, help, T, f, lo, hi) {name, arg, help, CLI_INT, offsetof(T, f), CLI_INT_SIZE(T, f), 0, lo, hi, NULL}
#define OPT_UINT(name, arg, help, T, f, lo, hi)                                                                        \
    {name, arg, help, CLI_UINT, offsetof(T, f), CLI_INT_SIZE(T, f), 0, lo, hi, NULL}
#define OPT_DOUBLE(name, arg, help, T, f) {name, arg, help, CLI_DOUBLE, CLI_OFF_AS(T, f, double), 0, 0, 0, 0, NULL}
#define OPT_DOUBLE_POS(name, arg, help, T, f) {name, arg, help, CLI_DOUBLE, CLI_OFF_AS(T, f, double), 0, 1, 0, 0, NULL}
#define OPT_FLAG(name, help, T, f) {name, NULL, help, CLI_FLAG, CLI_OFF_AS(T, f, int), 0, 0, 0, 0, NULL}
/* `off` is handed to fn through o->off (0 when the setter needs none). */
#define OPT_FN(name, arg, help, fn, off) {name, arg, help, CLI_FN, off, 0, 0, 0, 0, fn}
#define OPT_CONFIG(help) {"config", "FILE", help, CLI_CONFIG, 0, 0, 0, 0, 0, NULL}

#define CLI_NOPTS(table) ((int)(sizeof(table) / sizeof((table)[0])))

/* Parse argv (after the verb) against opts; `--config FILE` (if the verb lists it)
 * reads a JSON object whose keys are option names ('_' or '-') and whose values are
 * strings, numbers, booleans or arrays of integers (joined with ','). Positional
 * arguments are returned through pos/npos. Returns 0, 1 if --help was printed, or -1
 * after printing the error. String targets point into argv or into config storage
 * that lives until the process exits. */
int cli_parse(const char *verb, const char *usage, const cli_opt *opts, int nopts, void *ctx, int argc, char **argv,
              char **pos, int *npos, int max_pos);
/* Free the copies of config-file strings (call once the verb is done with its ctx). */
void cli_release(void);
void cli_help(FILE *f, const char *verb, const char *usage, const cli_opt *opts, int nopts);

/* Print "ember: <what>: <detail or status>" to stderr. */
void cli_fail(const char *what, em_status st);

/* Value parsers that print "ember: --<opt>: expected ..., got '<v>'" and return -1. */
int cli_int(const char *opt, const char *v, long long lo, long long hi, long long *out);
int cli_float(const char *opt, const char *v, double *out);
/* A comma-separated list of positive integers, at most `max` of them, into out[]; on
 * error prints "ember <verb>: --<opt>: expected a comma-separated list of <what>". */
int cli_int_list(const char *verb, const char *opt, const char *what, const char *v, int64_t *out, int max, int *n);
/* A CLI_FN setter: an optimizer name (em_optim_parse) into the em_optim_kind at o->off. */
int cli_set_optim(void *ctx, const cli_opt *o, const char *v);
/* MLP sizes like "13-512-256-64-16" into sizes and *n (at least 2), *given = 1; else a
 * message naming the verb and --opt, and -1. */
int cli_layers(const char *verb, const char *opt, const char *v, int *sizes, int *n, int *given);

/* The embedding-backend options of a verb that builds a model (cli_tables.c): put a
 * cli_tables_opts field in the verb's context, CLI_TABLES_OPTS(ctx type, field) in its
 * table, and call cli_tables_apply once the tables' rows are known. Zero = not given. */
typedef struct {
    const char *kind, *evict, *max_bytes, *budget;
    int64_t max_rows, admit_count, prune_every;
    double admit_prob, slack, decay, init_scale;
    int chunks;
    const char *ssd_dir, *ssd_policy;
    int64_t ssd_cache_mb;
} cli_tables_opts;
#define CLI_TABLES_OPTS(T, f)                                                                                          \
    OPT_STR("tables", "KIND", "embedding tables: dense (ids modulo rows; default) | dynamic (raw 64-bit ids, rows "    \
            "created on first sight, evicted under a budget) | fiited (per-row pruned dimensions) | ssd (dynamic "     \
            "tables on disk in RocksDB behind a cache of hot rows)", T, f.kind),                                       \
        OPT_INT("dyn-rows", "N", "dynamic: row budget per table (0 = none)", T, f.max_rows, 0, 1LL << 40),             \
        OPT_STR("dyn-bytes", "B", "dynamic: byte budget per table, e.g. 64M (0 = none)", T, f.max_bytes),              \
        OPT_STR("dyn-evict", "age|lfu", "dynamic: evict the least recently (default) or least often used rows", T,     \
                f.evict),                                                                                              \
        OPT_INT("dyn-admit-count", "N", "dynamic: admit an id at its N-th sighting (count-min sketch)", T,             \
                f.admit_count, 1, 1LL << 31),                                                                          \
        OPT_DOUBLE_POS("dyn-admit-prob", "P", "dynamic: admit a fixed fraction P of the ids (hashed)", T, f.admit_prob), \
        OPT_DOUBLE_POS("dyn-slack", "F", "dynamic: evict to budget x (1 - F) at once (default 0.05)", T, f.slack),      \
        OPT_INT("fiited-chunks", "K", "fiited: chunks per row, dividing D (default 4)", T, f.chunks, 1, 255),          \
        OPT_STR("fiited-budget", "B|F", "fiited: memory budget of the live chunks: bytes (e.g. 200M) or a fraction "   \
                "<= 1 of the full tables (e.g. 0.25)", T, f.budget),                                                   \
        OPT_INT("fiited-prune-every", "N", "fiited: steps between prunes (default 1000)", T, f.prune_every, 1,         \
                1LL << 40),                                                                                            \
        OPT_DOUBLE_POS("fiited-decay", "F", "fiited: utility moving-average decay per step, < 1 (default 0.9)", T,     \
                       f.decay),                                                                                       \
        OPT_DOUBLE_POS("table-init-scale", "S", "dynamic/fiited/ssd: initial values U(-S, S) (default 0.01)", T,       \
                       f.init_scale),                                                                                  \
        OPT_STR("ssd-dir", "DIR", "ssd: directory for the on-disk tables (a scratch store per run inside it)", T,       \
                f.ssd_dir),                                                                                            \
        OPT_INT("ssd-cache-mb", "N", "ssd: memory limit of the cache of hot rows, MB (default 256)", T, f.ssd_cache_mb, \
                1, 1LL << 30),                                                                                         \
        OPT_STR("ssd-policy", "lru|lfu", "ssd: cache eviction: least recently (default) or least often used", T,       \
                f.ssd_policy)
/* Fill m->tables from o (and rows = EM_ROWS_RAW for dynamic and SSD tables); prints what is
 * wrong and returns -1. */
int cli_tables_apply(const char *verb, const cli_tables_opts *o, em_dlrm_cfg *m);
/* "123", "64K", "200M", "2G" (powers of 1024) -> bytes; -1 if malformed. */
int64_t cli_bytes(const char *s);
/* One line on what dynamic / FIITED tables hold (nothing for dense ones). */
void cli_tables_report(FILE *f, em_dlrm *m);
/* The process's resident memory now (/proc/self/statm), MB; -1 if unknown. */
double cli_rss_now_mb(void);

int cmd_train(int argc, char **argv);
int cmd_gen(int argc, char **argv);
int cmd_convert(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_predict(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_serve(int argc, char **argv);
int cmd_plan(int argc, char **argv);
int cmd_stream(int argc, char **argv);
int cmd_exfm(int argc, char **argv);
int cmd_inspect(int argc, char **argv);

/* `mpirun -np N ember train` (cmd_train_dist.c): the distributed options of ember train. */
typedef struct {
    const char *sharding, *comm_prec;
    int group, sync_every, bucket_kb;
} cli_dist_args;
int cli_train_dist(em_train_cfg *tc, int threads, const cli_dist_args *a, const char *test_prob, int quiet);

#endif
