"""Markdown for hand-off documents (report.md, device_spec.md): the one place that escapes table cells.

A `|` inside a cell ends the cell in every CommonMark/GFM renderer, so values such as
`"sgd | ttv2"` vanish or shift columns; a newline ends the row. `cell` escapes both (and the
backslash itself), `table` builds a whole table from rows of values.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

__all__ = ["cell", "table"]


def cell(value: Any) -> str:
    """One table cell: `|` and `\\` escaped, newlines folded to spaces."""
    text = str(value).replace("\\", "\\\\").replace("|", "\\|")
    return " ".join(text.splitlines())


def table(headers: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """A GFM table; every cell escaped with `cell`."""
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
