"""API keys: which key each kind of route takes (SGLang's levels).

- user routes (the OpenAI routes, /generate, /tokenize, /detokenize, /get_model_info): an
  --api-key;
- admin routes (/flush_cache, /get_server_info): an --admin-api-key, or, when none is configured,
  an --api-key (an --api-key never opens them while admin keys exist);
- probes (/metrics, /health_generate): open, unless --protect-metrics; then either kind of key.

A route whose kind has no key configured is open. Keys travel as `Authorization: Bearer <key>`
and are compared in constant time. The keys of --api-key-file are user keys too, and a user route
called with one of them counts against its limits (see `rate_limits`).
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from services.gateway.config import GatewayConfig
from services.gateway.errors import Unauthorized

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class ApiKeys:
    """The keys each kind of route accepts (empty: the route is open)."""

    user: tuple[str, ...]
    admin: tuple[str, ...]
    probe: tuple[str, ...]

    @classmethod
    def from_config(cls, cfg: GatewayConfig, file_keys: tuple[str, ...] = ()) -> ApiKeys:
        """`file_keys`: the keys of --api-key-file, user keys like --api-key's."""
        user, admin = tuple(cfg.api_key) + file_keys, tuple(cfg.admin_api_key)
        return cls(user, admin or user, user + admin if cfg.protect_metrics else ())


def check_api_key(authorization: str | None, keys: tuple[str, ...] | list[str]) -> str | None:
    """Accepts `Authorization: Bearer <key>` with one of `keys` and returns that key (None, and
    any request accepted, when there are no keys). Raises Unauthorized otherwise."""
    if not keys:
        return None
    if not authorization:
        raise Unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'.")
    scheme, _, token = authorization.partition(" ")
    token_bytes = token.strip().encode()
    matched = [k for k in keys if hmac.compare_digest(token_bytes, k.encode())]
    if scheme.lower() != "bearer" or not matched:
        raise Unauthorized("Incorrect API key provided.")
    return matched[0]


def _guard(
    keys_of: Callable[[ApiKeys], tuple[str, ...]], limited: bool = False
) -> Callable[[Handler], Handler]:
    """A decorator refusing (401) requests without one of the keys `keys_of` picks; when
    `limited`, also (429) those whose key is past its per-minute limits."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def checked(request: Request) -> Response:
            keys = keys_of(request.app.state.api_keys)
            key = check_api_key(request.headers.get("authorization"), keys)
            if limited and key is not None:
                request.app.state.rate_limiter.admit(key)
                request.scope[KEY_SCOPE] = key  # its tokens are charged when the request ends
            return await handler(request)

        return checked

    return decorate


KEY_SCOPE = "radixserve.api_key"
authenticated = _guard(lambda keys: keys.user, limited=True)
admin = _guard(lambda keys: keys.admin)
probe = _guard(lambda keys: keys.probe)
