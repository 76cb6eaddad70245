"""Retention policies: which checkpoints of a task to keep, declared once and applied by `trash-unused`.

A policy is the keep rules of `trash-unused` (`ckpt.trash.KeepRules`: keep-last N, keep-best N by a metric,
plus keep-every K steps and keep-interval), stored as a `[policy]` table in `task.toml` (the task's own) or
in `ckpt.toml` (the workspace default; a task's policy replaces it, nothing is merged). Models and the
latest checkpoint are always kept, and a checkpoint is kept when any rule keeps it. Flags on the command
line replace the stored policy for that run: a policy and flags are one mechanism.

A task's policy records its metric's direction, decided by the rules of `ckpt.metrics` when it is set; the
workspace default records it only when given (--min/--max), else each task decides it when it is applied.
After each save of the library (`Task.save`), the task's policy runs on a background thread
(`after_save`): it never trashes the checkpoint just saved nor one a model uses, moves to the trash
(restorable), and a failure is a warning, never an exception in the training loop.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CkptError, ManifestError, UsageError
from .metrics import check_modes, direction, value
from .timeutil import parse_age

if TYPE_CHECKING:
    from .task_base import Task
    from .trash import KeepRules, TrashResult
    from .workspace_base import Workspace

KEYS = ("keep_last", "keep_best", "metric", "mode", "keep_every", "keep_interval")
_UNITS = (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


# the rules keep-every and keep-interval (pure) are in ckpt.keep, below ckpt.trash which applies them
from .keep import interval_text, keep_every, keep_interval  # noqa: E402,F401 (re-exported)


def parse_interval(text: str) -> int:
    """'6h' (45s, 30m, 12h, 7d, 2w) as whole seconds; raises UsageError."""
    seconds = int(parse_age(text) / timedelta(seconds=1))
    if seconds < 1:
        raise UsageError(f"interval {text!r} is under a second", hint="e.g. --keep-interval 6h")
    return seconds


# --- the stored form ------------------------------------------------------------------------------------


def to_doc(rules: KeepRules) -> dict[str, Any]:
    """The `[policy]` table of `rules` (keep_last always written: an empty policy is still a policy; mode only
    when known: a workspace default without --min/--max leaves it to each task)."""
    doc: dict[str, Any] = {"keep_last": rules.keep_last}
    if rules.keep_best:
        doc.update(keep_best=rules.keep_best, metric=rules.metric)
        if rules.mode is not None:
            doc["mode"] = rules.mode
    if rules.keep_every:
        doc["keep_every"] = rules.keep_every
    if rules.keep_interval:
        doc["keep_interval"] = interval_text(rules.keep_interval)
    return doc


def from_doc(doc: Any, where: str, source: str = "") -> KeepRules:
    """The KeepRules of a `[policy]` table read from `where`; raises ManifestError naming what is wrong.

    A key this ckpt does not know is refused rather than ignored: ignoring a keep rule would trash what
    it keeps."""
    from .trash import KeepRules

    def bad(what: str, hint: str | None = None) -> ManifestError:
        return ManifestError(f"{where}: [policy] {what}", path=Path(where), hint=hint or "see: ckpt policy set --help")

    if not isinstance(doc, dict):
        raise bad("is not a table")
    unknown = sorted(set(doc) - set(KEYS))
    if unknown:
        raise bad(f"has unknown key(s) {', '.join(map(repr, unknown))}", hint="upgrade ckpt, or fix the table")
    ints: dict[str, int] = {}
    for key in ("keep_last", "keep_best", "keep_every"):
        v = doc.get(key, 0)
        if type(v) is not int or v < 0:
            raise bad(f"'{key}' must be a whole number of 0 or more, not {v!r}")
        ints[key] = v
    metric, mode = doc.get("metric"), doc.get("mode")
    if ints["keep_best"]:
        if not isinstance(metric, str) or not metric:
            raise bad("'keep_best' needs 'metric'")
        if mode is not None and mode not in ("min", "max"):  # absent: decided per task when applied
            raise bad(f"'mode' must be \"min\" or \"max\" (the direction of '{metric}'), not {mode!r}")
    elif metric is not None or mode is not None:
        raise bad("'metric' and 'mode' go with 'keep_best'")
    interval = doc.get("keep_interval")
    seconds = 0
    if interval is not None:
        if not isinstance(interval, str):
            raise bad(f"'keep_interval' must be a string such as \"6h\", not {interval!r}")
        try:
            seconds = parse_interval(interval)
        except UsageError as e:
            raise bad(f"'keep_interval': {e}") from None
    if not (ints["keep_last"] or ints["keep_best"] or ints["keep_every"] or seconds):
        # as `policy set` refuses it: a policy of no rule would trash all but models and the latest
        raise bad("has no rule that keeps anything", hint="give it a rule (ckpt policy set), or: ckpt policy unset")
    return KeepRules(
        keep_last=ints["keep_last"],
        keep_best=ints["keep_best"],
        metric=metric if ints["keep_best"] else None,
        mode=mode if ints["keep_best"] else None,
        keep_every=ints["keep_every"],
        keep_interval=seconds,
        mode_from=source,
    )


def describe(rules: KeepRules | None) -> str:
    """One line: 'keep-last 3, keep-best 2 by val_loss (lower is better), keep-every 1000 steps; ...'."""
    if rules is None:
        return "no policy: trash-unused keeps models and the latest only"
    parts = []
    if rules.keep_last:
        parts.append(f"keep-last {rules.keep_last}")
    if rules.keep_best:
        if rules.mode is None:
            better = "the direction each task gives it"
        else:
            better = ("lower" if rules.mode == "min" else "higher") + " is better"
        parts.append(f"keep-best {rules.keep_best} by {rules.metric} ({better})")
    if rules.keep_every:
        parts.append(f"keep-every {rules.keep_every} steps")
    if rules.keep_interval:
        parts.append(f"keep-interval {interval_text(rules.keep_interval)}")
    return ", ".join(parts + ["models and the latest always"])


def to_json(rules: KeepRules | None) -> dict[str, Any] | None:
    if rules is None:
        return None
    return {
        "keep_last": rules.keep_last,
        "keep_best": rules.keep_best,
        "metric": rules.metric,
        "direction": rules.mode,
        "keep_every": rules.keep_every,
        "keep_interval": interval_text(rules.keep_interval) if rules.keep_interval else None,
        "keep_interval_seconds": rules.keep_interval,
    }


def rules_of(value: KeepRules | Mapping[str, Any]) -> KeepRules:
    """KeepRules from what a caller gives (KeepRules, or a mapping with the `[policy]` keys; keep_interval
    as text or seconds, mode optional); raises UsageError."""
    from .trash import KeepRules

    if isinstance(value, KeepRules):
        rules = value
    elif isinstance(value, Mapping):
        unknown = sorted(set(value) - set(KEYS))
        if unknown:
            raise UsageError(f"unknown policy key(s) {', '.join(map(repr, unknown))}", hint=f"known: {', '.join(KEYS)}")
        interval = value.get("keep_interval") or 0
        rules = KeepRules(
            keep_last=value.get("keep_last") or 0,
            keep_best=value.get("keep_best") or 0,
            metric=value.get("metric"),
            mode=value.get("mode"),
            keep_every=value.get("keep_every") or 0,
            keep_interval=parse_interval(interval) if isinstance(interval, str) else interval,
        )
    else:
        raise UsageError(f"a policy is a mapping such as {{'keep_last': 3}}, not {value!r}")
    for key in ("keep_last", "keep_best", "keep_every", "keep_interval"):
        n = getattr(rules, key)
        if type(n) is not int:  # never coerced: 2.5 is not 2, True is not 1
            what = "seconds or a text such as '6h'" if key == "keep_interval" else "a whole number"
            raise UsageError(f"policy '{key}' must be {what}, not {n!r}", hint="e.g. {'keep_last': 3}")
    if rules.metric is not None and not isinstance(rules.metric, str):
        raise UsageError(f"policy 'metric' must be a metric's name, not {rules.metric!r}")
    if rules.mode is not None:
        check_modes({rules.metric or "metric": rules.mode})
    rules.check()
    for flag, n in (("keep-last", rules.keep_last), ("keep-best", rules.keep_best), ("keep-every", rules.keep_every)):
        if n >= 2**63:  # stored in TOML, whose integers are 64-bit
            raise UsageError(f"--{flag} {n} is beyond TOML's 64-bit integers", hint=f"use a smaller --{flag}")
    if rules.keep_interval >= 2**63:
        raise UsageError("--keep-interval is beyond TOML's 64-bit integers", hint="use a shorter interval")
    return rules


# --- where policies are kept ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Effective:
    """The policy that applies to a task, and where it came from: "task", "workspace", or None (no policy)."""

    rules: KeepRules | None
    source: str | None


def read_workspace_doc(ws: Workspace) -> dict[str, Any]:
    """`ckpt.toml` as read now (checked as `Workspace.open` checks it): the store's `read_settings`."""
    return ws.read_settings()


def update_workspace_doc(ws: Workspace, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Apply `change` to `ckpt.toml` and write it back whole, one change at a time, everything else kept (the
    store's `update_settings`: a folder's lock and atomic rename, a bucket's If-Match). The new document."""
    return ws.update_settings(change)


def workspace_policy(ws: Workspace, doc: Mapping[str, Any] | None = None) -> KeepRules | None:
    """The workspace's default policy (`ckpt.toml` [policy]), or None."""
    doc = read_workspace_doc(ws) if doc is None else doc
    if "policy" not in doc:
        return None
    return from_doc(doc["policy"], "ckpt.toml", "the workspace's policy")


def task_policy(task: Task) -> KeepRules | None:
    """The task's own policy (`task.toml` [policy]), or None."""
    raw = task.header.policy
    if raw is None:
        return None
    return from_doc(raw, f"tasks/{task.name}/task.toml", "the task's policy")


def effective(ws: Workspace, task_name: str) -> Effective:
    """The policy that applies to `task_name`: its own, else the workspace's, else none."""
    own = task_policy(ws.task(task_name))
    if own is not None:
        return Effective(own, "task")
    default = workspace_policy(ws)
    return Effective(default, "workspace" if default is not None else None)


def _recorded(ws: Workspace, task: Task | None, rules: KeepRules) -> KeepRules:
    """`rules` with keep-best's direction decided now (flag, task, workspace, name) and recorded."""
    rules.check()
    if not rules.keep_best or not rules.metric:
        return replace(rules, metric=None, mode=None, mode_from="")
    if task is not None:
        d = task.direction(rules.metric, rules.mode)
    else:
        # the workspace default: a direction nobody can tell is refused now, but only --min/--max is recorded;
        # without it each task decides when the policy is applied (its metric_modes, then ckpt.toml, the name)
        d = direction(rules.metric, flag=rules.mode, workspace_modes=ws.metric_modes)
        if rules.mode is None:
            return replace(rules, mode=None, mode_from="")
    return replace(rules, mode=d.mode, mode_from="")


def set_policy(ws: Workspace, task_name: str | None, rules: KeepRules | Mapping[str, Any] | None) -> Effective:
    """Store `rules` as the policy of `task_name` (None: the workspace default); None removes it. The metric's
    direction is decided now and recorded. Raises UsageError (bad rules, a direction nobody can tell),
    TaskNotFound, BusyError."""
    task = ws.task(task_name) if task_name is not None else None
    recorded = _recorded(ws, task, rules_of(rules)) if rules is not None else None
    if recorded is not None and not (
        recorded.keep_last or recorded.keep_best or recorded.keep_every or recorded.keep_interval
    ):  # a policy of no rule would trash all but models and the latest after every save: never by accident
        raise UsageError(
            "a policy needs at least one rule (--keep-last, --keep-best, --keep-every, --keep-interval)",
            hint="to remove a policy: ckpt policy unset",
        )
    doc = to_doc(recorded) if recorded is not None else None
    if task is not None:
        if task.header.policy != doc:
            task.set_policy(doc)
        _task_policy.pop((ws.location, task.name), None)
        return Effective(recorded, "task" if recorded is not None else None)

    def change(d: dict[str, Any]) -> None:
        if doc is None:
            d.pop("policy", None)
        else:
            d["policy"] = doc

    update_workspace_doc(ws, change)
    _ws_policy.pop(ws.location, None)
    return Effective(recorded, "workspace" if recorded is not None else None)


# --- applying it -------------------------------------------------------------------------------------------


@dataclass(slots=True)
class TaskOutcome:
    """What applying policies did to one task (`result`), or why not (`skipped`, `error`)."""

    task: str
    source: str | None
    result: TrashResult | None = None
    skipped: str | None = None
    error: CkptError | None = None


def apply(
    ws: Workspace, task_name: str, rules: KeepRules | None = None, *, reason: str = "", dry_run: bool = False
) -> tuple[TrashResult, str | None]:
    """`trash-unused` of `task_name` by `rules` (flags) when given, else by its policy (else models and the
    latest only). Returns the result and where the rules came from ("flags", "task", "workspace", None)."""
    from .trash import KeepRules, trash_unused

    if rules is not None:
        return trash_unused(ws, task_name, rules, reason=reason, dry_run=dry_run), "flags"
    eff = effective(ws, task_name)
    return trash_unused(ws, task_name, eff.rules or KeepRules(), reason=reason, dry_run=dry_run), eff.source


def apply_all(ws: Workspace, *, reason: str = "", dry_run: bool = False) -> list[TaskOutcome]:
    """Apply each task's policy (its own, else the workspace's) across the workspace; a task without one is
    skipped and named, an error on one task is kept and the others go on."""
    from .trash import trash_unused

    default_error: CkptError | None = None
    try:
        default = workspace_policy(ws)
    except CkptError as e:
        default, default_error = None, e
    outcomes: list[TaskOutcome] = []
    for name in ws.task_names():
        try:
            own = task_policy(ws.task(name))
            rules, source = (own, "task") if own is not None else (default, "workspace" if default else None)
            if rules is None:
                if default_error is not None:
                    raise default_error
                outcomes.append(TaskOutcome(name, None, skipped="no policy (see: ckpt policy set)"))
                continue
            res = trash_unused(ws, name, rules, reason=reason, dry_run=dry_run)
            outcomes.append(TaskOutcome(name, source, result=res))
        except CkptError as e:
            outcomes.append(TaskOutcome(name, None, error=e))
    return outcomes


# --- in the background, after each save -------------------------------------------------------------------


class _Worker:
    """One background thread per task (per process) that applies its policy after saves, one run at a time:
    saves that come while a run is queued are folded into it (it reads the manifest when it starts)."""

    def __init__(self, location: str, task: str, opener: Callable[[str], Workspace]):
        self.location, self.task, self.opener = location, task, opener
        self.jobs: queue.Queue[tuple[int, frozenset[int]] | None] = queue.Queue()
        self.pending = 0  # saves not yet covered by a finished run
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name=f"ckpt-policy-{task}", daemon=True)
        self.thread.start()

    def submit(self, number: int, keep: frozenset[int]) -> None:
        with self.cond:
            self.pending += 1
        self.jobs.put((number, keep))

    def wait(self) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.pending == 0)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            newest, done = job, 1
            while True:  # fold in the saves queued meanwhile: one run covers them all
                try:
                    more = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.jobs.put(None)
                    break
                if more[0] >= newest[0]:
                    newest = more
                done += 1
            # only the newest save (and what its caller keeps, e.g. the Trainer's best) is protected: the saves
            # folded into this run are older ones the policy decides on, so that after wait() the task conforms
            try:
                _apply_after_save(self.opener, self.location, self.task, newest[0], set(newest[1]))
            except BaseException as e:  # a policy error is a warning: the training loop goes on
                with contextlib.suppress(Exception):  # warnings turned into errors must not end this thread
                    warnings.warn(
                        f"ckpt: the retention policy of task '{self.task}' was not applied: {e}",
                        RuntimeWarning,
                        stacklevel=1,
                    )
            finally:
                with self.cond:
                    self.pending -= done
                    self.cond.notify_all()


_workers: dict[tuple[str, str], _Worker] = {}
_workers_lock = threading.Lock()
_at_exit = False


_warned_metric: set[tuple[str, str, str]] = set()  # (location, task, metric) warned about as recorded nowhere


def _apply_after_save(
    opener: Callable[[str], Workspace], location: str, task_name: str, number: int, keep: set[int]
) -> None:
    from .trash import trash_unused

    ws = opener(location)  # its own handles: the training thread's task object is not shared
    eff = effective(ws, task_name)
    if eff.rules is None:
        return
    task_cps = ws.task(task_name).checkpoints
    rules = replace(eff.rules, protect=frozenset({number, *keep}))
    if rules.keep_best and rules.metric and not any(value(cp.metrics, rules.metric) is not None for cp in task_cps):
        # no checkpoint has the metric yet (saves before the first validation): that rule keeps none of them,
        # as it would rank them last; said here rather than warned about at every save. But when checkpoints
        # record other metrics and never this one, its name is likely wrong (trash-unused refuses it): warned
        # once per task and metric in this process
        known = sorted({k for cp in task_cps for k in cp.metrics})
        key = (location, task_name, rules.metric)
        if known and rules.metric not in known and key not in _warned_metric:
            _warned_metric.add(key)
            warnings.warn(
                f"ckpt: the retention policy of task '{task_name}' keeps the best by '{rules.metric}', which no "
                f"checkpoint records (they record {', '.join(known)}): keep-best keeps none, as `ckpt trash-unused` "
                "would refuse it; fix the metric's name (ckpt policy set) or log it",
                RuntimeWarning,
                stacklevel=1,
            )
        rules = replace(rules, keep_best=0, metric=None, mode=None)
    trash_unused(ws, task_name, rules, reason=f"retention policy ({eff.source}) after saving checkpoint {number}")


def after_save(task: Task, number: int, keep: Iterable[int] = ()) -> None:
    """Apply the task's policy (its own, else the workspace's) in the background after `number` was saved;
    that run keeps `number` and `keep` whatever the policy says.

    Never raises: a policy that cannot be read is a warning."""
    try:
        if not _task_has_policy(task) and not _workspace_has_policy(task.ws):
            return
    except Exception as e:
        warnings.warn(f"ckpt: the retention policy of task '{task.name}' could not be read: {e}", stacklevel=4)
        return
    key = (task.ws.location, task.name)
    global _at_exit
    with _workers_lock:
        worker = _workers.get(key)
        if worker is None:
            worker = _workers[key] = _Worker(*key, type(task.ws).open)  # the same store, its own handles
        if not _at_exit:
            atexit.register(wait_all)
            _at_exit = True
    worker.submit(number, frozenset(keep))


def wait(task: Task) -> None:
    """Wait until the policy runs queued by this process's saves into `task` are done."""
    with _workers_lock:
        worker = _workers.get((task.ws.location, task.name))
    if worker is not None:
        worker.wait()


def wait_all() -> None:
    with _workers_lock:
        workers = list(_workers.values())
    for w in workers:
        w.wait()


_task_policy: dict[tuple[str, str], bool] = {}  # a bucket's tasks: whether each has a policy, read once


def _task_has_policy(task: Task) -> bool:
    """Whether the task's manifest has a [policy]: read afresh in a folder (a stat when unchanged); once per
    process in a bucket, where reading it again after every save would cost requests (a policy set by this
    process is seen at once; one set elsewhere, by the next process)."""
    if not task.ws.remote:
        return task.header.policy is not None
    key = (task.ws.location, task.name)
    if key not in _task_policy:
        _task_policy[key] = task.header.policy is not None
    return _task_policy[key]


_ws_policy: dict[str, tuple[Any, bool]] = {}  # location -> (what says whether ckpt.toml changed, has a policy)


def _workspace_has_policy(ws: Workspace) -> bool:
    """Whether `ckpt.toml` has a [policy]: read again when its stat changes (a folder); once per process in a
    bucket (a policy set there while a run trains is seen by its next process)."""
    key = ws.location
    if ws.remote:
        if key not in _ws_policy:
            _ws_policy[key] = (None, "policy" in read_workspace_doc(ws))
        return _ws_policy[key][1]
    st = os.stat(ws.root / "ckpt.toml")
    mark = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    known = _ws_policy.get(key)
    if known is None or known[0] != mark:
        known = _ws_policy[key] = (mark, "policy" in read_workspace_doc(ws))
    return known[1]
