// Built only with CUDA kernels: the CUDA body of the canvas noise equals the CPU body to the bit.

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "safron/build_info.h"
#include "safron/noise.h"

namespace safron {
namespace {

TEST(CudaNoise, EqualsTheCpuBodyToTheBit) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no usable CUDA device";
  const std::vector<std::int64_t> y0s{-20, 0, 4096, -(std::int64_t{1} << 33), 77};
  const std::vector<std::int64_t> x0s{-20, 236, 5, 9, -1000};
  const NoiseWindows windows{5, 3, 61, 67, y0s.data(), x0s.data(), 4294967295u};
  const std::size_t count = 5 * 3 * 61 * 67;
  std::vector<float> cpu(count), gpu(count, -9.0f);
  fill_noise(windows, cpu.data());
  float* device = nullptr;
  ASSERT_EQ(cudaMalloc(&device, count * sizeof(float)), cudaSuccess);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  fill_noise_cuda(windows, device, stream);
  ASSERT_EQ(cudaMemcpyAsync(gpu.data(), device, count * sizeof(float), cudaMemcpyDeviceToHost,
                            stream),
            cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  cudaStreamDestroy(stream);
  cudaFree(device);
  EXPECT_EQ(cpu, gpu);
}

TEST(CudaNoise, RefusesHostMemory) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no usable CUDA device";
  std::vector<float> host(16);
  const std::int64_t origin = 0;
  EXPECT_THROW(fill_noise_cuda(NoiseWindows{1, 1, 4, 4, &origin, &origin, 0}, host.data(), nullptr),
               std::invalid_argument);
}

}  // namespace
}  // namespace safron
