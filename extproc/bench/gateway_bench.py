"""`sessiongate bench gateway`: what sessiongate adds to Envoy, against plain Envoy in the same run.

Three kinds of process run on this machine, started (and always stopped) by the benchmark:

- a provider that is never the bottleneck: for JSON, an Envoy (`--concurrency 1`) answering
  every request with a static `chat.completion` through `direct_response` (a buffer filter
  reads the whole request first, so upstream connections stay alive); for SSE,
  `extproc.bench.sse_server` (raw asyncio protocol, uvloop) streaming a 200-event
  `chat.completion.chunk` reply plus `data: [DONE]`, one event every `--sse-delay-ms`;
- **sessiongate**: `sessiongate up` exactly as a user runs it (a subprocess: ext_proc server +
  its supervised Envoy), TLS on unless `--no-tls`;
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

Sessions: "0 stored messages" rows use a new session id per request (a conversation's first
turn, which in sessiongate is a cold-tier miss). "50 stored messages" rows rotate over a pool
of hot sessions: a template session filled with 24 turns through the gateway, then forked
(`x-session-op: fork:...`) into the pool, the fork request adding the 25th turn; every request
then stores one more turn, so the pool is sized from the measured new-session rate to keep the
growth small, and the mean history actually served is reported per row. Each run continues
the rotation where the previous one stopped and passes over the sessions of the requests wrk
cut off when it stopped: sessiongate keeps such a turn pending (no reply ever reaches capture)
and would hold the session's next request for `pending_wait_ms`.

Per configuration and target: requests/s, latency p50/p99/p99.9 (SSE: time to first event),
CPU seconds of Envoy and of the sessiongate process (utime+stime from /proc/<pid>/stat over the
load window) -> CPU per request, the provider's and the load generator's CPU, the machine's
busy share, and ratios to the baseline of the same row. sessiongate's own counters are read
before and after each window: every request of a sessiongate row must have been rewritten and
captured (a row where they were not says so).

Targets (issue 4): requests/s with sessiongate >= 50% of plain Envoy's (50-message hot
sessions, saturating load); added latency at concurrency 1: p50 < 1 ms, p99 < 3 ms; streaming
added first-token delay p50 < 2 ms; sessiongate CPU per non-streaming request <= plain Envoy's
CPU per request. A missed target prints MISS; the run still succeeds. Exit status 1 only when a
measurement could not run.

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
import platform
import re
import resource
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

from extproc.bench.sse_server import DEFAULT_CHUNKS
from extproc.envoy_config import CAPTURE_FILTER, EXT_PROC_CLUSTER, REWRITE_FILTER
from extproc.supervisor import envoy_binary

__all__ = [
    "ROW_IDS",
    "BenchError",
    "Comparison",
    "Measurement",
    "add_arguments",
    "baseline_bootstrap",
    "provider_bootstrap",
    "run",
    "wrk_script",
]

# --- what is measured ---------------------------------------------------------------------

HISTORY_MESSAGES: Final = 50  # "hot" rows: stored user + assistant messages per session
SATURATING_CONNECTIONS: Final = 32
SATURATING_THREADS: Final = 2
STREAM_CONCURRENCY: Final = 16
DEFAULT_SSE_DELAY_MS: Final = 1.0
FULL_DURATION_S: Final = 10.0
FULL_WARMUP_S: Final = 2.0
QUICK_DURATION_S: Final = 2.0
QUICK_WARMUP_S: Final = 0.0
MAX_GROWTH_TURNS: Final = 5  # hot pool: at most this many turns added per session (estimate)
MIN_POOL: Final = 160  # the skipped sessions (<= connections per run) must stay a minority
MAX_POOL: Final = 20_000
QUICK_MAX_POOL: Final = 400
PREP_CONNECTIONS: Final = 8
OTHER_CPU_NOTE: Final = 0.15  # CPUs used by unrelated processes that earn a row a note

RPS_RATIO_TARGET: Final = 0.5
ADDED_P50_TARGET_US: Final = 1000.0
ADDED_P99_TARGET_US: Final = 3000.0
STREAM_TTFB_TARGET_US: Final = 2000.0

CHAT_PATH: Final = "/v1/chat/completions"
API_KEY: Final = "sk-bench-gateway-0001"
MODEL: Final = "gpt-4o-mini"
TEMPLATE_SESSION: Final = "bench-template"
SSE_DELAY_HEADER: Final = "x-sse-delay-ms"


@dataclass(frozen=True, slots=True)
class RowSpec:
    """One configuration, run against both targets. `identity=False`: no credential, so
    sessiongate passes the request through (both filters still open their streams)."""

    id: str
    kind: str  # json | sse
    connections: int
    threads: int
    history: int  # stored messages per session (0: a new session per request)
    identity: bool = True

    @property
    def label(self) -> str:
        threads = f" t={self.threads}" if self.kind == "json" and self.threads > 1 else ""
        if not self.identity:
            what = "no identity"
        elif self.history == 0:
            what = "new session"
        else:
            what = f"{self.history} msgs hot"
        return f"{'JSON' if self.kind == 'json' else 'SSE'} c={self.connections}{threads}, {what}"


# Every row the benchmark reports, in order.
ROWS: Final = (
    RowSpec("json.c1.h0", "json", 1, 1, 0),
    RowSpec("json.c32.h0", "json", SATURATING_CONNECTIONS, SATURATING_THREADS, 0),
    RowSpec("json.c32.noid", "json", SATURATING_CONNECTIONS, SATURATING_THREADS, 0, identity=False),
    RowSpec("json.c1.h50", "json", 1, 1, HISTORY_MESSAGES),
    RowSpec("json.c32.h50", "json", SATURATING_CONNECTIONS, SATURATING_THREADS, HISTORY_MESSAGES),
    RowSpec("sse.c1.h50", "sse", 1, 1, HISTORY_MESSAGES),
    RowSpec("sse.c16.h50", "sse", STREAM_CONCURRENCY, 1, HISTORY_MESSAGES),
)
ROW_IDS: Final = tuple(row.id for row in ROWS)

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


class BenchError(Exception):
    """A measurement could not run, or did not do what it is named after."""


# --- results ------------------------------------------------------------------------------


@dataclass(slots=True)
class Measurement:
    """One target (baseline or sessiongate) under one row's load. Latencies in µs; for
    streaming rows `latency_us` is the time to the first SSE event."""

    target: str
    requests: int
    errors: int
    duration_s: float
    rps: float
    latency_us: dict[str, float]
    cpu_s: dict[str, float]  # envoy, sessiongate, provider, client, machine_busy_share
    cpu_us_per_request: dict[str, float]  # envoy, sessiongate, provider
    upstream_request_bytes: float  # mean bytes Envoy sent the provider per request
    stream_us: dict[str, float] = field(default_factory=dict)  # SSE: whole stream, gaps
    counters: dict[str, int] = field(default_factory=dict)  # sessiongate's, deltas
    history_messages_mean: float = 0.0  # stored messages served per request (sessiongate)
    note: str = ""


@dataclass(slots=True)
class Comparison:
    """One row: the same load against both targets, and sessiongate relative to baseline."""

    id: str
    label: str
    kind: str  # json | sse
    concurrency: int
    threads: int
    history_messages: int
    identity: bool
    order: list[str]
    baseline: Measurement
    sessiongate: Measurement
    rps_ratio: float
    added_us: dict[str, float]  # p50, p99, p99.9 (latency or time to first event)
    cpu_per_request_ratio: float  # sessiongate process CPU/req / baseline Envoy CPU/req
    envoy_cpu_per_request_ratio: float  # Envoy CPU/req with sessiongate / without
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class Target:
    name: str
    row: str
    value: float
    threshold: float
    unit: str
    status: str  # PASS | MISS


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


def _pool_size(text: str) -> int:
    value = int(text)
    if value < SATURATING_CONNECTIONS:
        raise argparse.ArgumentTypeError(f"at least {SATURATING_CONNECTIONS}")
    return value


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
        help="hot sessions per pool (default: sized from the measured rate so that each "
        f"grows by at most ~{MAX_GROWTH_TURNS} turns)",
    )
    add("--quick", action="store_true", help="short runs (a smoke test, not a measurement)")
    add("--json", dest="json_path", type=Path, default=None, help="also write the results here")
    add(
        "--profile",
        dest="profile_dir",
        type=Path,
        default=None,
        help="after the measurements, run the saturating 50-message load once more under "
        "`py-spy record` (if installed) and write its profile here",
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


# --- CPU accounting -------------------------------------------------------------------------

_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """utime + stime of a live process (all its threads), in seconds."""
    return process_cpu_s_of(Path(f"/proc/{pid}/stat"))


def process_cpu_s_of(stat: Path) -> float:
    """utime + stime from a /proc/.../stat file, in seconds."""
    text = stat.read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_cpu() -> dict[str, int]:
    """Jiffies of the whole machine from /proc/stat: `total`, `busy` (all but idle and
    iowait), and the parts of busy no process is charged for: `irq` (hard and soft
    interrupts: loopback networking runs largely here) and `steal` (the hypervisor)."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]] + [0] * 8
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return {
        "total": total,
        "busy": total - idle - iowait,
        "irq": irq + softirq,
        "steal": steal,
    }


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(p) for p in (task / "children").read_text().split()]
    return out


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
        self, name: str, argv: Sequence[str], log_path: Path, stdout_path: Path | None = None
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


async def start_gateway(procs: Processes, upstream: str, directory: Path, tls: bool) -> Gateway:
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


# --- a small HTTP/1.1 client (prep requests and the streaming rows) -------------------------


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    start_ns: int
    first_byte_ns: int  # first body byte (streaming: the first SSE event)
    end_ns: int


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[Reply] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reset()

    def _reset(self) -> None:
        self.head_done = False
        self.status = 0
        self.length = -1
        self.chunked = False
        self.position = 0
        self.body = bytearray()
        self.start_ns = 0
        self.first_ns = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(BenchError(f"connection lost: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, request: bytes) -> asyncio.Future[Reply]:
        if self.transport is None:
            raise BenchError("connection closed")
        self._reset()
        self.buffer.clear()
        self.waiter = asyncio.get_running_loop().create_future()
        self.start_ns = time.perf_counter_ns()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        self.buffer += data
        try:
            self._parse(now)
        except (ValueError, IndexError) as exc:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(BenchError(f"bad response: {exc}"))
            if self.transport is not None:
                self.transport.close()

    def _parse(self, now: int) -> None:
        buffer = self.buffer
        if not self.head_done:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(buffer[:end]).split(b"\r\n")
            self.status = int(lines[0].split(b" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    self.length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    self.chunked = True
            self.head_done = True
            self.position = end + 4
        if self.chunked:
            while True:
                line_end = buffer.find(b"\r\n", self.position)
                if line_end < 0:
                    return
                size = int(bytes(buffer[self.position : line_end]).split(b";", 1)[0], 16)
                if size == 0:
                    if len(buffer) < line_end + 4:
                        return
                    self._finish(now)
                    return
                start = line_end + 2
                if len(buffer) < start + size + 2:
                    return
                if not self.first_ns:
                    self.first_ns = now
                self.body += buffer[start : start + size]
                self.position = start + size + 2
        else:
            have = len(buffer) - self.position
            if have > 0 and not self.first_ns:
                self.first_ns = now
            if self.length < 0:
                if self.status in (204, 304):
                    self._finish(now)
                return  # read-until-close is not used by Envoy for these replies
            if have >= self.length:
                self.body += buffer[self.position : self.position + self.length]
                self._finish(now)

    def _finish(self, now: int) -> None:
        waiter, self.waiter = self.waiter, None
        reply = Reply(self.status, bytes(self.body), self.start_ns, self.first_ns or now, now)
        self.buffer.clear()
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Client:
    """Requests to one gateway listener over its own keep-alive connections."""

    def __init__(self, port: int, ssl_context: ssl.SSLContext | None) -> None:
        self.port = port
        self.ssl_context = ssl_context
        self.connections: list[_Connection] = []

    async def connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(
            _Connection,
            "127.0.0.1",
            self.port,
            ssl=self.ssl_context,
            server_hostname="127.0.0.1" if self.ssl_context is not None else None,
        )
        self.connections.append(protocol)
        return protocol

    def request_bytes(
        self, body: bytes, session: str, extra: dict[str, str] | None = None
    ) -> bytes:
        headers = {
            "host": f"127.0.0.1:{self.port}",
            "content-type": "application/json",
            "authorization": f"Bearer {API_KEY}",
            "x-session-id": session,
            **(extra or {}),
            "content-length": str(len(body)),
        }
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        return f"POST {CHAT_PATH} HTTP/1.1\r\n{head}\r\n".encode() + body

    async def close(self) -> None:
        for connection in self.connections:
            connection.close()
        for connection in self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(connection.closed), 2)
        self.connections.clear()


async def _request(
    connection: _Connection, request: bytes, what: str, timeout_s: float = 30.0
) -> Reply:
    try:
        reply = await asyncio.wait_for(connection.send(request), timeout_s)
    except TimeoutError:
        raise BenchError(f"{what}: no reply in {timeout_s:g} s") from None
    if reply.status != 200:
        raise BenchError(f"{what}: HTTP {reply.status}: {reply.body[:300]!r}")
    return reply


# --- the run ------------------------------------------------------------------------------


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted samples."""
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _summary_us(samples_ns: Sequence[int]) -> dict[str, float]:
    ordered = sorted(s / 1000 for s in samples_ns)
    if not ordered:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "p99.9": 0.0, "mean": 0.0, "max": 0.0}
    return {
        "p50": _percentile(ordered, 0.50),
        "p90": _percentile(ordered, 0.90),
        "p99": _percentile(ordered, 0.99),
        "p99.9": _percentile(ordered, 0.999),
        "mean": sum(ordered) / len(ordered),
        "max": ordered[-1],
    }


@dataclass
class Side:
    """One target: where to send load and which processes to account."""

    name: str  # baseline | sessiongate
    port: int
    envoy_pid: int
    envoy_admin: str
    sessiongate_pid: int | None = None
    metrics_url: str | None = None


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
        self.ssl_context: ssl.SSLContext | None = None
        self.pool_size = 0
        self.pool_prefix = ""
        self.pool_turns_added = 0  # turns sessiongate stored into the current pool so far
        # Where the next wrk run starts in the pool, and the sessions it must pass over: those
        # that requests wrk aborted at the end of an earlier run may have left with a pending
        # turn (sessiongate would hold their next request for pending_wait_ms).
        self.pool_offset = 0
        self.pool_skip: set[int] = set()
        self.pools: list[dict[str, Any]] = []  # one per pool, for the JSON
        self.machine_extra: dict[str, Any] = {}
        self.printed_header = False
        self.http: aiohttp.ClientSession | None = None

    # --- counters and stats ---

    async def counters(self, side: Side) -> dict[str, int]:
        if side.metrics_url is None:
            return {}
        assert self.http is not None
        async with self.http.get(side.metrics_url) as resp:
            data: dict[str, int] = await resp.json()
        return data

    async def upstream_tx_bytes(self, side: Side) -> int:
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
        snapshot = {
            "envoy": process_cpu_s(side.envoy_pid),
            "provider": process_cpu_s(self.provider_pid),
            "children": children_cpu_s(),
            "self": self_cpu_s(),
            **{f"machine_{name}": float(value) for name, value in machine.items()},
            "wall": time.monotonic(),
        }
        if side.sessiongate_pid is not None:
            snapshot["sessiongate"] = process_cpu_s(side.sessiongate_pid)
        return snapshot

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
        cpu["kernel_irq"] = (after["machine_irq"] - before["machine_irq"]) / _CLK_TCK
        cpu["steal"] = (after["machine_steal"] - before["machine_steal"]) / _CLK_TCK
        # Whatever else ran on the machine meanwhile (other processes' interference).
        known = sum(
            cpu.get(k, 0.0)
            for k in ("envoy", "provider", "client", "sessiongate", "kernel_irq", "steal")
        )
        cpu["other"] = max(0.0, busy / _CLK_TCK - known - (harness if client_is_child else 0.0))
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
        return wrk_script(
            body=chat_body(False),
            session_prefix=self.pool_prefix,
            fresh_sessions=False,
            pool_sessions=self.pool_size,
            threads=spec.threads,
            offset=self.pool_offset,
            skip=self.pool_skip,
            api_key=api_key,
        )

    def _advance_pool(self, spec: RowSpec, result: dict[str, Any]) -> None:
        """After a sessiongate wrk run on the pool: continue the rotation where it stopped, and
        pass over the sessions of the requests that may have been in flight when wrk stopped
        (each connection's last request)."""
        per_thread = spec.connections // spec.threads
        generated = [int(n) for n in result.get("generated", [])]
        for thread, count in enumerate(generated):
            sent = pool_sequence(
                self.pool_offset, thread, spec.threads, self.pool_size, self.pool_skip, count
            )
            self.pool_skip.update(sent[-per_thread:])
        self.pool_offset = (self.pool_offset + sum(generated)) % self.pool_size

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
                self.pool_turns_added += int(warm["requests"])
                self._advance_pool(spec, warm)
        history_before = self._pool_history()
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
            self.pool_turns_added += requests
            self._advance_pool(spec, result)
            history_mean = (history_before + self._pool_history()) / 2
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

    def pool_summary(self) -> None:
        """Record the current pool's final state (for the JSON)."""
        if self.pools:
            self.pools[-1].update(
                turns_added=self.pool_turns_added,
                skipped_sessions=len(self.pool_skip),
                mean_messages_at_end=round(self._pool_history(), 1),
            )

    def _pool_history(self) -> float:
        """Mean stored messages per pool session now (2 per turn)."""
        if not self.pool_size:
            return 0.0
        return HISTORY_MESSAGES + 2 * self.pool_turns_added / self.pool_size

    # --- streaming rows ---

    async def stream_side(self, side: Side, spec: RowSpec) -> Measurement:
        options = self.options
        row_id, concurrency = spec.id, spec.connections
        client = Client(side.port, self.ssl_context)
        body = chat_body(True)
        counter = 0

        def next_session() -> str:
            nonlocal counter
            index = (self.pool_offset + counter) % self.pool_size
            counter += 1
            while index in self.pool_skip:
                index = (self.pool_offset + counter) % self.pool_size
                counter += 1
            return f"{self.pool_prefix}{index}"

        async def worker(
            connection: _Connection, stop_at: float, sink: list[Reply], failures: list[str]
        ) -> None:
            while time.monotonic() < stop_at:
                request = client.request_bytes(body, next_session())
                try:
                    reply = await _request(connection, request, f"{row_id} {side.name}")
                except BenchError as exc:
                    failures.append(str(exc))
                    return
                if not reply.body.endswith(b"data: [DONE]\n\n"):
                    failures.append("stream without data: [DONE]")
                    return
                sink.append(reply)

        async def drive(
            connections: list[_Connection], seconds: float
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
                    self.pool_turns_added += len(warm)
            self.pool_offset = (self.pool_offset + counter) % self.pool_size
            counter = 0
            history_before = self._pool_history()
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
        self.pool_offset = (self.pool_offset + counter) % self.pool_size
        history_mean = 0.0
        if side.sessiongate_pid is not None:
            self.pool_turns_added += requests
            history_mean = (history_before + self._pool_history()) / 2
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

    async def prepare_pool(self, side: Side, size: int, stream: bool, label: str) -> None:
        """A template session with HISTORY_MESSAGES/2 - 1 turns, forked into `size` sessions
        (each fork request stores the last turn)."""
        self.step = f"preparing {size} sessions of {HISTORY_MESSAGES} messages ({label})"
        print(f"  {self.step} ...", end="", flush=True)
        started = time.monotonic()
        tag = uuid.uuid4().hex[:6]
        template = f"{TEMPLATE_SESSION}-{tag}"
        client = Client(side.port, self.ssl_context)
        before = await self.counters(side)
        extra = {SSE_DELAY_HEADER: "0"} if stream else {}
        body = chat_body(stream)
        try:
            connection = await client.connect()
            for turn in range(HISTORY_MESSAGES // 2 - 1):
                await _request(
                    connection,
                    client.request_bytes(body, template, extra),
                    f"template turn {turn + 1}",
                )
            prefix = f"pool-{tag}-"
            queue = iter(range(size))

            async def forker(connection: _Connection) -> None:
                for index in queue:
                    headers = {**extra, "x-session-op": f"fork:{template}"}
                    await _request(
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
        self.pool_size = size
        self.pool_prefix = prefix
        self.pool_turns_added = 0
        self.pool_offset = 0
        self.pool_skip = set()
        self.pools.append({"label": label, "size": size, "prefix": prefix})
        print(f" {time.monotonic() - started:.1f} s", flush=True)

    async def _settle(self, side: Side, since: dict[str, int], timeout_s: float = 10.0) -> None:
        """Wait until every request rewritten since the `since` counters has been captured
        (capture runs after the client has its reply, in observability mode)."""

        def finished(counters: dict[str, int]) -> int:
            return counters.get("capture.completed", 0) + sum(
                v for k, v in counters.items() if k.startswith("capture.abandoned")
            )

        deadline = time.monotonic() + timeout_s
        while True:
            counters = await self.counters(side)
            done = finished(counters) - finished(since)
            rewritten = counters.get("rewrite.injected", 0) - since.get("rewrite.injected", 0)
            if done >= rewritten:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"captures did not catch up: {done} of {rewritten}")
            await asyncio.sleep(0.05)

    def pool_size_for(self, expected_requests: float) -> int:
        if self.options.pool_sessions is not None:
            return self.options.pool_sessions
        size = math.ceil(expected_requests / MAX_GROWTH_TURNS)
        ceiling = QUICK_MAX_POOL if self.options.quick else MAX_POOL
        size = max(MIN_POOL, min(ceiling, size))
        return size + size % SATURATING_THREADS  # threads take disjoint residues

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
        )
        if spec.kind == "sse":
            row.extra["added_event_gap_us_p50"] = (
                gate.stream_us["event_gap_p50"] - base.stream_us["event_gap_p50"]
            )
            row.extra["added_total_us_p50"] = (
                gate.stream_us["total_p50"] - base.stream_us["total_p50"]
            )
        self.rows.append(row)
        self._print_row(row)
        return row

    def _print_row(self, row: Comparison) -> None:
        if not self.printed_header:
            header = _line([name for name, _, _ in _COLUMNS])
            print()
            print(header)
            print("-" * len(header))
            self.printed_header = True
        for measurement in (row.baseline, row.sessiongate):
            is_gate = measurement is row.sessiongate
            vs = ""
            if is_gate:
                vs = (
                    f"x{row.rps_ratio:.2f} rps, +{_fmt_us(row.added_us.get('p50', 0.0))} p50, "
                    f"+{_fmt_us(row.added_us.get('p99', 0.0))} p99"
                )
            sessiongate_cpu = measurement.cpu_us_per_request.get("sessiongate")
            print(
                _line(
                    (
                        row.label if not is_gate else "",
                        measurement.target,
                        f"{measurement.rps:,.0f}",
                        _fmt_us(measurement.latency_us["p50"]),
                        _fmt_us(measurement.latency_us["p99"]),
                        _fmt_us(measurement.latency_us["p99.9"]),
                        _fmt_us(measurement.cpu_us_per_request["envoy"]),
                        _fmt_us(sessiongate_cpu) if sessiongate_cpu is not None else "-",
                        f"{measurement.cpu_s['machine_busy_share']:.0%}",
                        vs,
                    )
                ),
                flush=True,
            )
            if measurement.note:
                print(f"{'':>{_COLUMNS[0][1]}}  ! {measurement.note}", flush=True)


_COLUMNS: Final = (
    ("configuration", 26, "<"),
    ("target", 11, "<"),
    ("req/s", 8, ">"),
    ("p50", 9, ">"),
    ("p99", 9, ">"),
    ("p99.9", 9, ">"),
    ("Envoy CPU/req", 13, ">"),
    ("sg CPU/req", 10, ">"),
    ("busy", 5, ">"),
    ("vs baseline", 40, "<"),
)


def _line(cells: Sequence[str]) -> str:
    return "  ".join(
        f"{cell:{align}{width}}" for cell, (_, width, align) in zip(cells, _COLUMNS, strict=True)
    ).rstrip()


def _fmt_us(us: float) -> str:
    sign = "-" if us < 0 else ""
    us = abs(us)
    if us < 1000:
        return f"{sign}{us:.0f} µs"
    if us < 1_000_000:
        return f"{sign}{us / 1000:.2f} ms"
    return f"{sign}{us / 1_000_000:.2f} s"


# --- targets ------------------------------------------------------------------------------


def judge(rows: Sequence[Comparison]) -> list[Target]:
    by_id = {row.id: row for row in rows}
    targets: list[Target] = []

    def add(name: str, row_id: str, value: float, threshold: float, unit: str, ok: bool) -> None:
        targets.append(Target(name, row_id, value, threshold, unit, "PASS" if ok else "MISS"))

    row = by_id.get("json.c32.h50")
    if row is not None:
        add(
            "req/s with sessiongate >= 50% of plain Envoy (50 msgs hot, c=32)",
            row.id,
            row.rps_ratio,
            RPS_RATIO_TARGET,
            "ratio",
            row.rps_ratio >= RPS_RATIO_TARGET,
        )
    for row_id in ("json.c1.h0", "json.c1.h50"):
        row = by_id.get(row_id)
        if row is None:
            continue
        what = "new session" if row.history_messages == 0 else "50 msgs hot"
        p50, p99 = row.added_us["p50"], row.added_us["p99"]
        add(
            f"added latency p50 < 1 ms (c=1, {what})",
            row.id,
            p50,
            ADDED_P50_TARGET_US,
            "µs",
            p50 < ADDED_P50_TARGET_US,
        )
        add(
            f"added latency p99 < 3 ms (c=1, {what})",
            row.id,
            p99,
            ADDED_P99_TARGET_US,
            "µs",
            p99 < ADDED_P99_TARGET_US,
        )
    row = by_id.get("sse.c1.h50")
    if row is not None:
        p50 = row.added_us["p50"]
        add(
            "streaming added first-event delay p50 < 2 ms (c=1)",
            row.id,
            p50,
            STREAM_TTFB_TARGET_US,
            "µs",
            p50 < STREAM_TTFB_TARGET_US,
        )
    for row_id in ("json.c32.h0", "json.c32.h50"):
        row = by_id.get(row_id)
        if row is None:
            continue
        what = "new session" if row.history_messages == 0 else "50 msgs hot"
        add(
            f"sessiongate CPU/req <= plain Envoy CPU/req (c=32, {what})",
            row.id,
            row.cpu_per_request_ratio,
            1.0,
            "ratio",
            row.cpu_per_request_ratio <= 1.0,
        )
    return targets


def _print_targets(targets: Sequence[Target]) -> None:
    print()
    print("targets (issue 4):")
    for target in targets:
        if target.unit == "ratio":
            value = f"{target.value:.2f} (limit {target.threshold:g})"
        else:
            value = f"{_fmt_us(target.value)} (limit {_fmt_us(target.threshold)})"
        print(f"  {target.status:4}  {target.name}: {value}")
    missed = sum(t.status == "MISS" for t in targets)
    print(f"  {len(targets) - missed} PASS, {missed} MISS")


def _print_notes(rows: Sequence[Comparison], options: Options) -> None:
    print()
    print(
        "req/s and latency: wrk (JSON) or the streaming client (SSE: latency = time to the "
        "first event); CPU/req: utime+stime of the process over the window / requests; "
        "busy: the machine's CPU busy share during the window"
    )
    for row in rows:
        gate, base = row.sessiongate, row.baseline
        parts = [
            f"Envoy CPU/req x{row.envoy_cpu_per_request_ratio:.2f} with sessiongate",
            f"sessiongate CPU/req = {row.cpu_per_request_ratio:.2f} x plain Envoy's",
            f"upstream request {base.upstream_request_bytes:,.0f} -> "
            f"{gate.upstream_request_bytes:,.0f} B",
        ]
        if row.history_messages:
            parts.append(f"history served ~{gate.history_messages_mean:.0f} msgs (mean)")
        if row.kind == "sse":
            parts.append(
                f"stream p50 {_fmt_us(base.stream_us['total_p50'])} -> "
                f"{_fmt_us(gate.stream_us['total_p50'])}, per-event gap "
                f"{row.extra['added_event_gap_us_p50']:+.1f} µs"
            )
        parts.append(
            f"load generator CPU/req {_fmt_us(base.cpu_us_per_request.get('client', 0.0))} / "
            f"{_fmt_us(gate.cpu_us_per_request.get('client', 0.0))}"
        )
        print(f"  {row.label}: {'; '.join(parts)}")


# --- machine ------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _machine(wrk: str) -> dict[str, Any]:
    affinity = getattr(os, "sched_getaffinity", None)
    envoy_version = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        text = subprocess.run(
            [envoy_binary(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
        found = re.search(r"version: \S+?/(\d+\.\d+\.\d+)/", text)
        envoy_version = found.group(1) if found else text.strip()[-60:]
    wrk_version = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10)
        wrk_version = (out.stdout or out.stderr).splitlines()[0].strip()
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(affinity(0)) if affinity is not None else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "uvloop": str(getattr(uvloop, "__version__", "")),
        "envoy": envoy_version,
        "wrk": wrk_version,
        "loadavg_start": list(os.getloadavg()),
    }


# --- profile ------------------------------------------------------------------------------


async def _profile(bench: _Bench, gate: Side, directory: Path) -> dict[str, Any]:
    """The saturating 50-message load once more, with py-spy sampling sessiongate (not one
    of the measured windows: sampling costs the sampled process CPU)."""
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
        "--nonblocking",
        "--format",
        "raw",
        "--output",
        str(raw),
    ]
    spec = next(r for r in ROWS if r.id == "json.c32.h50")
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
    summary["thread_cpu_s"] = {
        name: round(after[name] - before.get(name, 0.0), 3) for name in sorted(after)
    }
    summary["collapsed"] = str(raw)
    await asyncio.to_thread(_write, directory / "summary.json", json.dumps(summary, indent=2))
    return summary


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of a process ("main" is its first thread)."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                name = "main" if task.name == str(pid) else (task / "comm").read_text().strip()
                out[name] = out.get(name, 0.0) + process_cpu_s_of(task / "stat")
    return out


_FRAME_PATH = re.compile(r" \((?:.*/(?:site-packages|lib/python[\d.]+)/)?(.*?)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    """`func (/long/path/site-packages/pkg/mod.py:123)` -> `func (pkg/mod.py)`."""
    return _FRAME_PATH.sub(r" (\1)", frame)


def summarize_collapsed(text: str, top: int = 25) -> dict[str, Any]:
    """Sample shares from py-spy's raw (collapsed) stacks recorded with `--threads`: per
    thread, and for the event loop's thread (MainThread) per function (line numbers merged),
    self and inclusive. Self time in `Runner.run` is native code under the event loop with no
    Python frame of its own: grpc aio's Cython/C core, uvloop, the garbage collector."""
    threads: dict[str, int] = {}
    self_counts: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = main_total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1] if frames[0].startswith("thread (") else "?"
        threads[thread] = threads.get(thread, 0) + count
        if thread != "MainThread":
            continue
        main_total += count
        names = [_frame_name(f) for f in frames[1:]] or ["(no frame)"]
        self_counts[names[-1]] = self_counts.get(names[-1], 0) + count
        for name in set(names):
            inclusive[name] = inclusive.get(name, 0) + count

    def ranked(counts: dict[str, int], of: int) -> list[dict[str, Any]]:
        items = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)[:top]
        return [{"frame": f, "share": round(c / of, 4)} for f, c in items] if of else []

    return {
        "samples": total,
        "threads": ranked(threads, total),
        "main_thread_samples": main_total,
        "self": ranked(self_counts, main_total),
        "inclusive": ranked(inclusive, main_total),
    }


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
    machine = _machine(wrk)
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
    profile: dict[str, Any] | None = None
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    if main_task is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    bench.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    try:
        profile = await _measure_all(bench)
    except asyncio.CancelledError:
        error = f"{bench.step}: interrupted"
        print(f"\nbench gateway: interrupted during {bench.step}", file=sys.stderr, flush=True)
    except (BenchError, OSError, aiohttp.ClientError, KeyError, ValueError) as exc:
        error = f"{bench.step}: {type(exc).__name__}: {exc}"
        print(f"\nbench gateway: error: {error}", file=sys.stderr, flush=True)
    finally:
        await bench.procs.stop_all()
        await bench.http.close()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)
    machine["loadavg_end"] = list(os.getloadavg())
    machine.update(bench.machine_extra)
    targets = judge(bench.rows)
    if bench.rows:
        _print_notes(bench.rows, options)
        _print_targets(targets)
    if profile:
        _print_profile(profile)
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
                "rows": [asdict(spec) for spec in ROWS],
            },
            "targets": [asdict(t) for t in targets],
            "rows": [asdict(row) for row in bench.rows],
            "pools": bench.pools,
            "profile": profile,
            "error": error or None,
        }
        options.json_path.parent.mkdir(parents=True, exist_ok=True)
        options.json_path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 1 if error else 0


def _print_profile(profile: dict[str, Any]) -> None:
    print()
    if "error" in profile:
        print(f"profile: {profile['error']}")
        return
    cpu = profile.get("thread_cpu_s", {})
    total = sum(cpu.values()) or 1.0
    shares = ", ".join(
        f"{name} {seconds:.2f} s ({seconds / total:.0%})"
        for name, seconds in sorted(cpu.items(), key=lambda kv: -kv[1])
        if seconds > 0
    )
    print(
        f"profile of sessiongate under the saturating 50-message load (py-spy, "
        f"{profile['samples']} samples, {profile['collapsed']})"
    )
    print(f"  CPU by thread: {shares}")
    print("  event loop thread, self time (Runner.run = native code under the loop):")
    for item in profile["self"][:10]:
        print(f"    {item['share']:6.1%}  {item['frame']}")
    print("  event loop thread, inclusive:")
    skip = ("<module>", "_run_module", "_run_code", "main (", "cmd_up", "_run (", "run (")
    shown = [i for i in profile["inclusive"] if not i["frame"].startswith(skip)]
    for item in shown[:12]:
        print(f"    {item['share']:6.1%}  {item['frame']}")


async def _measure_all(bench: _Bench) -> dict[str, Any] | None:
    options = bench.options
    directory = bench.directory
    procs = bench.procs
    profile: dict[str, Any] | None = None

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
    bench.step = "starting sessiongate up (JSON)"
    gate, base = await _targets(bench, f"http://127.0.0.1:{provider.port}", directory / "json")
    await _sanity(bench, base, gate, stream=False)
    index = 0
    new_session_rates: dict[int, float] = {}
    for spec in ROWS:
        if spec.kind != "json":
            continue
        if spec.history and not bench.pool_size:
            expected = sum(new_session_rates.values()) * (options.duration_s + options.warmup_s)
            await bench.prepare_pool(gate, bench.pool_size_for(expected), False, "JSON")
        bench.step = f"row {spec.id}"
        results: dict[str, Measurement] = {}
        order = bench._order(index, base, gate)
        for side in order:
            results[side.name] = await bench.wrk_side(side, spec)
        row = bench.add(spec, results, [s.name for s in order])
        if spec.history == 0 and spec.identity:
            new_session_rates[spec.connections] = row.sessiongate.rps
        index += 1
    if options.profile_dir is not None:
        bench.step = "profiling sessiongate"
        profile = await _profile(bench, gate, options.profile_dir)
    bench.pool_summary()
    for child in list(procs.children):
        await procs.stop(child)

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
    gate, base = await _targets(bench, ready.split()[-1], directory / "sse")
    await _sanity(bench, base, gate, stream=True)
    # One stream takes about chunks x delay; the pool covers both rows' streams.
    stream_s = max(0.005, options.sse_chunks * options.sse_delay_ms / 1000)
    expected = (1 + STREAM_CONCURRENCY) / stream_s * (options.duration_s + options.warmup_s)
    await bench.prepare_pool(gate, bench.pool_size_for(expected), True, "SSE")
    for spec in ROWS:
        if spec.kind != "sse":
            continue
        bench.step = f"row {spec.id}"
        results = {}
        order = bench._order(index, base, gate)
        for side in order:
            results[side.name] = await bench.stream_side(side, spec)
        bench.add(spec, results, [s.name for s in order])
        index += 1
    bench.pool_summary()
    for child in list(procs.children):
        await procs.stop(child)
    return profile


async def _targets(bench: _Bench, upstream: str, directory: Path) -> tuple[Side, Side]:
    """`sessiongate up` against `upstream`, and plain Envoy from its bootstrap minus
    sessiongate."""
    tls = bench.options.tls
    gateway = await start_gateway(bench.procs, upstream, directory / "sessiongate", tls)
    if tls:
        bench.ssl_context = ssl.create_default_context(
            cafile=str(directory / "sessiongate" / "tls" / "ca.pem")
        )
    bench.step = "starting plain Envoy (baseline)"
    plain = await start_envoy(
        bench.procs,
        "baseline envoy",
        baseline_bootstrap(gateway.envoy_config()),
        directory / "baseline",
        "llm",
    )
    gate = Side(
        "sessiongate",
        gateway.port,
        gateway.envoy_pid,
        gateway.envoy_admin,
        gateway.child.pid,
        gateway.metrics_url,
    )
    base = Side("baseline", plain.port, plain.pid, plain.admin)
    return gate, base


async def _sanity(bench: _Bench, base: Side, gate: Side, stream: bool) -> None:
    """One request through each target: a 200 with the provider's reply, and sessiongate
    rewrote and captured it (its counters say so)."""
    bench.step = "sanity requests"
    before = await bench.counters(gate)
    for side in (base, gate):
        client = Client(side.port, bench.ssl_context)
        try:
            connection = await client.connect()
            session = f"sanity-{uuid.uuid4().hex[:8]}"
            for _ in range(2):  # the second request carries the first turn as history
                reply = await _request(
                    connection,
                    client.request_bytes(chat_body(stream), session),
                    f"sanity request to {side.name}",
                )
                expected = b"data: [DONE]" if stream else b'"chat.completion"'
                if expected not in reply.body:
                    raise BenchError(f"{side.name}: unexpected reply {reply.body[:200]!r}")
        finally:
            await client.close()
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
