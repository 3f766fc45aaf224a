"""The rainfall model: will it rain in Seattle tomorrow? Trained with scikit-learn on real weather, served as ONNX.

Data: ``seattle-weather.csv`` from the pinned ``vega_datasets`` wheel (daily observations 2012-2015: precipitation,
maximum and minimum temperature, wind, weather). For each day the features are today's precipitation (mm),
temperatures (°C), wind (m/s) and day of the year; the label is whether tomorrow's precipitation is above zero.

The model is trained on 2012-2014 and evaluated on 2015, a whole year it never saw; the served model is exactly the
evaluated one (it is not refit on 2015). Two naive baselines are reported next to it: persistence ("tomorrow is like
today") and the majority class of the training years. Training is deterministic (fixed seeds, pinned opsets).

scikit-learn and skl2onnx are build-time dependencies (the ``build`` extra), imported only here.
"""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from app.errors import FetchError

logger = logging.getLogger(__name__)

CSV_NAME = "seattle-weather.csv"
INPUT_NAME = "weather_today"
FEATURES = ("precipitation_mm", "temp_max_c", "temp_min_c", "wind_m_s", "day_of_year")
OUTPUTS = ("label", "probabilities")  # skl2onnx's names: class (1 = rain tomorrow) and [P(dry), P(rain)]
TEST_YEAR = 2015  # held out entirely; training uses the years before it
ALGORITHMS = ("logistic", "gradient_boosting")
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
RANDOM_SEED = 0
MAX_ONNX_PROBABILITY_ERROR = 1e-4  # the exported graph must reproduce scikit-learn's probabilities


@dataclass(frozen=True)
class RainDataset:
    """Feature rows (one per day that has a next day), tomorrow's rain label, and the date of each row."""

    features: np.ndarray  # float32 [days, len(FEATURES)]
    rain_tomorrow: np.ndarray  # int64 [days]
    dates: list[dt.date]


def read_rain_dataset(path: Path) -> RainDataset:
    """Parse ``seattle-weather.csv``; rows must be consecutive days."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if len(rows) < 2:
        raise FetchError(f"{path}: expected daily weather rows, found {len(rows)}")
    try:
        dates = [dt.datetime.strptime(r["date"], "%Y/%m/%d").date() for r in rows]
        columns = {key: np.array([float(r[key]) for r in rows]) for key in
                   ("precipitation", "temp_max", "temp_min", "wind")}
    except (KeyError, ValueError) as exc:
        raise FetchError(f"{path}: unexpected content ({type(exc).__name__}: {exc})") from None
    gaps = [d for d, e in itertools.pairwise(dates) if (e - d).days != 1]
    if gaps:
        raise FetchError(f"{path}: days are not consecutive after {gaps[:3]}")
    day_of_year = np.array([d.timetuple().tm_yday for d in dates], dtype=np.float64)
    table = np.stack([columns["precipitation"], columns["temp_max"], columns["temp_min"], columns["wind"],
                      day_of_year], axis=1).astype(np.float32)
    return RainDataset(features=table[:-1], rain_tomorrow=(columns["precipitation"][1:] > 0).astype(np.int64),
                       dates=dates[:-1])


def _make_estimator(algorithm: str) -> Any:
    from sklearn.ensemble import GradientBoostingClassifier  # type: ignore[import-untyped,import-not-found]
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped,import-not-found]
    from sklearn.pipeline import Pipeline  # type: ignore[import-untyped,import-not-found]
    from sklearn.preprocessing import StandardScaler  # type: ignore[import-untyped,import-not-found]

    if algorithm == "logistic":
        return Pipeline([("scale", StandardScaler()), ("classify", LogisticRegression(random_state=RANDOM_SEED))])
    if algorithm == "gradient_boosting":
        # (skl2onnx 1.20 can not convert scikit-learn 1.9's HistGradientBoostingClassifier, so the classic one.)
        return GradientBoostingClassifier(n_estimators=150, max_depth=2, learning_rate=0.05,
                                          random_state=RANDOM_SEED)
    raise FetchError(f"rainfall: options.algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")


def _brier(probability: np.ndarray, label: np.ndarray) -> float:
    return float(np.mean((probability - label) ** 2))


def train_and_evaluate(dataset: RainDataset, algorithm: str) -> tuple[Any, dict[str, Any]]:
    """Fit on the years before TEST_YEAR; report accuracy and Brier score on TEST_YEAR against naive baselines."""
    from sklearn.metrics import roc_auc_score  # type: ignore[import-untyped,import-not-found]

    years = np.array([d.year for d in dataset.dates])
    train, test = years < TEST_YEAR, years == TEST_YEAR
    x_train, y_train = dataset.features[train], dataset.rain_tomorrow[train]
    x_test, y_test = dataset.features[test], dataset.rain_tomorrow[test]
    model = _make_estimator(algorithm)
    model.fit(x_train, y_train)
    probability = model.predict_proba(x_test)[:, 1]
    rain_rate = float(y_train.mean())
    report = {
        "algorithm": algorithm,
        "features": list(FEATURES),
        "train_days": int(train.sum()),
        "train_period": f"{dataset.dates[int(np.argmax(train))]}..{TEST_YEAR - 1}-12-31",
        "test_days": int(test.sum()),
        "test_period": f"{TEST_YEAR}",
        "accuracy": round(float(np.mean((probability > 0.5) == y_test)), 4),
        "baseline_persistence_accuracy": round(float(np.mean((x_test[:, 0] > 0) == y_test)), 4),
        "baseline_majority_accuracy": round(float(np.mean(y_test == int(rain_rate > 0.5))), 4),
        "brier": round(_brier(probability, y_test), 4),
        "baseline_climatology_brier": round(_brier(np.full(len(y_test), rain_rate), y_test), 4),
        "roc_auc": round(float(roc_auc_score(y_test, probability)), 4),
        "test_rain_rate": round(float(y_test.mean()), 4),
    }
    return model, report


def export_onnx(model: Any, path: Path) -> None:
    """Convert with skl2onnx: one float input ``weather_today [N, 5]``; outputs ``label [N]`` and
    ``probabilities [N, 2]`` as plain tensors (zipmap off, so every output is a tensor the v2 API can carry)."""
    from skl2onnx import to_onnx  # type: ignore[import-untyped,import-not-found]
    from skl2onnx.common.data_types import FloatTensorType  # type: ignore[import-untyped,import-not-found]

    onx = to_onnx(model, initial_types=[(INPUT_NAME, FloatTensorType([None, len(FEATURES)]))],
                  options={"zipmap": False}, target_opset=TARGET_OPSET)
    onx.doc_string = "Will it rain in Seattle tomorrow? Inputs: " + ", ".join(FEATURES)
    path.write_bytes(onx.SerializeToString())


def _check_parity(model: Any, path: Path, features: np.ndarray) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(list(OUTPUTS), {INPUT_NAME: features})
    error = float(np.max(np.abs(probabilities - model.predict_proba(features))))
    if error > MAX_ONNX_PROBABILITY_ERROR:
        raise FetchError(f"rainfall: the ONNX graph's probabilities differ from scikit-learn's by {error:.2e}")
    disagreements = int(np.sum(labels != model.predict(features)))
    if disagreements:
        raise FetchError(f"rainfall: the ONNX graph's labels differ from scikit-learn's on {disagreements} days")
    return error


def convert_rainfall(files: Mapping[str, Path], out_dir: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """Converter ``sklearn-rainfall``: train, evaluate, export ``model.onnx``; the report goes into the manifest."""
    try:
        import skl2onnx  # type: ignore[import-untyped,import-not-found]  # noqa: F401
        import sklearn  # type: ignore[import-untyped,import-not-found]  # noqa: F401
    except ImportError as exc:
        raise FetchError(f"the rainfall model is trained at build time and needs scikit-learn and skl2onnx ({exc}); "
                         "install the build extra: pip install -e '.[build]' (make setup does)") from None
    dataset = read_rain_dataset(files[CSV_NAME])
    model, report = train_and_evaluate(dataset, str(options.get("algorithm", "logistic")))
    path = out_dir / "model.onnx"
    export_onnx(model, path)
    report["onnx_max_probability_error"] = _check_parity(model, path, dataset.features)
    logger.info("rainfall (%s): accuracy %.3f on %s vs persistence %.3f and majority %.3f", report["algorithm"],
                report["accuracy"], report["test_period"], report["baseline_persistence_accuracy"],
                report["baseline_majority_accuracy"])
    return {"platform": "onnxruntime_onnx", "input": INPUT_NAME, "outputs": list(OUTPUTS), "evaluation": report}
