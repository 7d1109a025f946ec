/*
 * request.c - request bodies in, answers out: the JSON and binary protocols of
 * docs/SERVING.md.
 *
 * JSON examples are either Criteo TSV lines (the label column optional) parsed by the
 * training data's own parser, so the server sees exactly what training saw, or
 * objects {"dense": [...], "sparse": [...]} converted the same way (dense x ->
 * log1p(max(x, 0)), null -> 0; hex ids, null or "" -> missing). Every rejection
 * names the example and the field, e.g. "examples[3]: field 15 (C2): invalid hex
 * '12zz'". Parsed examples go into the slot's arrays, which grow but never shrink.
 *
 * Binary requests are copied field by field with memcpy (the records are not
 * aligned) and checked: magic, version, feature counts, size, finite dense values.
 *
 * Example ids (teacher mode, docs/SERVING.md): JSON "ids" (one per example: an
 * integer in [0, 2^63) or a string of decimal digits up to 2^64 - 1) and "vertical"
 * (an integer in [0, 2^32)); binary version 2 puts a uint64 id in front of each
 * record and the vertical in the header's reserved field. A server that logs
 * predictions refuses requests without ids.
 */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "serve/serve_internal.h"

int em__req_reserve(em_server *s, em__req *r, int cap) {
    if (cap <= r->cap) return 0;
    int c = r->cap ? r->cap : 16;
    while (c < cap) c *= 2;
    float *d = em_realloc(r->dense, (size_t)c * (size_t)s->nd * sizeof(float));
    if (d) r->dense = d;
    uint64_t *ids = em_realloc(r->ids, (size_t)c * (size_t)s->ns * sizeof(uint64_t));
    if (ids) r->ids = ids;
    uint64_t *miss = em_realloc(r->miss, (size_t)c * sizeof(uint64_t));
    if (miss) r->miss = miss;
    float *p = em_realloc(r->prob, (size_t)c * sizeof(float));
    if (p) r->prob = p;
    uint64_t *ex = em_realloc(r->exid, (size_t)c * sizeof(uint64_t));
    if (ex) r->exid = ex;
    if (!d || !ids || !miss || !p || !ex) return -1;
    r->cap = c;
    return 0;
}

static int grow(char **buf, size_t *cap, size_t need) {
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : 256;
    while (c < need) c *= 2;
    char *b = em_realloc(*buf, c);
    if (!b) return -1;
    *buf = b, *cap = c;
    return 0;
}

#define FAIL(...) (snprintf(msg, cap, __VA_ARGS__), 400)

/* "1a2B" -> id; 1..16 hex digits. */
static int parse_hex(const char *p, size_t n, uint64_t *out) {
    if (n == 0 || n > 16) return -1;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        int c = (unsigned char)p[i], d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                         : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v << 4 | (uint64_t)d;
    }
    *out = v;
    return 0;
}

static int parse_line(em_server *s, em__req *r, int i, const char *str, size_t len, char *msg, size_t cap) {
    size_t tabs = 0;
    for (size_t k = 0; k < len; k++) tabs += str[k] == '\t';
    const char *l = str;
    size_t n = len;
    if (tabs == (size_t)(s->nd + s->ns - 1)) { /* no label column (the usual case): add one */
        if (grow(&r->line, &r->line_cap, len + 3)) return snprintf(msg, cap, "out of memory"), 500;
        r->line[0] = '0', r->line[1] = '\t';
        memcpy(r->line + 2, str, len);
        l = r->line, n = len + 2;
    } else if (tabs != (size_t)(s->nd + s->ns)) {
        return FAIL("examples[%d]: wrong field count: %zu fields, expected %d (%d dense, %d categorical)", i, tabs + 1,
                    s->nd + s->ns, s->nd, s->ns);
    }
    float label;
    int bad;
    em_status st = em_criteo_parse_line(l, n, s->nd, s->ns, &label, r->dense + (size_t)i * s->nd,
                                        r->ids + (size_t)i * s->ns, &r->miss[i], &bad);
    if (st) return FAIL("examples[%d]: %s", i, em_last_error());
    return 0;
}

static int parse_object(em_server *s, em__req *r, int i, json_t *o, char *msg, size_t cap) {
    json_t *dense = json_object_get(o, "dense"), *sparse = json_object_get(o, "sparse");
    if (!json_is_array(dense)) return FAIL("examples[%d]: \"dense\" must be an array of %d numbers", i, s->nd);
    if (!json_is_array(sparse)) return FAIL("examples[%d]: \"sparse\" must be an array of %d hex strings", i, s->ns);
    if ((int)json_array_size(dense) != s->nd)
        return FAIL("examples[%d]: dense has %zu values, expected %d", i, json_array_size(dense), s->nd);
    if ((int)json_array_size(sparse) != s->ns)
        return FAIL("examples[%d]: sparse has %zu values, expected %d", i, json_array_size(sparse), s->ns);
    float *d = r->dense + (size_t)i * s->nd;
    for (int j = 0; j < s->nd; j++) {
        json_t *v = json_array_get(dense, (size_t)j);
        if (json_is_null(v)) d[j] = 0.f;
        else if (json_is_number(v)) {
            double x = json_number_value(v);
            d[j] = x > 0 ? (float)log1p(x) : 0.f;
        } else return FAIL("examples[%d]: dense[%d] (I%d): expected a number or null", i, j, j + 1);
    }
    uint64_t *ids = r->ids + (size_t)i * s->ns, miss = 0;
    for (int f = 0; f < s->ns; f++) {
        json_t *v = json_array_get(sparse, (size_t)f);
        ids[f] = 0;
        if (json_is_null(v) || (json_is_string(v) && json_string_length(v) == 0)) {
            miss |= 1ull << f;
        } else if (!json_is_string(v)) {
            return FAIL("examples[%d]: sparse[%d] (C%d): expected a hex string, \"\" or null", i, f, f + 1);
        } else if (parse_hex(json_string_value(v), json_string_length(v), &ids[f])) {
            size_t n = json_string_length(v), k = n > 40 ? 40 : n;
            const char *t = json_string_value(v);
            while (k < n && ((unsigned char)t[k] & 0xC0) == 0x80) k--; /* quote whole UTF-8 characters */
            return FAIL("examples[%d]: sparse[%d] (C%d): invalid hex '%.*s%s' (1 to 16 hex digits)", i, f, f + 1,
                        (int)k, t, k < n ? "..." : "");
        }
    }
    r->miss[i] = miss;
    return 0;
}

/* "ids": one example id per example, into r->exid. */
static int parse_ids(em__req *r, json_t *ids, size_t n, char *msg, size_t cap) {
    if (!json_is_array(ids)) return FAIL("\"ids\" must be an array of example ids");
    if (json_array_size(ids) != n) return FAIL("\"ids\" has %zu values for %zu examples", json_array_size(ids), n);
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(ids, i);
        if (json_is_integer(v) && json_integer_value(v) >= 0) {
            r->exid[i] = (uint64_t)json_integer_value(v);
            continue;
        }
        const char *p = json_is_string(v) ? json_string_value(v) : NULL;
        size_t len = p ? json_string_length(v) : 0;
        uint64_t x = 0;
        int ok = p && len > 0 && len <= 20;
        for (size_t k = 0; ok && k < len; k++) {
            unsigned d = (unsigned)((unsigned char)p[k] - '0');
            if (d > 9 || x > (UINT64_MAX - d) / 10) ok = 0;
            else x = x * 10 + d;
        }
        if (!ok) return FAIL("ids[%zu]: expected an integer in [0, 2^63) or a decimal string up to 18446744073709551615", i);
        r->exid[i] = x;
    }
    r->has_exid = 1;
    return 0;
}

int em__parse_json(em_server *s, em__req *r, char *msg, size_t cap) {
    r->has_exid = 0, r->vertical = 0;
    json_error_t err;
    json_t *root = json_loadb(r->body, r->body_len, 0, &err);
    if (!root) {
        for (char *t = err.text; *t; t++)
            if ((unsigned char)*t >= 0x80) *t = '?'; /* jansson may quote part of a UTF-8 character */
        return FAIL("malformed JSON at line %d column %d: %s", err.line, err.column, err.text);
    }
    int rc = 0;
    json_t *ex = json_is_object(root) ? json_object_get(root, "examples") : NULL;
    if (!json_is_array(ex)) {
        rc = FAIL("expected an object with an \"examples\" array");
        goto done;
    }
    size_t n = json_array_size(ex);
    if (n == 0) {
        rc = FAIL("examples: empty");
        goto done;
    }
    if (n > (size_t)1 << 30 || em__req_reserve(s, r, (int)n)) {
        rc = (snprintf(msg, cap, "out of memory"), 500);
        goto done;
    }
    json_t *ids = json_object_get(root, "ids"), *vert = json_object_get(root, "vertical");
    if (ids && (rc = parse_ids(r, ids, n, msg, cap))) goto done;
    if (vert) {
        if (!json_is_integer(vert) || json_integer_value(vert) < 0 || json_integer_value(vert) > 0xffffffffLL) {
            rc = FAIL("\"vertical\" must be an integer in [0, 4294967295]");
            goto done;
        }
        r->vertical = (uint32_t)json_integer_value(vert);
    }
    if (s->das && !r->has_exid) {
        rc = FAIL("this server logs its predictions (teacher mode): every request needs \"ids\", one example id per example");
        goto done;
    }
    for (size_t i = 0; i < n && !rc; i++) {
        json_t *e = json_array_get(ex, i);
        if (json_is_string(e)) rc = parse_line(s, r, (int)i, json_string_value(e), json_string_length(e), msg, cap);
        else if (json_is_object(e)) rc = parse_object(s, r, (int)i, e, msg, cap);
        else rc = FAIL("examples[%zu]: expected a TSV line (string) or an object with \"dense\" and \"sparse\"", i);
    }
    if (!rc) r->n = (int)n;
done:
    json_decref(root);
    return rc;
}

#define BIN_MAGIC "EMRQ"
#define BIN_VERSION_MAX 2 /* 1: no ids; 2: a uint64 example id before each record */
#define BIN_HEADER 16

static uint16_t rd16(const char *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}
static uint32_t rd32(const char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

int em__parse_bin(em_server *s, em__req *r, char *msg, size_t cap) {
    const char *p = r->body;
    size_t len = r->body_len;
    r->has_exid = 0, r->vertical = 0;
    if (len < BIN_HEADER) return FAIL("binary request: %zu bytes, shorter than the %d-byte header", len, BIN_HEADER);
    if (memcmp(p, BIN_MAGIC, 4) != 0) return FAIL("binary request: bad magic (expected \"" BIN_MAGIC "\")");
    const unsigned ver = rd16(p + 4);
    if (ver < 1 || ver > BIN_VERSION_MAX) return FAIL("binary request: version %u, expected 1 or 2", ver);
    if (ver == 1 && s->das)
        return FAIL("binary request: this server logs its predictions (teacher mode): send version 2, with example ids");
    int nd = rd16(p + 6), ns = rd16(p + 8);
    if (nd != s->nd || ns != s->ns)
        return FAIL("binary request: %d dense / %d sparse features, the model expects %d / %d", nd, ns, s->nd, s->ns);
    uint32_t n = rd32(p + 12);
    const size_t idb = ver == 2 ? 8 : 0; /* bytes of example id in front of each record */
    size_t rec = idb + 8 + 4 * (size_t)nd + 8 * (size_t)ns;
    if (n == 0) return FAIL("binary request: count is 0");
    if ((len - BIN_HEADER) / rec != n || (len - BIN_HEADER) % rec != 0)
        return FAIL("binary request: %zu bytes, expected %zu for %u examples", len, BIN_HEADER + rec * n, n);
    if (em__req_reserve(s, r, (int)n)) return (snprintf(msg, cap, "out of memory"), 500);
    const uint64_t valid = ns == 64 ? ~0ull : (1ull << ns) - 1;
    for (uint32_t i = 0; i < n; i++) {
        const char *q = p + BIN_HEADER + rec * i;
        if (idb) memcpy(&r->exid[i], q, 8), q += idb;
        uint64_t miss;
        memcpy(&miss, q, 8);
        if (miss & ~valid) return FAIL("binary request: example %u: missing mask has bits beyond %d", i, ns);
        r->miss[i] = miss;
        float *d = r->dense + (size_t)i * nd;
        memcpy(d, q + 8, 4 * (size_t)nd);
        for (int j = 0; j < nd; j++)
            if (!isfinite(d[j])) return FAIL("binary request: example %u: dense[%d] is not finite", i, j);
        memcpy(r->ids + (size_t)i * ns, q + 8 + 4 * (size_t)nd, 8 * (size_t)ns);
    }
    if (ver == 2) r->has_exid = 1, r->vertical = rd16(p + 10);
    r->n = (int)n;
    return 0;
}

int em__format_json(em_server *s, em__req *r) {
    if (grow(&r->out, &r->out_cap, (size_t)r->n * 18 + 96)) return -1;
    char *o = r->out;
    o += sprintf(o, "{\"probabilities\": [");
    for (int i = 0; i < r->n; i++) o += sprintf(o, i ? ", %.9g" : "%.9g", (double)r->prob[i]);
    o += sprintf(o, "], \"model_version\": \"%s\"}\n", r->version);
    r->out_len = (size_t)(o - r->out);
    return 0;
}

int em__format_bin(em__req *r) {
    if (grow(&r->out, &r->out_cap, (size_t)r->n * 4 + 1)) return -1;
    memcpy(r->out, r->prob, (size_t)r->n * 4);
    r->out_len = (size_t)r->n * 4;
    return 0;
}
