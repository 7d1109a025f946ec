/*
 * gen_drift.c - a drifting, multi-vertical synthetic stream with a planted ground
 * truth (`ember gen --drift`): the data for streaming training and ExFM (a teacher
 * on the union of the verticals, one student per vertical).
 *
 * Ground truth of an example of vertical v in window t (theta_t = drift * t):
 *   logit = bias + b_v + sum_j a_j h_j(t_j)
 *         + sum_f [ id_scale * (w0(k_f) cos theta_t + w1(k_f) sin theta_t)
 *                 + vertical_scale * (a0_v(k_f) cos theta_t + a1_v(k_f) sin theta_t) ]
 *         + sum_{f<g} c_fg <u(k_f), u(k_g)>                      (each term centered)
 *   label ~ Bernoulli(sigmoid(logit))
 * where k_f is the id key that Zipf rank r of field f maps to in window t.
 *
 * Design choices (everything derived from cfg->base.seed; nothing from the thread count):
 *  - Shared vs per-vertical structure. The dense effects, the w0/w1 id weights and the
 *    interactions are global: every vertical shares them, so a teacher trained on the
 *    union learns something each student can use. Each vertical adds its own bias b_v
 *    ~ N(0, vertical_bias^2) and its own id weights a0_v/a1_v: the part a teacher
 *    averages away and a student must learn from its own labels.
 *  - Weight drift. Each id's weight rotates on the circle spanned by two independent
 *    normals: its variance stays id_scale^2 at every window (the signal strength is
 *    stationary) while its correlation with window 0 is cos(theta_t): a model trained
 *    on old windows goes stale at a configured rate. theta = pi/2 makes the weights
 *    independent of window 0's; theta = pi flips them.
 *  - Id churn. In a field with >= churn_min_card ids, rank r has a phase phi_r in
 *    [0, 1) hashed from (field, r) and a generation g = floor(t * turnover + phi_r); its
 *    id key is r + card * g. Between two consecutive windows a fraction `turnover` of
 *    the ranks (of the popularity mass, in expectation) moves to a brand-new id and the
 *    old id never appears again; between windows 0 and t, min(1, t * turnover). A new
 *    id gets fresh hashed parameters, so it must be learned from scratch. Small fields
 *    (device type, ...) never churn.
 *  - Written ids. A non-churning field is written exactly as gen.c writes it. A
 *    churning field's key is written as 16 hex digits of em_mix64(key ^ field key), a
 *    bijection, so distinct keys are distinct strings and any table size hashes them
 *    (streaming systems hash ids; no fixed dictionary can know tomorrow's ids).
 *  - Centering. As in gen.c, each field's Zipf-weighted head mean of its id terms is
 *    subtracted, but per window (the head's keys change with churn and its weights with
 *    theta): the base CTR of each vertical stays near sigmoid(bias + b_v) while the
 *    pattern drifts. CENTER_HEAD ranks per field; the fields are split over the pool.
 *  - Time order and parallelism. Window t holds rows [t*N/W, (t+1)*N/W). A window is
 *    cut into blocks of BLOCK_ROWS rows; block b of window t draws from its own RNG
 *    stream seeded from (seed, t, b). Rounds of blocks are generated over the pool
 *    (contiguous split) and written in block order, so all outputs are byte-identical
 *    for any thread count. Memory: one round of text buffers, O(fields * verticals)
 *    model state; nothing per id or per window (an unbounded stream is fine).
 *  - Outputs. The data file holds Criteo TSV lines (every reader works on it). The
 *    sidecar holds "vertical \t window \t p" per example, line i describing data line i
 *    (the example id is the line index, the stream position). The optional summary
 *    holds one line per (window, vertical): counts, clicks, mean true p, theta. See
 *    docs/FORMATS.md.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "data/data_internal.h"
#include "ember/data.h"

#define BLOCK_ROWS 2048
#define MAX_DENSE 256
#define MAX_SPARSE 64
#define MAX_LATENT 64
#define MAX_V EM_DRIFT_MAX_VERTICALS
#define PAIR_PROB 0.3
#define DENSE_SCALE 0.3
#define CENTER_HEAD 1024
#define CENTER_MC 20000
#define SIDE_MAX 48 /* "vv\twwwwwwwwww\t%.9g\n" fits easily */

em_drift_cfg em_drift_default(void) {
    em_drift_cfg c;
    memset(&c, 0, sizeof c);
    c.base = em_gen_default();
    c.rows = 3000000;
    c.windows = 30;
    c.verticals = 3;
    c.shares = NULL;
    c.turnover = 0.05;
    c.drift = 0.05;
    c.vertical_scale = 0.15;
    c.vertical_bias = 0.3;
    c.churn_min_card = 100;
    return c;
}

/* ------------------------------------------------------------ the model */

typedef struct {
    int nd, ns, k, nv, rotate;
    uint64_t seed;
    double bias, id_scale, u_scale, vscale, turnover, drift;
    em__zipf zipf[MAX_SPARSE];
    uint64_t card[MAX_SPARSE], fkey[MAX_SPARSE];
    int wide[MAX_SPARSE], churn[MAX_SPARSE];
    double miss_c[MAX_SPARSE];
    double miss_d[MAX_DENSE], neg_d[MAX_DENSE], mu[MAX_DENSE], sig[MAX_DENSE], a[MAX_DENSE],
        m[MAX_DENSE], inv_w[MAX_DENSE], hmean[MAX_DENSE];
    double vbias[MAX_V], vcdf[MAX_V];
    int npairs;
    unsigned char pf[MAX_SPARSE * (MAX_SPARSE - 1) / 2], pg[MAX_SPARSE * (MAX_SPARSE - 1) / 2];
    double pc[MAX_SPARSE * (MAX_SPARSE - 1) / 2];
    /* per window (recomputed at each window start) */
    int t;
    double cos_t, sin_t;
    double wmean[MAX_SPARSE], umean[MAX_SPARSE][MAX_LATENT], vmean[MAX_SPARSE][MAX_V];
} drift_model;

static inline double hash_normal(uint64_t h) { return em__norm_inv(((double)(h >> 11) + 0.5) * 0x1.0p-53); }
static inline double rng_normal(em_rng *r) { return hash_normal(em_rng_u64(r)); }

/* The key that rank r of field f maps to in window t (see the header: churn). */
static inline uint64_t rank_key(const drift_model *m, int f, uint64_t r, int t) {
    if (!m->churn[f]) return r;
    double phase = (double)(em_mix64(m->fkey[f] ^ 0x636875726eull ^ em_mix64(r)) >> 11) * 0x1.0p-53;
    uint64_t g = (uint64_t)floor((double)t * m->turnover + phase);
    return r + m->card[f] * g;
}

/* The raw (uncentered) terms of key `key` of field f in the current window: returns
 * the global weight, writes the latent vector u[k] and, for vertical v >= 0, the
 * vertical's weight *vw (all verticals' weights into vw[nv] when v < 0). */
static inline double key_params(const drift_model *m, int f, uint64_t key, int v, double *u, double *vw) {
    uint64_t h = em_mix64(m->fkey[f] ^ em_mix64(key));
    for (int c = 0; c < m->k; c++) u[c] = m->u_scale * hash_normal(em_mix64(h + 1 + (uint64_t)c));
    double w = hash_normal(h) * m->cos_t;
    if (m->rotate) w += hash_normal(em_mix64(h ^ 0x726f74617465ull)) * m->sin_t;
    int v0 = v < 0 ? 0 : v, v1 = v < 0 ? m->nv : v + 1;
    for (int i = v0; i < v1; i++) {
        uint64_t hv = em_mix64(h ^ (0x7665727400000000ull + (uint64_t)i));
        double a = hash_normal(hv) * m->cos_t;
        if (m->rotate) a += hash_normal(em_mix64(hv + 0x5a5a)) * m->sin_t;
        vw[i - v0] = m->vscale * a;
    }
    return m->id_scale * w;
}

static inline double dense_effect(const drift_model *m, int j, double t) {
    return m->a[j] * tanh((t - m->m[j]) * m->inv_w[j]);
}

static double dense_draw(const drift_model *m, int j, em_rng *r, int64_t *x) {
    double v = em_rng_uniform(r);
    if (v < m->miss_d[j]) *x = INT64_MIN; /* missing */
    else if (v < m->miss_d[j] + m->neg_d[j]) *x = -1;
    else {
        double c = floor(exp(m->mu[j] + m->sig[j] * rng_normal(r)) - 0.5);
        *x = c < 0 ? 0 : c > 1e9 ? 1000000000 : (int64_t)c;
    }
    return *x > 0 ? (double)(float)log1p((double)*x) : 0.0; /* what the parser yields */
}

/* Integral of x^-s (gen.c's H), for the Zipf mass of the tail beyond the head. */
static double zipf_H(double s, double x) {
    return fabs(1 - s) < 1e-12 ? log(x) : (pow(x, 1 - s) - 1) / (1 - s);
}

static void model_init(drift_model *m, const em_drift_cfg *cfg) {
    const em_gen_cfg *b = &cfg->base;
    memset(m, 0, sizeof *m);
    m->nd = b->num_dense, m->ns = b->num_sparse, m->k = b->latent_dim, m->nv = cfg->verticals;
    m->seed = b->seed;
    m->bias = b->bias, m->id_scale = b->id_scale, m->u_scale = 1.0 / sqrt((double)m->k);
    m->vscale = cfg->vertical_scale, m->turnover = cfg->turnover, m->drift = cfg->drift;
    m->rotate = cfg->drift > 0;
    em_rng r;
    em_rng_seed(&r, em_mix64(b->seed ^ 0x64726966746d6f64ull)); /* "driftmod" */
    for (int f = 0; f < m->ns; f++) {
        m->card[f] = b->cardinality ? (uint64_t)b->cardinality[f] : (uint64_t)em__gen_default_card(f);
        em__zipf_init(&m->zipf[f], m->card[f], b->zipf_s);
        m->fkey[f] = em_rng_u64(&r);
        m->wide[f] = m->card[f] > 0xffffffffull;
        m->churn[f] = cfg->turnover > 0 && m->card[f] >= (uint64_t)cfg->churn_min_card;
        double u = em_rng_uniform(&r), v = em_rng_uniform(&r);
        m->miss_c[f] = u < 0.25 ? 0.05 + 0.35 * v : 0.0;
    }
    for (int j = 0; j < m->nd; j++) {
        m->miss_d[j] = 0.02 + 0.16 * em_rng_uniform(&r);
        m->neg_d[j] = j % 4 == 1 ? 0.05 : 0.0;
        m->mu[j] = 0.2 + 3.8 * em_rng_uniform(&r);
        m->sig[j] = 0.6 + 1.0 * em_rng_uniform(&r);
        m->a[j] = DENSE_SCALE * rng_normal(&r);
        m->m[j] = log1p(exp(m->mu[j]));
        m->inv_w[j] = 1.0 / (1.0 + m->sig[j]);
    }
    m->npairs = 0;
    for (int f = 0; f < m->ns; f++)
        for (int g = f + 1; g < m->ns; g++) {
            double u = em_rng_uniform(&r), c = rng_normal(&r);
            if (u < PAIR_PROB) {
                m->pf[m->npairs] = (unsigned char)f, m->pg[m->npairs] = (unsigned char)g;
                m->pc[m->npairs++] = c * b->interaction_scale;
            }
        }
    double tot = 0;
    for (int v = 0; v < m->nv; v++) {
        m->vbias[v] = cfg->vertical_bias * rng_normal(&r);
        double s = cfg->shares ? cfg->shares[v] : m->nv == 3 ? (double[]){0.5, 0.3, 0.2}[v] : 1.0 / (v + 1);
        tot += s;
        m->vcdf[v] = tot;
    }
    for (int v = 0; v < m->nv; v++) m->vcdf[v] /= tot;
    m->vcdf[m->nv - 1] = 1.0; /* a draw < 1 always lands */
    em_rng_seed(&r, em_mix64(b->seed ^ 0x63656e746572ull)); /* dense centering */
    for (int j = 0; j < m->nd; j++) {
        double acc = 0;
        int64_t x;
        for (int i = 0; i < CENTER_MC; i++) acc += dense_effect(m, j, dense_draw(m, j, &r, &x));
        m->hmean[j] = acc / CENTER_MC;
    }
}

/* Per-window centering of field f's id terms (see the header). */
static void center_field(drift_model *m, int f) {
    const em__zipf *z = &m->zipf[f];
    uint64_t head = m->card[f] < CENTER_HEAD ? m->card[f] : CENTER_HEAD;
    double norm = 0, w = 0, um[MAX_LATENT] = {0}, vm[MAX_V] = {0}, u[MAX_LATENT], vw[MAX_V];
    for (uint64_t i = 0; i < head; i++) {
        double p = exp(-z->s * log((double)(i + 1)));
        norm += p;
        w += p * key_params(m, f, rank_key(m, f, i, m->t), -1, u, vw);
        for (int c = 0; c < m->k; c++) um[c] += p * u[c];
        for (int v = 0; v < m->nv; v++) vm[v] += p * vw[v];
    }
    if (m->card[f] > head) norm += zipf_H(z->s, z->n + 0.5) - zipf_H(z->s, (double)head + 0.5);
    m->wmean[f] = w / norm;
    for (int c = 0; c < m->k; c++) m->umean[f][c] = um[c] / norm;
    for (int v = 0; v < m->nv; v++) m->vmean[f][v] = vm[v] / norm;
}

static void center_task(void *p, int ith, int nth) {
    drift_model *m = p;
    size_t lo, hi;
    em_split((size_t)m->ns, ith, nth, &lo, &hi);
    for (size_t f = lo; f < hi; f++) center_field(m, (int)f);
}

static void window_begin(drift_model *m, int t, em_pool *pool) {
    m->t = t;
    double th = m->drift * (double)t;
    m->cos_t = cos(th), m->sin_t = sin(th);
    em_pool_run(pool, center_task, m);
}

/* ------------------------------------------------------------ generation */

typedef struct {
    char *text, *side;
    size_t tlen, slen;
    uint64_t rows[MAX_V], clicks[MAX_V];
    double psum[MAX_V];
} block_buf;

static size_t row_max(const drift_model *m) { return 2 + 13 * (size_t)m->nd + 17 * (size_t)m->ns + 2; }

static void gen_block(const drift_model *m, uint64_t blk, uint64_t n, block_buf *bb) {
    em_rng r;
    em_rng_seed(&r, em_mix64(m->seed ^ em_mix64(em_mix64(0x64726966ull + (uint64_t)m->t) ^ blk)));
    const int nd = m->nd, ns = m->ns, k = m->k;
    double u[MAX_SPARSE * MAX_LATENT];
    uint64_t keys[MAX_SPARSE];
    int present[MAX_SPARSE];
    int64_t x[MAX_DENSE];
    char *o = bb->text, *so = bb->side;
    memset(bb->rows, 0, sizeof bb->rows), memset(bb->clicks, 0, sizeof bb->clicks);
    memset(bb->psum, 0, sizeof bb->psum);
    for (uint64_t row = 0; row < n; row++) {
        double pv = em_rng_uniform(&r);
        int v = 0;
        while (pv >= m->vcdf[v]) v++;
        double logit = m->bias + m->vbias[v];
        for (int j = 0; j < nd; j++) logit += dense_effect(m, j, dense_draw(m, j, &r, &x[j])) - m->hmean[j];
        for (int f = 0; f < ns; f++) {
            present[f] = !(m->miss_c[f] > 0 && em_rng_uniform(&r) < m->miss_c[f]);
            if (!present[f]) continue;
            uint64_t key = rank_key(m, f, em__zipf_sample(&m->zipf[f], &r), m->t);
            keys[f] = key;
            double *uf = u + f * k, vw;
            logit += key_params(m, f, key, v, uf, &vw) - m->wmean[f] + vw - m->vmean[f][v];
            for (int c = 0; c < k; c++) uf[c] -= m->umean[f][c];
        }
        for (int p = 0; p < m->npairs; p++) {
            int f = m->pf[p], g = m->pg[p];
            if (!present[f] || !present[g]) continue;
            const double *a = u + f * k, *b = u + g * k;
            double dot = 0;
            for (int c = 0; c < k; c++) dot += a[c] * b[c];
            logit += m->pc[p] * dot;
        }
        double prob = 1.0 / (1.0 + exp(-logit));
        int label = em_rng_uniform(&r) < prob;
        bb->rows[v]++, bb->clicks[v] += (uint64_t)label, bb->psum[v] += prob;

        *o++ = (char)('0' + label);
        for (int j = 0; j < nd; j++) {
            *o++ = '\t';
            if (x[j] != INT64_MIN) o = em__put_int(o, x[j]);
        }
        for (int f = 0; f < ns; f++) {
            *o++ = '\t';
            if (!present[f]) continue;
            if (m->wide[f] || m->churn[f]) o = em__put_hex(o, em_mix64(keys[f] ^ m->fkey[f]), 16);
            else o = em__put_hex(o, em__gen_written_id(keys[f], m->card[f], (uint32_t)m->fkey[f]), 8);
        }
        *o++ = '\n';
        so = em__put_int(so, v);
        *so++ = '\t';
        so = em__put_int(so, m->t);
        so += snprintf(so, 32, "\t%.9g\n", prob);
    }
    bb->tlen = (size_t)(o - bb->text);
    bb->slen = (size_t)(so - bb->side);
}

typedef struct {
    const drift_model *m;
    uint64_t first_block, rows; /* rows of the current window */
    int nblocks;
    block_buf *bufs;
} round_arg;

static void round_task(void *p, int ith, int nth) {
    round_arg *ra = p;
    size_t lo, hi;
    em_split((size_t)ra->nblocks, ith, nth, &lo, &hi);
    for (size_t i = lo; i < hi; i++) {
        uint64_t blk = ra->first_block + i, start = blk * BLOCK_ROWS;
        uint64_t n = ra->rows - start < BLOCK_ROWS ? ra->rows - start : BLOCK_ROWS;
        gen_block(ra->m, blk, n, &ra->bufs[i]);
    }
}

typedef struct {
    const char *path;
    FILE *f;
} out_file;

static em_status out_open(out_file *o, const char *path) {
    o->path = path, o->f = NULL;
    if (!path) return EM_OK;
    o->f = strcmp(path, "-") == 0 ? stdout : fopen(path, "wb");
    if (!o->f) return em_errorf(EM_ERR_IO, "cannot create '%s': %s", path, strerror(errno));
    return EM_OK;
}

static em_status out_write(out_file *o, const void *p, size_t n) {
    if (o->f && n && fwrite(p, 1, n, o->f) != n)
        return em_errorf(EM_ERR_IO, "write '%s': %s", o->path, strerror(errno));
    return EM_OK;
}

static em_status out_close(out_file *o, em_status s) {
    if (!o->f) return s;
    int bad = o->f == stdout ? fflush(o->f) != 0 : fclose(o->f) != 0;
    o->f = NULL;
    if (bad && s == EM_OK) return em_errorf(EM_ERR_IO, "close '%s': %s", o->path, strerror(errno));
    return s;
}

static em_status check_cfg(const em_drift_cfg *cfg, const char *data_path, const char *side_path) {
    if (!cfg) return em_errorf(EM_ERR_INVALID, "gen --drift: no config");
    const em_gen_cfg *b = &cfg->base;
    if (b->num_dense < 0 || b->num_dense > MAX_DENSE || b->num_sparse < 0 || b->num_sparse > MAX_SPARSE ||
        b->latent_dim < 1 || b->latent_dim > MAX_LATENT || !(b->zipf_s > 0) || !(b->id_scale >= 0) ||
        !(b->interaction_scale >= 0) || !isfinite(b->bias) || !isfinite(b->id_scale) ||
        !isfinite(b->interaction_scale) || !isfinite(b->zipf_s))
        return em_errorf(EM_ERR_INVALID, "gen --drift: bad base config (dense <= %d, sparse <= %d, 1 <= latent_dim <= %d, zipf_s > 0, scales >= 0)",
                         MAX_DENSE, MAX_SPARSE, MAX_LATENT);
    if (b->cardinality)
        for (int f = 0; f < b->num_sparse; f++)
            if (b->cardinality[f] < 1)
                return em_errorf(EM_ERR_INVALID, "gen --drift: cardinality[%d] = %lld must be >= 1", f,
                                 (long long)b->cardinality[f]);
    if (b->seq_len_mean > 0)
        return em_errorf(EM_ERR_INVALID, "gen --drift: sequences (seq_len_mean) are not supported in the drifting stream");
    if (cfg->rows < 1 || cfg->windows < 1 || (uint64_t)cfg->windows > cfg->rows)
        return em_errorf(EM_ERR_INVALID, "gen --drift: need 1 <= windows (%d) <= rows (%llu)", cfg->windows,
                         (unsigned long long)cfg->rows);
    if (cfg->verticals < 1 || cfg->verticals > MAX_V)
        return em_errorf(EM_ERR_INVALID, "gen --drift: verticals = %d, must be in [1, %d]", cfg->verticals, MAX_V);
    if (cfg->shares) {
        double tot = 0;
        for (int v = 0; v < cfg->verticals; v++) {
            if (!(cfg->shares[v] >= 0) || !isfinite(cfg->shares[v]))
                return em_errorf(EM_ERR_INVALID, "gen --drift: share[%d] = %g must be finite and >= 0", v,
                                 cfg->shares[v]);
            tot += cfg->shares[v];
        }
        if (!(tot > 0)) return em_errorf(EM_ERR_INVALID, "gen --drift: the traffic shares sum to 0");
    }
    if (!(cfg->turnover >= 0 && cfg->turnover <= 1))
        return em_errorf(EM_ERR_INVALID, "gen --drift: turnover = %g, must be in [0, 1]", cfg->turnover);
    if (!(cfg->drift >= 0) || !isfinite(cfg->drift) || !(cfg->vertical_scale >= 0) ||
        !isfinite(cfg->vertical_scale) || !(cfg->vertical_bias >= 0) || !isfinite(cfg->vertical_bias))
        return em_errorf(EM_ERR_INVALID, "gen --drift: drift, vertical_scale and vertical_bias must be finite and >= 0");
    if (cfg->churn_min_card < 1)
        return em_errorf(EM_ERR_INVALID, "gen --drift: churn_min_card = %lld, must be >= 1",
                         (long long)cfg->churn_min_card);
    if (!data_path || !side_path)
        return em_errorf(EM_ERR_INVALID, "gen --drift: the data and sidecar paths are required");
    if (strcmp(data_path, "-") == 0 && strcmp(side_path, "-") == 0)
        return em_errorf(EM_ERR_INVALID, "gen --drift: only one output can be stdout");
    return EM_OK;
}

em_status em_gen_drift_write(const em_drift_cfg *cfg, const char *data_path, const char *side_path,
                             const char *summary_path, em_pool *pool) {
    em_status s = check_cfg(cfg, data_path, side_path);
    if (s != EM_OK) return s;
    if (summary_path && strcmp(summary_path, "-") == 0 &&
        (strcmp(data_path, "-") == 0 || strcmp(side_path, "-") == 0))
        return em_errorf(EM_ERR_INVALID, "gen --drift: only one output can be stdout");

    const int nth = em_pool_nth(pool), maxblocks = 4 * nth;
    drift_model *m = em_malloc(sizeof *m);
    block_buf *bufs = em_calloc((size_t)maxblocks, sizeof *bufs);
    out_file od = {0}, os = {0}, oy = {0};
    if (!m || !bufs) goto nomem;
    model_init(m, cfg);
    for (int i = 0; i < maxblocks; i++) {
        bufs[i].text = em_malloc(BLOCK_ROWS * row_max(m));
        bufs[i].side = em_malloc(BLOCK_ROWS * SIDE_MAX);
        if (!bufs[i].text || !bufs[i].side) goto nomem;
    }
    if ((s = out_open(&od, data_path)) != EM_OK || (s = out_open(&os, side_path)) != EM_OK ||
        (s = out_open(&oy, summary_path)) != EM_OK)
        goto done;
    const uint64_t W = (uint64_t)cfg->windows;
    for (uint64_t t = 0; t < W; t++) {
        /* rows [t*N/W, (t+1)*N/W), exact in 128 bits */
        uint64_t lo = (uint64_t)((unsigned __int128)cfg->rows * t / W);
        uint64_t hi = (uint64_t)((unsigned __int128)cfg->rows * (t + 1) / W);
        uint64_t n = hi - lo, nblocks = (n + BLOCK_ROWS - 1) / BLOCK_ROWS;
        window_begin(m, (int)t, pool);
        uint64_t rows[MAX_V] = {0}, clicks[MAX_V] = {0};
        double psum[MAX_V] = {0};
        for (uint64_t b0 = 0; b0 < nblocks; b0 += (uint64_t)maxblocks) {
            round_arg ra = {m, b0, n,
                            (int)(nblocks - b0 < (uint64_t)maxblocks ? nblocks - b0 : (uint64_t)maxblocks), bufs};
            em_pool_run(pool, round_task, &ra);
            for (int i = 0; i < ra.nblocks; i++) {
                if ((s = out_write(&od, bufs[i].text, bufs[i].tlen)) != EM_OK ||
                    (s = out_write(&os, bufs[i].side, bufs[i].slen)) != EM_OK)
                    goto done;
                for (int v = 0; v < m->nv; v++)
                    rows[v] += bufs[i].rows[v], clicks[v] += bufs[i].clicks[v], psum[v] += bufs[i].psum[v];
            }
        }
        if (oy.f)
            for (int v = 0; v < m->nv; v++) {
                char line[160];
                int len = snprintf(line, sizeof line, "%llu\t%d\t%llu\t%llu\t%.6f\t%.6f\n", (unsigned long long)t, v,
                                   (unsigned long long)rows[v], (unsigned long long)clicks[v],
                                   rows[v] ? psum[v] / (double)rows[v] : 0.0, m->drift * (double)t);
                if ((s = out_write(&oy, line, (size_t)len)) != EM_OK) goto done;
            }
    }
    goto done;
nomem:
    s = em_errorf(EM_ERR_NOMEM, "gen --drift: out of memory");
done:
    s = out_close(&od, s);
    s = out_close(&os, s);
    s = out_close(&oy, s);
    if (bufs)
        for (int i = 0; i < maxblocks; i++) em_free(bufs[i].text), em_free(bufs[i].side);
    em_free(bufs), em_free(m);
    return s;
}
