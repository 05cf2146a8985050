// Built only without CUDA kernels: every CUDA entry point must exist and fail clearly.

#include <gtest/gtest.h>

#include <stdexcept>
#include <string>

#include "safron/accumulate.h"
#include "safron/build_info.h"
#include "safron/noise.h"

namespace safron {
namespace {

TEST(WithoutCuda, BuildInfoReportsNoCuda) {
  const BuildInfo info = build_info();
  EXPECT_FALSE(info.cuda);
  EXPECT_TRUE(info.cuda_architectures.empty());
  EXPECT_FALSE(info.cuda_runtime_version.has_value());
  EXPECT_EQ(info.cuda_device_count, 0);
  EXPECT_EQ(cuda_device_count(), 0);
  EXPECT_FALSE(info.version.empty());
  EXPECT_FALSE(info.compiler.empty());
}

TEST(WithoutCuda, CudaAccumulatorExplainsItIsUnavailable) {
  try {
    CudaBandAccumulator band(64, 256, 256, 20, BlendMode::Uniform);
    FAIL() << "constructed a CUDA accumulator in a build without CUDA";
  } catch (const std::runtime_error& error) {
    EXPECT_NE(std::string(error.what()).find("built without CUDA"), std::string::npos)
        << error.what();
  }
}

TEST(WithoutCuda, CudaNoiseExplainsItIsUnavailable) {
  const std::int64_t origin = 0;
  float value = 0.0f;
  try {
    fill_noise_cuda(NoiseWindows{1, 1, 1, 1, &origin, &origin, 0}, &value, nullptr);
    FAIL() << "filled noise on a GPU in a build without CUDA";
  } catch (const std::runtime_error& error) {
    EXPECT_NE(std::string(error.what()).find("built without CUDA"), std::string::npos)
        << error.what();
  }
}

}  // namespace
}  // namespace safron
