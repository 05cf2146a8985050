#pragma once

// Blend windows: the weight each patch pixel gets when overlapping patches are averaged.
//
// The 1-D ramp r(t), t in [0, patch), is 1 for `uniform` (the paper's plain average). For `linear`
// and `cosine`, with d = min(t, patch - 1 - t) the distance to the nearer patch edge, r is 1 when
// d >= overlap and otherwise (d + 0.5) / overlap, or 0.5 - 0.5 * cos(pi * (d + 0.5) / overlap):
// confined to the overlap and strictly positive, so every covered pixel has a positive weight.
// The 2-D window is w(ty, tx) = r(ty) * r(tx). overlap == 0 gives all ones.
//
// The ramps are applied on all four sides of every patch, even on a side that lies on the image
// border where no neighbour overlaps it. That is harmless: each output pixel is divided by the sum
// of the weights it received, so the weight of a pixel covered by a single patch cancels out.

#include <string_view>
#include <vector>

namespace safron {

enum class BlendMode { Uniform, Linear, Cosine };

// "uniform" | "linear" | "cosine"; anything else throws std::invalid_argument listing those.
BlendMode parse_blend_mode(std::string_view name);
std::string_view blend_mode_name(BlendMode mode);
std::vector<std::string_view> blend_mode_names();

// The 1-D ramp r(0..patch-1). Throws std::invalid_argument for an invalid patch/overlap pair.
std::vector<float> blend_ramp(BlendMode mode, int patch, int overlap);

}  // namespace safron
