"""Backend dispatch: one module per backend.

``"triton"``: fused kernels, one launch per branch over the whole plan (``forward_all``,
``backward_all``); CUDA, fp16/bf16, head_dim in {16, 32, 64, 128}.
``"sdpa"``: PyTorch's fused kernels with log-sum-exp, per (branch, offset) block (CPU
flash; CUDA flash or memory-efficient). ``"math"``: portable matmul path, any device and
dtype. The block backends take (b, S, c, h, d) views (see ``math`` for the contract).
"""

from __future__ import annotations

import os

from types import ModuleType

import torch

from . import math, sdpa, triton

BACKENDS = {"math": math, "sdpa": sdpa, "triton": triton}


def select_block(q: torch.Tensor) -> ModuleType:
    """The fastest backend with per-block ``forward``/``backward`` (the ring attends to pieces)."""
    return sdpa if sdpa.supports(q) else math


def select(q: torch.Tensor, name: str | None = None) -> ModuleType:
    """The backend named, or (name None or "") the fastest that supports q's device, dtype, head_dim."""
    if name:
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)} or None, got {name!r}")
        if name == "sdpa" and not sdpa.supports(q):
            raise ValueError(f"backend 'sdpa' does not support {q.device.type} {q.dtype} head_dim={q.shape[-1]}")
        if name == "triton" and not (triton.supports(q) or _interpreted(q)):
            raise ValueError(
                f"backend 'triton' needs Triton and a CUDA fp16/bf16 input with head_dim in {triton.HEAD_DIMS} "
                f"(or TRITON_INTERPRET=1 for CPU tensors); got {q.device.type} {q.dtype} head_dim={q.shape[-1]}"
            )
        return BACKENDS[name]
    return triton if triton.supports(q) else select_block(q)


def _interpreted(q: torch.Tensor) -> bool:
    """Triton's interpreter runs the kernels on CPU tensors (tests of the kernels' logic)."""
    return triton.available() and q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
