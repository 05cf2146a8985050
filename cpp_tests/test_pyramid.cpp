#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <utility>
#include <vector>

#include "safron/pyramid.h"

namespace safron {
namespace {

// Independent reference: the mean over the pixels of each 2x2 block that exist, rounded half up,
// in floating point (no repeated-edge trick).
std::vector<std::uint8_t> reference_halve(const std::vector<std::uint8_t>& image, int height, int width) {
  const int out_height = (height + 1) / 2, out_width = (width + 1) / 2;
  std::vector<std::uint8_t> out(static_cast<std::size_t>(out_height) * out_width * 3);
  for (int y = 0; y < out_height; ++y) {
    for (int x = 0; x < out_width; ++x) {
      for (int c = 0; c < 3; ++c) {
        double sum = 0;
        int count = 0;
        for (int dy = 0; dy < 2; ++dy) {
          for (int dx = 0; dx < 2; ++dx) {
            const int yy = 2 * y + dy, xx = 2 * x + dx;
            if (yy < height && xx < width) {
              sum += image[(static_cast<std::size_t>(yy) * width + xx) * 3 + c];
              ++count;
            }
          }
        }
        out[(static_cast<std::size_t>(y) * out_width + x) * 3 + c] =
            static_cast<std::uint8_t>(std::floor(sum / count + 0.5));
      }
    }
  }
  return out;
}

TEST(Pyramid, HalveMatchesTheMeanOfExistingPixelsForEvenAndOddSizes) {
  std::mt19937 random(7);
  std::uniform_int_distribution<int> byte(0, 255);
  for (auto [height, width] : {std::pair{4, 6}, std::pair{5, 7}, std::pair{1, 1}, std::pair{1, 9}, std::pair{33, 2}}) {
    std::vector<std::uint8_t> image(static_cast<std::size_t>(height) * width * 3);
    for (auto& value : image) value = static_cast<std::uint8_t>(byte(random));
    const int out_width = (width + 1) / 2;
    std::vector<std::uint8_t> out(static_cast<std::size_t>((height + 1) / 2) * out_width * 3);
    halve_rgb(image.data(), height, width, width * 3, out.data(), out_width * 3);
    EXPECT_EQ(out, reference_halve(image, height, width)) << height << " x " << width;
  }
}

TEST(Pyramid, HalveReadsAndWritesStridedRows) {
  // A 3 x 3 view into rows of 5 pixels; output rows padded to 4 pixels. Padding must stay untouched.
  const int height = 3, width = 3, in_stride = 5 * 3, out_stride = 4 * 3;
  std::vector<std::uint8_t> image(static_cast<std::size_t>(height) * in_stride, 255);
  std::vector<std::uint8_t> packed;
  for (int y = 0; y < height; ++y) {
    for (int i = 0; i < width * 3; ++i) {
      image[static_cast<std::size_t>(y) * in_stride + i] = static_cast<std::uint8_t>(10 * y + i);
      packed.push_back(static_cast<std::uint8_t>(10 * y + i));
    }
  }
  std::vector<std::uint8_t> out(2 * out_stride, 0xAB);
  halve_rgb(image.data(), height, width, in_stride, out.data(), out_stride);
  const std::vector<std::uint8_t> expected = reference_halve(packed, height, width);
  for (int y = 0; y < 2; ++y) {
    for (int i = 0; i < 2 * 3; ++i) EXPECT_EQ(out[y * out_stride + i], expected[y * 6 + i]);
    for (int i = 2 * 3; i < out_stride; ++i) EXPECT_EQ(out[y * out_stride + i], 0xAB);
  }
}

TEST(Pyramid, HalveRejectsEmptyImagesAndShortStrides) {
  std::vector<std::uint8_t> buffer(64);
  EXPECT_THROW(halve_rgb(buffer.data(), 0, 4, 12, buffer.data(), 6), std::invalid_argument);
  EXPECT_THROW(halve_rgb(buffer.data(), 2, 4, 11, buffer.data(), 6), std::invalid_argument);
  EXPECT_THROW(halve_rgb(buffer.data(), 2, 4, 12, buffer.data(), 5), std::invalid_argument);
}

}  // namespace
}  // namespace safron
