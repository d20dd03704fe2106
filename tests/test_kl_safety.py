"""KL you can trust: the exact KL, biased-sampling handling, negative-KL detection, rollout/trainer agreement."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import tether
import tether.logprobs as logprobs_module
import tether.rollout as rollout_module
import tether.trainers.common as common_module
from tether.config import ConfigError
from tether.kl import kl_full, kl_k1
from tether.sampling import KLBiasError, SamplingConfig, warp_logits
from tether.toy import make_toy_model, make_toy_prompts, make_toy_tokenizer


def _naive_full_kl(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    out = torch.zeros(logits.shape[:2], dtype=torch.float64)
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            p = torch.softmax(logits[b, t].double() / temperature, -1)
            q = torch.softmax(ref_logits[b, t].double() / temperature, -1)
            out[b, t] = sum(p[v] * (torch.log(p[v]) - torch.log(q[v])) for v in range(p.shape[0]))
    return out


def test_full_kl_equals_naive_loop_over_vocabulary():
    g = torch.Generator().manual_seed(0)
    logits, ref = torch.randn(2, 5, 7, generator=g) * 2, torch.randn(2, 5, 7, generator=g) * 2
    for temperature in (1.0, 0.7):
        expected = _naive_full_kl(logits, ref, temperature)
        torch.testing.assert_close(kl_full(logits, ref, temperature).double(), expected, rtol=0, atol=1e-5)
    assert kl_full(logits, logits).abs().max() == 0.0


def test_full_kl_is_the_expectation_of_k1_under_the_policy():
    g = torch.Generator().manual_seed(1)
    logits, ref = torch.randn(1, 1, 12, generator=g), torch.randn(1, 1, 12, generator=g)
    p = torch.softmax(logits[0, 0], -1)
    tokens = torch.multinomial(p, 400_000, replacement=True, generator=g)
    logp, logq = torch.log_softmax(logits[0, 0], -1), torch.log_softmax(ref[0, 0], -1)
    k1 = kl_k1(logp[tokens], logq[tokens])
    sem = k1.std() / len(tokens) ** 0.5
    exact = kl_full(logits, ref)[0, 0]
    assert abs(k1.mean() - exact) < 4 * sem, (k1.mean(), exact, sem)
    assert (k1 < 0).any()  # single k1 samples are negative; the exact KL never is
    assert exact > 0


def test_full_kl_chunked_equals_unchunked_and_is_never_negative():
    g = torch.Generator().manual_seed(2)
    logits, ref = torch.randn(3, 37, 50, generator=g), torch.randn(3, 37, 50, generator=g)
    whole = kl_full(logits, ref, chunk_size=1000)
    for chunk in (1, 5, 16):
        torch.testing.assert_close(kl_full(logits, ref, chunk_size=chunk), whole, rtol=0, atol=1e-6)
    assert (whole >= 0).all()


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(top_k=4, allow_biased=True),
        SamplingConfig(top_p=0.7, allow_biased=True),
        SamplingConfig(top_p=0.6, top_k=6, temperature=0.8, allow_biased=True),
        SamplingConfig(min_new_tokens=3, temperature=1.3, allow_biased=True),
    ],
)
def test_warped_logprobs_equal_transformers_processors(cfg):
    """The training forward's warp reproduces generate()'s processors position by position."""
    g = torch.Generator().manual_seed(3)
    B, T, V, P, eos = 2, 5, 20, 4, 1
    logits = torch.randn(B, T, V, generator=g) * 2
    procs = []
    if cfg.min_new_tokens:
        procs.append(MinNewTokensLengthLogitsProcessor(P, cfg.min_new_tokens, eos))
    if cfg.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_k:
        procs.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1.0:
        procs.append(TopPLogitsWarper(cfg.top_p))
    expected = torch.empty_like(logits)
    for t in range(T):
        ids = torch.zeros(B, P + t, dtype=torch.long)  # only the length matters to these processors
        scores = logits[:, t].clone()
        for proc in procs:
            scores = proc(ids, scores)
        expected[:, t] = scores
    got = warp_logits(logits, cfg, [eos])
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=0, atol=1e-6)
    assert torch.isinf(expected).any()  # the warp really removes tokens in every case


def _config(out, steps=2, sampling=None, kl=None, **kw):
    return tether.PPOConfig(
        output_dir=str(out), seed=0, learning_rate=3e-3, total_episodes=16 * steps, rollout_batch_size=16,
        mini_batch_size=8, micro_batch_size=8, ppo_epochs=2,
        sampling=sampling or SamplingConfig(max_new_tokens=8), kl=kl or tether.KLConfig(coef=0.05),
        logging=tether.LoggingConfig(report_to=["jsonl"], progress_bar=False, save_steps=0, report=False), **kw,
    )


def _trainer(cfg, reward=None, prompts=None):
    tok = make_toy_tokenizer()
    return tether.PPOTrainer(cfg, policy=make_toy_model(tok), tokenizer=tok,
                             reward=reward or (lambda p, r, **_: [sum(c in "aeiou" for c in x) / max(len(x), 1) for x in r]),
                             prompts=prompts or make_toy_prompts(64))


@pytest.mark.parametrize(
    ("sampling", "estimator"),
    [
        (SamplingConfig(max_new_tokens=8), "k1"),
        (SamplingConfig(max_new_tokens=8, temperature=0.7), "full"),
        (SamplingConfig(max_new_tokens=8, top_k=5, allow_biased=True), "k3"),
        (SamplingConfig(max_new_tokens=8, top_p=0.8, min_new_tokens=3, temperature=0.9, allow_biased=True), "full"),
    ],
)
def test_rollout_and_training_forward_logprobs_agree(tmp_path, sampling, estimator):
    """generate()'s own logprobs of the sampled tokens match the training forward's to ~1e-5 (CPU, fp32)."""
    cfg = _config(tmp_path, steps=3, sampling=sampling, kl=tether.KLConfig(estimator=estimator), logprob_check_steps=1)
    history = _trainer(cfg).train()
    for row in history:
        assert row["rollout/logprob_diff_max"] < 1e-5, row["rollout/logprob_diff_max"]
        assert row["rollout/logprob_diff_mean"] <= row["rollout/logprob_diff_max"]


@pytest.mark.parametrize(
    ("sampling", "estimator"),
    [
        (SamplingConfig(max_new_tokens=8, temperature=0.7), "k1"),
        (SamplingConfig(max_new_tokens=8, top_k=5, min_new_tokens=2, temperature=1.3, allow_biased=True), "k3"),
    ],
    ids=["temperature", "top_k+min_new_tokens"],
)
def test_the_samplers_logprobs_stand_in_for_the_policy_forward(tmp_path, monkeypatch, sampling, estimator):
    """Between check steps the rollout runs no policy forward: the sampler's logprobs, model logprobs and entropy
    are used, and the run matches one that runs the forward every step to float rounding."""
    forwards = []
    real = rollout_module.policy_logprobs
    monkeypatch.setattr(rollout_module, "policy_logprobs", lambda *a, **k: forwards.append(1) or real(*a, **k))
    runs = {}
    for every in (1, 2):
        forwards.clear()
        cfg = _config(tmp_path / str(every), steps=4, sampling=sampling, kl=tether.KLConfig(estimator=estimator),
                      logprob_check_steps=every)
        runs[every] = (_trainer(cfg).train(), len(forwards))
    (every_step, n_every), (checked, n_checked) = runs[1], runs[2]
    assert n_checked * 2 == n_every  # steps 1 and 3 only (two 8-row chunks each)
    assert ["rollout/logprob_diff_max" in row for row in checked] == [True, False, True, False]
    for a, b in zip(every_step, checked, strict=True):
        for key in ("objective/kl", "kl/k1", "objective/entropy", "policy/loss", "policy/approx_kl", "value/loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def test_logprob_agreement_catches_a_temperature_bug(tmp_path, monkeypatch):
    """The metric has teeth: scoring at the wrong temperature shows up as a large difference."""
    trainer = _trainer(_config(tmp_path, steps=1, sampling=SamplingConfig(max_new_tokens=8, temperature=0.5)))
    real = logprobs_module.selective_log_softmax  # the training forward's (policy_logprobs) copy only
    monkeypatch.setattr(logprobs_module, "selective_log_softmax", lambda logits, ids, t=1.0: real(logits, ids, 1.0))
    assert trainer.train()[0]["rollout/logprob_diff_max"] > 1e-2


def test_default_config_refuses_biasing_settings_with_the_reason(tmp_path):
    for sampling in (SamplingConfig(max_new_tokens=8, min_new_tokens=4), SamplingConfig(max_new_tokens=8, top_k=3)):
        with pytest.raises(KLBiasError, match="negative") as info:
            _trainer(_config(tmp_path, sampling=sampling))
        assert "allow_biased" in str(info.value)


def test_allow_biased_requires_a_nonnegative_estimator(tmp_path):
    for estimator in ("k1", "k2"):
        with pytest.raises(ConfigError, match="k3' or 'full"):
            _config(tmp_path, sampling=SamplingConfig(top_k=5, allow_biased=True), kl=tether.KLConfig(estimator=estimator))
    with pytest.raises(KLBiasError, match="repetition_penalty"):
        _trainer(_config(tmp_path, sampling=SamplingConfig(repetition_penalty=1.2, allow_biased=True),
                         kl=tether.KLConfig(estimator="k3")))


def test_allow_biased_warns_at_start(tmp_path, capsys):
    _trainer(_config(tmp_path, sampling=SamplingConfig(max_new_tokens=8, top_k=5, allow_biased=True),
                     kl=tether.KLConfig(estimator="full")))
    err = capsys.readouterr().err
    assert "top_k=5" in err and "negative" in err


def test_kl_in_the_loss_refuses_k1():
    with pytest.raises(ConfigError, match="k1"):
        tether.KLConfig(placement="loss", estimator="k1")


def test_kl_as_a_loss_term_trains_and_keeps_the_score_unshaped(tmp_path):
    trainer = _trainer(_config(tmp_path, steps=2, kl=tether.KLConfig(coef=0.1, estimator="k3", placement="loss")))
    history = trainer.train()
    assert history[0]["objective/non_score_reward"] == 0.0  # the reward carries the score alone
    assert "policy/kl_loss" in history[0] and history[-1]["policy/kl_loss"] > 0.0


# ---------------------------------------------------------------------------------------------------------
# The Training FAQ's exploit: min_length sampling makes the k1 estimate read low or negative.


def _without_the_guard(monkeypatch) -> None:
    """Behave as a library without tether's sampling guard (the trainer's and the generator's checks off)."""
    for module in (common_module, rollout_module):
        monkeypatch.setattr(module, "check_sampling_config", lambda cfg: None)


def _eos_heavy_policy_and_reference():
    """A policy that puts much more mass on EOS than its reference and is otherwise identical."""
    tok = make_toy_tokenizer()
    ref = make_toy_model(tok, seed=0)
    policy = copy.deepcopy(ref)
    policy.lm_head = torch.nn.Linear(ref.config.n_embd, ref.config.vocab_size, bias=True)
    policy.lm_head.weight = policy.transformer.wte.weight  # keep the tie, add an output bias
    with torch.no_grad():
        policy.lm_head.bias.zero_()
        policy.lm_head.bias[tok.eos_token_id] = 4.0
    return tok, policy, ref


def test_min_length_sampling_makes_k1_negative_while_the_exact_kl_is_positive(tmp_path, monkeypatch):
    """With EOS suppressed for the first tokens, an EOS-heavy policy's k1 reads negative on every sequence.

    Derivation: at a position where EOS is masked, a sampled token v has pi(v) = c * ref(v) with
    c = (1 - pi(EOS)) / (1 - ref(EOS)) < 1, so k1 = log c < 0 for every token; the exact KL is > 0.
    """
    tok, policy, ref = _eos_heavy_policy_and_reference()
    _without_the_guard(monkeypatch)
    sampling = SamplingConfig(max_new_tokens=6, min_new_tokens=6)
    results, warnings = {}, {}
    for estimator in ("k1", "full"):
        cfg = _config(tmp_path / estimator, steps=6, sampling=sampling, kl=tether.KLConfig(estimator=estimator))
        cfg.learning_rate = 0.0
        trainer = tether.PPOTrainer(cfg, policy=copy.deepcopy(policy), tokenizer=tok, ref_policy=ref,
                                    reward=lambda p, r, **_: [0.0] * len(r), prompts=make_toy_prompts(32))
        results[estimator] = trainer.train()[0]
        warnings[estimator] = {w.code for w in trainer.health_warnings}
    assert results["k1"]["objective/kl"] < -1.0  # the penalty turns into a bonus
    assert results["k1"]["kl/negative_fraction"] == 1.0
    assert results["k1"]["objective/non_score_reward"] > 0.0
    assert results["full"]["objective/kl"] > 1.0  # the same policy, the same rollouts: exact KL is positive
    assert results["full"]["kl/k1"] < 0.0  # (k1 is still logged beside it, and still negative)
    # Several steps of negative KL raise the health warning that names the likely cause.
    assert "kl_negative" in warnings["k1"]
    assert "kl_negative" not in warnings["full"]


def test_training_under_min_length_hides_the_kl_from_k1_but_not_from_full(tmp_path, monkeypatch):
    """After training for a reward that wants early EOS under min_new_tokens, k1 badly understates the KL.

    Without tether's guard and with k1 in the reward, the policy raises its EOS probability at positions
    where EOS is never sampled; k1 cannot see it. The exact KL of the same policy on the same rollouts shows
    the drift, and it is never negative.
    """
    _without_the_guard(monkeypatch)
    m = 8
    sampling = SamplingConfig(max_new_tokens=12, min_new_tokens=m)
    stop_early = lambda p, r, **_: [1.0 if len(x) <= m else 0.0 for x in r]  # noqa: E731
    cfg = _config(tmp_path / "k1", steps=30, sampling=sampling, kl=tether.KLConfig(coef=0.05, estimator="k1"))
    cfg.lr_scheduler = "constant"  # keep learning to the end rather than decaying to 0
    trainer = _trainer(cfg, reward=stop_early)
    history = trainer.train()
    scores = [row["objective/scores"] for row in history]
    # The policy learned to stop at the first allowed position (means over 5 steps of 16 samples: one
    # step's score is too noisy to judge by).
    assert sum(scores[:5]) / 5 < 0.2 and sum(scores[-5:]) / 5 > 0.5, scores
    assert min(row["kl/negative_fraction"] for row in history[1:]) < 1.0
    # Measure the exact KL of the trained policy on fresh rollouts, beside the k1 the reward used.
    trainer.config.kl.estimator = "full"
    torch.manual_seed(0)
    ro = trainer.rollout(make_toy_prompts(64, seed=7))
    exact = ro.kl.sum(-1)
    k1 = kl_k1(ro.model_logprobs, ro.ref_logprobs).masked_fill(~ro.response_mask, 0.0).sum(-1)
    # How much k1 misses depends on the run's draws (over seeds 0-2 and two sampler versions k1 saw 3-64% of
    # the exact KL, and 11-45% of the sequences had k1 < 0), so the bounds leave room for that spread.
    assert (exact >= 0).all()
    assert k1.mean() < 0.75 * exact.mean(), (k1.mean(), exact.mean())
    assert (k1 < 0).float().mean() > 0.05


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        (dict(do_sample=False), "greedy"),
        (dict(num_beams=4), "beam search"),
        (dict(min_length=10), "min_new_tokens"),
        (dict(min_length=10, allow_biased=True), "min_new_tokens"),
        (dict(do_sample=False, allow_biased=True), "greedy"),
    ],
)
def test_greedy_beam_and_min_length_are_refused_with_the_reason(settings, needle):
    from tether.sampling import check_sampling_config

    with pytest.raises(KLBiasError, match=needle) as info:
        check_sampling_config(SamplingConfig(**settings))
    assert "negative" in str(info.value)


def test_running_score_normalisation_and_clipping_in_ppo(tmp_path):
    """reward_norm uses the running mean/std of all scores so far; reward_clip bounds the result."""
    seen = []

    def reward(prompts, responses, **_):
        values = [float(len(r)) * 10.0 for r in responses]
        seen.extend(values)
        return values

    cfg = _config(tmp_path, steps=2, reward_norm=True, reward_clip=1.5)
    history = _trainer(cfg, reward=reward).train()
    first = torch.tensor(seen[:16])
    expected = ((first - first.mean()) / (first.std() + 1e-8)).clamp(-1.5, 1.5)
    assert history[0]["objective/scores"] == pytest.approx(float(expected.mean()), abs=1e-5)
    assert history[0]["objective/raw_scores"] == pytest.approx(float(first.mean()), rel=1e-6)
    assert all(abs(r["objective/scores"]) <= 1.5 for r in history)
