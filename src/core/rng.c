/*
 * rng.c - xoshiro256** (Blackman & Vigna), seeded by splitmix64. Deterministic across
 * platforms; parallel users derive independent streams with em_mix64(seed ^ stream).
 */
#include <math.h>
#include <time.h>

#include "ember/core.h"

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

void em_rng_seed(em_rng *r, uint64_t seed) {
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) {
        x += 0x9e3779b97f4a7c15ull;
        r->s[i] = em_mix64(x);
    }
}

uint64_t em_rng_u64(em_rng *r) {
    uint64_t *s = r->s;
    uint64_t out = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return out;
}

double em_rng_uniform(em_rng *r) { return (double)(em_rng_u64(r) >> 11) * 0x1.0p-53; }

double em_rng_normal(em_rng *r) {
    double u1 = 1.0 - em_rng_uniform(r), u2 = em_rng_uniform(r); /* u1 in (0,1] */
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

uint64_t em_rng_below(em_rng *r, uint64_t n) {
    if (n == 0) return 0;
    uint64_t lim = UINT64_MAX - UINT64_MAX % n, x; /* reject the biased tail */
    do x = em_rng_u64(r);
    while (x >= lim);
    return x % n;
}

double em_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
