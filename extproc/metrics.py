"""Process-wide counters. Cheap to bump on the request path; read by logs, tests and admin."""

from __future__ import annotations

from collections import Counter


class Metrics:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def inc(self, name: str, value: int = 1) -> None:
        self.counts[name] += value

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)
