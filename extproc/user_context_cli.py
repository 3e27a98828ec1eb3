"""`sessiongate user-context get|put|delete`: an operator manages a principal's user context
in the configured store (the tenant's own store when it is pinned), the way the principal does
through `/sessiongate/v1/user-context`.

The principal is named as identity resolution names it: `--principal` (the stored form, e.g.
`jwt:…` or `key:…`, as session security documents show it), `--jwt-subject` (with the
configured `jwt_issuer`), or the API key read from stdin (`--api-key-stdin`, never a
flag: it would show in the process list). Keys are derived with the configured HMAC key, so
`hmac_key_file` must be the gateway's. A running gateway sees a change within
`context_user_cache_s`.
"""

from __future__ import annotations

import argparse
import sys

from extproc import user_context as users
from extproc.config import ConfigError, Settings
from extproc.identity import DEFAULT_TENANT, Identity, IdentityResolver, load_hmac_key
from store.session import UserContext

ACTIONS = ("get", "put", "delete")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("--tenant", default=DEFAULT_TENANT, help="the principal's tenant")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--principal", help="the principal as stored (jwt:…, key:…, mtls:…)")
    who.add_argument("--jwt-subject", help="a JWT `sub` (issuer: the configured jwt_issuer)")
    who.add_argument(
        "--api-key-stdin", action="store_true", help="read the principal's API key from stdin"
    )
    parser.add_argument(
        "--data", help="put: the JSON document (default: read from stdin after the API key)"
    )


def principal_of(args: argparse.Namespace, settings: Settings, resolver: IdentityResolver) -> str:
    if args.principal:
        return str(args.principal)
    if args.jwt_subject:
        issuer = settings.jwt_issuer
        if not issuer:
            raise ConfigError("jwt_issuer: needed to name a principal by --jwt-subject")
        return resolver.jwt_principal(issuer, args.jwt_subject)
    key = sys.stdin.readline().strip()
    if not key:
        raise ConfigError("--api-key-stdin: no API key on stdin")
    return resolver.api_key_principal(key)


async def run(args: argparse.Namespace, settings: Settings) -> int:
    from extproc.runtime import store_options
    from store import open_router

    resolver = IdentityResolver(load_hmac_key(settings.hmac_key_path, create=False))
    identity = Identity(args.tenant, principal_of(args, settings, resolver))
    key = resolver.principal_key(identity)
    doc: UserContext | None = None
    if args.action == "put":
        raw = args.data if args.data is not None else sys.stdin.read()
        try:
            doc = users.parse(raw.encode(), settings.context_user_max_bytes)
        except users.UserContextError as exc:
            print(f"sessiongate: {exc}", file=sys.stderr)
            return 2
    router = await open_router(store_options(settings), settings.tenants)
    try:
        store = router.for_tenant(args.tenant)
        if args.action == "get":
            doc = await store.get_user_context(key)
        else:
            doc = doc if doc is not None else UserContext()
            await store.put_user_context(key, doc)
        print(users.to_json(doc).decode())
    finally:
        await router.close()
    return 0
