"""A Gluon forward on the causal first branch's shape against our Triton kernel and SDPA, one GPU (sm_90).

    python benchmarks/gluon_first_branch.py [--batches 4] [--seq-len 8192] [--json gluon-first-branch.json]
    python benchmarks/gluon_first_branch.py --compile-only   # builds the kernel for sm_90, no GPU needed

The shape: dense causal attention inside segments of 2048 rows (LongNet's first branch, w = 2048, r = 1), bf16,
h = 12, d = 64, q, k, v and out (b, n, h, d) read and written through TMA as (b n, h d) matrices. The kernel is a
prototype written with Triton's Gluon dialect (explicit layouts, asynchronous warp-group MMA, TMA copies on
mbarriers): one warp group a program, 64 query rows against 64-key blocks, keys and values double-buffered, the
probabilities fed to the second MMA from registers. Not the library's kernel: unweighted, one segment length,
n a multiple of it. Compared in one run: our library on the same pairs (`dilated_attention(q, k, v, [2048], [1],
is_causal=True)`, the per-branch Triton kernel) and SDPA on the segments as (b n / 2048, h, 2048, d) blocks made
once before timing; max |out - SDPA's| for both. Medians of ``triton.testing.do_bench``, best of two rounds, ms.
Prints a table; writes JSON.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import triton  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)

SEG, H, D = 2048, 12, 64


@gluon.jit
def _causal_segments_fwd(q_desc, k_desc, v_desc, o_desc, L, N, H, SEG, qk_scale, BLOCK_M: gl.constexpr,
                         BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, num_warps: gl.constexpr):
    """One program: BLOCK_M query rows of one segment and head against the segment's keys up to its last row.
    Grid (segments x row blocks, heads, batch); L: lse (b, n, h) float32, natural log."""
    blocks_per_seg = SEG // BLOCK_M
    seg, mblk = gl.program_id(0) // blocks_per_seg, gl.program_id(0) % blocks_per_seg
    head, b = gl.program_id(1), gl.program_id(2)
    row0 = b * N + seg * SEG  # the segment's first row in the (b n, h d) view
    q_row, col = row0 + mblk * BLOCK_M, head * HEAD_DIM

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [2] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [2] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    mbarrier.init(kv_bar.index(0), count=1)
    mbarrier.init(kv_bar.index(1), count=1)

    n_blocks = (mblk + 1) * BLOCK_M // BLOCK_N  # causal: keys [0, (mblk + 1) BLOCK_M) of the segment
    kv_bytes: gl.constexpr = 2 * BLOCK_N * HEAD_DIM * 2
    mbarrier.expect(q_bar, BLOCK_M * HEAD_DIM * 2)
    tma.async_copy_global_to_shared(q_desc, [q_row, col], q_bar, q_smem)
    mbarrier.expect(kv_bar.index(0), kv_bytes)
    tma.async_copy_global_to_shared(k_desc, [row0, col], kv_bar.index(0), k_smem.index(0))
    tma.async_copy_global_to_shared(v_desc, [row0, col], kv_bar.index(0), v_smem.index(0))

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_layout)
    l_i = gl.zeros([BLOCK_M], gl.float32, row_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    rows = mblk * BLOCK_M + gl.arange(0, BLOCK_M, row_layout)
    mbarrier.wait(q_bar, phase=0)
    for j in range(n_blocks):
        stage = j % 2
        if j + 1 < n_blocks:  # the next block into the other stage while this one computes
            nxt = (j + 1) % 2
            mbarrier.expect(kv_bar.index(nxt), kv_bytes)
            tma.async_copy_global_to_shared(k_desc, [row0 + (j + 1) * BLOCK_N, col], kv_bar.index(nxt),
                                            k_smem.index(nxt))
            tma.async_copy_global_to_shared(v_desc, [row0 + (j + 1) * BLOCK_N, col], kv_bar.index(nxt),
                                            v_smem.index(nxt))
        mbarrier.wait(kv_bar.index(stage), phase=(j // 2) & 1)
        s = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)),
                          gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, )) * qk_scale
        if (j + 1) * BLOCK_N > mblk * BLOCK_M:  # the diagonal block
            cols = j * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
            s = gl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        p = gl.exp2(s - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        acc = acc * gl.convert_layout(alpha, orow_layout)[:, None]
        acc = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), v_smem.index(stage), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))

    mbarrier.invalidate(q_bar)
    mbarrier.invalidate(kv_bar.index(0))
    mbarrier.invalidate(kv_bar.index(1))
    o_smem = gl.allocate_shared_memory(o_desc.dtype, o_desc.block_type.shape, o_desc.layout)
    o_smem.store((acc / gl.convert_layout(l_i, orow_layout)[:, None]).to(gl.bfloat16))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [q_row, col], o_smem)
    gl.store(L + (q_row + gl.arange(0, BLOCK_M, row_layout)) * H + head, (m_i + gl.log2(l_i)) * 0.6931471805599453)
    tma.store_wait(pendings=0)


def forward(q, k, v, block_m: int = 64, block_n: int = 64):
    """q, k, v (b, n, h, d) bf16 contiguous, n a multiple of SEG -> out (b, n, h, d), lse (b, n, h)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    b, n, h, d = q.shape
    if n % SEG or q.dtype != torch.bfloat16 or not all(t.is_contiguous() for t in (q, k, v)):
        raise ValueError(f"the prototype takes contiguous bf16 q, k, v with n a multiple of {SEG}; got n = {n}, "
                         f"{q.dtype}")
    out = torch.empty_like(q)
    lse = torch.empty(b, n, h, device=q.device, dtype=torch.float32)
    descs = []
    for t, rows in ((q, block_m), (k, block_n), (v, block_n), (out, block_m)):
        flat = t.view(b * n, h * d)
        descs.append(TensorDescriptor(flat, flat.shape, flat.stride(), [rows, d],
                                      gl.NVMMASharedLayout.get_default_for([rows, d], gl.bfloat16)))
    grid = (n // SEG * (SEG // block_m), h, b)
    _causal_segments_fwd[grid](*descs, lse, n, h, SEG, d ** -0.5 * 1.4426950408889634, block_m, block_n, d,
                               num_warps=4)
    return out, lse


def compile_only() -> None:
    """Build the kernel for sm_90 on any host (no GPU): the Gluon program lowers and fits."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    desc = f"tensordesc<bf16[64, 64],{gl.NVMMASharedLayout.get_default_for([64, 64], gl.bfloat16)!r}>"
    names = ["q_desc", "k_desc", "v_desc", "o_desc", "L", "N", "H", "SEG", "qk_scale"]
    types = [desc] * 4 + ["*fp32", "i32", "i32", "i32", "fp32"]
    sig = dict(zip(names, types), BLOCK_M="constexpr", BLOCK_N="constexpr", HEAD_DIM="constexpr",
               num_warps="constexpr")
    compiled = triton.compile(GluonASTSource(_causal_segments_fwd, sig, {(9,): 64, (10,): 64, (11,): D, (12,): 4}),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    print(f"built for sm_90: {compiled.metadata.shared} bytes of shared memory a program")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--json", default=None)
    p.add_argument("--compile-only", action="store_true")
    a = p.parse_args()
    if a.compile_only:
        return compile_only()
    from triton.testing import do_bench

    from dilated_attention import dilated_attention

    b, n = a.batches, a.seq_len
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, n, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    segments = [t.view(b, n // SEG, SEG, H, D).transpose(2, 3).reshape(-1, H, SEG, D) for t in (q, k, v)]
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(*segments, is_causal=True)  # noqa: E731
    ours = lambda: dilated_attention(q, k, v, [SEG], [1], is_causal=True)  # noqa: E731
    proto = lambda: forward(q, k, v)[0]  # noqa: E731
    ref = sdpa().view(b, n // SEG, H, SEG, D).transpose(2, 3).reshape(b, n, H, D).float()
    times = {name: min(do_bench(f) for _ in range(2)) for name, f in (("ours", ours), ("gluon", proto), ("sdpa", sdpa))}
    errors = {name: (f().float() - ref).abs().max().item() for name, f in (("ours", ours), ("gluon", proto))}
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, f"b={b} n={n} h={H} d={D}")
    print(f"{'kernel':<8} {'ms':>8} {'/ SDPA':>8} {'max |out - SDPA|':>18}")
    for name, ms in times.items():
        print(f"{name:<8} {ms:8.4f} {ms / times['sdpa']:8.3f} {errors.get(name, 0.0):18.2e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), b=b, n=n, h=H, d=D, ms=times, max_error=errors), f,
                      indent=1)


if __name__ == "__main__":
    main()
