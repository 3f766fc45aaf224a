"""Whisper text (de)coding over a Hugging Face ``tokenizer.json``.

Only text tokens are decoded: special tokens (EOT and above, timestamps included) are dropped first, as
faster-whisper does, so a segment's text is ``decode(segment_tokens)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import tokenizers

logger = logging.getLogger(__name__)


class WhisperTokenizer:
    """Encode text to token ids and decode the text tokens of a Whisper token sequence."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, eot: int) -> None:
        self._tokenizer = tokenizer
        self.eot = eot  # ids >= eot are special (EOT, SOT, task, timestamps)

    @classmethod
    def from_file(cls, path: Path, *, eot: int) -> WhisperTokenizer:
        if not path.is_file():
            raise FileNotFoundError(f"expected a tokenizer.json at {path}")
        return cls(tokenizers.Tokenizer.from_file(str(path)), eot=eot)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (prefix a space for a mid-sentence word)."""
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, tokens: Iterable[int]) -> str:
        """Text of the text tokens in ``tokens``; special and timestamp tokens are skipped."""
        return str(self._tokenizer.decode([token for token in tokens if token < self.eot]))

    def token_id(self, token: str) -> int:
        """Id of a special token such as ``<|en|>``; raises KeyError when the vocabulary lacks it."""
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return int(token_id)
