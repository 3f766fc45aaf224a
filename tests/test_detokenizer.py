"""Incremental detokenizer on the SmolLM2 vocabulary: streamed pieces always join up to the full decode."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.text.detokenizer import IncrementalDetokenizer
from app.text.tokenizer import TextTokenizer
from tests.model_paths import smollm2_gguf

gguf = pytest.importorskip("gguf", reason="the gguf package is needed to read the model file")

from app.convert.gguf_tokenizer import TOKENIZER_FILE_NAME, write_tokenizer_files  # noqa: E402

GGUF_ENV = "BROOK_SMOLLM2_GGUF"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB_SIZE = 49152
REPLACEMENT = "\ufffd"
FUNCTION_FIXTURE_OK = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def find_smollm2_gguf() -> Path:
    """The pinned GGUF from the model repository's source cache (or $BROOK_SMOLLM2_GGUF)."""
    return smollm2_gguf()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    path = find_smollm2_gguf()
    out_dir = tmp_path_factory.mktemp("detokenizer_tokenizer")
    entries = write_tokenizer_files(gguf.GGUFReader(str(path)), out_dir)
    return TextTokenizer.from_files(out_dir / TOKENIZER_FILE_NAME, entries)


def stream(tokenizer: TextTokenizer, ids: list[int], *, skip_special: bool = False) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special=skip_special)
    pieces = [detokenizer.push(token_id) for token_id in ids]
    pieces.append(detokenizer.finish())
    return pieces


def test_emoji_waits_for_its_last_byte(tokenizer: TextTokenizer) -> None:
    ids = tokenizer.encode("I 😀 it", allow_special=False)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == "I 😀 it"
    assert all(REPLACEMENT not in piece for piece in pieces)
    emoji_pieces = [piece for piece in pieces if "😀" in piece]
    assert len(emoji_pieces) == 1
    assert "" in pieces  # some token completed no character on its own


def test_cjk_streams_whole_characters(tokenizer: TextTokenizer) -> None:
    text = "日本語のテキスト、中文文本。"
    pieces = stream(tokenizer, tokenizer.encode(text, allow_special=False))
    assert "".join(pieces) == text
    assert all(REPLACEMENT not in piece for piece in pieces)


def test_special_tokens(tokenizer: TextTokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>assistant\nHi<|im_end|>", allow_special=True)
    assert "".join(stream(tokenizer, ids)) == "<|im_start|>assistant\nHi<|im_end|>"
    assert "".join(stream(tokenizer, ids, skip_special=True)) == "assistant\nHi"


def test_incomplete_character_at_the_end(tokenizer: TextTokenizer) -> None:
    ids = tokenizer.encode("ok 😀", allow_special=False)[:-1]  # cut the emoji's last token
    detokenizer = IncrementalDetokenizer(tokenizer)
    text = detokenizer.push_many(ids)
    assert text == "ok "
    assert detokenizer.has_pending_bytes
    assert detokenizer.finish() == REPLACEMENT
    assert text + REPLACEMENT == tokenizer.decode(ids)
    assert detokenizer.finish() == ""
    with pytest.raises(RuntimeError, match="after finish"):
        detokenizer.push(ids[0])


def test_counts_tokens(tokenizer: TextTokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer)
    detokenizer.push_many([1, 2, 3])
    assert detokenizer.num_tokens == 3


@FUNCTION_FIXTURE_OK
@given(text=st.text(max_size=60))
def test_stream_of_encoded_text_equals_full_decode(tokenizer: TextTokenizer, text: str) -> None:
    ids = tokenizer.encode(text, allow_special=False)
    full = tokenizer.decode(ids)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == full
    if REPLACEMENT not in full:
        assert all(REPLACEMENT not in piece for piece in pieces)


@FUNCTION_FIXTURE_OK
@given(ids=st.lists(st.integers(min_value=0, max_value=VOCAB_SIZE - 1), max_size=40), skip_special=st.booleans())
def test_stream_of_any_ids_equals_full_decode(tokenizer: TextTokenizer, ids: list[int], skip_special: bool) -> None:
    """Arbitrary ids, so arbitrary (often invalid) UTF-8: the pieces still join up to the lossy full decode."""
    full = tokenizer.decode(ids, skip_special=skip_special)
    pieces = stream(tokenizer, ids, skip_special=skip_special)
    assert "".join(pieces) == full
    if REPLACEMENT not in full:
        assert all(REPLACEMENT not in piece for piece in pieces)
