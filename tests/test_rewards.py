"""Reward contract: build_reward specs, composition, prompt baseline, validation, reward-model scoring."""

from __future__ import annotations

import math
import os

import pytest
import torch
from test_rewards_helpers import bert_tokenizer, gpt_tokenizer, tiny_bert_rm, tiny_gpt2_lm, tiny_gpt2_rm
from transformers import GPT2ForSequenceClassification

from tether.rewards import Reward, RewardError, RewardOutput, build_reward, score_texts, sequence_scores
from tether.rewards.model import last_valid_index, pad_right


def count_x(prompts: list[str], responses: list[str], **columns: object) -> list[float]:
    return [float(r.count("x")) for r in responses]


def prompt_len(prompts: list[str], responses: list[str], **columns: object) -> list[float]:
    return [float(len(p + r)) for p, r in zip(prompts, responses, strict=True)]


# --- composition and baseline (hand-computed) --------------------------------------------------------------


def test_single_function_output_and_name() -> None:
    out = build_reward(count_x)(["p", "q"], ["xx", "axa"])
    assert isinstance(out, RewardOutput)
    assert out.scores.dtype == torch.float32 and out.scores.shape == (2,)
    assert out.scores.tolist() == [2.0, 1.0]
    assert list(out.components) == ["count_x"]
    assert out.components["count_x"].tolist() == [2.0, 1.0]


def test_weighted_composition_hand_computed() -> None:
    # count_x: [2, 0]; prompt_len = len(p + r): ["ab"+"xx" -> 4, "c"+"yyy" -> 4]
    # total = 2 * count_x - 0.5 * prompt_len = [4 - 2, 0 - 2] = [2, -2]
    reward = build_reward([count_x, prompt_len], weights=[2.0, -0.5])
    out = reward(["ab", "c"], ["xx", "yyy"])
    assert reward.names == ["count_x", "prompt_len"]
    assert out.components["count_x"].tolist() == [2.0, 0.0]
    assert out.components["prompt_len"].tolist() == [4.0, 4.0]
    assert out.scores.tolist() == [2.0, -2.0]


def test_prompt_baseline_per_component_before_weighting() -> None:
    # prompt_len with baseline: len(p + r) - len(p + "") = len(r) -> [2, 3];  count_x(r) - count_x("") = [2, 0]
    # total = 1 * [2, 0] + 3 * [2, 3] = [8, 9]
    reward = build_reward([count_x, prompt_len], weights=[1.0, 3.0], baseline="prompt")
    out = reward(["abcdef", "c"], ["xx", "yyy"])
    assert out.components["prompt_len"].tolist() == [2.0, 3.0]
    assert out.components["count_x"].tolist() == [2.0, 0.0]
    assert out.scores.tolist() == [8.0, 9.0]


def test_columns_reach_functions_and_names_are_unique() -> None:
    def match(prompts: list[str], responses: list[str], answer: list[str], **_: object) -> list[float]:
        return [float(r == a) for r, a in zip(responses, answer, strict=True)]

    class Scaled:
        name = "scaled"

        def __call__(self, prompts: list[str], responses: list[str], **_: object) -> torch.Tensor:
            return torch.tensor([10.0] * len(prompts))

    reward = build_reward([match, match, Scaled()])
    assert reward.names == ["match", "match_2", "scaled"]
    out = reward(["p", "p"], ["4", "5"], {"answer": ["4", "4"]})
    assert out.scores.tolist() == [12.0, 10.0]
    with pytest.raises(RewardError, match="column 'answer' has 1 values for 2 rows"):
        reward(["p", "p"], ["4", "5"], {"answer": ["4"]})


@pytest.mark.parametrize(
    ("returned", "pattern"),
    [
        ([1.0], r"reward 'bad' returned 1 values for 2 rows"),
        ([1.0, "high"], r"reward 'bad' row 1: value 'high' \(str\) is not a number"),
        ([1.0, None], r"reward 'bad' row 1: value None"),
        ([math.nan, 1.0], r"reward 'bad' row 0: value nan is not finite"),
        (torch.tensor([1.0, math.inf]), r"reward 'bad' row 1: value inf is not finite"),
        ("12", r"reward 'bad' must return a sequence"),
    ],
)
def test_bad_function_outputs_name_function_row_and_value(returned: object, pattern: str) -> None:
    def bad(prompts: list[str], responses: list[str], **_: object) -> object:
        return returned

    with pytest.raises(RewardError, match=pattern):
        build_reward(bad)(["a", "b"], ["c", "d"])


def test_file_spec_imports_function_and_errors_name_file(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "my_rewards.py")
    with open(path, "w") as f:
        f.write("def shout(prompts, responses, **kw):\n    return [float(r.count('!')) for r in responses]\n")
    reward = build_reward(f"{path}:shout")
    assert reward.names == ["shout"]
    assert reward(["p"], ["hi!!"]).scores.tolist() == [2.0]
    with pytest.raises(RewardError, match=r"my_rewards.py' has no function 'whisper' \(it defines: shout\)"):
        build_reward(f"{path}:whisper")
    with pytest.raises(RewardError, match=r"reward file '.*nope.py' not found"):
        build_reward(os.path.join(tmp_path, "nope.py") + ":shout")
    with pytest.raises(RewardError, match="neither a model directory"):
        build_reward(os.path.join(tmp_path, "missing_dir"))


def test_bad_weights_and_baseline() -> None:
    with pytest.raises(RewardError, match="2 weights for 1 reward components"):
        build_reward(count_x, weights=[1.0, 2.0])
    with pytest.raises(RewardError, match="baseline must be one of"):
        build_reward(count_x, baseline="mean")  # type: ignore[arg-type]
    with pytest.raises(RewardError, match="finite"):
        build_reward(count_x, weights=[math.nan])


# --- reward models ------------------------------------------------------------------------------------------


def manual_last_token_score(model: GPT2ForSequenceClassification, ids: list[int]) -> float:
    """Independent reference: run the unpadded sequence alone and read the head at its final position."""
    with torch.no_grad():
        hidden = model.transformer(input_ids=torch.tensor([ids])).last_hidden_state  # [1, T, H]
        return model.score(hidden)[0, -1, 0].item()


def test_last_valid_token_invariant_to_padding_and_pad_equal_eos() -> None:
    tok = gpt_tokenizer()
    assert tok.pad_token_id == tok.eos_token_id  # the case HF's pooling gets wrong
    model = tiny_gpt2_rm(tok)
    short = "good cat <eos>"  # ends with EOS == pad
    longer = "the dog sat on the mat a b c <eos>"
    ids = tok(short)["input_ids"]
    expected = manual_last_token_score(model, ids)
    alone = score_texts(model, tok, [short])
    padded = score_texts(model, tok, [short, longer])
    padded_more = score_texts(model, tok, [short, longer + " x y z q w"], batch_size=2)
    assert alone[0].item() == pytest.approx(expected, abs=1e-5)
    assert padded[0].item() == pytest.approx(expected, abs=1e-5)
    assert padded_more[0].item() == pytest.approx(expected, abs=1e-5)
    # HF's own pooling reads the rightmost non-pad token: the word before the final EOS, a different score.
    input_ids, mask = pad_right([ids, tok(longer)["input_ids"]], tok.pad_token_id)
    with torch.no_grad():
        hf = model(input_ids=input_ids, attention_mask=mask.long()).logits[0, 0].item()
    assert abs(hf - expected) > 1e-2


def test_last_valid_index_and_left_padding_rejected() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert last_valid_index(mask).tolist() == [2, 0, 3]
    with pytest.raises(ValueError, match="right-padded"):
        last_valid_index(torch.tensor([[0, 1, 1]], dtype=torch.bool))


def test_sequence_scores_has_gradients_for_training() -> None:
    tok = gpt_tokenizer()
    model = tiny_gpt2_rm(tok)
    input_ids, mask = pad_right([tok("good cat")["input_ids"]], tok.pad_token_id)
    sequence_scores(model, input_ids, mask).sum().backward()
    assert model.score.weight.grad is not None and model.score.weight.grad.abs().sum() > 0


def test_reward_model_with_different_tokenizer_from_policy() -> None:
    policy_tok = gpt_tokenizer()
    rm_tok = bert_tokenizer()
    rm = tiny_bert_rm(rm_tok)
    prompts, responses = ["the cat ", "a dog "], ["sat on the mat", "x y z"]
    # The trainer decodes the policy's ids to strings; the reward re-tokenises them with its own tokenizer.
    response_ids = [policy_tok(r)["input_ids"] for r in responses]
    decoded = [policy_tok.decode(ids) for ids in response_ids]
    assert decoded == responses
    out = build_reward((rm, rm_tok))(prompts, decoded)
    with torch.no_grad():
        for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            enc = rm_tok(p + r, return_tensors="pt")
            direct = rm(**enc).logits[0, 0].item()
            assert out.scores[row].item() == pytest.approx(direct, abs=1e-5)
            # Feeding the policy's ids straight into the reward model (TRL's shared-tokenizer assumption)
            # scores other tokens entirely.
            wrong = rm(input_ids=torch.tensor([policy_tok(p + r)["input_ids"]])).logits[0, 0].item()
            assert abs(wrong - direct) > 1e-3


def test_reward_model_dir_loads_and_scores(tmp_path: os.PathLike[str]) -> None:
    tok = gpt_tokenizer()
    model = tiny_gpt2_rm(tok)
    path = os.path.join(tmp_path, "rm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    reward = build_reward(path, batch_size=1)
    assert reward.names == ["rm"] and len(reward.models) == 1
    texts = ["good cat", "bad dog <eos>"]
    out = reward(["good ", "bad "], ["cat", "dog <eos>"])
    assert torch.allclose(out.scores, score_texts(model, tok, texts), atol=1e-5)
    # prompt baseline with a model: r(p + r) - r(p)
    base = build_reward(path, baseline="prompt")(["good ", "good "], ["cat", "dog"])
    prompt_alone = score_texts(model, tok, ["good "])[0]
    expected = score_texts(model, tok, ["good cat", "good dog"]) - prompt_alone
    assert torch.allclose(base.scores, expected, atol=1e-5)


def test_reward_model_errors_name_the_model(tmp_path: os.PathLike[str]) -> None:
    tok = bert_tokenizer()
    two = tiny_bert_rm(tok, num_labels=2)
    path = os.path.join(tmp_path, "sentiment2")
    two.save_pretrained(path)
    tok.save_pretrained(path)
    with pytest.raises(RewardError, match=r"reward model '.*sentiment2' has num_labels=2"):
        build_reward(path)
    with pytest.raises(RewardError, match="num_labels=2"):
        build_reward((two, tok))
    with pytest.raises(RewardError, match="needs its tokenizer"):
        build_reward(tiny_bert_rm(tok))
    # A causal LM directory would get a random score head: refuse it.
    gtok = gpt_tokenizer()
    lm_path = os.path.join(tmp_path, "policy_lm")
    tiny_gpt2_lm(gtok).save_pretrained(lm_path)
    gtok.save_pretrained(lm_path)
    with pytest.raises(RewardError, match=r"'.*policy_lm' is a \['GPT2LMHeadModel'\] checkpoint"):
        build_reward(lm_path)


def test_text_longer_than_context_errors_unless_max_length() -> None:
    tok = gpt_tokenizer()
    model = tiny_gpt2_rm(tok, n_positions=8)
    long_response = " ".join(["a"] * 10)
    reward = build_reward((model, tok))
    with pytest.raises(
        RewardError, match=r"'GPT2ForSequenceClassification'.*row 1 has 11 tokens.*context of 8"
    ):
        reward(["good", "good"], [" cat", " " + long_response])
    # With max_length the text is cut from the left: the score is that of its last 6 tokens.
    truncated = build_reward((model, tok), max_length=6)(["good"], [" cat " + long_response])
    assert truncated.scores[0].item() == pytest.approx(
        manual_last_token_score(model, tok("a a a a a a")["input_ids"]), abs=1e-5
    )


def test_reward_type_and_models_list() -> None:
    tok = gpt_tokenizer()
    reward = build_reward([count_x, (tiny_gpt2_rm(tok), tok)], weights=[1.0, 0.0])
    assert isinstance(reward, Reward)
    assert reward.names == ["count_x", "GPT2ForSequenceClassification"]
    assert len(reward.models) == 1 and not reward.models[0].training
    assert reward(["a"], ["x x"]).scores.tolist() == [2.0]
