"""The names ckpt gives files and folders in a workspace, and what an import hands a task: below the core
modules (workspace, trash, importer, doctor), which all read them, so that none imports another for a name."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

WORKSPACE_FILE = "ckpt.toml"
TASK_FILE = "task.toml"
CACHE_FILE = ".task.cache.json"
LIST_CACHE_FILE = ".task.list.cache"  # rendered rows of `ckpt list --json` (see row_caches.RowCache)
SUMMARY_CACHE_FILE = ".tasks.cache.json"  # in tasks/: every task's summary (see row_caches.SummaryCache)
TASK_ROWS_CACHE_FILE = ".tasks.rows.cache.json"  # in tasks/: every task's rendered row (see row_caches.TaskRowsCache)
LOCK_FILE = ".lock"
CREATE_LOCK_FILE = ".create.lock"  # in tasks/: serialises task creation (the case check)
SETTINGS_LOCK = ".workspace.lock"  # in tasks/: one change to ckpt.toml at a time
CHECKPOINT_DIR = "checkpoints"
NUMBERS_DIR = "numbers"  # tasks/<task>/numbers/<n>: the claim of checkpoint number n in a bucket (empty objects)
PENDING_PREFIX = ".pending-"
CLAIM_FILE = ".claim"  # models/<title>/.claim: the lease of a title in a bucket (ckpt.store_models.Lease)

STAGING_PREFIX = ".import-"  # an item being imported, in checkpoints/ (ckpt.staging)
IMPORT_MARKER_PREFIX = ".importing-"  # in the task folder: what a running import staged (ckpt.staging)
SAVING_FILE = ".saving.toml"  # in the task folder: the record of a save between its rename and its record


@dataclass(slots=True)
class Incoming:
    """A file or folder to add to a task as it is (see Task.add_existing)."""

    source: Path
    original_name: str
    size: int
    sha256: str  # of the file; of a folder, hashing.tree_digest of its files
    step: int | None = None
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    created: str | None = None
    files: list[tuple[str, int, str]] | None = None  # a folder's (relative path, size, sha256), if known
    is_dir: bool = False
    dev: int = -1  # st_dev of the source: a hard link needs the same file system
