"""tether.quality: text-quality metrics and KL attribution against hand-computed values on tiny batches; the
kl_tokens table through the JSONL logger; the report's quality section on synthetic rows."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tether.logging.base import KL_TOKENS_TABLE, MultiLogger
from tether.logging.jsonl import JsonlLogger, read_jsonl
from tether.quality import (
    baseline_of,
    distinct_n,
    format_high_kl,
    high_kl_tokens,
    kl_by_token,
    kl_table_rows,
    quality_metrics,
    repeated_ngram_share,
    response_tokens,
    top_k_token_share,
    top_kl_share,
)
from tether.report_quality import kl_tokens_html, pick_table_steps

# Four responses, right-padded to T = 6 (pad id 0). The padded positions hold ids that would change every
# number if they were counted (row 3 is all padding: an empty response whose ids are 3, 3).
IDS = torch.tensor(
    [
        [5, 6, 5, 6, 5, 0],
        [7, 7, 7, 0, 0, 0],
        [9, 0, 0, 0, 0, 0],
        [3, 3, 0, 0, 0, 0],
    ]
)
MASK = torch.tensor(
    [
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ],
    dtype=torch.bool,
)
# Per-token KL; 9.0 at every padded position (must not count).
KL = torch.tensor(
    [
        [0.5, 0.1, 0.3, 0.2, -0.1, 9.0],
        [0.1, 0.3, 0.2, 9.0, 9.0, 9.0],
        [0.4, 9.0, 9.0, 9.0, 9.0, 9.0],
        [9.0, 9.0, 9.0, 9.0, 9.0, 9.0],
    ]
)


def test_response_tokens_keep_only_the_real_tokens_in_order() -> None:
    assert response_tokens(IDS, MASK) == [[5, 6, 5, 6, 5], [7, 7, 7], [9], []]


def test_quality_metrics_by_hand() -> None:
    m = quality_metrics(IDS, MASK)
    # 9 real tokens (5 + 3 + 1 + 0) of 4 types {5, 6, 7, 9}
    assert m["quality/distinct_1"] == pytest.approx(4 / 9)
    # bigrams within responses: (5,6) (6,5) (5,6) (6,5) | (7,7) (7,7) -> 6, of 3 distinct; none across rows
    assert m["quality/distinct_2"] == pytest.approx(3 / 6)
    # 3-grams: row 0 (5,6,5) (6,5,6) (5,6,5): 1 of 3 repeats; row 1 (7,7,7): 0 of 1; rows 2, 3 have none
    assert m["quality/repeat_3gram"] == pytest.approx((1 / 3 + 0) / 2)
    # token counts 5:3, 7:3, 6:2, 9:1: the top five types are all 9 tokens
    assert m["quality/top5_token_share"] == pytest.approx(1.0)
    assert top_k_token_share(response_tokens(IDS, MASK), 2) == pytest.approx(6 / 9)
    assert top_k_token_share(response_tokens(IDS, MASK), 1) == pytest.approx(3 / 9)


def test_single_token_and_empty_responses() -> None:
    single = [[4], [4], [8]]
    assert distinct_n(single, 1) == pytest.approx(2 / 3)
    assert distinct_n(single, 2) == 0.0  # no bigram at all: 0, not NaN
    assert repeated_ngram_share(single, 3) == 0.0
    assert top_k_token_share(single, 1) == pytest.approx(2 / 3)
    empty = quality_metrics(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bool))
    assert empty == {key: 0.0 for key in empty} and len(empty) == 4


def test_kl_attribution_by_hand_sums_back_to_the_steps_kl() -> None:
    attribution = kl_by_token(KL, IDS, MASK)
    # type 5: 0.5 + 0.3 - 0.1 = 0.7; 7: 0.1 + 0.3 + 0.2 = 0.6; 9: 0.4; 6: 0.1 + 0.2 = 0.3; total 2.0
    assert attribution.token_ids.tolist() == [5, 7, 9, 6]
    assert attribution.kl.tolist() == pytest.approx([0.7, 0.6, 0.4, 0.3])
    assert attribution.count.tolist() == [3, 3, 1, 2]
    assert attribution.share.tolist() == pytest.approx([0.35, 0.3, 0.2, 0.15])
    step_kl = float((KL.double() * MASK).sum())  # the KL of the real tokens (float32 sums differ by 1e-7)
    assert float(attribution.kl.sum()) == pytest.approx(step_kl, abs=1e-12)
    assert float(attribution.share.sum()) == pytest.approx(1.0, abs=1e-12)
    assert top_kl_share(attribution, 2) == pytest.approx(1.3 / 2.0)
    assert top_kl_share(attribution, 5) == pytest.approx(1.0)


def test_kl_share_with_a_negative_type_and_with_no_kl() -> None:
    kl = KL.clone()
    kl[0, 1], kl[0, 3] = -0.5, 0.1  # type 6 now sums to -0.4 (k1 can be negative per token)
    attribution = kl_by_token(kl, IDS, MASK)
    assert attribution.token_ids.tolist() == [5, 7, 9, 6]
    assert float(attribution.share.sum()) == pytest.approx(1.0)  # signed shares still add up
    assert attribution.share[-1].item() == pytest.approx(-0.4 / 1.3)
    # the concentration is over the positive part: 0.7 of 0.7 + 0.6 + 0.4
    assert top_kl_share(attribution, 1) == pytest.approx(0.7 / 1.7)
    zero = kl_by_token(torch.zeros_like(KL), IDS, MASK)
    assert zero.share.tolist() == [0.0] * 4 and top_kl_share(zero) == 0.0


def test_kl_table_rows_and_high_kl_tokens() -> None:
    words = {5: " love", 6: " the", 7: "!", 9: ' "joy"'}
    rows = kl_table_rows(kl_by_token(KL, IDS, MASK), words.__getitem__, n=2)
    assert [(r["rank"], r["token"], r["token_id"], r["count"]) for r in rows] == [(1, " love", 5, 3), (2, "!", 7, 3)]
    assert rows[0]["kl"] == pytest.approx(0.7) and rows[1]["share"] == pytest.approx(0.3)
    marked = high_kl_tokens(KL, IDS, MASK, k=2)
    assert [[(p, t) for p, t, _ in row] for row in marked] == [[(0, 5), (2, 5)], [(1, 7), (2, 7)], [(0, 9)], []]
    assert marked[0][0][2] == pytest.approx(0.5)
    assert format_high_kl(marked[0], words.__getitem__) == '" love" 0.5; " love" 0.3'
    assert format_high_kl(marked[2], words.__getitem__) == '" \\"joy\\"" 0.4'  # JSON-quoted, so it is unambiguous


def test_baseline_is_the_mean_of_the_first_steps() -> None:
    rows = [
        {"step": 1, "a": 0.6, "b": 1.0},
        {"step": 2, "a": 0.5, "b": math.nan},
        {"step": 3, "a": 0.4},
        {"step": 4, "a": 0.0, "b": 5.0},
    ]
    assert baseline_of(rows, ["a", "b", "c"], steps=3) == pytest.approx({"a": 0.5, "b": 1.0})
    assert baseline_of(rows, ["a"], steps=1) == {"a": 0.6}


def test_jsonl_logger_writes_tables_and_truncates_them_on_resume(tmp_path) -> None:
    logger = MultiLogger([JsonlLogger(tmp_path)])
    for step in (1, 2, 3):
        logger.log_metrics({"objective/kl": 1.0}, step)
        logger.log_table(KL_TOKENS_TABLE, [{"rank": 1, "token": "NaN", "kl": 0.5}], step)
    logger.close()
    rows = read_jsonl(tmp_path / "kl_tokens.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["token"] == "NaN"  # text stays text
    JsonlLogger(tmp_path, start_step=2).close()  # resume from a step-2 checkpoint
    assert [r["step"] for r in read_jsonl(tmp_path / "kl_tokens.jsonl")] == [1, 2]
    (tmp_path / "metrics.jsonl").unlink()  # a fresh run in the same directory: the old table goes too
    JsonlLogger(tmp_path).close()
    assert read_jsonl(tmp_path / "kl_tokens.jsonl") == []
    with pytest.raises(ValueError, match="unknown table"):
        MultiLogger([]).log_table("nope", [], 1)


def test_report_kl_table_picks_steps_and_ranks() -> None:
    assert pick_table_steps(list(range(1, 11)), 4) == [1, 4, 7, 10]
    assert pick_table_steps([3, 1, 2], 5) == [1, 2, 3]
    rows = [
        {"step": s, "rank": r, "token": tok, "kl": 1.0, "share": share, "count": 2}
        for s in (1, 2)
        for r, tok, share in ((1, " love" if s == 2 else "a", 0.5), (2, "!", 0.25))
    ]
    text = kl_tokens_html(rows)
    assert "<th>step 1</th><th>step 2</th>" in text
    assert "&#x27; love&#x27;</code> 50.0%" in text and "25.0%" in text
    assert "No KL attribution" in kl_tokens_html([])
    assert json.dumps(rows)  # plain data
