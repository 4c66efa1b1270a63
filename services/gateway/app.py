"""The gateway's FastAPI app: OpenAI-compatible endpoints over the Redis queue protocol (docs/serving.md).

Where each part lives: `auth.py` (request ids, API keys), `routes.py` (the `/v1` routes), `pipeline.py` (prepare →
enqueue → stream), `openai_format.py` (response bodies and chunks), `streaming.py` (token stream → text),
`state.py` (what the app holds), `errors.py` (OpenAI error bodies), `services/health.py` (probes and metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from dsv4.model_runtime.tokenizer import Tokenizer
from dsv4.protocol import contract
from dsv4.protocol.connection import connect
from dsv4.services import telemetry
from dsv4.services.gateway.auth import KeyStore, RequestIdMiddleware, bearer_auth
from dsv4.services.gateway.errors import install_error_handlers
from dsv4.services.gateway.routes import openai_routes
from dsv4.services.gateway.routing import follow_pools
from dsv4.services.gateway.settings import GatewaySettings
from dsv4.services.gateway.state import GatewayState
from dsv4.services.health import health_routes


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """The gateway app; `settings` default to the environment and the mounted config file."""
    settings = settings or GatewaySettings()
    tokenizer = Tokenizer.from_pretrained(settings.model)
    api_keys = KeyStore(settings)
    telemetry.setup_tracing(contract.Role.GATEWAY.value)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = connect(
            settings.redis_url, settings.redis_password_value(), max_connections=settings.redis_max_connections
        )
        gw = app.state.gw = GatewayState.open(settings, client, tokenizer)
        stop = asyncio.Event()
        events = (
            asyncio.create_task(follow_pools(client, settings.deployment, list(gw.routers.values()), stop))
            if settings.prefix_routing.enabled
            else None
        )
        try:
            yield
        finally:
            stop.set()
            if events is not None:
                events.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await events
            await client.aclose()
            telemetry.shutdown_tracing()

    app = FastAPI(title="dsv4 gateway", version="1", lifespan=lifespan)
    install_error_handlers(app, settings.retry_after_s)
    _document_served_model(app, settings.served_model_name)
    app.add_middleware(RequestIdMiddleware)

    async def readiness() -> tuple[bool, dict[str, Any]]:
        # Ready means the broker answers: an orchestrator then tells "Redis gone" from "gateway gone".
        try:
            await app.state.gw.client.ping()
        except Exception as e:  # any failure means "not ready", never a 500
            return False, {"status": "unavailable", "reason": f"redis: {type(e).__name__}"}
        return True, {"status": "ready"}

    app.include_router(health_routes(readiness))
    app.include_router(openai_routes(settings, bearer_auth(api_keys)))
    return app


def _document_served_model(app: FastAPI, served: str) -> None:
    """Name the one served model in the OpenAPI document (other names are answered 404, as OpenAI does)."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = base()
            for name in ("ChatCompletionRequest", "CompletionRequest"):
                doc["components"]["schemas"][name]["properties"]["model"] = {"type": "string", "enum": [served]}
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
