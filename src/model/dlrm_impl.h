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

/* The embedding backend of the categorical tables (dlrm_tables.c): the model calls
 * only these for them, so another kind (e.g. an SSD tier with the forward /
 * backward_update / end_step shape of em_dyn) is one more ops table there and one
 * more em_table_kind. */
typedef struct {
    const char *name;
    /* allocate the tables for m->cfg; fresh: initialise them (else a checkpoint will
     * fill them: a FIITED pool then starts empty) */
    em_status (*create)(em_dlrm *m, int fresh, em_pool *pool);
    void (*destroy)(em_dlrm *m);
    /* out(B, T, D) pooled; train = 0 (evaluation) must not change the tables */
    em_status (*forward)(em_dlrm *m, const em_batch *b, float *out, int train, em_pool *pool);
    /* the fused sparse update for dout(B, T, D) after a train forward of b */
    em_status (*backward_update)(em_dlrm *m, const em_batch *b, const float *dout, em_pool *pool);
    /* after the step counter advanced (m->step): scheduled work such as pruning */
    em_status (*end_step)(em_dlrm *m, em_pool *pool);
    void (*set_lr)(em_dlrm *m, float lr);
    void (*stats)(const em_dlrm *m, int t, em_dlrm_table_stats *s);
    /* write the model's other tensors ts[n] and metadata beside the tables in one file */
    em_status (*save)(const em_dlrm *m, const char *path, const em_st_tensor *ts, int n, const em_st_meta *meta,
                      int n_meta);
    /* read the tables from an opened checkpoint (the dense kind's come with ts above) */
    em_status (*load)(em_dlrm *m, const em_st *f, const char *path);
} em__tables_ops;

const em__tables_ops *em__tables_ops_for(em_table_kind kind);
em_status em__tables_validate(const em_dlrm_cfg *cfg);

struct em_dlrm {
    em_dlrm_cfg cfg;
    int n_layers;                 /* (n_bot-1) bottom layers, then (n_top-1) top layers */
    int n_botl;                   /* number of bottom layers; layer n_botl is the first top one */
    layer L[2 * EM_DLRM_MAX_LAYERS];
    size_t n_params;
    float *params, *grads, *state; /* flat blocks; state is NULL for SGD */
    const em__tables_ops *tab;    /* the backend of cfg.tables.kind */
    em_embbag *emb;               /* dense tables (NULL for other kinds, or released) */
    em_dyn *dyn;                  /* dynamic tables */
    em_fiited *fit;               /* FIITED tables */
    em_ssd *ssd;                  /* SSD-tier tables */
    int64_t step;

    /* activations for up to `cap` examples */
    int cap;
    float *acts; /* one block (huge pages advised) that every activation buffer below lies in */
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


/* Allocate a model for cfg; fresh: initialise the tables (em_dlrm_create), else leave
 * them for a checkpoint to fill (em_dlrm_load). The MLPs are left zero either way. */
em_status em__dlrm_create_raw(em_dlrm **out, const em_dlrm_cfg *cfg, int fresh, em_pool *pool);

#endif
