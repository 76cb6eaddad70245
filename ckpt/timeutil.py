from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from .errors import UsageError

_AGE = r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*"  # compiled on first use (re caches it): not at import
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_AGE_DAYS = 100 * 365  # an age reaches back at most this far: further than any trash entry, inside a date's range


def now_iso() -> str:
    """The current time as ISO 8601 in UTC, to the microsecond."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def parse_iso(value: str) -> datetime:
    dt = datetime.fromisoformat(value)
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def seconds_since(created: str) -> float:
    """Seconds since the ISO time `created` (0 when unreadable: treated as young)."""
    try:
        return (datetime.now(UTC) - parse_iso(created)).total_seconds()
    except ValueError:
        return 0.0


def parse_age(text: str) -> timedelta:
    """'7d', '12h', '30m', '2w', '45s' as a timedelta; raises UsageError, also for an age over 100 years (one
    that large would not fit a date: `99999999999w` overflowed)."""
    m = re.fullmatch(_AGE, text)
    if not m:
        raise UsageError(f"invalid age {text!r}", hint="use a number and a unit: 45s, 30m, 12h, 7d, 2w")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not seconds <= MAX_AGE_DAYS * 86400:  # also inf, from a number too long for a float
        raise UsageError(f"age {text.strip()!r} is over 100 years", hint="use a smaller age, such as 52w")
    return timedelta(seconds=seconds)
