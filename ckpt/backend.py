"""Where the choice between the two implementations of a workspace is made.

A folder workspace keeps its files through `fsutil` (locks, appends, hard links, renames); a workspace named
by a URL keeps objects through `ckpt.storage.Storage` (conditional writes, server-side copies). The core
operations that differ (promote, trash, restore, doctor...) are marked `@per_backend`: their body is the
local implementation, and the workspace passed as their first argument picks the one that runs
(`Workspace.implementation`; `ckpt.store.StoreWorkspace` returns its own of the same name). The commands
call the same functions whatever the workspace; none of them knows which one it has.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

F = TypeVar("F", bound=Callable[..., Any])


def per_backend(local: F) -> F:
    """Mark `local` (whose first argument is a workspace) as a core operation each backend implements."""
    name = local.__name__

    @functools.wraps(local)
    def run(ws: Any, *args: Any, **kwargs: Any) -> Any:
        return ws.implementation(name, local)(ws, *args, **kwargs)

    return cast(F, run)
