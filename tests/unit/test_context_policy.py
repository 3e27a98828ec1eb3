"""Context settings per route and per tenant: config parsing and validation, resolution and
precedence, and the plan under per-request settings with caches shared between policies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from extproc.config import ConfigError, Settings, load_settings
from extproc.context import ContextManager, ContextSettings
from extproc.context.manager import UserContextMessage
from extproc.context.policy import Policies, route_of
from extproc.rewrite import policies
from store.model import Message, Turn
from tests.unit.test_context_manager import MODELS, request, turn, user


def settings_from(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "sessiongate.toml"
    path.write_text("version = 1\n" + text)
    return load_settings(path, {}, environ={})


CONFIG = """
context_strategy = "auto"
client_mode = "append"

[context.routes."/support"]
strategy = "window"
max_messages = 4
client_mode = "manage"

[context.routes."/support/vip"]
step = 0.5

[tenants.acme.context]
facts_share = 0
strategy = "relevance"

[tenants.pinned]
sqlite_path = "/tmp/pinned.db"

[tenants.pinned.context]
enabled = false
"""


def test_route_and_tenant_tables_parsed_and_converted(tmp_path: Path) -> None:
    s = settings_from(tmp_path, CONFIG)
    routes = s.context["routes"]
    assert routes["/support"] == {"strategy": "window", "max_messages": 4, "client_mode": "manage"}
    assert routes["/support/vip"] == {"step": 0.5}
    assert s.context["tenants"] == {
        "acme": {"facts_share": 0.0, "strategy": "relevance"},
        "pinned": {"enabled": False},
    }
    # `tenants` still means "pinned to its own store": a context-only tenant is not pinned.
    assert set(s.tenants) == {"pinned"} and "context" not in s.tenants["pinned"]


def test_precedence_tenant_over_route_over_global(tmp_path: Path) -> None:
    p = policies(settings_from(tmp_path, CONFIG))
    assert p.resolve("someone", "/v1/chat/completions").name == "global"
    support = p.resolve("someone", "/support/v1/chat/completions?x=1")
    assert support.name == "route:/support"
    assert (support.context.strategy, support.context.max_messages) == ("window", 4)
    assert support.client_mode == "manage"
    vip = p.resolve("someone", "/support/vip/v1/chat/completions")
    # The longest prefix only: its own table over the global settings.
    assert vip.name == "route:/support/vip" and vip.context.step == 0.5
    assert vip.context.strategy == "auto" and vip.client_mode == "append"
    both = p.resolve("acme", "/support/v1/chat/completions")
    assert both.name == "tenant:acme,route:/support"
    assert both.context.strategy == "relevance"  # tenant over route
    assert both.context.max_messages == 4 and both.client_mode == "manage"  # route kept
    assert both.context.facts_share == 0
    assert p.resolve("acme", "/v1/chat/completions").name == "tenant:acme"


def test_resolution_is_memoised_and_bounded(tmp_path: Path) -> None:
    p = policies(settings_from(tmp_path, CONFIG))
    first = p.resolve("acme", "/support/v1/chat/completions")
    assert p.resolve("acme", "/support/other") is first
    for i in range(100):  # tenants and paths without overrides share the global policy
        assert p.resolve(f"t{i}", f"/x{i}") is p.default
    assert len(p._memo) <= (1 + 2) * (1 + 2)


def test_route_of_ignores_the_query_string() -> None:
    assert route_of("/a/b?c=/d", ("/a/b", "/a")) == "/a/b"
    assert route_of("/ab", ("/a/b",)) == ""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[context.routes."/x"]\nstep = 0', 'context.routes."/x": context_step'),
        ('[context.routes."/x"]\nstrategy = "best"', 'context.routes."/x": context_strategy'),
        ('[context.routes."/x"]\nclient_mode = "x"', 'context.routes."/x": client_mode'),
        ('[context.routes."/x"]\nwindow = 5', "unknown key(s) window"),
        ('[context.routes."/x"]\nmodels = 5', "unknown key(s) models"),
        ('[context.routes."x"]\nstep = 0.1', "a path prefix starts with /"),
        ('[context.routes."/x"]\nmax_messages = "many"', "context_max_messages"),
        ("[tenants.a.context]\nfacts_share = 0.9", "tenants.a.context: context_facts_share"),
        ("[tenants.a.context]\nuser_share = 0.6", "tenants.a.context: context_user_share"),
        (
            "[tenants.a.context]\nfacts_share = 0.5\nsummary_share = 0.5",
            "tenants.a.context: context_facts_share + context_summary_share",
        ),
        ("[tenants.a.context]\nimage_tokens = 1", "unknown key(s) image_tokens"),
    ],
)
def test_overrides_validated_like_global_settings(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as caught:
        settings_from(tmp_path, text)
    assert message in str(caught.value)


def test_route_summary_off_with_a_global_summarizer(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("x")
    s = settings_from(
        tmp_path,
        'context_summary_share = 0.1\ncontext_summarizer_url = "http://127.0.0.1:1/v1"\n'
        f'context_summarizer_api_key_file = "{key}"\n'
        '[context.routes."/cheap"]\nsummary_share = 0\n',
    )
    assert policies(s).resolve("", "/cheap/v1").context.summary_share == 0


def test_routes_from_the_environment_as_toml_text(tmp_path: Path) -> None:
    s = load_settings(
        None, {}, environ={"SESSIONGATE_CONTEXT": 'routes."/r" = {strategy = "window"}'}
    )
    assert s.context["routes"] == {"/r": {"strategy": "window"}}


# --- the plan under per-request settings, caches shared -----------------------------------


def plan_for(cm: ContextManager, history: list[Turn], text: str, **kw: Any) -> Any:
    req = request([user(text)])
    return cm.plan("s", req.body, req.model, req.system_messages, req.new_messages, history, **kw)


def planted(n: int) -> list[Turn]:
    history = [turn(i, words=60) for i in range(n)]
    history[0] = Turn(
        "t0",
        (user("My name is Zoltan and I prefer tea."),),
        {"role": "assistant", "content": "Noted."},
    )
    return history


def test_facts_extracted_for_any_policy_that_uses_them() -> None:
    """Global facts off, one route on: the shared turn cache still holds facts, so the route
    gets them, whichever policy saw the session first."""
    base = ContextSettings(models=MODELS, facts_share=0.0)
    route = ContextSettings(models=MODELS, facts_share=0.2)
    p = Policies(base, "append", {"/facts": {"facts_share": 0.2}})
    cm = ContextManager(base, extract_facts=any(x.context.facts_share for x in p.all()))
    history = planted(60)
    off = plan_for(cm, history, "hello")  # the global policy indexes the session first
    assert off.facts == 0 and off.dropped_turns
    on = plan_for(cm, history, "hello", settings=route)
    assert on.facts >= 1 and "Zoltan" in on.system[-1]["content"]
    assert plan_for(cm, history, "hello").facts == 0  # and off again for the global policy
    assert cm.indexes.rebuilds == 1  # one index for the session, shared


def test_per_request_window_settings() -> None:
    cm = ContextManager(ContextSettings(models=MODELS))
    history = [turn(i, words=5) for i in range(10)]
    assert plan_for(cm, history, "hi").turns == history
    capped = plan_for(cm, history, "hi", settings=ContextSettings(models=MODELS, max_messages=4))
    assert len(capped.turns) <= 2
    small = ContextSettings(models={}, default_window=512)
    assert plan_for(cm, history, "hi", settings=small).window == 4096  # models stay global
    unknown = request([user("hi")], model="unknown-model")
    plan = cm.plan("s", unknown.body, unknown.model, (), unknown.new_messages, history, "", small)
    assert plan.window == 512
    off = plan_for(cm, history, "hi", settings=ContextSettings(models=MODELS, enabled=False))
    assert off.outcome == "disabled"


# --- user context in the plan ----------------------------------------------------------------


def user_message(words: int) -> UserContextMessage:
    message: Message = {"role": "system", "content": "User context:\n" + "pref " * words}
    from extproc.tokens import count_message

    return UserContextMessage(message, count_message(message, 765))


def test_user_context_after_the_system_prompt_before_history() -> None:
    cm = ContextManager(ContextSettings(models=MODELS))
    history = [turn(0, sys=({"role": "system", "content": "Be brief."},)), turn(1)]
    uc = user_message(10)
    plan = plan_for(cm, history, "hi", user=uc)
    assert [m["content"] for m in plan.system] == ["Be brief.", uc.message["content"]]
    assert plan.user_tokens == uc.tokens and plan.turns == history
    again = plan_for(cm, history, "hi", user=uc)
    assert again.system[-1] is uc.message  # the same bytes every turn (prompt caches)


def test_user_context_within_its_share_or_not_at_all() -> None:
    cm = ContextManager(ContextSettings(models=MODELS))
    big = user_message(400)  # over 5% of a 4,096 window
    plan = plan_for(cm, [turn(1)], "hi", user=big)
    assert plan.user_tokens == 0 and len(plan.system) == 0
    wide = ContextSettings(models=MODELS, user_share=0.3)
    assert plan_for(cm, [turn(1)], "hi", user=big, settings=wide).user_tokens == big.tokens
    off = ContextSettings(models=MODELS, user_share=0)
    assert plan_for(cm, [turn(1)], "hi", user=user_message(3), settings=off).user_tokens == 0


def test_history_yields_to_the_user_context_and_the_budget_holds() -> None:
    cm = ContextManager(ContextSettings(models=MODELS))
    history = [turn(i, words=60) for i in range(60)]
    uc = user_message(60)
    without = plan_for(cm, history, "hi")
    cm2 = ContextManager(ContextSettings(models=MODELS))
    with_uc = plan_for(cm2, history, "hi", user=uc)
    assert with_uc.user_tokens == uc.tokens
    assert with_uc.injected + uc.tokens <= with_uc.available
    assert with_uc.prompt_tokens <= with_uc.window - with_uc.reserved_output
    # (Not necessarily fewer turns: the cut is quantized on steps of the smaller budget.)
    assert with_uc.system[-1] is uc.message and without.user_tokens == 0


def test_tool_exchange_drops_the_user_context_first() -> None:
    models = {"small": {"window": 1024, "margin": 0.0}}
    cm = ContextManager(ContextSettings(models=models))
    share = ContextSettings(models=models, user_share=0.5)
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    history = [
        Turn("a", (user("start " + "x " * 150),), {"role": "assistant", "tool_calls": calls}),
    ]
    req = request([{"role": "tool", "tool_call_id": "c1", "content": "r " * 300}])
    alone = cm.plan("s", req.body, req.model, (), req.new_messages, history, "", share)
    assert alone.outcome == "fit"
    slack = alone.available - alone.injected
    words = 1
    while user_message(words).tokens <= slack:
        words += 1
    uc = user_message(words)  # fits what the request leaves, not beside the exchange
    assert uc.tokens <= alone.available
    plan = cm.plan("s", req.body, req.model, (), req.new_messages, history, "", share, uc)
    assert plan.outcome == "fit" and plan.turns == history and plan.user_tokens == 0
    assert all(m is not uc.message for m in plan.system)


def test_every_context_setting_reaches_the_context_manager(tmp_path: Path) -> None:
    """`context_settings` maps each ContextSettings field from `context_<name>`: a setting
    added to one side only fails here, not silently at run time."""
    import dataclasses

    from extproc.rewrite import context_settings

    key = tmp_path / "summarizer.key"
    key.write_text("k\n")
    settings = Settings(
        context_max_messages=7,
        context_user_share=0.02,
        context_summarizer_api_key_file=key,
        context={"models": {"m": {"window": 1000}}},
    )
    mapped = context_settings(settings)
    for item in dataclasses.fields(ContextSettings):
        if item.name not in ("models", "summarizer_api_key_file"):
            assert getattr(mapped, item.name) == getattr(settings, f"context_{item.name}")
    assert (mapped.max_messages, mapped.user_share) == (7, 0.02)
    assert mapped.summarizer_api_key_file == str(key)
    assert mapped.models == {"m": {"window": 1000}}
