#pragma once

// The patch plan: the one definition of the patch geometry (margin, stride, evenly spread grid)
// that training, inference and the accumulator all follow.
//
// Output pixel (y, x) of the image is pixel (y - ys[i], x - xs[j]) of patch (i, j); the generator
// sees the mask window of rows [ys[i] - margin, ys[i] + patch + margin) and the same for columns.
// Every output pixel is covered by at least one patch, for every height and width >= 1.

#include <cstdint>
#include <vector>

namespace safron {

// Throws std::invalid_argument unless 1 <= patch <= kMaxPatchSide and 0 <= overlap < patch.
void validate_patch_overlap(int patch, int overlap);

// Keeps window() and offset arithmetic far from int overflow (real patches are a few hundred).
inline constexpr int kMaxPatchSide = 1 << 16;

struct PatchGeometry {
  int patch = 256;   // side of the generated output patch
  int margin = 20;   // extra mask context on each side of the patch
  int overlap = 20;  // pixels shared by adjacent patches

  int window() const { return patch + 2 * margin; }  // side of the mask window fed to the model
  int stride() const { return patch - overlap; }

  // Throws std::invalid_argument naming the values unless patch >= 1, 0 <= margin <= kMaxPatchSide
  // and 0 <= overlap < patch.
  void validate() const;
};

// Top (or left) coordinates of the patches along an axis of `length` >= 1 pixels, sorted and
// distinct. A length <= patch gives {0}: that single patch extends past the end and the pixels
// beyond `length` are cropped. Otherwise there are n = ceil((length - patch) / stride()) + 1
// patches spread evenly from 0 to length - patch:
//     p_i = round(i * (length - patch) / (n - 1)), rounding half up, in exact integers,
// so every step is at most stride() (every overlap at least the nominal one) and steps differ by at
// most 1. When stride() divides length - patch the steps are exactly stride() (728 -> {0, 236, 472}
// with the default geometry).
//
// Why spread rather than step by stride() and shift the last patch back to the border: that
// ragged last patch overlaps its neighbour by up to patch - 1 pixels, and the overlapping rows of a
// band must stay in fp32 across the whole width until the last patch row is added, so the carried
// band would grow to a full patch height at some sizes. Spread, every overlap stays within
// overlap + ceil(stride() / (n - 1)), the carried band stays about `overlap` rows tall whatever
// the size, and seams look the same everywhere in the image.
std::vector<std::int64_t> axis_positions(std::int64_t length, const PatchGeometry& geometry);

struct PatchOrigin {
  std::int64_t y;
  std::int64_t x;
};

class PatchPlan {
 public:
  const PatchGeometry& geometry() const { return geometry_; }
  std::int64_t height() const { return height_; }
  std::int64_t width() const { return width_; }
  const std::vector<std::int64_t>& ys() const { return ys_; }  // one per patch row
  const std::vector<std::int64_t>& xs() const { return xs_; }  // one per patch column
  std::int64_t rows() const { return static_cast<std::int64_t>(ys_.size()); }
  std::int64_t cols() const { return static_cast<std::int64_t>(xs_.size()); }
  std::int64_t count() const { return rows() * cols(); }

  // Patch index k in raster order is patch row k / cols(), patch column k % cols().
  // Throws std::out_of_range unless 0 <= k < count().
  PatchOrigin origin(std::int64_t k) const;

  // Output rows [0, final_rows_end(i)) receive no contribution from patch rows after i, so they
  // are final once patch rows 0..i are accumulated: ys[i + 1] for i < rows() - 1, height() for the
  // last. Throws std::out_of_range unless 0 <= i < rows().
  std::int64_t final_rows_end(std::int64_t patch_row) const;

  // The smallest patch row whose extent [ys[i], ys[i] + patch) contains output row y: rendering
  // output rows y.. needs patch rows first_row_touching(y).. (used to resume an interrupted
  // render). Throws std::out_of_range unless 0 <= y < height().
  std::int64_t first_row_touching(std::int64_t y) const;

 private:
  friend PatchPlan make_plan(std::int64_t, std::int64_t, PatchGeometry);
  PatchPlan(std::int64_t height, std::int64_t width, PatchGeometry geometry);

  PatchGeometry geometry_;
  std::int64_t height_;
  std::int64_t width_;
  std::vector<std::int64_t> ys_;
  std::vector<std::int64_t> xs_;
};

// Throws std::invalid_argument for height or width < 1 or an invalid geometry.
PatchPlan make_plan(std::int64_t height, std::int64_t width, PatchGeometry geometry);

}  // namespace safron
