"""Run under ``torchrun`` (or plain ``python`` for one process) by tests/test_deepspeed.py: checkpoint and resume.

``save OUT``: GRPO under ``sharding: deepspeed`` (ZeRO-2), two updates on the same fixed rollout with a
checkpoint between them; rank 0 writes the weights after the first and after the second update.
``resume OUT RUN SHARDING``: a fresh trainer resumes from RUN's checkpoint and runs the second update; rank 0
writes the weights (SHARDING "none" in one process: the name-keyed ZeRO checkpoint into a whole-model AdamW).
"""

from __future__ import annotations

import os
import sys

import torch

import tether
from tether.advantages import AdvantageInputs, compute_advantages
from tether.kl import kl_shaped_rewards
from tether.toy import CharFractionReward, make_toy_model, make_toy_prompts, make_toy_tokenizer

torch.set_num_threads(1)
mode, out = sys.argv[1], sys.argv[2]
run_dir = sys.argv[3] if mode == "resume" else f"{out}/run"
sharding = sys.argv[4] if mode == "resume" else "deepspeed"
os.makedirs(out, exist_ok=True)
logging = tether.LoggingConfig(report_to=["jsonl"], progress_bar=False, save_steps=0, report=False)
cfg = tether.GRPOConfig(
    output_dir=f"{out}/run", seed=0, learning_rate=3e-3, sampling=tether.SamplingConfig(max_new_tokens=8),
    logging=logging, device="cpu", overwrite_output_dir=True, sharding=sharding, total_episodes=32,
    rollout_batch_size=8, num_generations=4, mini_batch_size=16, micro_batch_size=4, num_iterations=2,
    kl=tether.KLConfig(coef=0.05, estimator="k3"), max_grad_norm=0.5,
)
tok = make_toy_tokenizer()
reward = CharFractionReward()
trainer = tether.GRPOTrainer(cfg, policy=make_toy_model(tok), tokenizer=tok, reward=reward,
                             prompts=make_toy_prompts(64))


def update() -> dict[str, float]:
    torch.manual_seed(123)  # the same global rollout on every process, and in every run
    prompts = make_toy_prompts(16, seed=5)
    ro = trainer.rollout(prompts)
    texts = tok.batch_decode(ro.response_ids, skip_special_tokens=True)
    rewards, _ = kl_shaped_rewards(torch.tensor(reward(prompts, texts)), torch.zeros_like(ro.logprobs),
                                   ro.response_mask, 0.0)
    adv = compute_advantages("grpo", AdvantageInputs(rewards, ro.response_mask, group_size=4),
                             trainer.advantage_settings).advantages
    trainer.state.step += 1
    return trainer.update(ro, adv)


def weights() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}


main = trainer.backend.is_main
if mode == "save":
    update()
    first = weights()
    trainer._checkpoint()
    update()
    if main:
        torch.save({"first": first, "second": weights(), "world": trainer.backend.world_size}, f"{out}/weights.pt")
else:
    trainer.resume(run_dir)
    resumed = weights()
    update()
    if main:
        torch.save({"resumed": resumed, "second": weights(), "world": trainer.backend.world_size,
                    "zero": trainer.state.engine is not None}, f"{out}/weights.pt")
