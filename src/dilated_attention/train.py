"""Train a byte-level LongNetLM on text every machine has: the Python standard library's sources.

    python -m dilated_attention train --max-steps 150 --out runs/first
    python -m dilated_attention train --max-steps 300 --out runs/first --resume   # continue

Every ``--eval-every`` steps: one JSON line in ``OUT/metrics.jsonl`` (step, train_loss,
val_loss, tokens_per_s), a checkpoint ``OUT/checkpoint.pt`` (model, optimizer, step, data
position) and ``OUT/loss.png`` (with matplotlib). Held-out files: every tenth source file.
"""

from __future__ import annotations

import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch

from .model import LongNetLM


def stdlib_corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) uint8 byte tensors from the standard library's .py files (every tenth file held out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    if not files:
        raise RuntimeError(f"no Python sources found under {root}")
    parts = ([], [])
    for i, path in enumerate(files):
        try:
            parts[i % 10 == 0].append(path.read_bytes())
        except OSError:
            continue
    train, val = (torch.frombuffer(bytearray(b"\n".join(p)), dtype=torch.uint8) for p in parts)
    return train, val


def batch(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """Random windows: inputs and next-byte targets, (batch, seq_len) int64 each."""
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
    windows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


def loss_of(model, inputs, targets, bf16: bool = False) -> torch.Tensor:
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(inputs)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


@torch.no_grad()
def evaluate(model, data, args, device) -> float:
    model.eval()
    g = torch.Generator().manual_seed(1234)  # the same held-out windows every time
    losses = [loss_of(model, *(t.to(device) for t in batch(data, args.batch_size, args.seq_len, g)), args.bf16).item()
              for _ in range(args.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


def plot(metrics: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [m["step"] for m in metrics]
    ax.plot([m["step"] for m in metrics if m["train_loss"] is not None],
            [m["train_loss"] for m in metrics if m["train_loss"] is not None], "-o", label="train")
    ax.plot(steps, [m["val_loss"] for m in metrics], "-s", label="held out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run(args) -> list[dict]:
    """Train as ``args`` say; returns the metrics of every evaluation."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    train, val = stdlib_corpus()
    model = LongNetLM(256, args.embed_dim, args.layers, args.heads, args.segment_lengths, args.dilation_rates,
                      num_kv_heads=args.kv_heads, dropout=args.dropout).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    step, metrics, generator = 0, [], torch.Generator().manual_seed(args.seed)
    checkpoint = out / "checkpoint.pt"
    if args.resume:
        if not checkpoint.exists():
            raise ValueError(f"--resume: no checkpoint at {checkpoint}")
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)  # loading moves tensors to the model
        if state["config"] != model.config:
            raise ValueError(f"--resume: the checkpoint's model {state['config']} differs from the options' {model.config}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, metrics = state["step"], state["metrics"]
        generator.set_state(state["generator"])
    metrics_file = out / "metrics.jsonl"
    if step == 0:  # where the held-out loss starts
        metrics_file.unlink(missing_ok=True)
        start = dict(step=0, train_loss=None, val_loss=evaluate(model, val, args, device), tokens_per_s=None, lr=0.0)
        metrics.append(start)
        with open(metrics_file, "a") as f:
            f.write(json.dumps(start) + "\n")
    tokens, started, running = 0, time.perf_counter(), []
    while step < args.max_steps:
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.max_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        inputs, targets = (t.to(device) for t in batch(train, args.batch_size, args.seq_len, generator))
        loss = loss_of(model, inputs, targets, args.bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += inputs.numel()
        running.append(loss.item())
        speed = tokens / (time.perf_counter() - started)
        print(f"\rstep {step}/{args.max_steps} | loss {running[-1]:.3f} | {speed:,.0f} tokens/s", end="",
              file=sys.stderr, flush=True)
        if step % args.eval_every == 0 or step == args.max_steps:
            record = dict(step=step, train_loss=sum(running) / len(running), val_loss=evaluate(model, val, args, device),
                          tokens_per_s=speed, lr=lr)
            running = []
            metrics.append(record)
            with open(metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            torch.save(dict(model=model.state_dict(), optimizer=opt.state_dict(), step=step, metrics=metrics,
                            config=model.config, generator=generator.get_state()), checkpoint)
            plot(metrics, out / "loss.png")
            print(f"\rstep {step}/{args.max_steps} | train {record['train_loss']:.3f} | held-out "
                  f"{record['val_loss']:.3f} | {speed:,.0f} tokens/s", file=sys.stderr, flush=True)
    return metrics


def add_arguments(p) -> None:
    p.add_argument("--max-steps", type=int, default=150, help="optimizer steps to train to (default 150)")
    p.add_argument("--out", default="runs/longnet", help="directory for metrics.jsonl, checkpoint.pt, loss.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--seq-len", type=int, default=512, help="tokens (bytes) per training sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--embed-dim", type=int, default=128, help="model width")
    p.add_argument("--layers", type=int, default=3, help="decoder layers")
    p.add_argument("--heads", type=int, default=4, help="query heads")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA; default: --heads)")
    p.add_argument("--segment-lengths", type=int, nargs="+", default=[64, 128, 256, 512], help="dilated attention's w")
    p.add_argument("--dilation-rates", type=int, nargs="+", default=[1, 2, 4, 8], help="dilated attention's r")
    p.add_argument("--dropout", type=float, default=0.0, help="residual and feed-forward dropout")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, cosine, linear warm-up)")
    p.add_argument("--warmup", type=int, default=20, help="warm-up steps")
    p.add_argument("--eval-every", type=int, default=25, help="steps between evaluations and checkpoints")
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches per evaluation")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the data order")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA: the fused Triton kernels)")
