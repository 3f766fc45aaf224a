"""The GGUF-to-ONNX converter against the numpy fp32 reference, on synthetic models of every type and on SmolLM2.

Tolerances (max |Δlogit| against the fp32 reference over dequantized weights):
- accuracy_level 0: the graph computes in fp32 on the exact weights, so only summation order differs: 1e-3.
- accuracy_level 4 (default): MatMulNBits quantizes activations to int8 per block of 32, as llama.cpp does. On
  SmolLM2 the first-step logits stay within 1.5 (observed <= 0.9) with correlation >= 0.998 (observed >= 0.9991),
  and top-1 agrees wherever the reference's top-1/top-2 margin exceeds 0.1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from tokenizers import Tokenizer

from app.convert.gguf_model import QUANTIZED_TYPES, GGUFModel
from app.convert.llama import DEFAULT_ACCURACY_LEVEL, build_llama_onnx
from app.text.llama_runner import LlamaRunner, StepInput
from tests.reference_llama import ReferenceLlama, use_single_blas_thread
from tests.smollm2_fixtures import (
    CHAT_PROMPTS,
    PARIS_PROMPT,
    converted_smollm2,
    reference_first_logits,
    smollm2_reference,
)
from tests.synthetic_llama_gguf import SYNTHETIC_MODELS, write_synthetic_gguf

EXACT_TOLERANCE = 1e-3
TWO_LEVEL_RELATIVE_TOLERANCE = 1e-4  # of the largest logit
LEVEL4_MAX_ABS = 1.5
LEVEL4_MIN_CORRELATION = 0.998
TOP1_MARGIN = 0.1
SYNTHETIC_PROMPTS = ([5], [7, 8, 9, 10, 11], list(range(20, 53)))


def _first_logits(model_dir: Path, config: dict[str, Any], prompts: list[list[int]]) -> list[np.ndarray]:
    runner = LlamaRunner(model_dir, config, max_batch_size=4, max_seq_len=128)
    logits = []
    for prompt in prompts:
        slot = runner.allocate_slot()
        logits.append(runner.step([StepInput(slot, prompt)])[0])
        runner.free_slot(slot)
    return logits


# -- synthetic models ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(SYNTHETIC_MODELS))
def synthetic(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ReferenceLlama]:
    use_single_blas_thread()
    path = tmp_path_factory.mktemp(request.param) / "model.gguf"
    write_synthetic_gguf(path, SYNTHETIC_MODELS[request.param])
    return path, ReferenceLlama.from_gguf(path)


@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_synthetic_model_matches_reference(
    synthetic: tuple[Path, ReferenceLlama], accuracy_level: int, tmp_path: Path
) -> None:
    path, reference = synthetic
    config = build_llama_onnx(GGUFModel(path), tmp_path, {"accuracy_level": accuracy_level})
    for prompt, logits in zip(SYNTHETIC_PROMPTS, _first_logits(tmp_path, config, list(SYNTHETIC_PROMPTS)), strict=True):
        expected = reference.forward(prompt)[-1]
        if accuracy_level == 0:
            np.testing.assert_allclose(logits, expected, rtol=0, atol=EXACT_TOLERANCE)
        else:
            assert np.abs(logits - expected).max() <= 0.05 * np.abs(expected).max()
            assert np.corrcoef(logits, expected)[0, 1] >= LEVEL4_MIN_CORRELATION


def test_synthetic_graph_uses_exact_operators(synthetic: tuple[Path, ReferenceLlama], tmp_path: Path) -> None:
    path, _ = synthetic
    model = GGUFModel(path)
    build_llama_onnx(model, tmp_path, {})
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("GroupQueryAttention") == model.params.n_layers
    gqa = next(node for node in graph.node if node.op_type == "GroupQueryAttention")
    assert gqa.input[16] == "query_lens"  # right-padded rows of different lengths
    assert {a.name: a.i for a in gqa.attribute}["rotary_interleaved"] == int(model.params.rope_interleaved)
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            assert len(node.input) == 3, "no zero points: float zero points would disable prepacking"
            assert {a.name: a.i for a in node.attribute}["accuracy_level"] == DEFAULT_ACCURACY_LEVEL


def test_rescored_output_gives_exact_logits_to_the_best_tokens(
    synthetic: tuple[Path, ReferenceLlama], tmp_path: Path
) -> None:
    """``output_rescore_tokens``: int8 output projection, then the best candidates recomputed exactly in fp32."""
    path, reference = synthetic
    model = GGUFModel(path)
    rescore = 8
    config = build_llama_onnx(model, tmp_path, {"accuracy_level": 0, "output_rescore_tokens": rescore})
    assert config["output_rescore_tokens"] == rescore
    ops = [node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node]
    output = model.optional("output.weight") or model.tensor("token_embd.weight")
    assert ops.count("TopK") == (1 if output.type_name in QUANTIZED_TYPES else 0)
    for prompt, logits in zip(SYNTHETIC_PROMPTS, _first_logits(tmp_path, config, list(SYNTHETIC_PROMPTS)), strict=True):
        expected = reference.forward(prompt)[-1]
        best = np.argsort(-expected)[: rescore // 2]  # well inside the candidates, whatever the int8 error
        np.testing.assert_allclose(logits[best], expected[best], rtol=0, atol=EXACT_TOLERANCE)
        assert int(np.argmax(logits)) == int(np.argmax(expected))
        assert np.abs(logits - expected).max() <= 0.05 * np.abs(expected).max()  # the rest: int8 accuracy


def test_two_level_decode_graph_matches_reference(synthetic: tuple[Path, ReferenceLlama], tmp_path: Path) -> None:
    """``decode_graph_rows``: a second graph whose 4-bit projections take int8 codes of the activations and of their
    int8 residual; the runner runs calls of up to that many decode rows on it, and stays within fp32 tolerance."""
    path, reference = synthetic
    config = build_llama_onnx(GGUFModel(path), tmp_path, {"accuracy_level": 0, "decode_graph_rows": 2})
    assert config["decode_model_file"] == "model_decode.onnx" and config["decode_graph_rows"] == 2
    levels = {
        {a.name: a.i for a in node.attribute}["accuracy_level"]
        for node in onnx.load(str(tmp_path / "model_decode.onnx")).graph.node
        if node.op_type == "MatMulNBits" and {a.name: a.i for a in node.attribute}["bits"] == 4
    }
    assert levels in (set(), {4})  # a float model has no 4-bit projections

    runner = LlamaRunner(tmp_path, config, max_batch_size=4, max_seq_len=128)
    decode_calls = 0
    run_decode = runner.decode_session.run_with_iobinding  # type: ignore[union-attr]

    def counting_run(binding: Any) -> None:
        nonlocal decode_calls
        decode_calls += 1
        run_decode(binding)

    runner.decode_session.run_with_iobinding = counting_run  # type: ignore[union-attr,method-assign]
    prompts = [list(SYNTHETIC_PROMPTS[1]), list(SYNTHETIC_PROMPTS[2])]
    slots = [runner.allocate_slot() for _ in prompts]
    runner.step([StepInput(slot, prompt) for slot, prompt in zip(slots, prompts, strict=True)])
    assert decode_calls == 0  # prompts run on the fp32 graph
    for rows in ([0], [0, 1]):  # one decode row, then two in one call
        for row in rows:
            prompts[row].append(3 + row)
        logits = runner.step([StepInput(slots[row], [prompts[row][-1]]) for row in rows])
        for row, row_logits in zip(rows, logits, strict=True):
            expected = reference.forward(prompts[row])[-1]
            # int8 residuals are about 2^-14 (6e-5) of the activations: 500x closer than int8 activations (5e-2)
            tolerance = max(EXACT_TOLERANCE, TWO_LEVEL_RELATIVE_TOLERANCE * float(np.abs(expected).max()))
            np.testing.assert_allclose(row_logits, expected, rtol=0, atol=tolerance)
    assert decode_calls == 2
    # A decode token with one drafted token after it (speculative decoding) is a call of two tokens: the same graph,
    # with the logits of both positions.
    prompts[0] += [5, 6]
    logits = runner.step([StepInput(slots[0], prompts[0][-2:], logits=2)])
    expected_both = reference.forward(prompts[0])[-2:]
    tolerance = max(EXACT_TOLERANCE, TWO_LEVEL_RELATIVE_TOLERANCE * float(np.abs(expected_both).max()))
    np.testing.assert_allclose(logits, expected_both, rtol=0, atol=tolerance)
    assert decode_calls == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"decode_graph_rows": -1}, "decode_graph_rows"),
        ({"decode_graph_rows": 2, "accuracy_level": 4}, "decode_graph_rows"),
        ({"output_rescore_tokens": -1}, "output_rescore_tokens"),
        ({"output_rescore_tokens": True}, "output_rescore_tokens"),
        ({"accuracy_level": 2}, "accuracy_level"),
        ({"max_seq_len": 100_000}, "context length"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"quantize": True}, "unknown"),
    ],
)
def test_bad_options_are_rejected(options: dict[str, Any], message: str, tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    write_synthetic_gguf(path, SYNTHETIC_MODELS["float"])
    with pytest.raises(ValueError, match=message):
        build_llama_onnx(GGUFModel(path), tmp_path, options)


# -- SmolLM2-135M-Instruct -------------------------------------------------------------------------------------------


def test_smollm2_conversion_writes_model_tokenizer_and_config() -> None:
    model_dir, config = converted_smollm2(DEFAULT_ACCURACY_LEVEL)
    assert (model_dir / "model.onnx").is_file() and (model_dir / "tokenizer.json").is_file()
    json.dumps(config)  # goes into the manifest
    assert config["architecture"] == "llama"
    assert (config["n_layers"], config["hidden"], config["n_heads"], config["n_kv_heads"]) == (30, 576, 9, 3)
    assert (config["head_dim"], config["ffn"], config["vocab_size"]) == (64, 1536, 49152)
    assert config["tensor_types"] == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert config["tied_embeddings"] is True
    assert config["accuracy_level"] == DEFAULT_ACCURACY_LEVEL
    assert config["max_seq_len"] <= config["context_length"] == 8192
    assert config["eos_token_id"] == 2 and config["add_bos_token"] is False  # from the tokenizer helper
    assert config["tokenizer_vocab_size"] == 49152  # the tokenizer's count never replaces the logits width


@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_smollm2_first_step_logits_match_reference(accuracy_level: int) -> None:
    model_dir, config = converted_smollm2(accuracy_level)
    # Level 0 is exact, so a few prompts prove it; level 4 (the default) gets all of them.
    prompts = CHAT_PROMPTS if accuracy_level == DEFAULT_ACCURACY_LEVEL else CHAT_PROMPTS[:4]
    expected_all = reference_first_logits()[: len(prompts)]
    for prompt, logits, expected in zip(prompts, _first_logits(model_dir, config, prompts), expected_all, strict=True):
        top2 = np.sort(expected)[-2:]
        if top2[1] - top2[0] > TOP1_MARGIN:
            assert np.argmax(logits) == np.argmax(expected), f"top-1 differs for prompt {prompt}"
        if accuracy_level == 0:
            np.testing.assert_allclose(logits, expected, rtol=0, atol=EXACT_TOLERANCE)
        else:
            assert np.abs(logits - expected).max() <= LEVEL4_MAX_ABS
            assert np.corrcoef(logits, expected)[0, 1] >= LEVEL4_MIN_CORRELATION


def test_smollm2_answers_paris_like_the_reference() -> None:
    model_dir, config = converted_smollm2(DEFAULT_ACCURACY_LEVEL)
    runner = LlamaRunner(model_dir, config, max_batch_size=1, max_seq_len=64)
    slot = runner.allocate_slot()
    logits = runner.step([StepInput(slot, PARIS_PROMPT)])[0]
    generated: list[int] = []
    for _ in range(20):
        generated.append(int(np.argmax(logits)))
        logits = runner.step([StepInput(slot, generated[-1:])])[0]
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = tokenizer.decode(generated)
    assert "Paris" in text, text
    assert generated == smollm2_reference().greedy(PARIS_PROMPT, 20)
