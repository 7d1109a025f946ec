/* Drifting multi-vertical generator (em_gen_drift_write): byte-identical output for any
 * thread count; traffic shares; id churn between the first and last windows (new ids
 * appear, old ones vanish, small fields stay); planted probabilities rank well in every
 * window; a model-free check that the per-id click rates rotate as configured; bad
 * options rejected. */
#include <math.h>
#include <unistd.h>

#include "data/data_internal.h"
#include "test.h"

static char g_dir[256];

static void cleanup(void) {
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
}

static const char *tmp(const char *name) {
    static char buf[8][512];
    static int k;
    if (!g_dir[0]) {
        strcpy(g_dir, "/tmp/ember_drift_XXXXXX");
        if (!mkdtemp(g_dir)) abort();
        atexit(cleanup);
    }
    char *b = buf[k++ & 7];
    snprintf(b, 512, "%s/%s", g_dir, name);
    return b;
}

static char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    char *p = malloc(*n + 1);
    if (fread(p, 1, *n, f) != *n) *n = 0;
    p[*n] = 0;
    fclose(f);
    return p;
}

static int same_file(const char *a, const char *b) {
    size_t na, nb;
    char *pa = slurp(a, &na), *pb = slurp(b, &nb);
    int same = pa && pb && na == nb && na > 0 && memcmp(pa, pb, na) == 0;
    free(pa), free(pb);
    return same;
}

/* One parsed example with its sidecar line. */
typedef struct {
    int label, v, t;
    double p;
    uint64_t ids[EM_CRITEO_SPARSE];
    uint64_t missing;
} ex;

/* Reads data + sidecar into a malloc'd array; checks every line parses and the
 * sidecar has exactly one line per data line. */
static ex *load(const char *data, const char *side, int nd, int ns, size_t *n) {
    FILE *fd = fopen(data, "r"), *fs = fopen(side, "r");
    CHECK(fd && fs);
    size_t cap = 1024, cnt = 0;
    ex *e = malloc(cap * sizeof *e);
    char *line = NULL;
    size_t lcap = 0;
    ssize_t len;
    float dense[64];
    while ((len = getline(&line, &lcap, fd)) > 0) {
        if (cnt == cap) e = realloc(e, (cap *= 2) * sizeof *e);
        ex *x = &e[cnt++];
        float label;
        int bad;
        CHECK_OK(em_criteo_parse_line(line, (size_t)len, nd, ns, &label, dense, x->ids, &x->missing, &bad));
        x->label = label > 0.5f;
        CHECK(fscanf(fs, "%d\t%d\t%lf\n", &x->v, &x->t, &x->p) == 3);
    }
    CHECK(fscanf(fs, "%*s") == EOF); /* no extra sidecar lines */
    free(line);
    fclose(fd), fclose(fs);
    *n = cnt;
    return e;
}

static void test_determinism(void) {
    em_drift_cfg c = em_drift_default();
    c.rows = 9001, c.windows = 3, c.base.seed = 5; /* windows not multiples of the block */
    size_t base = em_mem_in_use();
    CHECK_OK(em_gen_drift_write(&c, tmp("a.tsv"), tmp("a.side"), tmp("a.sum"), NULL));
    CHECK(em_mem_in_use() == base);
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    CHECK_OK(em_gen_drift_write(&c, tmp("b.tsv"), tmp("b.side"), tmp("b.sum"), pool));
    em_pool_free(pool);
    CHECK(same_file(tmp("a.tsv"), tmp("b.tsv")));
    CHECK(same_file(tmp("a.side"), tmp("b.side")));
    CHECK(same_file(tmp("a.sum"), tmp("b.sum")));
    /* another seed gives other data */
    c.base.seed = 6;
    CHECK_OK(em_gen_drift_write(&c, tmp("c.tsv"), tmp("c.side"), NULL, NULL));
    CHECK(!same_file(tmp("a.tsv"), tmp("c.tsv")));
}

typedef struct {
    double p;
    int y;
} scored;

static int cmp_scored(const void *a, const void *b) {
    double x = ((const scored *)a)->p, y = ((const scored *)b)->p;
    return (x > y) - (x < y);
}

/* Mann-Whitney AUC with mid-ranks for ties. */
static double auc(scored *s, size_t n) {
    qsort(s, n, sizeof *s, cmp_scored);
    double rank_sum = 0, pos = 0;
    for (size_t i = 0; i < n;) {
        size_t j = i;
        while (j < n && s[j].p == s[i].p) j++;
        double mid = (double)(i + j + 1) / 2.0;
        for (size_t k = i; k < j; k++)
            if (s[k].y) rank_sum += mid, pos++;
        i = j;
    }
    return (rank_sum - pos * (pos + 1) / 2) / (pos * ((double)n - pos));
}

/* Default model (26 fields, Kaggle cardinalities, 3 verticals): time order, window
 * sizes, traffic shares, per-window AUC of the planted probabilities, the summary. */
static void test_shares_auc(void) {
    em_drift_cfg c = em_drift_default();
    c.rows = 60000, c.windows = 4;
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    CHECK_OK(em_gen_drift_write(&c, tmp("s.tsv"), tmp("s.side"), tmp("s.sum"), pool));
    em_pool_free(pool);
    size_t n;
    ex *e = load(tmp("s.tsv"), tmp("s.side"), EM_CRITEO_DENSE, EM_CRITEO_SPARSE, &n);
    CHECK(n == 60000);
    size_t per_v[3] = {0}, per_t[4] = {0}, clicks = 0;
    for (size_t i = 0; i < n; i++) {
        CHECK(e[i].v >= 0 && e[i].v < 3 && e[i].t >= 0 && e[i].t < 4);
        CHECK(i == 0 || e[i].t >= e[i - 1].t); /* time-ordered */
        CHECK(e[i].p > 0 && e[i].p < 1);
        per_v[e[i].v]++, per_t[e[i].t]++, clicks += (size_t)e[i].label;
    }
    for (int t = 0; t < 4; t++) CHECK(per_t[t] == 15000);
    const double want[3] = {0.5, 0.3, 0.2};
    for (int v = 0; v < 3; v++) CHECK_NEAR((double)per_v[v] / (double)n, want[v], 0.012);
    double ctr = (double)clicks / (double)n;
    CHECK(ctr > 0.12 && ctr < 0.45);
    scored *s = malloc(15000 * sizeof *s);
    for (int t = 0; t < 4; t++) {
        for (size_t i = 0; i < 15000; i++) s[i] = (scored){e[t * 15000 + i].p, e[t * 15000 + i].label};
        double a = auc(s, 15000);
        fprintf(stderr, "    window %d: auc of the planted p %.4f\n", t, a);
        CHECK(a > 0.7);
    }
    free(s);
    /* summary: one line per (window, vertical), consistent with the sidecar */
    FILE *f = fopen(tmp("s.sum"), "r");
    CHECK(f);
    size_t rows_total = 0, clicks_total = 0;
    for (int t = 0; t < 4; t++)
        for (int v = 0; v < 3; v++) {
            unsigned long long tt, rows, cl;
            int vv;
            double mp, th;
            CHECK(fscanf(f, "%llu\t%d\t%llu\t%llu\t%lf\t%lf\n", &tt, &vv, &rows, &cl, &mp, &th) == 6);
            CHECK(tt == (unsigned long long)t && vv == v);
            CHECK(mp > 0.05 && mp < 0.6);
            CHECK_NEAR(th, c.drift * t, 1e-6);
            rows_total += rows, clicks_total += cl;
        }
    fclose(f);
    CHECK(rows_total == n && clicks_total == clicks);
    free(e);
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Distinct ids of field f in window t seen at least `min` times -> out (sorted). */
static size_t head_ids(const ex *e, size_t n, int t, int f, size_t min, uint64_t *out) {
    size_t m = 0;
    uint64_t *all = malloc(n * sizeof *all);
    for (size_t i = 0; i < n; i++)
        if (e[i].t == t && !(e[i].missing >> f & 1)) all[m++] = e[i].ids[f];
    qsort(all, m, sizeof *all, cmp_u64);
    size_t k = 0;
    for (size_t i = 0; i < m;) {
        size_t j = i;
        while (j < m && all[j] == all[i]) j++;
        if (j - i >= min) out[k++] = all[i];
        i = j;
    }
    free(all);
    return k;
}

/* Fraction of the ids of a (sorted) that are not in any of window t's occurrences. */
static double vanished(const uint64_t *a, size_t na, const ex *e, size_t n, int t, int f) {
    uint64_t *all = malloc(n * sizeof *all);
    size_t m = head_ids(e, n, t, f, 1, all), gone = 0;
    for (size_t i = 0; i < na; i++)
        if (!bsearch(&a[i], all, m, sizeof *all, cmp_u64)) gone++;
    free(all);
    return na ? (double)gone / (double)na : -1;
}

/* Field 0 (500 ids) churns at 10% of its ranks per window, field 1 (50 ids) is below
 * churn_min_card: between windows 0 and 3 about 30% of field 0's popular ids vanish and
 * as many new ones appear; field 1 keeps its ids. */
static void test_turnover(void) {
    em_drift_cfg c = em_drift_default();
    const int64_t card[2] = {500, 50};
    c.base.num_dense = 2, c.base.num_sparse = 2, c.base.cardinality = card;
    c.rows = 80000, c.windows = 4, c.turnover = 0.1, c.churn_min_card = 100;
    CHECK_OK(em_gen_drift_write(&c, tmp("u.tsv"), tmp("u.side"), NULL, NULL));
    size_t n;
    ex *e = load(tmp("u.tsv"), tmp("u.side"), 2, 2, &n);
    uint64_t *h0 = malloc(n * sizeof *h0), *h3 = malloc(n * sizeof *h3);
    size_t n0 = head_ids(e, n, 0, 0, 20, h0), n3 = head_ids(e, n, 3, 0, 20, h3);
    double gone = vanished(h0, n0, e, n, 3, 0), fresh = vanished(h3, n3, e, n, 0, 0);
    double next = vanished(h0, n0, e, n, 1, 0);
    fprintf(stderr, "    field 0: %zu/%zu head ids; vanished by window 3 %.3f, new in window 3 %.3f, vanished by window 1 %.3f\n",
            n0, n3, gone, fresh, next);
    CHECK(n0 > 60 && n3 > 60);
    CHECK_NEAR(gone, 0.3, 0.1);
    CHECK_NEAR(fresh, 0.3, 0.1);
    CHECK_NEAR(next, 0.1, 0.07);
    n0 = head_ids(e, n, 0, 1, 20, h0);
    CHECK(n0 > 20);
    CHECK(vanished(h0, n0, e, n, 3, 1) == 0.0);
    free(h0), free(h3), free(e);
}

/* Per-id empirical log-odds of field 0 in window t (ids 0..nid-1 by the written value
 * order of window 0's ids), for the ids in `ids`. */
static void id_logodds(const ex *e, size_t n, int t, const uint64_t *ids, size_t nid, double *out) {
    for (size_t k = 0; k < nid; k++) {
        double cl = 0, cnt = 0;
        for (size_t i = 0; i < n; i++)
            if (e[i].t == t && !(e[i].missing & 1) && e[i].ids[0] == ids[k]) cnt++, cl += e[i].label;
        out[k] = log((cl + 0.5) / (cnt - cl + 0.5));
    }
}

static double corr(const double *a, const double *b, size_t n) {
    double ma = 0, mb = 0, sab = 0, saa = 0, sbb = 0;
    for (size_t i = 0; i < n; i++) ma += a[i], mb += b[i];
    ma /= (double)n, mb /= (double)n;
    for (size_t i = 0; i < n; i++)
        sab += (a[i] - ma) * (b[i] - mb), saa += (a[i] - ma) * (a[i] - ma), sbb += (b[i] - mb) * (b[i] - mb);
    return sab / sqrt(saa * sbb);
}

/* Model-free weight drift: with drift = pi/6 per window, the per-id click log-odds of
 * window 3 (theta = pi/2) are uncorrelated with window 0's and window 6's (theta = pi)
 * are anti-correlated; with drift = 0 they stay correlated. */
static void test_weight_drift(void) {
    em_drift_cfg c = em_drift_default();
    const int64_t card[2] = {40, 40};
    c.base.num_dense = 1, c.base.num_sparse = 2, c.base.cardinality = card;
    c.base.zipf_s = 0.3, c.base.id_scale = 1.0, c.base.interaction_scale = 0;
    c.base.bias = -0.5, c.vertical_bias = 0;
    c.rows = 7 * 16000, c.windows = 7, c.turnover = 0;
    double r[2][3];
    for (int run = 0; run < 2; run++) {
        c.drift = run ? M_PI / 6 : 0;
        CHECK_OK(em_gen_drift_write(&c, tmp("w.tsv"), tmp("w.side"), NULL, NULL));
        size_t n;
        ex *e = load(tmp("w.tsv"), tmp("w.side"), 1, 2, &n);
        uint64_t ids[64];
        size_t nid = head_ids(e, n, 0, 0, 1, ids);
        CHECK(nid == 40);
        double l0[64], l3[64], l6[64];
        id_logodds(e, n, 0, ids, nid, l0);
        id_logodds(e, n, 3, ids, nid, l3);
        id_logodds(e, n, 6, ids, nid, l6);
        r[run][0] = corr(l0, l3, nid), r[run][1] = corr(l0, l6, nid);
        fprintf(stderr, "    drift %.3f: corr(w0, w3) %.3f corr(w0, w6) %.3f\n", c.drift, r[run][0], r[run][1]);
        free(e);
    }
    CHECK(r[0][0] > 0.85 && r[0][1] > 0.85);
    CHECK(fabs(r[1][0]) < 0.45);
    CHECK(r[1][1] < -0.8);
}

static void test_errors(void) {
    const em_drift_cfg d = em_drift_default();
    em_drift_cfg c;
    const char *a = tmp("e.tsv"), *b = tmp("e.side");
#define BAD(stmt)                                                                \
    do {                                                                         \
        c = d;                                                                   \
        c.rows = 100, c.windows = 2;                                             \
        stmt;                                                                    \
        CHECK(em_gen_drift_write(&c, a, b, NULL, NULL) == EM_ERR_INVALID);       \
    } while (0)
    BAD(c.windows = 0);
    BAD(c.windows = 101);
    BAD(c.rows = 0);
    BAD(c.verticals = 0);
    BAD(c.verticals = EM_DRIFT_MAX_VERTICALS + 1);
    const double neg[3] = {0.5, -0.1, 0.6}, zero[3] = {0, 0, 0}, nan3[3] = {0.5, NAN, 0.2};
    BAD(c.shares = neg);
    BAD(c.shares = zero);
    BAD(c.shares = nan3);
    BAD(c.turnover = 1.5);
    BAD(c.turnover = -0.1);
    BAD(c.drift = -1);
    BAD(c.drift = INFINITY);
    BAD(c.vertical_scale = NAN);
    BAD(c.vertical_bias = -1);
    BAD(c.churn_min_card = 0);
    BAD(c.base.latent_dim = 0);
    BAD(c.base.zipf_s = 0);
    const int64_t badcard[26] = {0};
    BAD(c.base.cardinality = badcard);
#undef BAD
    c = d;
    c.rows = 100, c.windows = 2;
    CHECK(em_gen_drift_write(NULL, a, b, NULL, NULL) == EM_ERR_INVALID);
    CHECK(em_gen_drift_write(&c, NULL, b, NULL, NULL) == EM_ERR_INVALID);
    CHECK(em_gen_drift_write(&c, a, NULL, NULL, NULL) == EM_ERR_INVALID);
    CHECK(em_gen_drift_write(&c, "-", "-", NULL, NULL) == EM_ERR_INVALID);
    CHECK(em_gen_drift_write(&c, a, b, "/nonexistent_dir/x.sum", NULL) == EM_ERR_IO);
    CHECK(strstr(em_last_error(), "/nonexistent_dir/x.sum") != NULL);
    /* allocation failures are reported and leak nothing */
    for (long k = 0; k < 16; k++) {
        size_t base = em_mem_in_use();
        em_mem_fail_after(k);
        em_status s = em_gen_drift_write(&c, a, b, tmp("e.sum"), NULL);
        em_mem_fail_after(-1);
        CHECK(s == EM_OK || s == EM_ERR_NOMEM);
        CHECK(em_mem_in_use() == base);
        if (s == EM_OK) break;
    }
    /* custom shares and a single vertical work */
    const double sh[2] = {3, 1};
    c.verticals = 2, c.shares = sh;
    CHECK_OK(em_gen_drift_write(&c, a, b, NULL, NULL));
    c.verticals = 1, c.shares = NULL;
    CHECK_OK(em_gen_drift_write(&c, a, b, NULL, NULL));
}

TEST_MAIN({"determinism", test_determinism}, {"shares_auc", test_shares_auc}, {"turnover", test_turnover},
          {"weight_drift", test_weight_drift}, {"errors", test_errors})
