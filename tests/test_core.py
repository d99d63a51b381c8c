"""dilated_attention against the float64 reference: outputs and dq, dk, dv."""

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


def _low_precision_errors(dtype, device, backend, causal, mode):
    b, n, h, d, segs, rates = 2, 77, 6, 32, [16, 32, 64], [1, 3, 4]
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
    if backend == "triton" and not (device == "cuda" and dtype != torch.float32 and triton.available()):
        pytest.skip("the Triton kernels take CUDA fp16/bf16 (CPU: test_triton.py runs them interpreted)")
    ours, theirs = _low_precision_errors(dtype, device, backend, causal, mode)
    # rounding-noise floor: 3 eps for float32, ~10% of the typical error for the 16-bit types
    floor = {torch.float32: 3.6e-7, torch.bfloat16: 2e-4, torch.float16: 2e-5}[dtype]
    for name, a, t in zip(["out", "dq", "dk", "dv"], ours, theirs):
        assert a <= 2 * t + floor, f"{name}: error {a:.3g} vs torch math {t:.3g} in {dtype}"


def test_output_dtype_and_device_follow_q(device):
    q, k, v = (rand((1, 20, 2, 8), torch.bfloat16, device, grad=False) for _ in range(3))
    out = dilated_attention(q, k, v, [8], [2])
    assert out.dtype == torch.bfloat16 and out.device == q.device and out.shape == q.shape


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
