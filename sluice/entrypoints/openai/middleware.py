"""ServerGuard: the ASGI layer in front of every route.

In order: 503 while draining (except /health and /metrics, which report it), 401 without
the right API key (constant-time compare; /health, /metrics and /version stay open), 413
for bodies over the limit (read before the app sees them, so nothing half-parsed ever
reaches a handler), and a count of requests in flight for the graceful drain.
"""
from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from sluice.entrypoints.openai.dashboard import BASIC_CHALLENGE, basic_auth_matches, is_dashboard_path
from sluice.entrypoints.openai.errors import OpenAIError

_OPEN_PATHS = frozenset({"/health", "/metrics", "/version"})
_DRAIN_VISIBLE_PATHS = frozenset({"/health", "/metrics"})

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


class ServerGuard:
    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int,
                 is_draining: Callable[[], bool]) -> None:
        self.app = app
        self._expected_auth = f"Bearer {api_key}".encode() if api_key else None
        self._api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.is_draining = is_draining
        self.num_in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.is_draining() and path not in _DRAIN_VISIBLE_PATHS:
            await _reply(send, OpenAIError("the server is shutting down and accepts no new requests", 503,
                                           code="draining"))
            return
        if self._expected_auth is not None and path not in _OPEN_PATHS and not self._authorized(scope):
            # A browser opening /dashboard cannot send a Bearer header: it is asked for Basic auth instead.
            challenge = BASIC_CHALLENGE if is_dashboard_path(path) else b"Bearer"
            await _reply(send, OpenAIError("invalid or missing API key: send 'Authorization: Bearer <key>'", 401,
                                           code="invalid_api_key"), [(b"www-authenticate", challenge)])
            return
        # Counted from the moment it got past the drain check: a request whose body is still arriving
        # when the signal lands was accepted, and the drain must wait for it instead of finishing early.
        self.num_in_flight += 1
        try:
            body = await self._read_body(scope, receive)
            if body is None:
                await _reply(send, OpenAIError(f"request body exceeds the limit of {self.max_body_bytes} bytes "
                                               "(--max-request-body-bytes)", 413))
                return
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.num_in_flight -= 1

    def _authorized(self, scope: Scope) -> bool:
        provided = next((v for k, v in scope.get("headers", []) if k == b"authorization"), b"")
        if hmac.compare_digest(provided, self._expected_auth):
            return True
        return is_dashboard_path(scope.get("path", "")) and basic_auth_matches(provided, self._api_key)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None when it is over the limit (checked as it arrives)."""
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)  # disconnected; the app will notice on its own
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


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
    payload = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               *(extra_headers or [])]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
