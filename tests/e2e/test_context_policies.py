"""Context settings per route and per tenant, and the principal's user context, through Envoy.

One gateway for the module: `[context.routes."/support"]` caps history at 2 messages (`up`
adds the chat route `/support/v1/chat/completions` for it), `[tenants.acme.context]` at 4 (the
tenant comes from a JWT claim verified by Envoy). What the mock provider received shows what
applied; `x-sessiongate-policy` names it. The user context is set through
`/sessiongate/v1/user-context` with the same credentials as chat requests.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from extproc.user_context import HEADER as USER_HEADER
from tests.e2e.conftest import Gateway, Mock, marker, start_gateway
from tests.e2e.jwt_helpers import Issuer

ISSUER = "https://issuer.policies.test"
AUDIENCE = "sessiongate-policies"
PATH = "/sessiongate/v1/user-context"


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer(ISSUER, AUDIENCE)


def start(directory: Path, mock: Mock, issuer: Issuer) -> Gateway:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "sessiongate.toml"
    config.write_text(
        "version = 1\n"
        '\n[context.routes."/support"]\nmax_messages = 2\nstrategy = "window"\n'
        '\n[context.routes."/managed"]\nclient_mode = "manage"\n'
        "\n[tenants.acme.context]\nmax_messages = 4\n"
    )
    return start_gateway(
        directory,
        mock.url,
        *("--config", str(config)),
        *("--jwt-jwks-file", str(issuer.write_jwks(directory / "jwks.json"))),
        *("--jwt-issuer", ISSUER, "--jwt-audiences", AUDIENCE),
    )


@pytest.fixture(scope="module")
def policy_gateway(
    mock: Mock, issuer: Issuer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gateway = start(tmp_path_factory.mktemp("policy-gateway"), mock, issuer)
    yield gateway
    assert gateway.proc.stop() == 0, gateway.proc.log()


def origin(gateway: Gateway) -> str:
    return gateway.base_url.rsplit("/v1", 1)[0]


def chat_client(gateway: Gateway, session: str, credential: str, prefix: str = "") -> openai.OpenAI:
    """`credential`: an API key, or a JWT (sent as `Authorization: Bearer`, like a key)."""
    http = openai.DefaultHttpxClient(verify=gateway.ssl_context())
    return openai.OpenAI(
        base_url=origin(gateway) + prefix + "/v1",
        api_key=credential,
        max_retries=0,
        timeout=20,
        default_headers={"x-session-id": session},
        http_client=http,
    )


def converse(client: openai.OpenAI, mock: Mock, turns: int) -> tuple[Any, list[dict[str, Any]]]:
    """`turns` requests in one session: the last reply, and what the provider got for it."""
    reply: Any = None
    tag = marker()
    for i in range(turns):
        reply = client.chat.completions.with_raw_response.create(
            model="mock-model", messages=[{"role": "user", "content": f"{tag} turn {i}"}]
        )
    sent: list[dict[str, Any]] = mock.request_with(f"{tag} turn {turns - 1}")["body"]["messages"]
    return reply, sent


def history_of(sent: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in sent[:-1] if m["role"] != "system"]


def api(gateway: Gateway, method: str, credential: str | None, body: Any = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {credential}"} if credential else {}
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body)
    with httpx.Client(verify=gateway.ssl_context(), timeout=20) as http:
        return http.request(method, origin(gateway) + PATH, headers=headers, content=content)


def key() -> str:
    return "sk-" + uuid.uuid4().hex


# --- per route, per tenant ---------------------------------------------------------------


def test_a_route_override_applies_to_its_path_only(policy_gateway: Gateway, mock: Mock) -> None:
    credential = key()
    session = "s-" + uuid.uuid4().hex[:8]
    support = chat_client(policy_gateway, session + "-support", credential, "/support")
    reply, sent = converse(support, mock, 4)
    assert reply.headers["x-sessiongate-policy"] == "route:/support"
    assert reply.headers["x-sessiongate-strategy"] == "window"
    assert len(history_of(sent)) == 2
    assert reply.headers["x-sessiongate-context"] == "trimmed"
    plain = chat_client(policy_gateway, session, credential)
    reply, sent = converse(plain, mock, 4)
    assert reply.headers["x-sessiongate-policy"] == "global"
    assert len(history_of(sent)) == 6


def test_a_route_can_choose_the_client_mode(policy_gateway: Gateway, mock: Mock) -> None:
    """An app on the /managed route resends its whole history (as apps without memory do):
    its route's `manage` mode deduplicates it against the store, so the provider sees each
    message once; nothing in the request says so."""
    credential = key()
    session = "s-" + uuid.uuid4().hex[:8]
    client = chat_client(policy_gateway, session, credential, "/managed")
    tag = marker()
    history: list[dict[str, Any]] = []
    reply: Any = None
    for i in range(3):
        history.append({"role": "user", "content": f"{tag} turn {i}"})
        reply = client.chat.completions.with_raw_response.create(
            model="mock-model", messages=history
        )
        history.append({"role": "assistant", "content": reply.parse().choices[0].message.content})
    assert reply.headers["x-sessiongate-policy"] == "route:/managed"
    sent = mock.request_with(f"{tag} turn 2")["body"]["messages"]
    assert sent == history[:-1]  # every message once, in order
    assert policy_gateway.counters()["rewrite.client_mode.manage.extended"] >= 2


def test_a_tenant_override_applies_to_that_tenant_only(
    policy_gateway: Gateway, mock: Mock, issuer: Issuer
) -> None:
    session = "s-" + uuid.uuid4().hex[:8]
    acme = issuer.token("alice", tenant="acme")
    reply, sent = converse(chat_client(policy_gateway, session, acme), mock, 4)
    assert reply.headers["x-sessiongate-policy"] == "tenant:acme"
    assert len(history_of(sent)) == 4
    # Tenant above route: acme on /support keeps its own cap, the route's strategy.
    reply, sent = converse(chat_client(policy_gateway, session + "v", acme, "/support"), mock, 4)
    assert reply.headers["x-sessiongate-policy"] == "tenant:acme,route:/support"
    assert len(history_of(sent)) == 4
    other = issuer.token("bob", tenant="globex")
    reply, sent = converse(chat_client(policy_gateway, session, other), mock, 4)
    assert reply.headers["x-sessiongate-policy"] == "global"
    assert len(history_of(sent)) == 6


# --- user context ------------------------------------------------------------------------


def user_context_of(sent: list[dict[str, Any]]) -> list[str]:
    return [
        m["content"]
        for m in sent
        if m["role"] == "system" and str(m.get("content", "")).startswith(USER_HEADER)
    ]


def test_user_context_is_the_principals_own(policy_gateway: Gateway, mock: Mock) -> None:
    a, b = key(), key()
    doc = {"preferences": {"language": "French"}, "settings": {"units": "metric"}}
    put = api(policy_gateway, "PUT", a, {**doc, "account": {"plan": "pro"}})
    assert put.status_code == 200, put.text
    assert put.json()["account"] == {"plan": "pro"}
    assert api(policy_gateway, "GET", a).json()["preferences"] == {"language": "French"}

    system = {"role": "system", "content": "Be brief."}
    session = "s-" + uuid.uuid4().hex[:8]
    client = chat_client(policy_gateway, session, a)
    tag = marker()
    reply = client.chat.completions.with_raw_response.create(
        model="mock-model",
        messages=[system, {"role": "user", "content": tag}],  # type: ignore[list-item]
    )
    sent = mock.request_with(tag)["body"]["messages"]
    assert sent[0] == system
    injected = user_context_of(sent)
    assert injected == [sent[1]["content"]] and "French" in injected[0]
    assert "pro" not in injected[0]  # the account is stored, never injected
    assert int(reply.headers["x-sessiongate-user-tokens"]) > 0
    assert policy_gateway.counters()["context.user_context_injected"] >= 1
    # The next turn starts with the same bytes (prompt caches keep hitting).
    tag2 = marker()
    client.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": tag2}])
    assert mock.request_with(tag2)["body"]["messages"][:2] == sent[:2]

    # B: none of A's, can read only its own (empty) document.
    tag = marker()
    reply = chat_client(policy_gateway, session, b).chat.completions.with_raw_response.create(
        model="mock-model", messages=[{"role": "user", "content": tag}]
    )
    assert user_context_of(mock.request_with(tag)["body"]["messages"]) == []
    assert reply.headers["x-sessiongate-user-tokens"] == "0"
    assert api(policy_gateway, "GET", b).json() == {
        "preferences": {},
        "settings": {},
        "account": {},
    }

    # DELETE: gone from the next request.
    assert api(policy_gateway, "DELETE", a).status_code == 200
    tag = marker()
    client.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": tag}])
    assert user_context_of(mock.request_with(tag)["body"]["messages"]) == []
    assert api(policy_gateway, "GET", a).json()["preferences"] == {}


@pytest.mark.parametrize(
    ("method", "credential", "body", "status", "code"),
    [
        ("PUT", "key", b"{not json", 400, "invalid_json"),
        ("PUT", "key", {"preferences": "tea"}, 400, "invalid_user_context"),
        ("PUT", "key", {"nickname": {}}, 400, "invalid_user_context"),
        ("PUT", "key", {"preferences": {"x": "y" * 20_000}}, 413, "request_too_large"),
        ("PUT", None, {}, 401, "unauthenticated"),
        ("GET", None, None, 401, "unauthenticated"),
        ("POST", "key", {}, 405, "bad_method"),
    ],
)
def test_user_context_bad_requests(
    policy_gateway: Gateway,
    mock: Mock,
    method: str,
    credential: str | None,
    body: Any,
    status: int,
    code: str,
) -> None:
    before = len(mock.requests())
    reply = api(policy_gateway, method, key() if credential else None, body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code and error["message"]
    assert len(mock.requests()) == before  # never forwarded to the provider


def test_user_context_survives_a_restart(
    mock: Mock, issuer: Issuer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = tmp_path_factory.mktemp("user-context-restart")
    credential = key()
    gateway = start(directory, mock, issuer)
    try:
        assert api(gateway, "PUT", credential, {"settings": {"tz": "UTC"}}).status_code == 200
    finally:
        assert gateway.proc.stop() == 0, gateway.proc.log()
    gateway = start(directory, mock, issuer)
    try:
        assert api(gateway, "GET", credential).json()["settings"] == {"tz": "UTC"}
    finally:
        assert gateway.proc.stop() == 0, gateway.proc.log()
