/*
 * otto.c - OTTO session JSON lines -> (history, candidate, label) examples, as TSV
 * with a sequence column or as ember binary version 2 (docs/FORMATS.md section 6).
 *
 * OTTO (the public recsys-dataset of OTTO GmbH & Co KG, CC BY 4.0) holds one session
 * per line: {"session": N, "events": [{"aid": item, "ts": ms, "type": "clicks"|"carts"|
 * "orders"}, ...]}, events in time order. Each example written here is
 *
 *   label \t C1 = candidate aid (hex) \t C2 = predicted event type (0/1/2) \t S1 = history
 *
 * with the history's events `aid:age:type`, age = (candidate time - event time) / 1000
 * (milliseconds to whole seconds), oldest first, capped to the most recent
 * seq_max_len events.
 *
 * Positives. Without a labels file: for each event t >= 1 of a session, the history is
 * events 0..t-1 and the candidate event t (its time is the example's time, its type
 * the predicted type). With a labels file (OTTO's test labels: {"session": N,
 * "labels": {"clicks": aid, "carts": [aids], "orders": [aids]}}): for each label of a
 * session (clicks, then carts, then orders, in file order), the history is the whole
 * session and the example's time is its last event's.
 *
 * Negatives. After each positive, `negatives` examples with label 0 and the same
 * history and type, whose candidates are drawn from the item pool in proportion to
 * each item's number of events in the sessions file (plus its labels): popular items
 * are the hard, realistic negatives. Items of the session itself (its events and, with
 * labels, its labels) and candidates already drawn for this positive are rejected; a
 * positive whose pool runs dry (at most 32 + 32 * negatives draws) keeps fewer
 * negatives and is counted (short_negatives). The draws come from an RNG seeded by
 * (seed, session id, positive index within the session), so the output does not
 * depend on the order of the sessions or on anything but the inputs and the seed.
 *
 * Passes and memory. Pass 1 reads the sessions (and the labels) to build the pool:
 * distinct aids with their counts, sorted by aid with cumulative counts (a binary
 * search turns a uniform draw into an item). Pass 2 reads the sessions again and
 * writes. Memory is O(distinct items + labels) plus one session's events; the JSON of
 * a line is parsed with jansson (its allocations are jansson's own) and freed at once.
 * Malformed lines are reported as "path:line: why", counted and skipped (in pass 2,
 * so each is counted once), or fatal with strict.
 */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "data/data_internal.h"
#include "ember/data.h"

#define OTTO_TYPES 3
static const char *const TYPE_NAMES[OTTO_TYPES] = {"clicks", "carts", "orders"};

em_otto_cfg em_otto_default(void) {
    return (em_otto_cfg){.labels_path = NULL, .negatives = 4, .seed = 1, .seq_max_len = 0,
                         .binary = 0, .strict = 0};
}

/* ------------------------------------------------------------ sessions */

typedef struct {
    uint64_t aid;
    int64_t ts;
    int type;
} otto_event;

typedef struct {
    uint64_t id;
    otto_event *ev;
    size_t n, cap;
} otto_session;

static int json_uint(json_t *v, uint64_t *out) {
    if (!json_is_integer(v) || json_integer_value(v) < 0) return 0;
    *out = (uint64_t)json_integer_value(v);
    return 1;
}

static int type_index(const char *s) {
    for (int t = 0; t < OTTO_TYPES; t++)
        if (strcmp(s, TYPE_NAMES[t]) == 0) return t;
    return -1;
}

/* Parse one session line into *se. EM_ERR_PARSE with the reason as the detail,
 * EM_ERR_NOMEM. */
static em_status parse_session(const char *line, size_t len, otto_session *se) {
    json_error_t err;
    json_t *root = json_loadb(line, len, 0, &err);
    if (!root) return em_errorf(EM_ERR_PARSE, "invalid JSON: %s (column %d)", err.text, err.column);
    em_status s = EM_OK;
    json_t *events = json_object_get(root, "events");
    se->n = 0;
    if (!json_is_object(root) || !json_uint(json_object_get(root, "session"), &se->id)) {
        s = em_errorf(EM_ERR_PARSE, "expected an object with a non-negative integer \"session\"");
        goto done;
    }
    if (!json_is_array(events)) {
        s = em_errorf(EM_ERR_PARSE, "session %llu: \"events\" is not an array", (unsigned long long)se->id);
        goto done;
    }
    size_t n = json_array_size(events);
    if (n > se->cap) {
        size_t cap = n > 2 * se->cap ? n : 2 * se->cap;
        otto_event *e = em_realloc(se->ev, cap * sizeof *e);
        if (!e) {
            s = em_errorf(EM_ERR_NOMEM, "otto: out of memory (session of %zu events)", n);
            goto done;
        }
        se->ev = e, se->cap = cap;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_array_get(events, i), *ty = json_object_get(e, "type");
        uint64_t aid, ts;
        int t = json_is_string(ty) ? type_index(json_string_value(ty)) : -1;
        if (!json_is_object(e) || !json_uint(json_object_get(e, "aid"), &aid) ||
            !json_uint(json_object_get(e, "ts"), &ts) || t < 0) {
            s = em_errorf(EM_ERR_PARSE, "session %llu: event %zu: expected {\"aid\": n >= 0, \"ts\": n >= 0, \"type\": \"clicks\"|\"carts\"|\"orders\"}",
                          (unsigned long long)se->id, i + 1);
            goto done;
        }
        if (i && (int64_t)ts < se->ev[i - 1].ts) {
            s = em_errorf(EM_ERR_PARSE, "session %llu: event %zu: ts %llu is before the previous event's",
                          (unsigned long long)se->id, i + 1, (unsigned long long)ts);
            goto done;
        }
        se->ev[i] = (otto_event){aid, (int64_t)ts, t};
    }
    se->n = n;
done:
    json_decref(root);
    return s;
}

/* ------------------------------------------------------------ labels */

typedef struct {
    uint64_t session, aid;
    uint32_t order; /* position in the labels file, for a stable sort */
    int type;
} otto_label;

typedef struct {
    otto_label *l;
    size_t n, cap;
    unsigned char *matched; /* [n] the session was seen in pass 2 */
} otto_labels;

static em_status labels_push(otto_labels *L, uint64_t session, uint64_t aid, int type) {
    if (L->n == L->cap) {
        size_t cap = L->cap ? 2 * L->cap : 256;
        otto_label *p = em_realloc(L->l, cap * sizeof *p);
        if (!p) return em_errorf(EM_ERR_NOMEM, "otto: out of memory (labels)");
        L->l = p, L->cap = cap;
    }
    L->l[L->n] = (otto_label){session, aid, (uint32_t)L->n, type};
    L->n++;
    return EM_OK;
}

static em_status parse_labels_line(const char *line, size_t len, otto_labels *L) {
    json_error_t err;
    json_t *root = json_loadb(line, len, 0, &err);
    if (!root) return em_errorf(EM_ERR_PARSE, "invalid JSON: %s (column %d)", err.text, err.column);
    em_status s = EM_OK;
    uint64_t session;
    json_t *labels = json_object_get(root, "labels");
    size_t first = L->n;
    if (!json_is_object(root) || !json_uint(json_object_get(root, "session"), &session) ||
        !json_is_object(labels)) {
        s = em_errorf(EM_ERR_PARSE, "expected {\"session\": n >= 0, \"labels\": {...}}");
        goto done;
    }
    for (int t = 0; t < OTTO_TYPES && s == EM_OK; t++) {
        json_t *v = json_object_get(labels, TYPE_NAMES[t]);
        uint64_t aid;
        if (!v) continue;
        if (json_is_array(v)) {
            for (size_t i = 0; i < json_array_size(v) && s == EM_OK; i++) {
                if (!json_uint(json_array_get(v, i), &aid))
                    s = em_errorf(EM_ERR_PARSE, "session %llu: labels.%s[%zu] is not an aid", (unsigned long long)session,
                                  TYPE_NAMES[t], i);
                else s = labels_push(L, session, aid, t);
            }
        } else if (json_uint(v, &aid)) s = labels_push(L, session, aid, t);
        else s = em_errorf(EM_ERR_PARSE, "session %llu: labels.%s is not an aid or a list of aids",
                           (unsigned long long)session, TYPE_NAMES[t]);
    }
done:
    if (s != EM_OK) L->n = first; /* a bad line adds nothing */
    json_decref(root);
    return s;
}

static int cmp_label(const void *a, const void *b) {
    const otto_label *x = a, *y = b;
    if (x->session != y->session) return x->session < y->session ? -1 : 1;
    return (x->order > y->order) - (x->order < y->order);
}

/* The labels of `session`: [*lo, *hi) in the sorted array. */
static void labels_of(const otto_labels *L, uint64_t session, size_t *lo, size_t *hi) {
    size_t a = 0, b = L->n;
    while (a < b) {
        size_t m = a + (b - a) / 2;
        if (L->l[m].session < session) a = m + 1;
        else b = m;
    }
    *lo = a;
    while (b < L->n && L->l[b].session == session) b++;
    *hi = b < a ? a : b;
}

/* ------------------------------------------------------------ item pool */

typedef struct {
    uint64_t *key; /* aid + 1; 0 = empty slot */
    uint64_t *cnt;
    size_t cap, n;
    uint64_t total;
} otto_pool;

static em_status pool_add(otto_pool *p, uint64_t aid, uint64_t c) {
    if (2 * (p->n + 1) > p->cap) {
        size_t cap = p->cap ? 2 * p->cap : 1024;
        uint64_t *k = em_calloc(cap, sizeof *k), *v = em_calloc(cap, sizeof *v);
        if (!k || !v) {
            em_free(k), em_free(v);
            return em_errorf(EM_ERR_NOMEM, "otto: out of memory (item pool of %zu items)", p->n);
        }
        for (size_t i = 0; i < p->cap; i++) {
            if (!p->key[i]) continue;
            size_t j = em_mix64(p->key[i]) & (cap - 1);
            while (k[j]) j = (j + 1) & (cap - 1);
            k[j] = p->key[i], v[j] = p->cnt[i];
        }
        em_free(p->key), em_free(p->cnt);
        p->key = k, p->cnt = v, p->cap = cap;
    }
    size_t j = em_mix64(aid + 1) & (p->cap - 1);
    while (p->key[j] && p->key[j] != aid + 1) j = (j + 1) & (p->cap - 1);
    if (!p->key[j]) p->key[j] = aid + 1, p->n++;
    p->cnt[j] += c;
    p->total += c;
    return EM_OK;
}

typedef struct {
    uint64_t aid, cnt;
} aid_cnt;

static int cmp_aid(const void *a, const void *b) {
    uint64_t x = ((const aid_cnt *)a)->aid, y = ((const aid_cnt *)b)->aid;
    return (x > y) - (x < y);
}

/* Compact the table into key[i] = i-th smallest aid, cnt[i] = cumulative count. */
static em_status pool_finish(otto_pool *p) {
    aid_cnt *a = em_malloc(sizeof *a * (p->n ? p->n : 1));
    if (!a) return em_errorf(EM_ERR_NOMEM, "otto: out of memory (item pool)");
    size_t k = 0;
    for (size_t i = 0; i < p->cap; i++)
        if (p->key[i]) a[k++] = (aid_cnt){p->key[i] - 1, p->cnt[i]};
    qsort(a, k, sizeof *a, cmp_aid);
    uint64_t cum = 0;
    for (size_t i = 0; i < k; i++) {
        cum += a[i].cnt;
        p->key[i] = a[i].aid, p->cnt[i] = cum;
    }
    em_free(a);
    return EM_OK;
}

/* An aid drawn in proportion to its count. Contract: p->total > 0. */
static uint64_t pool_draw(const otto_pool *p, em_rng *r) {
    uint64_t u = em_rng_below(r, p->total);
    size_t a = 0, b = p->n - 1;
    while (a < b) { /* first i with cum[i] > u */
        size_t m = a + (b - a) / 2;
        if (p->cnt[m] > u) b = m;
        else a = m + 1;
    }
    return p->key[a];
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static int sorted_has(const uint64_t *v, size_t n, uint64_t x) {
    size_t a = 0, b = n;
    while (a < b) {
        size_t m = a + (b - a) / 2;
        if (v[m] < x) a = m + 1;
        else b = m;
    }
    return a < n && v[a] == x;
}

/* ------------------------------------------------------------ output */

typedef struct {
    const char *path;
    int binary, created;
    FILE *f;      /* TSV */
    em__binw *bw; /* binary */
    char *line;   /* TSV line buffer */
} otto_out;

static em_status out_open(otto_out *o, const char *path, int binary, int cap) {
    memset(o, 0, sizeof *o);
    o->path = path;
    o->binary = binary;
    if (binary) return em__binw_open(&o->bw, path, 0, 2, 1);
    /* label, two ids, and `cap` events of at most 16 + 1 + 19 + 1 + 3 + 1 bytes */
    o->line = em_malloc(64 + (size_t)cap * 41);
    if (!o->line) return em_errorf(EM_ERR_NOMEM, "otto: out of memory (line buffer)");
    if (strcmp(path, "-") == 0) {
        o->f = stdout;
        return EM_OK;
    }
    o->f = fopen(path, "wb");
    if (!o->f) return em_errorf(EM_ERR_IO, "cannot create '%s': %s", path, strerror(errno));
    o->created = 1;
    return EM_OK;
}

static char *put_hex(char *o, uint64_t v) {
    static const char D[] = "0123456789abcdef";
    char tmp[16];
    int n = 0;
    do tmp[n++] = D[v & 15];
    while (v >>= 4);
    while (n) *o++ = tmp[--n];
    return o;
}

static em_status out_put(otto_out *o, int label, uint64_t cand, int type, const em_seq_events *h) {
    if (o->binary) {
        uint64_t ids[2] = {cand, (uint64_t)type};
        return em__binw_put(o->bw, (float)label, NULL, 0, ids, h);
    }
    char *p = o->line;
    *p++ = (char)('0' + label);
    *p++ = '\t';
    p = put_hex(p, cand);
    *p++ = '\t';
    *p++ = (char)('0' + type);
    *p++ = '\t';
    for (int i = 0; i < h->len; i++) {
        if (i) *p++ = ',';
        p = put_hex(p, h->item[i]);
        *p++ = ':';
        p = em__put_int(p, h->age[i]);
        *p++ = ':';
        *p++ = (char)('0' + h->type[i]);
    }
    *p++ = '\n';
    size_t n = (size_t)(p - o->line);
    if (fwrite(o->line, 1, n, o->f) != n)
        return em_errorf(EM_ERR_IO, "write '%s': %s", o->path, strerror(errno));
    return EM_OK;
}

static em_status out_close(otto_out *o, em_status s) {
    if (o->binary) return em__binw_close(o->bw, s);
    if (o->f && o->f != stdout) {
        if (fclose(o->f) != 0 && s == EM_OK) s = em_errorf(EM_ERR_IO, "close '%s': %s", o->path, strerror(errno));
    } else if (o->f && fflush(o->f) != 0 && s == EM_OK)
        s = em_errorf(EM_ERR_IO, "write '%s': %s", o->path, strerror(errno));
    if (s != EM_OK && o->created) unlink(o->path);
    em_free(o->line);
    return s;
}

/* ------------------------------------------------------------ conversion */

typedef struct {
    const em_otto_cfg *cfg;
    const char *spath;
    int cap;
    otto_pool pool;
    otto_labels labels;
    otto_session se;
    uint64_t *own;    /* the session's distinct items, sorted (exclusions) */
    size_t n_own, own_cap;
    uint64_t *neg;    /* [negatives] drawn for the current positive */
    uint64_t *hitem;  /* [cap] history */
    int64_t *hage;
    int32_t *htype;
    em_otto_stats *st;
    otto_out out;
} otto_ctx;

/* Count a malformed line; EM_ERR_PARSE when strict. */
static em_status bad_line(otto_ctx *c, const char *path, uint64_t lineno) {
    char msg[sizeof c->st->first_error] = {0};
    snprintf(msg, sizeof msg, "%s:%llu: %s", path, (unsigned long long)lineno, em_last_error());
    if (!c->st->malformed++) memcpy(c->st->first_error, msg, sizeof msg);
    if (c->cfg->strict) return em_errorf(EM_ERR_PARSE, "%s", msg);
    return EM_OK;
}

/* Calls fn(c, line, len, lineno) for every line of `path`; too-long lines and lines fn
 * rejects with EM_ERR_PARSE are malformed when `report`, silently skipped otherwise. */
typedef em_status (*line_fn)(otto_ctx *c, const char *line, size_t len);
static em_status each_line(otto_ctx *c, const char *path, char *buf, line_fn fn, int report) {
    int fd;
    em_status s = em__open_read(path, &fd);
    if (s != EM_OK) return s;
    em__lines ls;
    em__lines_init(&ls, fd, path, buf, EM__IO_BUF, 0);
    uint64_t lineno = 0;
    for (;;) {
        const char *line;
        size_t len;
        int too_long;
        if ((s = em__lines_next(&ls, &line, &len, &too_long)) != EM_OK) break;
        lineno++;
        if (report) c->st->lines++;
        s = too_long ? em_errorf(EM_ERR_PARSE, "line longer than %u bytes", EM__IO_BUF - 1)
                     : fn(c, line, len);
        if (s == EM_ERR_PARSE) s = report ? bad_line(c, path, lineno) : EM_OK;
        if (s != EM_OK) break;
    }
    if (fd > 0) close(fd);
    return s == EM_ERR_EOF ? EM_OK : s;
}

static em_status pass1_session(otto_ctx *c, const char *line, size_t len) {
    em_status s = parse_session(line, len, &c->se);
    for (size_t i = 0; s == EM_OK && i < c->se.n; i++) s = pool_add(&c->pool, c->se.ev[i].aid, 1);
    return s;
}

static em_status pass1_labels(otto_ctx *c, const char *line, size_t len) {
    size_t first = c->labels.n;
    em_status s = parse_labels_line(line, len, &c->labels);
    for (size_t i = first; s == EM_OK && i < c->labels.n; i++) s = pool_add(&c->pool, c->labels.l[i].aid, 1);
    return s;
}

/* One positive (candidate `cand` of type `type` at time `now`, history = events
 * [0, hn) of the session) and its negatives; j = its index within the session. */
static em_status emit(otto_ctx *c, size_t hn, int64_t now, uint64_t cand, int type, uint64_t j) {
    const otto_event *ev = c->se.ev;
    size_t from = hn > (size_t)c->cap ? hn - (size_t)c->cap : 0;
    em_seq_events h = {c->hitem, c->hage, c->htype, c->cap, (int)(hn - from), (int64_t)hn};
    for (size_t i = from; i < hn; i++) {
        c->hitem[i - from] = ev[i].aid;
        c->hage[i - from] = (now - ev[i].ts) / 1000;
        c->htype[i - from] = ev[i].type;
    }
    em_status s = out_put(&c->out, 1, cand, type, &h);
    if (s != EM_OK) return s;
    c->st->examples++, c->st->positives++;
    const int k = c->cfg->negatives;
    if (k == 0) return EM_OK;
    em_rng r;
    em_rng_seed(&r, em_mix64(c->cfg->seed ^ em_mix64(c->se.id ^ em_mix64(j + 0x6f74746f6e6567ull))));
    int got = 0;
    for (int tries = 0; got < k && tries < 32 + 32 * k && c->pool.total; tries++) {
        uint64_t a = pool_draw(&c->pool, &r);
        int dup = sorted_has(c->own, c->n_own, a);
        for (int i = 0; i < got && !dup; i++) dup = c->neg[i] == a;
        if (dup) continue;
        c->neg[got++] = a;
        if ((s = out_put(&c->out, 0, a, type, &h)) != EM_OK) return s;
        c->st->examples++, c->st->negatives++;
    }
    if (got < k) c->st->short_negatives++;
    return EM_OK;
}

static em_status pass2_session(otto_ctx *c, const char *line, size_t len) {
    em_status s = parse_session(line, len, &c->se);
    if (s != EM_OK) return s;
    otto_session *se = &c->se;
    size_t lo = 0, hi = 0;
    if (c->cfg->labels_path) labels_of(&c->labels, se->id, &lo, &hi);
    /* the session's own items (events and labels), sorted, for the exclusions */
    size_t n_own = se->n + (hi - lo);
    if (n_own > c->own_cap) {
        uint64_t *p = em_realloc(c->own, n_own * sizeof *p);
        if (!p) return em_errorf(EM_ERR_NOMEM, "otto: out of memory (session of %zu events)", se->n);
        c->own = p, c->own_cap = n_own;
    }
    for (size_t i = 0; i < se->n; i++) c->own[i] = se->ev[i].aid;
    for (size_t i = lo; i < hi; i++) c->own[se->n + i - lo] = c->labels.l[i].aid;
    qsort(c->own, n_own, sizeof *c->own, cmp_u64);
    size_t u = 0;
    for (size_t i = 0; i < n_own; i++)
        if (!u || c->own[u - 1] != c->own[i]) c->own[u++] = c->own[i];
    c->n_own = u;
    c->st->sessions++;
    c->st->events += se->n;
    const size_t nev = se->n;
    if (!c->cfg->labels_path) {
        for (size_t t = 1; t < nev && s == EM_OK; t++)
            s = emit(c, t, se->ev[t].ts, se->ev[t].aid, se->ev[t].type, t - 1);
        return s;
    }
    for (size_t i = lo; i < hi && s == EM_OK; i++) {
        c->labels.matched[i] = 1;
        if (nev == 0) continue;
        s = emit(c, nev, se->ev[nev - 1].ts, c->labels.l[i].aid, c->labels.l[i].type, i - lo);
    }
    return s;
}

em_status em_otto_convert(const char *sessions_path, const char *out_path, const em_otto_cfg *cfg,
                          em_otto_stats *stats) {
    em_otto_stats st;
    memset(&st, 0, sizeof st);
    if (stats) *stats = st;
    const int limit = em_seq_bin_max_events(0, 2, 1);
    if (!sessions_path || !out_path || !cfg || cfg->negatives < 0 || cfg->negatives > 1000 ||
        cfg->seq_max_len < 0 || cfg->seq_max_len > limit)
        return em_errorf(EM_ERR_INVALID, "otto: bad arguments (paths, 0 <= negatives <= 1000, 0 <= seq_max_len <= %d)",
                         limit);
    if (strcmp(sessions_path, "-") == 0)
        return em_errorf(EM_ERR_UNSUPPORTED, "otto: the sessions are read twice; pass a file, not stdin");
    otto_ctx c;
    memset(&c, 0, sizeof c);
    c.cfg = cfg, c.spath = sessions_path, c.st = &st;
    c.cap = cfg->seq_max_len ? cfg->seq_max_len : limit;
    int opened = 0;
    em_status s = EM_OK;
    char *buf = em_malloc(EM__IO_BUF);
    c.hitem = em_malloc(sizeof *c.hitem * (size_t)c.cap);
    c.hage = em_malloc(sizeof *c.hage * (size_t)c.cap);
    c.htype = em_malloc(sizeof *c.htype * (size_t)c.cap);
    c.neg = em_malloc(sizeof *c.neg * (size_t)(cfg->negatives ? cfg->negatives : 1));
    if (!buf || !c.hitem || !c.hage || !c.htype || !c.neg) {
        s = em_errorf(EM_ERR_NOMEM, "otto: out of memory");
        goto done;
    }
    /* pass 1: the item pool (and the labels) */
    if ((s = each_line(&c, sessions_path, buf, pass1_session, 0)) != EM_OK) goto done;
    if (cfg->labels_path) {
        if ((s = each_line(&c, cfg->labels_path, buf, pass1_labels, 1)) != EM_OK) goto done;
        qsort(c.labels.l, c.labels.n, sizeof *c.labels.l, cmp_label);
        c.labels.matched = em_calloc(c.labels.n ? c.labels.n : 1, 1);
        if (!c.labels.matched) {
            s = em_errorf(EM_ERR_NOMEM, "otto: out of memory (labels)");
            goto done;
        }
        st.lines = 0; /* lines counts the sessions file */
    }
    if ((s = pool_finish(&c.pool)) != EM_OK) goto done;
    st.items = c.pool.n;
    /* pass 2: the examples */
    if ((s = out_open(&c.out, out_path, cfg->binary, c.cap)) != EM_OK) goto done;
    opened = 1;
    s = each_line(&c, sessions_path, buf, pass2_session, 1);
    for (size_t i = 0; s == EM_OK && i < c.labels.n; i++) st.unmatched_labels += !c.labels.matched[i];

done:
    if (opened) s = out_close(&c.out, s);
    else if (c.out.line) em_free(c.out.line);
    em_free(buf), em_free(c.hitem), em_free(c.hage), em_free(c.htype), em_free(c.neg);
    em_free(c.own), em_free(c.se.ev);
    em_free(c.pool.key), em_free(c.pool.cnt);
    em_free(c.labels.l), em_free(c.labels.matched);
    if (stats) *stats = st;
    return s;
}
