"""Rewards: the reward Protocol, verifiable built-ins, reward models, composition, normalisation and checks.

The PPO/GRPO trainers use only :func:`build_reward` and the :class:`Reward` it returns::

    reward = build_reward(["rm_dir", "my_rewards.py:length_penalty"], weights=[1.0, 0.1], baseline="prompt")
    out = reward(prompts, responses, columns)   # out.scores [B], out.components {name: [B]}
"""

from tether.rewards.base import (
    RewardError,
    RewardFunction,
    RewardFunctionError,
    RewardOutput,
    validate_scores,
)
from tether.rewards.compose import Reward, build_reward, load_function
from tether.rewards.losses import PairwiseLoss, bradley_terry_loss
from tether.rewards.model import load_reward_model, score_texts, sequence_scores
from tether.rewards.normalize import GainBias, RunningNorm, gain_bias_for, normalize_reward_model
from tether.rewards.verifiable import (
    VERIFIABLE_REWARDS,
    ExactMatch,
    NumericMatch,
    RegexMatch,
    build_verifiable,
    extract_answer,
    normalize_answer,
    parse_number,
    regex_fullmatch,
)

__all__ = [
    "VERIFIABLE_REWARDS",
    "ExactMatch",
    "GainBias",
    "NumericMatch",
    "PairwiseLoss",
    "RegexMatch",
    "Reward",
    "RewardError",
    "RewardFunction",
    "RewardFunctionError",
    "RewardOutput",
    "RunningNorm",
    "bradley_terry_loss",
    "build_reward",
    "build_verifiable",
    "extract_answer",
    "gain_bias_for",
    "load_function",
    "load_reward_model",
    "normalize_answer",
    "normalize_reward_model",
    "parse_number",
    "regex_fullmatch",
    "score_texts",
    "sequence_scores",
    "validate_scores",
]
