/*
 * seqcfg.c - the sequence tower's configuration (ember/seqtower.h): defaults, the block
 * lists (jattn / gdpa / swa / hsp, Kunlun's CompSkip preset), event-level
 * personalization's groups of event types, validation, and the FLOPs formulas the
 * tower counts with. The compute is in seqtower.c.
 *
 * Event groups (Kunlun's event-level personalization, em_seq_parse_events): Kunlun gives
 * each event type its own width, heads and depth so that capacity follows importance
 * (rare but telling events such as orders get a wide, deep sub-tower; frequent, weak
 * ones such as views a narrow, shallow one). The paper does not spell out how the
 * per-type streams are formed and joined; the choices here:
 *   - Every event is embedded once at the model's width D (item + age + type, the same
 *     tables for every group, so a shared candidate table keeps its D-dim rows), then
 *     projected to the group's width W by a (W, D) matrix, and the group's outputs back
 *     to D by a (D, W) one: the group's capacity (its block stack's D x D matrices and
 *     attention) scales with W^2 while the tables stay shared. W = D needs no projection.
 *   - A group is a set of types, so rare types can share a sub-tower; a type in no group
 *     is dropped (e.g. impressions a model should not spend compute on).
 *   - Each group attends within its own sub-sequence (the example's events of its types,
 *     in order), so attention cost falls from L^2 to sum_g L_g^2 besides the widths;
 *     each group has its own target attention (the candidate queries every group) and
 *     its own summary tokens, and all of them join the interaction.
 */
#include <stdio.h>
#include <string.h>

#include "model/seq_impl.h"

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

static int format_blocks(const em_seq_block *bl, int n, char *buf, size_t cap) {
    size_t k = 0;
    int total = 0;
    if (cap) buf[0] = 0;
    if (n == 0) return snprintf(buf, cap, "none");
    for (int i = 0; i < n; i++) {
        const em_seq_block *b = &bl[i];
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

int em_seq_format_blocks(const em_seq_cfg *c, char *buf, size_t cap) { return format_blocks(c->blocks, c->n_blocks, buf, cap); }

/* ------------------------------------------------------------ event groups */

/* "1,2" or "0-3,5" into a mask of types 0..EM_SEQ_GROUP_TYPES-1. */
static em_status parse_types(const char *s, size_t n, int gi, uint64_t *out) {
    uint64_t mask = 0;
    size_t i = 0;
    if (n == 0) return em_errorf(EM_ERR_INVALID, "sequence events: group %d names no event type", gi + 1);
    while (i <= n) {
        size_t e = i;
        while (e < n && s[e] != ',') e++;
        const char *dash = memchr(s + i, '-', e - i);
        long a, b;
        int bad = dash ? parse_int(s + i, (size_t)(dash - (s + i)), 0, EM_SEQ_GROUP_TYPES - 1, &a) ||
                             parse_int(dash + 1, (size_t)(s + e - dash - 1), 0, EM_SEQ_GROUP_TYPES - 1, &b) || b < a
                       : parse_int(s + i, e - i, 0, EM_SEQ_GROUP_TYPES - 1, &a) || ((b = a), 0);
        if (bad)
            return em_errorf(EM_ERR_INVALID, "sequence events: group %d: bad event type '%.*s' (types 0..%d, ranges a-b, "
                             "',' between them)", gi + 1, (int)(e - i), s + i, EM_SEQ_GROUP_TYPES - 1);
        for (long t = a; t <= b; t++) {
            if (mask >> t & 1)
                return em_errorf(EM_ERR_INVALID, "sequence events: group %d names type %ld twice", gi + 1, t);
            mask |= (uint64_t)1 << t;
        }
        i = e + 1;
    }
    *out = mask;
    return EM_OK;
}

/* One group "TYPES[:wW][:hH][:BLOCKS]" into *g (defaults from c). */
static em_status parse_group(const em_seq_cfg *c, const char *tok, size_t len, int gi, em_gdpa_act act, int window,
                             em_seq_group *g) {
    memset(g, 0, sizeof *g);
    const char *end = tok + len, *colon = memchr(tok, ':', len);
    const char *p = colon ? colon : end;
    em_status st = parse_types(tok, (size_t)(p - tok), gi, &g->types);
    if (st) return st;
    g->heads = c->heads;
    int seen_w = 0, seen_h = 0;
    while (p < end) { /* p at a ':' */
        const char *q = p + 1, *e = memchr(q, ':', (size_t)(end - q));
        if (!e) e = end;
        long v;
        char opt = *q;
        if ((opt != 'w' && opt != 'h') || parse_int(q + 1, (size_t)(e - q - 1), 0, 1L << 30, &v)) break;
        int *seen = opt == 'w' ? &seen_w : &seen_h;
        if ((*seen)++)
            return em_errorf(EM_ERR_INVALID, "sequence events: group %d gives %c twice", gi + 1, opt);
        if (v < 1 || v > 4096)
            return em_errorf(EM_ERR_INVALID, "sequence events: group %d: %s %ld outside 1..4096", gi + 1,
                             opt == 'w' ? "width" : "heads", v);
        if (opt == 'w') g->width = (int)v;
        else g->heads = (int)v;
        p = e;
    }
    if (p == end) { /* no block list: the tower's */
        g->n_blocks = c->n_blocks;
        memcpy(g->blocks, c->blocks, sizeof c->blocks);
        return EM_OK;
    }
    char blocks[1024];
    size_t bl = (size_t)(end - p - 1);
    if (bl == 0 || bl >= sizeof blocks)
        return em_errorf(EM_ERR_INVALID, "sequence events: group %d: empty or too long block list after ':'", gi + 1);
    memcpy(blocks, p + 1, bl);
    blocks[bl] = 0;
    em_seq_cfg tmp;
    memset(&tmp, 0, sizeof tmp);
    if (em_seq_parse_blocks(&tmp, blocks, act, window)) {
        char msg[300];
        snprintf(msg, sizeof msg, "%s", em_last_error());
        return em_errorf(EM_ERR_INVALID, "sequence events: group %d ('%.*s'): %s (options before the blocks: wW "
                         "width, hH heads)", gi + 1, (int)len, tok, msg);
    }
    g->n_blocks = tmp.n_blocks;
    memcpy(g->blocks, tmp.blocks, sizeof tmp.blocks);
    return EM_OK;
}

em_status em_seq_parse_events(em_seq_cfg *c, const char *spec, em_gdpa_act act, int window) {
    em_seq_group g[EM_SEQ_MAX_GROUPS];
    int n = 0;
    if (!spec) spec = "";
    if ((unsigned)act > EM_GDPA_TANH) return em_errorf(EM_ERR_INVALID, "sequence events: bad default activation");
    if (window < 0) return em_errorf(EM_ERR_INVALID, "sequence events: window %d < 0", window);
    if (*spec && strcmp(spec, "none") != 0) {
        const char *p = spec;
        uint64_t seen = 0;
        for (;;) {
            const char *e = strchr(p, ';');
            size_t len = e ? (size_t)(e - p) : strlen(p);
            if (n == EM_SEQ_MAX_GROUPS)
                return em_errorf(EM_ERR_INVALID, "sequence events: more than %d groups", EM_SEQ_MAX_GROUPS);
            em_status st = parse_group(c, p, len, n, act, window, &g[n]);
            if (st) return st;
            if (seen & g[n].types) {
                int t = __builtin_ctzll(seen & g[n].types), other = 0;
                while (!(g[other].types >> t & 1)) other++;
                return em_errorf(EM_ERR_INVALID, "sequence events: type %d is in groups %d and %d", t, other + 1, n + 1);
            }
            seen |= g[n].types;
            n++;
            if (!e) break;
            p = e + 1;
        }
    }
    c->n_groups = n;
    memcpy(c->groups, g, (size_t)n * sizeof *g);
    memset(c->groups + n, 0, (size_t)(EM_SEQ_MAX_GROUPS - n) * sizeof *g);
    return EM_OK;
}

int em_seq_format_events(const em_seq_cfg *c, char *buf, size_t cap) {
    size_t k = 0;
    int total = 0;
    if (cap) buf[0] = 0;
    if (c->n_groups <= 0) return snprintf(buf, cap, "none");
#define PUT(...)                                                                                                       \
    do {                                                                                                               \
        int w_ = snprintf(buf + k, k < cap ? cap - k : 0, __VA_ARGS__);                                               \
        total += w_;                                                                                                   \
        k = k + (size_t)w_ < cap ? k + (size_t)w_ : cap;                                                               \
    } while (0)
    for (int i = 0; i < c->n_groups && i < EM_SEQ_MAX_GROUPS; i++) {
        const em_seq_group *g = &c->groups[i];
        if (i) PUT(";");
        int first = 1;
        for (int t = 0; t < EM_SEQ_GROUP_TYPES; t++)
            if (g->types >> t & 1) {
                PUT("%s%d", first ? "" : ",", t);
                first = 0;
            }
        if (g->width) PUT(":w%d", g->width);
        PUT(":h%d:", g->heads);
        char blocks[1024];
        format_blocks(g->blocks, g->n_blocks, blocks, sizeof blocks);
        PUT("%s", blocks);
    }
#undef PUT
    return total;
}

/* ------------------------------------------------------------------ stacks */

int em__seq_n_stacks(const em_seq_cfg *c) { return c->n_groups > 0 ? c->n_groups : 1; }

static int blocks_hsp(const em_seq_block *bl, int n) {
    for (int i = 0; i < n; i++)
        if (bl[i].kind == EM_SEQB_HSP) return 1;
    return 0;
}

em__seq_stack em__seq_stack_of(const em_seq_cfg *c, int D, int g) {
    em__seq_stack k;
    if (c->n_groups > 0) {
        const em_seq_group *q = &c->groups[g];
        k.W = q->width ? q->width : D, k.H = q->heads, k.n_blocks = q->n_blocks, k.blocks = q->blocks;
    } else {
        k.W = D, k.H = c->heads, k.n_blocks = c->n_blocks, k.blocks = c->blocks;
    }
    k.proj = k.W != D;
    k.has_hsp = blocks_hsp(k.blocks, k.n_blocks);
    k.E = 1 + (k.has_hsp ? c->hsp_m2 : 0);
    return k;
}

int em_seq_extra(const em_seq_cfg *c) {
    if (!c->num_seq) return 0;
    if (c->n_groups <= 0) return 1 + (blocks_hsp(c->blocks, c->n_blocks) ? c->hsp_m2 : 0);
    int e = 0;
    for (int g = 0; g < c->n_groups && g < EM_SEQ_MAX_GROUPS; g++)
        e += 1 + (blocks_hsp(c->groups[g].blocks, c->groups[g].n_blocks) ? c->hsp_m2 : 0);
    return e;
}

static em_status check_blocks(const em_seq_block *bl, int n, const char *what) {
    if (n < 0 || n > EM_SEQ_MAX_BLOCKS)
        return em_errorf(EM_ERR_INVALID, "sequence tower: %s: %d blocks (0..%d)", what, n, EM_SEQ_MAX_BLOCKS);
    for (int i = 0; i < n; i++) {
        const em_seq_block *b = &bl[i];
        if ((unsigned)b->kind > EM_SEQB_HSP || (unsigned)b->act > EM_GDPA_TANH || b->window < 0 || (b->causal & ~1))
            return em_errorf(EM_ERR_INVALID, "sequence tower: %s: block %d is malformed", what, i);
    }
    return EM_OK;
}

static em_status check_groups(const em_seq_cfg *c, int D) {
    if (c->n_groups > EM_SEQ_MAX_GROUPS)
        return em_errorf(EM_ERR_INVALID, "sequence tower: %d event groups (at most %d)", c->n_groups, EM_SEQ_MAX_GROUPS);
    uint64_t seen = 0;
    for (int i = 0; i < c->n_groups; i++) {
        const em_seq_group *g = &c->groups[i];
        char what[32];
        snprintf(what, sizeof what, "event group %d", i + 1);
        if (!g->types) return em_errorf(EM_ERR_INVALID, "sequence tower: %s names no event type", what);
        if (c->num_types < EM_SEQ_GROUP_TYPES && g->types >> c->num_types)
            return em_errorf(EM_ERR_INVALID, "sequence tower: %s names type %d, but only %d event types are told apart "
                             "(types >= %d count as %d; raise the number of types, --seq-types)", what,
                             63 - __builtin_clzll(g->types), c->num_types, c->num_types - 1, c->num_types - 1);
        if (seen & g->types)
            return em_errorf(EM_ERR_INVALID, "sequence tower: type %d is in two event groups", __builtin_ctzll(seen & g->types));
        seen |= g->types;
        int W = g->width ? g->width : D;
        if (g->width < 0 || g->width > 4096) return em_errorf(EM_ERR_INVALID, "sequence tower: %s: width %d", what, g->width);
        if (g->heads < 1 || W % g->heads != 0)
            return em_errorf(EM_ERR_INVALID, "sequence tower: %s: %d heads do not divide its width %d", what, g->heads, W);
        em_status st = check_blocks(g->blocks, g->n_blocks, what);
        if (st) return st;
    }
    return EM_OK;
}

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
    if (c->n_groups < 0) return em_errorf(EM_ERR_INVALID, "sequence tower: %d event groups", c->n_groups);
    if (c->n_groups == 0 && (c->heads < 1 || D % c->heads != 0))
        return em_errorf(EM_ERR_INVALID, "sequence tower: %d heads do not divide the embedding dim %d", c->heads, D);
    if (c->age_buckets < 1 || c->age_buckets > 64)
        return em_errorf(EM_ERR_INVALID, "sequence tower: %d age buckets (1..64)", c->age_buckets);
    if (c->num_types < 1 || c->num_types > EM_SEQ_MAX_TYPE + 1)
        return em_errorf(EM_ERR_INVALID, "sequence tower: %d event types (1..%d)", c->num_types, EM_SEQ_MAX_TYPE + 1);
    em_status st = c->n_groups ? check_groups(c, D) : check_blocks(c->blocks, c->n_blocks, "blocks");
    if (st) return st;
    int hsp = 0;
    for (int g = 0; g < em__seq_n_stacks(c); g++) hsp |= em__seq_stack_of(c, D, g).has_hsp;
    if (hsp && (c->hsp_m < 1 || c->hsp_m2 < 1 || c->hsp_k < 1 || c->hsp_m > 1024 || c->hsp_m2 > 1024 ||
                       c->hsp_k > 64))
        return em_errorf(EM_ERR_INVALID, "sequence tower: HSP needs 1..1024 seeds and output tokens, 1..64 Kronecker terms "
                                         "(got %d, %d, %d)", c->hsp_m, c->hsp_m2, c->hsp_k);
    return EM_OK;
}


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

double em__seq_block_flops(const em_seq_cfg *c, const em_seq_block *k, int W, double L) {
    const double d = W, DD = d * d;
    if (k->kind == EM_SEQB_HSP) {
        const double m = c->hsp_m, m2 = c->hsp_m2, kk = c->hsp_k;
        return 2 * 2 * L * DD + 4 * d * m * L + kk * (2 * m2 * m * d + 2 * m2 * DD);
    }
    return 3 * 2 * L * DD + 4 * d * block_pairs(k, L);
}

/* q = c Wq^T (W, D), K and V projections of the L events, one query over L keys */
double em__seq_target_flops(int D, int W, double L) { return 2.0 * D * W + 2 * 2 * L * W * W + 4.0 * W * L; }

double em__seq_stack_flops(const em_seq_cfg *c, int D, const em__seq_stack *k, double L) {
    double f = em__seq_target_flops(D, k->W, L);
    for (int i = 0; i < k->n_blocks; i++) f += em__seq_block_flops(c, &k->blocks[i], k->W, L);
    if (k->proj) f += 2.0 * L * D * k->W + 2.0 * k->E * k->W * D; /* in: the group's events; out: its vectors */
    return f;
}

double em_seq_flops_example(const em_seq_cfg *c, int D, int64_t L) {
    if (!c->num_seq) return 0;
    EM_ASSERT(c->n_groups == 0); /* with groups: em_seq_flops_groups */
    em__seq_stack k = em__seq_stack_of(c, D, 0);
    double f = em__seq_target_flops(D, D, (double)L);
    for (int i = 0; i < k.n_blocks; i++) f += em__seq_block_flops(c, &k.blocks[i], D, (double)L);
    return f;
}

double em_seq_flops_groups(const em_seq_cfg *c, int D, const int64_t *L) {
    if (!c->num_seq) return 0;
    double f = 0;
    for (int g = 0; g < em__seq_n_stacks(c); g++) {
        em__seq_stack k = em__seq_stack_of(c, D, g);
        f += em__seq_stack_flops(c, D, &k, (double)L[g]);
    }
    return f;
}
