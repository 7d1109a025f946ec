/*
 * dyntable.c - dynamic, collisionless embedding tables (ember/dyntable.h): a linear-
 * probing hash table from 64-bit id to a row slot, rows in never-moving pages, per-row
 * metadata, admission, budgeted eviction, and the fused sparse optimizer. The hash, the
 * batch bookkeeping (dedup, CSR, backward queue), initial rows, pooling and the fused
 * update are sparse/rowstore.h's, shared with the SSD tier's row cache (ssdtier.c).
 *
 * Layout of a table: pages of P slots (EM_DYN_PAGE_ROWS; fewer, a power of two >= 64,
 * for a byte budget of under 16k rows, so that page granularity costs little), each one allocation holding the
 * rows (stride D + S floats: the weights, then the optimizer state beside them, so an
 * update touches one contiguous run) followed by the slots' metadata {id, count, last}
 * (count < 0 marks a free slot). The hash array holds {id, slot} pairs (16 bytes) so a
 * probe compares ids without touching the pages.
 *
 * Memory is reserved before any table is changed: a train forward first grows, per
 * table, the pages, the free-list/eviction scratch and the hash array to hold every
 * position of the batch as a new row (with a budget: up to the budget, no further);
 * only then do the workers run, and they never allocate. So an allocation failure
 * leaves every table as it was, and the eviction (which needs scratch) cannot fail.
 *
 * Budget: a table never holds more than `budget` rows, at any moment: the rows a batch
 * adds are made room for before they are inserted (step 2 below), never evicted after.
 * With max_bytes the budget is the largest row count whose layout (whole pages, the
 * power-of-two hash at load <= 1/2, free list, page table, sketch, eviction scratch)
 * fits in max_bytes (layout_bytes), and the pages, page table and hash are never grown
 * past what that count needs, so em_dyn_get_stats().bytes <= max_bytes at every moment,
 * including the peak inside a step.
 *
 * Train forward, per table on one worker (tables taken from an atomic counter):
 *  1. dedup: the table's positions in batch order go through a small scratch hash
 *     (2-4x the table's positions, cache-resident) giving each position its unique-id
 *     number u, numbered by first occurrence, and each unique its occurrence count.
 *  2. lookup/insert: the uniques in order u = 0, 1, ... are probed in the table (the
 *     hash buckets of a few uniques ahead are prefetched); found rows get count +=
 *     occurrences and last = step; new ones go through admission. If the admitted new
 *     ones do not fit in the budget, rows the batch does not use (last < step) are
 *     evicted first (see End of step below for how), down to budget * (1 - slack)
 *     with the new ones; new ones that still do not fit (a batch with more distinct
 *     ids than the budget) are rejected, the last ones in first-occurrence order.
 *     Then the admitted new ones are inserted in order (slot from the free list,
 *     else the next fresh one). The order is a function of the batch and the table
 *     alone, so slots do not depend on the thread count.
 *  3. CSR of positions per unique (counting sort, batch order kept) for the backward,
 *     and the slot of each position for pooling.
 *  4. pooling of the table's bags in index order (rows a few positions ahead prefetched).
 * Eval forward: per table, each position probes the table read-only.
 * Backward: a queue of chunks of unique ids per table; a unique's gradient is summed
 * over its positions in batch order and the optimizer applied once, by one worker.
 * Eviction (in step 2, by the table's worker with its own scratch): a key per live
 * row the batch does not use ((last, id) or (count, id)), quickselect of the k
 * smallest (the set is unique: the keys are distinct), sorted, removed from the hash
 * with backward-shift deletion and pushed on the free list in that order.
 */
#include "ember/dyntable.h"

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/simd.h"
#include "ember/safetensors.h"
#include "sparse/rowstore.h"

#define NONE EM__NONE
#define NEWROW (EM__NONE - 1) /* step 2: an admitted id not inserted yet */
#define PSHIFT_MAX 12         /* log2(EM_DYN_PAGE_ROWS) */
#define PSHIFT_MIN 6
#define HASH_PREFETCH 8
#define CMS_DEPTH 4
#define MAX_SLOTS ((uint64_t)1 << 31)

_Static_assert(EM_DYN_PAGE_ROWS == 1 << PSHIFT_MAX, "page shift");

typedef struct {
    uint64_t id;
    int64_t count, last; /* count < 0: a free slot */
} rmeta;

typedef struct {
    em__idmap map; /* id -> slot (table tag 0) */
    /* pages: rows (stride floats each), then the slots' metadata */
    float **pages;
    size_t npages, cap_pages;
    uint32_t fresh;  /* slots [fresh, npages * PAGE_ROWS) were never used */
    uint32_t *freel; /* capacity npages * PAGE_ROWS */
    size_t nfree;
    int64_t live;
    uint32_t *cms; /* CMS_DEPTH * cms_width, or NULL */
    uint64_t seed; /* per-table stream */
    uint64_t inserts, evictions, rejections;
} dtab;

struct em_dyn {
    em_dyn_cfg cfg;
    int T, D;
    size_t S, stride;   /* state floats per row; floats per row slot */
    size_t page_bytes;  /* rows + metadata of one page */
    int pshift;         /* a page holds prows = 1 << pshift slots */
    uint32_t pmask;
    size_t prows;
    int64_t budget;     /* rows, 0 = none */
    size_t budget_pages; /* pages the budget needs: the page table's size (0: grows freely) */
    int64_t step;
    dtab *tabs;
    em__ubatch ub; /* the batch of the last train forward, backward scratch */
    int pending; /* a train forward awaits its backward */
    int pend_B;
    size_t pend_nnz;
    /* eviction scratch: one entry per slot of the largest table */
    struct evk { int64_t k; uint64_t id; uint32_t slot; } *ev; /* ev_nth blocks of cap_ev */
    size_t cap_ev;
    int ev_nth;
};

/* ------------------------------------------------------------ row access */

static inline em__rowpages rows_of(const em_dyn *d, const dtab *tb) {
    return (em__rowpages){tb->pages, d->pshift, d->pmask, d->stride};
}
static inline float *row_ptr(const em_dyn *d, const dtab *tb, uint32_t s) {
    return tb->pages[s >> d->pshift] + (size_t)(s & d->pmask) * d->stride;
}
static inline rmeta *meta_ptr(const em_dyn *d, const dtab *tb, uint32_t s) {
    return (rmeta *)(tb->pages[s >> d->pshift] + d->prows * d->stride) + (s & d->pmask);
}

/* ------------------------------------------------------------------ hash */

static inline uint32_t hfind(const dtab *tb, uint64_t id, uint64_t hv) { return em__idmap_find(&tb->map, 0, id, hv); }
static inline void hput(dtab *tb, uint64_t id, uint64_t hv, uint32_t slot) { em__idmap_put(&tb->map, 0, id, hv, slot); }
static void hdel(dtab *tb, uint64_t id) { em__idmap_del(&tb->map, 0, id, NULL); }
/* Buckets of a hash holding `rows` entries at load factor <= 1/2. */
static size_t hash_buckets(uint64_t rows) { return em__idmap_buckets(rows); }
/* Grow the hash so that `rows` entries keep the load factor <= 1/2. */
static em_status hreserve(dtab *tb, uint64_t rows) {
    return em__idmap_reserve(&tb->map, hash_buckets(rows), NULL, "dyntable");
}

/* ----------------------------------------------------------------- pages */

static size_t tab_slots(const em_dyn *d, const dtab *tb) { return tb->npages * d->prows; }

/* Make room for `extra` new rows without further allocation: pages, the free list
 * (capacity = slots, so evictions never allocate) and the hash. */
static em_status reserve_rows(em_dyn *d, dtab *tb, uint64_t extra) {
    uint64_t avail = tb->nfree + (tab_slots(d, tb) - tb->fresh);
    if (extra > avail) {
        uint64_t need = tab_slots(d, tb) + (extra - avail);
        if (need > MAX_SLOTS) return em_errorf(EM_ERR_INVALID, "dyntable: more than 2^31 rows in one table");
        size_t np = (size_t)((need + d->prows - 1) / d->prows);
        if (np > tb->cap_pages) {
            size_t cp = tb->cap_pages * 2 > np ? tb->cap_pages * 2 : np;
            if (d->budget_pages && np <= d->budget_pages && cp > d->budget_pages) cp = d->budget_pages;
            float **pg = em_realloc(tb->pages, cp * sizeof(float *));
            if (!pg) return em_errorf(EM_ERR_NOMEM, "dyntable: no memory for the page table");
            tb->pages = pg, tb->cap_pages = cp;
        }
        uint32_t *fl = em_malloc(np * d->prows * sizeof(uint32_t));
        if (!fl) return em_errorf(EM_ERR_NOMEM, "dyntable: no memory for a free list of %zu slots", np * d->prows);
        size_t have = tb->npages;
        while (tb->npages < np) {
            float *p = em_malloc(d->page_bytes);
            if (!p) {
                em_free(fl);
                return em_errorf(EM_ERR_NOMEM, "dyntable: no memory for a page of %zu bytes", d->page_bytes);
            }
            rmeta *m = (rmeta *)(p + d->prows * d->stride);
            for (size_t i = 0; i < d->prows; i++) m[i].id = 0, m[i].count = -1, m[i].last = -1;
            tb->pages[tb->npages++] = p;
        }
        (void)have;
        if (tb->nfree) memcpy(fl, tb->freel, tb->nfree * sizeof(uint32_t));
        em_free(tb->freel);
        tb->freel = fl;
    }
    return hreserve(tb, (uint64_t)tb->live + extra);
}

static void tab_free(dtab *tb) {
    for (size_t i = 0; i < tb->npages; i++) em_free(tb->pages[i]);
    em_free(tb->pages);
    em_free(tb->freel);
    em_free(tb->map.h);
    em_free(tb->cms);
    memset(tb, 0, sizeof *tb);
}

/* Eviction scratch for nth workers, each as large as the largest of `tabs` (the
 * object's tables, or the ones a load is about to swap in). */
static em_status ensure_ev(em_dyn *d, const dtab *tabs, int nth) {
    if (!d->budget) return EM_OK;
    size_t need = 0;
    for (int t = 0; t < d->T; t++)
        if (tab_slots(d, &tabs[t]) > need) need = tab_slots(d, &tabs[t]);
    if (need <= d->cap_ev && nth <= d->ev_nth) return EM_OK;
    if (need < d->cap_ev) need = d->cap_ev;
    if (nth < d->ev_nth) nth = d->ev_nth;
    struct evk *ev = em_malloc((size_t)nth * need * sizeof *ev);
    if (!ev) return em_errorf(EM_ERR_NOMEM, "dyntable: no memory for the eviction scratch of %d workers", nth);
    em_free(d->ev);
    d->ev = ev, d->cap_ev = need, d->ev_nth = nth;
    return EM_OK;
}

/* ------------------------------------------------------------- lifecycle */

em_dyn_cfg em_dyn_default(int num_tables, int dim, em_optim_cfg opt) {
    em_dyn_cfg c;
    memset(&c, 0, sizeof c);
    c.num_tables = num_tables;
    c.dim = dim;
    c.pooling = EM_POOL_SUM;
    c.opt = opt;
    c.seed = 0;
    c.init_scale = 0.01f;
    c.admit = EM_DYN_ADMIT_ALWAYS;
    c.admit_min_count = 1;
    c.admit_prob = 1.0f;
    c.evict = EM_DYN_EVICT_AGE;
    return c;
}

void em_dyn_free(em_dyn *d) {
    if (!d) return;
    if (d->tabs)
        for (int t = 0; t < d->T; t++) tab_free(&d->tabs[t]);
    em_free(d->tabs);
    em__ubatch_free(&d->ub);
    em_free(d->ev);
    em_free(d);
}

size_t em_dyn_row_bytes(const em_dyn *d) {
    return d->stride * sizeof(float) + sizeof(rmeta) + 2 * sizeof(em__hent) + sizeof(uint32_t) + sizeof(struct evk);
}

/* The most a table of r rows holds: whole pages for r slots, their page table, free
 * list and eviction scratch, the hash for r rows, the sketch (what tab_bytes counts,
 * plus the eviction scratch em_dyn_row_bytes counts). Non-decreasing in r. */
static size_t layout_bytes(const em_dyn *d, uint64_t r) {
    const size_t np = (size_t)((r + d->prows - 1) / d->prows), slots = np * d->prows;
    return np * (d->page_bytes + sizeof(float *)) + slots * (sizeof(uint32_t) + sizeof(struct evk)) +
           hash_buckets(r) * sizeof(em__hent) +
           (d->cfg.admit == EM_DYN_ADMIT_COUNT ? (size_t)CMS_DEPTH * d->cfg.cms_width * sizeof(uint32_t) : 0);
}

em_status em_dyn_create(em_dyn **out, const em_dyn_cfg *cfg) {
    if (!out) return em_errorf(EM_ERR_INVALID, "dyntable: out is NULL");
    *out = NULL;
    if (!cfg) return em_errorf(EM_ERR_INVALID, "dyntable: no config");
    size_t S;
    em_status cst = em__check_rows_cfg("dyntable", cfg->num_tables, cfg->dim, cfg->pooling, cfg->opt.kind, cfg->init_scale, &S);
    if (cst) return cst;
    uint32_t cmsw = cfg->cms_width ? cfg->cms_width : 65536;
    switch (cfg->admit) {
    case EM_DYN_ADMIT_ALWAYS: break;
    case EM_DYN_ADMIT_COUNT:
        if (cfg->admit_min_count < 1) return em_errorf(EM_ERR_INVALID, "dyntable: admit_min_count 0 (need >= 1)");
        if (cmsw & (cmsw - 1)) return em_errorf(EM_ERR_INVALID, "dyntable: cms_width %u is not a power of two", cmsw);
        break;
    case EM_DYN_ADMIT_PROB:
        if (!(cfg->admit_prob >= 0.f && cfg->admit_prob <= 1.f))
            return em_errorf(EM_ERR_INVALID, "dyntable: admit_prob %g (need 0 .. 1)", (double)cfg->admit_prob);
        break;
    default: return em_errorf(EM_ERR_INVALID, "dyntable: unknown admission %d", (int)cfg->admit);
    }
    if (cfg->evict != EM_DYN_EVICT_AGE && cfg->evict != EM_DYN_EVICT_LFU)
        return em_errorf(EM_ERR_INVALID, "dyntable: unknown eviction %d", (int)cfg->evict);
    if (cfg->max_rows < 0) return em_errorf(EM_ERR_INVALID, "dyntable: max_rows %lld", (long long)cfg->max_rows);
    if (!(cfg->evict_slack >= 0.f && cfg->evict_slack <= 0.5f))
        return em_errorf(EM_ERR_INVALID, "dyntable: evict_slack %g (need 0 .. 0.5)", (double)cfg->evict_slack);

    em_dyn *d = em_calloc(1, sizeof *d);
    if (!d) return em_errorf(EM_ERR_NOMEM, "dyntable: no memory for the object");
    d->cfg = *cfg;
    d->cfg.cms_width = cmsw;
    d->T = cfg->num_tables;
    d->D = cfg->dim;
    d->S = S;
    d->stride = (size_t)cfg->dim + S;
    d->pshift = PSHIFT_MAX;
    int64_t budget = cfg->max_rows;
    if (cfg->max_bytes) {
        /* pages of about a quarter of the budget or less, so that whole pages waste
         * little of it; then the largest row count whose layout fits */
        int64_t r0 = (int64_t)(cfg->max_bytes / em_dyn_row_bytes(d));
        if (budget && budget < r0) r0 = budget;
        if (r0 < 1) r0 = 1;
        while (d->pshift > PSHIFT_MIN && ((int64_t)1 << d->pshift) > r0 / 4) d->pshift--;
    }
    d->prows = (size_t)1 << d->pshift;
    d->pmask = (uint32_t)d->prows - 1;
    d->page_bytes = d->prows * (d->stride * sizeof(float) + sizeof(rmeta));
    if (cfg->max_bytes) {
        int64_t lo = 1, hi = (int64_t)(cfg->max_bytes / em_dyn_row_bytes(d)); /* layout_bytes(r) >= r * row bytes */
        if (budget && budget < hi) hi = budget;
        if (hi < 1) hi = 1;
        while (lo < hi) { /* the largest r in [1, hi] that fits (1 if none does) */
            int64_t mid = lo + (hi - lo + 1) / 2;
            if (layout_bytes(d, (uint64_t)mid) <= cfg->max_bytes) lo = mid;
            else hi = mid - 1;
        }
        budget = lo;
        d->budget_pages = (size_t)((uint64_t)(budget + (int64_t)d->prows - 1) / d->prows);
    }
    d->budget = budget;
    d->tabs = em_calloc((size_t)d->T, sizeof(dtab));
    if (!d->tabs || em__ubatch_init(&d->ub, d->T, d->D, "dyntable") != EM_OK) {
        em_dyn_free(d);
        return em_errorf(EM_ERR_NOMEM, "dyntable: no memory for %d tables", cfg->num_tables);
    }
    for (int t = 0; t < d->T; t++) {
        d->tabs[t].seed = em__tab_seed(cfg->seed, t);
        if (cfg->admit == EM_DYN_ADMIT_COUNT) {
            d->tabs[t].cms = em_calloc((size_t)CMS_DEPTH * cmsw, sizeof(uint32_t));
            if (!d->tabs[t].cms) {
                em_dyn_free(d);
                return em_errorf(EM_ERR_NOMEM, "dyntable: no memory for the count sketches");
            }
        }
    }
    *out = d;
    return EM_OK;
}

int em_dyn_num_tables(const em_dyn *d) { return d->T; }
int em_dyn_dim(const em_dyn *d) { return d->D; }
int64_t em_dyn_step(const em_dyn *d) { return d->step; }
int64_t em_dyn_budget_rows(const em_dyn *d) { return d->budget; }
void em_dyn_set_lr(em_dyn *d, float lr) { d->cfg.opt.lr = lr; }

/* ------------------------------------------------------------- row birth */

/* The initial weights depend on (seed, table, id) only. */
static void init_row(const em_dyn *d, const dtab *tb, uint64_t id, float *w) {
    em__row_init(w, (size_t)d->D, d->S, tb->seed, id, d->cfg.init_scale, d->cfg.opt.init_accum);
}

static uint32_t alloc_slot(dtab *tb) {
    if (tb->nfree) return tb->freel[--tb->nfree];
    return tb->fresh++;
}

/* Insert an absent id (room reserved). */
static uint32_t insert_row(em_dyn *d, dtab *tb, uint64_t id, uint64_t hv, int64_t count) {
    uint32_t s = alloc_slot(tb);
    hput(tb, id, hv, s);
    rmeta *m = meta_ptr(d, tb, s);
    m->id = id, m->count = count, m->last = d->step;
    init_row(d, tb, id, row_ptr(d, tb, s));
    tb->live++;
    tb->inserts++;
    return s;
}

/* Admission of an id not in the table seen `c` times in this batch. */
static int admit(const em_dyn *d, dtab *tb, uint64_t id, uint32_t c) {
    switch (d->cfg.admit) {
    case EM_DYN_ADMIT_ALWAYS: return 1;
    case EM_DYN_ADMIT_PROB: {
        uint64_t h = em_mix64(tb->seed ^ em_mix64(id ^ 0xa0761d6478bd642full));
        return (double)(h >> 11) * (1.0 / 9007199254740992.0) < (double)d->cfg.admit_prob;
    }
    default: { /* COUNT: add c to the id's counters, admit once the estimate reaches N */
        const uint32_t W = d->cfg.cms_width;
        uint64_t est = UINT64_MAX;
        for (int r = 0; r < CMS_DEPTH; r++) {
            uint64_t h = em_mix64(id ^ (0x94d049bb133111ebull * (uint64_t)(r + 1)) ^ tb->seed);
            uint32_t *cnt = tb->cms + (size_t)r * W + (h & (W - 1));
            uint64_t v = (uint64_t)*cnt + c;
            *cnt = v > UINT32_MAX ? UINT32_MAX : (uint32_t)v;
            if (*cnt < est) est = *cnt;
        }
        return est >= d->cfg.admit_min_count;
    }
    }
}

static em_status check_offsets(const em_dyn *d, const int64_t *off, int B, size_t *nnz) {
    return em__check_offsets("dyntable", d->T, off, B, nnz);
}

/* ---------------------------------------------------------------- forward */

typedef struct {
    em_dyn *d;
    float *out;
    const float *dout;
    const uint64_t *ids;
    const int64_t *off;
    int B;
    size_t nqueue;
    atomic_size_t next;
} run_arg;

static size_t evict_rows(em_dyn *d, dtab *tb, struct evk *ev, size_t k);

/* Steps 1-4 of the file comment for table t; ev: the worker's eviction scratch. */
static void train_table(run_arg *a, int t, struct evk *ev) {
    em_dyn *d = a->d;
    em__ubatch *ub = &d->ub;
    dtab *tb = &d->tabs[t];
    const size_t kbeg = ub->tab[t].kbeg, n = ub->tab[t].n;
    const uint64_t *uid = ub->uid + kbeg, *uhash = ub->uhash + kbeg;
    const uint32_t *ucnt = ub->ucnt + kbeg, *pos2u = ub->pos2u + kbeg;
    uint32_t *uslot = ub->uslot + kbeg, *pslot = ub->pslot + kbeg;

    /* 1. dedup in batch order */
    const uint32_t U = em__ubatch_dedup(ub, t, a->ids, a->off, a->B, 0);

    /* 2. lookup / admit, in order of first occurrence; room under the budget; insert */
    const size_t hm = tb->map.cap - 1;
    int64_t nnew = 0;
    for (uint32_t u = 0; u < U; u++) {
        if (u + HASH_PREFETCH < U) __builtin_prefetch(&tb->map.h[uhash[u + HASH_PREFETCH] & hm], 0, 3);
        uint32_t s = hfind(tb, uid[u], uhash[u]);
        if (s != NONE) {
            rmeta *m = meta_ptr(d, tb, s);
            m->count += ucnt[u];
            m->last = d->step;
        } else if (admit(d, tb, uid[u], ucnt[u])) {
            s = NEWROW;
            nnew++;
        } else {
            tb->rejections++;
        }
        uslot[u] = s;
    }
    int64_t room = nnew;
    if (d->budget && tb->live + nnew > d->budget) {
        int64_t target = d->budget - (int64_t)((double)d->budget * (double)d->cfg.evict_slack);
        if (target < 0) target = 0;
        int64_t k = tb->live + nnew - target;
        if (k > tb->live) k = tb->live;
        evict_rows(d, tb, ev, (size_t)k);
        room = d->budget - tb->live;
        if (room < 0) room = 0;
    }
    for (uint32_t u = 0; u < U; u++) {
        if (uslot[u] != NEWROW) continue;
        if (room > 0) {
            uslot[u] = insert_row(d, tb, uid[u], uhash[u], (int64_t)ucnt[u]);
            room--;
        } else { /* the batch alone has more distinct ids than the budget */
            uslot[u] = NONE;
            tb->rejections++;
        }
    }

    /* 3. positions per unique in batch order; slot per position */
    em__ubatch_csr(ub, t);
    for (size_t p = 0; p < n; p++) pslot[p] = uslot[pos2u[p]];
    /* 4. pooling */
    const em__rowpages rp = rows_of(d, tb);
    em__pool_table(a->out, ub, t, a->off, a->B, (size_t)d->D, d->cfg.pooling == EM_POOL_MEAN, &rp);
}

/* Eval: read-only probes; absent ids read as zeros. */
static void eval_table(run_arg *a, int t) {
    em_dyn *d = a->d;
    dtab *tb = &d->tabs[t];
    const int B = a->B, T = d->T;
    const size_t D = (size_t)d->D;
    const int64_t *off = a->off + (size_t)t * (size_t)B;
    const int64_t kend = off[B];
    const size_t hm = tb->map.cap ? tb->map.cap - 1 : 0;
    for (int b = 0; b < B; b++) {
        float *o = a->out + ((size_t)b * (size_t)T + (size_t)t) * D;
        memset(o, 0, D * sizeof(float));
        const int64_t k0 = off[b], k1 = off[b + 1];
        for (int64_t k = k0; k < k1; k++) {
            if (tb->map.cap && k + HASH_PREFETCH < kend)
                __builtin_prefetch(&tb->map.h[em_mix64(a->ids[k + HASH_PREFETCH]) & hm], 0, 3);
            uint32_t s = hfind(tb, a->ids[k], em_mix64(a->ids[k]));
            if (s != NONE) em_vadd(o, row_ptr(d, tb, s), D);
        }
        if (d->cfg.pooling == EM_POOL_MEAN && k1 > k0) em_vscale(o, 1.0f / (float)(k1 - k0), D);
    }
}

static void train_task(void *p, int ith, int nth) {
    (void)nth;
    run_arg *a = p;
    struct evk *ev = a->d->ev ? a->d->ev + (size_t)ith * a->d->cap_ev : NULL;
    for (;;) {
        size_t t = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (t >= (size_t)a->d->T) break;
        train_table(a, (int)t, ev);
    }
}

static void eval_task(void *p, int ith, int nth) {
    run_arg *a = p;
    for (;;) {
        size_t t = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (t >= (size_t)a->d->T) break;
        eval_table(a, (int)t);
    }
}

em_status em_dyn_forward(em_dyn *d, float *out, const uint64_t *ids, const int64_t *offsets, int B, em_dyn_mode mode,
                         em_pool *pool) {
    if (!d || !out) return em_errorf(EM_ERR_INVALID, "dyntable forward: NULL object or output");
    if (B < 0) return em_errorf(EM_ERR_INVALID, "dyntable forward: batch size %d", B);
    if (mode != EM_DYN_TRAIN && mode != EM_DYN_EVAL) return em_errorf(EM_ERR_INVALID, "dyntable forward: mode %d", (int)mode);
    size_t nnz;
    em_status st = check_offsets(d, offsets, B, &nnz);
    if (st) return st;
    if (nnz && !ids) return em_errorf(EM_ERR_INVALID, "dyntable forward: ids is NULL");
    run_arg a = {d, out, NULL, ids, offsets, B, 0, 0};
    if (mode == EM_DYN_EVAL) {
        if (B) em_pool_run(pool, eval_task, &a);
        return EM_OK;
    }
    d->pending = 0;
    int grew;
    if ((st = em__ubatch_begin(&d->ub, offsets, B, nnz, "dyntable", &grew))) return st;
    for (int t = 0; t < d->T; t++) {
        dtab *tb = &d->tabs[t];
        const uint64_t n = d->ub.tab[t].n;
        uint64_t extra = n; /* every position a new row, but never past the budget */
        if (d->budget) extra = tb->live >= d->budget ? 0 : n < (uint64_t)(d->budget - tb->live) ? n : (uint64_t)(d->budget - tb->live);
        if ((st = reserve_rows(d, tb, extra))) return st;
    }
    if ((st = ensure_ev(d, d->tabs, em_pool_nth(pool)))) return st;
    if (B) em_pool_run(pool, train_task, &a);
    d->pending = 1;
    d->pend_B = B;
    d->pend_nnz = nnz;
    return EM_OK;
}

/* --------------------------------------------------------------- backward */

static void update_task(void *p, int ith, int nth) {
    (void)nth;
    run_arg *a = p;
    em_dyn *d = a->d;
    const em__ubatch *ub = &d->ub;
    float *g = ub->gbuf + (size_t)ith * ub->gstride;
    int t;
    size_t lo, hi;
    while (em__ubatch_take(ub, &a->next, a->nqueue, &t, &lo, &hi)) {
        const em__rowpages rp = rows_of(d, &d->tabs[t]);
        if (lo < hi)
            em__update_uniques(ub, t, a->off, a->B, a->dout, (size_t)d->D, d->cfg.pooling == EM_POOL_MEAN, &d->cfg.opt, &rp,
                               lo, hi, g);
    }
}

em_status em_dyn_backward_update(em_dyn *d, const float *dout, const uint64_t *ids, const int64_t *offsets, int B,
                                 em_pool *pool) {
    if (!d || !dout) return em_errorf(EM_ERR_INVALID, "dyntable backward: NULL object or gradient");
    size_t nnz;
    em_status st = check_offsets(d, offsets, B < 0 ? 0 : B, &nnz);
    if (st) return st;
    if (!d->pending || d->pend_B != B || d->pend_nnz != nnz)
        return em_errorf(EM_ERR_INVALID, "dyntable backward: no train forward of this batch (B %d, %zu ids) precedes it", B, nnz);
    if (nnz && !ids) return em_errorf(EM_ERR_INVALID, "dyntable backward: ids is NULL");
    /* the recorded batch must be this one (a sequential pass, cheap next to the update) */
    if ((st = em__ubatch_check_ids(&d->ub, ids, "dyntable backward"))) return st;
    int nth = em_pool_nth(pool);
    if ((st = em__ubatch_workers(&d->ub, nth, "dyntable"))) return st;
    size_t nq = em__ubatch_queue(&d->ub, nth);
    run_arg a = {d, NULL, dout, ids, offsets, B, nq, 0};
    if (nq) em_pool_run(pool, update_task, &a);
    d->pending = 0;
    d->step++;
    return EM_OK;
}

/* -------------------------------------------------------------- eviction */

static inline int evk_less(const struct evk *x, const struct evk *y) {
    return x->k < y->k || (x->k == y->k && x->id < y->id);
}

EM__SELECT_DEFINE(evk, struct evk, evk_less)

/* Evict the k lowest-ranked rows (fewer if fewer are evictable) among those the batch
 * in flight does not use (last < step: the batch's rows were stamped in step 2). */
static size_t evict_rows(em_dyn *d, dtab *tb, struct evk *ev, size_t k) {
    size_t n = 0;
    const int lfu = d->cfg.evict == EM_DYN_EVICT_LFU;
    for (uint32_t s = 0; s < tb->fresh; s++) {
        const rmeta *m = meta_ptr(d, tb, s);
        if (m->count < 0 || m->last == d->step) continue;
        ev[n].k = lfu ? m->count : m->last;
        ev[n].id = m->id;
        ev[n].slot = s;
        n++;
    }
    EM_ASSERT((int64_t)n <= tb->live);
    if (k > n) k = n;
    if (k < n) evk_select(ev, n, k);
    if (k) evk_sort(ev, 0, k - 1);
    for (size_t i = 0; i < k; i++) {
        hdel(tb, ev[i].id);
        rmeta *m = meta_ptr(d, tb, ev[i].slot);
        m->count = -1, m->last = -1, m->id = 0;
        tb->freel[tb->nfree++] = ev[i].slot;
    }
    tb->live -= (int64_t)k;
    tb->evictions += k;
    return k;
}

void em_dyn_end_step(em_dyn *d) { /* tables are within their budget already */
    d->pending = 0;
    d->step++;
}

/* ------------------------------------------------------------- inspection */

int em_dyn_lookup(em_dyn *d, int t, uint64_t id, em_dyn_row *row) {
    if (!d || t < 0 || t >= d->T) return 0;
    dtab *tb = &d->tabs[t];
    uint32_t s = hfind(tb, id, em_mix64(id));
    if (s == NONE) return 0;
    if (row) {
        const rmeta *m = meta_ptr(d, tb, s);
        row->w = row_ptr(d, tb, s);
        row->state = d->S ? row->w + d->D : NULL;
        row->count = m->count, row->last = m->last, row->slot = s;
    }
    return 1;
}

int64_t em_dyn_ids(const em_dyn *d, int t, uint64_t *ids, int64_t cap) {
    if (!d || t < 0 || t >= d->T) return 0;
    const dtab *tb = &d->tabs[t];
    int64_t n = 0;
    for (uint32_t s = 0; s < tb->fresh; s++) {
        const rmeta *m = meta_ptr(d, tb, s);
        if (m->count < 0) continue;
        if (n < cap) ids[n] = m->id;
        n++;
    }
    return n;
}

static size_t tab_bytes(const em_dyn *d, const dtab *tb) {
    return tb->npages * d->page_bytes + tb->cap_pages * sizeof(float *) + tb->map.cap * sizeof(em__hent) +
           tab_slots(d, tb) * sizeof(uint32_t) + (tb->cms ? (size_t)CMS_DEPTH * d->cfg.cms_width * sizeof(uint32_t) : 0);
}

em_dyn_stats em_dyn_get_stats(const em_dyn *d, int t) {
    em_dyn_stats s;
    memset(&s, 0, sizeof s);
    if (!d) return s;
    for (int i = 0; i < d->T; i++) {
        if (t >= 0 && i != t) continue;
        const dtab *tb = &d->tabs[i];
        s.rows += tb->live;
        s.slots += (int64_t)tab_slots(d, tb);
        s.capacity += (int64_t)tb->map.cap;
        s.bytes += tab_bytes(d, tb);
        s.inserts += tb->inserts, s.evictions += tb->evictions, s.rejections += tb->rejections;
    }
    return s;
}

/* ------------------------------------------------------------ checkpoints */

#define NPT 7 /* tensors per table at most */

em_status em_dyn_save(const em_dyn *d, const char *path) { return em_dyn_save_ex(d, path, NULL, 0, NULL, 0); }

em_status em_dyn_save_ex(const em_dyn *d, const char *path, const em_st_tensor *extra, int n_extra,
                         const em_st_meta *xmeta, int n_xmeta) {
    if (!d || !path) return em_errorf(EM_ERR_INVALID, "dyntable save: NULL object or path");
    if (n_extra < 0 || n_xmeta < 0 || (n_extra && !extra) || (n_xmeta && !xmeta))
        return em_errorf(EM_ERR_INVALID, "dyntable save: bad extra tensors or metadata");
    const int T = d->T;
    const size_t D = (size_t)d->D, S = d->S;
    em_st_tensor *ts = em_calloc((size_t)T * NPT + (size_t)n_extra, sizeof *ts);
    em_st_meta *meta = em_calloc(5 + (size_t)n_xmeta, sizeof *meta);
    char *names = em_calloc((size_t)T * NPT, 48);
    void **bufs = em_calloc((size_t)T * 5, sizeof(void *));
    int64_t *stats = em_calloc((size_t)T * 3, sizeof(int64_t));
    em_status st = EM_OK;
    int nt = 0;
    if (!ts || !meta || !names || !bufs || !stats) {
        st = em_errorf(EM_ERR_NOMEM, "dyntable save: no memory");
        goto done;
    }
    for (int t = 0; t < T; t++) {
        const dtab *tb = &d->tabs[t];
        size_t n = (size_t)tb->live, n1 = n ? n : 1;
        uint64_t *ids = bufs[t * 5 + 0] = em_malloc(n1 * 8);
        float *rows = bufs[t * 5 + 1] = em_malloc(n1 * D * 4);
        int64_t *cnt = bufs[t * 5 + 2] = em_malloc(n1 * 8), *last = bufs[t * 5 + 3] = em_malloc(n1 * 8);
        float *state = bufs[t * 5 + 4] = S ? em_malloc(n1 * S * 4) : NULL;
        if (!ids || !rows || !cnt || !last || (S && !state)) {
            st = em_errorf(EM_ERR_NOMEM, "dyntable save: no memory for table %d (%zu rows)", t, n);
            goto done;
        }
        size_t i = 0;
        for (uint32_t s = 0; s < tb->fresh; s++) {
            const rmeta *m = meta_ptr(d, tb, s);
            if (m->count < 0) continue;
            const float *w = row_ptr(d, tb, s);
            ids[i] = m->id, cnt[i] = m->count, last[i] = m->last;
            memcpy(rows + i * D, w, D * 4);
            if (S) memcpy(state + i * S, w + D, S * 4);
            i++;
        }
        stats[t * 3 + 0] = (int64_t)tb->inserts, stats[t * 3 + 1] = (int64_t)tb->evictions;
        stats[t * 3 + 2] = (int64_t)tb->rejections;
        const char *suf[NPT] = {"ids", "rows", "count", "last", "state", "stats", "cms"};
        const void *data[NPT] = {ids, rows, cnt, last, state, stats + t * 3, tb->cms};
        const em_dtype dt[NPT] = {EM_U64, EM_F32, EM_I64, EM_I64, EM_F32, EM_I64, EM_I32};
        for (int j = 0; j < NPT; j++) {
            if (j == 4 && !S) continue;
            if (j == 6 && !tb->cms) continue;
            char *nm = names + (size_t)(t * NPT + j) * 48;
            snprintf(nm, 48, "dyn.%d.%s", t, suf[j]);
            em_st_tensor *x = &ts[nt++];
            x->name = nm, x->dtype = dt[j], x->data = data[j];
            x->ndim = j == 1 || j == 4 ? 2 : 1;
            x->shape[0] = j == 5 ? 3 : j == 6 ? (int64_t)CMS_DEPTH * d->cfg.cms_width : (int64_t)n;
            if (j == 1) x->shape[1] = (int64_t)D;
            if (j == 4) x->shape[1] = (int64_t)S;
        }
    }
    {
        char sT[24], sD[24], sS[24];
        snprintf(sT, sizeof sT, "%d", T);
        snprintf(sD, sizeof sD, "%d", d->D);
        snprintf(sS, sizeof sS, "%lld", (long long)d->step);
        const em_st_meta own[5] = {{"dyn.version", "1"}, {"dyn.tables", sT}, {"dyn.dim", sD},
                                   {"dyn.opt", em_optim_name(d->cfg.opt.kind)}, {"dyn.step", sS}};
        memcpy(meta, own, sizeof own);
        if (n_xmeta) memcpy(meta + 5, xmeta, (size_t)n_xmeta * sizeof *meta);
        if (n_extra) memcpy(ts + nt, extra, (size_t)n_extra * sizeof *ts);
        st = em_st_write(path, ts, nt + n_extra, meta, 5 + n_xmeta);
    }
done:
    if (bufs)
        for (int i = 0; i < T * 5; i++) em_free(bufs[i]);
    em_free(bufs), em_free(ts), em_free(meta), em_free(names), em_free(stats);
    return st;
}

static em_status meta_int(const em_st *f, const char *path, const char *key, long long *v) {
    const char *s = em_st_meta_get(f, key);
    char *end;
    if (!s) return em_errorf(EM_ERR_CORRUPT, "%s: no %s in the metadata", path, key);
    *v = strtoll(s, &end, 10);
    if (end == s || *end) return em_errorf(EM_ERR_CORRUPT, "%s: %s = '%s' is not an integer", path, key, s);
    return EM_OK;
}

em_status em_dyn_load(em_dyn *d, const char *path) {
    if (!d || !path) return em_errorf(EM_ERR_INVALID, "dyntable load: NULL object or path");
    em_st *f = NULL;
    em_status st = em_st_open(&f, path);
    if (st) return st;
    st = em_dyn_load_st(d, f, path);
    em_st_close(f);
    return st;
}

em_status em_dyn_load_st(em_dyn *d, const em_st *f, const char *path) {
    if (!d || !f || !path) return em_errorf(EM_ERR_INVALID, "dyntable load: NULL object, file or path");
    em_status st = EM_OK;
    const int T = d->T;
    const size_t D = (size_t)d->D, S = d->S;
    dtab *nt = NULL;
    long long vT, vD, vstep;
    if ((st = meta_int(f, path, "dyn.tables", &vT)) || (st = meta_int(f, path, "dyn.dim", &vD)) ||
        (st = meta_int(f, path, "dyn.step", &vstep)))
        goto fail;
    const char *opt = em_st_meta_get(f, "dyn.opt");
    if (vT != T || vD != d->D || !opt || strcmp(opt, em_optim_name(d->cfg.opt.kind)) != 0) {
        st = em_errorf(EM_ERR_INVALID, "dyntable load: %s holds %lld tables of dim %lld (%s), this object %d of dim %d (%s)",
                       path, vT, vD, opt ? opt : "?", T, d->D, em_optim_name(d->cfg.opt.kind));
        goto fail;
    }
    if (vstep < 0) {
        st = em_errorf(EM_ERR_CORRUPT, "%s: dyn.step %lld", path, vstep);
        goto fail;
    }
    nt = em_calloc((size_t)T, sizeof *nt);
    if (!nt) {
        st = em_errorf(EM_ERR_NOMEM, "dyntable load: no memory");
        goto fail;
    }
    const int64_t save_step = d->step;
    d->step = vstep; /* insert_row stamps last; overwritten below anyway */
    for (int t = 0; t < T; t++) {
        char nm[48];
        snprintf(nm, sizeof nm, "dyn.%d.ids", t);
        const em_st_tensor *ti = em_st_find(f, nm);
        if (!ti || ti->ndim != 1) {
            st = em_errorf(EM_ERR_CORRUPT, "%s: no 1-d tensor %s", path, nm);
            goto fail_step;
        }
        const int64_t n = ti->shape[0];
        const uint64_t *ids = em_st_expect(f, nm, EM_U64, n);
        snprintf(nm, sizeof nm, "dyn.%d.rows", t);
        const float *rows = em_st_expect(f, nm, EM_F32, n * (int64_t)D);
        snprintf(nm, sizeof nm, "dyn.%d.count", t);
        const int64_t *cnt = em_st_expect(f, nm, EM_I64, n);
        snprintf(nm, sizeof nm, "dyn.%d.last", t);
        const int64_t *last = em_st_expect(f, nm, EM_I64, n);
        const float *state = NULL;
        if (S) {
            snprintf(nm, sizeof nm, "dyn.%d.state", t);
            state = em_st_expect(f, nm, EM_F32, n * (int64_t)S);
        }
        snprintf(nm, sizeof nm, "dyn.%d.stats", t);
        const int64_t *stt = em_st_expect(f, nm, EM_I64, 3);
        const uint32_t *cms = NULL;
        if (d->cfg.admit == EM_DYN_ADMIT_COUNT) {
            snprintf(nm, sizeof nm, "dyn.%d.cms", t);
            cms = em_st_expect(f, nm, EM_I32, (int64_t)CMS_DEPTH * d->cfg.cms_width);
        }
        if (!ids || !rows || !cnt || !last || (S && !state) || !stt || (d->cfg.admit == EM_DYN_ADMIT_COUNT && !cms)) {
            st = EM_ERR_CORRUPT; /* em_st_expect set the detail */
            goto fail_step;
        }
        dtab *tb = &nt[t];
        tb->seed = d->tabs[t].seed;
        if (cms) {
            tb->cms = em_malloc((size_t)CMS_DEPTH * d->cfg.cms_width * sizeof(uint32_t));
            if (!tb->cms) {
                st = em_errorf(EM_ERR_NOMEM, "dyntable load: no memory for a sketch");
                goto fail_step;
            }
            memcpy(tb->cms, cms, (size_t)CMS_DEPTH * d->cfg.cms_width * sizeof(uint32_t));
        }
        if ((st = reserve_rows(d, tb, (uint64_t)n))) goto fail_step;
        for (int64_t i = 0; i < n; i++) {
            uint64_t hv = em_mix64(ids[i]);
            if (cnt[i] < 0 || hfind(tb, ids[i], hv) != NONE) {
                st = em_errorf(EM_ERR_CORRUPT, "%s: table %d row %lld: %s", path, t, (long long)i,
                               cnt[i] < 0 ? "negative count" : "duplicate id");
                goto fail_step;
            }
            uint32_t s = insert_row(d, tb, ids[i], hv, cnt[i]);
            meta_ptr(d, tb, s)->last = last[i];
            float *w = row_ptr(d, tb, s);
            memcpy(w, rows + (size_t)i * D, D * 4);
            if (S) memcpy(w + D, state + (size_t)i * S, S * 4);
        }
        tb->inserts = (uint64_t)stt[0], tb->evictions = (uint64_t)stt[1], tb->rejections = (uint64_t)stt[2];
    }
    if ((st = ensure_ev(d, nt, 1))) goto fail_step;
    /* success: swap in */
    for (int t = 0; t < T; t++) {
        tab_free(&d->tabs[t]);
        d->tabs[t] = nt[t];
    }
    em_free(nt);
    d->pending = 0;
    return EM_OK;
fail_step:
    d->step = save_step;
fail:
    if (nt) {
        for (int t = 0; t < T; t++) tab_free(&nt[t]);
        em_free(nt);
    }
    return st;
}
