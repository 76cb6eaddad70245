"""Train ckpt's small UNet on synthetic shapes and keep a checkpoint per epoch with ckpt.

    python examples/train_unet.py [WORKSPACE] [--epochs 10] [--seed 0] [--train-size 384] [--threads N]

The dataset is made in code (seeded, nothing downloaded): coloured disks, squares and triangles on
textured noise, one class per shape kind plus background. Every epoch saves a checkpoint through the
library with its train loss and validation mean IoU and Dice; the task is finished at the end (which
promotes the last checkpoint to a model). Held-out images and their masks are written as PNG files to
WORKSPACE/demo-data/images and WORKSPACE/demo-data/masks (same file names), ready for:

    ckpt -w WORKSPACE preview unet-shapes 3 7 10 --images WORKSPACE/demo-data/images --masks WORKSPACE/demo-data/masks

About a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import ckpt
from ckpt.zoo import UNet

CLASSES = ("background", "disk", "square", "triangle")
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


# --- the data -----------------------------------------------------------------------------------


def make_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (size × size × 3, uint8) and its mask of class indices (size × size, uint8)."""
    # textured noise: a smooth random field (upsampled coarse noise) plus fine grain, on a random tint
    coarse = rng.random((size // 8 + 1, size // 8 + 1, 3))
    smooth = np.kron(coarse, np.ones((8, 8, 1)))[:size, :size]
    tint = rng.random(3)
    image = 0.35 * tint + 0.35 * smooth + 0.3 * rng.random((size, size, 3))
    mask = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for _ in range(rng.integers(1, 5)):
        kind = int(rng.integers(1, len(CLASSES)))
        r = rng.uniform(0.09, 0.2) * size
        cx, cy = rng.uniform(r, size - r, 2)
        angle = rng.uniform(-0.3, 0.3)  # near upright: squares and triangles stay telling apart
        dx, dy = xx - cx, yy - cy
        if kind == 1:
            inside = dx * dx + dy * dy <= r * r
        elif kind == 2:  # a rotated square of half-side r
            u = dx * math.cos(angle) + dy * math.sin(angle)
            v = -dx * math.sin(angle) + dy * math.cos(angle)
            inside = (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
        else:  # an equilateral triangle inscribed in a circle of radius r * 1.2
            inside = np.ones_like(dx, bool)
            for k in range(3):
                a = angle + math.pi / 2 + k * 2 * math.pi / 3
                inside &= dx * math.cos(a) + dy * math.sin(a) <= r * 0.6
        colour = rng.uniform(0.0, 1.0, 3)
        shade = 1.0 + 0.15 * (rng.random((size, size, 1)) - 0.5)
        image = np.where(inside[..., None], np.clip(colour * shade, 0, 1), image)
        mask[inside] = kind
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), mask


def make_dataset(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` samples as a normalised float tensor (n, 3, size, size) and masks (n, size, size), int64."""
    rng = np.random.default_rng(seed)
    images, masks = zip(*(make_sample(rng, size) for _ in range(n)), strict=True)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x.contiguous(), torch.from_numpy(np.stack(masks)).long()


# --- metrics ------------------------------------------------------------------------------------


def miou_dice(pred: torch.Tensor, target: torch.Tensor, classes: int) -> tuple[float, float]:
    """Mean IoU and mean Dice over the classes present in the prediction or the target (pixels pooled)."""
    conf = torch.bincount(target.flatten() * classes + pred.flatten(), minlength=classes * classes)
    conf = conf.reshape(classes, classes).double()
    tp = conf.diag()
    fp, fn = conf.sum(0) - tp, conf.sum(1) - tp
    present = (tp + fp + fn) > 0
    iou = tp[present] / (tp + fp + fn)[present]
    dice = 2 * tp[present] / (2 * tp + fp + fn)[present]
    return float(iou.mean()), float(dice.mean())


# --- training -----------------------------------------------------------------------------------


@dataclass(slots=True)
class TrainResult:
    """What `train` made: the task, its checkpoint numbers with their metrics, and the preview data."""

    workspace: Path
    task: str
    numbers: list[int]
    metrics: list[dict[str, float]]
    images: Path
    masks: Path
    seconds: float
    arch_kwargs: dict[str, int] = field(default_factory=dict)


def train(
    workspace: str | os.PathLike[str],
    *,
    task: str = "unet-shapes",
    epochs: int = 10,
    seed: int = 0,
    train_size: int = 384,
    val_size: int = 48,
    held_out: int = 16,
    image_size: int = 64,
    width: int = 16,
    depth: int = 3,
    batch_size: int = 8,
    lr: float = 3e-3,
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a UNet into task `task` of `workspace` (created if needed), a checkpoint per epoch; finish it.

    Returns a TrainResult. The held-out images and masks go to WORKSPACE/demo-data/{images,masks}.
    """
    started = time.perf_counter()
    say = log or (lambda _msg: None)
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    ws = ckpt.Workspace.init(workspace)
    arch_kwargs = {"in_channels": 3, "classes": len(CLASSES), "width": width, "depth": depth}
    run = ws.create_task(
        task,
        arch="ckpt.zoo:UNet",
        arch_kwargs=arch_kwargs,
        settings={"preview": {"mean": list(MEAN), "std": list(STD), "classes": list(CLASSES)}},
    )

    # three disjoint seeded streams: training, validation, and the held-out preview images
    x_train, y_train = make_dataset(train_size, image_size, seed)
    x_val, y_val = make_dataset(val_size, image_size, seed + 1_000_003)
    data = ws.root / "demo-data"
    images, masks = _write_held_out(data, held_out, image_size, seed + 2_000_003)

    model = UNet(**arch_kwargs).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(train_size / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch), pct_start=0.1
    )
    gen = torch.Generator().manual_seed(seed)
    # background is most of every image: weigh it down so the shape kinds are learnt early
    class_weight = torch.tensor([0.25] + [1.0] * (len(CLASSES) - 1))
    numbers: list[int] = []
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(1, epochs + 1):
        model.train()
        total = 0.0
        for idx in torch.randperm(train_size, generator=gen).split(batch_size):
            x, y = x_train[idx], y_train[idx]
            if torch.rand((), generator=gen) < 0.5:  # flips: cheap augmentation that keeps shapes' kinds
                x, y = x.flip(-1), y.flip(-1)
            logits = model(x.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, y, weight=class_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            step += 1
        model.eval()
        with torch.inference_mode():
            pred = torch.cat([model(x).argmax(1) for x in x_val.split(64)])
        miou, dice = miou_dice(pred, y_val, len(CLASSES))
        metrics = {"train_loss": total / train_size, "val_miou": miou, "val_dice": dice}
        numbers.append(run.save(model.state_dict(), step=step, epoch=epoch, metrics=metrics))
        history.append(metrics)
        say(f"epoch {epoch:2d}/{epochs}  loss {metrics['train_loss']:.4f}  val mIoU {miou:.3f}  val Dice {dice:.3f}")
    run.finish()
    return TrainResult(ws.root, task, numbers, history, images, masks, time.perf_counter() - started, arch_kwargs)


def _write_held_out(folder: Path, n: int, size: int, seed: int) -> tuple[Path, Path]:
    images, masks = folder / "images", folder / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        image, mask = make_sample(rng, size)
        Image.fromarray(image).save(images / f"shapes-{i:02d}.png")
        Image.fromarray(mask).save(masks / f"shapes-{i:02d}.png")
    return images, masks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workspace", nargs="?", default="demo-workspace", help="workspace folder (created)")
    parser.add_argument("--task", default="unet-shapes")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=384, help="training images per epoch (default 384)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    try:
        res = train(
            args.workspace,
            task=args.task,
            epochs=args.epochs,
            seed=args.seed,
            train_size=args.train_size,
            threads=args.threads,
            log=lambda m: print(m, file=sys.stderr),
        )
    except ckpt.CkptError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"trained task '{res.task}' in {res.seconds:.0f} s: checkpoints {res.numbers[0]}–{res.numbers[-1]}")
    print(f"held-out images: {res.images}")
    print(f"held-out masks:  {res.masks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
