"""What the text endpoints (`WS /v1/chat` and the OpenAI routes) share: wire sampling fields to engine parameters,
token log-probabilities to wire objects, and the metrics of a finished generation."""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from typing import Any

from app.engine.text_events import GenerationDone
from app.protocol import SamplingFields
from app.server.metrics import Metrics
from app.text.sampling import SamplingParams, TokenLogprob


def sampling_params(fields: SamplingFields) -> SamplingParams:
    """Wire sampling fields → engine params; unset fields keep the engine's defaults."""
    values: dict[str, Any] = {
        "temperature": fields.temperature, "top_p": fields.top_p, "top_k": fields.top_k, "seed": fields.seed,
        "max_tokens": fields.max_tokens, "presence_penalty": fields.presence_penalty,
        "frequency_penalty": fields.frequency_penalty, "repetition_penalty": fields.repetition_penalty,
    }
    params = SamplingParams(
        **{k: v for k, v in values.items() if v is not None},
        stop=fields.stop,
        ignore_eos=fields.ignore_eos,
        prediction=fields.prediction,
        logit_bias=fields.logit_bias,
        logprobs=fields.logprobs,
    )
    return params


def record_generation(metrics: Metrics, model: str, version: int, done: GenerationDone) -> None:
    """Count a finished generation's tokens: generated, and prompt tokens split into cached and prefilled."""
    labels = (model, str(version))
    metrics.tokens_out.labels(*labels).inc(done.usage.completion_tokens)
    metrics.prompt_tokens.labels(*labels, "cached").inc(done.usage.cached_tokens)
    metrics.prompt_tokens.labels(*labels, "prefilled").inc(done.usage.prompt_tokens - done.usage.cached_tokens)


def token_text(raw: bytes) -> str:
    """A token's bytes as text for log-probabilities: UTF-8, with U+FFFD for a partial character."""
    return raw.decode("utf-8", errors="replace")


def logprob_entries(
    logprobs: Sequence[TokenLogprob], token_bytes: Callable[[int], bytes], *, openai: bool
) -> list[dict[str, Any]]:
    """Token log-probabilities as wire objects: OpenAI's ``{"token", "logprob", "bytes", "top_logprobs"}``, or
    Brook's ``{"id", "token", "logprob", "top": [{"id", "token", "logprob"}]}`` (docs/protocol.md)."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        raw = token_bytes(token_id)
        text = token_text(raw)
        if openai:
            return {"token": text, "logprob": logprob, "bytes": list(raw)}
        return {"id": token_id, "token": text, "logprob": logprob}

    entries = []
    for item in logprobs:
        top = [entry(token_id, logprob) for token_id, logprob in item.top]
        entries.append({**entry(item.token_id, item.logprob), ("top_logprobs" if openai else "top"): top})
    return entries


class CompletionLogprobs:
    """OpenAI's legacy ``logprobs`` object of a ``/v1/completions`` choice, built piece by piece as the text streams:
    ``tokens``, ``token_logprobs``, ``top_logprobs`` (at each position the best tokens and the chosen one, text →
    log-probability) and ``text_offset`` (the character of the choice's text where each token's text starts; the
    tokens of one character that spans several all start at that character)."""

    def __init__(self, token_bytes: Callable[[int], bytes], offset: int = 0) -> None:
        self._token_bytes = token_bytes
        self.offset = offset  # characters of the choice's text before the next piece

    def take(self, text: str, logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
        """The object for the next piece of the choice's ``text`` and the tokens that make it up."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        characters = 0
        body: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for item in logprobs:
            raw = self._token_bytes(item.token_id)
            token = token_text(raw)
            body["tokens"].append(token)
            body["token_logprobs"].append(item.logprob)
            best = {token_text(self._token_bytes(token_id)): logprob for token_id, logprob in item.top}
            best.setdefault(token, item.logprob)  # OpenAI: up to `logprobs` + 1 entries, the chosen token included
            body["top_logprobs"].append(best)
            body["text_offset"].append(self.offset + min(characters, len(text)))
            characters += len(decoder.decode(raw))
        self.offset += len(text)
        return body
