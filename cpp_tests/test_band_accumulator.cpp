#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <stdexcept>
#include <utility>
#include <string>
#include <tuple>
#include <vector>

#include "safron/accumulate.h"
#include "safron/blend.h"
#include "safron/grid.h"
#include "scenario.h"

#if defined(__linux__)
#include <unistd.h>
#endif

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

struct BlockCase {
  std::int64_t height;
  std::int64_t width;
  testing::BlockOrder order;
};

class BlocksFinalisedEarly : public ::testing::TestWithParam<BlockCase> {};

const char* order_name(testing::BlockOrder order) {
  switch (order) {
    case testing::BlockOrder::Ascending: return "ascending";
    case testing::BlockOrder::Descending: return "descending";
    case testing::BlockOrder::Shuffled: return "shuffled";
    case testing::BlockOrder::Merged: return "merged";
  }
  return "?";
}

// Finalises every column block as soon as no later patch touches it, in several orders within each
// step, so blocks of one ring row are written and reused at different times; the image must equal
// the one-canvas reference exactly, and every written block must read back as zeros.
TEST_P(BlocksFinalisedEarly, ImageEqualsTheReference) {
  const BlockCase& test = GetParam();
  const PatchGeometry geometry{64, 4, 8};
  const PatchPlan plan = make_plan(test.height, test.width, geometry);
  const auto seed = static_cast<std::uint32_t>(test.width + static_cast<int>(test.order));
  const testing::PatchSet patches = testing::random_patches(plan.count(), 64, DType::F32, seed);
  const testing::ReferenceImage reference(plan, patches, blend_ramp(BlendMode::Cosine, 64, 8));
  const auto batches = testing::random_batches(plan.count(), plan.cols() + 3, seed + 1);
  const auto steps = testing::block_schedule(plan, batches, test.order, seed + 2);
  const std::int64_t capacity = testing::required_capacity(plan, steps);
  ASSERT_LT(capacity, test.height) << "the ring never wraps: a weak test";

  BandAccumulator band(test.width, capacity, 64, 8, BlendMode::Cosine);
  band.set_num_threads(2);
  std::vector<std::uint8_t> pixels(static_cast<std::size_t>(test.height * test.width * 3), 7);
  bool blocks_at_different_rows = false;
  for (const testing::BlockStep& step : steps) {
    const testing::PositionLists positions = testing::positions_of(plan, step.batch);
    band.add(patches.input_of(step.batch.begin), DType::F32, step.batch.end - step.batch.begin,
             positions.ys.data(), positions.xs.data(), test.height);
    for (const testing::BlockFinalise& range : step.finalise) {
      std::uint8_t* out = pixels.data() + (range.row_begin * test.width + range.col_begin) * 3;
      ASSERT_EQ(band.finalise(range.row_begin, range.row_end, range.col_begin, range.col_end, out,
                              test.width * 3),
                0);
      blocks_at_different_rows |= range.col_begin > 0 || range.col_end < test.width;
    }
  }
  if (test.width > kBlockCols) {
    EXPECT_TRUE(blocks_at_different_rows) << "every call took the whole width: a weak test";
  }
  EXPECT_EQ(pixels, reference.pixels);

  // Everything is written, so every slot is free and every entry zero again.
  std::vector<float> sums(static_cast<std::size_t>(capacity * test.width * 3), 1.0f);
  std::vector<float> weights(static_cast<std::size_t>(capacity * test.width), 1.0f);
  band.read_rows(test.height, test.height + capacity, sums.data(), weights.data());
  EXPECT_TRUE(std::all_of(sums.begin(), sums.end(), [](float v) { return v == 0.0f; }));
  EXPECT_TRUE(std::all_of(weights.begin(), weights.end(), [](float v) { return v == 0.0f; }));
}

INSTANTIATE_TEST_SUITE_P(
    Widths, BlocksFinalisedEarly,
    ::testing::Values(BlockCase{300, 2500, testing::BlockOrder::Ascending},
                      BlockCase{300, 2500, testing::BlockOrder::Descending},
                      BlockCase{300, 2500, testing::BlockOrder::Shuffled},
                      BlockCase{300, 2500, testing::BlockOrder::Merged},
                      BlockCase{250, 3072, testing::BlockOrder::Shuffled},
                      BlockCase{400, 700, testing::BlockOrder::Ascending}),
    [](const auto& info) {
      return std::to_string(info.param.width) + "_" + order_name(info.param.order);
    });

// Column-range finalise and discard against the full-width forms on the same data.
TEST(BandAccumulator, ColumnRangesEqualTheFullWidthForms) {
  const std::int64_t width = 2500;
  const int patch = 32;
  const PatchPlan plan = make_plan(patch, width, PatchGeometry{patch, 0, 5});
  const testing::PatchSet patches = testing::random_patches(plan.count(), patch, DType::F16, 3);
  const testing::PositionLists positions = testing::positions_of(plan, {0, plan.count()});
  BandAccumulator whole(width, patch, patch, 5, BlendMode::Linear);
  BandAccumulator pieces(width, patch, patch, 5, BlendMode::Linear);
  for (BandAccumulator* band : {&whole, &pieces}) {
    band->add(patches.input_of(0), DType::F16, plan.count(), positions.ys.data(),
              positions.xs.data(), patch);
  }
  // Rows 0 and 1 discarded, so finalising all rows counts them as uncovered.
  std::vector<std::uint8_t> expected(static_cast<std::size_t>(patch * width * 3));
  whole.discard(0, 2);
  EXPECT_EQ(whole.finalise(0, patch, expected.data(), width * 3), 2 * width);

  // The same block by block: the discards out of order, then block 1 and the partial block 2 in one
  // call and block 0 last, each through its own buffer with a row stride of its own width.
  pieces.discard(0, 2, 1024, 2048);
  pieces.discard(0, 2, 0, 1024);
  pieces.discard(0, 2, 2048, width);
  const std::int64_t right = width - 1024;
  std::vector<std::uint8_t> right_part(static_cast<std::size_t>(patch * right * 3));
  std::vector<std::uint8_t> left_part(static_cast<std::size_t>(patch * 1024 * 3));
  EXPECT_EQ(pieces.finalise(0, patch, 1024, width, right_part.data(), right * 3), 2 * right);
  EXPECT_EQ(pieces.finalise(0, patch, 0, 1024, left_part.data(), 1024 * 3), 2 * 1024);
  std::vector<std::uint8_t> actual(expected.size(), 0);
  for (std::int64_t row = 0; row < patch; ++row) {
    std::copy_n(left_part.begin() + row * 1024 * 3, 1024 * 3, actual.begin() + row * width * 3);
    std::copy_n(right_part.begin() + row * right * 3, right * 3,
                actual.begin() + row * width * 3 + 1024 * 3);
  }
  EXPECT_EQ(actual, expected);
}

TEST(BandAccumulator, RejectsColumnRangesThatAreNotWholeBlocks) {
  const std::int64_t width = 2500;
  BandAccumulator band(width, 4, 4, 0, BlendMode::Uniform);
  std::vector<std::uint8_t> out(4 * width * 3);
  for (const auto& [begin, end] : std::vector<std::pair<std::int64_t, std::int64_t>>{
           {1, 1024}, {0, 1000}, {1024, 2047}, {0, width + 1}, {-1024, 0}, {2048, 1024}}) {
    SCOPED_TRACE(std::to_string(begin) + ", " + std::to_string(end));
    EXPECT_THROW(band.finalise(0, 4, begin, end, out.data(), width * 3), std::invalid_argument);
    EXPECT_THROW(band.discard(0, 4, begin, end), std::invalid_argument);
  }
  // The output stride only needs to hold the range's columns.
  EXPECT_THROW(band.finalise(0, 4, 2048, width, out.data(), (width - 2048) * 3 - 1),
               std::invalid_argument);
  EXPECT_EQ(band.finalise(0, 4, 2048, width, out.data(), (width - 2048) * 3), 4 * (width - 2048));
  EXPECT_EQ(band.finalise(0, 4, 1024, 1024, nullptr, 0), 0);  // no columns: a no-op
}

// Slots are per (ring row, column block): a block finalised early may be reused while another
// block of the same ring rows still holds data, and only that one refuses to wrap.
TEST(BandAccumulator, TracksRingSlotsPerColumnBlock) {
  const int patch = 4;
  const std::int64_t width = 2500;
  BandAccumulator band(width, patch, patch, 0, BlendMode::Uniform);
  const std::vector<float> ones(2 * 3 * patch * patch, 1.0f);
  std::vector<std::uint8_t> out(patch * width * 3);
  const std::int64_t top[] = {0, 0};
  const std::int64_t first_xs[] = {0, 1024};  // blocks 0 and 1
  band.add(ones.data(), DType::F32, 2, top, first_xs, 100);
  band.finalise(0, patch, 0, 1024, out.data(), width * 3);

  const std::int64_t next[] = {4, 4};
  const std::int64_t in_block0 = 8;
  const std::int64_t in_block1 = 1030;
  const std::int64_t across_blocks_0_and_1 = 1022;
  const std::int64_t in_block2 = 2400;
  EXPECT_THROW(band.add(ones.data(), DType::F32, 1, next, &in_block1, 100), std::logic_error);
  EXPECT_THROW(band.add(ones.data(), DType::F32, 1, next, &across_blocks_0_and_1, 100),
               std::logic_error);
  // One patch of a batch conflicting refuses the whole batch: block 0 stays free.
  const std::int64_t mixed_xs[] = {in_block0, in_block1};
  EXPECT_THROW(band.add(ones.data(), DType::F32, 2, next, mixed_xs, 100), std::logic_error);
  EXPECT_THROW(band.finalise(4, 8, 1024, 2048, out.data(), width * 3), std::logic_error);
  EXPECT_THROW(band.discard(4, 5, 0, width), std::logic_error);
  EXPECT_THROW(band.read_rows(4, 5, nullptr, nullptr), std::logic_error);

  // Block 0 (finalised) and block 2 (never touched) take rows 4..7 while block 1 holds rows 0..3.
  const std::int64_t free_xs[] = {in_block0, in_block2};
  band.add(ones.data(), DType::F32, 2, next, free_xs, 100);
  EXPECT_THROW(band.finalise(0, patch, 0, width, out.data(), width * 3), std::logic_error)
      << "rows 0..3 of blocks 0 and 2 now belong to rows 4..7";
  EXPECT_EQ(band.finalise(0, patch, 1024, 2048, out.data(), width * 3), patch * (1024 - patch));
  for (std::int64_t col = 0; col < 1024; ++col) {
    EXPECT_EQ(out[static_cast<std::size_t>(col * 3)], col < patch ? 255 : 0) << col;
  }

  // Rows 4..7 hold exactly the two accepted patches: the refused batches added nothing.
  std::vector<float> sums(static_cast<std::size_t>(patch * width * 3));
  std::vector<float> weights(static_cast<std::size_t>(patch * width));
  band.read_rows(4, 8, sums.data(), weights.data());
  for (std::int64_t col = 0; col < width; ++col) {
    const bool covered = (col >= in_block0 && col < in_block0 + patch) ||
                         (col >= in_block2 && col < in_block2 + patch);
    for (std::int64_t row = 0; row < patch; ++row) {
      ASSERT_EQ(weights[static_cast<std::size_t>(row * width + col)], covered ? 1.0f : 0.0f)
          << row << ", " << col;
    }
  }
  band.discard(4, 8);
}

#if defined(__linux__)
std::int64_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::int64_t size_pages = 0;
  std::int64_t resident_pages = 0;
  statm >> size_pages >> resident_pages;
  return resident_pages * sysconf(_SC_PAGESIZE);
}
#endif

// The point of the block layout: finalised blocks give their memory back, so resident memory
// follows the live blocks, not the width, and released pages come back as zeros when reused.
TEST(BandAccumulator, FinalisedBlocksReturnTheirPages) {
#if !defined(__linux__)
  GTEST_SKIP() << "pages are released only on Linux";
#else
  const int patch = 64;
  const std::int64_t width = 64 * kBlockCols;
  const std::int64_t live_bytes = patch * width * (3 + 1) * sizeof(float);  // 64 MiB
  BandAccumulator band(width, patch, patch, 0, BlendMode::Uniform);
  band.set_num_threads(1);  // no thread stacks in the measurement
  const std::vector<float> halves(3 * patch * patch, 0.5f);
  std::vector<std::uint8_t> out(static_cast<std::size_t>(patch * width * 3), 1);
  std::vector<float> weights(static_cast<std::size_t>(patch * width), 1.0f);
  std::vector<float> sums(static_cast<std::size_t>(patch * width * 3), 1.0f);
  const auto add_row_of_patches = [&](std::int64_t y) {
    for (std::int64_t x = 0; x < width; x += patch) {
      band.add(halves.data(), DType::F32, 1, &y, &x, 2 * patch);
    }
  };

  const std::int64_t before = resident_bytes();
  add_row_of_patches(0);
  const std::int64_t after_add = resident_bytes();
  EXPECT_GE(after_add - before, live_bytes * 9 / 10);
  EXPECT_LE(after_add - before, live_bytes * 11 / 10);

  band.finalise(0, patch, 0, width / 2, out.data(), width * 3);
  const std::int64_t after_left_half = resident_bytes();
  EXPECT_LE(after_left_half - before, live_bytes * 6 / 10) << "the left half was not released";
  EXPECT_GE(after_left_half - before, live_bytes * 4 / 10) << "the right half was released too";

  band.finalise(0, patch, width / 2, width, out.data() + width / 2 * 3, width * 3);
  EXPECT_LE(resident_bytes() - before, live_bytes / 10);
  EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](std::uint8_t v) { return v == 191; }));

  // The ring wraps onto the released pages: they must hold nothing of the first row of patches.
  add_row_of_patches(patch);
  band.read_rows(patch, 2 * patch, sums.data(), weights.data());
  EXPECT_TRUE(std::all_of(weights.begin(), weights.end(), [](float w) { return w == 1.0f; }));
  EXPECT_TRUE(std::all_of(sums.begin(), sums.end(), [](float v) { return v == 0.5f; }));
#endif
}

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
