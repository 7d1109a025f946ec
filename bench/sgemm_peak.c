/*
 * sgemm_peak.c - the machine's sgemm rate with OpenBLAS (the roofline ember's dense
 * layers are measured against). Square-ish shapes large enough for peak, threads
 * from OPENBLAS_NUM_THREADS. Prints GFLOP/s (median of 7 runs) as JSON.
 * Build: cc -O2 bench/sgemm_peak.c -lopenblas -o sgemm_peak
 */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(void) {
    const int M = 2048, N = 512, K = 512, reps = 10;
    float *A = malloc(sizeof(float) * M * K), *B = malloc(sizeof(float) * K * N), *C = malloc(sizeof(float) * M * N);
    for (int i = 0; i < M * K; i++) A[i] = (float)(i % 7) * 0.1f;
    for (int i = 0; i < K * N; i++) B[i] = (float)(i % 5) * 0.1f;
    double g[7];
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.f, A, K, B, K, 0.f, C, N);
    for (int r = 0; r < 7; r++) {
        double t0 = now();
        for (int i = 0; i < reps; i++)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.f, A, K, B, K, 0.f, C, N);
        g[r] = 2.0 * M * N * K * reps / (now() - t0) / 1e9;
    }
    qsort(g, 7, sizeof g[0], cmp);
    printf("{\"sgemm_gflops\":%.1f,\"shape\":\"%dx%dx%d\"}\n", g[3], M, N, K);
    free(A), free(B), free(C);
    return 0;
}
