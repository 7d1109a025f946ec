/*
 * ember/plan.h - the sharding planner: where each embedding table (or piece of one)
 * lives in a distributed run, and what a training step is predicted to cost.
 *
 * Inputs are table specs (rows, dim, pooling factor, access skew, bytes per element,
 * optimizer state per row), the world size N and the group size G (2D sparse
 * parallelism: M = N/G replica groups; G = N is plain fully sharded 1D), and a stated,
 * configurable hardware model. The planner
 *   1. picks a sharding type per table by rules (data-parallel for tiny tables,
 *      column-wise for wide ones, row-wise for tables bigger than a rank's share of
 *      memory or of lookup work, table-wise otherwise) unless the spec forces one;
 *   2. cuts tables into shards and places the movable ones (table-wise tables and
 *      column-wise pieces) on the G ranks of a group with greedy LPT or
 *      Karmarkar-Karp largest differencing, under the per-rank memory capacity;
 *   3. predicts per rank: lookup bytes/time, all-to-all bytes/time, memory; and per
 *      step: embedding time (slowest rank), dense compute, dense all-reduce, the 2D
 *      replica sync amortised over k steps.
 * Every formula is written out in docs/PLANNER.md. Pure arithmetic: deterministic,
 * no threads, no I/O except em_plan_load_tables().
 *
 *   em_table_spec *t; int n;
 *   em_plan_cfg cfg = em_plan_cfg_default(64, 8);
 *   em_plan_preset("large", &t, &n, &cfg);
 *   em_plan *p;  em_plan_create(&p, t, n, &cfg);
 *   ... p->ranks[r].mem_bytes, p->t_step ...
 *   em_plan_free(p);  em_free(t);
 */
#ifndef EMBER_PLAN_H
#define EMBER_PLAN_H

#include <stdint.h>

#include "ember/core.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    EM_SHARD_AUTO = 0, /* let the rules decide (specs only; never in a plan) */
    EM_SHARD_TABLE,    /* the whole table on one rank */
    EM_SHARD_ROW,      /* rows split evenly over all G ranks of the group, ids hashed */
    EM_SHARD_COLUMN,   /* dim split into pieces of cw_width columns, each placed as a unit */
    EM_SHARD_DATA,     /* replicated on every rank; gradients all-reduced every step */
} em_shard_type;

typedef enum { EM_PLAN_GREEDY = 0, EM_PLAN_KK } em_plan_algo;

const char *em_shard_name(em_shard_type t); /* "auto", "table", "row", "column", "data" */

typedef struct {
    char name[64];
    int64_t rows;
    int dim;
    double pooling;    /* mean ids per bag (one bag per example) */
    double zipf;       /* access skew: P(row of popularity rank i) ~ i^-zipf; 0 = uniform */
    int elem_bytes;    /* bytes per weight element (4 fp32, 2 fp16/bf16) */
    int opt_bytes;     /* optimizer state bytes per row (4: row-wise AdaGrad; 0: SGD) */
    em_shard_type shard; /* forced sharding type, or EM_SHARD_AUTO */
} em_table_spec;

/* The hardware model. All bandwidths are per rank, bytes/s; latencies seconds per message. */
typedef struct {
    double mem_bw;        /* embedding gathers and row updates (DRAM or HBM, effective) */
    double intra_bw;      /* link between ranks of one node */
    double inter_bw;      /* network, per rank */
    double intra_lat, inter_lat;
    int ranks_per_node;
    double flops;         /* dense compute rate, flop/s */
    double mem_capacity;  /* bytes per rank */
} em_hw_model;

typedef struct {
    int world, group;     /* N and G; G divides N (G = N: 1D) */
    int batch;            /* examples per rank per step */
    int comm_bytes;       /* bytes per element of all-to-all payloads (4 = fp32) */
    int sync_every;       /* k: 2D replica sync period in steps */
    double dense_params;  /* parameters of the dense (MLP) part, data-parallel */
    double dense_flops;   /* forward flops per example of the dense part (backward = 2x) */
    double dense_state_bytes; /* bytes per dense parameter held per rank (weights+grad+opt) */
    em_plan_algo algo;
    em_hw_model hw;
    /* sharding rules (EM_SHARD_AUTO tables) */
    double dp_max_bytes;  /* table bytes <= this: data-parallel */
    int cw_min_dim;       /* dim >= this (and > cw_width): column-wise */
    int cw_width;         /* columns per column-wise shard */
    double rw_share;      /* bytes or lookup cost > rw_share x per-rank mean: row-wise */
} em_plan_cfg;

/* Defaults: the hardware model and rules of docs/PLANNER.md, batch 512, fp32 comm, k = 20. */
em_hw_model em_hw_default(void);
em_plan_cfg em_plan_cfg_default(int world, int group);

/* One piece of one table. Row-wise tables have G shards (part = rank); data-parallel
 * tables one shard with rank = -1 (it lives everywhere). */
typedef struct {
    int table;
    em_shard_type type;
    int rank;             /* rank within the group (same in every replica group) */
    int part, nparts;
    int64_t rows;         /* rows held */
    int col0, cols;       /* columns held */
    double frac;          /* share of the table's ids this shard serves */
    double lookup_bytes;  /* per step: gathers + row updates */
    double send_bytes;    /* per step, one direction of the all-to-all, leaving the rank */
    double mem_bytes;     /* weights + optimizer state */
    double sync_bytes;    /* 2D: rows touched in k steps by all groups, bytes to all-reduce */
    double cost;          /* seconds: lookup + forward and backward send, the placement weight */
} em_shard;

typedef struct {
    double lookup_bytes, send_bytes, recv_bytes, mem_bytes, sync_bytes;
    double lookup_s, comm_s; /* comm_s: forward + backward all-to-all incl. latency */
    double load;             /* sum of placed shard costs (what placement balances) */
} em_rank_load;

typedef struct {
    int ntables, nshards, world, group, replicas;
    em_shard *shards;     /* grouped by table, in table order */
    em_shard_type *type;  /* [ntables] the type chosen per table */
    em_rank_load *ranks;  /* [group] one replica group (all groups are identical) */
    int fallback;         /* bit 1: KK's partition broke a memory cap, greedy was used;
                             bit 2: greedy by cost found no room, greedy by memory was used */
    double imbalance;     /* max / mean of per-rank lookup_s + comm_s */
    double mem_max, mem_mean;
    /* per step, seconds */
    double t_emb;         /* slowest rank's lookups + all-to-all */
    double t_dense;       /* dense forward + backward compute */
    double t_allreduce;   /* dense + data-parallel table gradients over all N ranks */
    double t_sync;        /* 2D replica sync (incl. optimizer state) / k; 0 when M = 1 */
    double t_step;        /* sum of the above (no overlap assumed) */
    double allreduce_bytes;
} em_plan;

/* Shard, place and cost `tables` for cfg. EM_ERR_INVALID (naming the table) when a
 * table or shard fits on no rank, or the config is inconsistent. */
em_status em_plan_create(em_plan **out, const em_table_spec *tables, int ntables, const em_plan_cfg *cfg);
void em_plan_free(em_plan *p);

/* Partition n items of cost[i] and mem[i] into nbins bins with mem_free[b] room each.
 * bin[i] receives the bin of item i. Greedy: items by cost descending (ties: lower
 * index) to the least-loaded bin with room (ties: lower bin). KK: largest differencing
 * generalised to nbins-tuples; if its result breaks a memory limit, greedy is used
 * (*fell_back |= 1). Greedy that strands an item reruns with items by memory
 * descending (*fell_back |= 2). EM_ERR_INVALID "item I ..." when no bin has room for
 * item I. fell_back may be NULL. */
em_status em_plan_partition(em_plan_algo algo, const double *cost, const double *mem, int n, int nbins,
                            const double *mem_free, int *bin, int *fell_back);

/* Read a JSON list of specs, or an object {"tables": [...]}. Fields: rows, dim
 * (required), name, pooling, zipf, bytes, opt_bytes, sharding. Errors name the file,
 * the table index and the field. *out is em_malloc'd. */
em_status em_plan_load_tables(const char *path, em_table_spec **out, int *n);

/* "kaggle" (Criteo Kaggle DLRM: 26 tables, D=16) or "large" (800 tables up to 1e9
 * rows, D=128, pooling 20-100); also sets cfg's dense part. *out is em_malloc'd. */
em_status em_plan_preset(const char *name, em_table_spec **out, int *n, em_plan_cfg *cfg);

/* Expected distinct rows among `draws` iid lookups from a Zipf(zipf) table of `rows`. */
double em_plan_unique_rows(int64_t rows, double zipf, double draws);

#ifdef __cplusplus
}
#endif
#endif
