/*
 * embstore_ops.c - embedding lookups + fused updates, dynamic table (em_dyn) vs the
 * dense table (em_embbag), on the same batches of a data file, outside the model (the
 * MLPs would hide the tables' cost), and a dynamic checkpoint round trip that must keep
 * every id.
 *
 *   embstore_ops DATA ROWS_CAP BATCH STEPS DIM MAX_BYTES_PER_TABLE THREADS CKPT
 *
 * The first STEPS batches of DATA are read twice into memory: ids reduced modulo
 * min(cardinality, ROWS_CAP) for the dense table (rows = the Kaggle cardinalities
 * capped), raw 64-bit for the dynamic one (row-wise AdaGrad both, age eviction under
 * MAX_BYTES_PER_TABLE). Each side then runs forward + backward_update over the batches
 * (a fixed pseudo-random dout), one warm-up pass and three timed passes; the figure is
 * the median pass. A pass over a dynamic table after the first keeps inserting: the
 * budget holds fewer rows than the stream has ids, so evicted ids come back as new.
 * The warm-up pass (untimed) also checks the budget of every dynamic table after every
 * forward (the peak of a step: the batch's new rows are in, nothing more is allocated
 * until the next forward) and after every backward: rows <= em_dyn_budget_rows and
 * bytes <= MAX_BYTES_PER_TABLE.
 * Output: one JSON line with ids/s of both, their ratio, the dynamic table's rows,
 * bytes and evictions, the largest table's bytes and rows at any checked moment, the
 * number of checks over budget, and the checkpoint check (save, load into a fresh table,
 * compare every id, row, count and state).
 * Build: cc -O2 -Iinclude bench/embstore_ops.c BUILD/libem_data.a BUILD/libem_sparse.a
 *        BUILD/libem_optim.a BUILD/libem_core.a -lopenblas -ljansson -lxxhash -lpthread -lm
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ember.h"

static const int64_t kaggle[26] = {1460, 583,  10131227, 2202608, 305, 24,    12517, 633, 3,  93145,  5683, 8351593, 3194,
                                   27,   14992, 5461306, 10,      5652, 2173, 4,     7046547, 18, 15, 286181, 105, 142572};

typedef struct {
    int B;
    int64_t *idx, *off;
} sbatch;

static int load(const char *path, int B, int steps, const int64_t *rows, sbatch *out) {
    em_reader_cfg rc = {.path = path, .batch_size = B, .num_dense = 13, .num_sparse = 26, .table_rows = rows, .prefetch = 2};
    em_reader *r = NULL;
    if (em_reader_open(&r, &rc)) return -1;
    const em_batch *b;
    int n = 0;
    while (n < steps && em_reader_next(r, &b) == EM_OK) {
        size_t nnz = (size_t)b->offsets[26 * b->B];
        out[n].B = b->B;
        out[n].idx = malloc((nnz + 1) * sizeof(int64_t));
        out[n].off = malloc(((size_t)26 * b->B + 1) * sizeof(int64_t));
        memcpy(out[n].idx, b->indices, nnz * sizeof(int64_t));
        memcpy(out[n].off, b->offsets, ((size_t)26 * b->B + 1) * sizeof(int64_t));
        n++;
    }
    em_reader_free(r);
    return n;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: embstore_ops DATA ROWS_CAP BATCH STEPS DIM MAX_BYTES_PER_TABLE THREADS CKPT\n");
        return 2;
    }
    const char *data = argv[1], *ckpt = argv[8];
    const int64_t cap = atoll(argv[2]);
    const int B = atoi(argv[3]), steps = atoi(argv[4]), D = atoi(argv[5]), nth = atoi(argv[7]);
    const size_t max_bytes = (size_t)atoll(argv[6]);
    int64_t rows[26], raw[26];
    for (int t = 0; t < 26; t++) rows[t] = kaggle[t] < cap ? kaggle[t] : cap, raw[t] = EM_ROWS_RAW;
    sbatch *bd = calloc((size_t)steps, sizeof *bd), *br = calloc((size_t)steps, sizeof *br);
    int n1 = load(data, B, steps, rows, bd), n2 = load(data, B, steps, raw, br);
    if (n1 < 1 || n1 != n2) {
        fprintf(stderr, "embstore_ops: cannot read %s\n", data);
        return 1;
    }
    em_pool *pool = NULL;
    em_pool_create(&pool, nth);
    em_optim_cfg opt = em_optim_default(EM_OPT_ROWWISE_ADAGRAD, 0.01f);
    em_embbag_cfg ec = {26, rows, D, EM_POOL_SUM, opt};
    em_embbag *e = NULL;
    em_dyn_cfg dc = em_dyn_default(26, D, opt);
    dc.max_bytes = max_bytes;
    dc.evict_slack = 0.05f;
    dc.seed = 1;
    em_dyn *d = NULL, *d2 = NULL;
    if (em_embbag_create(&e, &ec) || em_dyn_create(&d, &dc) || em_dyn_create(&d2, &dc)) {
        fprintf(stderr, "embstore_ops: %s\n", em_last_error());
        return 1;
    }
    em_embbag_init_uniform(e, 1, pool);
    float *out = malloc((size_t)B * 26 * (size_t)D * sizeof(float)), *dout = malloc((size_t)B * 26 * (size_t)D * sizeof(float));
    em_rng rng;
    em_rng_seed(&rng, 3);
    for (size_t i = 0; i < (size_t)B * 26 * (size_t)D; i++) dout[i] = (float)(em_rng_uniform(&rng) - 0.5) * 1e-3f;
    double ids = 0;
    for (int s = 0; s < n1; s++) ids += (double)bd[s].off[26 * bd[s].B];
    double td[4], tr[4];
    size_t peak_tab = 0;
    int64_t peak_rows = 0, checks_over = 0, checks = 0;
    for (int pass = 0; pass < 4; pass++) {
        double t0 = em_now();
        for (int s = 0; s < n1; s++)
            if (em_embbag_forward(e, out, bd[s].idx, bd[s].off, NULL, bd[s].B, pool) ||
                em_embbag_backward_update(e, dout, bd[s].idx, bd[s].off, NULL, NULL, bd[s].B, pool))
                return fprintf(stderr, "dense: %s\n", em_last_error()), 1;
        td[pass] = em_now() - t0;
        t0 = em_now();
        for (int s = 0; s < n1; s++) {
            const uint64_t *u = (const uint64_t *)br[s].idx;
            if (em_dyn_forward(d, out, u, br[s].off, br[s].B, EM_DYN_TRAIN, pool))
                return fprintf(stderr, "dynamic: %s\n", em_last_error()), 1;
            for (int k = 0; k < 2 && pass == 0; k++) { /* k = 0: the step's peak; 1: after it */
                if (k && em_dyn_backward_update(d, dout, u, br[s].off, br[s].B, pool))
                    return fprintf(stderr, "dynamic: %s\n", em_last_error()), 1;
                for (int t = 0; t < 26; t++) {
                    em_dyn_stats st = em_dyn_get_stats(d, t);
                    if (st.bytes > peak_tab) peak_tab = st.bytes;
                    if (st.rows > peak_rows) peak_rows = st.rows;
                    checks_over += st.rows > em_dyn_budget_rows(d) || st.bytes > max_bytes;
                    checks++;
                }
            }
            if (pass > 0 && em_dyn_backward_update(d, dout, u, br[s].off, br[s].B, pool))
                return fprintf(stderr, "dynamic: %s\n", em_last_error()), 1;
        }
        tr[pass] = em_now() - t0;
    }
    qsort(td + 1, 3, sizeof(double), cmp_d);
    qsort(tr + 1, 3, sizeof(double), cmp_d);
    const double dense_ips = ids / td[2], dyn_ips = ids / tr[2];
    /* the budget, per table, after every step: check the end state (the unit tests check each step) */
    em_dyn_stats all = em_dyn_get_stats(d, -1);
    size_t max_tab = 0;
    int64_t over = 0;
    for (int t = 0; t < 26; t++) {
        em_dyn_stats s = em_dyn_get_stats(d, t);
        if (s.bytes > max_tab) max_tab = s.bytes;
        over += s.rows > em_dyn_budget_rows(d);
    }
    /* checkpoint: every id, row, count and state back */
    int ckpt_ok = em_dyn_save(d, ckpt) == EM_OK && em_dyn_load(d2, ckpt) == EM_OK;
    int64_t checked = 0;
    for (int t = 0; t < 26 && ckpt_ok; t++) {
        int64_t n = em_dyn_ids(d, t, NULL, 0);
        uint64_t *v = malloc(((size_t)n + 1) * sizeof(uint64_t));
        em_dyn_ids(d, t, v, n);
        ckpt_ok = em_dyn_ids(d2, t, NULL, 0) == n;
        for (int64_t i = 0; i < n && ckpt_ok; i++, checked++) {
            em_dyn_row a, b;
            ckpt_ok = em_dyn_lookup(d, t, v[i], &a) && em_dyn_lookup(d2, t, v[i], &b) && a.count == b.count &&
                      a.last == b.last && !memcmp(a.w, b.w, (size_t)D * sizeof(float)) && a.state[0] == b.state[0];
        }
        free(v);
    }
    printf("{\"batches\":%d,\"batch\":%d,\"dim\":%d,\"threads\":%d,\"ids_per_pass\":%.0f,"
           "\"dense_ids_per_s\":%.0f,\"dynamic_ids_per_s\":%.0f,\"dynamic_over_dense\":%.4f,"
           "\"dense_pass_s\":%.4f,\"dynamic_pass_s\":%.4f,\"dynamic_rows\":%lld,\"dynamic_budget_rows_per_table\":%lld,"
           "\"dynamic_bytes\":%zu,\"dynamic_max_table_bytes\":%zu,\"budget_bytes_per_table\":%zu,\"tables_over_budget\":%lld,"
           "\"peak_table_bytes\":%zu,\"peak_table_rows\":%lld,\"budget_checks\":%lld,\"budget_checks_over\":%lld,"
           "\"inserts\":%llu,\"evictions\":%llu,\"ckpt_ids_checked\":%lld,\"ckpt_every_id_kept\":%s}\n",
           n1, B, D, nth, ids, dense_ips, dyn_ips, dyn_ips / dense_ips, td[2], tr[2], (long long)all.rows,
           (long long)em_dyn_budget_rows(d), all.bytes, max_tab, max_bytes, (long long)over, peak_tab,
           (long long)peak_rows, (long long)checks, (long long)checks_over, (unsigned long long)all.inserts, (unsigned long long)all.evictions, (long long)checked,
           ckpt_ok ? "true" : "false");
    remove(ckpt);
    return 0;
}
