/*
 * fuzz_request.c - a libFuzzer target for the inference server's request parsers
 * (src/serve/request.c): every input is the body of a POST /v1/predict (JSON) and,
 * the same bytes again, of a POST /v1/predict.bin (binary) request.
 *
 * Why: the parsers are the server's only code that reads bytes a client controls
 * (libmicrohttpd does the HTTP framing), they write into preallocated slot arrays
 * sized by counts read from those bytes, and an error message may quote them. A
 * crash there is a remote crash of the server.
 *
 * One em_server is made at first use with em_serve_create on a tiny random DLRM (13
 * dense features, 26 tables of 10 rows, D = 4) and never started: no HTTP daemon,
 * no batcher thread. Each input runs the way server.c runs a request: a slot is taken
 * off the free list and reset as slot_get does, its body holds body_len bytes in a
 * buffer with room for one more (on_request's contract; the server never writes a NUL
 * there, so here that byte is not NUL either, and the buffer is exactly body_len + 1
 * bytes of plain malloc so that AddressSanitizer sees any read past it), the parser
 * runs, and the slot goes back. Then:
 *
 *   failure: status 400 (500 is only for out of memory, which does not happen here),
 *            a non-empty message that send_error can put in a JSON body (json_pack
 *            refuses invalid UTF-8).
 *   success: 1 <= n <= cap; every missing bitmask has no bit >= num_sparse; dense
 *            values finite (JSON: log1p(max(x, 0)), so in [0, 710], and a missing
 *            categorical has id 0); JSON: n = the examples array's length, example ids
 *            and vertical as "ids" and "vertical" say; binary: the body is exactly 16 + n
 *            records, each copied verbatim (version 2: with its example id, and the
 *            vertical from the header). The formatter runs on made-up probabilities
 *            (0, 1 and subnormals included) with the longest model_version there can
 *            be: JSON output parses back to the same floats and version, binary output
 *            is the probabilities' bytes. The same body is parsed again in a second
 *            slot with emptied arrays while allocation number k + 1 (k = size % 6)
 *            fails: the answer is 500 "out of memory" or the first parse's result, and
 *            no em_* memory is left behind (leaks of anything else: LeakSanitizer).
 *
 * A violation prints what is wrong and abort()s. Built twice (CMakeLists.txt): as
 * fuzz_request with clang -fsanitize=fuzzer,address,undefined (EMBER_FUZZ=ON,
 * scripts/fuzz.sh), and, in every build, as test_serve_fuzz_corpus with
 * tests/fuzz/replay.c's main(), which replays the committed corpus
 * tests/fuzz/corpus_request/ (one request body per file).
 */
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ember/serve.h"
#include "serve/serve_internal.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define REQUIRE(cond, ...)                                                                \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            fprintf(stderr, "fuzz_request: %s:%d: %s: ", __FILE__, __LINE__, #cond);      \
            fprintf(stderr, __VA_ARGS__);                                                 \
            fputc('\n', stderr);                                                          \
            abort();                                                                      \
        }                                                                                 \
    } while (0)

#define ND 13
#define NT 26
#define BIN_HEADER 16

static em_server *g_s;

static void free_server(void) {
    em_serve_free(g_s);
    g_s = NULL;
}

static void init(void) {
    if (g_s) return;
    em_dlrm_cfg c;
    memset(&c, 0, sizeof c);
    c.num_dense = ND, c.num_tables = NT, c.dim = 4;
    for (int t = 0; t < NT; t++) c.rows[t] = 10;
    c.n_bot = 3, c.bot[0] = ND, c.bot[1] = 8, c.bot[2] = 4;
    c.n_top = 3, c.top[0] = 4 + (NT + 1) * NT / 2, c.top[1] = 8, c.top[2] = 1;
    c.pooling = EM_POOL_SUM;
    c.dense_opt = em_optim_default(EM_OPT_SGD, 0.1f);
    c.sparse_opt = em_optim_default(EM_OPT_SGD, 0.1f);
    c.seed = 7;
    em_dlrm *m;
    em_status st = em_dlrm_create(&m, &c, NULL);
    REQUIRE(st == EM_OK, "em_dlrm_create: %s", em_last_error());
    em_serve_cfg cfg = em_serve_default();
    cfg.port = 0, cfg.threads = 1, cfg.max_conns = 2, cfg.max_batch = 4, cfg.max_wait_us = 0;
    st = em_serve_create(&g_s, m, NULL, &cfg); /* takes the model; nothing listens */
    REQUIRE(st == EM_OK, "em_serve_create: %s", em_last_error());
    REQUIRE(g_s->nd == ND && g_s->ns == NT, "feature counts %d / %d", g_s->nd, g_s->ns);
    atexit(free_server);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    init();
    return 0;
}

/* ------------------------------------------------------------ slots, as server.c */

static em__req *slot_get(em_server *s) {
    pthread_mutex_lock(&s->mu);
    em__req *r = s->free_list;
    if (r) s->free_list = r->next;
    pthread_mutex_unlock(&s->mu);
    if (r) r->next = NULL, r->body_len = 0, r->too_big = 0, r->n = 0;
    return r;
}

static void slot_put(em_server *s, em__req *r) {
    pthread_mutex_lock(&s->mu);
    r->next = s->free_list;
    s->free_list = r;
    pthread_mutex_unlock(&s->mu);
}

/* The body as on_request leaves it, in a malloc'ed buffer of exactly size + 1 bytes
 * (the slot's own buffer is set aside in *saved, see body_restore). */
static void body_set(em__req *r, const uint8_t *data, size_t size, char **saved, size_t *saved_cap) {
    *saved = r->body, *saved_cap = r->body_cap;
    char *b = malloc(size + 1);
    REQUIRE(b, "out of memory");
    if (size) memcpy(b, data, size);
    b[size] = (char)0xA5; /* room for a NUL, which the server does not write */
    r->body = b, r->body_len = size, r->body_cap = size + 1;
}

static void body_restore(em__req *r, char *saved, size_t saved_cap) {
    free(r->body);
    r->body = saved, r->body_cap = saved_cap, r->body_len = 0;
}

/* Free the slot's example and output buffers (those request.c grows), as in a slot that
 * never held a request. */
static void slot_empty(em__req *r) {
    em_free(r->dense), em_free(r->ids), em_free(r->miss), em_free(r->prob), em_free(r->exid);
    em_free(r->line), em_free(r->out);
    r->dense = NULL, r->ids = NULL, r->miss = NULL, r->prob = NULL, r->exid = NULL, r->line = NULL, r->out = NULL;
    r->cap = 0, r->line_cap = 0, r->out_cap = 0, r->out_len = 0;
}

/* ------------------------------------------------------------ checks */

static int parse(em_server *s, em__req *r, int bin, char *msg, size_t cap) {
    msg[0] = 0;
    return bin ? em__parse_bin(s, r, msg, cap) : em__parse_json(s, r, msg, cap);
}

/* A failed parse: what finish_predict sends must be sendable. */
static void check_failure(int rc, const char *msg, size_t cap, int bin) {
    REQUIRE(rc == 400, "%s parser: status %d (%s)", bin ? "binary" : "JSON", rc, msg);
    size_t len = strnlen(msg, cap);
    REQUIRE(len > 0 && len < cap, "%s parser: empty or unterminated message", bin ? "binary" : "JSON");
    json_t *o = json_pack("{s:s}", "error", msg); /* as send_error: needs valid UTF-8 */
    REQUIRE(o, "%s parser: message is not valid UTF-8, send_error would fail: %s", bin ? "binary" : "JSON", msg);
    json_decref(o);
}

static uint32_t rd32(const char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* A successful parse of body[0..len). */
static void check_success(em_server *s, const em__req *r, int bin) {
    const int nd = s->nd, ns = s->ns;
    REQUIRE(r->n >= 1 && r->n <= r->cap, "n = %d, cap = %d", r->n, r->cap);
    const uint64_t valid = ns == 64 ? ~0ull : (1ull << ns) - 1;
    for (int i = 0; i < r->n; i++) {
        REQUIRE(!(r->miss[i] & ~valid), "example %d: missing mask %llx has bits >= %d", i,
                (unsigned long long)r->miss[i], ns);
        for (int j = 0; j < nd; j++) {
            float d = r->dense[(size_t)i * nd + j];
            REQUIRE(isfinite(d), "example %d: dense[%d] = %g", i, j, (double)d);
            if (!bin) REQUIRE(d >= 0.f && d <= 710.f, "example %d: dense[%d] = %g, not log1p(max(x, 0))", i, j, (double)d);
        }
        if (!bin)
            for (int f = 0; f < ns; f++)
                if (r->miss[i] >> f & 1)
                    REQUIRE(r->ids[(size_t)i * ns + f] == 0, "example %d: missing C%d has id %llu", i, f + 1,
                            (unsigned long long)r->ids[(size_t)i * ns + f]);
    }
    if (bin) {
        REQUIRE(r->body_len >= BIN_HEADER && rd32(r->body + 12) == (uint32_t)r->n, "count %u, n %d",
                r->body_len >= BIN_HEADER ? rd32(r->body + 12) : 0, r->n);
        uint16_t ver, vert;
        memcpy(&ver, r->body + 4, 2);
        memcpy(&vert, r->body + 10, 2);
        const size_t idb = ver == 2 ? 8 : 0; /* version 2: a uint64 example id in front of each record */
        REQUIRE(r->has_exid == (ver == 2) && r->vertical == (ver == 2 ? vert : 0u),
                "version %u: has_exid %d, vertical %u", ver, r->has_exid, r->vertical);
        const size_t rec = idb + 8 + 4 * (size_t)nd + 8 * (size_t)ns;
        REQUIRE(r->body_len == BIN_HEADER + rec * (size_t)r->n, "%zu bytes for %d examples (version %u)", r->body_len,
                r->n, ver);
        for (int i = 0; i < r->n; i++) {
            const char *q = r->body + BIN_HEADER + rec * (size_t)i + idb;
            if (idb) REQUIRE(memcmp(&r->exid[i], q - idb, 8) == 0, "example %d: id not copied", i);
            REQUIRE(memcmp(&r->miss[i], q, 8) == 0, "example %d: missing mask not copied", i);
            REQUIRE(memcmp(r->dense + (size_t)i * nd, q + 8, 4 * (size_t)nd) == 0, "example %d: dense not copied", i);
            REQUIRE(memcmp(r->ids + (size_t)i * ns, q + 8 + 4 * (size_t)nd, 8 * (size_t)ns) == 0,
                    "example %d: ids not copied", i);
        }
    } else {
        json_error_t err;
        json_t *root = json_loadb(r->body, r->body_len, 0, &err);
        REQUIRE(root, "accepted, but jansson refuses it now: %s", err.text);
        json_t *ex = json_object_get(root, "examples");
        REQUIRE(json_is_array(ex) && json_array_size(ex) == (size_t)r->n, "n = %d, %zu examples", r->n,
                json_array_size(ex));
        /* example ids: "ids" (integers >= 0 or decimal strings), "vertical" */
        json_t *ids = json_object_get(root, "ids"), *vert = json_object_get(root, "vertical");
        REQUIRE(r->has_exid == (ids != NULL), "has_exid %d with%s \"ids\"", r->has_exid, ids ? "" : "out");
        for (int i = 0; ids && i < r->n; i++) {
            json_t *v = json_array_get(ids, (size_t)i);
            uint64_t want = 0;
            if (json_is_integer(v)) want = (uint64_t)json_integer_value(v);
            else
                for (const char *c = json_string_value(v); c && *c; c++) want = want * 10 + (uint64_t)(*c - '0');
            REQUIRE(r->exid[i] == want, "ids[%d]: %llu, want %llu", i, (unsigned long long)r->exid[i],
                    (unsigned long long)want);
        }
        REQUIRE(r->vertical == (vert ? (uint32_t)json_integer_value(vert) : 0u), "vertical %u", r->vertical);
        json_decref(root);
    }
}

/* Made-up probabilities from the examples, over [0, 1] with 0, 1 and subnormals. */
static void make_probs(em_server *s, em__req *r) {
    for (int i = 0; i < r->n; i++) {
        uint64_t h = r->miss[i] * 0x9E3779B97F4A7C15ull;
        for (int f = 0; f < s->ns; f++) h = (h ^ r->ids[(size_t)i * s->ns + f]) * 0x100000001B3ull;
        double z = (double)(int)(h >> 56) - 128.0; /* [-128, 127] */
        for (int j = 0; j < s->nd; j++) z += 1e-3 * r->dense[(size_t)i * s->nd + j];
        double p = z >= 0 ? 1.0 / (1.0 + exp(-z)) : exp(z) / (1.0 + exp(z));
        r->prob[i] = (float)p;
    }
}

static void check_format(em_server *s, em__req *r, int bin) {
    make_probs(s, r);
    /* the longest model_version: "<step>-r<n>" cut to 31 characters, as em_serve_reload */
    static const char ver[] = "9223372036854775807-r1844674407";
    _Static_assert(sizeof ver == sizeof r->version, "model_version length");
    memcpy(r->version, ver, sizeof ver);
    if (bin) {
        REQUIRE(em__format_bin(r) == 0, "em__format_bin: out of memory");
        REQUIRE(r->out_len == 4 * (size_t)r->n && r->out_len <= r->out_cap, "binary answer of %zu bytes for %d",
                r->out_len, r->n);
        REQUIRE(memcmp(r->out, r->prob, r->out_len) == 0, "binary answer differs from the probabilities");
        return;
    }
    REQUIRE(em__format_json(s, r) == 0, "em__format_json: out of memory");
    REQUIRE(r->out_len < r->out_cap && r->out[r->out_len] == 0, "JSON answer of %zu bytes in %zu", r->out_len,
            r->out_cap);
    REQUIRE(r->out_len > 0 && r->out[r->out_len - 1] == '\n', "JSON answer does not end in a newline");
    json_error_t err;
    json_t *root = json_loadb(r->out, r->out_len, 0, &err);
    REQUIRE(root, "JSON answer does not parse: %s: %s", err.text, r->out);
    json_t *p = json_object_get(root, "probabilities"), *v = json_object_get(root, "model_version");
    REQUIRE(json_is_array(p) && json_array_size(p) == (size_t)r->n, "probabilities: not %d of them", r->n);
    REQUIRE(json_is_string(v) && strcmp(json_string_value(v), r->version) == 0, "model_version differs");
    for (int i = 0; i < r->n; i++) {
        json_t *x = json_array_get(p, (size_t)i);
        REQUIRE(json_is_number(x) && (float)json_number_value(x) == r->prob[i], "probabilities[%d] = %.9g, want %.9g",
                i, json_is_number(x) ? json_number_value(x) : -1.0, (double)r->prob[i]);
    }
    json_decref(root);
}

/* Parse again in slot b with emptied buffers while the (k+1)-th em_* allocation fails. */
static void check_oom(em_server *s, const em__req *a, em__req *b, const uint8_t *data, size_t size, int bin, long k) {
    char *saved, msg[512];
    size_t saved_cap;
    /* size the slot's buffers for n, then empty the ones named here: any other per-example
     * array em__req_reserve grows is then reallocated to its own size, so the bytes in use
     * must come back to `before` whatever the slot holds */
    REQUIRE(em__req_reserve(s, b, a->n) == 0, "em__req_reserve: out of memory");
    slot_empty(b);
    body_set(b, data, size, &saved, &saved_cap);
    size_t before = em_mem_in_use();
    em_mem_fail_after(k);
    int rc = parse(s, b, bin, msg, sizeof msg);
    em_mem_fail_after(-1);
    if (rc) {
        REQUIRE(rc == 500 && strcmp(msg, "out of memory") == 0, "allocation %ld failing: status %d (%s)", k + 1, rc,
                msg);
    } else {
        REQUIRE(b->n == a->n && b->has_exid == a->has_exid && b->vertical == a->vertical,
                "n = %d after allocation failures, %d before", b->n, a->n);
        REQUIRE(!a->has_exid || memcmp(b->exid, a->exid, (size_t)a->n * sizeof(uint64_t)) == 0,
                "example ids differ when parsed in another slot");
        REQUIRE(memcmp(b->dense, a->dense, (size_t)a->n * s->nd * sizeof(float)) == 0 &&
                    memcmp(b->ids, a->ids, (size_t)a->n * s->ns * sizeof(uint64_t)) == 0 &&
                    memcmp(b->miss, a->miss, (size_t)a->n * sizeof(uint64_t)) == 0,
                "examples differ when parsed in another slot");
    }
    slot_empty(b);
    REQUIRE(em_mem_in_use() == before, "%lld bytes of em_* memory left behind (allocation %ld failing)",
            (long long)em_mem_in_use() - (long long)before, k + 1);
    body_restore(b, saved, saved_cap);
}

static void run(em_server *s, const uint8_t *data, size_t size, int bin) {
    em__req *r = slot_get(s), *r2 = slot_get(s);
    REQUIRE(r && r2, "no free slot");
    r->endpoint = r2->endpoint = bin ? EM_SERVE_EP_PREDICT_BIN : EM_SERVE_EP_PREDICT;
    char *saved, msg[512]; /* finish_predict's message buffer */
    size_t saved_cap;
    body_set(r, data, size, &saved, &saved_cap);
    int rc = parse(s, r, bin, msg, sizeof msg);
    if (rc) {
        check_failure(rc, msg, sizeof msg, bin);
    } else {
        check_success(s, r, bin);
        check_format(s, r, bin);
        check_oom(s, r, r2, data, size, bin, (long)(size % 6));
    }
    body_restore(r, saved, saved_cap);
    slot_put(s, r2);
    slot_put(s, r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    init();
    if (size > g_s->cfg.max_body) return 0; /* the server answers 413 without parsing */
    run(g_s, data, size, 0);
    run(g_s, data, size, 1);
    return 0;
}
