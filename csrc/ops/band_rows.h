#pragma once

// Host-side row bookkeeping shared by the CPU and CUDA accumulators, so both validate arguments
// and map rows onto the ring identically.

#include <algorithm>
#include <cstdint>

#include "safron/band_layout.h"
#include "safron/errors.h"
#include "safron/grid.h"

namespace safron::detail {

inline void validate_band_config(std::int64_t width, std::int64_t capacity_rows, int patch,
                                 int overlap) {
  validate_patch_overlap(patch, overlap);
  require(width >= 1, "band width must be >= 1, got ", width);
  require(capacity_rows >= patch, "band capacity_rows=", capacity_rows,
          " must be >= patch=", patch);
}

// Validates the configuration before the accumulator sizes anything from it.
inline RingSlots validated_slots(std::int64_t width, std::int64_t capacity_rows, int patch,
                                 int overlap) {
  validate_band_config(width, capacity_rows, patch, overlap);
  return RingSlots(capacity_rows, width);
}

// The output rows a batch adds to: the union of its patches' rows, clipped to the image.
// Rejects batches wider than the ring, whose rows would collide.
inline IndexRange rows_touched_by_batch(std::int64_t n, const std::int64_t* ys, int patch,
                                        std::int64_t image_height, std::int64_t capacity_rows) {
  require(n >= 0, "patch count must be >= 0, got ", n);
  require(image_height >= 1, "image_height must be >= 1, got ", image_height);
  IndexRange touched{image_height, 0};
  for (std::int64_t k = 0; k < n; ++k) {
    const std::int64_t begin = std::max<std::int64_t>(ys[k], 0);
    const std::int64_t end = std::min<std::int64_t>(ys[k] + patch, image_height);
    if (begin >= end) continue;
    touched.begin = std::min(touched.begin, begin);
    touched.end = std::max(touched.end, end);
  }
  require(touched.empty() || touched.size() <= capacity_rows, "batch spans output rows [",
          touched.begin, ", ", touched.end, "), ", touched.size(),
          " rows, more than the band capacity of ", capacity_rows, " rows");
  return touched;
}

// The output columns a batch adds to, clipped to the band, so kernels need not visit the others.
inline IndexRange columns_touched_by_batch(std::int64_t n, const std::int64_t* xs, int patch,
                                           std::int64_t width) {
  IndexRange touched{width, 0};
  for (std::int64_t k = 0; k < n; ++k) {
    touched.begin = std::min(touched.begin, std::max<std::int64_t>(xs[k], 0));
    touched.end = std::max(touched.end, std::min<std::int64_t>(xs[k] + patch, width));
  }
  return touched;
}

inline IndexRange checked_row_range(std::int64_t row_begin, std::int64_t row_end,
                                    std::int64_t capacity_rows) {
  require(row_begin >= 0 && row_begin <= row_end, "invalid row range [", row_begin, ", ", row_end,
          "): need 0 <= row_begin <= row_end");
  require(row_end - row_begin <= capacity_rows, "row range [", row_begin, ", ", row_end, ") holds ",
          row_end - row_begin, " rows, more than the band capacity of ", capacity_rows);
  return {row_begin, row_end};
}

// The output buffer of a finalise call over `columns`: non-null, and rows at least one range wide
// apart (either direction), so that rows never overlap.
inline void check_finalise_output(IndexRange columns, const std::uint8_t* out,
                                  std::int64_t out_row_stride_bytes) {
  require(out != nullptr, "finalise: output pointer is null");
  const std::int64_t row_bytes = columns.size() * 3;
  require(out_row_stride_bytes >= row_bytes || out_row_stride_bytes <= -row_bytes,
          "finalise: output row stride of ", out_row_stride_bytes,
          " bytes is smaller than a row of ", columns.size(), " columns * 3 = ", row_bytes,
          " bytes");
}

// Calls visit(ring_row, row_count, first_absolute_row) for the at most two runs of consecutive
// ring rows that hold `rows` (the range wraps around the end of the ring at most once).
template <class Visit>
void for_each_ring_run(IndexRange rows, std::int64_t capacity_rows, const Visit& visit) {
  std::int64_t row = rows.begin;
  while (row < rows.end) {
    const std::int64_t ring_row = row % capacity_rows;
    const std::int64_t count = std::min(rows.end - row, capacity_rows - ring_row);
    visit(ring_row, count, row);
    row += count;
  }
}

}  // namespace safron::detail
