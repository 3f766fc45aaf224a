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
