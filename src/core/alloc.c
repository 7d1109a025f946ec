/*
 * alloc.c - the counting allocator.
 *
 * Every block carries a 64-byte header holding its size, so the data that follows is
 * 64-byte aligned and frees can be counted. Counters are atomics; the failure
 * injection counter lets tests make the N+1-th allocation fail.
 */
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <string.h>

#include "ember/core.h"

#define HDR 64

static atomic_size_t g_in_use, g_peak, g_allocs;
static atomic_long g_fail_after = -1;

static int should_fail(void) {
    long n = atomic_load(&g_fail_after);
    while (n >= 0) {
        if (n == 0) return 1;
        if (atomic_compare_exchange_weak(&g_fail_after, &n, n - 1)) return 0;
    }
    return 0;
}

static void account(size_t add, size_t sub) {
    size_t now = atomic_fetch_add(&g_in_use, add) + add;
    atomic_fetch_sub(&g_in_use, sub);
    now -= sub;
    size_t peak = atomic_load(&g_peak);
    while (now > peak && !atomic_compare_exchange_weak(&g_peak, &peak, now)) {
    }
}

void *em_malloc(size_t n) {
    if (should_fail() || n > SIZE_MAX - HDR) return NULL;
    char *base = aligned_alloc(HDR, (n + HDR + HDR - 1) / HDR * HDR);
    if (!base) return NULL;
    *(size_t *)base = n;
    account(n, 0);
    atomic_fetch_add(&g_allocs, 1);
    return base + HDR;
}

void *em_calloc(size_t count, size_t size) {
    if (size && count > SIZE_MAX / size) return NULL;
    void *p = em_malloc(count * size);
    if (p) memset(p, 0, count * size);
    return p;
}

void em_free(void *p) {
    if (!p) return;
    char *base = (char *)p - HDR;
    account(0, *(size_t *)base);
    free(base);
}

void *em_realloc(void *p, size_t n) {
    if (!p) return em_malloc(n);
    size_t old = *(size_t *)((char *)p - HDR);
    void *q = em_malloc(n);
    if (!q) return NULL; /* p untouched, as realloc() */
    memcpy(q, p, old < n ? old : n);
    em_free(p);
    return q;
}

char *em_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = em_malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

size_t em_mem_in_use(void) { return atomic_load(&g_in_use); }
size_t em_mem_peak(void) { return atomic_load(&g_peak); }
size_t em_mem_allocs(void) { return atomic_load(&g_allocs); }
void em_mem_reset_peak(void) { atomic_store(&g_peak, atomic_load(&g_in_use)); }
void em_mem_fail_after(long n) { atomic_store(&g_fail_after, n < 0 ? -1 : n); }

void em_advise_huge(void *p, size_t bytes) {
#ifdef MADV_HUGEPAGE
    const uintptr_t H = (uintptr_t)2 << 20;
    uintptr_t lo = ((uintptr_t)p + H - 1) & ~(H - 1), hi = ((uintptr_t)p + bytes) & ~(H - 1);
    if (hi > lo) (void)madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
#else
    (void)p, (void)bytes;
#endif
}
