"""Exceptions shared across Brook's layers. Inner layers raise these; the edges (CLI, WebSocket) translate them."""

from __future__ import annotations


class BrookError(Exception):
    """Base class for every error Brook raises on purpose."""


class ModelError(BrookError):
    """A model in the repository is missing, malformed, or does not match its manifest."""


class UnknownModelError(ModelError):
    """The requested model or version is not in the repository."""


class ModelNotReadyError(ModelError):
    """The model exists in the repository but has not been fetched/converted yet."""


class FetchError(BrookError):
    """Downloading, verifying or converting a model source failed."""


class AudioError(BrookError):
    """Audio could not be read or is not usable (corrupt, unsupported format, empty)."""


class ProtocolError(BrookError):
    """A client broke the wire protocol. `code` is the documented error code; `close_code` is None when the
    error is recoverable (the socket stays open) and the WebSocket close code when it is fatal."""

    def __init__(self, code: str, message: str, *, close_code: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.close_code = close_code


class OverloadedError(BrookError):
    """The server or an engine is at capacity; the client should retry later."""


class ContextLengthError(BrookError, ValueError):
    """A prompt (plus the tokens requested) does not fit in the model's context window."""


class EngineDeadError(BrookError):
    """An engine stopped (shutdown or crash); work submitted to it can not complete."""
