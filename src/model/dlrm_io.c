/*
 * dlrm_io.c - the DLRM's configuration as JSON and its checkpoints.
 *
 * A checkpoint is a safetensors file (include/ember/safetensors.h) holding
 *   bot.{i}.weight/bias, top.{i}.weight/bias     dense parameters (F32)
 *   emb.{t}.weight                               tables (rows, D)
 *   optim.{slot}.{param}                         dense optimizer state per parameter:
 *                                                slot "sum" (AdaGrad), "m" and "v" (Adam/AdamW)
 *   optim.emb.{t}                                table optimizer state: (rows, D) AdaGrad,
 *                                                (rows) row-wise AdaGrad
 *   seq.*, optim.{slot}.seq.*                    the sequence tower's dense tensors (seqtower.h)
 *                                                and their optimizer state, when configured
 *   seq.items.weight, optim.seq.items            its own item table and state (unless shared)
 * Dynamic and FIITED models hold their tables' own tensors and metadata instead of
 * emb.{t}.weight / optim.emb.{t}: "dyn.{t}.*" and "dyn.*" (ember/dyntable.h: ids, rows,
 * count, last, state, counters), "fiited.{t}.*" and "fiited.*" (ember/fiited.h: live
 * counts, utilities, stamps, live chunks, state).
 * and metadata "ember.model" (the configuration JSON, with a "seq" object for a
 * sequence model, a "tables" object for dynamic or FIITED tables, and neither for the
 * plain dense DLRM), "ember.step" (optimizer steps),
 * "ember.format" = "dlrm/1", plus whatever the caller adds (data position, epoch).
 * Loading validates every tensor's dtype and size against the configuration, so a
 * checkpoint of another model is refused with a message naming the tensor.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/dlrm_impl.h"

static json_t *opt_to_json(const em_optim_cfg *o) {
    return json_pack("{s:s, s:f, s:f, s:f, s:f, s:f, s:f}", "kind", em_optim_name(o->kind), "lr", (double)o->lr, "eps",
                     (double)o->eps, "beta1", (double)o->beta1, "beta2", (double)o->beta2, "weight_decay",
                     (double)o->weight_decay, "init_accum", (double)o->init_accum);
}

static json_t *int_array(const int *v, int n) {
    json_t *a = json_array();
    for (int i = 0; i < n; i++) json_array_append_new(a, json_integer(v[i]));
    return a;
}

char *em_dlrm_cfg_to_json(const em_dlrm_cfg *c) {
    json_t *rows = json_array();
    for (int t = 0; t < c->num_tables; t++) json_array_append_new(rows, json_integer(c->rows[t]));
    json_t *j = json_pack("{s:i, s:o, s:i, s:o, s:o, s:s, s:o, s:o, s:I}", "num_dense", c->num_dense, "rows", rows, "dim",
                          c->dim, "bot", int_array(c->bot, c->n_bot), "top", int_array(c->top, c->n_top), "pooling",
                          c->pooling == EM_POOL_MEAN ? "mean" : "sum", "dense_opt", opt_to_json(&c->dense_opt),
                          "sparse_opt", opt_to_json(&c->sparse_opt), "seed", (json_int_t)c->seed);
    if (!j) return NULL;
    if (c->tables.kind != EM_TABLES_DENSE) {
        const em_tables_cfg *t = &c->tables;
        static const char *admit[] = {"always", "count", "prob"}, *evict[] = {"age", "lfu"};
        json_t *q = json_pack("{s:s, s:f, s:s, s:I, s:f, s:s, s:I, s:I, s:f, s:i, s:I, s:f, s:I, s:f}", "kind",
                              em_table_kind_name(t->kind), "init_scale", (double)t->init_scale, "admit",
                              admit[t->admit], "admit_min_count", (json_int_t)t->admit_min_count, "admit_prob",
                              (double)t->admit_prob, "evict", evict[t->evict], "max_rows", (json_int_t)t->max_rows,
                              "max_bytes", (json_int_t)t->max_bytes, "evict_slack", (double)t->evict_slack, "chunks",
                              t->chunks, "budget_bytes", (json_int_t)t->budget_bytes, "budget_frac", t->budget_frac,
                              "prune_every", (json_int_t)t->prune_every, "util_decay", (double)t->util_decay);
        if (q && t->kind == EM_TABLES_SSD &&
            (json_object_set_new(q, "ssd_dir", json_string(t->ssd_dir)) ||
             json_object_set_new(q, "ssd_cache_bytes", json_integer((json_int_t)t->ssd_cache_bytes)) ||
             json_object_set_new(q, "ssd_policy", json_string(t->ssd_policy == EM_SSD_LFU ? "lfu" : "lru")))) {
            json_decref(q);
            q = NULL;
        }
        if (!q || json_object_set_new(j, "tables", q)) {
            json_decref(j);
            return NULL;
        }
    }
    if (c->seq.num_seq) {
        char blocks[1024];
        em_seq_format_blocks(&c->seq, blocks, sizeof blocks);
        int hsp[3] = {c->seq.hsp_m, c->seq.hsp_m2, c->seq.hsp_k};
        json_t *q = json_pack("{s:i, s:i, s:i, s:i, s:I, s:i, s:i, s:i, s:o, s:s}", "num_seq", c->seq.num_seq, "max_len",
                              c->seq.max_len, "cand", c->seq.cand, "share", c->seq.share, "rows", (json_int_t)c->seq.rows,
                              "heads", c->seq.heads, "age_buckets", c->seq.age_buckets, "num_types", c->seq.num_types,
                              "hsp", int_array(hsp, 3), "blocks", blocks);
        char events[8192]; /* event-level personalization (seqtower.h), absent without groups */
        if (q && c->seq.n_groups && (em_seq_format_events(&c->seq, events, sizeof events) >= (int)sizeof events ||
                                     json_object_set_new(q, "events", json_string(events)))) {
            json_decref(q);
            q = NULL;
        }
        if (!q || json_object_set_new(j, "seq", q)) {
            json_decref(j);
            return NULL;
        }
    }
    char *s = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    if (!s) return NULL;
    char *out = em_strdup(s);
    free(s);
    return out;
}

static em_status opt_from_json(json_t *j, const char *what, em_optim_cfg *o) {
    const char *kind = NULL;
    double lr = 0, eps = 0, b1 = 0, b2 = 0, wd = 0, ia = 0;
    json_error_t err;
    if (!j || json_unpack_ex(j, &err, 0, "{s:s, s:F, s:F, s:F, s:F, s:F, s:F}", "kind", &kind, "lr", &lr, "eps", &eps,
                             "beta1", &b1, "beta2", &b2, "weight_decay", &wd, "init_accum", &ia))
        return em_errorf(EM_ERR_CORRUPT, "model config: %s: %s", what, j ? err.text : "missing");
    em_status st = em_optim_parse(kind, &o->kind);
    if (st) return em_errorf(EM_ERR_CORRUPT, "model config: %s: unknown optimizer '%s'", what, kind);
    o->lr = (float)lr, o->eps = (float)eps, o->beta1 = (float)b1, o->beta2 = (float)b2;
    o->weight_decay = (float)wd, o->init_accum = (float)ia;
    return EM_OK;
}

static int ints_from_json(json_t *a, int *out, int max) {
    if (!json_is_array(a) || json_array_size(a) > (size_t)max) return -1;
    for (size_t i = 0; i < json_array_size(a); i++) {
        json_t *v = json_array_get(a, i);
        if (!json_is_integer(v)) return -1;
        out[i] = (int)json_integer_value(v);
    }
    return (int)json_array_size(a);
}

static em_status tables_from_json(json_t *q, em_tables_cfg *t) {
    const char *kind = NULL, *admit = NULL, *evict = NULL;
    json_int_t amin = 0, mrows = 0, mbytes = 0, bbytes = 0, every = 0;
    double scale = 0, aprob = 0, slack = 0, frac = 0, decay = 0;
    json_error_t err;
    if (json_unpack_ex(q, &err, 0, "{s:s, s:F, s:s, s:I, s:F, s:s, s:I, s:I, s:F, s:i, s:I, s:F, s:I, s:F}", "kind", &kind,
                       "init_scale", &scale, "admit", &admit, "admit_min_count", &amin, "admit_prob", &aprob, "evict",
                       &evict, "max_rows", &mrows, "max_bytes", &mbytes, "evict_slack", &slack, "chunks", &t->chunks,
                       "budget_bytes", &bbytes, "budget_frac", &frac, "prune_every", &every, "util_decay", &decay))
        return em_errorf(EM_ERR_CORRUPT, "model config: tables: %s", err.text);
    if (em_table_kind_parse(kind, &t->kind)) return em_errorf(EM_ERR_CORRUPT, "model config: tables: unknown kind '%s'", kind);
    if (strcmp(admit, "always") == 0) t->admit = EM_DYN_ADMIT_ALWAYS;
    else if (strcmp(admit, "count") == 0) t->admit = EM_DYN_ADMIT_COUNT;
    else if (strcmp(admit, "prob") == 0) t->admit = EM_DYN_ADMIT_PROB;
    else return em_errorf(EM_ERR_CORRUPT, "model config: tables: unknown admit '%s'", admit);
    if (strcmp(evict, "age") == 0) t->evict = EM_DYN_EVICT_AGE;
    else if (strcmp(evict, "lfu") == 0) t->evict = EM_DYN_EVICT_LFU;
    else return em_errorf(EM_ERR_CORRUPT, "model config: tables: unknown evict '%s'", evict);
    if (amin < 0 || amin > UINT32_MAX) return em_errorf(EM_ERR_CORRUPT, "model config: tables: admit_min_count %lld", (long long)amin);
    t->init_scale = (float)scale, t->admit_min_count = (uint32_t)amin, t->admit_prob = (float)aprob;
    t->max_rows = mrows, t->max_bytes = mbytes, t->evict_slack = (float)slack;
    t->budget_bytes = bbytes, t->budget_frac = frac, t->prune_every = every, t->util_decay = (float)decay;
    if (t->kind == EM_TABLES_SSD) { /* keys only SSD tables have */
        const char *dir = NULL, *pol = NULL;
        json_int_t cache = 0;
        if (json_unpack_ex(q, &err, 0, "{s:s, s:I, s:s}", "ssd_dir", &dir, "ssd_cache_bytes", &cache, "ssd_policy", &pol))
            return em_errorf(EM_ERR_CORRUPT, "model config: tables: %s", err.text);
        if (strlen(dir) >= sizeof t->ssd_dir) return em_errorf(EM_ERR_CORRUPT, "model config: tables: ssd_dir too long");
        if (strcmp(pol, "lru") && strcmp(pol, "lfu"))
            return em_errorf(EM_ERR_CORRUPT, "model config: tables: unknown ssd_policy '%s'", pol);
        snprintf(t->ssd_dir, sizeof t->ssd_dir, "%s", dir);
        t->ssd_cache_bytes = cache, t->ssd_policy = strcmp(pol, "lfu") == 0 ? EM_SSD_LFU : EM_SSD_LRU;
    }
    return EM_OK;
}

em_status em_dlrm_cfg_from_json(const char *text, em_dlrm_cfg *c) {
    memset(c, 0, sizeof *c);
    json_error_t err;
    json_t *j = json_loads(text, 0, &err);
    if (!j) return em_errorf(EM_ERR_CORRUPT, "model config: line %d: %s", err.line, err.text);
    em_status st = EM_OK;
    json_t *rows = NULL, *bot = NULL, *top = NULL, *dopt = NULL, *sopt = NULL;
    const char *pooling = "sum";
    json_int_t seed = 0;
    if (json_unpack_ex(j, &err, 0, "{s:i, s:o, s:i, s:o, s:o, s?s, s:o, s:o, s?I}", "num_dense", &c->num_dense, "rows",
                       &rows, "dim", &c->dim, "bot", &bot, "top", &top, "pooling", &pooling, "dense_opt", &dopt,
                       "sparse_opt", &sopt, "seed", &seed)) {
        st = em_errorf(EM_ERR_CORRUPT, "model config: %s", err.text);
        goto done;
    }
    c->seed = (uint64_t)seed;
    if (!json_is_array(rows) || json_array_size(rows) < 1 || json_array_size(rows) > EM_DLRM_MAX_TABLES) {
        st = em_errorf(EM_ERR_CORRUPT, "model config: 'rows' must be an array of 1..%d table sizes", EM_DLRM_MAX_TABLES);
        goto done;
    }
    c->num_tables = (int)json_array_size(rows);
    for (int t = 0; t < c->num_tables; t++) c->rows[t] = json_integer_value(json_array_get(rows, (size_t)t));
    c->n_bot = ints_from_json(bot, c->bot, EM_DLRM_MAX_LAYERS + 1);
    c->n_top = ints_from_json(top, c->top, EM_DLRM_MAX_LAYERS + 1);
    if (c->n_bot < 0 || c->n_top < 0) {
        st = em_errorf(EM_ERR_CORRUPT, "model config: 'bot' and 'top' must be arrays of layer sizes");
        goto done;
    }
    if (strcmp(pooling, "sum") == 0) c->pooling = EM_POOL_SUM;
    else if (strcmp(pooling, "mean") == 0) c->pooling = EM_POOL_MEAN;
    else {
        st = em_errorf(EM_ERR_CORRUPT, "model config: unknown pooling '%s'", pooling);
        goto done;
    }
    if ((st = opt_from_json(dopt, "dense_opt", &c->dense_opt)) || (st = opt_from_json(sopt, "sparse_opt", &c->sparse_opt)))
        goto done;
    json_t *tab = json_object_get(j, "tables");
    if (tab && (st = tables_from_json(tab, &c->tables))) goto done;
    json_t *seq = json_object_get(j, "seq");
    if (seq) {
        em_seq_cfg *q = &c->seq;
        json_t *hsp = NULL;
        const char *blocks = NULL;
        json_int_t srows = 0;
        int h[3];
        if (json_unpack_ex(seq, &err, 0, "{s:i, s:i, s:i, s:i, s:I, s:i, s:i, s:i, s:o, s:s}", "num_seq", &q->num_seq,
                           "max_len", &q->max_len, "cand", &q->cand, "share", &q->share, "rows", &srows, "heads", &q->heads,
                           "age_buckets", &q->age_buckets, "num_types", &q->num_types, "hsp", &hsp, "blocks", &blocks)) {
            st = em_errorf(EM_ERR_CORRUPT, "model config: seq: %s", err.text);
            goto done;
        }
        q->rows = srows;
        if (ints_from_json(hsp, h, 3) != 3) {
            st = em_errorf(EM_ERR_CORRUPT, "model config: seq: 'hsp' must be [seeds, tokens, terms]");
            goto done;
        }
        q->hsp_m = h[0], q->hsp_m2 = h[1], q->hsp_k = h[2];
        if (em_seq_parse_blocks(q, blocks, EM_GDPA_SILU, 8)) {
            char msg[300];
            snprintf(msg, sizeof msg, "%s", em_last_error());
            st = em_errorf(EM_ERR_CORRUPT, "model config: seq: %s", msg);
            goto done;
        }
        json_t *ev = json_object_get(seq, "events");
        if (ev && (!json_is_string(ev) || em_seq_parse_events(q, json_string_value(ev), EM_GDPA_SILU, 8))) {
            char msg[300];
            snprintf(msg, sizeof msg, "%s", ev && json_is_string(ev) ? em_last_error() : "'events' must be a string");
            st = em_errorf(EM_ERR_CORRUPT, "model config: seq: %s", msg);
            goto done;
        }
    }
    st = em_dlrm_cfg_validate(c);
done:
    json_decref(j);
    return st;
}

/* The dense optimizer's state slots: name and offset (in units of n_params). */
static int dense_slots(em_optim_kind k, const char **names) {
    switch (k) {
    case EM_OPT_ADAGRAD: names[0] = "sum"; return 1;
    case EM_OPT_ADAM:
    case EM_OPT_ADAMW: names[0] = "m", names[1] = "v"; return 2;
    default: return 0;
    }
}

/* Enumerate every tensor of the checkpoint; names are written into `names` storage. */
typedef struct {
    em_st_tensor *t;
    char (*names)[96];
    int n;
} tensor_list;

static void add(tensor_list *tl, const char *name, const void *data, int ndim, int64_t d0, int64_t d1) {
    em_st_tensor *t = &tl->t[tl->n];
    snprintf(tl->names[tl->n], 96, "%s", name);
    t->name = tl->names[tl->n];
    t->dtype = EM_F32;
    t->ndim = ndim;
    t->shape[0] = d0;
    t->shape[1] = d1;
    t->data = data;
    tl->n++;
}

static void add3(tensor_list *tl, const char *name, const void *data, const em_seq_param *p) {
    add(tl, name, data, p->ndim, p->shape[0], p->shape[1]);
    tl->t[tl->n - 1].shape[2] = p->shape[2];
}

static void layer_name(const em_dlrm *m, int l, int bias, char *buf, size_t cap) {
    int top = l >= m->n_botl;
    snprintf(buf, cap, "%s.%d.%s", top ? "top" : "bot", top ? l - m->n_botl : l, bias ? "bias" : "weight");
}

static int max_tensors(const em_dlrm *m) {
    const em_seq_param *p;
    return m->n_layers * 2 * 3 + m->cfg.num_tables * 2 + (m->seq ? em_seqtower_params(m->seq, &p) * 3 + 2 : 0);
}

/* Fill tl with the model's tensors (pointers into the model). */
static void list_tensors(em_dlrm *m, tensor_list *tl) {
    char name[64], full[80];
    const char *slots[2];
    int ns = dense_slots(m->cfg.dense_opt.kind, slots);
    for (int l = 0; l < m->n_layers; l++) {
        const layer *L = &m->L[l];
        for (int bias = 0; bias < 2; bias++) {
            layer_name(m, l, bias, name, sizeof name);
            size_t off = bias ? L->b : L->w;
            if (bias) add(tl, name, m->params + off, 1, L->out, 0);
            else add(tl, name, m->params + off, 2, L->out, L->in);
            for (int s = 0; s < ns; s++) {
                snprintf(full, sizeof full, "optim.%s.%s", slots[s], name);
                const float *p = m->state + (size_t)s * m->n_params + off;
                if (bias) add(tl, full, p, 1, L->out, 0);
                else add(tl, full, p, 2, L->out, L->in);
            }
        }
    }
    if (m->seq) {
        const em_seq_param *p;
        int np = em_seqtower_params(m->seq, &p);
        for (int i = 0; i < np; i++) {
            size_t off = m->n_mlp + p[i].off;
            add3(tl, p[i].name, m->params + off, &p[i]);
            for (int s = 0; s < ns; s++) {
                snprintf(full, sizeof full, "optim.%s.%s", slots[s], p[i].name);
                add3(tl, full, m->state + (size_t)s * m->n_params + off, &p[i]);
            }
        }
        if (m->seq_emb) {
            add(tl, "seq.items.weight", em_embbag_weights(m->seq_emb, 0), 2, m->cfg.seq.rows, m->cfg.dim);
            size_t cnt = 0;
            float *st = em_embbag_state(m->seq_emb, 0, &cnt);
            if (st && cnt == (size_t)m->cfg.seq.rows) add(tl, "optim.seq.items", st, 1, m->cfg.seq.rows, 0);
            else if (st) add(tl, "optim.seq.items", st, 2, m->cfg.seq.rows, m->cfg.dim);
        }
    }
    for (int t = 0; m->emb && t < m->cfg.num_tables; t++) { /* dense tables; others: m->tab->save */
        snprintf(name, sizeof name, "emb.%d.weight", t);
        add(tl, name, em_embbag_weights(m->emb, t), 2, m->cfg.rows[t], m->cfg.dim);
        size_t cnt = 0;
        float *st = em_embbag_state(m->emb, t, &cnt);
        if (st) {
            snprintf(name, sizeof name, "optim.emb.%d", t);
            if (cnt == (size_t)m->cfg.rows[t]) add(tl, name, st, 1, m->cfg.rows[t], 0);
            else add(tl, name, st, 2, m->cfg.rows[t], m->cfg.dim);
        }
    }
}

em_status em_dlrm_save(const em_dlrm *mc, const char *path, const em_st_meta *extra, int n_extra) {
    em_dlrm *m = (em_dlrm *)mc; /* only read */
    if (m->cfg.tables.kind == EM_TABLES_DENSE && !m->emb) return em_errorf(EM_ERR_INVALID, "model: cannot save %s: the embedding tables were released", path);
    int cap = max_tensors(m);
    tensor_list tl = {em_calloc((size_t)cap, sizeof(em_st_tensor)), em_calloc((size_t)cap, 96), 0};
    em_st_meta *meta = em_calloc((size_t)n_extra + 3, sizeof *meta);
    char *cfg_json = em_dlrm_cfg_to_json(&m->cfg);
    em_status st = EM_ERR_NOMEM;
    if (tl.t && tl.names && meta && cfg_json) {
        list_tensors(m, &tl);
        char step[32];
        snprintf(step, sizeof step, "%lld", (long long)m->step);
        meta[0] = (em_st_meta){"ember.format", "dlrm/1"};
        meta[1] = (em_st_meta){"ember.model", cfg_json};
        meta[2] = (em_st_meta){"ember.step", step};
        for (int i = 0; i < n_extra; i++) meta[3 + i] = extra[i];
        st = m->tab->save(m, path, tl.t, tl.n, meta, n_extra + 3);
    }
    em_free(tl.t), em_free(tl.names), em_free(meta), em_free(cfg_json);
    return st;
}

em_status em_dlrm_load(em_dlrm **out, const char *path, em_st **st_out, em_pool *pool) {
    *out = NULL;
    if (st_out) *st_out = NULL;
    em_st *f = NULL;
    em_dlrm *m = NULL;
    tensor_list tl = {0};
    em_status st = em_st_open(&f, path);
    if (st) return st;
    const char *fmt = em_st_meta_get(f, "ember.format"), *cfg_json = em_st_meta_get(f, "ember.model"),
               *step = em_st_meta_get(f, "ember.step");
    if (!fmt || strcmp(fmt, "dlrm/1") != 0 || !cfg_json || !step) {
        st = em_errorf(EM_ERR_CORRUPT, "%s: not an ember DLRM checkpoint (metadata ember.format/model/step missing)", path);
        goto fail;
    }
    em_dlrm_cfg cfg;
    if ((st = em_dlrm_cfg_from_json(cfg_json, &cfg))) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", em_last_error());
        st = em_errorf(EM_ERR_CORRUPT, "%s: %s", path, msg);
        goto fail;
    }
    if ((st = em__dlrm_create_raw(&m, &cfg, 0, pool))) goto fail;
    m->step = strtoll(step, NULL, 10);
    int cap = max_tensors(m);
    tl.t = em_calloc((size_t)cap, sizeof(em_st_tensor));
    tl.names = em_calloc((size_t)cap, 96);
    if (!tl.t || !tl.names) {
        st = EM_ERR_NOMEM;
        goto fail;
    }
    list_tensors(m, &tl);
    for (int i = 0; i < tl.n; i++) {
        int64_t numel = 1;
        for (int d = 0; d < tl.t[i].ndim; d++) numel *= tl.t[i].shape[d];
        const void *src = em_st_expect(f, tl.t[i].name, EM_F32, numel);
        if (!src) { /* em_st_expect's message names the file and the tensor */
            st = EM_ERR_CORRUPT;
            goto fail;
        }
        memcpy((void *)tl.t[i].data, src, (size_t)numel * sizeof(float));
    }
    if ((st = m->tab->load(m, f, path))) goto fail;
    em_free(tl.t), em_free(tl.names);
    *out = m;
    if (st_out) *st_out = f;
    else em_st_close(f);
    return EM_OK;
fail:
    em_free(tl.t), em_free(tl.names);
    em_dlrm_free(m);
    em_st_close(f);
    return st;
}
