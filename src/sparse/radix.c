/*
 * radix.c - stable LSD radix sort of packed 64-bit items on a key bit field.
 *
 * Design: one read pass builds the histograms of every digit at once, then each digit
 * is one stable scatter pass (ping-pong between the two buffers). The digit count and
 * width are chosen per call to minimise passes * (n + buckets): a batch of 2048 ids on
 * a 10M-row table (24 key bits) uses 3 passes of 256 buckets rather than 2 passes of
 * 4096, while 40k ids on a 100k-row table (17 bits) use 2 passes of 512. A digit whose
 * items all fall in one bucket is skipped (a permutation that would be the identity);
 * that is common for the high digits of skewed (Zipf) ids. Tiny inputs use insertion
 * sort, which is stable too.
 */
#include "sparse/radix.h"

#include <string.h>

static inline uint64_t key_of(uint64_t x, int shift, uint64_t mask) { return (x >> shift) & mask; }

static void insertion_sort(uint64_t *a, size_t n, int shift, uint64_t mask) {
    for (size_t i = 1; i < n; i++) {
        uint64_t x = a[i], k = key_of(x, shift, mask);
        size_t j = i;
        while (j > 0 && key_of(a[j - 1], shift, mask) > k) { /* strict: equal keys keep order */
            a[j] = a[j - 1];
            j--;
        }
        a[j] = x;
    }
}

uint64_t *em__radix_sort(uint64_t *a, uint64_t *b, size_t n, int shift, int key_bits, uint32_t *hist) {
    if (n < 2 || key_bits <= 0) return a;
    uint64_t kmask = key_bits >= 64 ? ~0ull : ((1ull << key_bits) - 1);
    if (n <= 48) {
        insertion_sort(a, n, shift, kmask);
        return a;
    }
    /* Pick the pass count: each pass costs a scatter of n items plus a scan of its
     * buckets (clear + prefix sum). */
    int passes = 0;
    size_t best = SIZE_MAX;
    for (int p = 1; p <= EM__RADIX_MAX_PASSES; p++) {
        int w = (key_bits + p - 1) / p;
        if (w > EM__RADIX_MAX_BITS) continue;
        size_t cost = (size_t)p * (n + ((size_t)1 << w));
        if (cost < best) best = cost, passes = p;
    }
    /* key_bits <= 33 always fits in 3 digits of 11 bits. */
    int width[EM__RADIX_MAX_PASSES] = {0}, lo[EM__RADIX_MAX_PASSES] = {0};
    for (int p = 0, at = 0; p < passes; p++) {
        width[p] = (key_bits - at + (passes - p) - 1) / (passes - p);
        lo[p] = at;
        at += width[p];
    }
    const size_t stride = (size_t)1 << EM__RADIX_MAX_BITS;
    for (int p = 0; p < passes; p++) memset(hist + p * stride, 0, sizeof(uint32_t) << width[p]);

    /* One counting pass for every digit. */
    if (passes == 1) {
        uint32_t *h0 = hist;
        for (size_t i = 0; i < n; i++) h0[key_of(a[i], shift, kmask)]++;
    } else {
        uint64_t m0 = (1ull << width[0]) - 1, m1 = (1ull << width[1]) - 1;
        uint64_t m2 = passes > 2 ? (1ull << width[2]) - 1 : 0;
        uint32_t *h0 = hist, *h1 = hist + stride, *h2 = hist + 2 * stride;
        for (size_t i = 0; i < n; i++) {
            uint64_t k = key_of(a[i], shift, kmask);
            h0[k & m0]++;
            h1[(k >> lo[1]) & m1]++;
            if (passes > 2) h2[(k >> lo[2]) & m2]++;
        }
    }

    uint64_t *src = a, *dst = b;
    for (int p = 0; p < passes; p++) {
        uint32_t *h = hist + p * stride;
        size_t nb = (size_t)1 << width[p];
        /* Exclusive prefix sum; a digit with a single full bucket is the identity. */
        uint32_t sum = 0;
        int trivial = 0;
        for (size_t d = 0; d < nb; d++) {
            uint32_t c = h[d];
            if (c == n) trivial = 1;
            h[d] = sum;
            sum += c;
        }
        if (trivial) continue;
        int s = shift + lo[p];
        uint64_t m = nb - 1;
        for (size_t i = 0; i < n; i++) {
            uint64_t x = src[i];
            dst[h[(x >> s) & m]++] = x;
        }
        uint64_t *t = src;
        src = dst;
        dst = t;
    }
    return src;
}
