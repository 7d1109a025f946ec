/*
 * binfmt.c - the ember binary dataset format, its streaming writer, and the streaming
 * TSV -> binary converter.
 *
 * Version 1 (docs/FORMATS.md section 2): a 64-byte header (magic "EMBRDAT1", version,
 * shapes, flags, record size, record count) followed by `count` fixed-size
 * little-endian records (label u32, dense f32 already log1p-transformed, missing mask
 * u64, raw ids u64). Fixed-size records make skip/resume a seek, and make the file
 * size a complete integrity check of the framing.
 *
 * Version 2 (section 2.1) adds sequence features, so records vary in size. They are
 * grouped in blocks of EM__BIN_BLOCK_RECORDS records, each block behind a 16-byte
 * header (magic, record count, payload bytes): resuming at record k walks the block
 * headers (one pread per 4096 records) instead of every record, the writer needs no
 * index in memory (each block header is patched when its block is complete), and the
 * header's data_size makes the file size an integrity check again. A record is at
 * most 1 MiB, so a reader holds any record in its one read buffer.
 *
 * Encoding goes byte by byte through put/get helpers, so the format is little-endian
 * on any host (compilers turn them into plain loads and stores on x86).
 *
 * The writer streams: one write buffer, O(1) memory in the input size. The header is
 * written first with count = UINT64_MAX ("incomplete") and patched at the end, so a
 * conversion that dies midway leaves a file every reader rejects; the output must
 * therefore be seekable, which is checked before anything is written.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data/data_internal.h"
#include "ember/data.h"

static void put32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void put64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint32_t get32(const unsigned char *p) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) v |= (uint32_t)p[i] << (8 * i);
    return v;
}
static uint64_t get64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

size_t em__bin_record_size(int num_dense, int num_sparse) {
    return 4 + 4 * (size_t)num_dense + 8 + 8 * (size_t)num_sparse;
}

void em__bin_put_header(unsigned char out[EM__BIN_HDR], const em__bin_header *h) {
    memset(out, 0, EM__BIN_HDR);
    memcpy(out, EM__BIN_MAGIC, 8);
    put32(out + 8, h->version);
    put32(out + 12, EM__BIN_HDR);
    put32(out + 16, h->num_dense);
    put32(out + 20, h->num_sparse);
    put32(out + 24, h->flags);
    put32(out + 28, h->record_size);
    put64(out + 32, h->count);
    if (h->version == EM__BIN_VERSION_SEQ) {
        put32(out + 40, h->num_seq);
        put32(out + 44, h->max_events);
        put64(out + 48, h->data_size);
        put32(out + 56, h->block_records);
    }
}

int em_seq_bin_max_events(int num_dense, int num_sparse, int num_seq) {
    if (num_seq <= 0 || num_dense < 0 || num_sparse < 0) return 0;
    int64_t room = (int64_t)EM__BIN_MAX_RECORD - (int64_t)em__bin_record_size(num_dense, num_sparse) -
                   4 * (int64_t)num_seq;
    return room <= 0 ? 0 : (int)(room / ((int64_t)EM__BIN_EVENT_BYTES * num_seq));
}

em_status em__bin_get_header(const unsigned char in[EM__BIN_HDR], em__bin_header *h,
                             const char *path) {
    memset(h, 0, sizeof *h);
    if (memcmp(in, EM__BIN_MAGIC, 8) != 0)
        return em_errorf(EM_ERR_CORRUPT, "%s: not an ember binary dataset (bad magic)", path);
    h->version = get32(in + 8);
    uint32_t hdr = get32(in + 12);
    h->num_dense = get32(in + 16);
    h->num_sparse = get32(in + 20);
    h->flags = get32(in + 24);
    h->record_size = get32(in + 28);
    h->count = get64(in + 32);
    if (h->version != EM__BIN_VERSION && h->version != EM__BIN_VERSION_SEQ)
        return em_errorf(EM_ERR_CORRUPT, "%s: unsupported binary version %u (this build reads %u and %u)",
                         path, h->version, EM__BIN_VERSION, EM__BIN_VERSION_SEQ);
    if (hdr != EM__BIN_HDR)
        return em_errorf(EM_ERR_CORRUPT, "%s: bad header size %u", path, hdr);
    if (h->flags != EM__BIN_FLAG_LOG1P)
        return em_errorf(EM_ERR_CORRUPT, "%s: unknown flags 0x%x", path, h->flags);
    if (h->num_dense > 4096 || h->num_sparse > 64)
        return em_errorf(EM_ERR_CORRUPT, "%s: bad shape (%u dense, %u sparse)", path,
                         h->num_dense, h->num_sparse);
    if (h->record_size != em__bin_record_size((int)h->num_dense, (int)h->num_sparse))
        return em_errorf(EM_ERR_CORRUPT, "%s: record size %u does not match the shape", path,
                         h->record_size);
    int reserved = 40;
    if (h->version == EM__BIN_VERSION_SEQ) {
        h->num_seq = get32(in + 40);
        h->max_events = get32(in + 44);
        h->data_size = get64(in + 48);
        h->block_records = get32(in + 56);
        reserved = 60;
        if (h->num_seq < 1 || h->num_seq > EM_SEQ_MAX_FEATURES)
            return em_errorf(EM_ERR_CORRUPT, "%s: version 2 header with %u sequence features (1..%d)", path,
                             h->num_seq, EM_SEQ_MAX_FEATURES);
        if (h->max_events > (uint32_t)em_seq_bin_max_events((int)h->num_dense, (int)h->num_sparse, (int)h->num_seq))
            return em_errorf(EM_ERR_CORRUPT, "%s: max_events %u exceeds the format's limit", path, h->max_events);
        if (h->block_records < 1)
            return em_errorf(EM_ERR_CORRUPT, "%s: block_records is 0", path);
    }
    for (int i = reserved; i < (int)EM__BIN_HDR; i++)
        if (in[i]) return em_errorf(EM_ERR_CORRUPT, "%s: reserved header bytes are not zero", path);
    if (h->count == EM__BIN_COUNT_INCOMPLETE)
        return em_errorf(EM_ERR_CORRUPT, "%s: incomplete file (its conversion did not finish)", path);
    if (h->version == EM__BIN_VERSION_SEQ) {
        /* every record takes at least its fixed part and counts; every block a header */
        uint64_t rec_min = h->record_size + 4ull * h->num_seq;
        uint64_t blocks = h->count / h->block_records + (h->count % h->block_records != 0);
        if (h->count > (UINT64_MAX / 2) / rec_min || h->data_size < h->count * rec_min + blocks * EM__BIN_BLOCK_HDR)
            return em_errorf(EM_ERR_CORRUPT, "%s: data_size %llu too small for %llu records", path,
                             (unsigned long long)h->data_size, (unsigned long long)h->count);
    }
    return EM_OK;
}

void em__bin_put_record(unsigned char *out, int num_dense, int num_sparse, float label,
                        const float *dense, uint64_t missing, const uint64_t *ids) {
    put32(out, label != 0.f);
    out += 4;
    for (int j = 0; j < num_dense; j++, out += 4) {
        uint32_t u;
        memcpy(&u, &dense[j], 4);
        put32(out, u);
    }
    put64(out, missing);
    out += 8;
    for (int f = 0; f < num_sparse; f++, out += 8) put64(out, (missing >> f & 1) ? 0 : ids[f]);
}

const char *em__bin_get_record(const unsigned char *in, int num_dense, int num_sparse,
                               float *label, float *dense, uint64_t *missing, uint64_t *ids) {
    uint32_t l = get32(in);
    if (l > 1) return "label is not 0 or 1";
    *label = (float)l;
    in += 4;
    for (int j = 0; j < num_dense; j++, in += 4) {
        uint32_t u = get32(in);
        memcpy(&dense[j], &u, 4);
        if (!(dense[j] >= 0.f && dense[j] < 64.f)) return "dense value out of range";
    }
    uint64_t m = get64(in);
    in += 8;
    if (num_sparse < 64 && (m >> num_sparse)) return "missing mask has bits past num_sparse";
    *missing = m;
    for (int f = 0; f < num_sparse; f++, in += 8) {
        ids[f] = get64(in);
        if ((m >> f & 1) && ids[f]) return "a missing categorical has a nonzero id";
    }
    return 0;
}

const char *em__bin_seq_size(const unsigned char *in, int num_seq, uint32_t max_events,
                             size_t *size) {
    size_t n = 0;
    for (int s = 0; s < num_seq; s++) {
        uint32_t c = get32(in + 4 * s);
        if (c > max_events) return "sequence longer than the header's max_events";
        n += c;
    }
    *size = 4 * (size_t)num_seq + n * EM__BIN_EVENT_BYTES;
    return 0;
}

const char *em__bin_get_seq(const unsigned char *in, int num_seq, em_seq_events *seq) {
    const unsigned char *p = in + 4 * (size_t)num_seq;
    for (int s = 0; s < num_seq; s++) {
        em_seq_events *o = &seq[s];
        const uint32_t n = get32(in + 4 * s);
        const uint32_t drop = n > (uint32_t)o->cap ? n - (uint32_t)o->cap : 0;
        const unsigned char *it = p, *ag = p + 8 * (size_t)n, *ty = ag + 8 * (size_t)n;
        int64_t prev = INT64_MAX;
        for (uint32_t e = 0; e < n; e++) {
            int64_t a = (int64_t)get64(ag + 8 * (size_t)e);
            if (a < 0) return "negative event age";
            if (a > prev) return "events out of time order";
            prev = a;
        }
        for (uint32_t e = drop; e < n; e++) {
            o->item[e - drop] = get64(it + 8 * (size_t)e);
            o->age[e - drop] = (int64_t)get64(ag + 8 * (size_t)e);
            o->type[e - drop] = ty[e];
        }
        o->total = n;
        o->len = (int)(n - drop);
        p = ty + n;
    }
    return 0;
}

size_t em__bin_put_seq(unsigned char *out, int num_seq, const em_seq_events *seq) {
    unsigned char *p = out + 4 * (size_t)num_seq;
    for (int s = 0; s < num_seq; s++) {
        const em_seq_events *q = &seq[s];
        put32(out + 4 * s, (uint32_t)q->len);
        for (int e = 0; e < q->len; e++, p += 8) put64(p, q->item[e]);
        for (int e = 0; e < q->len; e++, p += 8) put64(p, (uint64_t)q->age[e]);
        for (int e = 0; e < q->len; e++) *p++ = (unsigned char)q->type[e];
    }
    return (size_t)(p - out);
}

void em__bin_get_block(const unsigned char in[EM__BIN_BLOCK_HDR], int *magic_ok, uint32_t *nrec,
                       uint64_t *payload) {
    *magic_ok = memcmp(in, EM__BIN_BLOCK_MAGIC, 4) == 0;
    *nrec = get32(in + 4);
    *payload = get64(in + 8);
}

/* ------------------------------------------------------------ writer */

static em_status write_all(int fd, const void *buf, size_t n, const char *path) {
    const char *p = buf;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return em_errorf(EM_ERR_IO, "write '%s': %s", path, strerror(errno));
        p += w, n -= (size_t)w;
    }
    return EM_OK;
}

struct em__binw {
    char *path;
    int fd, created;
    int nd, ns, nseq, max_events;
    size_t rec;             /* fixed part */
    unsigned char *buf;     /* EM__IO_BUF bytes */
    size_t cap, len;        /* buffered bytes: file offsets [flushed, flushed + len) */
    uint64_t flushed;       /* bytes already written, header included */
    uint64_t count;
    /* version 2 */
    uint32_t blk_n, max_seen;
    uint64_t blk_off, blk_bytes; /* file offset of the open block's header, its payload */
};

em_status em__binw_open(em__binw **out, const char *path, int num_dense, int num_sparse,
                        int num_seq) {
    *out = NULL;
    if (!path || num_dense < 0 || num_dense > 4096 || num_sparse < 0 || num_sparse > 64 ||
        num_seq < 0 || num_seq > EM_SEQ_MAX_FEATURES)
        return em_errorf(EM_ERR_INVALID, "binary writer: bad shape (%d dense <= 4096, %d sparse <= 64, %d sequences <= %d)",
                         num_dense, num_sparse, num_seq, EM_SEQ_MAX_FEATURES);
    if (num_seq && em_seq_bin_max_events(num_dense, num_sparse, num_seq) < 1)
        return em_errorf(EM_ERR_INVALID, "binary writer: records of %d dense / %d sparse features leave no room for events",
                         num_dense, num_sparse);
    em__binw *w = em_calloc(1, sizeof *w);
    if (!w) return em_errorf(EM_ERR_NOMEM, "binary writer: out of memory");
    w->fd = -1;
    w->nd = num_dense, w->ns = num_sparse, w->nseq = num_seq;
    w->max_events = em_seq_bin_max_events(num_dense, num_sparse, num_seq);
    w->rec = em__bin_record_size(num_dense, num_sparse);
    w->cap = num_seq ? EM__IO_BUF : EM__IO_BUF / w->rec * w->rec;
    w->path = em_strdup(path);
    w->buf = em_malloc(EM__IO_BUF);
    em_status s = EM_OK;
    if (!w->path || !w->buf) {
        s = em_errorf(EM_ERR_NOMEM, "binary writer: out of memory");
        goto fail;
    }
    if (strcmp(path, "-") == 0) w->fd = 1;
    else {
        w->fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (w->fd < 0) {
            s = em_errorf(EM_ERR_IO, "cannot create '%s': %s", path, strerror(errno));
            goto fail;
        }
        struct stat sb;
        w->created = fstat(w->fd, &sb) == 0 && S_ISREG(sb.st_mode);
    }
    if (lseek(w->fd, 0, SEEK_CUR) < 0) {
        s = em_errorf(EM_ERR_IO, "output '%s' is not seekable (the record count is patched at the end); write to a regular file",
                      path);
        goto fail;
    }
    em__bin_header h = {num_seq ? EM__BIN_VERSION_SEQ : EM__BIN_VERSION, (uint32_t)num_dense,
                        (uint32_t)num_sparse, EM__BIN_FLAG_LOG1P, (uint32_t)w->rec,
                        EM__BIN_COUNT_INCOMPLETE, (uint32_t)num_seq, 0, EM__BIN_BLOCK_RECORDS, 0};
    unsigned char hdr[EM__BIN_HDR];
    em__bin_put_header(hdr, &h);
    if ((s = write_all(w->fd, hdr, sizeof hdr, path)) != EM_OK) goto fail;
    w->flushed = EM__BIN_HDR;
    *out = w;
    return EM_OK;
fail:
    return em__binw_close(w, s);
}

static em_status binw_flush(em__binw *w) {
    em_status s = write_all(w->fd, w->buf, w->len, w->path);
    w->flushed += w->len;
    w->len = 0;
    return s;
}

/* Make room for n more buffered bytes (n <= cap). */
static em_status binw_room(em__binw *w, size_t n) {
    return w->len + n > w->cap ? binw_flush(w) : EM_OK;
}

/* Write the open block's real header, in the buffer if it is still there. */
static em_status binw_end_block(em__binw *w) {
    unsigned char h[EM__BIN_BLOCK_HDR];
    memcpy(h, EM__BIN_BLOCK_MAGIC, 4);
    put32(h + 4, w->blk_n);
    put64(h + 8, w->blk_bytes);
    w->blk_n = 0;
    if (w->blk_off >= w->flushed) {
        memcpy(w->buf + (w->blk_off - w->flushed), h, sizeof h);
        return EM_OK;
    }
    if (pwrite(w->fd, h, sizeof h, (off_t)w->blk_off) != (ssize_t)sizeof h)
        return em_errorf(EM_ERR_IO, "write '%s': %s", w->path, strerror(errno));
    return EM_OK;
}

em_status em__binw_put(em__binw *w, float label, const float *dense, uint64_t missing,
                       const uint64_t *ids, const em_seq_events *seq) {
    em_status s;
    if (!w->nseq) {
        if ((s = binw_room(w, w->rec)) != EM_OK) return s;
        em__bin_put_record(w->buf + w->len, w->nd, w->ns, label, dense, missing, ids);
        w->len += w->rec;
        w->count++;
        return EM_OK;
    }
    size_t size = w->rec + 4 * (size_t)w->nseq;
    for (int f = 0; f < w->nseq; f++) {
        if (seq[f].len < 0 || seq[f].len > w->max_events)
            return em_errorf(EM_ERR_INVALID, "binary writer: %d events in sequence %d, the format holds at most %d",
                             seq[f].len, f, w->max_events);
        size += (size_t)seq[f].len * EM__BIN_EVENT_BYTES;
        if ((uint32_t)seq[f].len > w->max_seen) w->max_seen = (uint32_t)seq[f].len;
    }
    if (w->blk_n == 0) { /* open a block: its header is patched when it is complete */
        if ((s = binw_room(w, EM__BIN_BLOCK_HDR)) != EM_OK) return s;
        w->blk_off = w->flushed + w->len;
        w->blk_bytes = 0;
        memset(w->buf + w->len, 0, EM__BIN_BLOCK_HDR);
        w->len += EM__BIN_BLOCK_HDR;
    }
    if ((s = binw_room(w, size)) != EM_OK) return s;
    em__bin_put_record(w->buf + w->len, w->nd, w->ns, label, dense, missing, ids);
    em__bin_put_seq(w->buf + w->len + w->rec, w->nseq, seq);
    w->len += size;
    w->count++;
    w->blk_n++;
    w->blk_bytes += size;
    if (w->blk_n == EM__BIN_BLOCK_RECORDS) return binw_end_block(w);
    return EM_OK;
}

em_status em__binw_close(em__binw *w, em_status s) {
    if (!w) return s;
    if (s == EM_OK && w->nseq && w->blk_n) s = binw_end_block(w);
    if (s == EM_OK) s = binw_flush(w);
    if (s == EM_OK) {
        em__bin_header h = {w->nseq ? EM__BIN_VERSION_SEQ : EM__BIN_VERSION, (uint32_t)w->nd,
                            (uint32_t)w->ns, EM__BIN_FLAG_LOG1P, (uint32_t)w->rec, w->count,
                            (uint32_t)w->nseq, w->max_seen, EM__BIN_BLOCK_RECORDS,
                            w->flushed - EM__BIN_HDR};
        unsigned char hdr[EM__BIN_HDR];
        em__bin_put_header(hdr, &h);
        /* version 1 patches only the count, exactly as before; version 2 the whole header */
        size_t at = w->nseq ? 0 : 32, n = w->nseq ? EM__BIN_HDR : 8;
        if (pwrite(w->fd, hdr + at, n, (off_t)at) != (ssize_t)n)
            s = em_errorf(EM_ERR_IO, "patch record count of '%s': %s", w->path, strerror(errno));
    }
    if (w->fd > 1 && close(w->fd) != 0 && s == EM_OK)
        s = em_errorf(EM_ERR_IO, "close '%s': %s", w->path, strerror(errno));
    if (s != EM_OK && w->created) unlink(w->path); /* never leave a half-written dataset */
    em_free(w->buf), em_free(w->path);
    em_free(w);
    return s;
}

/* ------------------------------------------------------------ converter */

em_status em_convert_tsv_to_bin(const char *tsv_path, const char *bin_path, int num_dense,
                                int num_sparse, int strict, em_reader_stats *stats) {
    em_convert_cfg c = {.num_dense = num_dense, .num_sparse = num_sparse, .strict = strict};
    return em_convert_tsv(tsv_path, bin_path, &c, stats);
}

em_status em_convert_tsv(const char *tsv_path, const char *bin_path, const em_convert_cfg *cfg,
                         em_reader_stats *stats) {
    em_reader_stats st;
    memset(&st, 0, sizeof st);
    if (stats) *stats = st;
    if (!cfg || !tsv_path || !bin_path || cfg->num_dense < 0 || cfg->num_dense > 4096 ||
        cfg->num_sparse < 0 || cfg->num_sparse > 64 || cfg->num_seq < 0 ||
        cfg->num_seq > EM_SEQ_MAX_FEATURES || cfg->seq_max_len < 0)
        return em_errorf(EM_ERR_INVALID, "convert: bad arguments (paths, %d dense, %d sparse, %d sequences)",
                         cfg ? cfg->num_dense : 0, cfg ? cfg->num_sparse : 0, cfg ? cfg->num_seq : 0);
    const int nd = cfg->num_dense, ns = cfg->num_sparse, nseq = cfg->num_seq;
    const int limit = em_seq_bin_max_events(nd, ns, nseq);
    if (nseq && cfg->seq_max_len > limit)
        return em_errorf(EM_ERR_INVALID, "convert: seq_max_len %d exceeds the format's limit of %d events",
                         cfg->seq_max_len, limit);
    const int cap = nseq ? (cfg->seq_max_len ? cfg->seq_max_len : limit) : 0;
    int in = -1;
    em__binw *w = NULL;
    char *rbuf = em_malloc(EM__IO_BUF);
    float *dense = em_malloc(sizeof(float) * (size_t)(nd ? nd : 1));
    uint64_t *ids = em_malloc(sizeof(uint64_t) * (size_t)(ns ? ns : 1));
    em_seq_events seq[EM_SEQ_MAX_FEATURES];
    memset(seq, 0, sizeof seq);
    /* one block for all events: items, ages, types of every feature */
    size_t ev = (size_t)cap * (size_t)nseq;
    unsigned char *evbuf = nseq ? em_malloc(ev * (8 + 8 + 4)) : NULL;
    em_status s = EM_OK;
    if (!rbuf || !dense || !ids || (nseq && !evbuf)) {
        s = em_errorf(EM_ERR_NOMEM, "convert: out of memory");
        goto done;
    }
    for (int f = 0; f < nseq; f++) {
        seq[f].item = (uint64_t *)evbuf + (size_t)f * cap;
        seq[f].age = (int64_t *)(evbuf + ev * 8) + (size_t)f * cap;
        seq[f].type = (int32_t *)(evbuf + ev * 16) + (size_t)f * cap;
        seq[f].cap = cap;
    }
    if ((s = em__open_read(tsv_path, &in)) != EM_OK) goto done;
    if ((s = em__binw_open(&w, bin_path, nd, ns, nseq)) != EM_OK) goto done;

    em__lines ls;
    em__lines_init(&ls, in, tsv_path, rbuf, EM__IO_BUF, 0);
    for (;;) {
        const char *line;
        size_t len;
        int too_long;
        s = em__lines_next(&ls, &line, &len, &too_long);
        if (s == EM_ERR_EOF) {
            s = EM_OK;
            break;
        }
        if (s != EM_OK) goto done;
        st.lines++;
        float label;
        uint64_t miss;
        int bad;
        em_status ps = too_long ? em_errorf(EM_ERR_PARSE, "line longer than %u bytes", EM__IO_BUF)
                                : em_seq_parse_line(line, len, nd, ns, nseq, &label, dense, ids,
                                                    &miss, seq, &bad);
        if (ps != EM_OK) {
            char msg[sizeof st.first_error] = {0};
            snprintf(msg, sizeof msg, "%s:%llu: %s", tsv_path, (unsigned long long)st.lines,
                     em_last_error());
            if (cfg->strict) {
                st.malformed++;
                memcpy(st.first_error, msg, sizeof msg);
                s = em_errorf(EM_ERR_PARSE, "%s", msg);
                goto done;
            }
            if (!st.malformed++) memcpy(st.first_error, msg, sizeof msg);
            continue;
        }
        if ((s = em__binw_put(w, label, dense, miss, ids, seq)) != EM_OK) goto done;
        for (int f = 0; f < nseq; f++) {
            st.seq_events += (uint64_t)seq[f].len;
            st.seq_dropped += (uint64_t)(seq[f].total - seq[f].len);
        }
        st.examples++;
    }

done:
    s = em__binw_close(w, s);
    if (in > 0) close(in);
    em_free(rbuf), em_free(dense), em_free(ids), em_free(evbuf);
    if (stats) *stats = st;
    return s;
}
