"""LongNetLM and the train command: decoding equals the full forward; training writes what it promises."""

import json

import pytest
import torch

from dilated_attention import LongNetLM
from dilated_attention.__main__ import main


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_cached_decoding_equals_the_full_forward(num_kv_heads):
    torch.manual_seed(0)
    model = LongNetLM(256, 32, 2, 4, [8, 16, 32], [1, 2, 4], num_kv_heads=num_kv_heads).double().eval()
    tokens = torch.randint(0, 256, (2, 41))
    full = model(tokens)
    caches = model.new_caches(2, 41)
    steps = [model(tokens[:, :17], caches)] + [model(tokens[:, i : i + 1], caches) for i in range(17, 41)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)
    greedy = model.generate(tokens[:, :5], 6, temperature=0)
    assert greedy.shape == (2, 11) and torch.equal(greedy[:, :5], tokens[:, :5])
    # greedy decoding: each new token is the argmax of the full forward over what came before
    torch.testing.assert_close(model(greedy[:, :-1])[:, 4:].argmax(-1), greedy[:, 5:], rtol=0, atol=0)


def test_train_command_writes_metrics_checkpoint_plot_and_resumes(tmp_path, capsys):
    args = ["train", "--max-steps", "4", "--eval-every", "2", "--seq-len", "64", "--batch-size", "2",
            "--embed-dim", "32", "--layers", "1", "--heads", "2", "--segment-lengths", "16", "32", "64",
            "--dilation-rates", "1", "2", "4", "--eval-batches", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert all({"step", "train_loss", "val_loss", "tokens_per_s"} <= set(r) for r in rows)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]  # learning already
    assert (tmp_path / "checkpoint.pt").exists() and (tmp_path / "loss.png").stat().st_size > 0
    args[args.index("4")] = "6"
    assert main(args + ["--resume"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4, 6]


def test_bad_options_give_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--max-steps", "many"])
    assert e.value.code == 2 and "invalid int value" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--segment-lengths", "8", "16", "--dilation-rates", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "segment_lengths and dilation_rates must have the same length" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        main(["train", "--resume", "--out", str(tmp_path / "nothing")])
    assert e.value.code == 2 and "no checkpoint" in capsys.readouterr().err


def test_verify_command_passes_on_this_installation(capsys):
    assert main(["verify"]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out and "FAIL" not in out and out.count("PASS") >= 4


def test_bench_command_writes_table_json_and_plot(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--seq-lens", "256", "512", "--heads", "2", "--head-dim", "16", "--segment-lengths", "64",
                 "128", "--dilation-rates", "1", "2", "--budget-s", "0.01", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["results"]
    assert {r["method"] for r in rows} == {"paper", "dense"} and {r["n"] for r in rows} == {256, 512}
    assert (tmp_path / "bench.png").stat().st_size > 0 and "tokens/s" in capsys.readouterr().out


def _model_ring_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ring",))
    kw = dict(num_kv_heads=2, layout="zigzag")
    torch.manual_seed(0)
    single = LongNetLM(256, 32, 2, 4, [8, 16, 64], [1, 2, 4], **kw).double()
    model = LongNetLM(256, 32, 2, 4, [8, 16, 64], [1, 2, 4], device_mesh=mesh, **kw).double()
    model.load_state_dict(single.state_dict())
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (2, 48), generator=g)
    weights = torch.randn(2, 48, 256, generator=g, dtype=torch.float64)
    expected = single(tokens)
    (expected * weights).sum().backward()
    logits = model(model.shard(tokens))
    torch.testing.assert_close(logits, model.shard(expected), rtol=1e-10, atol=1e-10)
    (logits * model.shard(weights)).sum().backward()
    for name, p in model.named_parameters():  # each rank's partial gradients sum to the whole sequence's
        torch.distributed.all_reduce(p.grad)
        torch.testing.assert_close(p.grad, dict(single.named_parameters())[name].grad, rtol=1e-9, atol=1e-9)
    # DDP and FSDP2 over the ring's ranks reduce the same gradients (averaged: x world)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    for wrap in ("ddp", "fsdp"):
        fresh = LongNetLM(256, 32, 2, 4, [8, 16, 64], [1, 2, 4], device_mesh=mesh, **kw).double()
        fresh.load_state_dict(single.state_dict())
        if wrap == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(fresh)
        else:
            for layer in fresh.layers:
                layer.attn.sync_parameters()
                fully_shard(layer, mesh=mesh)
            wrapped = fully_shard(fresh, mesh=mesh)
        (wrapped(fresh.shard(tokens)) * fresh.shard(weights)).sum().backward()
        for name, p in fresh.named_parameters():
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            torch.testing.assert_close(grad * world, dict(single.named_parameters())[name].grad, rtol=1e-9, atol=1e-9,
                                       msg=lambda m: f"{wrap} {name}: {m}")


def test_model_over_a_ring_matches_one_process():
    from distributed import run_world

    run_world(2, _model_ring_worker)


def test_model_compiles():
    torch.manual_seed(0)
    model = LongNetLM(256, 32, 2, 4, [8, 16, 32], [1, 2, 4], num_kv_heads=2)
    tokens = torch.randint(0, 256, (2, 40))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(tokens), model(tokens))


def test_demo_and_bench_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--segment-lengths", "8", "--dilation-rates", "16", "--seq-lens", "64"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "dilation_rates[0] = 16 exceeds segment_lengths[0] = 8" in err and "Traceback" not in err


def test_bench_plot_takes_zero_memory_readings(tmp_path):
    """A CPU child process can read no extra memory at small n: the plot falls back to a linear axis."""
    from dilated_attention.bench import plot

    rows = [dict(method=m, n=n, ms=1.0 + n / 256, extra_peak_gib=0.0) for m in ("paper", "dense") for n in (256, 512)]
    assert plot(rows, str(tmp_path / "p.png"), "zeros") and (tmp_path / "p.png").stat().st_size > 0
