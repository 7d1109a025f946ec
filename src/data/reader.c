/*
 * reader.c - the streaming batch reader (TSV or ember binary) with an optional
 * background prefetch thread, and the buffered line source it shares with the
 * converter.
 *
 * Memory is bounded whatever the file size: one 1 MiB read buffer plus a ring of
 * prefetch + hold batch slots (a slot holds the batch arrays and the raw ids of its
 * examples; hold = 1 by default). Nothing is allocated after em_reader_open().
 *
 * Positions. A position counts input lines (TSV) or records (binary) from the start of
 * the file, malformed lines included. Batch b covers [first_pos, end_pos) and ends
 * right after its last good example, so opening with skip = end_pos continues with
 * exactly the next example: that is how training resumes after a crash. `limit` is an
 * absolute end position (the reader stops once position `limit` is reached), so the
 * same (skip, limit) pair resumes a bounded run. TSV skip reads and counts lines (the
 * same line splitting as reading, so a too-long line is one line); binary skip seeks.
 *
 * Threading. With prefetch = 0 batches are parsed on the caller's thread into the
 * `hold` slots in turn. With prefetch > 0 a producer thread fills the slots in ring order and the
 * consumer takes them in the same order; the slots handed out by em_reader_next stay
 * owned by the caller until `hold` more calls (1: until the next call; 2: the caller
 * may keep the previous batch while it looks at the next one). The held slots are the
 * `nheld` ring positions just before q_head, so the ring stays contiguous: ready slots
 * follow them, free slots follow the ready ones. Both paths run the same produce() on the
 * same state, so batches are identical. Statistics travel with each slot (malformed
 * count and first error of that batch) and are applied when the consumer receives
 * it, so em_reader_stats_get() describes what was delivered, never what the thread
 * happens to have read ahead, and is the same with and without prefetch.
 * stats.lines counts the lines/records this reader consumed (the skipped ones are not
 * included), so lines == examples + malformed.
 * Errors (I/O, strict parse errors, corrupt binary records) end the stream: the slot
 * carries the status and message, em_reader_next returns them, and every later call
 * returns them again.
 * em_reader_free() stops the producer between batches and joins it (a producer
 * blocked reading a pipe that never delivers data cannot be interrupted).
 *
 * Sequences. With num_seq > 0 each slot also holds, per feature, item/age/type arrays
 * of batch_size * seq_max_len events and offsets[B+1]: an example's events are parsed
 * (TSV) or decoded (binary version 2) straight into the arrays at the running offset,
 * the items reduced modulo seq_rows[s] once the example is known to be good, so a
 * malformed line leaves nothing behind and nothing is copied at batch assembly.
 * Version-2 binary files are read block by block through the same read buffer (a
 * record is at most 1 MiB, the buffer's size); skip walks the block headers to the
 * block holding the target record (one pread each) and reads from there, discarding
 * the records before it on the producer, as TSV skip does with lines.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data/data_internal.h"
#include "ember/data.h"

#define MAX_PREFETCH 64

/* ------------------------------------------------------------ line source */

em_status em__open_read(const char *path, int *fd) {
    if (strcmp(path, "-") == 0) {
        *fd = 0;
        return EM_OK;
    }
    *fd = open(path, O_RDONLY);
    if (*fd < 0) return em_errorf(EM_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    return EM_OK;
}

long em__read_full(int fd, void *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)buf + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -1;
        if (r == 0) break;
        got += (size_t)r;
    }
    return (long)got;
}

void em__lines_init(em__lines *ls, int fd, const char *path, char *buf, size_t cap, size_t pre) {
    memset(ls, 0, sizeof *ls);
    ls->fd = fd;
    ls->path = path;
    ls->buf = buf;
    ls->cap = cap;
    ls->tail = pre;
}

em_status em__lines_next(em__lines *ls, const char **line, size_t *len, int *too_long) {
    *too_long = 0;
    for (;;) {
        char *start = ls->buf + ls->head;
        size_t avail = ls->tail - ls->head;
        char *nl = avail ? memchr(start, '\n', avail) : NULL;
        if (nl) {
            ls->head += (size_t)(nl - start) + 1;
            if (ls->discarding) {
                ls->discarding = 0;
                *too_long = 1, *line = NULL, *len = 0;
            } else {
                *line = start, *len = (size_t)(nl - start);
            }
            return EM_OK;
        }
        if (ls->eof) {
            ls->head = ls->tail;
            if (ls->discarding) {
                ls->discarding = 0;
                *too_long = 1, *line = NULL, *len = 0;
                return EM_OK;
            }
            if (avail) {
                *line = start, *len = avail;
                return EM_OK;
            }
            return EM_ERR_EOF;
        }
        /* No '\n' in the buffer: make room and read more. */
        if (ls->discarding || avail == ls->cap) {
            ls->discarding = 1; /* the line cannot fit: drop what we have of it */
            ls->off += ls->tail;
            ls->head = ls->tail = 0;
        } else if (ls->head) {
            memmove(ls->buf, start, avail);
            ls->off += ls->head;
            ls->head = 0, ls->tail = avail;
        }
        ssize_t n;
        do n = read(ls->fd, ls->buf + ls->tail, ls->cap - ls->tail);
        while (n < 0 && errno == EINTR);
        if (n < 0) return em_errorf(EM_ERR_IO, "read '%s': %s", ls->path, strerror(errno));
        if (n == 0) ls->eof = 1;
        ls->tail += (size_t)n;
    }
}

/* ------------------------------------------------------------ reader state */

typedef struct {
    em_batch batch;
    uint64_t *raw;     /* (batch_size, num_sparse) raw ids of the examples */
    uint64_t *missing; /* (batch_size) */
    uint64_t *pos, *bend; /* (batch_size) each example's position and end byte (batch.pos, batch.byte_end) */
    em_batch_seq seq[EM_SEQ_MAX_FEATURES]; /* batch.seq points here */
    em_status status;  /* EM_OK, EM_ERR_EOF, or the error that ended the stream */
    uint64_t malformed;
    uint64_t seq_events, seq_dropped;
    char first_error[sizeof(((em_reader_stats *)0)->first_error)];
    char err[512];     /* detail of `status` */
} slot;

struct em_reader {
    char *path;
    int B, nd, ns, strict, prefetch;
    int64_t *rows;
    uint64_t skip, end; /* end: absolute position to stop at (UINT64_MAX: none) */
    uint64_t skip_bytes; /* TSV: byte offset of position `skip` (0: read and count lines) */
    int fd, binary, skipped;
    char *buf;          /* the read buffer */
    em__lines lines;    /* TSV */
    size_t rec;         /* binary record size (version 2: its fixed part) */
    uint64_t nrec;      /* binary record count */
    size_t bhead, btail;
    int nseq, seq_cap;
    int64_t *seq_rows;
    /* binary version 2 */
    int v2;
    uint32_t max_events, block_records;
    uint64_t data_end;  /* file offset where the blocks end */
    uint64_t rd_off;    /* file offset of buf[btail] */
    uint32_t blk_left;  /* records left in the current block */
    uint64_t blk_bytes; /* payload bytes left in the current block */
    uint64_t pos;       /* position of the next line/record; owned by the producer */

    slot *slots;
    int nslots;
    /* ring: slots q_head .. q_head+q_count-1 are ready; the nheld before q_head are with
     * the caller (at most hold) */
    pthread_mutex_t mu;
    pthread_cond_t cv_ready, cv_free;
    int sync_init, thread_started;
    pthread_t thread;
    int q_head, q_count, nheld, hold, stop;

    int finished; /* the consumer has seen EOF or an error */
    em_status final_status;
    char final_err[512];
    em_reader_stats stats;
};

/* Record a bad line into the slot; returns nonzero when it ends the batch (strict). */
static int malformed(em_reader *r, slot *s, uint64_t lineno, const char *why) {
    char msg[sizeof s->first_error] = {0};
    snprintf(msg, sizeof msg, "%s:%llu: %s", r->path, (unsigned long long)lineno, why);
    if (!s->malformed++) memcpy(s->first_error, msg, sizeof msg);
    if (!r->strict) return 0;
    s->status = EM_ERR_PARSE;
    snprintf(s->err, sizeof s->err, "%s", msg);
    return 1;
}

/* Where example b's events go: each feature's arrays at its running offset. Items
 * are parsed as raw u64 into the int64 array (the same object, signed/unsigned
 * variants may alias) and reduced by seq_commit. */
static void seq_targets(const em_reader *r, slot *s, int b, em_seq_events *ev) {
    for (int f = 0; f < r->nseq; f++) {
        em_batch_seq *q = &s->seq[f];
        int64_t at = q->offsets[b];
        ev[f] = (em_seq_events){(uint64_t *)(q->items + at), q->age + at, q->type + at, r->seq_cap, 0, 0};
    }
}

/* Example b was good: reduce its items, close its offsets, count its events. */
static void seq_commit(const em_reader *r, slot *s, int b, const em_seq_events *ev) {
    for (int f = 0; f < r->nseq; f++) {
        em_batch_seq *q = &s->seq[f];
        const uint64_t rows = (uint64_t)r->seq_rows[f];
        int64_t at = q->offsets[b];
        for (int i = 0; i < ev[f].len; i++) q->items[at + i] = (int64_t)(ev[f].item[i] % rows);
        q->offsets[b + 1] = at + ev[f].len;
        s->seq_events += (uint64_t)ev[f].len;
        s->seq_dropped += (uint64_t)(ev[f].total - ev[f].len);
    }
}

/* Next TSV example into slot position b. Returns EM_OK (example stored), EM_ERR_EOF,
 * or an error; malformed lines are handled here (counted, or fatal when strict). */
static em_status tsv_example(em_reader *r, slot *s, int b) {
    for (;;) {
        if (r->pos >= r->end) return EM_ERR_EOF;
        const char *line;
        size_t len;
        int too_long;
        em_status st = em__lines_next(&r->lines, &line, &len, &too_long);
        if (st != EM_OK) return st;
        uint64_t lineno = ++r->pos;
        if (too_long) {
            char why[64];
            snprintf(why, sizeof why, "line longer than %zu bytes", r->lines.cap - 1);
            if (malformed(r, s, lineno, why)) return EM_ERR_PARSE;
            continue;
        }
        int bad;
        em_batch *bt = &s->batch;
        if (!r->nseq) {
            st = em_criteo_parse_line(line, len, r->nd, r->ns, &bt->label[b],
                                      bt->dense + (size_t)b * r->nd, s->raw + (size_t)b * r->ns,
                                      &s->missing[b], &bad);
            if (st == EM_OK) {
                s->pos[b] = lineno - 1, s->bend[b] = r->lines.off + r->lines.head;
                return EM_OK;
            }
        } else {
            em_seq_events ev[EM_SEQ_MAX_FEATURES];
            seq_targets(r, s, b, ev);
            st = em_seq_parse_line(line, len, r->nd, r->ns, r->nseq, &bt->label[b],
                                   bt->dense + (size_t)b * r->nd, s->raw + (size_t)b * r->ns,
                                   &s->missing[b], ev, &bad);
            if (st == EM_OK) {
                seq_commit(r, s, b, ev);
                s->pos[b] = lineno - 1, s->bend[b] = r->lines.off + r->lines.head;
                return EM_OK;
            }
        }
        if (malformed(r, s, lineno, em_last_error())) return EM_ERR_PARSE;
    }
}

/* ------------------------------------------------------------ binary version 2 */

/* At least n (<= EM__IO_BUF) bytes at buf[bhead..btail), reading no further than the
 * end of the blocks; EM_ERR_CORRUPT if the file ends first. */
static em_status bin2_ensure(em_reader *r, size_t n, const char *what) {
    size_t avail = r->btail - r->bhead;
    if (avail >= n) return EM_OK;
    if (r->bhead) {
        memmove(r->buf, r->buf + r->bhead, avail);
        r->bhead = 0, r->btail = avail;
    }
    uint64_t left = r->data_end - r->rd_off, room = EM__IO_BUF - r->btail;
    size_t want = (size_t)(left < room ? left : room);
    long got = em__read_full(r->fd, r->buf + r->btail, want);
    if (got < 0) return em_errorf(EM_ERR_IO, "read '%s': %s", r->path, strerror(errno));
    r->btail += (size_t)got, r->rd_off += (uint64_t)got;
    if ((size_t)got < want || r->btail - r->bhead < n)
        return em_errorf(EM_ERR_CORRUPT, "%s: record %llu: %s runs past the end of the data",
                         r->path, (unsigned long long)r->pos, what);
    return EM_OK;
}

/* The next record's bytes (entering a new block if needed): *rec points into the
 * buffer, *size is its length; the caller consumes it with bin2_consume. */
static em_status bin2_record(em_reader *r, const unsigned char **rec, size_t *size) {
    em_status st;
    if (r->blk_left == 0) {
        if ((st = bin2_ensure(r, EM__BIN_BLOCK_HDR, "block header")) != EM_OK) return st;
        int ok;
        uint32_t n;
        uint64_t bytes;
        em__bin_get_block((unsigned char *)r->buf + r->bhead, &ok, &n, &bytes);
        uint64_t at = r->rd_off - (r->btail - r->bhead);
        if (!ok || n < 1 || n > r->block_records || n > r->nrec - r->pos ||
            bytes > r->data_end - at - EM__BIN_BLOCK_HDR)
            return em_errorf(EM_ERR_CORRUPT, "%s: record %llu: bad block header at offset %llu", r->path,
                             (unsigned long long)r->pos, (unsigned long long)at);
        r->bhead += EM__BIN_BLOCK_HDR;
        r->blk_left = n, r->blk_bytes = bytes;
    }
    const size_t head = r->rec + 4 * (size_t)r->nseq;
    if ((st = bin2_ensure(r, head, "record")) != EM_OK) return st;
    size_t sz;
    const char *why = em__bin_seq_size((unsigned char *)r->buf + r->bhead + r->rec, r->nseq,
                                       r->max_events, &sz);
    if (!why && r->rec + sz > r->blk_bytes) why = "record runs past the end of its block";
    if (why)
        return em_errorf(EM_ERR_CORRUPT, "%s: record %llu: %s", r->path, (unsigned long long)r->pos, why);
    if ((st = bin2_ensure(r, r->rec + sz, "record")) != EM_OK) return st;
    *rec = (unsigned char *)r->buf + r->bhead;
    *size = r->rec + sz;
    return EM_OK;
}

static em_status bin2_consume(em_reader *r, size_t size) {
    r->bhead += size;
    r->blk_bytes -= size;
    r->pos++;
    if (--r->blk_left == 0 && r->blk_bytes != 0)
        return em_errorf(EM_ERR_CORRUPT, "%s: record %llu: %llu unused bytes at the end of its block", r->path,
                         (unsigned long long)(r->pos - 1), (unsigned long long)r->blk_bytes);
    if (r->pos == r->nrec && r->rd_off - (r->btail - r->bhead) != r->data_end)
        return em_errorf(EM_ERR_CORRUPT, "%s: %llu bytes after the last record", r->path,
                         (unsigned long long)(r->data_end - (r->rd_off - (r->btail - r->bhead))));
    return EM_OK;
}

static em_status bin2_example(em_reader *r, slot *s, int b) {
    if (r->pos >= r->end) return EM_ERR_EOF;
    const unsigned char *rec;
    size_t size;
    em_status st = bin2_record(r, &rec, &size);
    if (st != EM_OK) return st;
    em_batch *bt = &s->batch;
    em_seq_events ev[EM_SEQ_MAX_FEATURES];
    seq_targets(r, s, b, ev);
    const char *why = em__bin_get_record(rec, r->nd, r->ns, &bt->label[b], bt->dense + (size_t)b * r->nd,
                                         &s->missing[b], s->raw + (size_t)b * r->ns);
    if (!why) why = em__bin_get_seq(rec + r->rec, r->nseq, ev);
    if (why)
        return em_errorf(EM_ERR_CORRUPT, "%s: record %llu: %s", r->path, (unsigned long long)r->pos, why);
    seq_commit(r, s, b, ev);
    s->pos[b] = r->pos;
    if ((st = bin2_consume(r, size)) != EM_OK) return st;
    s->bend[b] = r->rd_off - (r->btail - r->bhead);
    return EM_OK;
}

static em_status bin_example(em_reader *r, slot *s, int b) {
    if (r->pos >= r->end) return EM_ERR_EOF;
    if (r->bhead == r->btail) { /* refill with whole records */
        uint64_t left = r->end - r->pos, fit = EM__IO_BUF / r->rec;
        size_t want = (size_t)(left < fit ? left : fit) * r->rec;
        long got = em__read_full(r->fd, r->buf, want);
        if (got < 0) return em_errorf(EM_ERR_IO, "read '%s': %s", r->path, strerror(errno));
        if ((size_t)got < want)
            return em_errorf(EM_ERR_CORRUPT, "%s: truncated at record %llu", r->path,
                             (unsigned long long)(r->pos + (size_t)got / r->rec));
        r->bhead = 0, r->btail = want;
    }
    em_batch *bt = &s->batch;
    const char *why = em__bin_get_record((unsigned char *)r->buf + r->bhead, r->nd, r->ns,
                                         &bt->label[b], bt->dense + (size_t)b * r->nd,
                                         &s->missing[b], s->raw + (size_t)b * r->ns);
    if (why)
        return em_errorf(EM_ERR_CORRUPT, "%s: record %llu: %s", r->path,
                         (unsigned long long)r->pos, why);
    r->bhead += r->rec;
    s->pos[b] = r->pos++;
    s->bend[b] = EM__BIN_HDR + r->pos * r->rec;
    return EM_OK;
}

/* Fill slot s with the next batch (or the status that ends the stream). Runs on the
 * producer thread, or on the caller's when prefetch = 0. */
static void produce(em_reader *r, slot *s) {
    s->status = EM_OK;
    s->malformed = 0;
    s->first_error[0] = 0;
    s->err[0] = 0;
    em_batch *bt = &s->batch;
    s->seq_events = s->seq_dropped = 0;
    for (int f = 0; f < r->nseq; f++) s->seq[f].offsets[0] = 0;
    em_status st = EM_OK;
    if (!r->skipped) { /* TSV and binary v2: skip here, on the producer, not in open */
        r->skipped = 1;
        while (r->pos < r->skip && r->pos < r->end) {
            if (r->v2) {
                const unsigned char *rec;
                size_t size;
                if ((st = bin2_record(r, &rec, &size)) != EM_OK || (st = bin2_consume(r, size)) != EM_OK) break;
                continue;
            }
            const char *line;
            size_t len;
            int too_long;
            st = em__lines_next(&r->lines, &line, &len, &too_long);
            if (st != EM_OK) break;
            r->pos++;
        }
        if (st == EM_ERR_EOF) st = EM_OK, r->end = r->pos;
    }
    bt->first_pos = r->pos;
    int b = 0;
    while (st == EM_OK && b < r->B) {
        st = r->v2 ? bin2_example(r, s, b) : r->binary ? bin_example(r, s, b) : tsv_example(r, s, b);
        if (st == EM_OK) b++;
    }
    bt->end_pos = r->pos;
    if (st == EM_ERR_EOF) {
        r->end = r->pos; /* sticky: later calls return EOF at once */
        if (b > 0) st = EM_OK;
    }
    if (st != EM_OK) {
        s->status = st;
        if (st != EM_ERR_EOF && !s->err[0]) snprintf(s->err, sizeof s->err, "%s", em_last_error());
        bt->B = 0;
        return;
    }
    /* table-major bags: table f holds examples 0..b-1, ids reduced mod rows[f]
     * (EM_ROWS_RAW: the raw id, bit-cast) */
    bt->B = b;
    int64_t k = 0;
    for (int f = 0; f < r->ns; f++) {
        const uint64_t rows = (uint64_t)r->rows[f], bit = 1ull << f;
        const int keep = r->rows[f] == EM_ROWS_RAW;
        int64_t *off = bt->offsets + (size_t)f * b;
        const uint64_t *raw = s->raw + f;
        for (int i = 0; i < b; i++) {
            off[i] = k;
            if (s->missing[i] & bit) continue;
            const uint64_t id = raw[(size_t)i * r->ns];
            bt->indices[k++] = (int64_t)(keep ? id : id % rows);
        }
    }
    bt->offsets[(size_t)r->ns * b] = k;
}

static void *producer_main(void *arg) {
    em_reader *r = arg;
    for (;;) {
        pthread_mutex_lock(&r->mu);
        while (!r->stop && r->q_count + r->nheld >= r->nslots)
            pthread_cond_wait(&r->cv_free, &r->mu);
        if (r->stop) {
            pthread_mutex_unlock(&r->mu);
            return NULL;
        }
        int idx = (r->q_head + r->q_count) % r->nslots;
        pthread_mutex_unlock(&r->mu);

        produce(r, &r->slots[idx]);

        pthread_mutex_lock(&r->mu);
        r->q_count++;
        pthread_cond_signal(&r->cv_ready);
        pthread_mutex_unlock(&r->mu);
        if (r->slots[idx].status != EM_OK) return NULL; /* the stream ended */
    }
}

/* ------------------------------------------------------------ public API */

/* Version 2: check the size, then walk the block headers to the block holding record
 * `skip` and start there (the producer discards the records before `skip`). */
static em_status open_v2(em_reader *r, const em__bin_header *h, uint64_t size) {
    r->v2 = 1;
    r->max_events = h->max_events;
    r->block_records = h->block_records;
    if (size != EM__BIN_HDR + h->data_size)
        return em_errorf(EM_ERR_CORRUPT, "%s: %s: the header says %llu data bytes, the file has %llu",
                         r->path, size < EM__BIN_HDR + h->data_size ? "truncated" : "unexpected bytes at the end",
                         (unsigned long long)h->data_size, (unsigned long long)(size - EM__BIN_HDR));
    r->data_end = size;
    if (r->end > r->nrec) r->end = r->nrec;
    uint64_t off = EM__BIN_HDR, first = 0, target = r->skip < r->nrec ? r->skip : r->nrec;
    while (first < r->nrec) {
        unsigned char bh[EM__BIN_BLOCK_HDR];
        if (off + EM__BIN_BLOCK_HDR > r->data_end ||
            pread(r->fd, bh, sizeof bh, (off_t)off) != (ssize_t)sizeof bh)
            return em_errorf(EM_ERR_CORRUPT, "%s: block header at offset %llu is missing", r->path,
                             (unsigned long long)off);
        int ok;
        uint32_t n;
        uint64_t bytes;
        em__bin_get_block(bh, &ok, &n, &bytes);
        if (!ok || n < 1 || n > r->block_records || n > r->nrec - first ||
            bytes > r->data_end - off - EM__BIN_BLOCK_HDR)
            return em_errorf(EM_ERR_CORRUPT, "%s: record %llu: bad block header at offset %llu", r->path,
                             (unsigned long long)first, (unsigned long long)off);
        if (first + n > target) break; /* this block holds the target */
        first += n;
        off += EM__BIN_BLOCK_HDR + bytes;
    }
    if (first == r->nrec && off != r->data_end)
        return em_errorf(EM_ERR_CORRUPT, "%s: %llu bytes after the last record", r->path,
                         (unsigned long long)(r->data_end - off));
    if (lseek(r->fd, (off_t)off, SEEK_SET) < 0)
        return em_errorf(EM_ERR_IO, "seek '%s': %s", r->path, strerror(errno));
    r->rd_off = off;
    r->bhead = r->btail = 0;
    r->pos = first;
    r->skip = target;
    r->skipped = first == target;
    return EM_OK;
}

/* TSV with skip_bytes: start reading at that byte offset as position `skip`. The
 * offset must be a line start (offset 0, or just after a '\n'), which catches an offset
 * that does not belong to this file; the pair itself is the caller's promise (a batch's
 * pos/byte_end). */
static em_status tsv_seek(em_reader *r) {
    struct stat sb;
    if (fstat(r->fd, &sb) != 0) return em_errorf(EM_ERR_IO, "stat '%s': %s", r->path, strerror(errno));
    char c = '\n';
    if (r->skip_bytes > (uint64_t)sb.st_size ||
        pread(r->fd, &c, 1, (off_t)(r->skip_bytes - 1)) != 1 || (c != '\n' && r->skip_bytes != (uint64_t)sb.st_size))
        return em_errorf(EM_ERR_CORRUPT, "%s: byte offset %llu (position %llu) is not the start of a line of this file (%llu bytes)",
                         r->path, (unsigned long long)r->skip_bytes, (unsigned long long)r->skip,
                         (unsigned long long)sb.st_size);
    if (lseek(r->fd, (off_t)r->skip_bytes, SEEK_SET) < 0)
        return em_errorf(EM_ERR_IO, "seek '%s': %s", r->path, strerror(errno));
    em__lines_init(&r->lines, r->fd, r->path, r->buf, EM__IO_BUF, 0);
    r->lines.off = r->skip_bytes;
    r->pos = r->skip;
    r->skipped = 1;
    return EM_OK;
}

static em_status open_source(em_reader *r) {
    em_status s = em__open_read(r->path, &r->fd);
    if (s != EM_OK) return s;
    long n = em__read_full(r->fd, r->buf, EM__BIN_HDR);
    if (n < 0) return em_errorf(EM_ERR_IO, "read '%s': %s", r->path, strerror(errno));
    if (n < 8 || memcmp(r->buf, EM__BIN_MAGIC, 8) != 0) {
        if (r->skip_bytes && r->fd != 0) return tsv_seek(r);
        em__lines_init(&r->lines, r->fd, r->path, r->buf, EM__IO_BUF, (size_t)n);
        return EM_OK;
    }
    /* ember binary */
    r->binary = 1;
    r->skipped = 1;
    if (strcmp(r->path, "-") == 0)
        return em_errorf(EM_ERR_UNSUPPORTED, "binary dataset on stdin: pass it as a file (records are read by seeking)");
    if (n < (long)EM__BIN_HDR)
        return em_errorf(EM_ERR_CORRUPT, "%s: truncated header (%ld bytes)", r->path, n);
    em__bin_header h;
    if ((s = em__bin_get_header((unsigned char *)r->buf, &h, r->path)) != EM_OK) return s;
    if ((int)h.num_dense != r->nd || (int)h.num_sparse != r->ns || (int)h.num_seq != r->nseq)
        return em_errorf(EM_ERR_INVALID, "%s: has %u dense, %u sparse and %u sequence features, the reader expects %d, %d and %d",
                         r->path, h.num_dense, h.num_sparse, h.num_seq, r->nd, r->ns, r->nseq);
    r->rec = h.record_size;
    r->nrec = h.count;
    struct stat sb;
    if (fstat(r->fd, &sb) != 0) return em_errorf(EM_ERR_IO, "stat '%s': %s", r->path, strerror(errno));
    if (h.version == EM__BIN_VERSION_SEQ) return open_v2(r, &h, (uint64_t)sb.st_size);
    uint64_t size = (uint64_t)sb.st_size, body = size - EM__BIN_HDR, whole = body / r->rec;
    if (h.count > (UINT64_MAX - EM__BIN_HDR) / r->rec || whole < h.count)
        return em_errorf(EM_ERR_CORRUPT, "%s: truncated: the header says %llu records but record %llu is incomplete (file is %llu bytes)",
                         r->path, (unsigned long long)h.count, (unsigned long long)whole,
                         (unsigned long long)size);
    if (body != h.count * r->rec)
        return em_errorf(EM_ERR_CORRUPT, "%s: %llu unexpected bytes after record %llu", r->path,
                         (unsigned long long)(body - h.count * r->rec),
                         (unsigned long long)h.count);
    r->pos = r->skip < r->nrec ? r->skip : r->nrec;
    if (r->end > r->nrec) r->end = r->nrec;
    if (lseek(r->fd, (off_t)(EM__BIN_HDR + r->pos * r->rec), SEEK_SET) < 0)
        return em_errorf(EM_ERR_IO, "seek '%s': %s", r->path, strerror(errno));
    return EM_OK;
}

em_status em_reader_open(em_reader **out, const em_reader_cfg *cfg) {
    *out = NULL;
    if (!cfg || !cfg->path || cfg->batch_size < 1 || cfg->num_dense < 0 || cfg->num_dense > 4096 ||
        cfg->num_sparse < 0 || cfg->num_sparse > 64 || cfg->prefetch < 0 ||
        cfg->prefetch > MAX_PREFETCH || cfg->hold < 0 || cfg->hold > 2 || (cfg->num_sparse && !cfg->table_rows))
        return em_errorf(EM_ERR_INVALID, "reader: bad config (path, batch_size >= 1, num_sparse <= 64, table_rows, 0 <= prefetch <= %d, 0 <= hold <= 2)",
                         MAX_PREFETCH);
    for (int f = 0; f < cfg->num_sparse; f++)
        if (cfg->table_rows[f] < 1)
            return em_errorf(EM_ERR_INVALID, "reader: table_rows[%d] = %lld must be >= 1", f,
                             (long long)cfg->table_rows[f]);
    if ((size_t)cfg->batch_size > ((size_t)1 << 40) / (8 * ((size_t)cfg->num_sparse + cfg->num_dense + 4)))
        return em_errorf(EM_ERR_INVALID, "reader: batch_size %d too large", cfg->batch_size);
    if (cfg->num_seq < 0 || cfg->num_seq > EM_SEQ_MAX_FEATURES ||
        (cfg->num_seq && (!cfg->seq_rows || cfg->seq_max_len < 1 || cfg->seq_max_len > EM_SEQ_MAX_LEN)))
        return em_errorf(EM_ERR_INVALID, "reader: bad sequence config (num_seq %d <= %d, seq_rows, 1 <= seq_max_len %d <= %d)",
                         cfg->num_seq, EM_SEQ_MAX_FEATURES, cfg->seq_max_len, EM_SEQ_MAX_LEN);
    for (int f = 0; f < cfg->num_seq; f++)
        if (cfg->seq_rows[f] < 1)
            return em_errorf(EM_ERR_INVALID, "reader: seq_rows[%d] = %lld must be >= 1", f,
                             (long long)cfg->seq_rows[f]);
    if (cfg->num_seq && (uint64_t)cfg->batch_size * (uint64_t)cfg->seq_max_len * (uint64_t)cfg->num_seq >
                            ((uint64_t)1 << 36))
        return em_errorf(EM_ERR_INVALID, "reader: batch_size %d x seq_max_len %d x %d sequences is too large",
                         cfg->batch_size, cfg->seq_max_len, cfg->num_seq);

    em_reader *r = em_calloc(1, sizeof *r);
    if (!r) return em_errorf(EM_ERR_NOMEM, "reader: out of memory");
    r->fd = -1;
    r->hold = cfg->hold > 1 ? cfg->hold : 1;
    r->B = cfg->batch_size, r->nd = cfg->num_dense, r->ns = cfg->num_sparse;
    r->strict = cfg->strict, r->prefetch = cfg->prefetch;
    r->skip = cfg->skip;
    r->skip_bytes = cfg->skip ? cfg->skip_bytes : 0;
    r->end = cfg->limit ? cfg->limit : UINT64_MAX;
    r->skipped = cfg->skip == 0;
    r->nslots = cfg->prefetch + r->hold;
    em_status s = EM_OK;
    r->nseq = cfg->num_seq, r->seq_cap = cfg->seq_max_len;
    r->path = em_strdup(cfg->path);
    r->rows = em_malloc(sizeof(int64_t) * (size_t)(r->ns ? r->ns : 1));
    r->seq_rows = em_malloc(sizeof(int64_t) * (size_t)(r->nseq ? r->nseq : 1));
    r->buf = em_malloc(EM__IO_BUF);
    r->slots = em_calloc((size_t)r->nslots, sizeof(slot));
    if (!r->path || !r->rows || !r->seq_rows || !r->buf || !r->slots) goto nomem;
    if (r->ns) memcpy(r->rows, cfg->table_rows, sizeof(int64_t) * (size_t)r->ns);
    if (r->nseq) memcpy(r->seq_rows, cfg->seq_rows, sizeof(int64_t) * (size_t)r->nseq);
    const size_t B = (size_t)r->B, nd = (size_t)r->nd, ns = (size_t)r->ns;
    const size_t ev = B * (size_t)r->seq_cap;
    for (int i = 0; i < r->nslots; i++) {
        slot *sl = &r->slots[i];
        em_batch *bt = &sl->batch;
        bt->num_dense = r->nd, bt->num_sparse = r->ns;
        bt->label = em_malloc(sizeof(float) * B);
        bt->dense = em_malloc(sizeof(float) * (B * nd + 1));
        bt->indices = em_malloc(sizeof(int64_t) * (B * ns + 1));
        bt->offsets = em_malloc(sizeof(int64_t) * (B * ns + 1));
        sl->raw = em_malloc(sizeof(uint64_t) * (B * ns + 1));
        sl->missing = em_malloc(sizeof(uint64_t) * B);
        sl->pos = em_malloc(sizeof(uint64_t) * B);
        sl->bend = em_malloc(sizeof(uint64_t) * B);
        if (!bt->label || !bt->dense || !bt->indices || !bt->offsets || !sl->raw || !sl->missing || !sl->pos ||
            !sl->bend)
            goto nomem;
        bt->pos = sl->pos, bt->byte_end = sl->bend;
        bt->num_seq = r->nseq;
        bt->seq = r->nseq ? sl->seq : NULL;
        for (int f = 0; f < r->nseq; f++) {
            em_batch_seq *q = &sl->seq[f];
            q->items = em_malloc(sizeof(int64_t) * ev);
            q->age = em_malloc(sizeof(int64_t) * ev);
            q->type = em_malloc(sizeof(int32_t) * ev);
            q->offsets = em_malloc(sizeof(int64_t) * (B + 1));
            if (!q->items || !q->age || !q->type || !q->offsets) goto nomem;
            q->offsets[0] = 0;
        }
    }
    if ((s = open_source(r)) != EM_OK) goto fail;
    if (r->prefetch > 0) {
        pthread_mutex_init(&r->mu, NULL);
        pthread_cond_init(&r->cv_ready, NULL);
        pthread_cond_init(&r->cv_free, NULL);
        r->sync_init = 1;
        if (pthread_create(&r->thread, NULL, producer_main, r) != 0) {
            s = em_errorf(EM_ERR_THREAD, "reader: could not start the prefetch thread");
            goto fail;
        }
        r->thread_started = 1;
    }
    *out = r;
    return EM_OK;
nomem:
    s = em_errorf(EM_ERR_NOMEM, "reader: out of memory (batch_size %d, prefetch %d)", r->B,
                  r->prefetch);
fail:
    em_reader_free(r);
    return s;
}

em_status em_reader_next(em_reader *r, const em_batch **out) {
    *out = NULL;
    if (r->finished) {
        if (r->final_status == EM_ERR_EOF) return EM_ERR_EOF;
        return em_errorf(r->final_status, "%s", r->final_err);
    }
    slot *s;
    if (!r->thread_started) { /* the ring of `hold` slots, in turn */
        s = &r->slots[r->q_head];
        r->q_head = (r->q_head + 1) % r->nslots;
        produce(r, s);
    } else {
        pthread_mutex_lock(&r->mu);
        if (r->nheld >= r->hold) { /* the caller is done with its oldest batch */
            r->nheld--;
            pthread_cond_signal(&r->cv_free);
        }
        while (r->q_count == 0) pthread_cond_wait(&r->cv_ready, &r->mu);
        s = &r->slots[r->q_head];
        r->nheld++;
        r->q_head = (r->q_head + 1) % r->nslots;
        r->q_count--;
        pthread_mutex_unlock(&r->mu);
    }
    em_reader_stats *st = &r->stats;
    st->lines += s->batch.end_pos - s->batch.first_pos;
    st->examples += (uint64_t)s->batch.B;
    st->seq_events += s->seq_events;
    st->seq_dropped += s->seq_dropped;
    if (s->malformed && !st->malformed) memcpy(st->first_error, s->first_error, sizeof st->first_error);
    st->malformed += s->malformed;
    if (s->status != EM_OK) {
        r->finished = 1;
        r->final_status = s->status;
        memcpy(r->final_err, s->err, sizeof r->final_err);
        if (s->status == EM_ERR_EOF) return EM_ERR_EOF;
        return em_errorf(s->status, "%s", s->err);
    }
    *out = &s->batch;
    return EM_OK;
}

void em_reader_stats_get(const em_reader *r, em_reader_stats *out) { *out = r->stats; }

void em_reader_free(em_reader *r) {
    if (!r) return;
    if (r->thread_started) {
        pthread_mutex_lock(&r->mu);
        r->stop = 1;
        pthread_cond_broadcast(&r->cv_free);
        pthread_mutex_unlock(&r->mu);
        pthread_join(r->thread, NULL);
    }
    if (r->sync_init) {
        pthread_mutex_destroy(&r->mu);
        pthread_cond_destroy(&r->cv_ready);
        pthread_cond_destroy(&r->cv_free);
    }
    if (r->fd > 0) close(r->fd);
    if (r->slots) {
        for (int i = 0; i < r->nslots; i++) {
            slot *sl = &r->slots[i];
            em_free(sl->batch.label), em_free(sl->batch.dense), em_free(sl->batch.indices);
            em_free(sl->batch.offsets), em_free(sl->raw), em_free(sl->missing);
            em_free(sl->pos), em_free(sl->bend);
            for (int f = 0; f < EM_SEQ_MAX_FEATURES; f++) {
                em_free(sl->seq[f].items), em_free(sl->seq[f].age);
                em_free(sl->seq[f].type), em_free(sl->seq[f].offsets);
            }
        }
    }
    em_free(r->slots), em_free(r->buf), em_free(r->rows), em_free(r->seq_rows), em_free(r->path);
    em_free(r);
}
