"""Relevance: the older turns most relevant to the current query, BM25 blended with recency.

Each session's history gets an inverted index (term -> the turns containing it, with counts),
kept in its `HistoryIndex` (per process, identity-checked like the prefix sums) and built the
first time relevance is used, then extended by the new turns only: a request costs the scoring
of its own query's terms, not a pass over the session.

Scoring is Okapi BM25 (k1 = 1.2, b = 0.75) over the turns before the recency window, from the
query's rarest terms first and within `MAX_POSTINGS` postings (terms in more than a quarter of
the turns carry almost no weight and are skipped), so a 10,000-message session stays cheap.
Turns are grouped into *units* — a clean turn and the tool-exchange turns that follow it — so a
tool call and its results are kept or dropped together (window.py's pairing rule). A unit's
score is its best turn's BM25 score over the best overall, blended with its position
(`RECENCY_WEIGHT`); units are taken best first while they fit the budget and restored to
chronological order.
"""

from __future__ import annotations

import bisect
import math
import re
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from store.model import Message, Turn

K1 = 1.2
B = 0.75
RECENCY_WEIGHT = 0.3
MAX_QUERY_TERMS = 12
MAX_POSTINGS = 3000  # postings scored per query at most
MAX_COMMON = 0.25  # terms in more than this fraction of the turns are skipped
MAX_CANDIDATES = 64  # best turns considered for units
MAX_TEXT_CHARS = 4000  # indexed per message

_WORD = re.compile(r"[^\W_]+", re.U)
_STOPWORDS = """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
    tell told say said remember recall earlier previously mention mentioned ok okay please
    thanks thank also get got let us"""
STOPWORDS = frozenset(_STOPWORDS.split())


def terms(text: str) -> list[str]:
    """Lower-cased words minus stop words; a plural `s` is dropped from longer words."""
    out = []
    for word in _WORD.findall(text.lower()):
        if word in STOPWORDS or (len(word) < 2 and not word.isdigit()):
            continue
        if len(word) > 4 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        out.append(word)
    return out


def _message_text(message: Message) -> Iterable[str]:
    content = message.get("content")
    if isinstance(content, str):
        yield content[:MAX_TEXT_CHARS]
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"][:MAX_TEXT_CHARS]
    for call in message.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            yield fn["arguments"][:MAX_TEXT_CHARS]


def turn_terms(turn: Turn) -> dict[str, int]:
    """Term counts of the turn's text (counted in C, then normalised per distinct word)."""
    words: list[str] = []
    for message in turn.messages():
        for text in _message_text(message):
            words += _WORD.findall(text.lower())
    counts: dict[str, int] = {}
    for word, count in Counter(words).items():
        if word in STOPWORDS or (len(word) < 2 and not word.isdigit()):
            continue
        if len(word) > 4 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        counts[word] = counts.get(word, 0) + count
    return counts


@dataclass(slots=True)
class RelevanceIndex:
    """BM25 postings over one session's turns, in turn order (so a posting list is sorted)."""

    docs: dict[str, array[int]] = field(default_factory=dict)
    tfs: dict[str, array[int]] = field(default_factory=dict)
    lengths: array[int] = field(default_factory=lambda: array("i"))
    total_length: int = 0

    @property
    def n(self) -> int:
        return len(self.lengths)

    def extend(self, turns: Sequence[Turn]) -> None:
        docs, tfs = self.docs, self.tfs
        for turn in turns:
            i = len(self.lengths)
            counts = turn_terms(turn)
            length = sum(counts.values())
            self.lengths.append(length)
            self.total_length += length
            for term, tf in counts.items():
                found = docs.get(term)
                if found is None:
                    docs[term] = array("i", [i])
                    tfs[term] = array("i", [tf])
                else:
                    found.append(i)
                    tfs[term].append(tf)

    def scores(self, query: Sequence[str], before: int) -> dict[int, float]:
        """BM25 score of each turn in [0, before) sharing a term with `query` (unique terms)."""
        n = self.n
        if not n or before <= 0:
            return {}
        avg = self.total_length / n or 1.0
        weighted = []
        for term in dict.fromkeys(query):
            docs = self.docs.get(term)
            if docs is None or len(docs) > max(MAX_COMMON * n, 2):
                continue
            df = len(docs)
            weighted.append((math.log(1 + (n - df + 0.5) / (df + 0.5)), term))
        weighted.sort(reverse=True)
        out: dict[int, float] = {}
        lengths = self.lengths
        norm = K1 * (1 - B)
        scale = K1 * B / avg
        budget = MAX_POSTINGS
        for idf, term in weighted[:MAX_QUERY_TERMS]:
            docs, tfs = self.docs[term], self.tfs[term]
            end = bisect.bisect_left(docs, before)
            if end > budget:
                continue
            budget -= end
            factor = idf * (K1 + 1)
            for j in range(end):
                d = docs[j]
                tf = tfs[j]
                out[d] = out.get(d, 0.0) + factor * tf / (tf + norm + scale * lengths[d])
        return out


def pick(
    scores: dict[int, float],
    before: int,
    clean: bytearray,
    sums: Sequence[int],
    budget: int,
    recency_weight: float = RECENCY_WEIGHT,
) -> list[int]:
    """The turns (oldest first) of the best units in [0, before) that fit `budget` tokens.

    `before` must be a clean turn index (or the history's length); `clean[i]` says whether turn
    i may start the injected history and `sums` are the prefix sums of the turns' tokens.
    """
    if not scores or budget <= 0 or before <= 0:
        return []
    best = sorted(scores.items(), key=lambda item: -item[1])[:MAX_CANDIDATES]
    top = best[0][1] or 1.0
    units: dict[int, tuple[float, int]] = {}  # start -> (blended score, end)
    for turn, score in best:
        start = clean.rfind(1, 0, turn + 1)
        if start < 0 or start in units:
            continue  # a better turn of the same unit came first
        end = clean.find(1, turn + 1, before)
        end = before if end < 0 else end
        blended = (1 - recency_weight) * score / top + recency_weight * end / before
        units[start] = (blended, end)
    chosen: list[tuple[int, int]] = []
    left = budget
    for start, (_, end) in sorted(units.items(), key=lambda item: -item[1][0]):
        cost = sums[end] - sums[start]
        if cost <= left:
            chosen.append((start, end))
            left -= cost
    chosen.sort()
    return [i for start, end in chosen for i in range(start, end)]
