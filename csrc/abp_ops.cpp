// abp._C: the schemas of the abp_C:: operators, their CPU implementations, and the Python module
// that loading them needs. The CUDA implementations live in the *.cu files beside this one and
// register themselves for the CUDA dispatch key; fake (meta) kernels are in abp/_ext.py.
//
// Conventions (weight [N, K], x [M, K], packed-mask bit order, the score step) are those of
// abp/reference.py, the oracle every op here is tested against.

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/log.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "abp_common.h"

#define ABP_STR2(x) #x
#define ABP_STR(x) ABP_STR2(x)

namespace abp {
namespace {

void check_cpu(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": `", name, "` must be on the CPU here, got ", t.device());
}

// ----------------------------------------------------------------------------- packed masks

// Bits of a bool mask (pack_mask) or of 1[θ > 0] over fp32 scores (pack_positive), one pass over the input.
template <typename T>
at::Tensor pack_bits_cpu(const at::Tensor& input) {
  const at::Tensor m = input.contiguous();
  const int64_t n = m.numel();
  const int64_t nb = packed_bytes(n);
  at::Tensor out = at::empty({nb}, m.options().dtype(at::kByte));
  const T* src = m.data_ptr<T>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, nb, 1 << 14, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      uint32_t v = 0;
      for (int j = 0; j < 8; ++j) {
        const int64_t i = b * 8 + j;
        if (i < n && bit_of(src[i])) v |= 1u << j;
      }
      dst[b] = static_cast<uint8_t>(v);
    }
  });
  return out;
}

at::Tensor pack_mask_cpu(const at::Tensor& mask) {
  check_pack_mask(mask);
  return pack_bits_cpu<bool>(mask);
}

at::Tensor pack_positive_cpu(const at::Tensor& scores) {
  check_pack_positive(scores);
  return pack_bits_cpu<float>(scores);
}

at::Tensor unpack_mask_cpu(const at::Tensor& packed, int64_t numel) {
  check_unpack_mask(packed, numel);
  const at::Tensor p = packed.contiguous();
  at::Tensor out = at::empty({numel}, p.options().dtype(at::kBool));
  const uint8_t* src = p.data_ptr<uint8_t>();
  bool* dst = out.data_ptr<bool>();
  at::parallel_for(0, numel, 1 << 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) dst[i] = (src[i >> 3] >> (i & 7)) & 1;
  });
  return out;
}

// ----------------------------------------------------------------------------- score update

void multi_score_update_cpu(at::TensorList scores, at::TensorList grads, double lr, const at::Tensor& gamma,
                            const at::Tensor& active, bool recovery, const at::Tensor& counts) {
  check_multi_score_update(scores, grads, gamma, active, counts);
  check_cpu("abp_C::multi_score_update_", counts, "counts");
  const float lr_f = static_cast<float>(lr);  // torch multiplies an fp32 tensor by a Python float in fp32
  const float gamma_f = gamma.item<float>();
  const float active_f = active.item<float>();
  int64_t* cnt = counts.data_ptr<int64_t>();
  for (size_t i = 0; i < scores.size(); ++i) {
    const at::Tensor g = grads[i].contiguous();
    float* s = scores[i].data_ptr<float>();
    const int64_t n = scores[i].numel();
    std::atomic<int64_t> nonpos{0};
    dispatch_serving_dtype(g.scalar_type(), "abp_C::multi_score_update_", [&](auto tag) {
      using scalar_t = decltype(tag);
      const scalar_t* gp = g.data_ptr<scalar_t>();
      at::parallel_for(0, n, 1 << 15, [&](int64_t j0, int64_t j1) {
        int64_t local = 0;
        for (int64_t j = j0; j < j1; ++j) {
          const float nv = score_step(s[j], static_cast<float>(gp[j]), lr_f, gamma_f, active_f, recovery);
          s[j] = nv;
          local += nv <= 0.f;
        }
        nonpos += local;
      });
    });
    cnt[i] = nonpos.load();
  }
}

// Adam on the scores and the score step in one pass: reads g, m, v, θ once and writes m, v, θ once per element,
// where the eager sequence (moments, bias corrections, root, quotient, then multi_score_update_) makes about ten
// passes with temporaries. Moments update even when active = 0, as the eager sequence's do.
void multi_score_adam_update_cpu(at::TensorList scores, at::TensorList grads, at::TensorList exp_avg,
                                 at::TensorList exp_avg_sq, at::ArrayRef<double> inv_bias1,
                                 at::ArrayRef<double> inv_bias2, double lr, double beta1, double beta2, double eps,
                                 const at::Tensor& gamma, const at::Tensor& active, bool recovery,
                                 const at::Tensor& counts) {
  constexpr const char* op = "abp_C::multi_score_adam_update_";
  check_multi_score_adam_update(scores, grads, exp_avg, exp_avg_sq, inv_bias1, inv_bias2, beta1, beta2, eps, gamma,
                                active, counts);
  check_cpu(op, counts, "counts");
  const AdamConsts k = adam_consts(beta1, beta2, eps);
  const float lr_f = static_cast<float>(lr);
  const float gamma_f = gamma.item<float>();
  const float active_f = active.item<float>();
  int64_t* cnt = counts.data_ptr<int64_t>();
  for (size_t i = 0; i < scores.size(); ++i) {
    const at::Tensor g = grads[i].contiguous();
    float* s = scores[i].data_ptr<float>();
    float* mp = exp_avg[i].data_ptr<float>();
    float* vp = exp_avg_sq[i].data_ptr<float>();
    const float ib1 = static_cast<float>(inv_bias1[i]), ib2 = static_cast<float>(inv_bias2[i]);
    const int64_t n = scores[i].numel();
    std::atomic<int64_t> nonpos{0};
    dispatch_serving_dtype(g.scalar_type(), op, [&](auto tag) {
      using scalar_t = decltype(tag);
      const scalar_t* gp = g.data_ptr<scalar_t>();
      at::parallel_for(0, n, 1 << 14, [&](int64_t j0, int64_t j1) {
        int64_t local = 0;
        for (int64_t j = j0; j < j1; ++j) {
          float m = mp[j], v = vp[j];
          const float d = adam_direction(static_cast<float>(gp[j]), m, v, k.b1, k.c1, k.b2, k.c2, ib1, ib2, k.eps);
          mp[j] = m;
          vp[j] = v;
          const float nv = score_step(s[j], d, lr_f, gamma_f, active_f, recovery);
          s[j] = nv;
          local += nv <= 0.f;
        }
        nonpos += local;
      });
    });
    cnt[i] = nonpos.load();
  }
}

// adam_mix, first pass: Adam's moments (as multi_score_adam_update_'s, bit for bit) and each tensor's Σ v̂ in
// float64, where the eager sequence makes five passes and a temporary per tensor. The sum goes over fixed blocks of
// kSumBlock elements, each summed in order, then the blocks in order: the same bits whatever the thread count.
constexpr int64_t kSumBlock = 1 << 14;
constexpr int64_t kLanes = 8;

void multi_adam_moments_cpu(at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                            at::ArrayRef<double> inv_bias2, double beta1, double beta2, const at::Tensor& sums) {
  constexpr const char* op = "abp_C::multi_adam_moments_";
  check_multi_adam_moments(grads, exp_avg, exp_avg_sq, inv_bias2, beta1, beta2, sums);
  check_cpu(op, sums, "sums");
  const AdamConsts k = adam_consts(beta1, beta2, 0.0);
  double* out = sums.data_ptr<double>();
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor g = grads[i].contiguous();
    float* mp = exp_avg[i].data_ptr<float>();
    float* vp = exp_avg_sq[i].data_ptr<float>();
    const float ib2 = static_cast<float>(inv_bias2[i]);
    const int64_t n = g.numel(), blocks = (n + kSumBlock - 1) / kSumBlock;
    std::vector<double> partial(static_cast<size_t>(blocks), 0.0);
    dispatch_serving_dtype(g.scalar_type(), op, [&](auto tag) {
      using scalar_t = decltype(tag);
      const scalar_t* gp = g.data_ptr<scalar_t>();
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          // kLanes running sums (element j into lane j % kLanes), added in lane order at the end: independent
          // adds the compiler can keep in vector registers, where one running sum waits on each add's latency
          double acc[kLanes] = {};
          const int64_t begin = b * kSumBlock, end = std::min(n, begin + kSumBlock);
          for (int64_t j0 = begin; j0 < end; j0 += kLanes) {
            const int64_t len = std::min<int64_t>(kLanes, end - j0);
            for (int64_t l = 0; l < len; ++l) {
              const int64_t j = j0 + l;
              const float gj = static_cast<float>(gp[j]);
              mp[j] = mp[j] * k.b1 + gj * k.c1;
              const float v = vp[j] * k.b2 + (gj * gj) * k.c2;
              vp[j] = v;
              acc[l] += static_cast<double>(v * ib2);
            }
          }
          double total = 0.0;
          for (const double a : acc) total += a;
          partial[static_cast<size_t>(b)] = total;
        }
      });
    });
    double total = 0.0;
    for (const double p : partial) total += p;
    out[i] = total;
  }
}

// adam_mix, second pass: the direction from the updated moments and the tensor's mean v̂, then the score step (reads
// m, v, θ; writes θ). The power goes as exp(e1·log v̂ + log pm) through torch's vectorised log and exp, kSumBlock
// elements at a time in a per-thread buffer: a scalar powf per score took 270 ms for MiniLM's 18.8 M scores on one
// core and torch's pow with a general exponent 130 ms, ten times the rest of the step; log and exp take about 12 ms
// each. The blocks are fixed (as in the first pass), so the result does not depend on the thread count.
void multi_score_adam_mix_update_cpu(at::TensorList scores, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                                     const at::Tensor& mean_sq, at::ArrayRef<double> inv_bias1,
                                     at::ArrayRef<double> inv_bias2, double mix, double lr, double eps,
                                     const at::Tensor& gamma, const at::Tensor& active, bool recovery,
                                     const at::Tensor& counts) {
  constexpr const char* op = "abp_C::multi_score_adam_mix_update_";
  check_multi_score_adam_mix_update(scores, exp_avg, exp_avg_sq, mean_sq, inv_bias1, inv_bias2, mix, eps, gamma,
                                    active, counts);
  check_cpu(op, counts, "counts");
  const float lr_f = static_cast<float>(lr), eps_f = static_cast<float>(eps);
  const float e1 = static_cast<float>((1.0 - mix) / 2);
  const at::Tensor lpm = mean_sq.pow(mix / 2).log_();  // log(mean_sq^(mix/2)), one per tensor, as the reference's
  const float* lpmp = lpm.data_ptr<float>();
  const float gamma_f = gamma.item<float>();
  const float active_f = active.item<float>();
  int64_t* cnt = counts.data_ptr<int64_t>();
  for (size_t i = 0; i < scores.size(); ++i) {
    float* s = scores[i].data_ptr<float>();
    const float* mp = exp_avg[i].data_ptr<float>();
    const float* vp = exp_avg_sq[i].data_ptr<float>();
    const float ib1 = static_cast<float>(inv_bias1[i]), ib2 = static_cast<float>(inv_bias2[i]), lpmi = lpmp[i];
    const int64_t n = scores[i].numel(), blocks = (n + kSumBlock - 1) / kSumBlock;
    std::atomic<int64_t> nonpos{0};
    at::parallel_for(0, blocks, 1, [&](int64_t blk0, int64_t blk1) {
      std::vector<float> buf(static_cast<size_t>(std::min(kSumBlock, n)));
      int64_t local = 0;
      for (int64_t b = blk0; b < blk1; ++b) {
        const int64_t j0 = b * kSumBlock, len = std::min(kSumBlock, n - j0);
        float* p = buf.data();
        const at::Tensor t = at::from_blob(p, {len}, at::TensorOptions().dtype(at::kFloat));
        for (int64_t j = 0; j < len; ++j) p[j] = vp[j0 + j] * ib2;
        t.log_();
        for (int64_t j = 0; j < len; ++j) p[j] = p[j] * e1 + lpmi;
        t.exp_();  // p = v̂^e1 · pm
        for (int64_t j = 0; j < len; ++j) {
          const float d = (mp[j0 + j] * ib1) / (p[j] + eps_f);
          const float nv = score_step(s[j0 + j], d, lr_f, gamma_f, active_f, recovery);
          s[j0 + j] = nv;
          local += nv <= 0.f;
        }
      }
      nonpos += local;
    });
    cnt[i] = nonpos.load();
  }
}

// ----------------------------------------------------------------------------- 1-bit-mask serving

// y = x·(W⊙M)ᵀ + b for one packed mask, fp32 accumulation, one rounding to the output dtype.
// The CPU path favours simplicity and BLAS speed: W⊙M is built one block of rows at a time (about
// 1 MiB of fp32, never the whole matrix) and multiplied with at::mm; the bandwidth-bound
// one-bit-per-weight kernel is the CUDA one.
at::Tensor masked_mm_cpu(const at::Tensor& xf, const at::Tensor& w, const uint8_t* bits,
                         const std::optional<at::Tensor>& bias) {
  const int64_t M = xf.size(0), K = xf.size(1), N = w.size(0);
  at::Tensor yf = at::empty({M, N}, xf.options());
  const int64_t block = std::max<int64_t>(16, (int64_t{1} << 18) / std::max<int64_t>(K, 1));
  at::Tensor wblk = at::empty({std::min(block, N), K}, xf.options());
  dispatch_serving_dtype(w.scalar_type(), "abp_C::bitmask_linear", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* wp = w.data_ptr<scalar_t>();
    for (int64_t n0 = 0; n0 < N; n0 += block) {
      const int64_t nb = std::min(block, N - n0);
      float* dst = wblk.data_ptr<float>();
      at::parallel_for(0, nb, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          for (int64_t k = 0; k < K; ++k) {
            const int64_t bit = (n0 + r) * K + k;
            dst[r * K + k] = ((bits[bit >> 3] >> (bit & 7)) & 1) ? static_cast<float>(wp[bit]) : 0.f;
          }
        }
      });
      yf.narrow(1, n0, nb).copy_(at::mm(xf, wblk.narrow(0, 0, nb).t()));
    }
  });
  if (bias.has_value()) yf.add_(bias->to(at::kFloat));
  return yf;
}

// bitmask_linear (task_ids == nullptr) and multi_bitmask_linear: the rows of x that share a task
// go through masked_mm_cpu together with that task's mask.
at::Tensor bitmask_linear_cpu_impl(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& packed, const at::Tensor* task_ids,
                                   const std::optional<at::Tensor>& bias) {
  const int64_t tasks = check_bitmask_linear(op, x, weight, packed, task_ids, bias);
  check_cpu(op, x, "x");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor p = packed.contiguous();
  const uint8_t* bits = p.data_ptr<uint8_t>();
  if (task_ids == nullptr) return masked_mm_cpu(xf, w, bits, bias).to(x.scalar_type());

  const at::Tensor t = task_ids->contiguous();
  const int64_t* tp = t.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> rows_of(static_cast<size_t>(tasks));
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(tp[m] >= 0 && tp[m] < tasks, op, ": `task_ids[", m, "]` = ", tp[m], " is out of range [0, ", tasks,
                ")");
    rows_of[tp[m]].push_back(m);
  }
  at::Tensor yf = at::empty({M, N}, xf.options());
  const int64_t task_stride = packed_bytes(N * K);
  for (int64_t task = 0; task < tasks; ++task) {
    if (rows_of[task].empty()) continue;
    const at::Tensor idx = at::tensor(rows_of[task], t.options());
    yf.index_copy_(0, idx, masked_mm_cpu(xf.index_select(0, idx), w, bits + task * task_stride, bias));
  }
  return yf.to(x.scalar_type());
}

at::Tensor bitmask_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed,
                              const std::optional<at::Tensor>& bias) {
  return bitmask_linear_cpu_impl("abp_C::bitmask_linear", x, weight, packed, nullptr, bias);
}

at::Tensor multi_bitmask_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed,
                                    const at::Tensor& task_ids, const std::optional<at::Tensor>& bias) {
  return bitmask_linear_cpu_impl("abp_C::multi_bitmask_linear", x, weight, packed, &task_ids, bias);
}

}  // namespace
}  // namespace abp

// One schema per op. The public abp:: ops (abp/_ops.py) call these as their cpp/cuda backend.
TORCH_LIBRARY(abp_C, m) {
  m.def("pack_mask(Tensor mask) -> Tensor");
  m.def("pack_positive(Tensor scores) -> Tensor");
  m.def("unpack_mask(Tensor packed, int numel) -> Tensor");
  m.def(
      "multi_score_update_(Tensor(a!)[] scores, Tensor[] grads, float lr, Tensor gamma, Tensor active, "
      "bool recovery, Tensor(b!) counts) -> ()");
  m.def(
      "multi_score_adam_update_(Tensor(a!)[] scores, Tensor[] grads, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
      "float[] inv_bias1, float[] inv_bias2, float lr, float beta1, float beta2, float eps, Tensor gamma, "
      "Tensor active, bool recovery, Tensor(d!) counts) -> ()");
  m.def(
      "multi_adam_moments_(Tensor[] grads, Tensor(a!)[] exp_avg, Tensor(b!)[] exp_avg_sq, float[] inv_bias2, "
      "float beta1, float beta2, Tensor(c!) sums) -> ()");
  m.def(
      "multi_score_adam_mix_update_(Tensor(a!)[] scores, Tensor[] exp_avg, Tensor[] exp_avg_sq, Tensor mean_sq, "
      "float[] inv_bias1, float[] inv_bias2, float mix, float lr, float eps, Tensor gamma, Tensor active, "
      "bool recovery, Tensor(b!) counts) -> ()");
  m.def("bitmask_linear(Tensor x, Tensor weight, Tensor packed, Tensor? bias) -> Tensor");
  m.def("multi_bitmask_linear(Tensor x, Tensor weight, Tensor packed, Tensor task_ids, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(abp_C, CPU, m) {
  m.impl("pack_mask", &abp::pack_mask_cpu);
  m.impl("pack_positive", &abp::pack_positive_cpu);
  m.impl("unpack_mask", &abp::unpack_mask_cpu);
  m.impl("multi_score_update_", &abp::multi_score_update_cpu);
  m.impl("multi_score_adam_update_", &abp::multi_score_adam_update_cpu);
  m.impl("multi_adam_moments_", &abp::multi_adam_moments_cpu);
  m.impl("multi_score_adam_mix_update_", &abp::multi_score_adam_mix_update_cpu);
  m.impl("bitmask_linear", &abp::bitmask_linear_cpu);
  m.impl("multi_bitmask_linear", &abp::multi_bitmask_linear_cpu);
}

// The Python module itself holds no functions (the ops live in torch.ops.abp_C, registered above
// when the library is loaded); it only tells abp/_ext.py what this build contains.
// No pybind11: it keeps the compile short.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "abp compiled ops (torch.ops.abp_C)", -1, nullptr};
  PyObject* mod = PyModule_Create(&def);
  if (mod == nullptr) return nullptr;
#ifdef ABP_WITH_CUDA
  PyModule_AddIntConstant(mod, "WITH_CUDA", 1);
  PyModule_AddStringConstant(mod, "CUDA_ARCHS", ABP_STR(ABP_CUDA_ARCHS));
  PyModule_AddStringConstant(mod, "CUDA_VERSION", ABP_STR(ABP_CUDA_VERSION));
#else
  PyModule_AddIntConstant(mod, "WITH_CUDA", 0);
  PyModule_AddStringConstant(mod, "CUDA_ARCHS", "");
  PyModule_AddStringConstant(mod, "CUDA_VERSION", "");
#endif
  PyModule_AddStringConstant(mod, "TORCH_VERSION", ABP_STR(ABP_TORCH_VERSION));
  return mod;
}
