/*
 * dtrain.c - distributed DLRM training over MPI: model-parallel embedding shards with
 * all-to-all exchanges, data-parallel dense layers with a deterministic all-reduce.
 * The algorithm and its guarantees are in ember/dist.h; this file's layout:
 *
 *   shards    every rank derives the same list of shards from the config: one per
 *             table-wise or data-parallel table, G per row-wise table (row r on rank
 *             r mod G, as local row r / G). A rank's own shards form the tables of one em_embbag (sum
 *             pooling: mean pooling divides at the example's rank).
 *   exchange  three all-to-alls per step (ids; pooled vectors; their gradients), each
 *             one MPI_Alltoall of sizes and one MPI_Alltoallv of payload, in a fixed
 *             layout: for a pair (source, destination), the destination's shards in
 *             shard order, and within a shard the source's examples in batch order.
 *             The holder sees the global batch as the ranks' batches in rank order.
 *   allreduce a reduce-scatter by MPI_Alltoallv (piece q of every rank's gradient to
 *             rank q, summed there in rank order 0..N-1) and an MPI_Allgatherv: every
 *             element is summed in the same order on every run. The dense gradient's
 *             reduce-scatter is posted (MPI_Ialltoallv) before the backward all-to-all
 *             and the sparse update, and completed after them.
 *   checkpoints go through rank 0 in the single-process layout (em_dlrm_save/load),
 *             so a run saved at N ranks resumes at M ranks, or in one process.
 */
#include <limits.h>
#include <mpi.h>
#include <stdlib.h>
#include <string.h>

#include "core/half.h"
#include "ember/dist.h"

/* ------------------------------------------------------------ MPI set-up */

static int g_we_initialised;

em_status em_dist_init(int *argc, char ***argv) {
    int done = 0;
    MPI_Initialized(&done);
    if (done) return EM_OK;
    if (MPI_Init(argc, argv) != MPI_SUCCESS) return em_errorf(EM_ERR_IO, "dist: MPI_Init failed");
    g_we_initialised = 1;
    return EM_OK;
}

void em_dist_finalize(void) {
    int fin = 0;
    MPI_Finalized(&fin);
    if (g_we_initialised && !fin) MPI_Finalize();
    g_we_initialised = 0;
}

static int mpi_up(void) {
    int up = 0, fin = 0;
    MPI_Initialized(&up);
    MPI_Finalized(&fin);
    return up && !fin;
}

int em_dist_rank(void) {
    int r = 0;
    if (mpi_up()) MPI_Comm_rank(MPI_COMM_WORLD, &r);
    return r;
}

int em_dist_world(void) {
    int n = 1;
    if (mpi_up()) MPI_Comm_size(MPI_COMM_WORLD, &n);
    return n;
}

int em_dist_launched(void) {
    const char *v[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"};
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        const char *s = getenv(v[i]);
        if (s && atoi(s) > 1) return 1;
    }
    return 0;
}

const char *em_comm_prec_name(em_comm_prec p) { return p == EM_COMM_FP16 ? "fp16" : p == EM_COMM_BF16 ? "bf16" : "fp32"; }

int em_comm_prec_parse(const char *s) {
    if (!s) return -1;
    if (strcmp(s, "fp32") == 0) return EM_COMM_FP32;
    if (strcmp(s, "fp16") == 0) return EM_COMM_FP16;
    if (strcmp(s, "bf16") == 0) return EM_COMM_BF16;
    return -1;
}

/* ------------------------------------------------------------ state */

typedef struct {
    int t;            /* global table */
    em_shard_type type;
    int holder;       /* group rank holding it (data-parallel tables are not shards: embd) */
    int64_t row0, rows;   /* global rows row0, row0 + stride, ... (rows of them) */
    int64_t stride;       /* 1; row-wise: G (row r lives on rank r mod G, as local row r / G) */
    int col0, cols;       /* columns held: all (0, D), or a column-wise piece */
} shard;

/* A growable buffer. */
typedef struct {
    void *p;
    size_t cap; /* bytes */
} buf;

/* One bucket of the dense all-reduce: the gradient range [lo, lo + n), reduce-scattered
 * (part q of every rank's range to rank q, by MPI_Ialltoallv) as soon as its layers'
 * gradients are final, summed in rank order, then all-gathered (MPI_Iallgatherv). */
typedef struct {
    size_t lo, n;
    int *cnt, *dis, *rcnt, *rdis; /* [N] */
    float *r;                     /* [N * (this rank's part)] the parts received */
    MPI_Request rs, ag;
} arbucket;

struct em_dist {
    em_dist_cfg cfg;
    int rank, world, D, T;     /* world rank and size N */
    int grank, gsize;          /* rank in the replica group and its size G (G = N: 1D) */
    int rep, M;                /* replica group of this rank, number of groups (N / G) */
    MPI_Comm gcomm, rcomm;     /* this rank's group; the ranks holding its replicas (one per group) */
    em_dlrm *m;            /* dense replica; its tables are 1-row placeholders */
    shard *sh;             /* all shards, in table order */
    int nsh;
    int *mine, nmine;      /* indices of this rank's shards (data-parallel ones included) */
    int *held_by;          /* [world * nsh]: held_by[q * nsh + s] = rank q holds shard s */
    em_embbag *emb;        /* this rank's shards but column-wise pieces, as tables, in `mine` order */
    em_embbag *embc;       /* this rank's column-wise pieces (dim = the piece width) */
    int kn, kc;            /* mine[0 .. kn) are in emb, mine[kn .. kn + kc) in embc */
    int cw;                /* column-wise piece width */
    em_embbag *embd;       /* data-parallel tables: a full replica on every rank, in table order */
    int ndp, *dpt;         /* their number and global table indices */
    int64_t dp_len;        /* floats of their gradient block: sum_t rows[t] (D + 1) */
    buf dpidx, dpoff, dpout, dpgrad, dprows; /* their local bags, pooled (B, ndp, D), gradient, row lists */
    int64_t step;
    int64_t synced_step;   /* 2D: the step at which the replicas were last averaged */

    /* per step */
    int *Bw;               /* [N] local batch sizes of every rank */
    int *Bs;               /* [G] those of this rank's group */
    int64_t *boff;         /* [G + 1] their prefix sums: the group's example offsets */
    int G;                 /* the group's batch (all the exchanges see) */
    int64_t Gw;            /* the global batch over all groups */
    int *scnt, *sdis, *rcnt, *rdis; /* [N] MPI counts and displacements */
    /* the dense gradient all-reduce, in buckets of whole layers (last layer first) */
    arbucket *bk;
    int nbk;
    int ar_next;           /* buckets [0, ar_next) have their reduce-scatter posted */
    int ar_ag;             /* buckets [0, ar_ag) have their all-gather posted */
    float *ar_g, ar_w;     /* the gradient block being reduced, its weight B_r / (global batch) */
    MPI_Comm rscomm, agcomm; /* the buckets' reduce-scatters, their all-gathers (each in bucket order) */
    double t_bwd, t_wait;  /* last step: dense backward, exposed all-reduce wait (seconds) */
    double *losses;        /* [N] every rank's loss sum of the step */
    buf sbuf, rbuf;
    buf gidx, goff;        /* the global batch's bags over my shards (int64) */
    buf gout;              /* (G, kn, D) pooled over my shards; then the gradient */
    buf goutc, goffc;      /* (G, kc, cw) the same for column-wise pieces; their offsets rebased */
    int cw_rw;             /* column-wise pieces under row-wise AdaGrad (in the group): pieces' sums of squares exchanged */
    buf cwrows, cwgrad, cwss, cwall; /* their (row, gradient) pairs, my pieces' sums of squares, everyone's */
    buf hit, scale;        /* row-wise block membership (bytes), mean-pooling factors */
    buf tmp;               /* rank 0: a row-wise shard in transit (checkpoints) */
    uint8_t *touched;      /* 2D: per local row of my shards (mine order), touched since the last average */
    int64_t *toff;         /* [nmine + 1] each shard's first entry in touched */
    buf spack;             /* 2D: the touched rows (weights + state) being averaged */
    buf pooled, dpooled;   /* (B, T, D) this rank's examples */
    buf red;               /* all-reduce scratch */
    em_dist_bytes bytes;
};

static em_status grow(buf *b, size_t bytes) {
    if (bytes <= b->cap && b->p) return EM_OK;
    size_t c = bytes + bytes / 2 + 64;
    void *q = em_malloc(c);
    if (!q) return em_errorf(EM_ERR_NOMEM, "dist: out of memory (%zu bytes of exchange buffers)", c);
    em_free(b->p);
    b->p = q, b->cap = c;
    return EM_OK;
}

static int holds(const em_dist *d, int q, int s) { return d->held_by[(size_t)q * d->nsh + s]; }

/* Every rank agrees on the status of a collective phase: the worst one wins, and a
 * rank that did not fail itself reports which rank did. */
/* agree over a communicator */
static em_status agree_in(MPI_Comm comm, em_status st) {
    int mine = (int)st, worst = 0;
    MPI_Allreduce(&mine, &worst, 1, MPI_INT, MPI_MAX, comm);
    if (!worst) return EM_OK;
    if (!st) return em_errorf((em_status)worst, "dist: another rank failed (status %s)", em_status_str((em_status)worst));
    return st;
}

static em_status agree(em_status st) { return agree_in(MPI_COMM_WORLD, st); }

/* ------------------------------------------------------------ create */

static em_status check_cfg(const em_dist_cfg *c, int world) {
    em_status st = em_dlrm_cfg_validate(&c->model);
    if (st) return st;
    const int G = c->group > 0 ? c->group : world;
    if (G > world || world % G != 0)
        return em_errorf(EM_ERR_INVALID, "dist: group size %d does not divide the world size %d", G, world);
    if (G < world && c->sync_every < 1)
        return em_errorf(EM_ERR_INVALID, "dist: 2D parallelism needs sync_every >= 1 (got %d)", c->sync_every);
    if (c->model.seq.num_seq) return em_errorf(EM_ERR_UNSUPPORTED, "dist: sequence features are not supported in distributed training");
    if (c->model.tables.kind != EM_TABLES_DENSE)
        return em_errorf(EM_ERR_UNSUPPORTED, "dist: only dense tables can be sharded (not %s)",
                         em_table_kind_name(c->model.tables.kind));
    const int cw = c->col_width > 0 ? c->col_width : (c->model.dim > 1 ? c->model.dim / 2 : 1);
    if (c->model.dim % cw != 0)
        return em_errorf(EM_ERR_INVALID, "dist: column piece width %d does not divide D = %d", cw, c->model.dim);
    if (c->prec != EM_COMM_FP32 && c->prec != EM_COMM_FP16 && c->prec != EM_COMM_BF16)
        return em_errorf(EM_ERR_INVALID, "dist: unknown communication precision %d", (int)c->prec);
    for (int t = 0; t < c->model.num_tables; t++) {
        const em_shard_type ty = c->type[t];
        if (ty != EM_SHARD_TABLE && ty != EM_SHARD_ROW && ty != EM_SHARD_DATA && ty != EM_SHARD_COLUMN)
            return em_errorf(EM_ERR_INVALID, "dist: table %d: no sharding type", t);
        if ((ty == EM_SHARD_TABLE || ty == EM_SHARD_COLUMN) && (c->owner[t] < 0 || c->owner[t] >= G))
            return em_errorf(EM_ERR_INVALID, "dist: table %d: owner rank %d not in [0, %d) (the group)", t, c->owner[t], G);
        if (ty == EM_SHARD_COLUMN && c->pieces_given) {
            if (c->model.dim / cw > EM_DIST_MAX_PIECES)
                return em_errorf(EM_ERR_INVALID, "dist: table %d: %d column pieces placed one by one (at most %d)", t,
                                 c->model.dim / cw, EM_DIST_MAX_PIECES);
            for (int j = 0; j < c->model.dim / cw; j++)
                if (c->piece_owner[t][j] < 0 || c->piece_owner[t][j] >= G)
                    return em_errorf(EM_ERR_INVALID, "dist: table %d: piece %d on rank %d, not in [0, %d) (the group)", t, j,
                                     (int)c->piece_owner[t][j], G);
        }
    }
    return EM_OK;
}

static em_status make_shards(em_dist *d) {
    const em_dlrm_cfg *mc = &d->cfg.model;
    int n = 0;
    d->cw = d->cfg.col_width > 0 ? d->cfg.col_width : (d->D > 1 ? d->D / 2 : 1);
    const int npieces = d->D / d->cw;
    for (int t = 0; t < d->T; t++)
        n += d->cfg.type[t] == EM_SHARD_ROW ? d->gsize : d->cfg.type[t] == EM_SHARD_COLUMN ? npieces : d->cfg.type[t] == EM_SHARD_DATA ? 0 : 1;
    d->sh = em_calloc((size_t)(n ? n : 1), sizeof(shard));
    d->mine = em_calloc((size_t)(n ? n : 1), sizeof(int));
    d->held_by = em_calloc((size_t)(n ? n : 1) * (size_t)d->gsize, sizeof(int));
    if (!d->sh || !d->mine || !d->held_by) return em_errorf(EM_ERR_NOMEM, "dist: out of memory");
    d->nsh = n;
    int s = 0;
    for (int t = 0; t < d->T; t++) {
        const int64_t R = mc->rows[t];
        if (d->cfg.type[t] == EM_SHARD_ROW) {
            /* cyclic: row r on rank r mod G, so hot ids (often the low rows) spread evenly */
            const int64_t Gs = d->gsize;
            for (int p = 0; p < d->gsize; p++, s++)
                d->sh[s] = (shard){t, EM_SHARD_ROW, p, p, R > p ? (R - p + Gs - 1) / Gs : 0, Gs, 0, d->D};
        } else if (d->cfg.type[t] == EM_SHARD_TABLE) {
            d->sh[s++] = (shard){t, EM_SHARD_TABLE, d->cfg.owner[t], 0, R, 1, 0, d->D};
        }
    }
    /* column-wise pieces last, so every rank's own shards are [others, pieces] in shard
     * order: piece j of table t (columns j w .. j w + w) on rank (owner + j) mod G */
    for (int t = 0; t < d->T; t++)
        if (d->cfg.type[t] == EM_SHARD_COLUMN)
            for (int j = 0; j < npieces; j++)
                d->sh[s++] = (shard){t, EM_SHARD_COLUMN,
                                     d->cfg.pieces_given ? d->cfg.piece_owner[t][j] : (d->cfg.owner[t] + j) % d->gsize, 0,
                                     mc->rows[t], 1, j * d->cw, d->cw};
    for (s = 0; s < n; s++)
        for (int q = 0; q < d->gsize; q++) d->held_by[(size_t)q * n + s] = d->sh[s].holder == q;
    d->cw_rw = 0;
    for (int t = 0; t < d->T; t++)
        if (d->cfg.type[t] == EM_SHARD_COLUMN && mc->sparse_opt.kind == EM_OPT_ROWWISE_ADAGRAD) d->cw_rw = 1;
    d->nmine = d->kn = d->kc = 0;
    for (s = 0; s < n; s++)
        if (holds(d, d->grank, s)) {
            d->mine[d->nmine++] = s;
            if (d->sh[s].type == EM_SHARD_COLUMN) d->kc++;
            else d->kn++;
        }
    return EM_OK;
}

/* The dense all-reduce's buckets: whole layers, last to first (the order the backward
 * finishes them), a bucket closed once it holds cfg.bucket_kb KiB; bucket_kb < 0: one
 * bucket, the whole block. Called once the dense replica exists. */
static em_status make_buckets(em_dist *d) {
    size_t lo[2 * EM_DLRM_MAX_LAYERS + 1], n;
    const int nl = em_dlrm_layer_offsets(d->m, lo);
    em_dlrm_dense_block(d->m, 1, &n);
    if (lo[nl] != n) return em_errorf(EM_ERR_UNSUPPORTED, "dist: distributed training of a sequence model is not supported");
    const size_t cap = d->cfg.bucket_kb < 0 ? n + 1 : (size_t)(d->cfg.bucket_kb ? d->cfg.bucket_kb : 512) * 256;
    if (!(d->bk = em_calloc((size_t)nl + 1, sizeof(arbucket)))) return em_errorf(EM_ERR_NOMEM, "dist: out of memory");
    size_t hi = n;
    for (int l = nl - 1; l >= 0; l--) /* close a bucket at layer l when it is full or l = 0 */
        if (hi - lo[l] >= cap || l == 0) {
            if (hi - lo[l] > (size_t)INT_MAX) return em_errorf(EM_ERR_UNSUPPORTED, "dist: a dense layer over 2^31 parameters");
            d->bk[d->nbk++] = (arbucket){.lo = lo[l], .n = hi - lo[l]};
            hi = lo[l];
        }
    const int W = d->world;
    for (int k = 0; k < d->nbk; k++) {
        arbucket *b = &d->bk[k];
        b->cnt = em_calloc((size_t)W, sizeof(int)), b->dis = em_calloc((size_t)W, sizeof(int));
        b->rcnt = em_calloc((size_t)W, sizeof(int)), b->rdis = em_calloc((size_t)W, sizeof(int));
        size_t mlo, mhi;
        em_split(b->n, d->rank, W, &mlo, &mhi);
        b->r = em_malloc(((mhi - mlo) * (size_t)W + 1) * sizeof(float));
        if (!b->cnt || !b->dis || !b->rcnt || !b->rdis || !b->r) return em_errorf(EM_ERR_NOMEM, "dist: out of memory");
        for (int q = 0; q < W; q++) {
            size_t a, z;
            em_split(b->n, q, W, &a, &z);
            b->cnt[q] = (int)(z - a), b->dis[q] = (int)a;
            b->rcnt[q] = (int)(mhi - mlo), b->rdis[q] = (int)((size_t)q * (mhi - mlo));
        }
    }
    return EM_OK;
}

static em_status create_local(em_dist *d, const em_dist_cfg *cfg) {
    d->cfg = *cfg;
    d->rank = em_dist_rank(), d->world = em_dist_world();
    d->D = cfg->model.dim, d->T = cfg->model.num_tables;
    d->gsize = cfg->group > 0 ? cfg->group : d->world;
    em_status st = check_cfg(cfg, d->world);
    if (st) return st;
    d->M = d->world / d->gsize, d->grank = d->rank % d->gsize, d->rep = d->rank / d->gsize;
    MPI_Comm_split(MPI_COMM_WORLD, d->rep, d->rank, &d->gcomm);
    MPI_Comm_split(MPI_COMM_WORLD, d->grank, d->rank, &d->rcomm);
    MPI_Comm_dup(MPI_COMM_WORLD, &d->rscomm);
    MPI_Comm_dup(MPI_COMM_WORLD, &d->agcomm);
    if ((st = make_shards(d))) return st;
    /* momentum-scaled row-wise AdaGrad: the accumulator over the M replicas */
    if (d->M > 1 && cfg->model.sparse_opt.kind == EM_OPT_ROWWISE_ADAGRAD) d->cfg.model.sparse_opt.replicas = d->M;
    /* the dense replica: the same config with 1-row tables (the MLPs' initial values
     * do not depend on the tables) */
    em_dlrm_cfg dc = cfg->model;
    for (int t = 0; t < d->T; t++) dc.rows[t] = 1;
    if ((st = em_dlrm_create(&d->m, &dc, NULL))) return st;
    em_dlrm_release_tables(d->m);
    /* this rank's shards: the others in emb (dim D), column-wise pieces in embc (dim cw) */
    int64_t *rows = em_malloc((size_t)(d->nmine ? d->nmine : 1) * sizeof(int64_t));
    if (!rows) return em_errorf(EM_ERR_NOMEM, "dist: out of memory");
    for (int k = 0; k < d->nmine; k++) rows[k] = d->sh[d->mine[k]].rows > 0 ? d->sh[d->mine[k]].rows : 1;
    em_embbag_cfg ec = {.num_tables = d->kn, .rows = rows, .dim = d->D, .pooling = EM_POOL_SUM, .opt = d->cfg.model.sparse_opt};
    if (d->kn) st = em_embbag_create(&d->emb, &ec);
    em_embbag_cfg ecc = {.num_tables = d->kc, .rows = rows + d->kn, .dim = d->cw, .pooling = EM_POOL_SUM,
                         .opt = d->cfg.model.sparse_opt};
    if (!st && d->kc) st = em_embbag_create(&d->embc, &ecc);
    em_free(rows);
    if (st) return st;
    /* data-parallel tables: a full replica, updated by the all-reduced gradient (plain
     * row-wise AdaGrad: every replica takes the global step) */
    d->dpt = em_calloc((size_t)(d->T ? d->T : 1), sizeof(int));
    if (!d->dpt) return em_errorf(EM_ERR_NOMEM, "dist: out of memory");
    int64_t dprows[EM_DLRM_MAX_TABLES];
    d->ndp = 0, d->dp_len = 0;
    for (int t = 0; t < d->T; t++)
        if (cfg->type[t] == EM_SHARD_DATA) {
            d->dpt[d->ndp] = t, dprows[d->ndp++] = cfg->model.rows[t];
            d->dp_len += cfg->model.rows[t] * (int64_t)(d->D + 1);
        }
    if (d->ndp) {
        em_embbag_cfg ed = {.num_tables = d->ndp, .rows = dprows, .dim = d->D, .pooling = EM_POOL_SUM, .opt = cfg->model.sparse_opt};
        if ((st = em_embbag_create(&d->embd, &ed))) return st;
        for (int j = 0; j < d->ndp; j++)
            em_embbag_init_uniform_shard(d->embd, j, cfg->model.seed, d->dpt[j], dprows[j], 0, 1, 0, d->D);
    }
    for (int k = 0; k < d->nmine; k++) {
        const shard *h = &d->sh[d->mine[k]];
        if (h->rows > 0)
            em_embbag_init_uniform_shard(k < d->kn ? d->emb : d->embc, k < d->kn ? k : k - d->kn, cfg->model.seed, h->t,
                                         cfg->model.rows[h->t], h->row0, h->stride, h->col0, d->D);
    }
    if (d->M > 1) { /* 2D: which rows the replicas must average */
        if (!(d->toff = em_calloc((size_t)d->nmine + 1, sizeof(int64_t)))) return em_errorf(EM_ERR_NOMEM, "dist: out of memory");
        for (int k = 0; k < d->nmine; k++)
            d->toff[k + 1] = d->toff[k] + em_embbag_rows(k < d->kn ? d->emb : d->embc, k < d->kn ? k : k - d->kn);
        if (!(d->touched = em_calloc((size_t)d->toff[d->nmine] + 1, 1))) return em_errorf(EM_ERR_NOMEM, "dist: out of memory");
    }
    const size_t W = (size_t)d->world;
    d->Bw = em_calloc(W, sizeof(int));
    if (!(d->losses = em_calloc(W, sizeof(double)))) return em_errorf(EM_ERR_NOMEM, "dist: out of memory");
    d->Bs = em_calloc(W, sizeof(int));
    d->boff = em_calloc(W + 1, sizeof(int64_t));
    d->scnt = em_calloc(W, sizeof(int)), d->sdis = em_calloc(W, sizeof(int));
    d->rcnt = em_calloc(W, sizeof(int)), d->rdis = em_calloc(W, sizeof(int));
    if ((st = make_buckets(d))) return st;
    if (!d->Bw || !d->Bs || !d->boff || !d->scnt || !d->sdis || !d->rcnt || !d->rdis) return em_errorf(EM_ERR_NOMEM, "dist: out of memory");
    return EM_OK;
}

em_status em_dist_create(em_dist **out, const em_dist_cfg *cfg, em_pool *pool) {
    (void)pool;
    *out = NULL;
    if (!mpi_up()) return em_errorf(EM_ERR_INVALID, "dist: MPI is not initialised (em_dist_init)");
    em_dist *d = em_calloc(1, sizeof *d);
    em_status st = d ? create_local(d, cfg) : em_errorf(EM_ERR_NOMEM, "dist: out of memory");
    if ((st = agree(st))) {
        em_dist_free(d);
        return st;
    }
    *out = d;
    return EM_OK;
}

void em_dist_free(em_dist *d) {
    if (!d) return;
    em_dlrm_free(d->m);
    em_embbag_free(d->emb);
    em_embbag_free(d->embc);
    em_embbag_free(d->embd);
    em_free(d->dpt);
    em_free(d->touched), em_free(d->toff);
    em_free(d->sh), em_free(d->mine), em_free(d->held_by);
    if (d->gcomm != MPI_COMM_NULL && d->gcomm) MPI_Comm_free(&d->gcomm);
    if (d->rcomm != MPI_COMM_NULL && d->rcomm) MPI_Comm_free(&d->rcomm);
    em_free(d->Bw), em_free(d->Bs), em_free(d->boff), em_free(d->scnt), em_free(d->sdis), em_free(d->rcnt), em_free(d->rdis);
    for (int k = 0; k < d->nbk; k++) {
        arbucket *b = &d->bk[k];
        em_free(b->cnt), em_free(b->dis), em_free(b->rcnt), em_free(b->rdis), em_free(b->r);
    }
    em_free(d->bk);
    em_free(d->losses);
    if (d->rscomm != MPI_COMM_NULL && d->rscomm) MPI_Comm_free(&d->rscomm);
    if (d->agcomm != MPI_COMM_NULL && d->agcomm) MPI_Comm_free(&d->agcomm);
    buf *bs[] = {&d->sbuf, &d->rbuf, &d->gidx, &d->goff, &d->gout, &d->pooled, &d->dpooled, &d->red, &d->hit, &d->scale, &d->tmp, &d->goutc, &d->goffc, &d->cwrows, &d->cwgrad, &d->cwss, &d->cwall,
                  &d->dpidx, &d->dpoff, &d->dpout, &d->dpgrad, &d->dprows, &d->spack};
    for (size_t i = 0; i < sizeof bs / sizeof bs[0]; i++) em_free(bs[i]->p);
    em_free(d);
}

em_dlrm *em_dist_dense(em_dist *d) { return d->m; }
int64_t em_dist_step_count(const em_dist *d) { return d->step; }
void em_dist_last_bytes(const em_dist *d, em_dist_bytes *out) { *out = d->bytes; }
void em_dist_last_times(const em_dist *d, double *dense_backward_s, double *allreduce_wait_s) {
    if (dense_backward_s) *dense_backward_s = d->t_bwd;
    if (allreduce_wait_s) *allreduce_wait_s = d->t_wait;
}
int em_dist_buckets(const em_dist *d) { return d->nbk; }

void em_dist_set_lr(em_dist *d, float dense_lr, float sparse_lr) {
    em_dlrm_set_lr(d->m, dense_lr, sparse_lr);
    d->cfg.model.dense_opt.lr = dense_lr, d->cfg.model.sparse_opt.lr = sparse_lr;
    if (d->emb) em_embbag_set_lr(d->emb, sparse_lr);
    if (d->embc) em_embbag_set_lr(d->embc, sparse_lr);
    if (d->embd) em_embbag_set_lr(d->embd, sparse_lr);
}

/* ------------------------------------------------------------ exchanges */

/* MPI_Alltoall of the send counts, then displacements; counts are in `unit` bytes. */
/* Every exchange: the counts all-to-all, then agreement in the group on whether every
 * rank is ready (prep: this rank's status so far; a rank that failed while packing
 * sends nothing and every rank returns the error), then the caller's exchange(). So a
 * failure on one rank (out of memory, say) fails the step everywhere instead of
 * leaving the others waiting in the all-to-all. */
static em_status plan_exchange(em_dist *d, size_t unit, em_status prep) {
    if (prep)
        for (int q = 0; q < d->gsize; q++) d->scnt[q] = 0;
    MPI_Alltoall(d->scnt, 1, MPI_INT, d->rcnt, 1, MPI_INT, d->gcomm);
    int64_t so = 0, ro = 0;
    for (int q = 0; q < d->gsize; q++) {
        d->sdis[q] = (int)so, d->rdis[q] = (int)ro;
        so += d->scnt[q], ro += d->rcnt[q];
    }
    em_status st = prep;
    if (!st && (so * (int64_t)unit > INT32_MAX || ro * (int64_t)unit > INT32_MAX))
        st = em_errorf(EM_ERR_UNSUPPORTED, "dist: one exchange over 2 GiB (use a smaller batch or more ranks)");
    if (!st) st = grow(&d->rbuf, (size_t)(ro ? ro : 1) * unit);
    return agree_in(d->gcomm, st);
}

static void exchange(em_dist *d, MPI_Datatype ty) {
    MPI_Alltoallv(d->sbuf.p, d->scnt, d->sdis, ty, d->rbuf.p, d->rcnt, d->rdis, ty, d->gcomm);
}

/* Does id row r of table t fall into shard s? */
static int in_shard(const shard *h, int64_t r) { return r >= h->row0 && (r - h->row0) % h->stride == 0; }

/* Step 1: batch sizes, then every bag's ids to the ranks holding them. Builds the global
 * batch over this rank's shards in gidx / goff (table-batched: shard k, example g). */
static em_status input_dist(em_dist *d, const em_batch *b) {
    const int B = b ? b->B : 0, W = d->gsize;
    MPI_Allgather(&B, 1, MPI_INT, d->Bw, 1, MPI_INT, MPI_COMM_WORLD);
    d->Gw = 0;
    for (int q = 0; q < d->world; q++) d->Gw += d->Bw[q];
    memcpy(d->Bs, d->Bw + (size_t)d->rep * (size_t)W, (size_t)W * sizeof(int));
    d->boff[0] = 0;
    for (int q = 0; q < W; q++) d->boff[q + 1] = d->boff[q] + d->Bs[q];
    if (d->boff[W] > INT32_MAX) return em_errorf(EM_ERR_UNSUPPORTED, "dist: global batch over 2^31 examples");
    d->G = (int)d->boff[W];
    /* sizes: for each destination q, each shard it holds: B lengths + the ids */
    int64_t total = 0;
    em_status st = EM_OK;
    for (int q = 0; q < W; q++) {
        int64_t n = 0;
        for (int s = 0; s < d->nsh; s++) {
            if (!holds(d, q, s)) continue;
            const shard *h = &d->sh[s];
            int64_t m = B;
            const int64_t *off = b ? b->offsets + (size_t)h->t * B : NULL;
            if (B && h->type == EM_SHARD_ROW) {
                for (int64_t k = off[0]; k < off[B]; k++) m += in_shard(h, b->indices[k]);
            } else if (B) {
                m += off[B] - off[0];
            }
            n += m;
        }
        if (n > INT32_MAX) {
            st = em_errorf(EM_ERR_UNSUPPORTED, "dist: over 2^31 ids for one rank in one step");
            goto xchg;
        }
        d->scnt[q] = (int)n, total += n;
    }
    if ((st = grow(&d->sbuf, (size_t)(total ? total : 1) * sizeof(int64_t)))) goto xchg;
    int64_t *o = d->sbuf.p;
    for (int q = 0; q < W; q++)
        for (int s = 0; s < d->nsh; s++) {
            if (!holds(d, q, s)) continue;
            const shard *h = &d->sh[s];
            const int64_t *off = b ? b->offsets + (size_t)h->t * B : NULL;
            int64_t *len = o;
            o += B;
            for (int e = 0; e < B; e++) {
                int64_t c = 0;
                for (int64_t k = off[e]; k < off[e + 1]; k++) {
                    const int64_t r = b->indices[k];
                    if (h->type == EM_SHARD_ROW && !in_shard(h, r)) continue;
                    *o++ = (r - h->row0) / h->stride, c++;
                }
                len[e] = c;
            }
        }
xchg:
    if ((st = plan_exchange(d, sizeof(int64_t), st))) return st;
    exchange(d, MPI_INT64_T);
    d->bytes.ids = (double)(total - d->scnt[d->grank]) * sizeof(int64_t); /* what leaves the rank */
    /* assemble: shard k's bags over the global batch, sources in rank order */
    const int G = d->G, K = d->nmine;
    int64_t nids = 0;
    for (int p = 0; p < W; p++) nids += d->rcnt[p] - (int64_t)K * d->Bs[p];
    if ((st = grow(&d->goff, ((size_t)K * G + 1) * sizeof(int64_t))) ||
        (st = grow(&d->gidx, (size_t)(nids ? nids : 1) * sizeof(int64_t))))
        return st;
    int64_t *goff = d->goff.p, *gidx = d->gidx.p, *rb = d->rbuf.p;
    /* the per-source cursor walks the source's shards in order: shard k of this rank
     * is the k-th block in every source's payload */
    int64_t pos = 0;
    goff[0] = 0;
    for (int k = 0; k < K; k++)
        for (int p = 0; p < W; p++) {
            /* find shard k's block in source p: skip blocks 0..k-1 */
            const int64_t *q = rb + d->rdis[p];
            for (int j = 0; j < k; j++) {
                int64_t n = 0;
                for (int e = 0; e < d->Bs[p]; e++) n += q[e];
                q += d->Bs[p] + n;
            }
            const int64_t *ids = q + d->Bs[p];
            int64_t n = 0;
            for (int e = 0; e < d->Bs[p]; e++) {
                n += q[e];
                goff[(size_t)k * G + (size_t)d->boff[p] + (size_t)e + 1] = pos + n;
            }
            memcpy(gidx + pos, ids, (size_t)n * sizeof(int64_t));
            pos += n;
        }
    return EM_OK;
}

/* Payload element conversions for the pooled vectors and their gradients. */
static size_t elem_bytes(const em_dist *d) { return d->cfg.prec == EM_COMM_FP32 ? 4 : 2; }

static void put_vals(const em_dist *d, void *dst, const float *src, size_t n, float scale) {
    if (d->cfg.prec == EM_COMM_FP32) {
        float *o = dst;
        for (size_t i = 0; i < n; i++) o[i] = src[i] * scale;
    } else if (d->cfg.prec == EM_COMM_FP16) {
        uint16_t *o = dst;
        for (size_t i = 0; i < n; i++) o[i] = em_f32_to_f16(src[i] * scale);
    } else {
        uint16_t *o = dst;
        for (size_t i = 0; i < n; i++) o[i] = em_f32_to_bf16(src[i] * scale);
    }
}

static void add_vals(const em_dist *d, float *dst, const void *src, size_t n) {
    if (d->cfg.prec == EM_COMM_FP32) {
        const float *s = src;
        for (size_t i = 0; i < n; i++) dst[i] += s[i];
    } else if (d->cfg.prec == EM_COMM_FP16) {
        const uint16_t *s = src;
        for (size_t i = 0; i < n; i++) dst[i] += em_f16_to_f32(s[i]);
    } else {
        const uint16_t *s = src;
        for (size_t i = 0; i < n; i++) dst[i] += em_bf16_to_f32(s[i]);
    }
}

/* A block of vectors (dim floats each: D, or a column-wise piece's width) for n
 * examples. A row-wise block starts with an int32: -1 = dense (the n vectors follow),
 * else the count of (int32 example, vector) entries that follow: only the examples
 * whose bag has an id in that block of rows, whichever is smaller (docs/PLANNER.md's
 * row-wise model). Other blocks are the n vectors. */
static size_t block_bytes(const em_dist *d, int row, int n, int hits, int dim) {
    const size_t vb = (size_t)dim * elem_bytes(d), dense = (size_t)n * vb, sparse = (size_t)hits * (4 + vb);
    return row ? 4 + (sparse < dense ? sparse : dense) : dense;
}

/* Vector e is src + e * stride (scaled by scale[e] when scale). */
static char *put_block(const em_dist *d, char *o, int row, int n, const uint8_t *hit, int hits, int dim, const float *src,
                       size_t stride, const float *scale) {
    const size_t vb = (size_t)dim * elem_bytes(d);
    const int sparse = row && (size_t)hits * (4 + vb) < (size_t)n * vb;
    if (row) {
        int32_t h = sparse ? hits : -1;
        memcpy(o, &h, 4);
        o += 4;
    }
    for (int e = 0; e < n; e++) {
        if (sparse && !hit[e]) continue;
        if (sparse) {
            int32_t x = e;
            memcpy(o, &x, 4);
            o += 4;
        }
        put_vals(d, o, src + (size_t)e * stride, (size_t)dim, scale ? scale[e] : 1.0f);
        o += vb;
    }
    return o;
}

/* Adds a block's vectors into dst + e * stride; returns the end of the block. */
static const char *add_block(const em_dist *d, const char *q, int row, int n, int dim, float *dst, size_t stride) {
    const size_t vb = (size_t)dim * elem_bytes(d);
    int32_t h = -1;
    if (row) {
        memcpy(&h, q, 4);
        q += 4;
    }
    if (h < 0) {
        for (int e = 0; e < n; e++, q += vb) add_vals(d, dst + (size_t)e * stride, q, (size_t)dim);
        return q;
    }
    for (int32_t j = 0; j < h; j++) {
        int32_t e;
        memcpy(&e, q, 4);
        add_vals(d, dst + (size_t)e * stride, q + 4, (size_t)dim);
        q += 4 + vb;
    }
    return q;
}

/* Where my shard k's pooled vector (or its gradient) of global example g lives: emb's
 * (G, kn, D) buffer or embc's (G, kc, cw); *stride is the step between examples. */
static float *vec_of(em_dist *d, int k, int64_t g, size_t *stride) {
    if (k < d->kn) {
        *stride = (size_t)d->kn * (size_t)d->D;
        return (float *)d->gout.p + ((size_t)g * d->kn + (size_t)k) * (size_t)d->D;
    }
    *stride = (size_t)d->kc * (size_t)d->cw;
    return (float *)d->goutc.p + ((size_t)g * d->kc + (size_t)(k - d->kn)) * (size_t)d->cw;
}

/* The global batch's bags of my column-wise pieces, their offsets rebased to 0. */
static em_status column_offsets(em_dist *d) {
    const size_t n = (size_t)d->kc * (size_t)d->G;
    em_status st = grow(&d->goffc, (n + 1) * sizeof(int64_t));
    if (st) return st;
    const int64_t *goff = (const int64_t *)d->goff.p + (size_t)d->kn * (size_t)d->G;
    int64_t *c = d->goffc.p;
    for (size_t u = 0; u <= n; u++) c[u] = goff[u] - goff[0];
    return EM_OK;
}

/* Steps 2-3: pool this rank's shards over the global batch, send each example's
 * vectors to its rank, assemble pooled (B, T, D) there (row-wise: partial sums added
 * in block order; column-wise: pieces in their columns; data-parallel: this rank's own
 * pooling; mean: divided by the bag size). */
static em_status pool_and_output_dist(em_dist *d, const em_batch *b, em_pool *pool) {
    const int W = d->gsize, K = d->nmine, G = d->G, B = b ? b->B : 0;
    const size_t D = (size_t)d->D;
    em_status st = grow(&d->gout, (size_t)(G ? G : 1) * (size_t)(d->kn ? d->kn : 1) * D * sizeof(float));
    if (!st) st = grow(&d->goutc, (size_t)(G ? G : 1) * (size_t)(d->kc ? d->kc : 1) * (size_t)d->cw * sizeof(float));
    if (st) goto xchg;
    const int64_t *goff = d->goff.p, *gidx = d->gidx.p;
    if (d->kn && G && (st = em_embbag_forward(d->emb, d->gout.p, gidx, goff, NULL, G, pool))) goto xchg;
    if (d->kc && G) {
        if ((st = column_offsets(d))) goto xchg;
        const int64_t base = goff[(size_t)d->kn * G];
        if ((st = em_embbag_forward(d->embc, d->goutc.p, gidx + base, d->goffc.p, NULL, G, pool))) goto xchg;
    }
    /* hit[k][g]: global example g has an id in my shard k (row-wise blocks) */
    size_t nhit = (size_t)K * (size_t)G;
    if ((st = grow(&d->hit, nhit ? nhit : 1))) goto xchg;
    uint8_t *hit = d->hit.p;
    int64_t total = 0;
    for (int q = 0; q < W; q++) {
        int64_t n = 0;
        for (int k = 0; k < K; k++) {
            const shard *h = &d->sh[d->mine[k]];
            int hits = 0;
            for (int e = 0; e < d->Bs[q]; e++) {
                const size_t u = (size_t)k * G + (size_t)d->boff[q] + (size_t)e;
                hit[u] = goff[u + 1] > goff[u];
                hits += hit[u];
            }
            n += (int64_t)block_bytes(d, h->type == EM_SHARD_ROW, d->Bs[q], hits, h->cols);
        }
        if (n > INT32_MAX) {
            st = em_errorf(EM_ERR_UNSUPPORTED, "dist: pooled exchange over 2 GiB for one rank");
            goto xchg;
        }
        d->scnt[q] = (int)n, total += n;
    }
    if ((st = grow(&d->sbuf, (size_t)(total ? total : 1)))) goto xchg;
    char *o = d->sbuf.p;
    for (int q = 0; q < W; q++)
        for (int k = 0; k < K; k++) {
            const shard *h = &d->sh[d->mine[k]];
            const uint8_t *hq = hit + (size_t)k * G + (size_t)d->boff[q];
            int hits = 0;
            for (int e = 0; e < d->Bs[q]; e++) hits += hq[e];
            size_t stride;
            const float *src = vec_of(d, k, d->boff[q], &stride);
            o = put_block(d, o, h->type == EM_SHARD_ROW, d->Bs[q], hq, hits, h->cols, src, stride, NULL);
        }
    d->bytes.pooled = (double)(total - d->scnt[d->grank]);
xchg:
    if ((st = plan_exchange(d, 1, st))) return st;
    exchange(d, MPI_BYTE);
    const size_t TD = (size_t)d->T * D;
    if ((st = grow(&d->pooled, (size_t)(B ? B : 1) * TD * sizeof(float)))) return st;
    float *pooled = d->pooled.p;
    memset(pooled, 0, (size_t)B * TD * sizeof(float));
    for (int p = 0; p < W; p++) { /* source p's shards, in shard order */
        const char *q = (const char *)d->rbuf.p + d->rdis[p];
        for (int s = 0; s < d->nsh; s++) {
            const shard *h = &d->sh[s];
            if (!holds(d, p, s)) continue;
            q = add_block(d, q, h->type == EM_SHARD_ROW, B, h->cols, pooled + (size_t)h->t * D + (size_t)h->col0, TD);
        }
    }
    if (d->ndp && B) { /* data-parallel tables: this rank's replica, its own examples */
        size_t nnz = 0;
        for (int j = 0; j < d->ndp; j++) nnz += (size_t)(b->offsets[(size_t)(d->dpt[j] + 1) * B] - b->offsets[(size_t)d->dpt[j] * B]);
        if ((st = grow(&d->dpidx, (nnz + 1) * sizeof(int64_t))) ||
            (st = grow(&d->dpoff, ((size_t)d->ndp * B + 1) * sizeof(int64_t))) ||
            (st = grow(&d->dpout, (size_t)B * (size_t)d->ndp * D * sizeof(float))))
            return st;
        int64_t *ix = d->dpidx.p, *of = d->dpoff.p, pos = 0;
        of[0] = 0;
        for (int j = 0; j < d->ndp; j++)
            for (int e = 0; e < B; e++) {
                const size_t u = (size_t)d->dpt[j] * B + (size_t)e;
                for (int64_t k = b->offsets[u]; k < b->offsets[u + 1]; k++) ix[pos++] = b->indices[k];
                of[(size_t)j * B + (size_t)e + 1] = pos;
            }
        if ((st = em_embbag_forward(d->embd, d->dpout.p, ix, of, NULL, B, pool))) return st;
        const float *dpo = d->dpout.p;
        for (int e = 0; e < B; e++)
            for (int j = 0; j < d->ndp; j++)
                memcpy(pooled + (size_t)e * TD + (size_t)d->dpt[j] * D, dpo + ((size_t)e * d->ndp + (size_t)j) * D,
                       D * sizeof(float));
    }
    if (d->cfg.model.pooling == EM_POOL_MEAN)
        for (int t = 0; t < d->T; t++)
            for (int e = 0; e < B; e++) {
                const int64_t n = b->offsets[(size_t)t * B + e + 1] - b->offsets[(size_t)t * B + e];
                if (n > 1) {
                    float *v = pooled + (size_t)e * TD + (size_t)t * D;
                    const float inv = 1.0f / (float)n;
                    for (size_t j = 0; j < D; j++) v[j] *= inv;
                }
            }
    return EM_OK;
}

/* Steps 5-6: d loss / d pooled (already weighted) to every holder of each table (a
 * column-wise piece gets its columns); the holders' fused sparse update over the
 * global batch. */
/* Column-wise pieces under row-wise AdaGrad. The accumulator of a row grows by the mean
 * square of the whole row's gradient, and a piece sees only its columns: every holder
 * sums the squares of each touched row's gradient over its piece (em_embbag_rows_sumsq:
 * duplicates summed in global batch order, rows ascending; every piece of a table sees
 * the same ids, so the same rows), the group all-gathers them, and each holder adds the
 * table's pieces in piece order and steps with that (em_embbag_update_rows_sumsq). The
 * pieces' accumulators thus stay equal. Collective over the group (every rank, with or
 * without pieces, and with st, the step's status so far: a failed rank joins, and
 * every rank returns the failure). */
/* Piece kk's (row, gradient) pairs over the group's batch, in batch order; returns n. */
static size_t piece_pairs(const em_dist *d, int kk, int64_t *rows, float *gr) {
    const int G = d->G, kc = d->kc;
    const size_t cw = (size_t)d->cw;
    const int64_t *gidx = d->gidx.p, *goffc = d->goffc.p, base = ((const int64_t *)d->goff.p)[(size_t)d->kn * G];
    const float *go = d->goutc.p;
    size_t n = 0;
    for (int e = 0; e < G; e++)
        for (int64_t i = goffc[(size_t)kk * G + e]; i < goffc[(size_t)kk * G + e + 1]; i++, n++) {
            rows[n] = gidx[base + i];
            memcpy(gr + n * cw, go + ((size_t)e * (size_t)kc + (size_t)kk) * cw, cw * sizeof(float));
        }
    return n;
}

static em_status pieces_rowwise(em_dist *d, em_status st, em_pool *pool) {
    const int W = d->gsize, G = d->G, kc = st ? 0 : d->kc, cw = d->cw;
    const int64_t *goffc = d->goffc.p;
    const size_t npairs = kc && G ? (size_t)(goffc[(size_t)kc * G] - goffc[0]) : 0;
    if (!st) st = grow(&d->cwrows, (npairs + 1) * sizeof(int64_t));
    if (!st) st = grow(&d->cwgrad, (npairs + 1) * (size_t)cw * sizeof(float));
    if (!st) st = grow(&d->cwss, (npairs + 1) * sizeof(float));
    int *cnt = em_calloc(2 * (size_t)W + (size_t)d->nsh + 1, sizeof(int)), *dis = cnt + W, *len = dis + W;
    if (!st && !cnt) st = em_errorf(EM_ERR_NOMEM, "dist: out of memory");
    /* my pieces' sums of squares, back to back in my shard order; len[s] per shard */
    size_t mine_n = 0;
    for (int kk = 0; kk < kc && !st; kk++) {
        int64_t *rows = d->cwrows.p;
        float *gr = d->cwgrad.p;
        const size_t n = piece_pairs(d, kk, rows, gr);
        size_t nu = 0;
        st = em_embbag_rows_sumsq(d->embc, kk, rows, gr, n, (float *)d->cwss.p + mine_n, &nu, pool);
        len[d->mine[d->kn + kk]] = (int)nu, mine_n += nu;
    }
    if ((st = agree_in(d->gcomm, st))) {
        em_free(cnt);
        return st;
    }
    /* every rank's piece lengths (max-reduced: each is set by its holder only), then the sums */
    MPI_Allreduce(MPI_IN_PLACE, len, d->nsh, MPI_INT, MPI_MAX, d->gcomm);
    size_t all = 0;
    for (int q = 0; q < W; q++) {
        size_t c = 0;
        for (int s = 0; s < d->nsh; s++)
            if (holds(d, q, s) && d->sh[s].type == EM_SHARD_COLUMN) c += (size_t)len[s];
        cnt[q] = (int)c, dis[q] = (int)all, all += c;
    }
    if ((st = agree_in(d->gcomm, grow(&d->cwall, (all + 1) * sizeof(float))))) {
        em_free(cnt);
        return st;
    }
    float *ss = d->cwall.p;
    MPI_Allgatherv(d->cwss.p, cnt[d->grank], MPI_FLOAT, ss, cnt, dis, MPI_FLOAT, d->gcomm);
    /* where each piece's sums start in ss */
    int64_t *at = em_malloc(((size_t)d->nsh + 1) * sizeof(int64_t));
    if (!at) st = em_errorf(EM_ERR_NOMEM, "dist: out of memory");
    for (int q = 0; q < W && at; q++) {
        int64_t o = dis[q];
        for (int s = 0; s < d->nsh; s++)
            if (holds(d, q, s) && d->sh[s].type == EM_SHARD_COLUMN) at[s] = o, o += len[s];
    }
    for (int kk = 0; kk < kc && !st; kk++) {
        const int s0 = d->mine[d->kn + kk], t = d->sh[s0].t;
        const size_t nu = (size_t)len[s0];
        float *tot = (float *)d->cwss.p; /* reused: the row totals */
        for (size_t j = 0; j < nu; j++) tot[j] = 0;
        for (int s = 0; s < d->nsh; s++) /* the table's pieces in piece (shard) order */
            if (d->sh[s].t == t && d->sh[s].type == EM_SHARD_COLUMN)
                for (size_t j = 0; j < nu; j++) tot[j] += ss[at[s] + (int64_t)j];
        int64_t *rows = d->cwrows.p;
        float *gr = d->cwgrad.p;
        const size_t n = piece_pairs(d, kk, rows, gr);
        st = em_embbag_update_rows_sumsq(d->embc, kk, rows, gr, n, tot, d->D, pool);
    }
    em_free(at);
    em_free(cnt);
    return st;
}

static em_status backward_dist(em_dist *d, const em_batch *b, em_pool *pool) {
    const int W = d->gsize, K = d->nmine, G = d->G, B = b ? b->B : 0;
    const size_t D = (size_t)d->D, TD = (size_t)d->T * D;
    const float *dp = d->dpooled.p;
    /* per shard: which of my examples have an id in it (row-wise), the mean pooling's 1/len */
    int *hits = NULL;
    em_status st = grow(&d->hit, (size_t)d->nsh * (size_t)(B ? B : 1));
    if (!st) st = grow(&d->scale, (size_t)d->T * (size_t)(B ? B : 1) * sizeof(float));
    if (!st && !(hits = em_calloc((size_t)d->nsh, sizeof(int)))) st = em_errorf(EM_ERR_NOMEM, "dist: out of memory");
    if (st) goto xchg;
    uint8_t *hit = d->hit.p;
    float *scale = d->scale.p;
    for (int t = 0; t < d->T; t++)
        for (int e = 0; e < B; e++) {
            const int64_t n = b->offsets[(size_t)t * B + e + 1] - b->offsets[(size_t)t * B + e];
            scale[(size_t)t * B + e] = d->cfg.model.pooling == EM_POOL_MEAN && n > 1 ? 1.0f / (float)n : 1.0f;
        }
    for (int s = 0; s < d->nsh; s++) {
        const shard *h = &d->sh[s];
        if (h->type != EM_SHARD_ROW) continue;
        for (int e = 0; e < B; e++) {
            uint8_t x = 0;
            for (int64_t k = b->offsets[(size_t)h->t * B + e]; k < b->offsets[(size_t)h->t * B + e + 1] && !x; k++)
                x = in_shard(h, b->indices[k]);
            hit[(size_t)s * B + e] = x;
            hits[s] += x;
        }
    }
    int64_t total = 0;
    for (int q = 0; q < W; q++) {
        int64_t n = 0;
        for (int s = 0; s < d->nsh; s++)
            if (holds(d, q, s)) n += (int64_t)block_bytes(d, d->sh[s].type == EM_SHARD_ROW, B, hits[s], d->sh[s].cols);
        if (n > INT32_MAX) {
            st = em_errorf(EM_ERR_UNSUPPORTED, "dist: gradient exchange over 2 GiB for one rank");
            goto xchg;
        }
        d->scnt[q] = (int)n, total += n;
    }
    if ((st = grow(&d->sbuf, (size_t)(total ? total : 1)))) goto xchg;
    char *o = d->sbuf.p;
    for (int q = 0; q < W; q++)
        for (int s = 0; s < d->nsh; s++) {
            if (!holds(d, q, s)) continue;
            const shard *h = &d->sh[s];
            o = put_block(d, o, h->type == EM_SHARD_ROW, B, hit + (size_t)s * B, hits[s], h->cols,
                          dp + (size_t)h->t * D + (size_t)h->col0, TD, scale + (size_t)h->t * B);
        }
    d->bytes.grads = (double)(total - d->scnt[d->grank]);
xchg:
    em_free(hits);
    if ((st = plan_exchange(d, 1, st))) return d->cw_rw ? pieces_rowwise(d, st, pool) : st;
    exchange(d, MPI_BYTE);
    if (!K || !G) return d->cw_rw ? pieces_rowwise(d, EM_OK, pool) : EM_OK;
    /* reused: dout (G, kn, D) and (G, kc, cw) */
    memset(d->gout.p, 0, (size_t)G * (size_t)d->kn * D * sizeof(float));
    memset(d->goutc.p, 0, (size_t)G * (size_t)d->kc * (size_t)d->cw * sizeof(float));
    for (int p = 0; p < W; p++) {
        const char *q = (const char *)d->rbuf.p + d->rdis[p];
        for (int k = 0; k < K; k++) {
            const shard *h = &d->sh[d->mine[k]];
            size_t stride;
            float *dst = vec_of(d, k, d->boff[p], &stride);
            q = add_block(d, q, h->type == EM_SHARD_ROW, d->Bs[p], h->cols, dst, stride);
        }
    }
    if (d->touched) { /* 2D: remember the rows this step updates */
        const int64_t *goff = d->goff.p, *gidx = d->gidx.p;
        for (int k = 0; k < K; k++)
            for (int64_t i = goff[(size_t)k * G]; i < goff[(size_t)(k + 1) * G]; i++) d->touched[d->toff[k] + gidx[i]] = 1;
    }
    if (d->kn) st = em_embbag_backward_update(d->emb, d->gout.p, d->gidx.p, d->goff.p, NULL, NULL, G, pool);
    if (d->cw_rw) return pieces_rowwise(d, st, pool);
    if (st) return st;
    if (d->kc) {
        const int64_t base = ((const int64_t *)d->goff.p)[(size_t)d->kn * G];
        st = em_embbag_backward_update(d->embc, d->goutc.p, (const int64_t *)d->gidx.p + base, d->goffc.p, NULL, NULL, G, pool);
    }
    return st;
}

/* Sum v (n floats) over the W ranks of comm, deterministically: pieces of at most
 * RED_CHUNK floats; in each, a reduce-scatter by MPI_Alltoallv (part q of every rank's
 * piece to rank q, summed there in rank order 0..W-1) and an MPI_Allgatherv. Returns
 * the bytes this rank sent. */
#define RED_CHUNK ((size_t)1 << 24)

static em_status allreduce_sum(em_dist *d, MPI_Comm comm, float *v, size_t n, double *sent, em_status prep) {
    int W, me;
    MPI_Comm_size(comm, &W);
    MPI_Comm_rank(comm, &me);
    *sent = 0;
    if (W == 1) return prep;
    /* a rank that failed before (prep) or cannot get its scratch fails every rank here */
    em_status st = agree_in(comm, prep ? prep : grow(&d->red, (RED_CHUNK + (size_t)W) * sizeof(float)));
    if (st) return st;
    for (size_t o = 0; o < n; o += RED_CHUNK) {
        const size_t m = n - o < RED_CHUNK ? n - o : RED_CHUNK;
        float *g = v + o;
        for (int q = 0; q < W; q++) {
            size_t lo, hi;
            em_split(m, q, W, &lo, &hi);
            d->scnt[q] = (int)(hi - lo), d->sdis[q] = (int)lo;
        }
        size_t mlo, mhi;
        em_split(m, me, W, &mlo, &mhi);
        const size_t mn = mhi - mlo;
        for (int p = 0; p < W; p++) d->rcnt[p] = (int)mn, d->rdis[p] = (int)((size_t)p * mn);
        float *r = d->red.p;
        MPI_Alltoallv(g, d->scnt, d->sdis, MPI_FLOAT, r, d->rcnt, d->rdis, MPI_FLOAT, comm);
        for (size_t i = 0; i < mn; i++) { /* rank order 0..W-1 */
            float acc = r[i];
            for (int p = 1; p < W; p++) acc += r[(size_t)p * mn + i];
            g[mlo + i] = acc;
        }
        MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, g, d->scnt, d->sdis, MPI_FLOAT, comm);
        *sent += (double)(m - mn) * sizeof(float) * 2.0;
    }
    return EM_OK;
}

/* Step 7: the dense gradient summed over all N ranks, in buckets overlapped with the
 * dense backward, the backward all-to-all and the sparse update. The dense backward
 * calls ar_ready as each layer's gradient is final (last layer first): the range is
 * weighted, and every bucket whose layers are all done gets its reduce-scatter posted;
 * ar_progress lets MPI move the posted ones (Open MPI progresses non-blocking
 * collectives only inside MPI calls) and, in bucket order, sums each finished one in
 * rank order and posts its all-gather; ar_finish completes the rest. Every element is
 * summed in rank order 0..N-1 whatever the buckets, so the result is bitwise that of
 * one all-reduce of the whole block. Reduce-scatters and all-gathers each have their
 * own communicator, and every rank posts both in bucket order. */
static void ar_reduce_post(em_dist *d, arbucket *b) {
    const int W = d->world;
    const size_t mn = (size_t)b->rcnt[0], mlo = (size_t)b->dis[d->rank];
    float *g = d->ar_g + b->lo;
    for (size_t i = 0; i < mn; i++) { /* rank order 0..W-1 */
        float acc = b->r[i];
        for (int p = 1; p < W; p++) acc += b->r[(size_t)p * mn + i];
        g[mlo + i] = acc;
    }
    MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, g, b->cnt, b->dis, MPI_FLOAT, d->agcomm, &b->ag);
}

static void ar_progress(em_dist *d) {
    while (d->ar_ag < d->ar_next) {
        int done = 0;
        MPI_Test(&d->bk[d->ar_ag].rs, &done, MPI_STATUS_IGNORE);
        if (!done) return;
        ar_reduce_post(d, &d->bk[d->ar_ag++]);
    }
}

static void ar_post_upto(em_dist *d, size_t lo) { /* every unposted bucket starting at or above lo */
    while (d->ar_next < d->nbk && d->bk[d->ar_next].lo >= lo) {
        arbucket *b = &d->bk[d->ar_next++];
        MPI_Ialltoallv(d->ar_g + b->lo, b->cnt, b->dis, MPI_FLOAT, b->r, b->rcnt, b->rdis, MPI_FLOAT, d->rscomm, &b->rs);
    }
    ar_progress(d);
}

static void ar_ready(void *ud, size_t lo, size_t hi) {
    em_dist *d = ud;
    for (size_t i = lo; i < hi; i++) d->ar_g[i] *= d->ar_w;
    if (d->world > 1) ar_post_upto(d, lo);
}

static void ar_begin(em_dist *d, float *g, float w) {
    d->ar_g = g, d->ar_w = w, d->ar_next = d->ar_ag = 0;
}

static void ar_finish(em_dist *d) {
    d->bytes.allreduce = 0;
    if (d->world == 1) return;
    ar_post_upto(d, 0); /* a rank without examples (or whose backward failed) posts them all here */
    while (d->ar_ag < d->nbk) {
        arbucket *b = &d->bk[d->ar_ag++];
        MPI_Wait(&b->rs, MPI_STATUS_IGNORE);
        ar_reduce_post(d, b);
    }
    for (int k = 0; k < d->nbk; k++) {
        MPI_Wait(&d->bk[k].ag, MPI_STATUS_IGNORE);
        d->bytes.allreduce += (double)(d->bk[k].n - (size_t)d->bk[k].rcnt[0]) * sizeof(float) * 2.0;
    }
}

/* 2D: every shard's weights and optimizer state averaged over its M replicas (one per
 * replica group), summed in group order: only the rows some replica updated since the
 * last average (the others are equal everywhere), as the paper and the planner's model do. */
static em_status sync_replicas(em_dist *d) {
    if (d->M == 1) return EM_OK;
    const float inv = 1.0f / (float)d->M;
    double sent = 0, s1;
    for (int k = 0; k < d->nmine; k++) {
        em_embbag *eb = k < d->kn ? d->emb : d->embc;
        const int j = k < d->kn ? k : k - d->kn;
        const size_t R = (size_t)em_embbag_rows(eb, j), dim = (size_t)em_embbag_dim(eb);
        size_t ns = 0;
        float *w = em_embbag_weights(eb, j), *st = em_embbag_state(eb, j, &ns);
        const size_t spr = R ? ns / R : 0, rw = dim + spr;
        /* the rows any replica touched since the last average (an OR: order-free) */
        uint8_t *t = d->touched + d->toff[k];
        for (size_t o = 0; o < R; o += (size_t)1 << 30)
            MPI_Allreduce(MPI_IN_PLACE, t + o, (int)(R - o < ((size_t)1 << 30) ? R - o : ((size_t)1 << 30)), MPI_UNSIGNED_CHAR,
                          MPI_BOR, d->rcomm);
        sent += (double)R * 2.0 * (double)(d->M - 1) / (double)d->M;
        size_t n = 0;
        for (size_t r = 0; r < R; r++) n += t[r];
        if (!n) continue;
        em_status e = grow(&d->spack, n * rw * sizeof(float));
        float *pk = d->spack.p;
        for (size_t r = 0, i = 0; r < R && !e; r++)
            if (t[r]) {
                memcpy(pk + i * rw, w + r * dim, dim * sizeof(float));
                if (spr) memcpy(pk + i * rw + dim, st + r * spr, spr * sizeof(float));
                i++;
            }
        if ((e = allreduce_sum(d, d->rcomm, pk, n * rw, &s1, e))) return e;
        sent += s1;
        for (size_t r = 0, i = 0; r < R; r++)
            if (t[r]) {
                for (size_t x = 0; x < dim; x++) w[r * dim + x] = pk[i * rw + x] * inv;
                for (size_t x = 0; x < spr; x++) st[r * spr + x] = pk[i * rw + dim + x] * inv;
                t[r] = 0, i++;
            }
    }
    d->bytes.sync = sent;
    d->synced_step = d->step;
    return EM_OK;
}

/* Data-parallel tables: each rank's gradient of its replicas (dense, rows x D, plus a
 * touch count per row) from its own examples, summed over all N ranks (rank order),
 * then every rank applies the same sparse optimizer step to the touched rows in row
 * order: the replicas stay identical, and the step is one process's on the global
 * batch. dp holds d loss / d pooled weighted for the sparse tables (M B_r / global
 * batch); these tables take the global step, so 1/M of it. */
static em_status dp_backward(em_dist *d, const em_batch *b, const float *dp, em_pool *pool) {
    if (!d->ndp) return EM_OK;
    const int B = b ? b->B : 0;
    const size_t D = (size_t)d->D, TD = (size_t)d->T * D;
    em_status st = grow(&d->dpgrad, (size_t)d->dp_len * sizeof(float));
    if (st) return allreduce_sum(d, MPI_COMM_WORLD, NULL, 0, &(double){0}, st); /* fails every rank */
    float *g = d->dpgrad.p;
    memset(g, 0, (size_t)d->dp_len * sizeof(float));
    const float inv_m = 1.0f / (float)d->M;
    size_t base = 0, most = 0;
    for (int j = 0; j < d->ndp; j++) {
        const int t = d->dpt[j];
        const size_t R = (size_t)d->cfg.model.rows[t];
        float *gw = g + base, *cnt = gw + R * D;
        for (int e = 0; e < B; e++) {
            const size_t u = (size_t)t * B + (size_t)e;
            const int64_t n = b->offsets[u + 1] - b->offsets[u];
            const float sc = (d->cfg.model.pooling == EM_POOL_MEAN && n > 1 ? 1.0f / (float)n : 1.0f) * inv_m;
            const float *v = dp + (size_t)e * TD + (size_t)t * D;
            for (int64_t k = b->offsets[u]; k < b->offsets[u + 1]; k++) {
                float *r = gw + (size_t)b->indices[k] * D;
                for (size_t x = 0; x < D; x++) r[x] += sc * v[x];
                cnt[b->indices[k]] += 1.0f;
            }
        }
        base += R * (D + 1);
        if (R > most) most = R;
    }
    double sent = 0;
    if ((st = allreduce_sum(d, MPI_COMM_WORLD, g, (size_t)d->dp_len, &sent, EM_OK))) return st;
    d->bytes.dp = sent;
    if ((st = grow(&d->dprows, most * (sizeof(int64_t) + D * sizeof(float)) + 1))) return st;
    int64_t *rows = d->dprows.p;
    float *pg = (float *)(rows + most);
    base = 0;
    for (int j = 0; j < d->ndp; j++) {
        const size_t R = (size_t)d->cfg.model.rows[d->dpt[j]];
        const float *gw = g + base, *cnt = gw + R * D;
        size_t n = 0;
        for (size_t r = 0; r < R; r++)
            if (cnt[r] > 0) {
                rows[n] = (int64_t)r;
                memcpy(pg + n * D, gw + r * D, D * sizeof(float));
                n++;
            }
        if (n && (st = em_embbag_update_rows(d->embd, j, rows, pg, n, pool))) return st;
        base += R * (D + 1);
    }
    return EM_OK;
}

em_status em_dist_sync(em_dist *d) {
    if (d->M == 1 || d->synced_step == d->step) return EM_OK; /* nothing moved since the last average */
    return agree(sync_replicas(d));
}

/* ------------------------------------------------------------ steps */

static em_status check_local(const em_dist *d, const em_batch *b) {
    if (!b || b->B == 0) return EM_OK;
    if (b->num_sparse != d->T || b->num_dense != d->cfg.model.num_dense)
        return em_errorf(EM_ERR_INVALID, "dist: batch has %d dense / %d sparse features, the model expects %d / %d",
                         b->num_dense, b->num_sparse, d->cfg.model.num_dense, d->T);
    if (b->per_id_w) return em_errorf(EM_ERR_UNSUPPORTED, "dist: per-id weights are not supported in distributed training");
    const int64_t *off = b->offsets;
    const size_t TB = (size_t)d->T * (size_t)b->B;
    if (off[0] != 0) return em_errorf(EM_ERR_INVALID, "dist: offsets[0] = %lld, not 0", (long long)off[0]);
    for (size_t u = 0; u < TB; u++)
        if (off[u + 1] < off[u]) return em_errorf(EM_ERR_INVALID, "dist: offsets decrease at %zu", u);
    for (int t = 0; t < d->T; t++)
        for (int64_t k = off[(size_t)t * b->B]; k < off[(size_t)(t + 1) * b->B]; k++)
            if (b->indices[k] < 0 || b->indices[k] >= d->cfg.model.rows[t])
                return em_errorf(EM_ERR_INVALID, "dist: table %d: index %lld out of [0, %lld)", t, (long long)b->indices[k],
                                 (long long)d->cfg.model.rows[t]);
    return EM_OK;
}

em_status em_dist_forward(em_dist *d, const em_batch *local, float *logits, em_pool *pool) {
    memset(&d->bytes, 0, sizeof d->bytes);
    em_status st = agree(check_local(d, local));
    if (st || (st = agree(input_dist(d, local))) || (st = agree(pool_and_output_dist(d, local, pool)))) return st;
    if (local && local->B) st = em_dlrm_forward_with(d->m, local, d->pooled.p, logits, pool);
    d->bytes.total = d->bytes.ids + d->bytes.pooled + d->bytes.dp;
    return agree(st);
}

em_status em_dist_train_step(em_dist *d, const em_batch *local, double *loss, em_pool *pool) {
    memset(&d->bytes, 0, sizeof d->bytes);
    em_status st = agree(check_local(d, local));
    if (st || (st = agree(input_dist(d, local))) || (st = agree(pool_and_output_dist(d, local, pool)))) return st;
    const int B = local ? local->B : 0;
    const size_t TD = (size_t)d->T * (size_t)d->D;
    size_t n;
    float *g = em_dlrm_dense_block(d->m, 1, &n);
    double l = 0;
    /* weights: dense B_r / (global batch): the all-reduced step is one process's on
     * the global batch; sparse M B_r / (global batch): each replica group steps with
     * M times its share of the global gradient, and the replicas' average is the global
     * step (exactly so for SGD, whatever the groups' batch sizes). In 1D both are the same.
     * The dense weight is applied layer by layer in ar_ready, as the buckets go out. */
    const float w = d->Gw ? (float)B / (float)d->Gw : 0.f, ws = (float)d->M * w;
    ar_begin(d, g, w);
    if (!B) memset(g, 0, n * sizeof(float));
    double t0 = em_now();
    st = grow(&d->dpooled, (size_t)(B ? B : 1) * TD * sizeof(float));
    if (!st && B) st = em_dlrm_dense_backward_ready(d->m, local, d->pooled.p, d->dpooled.p, &l, ar_ready, d, pool);
    d->t_bwd = em_now() - t0;
    /* every bucket not posted yet goes out now (a rank without examples, or whose
     * backward failed): the others' collectives wait on them */
    if (d->world > 1) ar_post_upto(d, 0);
    if ((st = agree(st))) {
        ar_finish(d);
        return st;
    }
    if (B) {
        float *dp = d->dpooled.p;
        for (size_t i = 0; i < (size_t)B * TD; i++) dp[i] *= ws;
    }
    st = backward_dist(d, local, pool);
    t0 = em_now();
    ar_finish(d); /* completes even if the backward failed */
    d->t_wait = em_now() - t0;
    if ((st = agree(st))) return st;
    if ((st = agree(dp_backward(d, local, d->dpooled.p, pool)))) return st;
    if ((st = agree(em_dlrm_dense_step(d->m, pool)))) return st;
    d->step++;
    if (d->M > 1 && d->step % d->cfg.sync_every == 0 && (st = agree(sync_replicas(d)))) return st;
    if (loss) { /* the global batch's mean loss, summed in rank order */
        double lw = l * (double)B, s = 0;
        MPI_Allgather(&lw, 1, MPI_DOUBLE, d->losses, 1, MPI_DOUBLE, MPI_COMM_WORLD);
        for (int p = 0; p < d->world; p++) s += d->losses[p];
        *loss = d->Gw ? s / (double)d->Gw : 0.0;
    }
    d->bytes.total = d->bytes.ids + d->bytes.pooled + d->bytes.grads + d->bytes.dp + d->bytes.allreduce + d->bytes.sync;
    return EM_OK;
}

/* ------------------------------------------------------------ gathering tables */

#define CHUNK_FLOATS ((size_t)1 << 26)

static void send_floats(const float *p, size_t n, int to, int tag) {
    for (size_t o = 0; o < n; o += CHUNK_FLOATS)
        MPI_Send(p + o, (int)(n - o < CHUNK_FLOATS ? n - o : CHUNK_FLOATS), MPI_FLOAT, to, tag, MPI_COMM_WORLD);
}

static void recv_floats(float *p, size_t n, int from, int tag) {
    for (size_t o = 0; o < n; o += CHUNK_FLOATS)
        MPI_Recv(p + o, (int)(n - o < CHUNK_FLOATS ? n - o : CHUNK_FLOATS), MPI_FLOAT, from, tag, MPI_COMM_WORLD,
                 MPI_STATUS_IGNORE);
}

static void bcast_floats(float *p, size_t n, int root) {
    for (size_t o = 0; o < n; o += CHUNK_FLOATS)
        MPI_Bcast(p + o, (int)(n - o < CHUNK_FLOATS ? n - o : CHUNK_FLOATS), MPI_FLOAT, root, MPI_COMM_WORLD);
}

static int local_index(const em_dist *d, int s) {
    for (int k = 0; k < d->nmine; k++)
        if (d->mine[k] == s) return k;
    return -1;
}

static size_t state_per_row(const em_dist *d) {
    const em_optim_kind k = d->cfg.model.sparse_opt.kind;
    return k == EM_OPT_ADAGRAD ? (size_t)d->D : k == EM_OPT_ROWWISE_ADAGRAD ? 1 : 0;
}

/* Table t's shards to rank 0 into w (rows x D) and state (rows x spr), from replica
 * group 0 (whose ranks are 0 .. G-1, so a holder's group rank is its world rank); or,
 * with to_root = 0, from rank 0 out to their holders in every replica group. */
static em_status move_table(em_dist *d, int t, float *w, float *state, int to_root) {
    const size_t D = (size_t)d->D, spr = state_per_row(d);
    if (d->cfg.type[t] == EM_SHARD_DATA) { /* every rank holds the same replica */
        int j = 0;
        while (d->dpt[j] != t) j++;
        const size_t nw = (size_t)d->cfg.model.rows[t] * D, ns = (size_t)d->cfg.model.rows[t] * spr;
        float *lw = em_embbag_weights(d->embd, j), *ls = spr ? em_embbag_state(d->embd, j, NULL) : NULL;
        if (to_root) {
            if (d->rank == 0) {
                memcpy(w, lw, nw * sizeof(float));
                if (state && ls) memcpy(state, ls, ns * sizeof(float));
            }
            return EM_OK;
        }
        if (d->rank == 0) {
            memcpy(lw, w, nw * sizeof(float));
            if (ls) memcpy(ls, state, ns * sizeof(float));
        }
        bcast_floats(lw, nw, 0);
        if (ls) bcast_floats(ls, ns, 0);
        return EM_OK;
    }
    /* rank 0 stages row-wise shards (every G-th row) and column-wise pieces (some columns
     * of every row) in a contiguous buffer */
    size_t most = 0;
    for (int s = 0; s < d->nsh; s++)
        if (d->sh[s].t == t && (d->sh[s].stride > 1 || d->sh[s].cols < d->D) && (size_t)d->sh[s].rows * (D + spr) > most)
            most = (size_t)d->sh[s].rows * (D + spr);
    em_status st = d->rank == 0 && most ? grow(&d->tmp, most * sizeof(float)) : EM_OK;
    if ((st = agree(st))) return st;
    for (int s = 0; s < d->nsh; s++) {
        const shard *h = &d->sh[s];
        if (h->t != t || h->rows == 0) continue;
        const int k = local_index(d, s);
        em_embbag *e = k >= 0 && k >= d->kn ? d->embc : d->emb;
        const int j0 = k >= d->kn ? k - d->kn : k;
        float *lw = k >= 0 ? em_embbag_weights(e, j0) : NULL;
        float *ls = k >= 0 && spr ? em_embbag_state(e, j0, NULL) : NULL;
        /* a piece holds cols of the D columns; AdaGrad's state is per element (spr = D),
         * so a piece holds cols of it too (row-wise AdaGrad is not column-wise) */
        const size_t C = (size_t)h->cols, sc = spr == D ? C : spr;
        const size_t nw = (size_t)h->rows * C, ns = (size_t)h->rows * sc;
        float *gw = w ? w + (size_t)h->row0 * D + (size_t)h->col0 : NULL;
        float *gs = state ? state + (size_t)h->row0 * spr + (spr == D ? (size_t)h->col0 : 0) : NULL;
        float *const gw0 = gw, *const gs0 = gs; /* local row j is global row row0 + j stride */
        const size_t str = (size_t)h->stride;
        const int staged = d->rank == 0 && (str > 1 || C < D);
        if (staged) {
            float *tw = d->tmp.p, *ts = tw + nw;
            if (!to_root) {
                for (size_t j = 0; j < (size_t)h->rows; j++) {
                    memcpy(tw + j * C, gw0 + j * str * D, C * sizeof(float));
                    if (gs0 && sc) memcpy(ts + j * sc, gs0 + j * str * spr, sc * sizeof(float));
                }
            }
            gw = tw, gs = gs0 ? ts : NULL;
        }
        const int src = h->holder;
        if (to_root) {
            if (src == 0) {
                if (d->rank == 0) {
                    memcpy(gw, lw, nw * sizeof(float));
                    if (gs && ls) memcpy(gs, ls, ns * sizeof(float));
                }
            } else if (d->rank == src) {
                send_floats(lw, nw, 0, 100 + s);
                if (spr) send_floats(ls, ns, 0, 100 + s);
            } else if (d->rank == 0) {
                recv_floats(gw, nw, src, 100 + s);
                if (spr) {
                    if (gs) recv_floats(gs, ns, src, 100 + s);
                    else { /* the caller wants no state: drain it */
                        float *tmp = em_malloc(ns * sizeof(float));
                        if (tmp) recv_floats(tmp, ns, src, 100 + s);
                        em_free(tmp);
                    }
                }
            }
        } else {
            for (int m = 0; m < d->M; m++) { /* every replica group's holder */
                const int dst = m * d->gsize + h->holder;
                if (dst == 0) {
                    if (d->rank == 0) {
                        memcpy(lw, gw, nw * sizeof(float));
                        if (spr) memcpy(ls, gs, ns * sizeof(float));
                    }
                } else if (d->rank == 0) {
                    send_floats(gw, nw, dst, 100 + s);
                    if (spr) send_floats(gs, ns, dst, 100 + s);
                } else if (d->rank == dst) {
                    recv_floats(lw, nw, 0, 100 + s);
                    if (spr) recv_floats(ls, ns, 0, 100 + s);
                }
            }
        }
        if (staged && to_root)
            for (size_t j = 0; j < (size_t)h->rows; j++) {
                memcpy(gw0 + j * str * D, gw + j * C, C * sizeof(float));
                if (gs0 && sc) memcpy(gs0 + j * str * spr, gs + j * sc, sc * sizeof(float));
            }
    }
    return EM_OK;
}

em_status em_dist_gather_table(em_dist *d, int t, float *w, float *state) {
    if (t < 0 || t >= d->T) return em_errorf(EM_ERR_INVALID, "dist: no table %d", t);
    em_status st = move_table(d, t, w, state, 1);
    if (st) return st;
    const size_t rows = (size_t)d->cfg.model.rows[t];
    bcast_floats(w, rows * (size_t)d->D, 0);
    if (state && state_per_row(d)) bcast_floats(state, rows * state_per_row(d), 0);
    return EM_OK;
}

/* ------------------------------------------------------------ checkpoints */

em_status em_dist_save(em_dist *d, const char *path, const em_st_meta *extra, int n_extra, em_pool *pool) {
    em_dlrm *full = NULL;
    em_status st = EM_OK;
    if (d->rank == 0) st = em_dlrm_create(&full, &d->cfg.model, pool);
    if ((st = agree(st))) return st;
    for (int t = 0; t < d->T; t++) {
        float *w = NULL, *s = NULL;
        if (d->rank == 0) {
            char name[64];
            snprintf(name, sizeof name, "emb.%d.weight", t);
            w = em_dlrm_param(full, name, 0, NULL);
            s = state_per_row(d) ? em_embbag_state(em_dlrm_embbag(full), t, NULL) : NULL;
        }
        if ((st = move_table(d, t, w, s, 1))) {
            em_dlrm_free(full);
            return st;
        }
    }
    if (d->rank == 0) {
        size_t n, nf;
        for (int which = 0; which <= 2; which += 2) {
            float *src = em_dlrm_dense_block(d->m, which, &n), *dst = em_dlrm_dense_block(full, which, &nf);
            if (n && n == nf) memcpy(dst, src, n * sizeof(float));
        }
        em_dlrm_set_step(full, em_dlrm_step_count(d->m));
        st = em_dlrm_save(full, path, extra, n_extra);
        em_dlrm_free(full);
    }
    return agree(st);
}

static int same_shape(const em_dlrm_cfg *a, const em_dlrm_cfg *b) {
    if (a->num_dense != b->num_dense || a->num_tables != b->num_tables || a->dim != b->dim || a->n_bot != b->n_bot ||
        a->n_top != b->n_top || a->pooling != b->pooling || a->dense_opt.kind != b->dense_opt.kind ||
        a->sparse_opt.kind != b->sparse_opt.kind)
        return 0;
    for (int t = 0; t < a->num_tables; t++)
        if (a->rows[t] != b->rows[t]) return 0;
    for (int i = 0; i < a->n_bot; i++)
        if (a->bot[i] != b->bot[i]) return 0;
    for (int i = 0; i < a->n_top; i++)
        if (a->top[i] != b->top[i]) return 0;
    return 1;
}

em_status em_dist_load(em_dist **out, const em_dist_cfg *cfg, const char *path, em_pool *pool) {
    *out = NULL;
    em_dlrm *full = NULL;
    em_status st = EM_OK;
    if (em_dist_rank() == 0) {
        st = em_dlrm_load(&full, path, NULL, pool);
        if (!st && !same_shape(em_dlrm_config(full), &cfg->model))
            st = em_errorf(EM_ERR_INVALID, "%s: the checkpoint's model (tables, dims, layers, optimizers) differs from the run's",
                           path);
    }
    if ((st = agree(st))) {
        em_dlrm_free(full);
        return st;
    }
    em_dist *d = NULL;
    if ((st = em_dist_create(&d, cfg, pool))) {
        em_dlrm_free(full);
        return st;
    }
    for (int t = 0; t < d->T; t++) {
        float *w = NULL, *s = NULL;
        if (d->rank == 0) {
            char name[64];
            snprintf(name, sizeof name, "emb.%d.weight", t);
            w = em_dlrm_param(full, name, 0, NULL);
            s = state_per_row(d) ? em_embbag_state(em_dlrm_embbag(full), t, NULL) : NULL;
        }
        if ((st = move_table(d, t, w, s, 0))) {
            em_dlrm_free(full);
            em_dist_free(d);
            return st;
        }
    }
    long long step = d->rank == 0 ? (long long)em_dlrm_step_count(full) : 0;
    MPI_Bcast(&step, 1, MPI_LONG_LONG, 0, MPI_COMM_WORLD);
    for (int which = 0; which <= 2; which += 2) {
        size_t n, nf = 0;
        float *dst = em_dlrm_dense_block(d->m, which, &n);
        if (d->rank == 0) memcpy(dst, em_dlrm_dense_block(full, which, &nf), n * sizeof(float));
        if (n) bcast_floats(dst, n, 0);
    }
    em_dlrm_set_step(d->m, step);
    d->step = step;
    em_dlrm_free(full);
    *out = d;
    return EM_OK;
}

/* ------------------------------------------------------------ planner */

em_status em_dist_plan(em_dist_cfg *cfg, int world, int batch, em_plan **plan_out) {
    const em_dlrm_cfg *mc = &cfg->model;
    const int T = mc->num_tables;
    em_table_spec *specs = em_calloc((size_t)T, sizeof *specs);
    if (!specs) return em_errorf(EM_ERR_NOMEM, "dist: out of memory");
    const int opt_bytes = mc->sparse_opt.kind == EM_OPT_ROWWISE_ADAGRAD ? 4
                          : mc->sparse_opt.kind == EM_OPT_ADAGRAD     ? 4 * mc->dim
                                                                       : 0;
    for (int t = 0; t < T; t++) {
        snprintf(specs[t].name, sizeof specs[t].name, "C%d", t + 1);
        specs[t].rows = mc->rows[t], specs[t].dim = mc->dim, specs[t].pooling = 1.0, specs[t].zipf = 1.05;
        specs[t].elem_bytes = 4, specs[t].opt_bytes = opt_bytes, specs[t].shard = EM_SHARD_AUTO;
    }
    const int group = cfg->group > 0 ? cfg->group : world;
    em_plan_cfg pc = em_plan_cfg_default(world, group);
    pc.sync_every = cfg->sync_every > 0 ? cfg->sync_every : pc.sync_every;
    pc.batch = batch > 0 ? batch : pc.batch;
    pc.comm_bytes = cfg->prec == EM_COMM_FP32 ? 4 : 2;
    pc.algo = EM_PLAN_KK;
    /* column-wise pieces only of even widths, at most EM_DIST_MAX_PIECES of them */
    if (pc.cw_width < 1 || mc->dim % pc.cw_width != 0 || mc->dim / pc.cw_width > EM_DIST_MAX_PIECES) pc.cw_min_dim = 1 << 30;
    double dense = 0, flops = 0;
    for (int i = 0; i + 1 < mc->n_bot; i++) dense += (double)mc->bot[i] * mc->bot[i + 1] + mc->bot[i + 1], flops += 2.0 * mc->bot[i] * mc->bot[i + 1];
    for (int i = 0; i + 1 < mc->n_top; i++) dense += (double)mc->top[i] * mc->top[i + 1] + mc->top[i + 1], flops += 2.0 * mc->top[i] * mc->top[i + 1];
    pc.dense_params = dense, pc.dense_flops = flops;
    em_plan *p = NULL;
    em_status st = em_plan_create(&p, specs, T, &pc);
    em_free(specs);
    if (st) return st;
    cfg->pieces_given = 0;
    for (int t = 0; t < T; t++) {
        cfg->type[t] = p->type[t];
        cfg->owner[t] = 0;
        if (p->type[t] == EM_SHARD_COLUMN) cfg->pieces_given = 1, cfg->col_width = pc.cw_width;
    }
    for (int i = 0; i < p->nshards; i++) {
        const em_shard *h = &p->shards[i];
        if (h->type == EM_SHARD_TABLE) cfg->owner[h->table] = h->rank;
        if (h->type == EM_SHARD_COLUMN) {
            cfg->owner[h->table] = h->col0 == 0 ? h->rank : cfg->owner[h->table];
            cfg->piece_owner[h->table][h->col0 / pc.cw_width] = (int16_t)h->rank;
        }
    }
    if (plan_out) *plan_out = p;
    else em_plan_free(p);
    return EM_OK;
}
