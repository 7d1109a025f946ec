/*
 * ember/core.h - status codes, the counting allocator, the thread pool, the RNG.
 *
 * Everything in libember returns an em_status; the library never prints and never
 * exits. A failing call may leave a human-readable detail (file, line, field, ...)
 * in a per-thread buffer that em_last_error() returns; the CLI prints it.
 */
#ifndef EMBER_CORE_H
#define EMBER_CORE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- status */

typedef enum {
    EM_OK = 0,
    EM_ERR_NOMEM,       /* an allocation failed (or was made to fail by a test) */
    EM_ERR_INVALID,     /* bad argument or configuration */
    EM_ERR_IO,          /* open/read/write/fsync/rename failed (errno in the detail) */
    EM_ERR_PARSE,       /* malformed input data (file:line:field in the detail) */
    EM_ERR_CORRUPT,     /* a file of ours failed validation (bad magic, checksum, bounds) */
    EM_ERR_EOF,         /* a stream has no more records; not a failure */
    EM_ERR_UNSUPPORTED, /* valid, but not something this build does */
    EM_ERR_THREAD,      /* a thread could not be started */
    EM_ERR__COUNT
} em_status;

/* A static, never-NULL name/explanation of a status code. */
const char *em_status_str(em_status s);

/* The detail message of the last failure on this thread ("" if none). */
const char *em_last_error(void);

/* Set the calling thread's detail message (printf-style) and return `s`, so that
 * error paths read `return em_errorf(EM_ERR_PARSE, "%s:%llu: field %d ...", ...)`. */
em_status em_errorf(em_status s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void em_clear_error(void);

/* ------------------------------------------------------- counting allocator */
/*
 * Every allocation of libember goes through these. Memory is 64-byte aligned (cache
 * line / AVX-512 friendly), counted (bytes in use, peak), and can be made to fail
 * after N further successful calls so that tests reach every error path.
 * em_free(NULL) is a no-op. Thread-safe.
 */
void *em_malloc(size_t n);
void *em_calloc(size_t count, size_t size);
void *em_realloc(void *p, size_t n);
void em_free(void *p);
/* Ask for transparent huge pages over the 2 MiB-aligned interior of [p, p + bytes),
 * before first touch (large tables, activation blocks: fewer TLB misses and page
 * walks). Advice only: without THP nothing changes but speed. */
void em_advise_huge(void *p, size_t bytes);
char *em_strdup(const char *s);

size_t em_mem_in_use(void);    /* bytes currently allocated through em_* */
size_t em_mem_peak(void);      /* high-water mark of em_mem_in_use() */
size_t em_mem_allocs(void);    /* number of successful allocations so far */
void em_mem_reset_peak(void);
/* Fail every allocation after `n` more successful ones; n < 0 disables. */
void em_mem_fail_after(long n);

/* ------------------------------------------------------------ thread pool */
/*
 * A fixed pool of nth workers (the caller is worker 0). em_pool_run() calls
 * fn(arg, ith, nth) once for every ith in [0, nth) and returns when all are done.
 * Kernels split their own work with em_split(); results must not depend on nth
 * unless documented. A NULL pool means "run on the caller, nth = 1".
 */
typedef struct em_pool em_pool;
typedef void (*em_task_fn)(void *arg, int ith, int nth);

em_status em_pool_create(em_pool **out, int nthreads);
void em_pool_free(em_pool *pool);
int em_pool_nth(const em_pool *pool); /* 1 for NULL */
void em_pool_run(em_pool *pool, em_task_fn fn, void *arg);

/* Contiguous share [*lo, *hi) of n items for worker ith of nth. */
static inline void em_split(size_t n, int ith, int nth, size_t *lo, size_t *hi) {
    size_t per = n / (size_t)nth, rem = n % (size_t)nth, i = (size_t)ith;
    *lo = i * per + (i < rem ? i : rem);
    *hi = *lo + per + (i < rem ? 1 : 0);
}

/* ------------------------------------------------------------------- RNG */
/* xoshiro256** seeded through splitmix64: fast, deterministic, platform-independent. */
typedef struct { uint64_t s[4]; } em_rng;

void em_rng_seed(em_rng *r, uint64_t seed);
uint64_t em_rng_u64(em_rng *r);
double em_rng_uniform(em_rng *r);                /* [0, 1) with 53 random bits */
double em_rng_normal(em_rng *r);                 /* standard normal (Box-Muller, no caching) */
uint64_t em_rng_below(em_rng *r, uint64_t n);    /* uniform in [0, n), unbiased */
/* A stateless 64-bit mix (splitmix64 finalizer): hash-derived parameters and streams. */
static inline uint64_t em_mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* ------------------------------------------------------------------ misc */
double em_now(void); /* monotonic seconds */

/* Always-on assertion for programmer errors (not for bad input): names file and line. */
void em__assert_fail(const char *expr, const char *file, int line) __attribute__((noreturn));
#define EM_ASSERT(x) ((x) ? (void)0 : em__assert_fail(#x, __FILE__, __LINE__))

#ifdef __cplusplus
}
#endif
#endif
