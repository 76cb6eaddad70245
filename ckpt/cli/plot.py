"""Commands to look at tasks: plot (metric curves) and report (one self-contained HTML page).

matplotlib (the `plot` extra) is imported only inside these commands, through ckpt.plot.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import UsageError
from ._app import app
from ._common import JsonOpt, again, command, err, open_workspace, out, plural, print_json
from ._complete import tasks as complete_tasks
from ._table import printable

if TYPE_CHECKING:
    from ..plot import PlotData, Rendered

OutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="The file to write (replaced if it exists; default: a new file here)."),
]


@command(app, "plot")
def plot(
    tasks: Annotated[
        list[str], typer.Argument(help="The task(s); several are drawn together.", autocompletion=complete_tasks)
    ],
    metric: Annotated[
        list[str] | None,
        typer.Option("--metric", "-m", metavar="METRIC", help="A metric to draw (repeatable; default: all, up to 8)."),
    ] = None,
    x: Annotated[
        str | None, typer.Option("--x", metavar="step|epoch|number", help="The x axis (default: step, else epoch).")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write this .png or .svg (replaced if it exists; default: as said above)."),
    ] = None,
    overlay: Annotated[bool, typer.Option("--overlay", help="Every metric in one panel.")] = False,
    with_plan: Annotated[
        bool, typer.Option("--with-plan", help="Mark what `ckpt trash-unused` would keep and trash now.")
    ] = False,
    keep_last: Annotated[
        int,
        typer.Option(
            "--keep-last", min=0, metavar="N", help="For the plan: keep the last N too (implies --with-plan)."
        ),
    ] = 0,
    keep_best: Annotated[
        int,
        typer.Option(
            "--keep-best", min=0, metavar="N", help="For the plan: also keep the best N by the one --metric given."
        ),
    ] = 0,
    json: JsonOpt = False,
) -> None:
    """Draw the tasks' metrics over steps, each checkpoint a marker: models (labelled), the latest, the best
    by each metric, the trash (hollow). Without --out: shown in a terminal that shows pictures (kitty, iTerm2,
    sixel), else written to a new plot-TASK.png here (plot-TASK-2.png if taken); never overwrites.

    Example: ckpt plot unet --metric val_loss --with-plan

    Example: ckpt plot unet-a unet-b --metric val_loss --out compare.svg
    """
    from ..plot import FORMATS, collect, default_name, image_protocol, render, write_file, write_new
    from ..trash import KeepRules

    fmt = "png"
    _local_out(output, "e.g. --out plot.png, then copy it")
    if output is not None:
        if output.suffix.lower() not in FORMATS:
            raise UsageError(f"--out must end in .png or .svg, not '{output.name}'", hint="e.g. --out plot.svg")
        fmt = output.suffix.lower()[1:]
    rules = None  # --with-plan alone: the task's retention policy decides, as trash-unused without flags
    if keep_last or keep_best:
        if keep_best and len(metric or []) != 1:
            hint = "e.g. --keep-best 3 --metric val_loss"
            raise UsageError("--keep-best N ranks by the --metric given: give exactly one", hint=hint)
        by = metric[0] if keep_best and metric else None
        rules = KeepRules(keep_last=keep_last, keep_best=keep_best, metric=by)
    ws = open_workspace()
    data = collect(ws, tasks, metric or [], x, plan=rules, with_plan=with_plan or rules is not None)
    for note in data.notes:
        err(f"note: {printable(note)}")
    protocol = image_protocol(os.environ) if output is None and not json and _stdout_tty() else None
    picture = render(data, fmt, overlay=overlay)
    written: Path | None = None
    if output is not None:
        write_file(output, picture.data)
        written = output
    elif protocol is None:
        written = write_new(Path("."), default_name(tasks), picture.data)
    else:
        _show_inline(picture, protocol)
    if json:
        print_json(plot_json(data, picture, written))
        return
    if written is not None:
        what = f"{picture.width}×{picture.height}, {plural(len(data.metrics), 'metric')} over {data.x}"
        out(f"wrote {printable(str(written))} ({what})")


def _local_out(output: Path | None, hint: str) -> None:
    """--out is a file here: a URL (s3://bucket/x.png, which a Path shows as `s3:/bucket/x.png`) is refused."""
    text = str(output) if output is not None else ""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", text):  # a scheme of two letters or more: not a drive (C:/)
        url = re.sub(r":/+", "://", text, count=1)
        raise UsageError(f"--out takes a local file, not a URL ('{printable(url)}')", hint=hint)


def _stdout_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _show_inline(picture: Rendered, protocol: str) -> None:
    from ..plot import inline_image, sixel

    text = sixel(picture.data) if protocol == "sixel" else inline_image(picture.data, protocol)
    sys.stdout.write(text)
    sys.stdout.flush()


def plot_json(data: PlotData, picture: Rendered, written: Path | None) -> dict[str, Any]:
    """`ckpt plot --json` (docs/json.md)."""
    tasks = []
    for c in data.tasks:
        best = {
            m: None if b is None else {"number": b.number, "value": b.value, **b.direction.to_json()}
            for m, b in c.best.items()
        }
        row: dict[str, Any] = {
            "task": c.task,
            "status": c.status,
            "checkpoints": len(c.live),
            "trashed": [p.number for p in c.points if p.trashed is not None],
            "latest": c.latest,
            "best": best,
            "models": {title: p.number for p in c.points for title in p.models},
        }
        if data.plan:
            row["would_trash"] = [p.number for p in c.points if p.plan == "trash"]
        tasks.append(row)
    return {
        "output": str(written) if written is not None else None,
        "format": picture.format,
        "width": picture.width,
        "height": picture.height,
        "x": data.x,
        "metrics": data.metrics,
        "marks": picture.marks,
        "tasks": tasks,
        "notes": data.notes,
    }


@command(app, "report")
def report(
    task: Annotated[str, typer.Argument(help="The task.", autocompletion=complete_tasks)],
    numbers: Annotated[
        list[int] | None, typer.Argument(help="With --preview: the checkpoints to preview.", show_default=False)
    ] = None,
    output: OutOpt = None,
    preview: Annotated[
        bool, typer.Option("--preview", help="Run checkpoints NUMBERS on --images into the page (needs torch).")
    ] = False,
    images: Annotated[
        list[Path] | None, typer.Option("--images", "-i", help="With --preview: PNG/JPEG file or folder (repeatable).")
    ] = None,
    masks: Annotated[
        Path | None, typer.Option("--masks", help="With --preview: ground-truth masks named like the images.")
    ] = None,
    arch: Annotated[
        str | None,
        typer.Option("--arch", help="With --preview: network factory 'package.module:factory' (default: the task's)."),
    ] = None,
    arch_kwargs: Annotated[
        str | None, typer.Option("--arch-kwargs", help="With --preview: the factory's keyword arguments (JSON).")
    ] = None,
    json: JsonOpt = False,
) -> None:
    """Write one self-contained HTML page about a task: curves, every checkpoint (sortable), models, trash,
    and the commands to promote or restore; it fetches nothing, so it opens from a CI artifact and prints.
    Default file: a new report-TASK.html here (report-TASK-2.html if taken).

    Example: ckpt report unet --out unet.html

    Example: ckpt report unet --preview 3 7 10 --images imgs/ --masks masks/
    """
    from ..plot import default_name, write_file, write_new
    from ..report import PreviewRequest, build

    _local_out(output, "e.g. --out report.html, then copy it")
    if output is not None and output.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--out must end in .html, not '{output.name}'", hint="e.g. --out report.html")
    if numbers and not preview:
        example = f"e.g. ckpt report {task} --preview 3 7 --images DIR"
        raise UsageError("checkpoint numbers go with --preview", hint=example)
    if (images or masks or arch or arch_kwargs) and not preview:
        example = f"e.g. ckpt report {task} --preview 3 7 --images DIR"
        raise UsageError("--images, --masks, --arch and --arch-kwargs go with --preview", hint=example)
    request = None
    if preview:
        from .preview import arch_kwargs_of

        kwargs = arch_kwargs_of(arch_kwargs)
        request = PreviewRequest(list(numbers or []), list(images or []), masks, arch=arch, arch_kwargs=kwargs)
    ws = open_workspace()
    page = build(ws, task, preview=request, command=again)
    for note in page.notes:
        err(f"note: {printable(note)}")
    data = page.html.encode("utf-8")
    if output is not None:
        write_file(output, data)
        written = output
    else:
        written = write_new(Path("."), default_name([task], ".html", "report"), data)
    if json:
        print_json(
            {
                "output": str(written),
                "task": page.task,
                "checkpoints": page.checkpoints,
                "trashed": page.trashed,
                "models": page.models,
                "metrics": page.metrics,
                "preview": page.preview,
                "bytes": len(data),
            }
        )
        return
    what = f"{plural(page.checkpoints, 'checkpoint')}, {page.trashed} in the trash, {plural(len(page.models), 'model')}"
    out(f"wrote {printable(str(written))} ({what})")


def spark_lines(t: Any, cps: list[Any], width: int = 24, most: int = 8) -> list[str]:
    """`ckpt list`'s sparklines: per metric (at most `most`), its values over the checkpoints in number order,
    first → last value, and the best where the metric's direction is known. Cheap: one pass per metric."""
    from ..metrics import rank, value
    from ..plot import sparkline
    from ._table import cut, fmt_metric, terminal_width

    names: dict[str, None] = {}
    for cp in cps:
        for k in cp.metrics:
            names.setdefault(k, None)
    shown = list(names)[:most]
    labels = {m: printable(m) for m in shown}  # a name with a newline or an escape sequence: escaped, as in the table
    pad = max((len(label) for label in labels.values()), default=0)
    lines = []
    for m in shown:
        values = [value(cp.metrics, m) for cp in cps]
        line = sparkline(values, width)
        if not line:
            continue
        present = [v for v in values if v is not None]
        first_last = f"{fmt_metric(present[0])} → {fmt_metric(present[-1])}"
        text = f"{labels[m]:<{pad}}  {line:<{min(width, len(values))}}  {first_last}"
        try:
            better = t.direction(m)
        except UsageError:
            better = None
        if better is not None:
            ranked, _ = rank(cps, m, better.minimize, metrics_of=lambda cp: cp.metrics, tie=lambda cp: cp.number)
            best = ranked[0]
            text += f"  (best #{best.number}: {fmt_metric(best.metrics[m])}, {better.extreme})"
        lines.append(text)
    if len(names) > most:
        words = ["--", t.name] if t.name.startswith("-") else [t.name]  # a name like an option after --
        lines.append(f"+{len(names) - most} metrics: {again('plot', *words)} draws them")
    limit = terminal_width(sys.stdout)  # a line never wraps: cut to the terminal, as the table is
    return lines if limit is None else [cut(line, limit) for line in lines]
