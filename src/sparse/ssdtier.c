/*
 * ssdtier.c - the SSD tier's row cache, forward, fused backward and prefetch
 * (ember/ssdtier.h). RocksDB access, value encoding and checkpoints are in ssdtier_db.c.
 *
 * Cache: slots of (D + S) floats in pages of 4096 that never move (the page tables are
 * sized for the capacity at create, so a prefetch may add pages while the backward reads
 * rows), their metadata (ssd_meta) in parallel pages, a free list, and one open-
 * addressing hash (linear probing, backward-shift deletion) from (table, id) to slot
 * whose array may grow up to the size the byte limit allows. The capacity is the largest
 * slot count whose pages, hash at load <= 1/2, free list and eviction scratch all fit in
 * cache_bytes.
 *
 * Train forward (alone: it first waits for a prefetch and releases the previous batch's
 * pins):
 *  A. per table on one worker (tables from an atomic counter): dedup the table's ids in
 *     batch order (unique numbers by first occurrence, occurrence counts, positions per
 *     unique in batch order) and probe the cache (read-only).
 *  B. on the caller: pin the hits; if the misses do not fit in the free slots, rank the
 *     unpinned slots by the policy, evict the lowest (max(needed, evict_slack * capacity)),
 *     writing the dirty ones in one WriteBatch; give the misses slots, in (table, first
 *     occurrence) order.
 *  C. the misses are read with MultiGet, a contiguous share per worker; an id not on disk
 *     gets its initial row.
 *  D. per table: count/last of each unique (a row seen for the first time is created),
 *     then the bags are pooled in index order.
 * Any failure before D undoes B (slots given back, pins released): values never change.
 * Backward: chunks of uniques per table over the pool, each unique's gradient summed over
 * its positions in batch order and applied once (as em_dyn), rows marked dirty.
 *
 * Pins: a train forward pins its rows and they stay pinned until the next forward (or
 * load) releases them, so a prefetch started after the forward sees a fixed pinned set:
 * the only fields the backward writes (rows and the dirty flag of pinned slots, the step)
 * are never read by the prefetch thread, and everything else the prefetch changes (hash,
 * free list, unpinned slots, counters) is read by the caller only after waiting for it.
 * No lock is needed. A prefetch that finds too few free or evictable slots loads what
 * fits; it never changes a value, only where rows are.
 */
#include "sparse/ssdtier_int.h"

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/simd.h"
#include "sparse/rowops.h"

#define ROW_PREFETCH 8
#define CHUNKS_PER_WORKER 8

/* ------------------------------------------------------------------ hash */

static inline uint64_t khash(const em_ssd *s, int t, uint64_t id) { return em_mix64(id ^ s->tabs[t].salt); }

static inline uint32_t hfind(const em_ssd *s, int t, uint64_t id, uint64_t hv) {
    if (!s->hcap) return SSD_NONE;
    size_t m = s->hcap - 1, i = (size_t)hv & m;
    for (;;) {
        const ssd_hent *e = &s->h[i];
        if (e->slot == SSD_NONE) return SSD_NONE;
        if (e->id == id && e->t == t) return e->slot;
        i = (i + 1) & m;
    }
}

static inline void hput(em_ssd *s, int t, uint64_t id, uint64_t hv, uint32_t slot) {
    size_t m = s->hcap - 1, i = (size_t)hv & m;
    while (s->h[i].slot != SSD_NONE) i = (i + 1) & m;
    s->h[i].id = id, s->h[i].t = t, s->h[i].slot = slot;
}

/* Backward-shift deletion (as dyntable.c). */
static void hdel(em_ssd *s, int t, uint64_t id) {
    size_t m = s->hcap - 1, i = (size_t)khash(s, t, id) & m;
    while (s->h[i].id != id || s->h[i].t != t || s->h[i].slot == SSD_NONE) {
        EM_ASSERT(s->h[i].slot != SSD_NONE);
        i = (i + 1) & m;
    }
    size_t j = i;
    for (;;) {
        j = (j + 1) & m;
        if (s->h[j].slot == SSD_NONE) break;
        size_t home = (size_t)khash(s, s->h[j].t, s->h[j].id) & m;
        int in_range = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!in_range) {
            s->h[i] = s->h[j];
            i = j;
        }
    }
    s->h[i].slot = SSD_NONE;
}

static size_t pow2_at_least(uint64_t n) {
    size_t c = 16;
    while ((uint64_t)c < n) c <<= 1;
    return c;
}

/* Grow the hash for `rows` entries at load <= 1/2 (at most hmax buckets). */
static em_status hreserve(em_ssd *s, uint64_t rows) {
    size_t need = pow2_at_least(2 * rows);
    if (need > s->hmax) need = s->hmax;
    if (need <= s->hcap) return EM_OK;
    ssd_hent *h = em_malloc(need * sizeof *h);
    if (!h) return em_errorf(EM_ERR_NOMEM, "ssdtier: no memory for a cache index of %zu buckets", need);
    for (size_t i = 0; i < need; i++) h[i].id = 0, h[i].t = 0, h[i].slot = SSD_NONE;
    ssd_hent *old = s->h;
    size_t ocap = s->hcap;
    s->h = h, s->hcap = need;
    for (size_t i = 0; i < ocap; i++)
        if (old[i].slot != SSD_NONE) hput(s, old[i].t, old[i].id, khash(s, old[i].t, old[i].id), old[i].slot);
    em_free(old);
    return EM_OK;
}

/* ----------------------------------------------------------------- slots */

static uint32_t page_rows(const em_ssd *s, size_t p) {
    uint64_t left = (uint64_t)s->cap_rows - (uint64_t)p * SSD_PAGE_ROWS;
    return left < SSD_PAGE_ROWS ? (uint32_t)left : SSD_PAGE_ROWS;
}

static size_t slots_allocated(const em_ssd *s) {
    return s->npages ? (size_t)(s->npages - 1) * SSD_PAGE_ROWS + page_rows(s, s->npages - 1) : 0;
}

/* Room for `extra` more slots in use without further allocation (extra <= free). */
static em_status reserve_slots(em_ssd *s, uint64_t extra) {
    EM_ASSERT((int64_t)extra <= s->cap_rows - s->used);
    uint64_t avail = s->nfree + (slots_allocated(s) - s->fresh);
    while (extra > avail) {
        size_t p = s->npages;
        EM_ASSERT(p < s->max_pages);
        uint32_t n = page_rows(s, p);
        float *r = em_malloc((size_t)n * s->stride * sizeof(float));
        ssd_meta *m = em_malloc((size_t)n * sizeof(ssd_meta));
        if (!r || !m) {
            em_free(r), em_free(m);
            return em_errorf(EM_ERR_NOMEM, "ssdtier: no memory for a cache page of %u rows", n);
        }
        memset(m, 0, (size_t)n * sizeof(ssd_meta));
        for (uint32_t i = 0; i < n; i++) m[i].t = -1;
        s->rpages[p] = r, s->mpages[p] = m;
        s->npages++;
        avail += n;
    }
    return hreserve(s, (uint64_t)s->used + extra);
}

static uint32_t alloc_slot(em_ssd *s) {
    if (s->nfree) return s->freel[--s->nfree];
    return s->fresh++;
}

/* Take a slot for (t, id) (room reserved): metadata reset, indexed. */
static uint32_t take_slot(em_ssd *s, int t, uint64_t id, uint64_t hv, int pinned, int pf) {
    uint32_t slot = alloc_slot(s);
    ssd_meta *m = ssd_meta_of(s, slot);
    m->id = id, m->t = t, m->count = 0, m->last = -1;
    m->dirty = 0, m->pinned = (uint8_t)pinned, m->ondisk = 0, m->live = 0, m->pf = (uint8_t)pf;
    hput(s, t, id, hv, slot);
    s->used++;
    return slot;
}

static void give_slot(em_ssd *s, uint32_t slot) {
    ssd_meta *m = ssd_meta_of(s, slot);
    hdel(s, m->t, m->id);
    m->t = -1, m->pinned = 0, m->dirty = 0;
    s->freel[s->nfree++] = slot;
    s->used--;
}

/* --------------------------------------------------------------- eviction */

static inline int evk_less(const ssd_evk *x, const ssd_evk *y) {
    if (x->k1 != y->k1) return x->k1 < y->k1;
    if (x->k2 != y->k2) return x->k2 < y->k2;
    if (x->t != y->t) return x->t < y->t;
    return x->id < y->id;
}

static inline void evk_swap(ssd_evk *a, size_t i, size_t j) {
    ssd_evk t = a[i];
    a[i] = a[j];
    a[j] = t;
}

static size_t evk_partition(ssd_evk *a, size_t lo, size_t hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (evk_less(&a[mid], &a[lo])) evk_swap(a, mid, lo);
    if (evk_less(&a[hi], &a[lo])) evk_swap(a, hi, lo);
    if (evk_less(&a[mid], &a[hi])) evk_swap(a, mid, hi);
    ssd_evk piv = a[hi];
    size_t i = lo;
    for (size_t j = lo; j < hi; j++)
        if (evk_less(&a[j], &piv)) evk_swap(a, i++, j);
    evk_swap(a, i, hi);
    return i;
}

/* The k smallest into a[0..k) (keys are distinct: (t, id) is). */
static void evk_select(ssd_evk *a, size_t n, size_t k) {
    size_t lo = 0, hi = n - 1;
    while (lo < hi) {
        size_t p = evk_partition(a, lo, hi);
        if (p == k) return;
        if (p < k) lo = p + 1;
        else {
            if (p == 0) return;
            hi = p - 1;
        }
    }
}

static int cmp_key(const void *pa, const void *pb) {
    const ssd_evk *a = pa, *b = pb;
    if (a->t != b->t) return a->t < b->t ? -1 : 1;
    return a->id < b->id ? -1 : a->id > b->id;
}

static em_status ensure_ev(em_ssd *s) {
    size_t need = s->fresh;
    if (need <= s->cap_ev) return EM_OK;
    size_t cap = s->cap_ev * 2 > need ? s->cap_ev * 2 : need;
    if (cap > (size_t)s->cap_rows) cap = (size_t)s->cap_rows;
    ssd_evk *ev = em_malloc(cap * sizeof *ev);
    if (!ev) return em_errorf(EM_ERR_NOMEM, "ssdtier: no memory for the eviction scratch of %zu rows", cap);
    em_free(s->ev);
    s->ev = ev, s->cap_ev = cap;
    return EM_OK;
}

/* Rank the unpinned slots by the policy and put the k lowest in s->ev[0..k), sorted by
 * key (sequential writes). Returns how many were chosen (<= k). */
static size_t select_victims(em_ssd *s, size_t k) {
    const int lfu = s->cfg.policy == EM_SSD_LFU;
    size_t n = 0;
    for (uint32_t slot = 0; slot < s->fresh; slot++) {
        const ssd_meta *m = ssd_meta_of(s, slot);
        if (m->t < 0 || m->pinned) continue;
        ssd_evk *e = &s->ev[n++];
        e->k1 = lfu ? m->count : m->last;
        e->k2 = lfu ? m->last : 0;
        e->t = m->t, e->id = m->id, e->slot = slot;
    }
    if (k > n) k = n;
    if (k && k < n) evk_select(s->ev, n, k);
    if (k > 1) qsort(s->ev, k, sizeof *s->ev, cmp_key);
    return k;
}

/* Evict so that `need` more slots are free, freeing at least evict_slack of the
 * capacity at once; `evictable` = slots in use that are not pinned. Returns the slots
 * now free (may stay below need when too few are evictable). */
static em_status make_room(em_ssd *s, uint64_t need, int64_t evictable, uint64_t *free_out) {
    uint64_t free_ = (uint64_t)(s->cap_rows - s->used);
    if (need > free_ && evictable > 0) {
        uint64_t k = need - free_, slack = (uint64_t)((double)s->cap_rows * (double)s->cfg.evict_slack);
        if (k < slack) k = slack;
        if (k > (uint64_t)evictable) k = (uint64_t)evictable;
        em_status st = ensure_ev(s);
        if (st) return st;
        size_t n = select_victims(s, (size_t)k);
        if ((st = em__ssd_write_victims(s, n))) return st;
        for (size_t i = 0; i < n; i++) give_slot(s, s->ev[i].slot);
        s->evictions += n;
        free_ += n;
    }
    *free_out = free_;
    return EM_OK;
}

/* ------------------------------------------------------------- lifecycle */

em_ssd_cfg em_ssd_default(int num_tables, int dim, em_optim_cfg opt, const char *path, size_t cache_bytes) {
    em_ssd_cfg c;
    memset(&c, 0, sizeof c);
    c.num_tables = num_tables;
    c.dim = dim;
    c.pooling = EM_POOL_SUM;
    c.opt = opt;
    c.init_scale = 0.01f;
    c.path = path;
    c.cache_bytes = cache_bytes;
    c.policy = EM_SSD_LRU;
    c.evict_slack = 0.05f;
    return c;
}

static size_t slot_bytes(const em_ssd *s) {
    return s->stride * sizeof(float) + sizeof(ssd_meta) + sizeof(ssd_evk) + sizeof(uint32_t);
}

size_t em_ssd_row_bytes(const em_ssd *s) { return slot_bytes(s) + 2 * sizeof(ssd_hent); }

static size_t bytes_for(const em_ssd *s, uint64_t n) {
    uint64_t pages = (n + SSD_PAGE_ROWS - 1) / SSD_PAGE_ROWS;
    return (size_t)(n * slot_bytes(s) + pow2_at_least(2 * n) * sizeof(ssd_hent) + pages * 2 * sizeof(void *));
}

static uint64_t tab_seed(uint64_t seed, int t) { return em_mix64(seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(t + 1))); }

void em_ssd_free(em_ssd *s) {
    if (!s) return;
    (void)em_ssd_wait(s);
    em__ssd_db_close(s);
    if (s->path) em__ssd_workdir_remove(s);
    for (size_t p = 0; p < s->npages; p++) em_free(s->rpages[p]), em_free(s->mpages[p]);
    em_free(s->rpages), em_free(s->mpages), em_free(s->freel), em_free(s->h), em_free(s->ev);
    em_free(s->tabs);
    em_free(s->uid), em_free(s->uhash), em_free(s->ucnt), em_free(s->ustart), em_free(s->uslot);
    em_free(s->pos2u), em_free(s->pos2b), em_free(s->plist), em_free(s->pslot), em_free(s->map), em_free(s->miss);
    em__ssd_io_free(&s->io);
    em_free(s->gbuf), em_free(s->queue);
    em_free(s->pf_ids), em_free(s->pf_uid), em_free(s->pf_uhash), em_free(s->pf_ut), em_free(s->pf_map);
    em_free(s->pf_tbeg);
    em__ssd_io_free(&s->pf_io);
    em_free(s->path), em_free(s->dbpath), em_free(s->marker);
    em_free(s);
}

em_status em_ssd_create(em_ssd **out, const em_ssd_cfg *cfg) {
    if (!out) return em_errorf(EM_ERR_INVALID, "ssdtier: out is NULL");
    *out = NULL;
    if (!cfg) return em_errorf(EM_ERR_INVALID, "ssdtier: no config");
    if (cfg->num_tables < 1) return em_errorf(EM_ERR_INVALID, "ssdtier: num_tables %d (need >= 1)", cfg->num_tables);
    if (cfg->dim < 1) return em_errorf(EM_ERR_INVALID, "ssdtier: dim %d (need >= 1)", cfg->dim);
    if (cfg->pooling != EM_POOL_SUM && cfg->pooling != EM_POOL_MEAN)
        return em_errorf(EM_ERR_INVALID, "ssdtier: unknown pooling %d", (int)cfg->pooling);
    size_t S;
    switch (cfg->opt.kind) {
    case EM_OPT_SGD: S = 0; break;
    case EM_OPT_ADAGRAD: S = (size_t)cfg->dim; break;
    case EM_OPT_ROWWISE_ADAGRAD: S = 1; break;
    default:
        return em_errorf(EM_ERR_INVALID, "ssdtier: opt.kind %d is not a sparse optimizer (sgd, adagrad, rowwise_adagrad)",
                         (int)cfg->opt.kind);
    }
    if (!(cfg->init_scale >= 0.f)) return em_errorf(EM_ERR_INVALID, "ssdtier: init_scale %g (need >= 0)", (double)cfg->init_scale);
    if (!cfg->path || !*cfg->path) return em_errorf(EM_ERR_INVALID, "ssdtier: no path for the working directory");
    if (cfg->policy != EM_SSD_LRU && cfg->policy != EM_SSD_LFU)
        return em_errorf(EM_ERR_INVALID, "ssdtier: unknown policy %d", (int)cfg->policy);
    if (!(cfg->evict_slack >= 0.f && cfg->evict_slack <= 0.5f))
        return em_errorf(EM_ERR_INVALID, "ssdtier: evict_slack %g (need 0 .. 0.5)", (double)cfg->evict_slack);

    em_ssd *s = em_calloc(1, sizeof *s);
    if (!s) return em_errorf(EM_ERR_NOMEM, "ssdtier: no memory for the object");
    s->cfg = *cfg;
    s->cfg.path = NULL;
    s->lockfd = -1;
    s->T = cfg->num_tables, s->D = cfg->dim, s->S = S;
    s->stride = (size_t)cfg->dim + S;
    s->vbytes = s->stride * sizeof(float) + 2 * sizeof(int64_t);
    s->gstride = ((size_t)cfg->dim + 15) / 16 * 16;

    /* capacity: the most slots whose structures fit in cache_bytes */
    uint64_t n = cfg->cache_bytes / em_ssd_row_bytes(s);
    if (n > ((uint64_t)1 << 31)) n = (uint64_t)1 << 31;
    while (n > 0 && bytes_for(s, n) > cfg->cache_bytes) {
        uint64_t m = (uint64_t)((double)n * (double)cfg->cache_bytes / (double)bytes_for(s, n));
        n = m < n ? m : n - 1;
    }
    if (n == 0) {
        size_t rb = em_ssd_row_bytes(s);
        em_free(s);
        return em_errorf(EM_ERR_INVALID, "ssdtier: cache_bytes %zu holds no row (one takes %zu bytes)", cfg->cache_bytes, rb);
    }
    s->cap_rows = (int64_t)n;
    s->hmax = pow2_at_least(2 * n);
    s->max_pages = (size_t)((n + SSD_PAGE_ROWS - 1) / SSD_PAGE_ROWS);
    s->rpages = em_calloc(s->max_pages, sizeof(float *));
    s->mpages = em_calloc(s->max_pages, sizeof(ssd_meta *));
    s->freel = em_malloc((size_t)n * sizeof(uint32_t));
    s->tabs = em_calloc((size_t)s->T, sizeof(ssd_tab));
    s->pf_tbeg = em_malloc(((size_t)s->T + 1) * sizeof(int64_t));
    size_t pl = strlen(cfg->path);
    s->path = em_malloc(pl + 1), s->dbpath = em_malloc(pl + 4), s->marker = em_malloc(pl + 16);
    if (!s->rpages || !s->mpages || !s->freel || !s->tabs || !s->pf_tbeg || !s->path || !s->dbpath || !s->marker) {
        em_free(s->path), em_free(s->dbpath), em_free(s->marker);
        s->path = s->dbpath = s->marker = NULL;
        em_ssd_free(s);
        return em_errorf(EM_ERR_NOMEM, "ssdtier: no memory for the cache tables of %llu rows", (unsigned long long)n);
    }
    memcpy(s->path, cfg->path, pl + 1);
    snprintf(s->dbpath, pl + 4, "%s/db", cfg->path);
    snprintf(s->marker, pl + 16, "%s/EMBER_SSD", cfg->path);
    for (int t = 0; t < s->T; t++) {
        s->tabs[t].seed = tab_seed(cfg->seed, t);
        s->tabs[t].salt = em_mix64(0x5bd1e9955bd1e995ull * (uint64_t)(t + 1));
    }
    em_status st = em__ssd_workdir_init(s);
    if (st) {
        em_free(s->path);
        s->path = NULL; /* nothing of ours to remove */
        em_ssd_free(s);
        return st;
    }
    if ((st = em__ssd_db_open(s, 1))) {
        em_ssd_free(s);
        return st;
    }
    *out = s;
    return EM_OK;
}

int em_ssd_num_tables(const em_ssd *s) { return s->T; }
int em_ssd_dim(const em_ssd *s) { return s->D; }
int64_t em_ssd_step(const em_ssd *s) { return s->step; }
int64_t em_ssd_capacity_rows(const em_ssd *s) { return s->cap_rows; }
int64_t em_ssd_table_rows(const em_ssd *s, int t) { return t >= 0 && t < s->T ? s->tabs[t].rows : 0; }
void em_ssd_set_lr(em_ssd *s, float lr) { s->cfg.opt.lr = lr; }

/* ----------------------------------------------------------- batch scratch */

static em_status ensure_batch(em_ssd *s, size_t nnz, size_t mapn) {
    if (nnz > s->cap_nnz) {
        size_t cap = s->cap_nnz + s->cap_nnz / 2;
        if (cap < nnz) cap = nnz;
        size_t c1 = cap + (size_t)s->T + 1;
        uint64_t *uid = em_malloc(cap * 8), *uhash = em_malloc(cap * 8);
        uint32_t *ucnt = em_malloc(cap * 4), *ustart = em_malloc(c1 * 4), *uslot = em_malloc(cap * 4),
                 *pos2u = em_malloc(cap * 4), *pos2b = em_malloc(cap * 4), *plist = em_malloc(cap * 4),
                 *pslot = em_malloc(cap * 4), *miss = em_malloc(cap * 4);
        if (!uid || !uhash || !ucnt || !ustart || !uslot || !pos2u || !pos2b || !plist || !pslot || !miss) {
            em_free(uid), em_free(uhash), em_free(ucnt), em_free(ustart), em_free(uslot);
            em_free(pos2u), em_free(pos2b), em_free(plist), em_free(pslot), em_free(miss);
            return em_errorf(EM_ERR_NOMEM, "ssdtier: no memory for the scratch of %zu ids", nnz);
        }
        em_free(s->uid), em_free(s->uhash), em_free(s->ucnt), em_free(s->ustart), em_free(s->uslot);
        em_free(s->pos2u), em_free(s->pos2b), em_free(s->plist), em_free(s->pslot), em_free(s->miss);
        s->uid = uid, s->uhash = uhash, s->ucnt = ucnt, s->ustart = ustart, s->uslot = uslot;
        s->pos2u = pos2u, s->pos2b = pos2b, s->plist = plist, s->pslot = pslot, s->miss = miss;
        s->cap_nnz = cap;
    }
    if (mapn > s->cap_map) {
        size_t cap = s->cap_map + s->cap_map / 2;
        if (cap < mapn) cap = mapn;
        uint32_t *m = em_malloc(cap * 4);
        if (!m) return em_errorf(EM_ERR_NOMEM, "ssdtier: no memory for a dedup map of %zu buckets", mapn);
        em_free(s->map);
        s->map = m, s->cap_map = cap;
    }
    return em__ssd_io_reserve(&s->io, nnz);
}

static em_status ensure_workers(em_ssd *s, int nth) {
    if (nth <= s->cap_nth) return EM_OK;
    float *g = em_malloc((size_t)nth * s->gstride * sizeof(float));
    struct ssd_qitem *q = em_malloc(((size_t)s->T + (size_t)nth * CHUNKS_PER_WORKER) * sizeof *q);
    if (!g || !q) {
        em_free(g), em_free(q);
        return em_errorf(EM_ERR_NOMEM, "ssdtier: no memory for the scratch of %d workers", nth);
    }
    em_free(s->gbuf), em_free(s->queue);
    s->gbuf = g, s->queue = q, s->cap_nth = nth;
    return EM_OK;
}

static em_status check_offsets(const em_ssd *s, const char *what, const int64_t *off, int B, size_t *nnz) {
    if (B < 0) return em_errorf(EM_ERR_INVALID, "ssdtier %s: batch size %d", what, B);
    if (!off) return em_errorf(EM_ERR_INVALID, "ssdtier %s: offsets is NULL", what);
    if (off[0] != 0) return em_errorf(EM_ERR_INVALID, "ssdtier %s: offsets[0] = %lld, expected 0", what, (long long)off[0]);
    size_t nb = (size_t)s->T * (size_t)B;
    for (size_t u = 0; u < nb; u++)
        if (off[u + 1] < off[u])
            return em_errorf(EM_ERR_INVALID, "ssdtier %s: table %d, example %d: offsets[%zu] = %lld < offsets[%zu] = %lld",
                             what, (int)(u / (size_t)B), (int)(u % (size_t)B), u + 1, (long long)off[u + 1], u,
                             (long long)off[u]);
    *nnz = (size_t)off[nb];
    if (*nnz >= (size_t)UINT32_MAX)
        return em_errorf(EM_ERR_INVALID, "ssdtier %s: %zu ids in one batch (at most 2^32 - 2)", what, *nnz);
    return EM_OK;
}

/* ---------------------------------------------------------------- forward */

typedef struct {
    em_ssd *s;
    float *out;
    const float *dout;
    const uint64_t *ids;
    const int64_t *off;
    int B;
    int train;
    size_t nqueue, nmiss;
    atomic_size_t next;
    struct wres { em_status st; uint64_t bytes; char msg[240]; } *res;
} run_arg;

/* Phase A of the file comment for table t. */
static void dedup_table(run_arg *a, int t) {
    em_ssd *s = a->s;
    ssd_tab *tb = &s->tabs[t];
    const int B = a->B;
    const size_t kbeg = tb->kbeg, n = tb->n;
    const int64_t *off = a->off + (size_t)t * (size_t)B;
    uint64_t *uid = s->uid + kbeg, *uhash = s->uhash + kbeg;
    uint32_t *ucnt = s->ucnt + kbeg, *uslot = s->uslot + kbeg, *pos2u = s->pos2u + kbeg, *pos2b = s->pos2b + kbeg;
    uint32_t *ustart = s->ustart + kbeg + (size_t)t, *plist = s->plist + kbeg;
    uint32_t *map = s->map + tb->mbeg;
    const size_t mm = tb->mcap - 1;
    memset(map, 0xff, tb->mcap * sizeof(uint32_t));
    uint32_t U = 0;
    for (int b = 0; b < B; b++)
        for (int64_t k = off[b]; k < off[b + 1]; k++) {
            const uint64_t id = a->ids[k], hv = khash(s, t, id);
            size_t i = (size_t)(hv >> 32) & mm;
            uint32_t u;
            while ((u = map[i]) != SSD_NONE && uid[u] != id) i = (i + 1) & mm;
            if (u == SSD_NONE) {
                u = map[i] = U++;
                uid[u] = id, uhash[u] = hv, ucnt[u] = 0;
            }
            size_t p = (size_t)k - kbeg;
            pos2u[p] = u, pos2b[p] = (uint32_t)b;
            ucnt[u]++;
        }
    tb->nuniq = U;
    for (uint32_t u = 0; u < U; u++) uslot[u] = hfind(s, t, uid[u], uhash[u]);
    /* positions per unique in batch order (ucnt stays the count; ustart the CSR) */
    uint32_t acc = 0;
    for (uint32_t u = 0; u < U; u++) ustart[u] = acc, acc += ucnt[u];
    ustart[U] = acc;
    for (size_t p = 0; p < n; p++) plist[ustart[pos2u[p]]++] = (uint32_t)p;
    for (uint32_t u = U; u > 0; u--) ustart[u] = ustart[u - 1];
    ustart[0] = 0;
}

static void dedup_task(void *p, int ith, int nth) {
    run_arg *a = p;
    for (;;) {
        size_t t = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (t >= (size_t)a->s->T) break;
        dedup_table(a, (int)t);
    }
}

static void read_task(void *p, int ith, int nth) {
    run_arg *a = p;
    size_t lo, hi;
    em_split(a->nmiss, ith, nth, &lo, &hi);
    struct wres *r = &a->res[ith];
    r->st = EM_OK, r->bytes = 0;
    if (lo < hi && (r->st = em__ssd_read_range(a->s, &a->s->io, lo, hi, &r->bytes)))
        snprintf(r->msg, sizeof r->msg, "%s", em_last_error());
}

/* Phase D for table t: metadata, then pooling. */
static void finish_table(run_arg *a, int t) {
    em_ssd *s = a->s;
    ssd_tab *tb = &s->tabs[t];
    const int B = a->B, T = s->T;
    const size_t D = (size_t)s->D, kbeg = tb->kbeg, n = tb->n;
    const uint32_t *uslot = s->uslot + kbeg, *ucnt = s->ucnt + kbeg, *pos2u = s->pos2u + kbeg;
    uint32_t *pslot = s->pslot + kbeg;
    tb->created = 0;
    for (size_t u = 0; u < tb->nuniq; u++) {
        ssd_meta *m = ssd_meta_of(s, uslot[u]);
        if (a->train) {
            if (!m->live) m->live = 1, m->count = 0, tb->created++;
            m->count += ucnt[u];
            m->last = s->step;
            m->dirty = 1;
        }
    }
    for (size_t p = 0; p < n; p++) {
        uint32_t slot = uslot[pos2u[p]];
        pslot[p] = ssd_meta_of(s, slot)->live ? slot : SSD_NONE;
    }
    const int64_t *off = a->off + (size_t)t * (size_t)B;
    for (int b = 0; b < B; b++) {
        float *o = a->out + ((size_t)b * (size_t)T + (size_t)t) * D;
        memset(o, 0, D * sizeof(float));
        const int64_t k0 = off[b], k1 = off[b + 1];
        for (int64_t k = k0; k < k1; k++) {
            size_t p = (size_t)k - kbeg;
            if (p + ROW_PREFETCH < n && pslot[p + ROW_PREFETCH] != SSD_NONE)
                __builtin_prefetch(ssd_row(s, pslot[p + ROW_PREFETCH]), 0, 3);
            if (pslot[p] != SSD_NONE) em_vadd(o, ssd_row(s, pslot[p]), D);
        }
        if (s->cfg.pooling == EM_POOL_MEAN && k1 > k0) em_vscale(o, 1.0f / (float)(k1 - k0), D);
    }
}

static void finish_task(void *p, int ith, int nth) {
    run_arg *a = p;
    for (;;) {
        size_t t = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (t >= (size_t)a->s->T) break;
        finish_table(a, (int)t);
    }
}

/* Release the pins of the last train forward (its backward is done or abandoned). */
static void unpin_batch(em_ssd *s) {
    if (!s->pinned_batch) return;
    for (int t = 0; t < s->T; t++) {
        const ssd_tab *tb = &s->tabs[t];
        for (size_t u = 0; u < tb->nuniq; u++) ssd_meta_of(s, s->uslot[tb->kbeg + u])->pinned = 0;
    }
    s->pinned_batch = 0;
    s->npinned = 0;
    s->pending = 0;
}

/* Undo phase B after a failure: the misses' slots back, the hits' pins released. */
static void undo_loads(em_ssd *s, size_t nassigned) {
    for (size_t i = 0; i < nassigned; i++) give_slot(s, s->io.slot[i]);
    for (int t = 0; t < s->T; t++) {
        ssd_tab *tb = &s->tabs[t];
        for (size_t u = 0; u < tb->nuniq; u++) {
            uint32_t slot = s->uslot[tb->kbeg + u];
            if (slot != SSD_NONE) {
                ssd_meta *m = ssd_meta_of(s, slot);
                if (m->t >= 0) m->pinned = 0;
            }
        }
        tb->nuniq = 0;
    }
}

em_status em_ssd_forward(em_ssd *s, float *out, const uint64_t *ids, const int64_t *offsets, int B, em_ssd_mode mode,
                         em_pool *pool) {
    if (!s || !out) return em_errorf(EM_ERR_INVALID, "ssdtier forward: NULL object or output");
    if (mode != EM_SSD_TRAIN && mode != EM_SSD_EVAL) return em_errorf(EM_ERR_INVALID, "ssdtier forward: mode %d", (int)mode);
    size_t nnz;
    em_status st = check_offsets(s, "forward", offsets, B, &nnz);
    if (st) return st;
    if (nnz && !ids) return em_errorf(EM_ERR_INVALID, "ssdtier forward: ids is NULL");
    if ((st = em_ssd_wait(s))) return st;
    unpin_batch(s);
    s->pending = 0;
    const int train = mode == EM_SSD_TRAIN, nth = em_pool_nth(pool);
    size_t mapn = 0;
    for (int t = 0; t < s->T; t++) {
        size_t n = (size_t)(offsets[(size_t)(t + 1) * (size_t)B] - offsets[(size_t)t * (size_t)B]), mc = 4;
        while (mc < 2 * n) mc <<= 1;
        mapn += mc;
    }
    if ((st = ensure_batch(s, nnz, mapn)) || (st = ensure_workers(s, nth))) return st;
    struct wres *res = em_malloc((size_t)nth * sizeof *res);
    if (!res) return em_errorf(EM_ERR_NOMEM, "ssdtier forward: no memory");
    size_t mo = 0;
    for (int t = 0; t < s->T; t++) {
        ssd_tab *tb = &s->tabs[t];
        tb->kbeg = (size_t)offsets[(size_t)t * (size_t)B];
        tb->n = (size_t)offsets[(size_t)(t + 1) * (size_t)B] - tb->kbeg;
        size_t mc = 4;
        while (mc < 2 * tb->n) mc <<= 1;
        tb->mbeg = mo, tb->mcap = mc, tb->nuniq = 0;
        mo += mc;
    }
    run_arg a = {s, out, NULL, ids, offsets, B, train, 0, 0, 0, res};
    if (B) em_pool_run(pool, dedup_task, &a);

    /* B. pin the hits, make room, give the misses slots */
    size_t M = 0, U = 0;
    uint64_t hits = 0, pfh = 0;
    for (int t = 0; t < s->T; t++) {
        const ssd_tab *tb = &s->tabs[t];
        U += tb->nuniq;
        for (size_t u = 0; u < tb->nuniq; u++) {
            uint32_t slot = s->uslot[tb->kbeg + u];
            if (slot == SSD_NONE) {
                s->miss[M++] = (uint32_t)(tb->kbeg + u); /* global unique index */
                continue;
            }
            ssd_meta *m = ssd_meta_of(s, slot);
            m->pinned = 1;
            hits++;
            if (m->pf) pfh++;
        }
    }
    if ((int64_t)U > s->cap_rows) {
        undo_loads(s, 0);
        em_free(res);
        return em_errorf(EM_ERR_INVALID,
                         "ssdtier forward: the batch has %zu unique rows, the cache holds %lld (raise cache_bytes)", U,
                         (long long)s->cap_rows);
    }
    uint64_t free_;
    if ((st = make_room(s, M, s->used - (int64_t)hits, &free_))) goto fail;
    EM_ASSERT(free_ >= M);
    if ((st = reserve_slots(s, M))) goto fail;
    /* misses in (table, first occurrence) order: table of a global unique index */
    {
        int t = 0;
        for (size_t i = 0; i < M; i++) {
            size_t g = s->miss[i];
            while (g >= s->tabs[t].kbeg + s->tabs[t].nuniq) t++;
            uint64_t id = s->uid[g];
            uint32_t slot = take_slot(s, t, id, s->uhash[g], 1, 0);
            s->uslot[g] = slot;
            s->io.slot[i] = slot;
            em__ssd_key(s->io.keys + i * SSD_KEY_BYTES, t, id);
        }
    }
    /* C. read the misses */
    a.nmiss = M;
    if (M) {
        em_pool_run(pool, read_task, &a);
        for (int w = 0; w < nth; w++)
            if (res[w].st) {
                st = em_errorf(res[w].st, "%s", res[w].msg);
                undo_loads(s, M);
                em_free(res);
                return st;
            }
        for (int w = 0; w < nth; w++) s->bytes_read += res[w].bytes;
    }
    /* D. metadata and pooling */
    atomic_store_explicit(&a.next, 0, memory_order_relaxed);
    if (B) em_pool_run(pool, finish_task, &a);
    for (int t = 0; t < s->T; t++) s->rows += s->tabs[t].created, s->tabs[t].rows += s->tabs[t].created;
    s->hits += hits, s->misses += M, s->prefetch_hits += pfh;
    for (int t = 0; t < s->T; t++) {
        const ssd_tab *tb = &s->tabs[t];
        for (size_t u = 0; u < tb->nuniq; u++) ssd_meta_of(s, s->uslot[tb->kbeg + u])->pf = 0;
    }
    em_free(res);
    if (train) {
        s->pinned_batch = 1;
        s->npinned = (int64_t)U;
        s->pending = 1;
        s->pend_B = B;
        s->pend_nnz = nnz;
    } else {
        s->pinned_batch = 1;
        unpin_batch(s);
    }
    return EM_OK;
fail:
    undo_loads(s, 0);
    em_free(res);
    return st;
}

/* --------------------------------------------------------------- backward */

static void update_uniques(run_arg *a, int t, size_t j0, size_t j1, float *restrict g) {
    em_ssd *s = a->s;
    const ssd_tab *tb = &s->tabs[t];
    const int T = s->T;
    const size_t D = (size_t)s->D, kbeg = tb->kbeg, rowbytes = D * sizeof(float);
    const uint32_t *uslot = s->uslot + kbeg, *ustart = s->ustart + kbeg + (size_t)t, *plist = s->plist + kbeg,
                   *pos2b = s->pos2b + kbeg;
    const int64_t *off = a->off + (size_t)t * (size_t)a->B;
    const int mean = s->cfg.pooling == EM_POOL_MEAN;
    const em_optim_kind kind = s->cfg.opt.kind;
    const float lr = s->cfg.opt.lr, eps = s->cfg.opt.eps, wd = s->cfg.opt.weight_decay;
    const float *dout = a->dout + (size_t)t * D;
    const size_t dstride = (size_t)T * D;
    for (size_t j = j0; j < j1; j++) {
        if (j + ROW_PREFETCH < j1) __builtin_prefetch(ssd_row(s, uslot[j + ROW_PREFETCH]), 1, 3);
        const uint32_t slot = uslot[j];
        float *wr = ssd_row(s, slot);
        memset(g, 0, rowbytes);
        for (uint32_t q = ustart[j]; q < ustart[j + 1]; q++) {
            uint32_t b = pos2b[plist[q]];
            float sc = mean ? 1.0f / (float)(off[b + 1] - off[b]) : 1.0f;
            em_vaxpy(g, sc, dout + (size_t)b * dstride, D);
        }
        if (wd != 0.f) em_vaxpy(g, wd, wr, D);
        switch (kind) {
        case EM_OPT_SGD: em_vaxpy(wr, -lr, g, D); break;
        case EM_OPT_ADAGRAD: em__adagrad_row(wr, wr + D, g, D, lr, eps); break;
        default: {
            float m = wr[D] + em_vsumsq(g, D) / (float)D;
            wr[D] = m;
            em_vaxpy(wr, -(lr / (sqrtf(m) + eps)), g, D);
            break;
        }
        }
        ssd_meta_of(s, slot)->dirty = 1;
    }
}

static void update_task(void *p, int ith, int nth) {
    run_arg *a = p;
    em_ssd *s = a->s;
    float *g = s->gbuf + (size_t)ith * s->gstride;
    for (;;) {
        size_t i = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (i >= a->nqueue) break;
        struct ssd_qitem q = s->queue[i];
        size_t lo, hi;
        em_split(s->tabs[q.t].nuniq, q.part, s->tabs[q.t].nchunks, &lo, &hi);
        if (lo < hi) update_uniques(a, q.t, lo, hi, g);
    }
}

em_status em_ssd_backward_update(em_ssd *s, const float *dout, const uint64_t *ids, const int64_t *offsets, int B,
                                 em_pool *pool) {
    if (!s || !dout) return em_errorf(EM_ERR_INVALID, "ssdtier backward: NULL object or gradient");
    size_t nnz;
    em_status st = check_offsets(s, "backward", offsets, B, &nnz);
    if (st) return st;
    if (!s->pending || s->pend_B != B || s->pend_nnz != nnz)
        return em_errorf(EM_ERR_INVALID, "ssdtier backward: no train forward of this batch (B %d, %zu ids) precedes it", B,
                         nnz);
    if (nnz && !ids) return em_errorf(EM_ERR_INVALID, "ssdtier backward: ids is NULL");
    for (int t = 0; t < s->T; t++) {
        const ssd_tab *tb = &s->tabs[t];
        const uint64_t *uid = s->uid + tb->kbeg;
        const uint32_t *pos2u = s->pos2u + tb->kbeg;
        for (size_t p = 0; p < tb->n; p++)
            if (uid[pos2u[p]] != ids[tb->kbeg + p])
                return em_errorf(EM_ERR_INVALID, "ssdtier backward: id %zu differs from the train forward's batch",
                                 tb->kbeg + p);
    }
    int nth = em_pool_nth(pool);
    if ((st = ensure_workers(s, nth))) return st;
    size_t nq = 0, tot = 0;
    for (int t = 0; t < s->T; t++) tot += s->tabs[t].nuniq;
    for (int t = 0; t < s->T; t++) {
        ssd_tab *tb = &s->tabs[t];
        tb->nchunks = !tb->nuniq ? 0 : nth == 1 ? 1 : 1 + (int)(tb->nuniq * (size_t)nth * CHUNKS_PER_WORKER / tot);
        for (int c = 0; c < tb->nchunks; c++) s->queue[nq++] = (struct ssd_qitem){t, c};
    }
    run_arg a = {s, NULL, dout, ids, offsets, B, 1, nq, 0, 0, NULL};
    if (nq) em_pool_run(pool, update_task, &a);
    s->pending = 0; /* the pins stay until the next forward: a running prefetch relies on them */
    s->step++;
    return EM_OK;
}

void em_ssd_end_step(em_ssd *s) {
    s->pending = 0;
    s->step++;
}

/* --------------------------------------------------------------- prefetch */

/* The prefetch thread's work: the batch's uniques that are not cached, read into free
 * (or freed) slots, unpinned, marked pf. */
static em_status pf_run(em_ssd *s) {
    const size_t n = s->pf_n, mm = s->pf_mapcap - 1;
    memset(s->pf_map, 0xff, s->pf_mapcap * sizeof(uint32_t));
    size_t U = 0;
    for (int t = 0; t < s->T; t++)
        for (int64_t k = s->pf_tbeg[t]; k < s->pf_tbeg[t + 1]; k++) {
            const uint64_t id = s->pf_ids[k], hv = khash(s, t, id);
            size_t i = (size_t)(hv >> 32) & mm;
            uint32_t u;
            while ((u = s->pf_map[i]) != SSD_NONE && (s->pf_uid[u] != id || s->pf_ut[u] != t)) i = (i + 1) & mm;
            if (u != SSD_NONE) continue;
            s->pf_map[i] = (uint32_t)U;
            s->pf_uid[U] = id, s->pf_ut[U] = t, s->pf_uhash[U] = hv;
            U++;
        }
    (void)n;
    size_t M = 0; /* compact to the uncached ones, order kept */
    for (size_t u = 0; u < U; u++)
        if (hfind(s, s->pf_ut[u], s->pf_uid[u], s->pf_uhash[u]) == SSD_NONE) {
            s->pf_uid[M] = s->pf_uid[u], s->pf_ut[M] = s->pf_ut[u], s->pf_uhash[M] = s->pf_uhash[u];
            M++;
        }
    if (!M) return EM_OK;
    uint64_t free_;
    em_status st = make_room(s, M, s->used - s->npinned, &free_);
    if (st) return st;
    if (M > free_) M = (size_t)free_;
    if (!M) return EM_OK;
    if ((st = reserve_slots(s, M))) return st;
    for (size_t i = 0; i < M; i++) {
        s->pf_io.slot[i] = take_slot(s, s->pf_ut[i], s->pf_uid[i], s->pf_uhash[i], 0, 1);
        em__ssd_key(s->pf_io.keys + i * SSD_KEY_BYTES, s->pf_ut[i], s->pf_uid[i]);
    }
    uint64_t bytes = 0;
    if ((st = em__ssd_read_range(s, &s->pf_io, 0, M, &bytes))) {
        for (size_t i = 0; i < M; i++) give_slot(s, s->pf_io.slot[i]);
        return st;
    }
    s->bytes_read += bytes;
    s->prefetched += M;
    return EM_OK;
}

static void *pf_main(void *arg) {
    em_ssd *s = arg;
    em_status st = pf_run(s);
    if (st) {
        s->pf_status = st;
        snprintf(s->pf_err, sizeof s->pf_err, "%s", em_last_error());
    }
    return NULL;
}

em_status em_ssd_wait(em_ssd *s) {
    if (!s || !s->pf_running) return EM_OK;
    pthread_join(s->pf_thread, NULL);
    s->pf_running = 0;
    em_status st = s->pf_status;
    s->pf_status = EM_OK;
    if (st) return em_errorf(st, "ssdtier prefetch: %s", s->pf_err);
    return EM_OK;
}

em_status em_ssd_prefetch(em_ssd *s, const uint64_t *ids, const int64_t *offsets, int B) {
    if (!s) return em_errorf(EM_ERR_INVALID, "ssdtier prefetch: NULL object");
    size_t nnz;
    em_status st = check_offsets(s, "prefetch", offsets, B, &nnz);
    if (st) return st;
    if (nnz && !ids) return em_errorf(EM_ERR_INVALID, "ssdtier prefetch: ids is NULL");
    if ((st = em_ssd_wait(s))) return st;
    if (!nnz) return EM_OK;
    if (nnz > s->pf_cap) {
        uint64_t *pi = em_malloc(nnz * 8), *pu = em_malloc(nnz * 8), *ph = em_malloc(nnz * 8);
        int32_t *pt = em_malloc(nnz * 4);
        if (!pi || !pu || !ph || !pt) {
            em_free(pi), em_free(pu), em_free(ph), em_free(pt);
            return em_errorf(EM_ERR_NOMEM, "ssdtier prefetch: no memory for %zu ids", nnz);
        }
        em_free(s->pf_ids), em_free(s->pf_uid), em_free(s->pf_uhash), em_free(s->pf_ut);
        s->pf_ids = pi, s->pf_uid = pu, s->pf_uhash = ph, s->pf_ut = pt, s->pf_cap = nnz;
    }
    size_t mc = 16;
    while (mc < 2 * nnz) mc <<= 1;
    if (mc > s->pf_mapcap) {
        uint32_t *m = em_malloc(mc * 4);
        if (!m) return em_errorf(EM_ERR_NOMEM, "ssdtier prefetch: no memory for a map of %zu buckets", mc);
        em_free(s->pf_map);
        s->pf_map = m, s->pf_mapcap = mc;
    }
    if ((st = em__ssd_io_reserve(&s->pf_io, nnz))) return st;
    memcpy(s->pf_ids, ids, nnz * sizeof(uint64_t));
    for (int t = 0; t <= s->T; t++) s->pf_tbeg[t] = offsets[(size_t)t * (size_t)B];
    s->pf_n = nnz;
    s->pf_status = EM_OK;
    if (pthread_create(&s->pf_thread, NULL, pf_main, s) != 0)
        return em_errorf(EM_ERR_THREAD, "ssdtier prefetch: cannot start a thread");
    s->pf_running = 1;
    return EM_OK;
}

/* ------------------------------------------------------------- inspection */

em_status em_ssd_flush(em_ssd *s) {
    if (!s) return em_errorf(EM_ERR_INVALID, "ssdtier flush: NULL object");
    em_status st = em_ssd_wait(s);
    if (st) return st;
    enum { CHUNK = 4096 };
    uint32_t slots[CHUNK];
    size_t n = 0;
    for (uint32_t slot = 0; slot < s->fresh; slot++) {
        const ssd_meta *m = ssd_meta_of(s, slot);
        if (m->t < 0 || !m->dirty) continue;
        slots[n++] = slot;
        if (n == CHUNK) {
            if ((st = em__ssd_write_slots(s, slots, n))) return st;
            n = 0;
        }
    }
    return n ? em__ssd_write_slots(s, slots, n) : EM_OK;
}

int em_ssd_cached(em_ssd *s, int t, uint64_t id) {
    if (!s || t < 0 || t >= s->T) return 0;
    (void)em_ssd_wait(s);
    return hfind(s, t, id, khash(s, t, id)) != SSD_NONE;
}

em_status em_ssd_read_row(em_ssd *s, int t, uint64_t id, float *w, float *state, int64_t *count, int64_t *last,
                          int *found) {
    if (!s || !found) return em_errorf(EM_ERR_INVALID, "ssdtier read_row: NULL object or found");
    if (t < 0 || t >= s->T) return em_errorf(EM_ERR_INVALID, "ssdtier read_row: table %d of %d", t, s->T);
    *found = 0;
    em_status st = em_ssd_wait(s);
    if (st) return st;
    uint32_t slot = hfind(s, t, id, khash(s, t, id));
    const float *row;
    int64_t c, l;
    float *tmp = NULL;
    if (slot != SSD_NONE) {
        const ssd_meta *m = ssd_meta_of(s, slot);
        if (!m->live) return EM_OK;
        row = ssd_row(s, slot), c = m->count, l = m->last;
    } else {
        char key[SSD_KEY_BYTES], *err = NULL;
        size_t vlen = 0;
        em__ssd_key(key, t, id);
        char *v = rocksdb_get(s->db, s->ro, key, sizeof key, &vlen, &err);
        if (err) {
            st = em_errorf(EM_ERR_IO, "ssdtier: RocksDB read in %s: %s", s->dbpath, err);
            rocksdb_free(err);
            return st;
        }
        if (!v) return EM_OK;
        if (vlen != s->vbytes) {
            rocksdb_free(v);
            return em_errorf(EM_ERR_CORRUPT, "ssdtier: %s: table %d id %llu: value of %zu bytes, expected %zu", s->dbpath, t,
                             (unsigned long long)id, vlen, s->vbytes);
        }
        tmp = em_malloc(s->stride * sizeof(float) + 1);
        if (!tmp) {
            rocksdb_free(v);
            return em_errorf(EM_ERR_NOMEM, "ssdtier read_row: no memory");
        }
        memcpy(tmp, v, s->stride * sizeof(float));
        memcpy(&c, v + s->stride * sizeof(float), 8);
        memcpy(&l, v + s->stride * sizeof(float) + 8, 8);
        rocksdb_free(v);
        row = tmp;
    }
    if (w) memcpy(w, row, (size_t)s->D * sizeof(float));
    if (state && s->S) memcpy(state, row + s->D, s->S * sizeof(float));
    if (count) *count = c;
    if (last) *last = l;
    *found = 1;
    em_free(tmp);
    return EM_OK;
}

em_ssd_stats em_ssd_get_stats(em_ssd *s) {
    em_ssd_stats r;
    memset(&r, 0, sizeof r);
    if (!s) return r;
    (void)em_ssd_wait(s);
    r.hits = s->hits, r.misses = s->misses, r.prefetch_hits = s->prefetch_hits;
    r.hit_rate = s->hits + s->misses ? (double)s->hits / (double)(s->hits + s->misses) : 0.0;
    r.cache_rows = s->used;
    r.capacity_rows = s->cap_rows;
    size_t pages = 0;
    for (size_t p = 0; p < s->npages; p++) pages += page_rows(s, p);
    r.cache_bytes = pages * (s->stride * sizeof(float) + sizeof(ssd_meta)) + s->hcap * sizeof(ssd_hent) +
                    s->cap_ev * sizeof(ssd_evk) + (size_t)s->cap_rows * sizeof(uint32_t) + s->max_pages * 2 * sizeof(void *);
    r.disk_rows = s->disk_rows;
    r.rows = s->rows;
    r.evictions = s->evictions, r.writebacks = s->writebacks, r.prefetched = s->prefetched;
    r.bytes_written = s->bytes_written, r.bytes_read = s->bytes_read;
    return r;
}

/* Used by em_ssd_load (ssdtier_db.c): forget every cached row. */
void em__ssd_cache_clear(em_ssd *s);
void em__ssd_cache_clear(em_ssd *s) {
    for (size_t p = 0; p < s->npages; p++) {
        uint32_t n = page_rows(s, p);
        for (uint32_t i = 0; i < n; i++) s->mpages[p][i].t = -1, s->mpages[p][i].pinned = 0;
    }
    for (size_t i = 0; i < s->hcap; i++) s->h[i].slot = SSD_NONE;
    s->fresh = 0, s->nfree = 0, s->used = 0;
    for (int t = 0; t < s->T; t++) s->tabs[t].nuniq = 0;
    s->pending = 0, s->pinned_batch = 0, s->npinned = 0;
}
