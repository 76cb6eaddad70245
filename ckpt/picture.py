"""The pixels of a preview, without torch: reading images and masks, scoring predicted masks (IoU, Dice),
and drawing the picture that compares the checkpoints."""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import NotFoundError, NotRegularFile, UsageError

if TYPE_CHECKING:
    from .preview import CheckpointResult


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


def open_image(path: Path, channels: int) -> Image.Image:
    """The image at `path`, in grey (`channels` 1) or RGB; raises UsageError when it cannot be read."""
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


def percent(share: float) -> str:
    """A share of pixels as a percentage, rounded down to 0.01 (99.996 % is not "100 %")."""
    return f"{math.floor(share * 10000) / 100:.2f}".rstrip("0").rstrip(".") + " %"


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


def png_bytes(picture: Image.Image) -> bytes:
    """`picture` as a PNG file's bytes, quickly compressed."""
    buf = io.BytesIO()
    # zlib level 1: the same pixels as the default level 6 in a somewhat larger file, several times faster
    picture.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


# --- the picture ----------------------------------------------------------------------------------


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`mask` at `size` (width, height), by nearest neighbour: each pixel keeps a real class."""
    return np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))


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
                mask = resize_mask(mask, size)
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
