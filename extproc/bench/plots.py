"""PNG plots of `sessiongate bench gateway --plots DIR` (matplotlib, an optional dependency).

- `gateway-latency-vs-load.png`: p50 and p99 latency against offered concurrency (wrk
  connections 1, 4, 16, 32, 64) on 50-message hot sessions, plain Envoy and Envoy +
  sessiongate, with the requests/s reached beside it.
- `gateway-added-latency-vs-session-size.png`: what sessiongate adds to p50 and p99 at
  concurrency 1 for a new session and for 50, 500 and 10,000 stored messages (hot).

The series come from the rows by `load_series` and `size_series` (pure, tested); `write_plots`
draws them. matplotlib is imported only there (`pip install matplotlib`).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from extproc.bench.report import Comparison

__all__ = [
    "LOAD_FILE",
    "SIZE_FILE",
    "LoadPoint",
    "PlotError",
    "SizePoint",
    "load_series",
    "size_series",
    "write_plots",
]

LOAD_FILE: Final = "gateway-latency-vs-load.png"
SIZE_FILE: Final = "gateway-added-latency-vs-session-size.png"
LOAD_HISTORY: Final = 50
INSTALL_HINT: Final = "pip install matplotlib"


class PlotError(Exception):
    """The plots could not be drawn (matplotlib missing, no data)."""


@dataclass(frozen=True, slots=True)
class LoadPoint:
    concurrency: int
    rps: float
    p50_us: float
    p99_us: float


@dataclass(frozen=True, slots=True)
class SizePoint:
    history: int
    added_p50_us: float
    added_p99_us: float
    injected: float  # mean messages actually sent upstream


def load_series(rows: Sequence[Comparison]) -> dict[str, list[LoadPoint]]:
    """Per target (baseline, sessiongate): the JSON rows on 50-message hot sessions, by
    concurrency."""
    chosen = sorted(
        (
            r
            for r in rows
            if r.kind == "json"
            and r.identity
            and r.tier == "hot"
            and r.history_messages == LOAD_HISTORY
        ),
        key=lambda r: r.concurrency,
    )
    out: dict[str, list[LoadPoint]] = {"baseline": [], "sessiongate": []}
    for row in chosen:
        for name, m in (("baseline", row.baseline), ("sessiongate", row.sessiongate)):
            out[name].append(
                LoadPoint(row.concurrency, m.rps, m.latency_us["p50"], m.latency_us["p99"])
            )
    return out


def size_series(rows: Sequence[Comparison]) -> list[SizePoint]:
    """sessiongate's added latency at concurrency 1 by stored messages (hot, JSON)."""
    chosen = sorted(
        (
            r
            for r in rows
            if r.kind == "json" and r.identity and r.tier == "hot" and r.concurrency == 1
        ),
        key=lambda r: r.history_messages,
    )
    return [
        SizePoint(
            r.history_messages,
            r.added_us.get("p50", 0.0),
            r.added_us.get("p99", 0.0),
            r.sessiongate.injected_messages_mean,
        )
        for r in chosen
    ]


def size_label(history: int) -> str:
    return "new session" if history == 0 else f"{history:,} msgs"


def _matplotlib() -> Any:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        raise PlotError(f"matplotlib is not installed ({INSTALL_HINT}); no plots") from None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def write_plots(rows: Sequence[Comparison], directory: Path, subtitle: str = "") -> list[Path]:
    """Draw both plots into `directory`; returns the files written."""
    load = load_series(rows)
    sizes = size_series(rows)
    if not load["sessiongate"] and not sizes:
        raise PlotError("no rows to plot")
    plt = _matplotlib()
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if load["sessiongate"]:
        written.append(_plot_load(plt, load, directory / LOAD_FILE, subtitle))
    if sizes:
        written.append(_plot_sizes(plt, sizes, directory / SIZE_FILE, subtitle))
    return written


_COLORS: Final = {"baseline": "#4c72b0", "sessiongate": "#dd8452"}
_NAMES: Final = {"baseline": "plain Envoy", "sessiongate": "Envoy + sessiongate"}


def _plot_load(plt: Any, load: dict[str, list[LoadPoint]], path: Path, subtitle: str) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8), layout="constrained")
    ticks = sorted({p.concurrency for points in load.values() for p in points})
    for name, points in load.items():
        if not points:
            continue
        xs = [p.concurrency for p in points]
        color = _COLORS[name]
        left.plot(
            xs, [p.p50_us / 1000 for p in points], "o-", color=color, label=f"{_NAMES[name]} p50"
        )
        left.plot(
            xs, [p.p99_us / 1000 for p in points], "s--", color=color, label=f"{_NAMES[name]} p99"
        )
        right.plot(xs, [p.rps for p in points], "o-", color=color, label=_NAMES[name])
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(ticks)
        axis.set_xticklabels([str(t) for t in ticks])
        axis.set_xlabel("offered concurrency (wrk connections)")
        axis.grid(True, which="major", alpha=0.3)
    left.set_yscale("log")
    ticker = importlib.import_module("matplotlib.ticker")
    left.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    left.set_ylabel("latency (ms, log scale)")
    left.set_title("latency against load")
    # Below both panels: inside, it would cover a line wherever it went.
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=8)
    right.set_ylabel("requests/s")
    right.set_ylim(bottom=0)
    right.set_title("throughput reached")
    right.legend(fontsize=8)
    fig.suptitle(
        "Chat completions (JSON), 50-message hot sessions" + (f"\n{subtitle}" if subtitle else ""),
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_sizes(plt: Any, sizes: list[SizePoint], path: Path, subtitle: str) -> Path:
    ticker = importlib.import_module("matplotlib.ticker")
    fig, axis = plt.subplots(figsize=(8, 4.8), layout="constrained")
    positions = list(range(len(sizes)))
    width = 0.38
    # Log scale: a p99 stall of hundreds of ms next to a p50 of 1 ms. Bars start at the
    # floor; one at or below it (noise: sessiongate faster than plain Envoy) is drawn there.
    floor_ms = 0.1
    for offset, key, label, color in (
        (-width / 2, "added_p50_us", "added p50", "#dd8452"),
        (width / 2, "added_p99_us", "added p99", "#c44e52"),
    ):
        values = [getattr(p, key) / 1000 for p in sizes]
        bars = axis.bar(
            [x + offset for x in positions],
            [max(v, floor_ms) - floor_ms for v in values],
            width,
            bottom=floor_ms,
            label=label,
            color=color,
        )
        for bar, value in zip(bars, values, strict=True):
            axis.annotate(
                f"{value:.2f} ms" if abs(value) < 10 else f"{value:.0f} ms",
                (bar.get_x() + bar.get_width() / 2, max(value, floor_ms)),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
    axis.set_yscale("log")
    axis.set_ylim(bottom=floor_ms)
    axis.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_xticks(positions)
    axis.set_xticklabels(
        [
            size_label(p.history)
            + (f"\n({p.injected:,.0f} injected)" if p.history and p.injected else "")
            for p in sizes
        ]
    )
    axis.set_xlabel("stored messages per session (hot tier), concurrency 1")
    axis.set_ylabel("added latency vs plain Envoy (ms, log scale)")
    axis.grid(True, axis="y", which="major", alpha=0.3)
    axis.legend(fontsize=8, loc="upper left")
    axis.set_title(
        "What sessiongate adds, by session size" + (f"\n{subtitle}" if subtitle else ""),
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
