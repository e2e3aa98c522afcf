"""`settler api`: serve the balances HTTP API with uvicorn on SETTLER_API_HOST:SETTLER_API_PORT."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import uvicorn
from cassandra import InvalidRequest

from settler import logs
from settler.config import Settings
from settler.read.api import create_app
from settler.store import cql
from settler.store.db import SettlementDb

STARTUP_FAILURE = 3
"""uvicorn's exit code when the app cannot start, kept for an unreachable database."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "api", help="serve GET /v1/balances for the owner of the X-API-Key header"
    )
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    logs.configure(settings.log_level, settings.log_format)
    # Connected before uvicorn starts: a refused login or certificate then ends the command
    # with exit 2 and one line naming the setting (ConnectionSettingError reaches the CLI),
    # instead of a lifespan traceback inside uvicorn.
    try:
        db = asyncio.run(SettlementDb.open(settings))
    except (*cql.TRANSIENT_ERRORS, InvalidRequest) as exc:
        print(f"settler api: cannot open keyspace {settings.keyspace}: {exc}", file=sys.stderr)
        return STARTUP_FAILURE
    try:
        app = create_app(settings, db=db)
        server = uvicorn.Server(uvicorn.Config(
            app, host=settings.api_host, port=settings.api_port, log_level=settings.log_level,
            lifespan="on", proxy_headers=False, server_header=False,
        ))
        # When start-up fails (the port taken) uvicorn itself exits with 3.
        server.run()
    finally:
        asyncio.run(db.close())
    return 0
