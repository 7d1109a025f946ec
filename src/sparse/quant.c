/*
 * quant.c - fp16 and int8 row-quantized embedding tables for inference, and their
 * pooled forward (ember/quant.h has the formats and the error bounds).
 *
 * Design:
 * - One allocation holds every table's rows back to back with a fixed row stride per
 *   type, so a row is found by one multiply and the hot loop touches one cache line
 *   per row for D = 16 (24 bytes int8, 32 bytes fp16).
 * - int8 follows FBGEMM's fused 8-bit row-wise format (codes, then fp32 scale and
 *   bias in the same row): min/max affine, so a row's full range is used whatever
 *   its offset. Dequantization is one fma per value: fmaf(w*scale, q, w*bias), then
 *   added to the bag's accumulator; the vector path does the same IEEE operations
 *   in the same order, so it is bitwise equal to the scalar one.
 * - int8c ("compact") spends 2 bytes a row on the quantization parameters instead of
 *   8, so a D = 16 row is 18 bytes (3.56x smaller than fp32) where FBGEMM's layout
 *   needs 24 (2.67x). The two bytes pack a 7-bit log-scale code e (the step is
 *   s = 2^(e/4 - 24): quarter octaves from 2^-24 to 2^7.75) and a 9-bit signed offset
 *   o in [-256, 255], and a value is s * (q + o). Choosing the smallest step whose grid
 *   [s o, s (o + 255)] holds the row's [min, max] costs at most 2^(1/4) (19%) over the
 *   step (max - min) / 254 when the row's range is within about its own width
 *   of zero (|min| <= 256 s), which holds for embedding rows, initialised symmetric
 *   around 0; a row far from zero gets a coarser step (the error bound below holds
 *   whatever the row). Dequantization is the same fma as int8 with bias = s * o.
 * - fp16 <-> fp32 uses F16C where the compiler targets it (vcvtps2ph / vcvtph2ps,
 *   round to nearest even) and an exact scalar conversion otherwise; both give the
 *   same bits.
 * - The forward validates offsets and indices serially first (a sequential read of
 *   the index array, cheap next to the random row reads), so the parallel part has
 *   no error path and needs no per-worker scratch: it allocates nothing. Bags are
 *   taken in chunks from an atomic counter; each bag is pooled by one worker in index
 *   order, so the result is independent of the thread count.
 *
 * SIMD: these conversions exist only here, so they live in this file (guarded, with
 * scalar fallbacks) rather than in core/simd.h.
 */
#include <float.h>
#include <math.h>
#include <stdatomic.h>
#include <string.h>

#include "core/half.h"
#include "core/simd.h"
#include "ember/quant.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define EM_Q_AVX2 1
#endif
#if defined(__F16C__)
#include <immintrin.h>
#define EM_Q_F16C 1
#endif

#define Q_PREFETCH 8 /* indices ahead whose rows the forward prefetches */

struct em_qbag {
    em_qtype type;
    int T, D;
    em_pooling pooling;
    size_t stride;      /* bytes per row */
    int64_t *rows;      /* rows[T] */
    size_t *off;        /* byte offset of table t in data */
    unsigned char *data;
    size_t bytes;
};

const char *em_qtype_name(em_qtype t) {
    return t == EM_QT_FP16 ? "fp16" : t == EM_QT_INT8 ? "int8" : t == EM_QT_INT8C ? "int8c" : "fp32";
}

int em_qtype_parse(const char *s, em_qtype *out) {
    if (!s) return -1;
    if (strcmp(s, "fp32") == 0) *out = EM_QT_FP32;
    else if (strcmp(s, "fp16") == 0) *out = EM_QT_FP16;
    else if (strcmp(s, "int8") == 0) *out = EM_QT_INT8;
    else if (strcmp(s, "int8c") == 0) *out = EM_QT_INT8C;
    else return -1;
    return 0;
}

/* fp16 conversions: core/half.h */
#define f32_to_f16 em_f32_to_f16
#define f16_to_f32 em_f16_to_f32

/* ------------------------------------------------------------ row kernels */

/* o[D] += w * row (fp16). */
static inline void acc_f16(float *restrict o, const uint16_t *restrict h, float w, int D) {
    int d = 0;
#if defined(EM_Q_AVX2) && defined(EM_Q_F16C)
    const __m256 vw = _mm256_set1_ps(w);
    for (; d + 8 <= D; d += 8) {
        __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + d)));
        _mm256_storeu_ps(o + d, _mm256_fmadd_ps(vw, v, _mm256_loadu_ps(o + d)));
    }
#endif
    for (; d < D; d++) o[d] = fmaf(w, f16_to_f32(h[d]), o[d]);
}

/* o[D] += fmaf(sw, q, zw) with sw = w * scale, zw = w * bias (int8). */
static inline void acc_i8(float *restrict o, const uint8_t *restrict q, float sw, float zw, int D) {
    int d = 0;
#ifdef EM_Q_AVX2
    const __m256 vs = _mm256_set1_ps(sw), vz = _mm256_set1_ps(zw);
    for (; d + 8 <= D; d += 8) {
        __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + d))));
        _mm256_storeu_ps(o + d, _mm256_add_ps(_mm256_loadu_ps(o + d), _mm256_fmadd_ps(vs, v, vz)));
    }
#endif
    for (; d < D; d++) o[d] += fmaf(sw, (float)q[d], zw);
}

/* int8c step s(e) = 2^(e/4 - 24), e in [0, 127]: exact powers of two times the float
 * nearest 2^(j/4), so every platform decodes the same bits. */
#define I8C_EMAX 127
#define I8C_OMIN (-256)
#define I8C_OMAX 255
static inline float i8c_step(unsigned e) {
    static const float frac[4] = {1.0f, 1.18920712f, 1.41421356f, 1.68179283f};
    return ldexpf(frac[e & 3u], (int)(e >> 2) - 24);
}

/* The row's dequantization: value d = scale * q[d] + bias. */
static inline void row_params(const em_qbag *q, const unsigned char *row, float *scale, float *bias) {
    const int D = q->D;
    if (q->type == EM_QT_INT8C) {
        unsigned p = (unsigned)row[D] | (unsigned)row[D + 1] << 8;
        int o = (int)(p >> 7) + I8C_OMIN;
        *scale = i8c_step(p & 0x7fu);
        *bias = *scale * (float)o;
        return;
    }
    memcpy(scale, row + D, 4);
    memcpy(bias, row + D + 4, 4);
}

/* Quantize x[D] (min mn, max mx) into an int8c row: the smallest step whose grid
 * s * ([0, 255] + o) holds [mn, mx] for some o in [I8C_OMIN, I8C_OMAX], codes rounded
 * to nearest against the decoded bias. A row no step can hold (max - min or |min|
 * beyond about 5.5e4) gets the largest step and clamped codes. */
static void quant_row_i8c(unsigned char *row, const float *x, int D, float mn, float mx) {
    if (!(mn >= -FLT_MAX && mx <= FLT_MAX)) mn = mx = 0.0f; /* inf or NaN: no meaningful grid */
    unsigned e = 0;
    int o = 0;
    for (;; e++) {
        const double s = i8c_step(e);
        if (e == I8C_EMAX) {
            double f = floor((double)mn / s);
            o = f < I8C_OMIN ? I8C_OMIN : f > I8C_OMAX ? I8C_OMAX : (int)f;
            break;
        }
        if ((double)mx - mn > 255.0 * s) continue;
        double f = floor((double)mn / s);
        if (f < I8C_OMIN || f > I8C_OMAX) continue;
        if ((double)mx / s - f > 255.0) continue; /* the top code must reach mx */
        o = (int)f;
        break;
    }
    const float s = i8c_step(e), z = s * (float)o;
    for (int d = 0; d < D; d++) {
        double c = nearbyint(((double)x[d] - z) / s);
        row[d] = (unsigned char)(c >= 0 ? (c <= 255 ? c : 255) : 0); /* NaN -> 0 */
    }
    unsigned p = e | (unsigned)(o - I8C_OMIN) << 7;
    row[D] = (unsigned char)(p & 0xffu), row[D + 1] = (unsigned char)(p >> 8);
}

/* ------------------------------------------------------------ create */

typedef struct {
    em_qbag *q;
    em_embbag *src;
    int t;
} quant_arg;

static void quant_task(void *p, int ith, int nth) {
    const quant_arg *a = p;
    const em_qbag *q = a->q;
    const int D = q->D;
    const float *W = em_embbag_weights(a->src, a->t);
    unsigned char *base = q->data + q->off[a->t];
    size_t lo, hi;
    em_split((size_t)q->rows[a->t], ith, nth, &lo, &hi);
    for (size_t r = lo; r < hi; r++) {
        const float *x = W + r * (size_t)D;
        unsigned char *row = base + r * q->stride;
        if (q->type == EM_QT_FP16) {
            uint16_t *h = (uint16_t *)row;
            int d = 0;
#ifdef EM_Q_F16C
            for (; d + 8 <= D; d += 8)
                _mm_storeu_si128((__m128i *)(h + d), _mm256_cvtps_ph(_mm256_loadu_ps(x + d), _MM_FROUND_TO_NEAREST_INT));
#endif
            for (; d < D; d++) h[d] = f32_to_f16(x[d]);
            continue;
        }
        float mn = x[0], mx = x[0];
        for (int d = 1; d < D; d++) mn = x[d] < mn ? x[d] : mn, mx = x[d] > mx ? x[d] : mx;
        if (q->type == EM_QT_INT8C) {
            quant_row_i8c(row, x, D, mn, mx);
            continue;
        }
        float scale = (mx - mn) / 255.0f;
        for (int d = 0; d < D; d++) {
            float c = scale > 0 ? nearbyintf((x[d] - mn) / scale) : 0.0f;
            row[d] = (unsigned char)(c < 0 ? 0 : c > 255 ? 255 : c);
        }
        memset(row + D, 0, q->stride - (size_t)D);
        memcpy(row + D, &scale, 4);
        memcpy(row + D + 4, &mn, 4);
    }
}

em_status em_qbag_create(em_qbag **out, em_embbag *src, em_qtype type, em_pooling pooling, em_pool *pool) {
    *out = NULL;
    if (!src) return em_errorf(EM_ERR_INVALID, "quant: no embedding bag");
    if (type != EM_QT_FP16 && type != EM_QT_INT8 && type != EM_QT_INT8C)
        return em_errorf(EM_ERR_INVALID, "quant: type %d is not fp16, int8 or int8c", (int)type);
    const int T = em_embbag_num_tables(src), D = em_embbag_dim(src);
    em_qbag *q = em_calloc(1, sizeof *q);
    if (!q) return em_errorf(EM_ERR_NOMEM, "quant: out of memory");
    q->type = type, q->T = T, q->D = D, q->pooling = pooling;
    q->stride = type == EM_QT_FP16 ? (size_t)D * 2 : type == EM_QT_INT8C ? (size_t)D + 2 : ((size_t)D + 8 + 3) / 4 * 4;
    q->rows = em_malloc((size_t)T * sizeof(int64_t));
    q->off = em_malloc((size_t)T * sizeof(size_t));
    if (!q->rows || !q->off) goto nomem;
    size_t total = 0;
    for (int t = 0; t < T; t++) {
        q->rows[t] = em_embbag_rows(src, t);
        q->off[t] = total;
        total += (size_t)q->rows[t] * q->stride;
    }
    q->bytes = total;
    if (!(q->data = em_malloc(total ? total : 1))) goto nomem;
    for (int t = 0; t < T; t++) {
        quant_arg a = {q, src, t};
        em_pool_run((size_t)q->rows[t] >= 4096 ? pool : NULL, quant_task, &a);
    }
    *out = q;
    return EM_OK;
nomem:
    em_qbag_free(q);
    return em_errorf(EM_ERR_NOMEM, "quant: no memory for the quantized tables");
}

void em_qbag_free(em_qbag *q) {
    if (!q) return;
    em_free(q->data), em_free(q->rows), em_free(q->off);
    em_free(q);
}

em_qtype em_qbag_type(const em_qbag *q) { return q->type; }
int em_qbag_num_tables(const em_qbag *q) { return q->T; }
int em_qbag_dim(const em_qbag *q) { return q->D; }
int64_t em_qbag_rows(const em_qbag *q, int t) { return q->rows[t]; }
size_t em_qbag_table_bytes(const em_qbag *q, int t) { return (size_t)q->rows[t] * q->stride; }
size_t em_qbag_bytes(const em_qbag *q) { return q->bytes; }

float em_qbag_row_step(const em_qbag *q, int t, int64_t r) {
    if (q->type == EM_QT_FP16) return 0.0f;
    float s, z;
    row_params(q, q->data + q->off[t] + (size_t)r * q->stride, &s, &z);
    return s;
}

void em_qbag_dequant_row(const em_qbag *q, int t, int64_t r, float *out) {
    const unsigned char *row = q->data + q->off[t] + (size_t)r * q->stride;
    memset(out, 0, (size_t)q->D * sizeof(float));
    if (q->type == EM_QT_FP16) {
        acc_f16(out, (const uint16_t *)row, 1.0f, q->D);
    } else {
        float s, z;
        row_params(q, row, &s, &z);
        acc_i8(out, row, s, z, q->D);
    }
}

/* ------------------------------------------------------------ forward */

typedef struct {
    const em_qbag *q;
    float *out;
    const int64_t *idx, *off;
    const float *pw;
    int B;
    size_t chunk;       /* bags per work chunk */
    atomic_size_t next; /* next chunk to take */
} fwd_arg;

/* Pool bags [lo, hi) (table-major bag numbers); indices were validated. */
static void fwd_bags(const fwd_arg *a, size_t lo, size_t hi) {
    const em_qbag *q = a->q;
    const int T = q->T, B = a->B, D = q->D;
    const size_t stride = q->stride;
    const int64_t *idx = a->idx, *off = a->off;
    const float *pw = a->pw;
    for (size_t u = lo; u < hi; u++) {
        const int t = (int)(u / (size_t)B), b = (int)(u % (size_t)B);
        const unsigned char *base = q->data + q->off[t];
        float *o = a->out + ((size_t)b * (size_t)T + (size_t)t) * (size_t)D;
        const int64_t k0 = off[u], k1 = off[u + 1], kt = off[(size_t)(t + 1) * (size_t)B];
        memset(o, 0, (size_t)D * sizeof(float));
        for (int64_t k = k0; k < k1; k++) {
            if (k + Q_PREFETCH < kt) __builtin_prefetch(base + (size_t)idx[k + Q_PREFETCH] * stride, 0, 3);
            const unsigned char *row = base + (size_t)idx[k] * stride;
            const float w = pw ? pw[k] : 1.0f;
            if (q->type == EM_QT_FP16) {
                acc_f16(o, (const uint16_t *)row, w, D);
            } else {
                float s, z;
                row_params(q, row, &s, &z);
                acc_i8(o, row, w * s, w * z, D);
            }
        }
        if (q->pooling == EM_POOL_MEAN && k1 > k0) em_vscale(o, 1.0f / (float)(k1 - k0), (size_t)D);
    }
}

static void fwd_task(void *p, int ith, int nth) {
    (void)ith, (void)nth;
    fwd_arg *a = p;
    const size_t units = (size_t)a->q->T * (size_t)a->B;
    for (;;) {
        size_t lo = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed) * a->chunk;
        if (lo >= units) break;
        fwd_bags(a, lo, lo + a->chunk < units ? lo + a->chunk : units);
    }
}

em_status em_qbag_forward(const em_qbag *q, float *out, const int64_t *indices, const int64_t *offsets,
                          const float *per_id_w, int B, em_pool *pool) {
    if (!q || !out) return em_errorf(EM_ERR_INVALID, "quant forward: NULL object or output");
    if (B < 0) return em_errorf(EM_ERR_INVALID, "quant forward: batch size %d", B);
    if (!offsets) return em_errorf(EM_ERR_INVALID, "quant forward: offsets is NULL");
    const size_t units = (size_t)q->T * (size_t)B;
    if (offsets[0] != 0) return em_errorf(EM_ERR_INVALID, "quant forward: offsets[0] = %lld, expected 0", (long long)offsets[0]);
    for (size_t u = 0; u < units; u++)
        if (offsets[u + 1] < offsets[u])
            return em_errorf(EM_ERR_INVALID, "quant forward: offsets decrease at table %d, example %d",
                             (int)(u / (size_t)B), (int)(u % (size_t)B));
    if (offsets[units] && !indices) return em_errorf(EM_ERR_INVALID, "quant forward: indices is NULL");
    for (size_t u = 0; u < units; u++) {
        const int t = (int)(u / (size_t)B);
        for (int64_t k = offsets[u]; k < offsets[u + 1]; k++)
            if ((uint64_t)indices[k] >= (uint64_t)q->rows[t])
                return em_errorf(EM_ERR_INVALID, "quant forward: table %d, example %d: index %lld not in [0, %lld)", t,
                                 (int)(u % (size_t)B), (long long)indices[k], (long long)q->rows[t]);
    }
    if (B == 0) return EM_OK;
    const int nth = em_pool_nth(pool);
    size_t chunk = units / ((size_t)nth * 8);
    fwd_arg a = {q, out, indices, offsets, per_id_w, B, chunk > 16 ? chunk : 16, 0};
    em_pool_run(units >= 64 ? pool : NULL, fwd_task, &a);
    return EM_OK;
}
