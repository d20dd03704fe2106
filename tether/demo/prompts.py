"""The demo's prompts: openings of movie reviews, to be continued by the policy.

``data/movie_prompts.jsonl`` holds ~380 openings written for tether (hand-written plus a few templates, no
dataset copied), one ``{"prompt": "..."}`` object per line. Most are neutral ("The film", "Halfway through
the second act,"), so a continuation can go either way and the sentiment reward has room to move.
"""

from __future__ import annotations

import json
from importlib import resources

PROMPTS_PACKAGE = "tether.demo"
PROMPTS_FILE = "data/movie_prompts.jsonl"


def load_movie_prompts() -> list[str]:
    """All demo prompts, in file order.

    Read through ``importlib.resources`` so it also works from an installed wheel or a zip, not only from a
    source checkout.

    Returns:
        The prompt strings (non-empty, no trailing space).

    Raises:
        ValueError: a line is not a JSON object with a non-empty string ``"prompt"``.
    """
    text = resources.files(PROMPTS_PACKAGE).joinpath(PROMPTS_FILE).read_text(encoding="utf-8")
    prompts: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f'{PROMPTS_FILE} line {lineno}: expected {{"prompt": <non-empty string>}}')
        prompts.append(prompt)
    return prompts
