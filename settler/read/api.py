"""The balances HTTP API: `GET /v1/balances[/{asset}]` for the owner of the X-API-Key header.

Starlette rather than FastAPI: small, no pydantic, and the OpenAPI document is written by hand
in one place (`OPENAPI` below), so it states exactly what the handlers do.
`create_app(settings)` builds the app; its lifespan opens the SettlementDb connection.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, Final

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from settler import __version__, logs
from settler.config import Settings
from settler.core.registry import Registry, load_registry
from settler.read import apikeys
from settler.read.balances_view import balances_document, view_one, view_rows
from settler.store import cql
from settler.store.db import SettlementDb

API_KEY_HEADER: Final = "X-API-Key"

REQUESTS = Counter(
    "settler_api_requests_total", "HTTP API requests, by route template and status",
    ["route", "status"],
)
REQUEST_SECONDS = Histogram(
    "settler_api_request_seconds", "HTTP API request latency, by route template", ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

_log = logs.get(__name__)

_DECIMAL = {
    "type": "string",
    "pattern": r"^-?[0-9]+(\.[0-9]+)?$",
    "description": "Whole units of the asset, exact (never a float), e.g. \"1.5\".",
}
_ERROR_BODY = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}

OPENAPI: Final[dict[str, Any]] = {
    "openapi": "3.0.3",
    "info": {
        "title": "settler balances API",
        "version": __version__,
        "description": (
            "Balances of the user who owns the API key. Amounts are decimal strings in "
            "whole units; asset names come from the asset registry. A row whose asset id "
            "is not in the registry is listed as `#<id>` in raw units."
        ),
    },
    "paths": {
        "/v1/balances": {
            "get": {
                "operationId": "listBalances",
                "summary": "Every asset balance of the key's owner, by asset id",
                "security": [{"apiKey": []}],
                "responses": {
                    "200": {
                        "description": "The balances (an empty list for a user with none)",
                        "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/Balances"}}},
                    },
                    "401": {"$ref": "#/components/responses/Unauthorized"},
                    "503": {"$ref": "#/components/responses/Unavailable"},
                },
            },
        },
        "/v1/balances/{asset}": {
            "get": {
                "operationId": "getBalance",
                "summary": "One asset balance of the key's owner (zero if never held)",
                "security": [{"apiKey": []}],
                "parameters": [{
                    "name": "asset",
                    "in": "path",
                    "required": True,
                    "description": "Asset name from the registry, case-insensitive",
                    "schema": {"type": "string", "minLength": 1},
                    "example": "BTC",
                }],
                "responses": {
                    "200": {
                        "description": "A list holding exactly that asset's balance",
                        "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/Balances"}}},
                    },
                    "401": {"$ref": "#/components/responses/Unauthorized"},
                    "404": {"description": "Unknown asset name", "content": _ERROR_BODY},
                    "503": {"$ref": "#/components/responses/Unavailable"},
                },
            },
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics of this API process",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                },
            },
        },
    },
    "components": {
        "securitySchemes": {
            "apiKey": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER},
        },
        "schemas": {
            "Balance": {
                "type": "object",
                "required": ["asset", "available", "frozen", "total"],
                "additionalProperties": False,
                "properties": {
                    "asset": {"type": "string", "example": "BTC"},
                    "available": _DECIMAL,
                    "frozen": _DECIMAL,
                    "total": {**_DECIMAL, "description": "available + frozen"},
                },
            },
            "Balances": {
                "type": "object",
                "required": ["user_id", "balances"],
                "additionalProperties": False,
                "properties": {
                    "user_id": {"type": "integer", "format": "int64", "minimum": 1},
                    "balances": {
                        "type": "array", "items": {"$ref": "#/components/schemas/Balance"},
                    },
                },
            },
            "Error": {
                "type": "object",
                "required": ["error"],
                "additionalProperties": False,
                "properties": {"error": {"type": "string"}},
            },
        },
        "responses": {
            "Unauthorized": {
                "description": "Missing, unknown or revoked API key",
                "content": _ERROR_BODY,
            },
            "Unavailable": {
                "description": "The database did not answer in time; retry later",
                "content": _ERROR_BODY,
            },
        },
    },
}


# -- handlers ---------------------------------------------------------------------------


def _db(request: Request) -> SettlementDb:
    db: SettlementDb | None = request.app.state.db
    if db is None:
        raise RuntimeError("the app's lifespan has not opened the database")
    return db


async def _owner(request: Request, db: SettlementDb) -> int:
    key = request.headers.get(API_KEY_HEADER)
    if not key:
        raise HTTPException(401, f"missing {API_KEY_HEADER} header")
    owner = await apikeys.key_owner(db.session, key)
    if owner is None:
        raise HTTPException(401, "unknown or revoked API key")
    return owner.user_id


async def list_balances(request: Request) -> Response:
    db = _db(request)
    user_id = await _owner(request, db)
    registry: Registry = request.app.state.registry
    rows = await db.get_user_all_balances(user_id)
    return JSONResponse(balances_document(user_id, view_rows(rows, registry)))


async def get_balance(request: Request) -> Response:
    db = _db(request)
    user_id = await _owner(request, db)
    registry: Registry = request.app.state.registry
    name: str = request.path_params["asset"]
    asset = registry.asset_named(name)
    if asset is None:
        raise HTTPException(404, f"unknown asset {name!r}")
    row = await db.get_user_balance(user_id, asset.id)
    return JSONResponse(balances_document(user_id, [view_one(row, asset)]))


async def openapi(request: Request) -> Response:
    return JSONResponse(OPENAPI)


async def metrics(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def _http_error(request: Request, exc: Exception) -> Response:
    # Also the router's own 404 and 405, so every error body is the documented JSON.
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _database_unavailable(request: Request, exc: Exception) -> Response:
    _log.warning("database unavailable", path=request.url.path, error=repr(exc))
    return JSONResponse(
        {"error": "database unavailable, retry later"}, status_code=503,
        headers={"Retry-After": "1"},
    )


# -- metrics middleware -----------------------------------------------------------------


class _RequestMetrics:
    """Counts and times every request by its route *template*, so user input (asset names,
    stray paths) cannot blow up label cardinality."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts: an exception escaping the app is a 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            # The router stores the matched route in the (shared) scope dict.
            route = scope.get("route")
            label = route.path if isinstance(route, Route) else "unmatched"
            REQUESTS.labels(label, str(status)).inc()
            REQUEST_SECONDS.labels(label).observe(time.perf_counter() - started)


# -- the app ----------------------------------------------------------------------------


def create_app(settings: Settings, *, db: SettlementDb | None = None,
               registry: Registry | None = None) -> Starlette:
    """The API app. Its lifespan opens (and closes) a SettlementDb from `settings`, unless an
    already open `db` is given (tests, embedding), which it then leaves open."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if db is not None:
            await apikeys.prepare(db.session)
            yield
            return
        opened = await SettlementDb.open(settings)
        try:
            await apikeys.prepare(opened.session)
            app.state.db = opened
            yield
        finally:
            app.state.db = None
            await opened.close()

    app = Starlette(
        routes=[
            Route("/v1/balances", list_balances, methods=["GET"]),
            Route("/v1/balances/{asset}", get_balance, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={
            HTTPException: _http_error,
            **dict.fromkeys(cql.TRANSIENT_ERRORS, _database_unavailable),
        },
        middleware=[Middleware(_RequestMetrics)],
        lifespan=lifespan,
    )
    # "/v1/balances/" is a 404 like any unknown path, not a redirect the document never states.
    app.router.redirect_slashes = False
    app.state.db = db
    app.state.registry = registry if registry is not None else load_registry(settings.registry)
    return app
