// CUDA implementations of the packed-mask utilities and of the multi-tensor score updates (SGD, Adam, adam_mix).
// Everything runs on the current stream and never synchronises with the host.

// Narrow ATen includes (not ATen/ATen.h): the host pass of nvcc is a large part of the build time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "abp_common.h"
#include "cuda_utils.cuh"

namespace abp {
namespace {

// ----------------------------------------------------------------------------- packed masks

// One thread per output byte; T = bool (a mask) or float (scores, packed as 1[θ > 0]).
template <typename T>
__global__ void pack_bits_kernel(const T* __restrict__ src, uint8_t* __restrict__ dst, int64_t n, int64_t nb) {
  for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < nb; b += (int64_t)gridDim.x * blockDim.x) {
    uint32_t v = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t i = b * 8 + j;
      if (i < n && bit_of(src[i])) v |= 1u << j;
    }
    dst[b] = static_cast<uint8_t>(v);
  }
}

// One thread per input byte, writing its (up to) 8 elements.
__global__ void unpack_mask_kernel(const uint8_t* __restrict__ src, bool* __restrict__ dst, int64_t n, int64_t nb) {
  for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < nb; b += (int64_t)gridDim.x * blockDim.x) {
    const uint32_t v = src[b];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t i = b * 8 + j;
      if (i < n) dst[i] = (v >> j) & 1u;
    }
  }
}

constexpr int kThreads = 256;

int grid_for(int64_t work, int64_t per_block) {
  const int64_t blocks = std::max<int64_t>(1, (work + per_block - 1) / per_block);
  const int64_t cap = static_cast<int64_t>(sm_count()) * 32;
  return static_cast<int>(std::min(blocks, cap));
}

template <typename T>
at::Tensor pack_bits_cuda(const at::Tensor& input) {
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor m = input.contiguous();
  const int64_t n = m.numel(), nb = packed_bytes(n);
  at::Tensor out = at::empty({nb}, m.options().dtype(at::kByte));
  if (nb == 0) return out;
  pack_bits_kernel<T><<<grid_for(nb, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      m.data_ptr<T>(), out.data_ptr<uint8_t>(), n, nb);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor pack_mask_cuda(const at::Tensor& mask) {
  check_pack_mask(mask);
  return pack_bits_cuda<bool>(mask);
}

// The bits a v2 training step reads, straight from the scores: 4 + 1/8 bytes per weight, where
// pack_mask(scores > 0) would also write and re-read a bool mask (6 1/8).
at::Tensor pack_positive_cuda(const at::Tensor& scores) {
  check_pack_positive(scores);
  return pack_bits_cuda<float>(scores);
}

at::Tensor unpack_mask_cuda(const at::Tensor& packed, int64_t numel) {
  check_unpack_mask(packed, numel);
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor p = packed.contiguous();
  const int64_t nb = p.numel();
  at::Tensor out = at::empty({numel}, p.options().dtype(at::kBool));
  if (nb == 0) return out;
  unpack_mask_kernel<<<grid_for(nb, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      p.data_ptr<uint8_t>(), out.data_ptr<bool>(), numel, nb);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ----------------------------------------------------------------------------- multi-tensor score update

// Multi-tensor apply: one launch covers every score tensor. The host writes a table of
// {scores ptr, grads ptr, numel, first chunk} per tensor (plus the total chunk count) into pinned
// memory and copies it to the device asynchronously; each block walks chunks c = blockIdx.x,
// blockIdx.x + gridDim.x, ..., finds the tensor owning chunk c by binary search over the first-chunk
// column (so the table stays O(#tensors) whatever the sizes), updates it, and adds its count of
// θ ≤ 0 to counts[tensor] with one atomic. counts is zeroed on the stream first: no host sync.
constexpr int64_t kChunk = 16384;  // elements per chunk: 64 KiB of fp32 scores, 16 vector steps of a block
constexpr int kTableCols = 4;

// The tensor owning chunk c: the largest i with starts[i] <= c (empty tensors share their successor's start and
// are skipped).
__device__ __forceinline__ int owner_of_chunk(const int64_t* __restrict__ starts, int ntensors, int64_t c) {
  int lo = 0, hi = ntensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (starts[mid] <= c) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// The block's sum of one value per thread, in a fixed order (each warp's, then the warps' in order): thread 0 gets
// it. Every thread of the block calls it; `scratch` holds kThreads / kWarpSize values and is free again on return.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  v = warp_sum(v);
  if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  T total = 0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kThreads / kWarpSize; ++w) total += scratch[w];
  }
  __syncthreads();  // `scratch` is reused by the next call
  return total;
}

// Adds the block's `nonpos` (one value per thread) to *count with one atomic; every thread of the block calls it.
__device__ __forceinline__ void block_count_add(int64_t nonpos, int64_t* partial, int64_t* count) {
  const int64_t total = block_sum(nonpos, partial);
  if (threadIdx.x == 0) atomicAdd(reinterpret_cast<unsigned long long*>(count), static_cast<unsigned long long>(total));
}

template <typename grad_t, bool VEC>
__global__ void __launch_bounds__(kThreads) multi_score_update_kernel(
    const int64_t* __restrict__ table, int ntensors, int64_t total_chunks, float lr, const float* __restrict__ gamma_p,
    const float* __restrict__ active_p, bool recovery, int64_t* __restrict__ counts) {
  __shared__ int64_t partial[kThreads / kWarpSize];
  const float gamma = *gamma_p, active = *active_p;
  const int64_t* starts = table + 3 * ntensors;  // first chunk of each tensor
  for (int64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const int i = owner_of_chunk(starts, ntensors, c);
    float* s = reinterpret_cast<float*>(table[i]);
    const grad_t* g = reinterpret_cast<const grad_t*>(table[ntensors + i]);
    const int64_t numel = table[2 * ntensors + i];
    const int64_t begin = (c - starts[i]) * kChunk;
    const int64_t end = begin + kChunk < numel ? begin + kChunk : numel;
    int64_t nonpos = 0;
    int64_t j = begin + threadIdx.x;
    if constexpr (VEC) {  // 4 scores (16 B) and 4 grads per thread and step; begin is a multiple of 4
      const int64_t vend = begin + ((end - begin) & ~int64_t(3));
      for (int64_t v = begin + 4 * threadIdx.x; v < vend; v += 4 * kThreads) {
        float4 sv = *reinterpret_cast<const float4*>(s + v);
        const Pack<grad_t, 4> gv = *reinterpret_cast<const Pack<grad_t, 4>*>(g + v);
        sv.x = score_step(sv.x, static_cast<float>(gv.v[0]), lr, gamma, active, recovery);
        sv.y = score_step(sv.y, static_cast<float>(gv.v[1]), lr, gamma, active, recovery);
        sv.z = score_step(sv.z, static_cast<float>(gv.v[2]), lr, gamma, active, recovery);
        sv.w = score_step(sv.w, static_cast<float>(gv.v[3]), lr, gamma, active, recovery);
        *reinterpret_cast<float4*>(s + v) = sv;
        nonpos += (sv.x <= 0.f) + (sv.y <= 0.f) + (sv.z <= 0.f) + (sv.w <= 0.f);
      }
      j = vend + threadIdx.x;
    }
    for (; j < end; j += kThreads) {
      const float nv = score_step(s[j], static_cast<float>(g[j]), lr, gamma, active, recovery);
      s[j] = nv;
      nonpos += nv <= 0.f;
    }
    block_count_add(nonpos, partial, counts + i);  // block reduction, then one atomic per chunk
  }
}

void multi_score_update_cuda(at::TensorList scores, at::TensorList grads, double lr, const at::Tensor& gamma,
                             const at::Tensor& active, bool recovery, const at::Tensor& counts) {
  check_multi_score_update(scores, grads, gamma, active, counts);
  TORCH_CHECK(counts.is_cuda(), "abp_C::multi_score_update_: `counts` must be a CUDA tensor here, got ",
              counts.device());
  const c10::cuda::CUDAGuard guard(counts.device());
  const int n = static_cast<int>(scores.size());
  counts.zero_();
  if (n == 0) return;

  std::vector<at::Tensor> gs;  // contiguous grads, alive until the launch is queued (the allocator is stream-ordered)
  gs.reserve(n);
  at::Tensor table = at::empty({kTableCols * n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* t = table.data_ptr<int64_t>();
  int64_t chunks = 0;
  bool aligned = true;
  const int64_t gsize = static_cast<int64_t>(c10::elementSize(grads[0].scalar_type()));
  for (int i = 0; i < n; ++i) {
    gs.push_back(grads[i].contiguous());
    const int64_t numel = scores[i].numel();
    t[i] = reinterpret_cast<int64_t>(scores[i].data_ptr<float>());
    t[n + i] = reinterpret_cast<int64_t>(gs[i].data_ptr());
    t[2 * n + i] = numel;
    t[3 * n + i] = chunks;
    chunks += (numel + kChunk - 1) / kChunk;
    aligned = aligned && t[i] % 16 == 0 && t[n + i] % (4 * gsize) == 0;
  }
  if (chunks == 0) return;
  const at::Tensor dtable = table.to(counts.device(), /*non_blocking=*/true);
  const int blocks = static_cast<int>(
      std::min<int64_t>(chunks, static_cast<int64_t>(sm_count()) * 8));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_serving_dtype(gs[0].scalar_type(), "abp_C::multi_score_update_", [&](auto tag) {
    using scalar_t = decltype(tag);
    if (aligned) {
      multi_score_update_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
          dtable.data_ptr<int64_t>(), n, chunks, static_cast<float>(lr), gamma.data_ptr<float>(),
          active.data_ptr<float>(), recovery, counts.data_ptr<int64_t>());
    } else {
      multi_score_update_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
          dtable.data_ptr<int64_t>(), n, chunks, static_cast<float>(lr), gamma.data_ptr<float>(),
          active.data_ptr<float>(), recovery, counts.data_ptr<int64_t>());
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ----------------------------------------------------------------------------- multi-tensor Adam score update

// The fp32 bit pattern of x rounded to float, for a table cell (the kernels read it back with __uint_as_float).
inline uint32_t float_bits(double x) {
  const float f = static_cast<float>(x);
  uint32_t bits = 0;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// A tensor's two bias corrections in one table cell: inv_bias1's bits low, inv_bias2's high.
inline int64_t bias_pair_bits(double inv_bias1, double inv_bias2) {
  return static_cast<int64_t>((static_cast<uint64_t>(float_bits(inv_bias2)) << 32) | float_bits(inv_bias1));
}


// multi_score_update_kernel with Adam's moments in the same pass: per element it reads g, m, v, θ once and
// writes m, v, θ once. Table columns: scores, grads, exp_avg, exp_avg_sq pointers, numel, first chunk, and the
// tensor's (inv_bias1, inv_bias2) as two float bit patterns in one int64.
constexpr int kAdamTableCols = 7;

template <typename grad_t, bool VEC>
__global__ void __launch_bounds__(kThreads) multi_score_adam_update_kernel(
    const int64_t* __restrict__ table, int ntensors, int64_t total_chunks, float lr, AdamConsts k,
    const float* __restrict__ gamma_p, const float* __restrict__ active_p, bool recovery,
    int64_t* __restrict__ counts) {
  __shared__ int64_t partial[kThreads / kWarpSize];
  const float gamma = *gamma_p, active = *active_p;
  const int64_t* starts = table + 5 * ntensors;
  for (int64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const int i = owner_of_chunk(starts, ntensors, c);
    float* s = reinterpret_cast<float*>(table[i]);
    const grad_t* g = reinterpret_cast<const grad_t*>(table[ntensors + i]);
    float* m = reinterpret_cast<float*>(table[2 * ntensors + i]);
    float* v = reinterpret_cast<float*>(table[3 * ntensors + i]);
    const int64_t numel = table[4 * ntensors + i];
    const uint64_t bias = static_cast<uint64_t>(table[6 * ntensors + i]);
    const float ib1 = __uint_as_float(static_cast<unsigned>(bias & 0xffffffffu));
    const float ib2 = __uint_as_float(static_cast<unsigned>(bias >> 32));
    const int64_t begin = (c - starts[i]) * kChunk;
    const int64_t end = begin + kChunk < numel ? begin + kChunk : numel;
    auto one = [&](float& sj, float gj, float& mj, float& vj) {
      const float d = adam_direction(gj, mj, vj, k.b1, k.c1, k.b2, k.c2, ib1, ib2, k.eps);
      sj = score_step(sj, d, lr, gamma, active, recovery);
      return static_cast<int64_t>(sj <= 0.f);
    };
    int64_t nonpos = 0;
    int64_t j = begin + threadIdx.x;
    if constexpr (VEC) {  // 4 elements (16 B of each fp32 array) per thread and step; begin is a multiple of 4
      const int64_t vend = begin + ((end - begin) & ~int64_t(3));
      for (int64_t e = begin + 4 * threadIdx.x; e < vend; e += 4 * kThreads) {
        float4 sv = *reinterpret_cast<const float4*>(s + e);
        float4 mv = *reinterpret_cast<const float4*>(m + e);
        float4 vv = *reinterpret_cast<const float4*>(v + e);
        const Pack<grad_t, 4> gv = *reinterpret_cast<const Pack<grad_t, 4>*>(g + e);
        nonpos += one(sv.x, static_cast<float>(gv.v[0]), mv.x, vv.x);
        nonpos += one(sv.y, static_cast<float>(gv.v[1]), mv.y, vv.y);
        nonpos += one(sv.z, static_cast<float>(gv.v[2]), mv.z, vv.z);
        nonpos += one(sv.w, static_cast<float>(gv.v[3]), mv.w, vv.w);
        *reinterpret_cast<float4*>(m + e) = mv;
        *reinterpret_cast<float4*>(v + e) = vv;
        *reinterpret_cast<float4*>(s + e) = sv;
      }
      j = vend + threadIdx.x;
    }
    for (; j < end; j += kThreads) {
      float sj = s[j], mj = m[j], vj = v[j];
      nonpos += one(sj, static_cast<float>(g[j]), mj, vj);
      m[j] = mj;
      v[j] = vj;
      s[j] = sj;
    }
    block_count_add(nonpos, partial, counts + i);
  }
}

void multi_score_adam_update_cuda(at::TensorList scores, at::TensorList grads, at::TensorList exp_avg,
                                  at::TensorList exp_avg_sq, at::ArrayRef<double> inv_bias1,
                                  at::ArrayRef<double> inv_bias2, double lr, double beta1, double beta2, double eps,
                                  const at::Tensor& gamma, const at::Tensor& active, bool recovery,
                                  const at::Tensor& counts) {
  constexpr const char* op = "abp_C::multi_score_adam_update_";
  check_multi_score_adam_update(scores, grads, exp_avg, exp_avg_sq, inv_bias1, inv_bias2, beta1, beta2, eps, gamma,
                                active, counts);
  TORCH_CHECK(counts.is_cuda(), op, ": `counts` must be a CUDA tensor here, got ", counts.device());
  const c10::cuda::CUDAGuard guard(counts.device());
  const int n = static_cast<int>(scores.size());
  counts.zero_();
  if (n == 0) return;

  std::vector<at::Tensor> gs;  // contiguous grads, alive until the launch is queued (the allocator is stream-ordered)
  gs.reserve(n);
  at::Tensor table = at::empty({kAdamTableCols * n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* t = table.data_ptr<int64_t>();
  int64_t chunks = 0;
  bool aligned = true;
  const int64_t gsize = static_cast<int64_t>(c10::elementSize(grads[0].scalar_type()));
  for (int i = 0; i < n; ++i) {
    gs.push_back(grads[i].contiguous());
    const int64_t numel = scores[i].numel();
    t[i] = reinterpret_cast<int64_t>(scores[i].data_ptr<float>());
    t[n + i] = reinterpret_cast<int64_t>(gs[i].data_ptr());
    t[2 * n + i] = reinterpret_cast<int64_t>(exp_avg[i].data_ptr<float>());
    t[3 * n + i] = reinterpret_cast<int64_t>(exp_avg_sq[i].data_ptr<float>());
    t[4 * n + i] = numel;
    t[5 * n + i] = chunks;
    t[6 * n + i] = bias_pair_bits(inv_bias1[i], inv_bias2[i]);
    chunks += (numel + kChunk - 1) / kChunk;
    aligned = aligned && t[i] % 16 == 0 && t[2 * n + i] % 16 == 0 && t[3 * n + i] % 16 == 0 &&
              t[n + i] % (4 * gsize) == 0;
  }
  if (chunks == 0) return;
  const at::Tensor dtable = table.to(counts.device(), /*non_blocking=*/true);
  const int blocks = static_cast<int>(std::min<int64_t>(chunks, static_cast<int64_t>(sm_count()) * 8));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const AdamConsts k = adam_consts(beta1, beta2, eps);
  dispatch_serving_dtype(gs[0].scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    if (aligned) {
      multi_score_adam_update_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
          dtable.data_ptr<int64_t>(), n, chunks, static_cast<float>(lr), k, gamma.data_ptr<float>(),
          active.data_ptr<float>(), recovery, counts.data_ptr<int64_t>());
    } else {
      multi_score_adam_update_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
          dtable.data_ptr<int64_t>(), n, chunks, static_cast<float>(lr), k, gamma.data_ptr<float>(),
          active.data_ptr<float>(), recovery, counts.data_ptr<int64_t>());
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ----------------------------------------------------------------------------- multi-tensor adam_mix (two passes)

// Pass 1: Adam's moments (multi_score_adam_update_kernel's arithmetic) and each chunk's Σ v̂ in float64 into
// partial[c]; sum_chunks_kernel then adds each tensor's chunk sums in chunk order, so the sums are the same bits on
// every run. Table columns: grads, exp_avg, exp_avg_sq pointers, numel, first chunk, inv_bias2 (float bits).
constexpr int kMomentTableCols = 6;

template <typename grad_t>
__global__ void __launch_bounds__(kThreads) multi_adam_moments_kernel(
    const int64_t* __restrict__ table, int ntensors, int64_t total_chunks, AdamConsts k, double* __restrict__ partial) {
  __shared__ double warp_part[kThreads / kWarpSize];
  const int64_t* starts = table + 4 * ntensors;
  for (int64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const int i = owner_of_chunk(starts, ntensors, c);
    const grad_t* g = reinterpret_cast<const grad_t*>(table[i]);
    float* m = reinterpret_cast<float*>(table[ntensors + i]);
    float* v = reinterpret_cast<float*>(table[2 * ntensors + i]);
    const int64_t numel = table[3 * ntensors + i];
    const float ib2 = __uint_as_float(static_cast<unsigned>(table[5 * ntensors + i]));
    const int64_t begin = (c - starts[i]) * kChunk;
    const int64_t end = begin + kChunk < numel ? begin + kChunk : numel;
    double acc = 0.0;
    for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
      const float gj = static_cast<float>(g[j]);
      m[j] = __fadd_rn(__fmul_rn(m[j], k.b1), __fmul_rn(gj, k.c1));
      const float vj = __fadd_rn(__fmul_rn(v[j], k.b2), __fmul_rn(__fmul_rn(gj, gj), k.c2));
      v[j] = vj;
      acc += static_cast<double>(__fmul_rn(vj, ib2));
    }
    const double total = block_sum(acc, warp_part);
    if (threadIdx.x == 0) partial[c] = total;
  }
}

// sums[i] = Σ partial[c] over tensor i's chunks, in order (one thread per tensor; a tensor has numel/16384 chunks).
__global__ void sum_chunks_kernel(const int64_t* __restrict__ starts, int ntensors, int64_t total_chunks,
                                  const double* __restrict__ partial, double* __restrict__ sums) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < ntensors; i += gridDim.x * blockDim.x) {
    const int64_t end = i + 1 < ntensors ? starts[i + 1] : total_chunks;
    double total = 0.0;
    for (int64_t c = starts[i]; c < end; ++c) total += partial[c];
    sums[i] = total;
  }
}

void multi_adam_moments_cuda(at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                             at::ArrayRef<double> inv_bias2, double beta1, double beta2, const at::Tensor& sums) {
  constexpr const char* op = "abp_C::multi_adam_moments_";
  check_multi_adam_moments(grads, exp_avg, exp_avg_sq, inv_bias2, beta1, beta2, sums);
  TORCH_CHECK(sums.is_cuda(), op, ": `sums` must be a CUDA tensor here, got ", sums.device());
  const c10::cuda::CUDAGuard guard(sums.device());
  const int n = static_cast<int>(grads.size());
  if (n == 0) return;
  sums.zero_();  // tensors without elements own no chunk and keep 0

  std::vector<at::Tensor> gs;  // contiguous grads, alive until the launch is queued
  gs.reserve(n);
  at::Tensor table = at::empty({kMomentTableCols * n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* t = table.data_ptr<int64_t>();
  int64_t chunks = 0;
  for (int i = 0; i < n; ++i) {
    gs.push_back(grads[i].contiguous());
    const int64_t numel = gs[i].numel();
    t[i] = reinterpret_cast<int64_t>(gs[i].data_ptr());
    t[n + i] = reinterpret_cast<int64_t>(exp_avg[i].data_ptr<float>());
    t[2 * n + i] = reinterpret_cast<int64_t>(exp_avg_sq[i].data_ptr<float>());
    t[3 * n + i] = numel;
    t[4 * n + i] = chunks;
    t[5 * n + i] = static_cast<int64_t>(float_bits(inv_bias2[i]));
    chunks += (numel + kChunk - 1) / kChunk;
  }
  if (chunks == 0) return;
  const at::Tensor dtable = table.to(sums.device(), /*non_blocking=*/true);
  at::Tensor partial = at::empty({chunks}, sums.options());
  const int blocks = static_cast<int>(std::min<int64_t>(chunks, static_cast<int64_t>(sm_count()) * 8));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const AdamConsts k = adam_consts(beta1, beta2, 0.0);
  dispatch_serving_dtype(gs[0].scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    multi_adam_moments_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(dtable.data_ptr<int64_t>(), n, chunks, k,
                                                                         partial.data_ptr<double>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_chunks_kernel<<<(n + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      dtable.data_ptr<int64_t>() + 4 * n, n, chunks, partial.data_ptr<double>(), sums.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Pass 2: the direction from the updated moments and the tensor's mean v̂ (reference.adam_mix_direction), then the
// score step. Table columns: scores, exp_avg, exp_avg_sq pointers, numel, first chunk, (inv_bias1, inv_bias2) as
// two float bit patterns in one int64.
constexpr int kMixTableCols = 6;

// adam_mix's direction for one score from its updated moments, in the op order of reference.adam_mix_direction:
//   d = (m·inv_bias1) / (exp(log(v·inv_bias2)·e1 + lpm) + ε),  e1 = (1−mix)/2,  lpm = log(mean_sq^(mix/2)).
// Each product, sum and quotient rounded on its own (no FMA); logf and expf are CUDA's accurate ones (1–2 ulp).
__device__ inline float adam_mix_direction(float m, float v, float inv_bias1, float inv_bias2, float e1, float lpm,
                                           float eps) {
  const float p = expf(__fadd_rn(__fmul_rn(logf(__fmul_rn(v, inv_bias2)), e1), lpm));
  return __fdiv_rn(__fmul_rn(m, inv_bias1), __fadd_rn(p, eps));
}

__global__ void __launch_bounds__(kThreads) multi_score_adam_mix_update_kernel(
    const int64_t* __restrict__ table, int ntensors, int64_t total_chunks, const float* __restrict__ mean_sq,
    float e1, float e2, float lr, float eps, const float* __restrict__ gamma_p, const float* __restrict__ active_p,
    bool recovery, int64_t* __restrict__ counts) {
  __shared__ int64_t partial[kThreads / kWarpSize];
  const float gamma = *gamma_p, active = *active_p;
  const int64_t* starts = table + 4 * ntensors;
  for (int64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const int i = owner_of_chunk(starts, ntensors, c);
    float* s = reinterpret_cast<float*>(table[i]);
    const float* m = reinterpret_cast<const float*>(table[ntensors + i]);
    const float* v = reinterpret_cast<const float*>(table[2 * ntensors + i]);
    const int64_t numel = table[3 * ntensors + i];
    const uint64_t bias = static_cast<uint64_t>(table[5 * ntensors + i]);
    const float ib1 = __uint_as_float(static_cast<unsigned>(bias & 0xffffffffu));
    const float ib2 = __uint_as_float(static_cast<unsigned>(bias >> 32));
    const float lpm = logf(powf(mean_sq[i], e2));
    const int64_t begin = (c - starts[i]) * kChunk;
    const int64_t end = begin + kChunk < numel ? begin + kChunk : numel;
    int64_t nonpos = 0;
    for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
      const float d = adam_mix_direction(m[j], v[j], ib1, ib2, e1, lpm, eps);
      const float nv = score_step(s[j], d, lr, gamma, active, recovery);
      s[j] = nv;
      nonpos += nv <= 0.f;
    }
    block_count_add(nonpos, partial, counts + i);
  }
}

void multi_score_adam_mix_update_cuda(at::TensorList scores, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                                      const at::Tensor& mean_sq, at::ArrayRef<double> inv_bias1,
                                      at::ArrayRef<double> inv_bias2, double mix, double lr, double eps,
                                      const at::Tensor& gamma, const at::Tensor& active, bool recovery,
                                      const at::Tensor& counts) {
  constexpr const char* op = "abp_C::multi_score_adam_mix_update_";
  check_multi_score_adam_mix_update(scores, exp_avg, exp_avg_sq, mean_sq, inv_bias1, inv_bias2, mix, eps, gamma,
                                    active, counts);
  TORCH_CHECK(counts.is_cuda(), op, ": `counts` must be a CUDA tensor here, got ", counts.device());
  const c10::cuda::CUDAGuard guard(counts.device());
  const int n = static_cast<int>(scores.size());
  counts.zero_();
  if (n == 0) return;

  at::Tensor table = at::empty({kMixTableCols * n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* t = table.data_ptr<int64_t>();
  int64_t chunks = 0;
  for (int i = 0; i < n; ++i) {
    const int64_t numel = scores[i].numel();
    t[i] = reinterpret_cast<int64_t>(scores[i].data_ptr<float>());
    t[n + i] = reinterpret_cast<int64_t>(exp_avg[i].data_ptr<float>());
    t[2 * n + i] = reinterpret_cast<int64_t>(exp_avg_sq[i].data_ptr<float>());
    t[3 * n + i] = numel;
    t[4 * n + i] = chunks;
    t[5 * n + i] = bias_pair_bits(inv_bias1[i], inv_bias2[i]);
    chunks += (numel + kChunk - 1) / kChunk;
  }
  if (chunks == 0) return;
  const at::Tensor dtable = table.to(counts.device(), /*non_blocking=*/true);
  const int blocks = static_cast<int>(std::min<int64_t>(chunks, static_cast<int64_t>(sm_count()) * 8));
  multi_score_adam_mix_update_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      dtable.data_ptr<int64_t>(), n, chunks, mean_sq.data_ptr<float>(), static_cast<float>((1.0 - mix) / 2),
      static_cast<float>(mix / 2), static_cast<float>(lr), static_cast<float>(eps), gamma.data_ptr<float>(),
      active.data_ptr<float>(), recovery, counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace abp

TORCH_LIBRARY_IMPL(abp_C, CUDA, m) {
  m.impl("pack_mask", &abp::pack_mask_cuda);
  m.impl("pack_positive", &abp::pack_positive_cuda);
  m.impl("unpack_mask", &abp::unpack_mask_cuda);
  m.impl("multi_score_update_", &abp::multi_score_update_cuda);
  m.impl("multi_score_adam_update_", &abp::multi_score_adam_update_cuda);
  m.impl("multi_adam_moments_", &abp::multi_adam_moments_cuda);
  m.impl("multi_score_adam_mix_update_", &abp::multi_score_adam_mix_update_cuda);
}
