"""Agreement with llama.cpp, the reference engine: fed llama.cpp's own greedy tokens, Brook picks the same next token.

``tests/goldens/llama/llamacpp_greedy.json`` (written by ``scripts/make_llama_goldens.py`` with llama-cpp-python on
the same GGUF) holds, for 13 prompts (chat prompts through the model's template, most with its default system
prompt, and raw completions), the prompt ids and 64 greedy tokens llama.cpp generated. Brook v1 (the default
version: exact weights, fp32 activations) runs every prompt plus those tokens once, all prompts as rows of the same
steps (teacher forcing), and at each position its argmax is compared with llama.cpp's token.

Exact id parity is not the target: llama.cpp quantizes activations to 8 bits inside its matmuls, Brook v1 does not,
and greedy decoding meets near-ties. The issue's bar is agreement at >= 95 % of positions; each disagreement must be
a near-tie for Brook too (its logit for llama.cpp's token within ``MAX_DISAGREEMENT_GAP`` of its top-1).
Measured (v1, 631 positions): 609 agree (96.5 %); the 22 disagreements have Brook gaps of 0.004-0.54 logits and
llama.cpp margins of 0.02-0.31. v3 (int8 output projection, best 64 tokens rescored exactly) picks v1's token at
all 631 positions, so it agrees at the same 609. (v2, int8 activations everywhere, also agrees at 609, but at other
positions: it differs from v1 at 14.)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.engine.text_engine import TOKENIZER_FILE_NAME
from app.repository import LoadedVersion, ModelRepository
from app.text.chat_template import ChatTemplate
from app.text.llama_runner import LlamaRunner, StepInput
from app.text.tokenizer import TextTokenizer
from tests.conftest import load_model

logger = logging.getLogger(__name__)

GOLDEN_FILE = Path(__file__).resolve().parent / "goldens" / "llama" / "llamacpp_greedy.json"
MODEL = "smollm2-135m-instruct"
MIN_AGREEMENT = 0.95
MAX_DISAGREEMENT_GAP = 1.0  # logits between Brook's top-1 and llama.cpp's token where they differ
RUNNER_MAX_SEQ_LEN = 256


@dataclass(frozen=True)
class Disagreement:
    prompt: str
    position: int  # index into the generated tokens
    brook_token: int
    llamacpp_token: int
    brook_gap: float  # Brook's logit of its own top-1 minus its logit of llama.cpp's token
    llamacpp_margin: float  # llama.cpp's top-1/top-2 margin at that step


@pytest.fixture(scope="module")
def goldens() -> dict[str, Any]:
    if not GOLDEN_FILE.is_file():
        pytest.fail(f"{GOLDEN_FILE} is missing; run scripts/make_llama_goldens.py (needs the `reference` extra)")
    data: dict[str, Any] = json.loads(GOLDEN_FILE.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def v1(model_repository: ModelRepository) -> LoadedVersion:
    return load_model(model_repository, MODEL, 1)


@pytest.fixture(scope="module", params=[1, 3])
def exact_version(request: pytest.FixtureRequest, model_repository: ModelRepository) -> LoadedVersion:
    """The versions with fp32 activations in every layer: v1, and v3 (whose output projection rescores its best
    tokens exactly, so its argmax is v1's)."""
    return load_model(model_repository, MODEL, int(request.param))


def teacher_forced_argmax(
    runner: LlamaRunner, prompts: list[list[int]], forced: list[list[int]]
) -> list[list[tuple[int, float, np.ndarray]]]:
    """For every prompt and every forced position: Brook's (argmax, top-1 logit, logits) before that token.

    All prompts run as rows of the same steps: one prefill step, then one decode step per forced token for the
    rows that still have tokens to feed.
    """
    slots = [runner.allocate_slot() for _ in prompts]
    results: list[list[tuple[int, float, np.ndarray]]] = [[] for _ in prompts]
    logits = runner.step([StepInput(slot, prompt) for slot, prompt in zip(slots, prompts, strict=True)])
    active = list(range(len(prompts)))
    position = 0
    while active:
        for row, index in enumerate(active):
            top = int(np.argmax(logits[row]))
            results[index].append((top, float(logits[row][top]), logits[row].copy()))
        active = [index for index in active if position + 1 < len(forced[index])]
        if active:
            logits = runner.step([StepInput(slots[index], [forced[index][position]]) for index in active])
        position += 1
    for slot in slots:
        runner.free_slot(slot)
    return results


def test_brook_renders_and_tokenizes_the_prompts_like_llamacpp(goldens: dict[str, Any], v1: LoadedVersion) -> None:
    config = v1.manifest.config
    tokenizer = TextTokenizer.from_files(v1.directory / TOKENIZER_FILE_NAME, config)
    template = ChatTemplate(str(config["chat_template"]))
    for record in goldens["prompts"]:
        if record["kind"] == "chat":
            text = template.render(record["messages"], add_generation_prompt=True)
            assert text == record["text"], record["name"]
        assert tokenizer.encode(record["text"], allow_special=True) == record["prompt_ids"], record["name"]


def test_exact_versions_agree_with_llamacpp_on_teacher_forced_tokens(
    goldens: dict[str, Any], exact_version: LoadedVersion
) -> None:
    records = goldens["prompts"]
    assert len(records) >= 10
    runner = LlamaRunner(
        exact_version.directory,
        exact_version.manifest.config,
        intra_op_threads=2,
        max_batch_size=len(records),
        max_seq_len=RUNNER_MAX_SEQ_LEN,
    )
    forced = [record["generated_ids"] for record in records]
    predictions = teacher_forced_argmax(runner, [record["prompt_ids"] for record in records], forced)

    total = agree = 0
    disagreements: list[Disagreement] = []
    for record, rows in zip(records, predictions, strict=True):
        assert len(rows) == len(record["generated_ids"])
        for position, ((top, top_logit, logits), wanted) in enumerate(zip(rows, record["generated_ids"], strict=True)):
            total += 1
            if top == wanted:
                agree += 1
                continue
            disagreements.append(
                Disagreement(
                    record["name"],
                    position,
                    top,
                    wanted,
                    round(top_logit - float(logits[wanted]), 4),
                    record["llamacpp_margins"][position],
                )
            )
    rate = agree / total
    report = "\n".join(
        f"  {d.prompt}[{d.position}]: Brook {d.brook_token} vs llama.cpp {d.llamacpp_token}, "
        f"Brook gap {d.brook_gap:.3f}, llama.cpp margin {d.llamacpp_margin:.3f}"
        for d in disagreements
    )
    logger.info("Brook agrees with llama.cpp at %d/%d positions (%.1f %%)\n%s", agree, total, 100 * rate, report)
    assert rate >= MIN_AGREEMENT, f"agreement {agree}/{total} = {rate:.3f} < {MIN_AGREEMENT}\n{report}"
    wide = [d for d in disagreements if d.brook_gap > MAX_DISAGREEMENT_GAP]
    assert not wide, f"disagreements that are not near-ties for Brook:\n{report}"


def test_the_two_level_decode_graph_keeps_v3s_greedy_choices(
    goldens: dict[str, Any], model_repository: ModelRepository
) -> None:
    """v4 is v3 plus a graph with two-level int8 activations for calls of up to 4 decode rows. Fed llama.cpp's
    tokens two prompts at a time (so every decode step runs on that graph), its argmax equals v3's at every position
    and the logits of the tokens near the top stay within a few hundredths of v3's."""
    records = goldens["prompts"]
    prompts = [record["prompt_ids"] for record in records]
    forced = [record["generated_ids"] for record in records]
    v3, v4 = (load_model(model_repository, MODEL, version) for version in (3, 4))
    assert v4.manifest.config.get("decode_graph_rows", 0) >= 2
    v3_runner = LlamaRunner(
        v3.directory, v3.manifest.config, max_batch_size=len(records), max_seq_len=RUNNER_MAX_SEQ_LEN
    )
    v4_runner = LlamaRunner(v4.directory, v4.manifest.config, max_batch_size=2, max_seq_len=RUNNER_MAX_SEQ_LEN)
    exact = teacher_forced_argmax(v3_runner, prompts, forced)
    two_level = [
        row for first in range(0, len(records), 2)
        for row in teacher_forced_argmax(v4_runner, prompts[first : first + 2], forced[first : first + 2])
    ]
    positions = differences = 0
    worst = 0.0
    for exact_rows, two_level_rows in zip(exact, two_level, strict=True):
        for (top, _, logits), (top_v4, _, logits_v4) in zip(exact_rows, two_level_rows, strict=True):
            positions += 1
            differences += top != top_v4
            near_top = logits >= logits.max() - 3.0
            worst = max(worst, float(np.abs(logits[near_top] - logits_v4[near_top]).max()))
    logger.info("v4 against v3: %d argmax differences in %d positions, worst logit gap near the top %.4f",
                differences, positions, worst)
    assert positions == sum(len(tokens) for tokens in forced)
    assert differences == 0
    assert worst <= 0.1  # measured 0.023 (p99 0.0024); single-level int8 (v2) is off by up to 1.6
