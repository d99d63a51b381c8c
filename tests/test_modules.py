"""The nn.Module wrappers compute the functional op and the MAGNETO block."""

import pytest
import torch

from conftest import rand
from reference import reference

from dilated_attention import DilatedAttention, MultiheadDilatedAttention


@pytest.mark.parametrize("mode", ["paper", "head_groups"])
def test_dilated_attention_module_matches_reference(mode):
    attn = DilatedAttention([8, 16], [1, 2], mode=mode, scale=0.5)
    q, k, v = (rand((2, 30, 4, 8)) for _ in range(3))
    out = attn(q, k, v, is_causal=True)
    torch.testing.assert_close(out, reference(q, k, v, [8, 16], [1, 2], True, 0.5, mode))


@pytest.mark.parametrize("layer_norm", [True, False])
def test_multihead_block_matches_manual_computation(layer_norm):
    torch.manual_seed(0)
    e, h, segs, rates = 24, 3, [8, 16], [1, 2]
    mha = MultiheadDilatedAttention(e, h, segs, rates, layer_norm=layer_norm, dtype=torch.float64)
    x = rand((2, 21, e), grad=True)
    out, weights = mha(x, is_causal=True)
    assert weights is None and out.shape == x.shape
    q = mha.q_proj(x).unflatten(-1, (h, e // h))
    k = mha.k_proj(x).unflatten(-1, (h, e // h))
    v = mha.v_proj(x).unflatten(-1, (h, e // h))
    y = reference(q, k, v, segs, rates, True).flatten(-2)
    if layer_norm:
        y = torch.nn.functional.layer_norm(y, (e,), mha.norm.weight, mha.norm.bias, mha.norm.eps)
    expected = mha.out_proj(y)
    torch.testing.assert_close(out, expected)
    g1 = torch.autograd.grad(out.sum(), [x, mha.q_proj.weight])
    g2 = torch.autograd.grad(expected.sum(), [x, mha.q_proj.weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_multihead_cross_attention_uses_key_and_value():
    mha = MultiheadDilatedAttention(16, 2, [8], [1], dtype=torch.float64)
    x, y = rand((1, 8, 16), grad=False), rand((1, 8, 16), grad=False)
    assert not torch.allclose(mha(x)[0], mha(x, y, y)[0])
    torch.testing.assert_close(mha(x, y)[0], mha(x, y, y)[0])


def test_gamma_init_scales_value_and_output_projections():
    torch.manual_seed(1)
    a = MultiheadDilatedAttention(256, 4, [8], [1], gamma_init=1.0)
    torch.manual_seed(1)
    b = MultiheadDilatedAttention(256, 4, [8], [1], gamma_init=0.1)
    torch.testing.assert_close(b.v_proj.weight, 0.1 * a.v_proj.weight)
    torch.testing.assert_close(b.out_proj.weight, 0.1 * a.out_proj.weight)
    torch.testing.assert_close(b.q_proj.weight, a.q_proj.weight)


def test_multihead_gqa_projects_fewer_kv_heads():
    torch.manual_seed(2)
    e, h, h_kv, segs, rates = 24, 6, 2, [8, 16], [1, 2]
    mha = MultiheadDilatedAttention(e, h, segs, rates, num_kv_heads=h_kv, dtype=torch.float64)
    assert mha.k_proj.out_features == h_kv * (e // h) == mha.v_proj.out_features
    x = rand((2, 21, e), grad=True)
    out, _ = mha(x, is_causal=True)
    q = mha.q_proj(x).unflatten(-1, (h, e // h))
    k, v = (p(x).unflatten(-1, (h_kv, e // h)).repeat_interleave(h // h_kv, 2) for p in (mha.k_proj, mha.v_proj))
    y = torch.nn.functional.layer_norm(reference(q, k, v, segs, rates, True).flatten(-2), (e,), mha.norm.weight,
                                       mha.norm.bias, mha.norm.eps)
    torch.testing.assert_close(out, mha.out_proj(y))
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiheadDilatedAttention(e, h, segs, rates, num_kv_heads=4)


def test_multihead_key_padding_mask_like_nn_multihead_attention():
    """A dense schedule (one branch, w >= n, r = 1) with a key padding mask is nn.MultiheadAttention's attention."""
    torch.manual_seed(3)
    e, h, n = 16, 2, 12
    mha = MultiheadDilatedAttention(e, h, [64], [1], layer_norm=False, bias=False, dtype=torch.float64)
    ref = torch.nn.MultiheadAttention(e, h, bias=False, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([mha.q_proj.weight, mha.k_proj.weight, mha.v_proj.weight]))
        ref.out_proj.weight.copy_(mha.out_proj.weight)
    x = rand((2, n, e), grad=False)
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[0, 3:7] = True
    mask[1, -2:] = True
    ours, _ = mha(x, key_padding_mask=mask)
    theirs, _ = ref(x, x, x, key_padding_mask=mask, need_weights=False)
    torch.testing.assert_close(ours, theirs)
