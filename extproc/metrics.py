"""Process-wide counters. Cheap to bump on the request path; read by logs, tests and admin.

Gauges (`set`) are levels, not counts: e.g. `context.margin_permille.<family>`, the safety
margin the budget applies, in thousandths. Where several processes' figures are combined
(`up --workers N`) counters add up and gauges take the largest (`merge`): the most cautious
worker's margin.
"""

from __future__ import annotations

from collections import Counter

GAUGE_PREFIXES = ("context.margin_permille.",)


def is_gauge(name: str) -> bool:
    return name.startswith(GAUGE_PREFIXES)


def merge(total: dict[str, int], name: str, value: int) -> None:
    """Add another process's figure into `total`: summed, or the maximum for a gauge."""
    if name in total and is_gauge(name):
        total[name] = max(total[name], value)
    else:
        total[name] = total.get(name, 0) + value


class Metrics:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.gauges: dict[str, int] = {}

    def inc(self, name: str, value: int = 1) -> None:
        self.counts[name] += value

    def set(self, name: str, value: int) -> None:
        self.gauges[name] = value

    def snapshot(self) -> dict[str, int]:
        return {**self.counts, **self.gauges}
