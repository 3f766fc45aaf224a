"""Build, warm up and shut down the engine of one model version (the only place that knows every task)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from app.config import Settings
from app.repository import LoadedVersion, ModelRepository
from app.server.metrics import Metrics, SpeechMetricsObserver, TextMetricsObserver

if TYPE_CHECKING:
    from app.engine.speech_engine import SpeechEngineSettings
    from app.engine.text_engine import TextEngineSettings

logger = logging.getLogger(__name__)


class Engine(Protocol):
    async def start(self) -> None: ...
    async def shutdown(self) -> None: ...


@dataclass
class BuiltEngine:
    engine: Any  # SpeechEngine | TextEngine | None (VAD models are used by speech engines, not served alone)
    info: dict[str, Any]  # task-specific facts for `ready` messages and /v1/models (e.g. context_length)


def build_engine(loaded: LoadedVersion, repository: ModelRepository, settings: Settings,
                 metrics: Metrics) -> BuiltEngine:
    """Create the runner(s) and engine for `loaded`. Blocking (creates onnxruntime sessions): call off the loop."""
    task = loaded.spec.task
    if task == "speech-to-text":
        return _build_speech(loaded, repository, settings, metrics)
    if task == "text-generation":
        return _build_text(loaded, settings, metrics)
    if task == "generic":
        return _build_generic(loaded, metrics)
    return BuiltEngine(engine=None, info={})


def _build_speech(loaded: LoadedVersion, repository: ModelRepository, settings: Settings,
                  metrics: Metrics) -> BuiltEngine:
    from app.engine.speech_engine import SpeechEngine
    from app.speech.vad import VadRunner
    from app.speech.whisper_runner import WhisperRunner

    whisper = WhisperRunner(loaded.directory, loaded.manifest.config, intra_op_threads=settings.speech_threads)
    vad_model = repository.load(settings.vad_model)
    vad = VadRunner(vad_model.directory, vad_model.manifest.config)
    engine_settings = speech_engine_settings(settings)
    observer = SpeechMetricsObserver(metrics, loaded.name, loaded.version)
    engine = SpeechEngine(whisper, vad, engine_settings, observer)
    _warm_up_speech(whisper, vad)
    return BuiltEngine(engine=engine, info={"sample_rate": 16000})


def speech_engine_settings(settings: Settings) -> SpeechEngineSettings:
    """The speech engine's settings from the server's (``BROOK_SPEECH_*``, ``BROOK_MAX_UTTERANCE_S``)."""
    from app.engine.speech_decode import DecodePolicy
    from app.engine.speech_engine import SpeechEngineSettings

    below = settings.speech_final_beam_below_logprob
    return SpeechEngineSettings(
        max_utterance_s=settings.max_utterance_s,
        intra_op_threads=settings.speech_threads,
        decode_workers=settings.speech_workers,
        max_batch_size=settings.speech_batch_size,
        decode=DecodePolicy(
            partial_draft_agreement=max(0, settings.speech_partial_draft_agreement),
            partial_draft_verify=settings.speech_partial_draft_verify,
            final_beam_size=settings.speech_final_beam_size,
            # every average log-probability is below 0: a threshold of 0 or more beams every final at once
            final_beam_below_logprob=below if below < 0 else None,
        ),
    )


def _warm_up_speech(whisper: Any, vad: Any) -> None:
    """One tiny call through each graph so the first real request does not pay session initialisation."""
    import numpy as np

    from app.speech.features import log_mel_spectrogram

    mel = log_mel_spectrogram(np.zeros(16000, dtype=np.float32))[None, :, :100]
    encoded = whisper.encode(mel)
    whisper.decode(encoded, [[int(whisper.config["sot"]), int(whisper.config["no_timestamps"])]], max_new_tokens=2)
    vad.speech_probabilities([vad.new_stream()], np.zeros((1, vad.config.frame_samples), dtype=np.float32))


def _build_text(loaded: LoadedVersion, settings: Settings, metrics: Metrics) -> BuiltEngine:
    from app.engine.text_engine import TextEngine

    engine = TextEngine.from_directory(
        loaded.directory,
        loaded.manifest.config,
        text_engine_settings(settings),
        TextMetricsObserver(metrics, loaded.name, loaded.version),
    )
    return BuiltEngine(engine=engine, info={"context_length": engine.context_length})


def text_engine_settings(settings: Settings) -> TextEngineSettings:
    """A text engine's settings from the server's (``BROOK_CHAT_*``)."""
    from app.engine.text_engine import TextEngineSettings

    return TextEngineSettings(
        intra_op_threads=settings.chat_threads,
        min_shared_prefix=settings.chat_shared_prefix_min_tokens,
        prefix_cache_idle_s=settings.chat_prefix_cache_idle_s,
        max_draft_tokens=settings.chat_draft_tokens,
        draft_max_decoding=settings.chat_draft_max_streams,
        busy_draft_min_acceptance=settings.chat_draft_min_acceptance,
    )


def _build_generic(loaded: LoadedVersion, metrics: Metrics) -> BuiltEngine:
    from app.engine.generic_runner import GenericModel
    from app.server.metrics import BatchMetricsObserver

    model = GenericModel.from_loaded(loaded, BatchMetricsObserver(metrics, loaded.name, loaded.version))
    model.warm_up()
    return BuiltEngine(engine=model, info=model.describe())
