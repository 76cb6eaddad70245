"""Bring your own runs: import Lightning, Hugging Face and plain checkpoint folders; scan and verify tasks.

Importing plans first (find, parse names, hash on all cores, match against what the task already
holds), then hands the new checkpoints to `Task.add_existing`, which links them in under the task lock.
Formats and numbering rules are documented in docs/import.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import fsutil
from .backend import per_backend
from .errors import CkptError, ConflictError, IntegrityError, NotFoundError, TaskNotFound, UsageError
from .layout import (
    CACHE_FILE,
    CHECKPOINT_DIR,
    IMPORT_MARKER_PREFIX,
    LIST_CACHE_FILE,
    LOCK_FILE,
    PENDING_PREFIX,
    STAGING_PREFIX,
    TASK_FILE,
    Incoming,
)
from .layouts import COMPOSER_FILE, KINDS, find_run, folder_kind, link_below, pointer_target, step_epoch
from .names import check_task_name
from .pathtext import escape_path

if TYPE_CHECKING:
    from .lightning_state import LightningState
    from .manifest import Checkpoint
    from .workspace import Task, Workspace

FORMATS = ("auto", "lightning", "huggingface", "files", *KINDS)
MODES = ("link", "copy", "move")
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
HF_DIR = re.compile(r"checkpoint-(\d+)")
_LAST = re.compile(r"last(-v\d+)?")
_KEY = re.compile(r"(?:^|(?<=-))([A-Za-z_][A-Za-z0-9_.@]*)=")
_VERSION = re.compile(r"-v\d+$")
_INT = re.compile(r"[+-]?\d+")
_NUMBERS = re.compile(r"\d+")
_NAMED_NUMBER = re.compile(r"(?i)(?<![a-z])(step|epoch|iter|it)[_\-=]?(\d+)")
# log_history keys that describe the run's speed, not the model
_HF_NOISE = ("_runtime", "_per_second", "total_flos")


# --- what a source holds ------------------------------------------------------------------------------


@dataclass(slots=True)
class Found:
    """A checkpoint found in a source folder, before it is imported."""

    path: Path
    name: str  # the original name: the path relative to the folder imported
    is_dir: bool = False
    step: int | None = None
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    mtime: float = 0.0
    size: int = 0
    sha256: str = ""
    files: list[tuple[str, int, str]] | None = None
    note: str | None = None
    is_last: bool = False
    dev: int = -1
    modes: dict[str, str] = field(default_factory=dict)  # metric -> "min" | "max", as the run recorded it


@dataclass(slots=True)
class ImportRow:
    """One source checkpoint and what import did with it: added, already (imported before), duplicate, skipped."""

    source: str
    original_name: str
    action: str
    number: int | None
    step: int | None
    epoch: int | None
    metrics: dict[str, float]
    size: int
    sha256: str
    note: str | None = None


@dataclass(slots=True)
class ImportResult:
    task: str
    format: str
    mode: str
    created_task: bool
    rows: list[ImportRow]

    @property
    def added(self) -> int:
        return sum(r.action == "added" for r in self.rows)


def parse_lightning_name(name: str) -> tuple[int | None, int | None, dict[str, float]]:
    """(epoch, step, metrics) from a ModelCheckpoint file name such as `epoch=3-step=120-val_loss=0.230.ckpt`.

    Pieces are `key=value` joined by `-` (Lightning's CHECKPOINT_JOIN_CHAR), with an optional prefix and a
    `-vN` version suffix; a value may be negative. Pieces that are not numbers are ignored.
    """
    stem = name[: -len(".ckpt")] if name.endswith(".ckpt") else Path(name).stem
    stem = _VERSION.sub("", stem)
    epoch = step = None
    metrics: dict[str, float] = {}
    parts = _KEY.split(stem)  # [prefix, key, value + "-", key, value + "-", ..., key, value]
    last = len(parts) - 2
    for i in range(1, len(parts), 2):
        key = parts[i]
        raw = parts[i + 1] if i == last else parts[i + 1][:-1]
        value: float
        if _INT.fullmatch(raw):
            value = int(raw)
            if key == "epoch":
                epoch = value
                continue
            if key == "step":
                step = value
                continue
        else:
            try:
                value = float(raw)
            except ValueError:
                continue
        metrics[key] = value
    return epoch, step, metrics


def parse_plain_name(name: str) -> tuple[int | None, int | None]:
    """(epoch, step) named in a plain file name such as `model_epoch5_step500.pt`, where present."""
    epoch = step = None
    for m in _NAMED_NUMBER.finditer(Path(name).stem):
        if m.group(1).lower() == "epoch":
            epoch = int(m.group(2))
        else:
            step = int(m.group(2))
    return epoch, step


def hf_metrics(state: dict[str, Any], step: int) -> tuple[int | None, dict[str, float]]:
    """(whole epoch, metrics) at `step` from a Trainer's `trainer_state.json`: its `log_history` entries
    whose `step` is `step` (eval_loss, loss, learning_rate...), speed figures left out. A fractional
    epoch is kept as the metric `hf_epoch` (the Trainer counts epochs as a float)."""
    metrics: dict[str, float] = {}
    epoch: float | None = None
    history = state.get("log_history")
    for entry in history if isinstance(history, list) else []:
        if not isinstance(entry, dict) or entry.get("step") != step:
            continue
        for k, v in entry.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or k == "step":
                continue
            if k == "epoch":
                epoch = v
            elif not k.endswith(_HF_NOISE):
                metrics[k] = v
    if epoch is None and state.get("global_step") == step and isinstance(state.get("epoch"), int | float):
        epoch = state["epoch"]
    if epoch is None or isinstance(epoch, bool):
        return None, metrics
    if float(epoch).is_integer():
        return int(epoch), metrics
    metrics["hf_epoch"] = float(epoch)
    return None, metrics


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with fsutil.open_regular_file(path) as f:  # a FIFO or device there is no metadata (never waited on)
            doc = json.loads(f.read())
    except (OSError, ValueError, RecursionError):  # NotRegularFile is an OSError; RecursionError: JSON nested deep
        return {}
    return doc if isinstance(doc, dict) else {}


def _mtime(path: Path) -> float:
    try:
        return os.stat(path, follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def _dev(path: Path) -> int:
    try:
        return os.stat(path, follow_symlinks=False).st_dev
    except OSError:
        return -1


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")


def _rel(path: Path, root: Path) -> str:
    """`path` relative to `root`, as text for the manifest (escape_path: a name may not be UTF-8)."""
    full, base = str(path), str(root).rstrip("/") + "/"
    return escape_path(full[len(base) :] if full.startswith(base) and len(full) > len(base) else path.name)


def _walk_files(root: Path, suffixes: tuple[str, ...]) -> list[tuple[Path, os.stat_result | None]]:
    """Files under `root` with one of `suffixes` (no hidden ones), in path order, with their lstat
    (None for a symlink, which is never followed)."""
    out: list[tuple[Path, os.stat_result | None]] = []

    def walk(folder: str) -> None:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir(follow_symlinks=False):
                walk(e.path)
            elif e.name.endswith(suffixes):
                link = e.is_symlink()
                if link or e.is_file(follow_symlinks=False):
                    out.append((Path(e.path), None if link else e.stat(follow_symlinks=False)))

    walk(str(root))
    return out


def _single(path: Path) -> list[tuple[Path, os.stat_result | None]]:
    if path.is_symlink():
        return [(path, None)]
    st = os.stat(path, follow_symlinks=False)
    fsutil.refuse_irregular(path, st.st_mode)  # /dev/zero or a FIFO would be hashed forever
    return [(path, st)]


def detect_format(path: Path) -> str:
    """The format of `path`: "huggingface" (checkpoint-N folders), "lightning" (*.ckpt files), else "files"."""
    if path.is_dir():
        if HF_DIR.fullmatch(path.name) or any(
            HF_DIR.fullmatch(e.name) and (e.is_dir(follow_symlinks=False) or e.is_symlink()) for e in os.scandir(path)
        ):  # a checkpoint-N link is a Trainer's too: listed as skipped, never followed
            return "huggingface"
        run = find_run(path)
        if run is not None:
            return run.kind
        return "lightning" if _any_file(str(path), ".ckpt") else "files"
    return "lightning" if path.suffix == ".ckpt" else "files"


def _any_file(folder: str, suffix: str) -> bool:
    """Whether a file ending in `suffix` lies below `folder` (hidden folders skipped); stops at the first."""
    subdirs = []
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if e.name.endswith(suffix) and not e.is_dir(follow_symlinks=False):
                return True
            if e.is_dir(follow_symlinks=False):
                subdirs.append(e.path)
    return any(_any_file(d, suffix) for d in subdirs)


def find_lightning(path: Path) -> tuple[list[Found], list[ImportRow]]:
    """The `*.ckpt` files of a Lightning run (`lightning_logs/version_N/checkpoints/`), in step order."""
    root = path if path.is_dir() else path.parent
    files = _walk_files(path, (".ckpt",)) if path.is_dir() else _single(path)
    found: list[Found] = []
    skipped: list[ImportRow] = []
    for f, st in files:
        name = _rel(f, root)
        if st is None:  # save_last="link" makes last.ckpt a symlink to the checkpoint it repeats
            skipped.append(_skip(f, name, f"a symlink (to {escape_path(os.readlink(f))}); not imported"))
            continue
        filename = f.name
        epoch, step, metrics = parse_lightning_name(filename)
        found.append(
            Found(
                f,
                name,
                epoch=epoch,
                step=step,
                metrics=metrics,
                mtime=st.st_mtime,
                size=st.st_size,
                dev=st.st_dev,
                is_last=filename.startswith("last") and _is_last(filename),
            )
        )
    _read_lightning(found)
    found.sort(key=lambda c: (c.step is None, c.step or 0, c.epoch or 0, c.is_last, c.mtime, c.name))
    return found, skipped


def _read_lightning(found: list[Found]) -> None:
    """Complete what the names of Lightning checkpoints say from the files themselves and the run's
    `metrics.csv` (docs/import.md): epoch and step where the name lacks them, each monitored metric's
    value and direction, every logged metric, and a note on the callback's best checkpoint."""
    states: dict[int, LightningState] = {}
    archives = [c for c in found if _is_zip(c.path)]
    if archives:
        from .lightning_state import read_lightning_state  # imported only for torch archives
    for c in archives:
        try:
            states[id(c)] = st = read_lightning_state(c.path)
        except IntegrityError:
            continue
        if c.step is None and st.global_step is not None:
            c.step = st.global_step
        if c.epoch is None and st.epoch is not None:
            c.epoch = st.epoch
    logged = _logged_metrics(found)
    for c in found:
        if id(c) not in logged and id(c) not in states:
            continue  # the name says all there is
        named = c.metrics
        merged = {k: logged[id(c)][k] if _agrees(logged, c, k, v) else v for k, v in named.items()}
        for k, v in logged.get(id(c), {}).items():
            merged.setdefault(k, v)
        monitors = states[id(c)].monitors if id(c) in states else []
        for m in monitors:
            score = m.score
            if score is None and not m.wrote_last and len(monitors) == 1:
                score = m.current_score  # a renamed file: the one callback's latest score was for this file
            if score is not None:
                merged[m.monitor] = score  # the file's own record wins over the name and the log
            if m.mode is not None:
                c.modes[m.monitor] = m.mode
        c.metrics = merged
    latest = max((c for c in found if id(c) in states), key=lambda c: c.step or 0, default=None) if states else None
    if latest is not None:
        for m in states[id(latest)].monitors:
            for c in found:
                same_run = c.path.parent == latest.path.parent  # version_0 and version_1 repeat names
                if c.note is None and same_run and m.best_model_name == c.path.name and not c.is_last:
                    c.note = f"Lightning's best_model_path ({m.monitor})"


def _is_zip(path: Path) -> bool:
    """Whether the file starts as a zip archive (every torch checkpoint since torch 1.6 does)."""
    try:
        fd = fsutil.open_regular(path)
    except OSError:  # NotRegularFile too: hashing refuses it later
        return False
    try:
        return os.read(fd, 4) == b"PK\x03\x04"
    except OSError:
        return False
    finally:
        os.close(fd)


def _agrees(logged: dict[int, dict[str, float]], c: Found, key: str, named: float) -> bool:
    """Whether the logged value of `key` rounds to the one in the file name (which is then less precise)."""
    v = logged.get(id(c), {}).get(key)
    if v is None or not math.isfinite(v) or not math.isfinite(named):
        return False
    text = repr(float(named))
    if "e" in text or "." not in text:
        return v == named
    return abs(v - named) <= 0.5 * 10 ** -len(text.split(".")[1]) * (1 + 1e-9)


def _logged_metrics(found: list[Found]) -> dict[int, dict[str, float]]:
    """For each checkpoint (by id) beside a CSVLogger's `metrics.csv` (in its folder, or above a
    `checkpoints` folder), the last value of each metric logged in its epoch at a step <= its step."""
    out: dict[int, dict[str, float]] = {}
    logs: dict[str, dict[int, list[tuple[int, dict[str, float]]]] | None] = {}
    log_of: dict[str, str | None] = {}  # folder -> the metrics.csv that serves it (plain strings: 1,000s of files)
    by_log: dict[tuple[str, int], list[Found]] = {}
    for c in found:
        if c.epoch is None or c.step is None:
            continue
        folder = os.path.dirname(c.path)
        if folder not in log_of:
            log_of[folder] = None
            places = [folder, os.path.dirname(folder)] if os.path.basename(folder) == "checkpoints" else [folder]
            for place in places:
                csv_path = os.path.join(place, "metrics.csv")
                if csv_path not in logs:
                    logs[csv_path] = read_metrics_csv(Path(csv_path))
                if logs[csv_path] is not None:
                    log_of[folder] = csv_path
                    break
        log = log_of[folder]
        if log is not None:
            by_log.setdefault((log, c.epoch), []).append(c)
    for (log, epoch), cps in by_log.items():
        rows = sorted(logs[log].get(epoch, []), key=lambda r: r[0])  # type: ignore[union-attr]
        seen: dict[str, float] = {}
        i = 0
        for c in sorted(cps, key=lambda c: c.step or 0):
            while i < len(rows) and rows[i][0] <= (c.step or 0):
                seen.update(rows[i][1])
                i += 1
            out[id(c)] = dict(seen)
    return out


def read_metrics_csv(path: Path) -> dict[int, list[tuple[int, dict[str, float]]]] | None:
    """The rows of a Lightning CSVLogger's `metrics.csv` by epoch: (step, {metric: value}) in file order,
    empty cells left out. None when there is no such file or it has no `epoch` and `step` columns."""
    import csv

    try:
        with open(fsutil.open_regular(path), newline="", encoding="utf-8") as f:  # never a FIFO or device
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or "epoch" not in header or "step" not in header:
                return None
            e_col, s_col = header.index("epoch"), header.index("step")
            by_epoch: dict[int, list[tuple[int, dict[str, float]]]] = {}
            for row in reader:
                try:
                    epoch, step = int(float(row[e_col])), int(float(row[s_col]))
                except (ValueError, IndexError):
                    continue
                values: dict[str, float] = {}
                for name, cell in zip(header, row, strict=False):
                    if cell and name not in ("epoch", "step"):
                        try:
                            values[name] = float(cell)
                        except ValueError:
                            pass
                by_epoch.setdefault(epoch, []).append((step, values))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    return by_epoch


def _is_last(filename: str) -> bool:
    return filename.endswith(".ckpt") and bool(_LAST.fullmatch(filename[: -len(".ckpt")]))


def find_huggingface(path: Path) -> tuple[list[Found], list[ImportRow]]:
    """The `checkpoint-N/` folders of a Trainer's output_dir, in numeric order of N."""
    if HF_DIR.fullmatch(path.name):
        root, dirs = path.parent, [path]
    else:
        root = path
        dirs = [Path(e.path) for e in os.scandir(path) if HF_DIR.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    skipped: list[ImportRow] = []
    if not HF_DIR.fullmatch(path.name):
        for e in sorted(os.scandir(path), key=lambda e: e.name):
            if HF_DIR.fullmatch(e.name) and e.is_symlink():  # never followed (as a DCP step link)
                target = escape_path(os.readlink(e.path))
                skipped.append(_skip(Path(e.path), e.name, f"a symlink (to {target}); never followed, not imported"))
    kept = []
    for d in dirs:  # a file in it (at any depth) replaced by a link: skipped (given on its own: exit 6 at hashing)
        link = link_below(d) if d != path else None
        if link is None:
            kept.append(d)
        else:
            what = f"a step folder that holds the symlink {escape_path(link)}; never followed, not imported"
            skipped.append(_skip(d, _rel(d, root), what))
    dirs = kept
    top = _read_json(root / "trainer_state.json")
    best = top.get("best_model_checkpoint")
    best_step = int(top["global_step"]) if isinstance(top.get("global_step"), int) else -1
    found: list[Found] = []
    for d in dirs:
        step = int(HF_DIR.fullmatch(d.name).group(1))  # type: ignore[union-attr]
        state = _read_json(d / "trainer_state.json")
        if not isinstance(state.get("log_history"), list) or not state["log_history"]:
            state = top
        epoch, metrics = hf_metrics(state, step)
        if isinstance(state.get("best_model_checkpoint"), str) and step >= best_step:
            best, best_step = state["best_model_checkpoint"], step  # the latest state knows the final best
        found.append(
            Found(d, _rel(d, root), is_dir=True, step=step, epoch=epoch, metrics=metrics, mtime=_mtime(d), dev=_dev(d))
        )
    found.sort(key=lambda c: (c.step, c.name))  # numerically: checkpoint-4 before checkpoint-12
    if found:
        args = root / "training_args.bin"
        found[-1].modes = trainer_modes(args if args.is_file() else found[-1].path / "training_args.bin")
    if isinstance(best, str):
        for c in found:
            if Path(best).name == c.path.name:
                c.note = "the Trainer's best_model_checkpoint"
    return found, skipped


def find_steps(path: Path) -> tuple[list[Found], list[ImportRow]]:
    """The step folders (or Composer files) of a DCP, sharded-safetensors, DeepSpeed or Composer run, in step
    order; its `latest` pointers are skipped rows (a repeat, not a checkpoint)."""
    run = find_run(path, mixed=True)
    if run is None:
        return [], []
    root = path.parent if run.steps and run.steps[0].path == path else path
    found: list[Found] = []
    for s in run.steps:
        st = os.stat(s.path, follow_symlinks=False)
        found.append(
            Found(
                s.path,
                _rel(s.path, root),
                is_dir=s.is_dir,
                step=s.step,
                epoch=s.epoch,
                mtime=st.st_mtime,
                size=0 if s.is_dir else st.st_size,
                dev=st.st_dev,
                is_last=_is_last(s.path.name),  # Lightning's last.ckpt/: of identical bytes, the named one is kept
            )
        )
    skipped = [
        _skip(p.path, _rel(p.path, root), f"the run's latest pointer (to {escape_path(p.target)}); not a checkpoint")
        for p in run.pointers
    ]
    skipped += [
        _skip(
            p.path,
            _rel(p.path, root),
            f"a step folder that {escape_path(p.target)}; never followed, not imported"
            if p.target.startswith("holds the symlink ")
            else f"a symlink (to {escape_path(p.target)}); never followed, not imported",
        )
        for p in run.links
    ]
    skipped += [
        _skip(p, _rel(p, root), f"a file beside the {run.kind} step folders; import it with --format files")
        for p in run.loose
    ]
    return found, skipped


def trainer_modes(path: Path) -> dict[str, str]:
    """{metric: "min" | "max"} from a Trainer's `training_args.bin`: its `metric_for_best_model`, named as
    the Trainer logs it (with the `eval_` prefix it adds), and `greater_is_better`; {} when unreadable."""
    if not path.is_file():
        return {}
    from .lightning_state import read_training_args

    args = read_training_args(path)
    metric = args.get("metric_for_best_model")
    if not isinstance(metric, str) or not metric:
        return {}
    name = metric if metric.startswith("eval_") else f"eval_{metric}"
    return {name: "max" if args.get("greater_is_better") is True else "min"}


def find_files(path: Path) -> tuple[list[Found], list[ImportRow]]:
    """Plain checkpoint files; numbered by the numbers in their names when every name has one, else by mtime."""
    root = path if path.is_dir() else path.parent
    files = _walk_files(path, FILE_SUFFIXES) if path.is_dir() else _single(path)
    found: list[Found] = []
    skipped: list[ImportRow] = []
    for f, st in files:
        name = _rel(f, root)
        if st is None:
            skipped.append(_skip(f, name, "a symlink; not imported"))
            continue
        epoch, step = parse_plain_name(f.name)
        if COMPOSER_FILE.fullmatch(f.name):
            step, epoch = step_epoch(f.name)
        found.append(Found(f, name, epoch=epoch, step=step, mtime=st.st_mtime, size=st.st_size, dev=st.st_dev))
    order_by_plain_name(found)
    return found, skipped


def order_by_plain_name(found: list[Found]) -> None:
    """Sort in place: by the numbers in the names when every name has one (so 10 after 9), else by mtime."""
    if found and all(_NUMBERS.search(Path(c.name).name) for c in found):
        found.sort(key=lambda c: ([int(n) for n in _NUMBERS.findall(Path(c.name).name)], c.name))
    else:
        found.sort(key=lambda c: (c.mtime, c.name))


def _skip(path: Path, name: str, note: str) -> ImportRow:
    return ImportRow(escape_path(path), name, "skipped", None, None, None, {}, 0, "", note)


def hash_found(found: list[Found], progress: Callable[[int, int], None] | None = None) -> None:
    """Fill size and sha256 of every candidate (a folder's sha256 is fsutil.tree_digest), on all cores."""
    jobs: list[Path] = []
    trees: list[tuple[Found, list[tuple[str, int]]]] = []
    total = 0
    for c in found:
        if c.is_dir:
            files = fsutil.tree_files(c.path)
            trees.append((c, files))
            jobs.extend(c.path / rel for rel, _ in files)
            total += sum(size for _, size in files)
        else:
            jobs.append(c.path)
            total += c.size
    done = None
    if progress is not None:
        sizes = [os.stat(j).st_size for j in jobs]

        def done(i: int) -> None:
            progress(sizes[i], total)

    digests = fsutil.sha256_many(jobs, workers=fsutil.hash_workers(total), done=done)
    for d in digests:
        if isinstance(d, CkptError):  # NotRegularFile: a FIFO or device among the files (exit 6)
            raise d
        if isinstance(d, OSError):
            raise CkptError(f"cannot read '{d.filename}': {d.strerror}", path=d.filename)
    it = iter(digests)
    tree_of = {id(c): files for c, files in trees}
    for c in found:
        if c.is_dir:
            files = tree_of[id(c)]
            c.files = [(rel, size, str(next(it))) for rel, size in files]
            c.size = sum(size for _, size in files)
            c.sha256 = fsutil.tree_digest([(rel, d) for rel, _, d in c.files])
            if files:
                c.mtime = max(c.mtime, max(_mtime(c.path / rel) for rel, _ in files))
        else:
            c.sha256 = str(next(it))


# --- import ---------------------------------------------------------------------------------------


def default_task_name(path: Path, fmt: str) -> str:
    """A task name from the source path: its folder name, skipping Lightning's `checkpoints` folder."""
    p = path.resolve()
    if not p.is_dir() or (fmt == "huggingface" and HF_DIR.fullmatch(p.name)) or (fmt in KINDS and folder_kind(p)):
        p = p.parent
    if p.name == "checkpoints" and p.parent != p:
        p = p.parent
    raw = p.name
    if re.fullmatch(r"version_\d+", raw) and p.parent.name == "lightning_logs" and p.parent.parent.name:
        # lightning_logs/version_3 says little: name it after the project folder, as <project>-version_3
        raw = f"{p.parent.parent.name}-{raw}"
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "-", raw).lstrip(".-")[:100]
    return name or "imported"


def plan(
    path: Path, fmt: str = "auto", progress: Callable[[int, int], None] | None = None
) -> tuple[str, list[Found], list[ImportRow]]:
    """What `path` holds: (format, checkpoints in import order with sizes and hashes, skipped rows)."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}", hint=f"use one of: {', '.join(FORMATS)}")
    if not os.path.lexists(path):
        raise NotFoundError(f"'{path}' does not exist", path=path)
    _refuse_link(path)
    if not path.is_dir():
        _check_single_file(path)
    if fmt == "auto":
        fmt = detect_format(path)
    finder = {"lightning": find_lightning, "huggingface": find_huggingface, "files": find_files}.get(fmt, find_steps)
    if fmt == "huggingface" and not path.is_dir():
        raise UsageError(f"'{path}' is a file; a Hugging Face checkpoint is a checkpoint-N folder")
    found, skipped = finder(path)
    if not found and not skipped:
        raise NotFoundError(
            f"no {fmt} checkpoints in '{path}'",
            path=path,
            hint="pass --format (lightning: *.ckpt, huggingface: checkpoint-N/, files: *.pt *.pth *.bin *.safetensors;"
            " dcp, sharded, deepspeed, composer: docs/formats-checkpoints.md)",
        )
    hash_found(found, progress)
    return fmt, found, skipped


def _refuse_link(path: Path) -> None:
    if fsutil.is_symlink(path):  # never followed: an import would link, copy or move the link's target
        target = escape_path(os.readlink(path))
        raise IntegrityError(
            f"'{path}' is a symlink (to {target}); ckpt never follows a link",
            path=path,
            hint=f"import what it points at: ckpt import {target}",
        )


def _check_single_file(path: Path) -> None:
    """A file given to import on its own must be a checkpoint: a run's `latest` pointer, or any file
    without a checkpoint suffix, is refused (UsageError) rather than numbered as one."""
    fsutil.refuse_irregular(path, os.stat(path, follow_symlinks=False).st_mode)  # /dev/zero, a FIFO: exit 6
    if path.name.endswith(FILE_SUFFIXES):
        return
    target = pointer_target(path) if path.name == "latest" else None
    if target is not None:
        raise UsageError(
            f"'{path}' is DeepSpeed's latest pointer (to {escape_path(target)}), not a checkpoint",
            path=path,
            hint=f"import the run folder: ckpt import {escape_path(str(path.parent))}",
        )
    raise UsageError(
        f"'{path}' is not a checkpoint file ({' '.join(FILE_SUFFIXES)})",
        path=path,
        hint="import a checkpoint file, a step folder or a run folder",
    )


def import_path(
    ws: Workspace,
    path: str | os.PathLike[str],
    *,
    task: str | None = None,
    fmt: str = "auto",
    mode: str = "link",
    progress: Callable[[int, int], None] | None = None,
    dry_run: bool = False,
) -> ImportResult:
    """Import the checkpoints under `path` into task `task` (created if needed; default: named after the folder).

    With `dry_run`, nothing is written: the rows say what would be added ("would add") or left.

    Already-imported checkpoints (same sha256 and size as a record of the task) and repeats (`last.ckpt`,
    identical bytes under two names) are not numbered again, so importing twice changes nothing.
    Raises NotFoundError, UsageError, ConflictError (task not running), BusyError, IntegrityError.
    """
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}", hint="use --link, --copy or --move")
    src = Path(path).expanduser()
    _refuse_link(src)  # before resolving it: a link loop is refused as a link, not a resolve error
    if ws.holds(src):
        raise UsageError(
            f"'{src}' is inside the workspace", hint="for files a script wrote into a task, use: ckpt scan"
        )
    fmt, found, skipped = plan(src, fmt, progress)
    name = task if task is not None else default_task_name(src, fmt)
    check_task_name(name)
    modes = found_modes(found)
    origin = src.resolve()
    source = {"path": escape_path(str(origin if origin.is_dir() else origin.parent)), "how": mode}
    created = False
    try:
        t = ws.task(name)
    except TaskNotFound:
        if dry_run:
            return _would(name, fmt, mode, True, [], found, skipped)
        t = ws.create_task(name, exist_ok=True, metric_modes=modes, source=source if found else None)
        created = True
    if dry_run:
        if t.status != "running":
            raise ConflictError(f"task '{t.name}' is {t.status}; it takes no new checkpoints")
        return _would(t.name, fmt, mode, False, t.checkpoints, found, skipped)
    rows, new = _match(t.checkpoints, found)
    try:
        added = t.add_existing(new, mode=mode, unique=True)
    except BaseException:
        if created:  # a failed import leaves no empty task behind
            with contextlib.suppress(CkptError, OSError):
                t.discard_if_empty()
        raise
    # after the records: a failed import leaves the manifest as it was (directions and source are a note)
    if t.status == "running":
        t.note_import(modes, source if added else None)
    by_source = {cp.original_name: cp for cp in added}
    known: dict[tuple[str, int], Checkpoint] | None = None
    for r in rows:
        if r.action == "added":
            if r.original_name in by_source:
                r.number = by_source[r.original_name].number
            else:  # another import added the same bytes meanwhile
                if known is None:
                    known = {(cp.sha256, cp.size): cp for cp in t.checkpoints}
                r.action, r.note = "already", "added by another import meanwhile"
                r.number = known[(r.sha256, r.size)].number
    t.refresh_cache()
    return ImportResult(t.name, fmt, mode, created, rows + skipped)


def _would(
    name: str, fmt: str, mode: str, new_task: bool, held: list[Checkpoint], found: list[Found], skipped: list[ImportRow]
) -> ImportResult:
    """What an import would do (a dry run): the rows, with "would add" for what it would number."""
    rows, _ = _match(held, found)
    for r in rows:
        if r.action == "added":
            r.action = "would add"
    return ImportResult(name, fmt, mode, new_task, rows + skipped)


def found_modes(found: list[Found]) -> dict[str, str]:
    """The directions the checkpoints recorded, {metric: "min" | "max"}; a metric recorded both ways is left out."""
    modes: dict[str, str] = {}
    both: set[str] = set()
    for c in found:
        for metric, mode in c.modes.items():
            if modes.setdefault(metric, mode) != mode:
                both.add(metric)
    return {k: v for k, v in modes.items() if k not in both}


def _match(held: list[Checkpoint], found: list[Found]) -> tuple[list[ImportRow], list[Incoming]]:
    """Rows for every candidate, and the Incoming items of those the task (holding `held`) does not hold yet."""
    known: dict[tuple[str, int], Checkpoint] = {(cp.sha256, cp.size): cp for cp in held}
    # of identical files in this import, the named one is kept and last.ckpt is the repeat
    first: dict[tuple[str, int], Found] = {}
    for c in sorted(found, key=lambda c: c.is_last):
        first.setdefault((c.sha256, c.size), c)
    rows: list[ImportRow] = []
    new: list[Incoming] = []
    for c in found:
        key = (c.sha256, c.size)
        row = ImportRow(
            escape_path(c.path), c.name, "added", None, c.step, c.epoch, dict(c.metrics), c.size, c.sha256, c.note
        )
        if key in known:
            cp = known[key]
            row.number = cp.number
            same = cp.original_name == c.name
            row.action = "already" if same else "duplicate"
            row.note = "imported before" if same else f"same bytes as checkpoint {cp.number} ({cp.original_name})"
        elif first[key] is not c:
            row.action = "duplicate"
            row.note = f"same bytes as {first[key].name}"
        else:
            new.append(
                Incoming(
                    source=c.path,
                    original_name=c.name,
                    size=c.size,
                    sha256=c.sha256,
                    step=c.step,
                    epoch=c.epoch,
                    metrics=dict(c.metrics),
                    created=_iso(c.mtime) if c.mtime else None,
                    files=c.files,
                    is_dir=c.is_dir,
                    dev=c.dev,
                )
            )
        rows.append(row)
    return rows, new


# --- scan -------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Unknown:
    """A file or folder in a task folder that the manifest does not know."""

    path: Path
    rel: str  # relative to the workspace
    kind: str  # "file" or "dir"
    size: int
    modified: str
    addable: bool  # a checkpoint file (by suffix) or a folder holding weights


@dataclass(slots=True)
class ScanResult:
    task: str
    unknown: list[Unknown]
    temporary: list[Unknown]  # ckpt's own in-progress names (*.tmp, .import-*): never added
    added: list[Checkpoint] = field(default_factory=list)


_OWNED = {TASK_FILE, CACHE_FILE, LIST_CACHE_FILE, LOCK_FILE, CHECKPOINT_DIR}


@per_backend
def scan(ws: Workspace, task_name: str, *, add: bool = False) -> ScanResult:
    """Files in a task folder that its manifest does not know; with `add`, checkpoint-like ones are added
    (moved into checkpoints/ under new numbers, ordered as plain files are). Raises TaskNotFound, BusyError."""
    t = ws.task(task_name)
    result = scan_folder(ws, t)
    if add:
        candidates = [u for u in result.unknown if u.addable]
        if candidates:
            with t.lock():  # scanned again under the lock: a file can only be added while nothing else moves
                fresh = {u.rel for u in scan_folder(ws, t).unknown}
            candidates = [u for u in candidates if u.rel in fresh]
            found = [_found_of(u, t) for u in candidates]
            order_by_plain_name(found)
            hash_found(found)
            items = [
                Incoming(
                    source=c.path,
                    original_name=c.name,
                    size=c.size,
                    sha256=c.sha256,
                    step=c.step,
                    epoch=c.epoch,
                    metrics=dict(c.metrics),
                    created=_iso(c.mtime) if c.mtime else None,
                    files=c.files,
                    is_dir=c.is_dir,
                    dev=c.dev,
                )
                for c in found
            ]
            result.added = t.add_existing(items, mode="move")
            added = {u.rel for u in candidates}
            result.unknown = [u for u in result.unknown if u.rel not in added]
            t.refresh_cache()
    return result


def _found_of(u: Unknown, t: Task) -> Found:
    name = escape_path(u.path.relative_to(t.folder).as_posix())
    base = u.path.name
    if u.kind == "dir":
        m = HF_DIR.fullmatch(base)
        if m:
            epoch, metrics = hf_metrics(_read_json(u.path / "trainer_state.json"), int(m.group(1)))
            return Found(
                u.path, name, is_dir=True, step=int(m.group(1)), epoch=epoch, metrics=metrics, mtime=_mtime(u.path)
            )
        step, epoch = step_epoch(base)
        return Found(u.path, name, is_dir=True, step=step, epoch=epoch, mtime=_mtime(u.path))
    if "=" in base:
        epoch, step, metrics = parse_lightning_name(base)
        return Found(u.path, name, epoch=epoch, step=step, metrics=metrics, mtime=_mtime(u.path), size=u.size)
    epoch, step = parse_plain_name(base)
    if COMPOSER_FILE.fullmatch(base):
        step, epoch = step_epoch(base)
    return Found(u.path, name, epoch=epoch, step=step, mtime=_mtime(u.path), size=u.size)


def _unknown(ws: Workspace, path: Path) -> Unknown:
    st = os.stat(path, follow_symlinks=False)
    if path.is_dir() and not path.is_symlink():
        try:
            files = fsutil.tree_files(path)
            size = sum(s for _, s in files)
            from .formats import weights_file

            if folder_kind(path) is None:
                weights_file(path)
            addable = True
        except CkptError:
            size, addable = 0, False
        return Unknown(path, ws.rel(path), "dir", size, _iso(st.st_mtime), addable)
    addable = path.suffix in FILE_SUFFIXES and not path.is_symlink() and not path.name.startswith(".")
    return Unknown(path, ws.rel(path), "file", st.st_size, _iso(st.st_mtime), addable)


def scan_folder(ws: Workspace, t: Task) -> ScanResult:
    """What a folder task holds that its manifest does not know (a folder's `Task.unknown_files`)."""
    known = {cp.file for cp in t.checkpoints}
    unknown: list[Unknown] = []
    temporary: list[Unknown] = []
    with os.scandir(t.folder) as it:
        top = sorted(it, key=lambda e: e.name)
    for e in top:
        if e.name in _OWNED or e.name.startswith((PENDING_PREFIX, IMPORT_MARKER_PREFIX, ".lock")):
            continue
        (temporary if e.name.startswith(".") else unknown).append(_unknown(ws, Path(e.path)))
    cdir = t.folder / CHECKPOINT_DIR
    if cdir.is_dir() and not cdir.is_symlink():
        with os.scandir(cdir) as it:
            inner = sorted(it, key=lambda e: e.name)
        for e in inner:
            if f"{CHECKPOINT_DIR}/{e.name}" in known:
                continue
            if e.name.startswith(".") and (e.name.endswith(".tmp") or e.name.startswith(STAGING_PREFIX)):
                temporary.append(_unknown(ws, Path(e.path)))
            else:
                unknown.append(_unknown(ws, Path(e.path)))
    return ScanResult(t.name, unknown, temporary)
