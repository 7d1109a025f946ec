/*
 * test_cli_seq.c - the sequence options of the `ember` binary, as a user runs them:
 * `gen --seq-len-mean` (a history column after C26), `convert --seq` (binary version
 * 2, read back through the library), `convert --otto` on the OTTO samples in
 * tests/data/otto (TSV and binary, with and without labels), the --help texts, and the
 * option errors. The library behind them is tested in test_data_seq.c.
 */
#include <stdarg.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cli_util.h"
#include "test.h"

static char dir[256], bin[1024], src[1024];

static void cleanup(void) {
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
}

static void setup(void) {
    if (dir[0]) return;
    const char *b = getenv("EMBER_BIN"), *s = getenv("EMBER_SRC");
    snprintf(bin, sizeof bin, "%s", b ? b : "../build/ember");
    snprintf(src, sizeof src, "%s", s ? s : "..");
    snprintf(dir, sizeof dir, "/tmp/ember_cliseq_XXXXXX");
    CHECK(mkdtemp(dir) != NULL);
    atexit(cleanup);
}

/* Reads a whole file through the library; returns examples or -1. */
static long read_count(const char *path, int nd, int ns, const int64_t *rows, int64_t seq_rows, uint64_t *events) {
    em_reader_cfg c = {.path = path, .batch_size = 100, .num_dense = nd, .num_sparse = ns, .table_rows = rows,
                       .strict = 1, .num_seq = 1, .seq_rows = &seq_rows, .seq_max_len = 4096};
    em_reader *r;
    if (em_reader_open(&r, &c) != EM_OK) return -1;
    const em_batch *b;
    em_status s;
    while ((s = em_reader_next(r, &b)) == EM_OK) {
    }
    em_reader_stats st;
    em_reader_stats_get(r, &st);
    em_reader_free(r);
    *events = st.seq_events;
    return s == EM_ERR_EOF ? (long)st.examples : -1;
}

static void test_gen_convert(void) {
    setup();
    CHECK(run("%s gen --out %s/g --rows 2000 --test-rows 300 --seed 4 --seq-len-mean 8 --seq-max 32 > %s/gen.log 2>&1",
              bin, dir, dir) == 0);
    char *log = slurp("%s/gen.log", dir);
    CHECK(log && strstr(log, "history column after C26") && strstr(log, "candidate item is C10"));
    free(log);
    /* every line has 41 columns */
    CHECK(run("awk -F'\\t' 'NF != 41 { bad = 1 } END { exit bad }' %s/g/train.tsv", dir) == 0);
    CHECK(run("%s convert %s/g/train.tsv %s/g/train.bin --seq 1 > %s/conv.log 2>&1", bin, dir, dir, dir) == 0);
    log = slurp("%s/conv.log", dir);
    CHECK(log && strstr(log, "converted 2000 examples") && strstr(log, "sequence events"));
    free(log);
    int64_t rows[26];
    for (int f = 0; f < 26; f++) rows[f] = 1 << 20;
    char p[1100];
    uint64_t ev_tsv = 0, ev_bin = 1;
    snprintf(p, sizeof p, "%s/g/train.tsv", dir);
    CHECK(read_count(p, 13, 26, rows, 93145, &ev_tsv) == 2000);
    snprintf(p, sizeof p, "%s/g/train.bin", dir);
    CHECK(read_count(p, 13, 26, rows, 93145, &ev_bin) == 2000);
    CHECK(ev_tsv == ev_bin && ev_tsv > 2000 * 4);
    /* a cap at conversion; errors */
    CHECK(run("%s convert %s/g/train.tsv %s/g/t4.bin --seq 1 --seq-max 4 > %s/conv.log 2>&1", bin, dir, dir, dir) == 0);
    log = slurp("%s/conv.log", dir);
    CHECK(log && strstr(log, "older ones beyond --seq-max left out"));
    free(log);
    CHECK(run("%s convert %s/g/train.tsv %s/g/x.bin --seq 1 --seq-max 1000000 > %s/err.log 2>&1", bin, dir, dir, dir) == 1);
    log = slurp("%s/err.log", dir);
    CHECK(log && strstr(log, "exceeds the format's limit"));
    free(log);
    CHECK(run("%s convert %s/g/train.tsv %s/g/x.bin > %s/err.log 2>&1", bin, dir, dir, dir) == 0); /* every line malformed */
    log = slurp("%s/err.log", dir);
    CHECK(log && strstr(log, "converted 0 examples") && strstr(log, "41 fields, expected 40"));
    free(log);
    CHECK(run("%s gen --drift --out %s/d --rows 100 --seq-len-mean 5 > /dev/null 2>&1", bin, dir) == 2);
    CHECK(run("%s convert a b --labels c > /dev/null 2>&1", bin) == 2);
}

static void test_otto(void) {
    setup();
    CHECK(run("%s convert --otto %s/tests/data/otto/train_20sessions.jsonl %s/o.tsv --negatives 2 --seed 3 > %s/o.log 2>&1",
              bin, src, dir, dir) == 0);
    char *log = slurp("%s/o.log", dir);
    CHECK(log && strstr(log, "converted 20 sessions (862 events") && strstr(log, "842 positives, 1684 negatives") &&
          strstr(log, "num_dense 0, num_sparse 2, num_seq 1"));
    free(log);
    CHECK(run("%s convert --otto %s/tests/data/otto/train_20sessions.jsonl %s/o.bin --negatives 2 --seed 3 > %s/o.log 2>&1",
              bin, src, dir, dir) == 0);
    CHECK(run("%s convert %s/o.tsv %s/o2.bin --dense 0 --sparse 2 --seq 1 > /dev/null && cmp -s %s/o.bin %s/o2.bin", bin,
              dir, dir, dir, dir) == 0);
    const int64_t rows[2] = {1ll << 40, 3};
    char p[1100];
    uint64_t ev;
    snprintf(p, sizeof p, "%s/o.bin", dir);
    CHECK(read_count(p, 0, 2, rows, 1ll << 40, &ev) == 842 * 3);
    CHECK(run("%s convert --otto %s/tests/data/otto/srcout_test_sessions.jsonl %s/l.tsv --labels "
              "%s/tests/data/otto/srcout_test_labels.jsonl > %s/o.log 2>&1",
              bin, src, dir, src, dir) == 0);
    log = slurp("%s/o.log", dir);
    CHECK(log && strstr(log, "8 positives, 32 negatives"));
    free(log);
    CHECK(run("%s convert --otto %s/none.jsonl %s/x.tsv > /dev/null 2>&1", bin, dir, dir) == 1);
}

static void test_help(void) {
    setup();
    CHECK(run("%s gen --help > %s/h1 2>&1", bin, dir) == 0);
    CHECK(run("%s convert --help > %s/h2 2>&1", bin, dir) == 0);
    char *h1 = slurp("%s/h1", dir), *h2 = slurp("%s/h2", dir);
    CHECK(h1 && strstr(h1, "--seq-len-mean") && strstr(h1, "--seq-max") && strstr(h1, "--seq-decay") &&
          strstr(h1, "--seq-field"));
    CHECK(h2 && strstr(h2, "--otto") && strstr(h2, "--labels") && strstr(h2, "--negatives") && strstr(h2, "--seq"));
    free(h1), free(h2);
}

TEST_MAIN({"gen_convert", test_gen_convert}, {"otto", test_otto}, {"help", test_help})
