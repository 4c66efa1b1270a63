"""OpenAI-style error bodies for every 4xx/5xx the gateway answers, including validation errors."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv4.protocol.connection import RedisUnavailable

log = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    """An error answered to the client as `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 invalid_request_error."""
    return APIError(400, message, param=param, code=code)


def unavailable(message: str, retry_after_s: int) -> APIError:
    """A 503 with Retry-After: the client should try again shortly."""
    return APIError(503, message, code="service_unavailable", headers={"Retry-After": str(retry_after_s)})


def _param_of(loc: tuple[Any, ...]) -> str | None:
    # ("body", "messages", 0, "role") -> "messages[0].role"; the leading "body"/"query" names no parameter.
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Route every error through `APIError` so all of them have the OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = tuple(first.get("loc", ()))
        msg = str(first.get("msg", "invalid request"))
        if first.get("type") == "json_invalid":
            return invalid(f"request body is not valid JSON: {first.get('ctx', {}).get('error', msg)}").response()
        param = _param_of(loc)
        more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
        return invalid(f"{param or 'request'}: {msg}{more}", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        return APIError(exc.status_code, str(exc.detail), headers=headers).response()

    @app.exception_handler(RedisUnavailable)
    async def _redis(_: Request, exc: RedisUnavailable) -> JSONResponse:
        log.warning("answering 503: %s", exc)
        return unavailable("the request queue is unavailable; retry shortly", retry_after_s).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()
