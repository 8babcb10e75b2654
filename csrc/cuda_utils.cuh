// Small device helpers shared by the CUDA sources.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

// Only c10/cuda headers here and in the .cu files, not ATen/cuda/CUDAContext.h: that one pulls in
// cuBLAS/cuSPARSE headers, which a minimal CUDA toolkit (nvcc + cudart) does not have.

namespace abp {

constexpr int kWarpSize = 32;

// Multiprocessor count of the current device (an attribute query: no synchronisation).
inline int sm_count() {
  int dev = 0, n = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

// Sum over the 32 lanes of a warp; every lane gets the total.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// N elements loaded or stored as one aligned vector access (16 bytes for 4 floats or 8 halves).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

}  // namespace abp
