/*
 * ember/fiited.h - FIITED embedding tables: rows whose number of live dimensions is
 * pruned (and regrown) during training, with storage that really shrinks.
 *
 * One object holds T tables of rows[t] x D fp32 weights, each row split into k chunks
 * of D/k dimensions. A row's live chunks are always a prefix 0..c-1 (c = its live
 * count, 0..k): a pruned dimension reads as zero in the forward pass and receives no
 * update. Bags use the table-batched jagged layout of ember/embbag.h (indices are row
 * numbers in [0, rows[t])).
 *
 * Storage is virtually-hashed, physically-indexed: a hash maps the chunk id
 * (global row, chunk) to a slot in one pool of fixed-size slots; a slot holds the
 * chunk's D/k weights and its optimizer state (AdaGrad D/k floats; row-wise AdaGrad
 * one float: the row's accumulator lives in chunk 0's slot, the float of the other
 * chunks is unused and kept at 0; SGD none). Freed slots go on a free stack and are
 * reused first (LIFO); fresh slots are taken in increasing order after that. The pool
 * is a list of mmap'd pages; em_fiited_compact (run at the end of every prune) moves
 * the live slots of the highest pages into the holes of the lower ones and unmaps the
 * emptied tail pages, so resident memory follows the live chunk count.
 *
 * Utility: per (row, chunk), u = EMA with decay `util_decay` of x = n * ||g_chunk||_2
 * per step, where n is the row's occurrences in the batch and g its summed gradient
 * (computed for pruned chunks too, so a pruned chunk can earn its way back). Steps in
 * which a row is not touched contribute x = 0; this is applied lazily (a per-row step
 * stamp), so the backward only touches the batch's rows.
 *
 * Pruning rule (em_fiited_prune, called by the caller every P steps): the budget is N
 * chunk slots over all tables (from bytes: max_bytes / em_fiited_slot_bytes; from a
 * fraction: floor(frac * sum_t rows[t] * k); the smaller when both are given). Each
 * candidate (t, r, j) gets the prefix-min utility p(t,r,j) = min_{i<=j} u(t,r,i) (decayed
 * to the current step). Candidates are ranked by p descending, then j ascending, then
 * global row ascending (a total order); the first N are live. Since p is non-increasing
 * in j and ties go to the smaller j, the kept set is prefix-closed: a row's new live
 * count is the number of its chunks kept. Equivalently, with theta_j = the smallest p
 * kept at position j (em_fiited_stats.threshold), a row's live count is the number of
 * leading chunks whose prefix-min utility clears its position's threshold (ties broken
 * by row). Chunks no longer kept are freed (per row, highest chunk first, rows in
 * global order); then newly kept chunks are allocated (rows in global order, chunks
 * ascending) and initialised like at creation: weights uniform in [-init_scale,
 * init_scale] from a hash of (seed, table, row, chunk), state opt.init_accum.
 * Utilities are kept. Then the pool is compacted.
 *
 * Optimizers, per touched row with live count c (nothing is updated when c = 0):
 *   SGD:              w -= lr * g                            (live dims)
 *   AdaGrad:          s += g^2; w -= lr * g / (sqrt(s) + eps) (live dims)
 *   row-wise AdaGrad: m += sum_{live d} g_d^2 / (c * D/k); w -= lr * g / (sqrt(m) + eps)
 * (weight decay is not applied, as in em_embbag).
 *
 * Determinism: the backward sorts each table's (row, position) pairs stably, sums a
 * row's contributions in batch order and updates it on exactly one worker; pruning and
 * compaction run on the caller in a fixed order. Results are bitwise identical for any
 * thread count.
 *
 * Memory accounting: the hash, per-row metadata (live count, k bfloat16 utilities, a
 * 32-bit step stamp: 5 + 2k bytes per row; utilities are rounded to bfloat16 after every
 * update and read back as floats),
 * the slot owner array and the free stack come from em_malloc (and honour
 * em_mem_fail_after); pool pages come from mmap and are reported in stats.pool_bytes.
 */
#ifndef EMBER_FIITED_H
#define EMBER_FIITED_H

#include "core.h"
#include "embbag.h"
#include "optim.h"
#include "safetensors.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int num_tables;
    const int64_t *rows;  /* rows[num_tables] (copied); sum * chunks < 2^32 - 1 */
    int dim;              /* D */
    int chunks;           /* k: divides D, 1 .. 255 */
    int init_live;        /* live chunks of every row at creation (0 .. k) */
    em_pooling pooling;
    em_optim_cfg opt;     /* EM_OPT_SGD, EM_OPT_ADAGRAD or EM_OPT_ROWWISE_ADAGRAD */
    uint64_t seed;        /* chunk initialisation */
    float init_scale;     /* chunks start uniform in [-init_scale, init_scale] */
    float util_decay;     /* EMA decay in [0, 1) */
    size_t page_bytes;    /* pool page size target, 64 KiB .. 64 MiB; 0 = 1 MiB */
} em_fiited_cfg;

/* init_live = k, init_scale 0.01, util_decay 0.9, page 1 MiB. */
em_fiited_cfg em_fiited_default(int num_tables, const int64_t *rows, int dim, int chunks, em_optim_cfg opt);

typedef struct em_fiited em_fiited;

em_status em_fiited_create(em_fiited **out, const em_fiited_cfg *cfg);
void em_fiited_free(em_fiited *f); /* NULL is a no-op */

int em_fiited_num_tables(const em_fiited *f);
int em_fiited_dim(const em_fiited *f);
int em_fiited_chunks(const em_fiited *f);
int64_t em_fiited_rows(const em_fiited *f, int t);
int64_t em_fiited_step(const em_fiited *f);   /* backward calls so far */
size_t em_fiited_slot_bytes(const em_fiited *f); /* bytes of one chunk slot */
void em_fiited_set_lr(em_fiited *f, float lr);

/* out(B, T, D) as em_embbag_forward, pruned dims reading as zero. EM_ERR_INVALID on bad
 * offsets or an index out of range (nothing written). */
em_status em_fiited_forward(em_fiited *f, float *out, const int64_t *indices, const int64_t *offsets,
                            const float *per_id_w, int B, em_pool *pool);

/* Backward fused with the optimizer as em_embbag_backward_update, restricted to live
 * dims; updates the utilities of every chunk of every touched row; advances the step.
 * dper_id_w (nullable) += dot(dout[b][t], row as read by the forward, before update).
 * EM_ERR_INVALID as forward, EM_ERR_NOMEM for scratch (nothing changed either way). */
em_status em_fiited_backward_update(em_fiited *f, const float *dout, const int64_t *indices,
                                    const int64_t *offsets, const float *per_id_w, float *dper_id_w, int B,
                                    em_pool *pool);

/* Prune/regrow to a budget (see the rule above): max_bytes of chunk slots (0 = none)
 * and/or a fraction max_frac of the full size (<= 0 = none; > 1 is treated as 1).
 * Then compacts. EM_ERR_NOMEM if scratch, hash or pages cannot be had: the object is
 * unchanged. */
em_status em_fiited_prune(em_fiited *f, size_t max_bytes, double max_frac, em_pool *pool); /* pool: unused */

/* Set the live count of one row directly (frees chunks c-1 .. n, highest first, or
 * allocates chunks c .. n-1, ascending, initialised as above). No compaction. For
 * tests and external policies. */
em_status em_fiited_set_live(em_fiited *f, int t, int64_t row, int n);
/* Move live slots down into holes and release the emptied tail pages; shrink the hash
 * to load <= 1/2 when it holds more than 4 buckets per entry, and the slot arrays to the
 * pages kept. Afterwards the live slots are exactly [0, live chunks) and the free
 * stack is empty. Never fails (a failed shrink keeps the old, larger block). */
void em_fiited_compact(em_fiited *f);

/* Inspection: live count of a row; the slot of (row, chunk) or -1 if pruned; a pointer
 * to the chunk's D/k weights and state (valid until the next prune/compact/set_live/
 * load), NULL if pruned; the utility of a chunk decayed to the current step. */
int em_fiited_live(const em_fiited *f, int t, int64_t row);
int64_t em_fiited_slot(const em_fiited *f, int t, int64_t row, int chunk);
float *em_fiited_chunk(em_fiited *f, int t, int64_t row, int chunk, float **state);
float em_fiited_utility(const em_fiited *f, int t, int64_t row, int chunk);
/* Read a full row (D floats, pruned dims zero). */
void em_fiited_read_row(const em_fiited *f, int t, int64_t row, float *out);

typedef struct {
    int64_t live_chunks;      /* over all tables */
    int64_t live_per_chunk[256]; /* live_per_chunk[j]: rows with chunk j live (j < k) */
    float threshold[256];     /* theta_j of the last prune (0 before any / none kept) */
    int64_t slots;            /* slots in held pages */
    int64_t free_slots;       /* on the free stack + never used */
    int64_t pages;            /* pool pages held */
    size_t page_bytes;        /* bytes of one page */
    size_t pool_bytes;        /* pages * page_bytes (mmap'd) */
    size_t hash_bytes;        /* hash array */
    size_t meta_bytes;        /* per-row metadata, owner array, free stack */
    size_t held_bytes;        /* pool + hash + meta: what the object keeps resident */
} em_fiited_stats;

/* Stats of table t for the live counts (t = -1: all tables); pool figures are global. */
em_fiited_stats em_fiited_get_stats(const em_fiited *f, int t);

/* Checkpoint through safetensors, per table t:
 *   fiited.{t}.live U8 (rows), fiited.{t}.util F32 (rows, k), fiited.{t}.stamp I64 (rows),
 *   fiited.{t}.w F32 (n, D/k) and fiited.{t}.state F32 (n, S) when S > 0: the n live
 *   chunks in (row, chunk) order,
 * metadata fiited.tables, fiited.dim, fiited.chunks, fiited.opt, fiited.step. Load needs
 * an object with the same tables, rows, dim, chunks and optimizer kind and replaces its
 * content exactly (slots renumbered in file order); on error the object is unchanged. */
em_status em_fiited_save(const em_fiited *f, const char *path);
em_status em_fiited_load(em_fiited *f, const char *path);
/* The same inside a caller's file (e.g. a model checkpoint): save_ex writes the
 * caller's tensors and metadata beside the table's (names must not start with
 * "fiited."); load_st reads the table's tensors from an opened file (path names it in
 * errors). */
em_status em_fiited_save_ex(const em_fiited *f, const char *path, const em_st_tensor *extra, int n_extra,
                            const em_st_meta *meta, int n_meta);
em_status em_fiited_load_st(em_fiited *f, const em_st *st, const char *path);

#ifdef __cplusplus
}
#endif
#endif
