"""Reading balances (SPEC section 6) against the real Cassandra: library, CLI and HTTP.

Balances are seeded with plain CQL into a keyspace of this module's own, so these tests
depend on nothing but the schema and the read path.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from settler import cli
from settler.config import Settings
from settler.core.registry import INT64_MAX
from settler.read import apikeys
from settler.read.api import create_app
from settler.store import cql
from settler.store.db import SettlementDb, UserBalance
from tests import harness

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ALICE, BOB, NOBODY = 1001, 1002, 4242
BTC, USDT, ETH = 1, 2, 3

# (user, asset id, available, frozen) in raw units (all three assets have 8 decimals).
SEEDED = [
    (ALICE, BTC, 150_000_000, 0),
    (ALICE, USDT, 12_345_678_901, 50_000_000_000),
    (ALICE, ETH, 1, 200_000_000),
    (BOB, BTC, 700_000_000, 0),
]
ALICE_DOCUMENT = {
    "user_id": ALICE,
    "balances": [
        {"asset": "BTC", "available": "1.5", "frozen": "0", "total": "1.5"},
        {"asset": "USDT", "available": "123.45678901", "frozen": "500", "total": "623.45678901"},
        {"asset": "ETH", "available": "0.00000001", "frozen": "2", "total": "2.00000001"},
    ],
}


# -- reusable helpers -------------------------------------------------------------------


async def api_client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the app, with its lifespan (the database connection) running."""
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://settler.test"
    ) as client:
        yield client


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def settings() -> Iterator[Settings]:
    with harness.scratch_keyspace("t_reads") as settings:
        yield settings


@pytest.fixture(scope="module")
async def db(settings: Settings) -> AsyncIterator[SettlementDb]:
    db = await SettlementDb.open(settings)
    for user_id, asset_id, available, frozen in SEEDED:
        await harness.insert_balance(db.session, user_id, asset_id, available, frozen)
    yield db
    await db.close()


@pytest.fixture(scope="module")
async def http(settings: Settings, db: SettlementDb) -> AsyncIterator[httpx.AsyncClient]:
    async for client in api_client(create_app(settings)):
        yield client


@pytest.fixture(scope="module")
async def alice_key(db: SettlementDb) -> str:
    return (await apikeys.create_key(db.session, ALICE)).key


@pytest.fixture(scope="module")
async def bob_key(db: SettlementDb) -> str:
    return (await apikeys.create_key(db.session, BOB)).key


@pytest.fixture
def keyspace_env(settings: Settings, db: SettlementDb, monkeypatch: pytest.MonkeyPatch) -> None:
    """`settler` run in-process reads its settings from the environment."""
    monkeypatch.setenv("SETTLER_KEYSPACE", settings.keyspace)


# -- library ----------------------------------------------------------------------------


async def test_library_reads_every_asset_of_a_user_in_raw_units_by_asset_id(
    db: SettlementDb,
) -> None:
    balances = await db.get_user_all_balances(ALICE)

    assert [(b.asset_id, b.available, b.frozen) for b in balances] == [
        (asset_id, available, frozen)
        for user_id, asset_id, available, frozen in SEEDED if user_id == ALICE
    ]


async def test_library_reads_one_asset_and_none_for_an_absent_row(db: SettlementDb) -> None:
    usdt = await db.get_user_balance(ALICE, USDT)
    absent = await db.get_user_balance(BOB, ETH)

    assert usdt == UserBalance(ALICE, USDT, 12_345_678_901, 50_000_000_000, 1, 1700000000000)
    assert absent is None


async def test_library_reads_nothing_for_an_unknown_user(db: SettlementDb) -> None:
    assert await db.get_user_all_balances(NOBODY) == []


# -- CLI --------------------------------------------------------------------------------


def test_cli_prints_a_table_of_whole_unit_decimal_strings(
    keyspace_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["balances", str(ALICE)])

    assert code == 0
    assert capsys.readouterr().out.splitlines() == [
        "ASSET     AVAILABLE  FROZEN         TOTAL",
        "BTC             1.5       0           1.5",
        "USDT   123.45678901     500  623.45678901",
        "ETH      0.00000001       2    2.00000001",
    ]


def test_cli_json_is_the_documented_balances_document(
    keyspace_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["balances", str(ALICE), "--json"])

    assert code == 0
    assert json.loads(capsys.readouterr().out) == ALICE_DOCUMENT


def test_cli_asset_option_shows_that_asset_alone(
    keyspace_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["balances", str(ALICE), "--asset", "usdt", "--json"])

    assert code == 0
    assert json.loads(capsys.readouterr().out)["balances"] == [ALICE_DOCUMENT["balances"][1]]


def test_cli_unknown_user_prints_an_empty_table_and_exits_0(
    keyspace_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["balances", str(NOBODY)])

    assert code == 0
    assert capsys.readouterr().out.split() == ["ASSET", "AVAILABLE", "FROZEN", "TOTAL"]


def test_cli_unknown_asset_exits_2_naming_it(
    keyspace_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["balances", str(ALICE), "--asset", "DOGE"])

    assert code == 2
    err = capsys.readouterr().err
    assert "unknown asset 'DOGE'" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("user_id", ["abc", "0", "-3", str(INT64_MAX + 1)])
def test_cli_malformed_user_id_exits_2_with_one_line(
    user_id: str, keyspace_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["balances", user_id])

    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"invalid user id '{user_id}'" in err and len(err.splitlines()) == 1


def test_cli_malformed_user_id_exits_2_as_a_process(settings: Settings) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "settler", "balances", "12x"], cwd=REPO, capture_output=True,
        text=True, timeout=60, env={**os.environ, "SETTLER_KEYSPACE": settings.keyspace},
    )

    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip() == (
        "settler balances: error: argument USER_ID: invalid user id '12x': expected an integer"
    )


def test_cli_keys_create_prints_a_key_once_and_revoke_disables_it(
    keyspace_env: None, db: SettlementDb, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["keys", "create", str(ALICE)]) == 0
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    owner_before = asyncio.run(apikeys.key_owner(db.session, printed["api_key"]))

    assert cli.main(["keys", "revoke", printed["key_id"]]) == 0
    owner_after = asyncio.run(apikeys.key_owner(db.session, printed["api_key"]))

    assert owner_before == apikeys.KeyOwner(key_id=printed["key_id"], user_id=ALICE)
    assert owner_after is None


def test_cli_keys_revoke_of_an_unknown_key_id_exits_1(
    keyspace_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["keys", "revoke", "kid_doesnotexist"])

    assert code == 1
    assert "no key with id 'kid_doesnotexist'" in capsys.readouterr().err


def test_cli_keys_list_shows_ids_owners_and_states_never_the_keys(
    keyspace_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    created = []
    for user in (ALICE, ALICE, BOB):
        assert cli.main(["keys", "create", str(user)]) == 0
        created.append(dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines()))
    assert cli.main(["keys", "revoke", created[0]["key_id"]]) == 0
    capsys.readouterr()

    assert cli.main(["keys", "list", "--user", str(ALICE)]) == 0
    alice_out = capsys.readouterr().out
    assert cli.main(["keys", "list"]) == 0
    all_out = capsys.readouterr().out

    header, *lines = alice_out.splitlines()
    assert header.split() == ["KEY_ID", "USER_ID", "CREATED", "(UTC)", "STATE"]
    states = {line.split()[0]: (line.split()[1], line.split()[-1]) for line in lines}
    assert states[created[0]["key_id"]] == (str(ALICE), "revoked")
    assert states[created[1]["key_id"]] == (str(ALICE), "active")
    assert created[2]["key_id"] not in states  # Bob's key is not Alice's
    assert {owner for owner, _ in states.values()} == {str(ALICE)}
    assert all(key["key_id"] in all_out for key in created)
    assert not any(key["api_key"] in alice_out + all_out for key in created)


async def test_only_the_hash_of_a_key_is_stored(db: SettlementDb) -> None:
    new = await apikeys.create_key(db.session, ALICE)

    rows = list(await cql.run(db.session, "SELECT key_hash, key_id, user_id FROM api_keys"))

    assert (apikeys.key_hash(new.key), new.key_id, ALICE) in rows
    assert all(new.key.encode() not in bytes(row[0]) for row in rows)


# -- HTTP -------------------------------------------------------------------------------


async def test_http_lists_the_key_owners_balances(
    http: httpx.AsyncClient, alice_key: str
) -> None:
    response = await http.get("/v1/balances", headers={"X-API-Key": alice_key})

    assert response.status_code == 200
    assert response.json() == ALICE_DOCUMENT


async def test_http_reads_one_asset_by_case_insensitive_name(
    http: httpx.AsyncClient, alice_key: str
) -> None:
    response = await http.get("/v1/balances/eth", headers={"X-API-Key": alice_key})

    assert response.status_code == 200
    assert response.json() == {"user_id": ALICE, "balances": [ALICE_DOCUMENT["balances"][2]]}


async def test_http_a_registered_asset_never_held_is_zero(
    http: httpx.AsyncClient, bob_key: str
) -> None:
    response = await http.get("/v1/balances/ETH", headers={"X-API-Key": bob_key})

    assert response.json() == {
        "user_id": BOB,
        "balances": [{"asset": "ETH", "available": "0", "frozen": "0", "total": "0"}],
    }


async def test_http_unknown_asset_is_404(http: httpx.AsyncClient, alice_key: str) -> None:
    response = await http.get("/v1/balances/DOGE", headers={"X-API-Key": alice_key})

    assert response.status_code == 404
    assert response.json() == {"error": "unknown asset 'DOGE'"}


async def test_http_a_second_users_key_never_sees_the_first_users_balances(
    http: httpx.AsyncClient, bob_key: str
) -> None:
    listed = await http.get("/v1/balances", headers={"X-API-Key": bob_key})
    single = await http.get("/v1/balances/USDT", headers={"X-API-Key": bob_key})

    assert listed.json() == {
        "user_id": BOB,
        "balances": [{"asset": "BTC", "available": "7", "frozen": "0", "total": "7"}],
    }
    assert single.json()["balances"] == [
        {"asset": "USDT", "available": "0", "frozen": "0", "total": "0"}
    ]


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": ""}, {"X-API-Key": "sk_not-a-key"},
                                     {"X-API-Key": "garbage"}])
async def test_http_missing_or_unknown_key_is_401(
    http: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    for path in ("/v1/balances", "/v1/balances/BTC"):
        response = await http.get(path, headers=headers)

        assert response.status_code == 401
        assert set(response.json()) == {"error"}


async def test_http_revoked_key_is_401(http: httpx.AsyncClient, db: SettlementDb) -> None:
    new = await apikeys.create_key(db.session, ALICE)
    before = await http.get("/v1/balances", headers={"X-API-Key": new.key})

    assert await apikeys.revoke_key(db.session, new.key_id)
    after = await http.get("/v1/balances", headers={"X-API-Key": new.key})

    assert before.status_code == 200
    assert after.status_code == 401
    assert after.json() == {"error": "unknown or revoked API key"}


async def test_http_unknown_path_and_method_are_json_errors(http: httpx.AsyncClient) -> None:
    missing = await http.get("/v1/nothing")
    wrong_method = await http.post("/v1/balances")

    assert (missing.status_code, missing.json()) == (404, {"error": "Not Found"})
    assert wrong_method.status_code == 405
    assert set(wrong_method.headers["allow"].split(", ")) == {"GET", "HEAD"}


async def test_http_metrics_count_requests_by_route_template(
    http: httpx.AsyncClient, alice_key: str
) -> None:
    await http.get("/v1/balances/BTC", headers={"X-API-Key": alice_key})

    text = (await http.get("/metrics")).text

    assert 'settler_api_requests_total{route="/v1/balances/{asset}",status="200"}' in text
    assert 'settler_api_request_seconds_bucket{le="0.5",route="/v1/balances/{asset}"}' in text
    assert "BTC" not in text


async def test_http_serves_its_openapi_document(http: httpx.AsyncClient) -> None:
    document = (await http.get("/openapi.json")).json()

    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {"/v1/balances", "/v1/balances/{asset}", "/metrics"}
