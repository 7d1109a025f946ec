/*
 * ember/data.h - Criteo-style data: TSV parsing, the binary format, a streaming
 * reader with a background prefetch thread, and the synthetic generator.
 *
 * A Criteo line: label \t 13 integers \t 26 hex categoricals, '\n' (or "\r\n")
 * terminated. Empty fields are missing. Dense x -> log(1 + max(x, 0)) (missing -> 0).
 * Categorical hex (1..16 hex digits) -> 64-bit id; the reader reduces it modulo the
 * table's rows. A missing categorical is an empty bag (pools to zeros).
 *
 * Sequence features. A line may carry num_seq more columns after the categoricals,
 * each a user's history as comma-separated events `item:age:type` (item hex like a
 * categorical, age = example time - event time in seconds, type 0..255), oldest
 * first; empty = no history. The reader delivers them jagged (values + offsets[B+1],
 * ember/jagged.h), keeping the most recent seq_max_len events of each.
 * The text grammar and the binary format (version 1; version 2 with sequences) are
 * documented in docs/FORMATS.md.
 */
#ifndef EMBER_DATA_H
#define EMBER_DATA_H

#include <stdio.h>

#include "core.h"

#ifdef __cplusplus
extern "C" {
#endif

#define EM_CRITEO_DENSE 13
#define EM_CRITEO_SPARSE 26

#define EM_SEQ_MAX_FEATURES 16   /* sequence columns per line */
#define EM_SEQ_MAX_TYPE 255      /* event types are 0..255 */
#define EM_SEQ_MAX_LEN (1 << 20) /* largest per-example cap (seq_max_len) a reader accepts */

/* One sequence feature of a batch, in ember/jagged.h's layout: example b's events are
 * rows offsets[b] .. offsets[b+1]-1 of the three value arrays, oldest first (so a
 * causal mask over positions is a mask over time). */
typedef struct {
    int64_t *items;   /* (total) item ids, reduced modulo the reader's seq_rows[s] */
    int64_t *age;     /* (total) example time - event time, seconds, >= 0; non-increasing
                         within an example (the last event is the most recent) */
    int32_t *type;    /* (total) event type, 0..EM_SEQ_MAX_TYPE */
    int64_t *offsets; /* (B + 1): offsets[0] = 0, total = offsets[B] */
} em_batch_seq;

/* One mini-batch, in the layout the model consumes. Owned by the reader; valid until
 * the next em_reader_next() (with em_reader_cfg.hold = 2: the second next) or
 * em_reader_free(). */
typedef struct {
    int B;                 /* examples in this batch (the last one may be short) */
    int num_dense, num_sparse;
    float *label;          /* (B) 0 or 1 */
    float *dense;          /* (B, num_dense), already log-transformed */
    int64_t *indices;      /* table-batched bags, see ember/embbag.h; rows already reduced */
    int64_t *offsets;      /* (num_sparse * B + 1) */
    float *per_id_w;       /* NULL for Criteo data */
    uint64_t first_pos;    /* stream position (records/lines consumed) before this batch */
    uint64_t end_pos;      /* stream position after this batch: resume from here */
    int num_seq;           /* sequence features; 0 for plain Criteo data */
    em_batch_seq *seq;     /* [num_seq], NULL when num_seq = 0 */
    /* Filled by the reader (NULL in batches built by hand): example b's 0-based stream
     * position (its line/record index; pos[b] + 1 resumes right after it) and the byte
     * offset in the file just past it (after its '\n' in TSV; em_reader_cfg.skip_bytes). */
    const uint64_t *pos;      /* (B) */
    const uint64_t *byte_end; /* (B) */
} em_batch;

/* Parse one Criteo TSV line (without or with its trailing '\n'/'\r\n').
 * ids[num_sparse] receive the raw 64-bit ids; bit f of *missing is set when
 * categorical f is empty (num_sparse <= 64). On failure returns EM_ERR_PARSE with
 * *bad_field = 0 for the label, 1..num_dense for dense, num_dense+1.. for categoricals,
 * or -1 for a wrong field count, and a detail message naming the field. */
em_status em_criteo_parse_line(const char *line, size_t len, int num_dense, int num_sparse,
                               float *label, float *dense, uint64_t *ids, uint64_t *missing,
                               int *bad_field);

/* One sequence column of one parsed line. The caller provides room for `cap` events;
 * the parser stores the most recent min(total, cap) of them, oldest first. */
typedef struct {
    uint64_t *item; /* [cap] raw item ids (not reduced) */
    int64_t *age;   /* [cap] seconds, >= 0, non-increasing */
    int32_t *type;  /* [cap] 0..EM_SEQ_MAX_TYPE */
    int cap;        /* in: >= 0 */
    int len;        /* out: events stored, min(total, cap) */
    int64_t total;  /* out: events in the column */
} em_seq_events;

/* em_criteo_parse_line for a line with num_seq (0..EM_SEQ_MAX_FEATURES) sequence
 * columns after the categoricals; seq[num_seq] receive them. Every event of a column
 * is validated, also those beyond the cap. A bad sequence column gives
 * *bad_field = 1 + num_dense + num_sparse + s and a detail such as
 * "field 41 (S1): event 3: invalid item hex '12zz:5:0'". num_seq = 0 is exactly
 * em_criteo_parse_line. */
em_status em_seq_parse_line(const char *line, size_t len, int num_dense, int num_sparse, int num_seq,
                            float *label, float *dense, uint64_t *ids, uint64_t *missing,
                            em_seq_events *seq, int *bad_field);

/* A table_rows value meaning "no modulo": the field's raw 64-bit ids are delivered
 * bit-cast into em_batch.indices (read them as uint64_t), for tables keyed by the id
 * itself (dynamic tables, ember/dyntable.h). Any other value reduces modulo it. */
#define EM_ROWS_RAW INT64_MAX

typedef struct {
    const char *path;          /* TSV or ember binary (detected by magic); "-" = stdin (TSV) */
    int batch_size;
    int num_dense, num_sparse; /* 13, 26 for Criteo */
    const int64_t *table_rows; /* [num_sparse]: ids are reduced modulo these (required);
                                  EM_ROWS_RAW: that field's ids are delivered raw */
    int strict;                /* 1: the first malformed line fails with EM_ERR_PARSE */
    int prefetch;              /* batches read ahead by a background thread; 0 = inline */
    uint64_t skip;             /* start after this many records/lines (resume) */
    uint64_t limit;            /* stop after this many records/lines in total; 0 = no limit */
    int num_seq;               /* sequence columns after the categoricals; 0 = plain Criteo */
    const int64_t *seq_rows;   /* [num_seq]: items are reduced modulo these (required if num_seq) */
    int seq_max_len;           /* keep the most recent N events per example and feature:
                                  1..EM_SEQ_MAX_LEN, required if num_seq (it sizes the batch) */
    uint64_t skip_bytes;       /* with skip > 0 on a TSV file (not stdin): the byte offset of
                                  position `skip` (a batch's byte_end[b] with pos[b] + 1 = skip):
                                  seek there instead of reading skip lines. It must be a line start
                                  of the file (else EM_ERR_CORRUPT). 0 = read and count lines.
                                  Ignored for binary files (they seek by record). */
    int hold;                  /* batches the caller may hold at once: 0 or 1 = the last one
                                  (valid until the next em_reader_next); 2 = the last two (a
                                  batch stays valid until the second em_reader_next after it:
                                  look at batch i + 1 while batch i is in use). One more slot. */
} em_reader_cfg;

typedef struct em_reader em_reader;

typedef struct {
    uint64_t lines;      /* lines/records consumed */
    uint64_t examples;   /* good examples delivered */
    uint64_t malformed;  /* lines skipped as malformed */
    char first_error[256]; /* "path:line: field N (name): why" of the first malformed line */
    uint64_t seq_events;   /* sequence events delivered (all features) */
    uint64_t seq_dropped;  /* events of good examples left out by the cap (seq_max_len) */
} em_reader_stats;

em_status em_reader_open(em_reader **out, const em_reader_cfg *cfg);
/* Next batch, or EM_ERR_EOF at the end of the stream. Memory is bounded by
 * (prefetch + hold + 1) batches whatever the file size. */
em_status em_reader_next(em_reader *r, const em_batch **out);
void em_reader_stats_get(const em_reader *r, em_reader_stats *out);
void em_reader_free(em_reader *r); /* NULL is a no-op; joins the prefetch thread */

/* Records in a data file: the binary header's count, or the number of lines of a TSV
 * file (a last line without '\n' counts). EM_ERR_UNSUPPORTED for stdin ("-"). */
em_status em_data_count(const char *path, uint64_t *records);

/* TSV -> ember binary, streaming with bounded memory. Malformed lines are counted into
 * *stats (or fatal when strict). Writes version 1 (no sequences). */
em_status em_convert_tsv_to_bin(const char *tsv_path, const char *bin_path, int num_dense,
                                int num_sparse, int strict, em_reader_stats *stats);

typedef struct {
    int num_dense, num_sparse; /* 13, 26 for Criteo */
    int num_seq;               /* sequence columns; 0 writes version 1, byte for byte what
                                  em_convert_tsv_to_bin writes; > 0 writes version 2 */
    int seq_max_len;           /* keep the most recent N events per feature; 0 = as many as
                                  the format allows (em_seq_bin_max_events) */
    int strict;
} em_convert_cfg;

/* TSV (with or without sequence columns) -> ember binary; events left out by the cap
 * are counted in stats->seq_dropped. EM_ERR_INVALID when seq_max_len exceeds the
 * format's limit. */
em_status em_convert_tsv(const char *tsv_path, const char *bin_path, const em_convert_cfg *cfg,
                         em_reader_stats *stats);

/* The most events one sequence feature of one version-2 record may hold: a record is
 * at most 1 MiB, i.e. (2^20 - 12 - 4*num_dense - 8*num_sparse - 4*num_seq) /
 * (17 * num_seq). 0 for num_seq = 0. */
int em_seq_bin_max_events(int num_dense, int num_sparse, int num_seq);

/* -------------------------------------------------------- OTTO sessions */
/*
 * Turns OTTO session JSON lines ({"session": N, "events": [{"aid", "ts", "type"}...]},
 * ts in milliseconds, type "clicks"|"carts"|"orders") into (history, candidate, label)
 * examples with num_dense = 0, num_sparse = 2 (C1 candidate aid, C2 the type of the
 * predicted event: 0 clicks, 1 carts, 2 orders) and one sequence column (the history:
 * aid, age in seconds before the candidate's time, type). Positives: each event t >= 1
 * of a session against the events before it, or, with labels_path, each label of the
 * OTTO labels file ({"session": N, "labels": {"clicks": aid, "carts": [aids], "orders":
 * [aids]}}) against the whole session. Each positive is followed by `negatives`
 * examples with label 0 whose candidates are drawn, deterministically from (seed,
 * session, position), from the file's items in proportion to their counts, excluding
 * the session's own items. docs/FORMATS.md section 6 has the details. Two passes over
 * the sessions file (the first builds the item pool): memory O(distinct items + labels).
 */
typedef struct {
    const char *labels_path; /* NULL: positives are the sessions' own events */
    int negatives;           /* per positive, >= 0 (default 4) */
    uint64_t seed;           /* of the negative sampling (default 1) */
    int seq_max_len;         /* keep the most recent N history events; 0 = the binary limit */
    int binary;              /* 0: TSV, 1: ember binary version 2 */
    int strict;              /* 1: the first malformed line fails with EM_ERR_PARSE */
} em_otto_cfg;

typedef struct {
    uint64_t lines;          /* session lines read (second pass) */
    uint64_t sessions;       /* good sessions */
    uint64_t events;         /* their events */
    uint64_t items;          /* distinct aids in the negative pool */
    uint64_t examples;       /* lines/records written */
    uint64_t positives, negatives;
    uint64_t short_negatives; /* positives that got fewer than `negatives` negatives */
    uint64_t unmatched_labels; /* labels whose session is not in the sessions file */
    uint64_t malformed;      /* malformed lines skipped (both files) */
    char first_error[256];   /* "path:line: why" of the first malformed line */
} em_otto_stats;

em_otto_cfg em_otto_default(void);
em_status em_otto_convert(const char *sessions_path, const char *out_path, const em_otto_cfg *cfg,
                          em_otto_stats *stats);

/* ----------------------------------------------------- synthetic generator */
/*
 * Writes Criteo-format TSV with a planted ground truth:
 *   logit = bias + sum_j a_j * h(log1p(x_j)) + sum_f w_f(id_f)
 *                + sum_{f<g} c_fg * <u_f(id_f), u_g(id_g)>
 * with per-id weights w and latent vectors u derived by hashing (seed, field, id), so
 * the generator needs no memory per id; ids Zipf(zipf_s)-distributed over each
 * field's cardinality; label ~ Bernoulli(sigmoid(logit)). Also writes the true
 * probability of every test example (one per line), so the best possible AUC and
 * log loss on the test file are known. Output is identical for any thread count.
 * With seq_len_mean > 0 every line also carries a history column (item:age:type
 * events) and the logit gains a history term (see the seq_ fields below and
 * docs/FORMATS.md section 3); the probabilities include it.
 */
typedef struct {
    uint64_t train_rows, test_rows;
    uint64_t seed;
    int num_dense, num_sparse;      /* 13, 26 */
    const int64_t *cardinality;     /* [num_sparse] distinct ids per field; NULL = default */
    double zipf_s;                  /* Zipf exponent of id popularity, e.g. 1.05 */
    int latent_dim;                 /* rank of the planted pairwise interactions, e.g. 4 */
    double interaction_scale;       /* weight of the pairwise term */
    double id_scale;                /* std of the per-id weights */
    double bias;                    /* sets the base CTR, e.g. -1.5 */
    /* Sequences (docs/FORMATS.md section 3). Off when seq_len_mean = 0: then nothing
     * below matters and the output is what it always was, byte for byte. On: every line
     * gets one sequence column (the history) and categorical seq_field holds the
     * candidate item; the logit gains seq_scale * s, with s the recency- and
     * type-weighted match of the candidate's item vector with the history's. */
    double seq_len_mean;            /* mean history length before the cap; 0 = off */
    double seq_len_sigma;           /* lognormal sigma of the lengths (default 1) */
    int seq_max;                    /* cap on the history length (default 256) */
    int seq_field;                  /* 0-based categorical of the candidate (default 9: C10) */
    double seq_scale;               /* weight of the history term (default 1) */
    double seq_decay;               /* recency time constant, seconds (default 86400) */
    double seq_repeat;              /* P(candidate = a history item) (default 0.2) */
    double seq_type_w[3];           /* weight of event types 0, 1, 2 (click, cart, order) in
                                       the history term (default 1, 2, 3) */
} em_gen_cfg;

em_gen_cfg em_gen_default(void);
em_status em_gen_write(const em_gen_cfg *cfg, const char *train_path, const char *test_path,
                       const char *test_prob_path, em_pool *pool);

/* ------------------------------------------------ drifting multi-vertical stream */
/*
 * A time-ordered stream of `rows` examples in `windows` equal windows (window t holds
 * rows [t*rows/W, (t+1)*rows/W)), each example belonging to one of `verticals`
 * products drawn with probabilities `shares`. Vertical v's ground truth is the
 * generator's global model (dense effects, per-id weights, pairwise interactions)
 * plus a per-vertical part (a bias offset and a second per-id weight of std
 * vertical_scale). Drift, per window t with theta_t = drift * t:
 *   - every per-id weight rotates: w(id, t) = w0(id) cos(theta_t) + w1(id) sin(theta_t);
 *   - in each field with at least churn_min_card ids, a fraction `turnover` of the
 *     Zipf ranks hands its popularity to a brand-new id (the old id vanishes).
 * Writes the Criteo TSV lines (same format as em_gen_write's), a sidecar with one line
 * per example "vertical 	 window 	 true probability", and optionally a per-window
 * summary (docs/FORMATS.md). A path "-" writes to stdout. Streaming with bounded
 * memory; output identical for any thread count.
 */
typedef struct {
    em_gen_cfg base;          /* global model; base.train_rows is ignored, base.test_rows too */
    uint64_t rows;            /* examples in the whole stream */
    int windows;              /* >= 1, <= rows */
    int verticals;            /* 1..EM_DRIFT_MAX_VERTICALS */
    const double *shares;     /* [verticals] traffic shares (>= 0, normalized); NULL = default */
    double turnover;          /* in [0, 1]: fraction of ranks whose id is replaced per window */
    double drift;             /* radians per window of the per-id weight rotation, >= 0 */
    double vertical_scale;    /* std of the per-vertical per-id weights, >= 0 */
    double vertical_bias;     /* std of the per-vertical logit offsets, >= 0 */
    int64_t churn_min_card;   /* fields with fewer ids never churn (device type, ...), >= 1 */
} em_drift_cfg;

#define EM_DRIFT_MAX_VERTICALS 64

/* Defaults: em_gen_default()'s model, 3M rows, 30 windows, 3 verticals sharing
 * 0.5/0.3/0.2 of the traffic (other counts: shares ~ 1/(v+1)), turnover 0.05,
 * drift 0.05 rad/window, vertical_scale 0.15, vertical_bias 0.3, churn_min_card 100. */
em_drift_cfg em_drift_default(void);
/* data_path and side_path are required, summary_path may be NULL. EM_ERR_INVALID
 * for a bad config, EM_ERR_IO, EM_ERR_NOMEM. */
em_status em_gen_drift_write(const em_drift_cfg *cfg, const char *data_path,
                             const char *side_path, const char *summary_path, em_pool *pool);

#ifdef __cplusplus
}
#endif
#endif
