"""Reading checkpoint files without running them: torch zip archives, safetensors, and folders of files.

`inspect_file` never imports torch and never runs code from the file: it reads the zip index and
interprets the pickle with stand-ins for every global. Loading with torch is in loading.py, what
Lightning and the Trainer record in lightning_state.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from . import fsutil
from .errors import CkptError, IntegrityError
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
SAFETENSORS_DTYPES = {  # safetensors dtype code -> ckpt's dtype name
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
# the keys training code commonly keeps the weights under (Lightning, DeepSpeed, plain training loops)
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
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


class StoredTensor:
    """A tensor stand-in: its shape and dtype, and where its bytes are (`storage.key` names the archive
    member `data/<key>` that holds them)."""

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


_PY2_NAMES = {("__builtin__", n): ("builtins", n) for n in ("set", "frozenset", "bytearray", "slice", "complex")}
_HASHING_CALLS = {("builtins", "set"), ("builtins", "frozenset"), ("collections", "Counter")}


class _Global:
    """A stand-in for a global the pickle names; calling it builds another stand-in, charged to its reader."""

    def __init__(self, module: str, name: str, reader: ScanUnpickler):
        self.module, self.name, self.reader = module, name, reader

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = (self.module, self.name)
        charge_call(self.reader, key, args)
        if key in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3")):
            storage, offset, size = args[0], args[1], args[2]
            if not isinstance(storage, _Storage):
                return StoredTensor([int(s) for s in size], "unknown")
            stride = args[3] if len(args) > 3 and isinstance(args[3], tuple | list) else None
            strides = [int(x) for x in stride] if stride is not None and all(type(x) is int for x in stride) else None
            dtype = storage.dtype
            if key[1] == "_rebuild_tensor_v3" and len(args) > 6 and args[6] in DTYPE_NAMES:
                dtype = args[6]  # an UntypedStorage (float8, uint16/32/64): the dtype is the 7th argument
            return StoredTensor([int(s) for s in size], dtype, storage, offset if type(offset) is int else 0, strides)
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


class Tolerant(dict):  # type: ignore[type-arg]
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


class ScanUnpickler(BoundedUnpickler):
    """Reads a pickle with stand-ins for every global (tolerant classes for unknown ones), within `budget`."""

    stand_in_class: type[Tolerant] = Tolerant  # the base of the stand-in for an unknown class

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
        return type(name, (self.stand_in_class,), attrs)

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
        if isinstance(value, StoredTensor):
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


def read_pickle(
    f: BinaryIO, path: Path, reader_type: type[ScanUnpickler] | None = None
) -> tuple[Any, ScanUnpickler] | None:
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
    reader = (reader_type or ScanUnpickler)(data, Budget.for_pickle(stored))
    try:
        return reader.load(), reader
    except TooComplex as e:
        raise too_complex(path, e) from None
    except Exception as e:  # a hostile or truncated pickle: any failure means corrupt
        raise IntegrityError(f"'{path}' holds an unreadable pickle ({type(e).__name__})", path=path) from None


def read_torch_pickle(f: BinaryIO, path: Path) -> tuple[Any, BoundedUnpickler, list[str]]:
    """The pickle of the torch zip open as `f`, as stand-ins (each tensor a StoredTensor), the reader (whose
    `walk` goes through it within the same budget) and the globals outside torch's safe list it names.

    Nothing is imported or run. Raises IntegrityError for a file that is no torch zip, or a corrupt, hostile
    or too costly one.
    """
    try:
        found = read_pickle(f, path)
    except zipfile.BadZipFile as e:
        raise IntegrityError(f"'{path}' is not a torch archive ({e})", path=path) from None
    if found is None:
        raise IntegrityError(f"'{path}' is a zip archive without data.pkl", path=path)
    obj, reader = found
    return obj, reader, sorted(set(reader.seen_globals))


def too_complex(path: Path, e: TooComplex) -> IntegrityError:
    """The error for a pickle at `path` that would cost more than its budget (refused as hostile)."""
    return IntegrityError(
        f"'{path}' holds a pickle that needs {e.what}: refused as hostile",
        path=path,
        hint="limits: docs/reliability.md, 'Hostile files'",
    )


def _inspect_torch_zip(f: BinaryIO, path: Path) -> FileInfo:
    try:
        found = read_pickle(f, path)
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
        raise too_complex(path, e) from None
    return FileInfo("torch-zip", tensors, sorted(set(reader.seen_globals)))


def _is_lightning(obj: Any) -> bool:
    """A Lightning checkpoint: a dict with a `state_dict` dict and Lightning's own top-level keys."""
    return (
        isinstance(obj, dict)
        and isinstance(obj.get("state_dict"), dict)
        and any(k in obj for k in ("pytorch-lightning_version", "global_step", "callbacks", "optimizer_states"))
    )


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
        tensors.append(TensorInfo(name, shape, SAFETENSORS_DTYPES.get(str(meta.get("dtype")), str(meta.get("dtype")))))
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
    with open_checkpoint(path) as f:
        return inspect_open(f, path)


def open_checkpoint(path: Path) -> BinaryIO:
    """The regular file at `path`, open for reading; raises IntegrityError (NotRegularFile for a FIFO or device)."""
    try:
        return fsutil.open_regular_file(path)
    except CkptError:
        raise
    except OSError as e:
        raise IntegrityError(f"cannot read '{path}': {e.strerror}", path=path) from None


def inspect_open(f: BinaryIO, path: Path) -> FileInfo:
    """`inspect_file` of the file open as `f` (read from its start)."""
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
