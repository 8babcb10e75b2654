// Shared by the CPU (abp_ops.cpp) and CUDA (*.cu) implementations of the abp_C ops:
// argument checks (one definition, so both devices reject the same inputs with the same message)
// and the element-wise formulas that must agree bit for bit with abp/reference.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace abp {

// Bytes of a packed mask of `numel` elements (1 bit each, zero-padded to a whole byte).
inline int64_t packed_bytes(int64_t numel) { return (numel + 7) / 8; }

// One SGD step of a score, exactly as reference.score_update_ computes it in fp32:
//   step = lr·g (rounded), + γ (rounded); new = θ − active·step (each product rounded);
//   without recovery a score that was ≤ 0 stays ≤ 0 (NaN stays NaN, like torch.clamp).
// The CUDA side uses the _rn intrinsics so that nvcc cannot fuse the products into FMAs
// (which would round once instead of twice and differ from torch in the last bit); the
// host side is compiled with -ffp-contract=off for the same reason (see setup.py).
C10_HOST_DEVICE inline float score_step(float s, float g, float lr, float gamma, float active, bool recovery) {
#ifdef __CUDA_ARCH__
  const float step = __fadd_rn(__fmul_rn(lr, g), gamma);
  float nv = __fsub_rn(s, __fmul_rn(active, step));
#else
  const float step = lr * g + gamma;
  float nv = s - active * step;
#endif
  if (!recovery && s <= 0.f && nv > 0.f) nv = 0.f;
  return nv;
}

// Adam's bias-corrected direction for one score, exactly as reference.adam_direction_ computes it in fp32, each
// product, sum, quotient and root rounded on its own (so no FMA: see score_step):
//   m ← m·β1 + g·(1−β1);  v ← v·β2 + (g·g)·(1−β2);  d = (m·inv_bias1) / (√(v·inv_bias2) + ε)
// with c1 = 1−β1, c2 = 1−β2 (computed in double on the host, then rounded to float, as torch rounds the Python
// float `1 - b1`) and inv_bias_k = 1/(1−β_k^t). Updates m and v in place, returns d.
C10_HOST_DEVICE inline float adam_direction(float g, float& m, float& v, float b1, float c1, float b2, float c2,
                                            float inv_bias1, float inv_bias2, float eps) {
#ifdef __CUDA_ARCH__
  m = __fadd_rn(__fmul_rn(m, b1), __fmul_rn(g, c1));
  v = __fadd_rn(__fmul_rn(v, b2), __fmul_rn(__fmul_rn(g, g), c2));
  const float denom = __fadd_rn(__fsqrt_rn(__fmul_rn(v, inv_bias2)), eps);
  return __fdiv_rn(__fmul_rn(m, inv_bias1), denom);
#else
  m = m * b1 + g * c1;
  v = v * b2 + (g * g) * c2;
  const float denom = std::sqrt(v * inv_bias2) + eps;
  return (m * inv_bias1) / denom;
#endif
}

// The constants of one fused Adam score step, as floats (see adam_direction).
struct AdamConsts {
  float b1, c1, b2, c2, eps;
};

inline AdamConsts adam_consts(double beta1, double beta2, double eps) {
  return {static_cast<float>(beta1), static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
          static_cast<float>(1.0 - beta2), static_cast<float>(eps)};
}

// Calls f(T{}) with T = float, at::Half or at::BFloat16 for the three dtypes the serving and update
// kernels support (narrower than AT_DISPATCH_FLOATING_TYPES_AND2: no double instances to compile).
template <typename F>
void dispatch_serving_dtype(c10::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t, " (float32, float16 or bfloat16)");
  }
}

// ----------------------------------------------------------------------------- argument checks

inline bool is_serving_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_pack_mask(const at::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, "abp_C::pack_mask: `mask` must be a bool tensor, got ",
              mask.scalar_type());
}

inline void check_pack_positive(const at::Tensor& scores) {
  TORCH_CHECK(scores.scalar_type() == at::kFloat, "abp_C::pack_positive: `scores` must be float32, got ",
              scores.scalar_type());
}

// The bit of one element: a bool is itself; a score is 1[θ > 0] (NaN is 0, as in torch's `scores > 0`).
template <typename T>
inline C10_HOST_DEVICE bool bit_of(T v);
template <>
inline C10_HOST_DEVICE bool bit_of<bool>(bool v) { return v; }
template <>
inline C10_HOST_DEVICE bool bit_of<float>(float v) { return v > 0.f; }

inline void check_packed(const char* op, const at::Tensor& packed, int64_t numel) {
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": `packed` must be uint8, got ", packed.scalar_type());
  TORCH_CHECK(packed.numel() == packed_bytes(numel), op, ": `packed` must hold ceil(", numel, "/8) = ",
              packed_bytes(numel), " bytes, got ", packed.numel());
}

inline void check_unpack_mask(const at::Tensor& packed, int64_t numel) {
  TORCH_CHECK(numel >= 0, "abp_C::unpack_mask: `numel` must be >= 0, got ", numel);
  check_packed("abp_C::unpack_mask", packed, numel);
}

// The checks shared by multi_score_update_ and multi_score_adam_update_ (`op` names the caller in the messages).
inline void check_multi_score_update(const char* op, at::TensorList scores, at::TensorList grads,
                                     const at::Tensor& gamma, const at::Tensor& active, const at::Tensor& counts) {
  TORCH_CHECK(scores.size() == grads.size(), op, ": got ", scores.size(), " `scores` but ", grads.size(), " `grads`");
  const c10::Device dev = counts.device();
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.dim() == 1 &&
                  counts.numel() == static_cast<int64_t>(scores.size()) && counts.is_contiguous(),
              op, ": `counts` must be a contiguous int64 tensor of shape [", scores.size(), "], got ",
              counts.scalar_type(), " of shape ", counts.sizes());
  auto check_scalar = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 0 && t.scalar_type() == at::kFloat, op, ": `", name,
                "` must be a 0-d float32 tensor, got ", t.scalar_type(), " of shape ", t.sizes());
    TORCH_CHECK(t.device() == dev, op, ": `", name, "` is on ", t.device(), " but `counts` is on ", dev);
  };
  check_scalar(gamma, "gamma");
  check_scalar(active, "active");
  for (size_t i = 0; i < scores.size(); ++i) {
    const at::Tensor& s = scores[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": `scores[", i, "]` must be float32, got ", s.scalar_type());
    TORCH_CHECK(s.is_contiguous(), op, ": `scores[", i, "]` must be contiguous (it is updated in place)");
    TORCH_CHECK(s.device() == dev, op, ": `scores[", i, "]` is on ", s.device(), " but `counts` is on ", dev);
    TORCH_CHECK(g.device() == dev, op, ": `grads[", i, "]` is on ", g.device(), " but `counts` is on ", dev);
    TORCH_CHECK(g.sizes() == s.sizes(), op, ": `grads[", i, "]` has shape ", g.sizes(), " but `scores[", i,
                "]` has shape ", s.sizes());
    TORCH_CHECK(is_serving_dtype(g.scalar_type()), op, ": `grads[", i,
                "]` must be float32, float16 or bfloat16, got ", g.scalar_type());
    TORCH_CHECK(g.scalar_type() == grads[0].scalar_type(), op, ": all `grads` must share one dtype; grads[0] is ",
                grads[0].scalar_type(), ", grads[", i, "] is ", g.scalar_type());
  }
}

inline void check_multi_score_update(at::TensorList scores, at::TensorList grads, const at::Tensor& gamma,
                                     const at::Tensor& active, const at::Tensor& counts) {
  check_multi_score_update("abp_C::multi_score_update_", scores, grads, gamma, active, counts);
}

inline void check_multi_score_adam_update(at::TensorList scores, at::TensorList grads, at::TensorList exp_avg,
                                          at::TensorList exp_avg_sq, at::ArrayRef<double> inv_bias1,
                                          at::ArrayRef<double> inv_bias2, double beta1, double beta2, double eps,
                                          const at::Tensor& gamma, const at::Tensor& active,
                                          const at::Tensor& counts) {
  constexpr const char* op = "abp_C::multi_score_adam_update_";
  const size_t n = scores.size();
  TORCH_CHECK(exp_avg.size() == n && exp_avg_sq.size() == n && inv_bias1.size() == n && inv_bias2.size() == n, op,
              ": got ", n, " `scores` but ", exp_avg.size(), " `exp_avg`, ", exp_avg_sq.size(), " `exp_avg_sq`, ",
              inv_bias1.size(), " `inv_bias1` and ", inv_bias2.size(), " `inv_bias2` (one of each per tensor)");
  TORCH_CHECK(0.0 <= beta1 && beta1 < 1.0 && 0.0 <= beta2 && beta2 < 1.0, op,
              ": `beta1` and `beta2` must be in [0, 1), got ", beta1, " and ", beta2);
  TORCH_CHECK(eps >= 0.0, op, ": `eps` must be >= 0, got ", eps);
  check_multi_score_update(op, scores, grads, gamma, active, counts);
  const c10::Device dev = counts.device();
  auto check_moment = [&](const at::Tensor& t, const at::Tensor& s, const char* name, size_t i) {
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": `", name, "[", i, "]` must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == s.sizes(), op, ": `", name, "[", i, "]` has shape ", t.sizes(), " but `scores[", i,
                "]` has shape ", s.sizes());
    TORCH_CHECK(t.is_contiguous(), op, ": `", name, "[", i, "]` must be contiguous (it is updated in place)");
    TORCH_CHECK(t.device() == dev, op, ": `", name, "[", i, "]` is on ", t.device(), " but `counts` is on ", dev);
  };
  for (size_t i = 0; i < n; ++i) {
    check_moment(exp_avg[i], scores[i], "exp_avg", i);
    check_moment(exp_avg_sq[i], scores[i], "exp_avg_sq", i);
    TORCH_CHECK(std::isfinite(inv_bias1[i]) && std::isfinite(inv_bias2[i]) && inv_bias1[i] >= 1.0 &&
                    inv_bias2[i] >= 1.0,
                op, ": `inv_bias1[", i, "]` and `inv_bias2[", i,
                "]` must be finite and >= 1 (1/(1-beta^t), t >= 1), got ", inv_bias1[i], " and ", inv_bias2[i]);
  }
}

// A per-tensor vector argument of the adam_mix ops (`sums`, `mean_sq`): `dtype`, contiguous, [n], on the device of
// `counts` (the device check is the caller's where the vector itself sets the device).
inline void check_per_tensor(const char* op, const at::Tensor& t, const char* name, c10::ScalarType dtype, size_t n,
                             c10::Device dev) {
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 1 && t.numel() == static_cast<int64_t>(n) && t.is_contiguous(),
              op, ": `", name, "` must be a contiguous ", dtype, " tensor of shape [", n, "] (one per tensor), got ",
              t.scalar_type(), " of shape ", t.sizes());
  TORCH_CHECK(t.device() == dev, op, ": `", name, "` is on ", t.device(), " but `counts` is on ", dev);
}

// Adam's moment pair of tensor i: fp32, contiguous (updated in place), the shape of `like` (`scores[i]` or
// `grads[i]`, named in the message), on `dev`.
inline void check_moment_pair(const char* op, const at::Tensor& m, const at::Tensor& v, const at::Tensor& like,
                              const char* like_name, c10::Device dev, size_t i) {
  auto check = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": `", name, "[", i, "]` must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == like.sizes(), op, ": `", name, "[", i, "]` has shape ", t.sizes(), " but `", like_name,
                "[", i, "]` has shape ", like.sizes());
    TORCH_CHECK(t.is_contiguous(), op, ": `", name, "[", i, "]` must be contiguous (it is updated in place)");
    TORCH_CHECK(t.device() == dev, op, ": `", name, "[", i, "]` is on ", t.device(), " but `", like_name, "[", i,
                "]` is on ", dev);
  };
  check(m, "exp_avg");
  check(v, "exp_avg_sq");
}

// Checks of multi_adam_moments_ (adam_mix's first pass: the moments and each tensor's sum of v̂).
inline void check_multi_adam_moments(at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                                     at::ArrayRef<double> inv_bias2, double beta1, double beta2,
                                     const at::Tensor& sums) {
  constexpr const char* op = "abp_C::multi_adam_moments_";
  const size_t n = grads.size();
  TORCH_CHECK(exp_avg.size() == n && exp_avg_sq.size() == n && inv_bias2.size() == n, op, ": got ", n,
              " `grads` but ", exp_avg.size(), " `exp_avg`, ", exp_avg_sq.size(), " `exp_avg_sq` and ",
              inv_bias2.size(), " `inv_bias2` (one of each per tensor)");
  TORCH_CHECK(0.0 <= beta1 && beta1 < 1.0 && 0.0 <= beta2 && beta2 < 1.0, op,
              ": `beta1` and `beta2` must be in [0, 1), got ", beta1, " and ", beta2);
  const c10::Device dev = sums.device();
  check_per_tensor(op, sums, "sums", at::kDouble, n, dev);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(is_serving_dtype(g.scalar_type()), op, ": `grads[", i,
                "]` must be float32, float16 or bfloat16, got ", g.scalar_type());
    TORCH_CHECK(g.scalar_type() == grads[0].scalar_type(), op, ": all `grads` must share one dtype; grads[0] is ",
                grads[0].scalar_type(), ", grads[", i, "] is ", g.scalar_type());
    TORCH_CHECK(g.device() == dev, op, ": `grads[", i, "]` is on ", g.device(), " but `sums` is on ", dev);
    check_moment_pair(op, exp_avg[i], exp_avg_sq[i], g, "grads", dev, i);
    TORCH_CHECK(std::isfinite(inv_bias2[i]) && inv_bias2[i] >= 1.0, op, ": `inv_bias2[", i,
                "]` must be finite and >= 1 (1/(1-beta2^t), t >= 1), got ", inv_bias2[i]);
  }
}

// Checks of multi_score_adam_mix_update_ (adam_mix's second pass: the direction and the score step).
inline void check_multi_score_adam_mix_update(at::TensorList scores, at::TensorList exp_avg,
                                              at::TensorList exp_avg_sq, const at::Tensor& mean_sq,
                                              at::ArrayRef<double> inv_bias1, at::ArrayRef<double> inv_bias2,
                                              double mix, double eps, const at::Tensor& gamma,
                                              const at::Tensor& active, const at::Tensor& counts) {
  constexpr const char* op = "abp_C::multi_score_adam_mix_update_";
  const size_t n = scores.size();
  TORCH_CHECK(exp_avg.size() == n && exp_avg_sq.size() == n && inv_bias1.size() == n && inv_bias2.size() == n, op,
              ": got ", n, " `scores` but ", exp_avg.size(), " `exp_avg`, ", exp_avg_sq.size(), " `exp_avg_sq`, ",
              inv_bias1.size(), " `inv_bias1` and ", inv_bias2.size(), " `inv_bias2` (one of each per tensor)");
  // mix = 1 would take log(0)·0 for a score whose v̂ is 0 (the target sparsity, which it is, is below 1 anyway)
  TORCH_CHECK(0.0 <= mix && mix < 1.0, op, ": `mix` must be in [0, 1), got ", mix);
  TORCH_CHECK(eps >= 0.0, op, ": `eps` must be >= 0, got ", eps);
  const c10::Device dev = counts.device();
  check_per_tensor(op, mean_sq, "mean_sq", at::kFloat, n, dev);
  for (size_t i = 0; i < n; ++i) check_moment_pair(op, exp_avg[i], exp_avg_sq[i], scores[i], "scores", dev, i);
  // then the SGD step's own checks (scores, gamma, active, counts), the first moments standing in for the grads
  check_multi_score_update(op, scores, exp_avg, gamma, active, counts);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(std::isfinite(inv_bias1[i]) && std::isfinite(inv_bias2[i]) && inv_bias1[i] >= 1.0 &&
                    inv_bias2[i] >= 1.0,
                op, ": `inv_bias1[", i, "]` and `inv_bias2[", i,
                "]` must be finite and >= 1 (1/(1-beta^t), t >= 1), got ", inv_bias1[i], " and ", inv_bias2[i]);
  }
}


// Checks of bitmask_linear (task_ids == nullptr) and multi_bitmask_linear; returns the number of tasks.
inline int64_t check_bitmask_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                    const at::Tensor& packed, const at::Tensor* task_ids,
                                    const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, op, ": `x` must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": `weight` must be 2-D [N, K], got shape ", weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), op, ": `x` is [", x.size(0), ", ", x.size(1), "] but `weight` is [",
              weight.size(0), ", ", weight.size(1), "]: K differs");
  TORCH_CHECK(is_serving_dtype(weight.scalar_type()), op, ": `weight` must be float32, float16 or bfloat16, got ",
              weight.scalar_type());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), op, ": `x` is ", x.scalar_type(), " but `weight` is ",
              weight.scalar_type());
  TORCH_CHECK(x.device() == weight.device(), op, ": `x` is on ", x.device(), " but `weight` is on ", weight.device());
  TORCH_CHECK(packed.device() == weight.device(), op, ": `packed` is on ", packed.device(), " but `weight` is on ",
              weight.device());
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": `packed` must be uint8, got ", packed.scalar_type());
  const int64_t nbytes = packed_bytes(weight.numel());
  int64_t tasks = 1;
  if (task_ids == nullptr) {
    TORCH_CHECK(packed.dim() == 1 && packed.numel() == nbytes, op, ": `packed` must be 1-D with ceil(N*K/8) = ",
                nbytes, " bytes, got shape ", packed.sizes());
  } else {
    TORCH_CHECK(packed.dim() == 2 && packed.size(1) == nbytes, op, ": `packed` must be [T, ceil(N*K/8) = ", nbytes,
                "], got shape ", packed.sizes());
    tasks = packed.size(0);
    TORCH_CHECK(tasks > 0 || x.size(0) == 0, op, ": `packed` holds no task mask (T = 0)");
    TORCH_CHECK(task_ids->scalar_type() == at::kLong, op, ": `task_ids` must be int64, got ",
                task_ids->scalar_type());
    TORCH_CHECK(task_ids->dim() == 1 && task_ids->size(0) == x.size(0), op, ": `task_ids` must be [M = ", x.size(0),
                "], got shape ", task_ids->sizes());
    TORCH_CHECK(task_ids->device() == x.device(), op, ": `task_ids` is on ", task_ids->device(), " but `x` is on ",
                x.device());
  }
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == weight.size(0), op, ": `bias` must be [N = ", weight.size(0),
                "], got shape ", b.sizes());
    TORCH_CHECK(b.scalar_type() == weight.scalar_type(), op, ": `bias` is ", b.scalar_type(), " but `weight` is ",
                weight.scalar_type());
    TORCH_CHECK(b.device() == weight.device(), op, ": `bias` is on ", b.device(), " but `weight` is on ",
                weight.device());
  }
  return tasks;
}

}  // namespace abp
