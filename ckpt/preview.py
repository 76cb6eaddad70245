"""Segmentation preview: run checkpoints on images and draw one picture that compares them.

The only core module that needs torch (and numpy, Pillow); the CLI imports it inside its commands, so
no other command pays for torch. Everything here returns dataclasses and raises CkptError subclasses.
See docs/preview.md for the options, the picture's layout and the safety rules.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import importlib
import inspect
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import fsutil
from .errors import CkptError, NotFoundError, NotRegularFile, UnsafeFileError, UsageError

try:
    import numpy as np
    import torch
    from PIL import Image, ImageDraw, ImageFont
except ImportError as e:  # pragma: no cover - the dev extra installs them
    raise CkptError(
        f"preview needs torch, numpy and Pillow ({e.name} is missing)", hint="pip install 'ckpt[torch]'"
    ) from None

from .formats import fit_state_dict, load_state_dict, require_safe_torch

if TYPE_CHECKING:
    from .workspace import Workspace

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IGNORE = 255  # mask value left out of the metrics (as in Pascal VOC)
# the picture's layout in pixels: see `layout`
PAD, HEADER, LABEL, LEGEND_LINE, LEGEND_ITEM = 8, 22, 18, 22, 130
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (255, 225, 25),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
]

Progress = Callable[[int, int], None]  # (images × checkpoints done, total)


class ArchitectureError(UsageError):
    """The network could not be built: a bad 'module:factory', a missing module, or wrong keyword arguments."""


@dataclass(slots=True)
class Source:
    """One set of weights to preview: a task's checkpoint (`number`) or a model (`model`)."""

    path: Path
    number: int | None = None
    model: str | None = None
    task: str | None = None
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    arch_from_manifest: bool = True

    @property
    def label(self) -> str:
        return self.model if self.model is not None else f"#{self.number}"


@dataclass(slots=True)
class PreviewOptions:
    """What to preview on and how. None means: from the task manifest's `settings.preview`, else the default."""

    images: list[Path]
    masks: Path | None = None
    out: Path = Path("preview.png")
    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    size: tuple[int, int] | None = None  # (width, height) to resize to; default: each image's own size
    classes: list[str] | None = None
    device: str = "auto"
    batch_size: int = 8
    unsafe_load: bool = False
    save_masks: Path | None = None
    cell: int = 160
    precision: str = "auto"  # auto, fp32, bf16 or fp16: see resolve_precision


@dataclass(slots=True)
class CheckpointResult:
    """One source's result: mean IoU and Dice over all images (None without masks), and per image.

    `precision` is the one its predictions were computed in; `agreement` the share of pixels of the
    first images on which a reduced precision's masks matched float32's (None when it ran in fp32
    without that check); `warning` says, in one line, when it fell back to fp32 or kept a precision
    that disagreed.
    """

    label: str
    number: int | None
    model: str | None
    task: str | None
    path: Path
    miou: float | None
    dice: float | None
    image_miou: list[float | None]
    precision: str = "fp32"
    agreement: float | None = None
    warning: str | None = None


@dataclass(slots=True)
class PreviewResult:
    output: Path
    size: tuple[int, int]
    images: list[Path]
    masks: list[Path] | None
    classes: list[str]
    checkpoints: list[CheckpointResult]
    device: str
    seconds: float
    saved_masks: Path | None = None
    precision: str = "fp32"  # what the options asked for, resolved for the device (auto -> bf16, fp16 or fp32)


# --- choosing what to preview ---------------------------------------------------------------------


def task_sources(ws: Workspace, task: str, numbers: Sequence[int]) -> list[Source]:
    """Sources for checkpoints `numbers` of `task` (all of them when empty); raises NotFoundError."""
    t = ws.task(task)
    header = t.header
    cps = [t.checkpoint(n) for n in numbers] if numbers else t.checkpoints
    if not cps:
        raise NotFoundError(f"task '{task}' has no checkpoints to preview", hint=f"see: ckpt list {task}")
    return [
        Source(
            t.local_path(cp),
            number=cp.number,
            task=task,
            arch=header.arch,
            arch_kwargs=dict(header.arch_kwargs or {}),
            settings=_preview_settings(header.settings),
        )
        for cp in cps
    ]


def model_sources(ws: Workspace, titles: Sequence[str]) -> list[Source]:
    """Sources for models `titles`; the architecture comes from each model's task when it still exists."""
    from .errors import TaskNotFound

    out = []
    for title in titles:
        m = ws.models[title]
        src = Source(ws.model_local_path(m), model=title, task=m.task)
        try:
            header = ws.task(m.task).header
            src.arch, src.arch_kwargs = header.arch, dict(header.arch_kwargs or {})
            src.settings = _preview_settings(header.settings)
        except TaskNotFound:
            pass
        out.append(src)
    return out


def _preview_settings(settings: dict[str, Any]) -> dict[str, Any]:
    value = settings.get("preview", {})
    return value if isinstance(value, dict) else {}


# --- building the network -------------------------------------------------------------------------


DEFAULT_TRUSTED_ARCH = ("ckpt.zoo",)
TRUST_ENV = "CKPT_TRUSTED_ARCH"
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def user_config_path() -> Path:
    """The user's own ckpt settings: `$XDG_CONFIG_HOME/ckpt/config.toml` (default ~/.config/ckpt/config.toml)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "ckpt" / "config.toml"


def trusted_arch() -> list[str]:
    """The packages whose modules a manifest's architecture may import: ckpt.zoo, plus what the user
    trusts from outside any workspace (a manifest is other people's input in a shared one): the
    CKPT_TRUSTED_ARCH environment variable (names separated by commas) and `trusted_arch = [...]` in
    user_config_path(). Raises UsageError for a config file that is not valid TOML."""
    names = list(DEFAULT_TRUSTED_ARCH)
    names += [n.strip() for n in os.environ.get(TRUST_ENV, "").split(",") if n.strip()]
    config = user_config_path()
    if config.is_file():
        import tomllib

        try:
            listed = tomllib.loads(config.read_text(encoding="utf-8")).get("trusted_arch", [])
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as e:
            raise UsageError(f"cannot read '{config}': {e}", path=config, hint="fix or remove it") from None
        if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
            raise UsageError(f"'{config}': trusted_arch must be a list of package names", path=config)
        names += listed
    return names


def _is_trusted(module_name: str, trusted: Sequence[str]) -> bool:
    return any(module_name == t or module_name.startswith(t + ".") for t in trusted if t)


def build_network(factory: str, kwargs: dict[str, Any], *, from_manifest: bool = False) -> torch.nn.Module:
    """Import `factory` ("package.module:name") and call it with `kwargs`; return the torch module.

    Importing a module runs its code, so a factory named by a manifest is imported only from a package
    the user trusts (`trusted_arch`), and must be a `torch.nn.Module` class: a function could do anything
    when called. A factory the user names with --arch is theirs to trust. Raises ArchitectureError
    (exit 2), or UnsafeFileError (exit 6) for a manifest naming an untrusted package or a function.
    """
    module_name, sep, attr = factory.partition(":")
    shown = factory if len(factory) <= 100 else factory[:97] + "..."
    if not sep or not _MODULE_NAME.fullmatch(module_name) or not _MODULE_NAME.fullmatch(attr):
        raise ArchitectureError(f"invalid architecture {shown!r}", hint="use 'package.module:factory'")
    if from_manifest and not _is_trusted(module_name, trusted_arch()):
        top = module_name.split(".")[0]
        raise UnsafeFileError(
            f"the manifest's architecture '{shown}' is in package '{top}', which is not trusted: importing it"
            " would run its code",
            hint=f"if you trust it, pass --arch {shown}, or set {TRUST_ENV}={top}"
            f' (or trusted_arch = ["{top}"] in {user_config_path()})',
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ArchitectureError(
            f"cannot import module '{module_name}' for architecture '{factory}' ({e})",
            hint="install the package that defines it, or pass --arch package.module:factory",
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ArchitectureError(
                f"module '{module_name}' has no '{attr}' (architecture '{factory}')",
                hint="pass --arch package.module:factory",
            ) from None
    is_module_class = inspect.isclass(obj) and issubclass(obj, torch.nn.Module)
    if from_manifest and not is_module_class:
        raise UnsafeFileError(
            f"the manifest's architecture '{factory}' is not a torch.nn.Module class; calling it could run anything",
            hint=f"if you trust it, pass --arch {factory}",
        )
    if not callable(obj):
        raise ArchitectureError(f"architecture '{factory}' is not callable")
    try:
        net = obj(**kwargs)
    except (TypeError, ValueError) as e:
        raise ArchitectureError(
            f"cannot build '{factory}' with keyword arguments {json.dumps(kwargs, sort_keys=True)}: {e}",
            hint="fix --arch-kwargs (a JSON object)",
        ) from None
    if not isinstance(net, torch.nn.Module):
        raise ArchitectureError(f"'{factory}' returned a {type(net).__name__}, not a torch.nn.Module")
    return net


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


def _in_channels(net: torch.nn.Module) -> int:
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


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
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
def _reuse_freed_memory(device: torch.device) -> Iterator[None]:
    """On the CPU with glibc: keep freed activations in the heap, for the next batch, while inside.

    glibc gives each allocation above its mmap threshold (at most 32 MiB, and a batch of 8 images of
    256×256 has 32–64 MiB activations) fresh pages from the kernel and returns them on free, so every
    layer of every batch page-faults and zeroes its output again: that cost as much time as half the
    convolutions. Inside, large blocks come from the heap and the heap is not trimmed; on the way out
    the free memory goes back to the OS and the thresholds are set to where glibc's own sliding
    thresholds end up.
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


# --- images and masks -----------------------------------------------------------------------------


def collect_images(paths: Sequence[Path]) -> list[Path]:
    """The PNG and JPEG files named by `paths` (files, or folders read non-recursively, sorted by name)."""
    if not paths:
        raise UsageError("no images given", hint="pass --images FILE_OR_FOLDER")
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            inside = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
            if not inside:
                raise UsageError(f"image folder '{p}' holds no PNG or JPEG files", path=p)
            found.extend(inside)
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise UsageError(f"'{p}' is not a PNG or JPEG file", path=p)
            found.append(p)
        else:
            _not_a_file(p, "image path")
            raise NotFoundError(f"image path '{p}' does not exist", path=p, hint="pass --images FILE_OR_FOLDER")
    return found


def _not_a_file(p: Path, what: str) -> None:
    """Raise NotRegularFile (exit 6) when `p` exists but is a FIFO, device or socket: reading it could block."""
    if os.path.lexists(p) and not p.is_dir():
        raise NotRegularFile(f"{what} '{p}' is not a regular file (a FIFO, device or socket?)", path=p)


def match_masks(images: Sequence[Path], masks: Path) -> list[Path]:
    """The mask of each image: a PNG of the same name (stem) in folder `masks` (or `masks` itself for one image)."""
    if masks.is_file():
        if len(images) != 1:
            raise UsageError(f"--masks '{masks}' is a file but there are {len(images)} images; pass a folder")
        return [masks]
    if not masks.is_dir():
        _not_a_file(masks, "--masks")
        raise NotFoundError(f"mask folder '{masks}' does not exist", path=masks)
    out = []
    for img in images:
        candidates = [masks / f"{img.stem}.png", masks / img.name]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            for c in candidates:
                _not_a_file(c, "mask")
            raise NotFoundError(
                f"image '{img.name}' has no mask in '{masks}' (looked for {img.stem}.png)",
                path=img,
                hint="masks are PNG files named like their images",
            )
        out.append(hit)
    return out


def _open_image(path: Path, channels: int) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"cannot read image '{path}': {e}", path=path) from None


def read_mask(path: Path, size: tuple[int, int], classes: int) -> np.ndarray:
    """A mask as class indices (H, W), uint8. 0/255 masks become 0/1; 255 elsewhere means "ignore"."""
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im if im.mode in ("L", "P", "I", "I;16") else im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read mask '{path}': {e}", path=path) from None
    if arr.ndim == 3:
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise UsageError(f"mask '{path}' is a colour image", path=path, hint="masks hold class indices (or 0/255)")
        arr = arr[..., 0]
    if (arr.shape[1], arr.shape[0]) != size:
        raise UsageError(
            f"mask '{path}' is {arr.shape[1]}×{arr.shape[0]} but its image is {size[0]}×{size[1]}", path=path
        )
    values = np.unique(arr)
    if set(values.tolist()) <= {0, 255}:
        return (arr == 255).astype(np.uint8)
    bad = [int(v) for v in values if v >= classes and v != IGNORE]
    if bad:
        raise UsageError(
            f"mask '{path}' holds class {bad[0]} but the network predicts {classes} classes (0–{classes - 1})",
            path=path,
        )
    return arr.astype(np.uint8)


# --- metrics --------------------------------------------------------------------------------------


def confusion(pred: np.ndarray, target: np.ndarray, classes: int) -> np.ndarray:
    """The classes × classes confusion matrix (rows: truth), ignoring target pixels equal to 255."""
    keep = target != IGNORE
    idx = target[keep].astype(np.int64) * classes + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=classes * classes).reshape(classes, classes)


def miou_dice(conf: np.ndarray) -> tuple[float | None, float | None]:
    """Mean IoU and mean Dice over the classes present in the truth or the prediction."""
    tp = np.diag(conf).astype(np.float64)
    fp, fn = conf.sum(0) - tp, conf.sum(1) - tp
    present = (tp + fp + fn) > 0
    if not present.any():
        return None, None
    iou = tp[present] / (tp + fp + fn)[present]
    dice = 2 * tp[present] / (2 * tp + fp + fn)[present]
    return float(iou.mean()), float(dice.mean())


# --- running --------------------------------------------------------------------------------------


def _floats(value: Any, what: str, channels: int, default: float) -> list[float]:
    if value is None:
        return [default] * channels
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise UsageError(f"{what} must be a number or a list of numbers, got {value!r}")
    if len(value) == 1:
        value = value * channels
    if len(value) != channels:
        raise UsageError(f"{what} has {len(value)} values but the network takes {channels} channels")
    if what == "std" and any(v <= 0 for v in value):
        raise UsageError("std values must be positive")
    return [float(v) for v in value]


def _size(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    raise UsageError(f"size must be [width, height] in pixels, got {value!r}")


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
class _Net:
    net: torch.nn.Module
    channels: int
    multiple: int
    fused: FusedNetwork | None = None
    reduced: ReducedNetwork | None = None


class _Inputs:
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
class _Computed:
    precision: str
    agreement: float | None = None
    warning: str | None = None


def _predict_checked(
    entry: _Net,
    net: torch.nn.Module,
    batches: list[Batch],
    check: list[Batch],
    n_images: int,
    precision: str,
    fall_back: bool,
    label: str,
) -> tuple[list[np.ndarray], int, _Computed]:
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
        return p, c, _Computed("fp32")
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
        return _predict_fp32(net, batches, n_images, _Computed("fp32", None, warning))
    same = sum(int(np.count_nonzero(exact[i] == preds[i])) for i in checked)
    agreement = same / max(1, sum(exact[i].size for i in checked))
    if agreement >= MIN_AGREEMENT:
        return preds, classes, _Computed(precision, agreement)
    what = (
        f"{label}: in {precision} {percent(agreement)} of the pixels of its first {len(checked)} image(s) "
        f"agree with fp32 (less than {percent(MIN_AGREEMENT)})"
    )
    if fall_back:
        return _predict_fp32(net, batches, n_images, _Computed("fp32", agreement, f"{what}; computed in fp32"))
    kept = f"{what}; kept {precision} as asked (--precision fp32 for exact masks)"
    return preds, classes, _Computed(precision, agreement, kept)


def _predict_fp32(
    net: torch.nn.Module, batches: list[Batch], n_images: int, computed: _Computed
) -> tuple[list[np.ndarray], int, _Computed]:
    with _strict_fp32(batches[0][1].device):
        preds, classes = predict(net, batches, n_images)
    return preds, classes, computed


def percent(share: float) -> str:
    """A share of pixels as a percentage, rounded down to 0.01 (99.996 % is not "100 %")."""
    return f"{math.floor(share * 10000) / 100:.2f}".rstrip("0").rstrip(".") + " %"


MAX_CELL = 1024  # a picture cell: beyond it the grid of a few images is already gigapixels
MAX_SIDE = 8192  # --size: what a segmentation network is run on here, at most


def precision_note(results: Sequence[CheckpointResult], asked: str) -> str:
    """One line on the precision the predictions were computed in, as the picture's legend shows it:
    `precision bf16 (agrees with fp32: 99.93 %); #10 fp32 (bf16 agreed 98.12 %)`. The headline is the
    precision the run resolved to (`asked`); a checkpoint that fell back is named with its agreement."""
    line = f"precision {asked}"
    checked = [r.agreement for r in results if r.precision == asked and r.agreement is not None]
    if checked:
        line += f" (agrees with fp32: {percent(min(checked))})"
    for r in results:
        if r.precision != asked:
            line += f"; {r.label} {r.precision}"
            if r.agreement is not None:
                tried = r.precision if r.precision != "fp32" else asked
                line += f" ({tried} agreed {percent(r.agreement)})"
    return line


def run_preview(sources: Sequence[Source], options: PreviewOptions, progress: Progress | None = None) -> PreviewResult:
    """Preview `sources` on `options.images`: predict, score against the masks, write the picture.

    Returns a PreviewResult. Raises UsageError (exit 2; ArchitectureError and StateDictMismatch among
    them), NotFoundError (3) for missing images or masks, UnsafeFileError (6) for a file that needs
    full unpickling or a manifest architecture from an untrusted package, IntegrityError (6) for a
    corrupt or hostile file.
    """
    started = time.perf_counter()
    require_safe_torch()
    if options.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if not 32 <= options.cell <= MAX_CELL:
        raise UsageError(f"the cell size must be 32 to {MAX_CELL} pixels", hint="pass --cell 160, say")
    if options.size is not None and not all(0 < n <= MAX_SIDE for n in options.size):
        raise UsageError(f"--size must be 1 to {MAX_SIDE} pixels a side")
    if not sources:
        raise UsageError("nothing to preview")
    if options.out.suffix.lower() != ".png":
        raise UsageError(f"--out '{options.out}' must end in .png")
    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device)
    image_paths = collect_images(options.images)
    mask_paths = match_masks(image_paths, options.masks) if options.masks is not None else None
    if options.arch_kwargs is not None and options.arch is None and any(s.arch is None for s in sources):
        raise UsageError("--arch-kwargs needs an architecture", hint="pass --arch package.module:factory")
    for src in sources:
        if options.arch is not None:
            src.arch, src.arch_from_manifest = options.arch, False
        if options.arch_kwargs is not None:
            src.arch_kwargs = dict(options.arch_kwargs)
        if src.arch is None:
            what = f"task '{src.task}'" if src.task else f"model '{src.label}'"
            raise UsageError(
                f"{what} records no architecture", hint="pass --arch package.module:factory [--arch-kwargs JSON]"
            )

    # every network is built before any image is read, so a wrong architecture fails fast
    nets: dict[tuple[str, str, bool], _Net] = {}
    for src in sources:
        assert src.arch is not None
        key = (src.arch, json.dumps(src.arch_kwargs, sort_keys=True), src.arch_from_manifest)
        if key not in nets:
            net = build_network(src.arch, src.arch_kwargs, from_manifest=src.arch_from_manifest)
            net = net.to(device).eval()
            net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            nets[key] = _Net(net, _in_channels(net), int(getattr(net, "input_multiple", 32)))
    settings = next((s.settings for s in sources if s.settings), {})
    classes_names = options.classes or settings.get("classes")
    pil_images = [_open_image(p, 3) for p in image_paths]
    inputs = _Inputs(pil_images, device, options.batch_size, channels_last=True)

    total = len(sources) * len(image_paths)
    done = 0
    if progress:
        progress(done, total)
    preds: list[list[np.ndarray]] = []
    runs: list[_Computed] = []
    n_classes = 2
    with _reuse_freed_memory(device):
        for src in sources:
            assert src.arch is not None
            entry = nets[(src.arch, json.dumps(src.arch_kwargs, sort_keys=True), src.arch_from_manifest)]
            state = load_state_dict(src.path, unsafe=options.unsafe_load)
            expected = {k: tuple(v.shape) for k, v in entry.net.state_dict().items()}
            entry.net.load_state_dict(fit_state_dict(state, expected, path=src.path), strict=True)
            if entry.fused is None:  # folded once per network; each checkpoint refreshes the folded weights
                entry.fused = FusedNetwork(entry.net)
                entry.fused.fused.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            infer = entry.fused.refresh()
            mean = _floats(_pick(options.mean, src.settings, "mean"), "mean", entry.channels, 0.0)
            std = _floats(_pick(options.std, src.settings, "std"), "std", entry.channels, 1.0)
            size = options.size or _size(src.settings.get("size"))
            batches = inputs.batches(entry.channels, mean, std, size, entry.multiple)
            check = inputs.first_images(batches, AGREEMENT_IMAGES)
            p, c, computed = _predict_checked(
                entry, infer, batches, check, len(pil_images), precision, options.precision == "auto", src.label
            )
            runs.append(computed)
            n_classes = max(n_classes, c)
            if size is not None:  # back to each image's own size, for the metrics and the picture
                p = [_resize_mask(a, im.size) for a, im in zip(p, pil_images, strict=True)]
            preds.append(p)
            done += len(pil_images)
            if progress:
                progress(done, total)

    masks = (
        [read_mask(m, im.size, n_classes) for m, im in zip(mask_paths, pil_images, strict=True)]
        if mask_paths is not None
        else None
    )
    results = []
    for src, p, computed in zip(sources, preds, runs, strict=True):
        miou = dice = None
        per_image: list[float | None] = [None] * len(p)
        if masks is not None:
            confs = [confusion(a, m, n_classes) for a, m in zip(p, masks, strict=True)]
            miou, dice = miou_dice(sum(confs[1:], confs[0]))
            per_image = [miou_dice(c)[0] for c in confs]
        results.append(
            CheckpointResult(
                src.label,
                src.number,
                src.model,
                src.task,
                src.path,
                miou,
                dice,
                per_image,
                precision=computed.precision,
                agreement=computed.agreement,
                warning=computed.warning,
            )
        )

    names = _class_names(classes_names, n_classes)
    picture = render_grid(pil_images, image_paths, masks, preds, results, names, options.cell, precision)
    out = options.out
    if out.parent and not out.parent.is_dir():
        fsutil.make_dirs(out.parent)
    buf = _png_bytes(picture)
    fsutil.atomic_write(out, buf)
    if options.save_masks is not None:
        _save_masks(options.save_masks, image_paths, sources, preds)
    return PreviewResult(
        output=out,
        size=picture.size,
        images=image_paths,
        masks=mask_paths,
        classes=names,
        checkpoints=results,
        device=str(device),
        seconds=time.perf_counter() - started,
        saved_masks=options.save_masks,
        precision=precision,
    )


def _pick(flag: Any, settings: dict[str, Any], key: str) -> Any:
    return flag if flag is not None else settings.get(key)


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))


def _class_names(names: Any, n: int) -> list[str]:
    given = [str(x) for x in names] if isinstance(names, list) else []
    return [given[i] if i < len(given) else f"class {i}" for i in range(n)]


def _png_bytes(picture: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    # zlib level 1: the same pixels as the default level 6 in a somewhat larger file, several times faster
    picture.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def _save_masks(folder: Path, images: list[Path], sources: Sequence[Source], preds: list[list[np.ndarray]]) -> None:
    for src, p in zip(sources, preds, strict=True):
        sub = folder / (src.model if src.model is not None else f"{src.task}-{src.number}")
        fsutil.make_dirs(sub)
        for img, mask in zip(images, p, strict=True):
            fsutil.atomic_write(sub / f"{img.stem}.png", _png_bytes(Image.fromarray(mask)))


# --- the picture ----------------------------------------------------------------------------------


def class_colour(index: int) -> tuple[int, int, int]:
    """The overlay colour of class `index` (class 0, the background, is left uncoloured)."""
    if index <= len(PALETTE):
        return PALETTE[(index - 1) % len(PALETTE)]
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def layout(rows: int, columns: int, classes: int, cell: int) -> tuple[int, int]:
    """The picture's (width, height): a header, `rows` rows of `columns` cells with a label line, a legend
    (the classes, then a line saying the precision computed in)."""
    width = PAD + columns * (cell + PAD)
    per_line = max(1, (width - PAD) // LEGEND_ITEM)
    legend_lines = math.ceil(classes / per_line) + 1
    return width, HEADER + rows * (cell + LABEL) + PAD + legend_lines * LEGEND_LINE + PAD


@functools.cache
def _colour_lut() -> np.ndarray:
    """Every class's overlay colour, indexed by class (0: black), made once; read-only."""
    lut = np.array([(0, 0, 0)] + [class_colour(i) for i in range(1, 256)], dtype=np.float32)
    lut.flags.writeable = False
    return lut


def overlay(image: Image.Image, mask: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """`image` in grey with each non-background class of `mask` tinted in its colour."""
    return _tint(np.asarray(image.convert("L"), dtype=np.float32)[..., None], mask, alpha)


def _tint(grey: np.ndarray, mask: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """An (H, W, 1) float grey image with each non-background class of the (H, W) `mask` tinted."""
    colours = _colour_lut()[mask]
    a = np.where((mask > 0) & (mask != IGNORE), np.float32(alpha), np.float32(0.0))[..., None]
    return Image.fromarray((grey * (1 - a) + colours * a).astype(np.uint8))


def _font(size: int = 12) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow before 10.1
        return ImageFont.load_default()


def _fit(im: Image.Image, cell: int) -> Image.Image:
    w, h = im.size
    scale = cell / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return im.resize(new, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS)


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, width: int, font: Any) -> None:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    draw.text(xy, text, fill=(20, 20, 20), font=font)


def render_grid(
    images: list[Image.Image],
    paths: list[Path],
    masks: list[np.ndarray] | None,
    preds: list[list[np.ndarray]],
    results: list[CheckpointResult],
    class_names: list[str],
    cell: int,
    precision: str = "fp32",
) -> Image.Image:
    """The comparison picture: a row per image; input, ground truth, then each checkpoint's overlay."""
    headers = ["input"] + (["ground truth"] if masks is not None else [])
    for r in results:
        headers.append(f"{r.label}  mIoU {r.miou:.3f}" if r.miou is not None else r.label)
    width, height = layout(len(images), len(headers), len(class_names), cell)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    for c, title in enumerate(headers):
        _text(draw, (PAD + c * (cell + PAD), 4), title, cell, font)
    for row, im in enumerate(images):
        y = HEADER + row * (cell + LABEL)
        # each tile is made at its size in the picture: the input scaled once, each mask scaled by nearest
        # neighbour (a pixel keeps a real class) and tinted there, not tinted at full size and scaled after
        fitted = _fit(im.convert("RGB"), cell)
        grey = np.asarray(fitted.convert("L"), dtype=np.float32)[..., None]

        def tile_of(mask: np.ndarray, size: tuple[int, int] = fitted.size, grey: np.ndarray = grey) -> Image.Image:
            if mask.shape[::-1] != size:
                mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
            return _tint(grey, mask)

        tiles: list[tuple[Image.Image, str]] = [(fitted, paths[row].name)]
        if masks is not None:
            tiles.append((tile_of(masks[row]), ""))
        for r, p in zip(results, preds, strict=True):
            v = r.image_miou[row]
            tiles.append((tile_of(p[row]), f"IoU {v:.3f}" if v is not None else ""))
        for c, (tile, label) in enumerate(tiles):
            x = PAD + c * (cell + PAD)
            canvas.paste(tile, (x + (cell - tile.size[0]) // 2, y + (cell - tile.size[1]) // 2))
            _text(draw, (x, y + cell + 2), label, cell, font)
    y = HEADER + len(images) * (cell + LABEL) + PAD
    per_line = max(1, (width - PAD) // LEGEND_ITEM)
    for i, name in enumerate(class_names):
        line, col = divmod(i, per_line)
        x, yy = PAD + col * LEGEND_ITEM, y + line * LEGEND_LINE
        colour = class_colour(i) if i else (255, 255, 255)
        draw.rectangle((x, yy + 2, x + 14, yy + 16), fill=colour, outline=(90, 90, 90))
        _text(draw, (x + 20, yy + 2), f"{i} {name}", LEGEND_ITEM - 26, font)
    yy = y + math.ceil(len(class_names) / per_line) * LEGEND_LINE
    _text(draw, (PAD, yy + 2), precision_note(results, precision), width - 2 * PAD, font)
    return canvas


# --- the demo -------------------------------------------------------------------------------------


@dataclass(slots=True)
class DemoResult:
    workspace: Path
    task: str
    train_seconds: float
    preview: PreviewResult


def demo_numbers(epochs: int) -> list[int]:
    """The checkpoints the demo compares: 3, 7 and 10 of 10 epochs (the same fractions of fewer)."""
    return sorted({max(1, round(epochs * f)) for f in (0.3, 0.7, 1.0)})


def load_training_example() -> Any:
    """examples/train_unet.py: from the source checkout this ckpt runs from, else as installed (ckpt._examples)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parent.parent / "examples" / "train_unet.py"
    if not path.is_file():
        try:
            return importlib.import_module("ckpt._examples.train_unet")
        except ModuleNotFoundError as e:
            if e.name not in ("ckpt._examples", "ckpt._examples.train_unet"):
                raise
            raise NotFoundError(
                "the demo needs examples/train_unet.py, which this installation of ckpt lacks",
                hint="reinstall ckpt (pip install 'ckpt[torch]'), or from a source checkout: pip install -e .",
            ) from None
    name = "ckpt_examples_train_unet"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def run_demo(
    path: Path,
    *,
    epochs: int = 10,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    progress: Progress | None = None,
    train_options: dict[str, Any] | None = None,
) -> DemoResult:
    """Train the example UNet into a fresh workspace at `path`, then preview three of its checkpoints.

    `train_options` go to the example's `train` (tests make it small). Raises ConflictError when
    `path` exists and is not an empty folder.
    """
    from .errors import ConflictError
    from .workspace import Workspace

    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConflictError(
            f"'{path}' already exists and is not empty; the demo needs a fresh folder",
            path=path,
            hint="pass another PATH, or remove it",
        )
    if epochs < 1:
        raise UsageError("epochs must be at least 1")
    example = load_training_example()
    trained = example.train(path, epochs=epochs, seed=seed, log=log, **(train_options or {}))
    ws = Workspace.open(path)
    sources = task_sources(ws, trained.task, demo_numbers(epochs))
    options = PreviewOptions(images=[trained.images], masks=trained.masks, out=ws.root / "preview.png")
    result = run_preview(sources, options, progress)
    return DemoResult(ws.root, trained.task, trained.seconds, result)
