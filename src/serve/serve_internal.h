/*
 * serve_internal.h - what the pieces of the server share: the request slot, the
 * server object, the metrics counters.
 *
 * A request slot holds everything one request needs, from the raw body to the
 * formatted answer. Slots are created with the server (max_conns of them) and their
 * buffers only ever grow, so in steady state a request allocates nothing of ours.
 */
#ifndef EM_SERVE_INTERNAL_H
#define EM_SERVE_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>

#include "ember/das.h"
struct MHD_Connection;
#include "ember/serve.h"

typedef struct em__req {
    struct em__req *next; /* free list or batcher queue */
    int endpoint;         /* EM_SERVE_EP_PREDICT or _PREDICT_BIN */
    double t0;            /* arrival (em_now), for the latency histogram */
    int too_big;          /* body went over max_body: discard, answer 413 */

    char *body;           /* raw body (body_len bytes, plus room for a NUL) */
    size_t body_len, body_cap;

    int n, cap;           /* examples parsed / room for */
    float *dense;         /* (cap, num_dense), log-transformed */
    uint64_t *ids;        /* (cap, num_sparse) raw ids */
    uint64_t *miss;       /* (cap) bit f: categorical f missing */
    float *prob;          /* (cap) answers */
    uint64_t *exid;       /* (cap) example ids, when has_exid (teacher mode logs them) */
    int has_exid;         /* the request carried example ids */
    uint32_t vertical;    /* the request's vertical (JSON "vertical", binary v2 header), 0 if none */

    char *line;           /* scratch: a TSV line with a label column prepended */
    size_t line_cap;
    char *out;            /* formatted response body */
    size_t out_len, out_cap;

    struct MHD_Connection *conn; /* reload: the suspended connection to resume */
    int reload_done;      /* reload: the reloader thread has answered (code, out) */
    int reload_code;      /* reload: HTTP status of the answer */
    const char *reload_path; /* reload: the checkpoint named in the body (in line), or NULL */

    int queued;           /* predict: the connection is suspended and the request queued to the
                           * batcher, which resumes it with the answer in (em__submit) */
    int done;             /* set by the batcher under s->mu */
    em_status st;         /* the forward pass's status */
    char version[32];     /* model_version of the model that answered (set with done) */
    pthread_cond_t cv;    /* signalled when done */
} em__req;

/* Histogram with fixed upper bounds (the last is +Inf); counts are per bucket, not
 * cumulative (the exporter accumulates). */
#define EM__HIST_MAX 20
typedef struct {
    int n;                       /* buckets including +Inf */
    double le[EM__HIST_MAX];     /* upper bounds; le[n-1] = +Inf */
    _Atomic uint64_t count[EM__HIST_MAX];
    _Atomic uint64_t sum_ns;     /* sum of observations, in 1e-9 units */
} em__hist;

typedef struct {
    _Atomic uint64_t requests[EM_SERVE_EP__COUNT];
    _Atomic uint64_t errors[7]; /* by code: 400, 403, 404, 405, 413, 500, 503 */
    _Atomic uint64_t reloads, reload_failures, reloading;
    _Atomic uint64_t examples, max_batch;
    _Atomic uint64_t logged, log_errors; /* teacher mode */
    em__hist latency;           /* seconds */
    em__hist batch;             /* examples per forward pass */
} em__metrics;

/* A served model: the dense part, and the quantized tables it pools from (NULL: its
 * own fp32 tables). Created by a reload thread (or em_serve_create), used only by the
 * batcher, freed by whoever swapped it out once the batcher has let go of it. */
typedef struct {
    em_dlrm *m;
    em_infer *inf;              /* the inference path over m's dense part (infer.c) */
    em_qbag *q;
    float *pooled;              /* (max_batch, T, D) when q */
    int64_t step;
    size_t table_bytes;
    char version[32];
} em__model;

struct em_server {
    em_serve_cfg cfg;
    char *model_path;           /* cfg.model_path, owned */
    em__model *cur;             /* the served model; while the batcher is live only it writes this */
    em__model *pending;         /* a reloaded model waiting for the batcher to swap it in */
    em__model *retired;         /* what the batcher swapped out, for the reloader to free */
    int batcher_live;           /* under mu: the batcher thread will still swap pending */
    uint64_t generation;        /* successful reloads */
    pthread_mutex_t reload_mu;  /* one reload at a time */
    pthread_cond_t reload_cv;   /* the batcher took pending */
    em_pool *pool;
    int nd, ns;                 /* dense / sparse feature counts (the same for every model) */
    _Atomic int64_t step;       /* the served model's step count (metrics) */
    _Atomic size_t table_bytes; /* the served model's table bytes (metrics) */
    struct MHD_Daemon *daemon;
    int port;

    pthread_mutex_t mu;         /* guards the free list, the queue, done flags, stop, busy, gathering */
    pthread_cond_t queue_cv;    /* batcher: work queued or stop */
    int busy;                   /* under mu: a forward pass runs on cur (the batcher's or an inline one) */
    int gathering;              /* under mu: the batcher holds requests while it waits for more */
    pthread_cond_t idle_cv;     /* busy went to 0, or suspended did */
    int suspended;              /* under mu: predict connections suspended on the batcher */
    int draining;               /* under mu: em__submit blocks instead of suspending (stopping) */
    em__req *slots, *free_list, *q_head, *q_tail;
    int stop, batcher_running;
    pthread_t batcher;

    /* batch buffers, owned by the batcher thread, sized for max_batch */
    em_batch b;
    float *logits;
    em__req **taken;            /* requests in the current batch */

    em__metrics m;

    /* POST /admin/reload: the HTTP worker suspends the connection and queues the slot;
     * the reloader thread loads, answers and resumes it, so a worker's other
     * connections never wait on a multi-second load */
    em__req *rl_head, *rl_tail; /* under mu */
    int stopping;               /* under mu: no more reloads are queued */
    int reloader_running, reloader_stop;
    pthread_cond_t reloader_cv;
    pthread_t reloader;

    /* teacher mode: the prediction log, the batcher's record buffer (max_batch), the flusher */
    em_das_writer *das;
    em_das_rec *logrecs;
    pthread_t flusher;
    int flusher_running, flusher_stop; /* flusher_stop under mu, signalled on flush_cv */
    pthread_cond_t flush_cv;
};

/* metrics.c */
void em__metrics_init(em__metrics *m, int max_batch);
void em__hist_observe(em__hist *h, double v);
void em__metrics_response(em__metrics *m, int endpoint, int status, double seconds);

/* request.c: parse the slot's body into its example arrays; on failure a message for
 * the client is in msg and the HTTP status (400) is returned; 0 on success. */
int em__parse_json(em_server *s, em__req *r, char *msg, size_t cap);
int em__parse_bin(em_server *s, em__req *r, char *msg, size_t cap);
/* Format r->prob into r->out (JSON or binary); -1 when out of memory. */
int em__format_json(em_server *s, em__req *r);
int em__format_bin(em__req *r);
/* Make room for `cap` examples in the slot (buffers only grow). */
int em__req_reserve(em_server *s, em__req *r, int cap);

/* batcher.c */
/* Wrap a loaded model for serving: quantize its tables as cfg.tables (then release
 * the fp32 ones), allocate its pooled buffer and run a warm-up forward of max_batch
 * examples. Takes ownership of m (freed on failure). pool may be NULL (reloads run
 * on their own thread and must not use the batcher's pool). */
em_status em__model_make(em_server *s, em_dlrm *m, em_pool *pool, em__model **out);
void em__model_free(em__model *mm);
void *em__batcher_main(void *arg);
/* Answer a parsed request: run it at once on this thread (inline: small, server idle),
 * or queue it to the batcher. Queued with c non-NULL (and the server not draining),
 * c is suspended, *queued = 1 and em__submit returns at once: the batcher resumes c
 * when the answer is in (r->st, r->prob, r->version) and libmicrohttpd calls the
 * handler again. Otherwise (*queued = 0) the answer is in when it returns. */
em_status em__submit(em_server *s, em__req *r, struct MHD_Connection *c, int *queued);
em_status em__batch_alloc(em_server *s);
void em__batch_free(em_server *s);
/* Sigmoid as ember predict computes it (double, overflow-safe), rounded to float. */
float em__sigmoid(float z);

#endif
