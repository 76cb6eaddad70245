"""Rows as JSON: the stable keys documented in docs/json.md."""

from __future__ import annotations

import json
import sys
from bisect import bisect_left
from itertools import accumulate
from math import isfinite
from operator import add
from typing import Any

from .. import __version__
from ..manifest import Checkpoint, metric_json


def metric_or_none(v: float) -> float | None:
    return metric_json(v)


def task_json(r: Any) -> dict[str, Any]:
    """One row of `ckpt tasks --json`, from a TaskSummary."""
    return {
        "name": r.name,
        "status": r.status,
        "checkpoints": r.checkpoints,
        "size": r.size,
        "created": r.created,
        "latest": r.latest,
        "latest_metrics": {k: metric_or_none(v) for k, v in r.latest_metrics.items()},
    }


# `ckpt tasks --json` for a script is its rows' text joined as the C encoder joins a list's items; each task's text
# is kept (Workspace.tasks_rendered) with the form: the number must change whenever the text of a row does
TASKS_FORM = f"ckpt {__version__}, tasks rows 1"


def task_text(r: Any) -> str:
    """`task_json` as the one-line JSON `print_json` writes for a script."""
    return json.dumps(task_json(r), ensure_ascii=False, allow_nan=False)


def checkpoint_path(ws: Any, task: Any, cp: Checkpoint, prefix: str | None = None) -> str:
    """`ws.rel(task.path_of(cp))` without building two Paths per checkpoint (10,000 of them in `ckpt list`)."""
    file = cp.file
    if "//" in file or "/." in file or file[:1] == "." or file[-1:] == "/":  # pathlib may normalise it: let it
        return str(ws.rel(task.path_of(cp)))
    return f"{prefix or ws.rel(task.folder)}/{file}"


def checkpoints_json(
    ws: Any, task: Any, cps: list[Checkpoint], latest: int | None, models: dict[int, list[str]]
) -> list[dict[str, Any]]:
    """`checkpoint_json` of many checkpoints of one task, written for speed (`ckpt list` of 10,000)."""
    rows = _rows(ws, task, cps)
    for row in rows:
        number = row["number"]
        row["latest"] = number == latest
        row["models"] = sorted(models[number]) if number in models else []
    return rows


def _rows(ws: Any, task: Any, cps: list[Checkpoint]) -> list[dict[str, Any]]:
    """The rows of `checkpoints_json` less `latest` and `models`, the keys that change after a record is written."""
    prefix = ws.rel(task.folder)
    rows = []
    for cp in cps:
        metrics: dict[str, float | None] | dict[str, float] = cp.metrics
        if not all(map(isfinite, cp.metrics.values())):
            metrics = {k: metric_json(v) for k, v in cp.metrics.items()}
        rows.append(
            {
                "number": cp.number,
                "step": cp.step,
                "epoch": cp.epoch,
                "metrics": metrics,
                "size": cp.size,
                "created": cp.created,
                "path": checkpoint_path(ws, task, cp, prefix),
                "sha256": cp.sha256,
            }
        )
    return rows


# `ckpt list --json` of every checkpoint, kept as text (Task.keep_rows) while the records are unchanged: rendered
# with every `latest` false and `models` empty, then patched where they differ. The C encoder writes ", " and ": "
# between items, the two keys come last in a row, and '{"number": ' never occurs inside a JSON string (its quote
# would be escaped), so each row starts exactly where the text has `[` or `}, ` before '{"number": '.
_ROW_START = b'{"number": '
_ROW_CUT = b"}, " + _ROW_START
_PLAIN_END = b', "latest": false, "models": []}'
# how `plain_rows` renders, kept with the rows: the number must change whenever the text of a row does
ROWS_FORM = f"ckpt {__version__}, list rows 1"


def plain_rows(ws: Any, task: Any, cps: list[Checkpoint]) -> tuple[bytes, list[int]] | None:
    """`checkpoints_json` of `cps` with no latest and no models, as one line of UTF-8 JSON, and the offset where
    each checkpoint's row starts; None where the rows cannot be told apart (not expected)."""
    text = json.dumps(checkpoints_json(ws, task, cps, None, {}), ensure_ascii=False, allow_nan=False).encode()
    if not cps:
        return text, []
    parts = text[1:-1].split(_ROW_CUT)
    if len(parts) != len(cps) or not parts[0].startswith(_ROW_START):
        return None
    # row i > 0 starts after the cuts before it, each cut less the '{"number": ' it took from the row
    ends = accumulate(map(len, parts[:-1]))
    starts = [1, *map(add, ends, range(1 + len(_ROW_CUT) - len(_ROW_START), sys.maxsize, len(_ROW_CUT)))]
    return text, starts


def extend_rows(
    ws: Any, task: Any, cps: list[Checkpoint], text: bytes | memoryview, numbers: list[int], starts: list[int]
) -> tuple[bytes, list[int]] | None:
    """`plain_rows` of `cps`, taking the rows of the first ones from `text` (kept with their `numbers` and
    `starts`) and rendering only the rest; None where the kept checkpoints are not the first of `cps`."""
    kept = len(numbers)
    if not kept or kept > len(cps) or [cp.number for cp in cps[:kept]] != numbers:
        return None
    view = memoryview(text)
    if view[-1:] != b"]" or len(starts) != kept:
        return None
    if kept == len(cps):
        return view.tobytes(), starts
    rendered = plain_rows(ws, task, cps[kept:])
    if rendered is None:
        return None
    more, more_starts = rendered
    # "[kept rows]" and "[more rows]" become "[kept rows, more rows]": the new rows move by len(view)
    return b"".join([view[:-1], b", ", more[1:]]), [*starts, *(len(view) + s for s in more_starts)]


def splice_rows(
    text: bytes | memoryview, numbers: list[int], starts: list[int], models: dict[int, list[str]]
) -> list[bytes | memoryview] | None:
    """The one-line JSON of `checkpoints_json` of every checkpoint of a task, byte for byte, as pieces to write in
    turn: `plain_rows`' text with the last row made the latest and the checkpoints in `models` given their titles.

    `numbers` (ascending) and `starts` (where each one's row starts in `text`) may be empty when `models` is.
    None when `text` does not hold those rows where `starts` says.
    """
    view = memoryview(text)
    if view == b"[]":
        return [view]
    if len(numbers) != len(starts) or (models and not numbers):
        return None
    last = len(numbers) - 1
    titled: dict[int, list[str]] = {}
    for number, titles in models.items():
        i = bisect_left(numbers, number)
        if i < len(numbers) and numbers[i] == number:
            titled[i] = titles
    pieces: list[bytes | memoryview] = []
    done = 0
    for i in sorted(titled):
        if i == last:
            break
        end = starts[i + 1] - 2  # just after the row's closing brace
        if not _is_row(view, numbers[i], starts[i], end, b", ") or done > starts[i]:
            return None
        made = json.dumps(sorted(titled[i]), ensure_ascii=False).encode()
        pieces += [view[done : end - len(_PLAIN_END)], b', "latest": false, "models": ' + made + b"}"]
        done = end
    end = len(view) - 1
    if (numbers and not _is_row(view, numbers[last], starts[last], end, b"]")) or done > end - len(_PLAIN_END):
        return None
    if view[end - len(_PLAIN_END) :] != _PLAIN_END + b"]":
        return None
    made = json.dumps(sorted(titled.get(last, [])), ensure_ascii=False).encode()
    pieces += [view[done : end - len(_PLAIN_END)], b', "latest": true, "models": ' + made + b"}]"]
    return pieces


def _is_row(view: memoryview, number: int, start: int, end: int, after: bytes) -> bool:
    """Whether checkpoint `number`'s row, rendered plain, spans view[start:end] and `after` follows it."""
    head = b'%s%d, "' % (_ROW_START, number)
    return (
        view[start : start + len(head)] == head
        and view[end - len(_PLAIN_END) : end] == _PLAIN_END
        and view[end : end + len(after)] == after
    )


def checkpoint_json(ws: Any, task: Any, cp: Checkpoint, latest: bool, models: list[str]) -> dict[str, Any]:
    return {
        "number": cp.number,
        "step": cp.step,
        "epoch": cp.epoch,
        "metrics": {k: metric_json(v) for k, v in cp.metrics.items()},
        "size": cp.size,
        "created": cp.created,
        "path": checkpoint_path(ws, task, cp),
        "sha256": cp.sha256,
        "latest": latest,
        "models": sorted(models),
    }


def model_json(ws: Any, m: Any) -> dict[str, Any]:
    return {
        "title": m.title,
        "task": m.task,
        "checkpoint": m.checkpoint,
        "step": m.step,
        "epoch": m.epoch,
        "metrics": {k: metric_json(v) for k, v in m.metrics.items()},
        "size": m.size,
        "created": m.created,
        "storage": m.storage,
        "sha256": m.sha256,
        "path": ws.rel(m.path),
    }
