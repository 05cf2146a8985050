#pragma once

// Per-pixel arithmetic of the band accumulator, shared by the CPU body and the CUDA kernels so
// that both compute bit-identical sums (the build also disables fused multiply-add contraction on
// both sides, see CMakeLists.txt). Include only from csrc/.

#include <cmath>
#include <cstdint>
#include <cstring>

#include "safron/accumulate.h"
#include "safron/blend.h"
#include "safron/host_device.h"

namespace safron::detail {

// IEEE binary16 -> binary32, exact for every code (subnormals, infinities, NaN included). Written
// out rather than using F16C intrinsics so the CPU build needs no particular instruction set.
SAFRON_HOST_DEVICE inline float half_to_float(std::uint16_t half) {
  const std::uint32_t sign = static_cast<std::uint32_t>(half & 0x8000u) << 16;
  const std::uint32_t exponent = (half >> 10) & 0x1fu;
  const std::uint32_t mantissa = half & 0x3ffu;
  std::uint32_t bits;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24 is exact in fp32.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 0x1fu) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // infinity or NaN, payload kept
  } else {
    bits = sign | ((exponent + (127 - 15)) << 23) | (mantissa << 13);
  }
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// r(t) of blend.h, evaluated in double and rounded once to float. It runs on the host only: the
// ramp is tabulated once and the table is what both devices read, so they agree exactly.
inline float blend_ramp_value(BlendMode mode, int t, int patch, int overlap) {
  const int distance_to_edge = t < patch - 1 - t ? t : patch - 1 - t;
  if (mode == BlendMode::Uniform || distance_to_edge >= overlap) return 1.0f;
  const double position = (distance_to_edge + 0.5) / overlap;  // in (0, 1)
  if (mode == BlendMode::Linear) return static_cast<float>(position);
  constexpr double pi = 3.14159265358979323846;
  return static_cast<float>(0.5 - 0.5 * std::cos(pi * position));
}

// A batch of patches as the kernels see it; all pointers on the device that runs the code.
struct PatchBatch {
  const void* values;  // NCHW [count][3][patch][patch]
  DType dtype;
  std::int64_t count;
  const std::int64_t* ys;  // [count] output row of each patch's top edge
  const std::int64_t* xs;  // [count] output column of each patch's left edge
  int patch;
  const float* ramp;  // [patch] 1-D blend ramp
};

SAFRON_HOST_DEVICE inline float load_patch_value(const PatchBatch& batch, std::int64_t k,
                                                 int channel, std::int64_t ty, std::int64_t tx) {
  const std::int64_t side = batch.patch;
  const std::int64_t index = ((k * 3 + channel) * side + ty) * side + tx;
  if (batch.dtype == DType::F16) {
    return half_to_float(static_cast<const std::uint16_t*>(batch.values)[index]);
  }
  return static_cast<const float*>(batch.values)[index];
}

// Adds pixel (ty, tx) of patch k to one output pixel's running sums (RGB) and weight.
SAFRON_HOST_DEVICE inline void add_patch_sample(const PatchBatch& batch, std::int64_t k,
                                                std::int64_t ty, std::int64_t tx, float* sum_rgb,
                                                float* weight) {
  const float w = batch.ramp[ty] * batch.ramp[tx];
  for (int channel = 0; channel < 3; ++channel) {
    sum_rgb[channel] += w * load_patch_value(batch, k, channel, ty, tx);
  }
  *weight += w;
}

// Gathers every patch of the batch that covers output pixel (y, x), in batch order: the CUDA
// kernels run this once per pixel, so no two threads write the same pixel and no atomics are
// needed. The CPU body walks rows patch by patch instead (cache friendlier) but performs the same
// add_patch_sample calls on each pixel in the same order.
SAFRON_HOST_DEVICE inline void accumulate_pixel(const PatchBatch& batch, std::int64_t y,
                                                std::int64_t x, float* sum_rgb, float* weight) {
  float running[3] = {sum_rgb[0], sum_rgb[1], sum_rgb[2]};
  float running_weight = *weight;
  bool touched = false;
  for (std::int64_t k = 0; k < batch.count; ++k) {
    const std::int64_t ty = y - batch.ys[k];
    const std::int64_t tx = x - batch.xs[k];
    if (ty < 0 || ty >= batch.patch || tx < 0 || tx >= batch.patch) continue;
    add_patch_sample(batch, k, ty, tx, running, &running_weight);
    touched = true;
  }
  if (!touched) return;
  for (int channel = 0; channel < 3; ++channel) sum_rgb[channel] = running[channel];
  *weight = running_weight;
}

// Normalises one pixel to uint8 RGB (the rounding contract of accumulate.h). Returns false, and
// writes black, when the pixel has no weight. Clamping before truncation equals clamp(floor(q)):
// for q in [0, 255] truncation is floor, and a comparison-based clamp sends NaN to 0.
SAFRON_HOST_DEVICE inline bool finalise_pixel(const float* sum_rgb, float weight,
                                              std::uint8_t* rgb) {
  if (!(weight > 0.0f)) {
    rgb[0] = rgb[1] = rgb[2] = 0;
    return false;
  }
  for (int channel = 0; channel < 3; ++channel) {
    const float value = sum_rgb[channel] / weight;
    float level = (value + 1.0f) * 127.5f + 0.5f;
    level = level > 0.0f ? level : 0.0f;
    level = level < 255.0f ? level : 255.0f;
    rgb[channel] = static_cast<std::uint8_t>(level);
  }
  return true;
}

}  // namespace safron::detail
