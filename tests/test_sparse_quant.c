/*
 * test_sparse_quant.c - fp16 / int8 row-quantized embedding bags: conversions
 * (round to nearest even, special values), the int8 per-row bound, pooled forward
 * within the documented error of the fp32 bag (sum, mean, per-id weights), bitwise
 * independence of the thread count, index validation, sizes, allocation failures.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ember/quant.h"
#include "test.h"

static em_embbag *make_bag(int T, const int64_t *rows, int D, em_pooling pk, uint64_t seed) {
    em_optim_cfg o;
    memset(&o, 0, sizeof o);
    o.kind = EM_OPT_SGD, o.lr = 0.1f;
    em_embbag_cfg c = {T, rows, D, pk, o};
    em_embbag *e = NULL;
    CHECK_OK(em_embbag_create(&e, &c));
    /* rows with varied offsets and ranges, like trained tables */
    em_rng r;
    em_rng_seed(&r, seed);
    for (int t = 0; t < T; t++) {
        float *w = em_embbag_weights(e, t);
        for (int64_t i = 0; i < rows[t]; i++) {
            float center = (float)(em_rng_uniform(&r) * 2 - 1), spread = (float)(em_rng_uniform(&r) * 0.5 + 1e-3);
            for (int d = 0; d < D; d++) w[i * D + d] = center + spread * (float)(em_rng_uniform(&r) * 2 - 1);
        }
    }
    return e;
}

typedef struct {
    int64_t *idx, *off;
    float *pw;
} bags;

static bags make_bags(int T, const int64_t *rows, int B, int maxlen, int weighted, uint64_t seed) {
    em_rng r;
    em_rng_seed(&r, seed);
    bags g;
    g.off = malloc(((size_t)T * B + 1) * sizeof(int64_t));
    g.off[0] = 0;
    for (size_t u = 0; u < (size_t)T * B; u++) g.off[u + 1] = g.off[u] + (int64_t)em_rng_below(&r, (uint64_t)maxlen + 1);
    size_t nnz = (size_t)g.off[(size_t)T * B];
    g.idx = malloc((nnz + 1) * sizeof(int64_t));
    g.pw = weighted ? malloc((nnz + 1) * sizeof(float)) : NULL;
    for (int t = 0; t < T; t++)
        for (int64_t k = g.off[(size_t)t * B]; k < g.off[(size_t)(t + 1) * B]; k++) {
            g.idx[k] = (int64_t)em_rng_below(&r, (uint64_t)rows[t]);
            if (weighted) g.pw[k] = (float)(em_rng_uniform(&r) * 2 - 0.5);
        }
    return g;
}

static void free_bags(bags *g) { free(g->idx), free(g->off), free(g->pw); }

static void test_fp16_values(void) {
    /* one table of D = 11 (a vector part and a scalar tail) holding special values */
    const float v[11] = {0.0f, -0.0f, 1.0f, 65504.0f, 5.9604645e-8f /* 2^-24 */, 1.0f + 0x1p-11f /* tie: even */,
                         1.0f + 3 * 0x1p-11f /* tie: up */, -2.5f, 1e-3f, 70000.0f /* overflow */, 3.0e-6f};
    const float want[11] = {0.0f, -0.0f, 1.0f, 65504.0f, 5.9604645e-8f, 1.0f, 1.0f + 0x1p-9f, -2.5f,
                            0.0010004044f, INFINITY, 2.9802322e-6f};
    int64_t rows[1] = {1};
    em_embbag *e = make_bag(1, rows, 11, EM_POOL_SUM, 1);
    memcpy(em_embbag_weights(e, 0), v, sizeof v);
    em_qbag *q;
    CHECK_OK(em_qbag_create(&q, e, EM_QT_FP16, EM_POOL_SUM, NULL));
    float got[11];
    em_qbag_dequant_row(q, 0, 0, got);
    /* dequantization accumulates into zeros, so -0 reads back as +0 (equal) */
    for (int i = 0; i < 11; i++) CHECK(got[i] == want[i]);
    CHECK(em_qbag_table_bytes(q, 0) == 22 && em_qbag_bytes(q) == 22 && em_qbag_type(q) == EM_QT_FP16);
    em_qbag_free(q);
    em_embbag_free(e);
}

static void test_int8_rows(void) {
    const int D = 16;
    int64_t rows[2] = {300, 5};
    em_embbag *e = make_bag(2, rows, D, EM_POOL_SUM, 2);
    float *w1 = em_embbag_weights(e, 1);
    for (int d = 0; d < D; d++) w1[d] = 0.375f; /* a constant row is exact */
    em_qbag *q;
    CHECK_OK(em_qbag_create(&q, e, EM_QT_INT8, EM_POOL_SUM, NULL));
    CHECK(em_qbag_table_bytes(q, 0) == 300 * 24 && em_qbag_bytes(q) == 305 * 24);
    CHECK(em_qbag_num_tables(q) == 2 && em_qbag_dim(q) == D && em_qbag_rows(q, 1) == 5);
    float got[16];
    em_qbag_dequant_row(q, 1, 0, got);
    for (int d = 0; d < D; d++) CHECK(got[d] == 0.375f);
    int bad = 0;
    for (int64_t r = 0; r < rows[0]; r++) {
        const float *x = em_embbag_weights(e, 0) + r * D;
        float mn = x[0], mx = x[0];
        for (int d = 1; d < D; d++) mn = fminf(mn, x[d]), mx = fmaxf(mx, x[d]);
        em_qbag_dequant_row(q, 0, r, got);
        double tol = (mx - mn) / 255.0 / 2 + 0x1p-22 * (fabs(mx) + fabs(mn));
        for (int d = 0; d < D; d++) bad += fabs((double)got[d] - x[d]) > tol;
        /* the extremes are representable: min exactly, max within rounding */
        float dmin = got[0], dmax = got[0];
        for (int d = 1; d < D; d++) dmin = fminf(dmin, got[d]), dmax = fmaxf(dmax, got[d]);
        bad += dmin != mn || fabs((double)dmax - mx) > 0x1p-22 * (fabs(mx) + fabs(mn));
    }
    CHECK(bad == 0);
    em_qbag_free(q);
    em_embbag_free(e);
}

/* Pooled forward vs the fp32 bag, within the bound of ember/quant.h. */
static void check_forward(em_qtype type, em_pooling pk, int weighted, int D) {
    const int T = 5, B = 37;
    int64_t rows[5] = {1000, 3, 257, 64, 5000};
    em_embbag *e = make_bag(T, rows, D, pk, 3 + (uint64_t)D);
    bags g = make_bags(T, rows, B, 7, weighted, 9);
    float *ref = malloc((size_t)B * T * D * sizeof(float)), *got = malloc((size_t)B * T * D * sizeof(float));
    CHECK_OK(em_embbag_forward(e, ref, g.idx, g.off, g.pw, B, NULL));
    em_qbag *q;
    CHECK_OK(em_qbag_create(&q, e, type, pk, NULL));
    CHECK_OK(em_qbag_forward(q, got, g.idx, g.off, g.pw, B, NULL));
    int bad = 0;
    double worst = 0;
    for (int t = 0; t < T; t++)
        for (int b = 0; b < B; b++) {
            int64_t k0 = g.off[(size_t)t * B + b], k1 = g.off[(size_t)t * B + b + 1];
            double bound = 0, mag = 0;
            for (int64_t k = k0; k < k1; k++) {
                const float *x = em_embbag_weights(e, t) + g.idx[k] * D;
                float mn = x[0], mx = x[0];
                for (int d = 1; d < D; d++) mn = fminf(mn, x[d]), mx = fmaxf(mx, x[d]);
                double aw = g.pw ? fabs(g.pw[k]) : 1.0;
                double step = em_qbag_row_step(q, t, g.idx[k]);
                double per = type == EM_QT_FP16 ? 0x1p-11 * fmax(fabs(mx), fabs(mn))
                                                : step / 2 + 0x1p-22 * (fabs(mx) + fabs(mn) + step);
                bound += aw * per, mag += aw * fmax(fabs(mx), fabs(mn));
            }
            bound += 0x1p-21 * (double)(k1 - k0 + 1) * mag; /* fp32 rounding of the two sums */
            if (pk == EM_POOL_MEAN && k1 > k0) bound /= (double)(k1 - k0);
            for (int d = 0; d < D; d++) {
                size_t i = ((size_t)b * T + t) * D + d;
                double err = fabs((double)got[i] - ref[i]);
                if (err > bound) bad++;
                if (bound > 0 && err / bound > worst) worst = err / bound;
                if (k1 == k0 && got[i] != 0.0f) bad++;
            }
        }
    CHECK(bad == 0);
    CHECK(worst > 0 && worst <= 1); /* quantization really happened, within the bound */
    em_qbag_free(q);
    em_embbag_free(e);
    free_bags(&g);
    free(ref), free(got);
}

static void test_forward_int8(void) {
    check_forward(EM_QT_INT8, EM_POOL_SUM, 0, 16);
    check_forward(EM_QT_INT8, EM_POOL_MEAN, 0, 16);
    check_forward(EM_QT_INT8, EM_POOL_SUM, 1, 16);
    check_forward(EM_QT_INT8, EM_POOL_MEAN, 1, 13); /* a scalar tail, padded rows */
}

static void test_forward_int8c(void) {
    check_forward(EM_QT_INT8C, EM_POOL_SUM, 0, 16);
    check_forward(EM_QT_INT8C, EM_POOL_MEAN, 1, 16);
    check_forward(EM_QT_INT8C, EM_POOL_SUM, 1, 13);
}

static void test_forward_fp16(void) {
    check_forward(EM_QT_FP16, EM_POOL_SUM, 0, 16);
    check_forward(EM_QT_FP16, EM_POOL_MEAN, 1, 16);
    check_forward(EM_QT_FP16, EM_POOL_SUM, 1, 13);
}

static void test_threads(void) {
    const int T = 4, B = 300, D = 20;
    int64_t rows[4] = {100000, 17, 4096, 999};
    em_embbag *e = make_bag(T, rows, D, EM_POOL_SUM, 4);
    bags g = make_bags(T, rows, B, 12, 1, 5);
    size_t n = (size_t)B * T * D;
    float *o1 = malloc(n * sizeof(float)), *o3 = malloc(n * sizeof(float));
    for (int ty = EM_QT_FP16; ty <= EM_QT_INT8C; ty++) {
        em_pool *p3;
        CHECK_OK(em_pool_create(&p3, 3));
        em_qbag *q1, *q3;
        CHECK_OK(em_qbag_create(&q1, e, (em_qtype)ty, EM_POOL_SUM, NULL));
        CHECK_OK(em_qbag_create(&q3, e, (em_qtype)ty, EM_POOL_SUM, p3));
        CHECK(em_qbag_bytes(q1) == em_qbag_bytes(q3));
        float r1[20], r3[20];
        int same = 1;
        for (int64_t r = 0; r < rows[0]; r += 997) {
            em_qbag_dequant_row(q1, 0, r, r1), em_qbag_dequant_row(q3, 0, r, r3);
            same &= memcmp(r1, r3, sizeof r1) == 0;
        }
        CHECK(same);
        CHECK_OK(em_qbag_forward(q1, o1, g.idx, g.off, g.pw, B, NULL));
        CHECK_OK(em_qbag_forward(q1, o3, g.idx, g.off, g.pw, B, p3));
        CHECK(memcmp(o1, o3, n * sizeof(float)) == 0);
        em_qbag_free(q1), em_qbag_free(q3);
        em_pool_free(p3);
    }
    free(o1), free(o3);
    free_bags(&g);
    em_embbag_free(e);
}

static void test_invalid(void) {
    int64_t rows[2] = {10, 20};
    em_embbag *e = make_bag(2, rows, 8, EM_POOL_SUM, 6);
    em_qbag *q = (em_qbag *)1;
    CHECK(em_qbag_create(&q, e, EM_QT_FP32, EM_POOL_SUM, NULL) == EM_ERR_INVALID && q == NULL);
    CHECK(em_qbag_create(&q, NULL, EM_QT_INT8, EM_POOL_SUM, NULL) == EM_ERR_INVALID);
    CHECK_OK(em_qbag_create(&q, e, EM_QT_INT8, EM_POOL_SUM, NULL));
    /* B = 2: bags (t0,b0) (t0,b1) (t1,b0) (t1,b1) */
    int64_t off[5] = {0, 1, 2, 3, 4}, idx[4] = {0, 9, 19, 20};
    float out[2 * 2 * 8];
    for (int i = 0; i < 32; i++) out[i] = 7.0f;
    CHECK(em_qbag_forward(q, out, idx, off, NULL, 2, NULL) == EM_ERR_INVALID); /* 20 >= rows[1] */
    idx[3] = -1;
    CHECK(em_qbag_forward(q, out, idx, off, NULL, 2, NULL) == EM_ERR_INVALID);
    int untouched = 1;
    for (int i = 0; i < 32; i++) untouched &= out[i] == 7.0f;
    CHECK(untouched);
    idx[3] = 3;
    int64_t off_bad[5] = {0, 2, 1, 3, 4};
    CHECK(em_qbag_forward(q, out, idx, off_bad, NULL, 2, NULL) == EM_ERR_INVALID);
    off_bad[0] = 1;
    CHECK(em_qbag_forward(q, out, idx, off_bad, NULL, 2, NULL) == EM_ERR_INVALID);
    CHECK(em_qbag_forward(q, out, idx, off, NULL, -1, NULL) == EM_ERR_INVALID);
    CHECK_OK(em_qbag_forward(q, out, idx, off, NULL, 2, NULL));
    CHECK_OK(em_qbag_forward(q, out, NULL, off, NULL, 0, NULL));
    em_qtype t;
    CHECK(em_qtype_parse("int8", &t) == 0 && t == EM_QT_INT8);
    CHECK(em_qtype_parse("fp16", &t) == 0 && t == EM_QT_FP16 && strcmp(em_qtype_name(t), "fp16") == 0);
    CHECK(em_qtype_parse("fp32", &t) == 0 && t == EM_QT_FP32);
    CHECK(em_qtype_parse("int8c", &t) == 0 && t == EM_QT_INT8C);
    CHECK(em_qtype_parse("int4", &t) == -1);
    em_qbag_free(q);
    em_qbag_free(NULL);
    em_embbag_free(e);
}

static void test_alloc_failure(void) {
    int64_t rows[3] = {50, 60, 70};
    em_embbag *e = make_bag(3, rows, 16, EM_POOL_SUM, 7);
    size_t before = em_mem_in_use();
    int failures = 0;
    for (long n = 0; n < 10; n++) {
        em_mem_fail_after(n);
        em_qbag *q = NULL;
        em_status st = em_qbag_create(&q, e, EM_QT_INT8, EM_POOL_SUM, NULL);
        em_mem_fail_after(-1);
        if (st) {
            failures++;
            CHECK(st == EM_ERR_NOMEM && q == NULL);
        }
        em_qbag_free(q);
        CHECK(em_mem_in_use() == before);
    }
    CHECK(failures >= 3);
    em_embbag_free(e);
}

/* int8c: 18-byte rows at D = 16, every value within step / 2 of fp32 (a constant row
 * too), a zero row exact, the step within 2^(1/4) of (max - min) / 254 for rows that straddle
 * zero, the extreme step codes, and non-finite values neither crash nor poison the
 * table's other rows. */
static void test_int8c_rows(void) {
    const int D = 16;
    int64_t rows[2] = {2000, 6};
    em_embbag *e = make_bag(2, rows, D, EM_POOL_SUM, 12);
    float *w0 = em_embbag_weights(e, 0), *w1 = em_embbag_weights(e, 1);
    /* rows 0..999 of table 0: symmetric around zero with ranges over 12 decades */
    em_rng r;
    em_rng_seed(&r, 77);
    for (int64_t i = 0; i < 1000; i++) {
        double mag = pow(10.0, -8.0 + 11.0 * (double)i / 1000.0); /* 1e-8 .. 1e3 */
        for (int d = 0; d < D; d++) w0[i * D + d] = (float)(mag * (em_rng_uniform(&r) * 2 - 1));
    }
    for (int d = 0; d < D; d++) {
        w1[0 * D + d] = 0.375f;                      /* constant */
        w1[1 * D + d] = 0.0f;                        /* zero */
        w1[2 * D + d] = d == 3 ? NAN : 0.25f;        /* NaN */
        w1[3 * D + d] = d == 5 ? INFINITY : -0.5f;   /* inf */
        w1[4 * D + d] = 1e30f * (d % 2 ? 1 : -1);    /* beyond the largest step */
        w1[5 * D + d] = 1e-30f * (float)d;           /* below the smallest step */
    }
    em_qbag *q;
    CHECK_OK(em_qbag_create(&q, e, EM_QT_INT8C, EM_POOL_SUM, NULL));
    CHECK(em_qbag_type(q) == EM_QT_INT8C && em_qbag_table_bytes(q, 0) == 2000 * 18 && em_qbag_bytes(q) == 2006 * 18);
    CHECK(strcmp(em_qtype_name(EM_QT_INT8C), "int8c") == 0);
    float got[16];
    int bad = 0, loose = 0;
    for (int64_t i = 0; i < rows[0]; i++) {
        const float *x = w0 + i * D;
        float mn = x[0], mx = x[0];
        for (int d = 1; d < D; d++) mn = fminf(mn, x[d]), mx = fmaxf(mx, x[d]);
        em_qbag_dequant_row(q, 0, i, got);
        double step = em_qbag_row_step(q, 0, i);
        double tol = step / 2 + 0x1p-22 * (fabs(mx) + fabs(mn) + step);
        for (int d = 0; d < D; d++) bad += fabs((double)got[d] - x[d]) > tol;
        if (i < 1000 && mn < 0 && mx > 0 && (mx - mn) / 255.0 >= 0x1p-24) loose += step > 1.18920713 * (mx - mn) / 254.0 * (1 + 1e-6);
    }
    CHECK(bad == 0);
    CHECK(loose == 0);
    em_qbag_dequant_row(q, 1, 0, got);
    for (int d = 0; d < D; d++) bad += fabsf(got[d] - 0.375f) > em_qbag_row_step(q, 1, 0) / 2;
    em_qbag_dequant_row(q, 1, 1, got);
    for (int d = 0; d < D; d++) bad += got[d] != 0.0f;
    em_qbag_dequant_row(q, 1, 5, got);
    for (int d = 0; d < D; d++) bad += fabs((double)got[d] - 1e-30 * d) > 0x1p-25;
    CHECK(bad == 0);
    em_qbag_dequant_row(q, 1, 4, got); /* clamped to the largest step's grid: finite */
    for (int d = 0; d < D; d++) bad += !isfinite(got[d]);
    CHECK(bad == 0);
    em_qbag_free(q);
    em_embbag_free(e);
}

TEST_MAIN({"fp16_values", test_fp16_values}, {"int8_rows", test_int8_rows}, {"int8c_rows", test_int8c_rows},
          {"forward_int8c", test_forward_int8c}, {"forward_int8", test_forward_int8},
          {"forward_fp16", test_forward_fp16}, {"threads", test_threads}, {"invalid", test_invalid},
          {"alloc_failure", test_alloc_failure})
