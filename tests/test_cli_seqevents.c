/*
 * test_cli_seqevents.c - event-level personalization through the `ember` binary:
 *   - `ember gen --seq-type-weights` changes only labels and probabilities (1,2,3 is the
 *     default, byte for byte), and a bad list is refused;
 *   - `ember train --seq-events` trains per-type sub-towers that beat the DLRM without
 *     history, writes the groups into the checkpoint's configuration, and eval and
 *     predict run from that checkpoint; the same spec in a --config JSON file gives the
 *     same model bit for bit; 1 and 3 threads agree bit for bit;
 *   - bad specs exit with status 2 and a message naming the problem; --help shows it.
 */
#include <unistd.h>

#include "cli_util.h"
#include "test.h"

static char dir[256], bin[1024];
static const char *CARD = "9,12,30,5,40,3,8,25,4,60,7,11,20,6,15,50,3,9,13,4,35,6,10,18,5,22";
static const char *model = "--dim 16 --bot 13-64-16 --batch 128 --dense-opt adagrad --sparse-opt rowwise_adagrad --lr 0.02";
static const char *EVENTS = "1,2:w32:h4:gdpa,hsp;0:w8:h1:swa:4";

static void setup(void) {
    if (dir[0]) return;
    const char *b = getenv("EMBER_BIN");
    snprintf(bin, sizeof bin, "%s", b ? b : "../build/ember");
    snprintf(dir, sizeof dir, "/tmp/ember_seqev_XXXXXX");
    CHECK(mkdtemp(dir) != NULL);
    CHECK(run("%s gen --out %s/d --rows 40000 --test-rows 5000 --seed 5 --interaction-scale 0.05 --cardinality %s "
              "--seq-len-mean 20 --seq-scale 2 --seq-type-weights 0.25,1,6 > %s/gen.log 2>&1", bin, dir, CARD, dir) == 0);
    CHECK(run("cut -f1-40 %s/d/train.tsv > %s/d/train0.tsv && cut -f1-40 %s/d/test.tsv > %s/d/test0.tsv", dir, dir, dir,
              dir) == 0);
}

static void test_gen_type_weights(void) {
    setup();
    CHECK(run("%s gen --out %s/g1 --rows 2000 --test-rows 500 --seed 5 --seq-len-mean 10 > /dev/null 2>&1", bin, dir) == 0);
    CHECK(run("%s gen --out %s/g2 --rows 2000 --test-rows 500 --seed 5 --seq-len-mean 10 --seq-type-weights 1,2,3 "
              "> /dev/null 2>&1", bin, dir) == 0);
    CHECK(run("%s gen --out %s/g3 --rows 2000 --test-rows 500 --seed 5 --seq-len-mean 10 --seq-type-weights 0,0,5 "
              "> /dev/null 2>&1", bin, dir) == 0);
    CHECK(run("cmp -s %s/g1/train.tsv %s/g2/train.tsv && cmp -s %s/g1/test.prob %s/g2/test.prob", dir, dir, dir, dir) == 0);
    CHECK(run("cmp -s %s/g1/test.prob %s/g3/test.prob", dir, dir) != 0);
    /* only the labels differ: every other column is the same */
    CHECK(run("cut -f2- %s/g1/train.tsv > %s/c1 && cut -f2- %s/g3/train.tsv > %s/c3 && cmp -s %s/c1 %s/c3", dir, dir, dir,
              dir, dir, dir) == 0);
    CHECK(run("%s gen --out %s/g4 --rows 10 --seq-len-mean 10 --seq-type-weights 1,2 > %s/g4.log 2>&1", bin, dir, dir) == 2);
    char *log = slurp("%s/g4.log", dir);
    CHECK(log && strstr(log, "--seq-type-weights: expected three weights"));
    free(log);
}

static void test_train_eval_predict(void) {
    setup();
    CHECK(run("%s train --train %s/d/train.tsv --test %s/d/test.tsv --test-prob %s/d/test.prob --rows %s %s --seq-share C10 "
              "--seq-events '%s' --out %s/ev --quiet > %s/ev.log 2>&1", bin, dir, dir, dir, CARD, model, EVENTS, dir,
              dir) == 0);
    CHECK(run("%s train --train %s/d/train0.tsv --test %s/d/test0.tsv --rows %s %s --out %s/base --quiet > %s/base.log 2>&1",
              bin, dir, dir, CARD, model, dir, dir) == 0);
    char *re = slurp("%s/ev/report.json", dir), *rb = slurp("%s/base/report.json", dir);
    double auc = report_num(re, "\"test\"", "auc"), base = report_num(rb, "\"test\"", "auc"),
           best = report_num(re, "\"optimum\"", "auc");
    fprintf(stderr, "  test AUC with per-type sub-towers %.4f, without history %.4f, optimum %.4f\n", auc, base, best);
    CHECK(auc > base + 0.03 && auc < best + 0.005);
    CHECK(re && strstr(re, "\"events\":\"1,2:w32:h4:gdpa:silu,hsp;0:w8:h1:swa:4\""));
    free(re), free(rb);
    char *log = slurp("%s/ev.log", dir);
    CHECK(log && strstr(log, "event groups 1,2:w32:h4:gdpa:silu,hsp;0:w8:h1:swa:4, 4 vectors into the interaction"));
    free(log);
    /* eval and predict from the checkpoint */
    CHECK(run("%s eval --model %s/ev/checkpoint.safetensors --test %s/d/test.tsv > %s/eval.json 2>&1", bin, dir, dir, dir) ==
          0);
    char *ev = slurp("%s/eval.json", dir);
    double eauc = report_num(ev, "{", "auc");
    CHECK(fabs(eauc - auc) < 1e-4); /* other batch sizes: float rounding only */
    free(ev);
    CHECK(run("head -n 20 %s/d/test.tsv > %s/l.tsv && %s predict --model %s/ev/checkpoint.safetensors --input %s/l.tsv "
              "--output %s/p.txt && test $(wc -l < %s/p.txt) -eq 20", dir, dir, bin, dir, dir, dir, dir) == 0);
}

static void test_config_and_threads(void) {
    setup();
    const char *tr = "--train-limit 6000 --max-steps 30";
    CHECK(run("%s train --train %s/d/train.tsv --rows %s %s %s --seq-share C10 --seq-events '%s' --threads 1 --out %s/t1 "
              "--quiet > /dev/null 2>&1", bin, dir, CARD, model, tr, EVENTS, dir) == 0);
    CHECK(run("%s train --train %s/d/train.tsv --rows %s %s %s --seq-share C10 --seq-events '%s' --threads 3 --out %s/t3 "
              "--quiet > /dev/null 2>&1", bin, dir, CARD, model, tr, EVENTS, dir) == 0);
    char path[400];
    snprintf(path, sizeof path, "%s/cfg.json", dir);
    FILE *c = fopen(path, "w");
    CHECK(c != NULL);
    if (c) {
        fprintf(c, "{\"seq-share\": \"C10\", \"seq-events\": \"%s\", \"threads\": 1}\n", EVENTS);
        fclose(c);
    }
    CHECK(run("%s train --config %s --train %s/d/train.tsv --rows %s %s %s --out %s/cj --quiet > /dev/null 2>&1", bin, path,
              dir, CARD, model, tr, dir) == 0);
    CHECK(run("cmp -s %s/t1/checkpoint.safetensors %s/t3/checkpoint.safetensors", dir, dir) == 0);
    CHECK(run("cmp -s %s/t1/checkpoint.safetensors %s/cj/checkpoint.safetensors", dir, dir) == 0);
}

static void test_errors_and_help(void) {
    setup();
    struct {
        const char *spec, *msg;
    } bad[] = {{"0:w32:h3", "3 heads do not divide its width 32"},
               {"0;0", "type 0 is in groups 1 and 2"},
               {"5:w8", "only 4 event types"},
               {"0:gdpa:w8", "bad option 'w8'"}};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        CHECK(run("%s train --train %s/d/train.tsv --rows %s --seq-share C10 --seq-events '%s' --max-steps 1 --out %s/bad "
                  "> %s/bad.log 2>&1", bin, dir, CARD, bad[i].spec, dir, dir) == 2);
        char *log = slurp("%s/bad.log", dir);
        CHECK(log && strstr(log, "--seq-events") && strstr(log, bad[i].msg));
        if (log && !strstr(log, bad[i].msg)) fprintf(stderr, "  '%s': %s", bad[i].spec, log);
        free(log);
    }
    CHECK(run("%s train --help > %s/help.txt 2>&1", bin, dir) == 0);
    char *h = slurp("%s/help.txt", dir);
    CHECK(h && strstr(h, "--seq-events") && strstr(h, "TYPES[:wW][:hH][:BLOCKS]"));
    free(h);
    if (t_failures == 0) run("rm -rf %s", dir);
}

TEST_MAIN({"gen_type_weights", test_gen_type_weights}, {"train_eval_predict", test_train_eval_predict},
          {"config_and_threads", test_config_and_threads}, {"errors_and_help", test_errors_and_help})
