"""Engines: the loops that share one model version between every live session (speech-to-text, text generation).

Each engine owns its step-loop task and its single-thread inference executor; its pure parts (segmentation,
scheduling) live in their own modules and are tested without models.
"""

from __future__ import annotations
