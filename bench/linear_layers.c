/*
 * bench/linear_layers.c - the Kaggle DLRM's seven linear layers at one batch size,
 * forward (ReLU fused where the model has it) and backward (din, dW, db overwritten;
 * din with the ReLU mask fused where the model fuses it), timed through em_linear_*
 * on ember's pool, for both implementations alternating: ember's AVX-512 kernels and
 * the OpenBLAS tiles (em_linear_set_impl). Prints one JSON line per round and a
 * summary line with medians: GFLOP/s of the whole set of layers per implementation.
 *
 *   bench/linear_layers [batch=2048] [threads=2] [rounds=7] [reps=5]
 * With one thread the times are the process's CPU time, so other load on the machine
 * does not count (cache sharing still does). Build against a Release build (dir b):
 *   cc -O2 -march=native -Iinclude bench/linear_layers.c b/libem_nn.a b/libem_core.a \
 *      -lopenblas -ljansson -lxxhash -lpthread -lm -o linear_layers
 */
#include <stdio.h>
#include <time.h>
#include <stdlib.h>
#include <string.h>

#include "ember/core.h"
#include "ember/nn.h"

#define NL 7
static const int lin[NL] = {13, 512, 256, 64, 367, 512, 256}, lout[NL] = {512, 256, 64, 16, 512, 256, 1};

/* Wall time, or with one thread the process's CPU time (robust to other load). */
static int use_cpu;
static double now(void) {
    if (!use_cpu) return now();
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    const int B = argc > 1 ? atoi(argv[1]) : 2048, th = argc > 2 ? atoi(argv[2]) : 2;
    const int rounds = argc > 3 ? atoi(argv[3]) : 7, reps = argc > 4 ? atoi(argv[4]) : 5;
    use_cpu = th == 1;
    em_pool *pool = NULL;
    if (em_pool_create(&pool, th)) return 1;
    float *x[NL], *y[NL], *dy[NL], *dx[NL], *W[NL], *b[NL], *dW[NL], *db[NL];
    em_rng r;
    em_rng_seed(&r, 1);
    double flops = 0;
    for (int l = 0; l < NL; l++) {
        size_t ni = (size_t)B * lin[l], no = (size_t)B * lout[l], nw = (size_t)lin[l] * lout[l];
        x[l] = malloc(ni * 4), dx[l] = malloc(ni * 4), y[l] = malloc(no * 4), dy[l] = malloc(no * 4);
        W[l] = malloc(nw * 4), dW[l] = malloc(nw * 4), b[l] = malloc(lout[l] * 4), db[l] = malloc(lout[l] * 4);
        for (size_t i = 0; i < ni; i++) x[l][i] = (float)em_rng_uniform(&r) - 0.3f;
        for (size_t i = 0; i < no; i++) dy[l][i] = (float)em_rng_uniform(&r) - 0.5f;
        for (size_t i = 0; i < nw; i++) W[l][i] = (float)em_rng_uniform(&r) - 0.5f;
        for (int i = 0; i < lout[l]; i++) b[l][i] = 0.1f;
        flops += 2.0 * 3.0 * B * lin[l] * lout[l];
    }
    double fw[2][64], bw[2][64];
    for (int k = 0; k < rounds && k < 64; k++) {
        for (int impl = 0; impl < 2; impl++) {
            em_linear_set_impl(impl);
            double tf = 0, tb = 0;
            for (int rep = 0; rep < reps + 1; rep++) {
                double t0 = now();
                for (int l = 0; l < NL; l++)
                    (l == 3 || l == 6 ? em_linear_forward : em_linear_relu_forward)(y[l], x[l], W[l], b[l], B, lin[l],
                                                                                   lout[l], pool);
                double t1 = now();
                for (int l = NL - 1; l >= 0; l--)
                    (l == 0 || l == 4 ? em_linear_backward_set : em_linear_backward_set_relu_in)(
                        l == 0 ? NULL : dx[l], dW[l], db[l], dy[l], x[l], W[l], B, lin[l], lout[l], pool);
                double t2 = now();
                if (rep > 0) tf += t1 - t0, tb += t2 - t1; /* the first is warm-up */
            }
            fw[impl][k] = tf / reps, bw[impl][k] = tb / reps;
        }
        printf("{\"round\":%d,\"kernels_ms\":%.3f,\"blas_ms\":%.3f}\n", k, 1e3 * (fw[0][k] + bw[0][k]),
               1e3 * (fw[1][k] + bw[1][k]));
    }
    double med[2][3];
    for (int impl = 0; impl < 2; impl++) {
        double t[64], f[64], g[64];
        for (int k = 0; k < rounds; k++) t[k] = fw[impl][k] + bw[impl][k], f[k] = fw[impl][k], g[k] = bw[impl][k];
        qsort(t, rounds, sizeof(double), cmp), qsort(f, rounds, sizeof(double), cmp), qsort(g, rounds, sizeof(double), cmp);
        med[impl][0] = t[rounds / 2], med[impl][1] = f[rounds / 2], med[impl][2] = g[rounds / 2];
    }
    printf("{\"batch\":%d,\"threads\":%d,\"gflop\":%.3f,\"kernels_gflops\":%.1f,\"kernels_fwd_gflops\":%.1f,"
           "\"kernels_bwd_gflops\":%.1f,\"blas_gflops\":%.1f,\"blas_fwd_gflops\":%.1f,\"blas_bwd_gflops\":%.1f}\n",
           B, th, flops / 1e9, flops / med[0][0] / 1e9, flops / 3 / med[0][1] / 1e9, flops * 2 / 3 / med[0][2] / 1e9,
           flops / med[1][0] / 1e9, flops / 3 / med[1][1] / 1e9, flops * 2 / 3 / med[1][2] / 1e9);
    /* per layer, kernels then BLAS: GFLOP/s of forward and backward, best of reps */
    for (int impl = 0; impl < 2; impl++) {
        em_linear_set_impl(impl);
        printf("{\"impl\":\"%s\",\"layers\":[", impl ? "blas" : "kernels");
        for (int l = 0; l < NL; l++) {
            double bf = 1e30, bb = 1e30;
            for (int rep = 0; rep < reps + 1; rep++) {
                double t0 = now();
                (l == 3 || l == 6 ? em_linear_forward : em_linear_relu_forward)(y[l], x[l], W[l], b[l], B, lin[l], lout[l],
                                                                               pool);
                double t1 = now();
                (l == 0 || l == 4 ? em_linear_backward_set : em_linear_backward_set_relu_in)(
                    l == 0 ? NULL : dx[l], dW[l], db[l], dy[l], x[l], W[l], B, lin[l], lout[l], pool);
                double t2 = now();
                if (t1 - t0 < bf) bf = t1 - t0;
                if (t2 - t1 < bb) bb = t2 - t1;
            }
            double f = 2.0 * B * lin[l] * lout[l];
            printf("%s{\"shape\":\"%dx%d\",\"fwd_gflops\":%.1f,\"bwd_gflops\":%.1f}", l ? "," : "", lin[l], lout[l],
                   f / bf / 1e9, (l ? 2 : 1) * f / bb / 1e9);
        }
        printf("]}\n");
    }
    em_pool_free(pool);
    return 0;
}
