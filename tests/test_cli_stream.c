/*
 * test_cli_stream.c - `ember stream` end to end (EMBER_BIN): a run killed with SIGKILL
 * in the middle of windows, twice, and resumed is bitwise the uninterrupted run
 * (parameters, per-window metrics, the teacher's prediction log); stdin gives the
 * same model as the file, and resumes by skipping what the checkpoint has seen; the
 * ExFM student verbs run on the teacher's log; `exfm --teacher-vertical-feature` gives
 * the teacher (only) one more table.
 */
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cli_util.h"
#include "test.h"

#define T "cli_stream_tmp"
static const char *bin;
static char common[1024];

static size_t nbytes(const em_st_tensor *t) {
    size_t n = em_dtype_size(t->dtype);
    for (int d = 0; d < t->ndim; d++) n *= (size_t)t->shape[d];
    return n;
}

static int same_ckpt(const char *a, const char *b) {
    em_st *fa = NULL, *fb = NULL;
    if (em_st_open(&fa, a) || em_st_open(&fb, b)) {
        em_st_close(fa);
        fprintf(stderr, "  cannot open %s / %s: %s\n", a, b, em_last_error());
        return 0;
    }
    int same = em_st_count(fa) == em_st_count(fb) && em_st_count(fa) > 0;
    for (int i = 0; same && i < em_st_count(fa); i++) {
        const em_st_tensor *x = em_st_at(fa, i), *y = em_st_find(fb, x->name);
        if (!y || nbytes(x) != nbytes(y) || memcmp(x->data, y->data, nbytes(x)) != 0) {
            fprintf(stderr, "  tensor %s differs\n", x->name);
            same = 0;
        }
    }
    const char *ka = em_st_meta_get(fa, "stream.examples"), *kb = em_st_meta_get(fb, "stream.examples");
    if (!ka || !kb || strcmp(ka, kb) != 0) same = 0;
    em_st_close(fa), em_st_close(fb);
    return same;
}

/* windows.jsonl without the wall times ("..._s":x) */
static char *metrics_of(const char *dir) {
    char *s = slurp("%s/windows.jsonl", dir);
    if (!s) return NULL;
    char *o = s;
    for (const char *p = s; *p;) {
        if (p[0] == '_' && p[1] == 's' && p[2] == '"' && p[3] == ':') {
            p += 4;
            while (*p && *p != ',' && *p != '}') p++;
            continue;
        }
        *o++ = *p++;
    }
    *o = 0;
    return s;
}

static int count_lines(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    int n = 0, ch;
    while ((ch = fgetc(f)) != EOF) n += ch == '\n';
    fclose(f);
    return n;
}

static char home[1024], scratch[64], binbuf[4096];

static void setup(void) {
    bin = getenv("EMBER_BIN");
    if (!bin) bin = "../build/ember";
    if (realpath(bin, binbuf)) bin = binbuf;
    /* a private scratch directory: other builds' ctest may run this test at once */
    snprintf(scratch, sizeof scratch, "/tmp/ember_cli_stream_XXXXXX");
    CHECK(getcwd(home, sizeof home) != NULL && mkdtemp(scratch) != NULL && chdir(scratch) == 0);
    CHECK(run("rm -rf %s && mkdir -p %s", T, T) == 0);
    CHECK(run("%s gen --drift --out %s/d --rows 36000 --windows 6 > /dev/null 2>&1", bin, T) == 0);
    snprintf(common, sizeof common,
             "--window 3000 --batch 64 --eval-batch 512 --rows-cap 2000 --dim 8 --bot 13-32-8 --top 359-32-1 "
             "--dense-opt adagrad --sparse-opt adagrad --lr 0.05 --threads 2 --quiet");
    /* the uninterrupted reference, as a teacher */
    CHECK(run("%s stream --data %s/d/stream.tsv --out %s/ref --log-predictions %s/ref.das %s > %s/ref.json", bin, T, T, T,
              common, T) == 0);
    char *j = slurp("%s/ref.json", T);
    CHECK(j && strstr(j, "\"windows\":12,") && strstr(j, "\"examples\":36000,"));
    free(j);
}

/* Start `ember stream ... --resume` into out; once its windows.jsonl has `lines`
 * lines, let it run on for delay_ms and SIGKILL it. Returns 1 if it was killed. */
static int run_and_kill(const char *out, int lines, int delay_ms) {
    char cmd[2048], mpath[512];
    snprintf(cmd, sizeof cmd, "exec %s stream --data %s/d/stream.tsv --out %s --log-predictions %s.das --resume %s", bin,
             T, out, out, common);
    snprintf(mpath, sizeof mpath, "%s/windows.jsonl", out);
    pid_t pid = fork();
    if (pid == 0) {
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    for (int waited = 0; waited < 60000; waited += 5) { /* up to a minute */
        if (count_lines(mpath) >= lines) break;
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid) return 0; /* finished before the kill */
        usleep(5000);
    }
    usleep((useconds_t)delay_ms * 1000);
    kill(pid, SIGKILL);
    int st;
    waitpid(pid, &st, 0);
    return WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL;
}

/* Killed twice mid-stream (in whatever window, checkpoint write or log flush the
 * signal lands), then resumed to the end: bitwise the uninterrupted run. */
static void test_sigkill_resume(void) {
    const int delays[] = {40, 90, 150};
    for (int k = 0; k < 3; k++) {
        char out[256];
        snprintf(out, sizeof out, "%s/kill%d", T, k);
        CHECK(run("rm -rf %s %s.das", out, out) == 0);
        int killed = run_and_kill(out, 2, delays[k]);
        killed += run_and_kill(out, 7, delays[(k + 1) % 3]);
        CHECK(killed == 2);
        char mp[512];
        snprintf(mp, sizeof mp, "%s/windows.jsonl", out);
        fprintf(stderr, "  kill%d: killed twice, the second time with %d windows reported (mid-window)\n", k, count_lines(mp));
        CHECK(run("%s stream --data %s/d/stream.tsv --out %s --log-predictions %s.das --resume %s > %s/final.json", bin, T,
                  out, out, common, out) == 0);
        char *j = slurp("%s/final.json", out);
        CHECK(j && strstr(j, "\"windows\":12,") && strstr(j, "\"resumed\":1"));
        free(j);
        char a[512], b[512];
        snprintf(a, sizeof a, "%s/ref/checkpoint.safetensors", T);
        snprintf(b, sizeof b, "%s/checkpoint.safetensors", out);
        CHECK(same_ckpt(a, b));
        char *ma = NULL, *mb = NULL;
        snprintf(a, sizeof a, "%s/ref", T);
        ma = metrics_of(a), mb = metrics_of(out);
        CHECK(ma && mb && strcmp(ma, mb) == 0);
        free(ma), free(mb);
        CHECK(run("cmp -s %s/ref.das %s.das", T, out) == 0);
    }
}

/* stdin: the same windows as the file; resumed by skipping the examples seen. */
static void test_stdin(void) {
    CHECK(run("cat %s/d/stream.tsv | %s stream --data - --out %s/in1 %s > /dev/null", T, bin, T, common) == 0);
    CHECK(run("cat %s/d/stream.tsv | %s stream --data - --out %s/in2 --resume --max-windows 5 %s > /dev/null", T, bin, T,
              common) == 0);
    CHECK(run("cat %s/d/stream.tsv | %s stream --data - --out %s/in2 --resume %s > /dev/null", T, bin, T, common) == 0);
    char a[512], b[512];
    snprintf(a, sizeof a, "%s/ref/checkpoint.safetensors", T);
    snprintf(b, sizeof b, "%s/in1/checkpoint.safetensors", T);
    CHECK(same_ckpt(a, b));
    snprintf(b, sizeof b, "%s/in2/checkpoint.safetensors", T);
    CHECK(same_ckpt(a, b));
}

/* Students of the reference teacher: each vertical, each distillation mode. */
static void test_students(void) {
    const char *modes[] = {"none", "serving", "aux", "aux+adapter"};
    for (int m = 0; m < 4; m++) {
        CHECK(run("%s stream --data %s/d/stream.tsv --out %s/st%d --vertical %d --teacher-log %s/ref.das --distill %s %s "
                  "> %s/st%d.json",
                  bin, T, T, m, m % 3, T, modes[m], common, T, m) == 0);
        char *j = slurp("%s/st%d/windows.jsonl", T, m);
        CHECK(j && strstr(j, "\"teacher\":{\"present\":") && strstr(j, "\"missing\":0,"));
        free(j);
    }
    /* the pipeline verb: one teacher, three students, two modes each */
    CHECK(run("%s exfm --data %s/d/stream.tsv --out %s/x --students 3 --modes none,aux+adapter --window 3000 --rows-cap 2000 "
              "--teacher-rows-cap 4000 --quiet > %s/x.json",
              bin, T, T, T) == 0);
    char *x = slurp("%s/x.json", T);
    CHECK(x && strstr(x, "\"teacher\":{\"examples\":36000,") && strstr(x, "\"vertical\":2,") &&
          strstr(x, "\"aux+adapter\":{"));
    free(x);
    /* the teacher's own optimizers; the students keep theirs */
    CHECK(run("%s exfm --data %s/d/stream.tsv --out %s/x2 --students 1 --modes none --window 3000 --rows-cap 2000 "
              "--teacher-rows-cap 4000 --teacher-dense-opt adam --teacher-dense-lr 0.001 --teacher-sparse-opt rowwise_adagrad "
              "--quiet > /dev/null && %s inspect %s/x2/teacher/checkpoint.safetensors > %s/x2t.txt && "
              "%s inspect %s/x2/v0-none/checkpoint.safetensors > %s/x2s.txt",
              bin, T, T, bin, T, T, bin, T, T) == 0);
    x = slurp("%s/x2t.txt", T);
    CHECK(x && strstr(x, "sparse optimizer rowwise_adagrad, dense adam"));
    free(x);
    x = slurp("%s/x2s.txt", T);
    CHECK(x && strstr(x, "sparse optimizer sgd, dense sgd"));
    free(x);
    /* a teacher that sees the vertical: one more table (3 rows) in the teacher only */
    CHECK(run("%s exfm --data %s/d/stream.tsv --out %s/x3 --students 1 --modes aux+adapter --window 3000 --rows-cap 2000 "
              "--teacher-rows-cap 4000 --teacher-vertical-feature 3 --quiet > %s/x3.json && "
              "%s inspect %s/x3/teacher/checkpoint.safetensors > %s/x3t.txt && "
              "%s inspect %s/x3/v0-aux+adapter/checkpoint.safetensors > %s/x3s.txt",
              bin, T, T, T, bin, T, T, bin, T, T) == 0);
    x = slurp("%s/x3.json", T);
    CHECK(x && strstr(x, "\"teacher\":{\"examples\":36000,") && strstr(x, "\"aux+adapter\":{"));
    free(x);
    x = slurp("%s/x3t.txt", T);
    CHECK(x && strstr(x, "27 tables") && strstr(x, "\n26                3            3 "));
    free(x);
    x = slurp("%s/x3s.txt", T);
    CHECK(x && strstr(x, "26 tables"));
    free(x);
    /* the vertical as a feature needs sidecars: stdin has none */
    CHECK(run("head -100 %s/d/stream.tsv | %s stream --data - --out %s/x4 %s --vertical-feature 3 --top 386-32-1 "
              "2> %s/err4.txt", T, bin, T, common, T) == 1);
    x = slurp("%s/err4.txt", T);
    CHECK(x && strstr(x, "sidecar"));
    free(x);
    /* usage errors: exit 2 with the option named */
    CHECK(run("%s stream --data %s/d/stream.tsv --distill nonsense 2> %s/err.txt", bin, T, T) == 2);
    char *e = slurp("%s/err.txt", T);
    CHECK(e && strstr(e, "--distill"));
    free(e);
    CHECK(run("%s stream --out %s/x 2> /dev/null", bin, T) == 2);
}

static void cleanup(void) {
    if (chdir(home) != 0) fprintf(stderr, "  cannot return to %s\n", home);
    if (!getenv("KEEP")) run("rm -rf %s", scratch);
}

TEST_MAIN({"setup", setup}, {"sigkill_resume", test_sigkill_resume}, {"stdin", test_stdin}, {"students", test_students},
          {"cleanup", cleanup})
