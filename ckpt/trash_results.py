"""What the trash operations other than trash-unused return: models remove, restore, empty, du, recovery.

Kept apart from `ckpt.trash` so that `trash-unused`, the command that runs on the biggest tasks, does not
pay for creating these classes (a dataclass costs most of a millisecond to make). `ckpt.trash` still
exports every name here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .models import Model
    from .trash import Entry


@dataclass(slots=True)
class ModelTrashResult:
    """The trash entry a removed model went to, and the model."""

    entry: str
    model: Model


@dataclass(slots=True)
class RestoreResult:
    """The trash entry that was restored (and is now gone)."""

    entry: Entry


@dataclass(slots=True)
class EmptyPlan:
    """The entries `empty` would delete; building it changes nothing."""

    entries: list[Entry]
    skipped: list[tuple[str, str]]  # (id, why)
    leftovers: list[Path]  # `.deleting-*` folders of an interrupted empty

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)


@dataclass(slots=True)
class EmptyResult:
    """What `empty` deleted, the bytes that freed, and what it left and why."""

    emptied: list[str]
    bytes_freed: int
    skipped: list[tuple[str, str]]
    held: Held | None = None  # deleted files whose bytes stay on disk: other hard links hold them


@dataclass(slots=True)
class Held:
    """Bytes that deleting some trashed files does not free, because other hard links (outside the trash,
    e.g. in the folder a task was imported from by linking) still hold them; and what to do about it."""

    files: int
    bytes: int
    source: str | None = None  # the folder the task was imported from, when it was imported by linking

    @property
    def why(self) -> str:
        if self.source:
            return (
                f"{self.files} checkpoint file(s) are hard links to files under {self.source} (imported by "
                "linking): emptying the trash frees their bytes only once those are removed too; "
                "import with --move (or --copy) next time"
            )
        return (
            f"{self.files} checkpoint file(s) have other hard links outside the trash: their bytes stay on disk "
            "until those links are removed too (find them with: find DIR -samefile FILE)"
        )

    def to_json(self) -> dict[str, object]:
        return {"files": self.files, "bytes": self.bytes, "why": self.why}


@dataclass(slots=True)
class DiskUse:
    """Bytes allocated (like `du -B1`), each inode counted once: in the first part that reaches it."""

    by_task: dict[str, int]
    models: int
    trash: int
    other: int  # ckpt.toml, the top-level folders themselves, anything else
    total: int

    @property
    def tasks(self) -> int:
        return sum(self.by_task.values())


@dataclass(slots=True, frozen=True)
class Repair:
    """One thing recovery found, and what it did (or, on a dry run, would do)."""

    path: str
    problem: str
    action: str
