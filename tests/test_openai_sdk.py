"""The OpenAI text routes (`/v1/chat/completions`, `/v1/completions`) driven by the official `openai` SDK against a
real `brook serve`, plus the pure request parsing."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from app.config import Settings
from app.engine.text_engine import TOKENIZER_FILE_NAME
from app.errors import OverloadedError
from app.repository import ModelRepository
from app.server.openai_api import start_choices
from app.server.openai_requests import OpenAIError, parse_chat_request, parse_completion_request, parse_model
from app.server.text_requests import CompletionLogprobs
from app.text.sampling import SamplingParams, TokenLogprob
from app.text.tokenizer import TextTokenizer
from tests.conftest import ALL_MODELS, ARTIFACT_DIR, require_models
from tests.server_process import RunningServer, run_server
from tests.test_text_engine import load_llm

openai = pytest.importorskip("openai", reason="the `openai` SDK is in the dev extra: pip install -e '.[dev]'")

MODEL = "smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
JOKE = [{"role": "user", "content": "Tell me a joke."}]
# Greedy counting to 100 takes about 290 tokens: far more than the tokens a cancelled request may still run.
COUNTING = [{"role": "user", "content": "Count from 1 to 100, separated by commas."}]
COUNTING_MAX_TOKENS = 200


@pytest.fixture(scope="module")
def client(brook_server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{brook_server.http}/v1", api_key="not-checked", max_retries=0) as sdk:
        yield sdk


def test_chat_completion_is_greedy_deterministic_and_knows_paris(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=32)
    again = client.chat.completions.create(model=f"{MODEL}@1", messages=FRANCE, temperature=0,
                                           max_completion_tokens=32)
    assert first.object == "chat.completion" and first.id.startswith("chatcmpl-")
    answer = first.choices[0].message.content
    assert answer is not None and "Paris" in answer
    assert again.choices[0].message.content == answer, "temperature 0 is deterministic"
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].finish_reason == "stop"
    assert again.system_fingerprint == f"{MODEL}@1" and again.model == MODEL
    usage = first.usage
    assert usage is not None and usage.prompt_tokens > 10 and usage.completion_tokens >= 3
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_a_stateless_follow_up_prefills_only_what_is_new(client: openai.OpenAI) -> None:
    """A client resends the whole history each turn; the previous request's KV cache, left behind as a prefix
    cache, covers it, so only the reply's end and the new message are computed."""
    history = [{"role": "system", "content": "You are a terse geography tutor."}, *FRANCE]
    first = client.chat.completions.create(model=MODEL, messages=history, temperature=0, max_tokens=24)
    reply = first.choices[0].message.content
    assert reply is not None and first.usage is not None
    follow_up = [*history, {"role": "assistant", "content": reply},
                 {"role": "user", "content": "And what is the capital of Italy?"}]
    second = client.chat.completions.create(model=MODEL, messages=follow_up, temperature=0, max_tokens=24)
    usage = second.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens or 0
    assert cached >= first.usage.prompt_tokens, (cached, first.usage)  # the whole first prompt, at least
    assert usage.prompt_tokens - cached <= first.usage.completion_tokens + 20  # the reply's end and the question
    assert "Rome" in (second.choices[0].message.content or "")


def test_a_predicted_reply_is_verified_several_tokens_at_a_time_and_changes_nothing(client: openai.OpenAI) -> None:
    """Predicted Outputs: the client sends the reply it expects (here: the reply itself, as when an edit keeps most
    of a text); the tokens the model confirms are counted in ``completion_tokens_details``."""
    question = [{"role": "user", "content": "Name three red fruits and say one thing about each."}]
    plain = client.chat.completions.create(model=MODEL, messages=question, temperature=0, max_tokens=48)
    expected = plain.choices[0].message.content
    assert expected
    predicted = client.chat.completions.create(model=MODEL, messages=question, temperature=0, max_tokens=48,
                                               prediction={"type": "content", "content": expected})
    assert predicted.choices[0].message.content == expected
    details = predicted.usage.completion_tokens_details if predicted.usage else None
    assert details is not None and predicted.usage is not None
    assert (details.accepted_prediction_tokens or 0) >= predicted.usage.completion_tokens // 2, details
    wrong = client.chat.completions.create(model=MODEL, messages=question, temperature=0, max_tokens=48,
                                           prediction={"type": "content", "content": "Bananas are yellow. " * 20})
    assert wrong.choices[0].message.content == expected  # a bad prediction costs speed, never changes the reply


def test_chat_streaming_sends_the_same_text_in_chunks_with_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=32)
    stream = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=32, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert len(pieces) >= 3, "the reply streams as several chunks"
    assert "".join(pieces) == whole.choices[0].message.content
    reasons = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert reasons == ["stop"]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_max_tokens_stop_and_seed(client: openai.OpenAI) -> None:
    short = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_completion_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3  # type: ignore[union-attr]
    stopped = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=32,
                                             stop=["Paris"])
    assert stopped.choices[0].finish_reason == "stop"
    assert "Paris" not in (stopped.choices[0].message.content or "")
    sampled = [client.chat.completions.create(model=MODEL, messages=JOKE, temperature=1.0, top_p=0.95, seed=seed,
                                              max_tokens=12).choices[0].message.content for seed in (7, 7)]
    assert sampled[0] == sampled[1], "the same seed gives the same sampled reply"


def test_completions_stream_and_not(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    whole = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert "Paris" in whole.choices[0].text
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.completion_tokens <= 8
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8, stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text
    echoed = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8, echo=True)
    assert echoed.choices[0].text == prompt + whole.choices[0].text


def test_several_choices_are_sampled_apart_reproducibly_whole_or_streamed(client: openai.OpenAI) -> None:
    # top_k 40: a hot but exact distribution (v3 computes only the 64 most likely logits exactly; the tail's int8
    # logits may round differently with another batch shape, docs/models.md)
    asked = dict(model=MODEL, messages=JOKE, temperature=1.5, top_p=1.0, seed=11, max_tokens=12,
                 extra_body={"ignore_eos": True, "top_k": 40})
    whole = client.chat.completions.create(n=3, **asked)  # type: ignore[call-overload]
    assert [choice.index for choice in whole.choices] == [0, 1, 2]
    texts = [choice.message.content or "" for choice in whole.choices]
    assert len(set(texts)) >= 2, texts  # seeds 11, 12, 13
    assert all(choice.finish_reason == "length" for choice in whole.choices)
    assert whole.usage is not None and whole.usage.completion_tokens == 3 * 12
    single = client.chat.completions.create(**asked)  # type: ignore[call-overload]
    assert whole.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert single.choices[0].message.content == texts[0]  # choice 0 has the request's own seed
    again = client.chat.completions.create(n=3, **asked)  # type: ignore[call-overload]
    assert [choice.message.content for choice in again.choices] == texts
    streamed: dict[int, str] = {}
    finished: dict[int, str] = {}
    chunks = list(client.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True},
                                                 **asked))  # type: ignore[call-overload]
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert [streamed[index] for index in range(3)] == texts
    assert finished == {0: "length", 1: "length", 2: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 36
    legacy = client.completions.create(model=MODEL, prompt="Once upon a time", n=2, temperature=1.0, seed=3,
                                       max_tokens=6, logprobs=1)
    for choice in legacy.choices:
        assert choice.logprobs is not None and choice.logprobs.text_offset
        assert choice.logprobs.text_offset[0] == 0 and "".join(choice.logprobs.tokens or []) == choice.text


def test_a_refused_choice_cancels_the_ones_already_started() -> None:
    cancelled: list[int] = []

    class Generation:
        def __init__(self, number: int) -> None:
            self.number = number

        def cancel(self) -> None:
            cancelled.append(self.number)

    class FullEngine:
        started = 0

        def chat_once(self, messages: object, params: SamplingParams) -> Generation:
            if self.started == 2:
                raise OverloadedError("the queue is full")
            self.started += 1
            return Generation(self.started)

    state = SimpleNamespace(settings=Settings())
    parsed = parse_chat_request({"messages": JOKE, "n": 3}, default_model=MODEL)
    with pytest.raises(OpenAIError) as refused:
        start_choices(state, FullEngine(), parsed)  # type: ignore[arg-type]
    assert refused.value.status == 429 and refused.value.code == "overloaded" and cancelled == [1, 2]


def test_errors_surface_as_the_sdk_exception_types(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad_n:
        client.chat.completions.create(model=MODEL, messages=FRANCE, n=9)
    assert bad_n.value.status_code == 400 and bad_n.value.code == "invalid_value"
    assert bad_n.value.param == "n" and "from 1 to 8" in bad_n.value.message
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-model", messages=FRANCE)
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=f"{MODEL}@99", prompt="Hello")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="whisper-tiny-en", messages=FRANCE)
    with pytest.raises(openai.BadRequestError) as tools:
        client.chat.completions.create(model=MODEL, messages=FRANCE, tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {}}}}])
    assert tools.value.param == "tools"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=MODEL, prompt="word " * 5000, max_tokens=4)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as bad_temperature:
        client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=-1)
    assert "temperature" in bad_temperature.value.message
    with pytest.raises(openai.BadRequestError) as bad_penalty:
        client.chat.completions.create(model=MODEL, messages=FRANCE, frequency_penalty=2.5)
    assert "frequency_penalty should be in [-2, 2]" in bad_penalty.value.message


def test_penalties_are_honoured(client: openai.OpenAI) -> None:
    """OpenAI's presence and frequency penalties, and vLLM's repetition_penalty (sent as an extra field)."""
    count = [{"role": "user", "content": "Count from 1 to 30, separated by commas."}]
    plain = client.chat.completions.create(model=MODEL, messages=count, temperature=0, max_tokens=40)
    penalized = client.chat.completions.create(model=MODEL, messages=count, temperature=0, max_tokens=40,
                                               frequency_penalty=1.0, presence_penalty=0.5)
    repeated = client.chat.completions.create(model=MODEL, messages=count, temperature=0, max_tokens=40,
                                              extra_body={"repetition_penalty": 1.5})
    texts = [reply.choices[0].message.content or "" for reply in (plain, penalized, repeated)]
    assert texts[0].count("\n") > texts[1].count("\n") and texts[0] != texts[2], texts


def test_logprobs_name_each_token_with_its_alternatives_streamed_or_not(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=16,
                                           logprobs=True, top_logprobs=3)
    choice = whole.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    entries = choice.logprobs.content
    assert "".join(entry.token for entry in entries) == choice.message.content
    assert whole.usage is not None and len(entries) <= whole.usage.completion_tokens
    for entry in entries:
        assert entry.logprob <= 0 and bytes(entry.bytes or []).decode("utf-8", errors="replace") == entry.token
        alternatives = entry.top_logprobs
        assert len(alternatives) == 3 and [a.logprob for a in alternatives] == sorted(
            (a.logprob for a in alternatives), reverse=True)
        # greedy: the chosen token is the most likely one
        assert alternatives[0].token == entry.token and abs(alternatives[0].logprob - entry.logprob) < 1e-6
    plain = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=16)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == choice.message.content
    streamed = []
    for chunk in client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=16,
                                                logprobs=True, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content or []
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in entries]
    assert all(e.top_logprobs == [] for e in streamed)  # top_logprobs defaults to 0
    directory, config = load_llm()
    end_of_turn = TextTokenizer.from_files(directory / TOKENIZER_FILE_NAME, config).eos_token_id
    assert end_of_turn is not None
    empty = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=4, logprobs=True,
                                           logit_bias={str(end_of_turn): 100})  # the reply ends at once
    assert empty.choices[0].message.content == ""
    assert empty.choices[0].logprobs is not None and empty.choices[0].logprobs.content == []


def test_legacy_completion_logprobs_name_each_token_and_where_it_starts_streamed_or_not(
    client: openai.OpenAI
) -> None:
    prompt = "The three primary colours are"
    whole = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12, logprobs=3)
    choice = whole.choices[0]
    legacy = choice.logprobs
    assert legacy is not None and legacy.tokens and legacy.token_logprobs and legacy.top_logprobs
    assert legacy.text_offset is not None
    assert len(legacy.tokens) == len(legacy.token_logprobs) == len(legacy.top_logprobs) == len(legacy.text_offset)
    assert "".join(legacy.tokens) == choice.text
    assert legacy.text_offset == list(itertools.accumulate([0, *(len(t) for t in legacy.tokens[:-1])]))
    for token, logprob, best in zip(legacy.tokens, legacy.token_logprobs, legacy.top_logprobs, strict=True):
        assert logprob is not None and logprob <= 0 and len(best) == 3
        assert best[token] == pytest.approx(logprob) and max(best.values()) == pytest.approx(logprob)  # greedy
    streamed: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12, logprobs=3,
                                           stream=True):
        piece = chunk.choices[0].logprobs if chunk.choices else None
        if piece is not None:
            for name in streamed:
                streamed[name] += getattr(piece, name)
    assert streamed["tokens"] == legacy.tokens and streamed["text_offset"] == legacy.text_offset
    assert [round(v, 4) for v in streamed["token_logprobs"]] == [round(v, 4) for v in legacy.token_logprobs]
    only_chosen = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=4, logprobs=0)
    chosen = only_chosen.choices[0].logprobs
    assert chosen is not None and chosen.tokens and chosen.token_logprobs
    assert chosen.top_logprobs == [{t: p} for t, p in zip(chosen.tokens, chosen.token_logprobs, strict=True)]
    plain = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12)
    assert plain.choices[0].logprobs is None and plain.choices[0].text == choice.text
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model=MODEL, prompt=prompt, logprobs=2, echo=True)


def test_legacy_logprobs_offsets_point_at_the_character_a_split_token_belongs_to() -> None:
    pieces = {1: b"caf", 2: b"\xc3", 3: b"\xa9", 4: b"!", 5: b" ok"}
    legacy = CompletionLogprobs(pieces.__getitem__, offset=6)  # after a 6-character first piece
    first = legacy.take("café!", [TokenLogprob(i, -0.5, ((i, -0.5), (5, -2.0))) for i in (1, 2, 3, 4)])
    assert first["text_offset"] == [6, 9, 9, 10]  # both bytes of "é" start at the "é"
    assert first["tokens"] == ["caf", "\ufffd", "\ufffd", "!"]
    assert first["top_logprobs"][0] == {"caf": -0.5, " ok": -2.0}
    assert legacy.take(" ok", [TokenLogprob(5, -0.1)])["text_offset"] == [11]


def test_logit_bias_forces_and_bans_tokens(client: openai.OpenAI) -> None:
    directory, config = load_llm()
    tokenizer = TextTokenizer.from_files(directory / TOKENIZER_FILE_NAME, config)
    (banana,) = tokenizer.encode(" banana", allow_special=False)
    forced = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=8,
                                            logit_bias={str(banana): 100})
    assert (forced.choices[0].message.content or "").count("banana") >= 4, forced.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as outside:
        client.chat.completions.create(model=MODEL, messages=FRANCE, logit_bias={str(tokenizer.vocab_size): -100})
    assert f"logit_bias token id {tokenizer.vocab_size} is outside the vocabulary" in outside.value.message
    with pytest.raises(openai.BadRequestError) as too_big:
        client.completions.create(model=MODEL, prompt="Hello", logit_bias={str(banana): 150})
    assert "logit_bias" in too_big.value.message


def _metric(server: RunningServer, name: str, labels: str) -> float:
    with urllib.request.urlopen(f"{server.http}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _steps_once_idle(server: RunningServer) -> float:
    """The text engine's step count, read once no generation is running or waiting (version 1)."""
    version = f'model="{MODEL}",version="1"'
    while _metric(server, "brook_engine_active", version) > 0:
        time.sleep(0.05)
    return _metric(server, "brook_batch_size_count", f'{version},stage="step"')


def test_a_client_that_disconnects_cancels_its_generation(client: openai.OpenAI, brook_server: RunningServer) -> None:
    before = _steps_once_idle(brook_server)
    stream = client.chat.completions.create(model=f"{MODEL}@1", messages=COUNTING, temperature=0,
                                            max_tokens=COUNTING_MAX_TOKENS, stream=True)
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 3:
            break
    stream.close()
    after_stream = _steps_once_idle(brook_server)
    assert after_stream - before < COUNTING_MAX_TOKENS / 2, "the generation stopped soon after the disconnect"

    impatient = client.with_options(timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model=f"{MODEL}@1", messages=COUNTING, temperature=0,
                                          max_tokens=COUNTING_MAX_TOKENS)
    after_timeout = _steps_once_idle(brook_server)
    assert after_timeout - after_stream < COUNTING_MAX_TOKENS / 2, "a JSON request is cancelled on disconnect too"


async def _realtime_first_event(base_url: str, api_key: str) -> tuple[str, Any]:
    """The type of the realtime socket's first event, and the close code once the server closed it (or None)."""
    async with (
        openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0) as sdk,
        sdk.realtime.connect(extra_query={"intent": "transcription"}) as connection,
    ):
        first = await connection.recv()
        try:
            await asyncio.wait_for(connection.recv(), 2.0)
        except ConnectionClosed as closed:
            return first.type, closed.rcvd.code if closed.rcvd else None
        except TimeoutError:
            pass
        return first.type, None


def test_api_key_auth_with_the_sdk(model_repository: ModelRepository) -> None:
    require_models(model_repository, MODEL, "whisper-tiny-en", "silero-vad")
    with run_server(ARTIFACT_DIR / "logs", models=ALL_MODELS, api_keys="sekret-key") as server:
        base_url = f"{server.http}/v1"
        with openai.OpenAI(base_url=base_url, api_key="wrong-key", max_retries=0) as wrong:
            with pytest.raises(openai.AuthenticationError) as denied:
                wrong.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=4)
            assert denied.value.status_code == 401 and denied.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                wrong.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
        with openai.OpenAI(base_url=base_url, api_key="sekret-key", max_retries=0) as right:
            reply = right.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=16)
            assert "Paris" in (reply.choices[0].message.content or "")
            models = right.models.list().data
            assert MODEL in [model.id for model in models] and all(model.object == "model" for model in models)
        # The realtime socket takes the same Bearer key: a wrong one is answered with an error and close 1008.
        assert asyncio.run(_realtime_first_event(base_url, "wrong-key")) == ("error", 1008)
        assert asyncio.run(_realtime_first_event(base_url, "sekret-key"))[0] == "session.created"


# ---- pure parsing -------------------------------------------------------------------------------------------------

def test_model_names_select_a_version() -> None:
    assert parse_model("smollm2-135m-instruct", "x") == ("smollm2-135m-instruct", None)
    assert parse_model("smollm2-135m-instruct@2", "x") == ("smollm2-135m-instruct", 2)
    assert parse_model(None, "default-model") == ("default-model", None)
    for bad in ("m@", "m@v1", "m@0"):
        with pytest.raises(OpenAIError) as error:
            parse_model(bad, "x")
        assert error.value.status == 404


def test_chat_request_fields_map_to_brook() -> None:
    parsed = parse_chat_request({
        "model": "m@1", "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": None}],
        "max_tokens": 5, "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5, "seed": 3, "stop": "END",
        "stream": True, "stream_options": {"include_usage": True}, "n": 1, "user": "ignored", "logprobs": False,
        "presence_penalty": 0.5, "frequency_penalty": -0.25, "repetition_penalty": 1.1, "logit_bias": {"15": -100},
        "response_format": {"type": "text"}, "tools": [],
    }, default_model="x")
    assert parsed.messages == (("system", "Be brief."), ("user", "Hi\nthere"), ("assistant", ""))
    assert (parsed.model, parsed.version, parsed.stream, parsed.include_usage) == ("m", 1, True, True)
    sampling = parsed.sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.seed, sampling.stop) == (
        7, 0.0, 0.5, 3, ("END",))
    assert sampling.prediction == ""
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.repetition_penalty) == (0.5, -0.25, 1.1)
    assert sampling.logit_bias == ((15, -100.0),)
    predicted = {"type": "content", "content": [{"type": "text", "text": "def f():"}, {"type": "text", "text": "  x"}]}
    body = {"messages": [{"role": "user", "content": "Hi"}], "prediction": predicted}
    assert parse_chat_request(body, default_model="m").sampling.prediction == "def f():\n  x"


@pytest.mark.parametrize("field", [
    {"n": 9}, {"n": 0}, {"n": True}, {"logprobs": "yes"}, {"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21},
    {"presence_penalty": "high"}, {"logit_bias": {"one": 5}},
    {"response_format": {"type": "json_object"}}, {"tool_choice": "auto"}, {"stream": "yes"},
    {"messages": [{"role": "tool", "content": "x"}]}, {"messages": []},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"max_tokens": "many"}, {"prediction": "just text"}, {"prediction": {"type": "content", "content": 5}},
    {"prediction": {"type": "other", "content": "x"}},
])
def test_unsupported_chat_fields_are_400(field: dict[str, object]) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **field}
    with pytest.raises(OpenAIError) as error:
        parse_chat_request(body, default_model="m")
    assert error.value.status == 400 and error.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("field", [{"prompt": ["a", "b"]}, {"prompt": [1, 2, 3]}, {"best_of": 2},
                                   {"n": 2, "best_of": 3}, {"suffix": "x"},
                                   {"logprobs": 21}, {"logprobs": True}, {"logprobs": 1, "echo": True},
                                   {"echo": "yes"}])
def test_unsupported_completion_fields_are_400(field: dict[str, object]) -> None:
    with pytest.raises(OpenAIError) as error:
        parse_completion_request({"model": "m", "prompt": "hi", **field}, default_model="m")
    assert error.value.status == 400


def test_completion_prompt_may_be_a_one_item_list() -> None:
    parsed = parse_completion_request({"prompt": ["Once"], "echo": True}, default_model="m")
    assert (parsed.prompt, parsed.echo, parsed.model) == ("Once", True, "m")
