"""Whisper CTranslate2 -> ONNX conversion: the graph IO contract, and decoding parity with CTranslate2 itself.

The real-model tests convert faster-whisper tiny.en into tmp_path once per module (a few seconds) and decode the
pyannote sample recording. CTranslate2 is the oracle: greedy float32, no timestamp rules, no blank suppression.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from app.convert.whisper import REQUIRED_FILES, convert_whisper, special_token_ids
from tests.conftest import missing
from tests.test_ct2_parser import real_ct2_dir

logger = logging.getLogger(__name__)

AUDIO_DIR_ENV: Final = "BROOK_TEST_AUDIO_DIR"
DEFAULT_AUDIO: Final = Path("/tmp/dl/pa/pyannote_audio-4.0.7/src/pyannote/audio/sample/sample.wav")
SAMPLE_RATE_HZ: Final = 16_000
WINDOW_FRAMES: Final = 3000
GREEDY_TOKENS: Final = 30
THREADS: Final = 2
RESCORE_TOKENS: Final = 64
N_LAYERS, N_HEADS, HEAD_DIM, N_VOCAB = 4, 6, 64, 51864


def _speech_clip() -> Path:
    """sample.wav (pyannote's two-speaker phone call): $BROOK_TEST_AUDIO_DIR, the default path or the clip cache."""
    configured = os.environ.get(AUDIO_DIR_ENV)
    if configured:
        candidates = [Path(configured) / "sample.wav", Path(configured) / "telephone.wav"]
    else:
        from app.convert.sources import cache_dir

        candidates = [DEFAULT_AUDIO, cache_dir() / "test-audio" / "telephone.wav"]
    for path in candidates:
        if path.is_file():
            return path
    missing(f"speech clip not found in {[str(c) for c in candidates]} (set {AUDIO_DIR_ENV})")
    raise AssertionError("unreachable: missing() skips or fails")


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Converted:
    """One converted model: its directory, config dict and onnxruntime sessions."""

    def __init__(self, directory: Path, config: dict[str, Any]) -> None:
        self.directory = directory
        self.config = config
        self.encoder = _session(directory / "encoder.onnx")
        self.decoder = _session(directory / "decoder.onnx")

    def encode(self, mel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cross_k, cross_v = self.encoder.run(None, {"mel": mel})
        return cross_k, cross_v

    def step(
        self, tokens: np.ndarray, self_k: np.ndarray, self_v: np.ndarray, cross: tuple[np.ndarray, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One decoder call: the last position's logits [B, vocab] and the grown caches."""
        logits, new_k, new_v = self.step_positions(tokens, self_k, self_v, cross, 1)
        return logits[:, -1], new_k, new_v

    def step_positions(
        self,
        tokens: np.ndarray,
        self_k: np.ndarray,
        self_v: np.ndarray,
        cross: tuple[np.ndarray, np.ndarray],
        n_logits: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One decoder call: the logits [B, n_logits, vocab] of the last ``n_logits`` positions, and the caches."""
        feed = {
            "tokens": tokens,
            "n_logits": np.array([n_logits], dtype=np.int64),
            "self_k": self_k,
            "self_v": self_v,
            "cross_k": cross[0],
            "cross_v": cross[1],
        }
        logits, new_k, new_v = self.decoder.run(None, feed)
        return logits, new_k, new_v

    def greedy(self, mel: np.ndarray, prompt: list[int], n_tokens: int) -> list[int]:
        """Plain argmax with suppress_ids masked, until eot or n_tokens."""
        cross = self.encode(mel)
        empty = np.zeros((N_LAYERS, 1, N_HEADS, 0, HEAD_DIM), dtype=np.float32)
        self_k, self_v = empty, empty
        tokens = np.array([prompt], dtype=np.int64)
        suppress = np.array(self.config["suppress_ids"], dtype=np.int64)
        out: list[int] = []
        while len(out) < n_tokens:
            logits, self_k, self_v = self.step(tokens, self_k, self_v, cross)
            logits[:, suppress] = -np.inf
            token = int(logits[0].argmax())
            if token == self.config["eot"]:
                break
            out.append(token)
            tokens = np.array([[token]], dtype=np.int64)
        return out


def _convert(directory: Path, precision: str, **options: Any) -> Converted:
    source = real_ct2_dir()
    files = {name: source / name for name in REQUIRED_FILES}
    config = convert_whisper(files, directory, {"precision": precision, **options})
    json.dumps(config)  # the manifest stores it as JSON
    return Converted(directory, config)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    return _convert(tmp_path_factory.mktemp("whisper-fp32"), "fp32")


@pytest.fixture(scope="module")
def int8(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    return _convert(tmp_path_factory.mktemp("whisper-int8"), "int8")


@pytest.fixture(scope="module")
def rescored(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    """fp32 with the int8 vocabulary projection and its best RESCORE_TOKENS logits recomputed (version 3)."""
    return _convert(tmp_path_factory.mktemp("whisper-rescored"), "fp32", output_rescore_tokens=RESCORE_TOKENS)


@pytest.fixture(scope="module")
def windows() -> np.ndarray:
    """Two different 30 s log-mel windows of real speech, [2, 80, 3000]: the clip, and the clip from 10 s on."""
    import soundfile as sf
    from faster_whisper.feature_extractor import FeatureExtractor

    samples, rate = sf.read(_speech_clip(), dtype="float32", always_2d=True)
    assert rate == SAMPLE_RATE_HZ, f"expected a 16 kHz clip, got {rate} Hz"
    audio = samples.mean(axis=1)
    extractor = FeatureExtractor()
    window_samples = 30 * SAMPLE_RATE_HZ
    mels = []
    for start_s in (0, 10):
        chunk = audio[start_s * SAMPLE_RATE_HZ :][:window_samples]
        chunk = np.pad(chunk, (0, window_samples - len(chunk)))
        mels.append(extractor(chunk)[:, :WINDOW_FRAMES])
    return np.ascontiguousarray(np.stack(mels), dtype=np.float32)


def _prompt(config: dict[str, Any]) -> list[int]:
    # faster-whisper's prompt without timestamps: sot_sequence (just <|startoftranscript|> for an English-only model)
    # + <|notimestamps|>. With <|notimestamps|> CTranslate2 applies no timestamp rules, so its greedy search is the
    # same plain argmax over the non-suppressed tokens that Converted.greedy does.
    return [*config["sot_sequence"], config["no_timestamps"]]


def test_config_has_the_runner_fields(fp32: Converted) -> None:
    config = fp32.config
    source_config = json.loads((real_ct2_dir() / "config.json").read_text(encoding="utf-8"))
    assert {key: config[key] for key in ("n_mels", "n_audio_ctx", "max_frames", "n_text_ctx", "n_vocab")} == {
        "n_mels": 80,
        "n_audio_ctx": 1500,
        "max_frames": 3000,
        "n_text_ctx": 448,
        "n_vocab": N_VOCAB,
    }
    assert (config["n_layers"], config["n_heads"], config["head_dim"], config["d_model"]) == (4, 6, 64, 384)
    assert config["precision"] == "fp32" and config["tokenizer"] == "tokenizer.json"
    assert config["suppress_ids"] == source_config["suppress_ids"]
    assert config["suppress_ids_begin"] == source_config["suppress_ids_begin"]
    specials = {key: config[key] for key in ("sot", "eot", "sot_prev", "sot_lm", "no_timestamps", "no_speech")}
    assert specials == {
        "sot": 50257,
        "eot": 50256,
        "sot_prev": 50360,
        "sot_lm": 50359,
        "no_timestamps": 50362,
        "no_speech": 50361,
    }
    assert (config["timestamp_begin"], config["transcribe"], config["translate"]) == (50363, 50358, 50357)
    assert config["is_multilingual"] is False
    assert config["sot_sequence"] == [50257]
    assert (fp32.directory / "tokenizer.json").read_bytes() == (real_ct2_dir() / "tokenizer.json").read_bytes()


def test_sot_sequence_matches_faster_whisper(fp32: Converted) -> None:
    from faster_whisper.tokenizer import Tokenizer
    from tokenizers import Tokenizer as HfTokenizer

    reference = Tokenizer(HfTokenizer.from_file(str(fp32.directory / "tokenizer.json")), multilingual=False)
    config = fp32.config
    assert config["sot_sequence"] == reference.sot_sequence
    assert (config["no_timestamps"], config["timestamp_begin"]) == (reference.no_timestamps, reference.timestamp_begin)
    assert (config["no_speech"], config["sot_prev"], config["eot"]) == (
        reference.no_speech,
        reference.sot_prev,
        reference.eot,
    )


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.dim_param else d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _io(path: Path) -> Iterator[tuple[str, str, int, list[int | str]]]:
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(str(path))
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            yield kind, value.name, value.type.tensor_type.elem_type, _dims(value)


@pytest.mark.parametrize("precision", ["fp32", "int8", "rescored"])
def test_graph_io_contract(precision: str, request: pytest.FixtureRequest, windows: np.ndarray) -> None:
    converted: Converted = request.getfixturevalue(precision)
    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    cache = [N_LAYERS, "batch", N_HEADS, "n_audio", HEAD_DIM]
    assert list(_io(converted.directory / "encoder.onnx")) == [
        ("input", "mel", f32, ["batch", 80, "frames"]),
        ("output", "cross_k", f32, cache),
        ("output", "cross_v", f32, cache),
    ]
    assert list(_io(converted.directory / "decoder.onnx")) == [
        ("input", "tokens", i64, ["batch", "n_tokens"]),
        ("input", "n_logits", i64, [1]),
        ("input", "self_k", f32, [N_LAYERS, "batch", N_HEADS, "past_len", HEAD_DIM]),
        ("input", "self_v", f32, [N_LAYERS, "batch", N_HEADS, "past_len", HEAD_DIM]),
        # one row of audio keys and values per window, which may have several consecutive rows (beam search)
        ("input", "cross_k", f32, [N_LAYERS, "windows", N_HEADS, "n_audio", HEAD_DIM]),
        ("input", "cross_v", f32, [N_LAYERS, "windows", N_HEADS, "n_audio", HEAD_DIM]),
        ("output", "logits", f32, ["batch", "n_logits", N_VOCAB]),
        ("output", "new_self_k", f32, [N_LAYERS, "batch", N_HEADS, "total_len", HEAD_DIM]),
        ("output", "new_self_v", f32, [N_LAYERS, "batch", N_HEADS, "total_len", HEAD_DIM]),
    ]
    # the runtime shapes: frames are dynamic (here 1000 -> 500 positions), past_len may be 0
    cross_k, cross_v = converted.encode(windows[:1, :, :1000])
    assert cross_k.shape == cross_v.shape == (N_LAYERS, 1, N_HEADS, 500, HEAD_DIM)
    assert cross_k.dtype == np.float32
    empty = np.zeros((N_LAYERS, 1, N_HEADS, 0, HEAD_DIM), dtype=np.float32)
    logits, new_k, new_v = converted.step(np.array([[50257, 50362]]), empty, empty, (cross_k, cross_v))
    assert logits.shape == (1, N_VOCAB) and logits.dtype == np.float32
    assert new_k.shape == new_v.shape == (N_LAYERS, 1, N_HEADS, 2, HEAD_DIM)
    # n_logits = 2: both positions' logits, the last one as before (drafts are verified this way)
    both, _, _ = converted.step_positions(np.array([[50257, 50362]]), empty, empty, (cross_k, cross_v), 2)
    assert both.shape == (1, 2, N_VOCAB)
    np.testing.assert_allclose(both[:, 1], logits, atol=1e-4, rtol=0)
    first, _, _ = converted.step(np.array([[50257]]), empty, empty, (cross_k, cross_v))
    assert int(both[0, 0].argmax()) == int(first[0].argmax())
    np.testing.assert_allclose(both[:, 0], first, atol=0.05, rtol=0)  # int8 projections may move by one step


@pytest.fixture(scope="module")
def fp32_tokens(fp32: Converted, windows: np.ndarray) -> list[int]:
    return fp32.greedy(windows[:1], _prompt(fp32.config), GREEDY_TOKENS)


def test_greedy_tokens_equal_ctranslate2_float32(fp32: Converted, fp32_tokens: list[int], windows: np.ndarray) -> None:
    import ctranslate2

    reference = ctranslate2.models.Whisper(
        str(real_ct2_dir()), device="cpu", compute_type="float32", intra_threads=THREADS
    )
    result = reference.generate(
        ctranslate2.StorageView.from_array(np.ascontiguousarray(windows[:1])),
        [_prompt(fp32.config)],
        beam_size=1,
        max_length=4 * GREEDY_TOKENS,
        suppress_blank=False,
        suppress_tokens=[-1],  # -1 = config.json's suppress_ids, as in Converted.greedy
    )
    expected = result[0].sequences_ids[0][:GREEDY_TOKENS]
    logger.info("greedy tokens: %s", fp32_tokens)
    assert len(expected) == GREEDY_TOKENS, "the oracle should produce a full window of tokens on this clip"
    assert fp32_tokens == expected


def test_batch_rows_are_independent(fp32: Converted, windows: np.ndarray) -> None:
    both = fp32.encode(windows)
    alone = [fp32.encode(windows[row : row + 1]) for row in range(2)]
    for row in range(2):
        np.testing.assert_allclose(both[0][:, row], alone[row][0][:, 0], atol=1e-4, rtol=0)
        np.testing.assert_allclose(both[1][:, row], alone[row][1][:, 0], atol=1e-4, rtol=0)

    # a prompt step, then one more token that differs between the rows
    prompt = np.array([_prompt(fp32.config)] * 2, dtype=np.int64)
    empty = np.zeros((N_LAYERS, 2, N_HEADS, 0, HEAD_DIM), dtype=np.float32)
    logits, self_k, self_v = fp32.step(prompt, empty, empty, both)
    next_tokens = np.array([[2159], [40]], dtype=np.int64)
    logits2, self_k2, _ = fp32.step(next_tokens, self_k, self_v, both)
    assert self_k2.shape == (N_LAYERS, 2, N_HEADS, 3, HEAD_DIM)
    for row in range(2):
        row_empty = empty[:, :1]
        logits_alone, k_alone, v_alone = fp32.step(prompt[:1], row_empty, row_empty, alone[row])
        logits2_alone, k2_alone, _ = fp32.step(next_tokens[row : row + 1], k_alone, v_alone, alone[row])
        np.testing.assert_allclose(logits[row], logits_alone[0], atol=1e-4, rtol=0)
        np.testing.assert_allclose(logits2[row], logits2_alone[0], atol=1e-4, rtol=0)
        np.testing.assert_allclose(self_k2[:, row], k2_alone[:, 0], atol=1e-4, rtol=0)
    assert np.abs(logits[0] - logits[1]).max() > 1.0, "the two windows should not decode alike"


def test_hypotheses_of_a_window_can_share_its_cross_attention_row(fp32: Converted, windows: np.ndarray) -> None:
    """``shared_cross_attention``: three consecutive rows per window against one row of audio keys and values per
    window decode exactly as with the rows repeated (what beam search feeds its hypotheses)."""
    assert fp32.config["shared_cross_attention"] is True
    cross = fp32.encode(windows)  # 2 windows
    repeated = (np.repeat(cross[0], 3, axis=1), np.repeat(cross[1], 3, axis=1))
    prompt = np.array([_prompt(fp32.config)] * 6, dtype=np.int64)
    empty = np.zeros((N_LAYERS, 6, N_HEADS, 0, HEAD_DIM), dtype=np.float32)
    shared_logits, shared_k, shared_v = fp32.step(prompt, empty, empty, cross)
    logits, self_k, self_v = fp32.step(prompt, empty, empty, repeated)
    np.testing.assert_allclose(shared_logits, logits, atol=1e-4, rtol=0)
    tokens = np.array([[2159], [40], [314], [2159], [40], [314]], dtype=np.int64)  # the hypotheses differ
    shared_next, shared_k2, _ = fp32.step(tokens, shared_k, shared_v, cross)
    next_logits, self_k2, _ = fp32.step(tokens, self_k, self_v, repeated)
    np.testing.assert_allclose(shared_next, next_logits, atol=1e-4, rtol=0)  # the batched products' rounding
    np.testing.assert_allclose(shared_k2, self_k2, atol=1e-5, rtol=0)
    assert np.abs(shared_next[0] - shared_next[3]).max() > 1.0, "rows 0-2 belong to window 0, rows 3-5 to window 1"


def test_one_step_over_many_tokens_equals_token_by_token(
    fp32: Converted, fp32_tokens: list[int], windows: np.ndarray
) -> None:
    """Positions past_len.. and the causal mask: feeding 2 new tokens at once = feeding them one at a time."""
    cross = fp32.encode(windows[:1])
    sequence = [*_prompt(fp32.config), *fp32_tokens[:5]]
    empty = np.zeros((N_LAYERS, 1, N_HEADS, 0, HEAD_DIM), dtype=np.float32)
    _, past_k, past_v = fp32.step(np.array([sequence[:4]]), empty, empty, cross)
    together, together_k, _ = fp32.step(np.array([sequence[4:6]]), past_k, past_v, cross)
    _, k1, v1 = fp32.step(np.array([sequence[4:5]]), past_k, past_v, cross)
    one_by_one, one_k, _ = fp32.step(np.array([sequence[5:6]]), k1, v1, cross)
    np.testing.assert_allclose(together, one_by_one, atol=1e-4, rtol=0)
    np.testing.assert_allclose(together_k, one_k, atol=1e-5, rtol=0)
    assert int(together[0].argmax()) == sequence[6]


def test_int8_decodes_nearly_the_same_tokens(
    int8: Converted, fp32: Converted, fp32_tokens: list[int], windows: np.ndarray
) -> None:
    assert int8.config["precision"] == "int8"
    tokens = int8.greedy(windows[:1], _prompt(int8.config), GREEDY_TOKENS)
    differences = sum(a != b for a, b in zip(tokens, fp32_tokens, strict=False)) + abs(len(tokens) - len(fp32_tokens))
    logger.warning("int8 vs fp32 greedy tokens: %d of %d differ", differences, len(fp32_tokens))
    assert tokens[:5] == fp32_tokens[:5]
    assert differences <= len(fp32_tokens) // 3
    int8_bytes = sum(path.stat().st_size for path in int8.directory.glob("*.onnx"))
    # Only the tied embedding/output projection is int8 (INT8_PLAN): 20M of the 38M weights, so about 0.64x.
    assert int8_bytes < 0.7 * sum(path.stat().st_size for path in fp32.directory.glob("*.onnx"))


def test_rescored_logits_are_exact_where_greedy_looks(
    rescored: Converted, fp32: Converted, fp32_tokens: list[int], windows: np.ndarray
) -> None:
    """Version 3: the best logits equal the fp32 graph's, the rest are close, and greedy decoding is unchanged."""
    assert rescored.config["output_rescore_tokens"] == RESCORE_TOKENS
    assert rescored.greedy(windows[:1], _prompt(rescored.config), GREEDY_TOKENS) == fp32_tokens
    sequence = np.array([[*_prompt(fp32.config), *fp32_tokens[:10]]], dtype=np.int64)
    empty = np.zeros((N_LAYERS, 1, N_HEADS, 0, HEAD_DIM), dtype=np.float32)
    cross = fp32.encode(windows[:1])
    exact, exact_k, _ = fp32.step(sequence, empty, empty, cross)
    fast, fast_k, _ = rescored.step(sequence, empty, empty, rescored.encode(windows[:1]))
    np.testing.assert_array_equal(fast_k, exact_k)  # only the vocabulary projection differs
    best = np.argsort(exact[0])[::-1][: RESCORE_TOKENS // 2]
    np.testing.assert_allclose(fast[0, best], exact[0, best], atol=1e-4, rtol=0)
    others = np.abs(fast[0] - exact[0])
    logger.info("rescored logits: max error %.4f outside the best %d", others.max(), RESCORE_TOKENS)
    assert 0 < others.max() < 0.5, "the other logits come from the int8 projection: close, not exact"
    assert int(fast[0].argmax()) == int(exact[0].argmax())


def test_convert_rejects_bad_requests(tmp_path: Path) -> None:
    files = {name: tmp_path / name for name in REQUIRED_FILES}
    with pytest.raises(ValueError, match="needs precision 'fp32'"):
        convert_whisper(files, tmp_path / "out", {"precision": "int8", "output_rescore_tokens": 64})
    with pytest.raises(ValueError, match="must be an integer"):
        convert_whisper(files, tmp_path / "out", {"precision": "fp32", "output_rescore_tokens": True})
    with pytest.raises(ValueError, match="precision must be one of"):
        convert_whisper(files, tmp_path / "out", {"precision": "int4"})
    with pytest.raises(ValueError, match="unknown whisper conversion options"):
        convert_whisper(files, tmp_path / "out", {"precision": "fp32", "quantize": True})
    with pytest.raises(ValueError, match=r"missing \['vocabulary.txt'\]"):
        convert_whisper({k: v for k, v in files.items() if k != "vocabulary.txt"}, tmp_path / "out", {})
    assert not (tmp_path / "out").exists()


def _write_vocabulary(tmp_path: Path, tokens: list[str], added: dict[str, int]) -> tuple[Path, Path]:
    vocabulary = tmp_path / "vocabulary.txt"
    vocabulary.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    tokenizer = tmp_path / "tokenizer.json"
    added_tokens = [{"id": token_id, "content": content} for content, token_id in added.items()]
    tokenizer.write_text(json.dumps({"added_tokens": added_tokens}), encoding="utf-8")
    return vocabulary, tokenizer


SPECIALS: Final = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nospeech|>",
    "<|notimestamps|>",
    "<|0.00|>",
    "<|0.02|>",
]


def test_special_tokens_from_a_small_vocabulary(tmp_path: Path) -> None:
    tokens = ["a", "b", *SPECIALS]
    vocabulary, tokenizer = _write_vocabulary(tmp_path, tokens, {"<|endoftext|>": 2, "<|nospeech|>": 9})
    found = special_token_ids(vocabulary, tokenizer, n_vocab=len(tokens))
    assert found == {
        "eot": 2,
        "sot": 3,
        "english": 4,
        "translate": 5,
        "transcribe": 6,
        "sot_lm": 7,
        "sot_prev": 8,
        "no_speech": 9,
        "no_timestamps": 10,
        "timestamp_begin": 11,
    }


def test_special_tokens_must_agree_and_exist(tmp_path: Path) -> None:
    tokens = ["a", "b", *SPECIALS]
    vocabulary, tokenizer = _write_vocabulary(tmp_path, tokens, {"<|endoftext|>": 0})
    with pytest.raises(ValueError, match="id 2 in vocabulary.txt but 0 in tokenizer.json"):
        special_token_ids(vocabulary, tokenizer, n_vocab=len(tokens))
    with pytest.raises(ValueError, match="has 13 tokens but the model has 14 embeddings"):
        special_token_ids(vocabulary, tokenizer, n_vocab=14)
    vocabulary, tokenizer = _write_vocabulary(tmp_path, [t for t in tokens if t != "<|nospeech|>"], {})
    with pytest.raises(ValueError, match="nospeech"):
        special_token_ids(vocabulary, tokenizer, n_vocab=len(tokens) - 1)
