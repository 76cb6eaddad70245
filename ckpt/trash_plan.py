"""What trash-unused decides: which checkpoints something uses (the latest, a model, a keep rule), the rest
to trash, and what emptying them would free. Building a plan changes nothing; `ckpt.trash` carries it out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import IntegrityError, ModelNotFound, UsageError
from .layout import CHECKPOINT_DIR
from .manifest import Checkpoint
from .metrics import Direction, rank, require

if TYPE_CHECKING:
    from .storage.base import Blob, Storage
    from .task_base import Task
    from .trash_results import Held


@dataclass(slots=True, frozen=True)
class KeepRules:
    """What protects a checkpoint beyond models and the latest: the last N, the best N by a metric."""

    keep_last: int = 0
    keep_best: int = 0
    metric: str | None = None
    mode: str | None = None  # "min" / "max" from --min / --max; None: the direction ckpt.metrics finds
    # a retention policy's rules too (ckpt.policy): the first checkpoint at or after each multiple of
    # `keep_every` steps, and the latest of each `keep_interval` seconds counted from the task's creation
    keep_every: int = 0
    keep_interval: int = 0
    mode_from: str = ""  # where `mode` came from when not a flag: "the task's policy", "the workspace's policy"
    protect: frozenset[int] = frozenset()  # kept whatever the rules say: the checkpoints a training loop just saved

    def check(self) -> None:
        if self.keep_last < 0 or self.keep_best < 0 or self.keep_every < 0 or self.keep_interval < 0:
            raise UsageError("--keep-last, --keep-best, --keep-every and --keep-interval take 0 or more")
        if self.keep_best and not self.metric:
            raise UsageError("--keep-best needs --metric", hint="e.g. --keep-best 3 --metric val_iou")
        if self.metric and not self.keep_best:
            raise UsageError("--metric goes with --keep-best N", hint=f"e.g. --keep-best 3 --metric {self.metric}")


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs three times as much, once per checkpoint
class Decision:
    """What the plan does with one checkpoint, and why."""

    number: int
    action: str  # "keep" or "trash"
    reason: str
    size: int


@dataclass(slots=True)
class TrashPlan:
    """What `trash-unused` will do; building it changes nothing. `ckpt.trash.trash_unused` does it."""

    task: Task
    decisions: list[Decision]
    checkpoints: list[Checkpoint]  # the ones to trash, by number
    bytes_freed_on_empty: int
    reason: str
    warnings: list[str] = field(default_factory=list)
    direction: Direction | None = None  # --keep-best's metric: which way is better, and why
    held: Held | None = None  # bytes that stay on disk after emptying because other links hold them

    @property
    def trashed(self) -> list[int]:
        return [cp.number for cp in self.checkpoints]

    @property
    def kept(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "keep"]


@dataclass(slots=True)
class TrashResult:
    """What `trash_unused` did: its plan, and the new entry's id."""

    plan: TrashPlan
    entry: str | None  # None on a dry run or when nothing was unused


@dataclass(slots=True)
class Reasons:
    """Why each checkpoint is used (number -> reasons), and the direction --keep-best ranked by."""

    why: dict[int, list[str]]
    direction: Direction | None = None
    unranked: set[int] = field(default_factory=set)  # without a value of --keep-best's metric: ranked last

    def unused(self, number: int) -> str:
        """The dry run's word for a checkpoint nothing protects."""
        if number in self.unranked and self.direction is not None:
            return f"unused (no {self.direction.metric} value: missing, NaN or infinite, ranked last)"
        return "unused"


def keep_reasons(task: Task, cps: list[Checkpoint], rules: KeepRules, warnings: list[str]) -> Reasons:
    """Why each of `cps` (the task's checkpoints in number order) is used: latest, a model, a keep rule."""
    why: dict[int, list[str]] = {cp.number: [] for cp in cps}
    out = Reasons(why)
    if cps:
        why[cps[-1].number].append("latest")
    for _ in range(3):
        models, model_errors = task.ws.models.read_all()
        # a model removed or renamed by another command between the listing and its reading is no damage:
        # read again (a rename is one step, so the next listing sees the model under its new title)
        if not all(isinstance(e, ModelNotFound) for e in model_errors) or not model_errors:
            break
    if model_errors:  # its checkpoint may be one this would trash: refuse rather than guess
        raise IntegrityError(
            f"a model could not be read, so the checkpoint it came from is not known: {model_errors[0]}; "
            "nothing was trashed",
            hint="fix that model.toml by hand (docs/formats.md) or move its folder out of models/, then run again",
        )
    titles: dict[int, list[str]] = {}
    for m in models:
        if m.task == task.name:
            titles.setdefault(m.checkpoint, []).append(m.title)
    for number, names in sorted(titles.items()):
        if number in why:
            why[number].append("model " + ", ".join(sorted(names)))
    if rules.keep_last:
        for cp in cps[-rules.keep_last :]:
            why[cp.number].append(f"keep-last {rules.keep_last}")
    for number in sorted(rules.protect):
        if number in why:
            why[number].append("just saved")
    if rules.keep_every or rules.keep_interval:
        from .keep import keep_every, keep_interval  # only where one asks for them

        for number, why_kept in (
            *keep_every(cps, rules.keep_every),
            *keep_interval(cps, rules.keep_interval, task.header.created),
        ):
            why[number].append(why_kept)
    if rules.keep_best and rules.metric:
        metric = rules.metric
        if cps:
            require(cps, metric, task.name)
        better = out.direction = task.direction(metric, rules.mode)
        if rules.mode_from and rules.mode is not None:
            better = out.direction = Direction(metric, rules.mode, "policy", rules.mode_from)
        ranked, missing = rank(cps, metric, better.minimize, metrics_of=lambda cp: cp.metrics, tie=lambda cp: cp.number)
        out.unranked = {cp.number for cp in missing}
        for cp in ranked[: rules.keep_best]:
            why[cp.number].append(f"keep-best {rules.keep_best} by {metric} ({cp.metrics[metric]:.4g})")
    return out


def plan_unused(task: Task, rules: KeepRules, reason: str) -> TrashPlan:
    """Decide, for each checkpoint of `task`, keep or trash and why, from one listing of its files. Changes
    nothing (but a killed save's record, taken in as the real run's lock does first)."""
    task.take_in_save()
    state = task.state()
    cps = [state.checkpoints[n] for n in sorted(state.checkpoints)]
    warnings: list[str] = []
    if task.pending_markers():
        warnings.append("an interrupted trash operation on this task will be finished or undone first")
    reasons_of = keep_reasons(task, cps, rules, warnings)
    why = reasons_of.why
    storage = task.ws.storage
    base = f"tasks/{task.name}/"
    files = locate(storage, base, [cp for cp in cps if not why[cp.number]])
    decisions: list[Decision] = []
    trash: list[Checkpoint] = []
    # what emptying the entry would free: each inode once, and only when every link to it goes
    links: dict[object, list[int]] = {}  # inode (or key) -> [links among the files to trash, nlink, size]
    for cp in cps:
        reasons = why[cp.number]
        if not reasons:
            blobs = files.get(cp.file)
            if blobs:
                decisions.append(Decision(cp.number, "trash", reasons_of.unused(cp.number), cp.size))
                trash.append(cp)
                count_links(links, blobs)
                continue
            reasons.append(storage.why_missing(base + cp.file))
        decisions.append(Decision(cp.number, "keep", "; ".join(reasons), cp.size))
    freed = sum(size for n, nlink, size in links.values() if n >= nlink)
    plan = TrashPlan(task, decisions, trash, freed, reason, warnings, reasons_of.direction)
    plan.held = held_by_links(links, state.header.source)
    return plan


def files_of(blobs: list[Blob], base: str) -> dict[str, list[Blob]]:
    """The files under each path relative to `base` in a listing of it: a checkpoint's file (`checkpoints/<name>`,
    or deeper) finds its one file, a folder checkpoint its several."""
    out: dict[str, list[Blob]] = {}
    for b in blobs:
        rel = b.key[len(base) :]
        cut = rel.find("/")
        while cut != -1:
            out.setdefault(rel[:cut], []).append(b)
            cut = rel.find("/", cut + 1)
        out.setdefault(rel, []).append(b)
    return out


def locate(storage: Storage, base: str, cps: list[Checkpoint]) -> dict[str, list[Blob]]:
    """The files of each of `cps` under `base` (a task folder, or an entry's files/), by record file name: one
    listing of checkpoints/, and one per record another tool wrote with its file elsewhere in the folder."""
    listed = files_of(storage.list_prefix(base + CHECKPOINT_DIR + "/"), base)
    out: dict[str, list[Blob]] = {}
    for cp in cps:
        name = plain(cp.file)
        if not name.startswith(CHECKPOINT_DIR + "/"):
            listed.update(files_of(storage.list_prefix(base + name), base))
        if name in listed:
            out[cp.file] = listed[name]
    return out


def plain(file: str) -> str:
    """`file` as a folder names it: without empty or "." parts (a record another tool wrote may have them)."""
    return "/".join(p for p in file.split("/") if p not in ("", "."))


def count_links(links: dict[object, list[int]], blobs: list[Blob]) -> None:
    """Count `blobs` into `links` (inode, or key where the store has none -> [seen, nlink, size])."""
    for b in blobs:
        key = b.inode or b.key
        seen = links.get(key)
        if seen is None:
            links[key] = [1, b.links, b.size]
        else:
            seen[0] += 1


def held_by_links(links: dict[object, list[int]], source: dict[str, str] | None) -> Held | None:
    """What emptying would not free of these files (inode -> [links among them, nlink, size]): the inodes
    that other hard links hold, with the import's source folder when the task was imported by linking."""
    files = held = 0
    for n, nlink, size in links.values():
        if n < nlink:
            files += n
            held += size
    if not files:
        return None
    from .trash_results import Held

    linked = source.get("path") if source and source.get("how") == "link" else None
    return Held(files, held, linked)
