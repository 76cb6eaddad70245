"""File names as text in TOML and JSON, which must be UTF-8, where a POSIX name may be any bytes.

Python reads a name that is not UTF-8 with `surrogateescape`: each byte 0x80-0xFF that is not part of a
valid UTF-8 sequence becomes the lone surrogate U+DC80-U+DCFF, which no UTF-8 text can hold. ckpt writes
such a byte as the six characters `\\udcXX` (XX: its two lowercase hex digits). So that the escape is
unambiguous, a backslash that begins the same six characters in a real name is written `\\udc5c`; every
other name is written as it is (docs/formats.md, "File names that are not UTF-8").
"""

from __future__ import annotations

import os
import re

# patterns compiled on first use (re caches them), not when `import ckpt` runs
_TO_ESCAPE = r"[\udc80-\udcff]|\\(?=udc(?:5c|[89a-f][0-9a-f]))"
_ESCAPED = r"\\udc(5c|[89a-f][0-9a-f])"


def escape_name(name: str) -> str:
    """`name` (as Python decodes a file name) as UTF-8-safe text; unchanged unless it is not UTF-8 or holds
    the text of an escape."""
    if "\\udc" not in name and (name.isascii() or not _has_surrogate(name)):
        return name
    return re.sub(_TO_ESCAPE, lambda m: f"\\udc{ord(m[0]) & 0xFF:02x}", name)


def unescape_name(text: str) -> str:
    """The name `escape_name` wrote as `text`, as Python decodes file names (`os.fsencode` gives its bytes)."""
    if "\\udc" not in text:
        return text
    return re.sub(_ESCAPED, lambda m: "\\" if m[1] == "5c" else chr(0xDC00 + int(m[1], 16)), text)


def escape_path(path: str | os.PathLike[str]) -> str:
    """A path as text for a manifest, a table or JSON (see escape_name)."""
    return escape_name(os.fspath(path))


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
