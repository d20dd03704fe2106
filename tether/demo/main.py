"""``tether demo``: the embedded end-to-end example."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tether.demo.quick import run_quick


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tether demo", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="the tiny toy task (under a minute, no downloads)"
    )
    parser.add_argument("--output-dir", "--output_dir", default="runs/demo", help="run directory")
    parser.add_argument("--steps", type=int, default=40, help="PPO steps")
    parser.add_argument("--no-kl", action="store_true", help="train with the KL coefficient at 0")
    args = parser.parse_args(list(argv) if argv is not None else None)
    run_quick(args.output_dir, steps=args.steps, kl_coef=0.0 if args.no_kl else 0.05)
    print(f"\nrun directory: {args.output_dir}")
    return 0
