"""Tables for a person: the columns that fit the terminal, chosen by priority; numbers never cut.

Hand-written rather than Rich's table: Rich measured and laid out every cell (2.8 s for `ckpt list` of
3,000 checkpoints, against 0.08 s for its JSON) and folded numbers and dates over several lines. Here a
column is either shown whole or left out (a last line on stderr says which), and only text is cut, with
`…`. Piped, a table has every column uncut unless COLUMNS is set (grep and friends see whole rows).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice, repeat
from operator import itemgetter
from typing import Annotated, Any, TextIO

import typer

from ..errors import UsageError

# kinds of column: how a cell may be shown when the terminal is narrow
NUM = "num"  # a number: right-aligned, never cut (the column is left out instead)
WHOLE = "whole"  # left-aligned, never cut: ids, dates, states, shapes
TEXT = "text"  # left-aligned, cut with … to fit
ITEMS = "items"  # text made of items (`val_loss=0.1  acc=0.9`): cut between items only, then …

GAP = "  "
MORE = "…"

ColumnsOpt = Annotated[
    str | None,
    typer.Option("--columns", metavar="A,B,C", help="Show these columns, in this order (names as in --wide)."),
]
WideOpt = Annotated[bool, typer.Option("--wide", help="Show every column, nothing cut, whatever the width.")]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, metavar="N", help="Show at most N rows.")]


@dataclass(slots=True, eq=False)  # a column is itself: compared and hashed by identity
class Column:
    """One column: its header, its cells (already formatted), and how it may be shown."""

    name: str
    cells: list[str]
    kind: str = TEXT
    key: str = ""  # what --columns calls it (default: the header)
    rank: int = 0  # lower is more important: kept first when the terminal is narrow
    group: str = ""  # plural noun for the last line's count: "+9 metrics"
    sep: str = GAP  # ITEMS: what separates the items of a cell
    width: int = field(default=0, init=False)  # natural width, once measured

    @property
    def label(self) -> str:
        return self.key or self.name


def check_view(json: bool, columns: str | None, wide: bool) -> None:
    """--columns and --wide choose a table's columns: with --json they mean nothing (exit 2)."""
    if json and (columns is not None or wide):
        flag = "--columns" if columns is not None else "--wide"
        raise UsageError(f"{flag} chooses a table's columns; --json prints every key", hint=f"drop {flag} or --json")


def limited(rows: list[Any], limit: int | None) -> list[Any]:
    return rows if limit is None else rows[:limit]


def terminal_width(stream: TextIO) -> int | None:
    """The width to fit: COLUMNS if set, else the terminal's; None (no limit) when piped."""
    env = os.environ.get("COLUMNS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        if stream.isatty():
            return os.get_terminal_size(stream.fileno()).columns or None
    except (AttributeError, ValueError, OSError):
        pass
    return None


def width(s: str) -> int:
    """Columns `s` takes on a terminal: East Asian wide characters take two, combining marks none."""
    if s.isascii():
        return len(s)
    from unicodedata import combining, east_asian_width

    return sum(0 if combining(c) else 2 if east_asian_width(c) in "WF" else 1 for c in s)


def cut(s: str, w: int) -> str:
    """`s` in at most `w` columns: whole if it fits, else its start and `…`."""
    if width(s) <= w:
        return s
    if w <= 0:
        return ""
    if s.isascii():
        return s[: w - 1] + MORE
    kept, used = [], 0
    for c in s:
        used += width(c)
        if used > w - 1:
            break
        kept.append(c)
    return "".join(kept) + MORE


def cut_items(s: str, w: int, sep: str = GAP) -> str:
    """`s` in at most `w` columns, cut only between items (then `…`); the first item is cut as text if alone
    it does not fit."""
    if width(s) <= w:
        return s
    tail = " " + MORE
    end = len(s)
    while True:
        end = s.rfind(sep, 0, end)
        if end <= 0:
            return cut(s.split(sep, 1)[0], w)
        if width(s[:end]) + len(tail) <= w:
            return s[:end] + tail


def _printable(s: str) -> str:
    """Control characters (a newline in a name) as escapes: a cell is always one line."""
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in s)


printable = _printable  # the same escaping for names printed outside a table (notes, sparklines)


def _min_width(c: Column) -> int:
    """The least width a column may get: all of it for NUM and WHOLE, a dozen characters of text."""
    if c.kind in (NUM, WHOLE):
        return c.width
    header = width(c.name)  # a header is never cut
    if c.kind == ITEMS:  # the first item of each cell, whole, and the mark that more follow
        firsts = (width(x.split(c.sep, 1)[0]) + (2 if c.sep in x else 0) for x in c.cells)
        return min(c.width, max(header, 6, max(firsts, default=0)))
    return min(c.width, max(header, 12))


def layout(
    cols: Sequence[Column], limit: int | None, chosen: list[Column] | None = None
) -> tuple[list[Column], list[int], list[Column]]:
    """The columns to show (in display order), their widths, and the columns left out (display order)."""
    if chosen is not None:
        order = list(chosen)
    else:
        order = sorted(cols, key=lambda c: c.rank)
    if limit is None:
        display = _display(cols, order, chosen)
        return display, [c.width for c in display], []
    shown: list[Column] = []
    used = -len(GAP)
    for c in order:
        need = _min_width(c)
        if chosen is None and shown and used + len(GAP) + need > limit:
            break
        shown.append(c)
        used += len(GAP) + need
    widths = {c: _min_width(c) for c in shown}
    spare = limit - used
    if len(shown) == 1 and spare < 0 and shown[0].kind in (TEXT, ITEMS):
        widths[shown[0]] = limit
    for c in shown:  # in priority order: text columns grow back towards their natural width
        if spare <= 0:
            break
        if c.kind in (TEXT, ITEMS):
            extra = min(spare, c.width - widths[c])
            widths[c] += extra
            spare -= extra
    left_out = [c for c in cols if c not in widths] if chosen is None else []
    display = _display(cols, shown, chosen)
    return display, [widths[c] for c in display], left_out


def _display(cols: Sequence[Column], shown: list[Column], chosen: list[Column] | None) -> list[Column]:
    if chosen is not None:
        return shown
    keep = set(shown)
    return [c for c in cols if c in keep]


def choose(cols: Sequence[Column], columns: str | None) -> list[Column] | None:
    """The columns --columns names, in its order; unknown names are a usage error (exit 2)."""
    if columns is None:
        return None
    by_key: dict[str, Column] = {}
    for c in cols:
        by_key.setdefault(c.label.lower(), c)
        by_key.setdefault(c.name.lower(), c)
    picked: list[Column] = []
    for name in (n.strip() for n in columns.split(",")):
        if not name:
            continue
        col = by_key.get(name.lower())
        if col is None:
            raise UsageError(
                f"no column '{name}' in this table", hint=f"choose from: {', '.join(c.label for c in cols)}"
            )
        if col not in picked:
            picked.append(col)
    if not picked:
        raise UsageError("--columns names no column", hint=f"choose from: {', '.join(c.label for c in cols)}")
    return picked


def left_out_line(left_out: Iterable[Column], how: str = "--columns or --wide") -> str:
    """`+9 metrics, created; --columns or --wide`: what a narrow terminal left out, and `how` to see it."""
    counts: dict[str, int] = {}
    for c in left_out:
        counts[c.group] = counts.get(c.group, 0) + 1
    parts: list[str] = []
    for c in left_out:
        if not c.group or counts[c.group] == 1:
            parts.append(c.label)
        elif counts[c.group] > 1:
            parts.append(f"{counts[c.group]} {c.group}")
            counts[c.group] = 0  # named once
    return f"+{', '.join(parts)}; {how}"


def _fit_cells(c: Column, w: int) -> list[str]:
    """The column's cells cut to `w` where needed."""
    cells = c.cells
    if c.kind in (TEXT, ITEMS) and w < c.width:
        if c.kind == TEXT:
            cells = [x if len(x) <= w and x.isascii() else cut(x, w) for x in cells]
        else:
            cells = [x if len(x) <= w and x.isascii() else cut_items(x, w, c.sep) for x in cells]
    return cells


def _pad(s: str, w: int, right: bool) -> str:
    fill = " " * (w - width(s))
    return fill + s if right else s + fill


def render(
    cols: Sequence[Column],
    *,
    title: str | None = None,
    columns: str | None = None,
    wide: bool = False,
    stream: TextIO | None = None,
    note: Callable[[str], None] | None = None,
    how: str = "--columns or --wide",
) -> None:
    """Write the table to `stream` (stdout), fitted to the terminal unless `wide`; `note` (stderr) gets the
    line that says which columns were left out, and `how` to see them (the command's own options)."""
    out = stream if stream is not None else sys.stdout
    chosen = choose(cols, columns)
    for c in cols:
        c.name = _printable(c.name)
        if not all(map(str.isprintable, c.cells)):
            c.cells = [_printable(x) for x in c.cells]
        ascii_only = all(map(str.isascii, c.cells))
        c.width = max(width(c.name), max(map(len if ascii_only else width, c.cells), default=0))
    limit = None if wide else terminal_width(out)
    shown, widths, left_out = layout(cols, limit, chosen)
    if title is not None:
        out.write((_printable(title) if limit is None else cut(_printable(title), limit)) + "\n")
    headers = [_pad(cut(c.name, w), w, c.kind == NUM) for c, w in zip(shown, widths, strict=True)]
    out.write(GAP.join(headers).rstrip() + "\n")
    # one %-format a row: ASCII cells are padded by it; others (width is not length) are padded first
    body, form = [], []
    for c, w in zip(shown, widths, strict=True):
        cells = _fit_cells(c, w)
        if all(map(str.isascii, cells)):
            form.append(f"%{w}s" if c.kind == NUM else f"%-{w}s")
        else:
            cells = [_pad(x, w, c.kind == NUM) for x in cells]
            form.append("%s")
        body.append(cells)
    lines = map(str.rstrip, map(GAP.join(form).__mod__, zip(*body, strict=True)))  # no padding at the ends
    # made and written 512 rows at a time: when the reader goes away (`| head`), the write that meets the
    # closed pipe raises BrokenPipeError and the rows after it are never made
    while chunk := list(islice(lines, 512)):
        out.write("\n".join(chunk) + "\n")
    if left_out:
        out.flush()
        (note or _err)(left_out_line(left_out, how))


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def short_times(values: Sequence[str | None]) -> list[str]:
    """ISO times as a table shows them: 'YYYY-MM-DD HH:MM', without the year when every row has the same one;
    seconds only where minutes would make two rows alike."""
    full = [v[:19].replace("T", " ") if v else "" for v in values]
    present = [v for v in full if v]
    if not present:
        return full
    start = 5 if len(set(map(itemgetter(slice(0, 4)), present))) == 1 else 0
    end = 19 if len(set(map(itemgetter(slice(0, 16)), present))) < len(set(present)) else 16
    return [v[start:end] for v in full]


# --- the tables of list, tasks, models and trash list ------------------------------------------------


def _metric_cells(values: list[float | None]) -> list[str]:
    """`fmt_metric` of many values: for floats alone, one `format` call each from C (30,000 in a big list)."""

    if set(map(type, values)) <= {float}:
        return list(map(format, values, repeat(".4g")))
    return [fmt_metric(v) for v in values]


def _sizes(sizes: Sequence[int | None]) -> list[str]:

    shown = {n: human_size(n) for n in set(sizes)}
    return [shown[n] for n in sizes]


def checkpoint_columns(
    cps: Sequence[Any], latest: int | None, models: dict[int, list[str]], metric: str | None
) -> list[Column]:
    """`ckpt list`'s columns. Kept first on a narrow terminal: number, step, `metric` (the sorted one, else the
    first), size, models, the latest mark; then the other metrics, created, epoch."""
    names: dict[str, None] = {}
    for cp in cps:
        for k in cp.metrics:
            names.setdefault(k, None)
    first = metric if metric in names else next(iter(names), None)
    metrics = [cp.metrics for cp in cps]
    metric_cols = [
        Column(m, _metric_cells(list(map(dict.get, metrics, repeat(m)))), NUM, rank=2 if m == first else 10 + i)
        for i, m in enumerate(names)
    ]
    for c in metric_cols:
        c.group = "metrics"
    numbers = [cp.number for cp in cps]
    return [
        Column("#", list(map(str, numbers)), NUM, key="number", rank=0),
        Column("step", ["" if cp.step is None else str(cp.step) for cp in cps], NUM, rank=1),
        Column("epoch", ["" if cp.epoch is None else str(cp.epoch) for cp in cps], NUM, rank=1001),
        *metric_cols,
        Column("size", _sizes([cp.size for cp in cps]), NUM, rank=3),
        Column("created", short_times([cp.created for cp in cps]), WHOLE, rank=1000),
        Column("models", [", ".join(models[n]) if n in models else "" for n in numbers], TEXT, rank=4),
        Column("", ["latest" if n == latest else "" for n in numbers], WHOLE, key="latest", rank=5),
    ]


def _metrics_cell(metrics: dict[str, float]) -> str:

    return GAP.join(f"{k}={fmt_metric(v)}" for k, v in metrics.items())


def task_columns(rows: Sequence[Any]) -> list[Column]:
    """`ckpt tasks`'s columns: name, status, checkpoints, size, latest metrics (cut between metrics)."""

    return [
        Column("task", [r.name for r in rows], TEXT, rank=0),
        Column("status", [r.status for r in rows], WHOLE, rank=1),
        Column("checkpoints", [str(r.checkpoints) for r in rows], NUM, rank=2),
        Column("size", [human_size(r.size) for r in rows], NUM, rank=3),
        Column("latest metrics", [_metrics_cell(r.latest_metrics) for r in rows], ITEMS, key="metrics", rank=4),
    ]


def model_columns(models: Sequence[Any]) -> list[Column]:
    """`ckpt models`'s columns: title, task, checkpoint, metrics, size, storage, created."""

    return [
        Column("title", [m.title for m in models], TEXT, rank=0),
        Column("task", [m.task for m in models], TEXT, rank=2),
        Column("checkpoint", [str(m.checkpoint) for m in models], NUM, rank=1),
        Column("metrics", [_metrics_cell(m.metrics) for m in models], ITEMS, rank=4),
        Column("size", [human_size(m.size) for m in models], NUM, rank=3),
        Column("storage", [m.storage for m in models], WHOLE, rank=6),
        Column("created", short_times([m.created for m in models]), WHOLE, rank=5),
    ]


def trash_columns(entries: Sequence[Any], what: Callable[[Any], str]) -> list[Column]:
    """`ckpt trash list`'s columns: id, task, what, size, created, state, the command that made the entry."""

    return [
        Column("id", [e.id for e in entries], WHOLE, rank=0),
        Column("task", [e.task or "" for e in entries], TEXT, rank=2),
        Column("what", [what(e) for e in entries], TEXT, rank=1),
        Column("size", [human_size(e.size) for e in entries], NUM, rank=3),
        Column("created", short_times([e.created for e in entries]), WHOLE, rank=4),
        Column("state", [e.state for e in entries], WHOLE, rank=5),
        Column("reason", [e.reason or "" for e in entries], TEXT, rank=6),
    ]


# plain formatters, shared by every command's output (re-exported by _common)


def human_size(n: int | None) -> str:
    if n is None:
        return ""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def fmt_metric(v: float | None) -> str:
    if v is None:
        return ""
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"
