/*
 * fiited.c - FIITED tables (ember/fiited.h): per-row pruned dimensions on a
 * virtually-hashed, physically-indexed chunk pool, utilities, budgeted pruning,
 * compaction that returns pages to the OS, and the fused sparse optimizer.
 *
 * Identifiers: table t's row r has the global row g = rbase[t] + r; its chunk j has the
 * chunk id cid = g * k + j (< 2^32 - 1). The hash is open addressing with linear probing
 * over uint64 entries (cid << 32) | slot (UINT64_MAX = empty), load factor <= 1/2,
 * backward-shift deletion (no tombstones); 8 bytes per bucket keep the hash small next
 * to the pool.
 *
 * Pool: slots of sf = D/k + S floats (weights then state, so an update touches one
 * contiguous run); pages hold spp = 2^shift slots and are mmap'd, so unmapping a page
 * really returns its memory. owner[slot] = cid or NONE (needed by compaction to fix the
 * hash entry of a moved slot). Allocation pops the free stack, else takes the next
 * fresh slot. Compaction leaves the live slots exactly at [0, L): the holes below L
 * (ascending) receive the live slots at or above L (ascending); then the free stack is
 * empty, fresh = L and the pages past ceil(L / spp) are unmapped.
 *
 * Per global row (em_malloc'd, always resident, so kept small: 1 + 2k + 4 bytes): live
 * count (uint8), k utilities (bfloat16: 8 significant bits are plenty to rank chunks,
 * and the float exponent range keeps large counts x gradient norms finite), the step
 * of the last utility update (uint32, the low bits of the step: only the difference
 * step - stamp is used, exact while a row goes untouched for fewer than 2^32 steps).
 * Utilities decay lazily: the stored value is as of the stamp step; reading multiplies
 * by decay^(step - stamp). Checkpoints hold them as F32 and I64 (the full step).
 *
 * Every mutating entry point reserves what it needs (scratch, hash, slots) before it
 * changes anything, so an allocation failure leaves the object as it was.
 */
#include "ember/fiited.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "core/simd.h"
#include "ember/safetensors.h"
#include "sparse/radix.h"
#include "sparse/rowops.h"

#define NONE UINT32_MAX
#define HEMPTY UINT64_MAX
#define MAX_K 255

struct em_fiited {
    em_fiited_cfg cfg;
    int T, D, K, Dc;
    size_t S, sf, slot_bytes;
    int64_t *rows, *rbase, ntot; /* ntot: rows over all tables */
    uint8_t *live;
    uint16_t *util; /* ntot * K, bfloat16 bits */
    uint32_t *stamp; /* ntot, low 32 bits of the step */
    int64_t step;
    float theta[256];
    /* hash */
    uint64_t *h;
    size_t hcap, hcount;
    /* pool */
    char **pages;
    size_t npages, cap_pages, page_bytes;
    int shift; /* spp = 1 << shift */
    uint32_t *owner, *freel;
    size_t cap_slots; /* capacity of owner and freel */
    size_t nfree, fresh;
    int64_t nlive;
};

static inline size_t spp(const em_fiited *f) { return (size_t)1 << f->shift; }

/* bfloat16 <-> float; round to nearest even (utilities are finite and >= 0) */
static inline float bf16_get(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float x;
    memcpy(&x, &b, 4);
    return x;
}
static inline uint16_t bf16_put(float x) {
    uint32_t b;
    memcpy(&b, &x, 4);
    b += 0x7fffu + ((b >> 16) & 1u);
    return (uint16_t)(b >> 16);
}
/* steps since row g's utilities were stamped */
static inline int64_t stamp_age(const em_fiited *f, int64_t g) { return (int64_t)(uint32_t)((uint32_t)f->step - f->stamp[g]); }
static inline float *slot_ptr(const em_fiited *f, uint32_t s) {
    return (float *)f->pages[s >> f->shift] + (size_t)(s & (spp(f) - 1)) * f->sf;
}

/* ------------------------------------------------------------------ hash */

static inline uint32_t hfind(const em_fiited *f, uint32_t cid) {
    size_t m = f->hcap - 1, i = (size_t)em_mix64(cid) & m;
    for (;;) {
        uint64_t e = f->h[i];
        if (e == HEMPTY) return NONE;
        if ((uint32_t)(e >> 32) == cid) return (uint32_t)e;
        i = (i + 1) & m;
    }
}

static inline size_t hindex(const em_fiited *f, uint32_t cid) {
    size_t m = f->hcap - 1, i = (size_t)em_mix64(cid) & m;
    while ((uint32_t)(f->h[i] >> 32) != cid || f->h[i] == HEMPTY) {
        EM_ASSERT(f->h[i] != HEMPTY);
        i = (i + 1) & m;
    }
    return i;
}

static inline void hput_raw(uint64_t *h, size_t cap, uint32_t cid, uint32_t slot) {
    size_t m = cap - 1, i = (size_t)em_mix64(cid) & m;
    while (h[i] != HEMPTY) i = (i + 1) & m;
    h[i] = ((uint64_t)cid << 32) | slot;
}

static void hdel(em_fiited *f, uint32_t cid) {
    size_t m = f->hcap - 1, i = hindex(f, cid), j = i;
    for (;;) {
        j = (j + 1) & m;
        if (f->h[j] == HEMPTY) break;
        size_t home = (size_t)em_mix64((uint32_t)(f->h[j] >> 32)) & m;
        int in_range = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!in_range) {
            f->h[i] = f->h[j];
            i = j;
        }
    }
    f->h[i] = HEMPTY;
    f->hcount--;
}

static em_status hrebuild(em_fiited *f, size_t cap) {
    uint64_t *h = em_malloc(cap * sizeof(uint64_t));
    if (!h) return em_errorf(EM_ERR_NOMEM, "fiited: no memory for a hash of %zu buckets", cap);
    memset(h, 0xff, cap * sizeof(uint64_t));
    for (size_t i = 0; i < f->hcap; i++)
        if (f->h[i] != HEMPTY) hput_raw(h, cap, (uint32_t)(f->h[i] >> 32), (uint32_t)f->h[i]);
    em_free(f->h);
    f->h = h, f->hcap = cap;
    return EM_OK;
}

/* Room for `n` entries at load factor <= 1/2. */
static em_status hreserve(em_fiited *f, uint64_t n) {
    size_t need = 16;
    while ((uint64_t)need < 2 * n) need <<= 1;
    return need <= f->hcap ? EM_OK : hrebuild(f, need);
}

/* ----------------------------------------------------------------- pool */

/* Make `extra` more chunk allocations possible without allocating. Pages already
 * mapped when a later step fails stay (the pool is consistent; compaction drops them). */
static em_status reserve_slots(em_fiited *f, uint64_t extra) {
    uint64_t held = (uint64_t)f->npages << f->shift;
    uint64_t avail = f->nfree + (held - f->fresh);
    if (extra <= avail) return EM_OK;
    uint64_t need = held + (extra - avail);
    if (need >= NONE) return em_errorf(EM_ERR_INVALID, "fiited: more than 2^32 - 1 chunk slots");
    size_t np = (size_t)((need + spp(f) - 1) >> f->shift);
    size_t slots = np << f->shift;
    if (np > f->cap_pages) {
        char **pg = em_realloc(f->pages, np * sizeof(char *));
        if (!pg) return em_errorf(EM_ERR_NOMEM, "fiited: no memory for the page table");
        f->pages = pg, f->cap_pages = np;
    }
    if (slots > f->cap_slots) {
        uint32_t *ow = em_realloc(f->owner, slots * sizeof(uint32_t));
        if (!ow) return em_errorf(EM_ERR_NOMEM, "fiited: no memory for the slot owners");
        for (size_t i = f->cap_slots; i < slots; i++) ow[i] = NONE;
        f->owner = ow;
        uint32_t *fl = em_realloc(f->freel, slots * sizeof(uint32_t));
        if (!fl) return em_errorf(EM_ERR_NOMEM, "fiited: no memory for the free stack");
        f->freel = fl;
        f->cap_slots = slots;
    }
    while (f->npages < np) {
        void *p = mmap(NULL, f->page_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return em_errorf(EM_ERR_NOMEM, "fiited: mmap of a %zu-byte page failed", f->page_bytes);
        f->pages[f->npages++] = p;
    }
    return EM_OK;
}

static uint64_t tseed(uint64_t seed, int t) { return em_mix64(seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(t + 1))); }

/* A chunk's initial content depends on (seed, table, row, chunk) only. */
static void init_chunk(const em_fiited *f, int t, int64_t r, int j, float *p) {
    const float a = f->cfg.init_scale;
    const size_t Dc = (size_t)f->Dc;
    if (a == 0.f) {
        memset(p, 0, Dc * sizeof(float));
    } else {
        uint64_t key = em_mix64(tseed(f->cfg.seed, t) ^ em_mix64(((uint64_t)r << 8) | (uint64_t)j));
        for (size_t i = 0; i < Dc; i++) {
            float u = (float)(em_mix64(key + i) >> 40) * (1.0f / 16777216.0f);
            p[i] = a * (2.0f * u - 1.0f);
        }
    }
    float *s = p + Dc;
    if (f->cfg.opt.kind == EM_OPT_ADAGRAD)
        for (size_t i = 0; i < Dc; i++) s[i] = f->cfg.opt.init_accum;
    else if (f->cfg.opt.kind == EM_OPT_ROWWISE_ADAGRAD)
        s[0] = j == 0 ? f->cfg.opt.init_accum : 0.f;
}

/* Allocate chunk j of (t, r) (room reserved). */
static void alloc_chunk(em_fiited *f, int t, int64_t r, int j) {
    uint32_t cid = (uint32_t)((f->rbase[t] + r) * f->K + j);
    uint32_t s = f->nfree ? f->freel[--f->nfree] : (uint32_t)f->fresh++;
    f->owner[s] = cid;
    hput_raw(f->h, f->hcap, cid, s);
    f->hcount++;
    f->nlive++;
    init_chunk(f, t, r, j, slot_ptr(f, s));
}

static void free_chunk(em_fiited *f, uint32_t cid) {
    uint32_t s = hfind(f, cid);
    EM_ASSERT(s != NONE);
    hdel(f, cid);
    f->owner[s] = NONE;
    f->freel[f->nfree++] = s;
    f->nlive--;
}

/* Set row g's live count to n (room reserved when growing). */
static void apply_live(em_fiited *f, int t, int64_t r, int n) {
    int64_t g = f->rbase[t] + r;
    int c = f->live[g];
    for (int j = c - 1; j >= n; j--) free_chunk(f, (uint32_t)(g * f->K + j));
    for (int j = c; j < n; j++) alloc_chunk(f, t, r, j);
    f->live[g] = (uint8_t)n;
}

void em_fiited_compact(em_fiited *f) {
    const size_t L = (size_t)f->nlive;
    size_t hole = 0;
    for (size_t s = L; s < f->fresh; s++) {
        uint32_t cid = f->owner[s];
        if (cid == NONE) continue;
        while (f->owner[hole] != NONE) hole++;
        EM_ASSERT(hole < L);
        memcpy(slot_ptr(f, (uint32_t)hole), slot_ptr(f, (uint32_t)s), f->slot_bytes);
        f->owner[hole] = cid;
        f->owner[s] = NONE;
        f->h[hindex(f, cid)] = ((uint64_t)cid << 32) | (uint32_t)hole;
    }
    f->nfree = 0;
    f->fresh = L;
    size_t keep = (L + spp(f) - 1) >> f->shift;
    while (f->npages > keep) munmap(f->pages[--f->npages], f->page_bytes);
    /* shrink the slot arrays; a failed shrink keeps the larger block, which is harmless
     * (cap_slots only promises that both hold at least that many) */
    size_t slots = f->npages << f->shift;
    if (slots < f->cap_slots) {
        size_t n = slots ? slots : 1;
        uint32_t *ow = em_realloc(f->owner, n * sizeof(uint32_t));
        if (ow) f->owner = ow;
        uint32_t *fl = em_realloc(f->freel, n * sizeof(uint32_t));
        if (fl) f->freel = fl;
        if (ow || fl) f->cap_slots = slots; /* the other one is still larger */
    }
    size_t need = 16;
    while (need < 2 * f->hcount) need <<= 1;
    if (f->hcap > 2 * need) (void)hrebuild(f, need); /* load < 1/4: shrink to load <= 1/2 */
}

/* ------------------------------------------------------------- lifecycle */

em_fiited_cfg em_fiited_default(int num_tables, const int64_t *rows, int dim, int chunks, em_optim_cfg opt) {
    em_fiited_cfg c;
    memset(&c, 0, sizeof c);
    c.num_tables = num_tables;
    c.rows = rows;
    c.dim = dim;
    c.chunks = chunks;
    c.init_live = chunks;
    c.pooling = EM_POOL_SUM;
    c.opt = opt;
    c.init_scale = 0.01f;
    c.util_decay = 0.9f;
    return c;
}

void em_fiited_free(em_fiited *f) {
    if (!f) return;
    for (size_t i = 0; i < f->npages; i++) munmap(f->pages[i], f->page_bytes);
    em_free(f->pages);
    em_free(f->owner), em_free(f->freel), em_free(f->h);
    em_free(f->rows), em_free(f->rbase), em_free(f->live), em_free(f->util), em_free(f->stamp);
    em_free(f);
}

em_status em_fiited_create(em_fiited **out, const em_fiited_cfg *cfg) {
    if (!out) return em_errorf(EM_ERR_INVALID, "fiited: out is NULL");
    *out = NULL;
    if (!cfg || !cfg->rows || cfg->num_tables < 1) return em_errorf(EM_ERR_INVALID, "fiited: need >= 1 table with rows");
    if (cfg->dim < 1 || cfg->chunks < 1 || cfg->chunks > MAX_K || cfg->dim % cfg->chunks)
        return em_errorf(EM_ERR_INVALID, "fiited: dim %d, chunks %d (need 1 <= chunks <= 255 dividing dim)", cfg->dim,
                         cfg->chunks);
    if (cfg->init_live < 0 || cfg->init_live > cfg->chunks)
        return em_errorf(EM_ERR_INVALID, "fiited: init_live %d (need 0 .. %d)", cfg->init_live, cfg->chunks);
    if (cfg->pooling != EM_POOL_SUM && cfg->pooling != EM_POOL_MEAN)
        return em_errorf(EM_ERR_INVALID, "fiited: unknown pooling %d", (int)cfg->pooling);
    if (!(cfg->util_decay >= 0.f && cfg->util_decay < 1.f))
        return em_errorf(EM_ERR_INVALID, "fiited: util_decay %g (need [0, 1))", (double)cfg->util_decay);
    if (!(cfg->init_scale >= 0.f)) return em_errorf(EM_ERR_INVALID, "fiited: init_scale %g", (double)cfg->init_scale);
    size_t pb = cfg->page_bytes ? cfg->page_bytes : (size_t)1 << 20;
    if (pb < ((size_t)64 << 10) || pb > ((size_t)64 << 20))
        return em_errorf(EM_ERR_INVALID, "fiited: page_bytes %zu (need 64 KiB .. 64 MiB)", pb);
    const size_t Dc = (size_t)(cfg->dim / cfg->chunks);
    size_t S;
    switch (cfg->opt.kind) {
    case EM_OPT_SGD: S = 0; break;
    case EM_OPT_ADAGRAD: S = Dc; break;
    case EM_OPT_ROWWISE_ADAGRAD: S = 1; break;
    default: return em_errorf(EM_ERR_INVALID, "fiited: optimizer %d is not a sparse optimizer", (int)cfg->opt.kind);
    }
    int64_t ntot = 0;
    for (int t = 0; t < cfg->num_tables; t++) {
        if (cfg->rows[t] < 1) return em_errorf(EM_ERR_INVALID, "fiited: table %d has %lld rows", t, (long long)cfg->rows[t]);
        ntot += cfg->rows[t];
        if ((uint64_t)ntot * (uint64_t)cfg->chunks >= NONE)
            return em_errorf(EM_ERR_INVALID, "fiited: more than 2^32 - 1 chunks over all tables");
    }
    em_fiited *f = em_calloc(1, sizeof *f);
    if (!f) return em_errorf(EM_ERR_NOMEM, "fiited: no memory for the object");
    f->cfg = *cfg;
    f->cfg.page_bytes = pb;
    f->T = cfg->num_tables, f->D = cfg->dim, f->K = cfg->chunks, f->Dc = (int)Dc;
    f->S = S, f->sf = Dc + S, f->slot_bytes = f->sf * sizeof(float);
    f->shift = 0;
    while (((size_t)2 << f->shift) * f->slot_bytes <= pb) f->shift++;
    f->page_bytes = ((spp(f) * f->slot_bytes) + 4095) & ~(size_t)4095;
    f->ntot = ntot;
    f->rows = em_malloc((size_t)f->T * sizeof(int64_t));
    f->rbase = em_malloc((size_t)f->T * sizeof(int64_t));
    f->live = em_calloc((size_t)ntot, 1);
    f->util = em_calloc((size_t)ntot * (size_t)f->K, sizeof(uint16_t));
    f->stamp = em_calloc((size_t)ntot, sizeof(uint32_t));
    em_status st = EM_OK;
    if (!f->rows || !f->rbase || !f->live || !f->util || !f->stamp)
        st = em_errorf(EM_ERR_NOMEM, "fiited: no memory for the row metadata of %lld rows", (long long)ntot);
    if (st == EM_OK) {
        int64_t b = 0;
        for (int t = 0; t < f->T; t++) f->rows[t] = cfg->rows[t], f->rbase[t] = b, b += cfg->rows[t];
        f->cfg.rows = f->rows;
        uint64_t n = (uint64_t)ntot * (uint64_t)cfg->init_live;
        st = hreserve(f, n);
        if (st == EM_OK) st = reserve_slots(f, n);
    }
    if (st != EM_OK) {
        em_fiited_free(f);
        return st;
    }
    for (int t = 0; t < f->T; t++)
        for (int64_t r = 0; r < f->rows[t]; r++) apply_live(f, t, r, cfg->init_live);
    *out = f;
    return EM_OK;
}

int em_fiited_num_tables(const em_fiited *f) { return f->T; }
int em_fiited_dim(const em_fiited *f) { return f->D; }
int em_fiited_chunks(const em_fiited *f) { return f->K; }
int64_t em_fiited_rows(const em_fiited *f, int t) { return f->rows[t]; }
int64_t em_fiited_step(const em_fiited *f) { return f->step; }
size_t em_fiited_slot_bytes(const em_fiited *f) { return f->slot_bytes; }
void em_fiited_set_lr(em_fiited *f, float lr) { f->cfg.opt.lr = lr; }

/* ------------------------------------------------------------ inspection */

/* decay^e by squaring in double: exact enough and the same on every run. */
static float decay_pow(float d, int64_t e) {
    double r = 1.0, x = d;
    while (e > 0) {
        if (e & 1) r *= x;
        x *= x;
        e >>= 1;
    }
    return (float)r;
}

int em_fiited_live(const em_fiited *f, int t, int64_t row) { return f->live[f->rbase[t] + row]; }

int64_t em_fiited_slot(const em_fiited *f, int t, int64_t row, int chunk) {
    uint32_t s = hfind(f, (uint32_t)((f->rbase[t] + row) * f->K + chunk));
    return s == NONE ? -1 : (int64_t)s;
}

float *em_fiited_chunk(em_fiited *f, int t, int64_t row, int chunk, float **state) {
    uint32_t s = hfind(f, (uint32_t)((f->rbase[t] + row) * f->K + chunk));
    float *p = s == NONE ? NULL : slot_ptr(f, s);
    if (state) *state = p && f->S ? p + f->Dc : NULL;
    return p;
}

float em_fiited_utility(const em_fiited *f, int t, int64_t row, int chunk) {
    int64_t g = f->rbase[t] + row;
    return bf16_get(f->util[g * f->K + chunk]) * decay_pow(f->cfg.util_decay, stamp_age(f, g));
}

void em_fiited_read_row(const em_fiited *f, int t, int64_t row, float *out) {
    int64_t g = f->rbase[t] + row;
    memset(out, 0, (size_t)f->D * sizeof(float));
    for (int j = 0; j < f->live[g]; j++)
        memcpy(out + (size_t)j * f->Dc, slot_ptr(f, hfind(f, (uint32_t)(g * f->K + j))), (size_t)f->Dc * sizeof(float));
}

em_fiited_stats em_fiited_get_stats(const em_fiited *f, int t) {
    em_fiited_stats s;
    memset(&s, 0, sizeof s);
    int64_t lo = t < 0 ? 0 : f->rbase[t], hi = t < 0 ? f->ntot : f->rbase[t] + f->rows[t];
    int64_t hist[MAX_K + 2] = {0};
    for (int64_t g = lo; g < hi; g++) hist[f->live[g]]++;
    int64_t above = 0;
    for (int j = f->K; j >= 1; j--) {
        above += hist[j];
        s.live_per_chunk[j - 1] = above;
        s.live_chunks += above;
    }
    for (int j = 0; j < f->K; j++) s.threshold[j] = f->theta[j];
    s.pages = (int64_t)f->npages;
    s.slots = (int64_t)(f->npages << f->shift);
    s.free_slots = s.slots - f->nlive;
    s.page_bytes = f->page_bytes;
    s.pool_bytes = f->npages * f->page_bytes;
    s.hash_bytes = f->hcap * sizeof(uint64_t);
    s.meta_bytes = (size_t)f->ntot * (1 + (size_t)f->K * sizeof(uint16_t) + sizeof(uint32_t)) +
                   2 * f->cap_slots * sizeof(uint32_t) + f->cap_pages * sizeof(char *);
    s.held_bytes = s.pool_bytes + s.hash_bytes + s.meta_bytes;
    return s;
}

/* ------------------------------------------------------- set_live, prune */

em_status em_fiited_set_live(em_fiited *f, int t, int64_t row, int n) {
    if (t < 0 || t >= f->T || row < 0 || row >= f->rows[t] || n < 0 || n > f->K)
        return em_errorf(EM_ERR_INVALID, "fiited: set_live(table %d, row %lld, %d) out of range", t, (long long)row, n);
    int c = f->live[f->rbase[t] + row];
    if (n > c) {
        em_status st = hreserve(f, (uint64_t)f->nlive + (uint64_t)(n - c));
        if (st == EM_OK) st = reserve_slots(f, (uint64_t)(n - c));
        if (st != EM_OK) return st;
    }
    apply_live(f, t, row, n);
    return EM_OK;
}

typedef struct {
    uint64_t a; /* (~bits(p) << 8) | j: smaller = ranked first */
    uint64_t g;
} cand;

static inline int cand_lt(const cand *x, const cand *y) { return x->a < y->a || (x->a == y->a && x->g < y->g); }

/* Partition c[0..n) so that the n_keep first items are the n_keep smallest (keys are
 * distinct, so the set is unique). Iterative quickselect, median-of-three pivot. */
static void select_smallest(cand *c, size_t n, size_t n_keep) {
    size_t lo = 0, hi = n; /* the boundary n_keep lies in [lo, hi] */
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        cand a = c[lo], b = c[mid], d = c[hi - 1], p;
        if (cand_lt(&a, &b)) p = cand_lt(&b, &d) ? b : (cand_lt(&a, &d) ? d : a);
        else p = cand_lt(&a, &d) ? a : (cand_lt(&b, &d) ? d : b);
        /* three-way partition: < p | == p | > p (== holds exactly one item) */
        size_t i = lo, lt = lo, gt = hi;
        while (i < gt) {
            if (cand_lt(&c[i], &p)) {
                cand tmp = c[i]; c[i] = c[lt]; c[lt] = tmp;
                lt++, i++;
            } else if (cand_lt(&p, &c[i])) {
                gt--;
                cand tmp = c[i]; c[i] = c[gt]; c[gt] = tmp;
            } else {
                i++;
            }
        }
        if (n_keep <= lt) hi = lt;
        else if (n_keep >= gt) lo = gt;
        else return;
    }
}

em_status em_fiited_prune(em_fiited *f, size_t max_bytes, double max_frac, em_pool *pool) {
    (void)pool; /* the selection is a single ordered pass; kept for API symmetry */
    const int K = f->K;
    const uint64_t M = (uint64_t)f->ntot * (uint64_t)K;
    uint64_t N = M;
    if (max_bytes) {
        uint64_t nb = max_bytes / f->slot_bytes;
        if (nb < N) N = nb;
    }
    if (max_frac > 0) {
        uint64_t nf = max_frac >= 1 ? M : (uint64_t)floor(max_frac * (double)M);
        if (nf < N) N = nf;
    }
    /* Candidates with p = 0 (rows never touched, or whose utility decayed to 0) rank
     * after every positive one, so when the positive ones fill the budget only they are
     * ranked: a small scratch for tables whose rows are mostly cold. */
    uint64_t P = 0;
    if (N < M)
        for (int64_t g = 0; g < f->ntot; g++) {
            if (f->util[g * K] == 0) continue; /* p = 0 along the whole row (e.g. never touched) */
            float fac = decay_pow(f->cfg.util_decay, stamp_age(f, g)), p = INFINITY;
            for (int j = 0; j < K; j++) {
                float u = bf16_get(f->util[g * K + j]) * fac;
                p = u < p ? u : p;
                P += p > 0.f;
            }
        }
    const int positive_only = N < M && P >= N;
    const uint64_t NC = positive_only ? P : M;
    uint8_t *nl = em_malloc((size_t)f->ntot);
    cand *c = N < M ? em_malloc((size_t)NC * sizeof(cand)) : NULL;
    if (!nl || (N < M && !c)) {
        em_free(nl), em_free(c);
        return em_errorf(EM_ERR_NOMEM, "fiited: no memory for the pruning scratch (%llu candidates)", (unsigned long long)NC);
    }
    for (int j = 0; j < 256; j++) f->theta[j] = 0.f;
    if (N >= M) {
        memset(nl, K, (size_t)f->ntot);
        for (int64_t g = 0; g < f->ntot; g++) {
            float fac = decay_pow(f->cfg.util_decay, stamp_age(f, g)), p = INFINITY;
            for (int j = 0; j < K; j++) {
                float u = bf16_get(f->util[g * K + j]) * fac;
                p = u < p ? u : p;
                if (g == 0 || p < f->theta[j]) f->theta[j] = p;
            }
        }
    } else {
        size_t n = 0;
        for (int64_t g = 0; g < f->ntot; g++) {
            if (positive_only && f->util[g * K] == 0) continue;
            float fac = decay_pow(f->cfg.util_decay, stamp_age(f, g)), p = INFINITY;
            for (int j = 0; j < K; j++) {
                float u = bf16_get(f->util[g * K + j]) * fac;
                p = u < p ? u : p;
                if (positive_only && !(p > 0.f)) break; /* p only falls along the row */
                uint32_t bits;
                memcpy(&bits, &p, 4);
                c[n].a = ((uint64_t)(uint32_t)~bits << 8) | (uint64_t)j;
                c[n].g = (uint64_t)g;
                n++;
            }
        }
        select_smallest(c, n, (size_t)N);
        memset(nl, 0, (size_t)f->ntot);
        int seen[256] = {0};
        for (size_t i = 0; i < (size_t)N; i++) {
            int j = (int)(c[i].a & 0xff);
            uint32_t bits = ~(uint32_t)(c[i].a >> 8);
            float p;
            memcpy(&p, &bits, 4);
            if (nl[c[i].g] < j + 1) nl[c[i].g] = (uint8_t)(j + 1);
            if (!seen[j] || p < f->theta[j]) f->theta[j] = p, seen[j] = 1;
        }
        em_free(c);
    }
    uint64_t frees = 0, allocs = 0;
    for (int64_t g = 0; g < f->ntot; g++) {
        if (nl[g] < f->live[g]) frees += f->live[g] - nl[g];
        else allocs += nl[g] - f->live[g];
    }
    uint64_t peak = (uint64_t)f->nlive > (uint64_t)f->nlive - frees + allocs ? (uint64_t)f->nlive
                                                                           : (uint64_t)f->nlive - frees + allocs;
    em_status st = hreserve(f, peak);
    if (st == EM_OK && allocs > frees) st = reserve_slots(f, allocs - frees);
    if (st != EM_OK) {
        em_free(nl);
        return st;
    }
    /* frees first (so re-allocations reuse the freed slots, LIFO), rows in global order */
    for (int t = 0; t < f->T; t++)
        for (int64_t r = 0; r < f->rows[t]; r++)
            if (nl[f->rbase[t] + r] < f->live[f->rbase[t] + r]) apply_live(f, t, r, nl[f->rbase[t] + r]);
    for (int t = 0; t < f->T; t++)
        for (int64_t r = 0; r < f->rows[t]; r++)
            if (nl[f->rbase[t] + r] > f->live[f->rbase[t] + r]) apply_live(f, t, r, nl[f->rbase[t] + r]);
    em_free(nl);
    em_fiited_compact(f);
    return EM_OK;
}

/* --------------------------------------------------------------- forward */

static em_status check_bags(const em_fiited *f, const int64_t *indices, const int64_t *offsets, int B) {
    if (B < 0 || !offsets) return em_errorf(EM_ERR_INVALID, "fiited: bad batch (B %d)", B);
    const size_t U = (size_t)f->T * (size_t)B;
    if (offsets[0] != 0) return em_errorf(EM_ERR_INVALID, "fiited: offsets[0] = %lld", (long long)offsets[0]);
    for (size_t u = 0; u < U; u++) {
        if (offsets[u + 1] < offsets[u])
            return em_errorf(EM_ERR_INVALID, "fiited: offsets decrease at table %zu, example %zu", u / (size_t)B,
                             u % (size_t)B);
        int t = (int)(u / (size_t)B);
        for (int64_t k = offsets[u]; k < offsets[u + 1]; k++)
            if (indices[k] < 0 || indices[k] >= f->rows[t])
                return em_errorf(EM_ERR_INVALID, "fiited: table %d, example %zu: index %lld out of [0, %lld)", t,
                                 u % (size_t)B, (long long)indices[k], (long long)f->rows[t]);
    }
    if ((uint64_t)offsets[U] >= NONE) return em_errorf(EM_ERR_INVALID, "fiited: more than 2^32 - 1 indices in a batch");
    return EM_OK;
}

typedef struct {
    const em_fiited *f;
    float *out;
    const int64_t *idx, *off;
    const float *pw;
    int B;
} fwd_arg;

static void fwd_task(void *p, int ith, int nth) {
    fwd_arg *a = p;
    const em_fiited *f = a->f;
    const size_t D = (size_t)f->D, Dc = (size_t)f->Dc;
    size_t lo, hi;
    em_split((size_t)f->T * (size_t)a->B, ith, nth, &lo, &hi);
    for (size_t u = lo; u < hi; u++) {
        int t = (int)(u / (size_t)a->B);
        size_t b = u % (size_t)a->B;
        float *o = a->out + (b * (size_t)f->T + (size_t)t) * D;
        memset(o, 0, D * sizeof(float));
        int64_t k0 = a->off[u], k1 = a->off[u + 1];
        for (int64_t k = k0; k < k1; k++) {
            int64_t g = f->rbase[t] + a->idx[k];
            float w = a->pw ? a->pw[k] : 1.f;
            for (int j = 0; j < f->live[g]; j++)
                em_vaxpy(o + (size_t)j * Dc, w, slot_ptr(f, hfind(f, (uint32_t)(g * f->K + j))), Dc);
        }
        if (f->cfg.pooling == EM_POOL_MEAN && k1 > k0) em_vscale(o, 1.f / (float)(k1 - k0), D);
    }
}

em_status em_fiited_forward(em_fiited *f, float *out, const int64_t *indices, const int64_t *offsets,
                            const float *per_id_w, int B, em_pool *pool) {
    em_status st = check_bags(f, indices, offsets, B);
    if (st != EM_OK) return st;
    fwd_arg a = {f, out, indices, offsets, per_id_w, B};
    em_pool_run(pool, fwd_task, &a);
    return EM_OK;
}

/* -------------------------------------------------------------- backward */

typedef struct {
    int t;
    uint32_t row;
    size_t lo, hi; /* range of sorted items */
} uniq;

typedef struct {
    em_fiited *f;
    const float *dout;
    const int64_t *off;
    float *dpw;
    int B;
    const uint64_t *items; /* per table sorted (row << 32 | position - table start) */
    const int64_t *tstart;
    const uint32_t *pos_b;
    const float *pos_scale, *pos_inv; /* gradient scale; 1/len (mean) or 1 */
    const uniq *u;
    size_t nu;
    float *gbuf; /* nth * D */
} bwd_arg;

static void bwd_task(void *p, int ith, int nth) {
    bwd_arg *a = p;
    em_fiited *f = a->f;
    const size_t D = (size_t)f->D, Dc = (size_t)f->Dc;
    const int K = f->K;
    const em_optim_cfg *o = &f->cfg.opt;
    float *gb = a->gbuf + (size_t)ith * D;
    const float decay = f->cfg.util_decay;
    size_t lo, hi;
    em_split(a->nu, ith, nth, &lo, &hi);
    float *cp[MAX_K];
    for (size_t q = lo; q < hi; q++) {
        const uniq *u = &a->u[q];
        const int t = u->t;
        const int64_t g = f->rbase[t] + u->row;
        const int c = f->live[g];
        for (int j = 0; j < c; j++) cp[j] = slot_ptr(f, hfind(f, (uint32_t)(g * K + j)));
        memset(gb, 0, D * sizeof(float));
        for (size_t i = u->lo; i < u->hi; i++) {
            size_t k = (size_t)a->tstart[t] + (size_t)(uint32_t)a->items[i];
            const float *dptr = a->dout + ((size_t)a->pos_b[k] * (size_t)f->T + (size_t)t) * D;
            if (a->dpw) {
                float s = 0.f;
                for (int j = 0; j < c; j++) s += em_vdot(dptr + (size_t)j * Dc, cp[j], Dc);
                a->dpw[k] += a->pos_inv[k] * s;
            }
            em_vaxpy(gb, a->pos_scale[k], dptr, D);
        }
        /* utilities of every chunk (pruned ones too) */
        const float n = (float)(u->hi - u->lo);
        const float fac = decay_pow(decay, stamp_age(f, g));
        uint16_t *ut = f->util + g * K;
        for (int j = 0; j < K; j++) {
            float x = n * sqrtf(em_vsumsq(gb + (size_t)j * Dc, Dc));
            ut[j] = bf16_put(bf16_get(ut[j]) * fac + (1.f - decay) * x);
        }
        f->stamp[g] = (uint32_t)f->step;
        if (c == 0) continue;
        switch (o->kind) {
        case EM_OPT_SGD:
            for (int j = 0; j < c; j++) em_vaxpy(cp[j], -o->lr, gb + (size_t)j * Dc, Dc);
            break;
        case EM_OPT_ADAGRAD:
            for (int j = 0; j < c; j++) em__adagrad_row(cp[j], cp[j] + Dc, gb + (size_t)j * Dc, Dc, o->lr, o->eps);
            break;
        default: { /* row-wise: accumulator in chunk 0's slot */
            float ss = 0.f;
            for (int j = 0; j < c; j++) ss += em_vsumsq(gb + (size_t)j * Dc, Dc);
            float *m = cp[0] + Dc;
            *m += ss / (float)((size_t)c * Dc);
            float step = -o->lr / (sqrtf(*m) + o->eps);
            for (int j = 0; j < c; j++) em_vaxpy(cp[j], step, gb + (size_t)j * Dc, Dc);
        } break;
        }
    }
}

static int key_bits(int64_t rows) {
    int b = 0;
    while (b < 32 && ((int64_t)1 << b) < rows) b++;
    return b;
}

em_status em_fiited_backward_update(em_fiited *f, const float *dout, const int64_t *indices,
                                    const int64_t *offsets, const float *per_id_w, float *dper_id_w, int B,
                                    em_pool *pool) {
    em_status st = check_bags(f, indices, offsets, B);
    if (st != EM_OK) return st;
    if (dper_id_w && !per_id_w) return em_errorf(EM_ERR_INVALID, "fiited: dper_id_w needs per_id_w");
    const size_t nnz = (size_t)offsets[(size_t)f->T * (size_t)B];
    const int nth = em_pool_nth(pool);
    size_t n1 = nnz ? nnz : 1;
    uint64_t *ia = em_malloc(n1 * sizeof(uint64_t)), *ib = em_malloc(n1 * sizeof(uint64_t));
    uint32_t *pos_b = em_malloc(n1 * sizeof(uint32_t)), *hist = em_malloc(EM__RADIX_HIST_WORDS * sizeof(uint32_t));
    float *scale = em_malloc(n1 * sizeof(float)), *inv = em_malloc(n1 * sizeof(float));
    uniq *u = em_malloc(n1 * sizeof(uniq));
    float *gbuf = em_malloc((size_t)nth * (size_t)f->D * sizeof(float));
    int64_t *tstart = em_malloc((size_t)f->T * sizeof(int64_t));
    if (!ia || !ib || !pos_b || !hist || !scale || !inv || !u || !gbuf || !tstart) {
        st = em_errorf(EM_ERR_NOMEM, "fiited: no memory for the backward scratch (%zu indices)", nnz);
        goto done;
    }
    const int mean = f->cfg.pooling == EM_POOL_MEAN;
    for (size_t q = 0; q < (size_t)f->T * (size_t)B; q++) {
        int64_t k0 = offsets[q], k1 = offsets[q + 1];
        float iv = mean && k1 > k0 ? 1.f / (float)(k1 - k0) : 1.f;
        for (int64_t k = k0; k < k1; k++) {
            pos_b[k] = (uint32_t)(q % (size_t)B);
            inv[k] = iv;
            scale[k] = per_id_w ? per_id_w[k] * iv : iv;
        }
    }
    size_t nu = 0;
    for (int t = 0; t < f->T; t++) {
        size_t k0 = (size_t)offsets[(size_t)t * B], k1 = (size_t)offsets[(size_t)(t + 1) * B];
        tstart[t] = (int64_t)k0;
        for (size_t k = k0; k < k1; k++) ia[k] = ((uint64_t)indices[k] << 32) | (uint64_t)(k - k0);
        uint64_t *s = em__radix_sort(ia + k0, ib + k0, k1 - k0, 32, key_bits(f->rows[t]), hist);
        if (s != ia + k0) memcpy(ia + k0, s, (k1 - k0) * sizeof(uint64_t));
        for (size_t k = k0; k < k1;) {
            size_t e = k + 1;
            while (e < k1 && (ia[e] >> 32) == (ia[k] >> 32)) e++;
            u[nu].t = t, u[nu].row = (uint32_t)(ia[k] >> 32), u[nu].lo = k, u[nu].hi = e;
            nu++;
            k = e;
        }
    }
    bwd_arg a = {f, dout, offsets, dper_id_w, B, ia, tstart, pos_b, scale, inv, u, nu, gbuf};
    em_pool_run(pool, bwd_task, &a);
    f->step++;
done:
    em_free(ia), em_free(ib), em_free(pos_b), em_free(hist), em_free(scale), em_free(inv), em_free(u);
    em_free(gbuf), em_free(tstart);
    return st;
}

/* ------------------------------------------------------------ checkpoint */

#define NT_PER_TABLE 5

em_status em_fiited_save(const em_fiited *f, const char *path) { return em_fiited_save_ex(f, path, NULL, 0, NULL, 0); }

em_status em_fiited_save_ex(const em_fiited *f, const char *path, const em_st_tensor *extra, int n_extra,
                            const em_st_meta *xmeta, int n_xmeta) {
    if (!f || !path) return em_errorf(EM_ERR_INVALID, "fiited save: NULL object or path");
    if (n_extra < 0 || n_xmeta < 0 || (n_extra && !extra) || (n_xmeta && !xmeta))
        return em_errorf(EM_ERR_INVALID, "fiited save: bad extra tensors or metadata");
    const int T = f->T;
    const size_t Dc = (size_t)f->Dc, S = f->S;
    em_st_tensor *ts = em_calloc((size_t)T * NT_PER_TABLE + (size_t)n_extra, sizeof *ts);
    em_st_meta *meta = em_calloc(6 + (size_t)n_xmeta, sizeof *meta);
    char *names = em_calloc((size_t)T * NT_PER_TABLE, 48);
    void **bufs = em_calloc((size_t)T * 4, sizeof(void *)); /* per table: w, state, util, stamp */
    em_status st = EM_OK;
    if (!ts || !meta || !names || !bufs) {
        st = em_errorf(EM_ERR_NOMEM, "fiited: no memory to save");
        goto done;
    }
    int nt = 0;
    for (int t = 0; t < T; t++) {
        const int64_t g0 = f->rbase[t], R = f->rows[t];
        int64_t n = 0;
        for (int64_t r = 0; r < R; r++) n += f->live[g0 + r];
        float *w = em_malloc(((size_t)n * Dc + 1) * sizeof(float));
        float *s = S ? em_malloc(((size_t)n * S + 1) * sizeof(float)) : NULL;
        float *ut = em_malloc((size_t)R * (size_t)f->K * sizeof(float));
        int64_t *sp = em_malloc((size_t)R * sizeof(int64_t));
        bufs[4 * t] = w, bufs[4 * t + 1] = s, bufs[4 * t + 2] = ut, bufs[4 * t + 3] = sp;
        if (!w || (S && !s) || !ut || !sp) {
            st = em_errorf(EM_ERR_NOMEM, "fiited: no memory to save table %d", t);
            goto done;
        }
        for (int64_t r = 0; r < R; r++) {
            sp[r] = f->step - stamp_age(f, g0 + r);
            for (int j = 0; j < f->K; j++) ut[r * f->K + j] = bf16_get(f->util[(g0 + r) * f->K + j]);
        }
        size_t i = 0;
        for (int64_t r = 0; r < R; r++)
            for (int j = 0; j < f->live[g0 + r]; j++, i++) {
                const float *p = slot_ptr(f, hfind(f, (uint32_t)((g0 + r) * f->K + j)));
                memcpy(w + i * Dc, p, Dc * sizeof(float));
                if (S) memcpy(s + i * S, p + Dc, S * sizeof(float));
            }
        char *nm = names + (size_t)t * NT_PER_TABLE * 48;
        snprintf(nm, 48, "fiited.%d.live", t);
        ts[nt++] = (em_st_tensor){nm, EM_U8, 1, {R}, f->live + g0};
        snprintf(nm + 48, 48, "fiited.%d.util", t);
        ts[nt++] = (em_st_tensor){nm + 48, EM_F32, 2, {R, f->K}, ut};
        snprintf(nm + 96, 48, "fiited.%d.stamp", t);
        ts[nt++] = (em_st_tensor){nm + 96, EM_I64, 1, {R}, sp};
        snprintf(nm + 144, 48, "fiited.%d.w", t);
        ts[nt++] = (em_st_tensor){nm + 144, EM_F32, 2, {n, (int64_t)Dc}, w};
        if (S) {
            snprintf(nm + 192, 48, "fiited.%d.state", t);
            ts[nt++] = (em_st_tensor){nm + 192, EM_F32, 2, {n, (int64_t)S}, s};
        }
    }
    char sT[24], sD[24], sK[24], sO[24], sS[24];
    snprintf(sT, sizeof sT, "%d", T);
    snprintf(sD, sizeof sD, "%d", f->D);
    snprintf(sK, sizeof sK, "%d", f->K);
    snprintf(sO, sizeof sO, "%s", em_optim_name(f->cfg.opt.kind));
    snprintf(sS, sizeof sS, "%lld", (long long)f->step);
    const em_st_meta own[6] = {{"fiited.version", "1"}, {"fiited.tables", sT}, {"fiited.dim", sD},
                               {"fiited.chunks", sK}, {"fiited.opt", sO},   {"fiited.step", sS}};
    memcpy(meta, own, sizeof own);
    if (n_xmeta) memcpy(meta + 6, xmeta, (size_t)n_xmeta * sizeof *meta);
    if (n_extra) memcpy(ts + nt, extra, (size_t)n_extra * sizeof *ts);
    st = em_st_write(path, ts, nt + n_extra, meta, 6 + n_xmeta);
done:
    if (bufs)
        for (int i = 0; i < 4 * T; i++) em_free(bufs[i]);
    em_free(bufs), em_free(names), em_free(ts), em_free(meta);
    return st;
}

static int meta_is(const em_st *st, const char *key, const char *want) {
    const char *v = em_st_meta_get(st, key);
    return v && !strcmp(v, want);
}

em_status em_fiited_load(em_fiited *f, const char *path) {
    em_st *st = NULL;
    em_status rc = em_st_open(&st, path);
    if (rc != EM_OK) return rc;
    rc = em_fiited_load_st(f, st, path);
    em_st_close(st);
    return rc;
}

em_status em_fiited_load_st(em_fiited *f, const em_st *st, const char *path) {
    if (!f || !st || !path) return em_errorf(EM_ERR_INVALID, "fiited load: NULL object, file or path");
    em_status rc = EM_OK;
    char buf[32];
    em_fiited *n = NULL;
    snprintf(buf, sizeof buf, "%d", f->T);
    int ok = meta_is(st, "fiited.tables", buf);
    snprintf(buf, sizeof buf, "%d", f->D);
    ok = ok && meta_is(st, "fiited.dim", buf);
    snprintf(buf, sizeof buf, "%d", f->K);
    ok = ok && meta_is(st, "fiited.chunks", buf);
    ok = ok && meta_is(st, "fiited.opt", em_optim_name(f->cfg.opt.kind));
    const char *sstep = em_st_meta_get(st, "fiited.step");
    if (!ok || !sstep) {
        rc = em_errorf(EM_ERR_INVALID, "fiited: %s does not match this table's tables/dim/chunks/optimizer", path);
        goto done;
    }
    char *end;
    long long step = strtoll(sstep, &end, 10);
    if (*end || step < 0) {
        rc = em_errorf(EM_ERR_CORRUPT, "fiited: %s: bad step", path);
        goto done;
    }
    em_fiited_cfg cfg = f->cfg;
    cfg.init_live = 0;
    rc = em_fiited_create(&n, &cfg);
    if (rc != EM_OK) goto done;
    const size_t Dc = (size_t)f->Dc, S = f->S;
    for (int t = 0; t < f->T && rc == EM_OK; t++) {
        const int64_t R = f->rows[t], g0 = f->rbase[t];
        char nm[48];
        snprintf(nm, sizeof nm, "fiited.%d.live", t);
        const uint8_t *lv = em_st_expect(st, nm, EM_U8, R);
        snprintf(nm, sizeof nm, "fiited.%d.util", t);
        const float *ut = em_st_expect(st, nm, EM_F32, R * f->K);
        snprintf(nm, sizeof nm, "fiited.%d.stamp", t);
        const int64_t *sp = em_st_expect(st, nm, EM_I64, R);
        if (!lv || !ut || !sp) {
            rc = EM_ERR_CORRUPT;
            break;
        }
        int64_t cnt = 0;
        for (int64_t r = 0; r < R; r++) {
            int bad = lv[r] > f->K || sp[r] < 0 || sp[r] > step;
            for (int j = 0; j < f->K; j++) bad |= !(ut[r * f->K + j] >= 0);
            if (bad) {
                rc = em_errorf(EM_ERR_CORRUPT, "fiited: %s: table %d row %lld has bad metadata", path, t, (long long)r);
                break;
            }
            cnt += lv[r];
        }
        if (rc != EM_OK) break;
        snprintf(nm, sizeof nm, "fiited.%d.w", t);
        const float *w = em_st_expect(st, nm, EM_F32, cnt * (int64_t)Dc);
        const float *s = NULL;
        if (S) {
            snprintf(nm, sizeof nm, "fiited.%d.state", t);
            s = em_st_expect(st, nm, EM_F32, cnt * (int64_t)S);
        }
        if (!w || (S && !s)) {
            rc = EM_ERR_CORRUPT;
            break;
        }
        rc = hreserve(n, (uint64_t)n->nlive + (uint64_t)cnt);
        if (rc == EM_OK) rc = reserve_slots(n, (uint64_t)cnt);
        if (rc != EM_OK) break;
        size_t i = 0;
        for (int64_t r = 0; r < R; r++) {
            apply_live(n, t, r, lv[r]);
            for (int j = 0; j < lv[r]; j++, i++) {
                float *p = slot_ptr(n, hfind(n, (uint32_t)((g0 + r) * f->K + j)));
                memcpy(p, w + i * Dc, Dc * sizeof(float));
                if (S) memcpy(p + Dc, s + i * S, S * sizeof(float));
            }
        }
        for (int64_t r = 0; r < R; r++) {
            n->stamp[g0 + r] = (uint32_t)sp[r];
            for (int j = 0; j < f->K; j++) n->util[(g0 + r) * f->K + j] = bf16_put(ut[r * f->K + j]);
        }
    }
    if (rc == EM_OK) {
        n->step = step;
        memcpy(n->theta, f->theta, sizeof f->theta);
        em_fiited tmp = *f;
        *f = *n;
        *n = tmp;
        f->cfg.rows = f->rows;
    }
done:
    em_fiited_free(n);
    return rc;
}
