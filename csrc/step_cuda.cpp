// Thin torch binding of the CUDA kernels (step_kernels.cu): the argument checks shared with
// the CPU backend (step_common.h), a device guard, the launch on the current stream.
// Registered into the fused_ddpm namespace defined by fused_ddpm._C (load that library first).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "step_common.h"
#include "step_launch.h"

namespace fused_ddpm {
namespace {

cudaStream_t current_stream(const at::Tensor& a) {
  return c10::cuda::getCurrentCUDAStream(a.device().index());
}

void step_forward_kernel_cuda(const OptTensorList& ins, const at::Tensor& t,
                              const OptTensor& seeds, const at::Tensor& table,
                              const OptTensor& thresh, const OptTensor& gscale,
                              const OptTensorList& outs, c10::IntArrayRef flags,
                              c10::ArrayRef<double> scalars) {
  TORCH_CHECK_VALUE(t.is_cuda(), "step_forward_kernel (CUDA): t must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(t.device());
  const StepParams p = forward_params("step_forward_kernel", /*allow_f64=*/false, ins, t, seeds,
                                      table, thresh, gscale, outs, flags, scalars);
  C10_CUDA_CHECK(launch_step_forward(p, current_stream(t)));
}

void step_backward_kernel_cuda(const OptTensorList& ins, const at::Tensor& grad_y,
                               const OptTensor& grad_x0, const at::Tensor& t,
                               const OptTensor& seeds, const at::Tensor& table,
                               const OptTensor& thresh, const OptTensor& gscale,
                               const OptTensorList& grads, c10::IntArrayRef flags,
                               c10::ArrayRef<double> scalars) {
  TORCH_CHECK_VALUE(t.is_cuda(), "step_backward_kernel (CUDA): t must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(t.device());
  const StepParams p =
      backward_params("step_backward_kernel", /*allow_f64=*/false, ins, grad_y, grad_x0, t,
                      seeds, table, thresh, gscale, grads, flags, scalars);
  C10_CUDA_CHECK(launch_step_backward(p, current_stream(t)));
}

at::Tensor philox_uint32_cuda(const at::Tensor& seeds, const at::Tensor& t, int64_t numel,
                              int64_t stream) {
  check_philox_args("philox_uint32", seeds, t, stream);
  TORCH_CHECK_VALUE(numel >= 0, "philox_uint32: numel must be >= 0, got ", numel);
  TORCH_CHECK_VALUE(seeds.is_cuda(), "philox_uint32 (CUDA): seeds must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(seeds.device());
  const int64_t B = seeds.size(0);
  at::Tensor out = at::empty({B, numel}, seeds.options().dtype(at::kLong));
  C10_CUDA_CHECK(launch_philox_uint32(seeds.data_ptr<int64_t>(), seeds.stride(0),
                                      t.data_ptr<int64_t>(), t.stride(0),
                                      static_cast<uint32_t>(stream), B, numel,
                                      out.data_ptr<int64_t>(), current_stream(seeds)));
  return out;
}

void philox_normal_kernel_cuda(const at::Tensor& seeds, const at::Tensor& t, int64_t stream,
                               int64_t layout, const at::Tensor& out) {
  TORCH_CHECK_VALUE(out.is_cuda(), "philox_normal_kernel (CUDA): out must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(out.device());
  Stream dst;
  const StepParams p = normal_params("philox_normal_kernel", /*allow_f64=*/false, seeds, t,
                                     stream, layout, out, &dst);
  C10_CUDA_CHECK(launch_philox_normal(p, dst, current_stream(out)));
}

}  // namespace
}  // namespace fused_ddpm

TORCH_LIBRARY_IMPL(fused_ddpm, CUDA, m) {
  m.impl("step_forward_kernel", &fused_ddpm::step_forward_kernel_cuda);
  m.impl("step_backward_kernel", &fused_ddpm::step_backward_kernel_cuda);
  m.impl("philox_uint32", &fused_ddpm::philox_uint32_cuda);
  m.impl("philox_normal_kernel", &fused_ddpm::philox_normal_kernel_cuda);
}
