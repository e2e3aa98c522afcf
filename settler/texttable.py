"""The plain text tables of the CLI: columns two spaces apart, no trailing blanks."""

from __future__ import annotations

from collections.abc import Sequence


def render(rows: Sequence[Sequence[str]], *, left: int = 1) -> str:
    """The first `left` columns left-aligned (names), the others right-aligned (amounts,
    counts); the first row is the header."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) if column < left else cell.rjust(width)
                  for column, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
        for row in rows
    )
