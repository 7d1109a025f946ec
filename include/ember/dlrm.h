/*
 * ember/dlrm.h - the DLRM model (Naumov et al. 2019; Mudigere et al. 2021).
 *
 *   dense(B, num_dense) -> bottom MLP (ReLU after every layer) -> x(B, D)
 *   bags -> table-batched embedding bags -> emb(B, T, D)
 *   [x, tril(Gram([x, emb]))] (B, D + T(T+1)/2) -> top MLP (ReLU but the last) -> logit(B)
 *   loss = mean BCE with logits
 *
 * Dense parameters, their gradients and their optimizer state each live in one flat
 * block (llm.c style), so the dense optimizer (and later an all-reduce) is one call
 * over all of them. Embedding tables are updated inside their backward with the
 * sparse optimizer (fused; the table gradient is never materialised).
 *
 * Parameter names (checkpoints, golden files): "bot.{i}.weight" (out, in),
 * "bot.{i}.bias", "top.{i}.weight", "top.{i}.bias", "emb.{t}.weight" (rows, D).
 *
 * Embedding backends (cfg.tables, em_table_kind below): dense tables (the default, all
 * of the above), dynamic tables keyed by raw 64-bit ids, or FIITED tables with per-row
 * pruned dimensions. A checkpoint of a dynamic model holds "dyn.{t}.*" tensors (ids,
 * rows, count, last, state; ember/dyntable.h) instead of "emb.{t}.weight", a FIITED
 * model "fiited.{t}.*" (live counts, utilities, live chunks, state; ember/fiited.h).
 *
 * Sequence features (cfg.seq.num_seq = 1): a sequence tower (ember/seqtower.h) turns
 * each example's history (em_batch.seq[0]) into E = em_seq_extra(&cfg.seq) more
 * D-vectors, queried by the pooled embedding of categorical cfg.seq.cand; they join
 * the interaction after the T pooled embeddings, so top[0] = D + (T+E)(T+E+1)/2.
 * The tower's dense parameters ("seq.*", see em_seq_param) follow the MLPs' in the flat
 * blocks; its item table is "seq.items.weight" (rows, D), with the sparse optimizer,
 * or, with cfg.seq.share, the candidate's own table "emb.{cand}.weight". Without a
 * sequence configured, everything (layout, results, checkpoints) is the plain DLRM's.
 */
#ifndef EMBER_DLRM_H
#define EMBER_DLRM_H

#include "core.h"
#include "data.h"
#include "dyntable.h"
#include "embbag.h"
#include "fiited.h"
#include "optim.h"
#include "safetensors.h"
#include "seqtower.h"
#include "ssdtier.h"

#ifdef __cplusplus
extern "C" {
#endif

#define EM_DLRM_MAX_LAYERS 16
#define EM_DLRM_MAX_TABLES 1024

/* The embedding backend of the T categorical tables (one kind for all of them):
 *   EM_TABLES_DENSE    em_embbag (ember/embbag.h): rows[t] x D, ids reduced modulo
 *                      rows[t] by the reader; the default, and what a configuration
 *                      without a "tables" key means.
 *   EM_TABLES_DYNAMIC  em_dyn (ember/dyntable.h): raw 64-bit ids, no modulo, rows
 *                      created on first sight in training (an evaluation forward
 *                      creates none; absent ids read as zeros), evicted under a
 *                      per-table budget. rows[t] must be EM_ROWS_RAW (ember/data.h),
 *                      which tells the reader to deliver raw ids.
 *   EM_TABLES_FIITED   em_fiited (ember/fiited.h): rows[t] x D with per-row pruned
 *                      dimensions; every prune_every steps the chunks are pruned to
 *                      the budget (em_fiited_prune) and the pool compacted.
 *   EM_TABLES_SSD      em_ssd (ember/ssdtier.h): tables larger than memory: raw 64-bit
 *                      ids as for DYNAMIC (rows[t] = EM_ROWS_RAW, no budget), rows and
 *                      optimizer state in RocksDB under a scratch directory in ssd_dir
 *                      (one per model object, removed when it is freed), a cache of hot
 *                      rows of ssd_cache_bytes. Values are those of DYNAMIC without a
 *                      budget. A checkpoint PATH keeps the tables in the directory
 *                      PATH.ssd (em_ssd_save), its step recorded in PATH.
 * Dynamic, FIITED and SSD tables take no per-id weights and no sequence tower, and draw
 * their initial values U(-init_scale, init_scale) from (seed, table, id/row, chunk). */
typedef enum { EM_TABLES_DENSE = 0, EM_TABLES_DYNAMIC, EM_TABLES_FIITED, EM_TABLES_SSD } em_table_kind;

typedef struct {
    em_table_kind kind;
    float init_scale;         /* DYNAMIC, FIITED: > 0 */
    /* DYNAMIC */
    em_dyn_admit admit;
    uint32_t admit_min_count; /* EM_DYN_ADMIT_COUNT: >= 1 */
    float admit_prob;         /* EM_DYN_ADMIT_PROB: in [0, 1] */
    em_dyn_evict evict;
    int64_t max_rows;         /* per table; 0 = no limit */
    int64_t max_bytes;        /* per table (em_dyn_row_bytes per row); 0 = no limit */
    float evict_slack;        /* 0 .. 0.5 */
    /* FIITED */
    int chunks;               /* k, divides D */
    int64_t budget_bytes;     /* chunk slots over all tables; 0 = none */
    double budget_frac;       /* of the full size sum_t rows[t] * k chunks; <= 0 = none */
    int64_t prune_every;      /* steps between prunes; 0 = never */
    float util_decay;         /* utility EMA decay per step, [0, 1) */
    /* SSD */
    char ssd_dir[256];        /* where the live store's scratch directory goes (created if missing) */
    int64_t ssd_cache_bytes;  /* memory limit of the row cache, all tables */
    int ssd_policy;           /* em_ssd_policy: 0 LRU, 1 LFU */
} em_tables_cfg;

const char *em_table_kind_name(em_table_kind k); /* "dense", "dynamic", "fiited", "ssd" */
em_status em_table_kind_parse(const char *s, em_table_kind *k);
/* Dynamic and FIITED defaults: init_scale 0.01, ALWAYS admission, AGE eviction, no
 * budget; k = 4 chunks (or 1 when 4 does not divide D), prune every 1000 steps,
 * decay 0.9. The caller sets a budget. */
em_tables_cfg em_tables_default(em_table_kind kind, int dim);

typedef struct {
    int num_dense;
    int num_tables;
    int64_t rows[EM_DLRM_MAX_TABLES];
    int dim;                        /* D */
    int n_bot;                      /* number of sizes in bot[], >= 2 */
    int bot[EM_DLRM_MAX_LAYERS + 1]; /* bot[0] = num_dense, bot[n_bot-1] = D */
    int n_top;
    int top[EM_DLRM_MAX_LAYERS + 1]; /* top[0] = D + T(T+1)/2, top[n_top-1] = 1 */
    em_pooling pooling;
    em_optim_cfg dense_opt;         /* SGD, AdaGrad, Adam, AdamW */
    em_optim_cfg sparse_opt;        /* SGD, AdaGrad, row-wise AdaGrad */
    uint64_t seed;                  /* initialisation */
    em_seq_cfg seq;                 /* the sequence tower (ember/seqtower.h); num_seq = 0
                                       (all zero): none, the plain DLRM */
    em_tables_cfg tables;           /* the embedding backend; all zero: dense */
} em_dlrm_cfg;

/* The Criteo Kaggle reference: D=16, bottom 13-512-256-64-16, top 367-512-256-1,
 * SGD lr 0.1; table rows = the Kaggle cardinalities, each capped at rows_cap
 * (0 = no cap). */
em_dlrm_cfg em_dlrm_kaggle(int64_t rows_cap);
/* Check sizes agree (bot ends at D, top starts at the interaction width, ...). */
em_status em_dlrm_cfg_validate(const em_dlrm_cfg *cfg);
/* Parse "13-512-256-64-16" into sizes; returns the count or -1. */
int em_parse_layers(const char *s, int *sizes, int max);

typedef struct em_dlrm em_dlrm;

/* Create with DLRM's initialisation (weights N(0, sqrt(2/(in+out))), biases
 * N(0, sqrt(1/out)), tables U(-sqrt(1/rows), sqrt(1/rows))) drawn from cfg.seed. */
em_status em_dlrm_create(em_dlrm **out, const em_dlrm_cfg *cfg, em_pool *pool);
void em_dlrm_free(em_dlrm *m);
const em_dlrm_cfg *em_dlrm_config(const em_dlrm *m);
int64_t em_dlrm_step_count(const em_dlrm *m); /* optimizer steps taken */

/* Forward only: logits(B). */
em_status em_dlrm_forward(em_dlrm *m, const em_batch *b, float *logits, em_pool *pool);
/* Forward only with the embeddings pooled by the caller: pooled(B, T, D) replaces the
 * model's own lookup (b's indices and offsets are not read), e.g. from quantized tables
 * (ember/quant.h). Otherwise the same as em_dlrm_forward. */
em_status em_dlrm_forward_with(em_dlrm *m, const em_batch *b, const float *pooled, float *logits, em_pool *pool);
/* One training step: forward, loss, backward, dense + fused sparse optimizer step.
 * *loss (nullable) receives the mean loss of the batch before the update. */
em_status em_dlrm_train_step(em_dlrm *m, const em_batch *b, double *loss, em_pool *pool);

/* A training step with extra heads on the top MLP's last hidden activation (ExFM's
 * student, ember/student.h). After the forward and the label loss's gradient, and before
 * the backward, fn receives h (B, H), the input of the last top layer (post-ReLU; the
 * interaction output when the top MLP has one layer), the logits (B) and dlogit (B),
 * which holds the mean BCE's gradient and to which fn may add; it may set *dh to a
 * (B, H) gradient that is added to dL/dh (else leave it NULL). Pointers are valid for
 * the call only. A non-OK status aborts the step before any update. */
typedef struct {
    em_status (*fn)(void *ud, const em_batch *b, const float *h, int H, const float *logits, float *dlogit,
                    const float **dh, em_pool *pool);
    void *ud;
} em_dlrm_head_hook;
/* em_dlrm_train_step with a head hook (NULL: exactly em_dlrm_train_step). */
em_status em_dlrm_train_step_hook(em_dlrm *m, const em_batch *b, const em_dlrm_head_hook *hook, double *loss,
                                  em_pool *pool);

/* For tests: forward + backward without any update; dense gradients are left in the
 * gradient block (see em_dlrm_param) and the embedding gradient is not computed. */
em_status em_dlrm_forward_backward(em_dlrm *m, const em_batch *b, double *loss, em_pool *pool);

/* Distributed training (src/dist): the dense part on embeddings pooled elsewhere.
 * Forward from pooled (B, T, D) instead of the model's tables, the mean BCE into *loss
 * (nullable), backward: dense gradients in the gradient block (this batch's mean), and
 * d loss / d pooled into dpooled (B, T, D). Nothing is updated; the tables are not
 * read (they may be released). Not for sequence models (EM_ERR_UNSUPPORTED). */
em_status em_dlrm_dense_backward_with(em_dlrm *m, const em_batch *b, const float *pooled, float *dpooled,
                                      double *loss, em_pool *pool);
/* A gradient-ready callback for em_dlrm_dense_backward_ready: called on the calling
 * thread as soon as a layer's gradients are final, with that layer's range [lo, hi) of
 * the gradient block (weights then bias). Layers finish last to first, so the ranges
 * come in descending, contiguous order, ending at lo = 0; a caller can start
 * communicating a gradient while the layers below it are still being differentiated. */
typedef void (*em_dlrm_grad_ready_fn)(void *ud, size_t lo, size_t hi);
/* em_dlrm_dense_backward_with, calling ready (nullable) after each dense layer. */
em_status em_dlrm_dense_backward_ready(em_dlrm *m, const em_batch *b, const float *pooled, float *dpooled,
                                       double *loss, em_dlrm_grad_ready_fn ready, void *ud, em_pool *pool);
/* The dense layers' ranges in the gradient block, in layer order (bottom first):
 * lo[l] = the first element of layer l's weights; lo[n] = the end of the last layer's
 * bias. Returns n (the number of layers); lo holds n + 1 entries (n <= 2 * EM_DLRM_MAX_LAYERS). */
int em_dlrm_layer_offsets(const em_dlrm *m, size_t *lo);
/* The dense optimizer step over the gradient block as it stands (e.g. all-reduced);
 * counts one step. */
em_status em_dlrm_dense_step(em_dlrm *m, em_pool *pool);
/* The flat dense blocks: which = 0 parameters, 1 gradients, 2 optimizer state (NULL
 * and *n = 0 for SGD); *n elements. */
float *em_dlrm_dense_block(em_dlrm *m, int which, size_t *n);
/* Set the step count (a distributed checkpoint's). */
void em_dlrm_set_step(em_dlrm *m, int64_t step);

/* Named access to dense parameters ("bot.0.weight", "seq.0.q.weight", ...), their
 * gradients (grad = 1) and tables ("emb.3.weight", "seq.items.weight"). Returns NULL
 * for unknown names. */
float *em_dlrm_param(em_dlrm *m, const char *name, int grad, size_t *numel);
/* The interaction output of the last forward (B, top[0]). */
const float *em_dlrm_interaction(const em_dlrm *m);
em_embbag *em_dlrm_embbag(em_dlrm *m); /* NULL once released */
/* Free the fp32 tables and their optimizer state for inference from other tables
 * (ember/quant.h via em_dlrm_forward_with): afterwards em_dlrm_forward, training and
 * em_dlrm_save fail with EM_ERR_INVALID and table parameters are NULL. */
void em_dlrm_release_tables(em_dlrm *m);
/* The sequence tower (NULL without one): FLOPs statistics (em_seqtower_stats). */
em_seqtower *em_dlrm_seqtower(em_dlrm *m);
/* Bytes held by parameters, dense gradients and all optimizer state (no activations);
 * dynamic and FIITED tables count what they hold now (their stats' bytes). */
size_t em_dlrm_state_bytes(const em_dlrm *m);

/* What one embedding table holds (t = -1: all tables together). */
typedef struct {
    em_table_kind kind;
    int dim;
    int64_t rows;          /* rows held: dense rows[t]; dynamic live rows; FIITED rows
                              with at least one live chunk */
    int64_t max_rows;      /* dense and FIITED rows[t]; dynamic its row budget (0 = none) */
    int64_t live_chunks;   /* FIITED: live chunks (D/k dims each); others 0 */
    int64_t chunks;        /* FIITED: rows[t] * k; others 0 */
    size_t bytes;          /* held in memory: weights, optimizer state, per-row metadata,
                              hash (FIITED per table: its share of the shared pool's hash
                              and metadata; the total is exact) */
    size_t state_bytes;    /* of which optimizer state */
    uint64_t inserts, evictions, rejections; /* dynamic; others 0 */
    double hit_rate;       /* a cached tier's hit rate (lookups served from memory);
                              -1 where the kind has no cache (dense, dynamic, FIITED) */
} em_dlrm_table_stats;

/* EM_ERR_INVALID for t out of range or released tables. */
em_status em_dlrm_table_stats_get(const em_dlrm *m, int t, em_dlrm_table_stats *out);
/* The backend objects (NULL unless the model has that kind): for tests and tools. */
em_dyn *em_dlrm_dyn(em_dlrm *m);
em_fiited *em_dlrm_fiited(em_dlrm *m);
em_ssd *em_dlrm_ssd(em_dlrm *m);
/* Start loading the next batch's rows in the background (SSD tables; a no-op for other
 * kinds): call after the current batch's training step has begun, e.g. between two
 * train steps with the batch that comes next. Only timing depends on it. */
em_status em_dlrm_prefetch(em_dlrm *m, const em_batch *next);
void em_dlrm_set_lr(em_dlrm *m, float dense_lr, float sparse_lr);

/* Checkpoint: every parameter, all optimizer state, the step count, the model
 * configuration (JSON in the "ember.model" metadata) and the caller's extra
 * metadata (e.g. the data position), written atomically in safetensors layout. */
em_status em_dlrm_save(const em_dlrm *m, const char *path, const em_st_meta *extra, int n_extra);
/* Load a checkpoint written by em_dlrm_save; refuses corrupt or mismatched files.
 * If st_out is non-NULL the opened file is returned for reading its metadata
 * (close with em_st_close). */
em_status em_dlrm_load(em_dlrm **out, const char *path, em_st **st_out, em_pool *pool);

/* JSON of a configuration (em_free the result); and back. */
char *em_dlrm_cfg_to_json(const em_dlrm_cfg *cfg);
em_status em_dlrm_cfg_from_json(const char *json, em_dlrm_cfg *cfg);

#ifdef __cplusplus
}
#endif
#endif
