"""The user-context document: request bodies, rendering, the per-process cache."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from extproc import user_context as users
from store.session import UserContext


def test_parse_accepts_the_three_objects() -> None:
    doc = users.parse(b'{"preferences": {"language": "fr"}, "account": {"plan": "pro"}}', 1000)
    assert doc == UserContext(preferences={"language": "fr"}, account={"plan": "pro"})
    assert users.parse(b"{}", 1000) == UserContext()


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"{nope", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_user_context"),
        (b'{"preferences": "tea"}', 400, "invalid_user_context"),
        (b'{"nickname": {}}', 400, "invalid_user_context"),
        (b'{"preferences": {"x": "' + b"y" * 2000 + b'"}}', 413, "request_too_large"),
    ],
)
def test_parse_refuses_bad_bodies(raw: bytes, status: int, code: str) -> None:
    with pytest.raises(users.UserContextError) as caught:
        users.parse(raw, 1000)
    assert (caught.value.status, caught.value.code) == (status, code)


def test_render_is_stable_and_never_shows_the_account() -> None:
    a = UserContext(preferences={"b": 1, "a": [1, 2]}, settings={"tz": "UTC"}, account={"id": 7})
    b = UserContext(preferences={"a": [1, 2], "b": 1}, settings={"tz": "UTC"}, account={"id": 8})
    first, second = users.render(a), users.render(b)
    assert first is not None and second is not None
    assert first.message == second.message  # key order does not matter: sorted
    assert first.message["role"] == "system" and first.tokens > 0
    assert "id" not in first.message["content"]
    assert users.render(UserContext(account={"id": 1})) is None
    assert users.render(UserContext()) is None


class FakeStore:
    def __init__(self) -> None:
        self.docs: dict[str, UserContext] = {}
        self.reads = 0
        self.fail = False

    async def get_user_context(self, principal_key: str) -> UserContext:
        self.reads += 1
        await asyncio.sleep(0)
        if self.fail:
            raise OSError("down")
        return self.docs.get(principal_key, UserContext())

    async def put_user_context(self, principal_key: str, context: UserContext) -> None:
        self.docs[principal_key] = context


def test_cache_ttl_own_writes_and_shared_loads() -> None:
    now = [0.0]
    cache = users.UserContexts(5.0, clock=lambda: now[0])
    store = FakeStore()
    store.docs["p"] = UserContext(preferences={"tea": True})

    async def scenario() -> None:
        assert cache.cached("p") == (False, None)
        first, second = await asyncio.gather(cache.load(store, "p"), cache.load(store, "p"))
        assert store.reads == 1 and first == second and first is not None
        assert cache.cached("p") == (True, first)
        # Another replica's write: seen once the entry is older than the TTL.
        store.docs["p"] = UserContext(preferences={"tea": False})
        now[0] = 4.9
        assert cache.cached("p") == (True, first)
        now[0] = 5.0
        assert cache.cached("p")[0] is False
        # This process's own write: at once.
        cache.stored("p", UserContext())
        assert cache.cached("p") == (True, None)
        store.fail = True
        now[0] = 20
        with pytest.raises(OSError):
            await cache.load(store, "p")

    asyncio.run(scenario())


def test_a_write_during_a_read_is_not_overwritten_by_the_read() -> None:
    cache = users.UserContexts(60.0)
    store = FakeStore()
    store.docs["p"] = UserContext(preferences={"old": 1})

    async def scenario() -> None:
        load = asyncio.ensure_future(cache.load(store, "p"))
        await asyncio.sleep(0)  # the read is in flight
        cache.stored("p", UserContext(preferences={"new": 1}))
        await load
        fresh, rendered = cache.cached("p")
        assert fresh and rendered is not None and "new" in rendered.message["content"]

    asyncio.run(scenario())


def test_no_cache_with_a_zero_ttl() -> None:
    cache = users.UserContexts(0)
    cache.stored("p", UserContext(preferences={"a": 1}))
    assert cache.cached("p") == (False, None)


def test_operator_cli_put_get_delete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from extproc.cli import main
    from extproc.identity import Identity, IdentityResolver

    (tmp_path / "hmac.key").write_text("k" * 64)
    common = ["--state-dir", str(tmp_path), "--tenant", "acme", "--principal", "key:abc"]
    monkeypatch.delenv("SESSIONGATE_CONFIG", raising=False)
    assert main(["user-context", "put", *common, "--data", '{"settings": {"tz": "UTC"}}']) == 0
    assert json.loads(capsys.readouterr().out)["settings"] == {"tz": "UTC"}
    assert main(["user-context", "get", *common]) == 0
    assert json.loads(capsys.readouterr().out)["settings"] == {"tz": "UTC"}
    # Stored under the principal key the gateway derives for that identity.
    resolver = IdentityResolver(b"k" * 64)
    key = resolver.principal_key(Identity("acme", "key:abc"))
    assert key != "key:abc" and len(key) == 64
    assert main(["user-context", "delete", *common]) == 0
    assert json.loads(capsys.readouterr().out)["settings"] == {}
    assert main(["user-context", "put", *common, "--data", "[1]"]) == 2
