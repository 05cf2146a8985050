#pragma once

// Host-side row bookkeeping shared by the CPU and CUDA accumulators, so both validate arguments
// and map rows onto the ring identically.

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "safron/errors.h"
#include "safron/grid.h"

namespace safron::detail {

// A half-open range of output rows or columns.
struct IndexRange {
  std::int64_t begin = 0;
  std::int64_t end = 0;
  std::int64_t size() const { return end - begin; }
  bool empty() const { return end <= begin; }
};

inline void validate_band_config(std::int64_t width, std::int64_t capacity_rows, int patch,
                                 int overlap) {
  validate_patch_overlap(patch, overlap);
  require(width >= 1, "band width must be >= 1, got ", width);
  require(capacity_rows >= patch, "band capacity_rows=", capacity_rows,
          " must be >= patch=", patch);
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

// Each ring row remembers the output row whose data it holds (kEmptyRingRow once finalised or
// discarded), so that letting the band wrap onto unfinished rows fails loudly instead of silently
// blending two output rows into one.
inline constexpr std::int64_t kEmptyRingRow = -1;

inline void check_ring_rows(const std::vector<std::int64_t>& ring_rows, IndexRange rows,
                            const char* operation) {
  const auto capacity_rows = static_cast<std::int64_t>(ring_rows.size());
  for (std::int64_t row = rows.begin; row < rows.end; ++row) {
    const std::int64_t held = ring_rows[static_cast<std::size_t>(row % capacity_rows)];
    if (held != kEmptyRingRow && held != row) {
      throw std::logic_error(
          concat(operation, ": output row ", row, " shares its band slot with row ", held,
                 ", which was never finalised or discarded (capacity_rows=", capacity_rows,
                 "); finalise rows before the band wraps"));
    }
  }
}

// Marks the ring rows of `rows` as holding them (after add) or as empty (after finalise/discard).
inline void mark_ring_rows(std::vector<std::int64_t>& ring_rows, IndexRange rows, bool holding) {
  const auto capacity_rows = static_cast<std::int64_t>(ring_rows.size());
  for (std::int64_t row = rows.begin; row < rows.end; ++row) {
    ring_rows[static_cast<std::size_t>(row % capacity_rows)] = holding ? row : kEmptyRingRow;
  }
}

}  // namespace safron::detail
