"""Shell completion of task names, model titles and trash entry ids, from the workspace's folder names.

Fast by design: one folder listing each, no manifest parsed, no torch, and silence on any problem (a
completion must never print an error into the user's command line). A workspace in object storage is
not listed: a request per keystroke would be slow and may need credentials.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..storage import is_url
from ..workspace_base import find_workspace


def _root(ctx: Any) -> Path | None:
    try:
        explicit = ctx.find_root().params.get("workspace")
    except AttributeError:
        explicit = None
    if is_url(explicit) or is_url(os.environ.get("CKPT_WORKSPACE")):
        return None
    try:
        return find_workspace(explicit)
    except Exception:
        return None


def _names(ctx: Any, sub: str, incomplete: str) -> list[str]:
    root = _root(ctx)
    if root is None:
        return []
    try:
        with os.scandir(root / sub) as it:
            names = [e.name for e in it if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    return sorted(n for n in names if n.startswith(incomplete))


def tasks(ctx: Any, incomplete: str) -> list[str]:
    """Task names starting with `incomplete`."""
    return _names(ctx, "tasks", incomplete)


def titles(ctx: Any, incomplete: str) -> list[str]:
    """Model titles starting with `incomplete`."""
    return _names(ctx, "models", incomplete)


def entries(ctx: Any, incomplete: str) -> list[str]:
    """Trash entry ids starting with `incomplete`."""
    return _names(ctx, "trash", incomplete)
