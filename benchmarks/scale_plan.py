"""The plan for very long sequences, on paper: per-GPU memory, bytes per rank and step time of one
attention layer (forward+backward) for ring-only, heads-only and hybrid meshes.

    python benchmarks/scale_plan.py --out docs      # writes scale-plan.json, scale-plan.png, prints the table

Every count comes from the code's own rules and every rate from benchmarks/results/h100x4/:
- schedule: LongNet's geometric one, w = 2048 * 4^k, r = 2^k for every w <= n (6 branches at 1M);
- FLOPs: ``plan.useful_flops`` x 3.5 for forward+backward, at the measured single-GPU rate
  (mesh-1m.json: one H100 running 1M tokens of this schedule, bf16, d = 64);
- ring bytes: a branch whose segments span s shards sends its residue rows (1/r of the shard,
  k and v) to the s - 1 ranks sharing each segment; backward sends them again and returns
  dK/dV in fp32: 4x the forward bytes in all (matches the measured 120 / 360 MiB at 1M on 4 GPUs);
- heads bytes: all-to-alls of q, k, v in and out back, (H-1)/H of each, forward and backward
  (matches the measured 1152 / 1152 MiB);
- memory: bytes of one local bf16 tensor x the measured peak ratio of each mesh (mesh-1m.json),
  plus q, k, v;
- links: NVLink inside a node of 8 GPUs (300 GB/s per GPU for all-to-all and P2P, below the
  355 GB/s all-reduce bus bandwidth measured on 4 H100s), InfiniBand across nodes (50 GB/s per
  GPU: one 400 Gb/s NIC per GPU). Step time = compute + communication (no overlap: an upper
  bound; the ring overlaps its next exchange with compute, so the truth lies between this and
  the larger of the two).
Model: h = 16 heads of d = 64 (heads-only and the hybrid's heads dimension need H | h).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from dilated_attention.plan import useful_flops  # noqa: E402

HERE = os.path.dirname(__file__)
H, D, BYTES = 16, 64, 2
NODE = 8
NVLINK, IB = 300e9, 50e9
GPUS = [8, 64, 512, 4096]
SEQS = [1 << 20, 1 << 24, 1 << 27, 1 << 30]
HBM = 80 * 2**30


def schedule(n):
    segs, rates, w, r = [], [], 2048, 1
    while w <= n:
        segs.append(w)
        rates.append(r)
        w, r = w * 4, r * 2
    return segs, rates


def measured():
    with open(os.path.join(HERE, "results", "h100x4", "mesh-1m.json")) as f:
        run = json.load(f)
    rows = {(r["mesh"], r["causal"]): r for r in run["rows"]}
    single = rows[("ring4", False)]
    n = single["n"]
    rate = 3.5 * useful_flops(n, 12, 64, [2048, 8192, 32768, 131072, 524288, 1048576], [1, 2, 4, 8, 16, 32]) / (
        single["single_fwdbwd_ms"] / 1e3)
    tensor = n // 4 * 12 * 64 * BYTES  # one local bf16 tensor of that run
    ratio = {name: rows[(key, False)]["peak_extra_GiB"] * 2**30 / tensor
             for name, key in (("ring", "ring4"), ("heads", "heads4"), ("hybrid", "ring2xheads2"))}
    return rate, ratio


def ring_bytes(n, ranks, heads):
    """Bytes one rank sends in forward+backward of one layer (non-causal, contiguous layout)."""
    m = n // ranks
    fwd = 0
    for w, r in zip(*schedule(n)):
        span = min(w, n) // m
        if span > 1:
            fwd += (span - 1) * (m // r) * heads * D * BYTES * 2  # k and v
    return 4 * fwd  # forward; backward resends k, v and returns fp32 dK, dV


def heads_bytes(n, gpus, group):
    return 8 * (n // gpus) * H * D * BYTES * (group - 1) / group  # q, k, v, out; forward and backward


def plan(rate, ratio):
    rows = []
    for gpus in GPUS:
        for n in SEQS:
            compute = 3.5 * useful_flops(n, H, D, *schedule(n)) / gpus / rate
            tensor = n // gpus * H * D * BYTES
            hybrid_heads = NODE if gpus > NODE else gpus // 2  # heads inside a node, the ring across nodes
            meshes = {"ring": (gpus, 1), "heads": (1, gpus), "hybrid": (gpus // hybrid_heads, hybrid_heads)}
            for name, (ring, heads) in meshes.items():
                if H % heads:
                    rows.append(dict(gpus=gpus, n=n, mesh=name, ring=ring, heads=heads, fits=False,
                                     note=f"{heads} heads ranks do not divide h = {H}"))
                    continue
                ring_b = ring_bytes(n, ring, H // heads) if ring > 1 else 0
                heads_b = heads_bytes(n, gpus, heads) if heads > 1 else 0
                ring_bw = NVLINK if gpus <= NODE else IB  # ring neighbours across nodes for long segments
                heads_bw = NVLINK if heads <= NODE else IB
                comm = ring_b / ring_bw + heads_b / heads_bw
                memory = (ratio[name] + 3) * tensor
                rows.append(dict(gpus=gpus, n=n, mesh=name, ring=ring, heads=heads, compute_s=compute, comm_s=comm,
                                 step_s=compute + comm, bytes_per_rank=ring_b + heads_b, memory_GiB=memory / 2**30,
                                 fits=memory <= HBM))
    return rows


def figure(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"ring": "-o", "heads": "--s", "hybrid": ":^"}
    colors = dict(zip(GPUS, ["C0", "C1", "C2", "C3"]))
    for r in rows:
        r.setdefault("step_s", None)
    for gpus in GPUS:
        for mesh, style in styles.items():
            pts = [r for r in rows if r["gpus"] == gpus and r["mesh"] == mesh and r.get("compute_s") is not None]
            if not pts:
                continue
            xs = [r["n"] for r in pts]
            label = f"{gpus} GPUs, {mesh}"
            axes[0].plot(xs, [r["step_s"] * 1e3 for r in pts], style, color=colors[gpus], label=label)
            axes[1].plot(xs, [r["bytes_per_rank"] / 2**20 + 1e-3 for r in pts], style, color=colors[gpus])
            axes[2].plot(xs, [r["memory_GiB"] for r in pts], style, color=colors[gpus])
    axes[2].axhline(80, color="k", lw=0.8)
    axes[2].text(SEQS[0], 95, "80 GB H100", fontsize=8)
    titles = ["step time per layer, fwd+bwd (ms, upper bound)", "bytes sent per rank per layer (MiB)",
              "memory per GPU for one layer (GiB)"]
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="docs")
    args = p.parse_args()
    rate, ratio = measured()
    rows = plan(rate, ratio)
    print(f"measured: {rate / 1e12:.0f} useful TFLOP/s per H100 (fwd+bwd), peak/tensor ratios "
          + ", ".join(f"{k} {v:.1f}" for k, v in ratio.items()))
    print("| GPUs | n | mesh (ring x heads) | compute ms | comm ms | step ms | MiB sent / rank | GiB / GPU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        n = f"{r['n'] >> 20}M" if r["n"] < 1 << 30 else "1B"
        if r.get("compute_s") is None:
            print(f"| {r['gpus']} | {n} | {r['mesh']} | - | - | - | - | {r['note']} |")
            continue
        mem = f"{r['memory_GiB']:.1f}" + ("" if r["fits"] else " (does not fit)")
        print(f"| {r['gpus']} | {n} | {r['mesh']} ({r['ring']} x {r['heads']}) | {r['compute_s'] * 1e3:.1f} | "
              f"{r['comm_s'] * 1e3:.1f} | {r['step_s'] * 1e3:.1f} | {r['bytes_per_rank'] / 2**20:.0f} | {mem} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scale-plan.json"), "w") as f:
        json.dump(dict(rate_flops=rate, peak_ratio=ratio, rows=rows), f, indent=1)
    figure(rows, os.path.join(args.out, "scale-plan.png"))


if __name__ == "__main__":
    main()
