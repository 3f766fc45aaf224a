"""`brook chat`: an in-process multi-turn chat that reuses the conversation's KV cache, and `--url` delegation.

The local chat runs the real CLI as a subprocess on SmolLM2 v1 with piped input (skips loudly, or fails in CI,
when the model is not fetched). The remote case: ``main`` in-process with ``app.client.chat_remote`` replaced (which
options it passes on), and ``chat_remote`` against a real ``brook serve``.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app import cli
from app.client import chat_remote
from app.repository import ModelRepository
from tests.conftest import require_models
from tests.server_process import RunningServer

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
SUBPROCESS_TIMEOUT_S = 180
TURN_LINE = re.compile(
    r"\[(?P<reason>\w+); (?P<tokens>\d+) tokens; prompt (?P<prompt>\d+) tokens: (?P<cached>\d+) cached, "
    r"(?P<prefilled>\d+) prefilled; ttft (?P<ttft>[\d.]+) ms; (?P<speed>[\d.]+) tok/s\]"
)


def run_chat(stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "chat", "--temperature", "0", "--max-tokens", "24", *args],
        cwd=REPO_ROOT, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}, input=stdin, capture_output=True, text=True,
        timeout=SUBPROCESS_TIMEOUT_S, check=False,
    )


def turn_stats(stdout: str) -> list[dict[str, int]]:
    return [
        {key: int(float(value)) for key, value in match.groupdict().items() if key != "reason"}
        for match in TURN_LINE.finditer(stdout)
    ]


@pytest.fixture(scope="module")
def model_ready() -> None:
    require_models(ModelRepository(REPO_ROOT / "models"), MODEL)


def test_second_turn_prefills_only_its_new_tokens(model_ready: None) -> None:
    result = run_chat("What is the capital of France?\nAnd what is the capital of Germany?\n")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout and "Berlin" in result.stdout, result.stdout
    first, second = turn_stats(result.stdout)
    assert first["cached"] == 0 and first["prefilled"] == first["prompt"]
    # The second prompt is the first prompt, the reply and the new question: everything before it comes from the
    # KV cache, so only the new message (and whatever the re-rendered reply changed) is prefilled.
    assert second["cached"] >= first["prompt"]
    assert second["cached"] + second["prefilled"] == second["prompt"]
    assert second["prefilled"] < second["prompt"] - first["prompt"]
    assert result.stdout.count("you> ") == 3  # two turns, then the prompt that met the end of input


def test_reset_starts_a_new_conversation(model_ready: None) -> None:
    result = run_chat("Hello!\n/reset\nHello!\n/quit\nnever read\n")
    assert result.returncode == 0, result.stderr
    assert "[conversation cleared]" in result.stdout
    first, second = turn_stats(result.stdout)
    assert second["cached"] == 0 and second["prompt"] == first["prompt"]
    assert "never read" not in result.stdout


def test_custom_system_prompt_replaces_the_default(model_ready: None) -> None:
    default = turn_stats(run_chat("Hi\n").stdout)
    custom = turn_stats(run_chat("Hi\n", "--system", "Be brief.").stdout)
    assert len(default) == len(custom) == 1
    assert custom[0]["prompt"] < default[0]["prompt"]  # "Be brief." is shorter than the default system prompt


def test_bad_temperature_fails_before_loading(model_ready: None) -> None:
    result = run_chat("", "--temperature", "-1")
    assert result.returncode != 0
    assert result.stderr.strip().startswith("brook: error: temperature"), result.stderr


def test_url_delegates_to_the_remote_client(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    async def fake_chat_remote(url: str, **kwargs: Any) -> None:
        calls.append((url, kwargs))

    monkeypatch.setattr("app.client.chat_remote", fake_chat_remote)
    code = cli.main(["chat", "--url", "ws://127.0.0.1:9/v1/chat", "--token", "k", "--max-tokens", "7",
                     "--temperature", "0.5", "--model", "m", "--version", "2", "--top-k", "40",
                     "--repetition-penalty", "1.2", "--seed", "0"])
    assert code == 0
    # every sampling option given is sent with each turn (the server checks the ranges); the others stay unset
    sampling = {"max_tokens": 7, "temperature": 0.5, "top_k": 40, "seed": 0, "repetition_penalty": 1.2}
    assert calls == [("ws://127.0.0.1:9/v1/chat?model=m&version=2", {"token": "k", "sampling": sampling})]


def test_remote_chat_sends_its_sampling_options_to_a_real_server(brook_server: RunningServer) -> None:
    """Two turns against ``brook serve``: the options reach the server (an out-of-range one comes back as its
    error), and the second turn reuses the conversation's cache. (Its questions are its own: the server is shared,
    and other tests count what another session's cache saves them.)"""
    out = io.StringIO()
    asyncio.run(chat_remote(f"{brook_server.ws}/v1/chat", token=None,
                            sampling={"max_tokens": 12, "temperature": 0, "repetition_penalty": 1.2},
                            stdin=io.StringIO("Name one red fruit.\nAnd a yellow one?\n\n"), out=out))
    turns = re.findall(r"\[(stop|length); (\d+) tokens, (\d+) cached", out.getvalue())
    assert len(turns) == 2 and int(turns[0][1]) <= 12 and int(turns[1][2]) > 0, out.getvalue()
    refused = io.StringIO()
    asyncio.run(chat_remote(f"{brook_server.ws}/v1/chat", token=None, sampling={"repetition_penalty": 0},
                            stdin=io.StringIO("Hello\n\n"), out=refused))
    assert "error bad_message: repetition_penalty should be in (0, 10]" in refused.getvalue()
