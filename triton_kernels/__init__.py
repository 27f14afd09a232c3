"""Triton backend of fused-ddpm (installed as ``fused_ddpm.triton_kernels``).

Launch functions follow docs/kernels.md exactly: they write into the given outputs, return
None, do not validate user input and launch on the current stream.
"""
from .philox import philox_uint32
from .step import step_backward, step_forward

__all__ = ["philox_uint32", "step_backward", "step_forward"]
