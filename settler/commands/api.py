"""`settler api`: serve the balances HTTP API with uvicorn on SETTLER_API_HOST:SETTLER_API_PORT."""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn

from settler import logs
from settler.api import create_app
from settler.config import Settings


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "api", help="serve GET /v1/balances for the owner of the X-API-Key header"
    )
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    logs.configure(settings.log_level, settings.log_format)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(
        app, host=settings.api_host, port=settings.api_port, log_level=settings.log_level,
        lifespan="on", proxy_headers=False, server_header=False,
    ))
    # When start-up fails (database unreachable, port taken) uvicorn itself exits with 3.
    server.run()
    return 0
