"""Safety margins learnt from the provider's reported usage.

Our counts are cl100k (`extproc.tokens`); the provider counts with its own tokenizer. For each
completed turn whose request sessiongate planned (rewritten or not, it counted the whole
prompt), capture reports `usage.prompt_tokens` against the plan's estimate. The ratio
reported/estimated is kept per family and per model in a window of the last `window` turns,
and the margin the budget uses is

    margin = min(cap, max(floor, quantile_q(ratios) - 1 + safety))   rounded up to 0.5%

A high quantile, not a mean: the budget must hold for nearly every request, not the average one.
Until `min_samples` ratios are in, the fixed margin (`models.FAMILY_MARGINS`, or the model's
built-in entry) stays, so a few turns can never loosen a budget. A model's own window is used
once it has `min_samples` ratios, else its family's. Explicit `margin` overrides in the config
are never replaced (`ModelTable.lookup`).

Ignored (counted by reason): usage sessiongate estimated itself, requests it did not plan
(context management disabled, requests sent unchanged), prompts under `min_prompt_tokens`
(a few tokens of provider-side framing make their ratio noisy), requests with images, audio or
files (fixed per-part estimates, not tokenizer differences), and ratios outside
[1/max_ratio, max_ratio] (a proxy that rewrote the prompt, a wrong usage object).

State is per process: with `up --workers N` every worker learns on its own from the turns it
captures; a restart starts again from the fixed margins.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

# Margins move in steps of this much, so a budget (and the injected prefix, which providers
# cache) does not shift on every captured turn.
MARGIN_STEP = 0.005
MAX_MODELS = 256  # models learnt on their own; more only feed their family

# Why an observation was not used (`context.calibration.ignored.<reason>`).
ESTIMATED_USAGE = "estimated_usage"
SMALL_PROMPT = "small_prompt"
MEDIA = "media"
OUTLIER = "outlier"


@dataclass(frozen=True, slots=True)
class CalibrationSettings:
    min_samples: int = 20
    window: int = 200
    quantile: float = 0.98
    safety: float = 0.02
    floor: float = 0.02
    cap: float = 0.5
    min_prompt_tokens: int = 256
    max_ratio: float = 3.0


class RatioWindow:
    """The last `size` ratios, also kept sorted: a quantile is an index, an update a bisect
    plus a memmove of at most `size` floats (once per captured turn, never per chunk)."""

    __slots__ = ("_order", "_sorted", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._order: deque[float] = deque()
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._order)

    def add(self, ratio: float) -> None:
        if len(self._order) == self.size:
            old = self._order.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._order.append(ratio)
        bisect.insort(self._sorted, ratio)

    def quantile(self, q: float) -> float:
        """The smallest ratio with at least a fraction `q` of the window at or below it."""
        ordered = self._sorted
        index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return ordered[index]


def margin_for(high_ratio: float, s: CalibrationSettings) -> float:
    """The margin that covers `high_ratio`, within [floor, cap], rounded up to a step."""
    wanted = high_ratio - 1 + s.safety
    stepped = math.ceil(round(wanted / MARGIN_STEP, 6)) * MARGIN_STEP
    return round(min(s.cap, max(s.floor, stepped)), 4)


class _Learnt:
    __slots__ = ("margin", "ratios")

    def __init__(self, size: int) -> None:
        self.ratios = RatioWindow(size)
        self.margin: float | None = None  # None: not enough samples yet


class Calibration:
    """Shared by the rewrite side (reads `margin`) and capture (calls `observe`), one per
    process. `on_margin(family, margin)` is called when a family's margin changes."""

    def __init__(
        self,
        settings: CalibrationSettings,
        on_margin: Callable[[str, float], None] | None = None,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self._families: dict[str, _Learnt] = {}
        self._models: dict[str, _Learnt] = {}
        self._on_margin = on_margin
        self._on_event = on_event

    def margin(self, model: str, family: str) -> float | None:
        """The learnt margin for `model` (its own, else its family's); None: keep the fixed."""
        own = self._models.get(model)
        if own is not None and own.margin is not None:
            return own.margin
        learnt = self._families.get(family)
        return learnt.margin if learnt is not None else None

    def observe(
        self, model: str, family: str, estimated: int, reported: int, media: bool = False
    ) -> bool:
        """One turn's estimate and the provider's count; False when it was ignored."""
        reason = self._reject(estimated, reported, media)
        if reason:
            self._event(f"ignored.{reason}")
            return False
        ratio = reported / estimated
        self._event(f"samples.{family}")
        family_state = self._families.get(family)
        if family_state is None:
            family_state = self._families[family] = _Learnt(self.settings.window)
        if self._update(family_state, ratio) and self._on_margin is not None:
            assert family_state.margin is not None
            self._on_margin(family, family_state.margin)
        model_state = self._models.get(model)
        if model_state is None and len(self._models) < MAX_MODELS:
            model_state = self._models[model] = _Learnt(self.settings.window)
        if model_state is not None:
            self._update(model_state, ratio)
        return True

    def _reject(self, estimated: int, reported: int, media: bool) -> str:
        s = self.settings
        if estimated < s.min_prompt_tokens:
            return SMALL_PROMPT
        if media:
            return MEDIA
        if reported <= 0 or not 1 / s.max_ratio <= reported / estimated <= s.max_ratio:
            return OUTLIER
        return ""

    def _update(self, learnt: _Learnt, ratio: float) -> bool:
        """Add the ratio; True when the margin changed."""
        learnt.ratios.add(ratio)
        s = self.settings
        if len(learnt.ratios) < s.min_samples:
            return False
        margin = margin_for(learnt.ratios.quantile(s.quantile), s)
        if margin == learnt.margin:
            return False
        learnt.margin = margin
        return True

    def _event(self, name: str) -> None:
        if self._on_event is not None:
            self._on_event(name)

    def snapshot(self) -> dict[str, dict[str, float | int | None]]:
        """Per family and model: samples held and the learnt margin (for tests and admin)."""
        out: dict[str, dict[str, float | int | None]] = {}
        for prefix, table in (("family:", self._families), ("model:", self._models)):
            for name, learnt in table.items():
                out[prefix + name] = {"samples": len(learnt.ratios), "margin": learnt.margin}
        return out
