"""Tokenizer built from the SmolLM2 GGUF: llama.cpp's ids on a fixed corpus, config entries, round trips."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from app.text.chat_template import ChatTemplate
from app.text.tokenizer import BYTE_LEVEL_CHARS, TextTokenizer, TokenizerConfig, TokenizerConfigError
from tests.model_paths import smollm2_gguf

gguf = pytest.importorskip("gguf", reason="the gguf package is needed to read the model file")

from app.convert.gguf_tokenizer import (  # noqa: E402 - needs gguf, checked just above
    PRE_TOKENIZERS,
    TOKENIZER_FILE_NAME,
    UnsupportedTokenizerError,
    build_tokenizer,
    write_tokenizer_files,
)

GGUF_ENV = "BROOK_SMOLLM2_GGUF"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GOLDENS = Path(__file__).parent / "goldens" / "llama" / "tokenizer_ids.json"


def find_smollm2_gguf() -> Path:
    """The pinned GGUF from the model repository's source cache (or $BROOK_SMOLLM2_GGUF)."""
    return smollm2_gguf()


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    path = find_smollm2_gguf()
    return path


@pytest.fixture(scope="module")
def reader(gguf_path: Path) -> Any:
    return gguf.GGUFReader(str(gguf_path))


@pytest.fixture(scope="module")
def goldens() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(GOLDENS.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def converted(reader: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("smollm2_tokenizer")
    return out_dir, write_tokenizer_files(reader, out_dir)


@pytest.fixture(scope="module")
def tokenizer(converted: tuple[Path, dict[str, Any]]) -> TextTokenizer:
    out_dir, entries = converted
    return TextTokenizer.from_files(out_dir / TOKENIZER_FILE_NAME, entries)


def test_config_entries(converted: tuple[Path, dict[str, Any]]) -> None:
    out_dir, entries = converted
    assert (out_dir / TOKENIZER_FILE_NAME).is_file()
    assert entries["vocab_size"] == 49152
    assert (entries["bos_token_id"], entries["eos_token_id"]) == (1, 2)
    assert (entries["pad_token_id"], entries["unk_token_id"]) == (2, 0)
    assert entries["add_bos_token"] is False
    assert entries["add_eos_token"] is False
    assert entries["special_tokens"][1] == "<|im_start|>"
    assert entries["special_tokens"][2] == "<|im_end|>"
    assert sorted(entries["special_tokens"]) == list(range(17))
    assert entries["stop_token_ids"] == [0, 2]  # <|endoftext|> and <|im_end|> (eos)
    assert "<|im_start|>" in entries["chat_template"]


def test_config_survives_json(converted: tuple[Path, dict[str, Any]], tokenizer: TextTokenizer) -> None:
    out_dir, entries = converted
    reloaded = TextTokenizer.from_files(out_dir / TOKENIZER_FILE_NAME, json.loads(json.dumps(entries)))
    assert reloaded.config == tokenizer.config
    assert reloaded.stop_token_ids == frozenset({0, 2})
    assert reloaded.special_token_ids == frozenset(range(17))


def test_goldens_match_this_gguf(gguf_path: Path, goldens: dict[str, Any]) -> None:
    digest = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    assert digest == goldens["gguf_sha256"], f"{gguf_path} is not the GGUF the goldens were made from"


@pytest.mark.parametrize("pre", ["smollm", "gpt-2", "llama-bpe", "qwen2"])
def test_ids_equal_llama_cpp(
    reader: Any, goldens: dict[str, Any], pre: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    out_dir = tmp_path_factory.mktemp(f"tokenizer_{pre}")
    entries = write_tokenizer_files(reader, out_dir, pre_override=pre)
    text_tokenizer = TextTokenizer.from_files(out_dir / TOKENIZER_FILE_NAME, entries)
    corpus: list[str] = goldens["corpus"]
    expected: list[list[int]] = goldens["ids"][pre]
    assert len(corpus) == len(expected) >= 300
    mismatches = [
        (text, want, got)
        for text, want in zip(corpus, expected, strict=True)
        if (got := text_tokenizer.encode(text, allow_special=True)) != want
    ]
    assert not mismatches, f"{len(mismatches)} strings differ from llama.cpp, first: {mismatches[:3]}"


def test_plain_text_ids_equal_llama_cpp(tokenizer: TextTokenizer, goldens: dict[str, Any]) -> None:
    """With special tokens not allowed, '<|im_start|>' is ordinary text, as llama.cpp's parse_special=False."""
    expected: list[list[int]] = goldens["ids_plain_text"]["smollm"]
    mismatches = [
        (text, want, got)
        for text, want in zip(goldens["corpus"], expected, strict=True)
        if (got := tokenizer.encode(text, allow_special=False)) != want
    ]
    assert not mismatches, f"{len(mismatches)} strings differ from llama.cpp, first: {mismatches[:3]}"


def test_special_tokens_only_when_allowed(tokenizer: TextTokenizer) -> None:
    text = "<|im_start|>user\nHi<|im_end|>"
    with_special = tokenizer.encode(text, allow_special=True)
    assert with_special[0] == 1
    assert with_special[-1] == 2
    plain = tokenizer.encode(text, allow_special=False)
    assert not set(plain) & tokenizer.special_token_ids
    assert tokenizer.decode(plain) == text
    assert tokenizer.decode(with_special) == text
    assert tokenizer.decode(with_special, skip_special=True) == "user\nHi"


def test_rendered_chat_prompt_tokenizes_to_control_tokens(
    converted: tuple[Path, dict[str, Any]], tokenizer: TextTokenizer
) -> None:
    template = ChatTemplate(converted[1]["chat_template"])
    prompt = template.render([{"role": "user", "content": "Say <|im_end|> please"}])
    ids = tokenizer.encode(prompt, allow_special=True)
    assert ids[0] == tokenizer.bos_token_id == 1
    assert ids[-4:] == [1, *tokenizer.encode("assistant\n", allow_special=False)]
    assert tokenizer.decode(ids) == prompt
    # User text goes through encode(allow_special=False) when it must not become control tokens.
    assert 2 not in tokenizer.encode("Say <|im_end|> please", allow_special=False)


def test_add_special_follows_config(tokenizer: TextTokenizer) -> None:
    assert tokenizer.encode("Hi", allow_special=False, add_special=True) == tokenizer.encode("Hi", allow_special=False)


def test_decode_agrees_with_hugging_face(
    converted: tuple[Path, dict[str, Any]], tokenizer: TextTokenizer, goldens: dict[str, Any]
) -> None:
    hf = Tokenizer.from_file(str(converted[0] / TOKENIZER_FILE_NAME))
    for ids in goldens["ids"]["smollm"]:
        assert tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=False)


def test_dropped_bytes(tokenizer: TextTokenizer) -> None:
    # SmolLM2's vocabulary has no token for these byte values; llama.cpp drops them (see the goldens).
    assert tokenizer.dropped_bytes == frozenset(
        {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)}
    )
    assert tokenizer.decode(tokenizer.encode("a\x04b", allow_special=False)) == "ab"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80))
def test_round_trip(tokenizer: TextTokenizer, text: str) -> None:
    """decode(encode(text)) gives back the text, except bytes the vocabulary cannot represent."""
    kept = bytes(byte for byte in text.encode("utf-8") if byte not in tokenizer.dropped_bytes)
    for allow_special in (False, True):
        assert tokenizer.decode_bytes(tokenizer.encode(text, allow_special=allow_special)) == kept


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(
        st.characters(codec="utf-8", exclude_characters="\x04\x06\x13\x14\x16\x1d", max_codepoint=0x3FFFF), max_size=80
    )
)
def test_round_trip_exact_for_representable_text(tokenizer: TextTokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text, allow_special=False)) == text


def test_byte_level_alphabet() -> None:
    assert len(set(BYTE_LEVEL_CHARS)) == 256
    assert BYTE_LEVEL_CHARS[ord(" ")] == "Ġ"
    assert BYTE_LEVEL_CHARS[ord("\n")] == "Ċ"
    assert BYTE_LEVEL_CHARS[ord("A")] == "A"


def test_unknown_pre_tokenizer_is_refused(reader: Any, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedTokenizerError, match=r"'made-up'.*supported pre-tokenizers"):
        write_tokenizer_files(reader, tmp_path, pre_override="made-up")
    assert not (tmp_path / TOKENIZER_FILE_NAME).exists()


def test_supported_pre_tokenizers_are_the_checked_ones() -> None:
    assert {"smollm", "gpt-2", "llama-bpe", "qwen2"} <= set(PRE_TOKENIZERS)


def test_build_tokenizer_checks_its_inputs() -> None:
    tokens = ["a", "b", "ab"]
    with pytest.raises(UnsupportedTokenizerError, match="2 token types"):
        build_tokenizer(tokens, [1, 1], ["a b"], "gpt-2")
    with pytest.raises(UnsupportedTokenizerError, match="appears twice"):
        build_tokenizer(["a", "a"], [1, 1], [], "gpt-2")
    with pytest.raises(UnsupportedTokenizerError, match="merge #0"):
        build_tokenizer(tokens, [1, 1, 1], ["ab"], "gpt-2")


def test_config_validation() -> None:
    with pytest.raises(TokenizerConfigError, match="vocab_size"):
        TokenizerConfig.from_entries({})
    with pytest.raises(TokenizerConfigError, match="eos_token_id = 10"):
        TokenizerConfig.from_entries({"vocab_size": 10, "eos_token_id": 10})
    with pytest.raises(TokenizerConfigError, match="add_bos_token"):
        TokenizerConfig.from_entries({"vocab_size": 10, "add_bos_token": True})


def test_tokenizer_rejects_bad_ids(tokenizer: TextTokenizer) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([49152])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([-1])
