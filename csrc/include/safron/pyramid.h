#pragma once

// The 2x2 reduction that builds each level of the output TIFF's pyramid from the one above it.
//
// Each output pixel is the mean of the 2x2 block of input pixels it covers, per channel, rounded to
// nearest with halves rounded up: (a + b + c + d + 2) >> 2. An odd last row (column) is treated as if
// repeated, which gives exactly the mean over the pixels that exist ((2a + 2b + 2) >> 2 == (a + b + 1) >> 1),
// so a level of h x w pixels reduces to ceil(h/2) x ceil(w/2) with no separate edge formula.

#include <cstdint>

namespace safron {

// `in`: height x width pixels of 3 uint8 channels, rows `in_stride` bytes apart; `out`: ceil(height/2) x
// ceil(width/2) pixels, rows `out_stride` bytes apart. Throws std::invalid_argument for empty sizes or strides
// shorter than a row.
void halve_rgb(const std::uint8_t* in, std::int64_t height, std::int64_t width, std::int64_t in_stride,
               std::uint8_t* out, std::int64_t out_stride);

}  // namespace safron
