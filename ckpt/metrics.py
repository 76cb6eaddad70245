"""Metrics as pure values: which way is better, and the one ordering of checkpoints by a metric.

Every choice by metric (`list --sort`, `promote --best`, `--keep-best`) goes through `rank`: NaN and
missing values always come last, whatever the direction, so that a script taking the first row never
takes a checkpoint that did not record the metric.

A metric's direction comes from, in order: the command's flag, the task (`[metric_modes]`, recorded by
the library or by import), the workspace (`ckpt.toml` `[metrics]`), the metric's name, else UsageError.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import UsageError

MODES = ("min", "max")

LOWER = frozenset("loss error err wer cer perplexity ppl mae mse rmse nll".split())
HIGHER = frozenset("acc accuracy iou miou dice f1 precision recall auc map bleu rouge".split())

# where a direction came from, in the order they are consulted (the JSON's `direction_source`)
SOURCES = ("flag", "task", "workspace", "name")
_SOURCE_TEXT = {
    "flag": "the command's flag",
    "policy": "the retention policy",  # recorded in a policy when it was set (ckpt.policy): not consulted
    "task": "recorded in the task",
    "workspace": "the workspace's [metrics] setting",
    "name": "the metric's name",
}


@dataclass(frozen=True, slots=True)
class Direction:
    """Which way `metric` is better: mode "min" (lower is better) or "max", and where that came from."""

    metric: str
    mode: str
    source: str
    detail: str = ""  # e.g. "Lightning's monitor mode": what recorded it, when known

    @property
    def minimize(self) -> bool:
        return self.mode == "min"

    @property
    def extreme(self) -> str:
        return "lowest" if self.minimize else "highest"

    def explain(self) -> str:
        """E.g. "lower is better: the metric's name"."""
        better = "lower" if self.minimize else "higher"
        return f"{better} is better: {self.detail or _SOURCE_TEXT[self.source]}"

    def to_json(self) -> dict[str, Any]:
        return {"direction": self.mode, "direction_source": self.source}


def check_modes(modes: Mapping[str, str] | None) -> dict[str, str]:
    """`modes` as a plain dict after checking each value is "min" or "max"; raises UsageError."""
    out: dict[str, str] = {}
    if modes is not None and not isinstance(modes, Mapping):
        raise UsageError(f'metric_modes must be a mapping of metric name to "min" or "max", not {modes!r}')
    for metric, mode in (modes or {}).items():
        if not isinstance(metric, str) or not metric:
            raise UsageError(f"invalid metric name {metric!r} in metric_modes")
        if mode not in MODES:
            raise UsageError(f"invalid direction {mode!r} for metric '{metric}'", hint='use "min" or "max"')
        out[metric] = mode
    return out


def mode_from_name(metric: str) -> str | None:
    """ "min" or "max" from the metric's name (split into tokens on _ / - .), or None when unknown."""
    tokens = {t for t in re.split(r"[_/\-.]", metric.lower()) if t}
    low, high = bool(tokens & LOWER), bool(tokens & HIGHER)
    if low == high:
        return None
    return "min" if low else "max"


def direction(
    metric: str,
    *,
    flag: str | None = None,
    task_modes: Mapping[str, str] | None = None,
    task_detail: str = "",
    workspace_modes: Mapping[str, Any] | None = None,
    flags: str = "--min or --max",
) -> Direction:
    """The direction of `metric` by the rule above. Raises UsageError when nothing says which way."""
    if flag is not None:
        return Direction(metric, flag, "flag")
    if task_modes and task_modes.get(metric) in MODES:
        return Direction(metric, task_modes[metric], "task", task_detail)
    if workspace_modes and workspace_modes.get(metric) in MODES:
        return Direction(metric, str(workspace_modes[metric]), "workspace")
    by_name = mode_from_name(metric)
    if by_name is not None:
        return Direction(metric, by_name, "name")
    raise UsageError(
        f"cannot tell whether a higher or lower '{metric}' is better",
        hint=f'pass {flags} (or set it once: [metrics] {toml_key(metric)} = "min" in ckpt.toml)',
    )


def toml_key(name: str) -> str:
    """`name` as a TOML key: bare when it can be, else a quoted string (`"val.score"`)."""
    if re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def flag_mode(minimize: bool, maximize: bool) -> str | None:
    """The mode the `--min` / `--max` flags ask for, or None; both at once is a UsageError."""
    if minimize and maximize:
        raise UsageError("--min and --max contradict each other", hint="pass one of them")
    return "min" if minimize else "max" if maximize else None


def value(metrics: Mapping[str, Any], metric: str) -> float | None:
    """The metric as a finite number, or None when missing, NaN, infinite or not a number.

    An infinite value (a diverged loss) is never ranked: JSON shows it as null, and a script taking the
    first row must not take it for the best.
    """
    v = metrics.get(metric)
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


T = TypeVar("T")


def require(cps: Iterable[Any], metric: str, task: str) -> None:
    """Raise UsageError naming the known metrics when none of `cps` (checkpoints) records a value of `metric`."""
    cps = list(cps)
    if any(value(cp.metrics, metric) is not None for cp in cps):
        return
    known = sorted({k for cp in cps for k in cp.metrics})
    raise UsageError(
        f"no checkpoint of task '{task}' records a value of metric '{metric}'",
        hint=f"known metrics: {', '.join(known)}" if known else "this task records no metrics",
    )


def rank(
    items: Iterable[T],
    metric: str,
    minimize: bool,
    *,
    metrics_of: Callable[[T], Mapping[str, Any]],
    tie: Callable[[T], Any],
) -> tuple[list[T], list[T]]:
    """(best first, without the metric): the ranked items that record `metric`, and those that do not.

    Missing and NaN values are never ranked. Ties go to `tie` ascending (the checkpoint number: the
    earlier checkpoint wins a tie).
    """
    present: list[tuple[float, T]] = []
    missing: list[T] = []
    for item in items:
        v = value(metrics_of(item), metric)
        if v is None:
            missing.append(item)
        else:
            present.append((v if minimize else -v, item))
    present.sort(key=lambda p: (p[0], tie(p[1])))
    return [item for _, item in present], missing


def ordered(items: Sequence[T], metric: str, minimize: bool, **kw: Any) -> list[T]:
    """`items` best first by `metric`, then those without it (in their given order)."""
    ranked, missing = rank(items, metric, minimize, **kw)
    return ranked + missing
