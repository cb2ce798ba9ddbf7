"""Table formatting: every column named, and every table ends with a `min ratio` line (ours vs torch:
torch time / our time, the minimum over its rows, with the row it came from)."""
from __future__ import annotations

from dataclasses import dataclass


def fmt_us(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def fmt_x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def fmt_num(v: float | None, digits: int = 0) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def fmt_pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}%"


@dataclass(frozen=True)
class Column:
    name: str
    width: int
    left: bool = False  # text columns align left, numbers right

    def cell(self, text: str) -> str:
        width = max(self.width, len(self.name))
        return f"{text:<{width}}" if self.left else f"{text:>{width}}"


class Table:
    """Rows printed as they come (a slow run shows progress); `footer()` is the min ratio line.

    `row(cells, ratios, label)`: `cells` one string per column; `ratios` the row's ours-vs-torch ratios
    (None where not measured) that the min ratio line ranges over."""

    INDENT = "  "

    def __init__(self, title: str, columns: list[Column]):
        if not columns or any(not c.name.strip() for c in columns):
            raise ValueError(f"table {title!r}: every column needs a name")
        self.title = title
        self.columns = columns
        self.ratios: list[tuple[float, str]] = []
        self.rows = 0

    def header(self) -> list[str]:
        return [f"{self.INDENT}{self.title}", self.INDENT + " ".join(c.cell(c.name) for c in self.columns)]

    def row(self, cells: list[str], ratios: list[float | None] = (), label: str = "") -> str:
        if len(cells) != len(self.columns):
            raise ValueError(f"table {self.title!r}: {len(cells)} cells for {len(self.columns)} columns")
        self.rows += 1
        self.ratios.extend((r, label or cells[0]) for r in ratios if r is not None)
        return self.INDENT + " ".join(c.cell(t) for c, t in zip(self.columns, cells))

    def min_ratio(self) -> tuple[float, str] | None:
        return min(self.ratios, key=lambda t: t[0]) if self.ratios else None

    def footer(self) -> str:
        m = self.min_ratio()
        if m is None:
            return f"{self.INDENT}min ratio (torch/ours): n/a (no row has both times)"
        return (f"{self.INDENT}min ratio (torch/ours): {fmt_x(m[0])} at {m[1].strip()} "
                f"(over {len(self.ratios)} ratios in {self.rows} rows)")
