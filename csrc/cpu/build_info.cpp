#include "safron/build_info.h"

#include "build_config.h"

namespace safron {

namespace {
// SAFRON_CUDA_ARCHITECTURES is CMake's list joined with commas.
std::vector<std::string> split_architectures(const std::string& joined) {
  std::vector<std::string> architectures;
  std::string::size_type start = 0;
  while (start < joined.size()) {
    const auto comma = joined.find(',', start);
    const auto end = comma == std::string::npos ? joined.size() : comma;
    if (end > start) architectures.push_back(joined.substr(start, end - start));
    start = end + 1;
  }
  return architectures;
}
}  // namespace

BuildInfo build_info() {
  BuildInfo info;
  info.cuda = SAFRON_WITH_CUDA;
  info.cuda_architectures = split_architectures(SAFRON_CUDA_ARCHITECTURES);
  info.cuda_runtime_version = cuda_runtime_version();
  info.cuda_device_count = cuda_device_count();
  info.compiler = SAFRON_COMPILER;
  info.version = SAFRON_VERSION;
  return info;
}

}  // namespace safron
