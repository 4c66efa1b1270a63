"""Who is calling: the `X-Request-Id` echo on every response and the Bearer API-key check of the `/v1` routes."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Awaitable, Callable

from fastapi import Request
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dsv4.services.gateway.errors import APIError
from dsv4.services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,200}$")


class RequestIdMiddleware:
    """Echo the caller's X-Request-Id (a fresh one when absent or unusable) on every response; handlers read it as
    `request.state.request_id`.

    Plain ASGI on purpose: Starlette's `BaseHTTPMiddleware` relays each chunk of a streamed response through a
    memory stream and an extra task, per token of every SSE stream.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        if not _REQUEST_ID_RE.match(rid):
            rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
            await send(message)

        await self.app(scope, receive, send_with_id)


class KeyStore:
    """Accepted API keys, re-read when the key file changes (a rotated Secret needs no restart)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._mtime: float | None = None
        self._keys = settings.accepted_api_keys()  # fails startup on a missing key file
        if settings.api_key_file is not None:
            self._mtime = settings.api_key_file.stat().st_mtime

    def keys(self) -> frozenset[str]:
        """The keys accepted now (none = no authentication)."""
        path = self.settings.api_key_file
        if path is not None:
            try:
                mtime = path.stat().st_mtime
                if mtime != self._mtime:
                    self._keys, self._mtime = self.settings.accepted_api_keys(), mtime
            except OSError as e:
                log.error("cannot re-read API key file %s, keeping the previous keys: %s", path, e)
        return self._keys


def bearer_auth(store: KeyStore) -> Callable[[Request], Awaitable[None]]:
    """A route dependency that answers 401 unless the request carries `Authorization: Bearer <an accepted key>`."""

    async def authorize(request: Request) -> None:  # async: FastAPI runs sync dependencies in a thread pool
        accepted = store.keys()
        if not accepted:
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in accepted:
            raise APIError(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                type="invalid_request_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return authorize
