"""Server settings: one frozen dataclass, read from `BROOK_*` environment variables and CLI flags here only."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final, get_type_hints

from app.paths import default_model_dir

ENV_PREFIX = "BROOK_"


@dataclass(frozen=True)
class Settings:
    """Every knob of `brook serve`. Each field maps to `BROOK_<FIELD>` and to `--<field>` on the command line."""

    host: str = "127.0.0.1"  # interface to bind
    port: int = 8000  # TCP port
    model_dir: Path = field(default_factory=default_model_dir)  # the model repository folder
    models: tuple[str, ...] = ("whisper-tiny-en", "silero-vad", "smollm2-135m-instruct")  # loaded at start
    speech_model: str = "whisper-tiny-en"  # default model of /v1/listen
    vad_model: str = "silero-vad"  # VAD used by every speech engine
    chat_model: str = "smollm2-135m-instruct"  # default model of /v1/chat
    api_keys: tuple[str, ...] = ()  # when set, every request needs one (Bearer header or ?token=)
    allowed_origins: tuple[str, ...] = ()  # when set, WebSocket/HTTP requests with another Origin are refused
    max_listen_sessions: int = 32  # concurrent /v1/listen sockets; more get HTTP 503 + Retry-After
    max_chat_sessions: int = 32  # concurrent /v1/chat sockets
    max_frame_bytes: int = 1 << 20  # largest WebSocket frame accepted (1 MiB); larger closes with 1009
    idle_timeout_s: float = 60.0  # a socket that sends nothing for this long is closed (keepalive resets it)
    max_utterance_s: float = 25.0  # a final is forced when one utterance reaches this length
    speech_threads: int = 2  # onnxruntime intra-op threads of each speech engine
    speech_workers: int = 2  # batches each speech engine transcribes at once, on their own threads
    speech_batch_size: int = 2  # windows per speech batch (smaller: lower latency under load, a little more CPU)
    speech_partial_draft_agreement: int = 2  # a partial starts from what this many previous ones agree on (0 = off)
    speech_partial_draft_verify: bool = False  # keep a partial's draft only as far as greedy decoding agrees
    speech_final_beam_size: int = 1  # beam of every final's decoding (1: greedy; 5: fewer errors, slower finals)
    speech_final_beam_below_logprob: float = 0.0  # < 0: greedy first, the beam only below this avg log-probability
    chat_threads: int = 2  # onnxruntime intra-op threads of each text engine
    chat_shared_prefix_min_tokens: int = 8  # a new chat copies a cached prompt prefix this long or longer (0: off)
    chat_prefix_cache_idle_s: float = 300.0  # a one-off request's cache unused this long frees its slot (0 = never)
    chat_draft_tokens: int = 10  # speculative decoding: prompt-lookup tokens verified per decode step (0 = off)
    chat_draft_max_streams: int = 4  # every reply drafts while at most this many chat replies decode at once
    chat_draft_min_acceptance: float = 0.0  # with more, replies draft while this share of their drafts holds (0: off)
    ort_spin_us: int = 0  # idle onnxruntime threads busy-wait this long before sleeping (app.ort_session; 0: never)
    retry_after_s: int = 5  # Retry-After seconds sent with 503 answers
    shutdown_grace_s: float = 10.0  # how long SIGTERM waits for open sessions to flush
    log_level: str = "info"  # uvicorn/app log level
    loop_monitor_interval_ms: float = 50.0  # event-loop lag timer period (0 turns the monitor off)
    pinned_load_timeout_s: float = 120.0  # how long a session pinning a not-loaded version waits for it to load
    version_policy: str = "weighted"  # versions loaded at start: "weighted" (default + A/B weight > 0) or "all"
    memory_trim_interval_s: float = 30.0  # return freed heap memory to the OS this often (glibc; 0 = never)
    malloc_mmap_threshold_kb: int = 1024  # C allocations this large get their own mmap (glibc; 0 = adaptive)

    def __post_init__(self) -> None:
        for name in ("chat_draft_tokens", "chat_draft_max_streams"):
            if getattr(self, name) < 0:
                raise ValueError(f"BROOK_{name.upper()} must be at least 0, got {getattr(self, name)}")
        if not 0 <= self.chat_draft_min_acceptance <= 1:
            raise ValueError(
                f"BROOK_CHAT_DRAFT_MIN_ACCEPTANCE must be within 0..1 (0: off), got {self.chat_draft_min_acceptance}"
            )
        if self.speech_final_beam_size < 1:
            beam = self.speech_final_beam_size
            raise ValueError(f"BROOK_SPEECH_FINAL_BEAM_SIZE must be at least 1 (1: greedy), got {beam}")

    def with_overrides(self, values: Mapping[str, Any]) -> Settings:
        known = {f.name for f in fields(self)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        return replace(self, **{k: v for k, v in values.items() if v is not None})


_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})


def _convert(raw: str, kind: Any, name: str) -> Any:
    if kind is bool:
        if raw.strip().lower() not in _TRUE | _FALSE:
            raise ValueError(f"{ENV_PREFIX}{name.upper()} must be 1/true/yes/on or 0/false/no/off, got {raw!r}")
        return raw.strip().lower() in _TRUE
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is Path:
            return Path(raw)
        if kind == tuple[str, ...]:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()} must be {kind.__name__}, got {raw!r}") from None
    return raw


def settings_from_env(environ: Mapping[str, str] | None = None, base: Settings | None = None) -> Settings:
    """Apply `BROOK_*` variables on top of `base` (default: the defaults)."""
    env = os.environ if environ is None else environ
    base = base or Settings()
    hints = get_type_hints(Settings)
    values = {}
    for f in fields(Settings):
        raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is not None:
            values[f.name] = _convert(raw, hints[f.name], f.name)
    return base.with_overrides(values)
