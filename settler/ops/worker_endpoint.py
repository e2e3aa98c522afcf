"""What a running worker says about itself over HTTP: /readyz (role, readiness, failing
checks) and /metrics (events/s and settle p99 of the last minute), read with a plain,
time-bounded HTTP/1.1 GET. A worker that does not answer is a view, not an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from settler.timeouts import within


@dataclass(frozen=True)
class WorkerView:
    url: str
    reachable: bool
    error: str = ""
    role: str = ""
    ready: bool = False
    failing: tuple[str, ...] = ()
    events_per_s: float | None = None
    settle_p99_s: float | None = None


async def http_get(url: str, timeout_s: float) -> tuple[int, str]:
    """A plain HTTP/1.1 GET (the worker's endpoint speaks nothing fancier)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"expected an http://host:port URL, got {url!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query

    async def get() -> tuple[int, str]:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                         "Connection: close\r\n\r\n".encode())
            await writer.drain()
            response = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        head, _, body = response.partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].split()
        if len(status_line) < 2 or not status_line[1].isdigit():
            raise ConnectionError(f"not an HTTP answer from {url}")
        return int(status_line[1]), body.decode("utf-8", "replace")

    return await within(timeout_s, get())


def metric_values(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples of a Prometheus text page by name: [(labels, value), ...]."""
    values: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return values


async def worker_view(base_url: str, timeout_s: float) -> WorkerView:
    base = base_url.rstrip("/")
    for suffix in ("/metrics", "/readyz"):
        base = base.removesuffix(suffix)
    try:
        _, ready_body = await http_get(base + "/readyz", timeout_s)
        _, metrics_text = await http_get(base + "/metrics", timeout_s)
        ready = json.loads(ready_body)
        values = metric_values(metrics_text)
    except (OSError, TimeoutError, ValueError) as exc:
        return WorkerView(base, reachable=False, error=_http_error(exc, timeout_s))

    def single(name: str) -> float | None:
        samples = values.get(name)
        return samples[0][1] if samples else None

    return WorkerView(
        base, reachable=True, role=str(ready.get("role", "")), ready=bool(ready.get("ready")),
        failing=tuple(ready.get("failing", ())),
        events_per_s=single("settler_events_per_second_1m"),
        settle_p99_s=single("settler_settle_latency_p99_seconds_1m"),
    )


def _http_error(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
