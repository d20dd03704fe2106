"""Run under ``torchrun --nproc_per_node N`` (or plain ``python`` for one process) by tests/test_distributed.py.

``update TRAINER OUT``: every process builds the same global rollout (generated with a fixed seed), computes the
same advantages, and runs one ``trainer.update``; rank 0 writes the updated weights and the update statistics.
``run TRAINER OUT``: a whole toy run; rank 0 writes the history.
``kill TRAINER OUT``: a whole run in which rank 1 dies (os._exit) in its fifth rollout, after the step-4 checkpoint.
``resume TRAINER OUT``: the ``kill`` run resumed from its newest checkpoint (with any number of processes).
An optional fourth argument is the ``sharding`` setting ("none" or "fsdp"; "fsdp-frozen" shards the reference too).
"""

from __future__ import annotations

import json
import os
import sys

import torch

import tether
from tether.advantages import AdvantageInputs, compute_advantages, gae
from tether.kl import kl_shaped_rewards
from tether.sharding import full_state_dict, is_sharded
from tether.toy import CharFractionReward, make_toy_model, make_toy_prompts, make_toy_tokenizer

torch.set_num_threads(1)
os.makedirs(sys.argv[3], exist_ok=True)
mode, trainer_name, out = sys.argv[1], sys.argv[2], sys.argv[3]
sharding = sys.argv[4] if len(sys.argv) > 4 else "none"
shard_frozen = sharding == "fsdp-frozen"
sharding = sharding.removesuffix("-frozen")
steps = {"update": 2, "run": 24, "kill": 8, "resume": 8}[mode]
save_steps = 4 if mode in ("kill", "resume") else steps // 2
logging = tether.LoggingConfig(report_to=["jsonl"], progress_bar=False, save_steps=save_steps, report=True)
common = dict(output_dir=f"{out}/run", seed=0, learning_rate=3e-3, sampling=tether.SamplingConfig(max_new_tokens=8),
              logging=logging, device="cpu", overwrite_output_dir=True, sharding=sharding,
              shard_frozen_models=shard_frozen)
tok = make_toy_tokenizer()
reward = CharFractionReward()
if trainer_name == "ppo":
    cfg = tether.PPOConfig(total_episodes=16 * steps, rollout_batch_size=16, mini_batch_size=8, micro_batch_size=2,
                           ppo_epochs=2, kl=tether.KLConfig(coef=0.05), **common)
    trainer = tether.PPOTrainer(cfg, policy=make_toy_model(tok), tokenizer=tok, reward=reward,
                                prompts=make_toy_prompts(64))
else:
    cfg = tether.GRPOConfig(total_episodes=8 * steps, rollout_batch_size=8, num_generations=4, mini_batch_size=16,
                            micro_batch_size=4, num_iterations=2, kl=tether.KLConfig(coef=0.05, estimator="k3"),
                            **common)
    trainer = tether.GRPOTrainer(cfg, policy=make_toy_model(tok), tokenizer=tok, reward=reward,
                                 prompts=make_toy_prompts(64))
main = trainer.backend.is_main

if mode == "update":
    torch.manual_seed(123)  # the same global rollout on every process
    prompts = make_toy_prompts(16, seed=5)
    ro = trainer.rollout(prompts)
    texts = tok.batch_decode(ro.response_ids, skip_special_tokens=True)
    scores = torch.tensor(reward(prompts, texts))
    if trainer_name == "ppo":
        rewards, _ = kl_shaped_rewards(scores, ro.kl, ro.response_mask, 0.05)
        adv, ret = gae(rewards, ro.values, ro.response_mask, 1.0, 0.95)
        stats = trainer.update(ro, adv, ret)
    else:
        rewards, _ = kl_shaped_rewards(scores, torch.zeros_like(ro.logprobs), ro.response_mask, 0.0)
        inputs = AdvantageInputs(rewards, ro.response_mask, group_size=4)
        adv = compute_advantages("grpo", inputs, trainer.advantage_settings).advantages
        stats = trainer.update(ro, adv)
    # whole weights (gathered from the shards under fsdp: a collective, so on every process)
    weights = dict(full_state_dict(trainer.policy))
    if trainer_name == "ppo":
        weights.update({f"value.{k}": v for k, v in full_state_dict(trainer.value_model).items()})
    if main:
        sharded = (is_sharded(trainer.policy), is_sharded(trainer.ref_policy))
        torch.save({"params": weights, "stats": stats, "world": trainer.backend.world_size, "sharded": sharded},
                   f"{out}/update.pt")
else:
    if mode == "kill" and trainer.backend.rank == 1:
        real_rollout, calls = trainer.rollout_of, []

        def dying_rollout(generation, policy_forward=True):
            calls.append(1)
            if len(calls) == 5:
                os._exit(3)  # a rank killed mid-run: no exception, no cleanup
            return real_rollout(generation, policy_forward)

        trainer.rollout_of = dying_rollout
    if mode == "resume":
        trainer.resume()
    history = trainer.train()
    if main:
        with open(f"{out}/history.json", "w") as f:
            json.dump(history, f)
