/*
 * plan.c - the sharding planner: sharding rules, shard costs, placement (greedy LPT
 * and Karmarkar-Karp largest differencing), per-rank and per-step predictions.
 *
 * Design choices (formulas: docs/PLANNER.md):
 * - One replica group of G ranks is planned; 2D replicates the same placement in all
 *   M = N/G groups, so every group is identical and 1D is the case G = N.
 * - Row-wise shards are pinned (piece p on rank p): their cost is the same on every
 *   rank, so they shift every load equally and cannot be balanced further. Only
 *   table-wise tables and column-wise pieces are partitioned.
 * - Ids are hashed to row shards, so a row shard serves a rows-proportional share of
 *   the ids even for skewed tables; skew enters through the number of distinct rows
 *   touched (row updates per step, rows to sync every k steps), estimated for a Zipf
 *   popularity law by em_plan_unique_rows().
 * - Row-wise all-to-all sends a partial sum only for bags that have an id in the
 *   shard, as (bag index, vector) pairs, when that is smaller than the dense
 *   reduce-scatter of every bag: with G much larger than the pooling factor, a row
 *   shard's traffic approaches the unpooled rows.
 * - Collectives: all-to-all by pairwise exchange ((G-1) messages, bytes split between
 *   intra-node and inter-node links by destination count); all-reduce by
 *   reduce-scatter + all-gather (2(p-1)/p of the bytes, 2 ceil(log2 p) latencies).
 *   Nothing is assumed to overlap: the step time is a sum, an upper bound.
 * - KK does not see memory; a KK partition that breaks a rank's capacity is replaced
 *   by greedy's (fallback bit 1), so both algorithms always respect it. Greedy orders
 *   by cost; if that strands an item (memory and cost disagree), it reruns ordered by
 *   memory (fallback bit 2) before reporting the table that fits nowhere.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ember/plan.h"

const char *em_shard_name(em_shard_type t) {
    switch (t) {
    case EM_SHARD_AUTO: return "auto";
    case EM_SHARD_TABLE: return "table";
    case EM_SHARD_ROW: return "row";
    case EM_SHARD_COLUMN: return "column";
    case EM_SHARD_DATA: return "data";
    }
    return "?";
}

em_hw_model em_hw_default(void) {
    return (em_hw_model){
        .mem_bw = 80e9,      /* random 512-byte row gathers on a server CPU socket */
        .intra_bw = 50e9,    /* shared memory / socket interconnect */
        .inter_bw = 25e9,    /* 200 Gb/s NIC per rank */
        .intra_lat = 1e-6,
        .inter_lat = 5e-6,
        .ranks_per_node = 8,
        .flops = 2e12,       /* sustained fp32 GEMM rate of one socket */
        .mem_capacity = 256.0 * (1 << 30),
    };
}

em_plan_cfg em_plan_cfg_default(int world, int group) {
    return (em_plan_cfg){
        .world = world,
        .group = group,
        .batch = 512,
        .comm_bytes = 4,
        .sync_every = 20,
        .dense_params = 0,
        .dense_flops = 0,
        .dense_state_bytes = 12, /* fp32 weights, gradients, AdaGrad state */
        .algo = EM_PLAN_GREEDY,
        .hw = em_hw_default(),
        .dp_max_bytes = 1 << 20,
        .cw_min_dim = 512,
        .cw_width = 128,
        .rw_share = 1.0,
    };
}

/* ------------------------------------------------------------ Zipf unique rows */

/* integral of x^-a over [u, v] */
static double pow_int(double u, double v, double a) {
    if (fabs(a - 1.0) < 1e-9) return log(v / u);
    return (pow(v, 1.0 - a) - pow(u, 1.0 - a)) / (1.0 - a);
}

/* 1 - (1-p)^n, the chance that a row of probability p is drawn at least once */
static double hit(double p, double n) {
    if (p >= 1.0) return 1.0;
    return -expm1(n * log1p(-p));
}

/*
 * The first EXACT rows are summed one by one; beyond, rows are grouped in geometric
 * buckets (ratio 2^(1/16)) whose probability mass is the integral of x^-a over the
 * bucket (+-1/2 row), shared evenly by its rows. The normaliser uses the same
 * masses, so the probabilities sum to 1 and U(n) -> rows as n -> infinity.
 */
#define EXACT 1024
double em_plan_unique_rows(int64_t rows, double zipf, double draws) {
    if (rows <= 0 || !(draws > 0)) return 0;
    double a = zipf < 0 ? 0 : zipf;
    int64_t ex = rows < EXACT ? rows : EXACT;
    double H = 0;
    for (int64_t i = 1; i <= ex; i++) H += pow((double)i, -a);
    double tail = rows > ex ? pow_int((double)ex + 0.5, (double)rows + 0.5, a) : 0;
    H += tail;
    double U = 0;
    for (int64_t i = 1; i <= ex; i++) U += hit(pow((double)i, -a) / H, draws);
    const double ratio = 1.0442737824274138; /* 2^(1/16) */
    for (int64_t lo = ex + 1; lo <= rows;) {
        int64_t hi = (int64_t)((double)lo * ratio);
        if (hi < lo) hi = lo;
        if (hi > rows) hi = rows;
        double cnt = (double)(hi - lo + 1);
        double mass = pow_int((double)lo - 0.5, (double)hi + 0.5, a) / H;
        U += cnt * hit(mass / cnt, draws);
        lo = hi + 1;
    }
    return U < (double)rows ? U : (double)rows;
}

/* ----------------------------------------------------------------- partition */

typedef struct {
    double cost;
    int i;
} cost_idx;

static int by_cost_desc(const void *x, const void *y) {
    const cost_idx *a = x, *b = y;
    if (a->cost != b->cost) return a->cost > b->cost ? -1 : 1;
    return a->i < b->i ? -1 : a->i > b->i;
}

/* Items in decreasing order of key[] (ties: lower index), each to the bin of least
 * cost load that has room for it (ties: lower bin). */
static em_status greedy_by(const double *key, const double *cost, const double *mem, int n, int nbins,
                           const double *mem_free, int *bin) {
    cost_idx *ord = em_malloc((size_t)(n ? n : 1) * sizeof(cost_idx));
    double *load = em_calloc((size_t)nbins, sizeof(double)), *used = em_calloc((size_t)nbins, sizeof(double));
    if (!ord || !load || !used) {
        em_free(ord), em_free(load), em_free(used);
        return em_errorf(EM_ERR_NOMEM, "planner: out of memory");
    }
    for (int i = 0; i < n; i++) ord[i] = (cost_idx){key[i], i};
    qsort(ord, (size_t)n, sizeof(cost_idx), by_cost_desc);
    em_status st = EM_OK;
    for (int k = 0; k < n && st == EM_OK; k++) {
        int i = ord[k].i, best = -1;
        for (int b = 0; b < nbins; b++)
            if (used[b] + mem[i] <= mem_free[b] && (best < 0 || load[b] < load[best])) best = b;
        if (best < 0) {
            double room = 0;
            for (int b = 0; b < nbins; b++) room = fmax(room, mem_free[b] - used[b]);
            st = em_errorf(EM_ERR_INVALID, "item %d (%.4g bytes) fits on none of the %d ranks (most free: %.4g bytes)", i,
                           mem[i], nbins, room);
            break;
        }
        bin[i] = best, load[best] += cost[i], used[best] += mem[i];
    }
    em_free(ord), em_free(load), em_free(used);
    return st;
}

/* Largest cost first; when that finds no room for some item (costs and memory can
 * disagree: many cheap but big items), largest memory first (fell_back |= 2). */
static em_status greedy(const double *cost, const double *mem, int n, int nbins, const double *mem_free, int *bin,
                        int *fell_back) {
    em_status st = greedy_by(cost, cost, mem, n, nbins, mem_free, bin);
    if (st != EM_ERR_INVALID) return st;
    st = greedy_by(mem, cost, mem, n, nbins, mem_free, bin);
    if (st == EM_OK) *fell_back |= 2;
    return st;
}

/* A KK tuple: nbins subset sums with their item lists (linked through next[]). */
typedef struct {
    double *sum;
    int *head, *tail;
    int item; /* >= 0: a singleton not yet materialised */
} kk_tuple;

typedef struct {
    double sum;
    int head, tail;
} kk_slot;

static int slot_desc(const void *x, const void *y) {
    const kk_slot *a = x, *b = y;
    if (a->sum != b->sum) return a->sum > b->sum ? -1 : 1;
    /* equal sums: order by first item (empty last) so the result is fully determined */
    unsigned ha = (unsigned)a->head, hb = (unsigned)b->head;
    return ha < hb ? -1 : ha > hb;
}

static double kk_diff(const kk_tuple *t, const double *cost, int nbins) {
    return t->item >= 0 ? cost[t->item] : t->sum[0] - t->sum[nbins - 1];
}

static em_status kk(const double *cost, int n, int nbins, int *bin) {
    kk_tuple *tu = em_calloc((size_t)n, sizeof(kk_tuple));
    int *next = em_malloc((size_t)n * sizeof(int));
    kk_slot *tmp = em_malloc((size_t)nbins * sizeof(kk_slot));
    em_status st = EM_OK;
    if (!tu || !next || !tmp) {
        st = em_errorf(EM_ERR_NOMEM, "planner: out of memory");
        goto done;
    }
    for (int i = 0; i < n; i++) tu[i].item = i, next[i] = -1;
    for (int live = n; live > 1; live--) {
        /* the two tuples of largest difference (ties: lower index) */
        int a = -1, b = -1;
        for (int i = 0; i < n; i++) {
            if (!tu[i].sum && tu[i].item < 0) continue; /* consumed */
            double d = kk_diff(&tu[i], cost, nbins);
            if (a < 0 || d > kk_diff(&tu[a], cost, nbins)) b = a, a = i;
            else if (b < 0 || d > kk_diff(&tu[b], cost, nbins)) b = i;
        }
        /* A's slots descending + B's ascending: the largest sums meet the smallest */
        for (int s = 0; s < nbins; s++) {
            kk_slot x = {0, -1, -1}, y = {0, -1, -1};
            if (tu[a].item >= 0) {
                if (s == 0) x = (kk_slot){cost[tu[a].item], tu[a].item, tu[a].item};
            } else {
                x = (kk_slot){tu[a].sum[s], tu[a].head[s], tu[a].tail[s]};
            }
            int sb = nbins - 1 - s;
            if (tu[b].item >= 0) {
                if (sb == 0) y = (kk_slot){cost[tu[b].item], tu[b].item, tu[b].item};
            } else {
                y = (kk_slot){tu[b].sum[sb], tu[b].head[sb], tu[b].tail[sb]};
            }
            kk_slot z = {x.sum + y.sum, x.head, x.tail};
            if (z.head < 0) z.head = y.head, z.tail = y.tail;
            else if (y.head >= 0) next[x.tail] = y.head, z.tail = y.tail;
            tmp[s] = z;
        }
        qsort(tmp, (size_t)nbins, sizeof(kk_slot), slot_desc);
        if (tu[a].item >= 0) {
            tu[a].sum = em_malloc((size_t)nbins * sizeof(double));
            tu[a].head = em_malloc((size_t)nbins * sizeof(int));
            tu[a].tail = em_malloc((size_t)nbins * sizeof(int));
            tu[a].item = -1;
            if (!tu[a].sum || !tu[a].head || !tu[a].tail) {
                st = em_errorf(EM_ERR_NOMEM, "planner: out of memory");
                goto done;
            }
        }
        for (int s = 0; s < nbins; s++) tu[a].sum[s] = tmp[s].sum, tu[a].head[s] = tmp[s].head, tu[a].tail[s] = tmp[s].tail;
        em_free(tu[b].sum), em_free(tu[b].head), em_free(tu[b].tail);
        tu[b] = (kk_tuple){NULL, NULL, NULL, -1};
    }
    for (int i = 0; i < n; i++) {
        if (tu[i].item >= 0) { bin[tu[i].item] = 0; continue; } /* n == 1 */
        if (!tu[i].sum) continue;
        for (int s = 0; s < nbins; s++)
            for (int it = tu[i].head[s]; it >= 0; it = next[it]) bin[it] = s;
    }
done:
    if (tu)
        for (int i = 0; i < n; i++) em_free(tu[i].sum), em_free(tu[i].head), em_free(tu[i].tail);
    em_free(tu), em_free(next), em_free(tmp);
    return st;
}

em_status em_plan_partition(em_plan_algo algo, const double *cost, const double *mem, int n, int nbins,
                            const double *mem_free, int *bin, int *fell_back) {
    int fb_ = 0;
    if (!fell_back) fell_back = &fb_;
    *fell_back = 0;
    if (n < 0 || nbins < 1) return em_errorf(EM_ERR_INVALID, "partition: %d items into %d bins", n, nbins);
    if (n == 0) return EM_OK;
    if (algo != EM_PLAN_KK) return greedy(cost, mem, n, nbins, mem_free, bin, fell_back);
    em_status st = kk(cost, n, nbins, bin);
    if (st) return st;
    double *used = em_calloc((size_t)nbins, sizeof(double));
    if (!used) return em_errorf(EM_ERR_NOMEM, "planner: out of memory");
    int ok = 1;
    for (int i = 0; i < n; i++) used[bin[i]] += mem[i];
    for (int b = 0; b < nbins; b++) ok &= used[b] <= mem_free[b];
    em_free(used);
    if (ok) return EM_OK;
    *fell_back = 1;
    return greedy(cost, mem, n, nbins, mem_free, bin, fell_back);
}

/* ------------------------------------------------------------------- plan */

/* Time of an all-reduce of `bytes` over p ranks (reduce-scatter + all-gather). */
static double allreduce_s(double bytes, int p, const em_hw_model *hw, int inter) {
    if (p <= 1 || bytes <= 0) return 0;
    double bw = inter ? hw->inter_bw : hw->intra_bw, lat = inter ? hw->inter_lat : hw->intra_lat;
    return 2.0 * (p - 1) / p * bytes / bw + 2.0 * ceil(log2((double)p)) * lat;
}

static em_status check_inputs(const em_table_spec *t, int n, const em_plan_cfg *c) {
    const em_hw_model *h = &c->hw;
    if (c->world < 1 || c->group < 1 || c->world % c->group)
        return em_errorf(EM_ERR_INVALID, "group size %d must divide world size %d", c->group, c->world);
    if (c->batch < 1 || c->comm_bytes < 1 || c->sync_every < 1 || c->cw_width < 1 || !(c->rw_share > 0) ||
        c->dense_params < 0 || c->dense_flops < 0 || c->dense_state_bytes < 0)
        return em_errorf(EM_ERR_INVALID, "batch, comm bytes, sync period, cw width, rw share must be positive");
    if (!(h->mem_bw > 0 && h->intra_bw > 0 && h->inter_bw > 0 && h->intra_lat >= 0 && h->inter_lat >= 0 &&
          h->ranks_per_node >= 1 && h->flops > 0 && h->mem_capacity > 0))
        return em_errorf(EM_ERR_INVALID, "the hardware model needs positive bandwidths, rate and capacity");
    if (n < 1) return em_errorf(EM_ERR_INVALID, "no tables");
    for (int i = 0; i < n; i++)
        if (t[i].rows < 1 || t[i].dim < 1 || !(t[i].pooling >= 0) || !(t[i].zipf >= 0) || t[i].elem_bytes < 1 ||
            t[i].opt_bytes < 0 || t[i].shard < EM_SHARD_AUTO || t[i].shard > EM_SHARD_DATA)
            return em_errorf(EM_ERR_INVALID, "table '%s': rows, dim, bytes must be >= 1, pooling/zipf >= 0",
                             t[i].name);
    return EM_OK;
}

void em_plan_free(em_plan *p) {
    if (!p) return;
    em_free(p->shards), em_free(p->type), em_free(p->ranks);
    em_free(p);
}

em_status em_plan_create(em_plan **out, const em_table_spec *tabs, int nt, const em_plan_cfg *cfg) {
    *out = NULL;
    em_status st = check_inputs(tabs, nt, cfg);
    if (st) return st;
    const em_hw_model *hw = &cfg->hw;
    const int G = cfg->group, N = cfg->world, M = N / G, k = cfg->sync_every;
    const double b = cfg->batch, Bg = (double)G * b, c = cfg->comm_bytes;
    /* all-to-all inside the group: share of destinations on this node vs elsewhere */
    const int rpn = G < hw->ranks_per_node ? G : hw->ranks_per_node;
    double a2a_byte = 0, a2a_lat = 0;
    if (G > 1) {
        a2a_byte = (double)(rpn - 1) / (G - 1) / hw->intra_bw + (double)(G - rpn) / (G - 1) / hw->inter_bw;
        a2a_lat = (rpn - 1) * hw->intra_lat + (G - rpn) * hw->inter_lat;
    }
    const double out_share = G > 1 ? (double)(G - 1) / G : 0; /* pooled vectors that leave the rank */

    em_plan *p = em_calloc(1, sizeof *p);
    if (!p) return em_errorf(EM_ERR_NOMEM, "planner: out of memory");
    p->ntables = nt, p->world = N, p->group = G, p->replicas = M;
    p->type = em_calloc((size_t)nt, sizeof(em_shard_type));
    p->ranks = em_calloc((size_t)G, sizeof(em_rank_load));
    int *units = NULL, *ubin = NULL;
    double *ucost = NULL, *umem = NULL, *mfree = NULL;
    if (!p->type || !p->ranks) goto nomem;

    /* 1. sharding type per table: forced, else the rules */
    double tot_mem = 0, tot_cost = 0;
    for (int t = 0; t < nt; t++) {
        const em_table_spec *s = &tabs[t];
        double bytes = (double)s->rows * (s->dim * (double)s->elem_bytes + s->opt_bytes);
        p->type[t] = s->shard;
        if (s->shard == EM_SHARD_AUTO && bytes <= cfg->dp_max_bytes) p->type[t] = EM_SHARD_DATA;
        if (p->type[t] != EM_SHARD_DATA) {
            tot_mem += bytes;
            tot_cost += Bg * s->pooling * s->dim * s->elem_bytes / hw->mem_bw + 2 * Bg * s->dim * c * out_share * a2a_byte;
        }
    }
    for (int t = 0; t < nt; t++) {
        const em_table_spec *s = &tabs[t];
        if (p->type[t] != EM_SHARD_AUTO) continue;
        double bytes = (double)s->rows * (s->dim * (double)s->elem_bytes + s->opt_bytes);
        double cost = Bg * s->pooling * s->dim * s->elem_bytes / hw->mem_bw + 2 * Bg * s->dim * c * out_share * a2a_byte;
        if (s->dim >= cfg->cw_min_dim && s->dim > cfg->cw_width) p->type[t] = EM_SHARD_COLUMN;
        else if (G > 1 && (bytes > cfg->rw_share * tot_mem / G || cost > cfg->rw_share * tot_cost / G ||
                           bytes > hw->mem_capacity))
            p->type[t] = EM_SHARD_ROW;
        else p->type[t] = EM_SHARD_TABLE;
    }

    /* 2. shards */
    int ns = 0;
    for (int t = 0; t < nt; t++)
        ns += p->type[t] == EM_SHARD_ROW ? G : p->type[t] == EM_SHARD_COLUMN ? (tabs[t].dim + cfg->cw_width - 1) / cfg->cw_width : 1;
    p->nshards = ns;
    p->shards = em_calloc((size_t)ns, sizeof(em_shard));
    units = em_malloc((size_t)ns * sizeof(int)), ubin = em_malloc((size_t)ns * sizeof(int));
    ucost = em_malloc((size_t)ns * sizeof(double)), umem = em_malloc((size_t)ns * sizeof(double));
    mfree = em_malloc((size_t)G * sizeof(double));
    if (!p->shards || !units || !ubin || !ucost || !umem || !mfree) goto nomem;

    double base_mem = cfg->dense_params * cfg->dense_state_bytes, base_lookup = 0, dp_grad = 0;
    int si = 0, nu = 0;
    for (int t = 0; t < nt; t++) {
        const em_table_spec *s = &tabs[t];
        const double E = s->elem_bytes, o = s->opt_bytes, P = s->pooling;
        const double u_step = em_plan_unique_rows(s->rows, s->zipf, Bg * P);
        const double u_sync = M > 1 ? em_plan_unique_rows(s->rows, s->zipf, (double)M * Bg * P * k) : 0;
        int np = p->type[t] == EM_SHARD_ROW ? G : p->type[t] == EM_SHARD_COLUMN ? (s->dim + cfg->cw_width - 1) / cfg->cw_width : 1;
        for (int q = 0; q < np; q++) {
            em_shard *h = &p->shards[si++];
            h->table = t, h->type = p->type[t], h->part = q, h->nparts = np, h->rank = 0;
            h->rows = s->rows, h->col0 = 0, h->cols = s->dim, h->frac = 1;
            if (h->type == EM_SHARD_DATA) {
                /* each rank gathers for its own batch and applies the all-reduced dense gradient */
                h->rank = -1;
                h->lookup_bytes = b * P * s->dim * E + (double)s->rows * 2 * (s->dim * E + o);
                h->mem_bytes = (double)s->rows * (s->dim * E + o);
                h->cost = h->lookup_bytes / hw->mem_bw;
                base_mem += h->mem_bytes, base_lookup += h->lookup_bytes;
                dp_grad += (double)s->rows * s->dim * 4;
                continue;
            }
            if (h->type == EM_SHARD_ROW) {
                h->rank = q;
                h->rows = s->rows / G + (q < s->rows % G);
                h->frac = (double)h->rows / (double)s->rows;
            } else if (h->type == EM_SHARD_COLUMN) {
                h->col0 = q * cfg->cw_width;
                h->cols = s->dim - h->col0 < cfg->cw_width ? s->dim - h->col0 : cfg->cw_width;
            }
            const double d = h->cols;
            h->lookup_bytes = Bg * P * h->frac * d * E + u_step * h->frac * 2 * (d * E + o);
            if (h->type == EM_SHARD_ROW) {
                double bags = 1 - pow(1 - h->frac, P); /* share of bags with an id in this shard */
                double dense = Bg * s->dim * c, sparse = Bg * bags * (s->dim * c + 4);
                h->send_bytes = (dense < sparse ? dense : sparse) * out_share;
            } else {
                h->send_bytes = Bg * d * c * out_share;
            }
            h->mem_bytes = (double)h->rows * (d * E + o);
            double touched = u_sync * h->frac;
            if (touched > (double)h->rows) touched = (double)h->rows;
            h->sync_bytes = M > 1 ? touched * (d * E + o + 8) : 0;
            h->cost = h->lookup_bytes / hw->mem_bw + 2 * h->send_bytes * a2a_byte;
            if (h->type != EM_SHARD_ROW) units[nu] = si - 1, ucost[nu] = h->cost, umem[nu] = h->mem_bytes, nu++;
        }
    }
    if (base_mem > hw->mem_capacity) {
        st = em_errorf(EM_ERR_INVALID, "replicated tables and the dense part need %.4g bytes per rank, over the capacity %.4g",
                       base_mem, hw->mem_capacity);
        goto fail;
    }

    /* 3. pinned row shards, then placement of the movable units */
    for (int r = 0; r < G; r++) p->ranks[r].mem_bytes = base_mem, p->ranks[r].lookup_bytes = base_lookup;
    for (int i = 0; i < ns; i++) {
        em_shard *h = &p->shards[i];
        if (h->type != EM_SHARD_ROW) continue;
        em_rank_load *rl = &p->ranks[h->rank];
        rl->mem_bytes += h->mem_bytes;
        if (rl->mem_bytes > hw->mem_capacity) {
            st = em_errorf(EM_ERR_INVALID, "table '%s': its row-wise shard (%.4g bytes) does not fit on rank %d (%.4g of %.4g bytes used)",
                           tabs[h->table].name, h->mem_bytes, h->rank, rl->mem_bytes - h->mem_bytes, hw->mem_capacity);
            goto fail;
        }
    }
    for (int r = 0; r < G; r++) mfree[r] = hw->mem_capacity - p->ranks[r].mem_bytes;
    st = em_plan_partition(cfg->algo, ucost, umem, nu, G, mfree, ubin, &p->fallback);
    if (st == EM_ERR_INVALID) {
        int item = -1;
        sscanf(em_last_error(), "item %d", &item);
        const em_shard *h = item >= 0 && item < nu ? &p->shards[units[item]] : NULL;
        if (h)
            st = em_errorf(EM_ERR_INVALID, "table '%s' (%s shard %d of %d, %.4g bytes) fits on none of the %d ranks of a group (capacity %.4g bytes)",
                           tabs[h->table].name, em_shard_name(h->type), h->part + 1, h->nparts, h->mem_bytes, G, hw->mem_capacity);
    }
    if (st) goto fail;
    for (int i = 0; i < nu; i++) p->shards[units[i]].rank = ubin[i];

    /* 4. per-rank loads */
    double send_tot = 0;
    for (int i = 0; i < ns; i++) {
        em_shard *h = &p->shards[i];
        if (h->type == EM_SHARD_DATA) continue;
        em_rank_load *rl = &p->ranks[h->rank];
        if (h->type != EM_SHARD_ROW) rl->mem_bytes += h->mem_bytes;
        rl->lookup_bytes += h->lookup_bytes, rl->send_bytes += h->send_bytes, rl->sync_bytes += h->sync_bytes;
        rl->load += h->cost;
        send_tot += h->send_bytes;
    }
    double tmax = 0, tsum = 0, sync_max = 0;
    p->mem_max = 0, p->mem_mean = 0;
    for (int r = 0; r < G; r++) {
        em_rank_load *rl = &p->ranks[r];
        rl->recv_bytes = G > 1 ? (send_tot - rl->send_bytes) / (G - 1) : 0;
        rl->lookup_s = rl->lookup_bytes / hw->mem_bw;
        double x = rl->send_bytes > rl->recv_bytes ? rl->send_bytes : rl->recv_bytes;
        rl->comm_s = G > 1 && send_tot > 0 ? 2 * (x * a2a_byte + a2a_lat) : 0;
        double tr = rl->lookup_s + rl->comm_s;
        tmax = tr > tmax ? tr : tmax, tsum += tr;
        p->mem_max = rl->mem_bytes > p->mem_max ? rl->mem_bytes : p->mem_max, p->mem_mean += rl->mem_bytes / G;
        sync_max = rl->sync_bytes > sync_max ? rl->sync_bytes : sync_max;
    }

    /* 5. the step */
    p->imbalance = tsum > 0 ? tmax / (tsum / G) : 1;
    p->t_emb = tmax;
    p->t_dense = 3 * cfg->dense_flops * b / hw->flops;
    p->allreduce_bytes = cfg->dense_params * 4 + dp_grad;
    p->t_allreduce = allreduce_s(p->allreduce_bytes, N, hw, N > hw->ranks_per_node);
    p->t_sync = allreduce_s(sync_max, M, hw, N > hw->ranks_per_node) / k;
    p->t_step = p->t_emb + p->t_dense + p->t_allreduce + p->t_sync;
    em_free(units), em_free(ubin), em_free(ucost), em_free(umem), em_free(mfree);
    *out = p;
    return EM_OK;
nomem:
    st = em_errorf(EM_ERR_NOMEM, "planner: out of memory");
fail:
    em_free(units), em_free(ubin), em_free(ucost), em_free(umem), em_free(mfree);
    em_plan_free(p);
    return st;
}
