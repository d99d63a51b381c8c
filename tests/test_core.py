"""dilated_attention against the float64 reference: outputs and dq, dk, dv."""

import math

import pytest
import torch

from conftest import rand, rel_err
from reference import reference, torch_low_precision

from dilated_attention import dilated_attention
from dilated_attention.backends import triton

# (b, n, h, d, segment_lengths, dilation_rates)
CASES = [
    pytest.param(2, 37, 5, 8, [8, 16, 40], [1, 3, 4], id="odd-n-ragged-w%r-w>n"),
    pytest.param(1, 64, 6, 16, [16, 32, 64], [1, 2, 4], id="divisible"),
    pytest.param(3, 50, 3, 8, [7, 20], [2, 5], id="no-r1-unlinked-rows"),
    pytest.param(1, 1, 2, 8, [4], [2], id="n=1"),
    pytest.param(2, 29, 4, 8, [6, 12, 24], [6, 12, 5], id="r>h-r>=w"),
    pytest.param(2, 37, 4, 8, [8, 40, 80], [1, 2, 2], id="repeated-rate-two-w>=n"),
    pytest.param(1, 40, 3, 8, [64, 128, 16, 16], [1, 1, 2, 2], id="duplicated-branches"),
]
MODES = ["paper", "head_groups"]
BACKENDS = ["math", "sdpa"]


def _run(b, n, h, d, segs, rates, causal, mode, backend, dtype=torch.float64, device="cpu", scale=None):
    q, k, v = (rand((b, n, h, d), dtype, device) for _ in range(3))
    out = dilated_attention(q, k, v, segs, rates, is_causal=causal, mode=mode, backend=backend, scale=scale)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return (q, k, v, dout), out, grads


def _reference(inputs, segs, rates, causal, mode, scale=None):
    q, k, v, dout = (t.detach().double().cpu().requires_grad_() for t in inputs)
    out = reference(q, k, v, segs, rates, causal, scale, mode)
    return out, torch.autograd.grad(out, (q, k, v), dout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("b,n,h,d,segs,rates", CASES)
def test_float64_matches_reference(b, n, h, d, segs, rates, causal, mode, backend):
    if mode == "head_groups" and h < len(segs):
        pytest.skip("head_groups needs a head per branch")
    inputs, out, grads = _run(b, n, h, d, segs, rates, causal, mode, backend)
    ref_out, ref_grads = _reference(inputs, segs, rates, causal, mode)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for name, g, rg in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-9, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_scale_is_honoured(mode, backend):
    segs, rates = [8, 16], [1, 2]
    inputs, out, grads = _run(1, 24, 4, 8, segs, rates, True, mode, backend, scale=0.77)
    ref_out, ref_grads = _reference(inputs, segs, rates, True, mode, scale=0.77)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-9, atol=1e-9)


def _low_precision_errors(dtype, device, backend, causal, mode, case=(2, 77, 6, 32, [16, 32, 64], [1, 3, 4])):
    b, n, h, d, segs, rates = case
    inputs, out, grads = _run(b, n, h, d, segs, rates, causal, mode, backend, dtype, device)
    ref_out, ref_grads = _reference(inputs, segs, rates, causal, mode)
    q, k, v, dout = (t.detach().requires_grad_() for t in inputs)
    torch_out = torch_low_precision(q, k, v, segs, rates, causal, None, mode)
    torch_grads = torch.autograd.grad(torch_out, (q, k, v), dout)
    ours = [rel_err(out, ref_out)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
    theirs = [rel_err(torch_out, ref_out)] + [rel_err(g, r) for g, r in zip(torch_grads, ref_grads)]
    return ours, theirs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_low_precision_within_twice_torch_math(dtype, backend, mode, causal, device):
    if backend == "triton" and not (device == "cuda" and triton.available()):
        pytest.skip("the Triton kernels take CUDA tensors (CPU: test_triton.py runs them interpreted)")
    ours, theirs = _low_precision_errors(dtype, device, backend, causal, mode)
    # rounding-noise floor: 3 eps for float32, ~10% of the typical error for the 16-bit types
    floor = {torch.float32: 3.6e-7, torch.bfloat16: 2e-4, torch.float16: 2e-5}[dtype]
    for name, a, t in zip(["out", "dq", "dk", "dv"], ours, theirs):
        assert a <= 2 * t + floor, f"{name}: error {a:.3g} vs torch math {t:.3g} in {dtype}"


@pytest.mark.skipif(not torch.cuda.is_available() or not triton.available(), reason="the Triton kernels on CUDA")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("segs,rates", [([8, 40, 80], [1, 2, 2]), ([2048, 4096], [1, 1]), ([16, 16, 64], [2, 2, 1])])
def test_triton_counts_every_branch_on_gpu(segs, rates, causal, mode):
    """Repeated rates, duplicated branches, several w >= n (the plan must not fold equal branches)."""
    ours, theirs = _low_precision_errors(torch.bfloat16, "cuda", "triton", causal, mode, (2, 37, 6, 32, segs, rates))
    for name, a, t in zip(["out", "dq", "dk", "dv"], ours, theirs):
        assert a <= 2 * t + 2e-4, f"{name}: error {a:.3g} vs torch math {t:.3g}"


@pytest.mark.skipif(not torch.cuda.is_available() or not triton.available(), reason="the Triton kernels on CUDA")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_triton_head_dim_128_on_gpu(causal, mode):
    """The per-branch kernels' d = 128 configs (a ragged last segment, w % r != 0)."""
    ours, theirs = _low_precision_errors(torch.bfloat16, "cuda", "triton", causal, mode,
                                         (2, 300, 4, 128, [50, 128, 256], [1, 3, 4]))
    for name, a, t in zip(["out", "dq", "dk", "dv"], ours, theirs):
        assert a <= 2 * t + 2e-4, f"{name}: error {a:.3g} vs torch math {t:.3g}"


@pytest.mark.skipif(not torch.cuda.is_available() or not triton.available(), reason="the Triton kernels on CUDA")
def test_triton_runs_more_segments_than_a_grid_axis_holds():
    """n / w' = 70,000 segments: beyond the 65,535 programs of a CUDA grid's second axis (Triton, and the
    SDPA backend's flash and memory-efficient kernels), each within 2x of SDPA-flash bf16's error."""
    n, segs, rates = 2 * 70_000, [2, 4], [1, 2]
    q, k, v, dout = (rand((1, n, 2, 16), torch.float32, "cuda", grad=False) for _ in range(4))

    def run(dtype, backend):
        ins = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = dilated_attention(*ins, segs, rates, backend=backend)
        return [out, *torch.autograd.grad(out, ins, dout.to(dtype))]

    expected = run(torch.float64, "math")
    fp32 = run(torch.float32, "sdpa")  # memory-efficient kernel
    flash, ours = run(torch.bfloat16, "sdpa"), run(torch.bfloat16, "triton")
    for name, a, f, t, e in zip(["out", "dq", "dk", "dv"], ours, flash, fp32, expected):
        assert rel_err(t, e) < 1e-5, f"{name}: sdpa fp32 error {rel_err(t, e):.2e}"
        assert rel_err(a, e) <= 2 * rel_err(f, e) + 2e-4, f"{name}: {rel_err(a, e):.2e} vs flash {rel_err(f, e):.2e}"


def test_output_dtype_and_device_follow_q(device):
    q, k, v = (rand((1, 20, 2, 8), torch.bfloat16, device, grad=False) for _ in range(3))
    out = dilated_attention(q, k, v, [8], [2])
    assert out.dtype == torch.bfloat16 and out.device == q.device and out.shape == q.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_calls_without_gradients_skip_autograd_and_agree(backend, device):
    """Inputs that need no gradient (or grad mode off) take the forward alone: no autograd node, the
    same output as a call that records one."""
    q, k, v = (rand((2, 37, 4, 8), torch.float32, device, grad=False) for _ in range(3))
    args = ([8, 16, 40], [1, 2, 4])
    recorded = dilated_attention(*(t.clone().requires_grad_() for t in (q, k, v)), *args, mode="head_groups",
                                 backend=backend)
    assert recorded.grad_fn is not None
    with torch.no_grad():
        no_grad_mode = dilated_attention(*(t.clone().requires_grad_() for t in (q, k, v)), *args, mode="head_groups",
                                         backend=backend)
    plain = dilated_attention(q, k, v, *args, mode="head_groups", backend=backend)
    for out in (no_grad_mode, plain):
        assert out.grad_fn is None and not out.requires_grad
        torch.testing.assert_close(out, recorded.detach(), rtol=0, atol=0)


def test_gradcheck_float64():
    q, k, v = (rand((1, 11, 3, 4)) for _ in range(3))
    for mode in MODES:
        for causal in (False, True):
            assert torch.autograd.gradcheck(
                lambda q, k, v: dilated_attention(q, k, v, [4, 8], [1, 3], is_causal=causal, mode=mode),
                (q, k, v),
            )


def test_backends_agree_on_a_longer_sequence():
    b, n, h, d, segs, rates = 1, 1000, 4, 16, [128, 256, 512], [1, 3, 8]
    q, k, v = (rand((b, n, h, d), torch.float32, grad=False) for _ in range(3))
    a = dilated_attention(q, k, v, segs, rates, backend="math", is_causal=True)
    c = dilated_attention(q, k, v, segs, rates, backend="sdpa", is_causal=True)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_math_backend_chunks_exactly(monkeypatch):
    """Force tiny score chunks (segment and query-row chunking) and compare with the reference."""
    from dilated_attention.backends import math

    monkeypatch.setattr(math, "SCORE_BUDGET", 50)
    segs, rates = [16, 40], [1, 2]
    for causal in (False, True):
        inputs, out, grads = _run(2, 40, 3, 8, segs, rates, causal, "paper", "math")
        ref_out, ref_grads = _reference(inputs, segs, rates, causal, "paper")
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-9)


def test_torch_compile_smoke():
    q, k, v = (rand((1, 33, 4, 8), torch.float32) for _ in range(3))

    def f(q, k, v):
        return dilated_attention(q, k, v, [8, 16], [1, 2], is_causal=True) * 2.0

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v)
    torch.testing.assert_close(out, f(q, k, v))
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    (dq_eager,) = torch.autograd.grad(f(q, k, v).sum(), (q,))
    torch.testing.assert_close(dq, dq_eager)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e4, 1e7])
def test_merge_weights_sum_to_one_at_large_lse(scale, backend, device):
    """A duplicated branch is the same softmax as the branch alone, however large the log-sum-exps."""
    q, k, v = (rand((2, 40, 4, 8), torch.float32, device, grad=False) for _ in range(3))
    once = dilated_attention(q, k, v, [16], [2], scale=scale, backend=backend)
    twice = dilated_attention(q, k, v, [16, 16], [2, 2], scale=scale, backend=backend)
    torch.testing.assert_close(twice, once, rtol=1e-5, atol=1e-5)


def _nan_cases():
    import random

    rng = random.Random(7)
    cases = [(1, 12, 1, 16, [21, 1, 132], [7, 1, 8]), (1, 17, 5, 4, [87], [8]), (2, 64, 3, 16, [16, 32], [1, 2])]
    for _ in range(6):
        n, m = rng.randint(1, 80), rng.randint(1, 3)
        segs = [rng.randint(1, 90) for _ in range(m)]
        cases.append((rng.randint(1, 2), n, rng.randint(1, 4), rng.choice([4, 8, 16]), segs,
                      [rng.randint(1, min(8, w)) for w in segs]))
    return cases


def _check_nan_rows(backend, dtype, device, head_dim=None, cases=None):
    """NaN in q row i: out row i is NaN (if linked at all); NaN in key t (k, or v without causal masking):
    the rows linked to t. (Causal: a NaN in v also reaches rows of the same tile that mask it, as 0 * NaN.)"""
    from reference import link_counts

    for case_id, (b, n, h, d, segs, rates) in enumerate(cases or _nan_cases()):
        d = head_dim or d
        for causal in (False, True):
            for name in "qkv" if not causal else "qk":
                g = torch.Generator().manual_seed(case_id)
                q, k, v = (torch.randn(b, n, h, d, generator=g).to(device, dtype) for _ in range(3))
                pos, head = case_id * 7 % n, case_id % h
                {"q": q, "k": k, "v": v}[name][0, pos, head, d // 2] = float("nan")
                out = dilated_attention(q, k, v, segs, rates, is_causal=causal, backend=backend)
                expected = torch.zeros(b, n, h, dtype=torch.bool)
                links = link_counts(n, h, segs, rates, causal, "paper")[head] > 0  # (query, key)
                if name == "q":
                    expected[0, pos, head] = links[pos].any()  # a row linked to no key stays 0
                else:
                    expected[0, :, head] = links[:, pos]
                assert torch.equal(out.isnan().any(-1).cpu(), expected), (name, causal, b, n, h, d, segs, rates)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_nan_reaches_exactly_the_rows_that_see_it(dtype, backend):
    _check_nan_rows(backend, dtype, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend,dtype", [("triton", torch.bfloat16), ("sdpa", torch.bfloat16),
                                           ("sdpa", torch.float32), ("math", torch.float32)], ids=str)
def test_nan_reaches_exactly_the_rows_that_see_it_on_gpu(backend, dtype):
    if backend == "triton" and not triton.available():
        pytest.skip("needs Triton")
    _check_nan_rows(backend, dtype, "cuda", head_dim=16)


@pytest.mark.parametrize("how", ["function", "temporary-module", "own-cache-module"])
def test_backward_outlives_the_pattern_cache(how):
    """Autograd keeps the plan itself: backward works after the cache the forward used is gone."""
    import gc

    from dilated_attention import DilatedAttention, PatternCache

    segs, rates = [8, 16], [1, 2]
    q, k, v = (rand((1, 30, 4, 8)) for _ in range(3))
    if how == "function":
        out = dilated_attention(q, k, v, segs, rates, pattern_cache=PatternCache())
    elif how == "temporary-module":
        out = DilatedAttention(segs, rates, use_pattern_cache=False)(q, k, v)
    else:
        module = DilatedAttention(segs, rates, use_pattern_cache=False)
        out = module(q, k, v)
        del module
    gc.collect()
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_out, ref_grads = _reference((q, k, v, dout), segs, rates, False, "paper")
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_a_slice_of_heads_is_that_slice_of_the_result(causal, mode, backend):
    """head_start / total_heads: head parallelism computes exactly its heads of the whole-head result."""
    b, n, h, d, segs, rates = 2, 37, 7, 8, [8, 16, 40], [1, 3, 4]
    inputs, out, grads = _run(b, n, h, d, segs, rates, causal, mode, backend)
    q, k, v, dout = (t.detach() for t in inputs)
    for start, stop in ((0, 3), (3, 7), (2, 3), (5, 7)):
        part = [t[:, :, start:stop].clone().requires_grad_() for t in (q, k, v)]
        got = dilated_attention(*part, segs, rates, is_causal=causal, mode=mode, backend=backend,
                                head_start=start, total_heads=h)
        torch.testing.assert_close(got, out[:, :, start:stop], rtol=1e-12, atol=1e-12)
        for g, full in zip(torch.autograd.grad(got, part, dout[:, :, start:stop]), grads):
            torch.testing.assert_close(g, full[:, :, start:stop], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("h_kv", [1, 2, 3])
def test_gqa_matches_reference_on_repeated_heads(h_kv, causal, mode, backend):
    """k, v with h_kv heads: query head j reads k/v head j // (h / h_kv); dk, dv sum over the heads sharing them."""
    b, n, h, d, segs, rates = 2, 37, 6, 8, [8, 16, 40], [1, 3, 4]
    q, dout = rand((b, n, h, d)), rand((b, n, h, d), grad=False)
    k, v = rand((b, n, h_kv, d)), rand((b, n, h_kv, d))
    out = dilated_attention(q, k, v, segs, rates, is_causal=causal, mode=mode, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    g = h // h_kv
    ref = reference(q, k.repeat_interleave(g, 2), v.repeat_interleave(g, 2), segs, rates, causal, None, mode)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for name, a, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9, msg=lambda m: f"d{name}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available() or not triton.available(), reason="the Triton kernels on CUDA")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_on_triton_within_twice_torch_math(causal, mode):
    b, n, h, h_kv, d, segs, rates = 2, 77, 6, 2, 32, [16, 32, 64], [1, 3, 4]
    q64, dout = rand((b, n, h, d), grad=False), rand((b, n, h, d), grad=False)
    k64, v64 = rand((b, n, h_kv, d), grad=False), rand((b, n, h_kv, d), grad=False)
    full = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    ref = reference(full[0], *(t.repeat_interleave(h // h_kv, 2) for t in full[1:]), segs, rates, causal, None, mode)
    ref_grads = torch.autograd.grad(ref, full, dout)
    errors = []
    for run in ("ours", "torch"):
        ins = [t.to("cuda", torch.bfloat16).requires_grad_() for t in (q64, k64, v64)]
        if run == "ours":
            out = dilated_attention(*ins, segs, rates, is_causal=causal, mode=mode, backend="triton")
        else:
            out = torch_low_precision(ins[0], *(t.repeat_interleave(h // h_kv, 2) for t in ins[1:]), segs, rates,
                                      causal, None, mode)
        grads = torch.autograd.grad(out, ins, dout.to("cuda", torch.bfloat16))
        errors.append([rel_err(a, r) for a, r in zip((out, *grads), (ref, *ref_grads))])
    for name, ours, theirs in zip(["out", "dq", "dk", "dv"], *errors):
        assert ours <= 2 * theirs + 2e-4, f"{name}: {ours:.3g} vs torch {theirs:.3g}"


@pytest.mark.skipif(not torch.cuda.is_available() or not triton.available(), reason="the Triton kernels on CUDA")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("h_kv,masked,bounds", [(4, False, None), (2, True, None), (2, False, (0, 1024, 3072, 4396))])
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 64), (torch.float32, 64), (torch.bfloat16, 128)],
                         ids=["bf16", "fp32", "bf16-d128"])
@pytest.mark.parametrize("segs,rates,union", [([512, 1024, 2048], [1, 2, 4], True),
                                              ([1024, 2048, 512], [2, 4, 1], False)], ids=["weighted", "per-branch"])
def test_fused_kernels_within_twice_torch_math(segs, rates, union, dtype, d, h_kv, masked, bounds, causal,
                                               monkeypatch):
    """The fused all-branch kernels at their full tile size (a ragged last segment, GQA, a key mask,
    packed documents), bf16 and float32 (3xTF32 dots), each pair once, weighted (``triton_fused.union``),
    or once per branch; causal weighted plans with their first branch apart (weighted per pair, the rest
    fused), causal per-branch ones made to take them whichever path timed faster."""
    from dilated_attention.backends import triton as triton_backend
    from dilated_attention.backends import triton_fused
    from dilated_attention.plan import build_plan

    monkeypatch.setattr(triton_backend, "fused_causal", lambda *args: True)
    b, n, h = 1, 4396, 4
    plan = build_plan(n, h, segs, rates, "paper", kv_heads=h_kv, cu_seqlens=bounds)
    assert triton_fused.union(plan, n) == union
    assert triton_fused.fwd_tile(plan, n, h, d, dtype) == 128
    assert triton_fused.bwd_tiles(plan, n, h, d, dtype, causal, masked)
    g = torch.Generator().manual_seed(h_kv)
    q, dout = (torch.randn(b, n, h, d, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(b, n, h_kv, d, generator=g, dtype=torch.float64) for _ in range(2))
    mask = (torch.rand(b, n, generator=g) < 0.2).cuda() if masked else None
    results = {}
    for name, run_dtype, backend in (("ref", torch.float64, "math"), ("ours", dtype, "triton"),
                                     ("torch", dtype, "math")):
        ins = [t.to("cuda", run_dtype).requires_grad_() for t in (q, k, v)]
        docs = None if bounds is None else torch.tensor(bounds, dtype=torch.int32, device="cuda")
        out = dilated_attention(*ins, segs, rates, is_causal=causal, backend=backend, key_padding_mask=mask,
                                cu_seqlens=docs)
        results[name] = [out, *torch.autograd.grad(out, ins, dout.to("cuda", run_dtype))]
    floor = {torch.float32: 3.6e-7, torch.bfloat16: 2e-4}[dtype]
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        ours, theirs = rel_err(results["ours"][i], results["ref"][i]), rel_err(results["torch"][i], results["ref"][i])
        assert ours <= 2 * theirs + floor, f"{name}: {ours:.3g} vs torch math {theirs:.3g}"


@pytest.mark.skipif(not torch.cuda.is_available() or not triton.available(), reason="the Triton kernels on CUDA")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_head_groups_launches_on_side_streams_match_one_after_another(causal, monkeypatch):
    """head_groups' launches each on a side stream give the results of one launch after another, bit
    for bit (a ragged last segment, w % r != 0); a CUDA graph captures them one after another, and its
    replay on new inputs equals an eager call."""
    from dilated_attention.backends import triton as triton_backend

    b, n, h, d, segs, rates = 2, 20000, 6, 64, [1000, 3000, 8192], [1, 3, 4]
    q, k, v, dout = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    forks = []
    side_streams = triton_backend._side_streams
    monkeypatch.setattr(triton_backend, "_side_streams", lambda *a: forks.append(a) or side_streams(*a))

    def step():
        out = dilated_attention(q, k, v, segs, rates, is_causal=causal, mode="head_groups")
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    monkeypatch.setattr(triton_backend, "CONCURRENT_MIN_ROWS", 1 << 40)
    serial = step()
    assert not forks
    monkeypatch.setattr(triton_backend, "CONCURRENT_MIN_ROWS", 0)
    for name, a, c in zip(["out", "dq", "dk", "dv"], serial, step()):
        assert torch.equal(a, c), f"{name}: side streams differ from one launch after another"
    assert forks, "the launches ran one after another"
    del serial  # its autograd graph holds q, k, v's grad accumulators, made on the default stream: a capture
    # while they live would make that stream wait on the capturing one (warm up on a side stream instead)
    assert_graph_replays_like_eager(step, (q, k, v, dout))


@pytest.mark.skipif(not torch.cuda.is_available() or not triton.available(), reason="the Triton kernels on CUDA")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_and_backward_replay_from_a_cuda_graph(causal, mode):
    """After a warm-up call (device tables made, configs and the causal path picked), forward and
    backward capture into one CUDA graph; replays on new inputs equal eager calls bit for bit."""
    b, n, h, d, segs, rates = 2, 4096, 4, 64, [512, 1024, 2048], [1, 2, 4]
    q, k, v, dout = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def step():
        out = dilated_attention(q, k, v, segs, rates, is_causal=causal, mode=mode)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    assert_graph_replays_like_eager(step, (q, k, v, dout))


def assert_graph_replays_like_eager(step, inputs):
    """Warm step() up on a side stream, capture it into a CUDA graph, give the inputs new values (read by
    the graph where the static ones live) and replay: its (out, dq, dk, dv) equal an eager step's bit for bit."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for t in inputs:
        with torch.no_grad():
            t.copy_(torch.randn_like(t))
    graph.replay()
    for name, replayed, eager in zip(["out", "dq", "dk", "dv"], captured, step()):
        torch.testing.assert_close(replayed, eager, rtol=0, atol=0, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available() or not triton.available(), reason="the Triton kernels on CUDA")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_direct_launches_equal_tritons_own(causal, mode, monkeypatch):
    """Kernels launched from our own cache of compiled kernels (``triton_launch``) give what
    ``kernel[grid]`` gives, bit for bit, and both match the float64 reference to bf16 accuracy: fused
    and per-branch plans, GQA, a key mask, and inputs at an address that is no multiple of 16 bytes
    (another specialisation of every kernel)."""
    from dilated_attention.backends import triton_launch

    if not triton_launch._DIRECT:
        pytest.skip(f"direct launches follow Triton {triton_launch._DIRECT_VERSIONS}")
    monkeypatch.setattr(triton_launch, "_COMPILED", {})
    cases = [(4096, 4, 4, False, False), (77, 6, 2, True, False), (4096, 4, 2, False, True), (77, 6, 6, True, True)]
    for n, h, h_kv, masked, misaligned in cases:
        g = torch.Generator().manual_seed(n + h_kv)
        shapes = [(2, n, h, 64), (2, n, h_kv, 64), (2, n, h_kv, 64), (2, n, h, 64)]
        base = [torch.randn(1 + math.prod(s), generator=g).to("cuda", torch.bfloat16) for s in shapes]
        q, k, v, dout = (t[int(misaligned):int(misaligned) + math.prod(s)].view(s) for t, s in zip(base, shapes))
        assert (q.data_ptr() % 16 != 0) == misaligned
        mask = (torch.rand(2, n, generator=g) < 0.2).cuda() if masked else None
        results, added = [], []
        for direct in (False, True, True):  # Triton's path; ours filling its cache; ours from the cache
            monkeypatch.setattr(triton_launch, "_DIRECT", direct)
            entries = len(triton_launch._COMPILED)
            ins = [t.detach().requires_grad_() for t in (q, k, v)]
            out = dilated_attention(*ins, [512, 1024, 2048], [1, 2, 4], is_causal=causal, mode=mode,
                                    backend="triton", key_padding_mask=mask)
            results.append([out, *torch.autograd.grad(out, ins, dout)])
            added.append(len(triton_launch._COMPILED) - entries)
        assert added[0] == 0 and added[1] > 0 and added[2] == 0, added  # the last run launched every kernel direct
        ref_in = [t.cpu().double().requires_grad_() for t in (q, k, v)]
        ref = reference(ref_in[0], *(t.repeat_interleave(h // h_kv, 2) for t in ref_in[1:]), [512, 1024, 2048],
                        [1, 2, 4], causal, None, mode, key_padding_mask=mask)
        refs = [ref, *torch.autograd.grad(ref, ref_in, dout.cpu().double())]
        for name, *runs, r in zip(["out", "dq", "dk", "dv"], *results, refs):
            assert rel_err(runs[-1].cpu(), r) < 3e-2, f"{name} {n} {h_kv} {misaligned}: bf16 against float64"
            for other in runs[1:]:
                torch.testing.assert_close(other, runs[0], rtol=0, atol=0, msg=f"{name} {n} {h_kv} {misaligned}")


@pytest.mark.parametrize("backend", ["math", None])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("h_kv", [4, 2])
def test_key_padding_mask_matches_reference(h_kv, causal, mode, backend):
    """Masked keys are ignored by every branch; positions keep their place; rows left with no key give zeros."""
    b, n, h, d, segs, rates = 2, 37, 4, 8, [8, 16, 40], [1, 3, 4]
    g = torch.Generator().manual_seed(h_kv)
    mask = torch.rand(b, n, generator=g) < 0.4
    mask[1] = True  # a sequence with no visible key at all
    mask[0, :8] = True  # and segments of the first branch with none
    q, dout = rand((b, n, h, d)), rand((b, n, h, d), grad=False)
    k, v = rand((b, n, h_kv, d)), rand((b, n, h_kv, d))
    out = dilated_attention(q, k, v, segs, rates, is_causal=causal, mode=mode, backend=backend, key_padding_mask=mask)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    rep = h // h_kv
    ref = reference(q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2), segs, rates, causal, None, mode,
                    key_padding_mask=mask)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert (out[1] == 0).all() and all((gr[1] == 0).all() for gr in grads)
    for name, a, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9, msg=lambda m: f"d{name}: {m}")


def test_key_padding_mask_is_refused_where_it_cannot_be_honoured():
    x = rand((1, 16, 2, 8), grad=False)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match="backend 'sdpa' cannot take this input: takes no key_padding_mask"):
        dilated_attention(x, x, x, [8], [1], backend="sdpa", key_padding_mask=mask)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        dilated_attention(x, x, x, [8], [1], key_padding_mask=mask.float())
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(batch, seq\) = \(1, 16\)"):
        dilated_attention(x, x, x, [8], [1], key_padding_mask=mask[:, :8])


@pytest.mark.skipif(not torch.cuda.is_available() or not triton.available(), reason="the Triton kernels on CUDA")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_key_padding_mask_on_triton_matches_math(causal):
    b, n, h, h_kv, d, segs, rates = 2, 300, 4, 2, 32, [64, 128, 256], [1, 2, 4]
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(b, n, generator=g) < 0.3
    mask[1, :130] = True
    q, dout = (torch.randn(b, n, h, d, generator=g) for _ in range(2))
    k, v = (torch.randn(b, n, h_kv, d, generator=g) for _ in range(2))
    results = {}
    for name, dtype, backend in (("ref", torch.float64, "math"), ("bf16", torch.bfloat16, "triton"),
                                 ("bf16-math", torch.bfloat16, "math")):
        ins = [t.to("cuda", dtype).requires_grad_() for t in (q, k, v)]
        out = dilated_attention(*ins, segs, rates, is_causal=causal, backend=backend,
                                key_padding_mask=mask.cuda())
        results[name] = [out, *torch.autograd.grad(out, ins, dout.to("cuda", dtype))]
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        ours, theirs = rel_err(results["bf16"][i], results["ref"][i]), rel_err(results["bf16-math"][i], results["ref"][i])
        assert torch.isfinite(results["bf16"][i]).all() and ours <= 2 * theirs + 2e-4, f"{name}: {ours:.3g} vs {theirs:.3g}"
