"""Loading a checkpoint's tensors with torch, safely (safetensors, or `weights_only` after a bounded check of
the pickle), and fitting them to a network's state dict."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO

from .errors import CkptError, IntegrityError, UnsafeFileError, UsageError
from .formats import (
    SAFETENSORS_DTYPES,
    WRAPPER_KEYS,
    inspect_open,
    open_checkpoint,
    read_safetensors_header,
    weights_file,
)


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
    with open_checkpoint(path) as f:
        info = inspect_open(f, path)  # bounded: a hostile pickle is refused before torch walks it
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
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
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
    found = re.findall(r"GLOBAL ([\w.]+)", message)
    return ", ".join(dict.fromkeys(found)) if found else "a global outside torch's safe list"


def _load_safetensors(path: Path, f: BinaryIO) -> dict[str, Any]:
    import torch

    header, start = read_safetensors_header(path, f)
    dtypes = {k: getattr(torch, v) for k, v in SAFETENSORS_DTYPES.items() if hasattr(torch, v)}
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
