/*
 * test_cli_options.c - the option handling of the `ember` binary (EMBER_BIN), as a
 * user meets it:
 *   - every verb's --help exits 0 and lists each of its options;
 *   - an unknown option, an out-of-range integer, a malformed value, a non-positive
 *     learning rate and a value given to a flag exit 2 with a message naming the
 *     option (and the bad value);
 *   - a JSON config file drives `ember train` (strings, integers, an integer array,
 *     a boolean) on a tiny generated dataset, and report.json shows its max_steps;
 *     an unknown key fails naming the file and the key; a flag after --config
 *     overrides the config; flags accept false / 0 in a config.
 * Everything runs on 2k rows with a 3-step budget: the file takes well under a second.
 */
#include <stdarg.h>
#include <sys/wait.h>

#include "test.h"

static char dir[256];
static const char *CARD = "3,4,5,6,7,3,4,5,6,7,3,4,5,6,7,3,4,5,6,7,3,4,5,6,7,8";

/* Run `ember <args>` with stdout and stderr going to dir/<log> (NULL: discarded);
 * returns the exit status, or -1 if it did not exit normally. */
static int ember(const char *log, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int ember(const char *log, const char *fmt, ...) {
    char args[2048], cmd[4096];
    const char *bin = getenv("EMBER_BIN"); /* set by CTest */
    if (!bin) bin = "../build/ember";
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    if (log) snprintf(cmd, sizeof cmd, "%s %s > %s/%s 2>&1", bin, args, dir, log);
    else snprintf(cmd, sizeof cmd, "%s %s > /dev/null 2>&1", bin, args);
    int rc = system(cmd);
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

/* The whole of dir/name as a string (caller frees), or NULL. */
static char *read_in_dir(const char *name) {
    char p[512];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "rb");
    if (!f) return NULL;
    size_t n = 0, cap = 4096, got;
    char *s = malloc(cap);
    while (s && (got = fread(s + n, 1, cap - 1 - n, f)) > 0)
        if ((n += got) == cap - 1) s = realloc(s, cap *= 2);
    fclose(f);
    if (s) s[n] = 0;
    return s;
}

/* Does dir/name contain every one of the NULL-terminated strings? Prints the first
 * one missing. */
static int has_all(const char *name, ...) {
    char *s = read_in_dir(name);
    int ok = s != NULL;
    va_list ap;
    va_start(ap, name);
    for (const char *w; ok && (w = va_arg(ap, const char *));)
        if (!strstr(s, w)) fprintf(stderr, "  %s lacks \"%s\"\n", name, w), ok = 0;
    va_end(ap);
    free(s);
    return ok;
}

static void write_file(const char *name, const char *text) {
    char p[512];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "w");
    CHECK(f != NULL);
    if (f) fputs(text, f), fclose(f);
}

/* "steps" of the "run" section of <dir>/<run>/report.json, or -1. */
static long report_steps(const char *run_name) {
    char p[512];
    snprintf(p, sizeof p, "%s/report.json", run_name);
    char *s = read_in_dir(p);
    const char *r = s ? strstr(s, "\"run\":") : NULL, *k = r ? strstr(r, "\"steps\":") : NULL;
    long steps = k ? atol(k + 8) : -1;
    free(s);
    return steps;
}

/* The scratch directory, made once for all cases. */
static void setup(void) {
    if (!dir[0]) CHECK(mkdtemp(strcpy(dir, "/tmp/ember_opts_XXXXXX")) != NULL);
}

static void test_help_lists_options(void) {
    setup();
    static const struct {
        const char *verb, *opts[8];
    } v[] = {
        {"train", {"--config FILE", "--batch N", "--lr F", "--dense-opt NAME", "--rows LIST", "--quiet", "--max-steps N"}},
        {"eval", {"--model CKPT", "--test PATH", "--limit N", "--batch N", "--threads N"}},
        {"predict", {"--model CKPT", "--input PATH", "--output PATH", "--strict", "--batch N"}},
        {"gen", {"--out DIR", "--rows N", "--cardinality LIST", "--zipf S", "--latent-dim K", "--bias F"}},
        {"convert", {"--strict"}},
        {"bench", {"--workload NAME", "--batch N", "--opt NAME", "--steps N", "--warmup N", "--lr F"}},
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        CHECK(ember("help.txt", "%s --help", v[i].verb) == 0);
        CHECK(has_all("help.txt", "usage: ember", v[i].verb, "--help", (char *)NULL));
        for (int k = 0; v[i].opts[k]; k++) CHECK(has_all("help.txt", v[i].opts[k], (char *)NULL));
    }
    CHECK(ember(NULL, "--help") == 0);
    CHECK(ember(NULL, "frobnicate") == 2);
}

static void test_bad_values(void) {
    setup();
    /* arguments (%s = the scratch dir, used at most once), then what stderr must name */
    static const struct {
        const char *args, *want[3];
    } bad[] = {
        {"train --bogus 1", {"unknown option", "--bogus"}},
        {"gen --out %s/x --no-such-thing", {"unknown option", "--no-such-thing"}},
        {"train --batch 0", {"--batch", "[1, 1048576]", "'0'"}},
        {"train --batch=abc", {"--batch", "'abc'"}},
        {"eval --threads 999", {"--threads", "[1, 256]", "'999'"}},
        {"gen --out %s/x --seed -1", {"--seed", "'-1'"}},
        {"gen --out %s/x --zipf fast", {"--zipf", "'fast'"}},
        {"train --lr=-0.5", {"--lr", "> 0"}},
        {"train --quiet=maybe", {"--quiet", "takes no value"}},
        {"train --dense-opt lion", {"--dense-opt", "'lion'"}},
        {"train --bot 13", {"--bot", "'13'"}},
        {"train --rows 5,0,7", {"--rows", "'5,0,7'"}},
        {"gen --out %s/x --cardinality 3,x", {"--cardinality", "'3,x'"}},
        {"train --pooling max", {"--pooling", "'max'"}},
        {"train --max-steps", {"--max-steps", "needs a value"}},
        {"convert a b c", {"unexpected argument", "'c'"}},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char args[512];
        snprintf(args, sizeof args, bad[i].args, dir);
        int rc = ember("e.txt", "%s", args);
        if (rc != 2) fprintf(stderr, "  ember %s: exit %d\n", args, rc);
        CHECK(rc == 2);
        for (int k = 0; k < 3 && bad[i].want[k]; k++) CHECK(has_all("e.txt", bad[i].want[k], (char *)NULL));
    }
}

/* A config whose values cover every JSON type; `extra` is spliced in before "}". */
static void write_config(const char *name, const char *run_name, const char *extra) {
    char text[2048];
    snprintf(text, sizeof text,
             "{\"train\": \"%s/data/train.tsv\", \"max_steps\": 3, \"batch\": 64, \"lr\": 0.05,\n"
             " \"rows\": [%s], \"dim\": 8, \"bot\": \"13-16-8\", \"top\": \"359-16-1\",\n"
             " \"sparse-opt\": \"rowwise_adagrad\", \"threads\": 1, \"quiet\": true, \"out\": \"%s/%s\"%s}\n",
             dir, CARD, dir, run_name, extra);
    write_file(name, text);
}

static void test_config_file(void) {
    setup();
    CHECK(ember("gen.log", "gen --out %s/data --rows 2000 --test-rows 100 --cardinality %s", dir, CARD) == 0);
    write_config("a.json", "runA", "");
    CHECK(ember("a.log", "train --config %s/a.json", dir) == 0);
    CHECK(report_steps("runA") == 3);
    CHECK(has_all("runA/report.json", "\"batch\":64", "\"threads\":1", "rowwise_adagrad", (char *)NULL));
    CHECK(has_all("a.log", "batch 64", (char *)NULL));

    /* a flag after --config overrides it (before --config, the config would win) */
    write_config("b.json", "runB", "");
    CHECK(ember(NULL, "train --config %s/b.json --max-steps 2", dir) == 0);
    CHECK(report_steps("runB") == 2);
    CHECK(ember(NULL, "train --max-steps 2 --config %s/b.json", dir) == 0);
    CHECK(report_steps("runB") == 3);

    /* unknown keys, a nested config and a bad value name the file and the key */
    write_config("c.json", "runC", ", \"learning_rate\": 0.1");
    CHECK(ember("e.txt", "train --config %s/c.json", dir) == 2);
    CHECK(has_all("e.txt", "c.json", "'learning_rate'", (char *)NULL));
    write_config("c.json", "runC", ", \"config\": \"other.json\"");
    CHECK(ember("e.txt", "train --config %s/c.json", dir) == 2);
    CHECK(has_all("e.txt", "c.json", "'config'", (char *)NULL));
    write_config("c.json", "runC", ", \"epochs\": 0");
    CHECK(ember("e.txt", "train --config %s/c.json", dir) == 2);
    CHECK(has_all("e.txt", "--epochs", "c.json", "'epochs'", (char *)NULL));
    write_file("c.json", "[1, 2]");
    CHECK(ember("e.txt", "train --config %s/c.json", dir) == 2);
    CHECK(has_all("e.txt", "c.json", (char *)NULL));
    CHECK(ember("e.txt", "train --config %s/missing.json", dir) == 2);
    CHECK(has_all("e.txt", "missing.json", (char *)NULL));

    /* a second config adds to the first; false / 0 leave flags off */
    write_file("d.json", "{\"quiet\": false, \"strict\": 0}");
    CHECK(ember("d.log", "train --config %s/a.json --config %s/d.json --out %s/runD", dir, dir, dir) == 0);
    CHECK(report_steps("runD") == 3);
}

static void test_cleanup(void) {
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (dir[0] && t_failures == 0 && system(cmd) != 0) fprintf(stderr, "  could not remove %s\n", dir);
}

TEST_MAIN({"help_lists_options", test_help_lists_options}, {"bad_values", test_bad_values},
          {"config_file", test_config_file}, {"cleanup", test_cleanup})
