"""What `show` and `export` check before reading a checkpoint (or model) in a folder workspace.

`verify` refuses a checkpoint reached through a symlink (a file, or a shard inside a folder checkpoint,
replaced by a link) and one whose bytes differ from its recorded sha256; `show` and `export` refuse the
same, so that nothing is read through a link and an export never records a sha256 its bytes do not have.
In an `s3://` workspace the local path is already a verified copy (`task.local_path`), so nothing is
checked again.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from . import hashing
from .errors import IntegrityError

if TYPE_CHECKING:
    from .workspace_base import Workspace


def check_readable(ws: Workspace, path: Path, *, sha256: str | None = None, size: int | None = None, task: str) -> None:
    """Refuse (IntegrityError, exit 6) to read `path`, a checkpoint or model in workspace `ws`, when it or a
    file inside it is a symlink or missing; with `sha256` (and `size`), also when its bytes differ.
    `task` names the task to verify in the hint."""
    if getattr(ws, "remote", False):
        return
    rel = ws.rel(path)
    hint = f"run: ckpt verify {task}"
    stored = ws.stored_files([rel])[0]
    if stored is None:
        raise IntegrityError(f"'{rel}' is missing", path=path, hint=hint)
    if isinstance(stored, str):
        message = f"'{rel}' {stored}; ckpt never reads through a link" if stored.startswith("is ") else stored
        raise IntegrityError(message, path=path, hint=hint)
    if sha256 is None:
        return
    if size is not None and sum(f.size for f in stored) != size:
        raise IntegrityError(f"'{rel}' does not match its recorded size; run: ckpt verify {task}", path=path)
    digests = ws.hash_files([f.handle for f in stored], sum(f.size for f in stored), lambda i: None)
    errors = [d for d in digests if isinstance(d, OSError)]
    if errors:
        raise IntegrityError(f"cannot read '{rel}': {errors[0].strerror or errors[0]}", path=path, hint=hint)
    if [f.name for f in stored] == [""]:
        actual = str(digests[0])
    else:
        actual = hashing.tree_digest([(f.name, str(d)) for f, d in zip(stored, digests, strict=True)])
    if actual != sha256:
        raise IntegrityError(f"'{rel}' does not match its recorded sha256; run: ckpt verify {task}", path=path)


def check_out(ws: Workspace, out: Path) -> None:
    """Refuse (UsageError, exit 2) an export's `out` inside the workspace's tasks/, models/ or trash/, where it
    would become or damage a checkpoint or model; symlinks and `..` are resolved first."""
    import os

    from .errors import UsageError

    if getattr(ws, "remote", False):
        return
    where = Path(os.path.realpath(out))
    for name, folder in (("tasks", ws.tasks_dir), ("models", ws.models_dir), ("trash", ws.trash_dir)):
        inside = Path(os.path.realpath(folder))
        if where == inside or inside in where.parents:
            raise UsageError(
                f"'{out}' is inside the workspace's {name}/ folder, which only ckpt writes",
                path=out,
                hint="export somewhere outside tasks/, models/ and trash/ (or keep it as a model: --as-model TITLE)",
            )
