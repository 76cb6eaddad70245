"""Running a preview's network fast and checked: batch norms folded, ReLUs fused, a reduced precision checked
against fp32, on the device chosen, over image batches made once for every checkpoint."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import UsageError
from .network import ArchitectureError
from .picture import percent


def fuse_for_inference(net: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode copy of `net` with every Conv2d that an nn.Sequential runs straight into a BatchNorm2d
    folded into one convolution (the same function; about a quarter faster on a CPU), and on the CPU
    each convolution that runs into a ReLU made one oneDNN call with it (ConvReLU).

    Only the modules are copied: the copy shares with `net` the parameters and buffers it does not fold,
    so it is meant to be used, read-only, before `net` gets its next weights (or kept, with
    `FusedNetwork.refresh` after each load).
    """
    return FusedNetwork(net).fused


class FusedNetwork:
    """`net` with its Conv2d + BatchNorm2d pairs folded (see fuse_for_inference), made once per network.

    The folded copy shares every other parameter and buffer with `net`, so after `net.load_state_dict`
    (which copies into those same tensors) only the folded convolutions need new weights: `refresh()`
    recomputes them from `net`'s convolution and batch norm. Copying the modules once per network rather
    than once per checkpoint saves a deep copy per checkpoint previewed.
    """

    def __init__(self, net: torch.nn.Module):
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        shared: dict[int, Any] = {id(t): t for t in (*net.parameters(), *net.buffers())}
        self.fused = copy.deepcopy(net, shared).eval()
        originals = dict(net.named_modules())
        self._pairs: list[tuple[torch.nn.Conv2d, torch.nn.Conv2d, torch.nn.BatchNorm2d]] = []
        for name, mod in self.fused.named_modules():
            if not isinstance(mod, torch.nn.Sequential):
                continue
            for i in range(len(mod) - 1):
                conv, bn = mod[i], mod[i + 1]
                if (
                    type(conv) is torch.nn.Conv2d
                    and type(bn) is torch.nn.BatchNorm2d
                    and bn.running_mean is not None
                    and bn.running_var is not None
                    and conv.out_channels == bn.num_features
                ):
                    folded = fuse_conv_bn_eval(conv, bn)
                    mod[i] = folded
                    mod[i + 1] = torch.nn.Identity()
                    prefix = f"{name}." if name else ""
                    self._pairs.append((folded, originals[f"{prefix}{i}"], originals[f"{prefix}{i + 1}"]))  # type: ignore[arg-type]
        if _cpu_conv_relu() is not None and all(p.device.type == "cpu" for p in self.fused.parameters()):
            _fold_relus(self.fused)

    def refresh(self) -> torch.nn.Module:
        """Fold `net`'s current weights again into the folded convolutions; returns the fused network."""
        from torch.nn.utils.fusion import fuse_conv_bn_weights

        with torch.no_grad():
            for folded, conv, bn in self._pairs:
                assert bn.running_mean is not None and bn.running_var is not None
                w, b = fuse_conv_bn_weights(
                    conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
                )
                folded.weight.copy_(w)
                assert folded.bias is not None
                folded.bias.copy_(b)
        return self.fused


@functools.cache
def _cpu_conv_relu() -> Any:
    """oneDNN's convolution with the ReLU applied as it writes its output, or None where torch lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise.default
    except (AttributeError, RuntimeError):
        return None


class ConvReLU(torch.nn.Module):
    """relu(conv(x)) in one oneDNN call on the CPU: the same values without a second pass over the output.

    Wraps `conv` (its weights stay where they are, so FusedNetwork.refresh still updates them). Falls
    back to the two eager operations where oneDNN's call does not fit (not CPU float32 or bfloat16, or
    autograd recording: it has no backward) and, for good, once that call fails. Under autocast it
    computes in autocast's precision, as a plain convolution would.
    """

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.fused_op = _cpu_conv_relu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        w, b = c.weight, c.bias
        if torch.is_autocast_enabled(x.device.type):
            # autocast casts the inputs of the convolutions it knows; this call is not one of them, so
            # without the cast it would compute in float32 and only the next layer in the reduced precision
            dtype = torch.get_autocast_dtype(x.device.type)
            x, w = x.to(dtype), w.to(dtype)
            b = b.to(dtype) if b is not None else None
        if (
            self.fused_op is not None
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16)
            and x.dtype == w.dtype
            and not torch.is_grad_enabled()
        ):
            try:
                return self.fused_op(x, w, b, c.padding, c.stride, c.dilation, c.groups, "relu", [], "")
            except RuntimeError:
                self.fused_op = None
        return torch.relu(c(x))


# the layers whose weights a reduced-precision copy holds in that precision (autocast runs them in it)
_REDUCED_LAYERS = (
    torch.nn.Conv1d,
    torch.nn.Conv2d,
    torch.nn.Conv3d,
    torch.nn.ConvTranspose1d,
    torch.nn.ConvTranspose2d,
    torch.nn.ConvTranspose3d,
    torch.nn.Linear,
)


class ReducedNetwork:
    """A copy of the float32 network `net` whose convolutions and linear layers hold their weights in
    `dtype`, for running under `torch.autocast(dtype=dtype)` (see `predict`).

    Autocast alone casts every convolution's weights on every call; holding them in `dtype` saves that.
    Everything else (norms, other parameters and buffers) is shared with `net` and stays float32, so
    after `net` gets new weights (FusedNetwork.refresh) only the converted weights need copying:
    `refresh()`.
    """

    def __init__(self, net: torch.nn.Module, dtype: torch.dtype):
        self.dtype = dtype
        layers = [m for m in net.modules() if type(m) in _REDUCED_LAYERS]
        own = {id(t) for m in layers for t in m.parameters(recurse=False)}
        shared: dict[int, Any] = {id(t): t for t in (*net.parameters(), *net.buffers()) if id(t) not in own}
        self.net = copy.deepcopy(net, shared).eval()
        copies = [m for m in self.net.modules() if type(m) in _REDUCED_LAYERS]
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for low, layer in zip(copies, layers, strict=True):
            low.to(dtype)
            for (_, p_low), (_, p) in zip(
                low.named_parameters(recurse=False), layer.named_parameters(recurse=False), strict=True
            ):
                self._pairs.append((p_low, p))

    def refresh(self) -> torch.nn.Module:
        """Copy, rounded to `dtype`, the float32 network's current weights; returns the reduced network."""
        with torch.no_grad():
            for low, p in self._pairs:
                low.copy_(p)
        return self.net


def _fold_relus(net: torch.nn.Module) -> None:
    """Replace, inside each nn.Sequential, a zero-padded Conv2d run straight (or through Identity) into a
    ReLU by a ConvReLU and the ReLU by an Identity."""
    for mod in list(net.modules()):
        if not isinstance(mod, torch.nn.Sequential):
            continue
        for i in range(len(mod)):
            conv = mod[i]
            if not (
                type(conv) is torch.nn.Conv2d
                and conv.padding_mode == "zeros"
                and not isinstance(conv.padding, str)
                and conv.weight.dtype == torch.float32
            ):
                continue
            j = i + 1
            while j < len(mod) and type(mod[j]) is torch.nn.Identity:
                j += 1
            if j < len(mod) and type(mod[j]) is torch.nn.ReLU:
                mod[i] = ConvReLU(conv)
                mod[j] = torch.nn.Identity()


def in_channels(net: torch.nn.Module) -> int:
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
            return m.in_channels if isinstance(m, torch.nn.Conv2d) else 3
    return 3


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when available, else the CPU; raises UsageError for an unavailable device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available here", hint="use --device cpu or auto")
        return torch.device(device)
    raise UsageError(f"unknown device {device!r}", hint="use auto, cpu or cuda")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# a reduced precision is kept for a checkpoint when its masks agree with float32's on at least this
# share of the pixels of the first images (AGREEMENT_IMAGES) it predicts
MIN_AGREEMENT = 0.995
AGREEMENT_IMAGES = 2


def hardware_lacks(device: torch.device, precision: str) -> str | None:
    """None when `device` computes in `precision` natively ("bf16", "fp16"; "fp32" always), else what it lacks.

    On the CPU, bf16 needs AVX512-BF16 or AMX and fp16 needs AMX-FP16 (torch.cpu's own checks; without
    them torch converts to float32 and back around every operation, slower than float32 itself). On
    CUDA, bf16 needs compute capability 8.0 (emulation does not count) and fp16 5.3.
    """
    if precision == "fp32":
        return None
    if device.type == "cpu":
        if precision == "bf16":
            if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
                return None
            return "this CPU has no bf16 arithmetic (neither AVX512-BF16 nor AMX)"
        if torch.cpu._is_amx_fp16_supported():
            return None
        return "this CPU has no fp16 arithmetic (no AMX-FP16)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        if precision == "bf16":
            with torch.cuda.device(device):
                if torch.cuda.is_bf16_supported(including_emulation=False):
                    return None
            return f"{name} (compute capability {major}.{minor}) has no native bf16 arithmetic (needs 8.0)"
        if (major, minor) >= (5, 3):
            return None
        return f"{name} (compute capability {major}.{minor}) has no fp16 arithmetic (needs 5.3)"
    return f"{precision} is not supported on {device.type}"


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision to compute in: "fp32", "bf16" or "fp16".

    `auto` is bf16 where `device` computes it natively, else fp16 on a CUDA device that does, else
    fp32. Raises UsageError (exit 2) for an unknown precision, or one the hardware lacks.
    """
    if precision == "auto":
        candidates = ("bf16", "fp16") if device.type == "cuda" else ("bf16",)
        return next((p for p in candidates if hardware_lacks(device, p) is None), "fp32")
    if precision not in DTYPES:
        raise UsageError(f"unknown precision {precision!r}", hint="use auto, fp32, bf16 or fp16")
    lacks = hardware_lacks(device, precision)
    if lacks is not None:
        raise UsageError(f"--precision {precision}: {lacks}", hint="use --precision auto or fp32")
    return precision


@contextlib.contextmanager
def _strict_fp32(device: torch.device) -> Iterator[None]:
    """float32 as float32 while inside: cuDNN's convolutions otherwise run float32 in TF32 by default."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if device.type != "cuda" or conv is None:
        yield
        return
    before = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = before


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# what glibc's own sliding thresholds settle at on 64-bit systems: restored after inference
_GLIBC_MMAP_MAX, _GLIBC_TRIM_AT_MAX = 32 * 2**20, 64 * 2**20


@functools.cache
def _glibc() -> Any:
    """The C library when it is glibc (it has mallopt and malloc_trim), else None."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (AttributeError, OSError, ValueError):  # not a glibc system (macOS, Windows, musl)
        return None


@contextlib.contextmanager
def reuse_freed_memory(device: torch.device) -> Iterator[None]:
    """On the CPU with glibc: keep freed activations in the heap, for the next batch, while inside.

    glibc gives each allocation above its mmap threshold (at most 32 MiB, and a batch of 8 images of
    256×256 has 32–64 MiB activations) fresh pages from the kernel and returns them on free, so every
    layer of every batch page-faults and zeroes its output again: that cost as much time as half the
    convolutions. Inside, large blocks come from the heap and the heap is not trimmed; on the way out
    the free memory goes back to the OS and the thresholds are set to where glibc's own sliding
    thresholds end up. The heap does not grow with the batches: a preview of 12 checkpoints peaks
    26 MiB above one of 3, as without this (measured on the bench_preview UNet, 32 images).
    """
    libc = _glibc() if device.type == "cpu" else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 2**30)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_AT_MAX)
        libc.malloc_trim(0)


def _network_output(out: Any) -> torch.Tensor:
    """The logits from what a network returned: a tensor, {"out": ...} (torchvision), .logits (HF), a tuple."""
    if isinstance(out, dict):
        out = out.get("out", next(iter(out.values()), None))
    elif hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, list | tuple):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        raise ArchitectureError("the network's output is not an (N, classes, H, W) tensor; preview cannot use it")
    return out


@dataclass(slots=True)
class Net:
    """A network built once for every checkpoint that names it, with its folded and reduced copies."""

    net: torch.nn.Module
    channels: int
    multiple: int
    fused: FusedNetwork | None = None
    reduced: ReducedNetwork | None = None


class Inputs:
    """Normalised, padded image batches, made once per (normalisation, size) and reused for every checkpoint."""

    def __init__(self, images: list[Image.Image], device: torch.device, batch_size: int, channels_last: bool):
        self.images, self.device, self.batch_size, self.channels_last = images, device, batch_size, channels_last
        self._cache: dict[Any, list[Batch]] = {}

    def batches(
        self,
        channels: int,
        mean: list[float],
        std: list[float],
        size: tuple[int, int] | None,
        multiple: int,
    ) -> list[Batch]:
        """[(image indices, batch tensor, (height, width) before padding)], images of one size per batch."""
        key = (channels, tuple(mean), tuple(std), size, multiple)
        if key in self._cache:
            return self._cache[key]
        groups: dict[tuple[int, int], list[int]] = {}
        arrays = []
        for i, im in enumerate(self.images):
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None and im.size != size:
                im = im.resize(size, Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.float32).reshape(im.size[1], im.size[0], -1) / 255.0
            arrays.append(arr)
            groups.setdefault(arr.shape[:2], []).append(i)
        m = torch.tensor(mean).view(1, -1, 1, 1)
        s = torch.tensor(std).view(1, -1, 1, 1)
        out = []
        for (h, w), idx in groups.items():
            for start in range(0, len(idx), self.batch_size):
                part = idx[start : start + self.batch_size]
                x = torch.from_numpy(np.stack([arrays[i] for i in part])).permute(0, 3, 1, 2)
                x = (x - m) / s
                ph, pw = (-h) % multiple, (-w) % multiple
                if ph or pw:
                    x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")
                fmt = torch.channels_last if self.channels_last else torch.contiguous_format
                out.append((part, x.to(self.device).contiguous(memory_format=fmt), (h, w)))
        self._cache[key] = out
        return out

    def first_images(self, batches: list[Batch], count: int) -> list[Batch]:
        """The images numbered below `count` in `batches` (made by `batches`), as batches of their own."""
        key = (id(batches), count)
        if key not in self._cache:
            out = []
            for idx, x, hw in batches:
                rows = [j for j, i in enumerate(idx) if i < count]
                if rows:
                    fmt = torch.channels_last if self.channels_last else torch.contiguous_format
                    out.append(([idx[j] for j in rows], x[rows].contiguous(memory_format=fmt), hw))
            self._cache[key] = out
        return self._cache[key]


Batch = tuple[list[int], torch.Tensor, tuple[int, int]]  # (image indices, inputs, (height, width) unpadded)


def predict(
    net: torch.nn.Module, batches: list[Batch], n_images: int, dtype: torch.dtype | None = None
) -> tuple[list[np.ndarray], int]:
    """Class-index predictions (H, W) per image, and the number of classes the network predicts.

    With `dtype` (bfloat16, float16) the network runs under autocast in it (give it a ReducedNetwork);
    without, as it is.
    """
    preds: list[np.ndarray] = [np.zeros((0, 0), np.uint8)] * n_images
    classes = 2
    autocast = (
        torch.autocast(batches[0][1].device.type, dtype=dtype)
        if dtype is not None and batches
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        for idx, x, (h, w) in batches:
            logits = _network_output(net(x))
            if logits.shape[-2:] != x.shape[-2:]:  # networks that predict at a lower resolution
                logits = torch.nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear")
            logits = logits[..., :h, :w]
            if logits.shape[1] == 1:
                labels = (logits[:, 0] > 0).to(torch.uint8)
            else:
                classes = logits.shape[1]
                labels = logits.argmax(1).to(torch.uint8)
            for i, p in zip(idx, labels.cpu().numpy(), strict=True):
                preds[i] = p
    return preds, classes


@dataclass(slots=True)
class Computed:
    """The precision one checkpoint's predictions were computed in, and why (see predict_checked)."""

    precision: str
    agreement: float | None = None
    warning: str | None = None


def predict_checked(
    entry: Net,
    net: torch.nn.Module,
    batches: list[Batch],
    check: list[Batch],
    n_images: int,
    precision: str,
    fall_back: bool,
    label: str,
) -> tuple[list[np.ndarray], int, Computed]:
    """Predict `batches` with the float32 network `net` in `precision`; a reduced one is checked.

    The images of `check` (the first AGREEMENT_IMAGES) are predicted in float32 too; when fewer than
    MIN_AGREEMENT of their pixels agree, or the reduced precision fails, everything is predicted again
    in float32 when `fall_back` (auto), else kept as asked (an error if it failed). A fallback costs a
    second pass, but saves none in the common case, where the check costs one float32 pass of 2 images.
    """
    device = batches[0][1].device
    if precision == "fp32":
        with _strict_fp32(device):
            p, c = predict(net, batches, n_images)
        return p, c, Computed("fp32")
    dtype = DTYPES[precision]
    if entry.reduced is None or entry.reduced.dtype != dtype:
        entry.reduced = ReducedNetwork(net, dtype)
    low = entry.reduced.refresh()
    checked = [i for b in check for i in b[0]]
    with _strict_fp32(device):
        exact, _ = predict(net, check, n_images)
    try:
        preds, classes = predict(low, batches, n_images, dtype)
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
        # an operation this network uses that torch (or numpy, in the network's own code) lacks in that precision
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not fall_back:
            raise UsageError(f"{label} cannot run in {precision} here: {reason}", hint="use --precision fp32") from None
        warning = f"{label}: {precision} failed ({reason}); computed in fp32"
        return _predict_fp32(net, batches, n_images, Computed("fp32", None, warning))
    same = sum(int(np.count_nonzero(exact[i] == preds[i])) for i in checked)
    agreement = same / max(1, sum(exact[i].size for i in checked))
    if agreement >= MIN_AGREEMENT:
        return preds, classes, Computed(precision, agreement)
    what = (
        f"{label}: in {precision} {percent(agreement)} of the pixels of its first {len(checked)} image(s) "
        f"agree with fp32 (less than {percent(MIN_AGREEMENT)})"
    )
    if fall_back:
        return _predict_fp32(net, batches, n_images, Computed("fp32", agreement, f"{what}; computed in fp32"))
    kept = f"{what}; kept {precision} as asked (--precision fp32 for exact masks)"
    return preds, classes, Computed(precision, agreement, kept)


def _predict_fp32(
    net: torch.nn.Module, batches: list[Batch], n_images: int, computed: Computed
) -> tuple[list[np.ndarray], int, Computed]:
    with _strict_fp32(batches[0][1].device):
        preds, classes = predict(net, batches, n_images)
    return preds, classes, computed
