"""Text tokenizer of the language model: ``tokenizer.json`` (built by app/convert/gguf_tokenizer.py) plus its config.

Encoding uses Hugging Face ``tokenizers``. Decoding maps every token id to its exact bytes (the GPT-2 byte-level
alphabet undone for ordinary tokens, the raw text for added tokens) and decodes the joined bytes as UTF-8, the way
llama.cpp renders tokens. The same byte table drives the incremental detokenizer, so streamed text and a full
decode agree byte for byte.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

logger = logging.getLogger(__name__)


class TokenizerConfigError(ValueError):
    """The tokenizer files or config entries are missing or inconsistent."""


def _byte_level_alphabet() -> dict[str, int]:
    """The GPT-2 byte-level alphabet: the printable character that stands for each byte value.

    Bytes that are printable Latin-1 characters stand for themselves; the other 68 bytes are given the code points
    from 256 upwards, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    printable_set = set(printable)
    char_to_byte: dict[str, int] = {chr(byte): byte for byte in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in printable_set:
            char_to_byte[chr(next_code_point)] = byte
            next_code_point += 1
    return char_to_byte


_CHAR_TO_BYTE = _byte_level_alphabet()
# BYTE_LEVEL_CHARS[b] is the character that stands for byte b in byte-level BPE vocabularies.
BYTE_LEVEL_CHARS: tuple[str, ...] = tuple(sorted(_CHAR_TO_BYTE, key=_CHAR_TO_BYTE.__getitem__))


def byte_level_to_bytes(token: str) -> bytes | None:
    """The bytes a byte-level BPE token stands for, or None if the token has a character outside the alphabet."""
    try:
        return bytes(_CHAR_TO_BYTE[char] for char in token)
    except KeyError:
        return None


def _optional_int(entries: Mapping[str, Any], key: str) -> int | None:
    value = entries.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TokenizerConfigError(f"tokenizer config {key!r} should be an int or null, got {value!r}")
    return value


@dataclass(frozen=True)
class TokenizerConfig:
    """The config entries written next to ``tokenizer.json`` by ``write_tokenizer_files``."""

    vocab_size: int  # number of token ids
    bos_token_id: int | None  # beginning of sequence (SmolLM2: <|im_start|>)
    eos_token_id: int | None  # end of sequence (SmolLM2: <|im_end|>)
    pad_token_id: int | None
    unk_token_id: int | None
    add_bos_token: bool  # prepend bos when encoding with add_special=True
    add_eos_token: bool  # append eos when encoding with add_special=True
    chat_template: str | None  # Jinja source of the chat template
    special_tokens: Mapping[int, str]  # control token id -> text
    stop_token_ids: frozenset[int]  # ids that end generation (eos, <|im_end|>, <|endoftext|>, ...)

    @classmethod
    def from_entries(cls, entries: Mapping[str, Any]) -> TokenizerConfig:
        """Check and convert config entries, as returned by the converter or read back from JSON."""
        vocab_size = entries.get("vocab_size")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise TokenizerConfigError(f"tokenizer config 'vocab_size' should be a positive int, got {vocab_size!r}")
        special_raw = entries.get("special_tokens", {})
        if not isinstance(special_raw, Mapping):
            raise TokenizerConfigError(f"tokenizer config 'special_tokens' should be a mapping, got {special_raw!r}")
        special_tokens = {int(token_id): str(text) for token_id, text in special_raw.items()}
        stop_raw = entries.get("stop_token_ids", [])
        if not isinstance(stop_raw, Sequence | frozenset | set) or isinstance(stop_raw, str):
            raise TokenizerConfigError(f"tokenizer config 'stop_token_ids' should be a list of ids, got {stop_raw!r}")
        chat_template = entries.get("chat_template")
        if chat_template is not None and not isinstance(chat_template, str):
            raise TokenizerConfigError(f"tokenizer config 'chat_template' should be a string, got {chat_template!r}")
        config = cls(
            vocab_size=vocab_size,
            bos_token_id=_optional_int(entries, "bos_token_id"),
            eos_token_id=_optional_int(entries, "eos_token_id"),
            pad_token_id=_optional_int(entries, "pad_token_id"),
            unk_token_id=_optional_int(entries, "unk_token_id"),
            add_bos_token=bool(entries.get("add_bos_token", False)),
            add_eos_token=bool(entries.get("add_eos_token", False)),
            chat_template=chat_template,
            special_tokens=special_tokens,
            stop_token_ids=frozenset(int(token_id) for token_id in stop_raw),
        )
        config._check_ids()
        return config

    def _check_ids(self) -> None:
        named = {
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "unk_token_id": self.unk_token_id,
        }
        for name, token_id in named.items():
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise TokenizerConfigError(f"{name} = {token_id} is outside the vocabulary of {self.vocab_size}")
        for token_id in [*self.special_tokens, *self.stop_token_ids]:
            if not 0 <= token_id < self.vocab_size:
                raise TokenizerConfigError(f"token id {token_id} is outside the vocabulary of {self.vocab_size}")
        if self.add_bos_token and self.bos_token_id is None:
            raise TokenizerConfigError("add_bos_token is set but there is no bos_token_id")
        if self.add_eos_token and self.eos_token_id is None:
            raise TokenizerConfigError("add_eos_token is set but there is no eos_token_id")


class TextTokenizer:
    """Encode text to token ids and decode ids to text, with llama.cpp's ids and llama.cpp's rendering."""

    def __init__(self, tokenizer: Tokenizer, config: TokenizerConfig) -> None:
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        if size != config.vocab_size:
            raise TokenizerConfigError(f"tokenizer.json has {size} tokens but the config says {config.vocab_size}")
        self._config = config
        # Two encoders, because `encode_special_tokens` is a setting of the Tokenizer object, not of a call.
        self._encoder_with_special = Tokenizer.from_str(tokenizer.to_str())
        self._encoder_with_special.encode_special_tokens = False
        self._encoder_plain_text = Tokenizer.from_str(tokenizer.to_str())
        self._encoder_plain_text.encode_special_tokens = True
        self._token_bytes = self._build_byte_table(tokenizer, config.vocab_size)
        self._special_ids = frozenset(config.special_tokens)
        single_byte_tokens = {raw for raw in self._token_bytes if len(raw) == 1}
        self._dropped_bytes = frozenset(byte for byte in range(256) if bytes([byte]) not in single_byte_tokens)
        if self._dropped_bytes:
            logger.info("%d byte values have no token and are dropped from encoded text", len(self._dropped_bytes))

    @classmethod
    def from_files(cls, tokenizer_json: Path, config: TokenizerConfig | Mapping[str, Any]) -> TextTokenizer:
        """Load ``tokenizer.json`` with its config entries (a mapping is checked with ``TokenizerConfig``)."""
        if not tokenizer_json.is_file():
            raise TokenizerConfigError(f"tokenizer file {tokenizer_json} does not exist")
        if not isinstance(config, TokenizerConfig):
            config = TokenizerConfig.from_entries(config)
        return cls(Tokenizer.from_file(str(tokenizer_json)), config)

    @staticmethod
    def _build_byte_table(tokenizer: Tokenizer, vocab_size: int) -> list[bytes]:
        added = {token_id: token.content for token_id, token in tokenizer.get_added_tokens_decoder().items()}
        table: list[bytes | None] = [None] * vocab_size
        for text, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
            if not 0 <= token_id < vocab_size:
                raise TokenizerConfigError(f"token {text!r} has id {token_id}, outside the vocabulary of {vocab_size}")
            if token_id in added:
                table[token_id] = added[token_id].encode("utf-8")
                continue
            raw = byte_level_to_bytes(text)
            if raw is None:
                # Not byte-level text: render it as written, as the Hugging Face ByteLevel decoder does.
                logger.warning("token %d %r is not byte-level text; decoding it as UTF-8", token_id, text)
                raw = text.encode("utf-8")
            table[token_id] = raw
        missing = [token_id for token_id, raw in enumerate(table) if raw is None]
        if missing:
            raise TokenizerConfigError(f"{len(missing)} token ids have no token, first {missing[:5]}")
        return [raw for raw in table if raw is not None]

    @property
    def config(self) -> TokenizerConfig:
        return self._config

    @property
    def vocab_size(self) -> int:
        return self._config.vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._config.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._config.eos_token_id

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return self._config.stop_token_ids

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._special_ids

    @property
    def dropped_bytes(self) -> frozenset[int]:
        """Byte values with no token of their own: ``encode`` drops them, as llama.cpp does (SmolLM2 has 21,
        e.g. 0x04, 0x13 and the UTF-8 lead byte 0xF2), so text containing them does not round-trip exactly."""
        return self._dropped_bytes

    def token_text(self, token_id: int) -> str:
        """The text of a special token, or of the bytes of an ordinary token (lossy for partial characters)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for."""
        if not 0 <= token_id < self._config.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary of {self._config.vocab_size}")
        return self._token_bytes[token_id]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def encode(self, text: str, *, allow_special: bool, add_special: bool = False) -> list[int]:
        """Token ids of ``text``.

        ``allow_special``: text such as ``<|im_start|>`` becomes its control token (use it only for text Brook
        built, like a rendered chat template); otherwise it is tokenized as ordinary characters, so user input
        cannot inject control tokens. ``add_special``: add bos/eos as the model's config asks (llama.cpp's
        ``add_special``).
        """
        if not isinstance(text, str):
            raise TypeError(f"text to encode should be str, got {type(text).__name__}")
        encoder = self._encoder_with_special if allow_special else self._encoder_plain_text
        ids: list[int] = encoder.encode(text, add_special_tokens=False).ids
        if add_special:
            if self._config.add_bos_token and self._config.bos_token_id is not None:
                ids.insert(0, self._config.bos_token_id)
            if self._config.add_eos_token and self._config.eos_token_id is not None:
                ids.append(self._config.eos_token_id)
        return ids

    def decode_bytes(self, ids: Iterable[int], *, skip_special: bool = False) -> bytes:
        """The bytes of these tokens joined; ``skip_special`` leaves out control tokens."""
        return b"".join(
            self.token_bytes(token_id) for token_id in ids if not (skip_special and token_id in self._special_ids)
        )

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of these tokens. Bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids, skip_special=skip_special).decode("utf-8", errors="replace")
