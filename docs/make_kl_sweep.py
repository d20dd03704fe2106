"""The demo's KL trade-off: the same SmolLM2 sentiment run (same seed) at several KL coefficients, measured on
held-out prompts, drawn as docs/demo_kl_sweep.png with a table (docs/demo_kl_sweep.json).

For each coefficient (0 = no tether) the demo trains as ``tether demo --kl-coef C`` does, then samples 4
continuations of each of the 16 held-out prompts (64 in all, the same random numbers for every run) and measures:

- sentiment: mean VADER compound score (the reward) of the continuations;
- KL to the reference: the mean summed per-token KL of a continuation (k1 over the policy and the reference, the
  adapter-disabled base model);
- distinct-1 (``tether.quality``, over the policy's tokens) and the positive-lexicon share: the share of words that
  VADER's lexicon scores positive, and the count of "love";
- one sample per point.

The base model (before training) is measured the same way, as the reference point.

    python docs/make_kl_sweep.py                    # 4 runs of ~7 minutes on two idle cores
    python docs/make_kl_sweep.py --coefs 0,0.05,0.2 --out /tmp/sweep
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tether.demo.sentiment import sentiment_reward  # noqa: E402
from tether.demo.sentiment_run import (  # noqa: E402
    SentimentDemoSettings,
    eval_prompts,
    load_demo_models,
    ppo_config,
    sample_with_scores,
    train_prompts,
)
from tether.quality import distinct_n  # noqa: E402
from tether.trainers.ppo import PPOTrainer  # noqa: E402

HERE = Path(__file__).resolve().parent
SAMPLES_PER_PROMPT = 4
WORD = re.compile(r"[a-z']+")


def positive_words(texts: list[str]) -> tuple[float, int]:
    """(share of words VADER's lexicon scores positive, count of "love" / "loved" / "loves" / "loving")."""
    sentiment_reward(["x"], ["x"])  # builds the analyzer
    lexicon = sentiment_reward.analyzer.lexicon
    words = [w for t in texts for w in WORD.findall(t.lower())]
    positive = sum(1 for w in words if lexicon.get(w, 0.0) > 0)
    love = sum(1 for w in words if w in ("love", "loved", "loves", "loving"))
    return positive / max(len(words), 1), love


def measure(trainer: PPOTrainer, label: str) -> dict[str, Any]:
    """Held-out figures of the trainer's current policy (the module docstring lists them)."""
    prompts = [p for p in eval_prompts() for _ in range(SAMPLES_PER_PROMPT)]
    samples = sample_with_scores(trainer, prompts)
    tokens = [trainer.tokenizer(r, add_special_tokens=False)["input_ids"] for r in samples.responses]
    share, love = positive_words(samples.responses)
    lengths = [max(len(t), 1) for t in tokens]
    return {
        "label": label,
        "sentiment": samples.mean_score,
        "kl": samples.mean_kl,
        "kl_per_token": sum(samples.kls) / sum(lengths),
        "distinct_1": distinct_n(tokens, 1),
        "positive_share": share,
        "love": love,
        "sample": f"{samples.prompts[4 * SAMPLES_PER_PROMPT]} | {samples.responses[4 * SAMPLES_PER_PROMPT]}",
    }


def run(coef: float, out: Path, steps: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train at ``coef``; return (the base model's figures, the trained policy's)."""
    settings = SentimentDemoSettings(kl_coef=coef, steps=steps)
    run_dir = out / f"kl-{coef:g}"
    shutil.rmtree(run_dir, ignore_errors=True)
    policy, tokenizer, value_model = load_demo_models(settings, None)
    config = ppo_config(settings, run_dir)
    config.kl.coef = max(coef, 1e-12)  # a reference is needed to measure the KL; 1e-12 trains as no tether
    trainer = PPOTrainer(
        config,
        policy=policy,
        tokenizer=tokenizer,
        reward=sentiment_reward,
        prompts=train_prompts(),
        value_model=value_model,
    )
    base = measure(trainer, "base model")
    history = trainer.train()
    trained = measure(trainer, f"kl.coef {coef:g}")
    trained["train_kl_last5"] = sum(r["objective/kl"] for r in history[-5:]) / 5
    trained["train_reward_last5"] = sum(r["objective/scores"] for r in history[-5:]) / 5
    trained["coef"] = coef
    return base, trained


def plot(base: dict[str, Any], points: list[dict[str, Any]], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in ((left, "sentiment", "held-out sentiment (VADER)"), (right, "distinct_1", "distinct-1")):
        ax.axhline(base[key], color="grey", linestyle=":", label="base model")
        ax.plot([p["kl"] for p in points], [p[key] for p in points], "o-", color="tab:blue")
        for p in points:
            ax.annotate(f"β={p['coef']:g}", (p["kl"], p[key]), textcoords="offset points", xytext=(5, 5))
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("KL to the reference (nats per continuation, held-out; log scale above 1)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    fig.suptitle("tether demo: the KL coefficient trades reward against staying close to the base model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coefs", default="0,0.05,0.1,0.2")
    parser.add_argument("--steps", type=int, default=36)
    parser.add_argument("--out", default="runs/kl-sweep")
    parser.add_argument("--figure", default=str(HERE / "demo_kl_sweep.png"))
    parser.add_argument("--replot", action="store_true", help="redraw the figure from its .json, no training")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads(Path(args.figure).with_suffix(".json").read_text())
        plot(saved["base"], saved["points"], Path(args.figure))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base: dict[str, Any] = {}
    points = []
    for coef in (float(c) for c in args.coefs.split(",")):
        base, trained = run(coef, out, args.steps)
        points.append(trained)
        results = {"base": base, "points": points, "samples_per_prompt": SAMPLES_PER_PROMPT}
        (Path(args.figure).with_suffix(".json")).write_text(json.dumps(results, indent=1) + "\n")
    plot(base, points, Path(args.figure))
    print("| run | held-out sentiment | KL / continuation | KL / token | distinct-1 | positive words | 'love' |")
    print("|---|---|---|---|---|---|---|")
    for p in [base, *points]:
        print(
            f"| {p['label']} | {p['sentiment']:+.3f} | {p['kl']:.2f} | {p['kl_per_token']:.3f} | "
            f"{p['distinct_1']:.3f} | {p['positive_share']:.3f} | {p['love']} |"
        )
    for p in [base, *points]:
        print(f"{p['label']}: {p['sample']}")


if __name__ == "__main__":
    main()
