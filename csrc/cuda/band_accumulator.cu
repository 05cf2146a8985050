#include <cuda_runtime.h>

#include <vector>

#include "../ops/accumulate_impl.h"
#include "../ops/band_rows.h"
#include "cuda_check.h"
#include "device_positions.h"
#include "safron/accumulate.h"
#include "safron/build_info.h"
#include "safron/errors.h"

namespace safron {

namespace {

constexpr int kThreadsPerBlock = 256;

struct DeviceBand {
  float* sums;
  float* weights;
  std::int64_t width;
  std::int64_t capacity_rows;
};

unsigned int blocks_for(std::int64_t threads) {
  return static_cast<unsigned int>((threads + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

// One thread per output pixel of the touched rows and columns, gathering the batch in order:
// deterministic, and the same arithmetic as the CPU body.
__global__ void accumulate_kernel(DeviceBand band, detail::PatchBatch batch, std::int64_t row_begin,
                                  std::int64_t column_begin, std::int64_t columns,
                                  std::int64_t pixel_count) {
  const std::int64_t pixel = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pixel >= pixel_count) return;
  const std::int64_t y = row_begin + pixel / columns;
  const std::int64_t x = column_begin + pixel % columns;
  const std::int64_t ring_pixel = (y % band.capacity_rows) * band.width + x;
  detail::accumulate_pixel(batch, y, x, band.sums + 3 * ring_pixel, band.weights + ring_pixel);
}

// One thread per pixel of the rows from row_begin x columns [column_begin, column_begin +
// columns), pixel_count in all; writes the pixel and zeroes its band entry for reuse.
__global__ void finalise_kernel(DeviceBand band, std::int64_t row_begin, std::int64_t column_begin,
                                std::int64_t columns, std::int64_t pixel_count, std::uint8_t* out,
                                std::int64_t out_row_stride_bytes,
                                unsigned long long* zero_weight_pixels) {
  const std::int64_t pixel = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pixel >= pixel_count) return;
  const std::int64_t row = pixel / columns;
  const std::int64_t column = pixel % columns;
  const std::int64_t ring_pixel =
      ((row_begin + row) % band.capacity_rows) * band.width + column_begin + column;
  float* sums = band.sums + 3 * ring_pixel;
  std::uint8_t* rgb = out + row * out_row_stride_bytes + 3 * column;
  if (!detail::finalise_pixel(sums, band.weights[ring_pixel], rgb)) {
    atomicAdd(zero_weight_pixels, 1ULL);
  }
  sums[0] = sums[1] = sums[2] = 0.0f;
  band.weights[ring_pixel] = 0.0f;
}

// Rejects pageable host memory, which a kernel cannot dereference on most systems; a clear error
// beats an illegal-address fault that poisons the whole CUDA context.
void require_device_accessible(const void* pointer, int device, const char* what) {
  cudaPointerAttributes attributes{};
  detail::cuda_check(cudaPointerGetAttributes(&attributes, pointer), "cudaPointerGetAttributes");
  if (attributes.type != cudaMemoryTypeUnregistered) return;
  int pageable_access = 0;
  detail::cuda_check(
      cudaDeviceGetAttribute(&pageable_access, cudaDevAttrPageableMemoryAccess, device),
      "cudaDeviceGetAttribute");
  require(pageable_access != 0, what,
          " points to pageable host memory; pass device memory or pinned host memory");
}

}  // namespace

CudaBandAccumulator::CudaBandAccumulator(std::int64_t width, std::int64_t capacity_rows, int patch,
                                         int overlap, BlendMode blend)
    : width_(width),
      capacity_rows_(capacity_rows),
      patch_(patch),
      overlap_(overlap),
      blend_(blend),
      slots_(detail::validated_slots(width, capacity_rows, patch, overlap)) {
  if (cuda_device_count() == 0) {
    throw std::runtime_error(
        "CudaBandAccumulator: no usable CUDA device (no GPU, or no NVIDIA driver); use the CPU "
        "BandAccumulator");
  }
  detail::cuda_check(cudaGetDevice(&device_), "cudaGetDevice");
  const std::vector<float> ramp = blend_ramp(blend, patch, overlap);
  const auto pixels = static_cast<std::size_t>(capacity_rows * width);
  try {
    detail::cuda_check(cudaMalloc(&ramp_, ramp.size() * sizeof(float)), "cudaMalloc(ramp)");
    detail::cuda_check(cudaMalloc(&sums_, pixels * 3 * sizeof(float)), "cudaMalloc(band sums)");
    detail::cuda_check(cudaMalloc(&weights_, pixels * sizeof(float)), "cudaMalloc(band weights)");
    detail::cuda_check(
        cudaMemcpy(ramp_, ramp.data(), ramp.size() * sizeof(float), cudaMemcpyHostToDevice),
        "cudaMemcpy(ramp)");
    detail::cuda_check(cudaMemset(sums_, 0, pixels * 3 * sizeof(float)), "cudaMemset(band sums)");
    detail::cuda_check(cudaMemset(weights_, 0, pixels * sizeof(float)), "cudaMemset(band weights)");
  } catch (...) {
    cudaFree(ramp_);
    cudaFree(sums_);
    cudaFree(weights_);
    throw;
  }
}

CudaBandAccumulator::~CudaBandAccumulator() {
  // Errors cannot be reported from a destructor; a failing cudaFree only leaks.
  int previous = 0;
  const bool switch_device = cudaGetDevice(&previous) == cudaSuccess && previous != device_;
  if (switch_device) cudaSetDevice(device_);
  cudaFree(ramp_);
  cudaFree(sums_);
  cudaFree(weights_);
  if (switch_device) cudaSetDevice(previous);
}

void CudaBandAccumulator::add(const void* device_patches, DType dtype, std::int64_t n,
                              const std::int64_t* host_ys, const std::int64_t* host_xs,
                              std::int64_t image_height, CudaStream stream) {
  require(n == 0 || (device_patches && host_ys && host_xs), "add: null patch or position pointer");
  const detail::IndexRange rows =
      detail::rows_touched_by_batch(n, host_ys, patch_, image_height, capacity_rows_);
  const detail::IndexRange columns = detail::columns_touched_by_batch(n, host_xs, patch_, width_);
  if (rows.empty() || columns.empty()) return;
  std::lock_guard lock(mutex_);
  slots_.check_patches(n, host_ys, host_xs, patch_, image_height, "add");
  const detail::ScopedDevice on_device(device_);
  require_device_accessible(device_patches, device_, "add: patches");

  const detail::DevicePositions positions(host_ys, host_xs, n, stream, "CudaBandAccumulator::add");
  const detail::PatchBatch batch{device_patches, dtype,  n,    positions.ys(),
                                 positions.xs(), patch_, ramp_};
  const std::int64_t pixel_count = rows.size() * columns.size();
  accumulate_kernel<<<blocks_for(pixel_count), kThreadsPerBlock, 0, stream>>>(
      DeviceBand{sums_, weights_, width_, capacity_rows_}, batch, rows.begin, columns.begin,
      columns.size(), pixel_count);
  detail::cuda_check(cudaGetLastError(), "CudaBandAccumulator::add");
  slots_.mark_patches(n, host_ys, host_xs, patch_, image_height);
}

std::int64_t CudaBandAccumulator::finalise(std::int64_t row_begin, std::int64_t row_end,
                                           std::int64_t col_begin, std::int64_t col_end,
                                           std::uint8_t* out, std::int64_t out_row_stride_bytes,
                                           CudaStream stream) {
  const detail::IndexRange rows = detail::checked_row_range(row_begin, row_end, capacity_rows_);
  const detail::IndexRange columns = detail::checked_column_range(col_begin, col_end, width_);
  if (rows.empty() || columns.empty()) return 0;
  detail::check_finalise_output(columns, out, out_row_stride_bytes);
  const detail::IndexRange blocks = detail::blocks_of(columns);
  std::lock_guard lock(mutex_);
  slots_.check(rows, blocks, "finalise");
  const detail::ScopedDevice on_device(device_);
  require_device_accessible(out, device_, "finalise: out");

  unsigned long long* device_count = nullptr;
  detail::cuda_check(cudaMallocAsync(&device_count, sizeof *device_count, stream),
                     "cudaMallocAsync(zero-weight counter)");
  unsigned long long zero_weight_pixels = 0;
  cudaError_t status = cudaMemsetAsync(device_count, 0, sizeof *device_count, stream);
  if (status == cudaSuccess) {
    const std::int64_t pixel_count = rows.size() * columns.size();
    finalise_kernel<<<blocks_for(pixel_count), kThreadsPerBlock, 0, stream>>>(
        DeviceBand{sums_, weights_, width_, capacity_rows_}, rows.begin, columns.begin,
        columns.size(), pixel_count, out, out_row_stride_bytes, device_count);
    status = cudaGetLastError();
  }
  if (status == cudaSuccess) {
    status = cudaMemcpyAsync(&zero_weight_pixels, device_count, sizeof zero_weight_pixels,
                             cudaMemcpyDeviceToHost, stream);
  }
  cudaFreeAsync(device_count, stream);
  if (status == cudaSuccess) status = cudaStreamSynchronize(stream);
  detail::cuda_check(status, "CudaBandAccumulator::finalise");
  slots_.mark(rows, blocks, false);
  return static_cast<std::int64_t>(zero_weight_pixels);
}

std::int64_t CudaBandAccumulator::finalise(std::int64_t row_begin, std::int64_t row_end,
                                           std::uint8_t* out, std::int64_t out_row_stride_bytes,
                                           CudaStream stream) {
  return finalise(row_begin, row_end, 0, width_, out, out_row_stride_bytes, stream);
}

void CudaBandAccumulator::discard(std::int64_t row_begin, std::int64_t row_end,
                                  std::int64_t col_begin, std::int64_t col_end,
                                  CudaStream stream) {
  const detail::IndexRange rows = detail::checked_row_range(row_begin, row_end, capacity_rows_);
  const detail::IndexRange columns = detail::checked_column_range(col_begin, col_end, width_);
  const detail::IndexRange blocks = detail::blocks_of(columns);
  std::lock_guard lock(mutex_);
  slots_.check(rows, blocks, "discard");
  const detail::ScopedDevice on_device(device_);
  if (!columns.empty()) {
    const auto pitch = static_cast<std::size_t>(width_) * sizeof(float);
    const auto row_bytes = static_cast<std::size_t>(columns.size()) * sizeof(float);
    const auto zero_run = [&](std::int64_t ring_row, std::int64_t count, std::int64_t) {
      const std::int64_t first_pixel = ring_row * width_ + columns.begin;
      const auto height = static_cast<std::size_t>(count);
      detail::cuda_check(cudaMemset2DAsync(sums_ + 3 * first_pixel, 3 * pitch, 0, 3 * row_bytes,
                                           height, stream),
                         "cudaMemset2DAsync(band sums)");
      detail::cuda_check(
          cudaMemset2DAsync(weights_ + first_pixel, pitch, 0, row_bytes, height, stream),
          "cudaMemset2DAsync(band weights)");
    };
    detail::for_each_ring_run(rows, capacity_rows_, zero_run);
  }
  slots_.mark(rows, blocks, false);
}

void CudaBandAccumulator::discard(std::int64_t row_begin, std::int64_t row_end,
                                  CudaStream stream) {
  discard(row_begin, row_end, 0, width_, stream);
}

void CudaBandAccumulator::read_rows(std::int64_t row_begin, std::int64_t row_end, float* host_sums,
                                    float* host_weights, CudaStream stream) const {
  const detail::IndexRange rows = detail::checked_row_range(row_begin, row_end, capacity_rows_);
  std::lock_guard lock(mutex_);
  slots_.check(rows, {0, slots_.blocks()}, "read_rows");
  const detail::ScopedDevice on_device(device_);
  const std::int64_t row_floats = width_ * 3;
  const auto copy_run = [&](std::int64_t ring_row, std::int64_t count, std::int64_t row) {
    const std::int64_t offset = row - rows.begin;
    const auto floats = static_cast<std::size_t>(count * width_);
    detail::cuda_check(
        cudaMemcpyAsync(host_sums + offset * row_floats, sums_ + ring_row * row_floats,
                        3 * floats * sizeof(float), cudaMemcpyDeviceToHost, stream),
        "cudaMemcpyAsync(band sums)");
    detail::cuda_check(cudaMemcpyAsync(host_weights + offset * width_, weights_ + ring_row * width_,
                                       floats * sizeof(float), cudaMemcpyDeviceToHost, stream),
                       "cudaMemcpyAsync(band weights)");
  };
  detail::for_each_ring_run(rows, capacity_rows_, copy_run);
  detail::cuda_check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
}

}  // namespace safron
