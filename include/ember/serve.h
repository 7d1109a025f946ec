/*
 * ember/serve.h - an HTTP/1.1 inference server for a trained DLRM, with dynamic
 * batching across concurrent requests (docs/SERVING.md has the protocol).
 *
 *   em_dlrm *m;  em_pool *pool;
 *   em_pool_create(&pool, 2);  em_dlrm_load(&m, "model.st", NULL, pool);
 *   em_serve_cfg cfg = em_serve_default();  cfg.port = 0;    // 0: pick a free port
 *   em_server *s;
 *   em_serve_create(&s, m, pool, &cfg);   // takes ownership of m and pool
 *   em_serve_start(s);                    // returns at once; serving on em_serve_port(s)
 *   ...                                   // e.g. wait for SIGTERM
 *   em_serve_free(s);                     // stops, frees the model and the pool
 *
 * Endpoints: POST /v1/predict (JSON), POST /v1/predict.bin (binary), GET /healthz,
 * GET /metrics (Prometheus text format), POST /admin/reload (loopback clients only).
 *
 * Tables: cfg.tables = EM_QT_FP16, EM_QT_INT8 or EM_QT_INT8C serves from row-quantized copies of the
 * embedding tables (ember/quant.h), pooled on the fly, and frees the fp32 tables.
 *
 * Hot reload: em_serve_reload (also POST /admin/reload, and SIGHUP in `ember serve`)
 * loads and quantizes a checkpoint on the calling thread, never the batcher's, then
 * hands it to the batcher, which swaps it in between two batches: a batch runs wholly
 * on one model, requests already batched finish on the old one, later ones get the
 * new one, and the old model is freed once the swap is done (no batch can use it). A
 * checkpoint that fails to load leaves the old model serving.
 * model_version is the step count for the model given at create, and
 * "<step>-r<n>" after the n-th successful reload, so it changes on every reload.
 *
 * Threads: libmicrohttpd runs `threads` HTTP workers (event loops, each polling its
 * share of the connections); a worker parses a request into a preallocated request
 * slot and either answers it at once on its own thread (at most inline_max examples,
 * server idle) or suspends the connection and queues the slot. One batcher thread
 * owns the model and the pool: it takes queued requests, waiting at most max_wait_us
 * after the first one for more, until max_batch examples are gathered, runs one
 * forward pass over all of them into buffers allocated at create time, hands each
 * request its slice and resumes its connection. A request larger than max_batch runs
 * alone, in max_batch chunks. A worker never waits on the batcher, so one worker
 * keeps any number of requests in flight (up to max_conns).
 *
 * Teacher mode (ExFM, TECHNIQUES.md section 4): with cfg.log_path the server is a
 * foundation model whose every prediction is logged, once, in a DAS log (ember/das.h)
 * that students join: (example id, vertical, logit, model step). Requests must then
 * carry example ids (JSON "ids", binary version 2); the batcher appends the batch's
 * records after its forward pass (a buffered copy, no I/O), and a flusher thread
 * writes the buffer out and fsyncs every log_flush_ms, outside the append lock, so a
 * slow disk never stalls a forward pass. A failed append does not fail the request:
 * it is counted (log_errors, ember_teacher_log_errors_total). em_serve_free flushes
 * and closes the log.
 *
 * Like the rest of the library the server never prints and never exits.
 */
#ifndef EMBER_SERVE_H
#define EMBER_SERVE_H

#include "core.h"
#include "dlrm.h"
#include "quant.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const char *bind;   /* IPv4 address to listen on; NULL = "127.0.0.1" */
    int port;           /* 0 = an ephemeral port (see em_serve_port) */
    int threads;        /* HTTP worker threads (libmicrohttpd thread pool; event loops), >= 1 */
    int max_batch;      /* examples per forward pass, >= 1 */
    int max_wait_us;    /* longest wait for more requests once one is queued, >= 0 */
    int inline_max;     /* a request of at most this many examples that finds the server idle
                         * (no pass running, nothing queued) runs on its HTTP worker thread at
                         * once, without the batcher; 0 = every request goes to the batcher */
    size_t max_body;    /* request bodies larger than this get 413; 16 bytes .. 2 GiB */
    int max_conns;      /* open connections at most (request slots), >= threads */
    em_qtype tables;    /* EM_QT_FP32 (the model's own tables), EM_QT_FP16 or EM_QT_INT8 */
    const char *model_path; /* the model's checkpoint (copied): what a reload with no
                             * path loads; NULL = a reload must name one */
    const char *log_path;   /* teacher mode: append every prediction to this DAS log
                             * (ember/das.h; created or appended to); NULL = off */
    int log_flush_ms;       /* teacher mode: write the log out and fsync it this often, > 0 */
} em_serve_cfg;

/* 127.0.0.1:8080, 1 HTTP thread, max batch 256, max wait 200 us, inline_max 16, 1 MiB bodies, 64 connections,
 * fp32 tables, no model path, no prediction log (flush every 1000 ms when set). */
em_serve_cfg em_serve_default(void);

typedef struct em_server em_server;

/* Validate cfg, take ownership of the model and the pool (also on failure: both are
 * freed then), preallocate every buffer of the inference path and run one warm-up
 * forward pass of max_batch examples so that the model's activations are allocated
 * too. Nothing listens yet. */
em_status em_serve_create(em_server **out, em_dlrm *model, em_pool *pool, const em_serve_cfg *cfg);
/* Start the batcher thread and the HTTP daemon. EM_ERR_IO if the address cannot be
 * bound (detail names it), EM_ERR_THREAD if a thread cannot start. */
em_status em_serve_start(em_server *s);
/* Load the checkpoint at path (NULL: cfg.model_path), quantize it as cfg.tables, warm
 * it up, and make it the served model; returns once the batcher has swapped it in (at
 * once if the server is not started) and the old model is freed. The checkpoint must
 * have the served model's dense and sparse feature counts (table sizes, dim and MLPs
 * may differ). On any failure the old model keeps serving and the status (with a
 * detail) is returned. Reloads are serialised; safe to call from any thread but the
 * batcher, while requests are being served. */
em_status em_serve_reload(em_server *s, const char *path);
/* The current model_version into buf (NUL-terminated, truncated to cap). */
void em_serve_model_version(em_server *s, char *buf, size_t cap);

/* The port actually listened on (the chosen one when cfg.port was 0); 0 if not started. */
int em_serve_port(const em_server *s);
/* Stop accepting, finish the requests in flight, stop the batcher. Idempotent. */
void em_serve_stop(em_server *s);
/* em_serve_stop, then free everything including the model and the pool. NULL is a no-op. */
void em_serve_free(em_server *s);

enum { EM_SERVE_EP_PREDICT = 0, EM_SERVE_EP_PREDICT_BIN, EM_SERVE_EP_HEALTHZ, EM_SERVE_EP_METRICS,
       EM_SERVE_EP_OTHER, EM_SERVE_EP_RELOAD, EM_SERVE_EP__COUNT };

typedef struct {
    uint64_t requests[EM_SERVE_EP__COUNT]; /* responses sent, by endpoint */
    uint64_t errors;                       /* responses with status >= 400 */
    uint64_t examples;                     /* examples predicted */
    uint64_t batches;                      /* forward passes */
    uint64_t max_batch_seen;               /* largest forward pass so far */
    int64_t model_step;                    /* the model's optimizer step count */
    uint64_t reloads, reload_failures;     /* em_serve_reload calls that swapped / failed */
    uint64_t reloading;                    /* reloads loading a checkpoint right now (0 or 1) */
    size_t table_bytes;                    /* the served embedding tables (as quantized) */
    uint64_t logged, log_errors;           /* teacher mode: predictions appended / failed appends */
} em_serve_stats;

/* A consistent-enough snapshot (each counter is read atomically). */
void em_serve_stats_get(const em_server *s, em_serve_stats *out);
/* The /metrics page into buf (NUL-terminated, truncated to cap); returns its full length. */
size_t em_serve_metrics_text(const em_server *s, char *buf, size_t cap);

/* ------------------------------------------------------------ inference path */
/*
 * em_infer: the inference-only forward pass the server runs (src/serve/infer.c):
 * row chunks taken through the whole network by one worker each (one pool launch for
 * the dense part), weights packed once at create, bias and ReLU fused into the GEMM
 * kernel. An example's logit does not depend on the other examples of its batch, the
 * batch size or the thread count (AVX-512 builds; elsewhere it may depend on the batch
 * size and thread count), and equals em_dlrm_forward's up to float rounding. It reads the model's
 * parameters in place: recreate it after the model's dense parameters change.
 */
typedef struct em_infer em_infer;
/* A plain DLRM only (EM_ERR_UNSUPPORTED for a sequence model). Buffers are reserved
 * for batches of max_batch on a pool of nth threads. */
em_status em_infer_create(em_infer **out, em_dlrm *m, int max_batch, int nth);
void em_infer_free(em_infer *inf); /* NULL is a no-op */
/* logits[b->B] for batch b. pooled: the (B, T, D) pooled embeddings (quantized tables),
 * or NULL to pool the model's own fp32 tables (in the same pass: each worker pools its
 * chunk of the batch before computing it). Batches of at most 24
 * run on the caller alone. Allocates only when B or the pool's thread count exceeds
 * what was reserved. */
em_status em_infer_forward(em_infer *inf, const em_batch *b, const float *pooled, float *logits, em_pool *pool);

#ifdef __cplusplus
}
#endif
#endif
