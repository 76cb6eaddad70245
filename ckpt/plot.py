"""Metric curves of tasks: the data (`collect`), the picture (`render`, with matplotlib), and a sparkline.

matplotlib is imported only inside `render` (the `plot` extra): `import ckpt` and every other command stay
free of it. A checkpoint is a marker on its metric's curve; the marks say what a person decides with:
models (labelled by title), the latest, the best by each metric (its direction by ckpt.metrics; none where
the direction is unknown), checkpoints in the trash (hollow), and, when asked, what `trash-unused` would
keep or trash now. Each kind of mark is one artist whose SVG group id is `mark_id(kind, task, metric)`,
so that a test (or a script) can count them.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from math import isfinite, nan
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CkptError, ConflictError, UsageError, WriteError
from .metrics import Direction, rank, toml_key, value

if TYPE_CHECKING:
    from .trash import KeepRules
    from .workspace_base import Workspace

X_KINDS = ("step", "epoch", "number")
FORMATS = (".png", ".svg")
MAX_PANELS = 8  # without --metric: at most this many metrics, one panel each (a note says which were left out)
# the kinds of mark, in drawing order (later ones on top); the SVG group of each is `mark_id(kind, ...)`
MARKS = ("checkpoint", "trash", "plan-keep", "plan-trash", "latest", "best", "model")
SPARKS = "▁▂▃▄▅▆▇█"


@dataclass(slots=True)
class Point:
    """One checkpoint on the curves: live or in the trash (`trashed`: the entry id)."""

    number: int
    step: int | None
    epoch: int | None
    metrics: Mapping[str, float]
    size: int = 0
    created: str = ""
    trashed: str | None = None
    models: list[str] = field(default_factory=list)
    plan: str | None = None  # "keep" or "trash": what trash-unused would do now (with --with-plan)
    reason: str = ""  # ... and why

    def x(self, kind: str) -> float | None:
        return self.number if kind == "number" else self.step if kind == "step" else self.epoch


@dataclass(slots=True)
class Best:
    """The best live checkpoint of a task by one metric, and the direction that made it best."""

    metric: str
    number: int
    value: float
    direction: Direction


@dataclass(slots=True)
class TaskCurves:
    """One task's points (live and trashed, by number) and its marks."""

    task: str
    status: str
    points: list[Point]
    latest: int | None
    best: dict[str, Best | None]  # metric -> the best live checkpoint; None: direction unknown or no value
    directions: dict[str, Direction | None]  # metric -> its direction, None when nothing says

    @property
    def live(self) -> list[Point]:
        return [p for p in self.points if p.trashed is None]


@dataclass(slots=True)
class PlotData:
    """What `collect` gathered: the tasks, the metrics to draw (one panel each), the x axis, and notes for
    the user (metrics left out, a direction unknown, checkpoints without an x value)."""

    tasks: list[TaskCurves]
    metrics: list[str]
    x: str
    notes: list[str] = field(default_factory=list)
    plan: bool = False


@dataclass(slots=True)
class Rendered:
    """A rendered figure: its bytes, format, size in pixels, and how many marks of each kind it holds."""

    data: bytes
    format: str  # "png" or "svg"
    width: int
    height: int
    marks: dict[str, int]


def collect(
    ws: Workspace,
    tasks: Sequence[str],
    metrics: Sequence[str] = (),
    x: str | None = None,
    *,
    plan: KeepRules | None = None,
    with_plan: bool = False,
    max_panels: int = MAX_PANELS,
) -> PlotData:
    """The curves of `tasks` in `ws`: every checkpoint (the trash's too) with its metrics and marks.

    `metrics` chooses the panels (default: every metric the tasks record, at most `max_panels`); `x` is
    "step", "epoch" or "number" (default: step where every checkpoint has one, else epoch, else number).
    `with_plan` adds what `trash-unused` would decide now: by the keep rules `plan` when given, else by the
    task's retention policy, as `trash-unused` without flags. Raises TaskNotFound, UsageError (an
    unknown metric or x), IntegrityError (a model or trash entry that cannot be read while planning).
    """
    from .policy import apply
    from .trash import list_entries

    if not tasks:
        raise UsageError("no task to plot", hint="e.g. ckpt plot unet")
    if x is not None and x not in X_KINDS:
        raise UsageError(f"unknown x axis '{x}'", hint=f"use one of: {', '.join(X_KINDS)}")
    notes: list[str] = []
    entries, errors = list_entries(ws)
    for e in errors:
        notes.append(f"a trash entry could not be read, so its checkpoints are not shown: {e}")
    curves: list[TaskCurves] = []
    for name in dict.fromkeys(tasks):  # a task named twice is drawn once
        t = ws.task(name)
        cps = t.checkpoints
        models = ws.models_of(name)
        points = {
            cp.number: Point(
                cp.number, cp.step, cp.epoch, cp.metrics, cp.size, cp.created, None, models.get(cp.number, [])
            )
            for cp in cps
        }
        for entry in entries:
            if entry.kind != "checkpoints" or entry.task != name:
                continue
            for cp in entry.checkpoints:
                if cp.number not in points:  # an entry still being made may name a live checkpoint
                    points[cp.number] = Point(
                        cp.number, cp.step, cp.epoch, cp.metrics, cp.size, cp.created, entry.id, []
                    )
        if with_plan or plan is not None:
            decided = apply(ws, name, plan, dry_run=True)[0].plan
            for decision in decided.decisions:
                if decision.number in points:
                    points[decision.number].plan = decision.action
                    points[decision.number].reason = decision.reason
            notes.extend(f"{name}: {w}" for w in decided.warnings)
        ordered = [points[n] for n in sorted(points)]
        curves.append(TaskCurves(name, t.status, ordered, cps[-1].number if cps else None, {}, {}))
    known = sorted({k for c in curves for p in c.points for k in p.metrics})
    if metrics:
        chosen = list(dict.fromkeys(metrics))
        for m in chosen:
            if m not in known:
                hint = f"known metrics: {', '.join(known)}" if known else "these tasks record no metrics"
                raise UsageError(f"no checkpoint of {_names(tasks)} records metric '{m}'", hint=hint)
    else:
        chosen = known[:max_panels]
        if len(known) > max_panels:
            left = ", ".join(known[max_panels:])
            notes.append(f"showing {max_panels} of {len(known)} metrics (left out: {left}); choose with --metric")
    for c in curves:
        t = ws.task(c.task)
        for m in chosen:
            try:
                d: Direction | None = t.direction(m)
            except UsageError as e:
                d = None
                if any(value(p.metrics, m) is not None for p in c.points):
                    # these commands take no --min/--max (one flag for many metrics would say little): the
                    # way to say it is the workspace's ckpt.toml, once
                    notes.append(f"no best marked for '{m}' of task '{c.task}': {e.message}; {how_to_direct(m)}")
            c.directions[m] = d
            c.best[m] = None
            if d is not None:
                ranked, _ = rank(c.live, m, d.minimize, metrics_of=lambda p: p.metrics, tie=lambda p: p.number)
                if ranked:
                    best = ranked[0]
                    c.best[m] = Best(m, best.number, float(best.metrics[m]), d)
    kind = x or _auto_x(curves)
    for c in curves:
        notes.extend(f"task '{c.task}' {r}" for r in restarts(c.points, kind))
    for c in curves:
        for m in chosen:
            huge = [p.number for p in c.points if (v := value(p.metrics, m)) is not None and abs(v) > DRAWN_LIMIT]
            if huge:
                shown = ", ".join(f"#{n}" for n in huge[:10]) + (", …" if len(huge) > 10 else "")
                notes.append(f"task '{c.task}': {m} beyond ±1e300 is not drawn: {shown}")
    if with_plan or plan is not None:
        for c in curves:
            for m in chosen:
                unseen = [
                    p.number
                    for p in c.points
                    if p.plan == "trash" and (value(p.metrics, m) is None or p.x(kind) is None)
                ]
                if unseen:
                    shown = ", ".join(f"#{n}" for n in unseen[:10]) + (", …" if len(unseen) > 10 else "")
                    notes.append(
                        f"task '{c.task}': {len(unseen)} checkpoint(s) that trash-unused would trash have no {m} "
                        f"(or no {kind}), so the '{m}' panel cannot show them: {shown}"
                    )
    missing = sum(1 for c in curves for p in c.points if p.x(kind) is None)
    if missing:
        notes.append(f"{missing} checkpoint(s) record no {kind}, so they are not drawn; try --x number")
    return PlotData(curves, chosen, kind, notes, with_plan or plan is not None)


def how_to_direct(metric: str) -> str:
    """How to tell ckpt which way `metric` is better, for commands without --min/--max."""
    return f'set it once in the workspace\'s ckpt.toml: [metrics] {toml_key(metric)} = "min" (or "max")'


def restarts(points: Sequence[Point], kind: str) -> list[str]:
    """Where x (`kind`) goes back from one checkpoint to the next in number order (a run restarted from an
    earlier checkpoint): "restarted at checkpoint N: step went from A back to B", one per place."""
    found = []
    last: float | None = None
    for p in points:
        px = p.x(kind)
        if px is None:
            continue
        if last is not None and px < last:
            found.append(f"restarted at checkpoint {p.number}: {kind} went from {last} back to {px}")
        last = px
    return found


def _names(tasks: Sequence[str]) -> str:
    return f"task '{tasks[0]}'" if len(tasks) == 1 else "tasks " + ", ".join(f"'{t}'" for t in tasks)


def _auto_x(curves: Sequence[TaskCurves]) -> str:
    points = [p for c in curves for p in c.points]
    if points and all(p.step is not None for p in points):
        return "step"
    if points and all(p.epoch is not None for p in points):
        return "epoch"
    return "number"


def mark_id(kind: str, task: str, metric: str, suffix: str = "") -> str:
    """The SVG group id of the marks of `kind` of `task` in `metric`'s panel (characters outside
    [A-Za-z0-9_.] become `_`), and `suffix` (see `mark_suffixes`)."""
    return "mark-" + "-".join(re.sub(r"[^A-Za-z0-9_.]", "_", s) for s in (kind, task, metric)) + suffix


def mark_suffixes(pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """(task, metric) -> the suffix that makes its ids unique in one picture: "" for the first pair to give an
    id, "-2", "-3"… for the next ones that would give it again (`val loss`, `val_loss` and `val/loss` give
    one id)."""
    used: set[str] = set()
    out: dict[tuple[str, str], str] = {}
    for task, metric in dict.fromkeys(pairs):
        base = mark_id("", task, metric)
        suffix, n = "", 1
        while base + suffix in used:
            n += 1
            suffix = f"-{n}"
        used.add(base + suffix)
        out[task, metric] = suffix
    return out


# --- the picture ----------------------------------------------------------------------------------------------

_STYLES: tuple[Any, ...] = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2)), (0, (3, 1, 3, 3)))
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


def render(data: PlotData, fmt: str = "png", *, overlay: bool = False, dpi: int = 100) -> Rendered:
    """Draw `data` with matplotlib (Agg): one panel per metric (or one for all, `overlay`), a colour per task.

    `fmt` is "png" or "svg". Raises UsageError when there is nothing to draw.
    """
    if fmt not in ("png", "svg"):
        raise UsageError(f"cannot write a .{fmt} picture", hint="use .png or .svg")
    if not data.metrics:
        names = ", ".join(c.task for c in data.tasks)
        hint = "metrics come from Task.save(metrics=...) or import"
        raise UsageError(f"nothing to plot: {names} record(s) no metrics", hint=hint)
    import logging

    # matplotlib's log quiet below errors while it is imported and draws (a config folder it cannot write, a
    # bad line in a matplotlibrc, the font cache being built)
    log = logging.getLogger("matplotlib")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        matplotlib = _matplotlib()
        # matplotlib's own defaults, whatever the user's matplotlibrc says (text.usetex, savefig.dpi/bbox, a
        # style): the picture is the same everywhere and its size is the one reported; its warnings (a glyph
        # missing from the font) are not the user's business
        with matplotlib.rc_context(), warnings.catch_warnings():
            matplotlib.rcdefaults()
            warnings.simplefilter("ignore", UserWarning)
            return _render(data, fmt, overlay, dpi)
    finally:
        log.setLevel(level)


def _matplotlib() -> Any:
    """matplotlib, imported with the Agg backend whatever MPLBACKEND says."""
    if "matplotlib" not in sys.modules:
        # read once, when matplotlib is imported: a bogus value would fail the import
        saved = os.environ.get("MPLBACKEND")
        os.environ["MPLBACKEND"] = "Agg"
        try:
            import matplotlib
        except ImportError:
            raise CkptError(
                "drawing curves needs matplotlib, which is not installed", hint="pip install 'ckpt[plot]'"
            ) from None
        finally:
            if saved is None:
                os.environ.pop("MPLBACKEND", None)
            else:
                os.environ["MPLBACKEND"] = saved
    import matplotlib

    matplotlib.use("Agg")
    return matplotlib


def _render(data: PlotData, fmt: str, overlay: bool, dpi: int) -> Rendered:
    from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend
    from matplotlib.lines import Line2D

    panels = [list(data.metrics)] if overlay else [[m] for m in data.metrics]
    height = 1.3 + 2.4 * len(panels)  # inches: the title above, the x label and the legend below
    fig = Figure(figsize=(8.0, height), dpi=dpi)
    # fixed margins rather than a layout engine: constrained layout draws the figure once more to measure it
    # (a third of the time of a plot of 10,000 checkpoints)
    fig.subplots_adjust(left=0.11, right=0.98, top=1 - 0.45 / height, bottom=0.85 / height, hspace=0.12)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    marks = dict.fromkeys(MARKS, 0)
    several = len(data.tasks) > 1
    suffixes = mark_suffixes([(c.task, m) for c in data.tasks for m in data.metrics])
    for ax, metrics in zip(axes, panels, strict=True):
        labels: list[tuple[float, float, str]] = []
        for ti, c in enumerate(data.tasks):
            for mi, m in enumerate(metrics):
                colour = _COLOURS[(ti if several or not overlay else mi) % len(_COLOURS)]
                label = _plain(" ".join(x for x in (c.task if several else "", m if overlay else "") if x)) or None
                # several tasks in one panel: a colour per task, a line style per metric (else the legend's
                # entries of one task's metrics would look the same)
                style = _STYLES[mi % len(_STYLES)] if several and overlay else "-"
                _draw(ax, c, m, data.x, colour, label, marks, labels, style, suffixes[c.task, m])
        low, high = ax.get_xlim()
        for x, y, text in labels:  # a label near the right edge goes to the left of its marker, inside the panel
            left = (high - x) / ((high - low) or 1) < 0.25
            ax.annotate(
                _plain(text),
                (x, y),
                xytext=(-4 if left else 4, 6),
                textcoords="offset points",
                ha="right" if left else "left",
                fontsize="small",
            )
        ax.set_ylabel(_plain(metrics[0]) if len(metrics) == 1 else "value")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))  # short tick labels fit the fixed margin
        ax.grid(True, alpha=0.3)
        if several or overlay:
            ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel(data.x)
    fig.legend(handles=_legend(Line2D, data.plan), loc="lower center", ncols=7, fontsize="small", frameon=False)
    title = ", ".join(c.task for c in data.tasks)
    fig.suptitle(_plain(title if len(title) <= 80 else title[:79] + "…"), fontsize="medium")
    import io

    buf = io.BytesIO()
    # no date in the metadata: the same data gives the same file
    meta: dict[str, Any] = {"Date": None} if fmt == "svg" else {}
    fig.savefig(buf, format=fmt, metadata=meta)
    width, height = (round(v) for v in fig.get_size_inches() * dpi)
    return Rendered(buf.getvalue(), fmt, int(width), int(height), marks)


DRAWN_LIMIT = 1e300  # |value| beyond which a point is not drawn: the axis between two such values overflows


def _plain(text: str) -> str:
    """`text` shown as it is: a `$` would start matplotlib's math mode (a name from a record may hold one), and
    a character that is not printable (a control character, a direction mark) is drawn as its escape: an SVG
    holding it raw would not even parse."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return text.replace("$", r"\$")


def _draw(
    ax: Any,
    c: TaskCurves,
    m: str,
    xk: str,
    colour: str,
    label: str | None,
    marks: dict[str, int],
    labels: list[Any],
    style: Any = "-",
    suffix: str = "",
) -> None:
    """One task's curve of metric `m` and its marks on `ax`; the models' labels are added to `labels`."""
    pts: list[tuple[Point, float, float]] = []
    for p in c.points:
        py = p.metrics.get(m)
        # a finite float is its own value; anything else (missing, NaN, an int, a bool) as ckpt.metrics says
        if type(py) is not float or not isfinite(py):
            py = value(p.metrics, m)
        if py is not None and abs(py) > DRAWN_LIMIT:
            py = None  # beyond what an axis can span (matplotlib cannot place ticks): left out, with a note
        px = p.x(xk)
        if px is not None and py is not None:
            pts.append((p, px, py))
    if not pts:
        return
    # in checkpoint-number order, as they were saved; where x goes back (a run restarted from an earlier
    # checkpoint) the line breaks and a new one starts: no sawtooth between two runs that never happened
    xs: list[float] = []
    ys: list[float] = []
    for i, (_, px, py) in enumerate(pts):
        if i and px < pts[i - 1][1]:
            xs.append(nan)
            ys.append(nan)
        xs.append(px)
        ys.append(py)

    def plot(kind: str, sel: list[tuple[Point, float, float]], **style: Any) -> None:
        if not sel:
            return
        (line,) = ax.plot([s[1] for s in sel], [s[2] for s in sel], linestyle="none", **style)
        line.set_gid(mark_id(kind, c.task, m, suffix))
        marks[kind] += len(sel)

    (curve,) = ax.plot(xs, ys, linestyle=style, color=colour, linewidth=1.0, label=label)
    curve.set_gid(mark_id("curve", c.task, m, suffix))
    small = 3 if len(pts) <= 500 else 1.5
    plot("checkpoint", [t for t in pts if t[0].trashed is None], marker="o", markersize=small, color=colour)
    plot(
        "trash",
        [t for t in pts if t[0].trashed is not None],
        marker="o",
        markersize=small + 2,
        markerfacecolor="white",
        markeredgecolor=colour,
        markeredgewidth=0.8,
    )
    plot(
        "plan-keep",
        [t for t in pts if t[0].plan == "keep"],
        marker="o",
        markersize=8,
        markerfacecolor="none",
        markeredgecolor="#2ca02c",
        markeredgewidth=1.2,
    )
    plot("plan-trash", [t for t in pts if t[0].plan == "trash"], marker="x", markersize=6, color="#d62728")
    plot(
        "latest",
        [t for t in pts if t[0].number == c.latest],
        marker="s",
        markersize=8,
        markerfacecolor="none",
        markeredgecolor="black",
        markeredgewidth=1.2,
    )
    best = c.best.get(m)
    plot(
        "best",
        [t for t in pts if best is not None and t[0].number == best.number],
        marker="*",
        markersize=13,
        color="#ffbf00",
        markeredgecolor="black",
        markeredgewidth=0.6,
    )
    modelled = [t for t in pts if t[0].models and t[0].trashed is None]
    plot("model", modelled, marker="D", markersize=7, color=colour, markeredgecolor="black")
    labels.extend((x, y, ", ".join(p.models)) for p, x, y in modelled)


def _legend(Line2D: Any, plan: bool) -> list[Any]:
    """The legend of the kinds of mark (a grey sample of each)."""

    def proxy(label: str, **style: Any) -> Any:
        return Line2D([], [], linestyle="none", label=label, **style)

    handles = [
        proxy("checkpoint", marker="o", markersize=4, color="grey"),
        proxy("in trash", marker="o", markersize=5, markerfacecolor="white", markeredgecolor="grey"),
        proxy("latest", marker="s", markersize=7, markerfacecolor="none", markeredgecolor="black"),
        proxy("best", marker="*", markersize=11, color="#ffbf00", markeredgecolor="black", markeredgewidth=0.6),
        proxy("model", marker="D", markersize=6, color="grey", markeredgecolor="black"),
    ]
    if plan:
        handles += [
            proxy("would keep", marker="o", markersize=7, markerfacecolor="none", markeredgecolor="#2ca02c"),
            proxy("would trash", marker="x", markersize=6, color="#d62728"),
        ]
    return handles


# --- where the picture goes -----------------------------------------------------------------------------------


def default_name(tasks: Sequence[str], suffix: str = ".png", prefix: str = "plot") -> str:
    """`plot-TASK.png` (`plot-A-B.png` for several tasks), a name safe in any folder."""
    joined = "-".join(tasks)
    stem = re.sub(r"[^A-Za-z0-9_.=+-]", "_", joined)[:80].strip(".") or "task"
    return f"{prefix}-{stem}{suffix}"


def write_new(folder: Path, name: str, data: bytes) -> Path:
    """Write `data` to `folder/name`, or to `stem-2.ext`, `stem-3.ext`… when taken: never overwrites a file
    (each name is claimed with O_EXCL, so two commands at once get two files). Returns the path written."""
    from .fsutil import make_file_new

    base = folder / name
    for n in range(1, 10_000):
        path = base if n == 1 else base.with_name(f"{base.stem}-{n}{base.suffix}")
        try:
            make_file_new(path, data)
        except ConflictError:
            continue
        except OSError as e:
            if path.exists():  # begun, then refused (a full disk): not left half written
                path.unlink(missing_ok=True)
            raise _write_error(path, e, "pass --out to write it elsewhere") from None
        return path
    raise ConflictError(f"too many files named like '{base}'", path=base, hint="pass --out")


def _write_error(path: Path, e: OSError, hint: str) -> WriteError:
    """The output file `path` and the system's reason it could not be written (not ckpt's workspace)."""
    return WriteError(f"cannot write '{path}': {e.strerror or e}", errno=e.errno, path=path, hint=hint)


def write_file(path: Path, data: bytes) -> None:
    """Replace `path` with `data` (the user named it with --out): temp file, fsync, rename."""
    from .fsutil import atomic_write

    if path.is_dir():
        raise ConflictError(f"'{path}' is a folder", path=path, hint="pass a file name, e.g. --out plot.png")
    if not path.parent.is_dir():
        raise UsageError(f"folder '{path.parent}' does not exist", hint="create it first or choose another --out")
    try:
        atomic_write(path, data)
    except CkptError:
        raise
    except OSError as e:
        raise _write_error(path, e, "choose another --out") from None


# --- pictures in the terminal ---------------------------------------------------------------------------------


def image_protocol(env: Mapping[str, str]) -> str | None:
    """The inline-image protocol the terminal described by `env` shows: "kitty", "iterm2", "sixel", or None.

    From the environment only (no query to the terminal): kitty sets TERM=xterm-kitty and KITTY_WINDOW_ID;
    iTerm2 and WezTerm set TERM_PROGRAM (both show iTerm2's images); a TERM naming sixel (or foot, mlterm)
    shows sixel. Inside tmux or screen none is assumed (they need a passthrough). CKPT_IMAGES=kitty|iterm2|
    sixel|none overrides the guess.
    """
    chosen = env.get("CKPT_IMAGES", "").strip().lower()
    if chosen in ("kitty", "iterm2", "sixel"):
        return chosen
    if chosen in ("none", "no", "off", "0"):
        return None
    term = env.get("TERM", "")
    if env.get("TMUX") or term.startswith(("screen", "tmux")):
        return None
    if term == "xterm-kitty" or env.get("KITTY_WINDOW_ID"):
        return "kitty"
    if env.get("TERM_PROGRAM") in ("iTerm.app", "WezTerm") or env.get("LC_TERMINAL") == "iTerm2":
        return "iterm2"
    if "sixel" in term or term.startswith(("foot", "mlterm")):
        return "sixel"
    return None


def inline_image(png: bytes, protocol: str) -> str:
    """The escape sequence that shows PNG `png` in a terminal speaking `protocol` (kitty or iterm2), then a
    newline; sixel is made by `sixel`."""
    import base64

    b64 = base64.standard_b64encode(png).decode("ascii")
    if protocol == "iterm2":
        return f"\x1b]1337;File=inline=1;size={len(png)};preserveAspectRatio=1:{b64}\x07\n"
    if protocol == "kitty":  # chunks of at most 4096 base64 bytes; m=1 on every chunk but the last
        chunks = [b64[i : i + 4096] for i in range(0, len(b64), 4096)] or [""]
        parts = []
        for i, chunk in enumerate(chunks):
            more = 1 if i < len(chunks) - 1 else 0
            head = f"a=T,f=100,m={more}" if i == 0 else f"m={more}"
            parts.append(f"\x1b_G{head};{chunk}\x1b\\")
        return "".join(parts) + "\n"
    raise UsageError(f"unknown image protocol '{protocol}'")


def sixel(png: bytes) -> str:
    """The PNG as a sixel image (216 colours: a 6×6×6 cube), then a newline."""
    import io

    import numpy as np
    from matplotlib.image import imread

    rgba = imread(io.BytesIO(png), format="png")
    rgb = np.asarray(rgba[..., :3] * 5 + 0.5, dtype=np.int32)  # each channel 0-5
    idx = rgb[..., 0] * 36 + rgb[..., 1] * 6 + rgb[..., 2]
    h, w = idx.shape
    out = [f'\x1bP0;1;0q"1;1;{w};{h}']
    used = np.unique(idx)
    for c in used:
        r, g, b = (c // 36) * 20, (c // 6 % 6) * 20, (c % 6) * 20
        out.append(f"#{c};2;{r};{g};{b}")
    pad = (-h) % 6
    if pad:
        idx = np.vstack([idx, np.full((pad, w), -1, dtype=idx.dtype)])
    weights = (1 << np.arange(6)).reshape(6, 1)
    for band in range(0, idx.shape[0], 6):
        rows = idx[band : band + 6]
        line = []
        for c in np.unique(rows):
            if c < 0:
                continue
            bits = ((rows == c) * weights).sum(axis=0) + 63
            line.append(f"#{c}" + _rle(bits.astype(np.uint8).tobytes().decode("ascii")))
        out.append("$".join(line) + "-")
    out.append("\x1b\\\n")
    return "".join(out)


def _rle(s: str) -> str:
    return re.sub(r"(.)\1{3,}", lambda m: f"!{len(m.group(0))}{m.group(1)}", s)


# --- sparklines ---------------------------------------------------------------------------------------------


def sparkline(values: Sequence[float | None], width: int = 24) -> str:
    """`values` (in order) as a line of block characters at most `width` wide: each character the mean of
    its share of the values; a share with no finite value is a space. Empty when no value is finite."""
    n = len(values)
    if n == 0 or width < 1:
        return ""
    cells: list[float | None] = []
    for i in range(min(width, n)):
        lo, hi = i * n // min(width, n), (i + 1) * n // min(width, n)
        share = [v for v in values[lo:hi] if v is not None]
        cells.append(sum(v / len(share) for v in share) if share else None)  # no overflow near ±1.8e308
    finite = [v for v in cells if v is not None]
    if not finite:
        return ""
    low, high = min(finite), max(finite)
    span = high / 2 - low / 2  # halves: the span of values near ±1.8e308 would overflow to inf
    top = len(SPARKS) - 1
    return "".join(
        " " if v is None else SPARKS[top // 2 if span == 0 else min(top, int((v / 2 - low / 2) / span * top + 0.5))]
        for v in cells
    )
