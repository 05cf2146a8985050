#include "safron/noise.h"

#include "parallel_for.h"
#include "safron/errors.h"

namespace safron {

namespace detail {
void check_noise_windows(const NoiseWindows& w, const void* out) {
  require(w.n >= 0 && w.channels >= 0 && w.height >= 0 && w.width >= 0,
          "noise windows: sizes must be >= 0, got n=", w.n, ", channels=", w.channels,
          ", height=", w.height, ", width=", w.width);
  require(w.n == 0 || (w.y0s && w.x0s), "noise windows: null position pointer");
  require(w.n * w.channels * w.height * w.width == 0 || out, "noise windows: null output pointer");
}
}  // namespace detail

void fill_noise(const NoiseWindows& w, float* out, int num_threads) {
  detail::check_noise_windows(w, out);
  // One task per (window, channel, row): each owns a contiguous output row.
  const std::int64_t rows = w.n * w.channels * w.height;
  detail::parallel_for(0, rows, detail::resolve_thread_count(num_threads),
                       [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t task = begin; task < end; ++task) {
      const std::int64_t row = task % w.height;
      const std::int64_t channel = task / w.height % w.channels;
      const std::int64_t k = task / (w.height * w.channels);
      const std::uint32_t key =
          noise_hash::row_key(noise_hash::channel_key(w.seed, channel), w.y0s[k] + row);
      float* line = out + task * w.width;
      const std::int64_t x0 = w.x0s[k];
      for (std::int64_t x = 0; x < w.width; ++x) line[x] = noise_hash::value(key, x0 + x);
    }
  });
}

}  // namespace safron
