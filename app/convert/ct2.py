"""Reader for CTranslate2 ``model.bin`` files (binary version 6).

Layout (little-endian, no padding):

- header: u32 binary version, string spec name, u32 spec revision, u32 variable count
- each variable: string name, u8 rank, u32 dims[rank], u8 dtype id, u32 byte count, raw row-major data
- footer: u32 alias count, then (alias, target) string pairs

A string is a u16 length that counts a trailing NUL, then the UTF-8 bytes, then the NUL.
The reader consumes every byte and refuses anything it does not understand.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

logger = logging.getLogger(__name__)

SUPPORTED_BINARY_VERSIONS: Final = (6,)

# CTranslate2 dtype ids -> numpy dtypes. bfloat16 has no numpy dtype: it is kept as raw uint16 bits.
DTYPE_BY_ID: Final[dict[int, np.dtype[np.generic]]] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),
}
BFLOAT16_DTYPE_ID: Final = 5


@dataclass(frozen=True)
class Ct2Model:
    """The parsed contents of a ``model.bin``."""

    spec_name: str  # e.g. "WhisperSpec"
    spec_revision: int  # revision of that spec
    binary_version: int  # model.bin format version
    variables: dict[str, np.ndarray]  # name -> read-only array (bfloat16 as uint16 bits)
    aliases: dict[str, str]  # alias name -> target variable name
    bfloat16_names: frozenset[str] = frozenset()  # variables whose uint16 data are bfloat16 bits

    def get(self, name: str) -> np.ndarray:
        """Return the variable called ``name``, following aliases."""
        seen: list[str] = []
        while name in self.aliases:
            if name in seen:
                raise ValueError(f"alias cycle in model.bin: {' -> '.join([*seen, name])}")
            seen.append(name)
            name = self.aliases[name]
        try:
            return self.variables[name]
        except KeyError:
            via = f" (via alias {' -> '.join(seen)})" if seen else ""
            raise KeyError(f"no variable {name!r} in model.bin{via}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.variables or name in self.aliases


class _Reader:
    """A cursor over a bytes buffer that raises ValueError on truncation."""

    def __init__(self, data: bytes | bytearray | memoryview, source: str) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._source = source

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    @property
    def position(self) -> int:
        return self._pos

    def take(self, size: int, what: str) -> memoryview:
        if size > self.remaining:
            raise ValueError(
                f"{self._source}: truncated while reading {what}: needed {size} bytes at offset {self._pos}, "
                f"only {self.remaining} left"
            )
        chunk = self._data[self._pos : self._pos + size]
        self._pos += size
        return chunk

    def u8(self, what: str) -> int:
        return int(self.take(1, what)[0])

    def u16(self, what: str) -> int:
        return int(struct.unpack("<H", self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])

    def string(self, what: str) -> str:
        length = self.u16(f"length of {what}")
        if length == 0:
            raise ValueError(f"{self._source}: {what} at offset {self._pos - 2} has length 0, expected a NUL")
        raw = bytes(self.take(length, what))
        if raw[-1] != 0:
            raise ValueError(f"{self._source}: {what} at offset {self._pos - length} does not end with NUL")
        return raw[:-1].decode("utf-8")


def parse_ct2_bytes(data: bytes | bytearray | memoryview, source: str = "model.bin") -> Ct2Model:
    """Parse the bytes of a CTranslate2 ``model.bin``. Arrays are copies, independent of ``data``."""
    reader = _Reader(data, source)
    binary_version = reader.u32("binary version")
    if binary_version not in SUPPORTED_BINARY_VERSIONS:
        raise ValueError(
            f"{source}: unsupported CTranslate2 binary version {binary_version}, expected one of "
            f"{SUPPORTED_BINARY_VERSIONS}"
        )
    spec_name = reader.string("spec name")
    spec_revision = reader.u32("spec revision")
    n_variables = reader.u32("variable count")

    variables: dict[str, np.ndarray] = {}
    bfloat16_names: set[str] = set()
    for index in range(n_variables):
        name = reader.string(f"name of variable #{index}")
        rank = reader.u8(f"rank of {name!r}")
        shape = tuple(reader.u32(f"dim {axis} of {name!r}") for axis in range(rank))
        dtype_id = reader.u8(f"dtype of {name!r}")
        if dtype_id not in DTYPE_BY_ID:
            raise ValueError(
                f"{source}: variable {name!r} has unknown dtype id {dtype_id}, expected one of {sorted(DTYPE_BY_ID)}"
            )
        dtype = DTYPE_BY_ID[dtype_id]
        n_bytes = reader.u32(f"byte count of {name!r}")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if n_bytes != expected:
            raise ValueError(
                f"{source}: variable {name!r} shape {shape} dtype {dtype} needs {expected} bytes, header says {n_bytes}"
            )
        if name in variables:
            raise ValueError(f"{source}: variable {name!r} appears twice")
        array = np.frombuffer(reader.take(n_bytes, f"data of {name!r}"), dtype=dtype).reshape(shape).copy()
        array.flags.writeable = False
        variables[name] = array
        if dtype_id == BFLOAT16_DTYPE_ID:
            bfloat16_names.add(name)

    aliases: dict[str, str] = {}
    n_aliases = reader.u32("alias count")
    for index in range(n_aliases):
        alias = reader.string(f"alias #{index}")
        target = reader.string(f"target of alias {alias!r}")
        aliases[alias] = target

    if reader.remaining:
        raise ValueError(
            f"{source}: {reader.remaining} leftover bytes after the alias table at offset {reader.position}"
        )
    for alias, target in aliases.items():
        if target not in variables and target not in aliases:
            raise ValueError(f"{source}: alias {alias!r} points to missing variable {target!r}")

    logger.debug(
        "parsed %s: %s rev %d, %d variables, %d aliases", source, spec_name, spec_revision, len(variables), len(aliases)
    )
    return Ct2Model(
        spec_name=spec_name,
        spec_revision=spec_revision,
        binary_version=binary_version,
        variables=variables,
        aliases=aliases,
        bfloat16_names=frozenset(bfloat16_names),
    )


def load_ct2_model(path: Path) -> Ct2Model:
    """Read and parse a CTranslate2 ``model.bin`` file."""
    return parse_ct2_bytes(path.read_bytes(), source=str(path))
