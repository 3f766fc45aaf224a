"""How the speech engine splits a step's windows across its decode workers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.engine.speech_decode import WindowJob
from app.engine.speech_engine import SpeechEngineSettings, split_evenly


def _jobs(count: int) -> list[WindowJob]:
    return [WindowJob(index, "partial", np.zeros(16, np.float32), 1000, 20) for index in range(count)]


@given(st.integers(0, 40), st.integers(1, 8))
def test_chunks_keep_order_and_differ_by_at_most_one(count: int, parts: int) -> None:
    jobs = _jobs(count)
    chunks = split_evenly(jobs, parts)
    assert [job for chunk in chunks for job in chunk] == jobs
    assert len(chunks) == min(count, parts) and all(chunks)
    if chunks:
        sizes = [len(chunk) for chunk in chunks]
        assert max(sizes) - min(sizes) <= 1


def test_decode_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        SpeechEngineSettings(decode_workers=0)
