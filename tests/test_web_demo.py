"""The browser demo at `/` in real headless Chromium (Debian `chromium`, driven by Playwright's sync API).

A fake microphone plays a real phone call into the page; chat replies stream into the DOM; error states
(wrong API key, overloaded server, server gone) show a message with a way to retry.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf
from websockets.sync.client import connect

from app.repository import ModelRepository
from app.speech.wer import word_error_rate
from tests.conftest import ARTIFACT_DIR, missing, require_models
from tests.server_process import RunningServer, run_server
from tests.whisper_test_audio import offline_transcript

playwright_sync = pytest.importorskip("playwright.sync_api", reason="MISSING: playwright (pip install -e .[dev])")

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ARTIFACT_DIR / "screenshots"
# The fake microphone goes through Chromium's capture path (echo cancellation, gain control) and the page's
# worklet before Brook's VAD cuts it into utterances, so a few edge words differ from offline transcription.
MAX_BROWSER_WER = 0.25
CLIP_SECONDS = 30.0
WAIT_MS = 60_000


def _browser_args(fake_audio: Path) -> list[str]:
    return [
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={fake_audio}%noloop",
        "--autoplay-policy=no-user-gesture-required",
    ]


@pytest.fixture(scope="module")
def fake_microphone_wav(speech_clips: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Chromium's fake capture device reads 16-bit PCM WAV only."""
    audio, rate = sf.read(speech_clips["telephone"], dtype="float32")
    path = tmp_path_factory.mktemp("fake-mic") / "telephone-pcm16.wav"
    sf.write(path, audio, rate, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def browser(fake_microphone_wav: Path) -> Iterator[Any]:
    if shutil.which(str(CHROMIUM)) is None:
        missing(f"{CHROMIUM}: install Debian chromium (apt-get install chromium), as .ci/run does")
    with playwright_sync.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                              args=_browser_args(fake_microphone_wav))
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.grant_permissions(["microphone"])
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def screenshot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


RECORD_TRANSCRIPT_ORDER = """() => {
  window.__order = [];
  const seen = new WeakMap();
  new MutationObserver(() => {
    for (const li of document.querySelectorAll('#transcript li')) {
      if (seen.get(li) !== li.className) { seen.set(li, li.className); window.__order.push(li.className); }
    }
  }).observe(document.getElementById('transcript'), {subtree: true, childList: true, attributes: true});
}"""


def test_fake_microphone_streams_partials_then_finals_that_match_offline_and_feed_the_voice_assistant(
    brook_server: RunningServer, page: Any, model_repository: ModelRepository, speech_clips: dict[str, Path]
) -> None:
    page.goto(brook_server.http + "/")
    page.wait_for_selector("#listen-model option", state="attached")
    page.evaluate(RECORD_TRANSCRIPT_ORDER)
    assert page.get_attribute("#mic", "aria-label") == "Start microphone"
    page.check("#assistant")  # each final transcript becomes a chat turn
    page.click("#mic")
    assert page.get_attribute("#mic", "aria-label") == "Stop microphone"
    page.wait_for_selector("#listen-version:not([hidden])", timeout=WAIT_MS)
    assert page.text_content("#listen-version") == "whisper-tiny-en v3"
    page.wait_for_selector("#transcript li.partial", timeout=WAIT_MS)
    page.wait_for_selector("#speech[data-active='true']", state="attached", timeout=WAIT_MS)
    page.wait_for_selector("#transcript li.final", timeout=WAIT_MS)
    assert page.text_content("#latency").endswith(" ms")
    screenshot(page, "transcription-live")
    # Let the whole clip play (the fake device plays it once), then stop: the server flushes the last final.
    page.wait_for_function(f"Number(document.getElementById('streamed').dataset.seconds) >= {CLIP_SECONDS + 3}",
                           timeout=WAIT_MS)
    page.click("#mic")
    page.wait_for_selector("body[data-listen='ended']", timeout=WAIT_MS)
    order: list[str] = page.evaluate("window.__order")
    assert order.index("partial") < order.index("final"), order
    finals: list[str] = page.eval_on_selector_all("#transcript li.final .text", "els => els.map(e => e.textContent)")
    times = page.eval_on_selector_all("#transcript li.final time", "els => els.map(e => e.textContent)")
    assert len(times) == len(finals) >= 1
    assert page.locator("#transcript li.partial").count() == 0
    heard = " ".join(finals)
    wer = word_error_rate(offline_transcript(model_repository, speech_clips["telephone"]), heard)
    print(f"browser WER vs offline: {wer:.3f} over {len(finals)} finals: {heard!r}")
    assert wer <= MAX_BROWSER_WER, (wer, heard)
    # The voice assistant sent every final as a user turn, in order, and each got a reply (or was cut by barge-in).
    page.wait_for_function("document.body.dataset.chat === 'idle' && document.querySelectorAll("
                           "'#messages .message.assistant:not([data-finish])').length === 0", timeout=WAIT_MS)
    turns = page.eval_on_selector_all("#messages .message.user", "els => els.map(e => e.textContent)")
    assert turns == [f.strip() for f in finals if f.strip()], (turns, finals)
    finishes = page.eval_on_selector_all("#messages .message.assistant", "els => els.map(e => e.dataset.finish)")
    assert len(finishes) == len(turns) and set(finishes) <= {"stop", "length", "cancelled"}, finishes
    screenshot(page, "transcription-done")


RECORD_REPLY_UPDATES = """() => {
  window.__updates = [];
  new MutationObserver(() => {
    const replies = document.querySelectorAll('#messages .message.assistant');
    const last = replies[replies.length - 1];
    if (!last || !last.classList.contains('streaming')) return;
    const text = last.querySelector('.body').textContent;
    if (window.__updates[window.__updates.length - 1] !== text) window.__updates.push(text);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


def _ask(page: Any, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def test_chat_reply_streams_in_pieces_shows_timings_and_stop_cancels(brook_server: RunningServer, page: Any) -> None:
    page.goto(brook_server.http + "/")
    page.wait_for_selector("#chat-model option", state="attached")
    page.evaluate(RECORD_REPLY_UPDATES)
    _ask(page, "Name three colours of the rainbow.")
    page.wait_for_selector("#messages .message.assistant[data-finish]", timeout=WAIT_MS)
    updates: list[str] = page.evaluate("window.__updates")
    non_empty = [u for u in updates if u.strip()]
    assert len(set(non_empty)) >= 3, updates
    meta = page.text_content("#messages .message.assistant .meta") or ""
    assert "TTFT" in meta and "tok/s" in meta, meta
    assert page.text_content("#chat-version") == "smollm2-135m-instruct v3"
    screenshot(page, "chat-reply")

    _ask(page, "Write a very long story about a lighthouse keeper, with many chapters.")
    page.wait_for_function("window.__updates.length > 0 && document.body.dataset.chat === 'streaming'"
                           " && document.querySelectorAll('#messages .message.assistant').length === 2"
                           " && document.querySelector('#messages .message.assistant:last-child .body').textContent"
                           ".length > 0", timeout=WAIT_MS)
    page.click("#stop")
    page.wait_for_selector("#messages .message.assistant:last-child[data-finish='cancelled']", timeout=WAIT_MS)
    assert "stopped" in (page.text_content("#messages .message.assistant:last-child .meta") or "")
    assert page.is_enabled("#send") and page.is_disabled("#stop")

    page.click("#reset")
    assert page.locator("#messages .message").count() == 0
    assert page.evaluate("document.activeElement.id") == "prompt"


def _record_chat_frames(page: Any) -> list[dict[str, Any]]:
    """Every JSON message the page sends on /v1/chat, in order."""
    sent: list[dict[str, Any]] = []

    def on_frame(payload: str | bytes) -> None:
        if isinstance(payload, str):
            sent.append(json.loads(payload))

    def on_websocket(socket: Any) -> None:
        if "/v1/chat" in socket.url:
            socket.on("framesent", on_frame)

    page.on("websocket", on_websocket)
    return sent


def _chat_turns(sent: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [frame for frame in sent if frame.get("type") == "chat"]


def test_reply_settings_are_sent_kept_across_reloads_and_token_probabilities_are_shown(
    brook_server: RunningServer, page: Any
) -> None:
    sent = _record_chat_frames(page)
    page.goto(brook_server.http + "/")
    page.wait_for_selector("#chat-model option", state="attached")
    page.click("#chat-settings summary")
    page.fill("#system-prompt", "You answer in one short sentence.")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "12")
    page.fill("#repetition-penalty", "1.2")
    page.check("#show-logprobs")
    _ask(page, "What colour is the sky on a clear day?")
    page.wait_for_selector("#messages .message.assistant[data-finish]", timeout=WAIT_MS)
    first = _chat_turns(sent)[0]
    assert first["messages"] == [{"role": "system", "content": "You answer in one short sentence."},
                                 {"role": "user", "content": "What colour is the sky on a clear day?"}]
    assert {key: first[key] for key in ("temperature", "top_p", "max_tokens", "repetition_penalty", "logprobs")} == {
        "temperature": 0, "top_p": 0.9, "max_tokens": 12, "repetition_penalty": 1.2, "logprobs": 5}
    assert "seed" not in first  # an empty box keeps the server's default
    reply = page.locator("#messages .message.assistant").last
    assert reply.get_attribute("data-finish") in {"stop", "length"}
    tokens = reply.locator(".body .tok")
    assert tokens.count() >= 1
    # Every piece of text is a span carrying the model's log-probability and its alternatives in the tooltip.
    pieces = tokens.evaluate_all("els => els.map(e => [e.textContent, e.dataset.logprob, e.title])")
    assert "".join(text for text, _, _ in pieces) == reply.locator(".body").text_content()
    for text, logprob, title in pieces:
        assert float(logprob) <= 0 and "%" in title and "best:" in title, (text, logprob, title)
    meta = reply.locator(".meta").text_content() or ""
    assert int(meta.split(" tokens")[0].split("· ")[-1]) <= 12, meta
    screenshot(page, "chat-probabilities")

    _ask(page, "And at night?")  # same conversation: the system prompt is not sent again
    page.wait_for_function("document.querySelectorAll('#messages .message.assistant[data-finish]').length === 2",
                           timeout=WAIT_MS)
    assert _chat_turns(sent)[1]["messages"] == [{"role": "user", "content": "And at night?"}]
    _ask(page, "Tell me a long story.")
    page.click("#reset")  # while that reply streams: its end arrives after the reset and must not count
    page.wait_for_function("document.body.dataset.chat === 'idle'", timeout=WAIT_MS)
    page.wait_for_timeout(1500)  # the dropped reply's done has arrived by now
    _ask(page, "Hello!")  # a new conversation starts with the system prompt again
    page.wait_for_selector("#messages .message.assistant[data-finish]", timeout=WAIT_MS)
    turns = _chat_turns(sent)
    assert turns[3]["messages"][0] == {"role": "system", "content": "You answer in one short sentence."}, turns

    page.reload()
    page.wait_for_selector("#chat-model option", state="attached")
    assert page.input_value("#temperature") == "0" and page.input_value("#max-tokens") == "12"
    assert page.input_value("#system-prompt") == "You answer in one short sentence."
    assert page.is_checked("#show-logprobs")
    # A value out of range is the server's to refuse: the reply shows its bad_message, naming the field.
    page.click("#chat-settings summary")
    page.fill("#top-p", "0")
    _ask(page, "Hello again!")
    page.wait_for_selector("#messages .message.assistant[data-finish='error']", timeout=WAIT_MS)
    error = page.locator("#messages .message.assistant .meta.error").text_content() or ""
    assert "bad_message" in error and "top_p" in error, error
    assert page.is_enabled("#send")
    page.click("#settings-defaults")
    assert page.input_value("#top-p") == "0.9" and page.input_value("#temperature") == "0.2"
    assert page.input_value("#system-prompt") == "" and not page.is_checked("#show-logprobs")
    page.reload()
    page.wait_for_selector("#chat-model option", state="attached")
    assert page.input_value("#top-p") == "0.9"


RECORD_BANNERS = """() => {
  window.__banners = [];
  new MutationObserver(() => {
    const banner = document.getElementById('banner');
    const text = document.getElementById('banner-text').textContent;
    if (!banner.hidden) window.__banners.push(banner.dataset.kind + ': ' + text);
  }).observe(document.getElementById('banner'), {subtree: true, childList: true, attributes: true,
                                                  characterData: true});
}"""


def test_dropped_chat_socket_reconnects_with_backoff_into_a_new_conversation(
    brook_server: RunningServer, page: Any
) -> None:
    """/v1/chat passes through to the real server; the test then drops both sides, as a crash or restart would."""
    connections: list[tuple[Any, Any]] = []

    def pass_through(ws: Any) -> None:
        connections.append((ws, ws.connect_to_server()))

    page.route_web_socket("**/v1/chat*", pass_through)
    page.goto(brook_server.http + "/")
    page.wait_for_selector("#chat-model option", state="attached")
    _ask(page, "Say hello.")
    page.wait_for_selector("#messages .message.assistant[data-finish]", timeout=WAIT_MS)
    assert len(connections) == 1
    page.evaluate(RECORD_BANNERS)

    page_side, server_side = connections[0]
    server_side.close()
    page_side.close(code=1011, reason="server went away")
    page.wait_for_selector("#messages .notice", timeout=WAIT_MS)
    banners: list[str] = page.evaluate("window.__banners")
    assert any(b.startswith("reconnecting: Chat connection lost. Reconnecting in") for b in banners), banners
    assert len(connections) == 2
    assert "new conversation" in (page.text_content("#messages .notice") or "")
    page.wait_for_selector("#banner", state="hidden")
    screenshot(page, "chat-reconnected")

    _ask(page, "Say goodbye.")
    page.wait_for_function("document.querySelectorAll('#messages .message.assistant[data-finish]').length === 2",
                           timeout=WAIT_MS)
    finishes = page.eval_on_selector_all("#messages .message.assistant", "els => els.map(e => e.dataset.finish)")
    assert set(finishes) <= {"stop", "length"}, finishes
    assert len(connections) == 2


def test_speech_started_cancels_a_streaming_reply_when_the_voice_assistant_is_on(
    brook_server: RunningServer, page: Any
) -> None:
    """Barge-in: both sockets are routed to fakes that speak the documented protocol, so the timing is the test's."""
    listen_routes: list[Any] = []
    chat_received: list[dict[str, Any]] = []

    def fake_listen(ws: Any) -> None:
        ws.on_message(lambda message: None)  # PCM from the fake microphone
        ws.send(json.dumps({"type": "ready", "session_id": "fake-listen", "model": "whisper-tiny-en", "version": 1,
                            "sample_rate": 16000, "encoding": "pcm_s16le", "interim_results": True,
                            "vad_silence_ms": 500}))
        listen_routes.append(ws)

    def fake_chat(ws: Any) -> None:
        def on_message(message: str | bytes) -> None:
            body = json.loads(message)
            chat_received.append(body)
            if body["type"] == "chat":  # a reply that streams until something stops it
                for piece in ["Once ", "upon ", "a ", "time"]:
                    ws.send(json.dumps({"type": "token", "text": piece}))
            elif body["type"] == "cancel":
                ws.send(json.dumps({"type": "done", "finish_reason": "cancelled",
                                    "usage": {"prompt_tokens": 5, "completion_tokens": 4, "cached_tokens": 0},
                                    "timings": {"ttft_ms": 10.0, "tokens_per_s": 40.0}}))

        ws.on_message(on_message)
        ws.send(json.dumps({"type": "ready", "session_id": "fake-chat", "model": "smollm2-135m-instruct",
                            "version": 1, "context_length": 2048}))

    page.route_web_socket("**/v1/listen*", fake_listen)
    page.route_web_socket("**/v1/chat*", fake_chat)
    page.goto(brook_server.http + "/")
    page.wait_for_selector("#chat-model option", state="attached")
    page.check("#assistant")
    page.click("#mic")
    page.wait_for_selector("body[data-listen='ready']", timeout=WAIT_MS)
    _ask(page, "Tell me a long story.")
    page.wait_for_function("document.body.dataset.chat === 'streaming' && document.querySelector("
                           "'#messages .message.assistant .body').textContent.includes('time')", timeout=WAIT_MS)
    assert [m["type"] for m in chat_received] == ["chat"]

    listen_routes[0].send(json.dumps({"type": "speech_started", "utterance": 0, "start": 1.2}))
    page.wait_for_selector("#messages .message.assistant[data-finish='cancelled']", timeout=WAIT_MS)
    assert [m["type"] for m in chat_received] == ["chat", "cancel"]
    assert chat_received[1] == {"type": "cancel"}
    assert page.get_attribute("#speech", "data-active") == "true"
    assert "stopped" in (page.text_content("#messages .message.assistant .meta") or "")
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    page.click("#mic")  # stop


def test_model_output_html_is_shown_as_text_never_executed(brook_server: RunningServer, page: Any) -> None:
    """The reply arrives over a routed /v1/chat that speaks the documented protocol but sends hostile text."""
    hostile = ["Look: ", "<img src=x onerror=\"window.__pwned=1\">", " and <script>window.__pwned=2</script> ",
               "**bold** and `code`"]

    def fake_chat(ws: Any) -> None:
        def on_message(message: str | bytes) -> None:
            if json.loads(message)["type"] != "chat":
                return
            for piece in hostile:
                ws.send(json.dumps({"type": "token", "text": piece}))
            ws.send(json.dumps({"type": "done", "finish_reason": "stop",
                                "usage": {"prompt_tokens": 5, "completion_tokens": 4, "cached_tokens": 0},
                                "timings": {"ttft_ms": 12.0, "tokens_per_s": 50.0, "draft_tokens": 5,
                                            "accepted_draft_tokens": 3}}))

        ws.on_message(on_message)
        ws.send(json.dumps({"type": "ready", "session_id": "fake", "model": "smollm2-135m-instruct", "version": 1,
                            "context_length": 2048}))

    page.route_web_socket("**/v1/chat*", fake_chat)
    page.goto(brook_server.http + "/")
    _ask(page, "say something nasty")
    page.wait_for_selector("#messages .message.assistant[data-finish='stop']", timeout=WAIT_MS)
    body = page.locator("#messages .message.assistant .body")
    assert body.locator("img, script").count() == 0
    assert '<img src=x onerror="window.__pwned=1">' in (body.text_content() or "")
    assert body.locator("strong").text_content() == "bold"
    assert body.locator("code").text_content() == "code"
    assert page.evaluate("window.__pwned") is None
    assert "3 confirmed from drafts" in (page.text_content("#messages .message.assistant .meta") or "")


def test_error_states_unauthorized_overloaded_and_unreachable_each_offer_retry(
    browser: Any, model_repository: ModelRepository
) -> None:
    require_models(model_repository, "whisper-tiny-en", "silero-vad")
    context = browser.new_context(viewport={"width": 390, "height": 844})  # phone-sized
    context.grant_permissions(["microphone"])
    page = context.new_page()
    try:
        with run_server(ARTIFACT_DIR / "logs", models="whisper-tiny-en,silero-vad", api_keys="right-key",
                        max_listen_sessions="1", idle_timeout_s="30") as server:
            page.goto(server.http + "/")
            # No key: the model list is refused and the banner says why.
            page.wait_for_selector("#banner:not([hidden])")
            assert "API key" in (page.text_content("#banner-text") or "")
            # A wrong key: the socket is accepted, gets `unauthorized`, is closed with 1008.
            page.fill("#api-key", "wrong-key")
            page.click("#mic")
            page.wait_for_selector("#banner[data-kind='unauthorized']:not([hidden])", timeout=WAIT_MS)
            assert "Unauthorized" in (page.text_content("#banner-text") or "")
            assert page.is_visible("#banner-retry")
            screenshot(page, "error-unauthorized-phone")
            # The right key, while another client holds the only listen session: 503 overloaded.
            page.fill("#api-key", "right-key")
            page.click("#key-form button")
            page.wait_for_selector("#listen-model option", state="attached")
            holder_url = f"{server.ws}/v1/listen?token=right-key"
            with connect(holder_url) as holder:
                assert json.loads(holder.recv(timeout=30))["type"] == "ready"
                page.click("#banner-retry") if page.is_visible("#banner-retry") else page.click("#mic")
                page.wait_for_selector("#banner[data-kind='overloaded']:not([hidden])", timeout=WAIT_MS)
                assert "capacity" in (page.text_content("#banner-text") or "")
                screenshot(page, "error-overloaded-phone")
            # The session is free again: Retry connects.
            page.click("#banner-retry")
            page.wait_for_selector("body[data-listen='ready']", timeout=WAIT_MS)
            page.wait_for_selector("#banner", state="hidden")
        # The server went away mid-stream (graceful shutdown closes with 1001): the page reconnects with backoff.
        page.wait_for_selector("#banner[data-kind='reconnecting']:not([hidden])", timeout=WAIT_MS)
        assert "Reconnecting" in (page.text_content("#banner-text") or "")
        screenshot(page, "error-reconnecting-phone")
        page.click("#mic")  # stop
        page.wait_for_selector("#banner", state="hidden")
        # The server is gone: starting again says it cannot be reached.
        page.click("#mic")
        page.wait_for_selector("#banner[data-kind='unreachable']:not([hidden])", timeout=WAIT_MS)
        assert "Cannot reach" in (page.text_content("#banner-text") or "")
        screenshot(page, "error-unreachable-phone")
    finally:
        context.close()


def test_stream_a_file_as_fast_as_possible_on_a_pinned_version(
    brook_server: RunningServer, page: Any, fake_microphone_wav: Path, model_repository: ModelRepository,
    speech_clips: dict[str, Path],
) -> None:
    page.goto(brook_server.http + "/")
    page.wait_for_selector("#listen-model option[value='whisper-tiny-en@1']", state="attached")
    page.select_option("#listen-model", "whisper-tiny-en@1")
    page.select_option("#pace", "fast")
    page.set_input_files("#file", str(fake_microphone_wav))
    page.wait_for_selector("body[data-listen='ended']", timeout=WAIT_MS)
    assert page.text_content("#listen-version") == "whisper-tiny-en v1"
    assert float(page.get_attribute("#streamed", "data-seconds") or 0) >= CLIP_SECONDS - 0.5
    finals: list[str] = page.eval_on_selector_all("#transcript li.final .text", "els => els.map(e => e.textContent)")
    wer = word_error_rate(offline_transcript(model_repository, speech_clips["telephone"]), " ".join(finals))
    assert wer <= MAX_BROWSER_WER, (wer, finals)
    # Audio sent far ahead of real time makes speech-to-partial latency meaningless, so the page hides it.
    assert page.is_hidden("#latency-stat")
    screenshot(page, "file-streamed")


def test_denied_microphone_says_so_and_offers_retry(brook_server: RunningServer, browser: Any) -> None:
    context = browser.new_context()
    # The fake-UI flag auto-accepts prompts, so the browser's refusal is stood in for at the API the page calls.
    context.add_init_script("navigator.mediaDevices.getUserMedia = () => "
                            "Promise.reject(new DOMException('Permission denied', 'NotAllowedError'));")
    page = context.new_page()
    try:
        page.goto(brook_server.http + "/")
        page.focus("#mic")
        page.keyboard.press("Enter")  # keyboard alone
        page.wait_for_selector("#banner[data-kind='microphone']:not([hidden])", timeout=WAIT_MS)
        assert "denied" in (page.text_content("#banner-text") or "")
        assert page.is_visible("#banner-retry")
        assert page.get_attribute("#mic", "aria-pressed") == "false"
        screenshot(page, "error-microphone-denied")
    finally:
        context.close()
