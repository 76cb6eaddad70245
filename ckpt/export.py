"""Export a checkpoint's weights as safetensors: one file, or Hugging Face shards with their index.

Tensors stream one at a time (ckpt.sources): the header is written first, then each tensor is read,
converted and written a piece at a time, so memory holds about one piece (16 MiB), or one tensor where
it must be gathered (a view, a DCP grid). No torch: dtype conversion uses numpy, with round-to-nearest-even
as torch does. Everything is written under a temporary name (`.NAME.tmp-*`) and renamed when complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fsutil
from .errors import ConflictError, UsageError
from .formats import ITEMSIZE
from .tensor_streams import PIECE, Contents, Entry, need_numpy

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_CODES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "float8_e8m0fnu": "F8_E8M0",
    "complex64": "C64",  # safetensors >= 0.5
}
_CONVERTIBLE = {"float64", "float32", "float16", "bfloat16"}
_SIZE = re.compile(r"(?i)\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)?\s*")
_UNITS = {
    None: 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


Progress = Callable[[int, int], None]  # (bytes just written, bytes of tensor data in all)


def output_bytes(contents: Contents, dtype: str | None) -> int:
    """The bytes of tensor data an export of `contents` to `dtype` ("bf16"... or None) writes."""
    to = DTYPES.get(dtype) if dtype is not None else None
    return sum(_out_nbytes(e, to) for e in contents.entries)


class Overflow(UsageError):
    """A value does not fit the dtype asked for (exit 2); `tensor` names the tensor."""

    def __init__(self, message: str, *, tensor: str, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.tensor = tensor


def parse_size(text: str) -> int:
    """Bytes from a size such as `5GB` (5×10⁹, as Hugging Face counts), `500MB`, `2GiB` (2×2³⁰) or `1000`."""
    m = _SIZE.fullmatch(text)
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"cannot read {text!r} as a size", hint="e.g. --max-shard-size 5GB (5×10⁹ bytes) or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower() if m.group(2) else None])


@dataclass(slots=True)
class ExportResult:
    """What export wrote: `out` (a file, or a folder of shards), its files, and the tensors in them."""

    out: Path
    files: list[str]
    format: str  # the checkpoint's format
    key: str | None
    tensors: int
    parameters: int
    bytes: int
    dtype: str | None
    converted: int = 0  # tensors whose dtype changed
    model: str | None = None
    weight_map: dict[str, str] = field(default_factory=dict)


def _out_dtype(e: Entry, dtype: str | None) -> str:
    return dtype if dtype is not None and e.dtype in _CONVERTIBLE else e.dtype


def _aligned(pieces: Iterator[bytes], unit: int) -> Iterator[bytes]:
    """The same bytes, in pieces that are whole multiples of `unit` (whole numbers)."""
    rest = b""
    for p in pieces:
        if rest:
            p = rest + p
        cut = len(p) - len(p) % unit
        rest = p[cut:]
        if cut:
            yield p[:cut]
    if rest:
        yield rest


def _converted(e: Entry, to: str) -> Iterator[bytes]:
    """`e`'s bytes converted to dtype `to`, a piece at a time; Overflow when a finite value becomes infinite."""
    np = need_numpy("--dtype conversion")
    for raw in _aligned(e.pieces(), ITEMSIZE[e.dtype]):
        if e.dtype == "bfloat16":
            src = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view("<f4")
        else:
            src = np.frombuffer(raw, dtype={"float64": "<f8", "float32": "<f4", "float16": "<f2"}[e.dtype])
        with np.errstate(over="ignore", invalid="ignore"):
            if to == "bfloat16":
                out = _to_bf16(np, src.astype("<f4"))
                back = (out.astype(np.uint32) << 16).view("<f4")
            else:
                out = src.astype({"float32": "<f4", "float16": "<f2"}[to])
                back = out
            bad = np.isinf(back) & np.isfinite(src)
        if bad.any():
            value = src[int(np.argmax(bad))]
            limit = {"float16": "65504", "bfloat16": "about 3.39e38", "float32": "about 3.40e38"}[to]
            raise Overflow(
                f"tensor '{e.name}' holds {float(value):g}, which overflows {to} (its largest value is {limit})",
                tensor=e.name,
                hint=_WIDER[to],
            )
        yield out.tobytes()


_WIDER = {  # what to do instead, never the dtype that overflowed
    "float16": "export it in a wider dtype (--dtype bf16 or fp32), or drop --dtype",
    "bfloat16": "export it in fp32 (--dtype fp32), or drop --dtype to keep its dtype",
    "float32": "drop --dtype to keep its dtype (float64)",
}


def _to_bf16(np: Any, x: Any) -> Any:
    """float32 -> bfloat16 bits, rounding to nearest even as torch does; every NaN becomes 0x7FC0."""
    u = x.view("<u4")
    rounded = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype("<u2")
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded).astype("<u2")


def _out_nbytes(e: Entry, to: str | None) -> int:
    return (e.nbytes // ITEMSIZE[e.dtype]) * ITEMSIZE[_out_dtype(e, to)] if ITEMSIZE.get(e.dtype) else 0


def _header(entries: list[Entry], dtype: str | None, metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    head: dict[str, Any] = {"__metadata__": metadata}
    sizes: list[int] = []
    at = 0
    for e in entries:
        out = _out_dtype(e, dtype)
        if out not in _CODES:
            raise UsageError(
                f"tensor '{e.name}' is {e.dtype}, which safetensors cannot hold",
                hint="pick another state dict with --key, or leave this checkpoint in its own format",
            )
        n = _out_nbytes(e, dtype)
        head[e.name] = {"dtype": _CODES[out], "shape": e.shape, "data_offsets": [at, at + n]}
        sizes.append(n)
        at += n
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text, sizes


def _write_file(
    path: Path,
    entries: list[Entry],
    dtype: str | None,
    metadata: dict[str, str],
    progress: Progress | None = None,
    total: int = 0,
) -> int:
    """Write `entries` as one safetensors file at `path` (already a temporary name); returns tensors converted."""
    head, sizes = _header(entries, dtype, metadata)
    converted = 0
    with open(path, "xb") as f:
        f.write(head)
        for e, size in zip(entries, sizes, strict=True):
            to = _out_dtype(e, dtype)
            pieces = _converted(e, to) if to != e.dtype else e.pieces()
            converted += to != e.dtype
            written = 0
            for piece in pieces:
                written += len(piece)
                if written > size:
                    break
                f.write(piece)
                if progress is not None:
                    progress(len(piece), total)
            if written != size:
                from .errors import IntegrityError

                raise IntegrityError(f"tensor '{e.name}' holds {written:,} bytes where its shape needs {size:,}")
        f.flush()
        os.fsync(f.fileno())
    return converted


def _shards(entries: list[Entry], dtype: str | None, limit: int) -> list[list[Entry]]:
    """Entries in order, cut into shards of at most `limit` bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        n = _out_nbytes(e, dtype)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def export(
    contents: Contents,
    out: Path,
    *,
    dtype: str | None = None,
    max_shard_size: int | None = None,
    unsafe: bool = False,
    metadata: dict[str, str] | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Write the tensors of `contents` as safetensors at `out`: one file, or with `max_shard_size` a folder of
        `model-0000i-of-0000n.safetensors` shards and `model.safetensors.index.json` (one `model.safetensors` when
        all fit in one shard). `dtype` ("bf16", "fp16", "fp32") converts floating-point tensors. `progress` is
    called with the bytes of each piece written and the bytes of tensor data in all.

        Raises ConflictError when `out` exists, UnsafeFileError when the file's pickle names globals outside
        torch's safe list (unless `unsafe`), Overflow (exit 2) for a value outside the dtype, CkptError when the
        weights cannot be exported as they are (ZeRO-3), IntegrityError for a corrupt source. An interrupted
        export leaves only its temporary name, removed on the way out where possible.
    """
    from .errors import CkptError, UnsafeFileError

    to = None
    if dtype is not None:
        if dtype not in DTYPES:
            raise UsageError(f"unknown dtype {dtype!r}", hint="use bf16, fp16 or fp32")
        to = DTYPES[dtype]
    if contents.problem:
        raise CkptError(f"cannot export: {contents.problem}")
    if contents.unsafe_globals and not unsafe:
        raise UnsafeFileError(
            f"the checkpoint's pickle names {', '.join(contents.unsafe_globals)}, which torch would have to import",
            hint="export reads tensors without running it, but only with --unsafe-load for a file you trust",
        )
    if not contents.entries:
        raise UsageError("the checkpoint holds no tensors to export", hint="pick the state dict with --key")
    names = [e.name for e in contents.entries]
    if len(set(names)) != len(names):
        raise UsageError("two tensors have the same name", hint="pick one state dict with --key")
    out = Path(out)
    if os.path.lexists(out):
        raise ConflictError(f"'{out}' already exists", path=out, hint="remove it or pass another --out")
    if not out.parent.is_dir():
        raise UsageError(f"the folder of '{out}' does not exist", path=out)
    try:
        name_max = os.pathconf(out.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    room = name_max - len(f"..tmp-{'x' * 8}")  # the temporary name `.NAME.tmp-XXXXXXXX` must fit too
    if len(os.fsencode(out.name)) > room:
        raise UsageError(
            f"the name '{out.name[:40]}…' is too long ({len(os.fsencode(out.name))} bytes; at most {room} here)",
            path=out,
            hint="pass a shorter --out",
        )
    meta = {"format": "pt", **(metadata or {})}
    result = ExportResult(out, [], contents.format, contents.key, len(contents.entries), contents.parameters, 0, dtype)
    all_bytes = output_bytes(contents, dtype)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, fsutil.DIR_MODE)  # a shards folder is renamed into place: the umask's mode, not 0700
        if max_shard_size is None:
            part = tmp / "model.safetensors"
            result.converted = _write_file(part, contents.entries, to, meta, progress, all_bytes)
            result.bytes = part.stat().st_size
            result.files = [out.name]
            try:
                os.link(part, out)  # never replaces: a file that appeared at `out` meanwhile is kept (exit 4)
            except FileExistsError:
                raise ConflictError(
                    f"'{out}' already exists", path=out, hint="remove it or pass another --out"
                ) from None
            except OSError:  # a file system without hard links
                os.replace(part, out)
        else:
            shards = _shards(contents.entries, to, max_shard_size)
            n = len(shards)
            names_ = (
                ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
            )
            total = 0
            for name, shard in zip(names_, shards, strict=True):
                result.converted += _write_file(tmp / name, shard, to, meta, progress, all_bytes)
                result.weight_map.update({e.name: name for e in shard})
                total += sum(_out_nbytes(e, to) for e in shard)
            if n > 1:
                index = {"metadata": {"total_size": total}, "weight_map": result.weight_map}
                with open(tmp / "model.safetensors.index.json", "x") as f:
                    json.dump(index, f, indent=2)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                names_.append("model.safetensors.index.json")
            result.files = names_
            result.bytes = sum((tmp / x).stat().st_size for x in names_)
            _fsync_dir(tmp)
            try:  # never replaces: a folder (even an empty one) or file that appeared at `out` meanwhile is kept
                fsutil.move_noreplace(tmp, out)
            except OSError as e:  # ConflictError too: another export won the race (exit 4, as for one file)
                if not isinstance(e, ConflictError) and e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                    raise
                raise ConflictError(
                    f"'{out}' already exists", path=out, hint="remove it or pass another --out"
                ) from None
        _fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


__all__ = ["DTYPES", "PIECE", "ExportResult", "Overflow", "export", "parse_size"]
