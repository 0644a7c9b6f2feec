/* The staging plan; see thaw_stage.h. */
#include "thaw_stage.h"

int thaw_stage_slots(int slots) { return slots < 2 ? 2 : slots > 8 ? 8 : slots; }

/* Whole chunks of a region that fit a slot: the step between piece starts. */
static uint64_t piece_step(uint64_t chunk_size, uint64_t slot_bytes) {
    return chunk_size >= slot_bytes ? chunk_size : slot_bytes / chunk_size * chunk_size;
}

uint64_t thaw_stage_slot_bytes(const uint64_t *lens, const uint64_t *chunk_sizes, size_t n, uint64_t slot_bytes) {
    uint64_t widest = slot_bytes;
    for (size_t i = 0; i < n; i++)
        if (lens[i] && chunk_sizes[i] && piece_step(chunk_sizes[i], slot_bytes) > widest)
            widest = piece_step(chunk_sizes[i], slot_bytes);
    return widest;
}

int64_t thaw_stage_plan(const uint64_t *lens, const uint64_t *chunk_sizes, size_t n, uint64_t slot_bytes, int slots,
                        thaw_stage_piece *out, size_t cap) {
    int ring = thaw_stage_slots(slots);
    int64_t count = 0;
    for (size_t i = 0; i < n; i++) {
        if (chunk_sizes[i] == 0 || slot_bytes == 0) return -1;
        uint64_t step = piece_step(chunk_sizes[i], slot_bytes);
        for (uint64_t start = 0; start < lens[i]; start += step, count++) {
            if (out == NULL || (size_t)count >= cap) continue;
            out[count].region = i;
            out[count].start = start;
            out[count].len = lens[i] - start < step ? lens[i] - start : step;
            out[count].slot = (int32_t)(count % ring);
        }
    }
    return count;
}
