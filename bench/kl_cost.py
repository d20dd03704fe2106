"""Cost of the KL estimators in a rollout: k1 / k3 (reference) vs the exact ``full`` KL.

Each variant runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own. The model is a
2-layer GPT-2 with GPT-2's real vocabulary size (50257), where the [B, T, V] logits dominate memory.

    python bench/kl_cost.py [--batch 16] [--tokens 64] [--repeats 3]

Prints one row per variant with the rollout time and peak memory side by side with k1's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = ("k1", "k3", "full", "full-unchunked")


def _child(variant: str, batch: int, tokens: int, repeats: int) -> dict[str, float]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tether.kl import KL_ESTIMATORS, kl_full
    from tether.logprobs import response_logits, selective_log_softmax

    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = GPT2Config(vocab_size=50257, n_positions=256, n_embd=128, n_layer=2, n_head=4)
    policy, ref = GPT2LMHeadModel(config).eval(), GPT2LMHeadModel(config).eval()
    P = 8
    ids = torch.randint(0, 50257, (batch, P + tokens))
    att = torch.ones_like(ids)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            logits = response_logits(policy, ids, att, P)
            ref_logits = response_logits(ref, ids, att, P)
            if variant in ("k1", "k3"):
                lp = selective_log_softmax(logits, ids[:, P:])
                ref_lp = selective_log_softmax(ref_logits, ids[:, P:])
                kl = KL_ESTIMATORS[variant](lp, ref_lp)
            elif variant == "full":
                kl = kl_full(logits, ref_logits)
            else:  # the naive way: both full log-softmaxes at once
                logp, logq = torch.log_softmax(logits.float(), -1), torch.log_softmax(ref_logits.float(), -1)
                kl = (logp.exp() * (logp - logq)).sum(-1)
            float(kl.sum())
            times.append(time.perf_counter() - t0)
            del logits, ref_logits, kl
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"time_s": min(times), "peak_mib": peak / 1024, "model_mib": base_rss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.batch, args.tokens, args.repeats)))
        return
    rows = {}
    for variant in VARIANTS:
        out = subprocess.run(
            [sys.executable, __file__, "--child", variant, "--batch", str(args.batch), "--tokens", str(args.tokens),
             "--repeats", str(args.repeats)],
            check=True, capture_output=True, text=True,
        )
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    ref = rows["k1"]
    logits_mib = args.batch * args.tokens * 50257 * 4 / 2**20
    print(f"rollout forwards of policy + reference, B={args.batch}, T={args.tokens}, V=50257 "
          f"(one [B,T,V] fp32 logits tensor = {logits_mib:.0f} MiB); best of {args.repeats}")
    print(f"{'estimator':<16}{'time (s)':>10}{'vs k1':>8}{'peak RSS (MiB)':>16}{'vs k1 (MiB)':>13}")
    for variant, row in rows.items():
        print(f"{variant:<16}{row['time_s']:>10.3f}{row['time_s'] / ref['time_s']:>7.2f}x"
              f"{row['peak_mib']:>16.0f}{row['peak_mib'] - ref['peak_mib']:>+13.0f}")


if __name__ == "__main__":
    main()
