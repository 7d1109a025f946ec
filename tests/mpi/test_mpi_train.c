/*
 * test_mpi_train.c - distributed training (ember/dist.h) against one process, run by
 * CTest under `mpirun --oversubscribe -np N` (N = 2 and 4).
 *
 * Every rank builds the same global batches; rank r trains on its slice (uneven
 * slices, and one step where a rank has no examples), while each rank also trains
 * the reference: one em_dlrm on the whole global batch. After the steps:
 *   - dense parameters and every table (gathered from its shards) equal the
 *     reference within float tolerance, for table-wise, row-wise, column-wise,
 *     data-parallel and mixed placements, with row-wise AdaGrad + dense AdaGrad (not
 *     column-wise: refused), SGD + mean pooling and AdaGrad + Adam;
 *   - the same distributed run twice gives bitwise-equal parameters;
 *   - fp16 and bf16 all-to-all stay close to fp32;
 *   - a checkpoint written by em_dist_save is the single-process layout (rank 0
 *     loads it with em_dlrm_load and finds the gathered tables); em_dist_load on the
 *     same placement resumes bitwise as an uninterrupted run, and on another
 *     placement (resharding) trains on as one process would;
 *   - the planner's placement (em_dist_plan) trains to the same result;
 *   - bytes moved per step equal what the layout implies;
 *   - 2D sparse parallelism (2 replica groups): with SGD and averaging every step it
 *     equals one process; with momentum-scaled row-wise AdaGrad averaged every 2 steps
 *     the replicas agree bitwise right after a sync, and runs are deterministic.
 */
#include <mpi.h>
#include <unistd.h>

#include "ember/dist.h"
#include "test.h"

#define T 5
#define D 8
#define G 67 /* global batch: uneven slices */
#define STEPS 6

static int g_rank, g_world;

static em_dlrm_cfg small_cfg(em_optim_kind sparse, em_optim_kind dense, em_pooling pooling) {
    em_dlrm_cfg c;
    memset(&c, 0, sizeof c);
    c.num_dense = 4, c.num_tables = T, c.dim = D;
    const int64_t rows[T] = {40, 7, 300, 1000, 3};
    for (int t = 0; t < T; t++) c.rows[t] = rows[t];
    c.n_bot = 3, c.bot[0] = 4, c.bot[1] = 16, c.bot[2] = D;
    c.n_top = 3, c.top[0] = D + T * (T + 1) / 2, c.top[1] = 16, c.top[2] = 1;
    c.pooling = pooling;
    c.dense_opt = em_optim_default(dense, 0.05f);
    c.sparse_opt = em_optim_default(sparse, 0.05f);
    c.seed = 7;
    return c;
}

/* A global batch for step s (the same on every rank), and the slice of rank r. */
typedef struct {
    em_batch b;
    float label[G], dense[G * 4];
    int64_t idx[G * T * 4], off[T * G + 1];
} gbatch;

static void make_global(gbatch *g, const em_dlrm_cfg *c, int s) {
    em_rng r;
    em_rng_seed(&r, 1000 + (uint64_t)s);
    int64_t n = 0;
    g->off[0] = 0;
    for (int t = 0; t < T; t++)
        for (int e = 0; e < G; e++) {
            int k = (int)(em_rng_u64(&r) % 4); /* 0..3 ids: empty bags too */
            for (int j = 0; j < k; j++) {
                uint64_t u = em_rng_u64(&r);
                /* skewed: half the ids among the first few rows (duplicates in a batch) */
                g->idx[n++] = (int64_t)((u & 1) ? (u >> 8) % 4 % (uint64_t)c->rows[t] : (u >> 8) % (uint64_t)c->rows[t]);
            }
            g->off[(size_t)t * G + e + 1] = n;
        }
    for (int e = 0; e < G; e++) {
        g->label[e] = (float)(em_rng_u64(&r) & 1);
        for (int j = 0; j < 4; j++) g->dense[e * 4 + j] = (float)em_rng_uniform(&r) * 2.f - 0.5f;
    }
    g->b = (em_batch){.B = G, .num_dense = 4, .num_sparse = T, .label = g->label, .dense = g->dense, .indices = g->idx,
                      .offsets = g->off};
}

typedef struct {
    em_batch b;
    float *label, *dense;
    int64_t *idx, *off;
} lbatch;

/* Rank r's examples of global batch g: [lo, hi) with uneven cuts; at step 3 rank
 * world-1 gets nothing. */
static void slice(lbatch *l, const gbatch *g, int s, int r, int world) {
    int cut[65];
    for (int q = 0; q <= world; q++) cut[q] = (int)((int64_t)G * q * q / ((int64_t)world * world)); /* uneven */
    if (s == 3 && world > 1) cut[world - 1] = G;
    const int lo = cut[r], hi = cut[r + 1], B = hi - lo;
    l->label = malloc(sizeof(float) * (size_t)(B + 1)), l->dense = malloc(sizeof(float) * 4 * (size_t)(B + 1));
    l->idx = malloc(sizeof(int64_t) * (size_t)(G * T * 4 + 1)), l->off = malloc(sizeof(int64_t) * (size_t)(T * B + 1));
    int64_t n = 0;
    l->off[0] = 0;
    for (int t = 0; t < T; t++)
        for (int e = lo; e < hi; e++) {
            for (int64_t k = g->off[(size_t)t * G + e]; k < g->off[(size_t)t * G + e + 1]; k++) l->idx[n++] = g->idx[k];
            l->off[(size_t)t * B + (e - lo) + 1] = n;
        }
    memcpy(l->label, g->label + lo, sizeof(float) * (size_t)B);
    memcpy(l->dense, g->dense + lo * 4, sizeof(float) * 4 * (size_t)B);
    l->b = (em_batch){.B = B, .num_dense = 4, .num_sparse = T, .label = l->label, .dense = l->dense, .indices = l->idx,
                      .offsets = l->off};
}

static void lfree(lbatch *l) { free(l->label), free(l->dense), free(l->idx), free(l->off); }

/* Train `steps` steps from step s0 distributed; returns the losses' sum. */
static double train_dist(em_dist *d, const em_dlrm_cfg *c, int s0, int steps) {
    double sum = 0;
    gbatch *g = malloc(sizeof *g);
    for (int s = s0; s < s0 + steps; s++) {
        make_global(g, c, s);
        lbatch l;
        slice(&l, g, s, g_rank, g_world);
        double loss = 0;
        CHECK_OK(em_dist_train_step(d, &l.b, &loss, NULL));
        sum += loss;
        lfree(&l);
    }
    free(g);
    return sum;
}

static em_dlrm *train_ref(const em_dlrm_cfg *c, int steps, double *loss_sum) {
    em_dlrm *m;
    CHECK_OK(em_dlrm_create(&m, c, NULL));
    gbatch *g = malloc(sizeof *g);
    *loss_sum = 0;
    for (int s = 0; s < steps; s++) {
        make_global(g, c, s);
        double loss;
        CHECK_OK(em_dlrm_train_step(m, &g->b, &loss, NULL));
        *loss_sum += loss;
    }
    free(g);
    return m;
}

/* Max relative error of everything in d against the reference model. */
static double compare(em_dist *d, em_dlrm *ref, int with_state) {
    double worst = 0;
    size_t n, nr;
    const float *p = em_dlrm_dense_block(em_dist_dense(d), 0, &n), *pr = em_dlrm_dense_block(ref, 0, &nr);
    CHECK(n == nr);
    double e = rel_err_f(p, pr, n, 1e-3);
    if (e > worst) worst = e;
    const em_dlrm_cfg *c = em_dlrm_config(ref);
    for (int t = 0; t < T; t++) {
        size_t rows = (size_t)c->rows[t], sc = 0;
        float *w = malloc(rows * D * sizeof(float)), *st = malloc(rows * D * sizeof(float));
        CHECK_OK(em_dist_gather_table(d, t, w, with_state ? st : NULL));
        char name[32];
        snprintf(name, sizeof name, "emb.%d.weight", t);
        const float *wr = em_dlrm_param(ref, name, 0, NULL);
        e = rel_err_f(w, wr, rows * D, 1e-3);
        if (e > worst) worst = e;
        const float *sr = em_embbag_state(em_dlrm_embbag(ref), t, &sc);
        if (with_state && sc) {
            e = rel_err_f(st, sr, sc, 1e-3);
            if (e > worst) worst = e;
        }
        free(w), free(st);
    }
    return worst;
}

static em_dist_cfg placement(const em_dlrm_cfg *c, const char *kind) {
    em_dist_cfg dc;
    memset(&dc, 0, sizeof dc);
    dc.model = *c;
    for (int t = 0; t < T; t++) {
        dc.owner[t] = (t * 3 + 1) % g_world;
        if (strcmp(kind, "table") == 0) dc.type[t] = EM_SHARD_TABLE;
        else if (strcmp(kind, "row") == 0) dc.type[t] = EM_SHARD_ROW;
        else if (strcmp(kind, "data") == 0) dc.type[t] = EM_SHARD_DATA;
        else if (strcmp(kind, "column") == 0) dc.type[t] = EM_SHARD_COLUMN;
        else if (strcmp(kind, "mixedc") == 0) /* every type, column-wise included */
            dc.type[t] = t % 4 == 0 ? EM_SHARD_ROW : t % 4 == 1 ? EM_SHARD_TABLE : t % 4 == 2 ? EM_SHARD_DATA : EM_SHARD_COLUMN;
        else dc.type[t] = t % 3 == 0 ? EM_SHARD_ROW : t % 3 == 1 ? EM_SHARD_TABLE : EM_SHARD_DATA; /* mixed */
    }
    return dc;
}

static void check_equivalence(em_optim_kind sparse, em_optim_kind dense, em_pooling pooling) {
    em_dlrm_cfg c = small_cfg(sparse, dense, pooling);
    double ref_loss;
    em_dlrm *ref = train_ref(&c, STEPS, &ref_loss);
    const char *kinds[] = {"table", "row", "data", "mixed", "column", "mixedc"};
    /* column-wise under row-wise AdaGrad: the pieces' sums of squares are added up */
    for (int k = 0; k < 6; k++) {
        em_dist_cfg dc = placement(&c, kinds[k]);
        if (k == 4) dc.col_width = 2; /* 4 pieces of 2 columns */
        em_dist *d;
        CHECK_OK(em_dist_create(&d, &dc, NULL));
        if (!d) continue;
        double loss = train_dist(d, &c, 0, STEPS);
        double e = compare(d, ref, 1);
        if (g_rank == 0) printf("  %s %s/%s %s: max rel err %.2e, loss %.6f vs %.6f\n", kinds[k], em_optim_name(sparse),
                                em_optim_name(dense), pooling == EM_POOL_MEAN ? "mean" : "sum", e, loss, ref_loss);
        CHECK(e < 2e-4);
        CHECK_NEAR(loss, ref_loss, 1e-4 * STEPS);
        CHECK(em_dist_step_count(d) == STEPS && em_dlrm_step_count(em_dist_dense(d)) == STEPS);
        em_dist_free(d);
    }
    em_dlrm_free(ref);
}

static void test_equivalence_rowwise_adagrad(void) {
    check_equivalence(EM_OPT_ROWWISE_ADAGRAD, EM_OPT_ADAGRAD, EM_POOL_SUM);
}

static void test_equivalence_sgd_mean(void) { check_equivalence(EM_OPT_SGD, EM_OPT_SGD, EM_POOL_MEAN); }

static void test_equivalence_adagrad_adam(void) { check_equivalence(EM_OPT_ADAGRAD, EM_OPT_ADAM, EM_POOL_SUM); }

/* Two identical runs: bitwise the same parameters, on every rank. */
static void test_deterministic(void) {
    em_dlrm_cfg c = small_cfg(EM_OPT_ROWWISE_ADAGRAD, EM_OPT_ADAGRAD, EM_POOL_SUM);
    em_dist_cfg dc = placement(&c, "mixed");
    em_dist *a, *b;
    CHECK_OK(em_dist_create(&a, &dc, NULL));
    CHECK_OK(em_dist_create(&b, &dc, NULL));
    train_dist(a, &c, 0, STEPS);
    train_dist(b, &c, 0, STEPS);
    size_t n;
    const float *pa = em_dlrm_dense_block(em_dist_dense(a), 0, &n), *pb = em_dlrm_dense_block(em_dist_dense(b), 0, &n);
    CHECK(memcmp(pa, pb, n * sizeof(float)) == 0);
    for (int t = 0; t < T; t++) {
        size_t rows = (size_t)c.rows[t];
        float *wa = malloc(rows * D * 4), *wb = malloc(rows * D * 4), *sa = malloc(rows * 4), *sb = malloc(rows * 4);
        CHECK_OK(em_dist_gather_table(a, t, wa, sa));
        CHECK_OK(em_dist_gather_table(b, t, wb, sb));
        CHECK(memcmp(wa, wb, rows * D * 4) == 0 && memcmp(sa, sb, rows * 4) == 0);
        free(wa), free(wb), free(sa), free(sb);
    }
    /* and every rank holds the same dense replica: compare with rank 0's */
    float *r0 = malloc(n * sizeof(float));
    memcpy(r0, pa, n * sizeof(float));
    MPI_Bcast(r0, (int)n, MPI_FLOAT, 0, MPI_COMM_WORLD);
    CHECK(memcmp(r0, pa, n * sizeof(float)) == 0);
    free(r0);
    em_dist_free(a), em_dist_free(b);
}

/* Reduced-precision all-to-all: close to fp32 (the ids and the all-reduce stay exact). */
static void test_reduced_precision(void) {
    em_dlrm_cfg c = small_cfg(EM_OPT_ROWWISE_ADAGRAD, EM_OPT_ADAGRAD, EM_POOL_SUM);
    double ref_loss;
    em_dlrm *ref = train_ref(&c, STEPS, &ref_loss);
    for (int p = EM_COMM_FP16; p <= EM_COMM_BF16; p++) {
        em_dist_cfg dc = placement(&c, "mixed");
        dc.prec = (em_comm_prec)p;
        em_dist *d;
        CHECK_OK(em_dist_create(&d, &dc, NULL));
        double loss = train_dist(d, &c, 0, STEPS);
        em_dist_bytes by;
        em_dist_last_bytes(d, &by);
        double e = compare(d, ref, 0);
        if (g_rank == 0) printf("  %s: max rel err %.2e vs one fp32 process, loss %.6f vs %.6f\n", em_comm_prec_name(dc.prec), e, loss, ref_loss);
        CHECK(e < (p == EM_COMM_FP16 ? 5e-3 : 3e-2));
        CHECK(e > 0 || g_world == 1);
        CHECK_NEAR(loss, ref_loss, 0.01 * STEPS);
        em_dist_free(d);
    }
    em_dlrm_free(ref);
}

/* Checkpoint at step 3; resume on the same placement (bitwise) and on another one. */
static void test_checkpoint_reshard(void) {
    em_dlrm_cfg c = small_cfg(EM_OPT_ROWWISE_ADAGRAD, EM_OPT_ADAGRAD, EM_POOL_SUM);
    char path[256];
    long long tag = g_rank == 0 ? (long long)getpid() : 0;
    MPI_Bcast(&tag, 1, MPI_LONG_LONG, 0, MPI_COMM_WORLD);
    snprintf(path, sizeof path, "/tmp/ember_test_mpi_%lld.st", tag);
    em_dist_cfg a = placement(&c, "table"), b = placement(&c, "mixedc"); /* b: column-wise pieces too */
    em_dist *d;
    CHECK_OK(em_dist_create(&d, &a, NULL));
    train_dist(d, &c, 0, 3);
    em_st_meta meta[1] = {{"test.note", "mpi"}};
    CHECK_OK(em_dist_save(d, path, meta, 1, NULL));
    /* the single-process layout: rank 0 reads it as a plain checkpoint */
    if (g_rank == 0) {
        em_dlrm *m;
        CHECK_OK(em_dlrm_load(&m, path, NULL, NULL));
        CHECK(m && em_dlrm_step_count(m) == 3);
        if (m) {
            float *w = malloc(300 * D * 4);
            CHECK_OK(em_dist_gather_table(d, 2, w, NULL));
            CHECK(memcmp(w, em_dlrm_param(m, "emb.2.weight", 0, NULL), 300 * D * 4) == 0);
            free(w);
            em_dlrm_free(m);
        }
    } else {
        float *w = malloc(300 * D * 4);
        CHECK_OK(em_dist_gather_table(d, 2, w, NULL));
        free(w);
    }
    em_dist_free(d);
    /* resume on the same placement: bitwise what an uninterrupted run gives */
    em_dist *r, *u;
    CHECK_OK(em_dist_load(&r, &a, path, NULL));
    CHECK(r && em_dist_step_count(r) == 3);
    if (r) train_dist(r, &c, 3, STEPS - 3);
    CHECK_OK(em_dist_create(&u, &a, NULL));
    train_dist(u, &c, 0, STEPS);
    if (r) {
        size_t n;
        const float *pr = em_dlrm_dense_block(em_dist_dense(r), 0, &n), *pu = em_dlrm_dense_block(em_dist_dense(u), 0, &n);
        CHECK(memcmp(pr, pu, n * sizeof(float)) == 0);
        pr = em_dlrm_dense_block(em_dist_dense(r), 2, &n), pu = em_dlrm_dense_block(em_dist_dense(u), 2, &n);
        CHECK(n > 0 && memcmp(pr, pu, n * sizeof(float)) == 0); /* dense AdaGrad state */
        float *wr = malloc(1000 * D * 4), *wu = malloc(1000 * D * 4), *sr = malloc(1000 * 4), *su = malloc(1000 * 4);
        for (int t = 0; t < T; t++) {
            CHECK_OK(em_dist_gather_table(r, t, wr, sr));
            CHECK_OK(em_dist_gather_table(u, t, wu, su));
            CHECK(memcmp(wr, wu, (size_t)c.rows[t] * D * 4) == 0 && memcmp(sr, su, (size_t)c.rows[t] * 4) == 0);
        }
        free(wr), free(wu), free(sr), free(su);
    }
    em_dist_free(r), em_dist_free(u);
    /* resharded onto another placement: the same training, within float rounding */
    double ref_loss;
    em_dlrm *ref = train_ref(&c, STEPS, &ref_loss);
    CHECK_OK(em_dist_load(&r, &b, path, NULL));
    if (r) {
        train_dist(r, &c, 3, STEPS - 3);
        double e = compare(r, ref, 1);
        if (g_rank == 0) printf("  resharded table -> mixed with column-wise at step 3: max rel err %.2e vs one process\n", e);
        CHECK(e < 2e-4);
    }
    em_dist_free(r);
    em_dlrm_free(ref);
    /* a model of another shape is refused, by every rank */
    em_dlrm_cfg c2 = c;
    c2.rows[1] = 8;
    em_dist_cfg b2 = placement(&c2, "table");
    em_dist *x = NULL;
    CHECK(em_dist_load(&x, &b2, path, NULL) == EM_ERR_INVALID && !x);
    MPI_Barrier(MPI_COMM_WORLD);
    if (g_rank == 0) unlink(path);
}

/* The planner's placement trains like any other. */
static void test_planner_placement(void) {
    em_dlrm_cfg c = small_cfg(EM_OPT_ROWWISE_ADAGRAD, EM_OPT_ADAGRAD, EM_POOL_SUM);
    em_dist_cfg dc;
    memset(&dc, 0, sizeof dc);
    dc.model = c;
    em_plan *p = NULL;
    CHECK_OK(em_dist_plan(&dc, g_world, G / g_world, &p));
    for (int t = 0; t < T; t++) CHECK(dc.type[t] == EM_SHARD_TABLE || dc.type[t] == EM_SHARD_ROW || dc.type[t] == EM_SHARD_DATA);
    em_plan_free(p);
    double ref_loss;
    em_dlrm *ref = train_ref(&c, STEPS, &ref_loss);
    em_dist *d;
    CHECK_OK(em_dist_create(&d, &dc, NULL));
    train_dist(d, &c, 0, STEPS);
    CHECK(compare(d, ref, 1) < 2e-4);
    em_dist_free(d);
    em_dlrm_free(ref);
}

/* Bytes per step: all table-wise, fp32, every id's 8 bytes; per example and table
 * D floats out and D floats back, except what stays on the rank. */
static void test_bytes(void) {
    em_dlrm_cfg c = small_cfg(EM_OPT_SGD, EM_OPT_SGD, EM_POOL_SUM);
    em_dist_cfg dc = placement(&c, "table");
    em_dist *d;
    CHECK_OK(em_dist_create(&d, &dc, NULL));
    gbatch *g = malloc(sizeof *g);
    make_global(g, &c, 0);
    lbatch l;
    slice(&l, g, 0, g_rank, g_world);
    CHECK_OK(em_dist_train_step(d, &l.b, NULL, NULL));
    em_dist_bytes by;
    em_dist_last_bytes(d, &by);
    double want_ids = 0, want_vec = 0, want_grads = 0;
    for (int t = 0; t < T; t++) {
        if (dc.owner[t] != g_rank) { /* what stays on the rank is not counted */
            want_ids += 8.0 * (double)(l.b.B + l.off[(size_t)(t + 1) * l.b.B] - l.off[(size_t)t * l.b.B]);
            want_grads += 4.0 * D * l.b.B;
        } else {
            want_vec += 4.0 * D * (G - l.b.B); /* D floats for every other rank's example */
        }
    }
    CHECK_NEAR(by.ids, want_ids, 0.5);
    CHECK_NEAR(by.pooled, want_vec, 0.5);
    CHECK_NEAR(by.grads, want_grads, 0.5);
    size_t n;
    em_dlrm_dense_block(em_dist_dense(d), 1, &n);
    if (g_world > 1) CHECK(by.allreduce > 0 && by.allreduce <= 2.0 * 4.0 * (double)n);
    CHECK(by.dp == 0 && by.sync == 0);
    CHECK_NEAR(by.total, by.ids + by.pooled + by.grads + by.allreduce, 0.5);
    em_dist_free(d);
    /* row-wise: a block carries only the bags with an id in it (at most 3 ids a bag
     * here), smaller than the dense partial sums it would otherwise be */
    dc = placement(&c, "row");
    CHECK_OK(em_dist_create(&d, &dc, NULL));
    CHECK_OK(em_dist_train_step(d, &l.b, NULL, NULL));
    em_dist_last_bytes(d, &by);
    const double dense = 4.0 * D * T * (double)(G - l.b.B); /* every other rank's examples, every table */
    if (g_world > 1) CHECK(by.pooled > 0 && by.pooled < dense);
    if (g_rank == 0) printf("  row-wise pooled bytes %.0f (dense partial sums: %.0f)\n", by.pooled, dense);
    lfree(&l);
    free(g);
    em_dist_free(d);
}

/* 2D sparse parallelism: M = 2 replica groups of G = N / 2 ranks. Each group trains
 * on half of the global batch. With SGD and averaging every step, the replicas'
 * average is exactly the global step: equal to one process within float rounding. */
static void test_2d_sgd_equivalence(void) {
    em_dlrm_cfg c = small_cfg(EM_OPT_SGD, EM_OPT_SGD, EM_POOL_SUM);
    double ref_loss;
    em_dlrm *ref = train_ref(&c, STEPS, &ref_loss);
    const char *kinds[] = {"table", "row", "mixed"};
    for (int k = 0; k < 3; k++) {
        em_dist_cfg dc = placement(&c, kinds[k]);
        dc.group = g_world / 2, dc.sync_every = 1;
        for (int t = 0; t < T; t++) dc.owner[t] = t % dc.group;
        em_dist *d;
        CHECK_OK(em_dist_create(&d, &dc, NULL));
        if (!d) continue;
        double loss = train_dist(d, &c, 0, STEPS);
        em_dist_bytes by;
        em_dist_last_bytes(d, &by);
        CHECK(by.sync > 0);
        double e = compare(d, ref, 0);
        if (g_rank == 0) printf("  2D %s (2 groups of %d, sync every step) sgd: max rel err %.2e, loss %.6f vs %.6f\n", kinds[k],
                                dc.group, e, loss, ref_loss);
        CHECK(e < 2e-4);
        CHECK_NEAR(loss, ref_loss, 1e-4 * STEPS);
        em_dist_free(d);
    }
    em_dlrm_free(ref);
}

/* Logits of a fixed batch computed by this rank's group; the same on the replica
 * partner (rank +- G) iff the two replicas hold the same tables. */
static int replicas_agree(em_dist *d, const em_dlrm_cfg *c, int gs) {
    gbatch *g = malloc(sizeof *g);
    make_global(g, c, 99);
    lbatch l;
    slice(&l, g, 0, g_rank % gs, gs); /* the same slice on both replicas */
    float *lg = malloc(sizeof(float) * (size_t)(l.b.B + 1)), *other = malloc(sizeof(float) * (size_t)(l.b.B + 1));
    CHECK_OK(em_dist_forward(d, &l.b, lg, NULL));
    const int partner = g_rank < gs ? g_rank + gs : g_rank - gs;
    MPI_Sendrecv(lg, l.b.B, MPI_FLOAT, partner, 7, other, l.b.B, MPI_FLOAT, partner, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    int same = memcmp(lg, other, sizeof(float) * (size_t)l.b.B) == 0, all = 0;
    MPI_Allreduce(&same, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    free(lg), free(other), lfree(&l), free(g);
    return all;
}

/* Momentum-scaled row-wise AdaGrad, averaged every 2 steps: replicas differ between
 * syncs and agree bitwise right after one; two runs are bitwise equal; the checkpoint
 * written after em_dist_sync loads in one process. */
static void test_2d_rowwise_sync(void) {
    em_dlrm_cfg c = small_cfg(EM_OPT_ROWWISE_ADAGRAD, EM_OPT_ADAGRAD, EM_POOL_SUM);
    em_dist_cfg dc = placement(&c, "mixed");
    dc.group = g_world / 2, dc.sync_every = 2;
    for (int t = 0; t < T; t++) dc.owner[t] = t % dc.group;
    em_dist *a, *b;
    CHECK_OK(em_dist_create(&a, &dc, NULL));
    CHECK_OK(em_dist_create(&b, &dc, NULL));
    if (!a || !b) return;
    train_dist(a, &c, 0, 3); /* step 3: not averaged since step 2 */
    CHECK(!replicas_agree(a, &c, dc.group));
    train_dist(a, &c, 3, 1); /* step 4: averaged */
    CHECK(replicas_agree(a, &c, dc.group));
    train_dist(b, &c, 0, 4);
    size_t n;
    const float *pa = em_dlrm_dense_block(em_dist_dense(a), 0, &n), *pb = em_dlrm_dense_block(em_dist_dense(b), 0, &n);
    CHECK(memcmp(pa, pb, n * sizeof(float)) == 0);
    float *wa = malloc(1000 * D * 4), *wb = malloc(1000 * D * 4);
    for (int t = 0; t < T; t++) {
        CHECK_OK(em_dist_gather_table(a, t, wa, NULL));
        CHECK_OK(em_dist_gather_table(b, t, wb, NULL));
        CHECK(memcmp(wa, wb, (size_t)c.rows[t] * D * 4) == 0);
    }
    /* momentum-scaled row-wise AdaGrad is another optimizer than one process's (its
     * accumulator is divided by M): its quality is measured in bench/distributed.sh */
    double l5 = train_dist(a, &c, 4, 1);
    CHECK(isfinite(l5) && l5 > 0);
    CHECK(!replicas_agree(a, &c, dc.group)); /* step 5 */
    CHECK_OK(em_dist_sync(a));
    CHECK(replicas_agree(a, &c, dc.group));
    free(wa), free(wb);
    em_dist_free(a), em_dist_free(b);
    /* a group size that does not divide the world is refused */
    if (g_world == 4) {
        dc.group = 3;
        em_dist *x = NULL;
        CHECK(em_dist_create(&x, &dc, NULL) == EM_ERR_INVALID && !x);
    }
}

/* The dense all-reduce in buckets of layers, posted during the dense backward: the
 * same bits as one all-reduce after it, whatever the buckets (every element is summed
 * in rank order); a rank without examples (step 3) posts its buckets all at once. */
static void test_buckets(void) {
    em_dlrm_cfg c = small_cfg(EM_OPT_ROWWISE_ADAGRAD, EM_OPT_ADAM, EM_POOL_SUM);
    c.n_bot = 4, c.bot[1] = 64, c.bot[2] = 32, c.bot[3] = D; /* layers of 320, 2080, 264, 1536, 65 floats */
    c.top[1] = 64;
    const int kb[3] = {-1, 0, 1}, want[3] = {1, 1, 4};
    float *p0 = NULL, *w0[T] = {0};
    size_t n = 0;
    for (int i = 0; i < 3; i++) {
        em_dist_cfg dc = placement(&c, "mixed");
        dc.bucket_kb = kb[i];
        em_dist *d;
        CHECK_OK(em_dist_create(&d, &dc, NULL));
        CHECK(em_dist_buckets(d) == want[i]);
        train_dist(d, &c, 0, STEPS);
        const float *p = em_dlrm_dense_block(em_dist_dense(d), 0, &n);
        if (!p0) {
            p0 = malloc(n * sizeof(float));
            memcpy(p0, p, n * sizeof(float));
        } else {
            CHECK(memcmp(p0, p, n * sizeof(float)) == 0);
        }
        for (int t = 0; t < T; t++) {
            const size_t rows = (size_t)c.rows[t];
            float *w = malloc(rows * D * sizeof(float));
            CHECK_OK(em_dist_gather_table(d, t, w, NULL));
            if (!w0[t]) {
                w0[t] = w;
            } else {
                CHECK(memcmp(w0[t], w, rows * D * sizeof(float)) == 0);
                free(w);
            }
        }
        double tb = -1, tw = -1;
        em_dist_last_times(d, &tb, &tw);
        CHECK(tb >= 0 && tw >= 0);
        em_dist_free(d);
    }
    /* and the same model as one process within float tolerance */
    double ref_loss;
    em_dlrm *ref = train_ref(&c, STEPS, &ref_loss);
    size_t nr;
    CHECK(rel_err_f(p0, em_dlrm_dense_block(ref, 0, &nr), n, 1e-3) < 2e-4 && nr == n);
    em_dlrm_free(ref);
    free(p0);
    for (int t = 0; t < T; t++) free(w0[t]);
}

/* Wide tables (D = 512): the planner cuts them into column-wise pieces of 128 and
 * places each piece; training on that placement (row-wise AdaGrad across the pieces)
 * equals one process. */
static void test_planner_columns(void) {
    em_dlrm_cfg c = small_cfg(EM_OPT_ROWWISE_ADAGRAD, EM_OPT_ADAGRAD, EM_POOL_SUM);
    const int WD = 512;
    c.dim = WD, c.bot[2] = WD, c.top[0] = WD + T * (T + 1) / 2;
    em_dist_cfg dc;
    memset(&dc, 0, sizeof dc);
    dc.model = c;
    em_plan *p = NULL;
    CHECK_OK(em_dist_plan(&dc, g_world, G / g_world, &p));
    em_plan_free(p);
    int ncol = 0;
    for (int t = 0; t < T; t++) ncol += dc.type[t] == EM_SHARD_COLUMN;
    CHECK(ncol > 0 && dc.pieces_given && dc.col_width == 128);
    double ref_loss;
    em_dlrm *ref = train_ref(&c, 3, &ref_loss);
    em_dist *d;
    CHECK_OK(em_dist_create(&d, &dc, NULL));
    if (!d) {
        em_dlrm_free(ref);
        return;
    }
    double loss = train_dist(d, &c, 0, 3);
    size_t n, nr;
    double e = rel_err_f(em_dlrm_dense_block(em_dist_dense(d), 0, &n), em_dlrm_dense_block(ref, 0, &nr), n, 1e-3);
    for (int t = 0; t < T; t++) {
        const size_t rows = (size_t)c.rows[t];
        float *w = malloc(rows * WD * sizeof(float)), *st = malloc(rows * sizeof(float));
        char name[32];
        snprintf(name, sizeof name, "emb.%d.weight", t);
        CHECK_OK(em_dist_gather_table(d, t, w, st));
        double et = rel_err_f(w, em_dlrm_param(ref, name, 0, NULL), rows * WD, 1e-3);
        size_t sc = 0;
        const float *sr = em_embbag_state(em_dlrm_embbag(ref), t, &sc);
        double es = rel_err_f(st, sr, sc, 1e-3);
        if (et > e) e = et;
        if (es > e) e = es;
        free(w), free(st);
    }
    if (g_rank == 0) printf("  planner, D = %d: %d tables column-wise, max rel err %.2e\n", WD, ncol, e);
    CHECK(n == nr && e < 2e-4);
    CHECK_NEAR(loss, ref_loss, 1e-4 * 3);
    em_dist_free(d);
    em_dlrm_free(ref);
}

/* Allocation failures on one rank at every point of a step: every rank returns an error
 * for that step (or every rank succeeds), none is left waiting in a collective (a hang
 * here is the failure: CTest's timeout). */
static void test_alloc_failure_agreed(void) {
    em_dlrm_cfg c = small_cfg(EM_OPT_ROWWISE_ADAGRAD, EM_OPT_ADAGRAD, EM_POOL_SUM);
    const int victim = g_world - 1;
    int failed_some = 0;
    for (int k = 0; k < 40; k++) {
        em_dist_cfg dc = placement(&c, "mixedc");
        if (g_world == 4 && k % 2) { /* 2D: the replica averaging too */
            dc.group = 2, dc.sync_every = 1;
            for (int t = 0; t < T; t++) dc.owner[t] %= 2;
        }
        em_dist *d;
        CHECK_OK(em_dist_create(&d, &dc, NULL));
        if (!d) return;
        gbatch *g = malloc(sizeof *g);
        em_status st = EM_OK;
        for (int s = 0; s < 2 && !st; s++) {
            make_global(g, &c, s);
            lbatch l;
            slice(&l, g, s, g_rank, g_world);
            if (g_rank == victim && s == (k % 4 == 3)) em_mem_fail_after(k / 2); /* the first step grows every buffer */
            double loss;
            st = em_dist_train_step(d, &l.b, &loss, NULL);
            em_mem_fail_after(-1);
            lfree(&l);
        }
        int mine = st != EM_OK, all = 0, any = 0;
        MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
        MPI_Allreduce(&mine, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
        CHECK(all == any); /* everyone failed or no one did */
        failed_some += any;
        free(g);
        em_dist_free(d);
    }
    CHECK(failed_some > 0);
}

int main(int argc, char **argv) {
    if (em_dist_init(&argc, &argv)) {
        fprintf(stderr, "MPI init failed\n");
        return 1;
    }
    g_rank = em_dist_rank(), g_world = em_dist_world();
    if (g_rank == 0) printf("%d ranks\n", g_world);
    static const t_case cases[] = {{"equivalence_rowwise_adagrad", test_equivalence_rowwise_adagrad},
                                   {"equivalence_sgd_mean", test_equivalence_sgd_mean},
                                   {"equivalence_adagrad_adam", test_equivalence_adagrad_adam},
                                   {"deterministic", test_deterministic},
                                   {"reduced_precision", test_reduced_precision},
                                   {"checkpoint_reshard", test_checkpoint_reshard},
                                   {"planner_placement", test_planner_placement},
                                   {"planner_columns", test_planner_columns},
                                   {"bytes", test_bytes},
                                   {"2d_sgd_equivalence", test_2d_sgd_equivalence},
                                   {"2d_rowwise_sync", test_2d_rowwise_sync},
                                   {"buckets", test_buckets},
                                   {"alloc_failure_agreed", test_alloc_failure_agreed}};
    int rc = t_run(cases, (int)(sizeof cases / sizeof cases[0]), argc, argv);
    int worst = 0;
    MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    em_dist_finalize();
    return worst;
}
