/*
 * ssdtier.c - the SSD tier's row cache, forward, fused backward and prefetch
 * (ember/ssdtier.h). RocksDB access, value encoding and checkpoints are in ssdtier_db.c;
 * the id hash, the batch bookkeeping, initial rows, pooling and the fused update are
 * sparse/rowstore.h's, the same code as the dynamic tables' (so the two agree bitwise).
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
#include "sparse/rowstore.h"

/* ------------------------------------------------------------------ hash */

static inline uint64_t khash(const em_ssd *s, int t, uint64_t id) { return em__idhash(id, s->salt[t]); }

static inline uint32_t hfind(const em_ssd *s, int t, uint64_t id, uint64_t hv) { return em__idmap_find(&s->map, t, id, hv); }
static inline void hput(em_ssd *s, int t, uint64_t id, uint64_t hv, uint32_t slot) { em__idmap_put(&s->map, t, id, hv, slot); }
static void hdel(em_ssd *s, int t, uint64_t id) { em__idmap_del(&s->map, t, id, s->salt); }

static size_t pow2_at_least(uint64_t n) {
    size_t c = 16;
    while ((uint64_t)c < n) c <<= 1;
    return c;
}

/* Grow the hash for `rows` entries at load <= 1/2 (at most hmax buckets). */
static em_status hreserve(em_ssd *s, uint64_t rows) {
    size_t need = pow2_at_least(2 * rows);
    if (need > s->hmax) need = s->hmax;
    return em__idmap_reserve(&s->map, need, s->salt, "ssdtier");
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

EM__SELECT_DEFINE(evk, ssd_evk, evk_less) /* the k smallest (keys are distinct: (t, id) is) */

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

size_t em_ssd_row_bytes(const em_ssd *s) { return slot_bytes(s) + 2 * sizeof(em__hent); }

static size_t bytes_for(const em_ssd *s, uint64_t n) {
    uint64_t pages = (n + SSD_PAGE_ROWS - 1) / SSD_PAGE_ROWS;
    return (size_t)(n * slot_bytes(s) + pow2_at_least(2 * n) * sizeof(em__hent) + pages * 2 * sizeof(void *));
}

void em_ssd_free(em_ssd *s) {
    if (!s) return;
    (void)em_ssd_wait(s);
    em__ssd_db_close(s);
    if (s->path) em__ssd_workdir_remove(s);
    for (size_t p = 0; p < s->npages; p++) em_free(s->rpages[p]), em_free(s->mpages[p]);
    em_free(s->rpages), em_free(s->mpages), em_free(s->freel), em_free(s->map.h), em_free(s->ev);
    em_free(s->tabs), em_free(s->salt);
    em__ubatch_free(&s->ub);
    em_free(s->miss);
    em__ssd_io_free(&s->io);
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
    size_t S;
    em_status cst = em__check_rows_cfg("ssdtier", cfg->num_tables, cfg->dim, cfg->pooling, cfg->opt.kind, cfg->init_scale, &S);
    if (cst) return cst;
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
    s->salt = em_malloc((size_t)s->T * sizeof(uint64_t));
    s->pf_tbeg = em_malloc(((size_t)s->T + 1) * sizeof(int64_t));
    size_t pl = strlen(cfg->path);
    s->path = em_malloc(pl + 1), s->dbpath = em_malloc(pl + 4), s->marker = em_malloc(pl + 16);
    if (!s->rpages || !s->mpages || !s->freel || !s->tabs || !s->salt || !s->pf_tbeg || !s->path || !s->dbpath ||
        !s->marker || em__ubatch_init(&s->ub, s->T, s->D, "ssdtier") != EM_OK) {
        em_free(s->path), em_free(s->dbpath), em_free(s->marker);
        s->path = s->dbpath = s->marker = NULL;
        em_ssd_free(s);
        return em_errorf(EM_ERR_NOMEM, "ssdtier: no memory for the cache tables of %llu rows", (unsigned long long)n);
    }
    memcpy(s->path, cfg->path, pl + 1);
    snprintf(s->dbpath, pl + 4, "%s/db", cfg->path);
    snprintf(s->marker, pl + 16, "%s/EMBER_SSD", cfg->path);
    for (int t = 0; t < s->T; t++) {
        s->tabs[t].seed = em__tab_seed(cfg->seed, t);
        s->salt[t] = em_mix64(0x5bd1e9955bd1e995ull * (uint64_t)(t + 1));
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

/* The batch's scratch (and its miss list and I/O buffers) for nnz ids, laid out. */
static em_status begin_batch(em_ssd *s, const int64_t *offsets, int B, size_t nnz) {
    int grew;
    em_status st = em__ubatch_begin(&s->ub, offsets, B, nnz, "ssdtier", &grew);
    if (st) return st;
    if (s->ub.cap_nnz > s->cap_miss) {
        uint32_t *miss = em_malloc(s->ub.cap_nnz * sizeof(uint32_t));
        if (!miss) return em_errorf(EM_ERR_NOMEM, "ssdtier: no memory for the scratch of %zu ids", nnz);
        em_free(s->miss);
        s->miss = miss, s->cap_miss = s->ub.cap_nnz;
    }
    return em__ssd_io_reserve(&s->io, nnz);
}

static em_status check_offsets(const em_ssd *s, const char *what, const int64_t *off, int B, size_t *nnz) {
    char who[40];
    snprintf(who, sizeof who, "ssdtier %s", what);
    return em__check_offsets(who, s->T, off, B, nnz);
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
    em__ubatch *ub = &s->ub;
    const uint32_t U = em__ubatch_dedup(ub, t, a->ids, a->off, a->B, s->salt[t]);
    const size_t kbeg = ub->tab[t].kbeg;
    const uint64_t *uid = ub->uid + kbeg, *uhash = ub->uhash + kbeg;
    uint32_t *uslot = ub->uslot + kbeg;
    for (uint32_t u = 0; u < U; u++) uslot[u] = hfind(s, t, uid[u], uhash[u]);
    em__ubatch_csr(ub, t); /* positions per unique in batch order (ucnt stays the count) */
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
    const em__ubatch *ub = &s->ub;
    const size_t kbeg = ub->tab[t].kbeg, n = ub->tab[t].n;
    const uint32_t *uslot = ub->uslot + kbeg, *ucnt = ub->ucnt + kbeg, *pos2u = ub->pos2u + kbeg;
    uint32_t *pslot = ub->pslot + kbeg;
    tb->created = 0;
    for (size_t u = 0; u < ub->tab[t].nuniq; u++) {
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
    const em__rowpages rp = ssd_rows(s);
    em__pool_table(a->out, ub, t, a->off, a->B, (size_t)s->D, s->cfg.pooling == EM_POOL_MEAN, &rp);
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
        const em__ubtab *bt = &s->ub.tab[t];
        for (size_t u = 0; u < bt->nuniq; u++) ssd_meta_of(s, s->ub.uslot[bt->kbeg + u])->pinned = 0;
    }
    s->pinned_batch = 0;
    s->npinned = 0;
    s->pending = 0;
}

/* Undo phase B after a failure: the misses' slots back, the hits' pins released. */
static void undo_loads(em_ssd *s, size_t nassigned) {
    for (size_t i = 0; i < nassigned; i++) give_slot(s, s->io.slot[i]);
    for (int t = 0; t < s->T; t++) {
        em__ubtab *bt = &s->ub.tab[t];
        for (size_t u = 0; u < bt->nuniq; u++) {
            uint32_t slot = s->ub.uslot[bt->kbeg + u];
            if (slot != SSD_NONE) {
                ssd_meta *m = ssd_meta_of(s, slot);
                if (m->t >= 0) m->pinned = 0;
            }
        }
        bt->nuniq = 0;
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
    if ((st = begin_batch(s, offsets, B, nnz)) || (st = em__ubatch_workers(&s->ub, nth, "ssdtier"))) return st;
    struct wres *res = em_malloc((size_t)nth * sizeof *res);
    if (!res) return em_errorf(EM_ERR_NOMEM, "ssdtier forward: no memory");
    run_arg a = {s, out, NULL, ids, offsets, B, train, 0, 0, 0, res};
    if (B) em_pool_run(pool, dedup_task, &a);

    /* B. pin the hits, make room, give the misses slots */
    size_t M = 0, U = 0;
    uint64_t hits = 0, pfh = 0;
    for (int t = 0; t < s->T; t++) {
        const em__ubtab *bt = &s->ub.tab[t];
        U += bt->nuniq;
        for (size_t u = 0; u < bt->nuniq; u++) {
            uint32_t slot = s->ub.uslot[bt->kbeg + u];
            if (slot == SSD_NONE) {
                s->miss[M++] = (uint32_t)(bt->kbeg + u); /* global unique index */
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
            while (g >= s->ub.tab[t].kbeg + s->ub.tab[t].nuniq) t++;
            uint64_t id = s->ub.uid[g];
            uint32_t slot = take_slot(s, t, id, s->ub.uhash[g], 1, 0);
            s->ub.uslot[g] = slot;
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
        const em__ubtab *bt = &s->ub.tab[t];
        for (size_t u = 0; u < bt->nuniq; u++) ssd_meta_of(s, s->ub.uslot[bt->kbeg + u])->pf = 0;
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

static void update_task(void *p, int ith, int nth) {
    (void)nth;
    run_arg *a = p;
    em_ssd *s = a->s;
    const em__ubatch *ub = &s->ub;
    float *g = ub->gbuf + (size_t)ith * ub->gstride;
    const em__rowpages rp = ssd_rows(s);
    int t;
    size_t lo, hi;
    while (em__ubatch_take(ub, &a->next, a->nqueue, &t, &lo, &hi)) {
        em__update_uniques(ub, t, a->off, a->B, a->dout, (size_t)s->D, s->cfg.pooling == EM_POOL_MEAN, &s->cfg.opt, &rp, lo,
                           hi, g);
        const uint32_t *uslot = ub->uslot + ub->tab[t].kbeg;
        for (size_t j = lo; j < hi; j++) ssd_meta_of(s, uslot[j])->dirty = 1; /* a save may have cleaned them */
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
    if ((st = em__ubatch_check_ids(&s->ub, ids, "ssdtier backward"))) return st;
    int nth = em_pool_nth(pool);
    if ((st = em__ubatch_workers(&s->ub, nth, "ssdtier"))) return st;
    size_t nq = em__ubatch_queue(&s->ub, nth);
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
    r.cache_bytes = pages * (s->stride * sizeof(float) + sizeof(ssd_meta)) + s->map.cap * sizeof(em__hent) +
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
    for (size_t i = 0; i < s->map.cap; i++) s->map.h[i].slot = SSD_NONE;
    s->fresh = 0, s->nfree = 0, s->used = 0;
    for (int t = 0; t < s->T; t++) s->ub.tab[t].nuniq = 0;
    s->pending = 0, s->pinned_batch = 0, s->npinned = 0;
}
