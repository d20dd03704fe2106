"""Start from a working example (TRL Training FAQ): PPO with a KL penalty and your own reward function.

Runs as is on a CPU in about a minute with the tiny in-process toy model. To move to your task, change one
thing at a time: first the model (``--policy DIR``, any AutoModelForCausalLM directory), then the reward
function, then the prompts. Watch objective/scores rise and objective/kl stay between 0 and 10.

    python examples/ppo_custom_reward.py [--policy DIR] [--output-dir runs/example] [--steps 30]
"""

from __future__ import annotations

import argparse

import tether
from tether.toy import make_toy_model, make_toy_prompts, make_toy_tokenizer


def reward_fn(prompts: list[str], responses: list[str], **columns) -> list[float]:
    """Your reward: one float per (prompt, response). Here: the share of vowels in the response."""
    return [sum(c in "aeiou" for c in r) / len(r) if r else 0.0 for r in responses]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", help="a causal LM directory; default: the tiny toy GPT-2")
    parser.add_argument("--output-dir", default="runs/example")
    parser.add_argument("--steps", type=int, default=30, help="PPO steps of 32 prompts each")
    args = parser.parse_args(argv)
    if args.policy:
        policy, tokenizer = args.policy, None  # the tokenizer is loaded from the same directory
    else:
        tokenizer = make_toy_tokenizer()
        policy = make_toy_model(tokenizer)
    config = tether.PPOConfig(
        output_dir=args.output_dir,
        learning_rate=3e-3 if not args.policy else 1e-5,
        total_episodes=32 * args.steps,
        rollout_batch_size=32,
        mini_batch_size=16,
        micro_batch_size=16,
        sampling=tether.SamplingConfig(max_new_tokens=12),  # pure sampling: top_k=0, top_p=1.0
        kl=tether.KLConfig(coef=0.05),
    )
    trainer = tether.PPOTrainer(config, policy=policy, tokenizer=tokenizer, reward=reward_fn,
                                prompts=make_toy_prompts())
    history = trainer.train()
    print(f"reward {history[0]['objective/scores']:.3f} -> {history[-1]['objective/scores']:.3f}, "
          f"KL {history[-1]['objective/kl']:.2f}; report: {trainer.report_path}")


if __name__ == "__main__":
    main()
