"""Backend dispatch: one module per backend.

``"triton"``: fused kernels, one launch per branch over the whole plan (``forward_all``,
``backward_all``) and one per block for the ring; CUDA, fp16/bf16, head_dim in {16, 32, 64, 128}.
``"sdpa"``: PyTorch's fused kernels with log-sum-exp, per (branch, offset) block (CPU
flash; CUDA flash or memory-efficient). ``"math"``: portable matmul path, any device and
dtype. Every backend attends (b, S, c, h, d) blocks (``attend_``, ``attend_backward_``).
"""

from __future__ import annotations

import os

from types import ModuleType

import torch

from ..merge import merge_
from . import math, sdpa, triton

BACKENDS = {"math": math, "sdpa": sdpa, "triton": triton}


def check_name(name: str | None) -> None:
    if name and name not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)} or None, got {name!r}")


def select(q: torch.Tensor, name: str | None = None) -> ModuleType:
    """The backend named, or (name None or "") the fastest that supports q's device, dtype, head_dim."""
    check_name(name)
    if name:
        if name == "sdpa" and not sdpa.supports(q):
            raise ValueError(f"backend 'sdpa' does not support {q.device.type} {q.dtype} head_dim={q.shape[-1]}")
        if name == "triton" and not (triton.supports(q) or _interpreted(q)):
            raise ValueError(
                f"backend 'triton' needs Triton and a CUDA fp16/bf16 input with head_dim in {triton.HEAD_DIMS} "
                f"(or TRITON_INTERPRET=1 for CPU tensors); got {q.device.type} {q.dtype} head_dim={q.shape[-1]}"
            )
        return BACKENDS[name]
    if triton.supports(q):
        return triton
    return sdpa if sdpa.supports(q) else math


def attend_(impl: ModuleType, out, lse, q, k, v, scale: float, causal: bool) -> None:
    """Merge the attention of q over (k, v) into the accumulators (out, lse) in place.

    q, out: (b, S, c, h, d); k, v: (b, S, c_k, h, d); lse: (b, S, c, h).
    """
    if impl is triton:
        triton.attend_(out, lse, q, k, v, scale, causal)
    else:
        merge_(out, lse, *impl.forward(q, k, v, scale, causal))


def attend_backward_(impl: ModuleType, dq, dk, dv, dout, q, k, v, out, lse, scale: float, causal: bool) -> None:
    """Add one block's gradients against the merged (out, lse) into dq, dk, dv (views as in ``attend_``)."""
    if impl is triton:
        triton.attend_backward_(dq, dk, dv, dout, q, k, v, out, lse, scale, causal)
        return
    gq, gk, gv = impl.backward(dout, q, k, v, out, lse, scale, causal)
    dq.add_(gq)
    dk.add_(gk)
    dv.add_(gv)


def _interpreted(q: torch.Tensor) -> bool:
    """Triton's interpreter runs the kernels on CPU tensors (tests of the kernels' logic)."""
    return triton.available() and q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
