#include "safron/blend.h"

#include "../ops/accumulate_impl.h"
#include "safron/errors.h"
#include "safron/grid.h"

namespace safron {

namespace {
constexpr BlendMode kModes[] = {BlendMode::Uniform, BlendMode::Linear, BlendMode::Cosine};
}

std::string_view blend_mode_name(BlendMode mode) {
  switch (mode) {
    case BlendMode::Uniform:
      return "uniform";
    case BlendMode::Linear:
      return "linear";
    case BlendMode::Cosine:
      return "cosine";
  }
  throw std::invalid_argument("unknown BlendMode value");
}

std::vector<std::string_view> blend_mode_names() {
  std::vector<std::string_view> names;
  for (BlendMode mode : kModes) names.push_back(blend_mode_name(mode));
  return names;
}

BlendMode parse_blend_mode(std::string_view name) {
  for (BlendMode mode : kModes) {
    if (blend_mode_name(mode) == name) return mode;
  }
  throw std::invalid_argument(
      concat("unknown blend mode '", name, "'; valid modes: uniform, linear, cosine"));
}

std::vector<float> blend_ramp(BlendMode mode, int patch, int overlap) {
  validate_patch_overlap(patch, overlap);
  std::vector<float> ramp(static_cast<std::size_t>(patch));
  for (int t = 0; t < patch; ++t) {
    ramp[static_cast<std::size_t>(t)] = detail::blend_ramp_value(mode, t, patch, overlap);
  }
  return ramp;
}

}  // namespace safron
