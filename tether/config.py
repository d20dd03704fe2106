"""Typed dataclass configs: shared blocks, YAML loading and ``--dotted.key value`` overrides.

Every config is a dataclass whose fields are plain types, ``Literal`` choices, ``X | None``, lists
or nested dataclasses. Unknown keys are an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from tether.checks import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, PROBABILITY, ConfigError, Range, check_ranges
from tether.ops import exact_div
from tether.sampling import SamplingConfig

C = TypeVar("C")

#: Allowed values of KLConfig's fields (every float field must also be finite: a NaN coef is refused).
KL_RANGES: dict[str, Range] = {"coef": NON_NEGATIVE, "target": POSITIVE, "horizon": AT_LEAST_ONE}

#: Allowed values of LoggingConfig's fields.
LOGGING_RANGES: dict[str, Range] = {
    "logging_steps": AT_LEAST_ONE,
    "sample_steps": Range(0, hint=" (0 disables the sample tables)"),
    "num_sample_rows": NON_NEGATIVE,
    "save_steps": Range(0, hint=" (0 disables intermediate checkpoints)"),
    "save_total_limit": AT_LEAST_ONE,
}

#: Allowed values of the fields of RLConfig and of the trainer configs built on it (PPOConfig and GRPOConfig
#: call RLConfig.__post_init__; a name absent from a config is skipped). One name means one thing everywhere.
RL_RANGES: dict[str, Range] = {
    "learning_rate": POSITIVE,
    "total_episodes": AT_LEAST_ONE,
    "rollout_batch_size": AT_LEAST_ONE,
    "mini_batch_size": AT_LEAST_ONE,
    "micro_batch_size": AT_LEAST_ONE,
    "cliprange": POSITIVE,
    "cliprange_high": POSITIVE,
    "loss_norm_constant": POSITIVE,
    "max_grad_norm": Range(0, low_open=True, hint="; use none to disable gradient clipping"),
    "weight_decay": NON_NEGATIVE,
    "adam_eps": POSITIVE,
    "max_prompt_length": AT_LEAST_ONE,
    "forward_batch_size": AT_LEAST_ONE,
    "reward_batch_size": AT_LEAST_ONE,
    "reward_clip": POSITIVE,
    "logprob_check_steps": NON_NEGATIVE,
    "micro_batch_tokens": AT_LEAST_ONE,
    "max_nonfinite_steps": Range(0, hint=" (0 never stops; each skipped update still warns)"),
    # PPOConfig
    "ppo_epochs": AT_LEAST_ONE,
    "cliprange_value": Range(0, low_open=True, hint="; use none to disable value clipping"),
    "vf_coef": NON_NEGATIVE,
    "gamma": PROBABILITY,
    "lam": PROBABILITY,
    # GRPOConfig
    "num_generations": AT_LEAST_ONE,
    "num_iterations": AT_LEAST_ONE,
    "dual_clip": Range(1, low_open=True),
}


@dataclass
class KLConfig:
    """The KL penalty against the reference model."""

    coef: float = 0.05
    """Initial KL coefficient beta (TRL: kl_coef / init_kl_coef)."""
    target: float | None = None
    """Target KL per sequence for the adaptive controller (Ziegler et al. 2019); None keeps coef fixed."""
    horizon: int = 10_000
    """Adaptive controller horizon in episodes."""
    estimator: Literal["k1", "k2", "k3", "full"] = "k1"
    """Per-token KL estimator: k1 = log p - log q (TRL's default), k3 >= 0 per sample, or full = the exact KL
    between the policy's and the reference's next-token distributions (>= 0, no sampling noise)."""
    log_exact: bool = False
    """Also log kl/exact, the exact KL of each rollout (as estimator "full" computes it), beside the estimate
    the reward uses: a check that the estimate is not hiding drift (it costs one vocabulary-wide softmax)."""
    placement: Literal["reward", "loss"] = "reward"
    """Where the penalty goes: in the per-token reward (PPO, InstructGPT) or as a loss term (GRPO-style);
    the loss needs an estimator whose gradient is the KL's (k2, k3 or full), not k1. The exact (full) KL in
    the reward also adds its direct gradient as a loss term, since it does not depend on the sampled token."""

    def __post_init__(self) -> None:
        check_ranges(self, KL_RANGES, prefix="kl")
        if self.placement == "loss" and self.estimator == "k1":
            raise ConfigError(
                "kl.placement='loss' with kl.estimator='k1': the gradient of the k1 estimate is zero in "
                "expectation, so the penalty would do nothing; use k2, k3 or full"
            )


@dataclass
class LoggingConfig:
    """Where and how often a run reports."""

    report_to: list[str] = field(default_factory=lambda: ["jsonl", "console"])
    """Backends: jsonl (always on), console, tensorboard, wandb, none."""
    logging_steps: int = 1
    """Print the compact console line every N steps (metrics.jsonl gets every step)."""
    sample_steps: int = 10
    """Write a table of generations every N steps (samples.jsonl, TensorBoard, W&B)."""
    num_sample_rows: int = 4
    """Rows in each sample table."""
    save_steps: int = 50
    """Write a checkpoint every N steps (0 disables intermediate checkpoints)."""
    save_total_limit: int = 2
    """Keep at most this many checkpoints (the newest)."""
    progress_bar: bool = True
    """Show a progress bar over total episodes."""
    report: bool = True
    """Write run_dir/report.html (plots, samples, health warnings) at the end of the run."""

    def __post_init__(self) -> None:
        check_ranges(self, LOGGING_RANGES, prefix="logging")


@dataclass
class RLConfig:
    """The fields every RL trainer shares (PPO, GRPO and its family): one name means one thing everywhere.

    Batch vocabulary (TRL names in brackets): ``rollout_batch_size`` prompts per step [batch_size]; each
    step trains on ``sequences_per_step`` sequences (one per prompt for PPO, G per prompt for GRPO);
    ``mini_batch_size`` sequences per optimiser step [local_mini_batch_size]; ``micro_batch_size`` sequences
    per forward/backward [per_device_train_batch_size]; gradient accumulation = mini / micro
    [gradient_accumulation_steps].
    """

    output_dir: str = "runs/rl"
    """Run directory: config.yaml, metrics.jsonl, samples.jsonl, checkpoints/, final/."""
    overwrite_output_dir: bool = False
    """Start afresh in an output_dir that already holds a run (its logs, checkpoints and final/ are removed).
    Without it, such a directory is an error unless the run is resumed, so no earlier run is mixed or lost."""
    seed: int = 0
    """Seed for prompt order, sampling and updates; the same seed gives the same run on CPU."""
    learning_rate: float = 3e-6
    """AdamW learning rate (policy, and value model where there is one)."""
    total_episodes: int = 10_000
    """Prompts (episodes) to train on; steps = total_episodes // rollout_batch_size."""
    rollout_batch_size: int = 64
    """Prompts sampled per training step [TRL: batch_size]."""
    mini_batch_size: int = 16
    """Sequences per optimiser step [TRL: local_mini_batch_size]."""
    micro_batch_size: int = 16
    """Sequences per forward/backward; gradients are accumulated over mini/micro of them. Each process sorts its
    rows by length, so a micro-batch holds rows of similar length and is trimmed to its longest row."""
    micro_batch_tokens: int | None = None
    """Also cap each micro-batch at this many tokens (rows x its longest row), so short rows go in larger
    micro-batches and long rows in smaller ones; None = micro_batch_size rows every time. One process only."""
    cliprange: float = 0.2
    """Policy ratio clip (low side, and high side unless cliprange_high is set)."""
    cliprange_high: float | None = None
    """Separate high-side ratio clip (DAPO's clip-higher); None = cliprange."""
    loss_aggregation: Literal[
        "token-mean", "seq-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum-norm"
    ] = "token-mean"
    """How per-token losses are reduced: token-mean (every token weighs the same), seq-mean-token-mean (each
    sequence's mean, averaged; seq-mean is its short name), seq-mean-token-sum, token-sum-norm (sum / (B x
    loss_norm_constant), Dr. GRPO). Independent of how a mini-batch is split into micro-batches."""
    loss_norm_constant: float | None = None
    """The constant of token-sum-norm; None = sampling.max_new_tokens (as in Dr. GRPO)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a response that hit max_new_tokens without EOS; None = no penalty."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm; None disables clipping."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_eps: float = 1e-5
    """AdamW epsilon (TRL and the N-implementation-details use 1e-5 rather than torch's 1e-8)."""
    lr_scheduler: Literal["linear", "constant"] = "linear"
    """Linear decay to 0 over the run (TRL's default) or a constant rate."""
    max_prompt_length: int = 256
    """Prompts longer than this many tokens are an error (naming the row)."""
    forward_batch_size: int | None = None
    """Sequences per no-grad rollout forward (policy, reference, value); None = micro_batch_size."""
    max_nonfinite_steps: int = 3
    """A step whose update would read or compute NaN / inf (advantages, logprobs, values, KL, a loss or a gradient)
    skips that update and warns; this many such steps in a row stop the run with advice (0: never stop)."""
    logprob_check_steps: int = 10
    """The old logprobs and entropy come from the sampling loop, which computes them from the logits it samples
    with; on the first step and every this many steps the rollout also runs the policy forward over the sampled
    tokens, trains on its numbers and logs rollout/logprob_diff_max|mean (sampler against forward). 1 = a
    forward every step; 0 = only the first step. A forward runs every step anyway when the sampler cannot
    stand in for it: the exact KL ("full" or kl.log_exact), mixed precision, or sampling.engine "hf"."""
    reward_batch_size: int = 16
    """Texts per reward-model forward."""
    reward_weights: list[float] | None = None
    """One weight per reward component when several are given (default 1.0 each)."""
    reward_baseline: Literal["none", "prompt"] = "none"
    """"prompt" scores r(prompt + response) - r(prompt): removes the part of the reward the policy cannot
    change (TRL Training FAQ, debugging: normalise a reward dominated by the prompt)."""
    reward_norm: bool = False
    """Normalise scores by the running mean/std of all scores seen so far."""
    reward_clip: float | None = None
    """Clip (normalised) scores to [-reward_clip, reward_clip]."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...; under torchrun, one device per process."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """"bf16" / "fp16": the policy, reference and value forwards (rollout and update) run under bfloat16 / float16
    autocast, on CPU and CUDA; logprobs, KL and losses are still computed in float32 from the logits, and weights
    stay float32. fp16 also scales the loss (a gradient scaler) so that small gradients do not underflow. Meant
    for GPUs: on a 2-core CPU bf16 made a SmolLM2 demo step 2-3x slower (measured)."""
    gradient_checkpointing: bool = False
    """Recompute the policy's (and value model's) activations in the backward pass instead of storing them:
    less memory for a longer update (transformers' gradient_checkpointing_enable, non-reentrant)."""
    sharding: Literal["none", "fsdp", "deepspeed"] = "none"
    """With several processes: "none" keeps a whole copy of every model on each process and sums gradients (as
    DDP does); "fsdp" shards the trained models (policy, value model) - weights, gradients and optimiser state -
    over the processes with PyTorch FSDP2, one unit per decoder layer; "deepspeed" trains them with a DeepSpeed
    ZeRO engine (``zero_stage``; needs the ``deepspeed`` extra). Under `accelerate launch` with an FSDP or a
    DeepSpeed accelerate config, "none" is read as "fsdp" / "deepspeed". One process ignores it."""
    zero_stage: int = 2
    """Under sharding "deepspeed": the ZeRO stage, 1 (AdamW state split over the processes) or 2 (gradients
    too); an accelerate DeepSpeed config's zero_stage overrides it. Stage 3 is not supported yet: use sharding
    "fsdp", which shards the weights as ZeRO-3 does."""
    shard_frozen_models: bool = False
    """Under sharding "fsdp", shard the frozen models too (the reference and any reward models), instead of a
    whole copy of each on every process."""
    memory_check: bool = True
    """Before loading anything onto a device, estimate the run's memory (as `tether plan` prints it) and stop
    with advice when it will not fit the device (or the RAM on CPU)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        check_ranges(self, RL_RANGES)  # the nested blocks (sampling, kl, logging) checked their own
        if self.total_episodes < self.rollout_batch_size:
            raise ConfigError(
                f"total_episodes ({self.total_episodes}) must be at least rollout_batch_size ({self.rollout_batch_size})"
            )
        try:
            exact_div(
                self.sequences_per_step, self.mini_batch_size, f"{self._sequences_name} / mini_batch_size"
            )
            exact_div(self.mini_batch_size, self.micro_batch_size, "mini_batch_size / micro_batch_size")
        except ValueError as exc:
            raise ConfigError(f"batch sizes do not divide: {exc}") from None
        if self.zero_stage not in (1, 2):
            raise ConfigError(
                f"zero_stage must be 1 or 2, got {self.zero_stage}: ZeRO-3 is not supported yet; sharding: fsdp "
                "shards the weights, gradients and optimiser state as ZeRO-3 does - see docs/distributed.md"
            )
        if self.sampling.allow_biased and self.kl.estimator not in ("k3", "full"):
            raise ConfigError(
                f"sampling.allow_biased=true needs kl.estimator 'k3' or 'full' (got {self.kl.estimator!r}): "
                "with warped sampling the k1/k2 estimates are biased, and k1 can go negative and be exploited"
            )

    @property
    def sequences_per_step(self) -> int:
        """Sequences sampled and trained on per step (one per prompt here; G per prompt for group methods)."""
        return self.rollout_batch_size

    @property
    def _sequences_name(self) -> str:
        return "rollout_batch_size"

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.mini_batch_size // self.micro_batch_size

    @property
    def num_mini_batches(self) -> int:
        return self.sequences_per_step // self.mini_batch_size

    @property
    def num_steps(self) -> int:
        return self.total_episodes // self.rollout_batch_size

    @property
    def aggregation_constant(self) -> float:
        """The constant of the token-sum-norm aggregation."""
        return float(self.loss_norm_constant or self.sampling.max_new_tokens)


# ---------------------------------------------------------------------------------------------------
# dict <-> dataclass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or the command line) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, Sequence, tuple):
        if isinstance(value, str):
            if value.strip().startswith("["):
                try:
                    value = yaml.safe_load(value)
                except yaml.YAMLError:
                    raise ConfigError(f"{where}: cannot read the list {value!r}") from None
            else:
                value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where=where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, str | int | float | Path):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type[C], data: Mapping[str, Any], where: str = "") -> C:
    """Build dataclass ``cls`` from a mapping; unknown keys and bad values raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)} for {cls.__name__}; "
            f"valid keys: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{cls.__name__}: {exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form of a config (for YAML, logging backends and checkpoints)."""
    return dataclasses.asdict(cfg)


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping of fields, got {type(data).__name__}")
    return dict(data)


def load_yaml(cls: type[C], path: str | Path) -> C:
    """Read a YAML file into ``cls``; errors name the file."""
    data = _read_yaml_mapping(path)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def split_args(argv: Sequence[str]) -> dict[str, str]:
    """``["--a.b", "1", "--c=x", "--flag"]`` -> ``{"a.b": "1", "c": "x", "flag": "true"}``.

    Dashes in names become underscores, so ``--output-dir`` and ``--output_dir`` are the same key.
    """
    out: dict[str, str] = {}
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options are written --name value")
        name = arg[2:]
        if "=" in name:
            name, value = name.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 1
        else:
            value = "true"
        out[name.replace("-", "_")] = value
        i += 1
    return out


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal under each field), by field name.

    Help text lives once, next to the field; this reads it back for ``--help`` (as tyro and simple-parsing do).
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # source not available (e.g. a frozen app)
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def config_help(cls: type, prefix: str = "", width: int = 100) -> list[str]:
    """``--help`` lines for every field of dataclass ``cls``: ``--name  type = default`` and its docstring.

    Nested dataclasses are listed under their dotted names (``--sampling.max_new_tokens``), which is how
    they are set on the command line; ``Literal`` choices are shown as ``a|b|c``.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    lines: list[str] = []
    nested: list[tuple[str, type]] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested.append((f.name, tp))  # type: ignore[arg-type]
            continue
        if typing.get_origin(tp) is Literal:
            type_text = "|".join(str(a) for a in typing.get_args(tp))
        else:
            type_text = _type_name(tp).replace("NoneType", "None")
        lines.append(f"  --{prefix}{f.name}  {type_text} = {_default_of(f)!r}")
        if f.name in docs:
            lines += textwrap.wrap(docs[f.name], width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    for name, tp in nested:
        lines += config_help(tp, f"{prefix}{name}.", width)
    return lines


def take_repeated(argv: Sequence[str], name: str) -> tuple[list[str], list[str]]:
    """Pull every ``--name VALUE`` / ``--name=VALUE`` out of ``argv``: (values in order, the other arguments).

    For options that may be given several times (``--reward`` to compose rewards), which the one-value-per-key
    parser of :func:`load_config` would otherwise collapse.
    """
    values: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == f"--{name}" and i + 1 < len(argv):
            values.append(argv[i + 1])
            i += 2
        elif argv[i].startswith(f"--{name}="):
            values.append(argv[i].split("=", 1)[1])
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    return values, rest


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, nested mappings merged key by key (a preset's sampling block keeps its other keys)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load_config(
    cls: type[C], argv: Sequence[str], extra: Sequence[str] = (), base_file: str | Path | None = None
) -> tuple[C, dict[str, str]]:
    """Parse ``[--config FILE.yaml] [--field value | --block.field value ...]`` into ``cls``.

    Values given on the command line override the file, and the file overrides ``base_file`` (a preset)
    when one is given. Names listed in ``extra`` (for example ``policy`` or ``prompts``) are returned
    separately instead of being treated as config fields.
    """
    args = split_args(argv)
    base: dict[str, Any] = {}
    if base_file is not None:
        base = _read_yaml_mapping(base_file)
    config_path = args.pop("config", None)
    if config_path is not None:
        base = _merge(base, _read_yaml_mapping(config_path))
    extras = {k: args.pop(k) for k in list(args) if k in extra}
    for key, raw in args.items():
        # Kept as text: _coerce converts it to the field's type (YAML would turn "0123" into 83).
        _set_dotted(base, key, raw)
    try:
        return from_dict(cls, base), extras
    except ConfigError as exc:
        where = ", ".join(str(p) for p in (base_file, config_path) if p is not None)
        raise ConfigError(f"{where}: {exc}" if where else str(exc)) from None
