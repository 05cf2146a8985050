// Compiled instead of csrc/cuda/ when the build has no CUDA compiler: every CUDA entry point exists
// and reports clearly why it cannot run.

#include <stdexcept>

#include "safron/accumulate.h"
#include "safron/build_info.h"
#include "safron/noise.h"

namespace safron {

namespace {
[[noreturn]] void throw_built_without_cuda() {
  throw std::runtime_error(
      "safron was built without CUDA kernels (SAFRON_CUDA=OFF or no nvcc at build time); "
      "rebuild with the CUDA toolkit installed, or use the CPU BandAccumulator");
}
}  // namespace

int cuda_device_count() {
  return 0;
}

std::optional<std::string> cuda_runtime_version() {
  return std::nullopt;
}

// The slots are built from dummy dimensions: the constructor throws before any use, and without
// validating first, so that every call says the same thing.
CudaBandAccumulator::CudaBandAccumulator(std::int64_t, std::int64_t, int, int, BlendMode)
    : slots_(1, 1) {
  throw_built_without_cuda();
}

CudaBandAccumulator::~CudaBandAccumulator() = default;

// Unreachable (no instance can be constructed) but needed to link the bindings.
void CudaBandAccumulator::add(const void*, DType, std::int64_t, const std::int64_t*,
                              const std::int64_t*, std::int64_t, CudaStream) {
  throw_built_without_cuda();
}

std::int64_t CudaBandAccumulator::finalise(std::int64_t, std::int64_t, std::int64_t, std::int64_t,
                                           std::uint8_t*, std::int64_t, CudaStream) {
  throw_built_without_cuda();
}

std::int64_t CudaBandAccumulator::finalise(std::int64_t, std::int64_t, std::uint8_t*, std::int64_t,
                                           CudaStream) {
  throw_built_without_cuda();
}

void CudaBandAccumulator::discard(std::int64_t, std::int64_t, std::int64_t, std::int64_t,
                                  CudaStream) {
  throw_built_without_cuda();
}

void CudaBandAccumulator::discard(std::int64_t, std::int64_t, CudaStream) {
  throw_built_without_cuda();
}

void CudaBandAccumulator::read_rows(std::int64_t, std::int64_t, float*, float*, CudaStream) const {
  throw_built_without_cuda();
}

void fill_noise_cuda(const NoiseWindows&, float*, CUstream_st*) {
  throw_built_without_cuda();
}

}  // namespace safron
