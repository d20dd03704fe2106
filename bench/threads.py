"""OpenMP waiting policy: the time of one decoding step with worker threads that spin (``OMP_WAIT_POLICY`` unset,
libgomp's default), that sleep at once (``PASSIVE``), and that spin a bounded while first (``GOMP_SPINCOUNT``), with the cores free and
with another job (as many threads, busy with matrix products) on the same cores. Each measurement runs in its own interpreter (the policy is read when
torch starts OpenMP).

    python bench/threads.py                 # ~1 minute; prints one table
    python bench/threads.py --threads 2 --steps 48

The model is the benchmark's small GPT-2 (6 layers, d=384, 4,096-token vocabulary; built by bench/vs_trl.py, or
randomly initialised here when that cache is absent), 64 rows of 16-token prompts, KV cache.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import sys, time, torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel
torch.set_num_threads(int(sys.argv[1]))
steps = int(sys.argv[2])
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_layer=6, n_head=6, n_embd=384, n_positions=256)).eval()
B, P = 64, 16
ids, att = torch.randint(0, 4096, (B, P)), torch.ones(B, P, dtype=torch.long)

def decode(n):
    cache = DynamicCache()
    with torch.no_grad():
        pos = torch.arange(P)[None].expand(B, -1)
        model(input_ids=ids, attention_mask=att, position_ids=pos, past_key_values=cache, use_cache=True)
        a, p = att, pos[:, -1:]
        t0 = time.perf_counter()
        for _ in range(n):
            a = torch.cat([a, a.new_ones(B, 1)], 1)
            p = p + 1
            model(input_ids=torch.randint(0, 4096, (B, 1)), attention_mask=a, position_ids=p,
                  past_key_values=cache, use_cache=True)
        return (time.perf_counter() - t0) / n

decode(4)
print(1000 * decode(steps))
"""

COMPETITOR = r"""
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(512, 512)
while True:  # another job's matrix products on the same cores
    a @ a
"""


def step_ms(policy: dict[str, str], threads: int, steps: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_NUM_THREADS"] = str(threads)
    env.update(policy)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(threads), str(steps)], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    policies = {
        "spinning (unset)": {},
        "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
        "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
        "GOMP_SPINCOUNT=100000": {"GOMP_SPINCOUNT": "100000"},
    }
    rows = []
    for load in ("cores free", "another job on the cores"):
        competitor = None
        if load != "cores free":
            competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR, str(args.threads)])
            time.sleep(1.0)
        try:
            times: dict[str, list[float]] = {name: [] for name in policies}
            for _ in range(args.repeats):  # interleaved
                for name, policy in policies.items():
                    times[name].append(step_ms(policy, args.threads, args.steps))
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
        rows.append((load, {n: (statistics.median(t), min(t)) for n, t in times.items()}))
    print(f"one decoding step, 64 rows, small GPT-2, {args.threads} threads, ms: median (min) of {args.repeats}")
    print("| cores | " + " | ".join(policies) + " |")
    print("|---|" + "---|" * len(policies))
    for load, figures in rows:
        print(f"| {load} | " + " | ".join(f"{med:.1f} ({low:.1f})" for med, low in figures.values()) + " |")


if __name__ == "__main__":
    main()
