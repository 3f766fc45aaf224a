"""`brook generate` as a subprocess: streamed text, --json records, and one-line errors for bad parameters.

Runs the real CLI (``python -m app.cli``) on SmolLM2 v1 from the model repository; skips loudly (fails in CI) when
the model is not fetched. Greedy decoding makes the plain and JSON runs comparable token for token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.repository import ModelRepository
from tests.conftest import require_models

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
STORY_ARGS = ["Once upon a time, in a quiet harbour town,", "--no-template", "--temperature", "0", "--max-tokens", "40"]
CONTEXT_TOKENS = 2048  # app.text.local_chat.LOCAL_MAX_SEQ_LEN
SUBPROCESS_TIMEOUT_S = 180


def brook_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", "generate", *args]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OPENBLAS_NUM_THREADS": "1"}


def run_brook(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        brook_command(*args), cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True,
        timeout=SUBPROCESS_TIMEOUT_S, check=False,
    )


@pytest.fixture(scope="module")
def model_ready() -> None:
    require_models(ModelRepository(REPO_ROOT / "models"), MODEL)


def json_records(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def story_json(model_ready: None) -> list[dict[str, Any]]:
    result = run_brook(*STORY_ARGS, "--json")
    assert result.returncode == 0, result.stderr
    return json_records(result.stdout)


def test_text_is_streamed_while_the_model_still_generates(story_json: list[dict[str, Any]]) -> None:
    process = subprocess.Popen(
        brook_command(*STORY_ARGS), cwd=REPO_ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        first = os.read(process.stdout.fileno(), 65536)
        # The first delta reached us before the process ended: 39 more tokens (and the shutdown) were still to come.
        still_running = process.poll() is None
        rest = process.stdout.read()
        _, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr.decode()
    assert first, "no output before the end"
    assert still_running, "the first text arrived only when the process ended: not streamed"
    text = (first + rest).decode("utf-8")
    streamed = "".join(r["text"] for r in story_json if r["type"] == "token")
    assert text == streamed + "\n"
    summary = stderr.decode().strip().splitlines()[-1]
    assert summary.startswith("[length; 40 tokens;"), summary


def test_json_prints_token_records_then_usage_and_timings(story_json: list[dict[str, Any]]) -> None:
    *tokens, done = story_json
    assert tokens and all(r["type"] == "token" for r in tokens)
    assert all(isinstance(r["text"], str) and r["token_ids"] for r in tokens)
    assert done["type"] == "done"
    assert done["finish_reason"] == "length"
    usage, timings = done["usage"], done["timings"]
    assert usage["completion_tokens"] == 40
    assert sum(len(r["token_ids"]) for r in tokens) <= usage["completion_tokens"]
    assert usage["cached_tokens"] == 0
    assert timings["prefill_tokens"] == usage["prompt_tokens"] > 0
    assert set(timings) == {
        "ttft_ms", "tokens_per_s", "prefill_tokens", "prefill_ms", "decode_ms", "draft_tokens", "accepted_draft_tokens"
    }
    assert timings["ttft_ms"] > 0 and timings["tokens_per_s"] > 0


def test_chat_template_answers_the_question(model_ready: None) -> None:
    result = run_brook("What is the capital of France?", "--temperature", "0", "--max-tokens", "24", "--json")
    assert result.returncode == 0, result.stderr
    *tokens, done = json_records(result.stdout)
    assert "Paris" in "".join(r["text"] for r in tokens)
    assert done["finish_reason"] == "stop"
    # The template added the model's default system prompt: far more tokens than the eight-word question.
    assert done["usage"]["prompt_tokens"] > 30


def test_stop_sequence_ends_the_text_before_it(story_json: list[dict[str, Any]]) -> None:
    streamed = "".join(r["text"] for r in story_json if r["type"] == "token")
    words = streamed.split()
    assert len(words) > 4, streamed
    stop = words[3]
    result = run_brook(*STORY_ARGS, "--stop", stop, "--json")
    assert result.returncode == 0, result.stderr
    *tokens, done = json_records(result.stdout)
    text = "".join(r["text"] for r in tokens)
    assert done["finish_reason"] == "stop"
    assert text == streamed[: streamed.index(stop)]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--temperature", "-0.5"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--top-p", "1.5"], "top_p"),
        (["--max-tokens", "0"], "max_tokens"),
        (["--repetition-penalty", "0"], "repetition_penalty"),
        (["--frequency-penalty", "3"], "frequency_penalty"),
    ],
    ids=[
        "negative-temperature", "top-p-zero", "top-p-above-one", "zero-max-tokens", "zero-repetition-penalty",
        "frequency-penalty-above-two",
    ],
)
def test_bad_sampling_parameters_fail_with_one_line(args: list[str], expected: str) -> None:
    result = run_brook("Hello", *args)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("brook: error: ") and expected in lines[0], lines[0]


def test_prompt_over_the_context_length_fails_with_one_line(model_ready: None) -> None:
    prompt = "word " * (CONTEXT_TOKENS + 100)
    result = run_brook(prompt, "--no-template")
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("brook: error: the prompt has ") and f"holds {CONTEXT_TOKENS}" in lines[0], lines[0]


def test_unknown_model_version_fails_with_one_line(model_ready: None) -> None:
    result = run_brook("Hello", "--version", "99")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "version 99" in lines[0], result.stderr
