#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "safron/grid.h"

namespace safron {
namespace {

const std::vector<std::int64_t> kSizes = {1, 2, 20, 255, 256, 257, 491, 492, 493, 728, 1000, 10007};

const std::vector<PatchGeometry> kGeometries = {
    {256, 20, 20},              // the paper's
    {32, 4, 7},    {64, 0, 0},  // no overlap
    {100, 10, 99},              // stride 1
    {1, 0, 0},     {255, 31, 128},
};

std::string describe(std::int64_t length, const PatchGeometry& g) {
  return "length=" + std::to_string(length) + " patch=" + std::to_string(g.patch) +
         " margin=" + std::to_string(g.margin) + " overlap=" + std::to_string(g.overlap);
}

// Checks one axis against the rules of grid.h, computing the expectations from first principles.
void expect_valid_axis(const std::vector<std::int64_t>& positions, std::int64_t length,
                       const PatchGeometry& g) {
  SCOPED_TRACE(describe(length, g));
  ASSERT_FALSE(positions.empty());
  EXPECT_EQ(positions.front(), 0);
  if (length <= g.patch) {
    EXPECT_EQ(positions, std::vector<std::int64_t>{0});
    return;
  }
  const std::int64_t stride = g.patch - g.overlap;
  const std::int64_t span = length - g.patch;
  const std::int64_t expected_count = (span + stride - 1) / stride + 1;
  ASSERT_EQ(static_cast<std::int64_t>(positions.size()), expected_count);
  EXPECT_EQ(positions.back(), span) << "the last patch must end at the border";
  std::int64_t min_step = stride;
  std::int64_t max_step = 0;
  for (std::size_t i = 1; i < positions.size(); ++i) {
    const std::int64_t step = positions[i] - positions[i - 1];
    EXPECT_GT(step, 0) << "positions must be strictly increasing";
    EXPECT_LE(step, stride) << "a step wider than the stride";
    min_step = std::min(min_step, step);
    max_step = std::max(max_step, step);
    // The definition, evaluated in floating point (exact at these sizes): i * span / (n - 1)
    // rounded half up.
    const double exact = static_cast<double>(i) * static_cast<double>(span) /
                         static_cast<double>(expected_count - 1);
    EXPECT_EQ(positions[i], static_cast<std::int64_t>(std::floor(exact + 0.5))) << "i=" << i;
  }
  if (positions.size() > 1) {
    EXPECT_LE(max_step - min_step, 1) << "steps are not evenly spread";
    // The promise grid.h makes about the carried band: no overlap beyond the nominal one plus
    // ceil(stride / (n - 1)).
    const std::int64_t gaps = expected_count - 1;
    EXPECT_LE(g.patch - min_step, g.overlap + (stride + gaps - 1) / gaps);
  }
  std::vector<int> coverage(static_cast<std::size_t>(length), 0);
  for (std::int64_t start : positions) {
    ASSERT_GE(start, 0);
    ASSERT_LE(start + g.patch, length) << "a patch runs past the end although length > patch";
    for (std::int64_t p = start; p < start + g.patch; ++p) ++coverage[static_cast<std::size_t>(p)];
  }
  for (std::int64_t p = 0; p < length; ++p) {
    ASSERT_GE(coverage[static_cast<std::size_t>(p)], 1) << "pixel " << p << " is not covered";
  }
}

TEST(Grid, AxisPositionsAreEvenlySpreadAndCoverEveryPixel) {
  for (const PatchGeometry& g : kGeometries) {
    for (std::int64_t length : kSizes) expect_valid_axis(axis_positions(length, g), length, g);
  }
}

TEST(Grid, PaperTileSizesGiveThePaperGrids) {
  const PatchGeometry paper;
  EXPECT_EQ(paper.window(), 296);
  EXPECT_EQ(paper.stride(), 236);
  EXPECT_EQ(axis_positions(728, paper), (std::vector<std::int64_t>{0, 236, 472}));
  EXPECT_EQ(axis_positions(492, paper), (std::vector<std::int64_t>{0, 236}));
  EXPECT_EQ(axis_positions(257, paper), (std::vector<std::int64_t>{0, 1}));
  EXPECT_EQ(axis_positions(256, paper), (std::vector<std::int64_t>{0}));
  // One pixel more than two strides: three equal-ish steps of 158 or 157 instead of 236, 236, 1.
  EXPECT_EQ(axis_positions(729, paper), (std::vector<std::int64_t>{0, 158, 315, 473}));
}

TEST(Grid, PlanUsesTheAxisPositionsOnBothAxesInRasterOrder) {
  for (const PatchGeometry& g : kGeometries) {
    for (std::int64_t height : {std::int64_t{1}, std::int64_t{493}, std::int64_t{1000}}) {
      for (std::int64_t width : kSizes) {
        const PatchPlan plan = make_plan(height, width, g);
        expect_valid_axis(plan.ys(), height, g);
        expect_valid_axis(plan.xs(), width, g);
        ASSERT_EQ(plan.count(), plan.rows() * plan.cols());
        for (std::int64_t k = 0; k < plan.count();
             k += std::max<std::int64_t>(1, plan.count() / 97)) {
          const PatchOrigin origin = plan.origin(k);
          EXPECT_EQ(origin.y, plan.ys()[static_cast<std::size_t>(k / plan.cols())]);
          EXPECT_EQ(origin.x, plan.xs()[static_cast<std::size_t>(k % plan.cols())]);
        }
        EXPECT_EQ(plan.origin(plan.count() - 1).y, plan.ys().back());
        EXPECT_EQ(plan.origin(plan.count() - 1).x, plan.xs().back());
      }
    }
  }
}

TEST(Grid, FinalRowsEndIsMonotoneEndsAtHeightAndNoLaterPatchTouchesFinalRows) {
  for (const PatchGeometry& g : kGeometries) {
    for (std::int64_t height : kSizes) {
      SCOPED_TRACE(describe(height, g));
      const PatchPlan plan = make_plan(height, 7, g);
      expect_valid_axis(plan.ys(), height, g);  // sorted, which the checks below rely on
      std::int64_t previous = 0;
      for (std::int64_t i = 0; i < plan.rows(); ++i) {
        const std::int64_t end = plan.final_rows_end(i);
        EXPECT_GT(end, previous);
        EXPECT_LE(end, height);
        // The next patch row, and so (ys being sorted) every later one, starts at or after `end`,
        // and starts exactly there: final rows are neither premature nor held back.
        if (i + 1 < plan.rows()) {
          EXPECT_EQ(plan.ys()[static_cast<std::size_t>(i + 1)], end);
        }
        previous = end;
      }
      EXPECT_EQ(plan.final_rows_end(plan.rows() - 1), height);
    }
  }
}

TEST(Grid, FirstRowTouchingIsTheFirstPatchRowContainingTheOutputRow) {
  for (const PatchGeometry& g : kGeometries) {
    for (std::int64_t height : kSizes) {
      SCOPED_TRACE(describe(height, g));
      const PatchPlan plan = make_plan(height, 3, g);
      for (std::int64_t y = 0; y < height; ++y) {
        std::int64_t expected = -1;  // brute force: first patch row whose rows contain y
        for (std::int64_t i = 0; i < plan.rows() && expected < 0; ++i) {
          const std::int64_t top = plan.ys()[static_cast<std::size_t>(i)];
          if (top <= y && y < top + g.patch) expected = i;
        }
        ASSERT_EQ(plan.first_row_touching(y), expected) << "y=" << y;
      }
      // Resuming after the rows final at patch row i needs at most patch row i + 1 onwards.
      for (std::int64_t i = 0; i + 1 < plan.rows(); ++i) {
        EXPECT_LE(plan.first_row_touching(plan.final_rows_end(i)), i + 1);
      }
    }
  }
}

TEST(Grid, RejectsInvalidGeometryAndSizes) {
  EXPECT_THROW(make_plan(0, 10, PatchGeometry{}), std::invalid_argument);
  EXPECT_THROW(make_plan(10, -1, PatchGeometry{}), std::invalid_argument);
  EXPECT_THROW(axis_positions(0, PatchGeometry{}), std::invalid_argument);
  for (const PatchGeometry& bad :
       {PatchGeometry{0, 20, 0}, PatchGeometry{256, -1, 20}, PatchGeometry{256, 20, 256},
        PatchGeometry{256, 20, -1}, PatchGeometry{kMaxPatchSide + 1, 0, 0}}) {
    try {
      bad.validate();
      ADD_FAILURE() << "accepted patch=" << bad.patch << " margin=" << bad.margin
                    << " overlap=" << bad.overlap;
    } catch (const std::invalid_argument& error) {
      const std::string message = error.what();
      for (const std::string& named :
           {"patch=" + std::to_string(bad.patch), "margin=" + std::to_string(bad.margin),
            "overlap=" + std::to_string(bad.overlap)}) {
        EXPECT_NE(message.find(named), std::string::npos) << message;
      }
    }
  }
}

TEST(Grid, IndexQueriesRejectOutOfRangeIndices) {
  const PatchPlan plan = make_plan(500, 300, PatchGeometry{});
  EXPECT_THROW(plan.origin(-1), std::out_of_range);
  EXPECT_THROW(plan.origin(plan.count()), std::out_of_range);
  EXPECT_THROW(plan.final_rows_end(plan.rows()), std::out_of_range);
  EXPECT_THROW(plan.first_row_touching(500), std::out_of_range);
  EXPECT_THROW(plan.first_row_touching(-1), std::out_of_range);
}

}  // namespace
}  // namespace safron
