/*
 * cmd_train_dist.c - `mpirun -np N ember train ...`: the same options as one process
 * (cmd_train.c parses them), trained by em_dist_train_run (src/dist/dtrainer.c).
 * --batch is per rank; --train is required (ranks must not generate data side by side).
 * Rank 0 prints the summary and writes report.json beside the checkpoint; the other
 * ranks print nothing unless they fail.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "ember/dist.h"

static void on_event(void *ud, const em_train_event *ev) {
    const int *quiet = ud;
    if (ev->kind == EM_EV_PROGRESS && !*quiet)
        fprintf(stderr, "step %lld  epoch %d  %llu examples  loss %.5f  %.0f examples/s\n", (long long)ev->step, ev->epoch,
                (unsigned long long)ev->examples, ev->train_loss, ev->examples_per_s);
    else if (ev->kind == EM_EV_EVAL)
        fprintf(stderr, "step %lld  test AUC %.4f  NE %.4f\n", (long long)ev->step, ev->metrics.auc, ev->metrics.ne);
}

static void print_m(const char *label, const em_metrics *m) {
    printf("%-8s AUC %.4f  logloss %.5f  NE %.4f  calibration %.4f  accuracy %.4f  (%zu examples)\n", label, m->auc,
           m->logloss, m->ne, m->calibration, m->accuracy, (size_t)m->n);
}

int cli_train_dist(em_train_cfg *tc, int threads, const cli_dist_args *a, const char *test_prob, int quiet) {
    const char *sharding = a->sharding, *comm_prec = a->comm_prec;
    const int group = a->group, sync_every = a->sync_every;
    em_dist_opts o;
    memset(&o, 0, sizeof o);
    o.sharding = EM_SHARD_AUTO;
    if (sharding && strcmp(sharding, "auto") != 0) {
        o.sharding = strcmp(sharding, "table") == 0 ? EM_SHARD_TABLE
                     : strcmp(sharding, "row") == 0 ? EM_SHARD_ROW
                     : strcmp(sharding, "data") == 0 ? EM_SHARD_DATA
                     : strcmp(sharding, "column") == 0 ? EM_SHARD_COLUMN
                                                      : (em_shard_type)-1;
        if ((int)o.sharding < 0) {
            fprintf(stderr, "ember train: --sharding '%s': use auto, table, row, column or data\n", sharding);
            return 2;
        }
    }
    int p = comm_prec ? em_comm_prec_parse(comm_prec) : EM_COMM_FP32;
    if (p < 0) {
        fprintf(stderr, "ember train: --comm-prec '%s': use fp32, fp16 or bf16\n", comm_prec);
        return 2;
    }
    o.prec = (em_comm_prec)p;
    o.group = group, o.sync_every = sync_every > 0 ? sync_every : 1;
    o.bucket_kb = a->bucket_kb > 0 ? a->bucket_kb : -1;
    if (!tc->train_path) {
        fprintf(stderr, "ember train: under mpirun --train is required (generate the data first with ember gen)\n");
        return 2;
    }
    em_status st = em_dist_init(NULL, NULL);
    if (st) {
        cli_fail("train", st);
        return 1;
    }
    const int rank = em_dist_rank(), world = em_dist_world();
    em_pool *pool = NULL;
    if ((st = em_pool_create(&pool, threads))) {
        cli_fail("train", st);
        em_dist_finalize();
        return 1;
    }
    tc->on_event = on_event;
    tc->ud = &quiet;
    if (rank == 0)
        fprintf(stderr, "distributed training on %d ranks x %d threads: %s, batch %d per rank (%d global), %s all-to-all%s\n",
                world, threads, tc->train_path, tc->batch, tc->batch * world, em_comm_prec_name(o.prec),
                group > 0 && group < world ? ", 2D: replica groups" : "");
    if (rank == 0 && group > 0 && group < world)
        fprintf(stderr, "2D sparse parallelism: %d replica groups of %d ranks, tables averaged every %d steps\n", world / group,
                group, o.sync_every);
    em_train_result res;
    float *y = NULL;
    size_t ny = 0;
    st = em_dist_train_run(tc, &o, pool, &res, &y, &ny);
    if (st) {
        fprintf(stderr, "rank %d: ", rank);
        cli_fail("train", st);
        em_free(y);
        em_free(o.rank_bytes), em_free(o.rank_times), em_free(o.plan_send), em_free(o.plan_recv);
        em_pool_free(pool);
        em_dist_finalize();
        return 1;
    }
    if (rank == 0) {
        int nt = o.place.model.num_tables, cnt[5] = {0};
        for (int t = 0; t < nt; t++) cnt[o.place.type[t]]++;
        printf("placement: %d table-wise, %d row-wise, %d column-wise, %d data-parallel (%s)\n", cnt[EM_SHARD_TABLE],
               cnt[EM_SHARD_ROW], cnt[EM_SHARD_COLUMN], cnt[EM_SHARD_DATA], o.sharding == EM_SHARD_AUTO ? "planner" : "--sharding");
        printf("trained %lld steps, %llu examples in %.1f s (%.0f examples/s), %.0f bytes sent per step by rank 0\n",
               (long long)res.steps, (unsigned long long)res.examples, res.train_s, res.examples_per_s, o.mean_bytes.total);
        em_metrics opt;
        int have_opt = 0;
        if (tc->test_path) {
            print_m("test", &res.test);
            if (test_prob) {
                float *tp = NULL;
                size_t ntp = 0;
                if (em_read_probs(test_prob, &tp, &ntp) == EM_OK && ntp >= ny && em_metrics_compute(tp, y, ny, &opt) == EM_OK) {
                    have_opt = 1;
                    print_m("optimum", &opt);
                    printf("gap      AUC %+.4f  NE %+.4f  (model - planted optimum)\n", res.test.auc - opt.auc, res.test.ne - opt.ne);
                }
                em_free(tp);
            }
        }
        if (tc->out_dir) {
            char path[1200];
            snprintf(path, sizeof path, "%s/report.json", tc->out_dir);
            FILE *f = fopen(path, "w");
            if (f) {
                char mt[512] = "null", mo[512] = "null";
                if (tc->test_path) em_metrics_json(&res.test, mt, sizeof mt);
                if (have_opt) em_metrics_json(&opt, mo, sizeof mo);
                fprintf(f, "{\"world\":%d,\"group\":%d,\"threads\":%d,\"batch_per_rank\":%d,\"comm_prec\":\"%s\",\"steps\":%lld,"
                           "\"examples\":%llu,\"train_s\":%.3f,\"examples_per_s\":%.1f,\"test\":%s,\"optimum\":%s,"
                           "\"checkpoint\":\"%s\",\"placement\":[",
                        world, group > 0 ? group : world, threads, tc->batch, em_comm_prec_name(o.prec), (long long)res.steps,
                        (unsigned long long)res.examples, res.train_s, res.examples_per_s, mt, mo, res.checkpoint);
                const char *tn[] = {"auto", "table", "row", "column", "data"};
                for (int t = 0; t < nt; t++)
                    fprintf(f, "%s{\"type\":\"%s\",\"owner\":%d}", t ? "," : "", tn[o.place.type[t]],
                            o.place.type[t] == EM_SHARD_TABLE ? o.place.owner[t] : -1);
                fprintf(f, "],\"bytes_per_step\":[");
                for (int q = 0; q < world && o.rank_bytes; q++) {
                    const em_dist_bytes *b = &o.rank_bytes[q];
                    fprintf(f, "%s{\"ids\":%.0f,\"pooled\":%.0f,\"grads\":%.0f,\"dp\":%.0f,\"allreduce\":%.0f,\"sync\":%.0f,"
                               "\"total\":%.0f}", q ? "," : "", b->ids, b->pooled, b->grads, b->dp, b->allreduce, b->sync, b->total);
                }
                fprintf(f, "],\"allreduce_buckets\":%d,\"bucket_kb\":%d,\"seconds_per_step\":[", o.buckets, a->bucket_kb);
                for (int q = 0; q < world && o.rank_times; q++)
                    fprintf(f, "%s{\"dense_backward\":%.6f,\"allreduce_wait\":%.6f}", q ? "," : "", o.rank_times[2 * q],
                            o.rank_times[2 * q + 1]);
                fprintf(f, "]");
                if (o.plan_send && o.plan_recv) {
                    const int g = group > 0 ? group : world;
                    fprintf(f, ",\"planner\":{\"allreduce_payload\":%.0f,\"send\":[", o.plan_allreduce);
                    for (int q = 0; q < g; q++) fprintf(f, "%s%.0f", q ? "," : "", o.plan_send[q]);
                    fprintf(f, "],\"recv\":[");
                    for (int q = 0; q < g; q++) fprintf(f, "%s%.0f", q ? "," : "", o.plan_recv[q]);
                    fprintf(f, "]}");
                }
                fprintf(f, "}\n");
                fclose(f);
                printf("checkpoint: %s\nreport:     %s\n", res.checkpoint, path);
            }
        }
    }
    em_free(y);
    em_free(o.rank_bytes), em_free(o.rank_times), em_free(o.plan_send), em_free(o.plan_recv);
    em_pool_free(pool);
    em_dist_finalize();
    return 0;
}
