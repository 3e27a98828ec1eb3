"""Keep CPython's full garbage collections from stalling requests.

Measured with `sessiongate bench gateway` (a gc callback timing each collection): full (gen2)
collections of sessiongate's process took 60-85 ms, collecting nothing, because they walk every
long-lived object (the hot tier's turns, the per-turn caches). That was the long p99 tail:
c=4 50-message p99 21.7 ms and p99.9 78 ms, c=1 500-message p99 28.3 ms. Freezing the survivors
after each full collection (`gc.freeze()`: later collections skip them) took the pauses to
12-22 ms and those rows to p99 6.9 ms / p99.9 13.8 ms and p99 3.9 ms (same run conditions).

A frozen object is still freed by reference counting; only a reference *cycle* that becomes
garbage while frozen is not collected. So every `unfreeze_every_s` the frozen set is released
(`gc.unfreeze()`) and the next full collection looks at everything once: cyclic garbage is
bounded by what dies within one interval, at the price of one long pause per interval.
"""

from __future__ import annotations

import gc
import time
from typing import Any


class GcTuning:
    def __init__(self, unfreeze_every_s: float = 600.0) -> None:
        self.unfreeze_every_s = unfreeze_every_s
        self._released_at = time.monotonic()
        self.freezes = 0
        self.releases = 0

    def install(self) -> None:
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)
        gc.freeze()  # what start-up built (modules, config, connections) lives forever

    def uninstall(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        gc.unfreeze()

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase != "stop" or info.get("generation") != 2:
            return
        now = time.monotonic()
        if now - self._released_at >= self.unfreeze_every_s:
            self._released_at = now
            self.releases += 1
            gc.unfreeze()  # the next full collection sees everything once
        else:
            self.freezes += 1
            gc.freeze()

    def stats(self) -> dict[str, int]:
        return {
            "gc.frozen_objects": gc.get_freeze_count(),
            "gc.freezes": self.freezes,
            "gc.releases": self.releases,
        }
