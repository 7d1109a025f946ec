/*
 * test_cli_e2e.c - the `ember` binary end to end, as a user runs it:
 *   - gen + train on small generated data (few ids per field, tables of exactly the
 *     fields' cardinalities, weak pairwise term, so 200k rows x 2 epochs suffice)
 *     reaches a test AUC within 0.01 of the planted optimum;
 *   - exact resume: N steps, then resume to 2N == 2N uninterrupted (bitwise), and a
 *     run killed with SIGKILL after a checkpoint resumes to the same final model;
 *   - 1, 2 and 3 threads train bitwise the same model;
 *   - malformed lines are counted and reported with file:line; --strict stops;
 *   - predict writes one probability per line; eval refuses a corrupt checkpoint.
 */
#include <signal.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cli_util.h"
#include "test.h"

static char dir[256], bin[1024];
static const char *CARD = "9,12,30,5,40,3,8,25,4,60,7,11,20,6,15,50,3,9,13,4,35,6,10,18,5,22";

static const char *small_model =
    "--rows 9,12,30,5,40,3,8,25,4,60,7,11,20,6,15,50,3,9,13,4,35,6,10,18,5,22 --dim 16 --bot 13-64-16 --top 367-64-1";

static void setup(void) {
    if (dir[0]) return;
    const char *b = getenv("EMBER_BIN");
    snprintf(bin, sizeof bin, "%s", b ? b : "../build/ember");
    snprintf(dir, sizeof dir, "/tmp/ember_e2e_XXXXXX");
    CHECK(mkdtemp(dir) != NULL);
    CHECK(run("%s gen --out %s/data --rows 200000 --test-rows 20000 --seed 5 --interaction-scale 0.05 --cardinality %s > %s/gen.log 2>&1", bin,
              dir, CARD, dir) == 0);
}

static void test_train_reaches_optimum(void) {
    setup();
    CHECK(run("%s train --train %s/data/train.tsv --test %s/data/test.tsv --test-prob %s/data/test.prob --out %s/run "
              "%s --batch 128 --dense-opt adagrad --sparse-opt rowwise_adagrad --lr 0.02 --epochs 2 --quiet > %s/train.log 2>&1",
              bin, dir, dir, dir, dir, small_model, dir) == 0);
    char p[512];
    snprintf(p, sizeof p, "%s/run/report.json", dir);
    char *rep = slurp("%s", p);
    CHECK(rep != NULL);
    if (!rep) return;
    double auc = report_num(rep, "\"test\"", "auc"), best = report_num(rep, "\"optimum\"", "auc");
    fprintf(stderr, "  test AUC %.4f, planted optimum %.4f\n", auc, best);
    CHECK(best > 0.7);
    CHECK(auc > best - 0.01);
    free(rep);
    struct stat sb;
    snprintf(p, sizeof p, "%s/run/report.html", dir);
    CHECK(stat(p, &sb) == 0 && sb.st_size > 1000);
    snprintf(p, sizeof p, "%s/run/checkpoint.safetensors", dir);
    CHECK(stat(p, &sb) == 0 && sb.st_size > 0);
    /* predict: one line per input line */
    CHECK(run("head -n 100 %s/data/test.tsv | cut -f2- > %s/nolabel.tsv", dir, dir) == 0);
    CHECK(run("%s predict --model %s --input %s/nolabel.tsv --output %s/pred.txt", bin, p, dir, dir) == 0);
    snprintf(p, sizeof p, "%s/pred.txt", dir);
    char *pred = slurp("%s", p);
    int lines = 0;
    for (char *q = pred; q && *q; q++) lines += *q == '\n';
    CHECK(lines == 100);
    free(pred);
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
    const char *s1 = x ? em_st_meta_get(x, "ember.step") : NULL, *s2 = y ? em_st_meta_get(y, "ember.step") : NULL;
    same = same && s1 && s2 && strcmp(s1, s2) == 0;
    em_st_close(x);
    em_st_close(y);
    return same;
}

static void test_resume_bitwise(void) {
    setup();
    const char *common = "--batch 200 --dense-opt adam --lr 0.01 --sparse-opt rowwise_adagrad --quiet";
    char tr[512];
    snprintf(tr, sizeof tr, "--train %s/data/train.tsv --train-limit 30000 %s %s", dir, small_model, common);
    CHECK(run("%s train %s --max-steps 60 --out %s/full > /dev/null 2>&1", bin, tr, dir) == 0);
    CHECK(run("%s train %s --max-steps 30 --out %s/half > /dev/null 2>&1", bin, tr, dir) == 0);
    CHECK(run("%s train %s --max-steps 60 --out %s/half --resume %s/half/checkpoint.safetensors > /dev/null 2>&1", bin,
              tr, dir, dir) == 0);
    char a[512], b[512];
    snprintf(a, sizeof a, "%s/full/checkpoint.safetensors", dir);
    snprintf(b, sizeof b, "%s/half/checkpoint.safetensors", dir);
    CHECK(same_checkpoint(a, b));
    /* every kernel is thread-count independent, so 1 and 3 threads give the same bits */
    CHECK(run("%s train %s --max-steps 60 --threads 1 --out %s/t1 > /dev/null 2>&1", bin, tr, dir) == 0);
    CHECK(run("%s train %s --max-steps 60 --threads 3 --out %s/t3 > /dev/null 2>&1", bin, tr, dir) == 0);
    snprintf(b, sizeof b, "%s/t1/checkpoint.safetensors", dir);
    CHECK(same_checkpoint(a, b));
    snprintf(b, sizeof b, "%s/t3/checkpoint.safetensors", dir);
    CHECK(same_checkpoint(a, b));

    /* SIGKILL after the first periodic checkpoint, then resume to the end of the epoch. */
    CHECK(run("%s train %s --out %s/whole > /dev/null 2>&1", bin, tr, dir) == 0);
    char kdir[512], ck[600];
    snprintf(kdir, sizeof kdir, "%s/killed", dir);
    snprintf(ck, sizeof ck, "%s/checkpoint.safetensors", kdir);
    pid_t pid = fork();
    if (pid == 0) {
        char cmd[4096];
        snprintf(cmd, sizeof cmd, "exec %s train %s --ckpt-every 40 --out %s > /dev/null 2>&1", bin, tr, kdir);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    struct stat sb;
    int waited = 0, status = 0;
    while (stat(ck, &sb) != 0 && waited < 6000) usleep(5000), waited++;
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    int killed = WIFSIGNALED(status);
    fprintf(stderr, "  run %s before finishing\n", killed ? "killed" : "was NOT killed (finished first)");
    CHECK(stat(ck, &sb) == 0);
    CHECK(run("%s train %s --out %s --resume %s > /dev/null 2>&1", bin, tr, kdir, ck) == 0);
    snprintf(a, sizeof a, "%s/whole/checkpoint.safetensors", dir);
    CHECK(same_checkpoint(a, ck));
}

static void test_malformed_and_corrupt(void) {
    setup();
    char p[512];
    snprintf(p, sizeof p, "%s/bad.tsv", dir);
    CHECK(run("head -n 500 %s/data/train.tsv > %s && sed -i '3s/^./7/; 10s/\\t[^\\t]*$/\\tzz9/' %s", dir, p, p) == 0);
    CHECK(run("%s train --train %s %s --quiet --out %s/badrun > %s/bad.log 2>&1", bin, p, small_model, dir, dir) == 0);
    snprintf(p, sizeof p, "%s/bad.log", dir);
    char *log = slurp("%s", p);
    CHECK(log && strstr(log, "2 malformed") && strstr(log, "bad.tsv:3"));
    free(log);
    snprintf(p, sizeof p, "%s/bad.tsv", dir);
    CHECK(run("%s train --train %s %s --quiet --strict --out %s/badrun2 > %s/strict.log 2>&1", bin, p, small_model, dir,
              dir) != 0);
    snprintf(p, sizeof p, "%s/strict.log", dir);
    log = slurp("%s", p);
    CHECK(log && strstr(log, "bad.tsv:3"));
    free(log);
    /* a corrupt checkpoint is refused with a clear error, not a crash */
    CHECK(run("cp %s/badrun/checkpoint.safetensors %s/c.st && printf 'garbage' | dd of=%s/c.st bs=1 seek=5000 "
              "conv=notrunc 2>/dev/null", dir, dir, dir) == 0);
    CHECK(run("%s eval --model %s/c.st --test %s/data/test.tsv > %s/c.log 2>&1", bin, dir, dir, dir) == 1);
    snprintf(p, sizeof p, "%s/c.log", dir);
    log = slurp("%s", p);
    CHECK(log && strstr(log, "c.st"));
    free(log);
    CHECK(run("%s train --bogus 1 > /dev/null 2>&1", bin) == 2);
    CHECK(run("%s train --help > /dev/null", bin) == 0);
}

/* The binary format is the same data: training on `ember convert`'s output gives
 * bitwise the parameters of training on the TSV. And the numpy-only reader
 * (tools/read_checkpoint.py) reads a real checkpoint. */
static void test_binary_format_and_numpy_reader(void) {
    setup();
    char tr[512];
    snprintf(tr, sizeof tr, "%s --batch 100 --max-steps 40 --quiet", small_model);
    CHECK(run("%s convert %s/data/train.tsv %s/train.bin > /dev/null", bin, dir, dir) == 0);
    CHECK(run("%s train --train %s/data/train.tsv %s --out %s/tsvrun > /dev/null 2>&1", bin, dir, tr, dir) == 0);
    CHECK(run("%s train --train %s/train.bin %s --out %s/binrun > /dev/null 2>&1", bin, dir, tr, dir) == 0);
    char a[512], b[512];
    snprintf(a, sizeof a, "%s/tsvrun/checkpoint.safetensors", dir);
    snprintf(b, sizeof b, "%s/binrun/checkpoint.safetensors", dir);
    CHECK(same_checkpoint(a, b));
    const char *src = getenv("EMBER_SRC");
    if (run("/usr/bin/python3 -c 'import numpy' 2>/dev/null") != 0) {
        fprintf(stderr, "  (numpy not installed: tools/read_checkpoint.py not run)\n");
        return;
    }
    CHECK(run("/usr/bin/python3 %s/tools/read_checkpoint.py %s > %s/reader.txt 2>&1", src ? src : "..", a, dir) == 0);
    snprintf(b, sizeof b, "%s/reader.txt", dir);
    char *out = slurp("%s", b);
    CHECK(out && strstr(out, "emb.25.weight") && strstr(out, "top.1.bias") && strstr(out, "ember.model"));
    free(out);
}

/* `ember serve` as a user runs it: an ephemeral loopback port, a prediction over
 * HTTP equal to `ember predict`'s, /healthz, then SIGTERM and a clean exit. */
static void test_serve(void) {
    setup();
    char ck[300], log[300];
    snprintf(ck, sizeof ck, "%s/serve_ck", dir);
    CHECK(run("%s train --train %s/data/train.tsv %s --max-steps 20 --quiet --out %s > /dev/null 2>&1", bin, dir,
              small_model, ck) == 0);
    snprintf(log, sizeof log, "%s/serve.log", dir);
    pid_t pid = fork();
    if (pid == 0) {
        char cmd[2048];
        snprintf(cmd, sizeof cmd, "exec %s serve --model %s/checkpoint.safetensors --port 0 > %s 2>&1", bin, ck, log);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    int port = 0;
    for (int waited = 0; waited < 1000 && !port; waited++) {
        usleep(10000);
        char *out = slurp("%s", log);
        const char *p = out ? strstr(out, "127.0.0.1:") : NULL;
        if (p) port = atoi(p + 10);
        free(out);
    }
    CHECK(port > 0);
    if (port > 0) {
        /* the first test line without its label, as JSON, through bash's /dev/tcp */
        CHECK(run("head -n 1 %s/data/test.tsv | cut -f2- > %s/one.tsv", dir, dir) == 0);
        CHECK(run("%s predict --model %s/checkpoint.safetensors --input %s/one.tsv --output %s/one.pred", bin, ck, dir,
                  dir) == 0);
        char p[600];
        snprintf(p, sizeof p, "%s/one.tsv", dir);
        char *line = slurp("%s", p), body[4096];
        size_t k = (size_t)snprintf(body, sizeof body, "{\"examples\":[\"");
        for (const char *q = line; q && *q && *q != '\n' && k < sizeof body - 8; q++) {
            if (*q == '\t') body[k++] = '\\', body[k++] = 't';
            else body[k++] = *q;
        }
        k += (size_t)snprintf(body + k, sizeof body - k, "\"]}");
        free(line);
        snprintf(p, sizeof p, "%s/body.json", dir);
        FILE *bf = fopen(p, "w");
        fwrite(body, 1, k, bf);
        fclose(bf);
        CHECK(run("bash -c 'exec 3<>/dev/tcp/127.0.0.1/%d; printf \"POST /v1/predict HTTP/1.0\\r\\nContent-Type: "
                  "application/json\\r\\nContent-Length: %zu\\r\\n\\r\\n\" >&3; cat %s/body.json >&3; cat <&3' > %s/http.txt",
                  port, k, dir, dir) == 0);
        CHECK(run("bash -c 'exec 3<>/dev/tcp/127.0.0.1/%d; printf \"GET /healthz HTTP/1.0\\r\\n\\r\\n\" >&3; cat <&3' "
                  "> %s/health.txt", port, dir) == 0);
        snprintf(p, sizeof p, "%s/http.txt", dir);
        char *resp = slurp("%s", p);
        snprintf(p, sizeof p, "%s/one.pred", dir);
        char *pred = slurp("%s", p);
        const char *arr = resp ? strstr(resp, "\"probabilities\"") : NULL;
        if (arr) arr = strchr(arr, '[');
        CHECK(resp && strstr(resp, " 200 ") && arr && pred);
        if (arr && pred) CHECK_NEAR(atof(arr + 1), atof(pred), 2e-6);
        free(resp), free(pred);
        snprintf(p, sizeof p, "%s/health.txt", dir);
        resp = slurp("%s", p);
        CHECK(resp && strstr(resp, " 200 ") && strstr(resp, "ok"));
        free(resp);
    }
    kill(pid, SIGTERM);
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* ember re-runs itself with the OpenBLAS kernels the CPU supports when OpenBLAS's own
 * pick is weaker (src/core/blas.c): left alone it reports a kernel set and no advice;
 * a user's OPENBLAS_CORETYPE is kept as given. */
static void test_blas_kernels(void) {
    setup();
    CHECK(run("env -u OPENBLAS_CORETYPE %s version > %s/v1.txt 2>&1", bin, dir) == 0);
    CHECK(run("OPENBLAS_CORETYPE=Prescott %s version > %s/v2.txt 2>&1", bin, dir) == 0);
    char p1[300], p2[300];
    snprintf(p1, sizeof p1, "%s/v1.txt", dir), snprintf(p2, sizeof p2, "%s/v2.txt", dir);
    char *v1 = slurp("%s", p1), *v2 = slurp("%s", p2);
    CHECK(v1 && strstr(v1, "blas_core=") && !strstr(v1, "note:"));
    CHECK(v2 && strstr(v2, "blas_core=Prescott\n"));
    if (v1) fprintf(stderr, "  %s", strstr(v1, "blas_core=") ? strstr(v1, "blas_core=") : v1);
    free(v1), free(v2);
}

static void cleanup(void) {
    if (dir[0] && t_failures == 0) run("rm -rf %s", dir);
}

static void test_cleanup(void) { cleanup(); }

TEST_MAIN({"train_reaches_optimum", test_train_reaches_optimum}, {"resume_bitwise", test_resume_bitwise},
          {"malformed_and_corrupt", test_malformed_and_corrupt},
          {"binary_format_and_numpy_reader", test_binary_format_and_numpy_reader}, {"serve", test_serve},
          {"blas_kernels", test_blas_kernels}, {"cleanup", test_cleanup})
