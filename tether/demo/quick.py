"""The toy task as a runnable demo: a tiny GPT-2 learns to write vowels, tethered by the KL penalty."""

from __future__ import annotations

from pathlib import Path

import torch

from tether.config import KLConfig, LoggingConfig
from tether.sampling import SamplingConfig
from tether.toy import CharFractionReward, make_toy_model, make_toy_prompts, make_toy_tokenizer
from tether.trainers.ppo import PPOConfig, PPOTrainer


def quick_config(output_dir: str | Path, steps: int = 40, kl_coef: float = 0.05, seed: int = 0) -> PPOConfig:
    """PPO settings under which the toy task learns in well under a minute on two CPU cores."""
    return PPOConfig(
        output_dir=str(output_dir),
        seed=seed,
        learning_rate=3e-3,
        total_episodes=32 * steps,
        rollout_batch_size=32,
        mini_batch_size=16,
        micro_batch_size=16,
        ppo_epochs=4,
        sampling=SamplingConfig(max_new_tokens=12),
        kl=KLConfig(coef=kl_coef),
        logging=LoggingConfig(
            report_to=["jsonl", "console"], logging_steps=5, sample_steps=10, save_steps=20
        ),
    )


@torch.inference_mode()
def sample_responses(trainer: PPOTrainer, prompts: list[str], seed: int = 1234) -> list[str]:
    """One sampled response per prompt from the trainer's current policy (fixed seed, RNG state kept)."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        gen = trainer.generator(prompts)
        return trainer.tokenizer.batch_decode(gen.response_ids, skip_special_tokens=True)
    finally:
        torch.set_rng_state(state)


def run_quick(output_dir: str | Path, steps: int = 40, kl_coef: float = 0.05) -> list[dict[str, float]]:
    """Train the toy task and print samples before and after, side by side."""
    tokenizer = make_toy_tokenizer()
    reward = CharFractionReward()
    trainer = PPOTrainer(
        quick_config(output_dir, steps, kl_coef),
        policy=make_toy_model(tokenizer),
        tokenizer=tokenizer,
        reward=reward,
        prompts=make_toy_prompts(),
    )
    shown = make_toy_prompts(4, seed=99)
    before = sample_responses(trainer, shown)
    history = trainer.train()
    after = sample_responses(trainer, shown)
    print("\nsamples before -> after training (reward: fraction of vowels)")
    for p, b, a in zip(shown, before, after, strict=True):
        rb, ra = reward([p], [b])[0], reward([p], [a])[0]
        print(f"  {p!r:12} {b!r:16} ({rb:.2f})  ->  {a!r:16} ({ra:.2f})")
    first, last = history[0], history[-1]
    print(
        f"\nmean reward {first['objective/scores']:.3f} -> {last['objective/scores']:.3f}; "
        f"objective/kl {first['objective/kl']:.3f} -> {last['objective/kl']:.3f}"
    )
    return history
