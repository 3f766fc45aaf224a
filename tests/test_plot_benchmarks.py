"""scripts/plot_benchmarks.py draws PNGs from small synthetic benchmark JSON, and skips what is absent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from scripts.plot_benchmarks import find_rows, find_series, main, plot_file

pytest.importorskip("matplotlib", reason="MISSING: matplotlib (the `bench` extra) is not installed")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SPEECH_LOAD = {
    "machine": {"cpu_count": 2},
    "rows": [
        {
            "system": "brook",
            "streams": n,
            "partial_latency_ms": {"p50": 200 + n, "p95": 400 + 10 * n},
            "wer": 0.05,
            "realtime": True,
            "partial_latency_s": [0.1 * n, 0.2, 0.3],
        }
        for n in (1, 2, 4)
    ]
    + [
        {"system": "whisperlive", "streams": n, "partial_latency_ms": {"p95": 2000 + n}, "word_latency_s": [1.0, 2.0]}
        for n in (1, 2)
    ],
}
CHAT_LOAD = {
    "brook": [
        {"sessions": n, "aggregate_tok_s": 50.0 * n, "ttft_ms": {"p95": 100 + n}, "ttft_s": [0.1, 0.2]}
        for n in (1, 4, 16)
    ],
    "llama-server": [{"sessions": n, "aggregate_tok_s": 40.0 * n} for n in (1, 4, 16)],
}
MIXED = {
    "benchmark": "mixed",
    "runs": {
        "smoke": {
            "summary": {"rss_mb": {"idle": 500}},
            "series": [
                {"t_s": t, "phase": "load", "rss_mb": 500 + t, "lag_p99_ms": 2.0, "cpu_cores": 1.5} for t in (0, 5, 10)
            ],
            "raw": {
                "partial_latency_s": [0.2, 0.3],
                "ttft_s": [0.05],
                "event_loop_lag_s": [0.001, 0.002],
                "decode_tok_s": [30.0],
            },
        }
    },
}


def write(directory: Path, name: str, payload: Any) -> None:
    (directory / f"{name}.json").write_text(json.dumps(payload), encoding="utf-8")


def assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes().startswith(PNG_MAGIC), path


def test_rows_are_found_wherever_they_sit() -> None:
    speech = find_rows(SPEECH_LOAD)
    assert {(r.system, r.level) for r in speech} == {
        ("brook", 1),
        ("brook", 2),
        ("brook", 4),
        ("whisperlive", 1),
        ("whisperlive", 2),
    }
    brook4 = next(r for r in speech if r.system == "brook" and r.level == 4)
    assert brook4.scalars["partial_latency_ms.p95"] == 440 and brook4.lists["partial_latency_s"] == [0.4, 0.2, 0.3]
    assert "realtime" not in brook4.scalars  # booleans are not metrics
    chat = find_rows(CHAT_LOAD)
    assert {r.system for r in chat} == {"brook", "llama-server"}  # from the key that holds the list
    assert find_series(MIXED)["smoke"][2] == {"t_s": 10.0, "rss_mb": 510.0, "lag_p99_ms": 2.0, "cpu_cores": 1.5}


def test_every_plot_is_written(tmp_path: Path) -> None:
    write(tmp_path, "speech_load", SPEECH_LOAD)
    write(tmp_path, "chat_load", CHAT_LOAD)
    write(tmp_path, "mixed", MIXED)
    assert main(["--dir", str(tmp_path)]) == 0
    for name in (
        "speech_load_cdf",
        "speech_load_scaling",
        "chat_load_cdf",
        "chat_load_scaling",
        "mixed_cdf",
        "mixed_timeline",
    ):
        assert_png(tmp_path / f"{name}.png")


def test_absent_or_broken_json_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "chat_load.json").write_text("{not json", encoding="utf-8")
    write(tmp_path, "speech_load", {"nothing": "here"})
    assert main(["--dir", str(tmp_path)]) == 0
    assert "no plots written" in capsys.readouterr().out
    assert list(tmp_path.glob("*.png")) == []
    assert plot_file(tmp_path / "mixed.json", tmp_path) == []
