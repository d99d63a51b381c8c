"""Float64 dense reference of LongNet's dilated attention, written from the formula alone.

link[j, b, i, t] says whether query i and key t are linked for head j in branch b:
same segment of w' = min(w, n), both in-segment positions == j % r (mod r), t <= i if causal.
paper:       out(i) = sum_b sum_t link e(i,t) v_t / sum_b sum_t link e(i,t), e = exp(scale q.k)
head_groups: head j uses only its group's branch g (offset g % r_g), output divided by m.
"""

import torch


def link_mask(n, w, r, offset, causal):
    """(n, n) bool: query i linked to key t in branch (w, r) at this offset."""
    seg = min(w, n)
    pos = torch.arange(n)
    same_segment = (pos[:, None] // seg) == (pos[None, :] // seg)
    on_offset = (pos % seg) % r == offset
    mask = same_segment & on_offset[:, None] & on_offset[None, :]
    if causal:
        mask &= pos[None, :] <= pos[:, None]
    return mask


def link_counts(n, h, segment_lengths, dilation_rates, causal, mode):
    """(h, n, n) float64: how many times key t enters query i's softmax for head j."""
    counts = torch.zeros(h, n, n, dtype=torch.float64)
    m = len(segment_lengths)
    if mode == "paper":
        for j in range(h):
            for w, r in zip(segment_lengths, dilation_rates):
                counts[j] += link_mask(n, w, r, j % r, causal)
    else:
        base, extra = divmod(h, m)
        sizes = [base + (g < extra) for g in range(m)]
        j = 0
        for g, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
            for _ in range(sizes[g]):
                counts[j] = link_mask(n, w, r, g % r, causal)
                j += 1
    return counts


def reference(q, k, v, segment_lengths, dilation_rates, causal=False, scale=None, mode="paper", key_padding_mask=None):
    """q, k, v: (b, n, h, d) any dtype -> float64 (b, n, h, d), differentiable.

    key_padding_mask: (b, n) bool, True where a key is ignored."""
    q, k, v = (t.double() for t in (q, k, v))
    b, n, h, d = q.shape
    scale = d**-0.5 if scale is None else scale
    counts = link_counts(n, h, segment_lengths, dilation_rates, causal, mode)
    logits = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    logits = logits.masked_fill(counts == 0, float("-inf"))
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask.cpu()[:, None, None, :], float("-inf"))
    m = logits.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    weights = counts * torch.exp(logits - m)
    denom = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(denom == 0, torch.ones_like(denom), denom)
    out = torch.einsum("bhij,bjhd->bihd", probs, v)
    if mode == "head_groups":
        out = out / len(segment_lengths)
    return out


def torch_low_precision(q, k, v, segment_lengths, dilation_rates, causal=False, scale=None, mode="paper"):
    """PyTorch's own math in q's dtype: SDPA's math kernel with the log-count mask."""
    b, n, h, d = q.shape
    counts = link_counts(n, h, segment_lengths, dilation_rates, causal, mode)
    bias = torch.log(counts).to(q.dtype)  # -inf where unlinked
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias.to(q.device), scale=scale
        ).transpose(1, 2)
    if mode == "head_groups":
        out = out / len(segment_lengths)
    return out
