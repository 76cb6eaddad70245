"""A bucket task's records in immutable segment objects named by task.toml, so that no commit rewrites them all.

A fold (ckpt.store_log) used to rewrite the whole `tasks/<task>/task.toml`, 2.7 MB at 10,000 checkpoints, every
64 saves. Now the manifest is a small root: its header, `segments = [[first, last, records, "id"], ...]` naming
`tasks/<task>/segments/<id>.toml.gz` (gzip'd TOML: `format`, `task`, `id` and `[[checkpoints]]`), each created
once with If-None-Match and never changed, and at most `TAIL_MAX` records inline. A commit (`plan`) keeps
every segment whose records it leaves as they are; the records of the others (a trash dropped some, a doctor
forgot one), the ones it adds (a fold's log records, a restore) and its inline tail go into one new segment,
or stay inline when there are few. Segments of one size band are merged when `FAN` of them gather (an LSM
tree's tiers), so the root names at most (FAN - 1) per band: a few dozen at 10,000 checkpoints, and each record
is rewritten once per band it climbs (once by 10,000 checkpoints, twice by 100,000, 3 times by 1,000,000).

The segments a commit replaced are named in the root's `retired` and deleted once it landed; the next commit
deletes them again before dropping the names (a crash between). A segment written by a commit that did not
land is named nowhere: the commit deletes it, and `ckpt doctor` deletes one left by a crash once it is an hour
old (younger, it may belong to a commit still running). Readers never read a segment the root does not name.
A segment never changes, so each machine keeps the records of those it read (`ckpt.store`'s cache).
See docs/s3.md ("Saves: the log") and docs/formats.md.
"""

from __future__ import annotations

import gzip
import secrets
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ManifestError
from .manifest import SEGMENT_FORMAT, Checkpoint, check_files, dumps, parse_toml

SEGMENT_DIR = "segments"
TAIL_MAX = 15  # records a commit leaves inline in task.toml; more go into a new segment
FAN = 16  # segments of one size band merged into one (see `band`)
BAND_BASE = 32  # the size bands: [0, 512), [512, 8192), [8192, 131072), ... records (BAND_BASE * FAN ** n)
HINT = "restore the object from a copy of the bucket (its records are in no other object); see docs/s3.md"

Entry = tuple[int, int, int, str]  # (first number, last number, records, id), as task.toml names a segment


def segment_prefix(task: str) -> str:
    return f"tasks/{task}/{SEGMENT_DIR}/"


def segment_key(task: str, sid: str) -> str:
    return f"{segment_prefix(task)}{sid}.toml.gz"


def id_of(key: str, prefix: str) -> str | None:
    """The id of segment object `key` (under `prefix`), or None for a key that is not one."""
    name = key[len(prefix) :]
    return name.removesuffix(".toml.gz") if name.endswith(".toml.gz") and "/" not in name else None


def new_id() -> str:
    return secrets.token_hex(8)


def encode(task: str, sid: str, cps: Iterable[Checkpoint]) -> bytes:
    doc = {"format": SEGMENT_FORMAT, "task": task, "id": sid, "checkpoints": [cp.to_record() for cp in cps]}
    return gzip.compress(dumps(doc), compresslevel=9, mtime=0)


def entry_of(sid: str, numbers: list[int]) -> Entry:
    return (min(numbers), max(numbers), len(numbers), sid)


def decode(data: bytes, where: str, task: str, entry: Entry) -> dict[int, Checkpoint]:
    """The records of segment `entry` from its object's bytes; raises ManifestError (naming `where`, the
    object's key) when they are not those the root describes."""
    path = Path(where)
    try:
        text = gzip.decompress(data)
    except (OSError, EOFError, zlib.error):
        raise ManifestError(f"{where}: damaged (not gzip'd TOML)", path=path, hint=HINT) from None
    try:
        doc = parse_toml(text, path)
        if doc.get("format") != SEGMENT_FORMAT or doc.get("task") != task or doc.get("id") != entry[3]:
            raise ManifestError(f"{where}: not segment {entry[3]} of task '{task}'", path=path, hint=HINT)
        records = doc.get("checkpoints", [])
        if not isinstance(records, list):
            raise ManifestError(f"{where}: 'checkpoints' is not a list of tables", path=path, hint=HINT)
        out: dict[int, Checkpoint] = {}
        for rec in records:
            cp = Checkpoint.from_record(rec, path, task)
            if cp.number in out or not entry[0] <= cp.number <= entry[1]:
                raise ManifestError(f"{where}: checkpoint {cp.number} does not belong here", path=path, hint=HINT)
            out[cp.number] = cp
    except ManifestError as e:
        raise ManifestError(e.message, path=path, hint=HINT) from None
    if len(out) != entry[2]:
        raise ManifestError(f"{where}: holds {len(out)} records, task.toml says {entry[2]}", path=path, hint=HINT)
    return out


def merge(root: dict[int, Checkpoint], parts: dict[str, dict[int, Checkpoint]], path: Path) -> dict[int, Checkpoint]:
    """The records of the root (its inline tail) and of its segments; raises ManifestError when a number is
    in two of them or a file is recorded twice."""
    out = dict(root)
    for sid, cps in parts.items():
        for n in cps:
            if n in out:
                raise ManifestError(f"{path}: checkpoint {n} is in segment {sid} and elsewhere", path=path)
        out.update(cps)
    if parts:
        check_files(list(out.values()), path)
    return dict(sorted(out.items()))


def band(records: int) -> int:
    b, limit = 0, BAND_BASE * FAN
    while records >= limit:
        b, limit = b + 1, limit * FAN
    return b


@dataclass
class Plan:
    """A commit's layout: the segments its root names, the new one to write first (with its records), the
    ones it replaces (to delete once it landed), and the numbers it keeps inline."""

    segments: list[Entry]
    members: dict[str, list[int]]
    tail: list[int]
    new: tuple[str, list[int]] | None = None
    retired: list[str] = field(default_factory=list)


def plan(
    entries: list[Entry],
    members: dict[str, list[int]],
    before: dict[int, Checkpoint],
    after: dict[int, Checkpoint],
) -> Plan:
    """Where the records `after` go, given the segments (`entries`, each holding `members[id]` of the records
    `before`): a segment all of whose records are unchanged stays, the others are replaced, and every record no
    kept segment holds is written into one new segment, unless they are at most TAIL_MAX (then inline); a
    band with FAN segments (counting the new one) is merged into the new one."""
    kept: list[Entry] = []
    retired: list[str] = []
    covered: set[int] = set()
    for e in entries:
        nums = members[e[3]]
        if all((cp := after.get(n)) is not None and (cp is before[n] or cp == before[n]) for n in nums):
            kept.append(e)
            covered.update(nums)
        else:
            retired.append(e[3])
    loose = [n for n in after if n not in covered]
    fresh = loose if len(loose) > TAIL_MAX else []
    while True:
        counts: dict[int, int] = {}
        for b in [band(e[2]) for e in kept] + ([band(len(fresh))] if fresh else []):
            counts[b] = counts.get(b, 0) + 1
        full = sorted(b for b, c in counts.items() if c >= FAN)
        if not full:
            break
        merged = [e for e in kept if band(e[2]) == full[0]]
        kept = [e for e in kept if band(e[2]) != full[0]]
        retired += [e[3] for e in merged]
        fresh = (fresh or loose) + [n for e in merged for n in members[e[3]]]
    fresh = sorted(fresh)
    new = (new_id(), fresh) if fresh else None
    tail = [] if fresh else sorted(loose)
    out = {e[3]: members[e[3]] for e in kept}
    segs = list(kept)
    if new is not None:
        segs.append(entry_of(*new))
        out[new[0]] = new[1]
    return Plan(segs, out, tail, new, retired)
