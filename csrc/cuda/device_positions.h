#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "cuda_check.h"

namespace safron::detail {

// A batch's positions (n ys, then n xs) copied from host memory into a stream-ordered device
// allocation, freed on the same stream when this goes out of scope, after the work queued there
// that reads it: batches queued one after another never share a buffer, and none waits for another.
class DevicePositions {
 public:
  // `operation` names the caller in the error of a failed copy.
  DevicePositions(const std::int64_t* ys, const std::int64_t* xs, std::int64_t n,
                  cudaStream_t stream, const char* operation)
      : host_(ys, ys + n), n_(n), stream_(stream) {
    host_.insert(host_.end(), xs, xs + n);
    const std::size_t bytes = host_.size() * sizeof(std::int64_t);
    cuda_check(cudaMallocAsync(&device_, bytes, stream), "cudaMallocAsync(positions)");
    const cudaError_t status =
        cudaMemcpyAsync(device_, host_.data(), bytes, cudaMemcpyHostToDevice, stream);
    if (status != cudaSuccess) {
      cudaFreeAsync(device_, stream);
      cuda_check(status, operation);
    }
  }
  ~DevicePositions() { cudaFreeAsync(device_, stream_); }
  DevicePositions(const DevicePositions&) = delete;
  DevicePositions& operator=(const DevicePositions&) = delete;

  const std::int64_t* ys() const { return device_; }
  const std::int64_t* xs() const { return device_ + n_; }

 private:
  std::vector<std::int64_t> host_;  // the copy's source, kept until the copy is certainly done
  std::int64_t n_;
  cudaStream_t stream_;
  std::int64_t* device_ = nullptr;
};

}  // namespace safron::detail
