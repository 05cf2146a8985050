#pragma once

// Marks functions that both the C++ bodies and the CUDA kernels call, so that the CPU and GPU paths
// share one definition of the per-pixel arithmetic instead of two that could drift apart.
#if defined(__CUDACC__)
#define SAFRON_HOST_DEVICE __host__ __device__
#else
#define SAFRON_HOST_DEVICE
#endif
