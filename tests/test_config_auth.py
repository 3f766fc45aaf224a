"""Settings from the environment, API keys (header or ?token=) and the Origin allow-list."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from app.config import Settings, settings_from_env
from app.engine.speech_decode import DecodePolicy
from app.engine.text_engine import TextEngineSettings
from app.server.auth import is_authorized, is_origin_allowed
from app.server.engines import speech_engine_settings, text_engine_settings


def test_settings_from_env_converts_types() -> None:
    settings = settings_from_env({"BROOK_PORT": "9001", "BROOK_API_KEYS": "a, b,", "BROOK_IDLE_TIMEOUT_S": "2.5",
                                  "BROOK_MODEL_DIR": "/srv/models", "BROOK_MODELS": "whisper-tiny-en"})
    assert settings.port == 9001 and settings.api_keys == ("a", "b") and settings.idle_timeout_s == 2.5
    assert settings.model_dir == Path("/srv/models") and settings.models == ("whisper-tiny-en",)


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("true", True), ("On", True), ("0", False), ("no", False)])
def test_boolean_settings_read_words_and_digits(raw: str, expected: bool) -> None:
    assert settings_from_env({"BROOK_SPEECH_PARTIAL_DRAFT_VERIFY": raw}).speech_partial_draft_verify is expected


def test_final_beam_size_is_read_from_the_environment() -> None:
    assert Settings().speech_final_beam_size == 1  # greedy finals unless asked
    assert settings_from_env({"BROOK_SPEECH_FINAL_BEAM_SIZE": "5"}).speech_final_beam_size == 5
    with pytest.raises(ValueError, match="BROOK_SPEECH_FINAL_BEAM_SIZE must be at least 1"):
        settings_from_env({"BROOK_SPEECH_FINAL_BEAM_SIZE": "0"})


def test_chat_draft_settings_reach_the_text_engine() -> None:
    assert text_engine_settings(Settings()) == TextEngineSettings()  # the server's defaults are the engine's
    drafts = {
        "BROOK_CHAT_DRAFT_TOKENS": "6",
        "BROOK_CHAT_DRAFT_MAX_STREAMS": "1",
        "BROOK_CHAT_DRAFT_MIN_ACCEPTANCE": "0.5",
    }
    engine = text_engine_settings(settings_from_env(drafts))
    assert (engine.max_draft_tokens, engine.draft_max_decoding, engine.busy_draft_min_acceptance) == (6, 1, 0.5)
    assert TextEngineSettings().busy_draft_min_acceptance == 0.0  # no drafts in busy steps unless asked for
    with pytest.raises(ValueError, match="BROOK_CHAT_DRAFT_TOKENS must be at least 0"):
        settings_from_env({"BROOK_CHAT_DRAFT_TOKENS": "-1"})
    for wrong in ("1.5", "-0.1", "nan"):
        with pytest.raises(ValueError, match="BROOK_CHAT_DRAFT_MIN_ACCEPTANCE must be within 0..1"):
            settings_from_env({"BROOK_CHAT_DRAFT_MIN_ACCEPTANCE": wrong})


def test_speech_settings_reach_the_decode_policy() -> None:
    policy = speech_engine_settings(settings_from_env({"BROOK_SPEECH_FINAL_BEAM_SIZE": "5"})).decode
    assert policy.final_beam_size == 5 and policy.final_beam_below_logprob is None  # every final, beam at once
    gated = {"BROOK_SPEECH_FINAL_BEAM_SIZE": "5", "BROOK_SPEECH_FINAL_BEAM_BELOW_LOGPROB": "-0.5"}
    assert speech_engine_settings(settings_from_env(gated)).decode.final_beam_below_logprob == -0.5
    assert speech_engine_settings(Settings()).decode == DecodePolicy()  # the server's defaults are the engine's


def test_settings_errors_name_the_variable() -> None:
    with pytest.raises(ValueError, match="BROOK_SPEECH_PARTIAL_DRAFT_VERIFY must be 1/true"):
        settings_from_env({"BROOK_SPEECH_PARTIAL_DRAFT_VERIFY": "maybe"})
    with pytest.raises(ValueError, match="BROOK_PORT must be int, got 'eighty'"):
        settings_from_env({"BROOK_PORT": "eighty"})
    with pytest.raises(ValueError, match="unknown settings: colour"):
        Settings().with_overrides({"colour": "blue"})


def test_every_setting_is_documented_in_operations_md() -> None:
    """Operators configure Brook from docs/operations.md: a setting added to ``Settings`` must be listed there."""
    documented = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text(encoding="utf-8")
    missing = [f"BROOK_{f.name.upper()}" for f in fields(Settings) if f"`BROOK_{f.name.upper()}`" not in documented]
    assert not missing, f"not in docs/operations.md: {missing}"


def test_overrides_ignore_unset_values() -> None:
    assert Settings().with_overrides({"port": None, "host": "0.0.0.0"}).port == 8000


def test_auth_accepts_bearer_or_token_and_nothing_else() -> None:
    keys = ("s3cret",)
    assert is_authorized((), {}, {})
    assert is_authorized(keys, {"authorization": "Bearer s3cret"}, {})
    assert is_authorized(keys, {"authorization": "bearer s3cret"}, {})
    assert is_authorized(keys, {}, {"token": "s3cret"})
    assert not is_authorized(keys, {}, {})
    assert not is_authorized(keys, {"authorization": "Bearer wrong"}, {})
    assert not is_authorized(keys, {"authorization": "Basic s3cret"}, {})
    assert not is_authorized(keys, {}, {"token": ""})


def test_origin_allow_list() -> None:
    allowed = ("https://app.example",)
    assert is_origin_allowed((), {"origin": "https://evil.example"})
    assert is_origin_allowed(allowed, {"origin": "https://app.example"})
    assert is_origin_allowed(allowed, {})  # not a browser
    assert not is_origin_allowed(allowed, {"origin": "https://evil.example"})


def test_serve_refuses_a_bad_setting_with_one_line() -> None:
    for name, value, fragment in (
        ("BROOK_SPEECH_FINAL_BEAM_SIZE", "0", "must be at least 1"),
        ("BROOK_PORT", "eighty", "BROOK_PORT must be int"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "app.cli", "serve", "--no-fetch"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, name: value},
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith("brook: error: ") and fragment in lines[0]
