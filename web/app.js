// Brook demo page: a reference browser client for /v1/listen, /v1/chat and /v1/models (docs/protocol.md).
"use strict";

const $ = (id) => document.getElementById(id);
const STREAM_RATE_HZ = 16000;
const CHUNK_SECONDS = 0.1;
const BACKOFF_MS = [500, 1000, 2000, 4000, 8000];
const KEY_STORAGE = "brook.apiKey";
const SETTINGS_STORAGE = "brook.chatSettings";
const SETTING_INPUTS = ["system-prompt", "temperature", "top-p", "max-tokens", "repetition-penalty", "seed", "show-logprobs"];
const TOP_LOGPROBS = 5; // alternatives shown per token with "Show token probabilities"

// ---------- small helpers ----------
function escapeHtml(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

// Safe markdown: escape everything first, then add a tiny subset (code blocks, inline code, bold, paragraphs).
function renderMarkdown(source) {
  const parts = source.split(/```/);
  let html = "";
  parts.forEach((part, index) => {
    if (index % 2 === 1) {
      const body = part.replace(/^[\w+-]*\n/, "");
      html += `<pre><code>${escapeHtml(body)}</code></pre>`;
      return;
    }
    const paragraphs = part.split(/\n{2,}/).filter((p) => p.trim() !== "");
    for (const paragraph of paragraphs) {
      let inline = escapeHtml(paragraph.trim());
      inline = inline.replace(/`([^`\n]+)`/g, "<code>$1</code>");
      inline = inline.replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>");
      inline = inline.replace(/\n/g, "<br>");
      html += `<p>${inline}</p>`;
    }
  });
  return html;
}

function wsUrl(path, params) {
  const url = new URL(path, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  for (const [key, value] of Object.entries(params)) if (value !== "" && value != null) url.searchParams.set(key, value);
  const key = apiKey();
  if (key) url.searchParams.set("token", key);
  return url.toString();
}

function apiKey() { return $("api-key").value.trim(); }

function modelChoice(select) {
  const [model, version] = (select.value || "").split("@");
  return { model: model || undefined, version: version || undefined };
}

// Why a WebSocket closed before it opened: a browser cannot read the handshake's HTTP status, so ask over HTTP.
async function diagnoseHandshakeFailure() {
  try {
    const headers = apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {};
    const response = await fetch("/v1/models", { headers, cache: "no-store" });
    if (response.status === 401) return { code: "unauthorized", text: "The server needs a valid API key. Enter it above and retry." };
    return { code: "overloaded", text: "Brook is at capacity (HTTP 503: every session is in use). Retry in a few seconds." };
  } catch {
    return { code: "unreachable", text: "Cannot reach the Brook server. Is it running? Check the address and retry." };
  }
}

function describeError(message) {
  switch (message.code) {
    case "unauthorized": return "Unauthorized: the API key is missing or wrong. Enter it above and retry.";
    case "overloaded": return "Brook is overloaded right now. Retry in a few seconds.";
    case "unknown_model": return `Unknown model: ${message.message}`;
    case "idle_timeout": return "The connection was closed after a period of inactivity.";
    default: return `${message.code || "error"}: ${message.message || "something went wrong"}`;
  }
}

// ---------- banner ----------
let bannerRetry = null;
function showBanner(text, kind, retry) {
  $("banner-text").textContent = text;
  $("banner").dataset.kind = kind;
  $("banner").hidden = false;
  bannerRetry = retry || null;
  $("banner-retry").hidden = !retry;
}
function hideBanner() { $("banner").hidden = true; bannerRetry = null; }

// ---------- models ----------
async function loadModels() {
  try {
    const headers = apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {};
    const response = await fetch("/v1/models", { headers, cache: "no-store" });
    if (response.status === 401) {
      showBanner("Unauthorized: this server needs an API key. Enter it above.", "unauthorized", loadModels);
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const body = await response.json();
    fillModelSelect($("listen-model"), body.data.filter((m) => m.task === "speech-to-text"));
    fillModelSelect($("chat-model"), body.data.filter((m) => m.task === "text-generation"));
  } catch (error) {
    showBanner("Cannot reach the Brook server to list models. Is it running?", "unreachable", loadModels);
  }
}

const SERVABLE_STATES = new Set(["ready", "READY", "loaded"]);

function fillModelSelect(select, models) {
  const previous = select.value;
  select.replaceChildren();
  for (const model of models) {
    select.append(new Option(`${model.id} (A/B)`, model.id));
    for (const version of model.versions || []) {
      const cold = version.state === "not_loaded";  // the first session that pins it waits while the server loads it
      const label = `${model.id} v${version.version}${version.description ? " — " + version.description : ""}` +
        (cold ? " (loads on first use)" : "");
      const option = new Option(label, `${model.id}@${version.version}`);
      option.disabled = version.state !== undefined && !cold && !SERVABLE_STATES.has(version.state);
      select.append(option);
    }
  }
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
}

// ---------- live transcription ----------
const listen = {
  socket: null, audioContext: null, stream: null, node: null, source: null,
  active: false,       // the user wants audio streaming (mic or file)
  mode: null,          // "mic" | "file"
  samplesSent: 0, sentLog: [], queue: [], partialEl: null, reconnectAttempt: 0, reconnectTimer: null, fileAbort: false,
};

function setMicUi(on) {
  $("mic").setAttribute("aria-pressed", String(on));
  $("mic").setAttribute("aria-label", on ? "Stop microphone" : "Start microphone");
  $("mic").classList.toggle("on", on);
}

function setSpeech(active, label) {
  $("speech").dataset.active = String(active);
  $("speech-label").textContent = label;
}

function openListenSocket(reconnecting = false) {
  return new Promise((resolve) => {
    const { model, version } = modelChoice($("listen-model"));
    const socket = new WebSocket(wsUrl("/v1/listen", { model, version, sample_rate: STREAM_RATE_HZ, encoding: "pcm_s16le" }));
    socket.binaryType = "arraybuffer";
    let opened = false;
    let fatal = null;
    listen.socket = socket;
    document.body.dataset.listen = "connecting";
    socket.onopen = () => { opened = true; };
    socket.onmessage = (event) => {
      const message = JSON.parse(event.data);
      if (message.type === "ready") {
        listen.reconnectAttempt = 0;
        hideBanner();
        $("listen-version").hidden = false;
        $("listen-version").textContent = `${message.model} v${message.version}`;
        document.body.dataset.listen = "ready";
        resolve(true);
      } else if (message.type === "error") {
        fatal = message;
      } else {
        handleListenMessage(message);
      }
    };
    socket.onclose = async (event) => {
      if (listen.socket === socket) listen.socket = null;
      if (!opened) {
        const diagnosis = await diagnoseHandshakeFailure();
        if (reconnecting && diagnosis.code !== "unauthorized") { resolve(false); return; }
        stopCapture();
        document.body.dataset.listen = "error";
        showBanner(diagnosis.text, diagnosis.code, startMic);
        resolve(false);
        return;
      }
      if (fatal) {
        stopCapture();
        document.body.dataset.listen = "error";
        showBanner(describeError(fatal), fatal.code, startMic);
        resolve(false);
        return;
      }
      finishPartial();
      if (listen.active && listen.mode === "mic") scheduleListenReconnect();
      else document.body.dataset.listen = "ended";
      resolve(false);
    };
  });
}

function scheduleListenReconnect() {
  const attempt = listen.reconnectAttempt++;
  if (attempt >= BACKOFF_MS.length) {
    stopCapture();
    showBanner("The transcription connection dropped and could not be restored.", "dropped", startMic);
    return;
  }
  const delay = BACKOFF_MS[attempt];
  showBanner(`Connection lost. Reconnecting in ${(delay / 1000).toFixed(1)} s (attempt ${attempt + 1} of ${BACKOFF_MS.length})…`, "reconnecting", null);
  listen.reconnectTimer = setTimeout(async () => {
    listen.reconnectTimer = null;
    if (!listen.active) return;
    listen.samplesSent = 0;
    listen.sentLog = [];
    const ok = await openListenSocket(true);
    if (!ok && listen.active) scheduleListenReconnect();
  }, delay);
}

function transcriptList() {
  const list = $("transcript");
  const empty = list.querySelector(".empty");
  if (empty) empty.remove();
  return list;
}

function formatTime(seconds) {
  const minutes = Math.floor(seconds / 60);
  return `${minutes}:${(seconds - minutes * 60).toFixed(1).padStart(4, "0")}`;
}

function handleListenMessage(message) {
  if (message.type === "speech_started") {
    setSpeech(true, "Speech");
    if ($("assistant").checked && chat.streaming) cancelReply();
  } else if (message.type === "partial") {
    if (!listen.partialEl) {
      listen.partialEl = document.createElement("li");
      listen.partialEl.className = "partial";
      transcriptList().append(listen.partialEl);
    }
    listen.partialEl.textContent = message.text;
    showLatency(message.end);
    listen.partialEl.title = `${formatTime(message.start)}–${formatTime(message.end)} (partial)`;
    scrollToEnd($("transcript"));
  } else if (message.type === "final") {
    const line = listen.partialEl || document.createElement("li");
    listen.partialEl = null;
    line.className = "final";
    line.replaceChildren();
    const time = document.createElement("time");
    time.textContent = `${formatTime(message.start)}–${formatTime(message.end)}`;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = message.text;
    line.append(time, text);
    if (!line.isConnected) transcriptList().append(line);
    setSpeech(false, listen.active ? "Listening" : "Idle");
    scrollToEnd($("transcript"));
    if ($("assistant").checked && message.text.trim()) sendChat(message.text.trim());
  } else if (message.type === "end") {
    document.body.dataset.listen = "ended";
  }
}

function finishPartial() {
  if (listen.partialEl) { listen.partialEl.remove(); listen.partialEl = null; }
}

// Latency = now minus the moment the audio at `end` seconds left the page.
function showLatency(endSeconds) {
  const entry = listen.sentLog.find((e) => e.seconds >= endSeconds - 1e-3);
  if (!entry) return;
  const ms = performance.now() - entry.at;
  $("latency").textContent = `${Math.round(ms)} ms`;
}

function sendPcm(buffer) {
  const socket = listen.socket;
  if (!socket || socket.readyState !== WebSocket.OPEN) return;
  socket.send(buffer);
  listen.samplesSent += buffer.byteLength / 2;
  const seconds = listen.samplesSent / STREAM_RATE_HZ;
  listen.sentLog.push({ seconds, at: performance.now() });
  if (listen.sentLog.length > 600) listen.sentLog.splice(0, 100);
  $("streamed").textContent = `${seconds.toFixed(1)} s`;
  $("streamed").dataset.seconds = seconds.toFixed(2);
}

const MAX_QUEUED_CHUNKS = 100; // 10 s
function queuePcm(buffer) {
  const socket = listen.socket;
  if (!socket || socket.readyState !== WebSocket.OPEN || document.body.dataset.listen !== "ready") {
    listen.queue.push(buffer);
    if (listen.queue.length > MAX_QUEUED_CHUNKS) listen.queue.shift();
    return;
  }
  while (listen.queue.length) sendPcm(listen.queue.shift());
  sendPcm(buffer);
}

function showLevel(rms) {
  const percent = Math.min(100, Math.round(Math.sqrt(rms) * 160));
  $("level").style.width = `${percent}%`;
  document.querySelector(".meter").setAttribute("aria-valuenow", String(percent));
}

async function startMic() {
  hideBanner();
  if (listen.active) return;
  listen.active = true;
  listen.mode = "mic";
  $("latency-stat").hidden = false;
  setMicUi(true);
  setSpeech(false, "Connecting");
  try {
    listen.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: false },
    });
  } catch (error) {
    listen.active = false;
    setMicUi(false);
    setSpeech(false, "Idle");
    const denied = error && (error.name === "NotAllowedError" || error.name === "SecurityError");
    showBanner(denied
      ? "Microphone access was denied. Allow it in the browser's site settings, then retry."
      : `No microphone available (${error && error.name}). Connect one, or stream a file instead.`, "microphone", startMic);
    return;
  }
  listen.samplesSent = 0;
  listen.sentLog = [];
  listen.queue = [];
  // Capture starts before the socket is ready: early chunks wait in a queue so the first words are not lost.
  listen.audioContext = new AudioContext({ sampleRate: STREAM_RATE_HZ });
  await listen.audioContext.audioWorklet.addModule("audio-worklet.js");
  listen.source = listen.audioContext.createMediaStreamSource(listen.stream);
  listen.node = new AudioWorkletNode(listen.audioContext, "brook-capture");
  listen.node.port.onmessage = (event) => { queuePcm(event.data.pcm); showLevel(event.data.rms); };
  listen.source.connect(listen.node);
  const ok = await openListenSocket();
  if (!ok || !listen.active) return;
  setSpeech(false, "Listening");
}

function stopCapture() {
  listen.active = false;
  listen.fileAbort = true;
  if (listen.reconnectTimer) { clearTimeout(listen.reconnectTimer); listen.reconnectTimer = null; }
  if (listen.node) { listen.node.port.onmessage = null; listen.node.disconnect(); listen.node = null; }
  if (listen.source) { listen.source.disconnect(); listen.source = null; }
  if (listen.audioContext) { listen.audioContext.close(); listen.audioContext = null; }
  if (listen.stream) { listen.stream.getTracks().forEach((t) => t.stop()); listen.stream = null; }
  setMicUi(false);
  setSpeech(false, "Idle");
  showLevel(0);
}

// Stop streaming and ask the server to flush: it sends the last final, then `end`, then closes.
function stopMic() {
  const socket = listen.socket;
  stopCapture();
  if ($("banner").dataset.kind === "reconnecting") hideBanner();
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "end" }));
}

async function streamFile(file) {
  if (listen.active) stopMic();
  hideBanner();
  let samples;
  try {
    const decoder = new OfflineAudioContext(1, 1, STREAM_RATE_HZ);
    const decoded = await decoder.decodeAudioData(await file.arrayBuffer());
    samples = new Float32Array(decoded.length);
    for (let c = 0; c < decoded.numberOfChannels; c++) {
      const channel = decoded.getChannelData(c);
      for (let i = 0; i < channel.length; i++) samples[i] += channel[i] / decoded.numberOfChannels;
    }
  } catch (error) {
    showBanner(`This file could not be decoded as audio (${file.name}).`, "file", null);
    return;
  }
  listen.active = true;
  listen.mode = "file";
  listen.fileAbort = false;
  // At full speed the audio leaves far ahead of real time, so speech-to-partial latency means nothing: hide it.
  const realtime = $("pace").value === "realtime";
  $("latency-stat").hidden = !realtime;
  listen.samplesSent = 0;
  listen.sentLog = [];
  setSpeech(false, "Connecting");
  if (!(await openListenSocket())) return;
  setSpeech(false, "Streaming file");
  const chunk = Math.round(STREAM_RATE_HZ * CHUNK_SECONDS);
  const started = performance.now();
  for (let offset = 0; offset < samples.length && !listen.fileAbort; offset += chunk) {
    const slice = samples.subarray(offset, offset + chunk);
    const pcm = new Int16Array(slice.length);
    let sum = 0;
    for (let i = 0; i < slice.length; i++) {
      const v = Math.max(-1, Math.min(1, slice[i]));
      pcm[i] = v < 0 ? v * 0x8000 : v * 0x7fff;
      sum += v * v;
    }
    sendPcm(pcm.buffer);
    showLevel(Math.sqrt(sum / Math.max(1, slice.length)));
    const due = realtime ? started + ((offset + chunk) / STREAM_RATE_HZ) * 1000 : 0;
    while (listen.socket && listen.socket.bufferedAmount > 1 << 20) await new Promise((r) => setTimeout(r, 20));
    const wait = due - performance.now();
    await new Promise((r) => setTimeout(r, Math.max(0, wait)));
  }
  const socket = listen.socket;
  listen.active = false;
  showLevel(0);
  setSpeech(false, "Idle");
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify({ type: "end" }));
}

// ---------- chat ----------
const chat = {
  socket: null, streaming: false, reply: null, text: "", sentAt: 0, firstTokenAt: 0, tokens: 0,
  pending: null, reconnectAttempt: 0, reconnectTimer: null, dropped: false, queued: [],
  started: false, // the server's conversation has a turn: the system prompt goes only with the first one
  showProbabilities: false, // the streaming reply asked for logprobs and is drawn token by token
};

// ---------- reply settings (docs/protocol.md, WS /v1/chat: the sampling fields) ----------
function numberSetting(id) {
  const raw = $(id).value.trim();
  const value = Number(raw);
  return raw === "" || !Number.isFinite(value) ? undefined : value;
}

// The sampling fields of the next turn. An empty box keeps the server's default; a value out of range is sent as it
// is, and the server's bad_message says which one.
function replySettings() {
  const fields = {
    temperature: numberSetting("temperature"),
    top_p: numberSetting("top-p"),
    max_tokens: numberSetting("max-tokens"),
    repetition_penalty: numberSetting("repetition-penalty"),
    seed: numberSetting("seed"),
    logprobs: $("show-logprobs").checked ? TOP_LOGPROBS : undefined,
  };
  return Object.fromEntries(Object.entries(fields).filter(([, value]) => value !== undefined));
}

function saveSettings() {
  const values = {};
  for (const id of SETTING_INPUTS) values[id] = $(id).type === "checkbox" ? $(id).checked : $(id).value;
  localStorage.setItem(SETTINGS_STORAGE, JSON.stringify(values));
}

function restoreSettings() {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || "{}") || {}; } catch { saved = {}; }
  for (const id of SETTING_INPUTS) {
    if (!(id in saved)) continue;
    if ($(id).type === "checkbox") $(id).checked = Boolean(saved[id]); else $(id).value = String(saved[id]);
  }
}

function defaultSettings() {
  for (const id of SETTING_INPUTS) {
    const input = $(id);
    if (input.type === "checkbox") input.checked = input.defaultChecked; else input.value = input.defaultValue;
  }
  saveSettings();
}

function scrollToEnd(element) { element.scrollTop = element.scrollHeight; }

function messagesBox() {
  const box = $("messages");
  const empty = box.querySelector(".empty");
  if (empty) empty.remove();
  return box;
}

function addMessage(role, text) {
  const item = document.createElement("article");
  item.className = `message ${role}`;
  const body = document.createElement("div");
  body.className = "body";
  if (role === "user") body.textContent = text; else body.innerHTML = renderMarkdown(text);
  item.append(body);
  messagesBox().append(item);
  scrollToEnd($("messages"));
  return item;
}

function setStreaming(on) {
  chat.streaming = on;
  $("stop").disabled = !on;
  $("send").disabled = on;
  document.body.dataset.chat = on ? "streaming" : "idle";
}

// `quiet`: a background reconnect attempt, whose failure schedules the next attempt instead of a banner.
function connectChat(quiet = false) {
  if (chat.reconnectTimer) { clearTimeout(chat.reconnectTimer); chat.reconnectTimer = null; }
  if (chat.socket) { const old = chat.socket; chat.socket = null; old.close(); }
  return new Promise((resolve) => {
    const { model, version } = modelChoice($("chat-model"));
    const socket = new WebSocket(wsUrl("/v1/chat", { model, version }));
    let opened = false;
    let fatal = null;
    chat.socket = socket;
    socket.onopen = () => { opened = true; };
    socket.onmessage = (event) => {
      const message = JSON.parse(event.data);
      if (message.type === "ready") {
        chat.started = false; // a new socket is a new conversation
        chat.reconnectAttempt = 0;
        hideBanner();
        $("chat-version").hidden = false;
        $("chat-version").textContent = `${message.model} v${message.version}`;
        if (chat.dropped) {
          chat.dropped = false;
          showChatNotice("Reconnected. This is a new conversation: the server no longer has the earlier turns.");
        }
        resolve(true);
      } else if (message.type === "token") {
        onToken(message);
      } else if (message.type === "done") {
        onDone(message);
      } else if (message.type === "error") {
        if (message.code === "context_exceeded" || message.code === "bad_message") {
          if (chat.reply) failReply(describeError(message));
        } else {
          fatal = message;
        }
      }
    };
    socket.onclose = async () => {
      // A socket the page replaced or closed on purpose (new key, other model) is not a drop.
      const current = chat.socket === socket;
      if (current) chat.socket = null;
      if (chat.reply && !chat.socket) failReply("The reply was interrupted: the connection dropped.");
      if (!current) { resolve(false); return; }
      if (!opened) {
        const diagnosis = await diagnoseHandshakeFailure();
        if (quiet && diagnosis.code !== "unauthorized") { resolve(false); return; }
        showBanner(diagnosis.text, diagnosis.code, retryChat);
        resolve(false);
      } else if (fatal) {
        showBanner(describeError(fatal), fatal.code, retryChat);
        resolve(false);
      } else {
        // Dropped after it worked: the server's conversation is gone; reconnect with backoff.
        chat.dropped = true;
        resolve(false);
        scheduleChatReconnect();
      }
    };
  });
}

// Reconnect a dropped chat socket with backoff, like the listen socket.
function scheduleChatReconnect() {
  const attempt = chat.reconnectAttempt++;
  if (attempt >= BACKOFF_MS.length) {
    chat.reconnectAttempt = 0;
    showBanner("The chat connection dropped and could not be restored.", "dropped", retryChat);
    return;
  }
  const delay = BACKOFF_MS[attempt];
  showBanner(`Chat connection lost. Reconnecting in ${(delay / 1000).toFixed(1)} s (attempt ${attempt + 1} of ${BACKOFF_MS.length})…`, "reconnecting", null);
  chat.reconnectTimer = setTimeout(async () => {
    chat.reconnectTimer = null;
    if (chat.socket) return; // already reconnected, e.g. by sending a message
    const ok = await connectChat(true);
    if (!ok && !chat.socket && !chat.reconnectTimer && $("banner").dataset.kind !== "unauthorized") scheduleChatReconnect();
  }, delay);
}

function showChatNotice(text) {
  const notice = document.createElement("p");
  notice.className = "notice";
  notice.setAttribute("role", "status");
  notice.textContent = text;
  messagesBox().append(notice);
  scrollToEnd($("messages"));
}

// Close the chat socket on purpose (new key, other model): no reconnect.
function closeChat() {
  const socket = chat.socket;
  chat.socket = null;
  if (chat.reconnectTimer) { clearTimeout(chat.reconnectTimer); chat.reconnectTimer = null; }
  chat.reconnectAttempt = 0;
  if (socket) socket.close();
}

function retryChat() {
  hideBanner();
  if (chat.pending) { const text = chat.pending; chat.pending = null; sendChat(text); } else connectChat();
}

async function sendChat(text) {
  if (chat.streaming) {
    // A voice-assistant turn while a reply streams: stop the reply, then send the new turn.
    chat.queued.push(text);
    cancelReply();
    return;
  }
  if (!chat.socket || chat.socket.readyState !== WebSocket.OPEN) {
    chat.pending = text;
    const ok = await connectChat();
    if (!ok) return;
    chat.pending = null;
  }
  addMessage("user", text);
  chat.reply = addMessage("assistant", "");
  chat.reply.classList.add("streaming");
  chat.text = "";
  chat.tokens = 0;
  chat.sentAt = performance.now();
  chat.firstTokenAt = 0;
  setStreaming(true);
  const settings = replySettings();
  chat.showProbabilities = "logprobs" in settings;
  const messages = [{ role: "user", content: text }];
  const system = $("system-prompt").value.trim();
  if (system && !chat.started) messages.unshift({ role: "system", content: system });
  chat.socket.send(JSON.stringify({ type: "chat", messages, ...settings }));
}

function onToken(message) {
  if (!chat.reply) return;
  if (!chat.firstTokenAt) chat.firstTokenAt = performance.now();
  chat.tokens++;
  chat.text += message.text;
  const body = chat.reply.querySelector(".body");
  if (chat.showProbabilities) appendTokenSpan(body, message.text, message.logprobs || []);
  else body.innerHTML = renderMarkdown(chat.text);
  scrollToEnd($("messages"));
}

const percent = (logprob) => `${(100 * Math.exp(logprob)).toFixed(1)}%`;

// A token event's text as one span, shaded by how unsure the model was of its least likely token, with every token
// and its best alternatives in the tooltip (token.logprobs in docs/protocol.md). Plain text, no markdown.
function appendTokenSpan(body, text, entries) {
  body.classList.add("tokens");
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  if (entries.length) {
    const least = Math.min(...entries.map((entry) => entry.logprob));
    span.dataset.logprob = least.toFixed(4);
    span.style.setProperty("--unsure", (0.6 * (1 - Math.exp(least))).toFixed(3));
    span.title = entries.map((entry) => {
      const others = (entry.top || []).map((top) => `${JSON.stringify(top.token)} ${percent(top.logprob)}`);
      return `${JSON.stringify(entry.token)} ${percent(entry.logprob)}` + (others.length ? `\n  best: ${others.join(", ")}` : "");
    }).join("\n");
  }
  body.append(span);
}

function onDone(message) {
  const reply = chat.reply;
  chat.reply = null;
  setStreaming(false);
  if (!reply) return; // the end of a reply that "New chat" dropped: its conversation is gone
  chat.started = true; // even a cancelled reply leaves its turn in the conversation
  reply.classList.remove("streaming");
  const timings = message.timings || {};
  const ttft = timings.ttft_ms ?? (chat.firstTokenAt ? chat.firstTokenAt - chat.sentAt : null);
  const rate = timings.tokens_per_s ?? null;
  const meta = document.createElement("footer");
  meta.className = "meta";
  const parts = [];
  if (ttft != null) parts.push(`TTFT ${Math.round(ttft)} ms`);
  if (rate != null) parts.push(`${rate.toFixed(1)} tok/s`);
  if (message.usage) parts.push(`${message.usage.completion_tokens} tokens`);
  if (timings.accepted_draft_tokens) parts.push(`${timings.accepted_draft_tokens} confirmed from drafts`);
  if (message.finish_reason === "cancelled") parts.push("stopped");
  else if (message.finish_reason === "length") parts.push("cut at max tokens");
  meta.textContent = parts.join(" · ");
  reply.dataset.finish = message.finish_reason;
  reply.append(meta);
  if (!chat.text) reply.querySelector(".body").innerHTML = "<p class=\"muted\">(no text)</p>";
  sendQueued();
}

function sendQueued() {
  if (chat.queued.length && !chat.streaming) sendChat(chat.queued.shift());
}

function failReply(text) {
  const reply = chat.reply;
  chat.reply = null;
  setStreaming(false);
  if (!reply) return;
  reply.classList.remove("streaming");
  reply.dataset.finish = "error";
  const meta = document.createElement("footer");
  meta.className = "meta error";
  meta.textContent = text;
  reply.append(meta);
  chat.queued = [];
}

function cancelReply() {
  if (chat.streaming && chat.socket && chat.socket.readyState === WebSocket.OPEN) {
    chat.socket.send(JSON.stringify({ type: "cancel" }));
  }
}

function resetChat() {
  if (chat.socket && chat.socket.readyState === WebSocket.OPEN) chat.socket.send(JSON.stringify({ type: "reset" }));
  chat.started = false;
  chat.queued = [];
  if (chat.reply) { chat.reply = null; setStreaming(false); }
  $("messages").innerHTML = "<p class=\"empty\">New conversation. Ask something.</p>";
  $("prompt").focus();
}

// ---------- wiring ----------
function init() {
  $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(KEY_STORAGE, apiKey());
    closeChat();
    hideBanner();
    loadModels();
  });
  $("banner-retry").addEventListener("click", () => { const retry = bannerRetry; hideBanner(); if (retry) retry(); });
  $("banner-close").addEventListener("click", hideBanner);
  $("mic").addEventListener("click", () => (listen.active && listen.mode === "mic" ? stopMic() : startMic()));
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) streamFile(file);
    event.target.value = "";
  });
  $("listen-model").addEventListener("change", () => { if (listen.active) { stopMic(); startMic(); } });
  $("chat-model").addEventListener("change", closeChat);
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || chat.streaming) return;
    $("prompt").value = "";
    sendChat(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("stop").addEventListener("click", cancelReply);
  $("reset").addEventListener("click", resetChat);
  restoreSettings();
  for (const id of SETTING_INPUTS) for (const type of ["input", "change"]) $(id).addEventListener(type, saveSettings);
  $("settings-defaults").addEventListener("click", defaultSettings);
  document.body.dataset.listen = "idle";
  document.body.dataset.chat = "idle";
  loadModels();
}

window.brook = { renderMarkdown };
document.addEventListener("DOMContentLoaded", init);
