"""Martinet: a persistent, ZeroMQ-based distributed task manager.

``from martinet_app import task`` registers handlers; ``from martinet_app import Martinet``
gives the client. Both are imported lazily so that ``martinet --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Martinet", "task", "__version__"]

if TYPE_CHECKING:
    from .client import Martinet
    from .registry import task


def __getattr__(name: str) -> Any:
    if name == "Martinet":
        from .client import Martinet

        return Martinet
    if name == "task":
        from .registry import task

        return task
    raise AttributeError(f"module 'martinet_app' has no attribute {name!r}")
