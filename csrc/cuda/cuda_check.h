#pragma once

#include <cuda_runtime.h>

#include <stdexcept>

#include "safron/errors.h"

namespace safron::detail {

// Turns a CUDA error into std::runtime_error naming the failed operation.
inline void cuda_check(cudaError_t status, const char* operation) {
  if (status != cudaSuccess) {
    throw std::runtime_error(concat(operation, " failed: ", cudaGetErrorName(status), " (",
                                    cudaGetErrorString(status), ")"));
  }
}

// Makes `device` current for the scope, so an accumulator keeps working on the device it was
// created on whatever the calling thread selected since.
class ScopedDevice {
 public:
  explicit ScopedDevice(int device) : device_(device) {
    cuda_check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device_) cuda_check(cudaSetDevice(device_), "cudaSetDevice");
  }
  ~ScopedDevice() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;

 private:
  int device_;
  int previous_ = 0;
};

}  // namespace safron::detail
