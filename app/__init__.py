"""Brook: a real-time inference server for streaming speech-to-text and token generation."""

from __future__ import annotations

__version__ = "0.1.0"
