/*
 * ember/seqtower.h - the DLRM's sequence tower: a user's history (one jagged sequence
 * feature, em_batch.seq[0], docs/FORMATS.md 1.1) becomes a few D-vectors per example
 * that join the dot interaction beside the pooled embeddings (ember/dlrm.h composes it;
 * its parameters live in the model's flat dense block).
 *
 *   event i (total N events, jagged offsets[B+1]):
 *     x0_i = item[items_i] + age[bucket(age_i)] + type[min(type_i, NT-1)]      (N, D)
 *     bucket(a) = 0 for a <= 0, else min(NA-1, 1 + floor(log2 a))   (a in seconds)
 *   blocks, in order, over the jagged history X (N, D) and a summary S (B, m2, D) = 0;
 *   each block has its own projections Wq, Wk, Wv (D, D), no bias, H heads of D/H:
 *     jattn[:causal]          X += jattn(X Wq^T, X Wk^T, X Wv^T)   softmax self attention
 *     gdpa[:ACT][:causal]     X += gdpa(...)   act(s q.k) * v / max_len (Kunlun GDPA)
 *     swa[:W][:causal]        X += swa(...)    softmax over keys [i-W, i+W]
 *     hsp                     S += HSP(seeds, X Wk^T, X Wv^T): m seeds attend over the
 *                             history (m x D tokens), then sum_i A_i^T Z W_i -> m2 x D
 *                             (Kunlun hierarchical seed pooling; no Wq)
 *   target attention: t_b = softmax(q_b K_b^T / sqrt(dh)) V_b with q = c Wq_t^T,
 *     K = X Wk_t^T, V = X Wv_t^T, c_b the candidate's pooled embedding (the DLRM's
 *     table `cand`); an empty history gives t_b = 0.
 *   out (B, E, D) = [t, S_0 .. S_{m2-1}]:  E = 1 + m2 if any block is hsp, else 1.
 *
 * Event-level personalization (Kunlun; n_groups > 0, em_seq_parse_events): the event
 * types are split into groups, each with its own sub-tower of width W_g, H_g heads and
 * its own block list (depth). Per example, the events of group g, in their order, form
 * a jagged sub-sequence (possibly empty); with x0 as above (D wide, shared item / age /
 * type tables),
 *     X_g = x0[events of g] Win_g^T       (N_g, W_g)   Win_g (W_g, D); none if W_g = D
 *     blocks of g over X_g and S_g (B, m2, W_g), as above with W_g and H_g
 *     t_g = target attention with q = c Wq_g^T (Wq_g (W_g, D)), K, V (W_g, W_g)
 *     out_g (B, E_g, D) = [t_g, S_g] Wout_g^T    Wout_g (D, W_g); none if W_g = D
 *   and out = [out_0, out_1, ...] (E = sum E_g). Events whose type is in no group are
 *   dropped (their items get no gradient).
 *
 * Design choices (the "why" is in src/model/seqtower.c's header):
 *   - Item embeddings come from the tower's own table (`rows` rows, the sparse
 *     optimizer of the model) or, with share = 1, from the candidate's own table, so
 *     a history item and the same item as candidate are one vector: the candidate /
 *     history match the target attention and the dot interaction look for is then a
 *     dot product of identical embeddings, which is what makes it learnable quickly.
 *     Both update through em_embbag_update_rows (one update per row per step, the
 *     candidate's bag gradient and the history's summed first when shared).
 *   - The summary S is a residual stream: an hsp block adds a fresh HSP of the
 *     current history, a block that is not hsp leaves it as it is. Kunlun's CompSkip
 *     is then a block list (em_seq_parse_blocks' "compskip:N": even layers
 *     "gdpa,hsp", odd layers "swa": sliding-window attention with the cached summary),
 *     against "full:N" (every layer "gdpa,hsp").
 *   - GDPA's output scale is 1/max_len (the reader's cap), a constant: Kunlun's
 *     "1/max length" taken over the batch would make a prediction depend on the other
 *     examples of its batch.
 *
 * Layout and conventions as ember/nn.h and ember/jattn.h: fp32 row-major, forward
 * overwrites, the tower's gradients are overwritten by each backward (it zeroes its
 * slice of the gradient block), `pool` may be NULL, results are bitwise identical for
 * any thread count.
 */
#ifndef EMBER_SEQTOWER_H
#define EMBER_SEQTOWER_H

#include "core.h"
#include "data.h"
#include "kunlun.h"

#ifdef __cplusplus
extern "C" {
#endif

#define EM_SEQ_MAX_BLOCKS 32

typedef enum { EM_SEQB_JATTN = 0, EM_SEQB_GDPA, EM_SEQB_SWA, EM_SEQB_HSP } em_seq_block_kind;

typedef struct {
    em_seq_block_kind kind;
    int causal;      /* jattn, gdpa, swa */
    em_gdpa_act act; /* gdpa */
    int window;      /* swa: W >= 0 */
} em_seq_block;

#define EM_SEQ_MAX_GROUPS 8
#define EM_SEQ_GROUP_TYPES 64 /* types a group can name: 0..63 */

/* One group of event types with its own sub-tower (event-level personalization). */
typedef struct {
    uint64_t types; /* bit k: event type k (after the clamp to num_types - 1) */
    int width;      /* W >= 1, or 0: the embedding dim D (no projections) */
    int heads;      /* H >= 1, dividing W */
    int n_blocks;   /* 0..EM_SEQ_MAX_BLOCKS */
    em_seq_block blocks[EM_SEQ_MAX_BLOCKS];
} em_seq_group;

typedef struct {
    int num_seq;       /* 0: no tower (the plain DLRM); 1: the tower reads em_batch.seq[0] */
    int max_len;       /* the reader's per-example cap (seq_max_len), >= 1; GDPA's scale */
    int cand;          /* 0-based categorical whose pooled embedding queries the history */
    int share;         /* 1: history items are rows of table `cand` (rows = rows[cand]) */
    int64_t rows;      /* rows of the history item table (items are reduced modulo it) */
    int heads;         /* H >= 1, dividing D */
    int age_buckets;   /* NA >= 1 (default 32: 2^30 s ~ 34 years fits) */
    int num_types;     /* NT >= 1: type >= NT-1 shares the last row (default 4) */
    int hsp_m, hsp_m2, hsp_k; /* seeds, output tokens, Kronecker terms (default 4, 2, 2) */
    int n_blocks;      /* 0..EM_SEQ_MAX_BLOCKS (0: target attention over x0 only) */
    em_seq_block blocks[EM_SEQ_MAX_BLOCKS];
    int n_groups;      /* 0: one tower over all events (heads, blocks above); else
                          event-level personalization: heads and blocks above are unused */
    em_seq_group groups[EM_SEQ_MAX_GROUPS];
} em_seq_cfg;

/* Defaults above with cand/share/rows/max_len left 0: num_seq = 1, heads 2, blocks
 * "compskip:2" (gdpa:silu, hsp, swa:8). */
em_seq_cfg em_seq_default(void);

/* Parse a block list into c->blocks / c->n_blocks:
 *   "gdpa,hsp,swa:16"   blocks separated by ','; options after ':' in any order:
 *                       jattn[:causal], gdpa[:identity|relu|relu2|silu|gelu|tanh][:causal],
 *                       swa[:W][:causal] (W default `window`), hsp
 *   "compskip:N"        N layers, even ones "gdpa,hsp", odd ones "swa" (Kunlun CompSkip)
 *   "full:N"            N layers of "gdpa,hsp"
 *   "none" or ""        no blocks
 * `act` and `window` are the defaults of gdpa and swa blocks. EM_ERR_INVALID with a
 * detail naming the bad token; c is unchanged then. */
em_status em_seq_parse_blocks(em_seq_cfg *c, const char *spec, em_gdpa_act act, int window);
/* Parse event-level personalization into c->groups / c->n_groups: groups separated by
 * ';', each
 *     TYPES[:wW][:hH][:BLOCKS]
 *   TYPES   event types, ',' separated, ranges a-b allowed ("0", "1,2", "1-3"), < 64
 *   wW      width W of the group's sub-tower (default: D, no projection)
 *   hH      heads (default c->heads)
 *   BLOCKS  its block list as em_seq_parse_blocks (default c->blocks; "none": none)
 * e.g. "2:w32:h4:full:2;1:w16:h2:gdpa,hsp;0:w8:h1:swa:4". "" or "none": no groups.
 * Types and widths are checked against the config by em_seq_cfg_validate. EM_ERR_INVALID
 * with a detail naming the group and the bad token; c is unchanged then. */
em_status em_seq_parse_events(em_seq_cfg *c, const char *spec, em_gdpa_act act, int window);
/* The canonical form ("2:w32:h4:gdpa:silu,hsp,...;1:h2:...", "none" without groups). */
int em_seq_format_events(const em_seq_cfg *c, char *buf, size_t cap);
/* The canonical block list ("gdpa:silu,hsp,swa:8"), as parsed back by
 * em_seq_parse_blocks; returns snprintf's count. */
int em_seq_format_blocks(const em_seq_cfg *c, char *buf, size_t cap);
/* "identity", "relu", ... and back (EM_ERR_INVALID for an unknown name). */
const char *em_gdpa_act_name(em_gdpa_act a);
em_status em_gdpa_act_parse(const char *name, em_gdpa_act *out);

/* EM_ERR_INVALID with a detail unless the config is usable with embedding dim D and
 * num_tables categoricals (num_seq 0 is always valid). */
em_status em_seq_cfg_validate(const em_seq_cfg *c, int D, int num_tables);
/* Vectors the tower adds to the interaction: 0 when off, else 1 (+ m2 with hsp), per
 * group with event-level personalization. */
int em_seq_extra(const em_seq_cfg *c);
/* Dense parameters of the tower (floats in the model's flat block). */
size_t em_seq_num_params(const em_seq_cfg *c, int D);

/* One dense parameter tensor of the tower: offset into the tower's slice of the flat
 * block, shape (PyTorch's (out, in) for projections). Names: "seq.age.weight" (NA, D),
 * "seq.type.weight" (NT, D), "seq.{i}.{q,k,v}.weight" (D, D) for block i,
 * "seq.{i}.seeds" (m, D), "seq.{i}.kron_a" (k, m, m2), "seq.{i}.kron_w" (k, D, D),
 * "seq.tgt.{q,k,v}.weight" (D, D). With groups, after age and type, per group g:
 * "seq.g{g}.in.weight" (W, D) unless W = D, its blocks "seq.g{g}.{i}.*" and target
 * "seq.g{g}.tgt.*" as above in width W (tgt.q (W, D)), "seq.g{g}.out.weight" (D, W)
 * unless W = D. */
typedef struct {
    char name[32];
    size_t off;
    int ndim;
    int64_t shape[3];
} em_seq_param;

typedef struct em_seqtower em_seqtower;

/* A tower over the slices params/grads (em_seq_num_params floats each) of the model's
 * blocks; it keeps pointers, never frees them. The parameters are not initialised
 * (em_seqtower_init). */
em_status em_seqtower_create(em_seqtower **out, const em_seq_cfg *c, int D, float *params, float *grads);
void em_seqtower_free(em_seqtower *t); /* NULL is a no-op */
/* Initialise: projections N(0, sqrt(1/in)) (in = D, or a group's W or D), seeds N(0,
 * sqrt(1/W)), kron_a N(0, 1/sqrt(m k)), kron_w N(0, 1/sqrt(W k)) (W = D without groups),
 * age/type tables N(0, 0.02); each tensor from its own stream of `seed`. */
void em_seqtower_init(em_seqtower *t, uint64_t seed);
int em_seqtower_params(const em_seqtower *t, const em_seq_param **list);

/*
 * Forward: out (B, E, D) from the history s (B examples; items in [0, rows) of the
 * item table item_w (rows, D)) and the candidates' embeddings: row b of the query is
 * query + b * qstride (D floats). Keeps what the backward needs (also the
 * pointers s and item_w: they must stay valid until the backward). EM_ERR_INVALID for
 * bad offsets or an item out of range (with a detail), EM_ERR_NOMEM.
 */
em_status em_seqtower_forward(em_seqtower *t, const em_batch_seq *s, int B, const float *item_w, int64_t rows,
                              const float *query, size_t qstride, float *out, em_pool *pool);
/* Backward of the last forward given dout (B, E, D): the tower's dense gradients are
 * overwritten, dquery rows (same stride as the query) ACCUMULATE the query's gradient,
 * and the items' gradient (N, D), one row per event, is kept for
 * em_seqtower_item_grads. */
em_status em_seqtower_backward(em_seqtower *t, const float *dout, float *dquery, size_t qstride, em_pool *pool);
/* The items of the last forward (N) and their gradients (N, D) from the last backward;
 * returns N. */
size_t em_seqtower_item_grads(const em_seqtower *t, const int64_t **items, const float **grads);

/* Forward FLOPs of the tower (multiply-adds count 2: projections, attention over the
 * (query, key) pairs each block actually visits, seed pooling and the Kronecker maps;
 * embedding sums and activations not counted): of the last forward, and summed over
 * every forward since creation or the last reset, with the examples and events seen. */
typedef struct {
    double last_flops, total_flops;
    double examples, events;
    double block_flops[EM_SEQ_MAX_BLOCKS + 1]; /* summed per block; [n_blocks] = target
                                                  (one tower; zero with groups) */
    double group_flops[EM_SEQ_MAX_GROUPS];      /* with groups: summed per group */
    double group_events[EM_SEQ_MAX_GROUPS];     /* with groups: events per group */
} em_seq_stats;
void em_seqtower_stats(const em_seqtower *t, em_seq_stats *out);
void em_seqtower_stats_reset(em_seqtower *t);
/* The forward FLOPs of the tower's config for one example with history length L
 * (without groups), and with groups: for one example whose history has L[g] events of
 * group g (g < n_groups). */
double em_seq_flops_example(const em_seq_cfg *c, int D, int64_t L);
double em_seq_flops_groups(const em_seq_cfg *c, int D, const int64_t *L);

#ifdef __cplusplus
}
#endif
#endif
