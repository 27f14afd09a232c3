// Op schemas of the fused_ddpm namespace (placeholder until the kernels land).
#include <torch/library.h>
#include <ATen/ATen.h>

namespace fused_ddpm {
at::Tensor extension_version() { return at::tensor({1}, at::kLong); }
}  // namespace fused_ddpm

TORCH_LIBRARY(fused_ddpm, m) {
  m.def("extension_version() -> Tensor");
  m.impl("extension_version", &fused_ddpm::extension_version);
}
