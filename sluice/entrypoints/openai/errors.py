"""OpenAI's error JSON and the mapping from every failure to it.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "n", "code": null}}

Handlers here turn pydantic validation errors, malformed JSON, unknown routes, engine
ValueErrors and unexpected exceptions into that shape with the right status code, so no
client ever sees a bare 500 traceback for bad input.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
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

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict:
        error_type = _TYPE_BY_STATUS.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

    def sse_event(self) -> str:
        """The error as one server-sent event, for failures after a stream has started."""
        return f"data: {json.dumps(self.body())}\n\n"


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
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_to_openai(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return OpenAIError(str(exc.detail), exc.status_code).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return OpenAIError(f"internal server error: {type(exc).__name__}: {exc}", 500).response()
