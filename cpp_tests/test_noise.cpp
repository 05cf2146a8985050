// The canvas noise (safron/noise.h): the CPU body against a scalar restatement of the hash, and the
// properties the engine relies on (translation consistency, wrapping, thread independence).

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "safron/noise.h"

namespace safron {
namespace {

// lowbias32 and the value map written out independently of the header, from the published
// constants.
std::uint32_t reference_mix(std::uint32_t v) {
  v = (v ^ (v >> 16)) * 2146121005u;  // 0x7FEB352D
  v = (v ^ (v >> 15)) * 2221713035u;  // 0x846CA68B
  return v ^ (v >> 16);
}

double reference_value(std::uint32_t seed, std::int64_t channel, std::int64_t row,
                       std::int64_t column) {
  const std::uint32_t wrap = 0xFFFFFFFFu;
  const std::uint32_t key = reference_mix(static_cast<std::uint32_t>(channel & wrap) +
                                          static_cast<std::uint32_t>(seed * 2654435769ull));
  const std::uint32_t rows = reference_mix(static_cast<std::uint32_t>(row & wrap) + key);
  const std::uint32_t h = reference_mix(static_cast<std::uint32_t>(column & wrap) + rows) >> 8;
  return (2.0 * h + 1.0) / 16777216.0 - 1.0;
}

std::vector<float> fill(std::int64_t channels, std::int64_t height, std::int64_t width,
                        const std::vector<std::int64_t>& y0s, const std::vector<std::int64_t>& x0s,
                        std::uint32_t seed, int threads = 1) {
  const auto n = static_cast<std::int64_t>(y0s.size());
  std::vector<float> out(static_cast<std::size_t>(n * channels * height * width), -9.0f);
  fill_noise(NoiseWindows{n, channels, height, width, y0s.data(), x0s.data(), seed}, out.data(),
             threads);
  return out;
}

TEST(Noise, MatchesTheScalarReferenceToTheBit) {
  const std::vector<std::int64_t> y0s{0, -7, 123456789, -(std::int64_t{1} << 33)};
  const std::vector<std::int64_t> x0s{0, 40000, -3, 5};
  for (const std::uint32_t seed : {0u, 1u, 4294967295u}) {
    const std::vector<float> out = fill(3, 5, 6, y0s, x0s, seed);
    std::size_t i = 0;
    for (std::size_t k = 0; k < y0s.size(); ++k)
      for (int c = 0; c < 3; ++c)
        for (int r = 0; r < 5; ++r)
          for (int x = 0; x < 6; ++x, ++i)
            ASSERT_EQ(static_cast<double>(out[i]), reference_value(seed, c, y0s[k] + r, x0s[k] + x))
                << "seed " << seed << " window " << k << " channel " << c << " (" << r << ", " << x
                << ")";
  }
}

TEST(Noise, OverlappingWindowsReadTheSameCanvas) {
  // Window 1 starts 3 rows down and 5 columns right of window 0: where they overlap, equal.
  const std::int64_t h = 16, w = 20;
  const std::vector<float> out = fill(2, h, w, {-4, -1}, {10, 15}, 7);
  for (std::int64_t c = 0; c < 2; ++c)
    for (std::int64_t r = 0; r + 3 < h; ++r)
      for (std::int64_t x = 0; x + 5 < w; ++x)
        ASSERT_EQ(out[((0 * 2 + c) * h + r + 3) * w + x + 5], out[((1 * 2 + c) * h + r) * w + x]);
}

TEST(Noise, CoordinatesWrapModulo2To32) {
  const std::int64_t wrap = std::int64_t{1} << 32;
  const std::vector<float> near = fill(1, 4, 4, {-2}, {3}, 5);
  const std::vector<float> far = fill(1, 4, 4, {wrap - 2}, {3 - wrap}, 5);
  EXPECT_EQ(near, far);
}

TEST(Noise, ThreadsDoNotChangeTheResult) {
  const std::vector<std::int64_t> y0s{0, 100, 200}, x0s{5, 5, -50};
  EXPECT_EQ(fill(2, 37, 41, y0s, x0s, 3, 1), fill(2, 37, 41, y0s, x0s, 3, 4));
  EXPECT_EQ(fill(2, 37, 41, y0s, x0s, 3, 1), fill(2, 37, 41, y0s, x0s, 3, 0));
}

TEST(Noise, IsUniformAndDecorrelatedAcrossChannelsAndSeeds) {
  const std::int64_t h = 256, w = 256, pixels = h * w;
  const std::vector<float> a = fill(2, h, w, {0}, {0}, 0);
  const std::vector<float> b = fill(1, h, w, {0}, {0}, 1);
  double sum = 0, squares = 0, across_channels = 0, across_seeds = 0;
  for (std::int64_t i = 0; i < pixels; ++i) {
    ASSERT_GE(a[i], -1.0f);
    ASSERT_LT(a[i], 1.0f);
    sum += a[i];
    squares += a[i] * a[i];
    across_channels += a[i] * a[pixels + i];
    across_seeds += a[i] * b[i];
  }
  // Uniform on [-1, 1): mean 0, variance 1/3; the bounds are > 6 standard errors wide.
  EXPECT_NEAR(sum / pixels, 0.0, 0.015);
  EXPECT_NEAR(squares / pixels, 1.0 / 3.0, 0.01);
  EXPECT_NEAR(across_channels / pixels, 0.0, 0.01);
  EXPECT_NEAR(across_seeds / pixels, 0.0, 0.01);
}

TEST(Noise, EmptyBatchesWriteNothingAndBadArgumentsThrow) {
  EXPECT_TRUE(fill(2, 4, 4, {}, {}, 0).empty());
  float value = 5.0f;
  const std::int64_t y = 0;
  fill_noise(NoiseWindows{1, 0, 4, 4, &y, &y, 0}, &value);
  EXPECT_EQ(value, 5.0f);
  EXPECT_THROW(fill_noise(NoiseWindows{1, -1, 4, 4, &y, &y, 0}, &value), std::invalid_argument);
  EXPECT_THROW(fill_noise(NoiseWindows{1, 1, 1, 1, nullptr, &y, 0}, &value), std::invalid_argument);
  EXPECT_THROW(fill_noise(NoiseWindows{1, 1, 1, 1, &y, &y, 0}, nullptr), std::invalid_argument);
}

}  // namespace
}  // namespace safron
