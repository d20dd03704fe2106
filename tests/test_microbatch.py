"""Micro-batches: length-sorted, trimmed of all-padding columns, optionally under a token budget; same update."""

from __future__ import annotations

import torch
from test_ppo import make_trainer

from tether.logprobs import policy_logprobs
from tether.toy import make_toy_model, make_toy_prompts, make_toy_tokenizer
from tether.trainers.common import micro_batch_of, micro_batches


def test_micro_batches_sort_longest_first_and_respect_the_token_budget():
    lengths = torch.tensor([5, 9, 3, 9, 7, 2])  # of all B rows
    rows = torch.tensor([0, 1, 2, 3, 4, 5])
    split = micro_batches(rows, lengths, max_rows=4, max_tokens=None)
    assert [r.tolist() for r in split] == [[1, 3, 4, 0], [2, 5]]  # stable: 1 before 3
    # budget 20 tokens: 9-long rows go two at a time, then 7+5 (14 <= 20, 3 rows would be 21), then 3+2
    split = micro_batches(rows, lengths, max_rows=4, max_tokens=20)
    assert [r.tolist() for r in split] == [[1, 3], [4, 0], [2, 5]]
    # a row longer than the budget goes alone; a subset of rows keeps its own lengths
    assert [r.tolist() for r in micro_batches(torch.tensor([4, 1]), lengths, 4, 8)] == [[1], [4]]


def test_a_trimmed_micro_batch_drops_only_padding_and_keeps_the_logprobs(tmp_path):
    trainer = make_trainer(tmp_path / "run", steps=1)
    torch.manual_seed(3)  # a seed whose rollout has short rows (lengths 1, 3, 4, then 6 of 6)
    ro = trainer.rollout(make_toy_prompts(8, seed=5))
    rows = torch.sort(ro.response_mask.sum(-1)).indices[:2]  # the shortest responses: padding to remove
    full = ro.index(rows)
    assert int(full.response_mask.sum(-1).max()) < ro.response_mask.shape[1]  # the test's premise
    adv = torch.arange(ro.response_mask.numel(), dtype=torch.float32).view(ro.response_mask.shape)
    batch, adv_rows = micro_batch_of(ro, rows, adv)
    P, T = batch.prompt_length, batch.response_mask.shape[1]
    assert T == int(full.response_mask.sum(-1).max()) < full.response_mask.shape[1]
    assert P == int(full.attention_mask[:, : full.prompt_length].sum(-1).max())
    assert int(batch.attention_mask.sum()) == int(full.attention_mask.sum())  # no real token lost
    assert torch.equal(adv_rows, adv[rows][:, :T])
    assert torch.equal(batch.response_ids, full.response_ids[:, :T])
    tok = make_toy_tokenizer()
    model = make_toy_model(tok, seed=0).eval()
    with torch.no_grad():
        a = policy_logprobs(model, full.input_ids, full.attention_mask, full.prompt_length, trainer.config.sampling, [])
        b = policy_logprobs(model, batch.input_ids, batch.attention_mask, P, trainer.config.sampling, [])
    mask = batch.response_mask
    torch.testing.assert_close(b.logprobs[mask], a.logprobs[:, :T][mask], rtol=0, atol=1e-5)


def test_a_token_budget_changes_the_micro_batches_not_the_update(tmp_path, monkeypatch):
    """Rows x 8 fixed, and length-sorted micro-batches under a token budget, give the same parameters."""
    import tether.trainers.common as common

    sizes: list[int] = []
    real = common.micro_batches
    monkeypatch.setattr(common, "micro_batches", lambda *a: [r for r in real(*a) if sizes.append(len(r)) or True])
    results = []
    for budget in (None, 40):
        sizes.clear()
        trainer = make_trainer(tmp_path / f"b{budget}", steps=1, mini_batch_size=8, micro_batch_size=8,
                               ppo_epochs=1, max_grad_norm=None, micro_batch_tokens=budget)
        torch.manual_seed(0)
        ro = trainer.rollout(make_toy_prompts(8, seed=5))
        assert len(set(ro.lengths().tolist())) > 1  # rows of several lengths: sorting and trimming matter
        adv = torch.randn(ro.logprobs.shape).masked_fill(~ro.response_mask, 0.0)
        ret = torch.randn(ro.logprobs.shape).masked_fill(~ro.response_mask, 0.0)
        trainer.update(ro, adv, ret)
        results.append(({k: v.clone() for k, v in trainer.model.state_dict().items()}, list(sizes)))
    (fixed, fixed_sizes), (budgeted, budget_sizes) = results
    assert fixed_sizes == [8] and len(budget_sizes) > 1 and sum(budget_sizes) == 8
    for key, value in fixed.items():
        torch.testing.assert_close(budgeted[key], value, rtol=1e-5, atol=1e-6, msg=key)
