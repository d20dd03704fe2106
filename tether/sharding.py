"""Sharded models under several processes: PyTorch FSDP2 (``fully_shard``), one unit per decoder layer.

With ``sharding: fsdp`` the trained models (policy, value model) keep only their 1/N share of every weight,
gradient and AdamW state on each of N processes; a layer's full weights exist only while it runs. The rest of
tether does not change: a forward is a forward, the loss is still divided by the *global* token count, and the
gradient reduce-scatter is a sum (not FSDP's default mean), so the sharded gradient is exactly the shard of the
one-process gradient.

What sharding changes, and where this module handles it:

- every process must run the same number of forwards (each one all-gathers a layer's weights), so generation
  goes on until every process is done (``synced_gpus``) and uses ``torch.no_grad`` rather than
  ``inference_mode`` (FSDP reuses the gathered buffers in training);
- a checkpoint or ``final/`` needs the *full* weights: :func:`full_state_dict` gathers them (a collective, on
  every process) and the main process writes them with ``save_pretrained``, so ``final/`` loads with
  ``from_pretrained`` and a run resumes under any number of processes;
- the optimiser state is saved keyed by parameter name (:func:`full_optimizer_state`), not by position, so it
  loads into a sharded or a whole model alike.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from tether.config import ConfigError, RLConfig
from tether.zero import accelerate_asks_deepspeed, apply_accelerate_deepspeed, check_zero_config

#: The accelerate config's FSDP sharding strategies tether runs, by name or number: whether each frees a layer's
#: gathered weights after its forward (accelerate's FSDP2 configs say it with fsdp_reshard_after_forward).
_SHARDING_STRATEGIES = {"FULL_SHARD": True, "1": True, "SHARD_GRAD_OP": False, "2": False}


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is (or holds) an FSDP2 unit."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def model_class(model: nn.Module) -> type[nn.Module]:
    """The model's own class (``fully_shard`` swaps in a subclass that also derives from ``FSDPModule``)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if issubclass(cls, FSDPModule):
        return next(base for base in cls.__bases__ if base is not FSDPModule)
    return cls


def accelerate_asks_fsdp() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config (it says so in the environment)."""
    strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and strategy not in ("NO_SHARD", "3")


def apply_launcher_settings(config: RLConfig, world_size: int, has_group: bool | None = None) -> list[str]:
    """Read what ``accelerate launch`` passes in the environment into ``config``; return what changed.

    An FSDP accelerate config turns ``sharding`` to "fsdp" (and NO_SHARD leaves it "none"); its mixed precision
    sets ``mixed_precision`` when the tether config leaves it "no". ``has_group``: whether a process group is
    open (default: more than one process); FSDP needs one, even of one process under ``torchrun``. A DeepSpeed
    accelerate config turns ``sharding`` to "deepspeed" with its ZeRO stage (:mod:`tether.zero`: stages 1 and 2).
    """
    changed: list[str] = []
    env = os.environ
    if accelerate_asks_deepspeed():
        changed += apply_accelerate_deepspeed(config)
    if accelerate_asks_fsdp() and config.sharding == "none":
        config.sharding = "fsdp"
        changed.append("sharding=fsdp (accelerate FSDP config)")
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision in ("bf16", "fp16") and config.mixed_precision == "no":
        config.mixed_precision = precision  # type: ignore[assignment]
        changed.append(f"mixed_precision={precision} (accelerate config)")
    if config.sharding in ("fsdp", "deepspeed") and not (has_group if has_group is not None else world_size > 1):
        config.sharding = "none"
        changed.append("sharding=none (one process without a launcher: nothing to shard over)")
    if config.sharding == "deepspeed":
        check_zero_config(config)
    return changed


def reshard_after_forward() -> bool:
    """Whether a layer's gathered weights are freed after its forward (FULL_SHARD, ZeRO-3-like; the default) or
    kept until its backward (SHARD_GRAD_OP, ZeRO-2-like), from the accelerate config's environment."""
    strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper()
    if strategy not in _SHARDING_STRATEGIES:
        raise ConfigError(
            f"FSDP_SHARDING_STRATEGY {strategy!r} is not supported; use FULL_SHARD or SHARD_GRAD_OP "
            "(HYBRID_SHARD needs a 2-D device mesh, which tether does not build yet)"
        )
    if not _SHARDING_STRATEGIES[strategy]:
        return False
    return os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"


def decoder_layer_names(model: nn.Module) -> set[str]:
    """Class names of the model's repeated blocks, from transformers' ``_no_split_modules``."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def shard_model(model: nn.Module, root: nn.Module | None = None) -> nn.Module:
    """Shard ``model`` in place with FSDP2: each decoder layer a unit, the rest (embeddings, head) the root unit.

    ``root``: the submodule whose forward is called when not the model itself (a reward model's backbone, which
    tether calls directly to pool at the last token); what lies outside it (the score head) stays whole.
    Gradients are summed over processes (not averaged): tether's loss is already divided by the global count.
    """
    root = model if root is None else root
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from tether.models import is_peft_model

    if is_peft_model(model):
        raise ConfigError(
            "sharding: fsdp with a LoRA (peft) policy is not supported yet; LoRA trains few weights, so run it "
            "with sharding: none (each process holds the frozen base model) - see docs/distributed.md"
        )
    layers = decoder_layer_names(model)
    if not layers:
        raise ConfigError(
            f"cannot shard {type(model).__name__}: it names no decoder-layer class (_no_split_modules); "
            "use sharding: none"
        )
    reshard = reshard_after_forward()
    for module in list(root.modules()):
        if type(module).__name__ in layers:
            fully_shard(module, reshard_after_forward=reshard)
    fully_shard(root, reshard_after_forward=reshard)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    return model


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state dict of ``model`` on CPU (a collective: call it on every process).

    The main process gets every tensor; the others may get an empty dict. An unsharded model's own state dict.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=_options())


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole state dict (read by every process) into a sharded ``model``."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(strict=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser state keyed by parameter name, unsharded, on CPU (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options())


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an optimiser state keyed by parameter name (as :func:`full_optimizer_state` saves it)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options())


def optimizer_state_by_name(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """A plain ``optimizer.state_dict()`` (keyed by position) keyed by parameter name instead.

    Positions follow ``model.parameters()`` order, as tether's optimisers are built: so a checkpoint written
    by one whole-model process resumes under sharding.
    """
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def optimizer_state_by_position(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_state_by_name`: what ``optimizer.load_state_dict`` of a whole model takes."""
    index = {name: i for i, name in enumerate(n for n, p in model.named_parameters() if p.requires_grad)}
    groups = [{**g, "params": [index[name] for name in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[name]: s for name, s in state["state"].items()}, "param_groups": groups}
