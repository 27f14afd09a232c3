"""``python -m fused_ddpm.sample``: the main-job CLI (its code is :mod:`fused_ddpm.sample_cli`).

``fused_ddpm.sample`` is, and stays, the sampling-loop *function*
(:func:`fused_ddpm.sampler.sample`). This file exists only so that ``python -m
fused_ddpm.sample`` and ``torchrun -m fused_ddpm.sample`` find the CLI. When it is imported
instead (``import fused_ddpm.sample``), it puts the function in its own place in
``sys.modules``; the import system then binds that entry to the package attribute, so
``fused_ddpm.sample`` is the same function before and after the import. For the CLI from
Python, call :func:`fused_ddpm.sample_cli.main` (``runpy.run_module("fused_ddpm.sample")``
works too, as long as nothing in the process has imported ``fused_ddpm.sample`` before).
"""
import sys

if __name__ == "__main__":
    from fused_ddpm.sample_cli import main

    sys.exit(main())
else:
    from .sampler import sample as _sample

    sys.modules[__name__] = _sample
