#include "safron/pyramid.h"

#include "safron/errors.h"

namespace safron {

namespace {
constexpr int kChannels = 3;
}

void halve_rgb(const std::uint8_t* in, std::int64_t height, std::int64_t width, std::int64_t in_stride,
               std::uint8_t* out, std::int64_t out_stride) {
  require(height > 0 && width > 0, "halve_rgb: empty image ", height, " x ", width);
  const std::int64_t out_width = (width + 1) / 2;
  require(in_stride >= width * kChannels && out_stride >= out_width * kChannels, "halve_rgb: row strides ",
          in_stride, " / ", out_stride, " shorter than the rows");
  const std::int64_t out_height = (height + 1) / 2;
  // Whole pairs of columns in the loop the compiler vectorises; the odd last column after it.
  const std::int64_t pairs = width / 2;
  for (std::int64_t y = 0; y < out_height; ++y) {
    const std::uint8_t* top = in + 2 * y * in_stride;
    const std::uint8_t* bottom = 2 * y + 1 < height ? top + in_stride : top;
    std::uint8_t* row = out + y * out_stride;
    for (std::int64_t x = 0; x < pairs; ++x) {
      const std::uint8_t* t = top + 2 * x * kChannels;
      const std::uint8_t* b = bottom + 2 * x * kChannels;
      for (int c = 0; c < kChannels; ++c) {
        const unsigned sum = 2u + t[c] + t[c + kChannels] + b[c] + b[c + kChannels];
        row[x * kChannels + c] = static_cast<std::uint8_t>(sum >> 2);
      }
    }
    if (width % 2) {
      const std::uint8_t* t = top + (width - 1) * kChannels;
      const std::uint8_t* b = bottom + (width - 1) * kChannels;
      for (int c = 0; c < kChannels; ++c) {
        row[pairs * kChannels + c] = static_cast<std::uint8_t>((1u + t[c] + b[c]) >> 1);
      }
    }
  }
}

}  // namespace safron
