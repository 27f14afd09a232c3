// Op schemas of the fused_ddpm namespace (defined once, here, in fused_ddpm._C) and their
// CPU implementations. The CUDA implementations live in fused_ddpm._C_cuda (step_cuda.cpp),
// loaded after this library. Contract: docs/kernels.md.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "step_common.h"
#include "step_cpu.h"

namespace fused_ddpm {
namespace {

void step_forward_kernel_cpu(const at::Tensor& x, const at::Tensor& m, const OptTensor& v,
                             const OptTensor& noise, const OptTensor& seeds, const at::Tensor& t,
                             const at::Tensor& table, const OptTensor& thresh,
                             const at::Tensor& y, const OptTensor& x0, double clip,
                             int64_t clip_mode, int64_t var_mode) {
  const StepParams p = forward_params("step_forward_kernel", /*allow_f64=*/true, x, m, v, noise,
                                      seeds, t, table, thresh, y, x0, clip, clip_mode, var_mode);
  step_forward_cpu(p);
}

void step_backward_kernel_cpu(const at::Tensor& grad_y, const OptTensor& grad_x0,
                              const at::Tensor& x, const at::Tensor& m, const OptTensor& v,
                              const OptTensor& noise, const OptTensor& seeds,
                              const at::Tensor& t, const at::Tensor& table,
                              const OptTensor& thresh, const at::Tensor& grad_x,
                              const at::Tensor& grad_m, const OptTensor& grad_v,
                              const OptTensor& grad_noise, double clip, int64_t clip_mode,
                              int64_t var_mode) {
  const StepParams p = backward_params("step_backward_kernel", /*allow_f64=*/true, grad_y,
                                       grad_x0, x, m, v, noise, seeds, t, table, thresh, grad_x,
                                       grad_m, grad_v, grad_noise, clip, clip_mode, var_mode);
  step_backward_cpu(p);
}

at::Tensor philox_uint32_kernel_cpu(const at::Tensor& seeds, const at::Tensor& t, int64_t numel) {
  check_philox_args("philox_uint32", seeds, t, numel);
  const int64_t B = seeds.size(0);
  at::Tensor out = at::empty({B, numel}, seeds.options().dtype(at::kLong));
  philox_uint32_cpu(seeds.data_ptr<int64_t>(), seeds.stride(0), t.data_ptr<int64_t>(),
                    t.stride(0), B, numel, out.data_ptr<int64_t>());
  return out;
}

std::string build_info() {
  std::string s = "fused_ddpm._C: cpu kernels";
#if defined(_OPENMP)
  s += ", openmp";
#else
  s += ", no openmp (serial)";
#endif
#if defined(__VERSION__)
  s += ", compiler ";
  s += __VERSION__;
#endif
  return s;
}

}  // namespace
}  // namespace fused_ddpm

TORCH_LIBRARY(fused_ddpm, m) {
  m.def(
      "step_forward_kernel(Tensor x, Tensor m, Tensor? v, Tensor? noise, Tensor? seeds, "
      "Tensor t, Tensor table, Tensor? thresh, Tensor(a!) y, Tensor(b!)? x0, float clip, "
      "int clip_mode, int var_mode) -> ()");
  m.def(
      "step_backward_kernel(Tensor grad_y, Tensor? grad_x0, Tensor x, Tensor m, Tensor? v, "
      "Tensor? noise, Tensor? seeds, Tensor t, Tensor table, Tensor? thresh, Tensor(a!) grad_x, "
      "Tensor(b!) grad_m, Tensor(c!)? grad_v, Tensor(d!)? grad_noise, float clip, "
      "int clip_mode, int var_mode) -> ()");
  m.def("philox_uint32(Tensor seeds, Tensor t, int numel) -> Tensor");
  m.def("build_info() -> str", &fused_ddpm::build_info);
}

TORCH_LIBRARY_IMPL(fused_ddpm, CPU, m) {
  m.impl("step_forward_kernel", &fused_ddpm::step_forward_kernel_cpu);
  m.impl("step_backward_kernel", &fused_ddpm::step_backward_kernel_cpu);
  m.impl("philox_uint32", &fused_ddpm::philox_uint32_kernel_cpu);
}
