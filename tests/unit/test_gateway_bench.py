"""`sessiongate bench gateway` and its SSE provider.

The quick run starts the real processes (Envoy from the wheel, `sessiongate up`, the SSE
provider, wrk) and checks that every row reports positive figures and that nothing is left
running. Figures are never asserted against targets (DESIGN: performance is measured by the
benchmark, not by timed tests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from extproc.bench import gateway_bench as gb
from extproc.bench import plots, sse_server
from extproc.config import Settings
from extproc.envoy_config import (
    CAPTURE_FILTER,
    EXT_PROC_CLUSTER,
    REWRITE_FILTER,
    UPSTREAM_CLUSTER,
    bootstrap,
)


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    gb.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_options_defaults_and_quick() -> None:
    full = gb._options(_parse())
    assert (full.duration_s, full.warmup_s, full.tls) == (10.0, 2.0, True)
    assert full.rows == gb.ROW_IDS and full.memory_sessions == 100_000
    assert full.redis_url == gb.DEFAULT_REDIS_URL and not full.litellm
    assert full.plots_dir is None
    quick = gb._options(_parse("--quick", "--no-tls"))
    assert quick.duration_s < full.duration_s and quick.warmup_s < full.warmup_s
    assert not quick.tls and quick.quick
    assert quick.rows == gb.QUICK_ROW_IDS and quick.memory_sessions < 1000
    assert gb._options(_parse("--quick", "--duration", "3")).duration_s == 3.0
    chosen = gb._options(
        _parse("--rows", "json.c1.h50, sse.c1.h50", "--redis-url", "none", "--plots", "d")
    )
    assert chosen.rows == ("json.c1.h50", "sse.c1.h50") and chosen.redis_url == ""
    assert [s.id for s in chosen.specs()] == ["json.c1.h50", "sse.c1.h50"]
    assert chosen.plots_dir == Path("d")
    assert gb._options(_parse("--memory-sessions", "0", "--litellm")).memory_sessions == 0
    with pytest.raises(SystemExit):
        _parse("--duration", "0")
    with pytest.raises(SystemExit):
        _parse("--pool-sessions", "4")  # fewer than the saturating connections
    with pytest.raises(SystemExit):
        _parse("--rows", "json.c1.h7")
    with pytest.raises(SystemExit):
        _parse("--memory-sessions", "-1")


def test_rows_cover_the_issue_matrix() -> None:
    by_id = {spec.id: spec for spec in gb.ROWS}
    assert len(by_id) == len(gb.ROWS)  # ids are unique
    hot = [s for s in gb.ROWS if s.kind == "json" and s.tier == "hot" and s.identity]
    assert {s.history for s in hot} == {0, 50, 500, 10_000}
    assert {s.connections for s in hot if s.history == 50} == {1, 4, 16, 32, 64}
    for tier in ("warm", "cold"):
        rows = [s for s in gb.ROWS if s.tier == tier]
        assert {(s.connections, s.history) for s in rows} == {(1, 50), (32, 50)}
        assert all(s.gateway == tier for s in rows)
    assert by_id["json.c1.h10000"].gateway == "big" and by_id["json.c1.h500"].gateway == "hot"
    assert by_id["json.c32.h50.warm"].label == "JSON c=32 t=2, 50 msgs warm"
    assert by_id["json.c32.noid"].label == "JSON c=32 t=2, no identity"
    # Each row of the load sweep has a pool of its own; c=1/c=32 share one.
    assert by_id["json.c4.h50"].pool_key != by_id["json.c64.h50"].pool_key
    assert by_id["json.c4.h50"].pool_key != by_id["json.c1.h50"].pool_key
    assert by_id["json.c1.h50"].pool_key == by_id["json.c32.h50"].pool_key
    # --quick keeps one row per code path, and the JSON row the streaming cost needs.
    assert set(gb.QUICK_ROW_IDS) < set(gb.ROW_IDS)
    assert {"json.c1.h10000", "json.c1.h50.warm", "json.c1.h50.cold", "json.c16.h50"} <= set(
        gb.QUICK_ROW_IDS
    )


def test_pool_sizing() -> None:
    assert gb.growth_turns(50) == 5 and gb.growth_turns(500) == 25
    assert gb.skip_budget([1, 32], warmup=True) == 66
    assert gb.skip_budget([1, 32], warmup=False) == 33
    # From the expected requests, within bounds, even.
    assert gb.pool_size(10_000, 50, 66) == 2000
    assert gb.pool_size(10_000, 500, 66) == 400
    assert gb.pool_size(10, 50, 1) == gb.MIN_POOL
    assert gb.pool_size(10**9, 50, 1) == gb.MAX_POOL
    assert gb.pool_size(10**9, 50, 1, ceiling=400) == 400
    # Never fewer than twice the sessions runs may skip (wrk_script refuses half the pool).
    assert gb.pool_size(0, 10_000, 18, minimum=8) == 40
    assert gb.pool_size(0, 10_000, 1, minimum=8) == 8
    assert gb.pool_size(0, 50, 300) == 604
    assert gb.pool_size(1001, 50, 0, minimum=1) % 2 == 0


def test_reads_per_request_and_tier_notes() -> None:
    deltas = {"store.hot_hits": 100, "store.warm_hits": 0, "store.promotions": 0}
    reads = gb.reads_per_request(deltas, 100)
    assert reads == {"hot": 1.0, "warm": 0.0, "cold": 0.0}
    assert gb.tier_note("hot", reads) == ""
    assert gb.tier_note("warm", reads) == "only 0% of reads were warm hits"
    warm = gb.reads_per_request({"store.warm_hits": 99, "store.hot_hits": 1}, 100)
    assert gb.tier_note("warm", warm) == ""
    leaky = gb.reads_per_request({"store.warm_hits": 100, "store.hot_hits": 30}, 100)
    assert gb.tier_note("warm", leaky) == "reads also from the hot tier"
    # A cold row: the writer loads the session once more per turn (2 loads per request).
    cold = gb.reads_per_request({"store.promotions": 200}, 100)
    assert cold["cold"] == 2.0 and gb.tier_note("cold", cold) == ""
    evicted = gb.reads_per_request({"store.hot_hits": 100, "store.promotions": 20}, 100)
    assert gb.tier_note("hot", evicted) == "reads also from the cold tier"
    assert gb.reads_per_request({}, 0) == {} and gb.tier_note("hot", {}) == ""


def _http_filter_names(config: dict[str, Any]) -> list[str]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    return [f["name"] for f in hcm["typed_config"]["http_filters"]]


def test_baseline_is_sessiongate_bootstrap_minus_sessiongate(tmp_path: Path) -> None:
    settings = Settings(upstream="http://127.0.0.1:9", listen="127.0.0.1:8443")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    ours = bootstrap(settings, [("127.0.0.1", 50051)], (cert, key))
    plain = gb.baseline_bootstrap(ours)

    assert _http_filter_names(ours) == [REWRITE_FILTER, CAPTURE_FILTER, "envoy.filters.http.router"]
    assert _http_filter_names(plain) == ["envoy.filters.http.router"]
    assert [c["name"] for c in plain["static_resources"]["clusters"]] == [UPSTREAM_CLUSTER]
    assert EXT_PROC_CLUSTER in json.dumps(ours) and EXT_PROC_CLUSTER not in json.dumps(plain)
    assert REWRITE_FILTER not in json.dumps(plain) and CAPTURE_FILTER not in json.dumps(plain)
    # Everything else is sessiongate's own: TLS, routes, timeouts, limits, upstream cluster.
    listener, plain_listener = (c["static_resources"]["listeners"][0] for c in (ours, plain))
    chain, plain_chain = listener["filter_chains"][0], plain_listener["filter_chains"][0]
    assert plain_chain["transport_socket"] == chain["transport_socket"]
    hcm = chain["filters"][0]["typed_config"]
    plain_hcm = plain_chain["filters"][0]["typed_config"]
    for name in ("stream_idle_timeout", "request_timeout", "local_reply_config", "codec_type"):
        assert plain_hcm[name] == hcm[name], name
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    plain_routes = plain_hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert [r["match"] for r in plain_routes] == [r["match"] for r in routes]
    assert [r.get("route") for r in plain_routes] == [r.get("route") for r in routes]
    assert plain_listener["address"]["socket_address"]["port_value"] == 0
    assert (
        plain_listener["per_connection_buffer_limit_bytes"]
        == (listener["per_connection_buffer_limit_bytes"])
    )
    assert ours["static_resources"]["clusters"][1] == plain["static_resources"]["clusters"][0]
    # The input is not modified.
    assert _http_filter_names(ours)[0] == REWRITE_FILTER


def test_wrk_script_sessions_and_headers() -> None:
    fresh = gb.wrk_script(
        body=b'{"model":"m"}', session_prefix="p-", fresh_sessions=True, pool_sessions=1, threads=2
    )
    assert "local fresh = true" in fresh and "local nthreads = 2" in fresh
    assert '[=[{"model":"m"}]=]' in fresh or '[[{"model":"m"}]]' in fresh
    assert f"Bearer {gb.API_KEY}" in fresh
    assert "WRK_JSON" in fresh and "latency:percentile(99.9)" in fresh
    pooled = gb.wrk_script(
        body=b"[[x]]",
        session_prefix="q-",
        fresh_sessions=False,
        pool_sessions=500,
        threads=2,
        api_key=None,
    )
    assert "local fresh = false" in pooled and "local pool = 500" in pooled
    assert "local offset = 0" in pooled and "local skip = {}" in pooled
    assert "local auth = nil" in pooled
    assert "[=[[[x]]]=]" in pooled  # a long-bracket level the body does not contain
    skipping = gb.wrk_script(
        body=b"{}",
        session_prefix="q-",
        fresh_sessions=False,
        pool_sessions=10,
        threads=2,
        offset=7,
        skip={3, 1},
    )
    assert "local offset = 7" in skipping and "local skip = {[1] = true, [3] = true}" in skipping
    with pytest.raises(gb.BenchError):  # most of the pool skipped: refused
        gb.wrk_script(
            body=b"{}",
            session_prefix="q-",
            fresh_sessions=False,
            pool_sessions=10,
            threads=2,
            skip=set(range(5)),
        )
    out = 'noise\nWRK_JSON {"requests": 3, "errors": {}}\n'
    assert gb.parse_wrk_output(out) == {"requests": 3, "errors": {}}
    with pytest.raises(gb.BenchError):
        gb.parse_wrk_output("wrk crashed")


def test_pool_sequence_replays_a_wrk_thread() -> None:
    # thread 1 of 2, offset 3, pool 10: n = 0, 1, 2, ... -> sessions 4, 6, 8, 0, 2, 4
    assert gb.pool_sequence(3, 1, 2, 10, set(), 6) == [4, 6, 8, 0, 2, 4]
    # a skipped session costs the thread one `n` (as in the Lua script)
    assert gb.pool_sequence(3, 1, 2, 10, {6, 0}, 6) == [4, 8, 2, 4]


def test_summarize_collapsed_per_thread_and_function() -> None:
    text = (
        "thread (1): MainThread;Runner.run (/x/lib/python3.11/asyncio/runners.py:118) 6\n"
        "thread (1): MainThread;Runner.run (/x/lib/python3.11/asyncio/runners.py:118);"
        "Rewriter._rewrite (/w/extproc/rewrite.py:150) 3\n"
        "thread (1): MainThread;Runner.run (/x/lib/python3.11/asyncio/runners.py:118);"
        "Rewriter._rewrite (/w/extproc/rewrite.py:170) 1\n"
        "thread (2): Thread-1;"
        "_connection_worker_thread (/s/site-packages/aiosqlite/core.py:59) 10\n"
    )
    summary = gb.summarize_collapsed(text)
    assert summary["samples"] == 20 and summary["main_thread_samples"] == 10
    assert {t["frame"]: t["share"] for t in summary["threads"]} == {
        "MainThread": 0.5,
        "Thread-1": 0.5,
    }
    self_shares = {s["frame"]: s["share"] for s in summary["self"]}
    assert self_shares["Runner.run (asyncio/runners.py)"] == 0.6
    assert self_shares["Rewriter._rewrite (/w/extproc/rewrite.py)"] == 0.4  # lines merged
    inclusive = {s["frame"]: s["share"] for s in summary["inclusive"]}
    assert inclusive["Runner.run (asyncio/runners.py)"] == 1.0


def _measurement(target: str, rps: float, p50: float, p99: float, cpu: dict[str, float]) -> Any:
    return gb.Measurement(
        target=target,
        requests=int(rps * 10),
        errors=0,
        duration_s=10,
        rps=rps,
        latency_us={"p50": p50, "p99": p99, "p99.9": p99 * 2},
        cpu_s={"machine_busy_share": 0.5},
        cpu_us_per_request=cpu,
        upstream_request_bytes=800,
    )


def test_targets_are_judged_on_the_rows_they_name() -> None:
    def row(spec_id: str, base: Any, gate: Any) -> gb.Comparison:
        spec = next(s for s in gb.ROWS if s.id == spec_id)
        return gb.Comparison(
            id=spec.id,
            label=spec.label,
            kind=spec.kind,
            concurrency=spec.connections,
            threads=spec.threads,
            history_messages=spec.history,
            identity=spec.identity,
            order=["baseline", "sessiongate"],
            baseline=base,
            sessiongate=gate,
            rps_ratio=gate.rps / base.rps,
            added_us={k: gate.latency_us[k] - base.latency_us[k] for k in ("p50", "p99")},
            cpu_per_request_ratio=gate.cpu_us_per_request["sessiongate"]
            / base.cpu_us_per_request["envoy"],
            envoy_cpu_per_request_ratio=1.0,
        )

    base = _measurement("baseline", 1000, 300, 900, {"envoy": 200})
    fast = _measurement("sessiongate", 900, 1200, 2000, {"envoy": 250, "sessiongate": 150})
    busy = _measurement("sessiongate", 600, 1000, 3000, {"envoy": 300, "sessiongate": 250})
    rows = [row("json.c1.h50", base, fast), row("json.c32.h50", base, busy)]
    status = {(t.row, t.name.split(" (")[0]): t.status for t in gb.judge(rows)}
    assert status == {
        ("json.c32.h50", "req/s with sessiongate >= 50% of plain Envoy"): "PASS",
        ("json.c1.h50", "added latency p50 < 1 ms"): "PASS",  # +900 µs
        ("json.c1.h50", "added latency p99 < 3 ms"): "PASS",  # +1.1 ms
        ("json.c32.h50", "sessiongate CPU/req <= plain Envoy CPU/req"): "MISS",  # 250 > 200
    }


def _dechunk(data: bytes) -> bytes:
    out, position = b"", 0
    while True:
        line_end = data.index(b"\r\n", position)
        size = int(data[position:line_end], 16)
        if size == 0:
            return out
        out += data[line_end + 2 : line_end + 2 + size]
        position = line_end + 2 + size + 2


async def test_sse_server_streams_chunks_and_keeps_the_connection() -> None:
    server = await sse_server.start_sse_server(chunks=5, delay_ms=0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b'{"stream": true}'
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        chunked = (
            b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
            b"x-sse-delay-ms: 1\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
        )
        writer.write(request + chunked)  # pipelined: answered in order
        for _ in range(2):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"content-type: text/event-stream" in head
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n0\r\n\r\n"), 5)
            events = _dechunk(raw).split(b"\n\n")
            assert events[-2:] == [b"data: [DONE]", b""]
            chunks = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
            assert len(chunks) == 5
            assert all(c["object"] == "chat.completion.chunk" for c in chunks)
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
            assert all("content" in c["choices"][0]["delta"] for c in chunks[1:-1])
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 404")
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    with pytest.raises(ValueError):
        sse_server.build_events(1)


def _child_pids() -> list[int]:
    return gb.child_pids(os.getpid())


@pytest.mark.timeout(180)
def test_quick_run_reports_every_row_and_stops_everything(tmp_path: Path) -> None:
    try:
        gb.ensure_wrk()
    except gb.BenchError as exc:
        pytest.skip(str(exc))
    children_before = set(_child_pids())
    out = tmp_path / "out" / "gateway.json"
    keep = tmp_path / "work"
    plots_dir = tmp_path / "plots"
    argv = ("--quick", "--json", str(out), "--keep-dir", str(keep), "--plots", str(plots_dir))
    assert gb.run(_parse(*argv)) == 0
    result = json.loads(out.read_text())

    assert result["error"] is None and result["quick"] is True
    assert result["machine"]["envoy"] and result["machine"]["wrk"]
    rows = result["rows"]
    warm_ran = not any("warm rows skipped" in note for note in result["notes"])
    expected = [r for r in gb.QUICK_ROW_IDS if warm_ran or not r.endswith(".warm")]
    assert [row["id"] for row in rows] == expected
    for row in rows:
        for side in ("baseline", "sessiongate"):
            m = row[side]
            assert m["target"] == side
            assert m["requests"] > 0 and m["errors"] == 0, (row["id"], side, m)
            assert m["rps"] > 0 and m["duration_s"] > 0, (row["id"], side)
            latency = m["latency_us"]
            assert 0 < latency["p50"] <= latency["p99"] <= latency["p99.9"], (row["id"], side)
            assert m["cpu_us_per_request"]["envoy"] > 0, (row["id"], side)
            assert m["upstream_request_bytes"] > 0, (row["id"], side)
            assert 0 < m["cpu_s"]["machine_busy_share"] <= 1, (row["id"], side)
        gate = row["sessiongate"]
        assert gate["cpu_us_per_request"]["sessiongate"] > 0, row["id"]
        assert "sessiongate" not in row["baseline"]["cpu_us_per_request"]
        assert row["rps_ratio"] > 0 and row["cpu_per_request_ratio"] > 0
        if row["identity"]:
            assert gate["counters"].get("rewrite.injected", 0) > 0, row["id"]
        else:
            assert gate["counters"].get("rewrite.pass_through.no_identity", 0) > 0
        if row["history_messages"]:
            # The history really went upstream: the provider got far bigger requests.
            assert gate["upstream_request_bytes"] > 5 * row["baseline"]["upstream_request_bytes"]
            assert gate["history_messages_mean"] >= row["history_messages"]
            injected = gate["injected_messages_mean"]
            if row["history_messages"] < gb.BIG_HISTORY:  # ... all of it
                assert injected >= 0.98 * gate["history_messages_mean"], row["id"]
            else:  # ... what the rows' 16k-token window holds: far more than 50 messages
                assert 60 < injected < 0.1 * gate["history_messages_mean"], row["id"]
            # Each read came from the tier the row is named after (sessiongate's counters).
            assert gate["reads_per_request"][row["tier"]] >= 0.98, (row["id"], gate["counters"])
            assert "reads were" not in gate["note"] and "reads also" not in gate["note"]
        if row["kind"] == "sse":
            assert gate["stream_us"]["total_p50"] > 0
            assert "added_event_gap_share" in row["extra"]
            assert "capture_cpu_us_per_chunk" in row["extra"], row["id"]
    by_id = {row["id"]: row for row in rows}
    big = by_id["json.c1.h10000"]["sessiongate"]
    # The newest ~200 messages went upstream (~40 KB), not the whole session (~2.4 MB).
    assert 20_000 < big["upstream_request_bytes"] < 200_000
    assert {t["status"] for t in result["targets"]} <= {"PASS", "MISS"}
    names = {t["name"] for t in result["targets"]}
    assert len(result["targets"]) == 12, names
    assert any("10,000 msgs" in n for n in names) and any("per chunk" in n for n in names)
    memory = result["memory"]
    assert memory["sessions"] == gb.QUICK_MEMORY_SESSIONS
    assert memory["hot_sessions"] >= memory["sessions"]
    assert memory["rss_after_bytes"] > memory["rss_before_bytes"] > 0
    if result["plots"]:
        assert {Path(p).name for p in result["plots"]} == {
            plots.LOAD_FILE,
            plots.SIZE_FILE,
        }
        assert all(Path(p).read_bytes().startswith(b"\x89PNG") for p in result["plots"])
    # The warm rows' Redis keys are gone.
    if warm_ran:
        assert result["machine"]["redis_keys_removed"] > 0
    # Every process the benchmark started is gone.
    assert set(_child_pids()) <= children_before
