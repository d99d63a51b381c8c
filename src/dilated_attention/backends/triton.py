"""Fused Triton backend: flash-attention kernels that read q, k, v through the dilated strides.

Paper-mode plans whose segments fit its tiling run on ``triton_fused`` (every branch in one
launch, one softmax; causal union plans with their first branch apart, weighted, here: ``WEIGHTED``;
other causal ones where fused ran faster, ``fused_causal``). Every other plan,
and the ring, use the per-branch kernel family here. A launch is a set of segments, each holding one
residue class of rows per head: program (m and s, head, batch) takes query rows ``m*BLOCK_M...`` of
segment ``s``'s class, runs flash-attention over the same class's keys, and merges its
(out, lse) in place into the accumulators through the log-sum-exp (no per-branch output
buffer). Backward runs against the merged (out, lse): one launch for dK/dV (program per
key block), one for dQ (program per query block), each adding into gradients that no
other program of the launch touches, so it is deterministic. On sm_90 a call's launches
chain: each starts while the one before runs and waits for it only where it reads and
writes what that one wrote (``_chains``).

- ``forward_plan`` / ``backward_plan``: a whole plan on (b, n, h, d) tensors, one launch
  per branch covering every segment (the ragged last one too; with packed documents, every
  document's segments through a (start, length) table), every head and head offset; accumulators in the inputs' dtype (merged in fp32 registers), so the extra
  memory is the fp32 lse alone.
- ``attend_`` / ``attend_backward_``: one block of (b, S, c, h, d) views, as the ring
  attends its pieces (queries of one rank against a visiting K/V block).

Addressing: row ``i`` of the class of offset ``o`` in segment ``s`` of head ``j`` sits at
``b*sb + s*ss + j*sh + (o + i*RATE)*su`` (``su``: one row). Plans use RATE = r with
``o = j % r`` (paper) or a fixed o; views use RATE = 1, o = 0 and their own strides.
"""

from __future__ import annotations

import functools
import itertools
import os
from dataclasses import replace

import torch

from ..plan import PER_HEAD, Branch, Plan, documents
from . import triton_fused
from .base import Backend
from .triton_fused import LOG2E
from .triton_launch import Launch, chained, launch_kernel, prepared

try:
    import triton
    import triton.language as tl
except ImportError:  # the portable and SDPA backends need no Triton
    triton = None

HEAD_DIMS = (16, 32, 64, 128)


def available() -> bool:
    return triton is not None


if triton is not None:
    from .triton_fused import (class_keys, dkdv_block, dot, dq_block, fwd_block, gdc_launch_dependents, gdc_wait,
                               kv_rows, row_stats, rows_at, visible_keys)

    @triton.jit
    def _offset(head, RATE, OFFSET, HEAD_BASE):
        """In-segment offset of this head's residue class: OFFSET, or (OFFSET < 0, paper mode) the
        global head index HEAD_BASE + head * -OFFSET modulo RATE (launch heads -OFFSET apart)."""
        o = (head * -OFFSET + HEAD_BASE) % RATE
        if OFFSET >= 0:
            o = OFFSET
        return o

    @triton.jit
    def _segment(seg, N, SEG, ST, TABLE: tl.constexpr):
        """First row and length of segment seg: ``seg * SEG`` and the rest of N, or (TABLE, packed
        documents) the table's (start, length) pair, so one launch covers every document's segments."""
        if TABLE:
            return tl.load(ST + 2 * seg).to(tl.int64), tl.load(ST + 2 * seg + 1)
        return seg * SEG, tl.minimum(N - seg * SEG, SEG).to(tl.int32)

    @triton.jit
    def _class(seg_len, head, RATE, OFFSET, HEAD_BASE):
        """In-segment offset o and row count of this head's residue class in a segment of seg_len rows."""
        o = _offset(head, RATE, OFFSET, HEAD_BASE)
        return o, (seg_len - o + RATE - 1) // RATE  # 0 when o >= seg_len, since o < RATE

    @triton.jit
    def _program(BLOCK: tl.constexpr, MAX_ROWS, NQ, SEGQ, NK, SEGK, RATE, OFFSET, HEAD_BASE, KV_HEAD0, KV_GROUP,
                 qb, qs, qh, qu, kb, ks, kh, ku, lb, ls, lh, lu, ST, TABLE: tl.constexpr, COMPACT: tl.constexpr):
        """This program's row block, query and key row counts, offsets of row 0 in q, k, lse; its
        head, class offset and segment. COMPACT: k holds only each query head's class, row i at
        ``i * ku`` (``_key_rate``).

        Grid: (row blocks x segments, heads, batch); axis 0 has room for 2**31 programs. Query
        head ``head`` reads k/v head ``(KV_HEAD0 + head) // KV_GROUP`` (GQA). With a segment
        table, segment s starts at row ``ST[2s]`` of every tensor (the strides ``*s`` are unused)."""
        row_blocks = tl.cdiv(MAX_ROWS, BLOCK)
        pid = tl.program_id(0)
        block = pid % row_blocks
        seg = (pid // row_blocks).to(tl.int64)
        head = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        q_start, q_len = _segment(seg, NQ, SEGQ, ST, TABLE)
        k_start, k_len = _segment(seg, NK, SEGK, ST, TABLE)
        o, q_count = _class(q_len, head, RATE, OFFSET, HEAD_BASE)
        _, k_count = _class(k_len, head, RATE, OFFSET, HEAD_BASE)
        if TABLE:
            q_seg, k_seg, l_seg = q_start * qu, k_start * ku, q_start * lu
        else:
            q_seg, k_seg, l_seg = seg * qs, seg * ks, seg * ls
        q_base = b * qb + q_seg + head * qh + o * qu
        k_base = b * kb + k_seg + ((KV_HEAD0 + head) // KV_GROUP) * kh + _key_class(o, COMPACT) * ku
        l_base = b * lb + l_seg + head * lh + o * lu
        return block, q_count, k_count, q_base, k_base, l_base

    @triton.jit
    def _side_base(BLOCK: tl.constexpr, MAX_ROWS, RATE, OFFSET, HEAD_BASE, sb, ss, sh, su, ST, TABLE: tl.constexpr,
                   COMPACT: tl.constexpr):
        """Offset of row 0 of this program's class in another key-side tensor with strides (batch,
        segment, head, row): a gradient laid out per query head (dK, dV), or the key mask (head
        stride 0, or per query head when COMPACT)."""
        seg = (tl.program_id(0) // tl.cdiv(MAX_ROWS, BLOCK)).to(tl.int64)
        head = tl.program_id(1)
        o = _offset(head, RATE, OFFSET, HEAD_BASE)
        seg_off = seg * ss
        if TABLE:
            seg_off = tl.load(ST + 2 * seg).to(tl.int64) * su
        return tl.program_id(2).to(tl.int64) * sb + seg_off + head * sh + _key_class(o, COMPACT) * su

    @triton.jit
    def _key_class(o, COMPACT: tl.constexpr):
        """Row of a key-side tensor where this head's class starts: o, or 0 when the tensor holds
        only that class (COMPACT)."""
        if COMPACT:
            return 0
        return o

    @triton.jit
    def _key_rate(RATE, COMPACT: tl.constexpr):
        """Rows between a class's consecutive keys in key-side tensors."""
        if COMPACT:
            return 1
        return RATE

    @triton.jit
    def _pair_links(LK, rows, cols, RATE, OFFSET, HEAD_BASE, LCM, WEIGHTED: tl.constexpr):
        """WEIGHTED: how many of a union plan's branches link each pair of query rows (class indices rows) and
        keys (cols) of this program's head, as a float32 tile: the smaller of the two positions' counts
        (positions o + i * RATE of a segment, relative to the head; a segment starts at a multiple of LCM; LK:
        ``triton_fused.links``; paper mode, OFFSET < 0). The same tile serves every block of the loop (RATE x
        block % LCM == 0). Else zeros, unused."""
        pairs = tl.zeros([rows.shape[0], cols.shape[0]], tl.float32)
        if WEIGHTED:
            head = tl.program_id(1) * -OFFSET + HEAD_BASE
            o = head % RATE - head
            row_links = tl.load(LK + ((o + rows * RATE) & (LCM - 1))).to(tl.float32)
            col_links = tl.load(LK + ((o + cols * RATE) & (LCM - 1))).to(tl.float32)
            pairs = tl.minimum(row_links[:, None], col_links[None, :])
        return pairs

    @triton.jit
    def _row_offs(base, idx, RATE, su):
        """Offsets of rows idx of a class whose row 0 is at base (su: one row of the tensor)."""
        return base + (idx * RATE).to(tl.int64) * su

    @triton.jit
    def _add_tile(ptr, base, idx, ok, RATE, su, dims, value, FIRST: tl.constexpr):
        """Rows idx at ptr + base += value (gradients no other program of the launch touches); FIRST: = value
        (the first launch into gradients that hold nothing yet)."""
        offs = _row_offs(base, idx, RATE, su)[:, None] + dims[None, :]
        if FIRST:
            tl.store(ptr + offs, value, mask=ok[:, None])
        else:
            tl.store(ptr + offs, tl.load(ptr + offs, mask=ok[:, None]) + value, mask=ok[:, None])

    @triton.jit
    def _store_other_rows(O, L, block, BLOCK: tl.constexpr, MAX_ROWS, q_base, l_base, N, SEG, RATE, OFFSET, HEAD_BASE,
                          qu, lu, ST, TABLE: tl.constexpr, HEAD_DIM: tl.constexpr):
        """out 0 and lse -inf at segment positions i*RATE + t (t != this class's offset o) for the
        block's rows i: every position of the segment belongs to one program's block this way."""
        seg = (tl.program_id(0) // tl.cdiv(MAX_ROWS, BLOCK)).to(tl.int64)
        _, seg_len = _segment(seg, N, SEG, ST, TABLE)
        o = _offset(tl.program_id(1), RATE, OFFSET, HEAD_BASE)
        rows = block * BLOCK + tl.arange(0, BLOCK)
        dims = tl.arange(0, HEAD_DIM)
        zeros = tl.zeros([BLOCK, HEAD_DIM], O.dtype.element_ty)
        for t in range(0, RATE):
            pos = rows * RATE + t
            ok = (pos < seg_len) & (t != o)
            rel = (pos - o).to(tl.int64)  # q_base and l_base point at the class's row 0, position o
            tl.store(O + q_base + rel[:, None] * qu + dims[None, :], zeros, mask=ok[:, None])
            tl.store(L + l_base + rel * lu, tl.full([BLOCK], float("-inf"), tl.float32), mask=ok)

    @triton.jit
    def _fwd(Q, K, V, O, L, KM, ST, LK, qb, qs, qh, qu, kb, ks, kh, ku, lb, ls, lh, lu, mb, ms, mh, mu,
             MAX_ROWS, NQ, SEGQ, NK, SEGK, RATE, OFFSET, HEAD_BASE, KV_HEAD0, KV_GROUP, Q_SHIFT, LCM, qk_scale,
             out_scale, IS_CAUSAL: tl.constexpr, FIRST: tl.constexpr, HAS_MASK: tl.constexpr, TABLE: tl.constexpr,
             COMPACT: tl.constexpr, NEG_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             HEAD_DIM: tl.constexpr, TMA: tl.constexpr = False, OTHER_ROWS: tl.constexpr = False,
             CHAIN: tl.constexpr = False, WEIGHTED: tl.constexpr = 0):
        """WEIGHTED (2): the launch of a union plan's first branch, each pair's probability times how many of
        the plan's branches link it (``_pair_links``; LK, LCM: ``triton_fused.links``). OTHER_ROWS: also store
        out 0 and lse -inf at the rows of this block's segment positions that are not its class's (a head's
        only launch writes all its rows: no fill before it). CHAIN: the
        next launch may start while this one runs (programmatic dependent launch, ``_chains``); out and
        lse are read and written only after the launch before this one has finished, and every program
        waits for it, so this launch ends after it (what follows on the stream sees every launch's writes)."""
        if CHAIN:
            gdc_launch_dependents()
        pid_m, q_count, k_count, q_base, k_base, l_base = _program(
            BLOCK_M, MAX_ROWS, NQ, SEGQ, NK, SEGK, RATE, OFFSET, HEAD_BASE, KV_HEAD0, KV_GROUP,
            qb, qs, qh, qu, kb, ks, kh, ku, lb, ls, lh, lu, ST, TABLE, COMPACT)
        if OTHER_ROWS:
            _store_other_rows(O, L, pid_m, BLOCK_M, MAX_ROWS, q_base, l_base, NQ, SEGQ, RATE, OFFSET, HEAD_BASE,
                              qu, lu, ST, TABLE, HEAD_DIM)
        if pid_m * BLOCK_M >= q_count:
            if CHAIN:  # every program waits: the launch ends after the one before it
                gdc_wait()
            return
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        row_ok = rows < q_count
        q = rows_at(Q, q_base, rows * RATE, row_ok, qu, dims)
        m_base = _side_base(BLOCK_M, MAX_ROWS, RATE, OFFSET, HEAD_BASE, mb, ms, mh, mu, ST, TABLE, COMPACT)
        kr = _key_rate(RATE, COMPACT)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        hi = k_count
        full = k_count // BLOCK_N * BLOCK_N  # key blocks every row sees in full: no mask work
        if IS_CAUSAL:
            hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M + Q_SHIFT)
            full = tl.minimum(full, (pid_m * BLOCK_M + Q_SHIFT + 1) // BLOCK_N * BLOCK_N)
        if HAS_MASK:
            full = 0
        qidx = rows + Q_SHIFT  # causal: the last key row each query row sees
        kc, vc = class_keys(K, V, k_base, k_count, kr, ku, TMA, BLOCK_N, HEAD_DIM)
        pairs = _pair_links(LK, rows, tl.arange(0, BLOCK_N), RATE, OFFSET, HEAD_BASE, LCM, WEIGHTED)
        for start in range(0, full, BLOCK_N):
            m_i, l_i, acc = fwd_block(q, kc, vc, KM, k_base, m_base, 0, kr, k_count, start, qidx, m_i, l_i, acc,
                                      ku, mu, qk_scale, dims, IS_CAUSAL, HAS_MASK, False, NEG_SCALE, BLOCK_N, TMA,
                                      pairs, WEIGHTED)
        for start in range(full, hi, BLOCK_N):  # without a key mask every masked block starts with a kept key
            m_i, l_i, acc = fwd_block(q, kc, vc, KM, k_base, m_base, 0, kr, k_count, start, qidx, m_i, l_i, acc,
                                      ku, mu, qk_scale, dims, IS_CAUSAL, HAS_MASK, True, NEG_SCALE, BLOCK_N, TMA,
                                      pairs, WEIGHTED)
        l_safe = tl.where(row_ok & (l_i > 0), l_i, 1.0)
        out_b = acc / l_safe[:, None]
        lse_b = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) / 1.4426950408889634, float("-inf"))  # natural log
        q_offs = _row_offs(q_base, rows, RATE, qu)[:, None] + dims[None, :]
        l_ptr = L + _row_offs(l_base, rows, RATE, lu)
        if CHAIN:
            gdc_wait()
        if FIRST:  # out_scale != 1 only where every launch is first (forward_plan checks)
            tl.store(O + q_offs, out_b * out_scale, mask=row_ok[:, None])
            tl.store(l_ptr, lse_b, mask=row_ok)
        else:
            lse_old = tl.load(l_ptr, mask=row_ok, other=float("-inf"))
            out_old = tl.load(O + q_offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
            # weights relative to the larger lse sum to 1 to rounding at any magnitude; rows with no
            # visible key yet (lse -inf on both sides) keep weight 0 and output 0
            top = tl.maximum(lse_old, lse_b)
            top_safe = tl.where(top == float("-inf"), 0.0, top)
            w_old = tl.exp(lse_old - top_safe)
            w_b = tl.exp(lse_b - top_safe)
            total = w_old + w_b
            scale_total = tl.where(total > 0, total, 1.0)
            tl.store(O + q_offs, (out_old * w_old[:, None] + out_b * w_b[:, None]) / scale_total[:, None],
                     mask=row_ok[:, None])
            tl.store(l_ptr, top + tl.log(total), mask=row_ok)

    @triton.jit
    def _bwd_dkdv(Q, K, V, DO, L, D, KM, DK, DV, ST, LK, qb, qs, qh, qu, kb, ks, kh, ku, lb, ls, lh, lu, mb, ms, mh,
                  mu, gb, gs, gh, gu, MAX_ROWS, NQ, SEGQ, NK, SEGK, RATE, OFFSET, HEAD_BASE, KV_HEAD0, KV_GROUP,
                  Q_SHIFT, LCM, qk_scale, scale, do_scale, IS_CAUSAL: tl.constexpr, FIRST: tl.constexpr,
                  HAS_MASK: tl.constexpr, TABLE: tl.constexpr, COMPACT: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CHAIN: tl.constexpr = False,
                  WEIGHTED: tl.constexpr = 0):
        if CHAIN:  # as in ``_fwd``: dk, dv only after the launch before this one
            gdc_launch_dependents()
        pid_n, q_count, k_count, q_base, k_base, l_base = _program(
            BLOCK_N, MAX_ROWS, NQ, SEGQ, NK, SEGK, RATE, OFFSET, HEAD_BASE, KV_HEAD0, KV_GROUP,
            qb, qs, qh, qu, kb, ks, kh, ku, lb, ls, lh, lu, ST, TABLE, COMPACT)
        if pid_n * BLOCK_N >= k_count:
            if CHAIN:
                gdc_wait()
            return
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, HEAD_DIM)
        col_ok = cols < k_count
        kr = _key_rate(RATE, COMPACT)
        k, v = kv_rows(K, V, k_base, cols * kr, col_ok, ku, dims, True)
        m_base = _side_base(BLOCK_N, MAX_ROWS, RATE, OFFSET, HEAD_BASE, mb, ms, mh, mu, ST, TABLE, COMPACT)
        col_keep = visible_keys(KM, m_base, cols * kr, col_ok, mu, HAS_MASK)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        lo, mid = 0, 0  # causal: query blocks [lo, mid) cross the diagonal of this tile's keys
        if IS_CAUSAL:
            lo = tl.maximum(pid_n * BLOCK_N - Q_SHIFT, 0) // BLOCK_M * BLOCK_M
            mid = tl.minimum(tl.cdiv(tl.maximum((pid_n + 1) * BLOCK_N - 1 - Q_SHIFT, 0), BLOCK_M) * BLOCK_M, q_count)
        pairs = _pair_links(LK, tl.arange(0, BLOCK_M), cols, RATE, OFFSET, HEAD_BASE, LCM, WEIGHTED)
        for start in range(lo, mid, BLOCK_M):
            dk, dv = dkdv_block(Q, DO, L, D, q_base, l_base, 0, RATE, q_count, start, k, v, cols, col_keep, dk, dv,
                                qu, lu, qk_scale, do_scale, Q_SHIFT, dims, True, HAS_MASK, BLOCK_M, pairs, WEIGHTED)
        for start in range(mid, q_count, BLOCK_M):  # every row sees every key of the tile (or the mask says)
            dk, dv = dkdv_block(Q, DO, L, D, q_base, l_base, 0, RATE, q_count, start, k, v, cols, col_keep, dk, dv,
                                qu, lu, qk_scale, do_scale, Q_SHIFT, dims, False, HAS_MASK, BLOCK_M, pairs, WEIGHTED)
        # dK, dV of this query head's view of the keys (per query head: no two programs share rows)
        g_base = _side_base(BLOCK_N, MAX_ROWS, RATE, OFFSET, HEAD_BASE, gb, gs, gh, gu, ST, TABLE, COMPACT)
        if CHAIN:
            gdc_wait()
        _add_tile(DK, g_base, cols, col_ok, kr, gu, dims, dk * scale, FIRST)
        _add_tile(DV, g_base, cols, col_ok, kr, gu, dims, dv * do_scale, FIRST)

    @triton.jit
    def _bwd_dq(Q, K, V, DO, L, D, KM, DQ, ST, LK, qb, qs, qh, qu, kb, ks, kh, ku, lb, ls, lh, lu, mb, ms, mh, mu,
                MAX_ROWS, NQ, SEGQ, NK, SEGK, RATE, OFFSET, HEAD_BASE, KV_HEAD0, KV_GROUP, Q_SHIFT, LCM, qk_scale,
                scale, do_scale, IS_CAUSAL: tl.constexpr, FIRST: tl.constexpr, HAS_MASK: tl.constexpr,
                TABLE: tl.constexpr, COMPACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HEAD_DIM: tl.constexpr, TMA: tl.constexpr = False, CHAIN: tl.constexpr = False, WEIGHTED: tl.constexpr = 0):
        if CHAIN:  # as in ``_fwd``: dq only after the launch before this one
            gdc_launch_dependents()
        pid_m, q_count, k_count, q_base, k_base, l_base = _program(
            BLOCK_M, MAX_ROWS, NQ, SEGQ, NK, SEGK, RATE, OFFSET, HEAD_BASE, KV_HEAD0, KV_GROUP,
            qb, qs, qh, qu, kb, ks, kh, ku, lb, ls, lh, lu, ST, TABLE, COMPACT)
        if pid_m * BLOCK_M >= q_count:
            if CHAIN:
                gdc_wait()
            return
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        row_ok = rows < q_count
        q = rows_at(Q, q_base, rows * RATE, row_ok, qu, dims)
        do = rows_at(DO, q_base, rows * RATE, row_ok, qu, dims)
        lse, delta = row_stats(L, D, l_base, rows * RATE, row_ok, lu)
        m_base = _side_base(BLOCK_M, MAX_ROWS, RATE, OFFSET, HEAD_BASE, mb, ms, mh, mu, ST, TABLE, COMPACT)
        kr = _key_rate(RATE, COMPACT)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        hi = k_count
        full = k_count // BLOCK_N * BLOCK_N
        if IS_CAUSAL:
            hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M + Q_SHIFT)
            full = tl.minimum(full, (pid_m * BLOCK_M + Q_SHIFT + 1) // BLOCK_N * BLOCK_N)
        if HAS_MASK:
            full = 0
        qidx = rows + Q_SHIFT
        kc, vc = class_keys(K, V, k_base, k_count, kr, ku, TMA, BLOCK_N, HEAD_DIM)
        pairs = _pair_links(LK, rows, tl.arange(0, BLOCK_N), RATE, OFFSET, HEAD_BASE, LCM, WEIGHTED)
        for start in range(0, full, BLOCK_N):
            dq = dq_block(q, do, lse, delta, kc, vc, KM, k_base, m_base, 0, kr, k_count, start, qidx, row_ok, dq, ku,
                          mu, qk_scale, do_scale, dims, IS_CAUSAL, HAS_MASK, False, BLOCK_N, TMA, pairs, WEIGHTED)
        for start in range(full, hi, BLOCK_N):
            dq = dq_block(q, do, lse, delta, kc, vc, KM, k_base, m_base, 0, kr, k_count, start, qidx, row_ok, dq, ku,
                          mu, qk_scale, do_scale, dims, IS_CAUSAL, HAS_MASK, True, BLOCK_N, TMA, pairs, WEIGHTED)
        if CHAIN:
            gdc_wait()
        _add_tile(DQ, q_base, rows, row_ok, RATE, qu, dims, dq * scale, FIRST)


    @triton.jit
    def _rowsum_product(A, B, OUT, ROWS, D: tl.constexpr, BLOCK: tl.constexpr):
        """OUT[i] = sum_j A[i, j] * B[i, j] in float32 over contiguous rows of D."""
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = rows < ROWS
        offs = rows.to(tl.int64)[:, None] * D + tl.arange(0, D)[None, :]
        a = tl.load(A + offs, mask=ok[:, None], other=0.0).to(tl.float32)
        b = tl.load(B + offs, mask=ok[:, None], other=0.0).to(tl.float32)
        tl.store(OUT + rows, tl.sum(a * b, 1), mask=ok)


def _config(d: int, dtype: torch.dtype, causal: bool, masked: bool):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward kernel: 64-row tiles for causal plans
    (less of the diagonal block wasted), 128 rows over 8 warps for plain ones (at d = 128 against 128-key
    blocks), 4 warps with a key mask (NOTES.md v15, 128K d = 64: causal 2.78 vs 2.84 ms, plain 4.35 vs 5.03,
    masked 5.30 vs 8.92 at 8 warps); float32 tiles take twice the shared memory."""
    if dtype == torch.float32:  # NOTES.md v12: causal at 128K, 16.7 ms (d = 64), 39.2 vs 75.7 ms with (64, 64, 8, 2)
        return (128, 64, 8, 2) if d <= 64 else (32, 64, 4, 2)
    if causal:  # d = 128 too (NOTES.md v22: paper causal at 128K 4.19 vs 4.40 ms on (128, 64, 8, 3))
        return 64, 64, 4, 3
    if d > 64:  # NOTES.md v30: head_groups forward at 128K 1.55-1.59 vs 1.63-1.70 ms on (128, 64, 8, 3)
        return (128, 64, 8, 3) if masked else (128, 128, 8, 3)
    return (128, 64, 4, 3) if masked else (128, 64, 8, 3)


def _bwd_configs(d: int, dtype: torch.dtype, causal: bool, masked: bool):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the dK/dV kernel, then of the dQ kernel (plain
    non-causal: 128 query rows over 8 warps, NOTES.md v15: 4.28 vs 4.69 ms at 128K, d = 64; d = 128
    takes the same, v19: head_groups forward+backward at 128K 8.76 vs 14.96 ms on (64, 64, 8, 3) in both)."""
    if dtype == torch.float32:  # NOTES.md v12, causal: d = 64 66.0 vs 126.2 ms (64, 64, 8, 2), d = 128 46.9 vs 92.1
        cfg = (64, 32, 4, 2) if d <= 64 else (32, 32, 4, 1)
        return cfg, cfg
    return (64, 64, 4, 3), ((64, 64, 4, 3) if causal or masked else (128, 64, 8, 3))


class _Launch:
    """Geometry of one launch: strides (batch, segment, head, row) of the query side (q, out,
    dout, dq), the key side (k, v), the row-statistics side (lse, delta), the key mask (head
    stride 0) and the key-gradient side (dk, dv, one per query head); class lengths; k/v head
    mapping; grid."""

    def __init__(self, q_strides, k_strides, l_strides, m_strides, g_strides, nq, segq, nk, segk, rate, offset, batch,
                 nheads, head_base=0, kv_head0=0, kv_group=1, q_shift=0, table=None, compact=False, links=None):
        self.rows = max(-(-segq // rate), -(-segk // rate))
        self.strides = (*q_strides, *k_strides, *l_strides, *m_strides)
        self.grad_strides = g_strides
        self.links = links  # a weighted launch (``_fwd``'s WEIGHTED): ``triton_fused.links``' (table, lcm, rates)
        self.sizes = (self.rows, nq, segq, nk, segk, rate, offset, head_base, kv_head0, kv_group, q_shift,
                      1 if links is None else links[1])
        self.batch, self.nheads = batch, nheads
        self.table = table  # packed documents: (start, length) per segment, int32 on the device; segq: the longest
        self.segments = -(-nq // segq) if table is None else table.numel() // 2
        self.compact = compact  # key-side tensors hold only each query head's class (``Backend.attend_classes_``)

    def grid(self, block: int):
        return (-(-self.rows // block) * self.segments, self.nheads, self.batch)


def _flat(t, seg: int):
    """(batch, segment, head, row) strides of a (b, n, h, ...) tensor cut into segments of ``seg`` rows."""
    sb, su, sh = t.stride()[:3]
    return sb, seg * su, sh, su


def _heads(t, branch: Branch):
    """t[:, :, branch's heads], or t itself when they are all of its heads (a view costs ~1.5 us of host time)."""
    return _view(t, _head_slice(branch, t.shape[2]))


def _head_slice(branch: Branch, num_heads: int):
    """The branch's heads as a slice, or None when they are all of them."""
    start, stop = branch.head_start, branch.head_stop
    return None if start == 0 and stop == num_heads else slice(start, stop)


def _view(t, heads):
    """t[:, :, heads], or t itself (heads None)."""
    return t if heads is None else t[:, :, heads]


def _branch_launch(q, k, lse, mask, grad, branch: Branch, table=None, links=None) -> _Launch:
    """A branch over (b, n, h, d) q (sliced to the branch's heads), unsliced k (h_kv heads), the
    key mask (b, n) or None, and a key gradient laid out like the sliced q; segments of ``branch.segment`` rows,
    or those of ``table`` (packed documents; ``branch.segment``: the longest); links: weighted (``_Launch``)."""
    b, n = q.shape[:2]
    seg = branch.segment
    nheads = branch.head_stop - branch.head_start
    m_strides = (mask.stride(0), seg * mask.stride(1), 0, mask.stride(1)) if mask is not None else (0, 0, 0, 0)
    return _Launch(_flat(q, seg), _flat(k, seg), _flat(lse, seg), m_strides, _flat(grad, seg), n, seg, n, seg,
                   branch.rate, branch.offset, b, nheads, branch.head_base + branch.head_start, branch.head_start,
                   branch.kv_group, table=table, links=links)


@functools.lru_cache(maxsize=64)
def _launches(plan: Plan, n: int, device: torch.device) -> tuple[tuple[Branch, torch.Tensor | None], ...]:
    """The plan's launches: one per branch, and with packed documents one per schedule entry over
    every document (the i-th branch of each), its segments in a (start, length) table on the device."""
    docs = documents(plan, n)
    if len(docs) == 1:
        return tuple((branch, None) for branch in plan)
    launches = []
    for entry in zip(*docs.values()):
        first = entry[0]
        table = [x for br in entry for start in range(br.row_start, br.row_stop, br.segment)
                 for x in (start, min(br.segment, br.row_stop - start))]
        launch = Branch(max(br.segment for br in entry), first.rate, first.offset, first.head_start, first.head_stop,
                        first.head_base, first.kv_group)
        launches.append((launch, torch.tensor(table, dtype=torch.int32, device=device)))
    return tuple(launches)


def _classes_launch(q, kc, lse, mask, grad, branch: Branch) -> _Launch:
    """A branch over one segment of q's n rows (b, n, h, d; sliced to the branch's heads) whose keys
    come as classes: kc, grad (b, n / r, h, d) and the key mask (b, n / r, h) or None, row i of
    head j being key row o_j + i r."""
    b, n = q.shape[:2]
    side = lambda t: (t.stride(0), 0, t.stride(2), t.stride(1))  # noqa: E731
    m_strides = side(mask) if mask is not None else (0, 0, 0, 0)
    nheads = branch.head_stop - branch.head_start
    return _Launch(_flat(q, n), side(kc), _flat(lse, n), m_strides, side(grad), n, n, n, n, branch.rate,
                   branch.offset, b, nheads, branch.head_base + branch.head_start, compact=True)


def _view_launch(q, k, lse, mask, grad, q_offset: int = 0) -> _Launch:
    """One block of (b, S, c, h, d) views, k/v with h or 1 heads, the key mask (b, S, c_k) or None:
    every row of every segment; causal query row i sees key rows <= i + q_offset."""
    b, segments, cq, heads = q.shape[:4]
    ck = k.shape[2]
    side = lambda t: (t.stride(0), t.stride(1), t.stride(3), t.stride(2))  # noqa: E731
    m_strides = (mask.stride(0), mask.stride(1), 0, mask.stride(2)) if mask is not None else (0, 0, 0, 0)
    return _Launch(side(q), side(k), side(lse), m_strides, side(grad), segments * cq, cq, segments * ck, ck, 1, 0, b,
                   heads, kv_group=heads // k.shape[3], q_shift=q_offset)


def _weighting(launch: _Launch, block: int) -> int:
    """The kernels' WEIGHTED: 2 where a launch weighs each pair by the smaller of its row's and key's links
    (``_pair_links``; its blocks of ``block`` class rows start where the links repeat), else 0."""
    if launch.links is not None and launch.sizes[5] * block % launch.links[1]:
        raise ValueError(f"triton backend: blocks of {block} rows at rate {launch.sizes[5]} do not repeat links "
                         f"modulo {launch.links[1]}")
    return 0 if launch.links is None else 2


def _mask_arg(mask, like):
    """The key mask as bytes for the kernels (a placeholder pointer when there is none)."""
    return like if mask is None else mask.view(torch.uint8)


def _table_args(launch: _Launch, like) -> tuple:
    """The segment table and the links table (``_Launch``) for the kernels (placeholder pointers for none)."""
    return like if launch.table is None else launch.table, like if launch.links is None else launch.links[0]


def _forward_launch(d: int, dtype, launch: _Launch, scale: float, causal: bool, first: bool, masked: bool, tma: bool,
                    out_scale: float = 1.0, other_rows: bool = False):
    """(kernel, grid, scalars, constexprs) of one forward launch; its tensors: q, k, v, out, lse, the key
    mask, the segment and links tables (``_mask_arg``, ``_table_args``). other_rows: the launch also stores 0 /
    -inf at its segments' rows outside its classes (``_fwd``)."""
    bm, bn, warps, stages = _config(d, dtype, causal, masked)
    return _fwd, launch.grid(bm), (*launch.strides, *launch.sizes, scale * LOG2E, out_scale), dict(
        IS_CAUSAL=causal, FIRST=first, HAS_MASK=masked, TABLE=launch.table is not None, COMPACT=launch.compact,
        NEG_SCALE=scale < 0, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=d, TMA=tma, OTHER_ROWS=other_rows,
        WEIGHTED=_weighting(launch, bn), num_warps=warps, num_stages=stages)


def _run_forward(q, k, v, out, lse, mask, launch: _Launch, scale: float, causal: bool, first: bool) -> None:
    """One forward launch, made now (the ring's pieces and key classes: one launch a call)."""
    kernel, grid, scalars, meta = _forward_launch(q.shape[-1], q.dtype, launch, scale, causal, first, mask is not None,
                                                  triton_fused.tma_loads(k, v))
    launch_kernel(kernel, grid, (q, k, v, out, lse, _mask_arg(mask, q), *_table_args(launch, q)), scalars, **meta)


def _backward_launches(d: int, dtype, launch: _Launch, scale: float, causal: bool, masked: bool, tma: bool,
                       do_scale: float = 1.0, passes: str = "kq", first: bool = False):
    """(kernel, grid, scalars, constexprs) of the dK/dV launch ("k" in passes; tensors q, k, v, dout, lse,
    delta, key mask, dk, dv, the tables; dk, dv laid out per query head, ``launch.grad_strides``) and of the dQ
    launch ("q"; tensors q, k, v, dout, lse, delta, key mask, dq, the tables), or None; first: store the
    gradients' rows rather than add (they hold nothing yet)."""
    sizes = (*launch.sizes, scale * LOG2E, scale, do_scale)
    kv_cfg, q_cfg = _bwd_configs(d, dtype, causal, masked)
    flags = dict(IS_CAUSAL=causal, FIRST=first, HAS_MASK=masked, TABLE=launch.table is not None,
                 COMPACT=launch.compact, HEAD_DIM=d)

    def meta(bm, bn, warps, stages, **extra):
        return dict(flags, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **extra)

    dkdv = (_bwd_dkdv, launch.grid(kv_cfg[1]), (*launch.strides, *launch.grad_strides, *sizes),
            meta(*kv_cfg, WEIGHTED=_weighting(launch, kv_cfg[0])))
    dq = (_bwd_dq, launch.grid(q_cfg[0]), (*launch.strides, *sizes),
          meta(*q_cfg, TMA=causal and tma, WEIGHTED=_weighting(launch, q_cfg[1])))
    return dkdv if "k" in passes else None, dq if "q" in passes else None


def _run_backward(dout, q, k, v, lse, delta, mask, dq, dk, dv, launch: _Launch, scale: float, causal: bool,
                  do_scale: float = 1.0) -> None:
    """Both passes of one launch (``_backward_launches``), adding into dq, dk, dv."""
    dkdv, dq_pass = _backward_launches(q.shape[-1], q.dtype, launch, scale, causal, mask is not None,
                                       triton_fused.tma_loads(k, v), do_scale)
    km, tables = _mask_arg(mask, q), _table_args(launch, q)
    launch_kernel(*dkdv[:2], (q, k, v, dout, lse, delta, km, dk, dv, *tables), dkdv[2], **dkdv[3])
    launch_kernel(*dq_pass[:2], (q, k, v, dout, lse, delta, km, dq, *tables), dq_pass[2], **dq_pass[3])


def _geometry(q, k, lse, mask) -> tuple:
    """What a plan's launches read of the call's tensors: shapes, strides, dtype, device (out, dq share
    q's strides, dk, dv k's: the callers check)."""
    return (q.shape, q.stride(), k.shape, k.stride(), lse.stride(), None if mask is None else mask.stride(), q.dtype,
            q.device)


def _forward_steps(q, k, lse, key_mask, plan: Plan, scale, causal, out_scale, fresh, other_rows, tma,
                   links=None, after: bool = False) -> tuple:
    """``Triton._branch_forwards``' launches: per branch, (its heads or None, its segment table or None, the
    links table or None, ``_forward_launch``); links: weighted launches (``_Launch``); after: the first launch
    chains after the launch before the call (``chained``)."""
    steps, written = [], set()  # heads a launch has written: a fresh launch over fresh heads reads nothing
    chain = not other_rows and _chains(q)  # other_rows: launches on side streams
    for i, (branch, table) in enumerate(_launches(plan, q.shape[1], q.device)):
        new = set(range(branch.head_start, branch.head_stop))
        first = fresh and written.isdisjoint(new)
        written |= new
        if out_scale != 1.0 and not first:
            raise ValueError("triton backend: out_scale needs branches over disjoint heads (head_groups)")
        heads = _head_slice(branch, q.shape[2])
        qv, lv = _view(q, heads), _view(lse, heads)
        launch = _branch_launch(qv, k, lv, key_mask, qv, branch, table, links)
        spec = _forward_launch(q.shape[-1], q.dtype, launch, scale, causal, first, key_mask is not None, tma,
                               out_scale, other_rows and branch.rate > 1)
        steps.append((heads, *_table_args(launch, None), _chained_launch(spec, i, chain, after)))
    return tuple(steps)


def _backward_steps(q, k, lse, key_mask, plan: Plan, scale, causal, out_scale, fresh, tma, links=None,
                    after: bool = False) -> tuple:
    """``Triton._branch_backwards``' launches: (``_backward_launches``' launch, the query heads, the k/v heads,
    the dK/dV heads (each a slice or None: all), the segment table or None, the links table or None). Per
    branch a dK/dV launch and a dQ launch; with GQA the branch's dQ launch, then one dK/dV launch per query
    head of a k/v head, each adding into dk, dv straight (no per-query-head buffers)."""
    group = q.shape[2] // k.shape[2]
    d, masked, steps = q.shape[-1], key_mask is not None, []
    for i, (branch, table) in enumerate(_launches(plan, q.shape[1], q.device)):
        heads = _head_slice(branch, q.shape[2])
        qv, lv = _view(q, heads), _view(lse, heads)
        # the dK/dV strides: dk has k's (callers check); with GQA this launch runs dQ alone
        launch = _branch_launch(qv, k, lv, key_mask, qv if group > 1 else _view(k, heads), branch, table, links)
        dkdv, dq = _backward_launches(d, q.dtype, launch, scale, causal, masked, tma, out_scale,
                                      "kq" if group == 1 else "q", fresh and i == 0)
        tables = _table_args(launch, None)
        steps += [(dkdv, heads, None, heads, *tables)] if dkdv else []
        steps.append((dq, heads, None, None, *tables))
        for head0 in range(branch.head_start, min(branch.head_stop, branch.head_start + group)) if group > 1 else ():
            h = slice(head0, branch.head_stop, group)  # one query head of each k/v head from head0 // group
            kv = slice(head0 // group, None)
            qv, lv = q[:, :, h], lse[:, :, h]
            phase = replace(branch, offset=-group if branch.offset == PER_HEAD else branch.offset,
                            head_base=branch.head_base + head0, head_start=0, head_stop=qv.shape[2], kv_group=1)
            launch = _branch_launch(qv, k[:, :, kv], lv, key_mask, k[:, :, kv], phase, table, links)
            dkdv, _ = _backward_launches(d, q.dtype, launch, scale, causal, masked, tma, out_scale, "k",
                                         fresh and i == 0 and head0 == 0)
            steps.append((dkdv, h, kv, kv, *tables))
    chain = _chains(q)
    return tuple((_chained_launch(spec, i, chain, after), *rest) for i, (spec, *rest) in enumerate(steps))


_CHAINS = True  # benchmarks/chained_launches.py switches it off for an A/B


def _chained_launch(spec: tuple, i: int, chain: bool, after: bool = False) -> Launch:
    """The ``Launch`` of a call's launch i, spec = (kernel, grid, scalars, constexprs) (``chained``)."""
    kernel, grid, scalars, meta = spec
    return Launch(kernel, grid, scalars, chained(meta, i, chain, after))


def _chains(q) -> bool:
    """Whether a call's launches may each start while the one before runs, up to where it reads what that
    one writes (programmatic dependent launch: short launches overlap the previous one's last wave)."""
    return _CHAINS and q.is_cuda and not _interpreted(q) and _grid_dependency_control(q.device.index)


@functools.lru_cache(maxsize=None)
def _grid_dependency_control(device: int | None) -> bool:
    """sm_90 or newer and a Triton with ``gdc_wait``."""
    return gdc_wait is not None and torch.cuda.get_device_capability(device)[0] >= 9


def _stores_every_row(plan: Plan, num_heads: int) -> bool:
    """Whether the plan's first launch covers every row of every head (rate 1 over all heads): fresh
    accumulators and gradients then need no fill (the first launch stores them)."""
    return plan[0].rate == 1 and (plan[0].head_start, plan[0].head_stop) == (0, num_heads)


@functools.lru_cache(maxsize=256)
def _one_branch_per_head(plan: Plan, num_heads: int) -> bool:
    """Whether every head has exactly one branch, over the whole sequence (head_groups without packed
    documents): each launch then stores its heads' other rows too (``_fwd``'s OTHER_ROWS), so out
    and lse need no fill (NOTES.md v20: head_groups forward 2-4% faster at 128K)."""
    heads = sorted(j for br in plan for j in range(br.head_start, br.head_stop))
    return heads == list(range(num_heads)) and all(br.row_start == 0 and br.row_stop < 0 for br in plan)


def _new_out_lse(q, fresh: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """out (like q) and lse (b, n, h) float32 for a plan's launches: uninitialised where they store every row
    (fresh), else 0 and -inf (rows no branch links keep them)."""
    b, n, h, _ = q.shape
    if fresh:
        return torch.empty_like(q), torch.empty((b, n, h), dtype=torch.float32, device=q.device)
    return torch.zeros_like(q), torch.full((b, n, h), float("-inf"), dtype=torch.float32, device=q.device)


def _new_grads(q, k, v, fresh: bool) -> tuple[torch.Tensor, ...]:
    """dq, dk, dv for a plan's launches: uninitialised where the first launch stores every row (fresh), else 0."""
    return tuple(torch.empty_like(t) if fresh else torch.zeros_like(t) for t in (q, k, v))


CONCURRENT_MIN_ROWS = 32768  # b x n below which head_groups' launches run one after another (host-bound)


def _concurrent(q) -> bool:
    """Whether head_groups' launches (disjoint heads: independent) run each on a side stream, so one
    launch's last wave overlaps the next one's first: CUDA, at least ``CONCURRENT_MIN_ROWS`` rows, and
    not while a CUDA graph captures (a graph takes them one after another)."""
    return q.is_cuda and q.shape[0] * q.shape[1] >= CONCURRENT_MIN_ROWS \
        and not torch.cuda.is_current_stream_capturing()


@functools.lru_cache(maxsize=None)
def _stream_pool(device: torch.device, count: int) -> tuple:
    return tuple(torch.cuda.Stream(device) for _ in range(count))


def _side_streams(device: torch.device, count: int) -> tuple:
    """count side streams of the device, each made to wait for the current stream's work so far."""
    streams = _stream_pool(device, count)
    main = torch.cuda.current_stream(device)
    for stream in streams:
        stream.wait_stream(main)
    return streams


def _same_strides(names: str, *tensors) -> None:
    """The kernels address these with one set of strides (a dim of size 1 has no stride that matters)."""
    first = tensors[0]
    for t in tensors[1:]:
        if t.shape[:-1] != first.shape[:-1] or any(
            a != b for a, b, size in zip(t.stride(), first.stride(), first.shape) if size > 1
        ):
            raise ValueError(f"triton backend: {names} must share shape and strides")
    if first.shape[-1] > 1 and first.stride(-1) != 1:
        raise ValueError(f"triton backend: {names} need unit stride in head_dim")


def _row_dot(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor, budget: int = 1 << 26) -> torch.Tensor:
    """rowsum(a * b) over the last dim in float32, shaped and strided like ``like`` (the lse).

    a, b: (b, n, ..., d). Contiguous inputs take one kernel pass (``_rowsum_product``); others
    go in slices of n so the float32 temporaries stay within ``budget`` elements instead of
    three full-size float32 copies.
    """
    out = torch.empty_like(like)
    if (a.is_cuda or _interpreted(a)) and all(t.is_contiguous() for t in (a, b, out)) and a.shape[:-1] == out.shape:
        rows, d = out.numel(), a.shape[-1]
        launch_kernel(_rowsum_product, (-(-rows // 64),), (a, b, out), (rows,), D=d, BLOCK=64)
        return out
    step = max(1, budget // max(1, a[:, :1].numel()))
    for i in range(0, a.shape[1], step):
        out[:, i : i + step] = (a[:, i : i + step].float() * b[:, i : i + step].float()).sum(-1)
    return out


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read once, as Triton reads it when the kernels are made


def _interpreted(q: torch.Tensor) -> bool:
    """Triton's interpreter runs the kernels on CPU tensors (tests of the kernels' logic)."""
    return _INTERPRET and q.device.type == "cpu"


@functools.lru_cache(maxsize=256)
def _document_rates(plan: Plan) -> tuple[int, ...]:
    """The rates of the plan's first document's branches (every document has the same schedule)."""
    return tuple(br.rate for br in itertools.takewhile(lambda br: br.row_start == plan[0].row_start, plan))


def fused_causal(pass_name: str, plan: Plan, q, key_mask, fused, branches) -> bool:
    """Whether a causal plan the fused kernels tile, counting each pair once per branch (not ``union``), runs
    fused (one launch, more work: a tile's rows span its segment) rather than branch by branch (a launch per
    branch, each adding host time): whichever of ``fused()`` and ``branches()`` ran faster, timed once per
    kind of call (schedule's rates, k/v group, head_dim, dtype, mask) and size (n and b h, each to a power of
    two), so packed documents that change every batch are not timed again (``triton_fused.pick``; fused off
    CUDA, so the interpreter checks the fused kernels)."""
    b, n, h, d = q.shape
    key = (pass_name, _document_rates(plan), plan[0].kv_group, d, q.dtype, q.device, key_mask is not None,
           n.bit_length(), (b * h).bit_length())
    run = {"fused": fused, "branches": branches}
    return triton_fused.pick(key, tuple(run), lambda name: run[name]()) == "fused"


class Triton(Backend):
    name = "triton"

    def not_supported_reasons(self, q: torch.Tensor, masked: bool = False) -> list[str]:
        if triton is None:
            return ["Triton is not installed"]
        reasons = []
        if q.device.type != "cuda" and not _interpreted(q):
            reasons.append(f"needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), got {q.device.type}")
        dtypes = (torch.float16, torch.bfloat16, torch.float32)
        if q.dtype not in dtypes:
            reasons.append(f"takes {', '.join(map(str, dtypes))}, got {q.dtype}")
        if q.shape[-1] not in HEAD_DIMS:
            reasons.append(f"takes head_dim in {HEAD_DIMS}, got {q.shape[-1]}")
        return reasons

    def accumulator_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype  # the kernels merge in float32 registers and store in the inputs' dtype

    def forward_plan(self, q, k, v, plan: Plan, scale: float, causal: bool, out_scale: float, key_mask=None):
        """The fused kernels where they tile the plan (causal: where faster), else one launch per
        branch, merging into ``out`` itself (fp32 in registers, one rounding to q.dtype per
        branch): the only extra memory is the fp32 lse. ``out_scale`` (1/m in head_groups mode) is
        applied as each launch stores, which needs branches over disjoint heads.
        Queries shorter than the keys run block by block (``Backend.forward_plan``) on the same kernels.
        """
        if q.shape[1] != k.shape[1]:
            return super().forward_plan(q, k, v, plan, scale, causal, out_scale, key_mask)
        q, k, v = (t.contiguous() for t in (q, k, v))
        _, n, h, d = q.shape
        block = triton_fused.fwd_tile(plan, n, h, d, q.dtype) if out_scale == 1.0 else 0

        def fused():
            return triton_fused.forward(q, k, v, plan, scale, causal, key_mask, block)

        def branches():
            stores_all = _one_branch_per_head(plan, h)
            out, lse = _new_out_lse(q, stores_all or _stores_every_row(plan, h))
            self._branch_forwards(out, lse, q, k, v, plan, scale, causal, key_mask, out_scale, fresh=True,
                                  other_rows=stores_all)
            return out, lse

        if block and causal and triton_fused.union(plan, n):
            return self._first_apart_forward(q, k, v, plan, scale, causal, key_mask, block)
        if block and (not causal or fused_causal("forward", plan, q, key_mask, fused, branches)):
            return fused()
        return branches()

    def _first_apart_forward(self, q, k, v, plan: Plan, scale: float, causal: bool, key_mask, block: int):
        """A causal union plan (``triton_fused.first_apart``): the branches after the first fused (a tile's
        rows see their keys in full, or not at all: no diagonal), then the first branch's launch, weighted,
        merged into what they wrote (or storing, where no later branch links anything outside it)."""
        first, rest = triton_fused.first_apart(plan, q.shape[1])
        fresh = not rest and _stores_every_row(first, q.shape[2])
        chain = rest and _chains(q)  # the first branch's launch starts while the fused one's last programs run
        if rest:
            out, lse = triton_fused.forward(q, k, v, plan, scale, causal, key_mask, block, from_branch=1, chain=chain)
        else:
            out, lse = _new_out_lse(q, fresh)
        self._branch_forwards(out, lse, q, k, v, first, scale, causal, key_mask, 1.0, fresh=fresh,
                              links=triton_fused.links(plan, q.device), after=chain)
        return out, lse

    def attend_plan_(self, out, lse, q, k, v, plan: Plan, scale: float, causal: bool, key_mask=None) -> None:
        """One launch per branch over (b, n, ...) tensors of equal length (the ring's chunks); q, out
        and k, v may be row slices of larger tensors. Shorter queries go block by block."""
        if q.shape[1] != k.shape[1]:
            return super().attend_plan_(out, lse, q, k, v, plan, scale, causal, key_mask)
        _same_strides("q and out", q, out)
        _same_strides("k and v", k, v)
        self._branch_forwards(out, lse, q, k, v, plan, scale, causal, key_mask, 1.0, fresh=False)

    def _branch_forwards(self, out, lse, q, k, v, plan, scale, causal, key_mask, out_scale, fresh: bool,
                         other_rows: bool = False, links=None, after: bool = False) -> None:
        """other_rows: every head has one branch and out, lse hold nothing yet (``_one_branch_per_head``);
        links: weighted launches (``_Launch``); after: the first launch chains after the launch before the call,
        which signals its dependents (``chained``). The launches are made once per call geometry (``prepared``)."""
        tma = triton_fused.tma_loads(k, v)
        key = ("forward", plan, *_geometry(q, k, lse, key_mask), scale, causal, out_scale, fresh, other_rows, tma,
               links and links[1:], after)
        steps = prepared(key, lambda: _forward_steps(q, k, lse, key_mask, plan, scale, causal, out_scale, fresh,
                                                      other_rows, tma, links, after))
        streams = _side_streams(q.device, len(steps)) if other_rows and _concurrent(q) else None
        km = _mask_arg(key_mask, q)
        for i, (heads, table, lk, launch) in enumerate(steps):
            qv = _view(q, heads)
            tensors = (qv, k, v, _view(out, heads), _view(lse, heads), km, qv if table is None else table,
                       qv if lk is None else lk)
            if streams is None:
                launch(tensors)
                continue
            with torch.cuda.stream(streams[i]):
                launch(tensors)
        if streams:
            main = torch.cuda.current_stream(q.device)
            for stream in streams:
                main.wait_stream(stream)

    def backward_plan(self, dout, q, k, v, out, lse, plan: Plan, scale: float, causal: bool, out_scale: float,
                      key_mask=None):
        """Gradients against the merged (out, lse): the fused kernels as in ``forward_plan``, else
        summed in place branch by branch; the kernels scale dO by ``out_scale`` (``out`` is what
        ``forward_plan`` returned, scaled). With GQA, each k/v head's query heads add into its dK
        and dV one launch after another."""
        if q.shape[1] != k.shape[1]:
            return super().backward_plan(dout, q, k, v, out, lse, plan, scale, causal, out_scale, key_mask)
        q, k, v, dout, lse = (t.contiguous() for t in (q, k, v, dout.to(q.dtype), lse))
        configs = None if out_scale != 1.0 else triton_fused.bwd_tiles(plan, *q.shape[1:3], q.shape[-1], q.dtype,
                                                                       causal, key_mask is not None)

        def fused():
            delta = _row_dot(dout, out, lse)
            return triton_fused.backward(dout, q, k, v, lse, delta, plan, scale, causal, key_mask, configs, _chains(q))

        def branches():
            fresh = _stores_every_row(plan, q.shape[2])
            dq, dk, dv = _new_grads(q, k, v, fresh)
            self._branch_backwards(dq, dk, dv, dout, q, k, v, out, lse, plan, scale, causal, out_scale, key_mask,
                                   fresh)
            return dq, dk, dv

        if configs and causal and triton_fused.union(plan, q.shape[1]):
            return self._first_apart_backward(dout, q, k, v, out, lse, plan, scale, causal, key_mask, configs)
        if configs and (not causal or fused_causal("backward", plan, q, key_mask, fused, branches)):
            return fused()
        return branches()

    def _first_apart_backward(self, dout, q, k, v, out, lse, plan: Plan, scale: float, causal: bool, key_mask,
                             configs):
        """Gradients of ``_first_apart_forward``: the fused launches from branch 1 store them, then the
        first branch's launches, weighted, add into them (or store, where the fused ones have nothing)."""
        first, rest = triton_fused.first_apart(plan, q.shape[1])
        delta = _row_dot(dout, out, lse)
        fresh = not rest and _stores_every_row(first, q.shape[2])
        chain = rest and _chains(q)  # as in the forward
        if rest:
            dq, dk, dv = triton_fused.backward(dout, q, k, v, lse, delta, plan, scale, causal, key_mask, configs,
                                               chain, from_branch=1)
        else:
            dq, dk, dv = _new_grads(q, k, v, fresh)
        self._branch_backwards(dq, dk, dv, dout, q, k, v, out, lse, first, scale, causal, 1.0, key_mask, fresh, delta,
                               triton_fused.links(plan, q.device), after=chain)
        return dq, dk, dv

    def attend_plan_backward_(self, dq, dk, dv, dout, q, k, v, out, lse, plan: Plan, scale: float, causal: bool,
                              out_scale: float, key_mask=None) -> None:
        """One dQ launch per branch and one dK/dV launch per branch (with GQA, one per query head of a
        k/v head: each adds into dk, dv straight, no per-query-head buffers), adding into dq, dk, dv
        (tensors of equal length, or row slices of larger ones). Shorter queries go block by block."""
        if q.shape[1] != k.shape[1]:
            return super().attend_plan_backward_(dq, dk, dv, dout, q, k, v, out, lse, plan, scale, causal, out_scale,
                                                 key_mask)
        _same_strides("q, dout and dq", q, dout, dq)
        _same_strides("k, v, dk and dv", k, v, dk, dv)
        self._branch_backwards(dq, dk, dv, dout, q, k, v, out, lse, plan, scale, causal, out_scale, key_mask, False)

    def _branch_backwards(self, dq, dk, dv, dout, q, k, v, out, lse, plan, scale, causal, out_scale, key_mask,
                          fresh: bool, delta=None, links=None, after: bool = False) -> None:
        """``attend_plan_backward_``'s launches (made once per call geometry, ``_backward_steps``); fresh: dq,
        dk, dv hold nothing yet and the plan's first launch stores every row of them (``_stores_every_row``),
        so it stores instead of adding; delta: rowsum(dout * out) where the caller has it; links: weighted
        launches (``_Launch``); after: the first launch chains after the launch before the call (``chained``)."""
        lse = lse.contiguous()
        if delta is None:
            delta = _row_dot(dout, out, lse)  # rowsum(dO' O) for dO' = s dout, O = out / s
        tma = triton_fused.tma_loads(k, v)
        key = ("backward", plan, *_geometry(q, k, lse, key_mask), scale, causal, out_scale, fresh, tma,
               links and links[1:], after)
        steps = prepared(key, lambda: _backward_steps(q, k, lse, key_mask, plan, scale, causal, out_scale, fresh, tma,
                                                      links, after))
        km = _mask_arg(key_mask, q)
        for launch, heads, kv_heads, grad_heads, table, lk in steps:
            qv = _view(q, heads)
            rows = (qv, _view(k, kv_heads), _view(v, kv_heads), _view(dout, heads), _view(lse, heads),
                    _view(delta, heads), km)
            grads = (_view(dq, heads),) if launch.kernel is _bwd_dq else (_view(dk, grad_heads), _view(dv, grad_heads))
            launch((*rows, *grads, qv if table is None else table, qv if lk is None else lk))

    def attend_classes_(self, out, lse, q, kc, vc, branch, scale: float, key_mask=None) -> None:
        """One launch; keys read from their class layout (``COMPACT``)."""
        _same_strides("q and out", q, out)
        _same_strides("k and v", kc, vc)
        qv, lv = _heads(q, branch), _heads(lse, branch)
        _run_forward(qv, kc, vc, _heads(out, branch), lv, key_mask, _classes_launch(qv, kc, lv, key_mask, kc, branch),
                     scale, False, first=False)

    def attend_classes_backward_(self, dq, dkc, dvc, dout, q, kc, vc, out, lse, branch, scale: float,
                                 out_scale: float, key_mask=None) -> None:
        _same_strides("q, dout and dq", q, dout, dq)
        _same_strides("k, v, dk and dv", kc, vc, dkc, dvc)
        lse = lse.contiguous()
        delta = _row_dot(dout, out, lse)
        qv, lv = _heads(q, branch), _heads(lse, branch)
        _run_backward(_heads(dout, branch), qv, kc, vc, lv, _heads(delta, branch), key_mask, _heads(dq, branch), dkc,
                      dvc, _classes_launch(qv, kc, lv, key_mask, dkc, branch), scale, False, out_scale)

    def attend_(self, out, lse, q, k, v, scale: float, causal: bool, key_mask=None, q_offset: int = 0) -> None:
        """``out`` may be any float dtype (the ring keeps fp32)."""
        _same_strides("q and out", q, out)
        _same_strides("k and v", k, v)
        launch = _view_launch(q, k, lse, key_mask, q, q_offset)
        _run_forward(q, k, v, out, lse, key_mask, launch, scale, causal, first=False)

    def attend_backward_(self, dq, dk, dv, dout, q, k, v, out, lse, scale: float, causal: bool,
                         key_mask=None, q_offset: int = 0) -> None:
        _same_strides("q, dout and dq", q, dout, dq)
        _same_strides("k, v, dk and dv", k, v, dk, dv)
        lse = lse.contiguous()
        delta = _row_dot(dout, out, lse)
        shared = k.shape[3] != q.shape[3]  # one k/v head for every query head: per-head sums, then added
        gk, gv = (torch.zeros((*k.shape[:3], q.shape[3], k.shape[4]), dtype=torch.float32, device=q.device)
                  for _ in range(2)) if shared else (dk, dv)
        launch = _view_launch(q, k, lse, key_mask, gk, q_offset)
        _run_backward(dout, q, k, v, lse, delta, key_mask, dq, gk, gv, launch, scale, causal)
        if shared:
            dk.add_(gk.sum(3, keepdim=True))
            dv.add_(gv.sum(3, keepdim=True))
