"""Key information from what the user said: names, "my X is Y", preferences, decisions, dates.

Extractive and deterministic (regular expressions over the user's own messages, sentence by
sentence): no model call, nothing invented, the same facts on every replica. A fact keeps the
user's sentence (trimmed to `MAX_FACT_CHARS`) and a key; a later fact with the same key replaces
the earlier one, so "my name is Ann" ... "actually, call me Annie" leaves only the second.

- name ("my name is X", "call me X", "I'm X" / "I am X" with X capitalised): key `name`;
- attribute ("my <up to 4 words> is/are ..."): key `my <words>`;
- preference ("I prefer / like / love / hate / don't like / would rather / want / need ..."),
  decision ("we/I decided / agreed / chose / settled on ...", "let's go with / use ..."),
  reminder ("remember (that) ...", "note that ...", "keep in mind ..."), and a sentence with a
  date (2026-03-14, 14/03, March 14, 14 March) or a quantity ("is / costs / = <number>"):
  keyed by the sentence itself (repeats are stated once; changes are not detected).

Facts are only injected for turns the window left out (the rest are in the messages already),
as one system message after the system prompt, newest facts first within their share
(`context_facts_share`) of the prompt tokens the window allows besides the system prompt. The
share is taken from the history budget (history + facts never exceed it) and does not move with
the size of each request, so neither does the facts message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from extproc.tokens import TOKENS_PER_MESSAGE, count_text
from store.model import Message, Turn

MAX_FACT_CHARS = 200
HEADER = "Key facts the user stated earlier in this conversation (older messages not shown):"

_MONTHS = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|"
    r"sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
)
_SENTENCES = re.compile(r"[^.!?\n]+[.!?]?")
# The phrase in any case, the name capitalised (so "I'm tired" is not a name).
_NAME = re.compile(
    r"\b(?i:my name is|call me|i['\u2019]m|i am)\s+([A-Z][\w'-]*(?:\s+[A-Z][\w'-]*){0,2})"
)
_NAME_LOOSE = re.compile(r"\b(?:my name is|call me)\s+([\w'-]+(?:\s+[A-Z][\w'-]*){0,2})", re.I)
_ATTRIBUTE = re.compile(r"\bmy\s+((?:[a-z'-]+\s+){0,3}?[a-z'-]+)\s+(?:is|are)\s+\S", re.I)
_PREFERENCE = re.compile(
    r"\bi\s+(?:really\s+|do\s+|would\s+)?(?:prefer|like|love|hate|dislike|don't like|"
    r"do not like|'d rather|would rather|rather|want|need)\b",
    re.I,
)
_DECISION = re.compile(
    r"\b(?:(?:we|i)\s+(?:have\s+)?(?:decided|agreed|chose|settled on|are going with|will go with)|"
    r"let's\s+(?:go with|use|stick with)|let us\s+(?:go with|use))\b",
    re.I,
)
_REMINDER = re.compile(r"\b(?:remember(?:\s+that)?|note that|keep in mind|don't forget)\b", re.I)
_DATE = re.compile(
    rf"\b(?:\d{{4}}-\d{{1,2}}-\d{{1,2}}|\d{{1,2}}/\d{{1,2}}(?:/\d{{2,4}})?|"
    rf"{_MONTHS}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?\b|\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTHS}\b)",
    re.I,
)
_QUANTITY = re.compile(r"\b(?:is|are|was|were|costs?|equals|=)\s+(?:about\s+)?[$€£]?\d", re.I)
# Any of the above, case-insensitively (a superset of what they match): one search decides
# whether a sentence needs the others. Most sentences need none, and a session read after a
# restart has all of its turns scanned once.
_ANY = re.compile(
    "|".join(
        f"(?:{p.pattern})"
        for p in (_NAME_LOOSE, _ATTRIBUTE, _PREFERENCE, _DECISION, _REMINDER, _DATE, _QUANTITY)
    )
    + r"|\b(?:i['\u2019]m|i am)\s",
    re.I,
)
# Not names: "I'm Sure", "I am Not ..." at a sentence start of a capitalised phrase.
_NOT_NAMES = frozenset({"not", "sure", "sorry", "so", "just", "also", "still", "here", "back"})


@dataclass(frozen=True, slots=True)
class Fact:
    key: str
    text: str
    # Its line in the facts message (`- text` and the newline), counted once when extracted.
    tokens: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", count_text(self.text) + 2)


# What capture stores with a turn (Turn.facts) is keyed by this: a release whose extraction
# rules differ bumps it, and turns stored under another version are scanned again.
FACTS_VERSION = "facts/1"


def facts_record(messages: Iterable[Message]) -> dict[str, list[list[str]]]:
    """The key facts of a turn's request messages, as capture stores them with the turn."""
    return {FACTS_VERSION: [[fact.key, fact.text] for fact in extract(messages)]}


def stored_facts(turn: Turn) -> tuple[Fact, ...] | None:
    """The facts stored with the turn at capture, or None when it has none of this version
    (stored before facts were, or by another extractor version): then `turn_facts`."""
    found = turn.facts.get(FACTS_VERSION) if turn.facts else None
    if found is None:
        return None
    try:
        return tuple(Fact(str(key), str(text)) for key, text in found)
    except (TypeError, ValueError):  # a malformed record: scan the messages instead
        return None


def _user_texts(messages: Iterable[Message]) -> Iterable[str]:
    for message in messages:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    yield part["text"]


def _clip(sentence: str) -> str:
    text = " ".join(sentence.split())
    return text if len(text) <= MAX_FACT_CHARS else text[: MAX_FACT_CHARS - 3] + "..."


def _name(sentence: str) -> str | None:
    found = _NAME.search(sentence) or _NAME_LOOSE.search(sentence)
    if found is None:
        return None
    name = found[1].strip()
    if name.split()[0].lower() in _NOT_NAMES:
        return None
    return name


def sentence_facts(sentence: str) -> list[Fact]:
    if _ANY.search(sentence) is None:
        return []
    text = _clip(sentence)
    if len(text) < 4:
        return []
    facts: list[Fact] = []
    if _name(sentence) is not None:
        facts.append(Fact("name", text))
    for found in _ATTRIBUTE.finditer(sentence):
        attribute = " ".join(found[1].lower().split())
        if attribute != "name":
            facts.append(Fact(f"my {attribute}", text))
    if not facts and (
        _PREFERENCE.search(sentence)
        or _DECISION.search(sentence)
        or _REMINDER.search(sentence)
        or _DATE.search(sentence)
        or _QUANTITY.search(sentence)
    ):
        facts.append(Fact(text.lower(), text))
    return facts


def extract(messages: Iterable[Message]) -> tuple[Fact, ...]:
    """The facts in the user messages among `messages`, in order."""
    out: list[Fact] = []
    for text in _user_texts(messages):
        if len(text) > 20_000:  # pasted documents are not statements about the user
            continue
        for sentence in _SENTENCES.findall(text):
            out.extend(sentence_facts(sentence))
    return tuple(out)


def turn_facts(turn: Turn) -> tuple[Fact, ...]:
    return extract(turn.request_messages)


def latest(facts: Sequence[tuple[int, Fact]], before: int) -> list[Fact]:
    """Facts stated in turns [0, before), one per key (its latest statement), oldest first."""
    chosen: dict[str, Fact] = {}
    for turn, fact in facts:
        if turn >= before:
            break
        chosen.pop(fact.key, None)  # re-inserted: the order follows each key's latest statement
        chosen[fact.key] = fact
    return list(chosen.values())


def header_tokens() -> int:
    """The facts message without any fact: framing, role and header."""
    return TOKENS_PER_MESSAGE + 1 + count_text(HEADER)


def newest_within(facts: Sequence[Fact], cap: int) -> list[Fact]:
    """The newest facts whose lines fit `cap` tokens with the header, oldest first (an
    estimate from per-line counts; the caller counts the message it builds)."""
    total = header_tokens()
    start = len(facts)
    while start > 0 and total + facts[start - 1].tokens <= cap:
        start -= 1
        total += facts[start].tokens
    return list(facts[start:])


def message(facts: Sequence[Fact], role: str = "system") -> Message:
    """One system message listing the facts (a sentence holding two facts appears once)."""
    lines = "\n".join(f"- {text}" for text in dict.fromkeys(fact.text for fact in facts))
    return {"role": role, "content": f"{HEADER}\n{lines}"}
