#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstring>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

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

namespace detail {

#if defined(__linux__)

namespace {
std::uintptr_t page_size() {
  static const auto size = static_cast<std::uintptr_t>(sysconf(_SC_PAGESIZE));
  return size;
}
}  // namespace

ReleasableFloats::ReleasableFloats(std::size_t count) : bytes_(count * sizeof(float)) {
  if (bytes_ == 0) return;
  void* mapping = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mapping == MAP_FAILED) throw std::bad_alloc();
  data_ = static_cast<float*>(mapping);
}

ReleasableFloats::~ReleasableFloats() {
  if (data_) munmap(data_, bytes_);
}

void ReleasableFloats::populate(float* begin, std::size_t count) {
#if defined(MADV_POPULATE_WRITE)
  const std::uintptr_t page = page_size();
  const auto first = reinterpret_cast<std::uintptr_t>(begin) / page * page;
  const auto last = reinterpret_cast<std::uintptr_t>(begin + count);
  // A hint: kernels before 5.14 refuse it (EINVAL) and the pages fault in one by one as before.
  madvise(reinterpret_cast<void*>(first), last - first, MADV_POPULATE_WRITE);
#else
  (void)begin;
  (void)count;
#endif
}

void ReleasableFloats::zero(float* begin, std::size_t count) {
  auto* first = reinterpret_cast<std::byte*>(begin);
  std::byte* const last = first + count * sizeof(float);
  const std::uintptr_t page = page_size();
  auto* pages_begin = reinterpret_cast<std::byte*>(
      (reinterpret_cast<std::uintptr_t>(first) + page - 1) / page * page);
  auto* pages_end =
      reinterpret_cast<std::byte*>(reinterpret_cast<std::uintptr_t>(last) / page * page);
  // madvise cannot fail on a page range of our own mapping; should it anyway, zeroing by hand
  // keeps the band correct and only costs the memory.
  if (pages_begin >= pages_end ||
      madvise(pages_begin, static_cast<std::size_t>(pages_end - pages_begin), MADV_DONTNEED) != 0) {
    std::memset(first, 0, static_cast<std::size_t>(last - first));
    return;
  }
  std::memset(first, 0, static_cast<std::size_t>(pages_begin - first));
  std::memset(pages_end, 0, static_cast<std::size_t>(last - pages_end));
}

#else

ReleasableFloats::ReleasableFloats(std::size_t count)
    : bytes_(count * sizeof(float)), storage_(count, 0.0f) {
  data_ = storage_.data();
}

ReleasableFloats::~ReleasableFloats() = default;

void ReleasableFloats::populate(float*, std::size_t) {}

void ReleasableFloats::zero(float* begin, std::size_t count) {
  std::fill_n(begin, count, 0.0f);
}

#endif

}  // namespace detail

namespace {

inline float sample_value(float value) { return value; }
inline float sample_value(std::uint16_t half) { return detail::half_to_float(half); }

// One row of one patch into one band row: add_patch_sample's arithmetic on `count` consecutive
// pixels (w = ramp[ty] * ramp[tx], then sum += w * value per channel, weight += w, unfused), with
// the dtype and the row's addresses resolved once instead of per pixel, so the loop vectorises.
// `values` is channel 0 of the row's first pixel; channels are `plane` values apart.
template <class T>
void add_patch_row(const T* values, std::int64_t plane, float ramp_y, const float* ramp_x,
                   std::int64_t count, float* sums, float* weights) {
  const T* red = values;
  const T* green = values + plane;
  const T* blue = values + 2 * plane;
  for (std::int64_t i = 0; i < count; ++i) {
    const float w = ramp_y * ramp_x[i];
    sums[3 * i] += w * sample_value(red[i]);
    sums[3 * i + 1] += w * sample_value(green[i]);
    sums[3 * i + 2] += w * sample_value(blue[i]);
    weights[i] += w;
  }
}

}  // namespace

BandAccumulator::BandAccumulator(std::int64_t width, std::int64_t capacity_rows, int patch,
                                 int overlap, BlendMode blend)
    : width_(width),
      capacity_rows_(capacity_rows),
      patch_(patch),
      overlap_(overlap),
      blend_(blend),
      num_threads_(detail::resolve_thread_count(0)),
      slots_(detail::validated_slots(width, capacity_rows, patch, overlap)),
      sums_(static_cast<std::size_t>(capacity_rows * slots_.blocks() * kBlockCols * 3)),
      weights_(static_cast<std::size_t>(capacity_rows * slots_.blocks() * kBlockCols)) {
  ramp_ = blend_ramp(blend, patch, overlap);
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
  slots_.check_patches(n, ys, xs, patch_, image_height, "add");
  slots_.mark_patches(n, ys, xs, patch_, image_height);
  // Threads own disjoint output rows and visit the patches in batch order, so every pixel receives
  // exactly the additions, in exactly the order, of the CUDA gather kernel.
  const detail::IndexRange touched_columns = detail::columns_touched_by_batch(n, xs, patch_, width_);
  const auto add_rows = [&](std::int64_t first, std::int64_t last) {
    for (std::int64_t y = first; y < last; ++y) {
      float* sums = sum_row(y);
      float* weights = weight_row(y);
      sums_.populate(sums + 3 * touched_columns.begin,
                     static_cast<std::size_t>(3 * touched_columns.size()));
      weights_.populate(weights + touched_columns.begin,
                        static_cast<std::size_t>(touched_columns.size()));
      for (std::int64_t k = 0; k < n; ++k) {
        const std::int64_t ty = y - ys[k];
        if (ty < 0 || ty >= patch_) continue;
        const std::int64_t x_begin = std::max<std::int64_t>(xs[k], 0);
        const std::int64_t x_end = std::min<std::int64_t>(xs[k] + patch_, width_);
        if (x_begin >= x_end) continue;
        const std::int64_t tx_begin = x_begin - xs[k];
        const std::int64_t plane = static_cast<std::int64_t>(patch_) * patch_;
        const std::int64_t first_value = (k * 3 * patch_ + ty) * patch_ + tx_begin;  // channel 0
        const float* ramp_x = ramp_.data() + tx_begin;
        if (dtype == DType::F16) {
          add_patch_row(static_cast<const std::uint16_t*>(patches) + first_value, plane,
                        ramp_[static_cast<std::size_t>(ty)], ramp_x, x_end - x_begin,
                        sums + 3 * x_begin, weights + x_begin);
        } else {
          add_patch_row(static_cast<const float*>(patches) + first_value, plane,
                        ramp_[static_cast<std::size_t>(ty)], ramp_x, x_end - x_begin,
                        sums + 3 * x_begin, weights + x_begin);
        }
      }
    }
  };
  detail::parallel_for(rows.begin, rows.end, num_threads_, add_rows);
}

// Whole block segments, padding included, so that their pages are released rather than cleared.
void BandAccumulator::zero_blocks(std::int64_t y, detail::IndexRange blocks) {
  sums_.zero(sum_row(y) + blocks.begin * kBlockCols * 3,
             static_cast<std::size_t>(blocks.size() * kBlockCols * 3));
  weights_.zero(weight_row(y) + blocks.begin * kBlockCols,
                static_cast<std::size_t>(blocks.size() * kBlockCols));
}

std::int64_t BandAccumulator::finalise(std::int64_t row_begin, std::int64_t row_end,
                                       std::int64_t col_begin, std::int64_t col_end,
                                       std::uint8_t* out, std::int64_t out_row_stride_bytes) {
  std::lock_guard lock(mutex_);
  const detail::IndexRange rows = detail::checked_row_range(row_begin, row_end, capacity_rows_);
  const detail::IndexRange columns = detail::checked_column_range(col_begin, col_end, width_);
  if (rows.empty() || columns.empty()) return 0;
  detail::check_finalise_output(columns, out, out_row_stride_bytes);
  const detail::IndexRange blocks = detail::blocks_of(columns);
  slots_.check(rows, blocks, "finalise");
  std::atomic<std::int64_t> zero_weight_pixels{0};
  const auto finalise_rows = [&](std::int64_t first, std::int64_t last) {
    std::int64_t zero_weight_here = 0;
    for (std::int64_t y = first; y < last; ++y) {
      const float* sums = sum_row(y);
      const float* weights = weight_row(y);
      std::uint8_t* pixels = out + (y - rows.begin) * out_row_stride_bytes;
      for (std::int64_t x = columns.begin; x < columns.end; ++x) {
        if (!detail::finalise_pixel(sums + 3 * x, weights[x], pixels + 3 * (x - columns.begin))) {
          ++zero_weight_here;
        }
      }
      zero_blocks(y, blocks);
    }
    zero_weight_pixels += zero_weight_here;
  };
  detail::parallel_for(rows.begin, rows.end, num_threads_, finalise_rows);
  slots_.mark(rows, blocks, false);
  return zero_weight_pixels.load();
}

std::int64_t BandAccumulator::finalise(std::int64_t row_begin, std::int64_t row_end,
                                       std::uint8_t* out, std::int64_t out_row_stride_bytes) {
  return finalise(row_begin, row_end, 0, width_, out, out_row_stride_bytes);
}

void BandAccumulator::discard(std::int64_t row_begin, std::int64_t row_end, std::int64_t col_begin,
                              std::int64_t col_end) {
  std::lock_guard lock(mutex_);
  const detail::IndexRange rows = detail::checked_row_range(row_begin, row_end, capacity_rows_);
  const detail::IndexRange blocks =
      detail::blocks_of(detail::checked_column_range(col_begin, col_end, width_));
  slots_.check(rows, blocks, "discard");
  for (std::int64_t y = rows.begin; y < rows.end; ++y) zero_blocks(y, blocks);
  slots_.mark(rows, blocks, false);
}

void BandAccumulator::discard(std::int64_t row_begin, std::int64_t row_end) {
  discard(row_begin, row_end, 0, width_);
}

void BandAccumulator::read_rows(std::int64_t row_begin, std::int64_t row_end, float* sums,
                                float* weights) const {
  std::lock_guard lock(mutex_);
  const detail::IndexRange rows = detail::checked_row_range(row_begin, row_end, capacity_rows_);
  slots_.check(rows, {0, slots_.blocks()}, "read_rows");
  for (std::int64_t y = rows.begin; y < rows.end; ++y) {
    const std::int64_t offset = y - rows.begin;
    std::copy_n(sum_row(y), width_ * 3, sums + offset * width_ * 3);
    std::copy_n(weight_row(y), width_, weights + offset * width_);
  }
}

}  // namespace safron
