"""Fused Triton backend: one launch per branch, reading q, k, v through the dilated strides.

A launch covers every segment (the ragged last one too), every head and every head
offset of one branch ``(w', r)``: program (m, s, b*h) takes query rows ``m*BLOCK_M...`` of
the residue class ``o`` of segment ``s`` (global rows ``s*w' + o + r*i``), runs
flash-attention over the same class's keys, and merges its (out, lse) in place into the
fp32 accumulators through the log-sum-exp. No gather, no scatter, no per-branch output
buffer. Backward runs per branch against the merged (out, lse): one launch for dK/dV
(program per key block), one for dQ (program per query block), each adding into fp32
accumulators that no other program of the launch touches, so it is deterministic.

``forward_all``/``backward_all`` take the whole plan; see ``launches`` for how work items
become launches. Shapes: q, k, v, out (b, n, h, d) with d in {16, 32, 64, 128}.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the portable and SDPA backends need no Triton
    triton = None

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)


def available() -> bool:
    return triton is not None


def supports(q: torch.Tensor) -> bool:
    return (
        triton is not None
        and q.device.type == "cuda"
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] in HEAD_DIMS
    )


if triton is not None:

    @triton.jit
    def _rows(seg_id, head, N, SEG, RATE, OFFSET):
        """First global row, and row count, of this head's residue class in segment seg_id."""
        o = head % RATE
        if OFFSET >= 0:
            o = OFFSET
        seg_start = seg_id * SEG
        seg_len = N - seg_start
        if seg_len > SEG:
            seg_len = SEG
        count = (seg_len - o + RATE - 1) // RATE  # 0 when o >= seg_len, since o < RATE
        return (seg_start + o).to(tl.int64), count

    @triton.jit
    def _fwd(Q, K, V, O, L, sb, sn, sh, ob, on, oh, lb, ln, lh,
             N, SEG, RATE, OFFSET, HEAD_START, NHEADS, qk_scale,
             IS_CAUSAL: tl.constexpr, FIRST: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
        pid_m = tl.program_id(0)
        seg_id = tl.program_id(1)
        bh = tl.program_id(2)
        b = (bh // NHEADS).to(tl.int64)
        head = HEAD_START + bh % NHEADS
        first, count = _rows(seg_id, head, N, SEG, RATE, OFFSET)
        if pid_m * BLOCK_M >= count:
            return
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        row_ok = rows < count
        pos_q = first + rows * RATE
        base = b * sb + head * sh
        q = tl.load(Q + base + pos_q[:, None] * sn + dims[None, :], mask=row_ok[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        hi = count
        if IS_CAUSAL:
            if hi > (pid_m + 1) * BLOCK_M:
                hi = (pid_m + 1) * BLOCK_M
        for start in range(0, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < count
            pos_k = first + cols * RATE
            k = tl.load(K + base + pos_k[:, None] * sn + dims[None, :], mask=col_ok[:, None], other=0.0)
            v = tl.load(V + base + pos_k[:, None] * sn + dims[None, :], mask=col_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            keep = col_ok[None, :]
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        l_safe = tl.where(row_ok, l_i, 1.0)
        out_b = acc / l_safe[:, None]
        lse_b = (m_i + tl.log2(l_safe)) / 1.4426950408889634  # natural log
        o_ptr = O + b * ob + head * oh + pos_q[:, None] * on + dims[None, :]
        l_ptr = L + b * lb + head * lh + pos_q * ln
        if FIRST:
            tl.store(o_ptr, out_b, mask=row_ok[:, None])
            tl.store(l_ptr, lse_b, mask=row_ok)
        else:
            lse_old = tl.load(l_ptr, mask=row_ok, other=float("-inf"))
            out_old = tl.load(o_ptr, mask=row_ok[:, None], other=0.0)
            new = tl.maximum(lse_old, lse_b) + tl.log(1.0 + tl.exp(-tl.abs(lse_old - lse_b)))
            w_old = tl.exp(lse_old - new)
            w_b = tl.exp(lse_b - new)
            tl.store(o_ptr, out_old * w_old[:, None] + out_b * w_b[:, None], mask=row_ok[:, None])
            tl.store(l_ptr, new, mask=row_ok)

    @triton.jit
    def _bwd_dkdv(Q, K, V, DO, L, D, DK, DV, sb, sn, sh, lb, ln, lh, gb, gn, gh,
                  N, SEG, RATE, OFFSET, HEAD_START, NHEADS, qk_scale, scale,
                  IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
        pid_n = tl.program_id(0)
        seg_id = tl.program_id(1)
        bh = tl.program_id(2)
        b = (bh // NHEADS).to(tl.int64)
        head = HEAD_START + bh % NHEADS
        first, count = _rows(seg_id, head, N, SEG, RATE, OFFSET)
        if pid_n * BLOCK_N >= count:
            return
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, HEAD_DIM)
        col_ok = cols < count
        pos_k = first + cols * RATE
        base = b * sb + head * sh
        k = tl.load(K + base + pos_k[:, None] * sn + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(V + base + pos_k[:, None] * sn + dims[None, :], mask=col_ok[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        lo = 0
        if IS_CAUSAL:
            lo = (pid_n * BLOCK_N) // BLOCK_M * BLOCK_M
        for start in range(lo, count, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < count
            pos_q = first + rows * RATE
            q = tl.load(Q + base + pos_q[:, None] * sn + dims[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(DO + base + pos_q[:, None] * sn + dims[None, :], mask=row_ok[:, None], other=0.0)
            lse = tl.load(L + b * lb + head * lh + pos_q * ln, mask=row_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(D + b * lb + head * lh + pos_q * ln, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            keep = row_ok[:, None] & col_ok[None, :]
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        gbase = b * gb + head * gh + pos_k[:, None] * gn + dims[None, :]
        tl.store(DK + gbase, tl.load(DK + gbase, mask=col_ok[:, None]) + dk * scale, mask=col_ok[:, None])
        tl.store(DV + gbase, tl.load(DV + gbase, mask=col_ok[:, None]) + dv, mask=col_ok[:, None])

    @triton.jit
    def _bwd_dq(Q, K, V, DO, L, D, DQ, sb, sn, sh, lb, ln, lh, gb, gn, gh,
                N, SEG, RATE, OFFSET, HEAD_START, NHEADS, qk_scale, scale,
                IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
        pid_m = tl.program_id(0)
        seg_id = tl.program_id(1)
        bh = tl.program_id(2)
        b = (bh // NHEADS).to(tl.int64)
        head = HEAD_START + bh % NHEADS
        first, count = _rows(seg_id, head, N, SEG, RATE, OFFSET)
        if pid_m * BLOCK_M >= count:
            return
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        row_ok = rows < count
        pos_q = first + rows * RATE
        base = b * sb + head * sh
        q = tl.load(Q + base + pos_q[:, None] * sn + dims[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + base + pos_q[:, None] * sn + dims[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(L + b * lb + head * lh + pos_q * ln, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(D + b * lb + head * lh + pos_q * ln, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        hi = count
        if IS_CAUSAL:
            if hi > (pid_m + 1) * BLOCK_M:
                hi = (pid_m + 1) * BLOCK_M
        for start in range(0, hi, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < count
            pos_k = first + cols * RATE
            k = tl.load(K + base + pos_k[:, None] * sn + dims[None, :], mask=col_ok[:, None], other=0.0)
            v = tl.load(V + base + pos_k[:, None] * sn + dims[None, :], mask=col_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            keep = row_ok[:, None] & col_ok[None, :]
            if IS_CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        gptr = DQ + b * gb + head * gh + pos_q[:, None] * gn + dims[None, :]
        tl.store(gptr, tl.load(gptr, mask=row_ok[:, None]) + dq * scale, mask=row_ok[:, None])


def launches(plan) -> list[tuple[int, int, int, int, int]]:
    """(segment, rate, offset, head_start, num_heads) per launch; offset -1 means head % rate.

    Paper-mode items of one branch (offsets o with heads o::r) become one launch over all
    heads; head-group items (a contiguous head range, one offset) are one launch each.
    """
    out, seen = [], set()
    for item in plan:
        if item.head_step == item.rate and item.head_start == item.offset:  # paper: heads o::r
            key = (item.segment, item.rate)
            if key not in seen:
                seen.add(key)
                out.append((item.segment, item.rate, -1, 0, item.head_stop))
        else:
            out.append((item.segment, item.rate, item.offset, item.head_start, item.head_stop - item.head_start))
    return out


def _config(d: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward kernel."""
    if d <= 64:
        return 128, 64, 4, 3
    return 128, 64, 8, 3  # benchmarks/NOTES.md: 358 vs 296 TFLOP/s with 2 stages at d = 128


def _bwd_config(d: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of both backward kernels."""
    return 64, 64, (4 if d <= 64 else 8), 3


def _grid(n, seg, rate, b, nheads, block):
    rows = -(-seg // rate)
    return (triton.cdiv(rows, block), -(-n // seg), b * nheads)


def forward_all(q, k, v, plan, scale: float, causal: bool):
    """q, k, v: (b, n, h, d) -> out (b, n, h, d) in q.dtype, lse (b, n, h) float32."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if not (q.stride() == k.stride() == v.stride()):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, n, h, d = q.shape
    out = torch.zeros((b, n, h, d), dtype=torch.float32, device=q.device)
    lse = torch.full((b, n, h), float("-inf"), dtype=torch.float32, device=q.device)
    bm, bn, warps, stages = _config(d)
    for i, (seg, rate, offset, head_start, nheads) in enumerate(launches(plan)):
        _fwd[_grid(n, seg, rate, b, nheads, bm)](
            q, k, v, out, lse, q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1), lse.stride(2), n, seg, rate, offset, head_start, nheads, scale * LOG2E,
            IS_CAUSAL=causal, FIRST=i == 0,  # the first launch finds the initial 0 / -inf: nothing to read
            BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=d, num_warps=warps, num_stages=stages,
        )
    return out.to(q.dtype), lse


def backward_all(dout, q, k, v, out, lse, plan, scale: float, causal: bool):
    """Gradients against the merged (out, lse): dq, dk, dv (b, n, h, d) in q.dtype."""
    q, k, v, dout = (t.contiguous() for t in (q, k, v, dout.to(q.dtype)))
    b, n, h, d = q.shape
    delta = (dout.float() * out.float()).sum(-1)  # (b, n, h), like lse
    lse = lse.contiguous()
    grads = [torch.zeros((b, n, h, d), dtype=torch.float32, device=q.device) for _ in range(3)]
    dq, dk, dv = grads
    bm, bn, warps, stages = _bwd_config(d)
    for seg, rate, offset, head_start, nheads in launches(plan):
        common = (q.stride(0), q.stride(1), q.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
                  dq.stride(0), dq.stride(1), dq.stride(2), n, seg, rate, offset, head_start, nheads,
                  scale * LOG2E, scale)
        meta = dict(IS_CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=d, num_warps=warps, num_stages=stages)
        _bwd_dkdv[_grid(n, seg, rate, b, nheads, bn)](q, k, v, dout, lse, delta, dk, dv, *common, **meta)
        _bwd_dq[_grid(n, seg, rate, b, nheads, bm)](q, k, v, dout, lse, delta, dq, *common, **meta)
    return tuple(g.to(q.dtype) for g in grads)

