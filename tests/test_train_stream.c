/*
 * test_train_stream.c - streaming training (ember/stream.h): windows and batches do
 * not depend on how the stream is cut into files, a directory that grows while the
 * run waits gives the same model as one file, a stopped-and-resumed run is bitwise the
 * uninterrupted one (metrics lines, teacher log and student heads included), the
 * vertical filter, the vertical as a feature (it reaches the model's last table and
 * resumes exactly), the teacher's log, the student's join (present / missing), and
 * the configuration errors. The SIGKILL test is in test_cli_stream.c.
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ember/stream.h"
#include "test.h"

#define ROWS 12000
#define DIR_ "stream_test_tmp"

static em_pool *pool;

static void sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void sh(const char *fmt, ...) {
    char cmd[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    if (system(cmd) != 0) fprintf(stderr, "  (command failed: %s)\n", cmd);
}

/* The drifting stream, with two malformed lines (and their sidecar lines) inserted. */
static void make_data(void) {
    sh("rm -rf %s && mkdir -p %s/d", DIR_, DIR_);
    em_drift_cfg c = em_drift_default();
    c.rows = ROWS, c.windows = 6;
    CHECK_OK(em_gen_drift_write(&c, DIR_ "/d/raw.tsv", DIR_ "/d/raw.side", NULL, pool));
    /* lines 1000 and 7001 (1-based) become malformed */
    sh("awk 'NR==1000{print \"1\\tbad\"} NR==7000{print \"x\"} {print}' %s/d/raw.tsv > " DIR_ "/d/stream.tsv", DIR_);
    sh("awk 'NR==1000{print \"0\\t0\\t0.5\"} NR==7000{print \"2\\t0\\t0.5\"} {print}' %s/d/raw.side > " DIR_ "/d/stream.side",
       DIR_);
    sh("rm %s/d/raw.tsv", DIR_);
}

static em_dlrm_cfg small_model(void) {
    em_dlrm_cfg m = em_dlrm_kaggle(500);
    m.dim = 8;
    int bot[] = {13, 16, 8}, top[] = {0, 16, 1};
    m.n_bot = 3, m.n_top = 3;
    memcpy(m.bot, bot, sizeof bot);
    top[0] = em_dot_interact_out_dim(m.num_tables, m.dim);
    memcpy(m.top, top, sizeof top);
    m.dense_opt = em_optim_default(EM_OPT_ADAGRAD, 0.05f);
    m.sparse_opt = em_optim_default(EM_OPT_ADAGRAD, 0.05f);
    return m;
}

static em_stream_cfg base_cfg(const char *src, const char *out) {
    em_stream_cfg c = em_stream_default();
    c.source = src, c.out_dir = out;
    c.model = small_model();
    c.batch = 64, c.eval_batch = 300, c.window = 1000, c.prefetch = 2;
    c.poll_s = 0.02;
    return c;
}

/* Split the data (and sidecar) into files of the given line counts in dir. */
static void split(const char *dir, const int *sizes, int n) {
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p %s", dir, dir);
    CHECK(system(cmd) == 0);
    int at = 1;
    for (int i = 0; i < n; i++) {
        int to = sizes[i] > 0 ? at + sizes[i] - 1 : 1 << 30;
        snprintf(cmd, sizeof cmd,
                 "sed -n '%d,%dp' " DIR_ "/d/stream.tsv > %s/part-%03d.tsv && sed -n '%d,%dp' " DIR_
                 "/d/stream.side > %s/part-%03d.side",
                 at, to, dir, i, at, to, dir, i);
        CHECK(system(cmd) == 0);
        at = to + 1;
    }
}

static size_t nbytes(const em_st_tensor *t) {
    size_t n = em_dtype_size(t->dtype);
    for (int d = 0; d < t->ndim; d++) n *= (size_t)t->shape[d];
    return n;
}

/* Every tensor of two checkpoints bitwise equal. */
static int same_ckpt(const char *a, const char *b) {
    em_st *fa = NULL, *fb = NULL;
    if (em_st_open(&fa, a) || em_st_open(&fb, b)) {
        em_st_close(fa);
        fprintf(stderr, "  cannot open %s / %s: %s\n", a, b, em_last_error());
        return 0;
    }
    int same = em_st_count(fa) == em_st_count(fb), n = em_st_count(fa);
    for (int i = 0; same && i < n; i++) {
        const em_st_tensor *x = em_st_at(fa, i), *y = em_st_find(fb, x->name);
        if (!y || nbytes(x) != nbytes(y) || memcmp(x->data, y->data, nbytes(x)) != 0) {
            fprintf(stderr, "  tensor %s differs\n", x->name);
            same = 0;
        }
    }
    const char *keys[] = {"ember.step", "stream.windows", "stream.examples", "student.state", "student.steps"};
    for (int k = 0; same && k < 5; k++) {
        const char *u = em_st_meta_get(fa, keys[k]), *v = em_st_meta_get(fb, keys[k]);
        if ((u == NULL) != (v == NULL) || (u && strcmp(u, v) != 0)) {
            fprintf(stderr, "  metadata %s differs\n", keys[k]);
            same = 0;
        }
    }
    em_st_close(fa), em_st_close(fb);
    return same;
}

/* windows.jsonl without wall times and file names: what must match between runs. */
static char *metrics_of(const char *dir) {
    char p[512];
    snprintf(p, sizeof p, "%s/windows.jsonl", dir);
    FILE *f = fopen(p, "r");
    if (!f) return NULL;
    size_t cap = 1 << 20, k = 0;
    char *out = malloc(cap), line[8192];
    while (fgets(line, sizeof line, f)) {
        for (char *s = line; *s && k + 2 < cap;) {
            /* drop "<key>_s":<number> and "file":"..." */
            if (*s == '"' && (strncmp(s, "\"file\":\"", 8) == 0)) {
                s = strchr(s + 8, '"') + 1;
                continue;
            }
            if (*s == '_' && s[1] == 's' && s[2] == '"' && s[3] == ':') {
                s += 4;
                while (*s && *s != ',' && *s != '}') s++;
                continue;
            }
            out[k++] = *s++;
        }
    }
    out[k] = 0;
    fclose(f);
    return out;
}

static int same_metrics(const char *a, const char *b) {
    char *x = metrics_of(a), *y = metrics_of(b);
    int same = x && y && strcmp(x, y) == 0 && strlen(x) > 0;
    if (!same) fprintf(stderr, "  windows.jsonl of %s and %s differ\n", a, b);
    free(x), free(y);
    return same;
}

static char home[1024], scratch[64];

static void test_setup(void) {
    /* a private scratch directory: other builds' ctest may run this test at once */
    snprintf(scratch, sizeof scratch, "/tmp/ember_stream_XXXXXX");
    CHECK(getcwd(home, sizeof home) != NULL && mkdtemp(scratch) != NULL && chdir(scratch) == 0);
    CHECK_OK(em_pool_create(&pool, 2));
    make_data();
}

/* One file, uninterrupted: the reference for the others. */
static void test_file(void) {
    em_stream_cfg c = base_cfg(DIR_ "/d/stream.tsv", DIR_ "/ref");
    em_stream_result r;
    CHECK_OK(em_stream_run(&c, pool, &r, NULL));
    CHECK(r.windows == 12 && r.windows_run == 12);
    CHECK(r.examples == ROWS);
    CHECK(r.malformed == 2);
    CHECK(r.pos == ROWS + 2);
    CHECK(r.files == 1 && !r.resumed);
    char *m = metrics_of(DIR_ "/ref");
    CHECK(m && strstr(m, "\"window\":11,\"examples\":1000,\"pos_start\":11002,\"pos_end\":12002"));
    free(m);
}

/* The same data cut into files at other places: the same windows, the same model. */
static void test_dir_same_as_file(void) {
    const int sizes[] = {3333, 1, 4444, 0};
    split(DIR_ "/dir", sizes, 4);
    sh("touch %s/_END", DIR_ "/dir");
    em_stream_cfg c = base_cfg(DIR_ "/dir", DIR_ "/dirrun");
    em_stream_result r;
    CHECK_OK(em_stream_run(&c, pool, &r, NULL));
    CHECK(r.windows == 12 && r.examples == ROWS && r.files == 4 && r.malformed == 2);
    CHECK(same_ckpt(DIR_ "/ref/checkpoint.safetensors", DIR_ "/dirrun/checkpoint.safetensors"));
    CHECK(same_metrics(DIR_ "/ref", DIR_ "/dirrun"));
}

/* start_pos: the same windows as a file holding only the lines from there on. */
static void test_start_pos(void) {
    sh("rm -rf %s && mkdir -p %s && sed -n '5001,$p' %s/d/stream.tsv > %s/a.tsv && sed -n '5001,$p' %s/d/stream.side > %s/a.side "
       "&& touch %s/_END",
       DIR_ "/from", DIR_ "/from", DIR_, DIR_ "/from", DIR_, DIR_ "/from", DIR_ "/from");
    em_stream_cfg c = base_cfg(DIR_ "/d/stream.tsv", DIR_ "/fromrun");
    c.start_pos = 5000;
    em_stream_result r;
    CHECK_OK(em_stream_run(&c, pool, &r, NULL));
    CHECK(r.examples == ROWS + 2 - 5000 - 1 && r.pos == ROWS + 2); /* line 7001 is malformed */
    em_stream_cfg c2 = base_cfg(DIR_ "/from", DIR_ "/fromrun2");
    CHECK_OK(em_stream_run(&c2, pool, &r, NULL));
    CHECK(same_ckpt(DIR_ "/fromrun/checkpoint.safetensors", DIR_ "/fromrun2/checkpoint.safetensors"));
    /* a directory passes over the examples before it */
    em_stream_cfg c3 = base_cfg(DIR_ "/dir", DIR_ "/fromrun3");
    c3.start_pos = 5000;
    CHECK_OK(em_stream_run(&c3, pool, &r, NULL));
    CHECK(r.skipped_start == 5000 - 1);
    CHECK(same_ckpt(DIR_ "/fromrun/checkpoint.safetensors", DIR_ "/fromrun3/checkpoint.safetensors"));
}

typedef struct {
    const char *dir;
    int end_marker;
} feeder_arg;

/* Renames the parts into the watched directory one by one, then (maybe) the marker. */
static void *feeder(void *p) {
    const feeder_arg *a = p;
    char cmd[1024];
    for (int i = 0; i < 3; i++) {
        usleep(150000);
        snprintf(cmd, sizeof cmd,
                 "cp " DIR_ "/dir/part-%03d.side %s/ && cp " DIR_ "/dir/part-%03d.tsv %s/.part-%03d.tsv && "
                 "mv %s/.part-%03d.tsv %s/part-%03d.tsv",
                 i, a->dir, i, a->dir, i, a->dir, i, a->dir, i);
        if (system(cmd) != 0) return NULL;
    }
    usleep(150000);
    snprintf(cmd, sizeof cmd,
             "cp " DIR_ "/dir/part-003.side %s/ && cp " DIR_ "/dir/part-003.tsv %s/part-003.tsv.tmp && "
             "mv %s/part-003.tsv.tmp %s/part-003.tsv%s",
             a->dir, a->dir, a->dir, a->dir, a->end_marker ? " && touch " : "");
    if (a->end_marker) {
        size_t k = strlen(cmd);
        snprintf(cmd + k, sizeof cmd - k, "%s/_END", a->dir);
    }
    if (system(cmd) != 0) return NULL;
    return NULL;
}

/* A directory that receives its files while the run waits: the same model; the
 * stream ends at the marker, or after the idle timeout. */
static void test_growing_dir(void) {
    for (int marker = 1; marker >= 0; marker--) {
        sh("rm -rf %s && mkdir -p " DIR_ "/grow", DIR_ "/grow");
        feeder_arg fa = {DIR_ "/grow", marker};
        pthread_t th;
        CHECK(pthread_create(&th, NULL, feeder, &fa) == 0);
        em_stream_cfg c = base_cfg(DIR_ "/grow", marker ? DIR_ "/growrun" : DIR_ "/growrun2");
        if (!marker) c.idle_timeout_s = 1.0;
        em_stream_result r;
        double t0 = em_now();
        CHECK_OK(em_stream_run(&c, pool, &r, NULL));
        pthread_join(th, NULL);
        CHECK(r.examples == ROWS && r.files == 4);
        CHECK(marker || em_now() - t0 >= 1.0);
        char ck[256];
        snprintf(ck, sizeof ck, "%s/checkpoint.safetensors", c.out_dir);
        CHECK(same_ckpt(DIR_ "/ref/checkpoint.safetensors", ck));
    }
}

/* Stopped after some windows and resumed (several times, file and directory sources):
 * bitwise the uninterrupted run, metrics lines included. */
static void test_resume_exact(void) {
    const char *srcs[] = {DIR_ "/d/stream.tsv", DIR_ "/dir"};
    const char *outs[] = {DIR_ "/res_file", DIR_ "/res_dir"};
    for (int k = 0; k < 2; k++) {
        sh("rm -rf %s", outs[k]);
        em_stream_cfg c = base_cfg(srcs[k], outs[k]);
        c.resume = 1;
        c.ckpt_every = 2;
        const int64_t stops[] = {1, 4, 7, 0};
        em_stream_result r;
        for (int i = 0; i < 4; i++) {
            c.max_windows = stops[i];
            CHECK_OK(em_stream_run(&c, pool, &r, NULL));
            CHECK(r.resumed == (i > 0));
        }
        CHECK(r.windows == 12);
        CHECK(same_ckpt(DIR_ "/ref/checkpoint.safetensors", r.checkpoint));
        CHECK(same_metrics(DIR_ "/ref", outs[k]));
        /* once more: nothing left, nothing changes */
        CHECK_OK(em_stream_run(&c, pool, &r, NULL));
        CHECK(r.windows_run == 0 && r.windows == 12);
        CHECK(same_ckpt(DIR_ "/ref/checkpoint.safetensors", r.checkpoint));
    }
}

/* A checkpoint written between windows, then windows after it run and lost (as if
 * killed): the metrics lines after the checkpoint are cut off on resume. */
static void test_resume_after_lost_windows(void) {
    sh("rm -rf %s", DIR_ "/lost");
    em_stream_cfg c = base_cfg(DIR_ "/d/stream.tsv", DIR_ "/lost");
    c.resume = 1;
    c.ckpt_every = 3;
    c.max_windows = 3;
    em_stream_result r;
    CHECK_OK(em_stream_run(&c, pool, &r, NULL));
    sh("cp %s/checkpoint.safetensors " DIR_ "/lost.ckpt", DIR_ "/lost");
    c.max_windows = 5; /* windows 3, 4 run, checkpoint only at the end... */
    CHECK_OK(em_stream_run(&c, pool, &r, NULL));
    sh("cp " DIR_ "/lost.ckpt %s/checkpoint.safetensors", DIR_ "/lost"); /* ...which the "crash" loses */
    c.max_windows = 0;
    CHECK_OK(em_stream_run(&c, pool, &r, NULL));
    CHECK(r.windows_run == 9);
    CHECK(same_ckpt(DIR_ "/ref/checkpoint.safetensors", r.checkpoint));
    CHECK(same_metrics(DIR_ "/ref", DIR_ "/lost"));
}

static void test_vertical(void) {
    /* count vertical 1 in the sidecar */
    FILE *f = fopen(DIR_ "/d/stream.side", "r");
    char line[128];
    uint64_t n1 = 0, lineno = 0;
    while (f && fgets(line, sizeof line, f)) {
        lineno++;
        if (line[0] == '1' && line[1] == '\t' && lineno != 1000 && lineno != 7001) n1++;
    }
    if (f) fclose(f);
    em_stream_cfg c = base_cfg(DIR_ "/dir", DIR_ "/vert");
    c.vertical = 1;
    em_stream_result r;
    CHECK_OK(em_stream_run(&c, pool, &r, NULL));
    CHECK(r.examples == n1);
    CHECK(r.skipped_vertical == ROWS - n1);
    CHECK(r.windows == (int64_t)((n1 + 999) / 1000));
    /* no sidecar: a vertical filter is an error naming it */
    em_stream_cfg c2 = base_cfg(DIR_ "/d/raw.side", DIR_ "/vert2");
    c2.vertical = 0;
    CHECK(em_stream_run(&c2, pool, &r, NULL) != EM_OK);
}

/* The vertical as a feature: a model with one more table of 4 rows; each example's
 * bag there is {its sidecar vertical}, so the rows of verticals 0-2 (the data has 3)
 * train and row 3 keeps its initial values; the data's 26 tables are read as usual.
 * Stopped and resumed it is bitwise the uninterrupted run; resuming without the
 * feature, or reading data without a sidecar, is an error. */
static void test_vertical_feature(void) {
    sh("rm -rf %s %s %s " DIR_ "/vf_init.safetensors", DIR_ "/vf", DIR_ "/vf2", DIR_ "/vf3");
    em_stream_cfg c = base_cfg(DIR_ "/d/stream.tsv", DIR_ "/vf");
    c.model.rows[c.model.num_tables++] = 4;
    c.model.top[0] = em_dot_interact_out_dim(c.model.num_tables, c.model.dim);
    c.vertical_feature = 1;
    em_dlrm *m0 = NULL;
    CHECK_OK(em_dlrm_create(&m0, &c.model, pool));
    CHECK_OK(em_dlrm_save(m0, DIR_ "/vf_init.safetensors", NULL, 0));
    em_dlrm_free(m0);
    em_stream_result r;
    CHECK_OK(em_stream_run(&c, pool, &r, NULL));
    CHECK(r.windows == 12 && r.examples == ROWS);
    em_st *fi = NULL, *ft = NULL;
    CHECK_OK(em_st_open(&fi, DIR_ "/vf_init.safetensors"));
    CHECK_OK(em_st_open(&ft, r.checkpoint));
    if (fi && ft) {
        const em_st_tensor *a = em_st_find(fi, "emb.26.weight"), *b = em_st_find(ft, "emb.26.weight");
        CHECK(a && b && a->ndim == 2 && a->shape[0] == 4 && a->shape[1] == 8 && b->shape[0] == 4);
        if (a && b && a->shape[0] == 4) {
            const float *x = a->data, *y = b->data;
            for (int v = 0; v < 4; v++) {
                int changed = memcmp(x + 8 * v, y + 8 * v, 8 * sizeof(float)) != 0;
                CHECK(changed == (v < 3));
            }
        }
        /* the data's tables train as without the feature */
        const em_st_tensor *e0 = em_st_find(fi, "emb.0.weight"), *e1 = em_st_find(ft, "emb.0.weight");
        CHECK(e0 && e1 && memcmp(e0->data, e1->data, nbytes(e0)) != 0);
    }
    em_st_close(fi), em_st_close(ft);
    /* stopped twice and resumed: bitwise the uninterrupted run */
    em_stream_cfg c2 = c;
    c2.out_dir = DIR_ "/vf2";
    c2.resume = 1, c2.ckpt_every = 2;
    const int64_t stops[] = {3, 8, 0};
    for (int i = 0; i < 3; i++) {
        c2.max_windows = stops[i];
        CHECK_OK(em_stream_run(&c2, pool, &r, NULL));
    }
    CHECK(r.windows == 12);
    CHECK(same_ckpt(DIR_ "/vf/checkpoint.safetensors", r.checkpoint));
    CHECK(same_metrics(DIR_ "/vf", DIR_ "/vf2"));
    /* resuming it without the feature */
    c2.vertical_feature = 0;
    CHECK(em_stream_run(&c2, pool, &r, NULL) == EM_ERR_INVALID);
    CHECK(strstr(em_last_error(), "vertical as a feature") != NULL);
    /* data without a sidecar */
    em_stream_cfg c3 = c;
    c3.source = DIR_ "/d/raw.side", c3.out_dir = DIR_ "/vf3";
    CHECK(em_stream_run(&c3, pool, &r, NULL) == EM_ERR_IO);
    CHECK(strstr(em_last_error(), "sidecar") != NULL);
}

/* The teacher's log: one record per example, ids = positions, version = window; a
 * resumed teacher writes the same bytes. */
static void test_teacher_log(void) {
    sh("rm -rf %s " DIR_ "/t.das " DIR_ "/t2.das", DIR_ "/teach");
    em_stream_cfg c = base_cfg(DIR_ "/d/stream.tsv", DIR_ "/teach");
    c.log_predictions = DIR_ "/t.das";
    em_stream_result r;
    CHECK_OK(em_stream_run(&c, pool, &r, NULL));
    em_das_index *ix = NULL;
    const char *p = DIR_ "/t.das";
    CHECK_OK(em_das_index_open(&ix, &p, 1, EM_DAS_STRICT));
    em_das_stats ds;
    em_das_index_stats(ix, &ds);
    CHECK(ds.records == ROWS && ds.entries == ROWS && ds.duplicates == 0);
    em_das_rec rec;
    CHECK(em_das_lookup(ix, em_das_example_id(0, 0), &rec) && rec.version == 0);
    CHECK(!em_das_lookup(ix, em_das_example_id(0, 999), NULL)); /* the malformed line */
    CHECK(em_das_lookup(ix, em_das_example_id(0, 12001), &rec) && rec.version == 11);
    em_das_index_free(ix);
    /* again, stopped twice and resumed, with the log cut back each time */
    sh("rm -rf %s", DIR_ "/teach2");
    em_stream_cfg c2 = base_cfg(DIR_ "/d/stream.tsv", DIR_ "/teach2");
    c2.log_predictions = DIR_ "/t2.das";
    c2.resume = 1, c2.ckpt_every = 2;
    c2.max_windows = 5; /* checkpoint after window 4 (4 windows), window 5 logged and lost */
    CHECK_OK(em_stream_run(&c2, pool, &r, NULL));
    sh("cp %s/checkpoint.safetensors " DIR_ "/t2.ckpt", DIR_ "/teach2");
    c2.max_windows = 0;
    CHECK_OK(em_stream_run(&c2, pool, &r, NULL));
    char *a = NULL, *b = NULL;
    FILE *fa = fopen(DIR_ "/t.das", "rb"), *fb = fopen(DIR_ "/t2.das", "rb");
    CHECK(fa && fb);
    if (fa && fb) {
        a = malloc(1 << 20), b = malloc(1 << 20);
        size_t na = fread(a, 1, 1 << 20, fa), nb = fread(b, 1, 1 << 20, fb);
        CHECK(na == nb && na == 32 + 24 * ROWS && memcmp(a, b, na) == 0);
    }
    if (fa) fclose(fa);
    if (fb) fclose(fb);
    free(a), free(b);
    /* a fresh run refuses to append to a log with records */
    sh("rm -rf %s", DIR_ "/teach3");
    em_stream_cfg c3 = base_cfg(DIR_ "/d/stream.tsv", DIR_ "/teach3");
    c3.log_predictions = DIR_ "/t.das";
    CHECK(em_stream_run(&c3, pool, &r, NULL) == EM_ERR_INVALID);
}

/* Students: every mode runs and joins every example; with a log that stops early the
 * rest is missing; a resumed student (heads included) is bitwise an uninterrupted one. */
static void test_student(void) {
    const em_distill_mode modes[] = {EM_DISTILL_NONE, EM_DISTILL_SERVING, EM_DISTILL_AUX, EM_DISTILL_AUX_ADAPTER};
    char out[256];
    for (int k = 0; k < 4; k++) {
        snprintf(out, sizeof out, DIR_ "/stu%d", k);
        sh("rm -rf %s", out);
        em_stream_cfg c = base_cfg(DIR_ "/d/stream.tsv", out);
        c.vertical = 0;
        c.teacher_log = DIR_ "/t.das";
        c.student.mode = modes[k];
        em_stream_result r;
        CHECK_OK(em_stream_run(&c, pool, &r, NULL));
        char *m = metrics_of(out);
        CHECK(m && strstr(m, "\"missing\":0") && !strstr(m, "\"present\":0,"));
        free(m);
    }
    /* the modes differ from each other */
    CHECK(!same_ckpt(DIR_ "/stu0/checkpoint.safetensors", DIR_ "/stu1/checkpoint.safetensors"));
    CHECK(!same_ckpt(DIR_ "/stu2/checkpoint.safetensors", DIR_ "/stu3/checkpoint.safetensors"));
    /* a short log: the teacher's first 5 windows only (records of positions < 5002) */
    sh("head -c %s " DIR_ "/t.das > " DIR_ "/short.das", "120032"); /* 32 + 24 * 5000 */
    sh("rm -rf %s", DIR_ "/stu_short");
    em_stream_cfg c = base_cfg(DIR_ "/d/stream.tsv", DIR_ "/stu_short");
    c.vertical = 0, c.teacher_log = DIR_ "/short.das", c.student.mode = EM_DISTILL_AUX_ADAPTER;
    em_stream_result r;
    CHECK_OK(em_stream_run(&c, pool, &r, NULL));
    char *m = metrics_of(DIR_ "/stu_short");
    CHECK(m && strstr(m, "\"present\":0,"));
    free(m);
    /* resume with heads: stop at 2 and 3 windows, then finish */
    sh("rm -rf %s", DIR_ "/stu3b");
    em_stream_cfg c2 = base_cfg(DIR_ "/d/stream.tsv", DIR_ "/stu3b");
    c2.vertical = 0, c2.teacher_log = DIR_ "/t.das", c2.student.mode = EM_DISTILL_AUX_ADAPTER, c2.resume = 1;
    const int64_t stops[] = {2, 3, 0};
    for (int i = 0; i < 3; i++) {
        c2.max_windows = stops[i];
        CHECK_OK(em_stream_run(&c2, pool, &r, NULL));
    }
    CHECK(same_ckpt(DIR_ "/stu3/checkpoint.safetensors", DIR_ "/stu3b/checkpoint.safetensors"));
    CHECK(same_metrics(DIR_ "/stu3", DIR_ "/stu3b"));
    /* the join does not care about the log's order within what it has read, and the
     * last of duplicate records wins: a log whose blocks of 500 positions come in reverse
     * order, each example's record preceded by a wrong one (pairs of adjacent records),
     * teaches exactly what the teacher's own log does */
    em_das_index *ix = NULL;
    const char *tp = DIR_ "/t.das";
    CHECK_OK(em_das_index_open(&ix, &tp, 1, 0));
    em_das_writer *dw = NULL;
    sh("rm -f %s", DIR_ "/shuffled.das");
    CHECK_OK(em_das_writer_open(&dw, DIR_ "/shuffled.das"));
    for (uint64_t b0 = 0; b0 < ROWS + 2 && ix && dw; b0 += 500)
        for (uint64_t k = 0; k < 500; k++) {
            em_das_rec rec[2];
            uint64_t pos = b0 + 499 - k;
            if (!em_das_lookup(ix, em_das_example_id(0, pos), &rec[1])) continue;
            rec[0] = rec[1];
            rec[0].logit = -rec[1].logit + 3.f; /* same vertical: the student keeps both */
            CHECK_OK(em_das_append(dw, rec, 2));
        }
    CHECK_OK(em_das_writer_close(dw));
    em_das_index_free(ix);
    sh("rm -rf %s", DIR_ "/stu_shuf");
    em_stream_cfg c3 = base_cfg(DIR_ "/d/stream.tsv", DIR_ "/stu_shuf");
    c3.vertical = 0, c3.teacher_log = DIR_ "/shuffled.das", c3.student.mode = EM_DISTILL_AUX_ADAPTER;
    CHECK_OK(em_stream_run(&c3, pool, &r, NULL));
    CHECK(same_ckpt(DIR_ "/stu3/checkpoint.safetensors", DIR_ "/stu_shuf/checkpoint.safetensors"));
    CHECK(same_metrics(DIR_ "/stu3", DIR_ "/stu_shuf"));
    /* resuming with another mode is refused */
    c2.student.mode = EM_DISTILL_AUX;
    CHECK(em_stream_run(&c2, pool, &r, NULL) == EM_ERR_INVALID);
}

/* The reader's per-example positions and byte offsets (em_batch.pos / byte_end), and
 * resuming a TSV reader at a byte offset (em_reader_cfg.skip_bytes). */
static void test_reader_positions(void) {
    const int64_t rows[26] = {[0 ... 25] = 1000};
    em_reader_cfg rc = {.path = DIR_ "/d/stream.tsv", .batch_size = 100, .num_dense = 13, .num_sparse = 26,
                        .table_rows = rows, .prefetch = 2};
    em_reader *r = NULL;
    CHECK_OK(em_reader_open(&r, &rc));
    const em_batch *b;
    uint64_t expect = 0, n = 0, pick_pos = 0, pick_byte = 0;
    float pick_label = -1, pick_dense0 = -1;
    while (r && em_reader_next(r, &b) == EM_OK) {
        for (int i = 0; i < b->B; i++, n++) {
            if (expect == 999 || expect == 7000) expect++; /* the malformed lines */
            CHECK(b->pos[i] == expect);
            expect++;
            if (n == 6000) pick_pos = b->pos[i] + 1, pick_byte = b->byte_end[i];
            if (n == 6001) pick_label = b->label[i], pick_dense0 = b->dense[0 + (size_t)i * 13];
        }
        CHECK(b->end_pos == b->pos[b->B - 1] + 1);
    }
    em_reader_free(r);
    CHECK(n == ROWS);
    /* resume at example 6001 by byte offset: the same next example */
    rc.skip = pick_pos, rc.skip_bytes = pick_byte;
    CHECK_OK(em_reader_open(&r, &rc));
    CHECK(r && em_reader_next(r, &b) == EM_OK && b->first_pos == pick_pos && b->pos[0] == pick_pos &&
          b->label[0] == pick_label && b->dense[0] == pick_dense0);
    em_reader_free(r);
    /* an offset that is not a line start */
    rc.skip_bytes = pick_byte + 3;
    CHECK(em_reader_open(&r, &rc) == EM_ERR_CORRUPT);
}

static void test_errors(void) {
    em_stream_result r;
    em_stream_cfg c = base_cfg(DIR_ "/nope.tsv", DIR_ "/err");
    CHECK(em_stream_run(&c, pool, &r, NULL) == EM_ERR_IO);
    CHECK(strstr(em_last_error(), "nope.tsv") != NULL);
    /* resume with another window size */
    em_stream_cfg c2 = base_cfg(DIR_ "/d/stream.tsv", DIR_ "/ref");
    c2.resume = 1, c2.window = 500;
    CHECK(em_stream_run(&c2, pool, &r, NULL) == EM_ERR_INVALID);
    CHECK(strstr(em_last_error(), "window") != NULL);
    /* ... or another source */
    em_stream_cfg c3 = base_cfg(DIR_ "/dir", DIR_ "/ref");
    c3.resume = 1;
    CHECK(em_stream_run(&c3, pool, &r, NULL) == EM_ERR_INVALID);
    /* distillation without a teacher log */
    em_stream_cfg c4 = base_cfg(DIR_ "/d/stream.tsv", DIR_ "/err");
    c4.student.mode = EM_DISTILL_AUX;
    CHECK(em_stream_run(&c4, pool, &r, NULL) == EM_ERR_INVALID);
    /* a window the allocator cannot hold */
    em_stream_cfg c5 = base_cfg(DIR_ "/d/stream.tsv", DIR_ "/err");
    em_mem_fail_after(3);
    CHECK(em_stream_run(&c5, pool, &r, NULL) == EM_ERR_NOMEM);
    em_mem_fail_after(-1);
}

static void test_cleanup(void) {
    em_pool_free(pool);
    if (chdir(home) != 0) fprintf(stderr, "  cannot return to %s\n", home);
    if (!getenv("KEEP")) sh("rm -rf %s", scratch);
}

TEST_MAIN({"setup", test_setup}, {"file", test_file}, {"dir_same_as_file", test_dir_same_as_file},
          {"growing_dir", test_growing_dir}, {"resume_exact", test_resume_exact},
          {"resume_after_lost_windows", test_resume_after_lost_windows}, {"vertical", test_vertical},
          {"vertical_feature", test_vertical_feature}, {"start_pos", test_start_pos},
          {"teacher_log", test_teacher_log}, {"student", test_student}, {"reader_positions", test_reader_positions}, {"errors", test_errors},
          {"cleanup", test_cleanup})
