// Serving with 1-bit masks: y = x·(W⊙M)ᵀ + b where M is read as packed bits (1 bit per weight) and
// W⊙M is never materialised. One frozen backbone W can serve many tasks (multi_bitmask_linear:
// row i of x uses mask task_ids[i]).
//
// A GEMV / skinny-GEMM kernel for M = 1..64 (decode-time batches); it stays correct for any M but
// a tensor-core GEMM is the right tool once M is large. Design (memory-bound on W):
// - each warp owns ROWS consecutive output rows n; its lanes stride K, VEC elements at a time with
//   one 16-byte load of W per row (VEC = 4 fp32 or 8 fp16/bf16) and one byte of mask bits;
// - the M rows of x are processed in register tiles of MT rows, so W and its bits are read once per
//   tile (the single-tile case M ≤ 16 reads W exactly once); each x vector read is used for ROWS rows;
// - fp32 accumulation in registers, a warp-shuffle reduction, bias added in fp32, one rounding.
// The vector path needs K % VEC == 0 (then a lane's VEC bits sit inside one byte: the offset n·K + k
// is a multiple of VEC) and 16-byte aligned x and W; otherwise a scalar path (VEC = 1) handles any K.

// Narrow ATen includes (not ATen/ATen.h): the host pass of nvcc is a large part of the build time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <type_traits>

#include "abp_common.h"
#include "cuda_utils.cuh"

namespace abp {
namespace {

constexpr int kGemvWarps = 4;  // warps per block

template <typename T, int VEC>
__device__ __forceinline__ void load_as_float(const T* __restrict__ p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = static_cast<float>(p[0]);
  } else {
    const Pack<T, VEC> v = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = static_cast<float>(v.v[e]);
  }
}

template <typename T, int MT, int ROWS, int VEC, bool MULTI>
__global__ void __launch_bounds__(kGemvWarps * kWarpSize) bitmask_gemv_kernel(
    const T* __restrict__ x, const T* __restrict__ w, const uint8_t* __restrict__ packed, int64_t task_stride,
    const int64_t* __restrict__ task_ids, int64_t tasks, const T* __restrict__ bias, T* __restrict__ y, int64_t M,
    int64_t N, int64_t K) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + threadIdx.x / kWarpSize) * ROWS;
  if (n0 >= N) return;  // whole warps leave together, and nothing below synchronises the block
  const int nrows = N - n0 < ROWS ? static_cast<int>(N - n0) : ROWS;

  for (int64_t m0 = static_cast<int64_t>(blockIdx.y) * MT; m0 < M; m0 += static_cast<int64_t>(gridDim.y) * MT) {
    const int mt = M - m0 < MT ? static_cast<int>(M - m0) : MT;
    const uint8_t* mask[MT];  // MULTI: the packed mask of each row of the tile (unused otherwise)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      int64_t t = 0;
      if (MULTI && m < mt) {
        t = task_ids[m0 + m];
        CUDA_KERNEL_ASSERT(t >= 0 && t < tasks && "multi_bitmask_linear: task id out of range");
      }
      mask[m] = packed + t * task_stride;
    }
    float acc[ROWS][MT];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;

    for (int64_t k = static_cast<int64_t>(lane) * VEC; k < K; k += kWarpSize * VEC) {
      float wf[ROWS][VEC];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (r < nrows) {
          load_as_float<T, VEC>(w + (n0 + r) * K + k, wf[r]);
          if constexpr (!MULTI) {  // one mask for every row of x: apply it to W once
            const int64_t bit = (n0 + r) * K + k;
            const uint32_t bits = static_cast<uint32_t>(packed[bit >> 3]) >> (bit & 7);
#pragma unroll
            for (int e = 0; e < VEC; ++e) wf[r][e] = ((bits >> e) & 1u) ? wf[r][e] : 0.f;
          }
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) wf[r][e] = 0.f;
        }
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < mt) {
          float xf[VEC];
          load_as_float<T, VEC>(x + (m0 + m) * K + k, xf);
#pragma unroll
          for (int r = 0; r < ROWS; ++r) {
            if constexpr (MULTI) {
              const int64_t bit = (n0 + r) * K + k;
              const uint32_t bits = r < nrows ? static_cast<uint32_t>(mask[m][bit >> 3]) >> (bit & 7) : 0u;
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[r][m] += ((bits >> e) & 1u) ? xf[e] * wf[r][e] : 0.f;
            } else {
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[r][m] += xf[e] * wf[r][e];
            }
          }
        }
      }
    }

#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const float v = warp_sum(acc[r][m]);
        if (lane == 0 && r < nrows && m < mt) {
          const float b = bias != nullptr ? static_cast<float>(bias[n0 + r]) : 0.f;
          y[(m0 + m) * N + n0 + r] = static_cast<T>(v + b);
        }
      }
    }
  }
}

template <typename T, int MT, bool MULTI>
void launch_tile(bool vec, const T* x, const T* w, const uint8_t* packed, int64_t task_stride, const int64_t* task_ids,
                 int64_t tasks, const T* bias, T* y, int64_t M, int64_t N, int64_t K) {
  constexpr int ROWS = MT == 1 ? 1 : 2;  // M = 1: more warps beat x reuse; M > 1: each x load serves 2 rows
  constexpr int VEC = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>((N + kGemvWarps * ROWS - 1) / (kGemvWarps * ROWS)),
                  static_cast<unsigned>(std::min<int64_t>((M + MT - 1) / MT, 65535)));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (vec) {
    bitmask_gemv_kernel<T, MT, ROWS, VEC, MULTI><<<grid, kGemvWarps * kWarpSize, 0, stream>>>(
        x, w, packed, task_stride, task_ids, tasks, bias, y, M, N, K);
  } else {
    bitmask_gemv_kernel<T, MT, ROWS, 1, MULTI><<<grid, kGemvWarps * kWarpSize, 0, stream>>>(
        x, w, packed, task_stride, task_ids, tasks, bias, y, M, N, K);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

at::Tensor bitmask_linear_cuda_impl(const char* op, const at::Tensor& x_in, const at::Tensor& weight,
                                    const at::Tensor& packed_in, const at::Tensor* task_ids_in,
                                    const std::optional<at::Tensor>& bias_in) {
  const int64_t tasks = check_bitmask_linear(op, x_in, weight, packed_in, task_ids_in, bias_in);
  TORCH_CHECK(x_in.is_cuda(), op, ": `x` must be a CUDA tensor here, got ", x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor task_ids = task_ids_in != nullptr ? task_ids_in->contiguous() : at::Tensor();
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const int64_t task_stride = packed_bytes(N * K);
  const int64_t* tid = task_ids.defined() ? task_ids.data_ptr<int64_t>() : nullptr;
  const uint8_t* bits = packed.data_ptr<uint8_t>();

  dispatch_serving_dtype(w.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int VEC = 16 / sizeof(T);
    const T* xp = x.data_ptr<T>();
    const T* wp = w.data_ptr<T>();
    const T* bp = bias.defined() ? bias.data_ptr<T>() : nullptr;
    T* yp = y.data_ptr<T>();
    const bool vec = K % VEC == 0 && aligned16(xp) && aligned16(wp);
    auto go = [&](auto mt_tag) {
      constexpr int MT = decltype(mt_tag)::value;
      if (tid != nullptr) {
        launch_tile<T, MT, true>(vec, xp, wp, bits, task_stride, tid, tasks, bp, yp, M, N, K);
      } else {
        launch_tile<T, MT, false>(vec, xp, wp, bits, task_stride, nullptr, tasks, bp, yp, M, N, K);
      }
    };
    if (M == 1) {
      go(std::integral_constant<int, 1>{});
    } else if (M <= 4) {
      go(std::integral_constant<int, 4>{});
    } else {
      go(std::integral_constant<int, 16>{});  // M > 16: tiles of 16 over gridDim.y
    }
  });
  return y;
}

at::Tensor bitmask_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed,
                               const std::optional<at::Tensor>& bias) {
  return bitmask_linear_cuda_impl("abp_C::bitmask_linear", x, weight, packed, nullptr, bias);
}

at::Tensor multi_bitmask_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed,
                                     const at::Tensor& task_ids, const std::optional<at::Tensor>& bias) {
  return bitmask_linear_cuda_impl("abp_C::multi_bitmask_linear", x, weight, packed, &task_ids, bias);
}

}  // namespace
}  // namespace abp

TORCH_LIBRARY_IMPL(abp_C, CUDA, m) {
  m.impl("bitmask_linear", &abp::bitmask_linear_cuda);
  m.impl("multi_bitmask_linear", &abp::multi_bitmask_linear_cuda);
}
