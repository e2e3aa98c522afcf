"""Flame graphs of the worker: `py-spy record` attached to `settler run` during the settle
benchmark's trade phase, written as benchmarks/flame-<label>.svg.

py-spy attaches once the worker answers /readyz (imports and connecting are not in the
graph) and stops when the group's offsets reached the end of the trade topic. It samples at
100 Hz by default: on this 2-core machine, where the worker, both JVMs and py-spy share the
cores, a higher rate costs the worker measurably (py-spy briefly stops the process for each
sample) and 100 Hz over tens of seconds already gives thousands of samples.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sys
from pathlib import Path

from benchmarks.settle import Phases, prepare, run_worker_phases
from benchmarks.stack import ROOT, Stack, WorkerProcess, WorkerSource, progress
from settler.core.registry import Registry

SAMPLE_HZ = 100
STOP_TIMEOUT_S = 60


def flame_path(label: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in label)
    return ROOT / "benchmarks" / f"flame-{safe}.svg"


def py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise SystemExit("py-spy is not installed: `make venv` (it is in the dev extras) or "
                         "`.venv/bin/pip install py-spy`")
    return found


class Profiler:
    """One `py-spy record` attached to a running worker until stopped."""

    def __init__(self, output: Path, rate: int) -> None:
        self.output = output
        self.rate = rate
        self.proc: asyncio.subprocess.Process | None = None
        self.report = ""

    async def attach(self, worker: WorkerProcess) -> None:
        self.output.unlink(missing_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            py_spy(), "record", "--pid", str(worker.pid), "--rate", str(self.rate),
            "--format", "flamegraph", "--output", str(self.output),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        progress(f"  py-spy attached to the worker (pid {worker.pid}) at {self.rate} Hz")

    async def stop(self) -> None:
        """Ctrl-C is how py-spy record is told to write its output and end."""
        proc = self.proc
        if proc is None:
            raise RuntimeError("py-spy was never attached (the worker never answered /readyz)")
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), STOP_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"py-spy did not stop within {STOP_TIMEOUT_S}s") from None
        self.report = output.decode(errors="replace").strip()
        if not self.output.exists():
            raise RuntimeError(f"py-spy wrote no {self.output.name} (exit {proc.returncode}):\n"
                               f"{self.report[-2000:]}")


async def run_flame(stack: Stack, registry: Registry, trades: int, source: WorkerSource,
                    label: str, rate: int = SAMPLE_HZ) -> tuple[Phases, Path, str]:
    """The settle stream; funding settled first, then the trade phase under py-spy."""
    inputs = await prepare(stack, registry, trades, label="flame")
    profiler = Profiler(flame_path(label), rate)
    phases, _ = await run_worker_phases(stack, inputs, "flame", source=source,
                                        on_ready=profiler.attach, before_stop=profiler.stop)
    found = re.search(r"Samples: \d+ Errors: \d+", profiler.report)
    return phases, profiler.output, found[0] if found else ""
