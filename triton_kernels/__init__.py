"""Triton backend of fused-ddpm (installed as ``fused_ddpm.triton_kernels``).

The launchers take the arguments of the C++ ops of docs/kernels.md in the same order (Python
lists for the list arguments), check them with the same messages, write into the given
outputs, return None (``philox_uint32`` returns its words) and launch on the current stream.
The ``*_unchecked`` twins skip the checks, for arguments that were checked before (a
prepared step).
"""
from .noise import philox_normal, philox_normal_unchecked, philox_uint32, philox_uint32_unchecked
from .step import step_backward, step_backward_unchecked, step_forward, step_forward_unchecked

__all__ = ["philox_normal", "philox_uint32", "step_backward", "step_forward",
           "philox_normal_unchecked", "philox_uint32_unchecked", "step_backward_unchecked",
           "step_forward_unchecked"]
