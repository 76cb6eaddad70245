"""The one family of errors ckpt raises, each with a stable exit code.

Exit codes (documented in the README): 0 ok, 1 any other error, 2 usage,
3 not found, 4 conflict, 5 busy, 6 integrity.
"""

from __future__ import annotations

from pathlib import Path


class CkptError(Exception):
    """Base of every error ckpt raises on purpose; `exit_code` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, *, path: Path | str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.path = path
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class UsageError(CkptError, ValueError):
    """Bad input from the user: a malformed name, option or value."""

    exit_code = 2


class NotFoundError(CkptError, LookupError):
    """A workspace, task, checkpoint, model or trash entry that does not exist."""

    exit_code = 3


class WorkspaceNotFound(NotFoundError):
    pass


class TaskNotFound(NotFoundError):
    pass


class CheckpointNotFound(NotFoundError):
    pass


class ModelNotFound(NotFoundError):
    pass


class ConflictError(CkptError, FileExistsError):
    """Something with that name already exists, or the operation would overwrite something."""

    exit_code = 4


class WriteError(CkptError, OSError):
    """A write the file system refused (a full or read-only disk), after what it had begun was undone;
    `errno` is the system's."""

    exit_code = 1

    def __init__(
        self, message: str, *, errno: int | None = None, path: Path | str | None = None, hint: str | None = None
    ):
        super().__init__(message, path=path, hint=hint)
        self.errno = errno  # type: ignore[misc]
        self.filename = str(path) if path is not None else None


class BusyError(CkptError, TimeoutError):
    """A lock could not be taken in time."""

    exit_code = 5


class CommitUnknown(CkptError):
    """A commit's request failed and the manifest could not be read to learn whether it landed."""


class IntegrityError(CkptError):
    """A hash mismatch, a corrupt or unreadable manifest or file, or a file that is unsafe to load."""

    exit_code = 6


class ManifestError(IntegrityError):
    """A manifest that is missing, empty, truncated, not TOML, of an unknown version, or mistyped."""


class SymlinkError(IntegrityError):
    """One of the workspace's own paths (a folder, manifest, entry, cache or lock file) is a symlink: never followed."""


class UnsafeFileError(IntegrityError):
    """A checkpoint that would need full unpickling to load."""


class NotRegularFile(IntegrityError, OSError):
    """A FIFO, device or socket where a checkpoint file belongs: reading it could block or never end.

    An OSError too, so code that treats an unreadable file as a problem to report does so here."""


EXIT_CODES = {
    0: "ok",
    1: "any other error",
    2: "usage: bad arguments, names or values",
    3: "not found: workspace, task, checkpoint, model or trash entry",
    4: "conflict: the name already exists, or the operation would overwrite something",
    5: "busy: a lock wait timed out",
    6: "integrity: hash mismatch, corrupt manifest or file, or a file unsafe to load",
}
