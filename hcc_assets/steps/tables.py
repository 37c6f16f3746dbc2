"""Markdown tables as text, for the metadata the assets attach (hcc_assets.defs.metadata wraps them)."""

from __future__ import annotations


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of `columns` (a missing value is an empty cell, a float has 4 significant digits)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(column)) for column in columns) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    return str(value).replace("|", "/")
