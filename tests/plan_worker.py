"""Run by tests/test_plan.py in a fresh process: ``python plan_worker.py SPEC.json OUT.json``.

SPEC holds ``model`` (a directory with its tokenizer), ``algo`` (ppo or grpo) and ``config`` (fields of the
trainer's config). The worker trains that run and writes the peak resident memory the run added to the process:
its peak resident memory (VmHWM) minus the RSS right before the trainer is built, after every import.
"""

from __future__ import annotations

import gc
import json
import random
import sys
from pathlib import Path

import torch

from tether.config import from_dict
from tether.trainers.grpo import GRPOConfig, GRPOTrainer
from tether.trainers.ppo import PPOConfig, PPOTrainer


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now; VmHWM: the peak of this program)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def length_reward(prompts: list[str], responses: list[str], **columns: object) -> list[float]:
    return [len(r) / 100 for r in responses]


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(2)
    config_cls, trainer_cls = (PPOConfig, PPOTrainer) if spec["algo"] == "ppo" else (GRPOConfig, GRPOTrainer)
    config = from_dict(config_cls, spec["config"])
    words = [
        w
        for w in json.loads((Path(spec["model"]) / "tokenizer.json").read_text())["model"]["vocab"]
        if w.startswith("w")
    ]
    rng = random.Random(0)
    # Every prompt is max_prompt_length tokens (one word each), the length the estimate plans for.
    prompts = Path(out_path).with_suffix(".prompts.jsonl")
    rows = [
        {"prompt": " ".join(rng.choice(words) for _ in range(config.max_prompt_length))} for _ in range(32)
    ]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    gc.collect()
    before = status_bytes("VmRSS")
    trainer = trainer_cls(config, policy=spec["model"], reward=length_reward, prompts=str(prompts))
    trainer.train()
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec, so a worker
    # started by a pytest process that has grown to 2 GiB would report 2 GiB whatever it used itself.
    peak = status_bytes("VmHWM")
    Path(out_path).write_text(json.dumps({"before": before, "peak": peak, "increase": peak - before}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
