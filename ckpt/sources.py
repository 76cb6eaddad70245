"""The tensors of a checkpoint in any format ckpt reads, each readable on its own, without torch.

`open_contents(path)` reads only metadata: a torch zip's pickle (through stand-ins, ckpt.formats), a
safetensors header, a sharded index and its shards' headers, DCP's `.metadata` (ckpt.dcp), DeepSpeed's
model states. Each `Entry` then streams its tensor's bytes (little-endian, C order) in pieces, so a caller
holds one piece at a time: `show` reads no tensor, `export` reads each once.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

from . import fsutil
from .dcp import DcpTensor, check_chunks, read_metadata, split_of
from .errors import CkptError, IntegrityError, UsageError
from .formats import (
    ITEMSIZE,
    SAFETENSORS_DTYPES,
    WRAPPER_KEYS,
    FileInfo,
    StoredTensor,
    TensorInfo,
    inspect_file,
    not_readable_note,
    read_safetensors_header,
    read_torch_pickle,
    weights_file,
)
from .layouts import BIN_INDEX_SUFFIX, DCP_INNER, DEEPSPEED_MODEL, INDEX_SUFFIX, folder_kind
from .unpickle import BoundedUnpickler, TooComplex

PIECE = 16 << 20  # bytes read and written at a time: the memory a plain copy holds


def numel(shape: list[int]) -> int:
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


def _open(path: Path) -> BinaryIO:
    try:
        return fsutil.open_regular_file(path)
    except CkptError:
        raise
    except OSError as e:
        raise IntegrityError(f"cannot read '{path}': {e.strerror}", path=path) from None


def _copy(path: Path, start: int, length: int) -> Iterator[bytes]:
    """The `length` bytes of `path` from `start`, a piece at a time; IntegrityError when the file ends first."""
    with _open(path) as f:
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
class _Archive:
    """A torch zip's pickled object (stand-ins), its reader, and where each data member's bytes start."""

    path: Path
    obj: Any
    reader: BoundedUnpickler
    unsafe: list[str]
    members: dict[str, tuple[int, int]]  # storage key -> (absolute start in the file, size)
    big_endian: bool


def _archive(path: Path, start: int = 0, length: int | None = None) -> _Archive:
    with _open(path) as f:
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
    return _Archive(path, obj, reader, unsafe, members, big)


def _contiguous(shape: list[int], stride: list[int] | None) -> bool:
    if stride is None:
        return True
    expect = 1
    for d, s in zip(reversed(shape), reversed(stride), strict=False):
        if d != 1 and s != expect:
            return False
        expect *= d
    return True


def _stored_pieces(a: _Archive, name: str, t: StoredTensor) -> Callable[[], Iterator[bytes]]:
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
    if _contiguous(t.shape, stride) and not (a.big_endian and itemsize > 1):
        return lambda: _copy(a.path, start + t.offset * itemsize, n * itemsize)

    def gathered() -> Iterator[bytes]:  # a view (a transposed weight, a slice) or big-endian: made whole in memory
        np = need_numpy("a non-contiguous or big-endian tensor")
        flat = np.frombuffer(b"".join(_copy(a.path, start, (last + 1) * itemsize)), dtype=np.uint8)
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
    try:
        import numpy
    except ImportError:
        raise CkptError(f"reading {why} needs numpy", hint="pip install 'ckpt[torch]' (or just numpy)") from None
    return numpy


def _name(path: list[Any]) -> str:
    return ".".join(str(k) if isinstance(k, str | int) else f"<{type(k).__name__}>" for k in path)


def _tensors_of(a: _Archive, obj: Any) -> list[tuple[str, StoredTensor]]:
    out: list[tuple[str, StoredTensor]] = []

    def visit(value: Any, path: list[Any]) -> None:
        if isinstance(value, StoredTensor):
            out.append((_name(path) or "<tensor>", value))

    try:
        a.reader.walk(obj, visit)
    except TooComplex as e:
        from .formats import too_complex

        raise too_complex(a.path, e) from None
    return out


def _at(obj: Any, key: str) -> Any:
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
    if isinstance(_at(obj, "state.model"), dict):
        return "state.model"
    return next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)


def _zip_contents(path: Path, key: str | None, fmt: str = "torch-zip") -> Contents:
    a = _archive(path)
    chosen = key if key is not None else _default_key(a.obj)
    inner = a.obj if chosen is None else _at(a.obj, chosen)
    if inner is None:
        raise UsageError(f"'{path}' has no key '{key}'", hint=f"keys holding tensors: {_keys_hint(a)}")
    entries = [Entry(n, t.dtype, t.shape, _stored_pieces(a, n, t)) for n, t in _tensors_of(a, inner)]
    keys: dict[str, int] = {}
    if isinstance(a.obj, dict):
        for k, v in a.obj.items():
            if isinstance(k, str) and k != chosen and (chosen is None or not chosen.startswith(k + ".")):
                n = len(_tensors_of(a, v))
                if n and chosen is not None:
                    keys[k] = n
    return Contents(fmt, entries, chosen, keys, 1, a.unsafe)


def _keys_hint(a: _Archive) -> str:
    if not isinstance(a.obj, dict):
        return "none (the file is one object)"
    return ", ".join(str(k) for k, v in a.obj.items() if isinstance(k, str) and _tensors_of(a, v)) or "none"


# --- safetensors, one file or shards -------------------------------------------------------------------


def _safetensors_entries(path: Path, shard: str | None = None) -> list[Entry]:
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
        out.append((a, Entry(name, dtype, shape, functools.partial(_copy, path, start + a, b - a), shard=shard)))
    out.sort(key=lambda x: x[0])
    return [e for _, e in out]


def _index_file(folder: Path) -> Path:
    found = sorted(p for p in folder.iterdir() if p.name.endswith((INDEX_SUFFIX, BIN_INDEX_SUFFIX)) and p.is_file())
    preferred = [p for p in found if p.name in ("model" + INDEX_SUFFIX, "pytorch_model" + BIN_INDEX_SUFFIX)]
    return (preferred or found)[0]  # safetensors first: a folder holding both has the same weights twice


def _sharded_contents(folder: Path) -> Contents:
    index = _index_file(folder)
    try:
        with _open(index) as f:
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
            in_shard = _safetensors_entries(p, shard)
        else:
            part = _zip_contents(p, None)
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


# --- DCP ------------------------------------------------------------------------------------------------


def _dcp_folder(path: Path) -> Path:
    if (path / ".metadata").is_file():
        return path
    for sub in sorted(path.iterdir(), key=lambda p: not p.name.startswith("pytorch_model")):  # the model first
        if sub.is_dir() and not sub.is_symlink() and DCP_INNER.fullmatch(sub.name) and (sub / ".metadata").is_file():
            return sub
    raise IntegrityError(f"'{path}' holds no DCP .metadata", path=path)


def _dcp_contents(path: Path, key: str | None) -> Contents:
    folder = _dcp_folder(path)
    meta = read_metadata(folder)
    if meta.transformed:
        raise CkptError(f"'{folder}' was written through DCP extensions (compression...) that ckpt cannot read")
    check_chunks(folder, meta)
    tops: dict[str, int] = {}
    for t in meta.tensors:
        if len(t.path) > 1:
            tops[t.path[0]] = tops.get(t.path[0], 0) + 1
    chosen = key
    if chosen is None:
        chosen = next((k for k in ("model", "state_dict", "module") if k in tops), None)
    if chosen is not None and chosen not in tops:
        raise UsageError(
            f"'{path}' has no state dict '{chosen}'", hint=f"keys holding tensors: {', '.join(tops) or 'none'}"
        )
    picked = [t for t in meta.tensors if chosen is None or (len(t.path) > 1 and t.path[0] == chosen)]
    entries = [
        Entry(
            ".".join(t.path[1:]) if chosen is not None else t.name,
            t.dtype,
            t.shape,
            _dcp_pieces(folder, t),
            shard=", ".join(sorted({c.file for c in t.chunks})),
            split=split_of(t),
        )
        for t in picked
    ]
    split = sum(len(t.chunks) > 1 for t in picked)
    layout = f"{len(meta.files)} .distcp file(s); {split} of {len(picked)} tensors split into chunks"
    keys = {k: n for k, n in tops.items() if k != chosen}
    return Contents("dcp", entries, chosen, keys, len(meta.files), layout=layout, others=meta.others)


def _chunk_tensor(folder: Path, t: DcpTensor, i: int) -> tuple[_Archive, StoredTensor]:
    c = t.chunks[i]
    a = _archive(folder / c.file, c.offset, c.length)
    if not isinstance(a.obj, StoredTensor) or list(a.obj.shape) != list(c.sizes) or a.obj.dtype != t.dtype:
        raise IntegrityError(
            f"'{folder / c.file}': a chunk of '{t.name}' is not the tensor its metadata describes", path=folder
        )
    return a, a.obj


def _dcp_pieces(folder: Path, t: DcpTensor) -> Callable[[], Iterator[bytes]]:
    chunks = sorted(range(len(t.chunks)), key=lambda i: t.chunks[i].offsets)
    rows = len(t.shape) == 0 or all(
        all(o == 0 for o in t.chunks[i].offsets[1:]) and list(t.chunks[i].sizes[1:]) == t.shape[1:] for i in chunks
    )

    def in_rows() -> Iterator[bytes]:  # chunks of whole rows (split along dim 0 or not at all): one after another
        for i in chunks:
            a, st = _chunk_tensor(folder, t, i)
            yield from _stored_pieces(a, t.name, st)()

    def assembled() -> Iterator[bytes]:  # a grid of chunks: the whole tensor made in memory
        np = need_numpy("a DCP tensor split along more than one dimension")
        itemsize = ITEMSIZE[t.dtype]
        whole = np.zeros(t.shape + [itemsize], dtype=np.uint8)
        for i in chunks:
            c = t.chunks[i]
            a, st = _chunk_tensor(folder, t, i)
            raw = b"".join(_stored_pieces(a, t.name, st)())
            part = np.frombuffer(raw, dtype=np.uint8).reshape(list(c.sizes) + [itemsize])
            whole[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes, strict=True))] = part
        yield whole.tobytes()

    return in_rows if rows else assembled


# --- DeepSpeed ------------------------------------------------------------------------------------------


def _deepspeed_contents(folder: Path, key: str | None) -> Contents:
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    model = [n for n in names if DEEPSPEED_MODEL.fullmatch(n) and "zero_pp_rank" not in n]
    zero3 = [n for n in names if DEEPSPEED_MODEL.fullmatch(n) and "zero_pp_rank" in n]
    optim = [n for n in names if n.endswith("_optim_states.pt")]
    if not model and not zero3:
        raise IntegrityError(f"'{folder}' holds no mp_rank_*_model_states.pt", path=folder)
    source = folder / (model[0] if model else zero3[0])
    c = _zip_contents(source, key, "deepspeed")
    c.shards = len(model) + len(zero3) + len(optim)
    a_obj = _archive(source).obj
    config = a_obj.get("ds_config") if isinstance(a_obj, dict) else None
    zero = _at(config, "zero_optimization.stage") if isinstance(config, dict) else None
    stage = zero if type(zero) is int else (3 if zero3 else (None if not optim else 1))
    ranks = len(optim) or len(zero3)
    c.layout = f"ZeRO stage {stage if stage is not None else '?'}: model states in {source.name}" + (
        f", optimizer states partitioned over {ranks} rank(s)" if ranks else ""
    )
    if len(model) > 1:
        c.problem = f"tensor parallel over {len(model)} model-parallel ranks ({', '.join(model)}): ckpt exports one"
    if stage == 3 or zero3:
        try:
            entries, unsafe = _zero3_entries(folder, zero3, optim)
        except _Missing as e:
            c.problem = (
                f"ZeRO-3 partitions the weights over the ranks' files, and {e}; consolidate what is there with the"
                " zero_to_fp32.py script DeepSpeed saved beside the run"
            )
            c.entries = _zero3_shapes(a_obj, c.entries) or c.entries
            return c
        c.entries, c.key, c.keys = entries, None, {}
        c.unsafe_globals = sorted(set(c.unsafe_globals) | set(unsafe))
        c.layout += "; the fp32 weights are gathered from the ranks' fp32_flat_groups, as zero_to_fp32.py does"
    return c


class _Missing(Exception):
    """What a ZeRO-3 step lacks to be consolidated (said to the user)."""


def _natural(name: str) -> list[Any]:
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", name)]


def _zero3_entries(folder: Path, model_files: list[str], optim_files: list[str]) -> tuple[list[Entry], list[str]]:
    """A ZeRO-3 step's tensors gathered as DeepSpeed's zero_to_fp32.py does: each trainable parameter in
    `param_shapes` order takes ceil(numel / world) fp32 elements from every rank's `fp32_flat_groups` (read
    as one flat run), the ranks' pieces joined and cut to its numel; buffers come from rank 0's `module`,
    frozen parameters from the ranks' `frozen_param_fragments`, and shared ones repeat what they share."""
    model_files = sorted(model_files, key=_natural)
    optim_files = sorted(optim_files, key=_natural)
    if not model_files or not optim_files:
        raise _Missing("the optimizer states (*_optim_states.pt, which hold them) are missing")
    first = _archive(folder / model_files[0])
    states = first.obj if isinstance(first.obj, dict) else {}
    optims = [_archive(folder / n) for n in optim_files]
    unsafe = sorted({g for a in [first, *optims] for g in a.unsafe})
    inner = [a.obj.get("optimizer_state_dict") if isinstance(a.obj, dict) else None for a in optims]
    if not all(isinstance(x, dict) for x in inner):
        raise _Missing("an optimizer states file holds no optimizer_state_dict")
    count = inner[0].get("partition_count")  # type: ignore[union-attr]
    world = max(count) if isinstance(count, list) and count and all(type(x) is int for x in count) else count
    if type(world) is not int or world != len(optims):
        raise _Missing(f"it was saved by {world} rank(s) but {len(optims)} optimizer states file(s) are here")
    groups: list[list[StoredTensor]] = []
    for a, sd in zip(optims, inner, strict=True):
        flat = sd.get("fp32_flat_groups")  # type: ignore[union-attr]
        if not isinstance(flat, list) or not all(isinstance(t, StoredTensor) and t.dtype == "float32" for t in flat):
            raise _Missing(f"{a.path.name} holds no fp32_flat_groups")
        groups.append(flat)
    sizes = [numel(t.shape) for t in groups[0]]
    if any([numel(t.shape) for t in g] != sizes for g in groups):
        raise _Missing("the ranks' fp32_flat_groups differ in size")
    shapes = states.get("param_shapes")
    if not isinstance(shapes, list) or not all(isinstance(d, dict) for d in shapes):
        raise _Missing(f"{model_files[0]} holds no param_shapes")
    entries: list[Entry] = []
    module = states.get("module") if isinstance(states.get("module"), dict) else {}
    names = states.get("buffer_names")
    buffers: set[str] = {b for b in names if isinstance(b, str)} if isinstance(names, list) else set()
    for name, t in _tensors_of(first, module):
        if name in buffers:
            entries.append(Entry(name, t.dtype, t.shape, _stored_pieces(first, name, t)))
    entries += _zero3_frozen(folder, model_files, states)
    offset = 0
    for d in shapes:
        for name, shape in d.items():
            if not isinstance(shape, tuple) or not all(type(x) is int and x >= 0 for x in shape):
                raise _Missing(f"param_shapes gives '{name}' no shape")
            n = numel(list(shape))
            part = -(-n // world)
            pieces = functools.partial(_gather, optims, groups, sizes, offset, part, n)
            entries.append(Entry(str(name), "float32", list(shape), pieces, split=f"partitioned over {world} ranks"))
            offset += part
    if offset != sum(sizes):
        raise _Missing(f"param_shapes need {offset * world:,} fp32 elements but the ranks hold {sum(sizes) * world:,}")
    shared = states.get("shared_params")
    by_name = {e.name: e for e in entries}
    for alias, target in shared.items() if isinstance(shared, dict) else ():
        if isinstance(alias, str) and target in by_name:
            e = by_name[target]
            entries.append(Entry(alias, e.dtype, e.shape, e.pieces, split=e.split))
    return entries, unsafe


def _zero3_frozen(folder: Path, model_files: list[str], states: dict[str, Any]) -> list[Entry]:
    shapes = states.get("frozen_param_shapes")
    if not isinstance(shapes, dict) or not shapes:
        return []
    archives = [_archive(folder / n) for n in model_files]
    out = []
    for name, shape in shapes.items():
        held = [_at(a.obj, "frozen_param_fragments") for a in archives]
        frags = [f[name] for f in held if isinstance(f, dict) and isinstance(f.get(name), StoredTensor)]
        if not isinstance(shape, tuple) or len(frags) != len(archives):
            raise _Missing(f"the frozen parameter '{name}' has no fragment in every rank's model states")
        readers = [_stored_pieces(a, str(name), f) for a, f in zip(archives, frags, strict=True)]
        itemsize = ITEMSIZE.get(frags[0].dtype, 0)
        n = numel(list(shape)) * itemsize

        def joined(readers: list[Callable[[], Iterator[bytes]]] = readers, n: int = n) -> Iterator[bytes]:
            yield from _cut((p for r in readers for p in r()), n)

        out.append(
            Entry(str(name), frags[0].dtype, list(shape), joined, split=f"partitioned over {len(archives)} ranks")
        )
    return out


def _cut(pieces: Iterator[bytes], n: int) -> Iterator[bytes]:
    """The first `n` bytes of `pieces` (the padding after them dropped)."""
    for p in pieces:
        if n <= 0:
            return
        yield p[:n]
        n -= min(n, len(p))


def _gather(
    archives: list[_Archive], groups: list[list[StoredTensor]], sizes: list[int], offset: int, part: int, n: int
) -> Iterator[bytes]:
    """One ZeRO-3 parameter: elements [offset, offset + part) of each rank's flat groups, ranks in order, cut to n."""

    def rank_pieces(a: _Archive, flat: list[StoredTensor]) -> Iterator[bytes]:
        lo, hi, at = offset, offset + part, 0
        for t, size in zip(flat, sizes, strict=True):
            a_lo, a_hi = max(lo, at), min(hi, at + size)
            if a_lo < a_hi:
                if t.storage is None or t.storage.key not in a.members or not _contiguous(t.shape, t.stride):
                    raise IntegrityError(f"'{a.path}': an fp32 flat group has no readable storage", path=a.path)
                start, stored = a.members[t.storage.key]
                if (t.offset + a_hi - at) * 4 > stored:
                    raise IntegrityError(f"'{a.path}': an fp32 flat group lies outside its storage", path=a.path)
                yield from _copy(a.path, start + (t.offset + a_lo - at) * 4, (a_hi - a_lo) * 4)
            at += size

    yield from _cut((p for a, flat in zip(archives, groups, strict=True) for p in rank_pieces(a, flat)), n * 4)


def _zero3_shapes(obj: Any, placeholders: list[Entry]) -> list[Entry]:
    """ZeRO-3's tensors as the model has them (`param_shapes`), for show: the module holds empty placeholders."""
    shapes = obj.get("param_shapes") if isinstance(obj, dict) else None
    if not isinstance(shapes, list):
        return []
    dtypes = {e.name: e.dtype for e in placeholders}

    def unreadable() -> Iterator[bytes]:
        raise CkptError("ZeRO-3 weights are partitioned; consolidate them first")

    return [
        Entry(str(name), dtypes.get(str(name), "unknown"), [int(d) for d in shape], unreadable, split="partitioned")
        for group in shapes
        if isinstance(group, dict)
        for name, shape in group.items()
        if isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape)
    ]


# --- any checkpoint -------------------------------------------------------------------------------------


def inspect_checkpoint(path: Path) -> FileInfo:
    """What `show` prints: ckpt.formats.inspect_file for a file or a plain folder; for a DCP, sharded or
    DeepSpeed folder, its tensors from the metadata, with their shards and how they are split.

    Raises as open_contents (and inspect_file) do.
    """
    path = Path(path)
    kind = folder_kind(path) if path.is_dir() else None
    if kind is None:
        info = inspect_file(path)
        if info.format != "torch-zip" or info.weights_under is not None:
            return info
        c = open_contents(path)  # a file that wraps its weights: Composer's state.model, DeepSpeed's module...
        if c.key is None:
            return info
        tensors = [TensorInfo(e.name, e.shape, e.dtype) for e in c.entries]
        return FileInfo(info.format, tensors, info.unsafe_globals, info.note, weights_under=c.key, other_tensors=c.keys)
    c = open_contents(path)
    tensors = [TensorInfo(e.name, e.shape, e.dtype, e.shard, e.split) for e in c.entries]
    note = c.problem
    return FileInfo(
        c.format,
        tensors,
        c.unsafe_globals,
        note,
        weights_under=c.key,
        other_tensors=c.keys,
        shards=c.shards,
        layout=c.layout,
        others=c.others,
    )


def open_contents(path: Path, key: str | None = None) -> Contents:
    """What the checkpoint at `path` (a file, or a folder in any layout ckpt knows) holds, read from its
    metadata only; `key` picks the state dict inside (default: where the weights are).

    Raises UnsafeFileError for DCP metadata naming foreign globals, IntegrityError for a corrupt file or
    shards that disagree with their index, UsageError for a `key` the checkpoint does not have.
    """
    path = Path(path)
    if path.is_dir():
        kind = folder_kind(path)
        if kind == "dcp":
            return _dcp_contents(path, key)
        if kind == "sharded":
            if key is not None:
                raise UsageError("--key picks a state dict inside a pickled file; sharded safetensors hold one")
            return _sharded_contents(path)
        if kind == "deepspeed":
            return _deepspeed_contents(path, key)
        path = weights_file(path)
    with _open(path) as f:
        magic = f.read(8)
    if magic[:4] == b"PK\x03\x04":
        return _zip_contents(path, key)
    note = not_readable_note(magic)
    if magic[:1] == b"\x80" and note.startswith(("a legacy", "a bare")):
        raise CkptError(f"'{path}' is {note}", path=path)
    if key is not None:
        raise UsageError("--key picks a state dict inside a pickled file; a safetensors file holds one")
    return Contents("safetensors", _safetensors_entries(path))
