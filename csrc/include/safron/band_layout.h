#pragma once

// The layout of the band accumulator that callers need to know, and the slot bookkeeping that the
// CPU and CUDA accumulators share. Everything but kBlockCols is internal (namespace detail).

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "safron/errors.h"

namespace safron {

// Columns of the band are grouped in blocks of kBlockCols (the last block may be narrower). A
// column range passed to finalise or discard must consist of whole blocks. On the CPU each block of
// a ring row starts on a page boundary (1024 * 3 * 4 bytes of sums, 1024 * 4 of weights), so the
// pages of a finalised block go back to the operating system and resident memory follows the
// blocks that are live rather than the width.
inline constexpr std::int64_t kBlockCols = 1024;

namespace detail {

// A half-open range of output rows or columns.
struct IndexRange {
  std::int64_t begin = 0;
  std::int64_t end = 0;
  std::int64_t size() const { return end - begin; }
  bool empty() const { return end <= begin; }
};

// Column blocks of the band: the unit in which columns are finalised, discarded and tracked.
inline std::int64_t block_count(std::int64_t width) {
  return (width + kBlockCols - 1) / kBlockCols;
}

// Finalise and discard take whole blocks (the last one may be partial when it ends at the width),
// so that every block is either wholly live or wholly free and can be tracked as one slot.
inline IndexRange checked_column_range(std::int64_t col_begin, std::int64_t col_end,
                                       std::int64_t width) {
  require(col_begin >= 0 && col_begin <= col_end && col_end <= width, "invalid column range [",
          col_begin, ", ", col_end, "): need 0 <= col_begin <= col_end <= width=", width);
  require(col_begin % kBlockCols == 0 && (col_end % kBlockCols == 0 || col_end == width),
          "column range [", col_begin, ", ", col_end, ") is not made of whole column blocks: ",
          "col_begin must be a multiple of block_cols=", kBlockCols,
          " and col_end one too or the width=", width);
  return {col_begin, col_end};
}

inline IndexRange blocks_of(IndexRange columns) {
  return {columns.begin / kBlockCols, (columns.end + kBlockCols - 1) / kBlockCols};
}

// The ring is tracked per (ring row, column block): each slot remembers the output row whose
// data it holds (kEmptyRingRow once that block of the row is finalised or discarded), so that
// letting the band wrap onto unfinished data fails loudly instead of silently blending two output
// rows into one. Per block, because an engine finalises the blocks of one row at different times: a block
// whose patches are all in can be written out while the columns to its right are still live.
class RingSlots {
 public:
  static constexpr std::int64_t kEmptyRingRow = -1;

  RingSlots(std::int64_t capacity_rows, std::int64_t width)
      : capacity_rows_(capacity_rows),
        blocks_(block_count(width)),
        width_(width),
        held_(static_cast<std::size_t>(capacity_rows * blocks_), kEmptyRingRow) {}

  std::int64_t blocks() const { return blocks_; }

  // Throws std::logic_error, changing nothing, if a slot of rows x blocks holds another row.
  void check(IndexRange rows, IndexRange blocks, const char* operation) const {
    for (std::int64_t row = rows.begin; row < rows.end; ++row) {
      for (std::int64_t block = blocks.begin; block < blocks.end; ++block) {
        const std::int64_t held = held_[index(row, block)];
        if (held != kEmptyRingRow && held != row) {
          throw std::logic_error(concat(
              operation, ": output row ", row, " shares its band slot in columns [",
              block * kBlockCols, ", ", std::min((block + 1) * kBlockCols, width_),
              ") with row ", held, ", which was never finalised or discarded there (capacity_rows=",
              capacity_rows_, "); finalise rows before the band wraps"));
        }
      }
    }
  }

  // Marks rows x blocks as holding their rows (holding) or as free.
  void mark(IndexRange rows, IndexRange blocks, bool holding) {
    for (std::int64_t row = rows.begin; row < rows.end; ++row) {
      for (std::int64_t block = blocks.begin; block < blocks.end; ++block) {
        held_[index(row, block)] = holding ? row : kEmptyRingRow;
      }
    }
  }

  // The same for what a batch writes: each patch's own rows x blocks, clipped to the image, so
  // that a batch spanning two patch rows claims no slot it leaves untouched.
  void check_patches(std::int64_t n, const std::int64_t* ys, const std::int64_t* xs, int patch,
                     std::int64_t image_height, const char* operation) const {
    for (std::int64_t k = 0; k < n; ++k) {
      check(patch_rows(ys[k], patch, image_height), patch_blocks(xs[k], patch), operation);
    }
  }
  void mark_patches(std::int64_t n, const std::int64_t* ys, const std::int64_t* xs, int patch,
                    std::int64_t image_height) {
    for (std::int64_t k = 0; k < n; ++k) {
      mark(patch_rows(ys[k], patch, image_height), patch_blocks(xs[k], patch), true);
    }
  }

 private:
  std::size_t index(std::int64_t row, std::int64_t block) const {
    return static_cast<std::size_t>((row % capacity_rows_) * blocks_ + block);
  }
  static IndexRange patch_rows(std::int64_t y, int patch, std::int64_t image_height) {
    return {std::max<std::int64_t>(y, 0), std::min<std::int64_t>(y + patch, image_height)};
  }
  IndexRange patch_blocks(std::int64_t x, int patch) const {
    const IndexRange columns{std::max<std::int64_t>(x, 0),
                             std::min<std::int64_t>(x + patch, width_)};
    return columns.empty() ? IndexRange{} : blocks_of(columns);
  }

  std::int64_t capacity_rows_;
  std::int64_t blocks_;
  std::int64_t width_;
  std::vector<std::int64_t> held_;  // [capacity_rows][blocks]
};

}  // namespace detail
}  // namespace safron
