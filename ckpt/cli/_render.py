"""Rows as JSON: the stable keys documented in docs/json.md."""

from __future__ import annotations

from math import isfinite
from typing import Any

from ..manifest import Checkpoint, metric_json


def metric_or_none(v: float) -> float | None:
    return metric_json(v)


def checkpoint_path(ws: Any, task: Any, cp: Checkpoint, prefix: str | None = None) -> str:
    """`ws.rel(task.path_of(cp))` without building two Paths per checkpoint (10,000 of them in `ckpt list`)."""
    file = cp.file
    if "//" in file or "/." in file or file[:1] == "." or file[-1:] == "/":  # pathlib may normalise it: let it
        return str(ws.rel(task.path_of(cp)))
    return f"{prefix or ws.rel(task.folder)}/{file}"


def checkpoints_json(
    ws: Any, task: Any, cps: list[Checkpoint], latest: int | None, models: dict[int, list[str]]
) -> list[dict[str, Any]]:
    """`checkpoint_json` of many checkpoints of one task, written for speed (`ckpt list` of 10,000)."""
    prefix = ws.rel(task.folder)
    rows = []
    for cp in cps:
        metrics: dict[str, float | None] | dict[str, float] = cp.metrics
        if not all(map(isfinite, cp.metrics.values())):
            metrics = {k: metric_json(v) for k, v in cp.metrics.items()}
        rows.append(
            {
                "number": cp.number,
                "step": cp.step,
                "epoch": cp.epoch,
                "metrics": metrics,
                "size": cp.size,
                "created": cp.created,
                "path": checkpoint_path(ws, task, cp, prefix),
                "sha256": cp.sha256,
                "latest": cp.number == latest,
                "models": sorted(models[cp.number]) if cp.number in models else [],
            }
        )
    return rows


def checkpoint_json(ws: Any, task: Any, cp: Checkpoint, latest: bool, models: list[str]) -> dict[str, Any]:
    return {
        "number": cp.number,
        "step": cp.step,
        "epoch": cp.epoch,
        "metrics": {k: metric_json(v) for k, v in cp.metrics.items()},
        "size": cp.size,
        "created": cp.created,
        "path": checkpoint_path(ws, task, cp),
        "sha256": cp.sha256,
        "latest": latest,
        "models": sorted(models),
    }


def model_json(ws: Any, m: Any) -> dict[str, Any]:
    return {
        "title": m.title,
        "task": m.task,
        "checkpoint": m.checkpoint,
        "step": m.step,
        "epoch": m.epoch,
        "metrics": {k: metric_json(v) for k, v in m.metrics.items()},
        "size": m.size,
        "created": m.created,
        "storage": m.storage,
        "sha256": m.sha256,
        "path": ws.rel(m.path),
    }
