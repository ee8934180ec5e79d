"""OpenAI's error JSON and the mapping from every failure to it.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "n", "code": null}}

Handlers here turn pydantic validation errors, malformed JSON, unknown routes, engine
ValueErrors and unexpected exceptions into that shape with the right status code, so no
client ever sees a bare 500 traceback for bad input. A 500 says only "internal server error" and an
error id; the exception itself goes to the server's log under that id (its text may hold paths, keys or
the request's own data). Bodies are ASCII JSON, so no string can make the response itself fail.
"""
from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable_error",
}


@dataclass
class OpenAIError(Exception):
    """An error the client should see, with its HTTP status."""

    message: str
    status: int = 400
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = field(default=None, compare=False)  # e.g. Allow, Retry-After

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict:
        error_type = _TYPE_BY_STATUS.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}

    def body_bytes(self) -> bytes:
        return json.dumps(self.body(), ensure_ascii=True).encode("ascii")

    def response(self) -> Response:
        return Response(self.body_bytes(), status_code=self.status, headers=self.headers,
                        media_type="application/json")

    def sse_event(self) -> str:
        """The error as one server-sent event, for failures after a stream has started."""
        return f"data: {self.body_bytes().decode('ascii')}\n\n"


def internal_error(exc: BaseException, where: str = "request") -> OpenAIError:
    """A 500 that names no internals: the traceback is logged under the id the client sees."""
    error_id = uuid.uuid4().hex[:12]
    logger.error("internal error %s in %s", error_id, where, exc_info=exc)
    return OpenAIError(f"internal server error (error id {error_id}; details are in the server log)", 500)


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(message, HTTPStatus.BAD_REQUEST, param)


def validation_error_to_openai(exc: RequestValidationError) -> OpenAIError:
    """Pydantic's error list -> one readable message naming the first offending field."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return bad_request(f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".rstrip(": "))
    if first.get("type") == "extra_forbidden":
        return bad_request(f"parameter {param!r} is not supported by sluice", param)
    if first.get("type") == "missing" and not loc:
        return bad_request("request body is missing")
    message = first.get("msg", "invalid value")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return bad_request(message, param)


def install_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        return validation_error_to_openai(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        # Starlette's headers carry what the status needs, e.g. Allow on a 405.
        return OpenAIError(str(exc.detail), exc.status_code, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return internal_error(exc, request.url.path).response()
