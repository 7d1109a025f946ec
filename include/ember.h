/*
 * ember.h - the public API of libember, a C engine that trains, evaluates and serves
 * deep-learning recommendation models (DLRM) on CPUs.
 *
 * Layers, bottom up (each uses only those beneath it; see docs/ARCHITECTURE.md):
 *   core        status codes, counting allocator, thread pool, RNG, safetensors I/O
 *   nn          linear, ReLU, sigmoid, DLRM dot interaction, BCE with logits;
 *               jagged ops, Jagged Flash Attention, Kunlun's GDPA, sliding-window
 *               attention and hierarchical seed pooling for variable-length sequences
 *   optim       SGD, AdaGrad, Adam, AdamW on flat parameter blocks
 *   sparse      table-batched embedding bags with the optimizer fused into backward;
 *               dynamic collisionless tables (64-bit ids, admission, eviction);
 *               FIITED tables (per-row pruned dimensions on a shrinking chunk pool);
 *               fp16 / int8 row-quantized tables for inference
 *   data        Criteo TSV / binary readers with prefetch, the synthetic generator,
 *               the teacher-prediction log (ExFM's data augmentation store) and its join
 *   model       the DLRM (bottom MLP, embeddings, interaction, top MLP) and its
 *               sequence tower (history -> attention blocks -> target attention)
 *   train       trainer loop, metrics, checkpoints
 *   serve       HTTP inference server with dynamic batching (libmicrohttpd)
 *   dist        the sharding planner (cost model, greedy / Karmarkar-Karp placement)
 *
 * A minimal training loop:
 *
 *   em_pool *pool;  em_pool_create(&pool, 2);
 *   em_dlrm_cfg mc = em_dlrm_kaggle();            // D=16, 13-512-256-64-16, 367-512-256-1
 *   em_dlrm *m;      em_dlrm_create(&m, &mc);
 *   em_reader *r;    em_reader_open(&r, &(em_reader_cfg){.path = "train.tsv", ...});
 *   const em_batch *b;
 *   while (em_reader_next(r, &b) == EM_OK) {
 *       double loss;
 *       em_dlrm_train_step(m, b, &loss, pool);
 *   }
 *
 * Every fallible call returns em_status; em_last_error() has the details.
 */
#ifndef EMBER_H
#define EMBER_H

#include "ember/core.h"
#include "ember/safetensors.h"
#include "ember/nn.h"
#include "ember/optim.h"
#include "ember/embbag.h"
#include "ember/dyntable.h"
#include "ember/fiited.h"
#include "ember/quant.h"
#include "ember/jagged.h"
#include "ember/jattn.h"
#include "ember/kunlun.h"
#include "ember/hsp.h"
#include "ember/attn_padded.h"
#include "ember/data.h"
#include "ember/das.h"
#include "ember/metrics.h"
#include "ember/seqtower.h"
#include "ember/dlrm.h"
#include "ember/student.h"
#include "ember/train.h"
#include "ember/stream.h"
#include "ember/serve.h"
#include "ember/plan.h"

#endif
