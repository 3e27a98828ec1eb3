"""Session sources: cookie, body fields and conversation fingerprints; routes that need them."""

from __future__ import annotations

import pytest

from extproc.config import ConfigError, Settings, validate
from extproc.envoy_config import CHAT_PATH, Upstream, routes
from extproc.identity import Identity, IdentityResolver
from extproc.session_sources import (
    body_value,
    cookie_value,
    fingerprint,
    usable,
)

SYSTEM = {"role": "system", "content": "You are terse."}
HELLO = {"role": "user", "content": "hello"}


def test_cookie_found_among_others() -> None:
    header = "theme=dark; sessiongate_session=abc-123; other=1"
    assert cookie_value(header, "sessiongate_session") == "abc-123"
    assert cookie_value(header, "missing") is None
    assert cookie_value(None, "sessiongate_session") is None


def test_cookie_survives_a_malformed_pair() -> None:
    assert cookie_value('bad"=x; sid=ok', "sid") == "ok"


def test_body_fields_in_order() -> None:
    fields = ("metadata.session_id", "metadata.conversation_id", "user")
    assert body_value({"user": "u1", "metadata": {"conversation_id": "c1"}}, fields) == (
        "metadata.conversation_id",
        "c1",
    )
    assert body_value({"user": "u1", "metadata": {"session_id": ""}}, fields) == ("user", "u1")
    assert body_value({"metadata": "not a map", "user": 3}, fields) is None
    assert body_value({"metadata": {"user_id": "a"}}, ("metadata.user_id",)) == (
        "metadata.user_id",
        "a",
    )


def test_invalid_ids_are_not_usable() -> None:
    assert usable("bob@example.com") is None
    assert usable("x" * 129) is None
    assert usable("ok:1") == "ok:1"
    assert usable(None) is None


def test_fingerprint_is_the_opening() -> None:
    a = fingerprint([SYSTEM], [HELLO])
    later = fingerprint(
        [SYSTEM], [HELLO, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "?"}]
    )
    assert a is not None and a == later and usable(a) == a
    assert a.startswith("fp.")
    as_parts = fingerprint(
        [{"content": [{"type": "text", "text": "You are terse."}], "role": "system"}], [HELLO]
    )
    assert as_parts == a
    assert fingerprint([], [HELLO]) != a
    assert fingerprint([SYSTEM], [{"role": "user", "content": "bye"}]) != a
    assert fingerprint([SYSTEM], [{"role": "assistant", "content": "x"}]) is None


def test_same_fingerprint_different_principals_different_sessions() -> None:
    resolver = IdentityResolver(b"k" * 32)
    fp = fingerprint([SYSTEM], [HELLO])
    assert fp is not None
    one = resolver.session_key(Identity("default", "key:one"), fp)
    two = resolver.session_key(Identity("default", "key:two"), fp)
    assert one != two


def test_settings_validation() -> None:
    validate(Settings(session_sources=("header", "cookie", "body", "fingerprint")))
    validate(Settings(client_mode="auto"))
    validate(Settings(workers=2))  # the header alone: sessions stay pinned to one worker
    validate(Settings(session_sources=("fingerprint",), workers=2, redis_url="redis://h:6379"))
    bad = [
        Settings(session_sources=()),
        Settings(session_sources=("header", "header")),
        Settings(session_sources=("query",)),
        Settings(session_cookie="a b"),
        Settings(session_sources=("body",), session_body_fields=()),
        Settings(session_body_fields=("metadata..x",)),
        Settings(client_mode="full"),
        Settings(client_mode_header="X-Mode"),
        Settings(client_mode_header="x-session-id"),
        Settings(session_sources=("header", "fingerprint"), workers=2),
        Settings(session_sources=("cookie",), ext_proc_endpoints=("a:1", "b:2")),
    ]
    for settings in bad:
        with pytest.raises(ConfigError):
            validate(settings)


def test_header_only_route_requires_the_header() -> None:
    chat = routes(Settings(), Upstream.parse("https://api.openai.com"))[0]
    assert chat["match"]["headers"] == [{"name": "x-session-id", "present_match": True}]


@pytest.mark.parametrize("extra", ["cookie", "body", "fingerprint"])
def test_other_sources_route_every_chat_request(extra: str) -> None:
    settings = Settings(session_sources=("header", extra))
    chat, messages, _api, other = routes(settings, Upstream.parse("https://api.openai.com"))
    assert chat["match"] == {"path": CHAT_PATH}
    assert messages["match"] == {"path": "/v1/messages"}  # Anthropic Messages alike
    assert "typed_per_filter_config" not in chat and "typed_per_filter_config" not in messages
    assert other["typed_per_filter_config"]
