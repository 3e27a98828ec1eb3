"""Per request: fit the session's history into the model's context window.

Injection order (DESIGN, context rules): the system prompt (the request's own system/developer
messages, else the session's pinned one: counted once, never both), then the principal's user
context (`user`: preferences and settings, one system message within `user_share`), then the
rolling summary of
the turns left out (`summary`, produced in the background, within `summary_share`), then their
key facts (`facts`, one system message within `facts_share` of the prompt), then history, then
the request's new messages. Which history: the strategy (`strategy`: `auto` picks by query
kind and phase) is the sliding window (`window.select`), or relevance (`relevance`: the newest
turns within the rest of `relevance_share`, then the older turns most relevant to the query in
that share, chronological order restored), or for a tool loop the window with the whole recent
exchange. What is dropped, in order: the oldest (or least relevant) history turns, then, when a
tool exchange needs their room, the user context, then the summary and facts together, then the
pinned system prompt. The user context is reserved before history (history is cut to make room
for it, as for the summary and facts) because it is small, bounded by its share and the same on
every turn (a stable prefix for prompt caches); it goes whole when it does not fit its share or
what the request leaves, and first among the extra system messages when a tool exchange needs
room, since it is about the principal, the summary and facts about this very conversation. A
request
that does not fit even on its own is sent unchanged: sessiongate never makes a request exceed
the window, and never hides that a client's own request does (`request_exceeds_window`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extproc.context import budget as budgets
from extproc.context import facts as key_facts
from extproc.context import relevance as rel
from extproc.context import strategy as strategies
from extproc.context.models import ModelTable
from extproc.context.summary import Inc, LLMSummarizer, Summaries, SummarizerConfig, Summary
from extproc.context.window import (
    RELEVANCE,
    HistoryIndex,
    HistoryIndexCache,
    Selection,
    TurnInfo,
    select,
    starts_clean,
    turn_starts_clean,
)
from extproc.protocols.wire import TurnCache
from extproc.tokens import ENCODING_NAME, count_message, counts_key
from store.model import Message, Turn

# Outcomes, as reported in metrics and dynamic metadata.
FIT = "fit"  # all history injected
TRIMMED = "trimmed"  # some history left out
REQUEST_EXCEEDS_WINDOW = "request_exceeds_window"  # the client's request alone is too big
SYSTEM_DROPPED = "pinned_system_dropped"  # only the request fits, without the pinned prompt
TOOL_EXCHANGE_TOO_LARGE = "tool_exchange_too_large"  # the calls the request answers do not fit
DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class ContextSettings:
    enabled: bool = True
    default_window: int = 32768
    output_tokens: int = 4096
    reasoning_output_tokens: int = 25_000
    step: float = 0.2
    max_messages: int = 0
    image_tokens: int = 765
    facts_share: float = 0.1  # at most this fraction of the prompt (less its system prompt)
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    strategy: str = strategies.AUTO  # auto | window | relevance
    relevance_share: float = 0.7  # of the history budget, for relevance-picked older turns
    summary_share: float = 0.0  # of the prompt (less its system prompt), for the summary; 0: off
    summarizer_url: str = ""  # OpenAI-compatible base URL; empty: extractive summaries
    summarizer_model: str = "gpt-4o-mini"
    summarizer_api_key_file: str = ""
    summarizer_timeout_s: float = 30.0
    user_share: float = 0.05  # of the prompt (less its system prompt), for the user context


@dataclass(frozen=True, slots=True)
class UserContextMessage:
    """The principal's user context, rendered once per document (byte-identical while it is
    unchanged) with its token count."""

    message: Message
    tokens: int


@dataclass(frozen=True, slots=True)
class ContextPlan:
    outcome: str
    system: tuple[Message, ...]  # the system messages the body starts with
    turns: Sequence[Turn]  # the history to inject, oldest first
    window: int = 0
    reserved_output: int = 0
    available: int = 0  # history tokens available within the budget
    injected: int = 0  # history tokens injected
    prompt_tokens: int = 0  # the whole prompt as counted (request + injected)
    total_turns: int = 0
    dropped: Mapping[str, int] = field(default_factory=dict)  # turns left out, by strategy
    facts: int = 0  # key facts injected (in the last message of `system`)
    facts_tokens: int = 0
    strategy: str = ""  # applied: window | relevance | tool_loop
    query: str = ""  # the query's kind: recall | follow_up | tool_loop | other
    summary_tokens: int = 0  # the summary message injected (0: none)
    relevant_turns: int = 0  # older turns relevance brought back
    user_tokens: int = 0  # the user-context message injected (0: none)
    margin: float = 0.0  # the safety margin the budget applied to our token counts

    @property
    def unchanged(self) -> bool:
        """Send the client's body exactly as it came: nothing injected."""
        return self.outcome in (REQUEST_EXCEEDS_WINDOW, SYSTEM_DROPPED, TOOL_EXCHANGE_TOO_LARGE)

    @property
    def dropped_turns(self) -> int:
        return sum(self.dropped.values())


class ContextManager:
    """Shared per process. Token counts are cached per turn (keyed by encoding) and per session
    (prefix sums), so a request costs its own messages' counting plus a bisect."""

    def __init__(
        self,
        settings: ContextSettings,
        inc: Inc | None = None,
        *,
        extract_facts: bool | None = None,
    ) -> None:
        """`extract_facts`: scan turns for key facts (default: `settings.facts_share > 0`).
        With per-route or per-tenant settings, true when any of them uses facts: the turn
        cache is shared by every policy, so what it holds cannot depend on the request."""
        self.settings = settings
        self.extract_facts = settings.facts_share > 0 if extract_facts is None else extract_facts
        self.models = ModelTable(settings.models, settings.default_window)
        # Tables of policies whose default window differs (their `models` are the global ones).
        self._models_by_window: dict[int, ModelTable] = {settings.default_window: self.models}
        self.encoding = ENCODING_NAME
        self.turn_info = TurnCache(self._turn_info, max_size=500_000)
        self.indexes = HistoryIndexCache(self.turn_info.get)
        summarizer = None
        if settings.summarizer_url:
            key_file = settings.summarizer_api_key_file
            summarizer = LLMSummarizer(
                SummarizerConfig(
                    settings.summarizer_url,
                    settings.summarizer_model,
                    Path(key_file).read_text().strip() if key_file else "",
                    settings.summarizer_timeout_s,
                )
            )
        self.summaries = Summaries(summarizer, inc)

    def _turn_info(self, turn: Turn) -> TurnInfo:
        image = self.settings.image_tokens
        messages = turn.messages()
        # Counted at capture and stored with the turn (the first request after a restart on a
        # 10,000-message session would otherwise tokenize it all on the event loop).
        tokens = turn.token_counts.get(counts_key(image))
        if tokens is None:
            tokens = sum(count_message(m, image) for m in messages)
        return TurnInfo(
            tokens=tokens,
            messages=len(messages),
            clean_start=turn_starts_clean(turn),
            has_system=bool(turn.system_messages),
            facts=self._turn_facts(turn) if self.extract_facts else (),
        )

    @staticmethod
    def _turn_facts(turn: Turn) -> tuple[key_facts.Fact, ...]:
        # Extracted at capture and stored with the turn, like its token count: scanning a
        # session's turns cost ~27 µs each on its first read in a process (~0.3 s for 10,000).
        found = key_facts.stored_facts(turn)
        return found if found is not None else key_facts.turn_facts(turn)

    def plan(
        self,
        session_key: str,
        body: Mapping[str, Any],
        model: str,
        system_messages: tuple[Message, ...],
        new_messages: tuple[Message, ...],
        history: Sequence[Turn],
        strategy: str = "",
        settings: ContextSettings | None = None,
        user: UserContextMessage | None = None,
    ) -> ContextPlan:
        """`strategy`: the request's own choice (header), else `settings.strategy`.
        `settings`: the request's policy (default: the global settings); the caches (turn
        info, history indexes, facts, summaries) are shared by every policy. `user`: the
        principal's user context, injected within `user_share`."""
        s = settings or self.settings
        index = self.indexes.index(f"{self.encoding}\0{session_key}", history)
        pinned: tuple[Message, ...] = ()
        if not system_messages and index.last_system >= 0:
            pinned = history[index.last_system].system_messages
        system = system_messages or pinned
        n = index.n
        query = strategies.classify(new_messages, history[-1] if history else None)
        applied = strategies.choose(strategy or s.strategy, query)
        if not s.enabled:
            return ContextPlan(
                DISABLED, system, history, total_turns=n, strategy=applied, query=query
            )
        limits = self._models(s).lookup(model)
        budget = budgets.compute(
            body,
            limits,
            own_messages=(*system_messages, *new_messages),
            injected_system=pinned,
            default_output=s.output_tokens,
            reasoning_output=s.reasoning_output_tokens,
            image_tokens=s.image_tokens,
        )
        common: dict[str, Any] = {
            "margin": budget.margin,
            "window": limits.window,
            "reserved_output": budget.reserved_output,
            "total_turns": n,
            "strategy": applied,
            "query": query,
        }
        if budget.history < 0:
            outcome = SYSTEM_DROPPED if budget.request_fits else REQUEST_EXCEEDS_WINDOW
            return ContextPlan(
                outcome,
                system_messages,
                (),
                prompt_tokens=budget.request,
                dropped={"window_tokens": n} if n else {},
                **common,
            )
        # Shares are of what the window leaves besides the system prompt, not of the history
        # budget, so they do not move with the size of each request (nor their messages).
        share_base = budget.usable - budget.system
        user_tokens = 0
        # Whole or not at all: never more than its share or than the request leaves.
        if user is not None and user.tokens <= min(int(share_base * s.user_share), budget.history):
            user_tokens = user.tokens
        room = budget.history - user_tokens
        facts_cap = 0
        must_cut = index.tokens[n] > room or (
            s.max_messages > 0 and index.messages[n] > s.max_messages
        )
        if s.facts_share > 0 and index.facts and must_cut:
            # History must be cut, so the facts of the turns cut may be needed: reserve their
            # share up front, never more than all the session's facts take.
            share = int(share_base * s.facts_share)
            everything = key_facts.header_tokens() + self._facts_total(index)
            facts_cap = max(0, min(share, everything, room))
        summary: Summary | None = None
        summary_cap = 0
        if s.summary_share > 0 and must_cut:
            summary = self.summaries.ready(session_key, history)
            if summary is not None:
                share = int(share_base * s.summary_share)
                summary_cap = max(0, min(share, summary.total_tokens, room - facts_cap))
        must_keep_last = not starts_clean(new_messages)
        chosen, older = self._select(
            s, index, history, room - facts_cap - summary_cap, applied, must_keep_last, new_messages
        )
        if not chosen.fits and user_tokens:
            # The tool exchange in progress outranks the user context (dropped first)...
            user_tokens, room = 0, budget.history
            chosen, older = self._select(
                s,
                index,
                history,
                room - facts_cap - summary_cap,
                applied,
                must_keep_last,
                new_messages,
            )
        if not chosen.fits and (facts_cap or summary_cap):
            # ... and the summary and the facts.
            facts_cap = summary_cap = 0
            chosen, older = self._select(
                s, index, history, room, applied, must_keep_last, new_messages
            )
        if not chosen.fits:
            return ContextPlan(
                TOOL_EXCHANGE_TOO_LARGE,
                system_messages,
                (),
                available=budget.history,
                prompt_tokens=budget.request,
                dropped=chosen.dropped,
                **common,
            )
        role = system[0].get("role", "system") if system else "system"
        if user_tokens and user is not None:
            message = user.message
            system = (
                *system,
                message if message.get("role") == role else {**message, "role": role},
            )
        summary_message, summary_tokens = None, 0
        if (
            summary is not None
            and summary_cap
            and chosen.start
            and (applied == strategies.RELEVANCE or summary.covered <= chosen.start)
        ):
            summary_message, summary_tokens = summary.message(summary_cap, role)
        if summary_message is not None:
            system = (*system, summary_message)
        if s.summary_share > 0 and chosen.start and applied != strategies.RELEVANCE:
            # Off the request path: a later request of the session uses it when it is ready.
            self.summaries.want(
                session_key, history, chosen.start, int(share_base * s.summary_share)
            )
        facts_message, facts_tokens = None, 0
        if facts_cap and chosen.start:
            facts_message, facts_tokens = self._facts(index, chosen.start, facts_cap)
        if facts_message is not None:
            system = (*system, {**facts_message, "role": role})
        turns: Sequence[Turn] = history[chosen.start :]
        if older:
            turns = [*(history[i] for i in older), *turns]
        return ContextPlan(
            TRIMMED if len(turns) < n else FIT,
            system,
            turns,
            available=budget.history,
            injected=chosen.tokens,
            prompt_tokens=(
                budget.request
                + budget.system
                + user_tokens
                + summary_tokens
                + facts_tokens
                + chosen.tokens
            ),
            dropped=chosen.dropped,
            facts=len(facts_message["content"].splitlines()) - 1 if facts_message else 0,
            facts_tokens=facts_tokens,
            summary_tokens=summary_tokens,
            relevant_turns=len(older),
            user_tokens=user_tokens,
            **common,
        )

    def _models(self, s: ContextSettings) -> ModelTable:
        found = self._models_by_window.get(s.default_window)
        if found is None:  # bounded by the configured policies; margins learnt once, shared
            found = ModelTable(self.settings.models, s.default_window, self.models.calibration)
            self._models_by_window[s.default_window] = found
        return found

    def _select(
        self,
        s: ContextSettings,
        index: HistoryIndex,
        history: Sequence[Turn],
        budget: int,
        applied: str,
        must_keep_last: bool,
        new_messages: Sequence[Message],
    ) -> tuple[Selection, list[int]]:
        """The newest turns to inject (`Selection`) and, for relevance, the older ones."""
        n = index.n
        if applied == strategies.RELEVANCE and n and budget > 0 and index.tokens[n] > budget:
            # The newest turns within what relevance leaves; not remembered as the window's
            # previous cut (a window request after this one keeps its own stable cut).
            saved = index.last_start, index.last_dropped
            index.last_start = -1
            recent = select(
                index,
                budget - int(budget * s.relevance_share),
                step_fraction=s.step,
                max_messages=s.max_messages,
                must_keep_last=must_keep_last,
            )
            index.last_start, index.last_dropped = saved
            if recent.fits:
                older: list[int] = []
                if recent.start:
                    words = rel.terms(strategies.query_text(new_messages))
                    if words:
                        scores = self._relevance(index, history).scores(words, recent.start)
                        older = rel.pick(
                            scores, recent.start, index.clean, index.tokens, budget - recent.tokens
                        )
                sums = index.tokens
                tokens = recent.tokens + sum(sums[i + 1] - sums[i] for i in older)
                left_out = recent.start - len(older)
                dropped = {RELEVANCE: left_out} if left_out else {}
                return Selection(recent.start, True, tokens, dropped), older
        keep = must_keep_last or applied == strategies.TOOL_LOOP
        chosen = select(
            index,
            budget,
            step_fraction=s.step,
            max_messages=s.max_messages,
            must_keep_last=keep,
        )
        if not chosen.fits and keep and not must_keep_last:
            # The session's last exchange does not fit whole, and the request does not answer
            # it: the plain window.
            chosen = select(index, budget, step_fraction=s.step, max_messages=s.max_messages)
        return chosen, []

    def _relevance(self, index: HistoryIndex, history: Sequence[Turn]) -> rel.RelevanceIndex:
        """The session's BM25 index, extended by the turns added since it was last used."""
        found = index.relevance
        if found is None:
            found = index.relevance = rel.RelevanceIndex()
        if found.n < index.n:
            found.extend(history[found.n : index.n])
        return found

    def _facts_total(self, index: HistoryIndex) -> int:
        """Tokens of the lines of all the session's current facts (memoised until a new one)."""
        memo_key = (-1, len(index.facts))
        found = index.facts_memo.get(memo_key)
        if found is None:
            total = sum(f.tokens for f in key_facts.latest(index.facts, index.n))
            found = index.facts_memo[memo_key] = (None, total)
        return found[1]

    def _facts(self, index: HistoryIndex, before: int, cap: int) -> tuple[Message | None, int]:
        """The key facts message for turns [0, before): the newest facts that fit `cap`
        tokens, and its tokens. Memoised per session, so a request tokenizes it only when the
        cut moves, a fact is added or the cap changes (a share of the window: seldom)."""
        memo_key = (before, len(index.facts), cap)
        found = index.facts_memo.get(memo_key)
        if found is not None:
            return found
        facts = key_facts.newest_within(key_facts.latest(index.facts, before), cap)
        image = self.settings.image_tokens
        message, tokens = None, 0
        while facts:
            message = key_facts.message(facts)
            tokens = count_message(message, image)
            if tokens <= cap:
                break
            facts = facts[1:]  # the per-line estimate was short (rare): one fewer
            message, tokens = None, 0
        if len(index.facts_memo) > 16:
            index.facts_memo.clear()
        index.facts_memo[memo_key] = (message, tokens)
        return message, tokens
