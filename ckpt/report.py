"""A one-page report of a task: one self-contained HTML file (no request to any server).

The page holds the task's header, its curves (ckpt.plot, a PNG inlined as a data: URI), the best checkpoint
by each metric, every checkpoint (live and in the trash) in a table sortable by any column (a small inline
script), the models made from the task, a preview grid when asked (ckpt.preview, run into the page; nothing
is stored in the workspace), and the commands to promote or restore. It prints on paper as it shows.
"""

from __future__ import annotations

import base64
import html
import re
import shlex
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError
from .metrics import value
from .timeutil import now_iso

if TYPE_CHECKING:
    from .plot import PlotData, TaskCurves
    from .preview import PreviewResult
    from .workspace_base import Workspace


@dataclass(slots=True)
class PreviewRequest:
    """What `ckpt report --preview` runs: checkpoints `numbers` of the task on `images` (with `masks`)."""

    numbers: list[int]
    images: list[Path]
    masks: Path | None = None
    device: str = "auto"
    arch: str | None = None  # the network factory, where the task records none (as `ckpt preview --arch`)
    arch_kwargs: dict[str, Any] | None = None


@dataclass(slots=True)
class Report:
    """A built report: the HTML, and what it holds (for the command's summary and its JSON)."""

    html: str
    task: str
    checkpoints: int  # live ones
    trashed: int
    models: list[str]
    metrics: list[str]
    preview: list[int] = field(default_factory=list)  # the previewed checkpoint numbers
    notes: list[str] = field(default_factory=list)


def build(
    ws: Workspace,
    task: str,
    *,
    preview: PreviewRequest | None = None,
    command: Callable[..., str] | None = None,
) -> Report:
    """The report of `task` in `ws` (a folder or a bucket). `command(*words)` writes a ckpt command line for
    the page (default `ckpt WORDS`). Raises TaskNotFound, UsageError, and what a preview raises."""
    from . import __version__
    from .plot import collect, render

    cmd = command or (lambda *words: shlex.join(["ckpt", *words]))
    t = ws.task(task)
    header = t.header
    data = collect(ws, [task], max_panels=6)
    curves = data.tasks[0]
    picture = render(data, "png", dpi=120) if data.metrics else None
    all_metrics = sorted({k for p in curves.points for k in p.metrics})
    models, model_errors = ws.models.read_all()
    mine = sorted((m for m in models if m.task == task), key=lambda m: (m.checkpoint, m.title))
    notes = list(data.notes) + [f"a model could not be read: {e}" for e in model_errors]
    shown: PreviewResult | None = None
    grid = b""
    if preview is not None:
        shown, grid = _run_preview(ws, task, preview)
    live = curves.live
    trashed = [p for p in curves.points if p.trashed is not None]
    parts = [
        _head(f"ckpt report: {task}"),
        '<body><header><h1>Task <span class="name">',
        _e(task),
        "</span></h1>",
        _facts(ws, header, live, trashed, mine),
        "</header>",
    ]
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    parts.append(_curves(picture, data))
    parts.append(_best(curves, data, task, cmd))
    parts.append(_table(curves, all_metrics))
    parts.append(_models(mine))
    if shown is not None:
        parts.append(_preview(shown, grid))
    parts.append(_commands(curves, task, mine, cmd))
    parts.append(
        f"<footer>Made by ckpt {_e(__version__)} on {_e(now_iso()[:19].replace('T', ' '))} UTC from "
        f"{_e(ws.location)}.</footer>"
    )
    parts.append(f"<script>{_SCRIPT}</script></body></html>\n")
    names = [*all_metrics, *(title for p in curves.points for title in p.models), *(m.title for m in mine)]
    return Report(
        _isolate("".join(parts), names),
        task,
        len(live),
        len(trashed),
        [m.title for m in mine],
        all_metrics,
        [c.number for c in shown.checkpoints if c.number is not None] if shown else [],
        notes,
    )


def _run_preview(ws: Workspace, task: str, req: PreviewRequest) -> tuple[PreviewResult, bytes]:
    """Run the preview into a temporary file (outside the workspace) and return its result and PNG bytes."""
    if not req.numbers:
        hint = f"e.g. ckpt report {task} --preview 3 7 10 --images DIR"
        raise UsageError("--preview needs checkpoint numbers", hint=hint)
    if not req.images:
        raise UsageError("--preview needs --images", hint="pass a PNG/JPEG file or a folder of them")
    from .preview import PreviewOptions, run_preview, task_sources  # torch: only now

    sources = task_sources(ws, task, req.numbers)
    with tempfile.TemporaryDirectory(prefix="ckpt-report-") as tmp:
        out = Path(tmp) / "preview.png"
        options = PreviewOptions(
            images=list(req.images),
            masks=req.masks,
            out=out,
            device=req.device,
            arch=req.arch,
            arch_kwargs=req.arch_kwargs,
        )
        res = run_preview(sources, options)
        return res, out.read_bytes()


# --- pieces of the page ---------------------------------------------------------------------------------------


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _isolate(page: str, names: Sequence[str]) -> str:
    """`page` with each name that holds a control or bidi character (U+202E turns the text after it around)
    wrapped in <bdi> wherever it shows as text, so that it cannot turn the text around it."""
    odd = sorted({_e(n) for n in names if not n.isprintable()}, key=len, reverse=True)
    if not odd:
        return page
    pattern = re.compile("|".join(map(re.escape, odd)))
    parts = re.split(r"(<title>.*?</title>|<[^>]*>)", page, flags=re.S)  # text at even places, tags at odd
    return "".join(p if i % 2 else pattern.sub(lambda m: f"<bdi>{m.group(0)}</bdi>", p) for i, p in enumerate(parts))


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _num(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _head(title: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head>"
    )


def _facts(ws: Workspace, header: Any, live: Sequence[Any], trashed: Sequence[Any], models: Sequence[Any]) -> str:
    rows = [
        ("status", header.status),
        ("checkpoints", f"{len(live)} ({_size(sum(p.size for p in live))})"),
        ("in the trash", f"{len(trashed)} ({_size(sum(p.size for p in trashed))})"),
        ("models", str(len(models))),
        ("created", header.created[:19].replace("T", " ")),
    ]
    if header.finished:
        rows.append(("finished", header.finished[:19].replace("T", " ")))
    if header.arch:
        rows.append(("network", header.arch))
    if header.source:
        rows.append(("imported from", header.source.get("path", "")))
    rows.append(("workspace", ws.location))
    return '<dl class="facts">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows) + "</dl>"


def _curves(picture: Any, data: PlotData) -> str:
    if picture is None:
        return '<section id="curves"><h2>Curves</h2><p>No checkpoint records a metric.</p></section>'
    b64 = base64.b64encode(picture.data).decode("ascii")
    alt = f"{', '.join(data.metrics)} over {data.x}, one marker per checkpoint"
    return (
        f'<section id="curves"><h2>Curves</h2><img class="curves" width="{round(picture.width / 1.2)}" '
        f'alt="{_e(alt)}" src="data:image/png;base64,{b64}"></section>'
    )


def _best(c: TaskCurves, data: PlotData, task: str, cmd: Callable[..., str]) -> str:
    from .plot import how_to_direct

    if not data.metrics:
        return ""
    rows = []
    for m in data.metrics:
        best, d = c.best.get(m), c.directions.get(m)
        if best is None:
            why = "no checkpoint records it" if d is not None else f"direction unknown: {how_to_direct(m)}"
            rows.append(f"<tr><td>{_e(m)}</td><td colspan=3>{_e(why)}</td></tr>")
            continue
        point = next((p for p in c.points if p.number == best.number), None)
        if point is not None and point.models:
            cell = _e("already model " + ", ".join(point.models))
        else:
            cell = f"<code>{_e(cmd('promote', *_words(task), str(best.number)))}</code>"
        rows.append(
            f"<tr><td>{_e(m)}</td><td>{_e(best.direction.explain())}</td><td class=n>#{best.number} "
            f"({_e(_num(best.value))})</td><td>{cell}</td></tr>"
        )
    return (
        '<section id="best"><h2>Best by metric</h2><table><thead><tr><th>metric</th><th>direction</th>'
        "<th>best</th><th>model</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table></section>"
    )


def _table(c: TaskCurves, metrics: list[str]) -> str:
    heads = [("#", "num", ""), ("step", "num", ""), ("epoch", "num", "")]
    for m in metrics:  # a metric sorts best first on the first click, where its direction is known
        d = c.directions.get(m)
        heads.append((m, "num", ' data-first="descending"' if d is not None and not d.minimize else ""))
    heads += [("size", "num", ""), ("created", "text", ""), ("state", "text", ""), ("models", "text", "")]
    heads.append(("marks", "text", ""))
    th = "".join(
        f'<th data-type="{kind}"{first} scope="col" tabindex="0" title="sort by {_e(name)}">{_e(name)}</th>'
        for name, kind, first in heads
    )
    best_of: dict[int, list[str]] = {}
    for m, best in c.best.items():
        if best is not None:
            best_of.setdefault(best.number, []).append(m)
    rows = []
    for p in c.points:
        marks = ["latest"] if p.number == c.latest else []
        if p.number in best_of:
            marks.append("best " + ", ".join(best_of[p.number]))
        cells = [str(p.number), _num(p.step), _num(p.epoch)]
        cells += [_metric_cell(p.metrics, m) for m in metrics]
        state = "live" if p.trashed is None else f"trash {p.trashed}"
        rows.append(
            f'<tr id="cp-{p.number}"{" class=t" if p.trashed else ""}><td>'
            + "</td><td>".join(cells)
            + f'</td><td data-v="{p.size}">{_size(p.size)}</td><td>{_e(p.created[:19].replace("T", " "))}</td>'
            f"<td>{_e(state)}</td><td>{_e(', '.join(p.models))}</td><td>{_e(', '.join(marks))}</td></tr>"
        )
    return (
        f'<section id="checkpoints"><h2>Checkpoints ({len(c.points)})</h2><p class="hint">Click a column to sort; '
        'rows in grey italics are in the trash.</p><div class="scroll"><table class="sortable"><thead><tr>'
        + th
        + "</tr></thead><tbody>"
        + "\n".join(rows)
        + "</tbody></table></div></section>"
    )


def _metric_cell(metrics: Any, m: str) -> str:
    if m not in metrics:
        return ""
    v = value(metrics, m)
    return _num(v) if v is not None else _e(str(metrics[m]))  # nan, inf: shown as they are, sorted last


def _models(models: Sequence[Any]) -> str:
    if not models:
        return '<section id="models"><h2>Models</h2><p>No model was made from this task yet.</p></section>'
    rows = "".join(
        f"<tr><td>{_e(m.title)}</td><td class=n>{m.checkpoint}</td><td>"
        + _e("  ".join(f"{k}={_num(v)}" for k, v in m.metrics.items()))
        + f'</td><td class=n data-v="{m.size}">{_size(m.size)}</td><td>{_e(m.storage)}</td>'
        f"<td>{_e(m.created[:19].replace('T', ' '))}</td></tr>"
        for m in models
    )
    return (
        '<section id="models"><h2>Models</h2><table><thead><tr><th>title</th><th>checkpoint</th><th>metrics</th>'
        "<th>size</th><th>storage</th><th>created</th></tr></thead><tbody>" + rows + "</tbody></table></section>"
    )


def _preview(res: PreviewResult, grid: bytes) -> str:
    b64 = base64.b64encode(grid).decode("ascii")
    rows = "".join(
        f"<tr><td>{_e(c.label)}</td><td class=n>{_num(c.miou)}</td><td class=n>{_num(c.dice)}</td>"
        f"<td>{_e(c.precision)}</td></tr>"
        for c in res.checkpoints
    )
    table = (
        "<table><thead><tr><th>checkpoint</th><th>mIoU</th><th>Dice</th><th>precision</th></tr></thead><tbody>"
        + rows
        + "</tbody></table>"
        if res.masks is not None
        else "<p>No masks given: predictions only, without IoU.</p>"
    )
    return (
        f'<section id="preview"><h2>Preview</h2><img class="preview" alt="predictions of checkpoints '
        f'{_e(", ".join(c.label for c in res.checkpoints))}" src="data:image/png;base64,{b64}">{table}</section>'
    )


def _commands(c: TaskCurves, task: str, models: Sequence[Any], cmd: Callable[..., str]) -> str:
    lines = []
    made = {m.checkpoint for m in models}
    for m, best in c.best.items():
        if best is not None and best.number not in made:
            # a newline in the name must not end the comment and put the rest on a line of its own
            name = m if m.isprintable() else repr(m)[1:-1]
            lines.append(f"# the best {name} (#{best.number})\n{cmd('promote', *_words(task), str(best.number))}")
            made.add(best.number)
    if c.latest is not None and c.latest not in made:
        lines.append(f"# the latest (#{c.latest})\n{cmd('promote', *_words(task), str(c.latest))}")
    entries: dict[str, list[int]] = {}
    for p in c.points:
        if p.trashed is not None:
            entries.setdefault(p.trashed, []).append(p.number)
    for entry, numbers in entries.items():
        what = f"#{numbers[0]}" if len(numbers) == 1 else f"{len(numbers)} checkpoints, {_ranges(numbers)}"
        lines.append(f"# back from the trash: {what}\n{cmd('trash', 'restore', entry)}")
    lines.append(f"# what trash-unused would do now\n{cmd('trash-unused', '--dry-run', *_words(task))}")
    return '<section id="commands"><h2>Commands</h2><pre>' + _e("\n".join(lines)) + "</pre></section>"


def _words(task: str) -> list[str]:
    """`task` as the words of a command line: after `--` where it looks like an option (`-rf`)."""
    return ["--", task] if task.startswith("-") else [task]


def _ranges(numbers: Sequence[int]) -> str:
    """`#1-3, 5-6, 9` for [1, 2, 3, 5, 6, 9] (sorted), with at most 6 runs shown."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:6])
    return "#" + text + (", …" if len(runs) > 6 else "")


_STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1280px;padding:0 1em;
color:#222}
h1{font-size:1.6em;margin:.2em 0}h2{font-size:1.2em;border-bottom:1px solid #ddd;margin-top:1.6em}
.facts{display:grid;grid-template-columns:max-content 1fr;gap:.1em 1em;margin:.5em 0}.facts dt{color:#666}
.facts dd{margin:0}
img.curves,img.preview{max-width:100%;height:auto}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:.15em .6em;border-bottom:1px solid #eee;text-align:left;white-space:nowrap}
td.n,table.sortable td{text-align:right}table.sortable td:nth-last-child(-n+4){text-align:left}
table.sortable td:nth-last-child(-n+2){white-space:normal;min-width:9em}
table.sortable th{cursor:pointer;user-select:none;position:sticky;top:0;background:#f7f7f7}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2"}
table.sortable th[aria-sort=descending]::after{content:" \\25BC"}
tr.t{color:#888;font-style:italic}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto}.scroll{overflow-x:auto}.notes{color:#8a5a00}.hint{color:#666;font-size:.9em}
footer{margin-top:2em;color:#888;font-size:.85em}
@media print{body{max-width:none;margin:0;font-size:10px}.scroll{overflow:visible}table.sortable th{position:static}
section{break-inside:avoid-page}#checkpoints{break-inside:auto}tr{break-inside:avoid}.hint{display:none}
pre{white-space:pre-wrap}}
"""

# sorts the checkpoint table by the clicked column: numbers by value (a cell's data-v, else its text), text
# as text; empty and non-numeric cells (a missing or NaN metric) always last, as ckpt sorts
_SCRIPT = """
(function(){
  "use strict";
  var table = document.querySelector("table.sortable");
  if (!table) { return; }
  var heads = table.tHead.rows[0].cells;
  function key(row, i, num) {
    var cell = row.cells[i];
    var raw = cell.hasAttribute("data-v") ? cell.getAttribute("data-v") : cell.textContent;
    if (!num) { return raw === "" ? null : raw; }
    var v = parseFloat(raw);
    return isFinite(v) ? v : null;
  }
  function sort(i) {
    var th = heads[i];
    var num = th.getAttribute("data-type") === "num";
    var now = th.getAttribute("aria-sort");
    var asc = now ? now !== "ascending" : th.getAttribute("data-first") !== "descending";
    var body = table.tBodies[0];
    var rows = Array.prototype.map.call(body.rows, function (r, n) { return [key(r, i, num), n, r]; });
    rows.sort(function (a, b) {
      if (a[0] === null || b[0] === null) {
        return a[0] === b[0] ? a[1] - b[1] : (a[0] === null ? 1 : -1);
      }
      var d = num ? a[0] - b[0] : (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0);
      return (asc ? d : -d) || a[1] - b[1];
    });
    // the rows go into a new tbody away from the page, which then replaces the old one in one step: moving
    // 10,000 rows one by one out of a tbody (live or not) takes seconds a click in Chromium, so the old tbody
    // is taken off the page and emptied at once first
    var spot = document.createComment("");
    table.replaceChild(spot, body);
    body.textContent = "";
    var fresh = body.cloneNode(false);
    rows.forEach(function (r) { fresh.appendChild(r[2]); });
    table.replaceChild(fresh, spot);
    Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
  }
  Array.prototype.forEach.call(heads, function (th, i) {
    th.addEventListener("click", function () { sort(i); });
    th.addEventListener("keydown", function (e) { if (e.key === "Enter") { sort(i); } });
  });
})();
"""
