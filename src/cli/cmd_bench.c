/*
 * cmd_bench.c - `ember bench`: training throughput on synthetic in-memory batches,
 * the same workloads as bench/dlrm_torch.py's `speed` so the two can be compared
 * step for step:
 *   kaggle    13 dense, 26 tables with the Criteo Kaggle cardinalities, D=16,
 *             bottom 13-512-256-64-16, top 367-512-256-1, one id per bag
 *   embheavy  26 tables of 100k rows, D=64, 20 ids per bag,
 *             bottom 13-512-256-64, top 415-512-256-1
 * Ids are uniform random, dense features uniform in [0, 1), labels Bernoulli(0.5);
 * 8 distinct batches are generated up front and cycled, so only training is timed.
 *
 * --infer: inference only (em_infer_forward, the server's forward pass (ember/serve.h);
 * --model-path: em_dlrm_forward, the training forward's layers) on the same kind of
 * batches, timed call by call: examples/s over the whole timed loop, ms per batch,
 * per-call latency percentiles (the figure that matters at --batch 1), and GFLOP/s on
 * the forward FLOPs per example (2 per multiply-add): the MLP GEMMs
 * 2 * sum(in * out) plus the dot interaction's (T+1)T/2 dot products of length D
 * (Kaggle: 948,736 + 11,232 = 959,968; bias adds, ReLU and pooling adds, ~2k, not
 * counted). Small batches cycle through more distinct batches (about 64k ids per
 * table in all, 8 to 4096 batches) so that embedding rows are not all cache-hot. A second
 * loop of the same length times the two halves of the forward apart: pooling
 * (em_embbag_forward) and the dense part (em_infer_forward or em_dlrm_forward_with on
 * the pooled rows). Also printed: the process's CPU time per batch (every thread,
 * spinning included: a figure that moves less than wall time on a shared machine),
 * the largest relative difference between the two paths' logits on the first batch,
 * and gemm_roofline: the forward's GEMMs alone, one OpenBLAS call per layer over the
 * whole batch on --threads OpenBLAS threads (the model-shape roofline); and per CPU
 * second, the forward's GFLOP against one-thread sgemm 2048x512x512's (thread CPU time).
 * --stages adds a third loop that runs the forward's stages one call at a time on the
 * model's own weights, in the model's order (pooling, bottom layers, interaction, top
 * layers, the same ember/nn.h calls em_dlrm_forward makes), timing each: the median ms
 * and GFLOP/s of every stage, to see where a forward pass spends its time.
 * --vs-sgemm N adds the roofline measured against itself: N pairs, each a short run of
 * the peak sgemm (2048x512x512 on --threads OpenBLAS threads, as bench/sgemm_peak.c)
 * and a short run of the workload at --batch on the pool (training steps, whose FLOPs
 * are three times the MLP GEMMs' forward; or em_infer with --infer), the two in
 * turn (sgemm first in even pairs, em_infer first in odd ones), each side ~0.15 s of
 * calls timed one by one, its rate the FLOP of one call over the median call time, a
 * 0.2 s pause before each side so that the other side's idle threads (OpenBLAS's spin
 * ~0.1 s after a call) have gone to sleep. The ratio em_infer / sgemm of each pair
 * compares the two under the machine's conditions of the same second, which on a shared
 * VM drift far more between runs than within one; "vs_sgemm" gives its median and
 * spread (min, max, interquartile range) and each side's median and best rate.
 *
 * Sequence attention (issue 4), self attention forward + backward on one batch:
 *   jattn        Jagged Flash Attention (ember/jattn.h) on jagged Q/K/V
 *   attn_padded  ember's padded dense path (ember/attn_padded.h): inputs already
 *                padded to (B, H, Lmax, dh), full Lmax x Lmax scores, P kept for backward
 * Lengths: lognormal with sigma 1 and the requested mean (mu = ln(mean) - 1/2), rounded,
 * clipped to [1, max-len], sample 0 set to max-len, drawn from --seed; --dump-lengths
 * writes them one per line (bench/attn_torch.py reads that file). Q, K, V, dO are
 * standard normal. A step is: forward, zero dQ/dK/dV, backward.
 * FLOP convention (FlashAttention papers): forward 4*dh*H*pairs per sample (QK^T and
 * PV, 2 flops per multiply-add), backward 2.5x forward (dV, dP, dQ, dK plus the
 * recomputed or re-read scores), where pairs = L^2 (L(L+1)/2 under --causal). "useful"
 * counts each sample's own L; "padded" counts max-len for every sample.
 * Prints one JSON line.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "cli/cli.h"
#include "core/blas.h"
#include "ember/attn_padded.h"
#include "ember/serve.h"

typedef struct {
    const char *config, *opt, *dump;
    int batch, threads, heads, head_dim, max_len, causal, infer, stages, model_path, vs_sgemm, blas_linear;
    long long steps, warmup, seed;
    double lr, mean_len;
} bench_ctx;

static const cli_opt bench_opts[] = {
    OPT_STR("workload", "NAME", "kaggle | embheavy | jattn | attn_padded (default kaggle)", bench_ctx, config),
    OPT_INT("batch", "N", "examples per step (default 2048; attention: 256)", bench_ctx, batch, 1, 1 << 20),
    OPT_STR("opt", "NAME", "sgd (dense and sparse SGD) | adagrad | rowwise_adagrad (dense AdaGrad) (default sgd)", bench_ctx,
            opt),
    OPT_FLAG("infer", "kaggle / embheavy: time inference only (forward, no backward)", bench_ctx, infer),
    OPT_FLAG("model-path", "--infer: time em_dlrm_forward (the training forward's tiled layers) instead of em_infer", bench_ctx,
             model_path),
    OPT_FLAG("stages", "--infer: also time each stage of the forward (pooling, every layer, interaction)", bench_ctx, stages),
    OPT_INT("vs-sgemm", "N",
            "also N paired runs, alternating, of sgemm 2048x512x512 (OpenBLAS, --threads threads) and the workload "
            "(training steps, or em_infer with --infer) at --batch: the ratio of their rates per pair (median, spread)",
            bench_ctx, vs_sgemm, 0, 1000),
    OPT_FLAG("blas-linear", "run the linear layers on OpenBLAS tiles instead of ember's AVX-512 kernels (for comparison)",
             bench_ctx, blas_linear),
    OPT_INT("steps", "N", "timed steps (default 50; jattn 20, attn_padded 3; --infer 100k examples, 50..20000 steps)",
            bench_ctx, steps, 1, 1LL << 40),
    OPT_INT("warmup", "N", "untimed steps first (default 5; jattn 3, attn_padded 1; --infer steps/20)", bench_ctx, warmup, 0, 1LL << 40),
    OPT_INT("threads", "N", "worker threads (default 2)", bench_ctx, threads, 1, 256),
    OPT_DOUBLE("lr", "F", "learning rate (default 0.01)", bench_ctx, lr),
    OPT_INT("heads", "N", "attention heads (default 2)", bench_ctx, heads, 1, 1024),
    OPT_INT("head-dim", "N", "attention head dimension (default 32)", bench_ctx, head_dim, 1, 4096),
    OPT_INT("max-len", "N", "longest sequence; sample 0 has it (default 1024)", bench_ctx, max_len, 1, 32768),
    OPT_DOUBLE_POS("mean-len", "F", "mean of the lognormal lengths (default 64)", bench_ctx, mean_len),
    OPT_FLAG("causal", "causal attention mask", bench_ctx, causal),
    OPT_INT("seed", "N", "seed of lengths and inputs (default 1)", bench_ctx, seed, 0, 1LL << 62),
    OPT_STR("dump-lengths", "FILE", "attention: write the sequence lengths, one per line", bench_ctx, dump),
};

/* Lognormal lengths (see the file comment). */
static void attn_lengths(int *len, const bench_ctx *c) {
    em_rng r;
    em_rng_seed(&r, (uint64_t)c->seed);
    const double mu = log(c->mean_len) - 0.5;
    for (int b = 0; b < c->batch; b++) {
        double x = exp(mu + em_rng_normal(&r));
        long long L = llround(x);
        len[b] = L < 1 ? 1 : L > c->max_len ? c->max_len : (int)L;
    }
    if (c->batch > 0) len[0] = c->max_len;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* `ember bench --workload jattn | attn_padded`. */
static int bench_attn(bench_ctx *c) {
    const int padded = strcmp(c->config, "attn_padded") == 0;
    const int B = c->batch, H = c->heads, dh = c->head_dim, Lmax = c->max_len;
    if (c->steps < 0) c->steps = padded ? 3 : 20;
    if (c->warmup < 0) c->warmup = padded ? 1 : 3;
    int *len = malloc(sizeof(int) * (size_t)B);
    int64_t *off = malloc(sizeof(int64_t) * ((size_t)B + 1));
    if (!len || !off) {
        fprintf(stderr, "ember bench: out of memory\n");
        return 1;
    }
    attn_lengths(len, c);
    if (c->dump) {
        FILE *f = fopen(c->dump, "w");
        if (!f) {
            fprintf(stderr, "ember bench: --dump-lengths: cannot write '%s'\n", c->dump);
            return 1;
        }
        for (int b = 0; b < B; b++) fprintf(f, "%d\n", len[b]);
        if (fclose(f)) {
            fprintf(stderr, "ember bench: --dump-lengths: cannot write '%s'\n", c->dump);
            return 1;
        }
    }
    double useful = 0, padflop = 0;
    off[0] = 0;
    for (int b = 0; b < B; b++) {
        const double L = len[b];
        off[b + 1] = off[b] + len[b];
        useful += c->causal ? L * (L + 1) / 2 : L * L;
        padflop += c->causal ? (double)Lmax * (Lmax + 1) / 2 : (double)Lmax * Lmax;
    }
    useful *= 4.0 * dh * H * 3.5, padflop *= 4.0 * dh * H * 3.5; /* forward 1 + backward 2.5 */
    const size_t total = (size_t)off[B], ld = (size_t)H * (size_t)dh;
    const size_t nj = total * ld, np = (size_t)B * ld * (size_t)Lmax, n = padded ? np : nj;
    em_jattn_cfg cfg = {.B = B, .H = H, .dh = dh, .offsets = off, .causal = c->causal};
    em_pool *pool = NULL;
    em_status st = em_pool_create(&pool, c->threads);
    if (st) {
        cli_fail("bench", st);
        return 1;
    }
    em_mem_reset_peak();
    /* Q K V dO O dQ dK dV in the workload's layout; lse (jagged) or P (padded) */
    float *t[8], *aux;
    int oom = 0;
    for (int k = 0; k < 8; k++) oom |= !(t[k] = em_malloc(sizeof(float) * (n ? n : 1)));
    aux = em_malloc(sizeof(float) * (padded ? (size_t)B * (size_t)H * (size_t)Lmax * (size_t)Lmax : total * (size_t)H + 1));
    if (oom || !aux) {
        fprintf(stderr, "ember bench: out of memory\n");
        return 1;
    }
    float *Q = t[0], *K = t[1], *V = t[2], *dO = t[3], *O = t[4], *dQ = t[5], *dK = t[6], *dV = t[7];
    {
        em_rng r;
        em_rng_seed(&r, (uint64_t)c->seed + 1);
        float *tmp = padded ? em_malloc(sizeof(float) * (nj ? nj : 1)) : NULL;
        if (padded && !tmp) {
            fprintf(stderr, "ember bench: out of memory\n");
            return 1;
        }
        for (int k = 0; k < 4; k++) {
            float *x = padded ? tmp : t[k];
            for (size_t i = 0; i < nj; i++) x[i] = (float)em_rng_normal(&r);
            if (padded && (st = em_attn_pad(t[k], tmp, &cfg, Lmax, pool))) break;
        }
        em_free(tmp);
    }
    double *ms = malloc(sizeof(double) * (size_t)c->steps * 3);
    double fwd_sum = 0, bwd_sum = 0;
    for (long long s = 0; !st && s < c->warmup + c->steps; s++) {
        const double t0 = em_now();
        st = padded ? em_attn_padded_forward(O, aux, Q, K, V, &cfg, Lmax, pool)
                    : em_jattn_forward(O, aux, Q, K, V, &cfg, pool);
        const double t1 = em_now();
        memset(dQ, 0, sizeof(float) * n), memset(dK, 0, sizeof(float) * n), memset(dV, 0, sizeof(float) * n);
        if (!st)
            st = padded ? em_attn_padded_backward(dQ, dK, dV, dO, Q, K, V, aux, &cfg, Lmax, pool)
                        : em_jattn_backward(dQ, dK, dV, dO, Q, K, V, O, aux, &cfg, pool);
        const double t2 = em_now();
        if (s >= c->warmup) {
            ms[s - c->warmup] = 1e3 * (t2 - t0);
            fwd_sum += t1 - t0, bwd_sum += t2 - t1;
        }
    }
    if (st) {
        cli_fail("bench", st);
        return 1;
    }
    qsort(ms, (size_t)c->steps, sizeof(double), cmp_double);
    const double med = ms[c->steps / 2], best = ms[0];
    double check = 0; /* a checksum so the outputs are observably used */
    for (size_t i = 0; i < n; i += 97) check += (double)O[i] + dQ[i] + dK[i] + dV[i];
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("{\"workload\":\"%s\",\"batch\":%d,\"heads\":%d,\"head_dim\":%d,\"max_len\":%d,\"mean_len_target\":%g,"
           "\"mean_len\":%.2f,\"total_rows\":%zu,\"causal\":%d,\"threads\":%d,\"seed\":%lld,\"steps\":%lld,"
           "\"ms_per_step\":%.3f,\"ms_best\":%.3f,\"ms_fwd\":%.3f,\"ms_bwd\":%.3f,"
           "\"useful_gflop\":%.4f,\"padded_gflop\":%.4f,\"useful_gflops\":%.2f,\"tensor_mb\":%.2f,"
           "\"peak_rss_mb\":%.1f,\"checksum\":%.6g,"
           "\"flop_convention\":\"fwd 4*dh*H*pairs per sample, bwd 2.5x fwd, pairs=L^2 (causal L(L+1)/2)\"}\n",
           c->config, B, H, dh, Lmax, c->mean_len, (double)total / (B ? B : 1), total, c->causal, c->threads, c->seed,
           c->steps, med, best, 1e3 * fwd_sum / (double)c->steps, 1e3 * bwd_sum / (double)c->steps, useful / 1e9,
           padflop / 1e9, useful / 1e9 / (med / 1e3), (double)em_mem_peak() / 1048576.0, (double)ru.ru_maxrss / 1024.0,
           check);
    for (int k = 0; k < 8; k++) em_free(t[k]);
    em_free(aux);
    free(ms), free(len), free(off);
    em_pool_free(pool);
    return 0;
}

/* Percentile q in [0, 1] of sorted x[0..n) (nearest rank). */
static double pct(const double *x, long long n, double q) {
    long long k = (long long)ceil(q * (double)n) - 1;
    return x[k < 0 ? 0 : k >= n ? n - 1 : k];
}

/* --stages: the forward's stages one call at a time (see the file comment). Returns the
 * JSON fields "stages":[...],"ms_stages_sum":... (malloc'd), or NULL after an error. */
static char *bench_stages(const bench_ctx *c, const em_dlrm_cfg *m, em_dlrm *model, const em_batch *batches, int NB,
                          float *pooled, em_pool *pool) {
    const int B = c->batch, T = m->num_tables, D = m->dim, nl = m->n_bot - 1 + m->n_top - 1, ns = nl + 2;
    const int inter_w = em_dot_interact_out_dim(T, D);
    float *act[2 * EM_DLRM_MAX_LAYERS + 1], *inter = em_malloc(sizeof(float) * (size_t)B * (size_t)inter_w);
    double *t = malloc(sizeof(double) * (size_t)c->steps * (size_t)ns);
    const float *W[2 * EM_DLRM_MAX_LAYERS], *bias[2 * EM_DLRM_MAX_LAYERS];
    int in[2 * EM_DLRM_MAX_LAYERS], out[2 * EM_DLRM_MAX_LAYERS];
    char name[2 * EM_DLRM_MAX_LAYERS + 2][16];
    int oom = !inter || !t;
    for (int l = 0; l < nl; l++) {
        const int top = l >= m->n_bot - 1, i = top ? l - (m->n_bot - 1) : l;
        in[l] = top ? m->top[i] : m->bot[i], out[l] = top ? m->top[i + 1] : m->bot[i + 1];
        char wn[32], bn[32];
        snprintf(wn, sizeof wn, "%s.%d.weight", top ? "top" : "bot", i);
        snprintf(bn, sizeof bn, "%s.%d.bias", top ? "top" : "bot", i);
        snprintf(name[l + 1 + top], sizeof name[0], "%s.%d", top ? "top" : "bot", i);
        W[l] = em_dlrm_param(model, wn, 0, NULL), bias[l] = em_dlrm_param(model, bn, 0, NULL);
        oom |= !(act[l] = em_malloc(sizeof(float) * (size_t)B * (size_t)out[l]));
    }
    snprintf(name[0], sizeof name[0], "pooling");
    snprintf(name[m->n_bot], sizeof name[0], "interaction");
    if (oom) {
        fprintf(stderr, "ember bench: out of memory\n");
        return NULL;
    }
    em_embbag *bag = em_dlrm_embbag(model);
    em_status st = EM_OK;
    double check = 0;
    for (long long s = 0; !st && s < c->steps; s++) {
        const em_batch *b = &batches[(c->warmup + s) % NB];
        double *ts = t + (size_t)s * (size_t)ns, t0 = em_now();
        st = em_embbag_forward(bag, pooled, b->indices, b->offsets, b->per_id_w, B, pool);
        double t1 = em_now();
        ts[0] = t1 - t0;
        for (int l = 0, k = 1; l < nl; l++, k++) {
            const float *x = l == 0 ? b->dense : l == m->n_bot - 1 ? inter : act[l - 1];
            if (l == m->n_bot - 1) { /* the interaction before the first top layer */
                t0 = em_now();
                em_dot_interact_forward(inter, act[l - 1], pooled, B, T, D, pool);
                t1 = em_now();
                ts[k++] = t1 - t0;
            }
            t0 = em_now();
            if (l == nl - 1) em_linear_forward(act[l], x, W[l], bias[l], B, in[l], out[l], pool);
            else em_linear_relu_forward(act[l], x, W[l], bias[l], B, in[l], out[l], pool);
            t1 = em_now();
            ts[k] = t1 - t0;
        }
        check += act[nl - 1][0];
    }
    if (st) {
        cli_fail("bench", st);
        return NULL;
    }
    size_t cap = 256 + (size_t)ns * 160, len = 0;
    char *js = malloc(cap);
    double *col = malloc(sizeof(double) * (size_t)c->steps), sum = 0;
    if (!js || !col) {
        fprintf(stderr, "ember bench: out of memory\n");
        return NULL;
    }
    len += (size_t)snprintf(js + len, cap - len, "\"stages\":[");
    for (int k = 0; k < ns; k++) {
        for (long long s = 0; s < c->steps; s++) col[s] = t[(size_t)s * (size_t)ns + (size_t)k];
        qsort(col, (size_t)c->steps, sizeof(double), cmp_double);
        const double med = pct(col, c->steps, 0.5);
        const int l = k == 0 || k == m->n_bot ? -1 : k < m->n_bot ? k - 1 : k - 2;
        const double fl = k == 0 ? 0 : l < 0 ? 2.0 * D * (double)T * (T + 1) / 2 : 2.0 * in[l] * out[l];
        sum += med;
        len += (size_t)snprintf(js + len, cap - len, "%s{\"name\":\"%s\",\"in\":%d,\"out\":%d,\"ms\":%.4f,\"gflops\":%.2f}",
                                k ? "," : "", name[k], l >= 0 ? in[l] : k == 0 ? T : T + 1,
                                l >= 0 ? out[l] : k == 0 ? T * D : inter_w, 1e3 * med, fl * B / med / 1e9);
    }
    snprintf(js + len, cap - len, "],\"ms_stages_sum\":%.4f,\"stages_checksum\":%.6g", 1e3 * sum, check);
    for (int l = 0; l < nl; l++) em_free(act[l]);
    em_free(inter);
    free(t), free(col);
    return js;
}

/* `ember bench --workload kaggle|embheavy --infer`: forward passes only (see the file
 * comment). batches[NB] are the preloaded inputs. */
/* The forward's GEMMs alone, each layer one OpenBLAS call over the whole batch with
 * OpenBLAS's own `threads` threads (bias, ReLU and interaction left out): the best
 * OpenBLAS does on this model's inference shapes, the "model-shape roofline". Median
 * of 7 timings of 3 passes, in ms per pass. OpenBLAS is set back to one thread. */
void openblas_set_num_threads(int num_threads);
static double gemm_roofline_ms(const bench_ctx *c, const em_dlrm_cfg *m, em_dlrm *model) {
    const int B = c->batch, nb = m->n_bot - 1, nt = m->n_top - 1;
    int w = 0;
    for (int i = 0; i < m->n_bot; i++) w = m->bot[i] > w ? m->bot[i] : w;
    for (int i = 0; i < m->n_top; i++) w = m->top[i] > w ? m->top[i] : w;
    float *x = em_calloc((size_t)B * (size_t)w, sizeof(float)), *y = em_calloc((size_t)B * (size_t)w, sizeof(float));
    if (!x || !y) {
        em_free(x), em_free(y);
        return -1;
    }
    for (size_t i = 0; i < (size_t)B * (size_t)w; i++) x[i] = 0.01f * (float)(i % 13);
    em_blas_init();
    openblas_set_num_threads(c->threads);
    double t[7];
    for (int r = -1; r < 7; r++) {
        const double t0 = em_now();
        for (int it = 0; it < 3; it++)
            for (int l = 0; l < nb + nt; l++) {
                char name[32];
                const int top = l >= nb, i = top ? l - nb : l, I = top ? m->top[i] : m->bot[i],
                          O = top ? m->top[i + 1] : m->bot[i + 1];
                snprintf(name, sizeof name, "%s.%d.weight", top ? "top" : "bot", i);
                const float *W = em_dlrm_param(model, name, 0, NULL);
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, B, O, I, 1.f, (l & 1) ? y : x, I, W, I, 0.f,
                            (l & 1) ? x : y, O);
            }
        if (r >= 0) t[r] = (em_now() - t0) / 3;
    }
    openblas_set_num_threads(1);
    qsort(t, 7, sizeof t[0], cmp_double);
    em_free(x), em_free(y);
    return 1e3 * t[3];
}

/* CPU seconds of the whole process so far (user + system, every thread). */
static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + 1e-6 * (double)ru.ru_utime.tv_usec + (double)ru.ru_stime.tv_sec +
           1e-6 * (double)ru.ru_stime.tv_usec;
}

/* sgemm 2048x512x512 on one OpenBLAS thread, in GFLOP per second of this thread's CPU
 * time (median of 7): the peak per core-second, a figure that other processes on the
 * machine move far less than wall-clock rates. */
static double sgemm_cpu_gflops(void) {
    const int M = 2048, N = 512, K = 512;
    float *A = em_calloc((size_t)M * K, sizeof(float)), *Bm = em_calloc((size_t)N * K, sizeof(float)),
          *C = em_calloc((size_t)M * N, sizeof(float));
    if (!A || !Bm || !C) {
        em_free(A), em_free(Bm), em_free(C);
        return -1;
    }
    for (size_t i = 0; i < (size_t)M * K; i++) A[i] = 0.1f * (float)(i % 7);
    for (size_t i = 0; i < (size_t)N * K; i++) Bm[i] = 0.1f * (float)(i % 5);
    em_blas_init();
    double g[7];
    for (int r = -1; r < 7; r++) {
        struct timespec a, b;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.f, A, K, Bm, K, 0.f, C, N);
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
        if (r >= 0) g[r] = 2.0 * M * N * K / ((double)(b.tv_sec - a.tv_sec) + 1e-9 * (double)(b.tv_nsec - a.tv_nsec)) / 1e9;
    }
    qsort(g, 7, sizeof g[0], cmp_double);
    em_free(A), em_free(Bm), em_free(C);
    return g[3];
}

/* One side of a --vs-sgemm pair: calls fn(arg) (one warm-up call, then timed calls
 * until ~0.15 s have passed, at least 5), after a 0.2 s pause; returns the median call
 * time in seconds, or -1 after an error. */
typedef int (*pair_fn)(void *arg);
static double pair_side(pair_fn fn, void *arg) {
    const struct timespec pause = {0, 200000000};
    nanosleep(&pause, NULL);
    if (fn(arg)) return -1;
    double t[512];
    int n = 0;
    const double start = em_now();
    while (n < 512 && (n < 5 || em_now() - start < 0.15)) {
        const double t0 = em_now();
        if (fn(arg)) return -1;
        t[n++] = em_now() - t0;
    }
    qsort(t, (size_t)n, sizeof t[0], cmp_double);
    return t[n / 2];
}

typedef struct {
    const float *A, *Bm;
    float *C;
} sgemm_arg;
static int sgemm_call(void *p) {
    sgemm_arg *a = p;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, 2048, 512, 512, 1.f, a->A, 512, a->Bm, 512, 0.f, a->C, 512);
    return 0;
}

typedef struct {
    em_infer *inf;
    const em_batch *batches;
    int NB, next;
    float *logits;
    em_pool *pool;
} infer_arg;
static int infer_call(void *p) {
    infer_arg *a = p;
    const em_batch *b = &a->batches[a->next++ % a->NB];
    return em_infer_forward(a->inf, b, NULL, a->logits, a->pool) != EM_OK;
}

typedef struct {
    em_dlrm *model;
    const em_batch *batches;
    int NB, next;
    em_pool *pool;
} train_arg;
static int train_call(void *p) {
    train_arg *a = p;
    double loss;
    return em_dlrm_train_step(a->model, &a->batches[a->next++ % a->NB], &loss, a->pool) != EM_OK;
}

/* --vs-sgemm (see the file comment): `pairs` pairs of sgemm and em_infer runs; returns
 * the JSON field "vs_sgemm":{...} (malloc'd), or NULL after an error. */
static char *bench_vs_sgemm(const bench_ctx *c, pair_fn model_fn, void *model_arg, const char *side_name,
                            double flop_per_example) {
    const int M = 2048, N = 512, K = 512, P = c->vs_sgemm;
    float *A = em_calloc((size_t)M * K, sizeof(float)), *Bm = em_calloc((size_t)N * K, sizeof(float)),
          *C = em_calloc((size_t)M * N, sizeof(float));
    double *sg = malloc(sizeof(double) * (size_t)P * 4), *ig = sg + P, *ra = sg + 2 * P, *tmp = sg + 3 * P;
    size_t cap = 512 + (size_t)P * 48, len = 0;
    char *js = malloc(cap);
    if (!A || !Bm || !C || !sg || !js) {
        em_free(A), em_free(Bm), em_free(C), free(sg), free(js);
        fprintf(stderr, "ember bench: out of memory\n");
        return NULL;
    }
    for (size_t i = 0; i < (size_t)M * K; i++) A[i] = 0.1f * (float)(i % 7);
    for (size_t i = 0; i < (size_t)N * K; i++) Bm[i] = 0.1f * (float)(i % 5);
    em_blas_init();
    sgemm_arg sa = {A, Bm, C};
    const double sflop = 2.0 * M * N * K, iflop = flop_per_example * c->batch;
    int err = 0;
    for (int p = 0; p < P && !err; p++) {
        double ts = 0, ti = 0;
        for (int side = 0; side < 2 && !err; side++) {
            if ((side == 0) == (p % 2 == 0)) { /* sgemm first in even pairs */
                openblas_set_num_threads(c->threads);
                ts = pair_side(sgemm_call, &sa);
                openblas_set_num_threads(1);
            } else {
                ti = pair_side(model_fn, model_arg);
            }
            err = ts < 0 || ti < 0;
        }
        sg[p] = sflop / ts / 1e9, ig[p] = iflop / ti / 1e9, ra[p] = ig[p] / sg[p];
    }
    em_free(A), em_free(Bm), em_free(C);
    if (err) {
        free(sg), free(js);
        fprintf(stderr, "ember bench: --vs-sgemm: the %s side failed: %s\n", side_name, em_last_error());
        return NULL;
    }
    double q[3][4]; /* ratios, sgemm, em_infer: min, median, max, interquartile range */
    const double *ser[3] = {ra, sg, ig};
    for (int k = 0; k < 3; k++) {
        memcpy(tmp, ser[k], sizeof(double) * (size_t)P);
        qsort(tmp, (size_t)P, sizeof(double), cmp_double);
        q[k][0] = tmp[0], q[k][1] = P % 2 ? tmp[P / 2] : 0.5 * (tmp[P / 2 - 1] + tmp[P / 2]), q[k][2] = tmp[P - 1];
        q[k][3] = pct(tmp, P, 0.75) - pct(tmp, P, 0.25);
    }
    len += (size_t)snprintf(js + len, cap - len,
                            "\"vs_sgemm\":{\"pairs\":%d,\"sgemm_shape\":\"2048x512x512\",\"sgemm_threads\":%d,"
                            "\"ratio_median\":%.4f,\"ratio_min\":%.4f,\"ratio_max\":%.4f,\"ratio_iqr\":%.4f,"
                            "\"sgemm_gflops_median\":%.2f,\"sgemm_gflops_best\":%.2f,"
                            "\"%s_gflops_median\":%.2f,\"%s_gflops_best\":%.2f,\"ratio_of_bests\":%.4f,\"ratios\":[",
                            P, c->threads, q[0][1], q[0][0], q[0][2], q[0][3], q[1][1], q[1][2], side_name, q[2][1],
                            side_name, q[2][2], q[2][2] / q[1][2]);
    for (int p = 0; p < P; p++) len += (size_t)snprintf(js + len, cap - len, "%s%.4f", p ? "," : "", ra[p]);
    len += (size_t)snprintf(js + len, cap - len, "],\"sgemm_gflops_runs\":[");
    for (int p = 0; p < P; p++) len += (size_t)snprintf(js + len, cap - len, "%s%.1f", p ? "," : "", sg[p]);
    len += (size_t)snprintf(js + len, cap - len, "],\"%s_gflops_runs\":[", side_name);
    for (int p = 0; p < P; p++) len += (size_t)snprintf(js + len, cap - len, "%s%.1f", p ? "," : "", ig[p]);
    snprintf(js + len, cap - len, "]}");
    free(sg);
    return js;
}

static int bench_infer(const bench_ctx *c, const em_dlrm_cfg *m, em_dlrm *model, em_batch *batches, int NB,
                       em_pool *pool) {
    const int B = c->batch, T = m->num_tables, D = m->dim;
    double mlp = 0;
    for (int i = 0; i + 1 < m->n_bot; i++) mlp += 2.0 * m->bot[i] * m->bot[i + 1];
    for (int i = 0; i + 1 < m->n_top; i++) mlp += 2.0 * m->top[i] * m->top[i + 1];
    const double inter = 2.0 * D * (double)T * (T + 1) / 2, flop = mlp + inter;
    float *logits = em_malloc(sizeof(float) * (size_t)B);
    float *pooled = em_malloc(sizeof(float) * (size_t)B * (size_t)T * (size_t)D);
    double *ms = malloc(sizeof(double) * (size_t)c->steps);
    if (!logits || !pooled || !ms) {
        fprintf(stderr, "ember bench: out of memory\n");
        return 1;
    }
    em_infer *inf = NULL;
    em_status st = c->model_path ? EM_OK : em_infer_create(&inf, model, B, em_pool_nth(pool));
    /* the two paths' answers on the first batch: the largest difference */
    double maxdiff = 0;
    if (!st) st = em_dlrm_forward(model, &batches[0], pooled, pool); /* pooled: scratch (B <= B T D) */
    if (!st && inf) {
        st = em_infer_forward(inf, &batches[0], NULL, logits, pool);
        for (int i = 0; !st && i < B; i++) {
            const double d = fabs((double)logits[i] - (double)pooled[i]) / (1.0 + fabs((double)pooled[i]));
            if (d > maxdiff) maxdiff = d;
        }
    }
    double check = 0, secs = 0, cpu0 = 0;
    for (long long s = 0; !st && s < c->warmup + c->steps; s++) {
        if (s == c->warmup) cpu0 = cpu_seconds();
        const double t0 = em_now();
        st = inf ? em_infer_forward(inf, &batches[s % NB], NULL, logits, pool)
                 : em_dlrm_forward(model, &batches[s % NB], logits, pool);
        const double t1 = em_now();
        if (s >= c->warmup) ms[s - c->warmup] = 1e3 * (t1 - t0), secs += t1 - t0;
        check += logits[0];
    }
    const double cpu_s = cpu_seconds() - cpu0; /* all threads, spinning included */
    /* the same calls again, pooling and dense part timed apart */
    double emb_s = 0, dense_s = 0, emb_cpu = 0, dense_cpu = 0;
    em_embbag *bag = em_dlrm_embbag(model);
    for (long long s = 0; !st && s < c->steps; s++) {
        const em_batch *b = &batches[(c->warmup + s) % NB];
        const double c0 = cpu_seconds(), t0 = em_now();
        st = em_embbag_forward(bag, pooled, b->indices, b->offsets, b->per_id_w, B, pool);
        const double c1 = cpu_seconds(), t1 = em_now();
        if (!st) st = inf ? em_infer_forward(inf, b, pooled, logits, pool) : em_dlrm_forward_with(model, b, pooled, logits, pool);
        const double c2 = cpu_seconds(), t2 = em_now();
        emb_s += t1 - t0, dense_s += t2 - t1, emb_cpu += c1 - c0, dense_cpu += c2 - c1;
        check += logits[0];
    }
    if (st) {
        cli_fail("bench", st);
        return 1;
    }
    char *vs = NULL;
    infer_arg ia = {inf, batches, NB, 0, logits, pool};
    if (c->vs_sgemm && inf && !(vs = bench_vs_sgemm(c, infer_call, &ia, "infer", flop))) return 1;
    em_infer_free(inf);
    const double roof_ms = gemm_roofline_ms(c, m, model), sg_cpu = sgemm_cpu_gflops();
    char *stages = c->stages ? bench_stages(c, m, model, batches, NB, pooled, pool) : NULL;
    if (c->stages && !stages) return 1;
    qsort(ms, (size_t)c->steps, sizeof(double), cmp_double);
    const double n = (double)c->steps, per = secs / n;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("{\"config\":\"%s\",\"mode\":\"infer\",\"path\":\"%s\",\"max_rel_diff_vs_model\":%.3g,"
           "\"gemm_roofline_ms\":%.4f,\"gemm_roofline_gflops\":%.2f,\"cpu_ms_per_batch\":%.4f,"
           "\"gflops_per_cpu_s\":%.2f,\"sgemm_1t_gflops_per_cpu_s\":%.2f,\"batch\":%d,\"threads\":%d,\"steps\":%lld,\"distinct_batches\":%d,"
           "\"examples_per_s\":%.1f,\"ms_per_batch\":%.4f,\"gflops\":%.2f,"
           "\"us_p50\":%.2f,\"us_p90\":%.2f,\"us_p99\":%.2f,\"us_min\":%.2f,\"us_max\":%.2f,"
           "\"ms_embed\":%.4f,\"ms_dense\":%.4f,\"dense_gflops\":%.2f,\"cpu_ms_embed\":%.4f,\"cpu_ms_dense\":%.4f,"
           "\"fwd_flop_per_example\":%.0f,\"mlp_flop\":%.0f,\"interaction_flop\":%.0f,"
           "\"peak_rss_mb\":%.1f,\"checksum\":%.6g%s%s%s%s}\n",
           c->config, c->model_path ? "model" : "infer", maxdiff, roof_ms, mlp * B / (roof_ms * 1e-3) / 1e9, 1e3 * cpu_s / (double)c->steps,
           flop * B * (double)c->steps / cpu_s / 1e9, sg_cpu, B, c->threads,
           c->steps, NB, (double)B / per, 1e3 * per, flop * B / per / 1e9,
           1e3 * pct(ms, c->steps, 0.5), 1e3 * pct(ms, c->steps, 0.9), 1e3 * pct(ms, c->steps, 0.99), 1e3 * ms[0],
           1e3 * ms[c->steps - 1], 1e3 * emb_s / n, 1e3 * dense_s / n, flop * B / (dense_s / n) / 1e9, 1e3 * emb_cpu / n, 1e3 * dense_cpu / n, flop, mlp, inter,
           (double)ru.ru_maxrss / 1024.0, check, stages ? "," : "", stages ? stages : "", vs ? "," : "", vs ? vs : "");
    free(stages), free(vs);
    em_free(logits), em_free(pooled);
    free(ms);
    return 0;
}

int cmd_bench(int argc, char **argv) {
    bench_ctx c = {.config = "kaggle", .opt = "sgd", .batch = -1, .threads = 2, .steps = -1, .warmup = -1, .lr = 0.01,
                   .heads = 2, .head_dim = 32, .max_len = 1024, .mean_len = 64, .seed = 1};
    char *pos[1];
    int npos;
    int rc = cli_parse("bench", "[options]", bench_opts, CLI_NOPTS(bench_opts), &c, argc, argv,
                       pos, &npos, 0);
    if (rc) return rc < 0 ? 2 : 0;
    if (strcmp(c.config, "jattn") == 0 || strcmp(c.config, "attn_padded") == 0) {
        if (c.batch < 0) c.batch = 256;
        return bench_attn(&c);
    }
    if (c.batch < 0) c.batch = 2048;
    em_linear_set_impl(c.blas_linear);
    if (c.vs_sgemm && c.infer && c.model_path) {
        fprintf(stderr, "ember bench: --vs-sgemm times em_infer, not --model-path\n");
        return 2;
    }
    if (c.steps < 0) c.steps = c.infer ? (c.batch >= 2000 ? 50 : c.batch <= 5 ? 20000 : 100000 / c.batch) : 50;
    if (c.warmup < 0) c.warmup = c.infer ? (c.steps < 100 ? 5 : c.steps / 20) : 5;
    em_dlrm_cfg m = em_dlrm_kaggle(0);
    int per_bag = 1;
    if (strcmp(c.config, "embheavy") == 0) {
        for (int t = 0; t < 26; t++) m.rows[t] = 100000;
        m.dim = 64;
        int bot[] = {13, 512, 256, 64}, top[] = {415, 512, 256, 1};
        m.n_bot = 4, m.n_top = 4;
        memcpy(m.bot, bot, sizeof bot);
        memcpy(m.top, top, sizeof top);
        per_bag = 20;
    } else if (strcmp(c.config, "kaggle") != 0) {
        fprintf(stderr, "ember bench: --workload: expected kaggle, embheavy, jattn or attn_padded, got '%s'\n", c.config);
        return 2;
    }
    em_optim_kind sk;
    if (em_optim_parse(c.opt, &sk) || sk == EM_OPT_ADAM || sk == EM_OPT_ADAMW) {
        fprintf(stderr, "ember bench: --opt: expected sgd, adagrad or rowwise_adagrad, got '%s'\n", c.opt);
        return 2;
    }
    m.sparse_opt = em_optim_default(sk, (float)c.lr);
    m.dense_opt = em_optim_default(sk == EM_OPT_SGD ? EM_OPT_SGD : EM_OPT_ADAGRAD, (float)c.lr);
    em_pool *pool = NULL;
    em_dlrm *model = NULL;
    em_status st = em_pool_create(&pool, c.threads);
    if (st == EM_OK) st = em_dlrm_create(&model, &m, pool);
    if (st) {
        cli_fail("bench", st);
        em_pool_free(pool);
        return 1;
    }
    const int B = c.batch, T = m.num_tables;
    /* training: 8 batches; inference: about 64k ids per table, 8 to 4096 batches */
    int NB = 8;
    if (c.infer && (long long)B * per_bag < 8192) NB = 65536 / (B * per_bag) > 4096 ? 4096 : 65536 / (B * per_bag);
    em_batch *batches = calloc((size_t)NB, sizeof *batches);
    if (!batches) {
        fprintf(stderr, "ember bench: out of memory\n");
        return 1;
    }
    em_rng r;
    em_rng_seed(&r, 12345);
    for (int k = 0; k < NB; k++) {
        em_batch *b = &batches[k];
        b->B = B, b->num_dense = m.num_dense, b->num_sparse = T;
        b->dense = em_malloc((size_t)B * (size_t)m.num_dense * sizeof(float));
        b->label = em_malloc((size_t)B * sizeof(float));
        b->indices = em_malloc((size_t)B * (size_t)T * (size_t)per_bag * sizeof(int64_t));
        b->offsets = em_malloc(((size_t)B * (size_t)T + 1) * sizeof(int64_t));
        if (!b->dense || !b->label || !b->indices || !b->offsets) {
            fprintf(stderr, "ember bench: out of memory\n");
            return 1;
        }
        for (size_t i = 0; i < (size_t)B * (size_t)m.num_dense; i++) b->dense[i] = (float)em_rng_uniform(&r);
        for (int i = 0; i < B; i++) b->label[i] = (float)(em_rng_u64(&r) & 1);
        int64_t n = 0;
        b->offsets[0] = 0;
        for (int t = 0; t < T; t++)
            for (int i = 0; i < B; i++) {
                for (int j = 0; j < per_bag; j++) b->indices[n++] = (int64_t)em_rng_below(&r, (uint64_t)m.rows[t]);
                b->offsets[(size_t)t * (size_t)B + (size_t)i + 1] = n;
            }
    }
    int ret = 0;
    if (c.infer) {
        ret = bench_infer(&c, &m, model, batches, NB, pool);
    } else {
        double loss = 0, t0 = 0;
        for (long long s = 0; s < c.warmup + c.steps; s++) {
            if (s == c.warmup) t0 = em_now();
            if ((st = em_dlrm_train_step(model, &batches[s % NB], &loss, pool))) {
                cli_fail("bench", st);
                return 1;
            }
        }
        double secs = em_now() - t0;
        /* training FLOPs per example: three times the MLP GEMMs' forward (forward, din,
         * dW), 2 per multiply-add; the Kaggle DLRM: 2,846,208 */
        double flop = 0;
        for (int l = 0; l + 1 < m.n_bot; l++) flop += 6.0 * m.bot[l] * m.bot[l + 1];
        for (int l = 0; l + 1 < m.n_top; l++) flop += 6.0 * m.top[l] * m.top[l + 1];
        char *vs = NULL;
        train_arg ta = {model, batches, NB, 0, pool};
        if (c.vs_sgemm && !(vs = bench_vs_sgemm(&c, train_call, &ta, "train", flop))) return 1;
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        printf("{\"config\":\"%s\",\"batch\":%d,\"opt\":\"%s\",\"threads\":%d,\"examples_per_s\":%.1f,\"ms_per_step\":%.3f,"
               "\"steps\":%lld,\"final_loss\":%.5f,\"state_mb\":%.1f,\"peak_rss_mb\":%.1f,\"gemm_flop_per_example\":%.0f,"
               "\"gflops\":%.2f,\"linear\":\"%s\"%s%s}\n",
               c.config, B, c.opt, c.threads, (double)B * (double)c.steps / secs, 1e3 * secs / (double)c.steps, c.steps,
               loss, (double)em_dlrm_state_bytes(model) / 1048576.0, (double)ru.ru_maxrss / 1024.0, flop,
               flop * B * (double)c.steps / secs / 1e9, em_linear_impl() ? "openblas" : "kernels", vs ? "," : "",
               vs ? vs : "");
        free(vs);
    }
    for (int k = 0; k < NB; k++)
        em_free(batches[k].dense), em_free(batches[k].label), em_free(batches[k].indices), em_free(batches[k].offsets);
    free(batches);
    em_dlrm_free(model);
    em_pool_free(pool);
    return ret;
}
