"""Write tests/goldens/llama/llamacpp_greedy.json: llama.cpp's own greedy continuations of varied prompts.

The oracle is llama.cpp through llama-cpp-python (the ``reference`` extra, ``llama-cpp-python==0.3.36``; Brook never
imports it) on the same SmolLM2 GGUF that Brook converts, with 2 threads. For every prompt the script records the
prompt's token ids as llama.cpp tokenizes them, the tokens llama.cpp generates greedily (argmax of its own logits,
one ``llama_decode`` per token, stopping after an end-of-generation token), and llama.cpp's top-1/top-2 logit margin
at every generated position, so a test can tell near-ties from real disagreements.

Chat prompts are rendered from llama.cpp's copy of the GGUF's chat template (``tokenizer.chat_template``) with Brook's
sandboxed renderer; messages without a system message get the template's default system prompt. The others are raw
completions (text, code, a list, non-ASCII text).

``tests/test_llamacpp_agreement.py`` feeds these tokens to Brook (teacher forcing) and checks that Brook's next-token
argmax agrees with llama.cpp's at >= 95 % of positions. Exact id parity is not expected: llama.cpp quantizes
activations to 8 bits inside its matmuls and the prompts hit near-ties (see docs/benchmarks.md).

Usage: .venv/bin/python scripts/make_llama_goldens.py [--gguf PATH] [--out PATH] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.convert.sources import extract_sources
from app.paths import default_model_dir
from app.repository import ModelRepository
from app.text.chat_template import ChatTemplate

logger = logging.getLogger("make_llama_goldens")

MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "goldens" / "llama" / "llamacpp_greedy.json"
DEFAULT_NEW_TOKENS = 64
THREADS = 2
CONTEXT_TOKENS = 512
SEED = 1234

ChatMessages = list[dict[str, str]]


@dataclass(frozen=True)
class GoldenPrompt:
    """A prompt: chat messages (rendered with the model's template) or raw completion text."""

    name: str
    messages: ChatMessages | None = None
    text: str | None = None


def _user(content: str) -> ChatMessages:
    return [{"role": "user", "content": content}]


PROMPTS: tuple[GoldenPrompt, ...] = (
    GoldenPrompt("capital_of_france", messages=_user("What is the capital of France?")),
    GoldenPrompt("haiku_sea", messages=_user("Write a haiku about the sea.")),
    GoldenPrompt("photosynthesis", messages=_user("Explain photosynthesis briefly.")),
    GoldenPrompt("arithmetic", messages=_user("What is 12 times 7?")),
    GoldenPrompt("hamlet", messages=_user("Who wrote Hamlet?")),
    GoldenPrompt("python_reverse", messages=_user("Write a Python function that reverses a string.")),
    GoldenPrompt("translate", messages=_user("Translate 'good morning' into Spanish and German.")),
    GoldenPrompt(
        "pirate_system",
        messages=[
            {"role": "system", "content": "You are a cheerful pirate. Answer in one sentence."},
            {"role": "user", "content": "How is the weather today?"},
        ],
    ),
    GoldenPrompt(
        "two_turns",
        messages=[
            {"role": "user", "content": "Name a fruit that is red."},
            {"role": "assistant", "content": "An apple is a red fruit."},
            {"role": "user", "content": "And one that is yellow?"},
        ],
    ),
    GoldenPrompt("story_raw", text="Once upon a time, in a small village by the sea, there lived"),
    GoldenPrompt("code_raw", text="def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
    GoldenPrompt("list_raw", text="The planets of the solar system, in order from the Sun, are"),
    GoldenPrompt("french_raw", text="La cuisine française est célèbre pour"),
)


def default_gguf() -> Path:
    """The pinned GGUF from the cache `brook models fetch` fills (fetched if absent)."""
    spec = ModelRepository(default_model_dir()).spec(MODEL_NAME)
    if spec.source is None:
        raise SystemExit(f"{MODEL_NAME} has no pinned source in model.toml")
    return extract_sources(spec.source)["model.gguf"]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class LlamaCppGreedy:
    """llama.cpp's greedy decoding: argmax of the logits it returns after each ``llama_decode``."""

    def __init__(self, gguf_path: Path) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.llm: Any = llama_cpp.Llama(
            model_path=str(gguf_path),
            n_ctx=CONTEXT_TOKENS,
            n_batch=CONTEXT_TOKENS,
            n_threads=THREADS,
            n_threads_batch=THREADS,
            seed=SEED,
            verbose=False,
        )
        self.vocab_size = int(self.llm.n_vocab())
        self.chat_template = str(self.llm.metadata["tokenizer.chat_template"])
        self.stop_ids = {int(self.llm.token_eos())} | {
            token for token in range(self.vocab_size) if self._is_end_of_generation(token)
        }

    def _is_end_of_generation(self, token: int) -> bool:
        vocab = self._llama_cpp.llama_model_get_vocab(self.llm.model)
        return bool(self._llama_cpp.llama_vocab_is_eog(vocab, token))

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)]

    def last_logits(self) -> np.ndarray:
        pointer = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        array = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.vocab_size,))
        return np.array(array, dtype=np.float32)

    def generate(self, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy tokens after ``prompt_ids`` (ending at an end-of-generation token) and each step's top-1/top-2
        margin."""
        self.llm.reset()
        self.llm.eval(prompt_ids)
        tokens: list[int] = []
        margins: list[float] = []
        for _ in range(new_tokens):
            logits = self.last_logits()
            top2 = np.partition(logits, -2)[-2:]
            token = int(np.argmax(logits))
            tokens.append(token)
            margins.append(round(float(top2.max() - top2.min()), 4))
            if token in self.stop_ids:
                break
            self.llm.eval([token])
        return tokens, margins


def render(template: ChatTemplate, prompt: GoldenPrompt) -> str:
    if prompt.messages is not None:
        return template.render(prompt.messages, add_generation_prompt=True)
    assert prompt.text is not None
    return prompt.text


def build_goldens(gguf_path: Path, new_tokens: int) -> dict[str, Any]:
    import llama_cpp

    oracle = LlamaCppGreedy(gguf_path)
    template = ChatTemplate(oracle.chat_template)
    records: list[dict[str, Any]] = []
    for prompt in PROMPTS:
        text = render(template, prompt)
        prompt_ids = oracle.tokenize(text)
        generated, margins = oracle.generate(prompt_ids, new_tokens)
        reply = oracle.llm.detokenize(generated).decode("utf-8", errors="replace")
        logger.info("%-18s %3d prompt tokens -> %r", prompt.name, len(prompt_ids), reply)
        records.append({
            "name": prompt.name,
            "kind": "chat" if prompt.messages is not None else "completion",
            "messages": prompt.messages,
            "text": text,
            "prompt_ids": prompt_ids,
            "generated_ids": generated,
            "llamacpp_margins": margins,
            "reply": reply,
        })
    return {
        "description": "llama.cpp greedy continuations (argmax after each llama_decode) of SmolLM2-135M-Instruct "
        "Q4_1; written by scripts/make_llama_goldens.py",
        "gguf": gguf_path.name,
        "gguf_sha256": sha256_of(gguf_path),
        "llama_cpp_python": llama_cpp.__version__,
        "threads": THREADS,
        "new_tokens": new_tokens,
        "stop_ids": sorted(oracle.stop_ids),
        "prompts": records,
    }


def format_goldens(goldens: dict[str, Any]) -> str:
    """JSON with one prompt record per line, so a diff of regenerated goldens shows which prompts changed."""
    header = {key: value for key, value in goldens.items() if key != "prompts"}
    lines = [json.dumps(record, ensure_ascii=False) for record in goldens["prompts"]]
    head = json.dumps(header, indent=1, ensure_ascii=False)[:-2]
    return head + ',\n "prompts": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the pinned SmolLM2 source)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    goldens = build_goldens(args.gguf or default_gguf(), args.new_tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(format_goldens(goldens), encoding="utf-8")
    logger.info("wrote %d prompts to %s", len(goldens["prompts"]), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
