"""Backend dispatch: one module per backend, each with ``forward`` and ``backward`` over
(b, S, c, h, d) blocks (see ``math`` for the contract).

``"sdpa"``: PyTorch's fused kernels with log-sum-exp (CPU flash; CUDA flash or
memory-efficient). ``"math"``: portable matmul path, any device and dtype.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import math, sdpa

BACKENDS = {"math": math, "sdpa": sdpa}


def select(q: torch.Tensor, name: str | None = None) -> ModuleType:
    """The backend named, or (name None or "") the fastest that supports q's device, dtype, head_dim."""
    if name:
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)} or None, got {name!r}")
        if name == "sdpa" and not sdpa.supports(q):
            raise ValueError(f"backend 'sdpa' does not support {q.device.type} {q.dtype} head_dim={q.shape[-1]}")
        return BACKENDS[name]
    return sdpa if sdpa.supports(q) else math
