/*
 * ember/ssdtier.h - embedding tables larger than memory: rows and their optimizer state
 * live in RocksDB on disk, with an in-memory cache of hot rows under a byte limit, a
 * background prefetch of the next batch's rows, and the sparse optimizer fused into
 * backward. The API has the shape of ember/dyntable.h (em_dyn): 64-bit ids, rows created
 * on first sight in training, the table-batched jagged layout
 *   ids[offsets[t*B + b] .. offsets[t*B + b + 1]]
 * and a step of
 *   em_ssd_forward(s, out, ids, offsets, B, EM_SSD_TRAIN, pool);   load + pool
 *   em_ssd_prefetch(s, next_ids, next_offsets, B2);                 optional, background
 *   ... the model computes dout (B, T, D) ...
 *   em_ssd_backward_update(s, dout, ids, offsets, B, pool);         update, end the step
 *
 * Values are those of an em_dyn with ALWAYS admission and no budget given the same seed,
 * init_scale, pooling and optimizer: the same initial rows (uniform in [-init_scale,
 * init_scale] from a counter-mode stream keyed by (seed, table, id), so independent of
 * arrival order), the same per-row gradient sums (each unique id's occurrences in batch
 * order) and updates; the cache, its size, its policy, eviction and prefetch change only
 * where a row is and how long a step takes, never a value. Results are bitwise the same
 * for any thread count.
 *
 * On disk (RocksDB, the C API): key = 12 bytes, the table as a big-endian uint32 then
 * the id as a big-endian uint64, so a table's ids scan in increasing order; value =
 *   OFFSET        SIZE  DESCRIPTION
 *   0             4*D   weights, fp32 little-endian
 *   4*D           4*S   optimizer state (AdaGrad S = D, row-wise AdaGrad 1, SGD 0)
 *   4*(D+S)       8     count: occurrences in training forwards, int64 little-endian
 *   4*(D+S)+8     8     last: step of the last training forward that saw the row
 * A row is written when it is evicted dirty, at em_ssd_flush and at em_ssd_save; a row
 * that was never trained is never written (an id not on disk reads as its initial row
 * when trained, as zeros in EM_SSD_EVAL).
 *
 * The cache holds rows + state + metadata in slots, a (table, id) -> slot hash and the
 * eviction scratch, all within cache_bytes (em_ssd_capacity_rows() slots). A miss is
 * read with one RocksDB MultiGet per batch (split over the pool); when the cache is full
 * the rows not used by the current batch are ranked and the lowest are evicted (dirty
 * ones written in one WriteBatch), evict_slack of the cache at once so that victims are
 * chosen every few batches, not every batch:
 *   EM_SSD_LRU  smallest last step first, ties by (table, id);
 *   EM_SSD_LFU  smallest count first, then smallest last step, then (table, id).
 * The rows of a batch are pinned from its train forward to its backward (or
 * em_ssd_end_step), so a batch needs at most capacity rows; a larger one fails with
 * EM_ERR_INVALID naming both numbers.
 *
 * Prefetch: em_ssd_prefetch copies the batch's ids and returns; a background thread reads
 * the rows not in the cache (evicting unpinned rows as a forward would, never the pinned
 * rows of the batch in flight) so that the next forward finds them. It may run during
 * the model's computation and em_ssd_backward_update of the current batch: it touches
 * only unpinned slots and the cache index, which the backward does not use. Every other
 * call (forward, flush, save, load, stats, free) first waits for it. Its errors are
 * returned by the call that waits (em_ssd_wait, or the next forward).
 *
 * Working directory: cfg.path holds the live RocksDB (path/db) and a marker file; it is
 * scratch: created (or, if it holds a previous store's marker, wiped) by em_ssd_create and
 * removed by em_ssd_free. State survives a restart only through em_ssd_save / em_ssd_load:
 *   DIR/db         a RocksDB checkpoint (hard links to the immutable table files where
 *                  the file system allows, copies otherwise) taken after every dirty row
 *                  was written back and the memtable flushed;
 *   DIR/ssd.meta   safetensors (ember/safetensors.h, checksummed): ssd.config I64,
 *                  ssd.counts I64 and ssd.table_rows I64 (see ssdtier_db.c), with
 *                  readable copies in the metadata.
 * DIR is built beside its final name and renamed into place, so a crash leaves the old
 * checkpoint or the new one.
 *
 * Memory: every allocation of the object goes through em_malloc; RocksDB's own (block
 * cache db_cache_bytes, memtable db_write_buffer, index and filter blocks) come on top.
 */
#ifndef EMBER_SSDTIER_H
#define EMBER_SSDTIER_H

#include "core.h"
#include "embbag.h"
#include "optim.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { EM_SSD_LRU = 0, EM_SSD_LFU } em_ssd_policy;
typedef enum { EM_SSD_TRAIN = 0, EM_SSD_EVAL } em_ssd_mode;

typedef struct {
    int num_tables;
    int dim;                /* D */
    em_pooling pooling;     /* mean divides by the bag length */
    em_optim_cfg opt;       /* EM_OPT_SGD, EM_OPT_ADAGRAD or EM_OPT_ROWWISE_ADAGRAD */
    uint64_t seed;          /* initial rows */
    float init_scale;       /* initial rows uniform in [-init_scale, init_scale] */
    const char *path;       /* working directory (copied); its parent must exist */
    size_t cache_bytes;     /* memory limit of the row cache (slots, index, scratch) */
    em_ssd_policy policy;
    float evict_slack;      /* 0 .. 0.5: cache fraction freed when a load finds it full */
    size_t db_cache_bytes;  /* RocksDB block cache; 0 = 4 MiB */
    size_t db_write_buffer; /* RocksDB memtable (up to 2 in memory); 0 = 4 MiB */
} em_ssd_cfg;

/* LRU, evict_slack 0.05, init_scale 0.01, sum pooling, seed 0. */
em_ssd_cfg em_ssd_default(int num_tables, int dim, em_optim_cfg opt, const char *path, size_t cache_bytes);

typedef struct em_ssd em_ssd;

/* EM_ERR_INVALID for a bad config (naming the field), a cache too small for one row, or
 * a path that exists and is neither empty nor a previous store's working directory;
 * EM_ERR_IO when RocksDB cannot open it (its message in the detail). */
em_status em_ssd_create(em_ssd **out, const em_ssd_cfg *cfg);
/* Waits for a prefetch, closes the store and removes its working directory; dirty rows
 * are dropped (save first to keep them). NULL is a no-op. */
void em_ssd_free(em_ssd *s);

int em_ssd_num_tables(const em_ssd *s);
int em_ssd_dim(const em_ssd *s);
int64_t em_ssd_step(const em_ssd *s);       /* steps ended so far */
size_t em_ssd_row_bytes(const em_ssd *s);   /* cache bytes one cached row costs */
int64_t em_ssd_capacity_rows(const em_ssd *s);
int64_t em_ssd_table_rows(const em_ssd *s, int t); /* rows training created in table t */
void em_ssd_set_lr(em_ssd *s, float lr);

/* out(B, T, D): out[b][t] = pool_{k in bag(t,b)} row_t(ids[k]). EM_SSD_TRAIN creates
 * rows for ids seen for the first time, adds each id's occurrences to its count, sets
 * last = em_ssd_step(), pins the batch's rows and remembers the batch for the backward.
 * EM_SSD_EVAL only reads (ids never trained read as zeros; rows it loads are cached
 * clean). Waits for a prefetch first and returns its error if it failed.
 * EM_ERR_INVALID on bad offsets or a batch larger than the cache; EM_ERR_IO / CORRUPT
 * from the store; on any error the tables are unchanged. */
em_status em_ssd_forward(em_ssd *s, float *out, const uint64_t *ids, const int64_t *offsets, int B,
                         em_ssd_mode mode, em_pool *pool);

/* Start loading, in a background thread, the rows of this batch that are not cached.
 * ids/offsets are copied; a prefetch already running is waited for first. Only timing
 * depends on it. EM_ERR_INVALID on bad offsets, EM_ERR_NOMEM, EM_ERR_THREAD. */
em_status em_ssd_prefetch(em_ssd *s, const uint64_t *ids, const int64_t *offsets, int B);
/* Wait for a running prefetch (if any) and return its status. */
em_status em_ssd_wait(em_ssd *s);

/* Backward fused with the optimizer for the batch of the last train forward (same B,
 * offsets and ids, checked): each unique id's row is updated once with g = sum over its
 * occurrences in batch order of (1/len for mean) * dout[b][t]; then the batch's rows
 * are unpinned and the step ends. EM_ERR_INVALID without a matching forward. */
em_status em_ssd_backward_update(em_ssd *s, const float *dout, const uint64_t *ids, const int64_t *offsets,
                                 int B, em_pool *pool);

/* End a step without a backward: unpin, advance. */
void em_ssd_end_step(em_ssd *s);

/* Write every dirty cached row to RocksDB (they stay cached, clean). */
em_status em_ssd_flush(em_ssd *s);

/* Read a row of table t without counting an access: from the cache, else from disk.
 * *found = 0 if the id was never trained (w, state untouched). w (D floats), state
 * (S floats), count and last may each be NULL. */
em_status em_ssd_read_row(em_ssd *s, int t, uint64_t id, float *w, float *state, int64_t *count, int64_t *last,
                          int *found);
/* 1 if (t, id) has a slot in the cache now (for tests of the policy), else 0. */
int em_ssd_cached(em_ssd *s, int t, uint64_t id);

typedef struct {
    uint64_t hits, misses;     /* unique (table, id) of forwards found / not found in the cache */
    uint64_t prefetch_hits;    /* hits on rows a prefetch loaded */
    double hit_rate;           /* hits / (hits + misses), 0 before any lookup */
    int64_t cache_rows;        /* slots in use */
    int64_t capacity_rows;
    size_t cache_bytes;        /* bytes the cache holds now (<= cfg.cache_bytes) */
    int64_t disk_rows;         /* rows stored in RocksDB */
    int64_t rows;              /* rows created by training (on disk or cached) */
    uint64_t evictions, writebacks, prefetched;
    uint64_t bytes_written, bytes_read; /* keys + values to / from RocksDB */
} em_ssd_stats;

em_ssd_stats em_ssd_get_stats(em_ssd *s);

/* Checkpoint into directory dir (replaced if it exists): write back dirty rows, flush,
 * RocksDB checkpoint, metadata, atomic rename. */
em_status em_ssd_save(em_ssd *s, const char *dir);
/* Replace the store's content with the checkpoint in dir. The object must have been
 * created with the same num_tables, dim, pooling, optimizer kind, seed and init_scale
 * (cache size and policy may differ): EM_ERR_INVALID naming the field otherwise;
 * EM_ERR_CORRUPT for a damaged or missing ssd.meta or db; the object is unchanged on any
 * error. */
em_status em_ssd_load(em_ssd *s, const char *dir);

#ifdef __cplusplus
}
#endif
#endif
