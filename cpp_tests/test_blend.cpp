#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "safron/blend.h"

namespace safron {
namespace {

constexpr BlendMode kRamped[] = {BlendMode::Linear, BlendMode::Cosine};

int distance_to_edge(int t, int patch) {
  return std::min(t, patch - 1 - t);
}

TEST(Blend, ParsesTheThreeNamesAndListsThemOnError) {
  EXPECT_EQ(parse_blend_mode("uniform"), BlendMode::Uniform);
  EXPECT_EQ(parse_blend_mode("linear"), BlendMode::Linear);
  EXPECT_EQ(parse_blend_mode("cosine"), BlendMode::Cosine);
  for (BlendMode mode : {BlendMode::Uniform, BlendMode::Linear, BlendMode::Cosine}) {
    EXPECT_EQ(parse_blend_mode(blend_mode_name(mode)), mode);
  }
  try {
    parse_blend_mode("gaussian");
    FAIL() << "accepted an unknown blend mode";
  } catch (const std::invalid_argument& error) {
    const std::string message = error.what();
    for (const char* name : {"gaussian", "uniform", "linear", "cosine"}) {
      EXPECT_NE(message.find(name), std::string::npos) << message;
    }
  }
}

TEST(Blend, UniformIsOneEverywhere) {
  for (float value : blend_ramp(BlendMode::Uniform, 256, 20)) EXPECT_EQ(value, 1.0f);
}

TEST(Blend, ZeroOverlapIsOneEverywhere) {
  for (BlendMode mode : kRamped) {
    for (float value : blend_ramp(mode, 64, 0)) EXPECT_EQ(value, 1.0f);
  }
}

TEST(Blend, RampsArePositiveSymmetricAndConfinedToTheOverlap) {
  for (BlendMode mode : kRamped) {
    for (auto [patch, overlap] : {std::pair{256, 20}, std::pair{32, 7}, std::pair{30, 20},
                                  std::pair{5, 4}, std::pair{2, 1}}) {
      SCOPED_TRACE(std::string(blend_mode_name(mode)) + " patch=" + std::to_string(patch) +
                   " overlap=" + std::to_string(overlap));
      const std::vector<float> ramp = blend_ramp(mode, patch, overlap);
      ASSERT_EQ(static_cast<int>(ramp.size()), patch);
      for (int t = 0; t < patch; ++t) {
        const float value = ramp[static_cast<std::size_t>(t)];
        EXPECT_GT(value, 0.0f) << "t=" << t;
        EXPECT_LE(value, 1.0f) << "t=" << t;
        EXPECT_EQ(value, ramp[static_cast<std::size_t>(patch - 1 - t)]) << "t=" << t;
        if (distance_to_edge(t, patch) >= overlap) {
          EXPECT_EQ(value, 1.0f) << "ramp leaks outside the overlap at t=" << t;
        } else {
          EXPECT_LT(value, 1.0f) << "t=" << t;
        }
      }
    }
  }
}

TEST(Blend, LinearRampRisesByOneOverOverlapPerPixel) {
  const int patch = 256;
  const int overlap = 20;
  const std::vector<float> ramp = blend_ramp(BlendMode::Linear, patch, overlap);
  EXPECT_NEAR(ramp[0], 0.5 / overlap, 1e-7);
  for (int t = 1; t < overlap; ++t) {
    EXPECT_NEAR(ramp[static_cast<std::size_t>(t)] - ramp[static_cast<std::size_t>(t - 1)],
                1.0 / overlap, 1e-6)
        << "t=" << t;
  }
  // The half step into the plateau keeps the ramp symmetric about the overlap's centre.
  EXPECT_NEAR(ramp[overlap] - ramp[overlap - 1], 0.5 / overlap, 1e-6);
}

TEST(Blend, CosineRampFollowsTheRaisedCosine) {
  const int patch = 256;
  const int overlap = 20;
  const double pi = std::acos(-1.0);
  const std::vector<float> ramp = blend_ramp(BlendMode::Cosine, patch, overlap);
  for (int t = 0; t < overlap; ++t) {
    const double expected = 0.5 - 0.5 * std::cos(pi * (t + 0.5) / overlap);
    EXPECT_NEAR(ramp[static_cast<std::size_t>(t)], expected, 1e-7) << "t=" << t;
    if (t > 0) {
      EXPECT_GT(ramp[static_cast<std::size_t>(t)], ramp[static_cast<std::size_t>(t - 1)]);
    }
  }
}

TEST(Blend, RejectsInvalidPatchOrOverlap) {
  EXPECT_THROW(blend_ramp(BlendMode::Linear, 0, 0), std::invalid_argument);
  EXPECT_THROW(blend_ramp(BlendMode::Linear, 16, 16), std::invalid_argument);
  EXPECT_THROW(blend_ramp(BlendMode::Cosine, 16, -1), std::invalid_argument);
}

}  // namespace
}  // namespace safron
