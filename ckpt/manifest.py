"""Manifests: the TOML files that are the source of truth, and the JSON cache derived from them.

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
import sys
import tomllib
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import chain, repeat
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


def _all_plain(files: list[str]) -> bool:
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
    if len(set(files)) == len(files) and _all_plain(files):
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
    cps = _get(doc, "checkpoints", list, path, "", required=False) or []
    return TaskState(header, _index(cps, path, task))


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


def _index(records: list[Any], path: Path, task: str) -> dict[int, Checkpoint]:
    out: dict[int, Checkpoint] = {}
    for rec in records:
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


# --- incremental reading with a derived cache -----------------------------------------------------

_FINGERPRINT = 64
_HEAD = 128  # the first bytes kept: `format` and `revision` come first in every manifest ckpt writes
_REVISION = b'\nrevision = "'
CACHE_VERSION = 6  # 6: the header may hold a [policy]; an older ckpt must not take it from a cache without one


@dataclass(slots=True)
class _Seen:
    ino: int
    size: int
    tail: bytes  # the last 64 bytes read
    crc: int  # CRC-32 of the first `size` bytes
    head: bytes  # the first 128 bytes (fewer in a smaller file)
    mtime: int = -1  # st_mtime_ns and st_ctime_ns when it was read: a same-size edit in place changes them
    ctime: int = -1


def _same_prefix(fd: int, seen: _Seen) -> bool:
    """Whether the open manifest's first `seen.size` bytes are still those `seen` describes (same inode assumed).

    A manifest that ckpt wrote whole has a random `revision` near its start, new at every such write, and
    appends never touch it: the same first bytes and the same last bytes mean the same file, checked in
    two small reads. A manifest without one (written by another tool) is checked by the CRC-32 of all
    those bytes.
    """
    if len(seen.head) > seen.size or len(seen.tail) > seen.size:
        return False  # not what a read of `size` bytes gives (a damaged or lying cache)
    if os.pread(fd, len(seen.head), 0) != seen.head:
        return False
    if os.pread(fd, len(seen.tail), seen.size - len(seen.tail)) != seen.tail:
        return False
    if _REVISION in seen.head:
        return True
    prefix = TaskReader._read_from(fd, 0, seen.size)
    return len(prefix) == seen.size and zlib.crc32(prefix) == seen.crc


class TaskReader:
    """Reads a task manifest, re-parsing only what was appended since the last read.

    Saving appends `[[checkpoints]]` tables, and every other change replaces the file, so a file with
    the same inode whose bytes up to the size we saw are unchanged only grew: parsing the appended
    bytes alone is enough. The inode and the last bytes alone do not show "unchanged": a replacement
    often gets the inode number its predecessor freed, and a manifest rewritten with other records of
    the same total length ends with the same latest record (a trash and a restore in turn did this,
    and the stale state went into the next rewrite: records lost). So every whole write carries a
    new random `revision`, and `_same_prefix` compares the first bytes too. The JSON cache next to
    the manifest holds the same state between processes; it is never the source of truth.
    """

    def __init__(self, manifest: Path, cache: Path | None, task: str):
        self.manifest = manifest
        self.cache = cache
        self.task = task
        self.state: TaskState | None = None
        self._seen: _Seen | None = None
        self._changed = False

    def read(self, use_cache: bool = True) -> TaskState:
        try:
            fd = fsutil.open_own(self.manifest)
        except FileNotFoundError:
            raise ManifestError(f"task manifest {self.manifest} is missing", path=self.manifest) from None
        except CkptError:
            raise  # a FIFO or device in its place (NotRegularFile is an OSError too)
        except OSError as e:
            raise ManifestError(f"cannot read {self.manifest}: {e.strerror}", path=self.manifest) from None
        try:
            st = os.fstat(fd)
            if self.state is None and use_cache and self.cache is not None:
                self._load_cache()
            seen = self._seen
            if self.state is not None and seen is not None and seen.ino == st.st_ino and st.st_size >= seen.size:
                # the same size with another mtime or ctime is an edit in place (or a touch): read it all again
                edited = st.st_size == seen.size and (st.st_mtime_ns, st.st_ctime_ns) != (seen.mtime, seen.ctime)
                if not edited and _same_prefix(fd, seen):
                    if st.st_size == seen.size:
                        return self.state
                    grown = self._read_from(fd, seen.size)
                    self._extend(grown, st, seen.size + len(grown))
                    return self.state
            data = self._read_from(fd, 0)
        finally:
            os.close(fd)
        if not data.strip():
            raise ManifestError(f"task manifest {self.manifest} is empty", path=self.manifest)
        self.state = None  # a manifest that does not parse leaves nothing of an older read behind
        self._seen = None
        state = parse_task(data, self.manifest, self.task)
        self.state = state
        self._seen = _Seen(
            st.st_ino, len(data), data[-_FINGERPRINT:], zlib.crc32(data), data[:_HEAD], st.st_mtime_ns, st.st_ctime_ns
        )
        self._changed = True
        return state

    @staticmethod
    def _read_from(fd: int, offset: int, end: int | None = None) -> bytes:
        """The bytes from `offset` to the end of the file (or to `end`)."""
        chunks = []
        while end is None or offset < end:
            b = os.pread(fd, 1 << 20 if end is None else min(1 << 20, end - offset), offset)
            if not b:
                break
            chunks.append(b)
            offset += len(b)
        return b"".join(chunks)

    def _extend(self, grown: bytes, st: os.stat_result, size: int) -> None:
        assert self.state is not None and self._seen is not None
        doc = parse_toml(grown, self.manifest)
        if set(doc) - {"checkpoints"}:
            # something other than appended checkpoints: read it all again
            self.state = None
            self._seen = None
            self.read(use_cache=False)
            return
        new = _index(_get(doc, "checkpoints", list, self.manifest, "", required=False) or [], self.manifest, self.task)
        for n in new:
            if n in self.state.checkpoints:
                raise ManifestError(
                    f"{self.manifest}: checkpoint {n} is recorded twice", path=self.manifest, hint=REPAIR_HINT
                )
        merged = {**self.state.checkpoints, **new}
        check_files(merged.values(), self.manifest)  # before anything is kept: a refused read changes nothing
        self.state.checkpoints = merged
        tail = (self._seen.tail + grown)[-_FINGERPRINT:]
        crc = zlib.crc32(grown, self._seen.crc)
        self._seen = _Seen(st.st_ino, size, tail, crc, self._seen.head, st.st_mtime_ns, st.st_ctime_ns)
        self._changed = True

    def note_append(self, cp: Checkpoint, appended: bytes, st: os.stat_result) -> None:
        """Record that this process appended `appended` (the record of `cp`) to the manifest it last read; `st` is
        the manifest's stat after the append (fsutil.append_durably's)."""
        assert self.state is not None and self._seen is not None
        self.state.checkpoints[cp.number] = cp
        self._seen = _Seen(
            self._seen.ino,
            self._seen.size + len(appended),
            (self._seen.tail + appended)[-_FINGERPRINT:],
            zlib.crc32(appended, self._seen.crc),
            self._seen.head,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )
        self._changed = True

    def forget(self) -> None:
        self.state = None
        self._seen = None

    # -- the JSON cache --

    def _load_cache(self) -> None:
        assert self.cache is not None
        self._changed = False
        # the cache is other people's input as much as the manifest: every value is checked as a manifest's
        # would be, and read() then checks its key against the manifest; a cache failing either is not used
        # (and is rewritten by the next save_cache)
        try:
            raw = json.loads(fsutil.read_own(self.cache))
            if raw.get("v") != CACHE_VERSION:
                return
            cols = raw["checkpoints"]
            # columns load several times faster than one object per checkpoint (benchmarks/README.md)
            columns = [cols[k] for k in COLUMNS]
            if any(not isinstance(c, list) or len(c) != len(columns[0]) for c in columns) or not _valid_columns(
                columns
            ):
                return
            numbers = columns[0]
            made = map(Checkpoint, *columns, repeat(self.task, len(numbers)))
            cps = dict(zip(numbers, made, strict=True))
            if len(cps) != len(numbers):
                return
            files = columns[1]
            if len(set(files)) != len(files) or not _all_plain(files):  # else: distinct plain names, all valid
                if any(record_file_problem(f) is not None for f in files):
                    raise ManifestError(f"{self.cache}: a record's file is not allowed", path=self.cache)
                check_files(cps.values(), self.cache)
            key = [raw[k] for k in ("ino", "size", "crc", "mtime", "ctime")]
            if any(type(v) is not int for v in key):
                return
            header = _header_from_json(raw["header"], self.cache)
            if header.name != self.task:
                return
            ino, size, crc, mtime, ctime = key
            seen = _Seen(ino, size, bytes.fromhex(raw["tail"]), crc, bytes.fromhex(raw["head"]), mtime, ctime)
            self.state = TaskState(header, cps)
            self._seen = seen
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ManifestError):
            self.state = None
            self._seen = None
            if not isinstance(sys.exc_info()[1], FileNotFoundError):
                fsutil.remove_file(self.cache)  # dropped: the next save_cache writes it again from the manifest

    def save_cache(self) -> None:
        """Write the cache if this reader learned something new; failures are ignored (it is only a cache)."""
        if self.cache is None or self.state is None or self._seen is None or not self._changed:
            return
        cps = self.state.checkpoints.values()
        doc = {
            "v": CACHE_VERSION,
            "ino": self._seen.ino,
            "size": self._seen.size,
            "tail": self._seen.tail.hex(),
            "crc": self._seen.crc,
            "head": self._seen.head.hex(),
            "mtime": self._seen.mtime,
            "ctime": self._seen.ctime,
            "header": self.state.header.to_json(),
            "checkpoints": {k: list(map(attrgetter(k), cps)) for k in COLUMNS},
        }
        try:
            fsutil.atomic_write_nosync(self.cache, json.dumps(doc, separators=(",", ":")).encode())
            self._changed = False
        except (OSError, TypeError, ValueError):  # TOML-only values (a datetime in arch kwargs) have no JSON
            pass


# the cache's columns: Checkpoint's fields in order, less `task` (the reader's)
COLUMNS = ("number", "file", "size", "sha256", "created", "step", "epoch", "metrics", "original_name")


def _valid_columns(columns: list[list[Any]]) -> bool:
    """Whether the cache's columns hold what a manifest's records may: each value typed as Checkpoint.from_record
    takes it (the files are checked by the caller)."""
    numbers, files, sizes, shas, created, steps, epochs, metrics, names = columns
    if not numbers:
        return True
    # sets of types, made by map() in C: a tenth of the time of a test per value
    int_, str_, none = {int}, {str}, {int, str, type(None)}
    return (
        set(map(type, numbers)) == int_
        and min(numbers) >= 1
        and set(map(type, files)) == str_  # their paths: _load_cache, with the check of two records of one file
        and set(map(type, sizes)) == int_
        and set(map(type, shas)) == str_
        and set(map(type, created)) == str_
        and set(map(type, steps)) <= none - str_
        and set(map(type, epochs)) <= none - str_
        and set(map(type, names)) <= none - int_
        and set(map(type, metrics)) == {dict}
        and set(map(type, chain.from_iterable(map(dict.values, metrics)))) <= {int, float}
    )


def _header_from_json(h: Any, path: Path) -> TaskHeader:
    """A TaskHeader from its `to_json` form, checked as `TaskHeader.from_doc` checks a manifest's."""
    if not isinstance(h, dict):
        raise ManifestError(f"{path}: the header is not an object", path=path)
    doc = {k: v for k, v in h.items() if v is not None and k not in ("arch", "arch_kwargs")}
    if h.get("arch") is not None:
        doc["arch"] = {"factory": h["arch"]}
        if h.get("arch_kwargs") is not None:
            doc["arch"]["kwargs"] = h["arch_kwargs"]
    return TaskHeader.from_doc({**doc, "format": FORMAT}, path)


# --- fingerprints of what a reader read -------------------------------------------------------------


def fingerprint(reader: TaskReader) -> dict[str, Any] | None:
    """The manifest's (inode, size, mtime in ns, first 128 and last 64 bytes, CRC-32) as `reader` last read it;
    None when it changed since.

    Saving appends (size and mtime change) and every other change replaces the file, as TaskReader relies
    on; the mtime also catches a file rewritten in place to the same size, and the first bytes (the
    manifest's `revision`, else the CRC-32) a replacement that got the same inode number, size and last
    bytes (see `_same_prefix`).
    """
    seen = reader._seen
    if seen is None:
        return None
    try:
        st = os.lstat(reader.manifest)
    except OSError:
        return None
    if (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (seen.ino, seen.size, seen.mtime, seen.ctime):
        return None  # changed since it was read
    return {
        "ino": seen.ino,
        "size": seen.size,
        "mtime": st.st_mtime_ns,
        "ctime": st.st_ctime_ns,
        "tail": seen.tail.hex(),
        "crc": seen.crc,
        "head": seen.head.hex(),
    }


def unchanged(manifest: Path | str, mark: dict[str, Any], grown: bool = False) -> bool:
    """Whether `manifest` still has the `fingerprint` `mark`; False for a malformed mark or a read error.

    With `grown`, also True when the file only grew since (records appended), as TaskReader reads it.
    """
    try:
        fd = os.open(manifest, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        ino, size, mtime, ctime, crc = mark["ino"], mark["size"], mark["mtime"], mark["ctime"], mark["crc"]
        if grown:
            if st.st_ino != ino or st.st_size < size:
                return False
        elif (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (ino, size, mtime, ctime):
            return False
        if type(size) is not int or type(crc) is not int:
            return False
        seen = _Seen(ino, size, bytes.fromhex(mark["tail"]), crc, bytes.fromhex(mark["head"]))
        return _same_prefix(fd, seen)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    finally:
        os.close(fd)


# --- the workspace's summary cache -------------------------------------------------------------------


class SummaryCache:
    """`ckpt tasks`'s rows, kept by the fingerprint of the manifest each came from; never the source of truth.

    Reading 1,000 per-task caches costs more than ckpt's start-up, so `Workspace.tasks` keeps every
    task's summary in one file, with the manifest's (inode, size, mtime, last 64 bytes) from the read
    that produced it. A row is used only while its manifest still has that fingerprint: saving appends
    (size and mtime change) and every other change replaces the file (new inode), as TaskReader relies
    on. Each entry is consistent on its own, so concurrent writers, a lost or torn write (it is
    replaced atomically) or a stale copy can only cost a re-read, never a wrong row.
    """

    def __init__(self, path: Path, fields: tuple[str, ...]):
        self.path = path
        self.fields = list(fields)
        self.entries: dict[str, dict[str, Any]] = {}
        self._changed = False
        try:
            raw = json.loads(fsutil.read_own(path))
            if raw.get("v") == CACHE_VERSION and raw.get("fields") == self.fields and isinstance(raw["tasks"], dict):
                self.entries = raw["tasks"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass

    def get(self, name: str, manifest: Path | str) -> dict[str, Any] | None:
        """The summary of task `name` when its manifest is unchanged since it was cached, else None."""
        entry = self.entries.get(name)
        if not isinstance(entry, dict):
            return None
        summary = entry.get("row")
        if not isinstance(summary, dict) or not unchanged(manifest, entry):
            return None
        return summary

    def put(self, name: str, reader: TaskReader, summary: dict[str, Any]) -> None:
        """Keep `summary`, which was made from what `reader` last read."""
        mark = fingerprint(reader)
        if mark is None:
            return
        self.entries[name] = {**mark, "row": summary}
        self._changed = True

    def save(self, names: list[str]) -> None:
        """Write the cache, keeping the tasks in `names` only; failures are ignored (it is only a cache)."""
        keep = set(names)
        if set(self.entries) - keep:
            self.entries = {k: v for k, v in self.entries.items() if k in keep}
            self._changed = True
        if not self._changed:
            return
        doc = {"v": CACHE_VERSION, "fields": self.fields, "tasks": self.entries}
        try:
            fsutil.atomic_write_nosync(self.path, json.dumps(doc, separators=(",", ":")).encode())
            self._changed = False
        except (OSError, ValueError, TypeError):
            pass


class TaskRowsCache:
    """Each task's row of `ckpt tasks --json` as rendered text, kept with the `stat` of the manifest it came from;
    never the source of truth.

    An entry is `[inode, size, mtime in ns, ctime in ns, text]`, so one `stat` of a manifest checks it. Every
    change of a file gives it the current time as its ctime, which nothing can set back: the caller keeps only
    rows of manifests unchanged for a while (a later change then gets another ctime even on a coarse clock),
    taking the `stat` before reading the manifest. `form` names how the text was rendered. A stale, foreign or
    damaged entry or file only costs a re-read.
    """

    def __init__(self, path: Path, form: str):
        self.path = path
        self.form = form
        self.entries: dict[str, Any] = {}
        self._changed = False
        try:
            raw = json.loads(fsutil.read_own(path))
            if raw.get("v") == TASK_ROWS_VERSION and raw.get("form") == form and isinstance(raw["tasks"], dict):
                self.entries = raw["tasks"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass

    def get(self, name: str, st: os.stat_result) -> str | None:
        """The text kept for task `name` when its manifest's `st` is the one it was kept with, else None."""
        entry = self.entries.get(name)
        if type(entry) is not list or len(entry) != 5:
            return None
        ino, size, mtime, ctime, text = entry
        if ino != st.st_ino or size != st.st_size or mtime != st.st_mtime_ns or ctime != st.st_ctime_ns:
            return None
        return text if type(text) is str else None

    def put(self, name: str, st: os.stat_result, text: str) -> None:
        """Keep `text`, rendered from the manifest read after `st` was taken."""
        self.entries[name] = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, text]
        self._changed = True

    def drop(self, name: str) -> None:
        if self.entries.pop(name, None) is not None:
            self._changed = True

    def save(self, names: list[str]) -> None:
        """Write the cache, keeping the tasks in `names` only; failures are ignored (it is only a cache)."""
        keep = set(names)
        if set(self.entries) - keep:
            self.entries = {k: v for k, v in self.entries.items() if k in keep}
            self._changed = True
        if not self._changed:
            return
        doc = {"v": TASK_ROWS_VERSION, "form": self.form, "tasks": self.entries}
        try:
            fsutil.atomic_write_nosync(self.path, json.dumps(doc, separators=(",", ":")).encode())
            self._changed = False
        except (OSError, ValueError, TypeError):
            pass


TASK_ROWS_VERSION = 2


# --- rendered rows of one task ----------------------------------------------------------------------

ROWS_VERSION = 3


class RowCache:
    """Rendered text of every checkpoint of a task (`ckpt list --json`), kept with the `fingerprint` of the manifest
    it came from; never the source of truth.

    Records are immutable once written, so their text stays right while the manifest is unchanged (and the
    text of the ones it had, while it only grows). The file is the CRC-32 of the rest (8 hex digits and a
    newline), a JSON header line (the fingerprint, the form of the rows, whatever the caller keeps with the
    text), a JSON index line (the checkpoint numbers and where each one's row starts in the text: parsed only
    when asked for), then the text. A stale, foreign, torn or damaged file is not used.
    """

    def __init__(self, path: Path):
        self.path = path

    def load(
        self, manifest: Path, form: str, grown: bool = False
    ) -> tuple[memoryview, memoryview, dict[str, Any]] | None:
        """(text, index, extra) as kept by `store` with the same `form`, when `manifest` is unchanged since (with
        `grown`: or only grew by appended records); else None. `index` is for `parse_index`."""
        try:
            data = fsutil.read_own(self.path)
            view = memoryview(data)
            if data[8:9] != b"\n" or int(data[:8], 16) != zlib.crc32(view[9:]):
                return None
            head_end = data.index(b"\n", 9)
            index_end = data.index(b"\n", head_end + 1)
            header = json.loads(view[9:head_end].tobytes())
            extra = header["extra"]
            if header["v"] != ROWS_VERSION or header["form"] != form or not isinstance(extra, dict):
                return None
            if not unchanged(manifest, header["manifest"], grown):
                return None
            return view[index_end + 1 :], view[head_end + 1 : index_end], extra
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    @staticmethod
    def parse_index(index: memoryview) -> tuple[list[int], list[int]] | None:
        """(numbers, starts) from `load`'s index: ascending numbers and each row's offset; None if malformed."""
        try:
            doc = json.loads(index.tobytes())
            numbers, starts = doc["numbers"], doc["starts"]
            if not isinstance(numbers, list) or not isinstance(starts, list) or len(numbers) != len(starts):
                return None
            if not all(type(n) is int for n in numbers) or not all(map(int.__lt__, numbers, numbers[1:])):
                return None  # numbers are looked up by bisection: ascending integers only
            if not all(type(n) is int for n in starts):
                return None
            return numbers, starts
        except (ValueError, KeyError, TypeError):
            return None

    def store(
        self,
        reader: TaskReader,
        form: str,
        numbers: list[int],
        starts: list[int],
        text: bytes,
        extra: dict[str, Any],
    ) -> None:
        """Keep `text`, holding one row per checkpoint number of `numbers` (ascending) at `starts`, made from what
        `reader` last read; `form` names how the rows were rendered (a change of rendering must change it).
        Failures are ignored (it is only a cache)."""
        mark = fingerprint(reader)
        if mark is None or len(starts) != len(numbers):
            return
        header = {"v": ROWS_VERSION, "manifest": mark, "form": form, "extra": extra}
        index = {"numbers": numbers, "starts": starts}
        try:
            rest = b"\n".join([json.dumps(doc, separators=(",", ":")).encode() for doc in (header, index)] + [text])
            fsutil.atomic_write_nosync(self.path, b"%08x\n" % zlib.crc32(rest) + rest)
        except (OSError, ValueError, TypeError):
            pass
