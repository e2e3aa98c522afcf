"""The secure dev stack for tests: its listeners, certificates and passwords, `settler`
commands run as processes with their complete output kept, and a loopback TCP forwarder
(a way to reach a TLS server under an address its certificate does not name)."""

from __future__ import annotations

import base64
import contextlib
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from settler.config import load_settings
from settler.dev import stack as devstack
from settler.dev.secure import Material, SecurePorts, load_material
from tests import harness


@dataclass(frozen=True)
class SecureStack:
    """`settler dev up --secure` as the tests see it."""

    material: Material
    ports: SecurePorts

    def environ(self, kafka: str = "scram") -> dict[str, str]:
        """SETTLER_* variables for the secure paths (see Material.settler_environ)."""
        return self.material.settler_environ(self.ports, kafka=kafka)


def ensure_secure_stack() -> SecureStack:
    """The secure mode of the tests' stack, started now if `make test` did not (this
    restarts a plain Kafka once, to add the listeners; the plain listener stays)."""
    settings = load_settings(environ=harness.STACK_ENV)
    if not devstack.secure_mode_running():
        devstack.up(settings, secure=True, quiet=True)
    material = load_material()
    assert material is not None, "settler dev up --secure made no material"
    return SecureStack(material, devstack.ports_for(settings).secure())


@dataclass(frozen=True)
class Run:
    """One finished `settler` command: its exit code and its complete output."""

    argv: tuple[str, ...]
    code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def last_line(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else ""

    def describe(self) -> str:
        return (f"settler {' '.join(self.argv)} -> exit {self.code} in {self.seconds:.1f}s\n"
                f"--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}")


@dataclass
class Transcript:
    """Every output a test run produced, to search for secrets afterwards."""

    outputs: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, text: str) -> None:
        self.outputs[name] = self.outputs.get(name, "") + text

    def settler(self, name: str, *args: str, environ: Mapping[str, str],
                timeout: float = 90) -> Run:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "settler", *args], env=dict(environ),
                              capture_output=True, text=True, timeout=timeout, check=False)
        run = Run(tuple(args), done.returncode, done.stdout, done.stderr,
                  time.monotonic() - started)
        self.add(name, run.output)
        return run

    def leaks(self, secrets: Mapping[str, str]) -> list[str]:
        """`secret name in output name` for each secret found anywhere."""
        return [f"{secret_name} in {output_name}"
                for output_name, text in self.outputs.items()
                for secret_name, secret in secrets.items()
                if secret and secret in text]


def secret_forms(name: str, value: bytes) -> dict[str, str]:
    """The printable forms a binary secret (a key hash) could take in a line."""
    return {
        f"{name} (hex)": value.hex(),
        f"{name} (base64)": base64.b64encode(value).decode(),
        f"{name} (repr)": repr(value)[2:-1],
    }


def clean_environ(**settings: str) -> dict[str, str]:
    """The process environment without any SETTLER_* variable, plus `settings`."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SETTLER_")}
    environ.update(settings)
    return environ


class Forwarder:
    """Accepts on `listen_host` (an ephemeral port) and copies bytes both ways to
    127.0.0.1:`target_port`. A TLS client that connects through it checks the server's
    certificate against `listen_host`, which is how a test meets a certificate issued for
    another address without a second server."""

    def __init__(self, listen_host: str, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server((listen_host, 0))
        self._listener.settimeout(0.2)
        self.address = f"{listen_host}:{self._listener.getsockname()[1]}"
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, name="forwarder", daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._pump, args=(client,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _pump(self, client: socket.socket) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(client)
            try:
                server = stack.enter_context(socket.create_connection(self._target, timeout=5))
            except OSError:
                return
            peers = {client: server, server: client}
            selector = stack.enter_context(selectors.DefaultSelector())
            for sock in peers:
                selector.register(sock, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select(timeout=0.2):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = source.recv(65536)
                        if not data:
                            return
                        peers[source].sendall(data)
                    except OSError:
                        return

    def close(self) -> None:
        self._stopping.set()
        self._listener.close()
        self._accepting.join(5)
        for thread in self._threads:
            thread.join(5)


@contextlib.contextmanager
def forwarder(listen_host: str, target_port: int) -> Iterator[Forwarder]:
    proxy = Forwarder(listen_host, target_port)
    try:
        yield proxy
    finally:
        proxy.close()

