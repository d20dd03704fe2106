"""Built-in verifiable rewards: exact answer match, numeric answer match, regular-expression format check.

Each is a small frozen dataclass following the reward-function contract of :mod:`tether.rewards.base`
(``fn(prompts, responses, **columns) -> list[float]``, one score in {0.0, 1.0} per row) with a ``name``
that becomes the component name in ``rewards/<name>/mean``. :data:`VERIFIABLE_REWARDS` maps spec names to
their factories, so ``build_reward`` and the command line reach them by name::

    --reward exact_match                                   # column "answer"
    --reward numeric_match:tolerance=0.01,column=solution  # key=value options
    --reward "regex:^<think>.*</think>"                    # the rest of the spec is the pattern

The answer is extracted as GSM8K / MATH graders do (``\\boxed{}``, ``####``), see :func:`extract_answer`.
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tether.rewards.base import RewardError, RewardFunction

_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_COLON = re.compile(r"answer\s*:", re.IGNORECASE)
# One number: a simple fraction (a/b, \frac{a}{b}) or a decimal with optional thousands separators and
# exponent. A minus sign counts only when it does not follow a digit, so "3-5" is 5, not -5.
_SIGN = r"(?P<sign>(?<![\d.])[-\u2212])?"
_NUMBER = re.compile(
    _SIGN
    + r"(?:"
    + r"\\d?frac\{(?P<fnum>\d+)\}\{(?P<fden>\d+)\}"
    + r"|(?P<num>\d+)\s*/\s*(?P<den>\d+)(?!\.?\d)"
    + r"|(?P<dec>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)(?P<exp>[eE][-+]?\d+)?"
    + r")"
)


def extract_answer(text: str) -> str:
    """The final answer of a response: the first rule that applies, stripped.

    1. the content of the last ``\\boxed{...}`` (nested braces balanced; an unclosed one is ignored);
    2. the text after the last ``####`` (GSM8K), up to the end of its line;
    3. the text after the last ``answer:`` (any case), up to the end of its line;
    4. the last non-empty line.

    For rules 2 and 3, when the marker ends its line the next non-empty line is taken.
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    marker = text.rfind("####")
    if marker >= 0:
        return _first_line(text[marker + 4 :])
    colons = list(_ANSWER_COLON.finditer(text))
    if colons:
        return _first_line(text[colons[-1].end() :])
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _last_boxed(text: str) -> str | None:
    """Content of the last closed ``\\boxed{...}``, or None."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth = 1
        for i in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[match.end() : i]
    return None


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def normalize_answer(text: str) -> str:
    """Strip, collapse runs of whitespace to one space, case-fold, drop one trailing period."""
    out = " ".join(text.split()).casefold()
    return out.removesuffix(".").rstrip()


def parse_number(text: str) -> float | None:
    """The last number in ``text`` as a float, or None when there is none.

    Reads integers, decimals (``.5``, ``3.``), negatives (``-`` or ``\\u2212``, not after a digit: ``3-5``
    is 5), thousands separators (``1,234,567``), exponents (``1e-6``) and simple fractions (``3/4``,
    ``\\frac{3}{4}``; a zero denominator is None). ``"12,34"`` is not a thousands group: it reads as 34.
    """
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    m = matches[-1]
    sign = -1.0 if m["sign"] else 1.0
    if m["dec"] is not None:
        return sign * float(m["dec"].replace(",", "") + (m["exp"] or ""))
    num, den = (m["fnum"], m["fden"]) if m["fnum"] is not None else (m["num"], m["den"])
    return sign * int(num) / int(den) if int(den) != 0 else None


def _column(columns: Mapping[str, Any], column: str, reward: str) -> Sequence[Any]:
    """``columns[column]``, or a :class:`RewardError` naming the column and the columns present."""
    if column not in columns:
        present = ", ".join(sorted(columns)) or "(none)"
        raise RewardError(
            f"reward {reward!r} needs the dataset column {column!r}, but the rows have columns: {present}"
            f" (set column=... to read another one)"
        )
    return columns[column]


def _reference_text(value: Any, column: str, row: int, reward: str) -> str:
    if value is None:
        raise RewardError(f"reward {reward!r} row {row}: column {column!r} is empty (None)")
    return str(value)


@dataclass(frozen=True)
class ExactMatch:
    """1.0 when the response's final answer equals the reference after normalisation, else 0.0.

    Both the response and the reference (``columns[column]``, converted with ``str``) go through
    :func:`extract_answer` (skipped with ``extract=False``: whole texts are compared) then
    :func:`normalize_answer`, so a GSM8K-style reference ("... #### 72") works as is. An empty answer never
    matches. Numbers written differently ("4" vs "4.0") do not match: use :class:`NumericMatch` for them.
    """

    column: str = "answer"
    extract: bool = True
    name: str = "exact_match"

    def __call__(self, prompts: list[str], responses: list[str], **columns: Any) -> list[float]:
        """[B] responses and the [B] reference column -> [B] scores in {0.0, 1.0}."""
        refs = _column(columns, self.column, self.name)
        out = []
        for row, (response, ref) in enumerate(zip(responses, refs, strict=True)):
            want = self._answer(_reference_text(ref, self.column, row, self.name))
            got = self._answer(response)
            out.append(float(got != "" and got == want))
        return out

    def _answer(self, text: str) -> str:
        return normalize_answer(extract_answer(text) if self.extract else text)


@dataclass(frozen=True)
class NumericMatch:
    """1.0 when the last number of the response's final answer is within tolerance of the reference.

    Match when ``|got - want| <= max(tolerance, rel_tolerance * |want|)``. The answer is
    :func:`extract_answer` then :func:`parse_number`; a response without a number scores 0.0. The
    reference is a number, or a string read the same way as the response ("1,234", "3/4", "... #### 72");
    a reference that holds no number, or is not finite, is a :class:`RewardError` naming its row.
    """

    column: str = "answer"
    tolerance: float = 1e-6
    rel_tolerance: float = 0.0
    name: str = "numeric_match"

    def __post_init__(self) -> None:
        for key in ("tolerance", "rel_tolerance"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
                raise RewardError(f"reward {self.name!r}: {key} must be a finite number >= 0, got {value!r}")

    def __call__(self, prompts: list[str], responses: list[str], **columns: Any) -> list[float]:
        """[B] responses and the [B] reference column -> [B] scores in {0.0, 1.0}."""
        refs = _column(columns, self.column, self.name)
        out = []
        for row, (response, ref) in enumerate(zip(responses, refs, strict=True)):
            want = self._reference(ref, row)
            got = parse_number(extract_answer(response))
            ok = got is not None and abs(got - want) <= max(self.tolerance, self.rel_tolerance * abs(want))
            out.append(float(ok))
        return out

    def _reference(self, value: Any, row: int) -> float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            number: float | None = float(value)
        else:
            number = parse_number(extract_answer(_reference_text(value, self.column, row, self.name)))
        if number is None or not math.isfinite(number):
            raise RewardError(
                f"reward {self.name!r} row {row}: column {self.column!r} value {value!r} is not a finite number"
            )
        return number


@dataclass(frozen=True)
class RegexMatch:
    """1.0 when the response matches ``pattern``, else 0.0 — a format check such as ``^<think>.*</think>``.

    ``re.search`` by default; ``full_match=True`` uses ``re.fullmatch``. ``.`` matches newlines too
    (``re.DOTALL``) because a response spans lines; write ``[^\\n]`` for "within a line". The pattern is
    compiled once, here; a bad pattern is a :class:`RewardError`.
    """

    pattern: str
    full_match: bool = False
    name: str = "regex"
    _compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            compiled = re.compile(self.pattern, re.DOTALL)
        except re.error as err:
            raise RewardError(
                f"reward {self.name!r}: bad regular expression {self.pattern!r}: {err}"
            ) from None
        object.__setattr__(self, "_compiled", compiled)  # frozen: set once at build time

    def __call__(self, prompts: list[str], responses: list[str], **columns: Any) -> list[float]:
        """[B] responses -> [B] scores in {0.0, 1.0}; columns are ignored."""
        match = self._compiled.fullmatch if self.full_match else self._compiled.search
        return [float(match(r) is not None) for r in responses]


def regex_fullmatch(pattern: str, name: str = "regex_fullmatch") -> RegexMatch:
    """:class:`RegexMatch` with ``full_match=True``: the whole response must match ``pattern``."""
    return RegexMatch(pattern, full_match=True, name=name)


VERIFIABLE_REWARDS: dict[str, Callable[..., RewardFunction]] = {
    "exact_match": ExactMatch,
    "numeric_match": NumericMatch,
    "regex": RegexMatch,
    "regex_fullmatch": regex_fullmatch,
}


def is_verifiable_spec(spec: str) -> bool:
    """Whether ``spec`` names a built-in: ``NAME`` or ``NAME:...`` with NAME in :data:`VERIFIABLE_REWARDS`."""
    return spec.partition(":")[0] in VERIFIABLE_REWARDS


def build_verifiable(spec: str) -> RewardFunction:
    """A built-in reward from its spec string.

    ``"NAME"`` uses the defaults; ``"NAME:key=value,key=value"`` sets options, each value read as its
    option's type (float; bool from true/false/1/0/yes/no; str). A factory whose first parameter is
    ``pattern`` (``regex``, ``regex_fullmatch``) takes the whole rest of the spec, commas included, as the
    pattern. Unknown names or options are a :class:`RewardError` listing the valid ones.
    """
    name, _, rest = spec.partition(":")
    if name not in VERIFIABLE_REWARDS:
        raise RewardError(f"unknown built-in reward {name!r}; built-ins are {', '.join(VERIFIABLE_REWARDS)}")
    factory = VERIFIABLE_REWARDS[name]
    params = _options(factory)
    if next(iter(params)) == "pattern":
        if not rest:
            raise RewardError(f"reward {name!r} needs a pattern: '{name}:PATTERN'")
        return factory(rest)
    kwargs: dict[str, Any] = {}
    for item in [part.strip() for part in rest.split(",") if part.strip()]:
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or key not in params:
            raise RewardError(
                f"reward {name!r}: bad option {item!r}; options are key=value with key one of "
                f"{', '.join(params)}"
            )
        if key in kwargs:
            raise RewardError(f"reward {name!r}: option {key!r} is given twice in {spec!r}")
        kwargs[key] = _coerce(name, key, value, params[key])
    return factory(**kwargs)


def _options(factory: Callable[..., Any]) -> dict[str, Any]:
    """Parameter name -> annotated type, in signature order."""
    hints = typing.get_type_hints(factory)
    return {p: hints.get(p, str) for p in inspect.signature(factory).parameters}


def _coerce(reward: str, key: str, text: str, kind: Any) -> Any:
    """A spec option's text as ``kind`` (float, bool or str)."""
    if kind is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise RewardError(f"reward {reward!r}: option {key} must be true or false, got {text!r}")
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise RewardError(f"reward {reward!r}: option {key} must be a number, got {text!r}") from None
    return text
