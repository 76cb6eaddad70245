"""The keep rules keep-every and keep-interval: pure functions of the records, used by trash-unused's keep
rules (ckpt.trash) and stored in policies (ckpt.policy)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .timeutil import parse_iso

if TYPE_CHECKING:
    from .manifest import Checkpoint

_UNITS = (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def keep_every(cps: list[Checkpoint], every: int) -> list[tuple[int, str]]:
    """(number, why) for the first checkpoint at or after each multiple of `every` steps (K, 2K, ...): the one
    with the smallest step not below it, the lower number on a tie. Checkpoints without a step are not
    considered; a gap spanning several multiples keeps one checkpoint for all of them."""
    if every <= 0:
        return []
    stepped = sorted((cp.step, cp.number) for cp in cps if cp.step is not None and cp.step >= 0)
    out: list[tuple[int, str]] = []
    covered = 0  # multiples up to covered * every already have their checkpoint
    for step, number in stepped:
        reached = step // every
        if reached > covered:
            out.append((number, f"keep-every {every} (step {step}, first at or after {reached * every})"))
            covered = reached
    return out


def keep_interval(cps: list[Checkpoint], seconds: int, created: str) -> list[tuple[int, str]]:
    """(number, why) for the latest checkpoint (highest number) of each interval of `seconds`, counted from
    `created` (the task's creation). A checkpoint whose time cannot be read, or that is older than the
    task, counts in the first interval."""
    if seconds <= 0:
        return []
    try:
        start = parse_iso(created)
    except ValueError:
        return []
    latest: dict[int, int] = {}
    for cp in cps:
        try:
            index = max(0, math.floor((parse_iso(cp.created) - start).total_seconds() / seconds))
        except ValueError:
            index = 0
        if cp.number > latest.get(index, 0):
            latest[index] = cp.number
    text = interval_text(seconds)
    return [(number, f"keep-interval {text} (the latest of interval {index + 1})") for index, number in latest.items()]


def interval_text(seconds: int) -> str:
    """21600 -> "6h": the largest unit that divides it."""
    for unit, size in _UNITS:
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"  # pragma: no cover (every whole number of seconds divides by 1)
