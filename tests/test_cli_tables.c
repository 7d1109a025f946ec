/*
 * test_cli_tables.c - the embedding backends end to end through the `ember` binary:
 * train --tables dynamic|fiited on generated data, eval / predict / inspect of their
 * checkpoints, exact --resume (a dynamic table's rows compared by id, since a resumed
 * table numbers its slots afresh), the dynamic row budget seen by inspect, and option
 * errors.
 */
#include <sys/stat.h>
#include <unistd.h>

#include "cli_util.h"
#include "test.h"

static char dir[256], bin[1024];
static const char *model = "--rows 9,12,30,5,40,3,8,25,4,60,7,11,20,6,15,50,3,9,13,4,35,6,10,18,5,2000 --dim 8 "
                           "--bot 13-32-8 --top 359-32-1 --batch 100 --dense-opt adam --lr 0.01 "
                           "--sparse-opt rowwise_adagrad --quiet";

static void setup(void) {
    if (dir[0]) return;
    const char *b = getenv("EMBER_BIN");
    snprintf(bin, sizeof bin, "%s", b ? b : "../build/ember");
    snprintf(dir, sizeof dir, "/tmp/ember_tables_XXXXXX");
    CHECK(mkdtemp(dir) != NULL);
    CHECK(run("%s gen --out %s/data --rows 20000 --test-rows 4000 --seed 3 --cardinality "
              "9,12,30,5,40,3,8,25,4,60,7,11,20,6,15,50,3,9,13,4,35,6,10,18,5,100000 > %s/gen.log 2>&1",
              bin, dir, dir) == 0);
}

static const char *kind_opts(int dyn) {
    return dyn ? "--tables dynamic --dyn-rows 3000 --dyn-evict lfu"
               : "--tables fiited --fiited-chunks 4 --fiited-budget 0.3 --fiited-prune-every 20";
}

static void test_train_eval_inspect(void) {
    setup();
    for (int dyn = 0; dyn < 2; dyn++) {
        const char *k = dyn ? "dynamic" : "fiited";
        CHECK(run("%s train --train %s/data/train.tsv --test %s/data/test.tsv %s %s --out %s/%s > %s/%s.log 2>&1", bin,
                  dir, dir, model, kind_opts(dyn), dir, k, dir, k) == 0);
        char *rep = slurp("%s/%s/report.json", dir, k);
        double auc = report_num(rep, "\"test\"", "auc");
        fprintf(stderr, "  %s: test AUC %.4f\n", k, auc);
        CHECK(auc > 0.6);
        CHECK(rep && strstr(rep, k));
        free(rep);
        char *log = slurp("%s/%s.log", dir, k);
        CHECK(log && strstr(log, dyn ? "tables: dynamic," : "tables: fiited,"));
        free(log);
        /* eval of the checkpoint gives the training run's final AUC */
        CHECK(run("%s eval --model %s/%s/checkpoint.safetensors --test %s/data/test.tsv > %s/%s.eval 2>&1", bin, dir, k,
                  dir, dir, k) == 0);
        char *ev = slurp("%s/%s.eval", dir, k);
        CHECK(ev && fabs(report_num(ev, "{", "auc") - auc) < 1e-4);
        free(ev);
        /* predict reads raw ids for dynamic tables */
        CHECK(run("head -n 50 %s/data/test.tsv | cut -f2- > %s/nolabel.tsv", dir, dir) == 0);
        CHECK(run("%s predict --model %s/%s/checkpoint.safetensors --input %s/nolabel.tsv --output %s/%s.pred", bin, dir,
                  k, dir, dir, k) == 0);
        char *pred = slurp("%s/%s.pred", dir, k);
        int lines = 0, nans = 0;
        for (char *q = pred; q && *q; q++) lines += *q == '\n';
        nans = pred && strstr(pred, "nan") != NULL;
        CHECK(lines == 50 && !nans);
        free(pred);
        /* inspect: text and JSON */
        CHECK(run("%s inspect %s/%s/checkpoint.safetensors > %s/%s.ins 2>&1", bin, dir, k, dir, k) == 0);
        char *ins = slurp("%s/%s.ins", dir, k);
        CHECK(ins && strstr(ins, dyn ? "dynamic tables" : "fiited tables") && strstr(ins, "live_chunks"));
        free(ins);
        CHECK(run("%s inspect %s/%s/checkpoint.safetensors --json > %s/%s.json 2>&1", bin, dir, k, dir, k) == 0);
        char *js = slurp("%s/%s.json", dir, k);
        CHECK(js && strstr(js, dyn ? "\"kind\": \"dynamic\"" : "\"kind\": \"fiited\""));
        double rows = report_num(js, "\"all\"", "rows"), bytes = report_num(js, "\"all\"", "bytes");
        double live = report_num(js, "\"all\"", "live_chunks"), chunks = report_num(js, "\"all\"", "chunks");
        fprintf(stderr, "  %s: %.0f rows, %.0f bytes, %.0f/%.0f chunks\n", k, rows, bytes, live, chunks);
        CHECK(rows > 100 && bytes > 1000);
        if (dyn) CHECK(report_num(js, "\"per_table\"", "rows") <= 3000 && report_num(js, "\"table\": 25", "rows") <= 3000);
        else CHECK(live <= 0.3 * chunks + 1 && live > 0.2 * chunks);
        CHECK(js && strstr(js, "\"hit_rate\": null"));
        free(js);
    }
    /* the dense model's inspect still works */
    CHECK(run("%s train --train %s/data/train.tsv %s --max-steps 20 --out %s/dense > /dev/null 2>&1", bin, dir, model,
              dir) == 0);
    CHECK(run("%s inspect %s/dense/checkpoint.safetensors --json > %s/dense.json 2>&1", bin, dir, dir) == 0);
    char *js = slurp("%s/dense.json", dir);
    CHECK(js && strstr(js, "\"kind\": \"dense\"") && report_num(js, "\"all\"", "rows") == 2408);
    free(js);
}

/* Tensor `name` of file f, sorted rows keyed by the ids of tensor `ids` (both n rows). */
static int same_dyn_tables(const char *a, const char *b) {
    em_st *x = NULL, *y = NULL;
    int same = em_st_open(&x, a) == EM_OK && em_st_open(&y, b) == EM_OK;
    for (int t = 0; same && t < 26; t++) {
        char nm[48];
        snprintf(nm, sizeof nm, "dyn.%d.ids", t);
        const em_st_tensor *ia = em_st_find(x, nm), *ib = em_st_find(y, nm);
        same = ia && ib && ia->shape[0] == ib->shape[0];
        if (!same) break;
        const int64_t n = ia->shape[0];
        const uint64_t *ida = ia->data, *idb = ib->data;
        const char *parts[] = {"rows", "count", "last", "state"};
        for (int p = 0; same && p < 4; p++) {
            snprintf(nm, sizeof nm, "dyn.%d.%s", t, parts[p]);
            const em_st_tensor *ta = em_st_find(x, nm), *tb = em_st_find(y, nm);
            same = ta && tb;
            if (!same) break;
            size_t w = em_dtype_size(ta->dtype) * (size_t)(ta->ndim == 2 ? ta->shape[1] : 1);
            /* match each row of a to b's row with the same id (quadratic: small tables) */
            for (int64_t i = 0; same && i < n; i++) {
                int64_t j = 0;
                while (j < n && idb[j] != ida[i]) j++;
                same = j < n && memcmp((const char *)ta->data + (size_t)i * w, (const char *)tb->data + (size_t)j * w, w) == 0;
            }
        }
    }
    same = same && !strcmp(em_st_meta_get(x, "ember.step"), em_st_meta_get(y, "ember.step"));
    for (int i = 0; same && i < em_st_count(x); i++) { /* everything else bitwise */
        const em_st_tensor *t = em_st_at(x, i), *u = em_st_find(y, t->name);
        if (!strncmp(t->name, "dyn.", 4)) continue;
        size_t nb = em_dtype_size(t->dtype);
        for (int d = 0; d < t->ndim; d++) nb *= (size_t)t->shape[d];
        same = u && memcmp(t->data, u->data, nb) == 0;
    }
    em_st_close(x), em_st_close(y);
    return same;
}

static int same_file_tensors(const char *a, const char *b) {
    em_st *x = NULL, *y = NULL;
    int same = em_st_open(&x, a) == EM_OK && em_st_open(&y, b) == EM_OK && em_st_count(x) == em_st_count(y);
    for (int i = 0; same && i < em_st_count(x); i++) {
        const em_st_tensor *t = em_st_at(x, i), *u = em_st_find(y, t->name);
        size_t nb = em_dtype_size(t->dtype);
        for (int d = 0; d < t->ndim; d++) nb *= (size_t)t->shape[d];
        same = u && u->dtype == t->dtype && memcmp(t->data, u->data, nb) == 0;
        if (!same) fprintf(stderr, "  tensor %s differs\n", t->name);
    }
    em_st_close(x), em_st_close(y);
    return same;
}

static void test_resume_bitwise(void) {
    setup();
    for (int dyn = 0; dyn < 2; dyn++) {
        char tr[1024], a[512], b[512];
        snprintf(tr, sizeof tr, "--train %s/data/train.tsv %s %s --dyn-rows 800", dir, model, kind_opts(dyn));
        if (!dyn) snprintf(tr, sizeof tr, "--train %s/data/train.tsv %s %s", dir, model, kind_opts(dyn));
        CHECK(run("%s train %s --max-steps 130 --out %s/full%d > /dev/null 2>&1", bin, tr, dir, dyn) == 0);
        CHECK(run("%s train %s --max-steps 50 --out %s/half%d > /dev/null 2>&1", bin, tr, dir, dyn) == 0);
        CHECK(run("%s train %s --max-steps 130 --out %s/half%d --resume %s/half%d/checkpoint.safetensors > /dev/null 2>&1",
                  bin, tr, dir, dyn, dir, dyn) == 0);
        snprintf(a, sizeof a, "%s/full%d/checkpoint.safetensors", dir, dyn);
        snprintf(b, sizeof b, "%s/half%d/checkpoint.safetensors", dir, dyn);
        CHECK(dyn ? same_dyn_tables(a, b) : same_file_tensors(a, b));
        /* and 3 threads give the same bits as 2 */
        CHECK(run("%s train %s --max-steps 130 --threads 3 --out %s/t3_%d > /dev/null 2>&1", bin, tr, dir, dyn) == 0);
        snprintf(b, sizeof b, "%s/t3_%d/checkpoint.safetensors", dir, dyn);
        CHECK(dyn ? same_dyn_tables(a, b) : same_file_tensors(a, b));
    }
}

static void test_option_errors(void) {
    setup();
    const char *tr = "--max-steps 1 --quiet";
    char d[600];
    snprintf(d, sizeof d, "--train %s/data/train.tsv --out %s/err", dir, dir);
    CHECK(run("%s train %s %s --tables sparse > /dev/null 2>&1", bin, d, tr) == 2);
    CHECK(run("%s train %s %s --dyn-rows 10 > /dev/null 2>&1", bin, d, tr) == 2);
    CHECK(run("%s train %s %s --tables dynamic --fiited-chunks 2 > /dev/null 2>&1", bin, d, tr) == 2);
    CHECK(run("%s train %s %s --tables fiited --fiited-budget lots > /dev/null 2>&1", bin, d, tr) == 2);
    CHECK(run("%s train %s %s --tables fiited --dim 8 --bot 13-8 --fiited-chunks 3 > /dev/null 2>&1", bin, d, tr) == 2);
    CHECK(run("%s train %s %s --tables dynamic --dyn-admit-count 2 --dyn-admit-prob 0.5 > /dev/null 2>&1", bin, d, tr) == 2);
    /* quantized evaluation needs dense tables */
    struct stat sb;
    char ck[512];
    snprintf(ck, sizeof ck, "%s/dynamic/checkpoint.safetensors", dir);
    if (stat(ck, &sb) == 0)
        CHECK(run("%s eval --model %s --test %s/data/test.tsv --tables int8 > /dev/null 2>&1", bin, ck, dir) == 2);
    CHECK(run("%s inspect > /dev/null 2>&1", bin) == 2);
    CHECK(run("%s inspect %s/data/train.tsv > /dev/null 2>&1", bin, dir) == 1);
}

static void test_cleanup(void) {
    if (dir[0]) run("rm -rf %s", dir);
}

TEST_MAIN({"train_eval_inspect", test_train_eval_inspect}, {"resume_bitwise", test_resume_bitwise},
          {"option_errors", test_option_errors}, {"cleanup", test_cleanup})
