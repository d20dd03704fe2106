"""The demo's reward: how positive a response reads, by VADER's compound sentiment score.

VADER (Hutto & Gilbert, 2014) is a lexicon-and-rules scorer: no model, no GPU, microseconds per text, which
makes it a fast reward for an offline CPU demo of "make the model write positive movie reviews".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tether.demo.smollm import DemoAssetError

if TYPE_CHECKING:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

VADER_INSTALL = "pip install vaderSentiment"


class SentimentReward:
    """Reward callable: VADER compound score of each response, in [-1, 1].

    Called as ``reward(prompts, responses, **columns)`` with ``len(prompts) == len(responses) == B``; returns
    ``B`` floats. Only the response is scored: the prompt is the same for the policy and any baseline, and
    scoring it would reward nothing the policy did. Extra dataset columns are accepted and ignored.

    The analyzer (which parses a ~7,500-word lexicon) is built once, on the first call, so that importing
    this module never fails, even without ``vaderSentiment`` installed.
    """

    name: str = "sentiment"
    # Logging and reward composition name a plain function by its `__name__`; give instances the same handle.
    __name__: str = "sentiment"

    def __init__(self) -> None:
        self._analyzer: SentimentIntensityAnalyzer | None = None

    @property
    def analyzer(self) -> SentimentIntensityAnalyzer:
        """The VADER analyzer, created on first use.

        Raises:
            DemoAssetError: ``vaderSentiment`` is not installed (the message gives the install command).
        """
        if self._analyzer is None:
            try:
                from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
            except ImportError as err:
                raise DemoAssetError(
                    f"The demo's sentiment reward needs vaderSentiment; install with `{VADER_INSTALL}`"
                ) from err
            self._analyzer = SentimentIntensityAnalyzer()
        return self._analyzer

    def __call__(self, prompts: list[str], responses: list[str], **columns: Any) -> list[float]:
        """Score B responses.

        Args:
            prompts: B prompt strings (checked for length, not scored).
            responses: B decoded response strings.
            **columns: other dataset columns for this batch, ignored.

        Returns:
            B floats in [-1, 1]; 0.0 for an empty or neutral response.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        analyzer = self.analyzer
        return [float(analyzer.polarity_scores(text)["compound"]) for text in responses]

    def __repr__(self) -> str:
        return "SentimentReward()"


sentiment_reward = SentimentReward()
