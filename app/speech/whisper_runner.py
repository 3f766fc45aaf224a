"""Run a converted Whisper model (``encoder.onnx`` + ``decoder.onnx``) on onnxruntime: numpy in, numpy out.

``encode`` maps log-mel windows [batch, n_mels, frames] to the cross-attention keys and values of every decoder
layer. ``decode`` runs batched greedy decoding over several windows at once: each prompt is fed in one decoder
call, then one token per row per call. Rows that reach EOT or their token limit stop sampling; the caches are
compacted (``np.take`` of the still-running rows) only once at most half of the batch rows are still running, so a
batch whose rows finish one by one pays a logarithmic number of cache copies instead of one per finished row
(copying the cross-attention caches of a 16-row, 10 s batch cost a quarter of its decoding time). Finished rows
left in the batch keep being fed EOT and their outputs are ignored (rows do not interact: each row's tokens are
those it gets alone, up to the rounding of batched matrix products). Prompts are batched together only when they
have the same length, because the decoder shares positions across rows; other lengths run as separate groups.

Drafts (``decode(drafts=...)``): the last tokens of a prompt may be a guess at the row's first sampled tokens (a
streaming partial's draft: what earlier partials of the utterance read). They are fed with the prompt in one call
that returns the logits of every draft position, and each draft token is kept only while it is what greedy
decoding picks there (the same masking rules, the same loop stop); decoding goes on from the first position where
it is not, with the cache rolled back to it. A group's rows roll back to the shortest accepted prefix among them
(a longer accepted prefix is decoded again token by token, to the same tokens), so the rows keep sharing calls.
The result is greedy decoding's, whatever the draft; a good draft saves one decoder call per accepted token.

The runner knows nothing about requests or sessions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnxruntime as ort

from app.errors import ModelError
from app.ort_session import create_session
from app.speech.beam_search import beam_search
from app.speech.decoding import DecodingRules, average_logprob, mask_logits, no_speech_probability, pick_tokens
from app.speech.tokenizer import WhisperTokenizer

logger = logging.getLogger(__name__)

ENCODER_FILE: Final = "encoder.onnx"
DECODER_FILE: Final = "decoder.onnx"
ENCODER_INPUTS: Final = ("mel",)
ENCODER_OUTPUTS: Final = ("cross_k", "cross_v")
DECODER_INPUTS: Final = ("tokens", "n_logits", "self_k", "self_v", "cross_k", "cross_v")
DECODER_OUTPUTS: Final = ("logits", "new_self_k", "new_self_v")
_NUMPY_BY_ORT_TYPE: Final[dict[str, type[np.floating[Any]]]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
}


@dataclass(frozen=True)
class EncoderOutput:
    """Cross-attention keys and values for a batch of windows, each [n_layers, batch, n_heads, ctx, head_dim]."""

    cross_k: np.ndarray
    cross_v: np.ndarray

    @property
    def batch_size(self) -> int:
        return int(self.cross_k.shape[1])

    def select(self, rows: Sequence[int]) -> EncoderOutput:
        """The rows ``rows`` of the batch, in that order (a copy)."""
        index = np.asarray(rows, dtype=np.int64)
        return EncoderOutput(np.take(self.cross_k, index, axis=1), np.take(self.cross_v, index, axis=1))


@dataclass(frozen=True)
class DecodeResult:
    """The decoding of one window (greedy or the best beam)."""

    tokens: list[int]  # sampled tokens, timestamps included, EOT excluded
    sum_logprob: float  # log-probabilities of every sampled token, the EOT step included
    avg_logprob: float  # sum_logprob / (len(tokens) + 1), as faster-whisper reports it
    no_speech_prob: float  # P(<|nospeech|>) at the start-of-transcript position
    text: str  # text of the text tokens
    reached_eot: bool  # False when the token limit stopped the row
    drafted: int = 0  # leading tokens taken from the prompt's draft (verified, not decoded one by one)


@dataclass(frozen=True)
class LoopStop:
    """Stop a row once its sampled tokens end in ``copies`` back-to-back copies of one n-gram of at most
    ``max_ngram`` tokens: Whisper on short windows can loop until the token limit, and every extra step of the
    looping row costs a decoder call; the engine collapses such runs to one copy afterwards anyway."""

    copies: int = 4
    max_ngram: int = 16

    def ends_in_loop(self, tokens: Sequence[int]) -> bool:
        for size in range(1, self.max_ngram + 1):
            span = size * self.copies
            if span > len(tokens):
                return False
            gram = tokens[len(tokens) - size :]
            if all(
                tokens[len(tokens) - (copy + 1) * size : len(tokens) - copy * size] == gram
                for copy in range(1, self.copies)
            ):
                return True
        return False


class WhisperRunner:
    """The two onnxruntime sessions of one converted Whisper model, plus its tokenizer."""

    def __init__(self, model_dir: Path, config: Mapping[str, Any], *, intra_op_threads: int = 2) -> None:
        self.config = dict(config)
        self.model_dir = model_dir
        for name in (ENCODER_FILE, DECODER_FILE):
            if not (model_dir / name).is_file():
                raise ModelError(f"expected {name} in {model_dir}, found {sorted(p.name for p in model_dir.iterdir())}")
        # No arena for the encoder: it would keep the activations of the largest batch ever encoded resident (~77 MB
        # per 30 s window; +611 MB after a batch of 8 in-process), measured in the mixed-load run (docs/benchmarks.md).
        self._encoder = create_session(model_dir / ENCODER_FILE, intra_op_threads, enable_memory_arena=False)
        self._decoder = create_session(model_dir / DECODER_FILE, intra_op_threads)
        _check_io(self._encoder, ENCODER_FILE, ENCODER_INPUTS, ENCODER_OUTPUTS)
        _check_io(self._decoder, DECODER_FILE, DECODER_INPUTS, DECODER_OUTPUTS)
        self._mel_dtype = _input_dtype(self._encoder, "mel")
        self._cache_dtype = _input_dtype(self._decoder, "self_k")
        self.n_layers = int(config["n_layers"])
        self.n_heads = int(config["n_heads"])
        self.head_dim = int(config["head_dim"])
        self.n_text_ctx = int(config["n_text_ctx"])
        self.max_frames = int(config["max_frames"])
        self.sot = int(config["sot"])
        self.no_timestamps = int(config["no_timestamps"])
        # converter version 5 on: the cross caches may hold one row per window for its consecutive (beam) rows
        self.shares_cross_attention = bool(config.get("shared_cross_attention", False))
        self.tokenizer = WhisperTokenizer.from_file(
            model_dir / str(config.get("tokenizer", "tokenizer.json")), eot=int(config["eot"])
        )

    def encode(self, mel: np.ndarray) -> EncoderOutput:
        """Encode log-mel windows [batch, n_mels, frames] (frames even, at most ``max_frames``)."""
        n_mels = int(self.config["n_mels"])
        if mel.ndim != 3 or mel.shape[1] != n_mels:
            raise ValueError(f"expected mel [batch, {n_mels}, frames], got shape {mel.shape}")
        if mel.shape[2] % 2 or not 0 < mel.shape[2] <= self.max_frames:
            raise ValueError(f"expected an even frame count in 2..{self.max_frames}, got {mel.shape[2]}")
        feed = {"mel": np.ascontiguousarray(mel, dtype=self._mel_dtype)}
        cross_k, cross_v = self._encoder.run(list(ENCODER_OUTPUTS), feed)
        return EncoderOutput(cross_k, cross_v)

    def default_max_new_tokens(self, prompt_length: int) -> int:
        """CTranslate2's limit for faster-whisper's ``max_length=448``: min(448 // 2, 448 - (prompt_length - 1))."""
        return min(self.n_text_ctx // 2, self.n_text_ctx - (prompt_length - 1))

    def decode(
        self,
        encoder_output: EncoderOutput,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int | Sequence[int] | None = None,
        rules: DecodingRules | None = None,
        loop_stop: LoopStop | None = None,
        drafts: Sequence[int] | None = None,
        beam_size: int = 1,
    ) -> list[DecodeResult]:
        """Greedy-decode row ``i`` of ``encoder_output`` from ``prompts[i]``; one result per prompt, in order.

        Each prompt is ``[<|startofprev|>, previous..., ] <|startoftranscript|> [language, task, notimestamps]``,
        followed by ``drafts[i]`` draft tokens (default 0): a guess at the first sampled tokens, kept as far as greedy
        decoding agrees with it (module docstring); the result's ``tokens`` start with the kept part.
        ``max_new_tokens`` caps the sampled tokens (EOT and kept draft tokens included), for all rows or per row; by
        default CTranslate2's limit for the prompt's length. ``rules`` defaults to the config's rules, with
        timestamps unless the prompt (before its draft) ends with ``<|notimestamps|>``. ``loop_stop`` (off by
        default, so offline transcription is unchanged) stops a row as soon as its tokens end in a loop
        (``reached_eot`` is then False, as at the token limit). ``beam_size`` > 1 decodes with beam search instead
        (``app.speech.beam_search``; no drafts then).
        """
        if beam_size > 1 and drafts is not None and any(drafts):
            raise ValueError("drafts are for greedy decoding; beam search decodes without them")
        if len(prompts) != encoder_output.batch_size:
            raise ValueError(f"expected {encoder_output.batch_size} prompts (one per window), got {len(prompts)}")
        draft_lengths = [0] * len(prompts) if drafts is None else [int(length) for length in drafts]
        if len(draft_lengths) != len(prompts):
            raise ValueError(f"expected {len(prompts)} draft lengths (one per prompt), got {len(draft_lengths)}")
        groups: dict[tuple[int, int, int], list[int]] = {}
        for row, (prompt, draft_length) in enumerate(zip(prompts, draft_lengths, strict=True)):
            if self.sot not in prompt:
                raise ValueError(f"prompt {row} has no <|startoftranscript|> ({self.sot}): {list(prompt)[:8]}...")
            sot_index = list(prompt).index(self.sot)
            if not 0 <= draft_length < len(prompt) - sot_index:
                raise ValueError(f"prompt {row}: a draft of {draft_length} tokens must follow its start of transcript")
            groups.setdefault((len(prompt), sot_index, draft_length), []).append(row)
        if isinstance(max_new_tokens, Sequence) and len(max_new_tokens) != len(prompts):
            raise ValueError(f"expected {len(prompts)} token limits (one per prompt), got {len(max_new_tokens)}")
        results: dict[int, DecodeResult] = {}
        for (prompt_length, _, draft_length), rows in groups.items():
            group_prompts = [list(prompts[row]) for row in rows]
            group_encoder = encoder_output if len(rows) == len(prompts) else encoder_output.select(rows)
            default = self.default_max_new_tokens(prompt_length - draft_length)
            if max_new_tokens is None:
                limits = [default] * len(rows)
            elif isinstance(max_new_tokens, Sequence):
                limits = [int(max_new_tokens[row]) for row in rows]
            else:
                limits = [int(max_new_tokens)] * len(rows)
            group_results = self._decode_group(
                group_encoder, group_prompts, limits, rules, loop_stop, draft_length, beam_size
            )
            results.update(zip(rows, group_results, strict=True))
        return [results[row] for row in range(len(prompts))]

    def _decode_group(
        self,
        encoder_output: EncoderOutput,
        prompts: list[list[int]],
        limits: list[int],
        rules: DecodingRules | None,
        loop_stop: LoopStop | None = None,
        draft_length: int = 0,
        beam_size: int = 1,
    ) -> list[DecodeResult]:
        """Decode prompts of equal length with the SOT at the same index, each ending in ``draft_length`` draft
        tokens; row ``i`` samples at most ``limits[i]``."""
        prompt_length = len(prompts[0])
        fixed_length = prompt_length - draft_length  # the prompt without its draft
        for limit in limits:
            if limit < 1 or fixed_length + limit - 1 > self.n_text_ctx:
                raise ValueError(
                    f"{limit} new tokens after a {fixed_length}-token prompt exceed {self.n_text_ctx} positions"
                )
        if rules is None:
            rules = DecodingRules.from_config(
                self.config, with_timestamps=prompts[0][fixed_length - 1] != self.no_timestamps
            )
        sot_index = prompts[0].index(self.sot)
        batch = len(prompts)
        cross_k, cross_v = encoder_output.cross_k, encoder_output.cross_v
        empty = np.zeros((self.n_layers, batch, self.n_heads, 0, self.head_dim), dtype=self._cache_dtype)
        tokens = np.asarray(prompts, dtype=np.int64)
        logits, self_k, self_v = self._step(tokens[:, : sot_index + 1], empty, empty, cross_k, cross_v)
        no_speech = no_speech_probability(logits[:, -1], int(self.config["no_speech"]))
        if sot_index + 1 < prompt_length:
            logits, self_k, self_v = self._step(
                tokens[:, sot_index + 1 :], self_k, self_v, cross_k, cross_v, n_logits=draft_length + 1
            )

        if beam_size > 1:
            best = beam_search(
                self._step,
                logits[:, -1],
                (self_k, self_v, cross_k, cross_v),
                limits=limits,
                rules=rules,
                beam_size=beam_size,
                loop_stop=loop_stop,
                share_cross=self.shares_cross_attention,
            )
            return [
                self._result(hypothesis.tokens, hypothesis.sum_logprob, float(no_speech[row]), hypothesis.reached_eot)
                for row, hypothesis in enumerate(best)
            ]
        sampled: list[list[int]] = [[] for _ in range(batch)]
        sums = [0.0] * batch
        kept = 0
        if draft_length:
            drafts = [prompt[fixed_length:] for prompt in prompts]
            kept, kept_logprobs = self._verify_drafts(logits, drafts, limits, rules, loop_stop)
            # Roll every row back to the shortest kept prefix: the cache after it, the logits at it.
            self_k, self_v = self_k[:, :, :, : fixed_length + kept], self_v[:, :, :, : fixed_length + kept]
            for row in range(batch):
                sampled[row] = list(drafts[row][:kept])
                sums[row] = float(kept_logprobs[row, :kept].sum())
            logits = logits[:, kept]
        else:
            logits = logits[:, -1]
        reached_eot = [False] * batch
        rows_in_batch = list(range(batch))  # original row of each batch row (finished rows stay until compaction)
        running = list(range(batch))  # batch positions of the rows still sampling
        next_tokens = np.full(batch, rules.eot, dtype=np.int64)
        for step in range(kept, max(limits)):
            live = [rows_in_batch[position] for position in running]
            live_logits = logits if len(running) == len(rows_in_batch) else logits[running]
            chosen, log_probs = pick_tokens(mask_logits(live_logits, [sampled[row] for row in live], rules))
            still_running: list[int] = []
            for index, (position, row) in enumerate(zip(running, live, strict=True)):
                token = int(chosen[index])
                sums[row] += float(log_probs[index])
                next_tokens[position] = rules.eot
                if token == rules.eot:
                    reached_eot[row] = True
                    continue
                sampled[row].append(token)
                if step + 1 < limits[row] and (loop_stop is None or not loop_stop.ends_in_loop(sampled[row])):
                    still_running.append(position)
                    next_tokens[position] = token
            if not still_running:
                break
            if 2 * len(still_running) <= len(rows_in_batch) and len(still_running) < len(rows_in_batch):
                index_array = np.asarray(still_running, dtype=np.int64)
                self_k, self_v = np.take(self_k, index_array, axis=1), np.take(self_v, index_array, axis=1)
                cross_k, cross_v = np.take(cross_k, index_array, axis=1), np.take(cross_v, index_array, axis=1)
                next_tokens = next_tokens[index_array]
                rows_in_batch = [rows_in_batch[position] for position in still_running]
                still_running = list(range(len(rows_in_batch)))
            running = still_running
            logits, self_k, self_v = self._step(next_tokens[:, None], self_k, self_v, cross_k, cross_v)
            logits = logits[:, -1]

        return [
            self._result(sampled[row], sums[row], float(no_speech[row]), reached_eot[row], drafted=kept)
            for row in range(batch)
        ]

    def _result(
        self, tokens: list[int], sum_logprob: float, no_speech_prob: float, reached_eot: bool, drafted: int = 0
    ) -> DecodeResult:
        return DecodeResult(
            tokens=tokens,
            sum_logprob=sum_logprob,
            avg_logprob=average_logprob(sum_logprob, len(tokens)),
            no_speech_prob=no_speech_prob,
            text=self.tokenizer.decode(tokens),
            reached_eot=reached_eot,
            drafted=drafted,
        )

    def _verify_drafts(
        self,
        logits: np.ndarray,
        drafts: list[list[int]],
        limits: list[int],
        rules: DecodingRules,
        loop_stop: LoopStop | None,
    ) -> tuple[int, np.ndarray]:
        """How many leading draft tokens every row keeps, and each row's log-probability of the kept ones.

        ``logits`` [rows, draft + 1, vocab] are those of the positions before each draft token and after the last.
        A row keeps its draft up to the first token greedy decoding would not pick there, short of a token that
        would end a loop (the loop stop is then left to the decoding) and of its token limit; the group keeps the
        fewest any row keeps. Greedy picks a draft token where it is the raw argmax and ``rules`` do not mask it
        (masking only lowers other tokens); where a masked token is the raw argmax the draft is cut, which costs
        decoding steps but never changes the result. Timestamp rules depend on the history in other ways, so drafts
        are for decoding without timestamps only.
        """
        if rules.with_timestamps:
            raise ValueError("drafts are verified for decoding without timestamps only")
        batch, positions, _ = logits.shape
        draft_length = positions - 1
        raw_best = np.argmax(logits[:, :draft_length], axis=-1)
        masked_always = set(rules.suppress_ids)
        masked_first = masked_always | (set(rules.suppress_ids_begin) if rules.suppress_blank else set())
        kept = draft_length
        for row, draft in enumerate(drafts):
            agreed = 0
            while (
                agreed < draft_length
                and int(raw_best[row, agreed]) == draft[agreed]
                and draft[agreed] not in (masked_first if agreed == 0 else masked_always)
            ):
                agreed += 1
            if loop_stop is not None:
                agreed = next(
                    (end - 1 for end in range(1, agreed + 1) if loop_stop.ends_in_loop(draft[:end])), agreed
                )
            kept = min(kept, agreed, limits[row] - 1)
        kept = max(kept, 0)
        if not kept:
            return 0, np.zeros((batch, 0))
        # the log-probabilities greedy decoding adds up for the kept tokens (they are its picks)
        histories = [draft[:position] for draft in drafts for position in range(kept)]
        rows = np.ascontiguousarray(logits[:, :kept]).reshape(batch * kept, -1)
        _, log_probs = pick_tokens(mask_logits(rows, histories, rules))
        return kept, log_probs.reshape(batch, kept)

    def _step(
        self,
        tokens: np.ndarray,
        self_k: np.ndarray,
        self_v: np.ndarray,
        cross_k: np.ndarray,
        cross_v: np.ndarray,
        *,
        n_logits: int = 1,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One decoder call: logits [batch, n_logits, vocab] of the last ``n_logits`` positions, and the caches."""
        feed = {
            "tokens": np.ascontiguousarray(tokens, dtype=np.int64),
            "n_logits": np.array([n_logits], dtype=np.int64),
            "self_k": self_k,
            "self_v": self_v,
            "cross_k": cross_k,
            "cross_v": cross_v,
        }
        logits, new_k, new_v = self._decoder.run(list(DECODER_OUTPUTS), feed)
        return logits, new_k, new_v


def _check_io(session: ort.InferenceSession, file_name: str, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    found_inputs = [node.name for node in session.get_inputs()]
    found_outputs = [node.name for node in session.get_outputs()]
    if sorted(found_inputs) != sorted(inputs) or sorted(found_outputs) != sorted(outputs):
        raise ModelError(
            f"{file_name}: expected inputs {list(inputs)} and outputs {list(outputs)}, "
            f"got inputs {found_inputs} and outputs {found_outputs}"
        )


def _input_dtype(session: ort.InferenceSession, name: str) -> type[np.floating[Any]]:
    node = next(node for node in session.get_inputs() if node.name == name)
    if node.type not in _NUMPY_BY_ORT_TYPE:
        raise ModelError(f"input {name!r}: expected a float or float16 tensor, got {node.type}")
    return _NUMPY_BY_ORT_TYPE[node.type]
