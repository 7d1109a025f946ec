/*
 * test_cli_ssd.c - SSD-tier tables end to end through the `ember` binary: train
 * --tables ssd with a row cache far smaller than the tables gives the dynamic kind's
 * test metrics exactly; eval, predict and inspect of its checkpoint (tables in
 * CKPT.ssd); training prefetches the next batch's rows (the checkpoint's counters); an
 * exact --resume; the scratch stores are gone when the processes end;
 * option errors.
 */
#include <dirent.h>
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
    snprintf(dir, sizeof dir, "/tmp/ember_ssd_XXXXXX");
    CHECK(mkdtemp(dir) != NULL);
    CHECK(run("%s gen --out %s/data --rows 20000 --test-rows 4000 --seed 3 --cardinality "
              "9,12,30,5,40,3,8,25,4,60,7,11,20,6,15,50,3,9,13,4,35,6,10,18,5,100000 > %s/gen.log 2>&1",
              bin, dir, dir) == 0);
}

/* Entries of DIR/store (the scratch stores of live processes): none once they end. */
static int store_entries(void) {
    char p[512];
    snprintf(p, sizeof p, "%s/store", dir);
    DIR *d = opendir(p);
    if (!d) return 0;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) n++;
    closedir(d);
    return n;
}

static void test_train_eval_inspect(void) {
    setup();
    CHECK(run("%s train --train %s/data/train.tsv --test %s/data/test.tsv %s --tables ssd --ssd-dir %s/store "
              "--ssd-cache-mb 1 --out %s/ssd > %s/ssd.log 2>&1",
              bin, dir, dir, model, dir, dir, dir) == 0);
    CHECK(run("%s train --train %s/data/train.tsv --test %s/data/test.tsv %s --tables dynamic --out %s/dyn > %s/dyn.log "
              "2>&1",
              bin, dir, dir, model, dir, dir) == 0);
    CHECK(store_entries() == 0);
    char *rs = slurp("%s/ssd/report.json", dir), *rd = slurp("%s/dyn/report.json", dir);
    double auc = report_num(rs, "\"test\"", "auc");
    fprintf(stderr, "  ssd: test AUC %.5f, logloss %.6f\n", auc, report_num(rs, "\"test\"", "logloss"));
    CHECK(auc > 0.6 && auc == report_num(rd, "\"test\"", "auc"));
    CHECK(report_num(rs, "\"test\"", "logloss") == report_num(rd, "\"test\"", "logloss"));
    CHECK(rs && strstr(rs, "\"ssd_dir\""));
    free(rs), free(rd);
    char *log = slurp("%s/ssd.log", dir);
    CHECK(log && strstr(log, "tables: ssd,") && strstr(log, "hit rate"));
    free(log);
    struct stat sb;
    char p[512];
    snprintf(p, sizeof p, "%s/ssd/checkpoint.safetensors.ssd/ssd.meta", dir);
    CHECK(stat(p, &sb) == 0);
    /* training looked one batch ahead: the prefetch loaded rows that forwards then found
     * (ssd.counts: 5 prefetch hits, 8 prefetched) */
    em_st *meta = NULL;
    CHECK_OK(em_st_open(&meta, p));
    const int64_t *cnt = meta ? em_st_expect(meta, "ssd.counts", EM_I64, 11) : NULL;
    CHECK(cnt && cnt[8] > 0 && cnt[5] > 0 && cnt[5] <= cnt[8]);
    if (cnt) fprintf(stderr, "  ssd: prefetched %lld rows, %lld found by a forward\n", (long long)cnt[8], (long long)cnt[5]);
    em_st_close(meta);
    /* eval and predict of the checkpoint */
    CHECK(run("%s eval --model %s/ssd/checkpoint.safetensors --test %s/data/test.tsv > %s/ssd.eval 2>&1", bin, dir, dir,
              dir) == 0);
    char *ev = slurp("%s/ssd.eval", dir);
    CHECK(ev && fabs(report_num(ev, "{", "auc") - auc) < 1e-4);
    free(ev);
    CHECK(run("head -n 200 %s/data/test.tsv | cut -f2- > %s/nolabel.tsv", dir, dir) == 0);
    for (int k = 0; k < 2; k++)
        CHECK(run("%s predict --model %s/%s/checkpoint.safetensors --input %s/nolabel.tsv --output %s/%s.pred", bin, dir,
                  k ? "dyn" : "ssd", dir, dir, k ? "dyn" : "ssd") == 0);
    CHECK(run("cmp -s %s/ssd.pred %s/dyn.pred", dir, dir) == 0);
    /* inspect */
    CHECK(run("%s inspect %s/ssd/checkpoint.safetensors --json > %s/ssd.json 2>&1", bin, dir, dir) == 0);
    char *js = slurp("%s/ssd.json", dir);
    CHECK(js && strstr(js, "\"kind\": \"ssd\"") && !strstr(js, "\"hit_rate\": null"));
    double rows = report_num(js, "\"all\"", "rows");
    fprintf(stderr, "  ssd: %.0f rows, hit rate %.4f\n", rows, report_num(js, "\"all\"", "hit_rate"));
    CHECK(rows > 1000);
    free(js);
    CHECK(store_entries() == 0);
}

static void test_resume_bitwise(void) {
    setup();
    char tr[1024];
    snprintf(tr, sizeof tr, "--train %s/data/train.tsv %s --tables ssd --ssd-dir %s/store --ssd-cache-mb 1", dir, model,
             dir);
    CHECK(run("%s train %s --max-steps 130 --out %s/full > /dev/null 2>&1", bin, tr, dir) == 0);
    CHECK(run("%s train %s --max-steps 50 --out %s/half > /dev/null 2>&1", bin, tr, dir) == 0);
    CHECK(run("%s train %s --max-steps 130 --out %s/half --resume %s/half/checkpoint.safetensors > /dev/null 2>&1", bin, tr,
              dir, dir) == 0);
    /* the same predictions and the same dense tensors */
    for (int k = 0; k < 2; k++)
        CHECK(run("%s predict --model %s/%s/checkpoint.safetensors --input %s/nolabel.tsv --output %s/%s.pred", bin, dir,
                  k ? "half" : "full", dir, dir, k ? "half" : "full") == 0);
    CHECK(run("cmp -s %s/full.pred %s/half.pred", dir, dir) == 0);
    char a[512], b[512];
    snprintf(a, sizeof a, "%s/full/checkpoint.safetensors", dir);
    snprintf(b, sizeof b, "%s/half/checkpoint.safetensors", dir);
    em_st *x = NULL, *y = NULL;
    int same = em_st_open(&x, a) == EM_OK && em_st_open(&y, b) == EM_OK && em_st_count(x) == em_st_count(y);
    for (int i = 0; same && i < em_st_count(x); i++) {
        const em_st_tensor *t = em_st_at(x, i), *u = em_st_find(y, t->name);
        size_t nb = em_dtype_size(t->dtype);
        for (int d = 0; d < t->ndim; d++) nb *= (size_t)t->shape[d];
        same = u && memcmp(t->data, u->data, nb) == 0;
    }
    CHECK(same && !strcmp(em_st_meta_get(x, "ember.ssd_step"), "130") &&
          !strcmp(em_st_meta_get(y, "ember.ssd_step"), "130"));
    em_st_close(x), em_st_close(y);
    CHECK(store_entries() == 0);
}

static void test_option_errors(void) {
    setup();
    char d[600];
    snprintf(d, sizeof d, "--train %s/data/train.tsv --out %s/err --max-steps 1 --quiet", dir, dir);
    CHECK(run("%s train %s --tables ssd > /dev/null 2>&1", bin, d) == 2);
    CHECK(run("%s train %s --tables dynamic --ssd-cache-mb 4 > /dev/null 2>&1", bin, d) == 2);
    CHECK(run("%s train %s --tables ssd --ssd-dir %s/store --ssd-policy mru > /dev/null 2>&1", bin, d, dir) == 2);
    CHECK(run("%s train %s --tables ssd --ssd-dir %s/store --ssd-policy lfu > /dev/null 2>&1", bin, d, dir) == 0);
}

static void test_cleanup(void) {
    if (dir[0]) run("rm -rf %s", dir);
}

TEST_MAIN({"train_eval_inspect", test_train_eval_inspect}, {"resume_bitwise", test_resume_bitwise},
          {"option_errors", test_option_errors}, {"cleanup", test_cleanup})
