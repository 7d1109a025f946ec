/*
 * embbag.c - table-batched embedding bags; the sparse optimizer (SGD, AdaGrad,
 * row-wise AdaGrad) is fused into the backward pass.
 *
 * Storage: all tables' weights are one allocation (sum rows[t] * D floats), the
 * optimizer state another, each table an offset into them; a 10M-row table costs no
 * per-row allocations. Weights start at zero (em_embbag_init_uniform or a checkpoint
 * fills them), the state at opt.init_accum.
 *
 * Work is handed out in chunks that workers take from an atomic counter (a worker
 * slowed by anything else on its core does not hold the others up). No result depends
 * on which worker runs a chunk, so dynamic scheduling keeps results bitwise identical.
 *
 * Forward: the T*B bags (table-major, the order of `offsets`) are cut into chunks of
 * consecutive bags; a bag is pooled by SIMD axpys into its output row in index order,
 * so every output is computed by one worker in a fixed order.
 * The rows of the indices a fixed distance ahead are prefetched (the lookups are
 * random DRAM reads for large tables; that latency is the cost of the forward).
 *
 * Backward (fused with the update), two pool runs:
 *  1. pack (tables taken one at a time): validate the table's indices and pack each
 *     position as (row << 32) | payload. The payload is the example b of the bag or,
 *     when per-id weights are involved, the position in the table (b then comes from
 *     a position -> example array filled in the same pass). All indices are checked
 *     before anything is written, so a bad batch leaves the tables untouched.
 *  2. a queue: sort(0), sort(1), update chunks of table 0, sort(2), chunks of table 1,
 *     ... so the sorting of one table (cache-resident compute) overlaps the updates of
 *     the previous one (random DRAM read-modify-writes) on the other workers.
 *     sort(t): a stable LSD radix sort on the ceil(log2(rows)) row bits
 *     (sparse/radix.c) keeps the occurrences of a row in batch order; the starts of
 *     the runs of equal rows (the unique rows) are recorded. A table with several ids
 *     per bag also gets a contiguous copy of its dout slice: the update reads
 *     dout[b][t] at random b, and rows T*D floats apart thrash the TLB.
 *     update chunk: a range of the table's unique rows; each row is reduced by exactly
 *     one worker, g = sum over its occurrences in batch order of scale * dout[b][t],
 *     and the optimizer is applied once. Nothing depends on which worker runs what,
 *     so tables are bitwise identical for any thread count.
 * Scratch (sort buffers, histograms, dout copies, per-worker gradient rows, the queue)
 * lives in the object and only grows, so steady-state steps allocate nothing.
 *
 * Validation: offsets (offsets[0] == 0, non-decreasing) are checked serially first
 * (T*B + 1 compares), then indices inside the parallel passes; every chunk is scanned
 * up to its first bad index and the earliest over all workers is reported, so the
 * detail names the same index for any thread count.
 */
#include "ember/embbag.h"

#include <math.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>

#include "core/simd.h"
#include "sparse/radix.h"
#include "sparse/rowops.h"

#define INIT_CHUNK_ROWS 65536 /* rows per RNG stream in em_embbag_init_uniform */
#define FWD_PREFETCH 12       /* indices ahead whose rows the forward prefetches */
#define BWD_PREFETCH 6        /* unique rows ahead whose weights/state the update prefetches */
#define CHUNKS_PER_WORKER 8   /* dynamic work chunks per worker (load balance) */
#define DCOPY_MIN_PER_BAG 2   /* gather dout[:, t, :] contiguously from this many ids per bag */

typedef struct {
    int64_t rows;
    int key_bits;      /* ceil(log2(rows)): the radix sort key width */
    size_t woff, soff; /* offsets of the table in e->w and e->state */
    size_t chunk0;     /* first init chunk of the table (global chunk numbering) */
    /* per backward call */
    size_t kbeg, n;    /* positions [kbeg, kbeg + n) of the table's indices */
    size_t nuniq;      /* unique rows; their run starts are segs[kbeg .. kbeg + nuniq) */
    int dcopied;       /* dout[:, t, :] was gathered into e->dcopy + dcoff */
    size_t dcoff;
    int nchunks;       /* update chunks of the table */
    atomic_int ready;  /* sorted (set by the sorting worker, awaited by the updating ones) */
    const uint64_t *sorted; /* items or tmp + kbeg */
} tbl;

enum { ERR_NONE = 0, ERR_INDEX, ERR_TOO_MANY };

/* A worker's earliest bad input, ordered by (t, b, k): k = -1 for a table-level error. */
typedef struct {
    int kind;
    int t;
    int64_t b, k, row;
    char pad[64 - 2 * sizeof(int) - 3 * sizeof(int64_t)]; /* one cache line per worker */
} bag_err;

struct em_embbag {
    int T, D;
    em_pooling pooling;
    em_optim_cfg opt;
    tbl *tabs;   /* T + 1: the last one is a sentinel (offsets, chunk totals) */
    float *w;    /* all weights */
    float *state;
    size_t state_per_row; /* D (AdaGrad), 1 (row-wise), 0 (SGD) */
    /* scratch, grown on demand */
    size_t cap_nnz;
    uint64_t *items, *tmp; /* packed (row, payload) pairs and the sort's other buffer */
    uint32_t *ex, *segs;   /* position -> example; run starts of unique rows */
    int cap_nth;
    size_t gstride;        /* floats per worker in gbuf (D rounded up to a cache line) */
    uint32_t *hist;        /* EM__RADIX_HIST_WORDS per worker */
    float *gbuf;           /* one gradient row per worker */
    float *dcopy;          /* (B, D) dout slices of the tables with many ids per bag */
    size_t cap_dcopy;
    bag_err *errs;         /* one per worker */
    struct qitem { int t, part; } *queue; /* backward pass-2 work list (2T + nth * CHUNKS_PER_WORKER) */
};

/* -------------------------------------------------------------- lifecycle */

void em_embbag_free(em_embbag *e) {
    if (!e) return;
    em_free(e->tabs);
    em_free(e->w);
    em_free(e->state);
    em_free(e->items);
    em_free(e->tmp);
    em_free(e->ex);
    em_free(e->segs);
    em_free(e->hist);
    em_free(e->gbuf);
    em_free(e->errs);
    em_free(e->queue);
    em_free(e->dcopy);
    em_free(e);
}

em_status em_embbag_create(em_embbag **out, const em_embbag_cfg *cfg) {
    if (!out) return em_errorf(EM_ERR_INVALID, "embbag: out is NULL");
    *out = NULL;
    if (!cfg || !cfg->rows) return em_errorf(EM_ERR_INVALID, "embbag: no config or no rows");
    if (cfg->num_tables < 1) return em_errorf(EM_ERR_INVALID, "embbag: %d tables (need >= 1)", cfg->num_tables);
    if (cfg->dim < 1) return em_errorf(EM_ERR_INVALID, "embbag: dim %d (need >= 1)", cfg->dim);
    if (cfg->pooling != EM_POOL_SUM && cfg->pooling != EM_POOL_MEAN)
        return em_errorf(EM_ERR_INVALID, "embbag: unknown pooling %d", (int)cfg->pooling);
    size_t spr;
    switch (cfg->opt.kind) {
    case EM_OPT_SGD: spr = 0; break;
    case EM_OPT_ADAGRAD: spr = (size_t)cfg->dim; break;
    case EM_OPT_ROWWISE_ADAGRAD: spr = 1; break;
    default:
        return em_errorf(EM_ERR_INVALID, "embbag: optimizer %d is not a sparse optimizer (sgd, adagrad, rowwise_adagrad)",
                         (int)cfg->opt.kind);
    }
    const int T = cfg->num_tables;
    const size_t D = (size_t)cfg->dim;
    size_t wtot = 0, stot = 0;
    for (int t = 0; t < T; t++) {
        int64_t r = cfg->rows[t];
        if (r < 1 || r > ((int64_t)1 << 32))
            return em_errorf(EM_ERR_INVALID, "embbag: table %d has %lld rows (need 1 .. 2^32)", t, (long long)r);
        if ((size_t)r > (SIZE_MAX / sizeof(float) - wtot) / D)
            return em_errorf(EM_ERR_NOMEM, "embbag: tables too large for the address space");
        wtot += (size_t)r * D;
        stot += (size_t)r * spr;
    }

    em_embbag *e = em_calloc(1, sizeof *e);
    if (!e) return em_errorf(EM_ERR_NOMEM, "embbag: no memory for the object");
    e->T = T;
    e->D = cfg->dim;
    e->pooling = cfg->pooling;
    e->opt = cfg->opt;
    e->state_per_row = spr;
    e->gstride = (D + 15) / 16 * 16;
    e->tabs = em_calloc((size_t)T + 1, sizeof *e->tabs);
    e->w = em_malloc(wtot * sizeof(float));
    e->state = spr ? em_malloc(stot * sizeof(float)) : NULL;
    if (!e->tabs || !e->w || (spr && !e->state)) {
        em_embbag_free(e);
        return em_errorf(EM_ERR_NOMEM, "embbag: no memory for %zu weights and %zu state values", wtot, stot);
    }
    size_t wo = 0, so = 0, co = 0;
    for (int t = 0; t <= T; t++) {
        tbl *tb = &e->tabs[t];
        tb->woff = wo, tb->soff = so, tb->chunk0 = co;
        if (t == T) break;
        tb->rows = cfg->rows[t];
        while (((int64_t)1 << tb->key_bits) < tb->rows) tb->key_bits++;
        wo += (size_t)tb->rows * D;
        so += (size_t)tb->rows * spr;
        co += ((size_t)tb->rows + INIT_CHUNK_ROWS - 1) / INIT_CHUNK_ROWS;
    }
    /* transparent huge pages over the tables, before first touch: every random row
     * lookup otherwise costs a TLB miss and a page walk (two-dimensional under
     * virtualisation), which dominated the lookups of large tables */
    em_advise_huge(e->w, wtot * sizeof(float));
    if (stot) em_advise_huge(e->state, stot * sizeof(float));
    memset(e->w, 0, wtot * sizeof(float));
    if (cfg->opt.init_accum == 0.f) {
        if (stot) memset(e->state, 0, stot * sizeof(float));
    } else {
        for (size_t i = 0; i < stot; i++) e->state[i] = cfg->opt.init_accum;
    }
    *out = e;
    return EM_OK;
}

int em_embbag_num_tables(const em_embbag *e) { return e->T; }
int em_embbag_dim(const em_embbag *e) { return e->D; }
int64_t em_embbag_rows(const em_embbag *e, int t) { return t >= 0 && t < e->T ? e->tabs[t].rows : 0; }

float *em_embbag_weights(em_embbag *e, int t) {
    if (t < 0 || t >= e->T) return NULL;
    return e->w + e->tabs[t].woff;
}

float *em_embbag_state(em_embbag *e, int t, size_t *count) {
    if (t < 0 || t >= e->T || !e->state) {
        if (count) *count = 0;
        return NULL;
    }
    if (count) *count = (size_t)e->tabs[t].rows * e->state_per_row;
    return e->state + e->tabs[t].soff;
}

void em_embbag_set_lr(em_embbag *e, float lr) { e->opt.lr = lr; }

/* --------------------------------------------------------- initialisation */

typedef struct {
    em_embbag *e;
    uint64_t seed;
} init_arg;

/* Chunk c of table t draws from its own stream, so the values depend on (seed, t, c)
 * only, never on how chunks are spread over workers. */
static void init_task(void *p, int ith, int nth) {
    init_arg *a = p;
    em_embbag *e = a->e;
    const size_t D = (size_t)e->D;
    size_t lo, hi;
    em_split(e->tabs[e->T].chunk0, ith, nth, &lo, &hi);
    int t = 0;
    for (size_t c = lo; c < hi; c++) {
        while (e->tabs[t + 1].chunk0 <= c) t++;
        const tbl *tb = &e->tabs[t];
        size_t cl = c - tb->chunk0;
        size_t r0 = cl * INIT_CHUNK_ROWS, r1 = r0 + INIT_CHUNK_ROWS;
        if (r1 > (size_t)tb->rows) r1 = (size_t)tb->rows;
        uint64_t tseed = em_mix64(a->seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(t + 1)));
        em_rng r;
        em_rng_seed(&r, em_mix64(tseed + cl));
        double bound = sqrt(1.0 / (double)tb->rows);
        float *w = e->w + tb->woff + r0 * D;
        for (size_t i = 0, n = (r1 - r0) * D; i < n; i++) w[i] = (float)(-bound + 2.0 * bound * em_rng_uniform(&r));
    }
}

void em_embbag_init_uniform(em_embbag *e, uint64_t seed, em_pool *pool) {
    init_arg a = {e, seed};
    em_pool_run(pool, init_task, &a);
}

/* A shard: rows row0, row0 + stride, ... (rows[t] of them) and columns
 * [col0, col0 + D) of a table t_global of rows_global x dim_global, drawn exactly as
 * em_embbag_init_uniform draws that table whole: each init chunk holding one of the
 * rows is replayed from its start. */
void em_embbag_init_uniform_shard(em_embbag *e, int t, uint64_t seed, int t_global, int64_t rows_global,
                                  int64_t row0, int64_t stride, int col0, int dim_global) {
    const size_t D = (size_t)e->D, DG = (size_t)dim_global, str = (size_t)(stride > 0 ? stride : 1);
    const tbl *tb = &e->tabs[t];
    if (tb->rows <= 0) return;
    const uint64_t tseed = em_mix64(seed ^ (0x9e3779b97f4a7c15ull * (uint64_t)(t_global + 1)));
    const double bound = sqrt(1.0 / (double)rows_global);
    const size_t g0 = (size_t)row0, glast = g0 + ((size_t)tb->rows - 1) * str;
    for (size_t cl = g0 / INIT_CHUNK_ROWS; cl * INIT_CHUNK_ROWS <= glast; cl++) {
        em_rng r;
        em_rng_seed(&r, em_mix64(tseed + cl));
        size_t c0 = cl * INIT_CHUNK_ROWS, c1 = c0 + INIT_CHUNK_ROWS;
        if (c1 > (size_t)rows_global) c1 = (size_t)rows_global;
        for (size_t g = c0; g < c1 && g <= glast; g++) {
            const int mine = g >= g0 && (g - g0) % str == 0;
            for (size_t d = 0; d < DG; d++) {
                float v = (float)(-bound + 2.0 * bound * em_rng_uniform(&r));
                if (mine && d >= (size_t)col0 && d < (size_t)col0 + D)
                    e->w[tb->woff + (g - g0) / str * D + (d - (size_t)col0)] = v;
            }
        }
    }
}

/* ---------------------------------------------------------------- scratch */

static em_status ensure_workers(em_embbag *e, int nth) {
    if (nth <= e->cap_nth) return EM_OK;
    uint32_t *hist = em_malloc((size_t)nth * EM__RADIX_HIST_WORDS * sizeof(uint32_t));
    float *gbuf = em_malloc((size_t)nth * e->gstride * sizeof(float));
    bag_err *errs = em_malloc((size_t)nth * sizeof(bag_err));
    struct qitem *queue = em_malloc((2 * (size_t)e->T + (size_t)nth * CHUNKS_PER_WORKER) * sizeof(struct qitem));
    if (!hist || !gbuf || !errs || !queue) {
        em_free(hist), em_free(gbuf), em_free(errs), em_free(queue);
        return em_errorf(EM_ERR_NOMEM, "embbag: no memory for the scratch of %d workers", nth);
    }
    em_free(e->hist), em_free(e->gbuf), em_free(e->errs), em_free(e->queue);
    e->hist = hist, e->gbuf = gbuf, e->errs = errs, e->queue = queue;
    e->cap_nth = nth;
    return EM_OK;
}

static em_status ensure_nnz(em_embbag *e, size_t nnz) {
    if (nnz <= e->cap_nnz) return EM_OK;
    size_t cap = e->cap_nnz + e->cap_nnz / 2;
    if (cap < nnz) cap = nnz;
    uint64_t *items = em_malloc(cap * sizeof(uint64_t)), *tmp = em_malloc(cap * sizeof(uint64_t));
    uint32_t *ex = em_malloc(cap * sizeof(uint32_t)), *segs = em_malloc(cap * sizeof(uint32_t));
    if (!items || !tmp || !ex || !segs) {
        em_free(items), em_free(tmp), em_free(ex), em_free(segs);
        return em_errorf(EM_ERR_NOMEM, "embbag: no memory for the backward scratch of %zu indices", nnz);
    }
    em_free(e->items), em_free(e->tmp), em_free(e->ex), em_free(e->segs);
    e->items = items, e->tmp = tmp, e->ex = ex, e->segs = segs;
    e->cap_nnz = cap;
    return EM_OK;
}

static em_status ensure_dcopy(em_embbag *e, size_t n) {
    if (n <= e->cap_dcopy) return EM_OK;
    size_t cap = e->cap_dcopy + e->cap_dcopy / 2;
    if (cap < n) cap = n;
    float *p = em_malloc(cap * sizeof(float));
    if (!p) return em_errorf(EM_ERR_NOMEM, "embbag: no memory for a %zu-value gradient copy", n);
    em_free(e->dcopy);
    e->dcopy = p;
    e->cap_dcopy = cap;
    return EM_OK;
}

/* ------------------------------------------------------------- validation */

/* Offsets must start at 0 and never decrease; on success *nnz = offsets[T*B]. */
static em_status check_offsets(const em_embbag *e, const int64_t *off, int B, size_t *nnz) {
    if (!off) return em_errorf(EM_ERR_INVALID, "embbag: offsets is NULL");
    if (off[0] != 0) return em_errorf(EM_ERR_INVALID, "embbag: offsets[0] = %lld, expected 0", (long long)off[0]);
    size_t nb = (size_t)e->T * (size_t)B;
    size_t bad = nb;
    for (size_t u = 0; u < nb; u++)
        if (off[u + 1] < off[u]) {
            bad = u;
            break;
        }
    if (bad < nb)
        return em_errorf(EM_ERR_INVALID,
                         "embbag: table %d, example %d: offsets[%zu] = %lld < offsets[%zu] = %lld (offsets must not decrease)",
                         (int)(bad / (size_t)B), (int)(bad % (size_t)B), bad + 1, (long long)off[bad + 1], bad,
                         (long long)off[bad]);
    *nnz = (size_t)off[nb];
    return EM_OK;
}

/* Keep the earliest error a worker saw: chunks are taken dynamically, so a worker may
 * meet a later one first. */
static void set_err(bag_err *er, int kind, int t, int64_t b, int64_t k, int64_t row) {
    if (er->kind != ERR_NONE &&
        (er->t < t || (er->t == t && (er->b < b || (er->b == b && er->k < k)))))
        return;
    er->kind = kind, er->t = t, er->b = b, er->k = k, er->row = row;
}

/* The earliest error over all workers. Every chunk of work is scanned up to its first
 * error, so this is the first bad input of the batch whatever the thread count. */
static em_status report_errors(const em_embbag *e, int nth) {
    bag_err first = {.kind = ERR_NONE};
    for (int i = 0; i < nth; i++) {
        const bag_err *er = &e->errs[i];
        if (er->kind != ERR_NONE) set_err(&first, er->kind, er->t, er->b, er->k, er->row);
    }
    {
        const bag_err *er = &first;
        if (er->kind == ERR_INDEX)
            return em_errorf(EM_ERR_INVALID, "embbag: table %d, example %lld, index %lld: row %lld out of range [0, %lld)",
                             er->t, (long long)er->b, (long long)er->k, (long long)er->row,
                             (long long)e->tabs[er->t].rows);
        if (er->kind == ERR_TOO_MANY)
            return em_errorf(EM_ERR_INVALID, "embbag: table %d has %lld indices in one batch (at most 2^32 - 1)", er->t,
                             (long long)er->row);
    }
    return EM_OK;
}

static inline void prefetch_row(const float *p, size_t bytes, int write) {
    const char *c = (const char *)p, *last = c + bytes - 1;
    for (; c < last; c += 64) {
        if (write) __builtin_prefetch(c, 1, 3);
        else __builtin_prefetch(c, 0, 3);
    }
    if (write) __builtin_prefetch(last, 1, 3); /* a row that straddles one more line */
    else __builtin_prefetch(last, 0, 3);
}

/* ---------------------------------------------------------------- forward */

typedef struct {
    em_embbag *e;
    float *out;
    const int64_t *idx, *off;
    const float *pw;
    int B;
    size_t chunk;       /* bags per work chunk */
    atomic_size_t next; /* next chunk to take */
} fwd_arg;

/* Pool bags [lo, hi) (table-major bag numbers); stops at the first bad index. */
static void fwd_bags(fwd_arg *a, size_t lo, size_t hi, bag_err *er) {
    em_embbag *e = a->e;
    const int T = e->T, B = a->B;
    const size_t D = (size_t)e->D, rowbytes = D * sizeof(float);
    const int64_t *idx = a->idx, *off = a->off;
    const float *pw = a->pw;
    int t = (int)(lo / (size_t)B), b = (int)(lo % (size_t)B);
    const int64_t kend = off[hi];
    /* The prefetch cursor runs FWD_PREFETCH indices ahead and may be a table ahead. */
    int tp = t;
    int64_t tp_end = off[(size_t)(tp + 1) * (size_t)B];
    for (size_t u = lo; u < hi; u++) {
        const tbl *tb = &e->tabs[t];
        const float *W = e->w + tb->woff;
        const uint64_t rows = (uint64_t)tb->rows;
        float *o = a->out + ((size_t)b * (size_t)T + (size_t)t) * D;
        const int64_t k0 = off[u], k1 = off[u + 1];
        memset(o, 0, rowbytes);
        for (int64_t k = k0; k < k1; k++) {
            int64_t kp = k + FWD_PREFETCH;
            if (kp < kend) {
                while (kp >= tp_end) tp_end = off[(size_t)(++tp + 1) * (size_t)B];
                uint64_t rp = (uint64_t)idx[kp];
                if (rp < (uint64_t)e->tabs[tp].rows) prefetch_row(e->w + e->tabs[tp].woff + rp * D, rowbytes, 0);
            }
            uint64_t r = (uint64_t)idx[k];
            if (r >= rows) {
                set_err(er, ERR_INDEX, t, b, k, idx[k]);
                return;
            }
            if (pw) em_vaxpy(o, pw[k], W + r * D, D);
            else em_vadd(o, W + r * D, D);
        }
        if (e->pooling == EM_POOL_MEAN && k1 > k0) em_vscale(o, 1.0f / (float)(k1 - k0), D);
        if (++b == B) b = 0, t++;
    }
}

/* Chunks are taken dynamically: a bag's output does not depend on who pools it, and a
 * worker slowed by anything else on its core does not hold the others up. */
static void fwd_task(void *p, int ith, int nth) {
    fwd_arg *a = p;
    bag_err *er = &a->e->errs[ith];
    er->kind = ERR_NONE;
    const size_t units = (size_t)a->e->T * (size_t)a->B;
    for (;;) {
        size_t lo = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed) * a->chunk;
        if (lo >= units) break;
        fwd_bags(a, lo, lo + a->chunk < units ? lo + a->chunk : units, er);
    }
}

em_status em_embbag_forward(em_embbag *e, float *out, const int64_t *indices, const int64_t *offsets,
                            const float *per_id_w, int B, em_pool *pool) {
    if (!e || !out) return em_errorf(EM_ERR_INVALID, "embbag forward: NULL object or output");
    if (B < 0) return em_errorf(EM_ERR_INVALID, "embbag forward: batch size %d", B);
    size_t nnz;
    em_status st = check_offsets(e, offsets, B, &nnz);
    if (st) return st;
    if (nnz && !indices) return em_errorf(EM_ERR_INVALID, "embbag forward: indices is NULL");
    if (B == 0) return EM_OK;
    int nth = em_pool_nth(pool);
    if ((st = ensure_workers(e, nth))) return st;
    size_t units = (size_t)e->T * (size_t)B, chunk = units / ((size_t)nth * CHUNKS_PER_WORKER);
    fwd_arg a = {e, out, indices, offsets, per_id_w, B, chunk > 16 ? chunk : 16, 0};
    em_pool_run(pool, fwd_task, &a);
    return report_errors(e, nth);
}

/* --------------------------------------------------------------- backward */

typedef struct {
    em_embbag *e;
    const float *dout;
    const int64_t *idx, *off;
    const float *pw;
    float *dpw;
    int B;
    int use_pos; /* payload = position in the table (per-id weights), else example */
    size_t nqueue;
    atomic_size_t next; /* next table (pass 1) or queue item (pass 2) to take */
} bwd_arg;

/* Pass 1 for table t: validate its indices and pack them as (row << 32) | payload.
 * Returns 0 after recording an error. */
static int pack_table(bwd_arg *a, int t, int ith) {
    em_embbag *e = a->e;
    tbl *tb = &e->tabs[t];
    const int B = a->B;
    const size_t k0 = tb->kbeg, n = tb->n;
    if (n > UINT32_MAX) {
        set_err(&e->errs[ith], ERR_TOO_MANY, t, -1, -1, (int64_t)n);
        return 0;
    }
    const int64_t *off = a->off + (size_t)t * (size_t)B, *idx = a->idx;
    const uint64_t rows = (uint64_t)tb->rows;
    uint64_t *it = e->items + k0;
    uint32_t *ex = e->ex + k0;
    for (int b = 0; b < B; b++) {
        for (int64_t k = off[b]; k < off[b + 1]; k++) {
            uint64_t r = (uint64_t)idx[k];
            if (r >= rows) {
                set_err(&e->errs[ith], ERR_INDEX, t, b, k, idx[k]);
                return 0;
            }
            size_t p = (size_t)k - k0;
            if (a->use_pos) {
                it[p] = r << 32 | (uint64_t)p;
                ex[p] = (uint32_t)b;
            } else {
                it[p] = r << 32 | (uint64_t)(uint32_t)b;
            }
        }
    }
    return 1;
}

/* Pass 2, first step for table t: sort by row, find the runs of equal rows, copy the
 * dout slice if the table has several ids per bag. */
static void sort_table(bwd_arg *a, int t, int ith) {
    em_embbag *e = a->e;
    tbl *tb = &e->tabs[t];
    const int B = a->B;
    const size_t k0 = tb->kbeg, n = tb->n;
    const uint64_t *s = em__radix_sort(e->items + k0, e->tmp + k0, n, 32, tb->key_bits, e->hist + (size_t)ith * EM__RADIX_HIST_WORDS);
    uint32_t *segs = e->segs + k0;
    size_t u = 0;
    uint64_t prev = ~0ull;
    for (size_t p = 0; p < n; p++) { /* branch-free: most rows are new ones */
        uint64_t r = s[p] >> 32;
        segs[u] = (uint32_t)p;
        u += r != prev;
        prev = r;
    }
    tb->sorted = s;
    tb->nuniq = u;
    if (tb->dcopied) {
        /* The update reads dout[b][t] once per occurrence in row order, i.e. at random
         * b; rows T*D apart span many pages. A contiguous (B, D) copy stays in L2. */
        const size_t D = (size_t)e->D, T = (size_t)e->T;
        float *dst = e->dcopy + tb->dcoff;
        for (size_t b = 0; b < (size_t)B; b++) memcpy(dst + b * D, a->dout + (b * T + (size_t)t) * D, D * sizeof(float));
    }
    atomic_store_explicit(&tb->ready, 1, memory_order_release);
}

/* Tables are taken dynamically; each is scanned up to its first bad index, so the
 * earliest error of the batch is always found. */
static void pack_task(void *p, int ith, int nth) {
    bwd_arg *a = p;
    em_embbag *e = a->e;
    e->errs[ith].kind = ERR_NONE;
    for (;;) {
        size_t t = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (t >= (size_t)e->T) break;
        if (e->tabs[t].n) pack_table(a, (int)t, ith);
    }
}

/* Pass 2 for unique rows [j0, j1) of table t. */

/* Row-wise AdaGrad's step denominator: sqrt(m) + eps; momentum-scaled over M > 1
 * replica groups (2D sparse parallelism): sqrt(m / M + eps). */
static inline float rowwise_den(float m, float eps, int reps) {
    return reps > 1 ? sqrtf(m / (float)reps + eps) : sqrtf(m) + eps;
}

static void update_rows(bwd_arg *a, int t, size_t j0, size_t j1, float *restrict g) {
    em_embbag *e = a->e;
    const tbl *tb = &e->tabs[t];
    const int T = e->T, B = a->B;
    const size_t D = (size_t)e->D, rowbytes = D * sizeof(float), n = tb->n, U = tb->nuniq;
    const uint64_t *srt = tb->sorted;
    const uint32_t *segs = e->segs + tb->kbeg, *ex = e->ex + tb->kbeg;
    const int64_t *off = a->off + (size_t)t * (size_t)B;
    const float *pw = a->pw ? a->pw + tb->kbeg : NULL;
    float *dpw = a->dpw ? a->dpw + tb->kbeg : NULL;
    float *W = e->w + tb->woff;
    float *S = e->state ? e->state + tb->soff : NULL;
    const size_t spr = e->state_per_row;
    const int mean = e->pooling == EM_POOL_MEAN, use_pos = a->use_pos;
    const em_optim_kind kind = e->opt.kind;
    const float lr = e->opt.lr, eps = e->opt.eps, wd = e->opt.weight_decay;
    const int reps = e->opt.replicas;
    const float *dout = tb->dcopied ? e->dcopy + tb->dcoff : a->dout + (size_t)t * D;
    const size_t dstride = tb->dcopied ? D : (size_t)T * D;

    for (size_t j = j0; j < j1; j++) {
        if (j + BWD_PREFETCH < U) {
            uint64_t rp = srt[segs[j + BWD_PREFETCH]] >> 32;
            prefetch_row(W + rp * D, rowbytes, 1);
            if (spr) __builtin_prefetch(S + rp * spr, 1, 3);
            if (spr > 1) prefetch_row(S + rp * spr, rowbytes, 1);
        }
        const size_t p0 = segs[j], p1 = j + 1 < U ? segs[j + 1] : n;
        const uint64_t r = srt[p0] >> 32;
        float *wr = W + r * D;
        memset(g, 0, rowbytes);
        for (size_t q = p0; q < p1; q++) {
            uint32_t pl = (uint32_t)srt[q];
            uint32_t b = use_pos ? ex[pl] : pl;
            const float *dr = dout + (size_t)b * dstride;
            float inv_len = mean ? 1.0f / (float)(off[b + 1] - off[b]) : 1.0f;
            float s = pw ? inv_len * pw[pl] : inv_len;
            em_vaxpy(g, s, dr, D);
            if (dpw) dpw[pl] += inv_len * em_vdot(dr, wr, D); /* rows as before the update */
        }
        if (wd != 0.f) em_vaxpy(g, wd, wr, D);
        switch (kind) {
        case EM_OPT_SGD: em_vaxpy(wr, -lr, g, D); break;
        case EM_OPT_ADAGRAD: em__adagrad_row(wr, S + r * D, g, D, lr, eps); break;
        default: { /* EM_OPT_ROWWISE_ADAGRAD */
            float m = S[r] + em_vsumsq(g, D) / (float)D;
            S[r] = m;
            em_vaxpy(wr, -(lr / rowwise_den(m, eps, reps)), g, D);
            break;
        }
        }
    }
}

/* Pass 2 works down a queue: sort(0), sort(1), chunks of table 0, sort(2), chunks of
 * table 1, ... Sorting (cache-resident compute) of one table thus overlaps the updates
 * (random DRAM read-modify-writes) of the previous one on the other workers. A chunk
 * waits for its table's sort, which was taken from the queue before it and never
 * waits itself, so the wait is short and cannot deadlock. A row's update does not
 * depend on which worker applies it, and every row lies in exactly one chunk. */
static void pipe_task(void *p, int ith, int nth) {
    bwd_arg *a = p;
    em_embbag *e = a->e;
    float *g = e->gbuf + (size_t)ith * e->gstride;
    for (;;) {
        size_t i = atomic_fetch_add_explicit(&a->next, 1, memory_order_relaxed);
        if (i >= a->nqueue) break;
        const struct qitem q = e->queue[i];
        tbl *tb = &e->tabs[q.t];
        if (q.part < 0) {
            sort_table(a, q.t, ith);
            continue;
        }
        while (!atomic_load_explicit(&tb->ready, memory_order_acquire)) em__cpu_relax();
        size_t lo, hi;
        em_split(tb->nuniq, q.part, tb->nchunks, &lo, &hi);
        if (lo < hi) update_rows(a, q.t, lo, hi, g);
    }
}

em_status em_embbag_backward_update(em_embbag *e, const float *dout, const int64_t *indices, const int64_t *offsets,
                                    const float *per_id_w, float *dper_id_w, int B, em_pool *pool) {
    if (!e || !dout) return em_errorf(EM_ERR_INVALID, "embbag backward: NULL object or gradient");
    if (B < 0) return em_errorf(EM_ERR_INVALID, "embbag backward: batch size %d", B);
    if (dper_id_w && !per_id_w) return em_errorf(EM_ERR_INVALID, "embbag backward: dper_id_w needs per_id_w");
    size_t nnz;
    em_status st = check_offsets(e, offsets, B, &nnz);
    if (st) return st;
    if (nnz && !indices) return em_errorf(EM_ERR_INVALID, "embbag backward: indices is NULL");
    if (nnz == 0) return EM_OK;
    int nth = em_pool_nth(pool);
    size_t ncopy = 0;
    if ((st = ensure_workers(e, nth)) || (st = ensure_nnz(e, nnz))) return st;
    for (int t = 0; t <= e->T; t++) {
        tbl *tb = &e->tabs[t];
        tb->kbeg = (size_t)offsets[(size_t)t * (size_t)B];
        tb->n = t < e->T ? (size_t)offsets[(size_t)(t + 1) * (size_t)B] - tb->kbeg : 0;
        tb->nuniq = 0;
        tb->dcopied = t < e->T && tb->n >= (size_t)DCOPY_MIN_PER_BAG * (size_t)B;
        tb->dcoff = ncopy;
        if (tb->dcopied) ncopy += (size_t)B * (size_t)e->D;
        /* update chunks in proportion to the table's share of the indices */
        tb->nchunks = !tb->n ? 0 : nth == 1 ? 1 : 1 + (int)(tb->n * (size_t)nth * CHUNKS_PER_WORKER / nnz);
        atomic_store_explicit(&tb->ready, 0, memory_order_relaxed);
    }
    if (ncopy && (st = ensure_dcopy(e, ncopy))) return st;
    bwd_arg a = {e, dout, indices, offsets, per_id_w, dper_id_w, B, per_id_w != NULL || dper_id_w != NULL, 0, 0};
    em_pool_run(pool, pack_task, &a);
    if ((st = report_errors(e, nth))) return st;
    /* Nothing has been written to the tables so far; pass 2 cannot fail. */
    size_t nq = 0;
    int prev = -1; /* the last table with indices: its chunks follow the next one's sort */
    for (int t = 0; t < e->T; t++) {
        if (!e->tabs[t].n) continue;
        e->queue[nq++] = (struct qitem){t, -1};
        if (prev >= 0)
            for (int c = 0; c < e->tabs[prev].nchunks; c++) e->queue[nq++] = (struct qitem){prev, c};
        prev = t;
    }
    if (prev >= 0)
        for (int c = 0; c < e->tabs[prev].nchunks; c++) e->queue[nq++] = (struct qitem){prev, c};
    a.nqueue = nq;
    atomic_store(&a.next, 0);
    em_pool_run(pool, pipe_task, &a);
    return EM_OK;
}

/* ------------------------------------------------------- row-gradient update */

/* em_embbag_update_rows: pairs are packed (row << 32) | pair, sorted stably by row on
 * one worker (a sequence batch has tens of thousands of pairs: one radix sort is
 * cheap), then the unique rows are split over the workers by em_split; each row's
 * gradient is summed over its pairs in the given order and the optimizer applied once,
 * so a row's result does not depend on the thread count. */
typedef struct {
    em_embbag *e;
    int t;
    const float *grads;
    const uint64_t *sorted;
    size_t n, nuniq;
    float *sumsq_out;      /* non-NULL: write each unique row's sum of squares, update nothing */
    const float *sumsq_in; /* non-NULL (row-wise AdaGrad): each unique row's sum of squares over the full row */
    float inv_dim;         /* 1 / the full row's dimension, with sumsq_in */
} rows_arg;

static void rows_task(void *p, int ith, int nth) {
    const rows_arg *a = p;
    em_embbag *e = a->e;
    const tbl *tb = &e->tabs[a->t];
    const size_t D = (size_t)e->D, spr = e->state_per_row;
    float *W = e->w + tb->woff, *S = e->state ? e->state + tb->soff : NULL;
    float *g = e->gbuf + (size_t)ith * e->gstride;
    const float lr = e->opt.lr, eps = e->opt.eps, wd = e->opt.weight_decay;
    size_t lo, hi;
    em_split(a->nuniq, ith, nth, &lo, &hi);
    for (size_t j = lo; j < hi; j++) {
        const size_t p0 = e->segs[j], p1 = j + 1 < a->nuniq ? e->segs[j + 1] : a->n;
        const uint64_t r = a->sorted[p0] >> 32;
        float *wr = W + r * D;
        memset(g, 0, D * sizeof(float));
        for (size_t q = p0; q < p1; q++) em_vadd(g, a->grads + (size_t)(uint32_t)a->sorted[q] * D, D);
        if (wd != 0.f) em_vaxpy(g, wd, wr, D);
        if (a->sumsq_out) {
            a->sumsq_out[j] = em_vsumsq(g, D);
            continue;
        }
        switch (e->opt.kind) {
        case EM_OPT_SGD: em_vaxpy(wr, -lr, g, D); break;
        case EM_OPT_ADAGRAD: em__adagrad_row(wr, S + r * D, g, D, lr, eps); break;
        default: { /* EM_OPT_ROWWISE_ADAGRAD */
            float m = S[r * spr] + (a->sumsq_in ? a->sumsq_in[j] * a->inv_dim : em_vsumsq(g, D) / (float)D);
            S[r * spr] = m;
            em_vaxpy(wr, -(lr / rowwise_den(m, eps, e->opt.replicas)), g, D);
            break;
        }
        }
    }
}

static em_status rows_run(em_embbag *e, int t, const int64_t *rows, const float *grads, size_t n, float *sumsq_out,
                          const float *sumsq_in, int full_dim, size_t *nuniq, em_pool *pool) {
    if (nuniq) *nuniq = 0;
    if (!e) return em_errorf(EM_ERR_INVALID, "embbag update_rows: NULL object");
    if (t < 0 || t >= e->T) return em_errorf(EM_ERR_INVALID, "embbag update_rows: table %d of %d", t, e->T);
    if (n == 0) return EM_OK;
    if (!rows || !grads) return em_errorf(EM_ERR_INVALID, "embbag update_rows: NULL rows or gradients");
    if (n >= UINT32_MAX) return em_errorf(EM_ERR_INVALID, "embbag update_rows: %zu pairs (at most 2^32 - 2)", n);
    if (sumsq_in && full_dim < e->D)
        return em_errorf(EM_ERR_INVALID, "embbag update_rows: full row dimension %d below the table's %d", full_dim, e->D);
    const tbl *tb = &e->tabs[t];
    for (size_t j = 0; j < n; j++)
        if ((uint64_t)rows[j] >= (uint64_t)tb->rows)
            return em_errorf(EM_ERR_INVALID, "embbag update_rows: table %d, pair %zu: row %lld out of range [0, %lld)", t,
                             j, (long long)rows[j], (long long)tb->rows);
    int nth = em_pool_nth(pool);
    em_status st;
    if ((st = ensure_workers(e, nth)) || (st = ensure_nnz(e, n))) return st;
    for (size_t j = 0; j < n; j++) e->items[j] = (uint64_t)rows[j] << 32 | (uint64_t)j;
    const uint64_t *s = em__radix_sort(e->items, e->tmp, n, 32, tb->key_bits, e->hist);
    size_t u = 0;
    uint64_t prev = ~0ull;
    for (size_t p = 0; p < n; p++) {
        uint64_t r = s[p] >> 32;
        e->segs[u] = (uint32_t)p;
        u += r != prev;
        prev = r;
    }
    if (nuniq) *nuniq = u;
    rows_arg a = {e, t, grads, s, n, u, sumsq_out, sumsq_in, sumsq_in ? 1.0f / (float)full_dim : 0.f};
    em_pool_run(u >= 64 ? pool : NULL, rows_task, &a);
    return EM_OK;
}

em_status em_embbag_update_rows(em_embbag *e, int t, const int64_t *rows, const float *grads, size_t n,
                                em_pool *pool) {
    return rows_run(e, t, rows, grads, n, NULL, NULL, 0, NULL, pool);
}

em_status em_embbag_rows_sumsq(em_embbag *e, int t, const int64_t *rows, const float *grads, size_t n, float *sumsq,
                               size_t *nuniq, em_pool *pool) {
    if (n && !sumsq) return em_errorf(EM_ERR_INVALID, "embbag rows_sumsq: NULL output");
    return rows_run(e, t, rows, grads, n, sumsq, NULL, 0, nuniq, pool);
}

em_status em_embbag_update_rows_sumsq(em_embbag *e, int t, const int64_t *rows, const float *grads, size_t n,
                                      const float *sumsq, int full_dim, em_pool *pool) {
    if (n && !sumsq) return em_errorf(EM_ERR_INVALID, "embbag update_rows_sumsq: NULL sums of squares");
    return rows_run(e, t, rows, grads, n, NULL, sumsq, full_dim, NULL, pool);
}
