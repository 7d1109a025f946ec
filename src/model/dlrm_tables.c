/*
 * dlrm_tables.c - the DLRM's embedding backends: one em__tables_ops per
 * em_table_kind, the only code of the model that knows which table object it has.
 *
 *   dense    em_embbag: the original path, call for call (results and checkpoint
 *            layout are bitwise what they were before backends existed); its tensors
 *            "emb.{t}.weight" / "optim.emb.{t}" are listed by dlrm_io.c.
 *   dynamic  em_dyn: the batch's indices are the reader's raw 64-bit ids (rows[t] =
 *            EM_ROWS_RAW), read as uint64; a training forward inserts, an evaluation
 *            forward only reads; the backward ends the table's step (eviction).
 *   fiited   em_fiited: after every prune_every-th step (m->step, counted from the
 *            start of training and restored by a checkpoint, so a resumed run prunes
 *            at the same steps) the chunks are pruned to the budget and the pool
 *            compacted.
 *   ssd      em_ssd: raw ids as dynamic; the live RocksDB in ssd_dir/live-<pid>-<n>
 *            (scratch); a checkpoint PATH writes the tables to the directory PATH.ssd
 *            first (em_ssd_save) and records their step as "ember.ssd_step" in PATH,
 *            which a load checks, so a crash between the two is refused, not mixed.
 * Adding a kind: one more ops table below, one more case in em__tables_ops_for and
 * em__tables_validate, and its fields in em_tables_cfg and the configuration JSON.
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/dlrm_impl.h"

static const char *kind_names[] = {"dense", "dynamic", "fiited", "ssd"};

const char *em_table_kind_name(em_table_kind k) {
    return (unsigned)k < sizeof kind_names / sizeof kind_names[0] ? kind_names[k] : "?";
}

em_status em_table_kind_parse(const char *s, em_table_kind *k) {
    for (int i = 0; i < (int)(sizeof kind_names / sizeof kind_names[0]); i++)
        if (s && strcmp(s, kind_names[i]) == 0) {
            *k = (em_table_kind)i;
            return EM_OK;
        }
    return em_errorf(EM_ERR_INVALID, "unknown table kind '%s' (dense, dynamic, fiited, ssd)", s ? s : "");
}

em_tables_cfg em_tables_default(em_table_kind kind, int dim) {
    em_tables_cfg c;
    memset(&c, 0, sizeof c);
    c.kind = kind;
    if (kind == EM_TABLES_DENSE) return c;
    c.init_scale = 0.01f;
    c.admit = EM_DYN_ADMIT_ALWAYS;
    c.admit_min_count = 1;
    c.admit_prob = 1.0f;
    c.evict = EM_DYN_EVICT_AGE;
    c.chunks = dim % 4 == 0 ? 4 : 1;
    c.prune_every = 1000;
    c.util_decay = 0.9f;
    c.ssd_cache_bytes = (int64_t)256 << 20;
    return c;
}

em_status em__tables_validate(const em_dlrm_cfg *c) {
    const em_tables_cfg *tc = &c->tables;
    int raw = 0;
    for (int t = 0; t < c->num_tables; t++) raw += c->rows[t] == EM_ROWS_RAW;
    switch (tc->kind) {
    case EM_TABLES_DENSE:
        if (raw) return em_errorf(EM_ERR_INVALID, "model: raw-id rows (EM_ROWS_RAW) need dynamic tables");
        return EM_OK;
    case EM_TABLES_DYNAMIC:
        if (raw != c->num_tables)
            return em_errorf(EM_ERR_INVALID, "model: dynamic tables take raw 64-bit ids: every rows[t] must be EM_ROWS_RAW");
        if (tc->admit == EM_DYN_ADMIT_COUNT && tc->admit_min_count < 1)
            return em_errorf(EM_ERR_INVALID, "model: tables.admit_min_count must be >= 1");
        if (tc->admit == EM_DYN_ADMIT_PROB && !(tc->admit_prob >= 0 && tc->admit_prob <= 1))
            return em_errorf(EM_ERR_INVALID, "model: tables.admit_prob must be in [0, 1]");
        if ((unsigned)tc->admit > EM_DYN_ADMIT_PROB || (unsigned)tc->evict > EM_DYN_EVICT_LFU)
            return em_errorf(EM_ERR_INVALID, "model: unknown tables.admit or tables.evict");
        if (tc->max_rows < 0 || tc->max_bytes < 0 || !(tc->evict_slack >= 0 && tc->evict_slack <= 0.5f))
            return em_errorf(EM_ERR_INVALID, "model: tables.max_rows/max_bytes >= 0 and evict_slack in [0, 0.5]");
        break;
    case EM_TABLES_SSD:
        if (raw != c->num_tables)
            return em_errorf(EM_ERR_INVALID, "model: SSD tables take raw 64-bit ids: every rows[t] must be EM_ROWS_RAW");
        if (!tc->ssd_dir[0] || !memchr(tc->ssd_dir, 0, sizeof tc->ssd_dir))
            return em_errorf(EM_ERR_INVALID, "model: SSD tables need tables.ssd_dir (a directory for the on-disk store)");
        if (tc->ssd_cache_bytes <= 0 || (unsigned)tc->ssd_policy > EM_SSD_LFU)
            return em_errorf(EM_ERR_INVALID, "model: SSD tables need tables.ssd_cache_bytes > 0 and ssd_policy lru or lfu");
        break;
    case EM_TABLES_FIITED:
        if (raw) return em_errorf(EM_ERR_INVALID, "model: raw-id rows (EM_ROWS_RAW) need dynamic tables");
        if (tc->chunks < 1 || tc->chunks > 255 || c->dim % tc->chunks)
            return em_errorf(EM_ERR_INVALID, "model: FIITED chunks k = %d must divide D = %d (1..255)", tc->chunks, c->dim);
        if (tc->budget_bytes < 0 || tc->prune_every < 0 || !(tc->util_decay >= 0 && tc->util_decay < 1))
            return em_errorf(EM_ERR_INVALID, "model: FIITED budget_bytes, prune_every >= 0 and util_decay in [0, 1)");
        break;
    default:
        return em_errorf(EM_ERR_INVALID, "model: unknown table kind %d", (int)tc->kind);
    }
    if (!(tc->init_scale > 0))
        return em_errorf(EM_ERR_INVALID, "model: %s tables need tables.init_scale > 0", em_table_kind_name(tc->kind));
    if (c->seq.num_seq)
        return em_errorf(EM_ERR_INVALID, "model: the sequence tower needs dense tables, not %s", em_table_kind_name(tc->kind));
    return EM_OK;
}

static em_status no_per_id_w(const em_dlrm *m, const em_batch *b) {
    if (b->per_id_w)
        return em_errorf(EM_ERR_UNSUPPORTED, "model: %s tables take no per-id weights", em_table_kind_name(m->cfg.tables.kind));
    return EM_OK;
}

static em_status no_end_step(em_dlrm *m, em_pool *pool) {
    (void)m, (void)pool;
    return EM_OK;
}

static size_t opt_state_per_row(em_optim_kind k, int D) {
    return k == EM_OPT_ADAGRAD ? (size_t)D : k == EM_OPT_ROWWISE_ADAGRAD ? 1 : 0;
}

/* ------------------------------------------------------------------ dense */

static em_status dense_create(em_dlrm *m, int fresh, em_pool *pool) {
    const em_dlrm_cfg *c = &m->cfg;
    em_embbag_cfg ec = {c->num_tables, c->rows, c->dim, c->pooling, c->sparse_opt};
    em_status st = em_embbag_create(&m->emb, &ec);
    if (st == EM_OK && fresh) em_embbag_init_uniform(m->emb, c->seed, pool);
    return st;
}
static void dense_destroy(em_dlrm *m) {
    em_embbag_free(m->emb);
    m->emb = NULL;
}
static em_status dense_forward(em_dlrm *m, const em_batch *b, float *out, int train, em_pool *pool) {
    (void)train;
    if (!m->emb) return em_errorf(EM_ERR_INVALID, "model: the embedding tables were released (inference only)");
    return em_embbag_forward(m->emb, out, b->indices, b->offsets, b->per_id_w, b->B, pool);
}
static em_status dense_backward(em_dlrm *m, const em_batch *b, const float *dout, em_pool *pool) {
    if (!m->emb) return em_errorf(EM_ERR_INVALID, "model: the embedding tables were released (inference only)");
    return em_embbag_backward_update(m->emb, dout, b->indices, b->offsets, b->per_id_w, NULL, b->B, pool);
}
static void dense_set_lr(em_dlrm *m, float lr) {
    if (m->emb) em_embbag_set_lr(m->emb, lr);
}
static void dense_stats(const em_dlrm *m, int t, em_dlrm_table_stats *s) {
    const int t0 = t < 0 ? 0 : t, t1 = t < 0 ? m->cfg.num_tables : t + 1;
    for (int u = t0; u < t1; u++) {
        size_t cnt = 0;
        em_embbag_state(m->emb, u, &cnt);
        s->rows += m->cfg.rows[u], s->max_rows += m->cfg.rows[u];
        s->state_bytes += cnt * sizeof(float);
        s->bytes += ((size_t)m->cfg.rows[u] * (size_t)m->cfg.dim + cnt) * sizeof(float);
    }
}
static em_status dense_save(const em_dlrm *m, const char *path, const em_st_tensor *ts, int n, const em_st_meta *meta,
                            int n_meta) {
    (void)m;
    return em_st_write(path, ts, n, meta, n_meta);
}
static em_status dense_load(em_dlrm *m, const em_st *f, const char *path) {
    (void)m, (void)f, (void)path; /* the tables came with the model's tensor list */
    return EM_OK;
}

static const em__tables_ops dense_ops = {"dense",      dense_create, dense_destroy, dense_forward, dense_backward,
                                         no_end_step,  dense_set_lr, dense_stats,   dense_save,    dense_load};

/* ---------------------------------------------------------------- dynamic */

static em_status dyn_create(em_dlrm *m, int fresh, em_pool *pool) {
    (void)fresh, (void)pool; /* a new dynamic table is empty either way */
    const em_dlrm_cfg *c = &m->cfg;
    const em_tables_cfg *tc = &c->tables;
    em_dyn_cfg dc = em_dyn_default(c->num_tables, c->dim, c->sparse_opt);
    dc.pooling = c->pooling;
    dc.seed = c->seed;
    dc.init_scale = tc->init_scale;
    dc.admit = tc->admit;
    dc.admit_min_count = tc->admit_min_count ? tc->admit_min_count : 1;
    dc.admit_prob = tc->admit_prob;
    dc.evict = tc->evict;
    dc.max_rows = tc->max_rows;
    dc.max_bytes = (size_t)tc->max_bytes;
    dc.evict_slack = tc->evict_slack;
    return em_dyn_create(&m->dyn, &dc);
}
static void dyn_destroy(em_dlrm *m) {
    em_dyn_free(m->dyn);
    m->dyn = NULL;
}
/* The reader delivers raw ids bit-cast into int64 (EM_ROWS_RAW); int64_t and
 * uint64_t may alias. */
static em_status dyn_forward(em_dlrm *m, const em_batch *b, float *out, int train, em_pool *pool) {
    em_status st = no_per_id_w(m, b);
    if (st) return st;
    return em_dyn_forward(m->dyn, out, (const uint64_t *)b->indices, b->offsets, b->B, train ? EM_DYN_TRAIN : EM_DYN_EVAL,
                          pool);
}
static em_status dyn_backward(em_dlrm *m, const em_batch *b, const float *dout, em_pool *pool) {
    return em_dyn_backward_update(m->dyn, dout, (const uint64_t *)b->indices, b->offsets, b->B, pool);
}
static void dyn_set_lr(em_dlrm *m, float lr) { em_dyn_set_lr(m->dyn, lr); }
static void dyn_stats(const em_dlrm *m, int t, em_dlrm_table_stats *s) {
    em_dyn_stats ds = em_dyn_get_stats(m->dyn, t);
    s->rows = ds.rows;
    s->max_rows = em_dyn_budget_rows(m->dyn) * (t < 0 ? m->cfg.num_tables : 1);
    s->bytes = ds.bytes;
    s->state_bytes = (size_t)ds.rows * opt_state_per_row(m->cfg.sparse_opt.kind, m->cfg.dim) * sizeof(float);
    s->inserts = ds.inserts, s->evictions = ds.evictions, s->rejections = ds.rejections;
}
static em_status dyn_save(const em_dlrm *m, const char *path, const em_st_tensor *ts, int n, const em_st_meta *meta,
                          int n_meta) {
    return em_dyn_save_ex(m->dyn, path, ts, n, meta, n_meta);
}
static em_status dyn_load(em_dlrm *m, const em_st *f, const char *path) { return em_dyn_load_st(m->dyn, f, path); }

static const em__tables_ops dyn_ops = {"dynamic",   dyn_create, dyn_destroy, dyn_forward, dyn_backward,
                                       no_end_step, dyn_set_lr, dyn_stats,   dyn_save,    dyn_load};

/* ----------------------------------------------------------------- FIITED */

static em_status fit_create(em_dlrm *m, int fresh, em_pool *pool) {
    (void)pool;
    const em_dlrm_cfg *c = &m->cfg;
    const em_tables_cfg *tc = &c->tables;
    em_fiited_cfg fc = em_fiited_default(c->num_tables, c->rows, c->dim, tc->chunks, c->sparse_opt);
    fc.init_live = fresh ? tc->chunks : 0; /* a checkpoint brings its own live chunks */
    fc.pooling = c->pooling;
    fc.seed = c->seed;
    fc.init_scale = tc->init_scale;
    fc.util_decay = tc->util_decay;
    return em_fiited_create(&m->fit, &fc);
}
static void fit_destroy(em_dlrm *m) {
    em_fiited_free(m->fit);
    m->fit = NULL;
}
static em_status fit_forward(em_dlrm *m, const em_batch *b, float *out, int train, em_pool *pool) {
    (void)train;
    em_status st = no_per_id_w(m, b);
    if (st) return st;
    return em_fiited_forward(m->fit, out, b->indices, b->offsets, NULL, b->B, pool);
}
static em_status fit_backward(em_dlrm *m, const em_batch *b, const float *dout, em_pool *pool) {
    return em_fiited_backward_update(m->fit, dout, b->indices, b->offsets, NULL, NULL, b->B, pool);
}
static em_status fit_end_step(em_dlrm *m, em_pool *pool) {
    const em_tables_cfg *tc = &m->cfg.tables;
    if (tc->prune_every <= 0 || m->step % tc->prune_every != 0) return EM_OK;
    return em_fiited_prune(m->fit, (size_t)tc->budget_bytes, tc->budget_frac, pool);
}
static void fit_set_lr(em_dlrm *m, float lr) { em_fiited_set_lr(m->fit, lr); }
static void fit_stats(const em_dlrm *m, int t, em_dlrm_table_stats *s) {
    const em_fiited *f = m->fit;
    const em_fiited_stats all = em_fiited_get_stats(f, -1), fs = t < 0 ? all : em_fiited_get_stats(f, t);
    const int K = em_fiited_chunks(f);
    const size_t sb = em_fiited_slot_bytes(f), wb = (size_t)(m->cfg.dim / K) * sizeof(float);
    int64_t rows = 0, total = 0;
    for (int u = 0; u < m->cfg.num_tables; u++) {
        total += m->cfg.rows[u];
        if (t < 0 || u == t) rows += m->cfg.rows[u];
    }
    s->rows = fs.live_per_chunk[0];
    s->max_rows = rows;
    s->live_chunks = fs.live_chunks;
    s->chunks = rows * K;
    s->state_bytes = (size_t)fs.live_chunks * (sb - wb);
    if (t < 0) {
        s->bytes = all.held_bytes;
    } else { /* its slots, and shares of the metadata (per row) and the hash (per live chunk) */
        double meta = (double)all.meta_bytes * (double)rows / (double)(total ? total : 1);
        double hash = all.live_chunks ? (double)all.hash_bytes * (double)fs.live_chunks / (double)all.live_chunks : 0;
        s->bytes = (size_t)fs.live_chunks * sb + (size_t)(meta + hash);
    }
}
static em_status fit_save(const em_dlrm *m, const char *path, const em_st_tensor *ts, int n, const em_st_meta *meta,
                          int n_meta) {
    return em_fiited_save_ex(m->fit, path, ts, n, meta, n_meta);
}
static em_status fit_load(em_dlrm *m, const em_st *f, const char *path) { return em_fiited_load_st(m->fit, f, path); }

static const em__tables_ops fit_ops = {"fiited",     fit_create, fit_destroy, fit_forward, fit_backward,
                                       fit_end_step, fit_set_lr, fit_stats,   fit_save,    fit_load};

/* -------------------------------------------------------------------- SSD */

static em_status ssd_create(em_dlrm *m, int fresh, em_pool *pool) {
    (void)fresh, (void)pool; /* new rows are born on first sight either way */
    static atomic_uint serial;
    const em_dlrm_cfg *c = &m->cfg;
    const em_tables_cfg *tc = &c->tables;
    if (mkdir(tc->ssd_dir, 0755) != 0 && errno != EEXIST)
        return em_errorf(EM_ERR_IO, "model: cannot create the SSD directory %s: %s", tc->ssd_dir, strerror(errno));
    char path[320];
    snprintf(path, sizeof path, "%s/live-%ld-%u", tc->ssd_dir, (long)getpid(), atomic_fetch_add(&serial, 1));
    em_ssd_cfg sc = em_ssd_default(c->num_tables, c->dim, c->sparse_opt, path, (size_t)tc->ssd_cache_bytes);
    sc.pooling = c->pooling;
    sc.seed = c->seed;
    sc.init_scale = tc->init_scale;
    sc.policy = (em_ssd_policy)tc->ssd_policy;
    return em_ssd_create(&m->ssd, &sc);
}
static void ssd_destroy(em_dlrm *m) {
    em_ssd_free(m->ssd);
    m->ssd = NULL;
}
static em_status ssd_forward(em_dlrm *m, const em_batch *b, float *out, int train, em_pool *pool) {
    em_status st = no_per_id_w(m, b);
    if (st) return st;
    return em_ssd_forward(m->ssd, out, (const uint64_t *)b->indices, b->offsets, b->B, train ? EM_SSD_TRAIN : EM_SSD_EVAL,
                          pool);
}
static em_status ssd_backward(em_dlrm *m, const em_batch *b, const float *dout, em_pool *pool) {
    return em_ssd_backward_update(m->ssd, dout, (const uint64_t *)b->indices, b->offsets, b->B, pool);
}
static void ssd_set_lr(em_dlrm *m, float lr) { em_ssd_set_lr(m->ssd, lr); }
static void ssd_stats(const em_dlrm *m, int t, em_dlrm_table_stats *s) {
    em_ssd_stats ss = em_ssd_get_stats(m->ssd);
    const size_t S = opt_state_per_row(m->cfg.sparse_opt.kind, m->cfg.dim);
    /* the cache is shared by the tables: per table its rows, a share of the bytes by
     * rows, and the hit rate of the whole cache */
    s->rows = t < 0 ? ss.rows : em_ssd_table_rows(m->ssd, t);
    s->max_rows = 0;
    const double share = t < 0 || ss.rows == 0 ? 1.0 : (double)s->rows / (double)ss.rows;
    s->bytes = (size_t)((double)ss.cache_bytes * share);
    s->state_bytes = (size_t)((double)ss.cache_rows * share) * S * sizeof(float);
    s->evictions = ss.evictions;
    s->hit_rate = ss.hit_rate;
}
static char *ssd_dir_of(const char *path) {
    size_t n = strlen(path) + 5;
    char *p = em_malloc(n);
    if (p) snprintf(p, n, "%s.ssd", path);
    return p;
}
static em_status ssd_save(const em_dlrm *m, const char *path, const em_st_tensor *ts, int n, const em_st_meta *meta,
                          int n_meta) {
    char *dir = ssd_dir_of(path);
    em_st_meta *mt = em_malloc(((size_t)n_meta + 1) * sizeof *mt);
    em_status st = EM_OK;
    if (!dir || !mt) st = em_errorf(EM_ERR_NOMEM, "model: no memory to save %s", path);
    if (!st) st = em_ssd_save(m->ssd, dir);
    if (!st) {
        char step[24];
        snprintf(step, sizeof step, "%lld", (long long)em_ssd_step(m->ssd));
        memcpy(mt, meta, (size_t)n_meta * sizeof *mt);
        mt[n_meta] = (em_st_meta){"ember.ssd_step", step};
        st = em_st_write(path, ts, n, mt, n_meta + 1);
    }
    em_free(dir), em_free(mt);
    return st;
}
static em_status ssd_load(em_dlrm *m, const em_st *f, const char *path) {
    const char *want = em_st_meta_get(f, "ember.ssd_step");
    if (!want) return em_errorf(EM_ERR_CORRUPT, "%s: no ember.ssd_step in the metadata of an SSD-table checkpoint", path);
    char *dir = ssd_dir_of(path);
    if (!dir) return em_errorf(EM_ERR_NOMEM, "model: no memory to load %s", path);
    em_status st = em_ssd_load(m->ssd, dir);
    if (!st && strtoll(want, NULL, 10) != em_ssd_step(m->ssd))
        st = em_errorf(EM_ERR_CORRUPT, "%s holds the tables of step %lld, %s expects step %s (a save interrupted between them?)",
                       dir, (long long)em_ssd_step(m->ssd), path, want);
    em_free(dir);
    return st;
}

static const em__tables_ops ssd_ops = {"ssd",       ssd_create, ssd_destroy, ssd_forward, ssd_backward,
                                       no_end_step, ssd_set_lr, ssd_stats,   ssd_save,    ssd_load};

/* ------------------------------------------------------------------ public */

const em__tables_ops *em__tables_ops_for(em_table_kind kind) {
    switch (kind) {
    case EM_TABLES_DYNAMIC: return &dyn_ops;
    case EM_TABLES_FIITED: return &fit_ops;
    case EM_TABLES_SSD: return &ssd_ops;
    default: return &dense_ops; /* validated before */
    }
}

em_status em_dlrm_table_stats_get(const em_dlrm *m, int t, em_dlrm_table_stats *out) {
    memset(out, 0, sizeof *out);
    if (t < -1 || t >= m->cfg.num_tables)
        return em_errorf(EM_ERR_INVALID, "model: table %d of %d", t, m->cfg.num_tables);
    if (m->cfg.tables.kind == EM_TABLES_DENSE && !m->emb)
        return em_errorf(EM_ERR_INVALID, "model: the embedding tables were released");
    out->kind = m->cfg.tables.kind;
    out->dim = m->cfg.dim;
    out->hit_rate = -1;
    m->tab->stats(m, t, out);
    return EM_OK;
}

em_dyn *em_dlrm_dyn(em_dlrm *m) { return m->dyn; }
em_fiited *em_dlrm_fiited(em_dlrm *m) { return m->fit; }
em_ssd *em_dlrm_ssd(em_dlrm *m) { return m->ssd; }

em_status em_dlrm_prefetch(em_dlrm *m, const em_batch *next) {
    if (!m || !next) return em_errorf(EM_ERR_INVALID, "model prefetch: NULL model or batch");
    if (m->cfg.tables.kind != EM_TABLES_SSD) return EM_OK;
    return em_ssd_prefetch(m->ssd, (const uint64_t *)next->indices, next->offsets, next->B);
}
