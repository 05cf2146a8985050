// The per-pixel functions shared with the CUDA kernels, checked on the CPU: this is how a build
// without a GPU still tests the arithmetic the kernels run.

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "ops/accumulate_impl.h"
#include "ops/band_rows.h"
#include "scenario.h"

namespace safron {
namespace {

TEST(AccumulateImpl, HalfToFloatDecodesEveryBinary16Code) {
  for (std::uint32_t code = 0; code <= 0xffff; ++code) {
    const auto half = static_cast<std::uint16_t>(code);
    const float expected = testing::reference_half_to_float(half);
    const float actual = detail::half_to_float(half);
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(actual)) << std::hex << code;
    } else {
      ASSERT_EQ(actual, expected) << std::hex << code;
      ASSERT_EQ(std::signbit(actual), std::signbit(expected)) << std::hex << code;
    }
  }
  EXPECT_EQ(detail::half_to_float(0x3c00), 1.0f);
  EXPECT_EQ(detail::half_to_float(0xbc00), -1.0f);
  EXPECT_EQ(detail::half_to_float(0x7bff), 65504.0f);
  EXPECT_EQ(detail::half_to_float(0x0001), std::ldexp(1.0f, -24));
}

TEST(AccumulateImpl, FinalisePixelFollowsTheRoundingContract) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> value(-1.3f, 1.3f);
  std::uniform_real_distribution<float> weight(0.01f, 4.0f);
  for (int i = 0; i < 100000; ++i) {
    const float w = weight(rng);
    const float sums[3] = {value(rng) * w, value(rng) * w, value(rng) * w};
    std::uint8_t rgb[3];
    ASSERT_TRUE(detail::finalise_pixel(sums, w, rgb));
    for (int c = 0; c < 3; ++c) ASSERT_EQ(rgb[c], testing::reference_level(sums[c], w));
  }
}

TEST(AccumulateImpl, FinalisePixelMapsTheEndsAndMidpointAndFlagsZeroWeight) {
  const auto level = [](float value) {
    const float sums[3] = {value, value, value};
    std::uint8_t rgb[3] = {1, 1, 1};
    EXPECT_TRUE(detail::finalise_pixel(sums, 1.0f, rgb));
    return static_cast<int>(rgb[0]);
  };
  EXPECT_EQ(level(-1.0f), 0);
  EXPECT_EQ(level(1.0f), 255);
  EXPECT_EQ(level(0.0f), 128);  // 127.5 rounds half up
  EXPECT_EQ(level(-5.0f), 0);
  EXPECT_EQ(level(5.0f), 255);
  EXPECT_EQ(level(INFINITY), 255);
  EXPECT_EQ(level(NAN), 0);

  const float sums[3] = {0.5f, 0.5f, 0.5f};
  std::uint8_t rgb[3] = {9, 9, 9};
  EXPECT_FALSE(detail::finalise_pixel(sums, 0.0f, rgb));
  EXPECT_EQ(rgb[0] + rgb[1] + rgb[2], 0);
}

// The CUDA kernel's gather (accumulate_pixel on every pixel of its launch domain) must equal the
// CPU accumulator bit for bit: same samples, same order.
TEST(AccumulateImpl, PixelGatherMatchesTheCpuAccumulatorExactly) {
  const int patch = 24;
  const std::int64_t width = 61;
  const std::int64_t height = 50;
  for (DType dtype : {DType::F32, DType::F16}) {
    const testing::PatchSet patches = testing::random_patches(5, patch, dtype, 11);
    // Overlapping, in no particular order, partly outside the image on the right and bottom, and
    // leaving the top rows and left columns uncovered.
    const std::vector<std::int64_t> ys = {2, 10, 3, 30, 26};
    const std::vector<std::int64_t> xs = {5, 13, 40, 45, 9};
    const std::vector<float> ramp = blend_ramp(BlendMode::Cosine, patch, 6);

    BandAccumulator cpu(width, height, patch, 6, BlendMode::Cosine);
    cpu.set_num_threads(3);
    cpu.add(patches.input_of(0), dtype, 5, ys.data(), xs.data(), height);
    std::vector<float> cpu_sums(static_cast<std::size_t>(height * width * 3));
    std::vector<float> cpu_weights(static_cast<std::size_t>(height * width));
    cpu.read_rows(0, height, cpu_sums.data(), cpu_weights.data());

    const detail::PatchBatch batch{patches.input_of(0), dtype, 5,          ys.data(),
                                   xs.data(),           patch, ramp.data()};
    std::vector<float> gathered_sums(cpu_sums.size(), 0.0f);
    std::vector<float> gathered_weights(cpu_weights.size(), 0.0f);
    // The kernel's launch domain: only the rows and columns the batch touches.
    const detail::IndexRange rows =
        detail::rows_touched_by_batch(5, ys.data(), patch, height, height);
    const detail::IndexRange columns = detail::columns_touched_by_batch(5, xs.data(), patch, width);
    for (std::int64_t y = rows.begin; y < rows.end; ++y) {
      for (std::int64_t x = columns.begin; x < columns.end; ++x) {
        detail::accumulate_pixel(batch, y, x,
                                 &gathered_sums[static_cast<std::size_t>((y * width + x) * 3)],
                                 &gathered_weights[static_cast<std::size_t>(y * width + x)]);
      }
    }
    EXPECT_EQ(gathered_sums, cpu_sums);
    EXPECT_EQ(gathered_weights, cpu_weights);
    EXPECT_GT(*std::max_element(cpu_weights.begin(), cpu_weights.end()), 1.0f)
        << "no overlap tested";
  }
}

}  // namespace
}  // namespace safron
