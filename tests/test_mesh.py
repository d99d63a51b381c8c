"""RingDistributedDilatedAttention over gloo meshes: each rank's shard equals the single-process result."""

import pytest
import torch

from distributed import run_world

from dilated_attention import dilated_attention

MESHES = {"ring2xheads2": ((2, 2), ("ring", "heads")), "ring4": ((4,), ("ring",)), "heads4": ((4,), ("heads",))}


def _mesh(shape, names):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def _exactness_worker(rank, world, mesh_name):
    from dilated_attention import RingDistributedDilatedAttention

    mesh = _mesh(*MESHES[mesh_name])
    b, n, h, d = 2, 48, 4, 8
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(b, n, h, d, generator=g, dtype=torch.float64) for _ in range(4))
    for segs, rates, layout in (([5, 12, 40], [1, 2, 3], "contiguous"), ([8, 20, 96], [1, 3, 4], "zigzag")):
        for mode in ("paper", "head_groups"):
            for causal in (False, True):
                full = [t.clone().requires_grad_() for t in (q, k, v)]
                expected = dilated_attention(*full, segs, rates, is_causal=causal, mode=mode)
                expected_grads = torch.autograd.grad(expected, full, dout)
                attn = RingDistributedDilatedAttention(segs, rates, device_mesh=mesh, mode=mode, layout=layout)
                local = [attn.shard(t).requires_grad_() for t in (q, k, v)]
                out = attn(*local, is_causal=causal)
                grads = torch.autograd.grad(out, local, attn.shard(dout))
                where = f"rank {rank} {mesh_name} {mode} causal={causal} {layout}"
                tol = dict(rtol=1e-10, atol=1e-10)
                torch.testing.assert_close(out, attn.shard(expected), **tol, msg=lambda m: f"out {where}: {m}")
                for name, a, e in zip("qkv", grads, expected_grads):
                    torch.testing.assert_close(a, attn.shard(e), **tol, msg=lambda m: f"d{name} {where}: {m}")
                torch.testing.assert_close(attn.unshard(out.detach()), expected.detach(), **tol)
    assert attn.comm_bytes["forward"] > 0
    # GQA: 8 query heads over 4 k/v heads (each heads rank holds whole k/v heads)
    q8, dout8 = (torch.randn(b, n, 8, d, generator=g, dtype=torch.float64) for _ in range(2))
    full = [t.clone().requires_grad_() for t in (q8, k, v)]
    expected = dilated_attention(*full, [5, 12, 40], [1, 2, 3], is_causal=True)
    expected_grads = torch.autograd.grad(expected, full, dout8)
    attn = RingDistributedDilatedAttention([5, 12, 40], [1, 2, 3], device_mesh=mesh)
    local = [attn.shard(t).requires_grad_() for t in (q8, k, v)]
    out = attn(*local, is_causal=True)
    grads = torch.autograd.grad(out, local, attn.shard(dout8))
    torch.testing.assert_close(out, attn.shard(expected), rtol=1e-10, atol=1e-10)
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, attn.shard(e), rtol=1e-10, atol=1e-10)
    # and a key padding mask, sharded like the sequence
    mask = torch.rand(b, n, generator=g) < 0.4
    mask[1, :30] = True
    expected = dilated_attention(*full, [5, 12, 40], [1, 2, 3], is_causal=True, key_padding_mask=mask)
    expected_grads = torch.autograd.grad(expected, full, dout8)
    out = attn(*local, is_causal=True, key_padding_mask=attn.shard(mask))
    grads = torch.autograd.grad(out, local, attn.shard(dout8))
    torch.testing.assert_close(out, attn.shard(expected), rtol=1e-10, atol=1e-10)
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, attn.shard(e), rtol=1e-10, atol=1e-10)
    # and packed documents (global boundaries on every rank)
    bounds = torch.tensor([0, 5, 29, 30, n], dtype=torch.int32)
    expected = dilated_attention(*full, [5, 12, 40], [1, 2, 3], is_causal=True, cu_seqlens=bounds)
    expected_grads = torch.autograd.grad(expected, full, dout8)
    out = attn(*local, is_causal=True, cu_seqlens=bounds)
    grads = torch.autograd.grad(out, local, attn.shard(dout8))
    torch.testing.assert_close(out, attn.shard(expected), rtol=1e-10, atol=1e-10)
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, attn.shard(e), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_mesh_matches_single_process(mesh_name):
    run_world(4, _exactness_worker, mesh_name)


def _errors_worker(rank, world):
    from dilated_attention import RingDistributedDilatedAttention

    mesh = _mesh((2, 2), ("ring", "heads"))
    attn = RingDistributedDilatedAttention([8], [1], device_mesh=mesh)
    x = torch.randn(1, 8, 3, 8)  # 3 heads over 2 heads ranks
    with pytest.raises(ValueError, match="3 heads of q must divide evenly over the mesh.s .heads. dimension of 2"):
        attn(x, x, x)
    with pytest.raises(ValueError, match="must be divisible by 4"):
        attn.shard(torch.randn(1, 30, 4, 8))
    y = torch.randn(1, 8, 4, 8)
    mine = y[:, :4] if rank == 3 else y  # one rank with a different shard length
    with pytest.raises(ValueError, match="disagree"):
        attn(mine, mine, mine)
    with pytest.raises(ValueError, match="named 'ring' and/or 'heads'"):
        RingDistributedDilatedAttention([8], [1], device_mesh=_mesh((4,), ("cp",)))


def test_mesh_errors_reach_every_rank():
    run_world(4, _errors_worker, timeout_s=30)


def _ddp_worker(rank, world):
    """DDP over the whole (data 2 x ring 2) mesh: the mean loss of each rank's tokens gives the batch's gradient."""
    from torch.nn.parallel import DistributedDataParallel

    from dilated_attention import MultiheadDilatedAttention, RingDistributedMultiheadDilatedAttention

    mesh = _mesh((2, 2), ("data", "ring"))
    segs, rates, e, n = [6, 20], [1, 2], 16, 24
    torch.manual_seed(0)
    single = MultiheadDilatedAttention(e, 4, segs, rates, dtype=torch.float64)
    torch.manual_seed(rank)  # DDP's construction broadcast makes every rank's parameters rank 0's
    model = RingDistributedMultiheadDilatedAttention(e, 4, segs, rates, device_mesh=mesh["ring"], dtype=torch.float64)
    if rank == 0:
        model.load_state_dict(single.state_dict())
    ddp = DistributedDataParallel(model)
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(2, 1, n, e, generator=g, dtype=torch.float64)  # one sequence per data replica
    data_rank = mesh.get_local_rank("data")
    x = model.attention.shard(batch[data_rank])
    out, _ = ddp(x, is_causal=True)
    (out**2).mean().backward()
    loss = sum((single(batch[i], is_causal=True)[0] ** 2).mean() for i in range(2)) / 2
    loss.backward()
    for name, p in ddp.module.named_parameters():
        torch.testing.assert_close(p.grad, dict(single.named_parameters())[name].grad, rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f"{name} rank {rank}: {m}")


def test_ddp_over_data_and_ring():
    run_world(4, _ddp_worker)


def _fsdp_worker(rank, world):
    """FSDP2 ``fully_shard`` over the whole (data 2 x ring 2) mesh, the same gradients as one process."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard

    from dilated_attention import MultiheadDilatedAttention, RingDistributedMultiheadDilatedAttention

    mesh = _mesh((2, 2), ("data", "ring"))
    segs, rates, e, n = [6, 20], [1, 2], 16, 24
    torch.manual_seed(0)
    single = MultiheadDilatedAttention(e, 4, segs, rates, dtype=torch.float64)
    model = RingDistributedMultiheadDilatedAttention(e, 4, segs, rates, device_mesh=mesh["ring"], dtype=torch.float64)
    model.load_state_dict(single.state_dict())
    model.sync_parameters()  # before sharding: parameters are then DTensors
    fully_shard(model, mesh=_mesh((world,), ("dp_cp",)))  # shard and reduce over every rank of the mesh
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(2, 1, n, e, generator=g, dtype=torch.float64)
    x = model.attention.shard(batch[mesh.get_local_rank("data")])
    out, _ = model(x, is_causal=True)
    (out**2).mean().backward()
    loss = sum((single(batch[i], is_causal=True)[0] ** 2).mean() for i in range(2)) / 2
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), dict(single.named_parameters())[name].grad,
                                   rtol=1e-10, atol=1e-10, msg=lambda m: f"{name} rank {rank}: {m}")


def test_fsdp2_over_data_and_ring():
    run_world(4, _fsdp_worker)
