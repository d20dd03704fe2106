"""torch.compile on CPU, measured: does it pay for itself in a short RL run?

    python bench/compile.py [--sizes tiny,small] [--threads 2] [--repeats 20]

Uses the GPT-2 models of bench/vs_trl.py (built under bench/.cache/vs_trl/ on first use) and times, side by
side, for each size:

- one decoding step of 64 rows (a 16-token prompt, then one token at a time over a KV cache): transformers'
  forward, tether's lean step (``tether/decoding.py``), and the lean step under ``torch.compile(dynamic=True)``
  (the cache grows by one position a step, so the shapes change);
- one training micro-batch (16 sequences of 48 tokens: policy forward + log-softmax + backward): eager and
  ``torch.compile``.

Each compiled row also gives the compile time (the first call) and the number of calls after which the compiled
version has paid it back. Prints one markdown table; nothing is written.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _time(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _first_call(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _decode_rows(size: str, repeats: int) -> list[tuple[str, str, float, float | None]]:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache
    from vs_trl import CACHE

    from tether.decoding import LeanDecoder

    model = AutoModelForCausalLM.from_pretrained(CACHE / size / "policy").eval()
    B, P, steps = 64, 16, 32
    torch.manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (B, P))
    mask = torch.ones(B, P, dtype=torch.long)
    positions = mask.cumsum(-1) - 1

    def prefill() -> tuple[DynamicCache, torch.Tensor]:
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        return cache, ids[:, -1]

    def hf_run() -> None:  # `steps` decoding steps through transformers' forward
        cache, token = prefill()
        att = mask
        with torch.no_grad():
            for t in range(steps):
                att = torch.cat([att, att.new_ones(B, 1)], 1)
                model(
                    input_ids=token[:, None],
                    attention_mask=att,
                    position_ids=positions[:, -1:] + 1 + t,
                    past_key_values=cache,
                    use_cache=True,
                )

    def lean_run(step: Callable[..., torch.Tensor] | None = None) -> Callable[[], None]:
        def run() -> None:
            cache, token = prefill()
            lean = LeanDecoder.build(model, B, P + steps + 1)
            assert lean is not None
            lean.prefill(cache, mask)
            fn = step or lean.step
            for t in range(steps):
                fn(lean, token, positions[:, -1:] + 1 + t) if step else fn(token, positions[:, -1:] + 1 + t)

        return run

    hf = _time(hf_run, repeats) / steps
    lean = _time(lean_run(), repeats) / steps
    compiled_step = torch.compile(LeanDecoder.step, dynamic=True)
    compile_s = _first_call(lean_run(compiled_step))
    compiled = _time(lean_run(compiled_step), repeats) / steps
    return [
        (size, "decoding step, transformers' forward", hf, None),
        (size, "decoding step, tether's lean step", lean, None),
        (size, "decoding step, lean step + torch.compile", compiled, compile_s),
    ]


def _train_rows(size: str, repeats: int) -> list[tuple[str, str, float, float | None]]:
    import torch
    from transformers import AutoModelForCausalLM
    from vs_trl import CACHE

    model = AutoModelForCausalLM.from_pretrained(CACHE / size / "policy").train()
    B, L, P = 16, 48, 16
    torch.manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (B, L))

    def step(forward: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            logits = forward(ids)
            logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, P:, None])
            logp.mean().backward()
            model.zero_grad(set_to_none=True)

        return run

    def eager(x: torch.Tensor) -> torch.Tensor:
        return model(input_ids=x, logits_to_keep=L - P + 1).logits[:, :-1]

    compiled = torch.compile(eager)
    eager_s = _time(step(eager), repeats)
    compile_s = _first_call(step(compiled))
    compiled_s = _time(step(compiled), repeats)
    return [
        (size, "training micro-batch (16 x 48 tokens), eager", eager_s, None),
        (size, "training micro-batch (16 x 48 tokens), torch.compile", compiled_s, compile_s),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    import torch
    from vs_trl import ensure_workload

    torch.set_num_threads(args.threads)
    ensure_workload()
    rows = []
    for size in args.sizes.split(","):
        rows += _decode_rows(size, args.repeats)
        rows += _train_rows(size, args.repeats)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}\n")
    print("| model | what | ms per call | compile s | calls to pay the compile back |")
    print("|---|---|---|---|---|")
    baseline: dict[tuple[str, str], float] = {}
    for size, what, seconds, compile_s in rows:
        kind = what.split(",")[0]
        if compile_s is None:
            baseline[(size, kind)] = seconds  # the last uncompiled row of its kind: what compile competes with
            pays = "-"
        else:
            saved = baseline[(size, kind)] - seconds
            pays = f"{compile_s / saved:,.0f}" if saved > 0 else "never (slower)"
        comp = f"{compile_s:.1f}" if compile_s is not None else "-"
        print(f"| {size} | {what} | {seconds * 1000:.2f} | {comp} | {pays} |")


if __name__ == "__main__":
    main()
