/*
 * dlrm.c - the DLRM model: bottom MLP, table-batched embeddings, dot interaction,
 * top MLP, BCE loss; one training step = forward, backward, dense optimizer step over
 * the flat parameter block, sparse optimizer fused into the embedding backward.
 *
 * Memory: dense parameters, gradients and optimizer state are three flat blocks with
 * per-layer offsets. Activations and their gradients are kept for the largest batch
 * seen so far (grown on demand, never per step), so a steady-state step allocates
 * nothing. ReLU runs in place on the linear output; its backward masks the upstream
 * gradient in place (out > 0), which needs only the post-activation values.
 *
 * Determinism: every kernel used is bitwise independent of the thread count, and
 * data order is the caller's, so a step is a pure function of (state, batch).
 *
 * Sequence tower (seqtower.c, when cfg.seq.num_seq = 1): between the embedding lookup
 * and the interaction, the tower reads the batch's history, queried by the candidate's
 * pooled embedding (a column of emb_out), and its E output vectors are appended to
 * each example's T pooled ones (embx, B x (T+E) x D); the interaction's backward is
 * split back into demb and the tower's gradient, the tower adds the query's gradient
 * to demb's candidate column, and the sparse step updates the history's item table
 * (its own, or the candidate's: shared_update). Without a tower none of this runs and
 * the buffers, parameter layout and arithmetic are the plain DLRM's.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/simd.h"
#include "ember/nn.h"
#include "model/dlrm_impl.h"

static const int64_t kaggle_rows[26] = {1460,    583,   10131227, 2202608, 305,  24,     12517,
                                        633,     3,     93145,    5683,    8351593, 3194, 27,
                                        14992,   5461306, 10,     5652,    2173, 4,      7046547,
                                        18,      15,    286181,   105,     142572};

em_dlrm_cfg em_dlrm_kaggle(int64_t rows_cap) {
    em_dlrm_cfg c;
    memset(&c, 0, sizeof c);
    c.num_dense = 13;
    c.num_tables = 26;
    for (int t = 0; t < 26; t++) c.rows[t] = rows_cap > 0 && kaggle_rows[t] > rows_cap ? rows_cap : kaggle_rows[t];
    c.dim = 16;
    int bot[] = {13, 512, 256, 64, 16}, top[] = {367, 512, 256, 1};
    c.n_bot = 5;
    memcpy(c.bot, bot, sizeof bot);
    c.n_top = 4;
    memcpy(c.top, top, sizeof top);
    c.pooling = EM_POOL_SUM;
    c.dense_opt = em_optim_default(EM_OPT_SGD, 0.1f);
    c.sparse_opt = em_optim_default(EM_OPT_SGD, 0.1f);
    c.seed = 1;
    return c;
}

int em_parse_layers(const char *s, int *sizes, int max) {
    int n = 0;
    while (*s) {
        if (n == max) return -1;
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v <= 0 || v > (1 << 24)) return -1;
        sizes[n++] = (int)v;
        s = end;
        if (*s == '-' || *s == ',') s++;
        else if (*s) return -1;
    }
    return n;
}

em_status em_dlrm_cfg_validate(const em_dlrm_cfg *c) {
    if (c->num_dense < 1 || c->num_tables < 1 || c->num_tables > EM_DLRM_MAX_TABLES || c->dim < 1)
        return em_errorf(EM_ERR_INVALID, "model: need num_dense >= 1, 1..%d tables, dim >= 1", EM_DLRM_MAX_TABLES);
    for (int t = 0; t < c->num_tables; t++)
        if (c->rows[t] < 1) return em_errorf(EM_ERR_INVALID, "model: table %d has %lld rows", t, (long long)c->rows[t]);
    if (c->n_bot < 2 || c->n_bot > EM_DLRM_MAX_LAYERS + 1 || c->n_top < 2 || c->n_top > EM_DLRM_MAX_LAYERS + 1)
        return em_errorf(EM_ERR_INVALID, "model: bottom and top MLPs need 2..%d sizes", EM_DLRM_MAX_LAYERS + 1);
    if (c->bot[0] != c->num_dense)
        return em_errorf(EM_ERR_INVALID, "model: bottom MLP starts at %d but there are %d dense features", c->bot[0], c->num_dense);
    if (c->bot[c->n_bot - 1] != c->dim)
        return em_errorf(EM_ERR_INVALID, "model: bottom MLP ends at %d but the embedding dim is %d (the dot interaction needs them equal)",
                         c->bot[c->n_bot - 1], c->dim);
    em_status st = em_seq_cfg_validate(&c->seq, c->dim, c->num_tables);
    if (st) return st;
    if (c->seq.num_seq && c->seq.share && c->seq.rows != c->rows[c->seq.cand])
        return em_errorf(EM_ERR_INVALID, "model: the history shares table C%d (%lld rows) but says %lld rows", c->seq.cand + 1,
                         (long long)c->rows[c->seq.cand], (long long)c->seq.rows);
    const int E = em_seq_extra(&c->seq);
    int want = em_dot_interact_out_dim(c->num_tables + E, c->dim);
    if (c->top[0] != want && E)
        return em_errorf(EM_ERR_INVALID,
                         "model: top MLP starts at %d but the interaction of %d tables and %d sequence vectors with dim %d gives %d",
                         c->top[0], c->num_tables, E, c->dim, want);
    if (c->top[0] != want)
        return em_errorf(EM_ERR_INVALID, "model: top MLP starts at %d but the interaction of %d tables with dim %d gives %d",
                         c->top[0], c->num_tables, c->dim, want);
    if (c->top[c->n_top - 1] != 1) return em_errorf(EM_ERR_INVALID, "model: top MLP must end in 1 output (the logit)");
    for (int i = 0; i < c->n_bot; i++) if (c->bot[i] < 1) return em_errorf(EM_ERR_INVALID, "model: bad bottom layer size");
    for (int i = 0; i < c->n_top; i++) if (c->top[i] < 1) return em_errorf(EM_ERR_INVALID, "model: bad top layer size");
    if (c->dense_opt.kind == EM_OPT_ROWWISE_ADAGRAD)
        return em_errorf(EM_ERR_INVALID, "model: row-wise AdaGrad is for embeddings; pick sgd, adagrad, adam or adamw for dense");
    if (c->sparse_opt.kind == EM_OPT_ADAM || c->sparse_opt.kind == EM_OPT_ADAMW)
        return em_errorf(EM_ERR_INVALID, "model: sparse optimizer must be sgd, adagrad or rowwise_adagrad");
    return em__tables_validate(c);
}

static void free_acts(em_dlrm *m) {
    em_free(m->acts);
    m->acts = NULL;
    for (int l = 0; l < 2 * EM_DLRM_MAX_LAYERS; l++) m->x[l] = m->dx[l] = NULL;
    m->inter = m->dinter = m->emb_out = m->demb = NULL;
    m->embx = m->dembx = m->extra = m->dextra = NULL;
    m->coff = NULL;
    m->cap = 0;
}

void em_dlrm_free(em_dlrm *m) {
    if (!m) return;
    free_acts(m);
    em_free(m->params);
    em_free(m->grads);
    em_free(m->state);
    if (m->tab) m->tab->destroy(m);
    em_seqtower_free(m->seq);
    em_embbag_free(m->seq_emb);
    em_free(m->cidx), em_free(m->cpw), em_free(m->prow), em_free(m->pgrad);
    em_free(m);
}

static em_status ensure_cap(em_dlrm *m, int B) {
    if (B <= m->cap) return EM_OK;
    free_acts(m);
    /* every buffer in one block, each 64-byte aligned: huge pages can then cover
     * nearly all of it (the kernels stream through these every step) */
    const size_t TD = (size_t)m->cfg.num_tables * (size_t)m->cfg.dim, W = (size_t)m->cfg.top[0], b = (size_t)B;
    const size_t FD = m->seq ? (size_t)m->F * (size_t)m->cfg.dim : 0, ED = m->seq ? FD - TD : 0;
    size_t n[2 * EM_DLRM_MAX_LAYERS * 2 + 9], k = 0, total = 0;
    for (int l = 0; l < m->n_layers; l++) n[k++] = b * (size_t)m->L[l].out * 4, n[k++] = b * (size_t)m->L[l].out * 4;
    n[k++] = b * W * 4, n[k++] = b * W * 4, n[k++] = b * TD * 4, n[k++] = b * TD * 4;
    if (m->seq) n[k++] = b * FD * 4, n[k++] = b * FD * 4, n[k++] = b * ED * 4, n[k++] = b * ED * 4,
                n[k++] = (b * (size_t)m->cfg.num_tables + 1) * 8;
    for (size_t i = 0; i < k; i++) total += (n[i] + 63) / 64 * 64;
    char *p = em_malloc(total + 64);
    if (!p) goto nomem;
    m->acts = (float *)p;
    em_advise_huge(p, total + 64);
    p = (char *)(((uintptr_t)p + 63) & ~(uintptr_t)63);
    k = 0;
#define TAKE(dst, type) (dst = (type *)p, p += (n[k++] + 63) / 64 * 64)
    for (int l = 0; l < m->n_layers; l++) TAKE(m->x[l], float), TAKE(m->dx[l], float);
    TAKE(m->inter, float), TAKE(m->dinter, float), TAKE(m->emb_out, float), TAKE(m->demb, float);
    if (m->seq) TAKE(m->embx, float), TAKE(m->dembx, float), TAKE(m->extra, float), TAKE(m->dextra, float), TAKE(m->coff, int64_t);
#undef TAKE
    m->cap = B;
    return EM_OK;
nomem:
    free_acts(m);
    return em_errorf(EM_ERR_NOMEM, "model: no memory for the activations of a batch of %d", B);
}

em_status em__dlrm_create_raw(em_dlrm **out, const em_dlrm_cfg *cfg, int fresh, em_pool *pool) {
    *out = NULL;
    em_status st = em_dlrm_cfg_validate(cfg);
    if (st) return st;
    em_dlrm *m = em_calloc(1, sizeof *m);
    if (!m) return EM_ERR_NOMEM;
    m->cfg = *cfg;
    int n = 0;
    for (int i = 0; i + 1 < cfg->n_bot; i++, n++) m->L[n] = (layer){0, 0, cfg->bot[i], cfg->bot[i + 1]};
    m->n_botl = n;
    for (int i = 0; i + 1 < cfg->n_top; i++, n++) m->L[n] = (layer){0, 0, cfg->top[i], cfg->top[i + 1]};
    m->n_layers = n;
    size_t off = 0;
    for (int l = 0; l < n; l++) {
        m->L[l].w = off;
        off += (size_t)m->L[l].in * (size_t)m->L[l].out;
        m->L[l].b = off;
        off += (size_t)m->L[l].out;
    }
    m->n_mlp = off;
    off += em_seq_num_params(&cfg->seq, cfg->dim);
    m->n_params = off;
    m->F = cfg->num_tables + em_seq_extra(&cfg->seq);
    int spp = em_optim_state_per_param(cfg->dense_opt.kind);
    m->params = em_calloc(off, sizeof(float));
    m->grads = em_calloc(off, sizeof(float));
    m->state = spp ? em_malloc(off * (size_t)spp * sizeof(float)) : NULL;
    if (!m->params || !m->grads || (spp && !m->state)) {
        em_dlrm_free(m);
        return em_errorf(EM_ERR_NOMEM, "model: no memory for %zu dense parameters", off);
    }
    for (size_t i = 0; i < off * (size_t)spp; i++)
        m->state[i] = cfg->dense_opt.kind == EM_OPT_ADAGRAD ? cfg->dense_opt.init_accum : 0.f;
    m->tab = em__tables_ops_for(cfg->tables.kind);
    if ((st = m->tab->create(m, fresh, pool))) {
        em_dlrm_free(m);
        return st;
    }
    if (cfg->seq.num_seq) {
        if ((st = em_seqtower_create(&m->seq, &cfg->seq, cfg->dim, m->params + m->n_mlp, m->grads + m->n_mlp))) {
            em_dlrm_free(m);
            return st;
        }
        em_embbag_cfg hc = {1, &cfg->seq.rows, cfg->dim, EM_POOL_SUM, cfg->sparse_opt};
        if (!cfg->seq.share && (st = em_embbag_create(&m->seq_emb, &hc))) {
            em_dlrm_free(m);
            return st;
        }
    }
    *out = m;
    return EM_OK;
}

em_status em_dlrm_create(em_dlrm **out, const em_dlrm_cfg *cfg, em_pool *pool) {
    em_status st = em__dlrm_create_raw(out, cfg, 1, pool); /* tables initialised there */
    if (st) return st;
    em_dlrm *m = *out;
    /* DLRM reference init; each layer draws from its own stream. */
    for (int l = 0; l < m->n_layers; l++) {
        em_rng r;
        em_rng_seed(&r, em_mix64(cfg->seed * 1000003u + (uint64_t)l));
        double sw = sqrt(2.0 / (m->L[l].in + m->L[l].out)), sb = sqrt(1.0 / m->L[l].out);
        size_t nw = (size_t)m->L[l].in * (size_t)m->L[l].out;
        for (size_t i = 0; i < nw; i++) m->params[m->L[l].w + i] = (float)(sw * em_rng_normal(&r));
        for (int i = 0; i < m->L[l].out; i++) m->params[m->L[l].b + i] = (float)(sb * em_rng_normal(&r));
    }
    if (m->seq) em_seqtower_init(m->seq, cfg->seed);
    if (m->seq_emb) em_embbag_init_uniform(m->seq_emb, em_mix64(cfg->seed ^ 0x5e9717e5u), pool);
    return EM_OK;
}

const em_dlrm_cfg *em_dlrm_config(const em_dlrm *m) { return &m->cfg; }
int64_t em_dlrm_step_count(const em_dlrm *m) { return m->step; }
em_embbag *em_dlrm_embbag(em_dlrm *m) { return m->emb; }
em_seqtower *em_dlrm_seqtower(em_dlrm *m) { return m->seq; }

void em_dlrm_release_tables(em_dlrm *m) {
    em_embbag_free(m->emb);
    m->emb = NULL;
}

size_t em_dlrm_state_bytes(const em_dlrm *m) {
    size_t n = m->n_params * (size_t)(2 + em_optim_state_per_param(m->cfg.dense_opt.kind));
    for (int t = 0; m->emb && t < m->cfg.num_tables; t++) {
        size_t cnt = 0;
        em_embbag_state(m->emb, t, &cnt);
        n += (size_t)m->cfg.rows[t] * (size_t)m->cfg.dim + cnt;
    }
    if (m->seq_emb) {
        size_t cnt = 0;
        em_embbag_state(m->seq_emb, 0, &cnt);
        n += (size_t)m->cfg.seq.rows * (size_t)m->cfg.dim + cnt;
    }
    size_t other = 0;
    if (m->cfg.tables.kind != EM_TABLES_DENSE) {
        em_dlrm_table_stats ts;
        m->tab->stats(m, -1, &ts);
        other = ts.bytes;
    }
    return n * sizeof(float) + other;
}
const float *em_dlrm_interaction(const em_dlrm *m) { return m->inter; }

void em_dlrm_set_lr(em_dlrm *m, float dense_lr, float sparse_lr) {
    m->cfg.dense_opt.lr = dense_lr;
    m->cfg.sparse_opt.lr = sparse_lr;
    m->tab->set_lr(m, sparse_lr);
    if (m->seq_emb) em_embbag_set_lr(m->seq_emb, sparse_lr);
}

static em_status check_batch(const em_dlrm *m, const em_batch *b) {
    if (b->B < 1) return em_errorf(EM_ERR_INVALID, "model: empty batch");
    if (b->num_dense != m->cfg.num_dense || b->num_sparse != m->cfg.num_tables)
        return em_errorf(EM_ERR_INVALID, "model: batch has %d dense / %d sparse features, the model expects %d / %d",
                         b->num_dense, b->num_sparse, m->cfg.num_dense, m->cfg.num_tables);
    if (m->seq && (b->num_seq < 1 || !b->seq))
        return em_errorf(EM_ERR_INVALID, "model: the model reads a sequence feature (a history column) the batch does not have");
    return EM_OK;
}

static const float *layer_in(const em_dlrm *m, int l) {
    return l == 0 ? m->dense_in : l == m->n_botl ? m->inter : m->x[l - 1];
}
static float *layer_din(em_dlrm *m, int l) { return l == 0 ? NULL : l == m->n_botl ? m->dinter : m->dx[l - 1]; }

/* Layers [lo, hi) as an em_mlp_layer chain (the bottom or the top MLP). */
static void mlp_layers(em_dlrm *m, int lo, int hi, em_mlp_layer *out) {
    for (int l = lo; l < hi; l++) {
        const layer *L = &m->L[l];
        out[l - lo] = (em_mlp_layer){.I = L->in, .O = L->out, .relu = l != m->n_layers - 1, .W = m->params + L->w,
                                     .b = m->params + L->b, .out = m->x[l], .dW = m->grads + L->w, .db = m->grads + L->b,
                                     .din = layer_din(m, l)};
    }
}

/* The sequence tower's forward: the history of b, queried by the candidate's pooled
 * embedding (a column of emb), gives extra (B, E, D); embx = [emb, extra] per example,
 * the F = T + E vectors of the interaction. */
static em_status seq_forward(em_dlrm *m, const em_batch *b, const float *emb, em_pool *pool) {
    const em_seq_cfg *sc = &m->cfg.seq;
    const size_t D = (size_t)m->cfg.dim, TD = (size_t)m->cfg.num_tables * D, ED = (size_t)(m->F - m->cfg.num_tables) * D;
    const float *items;
    int64_t rows;
    if (sc->share) {
        if (!m->emb)
            return em_errorf(EM_ERR_INVALID, "model: the history shares table C%d, whose fp32 rows were released", sc->cand + 1);
        items = em_embbag_weights(m->emb, sc->cand), rows = m->cfg.rows[sc->cand];
    } else {
        items = em_embbag_weights(m->seq_emb, 0), rows = sc->rows;
    }
    em_status st = em_seqtower_forward(m->seq, &b->seq[0], b->B, items, rows, emb + (size_t)sc->cand * D, TD, m->extra, pool);
    if (st) return st;
    for (size_t i = 0; i < (size_t)b->B; i++) {
        memcpy(m->embx + i * (TD + ED), emb + i * TD, TD * sizeof(float));
        memcpy(m->embx + i * (TD + ED) + TD, m->extra + i * ED, ED * sizeof(float));
    }
    return EM_OK;
}

/* pooled: the (B, T, D) embeddings computed by the caller (inference with other
 * tables), or NULL to pool the model's own tables into emb_out; train: a training
 * forward (dynamic tables insert the batch's new ids), else nothing in the tables
 * changes. */
static em_status forward(em_dlrm *m, const em_batch *b, const float *pooled, int train, em_pool *pool) {
    em_status st = check_batch(m, b);
    if (st || (st = ensure_cap(m, b->B))) return st;
    const int B = b->B;
    m->dense_in = b->dense;
    if (!pooled && (st = m->tab->forward(m, b, m->emb_out, train, pool))) return st;
    const float *emb = pooled ? pooled : m->emb_out;
    int F = m->cfg.num_tables;
    if (m->seq) {
        if ((st = seq_forward(m, b, emb, pool))) return st;
        emb = m->embx, F = m->F;
    }
    /* the bottom MLP, the interaction, the top MLP; ReLU after every layer but the last */
    em_mlp_layer ml[2 * EM_DLRM_MAX_LAYERS];
    mlp_layers(m, 0, m->n_botl, ml);
    em_mlp_forward(ml, m->n_botl, m->dense_in, B, pool);
    em_dot_interact_forward(m->inter, m->x[m->n_botl - 1], emb, B, F, m->cfg.dim, pool);
    mlp_layers(m, m->n_botl, m->n_layers, ml);
    em_mlp_forward(ml, m->n_layers - m->n_botl, m->inter, B, pool);
    return EM_OK;
}

/* Elementwise passes over activation-sized buffers, split over the pool in 64-byte
 * units: zeroing gradient buffers, and ReLU backward in place (the upstream gradient
 * survives where the output is > 0). Memory-bound, so both cores help. */
typedef struct {
    float *d;
    const float *out; /* NULL: zero d */
    size_t n;
} ew_arg;

static void ew_task(void *p, int ith, int nth) {
    const ew_arg *a = p;
    size_t lo, hi;
    em_split((a->n + 15) / 16, ith, nth, &lo, &hi);
    lo *= 16, hi *= 16;
    if (hi > a->n) hi = a->n;
    if (lo >= hi) return;
    if (a->out) em_vrelu_mask(a->d + lo, a->out + lo, hi - lo);
    else memset(a->d + lo, 0, (hi - lo) * sizeof(float));
}

static void zero_par(float *d, size_t n, em_pool *pool) {
    ew_arg a = {d, NULL, n};
    em_pool_run(n >= 65536 ? pool : NULL, ew_task, &a);
}

static void relu_mask(float *d, const float *out, size_t n, em_pool *pool) {
    ew_arg a = {d, out, n};
    em_pool_run(n >= 65536 ? pool : NULL, ew_task, &a);
}

/* Backward of the dense part (and the sequence tower's); leaves the pooled-embedding
 * gradient in demb. */
static em_status backward(em_dlrm *m, const em_batch *b, const em_dlrm_head_hook *hook, em_dlrm_grad_ready_fn ready,
                          void *ud, em_pool *pool) {
    const int B = b->B, n = m->n_layers;
    const size_t TD = (size_t)m->cfg.num_tables * (size_t)m->cfg.dim;
    /* Every dense gradient, dinter and each dx[l] but two is written exactly once per
     * step by a linear backward in overwrite mode, so only the buffers that are
     * accumulated into need zeroing: the logit gradient (BCE), the bottom output's and
     * the embeddings' (dot interaction). */
    zero_par(m->dx[n - 1], (size_t)B, pool);
    em_bce_logits_backward(m->dx[n - 1], m->x[n - 1], b->label, (size_t)B, 1.0f / (float)B);
    const float *dh = NULL; /* a head hook's gradient into the last layer's input (ember/dlrm.h) */
    if (hook) {
        em_status hs = hook->fn(hook->ud, b, layer_in(m, n - 1), m->L[n - 1].in, m->x[n - 1], m->dx[n - 1], &dh, pool);
        if (hs) return hs;
    }
    if (!dh && !ready && !m->seq) {
        /* the top MLP as one chain, the interaction (writing the bottom output's and
         * the embeddings' gradients, no zeroing pass), the bottom MLP as one chain;
         * the layer-by-layer loop below is for the hooks and the tower */
        em_mlp_layer ml[2 * EM_DLRM_MAX_LAYERS];
        mlp_layers(m, m->n_botl, n, ml);
        em_mlp_backward(ml, n - m->n_botl, m->inter, m->dx[n - 1], B, pool);
        em_dot_interact_backward_set(m->dx[m->n_botl - 1], m->demb, m->dinter, m->x[m->n_botl - 1], m->emb_out, B,
                                     m->cfg.num_tables, m->cfg.dim, pool);
        relu_mask(m->dx[m->n_botl - 1], m->x[m->n_botl - 1], (size_t)B * (size_t)m->L[m->n_botl - 1].out, pool);
        mlp_layers(m, 0, m->n_botl, ml);
        em_mlp_backward(ml, m->n_botl, m->dense_in, m->dx[m->n_botl - 1], B, pool);
        return EM_OK;
    }
    zero_par(m->dx[m->n_botl - 1], (size_t)B * (size_t)m->cfg.dim, pool);
    if (m->seq) zero_par(m->dembx, (size_t)B * (size_t)m->F * (size_t)m->cfg.dim, pool);
    else zero_par(m->demb, (size_t)B * TD, pool);
    int premasked = 0; /* dx[l] came masked from the layer above's backward */
    for (int l = n - 1; l >= 0; l--) {
        const layer *L = &m->L[l];
        if (l != n - 1 && !premasked) relu_mask(m->dx[l], m->x[l], (size_t)B * (size_t)L->out, pool);
        /* Where this layer's input is the ReLU output of the layer below in the same
         * MLP, that layer's ReLU backward is fused into din (not under a head hook,
         * whose gradient is added to din afterwards). */
        const int fuse = l > 0 && l != m->n_botl && !(l == n - 1 && dh);
        (fuse ? em_linear_backward_set_relu_in : em_linear_backward_set)(layer_din(m, l), m->grads + L->w,
                                                                           m->grads + L->b, m->dx[l], layer_in(m, l),
                                                                           m->params + L->w, B, L->in, L->out, pool);
        premasked = fuse;
        if (ready) ready(ud, L->w, L->b + (size_t)L->out);
        if (l == n - 1 && dh) {
            float *din = layer_din(m, l);
            for (size_t i = 0; i < (size_t)B * (size_t)L->in; i++) din[i] += dh[i];
        }
        if (l == m->n_botl && !m->seq)
            em_dot_interact_backward(m->dx[l - 1], m->demb, m->dinter, m->x[l - 1], m->emb_out, B, m->cfg.num_tables,
                                     m->cfg.dim, pool);
        else if (l == m->n_botl)
            em_dot_interact_backward(m->dx[l - 1], m->dembx, m->dinter, m->x[l - 1], m->embx, B, m->F, m->cfg.dim, pool);
    }
    if (!m->seq) return EM_OK;
    /* split [demb, dextra]; the tower adds the query's gradient to the candidate's */
    const size_t ED = (size_t)(m->F - m->cfg.num_tables) * (size_t)m->cfg.dim;
    for (size_t i = 0; i < (size_t)B; i++) {
        memcpy(m->demb + i * TD, m->dembx + i * (TD + ED), TD * sizeof(float));
        memcpy(m->dextra + i * ED, m->dembx + i * (TD + ED) + TD, ED * sizeof(float));
    }
    return em_seqtower_backward(m->seq, m->dextra, m->demb + (size_t)m->cfg.seq.cand * (size_t)m->cfg.dim, TD, pool);
}

em_status em_dlrm_forward(em_dlrm *m, const em_batch *b, float *logits, em_pool *pool) {
    em_status st = forward(m, b, NULL, 0, pool);
    if (st) return st;
    memcpy(logits, m->x[m->n_layers - 1], (size_t)b->B * sizeof(float));
    return EM_OK;
}

em_status em_dlrm_forward_with(em_dlrm *m, const em_batch *b, const float *pooled, float *logits, em_pool *pool) {
    if (!pooled) return em_errorf(EM_ERR_INVALID, "model: forward_with needs the pooled embeddings");
    em_status st = forward(m, b, pooled, 0, pool);
    if (st) return st;
    memcpy(logits, m->x[m->n_layers - 1], (size_t)b->B * sizeof(float));
    return EM_OK;
}

static em_status forward_backward(em_dlrm *m, const em_batch *b, const em_dlrm_head_hook *hook, double *loss,
                                  em_pool *pool);

em_status em_dlrm_forward_backward(em_dlrm *m, const em_batch *b, double *loss, em_pool *pool) {
    return forward_backward(m, b, NULL, loss, pool);
}

static em_status forward_backward(em_dlrm *m, const em_batch *b, const em_dlrm_head_hook *hook, double *loss,
                                  em_pool *pool) {
    em_status st = forward(m, b, NULL, 1, pool);
    if (st) return st;
    if (loss) *loss = em_bce_logits_forward(m->x[m->n_layers - 1], b->label, (size_t)b->B);
    return backward(m, b, hook, NULL, NULL, pool);
}

/* Grow an array of `size`-byte elements to hold n (by half again). */
static em_status grow(void **p, size_t *cap, size_t n, size_t size) {
    if (n <= *cap && *p) return EM_OK;
    size_t c = n + n / 2 + 64;
    void *q = em_malloc(c * size);
    if (!q) return em_errorf(EM_ERR_NOMEM, "model: no memory for %zu sparse gradient entries", c);
    em_free(*p);
    *p = q, *cap = c;
    return EM_OK;
}

/* The sparse step when the history shares the candidate's table c: every other table
 * through the fused embedding backward (the batch with table c's bags taken out), then
 * table c from its (row, gradient) pairs, the candidate bags' first in batch order,
 * the history's events after them, each touched row updated once (as one parameter
 * with the summed gradient, which is what PyTorch does with a shared table). */
static em_status shared_update(em_dlrm *m, const em_batch *b, em_pool *pool) {
    const int T = m->cfg.num_tables, B = b->B, c = m->cfg.seq.cand;
    const size_t D = (size_t)m->cfg.dim, TB = (size_t)T * (size_t)B;
    const int64_t *off = b->offsets;
    const size_t nnz = (size_t)off[TB], lo = (size_t)off[(size_t)c * B], hi = (size_t)off[(size_t)(c + 1) * B],
                 nc = hi - lo;
    const int64_t *items;
    const float *hgrad;
    const size_t nh = em_seqtower_item_grads(m->seq, &items, &hgrad);
    em_status st;
    if ((st = grow((void **)&m->cidx, &m->cap_cidx, nnz - nc, sizeof(int64_t))) ||
        (b->per_id_w && (st = grow((void **)&m->cpw, &m->cap_cpw, nnz - nc, sizeof(float)))) ||
        (st = grow((void **)&m->prow, &m->cap_pairs, nc + nh, sizeof(int64_t))) ||
        (st = grow((void **)&m->pgrad, &m->cap_pgrad, (nc + nh) * D, sizeof(float))))
        return st;
    memcpy(m->cidx, b->indices, lo * sizeof(int64_t));
    memcpy(m->cidx + lo, b->indices + hi, (nnz - hi) * sizeof(int64_t));
    if (b->per_id_w) {
        memcpy(m->cpw, b->per_id_w, lo * sizeof(float));
        memcpy(m->cpw + lo, b->per_id_w + hi, (nnz - hi) * sizeof(float));
    }
    for (size_t u = 0; u <= TB; u++)
        m->coff[u] = u <= (size_t)c * B ? off[u] : u <= (size_t)(c + 1) * B ? (int64_t)lo : off[u] - (int64_t)nc;
    if ((st = em_embbag_backward_update(m->emb, m->demb, m->cidx, m->coff, b->per_id_w ? m->cpw : NULL, NULL, B, pool)))
        return st;
    size_t j = 0;
    for (int e = 0; e < B; e++) {
        const int64_t k0 = off[(size_t)c * B + e], k1 = off[(size_t)c * B + e + 1];
        const float *g = m->demb + ((size_t)e * (size_t)T + (size_t)c) * D;
        const float inv = m->cfg.pooling == EM_POOL_MEAN && k1 > k0 ? 1.0f / (float)(k1 - k0) : 1.0f;
        for (int64_t k = k0; k < k1; k++, j++) {
            const float sc = b->per_id_w ? inv * b->per_id_w[k] : inv;
            m->prow[j] = b->indices[k];
            for (size_t d = 0; d < D; d++) m->pgrad[j * D + d] = sc * g[d];
        }
    }
    memcpy(m->prow + nc, items, nh * sizeof(int64_t));
    memcpy(m->pgrad + nc * D, hgrad, nh * D * sizeof(float));
    return em_embbag_update_rows(m->emb, c, m->prow, m->pgrad, nc + nh, pool);
}

em_status em_dlrm_train_step(em_dlrm *m, const em_batch *b, double *loss, em_pool *pool) {
    return em_dlrm_train_step_hook(m, b, NULL, loss, pool);
}

em_status em_dlrm_train_step_hook(em_dlrm *m, const em_batch *b, const em_dlrm_head_hook *hook, double *loss,
                                  em_pool *pool) {
    em_status st = forward_backward(m, b, hook, loss, pool);
    if (st) return st;
    if (m->seq && m->cfg.seq.share) st = shared_update(m, b, pool);
    else st = m->tab->backward_update(m, b, m->demb, pool);
    if (st) return st;
    if (m->seq_emb) {
        const int64_t *items;
        const float *g;
        size_t n = em_seqtower_item_grads(m->seq, &items, &g);
        if ((st = em_embbag_update_rows(m->seq_emb, 0, items, g, n, pool))) return st;
    }
    m->step++;
    if ((st = em_optim_dense_step(&m->cfg.dense_opt, m->params, m->grads, m->state, m->n_params, m->step, pool)))
        return st;
    return m->tab->end_step(m, pool);
}

/* ------------------------------------------------------------ distributed (src/dist) */

em_status em_dlrm_dense_backward_with(em_dlrm *m, const em_batch *b, const float *pooled, float *dpooled,
                                      double *loss, em_pool *pool) {
    return em_dlrm_dense_backward_ready(m, b, pooled, dpooled, loss, NULL, NULL, pool);
}

int em_dlrm_layer_offsets(const em_dlrm *m, size_t *lo) {
    for (int l = 0; l < m->n_layers; l++) lo[l] = m->L[l].w;
    lo[m->n_layers] = m->n_mlp;
    return m->n_layers;
}

em_status em_dlrm_dense_backward_ready(em_dlrm *m, const em_batch *b, const float *pooled, float *dpooled,
                                       double *loss, em_dlrm_grad_ready_fn ready, void *ud, em_pool *pool) {
    if (m->seq) return em_errorf(EM_ERR_UNSUPPORTED, "model: distributed training of a sequence model is not supported");
    if (!pooled || !dpooled) return em_errorf(EM_ERR_INVALID, "model: dense_backward_with needs pooled and dpooled");
    em_status st = check_batch(m, b);
    if (st || (st = ensure_cap(m, b->B))) return st;
    const size_t n = (size_t)b->B * (size_t)m->cfg.num_tables * (size_t)m->cfg.dim;
    memcpy(m->emb_out, pooled, n * sizeof(float)); /* the interaction's backward reads its input there */
    if ((st = forward(m, b, m->emb_out, 1, pool))) return st;
    if (loss) *loss = em_bce_logits_forward(m->x[m->n_layers - 1], b->label, (size_t)b->B);
    if ((st = backward(m, b, NULL, ready, ud, pool))) return st;
    memcpy(dpooled, m->demb, n * sizeof(float));
    return EM_OK;
}

em_status em_dlrm_dense_step(em_dlrm *m, em_pool *pool) {
    m->step++;
    return em_optim_dense_step(&m->cfg.dense_opt, m->params, m->grads, m->state, m->n_params, m->step, pool);
}

float *em_dlrm_dense_block(em_dlrm *m, int which, size_t *n) {
    if (n) *n = which == 2 ? (m->state ? m->n_params * (size_t)em_optim_state_per_param(m->cfg.dense_opt.kind) : 0) : m->n_params;
    return which == 0 ? m->params : which == 1 ? m->grads : m->state;
}

void em_dlrm_set_step(em_dlrm *m, int64_t step) { m->step = step; }

/* ------------------------------------------------------------ named access */

static int parse_param_name(const em_dlrm *m, const char *name, int *layer_out, int *is_bias, int *table) {
    int i, off;
    char kind[8];
    *table = -1;
    if (sscanf(name, "emb.%d.weight%n", &i, &off) == 1 && name[off] == 0) {
        if (i < 0 || i >= m->cfg.num_tables) return 0;
        *table = i;
        return 1;
    }
    if (sscanf(name, "bot.%d.%7[a-z]%n", &i, kind, &off) == 2 && name[off] == 0) {
        if (i < 0 || i >= m->n_botl) return 0;
        *layer_out = i;
    } else if (sscanf(name, "top.%d.%7[a-z]%n", &i, kind, &off) == 2 && name[off] == 0) {
        if (i < 0 || i >= m->n_layers - m->n_botl) return 0;
        *layer_out = m->n_botl + i;
    } else
        return 0;
    if (strcmp(kind, "weight") == 0) *is_bias = 0;
    else if (strcmp(kind, "bias") == 0) *is_bias = 1;
    else return 0;
    return 1;
}

/* "seq.items.weight" (the tower's own item table) and the tower's dense tensors. */
static float *seq_param(em_dlrm *m, const char *name, int grad, size_t *numel) {
    if (strcmp(name, "seq.items.weight") == 0) {
        if (grad || !m->seq_emb) return NULL;
        if (numel) *numel = (size_t)m->cfg.seq.rows * (size_t)m->cfg.dim;
        return em_embbag_weights(m->seq_emb, 0);
    }
    const em_seq_param *p;
    int n = em_seqtower_params(m->seq, &p);
    for (int i = 0; i < n; i++)
        if (strcmp(p[i].name, name) == 0) {
            if (numel) *numel = (size_t)p[i].shape[0] * (size_t)p[i].shape[1] * (size_t)(p[i].ndim == 3 ? p[i].shape[2] : 1);
            return (grad ? m->grads : m->params) + m->n_mlp + p[i].off;
        }
    return NULL;
}

float *em_dlrm_param(em_dlrm *m, const char *name, int grad, size_t *numel) {
    int l = 0, bias = 0, t;
    if (m->seq && strncmp(name, "seq.", 4) == 0) return seq_param(m, name, grad, numel);
    if (!parse_param_name(m, name, &l, &bias, &t)) return NULL;
    if (t >= 0) {
        if (grad || !m->emb) return NULL; /* never materialised, or released */
        if (numel) *numel = (size_t)m->cfg.rows[t] * (size_t)m->cfg.dim;
        return em_embbag_weights(m->emb, t);
    }
    const layer *L = &m->L[l];
    if (numel) *numel = bias ? (size_t)L->out : (size_t)L->in * (size_t)L->out;
    return (grad ? m->grads : m->params) + (bias ? L->b : L->w);
}
