"""`extproc.bench.report`: the targets of issue 4 and the derived streaming figures."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.bench import report


def _m(
    target: str,
    *,
    p50: float = 1000.0,
    p99: float = 2000.0,
    cpu: dict[str, float] | None = None,
    requests: int = 1000,
    wall: float = 10.0,
    stream: dict[str, float] | None = None,
    idle: dict[str, float] | None = None,
) -> report.Measurement:
    cpu_s = {"machine_busy_share": 0.5, "wall": wall, **(cpu or {})}
    return report.Measurement(
        target=target,
        requests=requests,
        errors=0,
        duration_s=wall,
        rps=requests / wall,
        latency_us={"p50": p50, "p99": p99, "p99.9": p99 * 2},
        cpu_s=cpu_s,
        cpu_us_per_request={
            k: v / requests * 1e6 for k, v in cpu_s.items() if k in ("envoy", "sessiongate")
        },
        upstream_request_bytes=800,
        stream_us=stream or {},
        idle_cpu_per_s=idle or {},
    )


def _row(
    row_id: str,
    kind: str,
    concurrency: int,
    history: int,
    base: report.Measurement,
    gate: report.Measurement,
    tier: str = "hot",
) -> report.Comparison:
    return report.Comparison(
        id=row_id,
        label=row_id,
        kind=kind,
        concurrency=concurrency,
        threads=1,
        history_messages=history,
        identity=True,
        order=["baseline", "sessiongate"],
        baseline=base,
        sessiongate=gate,
        rps_ratio=gate.rps / base.rps,
        added_us={k: gate.latency_us[k] - base.latency_us[k] for k in ("p50", "p99")},
        cpu_per_request_ratio=1.0,
        envoy_cpu_per_request_ratio=1.0,
        tier=tier,
    )


def test_net_cpu_per_request_subtracts_idle_cpu() -> None:
    m = _m("sessiongate", cpu={"sessiongate": 2.0}, requests=100, wall=10.0)
    assert report.net_cpu_us_per_request(m, "sessiongate") == pytest.approx(20_000)
    m.idle_cpu_per_s = {"sessiongate": 0.05}  # 0.5 s of the 2 s is what it burns idle
    assert report.net_cpu_us_per_request(m, "sessiongate") == pytest.approx(15_000)
    assert report.net_cpu_us_per_request(m, "envoy") == 0.0  # not measured


def test_stream_costs_against_the_json_row_of_the_same_shape() -> None:
    idle = {"sessiongate": 0.01, "envoy": 0.0}
    json_base = _m("baseline", cpu={"envoy": 0.2})
    json_gate = _m("sessiongate", cpu={"envoy": 0.3, "sessiongate": 0.5}, idle=idle)
    json_row = _row("json.c16.h50", "json", 16, 50, json_base, json_gate)
    other = _row("json.c32.h50", "json", 32, 50, json_base, json_gate)
    gaps = {"event_gap_mean": 1000.0, "total_p50": 1.0, "event_gap_p50": 1000.0}
    sse_base = _m("baseline", cpu={"envoy": 2.0}, requests=100, stream=gaps)
    sse_gate = _m(
        "sessiongate",
        cpu={"envoy": 3.0, "sessiongate": 3.1},
        requests=100,
        stream={**gaps, "event_gap_mean": 1030.0},
        idle=idle,
    )
    sse = _row("sse.c16.h50", "sse", 16, 50, sse_base, sse_gate)
    lonely = _row("sse.c1.h50", "sse", 1, 50, sse_base, sse_gate)
    report.derive_stream_costs([other, json_row, sse, lonely], chunks=200)
    # (3.1 s - 0.1 s idle) / 100 = 30 ms; (0.5 - 0.1) / 1000 = 0.4 ms; / 200 chunks
    assert sse.extra["capture_cpu_us_per_chunk"] == pytest.approx((30_000 - 400) / 200)
    assert sse.extra["added_envoy_cpu_us_per_chunk"] == pytest.approx(10_000 / 200)
    assert sse.reference == "json.c16.h50"
    assert sse.extra["added_event_gap_us_mean"] == pytest.approx(30.0)
    assert sse.extra["added_event_gap_share"] == pytest.approx(0.03)
    # No JSON row at c=1: the gap is still reported, the per-chunk cost is not.
    assert "capture_cpu_us_per_chunk" not in lonely.extra and lonely.reference == ""
    assert lonely.extra["added_event_gap_share"] == pytest.approx(0.03)


def _targets(rows: list[report.Comparison]) -> dict[tuple[str, str], tuple[str, float]]:
    return {(t.row, t.name.split(" (")[0]): (t.status, t.value) for t in report.judge(rows)}


def test_big_session_target_is_relative_to_the_50_message_row() -> None:
    base = _m("baseline", p50=300)
    small = _row("json.c1.h50", "json", 1, 50, base, _m("sessiongate", p50=1300))  # +1 ms
    near = _row("json.c1.h10000", "json", 1, 10_000, base, _m("sessiongate", p50=2200))
    far = _row("json.c1.h10000", "json", 1, 10_000, base, _m("sessiongate", p50=5300))
    name = "added latency p50 with 10,000 msgs <= 2x that with 50 msgs"
    status, value = _targets([small, near])[("json.c1.h10000", name)]
    assert (status, value) == ("PASS", pytest.approx(1.9))
    status, value = _targets([small, far])[("json.c1.h10000", name)]
    assert (status, value) == ("MISS", pytest.approx(5.0))
    # A 50-message row that added nothing measurable counts as 1 µs, not a division by 0.
    free = _row("json.c1.h50", "json", 1, 50, base, _m("sessiongate", p50=290))
    assert _targets([free, near])[("json.c1.h10000", name)] == ("MISS", pytest.approx(1900.0))
    assert ("json.c1.h10000", name) not in _targets([near])  # no reference row: no target


def test_streaming_targets() -> None:
    base = _m("baseline")
    rows: list[Any] = []
    for row_id, concurrency, share, per_chunk in (
        ("sse.c1.h50", 1, 0.01, 40.0),
        ("sse.c16.h50", 16, 0.08, 12.0),
    ):
        row = _row(row_id, "sse", concurrency, 50, base, _m("sessiongate", p50=3500))
        row.extra.update(added_event_gap_share=share, capture_cpu_us_per_chunk=per_chunk)
        rows.append(row)
    found = _targets(rows)
    gap = "inter-token delay indistinguishable: added mean event gap < 5% of plain Envoy's"
    assert found[("sse.c1.h50", gap)] == ("PASS", pytest.approx(0.01))
    assert found[("sse.c16.h50", gap)] == ("MISS", pytest.approx(0.08))
    # Capture CPU is judged on the loaded row only (c=1 carries idle wake-ups per event).
    assert found[("sse.c16.h50", "capture CPU <= 15 µs per chunk")] == ("PASS", 12.0)
    assert ("sse.c1.h50", "capture CPU <= 15 µs per chunk") not in found
    assert found[("sse.c1.h50", "streaming added first-event delay p50 < 2 ms")][0] == "MISS"


def test_memory_result_per_session() -> None:
    result = report.MemoryResult(
        sessions=1000,
        hot_sessions=1001,
        hot_bytes_estimate=1_000_000,
        rss_before_bytes=100_000_000,
        rss_after_bytes=110_000_000,
        duration_s=2.0,
        hot_sessions_at_start=1,
    )
    assert result.bytes_per_session == 10_000 and result.rate == 500
    empty = report.MemoryResult(0, 0, 0, 1, 1, 0.0)
    assert empty.bytes_per_session == 0.0 and empty.rate == 0.0


def test_fmt_us() -> None:
    assert report.fmt_us(12.4) == "12 µs"
    assert report.fmt_us(1500) == "1.50 ms"
    assert report.fmt_us(-2_500_000) == "-2.50 s"
    assert report.fmt_signed_us(-900) == "-900 µs" and report.fmt_signed_us(5) == "+5 µs"
