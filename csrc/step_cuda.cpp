// Thin torch binding of the CUDA kernels (step_kernels.cu): argument checks shared with the
// CPU backend (step_common.h), device guard, launch on the current stream. Registered into
// the fused_ddpm namespace defined by fused_ddpm._C (load that library first).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "step_common.h"
#include "step_launch.h"

namespace fused_ddpm {
namespace {

void step_forward_kernel_cuda(const at::Tensor& x, const at::Tensor& m, const OptTensor& v,
                              const OptTensor& noise, const OptTensor& seeds,
                              const at::Tensor& t, const at::Tensor& table,
                              const OptTensor& thresh, const at::Tensor& y, const OptTensor& x0,
                              double clip, int64_t clip_mode, int64_t var_mode) {
  TORCH_CHECK(x.is_cuda(), "step_forward_kernel (CUDA): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const StepParams p = forward_params("step_forward_kernel", /*allow_f64=*/false, x, m, v, noise,
                                      seeds, t, table, thresh, y, x0, clip, clip_mode, var_mode);
  C10_CUDA_CHECK(launch_step_forward(p, c10::cuda::getCurrentCUDAStream(x.device().index())));
}

void step_backward_kernel_cuda(const at::Tensor& grad_y, const OptTensor& grad_x0,
                               const at::Tensor& x, const at::Tensor& m, const OptTensor& v,
                               const OptTensor& noise, const OptTensor& seeds,
                               const at::Tensor& t, const at::Tensor& table,
                               const OptTensor& thresh, const at::Tensor& grad_x,
                               const at::Tensor& grad_m, const OptTensor& grad_v,
                               const OptTensor& grad_noise, double clip, int64_t clip_mode,
                               int64_t var_mode) {
  TORCH_CHECK(x.is_cuda(), "step_backward_kernel (CUDA): x must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const StepParams p = backward_params("step_backward_kernel", /*allow_f64=*/false, grad_y,
                                       grad_x0, x, m, v, noise, seeds, t, table, thresh, grad_x,
                                       grad_m, grad_v, grad_noise, clip, clip_mode, var_mode);
  C10_CUDA_CHECK(launch_step_backward(p, c10::cuda::getCurrentCUDAStream(x.device().index())));
}

at::Tensor philox_uint32_kernel_cuda(const at::Tensor& seeds, const at::Tensor& t, int64_t numel) {
  check_philox_args("philox_uint32", seeds, t, numel);
  TORCH_CHECK(seeds.is_cuda(), "philox_uint32 (CUDA): seeds must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(seeds.device());
  const int64_t B = seeds.size(0);
  at::Tensor out = at::empty({B, numel}, seeds.options().dtype(at::kLong));
  C10_CUDA_CHECK(launch_philox_uint32(seeds.data_ptr<int64_t>(), seeds.stride(0),
                                      t.data_ptr<int64_t>(), t.stride(0), B, numel,
                                      out.data_ptr<int64_t>(),
                                      c10::cuda::getCurrentCUDAStream(seeds.device().index())));
  return out;
}

}  // namespace
}  // namespace fused_ddpm

TORCH_LIBRARY_IMPL(fused_ddpm, CUDA, m) {
  m.impl("step_forward_kernel", &fused_ddpm::step_forward_kernel_cuda);
  m.impl("step_backward_kernel", &fused_ddpm::step_backward_kernel_cuda);
  m.impl("philox_uint32", &fused_ddpm::philox_uint32_kernel_cuda);
}
