"""Where a request's session id comes from, in the configured order (`session_sources`).

- `header`: the session header (`session_header`), as always.
- `cookie`: the cookie named `session_cookie`.
- `body`: the first of `session_body_fields` present in the JSON body as a string: by default
  OpenAI's `metadata.session_id`, then `metadata.conversation_id`, then `user` (OpenAI's
  end-user id: every conversation of that end user is then one session).
  `metadata.user_id` is Anthropic's field, accepted when listed.
- `fingerprint`: for `manage`/`auto` clients only (they send the whole conversation every
  time): `fp.` + a hash of the conversation's opening, its first system message and first user
  message in canonical form (extproc.client_modes), so an unchanged app gets a session without
  sending anything new. Two conversations of one principal that open identically share it.

Header and cookie are read with the request headers; body and fingerprint need the body, so
when they are configured the chat route sends every chat request's body to rewrite (a request
that has none of them passes through unchanged: no memory).

Every id, whatever its source, is validated like the header (`[A-Za-z0-9._:-]{1,128}`; a
header that fails gets a 400, a cookie or body field that fails is skipped) and becomes a
store key only as an HMAC of (tenant, principal, id): no source can reach another principal's
sessions. Fingerprints are derived by sessiongate (hex), so they are always valid.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from http.cookies import CookieError, SimpleCookie
from typing import Any

from extproc.client_modes import message_hash
from extproc.identity import valid_session_id
from store.model import Message

HEADER = "header"
COOKIE = "cookie"
BODY = "body"
FINGERPRINT = "fingerprint"
BODY_STAGE = frozenset({BODY, FINGERPRINT})  # sources that need the request body
FINGERPRINT_PREFIX = "fp."


def cookie_value(cookie_header: str | None, name: str) -> str | None:
    """The named cookie's value from a `Cookie` header (Envoy joins several with `; `)."""
    if not cookie_header:
        return None
    jar: SimpleCookie = SimpleCookie()
    for part in cookie_header.split(";"):  # one bad pair must not hide the others
        try:
            jar.load(part.strip())
        except CookieError:
            continue
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


def body_value(body: Mapping[str, Any], fields: Sequence[str]) -> tuple[str, str] | None:
    """(field, value) of the first dotted field path holding a non-empty string."""
    for path in fields:
        node: Any = body
        for part in path.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, str) and node:
            return path, node
    return None


def fingerprint(system_messages: Sequence[Message], messages: Sequence[Message]) -> str | None:
    """`fp.<32 hex>` from the first system message (if any) and the first user message."""
    first_user = next((m for m in messages if m.get("role") == "user"), None)
    if first_user is None:
        return None
    digest = hashlib.blake2b(digest_size=16)
    digest.update(message_hash(system_messages[0]) if system_messages else b"\0" * 16)
    digest.update(message_hash(first_user))
    return FINGERPRINT_PREFIX + digest.hexdigest()


def usable(value: str | None) -> str | None:
    """The value when it is a valid session id, else None (the source is skipped)."""
    return value if value is not None and valid_session_id(value) else None
