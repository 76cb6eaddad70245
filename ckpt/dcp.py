"""Reading a PyTorch distributed checkpoint's `.metadata` without torch and without running its pickle.

`.metadata` is a pickle of `torch.distributed.checkpoint.metadata.Metadata`. It is read with the bounded
unpickler (ckpt.unpickle) and an allow-list of exactly the globals that files written by torch >= 2.4
name: DCP's metadata classes, `torch.Size`, dtypes, the layout and memory-format encodings, `pathlib`
paths and `OrderedDict`. Each becomes an inert stand-in; any other global is refused (UnsafeFileError,
exit 6) before anything is built from it.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fsutil
from .errors import CkptError, IntegrityError, UnsafeFileError
from .formats import DTYPE_NAMES, ITEMSIZE
from .unpickle import BoundedUnpickler, Budget, TooComplex

METADATA_FILE = ".metadata"
_META = "torch.distributed.checkpoint.metadata"
_RECORDS = {
    (_META, "Metadata"),
    (_META, "TensorStorageMetadata"),
    (_META, "TensorProperties"),
    (_META, "ChunkStorageMetadata"),
    (_META, "BytesStorageMetadata"),
    (_META, "MetadataIndex"),
    (_META, "StorageMeta"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
}
_CALLS = {
    (_META, "_MEM_FORMAT_ENCODING"),  # an Enum, called with its value
    ("torch.serialization", "_get_layout"),  # called with "torch.strided"
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("pathlib", "Path"),
}
MAX_METADATA = 1 << 30


class _Record:
    """A stand-in for one of DCP's metadata classes: keeps the state the pickle gives it, runs nothing."""

    kind = ""
    state: Any = None  # NEWOBJ makes the object with __new__: nothing is set before BUILD

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def get(self, name: str, index: int | None = None) -> Any:
        """A field by name (a dataclass's state dict) or, for a tuple state, by position."""
        state = (
            self.state[1]
            if isinstance(self.state, tuple) and len(self.state) == 2 and self.state[0] is None
            else self.state
        )
        if isinstance(state, dict):
            return state.get(name)
        if isinstance(state, tuple) and index is not None and index < len(state):
            return state[index]
        return None


class _Call:
    def __init__(self, key: tuple[str, str], reader: BoundedUnpickler):
        self.key, self.reader = key, reader

    def __call__(self, *args: Any) -> Any:
        self.reader.charge_call(args)
        first = args[0] if args else None
        if self.key == ("torch", "Size"):
            return tuple(first) if isinstance(first, tuple | list) else ()
        if self.key == ("collections", "OrderedDict"):
            return dict(first) if isinstance(first, list | tuple) else {}
        if self.key[0] == "pathlib":
            return "/".join(a for a in args if isinstance(a, str))
        return first  # a layout's name, a memory format's code


class _MetadataUnpickler(BoundedUnpickler):
    def __init__(self, data: bytes, budget: Budget):
        super().__init__(data, budget)
        self._classes: dict[tuple[str, str], Any] = {}

    def find_class(self, module: str, name: str) -> Any:  # never imports
        key = (module, name)
        if key in self._classes:
            return self._classes[key]
        self.budget.spend(1, 2400)
        if key in _RECORDS:
            found: Any = type(name, (_Record,), {"kind": name, "__module__": "ckpt.dcp.standin"})
        elif key in _CALLS:
            found = _Call(key, self)
        elif module == "torch" and name in DTYPE_NAMES:
            found = name
        else:
            raise UnsafeFileError(f"global {module}.{name}")
        self._classes[key] = found
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("a persistent id in DCP metadata")


@dataclass(slots=True)
class Chunk:
    """One stored piece of a tensor: where it sits in the whole (offsets, sizes) and in the files."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int


@dataclass(slots=True)
class DcpTensor:
    name: str  # the flattened name, "model.layer.weight"
    path: tuple[str, ...]  # the keys in the saved state dict, ("model", "layer.weight") for a dict of dicts
    dtype: str
    shape: list[int]
    chunks: list[Chunk] = field(default_factory=list)


@dataclass(slots=True)
class DcpMetadata:
    """What a DCP folder's `.metadata` says: every tensor with its chunks, and the other (pickled) items."""

    tensors: list[DcpTensor]
    others: list[str]  # names of non-tensor items (saved as bytes: a step count, a scheduler's state...)
    files: list[str]  # the .distcp files the chunks are in
    version: str | None
    transformed: bool  # chunks written through a transform (compression...): not readable as torch archives


def read_metadata(folder: Path) -> DcpMetadata:
    """The metadata of the DCP checkpoint in `folder` (its `.metadata` file).

    Raises UnsafeFileError (exit 6) when the pickle names a global outside DCP's own, IntegrityError when it is
    corrupt, too costly to read, or does not describe a DCP checkpoint.
    """
    path = folder / METADATA_FILE
    try:
        with fsutil.open_regular_file(path) as f:
            data = f.read(MAX_METADATA + 1)
    except CkptError:
        raise
    except OSError as e:
        raise IntegrityError(f"cannot read '{path}': {e.strerror}", path=path) from None
    if len(data) > MAX_METADATA:
        raise IntegrityError(f"'{path}' is larger than 1 GiB: not DCP metadata", path=path)
    reader = _MetadataUnpickler(data, Budget.for_pickle(len(data)))
    try:
        root = reader.load()
        reader.walk(root, lambda obj, path: None)  # what is read below is within the budget
    except UnsafeFileError as e:
        raise UnsafeFileError(
            f"'{path}' names {e}, which DCP metadata never does: refused, nothing of it was run",
            path=path,
            hint="only DCP's own classes are read from .metadata; see docs/formats-checkpoints.md",
        ) from None
    except TooComplex as e:
        raise IntegrityError(f"'{path}' holds a pickle that needs {e.what}: refused as hostile", path=path) from None
    except Exception as e:  # a truncated or hostile pickle: any failure means corrupt
        raise IntegrityError(f"'{path}' holds an unreadable pickle ({type(e).__name__})", path=path) from None
    try:
        return _interpret(root)
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise IntegrityError(f"'{path}' is not DCP metadata ({e})", path=path) from None


def _ints(v: Any) -> tuple[int, ...]:
    if not isinstance(v, tuple | list) or not all(type(x) is int and x >= 0 for x in v):
        raise ValueError("a size that is not a tuple of non-negative ints")
    return tuple(v)


def _interpret(root: Any) -> DcpMetadata:
    if not isinstance(root, _Record) or root.kind != "Metadata":
        raise ValueError("the pickle is not a Metadata")
    items = root.get("state_dict_metadata")
    storage = root.get("storage_data")
    planner = root.get("planner_data")
    if not isinstance(items, dict):
        raise ValueError("no state_dict_metadata")
    where: dict[tuple[str, tuple[int, ...] | None], Any] = {}
    transformed = False
    for index, info in (storage or {}).items():
        if not isinstance(index, _Record) or not isinstance(info, _Record):
            raise ValueError("storage_data is not MetadataIndex -> _StorageInfo")
        offset = index.get("offset")
        where[(str(index.get("fqn")), _ints(offset) if offset is not None else None)] = info
        if info.get("transform_descriptors"):
            transformed = True
    tensors: list[DcpTensor] = []
    others: list[str] = []
    files: set[str] = set()
    for fqn, meta in items.items():
        if not isinstance(fqn, str) or not isinstance(meta, _Record):
            raise ValueError("a state_dict_metadata entry that is not a name and its metadata")
        path = planner.get(fqn) if isinstance(planner, dict) else None
        keys = tuple(str(k) for k in path) if isinstance(path, tuple | list) and path else (fqn,)
        if meta.kind == "BytesStorageMetadata":
            others.append(fqn)
            continue
        if meta.kind != "TensorStorageMetadata":
            raise ValueError(f"unknown item kind {meta.kind}")
        props = meta.get("properties")
        dtype = props.get("dtype", 0) if isinstance(props, _Record) else None
        shape = list(_ints(meta.get("size")))
        t = DcpTensor(fqn, keys, dtype if isinstance(dtype, str) else "unknown", shape)
        for chunk in meta.get("chunks") or []:
            offsets, sizes = _ints(chunk.get("offsets")), _ints(chunk.get("sizes"))
            if len(offsets) != len(shape) or len(sizes) != len(shape):
                raise ValueError(f"a chunk of '{fqn}' with the wrong number of dimensions")
            if any(o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
                raise ValueError(f"a chunk of '{fqn}' outside the tensor")
            info = where.get((fqn, offsets))
            if info is None:
                t.chunks.append(Chunk(offsets, sizes, "", -1, -1))  # recorded, but stored nowhere: see check_chunks
                continue
            file, start, length = info.get("relative_path", 0), info.get("offset", 1), info.get("length", 2)
            if (
                not isinstance(file, str)
                or type(start) is not int
                or type(length) is not int
                or start < 0
                or length < 0
            ):
                raise ValueError(f"a storage entry of '{fqn}' that is not (file, offset, length)")
            files.add(file)
            t.chunks.append(Chunk(offsets, sizes, file, start, length))
        tensors.append(t)
    version = root.get("version")
    return DcpMetadata(tensors, others, sorted(files), version if isinstance(version, str) else None, transformed)


def split_of(t: DcpTensor) -> str:
    """How a tensor is split into chunks, in words: "whole", "4 chunks along dim 0", "6 chunks (2×3 grid)"."""
    if len(t.chunks) <= 1:
        return "whole"
    dims = [d for d in range(len(t.shape)) if len({c.offsets[d] for c in t.chunks}) > 1]
    if len(dims) == 1:
        return f"{len(t.chunks)} chunks along dim {dims[0]}"
    grid = "×".join(str(len({c.offsets[d] for c in t.chunks})) for d in dims)
    return f"{len(t.chunks)} chunks ({grid} grid over dims {', '.join(map(str, dims))})"


def check_chunks(folder: Path, meta: DcpMetadata) -> None:
    """Raise IntegrityError when a chunk is stored nowhere, lies past the end of its file, or the chunks of a
    tensor do not cover it exactly once."""
    sizes: dict[str, int] = {}
    for name in meta.files:
        p = folder / name
        if "/" in name or name.startswith(".") or not p.is_file():
            raise IntegrityError(f"'{folder}': the metadata names '{name}', which is not a file there", path=folder)
        sizes[name] = p.stat().st_size
    for t in meta.tensors:
        total = 0
        for c in t.chunks:
            if c.offset < 0:
                raise IntegrityError(f"'{folder}': a chunk of tensor '{t.name}' is stored nowhere", path=folder)
            if c.offset + c.length > sizes[c.file]:
                raise IntegrityError(
                    f"'{folder}': tensor '{t.name}' lies past the end of '{c.file}' (truncated?)", path=folder
                )
            n = 1
            for s in c.sizes:
                n *= s
            total += n
        whole = 1
        for d in t.shape:
            whole *= d
        stored = sum(c.length for c in t.chunks)
        if whole * ITEMSIZE.get(t.dtype, 1) > stored:  # before anything is made that big: a hostile shape
            raise IntegrityError(
                f"'{folder}': tensor '{t.name}' needs {whole:,} elements but its chunks store {stored:,} bytes",
                path=folder,
            )
        if total != whole or _overlap(t.chunks):  # the same count and no overlap: each element exactly once
            raise IntegrityError(
                f"'{folder}': the chunks of tensor '{t.name}' do not cover it exactly once ({total:,} elements"
                f" stored of its {whole:,})",
                path=folder,
            )


MAX_CHUNKS = 20_000  # chunks of one tensor (each pair is compared): a real one has one per rank


def _overlap(chunks: list[Chunk]) -> bool:
    """Whether two chunks share an element (or there are too many to tell)."""
    if len(chunks) > MAX_CHUNKS:
        return True
    boxes = sorted((c.offsets, c.sizes) for c in chunks if all(c.sizes))  # an empty chunk shares nothing
    for i, (a_off, a_size) in enumerate(boxes):
        for b_off, b_size in boxes[i + 1 :]:
            if b_off[:1] and b_off[0] >= a_off[0] + a_size[0]:
                break  # sorted by the first offset: no later chunk reaches back into this one
            dims = zip(a_off, a_size, b_off, b_size, strict=True)
            if all(bo < ao + asz and ao < bo + bsz for ao, asz, bo, bsz in dims):
                return True
    return False
