/*
 * ember/stream.h - streaming training: an unbounded, time-ordered stream of examples
 * (a file, a directory that keeps receiving files, or stdin) consumed in windows of N
 * examples, each window evaluated before the model trains on it (progressive
 * validation), with per-window metrics, periodic checkpoints holding the exact stream
 * position, and resume after a crash that neither loses nor repeats an example.
 *
 *   em_stream_cfg c = em_stream_default();
 *   c.source = "incoming/";           // *.tsv / *.bin files, taken in name order
 *   c.out_dir = "runs/stream";        // checkpoint.safetensors, windows.jsonl
 *   c.window = 100000;
 *   c.ckpt_every = 5;
 *   c.idle_timeout_s = 600;           // or: the stream ends when incoming/_END exists
 *   c.resume = 1;                     // continue from runs/stream's checkpoint if any
 *   em_stream_result r;
 *   em_stream_run(&c, pool, &r, NULL);
 *
 * Sources.
 *  - A file (Criteo TSV or ember binary): read to its end; then the stream ends.
 *  - "-": TSV on stdin. A resumed run reads stdin from the start of the same stream
 *    and skips the examples the checkpoint has already seen (stdin cannot seek).
 *  - A directory: its regular files whose names end in ".tsv" or ".bin" and do not
 *    start with '.', in byte-wise name order, each read to its end. When none is left
 *    the directory is scanned again every poll_s seconds. A file is taken as soon as
 *    it is listed, so producers write under another name (".x.tsv", "x.tsv.tmp") and
 *    rename when complete. A file whose name sorts before the current one is never
 *    read (name files by time: "00042.tsv", "2026-12-02T09:00.tsv"). The stream ends when the
 *    file `end_file` (default "_END") exists and no unread file is left, when no new
 *    file came for idle_timeout_s seconds (0 = wait forever), or after max_windows.
 *
 * Positions and example ids. An example's global position is its 0-based index in the
 * concatenation of the source's files, malformed lines included (for one file: its
 * line or record number). em_das_example_id(stream_id, global position) is its id in
 * teacher-prediction logs (ember/das.h), so a teacher and its students reading the
 * same source agree on ids. A teacher (log_predictions) appends one record per example
 * (its progressive prediction, the sidecar's vertical or 0, version = the window); a
 * fresh run refuses a log that already holds records, a resumed one cuts it back to the
 * checkpoint's record count (the teacher re-scores the rest with the same bits, so
 * students following the log must be started after a teacher resumes). A student
 * (teacher_log) follows the log as it grows (in order, a chunk at a time, up to the
 * window's last example: a duplicate appended after that is not seen), joins each window (missing predictions
 * give mask 0: those examples learn from their labels only), evicts the ids before
 * the window, and trains through ember/student.h.
 *
 * Windows. Window w holds the next `window` examples of the stream (of one vertical
 * when `vertical` >= 0); the last may be shorter when the stream ends. A window is
 * read into memory (example-major, about 8 * (num_dense/2 + 2 * num_sparse + 2)
 * bytes per example), evaluated with the model as it stands (forward passes of up to
 * eval_batch examples), then trained on in batches of `batch` examples cut from the
 * window's start, so batch boundaries depend only on the window, never on how
 * the stream was split into files or where a run was resumed.
 *
 * Verticals. With `vertical` >= 0 (or a teacher log to write), each data file X.tsv
 * or X.bin (or X) needs a sidecar X.side with one line per data line whose first
 * column is the example's vertical (what `ember gen --drift` writes); examples of other
 * verticals are skipped (they still advance positions).
 *
 * The vertical as a feature. With `vertical_feature`, the model's last table is the
 * example's vertical (a product feature, as a production foundation model sees it):
 * the data files hold num_tables - 1 sparse fields, and each example gets one more
 * bag holding the single id (vertical mod that table's rows), taken from the sidecar
 * (so sidecars are required). A teacher fed every vertical then learns each vertical's
 * own bias and id effects (through the dot interaction) instead of averaging them.
 *
 * Checkpoints (out_dir/checkpoint.safetensors, written atomically every ckpt_every
 * windows and at the end) are DLRM checkpoints (servable as they are) with metadata
 * "stream.*": the current file and its index, the position and byte offset after the
 * last example of the last window trained (so a resumed TSV reader seeks instead of
 * re-reading), the global position of that file's start, windows and examples done,
 * the byte length of windows.jsonl (a resumed run cuts off lines written after the
 * checkpoint, so the file reads as one uninterrupted run), and the settings that
 * decide batch boundaries (batch, window, vertical), which a resumed run must repeat.
 * Killed at any point and resumed, a run trains on exactly the examples, in exactly
 * the batches, of an uninterrupted one: same thread count, bitwise the same model.
 *
 * Metrics: out_dir/windows.jsonl, one JSON object per window:
 *   {"window":W,"examples":N,"pos_start":P,"pos_end":Q,"file":"...","auc":..,"ne":..,
 *    "logloss":..,"calibration":..,"ctr":..,"train_loss":..,"eval_s":..,"train_s":..,
 *    "step":S[, "teacher": {...}]}
 * where AUC/NE/log loss/calibration are of the window's examples predicted before the
 * model trained on them, and train_loss is the mean loss of the window's steps.
 */
#ifndef EMBER_STREAM_H
#define EMBER_STREAM_H

#include "core.h"
#include "data.h"
#include "dlrm.h"
#include "metrics.h"
#include "student.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One window's report (also the JSON line written to windows.jsonl). */
typedef struct {
    int64_t window;           /* 0-based, counting from the stream's start (resumes included) */
    uint64_t examples;        /* in this window */
    uint64_t pos_start;       /* global position of the window's first example */
    uint64_t pos_end;         /* global position after its last example */
    em_metrics eval;          /* progressive: predicted before training on the window */
    double train_loss;        /* mean loss of the window's training steps */
    double eval_s, train_s, read_s; /* wall time of evaluation, training, reading the window */
    double log_s;             /* teacher: appending the window's predictions (inside eval_s) */
    int64_t step;             /* optimizer steps after the window */
    const char *file;         /* the file holding the window's last example */
    /* students (teacher_log): the join of the window's examples */
    uint64_t teacher_present, teacher_missing;
    em_metrics teacher;       /* the teacher's logged predictions on the window's present examples */
    double join_s;            /* wall time of following the log and joining */
    const char *json;         /* the JSON line (no newline) */
} em_stream_window;

typedef struct {
    const char *source;       /* data file, directory of data files, or "-" (stdin, TSV) */
    const char *out_dir;      /* required: checkpoint.safetensors, windows.jsonl (created) */
    int resume;               /* 1: continue from out_dir/checkpoint.safetensors when it exists */
    em_dlrm_cfg model;        /* ignored when resuming (the checkpoint's is used) */
    int batch;                /* examples per training step (default 128) */
    int eval_batch;           /* examples per forward pass of the evaluation (default 1024) */
    int64_t window;           /* examples per window (default 100000) */
    int64_t ckpt_every;       /* windows between checkpoints; 0 = at the end only (default 1) */
    int64_t max_windows;      /* stop after this many windows in all (resumed ones count); 0 = none */
    int prefetch;             /* reader batches parsed ahead (default 4) */
    int strict;               /* a malformed line is fatal (else counted and skipped) */
    double poll_s;            /* directory: seconds between scans for new files (default 0.2) */
    double idle_timeout_s;    /* directory: end after this long without a new file; 0 = never */
    const char *end_file;     /* directory: end marker name (default "_END") */
    uint64_t start_pos;       /* begin at this global position: the examples before it are passed
                                 over (a single file's reader skips them without parsing) */
    int vertical;             /* >= 0: only this vertical's examples (needs sidecars); -1: all */
    int vertical_feature;     /* 1: the model's last table is the sidecar's vertical (see above) */
    uint32_t stream_id;       /* 16-bit stream number of example ids (default 0) */
    const char *log_predictions; /* teacher: append each example's progressive prediction (its
                                    logit, vertical, and the window as version) to this DAS log */
    const char *teacher_log;  /* student: join each window with this DAS log (a file or a
                                 directory of .das segments), followed as it grows */
    double teacher_wait_s;    /* student: wait up to this long for a window's predictions to
                                 appear in a growing log (0 = take what is there) */
    em_student_cfg student;   /* the heads used with teacher_log (mode EM_DISTILL_NONE: plain) */
    void (*on_window)(void *ud, const em_stream_window *w);
    void *ud;
} em_stream_cfg;

typedef struct {
    int64_t windows;          /* windows done in all (resumed ones included) */
    int64_t windows_run;      /* windows done by this call */
    uint64_t examples;        /* examples trained on by this call */
    uint64_t skipped_vertical;/* examples of other verticals passed over by this call */
    uint64_t skipped_start;   /* examples before start_pos passed over by this call */
    uint64_t malformed;       /* malformed lines skipped by this call */
    uint64_t files;           /* data files opened by this call */
    uint64_t pos;             /* global position after the last example trained on */
    int resumed;              /* 1 if the run continued from a checkpoint */
    double train_s, eval_s, read_s, join_s;
    double log_s;             /* teacher: appending predictions and flushing the log (fsync) */
    char checkpoint[1024];    /* the last checkpoint written */
    char first_error[256];    /* the first malformed line, if any */
} em_stream_result;

em_stream_cfg em_stream_default(void);

/* Run the stream to its end (or max_windows). The model is kept in *model_out if
 * non-NULL (caller frees), else freed. EM_ERR_INVALID for a bad config or a resume
 * with other batch/window/vertical/vertical_feature/source settings; I/O, parse (strict) and
 * corruption errors name the file and position. */
em_status em_stream_run(const em_stream_cfg *cfg, em_pool *pool, em_stream_result *res, em_dlrm **model_out);

#ifdef __cplusplus
}
#endif
#endif
