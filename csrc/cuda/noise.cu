#include <cuda_runtime.h>

#include "cuda_check.h"
#include "device_positions.h"
#include "safron/errors.h"
#include "safron/noise.h"

namespace safron {

namespace {

constexpr int kThreadsPerBlock = 256;

// One thread per output value, in output order (coalesced writes); the same hash as the CPU body.
__global__ void noise_kernel(float* out, std::int64_t channels, std::int64_t height,
                             std::int64_t width, const std::int64_t* y0s, const std::int64_t* x0s,
                             std::uint32_t seed, std::int64_t count) {
  const std::int64_t index = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= count) return;
  const std::int64_t x = index % width;
  const std::int64_t row = index / width % height;
  const std::int64_t channel = index / (width * height) % channels;
  const std::int64_t k = index / (width * height * channels);
  const std::uint32_t key =
      noise_hash::row_key(noise_hash::channel_key(seed, channel), y0s[k] + row);
  out[index] = noise_hash::value(key, x0s[k] + x);
}

}  // namespace

void fill_noise_cuda(const NoiseWindows& w, float* device_out, CUstream_st* stream) {
  detail::check_noise_windows(w, device_out);
  const std::int64_t count = w.n * w.channels * w.height * w.width;
  if (count == 0) return;
  // The kernel runs on the device that holds the output, whatever the calling thread selected.
  cudaPointerAttributes attributes{};
  detail::cuda_check(cudaPointerGetAttributes(&attributes, device_out), "cudaPointerGetAttributes");
  require(attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged,
          "fill_noise_cuda: the output must be device memory");
  const detail::ScopedDevice on_device(attributes.device);
  const detail::DevicePositions origins(w.y0s, w.x0s, w.n, stream, "fill_noise_cuda");
  const auto blocks = static_cast<unsigned int>((count + kThreadsPerBlock - 1) / kThreadsPerBlock);
  noise_kernel<<<blocks, kThreadsPerBlock, 0, stream>>>(device_out, w.channels, w.height, w.width,
                                                        origins.ys(), origins.xs(), w.seed, count);
  detail::cuda_check(cudaGetLastError(), "fill_noise_cuda");
}

}  // namespace safron
