"""Run under ``torchrun --nproc_per_node N`` (or plain ``python`` for one process) by tests/test_reward_distributed.py.

The argument is a JSON list of jobs, run in order in the same processes (one interpreter start, which costs more
than the training here, for several runs):
``["train", OUT, MODEL, DATA, EVAL_DATA]``: a few steps of ``tether rm`` on a tiny model (RewardTrainer, run
directory OUT/run); every process writes OUT/rank-R.pt with its final weights and the history train() returned.
``["cli", ARGS...]``: ``tether rm ARGS...`` (e.g. ``--resume DIR``); a non-zero status stops the worker.
"""

from __future__ import annotations

import json
import sys

import torch

from tether.train_cli import rm_main
from tether.trainers.reward import RewardConfig, RewardTrainer

torch.set_num_threads(1)

#: 13 training pairs in batches of 4 (2 per process, one micro-batch of 2): 4, 4, 4 and a last batch of 1,
#: whose share on the second process is empty. 2 epochs = 8 steps; evaluations (5 held-out pairs, split 3 + 2)
#: at steps 3, 6 and 8; checkpoints at 3 and 6. Clipping at 0.5 is active, so a wrong gradient scale changes
#: the weights (AdamW alone is blind to a constant scale).
SETTINGS = dict(
    batch_size=4, micro_batch_size=2, num_epochs=2, learning_rate=3e-3, max_grad_norm=0.5, eval_steps=3,
    save_steps=3, save_total_limit=3, report_to=["jsonl"], seed=0,
)  # fmt: skip


def train(out: str, model: str, data: str, eval_data: str) -> None:
    cfg = RewardConfig(model=model, data=data, eval_data=eval_data, output_dir=f"{out}/run", **SETTINGS)  # type: ignore[arg-type]
    trainer = RewardTrainer(cfg)
    history = trainer.train()
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    backend = trainer.backend
    torch.save(
        {"world": backend.world_size, "params": params, "history": history}, f"{out}/rank-{backend.rank}.pt"
    )


if __name__ == "__main__":
    for job, *args in json.loads(sys.argv[1]):
        if job == "train":
            train(*args)
        elif status := rm_main(args):
            sys.exit(status)
