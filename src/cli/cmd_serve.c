/*
 * cmd_serve.c - `ember serve`: load a checkpoint and answer predictions over HTTP
 * until SIGINT or SIGTERM (docs/SERVING.md has the protocol).
 *
 * SIGINT and SIGTERM are blocked before any thread starts, so every thread of the
 * server inherits the mask and the main thread alone receives them, synchronously,
 * in sigwait(): no async-signal-safety concerns, and shutdown runs the ordinary
 * em_serve_free path (in-flight requests finish, then the batcher stops).
 *
 * SIGHUP is taken the same way and reloads the checkpoint named by --model (rewrite
 * it in place, e.g. with ember train's atomic save, then send SIGHUP); the load runs on
 * the main thread while the server keeps answering. POST /admin/reload does the same
 * over HTTP, optionally with another path.
 *
 * --log-predictions FILE makes it an ExFM teacher: every prediction is appended to a
 * DAS log (ember/das.h) that students join by example id.
 */
#include <signal.h>
#include <string.h>

#include "cli/cli.h"
#include "ember/serve.h"

typedef struct {
    const char *model, *bind, *tables, *log;
    int port, threads, infer_threads, max_batch, max_wait_us, inline_max, max_conns, log_flush_ms;
    int64_t max_body;
} serve_ctx;

static const cli_opt serve_opts[] = {
    OPT_STR("model", "CKPT", "checkpoint written by ember train", serve_ctx, model),
    OPT_STR("tables", "fp32|fp16|int8|int8c", "embedding tables to serve from: fp32, or row-quantized fp16 / int8 / int8c (compact int8) (default fp32)",
            serve_ctx, tables),
    OPT_STR("bind", "ADDR", "IPv4 address to listen on (default 127.0.0.1)", serve_ctx, bind),
    OPT_INT("port", "N", "TCP port (default 8080; 0 = pick a free one and print it)", serve_ctx, port, 0, 65535),
    OPT_INT("threads", "N", "HTTP worker threads, each an event loop over its share of the connections (default 1)", serve_ctx, threads, 1, 1024),
    OPT_INT("infer-threads", "N", "threads of each forward pass (default 2)", serve_ctx, infer_threads, 1, 256),
    OPT_INT("max-batch", "N", "examples per forward pass (default 256)", serve_ctx, max_batch, 1, 1 << 20),
    OPT_INT("max-wait-us", "N", "longest wait for more requests to batch (default 200)", serve_ctx, max_wait_us, 0,
            10000000),
    OPT_INT("inline-max", "N",
            "a request of at most N examples that finds the server idle runs at once on its HTTP thread, "
            "without the batcher (default 16; 0 = always batch)",
            serve_ctx, inline_max, 0, 1 << 20),
    OPT_INT("max-body", "BYTES", "larger request bodies get 413 (default 1048576, at most 2 GiB)", serve_ctx, max_body, 16,
            1LL << 31),
    OPT_INT("max-conns", "N", "open connections at most (default 64)", serve_ctx, max_conns, 1, 65536),
    OPT_STR("log-predictions", "FILE",
            "teacher mode: append every prediction (example id, vertical, logit, step) to this DAS log for "
            "students to join; requests must then carry example ids",
            serve_ctx, log),
    OPT_INT("log-flush-ms", "N", "teacher mode: write the log out and fsync it every N ms (default 1000)", serve_ctx,
            log_flush_ms, 1, 3600000),
};

int cmd_serve(int argc, char **argv) {
    em_serve_cfg d = em_serve_default();
    serve_ctx c = {.port = d.port, .threads = d.threads, .infer_threads = 2, .max_batch = d.max_batch,
                   .max_wait_us = d.max_wait_us, .inline_max = d.inline_max, .max_conns = d.max_conns, .max_body = (int64_t)d.max_body,
                   .log_flush_ms = d.log_flush_ms};
    char *pos[1];
    int npos;
    int rc = cli_parse("serve", "--model CKPT [--port N] [options]", serve_opts, CLI_NOPTS(serve_opts), &c, argc, argv,
                       pos, &npos, 0);
    if (rc) return rc < 0 ? 2 : 0;
    if (!c.model) {
        fprintf(stderr, "ember serve: --model CKPT is required\n");
        return 2;
    }
    if (c.max_conns < c.threads) c.max_conns = c.threads;
    em_qtype qt = EM_QT_FP32;
    if (c.tables && em_qtype_parse(c.tables, &qt)) {
        fprintf(stderr, "ember serve: --tables must be fp32, fp16, int8 or int8c (got '%s')\n", c.tables);
        return 2;
    }

    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    em_pool *pool;
    em_dlrm *m;
    em_status st = em_pool_create(&pool, c.infer_threads);
    if (st == EM_OK && (st = em_dlrm_load(&m, c.model, NULL, pool)) != EM_OK) em_pool_free(pool);
    if (st) {
        cli_fail("serve", st);
        return 1;
    }
    int64_t step = em_dlrm_step_count(m);
    em_serve_cfg cfg = d;
    cfg.bind = c.bind, cfg.port = c.port, cfg.threads = c.threads, cfg.max_batch = c.max_batch;
    cfg.max_wait_us = c.max_wait_us, cfg.inline_max = c.inline_max, cfg.max_body = (size_t)c.max_body, cfg.max_conns = c.max_conns;
    cfg.tables = qt, cfg.model_path = c.model;
    cfg.log_path = c.log, cfg.log_flush_ms = c.log_flush_ms;
    em_server *s;
    if ((st = em_serve_create(&s, m, pool, &cfg)) != EM_OK) { /* frees m and pool */
        cli_fail("serve", st);
        return 1;
    }
    if ((st = em_serve_start(s)) != EM_OK) {
        cli_fail("serve", st);
        em_serve_free(s);
        return 1;
    }
    em_serve_stats stats;
    em_serve_stats_get(s, &stats);
    printf("ember serve: listening on http://%s:%d (model %s, step %lld, %s tables, %.1f MiB%s%s)\n",
           c.bind ? c.bind : "127.0.0.1", em_serve_port(s), c.model, (long long)step, em_qtype_name(qt),
           (double)stats.table_bytes / (1 << 20), c.log ? ", logging predictions to " : "", c.log ? c.log : "");
    fflush(stdout);
    int sig = 0;
    for (;;) {
        sigwait(&sigs, &sig);
        if (sig != SIGHUP) break;
        char ver[32];
        if ((st = em_serve_reload(s, NULL)) != EM_OK) {
            em_serve_model_version(s, ver, sizeof ver);
            fprintf(stderr, "ember serve: SIGHUP: reload of %s failed, still serving model_version %s\n", c.model, ver);
            cli_fail("serve", st);
        } else {
            em_serve_model_version(s, ver, sizeof ver);
            fprintf(stderr, "ember serve: SIGHUP: reloaded %s, model_version %s\n", c.model, ver);
        }
    }
    fprintf(stderr, "ember serve: %s, shutting down\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    em_serve_stats_get(s, &stats);
    em_serve_free(s);
    unsigned long long req = 0;
    for (int i = 0; i < EM_SERVE_EP__COUNT; i++) req += stats.requests[i];
    fprintf(stderr, "ember serve: %llu requests (%llu errors), %llu examples in %llu forward passes\n", req,
            (unsigned long long)stats.errors, (unsigned long long)stats.examples, (unsigned long long)stats.batches);
    if (c.log)
        fprintf(stderr, "ember serve: %llu predictions logged to %s (%llu could not be)\n",
                (unsigned long long)stats.logged, c.log, (unsigned long long)stats.log_errors);
    return 0;
}
