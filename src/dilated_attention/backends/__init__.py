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
    if name is not None and not isinstance(name, str):
        raise TypeError(f"backend must be a str (one of {sorted(BACKENDS)}) or None, got {type(name).__name__}")
    if name and name not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)} or None, got {name!r}")


_PICKED: dict = {}  # (name, device type, dtype, head_dim, masked) -> backend: what ``select`` returned


def select(q: torch.Tensor, name: str | None = None, masked: bool = False) -> Backend:
    """The backend named, or (name None or "") the first that takes q's device, dtype and head_dim
    (``masked``: and a key padding mask). Each kind of input is decided once (``not_supported_reasons``
    looks at nothing else); under ``torch.compile`` it is decided while tracing."""
    check_name(name)
    if torch.compiler.is_compiling():
        return _decide(q, name, masked)
    key = (name, q.device.type, q.dtype, q.shape[-1], masked)
    impl = _PICKED.get(key)
    if impl is None:
        impl = _PICKED[key] = _decide(q, name, masked)
    return impl


def _decide(q: torch.Tensor, name: str | None, masked: bool) -> Backend:
    if name:
        reasons = BACKENDS[name].not_supported_reasons(q, masked)
        if reasons:
            raise ValueError(f"backend {name!r} cannot take this input: {'; '.join(reasons)}")
        return BACKENDS[name]
    return next(b for b in BACKENDS.values() if not b.not_supported_reasons(q, masked))  # math takes every input
