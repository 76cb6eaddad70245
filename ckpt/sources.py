"""The tensors of a checkpoint in any format ckpt reads, each readable on its own, without torch.

`open_contents(path)` reads only metadata: a torch zip's pickle (through stand-ins, ckpt.formats), a
safetensors header, a sharded index and its shards' headers, DCP's `.metadata` (ckpt.dcp), DeepSpeed's
model states (ckpt.deepspeed). Each `Entry` (ckpt.tensor_streams) then streams its tensor's bytes
(little-endian, C order) in pieces, so a caller holds one piece at a time: `show` reads no tensor,
`export` reads each once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from .dcp import DcpTensor, check_chunks, read_metadata, split_of
from .deepspeed import deepspeed_contents
from .errors import CkptError, IntegrityError, UsageError
from .formats import (
    ITEMSIZE,
    FileInfo,
    StoredTensor,
    TensorInfo,
    inspect_file,
    not_readable_note,
    open_checkpoint,
    weights_file,
)
from .layouts import DCP_INNER, folder_kind
from .tensor_streams import (
    Archive,
    Contents,
    Entry,
    need_numpy,
    open_archive,
    safetensors_entries,
    sharded_contents,
    stored_pieces,
    zip_contents,
)

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


def _chunk_tensor(folder: Path, t: DcpTensor, i: int) -> tuple[Archive, StoredTensor]:
    c = t.chunks[i]
    a = open_archive(folder / c.file, c.offset, c.length)
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
            yield from stored_pieces(a, t.name, st)()

    def assembled() -> Iterator[bytes]:  # a grid of chunks: the whole tensor made in memory
        np = need_numpy("a DCP tensor split along more than one dimension")
        itemsize = ITEMSIZE[t.dtype]
        whole = np.zeros(t.shape + [itemsize], dtype=np.uint8)
        for i in chunks:
            c = t.chunks[i]
            a, st = _chunk_tensor(folder, t, i)
            raw = b"".join(stored_pieces(a, t.name, st)())
            part = np.frombuffer(raw, dtype=np.uint8).reshape(list(c.sizes) + [itemsize])
            whole[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes, strict=True))] = part
        yield whole.tobytes()

    return in_rows if rows else assembled


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
            return sharded_contents(path)
        if kind == "deepspeed":
            return deepspeed_contents(path, key)
        path = weights_file(path)
    with open_checkpoint(path) as f:
        magic = f.read(8)
    if magic[:4] == b"PK\x03\x04":
        return zip_contents(path, key)
    note = not_readable_note(magic)
    if magic[:1] == b"\x80" and note.startswith(("a legacy", "a bare")):
        raise CkptError(f"'{path}' is {note}", path=path)
    if key is not None:
        raise UsageError("--key picks a state dict inside a pickled file; a safetensors file holds one")
    return Contents("safetensors", safetensors_entries(path))
