/*
 * blas.h - the BLAS wrapper. OpenBLAS is pinned to one thread: ember parallelises over
 * its own pool by giving each worker a disjoint block of the output, so BLAS threads
 * never fight the pool for the cores and results do not depend on the thread count.
 */
#ifndef EMBER_BLAS_H
#define EMBER_BLAS_H

#include <cblas.h>
#undef I /* <complex.h>, pulled in by OpenBLAS cblas.h, defines I; ember uses I for sizes */

/* Call once before any cblas_* use (cheap after the first call; thread-safe). */
void em_blas_init(void);

/* OpenBLAS's kernel set in use ("SkylakeX", "Haswell", "Prescott", ...). */
const char *em_blas_corename(void);
/* The OPENBLAS_CORETYPE value this CPU should run ("SkylakeX" or "Haswell") when
 * OpenBLAS picked a weaker kernel set at load (a CPU model newer than its table), or
 * NULL when its pick is right. Takes effect only in a process started with the
 * variable set (see blas.c). */
const char *em_blas_better_coretype(void);

#endif
