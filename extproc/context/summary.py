"""Rolling summaries of the turns the window left out, produced off the request path.

A request whose history had to be cut asks for a summary of the turns before its cut (`want`);
a background task makes it while requests go on, and the next request of the session that finds
it ready (`ready`) injects it as one system message after the system prompt and before the key
facts, within `context_summary_share` of the prompt. No request ever waits for a summary: until
one is ready (or when producing it failed) requests simply go without.

Rolling: a summary covers turns [0, covered); when the cut moves on, only the turns in between
are summarised and merged into the previous summary.

- Extractive (the default, no model call): per turn, the first sentence of the user's message
  and of the assistant's reply, deduplicated; the newest lines that fit the share are injected.
- A configured summarizer (`context_summarizer_url`, an OpenAI-compatible base URL, with
  `context_summarizer_model` and the bearer key in `context_summarizer_api_key_file`): sessiongate
  calls it directly with aiohttp (never through Envoy, so the call is never recorded into any
  session) with the previous summary and the new turns, and injects its answer. When it fails or
  times out, the extractive summary of the same turns is used instead (`context.summary.failed`).

Summaries are kept per process (LRU, `MAX_SESSIONS`), checked against the session's turn ids
(a cleared, rewound or forked session does not get a stale summary). Persisting them in the
store's `derived` document would let replicas share them; the store has no API for that yet.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from extproc.tokens import TOKENS_PER_MESSAGE, count_message, count_text
from store.model import Message, Turn

log = logging.getLogger(__name__)

HEADER = "Summary of earlier parts of this conversation (older messages not shown):"
EXTRACTIVE = "extractive"
LLM = "llm"
MAX_LINE_CHARS = 200
MIN_LINE_CHARS = 40
MAX_LINES = 400  # per session; the oldest go first
MAX_SESSIONS = 10_000
MAX_CONCURRENT = 4  # summarizer calls in flight per process
MAX_INPUT_CHARS = 24_000  # new material sent to the summarizer per call
YIELD_EVERY = 256  # extractive turns between two yields to the event loop

_SENTENCE = re.compile(r"\s*([^.!?\n]+[.!?]?)")
_PROMPT = (
    "You maintain a running summary of a conversation between a user and an assistant. "
    "Merge the new messages into the current summary. Keep names, numbers, dates, decisions, "
    "preferences and open questions; drop small talk. Answer with the summary only, as short "
    "lines, at most {words} words."
)

Inc = Callable[[str, int], None]


def _text(message: Message) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def first_sentence(text: str) -> str:
    """The opening sentence, or sentences while they are shorter than `MIN_LINE_CHARS` (a
    "Hi." or "Turn 3." says nothing on its own), clipped to `MAX_LINE_CHARS`."""
    taken: list[str] = []
    size = 0
    for found in _SENTENCE.finditer(text.strip()):
        sentence = " ".join(found[1].split())
        if not sentence:
            continue
        taken.append(sentence)
        size += len(sentence) + 1
        if size >= MIN_LINE_CHARS or len(taken) == 3:
            break
    line = " ".join(taken)
    if len(line) > MAX_LINE_CHARS:
        line = line[: MAX_LINE_CHARS - 3] + "..."
    return line


def turn_lines(turn: Turn) -> list[str]:
    """The turn's extractive lines: what the user said first, and the reply's first sentence."""
    lines = []
    for message in turn.request_messages:
        if message.get("role") == "user":
            sentence = first_sentence(_text(message))
            if sentence:
                lines.append(f"User: {sentence}")
            break
    reply = first_sentence(_text(turn.response_message))
    if reply:
        lines.append(f"Assistant: {reply}")
    return lines


@dataclass(slots=True)
class Summary:
    first_id: str  # turn id of the session's first turn
    last_id: str  # turn id of the last turn covered
    covered: int  # turns [0, covered) are summarised
    lines: list[str]
    tokens: list[int]  # per line, as `- line` plus its newline
    source: str = EXTRACTIVE
    seen: set[str] = field(default_factory=set)
    memo: dict[int, tuple[Message | None, int]] = field(default_factory=dict)

    def valid_for(self, history: Sequence[Turn]) -> bool:
        n = self.covered
        return (
            0 < n <= len(history)
            and history[0].turn_id == self.first_id
            and history[n - 1].turn_id == self.last_id
        )

    @property
    def total_tokens(self) -> int:
        return header_tokens() + sum(self.tokens)

    def message(self, cap: int, role: str = "system") -> tuple[Message | None, int]:
        """The newest lines that fit `cap` tokens as one message, and its tokens (memoised)."""
        found = self.memo.get(cap)
        if found is not None and (found[0] is None or found[0].get("role") == role):
            return found
        total, start = header_tokens(), len(self.lines)
        while start > 0 and total + self.tokens[start - 1] <= cap:
            start -= 1
            total += self.tokens[start]
        result: tuple[Message | None, int] = (None, 0)
        while start < len(self.lines):
            body = "\n".join(f"- {line}" for line in self.lines[start:])
            message: Message = {"role": role, "content": f"{HEADER}\n{body}"}
            tokens = count_message(message)
            if tokens <= cap:
                result = (message, tokens)
                break
            start += 1
        if len(self.memo) > 8:
            self.memo.clear()
        self.memo[cap] = result
        return result


def header_tokens() -> int:
    return TOKENS_PER_MESSAGE + 1 + count_text(HEADER)


def _line_tokens(line: str) -> int:
    return count_text(line) + 2


def _key(line: str) -> str:
    return " ".join(line.lower().split())


def extend_extractive(lines: list[str], seen: set[str], turns: Sequence[Turn]) -> None:
    """Add the turns' new lines (in place), the oldest going past `MAX_LINES`."""
    for turn in turns:
        for line in turn_lines(turn):
            key = _key(line)
            if key not in seen:
                seen.add(key)
                lines.append(line)
    if len(lines) > MAX_LINES:
        del lines[: len(lines) - MAX_LINES]


@dataclass(frozen=True, slots=True)
class SummarizerConfig:
    url: str  # OpenAI-compatible base URL: requests go to <url>/chat/completions
    model: str
    api_key: str = ""
    timeout_s: float = 30.0


class LLMSummarizer:
    """Calls an OpenAI-compatible chat endpoint directly (not through Envoy)."""

    def __init__(self, config: SummarizerConfig) -> None:
        self.config = config
        self.endpoint = config.url.rstrip("/") + "/chat/completions"
        self._semaphore: asyncio.Semaphore | None = None

    async def summarize(self, previous: str, new_material: str, max_tokens: int) -> str:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(MAX_CONCURRENT)
        words = max(20, int(max_tokens * 0.7))
        user = f"Current summary:\n{previous or '(none)'}\n\nNew messages:\n{new_material}"
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": [
                {"role": "system", "content": _PROMPT.format(words=words)},
                {"role": "user", "content": user},
            ],
            "max_tokens": max(32, max_tokens),
            "temperature": 0,
        }
        headers = {"content-type": "application/json"}
        if self.config.api_key:
            headers["authorization"] = f"Bearer {self.config.api_key}"
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        async with (
            self._semaphore,
            aiohttp.ClientSession(timeout=timeout) as http,
            http.post(self.endpoint, json=body, headers=headers) as reply,
        ):
            if reply.status != 200:
                raise RuntimeError(f"summarizer answered {reply.status}")
            data = await reply.json(content_type=None)
        content = data["choices"][0]["message"]["content"]
        if not isinstance(content, str) or not content.strip():
            raise RuntimeError("summarizer answered no text")
        return content.strip()


def _transcript(turns: Sequence[Turn]) -> str:
    """The new turns for the summarizer: each message clipped, the newest kept when too long."""
    parts: list[str] = []
    size = 0
    for turn in reversed(turns):
        for message in reversed(turn.messages()):
            text = " ".join(_text(message).split())
            if not text:
                continue
            line = f"{message.get('role', '?')}: {text[:1000]}"
            size += len(line) + 1
            if size > MAX_INPUT_CHARS:
                return "\n".join(reversed(parts))
            parts.append(line)
    return "\n".join(reversed(parts))


def _noop(name: str, value: int) -> None:
    return None


class Summaries:
    """Per-process summaries by session, and the background tasks that produce them."""

    def __init__(
        self,
        summarizer: LLMSummarizer | None = None,
        inc: Inc | None = None,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self.summarizer = summarizer
        self.inc: Inc = inc or _noop
        self.max_sessions = max_sessions
        self._items: OrderedDict[str, Summary] = OrderedDict()
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def ready(self, session_key: str, history: Sequence[Turn]) -> Summary | None:
        found = self._items.get(session_key)
        if found is None:
            return None
        if not found.valid_for(history):
            del self._items[session_key]
            return None
        self._items.move_to_end(session_key)
        return found

    def want(self, session_key: str, history: Sequence[Turn], upto: int, cap: int) -> bool:
        """Ask for a summary of turns [0, upto) in the background; True when one was started."""
        if upto <= 0 or session_key in self._tasks:
            return False
        previous = self.ready(session_key, history)
        if previous is not None and previous.covered >= upto:
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        start = previous.covered if previous is not None else 0
        turns = list(history[start:upto])
        first_id = history[0].turn_id
        task = loop.create_task(self._produce(session_key, first_id, previous, turns, cap))
        self._tasks[session_key] = task
        task.add_done_callback(lambda t: self._done(session_key, t))
        return True

    def _done(self, session_key: str, task: asyncio.Task[None]) -> None:
        self._tasks.pop(session_key, None)
        if not task.cancelled() and task.exception() is not None:
            log.warning("summary of a session failed: %s", task.exception())

    async def _produce(
        self,
        session_key: str,
        first_id: str,
        previous: Summary | None,
        turns: list[Turn],
        cap: int,
    ) -> None:
        covered = (previous.covered if previous else 0) + len(turns)
        lines: list[str] = []
        seen: set[str] = set()
        source = EXTRACTIVE
        if self.summarizer is not None:
            try:
                text = await self.summarizer.summarize(
                    "\n".join(previous.lines) if previous else "", _transcript(turns), cap
                )
                lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
                lines = [line.lstrip("-*• ").strip() or line for line in lines][-MAX_LINES:]
                source = LLM
            except Exception as exc:  # the extractive summary instead
                log.warning("summarizer failed (%s): %s", type(exc).__name__, exc)
                self.inc("context.summary.failed", 1)
        if source == EXTRACTIVE:  # rolled on from the previous summary, whatever made it
            lines = list(previous.lines) if previous else []
            seen = set(previous.seen) if previous else set()
            for i in range(0, len(turns), YIELD_EVERY):
                extend_extractive(lines, seen, turns[i : i + YIELD_EVERY])
                await asyncio.sleep(0)
        if not lines:
            return
        summary = Summary(
            first_id,
            turns[-1].turn_id,
            covered,
            lines,
            [_line_tokens(line) for line in lines],
            source,
            seen,
        )
        self._items[session_key] = summary
        self._items.move_to_end(session_key)
        while len(self._items) > self.max_sessions:
            self._items.popitem(last=False)
        self.inc(f"context.summary.produced.{source}", 1)

    async def drain(self) -> None:
        """Wait for the summaries in production (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    def forget(self, session_key: str) -> None:
        self._items.pop(session_key, None)

    def __len__(self) -> int:
        return len(self._items)
