/*
 * rowstore.h - what the dynamic tables (dyntable.c) and the SSD tier's row cache
 * (ssdtier.c) share, internal to the sparse layer: both keep rows of (D + S) floats in
 * slots that never move, find them through an open-addressing hash of 64-bit ids, and
 * run a training step the same way (dedup of each table's ids in batch order, pooling,
 * a fused optimizer update of each unique row over its positions in batch order), so
 * that an SSD table is a dynamic table bit for bit.
 *
 *   em__idmap    (table, id) -> slot: linear probing over a power-of-two array,
 *                backward-shift deletion (no tombstones); home bucket of (t, id) =
 *                em__idhash(id, salt[t]) & (cap - 1) (salt NULL: 0 for every table).
 *   em__ubatch   the batch of the last training forward: per table its positions
 *                [kbeg, kbeg + n), the unique ids in order of first occurrence
 *                (uid, uhash, ucnt), positions per unique in batch order (CSR ustart /
 *                plist), each position's unique and example (pos2u, pos2b), a slot per
 *                unique (uslot) and per position (pslot), the dedup map; and the
 *                backward's per-worker gradient rows and work queue.
 *   em__row_*    initial rows from (seed, table, id); pooling; the fused update.
 *   EM__SELECT_DEFINE  quickselect / sort of eviction candidates (per key type).
 */
#ifndef EMBER_SPARSE_ROWSTORE_H
#define EMBER_SPARSE_ROWSTORE_H

#include <math.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "core/simd.h"
#include "ember/core.h"
#include "ember/embbag.h"
#include "ember/optim.h"
#include "sparse/rowops.h"

#define EM__NONE UINT32_MAX
#define EM__ROW_PREFETCH 8
#define EM__CHUNKS_PER_WORKER 8

/* ------------------------------------------------------------------ hash */

typedef struct {
    uint64_t id;
    uint32_t slot; /* EM__NONE: empty bucket */
    int32_t t;
} em__hent;

typedef struct {
    em__hent *h;
    size_t cap; /* power of two (0 before the first reserve) */
} em__idmap;

static inline uint64_t em__idhash(uint64_t id, uint64_t salt) { return em_mix64(id ^ salt); }

/* Buckets that hold `rows` entries at load factor <= 1/2 (at least 16). */
static inline size_t em__idmap_buckets(uint64_t rows) {
    size_t c = 16;
    while ((uint64_t)c < 2 * rows) c <<= 1;
    return c;
}

static inline uint32_t em__idmap_find(const em__idmap *m, int t, uint64_t id, uint64_t hv) {
    if (!m->cap) return EM__NONE;
    size_t mk = m->cap - 1, i = (size_t)hv & mk;
    for (;;) {
        const em__hent *e = &m->h[i];
        if (e->slot == EM__NONE) return EM__NONE;
        if (e->id == id && e->t == t) return e->slot;
        i = (i + 1) & mk;
    }
}

/* (t, id) must be absent and the load factor leave room (reserved beforehand). */
static inline void em__idmap_put(em__idmap *m, int t, uint64_t id, uint64_t hv, uint32_t slot) {
    size_t mk = m->cap - 1, i = (size_t)hv & mk;
    while (m->h[i].slot != EM__NONE) i = (i + 1) & mk;
    m->h[i].id = id, m->h[i].t = t, m->h[i].slot = slot;
}

/* Remove (t, id), which must be present: the entries after the hole that may move into
 * it (their home bucket is not in the cyclic range (hole, j]) are shifted back, so
 * probes never meet a premature empty bucket. */
void em__idmap_del(em__idmap *m, int t, uint64_t id, const uint64_t *salt);
/* Grow to `buckets` (a power of two) if smaller, rehashing the entries (slots do not
 * move). who names the caller in the NOMEM message. */
em_status em__idmap_reserve(em__idmap *m, size_t buckets, const uint64_t *salt, const char *who);

/* ------------------------------------------------------------ the batch */

typedef struct {
    size_t kbeg, n;    /* positions [kbeg, kbeg + n) */
    size_t nuniq;
    size_t mbeg, mcap; /* the table's region of the dedup map */
    int nchunks;       /* backward work items */
} em__ubtab;

typedef struct {
    int T;
    em__ubtab *tab; /* [T] */
    size_t cap_nnz, cap_map;
    uint64_t *uid, *uhash;
    uint32_t *ucnt, *ustart, *uslot, *pos2u, *pos2b, *plist, *pslot, *map;
    /* backward: a gradient row per worker and the queue of (table, chunk) items */
    float *gbuf;
    size_t gstride;
    struct em__qitem { int t, part; } *queue;
    int cap_nth;
} em__ubatch;

em_status em__ubatch_init(em__ubatch *u, int T, int D, const char *who);
void em__ubatch_free(em__ubatch *u);

/* offsets[0] = 0, non-decreasing, fewer than 2^32 - 1 ids; B >= 0. *nnz = the ids. */
em_status em__check_offsets(const char *who, int T, const int64_t *off, int B, size_t *nnz);

/* Make room for a batch of nnz ids and lay the tables out in it (positions, dedup map
 * regions; nuniq = 0). *grew = 1 when the scratch was reallocated (a batch recorded in
 * it is gone). */
em_status em__ubatch_begin(em__ubatch *u, const int64_t *offsets, int B, size_t nnz, const char *who, int *grew);

/* Table t: dedup its positions in batch order through the map (hash em__idhash(id,
 * salt), high bits); unique numbers by first occurrence with their occurrence counts;
 * pos2u, pos2b. Returns (and records) the number of uniques. */
uint32_t em__ubatch_dedup(em__ubatch *u, int t, const uint64_t *ids, const int64_t *offsets, int B, uint64_t salt);
/* Table t: positions per unique in batch order (ustart, plist); ucnt is kept. */
void em__ubatch_csr(em__ubatch *u, int t);

/* The ids given to a backward must be the recorded batch's: EM_ERR_INVALID otherwise. */
em_status em__ubatch_check_ids(const em__ubatch *u, const uint64_t *ids, const char *who);
/* Scratch for nth workers, then the backward's queue: chunks of uniques per table in
 * proportion to its share (one per table with one worker). Returns the items. */
em_status em__ubatch_workers(em__ubatch *u, int nth, const char *who);
size_t em__ubatch_queue(em__ubatch *u, int nth);

/* A backward worker's next item of the queue (nq items, taken through *next): table *t,
 * uniques [*lo, *hi) (possibly empty). 0 when the queue is done. */
static inline int em__ubatch_take(const em__ubatch *u, atomic_size_t *next, size_t nq, int *t, size_t *lo, size_t *hi) {
    size_t i = atomic_fetch_add_explicit(next, 1, memory_order_relaxed);
    if (i >= nq) return 0;
    const struct em__qitem q = u->queue[i];
    *t = q.t;
    em_split(u->tab[q.t].nuniq, q.part, u->tab[q.t].nchunks, lo, hi);
    return 1;
}

/* --------------------------------------------------------------- rows */

/* The configuration both kinds of table share: num_tables >= 1, dim >= 1, sum or mean
 * pooling, a sparse optimizer (*S = its state floats per row), init_scale >= 0.
 * EM_ERR_INVALID naming the field otherwise. */
em_status em__check_rows_cfg(const char *who, int num_tables, int dim, em_pooling pooling, em_optim_kind kind,
                             float init_scale, size_t *S);

/* Optimizer state floats per row for a sparse optimizer (SGD 0, AdaGrad D, row-wise
 * AdaGrad 1); -1 for any other kind. */
static inline int em__state_floats(em_optim_kind k, int dim) {
    return k == EM_OPT_SGD ? 0 : k == EM_OPT_ADAGRAD ? dim : k == EM_OPT_ROWWISE_ADAGRAD ? 1 : -1;
}

/* The initial-row stream of table t. */
static inline uint64_t em__tab_seed(uint64_t seed, int t) {
    return em_mix64(seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(t + 1)));
}

/* The initial weights of id from the table's stream: element i the top 24 bits of a
 * counter-mode splitmix64 stream keyed by (table seed, id), mapped to [-a, a) (cheaper
 * than seeding a generator per row, and exact in float); then S state values. */
static inline void em__row_init(float *w, size_t D, size_t S, uint64_t tab_seed, uint64_t id, float a, float init_accum) {
    if (a == 0.f) {
        memset(w, 0, D * sizeof(float));
    } else {
        const uint64_t key = em_mix64(tab_seed ^ em_mix64(id));
        for (size_t i = 0; i < D; i++) {
            float u = (float)(em_mix64(key + i) >> 40) * (1.0f / 16777216.0f); /* [0, 1) */
            w[i] = a * (2.0f * u - 1.0f);
        }
    }
    for (size_t i = 0; i < S; i++) w[D + i] = init_accum;
}

/* Rows in pages of 1 << shift slots, stride floats apart. */
typedef struct {
    float *const *pages;
    int shift;
    uint32_t mask;
    size_t stride;
} em__rowpages;

static inline float *em__row(const em__rowpages *rp, uint32_t slot) {
    return rp->pages[slot >> rp->shift] + (size_t)(slot & rp->mask) * rp->stride;
}

static inline void em__prefetch_lines(const void *p, size_t bytes, int write) {
    const char *c = p, *last = c + bytes - 1;
    for (; c < last; c += 64) {
        if (write) __builtin_prefetch(c, 1, 3);
        else __builtin_prefetch(c, 0, 3);
    }
    if (write) __builtin_prefetch(last, 1, 3);
    else __builtin_prefetch(last, 0, 3);
}

/* Pool table t's bags from its positions' slots (EM__NONE reads as zero) into
 * out(B, T, D), in index order. */
static inline void em__pool_table(float *out, const em__ubatch *u, int t, const int64_t *offsets, int B, size_t D,
                                  int mean, const em__rowpages *rp) {
    const em__ubtab *bt = &u->tab[t];
    const size_t kbeg = bt->kbeg, n = bt->n, T = (size_t)u->T;
    const uint32_t *pslot = u->pslot + kbeg;
    const int64_t *off = offsets + (size_t)t * (size_t)B;
    for (int b = 0; b < B; b++) {
        float *o = out + ((size_t)b * T + (size_t)t) * D;
        memset(o, 0, D * sizeof(float));
        const int64_t k0 = off[b], k1 = off[b + 1];
        for (int64_t k = k0; k < k1; k++) {
            size_t p = (size_t)k - kbeg;
            if (p + EM__ROW_PREFETCH < n && pslot[p + EM__ROW_PREFETCH] != EM__NONE)
                em__prefetch_lines(em__row(rp, pslot[p + EM__ROW_PREFETCH]), D * sizeof(float), 0);
            if (pslot[p] != EM__NONE) em_vadd(o, em__row(rp, pslot[p]), D);
        }
        if (mean && k1 > k0) em_vscale(o, 1.0f / (float)(k1 - k0), D);
    }
}

/* The fused update of table t's uniques [j0, j1) (slot EM__NONE: skipped): each one's
 * gradient g = sum over its positions in batch order of (1/len for mean) * dout[b][t],
 * plus weight decay, then one optimizer step on the row (weights, state beside them).
 * g: a worker's row of D floats. */
static inline void em__update_uniques(const em__ubatch *u, int t, const int64_t *offsets, int B, const float *dout,
                                      size_t D, int mean, const em_optim_cfg *o, const em__rowpages *rp, size_t j0,
                                      size_t j1, float *restrict g) {
    const em__ubtab *bt = &u->tab[t];
    const size_t kbeg = bt->kbeg;
    const uint32_t *uslot = u->uslot + kbeg, *ustart = u->ustart + kbeg + (size_t)t, *plist = u->plist + kbeg,
                   *pos2b = u->pos2b + kbeg;
    const int64_t *off = offsets + (size_t)t * (size_t)B;
    const float lr = o->lr, eps = o->eps, wd = o->weight_decay;
    const float *dt = dout + (size_t)t * D;
    const size_t dstride = (size_t)u->T * D;
    for (size_t j = j0; j < j1; j++) {
        if (j + EM__ROW_PREFETCH < j1 && uslot[j + EM__ROW_PREFETCH] != EM__NONE)
            em__prefetch_lines(em__row(rp, uslot[j + EM__ROW_PREFETCH]), rp->stride * sizeof(float), 1);
        const uint32_t s = uslot[j];
        if (s == EM__NONE) continue;
        float *wr = em__row(rp, s);
        memset(g, 0, D * sizeof(float));
        for (uint32_t q = ustart[j]; q < ustart[j + 1]; q++) {
            uint32_t b = pos2b[plist[q]];
            float sc = mean ? 1.0f / (float)(off[b + 1] - off[b]) : 1.0f;
            em_vaxpy(g, sc, dt + (size_t)b * dstride, D);
        }
        if (wd != 0.f) em_vaxpy(g, wd, wr, D);
        switch (o->kind) {
        case EM_OPT_SGD: em_vaxpy(wr, -lr, g, D); break;
        case EM_OPT_ADAGRAD: em__adagrad_row(wr, wr + D, g, D, lr, eps); break;
        default: {
            float m = wr[D] + em_vsumsq(g, D) / (float)D;
            wr[D] = m;
            em_vaxpy(wr, -(lr / (sqrtf(m) + eps)), g, D);
            break;
        }
        }
    }
}

/* ------------------------------------------------------ eviction order */

/* Quickselect / quicksort over an array of candidate keys TYPE, ordered by LESS(a, b)
 * (a strict total order: keys are distinct): P##_select(a, n, k) puts the k smallest in
 * a[0..k) in any order, P##_sort(a, lo, hi) sorts a[lo..hi] (inclusive). */
#define EM__SELECT_DEFINE(P, TYPE, LESS)                                                                    \
    static inline void P##_swap(TYPE *a, size_t i, size_t j) {                                             \
        TYPE x = a[i];                                                                                    \
        a[i] = a[j];                                                                                      \
        a[j] = x;                                                                                         \
    }                                                                                                     \
    /* Lomuto partition around the median of three */                                                    \
    static size_t P##_partition(TYPE *a, size_t lo, size_t hi) {                                          \
        size_t mid = lo + (hi - lo) / 2;                                                                  \
        if (LESS(&a[mid], &a[lo])) P##_swap(a, mid, lo);                                                  \
        if (LESS(&a[hi], &a[lo])) P##_swap(a, hi, lo);                                                    \
        if (LESS(&a[mid], &a[hi])) P##_swap(a, mid, hi); /* a[hi] is the median */                        \
        TYPE piv = a[hi];                                                                                 \
        size_t i = lo;                                                                                    \
        for (size_t j = lo; j < hi; j++)                                                                  \
            if (LESS(&a[j], &piv)) P##_swap(a, i++, j);                                                   \
        P##_swap(a, i, hi);                                                                               \
        return i;                                                                                         \
    }                                                                                                     \
    static void P##_select(TYPE *a, size_t n, size_t k) {                                                 \
        size_t lo = 0, hi = n - 1;                                                                        \
        while (lo < hi) {                                                                                 \
            size_t p = P##_partition(a, lo, hi);                                                          \
            if (p == k) return;                                                                           \
            if (p < k) lo = p + 1;                                                                        \
            else {                                                                                        \
                if (p == 0) return;                                                                       \
                hi = p - 1;                                                                               \
            }                                                                                             \
        }                                                                                                 \
    }                                                                                                     \
    static inline void P##_sort(TYPE *a, size_t lo, size_t hi) {                                         \
        while (hi > lo) {                                                                                 \
            if (hi - lo < 16) {                                                                           \
                for (size_t i = lo + 1; i <= hi; i++) {                                                   \
                    TYPE x = a[i];                                                                        \
                    size_t j = i;                                                                         \
                    while (j > lo && LESS(&x, &a[j - 1])) a[j] = a[j - 1], j--;                           \
                    a[j] = x;                                                                             \
                }                                                                                         \
                return;                                                                                   \
            }                                                                                             \
            size_t p = P##_partition(a, lo, hi);                                                          \
            if (p - lo < hi - p) {                                                                        \
                if (p > lo) P##_sort(a, lo, p - 1);                                                       \
                lo = p + 1;                                                                               \
            } else {                                                                                      \
                P##_sort(a, p + 1, hi);                                                                   \
                if (p == 0) return;                                                                       \
                hi = p - 1;                                                                               \
            }                                                                                             \
        }                                                                                                 \
    }

#endif
