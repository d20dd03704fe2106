"""``tether ppo`` and ``tether grpo``: config from a preset, YAML and ``--field value``, then train or resume.

Both commands read their arguments the same way, so one function serves both: presets under ``--config``
under the command line; ``--reward`` may repeat (composed rewards); ``--resume RUN_DIR`` reads the run's own
``config.yaml`` and ``inputs.yaml``, and whatever the command line gives overrides them. ``--resume auto``
continues output_dir from its newest complete checkpoint when it has one and starts afresh otherwise, so the
same command line can be rerun after any interruption.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tether.checkpoint import find_complete_checkpoint
from tether.checks import check_run_inputs
from tether.config import ConfigError, config_help, load_config, split_args, take_repeated
from tether.run import is_main_process, preflight, read_inputs, restart_interrupted_run

#: ``--resume auto``: resume output_dir when it has a complete checkpoint, else start a new run there.
AUTO = "auto"

USAGE = """usage: tether {name} [--preset NAME] [--config run.yaml] --policy DIR --reward SPEC [--reward SPEC ...] --prompts FILE
                 [--reward_weights W1,W2] [--output_dir DIR] [--resume RUN_DIR|auto] [--field value ...]

  --policy DIR       a causal LM directory (save_pretrained format); its tokenizer is loaded from it
  --reward SPEC      a reward-model directory, FILE.py:FUNCTION or a built-in (exact_match, numeric_match,
                     regex:PATTERN); repeat to compose rewards
  --reward_weights   comma-separated weights, one per --reward (default 1.0 each)
  --prompts FILE     JSONL/CSV/Parquet with a `prompt` column (a string, or a list of chat messages rendered
                     with the tokenizer's chat template); other columns reach reward functions by name
  --resume RUN_DIR   continue from the newest checkpoint of RUN_DIR (its config.yaml and inputs.yaml are used)
  --resume auto      continue output_dir from its newest complete checkpoint if it has one, else start afresh:
                     rerun the same command line after any interruption
  --preset NAME      start from a packaged preset (below); --config and --field value go on top of it
  --field value      any {config} field, e.g. --learning_rate 1e-5 --sampling.max_new_tokens 32 --kl.coef 0.1
"""

EXTRA_ARGS = ("policy", "prompts", "resume", "tokenizer", "preset")


def print_help(name: str, config_cls: type) -> None:
    from tether.presets import preset_names, preset_summary

    print(USAGE.format(name=name, config=config_cls.__name__))
    names = preset_names(name)
    if names:
        print("presets (--preset NAME, under --config and --field value):")
        for preset in names:
            print(f"  {preset:<12} {preset_summary(preset, name)}")
    print(f"\n{config_cls.__name__} fields (set in the YAML file or as --field value):")
    print("\n".join(config_help(config_cls)))


def resume_base(name: str, given: dict[str, str], argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """For ``--resume RUN_DIR``: ``argv`` with the run's config.yaml as the base ``--config`` (unless one is
    given) and the run's inputs.yaml; what the command line gives overrides both. Unchanged without --resume."""
    resume = given.get("resume")
    if resume is None:
        return argv, {}
    run = Path(resume)
    if not (run / "config.yaml").is_file():
        raise ConfigError(f"--resume {resume}: no config.yaml there; is it a tether {name} run directory?")
    if "config" not in given:
        argv = ["--config", str(run / "config.yaml"), *argv]
    return argv, read_inputs(run)


def auto_resume_dir(output_dir: str) -> str | None:
    """``--resume auto``: ``output_dir`` when it holds a complete checkpoint (resume it), else None (start a new
    run; :func:`start_auto_run` clears what an attempt interrupted before its first checkpoint left there)."""
    return output_dir if find_complete_checkpoint(Path(output_dir), warn=False) is not None else None


def asks_auto(argv: Sequence[str]) -> bool:
    """Whether the command line says ``--resume auto``."""
    return split_args(take_repeated(list(argv), "reward")[1]).get("resume") == AUTO


def start_auto_run(output_dir: str, resume: str | None, auto: bool) -> None:
    """Before any model loads, on the main process: refuse directories in use by a live run or holding another
    run; for ``--resume auto`` with nothing to resume, clear an interrupted attempt's logs."""
    if not is_main_process():
        return
    preflight(Path(output_dir), Path(resume) if resume is not None else None)
    if auto and resume is None:
        restart_interrupted_run(Path(output_dir))


def parse_train_args(
    name: str, config_cls: type, argv: Sequence[str], required: Sequence[str] = ("policy", "prompts", "reward")
) -> tuple[Any, dict[str, Any], str | None]:
    """(config, {"policy", "prompts", "tokenizer", "reward"}, resume directory or None) from the command line.

    ``required``: the inputs that must be given (``tether plan`` reads the config and the policy alone)."""
    from tether.presets import preset_path

    rewards, rest = take_repeated(list(argv), "reward")
    given = split_args(rest)  # what the command line names (dashes already read as underscores)
    resume = given.get("resume")
    if resume == AUTO:
        base = preset_path(given["preset"], name) if "preset" in given else None
        out = given.get("output_dir") or load_config(config_cls, rest, EXTRA_ARGS, base)[0].output_dir
        resume = auto_resume_dir(out)
        given.pop("resume")
        if resume is not None:  # the run's config.yaml (which holds the preset's values) is the base
            given.pop("preset", None)
            given["resume"] = resume
    if resume is not None and "preset" in given:
        raise ConfigError("--preset starts a new run; a resumed run keeps the config in its config.yaml")
    rest, saved = resume_base(name, given, rest)
    preset = preset_path(given["preset"], name) if "preset" in given else None
    cfg, extra = load_config(config_cls, rest, extra=EXTRA_ARGS, base_file=preset)
    if resume is not None and "output_dir" not in given:
        cfg.output_dir = resume  # resuming writes into the run being resumed
    for key in ("policy", "prompts", "tokenizer"):
        if key not in extra and key in saved:
            extra[key] = saved[key]
    if not rewards and "reward" in saved:
        rewards = saved["reward"] if isinstance(saved["reward"], list) else [saved["reward"]]
    for key in ("policy", "prompts"):
        if key in required and key not in extra:
            raise ConfigError(f"tether {name} needs --{key}")
    if not rewards and "reward" in required:
        raise ConfigError(
            f"tether {name} needs --reward (a reward-model directory, FILE.py:FUNCTION or a built-in)"
        )
    # The trainer builds the reward from the config (weights, baseline, device), so config.yaml describes the run.
    if rewards:
        extra["reward"] = rewards if len(rewards) > 1 else rewards[0]
    return cfg, extra, resume


def train_main(name: str, config_cls: type, trainer_cls: type, argv: Sequence[str]) -> int:
    """Build the config and the trainer, resume when asked, train; print where the run went."""
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print_help(name, config_cls)
        return 0
    cfg, extra, resume = parse_train_args(name, config_cls, argv)
    check_run_inputs(cfg.output_dir, cfg.device, extra["policy"], extra.get("tokenizer"))
    start_auto_run(cfg.output_dir, resume, asks_auto(argv))
    trainer = trainer_cls(
        cfg,
        policy=extra["policy"],
        reward=extra["reward"],
        prompts=extra["prompts"],
        tokenizer=extra.get("tokenizer"),
    )
    if resume is not None:
        ckpt = trainer.resume(resume)
        if trainer.backend.is_main:
            print(f"resumed from {ckpt} (step {trainer.step})")
    trainer.train()
    if trainer.backend.is_main:
        print(f"run directory: {trainer.run_dir}\nfinal model:   {trainer.run_dir / 'final'}")
    return 0


def ppo_main(argv: Sequence[str]) -> int:
    from tether.trainers.ppo import PPOConfig, PPOTrainer

    return train_main("ppo", PPOConfig, PPOTrainer, argv)


def grpo_main(argv: Sequence[str]) -> int:
    from tether.trainers.grpo import GRPOConfig, GRPOTrainer

    return train_main("grpo", GRPOConfig, GRPOTrainer, argv)


RM_USAGE = """usage: tether rm [--config FILE.yaml] --model PATH --data FILE [--eval-data FILE] [--output_dir DIR]
                 [--resume RUN_DIR|auto] [--FIELD VALUE ...]

Train a reward model on preference pairs.

  --resume RUN_DIR   continue from the newest checkpoint of RUN_DIR (its config.yaml and inputs.yaml are used;
                     the command line overrides them, and output_dir defaults to RUN_DIR)
  --resume auto      continue output_dir from its newest complete checkpoint if it has one, else start afresh

RewardConfig fields (set in the --config file or as --FIELD VALUE):"""

#: The RewardConfig fields that name input files; inputs.yaml holds them as absolute paths for ``--resume``.
RM_INPUT_FIELDS = ("model", "data", "eval_data", "normalize_data")


def parse_rm_args(argv: Sequence[str]) -> tuple[Any, str | None]:
    """(RewardConfig, resume directory or None) from the command line, read as ``tether ppo`` reads its own."""
    from tether.trainers.reward import RewardConfig

    given = split_args(argv)  # what the command line names (dashes already read as underscores)
    resume = given.get("resume")
    if resume == AUTO:
        out = given.get("output_dir") or load_config(RewardConfig, argv, extra=("resume",))[0].output_dir
        resume = auto_resume_dir(out)
        given.pop("resume")
        if resume is not None:
            given["resume"] = resume
    args, saved = resume_base("rm", given, list(argv))
    config, _ = load_config(RewardConfig, args, extra=("resume",))
    if resume is not None and "output_dir" not in given:
        config.output_dir = resume  # resuming writes into the run being resumed
    for key in RM_INPUT_FIELDS:
        if key in saved and key not in given:
            setattr(config, key, saved[key])
    return config, resume


def rm_main(argv: Sequence[str]) -> int:
    """``tether rm``: train (or resume) a reward model; returns the exit status (0 ok, 2 bad arguments or data)."""
    import os
    import sys

    from tether.data import DataError
    from tether.rewards.base import RewardError
    from tether.trainers.reward import RewardConfig, RewardTrainer

    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print(RM_USAGE)
        print("\n".join(config_help(RewardConfig)))
        return 0
    try:
        config, resume = parse_rm_args(argv)
        if config.model is None or config.data is None:
            raise ConfigError("--model and --data are required (or set model/data in the --config file)")
        check_run_inputs(config.output_dir, config.device, config.model, model_option="--model")
        start_auto_run(config.output_dir, resume, asks_auto(argv))
        trainer = RewardTrainer(config)
        main = trainer.backend.is_main  # under a launcher, one process prints
        if resume is not None:
            ckpt = trainer.resume(resume)
            if main:
                print(f"resumed from {ckpt} (step {trainer.step})")
        trainer.train()
    except (ConfigError, DataError, RewardError, OSError) as err:
        print(f"tether rm: error: {err}", file=sys.stderr)
        return 2
    if main:
        print(f"reward model saved to {os.path.join(config.output_dir, 'final')}")
        if trainer.report_path is not None:
            print(f"report:               {trainer.report_path}")
    return 0
