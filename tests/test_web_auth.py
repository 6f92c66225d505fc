"""Who may use the management API: the default authoriser and pluggable ones.

The server runs on 127.0.0.1, so every test client is a loopback client. A non-loopback
client is simulated the way production deployments produce one: a trusted-proxy middleware of
the enclosing application rewrites `request.remote` (as aiohttp-remotes does) before the
management API sees the request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from web_support import PREFIX, error_of, serve, service

import aioflow.web
from aioflow.web import ApiError, LoopbackOrToken, is_loopback

TOKEN = "s3cret-token-0123456789abcdef"


@web.middleware
async def trusted_proxy(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                        ) -> web.StreamResponse:
    """Play a trusted reverse proxy: take the client address from X-Test-Client."""
    client = request.headers.get("X-Test-Client")
    return await handler(request.clone(remote=client) if client else request)


def behind_proxy(**options: object) -> web.Application:
    app = service(**options)  # type: ignore[arg-type]
    app.middlewares.append(trusted_proxy)
    return app


async def test_by_default_loopback_clients_are_served() -> None:
    async with serve() as client:
        assert (await client.get(f"{PREFIX}/instances")).status == 200


@pytest.mark.parametrize("remote", ["203.0.113.9", "10.1.2.3", "2001:db8::1", "unix-socket"])
async def test_by_default_other_clients_are_refused_with_403_saying_how_to_allow_them(
        remote: str) -> None:
    async with serve(behind_proxy()) as client:
        for method, path in (("GET", "/instances"), ("POST", "/orchestrators/echo"),
                             ("GET", "/openapi.json"), ("GET", "/no/such/route")):
            response = await client.request(method, f"{PREFIX}{path}",
                                            headers={"X-Test-Client": remote})
            message = await error_of(response, 403)
            assert remote in message and "token" in message


@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded", "X-Real-IP"])
async def test_by_default_a_forwarded_request_is_refused_even_from_loopback(header: str) -> None:
    async with serve() as client:
        response = await client.get(f"{PREFIX}/instances", headers={header: "203.0.113.9"})
        assert "forwarded" in await error_of(response, 403)


async def test_with_a_token_every_client_must_send_it() -> None:
    async with serve(behind_proxy(token=TOKEN)) as client:
        missing = await client.get(f"{PREFIX}/instances")
        assert "bearer token" in await error_of(missing, 401)
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = await client.get(f"{PREFIX}/instances",
                                 headers={"Authorization": f"Bearer {TOKEN}x"})
        assert "not the one configured" in await error_of(wrong, 401)
        basic = await client.get(f"{PREFIX}/instances", headers={"Authorization": "Basic abc"})
        await error_of(basic, 401)
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert (await client.get(f"{PREFIX}/instances", headers=good)).status == 200
        remote = await client.get(f"{PREFIX}/instances",
                                  headers={**good, "X-Test-Client": "203.0.113.9"})
        assert remote.status == 200
        forwarded = await client.get(f"{PREFIX}/instances",
                                     headers={**good, "X-Forwarded-For": "203.0.113.9"})
        assert forwarded.status == 200


async def test_a_custom_authorizer_decides_alone() -> None:
    async def only_admins(request: web.Request) -> bool:
        if "X-User" not in request.headers:
            raise ApiError(401, "log in first", headers={"WWW-Authenticate": "Session"})
        return request.headers["X-User"] == "admin"

    async with serve(behind_proxy(authorizer=only_admins)) as client:
        assert "log in first" in await error_of(await client.get(f"{PREFIX}/instances"), 401)
        refused = await client.get(f"{PREFIX}/instances", headers={"X-User": "bob"})
        assert "refused" in await error_of(refused, 403)
        from_afar = {"X-User": "admin", "X-Test-Client": "203.0.113.9"}
        assert (await client.get(f"{PREFIX}/instances", headers=from_afar)).status == 200


async def test_users_own_routes_are_not_subject_to_the_management_authorizer() -> None:
    async def start(request: web.Request) -> web.Response:
        iid = await request.app[aioflow.web.CLIENT_KEY].start_new("echo", 1)
        return aioflow.web.create_check_status_response(request, iid)

    app = behind_proxy()
    app.router.add_post("/start", start)
    async with serve(app) as client:
        response = await client.post("/start", headers={"X-Test-Client": "203.0.113.9"})
        assert response.status == 202


@pytest.mark.parametrize(("remote", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("::1%lo", True), ("10.0.0.1", False), ("192.168.1.1", False), ("::ffff:10.0.0.1", False),
    ("2001:db8::1", False), ("0.0.0.0", False), ("localhost", False), ("", False), (None, False),
])
def test_what_counts_as_loopback(remote: str | None, loopback: bool) -> None:
    assert is_loopback(remote) is loopback


@pytest.mark.parametrize("token", ["", "short", "has spaces in it!!", "ünïcödé-token-123456"])
def test_weak_or_unsendable_tokens_are_refused(token: str) -> None:
    with pytest.raises(aioflow.ConfigurationError, match="token"):
        LoopbackOrToken(token)
