"""JSON helpers for values stored in Redis."""

from __future__ import annotations

import json
from typing import Any


def text(value: Any) -> str:
    """A Redis reply (bytes) or value as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def dumps(value: Any) -> str:
    """Compact JSON."""
    return json.dumps(value, separators=(",", ":"))
