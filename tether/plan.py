"""``tether plan``: the memory a run needs, estimated before anything is loaded (OOM is the most common failure).

A step goes through phases: generation, rollout forwards, update forward and backward, optimiser step. What is
*held* (weights, gradients, AdamW state, at the weights' dtype) is there in all of them; each phase adds its own
working set; the estimate is held + the largest phase. Letters: B sequences this process samples, c the rollout
forward's chunk, m micro_batch_size, P max_prompt_length, T max_new_tokens, L = P + T, V vocabulary, h hidden
size, i MLP width. The constants were measured on transformers 5 / torch 2.13 with the profiler's exact tensor
accounting (each phase within 10 %); tests/test_plan.py checks a whole run's peak RSS. Not counted: a value model
started from a reward model (counted as a copy of the policy's backbone), the reward models' forwards, and the
whole weights and optimiser state a sharded checkpoint gathers into the main process's RAM.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from tether.config import ConfigError, RLConfig

MiB, GiB = 2**20, 2**30
#: Per token and decoder layer, what a Llama-style layer saves for its backward, in values of size h: each
#: RMSNorm its input, normalised input and scaled output (2 x 3); attention q, k, v after RoPE (k, v repeated to
#: every head, as transformers does when a padding mask is passed) and its output, o_proj's input (4). And of
#: size i: gate, SiLU(gate), up and their product (4). Counted with torch's saved_tensors_hooks.
SAVED_H, SAVED_I = 10, 4
#: The same in bytes under autocast: the norms stay float32 (input, normalised: 16); each linear saves its own
#: half copy of its input (q, k, v, gate, up) and attention half q, k, v, output (18); the MLP's four are half.
SAVED_H_BYTES_AUTOCAST, SAVED_I_BYTES_AUTOCAST = 34, 8
#: What the final norm saves for the LM head, bytes per h (float32: 3 x 4; autocast: 2 x 4 and a half copy).
FINAL_NORM_BYTES = {False: 12, True: 10}
#: A no-grad forward frees each layer's tensors as it goes: its peak is 8 h + 3 i values per token (measured on
#: h 256-768, i 1408-2048, within 3 %). The backward needs 2 i values per token beyond the saved tensors.
NO_GRAD_H, NO_GRAD_I, BACKWARD_I = 8, 3, 2
#: float32 [rows, V] temporaries of entropy_from_logits per block of rows (log-softmax, exp, p log p, zeros, where).
ENTROPY_BLOCK_TEMPS, ROWS_PER_BLOCK = 5, 256  # tether.logprobs._ROWS_PER_BLOCK
#: AdamW on CPU updates a tensor at a time, with three temporaries the size of the largest (measured).
ADAMW_CPU_TEMPS = 3
#: Libraries, tokenizer, prompts, kernel workspaces: a run of a 0.05M-parameter model adds 42 MiB of RSS on CPU.
RUNTIME_BYTES = 48 * MiB
#: Headroom a plan keeps above its estimate of live memory for freed blocks the allocator holds on to (glibc's heap
#: on CPU, PyTorch's caching allocator on CUDA): on CPU, peak RSS exceeded the estimate by up to 16 % in eight runs
#: (by 1 % with MALLOC_MMAP_THRESHOLD_=65536, which hands freed blocks back). Not measured on CUDA.
ALLOCATOR_HEADROOM = 0.15
#: The LoRA rank assumed when suggesting LoRA (adapters on every linear layer of every decoder layer).
ADVICE_LORA_RANK = 16


class ModelShape(NamedTuple):
    """What the estimate needs to know about a model: its sizes (from its config) and exact parameter counts."""

    params: int  # all parameters (tied embeddings once)
    trainable: int  # parameters the optimiser updates (a LoRA policy: the adapters)
    param_bytes: int  # bytes per parameter (its dtype)
    largest: int  # elements of the largest trainable tensor
    layer_params: int  # parameters of one decoder layer
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    lora: bool = False  # a peft model: its reference is the same network with the adapters off
    lora_trained: bool = False  # ... unless its adapters already change the function (then a merged copy)


def _dims(cfg: Any) -> tuple[Any, ...]:
    """V, h, i, layers, heads, kv heads, head dim and tying from a transformers config (Llama or GPT-2 names)."""
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    def get(*names: str, default: Any = None) -> Any:
        return next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), default)

    h, heads = int(get("hidden_size", "n_embd", "d_model")), int(get("num_attention_heads", "n_head"))
    i = int(get("intermediate_size", "n_inner", default=4 * h))
    layers = int(get("num_hidden_layers", "n_layer"))
    kv, dim = int(get("num_key_value_heads", default=heads)), int(get("head_dim", default=h // heads))
    return int(get("vocab_size")), h, i, layers, heads, kv, dim, get("tie_word_embeddings") is not False


def _layer_params(model: nn.Module) -> int:
    """Parameters of the largest repeated block (the classes transformers' ``_no_split_modules`` names)."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    return max((sum(p.numel() for p in m.parameters()) for m in blocks), default=0)


def model_shape(source: Any, causal: bool = True) -> ModelShape:
    """The :class:`ModelShape` of a model directory or transformers config, read but never loaded (the model is
    built on the meta device to count its parameters exactly), or of a model instance (peft: adapters train).
    ``causal``: a causal LM (a policy), else a sequence classifier (a reward model)."""
    import transformers

    from tether.models import is_peft_model, lora_is_trained

    if isinstance(source, nn.Module):
        params = list({id(p): p for p in source.parameters()}.values())
        trained = [p.numel() for p in params if p.requires_grad]
        total, lora = sum(p.numel() for p in params), is_peft_model(source)
        sizes = total, sum(trained), params[0].element_size(), max(trained, default=0), _layer_params(source)
        return ModelShape(*sizes, *_dims(source.config), lora, lora and lora_is_trained(source))
    cfg = source
    if not isinstance(source, transformers.PretrainedConfig):
        if not (Path(source) / "config.json").is_file():
            raise ConfigError(f"{source} is not a model directory (no config.json there)")
        cfg = transformers.AutoConfig.from_pretrained(Path(source))
    dtype = (cfg.dtype if hasattr(cfg, "dtype") else getattr(cfg, "torch_dtype", None)) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if causal:
        dtype = torch.float32  # tether.models.load_causal_lm loads a policy in float32 whatever the checkpoint
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForSequenceClassification
    try:
        with torch.device("meta"):
            meta = auto.from_config(cfg)
    except (ValueError, KeyError, ImportError) as exc:
        raise ConfigError(f"cannot build {type(cfg).__name__} to count its parameters: {exc}") from None
    sizes = [p.numel() for p in meta.parameters()]
    return ModelShape(sum(sizes), sum(sizes), dtype.itemsize, max(sizes), _layer_params(meta), *_dims(cfg))


def with_lora(shape: ModelShape, rank: int = ADVICE_LORA_RANK) -> ModelShape:
    """``shape`` with fresh rank-``rank`` LoRA adapters on every linear layer of every decoder layer."""
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    adapters = shape.layers * rank * (2 * (h + q) + 2 * (h + kv) + 3 * (h + i))  # each linear: r (in + out)
    return shape._replace(params=shape.params + adapters, trainable=adapters, largest=rank * i, lora=True)


def value_shape(shape: ModelShape) -> ModelShape:
    """The value model PPO builds from a policy: a copy of its backbone (all of it trained) and a 1-output head."""
    base = shape.params - (shape.trainable if shape.lora else 0)  # a LoRA policy's adapters are merged away
    params = base - (0 if shape.tied else shape.vocab * shape.hidden) + shape.hidden + 1
    return shape._replace(params=params, trainable=params, largest=shape.vocab * shape.hidden, lora=False)


class MemoryItem(NamedTuple):
    """One line of a plan: what, its bytes, and its phase ("held" items are there in every phase)."""

    what: str
    bytes: int
    phase: str


@dataclass(frozen=True)
class MemoryPlan:
    """One process's memory for a run: the items, the device's free bytes, and advice when it does not fit."""

    items: tuple[MemoryItem, ...]
    available: int | None  # bytes free on the device (RAM on CPU); None when unknown
    device: str
    world_size: int
    advice: tuple[str, ...] = ()

    def phase_bytes(self, phase: str) -> int:
        return sum(it.bytes for it in self.items if it.phase == phase)

    @property
    def phases(self) -> dict[str, int]:
        """Each phase's peak: held + its own items ("load", the start-up before sharding, is its items alone)."""
        held = self.phase_bytes("held")
        names = dict.fromkeys(it.phase for it in self.items if it.phase != "held")
        return {p: self.phase_bytes(p) + (0 if p == "load" else held) for p in names} or {"held": held}

    @property
    def peak_phase(self) -> str:
        return max(self.phases.items(), key=lambda kv: kv[1])[0]

    @property
    def total(self) -> int:
        return max(self.phases.values())

    @property
    def needed(self) -> int:
        """The total and the allocator's headroom: what the device must have free."""
        return int(self.total * (1 + ALLOCATOR_HEADROOM))

    @property
    def fits(self) -> bool:
        return self.available is None or self.needed <= self.available


def layer_bytes(sh: ModelShape, tokens: int, seq_len: int, elem: int, autocast: bool) -> int:
    """What one decoder layer saves for its backward: SAVED_H h + SAVED_I i values of ``elem`` bytes a token (or
    the autocast bytes), the attention's log-sum-exp (a float per head), two rsqrt, and the additive padding
    mask each layer's attention keeps (``seq_len`` values a token)."""
    h_bytes = SAVED_H_BYTES_AUTOCAST if autocast else elem * SAVED_H
    i_bytes = SAVED_I_BYTES_AUTOCAST if autocast else elem * SAVED_I
    mask = (2 if autocast else elem) * seq_len
    return tokens * (h_bytes * sh.hidden + i_bytes * sh.intermediate + 4 * sh.heads + 8 + mask)


def activation_bytes(sh: ModelShape, tokens: int, seq_len: int, elem: int, autocast: bool, ckpt: bool) -> int:
    """What a forward with gradients saves for its backward, LM head excluded: every layer's set, or under
    gradient checkpointing (``ckpt``) each layer's float32 input alone; and the final norm's."""
    per_layer = tokens * 4 * sh.hidden if ckpt else layer_bytes(sh, tokens, seq_len, elem, autocast)
    return sh.layers * per_layer + tokens * (FINAL_NORM_BYTES[autocast] * sh.hidden + 8)


def no_grad_bytes(sh: ModelShape, tokens: int, elem: int) -> int:
    """Peak working set of a no-grad forward through the layers."""
    return tokens * elem * (NO_GRAD_H * sh.hidden + NO_GRAD_I * sh.intermediate)


def plan_items(
    config: RLConfig, algo: str, policy: ModelShape, rewards: Sequence[ModelShape], world: int, cuda: bool
) -> list[MemoryItem]:
    """Every item of one process's memory, by phase (the letters are the module docstring's)."""
    from tether.kl import kl_needs_logits, kl_needs_loss_term
    from tether.sampling import kl_biasing_settings

    cfg, sp, n, s = config, config.sampling, max(world, 1), policy.param_bytes
    items: list[MemoryItem] = []

    def add(what: str, size: float, phase: str = "held") -> None:
        items.append(MemoryItem(what, int(size), phase))

    fsdp, ac, ckpt = cfg.sharding == "fsdp" and n > 1, cfg.mixed_precision != "no", cfg.gradient_checkpointing
    split, frozen = (n, n if cfg.shard_frozen_models else 1) if fsdp else (1, 1)
    logit = 2 if ac else s  # the LM head's output
    P, T, V, h = cfg.max_prompt_length, sp.max_new_tokens, policy.vocab, policy.hidden
    L, G, m = P + T, int(getattr(cfg, "num_generations", 1)) if algo == "grpo" else 1, cfg.micro_batch_size
    B = math.ceil(cfg.rollout_batch_size / n) * G
    c = min(cfg.forward_batch_size or m, B)
    has_ref = algo == "ppo" or cfg.kl.coef > 0 or cfg.kl.target is not None
    trained = [("policy", policy)] + ([("value model", value_shape(policy))] if algo == "ppo" else [])

    # 1. held: weights, gradients (kept from one optimiser step to the next mini-batch), AdamW's two moments
    for name, sh in trained:
        add(f"{name} weights" + (f" (a 1/{n} shard)" if fsdp else ""), sh.params * s / split)
        add(f"{name} gradients", sh.trainable * s / split)
        add(f"{name} AdamW state (2 moments)", 2 * sh.trainable * s / split)
    if has_ref and policy.lora and not policy.lora_trained:
        add("reference: the policy with its adapters off", 0)
    elif has_ref:
        add("reference weights (frozen copy)", (policy.params - policy.trainable * policy.lora) * s / frozen)
    for k, r in enumerate(rewards):
        add(f"reward model {k + 1} weights", r.params * r.param_bytes / frozen)
    add("runtime (libraries, kernels, tokenizer, prompts)", RUNTIME_BYTES)

    # 2. generation: B sequences at once, the KV cache growing to L (a layer's copy while torch.cat grows it)
    kv = 2 * (policy.layers + 1) * B * policy.kv_heads * policy.head_dim * L * s
    add(f"KV cache ({B} sequences x {L} tokens)", kv, "generation")
    prompt = no_grad_bytes(policy, B * P, s)
    if getattr(sp, "engine", "hf") == "tether":  # its prompt forward runs the LM head on the last position only
        add("prompt forward", prompt, "generation")
        add("decoding step: float32 [B, V] scores, softmax, log-softmax", 4 * B * V * 4, "generation")
    else:  # transformers' generate keeps every step's float32 scores [B, V]; tether stacks them afterwards
        add("prompt forward", prompt, "generation")
        add("every step's float32 scores [B, V]", B * T * V * 4 + 3 * B * V * 4, "generation")
        stack = 2 * B * T * V * 4 + 2 * min(T, ROWS_PER_BLOCK) * V * 4
        add("scores and their stack [B, T, V]", stack, "sampled logprobs")

    # 3. rollout forwards, c sequences at a time: build_rollout's `fwd` and `terms` still hold the previous
    # chunk's policy (and reference) logits while the next chunk's are computed
    # the LM head runs on the T + 1 last positions only (logits_to_keep), not on the prompt
    alive = (2 if has_ref else 1) * (2 if B > c else 1)
    add(f"logits ({alive} x [{c}, {T + 1}, {V}])", alive * c * (T + 1) * V * logit, "rollout")
    copies = int(logit != 4) + int(sp.temperature != 1.0)  # float32 / temperature-scaled copies of logits
    blocks = ENTROPY_BLOCK_TEMPS * min(T, ROWS_PER_BLOCK) * V * 4
    add("log-softmax and entropy temporaries", copies * c * T * V * 4 + blocks, "rollout")
    add("layer working set", no_grad_bytes(policy, c * L, s) + c * L * 4 * h, "rollout")

    # 4. update, a micro-batch: the policy's then the value model's activations. Autograd runs the newer graph
    # first, so the value model's backward is done (its activations freed) before the policy's logits' starts.
    F, BW, note = "update forward", "update backward", " (checkpointed)" if ckpt else ""
    for k, (name, sh) in enumerate(trained):
        act = activation_bytes(sh, m * L, L, s, ac, ckpt)
        add(f"activations, {name} ({m} x {L} tokens){note}", act, F)
        if k == 0:
            add(f"activations, policy{note}", act, BW)
    # The [m, T + 1, V] logits stay saved while the log-softmax reads a view of them; their gradient comes as
    # two float32 [m, T, V] pieces (gather, logsumexp). A float32 or temperature copy is saved instead of a view.
    full, sl = m * (T + 1) * V * logit, m * T * V * 4
    add("logits (and their float32 / temperature copies)", full + copies * sl, F)
    add("logits or their copy, and their gradients", 3 * sl if copies else full + 2 * sl, BW)
    recomputed = layer_bytes(policy, m * L, L, s, ac) if ckpt else 0  # plus gradients in flight
    add("backward working set", recomputed + m * L * BACKWARD_I * policy.intermediate * 4, BW)
    # zero_grad frees the gradients before a mini-batch; the backward refills them as it frees activations
    if math.ceil(cfg.mini_batch_size / n / m) == 1:
        grads = [sh.trainable * s / split for _, sh in trained]
        add("gradients: none yet (one micro-batch per mini-batch)", -sum(grads), F)
        head = 0 if policy.lora else V * h * s / split
        so_far = "the value model's and the LM head's" if algo == "ppo" else "the LM head's"
        add(f"gradients: only {so_far} yet", head - grads[0], BW)
    exact = kl_needs_logits(cfg.kl.estimator) and kl_needs_loss_term(cfg.kl.placement, cfg.kl.estimator)
    for phase in (F, BW) if has_ref and exact else ():  # the exact KL as a loss reads the reference's logits
        add("reference logits and exact-KL log-softmaxes", full + 3 * sl, phase)
    for phase in (F, BW) if sp.allow_biased and kl_biasing_settings(sp) else ():
        add("warped logits (top-k / top-p / min_new_tokens)", 2 * sl, phase)
    linear = [sh.layers * sh.layer_params + V * h for _, sh in trained]  # what autocast casts to half
    if ac:  # autocast caches half copies of weights that require grad; every matmul saves its weight's copy
        cached = sum(sh.trainable for _, sh in trained) / split
        add("half weight copies (autocast cache)", 2 * cached, "rollout")
        add("half weight copies for backward", 2 * sum(linear), F)
        add("half weight copies for backward", 2 * linear[0], BW)
    if fsdp:  # a sharded model gathers its root unit and the running layer (and prefetches the next)
        unit = (policy.params - (policy.layers - 2) * policy.layer_params) * s
        running = {"generation": 1, "rollout": 1 + cfg.shard_frozen_models, F: len(trained), BW: 2}
        for phase, k in running.items():
            add("gathered weights (root unit + 2 layers)", k * unit, phase)
        whole = sum(sh.params for _, sh in trained) + policy.params * has_ref + sum(r.params for r in rewards)
        add("every model whole, before it is sharded", whole * s, "load")

    # 5. optimiser step: on CUDA AdamW runs over every tensor at once (foreach: a sqrt of every second moment)
    trainable, largest = sum(sh.trainable for _, sh in trained), max(sh.largest for _, sh in trained)
    adam = trainable * s / split if cuda else ADAMW_CPU_TEMPS * largest * s
    add("AdamW temporaries" + (" (foreach)" if cuda else ""), adam, "optimizer step")
    return items


def estimate_memory(
    config: RLConfig,
    algo: str,
    model: Any,
    *,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    reward_models: Sequence[Any] = (),
    available: int | None = None,
) -> MemoryPlan:
    """One process's memory for ``config`` under ``algo`` ("ppo" or "grpo"), with advice when it does not fit.

    ``model``: the policy, as a directory (only its config.json is read), a transformers config, a model instance
    or a :class:`ModelShape`; ``reward_models`` likewise. ``available``: the device's free bytes (None: unknown).
    """
    if algo not in ("ppo", "grpo"):
        raise ConfigError(f"algo must be 'ppo' or 'grpo', got {algo!r}")
    policy = model if isinstance(model, ModelShape) else model_shape(model)
    rewards = [r if isinstance(r, ModelShape) else model_shape(r, causal=False) for r in reward_models]
    items = plan_items(config, algo, policy, rewards, world_size, torch.device(device).type == "cuda")
    plan = MemoryPlan(tuple(items), available, str(device), world_size)
    if plan.fits:
        return plan
    return dataclasses.replace(plan, advice=advise(config, algo, policy, rewards, plan))


def advise(
    cfg: RLConfig, algo: str, policy: ModelShape, rewards: Sequence[ModelShape], plan: MemoryPlan
) -> tuple[str, ...]:
    """Changes that lower the estimate, each re-estimated, largest saving first, with the total each gives."""
    n, cuda, room = plan.world_size, torch.device(plan.device).type == "cuda", plan.available or 0
    headroom = 1 + ALLOCATOR_HEADROOM

    def total(shape: ModelShape = policy, world: int = n, **fields: Any) -> int:
        items = plan_items(dataclasses.replace(cfg, **fields), algo, shape, rewards, world, cuda)
        return MemoryPlan(tuple(items), None, plan.device, world).total

    options = [("gradient_checkpointing: true", total(gradient_checkpointing=True))]
    smaller = max((d for d in range(1, cfg.micro_batch_size) if cfg.micro_batch_size % d == 0), default=0)
    if smaller:  # a divisor of micro_batch_size divides mini_batch_size too
        option = f"micro_batch_size: {smaller}, forward_batch_size: {smaller}"
        options.append((option, total(micro_batch_size=smaller, forward_batch_size=smaller)))
    if not policy.lora:
        lora = f"a LoRA policy (peft, rank {ADVICE_LORA_RANK}): only adapters train, no reference copy"
        options.append((lora, total(shape=with_lora(policy))))
    if cuda and not policy.lora:  # on CPU a machine's processes would share the same RAM
        worlds = [n * 2**k for k in range(1, 7)]
        world = next((w for w in worlds if total(world=w, sharding="fsdp") * headroom <= room), worlds[-1])
        options.append((f"sharding: fsdp over {world} processes", total(world=world, sharding="fsdp")))
    if cfg.sharding == "fsdp" and n > 1:
        options.append(("shard_frozen_models: true", total(shard_frozen_models=True)))
    options.append(("mixed_precision: bf16 (half activations; fast on GPUs)", total(mixed_precision="bf16")))
    ranked = sorted((t, text) for text, t in options if t < plan.total)
    return tuple(
        f"{text}: saves {format_bytes(plan.total - t)} (total {format_bytes(t)}{', fits' * (t * headroom <= room)})"
        for t, text in ranked
    )


def available_memory(device: str | torch.device) -> int | None:
    """Free bytes on ``device``: CUDA's free memory, or on CPU the RAM Linux reports as MemAvailable."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0] if torch.cuda.is_available() else None
    try:
        return int(re.findall(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text())[0]) * 1024
    except (OSError, IndexError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def format_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as a table: held items, each phase's own items and peak, the total, the verdict and advice."""
    w, n = max(len(it.what) for it in plan.items) + 4, plan.world_size
    lines = [f"memory plan, per process ({n} process{'es' * (n > 1)}, {plan.device}):"]
    for phase, peak in [("held", plan.phase_bytes("held")), *plan.phases.items()]:
        mark = "   <- the peak" if phase == plan.peak_phase else ""
        title = f"  {'held throughout':<{w}}{format_bytes(peak):>11}" if phase == "held" else ""
        lines.append(title or f"  {phase} (peak {format_bytes(peak)}){mark}")
        own = [it for it in plan.items if it.phase == phase]
        lines += [f"    {it.what:<{w - 2}}{format_bytes(it.bytes):>11}" for it in own]
    lines.append(f"  {'total, at the peak (' + plan.peak_phase + ')':<{w}}{format_bytes(plan.total):>11}")
    lines.append(
        f"  {f'needed, with {ALLOCATOR_HEADROOM:.0%} allocator headroom':<{w}}{format_bytes(plan.needed):>11}"
    )
    if plan.available is None:
        return "\n".join([*lines, "  available: unknown (--available_gib 80 plans for a device not here)"])
    lines.append(f"  {'available':<{w}}{format_bytes(plan.available):>11}")
    if plan.fits:
        return "\n".join([*lines, f"  fits, with {format_bytes(plan.available - plan.needed)} to spare"])
    big = max(plan.items, key=lambda it: it.bytes)
    short = format_bytes(plan.needed - plan.available)
    lines.append(f"  does not fit: {short} short; the largest item is {big.what} ({format_bytes(big.bytes)})")
    return "\n".join([*lines, "  to fit, largest saving first:", *(f"    - {a}" for a in plan.advice)])


def check_memory(plan: MemoryPlan) -> None:
    """Raise :class:`ConfigError` with the table and the advice when ``plan`` does not fit."""
    if not plan.fits:
        raise ConfigError(
            f"the run will not fit in memory (memory_check: false skips this)\n{format_plan(plan)}"
        )


def reward_models_of(reward: Any) -> list[Any]:
    """The reward models of a reward spec: its directories and (model, tokenizer) pairs' models."""
    specs = reward if isinstance(reward, list) else [reward]
    pairs = [spec[0] for spec in specs if isinstance(spec, tuple) and isinstance(spec[0], nn.Module)]
    return pairs + [spec for spec in specs if isinstance(spec, str | Path) and Path(spec).is_dir()]


def check_memory_at_start(
    config: RLConfig, algo: str, policy: Any, world_size: int, device: str | torch.device, reward: Any = None
) -> MemoryPlan | None:
    """What a trainer calls before it loads anything onto ``device``: stop with the plan and advice when the run
    will not fit (nothing when ``config.memory_check`` is false). On CPU a machine's processes share its RAM; model
    instances already on the device are already out of its free memory, so their weights are added back."""
    if not config.memory_check:
        return None
    rewards, kind = reward_models_of(reward), torch.device(device).type
    available = available_memory(device)
    if available is not None:
        if kind == "cpu":
            available //= int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        params = [p for x in (policy, *rewards) if isinstance(x, nn.Module) for p in x.parameters()]
        available += sum(p.numel() * p.element_size() for p in params if p.device.type == kind)
    kwargs = {"world_size": world_size, "device": device, "reward_models": rewards, "available": available}
    plan = estimate_memory(config, algo, policy, **kwargs)
    check_memory(plan)
    return plan


USAGE = """usage: tether plan [--algo ppo|grpo] [--preset NAME] [--config run.yaml] --policy DIR [--reward DIR ...]
                   [--world_size N] [--available_gib G] [--field value ...]

One process's memory for a run, before it starts: weights, gradients, AdamW state, the KV cache, the logits and
activations of the update. Only config.json files are read. Exit status: 0 when it fits, 1 when it does not.

  --reward DIR       a reward-model directory (reward functions cost nothing); repeat for several
  --world_size N     processes of the run (default 1); with --sharding fsdp they split the trained models
  --available_gib G  plan for G GiB (e.g. 80) instead of what --device has free here
  --preset, --config and --field value are read as tether ppo / grpo read them."""


def main(argv: Sequence[str]) -> int:
    """``tether plan``: print the plan; 0 when it fits, 1 when it does not."""
    from tether.config import take_repeated
    from tether.models import pick_device
    from tether.train_cli import parse_train_args
    from tether.trainers.grpo import GRPOConfig
    from tether.trainers.ppo import PPOConfig

    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    (algos, argv), classes = take_repeated(list(argv), "algo"), {"ppo": PPOConfig, "grpo": GRPOConfig}
    worlds, argv = take_repeated(argv, "world_size")
    sizes, argv = take_repeated(argv, "available_gib")
    algo = algos[-1] if algos else "ppo"
    if algo not in classes:
        raise ConfigError(f"--algo is ppo or grpo, not {algo!r}")
    config, extra, _ = parse_train_args(algo, classes[algo], argv, required=())
    if "policy" not in extra:
        raise ConfigError("tether plan needs --policy DIR (only its config.json is read)")
    world_size, device = int(worlds[-1]) if worlds else 1, pick_device(config.device)
    available = int(float(sizes[-1]) * GiB) if sizes else available_memory(device)
    if available is not None and not sizes and device.type == "cpu":
        available //= world_size  # a machine's processes share its RAM
    rewards = reward_models_of(extra.get("reward"))
    kwargs = {"world_size": world_size, "device": device, "reward_models": rewards, "available": available}
    plan = estimate_memory(config, algo, extra["policy"], **kwargs)
    print(format_plan(plan))
    return 0 if plan.fits else 1
