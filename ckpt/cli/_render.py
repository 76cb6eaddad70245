"""Rows as JSON: the stable keys documented in docs/json.md."""

from __future__ import annotations

from typing import Any

from ..manifest import Checkpoint, metric_json


def metric_or_none(v: float) -> float | None:
    return metric_json(v)


def checkpoint_json(ws: Any, task: Any, cp: Checkpoint, latest: bool, models: list[str]) -> dict[str, Any]:
    return {
        "number": cp.number,
        "step": cp.step,
        "epoch": cp.epoch,
        "metrics": {k: metric_json(v) for k, v in cp.metrics.items()},
        "size": cp.size,
        "created": cp.created,
        "path": ws.rel(task.path_of(cp)),
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
