"""Triton backend of fused-ddpm (installed as ``fused_ddpm.triton_kernels``).

The launchers take the arguments of the C++ ops of docs/kernels.md in the same order (Python
lists for the list arguments), check them with the same messages, write into the given
outputs, return None (``philox_uint32`` returns its words) and launch on the current stream.
"""
from .noise import philox_normal, philox_uint32
from .step import step_backward, step_forward

__all__ = ["philox_normal", "philox_uint32", "step_backward", "step_forward"]
