"""The converters that `model.toml` can name, imported lazily so that one converter's dependencies stay optional."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import FetchError

ConvertFunction = Callable[[Mapping[str, Path], Path, Mapping[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class ConverterRef:
    """A converter: `function(files, out_dir, options) -> config` in `module`. Bump `version` when output changes."""

    module: str
    function: str
    version: str
    description: str

    def load(self) -> ConvertFunction:
        fn: ConvertFunction = getattr(importlib.import_module(self.module), self.function)
        return fn


CONVERTERS: dict[str, ConverterRef] = {
    "whisper-ct2": ConverterRef(
        "app.convert.whisper", "convert_whisper", "5", "Whisper from a CTranslate2 model.bin to encoder/decoder ONNX"
    ),
    "silero-vad": ConverterRef("app.convert.silero", "convert_silero_vad", "1", "Silero VAD ONNX, checked and copied"),
    "llama-gguf": ConverterRef(
        "app.convert.llama", "convert_llama_gguf", "1", "Llama-family GGUF to ONNX (exact quantized weights)"
    ),
    "onnx-file": ConverterRef(
        "app.convert.generic_onnx", "convert_onnx_file", "1", "A ready-made ONNX file, checked and copied (generic)"
    ),
    "sklearn-rainfall": ConverterRef(
        "app.convert.rainfall", "convert_rainfall", "1", "Train the scikit-learn rainfall model and export it to ONNX"
    ),
}


def converter(name: str) -> ConverterRef:
    try:
        return CONVERTERS[name]
    except KeyError:
        raise FetchError(f"unknown converter {name!r}; known converters: {', '.join(sorted(CONVERTERS))}") from None
