"""Fused backend: PyTorch's own attention kernels that return the log-sum-exp.

CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (all float dtypes).
CUDA: ``aten._scaled_dot_product_flash_attention`` (fp16/bf16, head_dim <= 256, multiple
of 8) or ``aten._scaled_dot_product_efficient_attention`` (float32). Both backward kernels
take the merged (out, lse), which makes each block's gradient exact for Eq. 10.

Blocks are laid out (b, S, c, h, d) and handed to the kernels as (b*S, h, c, d). The CPU
kernel returns zeros instead of NaN for some blocks with a NaN input (single-row blocks), so
CPU blocks holding a non-finite value are computed by the portable math backend instead, as
are causal blocks whose queries are the last rows of their keys (the kernels align causal
masks top-left): the one partly queried segment when q is shorter than k.
"""

from __future__ import annotations

import torch

from . import math
from .base import BlockBackend

aten = torch.ops.aten
MAX_GRID_Y = 65_535  # the CUDA kernels put batch x segments on a grid axis of this many programs


def _kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """(b, S, c, h, d) -> (b*S, h, c, d), a view where the strides allow it."""
    b, segments, rows, heads, d = x.shape
    x = x.reshape(b * segments, rows, heads, d)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.transpose(1, 2)


def _block_layout(x: torch.Tensor, b: int) -> torch.Tensor:
    """(b*S, h, c, *rest) -> (b, S, c, h, *rest)."""
    return x.transpose(1, 2).unflatten(0, (b, -1))


def _flash(q) -> bool:
    return q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)


def forward(q, k, v, scale: float, causal: bool):
    """q, k, v: (b, S, c, h, d) -> out (b, S, c, h, d) in q.dtype, lse (b, S, c, h) float32."""
    b, rows = q.shape[0], q.shape[2]
    qk, kk, vk = _kernel_layout(q), _kernel_layout(k), _kernel_layout(v)
    if q.device.type == "cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(qk, kk, vk, 0.0, causal, scale=scale)
    elif _flash(q):
        out, lse = aten._scaled_dot_product_flash_attention(qk, kk, vk, 0.0, causal, False, scale=scale)[:2]
    else:
        out, lse = aten._scaled_dot_product_efficient_attention(qk, kk, vk, None, True, 0.0, causal, scale=scale)[:2]
        lse = lse[..., :rows]
    return _block_layout(out, b), _block_layout(lse, b)


def backward(dout, q, k, v, out, lse, scale: float, causal: bool):
    """Gradients of one block against the merged (out, lse) of its rows.

    dout, q, out, k, v: (b, S, c, h, d) in q.dtype; lse: (b, S, c, h) float32.
    Returns dq, dk, dv (b, S, c, h, d) in q.dtype.
    """
    b, rows = q.shape[0], q.shape[2]
    qk, kk, vk = _kernel_layout(q), _kernel_layout(k), _kernel_layout(v)
    ok, dok = _kernel_layout(out), _kernel_layout(dout)
    lk = lse.reshape(-1, rows, lse.shape[-1]).transpose(1, 2).contiguous()
    if q.device.type == "cpu":
        grads = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dok, qk, kk, vk, ok, lk, 0.0, causal, scale=scale
        )
    elif _flash(q):
        # None: no varlen sequence offsets, no dropout RNG state
        grads = aten._scaled_dot_product_flash_attention_backward(
            dok, qk, kk, vk, ok, lk, None, None, rows, rows, 0.0, causal, None, None, scale=scale
        )
    else:
        lk = torch.nn.functional.pad(lk, (0, -rows % 32))  # the kernel's lse rows come in 32s
        grads = aten._scaled_dot_product_efficient_attention_backward(
            dok, qk, kk, vk, None, ok, lk, None, None, 0.0, [True, True, True, False], causal, scale=scale
        )[:3]
    return tuple(_block_layout(g, b) for g in grads)


def _finite(*tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class Sdpa(BlockBackend):
    name = "sdpa"

    def not_supported_reasons(self, q: torch.Tensor, masked: bool = False) -> list[str]:
        if masked:
            return ["takes no key_padding_mask (PyTorch's kernels with log-sum-exp take no key mask)"]
        if q.device.type == "cpu":
            return []
        if q.device.type != "cuda":
            return [f"runs on CPU or CUDA, not {q.device.type}"]
        d = q.shape[-1]
        if q.dtype in (torch.float16, torch.bfloat16):
            return [] if d % 8 == 0 and d <= 256 else [f"CUDA {q.dtype} needs head_dim <= 256 and a multiple of 8, got {d}"]
        if q.dtype == torch.float32:
            return [] if d % 4 == 0 else [f"CUDA float32 needs head_dim a multiple of 4, got {d}"]
        return [f"CUDA takes float16, bfloat16 or float32, not {q.dtype}"]

    def block_forward(self, q, k, v, scale: float, causal: bool, key_mask=None, q_offset: int = 0):
        if (causal and q_offset) or (q.device.type == "cpu" and not _finite(q, k, v)):
            return math.forward(q, k, v, scale, causal, q_offset=q_offset)  # bottom-right causal block, or NaN rows
        parts = [forward(*t, scale, causal) for t in _segment_chunks(q, k, v)]
        return tuple(torch.cat(p, dim=1) for p in zip(*parts)) if len(parts) > 1 else parts[0]

    def block_backward(self, dout, q, k, v, out, lse, scale: float, causal: bool, key_mask=None, q_offset: int = 0):
        if (causal and q_offset) or (q.device.type == "cpu" and not _finite(q, k, v, dout)):
            return math.backward(dout, q, k, v, out, lse, scale, causal, q_offset=q_offset)
        parts = [backward(*t, scale, causal) for t in _segment_chunks(dout, q, k, v, out, lse)]
        return tuple(torch.cat(p, dim=1) for p in zip(*parts)) if len(parts) > 1 else parts[0]


def _segment_chunks(*blocks):
    """The blocks (b, S, ...) in slices of S whose b * S fits the CUDA kernels' grid axis (65,535)."""
    b, segments = blocks[0].shape[:2]
    if blocks[0].device.type != "cuda" or b * segments <= MAX_GRID_Y:
        return [blocks]
    step = max(1, MAX_GRID_Y // b)
    return [tuple(t[:, i : i + step] for t in blocks) for i in range(0, segments, step)]
