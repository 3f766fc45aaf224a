"""Word error rate of streamed finals and of offline transcription against what was actually said.

Issue 8's accuracy target: the WER of streamed finals within 2 points of offline ``brook transcribe`` on the same
audio. The load benchmarks can only compare streamed finals with the offline transcript (their recordings have no
transcripts); this one scores both against human references, on the labelled corpora of
``scripts.labelled_speech`` (LibriVox read speech; espeak-ng voices reading voice-assistant requests).

Per corpus:

- offline: ``app.speech.transcribe`` of the whole clip (what ``brook transcribe`` prints), 30 s windows, each
  conditioned on the previous text;
- streamed: the clip pushed in 100 ms chunks into the streaming engine behind ``/v1/listen`` (default settings,
  Silero VAD segmentation), the finals joined. The audio is pushed as fast as the engine takes it: which audio
  each final covers depends only on the VAD, never on load or pace (finals are never shed), so this gives the
  finals a live stream gets;
- WER of each against the reference (lower case, punctuation dropped), the difference in points, and the
  streamed finals against the offline transcript (what ``bench_speech_load`` reports).

    .venv/bin/python -m scripts.bench_speech_wer [--corpora librivox,espeak-en-us,espeak-en-gb]
        [--version N] [--final-full-window] [--silence-padding] [--speech-pad-ms MS]
        [--final-beam-size B [--final-beam-below-logprob L]] [--offline-beam-size B]
        [--json docs/bench/speech_wer.json] [--label NAME]

``--final-full-window`` decodes finals in full 30 s windows as offline does (``DecodePolicy.final_full_window``)
instead of the padded windows sized to the utterance; ``--silence-padding`` pads windows with silent audio instead
of log-mel zeros (``DecodePolicy.silence_padding``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from app.audio import load_audio
from app.convert.sources import cache_dir
from app.engine.speech_decode import DecodePolicy
from app.engine.speech_engine import SpeechEngine, SpeechEngineSettings
from app.engine.speech_events import StreamEnded, StreamOptions, Transcript
from app.paths import default_model_dir
from app.repository import ModelRepository
from app.speech.transcribe import TranscriptionOptions, transcribe
from app.speech.vad import VadRunner
from app.speech.wer import edit_distance, normalize_words
from app.speech.whisper_runner import WhisperRunner
from scripts.bench_common import DOCS_BENCH_DIR, machine_facts, write_json
from scripts.labelled_speech import build_corpus

logger = logging.getLogger("bench_speech_wer")

CHUNK_SAMPLES = 1600  # 100 ms
DEFAULT_CORPORA = "librivox,espeak-en-us,espeak-en-gb"
DEFAULT_JSON = DOCS_BENCH_DIR / "speech_wer.json"


@dataclasses.dataclass(frozen=True)
class Score:
    edits: int
    words: int

    @property
    def rate(self) -> float:
        return self.edits / max(1, self.words)


def score(reference: str, hypothesis: str) -> Score:
    words = normalize_words(reference)
    return Score(edit_distance(words, normalize_words(hypothesis)), len(words))


async def streamed_finals(
    whisper: WhisperRunner, vad: VadRunner, audio: np.ndarray, settings: SpeechEngineSettings
) -> list[str]:
    """The finals of one stream of ``audio``, in order."""
    engine = SpeechEngine(whisper, vad, settings)
    await engine.start()
    try:
        stream = engine.open_stream(StreamOptions())

        async def push() -> None:
            for first in range(0, audio.shape[0], CHUNK_SAMPLES):
                await stream.push_audio(audio[first : first + CHUNK_SAMPLES])
            stream.end()

        pusher = asyncio.create_task(push())
        finals: list[str] = []
        while not isinstance(event := await stream.next_event(), StreamEnded):
            if isinstance(event, Transcript) and event.kind == "final" and event.text:
                finals.append(event.text)
        await pusher
        return finals
    finally:
        await engine.shutdown()


def run(
    corpora: list[str], version: int | None, settings: SpeechEngineSettings, offline_beam_size: int = 1
) -> dict[str, Any]:
    repository = ModelRepository(default_model_dir())
    loaded = repository.load("whisper-tiny-en", version, check_hashes=False)
    whisper = WhisperRunner(loaded.directory, loaded.manifest.config, intra_op_threads=2)
    vad_model = repository.load("silero-vad", check_hashes=False)
    vad = VadRunner(vad_model.directory, vad_model.manifest.config)
    rows = []
    for name in corpora:
        clip = build_corpus(name, cache_dir() / "labelled-speech")
        audio = load_audio(clip.path)
        offline = transcribe(audio, whisper, options=TranscriptionOptions(beam_size=offline_beam_size)).text.strip()
        finals = asyncio.run(streamed_finals(whisper, vad, audio, settings))
        streamed = " ".join(finals)
        offline_score, streamed_score = score(clip.reference, offline), score(clip.reference, streamed)
        rows.append(
            {
                "corpus": name,
                "seconds": round(audio.shape[0] / 16_000, 1),
                "utterances": clip.utterances,
                "finals": len(finals),
                "words": offline_score.words,
                "offline_edits": offline_score.edits,
                "streamed_edits": streamed_score.edits,
                "offline_wer": offline_score.rate,
                "streamed_wer": streamed_score.rate,
                "streamed_vs_offline_wer": score(offline, streamed).rate,
                "reference": clip.reference,
                "offline": offline,
                "streamed": streamed,
            }
        )
        logger.info("%s: offline %.3f, streamed %.3f", name, offline_score.rate, streamed_score.rate)
    words = sum(row["words"] for row in rows)
    pooled = {
        "words": words,
        "offline_wer": sum(row["offline_edits"] for row in rows) / max(1, words),
        "streamed_wer": sum(row["streamed_edits"] for row in rows) / max(1, words),
    }
    return {"model_version": loaded.version, "rows": rows, "pooled": pooled}


def render(result: dict[str, Any]) -> str:
    lines = [
        f"whisper-tiny-en v{result['model_version']}",
        f"{'corpus':>14} {'s':>6} {'utt':>4} {'finals':>6} {'words':>5} {'offline':>8} {'streamed':>8} "
        f"{'diff (pt)':>9} {'str vs off':>10}",
    ]
    for row in result["rows"]:
        difference = 100 * (row["streamed_wer"] - row["offline_wer"])
        lines.append(
            f"{row['corpus']:>14} {row['seconds']:>6.1f} {row['utterances']:>4} {row['finals']:>6} {row['words']:>5} "
            f"{row['offline_wer']:>8.3f} {row['streamed_wer']:>8.3f} {difference:>+9.1f} "
            f"{row['streamed_vs_offline_wer']:>10.3f}"
        )
    pooled = result["pooled"]
    difference = 100 * (pooled["streamed_wer"] - pooled["offline_wer"])
    lines.append(
        f"{'pooled':>14} {'':>6} {'':>4} {'':>6} {pooled['words']:>5} {pooled['offline_wer']:>8.3f} "
        f"{pooled['streamed_wer']:>8.3f} {difference:>+9.1f}"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", default=DEFAULT_CORPORA)
    parser.add_argument("--version", type=int, default=None, help="whisper-tiny-en version (default: the default)")
    parser.add_argument("--final-full-window", action="store_true", help="finals in 30 s windows, as offline")
    parser.add_argument("--silence-padding", action="store_true", help="pad windows with silent audio")
    parser.add_argument("--speech-pad-ms", type=int, default=SpeechEngineSettings.speech_pad_ms,
                        help="audio kept before and after each utterance (SpeechEngineSettings.speech_pad_ms)")
    parser.add_argument("--final-beam-size", type=int, default=DecodePolicy.final_beam_size,
                        help="beam of the streamed finals (DecodePolicy.final_beam_size; 1: greedy)")
    parser.add_argument("--final-beam-below-logprob", type=float, default=None,
                        help="beam only finals whose greedy average log-probability is below this "
                        "(DecodePolicy.final_beam_below_logprob)")
    parser.add_argument("--offline-beam-size", type=int, default=1,
                        help="beam of the offline transcription (TranscriptionOptions.beam_size; 1: greedy)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--label", default="default")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    facts = machine_facts()
    settings = SpeechEngineSettings(
        max_partial_lag_s=None,
        speech_pad_ms=args.speech_pad_ms,
        decode=DecodePolicy(
            final_full_window=args.final_full_window,
            silence_padding=args.silence_padding,
            final_beam_size=args.final_beam_size,
            final_beam_below_logprob=args.final_beam_below_logprob,
        ),
    )
    result = run(args.corpora.split(","), args.version, settings, args.offline_beam_size)
    result["final_full_window"] = args.final_full_window
    result["silence_padding"] = args.silence_padding
    result["speech_pad_ms"] = args.speech_pad_ms
    result["final_beam_size"] = args.final_beam_size
    result["final_beam_below_logprob"] = args.final_beam_below_logprob
    result["offline_beam_size"] = args.offline_beam_size
    print(render(result))
    stored: dict[str, Any] = json.loads(args.json.read_text(encoding="utf-8")) if args.json.is_file() else {}
    stored.setdefault("runs", {})[args.label] = {"machine": facts, **result}
    write_json(args.json, stored)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
