/*
 * gen.c - the synthetic Criteo-like data generator with a planted ground truth.
 *
 *   logit = bias + sum_j a_j * h_j(t_j) + sum_f w_f(id_f) + sum_{f<g} c_fg <u_f(id_f), u_g(id_g)>
 *   label ~ Bernoulli(sigmoid(logit))
 *
 * Design choices (all derived from cfg->seed; nothing depends on the thread count):
 *  - Categoricals. Field f draws id in [0, cardinality[f]) from Zipf(zipf_s) by
 *    rejection-inversion (Hormann & Derflinger 1996): O(1) memory per field, any
 *    s > 0 including s = 1. Id 0 is the most popular. Default cardinalities are the
 *    per-field distinct counts of the Criteo Kaggle (Display Advertising Challenge)
 *    training set. About a quarter of the fields (chosen from the seed) are missing
 *    at a field rate in [5%, 40%], as some Criteo fields are; a missing field
 *    contributes nothing (w = 0, u = 0) and is written empty.
 *  - Written ids. An id is written as 8 lowercase hex digits of id + card * k with k a
 *    scramble of (id, field key): the value is congruent to the id modulo the field's
 *    cardinality, so a table with rows = cardinality (the Kaggle configuration) maps
 *    ids one-to-one, as Criteo's dictionary-encoded preprocessing does, while other
 *    table sizes hash; distinct ids stay distinct strings and popular ids are not
 *    small numbers. A field with more than 2^32 ids uses 16 digits of a 64-bit bijection.
 *  - Per-id parameters. w_f(id) ~ N(0, id_scale^2) and u_f(id) ~ N(0, 1/latent_dim)
 *    per component are normals computed from hashes of (seed, field, id) with an
 *    inverse-CDF (no table, O(1) memory; the same id always gets the same values).
 *  - Interactions. Each field pair f < g is active with probability 0.3 (from the
 *    seed) with c_fg ~ N(0, 1) * interaction_scale; inactive pairs are 0.
 *  - Dense. Field j is missing with probability in [2%, 18%] (mean ~10%); every fourth
 *    field emits -1 with probability 5% (Criteo has such negatives); otherwise
 *    x = floor(exp(mu_j + sigma_j z) - 0.5) clamped to [0, 1e9] with mu_j in [0.2, 4],
 *    sigma_j in [0.6, 1.6] (heavy-tailed counts). The model sees t_j = the parser's
 *    (float)log1p(max(x, 0)) (0 if missing), and the planted effect is
 *    a_j * tanh((t_j - m_j) / (1 + sigma_j)) with m_j = log1p(exp(mu_j)) and
 *    a_j ~ N(0, 0.3^2): mild, saturating nonlinearity.
 *  - Centering. Each field's Zipf-weighted mean of w and u, and each dense term's
 *    mean, are subtracted (model_center), so the base CTR is set by `bias` rather
 *    than by the luck of the few head ids' weights.
 *  - Defaults (em_gen_default: id_scale 0.22, interaction_scale 0.15, latent_dim 4,
 *    zipf_s 1.05, bias -1.45) give a base CTR of ~25% (0.24-0.26 over seeds 1-3) and
 *    a test AUC of the true probabilities of ~0.79-0.81, log loss ~0.45 (measured on
 *    200k test rows; tests/test_data_gen.c checks 40k). 1M train + 200k test rows
 *    take ~2.4 s on 2 threads.
 *
 * Sequences (seq_len_mean > 0; docs/FORMATS.md section 3). Categorical seq_field (C10 by
 * default) holds a candidate item and a sequence column after the categoricals holds
 * the example's history of items from the same id space, so that a model reading the
 * history can beat one that does not:
 *  - Length L = min(seq_max, floor(exp(mu + sigma z))), mu = log(seq_len_mean) -
 *    sigma^2 / 2 (lognormal, long-tailed, capped). Items Zipf like the field's ids;
 *    types 0/1/2 (click/cart/order) with probabilities 0.85/0.10/0.05; ages built
 *    backwards from the example's time with lognormal gaps (median 600 s, sigma 2:
 *    bursts of activity minutes apart, sessions days apart), written oldest first.
 *  - Candidate: with probability seq_repeat (and L > 0) a uniformly chosen history
 *    item (people return to what they looked at), else a fresh Zipf draw.
 *  - Planted term: item vectors v(id) with k = latent_dim components of std k^-1/4
 *    (so <v_a, v_b> has variance 1 and <v_a, v_a> ~ sqrt(k)), hashed from (seed, id)
 *    and centered; per event a_i = w(type_i) exp(-age_i / seq_decay) with w = seq_type_w
 *    (default 1, 2, 3: an order says more than a click; `gen --seq-type-weights` makes
 *    the types' signals differ more, e.g. 0.25,1,6, for event-level personalization);
 *    s = sum_i a_i <v(cand), v(item_i)> / sqrt(1 + sum_i a_i^2) (0 for no history;
 *    variance between 0 and 1, growing with the weight of recent history); logit +=
 *    seq_scale * (s - E[s]), E[s] estimated once by simulation (10k examples; a
 *    repeated item matches itself, so s leans positive) to keep the base CTR at the
 *    bias's. The candidate also keeps its field's per-id weight and pairwise terms.
 *  - Streams. The history and the candidate come from a second RNG stream per block;
 *    the main stream makes exactly the draws it makes without sequences (the
 *    candidate field's own draw is made and discarded), so with the same seed the
 *    dense fields and the other categoricals are the same as without sequences and
 *    only the candidate, the history and the labels differ; and seq_scale changes
 *    only the labels and probabilities.
 *  Without sequences none of this runs and the output is unchanged.
 *
 * Parallelism. Rows are generated in blocks of BLOCK_ROWS; block i of the train (test)
 * split draws from its own RNG stream seeded from (seed, split, i), train and test
 * streams being disjoint. A round of blocks is generated over the pool (contiguous
 * split of the blocks), then written in block order by the caller, so the files are
 * byte-identical for any thread count. Memory: one round of text buffers.
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
#define PAIR_PROB 0.3
#define DENSE_SCALE 0.3
#define SEQ_MAX_LIMIT 16384  /* keeps a line under the reader's 1 MiB */
#define SEQ_GAP_MU 6.3969    /* log(600): median gap between events, seconds */
#define SEQ_GAP_SIGMA 2.0
#define SEQ_AGE_MAX 1e12     /* ages are clamped (12 digits) */
#define SEQ_EV_MAX 35        /* longest written event: 16 hex + ':' + 13 + ':' + 3 + ',' */

static const int64_t KAGGLE_CARD[26] = {
    1460,  583,     10131227, 2202608, 305,   24, 12517,   633,    3,  93145, 5683, 8351593, 3194,
    27,    14992,   5461306,  10,      5652,  2173, 4,     7046547, 18, 15,    286181, 105, 142572,
};

em_gen_cfg em_gen_default(void) {
    return (em_gen_cfg){
        .train_rows = 1000000,
        .test_rows = 200000,
        .seed = 1,
        .num_dense = EM_CRITEO_DENSE,
        .num_sparse = EM_CRITEO_SPARSE,
        .cardinality = NULL,
        .zipf_s = 1.05,
        .latent_dim = 4,
        .interaction_scale = 0.15,
        .id_scale = 0.22,
        .bias = -1.45,
        .seq_len_mean = 0,
        .seq_len_sigma = 1.0,
        .seq_max = 256,
        .seq_field = 9,
        .seq_scale = 1.0,
        .seq_decay = 86400,
        .seq_repeat = 0.2,
        .seq_type_w = {1.0, 2.0, 3.0},
    };
}

/* ------------------------------------------------------------ Zipf sampler */
/*
 * Rejection-inversion for P(k) ~ k^-s on k = 1..n: invert the integral H of the hat
 * function x^-s, round to the nearest integer, and accept with a cheap test that
 * succeeds for nearly all draws (the squeeze `sq`) before the exact one.
 */
static double log1p_over_x(double x) { return fabs(x) > 1e-8 ? log1p(x) / x : 1 - x * (0.5 - x * (1.0 / 3 - 0.25 * x)); }
static double expm1_over_x(double x) { return fabs(x) > 1e-8 ? expm1(x) / x : 1 + x * 0.5 * (1 + x / 3 * (1 + 0.25 * x)); }
/* H(x) = (x^(1-s) - 1) / (1 - s), = log x at s = 1, written to be stable near s = 1 */
static double zipf_H(double s, double x) {
    double lx = log(x);
    return expm1_over_x((1 - s) * lx) * lx;
}
static double zipf_Hinv(double s, double y) {
    double t = y * (1 - s);
    if (t < -1) t = -1; /* guards rounding at the upper end */
    return exp(log1p_over_x(t) * y);
}
static double zipf_h(double s, double x) { return exp(-s * log(x)); }

void em__zipf_init(em__zipf *z, uint64_t n, double s) {
    z->n = (double)n;
    z->s = s;
    z->h_x1 = zipf_H(s, 1.5) - 1.0;
    z->h_n = zipf_H(s, z->n + 0.5);
    z->sq = 2.0 - zipf_Hinv(s, zipf_H(s, 2.5) - zipf_h(s, 2.0));
}

uint64_t em__zipf_sample(const em__zipf *z, em_rng *rng) {
    for (;;) {
        double u = z->h_n + em_rng_uniform(rng) * (z->h_x1 - z->h_n);
        double x = zipf_Hinv(z->s, u);
        double k = floor(x + 0.5);
        if (k < 1) k = 1;
        else if (k > z->n) k = z->n;
        if (k - x <= z->sq || u >= zipf_H(z->s, k + 0.5) - zipf_h(z->s, k)) return (uint64_t)k - 1;
    }
}

/* ------------------------------------------------------------ normals */

double em__norm_inv(double p) {
    static const double a[6] = {-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
                                1.383577518672690e+02,  -3.066479806614716e+01, 2.506628277459239e+00};
    static const double b[5] = {-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
                                6.680131188771972e+01,  -1.328068155288572e+01};
    static const double c[6] = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
                                -2.549732539343734e+00, 4.374664141464968e+00,  2.938163982698783e+00};
    static const double d[4] = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
                                3.754408661907416e+00};
    const double lo = 0.02425;
    if (p < lo || p > 1 - lo) {
        double q = sqrt(-2 * log(p < lo ? p : 1 - p));
        double x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
                   ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
        return p < lo ? x : -x;
    }
    double q = p - 0.5, r = q * q;
    return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
           (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
}

/* A uniform in (0, 1) from 53 bits of a hash, and the normal it maps to. */
static inline double hash_normal(uint64_t h) { return em__norm_inv(((double)(h >> 11) + 0.5) * 0x1.0p-53); }
static inline double rng_normal(em_rng *r) { return hash_normal(em_rng_u64(r)); }

/* ------------------------------------------------------------ the model */

typedef struct {
    int nd, ns, k;
    uint64_t seed;
    double bias, id_scale, u_scale;
    em__zipf zipf[MAX_SPARSE];
    uint64_t card[MAX_SPARSE], fkey[MAX_SPARSE];
    int wide[MAX_SPARSE]; /* 16 hex digits */
    double miss_c[MAX_SPARSE];
    double wmean[MAX_SPARSE], umean[MAX_SPARSE][MAX_LATENT], hmean[MAX_DENSE];
    double miss_d[MAX_DENSE], neg_d[MAX_DENSE], mu[MAX_DENSE], sig[MAX_DENSE], a[MAX_DENSE],
        m[MAX_DENSE], inv_w[MAX_DENSE];
    int npairs;
    unsigned char pf[MAX_SPARSE * (MAX_SPARSE - 1) / 2], pg[MAX_SPARSE * (MAX_SPARSE - 1) / 2];
    double pc[MAX_SPARSE * (MAX_SPARSE - 1) / 2];
    /* sequences (seq = 0: off) */
    int seq, sf, seq_max;
    double seq_mu, seq_sigma, seq_scale, seq_inv_decay, seq_repeat, v_scale, seq_mean, seq_wt[3];
    uint64_t vkey;
    double vmean[MAX_LATENT];
} gen_model;

/* The raw per-id parameters (before centering) of id `id` of field f. */
static inline double id_params(const gen_model *m, int f, uint64_t id, double *u) {
    uint64_t h = em_mix64(m->fkey[f] ^ em_mix64(id));
    for (int c = 0; c < m->k; c++) u[c] = m->u_scale * hash_normal(em_mix64(h + 1 + (uint64_t)c));
    return m->id_scale * hash_normal(h);
}

/* The item vector v(id) of the sequence term (centered). */
static inline void item_vec(const gen_model *m, uint64_t id, double *v) {
    uint64_t h = em_mix64(m->vkey ^ em_mix64(id));
    for (int c = 0; c < m->k; c++) v[c] = m->v_scale * hash_normal(em_mix64(h + 1 + (uint64_t)c)) - m->vmean[c];
}

static int gen_history(const gen_model *m, em_rng *q, uint64_t *items, int64_t *age, int *type,
                       uint64_t *cand);
static double history_term(const gen_model *m, uint64_t cand, const uint64_t *items,
                           const int64_t *age, const int *type, int L);

/* Planted dense effect of field j given the value the model sees. */
static inline double dense_effect(const gen_model *m, int j, double t) {
    return m->a[j] * tanh((t - m->m[j]) * m->inv_w[j]);
}

static double dense_draw(const gen_model *m, int j, em_rng *r, int64_t *x) {
    double v = em_rng_uniform(r);
    if (v < m->miss_d[j]) *x = INT64_MIN; /* missing */
    else if (v < m->miss_d[j] + m->neg_d[j]) *x = -1;
    else {
        double c = floor(exp(m->mu[j] + m->sig[j] * rng_normal(r)) - 0.5);
        *x = c < 0 ? 0 : c > 1e9 ? 1000000000 : (int64_t)c;
    }
    return *x > 0 ? (double)(float)log1p((double)*x) : 0.0; /* what the parser yields */
}

/*
 * Centering. With Zipf ids a handful of head ids carry most of the mass, so the raw
 * weights of the head shift the mean logit (and the base CTR) by a seed-dependent
 * amount. Subtract each field's Zipf-weighted mean of w and u, computed over the first
 * CENTER_HEAD ids (the tail's share is folded into the normaliser through the
 * integral H): the expected id and interaction terms become ~0, and the base CTR is
 * set by the bias. The dense terms are centered on a fixed Monte-Carlo estimate.
 */
#define CENTER_HEAD 4096
#define CENTER_MC 20000
static void model_center(gen_model *m) {
    double u[MAX_LATENT];
    for (int f = 0; f < m->ns; f++) {
        const em__zipf *z = &m->zipf[f];
        uint64_t head = m->card[f] < CENTER_HEAD ? m->card[f] : CENTER_HEAD;
        double norm = 0, w = 0, um[MAX_LATENT] = {0};
        for (uint64_t i = 0; i < head; i++) {
            double p = zipf_h(z->s, (double)(i + 1));
            norm += p;
            w += p * id_params(m, f, i, u);
            for (int c = 0; c < m->k; c++) um[c] += p * u[c];
        }
        if (m->card[f] > head) norm += zipf_H(z->s, z->n + 0.5) - zipf_H(z->s, (double)head + 0.5);
        m->wmean[f] = w / norm;
        for (int c = 0; c < m->k; c++) m->umean[f][c] = um[c] / norm;
    }
    em_rng r;
    em_rng_seed(&r, em_mix64(m->seed ^ 0x63656e746572ull));
    for (int j = 0; j < m->nd; j++) {
        double acc = 0;
        int64_t x;
        for (int i = 0; i < CENTER_MC; i++) acc += dense_effect(m, j, dense_draw(m, j, &r, &x));
        m->hmean[j] = acc / CENTER_MC;
    }
}

static void model_init(gen_model *m, const em_gen_cfg *cfg) {
    memset(m, 0, sizeof *m); /* em_malloc does not clear; the sequence part is off unless set */
    m->nd = cfg->num_dense, m->ns = cfg->num_sparse, m->k = cfg->latent_dim;
    m->seed = cfg->seed;
    m->bias = cfg->bias, m->id_scale = cfg->id_scale, m->u_scale = 1.0 / sqrt((double)m->k);
    em_rng r;
    em_rng_seed(&r, em_mix64(cfg->seed ^ 0x6d6f64656c706172ull)); /* model parameters */
    for (int f = 0; f < m->ns; f++) {
        m->card[f] = cfg->cardinality ? (uint64_t)cfg->cardinality[f]
                                      : (uint64_t)KAGGLE_CARD[f % EM_CRITEO_SPARSE];
        em__zipf_init(&m->zipf[f], m->card[f], cfg->zipf_s);
        m->fkey[f] = em_rng_u64(&r);
        m->wide[f] = m->card[f] > 0xffffffffull;
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
                m->pc[m->npairs++] = c * cfg->interaction_scale;
            }
        }
    model_center(m);
    if (!(cfg->seq_len_mean > 0)) return;
    /* sequences: their own parameter stream, so nothing above changes */
    m->seq = 1;
    m->sf = cfg->seq_field;
    m->seq_max = cfg->seq_max;
    m->seq_sigma = cfg->seq_len_sigma;
    m->seq_mu = log(cfg->seq_len_mean) - 0.5 * cfg->seq_len_sigma * cfg->seq_len_sigma;
    m->seq_scale = cfg->seq_scale;
    m->seq_inv_decay = 1.0 / cfg->seq_decay;
    m->seq_repeat = cfg->seq_repeat;
    for (int t = 0; t < 3; t++) m->seq_wt[t] = cfg->seq_type_w[t];
    m->v_scale = pow((double)m->k, -0.25);
    m->vkey = em_mix64(cfg->seed ^ 0x7365716974656d73ull); /* "seqitems" */
    const em__zipf *z = &m->zipf[m->sf];
    uint64_t head = m->card[m->sf] < CENTER_HEAD ? m->card[m->sf] : CENTER_HEAD;
    double norm = 0, v[MAX_LATENT], vm[MAX_LATENT] = {0};
    for (uint64_t i = 0; i < head; i++) {
        double p = zipf_h(z->s, (double)(i + 1));
        norm += p;
        item_vec(m, i, v); /* vmean is still 0 */
        for (int c = 0; c < m->k; c++) vm[c] += p * v[c];
    }
    if (m->card[m->sf] > head) norm += zipf_H(z->s, z->n + 0.5) - zipf_H(z->s, (double)head + 0.5);
    for (int c = 0; c < m->k; c++) m->vmean[c] = vm[c] / norm;
}

/* Sequences: the mean of the history term over CENTER_MC_SEQ simulated examples (a
 * repeated item matches itself, so the term's mean is positive), subtracted so that
 * the base CTR stays set by the bias. Scratch: `items` etc. of seq_max entries. */
#define CENTER_MC_SEQ 10000
static void seq_center(gen_model *m, uint64_t *items, int64_t *age, int *type) {
    em_rng q;
    em_rng_seed(&q, em_mix64(m->seed ^ 0x73657163656e7472ull)); /* "seqcentr" */
    double acc = 0;
    for (int i = 0; i < CENTER_MC_SEQ; i++) {
        uint64_t cand;
        int L = gen_history(m, &q, items, age, type, &cand);
        acc += history_term(m, cand, items, age, type, L);
    }
    m->seq_mean = acc / CENTER_MC_SEQ;
}

/* Bijective mixes: distinct ids of a field stay distinct strings. */
static inline uint32_t perm32(uint32_t x, uint32_t key) {
    x ^= key;
    x *= 0x9e3779b1u;
    x ^= x >> 16;
    x *= 0x85ebca6bu;
    x ^= x >> 13;
    x *= 0xc2b2ae35u;
    x ^= x >> 16;
    return x;
}

/* The 32-bit value written for id < card: congruent to id modulo card (so a table of
 * exactly `card` rows, as in the Kaggle configuration, maps ids one-to-one, like the
 * dictionary-encoded Criteo preprocessing), and otherwise a scrambled multiple of card
 * (so the strings look like hashes, and popular ids are not small numbers). */
static inline uint64_t written_id(uint64_t id, uint64_t card, uint32_t key) {
    uint64_t q = 0xffffffffull / card; /* >= 1: v = id + card * k < card * q <= 2^32 - 1 */
    return id + card * (perm32((uint32_t)id, key) % q);
}

static const char HEXD[] = "0123456789abcdef";

static inline char *put_hex(char *o, uint64_t v, int digits) {
    for (int i = digits - 1; i >= 0; i--) o[i] = HEXD[v & 15], v >>= 4;
    return o + digits;
}

static inline char *put_int(char *o, int64_t v) {
    char tmp[24];
    int n = 0;
    uint64_t u = v < 0 ? (uint64_t)-v : (uint64_t)v;
    if (v < 0) *o++ = '-';
    do tmp[n++] = (char)('0' + u % 10);
    while (u /= 10);
    while (n) *o++ = tmp[--n];
    return o;
}

/* Shared with gen_drift.c (data_internal.h): the same id spelling and number writers,
 * so the drifting stream's lines look exactly like this generator's. */
int64_t em__gen_default_card(int f) { return KAGGLE_CARD[f % EM_CRITEO_SPARSE]; }
uint64_t em__gen_written_id(uint64_t id, uint64_t card, uint32_t key) { return written_id(id, card, key); }
char *em__put_hex(char *o, uint64_t v, int digits) { return put_hex(o, v, digits); }
char *em__put_int(char *o, int64_t v) { return put_int(o, v); }

/* Longest possible line: label, dense up to 11 chars, ids up to 16 hex digits, tabs. */
static size_t row_max(const gen_model *m) { return 2 + 13 * (size_t)m->nd + 17 * (size_t)m->ns + 2; }

typedef struct {
    char *text, *prob;
    size_t tlen, plen;
    size_t tcap;   /* bytes of text (sequences: grown as needed) */
    int failed;    /* sequences: growing text failed */
    uint64_t *hist; /* sequences: [seq_max] scratch for one history */
    int64_t *hage;
    int *htype;
} block_buf;

/* Sequences: make room for `need` more bytes of text at *o (doubling); 0 on failure. */
static int text_room(block_buf *bb, char **o, size_t need) {
    size_t used = (size_t)(*o - bb->text);
    if (used + need <= bb->tcap) return 1;
    size_t cap = bb->tcap * 2 > used + need ? bb->tcap * 2 : used + need;
    char *t = em_realloc(bb->text, cap);
    if (!t) return 0;
    bb->text = t, bb->tcap = cap, *o = t + used;
    return 1;
}

/* Sequences: one example's history into the arrays (oldest first) and its candidate,
 * from the sequence stream q. Returns the length. */
static int gen_history(const gen_model *m, em_rng *q, uint64_t *items, int64_t *age, int *type,
                       uint64_t *cand) {
    double x = exp(m->seq_mu + m->seq_sigma * rng_normal(q));
    int L = x >= (double)m->seq_max ? m->seq_max : (int)floor(x);
    double t = 0;
    for (int i = L - 1; i >= 0; i--) { /* backwards from the example's time */
        t += floor(exp(SEQ_GAP_MU + SEQ_GAP_SIGMA * rng_normal(q)));
        if (t > SEQ_AGE_MAX) t = SEQ_AGE_MAX;
        age[i] = (int64_t)t;
        items[i] = em__zipf_sample(&m->zipf[m->sf], q);
        double u = em_rng_uniform(q);
        type[i] = u < 0.85 ? 0 : u < 0.95 ? 1 : 2;
    }
    double u = em_rng_uniform(q);
    *cand = L > 0 && u < m->seq_repeat ? items[em_rng_below(q, (uint64_t)L)]
                                       : em__zipf_sample(&m->zipf[m->sf], q);
    return L;
}

/* Sequences: the planted history term s (before seq_scale). */
static double history_term(const gen_model *m, uint64_t cand, const uint64_t *items,
                           const int64_t *age, const int *type, int L) {
    double vc[MAX_LATENT], v[MAX_LATENT], S = 0, A = 0;
    item_vec(m, cand, vc);
    for (int i = 0; i < L; i++) {
        double r = (double)age[i] * m->seq_inv_decay;
        if (r > 40) continue; /* weight < 4e-18: nothing */
        double a = m->seq_wt[type[i]] * exp(-r), dot = 0;
        item_vec(m, items[i], v);
        for (int c = 0; c < m->k; c++) dot += vc[c] * v[c];
        S += a * dot;
        A += a * a;
    }
    return S / sqrt(1 + A);
}

/* Generate rows [0, n) of block `blk` of split `tag` (0 train, 1 test) into bb. */
static void gen_block(const gen_model *m, int tag, uint64_t blk, uint64_t n, int with_prob,
                      block_buf *bb) {
    em_rng r, q;
    em_rng_seed(&r, em_mix64(m->seed ^ em_mix64(((uint64_t)(tag + 1) << 56) ^ blk)));
    if (m->seq) em_rng_seed(&q, em_mix64(m->seed ^ em_mix64(((uint64_t)(tag + 1) << 56) ^ blk) ^ 0x7365717374726d73ull));
    const int nd = m->nd, ns = m->ns, k = m->k;
    double u[MAX_SPARSE * MAX_LATENT];
    uint64_t ids[MAX_SPARSE];
    int present[MAX_SPARSE];
    int64_t x[MAX_DENSE];
    char *o = bb->text, *po = with_prob ? bb->prob : NULL;
    uint64_t *hist = bb->hist;
    int64_t *hage = bb->hage;
    int *htype = bb->htype, L = 0;
    bb->failed = 0;
    for (uint64_t row = 0; row < n; row++) {
        double logit = m->bias;
        /* dense counts */
        for (int j = 0; j < nd; j++) logit += dense_effect(m, j, dense_draw(m, j, &r, &x[j])) - m->hmean[j];
        /* categoricals and their per-id parameters */
        for (int f = 0; f < ns; f++) {
            present[f] = !(m->miss_c[f] > 0 && em_rng_uniform(&r) < m->miss_c[f]);
            if (!present[f]) continue;
            uint64_t id = em__zipf_sample(&m->zipf[f], &r);
            if (m->seq && f == m->sf) continue; /* the candidate comes from the history stream */
            ids[f] = id;
            double *uf = u + f * k;
            logit += id_params(m, f, id, uf) - m->wmean[f];
            for (int c = 0; c < k; c++) uf[c] -= m->umean[f][c];
        }
        if (m->seq) { /* history, candidate, and their terms */
            uint64_t cand;
            L = gen_history(m, &q, hist, hage, htype, &cand);
            const int f = m->sf;
            present[f] = 1;
            ids[f] = cand;
            double *uf = u + f * k;
            logit += id_params(m, f, cand, uf) - m->wmean[f];
            for (int c = 0; c < k; c++) uf[c] -= m->umean[f][c];
            logit += m->seq_scale * (history_term(m, cand, hist, hage, htype, L) - m->seq_mean);
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
        if (m->seq && !text_room(bb, &o, row_max(m) + (size_t)L * SEQ_EV_MAX)) {
            bb->failed = 1;
            break;
        }

        *o++ = (char)('0' + label);
        for (int j = 0; j < nd; j++) {
            *o++ = '\t';
            if (x[j] != INT64_MIN) o = put_int(o, x[j]);
        }
        for (int f = 0; f < ns; f++) {
            *o++ = '\t';
            if (!present[f]) continue;
            if (m->wide[f]) o = put_hex(o, em_mix64(ids[f] ^ m->fkey[f]), 16);
            else o = put_hex(o, written_id(ids[f], (uint64_t)m->card[f], (uint32_t)m->fkey[f]), 8);
        }
        if (m->seq) { /* item:age:type, oldest first, items spelled as the candidate field */
            const int f = m->sf;
            *o++ = '\t';
            for (int i = 0; i < L; i++) {
                if (i) *o++ = ',';
                if (m->wide[f]) o = put_hex(o, em_mix64(hist[i] ^ m->fkey[f]), 16);
                else o = put_hex(o, written_id(hist[i], (uint64_t)m->card[f], (uint32_t)m->fkey[f]), 8);
                *o++ = ':';
                o = put_int(o, hage[i]);
                *o++ = ':';
                *o++ = (char)('0' + htype[i]);
            }
        }
        *o++ = '\n';
        if (po) po += snprintf(po, 32, "%.9g\n", prob);
    }
    bb->tlen = (size_t)(o - bb->text);
    bb->plen = po ? (size_t)(po - bb->prob) : 0;
}

typedef struct {
    const gen_model *m;
    int tag;
    uint64_t first_block, rows;
    int nblocks, with_prob;
    block_buf *bufs;
} round_arg;

static void round_task(void *p, int ith, int nth) {
    round_arg *ra = p;
    size_t lo, hi;
    em_split((size_t)ra->nblocks, ith, nth, &lo, &hi);
    for (size_t i = lo; i < hi; i++) {
        uint64_t blk = ra->first_block + i, start = blk * BLOCK_ROWS;
        uint64_t n = ra->rows - start < BLOCK_ROWS ? ra->rows - start : BLOCK_ROWS;
        gen_block(ra->m, ra->tag, blk, n, ra->with_prob, &ra->bufs[i]);
    }
}

static em_status write_split(const gen_model *m, int tag, uint64_t rows, FILE *out,
                             const char *path, FILE *pout, const char *ppath, block_buf *bufs,
                             int maxblocks, em_pool *pool) {
    uint64_t nblocks = (rows + BLOCK_ROWS - 1) / BLOCK_ROWS;
    for (uint64_t b0 = 0; b0 < nblocks; b0 += (uint64_t)maxblocks) {
        round_arg ra = {m, tag, b0, rows,
                        (int)(nblocks - b0 < (uint64_t)maxblocks ? nblocks - b0 : (uint64_t)maxblocks),
                        pout != NULL, bufs};
        em_pool_run(pool, round_task, &ra);
        for (int i = 0; i < ra.nblocks; i++) {
            if (bufs[i].failed) return em_errorf(EM_ERR_NOMEM, "gen: out of memory (sequence text)");
            if (fwrite(bufs[i].text, 1, bufs[i].tlen, out) != bufs[i].tlen)
                return em_errorf(EM_ERR_IO, "write '%s': %s", path, strerror(errno));
            if (pout && fwrite(bufs[i].prob, 1, bufs[i].plen, pout) != bufs[i].plen)
                return em_errorf(EM_ERR_IO, "write '%s': %s", ppath, strerror(errno));
        }
    }
    return EM_OK;
}

static em_status close_file(FILE *f, const char *path, em_status s) {
    if (f && fclose(f) != 0 && s == EM_OK)
        return em_errorf(EM_ERR_IO, "close '%s': %s", path, strerror(errno));
    return s;
}

em_status em_gen_write(const em_gen_cfg *cfg, const char *train_path, const char *test_path,
                       const char *test_prob_path, em_pool *pool) {
    if (!cfg || cfg->num_dense < 0 || cfg->num_dense > MAX_DENSE || cfg->num_sparse < 0 ||
        cfg->num_sparse > MAX_SPARSE || cfg->latent_dim < 1 || cfg->latent_dim > MAX_LATENT ||
        !(cfg->zipf_s > 0) || !(cfg->id_scale >= 0) || !(cfg->interaction_scale >= 0) ||
        !isfinite(cfg->bias))
        return em_errorf(EM_ERR_INVALID, "gen: bad config (dense <= %d, sparse <= %d, 1 <= latent_dim <= %d, zipf_s > 0, scales >= 0)",
                         MAX_DENSE, MAX_SPARSE, MAX_LATENT);
    if (cfg->cardinality)
        for (int f = 0; f < cfg->num_sparse; f++)
            if (cfg->cardinality[f] < 1)
                return em_errorf(EM_ERR_INVALID, "gen: cardinality[%d] = %lld must be >= 1", f,
                                 (long long)cfg->cardinality[f]);
    if (test_prob_path && !test_path)
        return em_errorf(EM_ERR_INVALID, "gen: test probabilities need a test file");
    if (cfg->seq_len_mean > 0 &&
        (!(cfg->seq_len_mean <= 1e6) || !(cfg->seq_len_sigma >= 0 && cfg->seq_len_sigma <= 10) ||
         cfg->seq_max < 1 || cfg->seq_max > SEQ_MAX_LIMIT || cfg->seq_field < 0 ||
         cfg->seq_field >= cfg->num_sparse || !isfinite(cfg->seq_scale) || !(cfg->seq_decay > 0) ||
         !(cfg->seq_repeat >= 0 && cfg->seq_repeat <= 1) || !(cfg->seq_type_w[0] >= 0 && cfg->seq_type_w[0] <= 1e6) ||
         !(cfg->seq_type_w[1] >= 0 && cfg->seq_type_w[1] <= 1e6) || !(cfg->seq_type_w[2] >= 0 && cfg->seq_type_w[2] <= 1e6)))
        return em_errorf(EM_ERR_INVALID, "gen: bad sequence config (seq_len_mean <= 1e6, 0 <= seq_len_sigma <= 10, 1 <= seq_max <= %d, 0 <= seq_field < num_sparse, seq_decay > 0, 0 <= seq_repeat <= 1, type weights in 0..1e6)",
                         SEQ_MAX_LIMIT);

    const int nth = em_pool_nth(pool), maxblocks = 4 * nth;
    gen_model *m = em_malloc(sizeof *m);
    block_buf *bufs = em_calloc((size_t)maxblocks, sizeof *bufs);
    em_status s = EM_OK;
    FILE *ftr = NULL, *fte = NULL, *fpr = NULL;
    if (!m || !bufs) goto nomem;
    model_init(m, cfg);
    for (int i = 0; i < maxblocks; i++) {
        /* without sequences a block never needs more; with them gen_block grows it (the
         * buffers are kept for all rounds, so that happens a few times per buffer) */
        bufs[i].tcap = BLOCK_ROWS * row_max(m);
        bufs[i].text = em_malloc(bufs[i].tcap);
        bufs[i].prob = em_malloc(BLOCK_ROWS * 32);
        if (!bufs[i].text || !bufs[i].prob) goto nomem;
        if (m->seq) {
            bufs[i].hist = em_malloc(sizeof(uint64_t) * (size_t)m->seq_max);
            bufs[i].hage = em_malloc(sizeof(int64_t) * (size_t)m->seq_max);
            bufs[i].htype = em_malloc(sizeof(int) * (size_t)m->seq_max);
            if (!bufs[i].hist || !bufs[i].hage || !bufs[i].htype) goto nomem;
        }
    }
    if (m->seq) seq_center(m, bufs[0].hist, bufs[0].hage, bufs[0].htype);
    struct {
        const char *path;
        FILE **f;
    } outs[3] = {{train_path, &ftr}, {test_path, &fte}, {test_prob_path, &fpr}};
    for (int i = 0; i < 3; i++) {
        if (!outs[i].path) continue;
        *outs[i].f = fopen(outs[i].path, "wb");
        if (!*outs[i].f) {
            s = em_errorf(EM_ERR_IO, "cannot create '%s': %s", outs[i].path, strerror(errno));
            goto done;
        }
    }
    if (ftr && (s = write_split(m, 0, cfg->train_rows, ftr, train_path, NULL, NULL, bufs,
                                maxblocks, pool)) != EM_OK)
        goto done;
    if (fte && (s = write_split(m, 1, cfg->test_rows, fte, test_path, fpr, test_prob_path, bufs,
                                maxblocks, pool)) != EM_OK)
        goto done;
    goto done;
nomem:
    s = em_errorf(EM_ERR_NOMEM, "gen: out of memory");
done:
    s = close_file(ftr, train_path, s);
    s = close_file(fte, test_path, s);
    s = close_file(fpr, test_prob_path, s);
    if (bufs)
        for (int i = 0; i < maxblocks; i++) {
            em_free(bufs[i].text), em_free(bufs[i].prob);
            em_free(bufs[i].hist), em_free(bufs[i].hage), em_free(bufs[i].htype);
        }
    em_free(bufs), em_free(m);
    return s;
}
