// Torch-side argument checks of the step ops (docs/kernels.md "Arguments") and the
// translation of tensors into StepParams. Header-only: used by the CPU extension (_C) and
// the CUDA binding (_C_cuda), which are separate shared objects.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "step_params.h"

namespace fused_ddpm {

using OptTensor = c10::optional<at::Tensor>;

// True when every sample a[b] is dense in the given layout (size-1 dims are ignored).
inline bool sample_dense(const at::Tensor& a, bool channels_last) {
  const int64_t nd = a.dim();
  int64_t expected = 1;
  if (!channels_last) {
    for (int64_t d = nd - 1; d >= 1; --d) {
      if (a.size(d) != 1 && a.stride(d) != expected) return false;
      expected *= a.size(d);
    }
    return true;
  }
  if (a.size(1) != 1 && a.stride(1) != 1) return false;
  expected = a.size(1);
  for (int64_t d = nd - 1; d >= 2; --d) {
    if (a.size(d) != 1 && a.stride(d) != expected) return false;
    expected *= a.size(d);
  }
  return true;
}

inline const char* layout_name(bool cl) { return cl ? "channels_last" : "contiguous"; }

struct StepChecker {
  const char* op;
  const at::Tensor& x;
  bool channels_last = false;
  bool empty = false;

  StepChecker(const char* op_, const at::Tensor& x_, bool allow_f64) : op(op_), x(x_) {
    TORCH_CHECK(x.dim() >= 2, op, ": x must have shape [B, C, *spatial], got ", x.sizes());
    const auto dt = x.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 ||
                    (allow_f64 && dt == at::kDouble),
                op, ": x must be float16, bfloat16, float32", allow_f64 ? " or float64" : "",
                " on this backend, got ", dt);
    empty = x.numel() == 0;
    if (!empty) {
      if (sample_dense(x, false)) {
        channels_last = false;
      } else {
        TORCH_CHECK(sample_dense(x, true), op,
                    ": x must be sample-dense (each x[b] contiguous, or contiguous in "
                    "channels_last order); got sizes ", x.sizes(), " strides ", x.strides(),
                    " (call .contiguous() first)");
        channels_last = true;
      }
    }
  }

  // A tensor that must match x: same shape, dtype, device, sample-dense in x's layout.
  TensorArg like(const char* name, const at::Tensor& a, bool output = false) const {
    TORCH_CHECK(a.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", x.sizes(),
                ", got ", a.sizes());
    TORCH_CHECK(a.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ",
                x.scalar_type(), ", got ", a.scalar_type());
    TORCH_CHECK(a.device() == x.device(), op, ": ", name, " must be on x's device ",
                x.device(), ", got ", a.device());
    if (!empty) {
      TORCH_CHECK(sample_dense(a, channels_last), op, ": ", name, " must be sample-dense in "
                  "the same layout as x (", layout_name(channels_last), "); got strides ",
                  a.strides(), " for sizes ", a.sizes());
      if (output) at::assert_no_internal_overlap(a);
    }
    TensorArg arg;
    arg.data = empty ? nullptr : const_cast<void*>(a.data_ptr());
    arg.batch_stride = a.stride(0);
    return arg;
  }

  TensorArg like_opt(const char* name, const OptTensor& a, bool output = false) const {
    if (!a.has_value()) return TensorArg{nullptr, 0};
    TensorArg arg = like(name, *a, output);
    if (empty) arg.data = nullptr;
    return arg;
  }

  // An int64 / float32 per-sample vector [B] on x's device (stride may be 0).
  void per_sample(const char* name, const at::Tensor& a, at::ScalarType dt) const {
    TORCH_CHECK(a.scalar_type() == dt, op, ": ", name, " must be ", dt, ", got ",
                a.scalar_type());
    TORCH_CHECK(a.dim() == 1 && a.size(0) == x.size(0), op, ": ", name,
                " must have shape [B] = [", x.size(0), "], got ", a.sizes());
    TORCH_CHECK(a.device() == x.device(), op, ": ", name, " must be on x's device ",
                x.device(), ", got ", a.device());
  }
};

// Fills the parts of StepParams shared by forward and backward.
inline StepParams common_params(const StepChecker& ck, const at::Tensor& x, const at::Tensor& m,
                                const OptTensor& v, const OptTensor& noise,
                                const OptTensor& seeds, const at::Tensor& t,
                                const at::Tensor& table, const OptTensor& thresh, double clip,
                                int64_t clip_mode, int64_t var_mode, at::ScalarType table_dtype) {
  const char* op = ck.op;
  TORCH_CHECK(clip_mode >= 0 && clip_mode <= 2, op, ": clip_mode must be 0, 1 or 2, got ",
              clip_mode);
  TORCH_CHECK(var_mode >= 0 && var_mode <= 2, op, ": var_mode must be 0, 1 or 2, got ",
              var_mode);
  StepParams p{};
  p.x = ck.like("x", x);
  p.m = ck.like("m", m);
  TORCH_CHECK(var_mode == 0 || v.has_value(), op, ": var_mode ", var_mode,
              " (learned variance) needs v");
  TORCH_CHECK(var_mode != 0 || !v.has_value(), op, ": v given but var_mode is 0 (fixed)");
  p.v = ck.like_opt("v", v);
  p.noise = ck.like_opt("noise", noise);
  if (!noise.has_value()) {
    TORCH_CHECK(seeds.has_value(), op, ": in-kernel noise (noise=None) needs seeds");
  }
  if (seeds.has_value()) {
    ck.per_sample("seeds", *seeds, at::kLong);
    p.seeds = seeds->data_ptr<int64_t>();
    p.seeds_stride = seeds->stride(0);
  }
  ck.per_sample("t", t, at::kLong);
  p.t = t.data_ptr<int64_t>();
  p.t_stride = t.stride(0);
  TORCH_CHECK(clip_mode != 2 || thresh.has_value(), op,
              ": clip_mode 2 (dynamic thresholding) needs thresh");
  if (clip_mode == 2) {
    ck.per_sample("thresh", *thresh, at::kFloat);
    p.thresh = thresh->data_ptr<float>();
    p.thresh_stride = thresh->stride(0);
  }
  TORCH_CHECK(table.dim() == 2 && table.size(1) == 8 && table.size(0) >= 1, op,
              ": table must have shape [T, 8] with T >= 1, got ", table.sizes());
  TORCH_CHECK(table.is_contiguous(), op, ": table must be contiguous");
  TORCH_CHECK(table.scalar_type() == table_dtype, op, ": table must be ", table_dtype,
              " for ", x.scalar_type(), " inputs, got ", table.scalar_type());
  TORCH_CHECK(table.device() == x.device(), op, ": table must be on x's device ", x.device(),
              ", got ", table.device());
  p.table = table.data_ptr();
  p.T = table.size(0);
  p.B = x.size(0);
  p.C = x.size(1);
  p.N = p.B ? x.numel() / p.B : 0;
  p.S = p.C ? p.N / p.C : 0;
  p.channels_last = ck.channels_last;
  p.clip = clip;
  p.clip_mode = static_cast<int>(clip_mode);
  p.var_mode = static_cast<int>(var_mode);
  switch (x.scalar_type()) {
    case at::kFloat: p.kind = KIND_F32; break;
    case at::kHalf: p.kind = KIND_F16; break;
    case at::kBFloat16: p.kind = KIND_BF16; break;
    default: p.kind = KIND_F64; break;
  }
  return p;
}

inline StepParams forward_params(const char* op, bool allow_f64, const at::Tensor& x,
                                 const at::Tensor& m, const OptTensor& v, const OptTensor& noise,
                                 const OptTensor& seeds, const at::Tensor& t,
                                 const at::Tensor& table, const OptTensor& thresh,
                                 const at::Tensor& y, const OptTensor& x0, double clip,
                                 int64_t clip_mode, int64_t var_mode) {
  StepChecker ck(op, x, allow_f64);
  const auto tdt = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  StepParams p = common_params(ck, x, m, v, noise, seeds, t, table, thresh, clip, clip_mode,
                               var_mode, tdt);
  p.y = ck.like("y", y, true);
  p.x0 = ck.like_opt("x0", x0, true);
  return p;
}

inline StepParams backward_params(const char* op, bool allow_f64, const at::Tensor& grad_y,
                                  const OptTensor& grad_x0, const at::Tensor& x,
                                  const at::Tensor& m, const OptTensor& v,
                                  const OptTensor& noise, const OptTensor& seeds,
                                  const at::Tensor& t, const at::Tensor& table,
                                  const OptTensor& thresh, const at::Tensor& grad_x,
                                  const at::Tensor& grad_m, const OptTensor& grad_v,
                                  const OptTensor& grad_noise, double clip, int64_t clip_mode,
                                  int64_t var_mode) {
  StepChecker ck(op, x, allow_f64);
  const auto tdt = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  StepParams p = common_params(ck, x, m, v, noise, seeds, t, table, thresh, clip, clip_mode,
                               var_mode, tdt);
  p.grad_y = ck.like("grad_y", grad_y);
  p.grad_x0 = ck.like_opt("grad_x0", grad_x0);
  p.grad_x = ck.like("grad_x", grad_x, true);
  p.grad_m = ck.like("grad_m", grad_m, true);
  TORCH_CHECK(var_mode != 0 || !grad_v.has_value(), op,
              ": grad_v given but var_mode is 0 (fixed variance has no v)");
  p.grad_v = ck.like_opt("grad_v", grad_v, true);
  TORCH_CHECK(noise.has_value() || !grad_noise.has_value(), op,
              ": grad_noise given but noise is None (in-kernel noise has no gradient)");
  p.grad_noise = ck.like_opt("grad_noise", grad_noise, true);
  return p;
}

inline void check_philox_args(const char* op, const at::Tensor& seeds, const at::Tensor& t,
                              int64_t numel) {
  TORCH_CHECK(numel >= 0, op, ": numel must be >= 0, got ", numel);
  TORCH_CHECK(seeds.scalar_type() == at::kLong && t.scalar_type() == at::kLong, op,
              ": seeds and t must be int64");
  TORCH_CHECK(seeds.dim() == 1 && t.dim() == 1 && seeds.size(0) == t.size(0), op,
              ": seeds and t must have shape [B], got ", seeds.sizes(), " and ", t.sizes());
  TORCH_CHECK(seeds.device() == t.device(), op, ": seeds and t must be on one device");
}

}  // namespace fused_ddpm
