"""ckpt demo: train the example UNet into a fresh folder, then preview three of its checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConflictError, NotFoundError, UsageError
from .preview import PreviewOptions, PreviewResult, Progress, run_preview, task_sources
from .workspace_base import Workspace


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
