"""The ``tether`` command line: ``tether ppo | grpo | sample | rm | demo | check-reward | report | plan``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

USAGE = """usage: tether <command> [options]

commands:
  demo          the embedded end-to-end example (offline, CPU); --quick for the tiny toy task
  ppo           PPO with a KL penalty:  tether ppo --config run.yaml --policy DIR --reward DIR_OR_FILE.py:FN
                --prompts FILE --output_dir DIR [--field value ...] [--resume RUN_DIR]
  grpo          the group-baseline family (GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++): same options as ppo,
                plus --num_generations G --advantage grpo|rloo|reinforce++ --policy_loss ppo-clip|dual-clip|gspo
  sample        generate (and optionally score) a policy's responses to a prompt file, as JSONL
  rm            train a reward model (Bradley-Terry) on preference pairs
  check-reward  sanity-check a reward model or function before RL
  report        build an HTML report from one or more run directories
  plan          estimate a run's memory before starting it: tether plan --config run.yaml --policy DIR
                [--algo ppo|grpo] [--world_size N] [--field value ...]; exit 1 when it will not fit

Run `tether <command> --help` for the options of one command.
"""

# Errors a user can fix from the message alone: printed as one line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, ImportError, KeyError)


def _ppo(argv: Sequence[str]) -> int:
    from tether.train_cli import ppo_main

    return ppo_main(argv)


def _grpo(argv: Sequence[str]) -> int:
    from tether.train_cli import grpo_main

    return grpo_main(argv)


def _sample(argv: Sequence[str]) -> int:
    from tether.sample import main

    return main(list(argv))


def _rm(argv: Sequence[str]) -> int:
    from tether.train_cli import rm_main

    return rm_main(list(argv))


def _demo(argv: Sequence[str]) -> int:
    from tether.demo.main import main

    return main(list(argv))


def _check_reward(argv: Sequence[str]) -> int:
    from tether.rewards.check import main

    return main(list(argv))


def _report(argv: Sequence[str]) -> int:
    from tether.report import main

    return main(list(argv))


def _plan(argv: Sequence[str]) -> int:
    from tether.plan import main

    return main(list(argv))


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "ppo": _ppo,
    "grpo": _grpo,
    "sample": _sample,
    "rm": _rm,
    "demo": _demo,
    "check-reward": _check_reward,
    "report": _report,
    "plan": _plan,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"tether: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    from tether.stop import RunStopped

    try:
        return COMMANDS[command](rest)
    except USER_ERRORS as exc:
        print(f"tether {command}: error: {exc}", file=sys.stderr)
        return 2
    except RunStopped as stopped:  # SIGINT / SIGTERM: the run saved a checkpoint and stopped
        print(f"tether {command}: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C (or one outside a training loop): stop at once
        print(f"\ntether {command}: interrupted; the last complete checkpoint is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
