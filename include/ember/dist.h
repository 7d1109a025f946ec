/*
 * ember/dist.h - distributed DLRM training over MPI (src/dist/dtrain.c).
 *
 * Every rank runs the same program (mpirun -np N ember train ...) and reads its own
 * slice of the data; the global batch of a step is the ranks' local batches in rank
 * order. Dense parameters are replicated (data-parallel): every rank computes their
 * gradient on its local batch, the gradients are all-reduced (a deterministic
 * reduce-scatter + all-gather: every element is summed in rank order) and every rank
 * applies the same optimizer step. Embedding tables are model-parallel, one sharding
 * type per table:
 *   EM_SHARD_TABLE  the whole table on one rank (owner[t]);
 *   EM_SHARD_ROW    rows dealt out cyclically: row r on rank r mod N (as its local row r / N),
 *                   so hot ids, often the low rows, spread evenly;
 *   EM_SHARD_COLUMN the columns cut into pieces, each piece (all rows) on one rank;
 *   EM_SHARD_DATA   a replica on every rank (small tables).
 * A step: (1) input all-to-all: each rank sends every bag's ids to the ranks holding
 * them (row-wise: each id to its block's rank, as a local row); (2) each rank pools its
 * shards over the whole global batch; (3) output all-to-all: the pooled vectors go back
 * to the examples' ranks (row-wise: partial sums, added in block order); (4) the dense
 * forward/backward on the local batch; (5) backward all-to-all: d loss / d pooled goes to
 * every holder of the table; (6) each holder runs the fused sparse update over the global
 * batch (duplicate ids reduced once, in global batch order, as one process would);
 * (7) dense all-reduce in buckets of layers, each posted during (4) as soon as the
 * backward has finished its layers and completed after (6); the dense step. Data-parallel tables are pooled by every rank over
 * the whole batch and updated identically everywhere.
 * Gradients are scaled so that the step equals one process training on the global
 * batch: each rank's mean-loss gradient is weighted by B_r / sum B.
 * Results: bitwise the same for the same world size, data and thread count; equal to
 * single-process training on the global batch within float rounding (the dense
 * gradient's summation order differs). Mean pooling is pooled as sums by the holders
 * and divided by the bag size at the example's rank. Under row-wise AdaGrad the
 * holders of a column-wise table's pieces add up their pieces' sums of squares per
 * touched row (one all-gather in the group), so every piece steps with the whole row's
 * accumulator, as one process would. Not supported yet: per-id weights, sequence
 * features, non-dense table kinds.
 * Communication precision: the pooled vectors and their gradients may travel as fp16
 * or bf16 (rounded to nearest even; the ids and the dense all-reduce stay exact).
 */
#ifndef EMBER_DIST_H
#define EMBER_DIST_H

#include "ember/dlrm.h"
#include "ember/plan.h"
#include "ember/train.h"

#ifdef __cplusplus
extern "C" {
#endif

/* MPI set-up: MPI_Init unless already initialised (safe to call more than once). */
em_status em_dist_init(int *argc, char ***argv);
/* MPI_Finalize if em_dist_init initialised MPI. */
void em_dist_finalize(void);
/* Rank and world size of MPI_COMM_WORLD (0 and 1 when MPI is not initialised). */
int em_dist_rank(void);
int em_dist_world(void);
/* Launched by mpirun with more than one rank (reads the launcher's environment; no MPI call). */
int em_dist_launched(void);

typedef enum { EM_COMM_FP32 = 0, EM_COMM_FP16, EM_COMM_BF16 } em_comm_prec;
#define EM_DIST_MAX_PIECES 16 /* column-wise pieces per table placed one by one (pieces_given) */
const char *em_comm_prec_name(em_comm_prec p);
/* "fp32" | "fp16" | "bf16"; -1 when unknown. */
int em_comm_prec_parse(const char *s);

typedef struct {
    em_dlrm_cfg model;                       /* the whole model, as one process would train it */
    em_shard_type type[EM_DLRM_MAX_TABLES];  /* EM_SHARD_TABLE, _ROW or _DATA per table */
    int owner[EM_DLRM_MAX_TABLES];           /* EM_SHARD_TABLE: the rank holding it */
    em_comm_prec prec;                       /* pooled vectors and their gradients */
    /* 2D sparse parallelism: the N ranks form M = N / group replica groups of `group`
     * consecutive ranks; the placement above is within a group (owner < group), each
     * group holds a full copy of the tables, the all-to-alls stay inside it, and every
     * sync_every steps each shard's weights and optimizer state are averaged over its
     * M replicas. Row-wise AdaGrad becomes momentum-scaled (w -= lr g / sqrt(m / M + eps)).
     * group = 0 or N: plain 1D. */
    int group;
    int sync_every;
    /* EM_SHARD_COLUMN: the table's columns in pieces of col_width (dividing D; 0 = D/2),
     * piece j on rank (owner + j) mod G, or, when pieces_given, on piece_owner[t][j]
     * (the planner's placement; D / col_width <= EM_DIST_MAX_PIECES). */
    int col_width;
    int pieces_given;
    int16_t piece_owner[EM_DLRM_MAX_TABLES][EM_DIST_MAX_PIECES];
    /* The dense gradient all-reduce goes in buckets of whole layers of about bucket_kb
     * KiB (0 = 512), each started as soon as the backward has finished its layers, so
     * it overlaps the rest of the dense backward and the backward all-to-all; < 0: one
     * bucket, started after the whole dense backward. The result is the same bits either way. */
    int bucket_kb;
} em_dist_cfg;

/* A placement for cfg->model over `world` ranks (in groups of cfg->group for 2D) from
 * the planner (ember/plan.h: lookups, all-to-all bytes and memory balanced with
 * Karmarkar-Karp), its column-wise pieces included (placed one by one: pieces_given);
 * a table the planner would cut into pieces that do not divide D evenly, or into more
 * than EM_DIST_MAX_PIECES, is placed whole. */
em_status em_dist_plan(em_dist_cfg *cfg, int world, int batch, em_plan **plan_out);

typedef struct em_dist em_dist;

/* Collective: every rank calls it with the same cfg. Tables initialised exactly as
 * em_dlrm_create would for cfg->model (the same values, shard by shard). */
em_status em_dist_create(em_dist **out, const em_dist_cfg *cfg, em_pool *pool);
void em_dist_free(em_dist *d);
/* The dense part (this rank's replica; its tables are placeholders). */
em_dlrm *em_dist_dense(em_dist *d);
int64_t em_dist_step_count(const em_dist *d);

/* Collective. One training step on this rank's local batch (B may differ between
 * ranks, and may be 0 for a rank whose data ran out). *loss (nullable): the global
 * batch's mean loss. */
em_status em_dist_train_step(em_dist *d, const em_batch *local, double *loss, em_pool *pool);
/* Collective. Logits of the local batch (B may be 0). */
em_status em_dist_forward(em_dist *d, const em_batch *local, float *logits, em_pool *pool);
void em_dist_set_lr(em_dist *d, float dense_lr, float sparse_lr);

/* Collective. 2D: average every shard's weights and optimizer state over its replicas
 * now (training does it every sync_every steps); a no-op in 1D and when they were
 * averaged at the last step. em_dist_save writes replica group 0's tables: sync first
 * for the average. */
em_status em_dist_sync(em_dist *d);

/* Bytes this rank sent in the last step, by phase. */
typedef struct {
    double ids;       /* input all-to-all: ids of model-parallel tables */
    double pooled;    /* forward all-to-all: pooled vectors (row-wise: partial sums) leaving their holder */
    double grads;     /* backward all-to-all: their gradients leaving the examples' rank */
    double dp;        /* data-parallel tables: ids and gradients sent to the other replicas */
    double allreduce; /* dense gradient all-reduce */
    double sync;      /* 2D replica averaging (0 on steps without one) */
    double total;
} em_dist_bytes;
void em_dist_last_bytes(const em_dist *d, em_dist_bytes *out);
/* Last step: seconds in the dense backward (buckets posted along the way) and seconds
 * then spent waiting for the all-reduce after the backward all-to-all and sparse
 * update (the exposed part of the all-reduce). */
void em_dist_last_times(const em_dist *d, double *dense_backward_s, double *allreduce_wait_s);
/* The number of all-reduce buckets. */
int em_dist_buckets(const em_dist *d);

/* Collective. Rank 0 writes one checkpoint in the single-process layout (em_dlrm_save:
 * readable by ember eval / serve / train --resume at any world size); extra metadata
 * as em_dlrm_save's, from rank 0's arguments. */
em_status em_dist_save(em_dist *d, const char *path, const em_st_meta *extra, int n_extra, em_pool *pool);
/* Collective. Load a single-process-layout checkpoint (from em_dist_save at any world
 * size, or em_dlrm_save): rank 0 reads it and sends each rank its shards. The
 * checkpoint's model must equal cfg->model in shape; the placement is cfg's. */
em_status em_dist_load(em_dist **out, const em_dist_cfg *cfg, const char *path, em_pool *pool);

/* Collective, for tests: the full table t (rows x D) and its optimizer state (NULL:
 * skip) assembled on every rank. */
em_status em_dist_gather_table(em_dist *d, int t, float *w, float *state);

/* The training loop of `mpirun -np N ember train` (src/dist/dtrainer.c): cfg as for
 * em_train_run, with cfg->batch the per-rank batch (the global batch is N times it);
 * every rank reads its contiguous slice of the training and test files. Metrics are
 * computed on rank 0 over the whole test file (in res, on every rank); rank 0 writes
 * the checkpoint (single-process layout, resumable at any world size) and
 * metrics.jsonl and gets the events. test_labels (nullable; rank 0, em_free) receives
 * the test labels in file order. */
typedef struct {
    em_shard_type sharding;      /* EM_SHARD_AUTO: the planner's placement (em_dist_plan);
                                    else every table this type (table-wise: table t on rank t mod N) */
    em_comm_prec prec;
    int group, sync_every;       /* 2D sparse parallelism (em_dist_cfg); group 0 = 1D */
    em_dist_cfg place;           /* out: the placement used */
    em_dist_bytes mean_bytes;    /* out: bytes this rank sent, mean per training step, by phase */
    em_dist_bytes *rank_bytes;   /* out, rank 0: [N] every rank's mean_bytes (em_free) */
    double *plan_send, *plan_recv; /* out, rank 0, AUTO: [G] the planner's one-direction all-to-all bytes
                                      per step leaving / reaching each rank of a group (em_free) */
    double plan_allreduce;       /* out, AUTO: the planner's all-reduce payload (bytes) */
    int bucket_kb;               /* em_dist_cfg.bucket_kb */
    int buckets;                 /* out: the dense all-reduce's buckets */
    double mean_bwd_s, mean_ar_wait_s; /* out: this rank's mean seconds per step in the dense backward and
                                          waiting for the all-reduce after it (em_dist_last_times) */
    double *rank_times;          /* out, rank 0: [2 N] every rank's (mean_bwd_s, mean_ar_wait_s) (em_free) */
} em_dist_opts;
em_status em_dist_train_run(const em_train_cfg *cfg, em_dist_opts *o, em_pool *pool, em_train_result *res,
                            float **test_labels, size_t *n_test);

#ifdef __cplusplus
}
#endif
#endif
