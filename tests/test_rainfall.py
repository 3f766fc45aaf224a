"""The rainfall model: the served ONNX file really scores what its manifest reports on the held-out year, and that
beats the majority baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from app.convert.rainfall import CSV_NAME, FEATURES, INPUT_NAME, TEST_YEAR, read_rain_dataset
from app.convert.sources import extract_sources
from app.errors import FetchError
from app.repository import ModelRepository
from tests.conftest import load_model, missing


@pytest.mark.parametrize("version", [1, 2])
def test_the_served_graph_scores_what_the_manifest_reports(model_repository: ModelRepository, version: int) -> None:
    loaded = load_model(model_repository, "rainfall", version)
    assert loaded.spec.source is not None
    try:
        csv = extract_sources(loaded.spec.source)[CSV_NAME]
    except FetchError as exc:
        missing(f"the vega_datasets wheel could not be fetched: {exc}")
    dataset = read_rain_dataset(csv)
    assert dataset.features.shape[1] == len(FEATURES)
    held_out = np.array([d.year == TEST_YEAR for d in dataset.dates])
    session = ort.InferenceSession(str(loaded.directory / "model.onnx"), providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(["label", "probabilities"], {INPUT_NAME: dataset.features[held_out]})
    truth = dataset.rain_tomorrow[held_out]
    report = loaded.manifest.config["evaluation"]
    assert report["test_days"] == int(held_out.sum()) == 364
    assert round(float(np.mean(labels == truth)), 4) == report["accuracy"]
    assert round(float(np.mean((probabilities[:, 1] - truth) ** 2)), 4) == report["brier"]
    assert report["accuracy"] > report["baseline_majority_accuracy"] + 0.05
    assert report["brier"] < report["baseline_climatology_brier"]


def test_the_dataset_labels_tomorrow_from_the_next_row(tmp_path: Path) -> None:
    path = tmp_path / CSV_NAME
    path.write_text("date,precipitation,temp_max,temp_min,wind,weather\n2015/01/01,0.0,5,1,2,sun\n"
                    "2015/01/02,3.5,6,2,4,rain\n2015/01/03,0.0,7,3,1,sun\n", encoding="utf-8")
    dataset = read_rain_dataset(path)
    assert dataset.rain_tomorrow.tolist() == [1, 0]
    np.testing.assert_array_equal(dataset.features[1], np.array([3.5, 6, 2, 4, 2], dtype=np.float32))
    path.write_text("date,precipitation,temp_max,temp_min,wind,weather\n2015/01/01,0.0,5,1,2,sun\n"
                    "2015/01/03,3.5,6,2,4,rain\n", encoding="utf-8")
    with pytest.raises(FetchError, match="not consecutive"):
        read_rain_dataset(path)
