"""Built-in verifiable rewards: answer extraction, normalisation, numeric tolerance, regex, spec strings."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tether.rewards import (
    VERIFIABLE_REWARDS,
    ExactMatch,
    NumericMatch,
    RegexMatch,
    RewardError,
    build_reward,
    build_verifiable,
    extract_answer,
    normalize_answer,
    parse_number,
)
from tether.rewards.verifiable import is_verifiable_spec

# --- extraction and normalisation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so x = \boxed{7}.", "7"),
        (r"\boxed{1} then \boxed{ \frac{1}{2} } wins", r"\frac{1}{2}"),  # last box, nested braces kept
        ("\\boxed{5}\n#### 6", "5"),  # a box beats ####
        ("she has 3 + 4 = 7 apples\n#### 72", "72"),
        ("#### 1\n#### 2 \nnote", "2"),  # the last ####, to the end of its line
        ("####\n\n  9  \n10", "9"),  # a marker ending its line takes the next non-empty line
        ("The capital... Answer: Paris.\nHope this helps", "Paris."),
        ("answer: a\nANSWER:  b ", "b"),  # any case, the last one
        ("step one\nstep two\n\n  42 \n\n", "42"),  # the last non-empty line
        (r"\boxed{unclosed", r"\boxed{unclosed"),  # an unclosed box is no box
        ("", ""),
    ],
)
def test_extract_answer(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  The   Eiffel\n\tTower.  ", "the eiffel tower"),
        ("PARIS", "paris"),
        ("etc..", "etc."),  # one trailing period only
        ("3.5", "3.5"),  # an inner period stays
        ("Straße", "strasse"),  # case-folding, not just lower()
        ("  .  ", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", 42.0),
        ("it costs -5 dollars", -5.0),
        ("x \u22127", -7.0),  # unicode minus
        ("pages 3-5", 5.0),  # a minus after a digit is a range, not a sign
        ("1,234", 1234.0),
        ("$1,234,567.5 total", 1234567.5),
        ("12,34", 34.0),  # not a thousands group
        ("first 3 then 0.25", 0.25),  # the last number
        (".5", 0.5),
        ("it is 3.", 3.0),
        ("2.5e3 apples", 2500.0),
        ("3/4", 0.75),
        ("The answer is -3/4.", -0.75),
        (r"\frac{3}{8}", 0.375),
        (r"-\dfrac{1}{2}", -0.5),
        ("1/0", None),
        ("no digits here", None),
        ("", None),
    ],
)
def test_parse_number(text: str, expected: float | None) -> None:
    assert parse_number(text) == expected


# --- the reward functions -----------------------------------------------------------------------------------


def test_exact_match_scores() -> None:
    responses = [
        "Let me think.\nThe answer: Paris.",  # extracted "Paris." -> "paris"
        r"so \boxed{ paris }",
        "London",
        "",  # an empty answer never matches, not even an empty reference
        "72",
        "5",
    ]
    answers = ["paris", "Paris", "Paris", "", "48 / 2 = 24 ... 24 + 48 = 72\n#### 72", 5]
    fn = ExactMatch()
    assert fn.name == "exact_match"
    assert fn(["p"] * 6, responses, answer=answers, level=[1] * 6) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    whole = ExactMatch(extract=False)  # the whole normalised response must equal the whole reference
    assert whole(["p"] * 2, ["Paris.", "I think\nParis"], answer=["paris", "paris"]) == [1.0, 0.0]
    with pytest.raises(RewardError, match=r"'exact_match' row 1: column 'answer' is empty"):
        fn(["p", "p"], ["a", "b"], answer=["a", None])


def test_numeric_match_tolerance_edges() -> None:
    # |got - want| <= max(tolerance, rel_tolerance * |want|); dyadic values, so every difference is exact.
    fn = NumericMatch(tolerance=0.25)
    responses = ["2.25", "#### 1.75", "2.2500001", "about 1.7", "no idea", r"\boxed{2}"]
    assert fn(["p"] * 6, responses, answer=[2] * 6) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    # default tolerance 1e-6: 1/3 - 0.333333 = 3.3e-7 passes, 1/3 - 0.3333 = 3.3e-5 does not
    assert NumericMatch()(["p", "p"], ["0.333333", "0.3333"], answer=["1/3", "1/3"]) == [1.0, 0.0]
    # relative: 0.01 * 1000 = 10 (exact in binary floating point), wider than tolerance
    rel = NumericMatch(tolerance=1.0, rel_tolerance=0.01)
    assert rel(["p"] * 3, ["1,010", "1010.5", "990"], answer=["1,000"] * 3) == [1.0, 0.0, 1.0]
    # rel_tolerance 0 by default: the same response fails under the absolute tolerance alone
    assert NumericMatch(tolerance=1.0)(["p"], ["1,010"], answer=[1000]) == [0.0]
    # a GSM8K solution column is read like a response
    assert NumericMatch()(["p"], ["so -72."], answer=["... 24 + 48 = -72\n#### -72"]) == [1.0]


def test_numeric_match_bad_reference_and_settings() -> None:
    with pytest.raises(
        RewardError, match=r"'numeric_match' row 1: column 'answer' value 'n/a' is not a finite"
    ):
        NumericMatch()(["p", "p"], ["1", "2"], answer=[1, "n/a"])
    with pytest.raises(RewardError, match="not a finite"):
        NumericMatch()(["p"], ["1"], answer=[float("nan")])
    with pytest.raises(RewardError, match="tolerance must be a finite number >= 0"):
        NumericMatch(tolerance=-0.1)
    with pytest.raises(RewardError, match="rel_tolerance must be a finite number >= 0"):
        NumericMatch(rel_tolerance=float("inf"))


def test_regex_search_full_match_and_newlines() -> None:
    fn = RegexMatch(r"<think>.*</think>")
    responses = ["<think>a\nb</think> 4", "x <think></think>", "<think> never closed", "</think><think>"]
    assert fn.name == "regex"
    assert fn(["p"] * 4, responses) == [1.0, 1.0, 0.0, 0.0]  # "." crosses newlines
    full = RegexMatch(r"<think>.*</think>", full_match=True)
    assert full(["p"] * 4, responses) == [0.0, 0.0, 0.0, 0.0]
    assert full(["p"], ["<think>\nok\n</think>"]) == [1.0]


def test_regex_is_compiled_once_and_bad_patterns_fail_at_build(monkeypatch: pytest.MonkeyPatch) -> None:
    fn = RegexMatch(r"\d+")

    def no_compiling(*args: object, **kwargs: object) -> None:
        raise AssertionError("compiled at call time")

    monkeypatch.setattr(re, "compile", no_compiling)
    assert fn(["p", "p"], ["a1", "b"]) == [1.0, 0.0]
    monkeypatch.undo()
    with pytest.raises(RewardError, match=r"'regex': bad regular expression '\(ab'"):
        RegexMatch("(ab")
    with pytest.raises(RewardError, match="bad regular expression"):
        build_reward("regex:[z-a]")


def test_missing_column_names_it_and_the_present_ones() -> None:
    with pytest.raises(RewardError) as info:
        ExactMatch()(["p"], ["r"], solution=["x"], level=[1])
    message = str(info.value)
    assert "'exact_match'" in message and "'answer'" in message and "level, solution" in message
    reward = build_reward("numeric_match:column=target")
    with pytest.raises(RewardError, match=r"'numeric_match' needs the dataset column 'target'.*: answer"):
        reward(["p"], ["1"], {"answer": ["1"]})
    with pytest.raises(RewardError, match=r"columns: \(none\)"):
        reward(["p"], ["1"])


# --- spec strings through build_reward ----------------------------------------------------------------------


def test_spec_names_and_options() -> None:
    assert set(VERIFIABLE_REWARDS) == {"exact_match", "numeric_match", "regex", "regex_fullmatch"}
    assert build_verifiable("numeric_match:tolerance=0.01, column=solution") == NumericMatch(
        column="solution", tolerance=0.01
    )
    assert build_verifiable("exact_match") == ExactMatch()
    assert build_verifiable("exact_match:extract=NO") == ExactMatch(extract=False)
    # the rest of a regex spec is the pattern, colons and commas included
    assert build_verifiable("regex:^a:b,c=d$") == RegexMatch("^a:b,c=d$")
    assert build_verifiable("regex_fullmatch:ab+") == RegexMatch(
        "ab+", full_match=True, name="regex_fullmatch"
    )
    # and build_reward reaches them: |1.005 - 1| < 0.01 < |1.02 - 1|, read from the "solution" column
    reward = build_reward("numeric_match:tolerance=0.01,column=solution")
    assert reward.names == ["numeric_match"]
    assert reward(["p", "p"], ["1.005", "1.02"], {"solution": ["1", "1"]}).scores.tolist() == [1.0, 0.0]
    assert build_reward("exact_match:extract=false,name=gsm8k").names == ["gsm8k"]
    full = build_reward("regex_fullmatch:ab+")
    assert full.names == ["regex_fullmatch"]
    assert full(["p", "p"], ["abb", "abbc"]).scores.tolist() == [1.0, 0.0]
    assert build_reward("regex:^a:b,c$")(["p", "p"], ["a:b,c", "a:b"]).scores.tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("numeric_match:tol=0.1", r"bad option 'tol=0.1'.*one of column, tolerance, rel_tolerance, name"),
        ("exact_match:column", r"bad option 'column'.*key=value"),
        ("numeric_match:tolerance=abc", r"option tolerance must be a number, got 'abc'"),
        ("exact_match:extract=maybe", r"option extract must be true or false, got 'maybe'"),
        ("numeric_match:tolerance=1,tolerance=2", r"option 'tolerance' is given twice"),
        ("regex", r"'regex' needs a pattern: 'regex:PATTERN'"),
        ("regex:", r"needs a pattern"),
    ],
)
def test_bad_specs_are_clear_errors(spec: str, pattern: str) -> None:
    with pytest.raises(RewardError, match=pattern):
        build_reward(spec)


def test_weighted_composition_of_two_built_ins_names_each_component() -> None:
    # exact_match:  ["5" vs "5" -> 1, "5.0" vs "5" -> 0 (text differs), "six" -> 0]
    # numeric_match (tolerance 0.5): [5 -> 1, 5.0 -> 1, no number -> 0]
    # total = 1.0 * exact + 0.5 * numeric = [1.5, 0.5, 0.0]
    reward = build_reward(["exact_match", "numeric_match:tolerance=0.5"], weights=[1.0, 0.5])
    assert reward.names == ["exact_match", "numeric_match"]
    out = reward(["p"] * 3, ["#### 5", r"\boxed{5.0}", "six"], {"answer": ["5", "5", "5"]})
    assert out.components["exact_match"].tolist() == [1.0, 0.0, 0.0]
    assert out.components["numeric_match"].tolist() == [1.0, 1.0, 0.0]
    assert out.scores.tolist() == [1.5, 0.5, 0.0]
    # two format checks get unique component names (the metric is rewards/<name>/mean)
    assert build_reward(["regex:^a", "regex:b$"]).names == ["regex", "regex_2"]


def test_existing_paths_keep_their_meaning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # a directory named like a built-in is still read as a reward model
    os.mkdir("exact_match")
    with pytest.raises(RewardError, match=r"reward model 'exact_match'"):
        build_reward("exact_match")
    # a file.py:function spec still imports the function, even when the file is named like a built-in
    Path("regex.py").write_text("def shout(prompts, responses, **kw):\n    return [1.0] * len(responses)\n")
    assert build_reward("regex.py:shout").names == ["shout"]
    with pytest.raises(RewardError, match=r"nor a built-in \(exact_match, numeric_match, regex"):
        build_reward("no_such_reward")


def test_built_ins_follow_the_function_contract() -> None:
    # every registered factory builds a callable with a name; extra columns are swallowed
    for name, factory in VERIFIABLE_REWARDS.items():
        fn = factory("7") if name.startswith("regex") else factory()
        assert fn.name == name
        assert fn(["p", "p"], ["7", "8"], answer=["7", "7"], other=[3, 4]) == [1.0, 0.0]
    assert is_verifiable_spec("numeric_match:tolerance=1") and is_verifiable_spec("exact_match")
    assert not is_verifiable_spec("numeric.py:fn") and not is_verifiable_spec("exact_matchx")
