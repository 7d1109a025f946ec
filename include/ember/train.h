/*
 * ember/train.h - the training loop: epochs over a training file, periodic
 * evaluation on a held-out file, atomic checkpoints with the data position, resume.
 *
 * Resume is exact: a checkpoint holds every parameter, all optimizer state, the step
 * count, the epoch and the stream position after the last trained batch; training
 * resumed from it sees the same batches in the same order as an uninterrupted run, so
 * (same thread count) the final parameters are bitwise the same.
 *
 * The library prints nothing: progress, evaluations and checkpoints are reported
 * through the on_event callback (the CLI draws its progress bar from it).
 */
#ifndef EMBER_TRAIN_H
#define EMBER_TRAIN_H

#include "core.h"
#include "data.h"
#include "dlrm.h"
#include "metrics.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { EM_EV_PROGRESS = 0, EM_EV_EVAL, EM_EV_CHECKPOINT, EM_EV_DONE } em_event_kind;

typedef struct {
    em_event_kind kind;
    int64_t step;             /* optimizer steps so far */
    int epoch;                /* 0-based */
    uint64_t examples;        /* examples trained on in this run (not counting resumed ones) */
    double train_loss;        /* mean loss since the last progress event */
    double examples_per_s;    /* since the run started */
    double elapsed_s;
    double fraction;          /* of the whole run, 0..1; -1 if unknown */
    em_metrics metrics;       /* EM_EV_EVAL / EM_EV_DONE: held-out metrics */
    const char *path;         /* EM_EV_CHECKPOINT: file written */
    em_reader_stats reader;   /* the training reader's counters */
} em_train_event;

typedef struct {
    const char *train_path;
    const char *test_path;      /* NULL: no evaluation */
    const char *out_dir;        /* checkpoint.safetensors and metrics.jsonl go here (created) */
    const char *resume;         /* checkpoint to resume from, or NULL */
    em_dlrm_cfg model;          /* ignored when resuming (the checkpoint's own is used) */
    int batch;
    int epochs;
    int prefetch;               /* batches read ahead */
    int strict;                 /* malformed input lines are fatal */
    int64_t max_steps;          /* stop after this many steps in total; 0 = no limit */
    int64_t eval_every;         /* steps between evaluations; 0 = at the end only */
    int64_t ckpt_every;         /* steps between checkpoints; 0 = at the end only */
    uint64_t train_limit;       /* use only the first N lines of the training file; 0 = all */
    uint64_t test_limit;
    double progress_every_s;    /* seconds between progress events (default 0.5) */
    int no_lookahead;           /* 1: SSD tables do not load the next batch's rows while the
                                   current batch trains (only timing differs; for tests) */
    void (*on_event)(void *ud, const em_train_event *ev);
    void *ud;
} em_train_cfg;

typedef struct {
    int64_t steps;
    uint64_t examples;
    double train_s;             /* wall time of the training loop (without evaluation) */
    double examples_per_s;
    em_metrics test;            /* final held-out metrics (n = 0 if no test file) */
    em_reader_stats reader;
    char checkpoint[1024];      /* path of the final checkpoint */
} em_train_result;

em_train_cfg em_train_default(void);

/* Train as configured; the final model is kept in *model_out if non-NULL (caller
 * frees), else freed. */
em_status em_train_run(const em_train_cfg *cfg, em_pool *pool, em_train_result *res, em_dlrm **model_out);

/* Evaluate `m` on a file: metrics, and optionally every probability (caller em_frees
 * *probs and *labels; pass NULL to skip). */
em_status em_evaluate(em_dlrm *m, const char *path, int batch, uint64_t limit, em_pool *pool, em_metrics *out,
                      float **probs, float **labels, size_t *n);

/* Set a reader configuration's sequence fields (num_seq, seq_rows, seq_max_len) from
 * a model's: a sequence model reads its history column(s); others leave rc as it is.
 * rc->seq_rows points into mc, which must outlive the reader. */
void em_model_reader_seq(const em_dlrm_cfg *mc, em_reader_cfg *rc);

/* Read one probability per line (the generator's test truth). */
em_status em_read_probs(const char *path, float **probs, size_t *n);

#ifdef __cplusplus
}
#endif
#endif
