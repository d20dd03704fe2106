"""A tqdm progress bar over a run's episodes, with an ETA and the latest metrics as its postfix."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import IO, Any

import tqdm

#: Postfix labels for the metrics most worth seeing on the bar (other keys are shown by their last segment).
_POSTFIX_LABELS: dict[str, str] = {
    "objective/scores": "reward",
    "objective/kl": "kl",
    "kl/coef": "kl_coef",
    "objective/entropy": "entropy",
    "rollout/response_length": "len",
}


def _label(key: str) -> str:
    return _POSTFIX_LABELS.get(key, key.rsplit("/", 1)[-1])


class Progress:
    """A progress bar over ``total`` episodes (prompts x completions consumed), as TRL counts training length.

    Args:
        total: episodes in the whole run.
        desc: the bar's label, e.g. ``"ppo"``.
        enabled: ``False`` shows nothing (non-main processes, ``--quiet``); :meth:`write` still prints.
        initial: episodes already done, when resuming.
        file: where the bar is drawn; tqdm's default (stderr) when ``None``.

    When the output is not a terminal (CI logs, pytest's capture) tqdm still works; it just prints plain
    refreshes instead of redrawing one line, at most every ``mininterval`` seconds.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        enabled: bool = True,
        *,
        initial: int = 0,
        file: IO[str] | None = None,
    ) -> None:
        self.enabled = enabled
        self._bar: Any = tqdm.tqdm(
            total=total,
            desc=desc,
            initial=initial,
            unit="ep",
            disable=not enabled,
            dynamic_ncols=True,
            file=file,
            # The first steps include compilation/caching warm-up; a lower smoothing keeps the ETA from
            # swinging with every step's rollout length.
            smoothing=0.1,
        )

    @property
    def n(self) -> int:
        """Episodes counted so far (including ``initial``)."""
        return int(self._bar.n)

    def update(self, n_episodes: int, postfix: Mapping[str, float] | None = None) -> None:
        """Advance by ``n_episodes`` and show ``postfix`` (metric key -> value, 3 significant digits)."""
        if postfix:
            shown = {
                _label(key): f"{value:.3g}" if math.isfinite(value) else str(value)
                for key, value in ((k, float(v)) for k, v in postfix.items())
            }
            self._bar.set_postfix(shown, refresh=False)
        self._bar.update(n_episodes)

    def write(self, line: str) -> None:
        """Print ``line`` above the bar without breaking it (plain print when the bar is disabled)."""
        tqdm.tqdm.write(line)

    def close(self) -> None:
        """Close the bar. Safe to call twice."""
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
