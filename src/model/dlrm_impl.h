/*
 * dlrm_impl.h - the DLRM's internal state, shared by dlrm.c (compute) and
 * dlrm_io.c (configuration JSON and checkpoints). Not a public header.
 */
#ifndef EMBER_DLRM_IMPL_H
#define EMBER_DLRM_IMPL_H

#include "ember/dlrm.h"

typedef struct {
    size_t w, b; /* offsets into the flat blocks */
    int in, out;
} layer;

struct em_dlrm {
    em_dlrm_cfg cfg;
    int n_layers;                 /* (n_bot-1) bottom layers, then (n_top-1) top layers */
    int n_botl;                   /* number of bottom layers; layer n_botl is the first top one */
    layer L[2 * EM_DLRM_MAX_LAYERS];
    size_t n_params;
    float *params, *grads, *state; /* flat blocks; state is NULL for SGD */
    em_embbag *emb;
    int64_t step;

    /* activations for up to `cap` examples */
    int cap;
    float *x[2 * EM_DLRM_MAX_LAYERS];  /* output of layer l (B, L[l].out), post-ReLU */
    float *dx[2 * EM_DLRM_MAX_LAYERS];
    float *inter, *dinter;             /* (B, top[0]) */
    float *emb_out, *demb;             /* (B, T, D) */
    const float *dense_in;             /* the batch's dense input of the last forward */

    /* sequence tower (NULL/0 without one; seqtower.h) */
    em_seqtower *seq;
    em_embbag *seq_emb;                /* its own item table (NULL when shared) */
    size_t n_mlp;                      /* MLP parameters; the tower's follow in the blocks */
    int F;                             /* vectors into the interaction: T + E */
    float *embx, *dembx;               /* (B, F, D): [pooled embeddings, tower output] */
    float *extra, *dextra;             /* (B, E, D) */
    /* shared item table: the batch without the candidate's table, and its row pairs */
    int64_t *cidx, *coff;              /* (nnz), (T*B + 1) */
    float *cpw;                        /* (nnz) per-id weights when the batch has them */
    int64_t *prow;                     /* (pairs) */
    float *pgrad;                      /* (pairs, D) */
    size_t cap_cidx, cap_cpw, cap_pairs, cap_pgrad;
};


em_status em__dlrm_create_raw(em_dlrm **out, const em_dlrm_cfg *cfg);

#endif
