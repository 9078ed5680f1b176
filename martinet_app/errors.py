"""Errors a Martinet user can meet.

Every error carries ``.message``. On the wire an error travels as
``{"type": ClassName, "message": ...}``; the client raises the class of the same
name from this module (:func:`from_wire`), so callers catch the same types
whether the mistake was found locally or by the server.
"""

from __future__ import annotations


class MartinetError(Exception):
    """Root of every error Martinet raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict:
        """The error as the ``error`` object of a reply."""
        return {"type": type(self).__name__, "message": self.message}


class InvalidRequest(MartinetError):
    """Raised when a request is malformed: missing or unknown fields, wrong types."""


class RequestTooLarge(InvalidRequest):
    """Raised when a request is larger than the server accepts (``--max-message-bytes``)."""


class BadTimeSpec(InvalidRequest):
    """Raised when a time or interval string cannot be parsed."""


class InvalidDependency(InvalidRequest):
    """Raised when a task's ``after`` names a task that does not exist (yet): a task can only wait for tasks
    already submitted, which is also why dependencies cannot form a cycle."""


class TaskNotFound(MartinetError):
    """Raised when no task or recurring schedule has the given id."""


class InvalidTransition(MartinetError):
    """Raised when a task cannot move to the asked state (e.g. cancelling a finished task)."""


class StoreUnavailable(MartinetError):
    """Raised when the server's database failed (connection lost, locked, disk full); nothing was committed."""


class StoreConflict(StoreUnavailable):
    """Raised when the database rolled the server's transaction back to break a deadlock with another
    connection's (or, on PostgreSQL, a serialization failure); nothing was committed. The server runs a
    client's request again a few times before it answers with this: try again."""


class ServerUnavailable(MartinetError, ConnectionError):
    """Raised when the server did not answer within the client's timeout."""


class AuthenticationFailed(MartinetError, ConnectionError):
    """Raised when the server refused this peer's keys, or a peer and the server disagree on using keys."""


class WaitTimeout(MartinetError, TimeoutError):
    """Raised when a task did not finish within the time ``wait`` was given."""


class ProtocolError(MartinetError):
    """Raised when a peer sends a message that does not follow docs/PROTOCOL.md.

    ``reason`` says what was wrong in a word of a fixed vocabulary (metrics.REJECTED), which the
    server counts: ``malformed`` (frames, JSON), ``too_large``, ``bad_version``, ``unknown_command``,
    ``bad_body`` (a command's fields), ``bad_event`` (a status event's) or ``unauthenticated`` (a
    key no longer allowed, or not the key of the worker it speaks for).
    """

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class HandlerError(MartinetError):
    """Raised when handlers cannot be loaded or registered (import failure, duplicate name)."""


class ConfigError(MartinetError):
    """Raised when a setting (database URL, port, time zone) is unusable."""


_BY_NAME = {
    cls.__name__: cls
    for cls in (
        MartinetError,
        InvalidRequest,
        RequestTooLarge,
        BadTimeSpec,
        InvalidDependency,
        TaskNotFound,
        InvalidTransition,
        StoreUnavailable,
        StoreConflict,
        ServerUnavailable,
        AuthenticationFailed,
        WaitTimeout,
        ProtocolError,
        HandlerError,
        ConfigError,
    )
}


def from_wire(error: dict) -> MartinetError:
    """Rebuild the error a server reply describes; unknown types become MartinetError."""
    cls = _BY_NAME.get(str(error.get("type")), MartinetError)
    return cls(str(error.get("message", "unknown error")))
