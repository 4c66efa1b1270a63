"""The probe and scrape routes every role serves: `/healthz` (alive), `/readyz` (ready for work), `/metrics`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from dsv4.protocol import contract
from dsv4.services import metrics

# Whether the role is ready now, and the body that says why (or why not).
Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


def health_routes(readiness: Readiness) -> APIRouter:
    """The three routes, kept out of the OpenAPI document; `/readyz` answers 200 or 503 as `readiness` says."""
    router = APIRouter()

    @router.get(contract.HEALTH_PATH, include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(contract.READY_PATH, include_in_schema=False)
    async def readyz() -> JSONResponse:
        ready, body = await readiness()
        return JSONResponse(body, status_code=200 if ready else 503)

    @router.get(contract.METRICS_PATH, include_in_schema=False)
    async def metrics_endpoint() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return router
