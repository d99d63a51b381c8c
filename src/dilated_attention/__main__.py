"""``python -m dilated_attention`` / ``dilated-attention``: train, verify, demo and bench from one command line."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dilated-attention", description="Exact dilated attention (LongNet) for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,verify,demo,bench}")
    from . import train, verify

    train.add_arguments(sub.add_parser("train", help="train a byte-level LongNetLM on the standard library's sources",
                                       description=train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    sub.add_parser("verify", help="check this installation against float64 (CPU, GPU if present, a 2-process ring)",
                   description=verify.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_parser("demo", help="the README's main job: dilated attention over 64K tokens, checked against float64",
                   add_help=False)
    sub.add_parser("bench", help="time and memory against dense attention (table and JSON)", add_help=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in ("demo", "bench"):  # these keep their own options
            __import__(f"dilated_attention.{argv[0]}", fromlist=["main"]).main(argv[1:])
            return 0
        args = p.parse_args(argv)
        if args.command == "verify":
            return 0 if verify.run() else 1
        metrics = train.run(args)
    except (ValueError, TypeError, RuntimeError) as e:  # a user's mistake: one line, no traceback
        p.exit(2, f"dilated-attention: error: {e}\n")
    last = metrics[-1] if metrics else None
    if last:
        print(f"held-out loss {metrics[0]['val_loss']:.3f} -> {last['val_loss']:.3f} nats/byte over {last['step']} steps; "
              f"metrics in {args.out}/metrics.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
