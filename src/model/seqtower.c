/*
 * seqtower.c - the DLRM's sequence tower (API and math in ember/seqtower.h): history
 * events embedded (item + log2 age bucket + event type), a stack of attention blocks
 * over the jagged history (Jagged Flash Attention, Kunlun's GDPA, sliding-window
 * attention, hierarchical seed pooling), then target attention with the candidate's
 * embedding as the query. dlrm.c composes it: the tower's output vectors join the dot
 * interaction, the query's gradient flows back into the candidate's pooled embedding,
 * and the history items' gradients go to the sparse optimizer.
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
 *   - Memory: activations are carved from two arenas (per event and per example),
 *     grown by half again when a batch needs more, so a steady-state step allocates
 *     nothing. Per mixing block the tower keeps Q, K, V, O and the block's output (N, D)
 *     and, for the softmax blocks, lse (N, H); per hsp block K, V (N, D) and Z, lse, Y.
 *   - Determinism: every kernel used is bitwise independent of the thread count; the
 *     embedding sums are per event, and the age/type gradient scatter splits the D
 *     columns over the workers, each summing its columns in event order.
 */
#include "ember/seqtower.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "core/simd.h"
#include "ember/hsp.h"
#include "ember/jagged.h"
#include "ember/jattn.h"
#include "ember/nn.h"

#define MAX_PARAMS (2 + 6 * EM_SEQ_MAX_BLOCKS + 3)

typedef struct {
    em_seq_block k;
    size_t wq, wk, wv, seeds, ka, kw; /* parameter offsets in the tower's slice */
    /* activations (carved from the arenas) */
    float *Q, *K, *V, *O, *Xout, *lse; /* (N, D) ... lse (N, H) */
    float *Z, *zlse, *Y;               /* hsp: (B, m, D), (B, m, H), (B, m2, D) */
} blk;

struct em_seqtower {
    em_seq_cfg c;
    int D, H, dh, E, has_hsp;
    float *P, *G;
    size_t np;
    size_t age, type, tq, tk, tv;
    blk b[EM_SEQ_MAX_BLOCKS];
    em_seq_param params[MAX_PARAMS];
    int nparams;
    /* capacity and arenas */
    size_t capN;
    int capB;
    float *arN, *arB;
    int32_t *bkt, *tyi; /* (N) age bucket and type row of each event */
    float *X0, *Kt, *Vt, *dX, *dQ, *dK, *dV;      /* (N, D) */
    float *cq, *q, *t, *tlse, *S, *dt, *dq, *dcq, *dS; /* per example */
    /* the last forward */
    const em_batch_seq *s;
    const float *item_w;
    int B;
    size_t N;
    float *Xfin; /* the history after the last block */
    em_seq_stats stats;
};

/* ------------------------------------------------------------------ config */

em_seq_cfg em_seq_default(void) {
    em_seq_cfg c;
    memset(&c, 0, sizeof c);
    c.num_seq = 1;
    c.heads = 2;
    c.age_buckets = 32;
    c.num_types = 4;
    c.hsp_m = 4, c.hsp_m2 = 2, c.hsp_k = 2;
    em_status st = em_seq_parse_blocks(&c, "compskip:2", EM_GDPA_SILU, 8);
    EM_ASSERT(st == EM_OK);
    return c;
}

static const char *act_names[] = {"identity", "relu", "relu2", "silu", "gelu", "tanh"};

const char *em_gdpa_act_name(em_gdpa_act a) {
    return (unsigned)a < sizeof act_names / sizeof *act_names ? act_names[a] : "?";
}

em_status em_gdpa_act_parse(const char *name, em_gdpa_act *out) {
    for (int i = 0; i < (int)(sizeof act_names / sizeof *act_names); i++)
        if (strcmp(name, act_names[i]) == 0) {
            *out = (em_gdpa_act)i;
            return EM_OK;
        }
    return em_errorf(EM_ERR_INVALID, "unknown GDPA activation '%s' (identity, relu, relu2, silu, gelu, tanh)", name);
}

static int parse_int(const char *s, size_t n, long lo, long hi, long *out) {
    if (n == 0 || n > 9) return -1;
    long v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (s[i] - '0');
    }
    if (v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

/* One block token ("swa:16:causal") into *k. */
static em_status parse_block(const char *tok, size_t len, em_gdpa_act act, int window, em_seq_block *k) {
    char buf[64];
    if (len == 0 || len >= sizeof buf) return em_errorf(EM_ERR_INVALID, "sequence blocks: empty or too long block '%.*s'", (int)len, tok);
    memcpy(buf, tok, len);
    buf[len] = 0;
    char *save = NULL, *part = strtok_r(buf, ":", &save);
    memset(k, 0, sizeof *k);
    k->act = act;
    k->window = window;
    if (!part) return em_errorf(EM_ERR_INVALID, "sequence blocks: empty block");
    if (strcmp(part, "jattn") == 0) k->kind = EM_SEQB_JATTN;
    else if (strcmp(part, "gdpa") == 0) k->kind = EM_SEQB_GDPA;
    else if (strcmp(part, "swa") == 0) k->kind = EM_SEQB_SWA;
    else if (strcmp(part, "hsp") == 0) k->kind = EM_SEQB_HSP;
    else
        return em_errorf(EM_ERR_INVALID, "sequence blocks: unknown block '%s' (jattn, gdpa, swa, hsp; or compskip:N, full:N)",
                         part);
    while ((part = strtok_r(NULL, ":", &save))) {
        long v;
        em_gdpa_act a = EM_GDPA_IDENTITY;
        if (strcmp(part, "causal") == 0 && k->kind != EM_SEQB_HSP) k->causal = 1;
        else if (k->kind == EM_SEQB_GDPA && em_gdpa_act_parse(part, &a) == EM_OK) k->act = a;
        else if (k->kind == EM_SEQB_SWA && parse_int(part, strlen(part), 0, 1 << 20, &v) == 0) k->window = (int)v;
        else {
            em_clear_error();
            return em_errorf(EM_ERR_INVALID, "sequence blocks: bad option '%s' of block '%.*s'", part, (int)len, tok);
        }
    }
    return EM_OK;
}

em_status em_seq_parse_blocks(em_seq_cfg *c, const char *spec, em_gdpa_act act, int window) {
    em_seq_block bl[EM_SEQ_MAX_BLOCKS];
    int n = 0;
    if (!spec) spec = "";
    if ((unsigned)act > EM_GDPA_TANH) return em_errorf(EM_ERR_INVALID, "sequence blocks: bad default activation");
    if (window < 0) return em_errorf(EM_ERR_INVALID, "sequence blocks: window %d < 0", window);
    long layers;
    int compskip = strncmp(spec, "compskip:", 9) == 0, full = strncmp(spec, "full:", 5) == 0;
    if (compskip || full) {
        const char *num = spec + (compskip ? 9 : 5);
        if (parse_int(num, strlen(num), 1, EM_SEQ_MAX_BLOCKS, &layers))
            return em_errorf(EM_ERR_INVALID, "sequence blocks: '%s': expected %s:N with N layers in 1..%d", spec,
                             compskip ? "compskip" : "full", EM_SEQ_MAX_BLOCKS);
        for (long l = 0; l < layers; l++) {
            int fresh = full || l % 2 == 0;
            if (n + 1 + fresh > EM_SEQ_MAX_BLOCKS)
                return em_errorf(EM_ERR_INVALID, "sequence blocks: '%s' needs more than %d blocks", spec, EM_SEQ_MAX_BLOCKS);
            bl[n++] = (em_seq_block){fresh ? EM_SEQB_GDPA : EM_SEQB_SWA, 0, act, window};
            if (fresh) bl[n++] = (em_seq_block){EM_SEQB_HSP, 0, act, window};
        }
    } else if (strcmp(spec, "none") != 0 && *spec) {
        const char *p = spec;
        for (;;) {
            const char *e = strchr(p, ',');
            size_t len = e ? (size_t)(e - p) : strlen(p);
            if (n == EM_SEQ_MAX_BLOCKS) return em_errorf(EM_ERR_INVALID, "sequence blocks: more than %d blocks", EM_SEQ_MAX_BLOCKS);
            em_status st = parse_block(p, len, act, window, &bl[n]);
            if (st) return st;
            n++;
            if (!e) break;
            p = e + 1;
        }
    }
    for (int i = 0; i < n; i++) { /* canonical: fields a block does not use are 0 */
        if (bl[i].kind != EM_SEQB_GDPA) bl[i].act = EM_GDPA_IDENTITY;
        if (bl[i].kind != EM_SEQB_SWA) bl[i].window = 0;
    }
    c->n_blocks = n;
    memcpy(c->blocks, bl, (size_t)n * sizeof *bl);
    return EM_OK;
}

int em_seq_format_blocks(const em_seq_cfg *c, char *buf, size_t cap) {
    size_t k = 0;
    int total = 0;
    if (cap) buf[0] = 0;
    if (c->n_blocks == 0) return snprintf(buf, cap, "none");
    for (int i = 0; i < c->n_blocks; i++) {
        const em_seq_block *b = &c->blocks[i];
        char one[64];
        switch (b->kind) {
        case EM_SEQB_JATTN: snprintf(one, sizeof one, "jattn%s", b->causal ? ":causal" : ""); break;
        case EM_SEQB_GDPA: snprintf(one, sizeof one, "gdpa:%s%s", em_gdpa_act_name(b->act), b->causal ? ":causal" : ""); break;
        case EM_SEQB_SWA: snprintf(one, sizeof one, "swa:%d%s", b->window, b->causal ? ":causal" : ""); break;
        default: snprintf(one, sizeof one, "hsp"); break;
        }
        int w = snprintf(buf + k, k < cap ? cap - k : 0, "%s%s", i ? "," : "", one);
        total += w;
        k = k + (size_t)w < cap ? k + (size_t)w : cap;
    }
    return total;
}

static int any_hsp(const em_seq_cfg *c) {
    for (int i = 0; i < c->n_blocks; i++)
        if (c->blocks[i].kind == EM_SEQB_HSP) return 1;
    return 0;
}

int em_seq_extra(const em_seq_cfg *c) { return c->num_seq ? 1 + (any_hsp(c) ? c->hsp_m2 : 0) : 0; }

em_status em_seq_cfg_validate(const em_seq_cfg *c, int D, int num_tables) {
    if (c->num_seq == 0) return EM_OK;
    if (c->num_seq != 1)
        return em_errorf(EM_ERR_INVALID, "sequence tower: %d sequence features; one is supported", c->num_seq);
    if (c->max_len < 1 || c->max_len > EM_SEQ_MAX_LEN)
        return em_errorf(EM_ERR_INVALID, "sequence tower: max_len %d outside 1..%d", c->max_len, EM_SEQ_MAX_LEN);
    if (c->cand < 0 || c->cand >= num_tables)
        return em_errorf(EM_ERR_INVALID, "sequence tower: candidate field %d outside the %d categoricals", c->cand + 1,
                         num_tables);
    if (c->rows < 1 || c->rows > ((int64_t)1 << 32))
        return em_errorf(EM_ERR_INVALID, "sequence tower: %lld history item rows (need 1 .. 2^32)", (long long)c->rows);
    if (c->heads < 1 || D % c->heads != 0)
        return em_errorf(EM_ERR_INVALID, "sequence tower: %d heads do not divide the embedding dim %d", c->heads, D);
    if (c->age_buckets < 1 || c->age_buckets > 64)
        return em_errorf(EM_ERR_INVALID, "sequence tower: %d age buckets (1..64)", c->age_buckets);
    if (c->num_types < 1 || c->num_types > EM_SEQ_MAX_TYPE + 1)
        return em_errorf(EM_ERR_INVALID, "sequence tower: %d event types (1..%d)", c->num_types, EM_SEQ_MAX_TYPE + 1);
    if (c->n_blocks < 0 || c->n_blocks > EM_SEQ_MAX_BLOCKS)
        return em_errorf(EM_ERR_INVALID, "sequence tower: %d blocks (0..%d)", c->n_blocks, EM_SEQ_MAX_BLOCKS);
    for (int i = 0; i < c->n_blocks; i++) {
        const em_seq_block *b = &c->blocks[i];
        if ((unsigned)b->kind > EM_SEQB_HSP || (unsigned)b->act > EM_GDPA_TANH || b->window < 0 || (b->causal & ~1))
            return em_errorf(EM_ERR_INVALID, "sequence tower: block %d is malformed", i);
    }
    if (any_hsp(c) && (c->hsp_m < 1 || c->hsp_m2 < 1 || c->hsp_k < 1 || c->hsp_m > 1024 || c->hsp_m2 > 1024 ||
                       c->hsp_k > 64))
        return em_errorf(EM_ERR_INVALID, "sequence tower: HSP needs 1..1024 seeds and output tokens, 1..64 Kronecker terms "
                                         "(got %d, %d, %d)", c->hsp_m, c->hsp_m2, c->hsp_k);
    return EM_OK;
}

/* Parameter layout; fills t->b[].w* and the named list when t is non-NULL. */
static size_t layout(const em_seq_cfg *c, int D, em_seqtower *t) {
    size_t off = 0, DD = (size_t)D * (size_t)D;
    int np = 0;
#define PARAM(var, nm, nd, s0, s1, s2, count)                                                                          \
    do {                                                                                                               \
        if (t) {                                                                                                       \
            em_seq_param *p_ = &t->params[np];                                                                         \
            snprintf(p_->name, sizeof p_->name, "%s", nm);                                                             \
            p_->off = off, p_->ndim = nd, p_->shape[0] = s0, p_->shape[1] = s1, p_->shape[2] = s2;                     \
            var = off;                                                                                                 \
        }                                                                                                              \
        np++;                                                                                                          \
        off += (count);                                                                                                \
    } while (0)
    char nm[32];
    PARAM(t->age, "seq.age.weight", 2, c->age_buckets, D, 0, (size_t)c->age_buckets * (size_t)D);
    PARAM(t->type, "seq.type.weight", 2, c->num_types, D, 0, (size_t)c->num_types * (size_t)D);
    const size_t m = (size_t)c->hsp_m, m2 = (size_t)c->hsp_m2, k = (size_t)c->hsp_k;
    for (int i = 0; i < c->n_blocks; i++) {
        blk *b = t ? &t->b[i] : NULL;
        if (c->blocks[i].kind != EM_SEQB_HSP) {
            snprintf(nm, sizeof nm, "seq.%d.q.weight", i);
            PARAM(b->wq, nm, 2, D, D, 0, DD);
        }
        snprintf(nm, sizeof nm, "seq.%d.k.weight", i);
        PARAM(b->wk, nm, 2, D, D, 0, DD);
        snprintf(nm, sizeof nm, "seq.%d.v.weight", i);
        PARAM(b->wv, nm, 2, D, D, 0, DD);
        if (c->blocks[i].kind == EM_SEQB_HSP) {
            snprintf(nm, sizeof nm, "seq.%d.seeds", i);
            PARAM(b->seeds, nm, 2, (int64_t)m, D, 0, m * (size_t)D);
            snprintf(nm, sizeof nm, "seq.%d.kron_a", i);
            PARAM(b->ka, nm, 3, (int64_t)k, (int64_t)m, (int64_t)m2, k * m * m2);
            snprintf(nm, sizeof nm, "seq.%d.kron_w", i);
            PARAM(b->kw, nm, 3, (int64_t)k, D, D, k * DD);
        }
    }
    PARAM(t->tq, "seq.tgt.q.weight", 2, D, D, 0, DD);
    PARAM(t->tk, "seq.tgt.k.weight", 2, D, D, 0, DD);
    PARAM(t->tv, "seq.tgt.v.weight", 2, D, D, 0, DD);
#undef PARAM
    if (t) t->nparams = np;
    return off;
}

size_t em_seq_num_params(const em_seq_cfg *c, int D) { return c->num_seq ? layout(c, D, NULL) : 0; }

/* ---------------------------------------------------------------- lifecycle */

static void free_arenas(em_seqtower *t) {
    em_free(t->arN), em_free(t->arB);
    t->arN = t->arB = NULL;
    t->capN = 0, t->capB = 0;
}

void em_seqtower_free(em_seqtower *t) {
    if (!t) return;
    free_arenas(t);
    em_free(t);
}

em_status em_seqtower_create(em_seqtower **out, const em_seq_cfg *c, int D, float *params, float *grads) {
    *out = NULL;
    if (c->num_seq == 0) return em_errorf(EM_ERR_INVALID, "sequence tower: num_seq is 0");
    em_status st = em_seq_cfg_validate(c, D, c->cand + 1);
    if (st) return st;
    em_seqtower *t = em_calloc(1, sizeof *t);
    if (!t) return em_errorf(EM_ERR_NOMEM, "sequence tower: no memory for the object");
    t->c = *c;
    t->D = D, t->H = c->heads, t->dh = D / c->heads;
    t->has_hsp = any_hsp(c);
    t->E = em_seq_extra(c);
    t->P = params, t->G = grads;
    t->np = layout(c, D, t);
    for (int i = 0; i < c->n_blocks; i++) t->b[i].k = c->blocks[i];
    *out = t;
    return EM_OK;
}

int em_seqtower_params(const em_seqtower *t, const em_seq_param **list) {
    *list = t->params;
    return t->nparams;
}

void em_seqtower_init(em_seqtower *t, uint64_t seed) {
    const double D = t->D, m = t->c.hsp_m, k = t->c.hsp_k;
    for (int i = 0; i < t->nparams; i++) {
        const em_seq_param *p = &t->params[i];
        size_t n = (size_t)p->shape[0] * (size_t)p->shape[1] * (size_t)(p->ndim == 3 ? p->shape[2] : 1);
        double sd = sqrt(1.0 / D);
        if (strstr(p->name, "age.") || strstr(p->name, "type.")) sd = 0.02;
        else if (strstr(p->name, "kron_a")) sd = 1.0 / sqrt(m * k);
        else if (strstr(p->name, "kron_w")) sd = 1.0 / sqrt(D * k);
        em_rng r;
        em_rng_seed(&r, em_mix64(seed * 1000003u + 0x5e9u * 1000u + (uint64_t)i));
        for (size_t j = 0; j < n; j++) t->P[p->off + j] = (float)(sd * em_rng_normal(&r));
    }
}

static size_t up16(size_t n) { return (n + 15) & ~(size_t)15; }

/* Carve the per-event and per-example buffers for N events and B examples. */
static em_status ensure_cap(em_seqtower *t, size_t N, int B) {
    const size_t D = (size_t)t->D, H = (size_t)t->H, m = (size_t)t->c.hsp_m, m2 = (size_t)t->c.hsp_m2;
    if (N <= t->capN && B <= t->capB && t->arN) return EM_OK;
    size_t cN = N > t->capN ? N + N / 2 + 16 : t->capN;
    int cB = B > t->capB ? B : t->capB;
    free_arenas(t);
    /* per-event floats: X0, Kt, Vt, dX, dQ, dK, dV, then per block */
    size_t fN = 7 * up16(cN * D) + 2 * up16(cN); /* + two int32 arrays (as floats) */
    size_t fB = 9 * up16((size_t)cB * D) + up16((size_t)cB * H) + 2 * up16((size_t)cB * m2 * D);
    for (int i = 0; i < t->c.n_blocks; i++) {
        if (t->b[i].k.kind == EM_SEQB_HSP) {
            fN += 2 * up16(cN * D);
            fB += up16((size_t)cB * m * D) + up16((size_t)cB * m * H) + up16((size_t)cB * m2 * D);
        } else {
            fN += 5 * up16(cN * D) + up16(cN * H);
        }
    }
    t->arN = em_malloc(fN * sizeof(float));
    t->arB = em_malloc(fB * sizeof(float));
    if (!t->arN || !t->arB) {
        free_arenas(t);
        return em_errorf(EM_ERR_NOMEM, "sequence tower: no memory for the activations of %zu events", cN);
    }
    float *p = t->arN, *q = t->arB;
#define TAKE(ptr, base, n) (ptr = base, base += up16(n))
    TAKE(t->X0, p, cN * D), TAKE(t->Kt, p, cN * D), TAKE(t->Vt, p, cN * D), TAKE(t->dX, p, cN * D);
    TAKE(t->dQ, p, cN * D), TAKE(t->dK, p, cN * D), TAKE(t->dV, p, cN * D);
    t->bkt = (int32_t *)p, p += up16(cN);
    t->tyi = (int32_t *)p, p += up16(cN);
    TAKE(t->cq, q, (size_t)cB * D), TAKE(t->q, q, (size_t)cB * D), TAKE(t->t, q, (size_t)cB * D);
    TAKE(t->dt, q, (size_t)cB * D), TAKE(t->dq, q, (size_t)cB * D), TAKE(t->dcq, q, (size_t)cB * D);
    q += 3 * up16((size_t)cB * D); /* spare: keeps the count above simple */
    TAKE(t->tlse, q, (size_t)cB * H), TAKE(t->S, q, (size_t)cB * m2 * D), TAKE(t->dS, q, (size_t)cB * m2 * D);
    for (int i = 0; i < t->c.n_blocks; i++) {
        blk *b = &t->b[i];
        if (b->k.kind == EM_SEQB_HSP) {
            TAKE(b->K, p, cN * D), TAKE(b->V, p, cN * D);
            TAKE(b->Z, q, (size_t)cB * m * D), TAKE(b->zlse, q, (size_t)cB * m * H), TAKE(b->Y, q, (size_t)cB * m2 * D);
        } else {
            TAKE(b->Q, p, cN * D), TAKE(b->K, p, cN * D), TAKE(b->V, p, cN * D), TAKE(b->O, p, cN * D);
            TAKE(b->Xout, p, cN * D), TAKE(b->lse, p, cN * H);
        }
    }
#undef TAKE
    EM_ASSERT(p == t->arN + fN && q == t->arB + fB);
    t->capN = cN, t->capB = cB;
    return EM_OK;
}

/* ------------------------------------------------------------------- FLOPs */

/* (query, key) pairs a block visits in a sequence of L events. */
static double block_pairs(const em_seq_block *k, double L) {
    if (L <= 0) return 0;
    if (k->kind == EM_SEQB_SWA) {
        double W = k->window;
        if (k->causal) {
            double a = L < W + 1 ? L : W + 1;
            return a * (a + 1) / 2 + (L - a) * (W + 1);
        }
        double a = W < L - 1 ? W : L - 1;
        return L + 2 * (a * L - a * (a + 1) / 2);
    }
    return k->causal ? L * (L + 1) / 2 : L * L;
}

static double block_flops(const em_seq_cfg *c, const em_seq_block *k, int D, double L) {
    const double d = D, DD = d * d;
    if (k->kind == EM_SEQB_HSP) {
        const double m = c->hsp_m, m2 = c->hsp_m2, kk = c->hsp_k;
        return 2 * 2 * L * DD + 4 * d * m * L + kk * (2 * m2 * m * d + 2 * m2 * DD);
    }
    return 3 * 2 * L * DD + 4 * d * block_pairs(k, L);
}

static double target_flops(int D, double L) { return 2.0 * D * D + 2 * 2 * L * D * D + 4.0 * D * L; }

double em_seq_flops_example(const em_seq_cfg *c, int D, int64_t L) {
    if (!c->num_seq) return 0;
    double f = target_flops(D, (double)L);
    for (int i = 0; i < c->n_blocks; i++) f += block_flops(c, &c->blocks[i], D, (double)L);
    return f;
}

void em_seqtower_stats(const em_seqtower *t, em_seq_stats *out) { *out = t->stats; }
void em_seqtower_stats_reset(em_seqtower *t) { memset(&t->stats, 0, sizeof t->stats); }

static void count_flops(em_seqtower *t) {
    const int64_t *off = t->s->offsets;
    double total = 0;
    for (int b = 0; b < t->B; b++) {
        double L = (double)(off[b + 1] - off[b]);
        for (int i = 0; i < t->c.n_blocks; i++) {
            double f = block_flops(&t->c, &t->c.blocks[i], t->D, L);
            t->stats.block_flops[i] += f;
            total += f;
        }
        double f = target_flops(t->D, L);
        t->stats.block_flops[t->c.n_blocks] += f;
        total += f;
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
        int32_t ty = t->s->type[i] < t->c.num_types - 1 ? t->s->type[i] : t->c.num_types - 1;
        if (ty < 0) ty = 0;
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

/* ---------------------------------------------------------------- forward */

static em_jattn_cfg attn_cfg(const em_seqtower *t, int causal) {
    return (em_jattn_cfg){t->B, t->H, t->dh, t->s->offsets, 0.f, causal};
}

static em_hsp_cfg hsp_cfg(const em_seqtower *t) {
    return (em_hsp_cfg){attn_cfg(t, 0), t->c.hsp_m, t->c.hsp_m2, t->D, t->c.hsp_k};
}

em_status em_seqtower_forward(em_seqtower *t, const em_batch_seq *s, int B, const float *item_w, int64_t rows,
                              const float *query, size_t qstride, float *out, em_pool *pool) {
    if (!s || !item_w || !query || !out || B < 1) return em_errorf(EM_ERR_INVALID, "sequence tower: bad arguments");
    em_status st = em_jagged_check(s->offsets, B);
    if (st) return st;
    const size_t N = (size_t)s->offsets[B], D = (size_t)t->D, m2 = (size_t)t->c.hsp_m2;
    if (N > (size_t)(INT32_MAX / 2)) return em_errorf(EM_ERR_INVALID, "sequence tower: %zu events in one batch", N);
    if (N && (!s->items || !s->age || !s->type)) return em_errorf(EM_ERR_INVALID, "sequence tower: NULL event arrays");
    for (size_t i = 0; i < N; i++)
        if ((uint64_t)s->items[i] >= (uint64_t)rows) {
            int b = 0;
            while (s->offsets[b + 1] <= (int64_t)i) b++;
            return em_errorf(EM_ERR_INVALID, "sequence tower: example %d, event %lld: item %lld out of range [0, %lld)", b,
                             (long long)((int64_t)i - s->offsets[b]), (long long)s->items[i], (long long)rows);
        }
    if ((st = ensure_cap(t, N, B))) return st;
    t->s = s, t->item_w = item_w, t->B = B, t->N = N;
    const int Ni = (int)N, Di = (int)D;
    const float *P = t->P;
    float *X = t->X0;
    if (N) {
        emb_arg ea = {t, NULL};
        em_pool_run(N >= 4096 ? pool : NULL, embed_task, &ea);
    }
    memset(t->S, 0, (size_t)B * m2 * D * sizeof(float));
    for (int i = 0; i < t->c.n_blocks; i++) {
        blk *b = &t->b[i];
        if (b->k.kind == EM_SEQB_HSP) {
            em_hsp_cfg hc = hsp_cfg(t);
            if (N) {
                em_linear_forward(b->K, X, P + b->wk, NULL, Ni, Di, Di, pool);
                em_linear_forward(b->V, X, P + b->wv, NULL, Ni, Di, Di, pool);
                if ((st = em_hsp_forward(b->Y, b->Z, b->zlse, P + b->seeds, b->K, b->V, P + b->ka, P + b->kw, hc, pool)))
                    return st;
            } else {
                memset(b->Y, 0, (size_t)B * m2 * D * sizeof(float));
            }
            em_vadd(t->S, b->Y, (size_t)B * m2 * D);
            continue;
        }
        if (N) {
            em_linear_forward(b->Q, X, P + b->wq, NULL, Ni, Di, Di, pool);
            em_linear_forward(b->K, X, P + b->wk, NULL, Ni, Di, Di, pool);
            em_linear_forward(b->V, X, P + b->wv, NULL, Ni, Di, Di, pool);
            em_jattn_cfg ac = attn_cfg(t, b->k.causal);
            if (b->k.kind == EM_SEQB_JATTN) st = em_jattn_forward(b->O, b->lse, b->Q, b->K, b->V, &ac, pool);
            else if (b->k.kind == EM_SEQB_GDPA) {
                em_gdpa_cfg gc = {ac, b->k.act, 1.0f / (float)t->c.max_len};
                st = em_gdpa_forward(b->O, b->Q, b->K, b->V, &gc, pool);
            } else {
                em_swa_cfg sc = {ac, b->k.window};
                st = em_swa_forward(b->O, b->lse, b->Q, b->K, b->V, &sc, pool);
            }
            if (st) return st;
            for (size_t j = 0; j < N * D; j++) b->Xout[j] = X[j] + b->O[j];
        }
        X = b->Xout;
    }
    t->Xfin = X;
    /* target attention: the candidate's embedding queries the final history */
    for (int b = 0; b < B; b++) memcpy(t->cq + (size_t)b * D, query + (size_t)b * qstride, D * sizeof(float));
    em_linear_forward(t->q, t->cq, P + t->tq, NULL, B, Di, Di, pool);
    if (N) {
        em_linear_forward(t->Kt, X, P + t->tk, NULL, Ni, Di, Di, pool);
        em_linear_forward(t->Vt, X, P + t->tv, NULL, Ni, Di, Di, pool);
        em_jattn_cfg ac = attn_cfg(t, 0);
        if ((st = em_jattn_target_forward(t->t, t->tlse, t->q, t->Kt, t->Vt, &ac, pool))) return st;
    } else {
        memset(t->t, 0, (size_t)B * D * sizeof(float));
    }
    const size_t E = (size_t)t->E;
    for (int b = 0; b < B; b++) {
        float *o = out + (size_t)b * E * D;
        memcpy(o, t->t + (size_t)b * D, D * sizeof(float));
        if (t->has_hsp) memcpy(o + D, t->S + (size_t)b * m2 * D, m2 * D * sizeof(float));
    }
    count_flops(t);
    return EM_OK;
}

/* --------------------------------------------------------------- backward */

em_status em_seqtower_backward(em_seqtower *t, const float *dout, float *dquery, size_t qstride, em_pool *pool) {
    if (!t->s) return em_errorf(EM_ERR_INVALID, "sequence tower: backward without a forward");
    const int B = t->B, Ni = (int)t->N, Di = t->D;
    const size_t N = t->N, D = (size_t)t->D, m2 = (size_t)t->c.hsp_m2, E = (size_t)t->E, ND = N * D;
    const float *P = t->P;
    float *G = t->G;
    em_status st;
    memset(G, 0, t->np * sizeof(float));
    for (int b = 0; b < B; b++) {
        const float *d = dout + (size_t)b * E * D;
        memcpy(t->dt + (size_t)b * D, d, D * sizeof(float));
        if (t->has_hsp) memcpy(t->dS + (size_t)b * m2 * D, d + D, m2 * D * sizeof(float));
    }
    /* target attention */
    memset(t->dq, 0, (size_t)B * D * sizeof(float));
    if (N) {
        memset(t->dK, 0, ND * sizeof(float));
        memset(t->dV, 0, ND * sizeof(float));
        em_jattn_cfg ac = attn_cfg(t, 0);
        if ((st = em_jattn_target_backward(t->dq, t->dK, t->dV, t->dt, t->q, t->Kt, t->Vt, t->t, t->tlse, &ac, pool)))
            return st;
        em_linear_backward_set(t->dX, G + t->tk, NULL, t->dK, t->Xfin, P + t->tk, Ni, Di, Di, pool);
        em_linear_backward(t->dX, G + t->tv, NULL, t->dV, t->Xfin, P + t->tv, Ni, Di, Di, pool);
    }
    em_linear_backward_set(t->dcq, G + t->tq, NULL, t->dq, t->cq, P + t->tq, B, Di, Di, pool);
    for (int b = 0; b < B; b++) em_vadd(dquery + (size_t)b * qstride, t->dcq + (size_t)b * D, D);
    if (!N) return EM_OK;
    /* blocks, last first; dX holds the gradient of the current block's output */
    for (int i = t->c.n_blocks - 1; i >= 0; i--) {
        blk *b = &t->b[i];
        const float *Xin = t->X0;
        for (int j = i - 1; j >= 0; j--)
            if (t->b[j].k.kind != EM_SEQB_HSP) {
                Xin = t->b[j].Xout;
                break;
            }
        if (b->k.kind == EM_SEQB_HSP) {
            memset(t->dK, 0, ND * sizeof(float));
            memset(t->dV, 0, ND * sizeof(float));
            em_hsp_cfg hc = hsp_cfg(t);
            if ((st = em_hsp_backward(G + b->seeds, t->dK, t->dV, G + b->ka, G + b->kw, t->dS, P + b->seeds, b->K, b->V,
                                      P + b->ka, P + b->kw, b->Z, b->zlse, hc, pool)))
                return st;
            em_linear_backward(t->dX, G + b->wk, NULL, t->dK, Xin, P + b->wk, Ni, Di, Di, pool);
            em_linear_backward(t->dX, G + b->wv, NULL, t->dV, Xin, P + b->wv, Ni, Di, Di, pool);
            continue;
        }
        memset(t->dQ, 0, ND * sizeof(float));
        memset(t->dK, 0, ND * sizeof(float));
        memset(t->dV, 0, ND * sizeof(float));
        em_jattn_cfg ac = attn_cfg(t, b->k.causal);
        if (b->k.kind == EM_SEQB_JATTN)
            st = em_jattn_backward(t->dQ, t->dK, t->dV, t->dX, b->Q, b->K, b->V, b->O, b->lse, &ac, pool);
        else if (b->k.kind == EM_SEQB_GDPA) {
            em_gdpa_cfg gc = {ac, b->k.act, 1.0f / (float)t->c.max_len};
            st = em_gdpa_backward(t->dQ, t->dK, t->dV, t->dX, b->Q, b->K, b->V, &gc, pool);
        } else {
            em_swa_cfg sc = {ac, b->k.window};
            st = em_swa_backward(t->dQ, t->dK, t->dV, t->dX, b->Q, b->K, b->V, b->O, b->lse, &sc, pool);
        }
        if (st) return st;
        /* the residual passes dX through; the projections add theirs */
        em_linear_backward(t->dX, G + b->wq, NULL, t->dQ, Xin, P + b->wq, Ni, Di, Di, pool);
        em_linear_backward(t->dX, G + b->wk, NULL, t->dK, Xin, P + b->wk, Ni, Di, Di, pool);
        em_linear_backward(t->dX, G + b->wv, NULL, t->dV, Xin, P + b->wv, Ni, Di, Di, pool);
    }
    emb_arg ea = {t, t->dX};
    em_pool_run(N * D >= 65536 ? pool : NULL, embed_bwd_task, &ea);
    return EM_OK;
}

size_t em_seqtower_item_grads(const em_seqtower *t, const int64_t **items, const float **grads) {
    *items = t->s ? t->s->items : NULL;
    *grads = t->dX;
    return t->s ? t->N : 0;
}
