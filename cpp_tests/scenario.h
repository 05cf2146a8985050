#pragma once

// Test fixtures shared by the CPU and CUDA accumulator tests: random model outputs for every patch
// of a plan, a random batching, the band schedule an engine would follow, and a naive reference
// that blends the whole image in one canvas.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "safron/accumulate.h"
#include "safron/blend.h"
#include "safron/grid.h"

namespace safron::testing {

// binary16 decoded from its definition, independently of the library's bit manipulation.
inline float reference_half_to_float(std::uint16_t half) {
  const int sign = half >> 15;
  const int exponent = (half >> 10) & 0x1f;
  const int mantissa = half & 0x3ff;
  double magnitude;
  if (exponent == 0) {
    magnitude = std::ldexp(mantissa / 1024.0, -14);
  } else if (exponent == 31) {
    magnitude = mantissa == 0 ? INFINITY : NAN;
  } else {
    magnitude = std::ldexp(1.0 + mantissa / 1024.0, exponent - 15);
  }
  return static_cast<float>(sign ? -magnitude : magnitude);
}

// The finalise contract written literally: clamp(floor((sum / weight + 1) * 127.5 + 0.5), 0, 255).
inline std::uint8_t reference_level(float sum, float weight) {
  const float value = sum / weight;
  return static_cast<std::uint8_t>(
      std::clamp(std::floor((value + 1.0f) * 127.5f + 0.5f), 0.0f, 255.0f));
}

// Model outputs for patches 0..count-1, [count][3][patch][patch]. For F16 the halves are kept and
// `values` holds their exact fp32 values, which is what the accumulator must have added.
struct PatchSet {
  int patch = 0;
  DType dtype = DType::F32;
  std::vector<float> values;
  std::vector<std::uint16_t> halves;

  std::int64_t patch_elements() const { return std::int64_t{3} * patch * patch; }
  const float* values_of(std::int64_t k) const { return values.data() + k * patch_elements(); }
  const void* input_of(std::int64_t k) const {
    if (dtype == DType::F16) return halves.data() + k * patch_elements();
    return values_of(k);
  }
};

inline PatchSet random_patches(std::int64_t count, int patch, DType dtype, std::uint32_t seed) {
  std::mt19937 rng(seed);
  PatchSet set;
  set.patch = patch;
  set.dtype = dtype;
  const std::int64_t total = count * set.patch_elements();
  set.values.resize(static_cast<std::size_t>(total));
  if (dtype == DType::F32) {
    std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
    for (float& value : set.values) value = unit(rng);
    return set;
  }
  // Halves in [-1, 1]: any sign, exponent below 1.0's, any mantissa; plus some exact +-1.
  std::uniform_int_distribution<int> bits(0, 0xffff);
  set.halves.resize(static_cast<std::size_t>(total));
  for (std::size_t i = 0; i < set.halves.size(); ++i) {
    const int random = bits(rng);
    std::uint16_t half = static_cast<std::uint16_t>((random & 0x83ff) | ((random % 15) << 10));
    if (random % 97 == 0) half = static_cast<std::uint16_t>((random & 0x8000) | 0x3c00);
    set.halves[i] = half;
    set.values[i] = reference_half_to_float(half);
  }
  return set;
}

struct PatchRange {
  std::int64_t begin;
  std::int64_t end;
};

// Consecutive raster-order batches of 1..max_batch patches.
inline std::vector<PatchRange> random_batches(std::int64_t count, std::int64_t max_batch,
                                              std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<std::int64_t> size(1, max_batch);
  std::vector<PatchRange> batches;
  for (std::int64_t begin = 0; begin < count;) {
    const std::int64_t end = std::min(count, begin + size(rng));
    batches.push_back({begin, end});
    begin = end;
  }
  return batches;
}

// What an engine does after each batch: finalise the rows that became final.
struct BandStep {
  PatchRange batch;
  std::int64_t finalise_begin;
  std::int64_t finalise_end;
};

inline std::vector<BandStep> band_schedule(const PatchPlan& plan,
                                           const std::vector<PatchRange>& batches) {
  std::vector<BandStep> steps;
  std::int64_t final_end = 0;
  for (const PatchRange& batch : batches) {
    const std::int64_t complete_rows = batch.end / plan.cols();
    const std::int64_t end = complete_rows > 0 ? plan.final_rows_end(complete_rows - 1) : 0;
    steps.push_back({batch, final_end, std::max(final_end, end)});
    final_end = std::max(final_end, end);
  }
  return steps;
}

// The smallest ring that holds every row live at any step of the schedule.
inline std::int64_t required_capacity(const PatchPlan& plan, const std::vector<BandStep>& steps) {
  std::int64_t capacity = plan.geometry().patch;
  std::int64_t touched_end = 0;
  for (const BandStep& step : steps) {
    for (std::int64_t k = step.batch.begin; k < step.batch.end; ++k) {
      touched_end =
          std::max(touched_end, std::min(plan.origin(k).y + plan.geometry().patch, plan.height()));
    }
    capacity = std::max(capacity, touched_end - step.finalise_begin);
  }
  return capacity;
}

// An engine that writes column blocks out early: after each batch, every block finalises the rows
// that no later patch touches within the block's columns, so blocks progress at different paces.
struct BlockFinalise {
  std::int64_t row_begin;
  std::int64_t row_end;
  std::int64_t col_begin;
  std::int64_t col_end;
};

struct BlockStep {
  PatchRange batch;
  std::vector<BlockFinalise> finalise;  // in the order to call them
};

enum class BlockOrder { Ascending, Descending, Shuffled, Merged };

inline std::vector<BlockStep> block_schedule(const PatchPlan& plan,
                                             const std::vector<PatchRange>& batches,
                                             BlockOrder order, std::uint32_t seed) {
  const int patch = plan.geometry().patch;
  const std::int64_t blocks = (plan.width() + kBlockCols - 1) / kBlockCols;
  std::vector<std::int64_t> done(static_cast<std::size_t>(blocks), 0);
  std::mt19937 rng(seed);
  std::vector<BlockStep> steps;
  for (const PatchRange& batch : batches) {
    BlockStep step{batch, {}};
    for (std::int64_t block = 0; block < blocks; ++block) {
      const std::int64_t col_begin = block * kBlockCols;
      const std::int64_t col_end = std::min(col_begin + kBlockCols, plan.width());
      // Patches come in raster order, so the first later patch over these columns is the topmost.
      std::int64_t final_end = plan.height();
      for (std::int64_t k = batch.end; k < plan.count(); ++k) {
        const PatchOrigin origin = plan.origin(k);
        if (origin.x < col_end && origin.x + patch > col_begin) {
          final_end = origin.y;
          break;
        }
      }
      std::int64_t& block_done = done[static_cast<std::size_t>(block)];
      if (final_end > block_done) {
        step.finalise.push_back({block_done, final_end, col_begin, col_end});
        block_done = final_end;
      }
    }
    if (order == BlockOrder::Descending) {
      std::reverse(step.finalise.begin(), step.finalise.end());
    } else if (order == BlockOrder::Shuffled) {
      std::shuffle(step.finalise.begin(), step.finalise.end(), rng);
    } else if (order == BlockOrder::Merged) {
      std::vector<BlockFinalise> merged;
      for (const BlockFinalise& range : step.finalise) {
        if (!merged.empty() && merged.back().col_end == range.col_begin &&
            merged.back().row_begin == range.row_begin && merged.back().row_end == range.row_end) {
          merged.back().col_end = range.col_end;
        } else {
          merged.push_back(range);
        }
      }
      step.finalise = merged;
    }
    steps.push_back(step);
  }
  return steps;
}

// The smallest ring for a block schedule, counting from the block that lags most.
inline std::int64_t required_capacity(const PatchPlan& plan, const std::vector<BlockStep>& steps) {
  const std::int64_t blocks = (plan.width() + kBlockCols - 1) / kBlockCols;
  std::vector<std::int64_t> done(static_cast<std::size_t>(blocks), 0);
  std::int64_t capacity = plan.geometry().patch;
  std::int64_t touched_end = 0;
  for (const BlockStep& step : steps) {
    for (std::int64_t k = step.batch.begin; k < step.batch.end; ++k) {
      touched_end =
          std::max(touched_end, std::min(plan.origin(k).y + plan.geometry().patch, plan.height()));
    }
    capacity = std::max(capacity, touched_end - *std::min_element(done.begin(), done.end()));
    for (const BlockFinalise& range : step.finalise) {
      for (std::int64_t block = range.col_begin / kBlockCols; block * kBlockCols < range.col_end;
           ++block) {
        done[static_cast<std::size_t>(block)] = range.row_end;
      }
    }
  }
  return capacity;
}

struct PositionLists {
  std::vector<std::int64_t> ys;
  std::vector<std::int64_t> xs;
};

inline PositionLists positions_of(const PatchPlan& plan, PatchRange batch) {
  PositionLists lists;
  for (std::int64_t k = batch.begin; k < batch.end; ++k) {
    lists.ys.push_back(plan.origin(k).y);
    lists.xs.push_back(plan.origin(k).x);
  }
  return lists;
}

// The whole image in one fp32 canvas, each patch added pixel by pixel in patch order.
struct ReferenceImage {
  std::int64_t height;
  std::int64_t width;
  std::vector<float> sums;     // [height][width][3]
  std::vector<float> weights;  // [height][width]
  std::vector<std::uint8_t> pixels;

  ReferenceImage(const PatchPlan& plan, const PatchSet& patches, const std::vector<float>& ramp)
      : height(plan.height()),
        width(plan.width()),
        sums(static_cast<std::size_t>(height * width * 3)),
        weights(static_cast<std::size_t>(height * width)),
        pixels(static_cast<std::size_t>(height * width * 3)) {
    const int side = patches.patch;
    for (std::int64_t k = 0; k < plan.count(); ++k) {
      const PatchOrigin origin = plan.origin(k);
      const float* values = patches.values_of(k);
      for (int ty = 0; ty < side; ++ty) {
        for (int tx = 0; tx < side; ++tx) {
          const std::int64_t y = origin.y + ty;
          const std::int64_t x = origin.x + tx;
          if (y >= height || x >= width) continue;
          const float w = ramp[static_cast<std::size_t>(ty)] * ramp[static_cast<std::size_t>(tx)];
          for (int c = 0; c < 3; ++c) {
            sums[static_cast<std::size_t>((y * width + x) * 3 + c)] +=
                w * values[(c * side + ty) * side + tx];
          }
          weights[static_cast<std::size_t>(y * width + x)] += w;
        }
      }
    }
    for (std::int64_t pixel = 0; pixel < height * width; ++pixel) {
      for (int c = 0; c < 3; ++c) {
        pixels[static_cast<std::size_t>(pixel * 3 + c)] =
            reference_level(sums[static_cast<std::size_t>(pixel * 3 + c)],
                            weights[static_cast<std::size_t>(pixel)]);
      }
    }
  }
};

}  // namespace safron::testing
