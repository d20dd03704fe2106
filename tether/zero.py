"""DeepSpeed ZeRO (stages 1 and 2) for the trained model: ``sharding: deepspeed``, or a DeepSpeed accelerate config.

The trained module (PPO: policy and value model together; GRPO: the policy) is handed to ``deepspeed.initialize``
with tether's own AdamW and learning-rate schedule; ZeRO-1 splits the AdamW state (and the float32 master weights)
over the processes, ZeRO-2 the gradients too. The weights stay whole on every process, so rollouts, frozen models
and ``final/`` do not change. What this module keeps as tether has it:

- **Gradients are sums.** tether's loss is already divided by the mini-batch's *global* token (or sequence) count,
  so the gradient of a mini-batch is the sum of every process's micro-batch gradients. DeepSpeed averages over
  the data-parallel processes (and divides by ``gradient_accumulation_steps`` unless told not to): the loss is
  multiplied by the number of processes before its backward and ``scale_wrt_gas=False``, so the average is the
  sum (exactly for a power-of-two number of processes, to float rounding otherwise). The accumulation boundary is
  set by hand on the last micro-batch, so the number of micro-batches does not have to match a configured count.
- **Clipping** at ``max_grad_norm`` is DeepSpeed's (the global norm over the partitions, torch's formula).
- **Never a step on NaN / inf**: the engine checks the reduced gradients (what it does for fp16 only by default)
  and skips the step; the trainer counts it in ``numerics/skipped_updates`` as it does without DeepSpeed.
- **Checkpoints hold whole tensors**, keyed by parameter name: :func:`zero_optimizer_state` gathers AdamW's
  partitioned state (a collective) into the format a whole-model or FSDP run writes, so a ZeRO run resumes under
  any number of processes, with or without DeepSpeed, and the other way round.

Not supported (each a clear error): ZeRO-3 (use ``sharding: fsdp``, which shards the weights as ZeRO-3 does),
CPU / NVMe offload, fp16 (its loss scaler; bf16 autocast works), ``micro_batch_tokens``, ``shard_frozen_models``,
a LoRA policy, and ``tether rm``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

from tether.backend import TorchDistributed
from tether.config import ConfigError, RLConfig

#: What to install when the deepspeed package is missing.
INSTALL_HINT = "pip install 'tether[deepspeed]' (deepspeed==0.18.0)"


def deepspeed_available() -> bool:
    """Whether ``import deepspeed`` works (it is an optional dependency)."""
    try:
        import deepspeed  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails while importing
        return False
    return True


def accelerate_asks_deepspeed() -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config (it says so in the environment)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def _accelerate_deepspeed_file() -> dict[str, Any]:
    """The DeepSpeed JSON file an accelerate config names (``deepspeed_config_file``), or {}."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path:
        return {}
    with open(path) as f:
        loaded = json.load(f)
    return loaded if isinstance(loaded, dict) else {}


def accelerate_zero_settings() -> dict[str, Any]:
    """The ZeRO stage and offload devices an accelerate DeepSpeed config asks for (from its environment, or
    from the DeepSpeed JSON file it names); a key is absent when the config does not say."""
    env = os.environ
    out: dict[str, Any] = {}
    zero = _accelerate_deepspeed_file().get("zero_optimization") or {}
    if "stage" in zero and zero["stage"] != "auto":
        out["stage"] = int(zero["stage"])
    for what in ("offload_optimizer", "offload_param"):
        device = (zero.get(what) or {}).get("device")
        if device not in (None, "none", "auto"):
            out[what] = str(device)
    if env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        out["stage"] = int(env["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    for what, name in (("offload_optimizer", "OPTIMIZER"), ("offload_param", "PARAM")):
        device = env.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{name}_DEVICE", "none").lower()
        if device != "none":
            out[what] = device
    return out


def apply_accelerate_deepspeed(config: RLConfig) -> list[str]:
    """A DeepSpeed accelerate config into ``config``: ``sharding`` "deepspeed" and its ZeRO stage; what changed."""
    if config.sharding == "fsdp":
        raise ConfigError(
            "the accelerate config asks for DeepSpeed but the tether config sets sharding: fsdp; use an FSDP "
            "accelerate config, or sharding: none / deepspeed"
        )
    changed = []
    if config.sharding != "deepspeed":
        config.sharding = "deepspeed"
        changed.append("sharding=deepspeed (accelerate DeepSpeed config)")
    settings = accelerate_zero_settings()
    for what, device in settings.items():
        if what != "stage":
            raise ConfigError(
                f"the accelerate DeepSpeed config asks for {what} to {device!r}: tether does not offload yet; set "
                f"{what}_device: none (or use sharding: fsdp) - see docs/distributed.md"
            )
    stage = settings.get("stage")
    if stage is not None and stage != config.zero_stage:
        if stage not in (1, 2):
            raise ConfigError(
                f"the accelerate DeepSpeed config asks for ZeRO stage {stage}: tether runs ZeRO stages 1 and 2; "
                "for ZeRO-3-like sharding use an FSDP accelerate config (examples/accelerate/fsdp.yaml) - see "
                "docs/distributed.md"
            )
        config.zero_stage = stage
        changed.append(f"zero_stage={stage} (accelerate DeepSpeed config)")
    return changed


def check_zero_config(config: RLConfig) -> None:
    """What ``sharding: deepspeed`` does not run yet, refused before anything loads."""
    if not deepspeed_available():
        raise ConfigError(f"sharding: deepspeed needs the deepspeed package: {INSTALL_HINT}")
    refused = {
        "mixed_precision: fp16 (DeepSpeed's engine does not take tether's loss scaler; use bf16)": (
            config.mixed_precision == "fp16"
        ),
        "micro_batch_tokens (use micro_batch_size)": config.micro_batch_tokens is not None,
        "shard_frozen_models (frozen models stay whole under DeepSpeed; use sharding: fsdp)": (
            config.shard_frozen_models
        ),
    }
    for what, bad in refused.items():
        if bad:
            raise ConfigError(f"sharding: deepspeed does not support {what} - see docs/distributed.md")


def deepspeed_config(config: RLConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of the trained model: ZeRO stage, clipping, float32 weights (tether's autocast runs
    the forwards), no logging. The batch sizes are what DeepSpeed requires to agree with each other; tether marks
    the accumulation boundary itself."""
    per_process = config.mini_batch_size // world_size
    accumulation = max(1, -(-per_process // config.micro_batch_size))
    return {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": config.micro_batch_size * accumulation * world_size,
        "gradient_clipping": config.max_grad_norm or 0.0,
        "zero_optimization": {"stage": config.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class ZeroBackend(TorchDistributed):
    """:class:`TorchDistributed` whose trained model is a DeepSpeed ZeRO engine (:meth:`prepare`).

    The update loop (:func:`tether.trainers.common.run_updates`) calls :meth:`backward` for each micro-batch and
    :meth:`step` once per mini-batch instead of ``loss.backward()``, the gradient all-reduce, clipping and
    ``optimizer.step()``.
    """

    def __init__(self, config: RLConfig, timeout_s: float | None = None) -> None:
        super().__init__(timeout_s)
        self.config = config
        self.engine: Any = None
        self._keeps_last_micro_batch_only = False

    def prepare(self, trained: nn.Module, optimizer: torch.optim.Optimizer) -> Any:
        """Wrap ``trained`` and its AdamW (tether's, built over ``trained.parameters()``) in a ZeRO engine.

        The learning-rate schedule stays tether's: it was built on ``optimizer``, whose parameter groups
        DeepSpeed keeps (it swaps in its flat float32 partitions as their parameters).
        """
        import deepspeed

        from tether.models import is_peft_model

        if any(is_peft_model(m) for m in trained.modules()):
            raise ConfigError(
                "sharding: deepspeed with a LoRA (peft) policy is not supported yet; use sharding: none"
            )
        engine, *_ = deepspeed.initialize(
            model=trained, optimizer=optimizer, config=deepspeed_config(self.config, self.world_size)
        )
        # A float32 engine does not look for NaN / inf before its step (only fp16 / bf16 ones do): tether never
        # trains on them, so turn the check on; the step is then skipped and `optimizer.overflow` says so.
        engine.optimizer.check_grad_overflow = True
        self._keeps_last_micro_batch_only = drops_accumulated_gradients(engine.optimizer)
        self.engine = engine
        return engine

    def all_reduce_grads(self, params: list[nn.Parameter]) -> None:
        return None  # DeepSpeed reduced (and partitioned) the gradients in its backward

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """The backward of one micro-batch's loss; ``last``: the mini-batch's last micro-batch (the reduction
        of ZeRO-1 and the step happen there).

        DeepSpeed averages gradients over the processes; the loss is already divided by the global count, so
        multiplying it by the number of processes makes that average the sum tether's update needs.
        """
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        if not last and self._keeps_last_micro_batch_only:
            _keep_accumulated_gradients(self.engine.optimizer)

    def step(self) -> bool:
        """Clip at ``max_grad_norm`` and step AdamW, unless a gradient is NaN / inf; returns whether it stepped."""
        self.engine.step()
        return not bool(self.engine.optimizer.overflow)


def drops_accumulated_gradients(zero: Any) -> bool:
    """Whether ``zero`` (a ZeRO-2 optimizer) has DeepSpeed 0.18's accumulation bug: after each backward before
    the boundary its epilogue *replaces* the partition's accumulated gradients (``all_grad_tensors``) instead of
    adding to them, because it tests ``averaged_gradients[i] is None`` (always None until the boundary), so only
    the last micro-batch's gradient reaches the step (measured: 2 micro-batches gave 0.17-0.87 x the gradient)."""
    import inspect

    if not getattr(zero, "partition_gradients", False) or not hasattr(zero, "all_grad_tensors"):
        return False
    source = inspect.getsource(type(zero).independent_gradient_partition_epilogue)
    return (
        "self.averaged_gradients[i] is None:" in source
        and "self.all_grad_tensors[i] = self.get_all_grad" in source
    )


def _keep_accumulated_gradients(zero: Any) -> None:
    """After a backward before the boundary: mark each group's gradients as accumulating (a non-None
    ``averaged_gradients`` entry, which the boundary's backward overwrites with the real one), so the next
    backward adds to them (:func:`drops_accumulated_gradients`)."""
    for i, grads in zero.all_grad_tensors.items():
        if grads is not None and zero.averaged_gradients.get(i) is None:
            zero.averaged_gradients[i] = []


def zero_managed(model: nn.Module) -> bool:
    """Whether ``model``'s parameters belong to a ZeRO-1/2 engine (their storage is the engine's flat buffer)."""
    return any(hasattr(p, "_hp_mapping") for p in model.parameters())


def whole_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a ZeRO-1/2 ``model``, each tensor cloned out of the engine's flat buffer (safetensors and
    ``save_pretrained`` refuse tensors that share one storage; ``torch.save`` would write the whole buffer)."""
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _names(trained: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in trained.named_parameters()}


def _state_keys(optimizer: torch.optim.Optimizer, flat: torch.Tensor) -> list[str]:
    """AdamW's per-element state of a flat partition (exp_avg, exp_avg_sq, ...), in a fixed order."""
    return sorted(k for k, v in optimizer.state[flat].items() if torch.is_tensor(v) and v.shape == flat.shape)


def zero_optimizer_state(engine: Any, trained: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """AdamW's state keyed by parameter name, whole tensors on CPU, as a whole-model run saves it (a collective:
    call it on every process). Empty state before the first step, as torch's."""
    from deepspeed.utils import safe_get_full_optimizer_state

    zero, names = engine.optimizer, _names(trained)
    state: dict[str, dict[str, Any]] = {}
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        params = zero.bit16_groups[i]
        groups.append(
            {**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in params]}
        )
        flat = zero.single_partition_of_fp32_groups[i]
        if flat not in optimizer.state:  # not stepped yet (the same on every process)
            continue
        step = optimizer.state[flat].get("step")
        keys = _state_keys(optimizer, flat)
        for p in params:
            entry: dict[str, Any] = {} if step is None else {"step": step.detach().clone().cpu()}
            for key in keys:
                entry[key] = safe_get_full_optimizer_state(p, key).detach().to(p.dtype).cpu()
            state[names[id(p)]] = entry
    return {"state": state, "param_groups": groups}


def load_zero_optimizer_state(
    engine: Any, trained: nn.Module, optimizer: torch.optim.Optimizer, named: dict[str, Any]
) -> None:
    """Load a name-keyed AdamW state (:func:`zero_optimizer_state`, or a whole-model / FSDP checkpoint's) into
    the engine, after the checkpoint's weights were loaded into ``trained``: the engine's float32 master copy is
    set from those weights first (it is what the next step updates)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero, names = engine.optimizer, _names(trained)
    for p in trained.parameters():
        if p.requires_grad:
            safe_set_full_fp32_param(p, p.detach())
    for group, saved in zip(optimizer.param_groups, named["param_groups"], strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})  # the learning rate the schedule set
    if not named["state"]:
        return
    if not zero._hp_optimizer_states_linked:
        # torch's AdamW creates its state at the first step, and DeepSpeed links each parameter to its slice of
        # that state then: create it now (the values are set below), and link.
        for i, flat in enumerate(zero.single_partition_of_fp32_groups):
            first = named["state"][names[id(zero.bit16_groups[i][0])]]
            optimizer.state[flat] = {
                k: v.detach().clone() if k == "step" else torch.zeros_like(flat) for k, v in first.items()
            }
        zero._lazy_init_hp_params_optimizer_state()
    for i, flat in enumerate(zero.single_partition_of_fp32_groups):
        params = zero.bit16_groups[i]
        step = named["state"][names[id(params[0])]].get("step")
        if step is not None:
            optimizer.state[flat]["step"] = step.detach().clone()
        for p in params:
            for key, value in named["state"][names[id(p)]].items():
                if key != "step":
                    safe_set_full_optimizer_state(p, value.to(torch.float32), key)
