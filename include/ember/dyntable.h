/*
 * ember/dyntable.h - dynamic, collisionless embedding tables: 64-bit ids (any value, no
 * modulo) map to rows of D floats that are created on first sight in training and
 * evicted under a row or byte budget, with the sparse optimizer fused into backward.
 *
 * One object holds T tables of the same D, pooling and optimizer (like ember/embbag.h).
 * Bags use the same table-batched jagged layout as em_embbag, with raw uint64 ids:
 *   ids[offsets[t*B + b] .. offsets[t*B + b + 1]]
 *
 * A training step is
 *   em_dyn_forward(d, out, ids, offsets, B, EM_DYN_TRAIN, pool);   lookup + insert + pool
 *   ... the model computes dout (B, T, D) ...
 *   em_dyn_backward_update(d, dout, ids, offsets, B, pool);        update, end the step
 * The train forward records each id's row for the backward, which must follow with the
 * same batch (the step ends there: the step counter advances). An EM_DYN_EVAL forward
 * only reads: an id not in its table reads as zeros and nothing is inserted or counted.
 *
 * Per row: the weights (D floats), the optimizer state beside them (AdaGrad D floats,
 * row-wise AdaGrad 1, SGD none) and metadata: id, count (occurrences in training
 * forwards since the row was admitted, including the admitting batch) and last (the
 * step of the last training forward that saw it; steps count from 0).
 *
 * Initial rows: uniform in [-init_scale, init_scale] from an RNG stream seeded by
 * (seed, table, id), so a row's first value does not depend on arrival order, batch
 * composition or thread count. The optimizer state starts at opt.init_accum.
 *
 * Admission (an id not yet in its table, seen in a training forward):
 *   EM_DYN_ADMIT_ALWAYS  insert it.
 *   EM_DYN_ADMIT_COUNT   count its occurrences in a per-table count-min sketch (depth
 *                        4, cms_width counters per row, saturating uint32); insert it
 *                        once the sketch's estimate reaches admit_min_count. The sketch
 *                        never underestimates, so an id is admitted at its N-th sighting
 *                        at the latest (earlier only on sketch collisions); its memory
 *                        is bounded (16 * cms_width bytes per table) whatever the ids.
 *   EM_DYN_ADMIT_PROB    insert it iff hash(seed, table, id) / 2^64 < admit_prob: a fixed
 *                        per-id decision, so the admitted fraction is admit_prob and the
 *                        result is deterministic.
 * A rejected id reads as zeros and gets no update (counted in stats.rejections once per
 * batch in which it appears).
 *
 * Budget (per table, 0 = no limit): max_rows, or with max_bytes the largest row count
 * whose memory fits in max_bytes (em_dyn_budget_rows(): whole pages, the hash at load
 * <= 1/2 rounded to a power of two, free list, page table, sketch and eviction scratch;
 * about max_bytes / em_dyn_row_bytes() when large), whichever is smaller. It is a bound
 * at every moment, not only between steps: a table never holds more rows, and with
 * max_bytes em_dyn_get_stats().bytes never exceeds max_bytes, in the middle of a step
 * included (pages, page table and hash are never grown past what the budget needs).
 * Eviction (in the training forward, per table, before the batch's new rows go in): when
 * live rows + the batch's admitted new ids > the budget, rows the batch does not use
 * are removed in a total order until live + new <= budget * (1 - evict_slack):
 *   EM_DYN_EVICT_AGE  smallest last step first, ties by smaller id;
 *   EM_DYN_EVICT_LFU  smallest count first, ties by smaller id.
 * The evicted set is thus fully determined by the table's content and the batch. Freed
 * slots go on a free list (LIFO, pushed in eviction order) and are reused before new
 * ones. evict_slack (0 .. 0.5) evicts a little more at once so that a stream of new ids
 * selects victims every few steps instead of every step. A batch with more distinct
 * admitted ids in a table than the budget leaves room for: the ones beyond it (last in
 * order of first occurrence) are not inserted; they read as zeros and get no update,
 * counted in stats.rejections like ids refused by admission. A checkpoint with more
 * rows than the budget loads whole and is evicted down by the next training forward.
 *
 * Hash: open addressing with linear probing over a power-of-two array of (id, slot),
 * home bucket em_mix64(id) & (capacity - 1), load factor <= 1/2 (grown by rehashing the
 * entries only: rows never move), backward-shift deletion (no tombstones).
 * Rows live in pages of EM_DYN_PAGE_ROWS slots (smaller pages, a power of two of at least
 * 64 slots, under a byte budget of fewer than 16k rows); pages are never moved or freed
 * before the table is (slots are reused), so memory tracks the peak of live rows: with a
 * budget, at most the budget; without, the peak of live rows + one batch.
 *
 * Determinism: each table's lookup/insert phase runs on one worker, visiting the
 * batch's unique ids in order of first occurrence, so slots, counts and initial values
 * are the same for any thread count; the update reduces each unique id's gradient over
 * its occurrences in batch order on exactly one worker. Tables and outputs are bitwise
 * identical for any thread count. Parallelism: tables are spread over the pool in the
 * forward (lookups, inserts, pooling) and the eviction, chunks of unique ids in the
 * backward; a single-table object therefore looks up and inserts on one worker.
 */
#ifndef EMBER_DYNTABLE_H
#define EMBER_DYNTABLE_H

#include "core.h"
#include "embbag.h"
#include "optim.h"
#include "safetensors.h"

#ifdef __cplusplus
extern "C" {
#endif

#define EM_DYN_PAGE_ROWS 4096

typedef enum { EM_DYN_ADMIT_ALWAYS = 0, EM_DYN_ADMIT_COUNT, EM_DYN_ADMIT_PROB } em_dyn_admit;
typedef enum { EM_DYN_EVICT_AGE = 0, EM_DYN_EVICT_LFU } em_dyn_evict;
typedef enum { EM_DYN_TRAIN = 0, EM_DYN_EVAL } em_dyn_mode;

typedef struct {
    int num_tables;
    int dim;                /* D */
    em_pooling pooling;     /* mean divides by the bag length, rejected ids included */
    em_optim_cfg opt;       /* EM_OPT_SGD, EM_OPT_ADAGRAD or EM_OPT_ROWWISE_ADAGRAD */
    uint64_t seed;          /* initial rows and probability admission */
    float init_scale;       /* initial rows uniform in [-init_scale, init_scale] */
    em_dyn_admit admit;
    uint32_t admit_min_count; /* EM_DYN_ADMIT_COUNT: N >= 1 */
    float admit_prob;         /* EM_DYN_ADMIT_PROB: in [0, 1] */
    uint32_t cms_width;       /* EM_DYN_ADMIT_COUNT: sketch counters per row, power of two; 0 = 65536 */
    em_dyn_evict evict;
    int64_t max_rows;       /* per table; 0 = no limit */
    size_t max_bytes;       /* per table; 0 = no limit */
    float evict_slack;      /* 0 .. 0.5 */
} em_dyn_cfg;

/* A config with ALWAYS admission, AGE eviction, no budget, init_scale 0.01. */
em_dyn_cfg em_dyn_default(int num_tables, int dim, em_optim_cfg opt);

typedef struct em_dyn em_dyn;

em_status em_dyn_create(em_dyn **out, const em_dyn_cfg *cfg);
void em_dyn_free(em_dyn *d); /* NULL is a no-op */

int em_dyn_num_tables(const em_dyn *d);
int em_dyn_dim(const em_dyn *d);
int64_t em_dyn_step(const em_dyn *d); /* steps ended so far */
/* Bytes a row costs: weights + state + metadata + its share of the hash table at the
 * maximum load factor + its free-list and eviction scratch (max_bytes / this is about
 * the byte budget's rows; em_dyn_budget_rows() is exact). */
size_t em_dyn_row_bytes(const em_dyn *d);
/* The row budget of a table that the config implies (0 = none). */
int64_t em_dyn_budget_rows(const em_dyn *d);
void em_dyn_set_lr(em_dyn *d, float lr);

/* out(B, T, D): out[b][t] = pool_{k in bag(t,b)} row_t(ids[k]); absent or rejected ids
 * read as zeros. EM_DYN_TRAIN inserts admitted new ids, counts every occurrence, sets
 * last = em_dyn_step() and remembers the batch for em_dyn_backward_update. EM_ERR_INVALID
 * on bad offsets (nothing changed); EM_ERR_NOMEM if new rows cannot be allocated
 * (nothing changed: memory is reserved before any table is touched). */
em_status em_dyn_forward(em_dyn *d, float *out, const uint64_t *ids, const int64_t *offsets, int B,
                         em_dyn_mode mode, em_pool *pool);

/* Backward fused with the optimizer: given dout(B, T, D) for the batch of the last
 * EM_DYN_TRAIN forward (same B, offsets and ids, checked), every admitted id's row is updated once
 * with g = sum over its occurrences in batch order of (1/len for mean) * dout[b][t].
 * Then the step ends: the counter advances and tables over budget are evicted.
 * EM_ERR_INVALID without a matching train forward (nothing changed). */
em_status em_dyn_backward_update(em_dyn *d, const float *dout, const uint64_t *ids, const int64_t *offsets, int B,
                                 em_pool *pool);

/* End a step without a backward (e.g. a forward-only warm-up): advance. */
void em_dyn_end_step(em_dyn *d);

/* A row of table t seen from outside: pointers into the table (valid until the next
 * forward/backward/load), writable for initialisation. */
typedef struct {
    float *w;       /* D */
    float *state;   /* AdaGrad D, row-wise 1, SGD NULL */
    int64_t count, last;
    uint32_t slot;  /* the row's slot (reuse is observable) */
} em_dyn_row;

/* 1 and *row filled if id is in table t, else 0. Does not count as an access. */
int em_dyn_lookup(em_dyn *d, int t, uint64_t id, em_dyn_row *row);
/* The ids of table t in slot order; returns the number of live rows and writes at most
 * cap of them (ids may be NULL with cap 0). */
int64_t em_dyn_ids(const em_dyn *d, int t, uint64_t *ids, int64_t cap);

typedef struct {
    int64_t rows;       /* live rows */
    int64_t slots;      /* allocated row slots (pages * slots per page) */
    int64_t capacity;   /* hash buckets */
    size_t bytes;       /* bytes the table holds (pages, hash, free list, sketch) */
    uint64_t inserts, evictions, rejections;
} em_dyn_stats;

/* Stats of table t, or the sum over all tables for t = -1. */
em_dyn_stats em_dyn_get_stats(const em_dyn *d, int t);

/* Checkpoint through safetensors: per table t, in slot order,
 *   dyn.{t}.ids U64 (n), dyn.{t}.rows F32 (n, D), dyn.{t}.count I64 (n),
 *   dyn.{t}.last I64 (n), dyn.{t}.state F32 (n, S) when S > 0,
 *   dyn.{t}.stats I64 (3): inserts, evictions, rejections,
 *   dyn.{t}.cms I32 (4 * cms_width) with count admission (the sketch, bit-cast),
 * and metadata dyn.tables, dyn.dim, dyn.opt, dyn.step. em_dyn_load reads it into an
 * object created with the same num_tables, dim and optimizer kind (and cms_width for
 * count admission), replacing its content: every id, row, metadata, state and counter
 * equals the saved one (slots are renumbered 0..n-1 in file order). On any error the
 * object is unchanged (EM_ERR_INVALID for a mismatched config, EM_ERR_CORRUPT for
 * duplicate ids or bad counts, errors of em_st_open). */
em_status em_dyn_save(const em_dyn *d, const char *path);
em_status em_dyn_load(em_dyn *d, const char *path);
/* The same inside a caller's file (e.g. a model checkpoint): save_ex writes the
 * caller's tensors and metadata beside the table's (names must not start with "dyn.");
 * load_st reads the table's tensors from an opened file (path names it in errors). */
em_status em_dyn_save_ex(const em_dyn *d, const char *path, const em_st_tensor *extra, int n_extra,
                         const em_st_meta *meta, int n_meta);
em_status em_dyn_load_st(em_dyn *d, const em_st *f, const char *path);

#ifdef __cplusplus
}
#endif
#endif
