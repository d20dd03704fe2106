"""``tether demo``: PPO with a KL penalty on a real pretrained model, offline, on a laptop CPU.

SmolLM2-135M-Instruct (LoRA) learns to continue movie reviews positively, rewarded by VADER sentiment, while
the per-token KL penalty keeps it close to the frozen reference model. Modes:

  tether demo                 the run (about 7 min on two idle CPU cores): progress bar, one line per step,
                              samples before and after, the trained model in final/, an HTML report
  tether demo --algo grpo     the same task with GRPO (or rloo): G continuations per prompt, no value model
  tether demo --no-kl         the same run with the KL coefficient at 0
  tether demo --compare       both runs, their curves overlaid (report + PNG) and samples side by side
  tether demo --reward-model  preferences from VADER -> a MiniLM reward model -> PPO against it (proxy vs gold)
  tether demo --quick         the tiny toy task (under a minute, no model files; for CI and smoke tests)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tether.checks import ConfigError, check_output_dir

DEFAULT_OUTPUT_DIR = "runs/demo"
#: Default PPO steps per mode. ``--compare`` trains both arms with exactly the default run's settings: at the
#: default learning rate the unpenalised arm has degenerated well before the last step.
DEFAULT_STEPS = {"quick": 40, "sentiment": 36, "compare": 36, "reward-model": 36}


def cpu_times(stat_path: str = "/proc/stat") -> tuple[int, int]:
    """(total, idle) jiffies of all cores since boot, from the first line of /proc/stat (Linux)."""
    with open(stat_path) as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields[:8]), fields[3] + fields[4]  # user nice system idle iowait irq softirq steal


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """The share of CPU time that was not idle between two ``cpu_times`` snapshots (None if no time passed)."""
    total, idle = after[0] - before[0], after[1] - before[1]
    return 1.0 - idle / total if total > 0 else None


def busy_cores(interval: float = 0.5, stat_path: str = "/proc/stat") -> float | None:
    """How many cores other processes keep busy, over ``interval`` seconds; None where /proc/stat is absent."""
    import time

    try:
        before = cpu_times(stat_path)
        time.sleep(interval)
        share = busy_share(before, cpu_times(stat_path))
    except (OSError, ValueError, IndexError):
        return None
    return None if share is None else share * (os.cpu_count() or 1)


def default_threads(busy: float | None = None) -> int:
    """Every core when the machine is otherwise idle, else one core fewer (at least one).

    PyTorch's CPU kernels run one OpenMP thread per core and spin-wait for each other: when another process
    holds one of the cores, every operation waits for the thread that is not running. On a two-core machine
    with one core busy we measured generation over 10x slower with two threads than with one; on an idle one,
    a demo step took 11 s with two threads and 17 s with one (docs/demo.md). So the demo looks before it
    starts: ``busy`` is the number of cores other processes use (``busy_cores()`` when not given).
    """
    import torch

    cores = min(torch.get_num_threads(), os.cpu_count() or 1)
    if busy is None:
        busy = busy_cores()
    if busy is not None and busy < 0.25:
        return max(1, cores)
    return max(1, cores - 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether demo",
        description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="the tiny toy task (under a minute, no model files)"
    )
    mode.add_argument("--compare", action="store_true", help="train with and without the KL penalty, compare")
    mode.add_argument(
        "--reward-model",
        action="store_true",
        help="learn a reward model from VADER preferences, then PPO on it",
    )
    parser.add_argument(
        "--algo",
        choices=("ppo", "grpo", "rloo"),
        default="ppo",
        help="the algorithm of the sentiment run (default ppo; grpo and rloo sample 4 continuations of 4 prompts)",
    )
    parser.add_argument("--no-kl", action="store_true", help="train with the KL coefficient at 0")
    parser.add_argument(
        "--output-dir", "--output_dir", default=DEFAULT_OUTPUT_DIR, help="parent of the run directories"
    )
    parser.add_argument("--steps", type=int, default=None, help="PPO steps (default 36; 40 with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (the SmolLM2 modes)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: every core if the machine is idle, else one fewer)",
    )
    parser.add_argument(
        "--learning-rate", "--learning_rate", type=float, default=None, help="override the learning rate"
    )
    parser.add_argument(
        "--kl-coef",
        "--kl_coef",
        type=float,
        default=None,
        help="override the KL coefficient (default 0.1; 0.2 with --algo grpo, whose KL is a loss term; 0.05 with rloo)",
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and check the options; an invalid combination exits with status 2 and a usage message."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.no_kl and args.compare:
        parser.error("--compare already runs without the KL penalty; drop --no-kl")
    if args.no_kl and args.kl_coef is not None:
        parser.error("--no-kl and --kl-coef contradict each other; use one")
    if args.kl_coef is not None and args.kl_coef < 0:
        parser.error(f"--kl-coef must be >= 0, got {args.kl_coef}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    try:
        check_output_dir(args.output_dir, "--output-dir")  # before any model loads or any run starts
    except ConfigError as err:
        parser.error(str(err))
    chosen = {"quick": args.quick, "compare": args.compare, "reward-model": args.reward_model}
    args.mode = next((mode for mode, on in chosen.items() if on), "sentiment")
    if args.algo != "ppo" and args.mode != "sentiment":
        parser.error(f"--algo {args.algo} runs the sentiment task; --{args.mode} uses PPO")
    if args.steps is None:
        args.steps = DEFAULT_STEPS[args.mode]
    return args


def kl_coef(args: argparse.Namespace) -> float | None:
    """The KL coefficient the options ask for; None keeps the mode's default."""
    if args.no_kl:
        return 0.0
    return args.kl_coef


def _where(run_dir: Path) -> str:
    return (
        f"run directory: {run_dir}\n"
        f"report:        {run_dir / 'report.html'}\n"
        f"curves:        {run_dir / 'curves.png'}\n"
        f"final model:   {run_dir / 'final'}  (LoRA merged; AutoModelForCausalLM.from_pretrained loads it)"
    )


def _run(args: argparse.Namespace) -> None:
    import torch

    from tether.demo import sentiment_run as sr

    out = Path(args.output_dir)
    if args.mode == "quick":
        from tether.demo.quick import run_quick

        run_dir = out / ("quick-no-kl" if args.no_kl else "quick")
        sr.fresh_run_dir(run_dir)
        coef = kl_coef(args)
        run_quick(run_dir, steps=args.steps, kl_coef=0.05 if coef is None else coef)
        print(f"\nrun directory: {run_dir}")
        return

    sr.check_assets(reward_model=args.mode == "reward-model")
    settings = sr.with_overrides(
        sr.SentimentDemoSettings(kl_coef=sr.DEFAULT_KL_COEF[args.algo]),
        steps=args.steps,
        seed=args.seed,
        kl_coef=kl_coef(args),
        learning_rate=args.learning_rate,
        algo=args.algo,
    )
    reward = (
        "a reward model learned from VADER preferences" if args.mode == "reward-model" else "VADER sentiment"
    )
    kl_coefs = f"{settings.kl_coef:g} vs 0" if args.mode == "compare" else f"{settings.kl_coef:g}"
    G = settings.num_generations
    batch = (
        settings.rollout_batch_size if settings.algo == "ppo" else f"{settings.rollout_batch_size // G} x {G}"
    )
    print(
        f"tether demo: SmolLM2-135M-Instruct + LoRA, {settings.algo.upper()} on {settings.steps} x {batch} movie "
        f"prompts, reward = {reward}, kl_coef {kl_coefs}, {torch.get_num_threads()} CPU thread(s)\n"
        f"continuations are cut at {settings.max_new_tokens} tokens as in TRL's sentiment example, so expect the "
        "health note 'length_at_max'"
    )
    if args.mode == "compare":
        sr.run_compare(out / "compare", settings)
    elif args.mode == "reward-model":
        from tether.demo.reward_model_run import run_reward_model

        result = run_reward_model(out / "reward-model", settings)
        print(f"\n{_where(result.ppo.run_dir)}\nreward model:  {out / 'reward-model' / 'rm' / 'final'}")
    else:
        name = "sentiment" if args.algo == "ppo" else f"sentiment-{args.algo}"
        run = sr.run_sentiment(out / (f"{name}-no-kl" if args.no_kl else name), settings)
        print(f"\n{sr.summary_line(run)}\n{_where(run.run_dir)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tether demo``; returns the exit status (0 ok, 1 missing demo files, 2 bad options)."""
    from tether.demo.smollm import DemoAssetError

    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2): return the code, as `tether report` does
        return int(exit_.code or 0)
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or default_threads())
    try:
        _run(args)
    except DemoAssetError as err:
        print(f"tether demo: error: {err}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(previous_threads)  # a caller in the same process (tests) keeps its setting
    return 0
