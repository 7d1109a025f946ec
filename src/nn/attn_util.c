/*
 * attn_util.c - the cold shared pieces of the jagged attention kernels (jattn.c,
 * gdpa.c, swa.c): building the longest-first work-unit list and running a kernel's
 * task over it with per-worker scratch. The hot per-element helpers are static inline
 * in attn_util.h.
 *
 * Why longest first: a unit's cost grows with its sample's length (quadratically for
 * full attention), so handing the long ones out first from the atomic counter leaves
 * only short units for the tail and keeps the dynamic schedule balanced. The order is
 * a total order (length, then sample index), so the list itself is deterministic.
 */
#include <stdlib.h>

#include "core/blas.h"
#include "nn/attn_util.h"

typedef struct {
    const int64_t *off;
    int b;
} len_key;

/* Longer sample first; equal lengths by ascending sample index. */
static int cmp_len_desc(const void *pa, const void *pb) {
    const len_key *a = pa, *b = pb;
    int64_t la = a->off[a->b + 1] - a->off[a->b], lb = b->off[b->b + 1] - b->off[b->b];
    if (la != lb) return la > lb ? -1 : 1;
    return (a->b > b->b) - (a->b < b->b);
}

em_status em__attn_units(em__attn_unit **out, size_t *n, const em_jattn_cfg *c, int tq,
                         const char *who) {
    *out = NULL;
    *n = 0;
    if (c->B == 0) return EM_OK;
    len_key *keys = em_malloc((size_t)c->B * sizeof *keys);
    if (!keys) return em_errorf(EM_ERR_NOMEM, "%s: unit sort (%d samples)", who, c->B);
    size_t cnt = 0;
    for (int b = 0; b < c->B; b++) {
        int64_t L = c->offsets[b + 1] - c->offsets[b];
        keys[b] = (len_key){c->offsets, b};
        cnt += (size_t)c->H * (size_t)(tq ? (L + tq - 1) / tq : (L > 0));
    }
    qsort(keys, (size_t)c->B, sizeof *keys, cmp_len_desc);
    em__attn_unit *u = cnt ? em_malloc(cnt * sizeof *u) : NULL;
    if (cnt && !u) {
        em_free(keys);
        return em_errorf(EM_ERR_NOMEM, "%s: unit list (%zu units)", who, cnt);
    }
    size_t k = 0;
    for (int i = 0; i < c->B; i++) {
        int b = keys[i].b;
        int64_t L = c->offsets[b + 1] - c->offsets[b];
        int nt = tq ? (int)((L + tq - 1) / tq) : (L > 0);
        for (int t = nt - 1; t >= 0; t--)
            for (int h = 0; h < c->H; h++) u[k++] = (em__attn_unit){b, h, t};
    }
    em_free(keys);
    *out = u;
    *n = cnt;
    return EM_OK;
}

typedef struct {
    em__attn_sched *s;
    em__attn_unit_fn fn;
    const void *job;
} runner;

static void run_task(void *p, int ith, int nth) {
    (void)nth;
    const runner *r = p;
    size_t k;
    while (em__attn_take(r->s, &k)) r->fn(r->job, r->s->units[k], ith);
}

em_status em__attn_run(em__attn_sched *s, const em_jattn_cfg *c, int tq, size_t scratch_floats,
                       em_pool *pool, em__attn_unit_fn fn, const void *job, const char *who) {
    em__attn_unit *units;
    em_status st = em__attn_units(&units, &s->n_units, c, tq, who);
    if (st) return st;
    s->units = units;
    s->scratch = NULL;
    if (s->n_units) {
        if (scratch_floats) {
            s->scratch = em_malloc((size_t)em_pool_nth(pool) * scratch_floats * sizeof(float));
            if (!s->scratch) {
                em_free(units);
                return em_errorf(EM_ERR_NOMEM, "%s: %d x %zu floats of tile scratch", who,
                                 em_pool_nth(pool), scratch_floats);
            }
        }
        em_blas_init();
        runner r = {s, fn, job};
        em__attn_go(s, pool, run_task, &r);
        em_free(s->scratch);
    }
    em_free(units);
    s->units = NULL;
    s->scratch = NULL;
    return EM_OK;
}
