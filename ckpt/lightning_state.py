"""What Lightning and the HF Trainer recorded about a run, read from their pickles without running them:
a checkpoint's epoch, global step and monitoring callbacks, and the Trainer's arguments."""

from __future__ import annotations

import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fsutil
from .errors import IntegrityError
from .formats import ScanUnpickler, StoredTensor, Tolerant, read_pickle


def top_level_scalars(path: Path) -> dict[str, int | float | str | bool]:
    """The top-level numbers, strings and booleans of a torch zip checkpoint's pickled dict.

    Lightning stores `epoch` and `global_step` there. Nothing is imported or run: every global is a
    stand-in. Returns {} for a file that is not a torch zip or not a dict; raises IntegrityError when
    corrupt, hostile or too costly to read, NotRegularFile for a FIFO or device.
    """
    path = Path(path)
    with fsutil.open_regular_file(path) as f:
        try:
            found = read_pickle(f, path)
        except zipfile.BadZipFile:
            return {}
    if found is None:
        return {}
    obj = found[0]
    if not isinstance(obj, dict):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and type(v) in (int, float, str, bool)}


_SCALAR_FORMATS = {
    "float64": "d",
    "float32": "f",
    "float16": "e",
    "int64": "q",
    "int32": "i",
    "int16": "h",
    "int8": "b",
    "uint8": "B",
}
_MODE_IN_KEY = re.compile(r"'mode': '(min|max)'")


@dataclass(slots=True)
class Monitored:
    """What one `ModelCheckpoint` callback with a `monitor` kept in a Lightning checkpoint."""

    monitor: str
    mode: str | None  # "min" or "max", kept only in the callback's key: ModelCheckpoint{'monitor': ..., 'mode': ...}
    score: float | None  # the value it recorded for this very file: its `best_k_models` entry of the file's name
    current_score: float | None
    best_model_score: float | None
    best_model_name: str | None  # the file name of its `best_model_path`
    wrote_last: bool  # its `last_model_path` has this file's name (save_last)


@dataclass(slots=True)
class LightningState:
    """The top-level `epoch` and `global_step` of a Lightning checkpoint and its monitoring callbacks."""

    epoch: int | None = None
    global_step: int | None = None
    monitors: list[Monitored] = field(default_factory=list)


def _base(p: object) -> str | None:
    return re.split(r"[\\/]", p)[-1] if isinstance(p, str) and p else None


def read_lightning_state(path: Path) -> LightningState:
    """The epoch, global step and `ModelCheckpoint` states of the Lightning checkpoint at `path`.

    Nothing is imported or run: every global is a stand-in, and the few scalar tensors wanted (the
    scores) are decoded from their bytes in the archive. Returns an empty state for a file that is not a
    torch zip or does not hold a dict; raises IntegrityError when it is corrupt.
    """
    path = Path(path)
    out = LightningState()
    with fsutil.open_regular_file(path) as f:
        try:
            found = read_pickle(f, path)  # within the pickle's budget, like `show`
        except zipfile.BadZipFile:
            return out
        if found is None:
            return out
        obj = found[0]
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError) as e:
            raise IntegrityError(f"'{path}' is a corrupt torch archive ({e})", path=path) from None
        return _lightning_state(zf, path, obj, out)


def _lightning_state(zf: zipfile.ZipFile, path: Path, obj: Any, out: LightningState) -> LightningState:
    with zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        prefix = pkl[0][: -len("data.pkl")] if pkl else ""
        if not isinstance(obj, dict):
            return out
        if type(obj.get("epoch")) is int:
            out.epoch = obj["epoch"]
        if type(obj.get("global_step")) is int:
            out.global_step = obj["global_step"]
        callbacks = obj.get("callbacks")
        if not isinstance(callbacks, dict):
            return out
        big = _member(zf, f"{prefix}byteorder", 16).strip() == b"big"
        for key, st in callbacks.items():
            if not isinstance(key, str) or not isinstance(st, dict) or not isinstance(st.get("monitor"), str):
                continue
            mode = _MODE_IN_KEY.search(key)
            kept = st.get("best_k_models")
            own = next((v for k, v in kept.items() if _base(k) == path.name), None) if isinstance(kept, dict) else None
            out.monitors.append(
                Monitored(
                    st["monitor"],
                    mode.group(1) if mode else None,
                    _scalar(zf, prefix, big, own),
                    _scalar(zf, prefix, big, st.get("current_score")),
                    _scalar(zf, prefix, big, st.get("best_model_score")),
                    _base(st.get("best_model_path")),
                    _base(st.get("last_model_path")) == path.name,
                )
            )
    return out


def _member(zf: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """The first `limit` bytes of member `name`, or b"" when it is missing or unreadable."""
    try:
        with zf.open(name) as f:
            return f.read(limit)
    except Exception:  # KeyError, BadZipFile, zlib.error...: a score that cannot be read is left out
        return b""


def _scalar(zf: zipfile.ZipFile, prefix: str, big: bool, v: object) -> float | None:
    """A number, or a one-element tensor stand-in decoded from its storage's bytes; else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    if not isinstance(v, StoredTensor) or v.storage is None or v.storage.key is None or any(d != 1 for d in v.shape):
        return None
    order = ">" if big else "<"
    if v.dtype == "bfloat16":  # the top half of a float32
        raw = _member(zf, f"{prefix}data/{v.storage.key}", 2 * (v.offset + 1))[2 * v.offset :]
        return struct.unpack(f"{order}f", raw + b"\0\0" if big else b"\0\0" + raw)[0] if len(raw) == 2 else None
    code = _SCALAR_FORMATS.get(v.dtype)
    if code is None:
        return None
    size = struct.calcsize(code)
    raw = _member(zf, f"{prefix}data/{v.storage.key}", size * (v.offset + 1))[size * v.offset :]
    return float(struct.unpack(f"{order}{code}", raw)[0]) if len(raw) == size else None


class _Kept(Tolerant):
    """A stand-in that keeps the state the pickle gives it (the fields of a pickled dataclass)."""

    def __setstate__(self, state: Any) -> None:
        self.kept = state


class _StateUnpickler(ScanUnpickler):
    """A reader whose stand-ins for unknown classes keep their pickled state (`_Kept`)."""

    stand_in_class = _Kept


def read_training_args(path: Path) -> dict[str, int | float | str | bool | None]:
    """The plain fields (numbers, strings, booleans, None) of a Trainer's `training_args.bin`: a pickled
    `TrainingArguments`, read with stand-ins for every global, so nothing is imported or run.

    Returns {} for a file that cannot be read that way (missing, corrupt, an older format).
    """
    try:
        with fsutil.open_regular_file(path) as f:
            found = read_pickle(f, path, _StateUnpickler)
    except Exception:  # anything unreadable (or hostile): the caller goes on without it
        return {}
    if found is None:
        return {}
    obj = found[0]
    fields = getattr(obj, "kept", None)
    if not isinstance(fields, dict):
        return {}
    return {k: v for k, v in fields.items() if isinstance(k, str) and (v is None or type(v) in (int, float, str, bool))}
