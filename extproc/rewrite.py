"""The blocking rewrite filter: one instance per ext_proc stream.

Request headers decide whether this request gets memory at all (no: skip the body with a mode
override, so Envoy sends nothing more). The buffered request body is then replaced by the
session's history plus the new messages, and the turn id goes to the capture filter as dynamic
metadata.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from extproc import client_modes, mutations
from extproc import session_sources as sources
from extproc import user_context as users
from extproc.config import Settings, context_table
from extproc.context import ContextManager, ContextPlan, ContextSettings
from extproc.context.manager import FIT, TOOL_EXCHANGE_TOO_LARGE, TRIMMED, UserContextMessage
from extproc.context.policy import Policies, Policy
from extproc.context.strategy import STRATEGIES, STRATEGY_HEADER
from extproc.context.window import SIZE_LIMIT
from extproc.errors import openai_error
from extproc.identity import ANONYMOUS, Identity, IdentityResolver, valid_session_id
from extproc.metrics import Metrics
from extproc.protocols import formats
from extproc.protocols import openai_chat as chat
from extproc.protocols.formats import WireFormat
from extproc.session_ops import SessionOp, SessionOpError, parse_session_op
from store import PendingTurn, SessionStore, StoreRouter
from store.session import UserContext

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SessionContext:
    session_key: str  # "" until a body-stage source (body, fingerprint) has found the session
    session_id: str  # raw: only used as the ext_proc affinity key, never stored
    identity: Identity
    user_agent: str = ""
    op: SessionOp | None = None
    mode: str = client_modes.APPEND  # the client mode: setting, or the request's mode header
    source: str = sources.HEADER
    strategy: str = ""  # the request's x-sessiongate-strategy (empty: the policy's)
    policy: Policy | None = None  # the context settings for its tenant and route
    endpoint: str = ""  # sessiongate's own API (user_context.PATH), not a chat request
    wire: WireFormat = formats.OPENAI  # the request's wire format, by its path


# ContextSettings fields that are not simply the setting `context_<name>`.
_CONTEXT_SPECIAL = frozenset({"models", "summarizer_api_key_file"})


def context_settings(settings: Settings) -> ContextSettings:
    """The `context_*` settings as extproc.context takes them (it does not import config)."""
    values = {
        item.name: getattr(settings, f"context_{item.name}")
        for item in dataclasses.fields(ContextSettings)
        if item.name not in _CONTEXT_SPECIAL
    }
    return ContextSettings(
        **values,
        models=settings.context.get("models", {}),
        summarizer_api_key_file=str(settings.context_summarizer_api_key_file or ""),
    )


def policies(settings: Settings) -> Policies:
    """The global context settings with the `[context.routes]` and `[tenants.*.context]`
    overrides (validated at start by config.py)."""
    tables = context_table(settings.context)
    return Policies(
        context_settings(settings),
        settings.client_mode,
        tables.get("routes", {}),
        tables.get("tenants", {}),
    )


def planned_prompt_tokens(figures: Mapping[str, str | int]) -> int:
    """The prompt count of a request sent as planned (outcome fit or trimmed, corrected for
    turns the body size limit cut), the calibration's sample; 0 when the request went
    unchanged or unplanned (its count is not the prompt's)."""
    if figures.get("context_outcome") not in (FIT, TRIMMED):
        return 0
    return int(figures.get("context_prompt_estimate", 0))


class Rewriter:
    """Shared per process; holds no per-request state."""

    def __init__(
        self,
        settings: Settings,
        resolver: IdentityResolver,
        store: StoreRouter,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        self.store = store
        self.metrics = metrics
        self._namespaces = (settings.jwt_metadata_namespace, "sessiongate.identity")
        self.policies = policies(settings)
        self.context = ContextManager(
            self.policies.default.context,
            metrics.inc,
            # Turn info is shared by every policy: facts are extracted if any of them uses them.
            extract_facts=any(p.context.facts_share > 0 for p in self.policies.all()),
        )
        self.users = users.UserContexts(
            settings.context_user_cache_s, settings.context_image_tokens
        )
        # Only when some policy injects it: otherwise no request reads the user document.
        self._user_context = any(
            p.context.user_share > 0 and p.context.enabled for p in self.policies.all()
        )

    def on_request_headers(self, request: Any) -> tuple[Any, SessionContext | None]:
        """The headers response, and the session when the body should come to us."""
        headers = mutations.headers_dict(request.request_headers)
        settings = self.settings
        header = settings.session_header
        ours = (header, settings.session_op_header, settings.client_mode_header, STRATEGY_HEADER)
        remove = tuple(h for h in ours if h in headers)
        path = headers.get(":path", "").partition("?")[0]
        if path.startswith(users.API_PREFIX):
            return self._api_headers(request, headers, path, remove)
        session_id, source = self._session_from_headers(headers)
        body_stage = self._body_stage
        if session_id is None and not body_stage:
            self.metrics.inc("rewrite.pass_through.not_applicable")
            return mutations.request_headers_pass_through(remove), None
        wire = formats.for_path(path)
        error = (wire or formats.OPENAI).error_body  # the provider's own error shape
        mode = headers.get(settings.client_mode_header, "").strip().lower()
        if mode and mode not in client_modes.MODES:
            name = settings.client_mode_header
            expected = ", ".join(client_modes.MODES)
            return self._reject("client_mode", error, f"expected one of {expected}", name)
        if session_id is not None and not valid_session_id(session_id):
            return self._reject(
                "session_id", error, "expected 1-128 characters from [A-Za-z0-9._:-]", header
            )
        op = None
        if settings.session_op_header in headers:
            try:
                op = parse_session_op(headers[settings.session_op_header])
            except SessionOpError as exc:
                return self._reject("session_op", error, str(exc), settings.session_op_header)
        strategy = headers.get(STRATEGY_HEADER, "").strip().lower()
        if strategy and strategy not in STRATEGIES:
            expected = ", ".join(STRATEGIES)
            return self._reject("strategy", error, f"expected one of {expected}", STRATEGY_HEADER)
        if wire is None or not self._is_chat_request(headers):
            self.metrics.inc("rewrite.pass_through.not_applicable")
            return mutations.request_headers_pass_through(remove), None
        identity = self.resolver.resolve(
            headers,
            mutations.metadata_dict(request, self._namespaces),
            mutations.attributes_dict(request) if request.attributes else {},
        )
        if identity is None:
            self.metrics.inc("rewrite.pass_through.no_identity")
            return mutations.request_headers_pass_through(remove), None
        if request.request_headers.end_of_stream:
            self.metrics.inc("rewrite.pass_through.no_body")
            return mutations.request_headers_pass_through(remove), None
        policy = self.policies.resolve(identity.tenant, path)
        context = SessionContext(
            self.resolver.session_key(identity, session_id) if session_id is not None else "",
            session_id or "",
            identity,
            headers.get("user-agent", "")[:256],
            op,
            mode or policy.client_mode,
            source,
            strategy,
            policy,
            wire=wire,
        )
        return mutations.request_headers_continue(remove), context

    def _reject(
        self, kind: str, error: formats.ErrorBody, problem: str, header: str
    ) -> tuple[Any, None]:
        """A 400 for a bad sessiongate header, in the provider's error shape, counted."""
        self.metrics.inc(f"rewrite.rejected.{kind}")
        body = error(f"invalid {header}: {problem}", code=f"invalid_{kind}", param=header)
        return mutations.immediate_error(400, body, f"sessiongate_invalid_{kind}"), None

    @property
    def _body_stage(self) -> bool:
        """Some configured source needs the body: every chat request comes to us."""
        return not sources.BODY_STAGE.isdisjoint(self.settings.session_sources)

    def _session_from_headers(self, headers: dict[str, str]) -> tuple[str | None, str]:
        """The session id from the header (validated by the caller: a bad one is a 400) or
        the cookie (a bad one is skipped), whichever comes first in `session_sources`."""
        for source in self.settings.session_sources:
            if source == sources.HEADER and self.settings.session_header in headers:
                return headers[self.settings.session_header], source
            if source == sources.COOKIE:
                value = sources.cookie_value(headers.get("cookie"), self.settings.session_cookie)
                if value is not None:
                    if sources.usable(value) is not None:
                        return value, source
                    self.metrics.inc("rewrite.session_source.invalid.cookie")
        return None, sources.HEADER

    def _session_from_body(self, context: SessionContext, parsed: Any) -> SessionContext | None:
        """The context completed by the first body-stage source that finds a session."""
        for source in self.settings.session_sources:
            value: str | None = None
            if source == sources.BODY:
                found = sources.body_value(parsed.body, self.settings.session_body_fields)
                if found is not None:
                    value = sources.usable(found[1])
                    if value is None:
                        self.metrics.inc("rewrite.session_source.invalid.body")
            elif source == sources.FINGERPRINT and context.mode != client_modes.APPEND:
                value = sources.fingerprint(parsed.system_messages, parsed.new_messages)
            if value is not None:
                key = self.resolver.session_key(context.identity, value)
                return dataclasses.replace(
                    context, session_key=key, session_id=value, source=source
                )
        return None

    @staticmethod
    def _is_chat_request(headers: dict[str, str]) -> bool:
        """A POST of an uncompressed JSON body (the path already named a wire format)."""
        if headers.get(":method") != "POST":
            return False
        # A compressed request body cannot be rewritten: documented pass-through.
        if headers.get("content-encoding", "identity").strip().lower() != "identity":
            return False
        return "json" in headers.get("content-type", "application/json").lower()

    async def on_request_body(self, context: SessionContext, request: Any) -> Any:
        raw = request.request_body.body
        if context.endpoint:
            return await self._put_user_context(context, raw)
        if len(raw) > self.settings.max_body_bytes:
            self.metrics.inc("rewrite.rejected.too_large")
            body = context.wire.error_body(
                f"request body of {len(raw)} bytes exceeds the gateway's limit of "
                f"{self.settings.max_body_bytes} bytes (max_body_bytes)",
                code="request_too_large",
            )
            return mutations.immediate_error(413, body, "sessiongate_body_too_large")
        try:
            parsed = context.wire.parse_request(raw)
        except chat.RequestError as exc:
            # The provider answers the bad request in its own words; we add nothing.
            self.metrics.inc("rewrite.pass_through.unparseable")
            log.debug("request body passed through: %s", exc)
            return mutations.request_body_unchanged()
        if not context.session_key:
            found = self._session_from_body(context, parsed)
            if found is None:
                self.metrics.inc("rewrite.pass_through.no_session")
                return mutations.request_body_unchanged()
            context = found
        self.metrics.inc(f"rewrite.session_source.{context.source}")
        try:
            async with asyncio.timeout(self.settings.server_deadline_s):
                return await self._rewrite(context, parsed)
        except Exception as exc:  # the store or our code failed: follow the failure mode
            self.metrics.inc("rewrite.failed")
            log.warning("rewrite failed (%s): %s", type(exc).__name__, exc)
            if self.settings.fail_open:
                return mutations.request_body_unchanged()
            body = context.wire.error_body(
                "sessiongate could not load this session's memory; try again",
                type_="server_error",
                code="session_unavailable",
            )
            return mutations.immediate_error(503, body, "sessiongate_rewrite_failed")

    async def _rewrite(self, context: SessionContext, parsed: Any) -> Any:
        """`parsed`: the wire format's request (body, system_messages, new_messages, model;
        messages in the store's shape)."""
        key = context.session_key
        tenant = context.identity.tenant
        store = self.store.for_tenant(tenant)
        policy = context.policy or self.policies.default
        user_load = self._user_context_load(store, context.identity, policy)
        # Read-your-writes: the previous turn of this session may still be in capture. Without
        # a session op, the pending check and the hot copy's version check share one Redis call.
        wait_s = self.settings.pending_wait_ms / 1000
        if context.op is None:
            waited, history = await store.history_after_pending(key, wait_s)
        else:
            waited = await store.wait_for_pending(key, wait_s)
            await self._apply_op(store, context, context.op)
            history = await store.history(key)
        if not waited:
            self.metrics.inc("rewrite.pending_wait_timeout")
        seen = client_modes.reconcile(
            context.mode,
            history,
            parsed.new_messages,
            append_regenerate=self.settings.append_regenerate,
        )
        self.metrics.inc(f"rewrite.client_mode.{seen.mode}.{seen.kind}")
        if seen.kind == client_modes.NOTHING_NEW:  # stored history only: no turn to record
            return mutations.request_body_unchanged()
        if seen.rewinds(len(history)):  # the request replaces the turns after keep_turns
            keep = seen.keep_turns
            await store.rewind(key, history[keep - 1].seq if keep else 0)
            history = history[:keep]
        if seen.matched_messages or seen.mode == client_modes.MANAGE:
            parsed = dataclasses.replace(parsed, new_messages=seen.new_messages)
        plan = self.context.plan(
            key,
            parsed.body,
            parsed.model,
            parsed.system_messages,
            parsed.new_messages,
            history,
            context.strategy,
            policy.context,
            await self._user_context_result(user_load),
        )
        body = b""
        dropped = 0
        build, limit = context.wire.build_body, self.settings.upstream_body_limit
        breakpoints = self.settings.context_cache_breakpoints
        if plan.unchanged and seen.mode == client_modes.MANAGE and plan.turns == ():
            # The client's body repeats its whole history: send the request's own part only
            # (unless a tool exchange would lose its calls; then the client's body as it is).
            if plan.outcome != TOOL_EXCHANGE_TOO_LARGE:
                body, _ = build(parsed, (), limit, parsed.system_messages, breakpoints)
        elif not plan.unchanged:
            body, dropped = build(parsed, plan.turns, limit, plan.system, breakpoints)
            if dropped:
                self.metrics.inc("rewrite.turns_dropped_for_size", dropped)
        figures = self._context_figures(plan, dropped)
        figures["context_policy"] = policy.name
        prompt = int(figures["context_prompt_estimate"])
        turn_id = self.store.new_turn_id(tenant)
        self.store.begin_turn(
            PendingTurn(
                turn_id=turn_id,
                session_key=key,
                request_messages=parsed.new_messages,
                system_messages=parsed.system_messages,
                model=parsed.model,
                tenant=tenant,
                principal=context.identity.principal,
                scopes=context.identity.scopes,
                user_agent=context.user_agent,
                # Only used when the provider reports no usage.
                prompt_tokens_estimate=prompt or len(body) // 4,
                planned_prompt_tokens=planned_prompt_tokens(figures),
                wire_format="" if context.wire is formats.OPENAI else context.wire.name,
            )
        )
        if plan.unchanged and not body:
            self.metrics.inc("rewrite.unchanged")
            return mutations.request_body_kept(turn_id, context.session_id, figures)
        self.metrics.inc("rewrite.injected")
        return mutations.request_body_replaced(body, turn_id, context.session_id, figures)

    def _context_figures(self, plan: ContextPlan, size_dropped: int) -> dict[str, str | int]:
        """Count the plan into the metrics; the same figures go to dynamic metadata."""
        inc = self.metrics.inc
        inc(f"context.outcome.{plan.outcome}")
        dropped = dict(plan.dropped)
        if size_dropped:
            dropped[SIZE_LIMIT] = size_dropped
        for strategy, turns in dropped.items():
            inc(f"context.dropped_turns.{strategy}", turns)
        injected_turns = 0 if plan.unchanged else len(plan.turns) - size_dropped
        injected, prompt = plan.injected, plan.prompt_tokens
        if size_dropped:
            cut = sum(self.context.turn_info.get(t).tokens for t in plan.turns[:size_dropped])
            injected, prompt = max(injected - cut, 0), max(prompt - cut, 0)
        inc("context.history_tokens_available", max(plan.available, 0))
        inc("context.history_tokens_injected", injected)
        if plan.facts:
            inc("context.facts_injected", plan.facts)
            inc("context.facts_tokens_injected", plan.facts_tokens)
        inc(f"context.strategy.{plan.strategy}")
        inc(f"context.query.{plan.query}")
        if plan.summary_tokens:
            inc("context.summary_injected")
            inc("context.summary_tokens_injected", plan.summary_tokens)
        if plan.relevant_turns:
            inc("context.relevant_turns_injected", plan.relevant_turns)
        if plan.user_tokens and not plan.unchanged:
            inc("context.user_context_injected")
            inc("context.user_context_tokens_injected", plan.user_tokens)
        return {
            "context_outcome": plan.outcome if not size_dropped else "trimmed",
            "context_window": plan.window,
            "context_reserved_output": plan.reserved_output,
            "context_history_available": max(plan.available, 0),
            "context_history_injected": injected,
            "context_turns_injected": injected_turns,
            "context_turns_dropped": sum(dropped.values()),
            "context_dropped_by": ",".join(f"{k}:{v}" for k, v in sorted(dropped.items())),
            "context_facts": plan.facts,
            "context_facts_tokens": plan.facts_tokens,
            "context_prompt_estimate": prompt,
            "context_strategy": plan.strategy,
            "context_query": plan.query,
            "context_summary_tokens": plan.summary_tokens,
            "context_relevant_turns": plan.relevant_turns,
            "context_user_tokens": 0 if plan.unchanged else plan.user_tokens,
            "context_margin_permille": round(plan.margin * 1000),
        }

    async def _apply_op(self, store: SessionStore, context: SessionContext, op: SessionOp) -> None:
        key = context.session_key
        if op.kind == "clear":
            await store.clear(key)
        elif op.kind == "rewind":
            await store.rewind(key, op.keep_turns)
        else:  # fork: only from a session of the same principal, never another's
            source = self.resolver.session_key(context.identity, op.source_session_id)
            await store.fork(source, key)
        self.metrics.inc(f"rewrite.session_op.{op.kind}")

    # --- the user context: loaded beside the history; sessiongate's own API for it --------

    def _user_context_load(
        self, store: SessionStore, identity: Identity, policy: Policy
    ) -> UserContextMessage | asyncio.Task[UserContextMessage | None] | None:
        """The principal's rendered user context when cached (or not wanted), else a task
        reading it while the history loads (no round trip added to the request's latency)."""
        if not (self._user_context and policy.context.enabled and policy.context.user_share > 0):
            return None
        if identity.principal == ANONYMOUS:
            return None
        principal_key = self.resolver.principal_key(identity)
        fresh, rendered = self.users.cached(principal_key)
        if fresh:
            return rendered
        return asyncio.get_running_loop().create_task(self._load_user(store, principal_key))

    async def _load_user(
        self, store: SessionStore, principal_key: str
    ) -> UserContextMessage | None:
        try:
            return await self.users.load(store, principal_key)
        except Exception as exc:  # fail open: the user context is an extra, never a blocker
            self.metrics.inc("context.user_context.failed")
            log.warning("user context not loaded (%s): %s", type(exc).__name__, exc)
            return None

    @staticmethod
    async def _user_context_result(
        load: UserContextMessage | asyncio.Task[UserContextMessage | None] | None,
    ) -> UserContextMessage | None:
        return await load if isinstance(load, asyncio.Task) else load

    def _api_headers(
        self, request: Any, headers: dict[str, str], path: str, remove: tuple[str, ...]
    ) -> tuple[Any, SessionContext | None]:
        """`/sessiongate/...`: answered here, never forwarded. GET and DELETE are answered
        once the store has (the transport awaits the coroutine); PUT comes back with its
        body (`_put_user_context`)."""
        method = headers.get(":method", "")
        if path != users.PATH:
            return _api_error(404, f"no such sessiongate endpoint: {path}", "not_found"), None
        if method not in ("GET", "PUT", "DELETE"):
            return _api_error(405, f"{method} {path}: use GET, PUT or DELETE", "bad_method"), None
        identity = self.resolver.resolve(
            headers,
            mutations.metadata_dict(request, self._namespaces),
            mutations.attributes_dict(request) if request.attributes else {},
        )
        if identity is None or identity.principal == ANONYMOUS:
            self.metrics.inc("user_context.rejected.no_identity")
            message = "the user context belongs to an authenticated principal: no identity found"
            return _api_error(401, message, "unauthenticated", "authentication_error"), None
        context = SessionContext("", "", identity, endpoint=path)
        if method == "PUT":
            if request.request_headers.end_of_stream:
                return _api_error(400, "PUT needs a JSON body", "invalid_user_context"), None
            return mutations.request_headers_continue(remove), context
        return self._user_context_call(context, method), None

    async def _user_context_call(self, context: SessionContext, method: str) -> Any:
        """GET or DELETE (the caller's own document, keyed by its principal key)."""
        principal_key = self.resolver.principal_key(context.identity)
        store = self.store.for_tenant(context.identity.tenant)
        try:
            async with asyncio.timeout(self.settings.server_deadline_s):
                if method == "DELETE":
                    doc = UserContext()
                    await store.put_user_context(principal_key, doc)
                    self.users.stored(principal_key, doc)
                    self.metrics.inc("user_context.deleted")
                    return _api_json(200, b'{"deleted":true}')
                doc = await store.get_user_context(principal_key)
        except Exception as exc:
            return self._user_context_failed(exc)
        self.metrics.inc("user_context.read")
        return _api_json(200, users.to_json(doc))

    async def _put_user_context(self, context: SessionContext, raw: bytes) -> Any:
        try:
            doc = users.parse(raw, self.settings.context_user_max_bytes)
        except users.UserContextError as exc:
            self.metrics.inc("user_context.rejected.body")
            return _api_error(exc.status, str(exc), exc.code)
        principal_key = self.resolver.principal_key(context.identity)
        store = self.store.for_tenant(context.identity.tenant)
        try:
            async with asyncio.timeout(self.settings.server_deadline_s):
                await store.put_user_context(principal_key, doc)
        except Exception as exc:
            return self._user_context_failed(exc)
        self.users.stored(principal_key, doc)
        self.metrics.inc("user_context.written")
        return _api_json(200, users.to_json(doc))

    def _user_context_failed(self, exc: Exception) -> Any:
        """The API always fails closed (it is not LLM traffic: nothing to fall back to)."""
        self.metrics.inc("user_context.failed")
        log.warning("user context call failed (%s): %s", type(exc).__name__, exc)
        message = "sessiongate could not reach the user context store; try again"
        return _api_error(503, message, "user_context_unavailable", "server_error")


def _api_error(status: int, message: str, code: str, type_: str = "invalid_request_error") -> Any:
    return mutations.immediate_error(
        status, openai_error(message, type_=type_, code=code), f"sessiongate_{code}"
    )


def _api_json(status: int, body: bytes) -> Any:
    # immediate_error's metadata flag makes Envoy's local-reply mappers pass the body as it is.
    return mutations.immediate_error(status, body, "sessiongate_user_context")
