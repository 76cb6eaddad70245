"""`ckpt verify`: re-hash what the records name, once for every store.

The store gives three steps: the files nobody records (`task.unknown_files()`), what is stored under each
record's path (`ws.stored_files`: the files of a file or folder, their sizes, and a key shared by files
that are one (an inode, an object)), and their digests (`ws.hash_files`, on all cores on a folder). The
order of the checks and what counts as a problem are here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import hashing

if TYPE_CHECKING:
    from .workspace_base import Workspace

__all__ = ["Problem", "Stored", "VerifyResult", "verify"]


@dataclass(slots=True)
class Problem:
    """Something verify found wrong: missing, changed (size or sha256), unknown (a file no record names)."""

    kind: str
    path: str
    task: str | None = None
    number: int | None = None
    model: str | None = None
    expected: str | None = None
    actual: str | None = None
    note: str | None = None


@dataclass(slots=True)
class VerifyResult:
    tasks: list[str]
    models: list[str]
    checked: int  # checkpoints and models checked
    files: int  # files hashed (each inode or object once)
    bytes: int  # bytes hashed
    seconds: float
    problems: list[Problem]
    temporary: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(slots=True, frozen=True)
class Stored:
    """One file of what a record names: its name inside a folder checkpoint ('' for a single file), its
    size, `key` (equal for two names of one inode or object) and `handle` (what the store hashes)."""

    name: str
    size: int
    key: object
    handle: object


@dataclass(slots=True)
class _Target:
    """One checkpoint or model to check: a file or a folder."""

    rel: str
    size: int
    sha256: str
    task: str | None
    number: int | None
    model: str | None


def verify(
    ws: Workspace,
    tasks: list[str] | None = None,
    *,
    models: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyResult:
    """Re-hash every checkpoint of `tasks` (default: all) and, with `models`, every model, against the
    recorded sha256; report missing, changed and unknown files. Each inode (object) is read once: a model
    hard-linked to its checkpoint is read once. `progress(bytes, total)` is called as files are hashed
    (from worker threads on a folder). Raises TaskNotFound."""
    start = time.perf_counter()
    names = list(tasks) if tasks else ws.task_names()
    task_objs = [ws.task(n) for n in names]
    targets: list[_Target] = []
    problems: list[Problem] = []
    temporary: list[str] = []
    for t in task_objs:
        for cp in t.checkpoints:
            targets.append(_Target(ws.rel(t.path_of(cp)), cp.size, cp.sha256, t.name, cp.number, None))
        unknown, temp = t.unknown_files()
        problems += [Problem("unknown", u.rel, task=t.name, note=f"a {u.kind} no record names") for u in unknown]
        temporary += [u.rel for u in temp]
    titles: list[str] = []
    if models:
        found, errors = ws.models.read_all()
        problems += [Problem("unreadable", str(e.path or ""), note=str(e)) for e in errors]
        for m in found:
            if tasks and m.task not in names:
                continue
            titles.append(m.title)
            targets.append(_Target(ws.rel(m.path), m.size, m.sha256, m.task, m.checkpoint, m.title))
    found_problems, files, hashed = _check(ws, targets, progress)
    problems += found_problems
    # a checkpoint trashed while we hashed is not a problem: keep only what the manifests still name
    still = {(t.name, cp.number) for t in task_objs for cp in t.checkpoints}
    problems = [p for p in problems if p.model is not None or p.number is None or (p.task, p.number) in still]
    return VerifyResult(names, titles, len(targets), files, hashed, time.perf_counter() - start, problems, temporary)


def _check(
    ws: Workspace, targets: list[_Target], progress: Callable[[int, int], None] | None
) -> tuple[list[Problem], int, int]:
    """The problems of `targets`, and how many files and bytes were hashed."""
    problems: list[Problem] = []
    handles: dict[object, object] = {}
    sizes: dict[object, int] = {}
    plans: list[tuple[_Target, list[Stored]]] = []
    for tg, stored in zip(targets, ws.stored_files([tg.rel for tg in targets]), strict=True):
        where = {"task": tg.task, "number": tg.number, "model": tg.model}
        if stored is None:
            problems.append(Problem("missing", tg.rel, **where, expected=tg.sha256))  # type: ignore[arg-type]
            continue
        if isinstance(stored, str):  # what the store refuses to read (a symlink, an unreadable folder)
            problems.append(Problem("changed", tg.rel, **where, note=stored))  # type: ignore[arg-type]
            continue
        size = sum(f.size for f in stored)
        if size != tg.size:
            note = f"size {size}, recorded {tg.size}"
            problems.append(Problem("changed", tg.rel, **where, expected=tg.sha256, note=note))  # type: ignore[arg-type]
            continue
        for f in stored:
            handles.setdefault(f.key, f.handle)
            sizes[f.key] = f.size
        plans.append((tg, stored))
    # only the files still needed are hashed, largest first so the cores finish together
    order = sorted({f.key for _, stored in plans for f in stored}, key=lambda k: -sizes[k])
    total = sum(sizes[k] for k in order)

    def done(i: int) -> None:
        if progress is not None:
            progress(sizes[order[i]], total)

    digests = dict(zip(order, ws.hash_files([handles[k] for k in order], total, done), strict=True))
    for tg, stored in plans:
        where = {"task": tg.task, "number": tg.number, "model": tg.model}
        got = [digests[f.key] for f in stored]
        errs = [g for g in got if isinstance(g, OSError)]
        if errs:
            problems.append(Problem("missing", tg.rel, **where, expected=tg.sha256, note=str(errs[0])))  # type: ignore[arg-type]
            continue
        if [f.name for f in stored] == [""]:
            actual = str(got[0])
        else:
            actual = hashing.tree_digest([(f.name, str(d)) for f, d in zip(stored, got, strict=True)])
        if actual != tg.sha256:
            problems.append(Problem("changed", tg.rel, **where, expected=tg.sha256, actual=actual))  # type: ignore[arg-type]
    return problems, len(order), total
