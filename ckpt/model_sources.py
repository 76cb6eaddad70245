"""Which task and checkpoint each model was made from, kept so that `ckpt list TASK` parses no model.toml.

`ckpt list TASK` shows the models made from each checkpoint. Finding them means knowing the `task` and
`checkpoint` of every model of the workspace: parsing 1,000 `model.toml` files on a folder, one GET each in a
bucket. This module keeps those two values per model in a derived file, each with what proves it current:

- a folder: `tasks/.models.cache.json`, `{"v": 1, "models": {title: [ino, size, mtime, ctime, task, number]}}`
  (times in nanoseconds; `task` and `number` null for a model.toml that could not be read). A reader lists
  `models/` and `stat`s each `model.toml` (no file is opened); an entry is used only while that stat gives
  exactly its four numbers, and a model with none is read and recorded. Every change to a file sets its
  ctime to the current time, which no tool sets back, so a model made, removed, renamed or restored by any
  ckpt, by hand or by another process is seen: a model added or changed is parsed anew, one gone is
  dropped. An entry is kept only for a model.toml whose ctime is more than 2 s old (a later change then
  gets another ctime even on a coarse clock).
- a bucket: the same per machine under the local cache (`CKPT_CACHE/models/<hash of the URL>.json`), each
  entry with the ETag of its `model.toml`; the ETags come from the LIST of `models/` that finding the
  models needs anyway, so only a model made or changed since the last listing on this machine is fetched.

The answer is therefore that of reading every model.toml, always; the file only saves the reading. Deleting
it is always safe.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from . import fsutil
from .errors import CkptError

MODELS_CACHE_FILE = ".models.cache.json"  # in tasks/, beside the other workspace-wide caches
VERSION = 1
SETTLED_NS = 2_000_000_000  # as workspace.SETTLED_NS: a file changed more recently may change again unseen

Source = tuple[str, int] | None  # (task, checkpoint) of a model; None for one that could not be read
MODEL_FILE = "model.toml"


def by_checkpoint(sources: dict[str, Source], task: str) -> dict[int, list[str]]:
    """Titles (sorted) of the models made from each checkpoint number of `task`."""
    out: dict[int, list[str]] = {}
    for title in sorted(sources):
        src = sources[title]
        if src is not None and src[0] == task:
            out.setdefault(src[1], []).append(title)
    return out


def _load(path: Path) -> dict[str, list[object]]:
    try:
        doc = json.loads(fsutil.read_own(path))  # a link there is refused (SymlinkError), a FIFO is dropped
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict) or doc.get("v") != VERSION or not isinstance(doc.get("models"), dict):
        return {}
    return {k: v for k, v in doc["models"].items() if isinstance(v, list)}


def _save(path: Path, entries: dict[str, list[object]]) -> None:
    with contextlib.suppress(OSError, ValueError, TypeError):  # only a cache: a failure costs the next reader
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"v": VERSION, "models": entries}, separators=(",", ":")).encode()
        fsutil.atomic_write_nosync(path, data)


def _source(value: list[object]) -> Source:
    task, number = value[-2], value[-1]
    if isinstance(task, str) and isinstance(number, int) and not isinstance(number, bool):
        return task, number
    return None


def _read(read: Callable[[str], tuple[str, int]], title: str) -> Source:
    try:
        return read(title)
    except CkptError:
        return None  # unreadable, as ModelIndex.read_all skips it


def folder_sources(models_dir: Path, cache: Path, read: Callable[[str], tuple[str, int]]) -> dict[str, Source]:
    """(task, checkpoint) of every model in `models_dir` (the titles ModelIndex.titles lists), `read` called
    only for a model whose model.toml is not exactly as `cache` recorded it."""
    kept = _load(cache)
    entries: dict[str, list[object]] = {}
    out: dict[str, Source] = {}
    changed = False
    settled = time.time_ns() - SETTLED_NS
    folder = str(models_dir)
    try:
        with os.scandir(folder) as it:
            titles = [e.name for e in it if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        titles = []
    for title in titles:
        try:
            st = os.stat(f"{folder}/{title}/{MODEL_FILE}")
        except (OSError, ValueError):
            continue  # no model.toml: not a model (ModelIndex.titles)
        key: list[object] = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        hit = kept.get(title)
        if hit is not None and len(hit) == 6 and hit[:4] == key:
            src = _source(hit)
        else:
            src = _read(read, title)
            changed = True
        out[title] = src
        if st.st_ctime_ns <= settled:
            entries[title] = [*key, *(src if src is not None else (None, None))]
        else:
            changed = True  # not kept: the next reader reads it again
    if changed or kept.keys() != entries.keys():
        _save(cache, entries)
    return out


def store_sources(
    etags: dict[str, str], cache: Path, fetch: Callable[[list[str]], list[tuple[Source, bool]]]
) -> dict[str, Source]:
    """(task, checkpoint) of every model of a bucket, given the ETag of each model.toml (from the listing);
    `fetch` reads the models whose ETag is not the one `cache` recorded (all at once), and says of each
    whether it was there to read (one deleted since the listing is not recorded: the same bytes written
    again would have the same ETag)."""
    kept = _load(cache)
    out: dict[str, Source] = {}
    missing: list[str] = []
    for title, etag in etags.items():
        hit = kept.get(title)
        if hit is not None and len(hit) == 3 and hit[0] == etag:
            out[title] = _source(hit)
        else:
            missing.append(title)
    gone: set[str] = set()
    for title, (src, found) in zip(missing, fetch(missing) if missing else [], strict=True):
        out[title] = src
        if not found:
            gone.add(title)
    if missing or kept.keys() != etags.keys():
        entries: dict[str, list[object]] = {}
        for title, etag in etags.items():
            src = out[title]
            if title not in gone:
                entries[title] = [etag, *(src if src is not None else (None, None))]
        _save(cache, entries)
    return out
