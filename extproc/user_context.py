"""The principal's own user context: what it says about itself, injected as system context.

A principal manages its document through the gateway, authenticated exactly like its chat
requests (same identity resolution, same tenant), at `PATH`:

  GET     the document: {"preferences": {...}, "settings": {...}, "account": {...}}
  PUT     replace it with the request's JSON object (any of those three keys, each an object;
          at most `context_user_max_bytes`)
  DELETE  replace it with an empty document (nothing injected any more)

The store keys it by an HMAC of (tenant, principal) (`IdentityResolver.principal_key`), so no
request can name another principal's document. `preferences` and `settings` are injected
(`render`: one system message, keys sorted, byte-identical while the document is unchanged, so
provider prompt caches keep hitting); `account` is stored and returned, never injected.

On the request path the rendered message comes from `UserContexts`, a per-process cache: a
write through this process replaces its entry at once; another worker's or replica's write is
seen once the entry is older than `context_user_cache_s` (the store has no invalidation message
for per-principal documents; a short TTL keeps this simple and bounds the staleness).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import orjson

from extproc.context.manager import UserContextMessage
from extproc.tokens import count_message
from store.session import UserContext

PATH = "/sessiongate/v1/user-context"
API_PREFIX = "/sessiongate/"
FIELDS = ("preferences", "settings", "account")
INJECTED = ("preferences", "settings")
HEADER = "User context (the user's own stated preferences and settings; follow them):"
MAX_ENTRIES = 100_000  # principals cached per process


class UserContextError(ValueError):
    """A bad request body: the status and OpenAI error code to answer with."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_user_context"):
        super().__init__(message)
        self.status = status
        self.code = code


def parse(raw: bytes, max_bytes: int) -> UserContext:
    """The document a PUT body describes, or UserContextError."""
    if len(raw) > max_bytes:
        raise UserContextError(
            f"user context of {len(raw)} bytes exceeds the gateway's limit of {max_bytes} bytes "
            "(context_user_max_bytes)",
            413,
            "request_too_large",
        )
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UserContextError("the body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise UserContextError(f"expected a JSON object with {', '.join(FIELDS)}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise UserContextError(
            f"unknown field(s) {', '.join(unknown)}: expected {', '.join(FIELDS)}"
        )
    for name, value in data.items():
        if not isinstance(value, dict):
            raise UserContextError(f"{name}: expected a JSON object")
    return UserContext(**data)


def to_json(doc: UserContext) -> bytes:
    return orjson.dumps({name: getattr(doc, name) for name in FIELDS})


def render(doc: UserContext, image_tokens: int = 0) -> UserContextMessage | None:
    """One compact system message with what is injected, or None when there is nothing."""
    shown = {name: getattr(doc, name) for name in INJECTED if getattr(doc, name)}
    if not shown:
        return None
    text = orjson.dumps(shown, option=orjson.OPT_SORT_KEYS).decode()
    message = {"role": "system", "content": f"{HEADER}\n{text}"}
    return UserContextMessage(message, count_message(message, image_tokens))


class UserDocs(Protocol):
    """The store calls this module needs (`SessionStore`)."""

    async def get_user_context(self, principal_key: str) -> UserContext: ...

    async def put_user_context(self, principal_key: str, context: UserContext) -> None: ...


@dataclass(frozen=True, slots=True)
class _Entry:
    at: float
    rendered: UserContextMessage | None


class UserContexts:
    """Rendered user contexts per principal key, for `ttl_s` seconds (0: not cached)."""

    def __init__(
        self,
        ttl_s: float,
        image_tokens: int = 0,
        *,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._image_tokens = image_tokens
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # Loads in flight, so concurrent requests of one principal share one store read.
        self._loading: dict[str, asyncio.Future[UserContextMessage | None]] = {}

    def cached(self, principal_key: str) -> tuple[bool, UserContextMessage | None]:
        """(True, the rendered context) while fresh; (False, None): `load` it."""
        entry = self._entries.get(principal_key)
        if entry is None or self._clock() - entry.at >= self._ttl_s:
            return False, None
        return True, entry.rendered

    async def load(self, store: UserDocs, principal_key: str) -> UserContextMessage | None:
        """Read and render. A store failure raises here (requests waiting on the same read
        get None); callers go on without the user context."""
        pending = self._loading.get(principal_key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[UserContextMessage | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._loading[principal_key] = future
        rendered: UserContextMessage | None = None
        started = self._clock()
        try:
            rendered = render(await store.get_user_context(principal_key), self._image_tokens)
            self._remember(principal_key, rendered, since=started)
        finally:
            del self._loading[principal_key]
            future.set_result(rendered)
        return rendered

    def stored(self, principal_key: str, doc: UserContext) -> None:
        """This process wrote `doc`: its requests see it at once."""
        self._remember(principal_key, render(doc, self._image_tokens))

    def _remember(
        self, principal_key: str, rendered: UserContextMessage | None, since: float = -1.0
    ) -> None:
        """`since`: when the read began; a write recorded after that is newer, and kept."""
        if self._ttl_s <= 0:
            return
        found = self._entries.get(principal_key)
        if found is not None and found.at > since >= 0:
            return
        self._entries[principal_key] = _Entry(self._clock(), rendered)
        self._entries.move_to_end(principal_key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
