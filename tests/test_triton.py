"""The Triton kernels' logic on CPU, through Triton's interpreter (GPU runs use test_core's cases)."""

import concurrent.futures
import itertools
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")


def test_kernels_match_reference_under_interpreter():
    """triton_interpreted.py's checks, its PARTS in processes that run side by side (one core each)."""
    from triton_interpreted import PARTS

    env = dict(os.environ, TRITON_INTERPRET="1")
    script = os.path.join(os.path.dirname(__file__), "triton_interpreted.py")
    runs = [subprocess.Popen([sys.executable, script, str(part)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for part in range(len(PARTS))]
    try:
        for run in runs:
            stdout, stderr = run.communicate(timeout=1800)
            assert run.returncode == 0, stdout + stderr
            assert "all cases match" in stdout
    finally:
        for run in runs:
            run.kill()


def test_plan_keeps_every_branch():
    """Repeated (w, r), and branches clipped to the same w' = n, are separate branches (Eq. 10 counts both)."""
    from dilated_attention.plan import PER_HEAD, Branch, build_plan

    assert build_plan(37, 4, [8, 40, 80], [1, 2, 2], "paper") == (
        Branch(8, 1, PER_HEAD, 0, 4), Branch(37, 2, PER_HEAD, 0, 4), Branch(37, 2, PER_HEAD, 0, 4))
    assert build_plan(1024, 2, [2048, 4096], [1, 1], "paper") == (
        Branch(1024, 1, PER_HEAD, 0, 2), Branch(1024, 1, PER_HEAD, 0, 2))
    assert build_plan(100, 5, [10, 40], [1, 4], "head_groups") == (Branch(10, 1, 0, 0, 3), Branch(40, 4, 1, 3, 5))


def test_union_plans_are_the_nested_schedules():
    """The fused kernels count a pair once, weighted, where every rate divides the next, every segment nests
    in the next and is whole key blocks of it (LongNet's schedules, clipped or not); elsewhere once a branch."""
    from dilated_attention.backends.triton_fused import union
    from dilated_attention.plan import build_plan

    def takes(n, segs, rates, bounds=None):
        return union(build_plan(n, 4, segs, rates, "paper", cu_seqlens=bounds), n)

    longnet = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]
    assert takes(131072, *longnet) and takes(1000, *longnet) and takes(6000, *longnet)
    assert takes(612, [128, 256], [1, 2], (0, 100, 612)) and takes(384, [128, 128, 256], [1, 1, 2])
    assert not takes(131072, longnet[0][::-1], longnet[1][::-1])  # rates not in dividing order
    assert not takes(12288, [2048, 3072], [1, 2])  # segments that do not nest
    assert not takes(4096, [64, 128], [1, 2])  # 32 rows of the next class: not whole key blocks
    assert not takes(4096, [128, 384], [1, 3]) and not takes(4096, [2048, 4096], [1, 64])  # lcm not dividing 32
    assert takes(90, [96, 192], [1, 2]) and not takes(400, [96, 192], [1, 2], (0, 90, 400))  # every document
    from dilated_attention.backends import triton_fused

    for d, dtype, causal, masked in itertools.product((64, 128), (torch.bfloat16, torch.float32), (False, True),
                                                      (False, True)):  # skipped ranges are whole blocks of every config
        (_, kv_queries, *_), (_, dq_keys, *_) = triton_fused.bwd_configs(d, dtype, causal, masked)
        for block in (kv_queries, dq_keys, *(cfg[1] for cfg in triton_fused.fwd_configs(d, dtype))):
            assert 32 <= block <= triton_fused.UNION_BLOCK and triton_fused.UNION_BLOCK % block == 0


def test_kernels_compile_for_hopper():
    """Every kernel variant compiles for sm_90 (type errors the interpreter lets through) and fits an
    H100's shared memory (227 KiB a block), no GPU needed."""
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dilated_attention.backends import triton as tk

    floats = {"qk_scale", "scale", "out_scale", "do_scale"}
    stats = {"L", "D"}  # lse, delta: float32

    def signature(fn, out_dtype, consts, in_dtype="*bf16"):
        sig = {}
        for name in inspect.signature(fn.fn).parameters:
            if name in consts:
                sig[name] = "constexpr"
            elif name in floats:
                sig[name] = "fp32"
            elif name in stats:
                sig[name] = "*fp32"
            elif name in {"O", "DQ", "DK", "DV"}:
                sig[name] = out_dtype
            elif name in {"Q", "K", "V", "DO"}:
                sig[name] = in_dtype
            elif name == "KM":
                sig[name] = "*u8"
            elif name in ("T", "TS", "ST", "RO", "LK"):
                sig[name] = "*i32"
            else:
                sig[name] = "i32"
        return sig

    target = GPUTarget("cuda", 90, 32)

    jobs = []  # compiled at the end on two threads (ptxas runs outside the GIL)

    def compile_(src, **options):
        jobs.append((src, options))

    def compiled(job):
        src, options = job
        kernel = triton.compile(src, target=target, options=options)
        assert kernel.metadata.shared <= 227 * 1024, (src.fn.fn.__name__, src.constants, kernel.metadata.shared)

    for d, dtype in itertools.product((64, 128), (torch.bfloat16, torch.float32)):
        io = "*bf16" if dtype == torch.bfloat16 else "*fp32"
        tma = dtype != torch.float32  # keys and values through tensor descriptors, as on sm_90 (tma_loads)
        # every value of every flag of the forward (type errors come from one flag's code, not from pairs):
        # merging or storing, out in the inputs' dtype or fp32 with a key mask; the ring's visiting keys in their
        # class layout (COMPACT); causal: a union plan's first branch, weighted
        for causal, first, out_dtype, has_mask in ((False, False, "*fp32", True), (False, True, io, False),
                                                   (True, False, io, False), (True, True, "*fp32", True)):
            bm, bn, warps, stages = tk._config(d, dtype, causal, has_mask)
            compact = not (causal or first)
            consts = dict(IS_CAUSAL=causal, FIRST=first, HAS_MASK=has_mask, TABLE=has_mask and not compact,
                          COMPACT=compact, NEG_SCALE=first and causal, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=d,
                          TMA=tma, OTHER_ROWS=first, WEIGHTED=2 * causal)
            src = ASTSource(tk._fwd, signature(tk._fwd, out_dtype, consts, io), consts)
            compile_(src, num_warps=warps, num_stages=stages)
        for causal in (False, True):
            for has_mask in (False, True):
                configs = tk._bwd_configs(d, dtype, causal, has_mask)
                for fn, (bm, bn, warps, stages) in zip((tk._bwd_dkdv, tk._bwd_dq), configs):
                    consts = dict(IS_CAUSAL=causal, FIRST=not has_mask, HAS_MASK=has_mask, TABLE=not has_mask,
                                  COMPACT=has_mask and not causal, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=d,
                                  WEIGHTED=2 * causal)
                    if fn is tk._bwd_dq:
                        consts["TMA"] = tma and causal
                    src = ASTSource(fn, signature(fn, "*fp32", consts, io), consts)
                    compile_(src, num_warps=warps, num_stages=stages)
        consts = dict(D=d, BLOCK=64)
        src = ASTSource(tk._rowsum_product, dict(A="*bf16", B="*fp32", OUT="*fp32", ROWS="i32", D="constexpr",
                                                 BLOCK="constexpr"), consts)
        compile_(src)
        fused = tk.triton_fused
        if not fused._fused_runs(d, dtype):
            continue
        # weighted (causal: from branch 1, ``Triton._first_apart_forward``), and once per branch
        for causal, has_mask, union in ((False, False, True), (False, True, True), (True, False, True),
                                        (True, True, True), (True, True, False)):
            kv_config, dq_config = fused.bwd_configs(d, dtype, causal, has_mask)
            (kv_keys, kv_queries, *kv_launch), (dq_rows, dq_keys, *dq_launch) = kv_config, dq_config
            for fn, bm, bn, (warps, stages) in ((fused._fused_dkdv, kv_queries, kv_keys, kv_launch),
                                                (fused._fused_dq, dq_rows, dq_keys, dq_launch)):
                consts = dict(IS_CAUSAL=causal, HAS_MASK=has_mask, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=d, UNION=union,
                              FROM_BRANCH=int(causal and union))
                if fn is fused._fused_dq:  # chained: after dK/dV, and before the first branch's launches
                    consts.update(TMA=tma and causal, CHAIN=causal)
                src = ASTSource(fn, signature(fn, io, consts, io), consts)
                compile_(src, num_warps=warps, num_stages=stages)
            # the candidate with the most shared memory (rows x keys x stages): the others fit where it does and run
            # the same code
            for bm, bn, fwarps, fstages in [max(fused.fwd_configs(d, dtype), key=lambda c: c[0] * c[1] * c[3])]:
                consts = dict(IS_CAUSAL=causal, HAS_MASK=has_mask, NEG_SCALE=has_mask and causal, BLOCK_M=bm,
                              BLOCK_N=bn, HEAD_DIM=d, TMA=tma, UNION=union, FROM_BRANCH=int(causal and union),
                              CHAIN=causal)
                src = ASTSource(fused._fused_fwd, signature(fused._fused_fwd, io, consts, io), consts)
                compile_(src, num_warps=fwarps, num_stages=fstages)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(compiled, jobs))


def test_row_dot_in_slices_matches_one_pass():
    from dilated_attention.backends.triton import _row_dot

    a, b = (torch.randn(2, 37, 3, 16, dtype=torch.bfloat16) for _ in range(2))
    like = torch.empty(2, 37, 3)
    expected = (a.float() * b.float()).sum(-1)
    for budget in (1, 100, 1 << 26):  # one row per slice, a few slices, one pass
        torch.testing.assert_close(_row_dot(a, b, like, budget), expected, rtol=0, atol=0)


def test_causal_plans_choose_fused_or_per_branch_by_timing(monkeypatch):
    """A causal plan the fused kernels tile runs whichever of fused and per-branch ``pick`` found faster,
    once per kind of call and size bucket (n and b h to a power of two; packed documents that change
    from batch to batch share one); off CUDA, fused."""
    from dilated_attention.backends import triton as tk
    from dilated_attention.plan import build_plan

    plan = build_plan(4096, 4, [1024, 2048], [1, 2], "paper")
    ran = []
    runners = (lambda: ran.append("fused"), lambda: ran.append("branches"))
    q = torch.empty(2, 4096, 4, 64, device="meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tk.fused_causal("forward", plan, q, None, *runners) and ran == []  # off CUDA: untimed, fused
    keys = []

    def pick(key, candidates, launch):
        keys.append(key)
        for name in candidates:
            launch(name)
        return "branches"

    monkeypatch.setattr(tk.triton_fused, "pick", pick)
    assert not tk.fused_causal("forward", plan, q, None, *runners) and ran == ["fused", "branches"]
    tk.fused_causal("forward", plan, torch.empty(3, 4096, 4, 64, device="meta"), None, *runners)  # same bucket
    for bounds in ((0, 1024, 4096), (0, 2048, 3000, 4096)):  # other documents, same bucket
        tk.fused_causal("forward", build_plan(4096, 4, [1024, 2048], [1, 2], "paper", cu_seqlens=bounds), q, None,
                        *runners)
    tk.fused_causal("forward", plan, torch.empty(8, 4096, 4, 64, device="meta"), None, *runners)  # larger b
    tk.fused_causal("forward", build_plan(8192, 4, [1024, 2048], [1, 2], "paper"),
                    torch.empty(2, 8192, 4, 64, device="meta"), None, *runners)  # larger n
    tk.fused_causal("backward", plan, q, None, *runners)
    assert len(set(keys[:4])) == 1 and len(set(keys[3:])) == 4


def test_grid_keeps_segments_on_the_large_axis():
    """n / w' = 70,000 segments (w = 64 at n = 4.5M): CUDA caps grid axes 1 and 2 at 65,535 programs."""
    from dilated_attention.backends.triton import _branch_launch
    from dilated_attention.plan import PER_HEAD, Branch

    q = torch.empty(2, 4_480_000, 12, 64, device="meta")
    lse = torch.empty(2, 4_480_000, 12, device="meta")
    grid = _branch_launch(q, q, lse, None, q, Branch(64, 1, PER_HEAD, 0, 12)).grid(128)
    assert grid == (70_000, 12, 2)


def test_fused_launches_take_heavy_residues_first():
    """The fused kernels' launch order: residues (relative to the head) where more branches are active
    come first, so a launch ends on the lightest tiles; every residue exactly once."""
    from dilated_attention.backends.triton_fused import residue_order
    from dilated_attention.plan import build_plan

    order, heavy = residue_order(build_plan(1 << 17, 12, [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16],
                                            "paper"), 1 << 17)
    assert sorted(order) == list(range(16)) and heavy == 8
    assert set(order[:8]) == set(range(0, 16, 2))  # r = 1 and 2 at least; odd residues run r = 1 alone
    order, heavy = residue_order(build_plan(600, 4, [60, 120], [2, 3], "paper"), 600)
    assert order == [0, 2, 3, 4, 1, 5] and heavy == 4  # 1 and 5 run no branch
    assert residue_order(build_plan(600, 4, [60, 120], [1, 1], "paper"), 600) == ([0], 0)


def test_fused_backward_tiles_follow_the_plan():
    """The fused backward's configs: dQ on 128 rows over 8 warps for plain non-causal bf16 plans, on
    the plan's smaller tile with at most one warp per 16 rows where 128 rows do not tile it, and the
    64-row configs when causal or masked; None (branch by branch) where no tile fits."""
    from dilated_attention.backends.triton_fused import bwd_tiles
    from dilated_attention.plan import build_plan

    segs, rates = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16]
    long, short = build_plan(1 << 15, 12, segs, rates, "paper"), build_plan(1024, 12, segs, rates, "paper")
    bf16 = torch.bfloat16
    assert bwd_tiles(long, 1 << 15, 12, 64, bf16, False, False) == ((64, 64, 4, 3), (128, 32, 8, 3))
    assert bwd_tiles(short, 1024, 12, 64, bf16, False, False) == ((64, 64, 4, 3), (64, 32, 4, 3))
    assert bwd_tiles(long, 1 << 15, 12, 64, bf16, True, False) == ((64, 64, 4, 3), (64, 32, 4, 3))
    assert bwd_tiles(long, 1 << 15, 12, 64, bf16, False, True) == ((64, 64, 4, 3), (64, 64, 4, 3))
    ragged = build_plan(3000, 12, [1000, 3000], [1, 2], "paper")  # w = 1000 is no multiple of any tile's span
    assert bwd_tiles(ragged, 3000, 12, 64, bf16, False, False) is None


def test_fused_forward_picks_the_faster_candidate(monkeypatch):
    """``pick`` times the candidates in turn over rounds once per key and keeps the fastest by its best
    round (one slow round does not decide); it times nothing while a CUDA graph is captured (CUDA events
    stand in for a GPU here)."""
    from dilated_attention.backends import triton_fused

    clock = {"now": 0.0}
    cost = {"slow": 3.0, "fast": 1.0}

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = clock["now"]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.t - self.t

    launches = []

    def launch(cfg):
        if cfg == "too big":
            raise triton.runtime.errors.OutOfResources(300_000, 232_448, "shared memory")
        launches.append(cfg)
        slowed = cfg == "fast" and launches.count(cfg) in (2, 3)  # its first timed round runs 5x slower
        clock["now"] += cost[cfg] * (5 if slowed else 1)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert triton_fused.pick("test-key", ("slow", "fast"), launch) == "slow"  # capturing: the first, untimed
    assert clock["now"] == 0.0
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert triton_fused.pick("test-key", ("slow", "fast"), launch) == "fast"
    timed = clock["now"]
    assert launches == ["slow", "fast"] + ["slow", "slow", "fast", "fast"] * 3  # compile, then rounds in turn
    assert timed == 3.0 * 7 + 1.0 * (1 + 2 * 5 + 4)
    assert triton_fused.pick("test-key", ("slow", "fast"), launch) == "fast" and clock["now"] == timed  # cached
    assert triton_fused.pick("other-key", ("too big", "slow"), launch) == "slow"  # one that cannot run is passed over


def test_direct_launches_reuse_what_triton_compiled(monkeypatch):
    """``launch_kernel``: the first call of a key goes through ``kernel[grid]``; later ones hand every
    parameter (constexprs in signature order, defaults too) to the compiled kernel's launcher on the
    current stream. Another pointer alignment or scalar value, or a launch hook, goes through Triton;
    a launcher that refuses the arguments turns direct launches off, with a warning."""
    import inspect

    from dilated_attention.backends import triton_launch

    class Param:
        def __init__(self, name, constexpr, default=inspect.Parameter.empty):
            self.name, self.is_constexpr, self.default = name, constexpr, default

    class Compiled:
        function, packed_metadata = "function", "packed"

        def run(self, *args):
            calls.append(("direct", args))

    class Kernel:
        __name__ = "kernel"
        params = [Param("A", False), Param("B", False), Param("n", False), Param("x", False),
                  Param("IS_CAUSAL", True), Param("BLOCK", True), Param("EXTRA", True, 7)]

        def __getitem__(self, grid):
            def run(*args, **meta):
                calls.append(("triton", grid, args, meta))
                return Compiled()
            return run

    class Tensor:
        is_cuda = True

        def __init__(self, ptr, dtype=torch.bfloat16):
            self.ptr, self.dtype = ptr, dtype

        def data_ptr(self):
            return self.ptr

    calls = []
    monkeypatch.setattr(triton_launch, "_DIRECT", True)
    monkeypatch.setattr(triton_launch, "_COMPILED", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(triton_launch, "_raw_stream", lambda device: 1234)
    kernel, a, b = Kernel(), Tensor(4096), Tensor(8192)
    meta = dict(BLOCK=64, IS_CAUSAL=True, num_warps=4)
    for _ in range(2):
        triton_launch.launch_kernel(kernel, (3, 2), (a, b), (17, 0.5), **meta)
    assert calls == [("triton", (3, 2), (a, b, 17, 0.5), meta),  # pointers go direct as integers
                     ("direct", (3, 2, 1, 1234, "function", "packed", None, None, None, 4096, 8192, 17, 0.5, True, 64,
                                 7))]
    for changed in (dict(tensors=(a, Tensor(8200))), dict(tensors=(a, Tensor(8192, torch.float32))),
                    dict(scalars=(16, 0.5)), dict(meta=dict(meta, BLOCK=128))):
        calls.clear()
        args = dict(dict(tensors=(a, b), scalars=(17, 0.5), meta=meta), **changed)
        triton_launch.launch_kernel(kernel, (3,), args["tensors"], args["scalars"], **args["meta"])
        assert [c[0] for c in calls] == ["triton"], changed
    calls.clear()
    hooks = triton_launch.knobs.runtime.launch_enter_hook
    hooks.add(print)
    try:
        triton_launch.launch_kernel(kernel, (3, 2), (a, b), (17, 0.5), **meta)
    finally:
        hooks.remove(print)
    assert [c[0] for c in calls] == ["triton"]
    calls.clear()

    def refuse(self, *args):
        raise TypeError("function takes exactly 14 arguments")

    monkeypatch.setattr(Compiled, "run", refuse)
    triton_launch._COMPILED.clear()
    triton_launch.launch_kernel(kernel, (3, 2), (a, b), (17, 0.5), **meta)  # kept: a launcher that refuses
    calls.clear()
    with pytest.warns(RuntimeWarning, match="launch through kernel"):
        triton_launch.launch_kernel(kernel, (3, 2), (a, b), (17, 0.5), **meta)
    assert [c[0] for c in calls] == ["triton"] and not triton_launch._DIRECT
    monkeypatch.setattr(triton_launch, "_DIRECT", True)
    monkeypatch.setattr(Compiled, "run", lambda self, *args: calls.append(("direct", args)))
    triton_launch._COMPILED.clear()
    triton_launch.launch_kernel(kernel, (3, 2), (a, b), (17, 0.5), **meta)
    calls.clear()
    launch = triton_launch.Launch(kernel, (3, 2), (17, 0.5), meta)  # one prepared launch keeps its own entries
    for tensors in ((a, b), (Tensor(512), Tensor(1024)), (a, Tensor(8200)), (a, Tensor(8200))):
        launch(tensors)
    assert [c[0] for c in calls] == ["direct", "direct", "triton", "direct"]  # the first from launch_kernel's cache
    assert calls[1][1][9:11] == (512, 1024) and calls[3][1][9:11] == (4096, 8200)
    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(triton_launch, "launch_kernel", lambda *args, **meta: calls.append(("launch_kernel",)))
        launch((Tensor(64), Tensor(128)))
    assert [c[0] for c in calls] == ["direct"]  # not through launch_kernel: no key built, no lookup
    calls.clear()
    hooks.add(print)
    try:
        launch((Tensor(64), Tensor(128)))
    finally:
        hooks.remove(print)
    assert [c[0] for c in calls] == ["triton"]  # a profiler's hook sees every launch
    calls.clear()
    Kernel.params = Kernel.params[:2] + [Param("BLOCK", True), Param("n", False)]
    with pytest.raises(TypeError, match="must be constexprs"):
        triton_launch.launch_kernel(kernel, (1,), (a, b), (), BLOCK=64)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="tensor descriptors (TMA) need sm_90")
def test_tma_loads_where_they_pay_and_fit():
    """Descriptor loads on long 16-bit calls with aligned keys; pointer loads for float32, short calls
    and keys whose rows or first row are not 16-byte aligned (these give an aligned copy's results)."""
    from dilated_attention import dilated_attention
    from dilated_attention.backends import triton_fused

    n = triton_fused.TMA_MIN_ROWS
    k = torch.randn(1, n, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert triton_fused.tma_loads(k, k)
    segments = k.view(1, 4, n // 4, 2, 64)  # the per-branch launches' (batch, segment, row, head, dim) views
    assert triton_fused.tma_loads(segments, segments)
    assert not triton_fused.tma_loads(k.float(), k.float())
    assert not triton_fused.tma_loads(k[:, : n // 2], k[:, : n // 2])
    rows = torch.randn(1, n, 2, 65, device="cuda", dtype=torch.bfloat16)[..., 1:]  # rows 130 bytes apart
    assert not triton_fused.tma_loads(rows, rows)
    odd = torch.randn(k.numel() + 1, device="cuda", dtype=torch.bfloat16)[1:].view(k.shape)  # contiguous, 2 bytes off
    assert odd.is_contiguous() and not triton_fused.tma_loads(odd, odd)
    q = torch.randn(1, n, 2, 64, device="cuda", dtype=torch.bfloat16)
    segs, rates = [2048, 8192], [1, 4]
    for causal in (False, True):
        out = dilated_attention(q, odd, odd, segs, rates, is_causal=causal)
        assert torch.equal(out, dilated_attention(q, odd.contiguous(), odd.contiguous(), segs, rates, is_causal=causal))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="tensor descriptors (TMA) need sm_90")
def test_tma_loads_give_the_pointer_loads_results(monkeypatch):
    """On the GPU, out, dq, dk, dv with keys and values through tensor descriptors equal the pointer
    loads' bit for bit: fused and per-branch (head_groups, key mask) plans, GQA, causal or not."""
    from dilated_attention import dilated_attention
    from dilated_attention.backends import triton_fused

    n, rule = triton_fused.TMA_MIN_ROWS, triton_fused.tma_loads
    q, do = (torch.randn(1, n, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(1, n, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    assert rule(k, v)
    mask = torch.rand(1, n, device="cuda") < 0.1
    segs, rates = [2048, 4096, 8192], [1, 2, 4]
    for mode, key_mask in (("paper", None), ("head_groups", None), ("paper", mask)):
        for causal in (False, True):
            results = []
            for loads in (rule, lambda k, v: False):
                monkeypatch.setattr(triton_fused, "tma_loads", loads)
                ins = [t.clone().requires_grad_() for t in (q, k, v)]
                out = dilated_attention(*ins, segs, rates, is_causal=causal, mode=mode, key_padding_mask=key_mask)
                results.append((out, *torch.autograd.grad(out, ins, do)))
            assert all(torch.equal(a, b) for a, b in zip(*results)), (mode, key_mask is not None, causal)


def test_per_branch_launches_are_prepared_once_per_call_geometry(monkeypatch):
    """The per-branch path builds its launches (grids, scalars, configs) once per call geometry and replays
    them: a second call launches the same kernels with the same arguments on its own tensors, and q, k, v
    cut from longer tensors (other strides) get launches of their own. Backward with GQA: per branch a dQ
    launch, then one dK/dV launch per query head of a k/v head."""
    from dilated_attention.backends import triton as tk, triton_launch
    from dilated_attention.plan import build_plan

    monkeypatch.setattr(triton_launch, "_PREPARED", {})
    launches, builds = [], {"forward": 0, "backward": 0}
    monkeypatch.setattr(triton_launch, "launch_kernel", lambda kernel, grid, tensors, scalars, **meta: launches.append(
        (kernel.fn.__name__, grid, scalars, tuple(sorted(meta.items())), tensors[0].shape)))
    for name, steps in (("forward", tk._forward_steps), ("backward", tk._backward_steps)):
        monkeypatch.setattr(tk, f"_{name}_steps", lambda *a, name=name, steps=steps: builds.__setitem__(
            name, builds[name] + 1) or steps(*a))
    b, n, h, h_kv, d = 2, 64, 6, 3, 16
    plan = build_plan(n, h, [16, 32], [1, 2], "paper", kv_heads=h_kv)

    def run(rows):  # the plan's forward and backward on the first n of `rows` rows
        q, dq = (torch.empty(b, rows, h, d, device="meta")[:, :n] for _ in range(2))
        k, v, dk, dv = (torch.empty(b, rows, h_kv, d, device="meta")[:, :n] for _ in range(4))
        out, dout = torch.empty_like(q), torch.empty_like(q)
        lse = torch.empty(b, n, h, device="meta")
        tk.Triton()._branch_forwards(out, lse, q, k, v, plan, 0.25, True, None, 1.0, fresh=True)
        tk.Triton()._branch_backwards(dq, dk, dv, dout, q, k, v, out, lse, plan, 0.25, True, 1.0, None, fresh=True)
        calls = launches[:]
        launches.clear()
        return calls

    first = run(n)
    assert run(n) == first and builds == {"forward": 1, "backward": 1}
    assert [name for name, *_ in first] == ["_fwd"] * 2 + ["_bwd_dq", "_bwd_dkdv", "_bwd_dkdv"] * 2
    longer = run(2 * n)  # batch strides double
    assert builds == {"forward": 2, "backward": 2} and len(longer) == len(first) and longer != first


def test_per_branch_launches_chain_where_the_gpu_can(monkeypatch):
    """On sm_90 a call's launches after its first may start while the one before runs (programmatic
    dependent launch): every launch of the call is a CHAIN kernel, the first launched stream-ordered (it
    waits for what made its inputs), the rest with launch_pdl. Side-stream launches (head_groups' own
    heads) and GPUs without it do not chain."""
    from dilated_attention.backends import triton as tk, triton_launch
    from dilated_attention.plan import build_plan

    assert not tk._chains(torch.randn(2, 3))  # CPU tensors (the interpreter) launch one after another
    launches = []
    monkeypatch.setattr(triton_launch, "launch_kernel", lambda kernel, grid, tensors, scalars, **meta: launches.append(
        (kernel.fn.__name__, meta.get("CHAIN", False), meta.get("launch_pdl", False))))
    b, n, h, d = 1, 64, 4, 16
    q, k, v, out, dout, dq, dk, dv = (torch.empty(b, n, h, d, device="meta") for _ in range(8))
    lse = torch.empty(b, n, h, device="meta")
    plan = build_plan(n, h, [16, 32], [1, 2], "paper")
    for gpu_can in (True, False):
        monkeypatch.setattr(triton_launch, "_PREPARED", {})
        monkeypatch.setattr(tk, "_chains", lambda q, gpu_can=gpu_can: gpu_can)
        tk.Triton()._branch_forwards(out, lse, q, k, v, plan, 0.25, True, None, 1.0, fresh=True)
        tk.Triton()._branch_backwards(dq, dk, dv, dout, q, k, v, out, lse, plan, 0.25, True, 1.0, None, fresh=True)
        fwd, bwd = launches[:2], launches[2:]
        assert [name for name, *_ in fwd] == ["_fwd"] * 2 and len(bwd) == 4
        for calls in (fwd, bwd):
            assert calls == [(name, gpu_can, gpu_can and i > 0) for i, (name, *_) in enumerate(calls)]
        launches.clear()
    monkeypatch.setattr(tk, "_chains", lambda q: True)
    monkeypatch.setattr(triton_launch, "_PREPARED", {})
    head_groups = build_plan(n, h, [16, 32], [1, 2], "head_groups")
    tk.Triton()._branch_forwards(out, lse, q, k, v, head_groups, 0.25, False, None, 1.0, fresh=True, other_rows=True)
    assert launches and not any(chain or pdl for _, chain, pdl in launches)


def test_fused_backward_chains_dq_after_dkdv_where_the_gpu_can(monkeypatch):
    """The fused backward's dQ launch reads nothing its dK/dV launch writes: on sm_90 it starts while dK/dV
    runs (both CHAIN kernels, dQ with launch_pdl) and each chain state is prepared apart; elsewhere both
    launch stream-ordered, with no chain constexpr."""
    from dilated_attention.backends import triton as tk, triton_fused as tf, triton_launch
    from dilated_attention.plan import build_plan

    launches = []
    monkeypatch.setattr(triton_launch, "launch_kernel", lambda kernel, grid, tensors, scalars, **meta: launches.append(
        (kernel.fn.__name__, meta.get("CHAIN"), meta.get("launch_pdl"))))
    monkeypatch.setattr(triton_launch, "_PREPARED", {})
    n, h, d = 256, 4, 16
    plan = build_plan(n, h, [64, 128], [1, 2], "paper")
    configs = tf.bwd_tiles(plan, n, h, d, torch.float16, False, False)
    q, k, v, dout = (torch.empty(1, n, h, d, device="meta", dtype=torch.float16) for _ in range(4))
    lse = torch.empty(1, n, h, device="meta")
    for chain in (True, False):
        tf.backward(dout, q, k, v, lse, lse, plan, 0.25, False, None, configs, chain)
    assert launches == [("_fused_dkdv", True, False), ("_fused_dq", True, True),
                        ("_fused_dkdv", None, None), ("_fused_dq", None, None)]
    seen = []
    monkeypatch.setattr(tf, "backward", lambda *args: seen.append(args[-1]) or (q, k, v))
    monkeypatch.setattr(tk, "_chains", lambda q: "chain flag")
    monkeypatch.setattr(tk, "_row_dot", lambda dout, out, lse: lse)
    tk.Triton().backward_plan(dout, q, k, v, q, lse, plan, 0.25, False, 1.0)
    assert seen == ["chain flag"]  # backward_plan hands ``_chains(q)`` to the fused backward


def test_causal_union_plans_run_their_first_branch_apart(monkeypatch):
    """A causal union plan runs the fused kernels from branch 1, then its first branch's per-branch launches,
    weighted per pair, merging into (adding into) what those wrote; where the first branch covers every
    document only its launches run, storing. Non-causal union plans stay one fused launch per pass."""
    from dilated_attention.backends import triton as tk, triton_fused as tf, triton_launch
    from dilated_attention.plan import build_plan

    launches = []
    monkeypatch.setattr(triton_launch, "launch_kernel", lambda kernel, grid, tensors, scalars, **meta: launches.append(
        (kernel.fn.__name__, meta.get("FROM_BRANCH", meta.get("FIRST")), meta.get("WEIGHTED", meta.get("UNION")))))
    monkeypatch.setattr(triton_launch, "_PREPARED", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # configs untimed (``pick``) on a GPU host too
    h, d, segs, rates = 4, 16, [256, 512, 1024], [1, 2, 4]
    for n, causal, forward, backward in (
            (1024, True, [("_fused_fwd", 1, True), ("_fwd", False, 2)],
             [("_fused_dkdv", 1, True), ("_fused_dq", 1, True), ("_bwd_dkdv", False, 2), ("_bwd_dq", False, 2)]),
            (256, True, [("_fwd", True, 2)], [("_bwd_dkdv", True, 2), ("_bwd_dq", True, 2)]),
            (1024, False, [("_fused_fwd", 0, True)], [("_fused_dkdv", 0, True), ("_fused_dq", 0, True)])):
        plan = build_plan(n, h, segs, rates, "paper")
        assert tf.union(plan, n) and tf.first_apart(plan, n)[1] == (n > segs[0])
        q, k, v, dout = (torch.empty(1, n, h, d, device="meta", dtype=torch.float16) for _ in range(4))
        out, lse = tk.Triton().forward_plan(q, k, v, plan, 0.25, causal, 1.0)
        assert launches == forward
        launches.clear()
        tk.Triton().backward_plan(dout, q, k, v, out, lse, plan, 0.25, causal, 1.0)
        assert launches == backward
        launches.clear()


def test_causal_union_plans_chain_the_first_branch_after_the_fused_launches(monkeypatch):
    """On sm_90 the first branch's launches of a causal union plan start while the fused launches before them
    run (programmatic dependent launch): the fused forward and dQ signal their dependents (CHAIN), and the first
    branch's launches all take launch_pdl (each merges or adds only after the one before has finished). Where
    the first branch covers every document it is the call's first launch (stream-ordered); where launches do
    not chain, none signals or waits."""
    from dilated_attention.backends import triton as tk, triton_launch
    from dilated_attention.plan import build_plan

    launches = []
    monkeypatch.setattr(triton_launch, "launch_kernel", lambda kernel, grid, tensors, scalars, **meta: launches.append(
        (kernel.fn.__name__, bool(meta.get("CHAIN")), bool(meta.get("launch_pdl")))))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # configs untimed (``pick``) on a GPU host too
    h, d, segs, rates = 4, 16, [256, 512, 1024], [1, 2, 4]
    for gpu_can in (True, False):
        monkeypatch.setattr(tk, "_chains", lambda q, gpu_can=gpu_can: gpu_can)
        monkeypatch.setattr(triton_launch, "_PREPARED", {})
        for n, forward, backward in (
                (1024, [("_fused_fwd", True, False), ("_fwd", True, True)],
                 [("_fused_dkdv", True, False), ("_fused_dq", True, True), ("_bwd_dkdv", True, True),
                  ("_bwd_dq", True, True)]),
                (256, [("_fwd", True, False)], [("_bwd_dkdv", True, False), ("_bwd_dq", True, True)])):
            plan = build_plan(n, h, segs, rates, "paper")
            q, k, v, dout = (torch.empty(1, n, h, d, device="meta", dtype=torch.float16) for _ in range(4))
            out, lse = tk.Triton().forward_plan(q, k, v, plan, 0.25, True, 1.0)
            tk.Triton().backward_plan(dout, q, k, v, out, lse, plan, 0.25, True, 1.0)
            assert launches == [(name, chain and gpu_can, pdl and gpu_can) for name, chain, pdl in forward + backward]
            launches.clear()


def test_fused_launches_are_prepared_once_per_call_geometry(monkeypatch):
    """The fused kernels' launches (grid, tables, scalars, the picked config) are made once per call geometry:
    a second call of the same geometry launches the same arguments on its own tensors without building
    them again; another batch size (strides, grid) builds its own."""
    from dilated_attention.backends import triton_fused as tf, triton_launch
    from dilated_attention.plan import build_plan

    launches, builds = [], []
    monkeypatch.setattr(triton_launch, "launch_kernel", lambda kernel, grid, tensors, scalars, **meta: launches.append(
        (kernel.fn.__name__, grid, scalars, tuple(sorted(meta.items())))))
    real = triton_launch.prepared
    monkeypatch.setattr(tf, "prepared", lambda key, build: real(key, lambda: builds.append(key[0]) or build()))
    monkeypatch.setattr(triton_launch, "_PREPARED", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # configs untimed (``pick``) on a GPU host too
    n, h, d = 256, 4, 16
    plan = build_plan(n, h, [64, 128], [1, 2], "paper")
    block = tf.fwd_tile(plan, n, h, d, torch.float16)
    configs = tf.bwd_tiles(plan, n, h, d, torch.float16, False, False)

    def run(b):
        q, k, v, dout = (torch.empty(b, n, h, d, device="meta", dtype=torch.float16) for _ in range(4))
        lse = torch.empty(b, n, h, device="meta")
        tf.forward(q, k, v, plan, 0.25, False, None, block)
        tf.backward(dout, q, k, v, lse, lse, plan, 0.25, False, None, configs)
        calls = launches[:]
        launches.clear()
        return calls

    first = run(2)
    assert [name for name, *_ in first] == ["_fused_fwd", "_fused_dkdv", "_fused_dq"]
    assert run(2) == first and builds == ["fused forward", "fused backward"]
    other = run(3)
    assert len(builds) == 4 and [c[1][2] for c in other] == [3, 3, 3] and other != first
