/*
 * server.c - the server object and its HTTP side on libmicrohttpd.
 *
 * libmicrohttpd runs in thread-pool mode: `threads` workers, each polling its own
 * share of the connections. The access handler is called once when a request's
 * headers are in (upload size 0), then once per chunk of body, then once more with
 * upload size 0 when the body is complete; every response is decided either on the
 * first call (routing, method, Content-Length over the limit) or on the last.
 *
 * Predict requests take a slot from a free list at the first call (req_cls points to
 * it) and give it back in the request-completed callback, after the response has
 * been sent: the response body is the slot's own buffer, handed to libmicrohttpd
 * without a copy. The number of slots equals the connection limit, and a connection
 * carries one request at a time, so a slot is always free (503 otherwise, as a guard).
 *
 * POST /admin/reload takes a slot the same way (for its optional JSON body), suspends
 * its connection and queues the slot for the reloader thread, which runs
 * em_serve_reload and resumes the connection with the answer: loading blocks neither
 * the batcher nor the HTTP worker's other connections (a worker polls many), and the
 * answer says whether the new model is in. Only loopback clients may call it:
 * the server may listen on a public address, reloading is an operator's action.
 *
 * Status codes: 200, 400 (bad request body, with {"error": "..."} naming what is
 * wrong), 403 (reload from a non-loopback client), 404, 405 (with Allow), 413, 500
 * (the forward pass or a reload failed), 503.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <jansson.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "serve/serve_internal.h"

em_serve_cfg em_serve_default(void) {
    em_serve_cfg c = {.bind = NULL, .port = 8080, .threads = 1, .max_batch = 256, .max_wait_us = 200, .inline_max = 16,
                      .max_body = (size_t)1 << 20, .max_conns = 64, .tables = EM_QT_FP32, .model_path = NULL,
                      .log_path = NULL, .log_flush_ms = 1000};
    return c;
}

/* ------------------------------------------------------------ responses */

static enum MHD_Result send_resp(em_server *s, struct MHD_Connection *c, int endpoint, double t0, int status,
                                 struct MHD_Response *resp, const char *ctype) {
    if (!resp) return MHD_NO;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    enum MHD_Result rc = MHD_queue_response(c, (unsigned)status, resp);
    MHD_destroy_response(resp);
    em__metrics_response(&s->m, endpoint, status, em_now() - t0);
    return rc;
}

static enum MHD_Result send_text(em_server *s, struct MHD_Connection *c, int endpoint, double t0, int status,
                                 const char *text) {
    struct MHD_Response *r = MHD_create_response_from_buffer(strlen(text), (void *)text, MHD_RESPMEM_PERSISTENT);
    return send_resp(s, c, endpoint, t0, status, r, "text/plain; charset=utf-8");
}

/* {"error": msg}, properly escaped. */
static enum MHD_Result send_error(em_server *s, struct MHD_Connection *c, int endpoint, double t0, int status,
                                  const char *msg, const char *allow) {
    json_t *o = json_pack("{s:s}", "error", msg);
    if (!o) { /* not valid UTF-8 (a quoted client byte): send it with those bytes as '?' */
        char safe[1024];
        size_t n = 0;
        for (; msg[n] && n < sizeof safe - 1; n++) safe[n] = (unsigned char)msg[n] >= 0x80 ? '?' : msg[n];
        safe[n] = 0;
        o = json_pack("{s:s}", "error", safe);
    }
    char *txt = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    struct MHD_Response *r;
    if (txt) {
        size_t n = strlen(txt);
        txt[n] = 0;
        r = MHD_create_response_from_buffer(n, txt, MHD_RESPMEM_MUST_COPY);
        free(txt);
    } else {
        static const char oom[] = "{\"error\":\"out of memory\"}";
        r = MHD_create_response_from_buffer(sizeof oom - 1, (void *)oom, MHD_RESPMEM_PERSISTENT);
    }
    if (r && allow) MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, allow);
    return send_resp(s, c, endpoint, t0, status, r, "application/json");
}

/* ------------------------------------------------------------ slots */

static em__req *slot_get(em_server *s) {
    pthread_mutex_lock(&s->mu);
    em__req *r = s->free_list;
    if (r) s->free_list = r->next;
    pthread_mutex_unlock(&s->mu);
    if (r) r->next = NULL, r->body_len = 0, r->too_big = 0, r->n = 0, r->reload_done = 0, r->queued = 0, r->conn = NULL;
    return r;
}

static void slot_put(em_server *s, em__req *r) {
    pthread_mutex_lock(&s->mu);
    r->next = s->free_list;
    s->free_list = r;
    pthread_mutex_unlock(&s->mu);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **req_cls, enum MHD_RequestTerminationCode toe) {
    (void)c, (void)toe;
    if (*req_cls) slot_put(cls, *req_cls);
    *req_cls = NULL;
}

/* ------------------------------------------------------------ predict */

static enum MHD_Result finish_predict(em_server *s, struct MHD_Connection *c, em__req *r) {
    char msg[512];
    const int ep = r->endpoint;
    if (r->too_big) {
        snprintf(msg, sizeof msg, "request body over the limit of %zu bytes", s->cfg.max_body);
        return send_error(s, c, ep, r->t0, 413, msg, NULL);
    }
    em_status st;
    if (r->queued) { /* resumed by the batcher: the answer is in */
        r->queued = 0;
        st = r->st;
    } else {
        int status = ep == EM_SERVE_EP_PREDICT ? em__parse_json(s, r, msg, sizeof msg) : em__parse_bin(s, r, msg, sizeof msg);
        if (status) return send_error(s, c, ep, r->t0, status, msg, NULL);
        int queued;
        st = em__submit(s, r, c, &queued);
        if (queued) return MHD_YES; /* suspended; called again when the batcher resumes it */
    }
    if (st) {
        snprintf(msg, sizeof msg, "inference failed: %s", em_status_str(st));
        return send_error(s, c, ep, r->t0, 500, msg, NULL);
    }
    if (ep == EM_SERVE_EP_PREDICT ? em__format_json(s, r) : em__format_bin(r))
        return send_error(s, c, ep, r->t0, 500, "out of memory", NULL);
    struct MHD_Response *resp = MHD_create_response_from_buffer(r->out_len, r->out, MHD_RESPMEM_PERSISTENT);
    if (resp) MHD_add_response_header(resp, "X-Model-Version", r->version);
    return send_resp(s, c, ep, r->t0, 200, resp, ep == EM_SERVE_EP_PREDICT ? "application/json" : "application/octet-stream");
}

/* ------------------------------------------------------------ reload */

static int is_loopback(struct MHD_Connection *c) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    if (!ci || !ci->client_addr) return 0;
    if (ci->client_addr->sa_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ci->client_addr;
        return (ntohl(a->sin_addr.s_addr) >> 24) == 127;
    }
    return 0;
}

/* Set r's answer: HTTP code and body text (JSON) in r->out; -1 when out of memory. */
static int set_answer(em__req *r, int code, const char *txt) {
    size_t n = strlen(txt);
    if (n + 1 > r->out_cap) {
        char *o = em_realloc(r->out, n + 1);
        if (!o) return -1;
        r->out = o, r->out_cap = n + 1;
    }
    memcpy(r->out, txt, n + 1);
    r->out_len = n;
    r->reload_code = code;
    return 0;
}

/* On the reloader thread: load r->reload_path (NULL: the server's own checkpoint) and
 * write the answer into r. A 500 answer's body is the bare message (sent through
 * send_error, which quotes it). */
static void run_reload(em_server *s, em__req *r) {
    char msg[700];
    em_status st = em_serve_reload(s, r->reload_path);
    char ver[32];
    em_serve_model_version(s, ver, sizeof ver);
    if (st) {
        const char *d = em_last_error();
        snprintf(msg, sizeof msg, "reload failed (still serving model_version %s): %.500s", ver,
                 d && *d ? d : em_status_str(st));
        if (set_answer(r, 500, msg)) r->reload_code = 500, r->out_len = 0;
        return;
    }
    json_t *o = json_pack("{s:s,s:s,s:I,s:s}", "model_version", ver, "model",
                          r->reload_path ? r->reload_path : s->model_path, "step",
                          (json_int_t)atomic_load(&s->step), "tables", em_qtype_name(s->cfg.tables));
    char *txt = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    if (!txt || set_answer(r, 200, txt)) r->reload_code = 500, r->out_len = 0; /* out of memory */
    free(txt);
}

static void *reloader_main(void *arg) {
    em_server *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (!s->rl_head && !s->reloader_stop) pthread_cond_wait(&s->reloader_cv, &s->mu);
        em__req *r = s->rl_head;
        if (!r) break; /* stopping, and every queued reload answered */
        s->rl_head = r->next;
        if (!s->rl_head) s->rl_tail = NULL;
        r->next = NULL;
        pthread_mutex_unlock(&s->mu);
        run_reload(s, r);
        r->reload_done = 1; /* published by MHD_resume_connection's lock */
        MHD_resume_connection(r->conn);
        pthread_mutex_lock(&s->mu);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* Body: empty, or {"model": "path"}. The load itself runs on the reloader thread:
 * the connection is suspended meanwhile and its worker keeps serving the others;
 * when the answer is in, the connection is resumed and this is called again. */
static enum MHD_Result finish_reload(em_server *s, struct MHD_Connection *c, em__req *r) {
    const int ep = EM_SERVE_EP_RELOAD;
    if (r->reload_done) {
        if (r->reload_code != 200)
            return send_error(s, c, ep, r->t0, r->reload_code, r->out_len ? r->out : "out of memory", NULL);
        struct MHD_Response *resp = MHD_create_response_from_buffer(r->out_len, r->out, MHD_RESPMEM_PERSISTENT);
        return send_resp(s, c, ep, r->t0, 200, resp, "application/json");
    }
    char msg[160];
    if (r->too_big) {
        snprintf(msg, sizeof msg, "request body over the limit of %zu bytes", s->cfg.max_body);
        return send_error(s, c, ep, r->t0, 413, msg, NULL);
    }
    json_t *root = NULL;
    const char *path = NULL;
    size_t i = 0;
    while (i < r->body_len && (r->body[i] == ' ' || r->body[i] == '\n' || r->body[i] == '\r' || r->body[i] == '\t')) i++;
    if (i < r->body_len) {
        json_error_t je;
        root = json_loadb(r->body, r->body_len, 0, &je);
        json_t *mp = root ? json_object_get(root, "model") : NULL;
        if (!root || !json_is_object(root) || (mp && !json_is_string(mp))) {
            json_decref(root);
            return send_error(s, c, ep, r->t0, 400, "reload body must be empty or {\"model\": \"path\"}", NULL);
        }
        if (mp) path = json_string_value(mp);
    }
    if (!path && !s->model_path) {
        json_decref(root);
        return send_error(s, c, ep, r->t0, 400, "no checkpoint: name one with {\"model\": \"path\"}", NULL);
    }
    r->reload_path = NULL;
    if (path) { /* keep a copy: root goes now */
        size_t n = strlen(path) + 1;
        if (n > r->line_cap) {
            char *l = em_realloc(r->line, n);
            if (!l) {
                json_decref(root);
                return send_error(s, c, ep, r->t0, 500, "out of memory", NULL);
            }
            r->line = l, r->line_cap = n;
        }
        memcpy(r->line, path, n);
        r->reload_path = r->line;
    }
    json_decref(root);
    r->conn = c;
    pthread_mutex_lock(&s->mu);
    if (s->stopping) {
        pthread_mutex_unlock(&s->mu);
        return send_error(s, c, ep, r->t0, MHD_HTTP_SERVICE_UNAVAILABLE, "server stopping", NULL);
    }
    /* suspend before queueing, so the reloader's resume always follows it */
    MHD_suspend_connection(c);
    if (s->rl_tail) s->rl_tail->next = r;
    else s->rl_head = r;
    s->rl_tail = r;
    pthread_cond_signal(&s->reloader_cv);
    pthread_mutex_unlock(&s->mu);
    return MHD_YES;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload, size_t *upload_size, void **req_cls) {
    (void)version;
    em_server *s = cls;
    em__req *r = *req_cls;
    if (r) { /* a predict request in progress: body chunk, or the end of the body */
        if (*upload_size) {
            size_t n = *upload_size;
            *upload_size = 0;
            if (r->too_big || r->body_len + n > s->cfg.max_body) {
                r->too_big = 1; /* keep reading (and dropping) so the 413 reaches the client */
                return MHD_YES;
            }
            if (r->body_len + n + 1 > r->body_cap) {
                size_t cap = r->body_cap ? r->body_cap : 4096;
                while (cap < r->body_len + n + 1) cap *= 2;
                char *b = em_realloc(r->body, cap);
                if (!b) return MHD_NO;
                r->body = b, r->body_cap = cap;
            }
            memcpy(r->body + r->body_len, upload, n);
            r->body_len += n;
            return MHD_YES;
        }
        return r->endpoint == EM_SERVE_EP_RELOAD ? finish_reload(s, c, r) : finish_predict(s, c, r);
    }

    double t0 = em_now();
    int ep = strcmp(url, "/v1/predict") == 0       ? EM_SERVE_EP_PREDICT
             : strcmp(url, "/v1/predict.bin") == 0 ? EM_SERVE_EP_PREDICT_BIN
             : strcmp(url, "/healthz") == 0        ? EM_SERVE_EP_HEALTHZ
             : strcmp(url, "/metrics") == 0        ? EM_SERVE_EP_METRICS
             : strcmp(url, "/admin/reload") == 0   ? EM_SERVE_EP_RELOAD
                                                   : EM_SERVE_EP_OTHER;
    int is_get = strcmp(method, MHD_HTTP_METHOD_GET) == 0 || strcmp(method, MHD_HTTP_METHOD_HEAD) == 0;
    char msg[160];
    switch (ep) {
    case EM_SERVE_EP_OTHER:
        snprintf(msg, sizeof msg, "no such endpoint: %.100s", url);
        return send_error(s, c, ep, t0, MHD_HTTP_NOT_FOUND, msg, NULL);
    case EM_SERVE_EP_HEALTHZ:
        if (!is_get) return send_error(s, c, ep, t0, MHD_HTTP_METHOD_NOT_ALLOWED, "use GET", "GET, HEAD");
        return send_text(s, c, ep, t0, 200, "ok\n");
    case EM_SERVE_EP_METRICS: {
        if (!is_get) return send_error(s, c, ep, t0, MHD_HTTP_METHOD_NOT_ALLOWED, "use GET", "GET, HEAD");
        char buf[16384];
        size_t n = em_serve_metrics_text(s, buf, sizeof buf);
        if (n >= sizeof buf) n = sizeof buf - 1;
        struct MHD_Response *resp = MHD_create_response_from_buffer(n, buf, MHD_RESPMEM_MUST_COPY);
        return send_resp(s, c, ep, t0, 200, resp, "text/plain; version=0.0.4; charset=utf-8");
    }
    case EM_SERVE_EP_RELOAD:
        if (!is_loopback(c)) return send_error(s, c, ep, t0, 403, "reload is allowed from loopback clients only", NULL);
        break;
    default:
        break;
    }
    if (strcmp(method, MHD_HTTP_METHOD_POST) != 0) {
        snprintf(msg, sizeof msg, "%.20s %s: use POST", method, url);
        return send_error(s, c, ep, t0, MHD_HTTP_METHOD_NOT_ALLOWED, msg, "POST");
    }
    const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (cl && strtoull(cl, NULL, 10) > s->cfg.max_body) {
        snprintf(msg, sizeof msg, "request body of %.24s bytes over the limit of %zu bytes", cl, s->cfg.max_body);
        return send_error(s, c, ep, t0, 413, msg, NULL);
    }
    if (!(r = slot_get(s))) return send_error(s, c, ep, t0, MHD_HTTP_SERVICE_UNAVAILABLE, "server busy", NULL);
    r->endpoint = ep, r->t0 = t0;
    *req_cls = r;
    return MHD_YES;
}

/* ------------------------------------------------------------ lifecycle */

static void free_slots(em_server *s) {
    if (!s->slots) return;
    for (int i = 0; i < s->cfg.max_conns; i++) {
        em__req *r = &s->slots[i];
        em_free(r->body), em_free(r->dense), em_free(r->ids), em_free(r->miss), em_free(r->prob), em_free(r->exid);
        em_free(r->line), em_free(r->out);
        pthread_cond_destroy(&r->cv);
    }
    em_free(s->slots);
    s->slots = NULL;
}

em_status em_serve_create(em_server **out, em_dlrm *model, em_pool *pool, const em_serve_cfg *cfg) {
    *out = NULL;
    em_status st = EM_OK;
    if (!model) st = em_errorf(EM_ERR_INVALID, "serve: no model");
    else if (cfg->threads < 1 || cfg->threads > 1024) st = em_errorf(EM_ERR_INVALID, "serve: threads %d not in [1, 1024]", cfg->threads);
    else if (cfg->max_batch < 1 || cfg->max_batch > (1 << 20))
        st = em_errorf(EM_ERR_INVALID, "serve: max_batch %d not in [1, 2^20]", cfg->max_batch);
    else if (cfg->max_wait_us < 0 || cfg->max_wait_us > 10000000)
        st = em_errorf(EM_ERR_INVALID, "serve: max_wait_us %d not in [0, 10^7]", cfg->max_wait_us);
    else if (cfg->inline_max < 0)
        st = em_errorf(EM_ERR_INVALID, "serve: inline_max %d is negative", cfg->inline_max);
    else if (cfg->max_body < 16 || cfg->max_body > ((size_t)1 << 31))
        st = em_errorf(EM_ERR_INVALID, "serve: max_body %zu not in [16 bytes, 2 GiB]", cfg->max_body);
    else if (cfg->max_conns < cfg->threads || cfg->max_conns > 65536)
        st = em_errorf(EM_ERR_INVALID, "serve: max_conns %d not in [threads = %d, 65536]", cfg->max_conns, cfg->threads);
    else if (cfg->port < 0 || cfg->port > 65535) st = em_errorf(EM_ERR_INVALID, "serve: port %d not in [0, 65535]", cfg->port);
    else if (cfg->log_path && cfg->log_flush_ms < 1)
        st = em_errorf(EM_ERR_INVALID, "serve: log_flush_ms %d must be at least 1", cfg->log_flush_ms);
    else if (em_dlrm_config(model)->num_tables > 64)
        st = em_errorf(EM_ERR_UNSUPPORTED, "serve: %d tables; at most 64 are supported", em_dlrm_config(model)->num_tables);
    struct in_addr a;
    if (!st && inet_pton(AF_INET, cfg->bind ? cfg->bind : "127.0.0.1", &a) != 1)
        st = em_errorf(EM_ERR_INVALID, "serve: bind address '%s' is not an IPv4 address", cfg->bind);
    em_server *s = st ? NULL : em_calloc(1, sizeof *s);
    if (!st && !s) st = em_errorf(EM_ERR_NOMEM, "serve: out of memory");
    if (st) {
        em_dlrm_free(model);
        em_pool_free(pool);
        return st;
    }
    s->cfg = *cfg;
    s->cfg.model_path = NULL;
    s->cfg.log_path = NULL; /* not kept: s->das says whether predictions are logged */
    s->pool = pool;
    s->nd = em_dlrm_config(model)->num_dense, s->ns = em_dlrm_config(model)->num_tables;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->queue_cv, NULL);
    pthread_cond_init(&s->idle_cv, NULL);
    pthread_mutex_init(&s->reload_mu, NULL);
    pthread_cond_init(&s->reload_cv, NULL);
    pthread_cond_init(&s->flush_cv, NULL);
    pthread_cond_init(&s->reloader_cv, NULL);
    em__metrics_init(&s->m, cfg->max_batch);
    if (cfg->model_path) {
        size_t n = strlen(cfg->model_path) + 1;
        if (!(s->model_path = em_malloc(n))) {
            em_dlrm_free(model);
            st = em_errorf(EM_ERR_NOMEM, "serve: out of memory");
            goto fail;
        }
        memcpy(s->model_path, cfg->model_path, n);
        s->cfg.model_path = s->model_path;
    }
    if (cfg->log_path) {
        if ((st = em_das_writer_open(&s->das, cfg->log_path))) {
            em_dlrm_free(model);
            goto fail;
        }
    }
    if ((st = em__model_make(s, model, pool, &s->cur))) goto fail; /* frees model on failure */
    snprintf(s->cur->version, sizeof s->cur->version, "%lld", (long long)s->cur->step);
    atomic_store(&s->step, s->cur->step);
    atomic_store(&s->table_bytes, s->cur->table_bytes);
    if ((st = em__batch_alloc(s))) goto fail;
    if (!(s->slots = em_calloc((size_t)cfg->max_conns, sizeof(em__req)))) {
        st = em_errorf(EM_ERR_NOMEM, "serve: out of memory");
        goto fail;
    }
    for (int i = 0; i < cfg->max_conns; i++) pthread_cond_init(&s->slots[i].cv, NULL);
    for (int i = cfg->max_conns - 1; i >= 0; i--) {
        em__req *r = &s->slots[i];
        if (em__req_reserve(s, r, 16) || !(r->body = em_malloc(r->body_cap = 4096))) {
            st = em_errorf(EM_ERR_NOMEM, "serve: out of memory");
            goto fail;
        }
        r->next = s->free_list;
        s->free_list = r;
    }
    *out = s;
    return EM_OK;
fail:
    em_serve_free(s);
    return st;
}

/* Teacher mode: write the prediction log out and fsync it every log_flush_ms. */
static void *flusher_main(void *arg) {
    em_server *s = arg;
    pthread_mutex_lock(&s->mu);
    while (!s->flusher_stop) {
        struct timespec dl;
        clock_gettime(CLOCK_REALTIME, &dl);
        long long ns = dl.tv_nsec + (long long)s->cfg.log_flush_ms * 1000000;
        dl.tv_sec += (time_t)(ns / 1000000000), dl.tv_nsec = (long)(ns % 1000000000);
        while (!s->flusher_stop && pthread_cond_timedwait(&s->flush_cv, &s->mu, &dl) != ETIMEDOUT) {}
        pthread_mutex_unlock(&s->mu);
        em_das_flush(s->das); /* a failure is sticky in the writer: later appends fail and are counted */
        pthread_mutex_lock(&s->mu);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

em_status em_serve_start(em_server *s) {
    if (s->daemon) return EM_OK;
    if (s->das && !s->flusher_running) {
        s->flusher_stop = 0;
        if (pthread_create(&s->flusher, NULL, flusher_main, s) != 0)
            return em_errorf(EM_ERR_THREAD, "serve: cannot start the prediction log's flusher thread");
        s->flusher_running = 1;
    }
    pthread_mutex_lock(&s->mu);
    s->stop = 0, s->draining = 0;
    s->batcher_live = 1;
    if (pthread_create(&s->batcher, NULL, em__batcher_main, s) != 0) {
        s->batcher_live = 0;
        pthread_mutex_unlock(&s->mu);
        return em_errorf(EM_ERR_THREAD, "serve: cannot start the batcher thread");
    }
    pthread_mutex_unlock(&s->mu);
    s->batcher_running = 1;
    pthread_mutex_lock(&s->mu);
    s->stopping = 0, s->reloader_stop = 0;
    pthread_mutex_unlock(&s->mu);
    if (pthread_create(&s->reloader, NULL, reloader_main, s) != 0) {
        em_serve_stop(s);
        return em_errorf(EM_ERR_THREAD, "serve: cannot start the reloader thread");
    }
    s->reloader_running = 1;
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)s->cfg.port);
    inet_pton(AF_INET, s->cfg.bind ? s->cfg.bind : "127.0.0.1", &sa.sin_addr);
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_ALLOW_SUSPEND_RESUME;
    s->daemon = MHD_start_daemon(flags, 0, NULL, NULL, on_request, s,
                                 MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&sa,
                                 MHD_OPTION_THREAD_POOL_SIZE, (unsigned)s->cfg.threads,
                                 MHD_OPTION_CONNECTION_LIMIT, (unsigned)s->cfg.max_conns,
                                 MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)30,
                                 MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
                                 MHD_OPTION_END);
    if (!s->daemon) {
        em_serve_stop(s);
        return em_errorf(EM_ERR_IO, "serve: cannot listen on %s:%d (in use, or not an address of this host)",
                         s->cfg.bind ? s->cfg.bind : "127.0.0.1", s->cfg.port);
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->daemon, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : s->cfg.port;
    return EM_OK;
}

int em_serve_port(const em_server *s) { return s && s->daemon ? s->port : 0; }

void em_serve_stop(em_server *s) {
    if (!s) return;
    /* queued reloads first: they finish and resume their connections (no reload is
     * queued after stopping is set), so no connection is left suspended */
    if (s->reloader_running) {
        pthread_mutex_lock(&s->mu);
        s->stopping = 1, s->reloader_stop = 1;
        pthread_cond_broadcast(&s->reloader_cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->reloader, NULL);
        s->reloader_running = 0;
    }
    /* then the HTTP side: from now on predict requests wait for the batcher on their
     * worker instead of suspending, and every suspended one is resumed (libmicrohttpd
     * must not stop with suspended connections); its workers finish the requests in
     * flight, which needs the batcher still running */
    pthread_mutex_lock(&s->mu);
    s->draining = 1;
    while (s->suspended) pthread_cond_wait(&s->idle_cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
    if (s->daemon) MHD_stop_daemon(s->daemon);
    s->daemon = NULL;
    s->port = 0;
    if (s->batcher_running) {
        pthread_mutex_lock(&s->mu);
        s->stop = 1;
        pthread_cond_broadcast(&s->queue_cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->batcher, NULL);
        s->batcher_running = 0;
    }
    if (s->flusher_running) { /* after the batcher: no more appends */
        pthread_mutex_lock(&s->mu);
        s->flusher_stop = 1;
        pthread_cond_broadcast(&s->flush_cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->flusher, NULL);
        s->flusher_running = 0;
    }
    if (s->das) em_das_flush(s->das);
}

void em_serve_free(em_server *s) {
    if (!s) return;
    em_serve_stop(s);
    em_das_writer_close(s->das); /* flushed by em_serve_stop; NULL is a no-op */
    s->das = NULL;
    free_slots(s);
    em__batch_free(s);
    em__model_free(s->cur);
    em_pool_free(s->pool);
    em_free(s->model_path);
    pthread_cond_destroy(&s->queue_cv);
    pthread_cond_destroy(&s->idle_cv);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->reload_cv);
    pthread_mutex_destroy(&s->reload_mu);
    pthread_cond_destroy(&s->flush_cv);
    pthread_cond_destroy(&s->reloader_cv);
    em_free(s);
}

em_status em_serve_reload(em_server *s, const char *path) {
    if (!path) path = s->model_path;
    if (!path) {
        atomic_fetch_add(&s->m.reload_failures, 1);
        return em_errorf(EM_ERR_INVALID, "serve: reload: no checkpoint path (none given, none at create)");
    }
    pthread_mutex_lock(&s->reload_mu);
    /* load and quantize without the batcher's pool: serving keeps its cores */
    em_dlrm *m = NULL;
    em__model *mm = NULL;
    atomic_store(&s->m.reloading, 1);
    em_status st = em_dlrm_load(&m, path, NULL, NULL);
    if (!st) st = em__model_make(s, m, NULL, &mm);
    atomic_store(&s->m.reloading, 0);
    if (st) {
        atomic_fetch_add(&s->m.reload_failures, 1);
        pthread_mutex_unlock(&s->reload_mu);
        return st;
    }
    pthread_mutex_lock(&s->mu);
    uint64_t gen = ++s->generation;
    snprintf(mm->version, sizeof mm->version, "%lld-r%llu", (long long)mm->step, (unsigned long long)gen);
    em__model *old;
    if (s->batcher_live) {
        s->pending = mm;
        pthread_cond_broadcast(&s->queue_cv);
        while (s->pending == mm) pthread_cond_wait(&s->reload_cv, &s->mu);
        old = s->retired;
        s->retired = NULL;
    } else { /* nobody runs batches: swap directly */
        old = s->cur;
        s->cur = mm;
    }
    atomic_store(&s->step, mm->step);
    atomic_store(&s->table_bytes, mm->table_bytes);
    pthread_mutex_unlock(&s->mu);
    em__model_free(old);
    atomic_fetch_add(&s->m.reloads, 1);
    pthread_mutex_unlock(&s->reload_mu);
    return EM_OK;
}

void em_serve_model_version(em_server *s, char *buf, size_t cap) {
    if (!cap) return;
    pthread_mutex_lock(&s->mu);
    snprintf(buf, cap, "%s", s->cur ? s->cur->version : "");
    pthread_mutex_unlock(&s->mu);
}
