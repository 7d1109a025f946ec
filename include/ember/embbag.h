/*
 * ember/embbag.h - table-batched embedding bags with the optimizer fused into backward.
 *
 * One object holds T tables of rows[t] x D fp32 weights (one allocation) and their
 * optimizer state. One forward call pools the bags of all tables for a batch; one
 * backward call reduces the gradient per unique row and applies the sparse optimizer
 * to exactly the touched rows: the full table gradient is never materialised.
 *
 * Bags use FBGEMM's table-batched jagged layout: for table t and example b the bag is
 *   indices[offsets[t*B + b] .. offsets[t*B + b + 1]]
 * with offsets of length T*B + 1, offsets[0] = 0, non-decreasing; indices are row
 * numbers in [0, rows[t]). An empty bag pools to zeros (sum and mean).
 * per_id_w (nullable) has one weight per index: the row is scaled before pooling.
 *
 * Determinism: the backward sorts the (row, position) pairs of each table, sums the
 * contributions of a row in the order the positions occur in the batch, then applies
 * the update once per unique row. Each row is handled by exactly one worker, so the
 * result is bitwise identical for any thread count.
 */
#ifndef EMBER_EMBBAG_H
#define EMBER_EMBBAG_H

#include "core.h"
#include "optim.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { EM_POOL_SUM = 0, EM_POOL_MEAN } em_pooling;

typedef struct {
    int num_tables;
    const int64_t *rows; /* rows[num_tables] (copied) */
    int dim;             /* D, the same for every table */
    em_pooling pooling;
    em_optim_cfg opt;    /* EM_OPT_SGD, EM_OPT_ADAGRAD or EM_OPT_ROWWISE_ADAGRAD */
} em_embbag_cfg;

typedef struct em_embbag em_embbag;

em_status em_embbag_create(em_embbag **out, const em_embbag_cfg *cfg);
void em_embbag_free(em_embbag *e); /* NULL is a no-op */

int em_embbag_num_tables(const em_embbag *e);
int em_embbag_dim(const em_embbag *e);
int64_t em_embbag_rows(const em_embbag *e, int t);
/* Weights of table t: (rows[t], D) row-major, writable (initialisation, checkpoints). */
float *em_embbag_weights(em_embbag *e, int t);
/* Optimizer state of table t and its element count: AdaGrad rows*D, row-wise AdaGrad
 * rows, SGD none (NULL, 0). Writable (checkpoints). Initialised to opt.init_accum. */
float *em_embbag_state(em_embbag *e, int t, size_t *count);
/* DLRM's initialisation: table t uniform in [-sqrt(1/rows[t]), sqrt(1/rows[t])],
 * drawn from a stream derived from (seed, t), independent of the thread count. */
void em_embbag_init_uniform(em_embbag *e, uint64_t seed, em_pool *pool);
/* The same values for a shard (distributed training): table t of e holds rows
 * row0, row0 + stride, ... (rows[t] of them) and columns [col0, col0 + D) of table
 * t_global, which has rows_global rows of dim_global columns. */
void em_embbag_init_uniform_shard(em_embbag *e, int t, uint64_t seed, int t_global, int64_t rows_global,
                                  int64_t row0, int64_t stride, int col0, int dim_global);

/* out(B, T, D): out[b][t] = pool_{k in bag(t,b)} per_id_w[k] * W_t[indices[k]].
 * EM_ERR_INVALID (with a detail naming table, example and index) on an index out of
 * range or bad offsets; nothing is written to the tables. */
em_status em_embbag_forward(em_embbag *e, float *out, const int64_t *indices,
                            const int64_t *offsets, const float *per_id_w, int B, em_pool *pool);

/* Backward fused with the optimizer step: given dout(B, T, D), update every touched
 * row once with the sparse optimizer of the config. dper_id_w (nullable; needs
 * per_id_w) receives += dot(dout[b][t], W_t[indices[k]]) with the rows as they were
 * before the update (mean pooling includes the 1/len factor). Same index validation
 * as forward. */
em_status em_embbag_backward_update(em_embbag *e, const float *dout, const int64_t *indices,
                                    const int64_t *offsets, const float *per_id_w,
                                    float *dper_id_w, int B, em_pool *pool);

/* The sparse optimizer applied to table t from n (row, gradient) pairs: grads (n, D),
 * pair j = (rows[j], grads[j*D .. j*D+D)). The gradients of equal rows are summed in
 * the order given and each touched row is updated once, exactly as the fused backward
 * does for bags (the same optimizer step, weight decay included). For gradients that
 * do not come from bags: the sequence tower's history items, which may share a table
 * with a categorical feature (src/model/seqtower.c). Rows are validated first
 * (EM_ERR_INVALID naming the pair; nothing is written); n must be < 2^32. Bitwise
 * identical for any thread count. */
em_status em_embbag_update_rows(em_embbag *e, int t, const int64_t *rows, const float *grads, size_t n,
                                em_pool *pool);

/* Row-wise AdaGrad over a row cut into column pieces held apart (column-wise sharding):
 * the accumulator's increment is the mean square of the whole row's gradient, so the
 * holders of a row's pieces add up their pieces' sums of squares first.
 * em_embbag_rows_sumsq: for the pairs as em_embbag_update_rows takes them, the sum of
 * squares of each touched row's summed gradient (weight decay included), in ascending
 * row order, into sumsq (room for n); *nuniq = the touched rows. Updates nothing.
 * em_embbag_update_rows_sumsq: em_embbag_update_rows, with row-wise AdaGrad's increment
 * taken as sumsq[j] / full_dim for the j-th touched row in ascending order (the other
 * optimizers ignore sumsq). */
em_status em_embbag_rows_sumsq(em_embbag *e, int t, const int64_t *rows, const float *grads, size_t n, float *sumsq,
                               size_t *nuniq, em_pool *pool);
em_status em_embbag_update_rows_sumsq(em_embbag *e, int t, const int64_t *rows, const float *grads, size_t n,
                                      const float *sumsq, int full_dim, em_pool *pool);

/* Change the learning rate (schedules). */
void em_embbag_set_lr(em_embbag *e, float lr);

#ifdef __cplusplus
}
#endif
#endif
