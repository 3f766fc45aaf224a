"""Fidelity of the shipped SmolLM2 versions to the numpy fp32 reference over the exact dequantized GGUF weights.

The prompts are what a chat UI sends: most are rendered with the model's own chat template, which inserts its default
system prompt ("You are a helpful AI assistant named SmolLM, trained by Hugging Face"); one has its own system prompt,
three are ChatML without a system prompt, two are raw completions. For each, the last-position logits of the
repository's v1 and v2 (one batched prefill step) are compared with ``tests/reference_llama.py``.

Measured on these 13 prompts (the assertions below keep some headroom):

- v1 (accuracy_level 0, fp32 activations): max |logit - reference| <= 1.4e-4, correlation 1.00000, same top-1 on
  every prompt. It answers "What is the capital of France?" through the template with "The capital of France is
  Paris."
- v2 (accuracy_level 4, int8 activations in the matmuls): max |logit - reference| 0.6-1.6, correlation
  0.9979-0.9995. Same top-1 wherever the reference's top-1/top-2 margin exceeds 0.1 (12 of 12 such prompts on an
  Intel AVX-512 machine; 11 of 12 on an AMD EPYC with AVX2 only, whose int8 kernels round differently: "Write a
  haiku about the sea." flips at margin 0.111), but that is not a guarantee: its logit error is larger than such
  margins. What is guaranteed is the same top-1 wherever the margin exceeds twice the prompt's largest logit
  error. The one miss on every machine is the France question with
  the default system prompt, whose first step is a near-tie (reference margin 0.082): v2 then picks "L" and answers
  "L'Étoile, la Cité, la Nation, ..." - exactly what llama.cpp (which also quantizes activations to 8 bits) answers
  (tests/goldens/llama/llamacpp_greedy.json). Without the system prompt v2 answers "Paris". This is why v1 is the
  default version.
- v3 (v1's fp32 layers; the output projection with int8 activations, then its 64 best tokens recomputed exactly in
  fp32): every token within 3 logits of the reference's best has v1's exactness (max |error| <= 1.4e-4), the rest
  of the vocabulary v2's accuracy in that one projection (max |error| about 0.4). Same top-1 as the reference on
  every prompt, the France question included.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np
import pytest

from app.engine.text_engine import TOKENIZER_FILE_NAME, TextEngine, TextEngineSettings
from app.engine.text_events import GenerationDone, TokenDelta
from app.repository import LoadedVersion, ModelRepository
from app.text.chat_template import ChatTemplate
from app.text.llama_runner import LlamaRunner, StepInput
from app.text.sampling import SamplingParams
from app.text.tokenizer import TextTokenizer
from tests.conftest import load_model
from tests.reference_llama import ReferenceLlama
from tests.smollm2_fixtures import CHAT_PROMPTS, PARIS_PROMPT, smollm2_reference

logger = logging.getLogger(__name__)

MODEL = "smollm2-135m-instruct"
TOP1_MARGIN = 0.1  # the reference's top-1/top-2 margin (logits) above which Brook must pick the same top-1
V1_TOLERANCE = 1e-3  # max |logit - reference| of v1; measured <= 1.4e-4
V2_TOLERANCE = 2.0  # max |logit - reference| of v2; measured 0.6-1.6
V2_MIN_CORRELATION = 0.997  # measured >= 0.9979
V2_MAX_CLEAR_MISSES = 1  # prompts with margin > TOP1_MARGIN whose top-1 v2 misses: 0 on AVX-512, 1 on AVX2 (measured)
V3_EXACT_WITHIN = 3.0  # logits below the reference's best: v3 must be as exact as v1 for every such token
FRANCE = "What is the capital of France?"
TEMPLATE_QUESTIONS = (
    FRANCE,
    "Write a haiku about the sea.",
    "Explain photosynthesis briefly.",
    "What is 12 times 7?",
    "Who wrote Hamlet?",
    "List three colors.",
    "Give me a synonym for happy.",
)
OWN_SYSTEM_PROMPT = ("You are a concise assistant.", "Name a planet.")
COMPLETIONS = ("The quick brown fox jumps over the", "def add(a, b):\n    return")
CHATML_WITHOUT_SYSTEM = (CHAT_PROMPTS[0], CHAT_PROMPTS[3], CHAT_PROMPTS[6])  # France, 2+2, Hamlet


@dataclass(frozen=True)
class Prompt:
    name: str
    ids: list[int]


@dataclass(frozen=True)
class Comparison:
    prompt: Prompt
    max_abs_error: float
    correlation: float
    reference_margin: float
    same_top1: bool


def tokenizer_and_template(loaded: LoadedVersion) -> tuple[TextTokenizer, ChatTemplate]:
    config = loaded.manifest.config
    return (
        TextTokenizer.from_files(loaded.directory / TOKENIZER_FILE_NAME, config),
        ChatTemplate(str(config["chat_template"])),
    )


def build_prompts(loaded: LoadedVersion) -> list[Prompt]:
    tokenizer, template = tokenizer_and_template(loaded)

    def chat(messages: list[dict[str, str]]) -> list[int]:
        return tokenizer.encode(template.render(messages, add_generation_prompt=True), allow_special=True)

    prompts = [Prompt(f"template: {q}", chat([{"role": "user", "content": q}])) for q in TEMPLATE_QUESTIONS]
    system, question = OWN_SYSTEM_PROMPT
    prompts.append(
        Prompt(
            f"own system: {question}",
            chat([{"role": "system", "content": system}, {"role": "user", "content": question}]),
        )
    )
    prompts += [Prompt(f"chatml without system #{i}", list(ids)) for i, ids in enumerate(CHATML_WITHOUT_SYSTEM)]
    prompts += [Prompt(f"completion: {text!r}", tokenizer.encode(text, allow_special=True)) for text in COMPLETIONS]
    return prompts


@pytest.fixture(scope="module")
def versions(model_repository: ModelRepository) -> dict[int, LoadedVersion]:
    return {version: load_model(model_repository, MODEL, version) for version in (1, 2)}


@pytest.fixture(scope="module")
def prompts(versions: dict[int, LoadedVersion]) -> list[Prompt]:
    built = build_prompts(versions[1])
    assert len(built) >= 10
    assert sum(p.name.startswith("template") for p in built) >= 5
    return built


@pytest.fixture(scope="module")
def reference() -> ReferenceLlama:
    return smollm2_reference()


@pytest.fixture(scope="module")
def reference_logits(reference: ReferenceLlama, prompts: list[Prompt]) -> list[np.ndarray]:
    return [reference.forward(prompt.ids)[-1] for prompt in prompts]


def make_runner(loaded: LoadedVersion, slots: int) -> LlamaRunner:
    return LlamaRunner(
        loaded.directory, loaded.manifest.config, intra_op_threads=2, max_batch_size=slots, max_seq_len=128
    )


def first_step_logits(loaded: LoadedVersion, prompts: list[Prompt]) -> np.ndarray:
    """Every prompt's last-position logits, all prompts prefilled as rows of one step."""
    runner = make_runner(loaded, len(prompts))
    slots = [runner.allocate_slot() for _ in prompts]
    return runner.step([StepInput(slot, prompt.ids) for slot, prompt in zip(slots, prompts, strict=True)]).copy()


def compare(prompts: list[Prompt], logits: np.ndarray, references: list[np.ndarray]) -> list[Comparison]:
    comparisons = []
    for prompt, row, expected in zip(prompts, logits, references, strict=True):
        top2 = np.sort(expected)[-2:]
        comparisons.append(
            Comparison(
                prompt,
                float(np.abs(row - expected).max()),
                float(np.corrcoef(row, expected)[0, 1]),
                float(top2[1] - top2[0]),
                int(np.argmax(row)) == int(np.argmax(expected)),
            )
        )
    for c in comparisons:
        logger.info(
            "%-45s max|err| %.2e corr %.5f margin %.3f same top-1 %s",
            c.prompt.name,
            c.max_abs_error,
            c.correlation,
            c.reference_margin,
            c.same_top1,
        )
    return comparisons


def greedy(loaded: LoadedVersion, prompt: list[int], steps: int) -> list[int]:
    runner = make_runner(loaded, 1)
    slot = runner.allocate_slot()
    logits = runner.step([StepInput(slot, prompt)])[0]
    generated: list[int] = []
    for _ in range(steps):
        generated.append(int(np.argmax(logits)))
        logits = runner.step([StepInput(slot, generated[-1:])])[0]
    return generated


def test_v1_first_step_logits_match_the_reference(
    versions: dict[int, LoadedVersion], prompts: list[Prompt], reference_logits: list[np.ndarray]
) -> None:
    assert versions[1].manifest.config["accuracy_level"] == 0
    comparisons = compare(prompts, first_step_logits(versions[1], prompts), reference_logits)
    for c in comparisons:
        assert c.max_abs_error <= V1_TOLERANCE, f"{c.prompt.name}: max |error| {c.max_abs_error:.2e}"
        if c.reference_margin > TOP1_MARGIN:
            assert c.same_top1, f"{c.prompt.name}: top-1 differs at margin {c.reference_margin:.3f}"
    # Exact enough that even the near-ties (the France question's first step, margin 0.08) agree.
    assert all(c.same_top1 for c in comparisons)


def test_v2_fidelity_is_as_measured(
    versions: dict[int, LoadedVersion], prompts: list[Prompt], reference_logits: list[np.ndarray]
) -> None:
    assert versions[2].manifest.config["accuracy_level"] == 4
    comparisons = compare(prompts, first_step_logits(versions[2], prompts), reference_logits)
    for c in comparisons:
        assert c.max_abs_error <= V2_TOLERANCE, f"{c.prompt.name}: max |error| {c.max_abs_error:.2f}"
        assert c.correlation >= V2_MIN_CORRELATION, f"{c.prompt.name}: correlation {c.correlation:.5f}"
        if c.reference_margin > 2 * c.max_abs_error:  # no logit error of this size can swap the top two
            assert c.same_top1, f"{c.prompt.name}: top-1 differs at margin {c.reference_margin:.3f}"
    clear = [c for c in comparisons if c.reference_margin > TOP1_MARGIN]
    misses = [f"{c.prompt.name} (margin {c.reference_margin:.3f})" for c in clear if not c.same_top1]
    assert len(misses) <= V2_MAX_CLEAR_MISSES, f"v2 misses the top-1 of {misses} of {len(clear)} clear prompts"
    # The France question with the default system prompt is a near-tie at its first step, so the top-1 requirement
    # does not cover it (and v2 misses it: see the module docstring).
    france = next(c for c in comparisons if c.prompt.name == f"template: {FRANCE}")
    assert france.reference_margin < TOP1_MARGIN


@pytest.fixture(scope="module")
def v3(model_repository: ModelRepository) -> LoadedVersion:
    return load_model(model_repository, MODEL, 3)


def test_v3_is_exact_for_the_best_tokens(
    v3: LoadedVersion, prompts: list[Prompt], reference_logits: list[np.ndarray]
) -> None:
    assert v3.manifest.config["accuracy_level"] == 0
    assert int(v3.manifest.config["output_rescore_tokens"]) > 0
    logits = first_step_logits(v3, prompts)
    for prompt, row, expected in zip(prompts, logits, reference_logits, strict=True):
        near = expected >= expected.max() - V3_EXACT_WITHIN
        near_error = float(np.abs(row[near] - expected[near]).max())
        assert near_error <= V1_TOLERANCE, f"{prompt.name}: max |error| {near_error:.2e} near the top"
        assert np.abs(row - expected).max() <= V2_TOLERANCE, prompt.name
        assert int(np.argmax(row)) == int(np.argmax(expected)), f"{prompt.name}: top-1 differs"


def test_v3_answers_paris_through_the_chat_template(v3: LoadedVersion) -> None:
    text, _ = asyncio.run(_chat_once(v3, FRANCE))
    assert "Paris" in text, text


def test_v2_answers_paris_without_the_default_system_prompt(versions: dict[int, LoadedVersion]) -> None:
    tokenizer, _ = tokenizer_and_template(versions[2])
    text = tokenizer.decode(greedy(versions[2], PARIS_PROMPT, 10), skip_special=True)
    assert "Paris" in text, text


async def _chat_once(loaded: LoadedVersion, question: str) -> tuple[str, GenerationDone]:
    settings = TextEngineSettings(max_batch_size=1, max_seq_len=256, warmup=False)
    engine = TextEngine.from_directory(loaded.directory, loaded.manifest.config, settings)
    await engine.start()
    try:
        generation = engine.chat(
            engine.open_conversation(), [("user", question)], SamplingParams(temperature=0.0, max_tokens=16)
        )
        parts: list[str] = []
        async for event in generation:
            if isinstance(event, TokenDelta):
                parts.append(event.text)
            else:
                return "".join(parts), event
        raise AssertionError("the generation ended without GenerationDone")
    finally:
        await engine.shutdown()


def test_v1_answers_paris_through_the_chat_template(versions: dict[int, LoadedVersion]) -> None:
    text, done = asyncio.run(_chat_once(versions[1], FRANCE))
    assert "Paris" in text, text
    assert done.finish_reason == "stop"
    assert done.usage.prompt_tokens > 30  # the template inserted the default system prompt
