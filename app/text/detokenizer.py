"""Incremental detokenizer: turns generated token ids into text pieces as they arrive.

A character such as an emoji or a CJK ideograph is often split over several byte-level tokens, so decoding each
token alone would emit broken characters. The detokenizer feeds each token's exact bytes to Python's incremental
UTF-8 decoder, which holds back an incomplete character until its last byte arrives. Bytes that can never form a
character become U+FFFD, exactly where a full ``TextTokenizer.decode`` of the same ids puts them, so the pieces
always join up to the full decode.

(``tokenizers.decoders.DecodeStream`` does the same job by re-decoding a window of tokens and checking for a
trailing U+FFFD; it cannot tell a held-back partial character from a genuine U+FFFD in the output, which the byte
approach never confuses.)
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Iterable

from app.text.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)


class IncrementalDetokenizer:
    """Per-request streaming decoder. Call ``push`` for each new token and ``finish`` once at the end."""

    def __init__(self, tokenizer: TextTokenizer, *, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._finished = False
        self._num_tokens = 0

    @property
    def num_tokens(self) -> int:
        """How many tokens were pushed."""
        return self._num_tokens

    @property
    def has_pending_bytes(self) -> bool:
        """True while the bytes of an incomplete character are held back."""
        pending, _ = self._decoder.getstate()
        return len(pending) > 0

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (may be empty while a character is incomplete)."""
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.push called after finish()")
        raw = self._tokenizer.token_bytes(token_id)
        self._num_tokens += 1
        if self._skip_special and self._tokenizer.is_special(token_id):
            return ""
        return self._decoder.decode(raw, final=False)

    def push_many(self, token_ids: Iterable[int]) -> str:
        """Add several tokens; return the text they complete."""
        return "".join(self.push(token_id) for token_id in token_ids)

    def finish(self) -> str:
        """End the stream: held-back bytes of an incomplete character become U+FFFD."""
        if self._finished:
            return ""
        self._finished = True
        text = self._decoder.decode(b"", final=True)
        if text:
            logger.debug("detokenizer finished with an incomplete character: %r", text)
        return text
