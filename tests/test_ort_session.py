"""Brook's onnxruntime session settings (app/ort_session.py): how long idle threads spin, and where they must not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from app import ort_session
from app.config import Settings, settings_from_env
from app.main import create_app


@pytest.fixture
def captured_options(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[ort.SessionOptions]]:
    """The options of every session created, instead of creating it."""
    seen: list[ort.SessionOptions] = []

    def fake_session(path: str, sess_options: ort.SessionOptions, providers: list[str]) -> Any:
        seen.append(sess_options)
        return object()

    monkeypatch.setattr(ort, "InferenceSession", fake_session)
    before = ort_session.thread_spin_us()
    yield seen
    ort_session.set_thread_spin_us(before)


def _spin(options: ort.SessionOptions) -> tuple[str, str]:
    allowed = options.get_session_config_entry(ort_session.ALLOW_SPINNING_CONFIG_KEY)
    try:
        duration = options.get_session_config_entry(ort_session.SPIN_DURATION_CONFIG_KEY)
    except Exception:  # onnxruntime raises for a key that was never set
        duration = ""
    return allowed, duration


def test_sessions_spin_for_the_process_setting_or_their_own(captured_options: list[ort.SessionOptions]) -> None:
    assert ort_session.bounded_spinning_supported(), f"onnxruntime {ort.__version__} is older than the pinned one"
    ort_session.set_thread_spin_us(250)
    ort_session.create_session(Path("model.onnx"), 2)
    ort_session.create_session(Path("model.onnx"), 2, spin_us=0)
    ort_session.create_session(Path("model.onnx"), 2, spin_us=40)
    assert [_spin(options) for options in captured_options] == [("1", "250"), ("0", ""), ("1", "40")]
    assert Settings().ort_spin_us == ort_session.DEFAULT_SPIN_US


def test_an_onnxruntime_that_cannot_bound_the_spin_never_spins(
    captured_options: list[ort.SessionOptions], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ort, "__version__", "1.25.1")
    ort_session.set_thread_spin_us(100)
    ort_session.create_session(Path("model.onnx"), 2)
    ort_session.create_session(Path("model.onnx"), 2, spin_us=100)
    assert [_spin(options) for options in captured_options] == [("0", ""), ("0", "")]
    assert ort_session.thread_spin_us() == 0


def test_the_setting_comes_from_the_environment_and_is_checked_at_start() -> None:
    assert settings_from_env({"BROOK_ORT_SPIN_US": "0"}).ort_spin_us == 0
    with pytest.raises(ValueError, match="BROOK_ORT_SPIN_US must be int"):
        settings_from_env({"BROOK_ORT_SPIN_US": "lots"})
    with pytest.raises(ValueError, match=r"BROOK_ORT_SPIN_US must lie in 0\.\.10000"):
        create_app(Settings(ort_spin_us=20_000))
