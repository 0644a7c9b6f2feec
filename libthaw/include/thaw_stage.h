/* The staging plan shared by libthaw's CUDA mover: which piece of which region goes through which pinned
 * slot, in which order. A pure function of the sizes, so it is tested on any CPU (tests/libthaw/test_stage_plan.py)
 * and the CUDA ring only executes it. */
#ifndef THAW_STAGE_H
#define THAW_STAGE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* One piece: whole chunks of one region (the region's last piece may end short), staged in `slot`. */
typedef struct {
    uint64_t region;
    uint64_t start; /* byte offset inside the region, a multiple of its chunk size */
    uint64_t len;
    int32_t slot;
} thaw_stage_piece;

/* Slots the ring really uses for a requested count (at least 2 for double buffering, at most 8). */
int thaw_stage_slots(int slots);
/* Bytes one pinned slot needs: slot_bytes, or a region's chunk size where a chunk is larger. */
uint64_t thaw_stage_slot_bytes(const uint64_t *lens, const uint64_t *chunk_sizes, size_t n, uint64_t slot_bytes);
/* Fill out[0..cap) with the plan, regions in order, pieces in order within each, slots round-robin so a
 * slot is reused only after every other slot took a piece. Returns the number of pieces (out may be NULL to
 * count), or -1 if a chunk size is 0. */
int64_t thaw_stage_plan(const uint64_t *lens, const uint64_t *chunk_sizes, size_t n, uint64_t slot_bytes, int slots,
                        thaw_stage_piece *out, size_t cap);

#ifdef __cplusplus
}
#endif

#endif
