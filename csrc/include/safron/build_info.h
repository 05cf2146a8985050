#pragma once

#include <optional>
#include <string>
#include <vector>

namespace safron {

struct BuildInfo {
  bool cuda = false;                                // CUDA kernels compiled into this build
  std::vector<std::string> cuda_architectures;      // as given to CMake, e.g. {"80", "90"}
  std::optional<std::string> cuda_runtime_version;  // e.g. "13.0"; empty without CUDA
  int cuda_device_count = 0;
  std::string compiler;  // e.g. "GNU 12.2.0, NVIDIA 13.0.88"
  std::string version;   // the safron package version
};

BuildInfo build_info();

// Usable CUDA devices; 0 when built without CUDA, without a driver, or without a GPU.
int cuda_device_count();

// Version of the (statically linked) CUDA runtime, e.g. "13.0"; empty when built without CUDA.
std::optional<std::string> cuda_runtime_version();

}  // namespace safron
