/*
 * radix.h - stable LSD radix sort of 64-bit items on a bit field of the item (internal
 * to the sparse layer).
 *
 * The embedding backward packs (row << 32) | payload into one uint64 and sorts by the
 * row bits only: stability keeps the payloads of a row in batch order, which is what
 * makes the per-row gradient sum deterministic. Sorting only the ceil(log2(rows)) key
 * bits, with a digit width picked from the item count, keeps small batches on large
 * tables cheap (few passes over few buckets) and large batches on small tables at one
 * or two passes.
 */
#ifndef EMBER_SPARSE_RADIX_H
#define EMBER_SPARSE_RADIX_H

#include <stddef.h>
#include <stdint.h>

/* Widest digit the sort uses and the most passes a 32-bit key can need with it. */
#define EM__RADIX_MAX_BITS 11
#define EM__RADIX_MAX_PASSES 3
/* uint32 words of histogram scratch the sort needs. */
#define EM__RADIX_HIST_WORDS (EM__RADIX_MAX_PASSES << EM__RADIX_MAX_BITS)

/* Sort a[0..n) stably by the key (item >> shift) & ((1 << key_bits) - 1), key_bits in
 * [0, 32], using b[0..n) as the other buffer and hist (EM__RADIX_HIST_WORDS) as
 * scratch. Returns the buffer that holds the result (a or b). */
uint64_t *em__radix_sort(uint64_t *a, uint64_t *b, size_t n, int shift, int key_bits, uint32_t *hist);

#endif
