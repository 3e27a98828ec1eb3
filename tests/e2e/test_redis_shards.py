"""`sessiongate up` with `redis_urls`: sessions sharded over two redis-server processes of our
own, checked by reading each node's keys with redis-py."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.identity import IdentityResolver, load_hmac_key
from store.redis import hash_tag
from store.sharded import Rendezvous, shard_name
from tests.e2e.conftest import Mock, marker, start_gateway
from tests.store.redis_servers import RedisServer, start_server

API_KEY = "sk-shards"


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[RedisServer]]:
    started: list[RedisServer] = []
    try:
        for i in range(2):
            started.append(start_server(tmp_path / f"redis{i}"))
        yield started
    finally:
        for node in started:
            node.kill()


def sessions_per_node(
    key_file: Path, nodes: list[RedisServer], per_node: int
) -> dict[int, dict[str, str]]:
    """Session ids whose session keys the gateway will place on each node (node index ->
    session id -> session key), derived exactly as the gateway derives them: the HMAC of
    (tenant, principal, session id), then rendezvous hashing over the nodes' names."""
    resolver = IdentityResolver(load_hmac_key(key_file, create=False))
    identity = resolver.resolve({"authorization": f"Bearer {API_KEY}"}, {}, {})
    assert identity is not None
    ring = Rendezvous([shard_name(node.url) for node in nodes])
    chosen: dict[int, dict[str, str]] = {i: {} for i in range(len(nodes))}
    for n in itertools.count():
        session_id = f"shard-{n}"
        session_key = resolver.session_key(identity, session_id)
        index = ring.index_of(session_key)
        if len(chosen[index]) < per_node:
            chosen[index][session_id] = session_key
        if all(len(ids) == per_node for ids in chosen.values()):
            return chosen
    raise AssertionError("unreachable")


def tags_on(node: RedisServer) -> set[str]:
    keys = [key.decode() for key in node.admin().scan_iter(match="sg:*")]
    return {key[key.index("{") + 1 : key.index("}")] for key in keys}


def test_up_with_two_redis_urls_stores_sessions_on_both_nodes(
    mock: Mock, nodes: list[RedisServer], tmp_path: Path
) -> None:
    key_file = tmp_path / "hmac.key"
    key_file.write_text("s" * 64)
    key_file.chmod(0o600)
    gateway = start_gateway(
        tmp_path / "gateway",
        mock.url,
        *("--hmac-key-file", str(key_file)),
        *("--redis-urls", nodes[0].url, "--redis-urls", nodes[1].url),
    )
    try:
        placement = sessions_per_node(key_file, nodes, per_node=3)
        for sessions in placement.values():
            for session_id in sessions:
                client = gateway.client(session_id, api_key=API_KEY)
                first, second = marker(), marker()
                for text in (first, second):
                    client.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": text}]
                    )
                messages = mock.request_with(second)["body"]["messages"]
                assert [m["content"] for m in messages if m["role"] == "user"] == [first, second]
        for index, node in enumerate(nodes):
            assert node.admin().dbsize() > 0
            assert tags_on(node) == {hash_tag(key) for key in placement[index].values()}
    finally:
        assert gateway.proc.stop() == 0, gateway.proc.log()
