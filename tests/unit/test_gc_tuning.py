"""Full collections skip what survived the previous one, and look at everything again on a
schedule (so a frozen reference cycle cannot be kept forever)."""

from __future__ import annotations

import gc
import weakref

from extproc.gc_tuning import GcTuning


def test_survivors_of_a_full_collection_are_frozen_then_released_on_schedule() -> None:
    tuning = GcTuning(unfreeze_every_s=3600)
    tuning.install()
    try:
        kept = [{"turn": [i]} for i in range(1000)]  # long-lived, GC-tracked
        gc.collect()
        assert tuning.freezes >= 1 and gc.get_freeze_count() >= len(kept)
        assert tuning.stats()["gc.frozen_objects"] == gc.get_freeze_count()
        tuning.unfreeze_every_s = 0  # the interval is over: the next full collection releases
        gc.collect()
        assert tuning.releases == 1 and gc.get_freeze_count() == 0
    finally:
        tuning.uninstall()
    assert tuning._on_gc not in gc.callbacks and gc.get_freeze_count() == 0


class Node:
    def __init__(self) -> None:
        self.me: Node | None = self


def test_a_frozen_reference_cycle_is_collected_once_released() -> None:
    tuning = GcTuning(unfreeze_every_s=3600)
    tuning.install()
    try:
        node = Node()
        alive = weakref.ref(node)
        gc.collect()  # the cycle is alive: frozen with the other survivors
        del node
        gc.collect()
        assert alive() is not None  # frozen garbage waits for the release
        tuning.unfreeze_every_s = 0
        gc.collect()  # ends by releasing the frozen set
        gc.collect()  # which this one looks at
        assert alive() is None
    finally:
        tuning.uninstall()


def test_young_collections_freeze_nothing() -> None:
    tuning = GcTuning()
    gc.callbacks.append(tuning._on_gc)
    try:
        gc.collect(0)
        gc.collect(1)
        assert tuning.freezes == 0 and tuning.releases == 0
    finally:
        gc.callbacks.remove(tuning._on_gc)
