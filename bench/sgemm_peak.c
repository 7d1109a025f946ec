/*
 * sgemm_peak.c - the machine's sgemm rate with OpenBLAS (the roofline ember's dense
 * layers are measured against), threads from OPENBLAS_NUM_THREADS, medians of 7 runs:
 *   sgemm_gflops       one large GEMM (2048x512x512): the machine's sgemm peak;
 *   dlrm_gemm_gflops   exactly the GEMMs of one Kaggle-DLRM training step at batch 2048
 *                      (forward, weight and input gradients of all 7 layers, each one
 *                      OpenBLAS call): the best OpenBLAS does on this model's shapes.
 * Build: cc -O2 bench/sgemm_peak.c -lopenblas -o sgemm_peak
 */
#include <cblas.h>
#undef I /* from <complex.h> via cblas.h */
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
    double peak = g[3];
    free(A), free(B), free(C);

    /* The DLRM step's GEMMs: (in, out) per layer, batch 2048. */
    const int Bt = 2048, L = 7, io[7][2] = {{13, 512}, {512, 256}, {256, 64}, {64, 16}, {367, 512}, {512, 256}, {256, 1}};
    float *X[7], *W[7], *Y[7], *dW[7], *dX[7];
    double flop = 0;
    for (int l = 0; l < L; l++) {
        int I = io[l][0], O = io[l][1];
        X[l] = calloc((size_t)Bt * I, 4), W[l] = calloc((size_t)O * I, 4), Y[l] = calloc((size_t)Bt * O, 4);
        dW[l] = calloc((size_t)O * I, 4), dX[l] = calloc((size_t)Bt * I, 4);
        flop += 2.0 * Bt * I * O * (l == 0 ? 2 : 3);
    }
    for (int r = 0; r < 7; r++) {
        double t0 = now();
        for (int i = 0; i < reps; i++)
            for (int l = 0; l < L; l++) {
                int I = io[l][0], O = io[l][1];
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Bt, O, I, 1.f, X[l], I, W[l], I, 0.f, Y[l], O);
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, O, I, Bt, 1.f, Y[l], O, X[l], I, 1.f, dW[l], I);
                if (l != 0)
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Bt, I, O, 1.f, Y[l], O, W[l], I, 0.f, dX[l], I);
            }
        g[r] = flop * reps / (now() - t0) / 1e9;
    }
    qsort(g, 7, sizeof g[0], cmp);
    printf("{\"sgemm_gflops\":%.1f,\"shape\":\"%dx%dx%d\",\"dlrm_gemm_gflops\":%.1f,\"dlrm_gemm_ms\":%.2f,"
           "\"dlrm_gemm_examples_per_s\":%.0f}\n",
           peak, M, N, K, g[3], flop / g[3] / 1e6, Bt / (flop / g[3] / 1e9));
    for (int l = 0; l < L; l++) free(X[l]), free(W[l]), free(Y[l]), free(dW[l]), free(dX[l]);
    return 0;
}
