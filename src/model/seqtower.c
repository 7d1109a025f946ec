/*
 * seqtower.c - the DLRM's sequence tower (API and math in ember/seqtower.h): history
 * events embedded (item + log2 age bucket + event type), a stack of attention blocks
 * over the jagged history (Jagged Flash Attention, Kunlun's GDPA, sliding-window
 * attention, hierarchical seed pooling), then target attention with the candidate's
 * embedding as the query. dlrm.c composes it: the tower's output vectors join the dot
 * interaction, the query's gradient flows back into the candidate's pooled embedding,
 * and the history items' gradients go to the sparse optimizer. With event-level
 * personalization (Kunlun) each group of event types gets its own stack (sub-tower)
 * over its own jagged sub-sequences; configuration, specs and FLOPs are in seqcfg.c.
 *
 * Design choices:
 *   - Everything stays jagged: (N, D) event rows with the batch's offsets, never padded;
 *     the projections are one GEMM over all N rows (em_linear_*), the attention kernels
 *     work per (sample, head).
 *   - No output projection, layer norm or FFN: each block adds its attention output to
 *     the residual stream; with V's projection in front that keeps the tower a few
 *     D x D matrices per block, and the tower small beside the MLPs. The dot interaction
 *     then compares the tower's vectors with every other feature vector.
 *   - Age enters through log2 buckets (recency matters on a log scale: seconds, hours,
 *     days), the event type through a small table whose last row collects the types it
 *     does not name. Both tables are dense parameters (a few rows), updated by the dense
 *     optimizer with everything else in the flat block.
 *   - The summary S of the hsp blocks is a residual stream (see the header): what
 *     Kunlun's CompSkip reuses on its odd layers is the summary computed on the even
 *     ones, which here means an odd layer leaves S as it is and pays nothing for it.
 *   - A stack (stk) is the block stack + target attention at its width W with its heads:
 *     the whole tower (W = D, reading the embedded events in place), or one event group
 *     (its events gathered in batch order into its own jagged layout, projected to W,
 *     and its output vectors projected back to D). The split is per batch, in one pass
 *     over the events, so each group's sub-sequences keep the events' order and an
 *     example with none of a group's events is an empty sample of that group.
 *   - Memory: activations are carved from arenas (the tower's per event and per example,
 *     and each stack's), grown by half again when a batch needs more, so a steady-state
 *     step allocates nothing. Per mixing block a stack keeps Q, K, V, O and the block's
 *     output (N, W) and, for the softmax blocks, lse (N, H); per hsp block K, V (N, W)
 *     and Z, lse, Y.
 *   - Determinism: every kernel used is bitwise independent of the thread count; the
 *     embedding sums are per event, and the age/type gradient scatter splits the D
 *     columns over the workers, each summing its columns in event order.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "core/simd.h"
#include "ember/hsp.h"
#include "ember/jagged.h"
#include "ember/jattn.h"
#include "ember/nn.h"
#include "model/seq_impl.h"

typedef struct {
    em_seq_block k;
    size_t wq, wk, wv, seeds, ka, kw; /* parameter offsets in the tower's slice */
    /* activations (carved from the stack's arenas) */
    float *Q, *K, *V, *O, *Xout, *lse; /* (N, W) ... lse (N, H) */
    float *Z, *zlse, *Y;               /* hsp: (B, m, W), (B, m, H), (B, m2, W) */
} blk;

/* One block stack with its target attention (see the header comment). */
typedef struct {
    em__seq_stack s;
    int dh;
    size_t win, wout, tq, tk, tv; /* parameter offsets (win, wout: projected groups) */
    blk b[EM_SEQ_MAX_BLOCKS];
    size_t capN;
    int capB;
    float *arN, *arB;
    /* per event of the stack (N of the last forward) */
    int32_t *ev;       /* groups: each event's index in the batch */
    float *Xg, *dXg;   /* projected groups: (N, D) the gathered embeddings, their gradient */
    float *X0, *dX;    /* (N, W) the input (without groups: the tower's) and its gradient */
    float *Kt, *Vt, *dQ, *dK, *dV; /* (N, W) */
    /* per example */
    int64_t *off;                          /* groups: (B + 1) the stack's jagged offsets */
    float *q, *t, *dt, *dq, *tlse, *S, *dS; /* (B, W) x 4, (B, H), (B, m2, W) x 2 */
    float *Og, *dOg, *OD;                   /* projected: (B, E, W) x 2, (B, E, D) */
    /* the last forward */
    size_t N;
    const int64_t *offsets;
    float *Xfin; /* the events after the last block */
} stk;

struct em_seqtower {
    em_seq_cfg c;
    int D, E, ns, groups;
    float *P, *G;
    size_t np;
    size_t age, type;
    stk st[EM_SEQ_MAX_GROUPS];
    int8_t grp[EM_SEQ_MAX_TYPE + 1]; /* groups: the group of each type row, -1 none */
    em_seq_param *params;
    int nparams;
    /* capacity and arenas of the tower */
    size_t capN;
    int capB;
    float *arN, *arB;
    int32_t *bkt, *tyi; /* (N) age bucket and type row of each event */
    float *X0, *dX;     /* (N, D) the embedded events and their gradient */
    float *cq, *dcq;    /* (B, D) the query and its gradient (one stack at a time) */
    /* the last forward */
    const em_batch_seq *s;
    const float *item_w;
    int B;
    size_t N;
    em_seq_stats stats;
};

/* ------------------------------------------------------------------ layout */

/* Parameter layout: returns the floats; fills the offsets and the named list when t is
 * non-NULL (t->params holding *count entries), else counts the tensors into *count. */
static size_t layout(const em_seq_cfg *c, int D, em_seqtower *t, int *count) {
    size_t off = 0;
    int np = 0;
#define PARAM(var, nm, nd, s0, s1, s2, cnt)                                                                            \
    do {                                                                                                               \
        if (t) {                                                                                                       \
            em_seq_param *p_ = &t->params[np];                                                                         \
            snprintf(p_->name, sizeof p_->name, "%s", nm);                                                             \
            p_->off = off, p_->ndim = nd, p_->shape[0] = s0, p_->shape[1] = s1, p_->shape[2] = s2;                     \
            var = off;                                                                                                 \
        }                                                                                                              \
        np++;                                                                                                          \
        off += (cnt);                                                                                                  \
    } while (0)
    char nm[32], pre[16] = "seq.";
    PARAM(t->age, "seq.age.weight", 2, c->age_buckets, D, 0, (size_t)c->age_buckets * (size_t)D);
    PARAM(t->type, "seq.type.weight", 2, c->num_types, D, 0, (size_t)c->num_types * (size_t)D);
    const size_t m = (size_t)c->hsp_m, m2 = (size_t)c->hsp_m2, k = (size_t)c->hsp_k;
    for (int g = 0; g < em__seq_n_stacks(c); g++) {
        const em__seq_stack s = em__seq_stack_of(c, D, g);
        const int W = s.W;
        const size_t WW = (size_t)W * (size_t)W, WD = (size_t)W * (size_t)D;
        stk *K = t ? &t->st[g] : NULL;
        if (c->n_groups) snprintf(pre, sizeof pre, "seq.g%c.", '0' + g); /* g < EM_SEQ_MAX_GROUPS <= 10 */
        if (s.proj) {
            snprintf(nm, sizeof nm, "%sin.weight", pre);
            PARAM(K->win, nm, 2, W, D, 0, WD);
        }
        for (int i = 0; i < s.n_blocks; i++) {
            blk *b = t ? &K->b[i] : NULL;
            if (s.blocks[i].kind != EM_SEQB_HSP) {
                snprintf(nm, sizeof nm, "%s%d.q.weight", pre, i);
                PARAM(b->wq, nm, 2, W, W, 0, WW);
            }
            snprintf(nm, sizeof nm, "%s%d.k.weight", pre, i);
            PARAM(b->wk, nm, 2, W, W, 0, WW);
            snprintf(nm, sizeof nm, "%s%d.v.weight", pre, i);
            PARAM(b->wv, nm, 2, W, W, 0, WW);
            if (s.blocks[i].kind == EM_SEQB_HSP) {
                snprintf(nm, sizeof nm, "%s%d.seeds", pre, i);
                PARAM(b->seeds, nm, 2, (int64_t)m, W, 0, m * (size_t)W);
                snprintf(nm, sizeof nm, "%s%d.kron_a", pre, i);
                PARAM(b->ka, nm, 3, (int64_t)k, (int64_t)m, (int64_t)m2, k * m * m2);
                snprintf(nm, sizeof nm, "%s%d.kron_w", pre, i);
                PARAM(b->kw, nm, 3, (int64_t)k, W, W, k * WW);
            }
        }
        snprintf(nm, sizeof nm, "%stgt.q.weight", pre);
        PARAM(K->tq, nm, 2, W, D, 0, WD);
        snprintf(nm, sizeof nm, "%stgt.k.weight", pre);
        PARAM(K->tk, nm, 2, W, W, 0, WW);
        snprintf(nm, sizeof nm, "%stgt.v.weight", pre);
        PARAM(K->tv, nm, 2, W, W, 0, WW);
        if (s.proj) {
            snprintf(nm, sizeof nm, "%sout.weight", pre);
            PARAM(K->wout, nm, 2, D, W, 0, WD);
        }
    }
#undef PARAM
    if (count) *count = np;
    return off;
}

size_t em_seq_num_params(const em_seq_cfg *c, int D) { return c->num_seq ? layout(c, D, NULL, NULL) : 0; }

/* ---------------------------------------------------------------- lifecycle */

static void free_stack_arenas(stk *k) {
    em_free(k->arN), em_free(k->arB);
    k->arN = k->arB = NULL;
    k->capN = 0, k->capB = 0;
}

static void free_arenas(em_seqtower *t) {
    em_free(t->arN), em_free(t->arB);
    t->arN = t->arB = NULL;
    t->capN = 0, t->capB = 0;
}

void em_seqtower_free(em_seqtower *t) {
    if (!t) return;
    free_arenas(t);
    for (int g = 0; g < t->ns; g++) free_stack_arenas(&t->st[g]);
    em_free(t->params);
    em_free(t);
}

em_status em_seqtower_create(em_seqtower **out, const em_seq_cfg *c, int D, float *params, float *grads) {
    *out = NULL;
    if (c->num_seq == 0) return em_errorf(EM_ERR_INVALID, "sequence tower: num_seq is 0");
    em_status st = em_seq_cfg_validate(c, D, c->cand + 1);
    if (st) return st;
    em_seqtower *t = em_calloc(1, sizeof *t);
    int np = 0;
    layout(c, D, NULL, &np);
    if (t) t->params = em_calloc((size_t)np, sizeof *t->params);
    if (!t || !t->params) {
        em_free(t);
        return em_errorf(EM_ERR_NOMEM, "sequence tower: no memory for the object");
    }
    t->c = *c;
    t->D = D;
    t->E = em_seq_extra(c);
    t->ns = em__seq_n_stacks(c);
    t->groups = c->n_groups > 0;
    t->P = params, t->G = grads;
    t->np = layout(c, D, t, NULL);
    t->nparams = np;
    for (int g = 0; g < t->ns; g++) {
        stk *k = &t->st[g];
        k->s = em__seq_stack_of(&t->c, D, g); /* points into t->c: blocks stay valid */
        k->dh = k->s.W / k->s.H;
        for (int i = 0; i < k->s.n_blocks; i++) k->b[i].k = k->s.blocks[i];
    }
    memset(t->grp, -1, sizeof t->grp);
    for (int g = 0; g < c->n_groups; g++)
        for (int ty = 0; ty < EM_SEQ_GROUP_TYPES && ty < c->num_types; ty++)
            if (c->groups[g].types >> ty & 1) t->grp[ty] = (int8_t)g;
    *out = t;
    return EM_OK;
}

int em_seqtower_params(const em_seqtower *t, const em_seq_param **list) {
    *list = t->params;
    return t->nparams;
}

/* Each tensor from its own stream; the standard deviation from its fan-in (the last
 * dimension), as the header says. */
void em_seqtower_init(em_seqtower *t, uint64_t seed) {
    const double m = t->c.hsp_m, k = t->c.hsp_k;
    for (int i = 0; i < t->nparams; i++) {
        const em_seq_param *p = &t->params[i];
        size_t n = (size_t)p->shape[0] * (size_t)p->shape[1] * (size_t)(p->ndim == 3 ? p->shape[2] : 1);
        const double fan = (double)p->shape[p->ndim - 1];
        double sd = sqrt(1.0 / fan);
        if (strstr(p->name, "age.") || strstr(p->name, "type.")) sd = 0.02;
        else if (strstr(p->name, "kron_a")) sd = 1.0 / sqrt(m * k);
        else if (strstr(p->name, "kron_w")) sd = 1.0 / sqrt(fan * k);
        em_rng r;
        em_rng_seed(&r, em_mix64(seed * 1000003u + 0x5e9u * 1000u + (uint64_t)i));
        for (size_t j = 0; j < n; j++) t->P[p->off + j] = (float)(sd * em_rng_normal(&r));
    }
}

static size_t up16(size_t n) { return (n + 15) & ~(size_t)15; }
/* Carve n floats at position pos of the arena base (base NULL: only count). */
#define TAKE(ptr, base, pos, n) (ptr = (void *)((base) ? (base) + (pos) : NULL), pos += up16(n))

/* The tower's own buffers for N events and B examples. */
static em_status ensure_cap(em_seqtower *t, size_t N, int B) {
    const size_t D = (size_t)t->D;
    if (N <= t->capN && B <= t->capB && t->arN) return EM_OK;
    size_t cN = N > t->capN ? N + N / 2 + 16 : t->capN;
    int cB = B > t->capB ? B : t->capB;
    free_arenas(t);
    size_t fN = 2 * up16(cN * D) + 2 * up16(cN), fB = 2 * up16((size_t)cB * D);
    t->arN = em_malloc(fN * sizeof(float));
    t->arB = em_malloc(fB * sizeof(float));
    if (!t->arN || !t->arB) {
        free_arenas(t);
        return em_errorf(EM_ERR_NOMEM, "sequence tower: no memory for the activations of %zu events", cN);
    }
    float *a = t->arN, *e = t->arB;
    size_t p = 0, q = 0;
    TAKE(t->X0, a, p, cN * D), TAKE(t->dX, a, p, cN * D), TAKE(t->bkt, a, p, cN), TAKE(t->tyi, a, p, cN);
    TAKE(t->cq, e, q, (size_t)cB * D), TAKE(t->dcq, e, q, (size_t)cB * D);
    EM_ASSERT(p == fN && q == fB);
    t->capN = cN, t->capB = cB;
    return EM_OK;
}

/* A stack's buffers for N of its events and B examples (carved in one order, counted
 * by the first pass and taken by the second). */
static em_status ensure_stack_cap(em_seqtower *t, stk *k, size_t N, int B) {
    if (N <= k->capN && B <= k->capB && k->arN) return EM_OK;
    const size_t D = (size_t)t->D, W = (size_t)k->s.W, H = (size_t)k->s.H, m = (size_t)t->c.hsp_m,
                 m2 = (size_t)t->c.hsp_m2, E = (size_t)k->s.E;
    const int grouped = t->groups, proj = k->s.proj;
    size_t cN = N > k->capN ? N + N / 2 + 16 : k->capN;
    const size_t cB = (size_t)(B > k->capB ? B : k->capB);
    free_stack_arenas(k);
    float *a = NULL, *e = NULL; /* pass 0 counts, pass 1 carves */
    size_t p = 0, q = 0;
    for (int pass = 0; pass < 2; pass++) {
        if (pass) {
            k->arN = a = em_malloc(p * sizeof(float));
            k->arB = e = em_malloc(q * sizeof(float));
            if (!k->arN || !k->arB) {
                free_stack_arenas(k);
                return em_errorf(EM_ERR_NOMEM, "sequence tower: no memory for the activations of %zu events", cN);
            }
            p = q = 0;
        }
        if (grouped) {
            TAKE(k->ev, a, p, cN), TAKE(k->X0, a, p, cN * W), TAKE(k->dX, a, p, cN * W);
            TAKE(k->off, e, q, 2 * (cB + 1));
        }
        if (proj) {
            TAKE(k->Xg, a, p, cN * D), TAKE(k->dXg, a, p, cN * D);
            TAKE(k->Og, e, q, cB * E * W), TAKE(k->dOg, e, q, cB * E * W), TAKE(k->OD, e, q, cB * E * D);
        }
        TAKE(k->Kt, a, p, cN * W), TAKE(k->Vt, a, p, cN * W), TAKE(k->dQ, a, p, cN * W), TAKE(k->dK, a, p, cN * W);
        TAKE(k->dV, a, p, cN * W);
        TAKE(k->q, e, q, cB * W), TAKE(k->t, e, q, cB * W), TAKE(k->dt, e, q, cB * W), TAKE(k->dq, e, q, cB * W);
        TAKE(k->tlse, e, q, cB * H), TAKE(k->S, e, q, cB * m2 * W), TAKE(k->dS, e, q, cB * m2 * W);
        for (int i = 0; i < k->s.n_blocks; i++) {
            blk *b = &k->b[i];
            if (b->k.kind == EM_SEQB_HSP) {
                TAKE(b->K, a, p, cN * W), TAKE(b->V, a, p, cN * W);
                TAKE(b->Z, e, q, cB * m * W), TAKE(b->zlse, e, q, cB * m * H), TAKE(b->Y, e, q, cB * m2 * W);
            } else {
                TAKE(b->Q, a, p, cN * W), TAKE(b->K, a, p, cN * W), TAKE(b->V, a, p, cN * W), TAKE(b->O, a, p, cN * W);
                TAKE(b->Xout, a, p, cN * W), TAKE(b->lse, a, p, cN * H);
            }
        }
    }
    k->capN = cN, k->capB = (int)cB;
    return EM_OK;
}
#undef TAKE

/* ------------------------------------------------------------------- FLOPs */

void em_seqtower_stats(const em_seqtower *t, em_seq_stats *out) { *out = t->stats; }
void em_seqtower_stats_reset(em_seqtower *t) { memset(&t->stats, 0, sizeof t->stats); }

static void count_flops(em_seqtower *t) {
    double total = 0;
    if (!t->groups) {
        const stk *k = &t->st[0];
        const int64_t *off = t->s->offsets;
        for (int b = 0; b < t->B; b++) {
            double L = (double)(off[b + 1] - off[b]);
            for (int i = 0; i < k->s.n_blocks; i++) {
                double f = em__seq_block_flops(&t->c, &k->s.blocks[i], t->D, L);
                t->stats.block_flops[i] += f;
                total += f;
            }
            double f = em__seq_target_flops(t->D, t->D, L);
            t->stats.block_flops[k->s.n_blocks] += f;
            total += f;
        }
    } else {
        for (int g = 0; g < t->ns; g++) {
            const stk *k = &t->st[g];
            for (int b = 0; b < t->B; b++) {
                double f = em__seq_stack_flops(&t->c, t->D, &k->s, (double)(k->off[b + 1] - k->off[b]));
                t->stats.group_flops[g] += f;
                total += f;
            }
            t->stats.group_events[g] += (double)k->N;
        }
    }
    t->stats.last_flops = total;
    t->stats.total_flops += total;
    t->stats.examples += t->B;
    t->stats.events += (double)t->N;
}

/* ------------------------------------------------------------- embeddings */

static inline int32_t age_bucket(int64_t age, int nb) {
    if (age <= 0) return 0;
    int32_t k = 1 + (63 - __builtin_clzll((unsigned long long)age));
    return k < nb ? k : nb - 1;
}

static inline int32_t type_row(int32_t type, int nt) {
    int32_t ty = type < nt - 1 ? type : nt - 1;
    return ty < 0 ? 0 : ty;
}

typedef struct {
    em_seqtower *t;
    const float *dX; /* backward */
} emb_arg;

static void embed_task(void *p, int ith, int nth) {
    const emb_arg *a = p;
    em_seqtower *t = a->t;
    const size_t D = (size_t)t->D;
    const float *age = t->P + t->age, *type = t->P + t->type;
    size_t lo, hi;
    em_split(t->N, ith, nth, &lo, &hi);
    for (size_t i = lo; i < hi; i++) {
        int32_t bk = age_bucket(t->s->age[i], t->c.age_buckets);
        int32_t ty = type_row(t->s->type[i], t->c.num_types);
        t->bkt[i] = bk, t->tyi[i] = ty;
        float *x = t->X0 + i * D;
        const float *w = t->item_w + (size_t)t->s->items[i] * D, *ag = age + (size_t)bk * D, *tp = type + (size_t)ty * D;
        for (size_t d = 0; d < D; d++) x[d] = w[d] + ag[d] + tp[d];
    }
}

/* Age and type gradients: worker ith owns columns [lo, hi) of both tables and adds
 * every event's gradient in event order. */
static void embed_bwd_task(void *p, int ith, int nth) {
    const emb_arg *a = p;
    em_seqtower *t = a->t;
    const size_t D = (size_t)t->D;
    float *gage = t->G + t->age, *gtype = t->G + t->type;
    size_t lo, hi;
    em_split(D, ith, nth, &lo, &hi);
    for (size_t i = 0; i < t->N; i++) {
        const float *g = a->dX + i * D;
        float *ga = gage + (size_t)t->bkt[i] * D, *gt = gtype + (size_t)t->tyi[i] * D;
        for (size_t d = lo; d < hi; d++) ga[d] += g[d], gt[d] += g[d];
    }
}

/* Groups: count each group's events, make room, then write its offsets and event list
 * (batch order, so each sub-sequence keeps its events' order). */
static em_status split_groups(em_seqtower *t, const em_batch_seq *s, int B) {
    size_t cnt[EM_SEQ_MAX_GROUPS] = {0};
    const size_t N = (size_t)s->offsets[B];
    for (size_t i = 0; i < N; i++) {
        int g = t->grp[type_row(s->type[i], t->c.num_types)];
        if (g >= 0) cnt[g]++;
    }
    for (int g = 0; g < t->ns; g++) {
        em_status st = ensure_stack_cap(t, &t->st[g], cnt[g], B);
        if (st) return st;
        t->st[g].N = 0;
        t->st[g].off[0] = 0;
        t->st[g].offsets = t->st[g].off;
    }
    for (int b = 0; b < B; b++) {
        for (int64_t i = s->offsets[b]; i < s->offsets[b + 1]; i++) {
            int g = t->grp[type_row(s->type[i], t->c.num_types)];
            if (g >= 0) t->st[g].ev[t->st[g].N++] = (int32_t)i;
        }
        for (int g = 0; g < t->ns; g++) t->st[g].off[b + 1] = (int64_t)t->st[g].N;
    }
    return EM_OK;
}

/* ---------------------------------------------------------------- forward */

static em_jattn_cfg attn_cfg(const em_seqtower *t, const stk *k, int causal) {
    return (em_jattn_cfg){t->B, k->s.H, k->dh, k->offsets, 0.f, causal};
}

static em_hsp_cfg hsp_cfg(const em_seqtower *t, const stk *k) {
    return (em_hsp_cfg){attn_cfg(t, k, 0), t->c.hsp_m, t->c.hsp_m2, k->s.W, t->c.hsp_k};
}

/* Stack k over its input k->X0: blocks, target attention, its E vectors into
 * out[:, e0 .. e0 + E). */
static em_status stack_forward(em_seqtower *t, stk *k, float *out, int e0, em_pool *pool) {
    const int B = t->B, Ni = (int)k->N, Wi = k->s.W, Di = t->D;
    const size_t N = k->N, W = (size_t)Wi, D = (size_t)Di, m2 = (size_t)t->c.hsp_m2;
    const float *P = t->P;
    float *X = k->X0;
    em_status st;
    memset(k->S, 0, (size_t)B * m2 * W * sizeof(float));
    for (int i = 0; i < k->s.n_blocks; i++) {
        blk *b = &k->b[i];
        if (b->k.kind == EM_SEQB_HSP) {
            em_hsp_cfg hc = hsp_cfg(t, k);
            if (N) {
                em_linear_forward(b->K, X, P + b->wk, NULL, Ni, Wi, Wi, pool);
                em_linear_forward(b->V, X, P + b->wv, NULL, Ni, Wi, Wi, pool);
                if ((st = em_hsp_forward(b->Y, b->Z, b->zlse, P + b->seeds, b->K, b->V, P + b->ka, P + b->kw, hc, pool)))
                    return st;
            } else {
                memset(b->Y, 0, (size_t)B * m2 * W * sizeof(float));
            }
            em_vadd(k->S, b->Y, (size_t)B * m2 * W);
            continue;
        }
        if (N) {
            em_linear_forward(b->Q, X, P + b->wq, NULL, Ni, Wi, Wi, pool);
            em_linear_forward(b->K, X, P + b->wk, NULL, Ni, Wi, Wi, pool);
            em_linear_forward(b->V, X, P + b->wv, NULL, Ni, Wi, Wi, pool);
            em_jattn_cfg ac = attn_cfg(t, k, b->k.causal);
            if (b->k.kind == EM_SEQB_JATTN) st = em_jattn_forward(b->O, b->lse, b->Q, b->K, b->V, &ac, pool);
            else if (b->k.kind == EM_SEQB_GDPA) {
                em_gdpa_cfg gc = {ac, b->k.act, 1.0f / (float)t->c.max_len};
                st = em_gdpa_forward(b->O, b->Q, b->K, b->V, &gc, pool);
            } else {
                em_swa_cfg sc = {ac, b->k.window};
                st = em_swa_forward(b->O, b->lse, b->Q, b->K, b->V, &sc, pool);
            }
            if (st) return st;
            for (size_t j = 0; j < N * W; j++) b->Xout[j] = X[j] + b->O[j];
        }
        X = b->Xout;
    }
    k->Xfin = X;
    /* target attention: the candidate's embedding queries the final history */
    em_linear_forward(k->q, t->cq, P + k->tq, NULL, B, Di, Wi, pool);
    if (N) {
        em_linear_forward(k->Kt, X, P + k->tk, NULL, Ni, Wi, Wi, pool);
        em_linear_forward(k->Vt, X, P + k->tv, NULL, Ni, Wi, Wi, pool);
        em_jattn_cfg ac = attn_cfg(t, k, 0);
        if ((st = em_jattn_target_forward(k->t, k->tlse, k->q, k->Kt, k->Vt, &ac, pool))) return st;
    } else {
        memset(k->t, 0, (size_t)B * W * sizeof(float));
    }
    /* the stack's vectors of example b, [t_b, S_b], at out[b, e0..]: projected to D
     * through Og (B, Ek, W) -> OD (B, Ek, D), or as they are when W = D */
    const size_t E = (size_t)t->E, Ek = (size_t)k->s.E;
    if (k->s.proj) {
        for (int b = 0; b < B; b++) {
            float *o = k->Og + (size_t)b * Ek * W;
            memcpy(o, k->t + (size_t)b * W, W * sizeof(float));
            if (k->s.has_hsp) memcpy(o + W, k->S + (size_t)b * m2 * W, m2 * W * sizeof(float));
        }
        em_linear_forward(k->OD, k->Og, P + k->wout, NULL, B * (int)Ek, Wi, Di, pool);
        for (int b = 0; b < B; b++)
            memcpy(out + ((size_t)b * E + (size_t)e0) * D, k->OD + (size_t)b * Ek * D, Ek * D * sizeof(float));
        return EM_OK;
    }
    for (int b = 0; b < B; b++) {
        float *o = out + ((size_t)b * E + (size_t)e0) * D;
        memcpy(o, k->t + (size_t)b * D, D * sizeof(float));
        if (k->s.has_hsp) memcpy(o + D, k->S + (size_t)b * m2 * D, m2 * D * sizeof(float));
    }
    return EM_OK;
}

em_status em_seqtower_forward(em_seqtower *t, const em_batch_seq *s, int B, const float *item_w, int64_t rows,
                              const float *query, size_t qstride, float *out, em_pool *pool) {
    if (!s || !item_w || !query || !out || B < 1) return em_errorf(EM_ERR_INVALID, "sequence tower: bad arguments");
    em_status st = em_jagged_check(s->offsets, B);
    if (st) return st;
    const size_t N = (size_t)s->offsets[B], D = (size_t)t->D;
    if (N > (size_t)(INT32_MAX / 2)) return em_errorf(EM_ERR_INVALID, "sequence tower: %zu events in one batch", N);
    if (N && (!s->items || !s->age || !s->type)) return em_errorf(EM_ERR_INVALID, "sequence tower: NULL event arrays");
    for (size_t i = 0; i < N; i++)
        if ((uint64_t)s->items[i] >= (uint64_t)rows) {
            int b = 0;
            while (s->offsets[b + 1] <= (int64_t)i) b++;
            return em_errorf(EM_ERR_INVALID, "sequence tower: example %d, event %lld: item %lld out of range [0, %lld)", b,
                             (long long)((int64_t)i - s->offsets[b]), (long long)s->items[i], (long long)rows);
        }
    t->s = NULL; /* a failed forward leaves nothing to go backward through */
    if ((st = ensure_cap(t, N, B))) return st;
    if (t->groups) {
        if ((st = split_groups(t, s, B))) return st;
    } else {
        stk *k = &t->st[0];
        if ((st = ensure_stack_cap(t, k, N, B))) return st;
        k->N = N, k->offsets = s->offsets, k->X0 = t->X0, k->dX = t->dX;
    }
    t->s = s, t->item_w = item_w, t->B = B, t->N = N;
    if (N) {
        emb_arg ea = {t, NULL};
        em_pool_run(N >= 4096 ? pool : NULL, embed_task, &ea);
    }
    for (int b = 0; b < B; b++) memcpy(t->cq + (size_t)b * D, query + (size_t)b * qstride, D * sizeof(float));
    int e0 = 0;
    for (int g = 0; g < t->ns; g++) {
        stk *k = &t->st[g];
        if (t->groups && k->N) { /* gather the group's events, then project them to its width */
            float *dst = k->s.proj ? k->Xg : k->X0;
            for (size_t j = 0; j < k->N; j++) memcpy(dst + j * D, t->X0 + (size_t)k->ev[j] * D, D * sizeof(float));
            if (k->s.proj) em_linear_forward(k->X0, k->Xg, t->P + k->win, NULL, (int)k->N, (int)D, k->s.W, pool);
        }
        if ((st = stack_forward(t, k, out, e0, pool))) {
            t->s = NULL;
            return st;
        }
        e0 += k->s.E;
    }
    count_flops(t);
    return EM_OK;
}

/* --------------------------------------------------------------- backward */

/* Backward of stack k given dout (B, E, D) of the whole tower: its parameters'
 * gradients (G zeroed by the caller), the query's gradient added to dquery, and the
 * gradient of its input in k->dX (N, W) (untouched when the stack has no events). */
static em_status stack_backward(em_seqtower *t, stk *k, const float *dout, int e0, float *dquery, size_t qstride,
                                em_pool *pool) {
    const int B = t->B, Ni = (int)k->N, Wi = k->s.W, Di = t->D;
    const size_t N = k->N, W = (size_t)Wi, D = (size_t)Di, m2 = (size_t)t->c.hsp_m2, E = (size_t)t->E,
                 Ek = (size_t)k->s.E, NW = N * W;
    const float *P = t->P;
    float *G = t->G;
    em_status st;
    if (k->s.proj) { /* through the output projection: dOg (B, Ek, W) */
        for (int b = 0; b < B; b++)
            memcpy(k->OD + (size_t)b * Ek * D, dout + ((size_t)b * E + (size_t)e0) * D, Ek * D * sizeof(float));
        em_linear_backward_set(k->dOg, G + k->wout, NULL, k->OD, k->Og, P + k->wout, B * (int)Ek, Wi, Di, pool);
        for (int b = 0; b < B; b++) {
            const float *d = k->dOg + (size_t)b * Ek * W;
            memcpy(k->dt + (size_t)b * W, d, W * sizeof(float));
            if (k->s.has_hsp) memcpy(k->dS + (size_t)b * m2 * W, d + W, m2 * W * sizeof(float));
        }
    } else {
        for (int b = 0; b < B; b++) {
            const float *d = dout + ((size_t)b * E + (size_t)e0) * D;
            memcpy(k->dt + (size_t)b * D, d, D * sizeof(float));
            if (k->s.has_hsp) memcpy(k->dS + (size_t)b * m2 * D, d + D, m2 * D * sizeof(float));
        }
    }
    /* target attention */
    memset(k->dq, 0, (size_t)B * W * sizeof(float));
    if (N) {
        memset(k->dK, 0, NW * sizeof(float));
        memset(k->dV, 0, NW * sizeof(float));
        em_jattn_cfg ac = attn_cfg(t, k, 0);
        if ((st = em_jattn_target_backward(k->dq, k->dK, k->dV, k->dt, k->q, k->Kt, k->Vt, k->t, k->tlse, &ac, pool)))
            return st;
        em_linear_backward_set(k->dX, G + k->tk, NULL, k->dK, k->Xfin, P + k->tk, Ni, Wi, Wi, pool);
        em_linear_backward(k->dX, G + k->tv, NULL, k->dV, k->Xfin, P + k->tv, Ni, Wi, Wi, pool);
    }
    em_linear_backward_set(t->dcq, G + k->tq, NULL, k->dq, t->cq, P + k->tq, B, Di, Wi, pool);
    for (int b = 0; b < B; b++) em_vadd(dquery + (size_t)b * qstride, t->dcq + (size_t)b * D, D);
    if (!N) return EM_OK;
    /* blocks, last first; dX holds the gradient of the current block's output */
    for (int i = k->s.n_blocks - 1; i >= 0; i--) {
        blk *b = &k->b[i];
        const float *Xin = k->X0;
        for (int j = i - 1; j >= 0; j--)
            if (k->b[j].k.kind != EM_SEQB_HSP) {
                Xin = k->b[j].Xout;
                break;
            }
        if (b->k.kind == EM_SEQB_HSP) {
            memset(k->dK, 0, NW * sizeof(float));
            memset(k->dV, 0, NW * sizeof(float));
            em_hsp_cfg hc = hsp_cfg(t, k);
            if ((st = em_hsp_backward(G + b->seeds, k->dK, k->dV, G + b->ka, G + b->kw, k->dS, P + b->seeds, b->K, b->V,
                                      P + b->ka, P + b->kw, b->Z, b->zlse, hc, pool)))
                return st;
            em_linear_backward(k->dX, G + b->wk, NULL, k->dK, Xin, P + b->wk, Ni, Wi, Wi, pool);
            em_linear_backward(k->dX, G + b->wv, NULL, k->dV, Xin, P + b->wv, Ni, Wi, Wi, pool);
            continue;
        }
        memset(k->dQ, 0, NW * sizeof(float));
        memset(k->dK, 0, NW * sizeof(float));
        memset(k->dV, 0, NW * sizeof(float));
        em_jattn_cfg ac = attn_cfg(t, k, b->k.causal);
        if (b->k.kind == EM_SEQB_JATTN)
            st = em_jattn_backward(k->dQ, k->dK, k->dV, k->dX, b->Q, b->K, b->V, b->O, b->lse, &ac, pool);
        else if (b->k.kind == EM_SEQB_GDPA) {
            em_gdpa_cfg gc = {ac, b->k.act, 1.0f / (float)t->c.max_len};
            st = em_gdpa_backward(k->dQ, k->dK, k->dV, k->dX, b->Q, b->K, b->V, &gc, pool);
        } else {
            em_swa_cfg sc = {ac, b->k.window};
            st = em_swa_backward(k->dQ, k->dK, k->dV, k->dX, b->Q, b->K, b->V, b->O, b->lse, &sc, pool);
        }
        if (st) return st;
        /* the residual passes dX through; the projections add theirs */
        em_linear_backward(k->dX, G + b->wq, NULL, k->dQ, Xin, P + b->wq, Ni, Wi, Wi, pool);
        em_linear_backward(k->dX, G + b->wk, NULL, k->dK, Xin, P + b->wk, Ni, Wi, Wi, pool);
        em_linear_backward(k->dX, G + b->wv, NULL, k->dV, Xin, P + b->wv, Ni, Wi, Wi, pool);
    }
    return EM_OK;
}

em_status em_seqtower_backward(em_seqtower *t, const float *dout, float *dquery, size_t qstride, em_pool *pool) {
    if (!t->s) return em_errorf(EM_ERR_INVALID, "sequence tower: backward without a forward");
    const size_t N = t->N, D = (size_t)t->D;
    em_status st;
    memset(t->G, 0, t->np * sizeof(float));
    if (t->groups && N) memset(t->dX, 0, N * D * sizeof(float)); /* events of no group get none */
    int e0 = 0;
    for (int g = 0; g < t->ns; g++) {
        stk *k = &t->st[g];
        if ((st = stack_backward(t, k, dout, e0, dquery, qstride, pool))) return st;
        e0 += k->s.E;
        if (!t->groups || !k->N) continue;
        /* back through the projection to the embedded events, scattered to their rows */
        const float *src = k->dX;
        if (k->s.proj) {
            em_linear_backward_set(k->dXg, t->G + k->win, NULL, k->dX, k->Xg, t->P + k->win, (int)k->N, (int)D, k->s.W,
                                   pool);
            src = k->dXg;
        }
        for (size_t j = 0; j < k->N; j++) memcpy(t->dX + (size_t)k->ev[j] * D, src + j * D, D * sizeof(float));
    }
    if (!N) return EM_OK;
    emb_arg ea = {t, t->dX};
    em_pool_run(N * D >= 65536 ? pool : NULL, embed_bwd_task, &ea);
    return EM_OK;
}

size_t em_seqtower_item_grads(const em_seqtower *t, const int64_t **items, const float **grads) {
    *items = t->s ? t->s->items : NULL;
    *grads = t->dX;
    return t->s ? t->N : 0;
}
