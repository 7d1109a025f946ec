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
    const int want = 1 + num_dense + num_sparse;
    const char *p = line, *end = line + len;

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
