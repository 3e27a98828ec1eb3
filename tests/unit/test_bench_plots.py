"""`extproc.bench.plots`: which rows feed which plot, and the PNGs (when matplotlib is here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from extproc.bench import plots, report


def _m(
    target: str, p50: float, p99: float, rps: float, injected: float = 0.0
) -> report.Measurement:
    return report.Measurement(
        target=target,
        requests=int(rps * 10),
        errors=0,
        duration_s=10,
        rps=rps,
        latency_us={"p50": p50, "p99": p99, "p99.9": p99},
        cpu_s={"machine_busy_share": 0.5},
        cpu_us_per_request={"envoy": 100.0},
        upstream_request_bytes=800,
        injected_messages_mean=injected,
    )


def _row(
    concurrency: int, history: int, added: float, *, tier: str = "hot", kind: str = "json"
) -> report.Comparison:
    base = _m("baseline", 300.0 * concurrency, 900.0 * concurrency, 3000.0)
    gate = _m(
        "sessiongate",
        300.0 * concurrency + added,
        900.0 * concurrency + 2 * added,
        600.0,
        injected=float(history),
    )
    return report.Comparison(
        id=f"{kind}.c{concurrency}.h{history}.{tier}",
        label="",
        kind=kind,
        concurrency=concurrency,
        threads=1,
        history_messages=history,
        identity=True,
        order=["baseline", "sessiongate"],
        baseline=base,
        sessiongate=gate,
        rps_ratio=0.2,
        added_us={"p50": added, "p99": 2 * added},
        cpu_per_request_ratio=1.0,
        envoy_cpu_per_request_ratio=1.0,
        tier=tier,
    )


ROWS = [
    _row(1, 0, 1200.0),
    _row(32, 0, 9000.0),
    _row(1, 50, 1000.0),
    _row(32, 50, 20_000.0),
    _row(4, 50, 3000.0),
    _row(64, 50, 40_000.0),
    _row(1, 500, 1500.0),
    _row(1, 10_000, 20_000.0),
    _row(8, 10_000, 90_000.0),
    _row(1, 50, 3000.0, tier="warm"),
    _row(1, 50, 2000.0, kind="sse"),
]


def test_load_series_is_the_50_message_hot_rows_by_concurrency() -> None:
    series = plots.load_series(ROWS)
    assert [p.concurrency for p in series["sessiongate"]] == [1, 4, 32, 64]
    assert [p.concurrency for p in series["baseline"]] == [1, 4, 32, 64]
    first = series["sessiongate"][0]
    assert (first.p50_us, first.p99_us, first.rps) == (1300.0, 2900.0, 600.0)
    assert series["baseline"][-1].p99_us == 900.0 * 64


def test_size_series_is_concurrency_1_hot_by_size() -> None:
    points = plots.size_series(ROWS)
    assert [p.history for p in points] == [0, 50, 500, 10_000]
    assert [p.added_p50_us for p in points] == [1200.0, 1000.0, 1500.0, 20_000.0]
    assert points[-1].added_p99_us == 40_000.0 and points[-1].injected == 10_000
    assert plots.size_label(0) == "new session" and plots.size_label(10_000) == "10,000 msgs"


def test_write_plots(tmp_path: Path) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(plots.PlotError, match="pip install matplotlib"):
            plots.write_plots(ROWS, tmp_path)
        return
    written = plots.write_plots(ROWS, tmp_path / "perf", "test")
    assert [p.name for p in written] == [plots.LOAD_FILE, plots.SIZE_FILE]
    for path in written:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    with pytest.raises(plots.PlotError, match="no rows"):
        plots.write_plots([], tmp_path)
