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

#endif
