"""The trash budget: `ckpt.toml` `[trash]` `max_size` and `max_age`, and the plan `trash empty --auto` executes.

`max_size` counts the bytes that emptying the trash would free (each entry's `bytes`, as counted when it was
made: a file other links hold frees nothing), `max_age` the age of an entry. The plan takes every entry
older than `max_age`, then the oldest of the rest until what stays is at most `max_size`. Nothing empties
by itself: the plan is executed by `trash empty --auto`, which asks as every empty does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ManifestError, UsageError
from .timeutil import parse_age, parse_iso

if TYPE_CHECKING:
    from .trash_results import EmptyPlan
    from .workspace_base import Workspace

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)(b?)\s*", re.I)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(value: Any) -> int:
    """Bytes from an integer or a text such as "10GB" (10 * 10**9), "1.5 GiB" (2**30 based), "500M", "123".

    Raises UsageError."""
    if type(value) is int and value >= 0:
        return value
    m = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if m is None or (m.group(3) and not m.group(2)):
        raise UsageError(f"invalid size {value!r}", hint='use bytes or a number and a unit: "500MB", "10GB", "1TiB"')
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** _POWERS[m.group(2).lower()])


@dataclass(frozen=True, slots=True)
class Budget:
    """What `ckpt.toml` `[trash]` allows: bytes emptying would free, and an entry's age (None: no limit)."""

    max_size: int | None
    max_age: timedelta | None

    def to_json(self) -> dict[str, Any]:
        return {
            "max_size": self.max_size,
            "max_age_seconds": None if self.max_age is None else int(self.max_age.total_seconds()),
        }


def budget_of(doc: dict[str, Any]) -> Budget | None:
    """The budget of a parsed `ckpt.toml`, or None when it sets none; raises ManifestError."""
    table = doc.get("trash")
    if table is None:
        return None
    where = Path("ckpt.toml")
    if not isinstance(table, dict):
        raise ManifestError("ckpt.toml: [trash] is not a table", path=where)
    unknown = sorted(set(table) - {"max_size", "max_age"})
    if unknown:
        raise ManifestError(f"ckpt.toml: [trash] has unknown key(s) {', '.join(map(repr, unknown))}", path=where)
    hint = 'e.g. max_size = "10GB", max_age = "30d"'
    if "max_age" in table and not isinstance(table["max_age"], str):
        raise ManifestError(
            f"ckpt.toml: [trash] 'max_age' must be a string such as \"30d\", not {table['max_age']!r}",
            path=where,
            hint=hint,
        )
    try:
        size = parse_size(table["max_size"]) if "max_size" in table else None
        age = parse_age(table["max_age"]) if "max_age" in table else None
    except (UsageError, TypeError) as e:
        raise ManifestError(f"ckpt.toml: [trash] {e}", path=where, hint=hint) from None
    if size is None and age is None:
        return None
    return Budget(size, age)


@dataclass(slots=True)
class AutoPlan:
    """The entries `trash empty --auto` deletes to meet the budget, and the trash's bytes before and after."""

    plan: EmptyPlan
    budget: Budget
    bytes_before: int
    bytes_after: int


def plan_auto(ws: Workspace, now: datetime | None = None) -> AutoPlan:
    """The oldest entries to empty so that the trash meets `ckpt.toml`'s budget. Changes nothing.

    Raises UsageError when the workspace sets no budget."""
    from .policy import read_workspace_doc
    from .trash import plan_empty
    from .trash_results import EmptyPlan

    budget = budget_of(read_workspace_doc(ws))
    if budget is None:
        raise UsageError(
            "ckpt.toml sets no trash budget",
            hint='add [trash] max_size = "10GB" and/or max_age = "30d" to ckpt.toml (docs/trash.md)',
        )
    every = plan_empty(ws)
    entries = sorted(every.entries, key=lambda e: (e.created, e.id))  # oldest first
    now = now or datetime.now(UTC)
    chosen: list[Any] = []
    rest: list[Any] = []
    for e in entries:
        old = False
        if e.state == "emptying":  # an interrupted empty (a bucket): finished whatever the budget
            old = True
        elif budget.max_age is not None:
            try:
                old = now - parse_iso(e.created) > budget.max_age
            except ValueError:
                old = False
        (chosen if old else rest).append(e)
    before = sum(e.bytes for e in entries)
    after = sum(e.bytes for e in rest)
    if budget.max_size is not None:
        while rest and after > budget.max_size:
            e = rest.pop(0)
            chosen.append(e)
            after -= e.bytes
    chosen.sort(key=lambda e: (e.created, e.id))
    return AutoPlan(EmptyPlan(chosen, every.skipped, every.leftovers), budget, before, after)
