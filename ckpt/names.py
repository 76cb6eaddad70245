"""Validation of the names users give: task names and model titles."""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import UsageError

_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,99}")


def describe(value: str) -> str:
    shown = value if len(value) <= 60 else value[:57] + "..."
    return repr(shown)


def check_name(value: object, what: str) -> str:
    """Return `value` if it is a valid task name or model title, else raise UsageError.

    Valid: 1-100 characters of letters, digits, '-', '_', '.'; not starting with '.'.
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        shown = describe(value) if isinstance(value, str) else type(value).__name__
        raise UsageError(
            f"invalid {what} {shown}",
            hint="use 1-100 letters, digits, '-', '_' or '.', not starting with '.'",
        )
    return value


def is_valid_name(value: object) -> bool:
    """Whether `value` passes `check_name`: for names read from files, which are refused as corrupt (exit 6)."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def check_task_name(value: object) -> str:
    return check_name(value, "task name")


def check_title(value: object) -> str:
    return check_name(value, "model title")


def case_twin(name: str, existing: Iterable[str]) -> str | None:
    """The name in `existing` that differs from `name` only in case, or None.

    Two such names would be one folder on a case-insensitive file system (macOS, Windows), so ckpt
    refuses a new task or title whose case-folded form is already taken.
    """
    folded = name.casefold()
    for other in existing:
        if other != name and other.casefold() == folded:
            return other
    return None
