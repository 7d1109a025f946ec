/*
 * criteo.c - the Criteo TSV line parser.
 *
 * A line is: label \t I1..I<num_dense> \t C1..C<num_sparse>, optionally ending in
 * "\n" or "\r\n". This is the inner loop of TSV training (45M lines per Kaggle epoch),
 * so it is one left-to-right pass over the bytes: no strtod/strtoull, no allocation,
 * no per-field memchr. Error paths may be slow: they recount the fields so that a
 * line with a wrong field count is always reported as such (bad_field = -1), whatever
 * the first bad byte is.
 *
 * Dense: optional sign and decimal digits, |x| < 10^18; empty = missing -> 0.
 * Stored value: (float)log1p((double)max(x, 0)); values below LOG1P_TABLE come from a
 * table filled once with that same expression, so the result does not depend on the
 * path taken.
 * Categorical: 1..16 hex digits in either case -> uint64; empty = missing.
 *
 * Sequence columns (em_seq_parse_line, docs/FORMATS.md section 1.1): after the
 * categoricals, each `item:age:type` events separated by commas. The Criteo part goes
 * through the same code as a plain line (parse_fields), up to the tab that ends the
 * categoricals; the columns are parsed after it, keeping the most recent `cap` events.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "data/data_internal.h"
#include "ember/data.h"

#define LOG1P_TABLE 4096
static float g_log1p[LOG1P_TABLE];
static pthread_once_t g_log1p_once = PTHREAD_ONCE_INIT;
static void log1p_init(void) {
    for (int i = 0; i < LOG1P_TABLE; i++) g_log1p[i] = (float)log1p((double)i);
}

/* hex digit value + 1; 0 = not a hex digit */
#define HX(c, v) [c] = (v) + 1
static const unsigned char HEXV[256] = {
    HX('0', 0),  HX('1', 1),  HX('2', 2),  HX('3', 3),  HX('4', 4),  HX('5', 5),
    HX('6', 6),  HX('7', 7),  HX('8', 8),  HX('9', 9),  HX('a', 10), HX('b', 11),
    HX('c', 12), HX('d', 13), HX('e', 14), HX('f', 15), HX('A', 10), HX('B', 11),
    HX('C', 12), HX('D', 13), HX('E', 14), HX('F', 15),
};
#undef HX

void em__field_name(int field, int num_dense, char *out, size_t cap) {
    if (field == 0) snprintf(out, cap, "label");
    else if (field <= num_dense) snprintf(out, cap, "I%d", field);
    else snprintf(out, cap, "C%d", field - num_dense);
}

/* Number of tab-separated fields of line[0..len). */
static int count_fields(const char *line, size_t len) {
    int n = 1;
    for (const char *p = line, *end = line + len; (p = memchr(p, '\t', (size_t)(end - p))); p++) n++;
    return n;
}

/* The error for field `f` spanning [s, end of field), or for a wrong field count if
 * the line does not have `want` fields (that takes precedence). */
static em_status field_error(const char *line, size_t len, int want, int f, const char *s,
                             int num_dense, int *bad_field, const char *why) {
    int have = count_fields(line, len);
    if (have != want) {
        *bad_field = -1;
        return em_errorf(EM_ERR_PARSE, "wrong field count: %d fields, expected %d", have, want);
    }
    const char *end = line + len, *e = memchr(s, '\t', (size_t)(end - s));
    if (!e) e = end;
    int n = (int)(e - s), k = n > 40 ? 40 : n;
    for (int b = 0; b < 3 && k < n && ((unsigned char)s[k] & 0xC0) == 0x80; b++) k--; /* whole UTF-8 characters */
    char name[16];
    em__field_name(f, num_dense, name, sizeof name);
    *bad_field = f;
    return em_errorf(EM_ERR_PARSE, "field %d (%s): %s '%.*s%s'", f, name, why, k, s, k < n ? "..." : "");
}

/*
 * The label, dense and categorical fields of [line, pend). `len` and `want` describe
 * the whole line (pend = line + len for plain Criteo; the start of the tab before the
 * first sequence column otherwise), so that a wrong field count is reported with the
 * line's real count.
 */
static inline em_status parse_fields(const char *line, size_t len, const char *pend, int want,
                                     int num_dense, int num_sparse, float *label, float *dense,
                                     uint64_t *ids, uint64_t *missing, int *bad_field) {
    const char *p = line, *end = pend;

    /* label: exactly "0" or "1" */
    if (!(p < end && (*p == '0' || *p == '1') && (p + 1 == end || p[1] == '\t')))
        return field_error(line, len, want, 0, p, num_dense, bad_field, "label must be 0 or 1, got");
    *label = (float)(*p - '0');
    p++;

    for (int j = 0; j < num_dense; j++) {
        if (p == end) goto count; /* the previous field was the last one */
        const char *s = ++p;      /* skip the tab */
        int neg = 0;
        if (p < end && (*p == '-' || *p == '+')) neg = *p++ == '-';
        uint64_t v = 0;
        const char *d0 = p;
        while (p < end && (unsigned)(*p - '0') < 10u) {
            if (v >= 100000000000000000ull) /* a 19th digit: |x| >= 10^18 */
                return field_error(line, len, want, 1 + j, s, num_dense, bad_field,
                                   "integer out of range");
            v = v * 10 + (uint64_t)(*p++ - '0');
        }
        if (p < end && *p != '\t')
            return field_error(line, len, want, 1 + j, s, num_dense, bad_field, "invalid integer");
        if (p == d0 && p != s) /* a sign without digits */
            return field_error(line, len, want, 1 + j, s, num_dense, bad_field, "invalid integer");
        if (neg || v == 0) dense[j] = 0.f; /* also missing */
        else dense[j] = v < LOG1P_TABLE ? g_log1p[v] : (float)log1p((double)v);
    }

    uint64_t miss = 0;
    for (int f = 0; f < num_sparse; f++) {
        if (p == end) goto count;
        const char *s = ++p;
        uint64_t v = 0;
        unsigned bad = 0;
        while (p < end && *p != '\t') {
            unsigned d = HEXV[(unsigned char)*p++];
            bad |= d == 0;
            v = (v << 4) | (uint64_t)(d - 1);
        }
        size_t n = (size_t)(p - s);
        if (bad)
            return field_error(line, len, want, 1 + num_dense + f, s, num_dense, bad_field,
                               "invalid hex");
        if (n > 16)
            return field_error(line, len, want, 1 + num_dense + f, s, num_dense, bad_field,
                               "hex id longer than 16 digits");
        if (n == 0) {
            miss |= 1ull << f;
            v = 0;
        }
        ids[f] = v;
    }
    if (p != end) goto count; /* more fields than expected */
    *missing = miss;
    return EM_OK;

count:
    *bad_field = -1;
    return em_errorf(EM_ERR_PARSE, "wrong field count: %d fields, expected %d",
                     count_fields(line, len), want);
}

em_status em_criteo_parse_line(const char *line, size_t len, int num_dense, int num_sparse,
                               float *label, float *dense, uint64_t *ids, uint64_t *missing,
                               int *bad_field) {
    int dummy;
    if (!bad_field) bad_field = &dummy;
    *bad_field = -1;
    if (num_dense < 0 || num_sparse < 0 || num_sparse > 64)
        return em_errorf(EM_ERR_INVALID, "num_dense %d / num_sparse %d out of range (sparse <= 64)",
                         num_dense, num_sparse);
    pthread_once(&g_log1p_once, log1p_init);
    if (len && line[len - 1] == '\n') len--;
    if (len && line[len - 1] == '\r') len--;
    return parse_fields(line, len, line + len, 1 + num_dense + num_sparse, num_dense, num_sparse,
                        label, dense, ids, missing, bad_field);
}

/* ------------------------------------------------------------ sequence columns */
/*
 * A sequence column is empty or `event(,event)*` with event = item ':' age ':' type:
 * item 1..16 hex digits, age 1..18 decimal digits (no sign), type 1..3 decimal digits
 * <= EM_SEQ_MAX_TYPE; ages non-increasing from one event to the next (oldest first).
 * Events are counted first (commas), so the ones the cap leaves out are recognised
 * while parsing and only validated, never stored.
 */

/* The error for event `e` (1-based) of sequence column `sf` starting at `ev`. */
static em_status event_error(const char *line, size_t len, int want, int field, int sf,
                             const char *ev, const char *fend, int64_t e, int *bad_field,
                             const char *why) {
    int have = count_fields(line, len);
    if (have != want) {
        *bad_field = -1;
        return em_errorf(EM_ERR_PARSE, "wrong field count: %d fields, expected %d", have, want);
    }
    const char *ee = memchr(ev, ',', (size_t)(fend - ev));
    if (!ee) ee = fend;
    int n = (int)(ee - ev), k = n > 40 ? 40 : n;
    for (int b = 0; b < 3 && k < n && ((unsigned char)ev[k] & 0xC0) == 0x80; b++) k--;
    *bad_field = field;
    return em_errorf(EM_ERR_PARSE, "field %d (S%d): event %lld: %s '%.*s%s'", field, sf + 1,
                     (long long)e, why, k, ev, k < n ? "..." : "");
}

/* Parse the column [s, fend) into *out. */
static em_status parse_seq(const char *line, size_t len, int want, int field, int sf,
                           const char *s, const char *fend, em_seq_events *out, int *bad_field) {
    out->len = 0;
    out->total = 0;
    if (s == fend) return EM_OK;
    int64_t total = 1;
    for (const char *q = s; (q = memchr(q, ',', (size_t)(fend - q))); q++) total++;
    const int64_t drop = total > out->cap ? total - out->cap : 0;
    const char *p = s;
    int64_t prev_age = INT64_MAX;
    for (int64_t e = 0; e < total; e++) {
        const char *ev = p;
#define EV_FAIL(why) return event_error(line, len, want, field, sf, ev, fend, e + 1, bad_field, why)
        uint64_t item = 0;
        unsigned bad = 0;
        while (p < fend && *p != ':' && *p != ',') {
            unsigned d = HEXV[(unsigned char)*p++];
            bad |= d == 0;
            item = (item << 4) | (uint64_t)(d - 1);
        }
        if (p == ev) EV_FAIL(p < fend && *p == ':' ? "empty item" : "empty event");
        if (bad) EV_FAIL("invalid item hex");
        if (p - ev > 16) EV_FAIL("item longer than 16 hex digits");
        if (p == fend || *p != ':') EV_FAIL("expected item:age:type");
        const char *a0 = ++p;
        uint64_t age = 0;
        while (p < fend && (unsigned)(*p - '0') < 10u) {
            if (age >= 100000000000000000ull) EV_FAIL("age out of range");
            age = age * 10 + (uint64_t)(*p++ - '0');
        }
        if (p == a0 || (p < fend && *p != ':' && *p != ',')) EV_FAIL("age must be a non-negative integer");
        if (p == fend || *p != ':') EV_FAIL("expected item:age:type");
        const char *t0 = ++p;
        unsigned type = 0;
        while (p < fend && (unsigned)(*p - '0') < 10u && p - t0 < 3) type = type * 10 + (unsigned)(*p++ - '0');
        if (p == t0 || (p < fend && *p != ',')) EV_FAIL("type must be an integer 0..255");
        if (type > EM_SEQ_MAX_TYPE) EV_FAIL("type must be an integer 0..255");
        if ((int64_t)age > prev_age) EV_FAIL("events out of time order (age grows)");
        prev_age = (int64_t)age;
        if (e >= drop) {
            int64_t i = e - drop;
            out->item[i] = item;
            out->age[i] = (int64_t)age;
            out->type[i] = (int32_t)type;
        }
        if (p < fend) p++; /* the comma; the last event ends at fend */
#undef EV_FAIL
    }
    out->total = total;
    out->len = (int)(total - drop);
    return EM_OK;
}

em_status em_seq_parse_line(const char *line, size_t len, int num_dense, int num_sparse, int num_seq,
                            float *label, float *dense, uint64_t *ids, uint64_t *missing,
                            em_seq_events *seq, int *bad_field) {
    if (num_seq == 0)
        return em_criteo_parse_line(line, len, num_dense, num_sparse, label, dense, ids, missing,
                                    bad_field);
    int dummy;
    if (!bad_field) bad_field = &dummy;
    *bad_field = -1;
    if (num_dense < 0 || num_sparse < 0 || num_sparse > 64 || num_seq < 0 ||
        num_seq > EM_SEQ_MAX_FEATURES || !seq)
        return em_errorf(EM_ERR_INVALID, "num_dense %d / num_sparse %d / num_seq %d out of range (sparse <= 64, seq <= %d)",
                         num_dense, num_sparse, num_seq, EM_SEQ_MAX_FEATURES);
    for (int s = 0; s < num_seq; s++)
        if (seq[s].cap < 0 || (seq[s].cap && (!seq[s].item || !seq[s].age || !seq[s].type)))
            return em_errorf(EM_ERR_INVALID, "sequence column %d: cap %d without buffers", s, seq[s].cap);
    pthread_once(&g_log1p_once, log1p_init);
    if (len && line[len - 1] == '\n') len--;
    if (len && line[len - 1] == '\r') len--;
    const int base = 1 + num_dense + num_sparse, want = base + num_seq;
    /* the tab that ends the categoricals: the base-th one */
    const char *end = line + len, *pend = line;
    for (int t = 0; t < base; t++, pend++) {
        pend = memchr(pend, '\t', (size_t)(end - pend));
        if (!pend) {
            *bad_field = -1;
            return em_errorf(EM_ERR_PARSE, "wrong field count: %d fields, expected %d",
                             count_fields(line, len), want);
        }
    }
    pend--; /* at that tab */
    em_status st = parse_fields(line, len, pend, want, num_dense, num_sparse, label, dense, ids,
                                missing, bad_field);
    if (st != EM_OK) return st;
    const char *p = pend;
    for (int s = 0; s < num_seq; s++) {
        if (p == end) goto count;
        const char *fs = ++p;
        const char *fe = memchr(fs, '\t', (size_t)(end - fs));
        if (!fe) fe = end;
        if ((st = parse_seq(line, len, want, base + s, s, fs, fe, &seq[s], bad_field)) != EM_OK)
            return st;
        p = fe;
    }
    if (p != end) goto count;
    return EM_OK;
count:
    *bad_field = -1;
    return em_errorf(EM_ERR_PARSE, "wrong field count: %d fields, expected %d",
                     count_fields(line, len), want);
}
