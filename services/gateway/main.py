"""`dsv4 gateway`: run the gateway app under uvicorn."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import uvicorn

from dsv4.services.gateway.app import create_app
from dsv4.services.gateway.settings import GatewaySettings


def run(args: argparse.Namespace) -> int:
    """Entry point of the `gateway` subcommand; command-line flags override the environment and config file."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {}
    if args.redis_url:
        overrides["redis_url"] = args.redis_url
    if args.api_key_file:
        overrides["api_key_file"] = args.api_key_file
    settings = GatewaySettings(**overrides)
    app = create_app(settings)
    # Graceful shutdown: uvicorn stops accepting on SIGTERM and lets open streams finish for up to 30 s.
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=30)
    return 0
