"""Backend dispatch: one module per backend, one interface (``base.Backend``) for all.

``"triton"``: fused kernels: one launch for a paper-mode plan (``triton_fused``; causal where
that ran faster), else one per branch over the whole plan (every packed document; the ring's
chunks too), and one per block for the ring's pieces; CUDA, fp16/bf16/fp32 (fp32 dots as
3xTF32), head_dim in {16, 32, 64, 128}.
``"sdpa"``: PyTorch's fused kernels with log-sum-exp, per (branch, offset) block (CPU
flash; CUDA flash or memory-efficient). ``"math"``: portable matmul path, any device and
dtype. ``select`` takes the first backend (in that order) with no reason to decline the
input; naming one that declines raises with its reasons.
"""

from __future__ import annotations

import torch

from .base import Backend, block_grad_inputs
from .math import Math
from .sdpa import Sdpa
from .triton import Triton

BACKENDS: dict[str, Backend] = {b.name: b for b in (Triton(), Sdpa(), Math())}  # in order of preference

__all__ = ["BACKENDS", "Backend", "block_grad_inputs", "check_name", "select"]


def check_name(name: str | None) -> None:
    if name and name not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)} or None, got {name!r}")


def select(q: torch.Tensor, name: str | None = None, masked: bool = False) -> Backend:
    """The backend named, or (name None or "") the first that takes q's device, dtype and head_dim
    (``masked``: and a key padding mask)."""
    check_name(name)
    if name:
        reasons = BACKENDS[name].not_supported_reasons(q, masked)
        if reasons:
            raise ValueError(f"backend {name!r} cannot take this input: {'; '.join(reasons)}")
        return BACKENDS[name]
    return next(b for b in BACKENDS.values() if not b.not_supported_reasons(q, masked))  # math takes every input
