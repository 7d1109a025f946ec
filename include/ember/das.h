/*
 * ember/das.h - the data augmentation system (ExFM, TECHNIQUES.md section 4): a store
 * of teacher predictions keyed by example id, and the join of a student's stream
 * with it.
 *
 * The teacher (foundation model) scores every example once and appends
 * (id, vertical, logit, model version) to an append-only log file: a 32-byte header
 * and 24-byte records, each with its own XXH32 checksum (docs/FORMATS.md, section 4).
 * A crash mid-append leaves at most a torn tail, which readers ignore (and count) and
 * a writer reopening the file cuts off before appending.
 *
 * A student loads one or more logs (or a directory of segments) into an in-memory
 * index (open addressing, O(1) lookups) and joins each mini-batch with it:
 *
 *   em_das_index *ix;
 *   em_das_index_open(&ix, (const char *[]){"teacher.das"}, 1, 0);
 *   em_das_batch_ids(batch, stream, ids);                  // or the data's own ids
 *   em_das_join(ix, ids, NULL, batch->B, my_vertical, logit, mask, NULL, keep, NULL, pool);
 *   // loss = BCE(y_s, y) + w * mask * BCE(y_d, min(alpha * sigmoid(logit), 1)),
 *   // rows with keep = 0 belong to another vertical and are dropped.
 *
 * Example ids. Criteo TSV carries none, so an example's id is its position in its
 * stream (0-based line number of the file, malformed lines included, the same count
 * as em_batch.first_pos), tagged with a 16-bit stream number so that several streams
 * (one per vertical, say) never collide: id = stream << 48 | position. Data that
 * carries its own ids uses those instead; the store does not care where ids come from.
 *
 * Duplicates: when several records carry the same id, the last one read wins (files in
 * the order given, a directory's segments in name order, records in file order); they
 * are counted. This makes "re-score and append" the way to update a prediction.
 */
#ifndef EMBER_DAS_H
#define EMBER_DAS_H

#include <stddef.h>
#include <stdint.h>

#include "core.h"
#include "data.h"

#ifdef __cplusplus
extern "C" {
#endif

/* One teacher prediction. p_teacher = sigmoid(logit). */
typedef struct {
    uint64_t id;        /* example id (see above) */
    uint32_t vertical;  /* product / vertical the example belongs to */
    float logit;        /* teacher's logit */
    uint32_t version;   /* teacher model version (e.g. its training step or window) */
} em_das_rec;

/* ------------------------------------------------------------- example ids */

#define EM_DAS_POS_BITS 48
/* id of the example at 0-based position `pos` of stream `stream` (pos < 2^48). */
static inline uint64_t em_das_example_id(uint32_t stream, uint64_t pos) {
    return ((uint64_t)(stream & 0xffffu) << EM_DAS_POS_BITS) | (pos & ((1ull << EM_DAS_POS_BITS) - 1));
}
/* ids[b] = em_das_example_id(stream, batch->first_pos + b) for the batch's B examples.
 * EM_ERR_INVALID when the batch skipped malformed lines (end_pos - first_pos != B): the
 * positions of its examples are then not recoverable from the batch alone. */
em_status em_das_batch_ids(const em_batch *batch, uint32_t stream, uint64_t *ids);

/* ------------------------------------------------------------------ writer */

typedef struct em_das_writer em_das_writer;

/* Create `path` (writing and fsyncing the header) or open it for appending. An existing
 * file must have a valid header (else EM_ERR_CORRUPT); a torn tail (a partial last
 * record, or a last record whose checksum fails) is truncated away first and its size
 * reported by em_das_writer_info. Appends are safe from several threads at once (one
 * mutex); one writer process per file (use one segment per process). */
em_status em_das_writer_open(em_das_writer **out, const char *path);
/* Append n records (buffered: they reach the file when the buffer fills, at flush or at
 * close). The n records of one call are contiguous in the file. */
em_status em_das_append(em_das_writer *w, const em_das_rec *recs, size_t n);
/* Write the buffer out and fsync: every record appended before returns is durable. */
em_status em_das_flush(em_das_writer *w);
/* Flush, close and free (always frees, even on failure). NULL is a no-op (EM_OK). */
em_status em_das_writer_close(em_das_writer *w);
/* Records in the file (durable or buffered) and the bytes cut off as a torn tail when
 * the file was opened. Either pointer may be NULL. */
void em_das_writer_info(em_das_writer *w, uint64_t *records, uint64_t *dropped_bytes);

/* ------------------------------------------------------------------- index */

typedef struct em_das_index em_das_index;

typedef struct {
    uint64_t files;       /* log files loaded */
    uint64_t records;     /* valid records read (duplicates included) */
    uint64_t entries;     /* distinct ids in the index */
    uint64_t duplicates;  /* records that replaced an earlier one for the same id */
    uint64_t corrupt;     /* records skipped for a bad checksum before a file's last record */
    uint64_t torn;        /* files whose tail was torn (partial or bad last record) */
    uint64_t torn_bytes;  /* bytes ignored in torn tails */
    uint64_t evicted;     /* entries removed by em_das_index_evict */
    uint64_t filtered;    /* records read but not kept: another vertical (em_das_index_follow_upto) */
} em_das_stats;

/* Refuse (EM_ERR_CORRUPT) a file with a corrupted record anywhere but its last one,
 * instead of skipping and counting it. A torn tail is always tolerated. */
#define EM_DAS_STRICT 1u

/* An empty index sized for about `expected` ids (0 is fine; it grows). */
em_status em_das_index_create(em_das_index **out, size_t expected);
/* Load one log file, or every regular file whose name ends in ".das" in a directory
 * (in name order), into the index; later records replace earlier ones. flags:
 * EM_DAS_STRICT or 0. On failure the index holds the records read before the error. */
em_status em_das_index_load(em_das_index *ix, const char *path, unsigned flags);
/* create + load each path in order. */
em_status em_das_index_open(em_das_index **out, const char *const *paths, int npaths,
                            unsigned flags);
/* Follow a log that is still being written (streaming): read the records appended to
 * `path` since byte *offset (0 = from the start; the header is checked then), up to the
 * last whole record whose checksum holds, and advance *offset past them. A partial or
 * not yet checksum-valid last record is not an error: it is left for the next call (the
 * writer may be mid-append). Corrupted records before it count as in em_das_index_load.
 * *added (may be NULL) receives the number of records read. */
em_status em_das_index_follow(em_das_index *ix, const char *path, uint64_t *offset,
                              unsigned flags, uint64_t *added);
/* em_das_index_follow reading at most max_records records (a reader that needs only the
 * records up to some point of an in-order log, such as a windowed student, need not
 * load the rest), keeping only the records of `vertical` when it is >= 0 (the others are
 * read, checked and counted in stats.filtered: a student's index holds its own traffic).
 * *added counts the records read. */
em_status em_das_index_follow_upto(em_das_index *ix, const char *path, uint64_t *offset, uint64_t max_records,
                                   int64_t vertical, unsigned flags, uint64_t *added);
/* Remove every entry whose id is in [lo, hi) and shrink the table to fit; bounds memory
 * when a student joins a stream in windows (evict ids of positions it has passed:
 * [em_das_example_id(s, 0), em_das_example_id(s, pos))). O(table size). On failure
 * (EM_ERR_NOMEM) the index is unchanged. *removed may be NULL. */
em_status em_das_index_evict(em_das_index *ix, uint64_t lo, uint64_t hi, uint64_t *removed);
/* Insert (or replace) one prediction in memory, e.g. from a teacher in this process. */
em_status em_das_index_put(em_das_index *ix, const em_das_rec *rec);
/* 1 and *rec filled if id is present, else 0. rec may be NULL. */
int em_das_lookup(const em_das_index *ix, uint64_t id, em_das_rec *rec);
void em_das_index_stats(const em_das_index *ix, em_das_stats *out);
void em_das_index_free(em_das_index *ix); /* NULL is a no-op */

/* -------------------------------------------------------------------- join */

typedef struct {
    uint64_t present;        /* kept examples with a teacher prediction */
    uint64_t missing;        /* kept examples without one */
    uint64_t other_vertical; /* examples dropped by the vertical filter */
} em_das_join_stats;

/*
 * Join n examples of a student's stream with the teacher's predictions.
 * For each i:
 *   keep[i]  = 1 if the example belongs to `vertical` (always 1 when vertical < 0). Its
 *              vertical is verticals[i] when verticals != NULL, else the teacher record's;
 *              an example with neither (verticals NULL, no record) is kept.
 *   mask[i]  = 1.0f if kept and the teacher's prediction exists, else 0.0f;
 *   logit[i] = the teacher's logit where mask[i] = 1, else 0.0f;
 *   version[i] (if non-NULL) = the teacher's model version where mask[i] = 1, else 0.
 * keep, version and st may be NULL. Output i depends only on ids[i] (and verticals[i]),
 * so the result is bitwise identical for any order of the batch and any thread count.
 * Large batches are split over the pool (NULL = caller only).
 */
em_status em_das_join(const em_das_index *ix, const uint64_t *ids, const uint32_t *verticals,
                      size_t n, int64_t vertical, float *logit, float *mask, uint32_t *version,
                      uint8_t *keep, em_das_join_stats *st, em_pool *pool);

#ifdef __cplusplus
}
#endif
#endif
