// Op schemas of the fused_ddpm namespace (defined once, here, in fused_ddpm._C) and their
// CPU implementations. The CUDA implementations live in fused_ddpm._C_cuda (step_cuda.cpp),
// loaded after this library. Contract: docs/kernels.md.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "noise_cpu.h"
#include "step_common.h"
#include "step_cpu.h"

namespace fused_ddpm {
namespace {

void step_forward_kernel_cpu(const OptTensorList& ins, const at::Tensor& t,
                             const OptTensor& seeds, const at::Tensor& table,
                             const OptTensor& thresh, const OptTensor& gscale,
                             const OptTensorList& outs, c10::IntArrayRef flags,
                             c10::ArrayRef<double> scalars) {
  const StepParams p = forward_params("step_forward_kernel", /*allow_f64=*/true, ins, t, seeds,
                                      table, thresh, gscale, outs, flags, scalars);
  step_forward_cpu(p);
}

void step_backward_kernel_cpu(const OptTensorList& ins, const at::Tensor& grad_y,
                              const OptTensor& grad_x0, const at::Tensor& t,
                              const OptTensor& seeds, const at::Tensor& table,
                              const OptTensor& thresh, const OptTensor& gscale,
                              const OptTensorList& grads, c10::IntArrayRef flags,
                              c10::ArrayRef<double> scalars) {
  const StepParams p =
      backward_params("step_backward_kernel", /*allow_f64=*/true, ins, grad_y, grad_x0, t, seeds,
                      table, thresh, gscale, grads, flags, scalars);
  step_backward_cpu(p);
}

at::Tensor philox_uint32_cpu_op(const at::Tensor& seeds, const at::Tensor& t, int64_t numel,
                                int64_t stream) {
  check_philox_args("philox_uint32", seeds, t, stream);
  TORCH_CHECK_VALUE(numel >= 0, "philox_uint32: numel must be >= 0, got ", numel);
  const int64_t B = seeds.size(0);
  at::Tensor out = at::empty({B, numel}, seeds.options().dtype(at::kLong));
  philox_uint32_cpu(seeds.data_ptr<int64_t>(), seeds.stride(0), t.data_ptr<int64_t>(),
                    t.stride(0), static_cast<uint32_t>(stream), B, numel,
                    out.data_ptr<int64_t>());
  return out;
}

void philox_normal_kernel_cpu(const at::Tensor& seeds, const at::Tensor& t, int64_t stream,
                              int64_t layout, const at::Tensor& out) {
  Stream dst;
  const StepParams p = normal_params("philox_normal_kernel", /*allow_f64=*/true, seeds, t,
                                     stream, layout, out, &dst);
  philox_normal_cpu(p, dst);
}

std::string build_info() {
  std::string s = "fused_ddpm._C: cpu kernels, noise ";
  s += cpu_noise_isa();
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
      "step_forward_kernel(Tensor?[] ins, Tensor t, Tensor? seeds, Tensor table, "
      "Tensor? thresh, Tensor? gscale, Tensor(a!)?[] outs, int[] flags, float[] scalars) -> ()");
  m.def(
      "step_backward_kernel(Tensor?[] ins, Tensor grad_y, Tensor? grad_x0, Tensor t, "
      "Tensor? seeds, Tensor table, Tensor? thresh, Tensor? gscale, Tensor(a!)?[] grads, "
      "int[] flags, float[] scalars) -> ()");
  m.def("philox_uint32(Tensor seeds, Tensor t, int numel, int stream) -> Tensor");
  m.def(
      "philox_normal_kernel(Tensor seeds, Tensor t, int stream, int layout, Tensor(a!) out) "
      "-> ()");
  m.def("build_info() -> str", &fused_ddpm::build_info);
}

TORCH_LIBRARY_IMPL(fused_ddpm, CPU, m) {
  m.impl("step_forward_kernel", &fused_ddpm::step_forward_kernel_cpu);
  m.impl("step_backward_kernel", &fused_ddpm::step_backward_kernel_cpu);
  m.impl("philox_uint32", &fused_ddpm::philox_uint32_cpu_op);
  m.impl("philox_normal_kernel", &fused_ddpm::philox_normal_kernel_cpu);
}
