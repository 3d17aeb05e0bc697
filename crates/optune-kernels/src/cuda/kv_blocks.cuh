// Where a slot's position is in a layer's KV cache (see src/token_tables.rs, BlockTable). The
// cache's keys (and its values) are blocks [blocks, kv_heads, block, head_dim] of `block`
// positions each. With a block table [slots, table_width] (a paged cache), slot s's position p is
// row p % block of block table[s · table_width + p / block]; without one (a null pointer) block s
// is slot s's own, `block` positions long: the cache laid out [slots, kv_heads, capacity,
// head_dim].

#pragma once

#include <stdint.h>

// The first element of the row that holds `position` of the slot whose table row starts at
// `slot_blocks` (or, without a table, of slot `slot`), for KV head `kv_head`. The division is in
// 32 bits (positions and block sizes are ints): a 64-bit one by a value known only at run time
// costs several times the instructions, once per row loaded.
__device__ __forceinline__ size_t kv_row(const uint32_t *__restrict__ slot_blocks, size_t slot,
                                         int64_t position, int kv_head, int kv_heads, int block,
                                         int head_dim) {
    if (!slot_blocks) {
        return ((slot * kv_heads + kv_head) * (size_t)block + position) * head_dim;
    }
    const uint32_t at = (uint32_t)position;
    const uint32_t index = at / (uint32_t)block;
    const size_t row = at - index * (uint32_t)block;
    return (((size_t)slot_blocks[index] * kv_heads + kv_head) * (size_t)block + row) * head_dim;
}

// Slot `slot`'s row of the block table, or a null pointer without one.
__device__ __forceinline__ const uint32_t *slot_blocks_of(const uint32_t *__restrict__ blocks,
                                                          size_t slot, int table_width) {
    return blocks ? blocks + slot * (size_t)table_width : nullptr;
}
