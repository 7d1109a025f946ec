/*
 * rowstore.c - the id hash and the batch bookkeeping shared by the dynamic tables and
 * the SSD tier (sparse/rowstore.h).
 */
#include "sparse/rowstore.h"

#include <stdio.h>
#include <stdlib.h>

/* ------------------------------------------------------------------ hash */

void em__idmap_del(em__idmap *m, int t, uint64_t id, const uint64_t *salt) {
    size_t mk = m->cap - 1, i = (size_t)em__idhash(id, salt ? salt[t] : 0) & mk;
    while (m->h[i].id != id || m->h[i].t != t || m->h[i].slot == EM__NONE) {
        EM_ASSERT(m->h[i].slot != EM__NONE);
        i = (i + 1) & mk;
    }
    size_t j = i;
    for (;;) {
        j = (j + 1) & mk;
        if (m->h[j].slot == EM__NONE) break;
        const em__hent *e = &m->h[j];
        size_t home = (size_t)em__idhash(e->id, salt ? salt[e->t] : 0) & mk;
        /* move unless home lies cyclically in (i, j] */
        int in_range = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!in_range) {
            m->h[i] = m->h[j];
            i = j;
        }
    }
    m->h[i].slot = EM__NONE;
}

em_status em__idmap_reserve(em__idmap *m, size_t buckets, const uint64_t *salt, const char *who) {
    if (buckets <= m->cap) return EM_OK;
    em__hent *h = em_malloc(buckets * sizeof *h);
    if (!h) return em_errorf(EM_ERR_NOMEM, "%s: no memory for a hash of %zu buckets", who, buckets);
    for (size_t i = 0; i < buckets; i++) h[i].id = 0, h[i].t = 0, h[i].slot = EM__NONE;
    em__hent *old = m->h;
    size_t ocap = m->cap;
    m->h = h, m->cap = buckets;
    for (size_t i = 0; i < ocap; i++)
        if (old[i].slot != EM__NONE)
            em__idmap_put(m, old[i].t, old[i].id, em__idhash(old[i].id, salt ? salt[old[i].t] : 0), old[i].slot);
    em_free(old);
    return EM_OK;
}

em_status em__check_rows_cfg(const char *who, int num_tables, int dim, em_pooling pooling, em_optim_kind kind,
                             float init_scale, size_t *S) {
    if (num_tables < 1) return em_errorf(EM_ERR_INVALID, "%s: num_tables %d (need >= 1)", who, num_tables);
    if (dim < 1) return em_errorf(EM_ERR_INVALID, "%s: dim %d (need >= 1)", who, dim);
    if (pooling != EM_POOL_SUM && pooling != EM_POOL_MEAN)
        return em_errorf(EM_ERR_INVALID, "%s: unknown pooling %d", who, (int)pooling);
    const int s = em__state_floats(kind, dim);
    if (s < 0)
        return em_errorf(EM_ERR_INVALID, "%s: opt.kind %d is not a sparse optimizer (sgd, adagrad, rowwise_adagrad)", who,
                         (int)kind);
    if (!(init_scale >= 0.f)) return em_errorf(EM_ERR_INVALID, "%s: init_scale %g (need >= 0)", who, (double)init_scale);
    *S = (size_t)s;
    return EM_OK;
}

/* ------------------------------------------------------------ the batch */

em_status em__ubatch_init(em__ubatch *u, int T, int D, const char *who) {
    memset(u, 0, sizeof *u);
    u->T = T;
    u->gstride = ((size_t)D + 15) / 16 * 16;
    u->tab = em_calloc((size_t)T, sizeof *u->tab);
    if (!u->tab) return em_errorf(EM_ERR_NOMEM, "%s: no memory for %d tables", who, T);
    return EM_OK;
}

void em__ubatch_free(em__ubatch *u) {
    em_free(u->tab);
    em_free(u->uid), em_free(u->uhash), em_free(u->ucnt), em_free(u->ustart), em_free(u->uslot);
    em_free(u->pos2u), em_free(u->pos2b), em_free(u->plist), em_free(u->pslot), em_free(u->map);
    em_free(u->gbuf), em_free(u->queue);
    memset(u, 0, sizeof *u);
}

em_status em__check_offsets(const char *who, int T, const int64_t *off, int B, size_t *nnz) {
    if (B < 0) return em_errorf(EM_ERR_INVALID, "%s: batch size %d", who, B);
    if (!off) return em_errorf(EM_ERR_INVALID, "%s: offsets is NULL", who);
    if (off[0] != 0) return em_errorf(EM_ERR_INVALID, "%s: offsets[0] = %lld, expected 0", who, (long long)off[0]);
    size_t nb = (size_t)T * (size_t)B;
    for (size_t u = 0; u < nb; u++)
        if (off[u + 1] < off[u])
            return em_errorf(EM_ERR_INVALID, "%s: table %d, example %d: offsets[%zu] = %lld < offsets[%zu] = %lld", who,
                             (int)(u / (size_t)B), (int)(u % (size_t)B), u + 1, (long long)off[u + 1], u,
                             (long long)off[u]);
    *nnz = (size_t)off[nb];
    if (*nnz >= (size_t)UINT32_MAX) return em_errorf(EM_ERR_INVALID, "%s: %zu ids in one batch (at most 2^32 - 2)", who, *nnz);
    return EM_OK;
}

/* A table's dedup map: a power of two >= 2n (at least 4). */
static size_t map_cap(size_t n) {
    size_t mc = 4;
    while (mc < 2 * n) mc <<= 1;
    return mc;
}

em_status em__ubatch_begin(em__ubatch *u, const int64_t *offsets, int B, size_t nnz, const char *who, int *grew) {
    const int T = u->T;
    *grew = 0;
    size_t mapn = 0;
    for (int t = 0; t < T; t++)
        mapn += map_cap((size_t)(offsets[(size_t)(t + 1) * (size_t)B] - offsets[(size_t)t * (size_t)B]));
    if (nnz > u->cap_nnz) {
        size_t cap = u->cap_nnz + u->cap_nnz / 2;
        if (cap < nnz) cap = nnz;
        size_t c1 = cap + (size_t)T + 1;
        uint64_t *uid = em_malloc(cap * 8), *uhash = em_malloc(cap * 8);
        uint32_t *ucnt = em_malloc(cap * 4), *ustart = em_malloc(c1 * 4), *uslot = em_malloc(cap * 4),
                 *pos2u = em_malloc(cap * 4), *pos2b = em_malloc(cap * 4), *plist = em_malloc(cap * 4),
                 *pslot = em_malloc(cap * 4);
        if (!uid || !uhash || !ucnt || !ustart || !uslot || !pos2u || !pos2b || !plist || !pslot) {
            em_free(uid), em_free(uhash), em_free(ucnt), em_free(ustart), em_free(uslot);
            em_free(pos2u), em_free(pos2b), em_free(plist), em_free(pslot);
            return em_errorf(EM_ERR_NOMEM, "%s: no memory for the scratch of %zu ids", who, nnz);
        }
        em_free(u->uid), em_free(u->uhash), em_free(u->ucnt), em_free(u->ustart), em_free(u->uslot);
        em_free(u->pos2u), em_free(u->pos2b), em_free(u->plist), em_free(u->pslot);
        u->uid = uid, u->uhash = uhash, u->ucnt = ucnt, u->ustart = ustart, u->uslot = uslot;
        u->pos2u = pos2u, u->pos2b = pos2b, u->plist = plist, u->pslot = pslot;
        u->cap_nnz = cap;
        *grew = 1;
    }
    if (mapn > u->cap_map) {
        size_t cap = u->cap_map + u->cap_map / 2;
        if (cap < mapn) cap = mapn;
        uint32_t *m = em_malloc(cap * 4);
        if (!m) return em_errorf(EM_ERR_NOMEM, "%s: no memory for a dedup map of %zu buckets", who, mapn);
        em_free(u->map);
        u->map = m, u->cap_map = cap;
    }
    size_t mo = 0;
    for (int t = 0; t < T; t++) {
        em__ubtab *bt = &u->tab[t];
        bt->kbeg = (size_t)offsets[(size_t)t * (size_t)B];
        bt->n = (size_t)offsets[(size_t)(t + 1) * (size_t)B] - bt->kbeg;
        bt->mcap = map_cap(bt->n);
        bt->mbeg = mo, bt->nuniq = 0;
        mo += bt->mcap;
    }
    return EM_OK;
}

uint32_t em__ubatch_dedup(em__ubatch *u, int t, const uint64_t *ids, const int64_t *offsets, int B, uint64_t salt) {
    em__ubtab *bt = &u->tab[t];
    const size_t kbeg = bt->kbeg;
    const int64_t *off = offsets + (size_t)t * (size_t)B;
    uint64_t *uid = u->uid + kbeg, *uhash = u->uhash + kbeg;
    uint32_t *ucnt = u->ucnt + kbeg, *pos2u = u->pos2u + kbeg, *pos2b = u->pos2b + kbeg;
    uint32_t *map = u->map + bt->mbeg;
    const size_t mm = bt->mcap - 1;
    memset(map, 0xff, bt->mcap * sizeof(uint32_t));
    uint32_t U = 0;
    for (int b = 0; b < B; b++)
        for (int64_t k = off[b]; k < off[b + 1]; k++) {
            const uint64_t id = ids[k], hv = em__idhash(id, salt);
            size_t i = (size_t)(hv >> 32) & mm; /* high bits: the tables' hashes use the low ones */
            uint32_t v;
            while ((v = map[i]) != EM__NONE && uid[v] != id) i = (i + 1) & mm;
            if (v == EM__NONE) {
                v = map[i] = U++;
                uid[v] = id, uhash[v] = hv, ucnt[v] = 0;
            }
            size_t p = (size_t)k - kbeg;
            pos2u[p] = v, pos2b[p] = (uint32_t)b;
            ucnt[v]++;
        }
    bt->nuniq = U;
    return U;
}

void em__ubatch_csr(em__ubatch *u, int t) {
    const em__ubtab *bt = &u->tab[t];
    const size_t kbeg = bt->kbeg, n = bt->n, U = bt->nuniq;
    const uint32_t *ucnt = u->ucnt + kbeg, *pos2u = u->pos2u + kbeg;
    uint32_t *ustart = u->ustart + kbeg + (size_t)t, *plist = u->plist + kbeg;
    uint32_t acc = 0;
    for (size_t v = 0; v < U; v++) ustart[v] = acc, acc += ucnt[v];
    ustart[U] = acc;
    for (size_t p = 0; p < n; p++) plist[ustart[pos2u[p]]++] = (uint32_t)p; /* ustart[v] ends at v + 1's start */
    for (size_t v = U; v > 0; v--) ustart[v] = ustart[v - 1];
    ustart[0] = 0;
}

em_status em__ubatch_check_ids(const em__ubatch *u, const uint64_t *ids, const char *who) {
    for (int t = 0; t < u->T; t++) {
        const em__ubtab *bt = &u->tab[t];
        const uint64_t *uid = u->uid + bt->kbeg;
        const uint32_t *pos2u = u->pos2u + bt->kbeg;
        for (size_t p = 0; p < bt->n; p++)
            if (uid[pos2u[p]] != ids[bt->kbeg + p])
                return em_errorf(EM_ERR_INVALID, "%s: id %zu differs from the train forward's batch", who, bt->kbeg + p);
    }
    return EM_OK;
}

em_status em__ubatch_workers(em__ubatch *u, int nth, const char *who) {
    if (nth <= u->cap_nth) return EM_OK;
    float *g = em_malloc((size_t)nth * u->gstride * sizeof(float));
    struct em__qitem *q = em_malloc(((size_t)u->T + (size_t)nth * EM__CHUNKS_PER_WORKER) * sizeof *q);
    if (!g || !q) {
        em_free(g), em_free(q);
        return em_errorf(EM_ERR_NOMEM, "%s: no memory for the scratch of %d workers", who, nth);
    }
    em_free(u->gbuf), em_free(u->queue);
    u->gbuf = g, u->queue = q, u->cap_nth = nth;
    return EM_OK;
}

size_t em__ubatch_queue(em__ubatch *u, int nth) {
    size_t nq = 0, tot = 0;
    for (int t = 0; t < u->T; t++) tot += u->tab[t].nuniq;
    for (int t = 0; t < u->T; t++) { /* at most T + nth * EM__CHUNKS_PER_WORKER items */
        em__ubtab *bt = &u->tab[t];
        bt->nchunks = !bt->nuniq ? 0 : nth == 1 ? 1 : 1 + (int)(bt->nuniq * (size_t)nth * EM__CHUNKS_PER_WORKER / tot);
        for (int c = 0; c < bt->nchunks; c++) u->queue[nq++] = (struct em__qitem){t, c};
    }
    return nq;
}
