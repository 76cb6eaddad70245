"""The local caches of a bucket workspace: checkpoints downloaded by sha256, and manifests, logs and segments parsed."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from itertools import repeat
from pathlib import Path

from . import fsutil, hashing
from .errors import CkptError, IntegrityError
from .manifest import COLUMNS, Checkpoint, TaskHeader, TaskState
from .storage import Storage

MANIFEST_CACHE_VERSION = 5  # 5: segments (ckpt.store_segments)


def cache_dir() -> Path:
    """Where downloaded checkpoints are kept (`CKPT_CACHE`, else ~/.cache/ckpt)."""
    root = os.environ.get("CKPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ckpt"
    )
    return Path(root)


def load_manifest_cache(path: Path) -> tuple[TaskState | None, str, dict[str, list[int]]]:
    """The parsed manifest (with its segments' records), its ETag and the numbers each segment holds from the
    local cache, or (None, "", {}): parsing 10,000 records of TOML takes 1.5 s, loading them as JSON columns a
    tenth of that, and a 304 confirms they are current."""
    try:
        raw = json.loads(path.read_bytes())
        if raw.get("v") != MANIFEST_CACHE_VERSION:
            return None, "", {}
        cols = [raw["checkpoints"][k] for k in COLUMNS]
        task = raw["header"]["name"]
        cps = dict(zip(cols[0], map(Checkpoint, *cols, repeat(task, len(cols[0]))), strict=True))
        header = TaskHeader(**raw["header"])
        header.segments = [(a, b, c, str(d)) for a, b, c, d in header.segments]
        members = {str(k): [int(n) for n in v] for k, v in raw["members"].items()}
        if set(members) != {e[3] for e in header.segments} or not all(n in cps for v in members.values() for n in v):
            return None, "", {}
        return TaskState(header, cps), str(raw["etag"]), members
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, "", {}


def save_manifest_cache(path: Path, state: TaskState, etag: str, members: dict[str, list[int]]) -> None:
    cps = state.checkpoints.values()
    doc = {
        "v": MANIFEST_CACHE_VERSION,
        "etag": etag,
        "header": state.header.to_json(),
        "checkpoints": {k: [getattr(cp, k) for cp in cps] for k in COLUMNS},
        "members": members,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fsutil.atomic_write_nosync(path, json.dumps(doc, separators=(",", ":")).encode())
    except (OSError, ValueError, TypeError):
        pass  # only a cache


def load_log_cache(path: Path, task: str) -> dict[int, Checkpoint]:
    """The log records kept by `save_log_cache` (a log object never changes: no revalidation needed)."""
    try:
        raw = json.loads(path.read_bytes())
        if raw.get("v") != MANIFEST_CACHE_VERSION:
            return {}
        rows = [dict(zip(COLUMNS, row, strict=True)) for row in raw["records"]]
        return {int(r["number"]): Checkpoint(**r, task=task) for r in rows}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def save_log_cache(path: Path, records: list[Checkpoint]) -> None:
    doc = {"v": MANIFEST_CACHE_VERSION, "records": [[getattr(cp, k) for k in COLUMNS] for cp in records]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fsutil.atomic_write_nosync(path, json.dumps(doc, separators=(",", ":")).encode())
    except (OSError, ValueError, TypeError):
        pass  # only a cache


def download_cached(storage: Storage, key: str, sha256: str, name: str, size: int | None = None) -> Path:
    """`key` in the local cache under its sha256 (downloaded and verified once, then reused); the local path.

    A folder checkpoint (the objects under `key/`) is downloaded as a folder and checked by its tree digest.
    Beside a verified copy lies its stamp (`<copy>.ok`: the size, mtime and inode of each of its files when it
    was verified); a copy whose files no longer match their stamp (changed on this machine, even at the same
    size), or has none, is downloaded again. `size` is the recorded size, checked too."""
    folder = cache_dir() / "objects" / sha256[:2]
    dest = folder / f"{sha256}{os.path.splitext(name)[1]}"
    stamp = dest.with_name(dest.name + ".ok")
    if dest.is_file() or dest.is_dir():
        try:
            held = stamp.read_text()
        except OSError:
            held = ""
        if held and held == _stamp(dest) and (size is None or _cached_size(dest) == size):
            return dest
        if dest.is_dir():
            fsutil.remove_tree(dest)
        else:
            fsutil.remove_file(dest)
    folder.mkdir(parents=True, exist_ok=True)
    inside = [b.key for b in storage.list_prefix(key + "/")] if not os.path.splitext(name)[1] else []
    if inside:
        _download_tree(storage, key, inside, sha256, dest)
    else:
        tmp = fsutil.temp_path(folder, dest.name)
        try:
            storage.download(key, tmp)
            if hashing.sha256_file(tmp) != sha256:
                raise IntegrityError(f"{storage.url}/{key} does not match its recorded sha256", hint="run: ckpt verify")
            os.replace(tmp, dest)
        except FileNotFoundError:
            raise IntegrityError(f"{storage.url}/{key} is missing", hint="run: ckpt verify") from None
        finally:
            fsutil.remove_file(tmp)
    fsutil.atomic_write_nosync(stamp, _stamp(dest).encode())
    return dest


def _stamp(path: Path) -> str:
    """What a verified copy looked like: each file's relative name, size, mtime and inode ('' if unreadable)."""
    try:
        if path.is_dir():
            files = [(rel, path / rel) for rel, _ in fsutil.tree_files(path)]
        else:
            files = [("", path)]
        lines = []
        for rel, p in files:
            st = os.stat(p, follow_symlinks=False)
            lines.append(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ino}\n")
        return "".join(lines)
    except (OSError, CkptError):
        return ""


def _cached_size(path: Path) -> int:
    try:
        return sum(n for _, n in fsutil.tree_files(path)) if path.is_dir() else path.stat().st_size
    except (OSError, CkptError):
        return -1


def _download_tree(storage: Storage, key: str, keys: list[str], sha256: str, dest: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        for k in keys:
            target = tmp / k[len(key) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            storage.download(k, target)
        digest = hashing.tree_digest([(k[len(key) + 1 :], hashing.sha256_file(tmp / k[len(key) + 1 :])) for k in keys])
        if digest != sha256:
            raise IntegrityError(f"{storage.url}/{key}/ does not match its recorded sha256", hint="run: ckpt verify")
        with contextlib.suppress(OSError):  # another process finished the same download first: keep its copy
            os.rename(tmp, dest)
    except FileNotFoundError:
        raise IntegrityError(f"{storage.url}/{key}/ is missing", hint="run: ckpt verify") from None
    finally:
        fsutil.remove_tree(tmp)
    return dest
