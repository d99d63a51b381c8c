"""Queries shorter than keys (bottom-right aligned) and KV-cache decoding against the full causal forward."""

import pytest
import torch

from conftest import rand
from reference import reference

from dilated_attention import DilatedKVCache, MultiheadDilatedAttention, dilated_attention

CASES = [
    ([8, 16, 40], [1, 3, 4]),  # ragged, w % r != 0, w > n
    ([5, 12], [1, 2]),
]


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("mode", ["paper", "head_groups"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("m", [1, 3, 9, 37])
@pytest.mark.parametrize("segs,rates", CASES)
def test_short_queries_are_the_last_rows_of_the_full_result(segs, rates, m, causal, mode, backend):
    """q with m rows against k, v with n rows: exactly the last m rows of the full forward, and their gradients."""
    b, n, h, h_kv, d = 2, 37, 4, 2, 8
    q_full, dout = rand((b, n, h, d)), rand((b, m, h, d), grad=False)
    k, v = rand((b, n, h_kv, d)), rand((b, n, h_kv, d))
    mask = torch.rand(b, n, generator=torch.Generator().manual_seed(m)) < 0.2 if backend == "math" else None
    q = q_full[:, n - m :].detach().requires_grad_()
    out = dilated_attention(q, k, v, segs, rates, is_causal=causal, mode=mode, backend=backend, key_padding_mask=mask)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    full = [t.detach().requires_grad_() for t in (q_full, k, v)]
    rep = h // h_kv
    ref = reference(full[0], full[1].repeat_interleave(rep, 2), full[2].repeat_interleave(rep, 2), segs, rates, causal,
                    None, mode, key_padding_mask=mask)[:, n - m :]
    ref_grads = torch.autograd.grad(ref, full, dout)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0], ref_grads[0][:, n - m :], rtol=1e-9, atol=1e-9)
    for a, r in zip(grads[1:], ref_grads[1:]):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_token_by_token_decoding_equals_the_full_causal_forward(num_kv_heads):
    torch.manual_seed(0)
    e, h, segs, rates, n = 32, 4, [4, 8, 16], [1, 2, 4], 29
    mha = MultiheadDilatedAttention(e, h, segs, rates, num_kv_heads=num_kv_heads, dtype=torch.float64).eval()
    x = rand((2, n, e), grad=False)
    full, _ = mha(x, is_causal=True)
    cache = DilatedKVCache(batch=2, max_len=n, kv_heads=num_kv_heads, head_dim=e // h, dtype=torch.float64)
    prefill = 11
    outs = [mha(x[:, :prefill], is_causal=True, kv_cache=cache)[0]]
    for i in range(prefill, n):
        outs.append(mha(x[:, i : i + 1], is_causal=True, kv_cache=cache)[0])
    assert len(cache) == n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="the cache holds 29 of 29 rows"):
        mha(x[:, :1], is_causal=True, kv_cache=cache)


def test_short_queries_are_refused_where_they_cannot_be_honoured():
    q, k = rand((1, 4, 2, 8), grad=False), rand((1, 16, 2, 8), grad=False)
    with pytest.raises(ValueError, match="q has more rows"):
        dilated_attention(k, q, q, [8], [1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 7, 300])
def test_short_queries_on_triton_within_twice_torch_math(m):
    from dilated_attention.backends import triton

    if not triton.available():
        pytest.skip("needs Triton")
    b, n, h, h_kv, d, segs, rates = 2, 700, 4, 2, 32, [64, 128, 256], [1, 2, 4]
    g = torch.Generator().manual_seed(m)
    q, dout = torch.randn(b, m, h, d, generator=g), torch.randn(b, m, h, d, generator=g)
    k, v = (torch.randn(b, n, h_kv, d, generator=g) for _ in range(2))
    results = {}
    for name, dtype, backend in (("ref", torch.float64, "math"), ("ours", torch.bfloat16, "triton"),
                                 ("math", torch.bfloat16, "math")):
        ins = [t.to("cuda", dtype).requires_grad_() for t in (q, k, v)]
        out = dilated_attention(*ins, segs, rates, is_causal=True, backend=backend)
        results[name] = [out, *torch.autograd.grad(out, ins, dout.to("cuda", dtype))]
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        err = lambda x: ((x.double() - results["ref"][i]).norm() / results["ref"][i].norm()).item()  # noqa: E731
        assert err(results["ours"][i]) <= 2 * err(results["math"][i]) + 2e-4, name


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("mode", ["paper", "head_groups"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_packed_documents_equal_each_document_alone(causal, mode, backend):
    segs, rates, h, h_kv, d = [8, 16, 40], [1, 3, 4], 4, 2, 8
    lengths = [13, 1, 0, 30, 7]  # an empty document and a one-row one too
    bounds = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    n = int(bounds[-1])
    q, dout = rand((1, n, h, d)), rand((1, n, h, d), grad=False)
    k, v = rand((1, n, h_kv, d)), rand((1, n, h_kv, d))
    out = dilated_attention(q, k, v, segs, rates, is_causal=causal, mode=mode, backend=backend, cu_seqlens=bounds)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        if b == a:
            continue
        part = [t[:, a:b].detach().requires_grad_() for t in (q, k, v)]
        alone = dilated_attention(*part, segs, rates, is_causal=causal, mode=mode, backend="math")
        torch.testing.assert_close(out[:, a:b], alone, rtol=1e-10, atol=1e-10)
        for g, ga in zip(grads, torch.autograd.grad(alone, part, dout[:, a:b])):
            torch.testing.assert_close(g[:, a:b], ga, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="end at the sequence length 51"):
        dilated_attention(q, k, v, segs, rates, cu_seqlens=bounds[:-1])
    with pytest.raises(TypeError, match="int32 tensor"):
        dilated_attention(q, k, v, segs, rates, cu_seqlens=bounds.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_packed_documents_on_triton_within_twice_torch_math(causal):
    from dilated_attention.backends import triton

    if not triton.available():
        pytest.skip("needs Triton")
    segs, rates, h, h_kv, d = [64, 128, 256], [1, 2, 4], 4, 2, 32
    bounds = torch.tensor([0, 300, 301, 301, 700, 1000], dtype=torch.int32, device="cuda")
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(1, 1000, h, d, generator=g) for _ in range(2))
    k, v = (torch.randn(1, 1000, h_kv, d, generator=g) for _ in range(2))
    results = {}
    for name, dtype, backend in (("ref", torch.float64, "math"), ("ours", torch.bfloat16, "triton"),
                                 ("math", torch.bfloat16, "math")):
        ins = [t.to("cuda", dtype).requires_grad_() for t in (q, k, v)]
        out = dilated_attention(*ins, segs, rates, is_causal=causal, backend=backend, cu_seqlens=bounds)
        results[name] = [out, *torch.autograd.grad(out, ins, dout.to("cuda", dtype))]
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        err = lambda x: ((x.double() - results["ref"][i]).norm() / results["ref"][i].norm()).item()  # noqa: E731
        assert err(results["ours"][i]) <= 2 * err(results["math"][i]) + 2e-4, name


def test_sharded_layers_refuse_a_kv_cache():
    from dilated_attention import RingMultiheadDilatedAttention

    layer = RingMultiheadDilatedAttention(16, 2, [8], [1])
    cache = DilatedKVCache(batch=1, max_len=8, kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="takes no kv_cache: decoding runs on one device"):
        layer(torch.randn(1, 4, 16), is_causal=True, kv_cache=cache)
