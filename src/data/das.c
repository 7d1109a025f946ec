/*
 * das.c - the data augmentation system's store of teacher predictions (ExFM): the
 * append-only log writer, the in-memory index, and the join with a student's stream.
 *
 * Log format (docs/FORMATS.md section 4): a 32-byte header ("EMBRDAS1", version,
 * sizes, flags, XXH32 of the header) and 24-byte little-endian records (id u64,
 * vertical u32, logit f32, model version u32, XXH32 of the first 20 bytes).
 * Design choices:
 *   - A checksum per record rather than per block: a record is the unit a crash can
 *     tear, a torn or flipped record costs exactly that record, and appends never
 *     rewrite earlier bytes (a block checksum would need the block's tail rewritten or
 *     padding). XXH32 of 20 bytes costs a few ns, far below the cost of reading it.
 *   - Fixed-size records: the file size alone locates a partial last record, and a
 *     reopened writer can cut a torn tail with one ftruncate.
 *   - Torn tail vs corruption: bad bytes in the last record of a file are what a crash
 *     during an append leaves (the size grew, the data did not all land), so they are
 *     ignored and counted as torn; a bad record followed by good ones is corruption,
 *     skipped and counted (or refused with EM_DAS_STRICT). A skipped record only makes
 *     one teacher prediction missing, which the join handles anyway.
 *   - The writer holds one mutex around encode + buffered write(2) on an O_APPEND fd:
 *     appends from many threads are safe, and one call's records stay contiguous.
 *   - The index is open addressing with linear probing over 24-byte slots, hashed
 *     with em_mix64, load factor <= 1/2, so a lookup is usually one cache miss; the
 *     join prefetches the slots of examples a few positions ahead so the misses of a
 *     batch overlap. Lookups are read-only, so the join splits a batch over the pool
 *     with no synchronization except the final sum of the integer counters.
 *   - Streaming: em_das_index_follow re-reads a growing log from a byte offset and stops
 *     before a partial or not-yet-valid last record (the writer may be mid-append), so a
 *     student can join with a teacher that is still scoring; em_das_index_evict drops
 *     the ids a windowed student has passed, bounding memory on an unbounded stream.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "ember/das.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "das.c encodes records with memcpy and assumes a little-endian host"
#endif

#define DAS_MAGIC "EMBRDAS1"
#define DAS_VERSION 1u
#define DAS_HDR 32u
#define DAS_REC 24u
#define DAS_REC_SEED 0x44415331u /* "DAS1": records never checksum like headers */
#define DAS_WBUF_RECS 4096u      /* writer buffer: 96 KiB */
#define DAS_RBUF_RECS 32768u     /* reader chunk: 768 KiB */

/* ------------------------------------------------------------------ codec */

static void put_header(unsigned char h[DAS_HDR]) {
    uint32_t v[5] = {DAS_VERSION, DAS_HDR, DAS_REC, 0u, 0u}; /* version, sizes, flags, reserved */
    memcpy(h, DAS_MAGIC, 8);
    memcpy(h + 8, v, sizeof v);
    uint32_t c = XXH32(h, 28, 0);
    memcpy(h + 28, &c, 4);
}

static em_status check_header(const unsigned char h[DAS_HDR], const char *path) {
    uint32_t v[6];
    if (memcmp(h, DAS_MAGIC, 8) != 0)
        return em_errorf(EM_ERR_CORRUPT, "%s: not an ember teacher-prediction log (bad magic)", path);
    memcpy(v, h + 8, sizeof v);
    if (v[5] != XXH32(h, 28, 0)) return em_errorf(EM_ERR_CORRUPT, "%s: header checksum mismatch", path);
    if (v[0] != DAS_VERSION)
        return em_errorf(EM_ERR_CORRUPT, "%s: unsupported log version %u (this build reads %u)", path,
                         v[0], DAS_VERSION);
    if (v[1] != DAS_HDR || v[2] != DAS_REC)
        return em_errorf(EM_ERR_CORRUPT, "%s: bad header/record size %u/%u", path, v[1], v[2]);
    if (v[3] != 0 || v[4] != 0) return em_errorf(EM_ERR_CORRUPT, "%s: unknown flags 0x%x", path, v[3]);
    return EM_OK;
}

static void put_rec(unsigned char *p, const em_das_rec *r) {
    memcpy(p, &r->id, 8);
    memcpy(p + 8, &r->vertical, 4);
    memcpy(p + 12, &r->logit, 4);
    memcpy(p + 16, &r->version, 4);
    uint32_t c = XXH32(p, 20, DAS_REC_SEED);
    memcpy(p + 20, &c, 4);
}

/* 1 and *r filled if the record's checksum holds. */
static int get_rec(const unsigned char *p, em_das_rec *r) {
    uint32_t c;
    memcpy(&c, p + 20, 4);
    if (c != XXH32(p, 20, DAS_REC_SEED)) return 0;
    memcpy(&r->id, p, 8);
    memcpy(&r->vertical, p + 8, 4);
    memcpy(&r->logit, p + 12, 4);
    memcpy(&r->version, p + 16, 4);
    return 1;
}

static em_status write_all(int fd, const unsigned char *p, size_t n, const char *path) {
    while (n) {
        ssize_t k = write(fd, p, n);
        if (k < 0) {
            if (errno == EINTR) continue;
            return em_errorf(EM_ERR_IO, "%s: write: %s", path, strerror(errno));
        }
        p += k, n -= (size_t)k;
    }
    return EM_OK;
}

/* Read exactly n bytes at off; EM_ERR_IO on error or a short file. */
static em_status pread_all(int fd, unsigned char *p, size_t n, off_t off, const char *path) {
    while (n) {
        ssize_t k = pread(fd, p, n, off);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0)
            return em_errorf(EM_ERR_IO, "%s: read at %lld: %s", path, (long long)off,
                             k < 0 ? strerror(errno) : "file shrank while reading");
        p += k, n -= (size_t)k, off += k;
    }
    return EM_OK;
}

/* ------------------------------------------------------------------ writer */

struct em_das_writer {
    pthread_mutex_t mu;
    int fd;
    char *path;
    unsigned char *buf;
    size_t used;            /* bytes pending in buf */
    uint64_t records;       /* in the file + pending */
    uint64_t dropped;       /* torn-tail bytes cut at open */
    em_status failed;       /* sticky: after a failed write the file tail is unknown */
};

static void writer_destroy(em_das_writer *w) {
    if (w->fd >= 0) close(w->fd);
    pthread_mutex_destroy(&w->mu);
    em_free(w->buf);
    em_free(w->path);
    em_free(w);
}

/* fsync the directory holding `path`, so a newly created file's name is durable. */
static em_status sync_parent(const char *path) {
    const char *slash = strrchr(path, '/');
    char dir[4096];
    if (!slash) snprintf(dir, sizeof dir, ".");
    else if (slash == path) snprintf(dir, sizeof dir, "/");
    else snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path);
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return em_errorf(EM_ERR_IO, "%s: open: %s", dir, strerror(errno));
    int rc = fsync(fd);
    close(fd);
    return rc == 0 ? EM_OK : em_errorf(EM_ERR_IO, "%s: fsync: %s", dir, strerror(errno));
}

/* Validate an existing file and cut its torn tail; sets w->records, w->dropped. */
static em_status writer_recover(em_das_writer *w, off_t size) {
    unsigned char h[DAS_HDR];
    if (size < (off_t)DAS_HDR) { /* crashed while writing the header: no records yet */
        em_status st = pread_all(w->fd, h, (size_t)size, 0, w->path);
        if (st) return st;
        if (memcmp(h, DAS_MAGIC, (size_t)size < 8 ? (size_t)size : 8) != 0)
            return em_errorf(EM_ERR_CORRUPT, "%s: not an ember teacher-prediction log", w->path);
        if (ftruncate(w->fd, 0) != 0) return em_errorf(EM_ERR_IO, "%s: ftruncate: %s", w->path, strerror(errno));
        w->dropped = (uint64_t)size;
        put_header(h);
        st = write_all(w->fd, h, DAS_HDR, w->path);
        if (!st && fsync(w->fd) != 0) st = em_errorf(EM_ERR_IO, "%s: fsync: %s", w->path, strerror(errno));
        return st;
    }
    em_status st = pread_all(w->fd, h, DAS_HDR, 0, w->path);
    if (!st) st = check_header(h, w->path);
    if (st) return st;
    off_t end = size - (size - (off_t)DAS_HDR) % (off_t)DAS_REC;
    if (end > (off_t)DAS_HDR) {
        unsigned char r[DAS_REC];
        em_das_rec rec;
        if ((st = pread_all(w->fd, r, DAS_REC, end - (off_t)DAS_REC, w->path))) return st;
        if (!get_rec(r, &rec)) end -= DAS_REC;
    }
    if (end != size) {
        if (ftruncate(w->fd, end) != 0 || fsync(w->fd) != 0)
            return em_errorf(EM_ERR_IO, "%s: cutting the torn tail: %s", w->path, strerror(errno));
    }
    w->dropped = (uint64_t)(size - end);
    w->records = (uint64_t)(end - (off_t)DAS_HDR) / DAS_REC;
    return EM_OK;
}

em_status em_das_writer_open(em_das_writer **out, const char *path) {
    if (!out || !path) return em_errorf(EM_ERR_INVALID, "em_das_writer_open: NULL argument");
    *out = NULL;
    em_das_writer *w = em_calloc(1, sizeof *w);
    if (!w) return EM_ERR_NOMEM;
    w->fd = -1;
    pthread_mutex_init(&w->mu, NULL);
    w->path = em_strdup(path);
    w->buf = em_malloc((size_t)DAS_WBUF_RECS * DAS_REC);
    if (!w->path || !w->buf) {
        writer_destroy(w);
        return EM_ERR_NOMEM;
    }
    w->fd = open(path, O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (w->fd < 0) {
        em_status st = em_errorf(EM_ERR_IO, "%s: open: %s", path, strerror(errno));
        writer_destroy(w);
        return st;
    }
    struct stat sb;
    em_status st = EM_OK;
    if (fstat(w->fd, &sb) != 0) st = em_errorf(EM_ERR_IO, "%s: stat: %s", path, strerror(errno));
    else if (sb.st_size == 0) {
        unsigned char h[DAS_HDR];
        put_header(h);
        st = write_all(w->fd, h, DAS_HDR, path);
        if (!st && fsync(w->fd) != 0) st = em_errorf(EM_ERR_IO, "%s: fsync: %s", path, strerror(errno));
        if (!st) st = sync_parent(path);
    } else {
        st = writer_recover(w, sb.st_size);
    }
    if (st) {
        writer_destroy(w);
        return st;
    }
    *out = w;
    return EM_OK;
}

/* Caller holds w->mu. */
static em_status drain(em_das_writer *w) {
    if (w->failed) return em_errorf(w->failed, "%s: an earlier write failed; the log is closed for appends", w->path);
    if (!w->used) return EM_OK;
    em_status st = write_all(w->fd, w->buf, w->used, w->path);
    if (st) w->failed = st;
    w->used = 0;
    return st;
}

em_status em_das_append(em_das_writer *w, const em_das_rec *recs, size_t n) {
    if (!w || (!recs && n)) return em_errorf(EM_ERR_INVALID, "em_das_append: NULL argument");
    pthread_mutex_lock(&w->mu);
    em_status st = w->failed ? drain(w) : EM_OK;
    for (size_t i = 0; i < n && !st; i++) {
        if (w->used + DAS_REC > (size_t)DAS_WBUF_RECS * DAS_REC && (st = drain(w))) break;
        put_rec(w->buf + w->used, &recs[i]);
        w->used += DAS_REC;
        w->records++;
    }
    pthread_mutex_unlock(&w->mu);
    return st;
}

em_status em_das_flush(em_das_writer *w) {
    if (!w) return em_errorf(EM_ERR_INVALID, "em_das_flush: NULL writer");
    pthread_mutex_lock(&w->mu);
    em_status st = drain(w);
    pthread_mutex_unlock(&w->mu);
    /* fsync outside the lock: appends (a server's batcher) go on meanwhile; what was
     * drained above is made durable whatever is written after it */
    if (!st && fsync(w->fd) != 0) st = em_errorf(EM_ERR_IO, "%s: fsync: %s", w->path, strerror(errno));
    return st;
}

em_status em_das_writer_close(em_das_writer *w) {
    if (!w) return EM_OK;
    em_status st = em_das_flush(w);
    if (close(w->fd) != 0 && !st) st = em_errorf(EM_ERR_IO, "%s: close: %s", w->path, strerror(errno));
    w->fd = -1;
    writer_destroy(w);
    return st;
}

void em_das_writer_info(em_das_writer *w, uint64_t *records, uint64_t *dropped_bytes) {
    pthread_mutex_lock(&w->mu);
    if (records) *records = w->records;
    if (dropped_bytes) *dropped_bytes = w->dropped;
    pthread_mutex_unlock(&w->mu);
}

/* ------------------------------------------------------------------- index */

typedef struct {
    uint64_t id;
    float logit;
    uint32_t version;
    uint32_t vertical;
    uint32_t used;
} das_slot; /* 24 bytes */

struct em_das_index {
    das_slot *slots;
    size_t cap; /* power of two, or 0 */
    em_das_stats st;
};

static size_t cap_for(size_t n) {
    size_t c = 16;
    while (c < 2 * n) c *= 2;
    return c;
}

/* Make room for `n` ids in all (load <= 1/2). */
static em_status reserve(em_das_index *ix, size_t n) {
    if (n > (SIZE_MAX / sizeof(das_slot)) / 4) return em_errorf(EM_ERR_NOMEM, "teacher index: %zu ids", n);
    if (2 * n <= ix->cap) return EM_OK;
    size_t cap = cap_for(n), m = cap - 1;
    das_slot *s = em_calloc(cap, sizeof *s);
    if (!s) return em_errorf(EM_ERR_NOMEM, "teacher index: %zu slots", cap);
    for (size_t i = 0; i < ix->cap; i++) {
        if (!ix->slots[i].used) continue;
        size_t j = (size_t)em_mix64(ix->slots[i].id) & m;
        while (s[j].used) j = (j + 1) & m;
        s[j] = ix->slots[i];
    }
    em_free(ix->slots);
    ix->slots = s;
    ix->cap = cap;
    return EM_OK;
}

/* Insert or replace; room must be reserved. */
static void put_slot(em_das_index *ix, const em_das_rec *r) {
    size_t m = ix->cap - 1, j = (size_t)em_mix64(r->id) & m;
    while (ix->slots[j].used && ix->slots[j].id != r->id) j = (j + 1) & m;
    das_slot *s = &ix->slots[j];
    if (s->used) ix->st.duplicates++;
    else ix->st.entries++;
    s->id = r->id, s->logit = r->logit, s->version = r->version, s->vertical = r->vertical;
    s->used = 1;
}

static inline const das_slot *find(const em_das_index *ix, uint64_t id) {
    if (!ix->cap) return NULL;
    size_t m = ix->cap - 1, j = (size_t)em_mix64(id) & m;
    for (;;) {
        const das_slot *s = &ix->slots[j];
        if (!s->used) return NULL;
        if (s->id == id) return s;
        j = (j + 1) & m;
    }
}

em_status em_das_index_create(em_das_index **out, size_t expected) {
    if (!out) return em_errorf(EM_ERR_INVALID, "em_das_index_create: NULL out");
    *out = NULL;
    em_das_index *ix = em_calloc(1, sizeof *ix);
    if (!ix) return EM_ERR_NOMEM;
    em_status st = reserve(ix, expected ? expected : 1);
    if (st) {
        em_das_index_free(ix);
        return st;
    }
    *out = ix;
    return EM_OK;
}

void em_das_index_free(em_das_index *ix) {
    if (!ix) return;
    em_free(ix->slots);
    em_free(ix);
}

em_status em_das_index_put(em_das_index *ix, const em_das_rec *rec) {
    if (!ix || !rec) return em_errorf(EM_ERR_INVALID, "em_das_index_put: NULL argument");
    em_status st = reserve(ix, ix->st.entries + 1);
    if (st) return st;
    put_slot(ix, rec);
    return EM_OK;
}

int em_das_lookup(const em_das_index *ix, uint64_t id, em_das_rec *rec) {
    const das_slot *s = find(ix, id);
    if (!s) return 0;
    if (rec) rec->id = id, rec->vertical = s->vertical, rec->logit = s->logit, rec->version = s->version;
    return 1;
}

void em_das_index_stats(const em_das_index *ix, em_das_stats *out) { *out = ix->st; }

/* Read records [k0, k1) of an open log into the index. A bad checksum on record k1 - 1
 * sets *last_bad (the caller decides: torn tail, or not yet written); on an earlier
 * record it is counted as corrupt or, with EM_DAS_STRICT, refused. */
static em_status scan_records(em_das_index *ix, int fd, const char *path, uint64_t k0, uint64_t k1,
                              unsigned flags, int64_t vertical, int *last_bad) {
    *last_bad = 0;
    if (k1 <= k0) return EM_OK;
    em_status st = vertical < 0 ? reserve(ix, ix->st.entries + (k1 - k0)) : EM_OK;
    if (st) return st;
    unsigned char *buf = em_malloc((size_t)DAS_RBUF_RECS * DAS_REC);
    if (!buf) return EM_ERR_NOMEM;
    for (uint64_t c0 = k0; c0 < k1 && !st; c0 += DAS_RBUF_RECS) {
        size_t cnt = (size_t)(k1 - c0 < DAS_RBUF_RECS ? k1 - c0 : DAS_RBUF_RECS);
        if ((st = pread_all(fd, buf, cnt * DAS_REC, (off_t)(DAS_HDR + c0 * DAS_REC), path))) break;
        for (size_t i = 0; i < cnt; i++) {
            em_das_rec r;
            if (get_rec(buf + i * DAS_REC, &r)) {
                ix->st.records++;
                if (vertical >= 0 && r.vertical != (uint32_t)vertical) {
                    ix->st.filtered++;
                    continue;
                }
                if (vertical >= 0 && (st = reserve(ix, ix->st.entries + 1))) break;
                put_slot(ix, &r);
            } else if (c0 + i == k1 - 1) {
                *last_bad = 1;
            } else if (flags & EM_DAS_STRICT) {
                st = em_errorf(EM_ERR_CORRUPT, "%s: record %llu (offset %llu): checksum mismatch", path,
                               (unsigned long long)(c0 + i),
                               (unsigned long long)(DAS_HDR + (c0 + i) * DAS_REC));
                break;
            } else {
                ix->st.corrupt++;
            }
        }
    }
    em_free(buf);
    return st;
}

/* A file shorter than its header whose bytes start the magic: a writer died writing
 * the header. EM_OK (no records) or EM_ERR_CORRUPT. */
static em_status check_short(int fd, off_t size, const char *path) {
    unsigned char h[DAS_HDR];
    size_t k = (size_t)size;
    em_status st = pread_all(fd, h, k, 0, path);
    if (!st && memcmp(h, DAS_MAGIC, k < 8 ? k : 8) != 0)
        st = em_errorf(EM_ERR_CORRUPT, "%s: not an ember teacher-prediction log", path);
    return st;
}

static em_status load_file(em_das_index *ix, const char *path, unsigned flags) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return em_errorf(EM_ERR_IO, "%s: open: %s", path, strerror(errno));
    em_status st = EM_OK;
    struct stat sb;
    unsigned char h[DAS_HDR];
    if (fstat(fd, &sb) != 0) {
        st = em_errorf(EM_ERR_IO, "%s: stat: %s", path, strerror(errno));
    } else if (sb.st_size < (off_t)DAS_HDR) {
        if (!(st = check_short(fd, sb.st_size, path))) {
            ix->st.files++;
            if (sb.st_size) ix->st.torn++, ix->st.torn_bytes += (uint64_t)sb.st_size;
        }
    } else if (!(st = pread_all(fd, h, DAS_HDR, 0, path)) && !(st = check_header(h, path))) {
        uint64_t body = (uint64_t)sb.st_size - DAS_HDR, nrec = body / DAS_REC, tail = body % DAS_REC;
        int last_bad;
        if (!(st = scan_records(ix, fd, path, 0, nrec, flags, -1, &last_bad))) {
            ix->st.files++;
            ix->st.torn += (uint64_t)(tail || last_bad);
            ix->st.torn_bytes += tail + (last_bad ? DAS_REC : 0);
        }
    }
    close(fd);
    return st;
}

em_status em_das_index_follow(em_das_index *ix, const char *path, uint64_t *offset, unsigned flags,
                              uint64_t *added) {
    return em_das_index_follow_upto(ix, path, offset, UINT64_MAX, -1, flags, added);
}

em_status em_das_index_follow_upto(em_das_index *ix, const char *path, uint64_t *offset, uint64_t max_records,
                                   int64_t vertical, unsigned flags, uint64_t *added) {
    if (!ix || !path || !offset) return em_errorf(EM_ERR_INVALID, "em_das_index_follow: NULL argument");
    if (flags & ~EM_DAS_STRICT) return em_errorf(EM_ERR_INVALID, "em_das_index_follow: unknown flags 0x%x", flags);
    if (*offset && (*offset < DAS_HDR || (*offset - DAS_HDR) % DAS_REC))
        return em_errorf(EM_ERR_INVALID, "%s: offset %llu is not a record boundary", path,
                         (unsigned long long)*offset);
    if (added) *added = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return em_errorf(EM_ERR_IO, "%s: open: %s", path, strerror(errno));
    em_status st = EM_OK;
    struct stat sb;
    unsigned char h[DAS_HDR];
    uint64_t before = ix->st.records;
    if (fstat(fd, &sb) != 0) {
        st = em_errorf(EM_ERR_IO, "%s: stat: %s", path, strerror(errno));
    } else if ((uint64_t)sb.st_size < *offset) {
        st = em_errorf(EM_ERR_CORRUPT, "%s: shrank below the followed offset %llu (replaced?)", path,
                       (unsigned long long)*offset);
    } else if (*offset == 0 && sb.st_size < (off_t)DAS_HDR) {
        st = check_short(fd, sb.st_size, path); /* header not written yet */
    } else if (*offset == 0 && ((st = pread_all(fd, h, DAS_HDR, 0, path)) || (st = check_header(h, path)))) {
        /* st set */
    } else {
        if (*offset == 0) *offset = DAS_HDR, ix->st.files++;
        uint64_t k0 = (*offset - DAS_HDR) / DAS_REC, k1 = ((uint64_t)sb.st_size - DAS_HDR) / DAS_REC;
        int last_bad;
        if (k1 - k0 > max_records) k1 = k0 + max_records;
        st = scan_records(ix, fd, path, k0, k1, flags, vertical, &last_bad);
        if (!st) *offset = DAS_HDR + (k1 - (uint64_t)last_bad) * DAS_REC;
    }
    close(fd);
    if (added) *added = ix->st.records - before;
    return st;
}

em_status em_das_index_evict(em_das_index *ix, uint64_t lo, uint64_t hi, uint64_t *removed) {
    if (!ix) return em_errorf(EM_ERR_INVALID, "em_das_index_evict: NULL index");
    if (removed) *removed = 0;
    uint64_t gone = 0;
    for (size_t i = 0; i < ix->cap; i++)
        gone += ix->slots[i].used && ix->slots[i].id >= lo && ix->slots[i].id < hi;
    if (!gone) return EM_OK;
    size_t keep = (size_t)(ix->st.entries - gone), cap = cap_for(keep), m = cap - 1;
    das_slot *s = em_calloc(cap, sizeof *s);
    if (!s) return em_errorf(EM_ERR_NOMEM, "teacher index: %zu slots", cap);
    for (size_t i = 0; i < ix->cap; i++) {
        const das_slot *o = &ix->slots[i];
        if (!o->used || (o->id >= lo && o->id < hi)) continue;
        size_t j = (size_t)em_mix64(o->id) & m;
        while (s[j].used) j = (j + 1) & m;
        s[j] = *o;
    }
    em_free(ix->slots);
    ix->slots = s, ix->cap = cap;
    ix->st.entries -= gone;
    ix->st.evicted += gone;
    if (removed) *removed = gone;
    return EM_OK;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static int is_das_name(const char *n) {
    size_t l = strlen(n);
    return l > 4 && n[0] != '.' && strcmp(n + l - 4, ".das") == 0;
}

static em_status load_dir(em_das_index *ix, const char *dir, unsigned flags) {
    DIR *d = opendir(dir);
    if (!d) return em_errorf(EM_ERR_IO, "%s: opendir: %s", dir, strerror(errno));
    char **names = NULL;
    size_t n = 0, cap = 0;
    em_status st = EM_OK;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!is_das_name(e->d_name)) continue;
        size_t l = strlen(dir) + strlen(e->d_name) + 2;
        char *p = em_malloc(l);
        if (!p) {
            st = EM_ERR_NOMEM;
            break;
        }
        snprintf(p, l, "%s/%s", dir, e->d_name);
        struct stat sb;
        if (stat(p, &sb) != 0 || !S_ISREG(sb.st_mode)) {
            em_free(p);
            continue;
        }
        if (n == cap) {
            size_t nc = cap ? 2 * cap : 16;
            char **nn = em_realloc(names, nc * sizeof *nn);
            if (!nn) {
                em_free(p);
                st = EM_ERR_NOMEM;
                break;
            }
            names = nn, cap = nc;
        }
        names[n++] = p;
    }
    closedir(d);
    if (!st) {
        qsort(names, n, sizeof *names, cmp_str);
        for (size_t i = 0; i < n && !st; i++) st = load_file(ix, names[i], flags);
    }
    for (size_t i = 0; i < n; i++) em_free(names[i]);
    em_free(names);
    return st;
}

em_status em_das_index_load(em_das_index *ix, const char *path, unsigned flags) {
    if (!ix || !path) return em_errorf(EM_ERR_INVALID, "em_das_index_load: NULL argument");
    if (flags & ~EM_DAS_STRICT) return em_errorf(EM_ERR_INVALID, "em_das_index_load: unknown flags 0x%x", flags);
    struct stat sb;
    if (stat(path, &sb) != 0) return em_errorf(EM_ERR_IO, "%s: stat: %s", path, strerror(errno));
    return S_ISDIR(sb.st_mode) ? load_dir(ix, path, flags) : load_file(ix, path, flags);
}

em_status em_das_index_open(em_das_index **out, const char *const *paths, int npaths, unsigned flags) {
    if (!out || (npaths && !paths) || npaths < 0) return em_errorf(EM_ERR_INVALID, "em_das_index_open: bad arguments");
    *out = NULL;
    em_das_index *ix;
    em_status st = em_das_index_create(&ix, 0);
    for (int i = 0; i < npaths && !st; i++) st = em_das_index_load(ix, paths[i], flags);
    if (st) {
        em_das_index_free(ix);
        return st;
    }
    *out = ix;
    return EM_OK;
}

/* ------------------------------------------------------------------ ids */

em_status em_das_batch_ids(const em_batch *b, uint32_t stream, uint64_t *ids) {
    if (!b || (!ids && b->B)) return em_errorf(EM_ERR_INVALID, "em_das_batch_ids: NULL argument");
    if (b->end_pos - b->first_pos != (uint64_t)b->B)
        return em_errorf(EM_ERR_INVALID,
                         "batch at position %llu skipped %llu malformed lines: example positions unknown",
                         (unsigned long long)b->first_pos,
                         (unsigned long long)(b->end_pos - b->first_pos - (uint64_t)b->B));
    if (stream > 0xffffu || b->end_pos > (1ull << EM_DAS_POS_BITS))
        return em_errorf(EM_ERR_INVALID, "example id out of range (stream %u, position %llu)", stream,
                         (unsigned long long)b->end_pos);
    for (int i = 0; i < b->B; i++) ids[i] = em_das_example_id(stream, b->first_pos + (uint64_t)i);
    return EM_OK;
}

/* -------------------------------------------------------------------- join */

#define JOIN_PREFETCH 16       /* examples ahead whose slot is prefetched */
#define JOIN_PAR_MIN 16384     /* smaller batches run on the caller: a pool wake-up costs more */

typedef struct {
    const em_das_index *ix;
    const uint64_t *ids;
    const uint32_t *verticals;
    size_t n;
    int64_t vertical;
    float *logit, *mask;
    uint32_t *version;
    uint8_t *keep;
    atomic_uint_fast64_t present, missing, other;
} join_arg;

static void join_task(void *p, int ith, int nth) {
    join_arg *a = p;
    size_t lo, hi;
    em_split(a->n, ith, nth, &lo, &hi);
    const das_slot *slots = a->ix->slots;
    const size_t m = a->ix->cap - 1;
    const int filt = a->vertical >= 0;
    const uint32_t want = (uint32_t)a->vertical;
    uint64_t present = 0, missing = 0, other = 0;
    for (size_t i = lo; i < hi; i++) {
        if (i + JOIN_PREFETCH < hi) __builtin_prefetch(&slots[em_mix64(a->ids[i + JOIN_PREFETCH]) & m], 0, 1);
        int kept = 1;
        const das_slot *s = NULL;
        if (filt && a->verticals && a->verticals[i] != want) kept = 0;
        else {
            s = find(a->ix, a->ids[i]);
            if (filt && !a->verticals && s && s->vertical != want) kept = 0, s = NULL;
        }
        a->logit[i] = s ? s->logit : 0.0f;
        a->mask[i] = s ? 1.0f : 0.0f;
        if (a->version) a->version[i] = s ? s->version : 0;
        if (a->keep) a->keep[i] = (uint8_t)kept;
        present += s != NULL;
        missing += kept && !s;
        other += !kept;
    }
    atomic_fetch_add(&a->present, present);
    atomic_fetch_add(&a->missing, missing);
    atomic_fetch_add(&a->other, other);
}

em_status em_das_join(const em_das_index *ix, const uint64_t *ids, const uint32_t *verticals,
                      size_t n, int64_t vertical, float *logit, float *mask, uint32_t *version,
                      uint8_t *keep, em_das_join_stats *st, em_pool *pool) {
    if (!ix || (n && (!ids || !logit || !mask)))
        return em_errorf(EM_ERR_INVALID, "em_das_join: NULL argument");
    if (vertical > (int64_t)UINT32_MAX)
        return em_errorf(EM_ERR_INVALID, "em_das_join: vertical %lld out of range", (long long)vertical);
    join_arg a = {.ix = ix, .ids = ids, .verticals = verticals, .n = n, .vertical = vertical,
                  .logit = logit, .mask = mask, .version = version, .keep = keep};
    atomic_init(&a.present, 0);
    atomic_init(&a.missing, 0);
    atomic_init(&a.other, 0);
    if (n >= JOIN_PAR_MIN) em_pool_run(pool, join_task, &a);
    else join_task(&a, 0, 1);
    if (st) {
        st->present = atomic_load(&a.present);
        st->missing = atomic_load(&a.missing);
        st->other_vertical = atomic_load(&a.other);
    }
    return EM_OK;
}
