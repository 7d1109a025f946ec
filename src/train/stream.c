/*
 * stream.c - streaming training (ember/stream.h): windows of an unbounded,
 * time-ordered stream, progressive evaluation, exact checkpoints and resume; the
 * teacher side of ExFM's data augmentation (logging each example's prediction) and
 * the student side (joining each window with the teacher's log, ember/student.h).
 *
 * Structure. A `source` turns the data (one file, a growing directory, stdin) into a
 * sequence of examples, each with its global position, its file position and byte
 * offset (em_batch.pos / byte_end from the reader) and its vertical (the file's
 * sidecar). A window is copied out of the reader's batches into an example-major
 * store (so windows and batches never depend on reader batch or file boundaries);
 * training batches are cut from the store's start and laid out table-major on the
 * fly (labels and dense features are used in place).
 *
 * Exactness of resume. Everything a window does is a function of (model state, the
 * window's examples): the checkpoint after window w records the model, the student's
 * heads, and the source position after w's last example (file, in-file position, byte
 * offset, the global position of the file's start, the sidecar's byte offset), so a
 * resumed run rebuilds window w + 1 from the same examples. Side files are made to
 * agree with the checkpoint: windows.jsonl is cut to its recorded length and the
 * teacher's DAS log to its recorded record count (the records written after the
 * checkpoint are written again, with the same bits).
 *
 * Order at a checkpoint: the DAS log is flushed (fsync) before the checkpoint is
 * written (atomically, em_dlrm_save), so a checkpoint never counts records that are
 * not durable.
 */
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "ember/das.h"
#include "ember/stream.h"

#define DAS_HDR_BYTES 32u /* docs/FORMATS.md section 4 */
#define DAS_REC_BYTES 24u
#define SIDE_LINE 256

em_stream_cfg em_stream_default(void) {
    em_stream_cfg c;
    memset(&c, 0, sizeof c);
    c.model = em_dlrm_kaggle(0);
    c.batch = 128;
    c.eval_batch = 1024;
    c.window = 100000;
    c.ckpt_every = 1;
    c.prefetch = 4;
    c.poll_s = 0.2;
    c.end_file = "_END";
    c.vertical = -1;
    c.student = em_student_default();
    return c;
}

/* ------------------------------------------------------------------ source */

enum { SRC_FILE, SRC_DIR, SRC_STDIN };

typedef struct {
    const em_stream_cfg *cfg;
    const em_dlrm_cfg *mc;
    int kind;
    char path[2048];     /* the current data file ("" before the first) */
    char name[1024];     /* SRC_DIR: its name */
    int64_t index;       /* 0-based index of the current file in the stream (-1 before the first) */
    uint64_t base;       /* global position of the current file's first record */
    uint64_t pos, byte;  /* position and byte offset after the last example taken */
    uint64_t skip0;      /* where the current file's reader started */
    em_reader *r;
    const em_batch *b;
    int bi;
    FILE *side;          /* the current file's sidecar, or NULL */
    char side_path[2100];
    uint64_t side_line;  /* sidecar lines consumed */
    uint64_t side_byte;  /* byte offset after the sidecar line of the last example taken */
    int ended;
    double idle_since;
    uint64_t files, malformed;
    char first_error[256];
} source;

static int ends_with(const char *s, const char *suf) {
    size_t n = strlen(s), k = strlen(suf);
    return n >= k && strcmp(s + n - k, suf) == 0;
}

/* X.tsv / X.bin -> X.side; any other name X -> X.side */
static void side_path_of(const char *data, char *out, size_t cap) {
    size_t n = strlen(data);
    if (ends_with(data, ".tsv") || ends_with(data, ".bin")) n -= 4;
    snprintf(out, cap, "%.*s.side", (int)n, data);
}

static void src_close_file(source *s) {
    if (s->r) {
        em_reader_stats rs;
        em_reader_stats_get(s->r, &rs);
        if (rs.malformed && !s->malformed) snprintf(s->first_error, sizeof s->first_error, "%s", rs.first_error);
        s->malformed += rs.malformed;
        em_reader_free(s->r);
        s->r = NULL;
    }
    s->b = NULL;
    s->bi = 0;
    if (s->side) fclose(s->side);
    s->side = NULL;
}

/* Open the data file `path` at (pos, byte) and its sidecar at (pos, side_byte). */
static em_status src_open_file(source *s, const char *path, uint64_t pos, uint64_t byte, uint64_t side_byte) {
    snprintf(s->path, sizeof s->path, "%s", path);
    const int nsd = s->mc->num_tables - (s->cfg->vertical_feature ? 1 : 0); /* the data's fields */
    em_reader_cfg rc = {.path = path, .batch_size = s->cfg->batch, .num_dense = s->mc->num_dense,
                        .num_sparse = nsd, .table_rows = s->mc->rows, .strict = s->cfg->strict,
                        .prefetch = s->cfg->prefetch, .skip = pos, .skip_bytes = pos ? byte : 0};
    em_status st = em_reader_open(&s->r, &rc);
    if (st) return st;
    s->pos = pos, s->byte = byte, s->skip0 = pos;
    s->files++;
    s->side_line = 0, s->side_byte = 0;
    if (s->kind == SRC_STDIN) {
        if (s->cfg->vertical >= 0 || s->cfg->vertical_feature)
            return em_errorf(EM_ERR_INVALID, "stream: a vertical filter or feature needs sidecar files; stdin has none");
        return EM_OK;
    }
    side_path_of(path, s->side_path, sizeof s->side_path);
    s->side = fopen(s->side_path, "r");
    if (!s->side) {
        if (errno == ENOENT && s->cfg->vertical < 0 && !s->cfg->vertical_feature)
            return EM_OK; /* verticals are optional then */
        return em_errorf(EM_ERR_IO, "stream: sidecar '%s' of '%s': %s (a vertical filter or feature needs one per data file)",
                         s->side_path, path, strerror(errno));
    }
    if (pos == 0) return EM_OK;
    if (side_byte) { /* a checkpoint's offset: it must be a line start */
        int c = '\n';
        if (fseeko(s->side, (off_t)side_byte - 1, SEEK_SET) != 0 || (c = fgetc(s->side)) != '\n')
            return em_errorf(EM_ERR_CORRUPT, "stream: sidecar '%s': byte offset %" PRIu64 " is not a line start",
                             s->side_path, side_byte);
        s->side_line = pos, s->side_byte = side_byte;
        return EM_OK;
    }
    char line[SIDE_LINE];
    while (s->side_line < pos) {
        if (!fgets(line, sizeof line, s->side))
            return em_errorf(EM_ERR_CORRUPT, "stream: sidecar '%s' has %" PRIu64 " lines, the data file more",
                             s->side_path, s->side_line);
        if (strchr(line, '\n')) s->side_line++;
    }
    s->side_byte = (uint64_t)ftello(s->side);
    return EM_OK;
}

/* The vertical of data line `pos` (the sidecar's line pos, column 1). */
static em_status side_vertical(source *s, uint64_t pos, uint32_t *v) {
    char line[SIDE_LINE];
    for (;;) {
        if (!fgets(line, sizeof line, s->side))
            return em_errorf(EM_ERR_CORRUPT, "stream: sidecar '%s' ends at line %" PRIu64 " but '%s' has line %" PRIu64,
                             s->side_path, s->side_line, s->path, pos + 1);
        if (!strchr(line, '\n') && !feof(s->side))
            return em_errorf(EM_ERR_PARSE, "stream: %s:%" PRIu64 ": line longer than %d bytes", s->side_path,
                             s->side_line + 1, SIDE_LINE - 2);
        if (s->side_line++ == pos) break;
    }
    char *end;
    unsigned long x = strtoul(line, &end, 10);
    if (end == line || (*end != '\t' && *end != '\n' && *end != 0) || x > 0xffffffffu)
        return em_errorf(EM_ERR_PARSE, "stream: %s:%" PRIu64 ": field 1 (vertical): expected an integer", s->side_path,
                         s->side_line);
    *v = (uint32_t)x;
    s->side_byte = (uint64_t)ftello(s->side);
    return EM_OK;
}

static int file_exists(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0;
}

static void sleep_s(double s) {
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* SRC_DIR: the next file in name order after s->name; waits per the end conditions.
 * EM_ERR_EOF when the stream has ended. */
static em_status src_next_file(source *s) {
    const em_stream_cfg *c = s->cfg;
    char endp[2048];
    snprintf(endp, sizeof endp, "%s/%s", c->source, c->end_file && *c->end_file ? c->end_file : "_END");
    for (;;) {
        int end_seen = file_exists(endp); /* before the scan: a file renamed in before the marker is seen */
        DIR *d = opendir(c->source);
        if (!d) return em_errorf(EM_ERR_IO, "stream: cannot list '%s': %s", c->source, strerror(errno));
        char best[1024] = "";
        struct dirent *e;
        while ((e = readdir(d))) {
            const char *n = e->d_name;
            if (n[0] == '.' || !(ends_with(n, ".tsv") || ends_with(n, ".bin")) || strlen(n) >= sizeof best) continue;
            if (s->name[0] && strcmp(n, s->name) <= 0) continue;
            if (best[0] && strcmp(n, best) >= 0) continue;
            char p[2048];
            struct stat sb;
            snprintf(p, sizeof p, "%s/%s", c->source, n);
            if (stat(p, &sb) != 0 || !S_ISREG(sb.st_mode)) continue;
            snprintf(best, sizeof best, "%s", n);
        }
        closedir(d);
        if (best[0]) {
            char p[2048];
            snprintf(p, sizeof p, "%s/%s", c->source, best);
            snprintf(s->name, sizeof s->name, "%s", best);
            s->index++;
            s->idle_since = em_now();
            return src_open_file(s, p, 0, 0, 0);
        }
        if (end_seen) return EM_ERR_EOF;
        if (c->idle_timeout_s > 0 && em_now() - s->idle_since >= c->idle_timeout_s) return EM_ERR_EOF;
        sleep_s(c->poll_s > 0 ? c->poll_s : 0.2);
    }
}

/* The next example: reader batch *b, its index *i, global position *gpos, vertical *v.
 * EM_ERR_EOF at the end of the stream. */
static em_status src_next(source *s, const em_batch **b, int *i, uint64_t *gpos, uint32_t *v) {
    for (;;) {
        if (s->b && s->bi < s->b->B) {
            const em_batch *bb = s->b;
            int k = s->bi++;
            uint64_t p = bb->pos[k];
            *v = 0;
            if (s->side) {
                em_status st = side_vertical(s, p, v);
                if (st) return st;
            }
            s->pos = p + 1, s->byte = bb->byte_end[k];
            *b = bb, *i = k, *gpos = s->base + p;
            return EM_OK;
        }
        if (s->r) {
            em_status st = em_reader_next(s->r, &s->b);
            s->bi = 0;
            if (st == EM_OK) continue;
            s->b = NULL;
            if (st != EM_ERR_EOF) return st;
            em_reader_stats rs;
            em_reader_stats_get(s->r, &rs);
            s->base += s->skip0 + rs.lines; /* records of the file: skipped + read */
            src_close_file(s);
            if (s->kind != SRC_DIR) s->ended = 1;
        }
        if (s->ended) return EM_ERR_EOF;
        em_status st = src_next_file(s);
        if (st == EM_ERR_EOF) s->ended = 1;
        if (st) return st;
    }
}

/* ------------------------------------------------------------ window store */

typedef struct {
    int64_t cap, n;
    int nd, ns;              /* ns: the model's tables */
    int nsd;                 /* of which the data's fields (ns - 1 with the vertical as a feature) */
    int64_t vrows;           /* the vertical feature's table rows (0: none) */
    float *label, *dense;    /* (cap), (cap, nd) */
    int64_t *eoff, *ids;     /* example-major bags: (cap * ns + 1), (cap * ns) */
    uint64_t *gpos, *xid;    /* (cap) global positions, DAS example ids */
    uint32_t *vert;          /* (cap) */
    float *logit, *prob;     /* (cap) progressive predictions */
    float *tlogit, *tmask;   /* (cap) the teacher's, joined */
    /* one table-major batch of up to bcap examples */
    int bcap;
    int64_t *bidx, *boff;
} window;

static void window_free(window *w) {
    em_free(w->label), em_free(w->dense), em_free(w->eoff), em_free(w->ids), em_free(w->gpos), em_free(w->xid);
    em_free(w->vert), em_free(w->logit), em_free(w->prob), em_free(w->tlogit), em_free(w->tmask);
    em_free(w->bidx), em_free(w->boff);
    memset(w, 0, sizeof *w);
}

static em_status window_alloc(window *w, int64_t cap, int nd, int ns, int64_t vrows, int bcap) {
    memset(w, 0, sizeof *w);
    w->cap = cap, w->nd = nd, w->ns = ns, w->nsd = vrows ? ns - 1 : ns, w->vrows = vrows, w->bcap = bcap;
    const size_t n = (size_t)cap, e = n * (size_t)ns;
    w->label = em_malloc(n * sizeof(float));
    w->dense = em_malloc((n * (size_t)nd + 1) * sizeof(float));
    w->eoff = em_malloc((e + 1) * sizeof(int64_t));
    w->ids = em_malloc((e + 1) * sizeof(int64_t));
    w->gpos = em_malloc(n * sizeof(uint64_t));
    w->xid = em_malloc(n * sizeof(uint64_t));
    w->vert = em_malloc(n * sizeof(uint32_t));
    w->logit = em_malloc(n * sizeof(float));
    w->prob = em_malloc(n * sizeof(float));
    w->tlogit = em_malloc(n * sizeof(float));
    w->tmask = em_malloc(n * sizeof(float));
    w->bidx = em_malloc(((size_t)bcap * (size_t)ns + 1) * sizeof(int64_t));
    w->boff = em_malloc(((size_t)bcap * (size_t)ns + 1) * sizeof(int64_t));
    if (!w->label || !w->dense || !w->eoff || !w->ids || !w->gpos || !w->xid || !w->vert || !w->logit || !w->prob ||
        !w->tlogit || !w->tmask || !w->bidx || !w->boff) {
        window_free(w);
        return em_errorf(EM_ERR_NOMEM, "stream: no memory for a window of %lld examples", (long long)cap);
    }
    w->eoff[0] = 0;
    return EM_OK;
}

/* Append example i of reader batch b (bags are table-major there) and, with the
 * vertical as a feature, the bag {v mod vrows} as its last field. */
static em_status window_push(window *w, const em_batch *b, int i, uint64_t gpos, uint32_t v) {
    const int64_t e = w->n;
    w->label[e] = b->label[i];
    memcpy(w->dense + (size_t)e * (size_t)w->nd, b->dense + (size_t)i * (size_t)w->nd, (size_t)w->nd * sizeof(float));
    int64_t k = w->eoff[(size_t)e * (size_t)w->ns];
    for (int f = 0; f < w->nsd; f++) {
        const int64_t lo = b->offsets[(size_t)f * (size_t)b->B + (size_t)i], hi = b->offsets[(size_t)f * (size_t)b->B + (size_t)i + 1];
        if (hi - lo > 1 || k + (hi - lo) > w->cap * w->ns)
            return em_errorf(EM_ERR_INVALID, "stream: example at position %" PRIu64 " has a bag of %lld ids (at most 1)",
                             gpos, (long long)(hi - lo));
        for (int64_t j = lo; j < hi; j++) w->ids[k++] = b->indices[j];
        w->eoff[(size_t)e * (size_t)w->ns + (size_t)f + 1] = k;
    }
    if (w->vrows) {
        w->ids[k++] = (int64_t)((uint64_t)v % (uint64_t)w->vrows);
        w->eoff[(size_t)e * (size_t)w->ns + (size_t)w->ns] = k;
    }
    w->gpos[e] = gpos, w->vert[e] = v;
    w->n++;
    return EM_OK;
}

/* Examples [a, a + B) as a table-major batch (labels and dense in place). */
static void window_batch(window *w, int64_t a, int B, em_batch *out) {
    const int ns = w->ns;
    int64_t k = 0;
    for (int f = 0; f < ns; f++)
        for (int i = 0; i < B; i++) {
            const size_t u = (size_t)(a + i) * (size_t)ns + (size_t)f;
            w->boff[(size_t)f * (size_t)B + (size_t)i] = k;
            for (int64_t j = w->eoff[u]; j < w->eoff[u + 1]; j++) w->bidx[k++] = w->ids[j];
        }
    w->boff[(size_t)ns * (size_t)B] = k;
    memset(out, 0, sizeof *out);
    out->B = B, out->num_dense = w->nd, out->num_sparse = ns;
    out->label = w->label + a, out->dense = w->dense + (size_t)a * (size_t)w->nd;
    out->indices = w->bidx, out->offsets = w->boff;
    out->first_pos = w->gpos[a], out->end_pos = w->gpos[a + B - 1] + 1;
}

/* ------------------------------------------------------------------ run */

typedef struct {
    const em_stream_cfg *cfg;
    em_pool *pool;
    em_dlrm *m;
    em_student *stu;
    source src;
    window w;
    FILE *metrics;
    char metrics_path[1024], ckpt_path[1024];
    int64_t windows;         /* done in all */
    uint64_t examples;       /* trained on in all */
    em_das_writer *dw;       /* teacher */
    em_das_index *ix;        /* student */
    uint64_t follow_off;
    em_stream_result *res;
} run;

static float sigmoidf_(float z) { return z >= 0 ? 1.f / (1.f + expf(-z)) : expf(z) / (1.f + expf(z)); }

static void hex_floats(const float *x, size_t n, char *out) {
    static const char hx[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)x;
    for (size_t i = 0; i < n * 4; i++) out[2 * i] = hx[p[i] >> 4], out[2 * i + 1] = hx[p[i] & 15];
    out[n * 8] = 0;
}

static int unhex_floats(const char *s, float *x, size_t n) {
    if (strlen(s) != n * 8) return -1;
    unsigned char *p = (unsigned char *)x;
    for (size_t i = 0; i < n * 4; i++) {
        int v = 0;
        for (int k = 0; k < 2; k++) {
            char c = s[2 * i + (size_t)k];
            int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
            if (d < 0) return -1;
            v = v * 16 + d;
        }
        p[i] = (unsigned char)v;
    }
    return 0;
}

static em_status checkpoint(run *R) {
    const em_stream_cfg *c = R->cfg;
    const source *s = &R->src;
    em_status st;
    uint64_t das_records = 0;
    if (R->dw) {
        double t0 = em_now();
        st = em_das_flush(R->dw);
        R->res->log_s += em_now() - t0;
        if (st) return st;
        em_das_writer_info(R->dw, &das_records, NULL);
    }
    long mbytes = R->metrics ? ftell(R->metrics) : 0;
    char v[16][64];
    snprintf(v[0], 64, "%" PRId64, s->index + 1); /* files begun; -1 + 1 = none yet */
    snprintf(v[1], 64, "%" PRIu64, s->pos);
    snprintf(v[2], 64, "%" PRIu64, s->byte);
    snprintf(v[3], 64, "%" PRIu64, s->base);
    snprintf(v[4], 64, "%" PRIu64, s->side_byte);
    snprintf(v[5], 64, "%" PRId64, R->windows);
    snprintf(v[6], 64, "%" PRIu64, R->examples);
    snprintf(v[7], 64, "%ld", mbytes);
    snprintf(v[8], 64, "%d", c->batch);
    snprintf(v[9], 64, "%" PRId64, c->window);
    snprintf(v[10], 64, "%d", c->vertical);
    snprintf(v[11], 64, "%u", c->stream_id);
    snprintf(v[12], 64, "%" PRIu64, das_records);
    snprintf(v[13], 64, "%d", s->ended);
    snprintf(v[14], 64, "%d", c->vertical_feature ? 1 : 0);
    em_st_meta meta[21] = {
        {"stream.version", "1"},         {"stream.source", c->source},     {"stream.file", s->path},
        {"stream.files", v[0]},     {"stream.pos", v[1]},            {"stream.byte", v[2]},
        {"stream.base", v[3]},           {"stream.side_byte", v[4]},      {"stream.windows", v[5]},
        {"stream.examples", v[6]},       {"stream.metrics_bytes", v[7]},  {"stream.batch", v[8]},
        {"stream.window", v[9]},         {"stream.vertical", v[10]},      {"stream.stream_id", v[11]},
        {"stream.das_records", v[12]},   {"stream.ended", v[13]},         {"stream.vertical_feature", v[14]},
    };
    int nm = 18;
    char *hex = NULL, steps[64];
    if (R->stu) {
        size_t n = em_student_state_size(R->stu);
        float *state = em_malloc((n + 1) * sizeof(float));
        hex = em_malloc(n * 8 + 1);
        if (!state || !hex) {
            em_free(state), em_free(hex);
            return em_errorf(EM_ERR_NOMEM, "stream: no memory for the checkpoint's student state");
        }
        int64_t sc[2];
        em_student_get_state(R->stu, state, sc);
        hex_floats(state, n, hex);
        em_free(state);
        snprintf(steps, sizeof steps, "%" PRId64 ",%" PRId64, sc[0], sc[1]);
        meta[nm++] = (em_st_meta){"student.mode", em_distill_name(c->student.mode)};
        meta[nm++] = (em_st_meta){"student.state", hex};
        meta[nm++] = (em_st_meta){"student.steps", steps};
    }
    st = em_dlrm_save(R->m, R->ckpt_path, meta, nm);
    em_free(hex);
    if (st) return st;
    snprintf(R->res->checkpoint, sizeof R->res->checkpoint, "%s", R->ckpt_path);
    return EM_OK;
}

static int meta_u64(em_st *f, const char *key, uint64_t *out) {
    const char *v = em_st_meta_get(f, key);
    if (!v || !*v) return -1;
    char *end;
    errno = 0;
    unsigned long long x = strtoull(v, &end, 10);
    if (*end || errno) return -1;
    *out = x;
    return 0;
}

/* Load out_dir's checkpoint and put the source, the side files and the counters where
 * it left them. */
static em_status resume_from(run *R, em_st *f) {
    const em_stream_cfg *c = R->cfg;
    source *s = &R->src;
    uint64_t idx, pos, byte, base, side_byte, windows, examples, mbytes, batch, win, sid, das_records, ended;
    const char *vs = em_st_meta_get(f, "stream.vertical"), *src = em_st_meta_get(f, "stream.source"),
               *file = em_st_meta_get(f, "stream.file");
    if (meta_u64(f, "stream.files", &idx) || meta_u64(f, "stream.pos", &pos) || meta_u64(f, "stream.byte", &byte) || meta_u64(f, "stream.base", &base) ||
        meta_u64(f, "stream.side_byte", &side_byte) || meta_u64(f, "stream.windows", &windows) ||
        meta_u64(f, "stream.examples", &examples) || meta_u64(f, "stream.metrics_bytes", &mbytes) ||
        meta_u64(f, "stream.batch", &batch) || meta_u64(f, "stream.window", &win) ||
        meta_u64(f, "stream.stream_id", &sid) || meta_u64(f, "stream.das_records", &das_records) ||
        meta_u64(f, "stream.ended", &ended) || !vs || !src || !file)
        return em_errorf(EM_ERR_CORRUPT, "%s: not a stream checkpoint (stream.* metadata missing or bad)", R->ckpt_path);
    if (batch != (uint64_t)c->batch || win != (uint64_t)c->window || atoi(vs) != c->vertical || sid != c->stream_id)
        return em_errorf(EM_ERR_INVALID,
                         "stream: %s was written with batch %" PRIu64 ", window %" PRIu64 ", vertical %s, stream id %" PRIu64
                         "; this run has %d, %" PRId64 ", %d, %u (they decide the batches: resume with the same)",
                         R->ckpt_path, batch, win, vs, sid, c->batch, c->window, c->vertical, c->stream_id);
    if (strcmp(src, c->source) != 0)
        return em_errorf(EM_ERR_INVALID, "stream: %s continues source '%s', not '%s'", R->ckpt_path, src, c->source);
    uint64_t vf = 0; /* absent in checkpoints from before the vertical feature: off */
    if (em_st_meta_get(f, "stream.vertical_feature") && meta_u64(f, "stream.vertical_feature", &vf))
        return em_errorf(EM_ERR_CORRUPT, "%s: stream.vertical_feature is bad", R->ckpt_path);
    if ((vf != 0) != (c->vertical_feature != 0))
        return em_errorf(EM_ERR_INVALID, "stream: %s was trained %s the vertical as a feature, this run %s", R->ckpt_path,
                         vf ? "with" : "without", c->vertical_feature ? "with it" : "without it");
    const char *mode = em_st_meta_get(f, "student.mode");
    if (R->stu || mode) {
        const char *want = R->stu ? em_distill_name(c->student.mode) : "(none)";
        if (!mode || !R->stu || strcmp(mode, want) != 0)
            return em_errorf(EM_ERR_INVALID, "stream: %s was trained with distillation '%s', this run asks for '%s'",
                             R->ckpt_path, mode ? mode : "(none)", want);
        const char *hex = em_st_meta_get(f, "student.state"), *steps = em_st_meta_get(f, "student.steps");
        size_t n = em_student_state_size(R->stu);
        float *state = em_malloc((n + 1) * sizeof(float));
        int64_t sc[2];
        if (!state) return em_errorf(EM_ERR_NOMEM, "stream: no memory for the student state");
        em_status st = EM_OK;
        if (!hex || !steps || unhex_floats(hex, state, n) || sscanf(steps, "%" SCNd64 ",%" SCNd64, &sc[0], &sc[1]) != 2)
            st = em_errorf(EM_ERR_CORRUPT, "%s: student.state/steps missing or bad", R->ckpt_path);
        else
            st = em_student_set_state(R->stu, state, n, sc);
        em_free(state);
        if (st) return st;
    }
    R->windows = (int64_t)windows, R->examples = examples;
    /* side files back to the checkpoint's state */
    if (truncate(R->metrics_path, (off_t)mbytes) != 0 && errno != ENOENT)
        return em_errorf(EM_ERR_IO, "stream: cannot cut %s back to %" PRIu64 " bytes: %s", R->metrics_path, mbytes,
                         strerror(errno));
    if (c->log_predictions) {
        struct stat sb;
        uint64_t want = DAS_HDR_BYTES + das_records * DAS_REC_BYTES;
        if (stat(c->log_predictions, &sb) == 0 && (uint64_t)sb.st_size > want &&
            truncate(c->log_predictions, (off_t)want) != 0)
            return em_errorf(EM_ERR_IO, "stream: cannot cut %s back to %" PRIu64 " records: %s", c->log_predictions,
                             das_records, strerror(errno));
    }
    s->index = (int64_t)idx - 1;
    s->base = base;
    s->ended = ended && s->kind != SRC_DIR;
    if (s->ended || !file[0]) return EM_OK; /* nothing opened yet, or a single file already read to its end */
    if (s->kind == SRC_DIR) {
        const char *slash = strrchr(file, '/');
        snprintf(s->name, sizeof s->name, "%s", slash ? slash + 1 : file);
        s->idle_since = em_now();
    }
    return src_open_file(s, file, pos, byte, side_byte);
}

/* Predict every example of the window with the model as it stands. */
static em_status window_eval(run *R, em_metrics *out) {
    window *w = &R->w;
    const int EB = R->cfg->eval_batch;
    em_status st;
    for (int64_t a = 0; a < w->n; a += EB) {
        int B = (int)(w->n - a < EB ? w->n - a : EB);
        em_batch b;
        window_batch(w, a, B, &b);
        if ((st = em_dlrm_forward(R->m, &b, w->logit + a, R->pool))) return st;
    }
    for (int64_t i = 0; i < w->n; i++) w->prob[i] = sigmoidf_(w->logit[i]);
    return em_metrics_compute(w->prob, w->label, (size_t)w->n, out);
}

/* Student: bring the teacher's log up to date and join the window with it. */
static em_status window_join(run *R, em_stream_window *rep) {
    const em_stream_cfg *c = R->cfg;
    window *w = &R->w;
    em_status st;
    double t0 = em_now();
    for (int64_t i = 0; i < w->n; i++) w->xid[i] = em_das_example_id(c->stream_id, w->gpos[i]);
    while (!file_exists(c->teacher_log)) { /* the teacher may not have started yet */
        if (em_now() - t0 >= c->teacher_wait_s)
            return em_errorf(EM_ERR_IO, "stream: teacher log '%s' does not exist%s", c->teacher_log,
                             c->teacher_wait_s > 0 ? " (waited for it)" : "");
        sleep_s(0.05);
    }
    /* Read the log in order, a chunk at a time, until the window's last example has its
     * prediction (the teacher logs in stream order, so the window's others precede it)
     * or the log has nothing more (then wait, if asked to). A student therefore sees
     * what was logged up to its window, as it would reading a live log; a duplicate
     * appended much later is not seen (an even chunk never splits adjacent records). */
    const uint64_t chunk = 2 * (uint64_t)c->window + 65536;
    while (!em_das_lookup(R->ix, w->xid[w->n - 1], NULL)) {
        uint64_t added = 0;
        if ((st = em_das_index_follow_upto(R->ix, c->teacher_log, &R->follow_off, chunk, c->vertical, 0, &added)))
            return st;
        if (added) continue;
        if (c->teacher_wait_s <= 0 || em_now() - t0 >= c->teacher_wait_s) break;
        sleep_s(0.05);
    }
    em_das_join_stats js = {0};
    if ((st = em_das_join(R->ix, w->xid, NULL, (size_t)w->n, -1, w->tlogit, w->tmask, NULL, NULL, &js, R->pool)))
        return st;
    rep->teacher_present = js.present, rep->teacher_missing = js.missing;
    /* the teacher's own quality on the window's present predictions (prob and logit
     * serve as scratch: the window's own predictions are reported and logged already) */
    size_t n = 0;
    for (int64_t i = 0; i < w->n; i++)
        if (w->tmask[i] > 0) w->prob[n] = sigmoidf_(w->tlogit[i]), w->logit[n] = w->label[i], n++;
    memset(&rep->teacher, 0, sizeof rep->teacher);
    if (n && (st = em_metrics_compute(w->prob, w->logit, n, &rep->teacher))) return st;
    /* ids before the window are passed for good: keep the index bounded */
    if (w->gpos[0] > 0 && (st = em_das_index_evict(R->ix, em_das_example_id(c->stream_id, 0),
                                                   em_das_example_id(c->stream_id, w->gpos[0]), NULL)))
        return st;
    rep->join_s = em_now() - t0;
    return EM_OK;
}

static em_status window_log(run *R, int64_t widx) {
    window *w = &R->w;
    em_das_rec recs[256];
    for (int64_t a = 0; a < w->n; a += 256) {
        size_t k = 0;
        for (int64_t i = a; i < w->n && i < a + 256; i++, k++)
            recs[k] = (em_das_rec){em_das_example_id(R->cfg->stream_id, w->gpos[i]), w->vert[i], w->logit[i],
                                   (uint32_t)widx};
        em_status st = em_das_append(R->dw, recs, k);
        if (st) return st;
    }
    return EM_OK;
}

static em_status window_train(run *R, double *loss_out, double *distill_out) {
    window *w = &R->w;
    const int BS = R->cfg->batch;
    double sum = 0, dsum = 0;
    int64_t steps = 0;
    for (int64_t a = 0; a < w->n; a += BS) {
        int B = (int)(w->n - a < BS ? w->n - a : BS);
        em_batch b;
        window_batch(w, a, B, &b);
        em_status st;
        double loss = 0;
        if (R->stu) {
            em_student_losses sl;
            st = em_student_train_step(R->stu, &b, w->tlogit + a, w->tmask + a, &sl, R->pool);
            loss = sl.loss_label, dsum += sl.loss_distill;
        } else {
            st = em_dlrm_train_step(R->m, &b, &loss, R->pool);
        }
        if (st) return st;
        sum += loss, steps++;
    }
    *loss_out = steps ? sum / (double)steps : NAN;
    *distill_out = steps ? dsum / (double)steps : NAN;
    return EM_OK;
}

static void num_json(char *buf, size_t cap, double x) {
    if (isfinite(x)) snprintf(buf, cap, "%.6f", x);
    else snprintf(buf, cap, "null");
}

static void json_escape(char *out, size_t cap, const char *s) {
    size_t k = 0;
    for (; *s && k + 7 < cap; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') out[k++] = '\\', out[k++] = (char)ch;
        else if (ch < 0x20) k += (size_t)snprintf(out + k, cap - k, "\\u%04x", ch);
        else out[k++] = (char)ch;
    }
    out[k] = 0;
}

static em_status report(run *R, em_stream_window *rep, double distill) {
    char line[4096], mj[512], tj[512], file[1200], tl[40], dl[40];
    em_metrics_json(&rep->eval, mj, sizeof mj);
    json_escape(file, sizeof file, rep->file);
    num_json(tl, sizeof tl, rep->train_loss);
    int k = snprintf(line, sizeof line,
                     "{\"window\":%" PRId64 ",\"examples\":%" PRIu64 ",\"pos_start\":%" PRIu64 ",\"pos_end\":%" PRIu64
                     ",\"file\":\"%s\",\"step\":%" PRId64 ",\"eval\":%s,\"train_loss\":%s,\"read_s\":%.4f,\"eval_s\":%.4f,"
                     "\"train_s\":%.4f,\"log_s\":%.4f",
                     rep->window, rep->examples, rep->pos_start, rep->pos_end, file, rep->step, mj, tl, rep->read_s,
                     rep->eval_s, rep->train_s, rep->log_s);
    if (R->ix) {
        em_metrics_json(&rep->teacher, tj, sizeof tj);
        num_json(dl, sizeof dl, distill);
        k += snprintf(line + k, sizeof line - (size_t)k,
                      ",\"distill\":\"%s\",\"distill_loss\":%s,\"teacher\":{\"present\":%" PRIu64 ",\"missing\":%" PRIu64
                      ",\"join_s\":%.4f,\"eval\":%s}",
                      em_distill_name(R->cfg->student.mode), dl, rep->teacher_present, rep->teacher_missing, rep->join_s, tj);
    }
    snprintf(line + k, sizeof line - (size_t)k, "}");
    rep->json = line;
    if (R->metrics) {
        if (fprintf(R->metrics, "%s\n", line) < 0 || fflush(R->metrics) != 0)
            return em_errorf(EM_ERR_IO, "stream: write %s: %s", R->metrics_path, strerror(errno));
    }
    if (R->cfg->on_window) R->cfg->on_window(R->cfg->ud, rep);
    rep->json = NULL;
    return EM_OK;
}

static em_status validate(const em_stream_cfg *c) {
    if (!c->source || !*c->source) return em_errorf(EM_ERR_INVALID, "stream: no source (a file, a directory or '-')");
    if (!c->out_dir || !*c->out_dir) return em_errorf(EM_ERR_INVALID, "stream: no output directory");
    if (c->batch < 1 || c->eval_batch < 1 || c->window < 1 || c->ckpt_every < 0 || c->max_windows < 0)
        return em_errorf(EM_ERR_INVALID, "stream: need batch >= 1, eval_batch >= 1, window >= 1, ckpt_every >= 0, max_windows >= 0");
    if (c->window > ((int64_t)1 << 34))
        return em_errorf(EM_ERR_INVALID, "stream: a window of %lld examples is too large", (long long)c->window);
    if (c->stream_id > 0xffffu) return em_errorf(EM_ERR_INVALID, "stream: stream id %u is not 16-bit", c->stream_id);
    if (c->teacher_log && c->log_predictions && strcmp(c->teacher_log, c->log_predictions) == 0)
        return em_errorf(EM_ERR_INVALID, "stream: the teacher log to read and the prediction log to write are the same file");
    if (!c->teacher_log && c->student.mode != EM_DISTILL_NONE)
        return em_errorf(EM_ERR_INVALID, "stream: distillation '%s' needs a teacher log", em_distill_name(c->student.mode));
    if (c->teacher_log) return em_student_cfg_validate(&c->student);
    return EM_OK;
}

static em_status mkdir_p(const char *dir) {
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", dir);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) return em_errorf(EM_ERR_IO, "%s: %s", buf, strerror(errno));
        *p = '/';
    }
    if (mkdir(buf, 0755) != 0 && errno != EEXIST) return em_errorf(EM_ERR_IO, "%s: %s", buf, strerror(errno));
    return EM_OK;
}

em_status em_stream_run(const em_stream_cfg *cfg, em_pool *pool, em_stream_result *res, em_dlrm **model_out) {
    memset(res, 0, sizeof *res);
    if (model_out) *model_out = NULL;
    em_status st = validate(cfg);
    if (st) return st;
    run R;
    memset(&R, 0, sizeof R);
    R.cfg = cfg, R.pool = pool, R.res = res;
    R.src.cfg = cfg, R.src.index = -1, R.src.idle_since = em_now();
    struct stat sb;
    if (strcmp(cfg->source, "-") == 0) R.src.kind = SRC_STDIN;
    else if (stat(cfg->source, &sb) != 0) return em_errorf(EM_ERR_IO, "stream: source '%s': %s", cfg->source, strerror(errno));
    else R.src.kind = S_ISDIR(sb.st_mode) ? SRC_DIR : SRC_FILE;
    if ((st = mkdir_p(cfg->out_dir))) return st;
    if (snprintf(R.ckpt_path, sizeof R.ckpt_path, "%s/checkpoint.safetensors", cfg->out_dir) >= (int)sizeof R.ckpt_path ||
        snprintf(R.metrics_path, sizeof R.metrics_path, "%s/windows.jsonl", cfg->out_dir) >= (int)sizeof R.metrics_path)
        return em_errorf(EM_ERR_INVALID, "stream: output directory path too long: %s", cfg->out_dir);
    em_st *f = NULL;
    int resuming = cfg->resume && file_exists(R.ckpt_path);
    if (resuming) st = em_dlrm_load(&R.m, R.ckpt_path, &f, pool);
    else st = em_dlrm_create(&R.m, &cfg->model, pool);
    if (st) goto done;
    const em_dlrm_cfg *mc = em_dlrm_config(R.m);
    R.src.mc = mc;
    if (mc->seq.num_seq) {
        st = em_errorf(EM_ERR_UNSUPPORTED, "stream: sequence models are not streamed yet (the window store holds no history)");
        goto done;
    }
    if (cfg->vertical_feature && mc->num_tables < 2) {
        st = em_errorf(EM_ERR_INVALID, "stream: the vertical as a feature needs a model with a table for it and one for the data");
        goto done;
    }
    if (cfg->teacher_log && (st = em_student_create(&R.stu, &cfg->student, R.m))) goto done;
    if (resuming) {
        res->resumed = 1;
        if ((st = resume_from(&R, f))) goto done;
        em_st_close(f);
        f = NULL;
    }
    R.metrics = fopen(R.metrics_path, resuming ? "a" : "w");
    if (!R.metrics || fseek(R.metrics, 0, SEEK_END) != 0) {
        st = em_errorf(EM_ERR_IO, "stream: %s: %s", R.metrics_path, strerror(errno));
        goto done;
    }
    if (cfg->log_predictions && !resuming && stat(cfg->log_predictions, &sb) == 0 && sb.st_size > DAS_HDR_BYTES) {
        /* a fresh run would append to an old log; with resume and no checkpoint yet,
         * the records are a killed first window's, which nothing refers to */
        if (!cfg->resume) {
            st = em_errorf(EM_ERR_INVALID, "stream: prediction log '%s' already holds records: remove it, or resume the run that wrote it",
                           cfg->log_predictions);
            goto done;
        }
        if (truncate(cfg->log_predictions, DAS_HDR_BYTES) != 0) {
            st = em_errorf(EM_ERR_IO, "stream: cannot empty %s: %s", cfg->log_predictions, strerror(errno));
            goto done;
        }
    }
    if (cfg->log_predictions && (st = em_das_writer_open(&R.dw, cfg->log_predictions))) goto done;
    if (cfg->teacher_log && (st = em_das_index_create(&R.ix, (size_t)cfg->window * 2))) goto done;
    if (R.src.kind != SRC_DIR && !R.src.r && !R.src.ended && R.src.index < 0) {
        R.src.index = 0;
        /* a file (not stdin) starts at start_pos at once; the byte offset is unknown, so
         * the reader counts lines up to it */
        uint64_t at = R.src.kind == SRC_FILE ? cfg->start_pos : 0;
        if ((st = src_open_file(&R.src, cfg->source, at, 0, 0))) goto done;
    }
    const int bcap = cfg->batch > cfg->eval_batch ? cfg->batch : cfg->eval_batch;
    if ((st = window_alloc(&R.w, cfg->window, mc->num_dense, mc->num_tables,
                           cfg->vertical_feature ? mc->rows[mc->num_tables - 1] : 0, bcap)))
        goto done;
    for (;;) {
        if (cfg->max_windows && R.windows >= cfg->max_windows) break;
        em_stream_window rep;
        memset(&rep, 0, sizeof rep);
        /* read the window */
        double t0 = em_now();
        R.w.n = 0;
        while (R.w.n < cfg->window) {
            const em_batch *b;
            int i;
            uint64_t gpos;
            uint32_t v;
            st = src_next(&R.src, &b, &i, &gpos, &v);
            if (st == EM_ERR_EOF) break;
            if (st) goto done;
            if (gpos < cfg->start_pos) {
                res->skipped_start++;
                continue;
            }
            if (cfg->vertical >= 0 && v != (uint32_t)cfg->vertical) {
                res->skipped_vertical++;
                continue;
            }
            if ((st = window_push(&R.w, b, i, gpos, v))) goto done;
        }
        st = EM_OK;
        rep.read_s = em_now() - t0;
        res->read_s += rep.read_s;
        if (R.w.n == 0) break; /* the stream ended */
        rep.window = R.windows;
        rep.examples = (uint64_t)R.w.n;
        rep.pos_start = R.w.gpos[0], rep.pos_end = R.w.gpos[R.w.n - 1] + 1;
        rep.file = R.src.path;
        /* evaluate before training (and, as a teacher, log those predictions) */
        t0 = em_now();
        if ((st = window_eval(&R, &rep.eval))) goto done;
        if (R.dw) {
            double tl = em_now();
            if ((st = window_log(&R, R.windows))) goto done;
            rep.log_s = em_now() - tl;
            res->log_s += rep.log_s;
        }
        rep.eval_s = em_now() - t0;
        res->eval_s += rep.eval_s;
        if (R.ix) {
            if ((st = window_join(&R, &rep))) goto done;
            res->join_s += rep.join_s;
        }
        t0 = em_now();
        double distill = NAN;
        if ((st = window_train(&R, &rep.train_loss, &distill))) goto done;
        rep.train_s = em_now() - t0;
        res->train_s += rep.train_s;
        rep.step = em_dlrm_step_count(R.m);
        R.windows++, R.examples += (uint64_t)R.w.n;
        res->windows_run++, res->examples += (uint64_t)R.w.n;
        res->pos = rep.pos_end;
        if ((st = report(&R, &rep, distill))) goto done;
        if (cfg->ckpt_every && R.windows % cfg->ckpt_every == 0 && (st = checkpoint(&R))) goto done;
    }
    if ((st = checkpoint(&R))) goto done;
done:
    res->windows = R.windows;
    res->files = R.src.files;
    src_close_file(&R.src);
    res->malformed = R.src.malformed;
    snprintf(res->first_error, sizeof res->first_error, "%s", R.src.first_error);
    if (f) em_st_close(f);
    window_free(&R.w);
    if (R.metrics) fclose(R.metrics);
    if (R.dw) {
        em_status cs = em_das_writer_close(R.dw);
        if (st == EM_OK) st = cs;
    }
    em_das_index_free(R.ix);
    em_student_free(R.stu);
    if (st == EM_OK && model_out) *model_out = R.m;
    else em_dlrm_free(R.m);
    return st;
}
