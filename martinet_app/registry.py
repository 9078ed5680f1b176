"""Handler registration: the ``@task`` decorator and the loader for a handlers folder."""

from __future__ import annotations

import importlib.util
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import HandlerError

#: A handler: ``fn(task_id, args, progress) -> JSON-serialisable result``.
Handler = Callable[[int, dict, Callable[..., None]], Any]


class Registry:
    """Task name -> handler function, refusing two handlers for one name."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def add(self, name: str, fn: Handler) -> Handler:
        """Register ``fn`` under ``name``; a second, different function for the name is an error."""
        if not isinstance(name, str) or not name.strip():
            raise HandlerError(f"a handler name must be a non-empty string, got {name!r}")
        if not callable(fn):
            raise HandlerError(f"handler for {name!r} is not callable: {fn!r}")
        existing = self._handlers.get(name)
        if existing is not None and existing is not fn:
            raise HandlerError(
                f"two handlers for task {name!r}: {_where(existing)} and {_where(fn)}; rename one of them"
            )
        self._handlers[name] = fn
        return fn

    def get(self, name: str) -> Handler | None:
        return self._handlers.get(name)

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def update(self, other: Registry) -> None:
        """Add every handler of ``other`` (same duplicate rule)."""
        for name, fn in other._handlers.items():
            self.add(name, fn)

    def __len__(self) -> int:
        return len(self._handlers)


#: Handlers registered by ``@task`` in imported modules.
default_registry = Registry()


def task(name: str | Handler | None = None) -> Any:
    """Register a handler: ``@task``, ``@task()`` or ``@task("name")`` (default: the function's name)."""
    if callable(name):
        return default_registry.add(name.__name__, name)

    def decorate(fn: Handler) -> Handler:
        return default_registry.add(name or fn.__name__, fn)

    return decorate


def load_handlers(directory: str | Path) -> Registry:
    """Import every ``*.py`` in ``directory`` (sorted, skipping ``_``-prefixed) and return what they registered.

    The folder is put on ``sys.path`` so handler files can import their own helper modules.

    Raises:
        HandlerError: the folder is missing, or a file fails to import (naming the file and the error).
    """
    folder = Path(directory).resolve()
    if not folder.is_dir():
        raise HandlerError(f"handlers folder {str(directory)!r} does not exist or is not a folder")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        _import_file(path)
    return default_registry


def _import_file(path: Path) -> None:
    module_name = f"martinet_handlers.{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise HandlerError(f"cannot import handlers file {str(path)!r}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except HandlerError:
        raise
    except BaseException as exc:
        sys.modules.pop(module_name, None)
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(path)]
        line = getattr(exc, "lineno", None) if isinstance(exc, SyntaxError) else (frames[-1].lineno if frames else None)
        where = f" (line {line})" if line else ""
        raise HandlerError(
            f"cannot import handlers file {str(path)!r}{where}: {type(exc).__name__}: {exc}; "
            "fix the file or move it away"
        ) from None


def _where(fn: Handler) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
