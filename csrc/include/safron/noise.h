#pragma once

// The noise a generator with noise channels reads (safron/noise.py has the why), as a function of
// canvas coordinates: every pixel of every channel is uniform in [-1, 1), fixed by (seed, channel,
// canvas row, canvas column) through Wellons' lowbias32 integer hash, nested as
//     value = map(mix(column + mix(row + mix(channel + seed * 0x9E3779B9))))
// with all arithmetic modulo 2^32 (negative coordinates wrap: the mirrored margin has noise of its
// own). map takes the top 24 bits h to (2h + 1 - 2^24) / 2^24, the centre of the h-th of 2^24 equal
// bins of [-1, 1): an odd multiple of 2^-24 below 1 in magnitude, which float32 holds exactly, so
// the CPU body, the CUDA body and numpy agree to the bit.
//
// A batch of windows: window k covers canvas rows [y0s[k], y0s[k] + height) and columns
// [x0s[k], x0s[k] + width); out is float32 [n][channels][height][width], C-contiguous.

#include <cstdint>

#include "safron/host_device.h"

struct CUstream_st;  // so that cudaStream_t can appear here without the CUDA headers

namespace safron {

namespace noise_hash {

constexpr std::uint32_t kGolden = 0x9E3779B9u;  // 2^32 / golden ratio: spreads consecutive seeds

SAFRON_HOST_DEVICE inline std::uint32_t mix(std::uint32_t v) {
  v ^= v >> 16;
  v *= 0x7FEB352Du;
  v ^= v >> 15;
  v *= 0x846CA68Bu;
  v ^= v >> 16;
  return v;
}

// Conversion to uint32 is modulo 2^32 for negative values too (well defined for unsigned types).
SAFRON_HOST_DEVICE inline std::uint32_t channel_key(std::uint32_t seed, std::int64_t channel) {
  return mix(static_cast<std::uint32_t>(channel) + seed * kGolden);
}

SAFRON_HOST_DEVICE inline std::uint32_t row_key(std::uint32_t channel_key, std::int64_t row) {
  return mix(static_cast<std::uint32_t>(row) + channel_key);
}

SAFRON_HOST_DEVICE inline float value(std::uint32_t row_key, std::int64_t column) {
  const std::uint32_t bits = mix(static_cast<std::uint32_t>(column) + row_key) >> 8;
  // The product is exact (a 24-bit integer times a power of two), so fusing it with the add
  // changes nothing; the sum is exact as explained above.
  return static_cast<float>(bits) * 0x1p-23f + (-1.0f + 0x1p-24f);
}

}  // namespace noise_hash

struct NoiseWindows {
  std::int64_t n = 0;  // windows
  std::int64_t channels = 0;
  std::int64_t height = 0;
  std::int64_t width = 0;
  const std::int64_t* y0s = nullptr;  // host memory, n each
  const std::int64_t* x0s = nullptr;
  std::uint32_t seed = 0;
};

namespace detail {
// The argument checks both bodies share (std::invalid_argument).
void check_noise_windows(const NoiseWindows& windows, const void* out);
}  // namespace detail

// Fills out (host memory) on num_threads threads (0: one per hardware thread). Throws
// std::invalid_argument for negative sizes or null pointers with n > 0.
void fill_noise(const NoiseWindows& windows, float* out, int num_threads = 0);

// Fills out (device memory of the current device) on `stream` (nullptr: the default stream); the
// call returns once the work is queued. Positions stay in host memory: they are copied along.
// Throws std::runtime_error when built without CUDA or on a CUDA error.
void fill_noise_cuda(const NoiseWindows& windows, float* device_out, CUstream_st* stream);

}  // namespace safron
