#include "safron/grid.h"

#include <algorithm>
#include <stdexcept>

#include "safron/errors.h"

namespace safron {

namespace {
bool valid_patch_overlap(int patch, int overlap) {
  return patch >= 1 && patch <= kMaxPatchSide && overlap >= 0 && overlap < patch;
}
}  // namespace

void validate_patch_overlap(int patch, int overlap) {
  require(valid_patch_overlap(patch, overlap), "invalid patch geometry: patch=", patch,
          ", overlap=", overlap, " (need 1 <= patch <= ", kMaxPatchSide,
          " and 0 <= overlap < patch)");
}

void PatchGeometry::validate() const {
  require(valid_patch_overlap(patch, overlap) && margin >= 0 && margin <= kMaxPatchSide,
          "invalid patch geometry: patch=", patch, ", margin=", margin, ", overlap=", overlap,
          " (need 1 <= patch <= ", kMaxPatchSide, ", 0 <= margin <= ", kMaxPatchSide,
          " and 0 <= overlap < patch)");
}

std::vector<std::int64_t> axis_positions(std::int64_t length, const PatchGeometry& geometry) {
  geometry.validate();
  require(length >= 1, "image side must be >= 1 pixel, got ", length);
  if (length <= geometry.patch) return {0};
  const std::int64_t stride = geometry.stride();
  const std::int64_t span = length - geometry.patch;  // travel of the top-left corner
  const std::int64_t steps = (span + stride - 1) / stride;
  std::vector<std::int64_t> positions(static_cast<std::size_t>(steps + 1));
  // round(i * span / steps) rounding half up, in exact integer arithmetic so that any code that
  // re-derives the grid agrees to the pixel. span = whole * steps + rest keeps the products below
  // 2 * steps^2, far from overflow for any plan whose positions fit in memory.
  const std::int64_t whole = span / steps;
  const std::int64_t rest = span % steps;
  for (std::int64_t i = 0; i <= steps; ++i) {
    positions[static_cast<std::size_t>(i)] = i * whole + (2 * i * rest + steps) / (2 * steps);
  }
  return positions;
}

PatchPlan::PatchPlan(std::int64_t height, std::int64_t width, PatchGeometry geometry)
    : geometry_(geometry),
      height_(height),
      width_(width),
      ys_(axis_positions(height, geometry)),
      xs_(axis_positions(width, geometry)) {}

PatchPlan make_plan(std::int64_t height, std::int64_t width, PatchGeometry geometry) {
  require(height >= 1 && width >= 1, "image must be at least 1x1 pixels, got height=", height,
          ", width=", width);
  return PatchPlan(height, width, geometry);
}

PatchOrigin PatchPlan::origin(std::int64_t k) const {
  if (k < 0 || k >= count()) {
    throw std::out_of_range(concat("patch index ", k, " outside [0, ", count(), ")"));
  }
  return {ys_[static_cast<std::size_t>(k / cols())], xs_[static_cast<std::size_t>(k % cols())]};
}

std::int64_t PatchPlan::final_rows_end(std::int64_t patch_row) const {
  if (patch_row < 0 || patch_row >= rows()) {
    throw std::out_of_range(concat("patch row ", patch_row, " outside [0, ", rows(), ")"));
  }
  if (patch_row + 1 == rows()) return height_;
  return ys_[static_cast<std::size_t>(patch_row + 1)];
}

std::int64_t PatchPlan::first_row_touching(std::int64_t y) const {
  if (y < 0 || y >= height_) {
    throw std::out_of_range(concat("output row ", y, " outside [0, ", height_, ")"));
  }
  // ys is sorted, so ys[i] + patch > y first holds at the first ys[i] > y - patch.
  const auto first = std::upper_bound(ys_.begin(), ys_.end(), y - geometry_.patch);
  return first - ys_.begin();
}

}  // namespace safron
