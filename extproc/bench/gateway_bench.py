"""`sessiongate bench gateway`: what sessiongate adds to Envoy, against plain Envoy in the same run.

Three kinds of process run on this machine, started (and always stopped) by the benchmark:

- a provider that is never the bottleneck: for JSON, an Envoy (`--concurrency 1`) answering
  every request with a static `chat.completion` through `direct_response` (a buffer filter
  reads the whole request first, so upstream connections stay alive); for SSE,
  `extproc.bench.sse_server` (raw asyncio protocol, uvloop) streaming a 200-event
  `chat.completion.chunk` reply plus `data: [DONE]`, one event every `--sse-delay-ms`;
- **sessiongate**: `sessiongate up` exactly as a user runs it (a subprocess: ext_proc server +
  its supervised Envoy), TLS on unless `--no-tls`; one per store configuration (below);
- **baseline**: plain Envoy with sessiongate's own bootstrap (read back from the `envoy.yaml`
  that `up` wrote) minus the two ext_proc filters, their per-route configs and the ext_proc
  cluster: same listener, TLS certificate, routes, timeouts, buffer limits, upstream cluster and
  Envoy flags. The only difference is sessiongate.

Load: `wrk` (HTTP/1.1 keep-alive, a Lua script that POSTs a chat request with `authorization`
and `x-session-id`, and prints wrk's latency percentiles as JSON from its `done` hook; note
that wrk corrects its percentiles for coordinated omission, so one long stall weighs on p99 as
the requests a steady client would have queued behind it) for the non-streaming rows; a small
asyncio client for the streaming rows (time to the first SSE event and to the end of the
stream, per request). Both targets get the same requests, in alternating order per row, each
after a warm-up run. One more row sends no credential: sessiongate passes every request
through, but both filters still open their gRPC streams (the ext_proc floor).

Sessions: "new session" rows use a new session id per request (a conversation's first turn,
which in sessiongate is a cold-tier miss). The other rows rotate over a pool of sessions with
N stored messages. 50 and 500 messages: a template session filled with N/2 - 1 turns through
the gateway, then forked (`x-session-op: fork:...`) into the pool, the fork request adding the
last turn. 10,000 messages, and the warm and cold pools: written straight into the store before
that gateway starts (`extproc.bench.seed`), then, for 10,000, read once through the gateway so
that they are hot. Every request stores one more turn, so a pool is sized from the measured
rate to keep the growth small (at most 5 turns or 10% per session; a forked pool stays within
half of the default hot tier, and each load-sweep row gets a pool of its own), and the mean
history served, and the part of it actually injected, are reported per row (from the
`context.dropped_turns.*` counters: sessiongate leaves out the oldest turns beyond the model's
context window, and beyond `upstream_body_limit`, 32 MiB by default; a 10,000-message session
is ~600k tokens and ~2.4 MB, and its rows run against a sessiongate whose window for the model
is 16,384 tokens, which holds a 50-message session whole: the rows compare what the size of
the stored history costs, not what moving 2.4 MB through Envoy does). Each run continues the
rotation where the previous one stopped and passes over the sessions of the requests wrk cut
off when it stopped: sessiongate keeps such a turn pending (no reply ever reaches capture) and
would hold the session's next request for `pending_wait_ms`.

Store tiers: "hot" rows run against a default `sessiongate up` (memory + SQLite). "warm" rows
against one with Redis (`--redis-url`, a prefix of its own, removed afterwards) and a hot tier
too small to hold any session (`--hot-max-bytes 4096`): every read is a Redis snapshot. "cold"
rows against one without Redis and the same tiny hot tier: every read loads the session from
SQLite. sessiongate's counters say where each read came from (`store.hot_hits`,
`store.warm_hits`, `store.promotions` per request); a row whose reads were not what it is
named after says so.

Per configuration and target: requests/s, latency p50/p99/p99.9 (SSE: time to first event),
CPU seconds of Envoy and of the sessiongate process (utime+stime from /proc/<pid>/stat over the
load window) -> CPU per request, the provider's and the load generator's CPU, the machine's
busy share, and ratios to the baseline of the same row. sessiongate's own counters are read
before and after each window: every request of a sessiongate row must have been rewritten and
captured (a row where they were not says so). Streaming rows add the mean gap between events
(with and without sessiongate) and capture CPU per chunk: sessiongate's CPU per streamed
request minus its CPU per non-streamed request at the same concurrency and session size, over
the chunks per reply, both net of the process's idle CPU (measured per gateway, from
/proc/<pid>/task/*/schedstat, before its rows).

Memory: a fresh `sessiongate up` gets `--memory-sessions` (100,000) first turns, each a new
session, over keep-alive connections from 16 concurrent clients; once every turn is captured,
VmRSS from /proc/<pid>/status against the figure at start, per session.

`--plots DIR`: PNG plots (`extproc.bench.plots`, needs matplotlib). `--litellm`: LiteLLM's
proxy (pinned, in a virtual environment of its own: `extproc.bench.litellm_compare`) against
the same provider, with the same certificate and wrk load, next to plain Envoy.

Targets (issue 4, `extproc.bench.report.judge`): requests/s with sessiongate >= 50% of plain
Envoy's (50-message hot sessions, saturating load); added latency at concurrency 1: p50 < 1
ms, p99 < 3 ms; with 10,000 stored messages, added p50 within 2x of the 50-message case;
streaming added first-token delay p50 < 2 ms; inter-token delay indistinguishable (added mean
event gap < 5% of plain Envoy's); capture CPU <= 15 µs per chunk; sessiongate CPU per
non-streaming request <= plain Envoy's CPU per request. A missed target prints MISS; the run
still succeeds. Exit status 1 only when a measurement could not run.

On a small machine every process shares the same cores (the load generator included): the
machine's busy share is printed per row so a saturated run reads as what it is, and a window
in which processes the benchmark did not start used more than 0.15 CPUs says so (interrupt
and hypervisor-steal time are counted apart).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import math
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final, cast

import aiohttp
import orjson
import uvloop
import yaml

from extproc.bench import litellm_compare, plots
from extproc.bench.http_client import Client, Connection, Reply, RequestError, request
from extproc.bench.procstat import (
    CLK_TCK,
    child_pids,
    children_cpu_s,
    machine_cpu,
    machine_info,
    process_cpu_precise_s,
    process_cpu_s,
    rss_bytes,
    self_cpu_s,
    thread_cpu_s,
)
from extproc.bench.profiling import summarize_collapsed
from extproc.bench.report import (
    Comparison,
    Measurement,
    MemoryResult,
    ProxyComparison,
    Table,
    Target,
    derive_stream_costs,
    judge,
    print_memory,
    print_notes,
    print_profile,
    print_proxies,
    print_targets,
)
from extproc.bench.seed import TurnText, seed_sessions
from extproc.bench.sse_server import DEFAULT_CHUNKS
from extproc.bench.tables import percentile
from extproc.envoy_config import CAPTURE_FILTER, EXT_PROC_CLUSTER, REWRITE_FILTER
from extproc.supervisor import envoy_binary

__all__ = [
    "QUICK_ROW_IDS",
    "ROW_IDS",
    "BenchError",
    "Comparison",
    "Measurement",
    "MemoryResult",
    "Target",
    "add_arguments",
    "baseline_bootstrap",
    "judge",
    "pool_size",
    "provider_bootstrap",
    "run",
    "wrk_script",
]

# --- what is measured ---------------------------------------------------------------------

HISTORY_MESSAGES: Final = 50  # the reference session size: stored user + assistant messages
BIG_HISTORY: Final = 10_000
SEEDED_HISTORY: Final = 2_000  # pools of sessions this big or bigger are written, not forked
SATURATING_CONNECTIONS: Final = 32
SATURATING_THREADS: Final = 2
PROFILED_ROW: Final = "json.c32.h50"
# With 10,000 stored messages a request moves ~3 MB through sessiongate and both Envoys: 8
# connections already saturate the machine, and each needs a big session of its own.
BIG_SATURATING_CONNECTIONS: Final = 8
STREAM_CONCURRENCY: Final = 16
LOAD_CONCURRENCIES: Final = (1, 4, 16, 32, 64)  # the latency-against-load plot
DEFAULT_SSE_DELAY_MS: Final = 1.0
FULL_DURATION_S: Final = 10.0
FULL_WARMUP_S: Final = 2.0
QUICK_DURATION_S: Final = 1.0
QUICK_WARMUP_S: Final = 0.0
MAX_GROWTH_TURNS: Final = 5  # a pool: at most this many turns (or 10%) added per session
MIN_POOL: Final = 160  # the skipped sessions (<= connections per run) must stay a minority
MIN_SEEDED_POOL: Final = 8
MAX_POOL: Final = 20_000
# A forked pool stays within half of the default hot tier (256 MiB), at ~500 bytes per stored
# message by the hot tier's own estimate, or the rotation would evict what it reads next.
POOL_HOT_BYTES: Final = 128 * 1024 * 1024
HOT_BYTES_PER_MESSAGE: Final = 500
QUICK_MAX_POOL: Final = 400
PREP_CONNECTIONS: Final = 8
OTHER_CPU_NOTE: Final = 0.15  # CPUs used by unrelated processes that earn a row a note
READ_SHARE: Final = 0.98  # a tier's row: at least this share of reads from that tier
TINY_HOT_BYTES: Final = 4096  # warm/cold gateways: a hot tier that holds no session
DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"
MEMORY_SESSIONS: Final = 100_000
QUICK_MEMORY_SESSIONS: Final = 500
MEMORY_CONNECTIONS: Final = 16
MEMORY_BATCH: Final = 2_000
IDLE_WINDOW_S: Final = 2.0
QUICK_IDLE_WINDOW_S: Final = 0.5
LITELLM_CONCURRENCIES: Final = (1, SATURATING_CONNECTIONS)

CHAT_PATH: Final = "/v1/chat/completions"
API_KEY: Final = "sk-bench-gateway-0001"
MODEL: Final = "gpt-4o-mini"
TEMPLATE_SESSION: Final = "bench-template"
SSE_DELAY_HEADER: Final = "x-sse-delay-ms"


@dataclass(frozen=True, slots=True)
class RowSpec:
    """One configuration, run against both targets. `identity=False`: no credential, so
    sessiongate passes the request through (both filters still open their streams). `tier`:
    the sessiongate (store configuration) it runs against; `group`: rows of one group share
    a session pool (rows of other groups get pools of their own)."""

    id: str
    kind: str  # json | sse
    connections: int
    threads: int
    history: int  # stored messages per session (0: a new session per request)
    identity: bool = True
    tier: str = "hot"  # hot | warm | cold
    group: str = ""

    @property
    def label(self) -> str:
        threads = f" t={self.threads}" if self.kind == "json" and self.threads > 1 else ""
        if not self.identity:
            what = "no identity"
        elif self.history == 0:
            what = "new session"
        else:
            what = f"{self.history} msgs {self.tier}"
        return f"{'JSON' if self.kind == 'json' else 'SSE'} c={self.connections}{threads}, {what}"

    @property
    def pool_key(self) -> tuple[str, int, str, str]:
        return (self.kind, self.history, self.tier, self.group)

    @property
    def gateway(self) -> str:
        """The sessiongate (store and context configuration) this row runs against."""
        return "big" if self.tier == "hot" and self.history >= SEEDED_HISTORY else self.tier


def _json(connections: int, history: int, **options: Any) -> RowSpec:
    threads = 1 if connections == 1 else SATURATING_THREADS
    tier = options.get("tier", "hot")
    suffix = "" if tier == "hot" else f".{tier}"
    noid = "" if options.get("identity", True) else ".noid"
    row_id = f"json.c{connections}{'.h' + str(history) if not noid else ''}{noid}{suffix}"
    return RowSpec(row_id, "json", connections, threads, history, **options)


_SAT, _BIG_SAT = SATURATING_CONNECTIONS, BIG_SATURATING_CONNECTIONS

# Every row the benchmark reports, in order (one sessiongate per tier, in this order).
ROWS: Final = (
    _json(1, 0, identity=False),
    _json(1, 0),
    _json(_SAT, 0),
    _json(_SAT, 0, identity=False),
    _json(1, HISTORY_MESSAGES),
    _json(_SAT, HISTORY_MESSAGES),
    # A pool each: one pool for all three would outgrow the hot tier (256 MB by default).
    *(_json(c, HISTORY_MESSAGES, group=f"c{c}") for c in LOAD_CONCURRENCIES if c not in (1, _SAT)),
    _json(1, 500),
    _json(_SAT, 500),
    _json(1, BIG_HISTORY),
    _json(_BIG_SAT, BIG_HISTORY),
    _json(1, HISTORY_MESSAGES, tier="warm"),
    _json(_SAT, HISTORY_MESSAGES, tier="warm"),
    _json(1, HISTORY_MESSAGES, tier="cold"),
    _json(_SAT, HISTORY_MESSAGES, tier="cold"),
    RowSpec("sse.c1.h50", "sse", 1, 1, HISTORY_MESSAGES),
    RowSpec("sse.c16.h50", "sse", STREAM_CONCURRENCY, 1, HISTORY_MESSAGES),
)
ROW_IDS: Final = tuple(row.id for row in ROWS)
# --quick: one row per code path (the load sweep keeps c=16, which the capture cost needs).
QUICK_ROW_IDS: Final = tuple(
    row_id
    for row_id in ROW_IDS
    if row_id
    not in {
        "json.c4.h50",
        "json.c64.h50",
        "json.c32.h500",
        f"json.c{_BIG_SAT}.h{BIG_HISTORY}",
        "json.c32.h50.warm",
        "json.c32.h50.cold",
    }
)

_SYSTEM_PROMPT: Final = (
    "You are a concise, friendly assistant for an online bookshop. Answer questions about "
    "orders, deliveries and returns; never invent order numbers; ask before cancelling."
)
_QUESTION: Final = (
    "My order of three paperbacks was supposed to arrive yesterday. The tracking page has "
    "said 'in transit' for four days now. Can you tell me what usually happens next?"
)
_ANSWER: Final = (
    "Parcels that stay 'in transit' for a few days are usually waiting at a regional depot. "
    "The carrier normally delivers within two more working days; if it has not arrived by "
    "then, reply here and we will send a replacement or refund you, whichever you prefer."
)
TURN_TEXT: Final = TurnText(_SYSTEM_PROMPT, _QUESTION, _ANSWER, MODEL)


class BenchError(Exception):
    """A measurement could not run, or did not do what it is named after."""


# --- options ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    duration_s: float
    warmup_s: float
    tls: bool
    sse_delay_ms: float
    sse_chunks: int
    pool_sessions: int | None
    quick: bool
    json_path: Path | None
    profile_dir: Path | None
    keep_dir: Path | None
    plots_dir: Path | None = None
    redis_url: str = DEFAULT_REDIS_URL
    memory_sessions: int = MEMORY_SESSIONS
    litellm: bool = False
    litellm_version: str = litellm_compare.LITELLM_VERSION
    rows: tuple[str, ...] = ROW_IDS
    profile_row: str = PROFILED_ROW

    def specs(self) -> list[RowSpec]:
        return [spec for spec in ROWS if spec.id in self.rows]


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _pool_size(text: str) -> int:
    value = int(text)
    if value < SATURATING_CONNECTIONS:
        raise argparse.ArgumentTypeError(f"at least {SATURATING_CONNECTIONS}")
    return value


def _row_list(text: str) -> tuple[str, ...]:
    wanted = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [row_id for row_id in wanted if row_id not in ROW_IDS]
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(
            f"unknown row {', '.join(unknown) or '(none)'}; rows: {', '.join(ROW_IDS)}"
        )
    return wanted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the gateway benchmark's options to a (sub)parser."""
    add = parser.add_argument
    add(
        "--duration",
        type=_positive_float,
        default=None,
        help=f"seconds of measured load per row and target (default {FULL_DURATION_S:g}, "
        f"{QUICK_DURATION_S:g} with --quick)",
    )
    add(
        "--warmup",
        type=_non_negative_float,
        default=None,
        help=f"seconds of unmeasured load before each (default {FULL_WARMUP_S:g}, "
        f"{QUICK_WARMUP_S:g} with --quick)",
    )
    add(
        "--no-tls",
        dest="tls",
        action="store_false",
        help="plain HTTP listeners on both targets (default: TLS on both, as `up` runs)",
    )
    add(
        "--sse-delay-ms",
        type=_non_negative_float,
        default=DEFAULT_SSE_DELAY_MS,
        help=f"the SSE provider's delay between events (default {DEFAULT_SSE_DELAY_MS:g})",
    )
    add(
        "--sse-chunks",
        type=int,
        default=DEFAULT_CHUNKS,
        help=f"chat.completion.chunk events per streamed reply (default {DEFAULT_CHUNKS})",
    )
    add(
        "--pool-sessions",
        type=_pool_size,
        default=None,
        help="sessions per forked pool (default: sized from the measured rate so that each "
        f"grows by at most ~{MAX_GROWTH_TURNS} turns or 10%%)",
    )
    add(
        "--rows",
        type=_row_list,
        default=None,
        help="only these rows, comma-separated (default: all; --quick: one per code path): "
        + ", ".join(ROW_IDS),
    )
    add(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help=f"Redis for the warm rows, under a key prefix of the run's own that is removed "
        f"afterwards (default {DEFAULT_REDIS_URL}; 'none' skips the warm rows)",
    )
    add(
        "--memory-sessions",
        type=_non_negative_int,
        default=None,
        help=f"idle sessions for the memory figure (default {MEMORY_SESSIONS:,}, "
        f"{QUICK_MEMORY_SESSIONS} with --quick; 0 skips it)",
    )
    add("--quick", action="store_true", help="short runs (a smoke test, not a measurement)")
    add("--json", dest="json_path", type=Path, default=None, help="also write the results here")
    add(
        "--plots",
        dest="plots_dir",
        type=Path,
        default=None,
        help=f"write PNG plots here ({plots.LOAD_FILE}, {plots.SIZE_FILE}; needs matplotlib)",
    )
    add(
        "--litellm",
        action="store_true",
        help="also measure LiteLLM's proxy in front of the same provider (installs "
        f"litellm[proxy]=={litellm_compare.LITELLM_VERSION} into a virtual environment in "
        "sessiongate's cache directory on first use)",
    )
    add(
        "--profile",
        dest="profile_dir",
        type=Path,
        default=None,
        help="after the measurements, run the saturating 50-message load once more under "
        "`py-spy record` (if installed) and write its profile here",
    )
    add(
        "--profile-row",
        default=PROFILED_ROW,
        choices=[r.id for r in ROWS if r.kind == "json"],
        help=f"the JSON row whose load --profile repeats (default {PROFILED_ROW})",
    )
    add(
        "--keep-dir",
        type=Path,
        default=None,
        help="keep state directories, configs and logs here (default: a temporary directory)",
    )


def _options(args: argparse.Namespace) -> Options:
    quick = bool(args.quick)
    if args.sse_chunks < 2:
        raise BenchError("--sse-chunks: at least 2")
    redis_url = str(args.redis_url or "")
    memory = args.memory_sessions
    rows = args.rows or (QUICK_ROW_IDS if quick else ROW_IDS)
    return Options(
        duration_s=args.duration or (QUICK_DURATION_S if quick else FULL_DURATION_S),
        warmup_s=(
            args.warmup if args.warmup is not None else QUICK_WARMUP_S if quick else FULL_WARMUP_S
        ),
        tls=bool(args.tls),
        sse_delay_ms=float(args.sse_delay_ms),
        sse_chunks=int(args.sse_chunks),
        pool_sessions=args.pool_sessions,
        quick=quick,
        json_path=args.json_path,
        profile_dir=args.profile_dir,
        keep_dir=args.keep_dir,
        plots_dir=args.plots_dir,
        redis_url="" if redis_url.lower() in ("", "none") else redis_url,
        memory_sessions=(
            memory if memory is not None else QUICK_MEMORY_SESSIONS if quick else MEMORY_SESSIONS
        ),
        litellm=bool(args.litellm),
        rows=tuple(rows),
        profile_row=args.profile_row,
    )


def run(args: argparse.Namespace) -> int:
    """Run every row, print the table (and write `--json`). 0 when every measurement ran
    (missed targets are reported as MISS, not as a failure), 1 when one could not run."""
    try:
        options = _options(args)
    except BenchError as exc:
        print(f"bench gateway: {exc}", file=sys.stderr)
        return 2
    status: int = uvloop.run(_main(options))
    return status


# --- request bodies and the providers' replies -----------------------------------------------


def chat_body(stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": _SYSTEM_PROMPT},
            {"role": "user", "content": _QUESTION},
        ],
    }
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


def completion_body() -> bytes:
    """The static `chat.completion` the JSON provider answers every request with."""
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1_750_000_000,
            "model": MODEL,
            "system_fingerprint": "fp_bench",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": _ANSWER, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 120, "completion_tokens": 60, "total_tokens": 180},
        }
    )


# --- Envoy configurations -----------------------------------------------------------------

_TYPES = "type.googleapis.com/envoy.extensions.filters"
_LOOPBACK_ANY_PORT: Final = {"socket_address": {"address": "127.0.0.1", "port_value": 0}}


def provider_bootstrap(body: bytes) -> dict[str, Any]:
    """An Envoy that answers every request with `body` (a `chat.completion`), after reading
    the whole request (buffer filter), so that upstream keep-alive connections survive."""
    route = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": body.decode()}},
    }
    content_type = {"header": {"key": "content-type", "value": "application/json"}}
    virtual_host = {
        "name": "provider",
        "domains": ["*"],
        "routes": [route],
        "response_headers_to_add": [content_type],
    }
    buffer_filter = {
        "name": "envoy.filters.http.buffer",
        "typed_config": {
            "@type": f"{_TYPES}.http.buffer.v3.Buffer",
            "max_request_bytes": 64 * 1024 * 1024,
        },
    }
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": f"{_TYPES}.http.router.v3.Router"},
    }
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": f"{_TYPES}.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "provider",
            "codec_type": "AUTO",
            "route_config": {"name": "provider", "virtual_hosts": [virtual_host]},
            "http_filters": [buffer_filter, router],
        },
    }
    listener = {
        "name": "provider",
        "address": _LOOPBACK_ANY_PORT,
        "enable_reuse_port": False,
        "filter_chains": [{"filters": [hcm]}],
    }
    return {
        "node": {"id": "bench-provider", "cluster": "bench-provider"},
        "admin": {"address": _LOOPBACK_ANY_PORT},
        "static_resources": {"listeners": [listener]},
    }


def baseline_bootstrap(sessiongate_config: dict[str, Any]) -> dict[str, Any]:
    """sessiongate's Envoy bootstrap without sessiongate: the rewrite and capture filters,
    their per-route configs and the ext_proc cluster removed; everything else as it is. The
    listener binds a free port (port 0)."""
    config: dict[str, Any] = copy.deepcopy(sessiongate_config)
    ours = {REWRITE_FILTER, CAPTURE_FILTER}
    config["node"] = {"id": "sessiongate-baseline", "cluster": "sessiongate-baseline"}
    resources = config["static_resources"]
    removed_filters = 0
    for listener in resources["listeners"]:
        listener["address"]["socket_address"]["port_value"] = 0
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                hcm = network_filter.get("typed_config", {})
                filters = hcm.get("http_filters")
                if filters is None:
                    continue
                kept = [f for f in filters if f.get("name") not in ours]
                removed_filters += len(filters) - len(kept)
                hcm["http_filters"] = kept
                for host in hcm.get("route_config", {}).get("virtual_hosts", []):
                    for route in host.get("routes", []):
                        per_filter = route.get("typed_per_filter_config")
                        if per_filter is None:
                            continue
                        for name in ours:
                            per_filter.pop(name, None)
                        if not per_filter:
                            del route["typed_per_filter_config"]
    if removed_filters != len(ours):
        raise BenchError(
            f"expected sessiongate's bootstrap to hold {len(ours)} ext_proc filters, "
            f"found {removed_filters}"
        )
    clusters = resources["clusters"]
    resources["clusters"] = [c for c in clusters if c.get("name") != EXT_PROC_CLUSTER]
    if len(resources["clusters"]) != len(clusters) - 1:
        raise BenchError("sessiongate's bootstrap has no ext_proc cluster")
    return config


# --- the wrk script -----------------------------------------------------------------------


def _lua_string(text: str) -> str:
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    return f"[{eq}[{text}]{eq}]"


def wrk_script(
    *,
    body: bytes,
    session_prefix: str,
    fresh_sessions: bool,
    pool_sessions: int,
    threads: int,
    offset: int = 0,
    skip: Collection[int] = (),
    path: str = CHAT_PATH,
    api_key: str | None = API_KEY,
) -> str:
    """A wrk script: POST `body` with `authorization` and `x-session-id`; either a new session
    per request (`fresh_sessions`) or round robin over `pool_sessions` sessions named
    `<prefix><i>`: thread t's n-th request goes to session (offset + t + threads * n) % pool,
    so one session is never in flight twice; sessions in `skip` are passed over (see
    `pool_sequence`). `api_key=None`: no `authorization` header. Its `done` hook prints one
    JSON line: counts, latency (µs) and how far each thread's `n` went."""
    if not fresh_sessions and len(skip) >= pool_sessions // 2:
        raise BenchError(f"{len(skip)} of {pool_sessions} pool sessions to skip: too many")
    skipped = ", ".join(f"[{index}] = true" for index in sorted(skip))
    return f"""-- generated by extproc.bench.gateway_bench
local body = {_lua_string(body.decode())}
local path = {_lua_string(path)}
local prefix = {_lua_string(session_prefix)}
local fresh = {"true" if fresh_sessions else "false"}
local pool = {pool_sessions}
local nthreads = {threads}
local offset = {offset}
local skip = {{{skipped}}}
local auth = {_lua_string("Bearer " + api_key) if api_key is not None else "nil"}
local next_id = 0
local threads = {{}}

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

n = 0  -- a global, so that `done` can read it from each thread

function request()
  local sid
  if fresh then
    sid = prefix .. tid .. "-" .. n
    n = n + 1
  else
    local index = (offset + tid + nthreads * n) % pool
    n = n + 1
    while skip[index] do
      index = (offset + tid + nthreads * n) % pool
      n = n + 1
    end
    sid = prefix .. index
  end
  return wrk.format("POST", path, {{
    ["content-type"] = "application/json",
    ["authorization"] = auth,
    ["x-session-id"] = sid,
  }}, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  local generated = {{}}
  for i, thread in ipairs(threads) do
    generated[i] = tostring(thread:get("n"))
  end
  io.write(string.format(
    '\\nWRK_JSON {{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}},' ..
    '"latency_us":{{"p50":%.1f,"p90":%.1f,"p99":%.1f,"p99.9":%.1f,' ..
    '"mean":%.1f,"max":%.1f,"min":%.1f,"stdev":%.1f}},"generated":[%s]}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.mean, latency.max, latency.min, latency.stdev,
    table.concat(generated, ",")))
end
"""


def pool_sequence(
    offset: int, thread: int, threads: int, pool: int, skip: Collection[int], generated: int
) -> list[int]:
    """The pool sessions a wrk thread sent requests to, in order, given its final `n`."""
    out = []
    for n in range(generated):
        index = (offset + thread + threads * n) % pool
        if index not in skip:
            out.append(index)
    return out


def _wrk_duration(seconds: float) -> str:
    """wrk's -d: whole seconds (wrk knows no smaller unit), at least one."""
    return f"{max(1, round(seconds))}s"


def parse_wrk_output(text: str) -> dict[str, Any]:
    for line in text.splitlines():
        if line.startswith("WRK_JSON "):
            parsed = json.loads(line[len("WRK_JSON ") :])
            if not isinstance(parsed, dict):
                break
            return cast(dict[str, Any], parsed)
    raise BenchError(f"wrk printed no result:\n{text[-2000:]}")


def ensure_wrk() -> str:
    """The `wrk` binary; installed with apt-get when missing and possible."""
    found = shutil.which("wrk")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is not None and os.geteuid() == 0:
        print("bench gateway: wrk is missing; installing it (apt-get install -y wrk)", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "wrk"]):
            subprocess.run(
                command, env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        found = shutil.which("wrk")
        if found:
            return found
    raise BenchError(
        "the load generator `wrk` is not installed and could not be installed here "
        "(install it with `apt-get install wrk`, `brew install wrk` or from "
        "https://github.com/wg/wrk, then run again)"
    )


# --- processes ----------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, limit: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-limit:]
        return ""


def _open_outputs(log_path: Path, stdout_path: Path | None) -> tuple[IO[bytes], IO[bytes]]:
    """The child's stderr and stdout (its own file, or the same as stderr), both new."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")  # noqa: SIM115 - handed to the child, closed after spawning
    out = open(stdout_path, "wb") if stdout_path is not None else log  # noqa: SIM115
    return log, out


def _read(path: Path) -> str:
    """The file's text, "" when it does not exist (yet)."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


class Processes:
    """Every process the benchmark started; `stop_all` ends them (newest first). Each is
    started through `extproc.pdeathsig`, so they also die if this process is killed."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    async def spawn(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        stdout_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Child:
        log, out = await asyncio.to_thread(_open_outputs, log_path, stdout_path)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "extproc.pdeathsig",
                str(os.getpid()),
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=log,
                env=env,
            )
        finally:
            log.close()
            if out is not log:
                out.close()
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    async def stop(self, child: Child, timeout_s: float = 10.0) -> int | None:
        if child.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.terminate()
            try:
                await asyncio.wait_for(child.proc.wait(), timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                await child.proc.wait()
        with contextlib.suppress(ValueError):
            self.children.remove(child)
        return child.proc.returncode

    async def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            with contextlib.suppress(Exception):
                await asyncio.shield(self.stop(child))


async def _wait_for_line(child: Child, path: Path, prefix: str, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in (await asyncio.to_thread(_read, path)).splitlines():
            if line.startswith(prefix):
                return line.strip()
        if child.proc.returncode is not None:
            raise BenchError(
                f"{child.name} exited with status {child.proc.returncode}:\n{child.log_tail()}"
            )
        await asyncio.sleep(0.05)
    raise BenchError(f"{child.name} not ready in {timeout_s:g} s:\n{child.log_tail()}")


@dataclass
class EnvoyInstance:
    child: Child
    admin: str
    port: int

    @property
    def pid(self) -> int:
        return self.child.pid


async def _envoy_ready(child: Child, admin_path: Path, listener: str) -> tuple[str, int]:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < deadline:
            if child.proc.returncode is not None:
                raise BenchError(
                    f"{child.name} exited with status {child.proc.returncode}:\n{child.log_tail()}"
                )
            address = (await asyncio.to_thread(_read, admin_path)).strip()
            if address:
                admin = f"http://{address}"
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(f"{admin}/ready") as resp:
                        if resp.status == 200 and (await resp.text()).strip() == "LIVE":
                            async with http.get(f"{admin}/listeners?format=json") as resp:
                                data = await resp.json()
                            for status in data.get("listener_statuses", []):
                                if status.get("name") == listener:
                                    address_info = status["local_address"]["socket_address"]
                                    return admin, int(address_info["port_value"])
                            raise BenchError(f"{child.name}: no `{listener}` listener")
            await asyncio.sleep(0.05)
    raise BenchError(f"{child.name} did not become ready in time:\n{child.log_tail()}")


async def start_envoy(
    procs: Processes,
    name: str,
    config: dict[str, Any],
    directory: Path,
    listener: str,
    extra_flags: Sequence[str] = (),
) -> EnvoyInstance:
    """Envoy with the flags `sessiongate up` gives its own (extra_flags aside)."""
    config_path = directory / "envoy.yaml"
    admin_path = directory / "envoy-admin-address"
    await asyncio.to_thread(_write, config_path, yaml.safe_dump(config, sort_keys=False))
    await asyncio.to_thread(admin_path.unlink, missing_ok=True)
    child = await procs.spawn(
        name,
        [
            envoy_binary(),
            "-c",
            str(config_path),
            "--admin-address-path",
            str(admin_path),
            "--disable-hot-restart",
            "--log-level",
            "warn",
            *extra_flags,
        ],
        directory / "envoy.log",
    )
    admin, port = await _envoy_ready(child, admin_path, listener)
    return EnvoyInstance(child, admin, port)


@dataclass
class Gateway:
    """`sessiongate up`: the ext_proc server (this process's pid) and its Envoy."""

    child: Child
    url: str  # http(s)://127.0.0.1:PORT/v1
    state_dir: Path
    envoy_pid: int
    envoy_admin: str
    metrics_url: str  # .../stats (JSON counters)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/", 1)[0])

    def envoy_config(self) -> dict[str, Any]:
        config: dict[str, Any] = yaml.safe_load((self.state_dir / "envoy.yaml").read_text())
        return config


async def start_gateway(
    procs: Processes, upstream: str, directory: Path, tls: bool, extra: Sequence[str] = ()
) -> Gateway:
    """`sessiongate up` with its defaults (plus `extra` flags), state in `directory`."""
    stdout_path = directory / "up.stdout"
    log_path = directory / "up.log"
    argv = [
        sys.executable,
        "-m",
        "extproc.cli",
        "up",
        "--upstream",
        upstream,
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        str(directory),
        "--metrics-listen",
        "127.0.0.1:0",
        "--log-level",
        "warning",
        *([] if tls else ["--no-tls"]),
        *extra,
    ]
    child = await procs.spawn("sessiongate up", argv, log_path, stdout_path)
    ready = await _wait_for_line(child, stdout_path, "ready ")
    url = ready.split()[1]
    log = await asyncio.to_thread(_read, log_path)
    found = re.search(r"counters at (http://\S+)/metrics", log)
    if found is None:
        raise BenchError(f"sessiongate up printed no counters URL:\n{log[-2000:]}")
    envoys = child_pids(child.pid)
    if len(envoys) != 1:
        raise BenchError(f"expected one Envoy child of sessiongate up, found {envoys}")
    admin = "http://" + (await asyncio.to_thread(_read, directory / "envoy-admin-address")).strip()
    return Gateway(child, url, directory, envoys[0], admin, found.group(1) + "/stats")


# --- the run ------------------------------------------------------------------------------


def _summary_us(samples_ns: Sequence[int]) -> dict[str, float]:
    ordered = sorted(s / 1000 for s in samples_ns)
    if not ordered:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "p99.9": 0.0, "mean": 0.0, "max": 0.0}
    return {
        "p50": percentile(ordered, 0.50),
        "p90": percentile(ordered, 0.90),
        "p99": percentile(ordered, 0.99),
        "p99.9": percentile(ordered, 0.999),
        "mean": sum(ordered) / len(ordered),
        "max": ordered[-1],
    }


@dataclass
class Side:
    """One target: where to send load and which processes to account. For a proxy that is
    not an Envoy (LiteLLM), `envoy_pid` is that proxy's process and `envoy_admin` is empty."""

    name: str  # baseline | sessiongate | litellm
    port: int
    envoy_pid: int
    envoy_admin: str
    sessiongate_pid: int | None = None
    metrics_url: str | None = None
    ssl_context: ssl.SSLContext | None = None
    idle_cpu_per_s: dict[str, float] = field(default_factory=dict)


def _cpu_or_zero(pid: int) -> float:
    try:
        return process_cpu_s(pid)
    except (OSError, ValueError, IndexError):  # exited meanwhile
        return 0.0


def _client(side: Side) -> Client:
    return Client(side.port, side.ssl_context, api_key=API_KEY, path=CHAT_PATH)


# --- session pools --------------------------------------------------------------------------


@dataclass
class Pool:
    """Sessions of one size that a group of rows rotates over (`<prefix><index>`)."""

    label: str
    prefix: str
    size: int
    history: int  # stored messages per session when the pool was made
    how: str  # forked | seeded
    turns_added: int = 0  # turns sessiongate stored into the pool since
    # Where the next run starts in the pool, and the sessions it must pass over: those that
    # requests wrk aborted at the end of an earlier run may have left with a pending turn
    # (sessiongate would hold their next request for pending_wait_ms).
    offset: int = 0
    skip: set[int] = field(default_factory=set)
    touched: bool = False  # seeded pools of the hot rows: read once through the gateway

    @property
    def messages(self) -> float:
        """Mean stored messages per session now (2 per turn)."""
        return self.history + 2 * self.turns_added / self.size if self.size else 0.0

    def record(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "size": self.size,
            "prefix": self.prefix,
            "history_messages": self.history,
            "how": self.how,
            "turns_added": self.turns_added,
            "skipped_sessions": len(self.skip),
            "mean_messages_at_end": round(self.messages, 1),
        }


def growth_turns(history: int) -> int:
    """Turns a pool session may gain over its rows: 5, or 10% of its messages."""
    return max(MAX_GROWTH_TURNS, history // 20)


def skip_budget(connections: Sequence[int], warmup: bool) -> int:
    """Pool sessions that sessiongate runs may leave pending (one per connection per run)."""
    return sum(c * (2 if warmup else 1) for c in connections)


def pool_size(
    expected_requests: float,
    history: int,
    budget: int,
    *,
    minimum: int = MIN_POOL,
    ceiling: int = MAX_POOL,
) -> int:
    """Sessions for a pool: enough that each grows by at most `growth_turns`, within
    [minimum, ceiling], and always more than twice the sessions runs may skip (`budget`).
    Even, so that two wrk threads take disjoint residues."""
    size = math.ceil(expected_requests / growth_turns(history)) if expected_requests > 0 else 0
    size = max(minimum, 2 * budget + 4, min(ceiling, size))
    return size + size % SATURATING_THREADS


def reads_per_request(deltas: dict[str, int], requests: int) -> dict[str, float]:
    """Where sessiongate's history reads came from, per request, by its store counters: a hot
    hit, a warm hit (Redis snapshot) or a cold load (SQLite; on a gateway whose hot tier holds
    nothing the writer loads the session once more per turn, for its next seq)."""
    if requests <= 0:
        return {}
    return {
        "hot": deltas.get("store.hot_hits", 0) / requests,
        "warm": deltas.get("store.warm_hits", 0) / requests,
        "cold": deltas.get("store.promotions", 0) / requests,
    }


def tier_note(tier: str, reads: dict[str, float]) -> str:
    """'' when the reads came from the tier the row is named after, else what happened."""
    if not reads:
        return ""
    if reads.get(tier, 0.0) < READ_SHARE:
        return f"only {reads.get(tier, 0.0):.0%} of reads were {tier} hits"
    others = [t for t in ("hot", "warm") if t != tier and reads.get(t, 0.0) > 1 - READ_SHARE]
    if tier == "hot" and reads.get("cold", 0.0) > 1 - READ_SHARE:
        others.append("cold")
    if others:
        return "reads also from the " + " and ".join(others) + " tier"
    return ""


class _Bench:
    def __init__(self, options: Options, directory: Path, wrk: str) -> None:
        self.options = options
        self.directory = directory
        self.wrk = wrk
        self.procs = Processes()
        self.rows: list[Comparison] = []
        self.step = "starting"
        self.run_tag = uuid.uuid4().hex[:8]
        self.sequence = 0
        self.provider_pid = 0
        self.pool: Pool | None = None
        self.pools: dict[tuple[str, int, str, str], Pool] = {}
        self.pool_records: list[dict[str, Any]] = []  # one per pool, for the JSON
        self.rates: dict[int, float] = {}  # sessiongate req/s by connections (hot JSON rows)
        self.machine_extra: dict[str, Any] = {}
        self.table = Table()
        self.http: aiohttp.ClientSession | None = None
        self.memory: MemoryResult | None = None
        self.proxies: list[ProxyComparison] = []
        self.notes: list[str] = []
        self.redis_prefixes: list[str] = []
        self.profile: dict[str, Any] | None = None

    # --- counters and stats ---

    async def counters(self, side: Side) -> dict[str, int]:
        if side.metrics_url is None:
            return {}
        assert self.http is not None
        async with self.http.get(side.metrics_url) as resp:
            data: dict[str, int] = await resp.json()
        return data

    async def upstream_tx_bytes(self, side: Side) -> int:
        if not side.envoy_admin:
            return 0
        assert self.http is not None
        params = {"filter": r"^cluster\.llm_upstream\.upstream_cx_tx_bytes_total$"}
        async with self.http.get(f"{side.envoy_admin}/stats", params=params) as resp:
            text = await resp.text()
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if name == "cluster.llm_upstream.upstream_cx_tx_bytes_total":
                return int(value)
        raise BenchError(f"{side.name}: Envoy reports no upstream byte counter")

    def _cpu_snapshot(self, side: Side) -> dict[str, float]:
        machine = machine_cpu()
        proxy = process_cpu_s(side.envoy_pid)
        if not side.envoy_admin:  # not an Envoy (LiteLLM): its worker processes too, if any
            proxy += sum(_cpu_or_zero(pid) for pid in child_pids(side.envoy_pid))
        snapshot = {
            "envoy": proxy,
            "provider": process_cpu_s(self.provider_pid),
            "children": children_cpu_s(),
            "self": self_cpu_s(),
            **{f"machine_{name}": float(value) for name, value in machine.items()},
            "wall": time.monotonic(),
        }
        if side.sessiongate_pid is not None:
            snapshot["sessiongate"] = process_cpu_s(side.sessiongate_pid)
        return snapshot

    async def measure_idle(self, sides: Sequence[Side]) -> None:
        """CPU per second each side's processes use with no traffic (schedstat, ns)."""
        window = QUICK_IDLE_WINDOW_S if self.options.quick else IDLE_WINDOW_S

        def sample() -> dict[tuple[int, str], float]:
            out: dict[tuple[int, str], float] = {}
            for index, side in enumerate(sides):
                out[(index, "envoy")] = process_cpu_precise_s(side.envoy_pid)
                if side.sessiongate_pid is not None:
                    out[(index, "sessiongate")] = process_cpu_precise_s(side.sessiongate_pid)
            return out

        await asyncio.sleep(0.2)  # the sanity requests' captures and commits
        before, started = sample(), time.monotonic()
        await asyncio.sleep(window)
        after, wall = sample(), time.monotonic() - started
        for (index, name), value in after.items():
            sides[index].idle_cpu_per_s[name] = max(0.0, value - before[(index, name)]) / wall

    # --- one measured window ---

    async def _measure(
        self,
        side: Side,
        load: Callable[[], Awaitable[tuple[int, int, dict[str, Any]]]],
        client_is_child: bool,
    ) -> tuple[int, int, dict[str, Any], dict[str, float], dict[str, int], int]:
        """Run `load` (-> requests, errors, details) between two CPU/counter snapshots.
        Returns requests, errors, details, CPU deltas, counter deltas, upstream bytes."""
        counters_before = await self.counters(side)
        tx_before = await self.upstream_tx_bytes(side)
        before = self._cpu_snapshot(side)
        requests, errors, details = await load()
        # Let the captures and store writes of the window's last requests finish.
        await asyncio.sleep(0.1)
        after = self._cpu_snapshot(side)
        tx_after = await self.upstream_tx_bytes(side)
        counters_after = await self.counters(side)
        harness = after["self"] - before["self"]
        cpu = {
            "envoy": after["envoy"] - before["envoy"],
            "provider": after["provider"] - before["provider"],
            # wrk (a child), or the streaming client (this process)
            "client": after["children"] - before["children"] if client_is_child else harness,
            "wall": after["wall"] - before["wall"],
        }
        if "sessiongate" in after:
            cpu["sessiongate"] = after["sessiongate"] - before["sessiongate"]
        total = after["machine_total"] - before["machine_total"]
        busy = after["machine_busy"] - before["machine_busy"]
        cpu["machine_busy_share"] = busy / total if total else 0.0
        cpu["kernel_irq"] = (after["machine_irq"] - before["machine_irq"]) / CLK_TCK
        cpu["steal"] = (after["machine_steal"] - before["machine_steal"]) / CLK_TCK
        # Whatever else ran on the machine meanwhile (other processes' interference).
        known = sum(
            cpu.get(k, 0.0)
            for k in ("envoy", "provider", "client", "sessiongate", "kernel_irq", "steal")
        )
        cpu["other"] = max(0.0, busy / CLK_TCK - known - (harness if client_is_child else 0.0))
        deltas = {
            name: value - counters_before.get(name, 0)
            for name, value in counters_after.items()
            if value != counters_before.get(name, 0)
        }
        return requests, errors, details, cpu, deltas, tx_after - tx_before

    def _measurement(
        self,
        side: Side,
        spec: RowSpec,
        requests: int,
        errors: int,
        duration_s: float,
        latency: dict[str, float],
        cpu: dict[str, float],
        deltas: dict[str, int],
        tx_bytes: int,
        stream: dict[str, float] | None = None,
        history_mean: float = 0.0,
    ) -> Measurement:
        if requests <= 0:
            raise BenchError(f"{side.name}: no request completed")
        per_request: dict[str, float] = {
            name: cpu[name] / requests * 1e6
            for name in ("envoy", "sessiongate", "provider", "client")
            if name in cpu
        }
        notes = []
        if errors:
            notes.append(f"{errors} errors")
        if cpu["other"] > OTHER_CPU_NOTE * cpu["wall"]:
            notes.append(
                f"other processes used {cpu['other'] / cpu['wall']:.2f} CPUs during this window"
            )
        reads: dict[str, float] = {}
        injected_mean = 0.0
        if side.sessiongate_pid is not None:
            # The window may also catch (or miss) the odd request of the next/previous one.
            if spec.identity:
                injected = deltas.get("rewrite.injected", 0)
                captured = deltas.get("capture.completed", 0)
                if injected < 0.98 * requests or captured < 0.98 * requests:
                    notes.append(
                        f"only {injected} rewritten / {captured} captured of {requests} requests"
                    )
            else:
                passed = deltas.get("rewrite.pass_through.no_identity", 0)
                if passed < 0.98 * requests:
                    notes.append(f"only {passed} of {requests} passed through for no identity")
            if spec.identity and spec.history:
                reads = reads_per_request(deltas, requests)
                note = tier_note(spec.tier, reads)
                if note:
                    notes.append(note)
                dropped = sum(
                    v for k, v in deltas.items() if k.startswith("context.dropped_turns.")
                ) or deltas.get("rewrite.turns_dropped_for_size", 0)
                injected_mean = history_mean - 2 * dropped / requests
                if dropped:
                    notes.append(
                        f"{dropped / requests:,.1f} turns per request left out (context window "
                        "or upstream_body_limit)"
                    )
            problems = {
                k: v
                for k, v in deltas.items()
                if k.startswith(("rewrite.failed", "capture.abandoned", "capture.dropped"))
                or k.endswith(("pending_wait_timeout", "dropped"))
            }
            if problems:
                notes.append(", ".join(f"{k} {v}" for k, v in sorted(problems.items())))
        return Measurement(
            target=side.name,
            requests=requests,
            errors=errors,
            duration_s=duration_s,
            rps=requests / duration_s,
            latency_us=latency,
            cpu_s={k: round(v, 4) for k, v in cpu.items()},
            cpu_us_per_request=per_request,
            upstream_request_bytes=tx_bytes / requests,
            stream_us=stream or {},
            counters=deltas,
            history_messages_mean=history_mean,
            injected_messages_mean=injected_mean,
            reads_per_request=reads,
            idle_cpu_per_s=dict(side.idle_cpu_per_s),
            note="; ".join(notes),
        )

    # --- wrk rows ---

    async def _wrk(
        self,
        side: Side,
        connections: int,
        threads: int,
        duration_s: float,
        script: str,
        tag: str,
    ) -> dict[str, Any]:
        self.sequence += 1
        script_path = self.directory / f"wrk-{self.sequence:02d}-{tag}-{side.name}.lua"
        script_path.write_text(script)
        scheme = "https" if self.options.tls else "http"
        url = f"{scheme}://127.0.0.1:{side.port}{CHAT_PATH}"
        log_path = self.directory / f"wrk-{self.sequence:02d}-{tag}-{side.name}.out"
        child = await self.procs.spawn(
            "wrk",
            [
                self.wrk,
                "-t",
                str(threads),
                "-c",
                str(connections),
                "-d",
                _wrk_duration(duration_s),
                "--timeout",
                "10s",
                "--latency",
                "-s",
                str(script_path),
                url,
            ],
            log_path,
        )
        try:
            status = await asyncio.wait_for(child.proc.wait(), duration_s + 30)
        except TimeoutError:
            raise BenchError(f"wrk did not finish:\n{child.log_tail()}") from None
        finally:
            await self.procs.stop(child)
        output = await asyncio.to_thread(_read, log_path)
        if status != 0:
            raise BenchError(f"wrk exited with status {status}:\n{output[-2000:]}")
        return parse_wrk_output(output)

    def _script(self, spec: RowSpec, tag: str) -> str:
        api_key = API_KEY if spec.identity else None
        if spec.history == 0:
            # A new session per request; the prefix is new for every wrk run.
            return wrk_script(
                body=chat_body(False),
                session_prefix=f"b{self.run_tag}-{tag}-",
                fresh_sessions=True,
                pool_sessions=1,
                threads=spec.threads,
                api_key=api_key,
            )
        pool = self._current_pool()
        return wrk_script(
            body=chat_body(False),
            session_prefix=pool.prefix,
            fresh_sessions=False,
            pool_sessions=pool.size,
            threads=spec.threads,
            offset=pool.offset,
            skip=pool.skip,
            api_key=api_key,
        )

    def _current_pool(self) -> Pool:
        if self.pool is None:
            raise BenchError("no session pool prepared")
        return self.pool

    def _advance_pool(self, spec: RowSpec, result: dict[str, Any]) -> None:
        """After a sessiongate wrk run on the pool: continue the rotation where it stopped, and
        pass over the sessions of the requests that may have been in flight when wrk stopped
        (each connection's last request)."""
        pool = self._current_pool()
        per_thread = spec.connections // spec.threads
        generated = [int(n) for n in result.get("generated", [])]
        for thread, count in enumerate(generated):
            sent = pool_sequence(pool.offset, thread, spec.threads, pool.size, pool.skip, count)
            pool.skip.update(sent[-per_thread:])
        pool.offset = (pool.offset + sum(generated)) % pool.size

    async def wrk_side(self, side: Side, spec: RowSpec) -> Measurement:
        options = self.options
        stores = side.sessiongate_pid is not None and spec.history > 0 and spec.identity
        if options.warmup_s > 0:
            warm = await self._wrk(
                side,
                spec.connections,
                spec.threads,
                options.warmup_s,
                self._script(spec, f"w{self.sequence + 1}"),
                f"{spec.id}-warmup",
            )
            if stores:
                self._current_pool().turns_added += int(warm["requests"])
                self._advance_pool(spec, warm)
        history_before = self.pool.messages if stores and self.pool else 0.0
        script = self._script(spec, f"m{self.sequence + 1}")

        async def load() -> tuple[int, int, dict[str, Any]]:
            result = await self._wrk(
                side, spec.connections, spec.threads, options.duration_s, script, spec.id
            )
            errors = sum(int(v) for v in result["errors"].values())
            return int(result["requests"]), errors, result

        requests, errors, result, cpu, deltas, tx = await self._measure(side, load, True)
        history_mean = 0.0
        if stores:
            pool = self._current_pool()
            pool.turns_added += requests
            self._advance_pool(spec, result)
            history_mean = (history_before + pool.messages) / 2
        latency = {k: float(v) for k, v in result["latency_us"].items()}
        return self._measurement(
            side,
            spec,
            requests,
            errors,
            result["duration_us"] / 1e6,
            latency,
            cpu,
            deltas,
            tx,
            history_mean=history_mean,
        )

    # --- streaming rows ---

    async def stream_side(self, side: Side, spec: RowSpec) -> Measurement:
        options = self.options
        pool = self._current_pool()
        row_id, concurrency = spec.id, spec.connections
        client = _client(side)
        body = chat_body(True)
        counter = 0

        def next_session() -> str:
            nonlocal counter
            index = (pool.offset + counter) % pool.size
            counter += 1
            while index in pool.skip:
                index = (pool.offset + counter) % pool.size
                counter += 1
            return f"{pool.prefix}{index}"

        async def worker(
            connection: Connection, stop_at: float, sink: list[Reply], failures: list[str]
        ) -> None:
            while time.monotonic() < stop_at:
                message = client.request_bytes(body, next_session())
                try:
                    reply = await request(connection, message, f"{row_id} {side.name}")
                except RequestError as exc:
                    failures.append(str(exc))
                    return
                if not reply.body.endswith(b"data: [DONE]\n\n"):
                    failures.append("stream without data: [DONE]")
                    return
                sink.append(reply)

        async def drive(
            connections: list[Connection], seconds: float
        ) -> tuple[list[Reply], list[str]]:
            replies: list[Reply] = []
            failures: list[str] = []
            stop_at = time.monotonic() + seconds
            await asyncio.gather(*(worker(c, stop_at, replies, failures) for c in connections))
            return replies, failures

        try:
            # Connections (and TLS handshakes) are made before the window, as wrk does.
            connections = [await client.connect() for _ in range(concurrency)]
            if options.warmup_s > 0:
                warm, failures = await drive(connections, options.warmup_s)
                if failures:
                    raise BenchError(f"{row_id} {side.name} (warm-up): {failures[0]}")
                if side.sessiongate_pid is not None:
                    pool.turns_added += len(warm)
            pool.offset = (pool.offset + counter) % pool.size
            counter = 0
            history_before = pool.messages
            replies: list[Reply] = []
            failures = []

            async def load() -> tuple[int, int, dict[str, Any]]:
                nonlocal replies, failures
                started = time.monotonic()
                replies, failures = await drive(connections, options.duration_s)
                return len(replies), len(failures), {"duration_s": time.monotonic() - started}

            requests, errors, details, cpu, deltas, tx = await self._measure(side, load, False)
            if failures:
                raise BenchError(f"{row_id} {side.name}: {failures[0]}")
            duration = float(details["duration_s"])
        finally:
            await client.close()
        pool.offset = (pool.offset + counter) % pool.size
        history_mean = 0.0
        if side.sessiongate_pid is not None:
            pool.turns_added += requests
            history_mean = (history_before + pool.messages) / 2
        ttfb = _summary_us([r.first_byte_ns - r.start_ns for r in replies])
        total = _summary_us([r.end_ns - r.start_ns for r in replies])
        gaps = options.sse_chunks  # events after the first: chunks - 1, then [DONE]
        span = _summary_us([(r.end_ns - r.first_byte_ns) // gaps for r in replies])
        stream = {
            "total_p50": total["p50"],
            "total_p99": total["p99"],
            "total_mean": total["mean"],
            "event_gap_p50": span["p50"],
            "event_gap_mean": span["mean"],
        }
        return self._measurement(
            side, spec, requests, errors, duration, ttfb, cpu, deltas, tx, stream, history_mean
        )

    # --- preparing sessions ---

    def rate_estimate(self, connections: int) -> float:
        """sessiongate's req/s at this concurrency, from the rows measured so far."""
        if connections in self.rates:
            return self.rates[connections]
        if connections == 1:
            return self.rates.get(1, max(self.rates.values(), default=1000.0))
        loaded = [rate for c, rate in self.rates.items() if c > 1]
        return max(loaded, default=max(self.rates.values(), default=1000.0))

    def pool_specs(self, spec: RowSpec) -> list[RowSpec]:
        return [s for s in self.options.specs() if s.pool_key == spec.pool_key]

    def size_pool(self, spec: RowSpec) -> int:
        """Sessions for the pool of `spec`'s group, from the measured rates."""
        options = self.options
        specs = self.pool_specs(spec)
        connections = [s.connections for s in specs]
        profiled = options.profile_dir is not None and any(
            s.id == options.profile_row for s in specs
        )
        if profiled:
            connections.append(next(r for r in ROWS if r.id == options.profile_row).connections)
        budget = skip_budget(connections, options.warmup_s > 0)
        seconds = options.duration_s + options.warmup_s
        if spec.kind == "sse":
            # One stream takes about chunks x delay.
            stream_s = max(0.005, options.sse_chunks * options.sse_delay_ms / 1000)
            expected = sum(s.connections / stream_s for s in specs) * seconds
        else:
            expected = sum(self.rate_estimate(c) for c in connections) * seconds
        if spec.history >= SEEDED_HISTORY:  # growth hardly matters; each costs ~20 MB
            # Two spare sessions for first reads whose capture was lost (see touch_pool).
            return pool_size(0, spec.history, budget + 2, minimum=MIN_SEEDED_POOL)
        if options.pool_sessions is not None:
            return max(options.pool_sessions, 2 * budget + 4)
        ceiling = QUICK_MAX_POOL if options.quick else MAX_POOL
        if spec.tier == "hot":
            fits = POOL_HOT_BYTES // (max(spec.history, 1) * HOT_BYTES_PER_MESSAGE)
            ceiling = min(ceiling, max(MIN_POOL, fits))
        return pool_size(expected, spec.history, budget, ceiling=ceiling)

    async def prepare_pool(self, side: Side, spec: RowSpec, label: str) -> Pool:
        """A template session with history/2 - 1 turns, forked into the pool's sessions (each
        fork request stores the last turn)."""
        size = self.size_pool(spec)
        history = spec.history
        stream = spec.kind == "sse"
        self.step = f"preparing {size} sessions of {history} messages ({label})"
        print(f"  {self.step} ...", end="", flush=True)
        started = time.monotonic()
        tag = uuid.uuid4().hex[:6]
        template = f"{TEMPLATE_SESSION}-{tag}"
        client = _client(side)
        before = await self.counters(side)
        extra = {SSE_DELAY_HEADER: "0"} if stream else {}
        body = chat_body(stream)
        prefix = f"pool-{tag}-"
        try:
            connection = await client.connect()
            for turn in range(history // 2 - 1):
                await request(
                    connection,
                    client.request_bytes(body, template, extra),
                    f"template turn {turn + 1}",
                )
            queue = iter(range(size))

            async def forker(connection: Connection) -> None:
                for index in queue:
                    headers = {**extra, "x-session-op": f"fork:{template}"}
                    await request(
                        connection,
                        client.request_bytes(body, f"{prefix}{index}", headers),
                        f"fork {index}",
                    )

            connections = [await client.connect() for _ in range(PREP_CONNECTIONS)]
            await asyncio.gather(*(forker(c) for c in connections))
        finally:
            await client.close()
        after = await self.counters(side)
        forks = after.get("rewrite.session_op.fork", 0) - before.get("rewrite.session_op.fork", 0)
        if forks < size:
            raise BenchError(f"only {forks} of {size} forks ran")
        await self._settle(side, before)
        await self.drain(side)
        print(f" {time.monotonic() - started:.1f} s", flush=True)
        return self._new_pool(spec, Pool(label, prefix, size, history, "forked"))

    def _new_pool(self, spec: RowSpec, pool: Pool) -> Pool:
        self.pools[spec.pool_key] = pool
        self.pool_records.append(pool.record())
        return pool

    async def seed_pool(
        self, spec: RowSpec, state_dir: Path, label: str, redis_prefix: str | None = None
    ) -> Pool:
        """The pool's sessions written into `state_dir`'s store before its gateway starts."""
        size = self.size_pool(spec)
        history = spec.history
        self.step = f"writing {size} sessions of {history:,} messages ({label})"
        print(f"  {self.step} ...", end="", flush=True)
        prefix = f"seed-{uuid.uuid4().hex[:6]}-"
        result = await seed_sessions(
            sqlite_path=state_dir / "sessions.db",
            hmac_key_path=state_dir / "hmac.key",
            api_key=API_KEY,
            session_ids=[f"{prefix}{i}" for i in range(size)],
            turns_per_session=history // 2,
            text=TURN_TEXT,
            redis_url=self.options.redis_url if redis_prefix is not None else None,
            redis_prefix=redis_prefix or "sg",
        )
        print(f" {result.seconds:.1f} s", flush=True)
        return self._new_pool(spec, Pool(label, prefix, size, history, "seeded"))

    async def touch_pool(self, side: Side, pool: Pool) -> None:
        """Read every session of a seeded pool once through the gateway (each request stores
        a turn), so that the rows find them in the hot tier. One at a time, each capture
        waited for: a first read of 10,000 messages loads and counts them all (~0.4 s of
        sessiongate's event loop), and a capture stream that waits too long behind such
        work is closed by Envoy (the turn then stays pending: that session is skipped)."""
        self.step = f"reading {pool.size} sessions of {pool.history:,} messages once"
        print(f"  {self.step} ...", end="", flush=True)
        started = time.monotonic()
        client = _client(side)
        body = chat_body(False)
        lost = 0
        try:
            connection = await client.connect()
            for index in range(pool.size):
                before = await self.counters(side)
                await request(
                    connection,
                    client.request_bytes(body, f"{pool.prefix}{index}"),
                    f"first read of {pool.prefix}{index}",
                )
                try:
                    await self._settle(side, before, timeout_s=30.0)
                except BenchError:
                    pool.skip.add(index)
                    lost += 1
        finally:
            await client.close()
        if lost * 2 >= pool.size:
            raise BenchError(f"{lost} of {pool.size} first reads were never captured")
        await self.drain(side)
        pool.turns_added += pool.size - lost
        pool.touched = True
        extra = f", {lost} captures lost (sessions skipped)" if lost else ""
        print(f" {time.monotonic() - started:.1f} s{extra}", flush=True)

    async def _settle(self, side: Side, since: dict[str, int], timeout_s: float = 10.0) -> None:
        """Wait until every request rewritten since the `since` counters has been captured
        (capture runs after the client has its reply, in observability mode)."""

        def finished(counters: dict[str, int]) -> int:
            # Completed, abandoned, or dropped (the store's queue was full): nothing more will
            # happen to it. Rows report drops in their notes.
            return counters.get("capture.completed", 0) + sum(
                v
                for k, v in counters.items()
                if k.startswith(("capture.abandoned", "capture.dropped"))
            )

        deadline = time.monotonic() + timeout_s
        while True:
            counters = await self.counters(side)
            done = finished(counters) - finished(since)
            rewritten = counters.get("rewrite.injected", 0) - since.get("rewrite.injected", 0)
            if done >= rewritten:
                return
            if time.monotonic() > deadline:
                changed = {
                    k: v - since.get(k, 0)
                    for k, v in sorted(counters.items())
                    if k.startswith(("capture.", "store.", "rewrite.")) and v != since.get(k, 0)
                }
                raise BenchError(
                    f"captures did not catch up: {done} of {rewritten} in {timeout_s:g} s "
                    f"(counters since: {changed})"
                )
            await asyncio.sleep(0.05)

    async def drain(self, side: Side, timeout_s: float = 120.0) -> None:
        """Wait until sessiongate's store has committed everything queued (the completed-turn
        queue and the cold tier's write-behind queue): preparing a pool queues hundreds of
        thousands of rows, and a measured window must not pay for committing them."""
        deadline = time.monotonic() + timeout_s
        while True:
            counters = await self.counters(side)
            backlog = counters.get("store.queue_depth", 0) + counters.get("store.cold_queued", 0)
            if backlog <= 0 or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.1)

    # --- rows ---

    def _order(self, index: int, base: Side, gate: Side) -> list[Side]:
        return [base, gate] if index % 2 == 0 else [gate, base]

    def add(self, spec: RowSpec, results: dict[str, Measurement], order: list[str]) -> Comparison:
        base, gate = results["baseline"], results["sessiongate"]
        added: dict[str, float] = {
            k: gate.latency_us[k] - base.latency_us[k]
            for k in ("p50", "p99", "p99.9")
            if k in gate.latency_us and k in base.latency_us
        }
        base_envoy = base.cpu_us_per_request.get("envoy", 0.0)
        row = Comparison(
            id=spec.id,
            label=spec.label,
            kind=spec.kind,
            concurrency=spec.connections,
            threads=spec.threads,
            history_messages=spec.history,
            identity=spec.identity,
            order=order,
            baseline=base,
            sessiongate=gate,
            rps_ratio=gate.rps / base.rps if base.rps else 0.0,
            added_us=added,
            cpu_per_request_ratio=(
                gate.cpu_us_per_request.get("sessiongate", 0.0) / base_envoy if base_envoy else 0.0
            ),
            envoy_cpu_per_request_ratio=(
                gate.cpu_us_per_request.get("envoy", 0.0) / base_envoy if base_envoy else 0.0
            ),
            tier=spec.tier,
        )
        if spec.kind == "sse":
            row.extra["added_event_gap_us_p50"] = (
                gate.stream_us["event_gap_p50"] - base.stream_us["event_gap_p50"]
            )
            row.extra["added_total_us_p50"] = (
                gate.stream_us["total_p50"] - base.stream_us["total_p50"]
            )
        elif spec.tier == "hot" and spec.identity:
            self.rates[spec.connections] = gate.rps
        self.rows.append(row)
        self.table.print_row(row)
        return row

    async def run_row(self, spec: RowSpec, index: int, base: Side, gate: Side) -> None:
        self.step = f"row {spec.id}"
        results: dict[str, Measurement] = {}
        order = self._order(index, base, gate)
        for side in order:
            if spec.kind == "sse":
                results[side.name] = await self.stream_side(side, spec)
            else:
                results[side.name] = await self.wrk_side(side, spec)
        self.add(spec, results, [s.name for s in order])


# --- profile ------------------------------------------------------------------------------


async def _profile(bench: _Bench, gate: Side, directory: Path) -> dict[str, Any]:
    """The profiled row's load once more (`--profile-row`; default the saturating
    50-message load), with py-spy sampling sessiongate (not one of the measured windows:
    sampling costs the sampled process CPU)."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        return {"error": "py-spy is not installed (pip install py-spy)"}
    pid = gate.sessiongate_pid
    assert pid is not None
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    raw = directory / "sessiongate.collapsed.txt"
    seconds = max(3.0, bench.options.duration_s)
    argv = [
        py_spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(math.ceil(seconds)),
        "--rate",
        "200",
        "--threads",
        # Only samples holding the GIL: an idle event loop (uvloop waits in native code, with
        # no Python frame of its own) would otherwise show as Runner.run's self time.
        "--gil",
        "--nonblocking",
        "--format",
        "raw",
        "--output",
        str(raw),
    ]
    spec = next(r for r in ROWS if r.id == bench.options.profile_row)
    script = bench._script(spec, "profile")
    wrk = asyncio.ensure_future(
        bench._wrk(gate, spec.connections, spec.threads, seconds + 1, script, "profile")
    )
    try:
        await asyncio.sleep(0.5)
        before = thread_cpu_s(pid)
        child = await bench.procs.spawn("py-spy", argv, directory / "py-spy.log")
        try:
            await asyncio.wait_for(child.proc.wait(), seconds + 30)
        except TimeoutError:
            await bench.procs.stop(child)
        after = thread_cpu_s(pid)
        await wrk
    finally:
        if not wrk.done():
            wrk.cancel()
            with contextlib.suppress(BaseException):
                await wrk
    text = await asyncio.to_thread(_read, raw)
    if not text:
        return {"error": f"py-spy wrote no profile: {child.log_tail(500).strip()}"}
    summary = summarize_collapsed(text)
    summary["row"] = spec.id
    summary["thread_cpu_s"] = {
        name: round(after[name] - before.get(name, 0.0), 3) for name in sorted(after)
    }
    summary["collapsed"] = str(raw)
    await asyncio.to_thread(_write, directory / "summary.json", json.dumps(summary, indent=2))
    return summary


# --- main ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _work_directory(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="sgbench-gw-") as name:
        yield Path(name)


async def _main(options: Options) -> int:
    try:
        wrk = ensure_wrk()
    except BenchError as exc:
        print(f"bench gateway: error: {exc}", file=sys.stderr, flush=True)
        return 1
    machine = machine_info(wrk)
    with _work_directory(options.keep_dir) as directory:
        bench = _Bench(options, directory, wrk)
        return await _run_bench(bench, machine)


async def _run_bench(bench: _Bench, machine: dict[str, Any]) -> int:
    options = bench.options
    print(
        f"sessiongate bench gateway: {options.duration_s:g} s measured (+{options.warmup_s:g} s "
        f"warm-up) per row and target, TLS {'on' if options.tls else 'off'} on both targets"
        f"{' (QUICK: a smoke test, not a measurement)' if options.quick else ''}\n"
        f"{machine['nproc']} CPUs ({machine['cpu_model']}), Envoy {machine['envoy']}, "
        f"Python {machine['python']}, {machine['wrk'].split(' [')[0]}; every process shares "
        "these CPUs (load generator included)",
        flush=True,
    )
    load = machine["loadavg_start"][0]
    if load > 0.5 * (machine["cpus_usable"] or 1):
        print(
            f"note: load average {load:.2f} on {machine['cpus_usable']} CPUs before the run: "
            "other work is running, and every figure below includes its interference",
            flush=True,
        )
    error = ""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    if main_task is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    bench.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    try:
        await _measure_all(bench)
    except asyncio.CancelledError:
        error = f"{bench.step}: interrupted"
        print(f"\nbench gateway: interrupted during {bench.step}", file=sys.stderr, flush=True)
    except (BenchError, RequestError, OSError, aiohttp.ClientError, KeyError, ValueError) as exc:
        error = f"{bench.step}: {type(exc).__name__}: {exc}"
        print(f"\nbench gateway: error: {error}", file=sys.stderr, flush=True)
    finally:
        await bench.procs.stop_all()
        await bench.http.close()
        await _remove_redis_keys(bench)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)
    profile = bench.profile
    machine["loadavg_end"] = list(os.getloadavg())
    machine.update(bench.machine_extra)
    derive_stream_costs(bench.rows, options.sse_chunks)
    targets = judge(bench.rows)
    if bench.rows:
        print_notes(bench.rows, options.sse_chunks)
    if bench.memory is not None:
        print_memory(bench.memory)
    print_proxies(bench.proxies, bench.rows)
    for note in bench.notes:
        print(f"note: {note}")
    if bench.rows:
        print_targets(targets)
    if profile:
        print_profile(profile)
    plot_files: list[str] = []
    if options.plots_dir is not None and bench.rows:
        subtitle = (
            f"{machine['nproc']} CPUs shared by every process, TLS "
            f"{'on' if options.tls else 'off'}, {options.duration_s:g} s per point"
            f"{' (QUICK)' if options.quick else ''}"
        )
        try:
            plot_files = [
                str(p) for p in plots.write_plots(bench.rows, options.plots_dir, subtitle)
            ]
        except plots.PlotError as exc:
            print(f"\nplots: {exc}")
        else:
            print(f"\nplots: {', '.join(plot_files)}")
    if options.json_path is not None:
        result = {
            "benchmark": "gateway",
            "quick": options.quick,
            "machine": machine,
            "config": {
                "duration_s": options.duration_s,
                "warmup_s": options.warmup_s,
                "tls": options.tls,
                "sse_delay_ms": options.sse_delay_ms,
                "sse_chunks": options.sse_chunks,
                "history_messages": HISTORY_MESSAGES,
                "request_body_bytes": len(chat_body(False)),
                "completion_body_bytes": len(completion_body()),
                "rows": [asdict(spec) for spec in options.specs()],
                "memory_sessions": options.memory_sessions,
                "litellm": litellm_compare.LITELLM_VERSION if options.litellm else None,
            },
            "targets": [asdict(t) for t in targets],
            "rows": [asdict(row) for row in bench.rows],
            "memory": (
                {**asdict(bench.memory), "bytes_per_session": bench.memory.bytes_per_session}
                if bench.memory is not None
                else None
            ),
            "litellm": [asdict(p) for p in bench.proxies],
            "pools": [pool.record() for pool in bench.pools.values()],
            "plots": plot_files,
            "notes": bench.notes,
            "profile": profile,
            "error": error or None,
        }
        options.json_path.parent.mkdir(parents=True, exist_ok=True)
        options.json_path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 1 if error else 0


async def _redis_reachable(url: str) -> str:
    """'' when Redis answers PING at `url`, else why not."""
    import redis.asyncio as redis_asyncio

    client = redis_asyncio.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        await client.ping()
        return ""
    except Exception as exc:  # any failure means: no warm rows
        return f"{type(exc).__name__}: {exc}"
    finally:
        await client.aclose()


async def _remove_redis_keys(bench: _Bench) -> None:
    """Delete every key under the run's Redis prefixes (the warm gateway's and the seeds')."""
    if not bench.redis_prefixes:
        return
    import redis.asyncio as redis_asyncio

    client = redis_asyncio.Redis.from_url(bench.options.redis_url, socket_timeout=5)
    removed = 0
    try:
        for prefix in bench.redis_prefixes:
            batch: list[bytes] = []
            async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    removed += await client.unlink(*batch)
                    batch.clear()
            if batch:
                removed += await client.unlink(*batch)
    except Exception as exc:  # the run's figures stand; say what is left behind
        print(
            f"bench gateway: could not remove the Redis keys under {bench.redis_prefixes}: {exc}",
            file=sys.stderr,
        )
    finally:
        await client.aclose()
    bench.machine_extra["redis_keys_removed"] = removed
    bench.redis_prefixes.clear()


async def _measure_all(bench: _Bench) -> None:
    options = bench.options
    directory = bench.directory
    procs = bench.procs
    specs = options.specs()
    json_specs = [s for s in specs if s.kind == "json"]
    sse_specs = [s for s in specs if s.kind == "sse"]

    if json_specs or options.memory_sessions or options.litellm:
        # --- JSON: Envoy direct_response provider ---
        bench.step = "starting the JSON provider (Envoy direct_response)"
        provider = await start_envoy(
            procs,
            "provider envoy",
            provider_bootstrap(completion_body()),
            directory / "provider-json",
            "provider",
            ["--concurrency", "1"],
        )
        bench.provider_pid = provider.pid
        upstream = f"http://127.0.0.1:{provider.port}"
        index = 0
        base: Side | None = None
        hot_gateway: Gateway | None = None
        for tier in _GATEWAY_FLAGS:
            tier_specs = [s for s in json_specs if s.gateway == tier]
            if not tier_specs and not (tier == "hot" and options.litellm):
                continue
            if tier == "warm":
                if not options.redis_url:
                    bench.notes.append("warm rows skipped (--redis-url none)")
                    continue
                problem = await _redis_reachable(options.redis_url)
                if problem:
                    bench.notes.append(
                        f"warm rows skipped: Redis at {options.redis_url} does not answer "
                        f"({problem}); start redis-server or pass --redis-url"
                    )
                    continue
            gate, base, gateway, index = await _json_phase(
                bench, tier, tier_specs, upstream, base, index
            )
            if tier == "hot":
                hot_gateway = gateway
            await procs.stop(gateway.child)
        if options.memory_sessions:
            bench.memory = await _measure_memory(bench, upstream, directory / "memory")
        if options.litellm and base is not None and hot_gateway is not None:
            await _compare_litellm(bench, upstream, base, hot_gateway.state_dir / "tls", index)
        for child in list(procs.children):
            await procs.stop(child)

    if sse_specs:
        # --- SSE: the asyncio SSE provider ---
        bench.step = "starting the SSE provider"
        sse_dir = directory / "provider-sse"
        sse_dir.mkdir(parents=True, exist_ok=True)
        sse_stdout = sse_dir / "stdout"
        sse = await procs.spawn(
            "sse server",
            [
                sys.executable,
                "-m",
                "extproc.bench.sse_server",
                "--port",
                "0",
                "--chunks",
                str(options.sse_chunks),
                "--delay-ms",
                f"{options.sse_delay_ms:g}",
            ],
            sse_dir / "log",
            sse_stdout,
        )
        ready = await _wait_for_line(sse, sse_stdout, "sse-server ready ")
        bench.provider_pid = sse.pid
        bench.step = "starting sessiongate up (SSE)"
        gateway = await _start_sessiongate(bench, ready.split()[-1], directory / "sse", "hot")
        gate = _gateway_side(bench, gateway)
        base = await _start_baseline(bench, gateway, directory / "sse")
        await _sanity(bench, base, gate, stream=True)
        await bench.measure_idle([gate, base])
        for position, spec in enumerate(sse_specs):
            if position == 0:
                bench.pool = await bench.prepare_pool(gate, spec, "SSE")
            await bench.run_row(spec, position + len(bench.rows), base, gate)
        for child in list(procs.children):
            await procs.stop(child)


# The model's context window for the 10,000-message rows. The target asks whether the size of
# the stored history changes what a request costs, so these rows inject what a model window
# holds, as sessiongate always does: 16,384 tokens hold a 50-message session whole (~3.5k
# tokens) and the newest ~200 messages of a 10,000-message one (~600k tokens, ~2.4 MB). With
# the whole session injected (a 2M-token window; session 2's runs) the row measured moving
# 2.4 MB through two Envoys and the provider per request (+17 ms, Envoy CPU x15), not context
# work.
BIG_WINDOW_TOKENS: Final = 16_384
_GATEWAY_FLAGS: Final = {
    "hot": (),
    "big": ("--context", f'models."{MODEL}" = {{window = {BIG_WINDOW_TOKENS}}}'),
    "warm": ("--hot-max-bytes", str(TINY_HOT_BYTES)),
    "cold": ("--hot-max-bytes", str(TINY_HOT_BYTES)),
}
_GATEWAY_NOTES: Final = {
    "big": f"the {BIG_HISTORY:,}-message rows run against a sessiongate whose window for "
    f"{MODEL} is {BIG_WINDOW_TOKENS:,} tokens (--context): it injects the newest messages that "
    "window holds, as much as a 50-message session whole; everything else default",
    "warm": f"warm rows: sessiongate with Redis and --hot-max-bytes {TINY_HOT_BYTES} (the hot "
    "tier holds no session: every read is a Redis snapshot)",
    "cold": f"cold rows: sessiongate without Redis and --hot-max-bytes {TINY_HOT_BYTES} (every "
    "read loads the session from SQLite; so does the writer, once per turn, for the next seq)",
}


async def _start_sessiongate(
    bench: _Bench, upstream: str, directory: Path, tier: str, redis_prefix: str = ""
) -> Gateway:
    extra = list(_GATEWAY_FLAGS[tier])
    if tier == "warm":
        extra += ["--redis-url", bench.options.redis_url, "--redis-prefix", redis_prefix]
    return await start_gateway(
        bench.procs, upstream, directory / "sessiongate", bench.options.tls, extra
    )


def _gateway_side(bench: _Bench, gateway: Gateway) -> Side:
    context = None
    if bench.options.tls:
        context = ssl.create_default_context(cafile=str(gateway.state_dir / "tls" / "ca.pem"))
    return Side(
        "sessiongate",
        gateway.port,
        gateway.envoy_pid,
        gateway.envoy_admin,
        gateway.child.pid,
        gateway.metrics_url,
        context,
    )


async def _start_baseline(bench: _Bench, gateway: Gateway, directory: Path) -> Side:
    """Plain Envoy from the gateway's bootstrap minus sessiongate (same certificate)."""
    bench.step = "starting plain Envoy (baseline)"
    plain = await start_envoy(
        bench.procs,
        "baseline envoy",
        baseline_bootstrap(gateway.envoy_config()),
        directory / "baseline",
        "llm",
    )
    context = None
    if bench.options.tls:
        context = ssl.create_default_context(cafile=str(gateway.state_dir / "tls" / "ca.pem"))
    return Side("baseline", plain.port, plain.pid, plain.admin, ssl_context=context)


async def _json_phase(
    bench: _Bench,
    tier: str,
    specs: list[RowSpec],
    upstream: str,
    base: Side | None,
    index: int,
) -> tuple[Side, Side, Gateway, int]:
    """One sessiongate (store configuration) against the JSON provider: its seeded pools
    written before it starts, then its rows. The baseline Envoy is started with the first
    one and kept (it does not depend on sessiongate's store)."""
    options = bench.options
    directory = bench.directory / f"json-{tier}"
    state_dir = directory / "sessiongate"
    redis_prefix = ""
    if tier == "warm":
        redis_prefix = f"sgbench-{bench.run_tag}"
        bench.redis_prefixes.append(redis_prefix)
    if tier in _GATEWAY_NOTES and specs:
        bench.notes.append(_GATEWAY_NOTES[tier])
    for spec in specs:
        if spec.history and tier != "hot" and spec.pool_key not in bench.pools:
            label = f"{spec.history:,} msgs {spec.tier}"
            await bench.seed_pool(spec, state_dir, label, redis_prefix or None)
    bench.step = f"starting sessiongate up ({tier})"
    gateway = await _start_sessiongate(bench, upstream, directory, tier, redis_prefix)
    gate = _gateway_side(bench, gateway)
    if base is None:  # kept for the other tiers (with this gateway's certificate)
        base = await _start_baseline(bench, gateway, directory)
    await _sanity(bench, base, gate, stream=False)
    if tier == "hot":
        await bench.measure_idle([gate, base])
    for spec in specs:
        if spec.history:
            pool = bench.pools.get(spec.pool_key)
            if pool is None:
                label = f"{spec.history} msgs {tier}{' ' + spec.group if spec.group else ''}"
                pool = await bench.prepare_pool(gate, spec, label)
            elif pool.how == "seeded" and spec.tier == "hot" and not pool.touched:
                await bench.touch_pool(gate, pool)
            bench.pool = pool
        await bench.run_row(spec, index, base, gate)
        index += 1
        if spec.id == options.profile_row and options.profile_dir is not None:
            bench.step = "profiling sessiongate"
            bench.profile = await _profile(bench, gate, options.profile_dir)
    return gate, base, gateway, index


async def _measure_memory(bench: _Bench, upstream: str, directory: Path) -> MemoryResult:
    """A fresh `sessiongate up`, `memory_sessions` first turns (each a new session) over
    MEMORY_CONNECTIONS keep-alive connections, every turn captured, then VmRSS."""
    sessions = bench.options.memory_sessions
    bench.step = f"memory: {sessions:,} idle sessions"
    print(f"\n  {bench.step} ...", end="", flush=True)
    gateway = await start_gateway(
        bench.procs, upstream, directory / "sessiongate", bench.options.tls
    )
    gate = _gateway_side(bench, gateway)
    try:
        await _sanity_one(bench, gate)
        await asyncio.sleep(0.5)
        before = await bench.counters(gate)
        rss_before = rss_bytes(gateway.child.pid)
        client = _client(gate)
        body = chat_body(False)
        prefix = f"mem-{bench.run_tag}-"
        started = time.monotonic()

        async def sender(connection: Connection, queue: Iterator[int]) -> None:
            for number in queue:
                await request(connection, client.request_bytes(body, f"{prefix}{number}"), "memory")

        try:
            connections = [await client.connect() for _ in range(MEMORY_CONNECTIONS)]
            # In batches, each captured before the next: new sessions arrive faster than the
            # store's writer commits them, and past its queue (10,000) turns are dropped.
            for first in range(0, sessions, MEMORY_BATCH):
                since = await bench.counters(gate)
                queue = iter(range(first, min(sessions, first + MEMORY_BATCH)))
                await asyncio.gather(*(sender(c, queue) for c in connections))
                await bench._settle(gate, since, timeout_s=120.0)
        finally:
            await client.close()
        duration = time.monotonic() - started
        await asyncio.sleep(0.5)  # the cold tier's last group commit
        counters = await bench.counters(gate)
        rss_after = rss_bytes(gateway.child.pid)
    finally:
        await bench.procs.stop(gateway.child)
    hot = counters.get("store.hot_sessions", 0)
    dropped = counters.get("capture.dropped", 0) - before.get("capture.dropped", 0)
    evictions = counters.get("store.hot_evictions", 0) - before.get("store.hot_evictions", 0)
    notes = []
    if hot < sessions:
        notes.append(f"the hot tier holds {hot:,} of the {sessions:,} sessions")
    if evictions:
        notes.append(f"{evictions:,} evicted (hot_max_bytes)")
    if dropped:
        notes.append(f"{dropped:,} first turns dropped by the store (queue full)")
    result = MemoryResult(
        sessions=sessions,
        hot_sessions=hot,
        hot_sessions_at_start=before.get("store.hot_sessions", 0),
        hot_bytes_estimate=counters.get("store.hot_bytes", 0),
        rss_before_bytes=rss_before,
        rss_after_bytes=rss_after,
        duration_s=duration,
        evictions=evictions,
        note="; ".join(notes),
        counters={
            k: v - before.get(k, 0)
            for k, v in sorted(counters.items())
            if k.startswith(("capture.", "store.", "rewrite.")) and v != before.get(k, 0)
        },
    )
    print(
        f" {duration:.0f} s: {rss_after / 1024 / 1024:,.0f} MB RSS, "
        f"{result.bytes_per_session:,.0f} bytes per session",
        flush=True,
    )
    return result


async def _compare_litellm(
    bench: _Bench, upstream: str, base: Side, tls_dir: Path, index: int
) -> None:
    """LiteLLM's proxy (pinned, own virtual environment) against the same provider and plain
    Envoy, with the gateway's certificate, under the new-session wrk load of the main rows."""
    options = bench.options
    bench.step = "LiteLLM: installing"
    print()
    try:
        executable = await litellm_compare.ensure_litellm(options.litellm_version)
    except litellm_compare.LiteLLMUnavailable as exc:
        raise BenchError(f"--litellm: {exc}") from None
    directory = bench.directory / "litellm"
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "config.yaml"
    config.write_text(litellm_compare.litellm_config(f"{upstream}/v1", MODEL))
    port = litellm_compare.free_port()
    tls = (tls_dir / "cert.pem", tls_dir / "key.pem") if options.tls else None
    bench.step = "LiteLLM: starting the proxy"
    child = await bench.procs.spawn(
        "litellm",
        litellm_compare.litellm_argv(executable, config, port, tls),
        directory / "litellm.log",
        env=litellm_compare.litellm_env(),
    )
    context = base.ssl_context
    side = Side("litellm", port, child.pid, "", ssl_context=context)
    await _wait_litellm(child, side)
    try:
        for concurrency in LITELLM_CONCURRENCIES:
            threads = 1 if concurrency == 1 else SATURATING_THREADS
            spec = RowSpec(f"litellm.c{concurrency}", "json", concurrency, threads, 0)
            bench.step = f"row {spec.id}"
            results: dict[str, Measurement] = {}
            order = bench._order(index, base, side)
            for target in order:
                results[target.name] = await bench.wrk_side(target, spec)
            index += 1
            base_m, proxy_m = results["baseline"], results["litellm"]
            comparison = ProxyComparison(
                id=spec.id,
                label=f"LiteLLM c={concurrency}{f' t={threads}' if threads > 1 else ''}",
                concurrency=concurrency,
                baseline=base_m,
                proxy=proxy_m,
                rps_ratio=proxy_m.rps / base_m.rps if base_m.rps else 0.0,
                added_us={
                    k: proxy_m.latency_us[k] - base_m.latency_us[k] for k in ("p50", "p99", "p99.9")
                },
                version=options.litellm_version,
            )
            bench.proxies.append(comparison)
            bench.table.print_proxy(comparison)
    finally:
        await bench.procs.stop(child)


async def _wait_litellm(child: Child, side: Side, timeout_s: float = 120.0) -> None:
    """Until the proxy answers its liveliness probe and one chat request with a 200."""
    deadline = time.monotonic() + timeout_s
    scheme = "https" if side.ssl_context is not None else "http"
    url = f"{scheme}://127.0.0.1:{side.port}"
    verify: ssl.SSLContext | bool = side.ssl_context if side.ssl_context is not None else True
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        while True:
            if child.proc.returncode is not None:
                raise BenchError(
                    f"LiteLLM exited with status {child.proc.returncode}:\n{child.log_tail()}"
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with http.get(f"{url}/health/liveliness", ssl=verify) as resp:
                    if resp.status == 200:
                        break
            if time.monotonic() > deadline:
                raise BenchError(f"LiteLLM not ready in {timeout_s:g} s:\n{child.log_tail()}")
            await asyncio.sleep(0.2)
        headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
        async with http.post(
            f"{url}{CHAT_PATH}", data=chat_body(False), headers=headers, ssl=verify
        ) as resp:
            body = await resp.read()
            if resp.status != 200 or b"chat.completion" not in body:
                raise BenchError(f"LiteLLM answered {resp.status}: {body[:300]!r}")


async def _sanity(bench: _Bench, base: Side, gate: Side, stream: bool) -> None:
    """One request through each target: a 200 with the provider's reply, and sessiongate
    rewrote and captured it (its counters say so)."""
    bench.step = "sanity requests"
    before = await bench.counters(gate)
    for side in (base, gate):
        await _sanity_requests(side, stream)
    await _sanity_counted(bench, gate, before)


async def _sanity_one(bench: _Bench, gate: Side) -> None:
    before = await bench.counters(gate)
    await _sanity_requests(gate, False)
    await _sanity_counted(bench, gate, before)


async def _sanity_requests(side: Side, stream: bool) -> None:
    client = _client(side)
    try:
        connection = await client.connect()
        session = f"sanity-{uuid.uuid4().hex[:8]}"
        for _ in range(2):  # the second request carries the first turn as history
            reply = await request(
                connection,
                client.request_bytes(chat_body(stream), session),
                f"sanity request to {side.name}",
            )
            expected = b"data: [DONE]" if stream else b'"chat.completion"'
            if expected not in reply.body:
                raise BenchError(f"{side.name}: unexpected reply {reply.body[:200]!r}")
    finally:
        await client.close()


async def _sanity_counted(bench: _Bench, gate: Side, before: dict[str, int]) -> None:
    deadline = time.monotonic() + 5
    while True:
        after = await bench.counters(gate)
        injected = after.get("rewrite.injected", 0) - before.get("rewrite.injected", 0)
        captured = after.get("capture.completed", 0) - before.get("capture.completed", 0)
        if injected >= 2 and captured >= 2:
            return
        if time.monotonic() > deadline:
            raise BenchError(
                f"sessiongate did not rewrite and capture the sanity requests "
                f"(rewritten {injected}, captured {captured} of 2): {after}"
            )
        await asyncio.sleep(0.05)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m extproc.bench.gateway_bench [options]` (the same as `sessiongate bench
    gateway`)."""
    parser = argparse.ArgumentParser(prog="gateway_bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
