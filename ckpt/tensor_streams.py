"""The tensors of single checkpoint files (torch zips, safetensors, sharded safetensors) as `Entry`s that stream
their bytes (little-endian, C order) in pieces, read from metadata only, without torch."""

from __future__ import annotations

import functools
import json
import os
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

from .errors import CkptError, IntegrityError, UsageError
from .formats import (
    ITEMSIZE,
    SAFETENSORS_DTYPES,
    WRAPPER_KEYS,
    StoredTensor,
    open_checkpoint,
    read_safetensors_header,
    read_torch_pickle,
    too_complex,
)
from .layouts import BIN_INDEX_SUFFIX, INDEX_SUFFIX
from .unpickle import BoundedUnpickler, TooComplex

PIECE = 16 << 20  # bytes read and written at a time: the memory a plain copy holds


def numel(shape: list[int]) -> int:
    """The number of elements of a tensor of `shape`."""
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(slots=True)
class Entry:
    """One tensor of the state dict: its name (below the chosen key), dtype, shape, where it is stored, and
    `pieces()`, which yields its bytes (little-endian, C order) a piece at a time."""

    name: str
    dtype: str
    shape: list[int]
    pieces: Callable[[], Iterator[bytes]]
    shard: str | None = None  # the file it is in, for a sharded or distributed checkpoint
    split: str | None = None  # how a DCP tensor is split into chunks

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * ITEMSIZE.get(self.dtype, 0)


@dataclass(slots=True)
class Contents:
    """What a checkpoint holds, from its metadata: the tensors of the state dict chosen (`key`), the other
    keys one could choose, how many files (shards) the tensors are in, and what reading would need."""

    format: str  # torch-zip, safetensors, safetensors-sharded, dcp, deepspeed
    entries: list[Entry]
    key: str | None = None  # where the state dict is: "state_dict", "module", "model"...; None: the whole file
    keys: dict[str, int] = field(default_factory=dict)  # other keys holding tensors -> how many
    shards: int = 1
    unsafe_globals: list[str] = field(default_factory=list)
    layout: str | None = None  # how the tensors are split, in words
    others: list[str] = field(default_factory=list)  # non-tensor items (DCP)
    problem: str | None = None  # why the weights cannot be exported as they are (ZeRO-3)

    @property
    def parameters(self) -> int:
        return sum(numel(e.shape) for e in self.entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def copy_range(path: Path, start: int, length: int) -> Iterator[bytes]:
    """The `length` bytes of `path` from `start`, a piece at a time; IntegrityError when the file ends first."""
    with open_checkpoint(path) as f:
        f.seek(start)
        left = length
        while left:
            piece = f.read(min(PIECE, left))
            if not piece:
                raise IntegrityError(f"'{path}' ends before its tensors do (truncated?)", path=path)
            left -= len(piece)
            yield piece


# --- torch zip archives (whole files, or archives inside a file: DCP's chunks) ----------------------------


class _Window:
    """The bytes [start, start + length) of an open file, as a file of their own (for zipfile)."""

    def __init__(self, f: BinaryIO, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def fileno(self) -> int:
        return self.f.fileno()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, min(self.length, base + offset))
        return self.pos

    def read(self, n: int = -1) -> bytes:
        left = self.length - self.pos
        n = left if n is None or n < 0 else min(n, left)
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        self.pos += len(data)
        return data

    def close(self) -> None:
        pass


@dataclass(slots=True)
class Archive:
    """A torch zip's pickled object (stand-ins), its reader, and where each data member's bytes start."""

    path: Path
    obj: Any
    reader: BoundedUnpickler
    unsafe: list[str]
    members: dict[str, tuple[int, int]]  # storage key -> (absolute start in the file, size)
    big_endian: bool


def open_archive(path: Path, start: int = 0, length: int | None = None) -> Archive:
    """The torch zip at `path` (or the `length` bytes of it from `start`: a DCP chunk) read as an Archive;
    raises IntegrityError for a corrupt, truncated or hostile one."""
    with open_checkpoint(path) as f:
        size = os.fstat(f.fileno()).st_size
        length = size - start if length is None else length
        if start + length > size:
            raise IntegrityError(f"'{path}' ends before the archive at byte {start:,} does (truncated?)", path=path)
        w = _Window(f, start, length)
        obj, reader, unsafe = read_torch_pickle(cast(BinaryIO, w), path)
        members: dict[str, tuple[int, int]] = {}
        big = False
        try:
            with zipfile.ZipFile(w) as zf:
                for info in zf.infolist():
                    head, _, tail = info.filename.rpartition("/data/")
                    if info.filename.endswith("/byteorder") or info.filename == "byteorder":
                        with zf.open(info) as m:
                            big = m.read(16).strip() == b"big"
                    if not head or "/" in tail or not tail:
                        continue
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise IntegrityError(
                            f"'{path}': tensor data '{tail}' is compressed; torch never does", path=path
                        )
                    w.seek(info.header_offset)
                    local = w.read(30)
                    if len(local) < 30 or local[:4] != b"PK\x03\x04":
                        raise IntegrityError(f"'{path}' is a corrupt torch archive (member '{tail}')", path=path)
                    n, e = struct.unpack("<HH", local[26:30])
                    data_start = info.header_offset + 30 + n + e
                    if data_start + info.file_size > length:
                        raise IntegrityError(
                            f"'{path}': tensor data '{tail}' lies past its end (truncated?)", path=path
                        )
                    members[tail] = (start + data_start, info.file_size)
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise IntegrityError(f"'{path}' is a corrupt torch archive ({e})", path=path) from None
    return Archive(path, obj, reader, unsafe, members, big)


def contiguous(shape: list[int], stride: list[int] | None) -> bool:
    """Whether `stride` lays out a tensor of `shape` in C order without gaps (None: no stride given)."""
    if stride is None:
        return True
    expect = 1
    for d, s in zip(reversed(shape), reversed(stride), strict=False):
        if d != 1 and s != expect:
            return False
        expect *= d
    return True


def stored_pieces(a: Archive, name: str, t: StoredTensor) -> Callable[[], Iterator[bytes]]:
    """A reader of stand-in tensor `t`'s bytes out of archive `a`, checked against the member's size now."""
    itemsize = ITEMSIZE.get(t.dtype)
    key = t.storage.key if t.storage is not None else None
    if itemsize is None or key is None or key not in a.members:
        raise IntegrityError(f"'{a.path}': tensor '{name}' has no readable storage ({t.dtype})", path=a.path)
    start, size = a.members[key]
    if any(type(d) is not int or d < 0 for d in t.shape):
        raise IntegrityError(f"'{a.path}': tensor '{name}' has a negative size", path=a.path)
    n = numel(t.shape)
    if n * itemsize > 4 * size + (64 << 20):  # a view (stride 0: expand) far larger than its bytes: not made
        raise IntegrityError(
            f"'{a.path}': tensor '{name}' is a view of {n * itemsize:,} bytes over a storage of {size:,}",
            path=a.path,
            hint="ckpt exports no view more than 4 times larger than what the file stores",
        )
    stride = t.stride if t.stride is not None and len(t.stride) == len(t.shape) else None
    if n == 0:
        return lambda: iter(())
    last = t.offset + (sum((d - 1) * s for d, s in zip(t.shape, stride, strict=True)) if stride else n - 1)
    if t.offset < 0 or (stride and min(stride) < 0) or (last + 1) * itemsize > size:
        raise IntegrityError(f"'{a.path}': tensor '{name}' lies outside its storage", path=a.path)
    if contiguous(t.shape, stride) and not (a.big_endian and itemsize > 1):
        return lambda: copy_range(a.path, start + t.offset * itemsize, n * itemsize)

    def gathered() -> Iterator[bytes]:  # a view (a transposed weight, a slice) or big-endian: made whole in memory
        np = need_numpy("a non-contiguous or big-endian tensor")
        flat = np.frombuffer(b"".join(copy_range(a.path, start, (last + 1) * itemsize)), dtype=np.uint8)
        view = np.lib.stride_tricks.as_strided(
            flat[t.offset * itemsize :],
            shape=[*t.shape, itemsize],
            strides=[s * itemsize for s in (stride or _strides(t.shape))] + [1],
        )
        out = np.ascontiguousarray(view)
        if a.big_endian:  # each number's bytes reversed (each half of a complex one)
            unit = itemsize // 2 if t.dtype.startswith("complex") else itemsize
            out = out.reshape([*t.shape, itemsize // unit, unit])[..., ::-1]
        yield np.ascontiguousarray(out).tobytes()

    return gathered


def _strides(shape: list[int]) -> list[int]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return out[::-1]


def need_numpy(why: str) -> Any:
    """numpy, imported; raises CkptError naming `why` when it is not installed."""
    try:
        import numpy
    except ImportError:
        raise CkptError(f"reading {why} needs numpy", hint="pip install 'ckpt[torch]' (or just numpy)") from None
    return numpy


def _name(path: list[Any]) -> str:
    return ".".join(str(k) if isinstance(k, str | int) else f"<{type(k).__name__}>" for k in path)


def tensors_of(a: Archive, obj: Any) -> list[tuple[str, StoredTensor]]:
    """(name, stand-in) of every tensor inside `obj` of archive `a`, walked within the archive's budget."""
    out: list[tuple[str, StoredTensor]] = []

    def visit(value: Any, path: list[Any]) -> None:
        if isinstance(value, StoredTensor):
            out.append((_name(path) or "<tensor>", value))

    try:
        a.reader.walk(obj, visit)
    except TooComplex as e:
        raise too_complex(a.path, e) from None
    return out


def at_key(obj: Any, key: str) -> Any:
    """The value at dotted `key` ("state.model") in nested dicts, or None."""
    for part in key.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _default_key(obj: Any) -> str | None:
    """Where a training script's file keeps the weights: Lightning's `state_dict`, DeepSpeed's `module`,
    Composer's `state.model`, a loop's `model`...; None when the file is the state dict itself."""
    if not isinstance(obj, dict) or all(isinstance(v, StoredTensor) for v in obj.values()):
        return None
    if isinstance(obj.get("module"), dict) and "ds_version" in obj:
        return "module"
    if isinstance(at_key(obj, "state.model"), dict):
        return "state.model"
    return next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)


def zip_contents(path: Path, key: str | None, fmt: str = "torch-zip") -> Contents:
    """The Contents of the torch zip at `path`, the state dict at `key` (default: where the weights are)."""
    a = open_archive(path)
    chosen = key if key is not None else _default_key(a.obj)
    inner = a.obj if chosen is None else at_key(a.obj, chosen)
    if inner is None:
        raise UsageError(f"'{path}' has no key '{key}'", hint=f"keys holding tensors: {_keys_hint(a)}")
    entries = [Entry(n, t.dtype, t.shape, stored_pieces(a, n, t)) for n, t in tensors_of(a, inner)]
    keys: dict[str, int] = {}
    if isinstance(a.obj, dict):
        for k, v in a.obj.items():
            if isinstance(k, str) and k != chosen and (chosen is None or not chosen.startswith(k + ".")):
                n = len(tensors_of(a, v))
                if n and chosen is not None:
                    keys[k] = n
    return Contents(fmt, entries, chosen, keys, 1, a.unsafe)


def _keys_hint(a: Archive) -> str:
    if not isinstance(a.obj, dict):
        return "none (the file is one object)"
    return ", ".join(str(k) for k, v in a.obj.items() if isinstance(k, str) and tensors_of(a, v)) or "none"


# --- safetensors, one file or shards -------------------------------------------------------------------


def safetensors_entries(path: Path, shard: str | None = None) -> list[Entry]:
    """The tensors of the safetensors file at `path`, in file order, checked against its size."""
    header, start = read_safetensors_header(path)
    size = path.stat().st_size
    out: list[tuple[int, Entry]] = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[meta["dtype"]]
            shape = [int(d) for d in meta["shape"]]
            a, b = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise IntegrityError(f"'{path}': tensor '{name}' has a corrupt header entry", path=path) from None
        if b - a != numel(shape) * ITEMSIZE[dtype] or a < 0:
            raise IntegrityError(f"'{path}': tensor '{name}' has offsets that do not fit its shape", path=path)
        if start + b > size:
            raise IntegrityError(f"'{path}': tensor '{name}' lies past the end of the file (truncated?)", path=path)
        out.append((a, Entry(name, dtype, shape, functools.partial(copy_range, path, start + a, b - a), shard=shard)))
    out.sort(key=lambda x: x[0])
    return [e for _, e in out]


def _index_file(folder: Path) -> Path:
    found = sorted(p for p in folder.iterdir() if p.name.endswith((INDEX_SUFFIX, BIN_INDEX_SUFFIX)) and p.is_file())
    preferred = [p for p in found if p.name in ("model" + INDEX_SUFFIX, "pytorch_model" + BIN_INDEX_SUFFIX)]
    return (preferred or found)[0]  # safetensors first: a folder holding both has the same weights twice


def sharded_contents(folder: Path) -> Contents:
    """The Contents of a folder of safetensors shards with their index, checked against it."""
    index = _index_file(folder)
    try:
        with open_checkpoint(index) as f:
            doc = json.loads(f.read(64 << 20))
        weight_map = doc["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError
    except (ValueError, KeyError, TypeError, RecursionError):
        raise IntegrityError(f"'{index}' is not a safetensors index (no weight_map)", path=index) from None
    shards = sorted(set(weight_map.values()))
    entries: list[Entry] = []
    seen: dict[str, str] = {}
    unsafe: set[str] = set()
    for shard in shards:
        p = folder / shard
        if "/" in shard or shard.startswith(".") or not p.is_file():
            raise IntegrityError(
                f"'{index}' maps tensors to '{shard}', which is missing",
                path=index,
                hint="copy the whole checkpoint folder again",
            )
        if shard.endswith(".safetensors"):
            in_shard = safetensors_entries(p, shard)
        else:
            part = zip_contents(p, None)
            unsafe.update(part.unsafe_globals)
            in_shard = part.entries
            for e in in_shard:
                e.shard = shard
        for e in in_shard:
            if e.name in seen:
                raise IntegrityError(
                    f"'{folder}': tensor '{e.name}' is in two shards, {seen[e.name]} and {shard}", path=folder
                )
            seen[e.name] = shard
            if weight_map.get(e.name) != shard:
                where = f"maps it to '{weight_map[e.name]}'" if e.name in weight_map else "does not list it"
                raise IntegrityError(
                    f"'{folder}': tensor '{e.name}' is in '{shard}' but the index {where}", path=folder
                )
            entries.append(e)
    missing = sorted(set(weight_map) - set(seen))
    if missing:
        raise IntegrityError(
            f"'{folder}': the index lists {len(missing)} tensor(s) no shard holds: {', '.join(missing[:5])}",
            path=folder,
        )
    order = {name: i for i, name in enumerate(weight_map)}
    entries.sort(key=lambda e: order[e.name])
    layout = f"{len(entries)} tensors in {len(shards)} shard(s), listed in {index.name}"
    fmt = "safetensors-sharded" if index.name.endswith(INDEX_SUFFIX) else "torch-sharded"
    return Contents(fmt, entries, None, {}, len(shards), sorted(unsafe), layout=layout)
