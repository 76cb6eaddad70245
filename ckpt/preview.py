"""Segmentation preview: run checkpoints on images and draw one picture that compares them.

The entry to the modules that need torch (and numpy, Pillow): network.py builds the network, inference.py
runs it, picture.py reads the images and draws. The CLI imports this module inside its commands, so no
other command pays for torch. Everything here returns dataclasses and raises CkptError subclasses.
See docs/preview.md for the options, the picture's layout and the safety rules.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import fsutil
from .errors import CkptError, NotFoundError, UsageError

try:
    import numpy as np
    import torch
    from PIL import Image
except ImportError as e:  # pragma: no cover - the dev extra installs them
    raise CkptError(
        f"preview needs torch, numpy and Pillow ({e.name} is missing)", hint="pip install 'ckpt[torch]'"
    ) from None

from .inference import (
    AGREEMENT_IMAGES,
    Computed,
    FusedNetwork,
    Inputs,
    Net,
    in_channels,
    predict_checked,
    resolve_device,
    resolve_precision,
    reuse_freed_memory,
)
from .loading import fit_state_dict, load_state_dict, require_safe_torch
from .network import build_network
from .picture import (
    collect_images,
    confusion,
    match_masks,
    miou_dice,
    open_image,
    png_bytes,
    read_mask,
    render_grid,
    resize_mask,
)

if TYPE_CHECKING:
    from .workspace_base import Workspace


Progress = Callable[[int, int], None]  # (images × checkpoints done, total)


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


MAX_CELL = 1024  # a picture cell: beyond it the grid of a few images is already gigapixels
MAX_SIDE = 8192  # --size: what a segmentation network is run on here, at most


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
    nets: dict[tuple[str, str, bool], Net] = {}
    for src in sources:
        assert src.arch is not None
        key = (src.arch, json.dumps(src.arch_kwargs, sort_keys=True), src.arch_from_manifest)
        if key not in nets:
            net = build_network(src.arch, src.arch_kwargs, from_manifest=src.arch_from_manifest)
            net = net.to(device).eval()
            net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            nets[key] = Net(net, in_channels(net), int(getattr(net, "input_multiple", 32)))
    settings = next((s.settings for s in sources if s.settings), {})
    classes_names = options.classes or settings.get("classes")
    pil_images = [open_image(p, 3) for p in image_paths]
    inputs = Inputs(pil_images, device, options.batch_size, channels_last=True)

    total = len(sources) * len(image_paths)
    done = 0
    if progress:
        progress(done, total)
    preds: list[list[np.ndarray]] = []
    runs: list[Computed] = []
    n_classes = 2
    with reuse_freed_memory(device):
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
            p, c, computed = predict_checked(
                entry, infer, batches, check, len(pil_images), precision, options.precision == "auto", src.label
            )
            runs.append(computed)
            n_classes = max(n_classes, c)
            if size is not None:  # back to each image's own size, for the metrics and the picture
                p = [resize_mask(a, im.size) for a, im in zip(p, pil_images, strict=True)]
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
    buf = png_bytes(picture)
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


def _class_names(names: Any, n: int) -> list[str]:
    given = [str(x) for x in names] if isinstance(names, list) else []
    return [given[i] if i < len(given) else f"class {i}" for i in range(n)]


def _save_masks(folder: Path, images: list[Path], sources: Sequence[Source], preds: list[list[np.ndarray]]) -> None:
    for src, p in zip(sources, preds, strict=True):
        sub = folder / (src.model if src.model is not None else f"{src.task}-{src.number}")
        fsutil.make_dirs(sub)
        for img, mask in zip(images, p, strict=True):
            fsutil.atomic_write(sub / f"{img.stem}.png", png_bytes(Image.fromarray(mask)))
