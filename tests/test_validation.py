"""Every bad input raises a clear ValueError/TypeError naming the argument."""

import pytest
import torch

from dilated_attention import DilatedAttention, MultiheadDilatedAttention, dilated_attention

X = torch.randn(1, 16, 2, 8)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(segment_lengths=[8, 16], dilation_rates=[1]), ValueError, "same length"),
        (dict(segment_lengths=[], dilation_rates=[]), ValueError, "segment_lengths must not be empty"),
        (dict(segment_lengths=[0], dilation_rates=[1]), ValueError, "segment_lengths must be positive"),
        (dict(segment_lengths=[8], dilation_rates=[-2]), ValueError, "dilation_rates must be positive"),
        (dict(segment_lengths=[8.0], dilation_rates=[1]), TypeError, "segment_lengths must hold ints"),
        (dict(segment_lengths=8, dilation_rates=[1]), TypeError, "segment_lengths must be a list"),
        (dict(segment_lengths=[8], dilation_rates="1"), TypeError, "dilation_rates must be a list"),
        (dict(segment_lengths=[8], dilation_rates=[True]), TypeError, "dilation_rates must hold ints"),
        (dict(segment_lengths=[8], dilation_rates=[1], mode="fast"), ValueError, "mode must be one of"),
        (dict(segment_lengths=[8, 8, 8], dilation_rates=[1, 1, 1], mode="head_groups"), ValueError, "head per branch"),
        (dict(segment_lengths=[8], dilation_rates=[1], scale="x"), TypeError, "scale"),
        (dict(segment_lengths=[8], dilation_rates=[1], is_causal=1), TypeError, "is_causal"),
        (dict(segment_lengths=[8], dilation_rates=[1], backend="triton9"), ValueError, "backend must be one of"),
        (dict(segment_lengths=[8], dilation_rates=[1], scale=float("nan")), ValueError, "scale must be a finite"),
        (dict(segment_lengths=[8], dilation_rates=[1], head_start=-1), TypeError, "head_start must be a non-negative"),
        (dict(segment_lengths=[8], dilation_rates=[1], head_start=1, total_heads=2), ValueError, "inside total_heads"),
        (dict(segment_lengths=[8], dilation_rates=[1], scale=float("inf")), ValueError, "scale must be a finite"),
        # the seed's / fkodom's order (dilation_rates first) passed to ours
        (dict(segment_lengths=[1, 2, 4], dilation_rates=[2048, 4096, 8192]), ValueError,
         r"dilation_rates\[0\] = 2048 exceeds segment_lengths\[0\] = 1.*other order"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        dilated_attention(X, X, X, **kwargs)


@pytest.mark.parametrize(
    "q,k,v,error,match",
    [
        (X.tolist(), X, X, TypeError, "q must be a torch.Tensor"),
        (X[0], X[0], X[0], ValueError, r"q must have shape \(batch, seq, heads, head_dim\)"),
        (X, X[:, :8], X[:, :8], ValueError, "q has more rows"),
        (X, X[..., :4], X[..., :4], ValueError, "k must have q's batch and head_dim"),
        (X.repeat(1, 1, 3, 1), X.repeat(1, 1, 2, 1), X.repeat(1, 1, 2, 1), ValueError, "k has 4 heads, which must divide"),
        (X, X, X[:, :, :1], ValueError, "v must have the shape of k"),
        (X, X, X.double(), TypeError, "v must have the dtype of q"),
        (X.long(), X.long(), X.long(), TypeError, "q must be a floating point"),
        (X[:, :0], X[:, :0], X[:, :0], ValueError, "must not be empty"),
        (X, X.to("meta"), X, ValueError, "k must be on q's device"),
    ],
)
def test_bad_tensors(q, k, v, error, match):
    with pytest.raises(error, match=match):
        dilated_attention(q, k, v, [8], [1])


def test_module_arguments():
    with pytest.raises(ValueError, match="same length"):
        DilatedAttention([8, 16], [1])
    with pytest.raises(ValueError, match="dropout"):
        DilatedAttention([8], [1], dropout=1.5)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        MultiheadDilatedAttention(30, 4, [8], [1])
    mha = MultiheadDilatedAttention(16, 2, [8], [1])
    with pytest.raises(ValueError, match="need_weights"):
        mha(torch.randn(1, 8, 16), need_weights=True)
    with pytest.raises(ValueError, match=r"query must have shape \(batch, seq, 16\)"):
        mha(torch.randn(1, 8, 12))
    with pytest.raises(ValueError, match="share"):
        mha(torch.randn(1, 8, 16), torch.randn(1, 4, 16))


def test_dropout_is_refused_in_training_not_ignored():
    attn = DilatedAttention([8], [1], dropout=0.1)
    with pytest.raises(NotImplementedError, match="dropout"):
        attn(X, X, X)
    attn.eval()
    torch.testing.assert_close(attn(X, X, X), dilated_attention(X, X, X, [8], [1]))


def test_module_backend_is_checked_and_used(monkeypatch):
    from dilated_attention import RingDilatedAttention

    for cls in (DilatedAttention, RingDilatedAttention):
        with pytest.raises(ValueError, match="backend must be one of"):
            cls([8], [1], backend="fastest")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for module in (DilatedAttention([8], [1], backend="triton"), RingDilatedAttention([8], [1], backend="triton")):
        with pytest.raises(ValueError, match="backend 'triton' cannot take this input"):  # passed through, not ignored
            module(X, X, X)
    torch.testing.assert_close(DilatedAttention([8], [1], backend="math")(X, X, X),
                               dilated_attention(X, X, X, [8], [1], backend="math"), rtol=0, atol=0)


def test_rate_above_a_clipped_segment_stays_legal():
    """r <= w but r > min(w, n): the branch links few or no rows, which is the formula, not a mistake."""
    q, k, v = (torch.randn(1, 5, 4, 8, dtype=torch.float64) for _ in range(3))
    out = dilated_attention(q, k, v, [1, 16], [1, 8])
    from reference import reference

    torch.testing.assert_close(out, reference(q, k, v, [1, 16], [1, 8]))


def test_backend_errors_give_every_reason():
    with pytest.raises(ValueError, match=r"needs a CUDA tensor.*; takes torch.float16, torch.bfloat16, torch.float32, got torch.float64"):
        dilated_attention(X.double(), X.double(), X.double(), [8], [1], backend="triton")


def test_backend_choice_is_made_per_kind_of_input():
    """``select`` decides once per (name, device type, dtype, head_dim, mask): a refusal is raised on
    every call, and another kind of input gets its own choice."""
    from dilated_attention.backends import BACKENDS, select

    x = torch.randn(1, 4, 2, 8)
    for _ in range(2):
        assert select(x) is BACKENDS["sdpa"] and select(x, masked=True) is BACKENDS["math"]
        assert select(x, "math") is BACKENDS["math"] and select(x.double(), "math") is BACKENDS["math"]
        with pytest.raises(ValueError, match="backend 'sdpa' cannot take this input: takes no key_padding_mask"):
            select(x, "sdpa", masked=True)
        with pytest.raises(ValueError, match="backend must be one of"):
            select(x, "fastest")
        with pytest.raises(TypeError, match="backend must be a str"):
            select(x, ["math"])
