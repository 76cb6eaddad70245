"""DeepSpeed checkpoints: the model states of a step, and a ZeRO-3 step's weights gathered from the ranks'
optimizer states as DeepSpeed's zero_to_fp32.py does."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import CkptError, IntegrityError
from .formats import ITEMSIZE, StoredTensor
from .layouts import DEEPSPEED_MODEL
from .tensor_streams import (
    Archive,
    Contents,
    Entry,
    at_key,
    contiguous,
    copy_range,
    numel,
    open_archive,
    stored_pieces,
    tensors_of,
    zip_contents,
)


def deepspeed_contents(folder: Path, key: str | None) -> Contents:
    """The Contents of a DeepSpeed step folder: its model states, or a ZeRO-3 step's gathered weights."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    model = [n for n in names if DEEPSPEED_MODEL.fullmatch(n) and "zero_pp_rank" not in n]
    zero3 = [n for n in names if DEEPSPEED_MODEL.fullmatch(n) and "zero_pp_rank" in n]
    optim = [n for n in names if n.endswith("_optim_states.pt")]
    if not model and not zero3:
        raise IntegrityError(f"'{folder}' holds no mp_rank_*_model_states.pt", path=folder)
    source = folder / (model[0] if model else zero3[0])
    c = zip_contents(source, key, "deepspeed")
    c.shards = len(model) + len(zero3) + len(optim)
    a_obj = open_archive(source).obj
    config = a_obj.get("ds_config") if isinstance(a_obj, dict) else None
    zero = at_key(config, "zero_optimization.stage") if isinstance(config, dict) else None
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
    first = open_archive(folder / model_files[0])
    states = first.obj if isinstance(first.obj, dict) else {}
    optims = [open_archive(folder / n) for n in optim_files]
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
    for name, t in tensors_of(first, module):
        if name in buffers:
            entries.append(Entry(name, t.dtype, t.shape, stored_pieces(first, name, t)))
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
    archives = [open_archive(folder / n) for n in model_files]
    out = []
    for name, shape in shapes.items():
        held = [at_key(a.obj, "frozen_param_fragments") for a in archives]
        frags = [f[name] for f in held if isinstance(f, dict) and isinstance(f.get(name), StoredTensor)]
        if not isinstance(shape, tuple) or len(frags) != len(archives):
            raise _Missing(f"the frozen parameter '{name}' has no fragment in every rank's model states")
        readers = [stored_pieces(a, str(name), f) for a, f in zip(archives, frags, strict=True)]
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
    archives: list[Archive], groups: list[list[StoredTensor]], sizes: list[int], offset: int, part: int, n: int
) -> Iterator[bytes]:
    """One ZeRO-3 parameter: elements [offset, offset + part) of each rank's flat groups, ranks in order, cut to n."""

    def rank_pieces(a: Archive, flat: list[StoredTensor]) -> Iterator[bytes]:
        lo, hi, at = offset, offset + part, 0
        for t, size in zip(flat, sizes, strict=True):
            a_lo, a_hi = max(lo, at), min(hi, at + size)
            if a_lo < a_hi:
                if t.storage is None or t.storage.key not in a.members or not contiguous(t.shape, t.stride):
                    raise IntegrityError(f"'{a.path}': an fp32 flat group has no readable storage", path=a.path)
                start, stored = a.members[t.storage.key]
                if (t.offset + a_hi - at) * 4 > stored:
                    raise IntegrityError(f"'{a.path}': an fp32 flat group lies outside its storage", path=a.path)
                yield from copy_range(a.path, start + (t.offset + a_lo - at) * 4, (a_hi - a_lo) * 4)
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
