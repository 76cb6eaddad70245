"""Finding the checkpoints of a source to import, by format (Lightning, Hugging Face, step folders, plain
files), with what their names, logs and files say, and hashing them on all cores."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import fsutil, hashing
from .errors import CkptError, IntegrityError
from .import_names import hf_metrics, is_last, parse_lightning_name, parse_plain_name, read_metrics_csv, trainer_modes
from .layouts import COMPOSER_FILE, find_run, link_below, step_epoch
from .pathtext import escape_path

if TYPE_CHECKING:
    from .lightning_state import LightningState


FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
HF_DIR = re.compile(r"checkpoint-(\d+)")
_NUMBERS = re.compile(r"\d+")


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


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in the regular file at `path`; {} when it is missing, unreadable or not an object."""
    try:
        with fsutil.open_regular_file(path) as f:  # a FIFO or device there is no metadata (never waited on)
            doc = json.loads(f.read())
    except (OSError, ValueError, RecursionError):  # NotRegularFile is an OSError; RecursionError: JSON nested deep
        return {}
    return doc if isinstance(doc, dict) else {}


def mtime_of(path: Path) -> float:
    """When `path` (never followed) was last modified; 0.0 when it is gone."""
    try:
        return os.stat(path, follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def _dev(path: Path) -> int:
    try:
        return os.stat(path, follow_symlinks=False).st_dev
    except OSError:
        return -1


def iso_time(ts: float) -> str:
    """A POSIX time as ISO 8601 in UTC, to the microsecond: a record's `created`."""
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
                is_last=filename.startswith("last") and is_last(filename),
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
    top = read_json(root / "trainer_state.json")
    best = top.get("best_model_checkpoint")
    best_step = int(top["global_step"]) if isinstance(top.get("global_step"), int) else -1
    found: list[Found] = []
    for d in dirs:
        step = int(HF_DIR.fullmatch(d.name).group(1))  # type: ignore[union-attr]
        state = read_json(d / "trainer_state.json")
        if not isinstance(state.get("log_history"), list) or not state["log_history"]:
            state = top
        epoch, metrics = hf_metrics(state, step)
        if isinstance(state.get("best_model_checkpoint"), str) and step >= best_step:
            best, best_step = state["best_model_checkpoint"], step  # the latest state knows the final best
        found.append(
            Found(
                d, _rel(d, root), is_dir=True, step=step, epoch=epoch, metrics=metrics, mtime=mtime_of(d), dev=_dev(d)
            )
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
                is_last=is_last(s.path.name),  # Lightning's last.ckpt/: of identical bytes, the named one is kept
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
    """Fill size and sha256 of every candidate (a folder's sha256 is hashing.tree_digest), on all cores."""
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

    digests = hashing.sha256_many(jobs, workers=hashing.hash_workers(total), done=done)
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
            c.sha256 = hashing.tree_digest([(rel, d) for rel, _, d in c.files])
            if files:
                c.mtime = max(c.mtime, max(mtime_of(c.path / rel) for rel, _ in files))
        else:
            c.sha256 = str(next(it))
