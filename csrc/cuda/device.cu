#include <cuda_runtime.h>

#include <string>

#include "safron/build_info.h"

namespace safron {

int cuda_device_count() {
  int count = 0;
  // Without a driver or a GPU this fails (e.g. cudaErrorNoDevice); that simply means no device.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the error so later CUDA calls are not blamed for it
    return 0;
  }
  return count;
}

std::optional<std::string> cuda_runtime_version() {
  int version = 0;
  if (cudaRuntimeGetVersion(&version) != cudaSuccess) return std::nullopt;
  return std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
}

}  // namespace safron
