"""Fused backend: PyTorch's own attention kernels that return the log-sum-exp.

CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` (all float dtypes).
CUDA: ``aten._scaled_dot_product_flash_attention`` (fp16/bf16, head_dim <= 256, multiple
of 8) or ``aten._scaled_dot_product_efficient_attention`` (float32). Both backward kernels
take the merged (out, lse), which makes each block's gradient exact for Eq. 10.

Blocks are laid out (b, S, c, h, d) and handed to the kernels as (b*S, h, c, d).
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


def supports(q: torch.Tensor) -> bool:
    """Whether a fused kernel with log-sum-exp covers this device, dtype and head_dim."""
    if q.device.type == "cpu":
        return True
    if q.device.type != "cuda":
        return False
    d = q.shape[-1]
    if q.dtype in (torch.float16, torch.bfloat16):
        return d % 8 == 0 and d <= 256
    return q.dtype == torch.float32 and d % 4 == 0


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
