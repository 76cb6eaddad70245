"""The log beside a bucket task's manifest: one small object per saved checkpoint, folded into task.toml.

A save in a bucket does not rewrite `tasks/<task>/task.toml` (whose size grows with the task): once its number
is claimed and its object uploaded, it creates `tasks/<task>/log/<number>.toml` (If-None-Match: the number is
the saver's alone) holding that one record. A reader takes the manifest's records plus those of the log
objects the manifest has not taken in (one LIST, then the unseen ones fetched concurrently). Any commit of the
manifest (`StoreTask.update`) folds the log in: it records the numbers it took in as `folded` (readers skip
those objects), and deletes them after it committed; the next commit deletes whatever a crash left behind
before it drops them from `folded`. While a log may hold records the manifest says `format = 2` with
`log = true`, so that a ckpt that knows no log refuses the task instead of rewriting it without them.
See docs/s3.md ("Saves: the log") and docs/formats.md.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ManifestError
from .manifest import Checkpoint, dumps, parse_toml

LOG_DIR = "log"
FOLD_EVERY = 64  # log records that make the next save fold the log into the manifest


def log_prefix(task: str) -> str:
    return f"tasks/{task}/{LOG_DIR}/"


def log_key(task: str, number: int) -> str:
    return f"{log_prefix(task)}{number:06d}.toml"


def number_of(key: str, prefix: str) -> int | None:
    """The checkpoint number of log object `key` (under `prefix`), or None for a key that is not one."""
    name = key[len(prefix) :]
    stem, dot, ext = name.partition(".")
    return int(stem) if dot and ext == "toml" and stem.isdigit() and "/" not in name else None


def record_bytes(cp: Checkpoint) -> bytes:
    return dumps({"checkpoint": cp.to_record()})


def parse_record(data: bytes, key: str, task: str, number: int) -> Checkpoint:
    """The record of log object `key`; raises ManifestError when it is not one of checkpoint `number`."""
    path = Path(key)
    rec = parse_toml(data, path).get("checkpoint")
    cp = Checkpoint.from_record(rec, path, task)
    if cp.number != number:
        raise ManifestError(f"{key}: holds the record of checkpoint {cp.number}", path=path, hint="run: ckpt doctor")
    return cp
