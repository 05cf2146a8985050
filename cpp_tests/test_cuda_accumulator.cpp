// Built only with CUDA kernels. Cases that need a GPU skip when none is usable.

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "safron/accumulate.h"
#include "safron/build_info.h"
#include "scenario.h"

namespace safron {
namespace {

#define ASSERT_CUDA(call) ASSERT_EQ((call), cudaSuccess) << #call

// Device memory freed on scope exit, so a failing assertion does not leak it.
template <class T>
struct DeviceBuffer {
  T* data = nullptr;
  explicit DeviceBuffer(std::size_t count) {
    if (cudaMalloc(&data, count * sizeof(T)) != cudaSuccess) data = nullptr;
  }
  ~DeviceBuffer() { cudaFree(data); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

TEST(Cuda, BuildInfoReportsTheKernels) {
  const BuildInfo info = build_info();
  EXPECT_TRUE(info.cuda);
  EXPECT_FALSE(info.cuda_architectures.empty());
  ASSERT_TRUE(info.cuda_runtime_version.has_value());
  EXPECT_NE(info.compiler.find("NVIDIA"), std::string::npos) << info.compiler;
  EXPECT_EQ(info.cuda_device_count, cuda_device_count());
}

TEST(Cuda, ConstructionWithoutADeviceFailsClearly) {
  if (cuda_device_count() > 0) GTEST_SKIP() << "a CUDA device is present";
  try {
    CudaBandAccumulator band(64, 256, 256, 20, BlendMode::Uniform);
    FAIL() << "constructed a CUDA accumulator without a device";
  } catch (const std::runtime_error& error) {
    EXPECT_NE(std::string(error.what()).find("no usable CUDA device"), std::string::npos)
        << error.what();
  }
}

struct CudaCase {
  std::int64_t height;
  std::int64_t width;
  PatchGeometry geometry;
  BlendMode blend;
  DType dtype;
};

// Renders the same image with the same batches on both devices; every band's sums must agree and
// the pixels may differ by at most one level.
void expect_cuda_matches_cpu(const CudaCase& test, bool pinned_output) {
  const PatchPlan plan = make_plan(test.height, test.width, test.geometry);
  const int patch = test.geometry.patch;
  const int overlap = test.geometry.overlap;
  const testing::PatchSet patches = testing::random_patches(plan.count(), patch, test.dtype, 5);
  const auto batches = testing::random_batches(plan.count(), plan.cols() + 1, 6);
  const auto steps = testing::band_schedule(plan, batches);
  const std::int64_t capacity = testing::required_capacity(plan, steps);

  const std::size_t element_bytes = test.dtype == DType::F16 ? 2 : 4;
  const std::size_t patch_bytes =
      static_cast<std::size_t>(patches.patch_elements()) * element_bytes;
  DeviceBuffer<unsigned char> device_patches(patch_bytes * static_cast<std::size_t>(plan.count()));
  ASSERT_NE(device_patches.data, nullptr);
  ASSERT_CUDA(cudaMemcpy(device_patches.data, patches.input_of(0),
                         patch_bytes * static_cast<std::size_t>(plan.count()),
                         cudaMemcpyHostToDevice));
  const std::size_t image_bytes = static_cast<std::size_t>(test.height * test.width * 3);
  DeviceBuffer<std::uint8_t> device_image(pinned_output ? 1 : image_bytes);
  std::uint8_t* pinned_image = nullptr;
  if (pinned_output) {
    ASSERT_CUDA(cudaMallocHost(&pinned_image, image_bytes));
  }
  std::uint8_t* gpu_out = pinned_output ? pinned_image : device_image.data;

  cudaStream_t stream = nullptr;
  ASSERT_CUDA(cudaStreamCreate(&stream));
  BandAccumulator cpu(test.width, capacity, patch, overlap, test.blend);
  CudaBandAccumulator gpu(test.width, capacity, patch, overlap, test.blend);
  std::vector<std::uint8_t> cpu_image(image_bytes);
  for (const testing::BandStep& step : steps) {
    const testing::PositionLists positions = testing::positions_of(plan, step.batch);
    const std::int64_t n = step.batch.end - step.batch.begin;
    cpu.add(patches.input_of(step.batch.begin), test.dtype, n, positions.ys.data(),
            positions.xs.data(), test.height);
    gpu.add(device_patches.data + patch_bytes * static_cast<std::size_t>(step.batch.begin),
            test.dtype, n, positions.ys.data(), positions.xs.data(), test.height, stream);
    const std::int64_t rows = step.finalise_end - step.finalise_begin;
    if (rows == 0) continue;
    std::vector<float> cpu_sums(static_cast<std::size_t>(rows * test.width * 3));
    std::vector<float> cpu_weights(static_cast<std::size_t>(rows * test.width));
    std::vector<float> gpu_sums(cpu_sums.size());
    std::vector<float> gpu_weights(cpu_weights.size());
    cpu.read_rows(step.finalise_begin, step.finalise_end, cpu_sums.data(), cpu_weights.data());
    gpu.read_rows(step.finalise_begin, step.finalise_end, gpu_sums.data(), gpu_weights.data(),
                  stream);
    for (std::size_t i = 0; i < cpu_sums.size(); ++i) {
      ASSERT_FLOAT_EQ(gpu_sums[i], cpu_sums[i])
          << "sum " << i << " of rows from " << step.finalise_begin;
    }
    for (std::size_t i = 0; i < cpu_weights.size(); ++i)
      ASSERT_FLOAT_EQ(gpu_weights[i], cpu_weights[i]);
    const std::int64_t offset = step.finalise_begin * test.width * 3;
    EXPECT_EQ(cpu.finalise(step.finalise_begin, step.finalise_end, cpu_image.data() + offset,
                           test.width * 3),
              0);
    EXPECT_EQ(gpu.finalise(step.finalise_begin, step.finalise_end, gpu_out + offset, test.width * 3,
                           stream),
              0);
  }
  std::vector<std::uint8_t> gpu_image(image_bytes);
  ASSERT_CUDA(cudaMemcpy(gpu_image.data(), gpu_out, image_bytes, cudaMemcpyDefault));
  for (std::size_t i = 0; i < image_bytes; ++i) {
    ASSERT_LE(std::abs(int{gpu_image[i]} - int{cpu_image[i]}), 1) << "byte " << i;
  }
  if (pinned_image) cudaFreeHost(pinned_image);
  cudaStreamDestroy(stream);
}

TEST(Cuda, FinaliseMatchesTheCpuAccumulator) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  for (BlendMode blend : {BlendMode::Uniform, BlendMode::Linear, BlendMode::Cosine}) {
    for (DType dtype : {DType::F32, DType::F16}) {
      SCOPED_TRACE(std::string(blend_mode_name(blend)) + (dtype == DType::F16 ? " f16" : " f32"));
      expect_cuda_matches_cpu({493, 730, PatchGeometry{}, blend, dtype}, false);
      expect_cuda_matches_cpu({101, 77, PatchGeometry{32, 4, 7}, blend, dtype}, false);
    }
  }
}

TEST(Cuda, FinaliseWritesIntoPinnedHostMemory) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  expect_cuda_matches_cpu({300, 260, PatchGeometry{64, 8, 12}, BlendMode::Linear, DType::F32},
                          true);
}

// Column blocks written out as soon as they are final, in shuffled order, on both devices.
TEST(Cuda, FinalisesColumnBlocksLikeTheCpu) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const std::int64_t height = 300;
  const std::int64_t width = 2500;
  const PatchPlan plan = make_plan(height, width, PatchGeometry{64, 4, 8});
  const testing::PatchSet patches = testing::random_patches(plan.count(), 64, DType::F16, 8);
  const auto batches = testing::random_batches(plan.count(), plan.cols() + 3, 9);
  const auto steps =
      testing::block_schedule(plan, batches, testing::BlockOrder::Shuffled, 10);
  const std::int64_t capacity = testing::required_capacity(plan, steps);

  const std::size_t patch_bytes = static_cast<std::size_t>(patches.patch_elements()) * 2;
  DeviceBuffer<unsigned char> device_patches(patch_bytes * static_cast<std::size_t>(plan.count()));
  ASSERT_NE(device_patches.data, nullptr);
  ASSERT_CUDA(cudaMemcpy(device_patches.data, patches.input_of(0),
                         patch_bytes * static_cast<std::size_t>(plan.count()),
                         cudaMemcpyHostToDevice));
  const std::size_t image_bytes = static_cast<std::size_t>(height * width * 3);
  DeviceBuffer<std::uint8_t> device_image(image_bytes);
  ASSERT_NE(device_image.data, nullptr);

  BandAccumulator cpu(width, capacity, 64, 8, BlendMode::Cosine);
  CudaBandAccumulator gpu(width, capacity, 64, 8, BlendMode::Cosine);
  std::vector<std::uint8_t> cpu_image(image_bytes);
  for (const testing::BlockStep& step : steps) {
    const testing::PositionLists positions = testing::positions_of(plan, step.batch);
    const std::int64_t n = step.batch.end - step.batch.begin;
    cpu.add(patches.input_of(step.batch.begin), DType::F16, n, positions.ys.data(),
            positions.xs.data(), height);
    gpu.add(device_patches.data + patch_bytes * static_cast<std::size_t>(step.batch.begin),
            DType::F16, n, positions.ys.data(), positions.xs.data(), height, nullptr);
    for (const testing::BlockFinalise& range : step.finalise) {
      const std::int64_t offset = (range.row_begin * width + range.col_begin) * 3;
      EXPECT_EQ(cpu.finalise(range.row_begin, range.row_end, range.col_begin, range.col_end,
                             cpu_image.data() + offset, width * 3),
                0);
      EXPECT_EQ(gpu.finalise(range.row_begin, range.row_end, range.col_begin, range.col_end,
                             device_image.data + offset, width * 3, nullptr),
                0);
    }
  }
  std::vector<std::uint8_t> gpu_image(image_bytes);
  ASSERT_CUDA(cudaMemcpy(gpu_image.data(), device_image.data, image_bytes, cudaMemcpyDeviceToHost));
  for (std::size_t i = 0; i < image_bytes; ++i) {
    ASSERT_LE(std::abs(int{gpu_image[i]} - int{cpu_image[i]}), 1) << "byte " << i;
  }
  // Every block was written and zeroed: the band reads back empty.
  std::vector<float> sums(static_cast<std::size_t>(capacity * width * 3), 1.0f);
  std::vector<float> weights(static_cast<std::size_t>(capacity * width), 1.0f);
  gpu.read_rows(height, height + capacity, sums.data(), weights.data(), nullptr);
  EXPECT_TRUE(std::all_of(sums.begin(), sums.end(), [](float v) { return v == 0.0f; }));
  EXPECT_TRUE(std::all_of(weights.begin(), weights.end(), [](float v) { return v == 0.0f; }));
}

TEST(Cuda, DiscardsOneColumnBlockAndTracksItsSlot) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  const std::int64_t width = 2500;
  CudaBandAccumulator gpu(width, 4, 4, 0, BlendMode::Uniform);
  const std::vector<float> ones(3 * 3 * 4 * 4, 1.0f);
  DeviceBuffer<float> device_patches(ones.size());
  ASSERT_CUDA(cudaMemcpy(device_patches.data, ones.data(), ones.size() * sizeof(float),
                         cudaMemcpyHostToDevice));
  const std::int64_t ys[] = {0, 0, 0};
  const std::int64_t xs[] = {0, 1024, 2400};  // one patch in each block
  gpu.add(device_patches.data, DType::F32, 3, ys, xs, 100, nullptr);
  gpu.discard(0, 4, 1024, 2048, nullptr);
  std::vector<float> sums(4 * width * 3);
  std::vector<float> weights(4 * width);
  gpu.read_rows(0, 4, sums.data(), weights.data(), nullptr);
  for (std::int64_t col = 0; col < width; ++col) {
    const bool kept = col < 4 || (col >= 2400 && col < 2404);
    ASSERT_EQ(weights[static_cast<std::size_t>(col)], kept ? 1.0f : 0.0f) << col;
  }
  // Block 1 is free for rows 4..7; blocks 0 and 2 still hold rows 0..3.
  const std::int64_t next = 4;
  gpu.add(device_patches.data, DType::F32, 1, &next, &xs[1], 100, nullptr);
  EXPECT_THROW(gpu.add(device_patches.data, DType::F32, 1, &next, &xs[0], 100, nullptr),
               std::logic_error);
  EXPECT_THROW(gpu.discard(0, 4, 1024, 2048, nullptr), std::logic_error);
  EXPECT_THROW(gpu.discard(0, 4, 1, 1024, nullptr), std::invalid_argument);
}

TEST(Cuda, CountsZeroWeightPixelsAndDiscards) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  CudaBandAccumulator gpu(10, 6, 4, 1, BlendMode::Linear);
  const std::vector<float> patch(3 * 4 * 4, 0.25f);
  DeviceBuffer<float> device_patch(patch.size());
  ASSERT_CUDA(cudaMemcpy(device_patch.data, patch.data(), patch.size() * sizeof(float),
                         cudaMemcpyHostToDevice));
  DeviceBuffer<std::uint8_t> out(6 * 10 * 3);
  const std::int64_t y = 1;
  const std::int64_t x = 3;
  gpu.add(device_patch.data, DType::F32, 1, &y, &x, 6, nullptr);
  const std::int64_t wrapped = y + 6;  // would share the ring with the live rows
  EXPECT_THROW(gpu.add(device_patch.data, DType::F32, 1, &wrapped, &x, 20, nullptr),
               std::logic_error);
  gpu.discard(1, 2, nullptr);  // one covered row of four pixels dropped
  EXPECT_EQ(gpu.finalise(0, 6, out.data, 10 * 3, nullptr), 6 * 10 - 3 * 4);
  std::vector<std::uint8_t> host(6 * 10 * 3);
  ASSERT_CUDA(cudaMemcpy(host.data(), out.data, host.size(), cudaMemcpyDeviceToHost));
  EXPECT_EQ(host[(2 * 10 + 3) * 3], 159);
  EXPECT_EQ(host[(1 * 10 + 3) * 3], 0);
}

}  // namespace
}  // namespace safron
