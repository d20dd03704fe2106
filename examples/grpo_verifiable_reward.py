"""Start from a working example: GRPO with a verifiable reward read from a dataset column.

Each prompt carries an ``answer`` column; the reward functions get it by name. Here the task is to write as many
letters 'a' as the number in the prompt says. Runs as is on a CPU in under a minute with the tiny in-process
toy model; for a real task, swap in your model (``--policy DIR``), prompts and checker, e.g. the built-in
``numeric_match`` for maths answers, and add a format check with weights:
``reward=[check, "regex:^<think>"], reward_weights=[1.0, 0.2]`` (each component is logged as
``rewards/<name>/mean``).

    python examples/grpo_verifiable_reward.py [--policy DIR] [--output-dir runs/grpo-example] [--steps 60]
"""

from __future__ import annotations

import argparse

import tether
from tether.toy import make_toy_model, make_toy_tokenizer

WORDS = ("zero", "one", "two", "three")


def count_matches(prompts: list[str], completions: list[str], answer: list[int], **columns) -> list[float]:
    """1.0 when the completion holds exactly ``answer`` letters 'a' (a dataset column), else 0.0."""
    return [float(c.count("a") == n) for c, n in zip(completions, answer, strict=True)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", help="a causal LM directory; default: the tiny toy GPT-2")
    parser.add_argument("--output-dir", default="runs/grpo-example")
    parser.add_argument("--steps", type=int, default=60, help="GRPO steps of 16 prompts x 8 completions")
    args = parser.parse_args(argv)
    if args.policy:
        policy, tokenizer = args.policy, None  # the tokenizer is loaded from the same directory
    else:
        tokenizer = make_toy_tokenizer()
        policy = make_toy_model(tokenizer)
    rows = [{"prompt": f"count a {word}:", "answer": n} for _ in range(16) for n, word in enumerate(WORDS)]
    config = tether.GRPOConfig(
        output_dir=args.output_dir,
        learning_rate=3e-3 if not args.policy else 1e-6,
        lr_scheduler="constant",
        total_episodes=16 * args.steps,
        rollout_batch_size=16,  # prompts per step
        num_generations=8,  # completions per prompt: the group baseline
        mini_batch_size=64,
        micro_batch_size=64,
        sampling=tether.SamplingConfig(max_new_tokens=6),  # pure sampling: top_k=0, top_p=1.0
        kl=tether.KLConfig(coef=0.01, estimator="k3", placement="loss"),
    )
    trainer = tether.GRPOTrainer(
        config, policy=policy, tokenizer=tokenizer, reward=count_matches, prompts=rows
    )
    history = trainer.train()
    count = [row["rewards/count_matches/mean"] for row in history]
    n = min(5, len(count))  # means over 5 steps: one step's mix of numbers is noisy
    print(
        f"count reward {sum(count[:n]) / n:.3f} -> {sum(count[-n:]) / n:.3f} (first vs last {n} steps), "
        f"KL {history[-1]['objective/kl']:.2f}; report: {trainer.report_path}"
    )


if __name__ == "__main__":
    main()
