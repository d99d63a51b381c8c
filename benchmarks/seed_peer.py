"""The seed project's DilatedAttention (head-group mode) timed beside ours, from its public source.

    python benchmarks/seed_peer.py --seed-path DIR [dilated_attention.bench options]

DIR holds the seed project's ``dilated_attention_pytorch`` package (DarcStar-Solutions-Tech/
dilated-attention-pytorch, its public source; never part of this repository), e.g.

    git clone https://github.com/DarcStar-Solutions-Tech/dilated-attention-pytorch /tmp/seed
    mkdir -p .peers && cp -r /tmp/seed/dilated_attention_pytorch .peers/   # .peers/ is git-ignored

 Its package
``__init__`` imports optional extras, so only ``dilated_attention_pytorch.dilated_attention``
is loaded. Before timing, its output is compared with ours in head_groups mode (the
semantics it computes) on a small input; then ``--modes ... seed`` times it as method
``seed`` with head_groups FLOPs.
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from dilated_attention import bench, dilated_attention  # noqa: E402


def load_seed(path: str):
    package = types.ModuleType("dilated_attention_pytorch")
    package.__path__ = [os.path.join(path, "dilated_attention_pytorch")]
    sys.modules["dilated_attention_pytorch"] = package
    from dilated_attention_pytorch.dilated_attention import DilatedAttention

    return DilatedAttention


def check_agreement(seed_cls, device: str, dtype: torch.dtype) -> None:
    segs, rates = [64, 128, 256], [1, 2, 4]
    q, k, v = (torch.randn(1, 512, 6, 64, device=device, dtype=dtype) for _ in range(3))
    for causal in (False, True):
        theirs = seed_cls(segs, rates)(q, k, v, is_causal=causal)
        ours = dilated_attention(q, k, v, segs, rates, is_causal=causal, mode="head_groups")
        exact = dilated_attention(*(t.double() for t in (q, k, v)), segs, rates, is_causal=causal, mode="head_groups")
        err = lambda a: ((a.double() - exact).norm() / exact.norm()).item()  # noqa: E731
        print(f"seed vs float64 head_groups, causal={causal}: seed {err(theirs):.2e}, ours {err(ours):.2e}")
        if err(theirs) > 1e-2:
            raise SystemExit("the seed's DilatedAttention does not compute head_groups attention here")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed-path", required=True)
    args, rest = p.parse_known_args()
    seed_cls = load_seed(args.seed_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_agreement(seed_cls, device, torch.bfloat16 if device == "cuda" else torch.float32)
    instances = {}

    def seed_attend(q, k, v, cfg):
        key = (tuple(cfg["segment_lengths"]), tuple(cfg["dilation_rates"]))
        if key not in instances:
            instances[key] = seed_cls(*key).to(q.device)
        return instances[key](q, k, v, is_causal=cfg["causal"])

    bench.EXTERNAL["seed"] = ("head_groups", seed_attend)
    bench.main(rest)


if __name__ == "__main__":
    main()
