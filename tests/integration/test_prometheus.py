"""The Grafana dashboard against a real Prometheus scraping a real worker (issue 5): every
PromQL query of deploy/grafana/dashboards/settler.json returns data after a settlement run.

Prometheus is Debian's `prometheus` package (deploy/prometheus/ensure-prometheus.sh, run by
`make test`), started here on loopback with the config deploy/prometheus/prometheus.test.yml.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from settler.core.registry import Registry
from settler.ops.sample import SampleRecord, StreamShape, generate
from tests import harness

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.test.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "settler.json"

# What Grafana substitutes before a query reaches Prometheus (a 1 s scrape interval).
GRAFANA_VARIABLES = {
    "$__rate_interval": "10s",
    "$__interval": "2s",
    "$__range": "5m",
    "$instance": ".*",
}

SHAPE = StreamShape(events=1500, users=60, duplicate_rate=0.1, malformed_rate=0.03, seed=9)
# A withdrawal from an empty account: settled anyway (the engine is the authority on funds)
# and counted as an anomaly, so the anomaly panels have something to show.
OVERDRAFT = SampleRecord(b"99999", json.dumps({
    "type": "withdraw", "event_id": 900_000_001, "user_id": 99_999, "asset_id": 1,
    "amount": 5, "ts": 1_700_000_000_000}).encode())


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables filled in) for every target."""
    document = json.loads(DASHBOARD.read_text())
    panels: list[dict[str, Any]] = []
    for panel in document["panels"]:
        panels += [panel, *panel.get("panels", [])]
    queries = []
    for panel in panels:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"unknown Grafana variable in {panel['title']}: {expr}"
            queries.append((panel["title"], expr))
    return queries


@contextlib.contextmanager
def prometheus(target: str, workdir: Path) -> Iterator[str]:
    """A Prometheus server on a free loopback port scraping `target` every second; its
    base URL. Stopped (and its storage left in `workdir`) at the end."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("no `prometheus` on PATH: run deploy/prometheus/ensure-prometheus.sh "
                    "(make test does)", pytrace=False)
    config = workdir / "prometheus.yml"
    config.write_text(PROMETHEUS_CONFIG.read_text()
                      .replace("${SETTLER_TARGET}", target)
                      .replace("${ALERTS_FILE}", str(ALERTS)))
    promtool = shutil.which("promtool")
    if promtool:
        checked = subprocess.run([promtool, "check", "config", str(config)],
                                 capture_output=True, text=True, check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    port = harness.free_port()
    log = (workdir / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h",
         "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise AssertionError("prometheus did not start:\n"
                                     + (workdir / "prometheus.log").read_text()[-3000:])
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


async def query(client: httpx.AsyncClient, promql: str) -> list[Any]:
    response = await client.get("/api/v1/query", params={"query": promql})
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (promql, body)
    result: list[Any] = body["data"]["result"]
    return result


async def wait_for(client: httpx.AsyncClient, promql: str, value: float, timeout: float
                   ) -> None:
    """Until `promql` evaluates to one sample equal to `value`."""
    deadline = time.monotonic() + timeout
    while True:
        result = await query(client, promql)
        if result and float(result[0]["value"][1]) == value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{promql} is {result}, not {value}, after {timeout}s")
        await asyncio.sleep(0.5)


async def queries_without_data(client: httpx.AsyncClient) -> list[str]:
    return [f"{title}: {promql}" for title, promql in dashboard_queries()
            if not await query(client, promql)]


async def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    env: harness.TestEnv, registry: Registry, tmp_path: Path
) -> None:
    records = [*generate(registry, SHAPE), OVERDRAFT]
    half = len(records) // 2
    settled = [sum(1 for r in part if r.expect is None and not r.duplicate)
               for part in (records[:half], records[half:])]
    settled_count = 'sum(settler_events_total{outcome="settled"})'
    with harness.running(env) as worker, prometheus(f"127.0.0.1:{worker.metrics_port}",
                                                    tmp_path) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            await wait_for(client, 'up{job="settler"}', 1, timeout=30)
            # Two bursts with a scrape between them, so rates and quantiles have a shape.
            await harness.produce(env.topic, records[:half])
            await harness.wait_caught_up(env, 120, worker)
            await wait_for(client, settled_count, settled[0], timeout=30)
            await harness.produce(env.topic, records[half:])
            await harness.wait_caught_up(env, 120, worker)
            await wait_for(client, settled_count, sum(settled), timeout=30)
            # Until a rate window holds enough scrapes of the second burst for every panel.
            deadline = time.monotonic() + 30
            while empty := await queries_without_data(client):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_the_dashboard_has_a_panel_for_each_concern() -> None:
    text = " ".join(promql for _, promql in dashboard_queries())
    for metric in ("settler_events_total", "settler_consumer_lag", "settler_batch_seconds",
                   "settler_retries_total", "settler_errors_total",
                   "settler_balance_anomalies_total", "settler_balance_cache_rows",
                   "settler_last_settled_event_age_seconds", "settler_batches_in_flight"):
        assert metric in text, f"no panel queries {metric}"


# -- the deployment files agree with each other (docker-compose cannot run here) -------------


def _yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text())


def test_docker_compose_runs_the_stack_with_the_configs_of_this_repository() -> None:
    from settler.config import OPTIONS, env_name

    compose = _yaml(ROOT / "docker-compose.yml")
    services = compose["services"]
    assert {"scylla", "kafka", "settler", "prometheus", "grafana"} <= set(services)
    assert services["scylla"]["image"].startswith("scylladb/scylla")
    assert " ".join(services["scylla"]["command"]).startswith("--smp 1 --memory 1G")
    assert services["kafka"]["image"].startswith("apache/kafka")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert services["settler"]["build"] == "."
    settler_env = services["settler"]["environment"]
    known = {env_name(name) for name in OPTIONS}
    assert set(settler_env) <= known, f"unknown settings: {set(settler_env) - known}"
    port = settler_env["SETTLER_METRICS_PORT"]
    assert f"{port}:{port}" in services["settler"]["ports"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"

    prometheus_config = _yaml(ROOT / "deploy" / "prometheus" / "prometheus.yml")
    (job,) = prometheus_config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"settler:{port}"]
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"]
                  if v.startswith("./"))
    assert mounts["./deploy/prometheus/alerts.yml"] in prometheus_config["rule_files"]
    test_variant = PROMETHEUS_CONFIG.read_text()
    assert f"job_name: {job['job_name']}" in test_variant

    grafana_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"]
                          if v.startswith("./"))
    datasources = _yaml(ROOT / "deploy" / "grafana" / "provisioning" / "datasources"
                        / "prometheus.yml")["datasources"]
    providers = _yaml(ROOT / "deploy" / "grafana" / "provisioning" / "dashboards"
                      / "settler.yml")["providers"]
    assert providers[0]["options"]["path"] == grafana_mounts["./deploy/grafana/dashboards"]
    assert datasources[0]["url"] == "http://prometheus:9090"
    document = json.loads(DASHBOARD.read_text())
    uids = {panel["datasource"]["uid"] for panel in document["panels"] if "datasource" in panel}
    assert uids == {datasources[0]["uid"]}


def test_the_image_installs_settler_applies_the_schema_then_runs_the_worker() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in dockerfile.splitlines()
                    if line.strip() and not line.startswith(("#", " "))]
    assert instructions[0] == ["FROM", "python:3.11-slim"]
    commands = [" ".join(parts) for parts in instructions]
    assert "RUN pip install . && python -c \"import settler.cli\"" in commands
    assert "COPY schema ./schema" in commands
    assert commands[-1] == 'CMD ["sh", "-c", "settler schema apply && exec settler run"]'
    assert "EXPOSE 9108" in commands
    ignored = (ROOT / ".dockerignore").read_text().split()
    for needed in ("settler", "schema", "pyproject.toml", "README.md"):
        assert needed not in ignored
