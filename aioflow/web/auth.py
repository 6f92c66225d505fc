"""Who may use the HTTP management API: pluggable authorisers and the safe default.

An authoriser is any `async def authorize(request) -> bool` (see `Authorizer`). It runs before
every route of the management API (the OpenAPI document included); `True` lets the request
through, `False` refuses it with 403, and raising `ApiError` refuses it with that status and
message (say, 401 with a `WWW-Authenticate` header).

The default, `LoopbackOrToken`, is safe to mount anywhere:

* with a token configured, every client (local or not) must send `Authorization: Bearer
  <token>`; the token is compared in constant time;
* without one, only clients connecting from a loopback address (127.0.0.0/8, ::1) are served,
  and not when the request says it was forwarded for someone else (a `Forwarded`,
  `X-Forwarded-For` or `X-Real-IP` header): a reverse proxy on the same host makes every
  client look local, so a proxied management API needs a token or an authoriser of your own.
"""

from __future__ import annotations

import hmac
import ipaddress
import string
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from aioflow.errors import ConfigurationError
from aioflow.web.errors import ApiError

__all__ = ["Authorizer", "LoopbackOrToken", "is_loopback"]

Authorizer = Callable[[web.Request], Awaitable[bool]]
"""`async def authorize(request: web.Request) -> bool`: True serves the request, False is a
403; raise `ApiError` to refuse with another status or message."""

_FORWARDING_HEADERS = (hdrs.FORWARDED, hdrs.X_FORWARDED_FOR, "X-Real-IP")
_TOKEN_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-._~+/=")
_MIN_TOKEN_LENGTH = 16


def is_loopback(remote: str | None) -> bool:
    """Whether `remote` (as in `request.remote`) is a loopback IP address.

    IPv4-mapped IPv6 addresses (`::ffff:127.0.0.1`) count; anything that is not an IP address
    (a Unix socket peer, None) does not.
    """
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _check_token(token: str) -> str:
    if not isinstance(token, str) or len(token) < _MIN_TOKEN_LENGTH \
            or not set(token) <= _TOKEN_CHARACTERS:
        raise ConfigurationError(
            f"the management API token must be a string of at least {_MIN_TOKEN_LENGTH} "
            f"characters from A-Z a-z 0-9 - . _ ~ + / = (generate one with "
            f"`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return token


class LoopbackOrToken:
    """The default authoriser: a bearer token when one is configured, else loopback only.

    `LoopbackOrToken()` serves only direct loopback clients (403 for others);
    `LoopbackOrToken(token)` serves exactly the requests carrying `Authorization: Bearer
    <token>` (401 for others), from any address.
    """

    def __init__(self, token: str | None = None) -> None:
        self._token = None if token is None else _check_token(token).encode("ascii")

    @property
    def requires_token(self) -> bool:
        return self._token is not None

    async def __call__(self, request: web.Request) -> bool:
        if self._token is not None:
            self._authenticate(request.headers.get(hdrs.AUTHORIZATION, ""), self._token)
            return True
        if not is_loopback(request.remote):
            raise ApiError(
                403, f"the management API only serves loopback clients unless a token is "
                     f"configured, and this request came from {request.remote or 'an unknown'} "
                     f"address; configure a token (setup(..., token=...)) and send "
                     f"'Authorization: Bearer <token>', or pass an authorizer of your own")
        forwarded = [name for name in _FORWARDING_HEADERS if name in request.headers]
        if forwarded:
            raise ApiError(
                403, f"the management API only serves direct loopback clients unless a token "
                     f"is configured, and this request was forwarded by a proxy (it has "
                     f"{', '.join(forwarded)}); configure a token and send "
                     f"'Authorization: Bearer <token>' through the proxy")
        return True

    @staticmethod
    def _authenticate(header: str, token: bytes) -> None:
        scheme, _, credentials = header.strip().partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="aioflow"'}
        if scheme.lower() != "bearer" or not credentials.strip():
            raise ApiError(401, "the management API needs a bearer token: send "
                                "'Authorization: Bearer <token>'", headers=challenge)
        given = credentials.strip().encode("utf-8", "replace")
        if not hmac.compare_digest(given, token):
            raise ApiError(401, "the bearer token is not the one configured for the "
                                "management API", headers=challenge)
