"""tether against TRL, side by side: PPO and GRPO on the same models, prompts, reward and hyper-parameters.

    bash bench/setup_trl.sh                          # once: the two TRL virtual environments under bench/.venvs/
    python bench/vs_trl.py [--repeats N] [--quick] [--configs ppo-tiny,grpo-tiny] [--episodes N]

The workload is built locally, once, under bench/.cache/vs_trl/ (nothing is downloaded): a 4,096-token WordLevel
tokenizer over synthetic words, randomly initialised GPT-2 models (tiny: 2 layers, 4 heads, d=128; small: 6
layers, 6 heads, d=384) saved as a causal LM (the policy) and as a one-label sequence-classification model
(the PPO reward model, also the start of the value model in both libraries), and 512 prompts of 8-16 words.

Each (library, configuration, repeat) runs in its own subprocess - tether and the floor in this interpreter,
TRL in its venv's - so its peak resident memory (ru_maxrss) is its own; repeats are interleaved (tether, TRL,
floor, tether, TRL, floor ...). Only ``train()`` is timed, after every model is loaded; the policy's
``generate`` is wrapped with a timer in all three, which gives the generation time and the generated tokens
(up to and including the first EOS). The "floor" is the unavoidable compute of the same work in bare torch: one
sampling pass per step (a KV-cache loop calling the model once per token, drawing by inverse CDF), one no-grad
forward of each model the loss needs before the update (reference; PPO: reward and value model too), and the
forward+backward passes of the trained models for the configured epochs with one AdamW step per mini-batch, the
LM head on the response positions only. It calls the transformers models as they are, so a library with a
leaner per-token forward than transformers' (tether's ``tether/decoding.py``) can beat it.

Prints one markdown table (medians; tether/TRL episodes/s as min / median / max over repeats) and writes the
raw results to bench/results/vs_trl.json (--quick: vs_trl_quick.json).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "vs_trl"
VENVS = HERE / ".venvs"
RESULTS = HERE / "results"
WORKLOAD_VERSION = 1  # bump when the workload below changes, so a stale cache is rebuilt

VOCAB = 4096
N_PROMPTS = 512
SIZES = {  # name -> (layers, heads, width)
    "tiny": (2, 4, 128),
    "small": (6, 6, 384),
}
THREADS = 2  # the default of --threads; children read it from OMP_NUM_THREADS
ROLLOUT_BATCH = 64  # prompts per step
MICRO_BATCH = 16  # sequences per forward/backward
EPISODES = 512


@dataclass(frozen=True)
class Workload:
    """One benchmark configuration (the same in every library)."""

    name: str
    algo: str  # "ppo" | "grpo"
    size: str  # a key of SIZES
    epochs: int  # PPO epochs / GRPO iterations over each rollout batch
    response_length: int  # max new tokens
    generations: int = 1  # G completions per prompt (GRPO)

    @property
    def sequences_per_step(self) -> int:
        return ROLLOUT_BATCH * self.generations

    def describe(self) -> str:
        layers, heads, width = SIZES[self.size]
        what = f"{self.algo.upper()} {self.size} ({layers}L/{heads}H/d{width})"
        if self.algo == "ppo":
            return f"{what}, {self.epochs} epoch{'s' * (self.epochs > 1)}, {self.response_length} tokens"
        return f"{what}, G={self.generations}, {self.response_length} tokens"


WORKLOADS = {
    w.name: w
    for w in (
        Workload("ppo-tiny", "ppo", "tiny", 1, 32),
        Workload("ppo-small", "ppo", "small", 1, 32),
        Workload("ppo-small-4ep-64t", "ppo", "small", 4, 64),
        Workload("grpo-tiny", "grpo", "tiny", 1, 32, generations=4),
        Workload("grpo-small", "grpo", "small", 1, 32, generations=4),
    )
}
QUICK = ("ppo-tiny", "grpo-tiny")
LIBS = ("tether", "trl", "floor")
# Settings both libraries share (each child maps them onto its own names).
KL_COEF = {"ppo": 0.05, "grpo": 0.04}
LEARNING_RATE = {"ppo": 3e-6, "grpo": 1e-6}
ADAM_EPS = 1e-5
SEED = 0


# ---------------------------------------------------------------------------------------------------
# the workload (built once, in a subprocess of this interpreter)


def _synthetic_words(n: int, seed: int) -> list[str]:
    import random
    import string

    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7))))
    return sorted(words)


def _build_workload() -> None:
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        GPT2LMHeadModel,
        PreTrainedTokenizerFast,
    )

    specials = ["<pad>", "<eos>", "<unk>"]
    words = _synthetic_words(VOCAB - len(specials), seed=SEED)
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tok.padding_side = "left"
    assert len(tok) == VOCAB
    tok.save_pretrained(CACHE / "tokenizer")

    rng = random.Random(SEED + 1)
    # A trailing space: tether scores a reward model on the text prompt + response, and the decoded response has
    # no leading space, so the prompt carries it (the re-tokenised text then has exactly the sampled tokens).
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 16))) + " " for _ in range(N_PROMPTS)]
    with open(CACHE / "prompts.jsonl", "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")

    for size, (layers, heads, width) in SIZES.items():
        config = GPT2Config(
            vocab_size=VOCAB,
            n_positions=128,
            n_embd=width,
            n_layer=layers,
            n_head=heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            num_labels=1,
        )
        torch.manual_seed(SEED)
        policy = GPT2LMHeadModel(config)
        policy.generation_config.eos_token_id = tok.eos_token_id
        policy.generation_config.pad_token_id = tok.pad_token_id
        policy.save_pretrained(CACHE / size / "policy")
        tok.save_pretrained(CACHE / size / "policy")
        torch.manual_seed(SEED + 1)
        reward = GPT2ForSequenceClassification(config)
        reward.save_pretrained(CACHE / size / "reward")
        tok.save_pretrained(CACHE / size / "reward")
    (CACHE / "VERSION").write_text(str(WORKLOAD_VERSION))


def ensure_workload() -> None:
    stamp = CACHE / "VERSION"
    if stamp.exists() and stamp.read_text().strip() == str(WORKLOAD_VERSION):
        return
    shutil.rmtree(CACHE, ignore_errors=True)
    CACHE.mkdir(parents=True)
    print(f"building the workload under {CACHE} ...", file=sys.stderr)
    subprocess.run([sys.executable, __file__, "--build"], check=True, env=_child_env())


def _prompts() -> list[str]:
    with open(CACHE / "prompts.jsonl") as f:
        return [json.loads(line)["prompt"] for line in f]


def vowel_fraction(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """The GRPO reward in both libraries: the share of a completion's letters that are vowels."""
    out = []
    for text in completions:
        letters = [c for c in text if c.isalpha()]
        out.append(sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0)
    return out


# ---------------------------------------------------------------------------------------------------
# what every child shares: threads, a timer around generate, the result


def _child_env(threads: int = THREADS) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TRL_EXPERIMENTAL_SILENCE="1",
        WANDB_DISABLED="true",
        PYTHONWARNINGS="ignore",
    )
    return env


def _set_threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", THREADS)))


class GenerateTimer:
    """Wraps ``model.generate`` (on the instance): time spent in it and tokens generated.

    A row's tokens are counted up to and including its first EOS (all of them when it has none), the
    response tokens both libraries train on.
    """

    def __init__(self, model: Any, eos_token_id: int) -> None:
        self.inner = model.generate
        self.eos = eos_token_id
        self.seconds = 0.0
        self.tokens = 0
        self.calls = 0
        self.rows = 0
        model.generate = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        prompt = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        response = sequences[:, prompt.shape[1] :]  # [B, T]
        T = response.shape[1]
        is_eos = response == self.eos
        first = torch.where(
            is_eos.any(-1), is_eos.int().argmax(-1), torch.full_like(is_eos[:, 0], T, dtype=torch.long)
        )
        self.tokens += int(torch.clamp(first + 1, max=T).sum())
        self.calls += 1
        self.rows += response.shape[0]
        return out


class GeneratorTimer:
    """Stands in for a tether trainer's ``generator`` (a :class:`tether.rollout.Generator`): time spent in it and
    response tokens (its ``response_mask``, up to and including the first EOS). tether's default sampler is its
    own KV-cache loop, not ``model.generate``, so :class:`GenerateTimer` would not see it."""

    def __init__(self, generator: Any) -> None:
        self.inner = generator
        self.seconds = 0.0
        self.tokens = 0
        self.calls = 0
        self.rows = 0

    @property
    def eos_token_ids(self) -> list[int]:
        return self.inner.eos_token_ids

    def __call__(self, prompts: Any) -> Any:
        t0 = time.perf_counter()
        out = self.inner(prompts)
        self.seconds += time.perf_counter() - t0
        self.tokens += int(out.response_mask.sum())
        self.calls += 1
        self.rows += out.response_mask.shape[0]
        return out


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _result(
    w: Workload,
    train_s: float,
    cpu_s: float,
    timer: GenerateTimer | GeneratorTimer,
    steps: int,
    episodes: int,
    rss_loaded: float,
    **extra: Any,
) -> dict[str, Any]:
    import torch

    return {
        "train_s": train_s,
        "steps": steps,
        "episodes": episodes,
        "episodes_per_s": episodes / train_s,
        "s_per_update": train_s / steps,
        "cpu_s": cpu_s,
        "episodes_per_cpu_s": episodes / cpu_s,
        "gen_s": timer.seconds,
        "gen_share": timer.seconds / train_s,
        "gen_tokens": timer.tokens,
        "gen_tokens_per_s": timer.tokens / timer.seconds if timer.seconds else 0.0,
        "gen_calls": timer.calls,
        "gen_rows": timer.rows,
        "mean_response_tokens": timer.tokens / max(timer.rows, 1),
        "peak_rss_mib": _rss_mib(),
        "loaded_rss_mib": rss_loaded,
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
        **extra,
    }


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "accelerate", "trl", "tether"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------------------------------
# tether


def _tether(w: Workload, episodes: int, run_dir: str) -> dict[str, Any]:
    import tether.trainers.grpo as grpo_mod
    import tether.trainers.ppo as ppo_mod
    from tether import GRPOConfig, GRPOTrainer, LoggingConfig, PPOConfig, PPOTrainer, SamplingConfig

    _set_threads()
    # No final/ save: TRL with save_strategy="no" writes nothing either. Only the benchmark's copy is changed.
    ppo_mod.save_final = grpo_mod.save_final = lambda *args, **kwargs: None
    logging = LoggingConfig(
        report_to=["jsonl"], progress_bar=False, save_steps=0, report=False, sample_steps=0
    )
    common = dict(
        output_dir=run_dir,
        overwrite_output_dir=True,
        seed=SEED,
        learning_rate=LEARNING_RATE[w.algo],
        total_episodes=episodes,
        rollout_batch_size=ROLLOUT_BATCH,
        micro_batch_size=MICRO_BATCH,
        adam_eps=ADAM_EPS,
        device="cpu",
        memory_check=False,
        sampling=SamplingConfig(max_new_tokens=w.response_length, temperature=1.0),
        logging=logging,
    )
    policy = str(CACHE / w.size / "policy")
    prompts = str(CACHE / "prompts.jsonl")
    if w.algo == "ppo":
        config = PPOConfig(
            **common,
            mini_batch_size=w.sequences_per_step,  # one optimiser step per epoch, as TRL's accumulation gives
            forward_batch_size=ROLLOUT_BATCH,  # TRL: local_rollout_forward_batch_size
            reward_batch_size=ROLLOUT_BATCH,
            ppo_epochs=w.epochs,
            max_grad_norm=None,  # TRL's PPO loop does not clip gradients
        )
        config.kl.coef = KL_COEF["ppo"]
        trainer: Any = PPOTrainer(config, policy, reward=str(CACHE / w.size / "reward"), prompts=prompts)
    else:
        config = GRPOConfig(
            **common,
            mini_batch_size=w.sequences_per_step,  # one optimiser step per generation batch (TRL's default)
            forward_batch_size=MICRO_BATCH,  # TRL computes the reference logprobs per_device_train_batch_size at a time
            num_generations=w.generations,
            num_iterations=w.epochs,
        )
        config.kl.coef = KL_COEF["grpo"]
        trainer = GRPOTrainer(config, policy, reward=vowel_fraction, prompts=prompts)
    timer = trainer.generator = GeneratorTimer(trainer.generator)
    rss_loaded = _rss_mib()
    cpu0, t0 = _cpu_s(), time.perf_counter()
    history = trainer.train()
    train_s, cpu_s = time.perf_counter() - t0, _cpu_s() - cpu0
    steps = len(history)
    return _result(
        w,
        train_s,
        cpu_s,
        timer,
        steps,
        steps * ROLLOUT_BATCH,
        rss_loaded,
        tether_tree=_git_state(),  # the library as it is in the working tree when the run starts
        tether_logged={
            "rollout_s": sum(r["time/rollout_s"] for r in history),
            "update_s": sum(r["time/update_s"] for r in history),
            "gen_tokens_per_s_mean": statistics.mean(r["perf/gen_tokens_per_s"] for r in history),
            "response_length_mean": statistics.mean(r["rollout/response_length"] for r in history),
            "eos_fraction_mean": statistics.mean(r["rollout/eos_fraction"] for r in history),
        },
    )


# ---------------------------------------------------------------------------------------------------
# TRL (runs in a bench/.venvs interpreter: nothing of tether is imported here)


def _trl_common(run_dir: str, w: Workload) -> dict[str, Any]:
    return dict(
        output_dir=run_dir,
        seed=SEED,
        learning_rate=LEARNING_RATE[w.algo],
        adam_epsilon=ADAM_EPS,
        lr_scheduler_type="linear",
        per_device_train_batch_size=MICRO_BATCH,
        bf16=False,  # TRL's configs default to bf16 autocast; the benchmark is fp32 in both
        fp16=False,
        gradient_checkpointing=False,  # TRL's default is True
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
    )


def _trl(w: Workload, episodes: int, run_dir: str) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast

    _set_threads()
    tok = PreTrainedTokenizerFast.from_pretrained(CACHE / "tokenizer")
    tok.padding_side = "left"
    prompts = _prompts()
    policy = AutoModelForCausalLM.from_pretrained(CACHE / w.size / "policy")
    accumulation = w.sequences_per_step // MICRO_BATCH
    if w.algo == "ppo":
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        args = PPOConfig(
            **_trl_common(run_dir, w),
            gradient_accumulation_steps=accumulation,  # x per_device_train_batch_size = the rollout batch
            num_mini_batches=1,
            local_rollout_forward_batch_size=ROLLOUT_BATCH,
            num_ppo_epochs=w.epochs,
            response_length=w.response_length,
            total_episodes=episodes,
            stop_token="eos",
            missing_eos_penalty=None,
            temperature=1.0,  # TRL's PPO default is 0.7
            kl_coef=KL_COEF["ppo"],
            kl_estimator="k1",
            num_sample_generations=0,  # no extra sampling passes for sample tables
            sft_model_path=str(CACHE / w.size / "policy"),
            reward_model_path=str(CACHE / w.size / "reward"),
        )
        ref = AutoModelForCausalLM.from_pretrained(CACHE / w.size / "policy")
        reward = AutoModelForSequenceClassification.from_pretrained(CACHE / w.size / "reward", num_labels=1)
        value = AutoModelForSequenceClassification.from_pretrained(CACHE / w.size / "reward", num_labels=1)
        ids = [tok(p)["input_ids"] for p in prompts]
        train = Dataset.from_dict({"input_ids": ids})
        trainer: Any = PPOTrainer(
            args=args,
            processing_class=tok,
            model=policy,
            ref_model=ref,
            reward_model=reward,
            train_dataset=train,
            value_model=value,
            eval_dataset=train.select(range(ROLLOUT_BATCH)),
        )
        steps = -(-episodes // ROLLOUT_BATCH)
    else:
        from trl import GRPOConfig, GRPOTrainer

        steps = episodes // ROLLOUT_BATCH
        args = GRPOConfig(
            **_trl_common(run_dir, w),
            gradient_accumulation_steps=accumulation,  # one optimiser step per generation batch
            num_generations=w.generations,
            max_completion_length=w.response_length,
            max_steps=steps,
            num_iterations=w.epochs,
            beta=KL_COEF["grpo"],  # TRL's default 0.0 loads no reference model; tether's GRPO uses one
            epsilon=0.2,
            loss_type="dapo",  # token-mean over the whole mini-batch = tether's loss_aggregation token-mean
            scale_rewards="group",
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            disable_dropout=True,
            log_completions=False,
            max_grad_norm=1.0,
        )
        train = Dataset.from_dict({"prompt": prompts})
        trainer = GRPOTrainer(
            model=policy, reward_funcs=[vowel_fraction], args=args, train_dataset=train, processing_class=tok
        )
    timer = GenerateTimer(policy, tok.eos_token_id)
    rss_loaded = _rss_mib()
    cpu0, t0 = _cpu_s(), time.perf_counter()
    trainer.train()
    train_s, cpu_s = time.perf_counter() - t0, _cpu_s() - cpu0
    return _result(w, train_s, cpu_s, timer, steps, steps * ROLLOUT_BATCH, rss_loaded)


# ---------------------------------------------------------------------------------------------------
# the floor: the same work in bare torch


class Sampled(NamedTuple):
    response_ids: Any  # [B, T] pad after the first EOS
    response_mask: Any  # [B, T] bool, True up to and including the first EOS
    logprobs: Any  # [B, T] of the sampled tokens


def _floor(w: Workload, episodes: int) -> dict[str, Any]:
    """The same work as the trainers, with nothing but what it needs, in bare torch (see the module docstring)."""
    import copy

    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        DynamicCache,
        PreTrainedTokenizerFast,
    )

    _set_threads()
    torch.manual_seed(SEED)
    tok = PreTrainedTokenizerFast.from_pretrained(CACHE / "tokenizer")
    tok.padding_side = "left"
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompts = _prompts()
    policy = AutoModelForCausalLM.from_pretrained(CACHE / w.size / "policy")
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    trained: list[torch.nn.Module] = [policy]
    reward = value = None
    if w.algo == "ppo":
        reward = AutoModelForSequenceClassification.from_pretrained(CACHE / w.size / "reward").eval()
        reward.requires_grad_(False)
        value = copy.deepcopy(reward).requires_grad_(True)
        trained.append(value)
    params = [p for m in trained for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE[w.algo], eps=ADAM_EPS)
    steps = episodes // ROLLOUT_BATCH
    forward_chunk = ROLLOUT_BATCH if w.algo == "ppo" else MICRO_BATCH

    @torch.no_grad()
    def sample(enc: dict[str, torch.Tensor]) -> Sampled:
        """A bare KV-cache sampling loop: one prompt forward, then one forward per new token."""
        att = enc["attention_mask"]
        B = att.shape[0]
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = policy(
            input_ids=enc["input_ids"],
            attention_mask=att,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1]
        done = torch.zeros(B, dtype=torch.bool)
        tokens, logprobs = [], []
        for t in range(w.response_length):
            logp = torch.log_softmax(logits.float(), -1)  # [B, V]
            # inverse-CDF draw (float64 sums): the distribution of multinomial, whose CPU kernel draws an
            # exponential number per vocabulary entry and costs more than a tiny model's forward
            cdf = torch.cumsum(logp.exp(), -1, dtype=torch.float64)
            u = torch.rand(B, 1, dtype=torch.float64) * cdf[:, -1:]
            token = torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=cdf.shape[1] - 1).masked_fill(done, pad)
            tokens.append(token)
            logprobs.append(logp.gather(-1, token[:, None])[:, 0])
            done |= token == eos
            if bool(done.all()) or t + 1 == w.response_length:
                break
            att = torch.cat([att, torch.ones(B, 1, dtype=att.dtype)], 1)
            pos = pos[:, -1:] + 1
            logits = policy(
                input_ids=token[:, None],
                attention_mask=att,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
        response = torch.stack(tokens, 1)  # [B, T]
        is_eos = (response == eos).int()
        mask = torch.cumsum(is_eos, -1) - is_eos == 0  # up to and including the first EOS
        return Sampled(response, mask, torch.stack(logprobs, 1))

    timer = GeneratorTimer(sample)

    def token_logprobs(model: torch.nn.Module, ids: torch.Tensor, att: torch.Tensor, P: int) -> torch.Tensor:
        T = ids.shape[1] - P  # the LM head on the positions that predict response tokens only
        logits = model(input_ids=ids, attention_mask=att, logits_to_keep=T + 1).logits[:, :-1]  # [B, T, V]
        return torch.log_softmax(logits.float(), -1).gather(-1, ids[:, P:, None])[..., 0]  # [B, T]

    def all_values(model: torch.nn.Module, ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        hidden = model.transformer(input_ids=ids, attention_mask=att).last_hidden_state
        return model.score(hidden)[..., 0]  # [B, L]

    rss_loaded = _rss_mib()
    cpu0, t0 = _cpu_s(), time.perf_counter()
    for step in range(steps):
        rows = prompts[step * ROLLOUT_BATCH : (step + 1) * ROLLOUT_BATCH]
        rows = [p for p in rows for _ in range(w.generations)]
        enc = tok(rows, padding=True, return_tensors="pt")
        P = enc["input_ids"].shape[1]
        for m in trained:
            m.eval()
        gen = timer(enc)
        seqs = torch.cat([enc["input_ids"], gen.response_ids], 1)
        mask = gen.response_mask
        att = torch.cat([enc["attention_mask"], mask.long()], 1)
        with torch.no_grad():  # the forwards the loss needs before the update
            for s in range(0, seqs.shape[0], forward_chunk):
                chunk = slice(s, s + forward_chunk)
                token_logprobs(ref, seqs[chunk], att[chunk], P)
                if (
                    w.algo == "grpo" and w.epochs > 1
                ):  # old logprobs (with one pass they are the current ones)
                    token_logprobs(policy, seqs[chunk], att[chunk], P)
                if reward is not None and value is not None:
                    all_values(reward, seqs[chunk], att[chunk])
                    all_values(value, seqs[chunk], att[chunk])
            if w.algo == "grpo":
                vowel_fraction(rows, tok.batch_decode(gen.response_ids, skip_special_tokens=True))
        advantages = torch.randn(mask.shape)  # their values do not change the compute
        for m in trained:
            m.train()
        for _ in range(w.epochs):
            order = torch.randperm(seqs.shape[0])
            for s in range(0, seqs.shape[0], MICRO_BATCH):
                mb = order[s : s + MICRO_BATCH]
                logprobs = token_logprobs(policy, seqs[mb], att[mb], P)
                loss = -(logprobs * advantages[mb] * mask[mb]).sum() / mask.sum()
                if value is not None:
                    values = all_values(value, seqs[mb], att[mb])[:, P - 1 : -1]
                    loss = loss + 0.1 * ((values - advantages[mb]) ** 2 * mask[mb]).sum() / mask.sum()
                loss.backward()
            optimizer.step()  # one mini-batch per epoch, as in the two libraries here
            optimizer.zero_grad(set_to_none=True)
    train_s, cpu_s = time.perf_counter() - t0, _cpu_s() - cpu0
    return _result(w, train_s, cpu_s, timer, steps, steps * ROLLOUT_BATCH, rss_loaded)


# ---------------------------------------------------------------------------------------------------
# the parent: runs the children, prints the table


def _interpreter(lib: str, w: Workload) -> Path:
    if lib != "trl":
        return Path(sys.executable)
    return VENVS / ("trl-ppo" if w.algo == "ppo" else "trl-grpo") / "bin" / "python"


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (every process, every core), from /proc/stat; 0 elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run_child(lib: str, w: Workload, episodes: int, timeout: float, threads: int) -> dict[str, Any]:
    python = _interpreter(lib, w)
    if not python.exists():
        raise SystemExit(f"{python} does not exist: run `bash bench/setup_trl.sh` first")
    load_before = os.getloadavg()[0]
    cmd = [str(python), __file__, "--child", lib, "--workload", w.name, "--episodes", str(episodes)]
    busy0, mine0, t0 = _busy_cpu_s(), _children_cpu_s(), time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(threads), timeout=timeout)
    wall = time.perf_counter() - t0
    # Cores kept busy by other processes while the child ran: the machine is shared, this is the noise.
    others = max(0.0, (_busy_cpu_s() - busy0) - (_children_cpu_s() - mine0)) / wall
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-6000:])
        raise SystemExit(f"{lib} {w.name} failed (exit {out.returncode})")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    row = json.loads(lines[-1])
    row.update(process_wall_s=wall, loadavg_1min_before=load_before, others_cores=others)
    return row


def _git_state() -> dict[str, Any]:
    """The commit benchmarked, and the files of tether/ that differ from it (the library is measured as it is)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=HERE.parent, capture_output=True, text=True
            ).stdout.strip()
        except OSError:
            return ""

    diff = git("diff", "HEAD", "--", "tether")
    return {
        "commit": git("rev-parse", "HEAD"),
        "tether_changes": git("status", "--porcelain", "tether").splitlines(),
        "tether_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else "",
    }


def _stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarise(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, by_lib in results.items():
        n = len(by_lib["tether"])
        if n == 0 or len(by_lib["trl"]) != n:
            continue  # an interrupted benchmark: a configuration is summarised once tether and TRL ran as often
        by_lib = {
            lib: runs for lib, runs in by_lib.items() if len(runs) == n
        }  # the floor when it is complete
        row: dict[str, Any] = {"repeats": n}
        for lib, runs in by_lib.items():
            row[lib] = {
                key: _stats([r[key] for r in runs])
                for key in (
                    "episodes_per_s",
                    "gen_tokens_per_s",
                    "s_per_update",
                    "gen_share",
                    "peak_rss_mib",
                    "mean_response_tokens",
                    "cpu_s",
                    "others_cores",
                )
            }
        pairs = list(zip(by_lib["tether"], by_lib["trl"], strict=True))
        row["tether_over_trl_eps"] = _stats([a["episodes_per_s"] / b["episodes_per_s"] for a, b in pairs])
        if "floor" in by_lib:
            floors = by_lib["floor"]
            row["tether_over_floor_eps"] = _stats(
                [
                    a["episodes_per_s"] / f["episodes_per_s"]
                    for a, f in zip(by_lib["tether"], floors, strict=True)
                ]
            )
            row["trl_over_floor_eps"] = _stats(
                [
                    b["episodes_per_s"] / f["episodes_per_s"]
                    for b, f in zip(by_lib["trl"], floors, strict=True)
                ]
            )
        summary[name] = row
    return summary


def table(summary: dict[str, Any]) -> str:
    """One markdown table, a row per configuration: medians, and min / median / max of the tether/TRL ratio."""

    def med(row: dict[str, Any], lib: str, key: str) -> float:
        return row[lib][key]["median"]

    head = [
        "configuration",
        "episodes/s tether",
        "episodes/s TRL",
        "tether/TRL min / med / max",
        "tether/TRL best / best",
        "episodes/s floor",
        "tether/floor",
        "TRL/floor",
        "gen tok/s tether / TRL",
        "s/update tether / TRL",
        "gen share tether / TRL",
        "peak RSS MiB tether / TRL",
        "other processes' cores",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in summary.items():
        r = row["tether_over_trl_eps"]
        floor = "floor" in row
        cells = [
            f"{name}: {WORKLOADS[name].describe()}"
            + (f"; {row['repeats']} repeats" if row["repeats"] > 1 else ""),
            f"{med(row, 'tether', 'episodes_per_s'):.1f}",
            f"{med(row, 'trl', 'episodes_per_s'):.1f}",
            f"{r['min']:.2f} / **{r['median']:.2f}** / {r['max']:.2f}",
            f"{row['tether']['episodes_per_s']['max'] / row['trl']['episodes_per_s']['max']:.2f}",
            f"{med(row, 'floor', 'episodes_per_s'):.1f}" if floor else "-",
            f"{row['tether_over_floor_eps']['median']:.2f}" if floor else "-",
            f"{row['trl_over_floor_eps']['median']:.2f}" if floor else "-",
            f"{med(row, 'tether', 'gen_tokens_per_s'):.0f} / {med(row, 'trl', 'gen_tokens_per_s'):.0f}",
            f"{med(row, 'tether', 's_per_update'):.2f} / {med(row, 'trl', 's_per_update'):.2f}",
            f"{med(row, 'tether', 'gen_share'):.0%} / {med(row, 'trl', 'gen_share'):.0%}",
            f"{row['tether']['peak_rss_mib']['max']:.0f} / {row['trl']['peak_rss_mib']['max']:.0f}",
            f"{statistics.median(row[lib]['others_cores']['median'] for lib in LIBS if lib in row):.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each library per configuration")
    parser.add_argument(
        "--quick", action="store_true", help="check the harness: 1 repeat, tiny configurations, 128 episodes"
    )
    parser.add_argument(
        "--configs",
        default=None,
        help=f"comma-separated subset of: {', '.join(WORKLOADS)} (default: all; --quick: tiny)",
    )
    parser.add_argument("--episodes", type=int, default=None, help=f"prompts per run (default {EPISODES})")
    parser.add_argument("--no-floor", action="store_true", help="skip the bare-torch floor runs")
    parser.add_argument(
        "--out", type=Path, default=None, help="results JSON (default bench/results/vs_trl.json)"
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one child may run")
    parser.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help=f"torch / OpenMP threads of every run (default {THREADS})",
    )
    parser.add_argument("--child", choices=LIBS, help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=list(WORKLOADS), help=argparse.SUPPRESS)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--table", type=Path, metavar="JSON", help="print the table of a results file and exit"
    )
    args = parser.parse_args()

    if args.table:
        saved = json.loads(args.table.read_text())
        print(table(summarise(saved["runs"])))
        return

    if args.build:
        _build_workload()
        return
    if args.child:
        w = WORKLOADS[args.workload]
        if args.child == "floor":
            print(json.dumps(_floor(w, args.episodes)))
            return
        with tempfile.TemporaryDirectory(prefix=f"{args.child}-", dir=CACHE) as run_dir:
            fn = _tether if args.child == "tether" else _trl
            print(json.dumps(fn(w, args.episodes, run_dir)))
        return

    repeats = 1 if args.quick else args.repeats
    episodes = args.episodes or (128 if args.quick else EPISODES)
    names = args.configs.split(",") if args.configs else list(QUICK if args.quick else WORKLOADS)
    for name in names:
        if name not in WORKLOADS:
            parser.error(f"unknown configuration {name!r}; choose from {', '.join(WORKLOADS)}")
    libs = [lib for lib in LIBS if not (lib == "floor" and args.no_floor)]
    out_path = args.out or RESULTS / ("vs_trl_quick.json" if args.quick else "vs_trl.json")
    ensure_workload()

    started = datetime.datetime.now().astimezone()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {n: {lib: [] for lib in libs} for n in names}
    meta = {
        "started": started.isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "threads": args.threads,
        "repeats": repeats,
        "episodes": episodes,
        "rollout_batch": ROLLOUT_BATCH,
        "micro_batch": MICRO_BATCH,
        "workloads": {n: asdict(WORKLOADS[n]) for n in names},
        "git": _git_state(),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # repeats outermost: a noisy minute hits one repeat of everything, not one library
    for r in range(repeats):
        for name in names:
            w = WORKLOADS[name]
            for lib in libs:
                row = _run_child(lib, w, episodes, args.timeout, args.threads)
                results[name][lib].append(row)
                print(
                    f"[{r + 1}/{repeats}] {name:<18} {lib:<6} {row['episodes_per_s']:7.2f} episodes/s  "
                    f"{row['train_s']:7.1f} s  gen {row['gen_share']:4.0%}  {row['peak_rss_mib']:6.0f} MiB  "
                    f"(other processes: {row['others_cores']:.1f} cores)",
                    file=sys.stderr,
                    flush=True,
                )
                # written after every run, so an interrupted benchmark keeps what it measured
                out_path.write_text(json.dumps({"meta": meta, "runs": results}, indent=1) + "\n")
    summary = summarise(results)
    meta["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    meta["versions"] = {
        f"{lib}-{algo}" if lib == "trl" else lib: results[n][lib][0]["versions"]
        for n in names
        for lib in libs
        for algo in [WORKLOADS[n].algo]
    }
    out_path.write_text(json.dumps({"meta": meta, "summary": summary, "runs": results}, indent=1) + "\n")
    print(
        f"{episodes} episodes ({episodes // ROLLOUT_BATCH} steps of {ROLLOUT_BATCH} prompts), {repeats} repeat(s), "
        f"{args.threads} threads, fp32; medians over repeats; raw results: {out_path}"
    )
    print(table(summary))


if __name__ == "__main__":
    main()
