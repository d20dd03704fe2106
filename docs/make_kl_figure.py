"""Reproduce the Training FAQ's negative-KL problem on the toy task and draw docs/kl_negative.png.

Three runs of the same task — a reward of 1 for stopping at the first position where EOS is allowed,
with EOS suppressed for the first 8 tokens (``min_new_tokens=8``):

1. "unguarded k1": what a library without tether's guard does (TRL's default estimator, generate() with
   min_new_tokens, PPO ratio on the unwarped distribution). tether refuses this configuration; the guard is
   switched off here on purpose.
2. "tether allow_biased + full": the opt-in path: ratio under the warped distribution, exact KL.
3. "pure sampling k1": the FAQ's safe settings (no min_new_tokens), for reference.

Every run logs the exact KL of its rollouts (kl.log_exact) beside the estimate its reward uses.

    python docs/make_kl_figure.py        # ~2-3 minutes on 2 CPU cores; writes docs/kl_negative.png + a table
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import tether  # noqa: E402
import tether.trainers.ppo as ppo_module  # noqa: E402
from tether.toy import make_toy_model, make_toy_prompts, make_toy_tokenizer  # noqa: E402

M = 8  # min_new_tokens
STEPS = 40


def stop_early(prompts, responses, **_):
    return [1.0 if len(r) <= M else 0.0 for r in responses]


def run(name: str, sampling: tether.SamplingConfig, estimator: str, out: Path) -> list[dict]:
    tok = make_toy_tokenizer()
    cfg = tether.PPOConfig(
        output_dir=str(out / name.replace(" ", "_")), seed=0, learning_rate=3e-3, total_episodes=32 * STEPS,
        rollout_batch_size=32, mini_batch_size=16, micro_batch_size=16, ppo_epochs=4, sampling=sampling,
        kl=tether.KLConfig(coef=0.05, estimator=estimator, log_exact=True),
        logging=tether.LoggingConfig(report_to=["jsonl"], progress_bar=False, save_steps=0, report=False),
    )
    return tether.PPOTrainer(cfg, policy=make_toy_model(tok), tokenizer=tok, reward=stop_early,
                             prompts=make_toy_prompts()).train()


def main() -> None:
    torch.set_num_threads(2)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/kl_figure")
    guard = ppo_module.check_sampling_config
    ppo_module.check_sampling_config = lambda cfg: None  # the unguarded library, for run 1 only
    try:
        runs = {"unguarded k1": run("unguarded k1", tether.SamplingConfig(max_new_tokens=12, min_new_tokens=M), "k1", out)}
    finally:
        ppo_module.check_sampling_config = guard
    runs["tether allow_biased + full"] = run(
        "tether allow_biased + full",
        tether.SamplingConfig(max_new_tokens=12, min_new_tokens=M, allow_biased=True), "full", out)
    runs["pure sampling k1"] = run("pure sampling k1", tether.SamplingConfig(max_new_tokens=12), "k1", out)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (name, hist), color in zip(runs.items(), ("tab:red", "tab:blue", "tab:gray"), strict=True):
        steps = [r["step"] for r in hist]
        axes[0].plot(steps, [r["objective/kl"] for r in hist], color=color, label=f"{name}: KL in the reward")
        axes[0].plot(steps, [r["kl/exact"] for r in hist], color=color, ls="--", label=f"{name}: exact KL")
        axes[1].plot(steps, [r["objective/scores"] for r in hist], color=color, label=name)
    axes[0].axhline(0, color="black", lw=0.5)
    axes[0].set(title="KL per sequence: the estimate the reward sees vs the exact KL", xlabel="step")
    axes[1].set(title="mean reward (objective/scores)", xlabel="step")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    Path("docs").mkdir(exist_ok=True)
    fig.savefig("docs/kl_negative.png", dpi=110)

    print("| run | reward | KL the reward used | exact KL | sequences with k1 < 0 |")
    print("|---|---|---|---|---|")
    for name, hist in runs.items():
        last = hist[-10:]

        def mean(key: str, rows: list[dict] = last) -> float:
            return sum(r[key] for r in rows) / len(rows)

        print(f"| {name} | {mean('objective/scores'):.2f} | {mean('objective/kl'):.2f} | {mean('kl/exact'):.2f} "
              f"| {mean('kl/negative_fraction'):.0%} |")


if __name__ == "__main__":
    main()
