"""Commands that run networks: preview (checkpoints side by side on images) and demo.

torch is imported only inside the commands (through ckpt.preview), never when this module loads.
"""

from __future__ import annotations

import contextlib
import json as jsonlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import UsageError
from ._app import app
from ._common import JsonOpt, command, err, open_workspace, out, plural, print_json, table
from ._complete import tasks as complete_tasks

if TYPE_CHECKING:
    from ..preview import PreviewResult, Progress

DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto (bf16 or fp16 where the hardware computes it, checked against fp32), fp32, bf16 or fp16.",
    ),
]


@contextlib.contextmanager
def _progress(what: str) -> Iterator[Progress | None]:
    """A Rich progress bar on stderr when it is a terminal; None (quiet) otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ._common import console

    with Progress(
        TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console(stderr=True)
    ) as bar:
        job = bar.add_task(what, total=None)

        def update(done: int, total: int) -> None:
            bar.update(job, completed=done, total=total)

        yield update


def _floats(value: str | None, what: str) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be numbers separated by commas, got {value!r}") from None


def _size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    w, _, h = value.lower().partition("x")
    try:
        size = (int(w), int(h or w))
    except ValueError:
        raise UsageError(f"--size must be WIDTHxHEIGHT or one number, got {value!r}") from None
    if min(size) < 1:
        raise UsageError(f"--size must be positive, got {value!r}")
    return size


def _fresh(path: Path) -> Path:
    """`path`, or `stem-2.png`, `stem-3.png`… if it exists: a default name never overwrites a picture."""
    n = 1
    candidate = path
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def _kwargs(value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        parsed = jsonlib.loads(value)
    except ValueError as e:
        raise UsageError(f"--arch-kwargs is not valid JSON ({e})") from None
    if not isinstance(parsed, dict):
        raise UsageError("--arch-kwargs must be a JSON object, e.g. '{\"classes\": 4}'")
    return parsed


arch_kwargs_of = _kwargs  # --arch-kwargs of other commands that run a preview (report)


def result_json(res: PreviewResult) -> dict[str, Any]:
    """The documented JSON of a preview (docs/preview.md)."""
    checkpoints = []
    for c in res.checkpoints:
        row: dict[str, Any] = {"model": c.model} if c.model is not None else {"number": c.number}
        row.update({"task": c.task, "path": str(c.path), "miou": c.miou, "dice": c.dice, "image_miou": c.image_miou})
        row.update({"precision": c.precision, "agreement": c.agreement})
        checkpoints.append(row)
    return {
        "output": str(res.output),
        "size": list(res.size),
        "images": [str(p) for p in res.images],
        "masks": [str(p) for p in res.masks] if res.masks is not None else None,
        "classes": res.classes,
        "device": res.device,
        "precision": res.precision,
        "seconds": round(res.seconds, 3),
        "saved_masks": str(res.saved_masks) if res.saved_masks is not None else None,
        "checkpoints": checkpoints,
    }


def _warn(res: PreviewResult) -> None:
    for c in res.checkpoints:
        if c.warning is not None:
            err(f"warning: {c.warning}")


def _render(res: PreviewResult) -> None:
    from ..picture import precision_note

    if res.masks is not None:
        table(
            ["checkpoint", "mIoU", "Dice", "precision"],
            [
                [
                    c.label,
                    f"{c.miou:.3f}" if c.miou is not None else "",
                    f"{c.dice:.3f}" if c.dice is not None else "",
                    _precision(c.precision, c.agreement),
                ]
                for c in res.checkpoints
            ],
            right=["mIoU", "Dice"],
        )
    else:
        err("no --masks given: the picture shows predictions only, without IoU")
    if res.saved_masks is not None:
        err(f"predicted masks written under {res.saved_masks}")
    grid = f"{plural(len(res.images), 'image')} × {plural(len(res.checkpoints), 'checkpoint')}"
    shape = f"{res.size[0]}×{res.size[1]}, {grid}"
    out(f"wrote {res.output} ({shape}, {precision_note(res.checkpoints, res.precision)})")


def _precision(precision: str, agreement: float | None) -> str:
    """`bf16 (99.93 % as fp32)`: the precision, and the share of checked pixels agreeing with fp32."""
    from ..picture import percent

    return precision if agreement is None else f"{precision} ({percent(agreement)} as fp32)"


@command(app, "preview")
def preview(
    task: Annotated[
        str | None, typer.Argument(help="The task whose checkpoints to preview.", autocompletion=complete_tasks)
    ] = None,
    numbers: Annotated[
        list[int] | None, typer.Argument(help="Checkpoint numbers (default: all of the task's).")
    ] = None,
    images: Annotated[
        list[Path] | None, typer.Option("--images", "-i", help="PNG/JPEG file or folder (repeatable).")
    ] = None,
    masks: Annotated[
        Path | None, typer.Option("--masks", "-m", help="Folder of ground-truth PNG masks named like the images.")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="The picture to write (PNG; default: a new preview[-N].png here)."),
    ] = None,
    models: Annotated[
        list[str] | None, typer.Option("--model", help="Preview a model by title instead of a task (repeatable).")
    ] = None,
    arch: Annotated[
        str | None, typer.Option("--arch", help="Network factory 'package.module:factory' (default: the manifest's).")
    ] = None,
    arch_kwargs: Annotated[
        str | None, typer.Option("--arch-kwargs", help="The factory's keyword arguments as a JSON object.")
    ] = None,
    mean: Annotated[
        str | None, typer.Option("--mean", help="Normalisation mean per channel, e.g. 0.485,0.456,0.406.")
    ] = None,
    std: Annotated[str | None, typer.Option("--std", help="Normalisation std per channel.")] = None,
    size: Annotated[
        str | None, typer.Option("--size", help="Resize images to WIDTHxHEIGHT first (default: their own size).")
    ] = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 8,
    unsafe_load: Annotated[
        bool, typer.Option("--unsafe-load", help="Allow files that need full unpickling (runs their code!).")
    ] = False,
    save_masks: Annotated[
        Path | None, typer.Option("--save-masks", help="Also write each predicted mask as a PNG under this folder.")
    ] = None,
    cell: Annotated[int, typer.Option("--cell", min=32, help="Size in pixels of each picture cell.")] = 160,
    precision: PrecisionOpt = "auto",
    json: JsonOpt = False,
) -> None:
    """Run checkpoints on images and write one picture comparing them, with IoU against --masks.

    Example: ckpt preview unet 3 7 10 --images imgs/ --masks masks/ --out cmp.png

    Example: ckpt preview --model unet-7 --images imgs/
    """
    from ..preview import PreviewOptions, model_sources, run_preview, task_sources

    if models and (task is not None or numbers):
        raise UsageError("give a TASK with checkpoint numbers, or --model titles, not both")
    if not models and task is None:
        raise UsageError("nothing to preview", hint="ckpt preview TASK 3 7 10 --images DIR, or --model TITLE")
    if not images:
        raise UsageError("missing --images", hint="pass a PNG/JPEG file or a folder of them")
    ws = open_workspace()
    sources = model_sources(ws, models) if models else task_sources(ws, task or "", numbers or [])
    options = PreviewOptions(
        images=list(images),
        masks=masks,
        out=output if output is not None else _fresh(Path("preview.png")),
        arch=arch,
        arch_kwargs=_kwargs(arch_kwargs),
        mean=_floats(mean, "--mean"),
        std=_floats(std, "--std"),
        size=_size(size),
        device=device,
        batch_size=batch_size,
        unsafe_load=unsafe_load,
        save_masks=save_masks,
        cell=cell,
        precision=precision,
    )
    with _progress("preview") as progress:
        res = run_preview(sources, options, progress)
    _warn(res)
    if json:
        print_json(result_json(res))
    else:
        _render(res)


@command(app, "demo")
def demo(
    path: Annotated[Path, typer.Argument(help="A fresh folder for the demo workspace.")] = Path("demo-workspace"),
    epochs: Annotated[int, typer.Option("--epochs", hidden=True, min=1)] = 10,
    train_size: Annotated[int | None, typer.Option("--train-size", hidden=True, min=1)] = None,
    json: JsonOpt = False,
) -> None:
    """Train a small UNet on synthetic shapes (about a minute on a CPU), then preview checkpoints 3, 7 and 10.

    Example: ckpt demo
    """
    from ..demo import run_demo

    err(f"training a UNet on synthetic shapes into {path} ({epochs} epochs, a checkpoint each)")
    with _progress("preview") as progress:
        quick = {"train_size": train_size, "val_size": 8, "held_out": 4} if train_size else None
        res = run_demo(path, epochs=epochs, log=err, progress=progress, train_options=quick)
    _warn(res.preview)
    if json:
        print_json(
            {
                "workspace": str(res.workspace),
                "task": res.task,
                "train_seconds": round(res.train_seconds, 3),
                **result_json(res.preview),
            }
        )
        return
    out(f"trained task '{res.task}' in {res.train_seconds:.0f} s")
    _render(res.preview)
    numbers = " ".join(str(c.number) for c in res.preview.checkpoints)
    data = res.preview.images[0].parent.parent
    out(f"next: ckpt -w {res.workspace} list {res.task}")
    out(f"      ckpt -w {res.workspace} preview {res.task} {numbers} --images {data}/images --masks {data}/masks")
