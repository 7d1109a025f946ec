/*
 * binfmt.c - the ember binary dataset format and the streaming TSV -> binary converter.
 *
 * Layout (docs/FORMATS.md has the offset tables): a 64-byte header (magic "EMBRDAT1",
 * version, shapes, flags, record size, record count) followed by `count` fixed-size
 * little-endian records (label u32, dense f32 already log1p-transformed, missing mask
 * u64, raw ids u64). Fixed-size records make skip/resume a seek, and make the file
 * size a complete integrity check of the framing.
 *
 * Encoding goes byte by byte through put/get helpers, so the format is little-endian
 * on any host (compilers turn them into plain loads and stores on x86).
 *
 * The converter streams: one read buffer, one write buffer, O(1) memory in the input
 * size. The header is written first with count = UINT64_MAX ("incomplete") and patched
 * at the end, so a conversion that dies midway leaves a file every reader rejects; the
 * output must therefore be seekable, which is checked before anything is written.
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
}

em_status em__bin_get_header(const unsigned char in[EM__BIN_HDR], em__bin_header *h,
                             const char *path) {
    if (memcmp(in, EM__BIN_MAGIC, 8) != 0)
        return em_errorf(EM_ERR_CORRUPT, "%s: not an ember binary dataset (bad magic)", path);
    h->version = get32(in + 8);
    uint32_t hdr = get32(in + 12);
    h->num_dense = get32(in + 16);
    h->num_sparse = get32(in + 20);
    h->flags = get32(in + 24);
    h->record_size = get32(in + 28);
    h->count = get64(in + 32);
    if (h->version != EM__BIN_VERSION)
        return em_errorf(EM_ERR_CORRUPT, "%s: unsupported binary version %u (this build reads %u)",
                         path, h->version, EM__BIN_VERSION);
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
    for (int i = 40; i < (int)EM__BIN_HDR; i++)
        if (in[i]) return em_errorf(EM_ERR_CORRUPT, "%s: reserved header bytes are not zero", path);
    if (h->count == EM__BIN_COUNT_INCOMPLETE)
        return em_errorf(EM_ERR_CORRUPT, "%s: incomplete file (its conversion did not finish)", path);
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

/* ------------------------------------------------------------ converter */

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

em_status em_convert_tsv_to_bin(const char *tsv_path, const char *bin_path, int num_dense,
                                int num_sparse, int strict, em_reader_stats *stats) {
    em_reader_stats st;
    memset(&st, 0, sizeof st);
    if (stats) *stats = st;
    if (!tsv_path || !bin_path || num_dense < 0 || num_dense > 4096 || num_sparse < 0 ||
        num_sparse > 64)
        return em_errorf(EM_ERR_INVALID, "convert: bad arguments (paths, %d dense, %d sparse)",
                         num_dense, num_sparse);
    const size_t rec = em__bin_record_size(num_dense, num_sparse);
    const size_t wcap = EM__IO_BUF / rec * rec;
    int in = -1, out = -1, created = 0;
    char *rbuf = em_malloc(EM__IO_BUF);
    unsigned char *wbuf = em_malloc(wcap);
    float *dense = em_malloc(sizeof(float) * (size_t)(num_dense ? num_dense : 1));
    uint64_t *ids = em_malloc(sizeof(uint64_t) * (size_t)(num_sparse ? num_sparse : 1));
    em_status s = EM_OK;
    if (!rbuf || !wbuf || !dense || !ids) {
        s = em_errorf(EM_ERR_NOMEM, "convert: out of memory");
        goto done;
    }
    if ((s = em__open_read(tsv_path, &in)) != EM_OK) goto done;
    if (strcmp(bin_path, "-") == 0) out = 1;
    else {
        out = open(bin_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (out < 0) {
            s = em_errorf(EM_ERR_IO, "cannot create '%s': %s", bin_path, strerror(errno));
            goto done;
        }
        struct stat sb;
        created = fstat(out, &sb) == 0 && S_ISREG(sb.st_mode);
    }
    if (lseek(out, 0, SEEK_CUR) < 0) {
        s = em_errorf(EM_ERR_IO, "output '%s' is not seekable (the record count is patched at the end); write to a regular file",
                      bin_path);
        goto done;
    }

    em__bin_header h = {EM__BIN_VERSION, (uint32_t)num_dense, (uint32_t)num_sparse,
                        EM__BIN_FLAG_LOG1P, (uint32_t)rec, EM__BIN_COUNT_INCOMPLETE};
    unsigned char hdr[EM__BIN_HDR];
    em__bin_put_header(hdr, &h);
    if ((s = write_all(out, hdr, sizeof hdr, bin_path)) != EM_OK) goto done;

    em__lines ls;
    em__lines_init(&ls, in, tsv_path, rbuf, EM__IO_BUF, 0);
    size_t wlen = 0;
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
                                : em_criteo_parse_line(line, len, num_dense, num_sparse, &label,
                                                       dense, ids, &miss, &bad);
        if (ps != EM_OK) {
            char msg[sizeof st.first_error] = {0};
            snprintf(msg, sizeof msg, "%s:%llu: %s", tsv_path, (unsigned long long)st.lines,
                     em_last_error());
            if (strict) {
                st.malformed++;
                memcpy(st.first_error, msg, sizeof msg);
                s = em_errorf(EM_ERR_PARSE, "%s", msg);
                goto done;
            }
            if (!st.malformed++) memcpy(st.first_error, msg, sizeof msg);
            continue;
        }
        em__bin_put_record(wbuf + wlen, num_dense, num_sparse, label, dense, miss, ids);
        wlen += rec;
        st.examples++;
        if (wlen == wcap) {
            if ((s = write_all(out, wbuf, wlen, bin_path)) != EM_OK) goto done;
            wlen = 0;
        }
    }
    if ((s = write_all(out, wbuf, wlen, bin_path)) != EM_OK) goto done;
    unsigned char cnt[8];
    put64(cnt, st.examples);
    if (pwrite(out, cnt, 8, 32) != 8) {
        s = em_errorf(EM_ERR_IO, "patch record count of '%s': %s", bin_path, strerror(errno));
        goto done;
    }

done:
    if (in > 0) close(in);
    if (out > 1) {
        if (close(out) != 0 && s == EM_OK)
            s = em_errorf(EM_ERR_IO, "close '%s': %s", bin_path, strerror(errno));
    }
    if (s != EM_OK && created) unlink(bin_path); /* never leave a half-written dataset */
    em_free(rbuf), em_free(wbuf), em_free(dense), em_free(ids);
    if (stats) *stats = st;
    return s;
}
