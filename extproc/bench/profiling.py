"""Summaries of py-spy's raw (collapsed) stacks, for `sessiongate bench gateway --profile`."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["summarize_collapsed"]

_FRAME_PATH = re.compile(r" \((?:.*/(?:site-packages|lib/python[\d.]+)/)?(.*?)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    """`func (/long/path/site-packages/pkg/mod.py:123)` -> `func (pkg/mod.py)`."""
    return _FRAME_PATH.sub(r" (\1)", frame)


def summarize_collapsed(text: str, top: int = 25) -> dict[str, Any]:
    """Sample shares from py-spy's raw (collapsed) stacks recorded with `--threads --gil`
    (only samples holding the GIL, so an idle loop does not count): per thread, and for the
    event loop's thread (MainThread) per function (line numbers merged), self and inclusive.
    Self time in `Runner.run` is native code under the event loop with no Python frame of its
    own: uvloop's callbacks, grpc aio's Cython/C core, the garbage collector."""
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
