"""Manifests: the TOML files that are the source of truth (read incrementally by task_reader.py).

Formats (documented in docs/formats.md):
- `ckpt.toml`: `format`, optional `[settings]`.
- `tasks/<task>/task.toml`: a header (`format`, `name`, `status`, `created`, ...) followed by one
  `[[checkpoints]]` table per checkpoint. Saving appends a table; only status changes and the trash
  rewrite the file (atomically).
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any

import tomli_w

from . import fsutil
from .errors import CkptError, ManifestError

FORMAT = 1
LOG_FORMAT = 2  # a bucket task manifest with an open log beside it (ckpt.store_log): older ckpts must refuse it
# a task manifest with a [policy] table (ckpt.policy): a ckpt that knows none would drop it when rewriting the file
POLICY_FORMAT = 3
# a bucket task manifest naming segment objects (ckpt.store_segments): a ckpt that knows none would drop their records
SEGMENT_FORMAT = 4
SEGMENT_ID = re.compile(r"[0-9a-f]{16}")
_TASK_FILE = "task.toml"  # workspace.TASK_FILE (which imports this module)
_CHECKPOINT_DIR = "checkpoints"  # workspace.CHECKPOINT_DIR
# the task folder's own hidden files (workspace.py)
_OWN_PREFIXES = (".lock", ".pending-", ".task.", ".import-", ".importing-")
# the files ckpt names itself (checkpoints/000007.pt): valid, and never inside another record's folder
_PLAIN_FILE = re.compile(r"checkpoints/[0-9]{6,}[A-Za-z0-9_.\-]*")
_PLAIN_FILES = re.compile(r"(?:checkpoints/[0-9]{6,}[A-Za-z0-9_.\-]*\n)*")  # many, each ending in a newline


def all_plain(files: list[str]) -> bool:
    """Whether every one of `files` (strings) is a plain name of ckpt's: one regex over them all, not one per file."""
    return _PLAIN_FILES.fullmatch("\n".join(files) + "\n" if files else "") is not None


STATUSES = ("running", "finished", "failed")


def parse_toml(data: bytes | str, path: Path) -> dict[str, Any]:
    """Parse TOML text, turning every failure (tomllib also raises RecursionError, ValueError) into ManifestError."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return tomllib.loads(text)
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text", path=path) from None
    except (tomllib.TOMLDecodeError, RecursionError, ValueError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ManifestError(f"{path}: not valid TOML ({msg})", path=path) from None


def read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        data = fsutil.read_own(path)
    except FileNotFoundError:
        raise ManifestError(f"{what} manifest {path} is missing", path=path) from None
    except IsADirectoryError:
        raise ManifestError(f"{what} manifest {path} is a directory", path=path) from None
    except CkptError:
        raise  # a FIFO or device in its place (NotRegularFile is an OSError too)
    except OSError as e:
        raise ManifestError(f"cannot read {path}: {e.strerror}", path=path) from None
    if not data.strip():
        raise ManifestError(f"{what} manifest {path} is empty", path=path)
    return parse_toml(data, path)


MAX_NESTING = 32  # tables and arrays in a value; ckpt's own formats nest 3 deep


def check_nesting(value: Any, path: Path, where: str) -> None:
    """Raise ManifestError when `value` nests tables and arrays more than MAX_NESTING deep (a 300-deep array
    parses, but every recursive walk of it, writing the manifest back included, hits Python's recursion limit)."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            if depth >= MAX_NESTING:
                raise ManifestError(
                    f"{path}: {where} nests more than {MAX_NESTING} levels deep",
                    path=path,
                    hint="ckpt's formats nest a few levels at most: fix the file by hand",
                )
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))


def check_format(doc: dict[str, Any], path: Path, newest: int = FORMAT) -> int:
    version = doc.get("format")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ManifestError(f"{path}: 'format' must be an integer, got {version!r}", path=path)
    if version > newest:
        raise ManifestError(
            f"{path}: format {version} is newer than this ckpt understands ({newest})",
            path=path,
            hint="upgrade ckpt",
        )
    if version < 1:
        raise ManifestError(f"{path}: unknown format {version}", path=path)
    return version


def workspace_doc(doc: dict[str, Any], path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The `[settings]` and `[metrics]` (metric -> "min" | "max") tables of a parsed `ckpt.toml`."""
    check_format(doc, path)
    check_nesting(doc, path, "a value")
    settings = _get(doc, "settings", dict, path, "", required=False) or {}
    modes = _get(doc, "metrics", dict, path, "", required=False) or {}
    for k, v in modes.items():
        if v not in ("min", "max"):
            raise ManifestError(
                f'{path}: [metrics] \'{k}\' must be "min" or "max"', path=path, hint=f'e.g. {k} = "min"'
            )
    return settings, {str(k): str(v) for k, v in modes.items()}


def drop_none(value: Any) -> Any:
    """tomli-w has no null: drop None from dicts (recursively) before writing."""
    if isinstance(value, dict):
        return {k: drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_none(v) for v in value if v is not None]
    return value


def dumps(doc: dict[str, Any]) -> bytes:
    try:
        return tomli_w.dumps(drop_none(doc)).encode("utf-8")
    except RecursionError:  # values read are checked (check_nesting): one given by a caller may be deeper
        raise ManifestError(f"a value nests too deeply to be written (more than {MAX_NESTING} levels)") from None


# --- typed getters ------------------------------------------------------------------------------


def _get(
    doc: dict[str, Any], key: str, types: type | tuple[type, ...], path: Path, where: str, required: bool = True
) -> Any:
    if key not in doc:
        if required:
            raise ManifestError(f"{path}: {where}missing '{key}'", path=path)
        return None
    value = doc[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ManifestError(f"{path}: {where}'{key}' has the wrong type (bool)", path=path)
    if not isinstance(value, types):
        raise ManifestError(f"{path}: {where}'{key}' has the wrong type ({type(value).__name__})", path=path)
    return value


# --- checkpoints ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Checkpoint:
    """One saved state of a task, as its record in the task manifest says."""

    number: int
    file: str  # relative to the task folder, e.g. "checkpoints/000007.pt"
    size: int
    sha256: str
    created: str
    step: int | None = None
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    original_name: str | None = None
    task: str = ""

    def to_record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "number": self.number,
            "file": self.file,
            "step": self.step,
            "epoch": self.epoch,
            "size": self.size,
            "sha256": self.sha256,
            "created": self.created,
            "original_name": self.original_name,
        }
        if self.metrics:
            rec["metrics"] = dict(self.metrics)
        return {k: v for k, v in rec.items() if v is not None}

    @classmethod
    def from_record(cls, rec: Any, path: Path, task: str) -> Checkpoint:
        if not isinstance(rec, dict):
            raise ManifestError(f"{path}: a [[checkpoints]] entry is not a table", path=path)
        number = _get(rec, "number", int, path, "checkpoint: ")
        where = f"checkpoint {number}: "
        if number < 1:
            raise ManifestError(f"{path}: {where}'number' must be at least 1", path=path)
        file = _get(rec, "file", str, path, where)
        problem = record_file_problem(file)
        if problem is not None:
            raise ManifestError(f"{path}: {where}'file' {problem}", path=path, hint=REPAIR_HINT)
        metrics = _get(rec, "metrics", dict, path, where, required=False) or {}
        for k, v in metrics.items():
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ManifestError(f"{path}: {where}metric '{k}' is not a number", path=path)
            if isinstance(v, int) and not -(2**63) <= v < 2**63:
                raise ManifestError(f"{path}: {where}metric '{k}' is beyond TOML's 64-bit integers", path=path)
        return cls(
            number=number,
            file=file,
            size=_get(rec, "size", int, path, where),
            sha256=_get(rec, "sha256", str, path, where),
            created=_get(rec, "created", str, path, where),
            step=_get(rec, "step", int, path, where, required=False),
            epoch=_get(rec, "epoch", int, path, where, required=False),
            metrics={str(k): v for k, v in metrics.items()},
            original_name=_get(rec, "original_name", str, path, where, required=False),
            task=task,
        )


REPAIR_HINT = "see: ckpt doctor --dry-run (ckpt doctor --drop-bad-records drops such records)"


def record_file_problem(file: str) -> str | None:
    """Why `file` cannot be a checkpoint record's file (a path relative to the task folder), or None when it can.

    It must be a relative path (no `/` at the start, no `..` part, no `\\` or NUL) naming something inside
    the task folder that is not the task's own structure: the folder itself, the manifest, `checkpoints/`, a
    lock, cache or marker of ckpt's (`./checkpoints` and `checkpoints/` are `checkpoints/` too: see
    `file_key`). The same rule as a name typed by a user: the manifest is other people's input.
    """
    if _PLAIN_FILE.fullmatch(file):
        return None
    if file.startswith("/") or "\\" in file or "\0" in file:
        return f"({_shown(file)}) must stay inside the task folder"
    if any(c < " " or c == "\x7f" for c in file):  # a newline in a name would split every message naming it
        return f"({_shown(file)}) holds a control character"
    if ".." in file.split("/"):
        return f"({_shown(file)}) must stay inside the task folder"
    key = file_key(file)
    first = key.partition("/")[0]
    if key in ("", _CHECKPOINT_DIR) or first == _TASK_FILE or first.startswith(_OWN_PREFIXES):
        # the task folder's own structure: itself, its manifest, checkpoints/, a lock, cache or marker
        return (
            f"({_shown(file)}) must name a checkpoint inside the task folder, not the folder itself or one of "
            f"ckpt's own files ({key or '.'!r})"
        )
    return None


def file_key(file: str) -> str:
    """`file` as the file system resolves it, without empty and `.` parts (`./checkpoints//1.pt/` is
    `checkpoints/1.pt`): two records with one key name one file."""
    if _PLAIN_FILE.fullmatch(file):
        return file
    return "/".join(p for p in file.split("/") if p not in ("", "."))


def _shown(value: str) -> str:
    return repr(value if len(value) <= 60 else value[:57] + "...")


def check_files(cps: Iterable[Checkpoint], path: Path) -> None:
    """Refuse (ManifestError naming both) two records of one file, or a record inside another's folder."""
    cps = list(cps)
    files = list(map(attrgetter("file"), cps))
    if len(set(files)) == len(files) and all_plain(files):
        return  # distinct plain names: none can be another's, nor inside another's folder
    seen: dict[str, int] = {}
    odd: list[tuple[Checkpoint, str]] = []
    for cp in cps:
        key = file_key(cp.file)
        other = seen.setdefault(key, cp.number)
        if other != cp.number:
            raise ManifestError(
                f"{path}: checkpoints {other} and {cp.number} both name the file {_shown(key)}",
                path=path,
                hint=REPAIR_HINT,
            )
        if key is not cp.file or not _PLAIN_FILE.fullmatch(key):
            odd.append((cp, key))
    for cp, key in odd:  # only such a file can be inside another's folder: a plain one's only parent is checkpoints/
        parent = key
        while "/" in parent:
            parent = parent.rpartition("/")[0]
            holder = seen.get(parent)
            if holder is not None:
                raise ManifestError(
                    f"{path}: checkpoint {cp.number}'s file {_shown(cp.file)} is inside checkpoint {holder}'s "
                    f"{_shown(parent)}",
                    path=path,
                    hint=REPAIR_HINT,
                )


def record_bytes(cp: Checkpoint) -> bytes:
    """The TOML text appended to a task manifest for one checkpoint."""
    return b"\n" + dumps({"checkpoints": [cp.to_record()]})


def metric_json(value: float) -> float | None:
    """JSON has no NaN or infinity: such metrics become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --- the task manifest -----------------------------------------------------------------------------


@dataclass(slots=True)
class TaskHeader:
    name: str
    status: str
    created: str
    finished: str | None = None
    last_number: int = 0
    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    # metric name -> "min" | "max": which way is better, as the library or an import recorded it
    metric_modes: dict[str, str] = field(default_factory=dict)
    # where an imported task's files came from and how: {"path": "/abs/run", "how": "link" | "copy" | "move"}
    source: dict[str, str] | None = None
    # object storage only (ckpt.store): the ids of the last commits (a retried commit whose first attempt
    # landed finds its own id here), and the trash entries whose records this manifest dropped while the
    # entry is not yet complete (a "pending" entry named here took its checkpoints; one not named did not)
    commits: list[str] = field(default_factory=list)
    trashing: list[str] = field(default_factory=list)
    # object storage only (ckpt.store_log): whether records may be in log objects beside the manifest (then
    # `format` is LOG_FORMAT), and the numbers of the log objects the last fold took in (readers skip them)
    log: bool = False
    folded: list[int] = field(default_factory=list)
    # object storage only (ckpt.store_segments): the segment objects holding records, each (first number, last
    # number, records, id) (then `format` is SEGMENT_FORMAT), and the ids of those the last commit replaced
    segments: list[tuple[int, int, int, str]] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    # the task's retention policy, the [policy] table as written (parsed and checked by ckpt.policy)
    policy: dict[str, Any] | None = None

    def note_import(self, metric_modes: dict[str, str], source: dict[str, str] | None) -> bool:
        """Add what an import found: the directions of metrics the task has not recorded yet (one it has is
        kept) and, when given, where the files came from. Returns whether that changed the header; the
        dicts are replaced, never changed in place."""
        new = {k: v for k, v in metric_modes.items() if k not in self.metric_modes}
        changed = bool(new) or (source is not None and source != self.source)
        if new:
            self.metric_modes = {**self.metric_modes, **new}
        if source is not None:
            self.source = dict(source)
        return changed

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": _format(bool(self.segments), bool(self.policy), self.log),
            "name": self.name,
            "status": self.status,
            "created": self.created,
            "finished": self.finished,
            "last_number": self.last_number,
        }
        if self.arch is not None:
            # JSON inside TOML: keyword arguments round-trip exactly, None included (TOML has no null)
            doc["arch"] = {"factory": self.arch, "kwargs": json.dumps(self.arch_kwargs or {}, sort_keys=True)}
        if self.settings:
            doc["settings"] = self.settings
        if self.metric_modes:
            doc["metric_modes"] = dict(self.metric_modes)
        if self.source:
            doc["source"] = dict(self.source)
        if self.commits:
            doc["commits"] = list(self.commits)
        if self.trashing:
            doc["trashing"] = list(self.trashing)
        if self.log:
            doc["log"] = True
        if self.folded:
            doc["folded"] = list(self.folded)
        if self.segments:
            doc["segments"] = [list(s) for s in self.segments]
        if self.retired:
            doc["retired"] = list(self.retired)
        if self.policy:
            doc["policy"] = dict(self.policy)
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any], path: Path) -> TaskHeader:
        log = doc.get("log") is True
        check_format(doc, path, _format("segments" in doc, "policy" in doc, log))
        segments = _segments(doc, path)
        policy = _get(doc, "policy", dict, path, "", required=False)
        check_nesting(policy, path, "'policy'")
        folded = _get(doc, "folded", list, path, "", required=False) or []
        if not all(type(n) is int for n in folded):
            raise ManifestError(f"{path}: 'folded' must be a list of integers", path=path)
        status = _get(doc, "status", str, path, "")
        if status not in STATUSES:
            raise ManifestError(f"{path}: unknown status {status!r} (expected one of {', '.join(STATUSES)})", path=path)
        arch = arch_kwargs = None
        if "arch" in doc:
            a = _get(doc, "arch", dict, path, "")
            arch = _get(a, "factory", str, path, "arch: ")
            raw = _get(a, "kwargs", (str, dict), path, "arch: ", required=False)
            if isinstance(raw, str):
                try:
                    arch_kwargs = json.loads(raw)
                except ValueError:
                    raise ManifestError(f"{path}: arch: 'kwargs' is not a JSON object", path=path) from None
            else:
                arch_kwargs = raw
            if arch_kwargs is not None and not isinstance(arch_kwargs, dict):
                raise ManifestError(f"{path}: arch: 'kwargs' is not a JSON object", path=path)
        last = _get(doc, "last_number", int, path, "", required=False) or 0
        modes = _get(doc, "metric_modes", dict, path, "", required=False) or {}
        for k, v in modes.items():
            if v not in ("min", "max"):
                raise ManifestError(f'{path}: metric_modes: \'{k}\' must be "min" or "max"', path=path)
        check_nesting(arch_kwargs, path, "arch: 'kwargs'")
        settings = _get(doc, "settings", dict, path, "", required=False) or {}
        check_nesting(settings, path, "'settings'")
        source = _get(doc, "source", dict, path, "", required=False)
        if source is not None and not all(isinstance(v, str) for v in source.values()):
            raise ManifestError(f"{path}: source: every value must be a string", path=path)
        return cls(
            name=_get(doc, "name", str, path, ""),
            status=status,
            created=_get(doc, "created", str, path, ""),
            finished=_get(doc, "finished", str, path, "", required=False),
            last_number=last,
            arch=arch,
            arch_kwargs=arch_kwargs,
            settings=settings,
            metric_modes={str(k): str(v) for k, v in modes.items()},
            source={str(k): str(v) for k, v in source.items()} if source is not None else None,
            commits=_ids(doc, "commits", path),
            trashing=_ids(doc, "trashing", path),
            log=log,
            folded=list(folded),
            segments=segments,
            retired=_ids(doc, "retired", path),
            policy=dict(policy) if policy else None,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "created": self.created,
            "finished": self.finished,
            "last_number": self.last_number,
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "settings": self.settings,
            "metric_modes": self.metric_modes,
            "source": self.source,
            "commits": self.commits,
            "trashing": self.trashing,
            "log": self.log,
            "folded": self.folded,
            "segments": self.segments,
            "retired": self.retired,
            "policy": self.policy,
        }


def _format(segments: bool, policy: bool, log: bool) -> int:
    """The format a task manifest holding these says: the newest of what it needs a ckpt to understand."""
    return SEGMENT_FORMAT if segments else POLICY_FORMAT if policy else LOG_FORMAT if log else FORMAT


def _segments(doc: dict[str, Any], path: Path) -> list[tuple[int, int, int, str]]:
    raw = _get(doc, "segments", list, path, "", required=False) or []
    out: list[tuple[int, int, int, str]] = []
    for s in raw:
        ok = isinstance(s, list) and len(s) == 4 and all(type(v) is int for v in s[:3]) and isinstance(s[3], str)
        if not ok or not (1 <= s[0] <= s[1] and 1 <= s[2] <= s[1] - s[0] + 1 and SEGMENT_ID.fullmatch(s[3])):
            raise ManifestError(
                f"{path}: 'segments' must hold [first, last, records, id] entries, got {s!r}", path=path
            )
        out.append((s[0], s[1], s[2], s[3]))
    if len({s[3] for s in out}) != len(out):
        raise ManifestError(f"{path}: 'segments' names a segment twice", path=path)
    return out


def _ids(doc: dict[str, Any], key: str, path: Path) -> list[str]:
    ids = _get(doc, key, list, path, "", required=False) or []
    if not all(isinstance(i, str) for i in ids):
        raise ManifestError(f"{path}: '{key}' must be a list of strings", path=path)
    return list(ids)


@dataclass(slots=True)
class TaskState:
    """A parsed task manifest: its header and its checkpoints by number."""

    header: TaskHeader
    checkpoints: dict[int, Checkpoint]

    @property
    def max_number(self) -> int:
        return max(self.header.last_number, max(self.checkpoints, default=0))


def parse_task(data: bytes, path: Path, task: str) -> TaskState:
    doc = parse_toml(data, path)
    header = TaskHeader.from_doc(doc, path)
    return TaskState(header, records_in(doc, path, task))


def salvage_task(data: bytes, path: Path, task: str) -> tuple[TaskState, list[tuple[int | None, str]]]:
    """The manifest's header and the records that can stay, and (number, problem) of each record that cannot:
    one that does not pass `Checkpoint.from_record`, a number recorded twice, a second record of one file (the
    one whose file name carries its number stays, else the lowest number), a record inside another's folder.

    `last_number` keeps the highest number seen, dropped records included: a number is never given again.
    Raises ManifestError when the TOML or the header itself is broken (nothing to salvage).
    """
    doc = parse_toml(data, path)
    header = TaskHeader.from_doc(doc, path)
    records = _get(doc, "checkpoints", list, path, "", required=False) or []
    kept: dict[int, Checkpoint] = {}
    dropped: list[tuple[int | None, str]] = []
    highest = header.last_number
    for rec in records:
        number = rec.get("number") if isinstance(rec, dict) else None
        number = number if type(number) is int else None
        highest = max(highest, number or 0)
        try:
            cp = Checkpoint.from_record(rec, path, task)
        except ManifestError as e:
            dropped.append((number, e.message.removeprefix(f"{path}: ")))
            continue
        if cp.number in kept:
            dropped.append((cp.number, f"checkpoint {cp.number} is recorded twice (the first record stays)"))
            continue
        kept[cp.number] = cp
    by_key: dict[str, list[Checkpoint]] = {}
    for cp in kept.values():
        by_key.setdefault(file_key(cp.file), []).append(cp)
    for key, cps in by_key.items():
        if len(cps) > 1:
            own = [cp for cp in cps if key.rpartition("/")[2].startswith(f"{cp.number:06d}")]
            stays = min(own or cps, key=attrgetter("number"))
            for cp in cps:
                if cp is not stays:
                    dropped.append((cp.number, f"it names the file of checkpoint {stays.number} ({_shown(key)})"))
                    del kept[cp.number]
            by_key[key] = [stays]
    for cp in list(kept.values()):
        parent = file_key(cp.file)
        while "/" in parent:
            parent = parent.rpartition("/")[0]
            if parent in by_key:
                holder = by_key[parent][0].number
                dropped.append((cp.number, f"its file is inside checkpoint {holder}'s {_shown(parent)}"))
                del kept[cp.number]
                break
    header.last_number = max(highest, max(kept, default=0))
    return TaskState(header, kept), dropped


def records_in(doc: dict[str, Any], path: Path, task: str) -> dict[int, Checkpoint]:
    """The `[[checkpoints]]` of a parsed manifest (or of the bytes appended to one) by number; raises ManifestError."""
    out: dict[int, Checkpoint] = {}
    for rec in _get(doc, "checkpoints", list, path, "", required=False) or []:
        cp = Checkpoint.from_record(rec, path, task)
        if cp.number in out:
            raise ManifestError(f"{path}: checkpoint {cp.number} is recorded twice", path=path, hint=REPAIR_HINT)
        out[cp.number] = cp
    check_files(list(out.values()), path)
    return out


def task_bytes(state: TaskState) -> bytes:
    """The whole manifest of `state`, with a fresh `revision` (see TaskReader: every full write gets its own)."""
    header = state.header.to_doc()
    doc: dict[str, Any] = {"format": header.pop("format"), "revision": os.urandom(8).hex(), **header}
    doc["last_number"] = state.max_number
    if state.checkpoints:  # an empty inline array would make appended [[checkpoints]] tables invalid
        doc["checkpoints"] = [state.checkpoints[n].to_record() for n in sorted(state.checkpoints)]
    return dumps(doc)


# the JSON caches' columns (task_reader.py): Checkpoint's fields in order, less `task` (the reader's)
COLUMNS = ("number", "file", "size", "sha256", "created", "step", "epoch", "metrics", "original_name")
