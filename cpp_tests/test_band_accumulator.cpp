#include <gtest/gtest.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "safron/accumulate.h"
#include "safron/blend.h"
#include "safron/grid.h"
#include "scenario.h"

namespace safron {
namespace {

struct ImageCase {
  std::int64_t height;
  std::int64_t width;
  PatchGeometry geometry;
};

std::string case_name(const ImageCase& image, BlendMode blend, DType dtype) {
  return std::to_string(image.height) + "x" + std::to_string(image.width) + "_p" +
         std::to_string(image.geometry.patch) + "o" + std::to_string(image.geometry.overlap) + "_" +
         std::string(blend_mode_name(blend)) + (dtype == DType::F16 ? "_f16" : "_f32");
}

class RenderMatchesReference
    : public ::testing::TestWithParam<std::tuple<ImageCase, BlendMode, DType>> {};

// Renders a whole image as the engine would (random batches spanning several patch rows, each band
// finalised once final, the ring wrapping many times) and compares every band's raw sums and every
// output pixel with the one-canvas reference.
TEST_P(RenderMatchesReference, SumsAndPixelsAreExact) {
  const auto& [image, blend, dtype] = GetParam();
  const PatchPlan plan = make_plan(image.height, image.width, image.geometry);
  const int patch = image.geometry.patch;
  const int overlap = image.geometry.overlap;
  const std::uint32_t seed = static_cast<std::uint32_t>(image.height * 31 + image.width);
  const testing::PatchSet patches = testing::random_patches(plan.count(), patch, dtype, seed);
  const testing::ReferenceImage reference(plan, patches, blend_ramp(blend, patch, overlap));

  const auto batches = testing::random_batches(plan.count(), 2 * plan.cols() + 1, seed + 1);
  const auto steps = testing::band_schedule(plan, batches);
  const std::int64_t capacity = testing::required_capacity(plan, steps) + seed % 7;

  for (int threads : {1, 3}) {
    SCOPED_TRACE("threads=" + std::to_string(threads));
    BandAccumulator band(image.width, capacity, patch, overlap, blend);
    band.set_num_threads(threads);
    std::vector<std::uint8_t> pixels(static_cast<std::size_t>(image.height * image.width * 3), 7);
    for (const testing::BandStep& step : steps) {
      const testing::PositionLists positions = testing::positions_of(plan, step.batch);
      band.add(patches.input_of(step.batch.begin), dtype, step.batch.end - step.batch.begin,
               positions.ys.data(), positions.xs.data(), image.height);
      const std::int64_t rows = step.finalise_end - step.finalise_begin;
      if (rows == 0) continue;
      std::vector<float> sums(static_cast<std::size_t>(rows * image.width * 3));
      std::vector<float> weights(static_cast<std::size_t>(rows * image.width));
      band.read_rows(step.finalise_begin, step.finalise_end, sums.data(), weights.data());
      const auto first_sum = reference.sums.begin() + step.finalise_begin * image.width * 3;
      const auto first_weight = reference.weights.begin() + step.finalise_begin * image.width;
      ASSERT_TRUE(std::equal(sums.begin(), sums.end(), first_sum))
          << "sums differ in rows [" << step.finalise_begin << ", " << step.finalise_end << ")";
      ASSERT_TRUE(std::equal(weights.begin(), weights.end(), first_weight))
          << "weights differ in rows [" << step.finalise_begin << ", " << step.finalise_end << ")";
      const std::int64_t zero_weight =
          band.finalise(step.finalise_begin, step.finalise_end,
                        pixels.data() + step.finalise_begin * image.width * 3, image.width * 3);
      EXPECT_EQ(zero_weight, 0);
    }
    ASSERT_EQ(steps.back().finalise_end, image.height);
    EXPECT_EQ(pixels, reference.pixels);
  }
}

const ImageCase kImages[] = {
    {101, 77, {32, 4, 7}}, {1, 1, {32, 4, 7}},    {33, 32, {32, 4, 7}},
    {200, 5, {32, 4, 7}},  {97, 130, {16, 2, 0}}, {493, 730, {256, 20, 20}},
};

INSTANTIATE_TEST_SUITE_P(Images, RenderMatchesReference,
                         ::testing::Combine(::testing::ValuesIn(kImages),
                                            ::testing::Values(BlendMode::Uniform, BlendMode::Linear,
                                                              BlendMode::Cosine),
                                            ::testing::Values(DType::F32, DType::F16)),
                         [](const auto& info) {
                           return case_name(std::get<0>(info.param), std::get<1>(info.param),
                                            std::get<2>(info.param));
                         });

// One patch filled with `value` at the origin, uniform blend, so the finalised level is exactly
// the contract's function of `value`.
int finalised_level(float value) {
  BandAccumulator band(4, 4, 4, 0, BlendMode::Uniform);
  const std::vector<float> patch(3 * 4 * 4, value);
  const std::int64_t origin = 0;
  band.add(patch.data(), DType::F32, 1, &origin, &origin, 4);
  std::vector<std::uint8_t> out(4 * 4 * 3);
  EXPECT_EQ(band.finalise(0, 4, out.data(), 4 * 3), 0);
  for (std::uint8_t level : out) EXPECT_EQ(level, out[0]);
  return out[0];
}

TEST(BandAccumulator, RoundingContract) {
  EXPECT_EQ(finalised_level(-1.0f), 0);
  EXPECT_EQ(finalised_level(1.0f), 255);
  EXPECT_EQ(finalised_level(0.0f), 128);  // 127.5 rounds half up
  EXPECT_EQ(finalised_level(-2.0f), 0);
  EXPECT_EQ(finalised_level(3.0f), 255);
  EXPECT_EQ(finalised_level(0.5f), 191);  // 191.25 + 0.5 -> 191
}

TEST(BandAccumulator, CountsAndBlackensPixelsNoPatchCovered) {
  BandAccumulator band(10, 6, 4, 1, BlendMode::Linear);
  const std::vector<float> patch(3 * 4 * 4, 0.25f);
  const std::int64_t y = 1;
  const std::int64_t x = 3;
  band.add(patch.data(), DType::F32, 1, &y, &x, 6);
  std::vector<std::uint8_t> out(6 * 10 * 3, 77);
  EXPECT_EQ(band.finalise(0, 6, out.data(), 10 * 3), 6 * 10 - 4 * 4);
  for (std::int64_t row = 0; row < 6; ++row) {
    for (std::int64_t col = 0; col < 10; ++col) {
      const bool covered = row >= 1 && row < 5 && col >= 3 && col < 7;
      EXPECT_EQ(out[static_cast<std::size_t>((row * 10 + col) * 3)], covered ? 159 : 0)
          << row << "," << col;
    }
  }
}

TEST(BandAccumulator, FinaliseAndDiscardZeroTheRingForReuse) {
  const int patch = 4;
  BandAccumulator band(5, 4, patch, 0, BlendMode::Uniform);
  const std::vector<float> ones(3 * patch * patch, 1.0f);
  const std::vector<float> minus_ones(3 * patch * patch, -1.0f);
  const std::int64_t x = 0;
  const std::int64_t first = 0;
  band.add(ones.data(), DType::F32, 1, &first, &x, 100);
  band.discard(0, 2);
  std::vector<float> sums(4 * 5 * 3);
  std::vector<float> weights(4 * 5);
  band.read_rows(0, 4, sums.data(), weights.data());
  for (std::int64_t col = 0; col < 5; ++col) {
    EXPECT_EQ(weights[static_cast<std::size_t>(col)], 0.0f);  // discarded row 0
    EXPECT_EQ(weights[static_cast<std::size_t>(2 * 5 + col)], col < 4 ? 1.0f : 0.0f);  // kept row 2
  }
  std::vector<std::uint8_t> out(2 * 5 * 3);
  EXPECT_EQ(band.finalise(2, 4, out.data(), 5 * 3), 2);  // column 4 was never covered
  EXPECT_EQ(out[0], 255);

  // Rows 4..7 reuse ring rows 0..3: only the new patch may show up there.
  const std::int64_t second = 4;
  band.add(minus_ones.data(), DType::F32, 1, &second, &x, 100);
  band.read_rows(4, 8, sums.data(), weights.data());
  for (std::int64_t row = 0; row < 4; ++row) {
    for (std::int64_t col = 0; col < 4; ++col) {
      EXPECT_EQ(weights[static_cast<std::size_t>(row * 5 + col)], 1.0f);
      EXPECT_EQ(sums[static_cast<std::size_t>((row * 5 + col) * 3)], -1.0f);
    }
  }
}

TEST(BandAccumulator, RefusesToWrapOntoRowsNotYetFinalised) {
  const int patch = 4;
  BandAccumulator band(3, 4, patch, 0, BlendMode::Uniform);
  const std::vector<float> ones(3 * patch * patch, 1.0f);
  const std::int64_t x = 0;
  const std::int64_t first = 0;
  const std::int64_t second = 4;  // rows 4..7 share the ring with the live rows 0..3
  band.add(ones.data(), DType::F32, 1, &first, &x, 100);
  EXPECT_THROW(band.add(ones.data(), DType::F32, 1, &second, &x, 100), std::logic_error);
  std::vector<std::uint8_t> out(4 * 3 * 3);
  EXPECT_THROW(band.finalise(4, 8, out.data(), 3 * 3), std::logic_error);
  EXPECT_THROW(band.discard(5, 6), std::logic_error);

  // The refused calls changed nothing: rows 0..3 still hold exactly the first patch.
  EXPECT_EQ(band.finalise(0, 4, out.data(), 3 * 3), 0);
  for (std::uint8_t level : out) EXPECT_EQ(level, 255);
  band.add(ones.data(), DType::F32, 1, &second, &x, 100);
  std::vector<float> sums(4 * 3 * 3);
  std::vector<float> weights(4 * 3);
  band.read_rows(4, 8, sums.data(), weights.data());
  for (float weight : weights) EXPECT_EQ(weight, 1.0f);
}

TEST(BandAccumulator, WritesThroughAStrideWiderThanARow) {
  BandAccumulator band(3, 2, 2, 0, BlendMode::Uniform);
  const std::vector<float> patch(3 * 2 * 2, 1.0f);
  const std::int64_t zero = 0;
  band.add(patch.data(), DType::F32, 1, &zero, &zero, 2);
  std::vector<std::uint8_t> canvas(2 * 16, 9);
  EXPECT_EQ(band.finalise(0, 2, canvas.data(), 16), 2);
  EXPECT_EQ(canvas[0], 255);
  EXPECT_EQ(canvas[16], 255);
  EXPECT_EQ(canvas[9], 9) << "wrote past the row's width * 3 bytes";
}

TEST(BandAccumulator, RejectsBadArguments) {
  EXPECT_THROW(BandAccumulator(0, 256, 256, 20, BlendMode::Uniform), std::invalid_argument);
  EXPECT_THROW(BandAccumulator(100, 255, 256, 20, BlendMode::Uniform), std::invalid_argument);
  EXPECT_THROW(BandAccumulator(100, 256, 256, 256, BlendMode::Uniform), std::invalid_argument);

  BandAccumulator band(8, 6, 4, 1, BlendMode::Uniform);
  EXPECT_THROW(band.set_num_threads(-1), std::invalid_argument);
  const std::vector<float> patches(2 * 3 * 4 * 4, 0.0f);
  const std::int64_t ys[] = {0, 4};  // rows [0, 8): wider than the 6-row ring
  const std::int64_t xs[] = {0, 0};
  EXPECT_THROW(band.add(patches.data(), DType::F32, 2, ys, xs, 100), std::invalid_argument);
  EXPECT_THROW(band.add(patches.data(), DType::F32, 1, ys, xs, 0), std::invalid_argument);
  std::vector<std::uint8_t> out(7 * 8 * 3);
  EXPECT_THROW(band.finalise(0, 7, out.data(), 8 * 3), std::invalid_argument);
  EXPECT_THROW(band.finalise(3, 2, out.data(), 8 * 3), std::invalid_argument);
  EXPECT_THROW(band.finalise(-1, 2, out.data(), 8 * 3), std::invalid_argument);
  EXPECT_THROW(band.finalise(0, 2, out.data(), 8 * 3 - 1), std::invalid_argument);
  EXPECT_THROW(band.discard(0, 7), std::invalid_argument);
  EXPECT_EQ(band.finalise(2, 2, nullptr, 0), 0);  // an empty range is a no-op
}

TEST(BandAccumulator, ParsesDtypeNames) {
  EXPECT_EQ(parse_dtype("float32"), DType::F32);
  EXPECT_EQ(parse_dtype("float16"), DType::F16);
  EXPECT_THROW(parse_dtype("float64"), std::invalid_argument);
}

}  // namespace
}  // namespace safron
