"""Ring dilated attention over real gloo process groups: each rank's shard equals the single-process result."""

import pytest
import torch

from distributed import run_world
from reference import reference

from dilated_attention import dilated_attention
from dilated_attention.ring import RingDilatedAttention

# (name, segment_lengths, dilation_rates) for n = 12 * P * 2 (chunks of 12 rows in zigzag)
SCHEDULES = [
    ("ragged-w%r-w>n", lambda n: ([8, 20, 2 * n], [1, 3, 4])),
    ("no-r1", lambda n: ([6, 45], [2, 5])),
    ("mixed-spans", lambda n: ([5, 10, 30, n // 2 + 3], [1, 2, 3, 7])),
    ("inside-shards", lambda n: ([4, 12], [1, 2])),
    ("aligned", lambda n: ([6, 12, 48, 2 * n], [1, 5, 4, 3])),  # whole-branch launches (ring_chunks)
]
ALIGNED = ([6, 12, 48], [1, 5, 4])


def _counting_chunk_path():
    """Count the calls that take the whole-branch ring (``ring_chunks``), forward and backward."""
    from dilated_attention import ring_chunks

    calls = {"forward": 0, "backward": 0}
    for name in calls:
        def counted(*args, _run=getattr(ring_chunks, name), _name=name):
            calls[_name] += 1
            return _run(*args)
        setattr(ring_chunks, name, counted)
    return calls


def _compare(rank, world, ring, dtype, segs, rates, mode, causal, n, b=2, h=5, d=8, seed=0, against_reference=False,
             h_kv=None, masked=False, cu_seqlens=None):
    """Each rank's shard against the single-process result, or (against_reference) the float64 Eq. 10 reference."""
    g = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(b, n, h, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    k, v = (torch.randn(b, n, h_kv or h, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    mask = None
    if masked:
        mask = torch.rand(b, n, generator=g) < 0.4
        mask[-1, : n // 2] = True  # segments with no visible key
    if against_reference:
        full = [t.double().requires_grad_() for t in (q, k, v)]
        group = h // (h_kv or h)
        expected = reference(full[0], *(t.repeat_interleave(group, 2) for t in full[1:]), segs, rates, causal, None, mode,
                             key_padding_mask=mask)
        expected_grads = [e.to(dtype) for e in torch.autograd.grad(expected, full, dout.double())]
        expected = expected.to(dtype)
    else:
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        expected = dilated_attention(*full, segs, rates, is_causal=causal, mode=mode, key_padding_mask=mask,
                                     cu_seqlens=cu_seqlens)
        expected_grads = torch.autograd.grad(expected, full, dout)
    local = [ring.shard(t).requires_grad_() for t in (q, k, v)]
    out = ring(*local, is_causal=causal, key_padding_mask=None if mask is None else ring.shard(mask),
               cu_seqlens=cu_seqlens)
    grads = torch.autograd.grad(out, local, ring.shard(dout))
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    where = f"rank {rank}/{world} {mode} causal={causal} {ring.layout} {dtype} w={segs} r={rates}"
    torch.testing.assert_close(out, ring.shard(expected), **tol, msg=lambda m: f"out {where}: {m}")
    for name, a, e in zip("qkv", grads, expected_grads):
        torch.testing.assert_close(a, ring.shard(e), **tol, msg=lambda m: f"d{name} {where}: {m}")
    torch.testing.assert_close(ring.unshard(out.detach()), expected.detach(), **tol)


def _exactness_worker(rank, world):
    n = 24 * world
    chunked = _counting_chunk_path()
    for layout in ("contiguous", "zigzag"):
        for name, schedule in SCHEDULES:
            segs, rates = schedule(n)
            for mode in ("paper", "head_groups"):
                for causal in (False, True):
                    ring = RingDilatedAttention(segs, rates, mode=mode, layout=layout)
                    before = dict(chunked)
                    _compare(rank, world, ring, torch.float64, segs, rates, mode, causal, n)
                    if name == "aligned" and world > 1:
                        assert chunked == {k: before[k] + 1 for k in chunked}, "the aligned schedule left ring_chunks"
    for causal in (False, True):  # float32 through the fused CPU kernels
        ring = RingDilatedAttention([5, 10, 30], [1, 2, 3])
        _compare(rank, world, ring, torch.float32, [5, 10, 30], [1, 2, 3], "paper", causal, n, seed=1)
    for mode in ("paper", "head_groups"):  # GQA: 6 query heads over 2 and 1 k/v heads, against the reference
        for h_kv in (2, 1):
            for backend in ("math", "sdpa"):
                ring = RingDilatedAttention([8, 20, 2 * n], [1, 3, 4], mode=mode, layout="zigzag", backend=backend)
                _compare(rank, world, ring, torch.float64, [8, 20, 2 * n], [1, 3, 4], mode, True, n, h=6, h_kv=h_kv,
                         against_reference=True)
    bounds = torch.tensor([0, 7, 8, n // 2 + 3, n], dtype=torch.int32)  # packed documents spanning ranks
    for causal in (False, True):
        for layout in ("contiguous", "zigzag"):
            ring = RingDilatedAttention([5, 12, 2 * n], [1, 2, 3], layout=layout)
            _compare(rank, world, ring, torch.float64, [5, 12, 2 * n], [1, 2, 3], "paper", causal, n, h=4,
                     cu_seqlens=bounds)
    for causal in (False, True):  # key padding mask (with GQA too), contiguous and zigzag, both ring paths
        for layout, h_kv in (("contiguous", None), ("zigzag", 2)):
            for segs, rates in (([5, 12, 2 * n], [1, 2, 3]), ALIGNED):
                ring = RingDilatedAttention(segs, rates, layout=layout)
                _compare(rank, world, ring, torch.float64, segs, rates, "paper", causal, n, h=4, h_kv=h_kv,
                         against_reference=True, masked=True)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_matches_single_process(world):
    run_world(world, _exactness_worker)


def _dense_worker(rank, world):
    n, b, h, d = 16 * world, 2, 3, 8
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(b, n, h, d, generator=g, dtype=torch.float64) for _ in range(4))
    for causal in (False, True):
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        expected = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in full), is_causal=causal).transpose(1, 2)
        expected_grads = torch.autograd.grad(expected, full, dout)
        ring = RingDilatedAttention([n], [1])
        local = [ring.shard(t).requires_grad_() for t in (q, k, v)]
        out = ring(*local, is_causal=causal)
        grads = torch.autograd.grad(out, local, ring.shard(dout))
        torch.testing.assert_close(out, ring.shard(expected))
        for a, e in zip(grads, expected_grads):
            torch.testing.assert_close(a, ring.shard(e))
        m = n // world
        kv_bytes = 2 * b * m * h * d * 8  # one rank's K and V shards in float64
        sends = world - 1 if not causal else world - 1 - rank  # K/V to the ranks that use them
        uses = world - 1 if not causal else rank  # dK/dV home to the ranks whose K/V this rank used
        assert ring.comm_bytes["forward"] == sends * kv_bytes
        assert ring.comm_bytes["backward"] == (sends + uses) * kv_bytes


def _triton_worker(rank, world):
    from dilated_attention import backends

    n = 12 * 2 * world
    for layout, (segs, rates) in (("contiguous", ([5, 10, 30], [1, 2, 3])), ("zigzag", ([8, 20, 2 * n], [1, 3, 4]))):
        # head_groups' steps are paper's launches over fewer heads: at 3 ranks paper alone takes the odd world
        for mode in ("paper", "head_groups") if world == 2 else ("paper",):
            for causal in (False, True):
                ring = RingDilatedAttention(segs, rates, mode=mode, layout=layout, backend="triton")
                # b = 1: shards are views whose batch stride is the full tensor's (any stride fits a size-1 dim)
                _compare(rank, world, ring, torch.float32, segs, rates, mode, causal, n, b=1, h=5, d=16, seed=2,
                         against_reference=True)
    chunked = _counting_chunk_path()
    for segs, rates in (([8, 20, 2 * n], [1, 3, 4]), ALIGNED):  # GQA (6 query heads, 2 k/v) and padding
        for causal in (False, True) if segs == ALIGNED[0] else (True,):
            ring = RingDilatedAttention(segs, rates, backend="triton", layout="zigzag" if causal else "contiguous")
            _compare(rank, world, ring, torch.float32, segs, rates, "paper", causal, n, b=1, h=6, d=16, seed=3,
                     against_reference=True, h_kv=2, masked=True)
    segs, rates = [48, 2 * n], [2, 3]  # every segment spans whole chunks: the fused kernels on each chunk's own plan
    ring = RingDilatedAttention(segs, rates, backend="triton")
    _compare(rank, world, ring, torch.float32, segs, rates, "paper", False, n, b=1, h=4, d=16, seed=4,
             against_reference=True)
    assert chunked["forward"] == chunked["backward"] == 3
    assert backends.select(torch.ones(1, 1, 1, 16), "triton") is backends.BACKENDS["triton"]
    if world == 2:  # every world's chunks have 24 rows: the descriptors see the same geometry at 3 ranks
        _ring_tma_loads_match(rank, n)


def _ring_tma_loads_match(rank, n):
    """The ring's steps with keys and values through tensor descriptors (sm_90's forward and causal dQ;
    forced here, fp16) give the pointer loads' out, dq, dk, dv bit for bit: visiting keys in their
    class layout, zigzag causal steps."""
    import triton

    from dilated_attention.backends import triton_fused

    pointer_loads = triton_fused.tma_loads
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8))
    g = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(1, n, 4, 16, generator=g).half() for _ in range(4))
    for causal in (False, True):
        ring = RingDilatedAttention([8, 20, 2 * n], [1, 3, 4], backend="triton",
                                    layout="zigzag" if causal else "contiguous")
        results = []
        for loads in (pointer_loads, lambda k, v: True):
            triton_fused.tma_loads = loads
            local = [ring.shard(t).requires_grad_() for t in (q, k, v)]
            out = ring(*local, is_causal=causal)
            results.append((out, *torch.autograd.grad(out, local, ring.shard(dout))))
        triton_fused.tma_loads = pointer_loads
        assert all(torch.equal(a, b) for a, b in zip(*results)), f"rank {rank} causal={causal}: TMA differs"


@pytest.mark.parametrize("world", [2, 3])
def test_ring_on_triton_kernels_under_interpreter(world, monkeypatch):
    """Every ring step through the Triton kernels (TRITON_INTERPRET=1 runs them on CPU)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the spawned ranks compile the kernels for the interpreter
    run_world(world, _triton_worker, timeout_s=300)


@pytest.mark.parametrize("world", [2, 3])
def test_dense_ring_attention_matches_sdpa_and_sends_only_shards(world):
    run_world(world, _dense_worker)


def _sparse_traffic_worker(rank, world):
    from dilated_attention import clear_global_pattern_cache, get_global_pattern_cache

    n, b, h, d = 64 * world, 1, 4, 8
    x = torch.randn(b, n // world, h, d, dtype=torch.float64)
    clear_global_pattern_cache()
    RingDilatedAttention([n], [2])(x, x, x)
    builds = get_global_pattern_cache().stats()["builds"]  # the plan and the ring schedule
    RingDilatedAttention([n], [2])(x, x, x)  # a second instance builds nothing
    own = RingDilatedAttention([n], [2], use_pattern_cache=False)
    own(x, x, x)
    assert builds == 2 and get_global_pattern_cache().stats()["builds"] == builds
    assert own.pattern_cache.stats()["builds"] == 2
    local = RingDilatedAttention([32], [2])  # every segment inside a shard
    local(x, x, x)
    assert local.comm_bytes["forward"] == 0
    dense, dilated = RingDilatedAttention([n], [1]), RingDilatedAttention([n], [4])
    dense(x, x, x)
    dilated(x, x, x)
    assert dilated.comm_bytes["forward"] == dense.comm_bytes["forward"] // 4
    gqa = RingDilatedAttention([n], [1])
    gqa(x, x[:, :, :1], x[:, :, :1])  # MQA: one k/v head travels, not four copies
    assert gqa.comm_bytes["forward"] == dense.comm_bytes["forward"] // 4


def test_sparse_communication():
    run_world(2, _sparse_traffic_worker)


def _mismatch_worker(rank, world, what):
    m = 16
    segs = [8, 32]
    if what == "shape" and rank == 1:
        m = 8
    if what == "schedule" and rank == 1:
        segs = [8, 64]
    ring = RingDilatedAttention(segs, [1, 2])
    x = torch.randn(1, m, 2, 8)
    with pytest.raises(ValueError, match="ranks disagree on " + ("local_seq_len" if what == "shape" else "schedule")):
        ring(x, x, x)


@pytest.mark.parametrize("what", ["shape", "schedule"])
def test_disagreeing_ranks_fail_on_every_rank(what):
    run_world(2, _mismatch_worker, what)


def _host_agreement_worker(rank, world):
    import torch.distributed as dist

    def no_collectives(*args, **kwargs):
        raise AssertionError("the agreement ran a collective (on a GPU it would wait for queued work)")

    dist.all_gather = dist.all_reduce = dist.broadcast = no_collectives
    ring = RingDilatedAttention([16, 64], [1, 2])
    x = torch.randn(1, 32, 2, 8, generator=torch.Generator().manual_seed(0))
    store = dist.distributed_c10d._get_default_store()
    base, keys = store.num_keys(), []
    for _ in range(24):
        ring(x, x, x)
        keys.append(store.num_keys() - base)
    # a round holds world + 4 keys, and a peer may be a round ahead or behind: at most three rounds
    assert max(keys) <= 3 * (world + 4), f"the agreement's store keys grow with the calls: {keys}"


def test_agreement_runs_on_the_host_and_cleans_up():
    run_world(2, _host_agreement_worker)


def _dead_rank_worker(rank, world):
    if rank == 1:
        return  # this rank dies before attending
    from dilated_attention.ring_comm import RingCommError

    ring = RingDilatedAttention([64], [1])
    x = torch.randn(1, 32, 2, 8)
    with pytest.raises(RingCommError, match="a rank died or timed out"):
        ring(x, x, x)


_dead_rank_worker.leaves_early = True


def test_dead_rank_gives_clear_error_within_timeout():
    run_world(2, _dead_rank_worker, timeout_s=5)


def test_zigzag_needs_even_chunks_and_single_process_is_plain():
    x = torch.randn(1, 30, 2, 8)
    ring = RingDilatedAttention([8], [2], layout="zigzag")
    torch.testing.assert_close(ring(x, x, x), dilated_attention(x, x, x, [8], [2]))
    with pytest.raises(ValueError, match="layout"):
        RingDilatedAttention([8], [2], layout="striped-ish")


def _multihead_worker(rank, world):
    from dilated_attention import MultiheadDilatedAttention, RingMultiheadDilatedAttention

    kw = dict(dtype=torch.float64)
    torch.manual_seed(0)
    single = MultiheadDilatedAttention(16, 4, [6, 20], [1, 2], **kw)  # rank 0's parameters
    torch.manual_seed(rank)  # every rank initialises differently: the first forward makes them rank 0's
    ring = RingMultiheadDilatedAttention(16, 4, [6, 20], [1, 2], layout="zigzag", **kw)
    if rank == 0:
        ring.load_state_dict(single.state_dict())
    x = torch.randn(2, 12 * world, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expected, _ = single(x, is_causal=True)
    local = ring.attention.shard(x).requires_grad_()
    out, _ = ring(local, is_causal=True)
    torch.testing.assert_close(out, ring.attention.shard(expected))
    for name, p in ring.state_dict().items():
        torch.testing.assert_close(p, single.state_dict()[name], rtol=0, atol=0)
    out.sum().backward()  # parameter grads are per-rank partial sums, as in data parallel
    assert local.grad is not None and torch.isfinite(local.grad).all()


def test_ring_multihead_matches_single_process():
    run_world(2, _multihead_worker)


def _uneven_shard_worker(rank, world):
    for layout in ("contiguous", "zigzag"):
        ring = RingDilatedAttention([8], [2], layout=layout)
        chunks = world * (2 if layout == "zigzag" else 1)
        with pytest.raises(ValueError, match=f"must be divisible by {chunks}.*pad the sequence"):
            ring.shard(torch.randn(1, 12 * world + 1, 2, 8))
        x = torch.randn(1, 12 * world, 2, 8, generator=torch.Generator().manual_seed(0))  # the same on every rank
        assert torch.equal(ring.unshard(ring.shard(x)), x)


def test_shard_never_drops_rows():
    run_world(2, _uneven_shard_worker)
    with pytest.raises(ValueError, match="must be divisible by 2"):
        RingDilatedAttention([8], [2], layout="zigzag").shard(torch.randn(1, 31, 2, 8))


def _local_failure_worker(rank, world, what):
    ring = RingDilatedAttention([8, 32], [1, 2], dropout=0.1 if what == "dropout" else 0.0)
    ring.train(what == "dropout" and rank == 1)
    x = torch.randn(1, 16, 2, 8)
    k = x.double() if what == "dtype" and rank == 1 else x
    if rank == 1:
        error = NotImplementedError if what == "dropout" else TypeError
        with pytest.raises(error, match="dropout" if what == "dropout" else "dtype of q"):
            ring(x, k, x)
    else:
        with pytest.raises(ValueError, match=r"rank\(s\) \[1\] of the group failed their input checks"):
            ring(x, k, x)


@pytest.mark.parametrize("what", ["dtype", "dropout"])
def test_a_rank_failing_its_checks_fails_every_rank_at_once(what):
    """The other ranks raise within the test's 20 s group timeout, not after it."""
    run_world(2, _local_failure_worker, what, timeout_s=20)
