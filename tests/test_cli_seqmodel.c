/*
 * test_cli_seqmodel.c - the sequence model through the `ember` binary, as a user runs it:
 *   - on small `ember gen --seq-len-mean` data with a planted history signal, `ember
 *     train --seq-share C10` (the default CompSkip tower) beats the same DLRM without
 *     the history column in test AUC after a few seconds of training;
 *   - eval and predict read the history column (predict with and without the label);
 *   - resume is bitwise (N steps + resume to 2N == 2N), as are 1 and 3 threads, with an
 *     own item table and a JSON config using the seq keys;
 *   - option errors and --help.
 */
#include <stdarg.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cli_util.h"
#include "test.h"

static char dir[256], bin[1024];
static const char *CARD = "9,12,30,5,40,3,8,25,4,60,7,11,20,6,15,50,3,9,13,4,35,6,10,18,5,22";

static void setup(void) {
    if (dir[0]) return;
    const char *b = getenv("EMBER_BIN");
    snprintf(bin, sizeof bin, "%s", b ? b : "../build/ember");
    snprintf(dir, sizeof dir, "/tmp/ember_seqm_XXXXXX");
    CHECK(mkdtemp(dir) != NULL);
    /* a strong history term (--seq-scale 2) on few ids per field: learnable in seconds */
    CHECK(run("%s gen --out %s/d --rows 60000 --test-rows 10000 --seed 5 --interaction-scale 0.05 --cardinality %s "
              "--seq-len-mean 20 --seq-scale 2 > %s/gen.log 2>&1", bin, dir, CARD, dir) == 0);
    /* the same data without the history column, for the model without it */
    CHECK(run("cut -f1-40 %s/d/train.tsv > %s/d/train0.tsv && cut -f1-40 %s/d/test.tsv > %s/d/test0.tsv", dir, dir, dir,
              dir) == 0);
}

static const char *model = "--dim 16 --bot 13-64-16 --batch 128 --dense-opt adagrad --sparse-opt rowwise_adagrad --lr 0.02";

static void test_history_beats_no_history(void) {
    setup();
    double t0 = em_now();
    CHECK(run("%s train --train %s/d/train.tsv --test %s/d/test.tsv --test-prob %s/d/test.prob --rows %s %s --seq-share C10 "
              "--out %s/seq --quiet > %s/seq.log 2>&1", bin, dir, dir, dir, CARD, model, dir, dir) == 0);
    double t1 = em_now();
    CHECK(run("%s train --train %s/d/train0.tsv --test %s/d/test0.tsv --rows %s %s --out %s/base --quiet > %s/base.log 2>&1",
              bin, dir, dir, CARD, model, dir, dir) == 0);
    char *rs = slurp("%s/seq/report.json", dir), *rb = slurp("%s/base/report.json", dir);
    double auc = report_num(rs, "\"test\"", "auc"), base = report_num(rb, "\"test\"", "auc"),
           best = report_num(rs, "\"optimum\"", "auc"), flops = report_num(rs, "\"seq\"", "forward_flops_per_example");
    fprintf(stderr, "  test AUC with history %.4f (%.1f s), without %.4f, planted optimum %.4f; tower %.0f FLOP/example\n",
            auc, t1 - t0, base, best, flops);
    CHECK(auc > base + 0.05);
    CHECK(auc < best + 0.005);
    CHECK(flops > 1e4);
    CHECK(rs && strstr(rs, "\"seq\":{\"num_seq\":1") && strstr(rs, "\"blocks\":\"gdpa:silu,hsp,swa:8\""));
    free(rs), free(rb);
    char *log = slurp("%s/seq.log", dir);
    CHECK(log && strstr(log, "sequence tower: history of C10 (shared item table, 60 rows)"));
    free(log);
}

static void test_eval_predict(void) {
    setup();
    char ck[400];
    snprintf(ck, sizeof ck, "%s/seq/checkpoint.safetensors", dir);
    CHECK(run("%s eval --model %s --test %s/d/test.tsv > %s/eval.json 2>&1", bin, ck, dir, dir) == 0);
    char *ev = slurp("%s/eval.json", dir), *rep = slurp("%s/seq/report.json", dir);
    double a = report_num(ev, "{", "auc"), b = report_num(rep, "\"test\"", "auc");
    CHECK(fabs(a - b) < 1e-4); /* other batch sizes: float rounding only */
    free(ev), free(rep);
    /* predict: with and without the label column, one line per input line */
    CHECK(run("head -n 50 %s/d/test.tsv > %s/l.tsv && cut -f2- %s/l.tsv > %s/nl.tsv", dir, dir, dir, dir) == 0);
    CHECK(run("%s predict --model %s --input %s/l.tsv --output %s/p1.txt", bin, ck, dir, dir) == 0);
    CHECK(run("%s predict --model %s --input %s/nl.tsv --output %s/p2.txt", bin, ck, dir, dir) == 0);
    CHECK(run("cmp -s %s/p1.txt %s/p2.txt", dir, dir) == 0);
    char *p = slurp("%s/p1.txt", dir);
    int lines = 0;
    for (char *q = p; q && *q; q++) lines += *q == '\n';
    CHECK(lines == 50 && p && !strstr(p, "nan"));
    free(p);
    /* a line without its history column is malformed for a sequence model */
    CHECK(run("head -n 3 %s/d/test0.tsv > %s/nohist.tsv", dir, dir) == 0);
    CHECK(run("%s predict --model %s --input %s/nohist.tsv --output %s/p3.txt 2> %s/p3.log", bin, ck, dir, dir, dir) == 0);
    p = slurp("%s/p3.txt", dir);
    CHECK(p && strcmp(p, "nan\nnan\nnan\n") == 0);
    free(p);
    /* quantized tables need the history's own table */
    CHECK(run("%s eval --model %s --test %s/d/test.tsv --tables int8 > %s/q.log 2>&1", bin, ck, dir, dir) == 1);
    char *q = slurp("%s/q.log", dir);
    CHECK(q && strstr(q, "shares table C10"));
    free(q);
}

/* Compare every tensor of two checkpoints bitwise. */
static int same_checkpoint(const char *a, const char *b) {
    em_st *x = NULL, *y = NULL;
    int same = em_st_open(&x, a) == EM_OK && em_st_open(&y, b) == EM_OK && em_st_count(x) == em_st_count(y);
    for (int i = 0; same && i < em_st_count(x); i++) {
        const em_st_tensor *t = em_st_at(x, i), *u = em_st_find(y, t->name);
        size_t n = em_dtype_size(t->dtype);
        for (int d = 0; d < t->ndim; d++) n *= (size_t)t->shape[d];
        same = u && u->dtype == t->dtype && memcmp(t->data, u->data, n) == 0;
        if (!same) fprintf(stderr, "  tensor %s differs\n", t->name);
    }
    em_st_close(x);
    em_st_close(y);
    return same;
}

static void test_resume_threads_config(void) {
    setup();
    /* an own item table, the options from a JSON file (keys with '_' or '-') */
    char cfg[300];
    snprintf(cfg, sizeof cfg, "%s/seq.json", dir);
    FILE *f = fopen(cfg, "w");
    CHECK(f != NULL);
    if (!f) return;
    fprintf(f, "{\"seq_cand\": \"C10\", \"seq_rows\": 50, \"seq-blocks\": \"jattn:causal,gdpa:gelu,hsp,swa:4\", "
               "\"seq_heads\": 4, \"seq_max\": 32, \"seq_hsp\": [3, 2, 2], \"dim\": 16, \"bot\": [13, 32, 16]}\n");
    fclose(f);
    char tr[1024];
    snprintf(tr, sizeof tr, "--config %s/seq.json --train %s/d/train.tsv --train-limit 8000 --rows %s --batch 100 "
             "--dense-opt adam --lr 0.01 --sparse-opt rowwise_adagrad --quiet", dir, dir, CARD);
    CHECK(run("%s train %s --max-steps 40 --out %s/full > %s/full.log 2>&1", bin, tr, dir, dir) == 0);
    CHECK(run("%s train %s --max-steps 20 --out %s/half > /dev/null 2>&1", bin, tr, dir) == 0);
    CHECK(run("%s train %s --max-steps 40 --out %s/half --resume %s/half/checkpoint.safetensors > /dev/null 2>&1", bin, tr,
              dir, dir) == 0);
    char a[512], b[512];
    snprintf(a, sizeof a, "%s/full/checkpoint.safetensors", dir);
    snprintf(b, sizeof b, "%s/half/checkpoint.safetensors", dir);
    CHECK(same_checkpoint(a, b));
    CHECK(run("%s train %s --max-steps 40 --threads 1 --out %s/t1 > /dev/null 2>&1", bin, tr, dir) == 0);
    CHECK(run("%s train %s --max-steps 40 --threads 3 --out %s/t3 > /dev/null 2>&1", bin, tr, dir) == 0);
    snprintf(b, sizeof b, "%s/t1/checkpoint.safetensors", dir);
    CHECK(same_checkpoint(a, b));
    snprintf(b, sizeof b, "%s/t3/checkpoint.safetensors", dir);
    CHECK(same_checkpoint(a, b));
    em_st *st = NULL;
    CHECK_OK(em_st_open(&st, a));
    const char *js = st ? em_st_meta_get(st, "ember.model") : NULL;
    CHECK(js && strstr(js, "\"share\":0") && strstr(js, "\"rows\":50") && strstr(js, "\"heads\":4") &&
          strstr(js, "\"max_len\":32") && strstr(js, "jattn:causal,gdpa:gelu,hsp,swa:4"));
    CHECK(st && em_st_find(st, "seq.items.weight") && em_st_find(st, "seq.2.kron_w"));
    em_st_close(st);
}

static void test_errors_and_help(void) {
    setup();
    CHECK(run("%s train --help > %s/help.txt", bin, dir) == 0);
    char *h = slurp("%s/help.txt", dir);
    CHECK(h && strstr(h, "--seq-share") && strstr(h, "--seq-blocks") && strstr(h, "compskip:N") && strstr(h, "--seq-heads"));
    free(h);
    const char *bad[][2] = {
        {"--seq 1", "needs the candidate field"},
        {"--seq-share C10 --seq-blocks gdpa:foo", "bad option 'foo'"},
        {"--seq-share C10 --seq-heads 3", "heads"},
        {"--seq-share C99", "categoricals"},
        {"--seq-share C10 --seq-cand C3", "not both"},
        {"--seq-share C10 --top 367-64-1", "sequence vectors"},
        {"--seq-share C10 --seq-act swish", "unknown GDPA activation"},
        {"--seq-share C10 --seq-hsp 4,2", "SEEDS,TOKENS,TERMS"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        CHECK(run("%s train --train %s/d/train.tsv --rows %s --dim 16 --bot 13-64-16 %s --max-steps 1 --out %s/bad "
                  "> %s/bad.log 2>&1", bin, dir, CARD, bad[i][0], dir, dir) == 2);
        char *log = slurp("%s/bad.log", dir);
        if (!log || !strstr(log, bad[i][1])) fprintf(stderr, "  '%s': %s\n", bad[i][0], log ? log : "(no log)");
        CHECK(log && strstr(log, bad[i][1]));
        free(log);
    }
}

static void cleanup(void) {
    if (dir[0] && t_failures == 0) run("rm -rf %s", dir);
}

static void test_cleanup(void) { cleanup(); }

TEST_MAIN({"history_beats_no_history", test_history_beats_no_history}, {"eval_predict", test_eval_predict},
          {"resume_threads_config", test_resume_threads_config}, {"errors_and_help", test_errors_and_help},
          {"cleanup", test_cleanup})
