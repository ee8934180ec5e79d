"""ServerGuard: the ASGI layer in front of every route.

In order: 503 while draining (except /health, /ping and /metrics, which report it), 401 without
the right API key (constant-time compare of the token; the scheme ``Bearer`` in any case, as RFC 7235 says;
/health, /ping, /metrics, /version and the docs stay open), 413 for bodies over the limit and 408 for a body
that has not arrived within ``body_timeout_s`` (read before the app sees them, so nothing half-parsed ever
reaches a handler, and a stalled upload cannot hold a drain), and a count of requests in flight for the
graceful drain.
"""
from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from typing import Any

from sluice.entrypoints.openai.dashboard import BASIC_CHALLENGE, basic_auth_matches, is_dashboard_path
from sluice.entrypoints.openai.errors import OpenAIError

_OPEN_PATHS = frozenset({"/health", "/ping", "/metrics", "/version", "/docs", "/openapi.json"})
_DRAIN_VISIBLE_PATHS = frozenset({"/health", "/ping", "/metrics"})
BODY_TIMEOUT_S = 30.0  # the whole body must arrive within this
_BODY_POLL_S = 0.5  # how often a body read that is waiting checks for a drain and its deadline

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


class ServerGuard:
    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int,
                 is_draining: Callable[[], bool], root_path: str = "", body_timeout_s: float = BODY_TIMEOUT_S) -> None:
        self.app = app
        self._api_key = api_key or None
        self._expected_token = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.root_path = root_path.rstrip("/")
        self.body_timeout_s = body_timeout_s
        self.is_draining = is_draining
        self.num_in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.root_path and path.startswith(self.root_path + "/"):
            path = path[len(self.root_path):]
        if self.is_draining() and path not in _DRAIN_VISIBLE_PATHS:
            await _reply(send, OpenAIError("the server is shutting down and accepts no new requests", 503,
                                           code="draining"))
            return
        if self._expected_token is not None and path not in _OPEN_PATHS and not self._authorized(scope, path):
            # A browser opening /dashboard cannot send a Bearer header: it is asked for Basic auth instead.
            challenge = BASIC_CHALLENGE if is_dashboard_path(path) else b"Bearer"
            await _reply(send, OpenAIError("invalid or missing API key: send 'Authorization: Bearer <key>'", 401,
                                           code="invalid_api_key"), [(b"www-authenticate", challenge)])
            return
        # Counted from the moment it got past the drain check: a request whose body is still arriving
        # when the signal lands was accepted, and the drain must wait for it instead of finishing early.
        self.num_in_flight += 1
        try:
            try:
                body = await self._read_body(scope, receive)
            except OpenAIError as error:  # stalled: the connection closes, the drain need not wait for it
                await _reply(send, error, [(b"connection", b"close")])
                return
            if body is None:
                await _reply(send, OpenAIError(f"request body exceeds the limit of {self.max_body_bytes} bytes "
                                               "(--max-request-body-bytes)", 413))
                return
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.num_in_flight -= 1

    def _authorized(self, scope: Scope, path: str) -> bool:
        """A Bearer token equal to the key; on /dashboard paths (``path`` without the root path) also HTTP
        Basic auth with the key as password."""
        provided = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"")
        scheme, _, token = provided.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._expected_token):
            return True
        return is_dashboard_path(path) and basic_auth_matches(provided, self._api_key)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None when it is over the limit (checked as it arrives). Raises OpenAIError 408
        when it has not arrived within body_timeout_s, and 503 when a drain starts while it is still arriving."""
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                return None
        chunks, size = [], 0
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            message = await self._receive_or_give_up(receive, deadline)
            if message["type"] != "http.request":
                return b"".join(chunks)  # disconnected; the app will notice on its own
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _receive_or_give_up(self, receive: Receive, deadline: float) -> dict[str, Any]:
        while True:
            try:
                return await asyncio.wait_for(receive(), _BODY_POLL_S)
            except asyncio.TimeoutError:
                if self.is_draining():
                    raise OpenAIError("the server is shutting down and accepts no new requests", 503,
                                      code="draining") from None
                if time.monotonic() >= deadline:
                    raise OpenAIError(f"the request body did not arrive within {self.body_timeout_s:g} s", 408,
                                      code="request_timeout") from None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the buffered body out once, then passes through (disconnects)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reply(send: Send, error: OpenAIError, extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = error.body_bytes()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               *(extra_headers or [])]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
