/*
 * pool.c - a fixed thread pool with explicit {ith, nth} work splits (ggml style).
 *
 * em_pool_run() publishes (fn, arg) by bumping a generation counter; workers that are
 * spinning see it at once (training steps launch many short kernels, so wake-up
 * latency matters), workers that gave up spinning sleep on a condition variable and
 * are woken. The caller runs ith = 0 itself and then waits for the others.
 * Runs are not reentrant: a task must not call em_pool_run on the same pool.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <immintrin.h>

#include "ember/core.h"

#define SPIN_ITERS 20000 /* ~100 us of pause loops before a worker sleeps */

struct em_pool {
    int nth;
    pthread_t *threads;
    em_task_fn fn;
    void *arg;
    atomic_uint gen;      /* bumped once per run */
    atomic_int pending;   /* workers (ith > 0) still running the current task */
    atomic_int stop;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int sleepers;         /* guarded by mu */
    struct worker_arg *args; /* one per worker, owned by the pool (no allocation after create) */
};

typedef struct worker_arg {
    em_pool *pool;
    int ith;
} worker_arg;

static void *worker_main(void *p) {
    worker_arg wa = *(worker_arg *)p;
    em_pool *pool = wa.pool;
    unsigned seen = 0; /* gen at creation: a run may start before this thread does */
    for (;;) {
        unsigned g;
        int spins = 0;
        while ((g = atomic_load_explicit(&pool->gen, memory_order_acquire)) == seen &&
               !atomic_load(&pool->stop)) {
            if (++spins < SPIN_ITERS) {
                _mm_pause();
                continue;
            }
            pthread_mutex_lock(&pool->mu);
            pool->sleepers++;
            while (atomic_load(&pool->gen) == seen && !atomic_load(&pool->stop))
                pthread_cond_wait(&pool->cv, &pool->mu);
            pool->sleepers--;
            pthread_mutex_unlock(&pool->mu);
        }
        if (atomic_load(&pool->stop)) return NULL;
        seen = g;
        pool->fn(pool->arg, wa.ith, pool->nth);
        atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_release);
    }
}

em_status em_pool_create(em_pool **out, int nthreads) {
    *out = NULL;
    if (nthreads < 1 || nthreads > 1024) return em_errorf(EM_ERR_INVALID, "thread count %d out of range", nthreads);
    em_pool *pool = em_calloc(1, sizeof *pool);
    if (!pool) return EM_ERR_NOMEM;
    pool->nth = nthreads;
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->cv, NULL);
    pool->threads = em_calloc((size_t)nthreads, sizeof(pthread_t));
    pool->args = em_calloc((size_t)nthreads, sizeof(worker_arg));
    if (!pool->threads || !pool->args) {
        em_pool_free(pool);
        return EM_ERR_NOMEM;
    }
    for (int i = 1; i < nthreads; i++) {
        worker_arg *wa = &pool->args[i];
        wa->pool = pool;
        wa->ith = i;
        if (pthread_create(&pool->threads[i], NULL, worker_main, wa) != 0) {
            pool->nth = i;
            em_pool_free(pool);
            return em_errorf(EM_ERR_THREAD, "could not start worker thread %d", i);
        }
    }
    *out = pool;
    return EM_OK;
}

void em_pool_free(em_pool *pool) {
    if (!pool) return;
    pthread_mutex_lock(&pool->mu);
    atomic_store(&pool->stop, 1);
    pthread_cond_broadcast(&pool->cv);
    pthread_mutex_unlock(&pool->mu);
    for (int i = 1; i < pool->nth; i++)
        if (pool->threads && pool->threads[i]) pthread_join(pool->threads[i], NULL);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->cv);
    em_free(pool->threads);
    em_free(pool->args);
    em_free(pool);
}

int em_pool_nth(const em_pool *pool) { return pool ? pool->nth : 1; }

void em_pool_run(em_pool *pool, em_task_fn fn, void *arg) {
    if (!pool || pool->nth == 1) {
        fn(arg, 0, 1);
        return;
    }
    pool->fn = fn;
    pool->arg = arg;
    atomic_store(&pool->pending, pool->nth - 1);
    atomic_fetch_add_explicit(&pool->gen, 1, memory_order_release);
    pthread_mutex_lock(&pool->mu);
    if (pool->sleepers) pthread_cond_broadcast(&pool->cv);
    pthread_mutex_unlock(&pool->mu);
    fn(arg, 0, pool->nth);
    /* Spin, then yield: on a loaded machine a worker may be descheduled, and spinning
     * on its core's twin would only delay it further. */
    for (int spins = 0; atomic_load_explicit(&pool->pending, memory_order_acquire) > 0; spins++) {
        if (spins < 2000) _mm_pause();
        else sched_yield();
    }
}
