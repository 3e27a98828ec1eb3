"""Synthetic conversations for the context benchmark and evaluation (deterministic per seed).

A conversation is a list of `Turn`s exactly as the store returns them: each turn carries the
request's system prompt (as rewrite records it), the messages the client sent and the reply.
Lengths are mixed (short follow-ups, long answers, the odd pasted document) and about one turn
in ten starts a tool exchange: the assistant replies with `tool_calls` (one or two, sometimes a
second round), and the next turn's request starts with the `tool` results, so the window must
keep or drop the exchange whole.

For the evaluation, `planted_conversation` also plants facts (a name, preferences, decisions,
numbers and dates) among distractor turns, some of them fact-like themselves (other people's
names, other projects' budgets), and ends with one recall question per planted fact. Each fact
has a `needle`, a string that appears in no other message of its conversation, so "the fact is
in the prompt" is a substring test.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import orjson

from extproc.context import ContextSettings
from extproc.tokens import turn_token_counts
from store.model import Message, Turn

# The image estimate context management counts with by default (so the stored counts apply).
IMAGE_TOKENS_DEFAULT = ContextSettings().image_tokens


def _pool(text: str, sep: str | None = None) -> tuple[str, ...]:
    return tuple(text.split(sep))


# Filler vocabulary: no first-person pronouns, copulas, digits or month names, so filler text
# never looks like a statement of fact to the key-facts extractor (distractor facts are
# planted on purpose instead).
_WORDS = _pool(
    "system latency request cache window token budget model service deploy cluster replica "
    "shard index query plan schema table column migration rollback release branch commit "
    "review test suite coverage metric alert dashboard trace span log level config flag "
    "header body stream chunk event queue worker thread loop socket buffer limit retry "
    "timeout backoff circuit breaker proxy gateway route upstream downstream listener filter "
    "policy tenant principal session history summary context prompt reply answer question "
    "draft outline chapter paragraph section figure chart report analysis estimate forecast "
    "quarter revenue margin cost price invoice vendor contract clause term renewal scope "
    "roadmap milestone sprint backlog ticket feature bug regression incident postmortem "
    "owner team design proposal tradeoff option risk mitigation dependency library package "
    "version upgrade patch security audit access role permission secret key certificate "
    "network region zone storage volume snapshot backup restore archive export import "
    "pipeline batch job scheduler cron trigger webhook endpoint client server protocol "
    "the a of to and in for with on by from as at into over under about between across "
    "quickly carefully usually often rarely again also still only just then there here "
    "large small fast slow new old stable flaky simple complex careful rough clear vague"
)

_FIRST = _pool(
    "Priya Mateo Ingrid Kwame Svetlana Tomasz Aiko Rafael Nadia Oskar Lucia Dmitri Amara "
    "Henrik Yusuf Beatriz Kenji Farah Emeka Greta Idris Soraya Anders Paloma Ravi Zofia"
)
_LAST = _pool(
    "Raman Okafor Lindqvist Boateng Petrova Nowak Tanaka Duarte Haddad Berg Moreno Volkov "
    "Eze Halvorsen Demir Carvalho Sato Rahimi Nwosu Vogel Karimi Farouk Dahl Serrano"
)
_TECH = _pool(
    "PostgreSQL ClickHouse DuckDB Cassandra CockroachDB Kafka NATS RabbitMQ Pulsar Redpanda "
    "Terraform Pulumi Kubernetes Nomad Svelte Elixir Haskell Rust Kotlin Zig Flutter Remix"
)
_COMPONENTS = _pool(
    "billing service|search backend|event bus|audit log|mobile client|analytics warehouse|"
    "job scheduler|auth gateway|notification pipeline|pricing engine|image store|admin console",
    "|",
)
_PREFS = _pool(
    "dark roast coffee|window seats|morning standups|tabs over spaces|metric units|"
    "vegetarian meals|email summaries|night trains|paper notebooks|short meetings|"
    "green tea|aisle seats|written specs|async updates|quiet carriages|weekly reports",
    "|",
)
_PREF_TOPICS = _pool(
    "the offsite|travel|our team rituals|code style|the reports|the catering|status updates|"
    "the trip|note taking|planning|the mornings|flights|design reviews|communication",
    "|",
)
_PROJECTS = _pool(
    "Project Falcon|Project Juniper|the Atlas rewrite|Project Osprey|the Helios launch|"
    "Project Tundra|the Nimbus migration|Project Quartz|the Beacon pilot|Project Saffron",
    "|",
)
_EVENTS = _pool(
    "dentist appointment|flight to Lisbon|quarterly review|sister's wedding|visa interview|"
    "contract renewal|conference talk|team offsite|lease signing|marathon",
    "|",
)
_FAVOURITES = _pool(
    "colour|city|programming language|board game|editor|author|band|hiking trail|dish|"
    "football club",
    "|",
)
_FAV_VALUES = _pool(
    "ultramarine|Valparaiso|OCaml|Carcassonne|Helix|Ursula Le Guin|Khruangbin|"
    "Laugavegur|pierogi|Boavista|vermilion|Ljubljana|Racket|Azul|Kakoune|Italo Calvino|"
    "Tinariwen|Kungsleden|injera|Sampdoria",
    "|",
)
_ITEMS = _pool(
    "monitors|standing desks|laptops|headsets|whiteboards|chairs|docking stations|lockers", "|"
)
_MONTHS = _pool(
    "January February March April May June July August September October November December"
)


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(_WORDS, k=max(1, n)))


def sentences(rng: random.Random, n_words: int) -> str:
    """About `n_words` of filler in sentences of 6 to 18 words."""
    out: list[str] = []
    left = max(1, n_words)
    while left > 0:
        k = min(left, rng.randint(6, 18))
        left -= k
        text = words(rng, k)
        out.append(text[0].upper() + text[1:] + ".")
    return " ".join(out)


def _length(rng: random.Random, short: int, typical: int, long: int, p_long: float) -> int:
    """Word count: mostly short to typical, sometimes long."""
    if rng.random() < p_long:
        return rng.randint(typical, long)
    return rng.randint(short, typical)


SYSTEM_PROMPT = (
    "You are a careful assistant for an engineering team. Answer precisely, say when you are "
    "unsure, use the tools when a lookup is needed, and keep answers short unless asked."
)


@dataclass(slots=True)
class _Counter:
    turn: int = 0
    call: int = 0


class ConversationWriter:
    """Writes one conversation's turns in order (ids unique within `prefix`)."""

    def __init__(self, rng: random.Random, prefix: str, system: bool = True) -> None:
        self.rng = rng
        self.prefix = prefix
        self.system: tuple[Message, ...] = (
            ({"role": "system", "content": SYSTEM_PROMPT},) if system else ()
        )
        self._n = _Counter()
        self._pending_calls: list[Message] = []  # tool calls the next turn must answer

    def _turn(self, request: tuple[Message, ...], reply: Message) -> Turn:
        self._n.turn += 1
        return Turn(
            turn_id=f"{self.prefix}-{self._n.turn}",
            request_messages=request,
            response_message=reply,
            system_messages=self.system,
            model="gpt-4o",
            finish_reason="tool_calls" if reply.get("tool_calls") else "stop",
            seq=self._n.turn,
            # As capture stores them (extproc.capture): counted once, when the turn completed.
            token_counts=turn_token_counts([*request, reply], IMAGE_TOKENS_DEFAULT),
        )

    def _reply(self) -> Message:
        rng = self.rng
        if rng.random() < 0.08 and not self._pending_calls:
            return self._tool_reply()
        return {"role": "assistant", "content": sentences(rng, _length(rng, 15, 150, 450, 0.15))}

    def _tool_reply(self) -> Message:
        rng = self.rng
        calls = []
        for _ in range(1 if rng.random() < 0.7 else 2):
            self._n.call += 1
            arguments = orjson.dumps({"query": words(rng, rng.randint(2, 8)), "limit": 10})
            calls.append(
                {
                    "id": f"call_{self.prefix}_{self._n.call}",
                    "type": "function",
                    "function": {
                        "name": rng.choice(("search_docs", "run_query", "get_ticket")),
                        "arguments": arguments.decode(),
                    },
                }
            )
        self._pending_calls = calls
        return {"role": "assistant", "content": None, "tool_calls": calls}

    def user_turn(self, text: str, reply: Message | None = None) -> Turn:
        """A turn whose request is the user's `text` (answering pending tool calls first)."""
        request: list[Message] = self._tool_results()
        request.append({"role": "user", "content": text})
        return self._turn(tuple(request), reply if reply is not None else self._reply())

    def _tool_results(self) -> list[Message]:
        rng = self.rng
        results: list[Message] = []
        for call in self._pending_calls:
            rows = [
                {"id": rng.randint(1, 99_999), "title": words(rng, rng.randint(3, 10))}
                for _ in range(rng.randint(1, 12))
            ]
            results.append(
                {
                    "role": "tool",
                    "tool_call_id": call["id"],
                    "content": orjson.dumps({"results": rows}).decode(),
                }
            )
        self._pending_calls = []
        return results

    def next_turn(self) -> Turn:
        """A distractor turn: the tool results the previous turn asked for, or a user message."""
        rng = self.rng
        if self._pending_calls:
            request = tuple(self._tool_results())
            reply = self._reply() if rng.random() < 0.25 else self._plain_reply()
            return self._turn(request, reply)
        text = sentences(rng, _length(rng, 4, 60, 1200, 0.04))
        return self.user_turn(text[:-1] + "?" if rng.random() < 0.5 else text)

    def _plain_reply(self) -> Message:
        rng = self.rng
        return {"role": "assistant", "content": sentences(rng, _length(rng, 20, 150, 450, 0.15))}


def messages_of(turns: list[Turn]) -> int:
    return sum(len(turn.request_messages) + 1 for turn in turns)


def session(
    seed: int, n_messages: int, extra_turns: int, prefix: str
) -> tuple[list[Turn], list[Turn]]:
    """A session of at least `n_messages` history messages, and `extra_turns` more turns that
    continue it (each one's request is what the client sends next)."""
    writer = ConversationWriter(random.Random(seed), prefix)
    history: list[Turn] = []
    count = 0
    while count < n_messages:
        turn = writer.next_turn()
        history.append(turn)
        count += len(turn.request_messages) + 1
    more = [writer.next_turn() for _ in range(extra_turns)]
    return history, more


def request_body(turn: Turn, model: str, **fields: object) -> bytes:
    """The body a client in `append` mode sends for `turn`: its system prompt and new messages."""
    messages = [*turn.system_messages, *turn.request_messages]
    return orjson.dumps({"model": model, "messages": messages, "stream": True, **fields})


# --- planted facts (evaluation) -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlantedFact:
    kind: str
    statement: str  # what the user says
    needle: str  # appears in this statement only, within its conversation
    question: str  # the recall question asked at the end


@dataclass(frozen=True, slots=True)
class PlantedConversation:
    turns: list[Turn]  # the conversation, recall questions included (one turn each)
    facts: list[PlantedFact]
    questions: list[int]  # index in `turns` of each fact's recall question (same order)
    planted_at: list[int]  # index in `turns` of the turn that states each fact


def _distinct(rng: random.Random, pool: list[str] | tuple[str, ...], k: int) -> list[str]:
    return rng.sample(list(pool), k)


def _fact_makers(rng: random.Random) -> Iterator[tuple[PlantedFact, list[str]]]:
    """Planted facts, one per kind, each with a few fact-like distractor statements built
    from the same pools (never with the fact's needle)."""
    first = rng.choice(_FIRST)
    last = rng.choice(_LAST)
    pairs = zip(_distinct(rng, _FIRST, 6), _distinct(rng, _LAST, 6), strict=True)
    others = [f"{a} {b}" for a, b in pairs if a != first][:3]
    yield (
        PlantedFact(
            "name", f"By the way, my name is {first} {last}.", f"{first} {last}", "What is my name?"
        ),
        [f"My manager is {o} and she reviews the plan on Fridays." for o in others],
    )
    techs = _distinct(rng, _TECH, 4)
    components = _distinct(rng, _COMPONENTS, 4)
    yield (
        PlantedFact(
            "decision",
            f"We decided to use {techs[0]} for the {components[0]}.",
            techs[0],
            f"What did we decide to use for the {components[0]}?",
        ),
        [
            f"The other team evaluated {t} for the {c}."
            for t, c in zip(techs[1:], components[1:], strict=True)
        ],
    )
    prefs = _distinct(rng, _PREFS, 4)
    topics = _distinct(rng, _PREF_TOPICS, 4)
    yield (
        PlantedFact(
            "preference",
            f"For {topics[0]}, I prefer {prefs[0]}.",
            prefs[0],
            f"What do I prefer for {topics[0]}?",
        ),
        [
            f"Some people on the team like {p} for {t}."
            for p, t in zip(prefs[1:], topics[1:], strict=True)
        ],
    )
    projects = _distinct(rng, _PROJECTS, 4)
    amounts = [f"{rng.randint(11, 99)},{rng.randint(100, 999)}" for _ in range(4)]
    yield (
        PlantedFact(
            "number",
            f"The budget for {projects[0]} is {amounts[0]} dollars.",
            amounts[0],
            f"What is the budget for {projects[0]}?",
        ),
        [
            f"The budget for {p} is {a} dollars."
            for p, a in zip(projects[1:], amounts[1:], strict=True)
        ],
    )
    events = _distinct(rng, _EVENTS, 4)
    dates = [
        f"{rng.choice(_MONTHS)} {day}" for day in _distinct(rng, [str(d) for d in range(1, 29)], 4)
    ]
    yield (
        PlantedFact(
            "date",
            f"My {events[0]} is on {dates[0]}.",
            dates[0],
            f"When is my {events[0]}?",
        ),
        [f"The {e} of a colleague is on {d}." for e, d in zip(events[1:], dates[1:], strict=True)],
    )
    favs = _distinct(rng, _FAVOURITES, 4)
    values = _distinct(rng, _FAV_VALUES, 4)
    yield (
        PlantedFact(
            "attribute",
            f"My favourite {favs[0]} is {values[0]}.",
            values[0],
            f"What is my favourite {favs[0]}?",
        ),
        [f"A friend's favourite {f} is {v}." for f, v in zip(favs[1:], values[1:], strict=True)],
    )
    items = _distinct(rng, _ITEMS, 3)
    counts = _distinct(rng, [str(k) for k in range(3, 60)], 3)
    yield (
        PlantedFact(
            "quantity",
            f"I need {counts[0]} {items[0]} for the new office.",
            f"{counts[0]} {items[0]}",
            f"How many {items[0]} do I need for the new office?",
        ),
        [f"The old office had {k} {i}." for k, i in zip(counts[1:], items[1:], strict=True)],
    )
    code = f"{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}{rng.randint(1000, 9999)}"
    yield (
        PlantedFact(
            "reminder",
            f"Remember that the door code for the lab is {code}.",
            code,
            "What is the door code for the lab?",
        ),
        [],
    )


def planted_conversation(seed: int, turns: int, prefix: str) -> PlantedConversation:
    """`turns` distractor turns with the facts planted in the first 80% (one per kind), the
    fact-like distractors spread everywhere, then one recall question per fact."""
    rng = random.Random(seed)
    writer = ConversationWriter(rng, prefix)
    made = list(_fact_makers(rng))
    facts = [fact for fact, _ in made]
    decoys = [d for _, ds in made for d in ds]
    slots = rng.sample(range(1, max(len(facts) + 2, int(turns * 0.8))), len(facts))
    plant = dict(zip(slots, facts, strict=True))
    decoy_slots = dict(
        zip(rng.sample(range(1, turns), min(len(decoys), turns - 1)), decoys, strict=False)
    )
    out: list[Turn] = []
    planted_at = [0] * len(facts)
    for i in range(turns):
        fact = plant.get(i)
        decoy = decoy_slots.get(i)
        if fact is not None or decoy is not None:
            statement = fact.statement if fact is not None else str(decoy)
            before, after = sentences(rng, rng.randint(5, 30)), sentences(rng, rng.randint(0, 20))
            text = f"{before} {statement} {after}"
            ack = {"role": "assistant", "content": "Noted. " + sentences(rng, rng.randint(10, 60))}
            if fact is not None:
                planted_at[facts.index(fact)] = len(out)
            out.append(writer.user_turn(text.strip(), ack))
        else:
            out.append(writer.next_turn())
    questions = []
    for fact in facts:
        questions.append(len(out))
        answer = {"role": "assistant", "content": "Here is what I found. " + words(rng, 12)}
        out.append(writer.user_turn(fact.question, answer))
    return PlantedConversation(out, facts, questions, planted_at)
