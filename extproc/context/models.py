"""Context windows of OpenAI and Anthropic models, and how far to trust our token counts.

A request's `model` is looked up by its longest known prefix that ends at a boundary (`-`, `:`,
`@` or the end), so dated snapshots (`gpt-4o-2024-08-06`, `claude-sonnet-4-20250514`) and
aliases (`claude-3-5-sonnet-latest`) find their family; a routing prefix (`openai/gpt-4o`) and a
cloud vendor prefix (`us.anthropic.claude-...`) are stripped first. A model found nowhere gets
`default_window` with the `other` family's margin.

`window` is the model's total context (prompt + output) and `max_output` its largest output
(0: not capped below the window). Counts are made with the offline `cl100k_base` encoding, so
each tokenizer family gets a safety margin, a fraction added to every count we make:

| family | models                                | margin | why                                   |
|--------|---------------------------------------|--------|---------------------------------------|
| cl100k | gpt-4, gpt-4-turbo, gpt-3.5-turbo     | 2%     | exact encoding; the cookbook formula  |
|        |                                       |        | and tool rendering are approximate    |
| o200k  | gpt-4o, gpt-4.1, gpt-5, o1/o3/o4, oss | 5%     | o200k splits most text into as many   |
|        |                                       |        | or fewer tokens; code and rare        |
|        |                                       |        | scripts can go the other way          |
| claude | every Claude model                    | 25%    | Anthropic's tokenizer is not public;  |
|        |                                       |        | it yields roughly 10-30% more tokens  |
|        |                                       |        | than cl100k on English, more on code  |
| other  | unknown models                        | 10%    | unknown tokenizer                     |

`[context.models."<name>"]` in the config file overrides or adds entries (window, max_output,
margin, family, reasoning); an override of a known name keeps the fields it does not set.

With a `Calibration` attached (`context_calibrate_margins`), `lookup` gives a model without an
explicit `margin` the margin learnt from the provider's reported usage, once there are enough
samples (`extproc.context.calibration`); the fixed margins above apply until then.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from extproc.context.calibration import Calibration

FAMILY_MARGINS: dict[str, float] = {"cl100k": 0.02, "o200k": 0.05, "claude": 0.25, "other": 0.10}
FAMILIES = tuple(FAMILY_MARGINS)
OVERRIDE_KEYS = frozenset({"window", "max_output", "margin", "family", "reasoning"})


@dataclass(frozen=True, slots=True)
class ModelLimits:
    window: int
    max_output: int = 0  # 0: only the window bounds the output
    family: str = "other"
    reasoning: bool = False  # output includes reasoning tokens: reserve more by default
    margin: float | None = None  # None: the family's

    @property
    def safety_margin(self) -> float:
        if self.margin is not None:
            return self.margin
        return FAMILY_MARGINS.get(self.family, FAMILY_MARGINS["other"])


def _o200k(window: int, max_output: int, reasoning: bool = False) -> ModelLimits:
    return ModelLimits(window, max_output, "o200k", reasoning)


def _claude(max_output: int, window: int = 200_000) -> ModelLimits:
    return ModelLimits(window, max_output, "claude")


def _cl100k(window: int, max_output: int) -> ModelLimits:
    return ModelLimits(window, max_output, "cl100k")


# Published limits (OpenAI and Anthropic model pages). Keys are prefixes: see `lookup`.
BUILTIN: dict[str, ModelLimits] = {
    # OpenAI, o200k
    "gpt-5": _o200k(400_000, 128_000, reasoning=True),
    "gpt-5-chat": _o200k(128_000, 16_384),
    "gpt-5-chat-latest": _o200k(128_000, 16_384),
    "gpt-4.1": _o200k(1_047_576, 32_768),
    "gpt-4.5-preview": _o200k(128_000, 16_384),
    "gpt-4o": _o200k(128_000, 16_384),
    "gpt-4o-2024-05-13": _o200k(128_000, 4_096),
    "chatgpt-4o-latest": _o200k(128_000, 16_384),
    "o1": _o200k(200_000, 100_000, reasoning=True),
    "o1-mini": _o200k(128_000, 65_536, reasoning=True),
    "o1-preview": _o200k(128_000, 32_768, reasoning=True),
    "o3": _o200k(200_000, 100_000, reasoning=True),
    "o3-mini": _o200k(200_000, 100_000, reasoning=True),
    "o4-mini": _o200k(200_000, 100_000, reasoning=True),
    "codex-mini": _o200k(200_000, 100_000, reasoning=True),
    "gpt-oss": _o200k(131_072, 131_072, reasoning=True),
    # OpenAI, cl100k
    "gpt-4": _cl100k(8_192, 8_192),
    "gpt-4-32k": _cl100k(32_768, 32_768),
    "gpt-4-turbo": _cl100k(128_000, 4_096),
    "gpt-4-1106-preview": _cl100k(128_000, 4_096),
    "gpt-4-0125-preview": _cl100k(128_000, 4_096),
    "gpt-4-turbo-preview": _cl100k(128_000, 4_096),
    "gpt-4-vision-preview": _cl100k(128_000, 4_096),
    "gpt-3.5-turbo": _cl100k(16_385, 4_096),
    "gpt-3.5-turbo-0613": _cl100k(4_096, 4_096),
    "gpt-3.5-turbo-16k": _cl100k(16_385, 16_385),
    # Anthropic (200k standard window; larger windows are opt-in betas: override to use them)
    "claude-opus-4-5": _claude(64_000),
    "claude-opus-4-1": _claude(32_000),
    "claude-opus-4": _claude(32_000),
    "claude-sonnet-4-5": _claude(64_000),
    "claude-sonnet-4": _claude(64_000),
    "claude-haiku-4-5": _claude(64_000),
    "claude-3-7-sonnet": _claude(64_000),
    "claude-3-5-sonnet": _claude(8_192),
    "claude-3-5-haiku": _claude(8_192),
    "claude-3-opus": _claude(4_096),
    "claude-3-sonnet": _claude(4_096),
    "claude-3-haiku": _claude(4_096),
    "claude": _claude(4_096),  # any other Claude: the smallest current output limit
}

_VENDOR_PREFIX = re.compile(r"^(?:[a-z0-9_]+\.)+(?=claude)")
_BOUNDARY = frozenset("-:@")


def normalise(model: str) -> str:
    name = model.strip().lower().rpartition("/")[2]
    return _VENDOR_PREFIX.sub("", name)


def parse_override(name: str, table: Mapping[str, Any]) -> dict[str, Any]:
    """One `[context.models."<name>"]` table, checked; raises ValueError naming the problem."""
    unknown = set(table) - OVERRIDE_KEYS
    if unknown:
        raise ValueError(f"model {name!r}: unknown key(s) {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    for key in ("window", "max_output"):
        if key in table:
            value = table[key]
            if type(value) is not int or value < (256 if key == "window" else 0):
                limit = "an integer >= 256" if key == "window" else "an integer >= 0"
                raise ValueError(f"model {name!r}: {key} must be {limit}")
            out[key] = value
    if "margin" in table:
        margin = table["margin"]
        if type(margin) not in (int, float) or not 0 <= margin <= 1:
            raise ValueError(f"model {name!r}: margin must be a number from 0 to 1")
        out["margin"] = float(margin)
    if "family" in table:
        if table["family"] not in FAMILIES:
            raise ValueError(f"model {name!r}: family must be one of {', '.join(FAMILIES)}")
        out["family"] = table["family"]
    if "reasoning" in table:
        if type(table["reasoning"]) is not bool:
            raise ValueError(f"model {name!r}: reasoning must be true or false")
        out["reasoning"] = table["reasoning"]
    return out


class ModelTable:
    """The built-in table with the config's overrides; `lookup` is cached per model string."""

    def __init__(
        self,
        overrides: Mapping[str, Mapping[str, Any]],
        default_window: int,
        calibration: Calibration | None = None,
    ) -> None:
        entries = dict(BUILTIN)
        for raw_name, table in overrides.items():
            name = normalise(raw_name)
            fields = parse_override(raw_name, table)
            base = entries.get(name)
            if base is None:
                if "window" not in fields:
                    raise ValueError(f"model {raw_name!r}: window is required for a new model")
                entries[name] = ModelLimits(**fields)
            else:
                entries[name] = replace(base, **fields)
        self._entries = entries
        self.default = ModelLimits(default_window)
        self.resolve = lru_cache(maxsize=1024)(self._resolve)
        # Shared by every table of the process (tables per default window too), and fed by
        # capture (`observe_usage`); None: the fixed margins only.
        self.calibration = calibration
        # Per normalised model name: the learnt margin and the limits carrying it, so a
        # request costs a dict lookup, not a new ModelLimits, while the margin holds.
        self._calibrated: dict[str, tuple[float, ModelLimits]] = {}

    def _resolve(self, model: str) -> tuple[str, ModelLimits]:
        """The normalised name (calibration's per-model key) and the table's entry."""
        name = normalise(model)
        entries = self._entries
        for end in range(len(name), 0, -1):
            if end < len(name) and name[end] not in _BOUNDARY:
                continue
            found = entries.get(name[:end])
            if found is not None:
                return name, found
        return name, self.default

    def lookup(self, model: str) -> ModelLimits:
        name, limits = self.resolve(model)
        calibration = self.calibration
        if calibration is None or limits.margin is not None:  # an explicit margin wins
            return limits
        margin = calibration.margin(name, limits.family)
        if margin is None:
            return limits
        found = self._calibrated.get(name)
        if found is None or found[0] != margin:
            if len(self._calibrated) >= 1024:  # model names come from clients: bounded
                self._calibrated.clear()
            found = self._calibrated[name] = (margin, replace(limits, margin=margin))
        return found[1]

    def observe_usage(self, model: str, estimated: int, reported: int, media: bool) -> None:
        """Capture's report for calibration: the plan's prompt estimate and the provider's."""
        if self.calibration is not None:
            name, limits = self.resolve(model)
            self.calibration.observe(name, limits.family, estimated, reported, media)
