"""The toy task must learn on CPU: mean reward rises clearly while the KL stays in its healthy range."""

from __future__ import annotations

import torch

import tether
from tether.demo.quick import quick_config
from tether.toy import CharFractionReward, make_toy_model, make_toy_prompts, make_toy_tokenizer
from tether.trainers.ppo import PPOTrainer


def test_toy_task_reward_rises_with_bounded_kl(tmp_path):
    cfg = quick_config(tmp_path / "run", steps=30)
    cfg.logging.report_to = ["jsonl"]
    cfg.logging.progress_bar = False
    tok = make_toy_tokenizer()
    trainer = PPOTrainer(cfg, policy=make_toy_model(tok), tokenizer=tok, reward=CharFractionReward(),
                         prompts=make_toy_prompts())
    history = trainer.train()
    scores = [row["objective/scores"] for row in history]
    kls = [row["objective/kl"] for row in history]
    start, end = sum(scores[:3]) / 3, sum(scores[-5:]) / 5
    # A random-initialised model writes ~5 vowels in 31 characters (~0.16); the trained one clearly more.
    assert start < 0.3
    assert end > start + 0.35, (start, end)
    assert all(0.0 <= kl < 10.0 for kl in kls), kls


COUNT_WORDS = ("zero", "one", "two", "three")


def count_of_a_matches(prompts, completions, answer, **_):
    """Verifiable reward: 1 when the completion holds exactly `answer` letters 'a', else 0."""
    return [float(c.count("a") == n) for c, n in zip(completions, answer, strict=True)]


def test_grpo_learns_a_verifiable_counting_task(tmp_path):
    """GRPO with a programmatic 0/1 reward: write exactly as many 'a's as the number in the prompt says.

    A random tiny model writes about one 'a' in 32 characters, so it is right for "zero" and sometimes for "one"
    (mean reward ~0.25); to do better it must read the number. Judged on 256 fresh samples (64 per number)
    before and after training, not on the training batches, whose mix of numbers makes them noisy.
    (This seed learns: held-out +0.30 in 90 steps, seed 1 +0.50; in 60 steps seeds 0-1 gained +0.15-0.18 and
    seed 2 stayed at its start.)
    """
    rows = [{"prompt": f"count a {word}:", "answer": n} for _ in range(16) for n, word in enumerate(COUNT_WORDS)]
    tok = make_toy_tokenizer()
    cfg = tether.GRPOConfig(
        output_dir=str(tmp_path / "run"), seed=0, learning_rate=3e-3, lr_scheduler="constant",
        total_episodes=16 * 90, rollout_batch_size=16, num_generations=8, mini_batch_size=64, micro_batch_size=64,
        sampling=tether.SamplingConfig(max_new_tokens=6),
        kl=tether.KLConfig(coef=0.01, estimator="k3", placement="loss"),
        logging=tether.LoggingConfig(report_to=["jsonl"], progress_bar=False, report=False, save_steps=0,
                                     sample_steps=0),
    )
    trainer = tether.GRPOTrainer(cfg, policy=make_toy_model(tok, seed=0), tokenizer=tok,
                                 reward=count_of_a_matches, prompts=rows)

    def held_out_reward() -> float:
        prompts = [f"count a {word}:" for word in COUNT_WORDS for _ in range(64)]
        answers = [n for n in range(len(COUNT_WORDS)) for _ in range(64)]
        texts = tok.batch_decode(trainer.generator(prompts).response_ids, skip_special_tokens=True)
        return sum(count_of_a_matches(prompts, texts, answers)) / len(texts)

    torch.manual_seed(1234)
    before = held_out_reward()
    history = trainer.train()
    torch.manual_seed(1234)
    after = held_out_reward()
    assert before < 0.35
    assert after > before + 0.2, (before, after)
    assert all(row["objective/kl"] < 10.0 for row in history)
