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
// * The band holds capacity_rows rows; absolute output row y lives at ring row y % capacity_rows,
//   so rows must be finalised or discarded before the ring reuses their slot. A call that would
//   reach a slot still holding another output row throws std::logic_error before changing
//   anything; a batch spanning more than capacity_rows rows throws std::invalid_argument.
//   Finalising each patch row as soon as it is complete (PatchPlan::final_rows_end), capacity_rows
//   = patch suffices when every add() holds patches of one patch row, and patch + stride when a
//   batch may also hold the start of the next one. capacity_rows >= patch is required.
// * finalise(row_begin, row_end, out, stride) writes rows [row_begin, row_end) as interleaved RGB
//   uint8, row r at out + (r - row_begin) * stride, with
//       v = sum / weight (per channel, fp32),
//       out = clamp(floor((v + 1) * 127.5 + 0.5), 0, 255)
//   i.e. [-1, 1] maps linearly onto [0, 255], rounding half up: -1 -> 0, 0 -> 128, +1 -> 255.
//   NaN maps to 0. A pixel with weight 0 (no patch covered it: a bug of the caller's plan) is
//   written as 0 and counted; finalise returns that count. The rows are then zeroed for reuse.
// * discard(row_begin, row_end) zeroes rows without writing them (rows already on disk on resume).
// * read_rows(row_begin, row_end, sums, weights) copies the raw band rows out, sums as
//   [rows][width][3] and weights as [rows][width], for tests and diagnostics.
// Row ranges passed to finalise, discard and read_rows must satisfy 0 <= row_begin <= row_end and
// row_end - row_begin <= capacity_rows; bad arguments throw std::invalid_argument.

#include <cstdint>
#include <mutex>
#include <string_view>
#include <vector>

#include "safron/blend.h"

struct CUstream_st;  // so that cudaStream_t can appear here without the CUDA headers

namespace safron {

enum class DType { F32, F16 };

// "float32" | "float16" (numpy's names); anything else throws std::invalid_argument.
DType parse_dtype(std::string_view name);

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
  std::int64_t finalise(std::int64_t row_begin, std::int64_t row_end, std::uint8_t* out,
                        std::int64_t out_row_stride_bytes);
  void discard(std::int64_t row_begin, std::int64_t row_end);
  void read_rows(std::int64_t row_begin, std::int64_t row_end, float* sums, float* weights) const;

  std::int64_t width() const { return width_; }
  std::int64_t capacity_rows() const { return capacity_rows_; }
  int patch() const { return patch_; }
  int overlap() const { return overlap_; }
  BlendMode blend() const { return blend_; }

 private:
  float* sum_row(std::int64_t y) { return sums_.data() + (y % capacity_rows_) * width_ * 3; }
  float* weight_row(std::int64_t y) { return weights_.data() + (y % capacity_rows_) * width_; }

  std::int64_t width_;
  std::int64_t capacity_rows_;
  int patch_;
  int overlap_;
  BlendMode blend_;
  int num_threads_;
  std::vector<float> ramp_;
  std::vector<float> sums_;              // [capacity_rows][width][3]
  std::vector<float> weights_;           // [capacity_rows][width]
  std::vector<std::int64_t> ring_rows_;  // output row held by each ring row (ops/band_rows.h)
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
  std::int64_t finalise(std::int64_t row_begin, std::int64_t row_end, std::uint8_t* out,
                        std::int64_t out_row_stride_bytes, CudaStream stream);
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
  std::vector<std::int64_t> ring_rows_;  // output row held by each ring row (ops/band_rows.h)
  // Serialises the host-side bookkeeping; device work is ordered by the caller's stream(s).
  mutable std::mutex mutex_;
};

}  // namespace safron
