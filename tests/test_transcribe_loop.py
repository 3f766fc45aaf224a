"""The long-form loop of app/speech/transcribe.py driven by a scripted fake runner (no model needed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import pytest
import tokenizers
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from app.speech.decoding import DecodingRules
from app.speech.tokenizer import WhisperTokenizer
from app.speech.transcribe import TranscriptionOptions, transcribe, transcribe_windows
from app.speech.whisper_runner import DecodeResult, EncoderOutput, WhisperRunner

WORDS = ["hello", "world", "again"]  # ids 0..2
EOT, SOT, SOT_PREV, NO_SPEECH, NO_TIMESTAMPS, TS0 = 3, 4, 5, 6, 7, 8
CONFIG: dict[str, Any] = {
    "n_mels": 80,
    "max_frames": 3000,
    "n_text_ctx": 448,
    "n_vocab": TS0 + 1501,
    "eot": EOT,
    "sot": SOT,
    "sot_prev": SOT_PREV,
    "no_speech": NO_SPEECH,
    "no_timestamps": NO_TIMESTAMPS,
    "timestamp_begin": TS0,
    "suppress_ids": [],
    "suppress_ids_begin": [],
    "is_multilingual": False,
}


def ts(seconds: float) -> int:
    return TS0 + round(seconds / 0.02)


class ScriptedRunner:
    """Returns the scripted token lists window after window and records every prompt it receives."""

    def __init__(self, script: Sequence[tuple[list[int], float, float]]) -> None:
        self.config = CONFIG
        self.max_frames = 3000
        self.n_text_ctx = 448
        vocab = {word: index for index, word in enumerate(WORDS)}
        tokenizer = tokenizers.Tokenizer(WordLevel(vocab, unk_token="hello"))
        tokenizer.pre_tokenizer = WhitespaceSplit()
        self.tokenizer = WhisperTokenizer(tokenizer, eot=EOT)
        self.script = list(script)  # (tokens, no_speech_prob, avg_logprob) per window
        self.prompts: list[list[int]] = []
        self.mel_shapes: list[tuple[int, ...]] = []

    def encode(self, mel: np.ndarray) -> EncoderOutput:
        self.mel_shapes.append(mel.shape)
        empty = np.zeros((1, mel.shape[0], 1, 1, 1), np.float32)
        return EncoderOutput(empty, empty)

    def decode(
        self,
        encoder_output: EncoderOutput,
        prompts: Sequence[Sequence[int]],
        *,
        rules: DecodingRules,
        beam_size: int = 1,
    ) -> list[DecodeResult]:
        assert beam_size == 1  # the script is the greedy decoding's
        results = []
        for prompt in prompts:
            self.prompts.append(list(prompt))
            tokens, no_speech, avg = self.script.pop(0)
            text = self.tokenizer.decode(tokens)
            results.append(DecodeResult(tokens, avg * (len(tokens) + 1), avg, no_speech, text, True))
        return results


def run(script: Sequence[tuple[list[int], float, float]], seconds: float, **options: Any) -> tuple[Any, ScriptedRunner]:
    runner = ScriptedRunner(script)
    audio = np.zeros(int(seconds * 16_000), np.float32)
    result = transcribe(audio, cast(WhisperRunner, runner), options=TranscriptionOptions(**options))
    return result, runner


def test_windows_advance_to_the_last_timestamp_and_condition_on_emitted_tokens() -> None:
    first = [ts(0), 0, ts(2), ts(2), 1, ts(20), ts(20), 2]  # unfinished tail after 20 s
    second = [ts(0), 2, ts(5)]  # single timestamp ending: window consumed
    result, runner = run([(first, 0.1, -0.3), (second, 0.1, -0.3), ([], 0.1, -0.3)], 40.0)
    assert [(s.start, s.end, s.text) for s in result.segments] == [
        (0.0, 2.0, "hello"),
        (2.0, 20.0, "world"),
        (20.0, 25.0, "again"),
    ]
    assert runner.prompts[0] == [SOT]
    assert runner.prompts[1] == [SOT_PREV, ts(0), 0, ts(2), ts(2), 1, ts(20), SOT]
    assert runner.mel_shapes[1] == (1, 80, 3000)  # the 20 s tail window is zero-padded to 30 s
    assert result.text == "helloworldagain"


def test_a_silent_window_is_skipped_unless_its_logprob_is_high() -> None:
    silent = ([ts(0), 0, ts(1)], 0.9, -1.5)
    result, _ = run([silent], 10.0)
    assert result.segments == []
    confident = ([ts(0), 0, ts(1)], 0.9, -0.5)
    result, _ = run([confident], 10.0)
    assert [s.text for s in result.segments] == ["hello"]


def test_without_conditioning_every_prompt_is_bare() -> None:
    first = [ts(0), 0, ts(2), ts(2), 1, ts(20), ts(20)]
    _, runner = run([(first, 0.1, -0.3), ([ts(0), 2, ts(1)], 0.1, -0.3)], 40.0, condition_on_previous_text=False)
    assert runner.prompts == [[SOT], [SOT]]


def test_the_prompt_keeps_the_last_223_tokens() -> None:
    many = [ts(0)] + [0] * 300 + [ts(29), ts(29)]  # one long segment, then the cursor stops at 29 s
    _, runner = run([(many, 0.1, -0.3), ([ts(0), 1, ts(1)], 0.1, -0.3)], 40.0)
    assert len(runner.prompts[1]) == 1 + 223 + 1
    assert runner.prompts[1][-2] == ts(29) and runner.prompts[1][0] == SOT_PREV


def test_empty_or_zero_length_segments_are_dropped() -> None:
    tokens = [ts(1), ts(1), ts(1), 0, ts(3)]  # a zero-length piece, then a real one
    result, _ = run([(tokens, 0.1, -0.3)], 5.0)
    assert [(s.start, s.end, s.text) for s in result.segments] == [(1.0, 3.0, "hello")]


def test_short_clips_are_batched_together_and_tiny_inputs_give_nothing() -> None:
    runner = ScriptedRunner([([ts(0), 0, ts(1)], 0.1, -0.3), ([ts(0), 1, ts(1)], 0.1, -0.3)])
    clips = [np.zeros(16_000, np.float32), np.zeros(100, np.float32), np.zeros(32_000, np.float32)]
    results = transcribe_windows(clips, cast(WhisperRunner, runner))
    assert [r.text for r in results] == ["hello", "", "world"]
    assert runner.mel_shapes == [(2, 80, 3000)]  # one encoder call for both real clips


def test_transcribe_rejects_stereo() -> None:
    with pytest.raises(ValueError, match="mono"):
        transcribe(np.zeros((2, 100), np.float32), cast(WhisperRunner, ScriptedRunner([])))
