/* Sequence features: the TSV sequence columns (parser, errors naming line, field and
 * event), the reader's jagged batches (cap, prefetch, resume, malformed counting), the
 * binary format version 2 (round trip, blocks, skip, corruption), `gen` with a history
 * (determinism, planted signal, unchanged output without it), the OTTO converter on
 * the real samples in tests/data/otto, and allocation failures on every constructor.
 * Scratch files go to a mkdtemp directory. */
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data/data_internal.h"
#include "test.h"

#define ND 2
#define NS 3
#define NQ 2 /* sequence columns */

static char g_dir[256];

static void cleanup(void) {
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
}

static const char *tmp(const char *name) {
    static char buf[64][512]; /* a ring: a returned path stays valid for 63 more calls */
    static int k;
    if (!g_dir[0]) {
        strcpy(g_dir, "/tmp/ember_seq_XXXXXX");
        if (!mkdtemp(g_dir)) abort();
        atexit(cleanup);
    }
    char *b = buf[k++ & 63];
    snprintf(b, 512, "%s/%s", g_dir, name);
    return b;
}

static const int64_t ROWS[NS] = {7, 1000, 1ll << 40};
static const int64_t SEQ_ROWS[NQ] = {1000003, 17};

/* ------------------------------------------------------------ synthetic lines */

/* Events of line i, feature f: lengths 0, 1, short, and a long 300 now and then. */
static int ev_len(int i, int f) {
    if (i % 7 == 0) return f == 0 ? 0 : 1;
    if (i % 7 == 1) return f == 0 ? 1 : 0;
    if (i % 11 == 5) return 300 + f;
    return (i * 3 + f) % 9;
}
static uint64_t ev_item(int i, int f, int e) {
    return (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull + (uint64_t)e * 7919u + (uint64_t)f * 13u;
}
static int64_t ev_age(int i, int f, int e) { return (int64_t)((ev_len(i, f) - 1 - e) / 2) * 10 + (i % 3); }
static int ev_type(int i, int f, int e) { return e % 50 == 3 ? 255 : (i + e + f) % 4; }

static void put_events(FILE *f, int i, int q) {
    for (int e = 0; e < ev_len(i, q); e++)
        fprintf(f, "%s%llX:%lld:%d", e ? "," : "", (unsigned long long)ev_item(i, q, e),
                (long long)ev_age(i, q, e), ev_type(i, q, e));
}

/* Line i: label, dense, categoricals (some missing), NQ sequence columns. */
static void seq_line(FILE *f, int i) {
    fprintf(f, "%d\t%d\t%s", i % 3 == 0, i % 10, i % 4 ? "12" : "");
    for (int k = 0; k < NS; k++) {
        if ((i + k) % 5 == 0) fprintf(f, "\t");
        else fprintf(f, "\t%llx", (unsigned long long)((uint64_t)i * 2654435761u + (uint64_t)k));
    }
    for (int q = 0; q < NQ; q++) {
        fputc('\t', f);
        put_events(f, i, q);
    }
}

/* n lines; those in bad[] (ended by -1) have a broken event in S2. */
static const char *write_seq_tsv(const char *name, int n, const int *bad) {
    const char *path = tmp(name);
    FILE *f = fopen(path, "w");
    for (int i = 0; i < n; i++) {
        int isbad = 0;
        for (const int *b = bad; b && *b >= 0; b++) isbad |= *b == i;
        if (isbad) {
            fprintf(f, "1\t1\t2\ta\tb\tc\t1:5:0\t1:2:3,zz:1:0");
        } else seq_line(f, i);
        fputs(i % 5 == 2 ? "\r\n" : "\n", f);
    }
    fclose(f);
    return path;
}

/* ------------------------------------------------------------ dumps of a stream */

typedef struct {
    unsigned char *p;
    size_t n, cap;
} bytes;

static void put_bytes(bytes *b, const void *src, size_t k) {
    if (b->n + k > b->cap) {
        b->cap = (b->n + k) * 2 + 1024;
        b->p = realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, src, k);
    b->n += k;
}

/* Every example of a stream serialized (label, dense, bags, sequences), with the byte
 * offset where each example starts, so suffixes can be compared after a resume. */
typedef struct {
    bytes ex;
    size_t *start; /* [n + 1] */
    size_t n, scap;
    int nb;
    uint64_t first[4096], end[4096];
    int B[4096];
    em_status last;
    em_reader_stats st;
} dump;

static void dump_free(dump *d) {
    free(d->ex.p), free(d->start);
    memset(d, 0, sizeof *d);
}

/* Empty, with non-NULL buffers (memcmp of 0 bytes still wants valid pointers). */
static void dump_reset(dump *d) {
    dump_free(d);
    d->ex.p = malloc(64), d->ex.cap = 64;
    d->start = calloc(64, sizeof(size_t)), d->scap = 64;
}

static void dump_batch(dump *d, const em_batch *b, int nseq) {
    CHECK(b->num_seq == nseq && (nseq ? b->seq != NULL : b->seq == NULL));
    for (int f = 0; f < nseq; f++) {
        CHECK(b->seq[f].offsets[0] == 0); /* ember/jagged.h's layout */
        for (int i = 0; i < b->B; i++) CHECK(b->seq[f].offsets[i] <= b->seq[f].offsets[i + 1]);
        for (int64_t k = 0; k < b->seq[f].offsets[b->B]; k++) {
            CHECK(b->seq[f].age[k] >= 0 && b->seq[f].type[k] >= 0 && b->seq[f].type[k] <= 255);
            CHECK(b->seq[f].items[k] >= 0);
        }
    }
    for (int i = 0; i < b->B; i++) {
        if (d->n + 2 > d->scap) d->scap = 2 * d->scap + 64, d->start = realloc(d->start, d->scap * sizeof(size_t));
        d->start[d->n++] = d->ex.n;
        put_bytes(&d->ex, &b->label[i], 4);
        put_bytes(&d->ex, b->dense + (size_t)i * b->num_dense, 4 * (size_t)b->num_dense);
        for (int t = 0; t < b->num_sparse; t++) {
            int64_t lo = b->offsets[t * b->B + i], hi = b->offsets[t * b->B + i + 1];
            int64_t n = hi - lo;
            put_bytes(&d->ex, &n, 8);
            put_bytes(&d->ex, b->indices + lo, 8 * (size_t)n);
        }
        for (int f = 0; f < nseq; f++) {
            const em_batch_seq *q = &b->seq[f];
            int64_t lo = q->offsets[i], n = q->offsets[i + 1] - lo;
            put_bytes(&d->ex, &n, 8);
            put_bytes(&d->ex, q->items + lo, 8 * (size_t)n);
            put_bytes(&d->ex, q->age + lo, 8 * (size_t)n);
            put_bytes(&d->ex, q->type + lo, 4 * (size_t)n);
        }
    }
    d->start[d->n] = d->ex.n;
}

static em_reader_cfg seq_cfg(const char *path, int B, int prefetch, int cap) {
    return (em_reader_cfg){.path = path, .batch_size = B, .num_dense = ND, .num_sparse = NS,
                           .table_rows = ROWS, .prefetch = prefetch, .num_seq = NQ,
                           .seq_rows = SEQ_ROWS, .seq_max_len = cap};
}

static void read_all(const em_reader_cfg *c, dump *d) {
    dump_reset(d);
    em_reader *r;
    d->last = em_reader_open(&r, c);
    if (d->last != EM_OK) return;
    const em_batch *b;
    while ((d->last = em_reader_next(r, &b)) == EM_OK) {
        if (d->nb < 4096) d->first[d->nb] = b->first_pos, d->end[d->nb] = b->end_pos, d->B[d->nb] = b->B;
        d->nb++;
        dump_batch(d, b, c->num_seq);
    }
    em_reader_stats_get(r, &d->st);
    CHECK(em_reader_next(r, &b) == d->last);
    em_reader_free(r);
}

static int same_dump(const dump *a, const dump *b) {
    return a->n == b->n && a->ex.n == b->ex.n && !memcmp(a->ex.p, b->ex.p, a->ex.n) && a->nb == b->nb &&
           !memcmp(a->end, b->end, sizeof(uint64_t) * (size_t)(a->nb < 4096 ? a->nb : 4096));
}

static dump g_a, g_b, g_c;

/* ------------------------------------------------------------ the parser */

static void expect_bad(const char *line, int nd, int ns, int nq, int want_field, const char *msg) {
    float label, dense[64];
    uint64_t ids[64], miss;
    uint64_t it[2][8];
    int64_t ag[2][8];
    int32_t ty[2][8];
    em_seq_events sq[2] = {{it[0], ag[0], ty[0], 8, 0, 0}, {it[1], ag[1], ty[1], 2, 0, 0}};
    int bad = 99;
    em_status s = em_seq_parse_line(line, strlen(line), nd, ns, nq, &label, dense, ids, &miss, sq, &bad);
    CHECK(s == EM_ERR_PARSE);
    CHECK(bad == want_field);
    if (!strstr(em_last_error(), msg) || bad != want_field) {
        CHECK(!"message");
        fprintf(stderr, "    line '%s': got field %d '%s', want %d '%s'\n", line, bad, em_last_error(), want_field, msg);
    }
}

static void test_parse(void) {
    float label, dense[ND];
    uint64_t ids[NS], miss;
    uint64_t it[2][400];
    int64_t ag[2][400];
    int32_t ty[2][400];
    em_seq_events sq[2] = {{it[0], ag[0], ty[0], 400, -1, -1}, {it[1], ag[1], ty[1], 400, -1, -1}};
    int bad;
    /* empty and one-event columns, CRLF, uppercase hex, type 255, age 0 */
    const char *l = "1\t3\t\tab\t\tff\t\tDEADbeef:0:255\r\n";
    CHECK_OK(em_seq_parse_line(l, strlen(l), ND, NS, NQ, &label, dense, ids, &miss, sq, &bad));
    CHECK(label == 1.f && miss == 2 && ids[0] == 0xab && ids[2] == 0xff);
    CHECK(sq[0].len == 0 && sq[0].total == 0);
    CHECK(sq[1].len == 1 && sq[1].total == 1 && it[1][0] == 0xdeadbeef && ag[1][0] == 0 && ty[1][0] == 255);
    l = "1\t3\t\tab\t\tff\t0:0:000,a:0:007\t\n";
    CHECK_OK(em_seq_parse_line(l, strlen(l), ND, NS, NQ, &label, dense, ids, &miss, sq, &bad));
    CHECK(sq[0].len == 2 && ty[0][0] == 0 && ty[0][1] == 7 && it[0][1] == 10 && sq[1].len == 0);
    /* a long column, ties in age, kept whole, then capped to the most recent 7 */
    char line[20000];
    for (int i = 0; i < 40; i++) {
        FILE *m = fmemopen(line, sizeof line, "w");
        seq_line(m, i);
        fputc('\n', m);
        fputc(0, m);
        fclose(m);
        for (int cap = 400; cap >= 0; cap = cap == 400 ? 7 : cap == 7 ? 0 : -1) {
            sq[0].cap = sq[1].cap = cap;
            CHECK_OK(em_seq_parse_line(line, strlen(line), ND, NS, NQ, &label, dense, ids, &miss, sq, &bad));
            for (int q = 0; q < NQ; q++) {
                int L = ev_len(i, q), keep = L < cap ? L : cap, ok = sq[q].total == L && sq[q].len == keep;
                for (int e = 0; e < keep && ok; e++) {
                    int src = L - keep + e;
                    ok = it[q][e] == ev_item(i, q, src) && ag[q][e] == ev_age(i, q, src) && ty[q][e] == ev_type(i, q, src);
                }
                CHECK(ok);
            }
        }
    }
    sq[0].cap = sq[1].cap = 400;
    /* num_seq = 0 is the Criteo parser; the Criteo part keeps its field numbers */
    l = "0\t1\t2\ta\tb\tc";
    CHECK_OK(em_seq_parse_line(l, strlen(l), ND, NS, 0, &label, dense, ids, &miss, NULL, &bad));
    CHECK(em_seq_parse_line(l, strlen(l), ND, NS, 17, &label, dense, ids, &miss, sq, &bad) == EM_ERR_INVALID);
    expect_bad("0\t1\t2\ta\tzz\tc\t\t", ND, NS, NQ, 4, "field 4 (C2): invalid hex 'zz'");
    expect_bad("0\tx\t2\ta\tb\tc\t\t", ND, NS, NQ, 1, "field 1 (I1): invalid integer 'x'");
    expect_bad("0\t1\t2\ta\tb\tc\r\t\t", ND, NS, NQ, 5, "field 5 (C3): invalid hex");
    /* field counts take precedence */
    expect_bad("0\t1\t2\ta\tb\tc\t", ND, NS, NQ, -1, "wrong field count: 7 fields, expected 8");
    expect_bad("0\t1\t2\ta\tb\tc", ND, NS, NQ, -1, "wrong field count: 6 fields, expected 8");
    expect_bad("0\t1\t2\ta\tb\tc\t\t\t", ND, NS, NQ, -1, "wrong field count: 9 fields, expected 8");
    expect_bad("0\t1\t2\ta\tzz\tc\t\t\t", ND, NS, NQ, -1, "wrong field count: 9 fields, expected 8");
    expect_bad("0\t1\t2\ta\tb\tc\tzz:1:1\t\t", ND, NS, NQ, -1, "wrong field count");
    /* events */
    const struct {
        const char *s1, *s2;
        int field;
        const char *msg;
    } cases[] = {
        {"1:2:3,zz:1:0", "", 6, "field 6 (S1): event 2: invalid item hex 'zz:1:0'"},
        {"", "1:2:3,,5:1:0", 7, "field 7 (S2): event 2: empty event ''"},
        {"1:2:3,", "", 6, "field 6 (S1): event 2: empty event ''"},
        {",1:2:3", "", 6, "field 6 (S1): event 1: empty event ''"},
        {":2:3", "", 6, "event 1: empty item ':2:3'"},
        {"ab:5", "", 6, "field 6 (S1): event 1: expected item:age:type 'ab:5'"},
        {"ab", "", 6, "expected item:age:type 'ab'"},
        {"ab:5:1:2", "", 6, "event 1: type must be an integer 0..255 'ab:5:1:2'"},
        {"ab:-5:1", "", 6, "event 1: age must be a non-negative integer 'ab:-5:1'"},
        {"ab:1.5:1", "", 6, "age must be a non-negative integer"},
        {"ab::1", "", 6, "age must be a non-negative integer"},
        {"ab:1234567890123456789:1", "", 6, "age out of range"},
        {"ab:5:", "", 6, "type must be an integer 0..255 'ab:5:'"},
        {"ab:5:256", "", 6, "type must be an integer 0..255 'ab:5:256'"},
        {"ab:5:1x", "", 6, "type must be an integer"},
        {"ab:5:0255", "", 6, "type must be an integer 0..255 'ab:5:0255'"},
        {"1:5:0,2:6:0", "", 6, "field 6 (S1): event 2: events out of time order (age grows) '2:6:0'"},
        {"12345678901234567:5:0", "", 6, "item longer than 16 hex digits"},
        {"1:5:0 ", "", 6, "type must be an integer"},
        {"1:5:0\r", "", 6, "type must be an integer"},
        /* beyond the cap (S2 keeps 2): still validated */
        {"", "1:9:0,g:8:0,3:7:0,4:6:0", 7, "field 7 (S2): event 2: invalid item hex 'g:8:0'"},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        char buf[256];
        snprintf(buf, sizeof buf, "1\t1\t2\ta\tb\tc\t%s\t%s\n", cases[k].s1, cases[k].s2);
        expect_bad(buf, ND, NS, NQ, cases[k].field, cases[k].msg);
    }
    /* the quote of a very long bad event is cut at 40 bytes */
    char longev[200];
    memset(longev, 'a', 150);
    strcpy(longev + 150, ":1:1x");
    char buf[400];
    snprintf(buf, sizeof buf, "1\t1\t2\ta\tb\tc\t1:2:0,%s\t", longev);
    expect_bad(buf, ND, NS, NQ, 6, "event 2: item longer than 16 hex digits 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa...'");
    /* Criteo shape with one history column */
    char cl[2048];
    int n = sprintf(cl, "1");
    for (int j = 0; j < 13; j++) n += sprintf(cl + n, "\t%d", j);
    for (int k = 0; k < 26; k++) n += sprintf(cl + n, "\t%x", k + 1);
    sprintf(cl + n, "\t5:100:0,6:50:1\n");
    float d13[13];
    uint64_t i26[26];
    CHECK_OK(em_seq_parse_line(cl, strlen(cl), 13, 26, 1, &label, d13, i26, &miss, sq, &bad));
    CHECK(sq[0].len == 2 && it[0][1] == 6 && ag[0][1] == 50 && ty[0][1] == 1 && i26[25] == 26);
    cl[strlen(cl) - 2] = 'q';
    expect_bad(cl, 13, 26, 1, 40, "field 40 (S1): event 2: type must be an integer 0..255 '6:50:q'");
}

/* ------------------------------------------------------------ the reader */

/* The reader's examples against the generating functions (good lines only). */
static void check_against_source(const dump *d, const int *bad, int n, int cap) {
    size_t e = 0, off = 0;
    int ok = 1;
    for (int i = 0; i < n && ok; i++) {
        int isbad = 0;
        for (const int *b = bad; b && *b >= 0; b++) isbad |= *b == i;
        if (isbad) continue;
        if (e >= d->n) {
            ok = 0;
            break;
        }
        off = d->start[e];
        float label;
        memcpy(&label, d->ex.p + off, 4);
        ok &= label == (float)(i % 3 == 0);
        off += 4 + 4 * ND;
        for (int t = 0; t < NS; t++) {
            int64_t m;
            memcpy(&m, d->ex.p + off, 8);
            off += 8 + 8 * (size_t)m;
        }
        for (int q = 0; q < NQ; q++) {
            int64_t L = ev_len(i, q), keep = L < cap ? L : cap, m;
            memcpy(&m, d->ex.p + off, 8);
            off += 8;
            ok &= m == keep;
            for (int64_t k = 0; k < m && ok; k++) {
                int src = (int)(L - keep + k);
                int64_t item, age;
                int32_t type;
                memcpy(&item, d->ex.p + off + 8 * k, 8);
                memcpy(&age, d->ex.p + off + 8 * m + 8 * k, 8);
                memcpy(&type, d->ex.p + off + 16 * m + 4 * k, 4);
                ok &= item == (int64_t)(ev_item(i, q, src) % (uint64_t)SEQ_ROWS[q]) && age == ev_age(i, q, src) &&
                      type == ev_type(i, q, src);
            }
            off += 20 * (size_t)m;
        }
        e++;
    }
    CHECK(ok && e == d->n);
}

static void test_reader_tsv(void) {
    int bad[] = {4, 9, 10, 98, -1};
    const char *path = write_seq_tsv("r.tsv", 100, bad);
    for (int cap = 1; cap <= 400; cap = cap == 1 ? 5 : cap == 5 ? 400 : 401) {
        em_reader_cfg c = seq_cfg(path, 6, 0, cap);
        read_all(&c, &g_a);
        CHECK(g_a.last == EM_ERR_EOF && g_a.n == 96);
        check_against_source(&g_a, bad, 100, cap);
        CHECK(g_a.st.lines == 100 && g_a.st.examples == 96 && g_a.st.malformed == 4);
        char want[700];
        snprintf(want, sizeof want, "%s:5: field 7 (S2): event 2: invalid item hex 'zz:1:0'", path);
        CHECK(strcmp(g_a.st.first_error, want) == 0);
        uint64_t total = 0, kept = 0;
        for (int i = 0; i < 100; i++) {
            int isbad = i == 4 || i == 9 || i == 10 || i == 98;
            for (int q = 0; q < NQ && !isbad; q++) total += (uint64_t)ev_len(i, q), kept += (uint64_t)(ev_len(i, q) < cap ? ev_len(i, q) : cap);
        }
        CHECK(g_a.st.seq_events == kept && g_a.st.seq_dropped == total - kept);
        /* prefetch gives the same batches and statistics */
        for (int pf = 1; pf <= 3; pf += 2) {
            c.prefetch = pf;
            read_all(&c, &g_b);
            CHECK(same_dump(&g_a, &g_b));
            CHECK(g_b.st.malformed == 4 && !strcmp(g_b.st.first_error, g_a.st.first_error) &&
                  g_b.st.seq_events == g_a.st.seq_events && g_b.st.seq_dropped == g_a.st.seq_dropped);
        }
    }
    /* strict: the first bad line stops the stream with that message */
    em_reader_cfg c = seq_cfg(path, 6, 2, 8);
    c.strict = 1;
    em_reader *r;
    CHECK_OK(em_reader_open(&r, &c));
    const em_batch *b;
    CHECK(em_reader_next(r, &b) == EM_ERR_PARSE && strstr(em_last_error(), ":5: field 7 (S2): event 2"));
    em_reader_free(r);
    /* config errors */
    c = seq_cfg(path, 6, 0, 0);
    CHECK(em_reader_open(&r, &c) == EM_ERR_INVALID && r == NULL);
    c = seq_cfg(path, 6, 0, 4);
    c.seq_rows = NULL;
    CHECK(em_reader_open(&r, &c) == EM_ERR_INVALID);
    c = seq_cfg(path, 6, 0, 4);
    c.num_seq = EM_SEQ_MAX_FEATURES + 1;
    CHECK(em_reader_open(&r, &c) == EM_ERR_INVALID);
    int64_t zero[NQ] = {5, 0};
    c = seq_cfg(path, 6, 0, 4);
    c.seq_rows = zero;
    CHECK(em_reader_open(&r, &c) == EM_ERR_INVALID && strstr(em_last_error(), "seq_rows[1]"));
    c = seq_cfg(path, 1 << 20, 0, EM_SEQ_MAX_LEN);
    CHECK(em_reader_open(&r, &c) == EM_ERR_INVALID);
    /* the plain reader on this file: every line has the wrong field count */
    c = seq_cfg(path, 6, 0, 4);
    c.num_seq = 0;
    read_all(&c, &g_b);
    CHECK(g_b.n == 0 && g_b.st.malformed == 100 && strstr(g_b.st.first_error, "8 fields, expected 6"));
}

/* Resuming at end_pos of batch k gives exactly the rest of the stream. */
static void check_resume(const char *path, int B, int cap) {
    em_reader_cfg c = seq_cfg(path, B, 0, cap);
    read_all(&c, &g_c);
    CHECK(g_c.last == EM_ERR_EOF && g_c.nb <= 4096);
    size_t done = 0;
    for (int k = 0; k < g_c.nb && k < 4096; k++) {
        done += (size_t)g_c.B[k];
        if (k % 5 != 1 && k != g_c.nb - 1) continue;
        c.skip = g_c.end[k];
        c.prefetch = k % 2;
        read_all(&c, &g_b);
        CHECK(g_b.last == EM_ERR_EOF && g_b.n == g_c.n - done);
        CHECK(g_b.ex.n == g_c.ex.n - g_c.start[done] &&
              !memcmp(g_b.ex.p, g_c.ex.p + g_c.start[done], g_b.ex.n));
        if (g_b.nb) CHECK(g_b.first[0] == g_c.end[k]);
        CHECK(g_b.st.lines + g_c.end[k] == g_c.end[g_c.nb - 1]);
    }
    c.skip = 1u << 30;
    read_all(&c, &g_b);
    CHECK(g_b.last == EM_ERR_EOF && g_b.nb == 0);
}

static void test_resume(void) {
    int bad[] = {0, 3, 50, 51, 99, -1};
    const char *path = write_seq_tsv("resume.tsv", 100, bad);
    check_resume(path, 7, 6);
    const char *bin = tmp("resume.bin");
    em_convert_cfg cc = {.num_dense = ND, .num_sparse = NS, .num_seq = NQ};
    em_reader_stats st;
    CHECK_OK(em_convert_tsv(path, bin, &cc, &st));
    CHECK(st.examples == 95 && st.malformed == 5);
    check_resume(bin, 7, 6);
    /* skip + limit on both */
    for (int p = 0; p < 2; p++) {
        em_reader_cfg c = seq_cfg(p ? bin : path, 8, 1, 6);
        c.skip = 10, c.limit = 40;
        read_all(&c, &g_a);
        CHECK(g_a.st.lines == 30 && g_a.first[0] == 10 && g_a.end[g_a.nb - 1] == 40);
    }
}

/* ------------------------------------------------------------ binary version 2 */

static unsigned char *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *p = malloc(*n + 1);
    if (fread(p, 1, *n, f) != *n) *n = 0;
    fclose(f);
    return p;
}

static void spit(const char *path, const unsigned char *p, size_t n) {
    FILE *f = fopen(path, "wb");
    fwrite(p, 1, n, f);
    fclose(f);
}

static uint64_t le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}
static uint32_t le32(const unsigned char *p) { return (uint32_t)le64((const unsigned char[8]){p[0], p[1], p[2], p[3]}); }

static void test_binary_roundtrip(void) {
    /* > 2 blocks of 4096 records, with malformed lines and long histories */
    int bad[] = {1, 4097, 8190, -1};
    const int n = 9000;
    const char *tsv = write_seq_tsv("big.tsv", n, bad), *bin = tmp("big.bin");
    em_convert_cfg cc = {.num_dense = ND, .num_sparse = NS, .num_seq = NQ};
    em_reader_stats st;
    CHECK_OK(em_convert_tsv(tsv, bin, &cc, &st));
    CHECK(st.lines == (uint64_t)n && st.examples == (uint64_t)n - 3 && st.malformed == 3 && st.seq_dropped == 0);
    char want[700];
    snprintf(want, sizeof want, "%s:2: field 7 (S2): event 2", tsv);
    CHECK(strncmp(st.first_error, want, strlen(want)) == 0);
    /* the header */
    size_t size;
    unsigned char *hb = slurp(bin, &size);
    CHECK(hb && !memcmp(hb, "EMBRDAT1", 8) && le32(hb + 8) == 2 && le32(hb + 40) == NQ);
    CHECK(le64(hb + 32) == (uint64_t)n - 3 && le64(hb + 48) == size - 64 && le32(hb + 56) == 4096);
    CHECK(le32(hb + 44) == 301); /* the longest history */
    CHECK(le32(hb + 28) == 12 + 4 * ND + 8 * NS && !memcmp(hb + 64, "EMBK", 4) && le32(hb + 68) == 4096);
    free(hb);
    FILE *f;
    /* TSV and binary read the same, with and without prefetch, capped or not */
    for (int cap = 3; cap <= 400; cap += 397) {
        em_reader_cfg c = seq_cfg(tsv, 64, 0, cap);
        read_all(&c, &g_a);
        check_against_source(&g_a, bad, n, cap);
        for (int pf = 0; pf <= 2; pf += 2) {
            c = seq_cfg(bin, 64, pf, cap);
            read_all(&c, &g_b);
            CHECK(g_b.last == EM_ERR_EOF && g_b.n == g_a.n && g_b.ex.n == g_a.ex.n && !memcmp(g_a.ex.p, g_b.ex.p, g_a.ex.n));
            CHECK(g_b.st.lines == (uint64_t)n - 3 && g_b.st.malformed == 0 && g_b.st.seq_events == g_a.st.seq_events &&
                  g_b.st.seq_dropped == g_a.st.seq_dropped);
        }
    }
    /* skip into the middle of the second and third block */
    em_reader_cfg c = seq_cfg(bin, 100, 0, 400);
    read_all(&c, &g_a);
    const uint64_t skips[] = {4095, 4096, 5000, 8192, 8996, 8997};
    for (int k = 0; k < 6; k++) {
        c.skip = skips[k], c.prefetch = k % 2;
        read_all(&c, &g_b);
        CHECK(g_b.last == EM_ERR_EOF && g_b.n == g_a.n - skips[k]);
        CHECK(g_b.ex.n == g_a.ex.n - g_a.start[skips[k]] && !memcmp(g_b.ex.p, g_a.ex.p + g_a.start[skips[k]], g_b.ex.n));
    }
    /* the converter's cap: the most recent events survive, the rest are counted */
    cc.seq_max_len = 4;
    const char *bin4 = tmp("big4.bin");
    CHECK_OK(em_convert_tsv(tsv, bin4, &cc, &st));
    CHECK(st.seq_dropped > 0);
    c = seq_cfg(bin4, 64, 0, 400);
    read_all(&c, &g_b);
    c = seq_cfg(tsv, 64, 0, 4);
    read_all(&c, &g_a);
    CHECK(same_dump(&g_a, &g_b) || (g_a.n == g_b.n && !memcmp(g_a.ex.p, g_b.ex.p, g_a.ex.n)));
    CHECK(g_b.st.seq_dropped == 0 && g_a.st.seq_dropped == st.seq_dropped);
    cc.seq_max_len = em_seq_bin_max_events(ND, NS, NQ) + 1;
    CHECK(em_convert_tsv(tsv, bin4, &cc, &st) == EM_ERR_INVALID);
    CHECK(em_seq_bin_max_events(ND, NS, NQ) == (int)((1048576 - (12 + 4 * ND + 8 * NS) - 4 * NQ) / (17 * NQ)));
    /* shapes must match: v2 read without sequences, v1 read with them */
    c = seq_cfg(bin, 64, 0, 4);
    c.num_seq = 0;
    em_reader *r;
    CHECK(em_reader_open(&r, &c) == EM_ERR_INVALID && strstr(em_last_error(), "2 sequence"));
    const char *plain = tmp("plain.tsv"), *v1 = tmp("v1.bin");
    f = fopen(plain, "w");
    for (int i = 0; i < 5; i++) fprintf(f, "1\t1\t2\ta\tb\tc\n");
    fclose(f);
    cc = (em_convert_cfg){.num_dense = ND, .num_sparse = NS};
    CHECK_OK(em_convert_tsv(plain, v1, &cc, &st));
    f = fopen(v1, "rb");
    unsigned char h1[64];
    CHECK(fread(h1, 1, 64, f) == 64 && le32(h1 + 8) == 1);
    fclose(f);
    c = seq_cfg(v1, 64, 0, 4);
    CHECK(em_reader_open(&r, &c) == EM_ERR_INVALID && strstr(em_last_error(), "0 sequence"));
    c.num_seq = 0;
    read_all(&c, &g_b);
    CHECK(g_b.last == EM_ERR_EOF && g_b.n == 5);
    /* an empty file of version 2 */
    const char *empty = tmp("empty.tsv"), *ebin = tmp("empty.bin");
    fclose(fopen(empty, "w"));
    cc = (em_convert_cfg){.num_dense = ND, .num_sparse = NS, .num_seq = NQ};
    CHECK_OK(em_convert_tsv(empty, ebin, &cc, &st));
    c = seq_cfg(ebin, 4, 1, 4);
    read_all(&c, &g_b);
    CHECK(g_b.last == EM_ERR_EOF && g_b.n == 0);
    uint64_t cnt;
    CHECK_OK(em_data_count(bin, &cnt));
    CHECK(cnt == (uint64_t)n - 3);
}

static void test_binary_corrupt(void) {
    const char *tsv = tmp("c.tsv"), *bin = tmp("c.bin"), *badf = tmp("c_bad.bin");
    FILE *f = fopen(tsv, "w");
    for (int i = 0; i < 10; i++) fprintf(f, "1\t1\t2\ta\tb\tc\t1:30:0,2:20:1,3:10:2\t4:0:0\n");
    fclose(f);
    em_convert_cfg cc = {.num_dense = ND, .num_sparse = NS, .num_seq = NQ};
    CHECK_OK(em_convert_tsv(tsv, bin, &cc, NULL));
    size_t n;
    unsigned char *good = slurp(bin, &n), *p = malloc(n + 8);
    const size_t rec = 12 + 4 * ND + 8 * NS, r0 = 64 + 16; /* record 0 */
    const size_t recsz = rec + 4 * NQ + 4 * 17;
    CHECK(n == 64 + 16 + 10 * recsz);
    em_reader_cfg c = seq_cfg(badf, 4, 0, 8);
    em_reader *r;
    const em_batch *b;
    struct {
        size_t at, len;
        unsigned char bytes[8];
        int at_open;
        const char *msg;
    } cases[] = {
        {64, 1, {'X'}, 1, "bad block header at offset 64"},
        {68, 4, {11, 0, 0, 0}, 1, "bad block header"},              /* 11 records of 10 */
        {72, 1, {0xff}, 1, "bad block header"},                      /* payload past the end */
        {72, 1, {(unsigned char)(10 * recsz - 1)}, 0, "record 9"},   /* payload one short */
        {r0 + rec, 4, {200, 0, 0, 0}, 0, "record 0: sequence longer than the header's max_events"},
        {r0 + rec + 8 + 3 * 8, 8, {0}, 0, "record 0: events out of time order"},
        {r0 + recsz + rec + 8 + 3 * 8 + 7, 1, {0x80}, 0, "record 1: negative event age"},
        {r0 + 2 * recsz, 4, {7, 0, 0, 0}, 0, "record 2: label is not 0 or 1"},
        {44, 4, {0xff, 0xff, 0, 0}, 1, "max_events"},
        {40, 4, {0}, 1, "version 2 header with 0 sequence features"},
        {56, 4, {0}, 1, "block_records is 0"},
        {48, 2, {3, 0}, 1, "data_size 3 too small"},
        {60, 1, {1}, 1, "reserved header bytes"},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        memcpy(p, good, n);
        if (k == 3) { /* payload one short: the low byte of 10 * recsz - 1, rest as is */
            uint64_t v = 10 * recsz - 1;
            for (int i = 0; i < 8; i++) p[72 + i] = (unsigned char)(v >> (8 * i));
        } else memcpy(p + cases[k].at, cases[k].bytes, cases[k].len);
        spit(badf, p, n);
        em_status s = em_reader_open(&r, &c);
        if (cases[k].at_open) {
            CHECK(s == EM_ERR_CORRUPT);
        } else {
            CHECK_OK(s);
            if (s == EM_OK) {
                while ((s = em_reader_next(r, &b)) == EM_OK) {
                }
                CHECK(s == EM_ERR_CORRUPT);
                em_reader_free(r);
            }
        }
        if (!strstr(em_last_error(), cases[k].msg) || !strstr(em_last_error(), badf)) {
            CHECK(!"message");
            fprintf(stderr, "    case %zu: got '%s', want '%s'\n", k, em_last_error(), cases[k].msg);
        }
    }
    /* truncated, and trailing bytes */
    spit(badf, good, n - 5);
    CHECK(em_reader_open(&r, &c) == EM_ERR_CORRUPT && strstr(em_last_error(), "truncated"));
    memcpy(p, good, n);
    p[n] = 0;
    spit(badf, p, n + 1);
    CHECK(em_reader_open(&r, &c) == EM_ERR_CORRUPT && strstr(em_last_error(), "unexpected bytes"));
    /* an unfinished conversion */
    memcpy(p, good, n);
    memset(p + 32, 0xff, 8);
    spit(badf, p, n);
    CHECK(em_reader_open(&r, &c) == EM_ERR_CORRUPT && strstr(em_last_error(), "incomplete"));
    /* version 3 */
    memcpy(p, good, n);
    p[8] = 3;
    spit(badf, p, n);
    CHECK(em_reader_open(&r, &c) == EM_ERR_CORRUPT && strstr(em_last_error(), "version 3"));
    /* the good one reads */
    spit(badf, good, n);
    read_all(&c, &g_a);
    CHECK(g_a.last == EM_ERR_EOF && g_a.n == 10 && g_a.st.seq_events == 40);
    free(good), free(p);
}

/* ------------------------------------------------------------ the generator */

static uint64_t fnv_file(const char *path) {
    size_t n;
    unsigned char *p = slurp(path, &n);
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; p && i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    free(p);
    return p ? h : 0;
}

static int same_file(const char *a, const char *b) {
    size_t na, nb;
    unsigned char *pa = slurp(a, &na), *pb = slurp(b, &nb);
    int same = pa && pb && na == nb && !memcmp(pa, pb, na);
    free(pa), free(pb);
    return same;
}

/* Without the sequence options the generator writes exactly what it always wrote
 * (hashes of the output of the version before sequences existed). */
static void test_gen_unchanged(void) {
    em_gen_cfg c = em_gen_default();
    c.train_rows = 3000, c.test_rows = 1000, c.seed = 3;
    CHECK_OK(em_gen_write(&c, tmp("u.tr"), tmp("u.te"), tmp("u.pr"), NULL));
    CHECK(fnv_file(tmp("u.tr")) == 0xade67b3a2379d78bull);
    CHECK(fnv_file(tmp("u.te")) == 0x7282b736bd675353ull);
    CHECK(fnv_file(tmp("u.pr")) == 0x8f8a004b2515adb3ull);
}

/* Column `col` (0-based) of a TSV line into out (without the tab). */
static void column(const char *line, int col, char *out, size_t cap) {
    const char *p = line;
    for (int t = 0; t < col && p; t++) p = strchr(p, '\t'), p = p ? p + 1 : NULL;
    size_t n = p ? strcspn(p, "\t\n") : 0;
    if (n >= cap) n = cap - 1;
    memcpy(out, p ? p : "", n);
    out[n] = 0;
}

static void test_gen_seq(void) {
    em_gen_cfg c = em_gen_default();
    c.train_rows = 3000, c.test_rows = 2100, c.seed = 7;
    c.seq_len_mean = 12, c.seq_max = 64;
    CHECK_OK(em_gen_write(&c, tmp("a.tr"), tmp("a.te"), tmp("a.pr"), NULL));
    em_pool *pool;
    CHECK_OK(em_pool_create(&pool, 2));
    CHECK_OK(em_gen_write(&c, tmp("b.tr"), tmp("b.te"), tmp("b.pr"), pool));
    CHECK(same_file(tmp("a.tr"), tmp("b.tr")) && same_file(tmp("a.te"), tmp("b.te")) &&
          same_file(tmp("a.pr"), tmp("b.pr")));
    c.seed = 8;
    CHECK_OK(em_gen_write(&c, tmp("c.tr"), NULL, NULL, pool));
    CHECK(!same_file(tmp("a.tr"), tmp("c.tr")));
    em_pool_free(pool);
    /* a strict reader takes it; the candidate (C10) and the history share an id space */
    int64_t rows[26], srows[1] = {93145};
    for (int f = 0; f < 26; f++) rows[f] = em__gen_default_card(f);
    em_reader_cfg rc = {.path = tmp("a.tr"), .batch_size = 256, .num_dense = 13, .num_sparse = 26, .table_rows = rows,
                        .strict = 1, .prefetch = 1, .num_seq = 1, .seq_rows = srows, .seq_max_len = 64};
    em_reader *r;
    CHECK_OK(em_reader_open(&r, &rc));
    const em_batch *b;
    em_status s;
    long n = 0, empty = 0, full = 0, repeats = 0, ev = 0, cand_ok = 1;
    while ((s = em_reader_next(r, &b)) == EM_OK) {
        const em_batch_seq *q = &b->seq[0];
        for (int i = 0; i < b->B; i++, n++) {
            int64_t lo = q->offsets[i], L = q->offsets[i + 1] - lo;
            int64_t c0 = b->offsets[9 * b->B + i], c1 = b->offsets[9 * b->B + i + 1];
            cand_ok &= c1 == c0 + 1; /* the candidate is always present */
            int64_t cand = c1 > c0 ? b->indices[c0] : -1;
            empty += L == 0, full += L == 64, ev += L;
            int rep = 0;
            for (int64_t k = 0; k < L; k++) rep |= q->items[lo + k] == cand;
            repeats += rep;
        }
    }
    em_reader_stats st;
    em_reader_stats_get(r, &st);
    em_reader_free(r);
    CHECK(s == EM_ERR_EOF && n == 3000 && st.malformed == 0 && st.seq_dropped == 0 && cand_ok);
    double mean = (double)ev / (double)n;
    fprintf(stderr, "    history: mean length %.2f, %ld empty, %ld at the cap, %.3f repeat the candidate\n", mean, empty,
            full, (double)repeats / (double)n);
    CHECK(mean > 9 && mean < 13 && empty > 20 && full > 5);
    CHECK(repeats > 0.2 * n && repeats < 0.6 * n);
    /* bad configs */
    c = em_gen_default();
    c.train_rows = 10, c.test_rows = 0, c.seq_len_mean = 5;
    c.seq_max = 0;
    CHECK(em_gen_write(&c, tmp("e.tr"), NULL, NULL, NULL) == EM_ERR_INVALID);
    c.seq_max = 10, c.seq_field = 26;
    CHECK(em_gen_write(&c, tmp("e.tr"), NULL, NULL, NULL) == EM_ERR_INVALID);
    c.seq_field = 0, c.seq_decay = 0;
    CHECK(em_gen_write(&c, tmp("e.tr"), NULL, NULL, NULL) == EM_ERR_INVALID);
    c.seq_decay = 10, c.seq_repeat = 1.5;
    CHECK(em_gen_write(&c, tmp("e.tr"), NULL, NULL, NULL) == EM_ERR_INVALID);
    em_drift_cfg d = em_drift_default();
    d.rows = 10, d.windows = 1, d.base.seq_len_mean = 3;
    CHECK(em_gen_drift_write(&d, tmp("d.tsv"), tmp("d.side"), NULL, NULL) == EM_ERR_INVALID);
}

typedef struct {
    double p;
    int y;
} scored;

static int cmp_scored(const void *a, const void *b) {
    double x = ((const scored *)a)->p, y = ((const scored *)b)->p;
    return (x > y) - (x < y);
}

static double auc(scored *s, size_t n) {
    qsort(s, n, sizeof *s, cmp_scored);
    double rank_sum = 0, pos = 0;
    for (size_t i = 0; i < n;) {
        size_t j = i;
        while (j < n && s[j].p == s[i].p) j++;
        for (size_t k = i; k < j; k++)
            if (s[k].y) rank_sum += (double)(i + j + 1) / 2.0, pos++;
        i = j;
    }
    return (rank_sum - pos * (pos + 1) / 2) / (pos * ((double)n - pos));
}

/* The planted history term is real: same seed with seq_scale 1 and 0 differ only in
 * labels and probabilities; the probabilities with the term rank the labels clearly
 * better; the term is larger when the candidate repeats a history item; and the
 * dense fields and other categoricals equal those of the file without sequences. */
static void test_gen_signal(void) {
    em_gen_cfg c = em_gen_default();
    c.train_rows = 0, c.test_rows = 40000, c.seed = 3, c.seq_len_mean = 20;
    CHECK_OK(em_gen_write(&c, NULL, tmp("s1.te"), tmp("s1.pr"), NULL));
    c.seq_scale = 0;
    CHECK_OK(em_gen_write(&c, NULL, tmp("s0.te"), tmp("s0.pr"), NULL));
    c.seq_len_mean = 0;
    CHECK_OK(em_gen_write(&c, NULL, tmp("n.te"), NULL, NULL));
    FILE *t1 = fopen(tmp("s1.te"), "r"), *t0 = fopen(tmp("s0.te"), "r"), *tn = fopen(tmp("n.te"), "r");
    FILE *p1 = fopen(tmp("s1.pr"), "r"), *p0 = fopen(tmp("s0.pr"), "r");
    scored *a1 = calloc(40000, sizeof *a1), *a0 = calloc(40000, sizeof *a0);
    static char l1[1 << 16], l0[1 << 16], ln[4096];
    size_t n = 0;
    int same_rest = 1, same_fields = 1;
    double drep = 0, dnorep = 0, nrep = 0, ctr = 0, meanp = 0;
    while (n < 40000 && fgets(l1, sizeof l1, t1) && fgets(l0, sizeof l0, t0) && fgets(ln, sizeof ln, tn)) {
        double q1, q0;
        if (fscanf(p1, "%lf", &q1) != 1 || fscanf(p0, "%lf", &q0) != 1) break;
        same_rest &= strcmp(l1 + 1, l0 + 1) == 0; /* all but the label */
        for (int col = 1; col < 40; col++) {
            if (col == 23) continue; /* C10, the candidate */
            char x[64], y[64];
            column(l1, col, x, sizeof x), column(ln, col, y, sizeof y);
            if (same_fields && strcmp(x, y)) fprintf(stderr, "    line %zu col %d: '%s' vs '%s'\n", n, col, x, y);
            same_fields &= strcmp(x, y) == 0;
        }
        char cand[32], hist[1 << 14];
        column(l1, 23, cand, sizeof cand);
        column(l1, 40, hist, sizeof hist);
        int rep = 0;
        for (char *h = hist; *h;) {
            rep |= strncmp(h, cand, strlen(cand)) == 0 && h[strlen(cand)] == ':';
            h = strchr(h, ',');
            if (!h) break;
            h++;
        }
        double d = log(q1 / (1 - q1)) - log(q0 / (1 - q0));
        if (rep) drep += d, nrep++;
        else dnorep += d;
        a1[n] = (scored){q1, l1[0] == '1'};
        a0[n] = (scored){q0, l1[0] == '1'};
        ctr += l1[0] == '1', meanp += q1;
        n++;
    }
    fclose(t1), fclose(t0), fclose(tn), fclose(p1), fclose(p0);
    CHECK(n == 40000);
    CHECK(same_rest);
    CHECK(same_fields);
    drep /= nrep, dnorep /= (double)n - nrep;
    double auc1 = auc(a1, n), auc0 = auc(a0, n);
    fprintf(stderr, "    AUC with the history term %.4f, without %.4f; term %.3f on repeats, %.3f otherwise; ctr %.4f mean p %.4f\n",
            auc1, auc0, drep, dnorep, ctr / (double)n, meanp / (double)n);
    CHECK(auc1 > auc0 + 0.03);
    CHECK(drep > dnorep + 0.2);
    CHECK_NEAR(meanp / (double)n, ctr / (double)n, 0.01);
    free(a1), free(a0);
}

/* ------------------------------------------------------------ OTTO */

typedef struct {
    uint64_t session;
    size_t n;
    uint64_t aid[600];
    int64_t ts[600];
    int type[600];
} ref_session;

/* Sessions of a JSON lines file, parsed independently of otto.c. */
static int load_sessions(const char *path, ref_session *out, int max) {
    FILE *f = fopen(path, "r");
    static char line[1 << 17];
    int n = 0;
    while (f && n < max && fgets(line, sizeof line, f)) {
        json_t *j = json_loads(line, 0, NULL), *ev = json_object_get(j, "events");
        ref_session *s = &out[n++];
        s->session = (uint64_t)json_integer_value(json_object_get(j, "session"));
        s->n = json_array_size(ev);
        for (size_t i = 0; i < s->n && i < 600; i++) {
            json_t *e = json_array_get(ev, i);
            const char *t = json_string_value(json_object_get(e, "type"));
            s->aid[i] = (uint64_t)json_integer_value(json_object_get(e, "aid"));
            s->ts[i] = json_integer_value(json_object_get(e, "ts"));
            s->type[i] = !strcmp(t, "clicks") ? 0 : !strcmp(t, "carts") ? 1 : 2;
        }
        json_decref(j);
    }
    if (f) fclose(f);
    return n;
}

static const int64_t OTTO_ROWS[2] = {1ll << 40, 3}, OTTO_SEQ_ROWS[1] = {1ll << 40};

static em_reader_cfg otto_reader(const char *path, int cap) {
    return (em_reader_cfg){.path = path, .batch_size = 37, .num_dense = 0, .num_sparse = 2, .table_rows = OTTO_ROWS,
                           .strict = 1, .prefetch = 1, .num_seq = 1, .seq_rows = OTTO_SEQ_ROWS, .seq_max_len = cap};
}

/* One example of an OTTO dump: label, candidate, type, history (copied out: the dump
 * is packed, its int64s unaligned). */
typedef struct {
    float label;
    int64_t cand, type, L;
    int64_t item[1024], age[1024];
    int32_t htype[1024];
} otto_ex;

static otto_ex otto_at(const dump *d, size_t e) {
    const unsigned char *p = d->ex.p + d->start[e];
    otto_ex x;
    int64_t one;
    memcpy(&x.label, p, 4);
    memcpy(&one, p + 4, 8);
    memcpy(&x.cand, p + 12, 8);
    memcpy(&one, p + 20, 8);
    memcpy(&x.type, p + 28, 8);
    memcpy(&x.L, p + 36, 8);
    if (x.L > 1024) x.L = 1024; /* the tests read with caps <= 1024 */
    memcpy(x.item, p + 44, 8 * (size_t)x.L);
    memcpy(x.age, p + 44 + 8 * (size_t)x.L, 8 * (size_t)x.L);
    memcpy(x.htype, p + 44 + 16 * (size_t)x.L, 4 * (size_t)x.L);
    return x;
}

static int in_session(const ref_session *s, int64_t aid) {
    for (size_t i = 0; i < s->n; i++)
        if ((int64_t)s->aid[i] == aid) return 1;
    return 0;
}

static void test_otto(void) {
    char sp[512], tp[512], lp[512];
    em_test_path("data/otto/train_20sessions.jsonl", sp, sizeof sp);
    em_test_path("data/otto/srcout_test_sessions.jsonl", tp, sizeof tp);
    em_test_path("data/otto/srcout_test_labels.jsonl", lp, sizeof lp);
    static ref_session ref[32];
    int ns = load_sessions(sp, ref, 32);
    CHECK(ns == 20);
    size_t events = 0;
    for (int i = 0; i < ns; i++) events += ref[i].n;
    em_otto_cfg oc = em_otto_default();
    oc.negatives = 3, oc.seed = 5;
    em_otto_stats st;
    const char *out = tmp("o.tsv"), *outb = tmp("o.bin");
    CHECK_OK(em_otto_convert(sp, out, &oc, &st));
    CHECK(st.sessions == 20 && st.lines == 20 && st.events == events && st.malformed == 0);
    CHECK(st.positives == events - 20 && st.negatives == 3 * st.positives && st.short_negatives == 0);
    CHECK(st.examples == st.positives + st.negatives && st.items > 100);
    /* read back and compare with an independent parse of the sessions */
    em_reader_cfg rc = otto_reader(out, 1024);
    read_all(&rc, &g_a);
    CHECK(g_a.last == EM_ERR_EOF && g_a.n == st.examples);
    size_t e = 0;
    int ok = 1, negs_ok = 1;
    for (int si = 0; si < ns && ok; si++) {
        const ref_session *s = &ref[si];
        for (size_t t = 1; t < s->n && ok; t++) {
            otto_ex x = otto_at(&g_a, e++);
            ok &= x.label == 1.f && x.cand == (int64_t)s->aid[t] && x.type == s->type[t] && x.L == (int64_t)t;
            for (size_t i = 0; i < t && ok; i++)
                ok &= x.item[i] == (int64_t)s->aid[i] && x.age[i] == (s->ts[t] - s->ts[i]) / 1000 &&
                      x.htype[i] == s->type[i];
            for (int k = 0; k < 3 && ok; k++) {
                otto_ex y = otto_at(&g_a, e++);
                ok &= y.label == 0.f && y.type == x.type && y.L == x.L &&
                      !memcmp(y.item, x.item, 8 * (size_t)x.L) && !memcmp(y.age, x.age, 8 * (size_t)x.L);
                negs_ok &= !in_session(s, y.cand);
                for (int k2 = 0; k2 < k; k2++) negs_ok &= otto_at(&g_a, e - 1 - (size_t)(k - k2)).cand != y.cand;
            }
        }
    }
    CHECK(ok && negs_ok && e == g_a.n);
    /* first line, spelled out */
    char first[256];
    FILE *f = fopen(out, "r");
    CHECK(fgets(first, sizeof first, f) != NULL);
    fclose(f);
    char want[256];
    snprintf(want, sizeof want, "1\t%llx\t%d\t%llx:%lld:%d\n", (unsigned long long)ref[0].aid[1], ref[0].type[1],
             (unsigned long long)ref[0].aid[0], (long long)((ref[0].ts[1] - ref[0].ts[0]) / 1000), ref[0].type[0]);
    CHECK(strcmp(first, want) == 0);
    /* binary output reads the same; the TSV through `convert` too */
    oc.binary = 1;
    CHECK_OK(em_otto_convert(sp, outb, &oc, &st));
    rc = otto_reader(outb, 1024);
    read_all(&rc, &g_b);
    CHECK(g_b.n == g_a.n && g_b.ex.n == g_a.ex.n && !memcmp(g_a.ex.p, g_b.ex.p, g_a.ex.n));
    em_convert_cfg cc = {.num_dense = 0, .num_sparse = 2, .num_seq = 1};
    CHECK_OK(em_convert_tsv(out, tmp("oc.bin"), &cc, NULL));
    CHECK(same_file(outb, tmp("oc.bin")));
    /* deterministic; the seed moves the negatives only */
    oc.binary = 0;
    CHECK_OK(em_otto_convert(sp, tmp("o2.tsv"), &oc, &st));
    CHECK(same_file(out, tmp("o2.tsv")));
    oc.seed = 6;
    CHECK_OK(em_otto_convert(sp, tmp("o3.tsv"), &oc, &st));
    CHECK(!same_file(out, tmp("o3.tsv")) && st.positives == events - 20);
    /* the cap keeps the most recent events */
    oc.seed = 5, oc.seq_max_len = 5;
    CHECK_OK(em_otto_convert(sp, tmp("o5.tsv"), &oc, &st));
    rc = otto_reader(tmp("o5.tsv"), 1024);
    read_all(&rc, &g_b);
    ok = g_b.n == g_a.n;
    for (size_t i = 0; i < g_b.n && ok; i++) {
        otto_ex x = otto_at(&g_a, i), y = otto_at(&g_b, i);
        int64_t keep = x.L < 5 ? x.L : 5;
        ok = y.L == keep && y.cand == x.cand && !memcmp(y.item, x.item + (x.L - keep), 8 * (size_t)keep) &&
             !memcmp(y.age, x.age + (x.L - keep), 8 * (size_t)keep);
    }
    CHECK(ok);
    /* labels: positives against the whole session */
    static ref_session tref[16];
    int nt = load_sessions(tp, tref, 16);
    oc = em_otto_default();
    oc.labels_path = lp;
    CHECK_OK(em_otto_convert(tp, tmp("l.tsv"), &oc, &st));
    CHECK(nt == 8 && st.sessions == 8 && st.positives == 8 && st.unmatched_labels == 0 && st.malformed == 0);
    CHECK(st.examples == st.positives + st.negatives && st.items >= 5);
    rc = otto_reader(tmp("l.tsv"), 1024);
    read_all(&rc, &g_b);
    CHECK(g_b.n == st.examples);
    static const int64_t label_aid[8] = {1329892, 303479, 303479, 1712999, 107068, 303479, 360462, 107068};
    ok = 1;
    for (size_t i = 0, si = 0; i < g_b.n && ok; i++) {
        otto_ex x = otto_at(&g_b, i);
        if (x.label == 0.f) {
            ok = !in_session(&tref[si - 1], x.cand) && x.cand != label_aid[si - 1];
            continue;
        }
        ok = si < 8 && x.cand == label_aid[si] && x.type == 0 && x.L == 1 && x.item[0] == (int64_t)tref[si].aid[0] &&
             x.age[0] == 0;
        si++;
    }
    CHECK(ok);
    /* labels of unknown sessions, malformed lines in both files */
    const char *ls = tmp("labels.jsonl"), *ss = tmp("sessions.jsonl");
    f = fopen(ls, "w");
    fprintf(f, "{\"session\": 12899769, \"labels\": {\"clicks\": 5, \"orders\": [6, 7]}}\n");
    fprintf(f, "{\"session\": 999, \"labels\": {\"clicks\": 5, \"carts\": [1, 2]}}\nnot json\n");
    fprintf(f, "{\"session\": 998, \"labels\": {\"carts\": \"x\"}}\n");
    fclose(f);
    f = fopen(ss, "w");
    fprintf(f, "{\"session\": 12899769, \"events\": [{\"aid\": 1, \"ts\": 1000, \"type\": \"clicks\"}, {\"aid\": 2, \"ts\": 4000, \"type\": \"orders\"}]}\n");
    fprintf(f, "{\"session\": 5, \"events\": [{\"aid\": 1, \"ts\": 10, \"type\": \"views\"}]}\n");
    fprintf(f, "{\"session\": 6, \"events\": [{\"aid\": 1, \"ts\": 10, \"type\": \"clicks\"}, {\"aid\": 2, \"ts\": 9, \"type\": \"clicks\"}]}\n");
    fprintf(f, "[1, 2]\n{\"session\": 7, \"events\": [{\"aid\": 3, \"ts\": 0, \"type\": \"carts\"}]}\n");
    fclose(f);
    oc.labels_path = ls, oc.negatives = 2;
    CHECK_OK(em_otto_convert(ss, tmp("m.tsv"), &oc, &st));
    CHECK(st.lines == 5 && st.sessions == 2 && st.malformed == 5 && st.positives == 3 && st.unmatched_labels == 3);
    char w2[700];
    snprintf(w2, sizeof w2, "%s:3: invalid JSON", ls);
    CHECK(strncmp(st.first_error, w2, strlen(w2)) == 0);
    /* the session's items (1, 2) and labels (5, 6, 7) are excluded: the pool has only 3 left */
    CHECK(st.items == 6 && st.negatives == 3 && st.short_negatives == 3);
    oc.labels_path = NULL;
    CHECK_OK(em_otto_convert(ss, tmp("m.tsv"), &oc, &st));
    snprintf(w2, sizeof w2, "%s:2: session 5: event 1: expected", ss);
    CHECK(st.malformed == 3 && strncmp(st.first_error, w2, strlen(w2)) == 0 && st.positives == 1);
    oc.strict = 1;
    CHECK(em_otto_convert(ss, tmp("strict.tsv"), &oc, &st) == EM_ERR_PARSE);
    CHECK(strncmp(em_last_error(), w2, strlen(w2)) == 0 && access(tmp("strict.tsv"), F_OK) != 0);
    snprintf(w2, sizeof w2, "%s:3: session 6: event 2: ts 9 is before", ss);
    oc.strict = 0;
    f = fopen(ss, "w");
    fprintf(f, "{\"session\": 6, \"events\": [{\"aid\": 1, \"ts\": 10, \"type\": \"clicks\"}, {\"aid\": 2, \"ts\": 9, \"type\": \"clicks\"}]}\n");
    fclose(f);
    CHECK_OK(em_otto_convert(ss, tmp("m.tsv"), &oc, &st));
    CHECK(st.malformed == 1 && strstr(st.first_error, "session 6: event 2: ts 9 is before the previous event's"));
    /* argument errors */
    CHECK(em_otto_convert("-", tmp("x.tsv"), &oc, &st) == EM_ERR_UNSUPPORTED);
    CHECK(em_otto_convert(tmp("none.jsonl"), tmp("x.tsv"), &oc, &st) == EM_ERR_IO);
    oc.negatives = -1;
    CHECK(em_otto_convert(sp, tmp("x.tsv"), &oc, &st) == EM_ERR_INVALID);
    oc.negatives = 1, oc.seq_max_len = 1 << 30;
    CHECK(em_otto_convert(sp, tmp("x.tsv"), &oc, &st) == EM_ERR_INVALID);
}

/* ------------------------------------------------------------ allocation failures */

static int open_fds(void) {
    int n = 0;
    for (int fd = 0; fd < 1024; fd++) n += fcntl(fd, F_GETFD) != -1;
    return n;
}

static void test_nomem(void) {
    int fds = open_fds();
    char tsv[512], bin[512];
    snprintf(tsv, sizeof tsv, "%s", write_seq_tsv("nm.tsv", 300, (const int[]){7, -1}));
    snprintf(bin, sizeof bin, "%s", tmp("nm.bin"));
    em_convert_cfg cc = {.num_dense = ND, .num_sparse = NS, .num_seq = NQ};
    CHECK_OK(em_convert_tsv(tsv, bin, &cc, NULL));
    const char *paths[2] = {tsv, bin};
    for (int p = 0; p < 2; p++) {
        int opened = 0;
        for (long k = 0; k < 200 && !opened; k++) {
            size_t base = em_mem_in_use();
            em_reader_cfg c = seq_cfg(paths[p], 16, 2, 32);
            c.skip = 5;
            em_reader *r = NULL;
            em_mem_fail_after(k);
            em_status s = em_reader_open(&r, &c);
            em_mem_fail_after(-1);
            if (s == EM_OK) {
                opened = 1;
                const em_batch *b;
                CHECK_OK(em_reader_next(r, &b));
                em_reader_free(r);
            } else CHECK(s == EM_ERR_NOMEM && r == NULL);
            CHECK(em_mem_in_use() == base);
        }
        CHECK(opened);
    }
    int done = 0;
    for (long k = 0; k < 64 && !done; k++) {
        size_t base = em_mem_in_use();
        em_mem_fail_after(k);
        em_status s = em_convert_tsv(tsv, tmp("nm2.bin"), &cc, NULL);
        em_mem_fail_after(-1);
        if (s != EM_OK && s != EM_ERR_NOMEM) fprintf(stderr, "    convert: %s\n", em_last_error());
        CHECK(s == EM_OK || s == EM_ERR_NOMEM);
        if (s != EM_OK) CHECK(access(tmp("nm2.bin"), F_OK) != 0);
        done = s == EM_OK;
        CHECK(em_mem_in_use() == base);
    }
    CHECK(done);
    char sp[512], lp[512], tp[512];
    em_test_path("data/otto/train_20sessions.jsonl", sp, sizeof sp);
    em_test_path("data/otto/srcout_test_sessions.jsonl", tp, sizeof tp);
    em_test_path("data/otto/srcout_test_labels.jsonl", lp, sizeof lp);
    for (int mode = 0; mode < 3; mode++) {
        em_otto_cfg oc = em_otto_default();
        oc.binary = mode == 1;
        oc.labels_path = mode == 2 ? lp : NULL;
        oc.seq_max_len = 64;
        done = 0;
        for (long k = 0; k < 200 && !done; k++) {
            size_t base = em_mem_in_use();
            em_otto_stats st;
            unlink(tmp("nm.out"));
            em_mem_fail_after(k);
            em_status s = em_otto_convert(mode == 2 ? tp : sp, tmp("nm.out"), &oc, &st);
            em_mem_fail_after(-1);
            CHECK(s == EM_OK || s == EM_ERR_NOMEM);
            if (s != EM_OK) CHECK(access(tmp("nm.out"), F_OK) != 0);
            done = s == EM_OK;
            CHECK(em_mem_in_use() == base);
        }
        CHECK(done);
    }
    em_gen_cfg g = em_gen_default();
    g.train_rows = 3000, g.test_rows = 100, g.seq_len_mean = 100, g.seq_max = 2000; /* the text buffers grow */
    done = 0;
    for (long k = 0; k < 64 && !done; k++) {
        size_t base = em_mem_in_use();
        em_mem_fail_after(k);
        em_status s = em_gen_write(&g, tmp("g.tr"), tmp("g.te"), tmp("g.pr"), NULL);
        em_mem_fail_after(-1);
        if (s != EM_OK && s != EM_ERR_NOMEM) fprintf(stderr, "    gen: %s\n", em_last_error());
        CHECK(s == EM_OK || s == EM_ERR_NOMEM);
        done = s == EM_OK;
        CHECK(em_mem_in_use() == base);
    }
    CHECK(done);
    CHECK(open_fds() == fds);
}

static void test_free_dumps(void) {
    dump_free(&g_a), dump_free(&g_b), dump_free(&g_c);
}

TEST_MAIN({"parse", test_parse}, {"reader_tsv", test_reader_tsv}, {"resume", test_resume},
          {"binary_roundtrip", test_binary_roundtrip}, {"binary_corrupt", test_binary_corrupt},
          {"gen_unchanged", test_gen_unchanged}, {"gen_seq", test_gen_seq}, {"gen_signal", test_gen_signal},
          {"otto", test_otto}, {"nomem", test_nomem}, {"free_dumps", test_free_dumps})
