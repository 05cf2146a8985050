#pragma once

// Band accumulator: the rolling band of fp32 sums and weights into which overlapping generator
// patches are blended, so that memory stays bounded whatever the image height.
//
// Public contract, identical for BandAccumulator (CPU) and CudaBandAccumulator (CUDA):
// * Patches are NCHW [n][3][patch][patch] model outputs in [-1, 1], fp32 or fp16. Patch k covers
//   output rows [ys[k], ys[k] + patch) and columns [xs[k], xs[k] + patch); its pixels that land
//   inside [0, image_height) x [0, width) add w * value to the sums and w to the weights, with w
//   the 2-D blend window (blend.h). Patches are added in batch order, so every pixel sees the same
//   sequence of fp32 additions on both devices and the results are deterministic.
// * The band holds capacity_rows rows; absolute output row y lives at ring row y % capacity_rows.
//   The ring is tracked per (ring row, column block of kBlockCols columns, band_layout.h): a block
//   of a row must be finalised or discarded before the ring reuses its slot. A call that would
//   reach a slot still holding another output row throws std::logic_error before changing
//   anything; a batch spanning more than capacity_rows rows throws std::invalid_argument.
//   Finalising each patch row as soon as it is complete (PatchPlan::final_rows_end), capacity_rows
//   = patch suffices when every add() holds patches of one patch row, and patch + stride when a
//   batch may also hold the start of the next one. capacity_rows >= patch is required.
// * finalise(row_begin, row_end, col_begin, col_end, out, stride) writes rows [row_begin, row_end)
//   x columns [col_begin, col_end) as interleaved RGB uint8, output row r, column c at
//   out + (r - row_begin) * stride + (c - col_begin) * 3, with
//       v = sum / weight (per channel, fp32),
//       out = clamp(floor((v + 1) * 127.5 + 0.5), 0, 255)
//   i.e. [-1, 1] maps linearly onto [0, 255], rounding half up: -1 -> 0, 0 -> 128, +1 -> 255.
//   NaN maps to 0. A pixel with weight 0 (no patch covered it: a bug of the caller's plan) is
//   written as 0 and counted; finalise returns that count. That part of the band is then zeroed
//   for reuse; on the CPU its pages go back to the operating system, so finalising each block as
//   soon as no later patch touches it keeps resident memory independent of the width.
// * discard(row_begin, row_end, col_begin, col_end) zeroes without writing (rows already on disk
//   on resume).
// * The forms without a column range take the whole width, [0, width).
// * read_rows(row_begin, row_end, sums, weights) copies the raw band rows out, sums as
//   [rows][width][3] and weights as [rows][width], for tests and diagnostics.
// Row ranges passed to finalise, discard and read_rows must satisfy 0 <= row_begin <= row_end and
// row_end - row_begin <= capacity_rows; column ranges must be whole blocks: col_begin a multiple of
// kBlockCols, col_end a multiple of kBlockCols or the width. Bad arguments throw
// std::invalid_argument.

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string_view>
#include <vector>

#include "safron/band_layout.h"
#include "safron/blend.h"

struct CUstream_st;  // so that cudaStream_t can appear here without the CUDA headers

namespace safron {

enum class DType { F32, F16 };

// "float32" | "float16" (numpy's names); anything else throws std::invalid_argument.
DType parse_dtype(std::string_view name);

namespace detail {

// Zero-initialised fp32 storage whose pages can be handed back to the operating system while it
// lives. On Linux it is a private anonymous mapping reserved without commit (MAP_NORESERVE), so
// pages never written cost nothing, and zero() returns whole pages with MADV_DONTNEED, after which
// Linux guarantees they read back as zeros: releasing is the zeroing. Elsewhere MADV_DONTNEED
// promises no zeros, so the storage is an ordinary vector and zero() is a memset.
class ReleasableFloats {
 public:
  explicit ReleasableFloats(std::size_t count);
  ~ReleasableFloats();
  ReleasableFloats(const ReleasableFloats&) = delete;
  ReleasableFloats& operator=(const ReleasableFloats&) = delete;

  float* data() const { return data_; }
  // Zeroes [begin, begin + count); the whole pages inside it are released, the rest set to 0.
  void zero(float* begin, std::size_t count);
  // Maps in the pages of [begin, begin + count) with one system call (MADV_POPULATE_WRITE) before
  // they are written: released pages otherwise come back one page fault each, which measured 1.5x
  // the whole accumulate time of a band (bench in the commit that added this).
  void populate(float* begin, std::size_t count);

 private:
  float* data_ = nullptr;
  std::size_t bytes_ = 0;
#if !defined(__linux__)
  std::vector<float> storage_;
#endif
};

}  // namespace detail

class BandAccumulator {
 public:
  BandAccumulator(std::int64_t width, std::int64_t capacity_rows, int patch, int overlap,
                  BlendMode blend);
  BandAccumulator(const BandAccumulator&) = delete;
  BandAccumulator& operator=(const BandAccumulator&) = delete;

  // Worker threads for add/finalise; 0 (the default) means one per hardware thread.
  void set_num_threads(int num_threads);
  int num_threads() const;

  void add(const void* patches, DType dtype, std::int64_t n, const std::int64_t* ys,
           const std::int64_t* xs, std::int64_t image_height);
  std::int64_t finalise(std::int64_t row_begin, std::int64_t row_end, std::int64_t col_begin,
                        std::int64_t col_end, std::uint8_t* out, std::int64_t out_row_stride_bytes);
  std::int64_t finalise(std::int64_t row_begin, std::int64_t row_end, std::uint8_t* out,
                        std::int64_t out_row_stride_bytes);
  void discard(std::int64_t row_begin, std::int64_t row_end, std::int64_t col_begin,
               std::int64_t col_end);
  void discard(std::int64_t row_begin, std::int64_t row_end);
  void read_rows(std::int64_t row_begin, std::int64_t row_end, float* sums, float* weights) const;

  std::int64_t width() const { return width_; }
  std::int64_t capacity_rows() const { return capacity_rows_; }
  int patch() const { return patch_; }
  int overlap() const { return overlap_; }
  BlendMode blend() const { return blend_; }

 private:
  // Ring rows are padded to whole blocks, so that every block of every row starts on a page.
  float* sum_row(std::int64_t y) const {
    return sums_.data() + (y % capacity_rows_) * slots_.blocks() * kBlockCols * 3;
  }
  float* weight_row(std::int64_t y) const {
    return weights_.data() + (y % capacity_rows_) * slots_.blocks() * kBlockCols;
  }
  void zero_blocks(std::int64_t y, detail::IndexRange blocks);

  std::int64_t width_;
  std::int64_t capacity_rows_;
  int patch_;
  int overlap_;
  BlendMode blend_;
  int num_threads_;
  std::vector<float> ramp_;
  detail::RingSlots slots_;
  detail::ReleasableFloats sums_;     // [capacity_rows][blocks * kBlockCols][3]
  detail::ReleasableFloats weights_;  // [capacity_rows][blocks * kBlockCols]
  // Calls are serialised so that a pipeline may add from one thread and finalise from another.
  mutable std::mutex mutex_;
};

using CudaStream = CUstream_st*;  // == cudaStream_t; nullptr is the default stream

// The same accumulator with its band in device memory on the device current at construction.
// Work is queued on the given stream; all calls on one accumulator must be ordered (one stream, or
// streams the caller synchronises). patches and out may be device memory or pinned host memory.
// Construction throws std::runtime_error when the build has no CUDA kernels or no device is usable.
class CudaBandAccumulator {
 public:
  CudaBandAccumulator(std::int64_t width, std::int64_t capacity_rows, int patch, int overlap,
                      BlendMode blend);
  ~CudaBandAccumulator();
  CudaBandAccumulator(const CudaBandAccumulator&) = delete;
  CudaBandAccumulator& operator=(const CudaBandAccumulator&) = delete;

  // ys and xs are host arrays; they are copied to the device before this returns.
  void add(const void* device_patches, DType dtype, std::int64_t n, const std::int64_t* host_ys,
           const std::int64_t* host_xs, std::int64_t image_height, CudaStream stream);
  // Synchronises the stream to return the zero-weight count.
  std::int64_t finalise(std::int64_t row_begin, std::int64_t row_end, std::int64_t col_begin,
                        std::int64_t col_end, std::uint8_t* out, std::int64_t out_row_stride_bytes,
                        CudaStream stream);
  std::int64_t finalise(std::int64_t row_begin, std::int64_t row_end, std::uint8_t* out,
                        std::int64_t out_row_stride_bytes, CudaStream stream);
  void discard(std::int64_t row_begin, std::int64_t row_end, std::int64_t col_begin,
               std::int64_t col_end, CudaStream stream);
  void discard(std::int64_t row_begin, std::int64_t row_end, CudaStream stream);
  // Copies into host memory; synchronises the stream.
  void read_rows(std::int64_t row_begin, std::int64_t row_end, float* host_sums,
                 float* host_weights, CudaStream stream) const;

  std::int64_t width() const { return width_; }
  std::int64_t capacity_rows() const { return capacity_rows_; }
  int patch() const { return patch_; }
  int overlap() const { return overlap_; }
  BlendMode blend() const { return blend_; }
  int device() const { return device_; }

 private:
  std::int64_t width_;
  std::int64_t capacity_rows_;
  int patch_;
  int overlap_;
  BlendMode blend_;
  int device_ = -1;
  float* ramp_ = nullptr;                // device [patch]
  float* sums_ = nullptr;                // device [capacity_rows][width][3]
  float* weights_ = nullptr;             // device [capacity_rows][width]
  detail::RingSlots slots_;
  // Serialises the host-side bookkeeping; device work is ordered by the caller's stream(s).
  mutable std::mutex mutex_;
};

}  // namespace safron
