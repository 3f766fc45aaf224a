"""Build a Hugging Face `tokenizers` byte-level BPE (``tokenizer.json``) from a GGUF file's tokenizer metadata.

The tokenizer must give the same ids as llama.cpp, so every choice here mirrors llama.cpp's
``src/llama-vocab.cpp`` rather than the original Hugging Face ``tokenizer.json`` of the model:

- The vocabulary is ``tokenizer.ggml.tokens`` (byte-level strings) and the merges are ``tokenizer.ggml.merges``
  (``"left right"``, lowest index merges first).
- The pre-tokenizer is chosen by ``tokenizer.ggml.pre``. llama.cpp applies a list of split regexes one after the
  other; each becomes a ``Split(..., behavior="isolated")`` here (matches and the text between them are both kept,
  as llama.cpp keeps unmatched spans), followed by the byte-to-unicode mapping of GPT-2. llama.cpp's regexes are
  copied in their ASCII-only case-insensitive form (``'[sS]`` instead of ``(?i:'s)``).
- No normalizer: llama.cpp does not normalize BPE input (the Qwen2 ``tokenizer.json`` has NFC, llama.cpp does not).
- Control tokens (type 3) and unknown tokens (type 2) become special added tokens: matched in the text only when
  special tokens are allowed, like llama.cpp's ``parse_special``. User-defined tokens (type 4) become ordinary added
  tokens, which llama.cpp and Hugging Face both match even when special tokens are not parsed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from app.text.tokenizer import BYTE_LEVEL_CHARS

logger = logging.getLogger(__name__)

TOKENIZER_FILE_NAME = "tokenizer.json"

# llama.cpp's token types (``tokenizer.ggml.token_type``).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

# The GPT-2 regex as llama.cpp writes it. llama.cpp has no trailing `|\s+`: the whitespace it would match is kept
# anyway as an unmatched span, which is what `Split(behavior="isolated")` does too.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_REGEX = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SINGLE_DIGIT_REGEX = r"\p{N}"

# Texts of tokens that end a turn or a document; llama.cpp marks the same texts as end-of-generation.
END_OF_GENERATION_TEXTS = frozenset(
    {
        "<|im_end|>",
        "<|endoftext|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|end_of_text|>",
        "<|end|>",
        "<end_of_turn>",
        "<EOT>",
    }
)


class UnsupportedTokenizerError(ValueError):
    """The GGUF tokenizer is of a kind this converter does not reproduce exactly."""


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How llama.cpp pre-tokenizes for one ``tokenizer.ggml.pre`` value."""

    regexes: tuple[str, ...]  # split regexes, applied in order, each keeping matches and gaps
    ignore_merges: bool  # a pre-token that is itself in the vocabulary becomes one token without merging
    add_bos_default: bool  # llama.cpp's add_bos when the GGUF has no `tokenizer.ggml.add_bos_token`


_GPT2_SPEC = PreTokenizerSpec(regexes=(_GPT2_REGEX,), ignore_merges=False, add_bos_default=False)
_DIGITS_GPT2_SPEC = PreTokenizerSpec(
    regexes=(_SINGLE_DIGIT_REGEX, _GPT2_REGEX), ignore_merges=False, add_bos_default=False
)
_LLAMA3_SPEC = PreTokenizerSpec(regexes=(_LLAMA3_REGEX,), ignore_merges=True, add_bos_default=True)
_QWEN2_SPEC = PreTokenizerSpec(regexes=(_QWEN2_REGEX,), ignore_merges=False, add_bos_default=False)

# Only names whose llama.cpp behaviour is checked against llama.cpp's ids (scripts/make_llama_tokenizer_goldens.py).
# llama.cpp spells the GPT-2 pre-tokenizer "gpt-2"; "gpt2" is the value of `tokenizer.ggml.model`, not of `pre`.
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "gpt-2": _GPT2_SPEC,
    "smollm": _DIGITS_GPT2_SPEC,
    "starcoder": _DIGITS_GPT2_SPEC,
    "llama-bpe": _LLAMA3_SPEC,
    "llama3": _LLAMA3_SPEC,
    "llama-v3": _LLAMA3_SPEC,
    "qwen2": _QWEN2_SPEC,
    "deepseek-r1-qwen": _QWEN2_SPEC,
}


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    """The value of a GGUF metadata key, or None when the file does not have it."""
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def _required(reader: gguf.GGUFReader, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise UnsupportedTokenizerError(f"GGUF metadata has no {key!r}; cannot build a tokenizer without it")
    return value


def _optional_id(reader: gguf.GGUFReader, key: str, vocab_size: int) -> int | None:
    value = _field(reader, key)
    if value is None:
        return None
    token_id = int(value)
    if not 0 <= token_id < vocab_size:
        raise UnsupportedTokenizerError(f"{key} = {token_id} is outside the vocabulary of {vocab_size} tokens")
    return token_id


def _build_pre_tokenizer(spec: PreTokenizerSpec, vocab: dict[str, int]) -> pre_tokenizers.PreTokenizer:
    steps: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False) for regex in spec.regexes
    ]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False))
    # A byte with no token of its own (SmolLM2 lacks 21, e.g. 0x04 and 0xF2) is dropped by llama.cpp, but it still
    # separates its neighbours: they cannot merge across it. Hugging Face's BPE would drop the byte first and then
    # merge the neighbours, so each such byte is split off into a pre-token of its own, which BPE turns into nothing.
    missing = [char for char in BYTE_LEVEL_CHARS if char not in vocab]
    if missing:
        logger.info("%d bytes have no token; llama.cpp drops them from the input", len(missing))
        char_class = "".join(f"\\x{{{ord(char):X}}}" for char in missing)
        steps.append(pre_tokenizers.Split(Regex(f"[{char_class}]"), behavior="isolated", invert=False))
    return pre_tokenizers.Sequence(steps)


def _split_merges(merges: list[str]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for index, merge in enumerate(merges):
        left, separator, right = merge.partition(" ")
        if not separator or not left or not right or " " in right:
            raise UnsupportedTokenizerError(f"merge #{index} should be 'left right', got {merge!r}")
        pairs.append((left, right))
    return pairs


def build_tokenizer(tokens: list[str], token_types: list[int], merges: list[str], pre: str) -> Tokenizer:
    """A Hugging Face tokenizer that reproduces llama.cpp's BPE tokenization for these tokens and merges."""
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        raise UnsupportedTokenizerError(
            f"tokenizer.ggml.pre = {pre!r} is not supported; supported pre-tokenizers: {sorted(PRE_TOKENIZERS)}"
        )
    if len(token_types) != len(tokens):
        raise UnsupportedTokenizerError(f"{len(tokens)} tokens but {len(token_types)} token types")
    vocab: dict[str, int] = {}
    for token_id, text in enumerate(tokens):
        if text in vocab:
            raise UnsupportedTokenizerError(f"token {text!r} appears twice (ids {vocab[text]} and {token_id})")
        vocab[text] = token_id
    model = models.BPE(vocab=vocab, merges=_split_merges(merges), ignore_merges=spec.ignore_merges, fuse_unk=False)
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = _build_pre_tokenizer(spec, vocab)
    tokenizer.decoder = decoders.ByteLevel()

    # Added tokens are registered in id order so that they keep their GGUF ids.
    special: list[AddedToken] = []
    user_defined: list[AddedToken] = []
    for text, token_type in zip(tokens, token_types, strict=True):
        if token_type in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN):
            special.append(
                AddedToken(text, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
            )
        elif token_type == TOKEN_TYPE_USER_DEFINED:
            user_defined.append(
                AddedToken(text, single_word=False, lstrip=False, rstrip=False, normalized=False, special=False)
            )
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user_defined)
    if tokenizer.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise UnsupportedTokenizerError(
            f"built tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens, GGUF has {len(tokens)}"
        )
    return tokenizer


def _stop_token_ids(
    tokens: list[str], token_types: list[int], eos_token_id: int | None, extra_ids: list[int | None]
) -> list[int]:
    stop_ids = {token_id for token_id in [eos_token_id, *extra_ids] if token_id is not None}
    for token_id, (text, token_type) in enumerate(zip(tokens, token_types, strict=True)):
        if token_type == TOKEN_TYPE_CONTROL and text in END_OF_GENERATION_TEXTS:
            stop_ids.add(token_id)
    return sorted(stop_ids)


def write_tokenizer_files(reader: gguf.GGUFReader, out_dir: Path, *, pre_override: str | None = None) -> dict[str, Any]:
    """Write ``out_dir/tokenizer.json`` and return the tokenizer's config entries for the model manifest.

    ``pre_override`` replaces ``tokenizer.ggml.pre`` (used to test other pre-tokenizers on this vocabulary).
    The returned ``special_tokens`` maps token id to text (JSON turns the ids into strings).
    """
    tokenizer_model = _required(reader, "tokenizer.ggml.model")
    if tokenizer_model != "gpt2":
        raise UnsupportedTokenizerError(
            f"tokenizer.ggml.model = {tokenizer_model!r}; only byte-level BPE ('gpt2') is supported"
        )
    pre = pre_override if pre_override is not None else _field(reader, "tokenizer.ggml.pre")
    if pre is None:
        raise UnsupportedTokenizerError(
            "GGUF metadata has no 'tokenizer.ggml.pre'; llama.cpp would fall back to "
            "its degraded 'default' pre-tokenizer, which is not supported"
        )
    tokens: list[str] = list(_required(reader, "tokenizer.ggml.tokens"))
    token_types: list[int] = [int(t) for t in _required(reader, "tokenizer.ggml.token_type")]
    merges: list[str] = list(_required(reader, "tokenizer.ggml.merges"))
    tokenizer = build_tokenizer(tokens, token_types, merges, str(pre))

    vocab_size = len(tokens)
    eos_token_id = _optional_id(reader, "tokenizer.ggml.eos_token_id", vocab_size)
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token")
    add_eos = _field(reader, "tokenizer.ggml.add_eos_token")
    chat_template = _field(reader, "tokenizer.chat_template")
    special_tokens = {
        token_id: text
        for token_id, (text, token_type) in enumerate(zip(tokens, token_types, strict=True))
        if token_type in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN)
    }
    extra_stop_ids = [
        _optional_id(reader, "tokenizer.ggml.eot_token_id", vocab_size),
        _optional_id(reader, "tokenizer.ggml.eom_token_id", vocab_size),
    ]

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / TOKENIZER_FILE_NAME
    tokenizer.save(str(path), pretty=False)
    logger.info("Wrote %s: %d tokens, %d merges, pre-tokenizer %r", path, vocab_size, len(merges), pre)
    return {
        "bos_token_id": _optional_id(reader, "tokenizer.ggml.bos_token_id", vocab_size),
        "eos_token_id": eos_token_id,
        "pad_token_id": _optional_id(reader, "tokenizer.ggml.padding_token_id", vocab_size),
        "unk_token_id": _optional_id(reader, "tokenizer.ggml.unknown_token_id", vocab_size),
        "add_bos_token": bool(add_bos) if add_bos is not None else PRE_TOKENIZERS[str(pre)].add_bos_default,
        "add_eos_token": bool(add_eos) if add_eos is not None else False,
        "chat_template": str(chat_template) if chat_template is not None else None,
        "vocab_size": vocab_size,
        "special_tokens": special_tokens,
        "stop_token_ids": _stop_token_ids(tokens, token_types, eos_token_id, extra_stop_ids),
    }
