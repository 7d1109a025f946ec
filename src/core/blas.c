/*
 * blas.c - OpenBLAS set-up: one BLAS thread (ember's pool does the splitting), and
 * the check that OpenBLAS runs the kernels this CPU deserves.
 *
 * OpenBLAS (built with DYNAMIC_ARCH, as Debian ships it) picks its kernel set once,
 * when the library is loaded, from the CPU's family/model numbers. A CPU newer than
 * its table (e.g. Emerald Rapids, family 6 model 207, under OpenBLAS 0.3.21) falls back
 * to "Prescott", the SSE3 kernels: sgemm then runs 4-6x slower than the AVX-512 ones
 * the CPU supports. The choice cannot be changed after load; only the
 * OPENBLAS_CORETYPE environment variable, read at load, overrides it. So
 * em_blas_better_coretype() compares OpenBLAS's pick with the CPU's features (as the
 * OS enables them) and names the kernel set to ask for; the CLI sets the variable and
 * re-executes itself before doing any work (src/cli/main.c). A program linking
 * libember can do the same, or set OPENBLAS_CORETYPE itself.
 */
#include <pthread.h>
#include <stddef.h>
#include <strings.h>

#include "core/blas.h"

void openblas_set_num_threads(int num_threads);
char *openblas_get_corename(void);

static pthread_once_t once = PTHREAD_ONCE_INIT;
static void init_once(void) { openblas_set_num_threads(1); }
void em_blas_init(void) { pthread_once(&once, init_once); }

const char *em_blas_corename(void) { return openblas_get_corename(); }

static int in_list(const char *name, const char *const *list) {
    for (; *list; list++)
        if (strcasecmp(name, *list) == 0) return 1;
    return 0;
}

const char *em_blas_better_coretype(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    const char *cur = openblas_get_corename();
    if (!cur) return NULL;
    __builtin_cpu_init();
    /* OpenBLAS's AVX-512 kernels (SkylakeX) use F, CD, BW, DQ and VL */
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
        static const char *const ok[] = {"SkylakeX", "Cooperlake", "SapphireRapids", NULL};
        return in_list(cur, ok) ? NULL : "SkylakeX";
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        static const char *const ok[] = {"Haswell", "Zen", "SkylakeX", "Cooperlake", "SapphireRapids", NULL};
        return in_list(cur, ok) ? NULL : "Haswell";
    }
#endif
    return NULL;
}
