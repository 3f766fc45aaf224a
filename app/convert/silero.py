"""Silero VAD: the ONNX file ships ready to run; check its signature and copy it into the repository."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx

EXPECTED_INPUTS = ("input", "state", "sr")
EXPECTED_OUTPUTS = ("output", "stateN")
SAMPLE_RATE_HZ = 16000
FRAME_SAMPLES = 512  # 32 ms at 16 kHz, the frame size Silero VAD v5+ is trained for
CONTEXT_SAMPLES = 64  # samples of the previous frame prepended to each frame
STATE_SHAPE = (2, 128)  # per stream: [2, batch, 128]


def convert_silero_vad(files: Mapping[str, Path], out_dir: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """Copy `files["silero_vad.onnx"]` to `out_dir/vad.onnx` after checking its inputs and outputs."""
    source = files["silero_vad.onnx"]
    model = onnx.load(str(source))
    onnx.checker.check_model(model)
    inputs = tuple(i.name for i in model.graph.input)
    outputs = tuple(o.name for o in model.graph.output)
    if inputs != EXPECTED_INPUTS or outputs != EXPECTED_OUTPUTS:
        raise ValueError(
            f"{source.name}: expected inputs {EXPECTED_INPUTS} and outputs {EXPECTED_OUTPUTS}, "
            f"found inputs {inputs} and outputs {outputs}"
        )
    shutil.copyfile(source, out_dir / "vad.onnx")
    return {
        "sample_rate": SAMPLE_RATE_HZ,
        "frame_samples": FRAME_SAMPLES,
        "context_samples": CONTEXT_SAMPLES,
        "state_shape": list(STATE_SHAPE),
    }
