// The argument checks of the kernel launches (docs/kernels.md, "Launch arguments") and their
// translation into StepParams. Header-only: shared by the CPU extension (_C, ops.cpp) and the
// CUDA binding (_C_cuda, step_cuda.cpp), which are separate shared objects.
//
// A wrong dtype raises TypeError (TORCH_CHECK_TYPE); a wrong shape, layout, flag, device or a
// missing / extra stream raises ValueError (TORCH_CHECK_VALUE). Messages name the argument
// (ins[M], flags[NOISE], ...) and say what was expected.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

#include "contract.h"
#include "step_params.h"

namespace fused_ddpm {

using OptTensor = std::optional<at::Tensor>;
using OptTensorList = c10::List<std::optional<at::Tensor>>;

inline const char* stream_name(int i) {
  static const char* names[NUM_IN] = {"X", "M", "MC", "V", "Z", "H"};
  return (i >= 0 && i < NUM_IN) ? names[i] : "?";
}
inline const char* out_name(int i) {
  static const char* names[NUM_OUT] = {"Y", "X0"};
  return (i >= 0 && i < NUM_OUT) ? names[i] : "?";
}
inline const char* layout_name(int layout) {
  return layout == Layout::CHANNELS_LAST ? "CHANNELS_LAST" : "CONTIGUOUS";
}

// Every sample a[b] dense in `layout`: contiguous, or contiguous in channels-last order
// (strides (1, ..., C) for dims 1, 2, ...). Dims of size 1 constrain nothing.
inline bool sample_dense(const at::Tensor& a, int layout) {
  const int64_t nd = a.dim();
  int64_t expected = 1;
  for (int64_t k = 1; k < nd; ++k) {  // the k-th innermost dim of a sample
    // contiguous: the last dim first; channels_last: the channels, then the spatial dims
    // from the last
    const int64_t d = layout == Layout::CONTIGUOUS ? nd - k : (k == 1 ? 1 : nd + 1 - k);
    if (a.size(d) != 1 && a.stride(d) != expected) return false;
    expected *= a.size(d);
  }
  return true;
}

// Validates the launch lists and the tensors that must look like X; fills the geometry.
struct LaunchChecker {
  const char* op;
  bool allow_f64;    // the CPU backend also takes float64
  at::Tensor x;      // the reference tensor (X, or the noise op's output)
  int layout = Layout::CONTIGUOUS;
  bool empty = true;

  LaunchChecker(const char* op_, bool allow_f64_) : op(op_), allow_f64(allow_f64_) {}

  // The reference tensor: [B, C, *spatial], a supported float dtype, sample-dense in layout.
  void reference(const char* name, const at::Tensor& a, int layout_) {
    x = a;
    layout = layout_;
    const auto dt = a.scalar_type();
    TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 ||
                         (allow_f64 && dt == at::kDouble),
                     op, ": ", name, " must be ",
                     allow_f64 ? "float16, bfloat16, float32 or float64"
                               : "float16, bfloat16 or float32",
                     ", got ", dt);
    TORCH_CHECK_VALUE(a.dim() >= 2, op, ": ", name, " must have shape [B, C, *spatial], got ",
                      a.sizes());
    empty = a.numel() == 0;
    dense(name, a);
  }

  void dense(const char* name, const at::Tensor& a) const {
    TORCH_CHECK_VALUE(empty || sample_dense(a, layout), op, ": ", name,
                      " must be sample-dense in layout ", layout_name(layout),
                      " (flags[LAYOUT]); got sizes ", a.sizes(), " strides ", a.strides());
  }

  // A tensor that must match the reference: shape, dtype, device, layout.
  Stream like(const std::string& name, const at::Tensor& a, bool output) const {
    TORCH_CHECK_TYPE(a.scalar_type() == x.scalar_type(), op, ": ", name, " must have dtype ",
                     x.scalar_type(), " (that of ins[X]), got ", a.scalar_type());
    TORCH_CHECK_VALUE(a.sizes() == x.sizes(), op, ": ", name, " must have shape ", x.sizes(),
                      " (that of ins[X]), got ", a.sizes());
    TORCH_CHECK_VALUE(a.device() == x.device(), op, ": ", name, " must be on ", x.device(),
                      " (with ins[X]), got ", a.device());
    dense(name.c_str(), a);
    // Sample-dense samples overlap one another exactly when the batch stride is shorter than
    // a sample (an expanded tensor, say): two samples would write one location.
    const int64_t n = x.size(0) ? x.numel() / x.size(0) : 0;
    TORCH_CHECK_VALUE(!output || empty || a.size(0) <= 1 || a.stride(0) >= n, op, ": ", name,
                      " is written, but its samples overlap in memory (batch stride ",
                      a.stride(0), " < ", n, " elements per sample)");
    Stream s;
    s.data = empty ? nullptr : const_cast<void*>(a.data_ptr());
    s.batch_stride = a.stride(0);
    return s;
  }

  // An int64 / float32 vector [B] on the reference's device (any stride).
  template <typename T>
  PerSample<T> per_sample(const char* name, const at::Tensor& a, at::ScalarType dt) const {
    TORCH_CHECK_TYPE(a.scalar_type() == dt, op, ": ", name, " must be ", dt, ", got ",
                     a.scalar_type());
    TORCH_CHECK_VALUE(a.dim() == 1 && a.size(0) == x.size(0), op, ": ", name,
                      " must have shape [B] = [", x.size(0), "], got ", a.sizes());
    TORCH_CHECK_VALUE(a.device() == x.device(), op, ": ", name, " must be on ", x.device(),
                      " (with the tensors it goes with), got ", a.device());
    PerSample<T> v;
    v.data = a.data_ptr<T>();
    v.stride = a.stride(0);
    return v;
  }

  void geometry(StepParams& p) const {
    p.B = x.size(0);
    p.C = x.size(1);
    p.N = p.B ? x.numel() / p.B : 0;
    p.S = p.C ? p.N / p.C : 0;
    p.layout = layout;
    switch (x.scalar_type()) {
      case at::kFloat: p.kind = KIND_F32; break;
      case at::kHalf: p.kind = KIND_F16; break;
      case at::kBFloat16: p.kind = KIND_BF16; break;
      case at::kDouble: p.kind = KIND_F64; break;
      default: TORCH_CHECK_TYPE(false, op, ": unsupported dtype ", x.scalar_type());
    }
  }
};

// flags[i] is one of the n listed values of the enum `what`.
inline int check_flag(const char* op, c10::IntArrayRef flags, int i, const char* name,
                      std::initializer_list<int> allowed, const char* what) {
  const int64_t v = flags[i];
  bool ok = false;
  for (int a : allowed) ok = ok || v == a;
  TORCH_CHECK_VALUE(ok, op, ": flags[", name, "] must be a ", what, " value, got ", v);
  return static_cast<int>(v);
}

inline void check_noise_stream(const char* op, const char* name, int64_t v) {
  TORCH_CHECK_VALUE(v == NoiseStream::TIMESTEP || v == NoiseStream::STEP, op, ": ", name,
                    " must be a NoiseStream value (TIMESTEP ", int(NoiseStream::TIMESTEP),
                    ", STEP ", int(NoiseStream::STEP), "), got ", v);
}

// The flags and scalars lists -> StepParams fields.
inline void decode_flags(const char* op, c10::IntArrayRef flags, c10::ArrayRef<double> scalars,
                         StepParams& p, int* layout) {
  TORCH_CHECK_VALUE(flags.size() == NUM_FLAGS, op, ": flags must have ", NUM_FLAGS,
                    " entries (contract.Flag), got ", flags.size());
  TORCH_CHECK_VALUE(scalars.size() == NUM_SCALARS, op, ": scalars must have ", NUM_SCALARS,
                    " entries (contract.Scalar), got ", scalars.size());
  p.clip = check_flag(op, flags, Flag::CLIP, "CLIP", {Clip::NONE, Clip::STATIC, Clip::DYNAMIC},
                      "Clip");
  p.var = check_flag(op, flags, Flag::VAR, "VAR", {Var::FIXED, Var::SQRT, Var::EXP}, "Var");
  p.noise = check_flag(op, flags, Flag::NOISE, "NOISE",
                       {Noise::NONE, Noise::EXTERNAL, Noise::PHILOX}, "Noise");
  *layout = check_flag(op, flags, Flag::LAYOUT, "LAYOUT",
                       {Layout::CONTIGUOUS, Layout::CHANNELS_LAST}, "Layout");
  const int64_t terms = flags[Flag::TERMS];
  TORCH_CHECK_VALUE(terms >= 0 && (terms & ~int64_t(TERM_COLS_MASK)) == 0, op,
                    ": flags[TERMS] must be a mask of the term columns U W E P Q R H S (bits ",
                    "within ", TERM_COLS_MASK, "), got ", terms);
  p.terms = static_cast<int>(terms);
  check_noise_stream(op, "flags[NOISE_STREAM]", flags[Flag::NOISE_STREAM]);
  p.noise_stream = static_cast<uint32_t>(flags[Flag::NOISE_STREAM]);
  p.clip_value = scalars[Scalar::CLIP];
  p.guidance = scalars[Scalar::GUIDANCE];
  const bool has_s = (terms >> Col::S) & 1, has_e = (terms >> Col::E) & 1;
  TORCH_CHECK_VALUE(p.noise != Noise::NONE || (!has_s && !has_e), op,
                    ": flags[NOISE] is NONE but the S or E bit of flags[TERMS] is set (those "
                    "terms need z)");
  TORCH_CHECK_VALUE(p.clip != Clip::STATIC || p.clip_value > 0.0, op,
                    ": scalars[CLIP] must be > 0 for Clip.STATIC, got ", p.clip_value);
}

// ins / t / seeds / table / thresh / gscale: everything forward and backward share.
inline void common_args(LaunchChecker& ck, StepParams& p, const OptTensorList& ins,
                        const at::Tensor& t, const OptTensor& seeds, const at::Tensor& table,
                        const OptTensor& thresh, const OptTensor& gscale,
                        c10::IntArrayRef flags, c10::ArrayRef<double> scalars) {
  const char* op = ck.op;
  int layout = Layout::CONTIGUOUS;
  decode_flags(op, flags, scalars, p, &layout);
  TORCH_CHECK_VALUE(ins.size() == NUM_IN, op, ": ins must have ", NUM_IN,
                    " entries (contract.In: X M MC V Z H), got ", ins.size());
  const OptTensor x = ins.get(In::X);
  TORCH_CHECK_VALUE(x.has_value(), op, ": ins[X] is required");
  ck.reference("ins[X]", *x, layout);
  ck.geometry(p);

  auto has = [&](int col) { return ((p.terms >> col) & 1) != 0; };
  // Which streams the launch needs (docs/kernels.md).
  bool need[NUM_IN];
  need[In::X] = true;
  need[In::M] = has(Col::W) || has(Col::R);
  need[In::MC] = ins.get(In::MC).has_value();  // guided iff given
  need[In::V] = p.var != Var::FIXED;
  need[In::Z] = p.noise == Noise::EXTERNAL;
  need[In::H] = has(Col::H);
  for (int i = 0; i < NUM_IN; ++i) {
    const OptTensor a = ins.get(i);
    const std::string name = std::string("ins[") + stream_name(i) + "]";
    if (i == In::M && !need[i]) {
      // M may be left out when neither the W nor the R term reads it
    } else if (need[i]) {
      TORCH_CHECK_VALUE(a.has_value(), op, ": ", name, " is required by this launch (",
                        i == In::M ? "the W or R bit of flags[TERMS] is set"
                        : i == In::V ? "flags[VAR] is not FIXED"
                        : i == In::Z ? "flags[NOISE] is EXTERNAL"
                                     : "the H bit of flags[TERMS] is set",
                        ")");
    } else {
      TORCH_CHECK_VALUE(!a.has_value(), op, ": ", name, " must be None for this launch (",
                        i == In::V ? "flags[VAR] is FIXED"
                        : i == In::Z ? "flags[NOISE] is not EXTERNAL"
                                     : "the H bit of flags[TERMS] is clear",
                        ")");
    }
    if (a.has_value() && i != In::X) p.in[i] = ck.like(name, *a, false);
  }
  p.in[In::X] = ck.like("ins[X]", *x, false);
  if (!need[In::M]) p.in[In::M] = Stream();  // given but unread
  p.guided = ins.get(In::MC).has_value();

  p.t = ck.per_sample<int64_t>("t", t, at::kLong);
  if (p.noise == Noise::PHILOX) {
    TORCH_CHECK_VALUE(seeds.has_value(), op, ": seeds is required when flags[NOISE] is PHILOX");
    p.seeds = ck.per_sample<int64_t>("seeds", *seeds, at::kLong);
  } else {
    TORCH_CHECK_VALUE(!seeds.has_value(), op, ": seeds must be None unless flags[NOISE] is PHILOX");
  }
  if (p.clip == Clip::DYNAMIC) {
    TORCH_CHECK_VALUE(thresh.has_value(), op, ": thresh is required when flags[CLIP] is DYNAMIC");
    p.thresh = ck.per_sample<float>("thresh", *thresh, at::kFloat);
  } else {
    TORCH_CHECK_VALUE(!thresh.has_value(), op,
                      ": thresh must be None unless flags[CLIP] is DYNAMIC");
  }
  if (gscale.has_value()) {
    TORCH_CHECK_VALUE(p.guided, op, ": gscale is given but ins[MC] is None (not a guided step)");
    p.gscale = ck.per_sample<float>("gscale", *gscale, at::kFloat);
  }
  const auto table_dt = ck.x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_TYPE(table.scalar_type() == table_dt, op, ": table must be ", table_dt, " for ",
                   ck.x.scalar_type(), " inputs, got ", table.scalar_type());
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(1) == NUM_COLS && table.size(0) >= 1, op,
                    ": table must have shape [R, ", NUM_COLS, "] with R >= 1, got ",
                    table.sizes());
  TORCH_CHECK_VALUE(table.is_contiguous(), op, ": table must be contiguous");
  TORCH_CHECK_VALUE(table.device() == ck.x.device(), op, ": table must be on ", ck.x.device(),
                    ", got ", table.device());
  p.table = table.data_ptr();
  p.rows = table.size(0);
}

inline StepParams forward_params(const char* op, bool allow_f64, const OptTensorList& ins,
                                 const at::Tensor& t, const OptTensor& seeds,
                                 const at::Tensor& table, const OptTensor& thresh,
                                 const OptTensor& gscale, const OptTensorList& outs,
                                 c10::IntArrayRef flags, c10::ArrayRef<double> scalars) {
  LaunchChecker ck(op, allow_f64);
  StepParams p;
  common_args(ck, p, ins, t, seeds, table, thresh, gscale, flags, scalars);
  TORCH_CHECK_VALUE(outs.size() == NUM_OUT, op, ": outs must have ", NUM_OUT,
                    " entries (contract.Out: Y X0), got ", outs.size());
  TORCH_CHECK_VALUE(outs.get(Out::Y).has_value(), op, ": outs[Y] is required");
  for (int i = 0; i < NUM_OUT; ++i) {
    const OptTensor a = outs.get(i);
    if (a.has_value()) p.out[i] = ck.like(std::string("outs[") + out_name(i) + "]", *a, true);
  }
  p.need_xh = p.clip != Clip::NONE || ((p.terms >> Col::P) & 1) || p.out[Out::X0].data != nullptr;
  return p;
}

inline StepParams backward_params(const char* op, bool allow_f64, const OptTensorList& ins,
                                  const at::Tensor& grad_y, const OptTensor& grad_x0,
                                  const at::Tensor& t, const OptTensor& seeds,
                                  const at::Tensor& table, const OptTensor& thresh,
                                  const OptTensor& gscale, const OptTensorList& grads,
                                  c10::IntArrayRef flags, c10::ArrayRef<double> scalars) {
  LaunchChecker ck(op, allow_f64);
  StepParams p;
  common_args(ck, p, ins, t, seeds, table, thresh, gscale, flags, scalars);
  p.grad_y = ck.like("grad_y", grad_y, false);
  if (grad_x0.has_value()) p.grad_x0 = ck.like("grad_x0", *grad_x0, false);
  TORCH_CHECK_VALUE(grads.size() == NUM_IN, op, ": grads must have ", NUM_IN,
                    " entries (contract.In: X M MC V Z H), got ", grads.size());
  for (int i = 0; i < NUM_IN; ++i) {
    const OptTensor g = grads.get(i);
    if (!g.has_value()) continue;
    TORCH_CHECK_VALUE(ins.get(i).has_value(), op, ": grads[", stream_name(i), "] is given but ins[",
                      stream_name(i), "] is None");
    p.grad[i] = ck.like(std::string("grads[") + stream_name(i) + "]", *g, true);
  }
  p.need_xh = ((p.terms >> Col::P) & 1) || grad_x0.has_value();
  return p;
}

inline void check_philox_args(const char* op, const at::Tensor& seeds, const at::Tensor& t,
                              int64_t stream) {
  TORCH_CHECK_TYPE(seeds.scalar_type() == at::kLong, op, ": seeds must be int64, got ",
                   seeds.scalar_type());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": t must be int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(seeds.dim() == 1 && t.dim() == 1 && seeds.size(0) == t.size(0), op,
                    ": seeds and t must have shape [B], got ", seeds.sizes(), " and ", t.sizes());
  TORCH_CHECK_VALUE(seeds.device() == t.device(), op, ": seeds and t must be on one device, got ",
                    seeds.device(), " and ", t.device());
  check_noise_stream(op, "stream", stream);
}

// philox_normal_kernel's arguments -> the StepParams fields its kernels read.
inline StepParams normal_params(const char* op, bool allow_f64, const at::Tensor& seeds,
                                const at::Tensor& t, int64_t stream, int64_t layout,
                                const at::Tensor& out, Stream* out_stream) {
  check_philox_args(op, seeds, t, stream);
  TORCH_CHECK_VALUE(layout == Layout::CONTIGUOUS || layout == Layout::CHANNELS_LAST, op,
                    ": layout must be a Layout value (CONTIGUOUS ", int(Layout::CONTIGUOUS),
                    ", CHANNELS_LAST ", int(Layout::CHANNELS_LAST), "), got ", layout);
  LaunchChecker ck(op, allow_f64);
  ck.reference("out", out, static_cast<int>(layout));
  StepParams p;
  ck.geometry(p);
  *out_stream = ck.like("out", out, true);
  p.t = ck.per_sample<int64_t>("t", t, at::kLong);
  p.seeds = ck.per_sample<int64_t>("seeds", seeds, at::kLong);
  p.noise = Noise::PHILOX;
  p.noise_stream = static_cast<uint32_t>(stream);
  return p;
}

}  // namespace fused_ddpm
