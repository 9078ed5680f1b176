"""Martinet: a persistent, ZeroMQ-based distributed task manager.

``from martinet_app import task`` registers handlers, and ``dependency_results()`` gives a running
handler its dependencies' results; ``from martinet_app import Martinet`` gives the client. They are
imported lazily so that ``martinet --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Martinet", "dependency_results", "task", "__version__"]

if TYPE_CHECKING:
    from .client import Martinet
    from .context import dependency_results
    from .registry import task


def __getattr__(name: str) -> Any:
    if name == "Martinet":
        from .client import Martinet

        return Martinet
    if name == "task":
        from .registry import task

        return task
    if name == "dependency_results":
        from .context import dependency_results

        return dependency_results
    raise AttributeError(f"module 'martinet_app' has no attribute {name!r}")
