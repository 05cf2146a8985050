#include <algorithm>
#include <atomic>
#include <cstring>

#include "../ops/accumulate_impl.h"
#include "../ops/band_rows.h"
#include "parallel_for.h"
#include "safron/accumulate.h"
#include "safron/errors.h"

namespace safron {

DType parse_dtype(std::string_view name) {
  if (name == "float32") return DType::F32;
  if (name == "float16") return DType::F16;
  throw std::invalid_argument(
      concat("unsupported patch dtype '", name, "'; use float32 or float16"));
}

BandAccumulator::BandAccumulator(std::int64_t width, std::int64_t capacity_rows, int patch,
                                 int overlap, BlendMode blend)
    : width_(width),
      capacity_rows_(capacity_rows),
      patch_(patch),
      overlap_(overlap),
      blend_(blend),
      num_threads_(detail::resolve_thread_count(0)) {
  detail::validate_band_config(width, capacity_rows, patch, overlap);
  ramp_ = blend_ramp(blend, patch, overlap);
  sums_.assign(static_cast<std::size_t>(capacity_rows * width * 3), 0.0f);
  weights_.assign(static_cast<std::size_t>(capacity_rows * width), 0.0f);
  ring_rows_.assign(static_cast<std::size_t>(capacity_rows), detail::kEmptyRingRow);
}

void BandAccumulator::set_num_threads(int num_threads) {
  require(num_threads >= 0, "num_threads must be >= 0 (0 = all cores), got ", num_threads);
  std::lock_guard lock(mutex_);
  num_threads_ = detail::resolve_thread_count(num_threads);
}

int BandAccumulator::num_threads() const {
  std::lock_guard lock(mutex_);
  return num_threads_;
}

void BandAccumulator::add(const void* patches, DType dtype, std::int64_t n, const std::int64_t* ys,
                          const std::int64_t* xs, std::int64_t image_height) {
  require(n == 0 || (patches && ys && xs), "add: null patch or position pointer");
  std::lock_guard lock(mutex_);
  const detail::IndexRange rows =
      detail::rows_touched_by_batch(n, ys, patch_, image_height, capacity_rows_);
  if (rows.empty()) return;
  detail::check_ring_rows(ring_rows_, rows, "add");
  detail::mark_ring_rows(ring_rows_, rows, true);
  const detail::PatchBatch batch{patches, dtype, n, ys, xs, patch_, ramp_.data()};
  // Threads own disjoint output rows and visit the patches in batch order, so every pixel receives
  // exactly the additions, in exactly the order, of the CUDA gather kernel.
  const auto add_rows = [&](std::int64_t first, std::int64_t last) {
    for (std::int64_t y = first; y < last; ++y) {
      float* sums = sum_row(y);
      float* weights = weight_row(y);
      for (std::int64_t k = 0; k < n; ++k) {
        const std::int64_t ty = y - ys[k];
        if (ty < 0 || ty >= patch_) continue;
        const std::int64_t x_begin = std::max<std::int64_t>(xs[k], 0);
        const std::int64_t x_end = std::min<std::int64_t>(xs[k] + patch_, width_);
        for (std::int64_t x = x_begin; x < x_end; ++x) {
          detail::add_patch_sample(batch, k, ty, x - xs[k], sums + 3 * x, weights + x);
        }
      }
    }
  };
  detail::parallel_for(rows.begin, rows.end, num_threads_, add_rows);
}

std::int64_t BandAccumulator::finalise(std::int64_t row_begin, std::int64_t row_end,
                                       std::uint8_t* out, std::int64_t out_row_stride_bytes) {
  std::lock_guard lock(mutex_);
  const detail::IndexRange rows = detail::checked_row_range(row_begin, row_end, capacity_rows_);
  if (rows.empty()) return 0;
  require(out != nullptr, "finalise: output pointer is null");
  require(out_row_stride_bytes >= width_ * 3 || out_row_stride_bytes <= -width_ * 3,
          "finalise: output row stride of ", out_row_stride_bytes,
          " bytes is smaller than a row of width*3 = ", width_ * 3, " bytes");
  detail::check_ring_rows(ring_rows_, rows, "finalise");
  std::atomic<std::int64_t> zero_weight_pixels{0};
  const auto finalise_rows = [&](std::int64_t first, std::int64_t last) {
    std::int64_t zero_weight_here = 0;
    for (std::int64_t y = first; y < last; ++y) {
      float* sums = sum_row(y);
      float* weights = weight_row(y);
      std::uint8_t* pixels = out + (y - rows.begin) * out_row_stride_bytes;
      for (std::int64_t x = 0; x < width_; ++x) {
        if (!detail::finalise_pixel(sums + 3 * x, weights[x], pixels + 3 * x)) ++zero_weight_here;
      }
      std::fill(sums, sums + 3 * width_, 0.0f);
      std::fill(weights, weights + width_, 0.0f);
    }
    zero_weight_pixels += zero_weight_here;
  };
  detail::parallel_for(rows.begin, rows.end, num_threads_, finalise_rows);
  detail::mark_ring_rows(ring_rows_, rows, false);
  return zero_weight_pixels.load();
}

void BandAccumulator::discard(std::int64_t row_begin, std::int64_t row_end) {
  std::lock_guard lock(mutex_);
  const detail::IndexRange rows = detail::checked_row_range(row_begin, row_end, capacity_rows_);
  detail::check_ring_rows(ring_rows_, rows, "discard");
  const auto zero_run = [&](std::int64_t ring_row, std::int64_t count, std::int64_t) {
    std::fill_n(sums_.begin() + ring_row * width_ * 3, count * width_ * 3, 0.0f);
    std::fill_n(weights_.begin() + ring_row * width_, count * width_, 0.0f);
  };
  detail::for_each_ring_run(rows, capacity_rows_, zero_run);
  detail::mark_ring_rows(ring_rows_, rows, false);
}

void BandAccumulator::read_rows(std::int64_t row_begin, std::int64_t row_end, float* sums,
                                float* weights) const {
  std::lock_guard lock(mutex_);
  const detail::IndexRange rows = detail::checked_row_range(row_begin, row_end, capacity_rows_);
  detail::check_ring_rows(ring_rows_, rows, "read_rows");
  const auto copy_run = [&](std::int64_t ring_row, std::int64_t count, std::int64_t row) {
    const std::int64_t offset = row - rows.begin;
    std::copy_n(sums_.begin() + ring_row * width_ * 3, count * width_ * 3,
                sums + offset * width_ * 3);
    std::copy_n(weights_.begin() + ring_row * width_, count * width_, weights + offset * width_);
  };
  detail::for_each_ring_run(rows, capacity_rows_, copy_run);
}

}  // namespace safron
