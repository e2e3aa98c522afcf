"""Progress of a long operator command (`settler verify`, `settler replay`) on stderr.

A redrawn bar on a terminal; plain periodic lines otherwise, so that CI logs and
`kubectl logs` show progress without carriage-return noise. Results go to stdout, never here.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 30
TTY_REDRAW_S = 0.1
PLAIN_EVERY_S = 5.0


class Progress:
    """`update(done)` as work advances, `finish()` once at the end."""

    def __init__(self, label: str, total: int, *, unit: str = "", stream: TextIO | None = None,
                 every_s: float = PLAIN_EVERY_S, tty: bool | None = None) -> None:
        self.label = label
        self.total = max(0, total)
        self.unit = unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_s = TTY_REDRAW_S if self.tty else every_s
        self.done = 0
        self.note = ""
        self.started = time.monotonic()
        self._shown_at = float("-inf")
        self._finished = False

    def update(self, done: int, *, total: int | None = None, note: str = "") -> None:
        self.done = max(0, done)
        if total is not None:
            self.total = max(0, total)
        self.note = note
        now = time.monotonic()
        if now - self._shown_at >= self.every_s:
            self._shown_at = now
            self._show(final=False)

    def advance(self, step: int = 1, *, note: str = "") -> None:
        self.update(self.done + step, note=note or self.note)

    def finish(self, note: str = "") -> None:
        if self._finished:
            return
        self._finished = True
        if note:
            self.note = note
        self._show(final=True)

    def line(self) -> str:
        """The current state as one line (without a bar on plain output)."""
        elapsed = time.monotonic() - self.started
        unit = f" {self.unit}" if self.unit else ""
        fraction = min(1.0, self.done / self.total) if self.total else 1.0
        parts = [f"{self.label}"]
        if self.tty:
            filled = int(fraction * BAR_WIDTH)
            parts.append("[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]")
        parts.append(f"{fraction * 100:5.1f}% {self.done}/{self.total}{unit}")
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.done and rate > 0:
            parts.append(f"{rate:,.0f}{unit}/s")
            if self.done < self.total:
                parts.append(f"eta {_duration((self.total - self.done) / rate)}")
        parts.append(_duration(elapsed))
        if self.note:
            parts.append(self.note)
        return "  ".join(parts)

    def _show(self, *, final: bool) -> None:
        text = self.line()
        if self.tty:
            end = "\n" if final else ""
            self.stream.write(f"\r\x1b[2K{text}{end}")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
