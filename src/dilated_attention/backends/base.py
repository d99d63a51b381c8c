"""The one interface every backend implements.

A backend says why it cannot take an input (``not_supported_reasons``), attends one block
of (b, S, c, h, d) views into running accumulators (``attend_``) and adds that block's
gradients (``attend_backward_``). ``forward_plan`` / ``backward_plan`` run a whole plan;
the defaults here run one block per ``(branch, offset)`` work item over strided views, and
a backend with fused whole-plan kernels overrides them. The ring calls ``attend_`` and
``attend_backward_`` on its local and visiting blocks.
"""

from __future__ import annotations

import torch

from ..merge import acc_dtype, empty_partial, merge_
from ..plan import Plan, block_views, plan_items


def block_grad_inputs(dout: torch.Tensor, out: torch.Tensor, out_scale: float):
    """(dO, O) each block's backward sees when the output is ``out_scale * O``: (out_scale dout, out / out_scale)."""
    return (dout, out) if out_scale == 1.0 else (dout * out_scale, out / out_scale)


class Backend:
    name = ""

    def not_supported_reasons(self, q: torch.Tensor, masked: bool = False) -> list[str]:
        """Why this backend cannot take inputs like q (device type, dtype, head_dim; ``masked``: with a
        key padding mask); empty when it can. It looks at nothing else (``select`` decides once per kind)."""
        raise NotImplementedError

    def attend_(self, out, lse, q, k, v, scale: float, causal: bool, key_mask=None, q_offset: int = 0) -> None:
        """Merge the attention of q over (k, v) into the accumulators (out, lse) in place.

        q, out: (b, S, c, h, d); k, v: (b, S, c_k, h_k, d) with h_k = h, or h_k = 1 (one k/v head
        shared by every query head: GQA); lse: (b, S, c, h); key_mask: (b, S, c_k) bool, True
        where a key is ignored, or None. Causal: query row i sees key rows <= i + q_offset.
        """
        raise NotImplementedError

    def attend_backward_(self, dq, dk, dv, dout, q, k, v, out, lse, scale: float, causal: bool,
                         key_mask=None, q_offset: int = 0) -> None:
        """Add one block's gradients against the merged (out, lse) into dq, dk, dv (views as in ``attend_``)."""
        raise NotImplementedError

    def accumulator_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype of the running (out, dq, dk, dv) a caller keeps between ``attend_plan_`` calls."""
        return acc_dtype(dtype)

    def forward_plan(self, q, k, v, plan: Plan, scale: float, causal: bool, out_scale: float, key_mask=None):
        """q: (b, m, h, d), the last m <= n positions; k, v: (b, n, h_kv, d); key_mask: (b, n) bool or None
        -> out_scale * out (b, m, h, d) in q.dtype, lse (b, m, h) float32/64."""
        b, m, h, d = q.shape
        out, lse = empty_partial(b, m, h, v.shape[-1], q.dtype, q.device)
        self.attend_plan_(out, lse, q, k, v, plan, scale, causal, key_mask)
        return out.mul_(out_scale).to(q.dtype), lse

    def attend_plan_(self, out, lse, q, k, v, plan: Plan, scale: float, causal: bool, key_mask=None) -> None:
        """Merge a whole plan's attention of q over (k, v) into the accumulators (out, lse) in place
        (shapes as in ``forward_plan``; out in ``accumulator_dtype``)."""
        for item in plan_items(plan):
            for (ov, lv, qv), (kv, vv), mv, offset in block_views(item, (out, lse, q), (k, v), key_mask):
                self.attend_(ov, lv, qv, kv, vv, scale, causal, mv, offset)

    def backward_plan(self, dout, q, k, v, out, lse, plan: Plan, scale: float, causal: bool, out_scale: float,
                      key_mask=None):
        """Gradients against the merged (out, lse): dq, dk, dv in q.dtype, shaped like q, k, v."""
        acc = acc_dtype(q.dtype)
        grads = [torch.zeros(t.shape, dtype=acc, device=q.device) for t in (q, k, v)]
        self.attend_plan_backward_(*grads, dout, q, k, v, out, lse, plan, scale, causal, out_scale, key_mask)
        return tuple(g.to(q.dtype) for g in grads)

    def attend_plan_backward_(self, dq, dk, dv, dout, q, k, v, out, lse, plan: Plan, scale: float, causal: bool,
                              out_scale: float, key_mask=None) -> None:
        """Add a whole plan's gradients against the merged (out, lse) into dq, dk, dv (``accumulator_dtype``);
        out: the final output, ``out_scale`` times the merged attention."""
        dout, out = block_grad_inputs(dout.to(q.dtype), out, out_scale)
        for item in plan_items(plan):
            blocks = block_views(item, (dout, q, out, lse, dq), (k, v, dk, dv), key_mask)
            for (dov, qv, ov, lv, dqv), (kv, vv, dkv, dvv), mv, offset in blocks:
                self.attend_backward_(dqv, dkv, dvv, dov, qv, kv, vv, ov, lv, scale, causal, mv, offset)

    def attend_classes_(self, out, lse, q, kc, vc, branch, scale: float, key_mask=None) -> None:
        """Merge one branch over a single segment of q's n rows (non-causal), its keys given as classes:
        kc, vc (b, n / r, hb, d) for the branch's hb heads, row i of its head j being key row o_j + i r
        (o_j that head's class offset); key_mask (b, n / r, hb) or None. out, lse as in ``attend_plan_``."""
        for qv, kv, mv in _class_blocks(branch, key_mask):
            self.attend_(qv(out), qv(lse), qv(q), kv(kc), kv(vc), scale, False, mv)

    def attend_classes_backward_(self, dq, dkc, dvc, dout, q, kc, vc, out, lse, branch, scale: float,
                                 out_scale: float, key_mask=None) -> None:
        """Add the gradients of ``attend_classes_`` into dq and the class-laid dkc, dvc."""
        dout, out = block_grad_inputs(dout.to(q.dtype), out, out_scale)
        for qv, kv, mv in _class_blocks(branch, key_mask):
            self.attend_backward_(qv(dq), kv(dkc), kv(dvc), qv(dout), qv(q), kv(kc), kv(vc), qv(out), qv(lse), scale,
                                  False, mv)


def _class_blocks(branch, key_mask):
    """Per work item of a one-segment branch: view makers for the query side (b, 1, c, hs, ...), the
    class-laid key side and the item's key mask (its heads share one class)."""
    for item in branch.items():
        local = slice(item.head_start - branch.head_start, item.head_stop - branch.head_start, item.head_step)
        qv = lambda t, item=item: t[:, item.offset :: item.rate, item.heads].unsqueeze(1)  # noqa: E731
        kv = lambda t, local=local: t[:, :, local].unsqueeze(1)  # noqa: E731
        yield qv, kv, None if key_mask is None else key_mask[:, :, local.start].unsqueeze(1)


class BlockBackend(Backend):
    """A backend whose kernels return each block's own (out, lse); merged here in fp32/fp64."""

    def block_forward(self, q, k, v, scale: float, causal: bool, key_mask=None, q_offset: int = 0):
        """q: (b, S, c, h, d); k, v: (b, S, c_k, h, d) -> out (b, S, c, h, d), lse (b, S, c, h)."""
        raise NotImplementedError

    def block_backward(self, dout, q, k, v, out, lse, scale: float, causal: bool, key_mask=None, q_offset: int = 0):
        """One block's dq, dk, dv against the merged (out, lse) of its rows."""
        raise NotImplementedError

    def attend_(self, out, lse, q, k, v, scale: float, causal: bool, key_mask=None, q_offset: int = 0) -> None:
        k, v = _shared_heads(q, k, v)
        merge_(out, lse, *self.block_forward(q, k, v, scale, causal, key_mask, q_offset))

    def attend_backward_(self, dq, dk, dv, dout, q, k, v, out, lse, scale: float, causal: bool,
                         key_mask=None, q_offset: int = 0) -> None:
        shared = k.shape[3] != q.shape[3]
        gq, gk, gv = self.block_backward(dout, q, *_shared_heads(q, k, v), out, lse, scale, causal, key_mask, q_offset)
        dq.add_(gq)
        dk.add_(gk.sum(3, keepdim=True) if shared else gk)  # a shared k/v head sums its query heads
        dv.add_(gv.sum(3, keepdim=True) if shared else gv)


def _shared_heads(q, k, v):
    """k, v (b, S, c_k, 1, d) shared by every query head -> views with q's heads (stride 0)."""
    if k.shape[3] == q.shape[3]:
        return k, v
    shape = (*k.shape[:3], q.shape[3], k.shape[4])
    return k.expand(shape), v.expand(shape)
