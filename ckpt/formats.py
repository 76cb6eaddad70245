"""Reading checkpoint files: torch zip archives, safetensors, Lightning, and folders of files.

`inspect_file` never imports torch and never runs code from the file: it reads the zip index and
interprets the pickle with stand-ins for every global. `load_state_dict` imports torch and loads
with `weights_only=True`, always passed explicitly.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from . import fsutil
from .errors import CkptError, IntegrityError, UnsafeFileError, UsageError
from .unpickle import BoundedUnpickler, Budget, TooComplex

_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
DTYPE_NAMES = {  # the dtypes torch pickles by name (torch.float32...): inert when unpickled
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e5m2",
    "uint16",
    "uint32",
    "uint64",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
}
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64",
}
ITEMSIZE = {  # bytes per element of each dtype ckpt names
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "uint16": 2, "uint32": 4, "uint64": 8, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
}  # fmt: skip
# Globals torch's weights_only loader accepts; anything else needs full unpickling.
_UNTYPED_STORAGES = {("torch.storage", "UntypedStorage"), ("torch", "UntypedStorage")}
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch", "Size"),
    ("torch", "device"),
    ("builtins", "set"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    ("torch.nn.parameter", "Parameter"),
    ("_codecs", "encode"),
    ("builtins", "slice"),
    ("builtins", "complex"),
}


@dataclass(slots=True)
class TensorInfo:
    name: str
    shape: list[int]
    dtype: str
    shard: str | None = None  # the file it is in (sharded and distributed checkpoints)
    split: str | None = None  # how it is split into chunks (DCP)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(slots=True)
class FileInfo:
    """What a checkpoint file holds, read without loading it."""

    format: str  # "torch-zip", "safetensors", "directory", "unknown"
    tensors: list[TensorInfo] = field(default_factory=list)
    unsafe_globals: list[str] = field(default_factory=list)
    note: str | None = None
    weights_under: str | None = None  # "state_dict": a Lightning checkpoint, whose weights are under that key
    other_tensors: dict[str, int] = field(default_factory=dict)  # tensors outside the weights, by top-level key
    shards: int = 1  # files the tensors are in
    layout: str | None = None  # how a sharded or distributed checkpoint splits its tensors, in words
    others: list[str] = field(default_factory=list)  # non-tensor items (DCP)

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def bytes(self) -> int:
        """What the tensors take, by their dtypes (0 for a dtype of unknown size)."""
        return sum(t.numel * ITEMSIZE.get(t.dtype, 0) for t in self.tensors)


# --- a pickle interpreter that builds nothing real ----------------------------------------------

# A torch zip's members are stored, not compressed, so they unpack to at most the archive's size; more
# than 4 times that (plus 1 MiB for a small file) is a zip bomb, refused before anything is inflated.
UNPACK_RATIO, UNPACK_SLACK = 4, 1 << 20


class _Storage:
    __slots__ = ("dtype", "key")

    def __init__(self, dtype: str, key: str | None = None):
        self.dtype = dtype
        self.key = key  # the archive's `data/<key>` member that holds the bytes


class _Tensor:
    __slots__ = ("shape", "dtype", "storage", "offset", "stride")

    def __init__(
        self,
        shape: list[int],
        dtype: str,
        storage: _Storage | None = None,
        offset: int = 0,
        stride: list[int] | None = None,
    ):
        self.shape = shape
        self.dtype = dtype
        self.storage = storage
        self.offset = offset  # in elements
        self.stride = stride  # in elements; None when the pickle gave none that reads as one


# Public names for readers built on this one (ckpt.sources): a tensor stand-in is a StoredTensor, whose
# `storage.key` names the archive member `data/<key>` holding its bytes.
StoredTensor = _Tensor


_PY2_NAMES = {("__builtin__", n): ("builtins", n) for n in ("set", "frozenset", "bytearray", "slice", "complex")}
_HASHING_CALLS = {("builtins", "set"), ("builtins", "frozenset"), ("collections", "Counter")}


class _Global:
    """A stand-in for a global the pickle names; calling it builds another stand-in, charged to its reader."""

    def __init__(self, module: str, name: str, reader: _ScanUnpickler):
        self.module, self.name, self.reader = module, name, reader

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = (self.module, self.name)
        charge_call(self.reader, key, args)
        if key in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3")):
            storage, offset, size = args[0], args[1], args[2]
            if not isinstance(storage, _Storage):
                return _Tensor([int(s) for s in size], "unknown")
            stride = args[3] if len(args) > 3 and isinstance(args[3], tuple | list) else None
            strides = [int(x) for x in stride] if stride is not None and all(type(x) is int for x in stride) else None
            dtype = storage.dtype
            if key[1] == "_rebuild_tensor_v3" and len(args) > 6 and args[6] in DTYPE_NAMES:
                dtype = args[6]  # an UntypedStorage (float8, uint16/32/64): the dtype is the 7th argument
            return _Tensor([int(s) for s in size], dtype, storage, offset if type(offset) is int else 0, strides)
        if key in (
            ("torch._utils", "_rebuild_parameter"),
            ("torch._utils", "_rebuild_parameter_with_state"),
            ("torch.nn.parameter", "Parameter"),
        ):
            return args[0] if args else None
        if key == ("collections", "OrderedDict"):
            return OrderedDict(*args)
        if key == ("torch", "Size"):
            return tuple(args[0]) if args else ()
        return _Opaque(self)

    def __repr__(self) -> str:
        return f"{self.module}.{self.name}"


def charge_call(reader: BoundedUnpickler, key: tuple[str, str], args: tuple[Any, ...]) -> None:
    """Charge `reader` for what calling global `key` on `args` costs torch's weights-only loader."""
    reader.charge_call(args)
    first = args[0] if args else None
    if key in _HASHING_CALLS and isinstance(first, list | tuple | set | frozenset | dict):
        reader.charge_keys(None, list(first))
    elif key == ("collections", "OrderedDict") and isinstance(first, list | tuple):
        reader.charge_keys(None, [p[0] for p in first if isinstance(p, tuple | list) and p])
    elif key == ("builtins", "bytearray") and isinstance(first, int):
        reader.budget.spend(1, max(0, first))  # bytearray(n) is n zero bytes


class _Opaque:
    def __init__(self, origin: _Global):
        self.origin = origin

    def __setstate__(self, state: Any) -> None:
        pass


class _Tolerant(dict):  # type: ignore[type-arg]
    """Stand-in class for an unknown global: takes any arguments, any state, and items or appends, so
    NEWOBJ and dict/list subclasses (Lightning's AttributeDict in `hyper_parameters`) load as stand-ins."""

    _reader: BoundedUnpickler
    _key: tuple[str, str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        charge_call(self._reader, self._key, args)

    def __setstate__(self, state: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


class _ScanUnpickler(BoundedUnpickler):
    """Reads a pickle with stand-ins for every global (tolerant classes for unknown ones), within `budget`."""

    def __init__(self, data: bytes, budget: Budget):
        super().__init__(data, budget)
        self.seen_globals: list[str] = []
        self._found: dict[tuple[str, str], Any] = {}

    def find_class(self, module: str, name: str) -> Any:  # never imports
        if self.proto < 3 and (module, name) in _PY2_NAMES:  # torch.save's protocol 2 names builtins as Python 2 did
            module, name = _PY2_NAMES[(module, name)]
        found = self._found.get((module, name))
        if found is None:
            self.budget.spend(1, 2400)  # a stand-in class costs about 2.4 KB
            found = self._found[(module, name)] = self._stand_in(module, name)
        return found

    def _stand_in(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in _UNTYPED_STORAGES:  # torch's weights-only loader admits it (its dtype comes later)
            return "unknown"
        if module == "torch" and name in DTYPE_NAMES:
            return name
        if (module, name) in _SAFE_GLOBALS:
            return _Global(module, name, self)
        if not (module == "builtins" and name in {"dict", "list", "tuple"}):
            self.seen_globals.append(f"{module}.{name}")
        attrs = {"__module__": "ckpt.formats.standin", "_reader": self, "_key": (module, name)}
        return type(name, (_Tolerant,), attrs)

    def persistent_load(self, pid: Any) -> Any:
        # ('storage', storage_type, key, location, numel)
        if isinstance(pid, tuple) and len(pid) >= 2 and pid[0] == "storage":
            st = pid[1]
            key = pid[2] if len(pid) >= 3 and isinstance(pid[2], str) else None
            return _Storage(st if isinstance(st, str) else "unknown", key)
        return _Storage("unknown")


def _key_name(key: Any) -> str:
    """A dict key as part of a tensor's name, without str() of anything big or deep."""
    if isinstance(key, str):
        return key
    if isinstance(key, bool | float) or key is None:
        return str(key)
    if isinstance(key, int):
        return str(key) if key.bit_length() < 64 else "<int>"
    return f"<{type(key).__name__}>"


def _tensors(reader: BoundedUnpickler, obj: Any) -> list[TensorInfo]:
    """Every stand-in tensor inside `obj`, named by its path ("layer.0.weight"), walked within the budget."""
    out: list[TensorInfo] = []

    def visit(value: Any, path: list[Any]) -> None:
        if isinstance(value, _Tensor):
            name = ".".join(_key_name(k) for k in path) or "<tensor>"
            reader.budget.spend(len(path), 64 + len(name) + 8 * len(value.shape))
            out.append(TensorInfo(name, value.shape, value.dtype))

    reader.walk(obj, visit)
    return out


def _archive_pickle(f: BinaryIO, path: Path) -> tuple[bytes, int] | None:
    """The bytes of the torch zip's `data.pkl` and the bytes it takes in the file; None without one.

    Raises zipfile.BadZipFile for a file that is no zip; IntegrityError for a zip bomb.
    """
    size = os.fstat(f.fileno()).st_size
    with zipfile.ZipFile(f) as zf:
        infos = zf.infolist()
        unpacked = sum(i.file_size for i in infos)
        if unpacked > UNPACK_RATIO * size + UNPACK_SLACK:
            raise IntegrityError(
                f"'{path}' unpacks to {unpacked:,} bytes from {size:,} (a zip bomb?); torch never compresses its"
                " archives, so ckpt reads none that unpacks to more than 4 times its size",
                path=path,
            )
        pkl = [i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
        if not pkl:
            return None
        with zf.open(pkl[0]) as member:  # zipfile stops at the declared size: nothing more is inflated
            return member.read(), pkl[0].compress_size


def _read_pickle(
    f: BinaryIO, path: Path, reader_type: type[_ScanUnpickler] | None = None
) -> tuple[Any, _ScanUnpickler] | None:
    """The torch zip's pickle, interpreted with stand-ins within its budget; None for a zip without one.

    Raises zipfile.BadZipFile for a file that is no zip, IntegrityError for a corrupt, hostile or too costly one.
    """
    try:
        found = _archive_pickle(f, path)
    except zipfile.BadZipFile:
        raise
    except CkptError:
        raise
    except Exception as e:  # OSError, zlib.error, and RuntimeError for an "encrypted" member...
        raise IntegrityError(f"'{path}' is a corrupt torch archive ({e})", path=path) from None
    if found is None:
        return None
    data, stored = found
    reader = (reader_type or _ScanUnpickler)(data, Budget.for_pickle(stored))
    try:
        return reader.load(), reader
    except TooComplex as e:
        raise _too_complex(path, e) from None
    except Exception as e:  # a hostile or truncated pickle: any failure means corrupt
        raise IntegrityError(f"'{path}' holds an unreadable pickle ({type(e).__name__})", path=path) from None


def read_torch_pickle(f: BinaryIO, path: Path) -> tuple[Any, BoundedUnpickler, list[str]]:
    """The pickle of the torch zip open as `f`, as stand-ins (each tensor a StoredTensor), the reader (whose
    `walk` goes through it within the same budget) and the globals outside torch's safe list it names.

    Nothing is imported or run. Raises IntegrityError for a file that is no torch zip, or a corrupt, hostile
    or too costly one.
    """
    try:
        found = _read_pickle(f, path)
    except zipfile.BadZipFile as e:
        raise IntegrityError(f"'{path}' is not a torch archive ({e})", path=path) from None
    if found is None:
        raise IntegrityError(f"'{path}' is a zip archive without data.pkl", path=path)
    obj, reader = found
    return obj, reader, sorted(set(reader.seen_globals))


def too_complex(path: Path, e: TooComplex) -> IntegrityError:
    """The error for a pickle at `path` that would cost more than its budget (refused as hostile)."""
    return _too_complex(path, e)


SAFETENSORS_DTYPES = _SAFETENSORS_DTYPES  # safetensors dtype code -> ckpt's dtype name


def _too_complex(path: Path, e: TooComplex) -> IntegrityError:
    return IntegrityError(
        f"'{path}' holds a pickle that needs {e.what}: refused as hostile",
        path=path,
        hint="limits: docs/reliability.md, 'Hostile files'",
    )


def _inspect_torch_zip(f: BinaryIO, path: Path) -> FileInfo:
    try:
        found = _read_pickle(f, path)
    except zipfile.BadZipFile as e:
        raise IntegrityError(f"'{path}' is a corrupt torch archive ({e})", path=path) from None
    if found is None:
        return FileInfo("unknown", note="a zip archive without data.pkl")
    obj, reader = found
    try:
        if _is_lightning(obj):
            # the model's weights are the state dict; callback and optimizer state are no parameters
            others = {str(k): len(_tensors(reader, v)) for k, v in obj.items() if k != "state_dict"}
            return FileInfo(
                "torch-zip",
                _tensors(reader, obj["state_dict"]),
                sorted(set(reader.seen_globals)),
                weights_under="state_dict",
                other_tensors={k: n for k, n in others.items() if n},
            )
        tensors = _tensors(reader, obj)
    except TooComplex as e:
        raise _too_complex(path, e) from None
    return FileInfo("torch-zip", tensors, sorted(set(reader.seen_globals)))


def _is_lightning(obj: Any) -> bool:
    """A Lightning checkpoint: a dict with a `state_dict` dict and Lightning's own top-level keys."""
    return (
        isinstance(obj, dict)
        and isinstance(obj.get("state_dict"), dict)
        and any(k in obj for k in ("pytorch-lightning_version", "global_step", "callbacks", "optimizer_states"))
    )


def top_level_scalars(path: Path) -> dict[str, int | float | str | bool]:
    """The top-level numbers, strings and booleans of a torch zip checkpoint's pickled dict.

    Lightning stores `epoch` and `global_step` there. Nothing is imported or run: every global is a
    stand-in. Returns {} for a file that is not a torch zip or not a dict; raises IntegrityError when
    corrupt, hostile or too costly to read, NotRegularFile for a FIFO or device.
    """
    path = Path(path)
    with fsutil.open_regular_file(path) as f:
        try:
            found = _read_pickle(f, path)
        except zipfile.BadZipFile:
            return {}
    if found is None:
        return {}
    obj = found[0]
    if not isinstance(obj, dict):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and type(v) in (int, float, str, bool)}


# --- what Lightning and the Trainer recorded about a run -----------------------------------------

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
            found = _read_pickle(f, path)  # within the pickle's budget, like `show`
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
    if not isinstance(v, _Tensor) or v.storage is None or v.storage.key is None or any(d != 1 for d in v.shape):
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


class _Kept(_Tolerant):
    """A stand-in that keeps the state the pickle gives it (the fields of a pickled dataclass)."""

    def __setstate__(self, state: Any) -> None:
        self.kept = state


class _StateUnpickler(_ScanUnpickler):
    """A reader whose stand-ins for unknown classes keep their pickled state (`_Kept`)."""

    def _stand_in(self, module: str, name: str) -> Any:
        found = super()._stand_in(module, name)
        if isinstance(found, type) and issubclass(found, _Tolerant):
            attrs = {"__module__": "ckpt.formats.standin", "_reader": self, "_key": (module, name)}
            return type(name, (_Kept,), attrs)
        return found


def read_training_args(path: Path) -> dict[str, int | float | str | bool | None]:
    """The plain fields (numbers, strings, booleans, None) of a Trainer's `training_args.bin`: a pickled
    `TrainingArguments`, read with stand-ins for every global, so nothing is imported or run.

    Returns {} for a file that cannot be read that way (missing, corrupt, an older format).
    """
    try:
        with fsutil.open_regular_file(path) as f:
            found = _read_pickle(f, path, _StateUnpickler)
    except Exception:  # anything unreadable (or hostile): the caller goes on without it
        return {}
    if found is None:
        return {}
    obj = found[0]
    fields = getattr(obj, "kept", None)
    if not isinstance(fields, dict):
        return {}
    return {k: v for k, v in fields.items() if isinstance(k, str) and (v is None or type(v) in (int, float, str, bool))}


def read_safetensors_header(path: Path, f: BinaryIO | None = None) -> tuple[dict[str, Any], int]:
    """The safetensors JSON header and the offset where tensor data begins (read from `f` when given)."""
    try:
        with contextlib.nullcontext(f) if f is not None else fsutil.open_regular_file(path) as src:
            src.seek(0)
            head = src.read(8)
            if len(head) < 8:
                raise IntegrityError(f"'{path}' is too short to be safetensors", path=path)
            (n,) = struct.unpack("<Q", head)
            if n > 100 * 1024 * 1024:
                raise IntegrityError(f"'{path}' has an implausible safetensors header", path=path)
            raw = src.read(n)
    except CkptError:
        raise
    except OSError as e:
        raise IntegrityError(f"cannot read '{path}': {e.strerror}", path=path) from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: JSON nested thousands deep
        raise IntegrityError(f"'{path}' has a corrupt safetensors header", path=path) from None
    return header, 8 + n


def _inspect_safetensors(path: Path, f: BinaryIO | None = None) -> FileInfo:
    header, _ = read_safetensors_header(path, f)
    tensors = []
    for name, meta in header.items():
        if name == "__metadata__" or not isinstance(meta, dict):
            continue
        shape = meta.get("shape", [])
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise IntegrityError(f"'{path}': tensor '{name}' has a corrupt shape", path=path)
        tensors.append(TensorInfo(name, shape, _SAFETENSORS_DTYPES.get(str(meta.get("dtype")), str(meta.get("dtype")))))
    return FileInfo("safetensors", tensors)


def weights_file(path: Path) -> Path:
    """For a checkpoint folder, the file that holds the model weights; for a file, the file itself."""
    if not path.is_dir():
        return path
    for name in ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth", "mp_rank_00_model_states.pt"):
        if (path / name).is_file():
            return path / name
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt"):
        found = sorted(p for p in path.glob(pattern) if p.is_file() and not p.name.startswith("optimizer"))
        if found:
            return found[0]
    raise IntegrityError(f"checkpoint folder '{path}' holds no weights file", path=path)


def inspect_file(path: Path) -> FileInfo:
    """What the checkpoint at `path` holds (tensor names, shapes, dtypes), without running any of it.

    The work is bounded (docs/reliability.md, "Hostile files"). Raises IntegrityError for a corrupt,
    hostile or too costly file, NotRegularFile (an IntegrityError) for a FIFO, device or socket.
    """
    path = weights_file(path)
    with _open(path) as f:
        return _inspect_open(f, path)


def _open(path: Path) -> BinaryIO:
    try:
        return fsutil.open_regular_file(path)
    except CkptError:
        raise
    except OSError as e:
        raise IntegrityError(f"cannot read '{path}': {e.strerror}", path=path) from None


def _inspect_open(f: BinaryIO, path: Path) -> FileInfo:
    try:
        magic = f.read(8)
    except OSError as e:
        raise IntegrityError(f"cannot read '{path}': {e.strerror}", path=path) from None
    if magic[:4] == b"PK\x03\x04":
        return _inspect_torch_zip(f, path)
    if len(magic) == 8 and struct.unpack("<Q", magic)[0] < 100 * 1024 * 1024:
        try:
            return _inspect_safetensors(path, f)
        except IntegrityError:
            pass
    return FileInfo("unknown", note=not_readable_note(magic))


_LEGACY_TORCH = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."  # torch.save's magic number, pickled: the pre-zip format


def not_readable_note(head: bytes) -> str:
    """What a file that is neither a torch zip nor safetensors is, from its first bytes (8 suffice)."""
    if head.startswith(_LEGACY_TORCH[:8]):
        return "a legacy (non-zip) torch.save file, which ckpt does not read; re-save it with torch >= 1.6"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a bare pickle (not a torch archive or safetensors file), which ckpt does not read"
    return "not a torch archive or safetensors file"


# --- loading (needs torch) ----------------------------------------------------------------------


class StateDictMismatch(UsageError):
    """A checkpoint's tensors do not fit the network: `missing`, `unexpected` and `mismatched` name the keys."""

    def __init__(
        self,
        message: str,
        *,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[str],
        path: Path | str | None = None,
        hint: str | None = None,
    ):
        super().__init__(message, path=path, hint=hint)
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched


# Containers that training code commonly wraps the weights in (Lightning, plain training loops).
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


def load_state_dict(path: Path, *, unsafe: bool = False, map_location: str = "cpu") -> dict[str, Any]:
    """Load a checkpoint's tensors safely: safetensors, or `torch.load(weights_only=True)`.

    Lightning checkpoints give their `state_dict` (and `{"model": ..., "optimizer": ...}` dicts their
    `model`). Raises UnsafeFileError (exit 6) for a file that needs full unpickling, naming the
    offending globals, unless `unsafe` is true; IntegrityError for a corrupt file.
    """
    import torch

    require_safe_torch()
    path = weights_file(Path(path))
    # one open file for the check and the load: what torch reads is what was checked
    with _open(path) as f:
        info = _inspect_open(f, path)  # bounded: a hostile pickle is refused before torch walks it
        if info.format == "safetensors":
            return _load_safetensors(path, f)
        f.seek(0)
        try:
            obj = torch.load(f, map_location=map_location, weights_only=not unsafe)
        except pickle.UnpicklingError as e:
            names = ", ".join(info.unsafe_globals) or _offending_global(str(e))
            raise UnsafeFileError(
                f"'{path}' needs full unpickling to load, which could run code: it names {names}",
                path=path,
                hint="load only files you trust, with --unsafe-load",
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise IntegrityError(f"cannot load '{path}': {first}", path=path) from None
    obj = _unwrap(obj, torch.Tensor)
    if not isinstance(obj, dict):
        raise IntegrityError(f"'{path}' does not hold a state dict (it holds a {type(obj).__name__})", path=path)
    return obj


MIN_TORCH = (2, 10)


def require_safe_torch() -> None:
    """Raise CkptError when the installed torch is older than 2.10 (known `weights_only` bypasses)."""
    import re

    import torch

    found = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    if found < MIN_TORCH:
        raise CkptError(
            f"torch {torch.__version__} is too old to load checkpoints safely (weights_only has known bypasses"
            f" before {MIN_TORCH[0]}.{MIN_TORCH[1]})",
            hint="upgrade: pip install -U 'torch>=2.10'",
        )


def _unwrap(obj: Any, tensor_type: type) -> Any:
    for _ in range(3):  # e.g. {"state_dict": {...}} or {"model": {...}, "optimizer": {...}, "epoch": 3}
        if not isinstance(obj, dict) or all(isinstance(v, tensor_type) for v in obj.values()):
            return obj
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            return obj
        obj = inner
    return obj


def fit_state_dict(
    state: dict[str, Any], expected: dict[str, tuple[int, ...]], *, path: Path | str | None = None
) -> dict[str, Any]:
    """`state` with its keys made to match `expected` (key -> shape of the network's own state dict).

    A common prefix is stripped where that makes the keys match: `model.` (Lightning), `module.`
    (DataParallel, DistributedDataParallel), `_orig_mod.` (torch.compile), or any other one; keys
    outside a stripped prefix belong to the wrapper (a loss, metrics) and are dropped. Raises
    StateDictMismatch listing the missing, unexpected and wrongly shaped keys.
    """
    want = set(expected)
    best_prefix, best_score = "", len(want & set(state))
    if best_score < len(want):
        counts: dict[str, int] = {}
        for key in state:
            parts = key.split(".")
            for i in range(1, len(parts)):
                prefix = ".".join(parts[:i]) + "."
                if key[len(prefix) :] in want:
                    counts[prefix] = counts.get(prefix, 0) + 1
        if counts:
            prefix, score = min(counts.items(), key=lambda kv: (-kv[1], len(kv[0])))
            if score > best_score:
                best_prefix, best_score = prefix, score
    if best_prefix:
        fitted = {k[len(best_prefix) :]: v for k, v in state.items() if k.startswith(best_prefix)}
    else:
        fitted = dict(state)
    missing = sorted(want - set(fitted))
    unexpected = sorted(set(fitted) - want)
    mismatched = sorted(
        f"{k} (file {tuple(fitted[k].shape)}, network {tuple(expected[k])})"
        for k in want & set(fitted)
        if hasattr(fitted[k], "shape") and tuple(fitted[k].shape) != tuple(expected[k])
    )
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
                parts.append(f"{label} ({len(keys)}): {shown}")
        where = f"'{path}'" if path is not None else "the checkpoint"
        raise StateDictMismatch(
            f"{where} does not fit the network: " + "; ".join(parts),
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
            path=path,
            hint="check the architecture (--arch) and its keyword arguments (--arch-kwargs)",
        )
    return fitted


def _offending_global(message: str) -> str:
    import re

    found = re.findall(r"GLOBAL ([\w.]+)", message)
    return ", ".join(dict.fromkeys(found)) if found else "a global outside torch's safe list"


def _load_safetensors(path: Path, f: BinaryIO) -> dict[str, Any]:
    import torch

    header, start = read_safetensors_header(path, f)
    dtypes = {k: getattr(torch, v) for k, v in _SAFETENSORS_DTYPES.items() if hasattr(torch, v)}
    f.seek(0)
    data = f.read()
    out: dict[str, Any] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = dtypes[meta["dtype"]]
            a, b = meta["data_offsets"]
            buf = bytearray(data[start + a : start + b])
            t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            out[name] = t.reshape(meta["shape"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise IntegrityError(f"'{path}': tensor '{name}' is corrupt ({e})", path=path) from None
    return out
