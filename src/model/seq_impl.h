/*
 * seq_impl.h - internal to the sequence tower: seqcfg.c (configuration, block and
 * event-group specs, FLOPs formulas) and seqtower.c (compute). Not a public header.
 *
 * A "stack" is one block stack with its target attention: the whole tower without
 * event-level personalization, or one group's sub-tower with it.
 */
#ifndef EMBER_SEQ_IMPL_H
#define EMBER_SEQ_IMPL_H

#include "ember/seqtower.h"

typedef struct {
    int W, H;       /* width and heads */
    int proj;       /* W != D: input projection (W, D) and output projection (D, W) */
    int has_hsp, E; /* any hsp block; output vectors 1 (+ m2) */
    int n_blocks;
    const em_seq_block *blocks;
} em__seq_stack;

/* Stacks of a config: 1 without groups, else n_groups. */
int em__seq_n_stacks(const em_seq_cfg *c);
/* Stack g of the config (g = 0 is the whole tower without groups). */
em__seq_stack em__seq_stack_of(const em_seq_cfg *c, int D, int g);
/* Forward FLOPs of block k at width W over L events, of the target attention, and of a
 * whole stack over L events (its projections included). */
double em__seq_block_flops(const em_seq_cfg *c, const em_seq_block *k, int W, double L);
double em__seq_target_flops(int D, int W, double L);
double em__seq_stack_flops(const em_seq_cfg *c, int D, const em__seq_stack *k, double L);

#endif
