"""Errors the gateway itself returns, in the provider's JSON error shape.

SDKs parse these into typed exceptions (`openai.BadRequestError` with `.code`, `.message`).
"""

from __future__ import annotations

import orjson


def openai_error(
    message: str,
    *,
    type_: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )
