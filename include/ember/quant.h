/*
 * ember/quant.h - quantized table-batched embedding bags for inference.
 *
 *   em_qbag *q;
 *   em_qbag_create(&q, em_dlrm_embbag(model), EM_QT_INT8, EM_POOL_SUM, pool);  // quantizes a copy
 *   em_qbag_forward(q, pooled, indices, offsets, NULL, B, pool);   // pooled (B, T, D)
 *   em_qbag_free(q);
 *
 * Two row formats, built once from an em_embbag's fp32 tables:
 *   EM_QT_FP16: every value as IEEE binary16 (round to nearest even); 2 D bytes a row.
 *   EM_QT_INT8: FBGEMM's fused 8-bit row-wise layout: D uint8 codes, then the row's
 *               fp32 scale and fp32 bias (its minimum), the row padded to 4 bytes:
 *               x ~= scale * q + bias, scale = (max - min) / 255, q = round((x - min) / scale).
 *               D + 8 bytes a row for D % 4 == 0 (24 for D = 16: 2.67x smaller than fp32;
 *               the ratio 4D / (D + 8) reaches 3.5x at D = 56).
 *   EM_QT_INT8C: compact 8-bit rows: D uint8 codes, then 2 bytes (uint16 LE) packing a
 *               7-bit step code e (bits 0-6) and a 9-bit offset o + 256 (bits 7-15):
 *               x ~= s * (q + o), s = 2^(e/4 - 24), o in [-256, 255]. D + 2 bytes a row
 *               (18 for D = 16: 3.56x smaller than fp32). The step is the smallest on
 *               the grid whose codes span the row's [min, max]; for rows within about
 *               their own width of zero (embedding rows) it is at most 2^(1/4) (max - min) / 254,
 *               about 19% over the int8 step (max - min) / 255.
 *
 * Error: an fp16 value is within 2^-11 relative of the fp32 one (normal range); an
 * int8 or int8c value within step / 2 (plus fp32 rounding) of it, step being the row's
 * em_qbag_row_step, so a pooled sum is within
 * sum_k |w_k| * (scale_k / 2 + 2^-22 * (|max_k| + |min_k|)) of the fp32 pooling (mean: that
 * over the bag length), plus the fp32 rounding of the sum itself. tests/test_sparse_quant.c checks exactly this bound.
 *
 * The forward takes the same jagged bags as em_embbag_forward (table-major offsets of
 * length T*B + 1, per-id weights optional, empty bag = zeros) and dequantizes each row
 * on the fly while pooling. Each bag is pooled by one worker in index order, so the
 * output is bitwise independent of the thread count. The object is read-only after
 * creation: several threads may run forwards on it at once.
 */
#ifndef EMBER_QUANT_H
#define EMBER_QUANT_H

#include "core.h"
#include "embbag.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { EM_QT_FP32 = 0, EM_QT_FP16, EM_QT_INT8, EM_QT_INT8C } em_qtype;

/* "fp32", "fp16", "int8", "int8c". */
const char *em_qtype_name(em_qtype t);
/* Parse one of those names; -1 if unknown, else 0 with *out set. */
int em_qtype_parse(const char *s, em_qtype *out);

typedef struct em_qbag em_qbag;

/* Quantize every table of src (which is only read) to type (EM_QT_FP16, EM_QT_INT8 or EM_QT_INT8C;
 * EM_QT_FP32 is EM_ERR_INVALID: use the em_embbag itself). Rows are split over the pool;
 * the result does not depend on the thread count. pooling should be src's (the model's
 * configuration has it; em_embbag does not expose it). */
em_status em_qbag_create(em_qbag **out, em_embbag *src, em_qtype type, em_pooling pooling, em_pool *pool);
void em_qbag_free(em_qbag *q); /* NULL is a no-op */

em_qtype em_qbag_type(const em_qbag *q);
int em_qbag_num_tables(const em_qbag *q);
int em_qbag_dim(const em_qbag *q);
int64_t em_qbag_rows(const em_qbag *q, int t);
/* Bytes of table t's quantized rows (scales and biases included), and of all tables. */
size_t em_qbag_table_bytes(const em_qbag *q, int t);
size_t em_qbag_bytes(const em_qbag *q);
/* Row r of table t dequantized into out[D] (tests, debugging). */
void em_qbag_dequant_row(const em_qbag *q, int t, int64_t r, float *out);
/* The quantization step (scale) of row r of table t: int8 and int8c values lie on
 * bias + step * {0..255}; 0 for fp16. */
float em_qbag_row_step(const em_qbag *q, int t, int64_t r);

/* out(B, T, D): out[b][t] = pool_{k in bag(t,b)} per_id_w[k] * dequant(W_t[indices[k]]).
 * Offsets and indices are checked first (in order): EM_ERR_INVALID naming the table,
 * example and index of the first bad one, and nothing is written. Allocates nothing. */
em_status em_qbag_forward(const em_qbag *q, float *out, const int64_t *indices, const int64_t *offsets,
                          const float *per_id_w, int B, em_pool *pool);

#ifdef __cplusplus
}
#endif
#endif
