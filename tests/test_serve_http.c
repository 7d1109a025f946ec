/*
 * test_serve_http.c - the inference server end to end, in process: a tiny DLRM is
 * trained for a few steps and saved, a server is started on an ephemeral loopback
 * port through the library API, and a minimal HTTP/1.1 client written here (plain
 * sockets, one request per connection, 5 s socket timeouts) talks to it.
 *
 * Checked: JSON predictions (TSV lines and objects) equal em_dlrm_forward's sigmoid
 * on the same examples; concurrent clients (dynamic batching) get the same answers;
 * the binary endpoint; /healthz; /metrics counts; every error path answers the right
 * status with a message and the server keeps serving.
 * Quantized tables (fp16, int8): answers equal em_qbag_forward + em_dlrm_forward_with
 * on the same examples, stay close to fp32, allocate nothing per request, and the
 * table bytes are reported. Hot reload under load: a client thread sends requests
 * without pause while 5 reloads alternate two checkpoints (plus failed ones: a
 * corrupt file, a missing one, other feature counts): no request fails, every answer
 * is one model's prediction and carries that model's version, every version is seen;
 * /admin/reload refuses non-loopback clients (when the host has another IPv4 address).
 * Teacher mode: every prediction of a request with example ids (JSON "ids", binary
 * version 2) lands once in the DAS log, readable while serving and complete after.
 */
#include <arpa/inet.h>
#include <ifaddrs.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include "ember/das.h"
#include "ember/serve.h"
#include "test.h"

#define ND 13
#define NT 26
#define NLINES 24

static char g_ckpt[256];
static uint32_t g_http_addr = INADDR_LOOPBACK; /* where http() connects (host order) */
static char g_lines[NLINES][512];
static float g_want[NLINES]; /* reference probabilities of g_lines */

/* ------------------------------------------------------------ HTTP client */

typedef struct {
    int status;
    char *body; /* NUL-terminated, malloc'ed */
    size_t len;
    char headers[2048];
} http_resp;

/* One request on a fresh connection ("Connection: close"), reading to EOF. extra_hdr
 * may add header lines (each ending in \r\n); body_len = -1 sends no body at all,
 * body_len = -(n + 2) sends n bytes of body without a Content-Length (chunked framing
 * is then the caller's).
 * Returns 0, or -1 on a socket error/timeout. */
static int http(int port, const char *method, const char *path, const char *extra_hdr, const void *body, long body_len,
                http_resp *out) {
    memset(out, 0, sizeof *out);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(g_http_addr);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        close(fd);
        return -1;
    }
    char hdr[1024];
    int hn = snprintf(hdr, sizeof hdr, "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n%s", method, path,
                      extra_hdr ? extra_hdr : "");
    if (body_len >= 0) hn += snprintf(hdr + hn, sizeof hdr - (size_t)hn, "Content-Length: %ld\r\n", body_len);
    if (body_len < -1) body_len = -body_len - 2; /* a raw body, framed by the caller (chunked) */
    hn += snprintf(hdr + hn, sizeof hdr - (size_t)hn, "\r\n");
    size_t total = (size_t)hn + (body_len > 0 ? (size_t)body_len : 0);
    char *req = malloc(total);
    memcpy(req, hdr, (size_t)hn);
    if (body_len > 0) memcpy(req + hn, body, (size_t)body_len);
    for (size_t off = 0; off < total;) {
        ssize_t k = send(fd, req + off, total - off, MSG_NOSIGNAL);
        if (k <= 0) break; /* the server may answer (and close) before reading it all */
        off += (size_t)k;
    }
    free(req);
    size_t cap = 65536, len = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (len + 1 >= cap) buf = realloc(buf, cap *= 2);
        ssize_t k = recv(fd, buf + len, cap - len - 1, 0);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) break;
        len += (size_t)k;
    }
    close(fd);
    buf[len] = 0;
    char *eoh = strstr(buf, "\r\n\r\n");
    if (!eoh || sscanf(buf, "HTTP/1.%*d %d", &out->status) != 1) {
        free(buf);
        return -1;
    }
    size_t hl = (size_t)(eoh - buf);
    snprintf(out->headers, sizeof out->headers, "%.*s", (int)(hl < sizeof out->headers - 1 ? hl : sizeof out->headers - 1), buf);
    out->len = len - hl - 4;
    out->body = malloc(out->len + 1);
    memcpy(out->body, eoh + 4, out->len);
    out->body[out->len] = 0;
    free(buf);
    return 0;
}

static int post_json(int port, const char *json, http_resp *out) {
    return http(port, "POST", "/v1/predict", "Content-Type: application/json\r\n", json, (long)strlen(json), out);
}

/* Parse {"probabilities": [..]} into p (at most n); returns the count or -1. */
static int parse_probs(const char *body, float *p, int n) {
    const char *s = strstr(body, "\"probabilities\"");
    if (!s || !(s = strchr(s, '['))) return -1;
    s++;
    int k = 0;
    while (*s && *s != ']') {
        char *e;
        double v = strtod(s, &e);
        if (e == s) return -1;
        if (k < n) p[k] = (float)v;
        k++;
        s = e;
        while (*s == ',' || *s == ' ') s++;
    }
    return k;
}

/* Append a JSON string literal of a TSV line (tabs as \t). */
static size_t json_line(char *o, const char *line) {
    size_t n = 0;
    o[n++] = '"';
    for (const char *p = line; *p; p++) {
        if (*p == '\t') o[n++] = '\\', o[n++] = 't';
        else o[n++] = *p;
    }
    o[n++] = '"';
    o[n] = 0;
    return n;
}

/* {"examples": [lines[lo..hi)]} into a malloc'ed string. */
static char *examples_json(int lo, int hi) {
    char *o = malloc(64 + (size_t)(hi - lo) * 1200);
    size_t n = (size_t)sprintf(o, "{\"examples\": [");
    for (int i = lo; i < hi; i++) {
        if (i > lo) o[n++] = ',';
        n += json_line(o + n, g_lines[i]);
    }
    sprintf(o + n, "]}");
    return o;
}

/* ------------------------------------------------------------ fixtures */

static em_dlrm_cfg tiny_cfg(void) {
    em_dlrm_cfg c;
    memset(&c, 0, sizeof c);
    c.num_dense = ND, c.num_tables = NT, c.dim = 4;
    for (int t = 0; t < NT; t++) c.rows[t] = 10;
    c.n_bot = 3, c.bot[0] = 13, c.bot[1] = 8, c.bot[2] = 4;
    c.n_top = 3, c.top[0] = 355, c.top[1] = 8, c.top[2] = 1;
    c.pooling = EM_POOL_SUM;
    c.dense_opt = em_optim_default(EM_OPT_SGD, 0.1f);
    c.sparse_opt = em_optim_default(EM_OPT_SGD, 0.1f);
    c.seed = 7;
    return c;
}

/* A batch laid out like the reader's (table-major, modulo rows, missing = empty). */
typedef struct {
    em_batch b;
    float label[NLINES], dense[NLINES * ND];
    int64_t indices[NLINES * NT], offsets[NLINES * NT + 1];
    uint64_t ids[NLINES * NT], miss[NLINES];
} tbatch;

static void tb_finish(tbatch *t, int B, const int64_t *rows) {
    t->b = (em_batch){.B = B, .num_dense = ND, .num_sparse = NT, .label = t->label, .dense = t->dense,
                      .indices = t->indices, .offsets = t->offsets};
    int64_t k = 0;
    t->offsets[0] = 0;
    for (int f = 0; f < NT; f++)
        for (int i = 0; i < B; i++) {
            if (!(t->miss[i] >> f & 1)) t->indices[k++] = (int64_t)(t->ids[i * NT + f] % (uint64_t)rows[f]);
            t->offsets[f * B + i + 1] = k;
        }
}

static float sigm(float z) { return (float)(z >= 0 ? 1.0 / (1.0 + exp(-(double)z)) : exp(z) / (1.0 + exp(z))); }

static void cleanup(void) {
    if (g_ckpt[0]) unlink(g_ckpt);
}

/* Train a few steps, save, build the test lines and their reference answers. */
static int setup(void) {
    static int done = 0;
    if (done) return 0;
    snprintf(g_ckpt, sizeof g_ckpt, "/tmp/ember_test_serve_%d.st", (int)getpid());
    atexit(cleanup);
    em_dlrm_cfg c = tiny_cfg();
    em_dlrm *m;
    if (em_dlrm_create(&m, &c, NULL)) return -1;
    em_rng rng;
    em_rng_seed(&rng, 42);
    tbatch tb;
    for (int step = 0; step < 3; step++) {
        for (int i = 0; i < NLINES; i++) {
            tb.label[i] = (float)(em_rng_u64(&rng) & 1);
            for (int j = 0; j < ND; j++) tb.dense[i * ND + j] = (float)em_rng_uniform(&rng);
            for (int f = 0; f < NT; f++) tb.ids[i * NT + f] = em_rng_u64(&rng);
            tb.miss[i] = 0;
        }
        tb_finish(&tb, NLINES, c.rows);
        if (em_dlrm_train_step(m, &tb.b, NULL, NULL)) return -1;
    }
    em_status st = em_dlrm_save(m, g_ckpt, NULL, 0);
    em_dlrm_free(m);
    if (st) return -1;
    /* lines: some dense and categorical fields empty, mixed-case hex of varying length */
    for (int i = 0; i < NLINES; i++) {
        char *o = g_lines[i];
        size_t n = 0;
        for (int j = 0; j < ND; j++) {
            uint64_t r = em_rng_u64(&rng);
            if (j) o[n++] = '\t';
            if (r % 5) n += (size_t)sprintf(o + n, "%d", (int)(r >> 8) % (j == 0 ? 5000 : 300) - 2);
        }
        for (int f = 0; f < NT; f++) {
            uint64_t r = em_rng_u64(&rng);
            o[n++] = '\t';
            if (r % 7) n += (size_t)sprintf(o + n, (r & 8) ? "%llx" : "%llX", (unsigned long long)(r >> (r % 40)));
        }
        o[n] = 0;
    }
    /* the reference: the same checkpoint, loaded, on a hand-made batch of the lines */
    if (em_dlrm_load(&m, g_ckpt, NULL, NULL)) return -1;
    for (int i = 0; i < NLINES; i++) {
        char l[520];
        int k = snprintf(l, sizeof l, "0\t%s", g_lines[i]);
        if (em_criteo_parse_line(l, (size_t)k, ND, NT, &tb.label[i], &tb.dense[i * ND], &tb.ids[i * NT], &tb.miss[i], NULL))
            return -1;
    }
    tb_finish(&tb, NLINES, c.rows);
    float logits[NLINES];
    st = em_dlrm_forward(m, &tb.b, logits, NULL);
    em_dlrm_free(m);
    if (st) return -1;
    for (int i = 0; i < NLINES; i++) g_want[i] = sigm(logits[i]);
    done = 1;
    return 0;
}

static em_server *start_server_tables(int max_batch, int max_wait_us, size_t max_body, em_qtype tables) {
    if (setup()) return NULL;
    em_pool *pool;
    em_dlrm *m;
    if (em_pool_create(&pool, 1)) return NULL;
    if (em_dlrm_load(&m, g_ckpt, NULL, pool)) {
        em_pool_free(pool);
        return NULL;
    }
    em_serve_cfg cfg = em_serve_default();
    cfg.port = 0, cfg.threads = 4, cfg.max_batch = max_batch, cfg.max_wait_us = max_wait_us, cfg.max_body = max_body;
    cfg.tables = tables, cfg.model_path = g_ckpt;
    em_server *s;
    if (em_serve_create(&s, m, pool, &cfg)) return NULL;
    if (em_serve_start(s)) {
        em_serve_free(s);
        return NULL;
    }
    return s;
}

static em_server *start_server(int max_batch, int max_wait_us, size_t max_body) {
    return start_server_tables(max_batch, max_wait_us, max_body, EM_QT_FP32);
}

/* Probabilities of the NLINES lines (one batch) from checkpoint path, with the given
 * tables; the step count in *step. */
static int reference_probs(const char *path, em_qtype qt, float *p, int64_t *step) {
    em_dlrm *m;
    if (em_dlrm_load(&m, path, NULL, NULL)) return -1;
    if (step) *step = em_dlrm_step_count(m);
    static tbatch tb;
    for (int i = 0; i < NLINES; i++) {
        char l[520];
        int k = snprintf(l, sizeof l, "0\t%s", g_lines[i]);
        if (em_criteo_parse_line(l, (size_t)k, ND, NT, &tb.label[i], &tb.dense[i * ND], &tb.ids[i * NT], &tb.miss[i], NULL))
            return -1;
    }
    tb_finish(&tb, NLINES, em_dlrm_config(m)->rows);
    float logits[NLINES];
    em_status st;
    if (qt == EM_QT_FP32) {
        st = em_dlrm_forward(m, &tb.b, logits, NULL);
    } else {
        em_qbag *q;
        static float pooled[NLINES * NT * 64];
        st = em_qbag_create(&q, em_dlrm_embbag(m), qt, EM_POOL_SUM, NULL);
        if (!st) st = em_qbag_forward(q, pooled, tb.b.indices, tb.b.offsets, NULL, NLINES, NULL);
        if (!st) st = em_dlrm_forward_with(m, &tb.b, pooled, logits, NULL);
        em_qbag_free(q);
    }
    em_dlrm_free(m);
    if (st) return -1;
    for (int i = 0; i < NLINES; i++) p[i] = sigm(logits[i]);
    return 0;
}

/* ------------------------------------------------------------ tests */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void test_predict_json(void) {
    em_server *s = start_server(64, 0, 1 << 20);
    CHECK(s);
    if (!s) return;
    int port = em_serve_port(s);
    CHECK(port > 0);
    /* all lines in one request, then one line per request */
    char *j = examples_json(0, NLINES);
    http_resp r;
    CHECK(post_json(port, j, &r) == 0);
    free(j);
    CHECK(r.status == 200);
    CHECK(strstr(r.headers, "application/json") != NULL);
    CHECK(strstr(r.body, "\"model_version\": \"3\"") != NULL);
    float p[NLINES];
    CHECK(parse_probs(r.body, p, NLINES) == NLINES);
    for (int i = 0; i < NLINES; i++) CHECK_NEAR(p[i], g_want[i], 1e-6);
    free(r.body);
    for (int i = 0; i < NLINES; i += 5) {
        j = examples_json(i, i + 1);
        CHECK(post_json(port, j, &r) == 0);
        free(j);
        CHECK(r.status == 200 && parse_probs(r.body, p, 1) == 1);
        CHECK_NEAR(p[0], g_want[i], 1e-6);
        free(r.body);
    }
    /* the object form of line 0 and a line with its label column: same answers */
    {
        char obj[4096], *o = obj;
        char copy[512];
        snprintf(copy, sizeof copy, "%s", g_lines[0]);
        char *fields[ND + NT], *sp = copy;
        for (int k = 0; k < ND + NT; k++) fields[k] = strsep(&sp, "\t");
        o += sprintf(o, "{\"examples\": [{\"dense\": [");
        for (int k = 0; k < ND; k++) o += sprintf(o, "%s%s", k ? "," : "", *fields[k] ? fields[k] : "null");
        o += sprintf(o, "], \"sparse\": [");
        for (int k = 0; k < NT; k++)
            o += *fields[ND + k] ? sprintf(o, "%s\"%s\"", k ? "," : "", fields[ND + k]) : sprintf(o, "%s%s", k ? "," : "", k % 2 ? "null" : "\"\"");
        char l1[520];
        snprintf(l1, sizeof l1, "1\t%s", g_lines[1]); /* with its label column */
        o += sprintf(o, "]}, ");
        o += json_line(o, l1);
        sprintf(o, "]}");
        CHECK(post_json(port, obj, &r) == 0);
        CHECK(r.status == 200);
        CHECK(parse_probs(r.body, p, 2) == 2);
        CHECK_NEAR(p[0], g_want[0], 1e-6);
        CHECK_NEAR(p[1], g_want[1], 1e-6);
        if (r.status != 200) fprintf(stderr, "  body: %s\n", r.body);
        free(r.body);
    }
    /* a rough single-request latency figure on loopback (not a benchmark) */
    j = examples_json(3, 4);
    enum { REPS = 200 };
    double lat[REPS];
    for (int k = 0; k < REPS; k++) {
        double t0 = em_now();
        int ok = post_json(port, j, &r) == 0;
        lat[k] = em_now() - t0;
        if (ok) free(r.body);
    }
    qsort(lat, REPS, sizeof lat[0], cmp_double);
    fprintf(stderr, "  one-example JSON request, new connection each, %d sequential: p50 %.0f us, p99 %.0f us\n", REPS,
            lat[REPS / 2] * 1e6, lat[REPS * 99 / 100] * 1e6);
    free(j);
    em_serve_free(s);
}

typedef struct {
    int port, id, failures, n;
} client_arg;

static void *client(void *arg) {
    client_arg *a = arg;
    for (int k = 0; k < a->n; k++) {
        int lo = (a->id * 7 + k * 3) % NLINES, cnt = 1 + (k + a->id) % 3;
        if (lo + cnt > NLINES) lo = NLINES - cnt;
        char *j = examples_json(lo, lo + cnt);
        http_resp r;
        float p[3];
        if (post_json(a->port, j, &r) != 0 || r.status != 200 || parse_probs(r.body, p, 3) != cnt) a->failures++;
        else
            for (int i = 0; i < cnt; i++)
                if (!(fabs(p[i] - g_want[lo + i]) <= 1e-6)) a->failures++;
        free(r.body);
        free(j);
    }
    return NULL;
}

/* nc client threads of `per` requests each against port; returns their failures. */
static int run_clients(int port, int nc, int per) {
    pthread_t th[16];
    client_arg a[16];
    if (nc > 16) return -1;
    for (int i = 0; i < nc; i++) {
        a[i] = (client_arg){port, i, 0, per};
        pthread_create(&th[i], NULL, client, &a[i]);
    }
    int fails = 0;
    for (int i = 0; i < nc; i++) {
        pthread_join(th[i], NULL);
        fails += a[i].failures;
    }
    return fails;
}

static void test_concurrent_batching(void) {
    em_server *s = start_server(16, 3000, 1 << 20);
    CHECK(s);
    if (!s) return;
    enum { NC = 6 };
    CHECK(run_clients(em_serve_port(s), NC, 15) == 0);
    em_serve_stats st;
    em_serve_stats_get(s, &st);
    CHECK(st.requests[EM_SERVE_EP_PREDICT] == NC * 15);
    CHECK(st.errors == 0);
    CHECK(st.max_batch_seen <= 16);
    fprintf(stderr, "  %d requests in %llu forward passes (largest %llu examples)\n", NC * 15,
            (unsigned long long)st.batches, (unsigned long long)st.max_batch_seen);
    /* a request bigger than max_batch runs in chunks and still answers right */
    char *j = examples_json(0, NLINES);
    http_resp r;
    float p[NLINES];
    CHECK(post_json(em_serve_port(s), j, &r) == 0 && r.status == 200 && parse_probs(r.body, p, NLINES) == NLINES);
    for (int i = 0; i < NLINES; i++) CHECK_NEAR(p[i], g_want[i], 1e-6);
    free(r.body);
    free(j);
    em_serve_free(s);
}

/* One HTTP worker still batches concurrent requests: a request that goes to the
 * batcher suspends its connection (the worker goes back to its other connections)
 * instead of blocking the worker, so requests in flight are not bounded by threads.
 * inline_max 0 sends every request to the batcher, whose long max_wait gathers. */
static void test_one_worker_batches(void) {
    if (setup()) {
        CHECK(0);
        return;
    }
    em_pool *pool;
    em_dlrm *m;
    CHECK_OK(em_pool_create(&pool, 1));
    CHECK_OK(em_dlrm_load(&m, g_ckpt, NULL, pool));
    em_serve_cfg cfg = em_serve_default();
    cfg.port = 0, cfg.threads = 1, cfg.max_conns = 8, cfg.max_batch = 64, cfg.max_wait_us = 20000, cfg.inline_max = 0;
    em_server *s;
    CHECK_OK(em_serve_create(&s, m, pool, &cfg));
    CHECK_OK(em_serve_start(s));
    enum { NC = 6, PER = 8 };
    CHECK(run_clients(em_serve_port(s), NC, PER) == 0);
    em_serve_stats st;
    em_serve_stats_get(s, &st);
    CHECK(st.requests[EM_SERVE_EP_PREDICT] == NC * PER);
    CHECK(st.errors == 0);
    /* blocking workers would run one request per pass: NC * PER passes */
    CHECK(st.batches < NC * PER);
    fprintf(stderr, "  one worker: %d requests in %llu forward passes (largest %llu examples)\n", NC * PER,
            (unsigned long long)st.batches, (unsigned long long)st.max_batch_seen);
    /* stopping with requests in flight: no hang, no crash, nothing leaked (ASan) */
    pthread_t th[NC];
    client_arg a[NC];
    for (int i = 0; i < NC; i++) {
        a[i] = (client_arg){em_serve_port(s), i, 0, PER};
        pthread_create(&th[i], NULL, client, &a[i]);
    }
    usleep(30000);
    em_serve_free(s);
    for (int i = 0; i < NC; i++) pthread_join(th[i], NULL);
}

static void put_u16(char *p, uint16_t v) { memcpy(p, &v, 2); }
static void put_u32(char *p, uint32_t v) { memcpy(p, &v, 4); }

static void test_predict_bin(void) {
    em_server *s = start_server(64, 0, 1 << 20);
    CHECK(s);
    if (!s) return;
    const size_t rec = 8 + 4 * ND + 8 * NT;
    char *body = malloc(16 + rec * NLINES);
    memcpy(body, "EMRQ", 4);
    put_u16(body + 4, 1), put_u16(body + 6, ND), put_u16(body + 8, NT), put_u16(body + 10, 0);
    put_u32(body + 12, NLINES);
    for (int i = 0; i < NLINES; i++) {
        char l[520];
        float label, dense[ND];
        uint64_t ids[NT], miss;
        int k = snprintf(l, sizeof l, "0\t%s", g_lines[i]);
        CHECK_OK(em_criteo_parse_line(l, (size_t)k, ND, NT, &label, dense, ids, &miss, NULL));
        char *q = body + 16 + rec * (size_t)i;
        memcpy(q, &miss, 8);
        memcpy(q + 8, dense, sizeof dense);
        memcpy(q + 8 + sizeof dense, ids, sizeof ids);
    }
    http_resp r;
    long len = (long)(16 + rec * NLINES);
    CHECK(http(em_serve_port(s), "POST", "/v1/predict.bin", NULL, body, len, &r) == 0);
    CHECK(r.status == 200 && r.len == NLINES * 4);
    if (r.len == NLINES * 4)
        for (int i = 0; i < NLINES; i++) {
            float v;
            memcpy(&v, r.body + 4 * i, 4);
            CHECK_NEAR(v, g_want[i], 1e-6);
        }
    free(r.body);
    /* broken requests: truncated, bad magic, wrong counts, non-finite dense */
    CHECK(http(em_serve_port(s), "POST", "/v1/predict.bin", NULL, body, len - 3, &r) == 0);
    CHECK(r.status == 400 && strstr(r.body, "expected"));
    free(r.body);
    body[0] = 'X';
    CHECK(http(em_serve_port(s), "POST", "/v1/predict.bin", NULL, body, len, &r) == 0);
    CHECK(r.status == 400 && strstr(r.body, "magic"));
    free(r.body);
    body[0] = 'E';
    put_u16(body + 6, 12);
    CHECK(http(em_serve_port(s), "POST", "/v1/predict.bin", NULL, body, len, &r) == 0);
    CHECK(r.status == 400 && strstr(r.body, "model expects 13 / 26"));
    free(r.body);
    put_u16(body + 6, ND);
    float inf = INFINITY;
    memcpy(body + 16 + 8 + 4, &inf, 4);
    CHECK(http(em_serve_port(s), "POST", "/v1/predict.bin", NULL, body, len, &r) == 0);
    CHECK(r.status == 400 && strstr(r.body, "not finite"));
    free(r.body);
    free(body);
    em_serve_free(s);
}

/* status + a substring of the body */
static void expect(int port, const char *method, const char *path, const char *body, long len, int status,
                   const char *needle) {
    http_resp r;
    int rc = http(port, method, path, len >= 0 ? "Content-Type: application/json\r\n" : NULL, body, len, &r);
    CHECK(rc == 0);
    if (rc) return;
    CHECK(r.status == status);
    CHECK(strstr(r.body, needle) != NULL);
    if (r.status != status || !strstr(r.body, needle))
        fprintf(stderr, "  %s %s: got %d '%s', want %d '%s'\n", method, path, r.status, r.body, status, needle);
    free(r.body);
}

static void expect_json(int port, const char *json, int status, const char *needle) {
    expect(port, "POST", "/v1/predict", json, (long)strlen(json), status, needle);
}

static void test_errors_and_metrics(void) {
    em_server *s = start_server(64, 0, 4096);
    CHECK(s);
    if (!s) return;
    int port = em_serve_port(s);
    expect(port, "GET", "/healthz", NULL, -1, 200, "ok");
    expect_json(port, "{\"examples\": [", 400, "malformed JSON");
    expect_json(port, "[1, 2]", 400, "examples\\\" array");
    expect_json(port, "{\"examples\": []}", 400, "empty");
    expect_json(port, "{\"examples\": [42]}", 400, "examples[0]: expected a TSV line");
    expect_json(port, "{\"examples\": [\"1\\t2\\t3\"]}", 400, "examples[0]: wrong field count: 3 fields, expected 39");
    /* examples[1]: field 15 (C2) is bad hex */
    {
        char j[4096], line[512];
        snprintf(line, sizeof line, "%s", g_lines[2]);
        char *f = line;
        for (int k = 0; k < ND + 1; k++) f = strchr(f, '\t') + 1; /* start of C2 */
        char *e = strchr(f, '\t');
        char fixed[600];
        snprintf(fixed, sizeof fixed, "%.*s12zz%s", (int)(f - line), line, e);
        size_t n = (size_t)sprintf(j, "{\"examples\": [");
        n += json_line(j + n, g_lines[0]);
        j[n++] = ',';
        n += json_line(j + n, fixed);
        sprintf(j + n, "]}");
        expect_json(port, j, 400, "examples[1]: field 15 (C2): invalid hex '12zz'");
    }
    /* objects: wrong counts, wrong types */
    expect_json(port, "{\"examples\": [{\"dense\": [1,2], \"sparse\": []}]}", 400, "dense has 2 values, expected 13");
    {
        char j[2048];
        char *o = j + sprintf(j, "{\"examples\": [{\"dense\": [1,2,3,4,5,6,7,8,9,10,11,12,null], \"sparse\": [");
        for (int k = 0; k < NT; k++) o += sprintf(o, "%s\"%s\"", k ? "," : "", k == 4 ? "xyz" : "a1");
        sprintf(o, "]}]}");
        expect_json(port, j, 400, "examples[0]: sparse[4] (C5): invalid hex 'xyz'");
        j[strlen(j) - 4] = 0;
        strcat(j, ", \"a1\"]}]}");
        expect_json(port, j, 400, "sparse has 27 values, expected 26");
    }
    expect_json(port, "{\"examples\": [{\"dense\": \"no\", \"sparse\": []}]}", 400, "dense\\\" must be an array of 13");
    /* too large: Content-Length over the limit (no body sent) */
    {
        http_resp r;
        CHECK(http(port, "POST", "/v1/predict", "Content-Length: 5000\r\n", "", -1, &r) == 0);
        CHECK(r.status == 413 && strstr(r.body, "limit of 4096"));
        free(r.body);
    }
    /* too large, found while reading a chunked body (no Content-Length) */
    {
        char *big = malloc(8192);
        size_t n = 0;
        for (int k = 0; k < 3; k++) {
            n += (size_t)sprintf(big + n, "7d0\r\n");
            memset(big + n, ' ', 2000), n += 2000;
            n += (size_t)sprintf(big + n, "\r\n");
        }
        n += (size_t)sprintf(big + n, "0\r\n\r\n");
        http_resp r;
        CHECK(http(port, "POST", "/v1/predict", "Transfer-Encoding: chunked\r\n", big, -(long)n - 2, &r) == 0);
        CHECK(r.status == 413 && strstr(r.body, "over the limit of 4096"));
        free(r.body);
        free(big);
    }
    expect(port, "GET", "/v1/predict", NULL, -1, 405, "use POST");
    expect(port, "PUT", "/v1/predict.bin", "", 0, 405, "use POST");
    expect(port, "POST", "/healthz", "", 0, 405, "use GET");
    expect(port, "GET", "/nope", NULL, -1, 404, "no such endpoint");
    /* still serving */
    char *j = examples_json(5, 7);
    http_resp r;
    float p[2];
    CHECK(post_json(port, j, &r) == 0 && r.status == 200 && parse_probs(r.body, p, 2) == 2);
    CHECK_NEAR(p[0], g_want[5], 1e-6);
    CHECK_NEAR(p[1], g_want[6], 1e-6);
    free(r.body);
    free(j);
    /* metrics: predict got 10 x 400, 2 x 413, 405 and one good request; predict_bin a 405;
     * healthz a 200 and a 405 */
    CHECK(http(port, "GET", "/metrics", NULL, NULL, -1, &r) == 0);
    CHECK(r.status == 200);
    CHECK(strstr(r.body, "ember_requests_total{endpoint=\"predict\"} 14\n") != NULL);
    CHECK(strstr(r.body, "ember_requests_total{endpoint=\"predict_bin\"} 1\n") != NULL);
    CHECK(strstr(r.body, "ember_requests_total{endpoint=\"healthz\"} 2\n") != NULL);
    CHECK(strstr(r.body, "ember_requests_total{endpoint=\"other\"} 1\n") != NULL);
    CHECK(strstr(r.body, "ember_request_errors_total{code=\"400\"} 10\n") != NULL);
    CHECK(strstr(r.body, "ember_request_errors_total{code=\"413\"} 2\n") != NULL);
    CHECK(strstr(r.body, "ember_request_errors_total{code=\"405\"} 3\n") != NULL);
    CHECK(strstr(r.body, "ember_request_errors_total{code=\"404\"} 1\n") != NULL);
    CHECK(strstr(r.body, "ember_request_latency_seconds_bucket{le=\"+Inf\"} 15\n") != NULL);
    CHECK(strstr(r.body, "ember_request_latency_seconds_count 15\n") != NULL);
    /* one forward pass, of 2 examples (the warm-up pass is not counted) */
    CHECK(strstr(r.body, "ember_batch_size_bucket{le=\"2\"} 1\n") != NULL);
    CHECK(strstr(r.body, "ember_batch_size_count 1\n") != NULL);
    CHECK(strstr(r.body, "ember_model_step 3\n") != NULL);
    CHECK(strstr(r.body, "# TYPE ember_request_latency_seconds histogram") != NULL);
    free(r.body);
    em_serve_free(s);
}

/* Steady state allocates nothing of ember's per request (both endpoints), and the
 * server frees everything it allocated. */
static void test_no_alloc_no_leak(void) {
    if (setup()) {
        CHECK(0);
        return;
    }
    size_t before = em_mem_in_use();
    em_server *s = start_server(32, 0, 1 << 20);
    CHECK(s);
    if (!s) return;
    int port = em_serve_port(s);
    char *j = examples_json(0, 8);
    const size_t rec = 8 + 4 * ND + 8 * NT;
    char bin[16 + 268 * 4];
    memset(bin, 0, sizeof bin);
    memcpy(bin, "EMRQ", 4);
    put_u16(bin + 4, 1), put_u16(bin + 6, ND), put_u16(bin + 8, NT), put_u32(bin + 12, 4);
    for (int i = 0; i < 4; i++) {
        uint64_t id = 0x1234567ull * (uint64_t)(i + 1);
        for (int f = 0; f < NT; f++) memcpy(bin + 16 + rec * (size_t)i + 8 + 4 * ND + 8 * (size_t)f, &id, 8);
    }
    http_resp r;
    for (int round = 0; round < 2; round++) { /* the first round may grow slot buffers */
        size_t allocs = em_mem_allocs();
        for (int k = 0; k < 10; k++) {
            CHECK(post_json(port, j, &r) == 0 && r.status == 200);
            free(r.body);
            CHECK(http(port, "POST", "/v1/predict.bin", NULL, bin, (long)sizeof bin, &r) == 0 && r.status == 200 &&
                  r.len == 16);
            free(r.body);
        }
        if (round == 1) CHECK(em_mem_allocs() == allocs);
    }
    free(j);
    em_serve_free(s);
    CHECK(em_mem_in_use() == before);
}

static void test_bad_config(void) {
    if (setup()) {
        CHECK(0);
        return;
    }
    em_dlrm *m;
    CHECK_OK(em_dlrm_load(&m, g_ckpt, NULL, NULL));
    em_serve_cfg cfg = em_serve_default();
    cfg.bind = "not-an-address";
    em_server *s = (em_server *)1;
    CHECK(em_serve_create(&s, m, NULL, &cfg) == EM_ERR_INVALID && s == NULL); /* frees m */
    CHECK(strstr(em_last_error(), "not-an-address") != NULL);
    CHECK_OK(em_dlrm_load(&m, g_ckpt, NULL, NULL));
    cfg = em_serve_default();
    cfg.max_batch = 0;
    CHECK(em_serve_create(&s, m, NULL, &cfg) == EM_ERR_INVALID);
    CHECK_OK(em_dlrm_load(&m, g_ckpt, NULL, NULL));
    cfg = em_serve_default();
    cfg.max_body = ((size_t)1 << 31) + 1;
    CHECK(em_serve_create(&s, m, NULL, &cfg) == EM_ERR_INVALID && strstr(em_last_error(), "max_body"));
    /* a port in use */
    em_server *a = start_server(8, 0, 1 << 20);
    CHECK(a);
    if (!a) return;
    CHECK_OK(em_dlrm_load(&m, g_ckpt, NULL, NULL));
    cfg = em_serve_default();
    cfg.port = em_serve_port(a);
    CHECK_OK(em_serve_create(&s, m, NULL, &cfg));
    CHECK(em_serve_start(s) == EM_ERR_IO);
    em_serve_free(s);
    em_serve_stop(a);
    em_serve_stop(a); /* idempotent */
    em_serve_free(a);
    em_serve_free(NULL);
}

/* em_dlrm_forward_with on the model's own pooling equals em_dlrm_forward bitwise. */
static void test_forward_with(void) {
    CHECK(setup() == 0);
    em_dlrm *m;
    CHECK_OK(em_dlrm_load(&m, g_ckpt, NULL, NULL));
    static tbatch tb;
    em_rng rng;
    em_rng_seed(&rng, 5);
    for (int i = 0; i < NLINES; i++) {
        for (int j = 0; j < ND; j++) tb.dense[i * ND + j] = (float)em_rng_uniform(&rng);
        for (int f = 0; f < NT; f++) tb.ids[i * NT + f] = em_rng_u64(&rng);
        tb.miss[i] = em_rng_u64(&rng) & em_rng_u64(&rng);
    }
    tb_finish(&tb, NLINES, em_dlrm_config(m)->rows);
    float a[NLINES], b[NLINES], pooled[NLINES * NT * 4];
    CHECK_OK(em_dlrm_forward(m, &tb.b, a, NULL));
    CHECK_OK(em_embbag_forward(em_dlrm_embbag(m), pooled, tb.b.indices, tb.b.offsets, NULL, NLINES, NULL));
    CHECK_OK(em_dlrm_forward_with(m, &tb.b, pooled, b, NULL));
    CHECK(memcmp(a, b, sizeof a) == 0);
    CHECK(em_dlrm_forward_with(m, &tb.b, NULL, b, NULL) == EM_ERR_INVALID);
    /* released tables: the fp32 forward and saving refuse, forward_with still works */
    em_dlrm_release_tables(m);
    CHECK(em_dlrm_embbag(m) == NULL && em_dlrm_param(m, "emb.0.weight", 0, NULL) == NULL);
    CHECK(em_dlrm_forward(m, &tb.b, b, NULL) == EM_ERR_INVALID);
    CHECK(em_dlrm_save(m, "/tmp/ember_test_never_written.st", NULL, 0) == EM_ERR_INVALID);
    CHECK_OK(em_dlrm_forward_with(m, &tb.b, pooled, b, NULL));
    CHECK(memcmp(a, b, sizeof a) == 0);
    em_dlrm_free(m);
}

/* A small request that finds the server idle runs at once on its HTTP thread
 * (inline_max): it does not wait max_wait_us for company; a larger one goes through
 * the batcher and does. */
static void test_inline_when_idle(void) {
    em_server *s = start_server(64, 1500000, 1 << 20); /* max_wait 1.5 s */
    CHECK(s);
    if (!s) return;
    const int port = em_serve_port(s);
    http_resp r;
    float p[NLINES];
    for (int i = 0; i < 3; i++) {
        char *j = examples_json(i, i + 1);
        const double t0 = em_now();
        CHECK(post_json(port, j, &r) == 0);
        CHECK(em_now() - t0 < 1.0);
        free(j);
        CHECK(r.status == 200 && parse_probs(r.body, p, 1) == 1);
        CHECK_NEAR(p[0], g_want[i], 1e-6);
        free(r.body);
    }
    char *j = examples_json(0, 20); /* over inline_max (16): batched, waits max_wait */
    const double t0 = em_now();
    CHECK(post_json(port, j, &r) == 0);
    CHECK(em_now() - t0 >= 1.4);
    free(j);
    CHECK(r.status == 200 && parse_probs(r.body, p, 20) == 20);
    for (int i = 0; i < 20; i++) CHECK_NEAR(p[i], g_want[i], 1e-6);
    free(r.body);
    em_serve_stats st;
    em_serve_stats_get(s, &st);
    CHECK(st.examples == 23);
    em_serve_free(s);
}

/* em_infer (the server's forward) against em_dlrm_forward: equal within float rounding
 * for batches of 1 to 300 on 1, 2 and 3 threads, with D = 16 (the AVX-512 Gram-matrix
 * interaction: 26 tables, rows past 16 with 32 columns; 9 tables, 16 columns) and D = 4
 * (em_vdot), layer widths that are not multiples of 32, the logit's dot product over
 * K = 17 (a masked tail), 32 and 7 (a tail only); with AVX-512 an example's logit is
 * the same bits in every batch and thread count; the caller's pooled embeddings give
 * the same bits as pooling inside; a bad index is refused. nt <= NT tables, last_k:
 * the last layer's width of input. */
static void check_infer(int D, int nt, int last_k) {
    em_dlrm_cfg c = tiny_cfg();
    c.dim = D, c.num_tables = nt;
    for (int t = 0; t < nt; t++) c.rows[t] = 50 + t;
    c.n_bot = 4, c.bot[0] = ND, c.bot[1] = 40, c.bot[2] = 24, c.bot[3] = D;
    c.n_top = 4, c.top[0] = em_dot_interact_out_dim(nt, D), c.top[1] = 50, c.top[2] = last_k, c.top[3] = 1;
    em_dlrm *m;
    CHECK_OK(em_dlrm_create(&m, &c, NULL));
    enum { BMAX = 300 };
    static float dense[BMAX * ND], want[BMAX], got[BMAX], alone[BMAX], pooled[BMAX * NT * 16];
    static int64_t idx[BMAX * NT], off[BMAX * NT + 1];
    em_rng rng;
    em_rng_seed(&rng, 11);
    for (int i = 0; i < BMAX * ND; i++) dense[i] = (float)em_rng_uniform(&rng) * 3.f;
    /* the batch's examples are examples lo .. lo + B of one pool of BMAX: ids are a
     * function of (example, table); every 7th bag is empty */
    const int sizes[] = {1, 5, 13, 24, 25, 97, 300};
    for (int nth = 1; nth <= 3; nth++) {
        em_pool *pool;
        CHECK_OK(em_pool_create(&pool, nth));
        em_infer *inf;
        CHECK_OK(em_infer_create(&inf, m, 64, nth));
        for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
            const int B = sizes[si], lo = B == BMAX ? 0 : 3;
            int64_t k = 0;
            off[0] = 0;
            for (int t = 0; t < nt; t++)
                for (int i = 0; i < B; i++) {
                    const uint64_t e = (uint64_t)(lo + i);
                    if ((e + (uint64_t)t) % 7) idx[k++] = (int64_t)(em_mix64(e * 131 + (uint64_t)t) % (uint64_t)c.rows[t]);
                    off[(size_t)t * B + i + 1] = k;
                }
            em_batch b = {.B = B, .num_dense = ND, .num_sparse = nt, .dense = dense + (size_t)lo * ND, .indices = idx,
                          .offsets = off};
            CHECK_OK(em_dlrm_forward(m, &b, want, NULL));
            CHECK_OK(em_infer_forward(inf, &b, NULL, got, pool));
            int close = 1;
            for (int i = 0; i < B; i++) close &= fabsf(got[i] - want[i]) <= 1e-5f * (1.f + fabsf(want[i]));
            CHECK(close);
            CHECK_OK(em_embbag_forward(em_dlrm_embbag(m), pooled, idx, off, NULL, B, NULL));
            CHECK_OK(em_infer_forward(inf, &b, pooled, want, pool));
            CHECK(memcmp(want, got, (size_t)B * sizeof(float)) == 0);
#ifdef __AVX512F__
            if (B == BMAX && nth == 1) memcpy(alone, got, sizeof alone);
            else if (B == BMAX) CHECK(memcmp(alone, got, sizeof alone) == 0);
#endif
        }
        em_infer_free(inf);
        em_pool_free(pool);
    }
#ifdef __AVX512F__
    /* example 3 alone, and examples 3.. in a batch of 97, against the batch of 300 */
    em_infer *inf;
    CHECK_OK(em_infer_create(&inf, m, 1, 1));
    for (int B = 1; B <= 97; B += 96) {
        int64_t k = 0;
        off[0] = 0;
        for (int t = 0; t < nt; t++)
            for (int i = 0; i < B; i++) {
                const uint64_t e = (uint64_t)(3 + i);
                if ((e + (uint64_t)t) % 7) idx[k++] = (int64_t)(em_mix64(e * 131 + (uint64_t)t) % (uint64_t)c.rows[t]);
                off[(size_t)t * B + i + 1] = k;
            }
        em_batch b = {.B = B, .num_dense = ND, .num_sparse = nt, .dense = dense + 3 * ND, .indices = idx, .offsets = off};
        CHECK_OK(em_infer_forward(inf, &b, NULL, got, NULL));
        CHECK(memcmp(got, alone + 3, (size_t)B * sizeof(float)) == 0);
    }
    em_infer_free(inf);
#endif
    /* an index out of range is refused, naming it */
    {
        em_infer *inf2;
        CHECK_OK(em_infer_create(&inf2, m, 4, 1));
        int64_t k = 0;
        off[0] = 0;
        for (int t = 0; t < nt; t++) idx[k] = t == 5 ? c.rows[t] : 0, k++, off[t + 1] = k;
        em_batch b = {.B = 1, .num_dense = ND, .num_sparse = nt, .dense = dense, .indices = idx, .offsets = off};
        CHECK(em_infer_forward(inf2, &b, NULL, got, NULL) == EM_ERR_INVALID && strstr(em_last_error(), "table 5"));
        em_infer_free(inf2);
    }
    em_dlrm_free(m);
}

static void test_infer(void) {
    check_infer(16, NT, 17);
    check_infer(16, 9, 32);
    check_infer(4, NT, 7);
}

static void check_quant_server(em_qtype qt, size_t want_bytes) {
    size_t before = em_mem_in_use();
    em_server *s = start_server_tables(64, 0, 1 << 20, qt);
    CHECK(s);
    if (!s) return;
    float want[NLINES];
    CHECK(reference_probs(g_ckpt, qt, want, NULL) == 0);
    int port = em_serve_port(s);
    char *j = examples_json(0, NLINES);
    http_resp r;
    double worst = 0;
    for (int round = 0; round < 3; round++) { /* round 0 may grow slot buffers */
        size_t allocs = em_mem_allocs();
        for (int k = 0; k < 4; k++) {
            CHECK(post_json(port, j, &r) == 0 && r.status == 200);
            float p[NLINES];
            CHECK(parse_probs(r.body, p, NLINES) == NLINES);
            for (int i = 0; i < NLINES; i++) {
                CHECK_NEAR(p[i], want[i], 1e-6);
                worst = fmax(worst, fabs((double)p[i] - g_want[i]));
            }
            CHECK(strstr(r.body, "\"model_version\": \"3\"") != NULL);
            free(r.body);
        }
        if (round == 2) CHECK(em_mem_allocs() == allocs);
    }
    CHECK(worst < 2e-3); /* close to the fp32 answers */
    printf("  %s tables: largest |p - p_fp32| over %d examples %.2e\n", em_qtype_name(qt), NLINES, worst);
    free(j);
    em_serve_stats st;
    em_serve_stats_get(s, &st);
    CHECK(st.table_bytes == want_bytes);
    CHECK(http(port, "GET", "/metrics", NULL, NULL, -1, &r) == 0 && r.status == 200);
    char line[96];
    snprintf(line, sizeof line, "ember_embedding_table_bytes %zu\n", want_bytes);
    CHECK(strstr(r.body, line) != NULL);
    free(r.body);
    em_serve_free(s);
    CHECK(em_mem_in_use() == before);
}

static void test_quant_tables(void) {
    check_quant_server(EM_QT_FP16, (size_t)NT * 10 * 4 * 2);
    check_quant_server(EM_QT_INT8, (size_t)NT * 10 * (4 + 8));
    check_quant_server(EM_QT_INT8C, (size_t)NT * 10 * (4 + 2));
    check_quant_server(EM_QT_FP32, (size_t)NT * 10 * 4 * 4);
}

/* ------------------------------------------------------------ reload under load */

typedef struct {
    int port;
    atomic_int stop;
    const float *pa, *pb;    /* the two models' answers */
    const char *step_a, *step_b;
    int sent, failed, wrong;
    char seen[16][32];       /* distinct model versions, in order of first sight */
    int nseen;
    pthread_mutex_t mu;      /* guards last */
    char last[32];           /* the version of the latest answer */
} load_arg;

/* Wait (up to 10 s) until the client has been answered by model version `ver`: the
 * main thread paces the reloads on what the client saw, not on sleeps, so a loaded
 * machine cannot make a version go unseen. */
static int wait_seen(load_arg *a, const char *ver) {
    for (int i = 0; i < 10000; i++) {
        pthread_mutex_lock(&a->mu);
        int ok = strcmp(a->last, ver) == 0;
        pthread_mutex_unlock(&a->mu);
        if (ok) return 1;
        usleep(1000);
    }
    return 0;
}

static void *load_client(void *p) {
    load_arg *a = p;
    char *j = examples_json(0, NLINES);
    while (!atomic_load(&a->stop)) {
        http_resp r;
        a->sent++;
        if (post_json(a->port, j, &r) != 0 || r.status != 200) {
            a->failed++;
            if (r.body) free(r.body);
            continue;
        }
        float got[NLINES];
        const char *v = strstr(r.body, "\"model_version\": \"");
        char ver[32] = "";
        if (v) sscanf(v + 18, "%31[^\"]", ver);
        int ok = parse_probs(r.body, got, NLINES) == NLINES && ver[0];
        /* the version names the step ("3", "8-r2"): the answer must be that model's */
        char step[32];
        snprintf(step, sizeof step, "%s", ver);
        char *dash = strchr(step, '-');
        if (dash) *dash = 0;
        const float *want = strcmp(step, a->step_a) == 0 ? a->pa : strcmp(step, a->step_b) == 0 ? a->pb : NULL;
        for (int i = 0; ok && i < NLINES; i++) ok = want && fabs((double)got[i] - want[i]) <= 1e-6;
        if (!ok) a->wrong++;
        int k = 0;
        while (k < a->nseen && strcmp(a->seen[k], ver)) k++;
        if (k == a->nseen && k < 16) snprintf(a->seen[a->nseen++], 32, "%s", ver);
        pthread_mutex_lock(&a->mu);
        snprintf(a->last, sizeof a->last, "%s", ver);
        pthread_mutex_unlock(&a->mu);
        free(r.body);
    }
    free(j);
    return NULL;
}

static int post_reload(int port, const char *path, http_resp *r) {
    char body[512];
    snprintf(body, sizeof body, "{\"model\": \"%s\"}", path);
    return http(port, "POST", "/admin/reload", "Content-Type: application/json\r\n", body, (long)strlen(body), r);
}

static void check_reload_under_load(em_qtype qt) {
    CHECK(setup() == 0);
    /* a second checkpoint: the first trained 5 more steps */
    char ckpt_b[256], bad[256], other[256];
    snprintf(ckpt_b, sizeof ckpt_b, "/tmp/ember_test_serve_b_%d.st", (int)getpid());
    snprintf(bad, sizeof bad, "/tmp/ember_test_serve_bad_%d.st", (int)getpid());
    snprintf(other, sizeof other, "/tmp/ember_test_serve_other_%d.st", (int)getpid());
    em_dlrm *m;
    CHECK_OK(em_dlrm_load(&m, g_ckpt, NULL, NULL));
    static tbatch tb;
    em_rng rng;
    em_rng_seed(&rng, 77);
    for (int step = 0; step < 5; step++) {
        for (int i = 0; i < NLINES; i++) {
            tb.label[i] = (float)(em_rng_u64(&rng) & 1);
            for (int jj = 0; jj < ND; jj++) tb.dense[i * ND + jj] = (float)em_rng_uniform(&rng);
            for (int f = 0; f < NT; f++) tb.ids[i * NT + f] = em_rng_u64(&rng) % 4; /* rows the lines use too */
            tb.miss[i] = 0;
        }
        tb_finish(&tb, NLINES, em_dlrm_config(m)->rows);
        CHECK_OK(em_dlrm_train_step(m, &tb.b, NULL, NULL));
    }
    CHECK_OK(em_dlrm_save(m, ckpt_b, NULL, 0));
    em_dlrm_free(m);
    /* a corrupt copy: the first 100 bytes of a checkpoint */
    FILE *f = fopen(g_ckpt, "rb"), *g = fopen(bad, "wb");
    char buf[100];
    CHECK(f && g && fread(buf, 1, sizeof buf, f) == sizeof buf && fwrite(buf, 1, sizeof buf, g) == sizeof buf);
    if (f) fclose(f);
    if (g) fclose(g);
    /* a valid checkpoint with other feature counts */
    em_dlrm_cfg oc = tiny_cfg();
    oc.num_dense = 12, oc.bot[0] = 12;
    CHECK_OK(em_dlrm_create(&m, &oc, NULL));
    CHECK_OK(em_dlrm_save(m, other, NULL, 0));
    em_dlrm_free(m);

    float pa[NLINES], pb[NLINES];
    int64_t sa, sb;
    CHECK(reference_probs(g_ckpt, qt, pa, &sa) == 0 && reference_probs(ckpt_b, qt, pb, &sb) == 0);
    double diff = 0;
    for (int i = 0; i < NLINES; i++) diff = fmax(diff, fabs((double)pa[i] - pb[i]));
    CHECK(diff > 1e-3 && sa != sb); /* the two models are told apart */
    char step_a[32], step_b[32];
    snprintf(step_a, sizeof step_a, "%lld", (long long)sa);
    snprintf(step_b, sizeof step_b, "%lld", (long long)sb);

    size_t before = em_mem_in_use();
    em_server *s = start_server_tables(64, 100, 1 << 20, qt);
    CHECK(s);
    if (!s) return;
    int port = em_serve_port(s);
    load_arg la = {.port = port, .pa = pa, .pb = pb, .step_a = step_a, .step_b = step_b};
    atomic_init(&la.stop, 0);
    pthread_mutex_init(&la.mu, NULL);
    pthread_t th;
    CHECK(pthread_create(&th, NULL, load_client, &la) == 0);
    CHECK(wait_seen(&la, step_a));
    http_resp r;
    int ok_reloads = 0;
    for (int k = 0; k < 5; k++) {
        const char *path = k % 2 == 0 ? ckpt_b : g_ckpt;
        if (k == 2) { /* once through the API with the configured path (the first checkpoint) */
            path = g_ckpt;
            CHECK_OK(em_serve_reload(s, NULL));
            ok_reloads++;
        } else {
            CHECK(post_reload(port, path, &r) == 0);
            CHECK(r.status == 200);
            ok_reloads += r.status == 200;
            char want[64];
            snprintf(want, sizeof want, "\"model_version\":\"%s-r%d\"", path == ckpt_b ? step_b : step_a, k + 1);
            CHECK(strstr(r.body, want) != NULL);
            free(r.body);
        }
        char ver[32], want[64];
        em_serve_model_version(s, ver, sizeof ver);
        snprintf(want, sizeof want, "%s-r%d", path == ckpt_b ? step_b : step_a, k + 1);
        CHECK(strcmp(ver, want) == 0);
        if (k == 1) { /* failures in the middle of the load: the old model keeps serving */
            CHECK(post_reload(port, bad, &r) == 0);
            CHECK(r.status == 500 && strstr(r.body, "reload failed") && strstr(r.body, want));
            free(r.body);
            CHECK(post_reload(port, "/nonexistent/ember.st", &r) == 0 && r.status == 500);
            free(r.body);
            CHECK(post_reload(port, other, &r) == 0 && r.status == 500 && strstr(r.body, "features"));
            free(r.body);
            CHECK(http(port, "POST", "/admin/reload", NULL, "{\"model\": 3}", 12, &r) == 0 && r.status == 400);
            free(r.body);
            CHECK(http(port, "GET", "/admin/reload", NULL, NULL, -1, &r) == 0 && r.status == 405);
            free(r.body);
            em_serve_model_version(s, ver, sizeof ver);
            CHECK(strcmp(ver, want) == 0);
        }
        CHECK(wait_seen(&la, want)); /* the client saw this version */
        usleep(20000);                /* and keeps the server busy a while on it */
    }
    atomic_store(&la.stop, 1);
    pthread_join(th, NULL);
    pthread_mutex_destroy(&la.mu);
    printf("  %s tables: %d requests during 5 reloads, %d failed, %d wrong, %d versions seen\n", em_qtype_name(qt),
           la.sent, la.failed, la.wrong, la.nseen);
    CHECK(ok_reloads == 5);
    CHECK(la.sent >= 6 && la.failed == 0 && la.wrong == 0);
    CHECK(la.nseen == 6); /* "3", then every reload's version */
    CHECK(strcmp(la.seen[0], step_a) == 0);
    em_serve_stats st;
    em_serve_stats_get(s, &st);
    CHECK(st.reloads == 5 && st.reload_failures == 3 && st.model_step == sb);
    CHECK(http(port, "GET", "/metrics", NULL, NULL, -1, &r) == 0 && r.status == 200);
    CHECK(strstr(r.body, "ember_model_reloads_total 5\n") && strstr(r.body, "ember_model_reload_failures_total 3\n"));
    free(r.body);
    em_serve_free(s);
    CHECK(em_mem_in_use() == before); /* every retired model was freed */
    unlink(ckpt_b), unlink(bad), unlink(other);
}

/* /admin/reload from a non-loopback address is refused (403); predictions are not.
 * Needs a non-loopback IPv4 address on this host; without one only loopback is checked. */
static void test_reload_loopback_only(void) {
    CHECK(setup() == 0);
    uint32_t other = 0;
    struct ifaddrs *ifs = NULL;
    if (getifaddrs(&ifs) == 0) {
        for (struct ifaddrs *i = ifs; i && !other; i = i->ifa_next)
            if (i->ifa_addr && i->ifa_addr->sa_family == AF_INET) {
                uint32_t a = ntohl(((struct sockaddr_in *)i->ifa_addr)->sin_addr.s_addr);
                if (a >> 24 != 127) other = a;
            }
        freeifaddrs(ifs);
    }
    em_pool *pool;
    em_dlrm *m;
    CHECK_OK(em_pool_create(&pool, 1));
    CHECK_OK(em_dlrm_load(&m, g_ckpt, NULL, pool));
    em_serve_cfg cfg = em_serve_default();
    cfg.bind = "0.0.0.0", cfg.port = 0, cfg.model_path = g_ckpt;
    em_server *s;
    CHECK_OK(em_serve_create(&s, m, pool, &cfg));
    CHECK_OK(em_serve_start(s));
    int port = em_serve_port(s);
    http_resp r;
    CHECK(http(port, "POST", "/admin/reload", NULL, "", 0, &r) == 0 && r.status == 200); /* loopback, no body */
    CHECK(strstr(r.body, "\"model_version\":\"3-r1\"") != NULL);
    free(r.body);
    if (other) {
        g_http_addr = other;
        CHECK(http(port, "POST", "/admin/reload", NULL, "", 0, &r) == 0 && r.status == 403);
        CHECK(strstr(r.body, "loopback") != NULL);
        free(r.body);
        char *j = examples_json(0, 2);
        CHECK(post_json(port, j, &r) == 0 && r.status == 200);
        free(j), free(r.body);
        g_http_addr = INADDR_LOOPBACK;
    } else {
        printf("  no non-loopback IPv4 address: the 403 path is not exercised\n");
    }
    em_serve_stats st;
    em_serve_stats_get(s, &st);
    CHECK(st.reloads == 1 && st.reload_failures == 0);
    em_serve_free(s);
}

/* A POST /admin/reload that takes long must not stall the other connections of the
 * HTTP worker that received it (one worker here, so every connection is its). The
 * checkpoint is a FIFO: the load blocks in open() until this test opens the writing
 * end, so the reload is provably in progress (ember_model_reloading = 1) while the
 * predictions are sent; then the FIFO is closed empty, the reload fails with a 500
 * naming the file, and the old model keeps serving. */
static void test_reload_does_not_block_worker(void) {
    CHECK(setup() == 0);
    char fifo[256];
    snprintf(fifo, sizeof fifo, "/tmp/ember_test_reload_fifo_%d", (int)getpid());
    unlink(fifo);
    CHECK(mkfifo(fifo, 0600) == 0);
    em_pool *pool;
    em_dlrm *m;
    CHECK_OK(em_pool_create(&pool, 1));
    CHECK_OK(em_dlrm_load(&m, g_ckpt, NULL, pool));
    em_serve_cfg cfg = em_serve_default();
    cfg.port = 0, cfg.threads = 1, cfg.max_conns = 8, cfg.model_path = g_ckpt;
    em_server *s;
    CHECK_OK(em_serve_create(&s, m, pool, &cfg));
    CHECK_OK(em_serve_start(s));
    int port = em_serve_port(s);

    /* the reload request, on a connection of its own, answer read later */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0);
    char body[300], req[600];
    int bn = snprintf(body, sizeof body, "{\"model\": \"%s\"}", fifo);
    int rn = snprintf(req, sizeof req,
                      "POST /admin/reload HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                      "Content-Length: %d\r\n\r\n%s", bn, body);
    CHECK(send(fd, req, (size_t)rn, MSG_NOSIGNAL) == rn);
    em_serve_stats st;
    for (int i = 0; i < 5000; i++) { /* the reloader reaches open(fifo) */
        em_serve_stats_get(s, &st);
        if (st.reloading) break;
        usleep(1000);
    }
    CHECK(st.reloading == 1);

    http_resp r;
    char *j = examples_json(0, 4);
    for (int k = 0; k < 3; k++) { /* served by the same worker, during the reload */
        CHECK(post_json(port, j, &r) == 0 && r.status == 200);
        CHECK(strstr(r.headers, "X-Model-Version: 3") != NULL);
        free(r.body);
    }
    free(j);
    CHECK(http(port, "GET", "/metrics", NULL, NULL, -1, &r) == 0 && r.status == 200);
    CHECK(strstr(r.body, "ember_model_reloading 1\n") != NULL);
    free(r.body);
    em_serve_stats_get(s, &st);
    CHECK(st.reloading == 1 && st.reloads == 0);

    int w = open(fifo, O_WRONLY); /* lets the load go on: it reads an empty file */
    CHECK(w >= 0);
    if (w >= 0) close(w);
    char buf[4096];
    size_t len = 0;
    for (;;) {
        ssize_t k = recv(fd, buf + len, sizeof buf - 1 - len, 0);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) break;
        len += (size_t)k;
    }
    buf[len] = 0;
    close(fd);
    int status = 0;
    CHECK(sscanf(buf, "HTTP/1.%*d %d", &status) == 1 && status == 500);
    CHECK(strstr(buf, "reload failed (still serving model_version 3)") != NULL);
    CHECK(strstr(buf, fifo) != NULL);
    em_serve_stats_get(s, &st);
    CHECK(st.reloading == 0 && st.reloads == 0 && st.reload_failures == 1);
    CHECK(http(port, "POST", "/admin/reload", NULL, "", 0, &r) == 0 && r.status == 200); /* and a good one */
    CHECK(strstr(r.body, "\"model_version\":\"3-r1\"") != NULL);
    free(r.body);
    em_serve_free(s);
    unlink(fifo);
}

static void test_reload_under_load(void) {
    check_reload_under_load(EM_QT_FP32);
    check_reload_under_load(EM_QT_INT8);
}

/* ------------------------------------------------------------ teacher mode */

/* A binary request of lines [lo, hi): version 1, or 2 with ids[i - lo] and `vertical`. */
static char *bin_request(int lo, int hi, int version, const uint64_t *ids, uint16_t vertical, long *len) {
    const size_t idb = version == 2 ? 8 : 0, rec = idb + 8 + 4 * ND + 8 * NT;
    const int n = hi - lo;
    char *body = malloc(16 + rec * (size_t)n);
    memcpy(body, "EMRQ", 4);
    put_u16(body + 4, (uint16_t)version), put_u16(body + 6, ND), put_u16(body + 8, NT);
    put_u16(body + 10, version == 2 ? vertical : 0);
    put_u32(body + 12, (uint32_t)n);
    for (int i = lo; i < hi; i++) {
        char l[520];
        float label, dense[ND];
        uint64_t fid[NT], miss;
        int k = snprintf(l, sizeof l, "0\t%s", g_lines[i]);
        CHECK_OK(em_criteo_parse_line(l, (size_t)k, ND, NT, &label, dense, fid, &miss, NULL));
        char *q = body + 16 + rec * (size_t)(i - lo);
        if (idb) memcpy(q, &ids[i - lo], 8);
        memcpy(q + idb, &miss, 8);
        memcpy(q + idb + 8, dense, sizeof dense);
        memcpy(q + idb + 8 + sizeof dense, fid, sizeof fid);
    }
    *len = (long)(16 + rec * (size_t)n);
    return body;
}

/* ember serve as an ExFM foundation model: every prediction of a request with example
 * ids is logged once in the DAS log (id, vertical, logit, step), readable while the
 * server runs (the flusher) and complete after it stops; requests without ids are
 * refused with a message; a server without a log accepts ids and ignores them. */
static void test_teacher_mode(void) {
    if (setup()) {
        CHECK(0);
        return;
    }
    char logp[256];
    snprintf(logp, sizeof logp, "/tmp/ember_test_teacher_%d.das", (int)getpid());
    unlink(logp);
    em_pool *pool;
    em_dlrm *m;
    CHECK_OK(em_pool_create(&pool, 1));
    CHECK_OK(em_dlrm_load(&m, g_ckpt, NULL, pool));
    const int64_t step = em_dlrm_step_count(m);
    em_serve_cfg cfg = em_serve_default();
    cfg.port = 0, cfg.max_batch = 8, cfg.max_wait_us = 0; /* 8: a 12-example request runs in chunks */
    cfg.log_path = logp, cfg.log_flush_ms = 10;
    em_server *s;
    CHECK_OK(em_serve_create(&s, m, pool, &cfg));
    CHECK_OK(em_serve_start(s));
    const int port = em_serve_port(s);

    /* JSON: lines 0..11 with integer ids, vertical 3; line 12 with the largest id */
    char *ex = examples_json(0, 12), *body = malloc(strlen(ex) + 512);
    size_t el = strlen(ex) - 1; /* without the closing brace */
    int n = sprintf(body, "%.*s, \"vertical\": 3, \"ids\": [", (int)el, ex);
    for (int i = 0; i < 12; i++) n += sprintf(body + n, i ? ", %d" : "%d", 1000 + i);
    sprintf(body + n, "]}");
    http_resp r;
    float p[NLINES];
    CHECK(post_json(port, body, &r) == 0);
    CHECK(r.status == 200 && parse_probs(r.body, p, NLINES) == 12);
    for (int i = 0; i < 12; i++) CHECK_NEAR(p[i], g_want[i], 1e-6);
    free(r.body), free(body), free(ex);
    ex = examples_json(12, 13), el = strlen(ex) - 1;
    body = malloc(strlen(ex) + 128);
    sprintf(body, "%.*s, \"ids\": [\"18446744073709551615\"]}", (int)el, ex);
    CHECK(post_json(port, body, &r) == 0);
    CHECK(r.status == 200 && parse_probs(r.body, p, 1) == 1 && fabsf(p[0] - g_want[12]) < 1e-6f);
    free(r.body), free(body);
    /* refused: no ids, wrong count, bad ids, bad vertical, binary version 1 */
    static const char *const bad[][2] = {
        {"", "every request needs"},
        {", \"ids\": [1, 2]", "2 values for 1 examples"},
        {", \"ids\": [-1]", "ids[0]"},
        {", \"ids\": [\"18446744073709551616\"]", "ids[0]"},
        {", \"ids\": [\"12a\"]", "ids[0]"},
        {", \"ids\": [1.5]", "ids[0]"},
        {", \"ids\": 7", "must be an array"},
        {", \"ids\": [1], \"vertical\": -1", "vertical"},
        {", \"ids\": [1], \"vertical\": \"x\"", "vertical"},
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        body = malloc(strlen(ex) + 128);
        sprintf(body, "%.*s%s}", (int)el, ex, bad[k][0]);
        expect_json(port, body, 400, bad[k][1]);
        free(body);
    }
    free(ex);
    long len;
    body = bin_request(13, 24, 1, NULL, 0, &len);
    expect(port, "POST", "/v1/predict.bin", body, len, 400, "version 2");
    free(body);
    /* binary version 2: lines 13..23, ids 5000.., vertical 9 */
    uint64_t ids[NLINES];
    for (int i = 0; i < 11; i++) ids[i] = 5000 + (uint64_t)i;
    body = bin_request(13, 24, 2, ids, 9, &len);
    CHECK(http(port, "POST", "/v1/predict.bin", NULL, body, len, &r) == 0);
    CHECK(r.status == 200 && r.len == 11 * 4);
    for (int i = 0; i < 11 && r.len == 44; i++) {
        float v;
        memcpy(&v, r.body + 4 * i, 4);
        CHECK_NEAR(v, g_want[13 + i], 1e-6);
    }
    free(r.body), free(body);

    /* while serving: the flusher has written the records out */
    em_das_index *ix;
    CHECK_OK(em_das_index_create(&ix, 0));
    uint64_t off = 0, got = 0;
    for (int tries = 0; tries < 1000 && got < 24; tries++) { /* up to 10 s */
        uint64_t add = 0;
        CHECK_OK(em_das_index_follow(ix, logp, &off, EM_DAS_STRICT, &add));
        got += add;
        if (got < 24) usleep(10000);
    }
    CHECK(got == 24);
    em_das_index_free(ix);
    em_serve_stats st;
    em_serve_stats_get(s, &st);
    CHECK(st.logged == 24 && st.log_errors == 0);
    r.body = NULL;
    CHECK(http(port, "GET", "/metrics", NULL, NULL, -1, &r) == 0);
    CHECK(r.body && strstr(r.body, "ember_teacher_logged_total 24\n") && strstr(r.body, "ember_teacher_log_errors_total 0\n"));
    free(r.body);
    em_serve_free(s);

    /* the whole log: one record per example, the logit of the served probability */
    const char *paths[1] = {logp};
    CHECK_OK(em_das_index_open(&ix, paths, 1, EM_DAS_STRICT));
    em_das_stats ds;
    em_das_index_stats(ix, &ds);
    CHECK(ds.records == 24 && ds.entries == 24 && ds.duplicates == 0 && ds.torn == 0);
    for (int i = 0; i < NLINES; i++) {
        uint64_t id = i < 12 ? 1000 + (uint64_t)i : i == 12 ? UINT64_MAX : 5000 + (uint64_t)(i - 13);
        em_das_rec rec;
        CHECK(em_das_lookup(ix, id, &rec) == 1);
        CHECK(rec.vertical == (uint32_t)(i < 12 ? 3 : i == 12 ? 0 : 9) && rec.version == (uint32_t)step);
        CHECK_NEAR(sigm(rec.logit), g_want[i], 1e-6);
    }
    em_das_index_free(ix);
    unlink(logp);

    /* without a log: ids are accepted and ignored, binary version 2 works */
    s = start_server(64, 0, 1 << 20);
    CHECK(s);
    if (!s) return;
    body = bin_request(0, 5, 2, ids, 1, &len);
    CHECK(http(em_serve_port(s), "POST", "/v1/predict.bin", NULL, body, len, &r) == 0);
    CHECK(r.status == 200 && r.len == 5 * 4);
    for (int i = 0; i < 5 && r.len == 20; i++) {
        float v;
        memcpy(&v, r.body + 4 * i, 4);
        CHECK_NEAR(v, g_want[i], 1e-6);
    }
    free(r.body), free(body);
    em_serve_stats_get(s, &st);
    CHECK(st.logged == 0);
    em_serve_free(s);
    /* a log that cannot be opened fails create, freeing the model and the pool */
    CHECK_OK(em_pool_create(&pool, 1));
    CHECK_OK(em_dlrm_load(&m, g_ckpt, NULL, pool));
    cfg.log_path = "/nonexistent-dir/teacher.das";
    CHECK(em_serve_create(&s, m, pool, &cfg) == EM_ERR_IO && strstr(em_last_error(), "nonexistent-dir"));
}

TEST_MAIN({"predict_json", test_predict_json}, {"concurrent_batching", test_concurrent_batching},
          {"one_worker_batches", test_one_worker_batches},
          {"predict_bin", test_predict_bin}, {"errors_and_metrics", test_errors_and_metrics},
          {"no_alloc_no_leak", test_no_alloc_no_leak}, {"bad_config", test_bad_config},
          {"forward_with", test_forward_with}, {"quant_tables", test_quant_tables},
          {"reload_under_load", test_reload_under_load}, {"reload_loopback_only", test_reload_loopback_only},
          {"reload_does_not_block_worker", test_reload_does_not_block_worker},
          {"teacher_mode", test_teacher_mode}, {"infer", test_infer},
          {"inline_when_idle", test_inline_when_idle})
