"""Train the rainfall model ("will it rain in Seattle tomorrow?") and write it into the model repository.

The same code runs in `brook models fetch rainfall` (converter ``sklearn-rainfall`` in app/convert/rainfall.py):
fetch the pinned ``vega_datasets`` wheel (sha256-checked) and read ``seattle-weather.csv`` out of it without
installing it, train scikit-learn on 2012-2014, evaluate on 2015, export with skl2onnx into ``models/rainfall/N/``,
and record the evaluation in the manifest. This script rebuilds the versions and prints the evaluation next to the
naive baselines, plus each ONNX file's sha256 (identical on every run: training is deterministic).

    .venv/bin/python scripts/train_rainfall.py [--model-dir DIR] [--version N ...] [--json]

Needs the build extra: ``pip install -e '.[build]'`` (scikit-learn, skl2onnx).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from app.convert.build import build_version
from app.paths import default_model_dir
from app.repository import ModelRepository, read_manifest, sha256_file

MODEL_NAME = "rainfall"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=default_model_dir())
    parser.add_argument("--version", type=int, action="append", help="versions to build (default: all)")
    parser.add_argument("--json", action="store_true", help="print the evaluations as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    spec = ModelRepository(args.model_dir).spec(MODEL_NAME)
    reports = []
    for version in args.version or sorted(spec.versions):
        result = build_version(spec, version, force=True)
        manifest = read_manifest(result.directory)
        report = dict(manifest.config["evaluation"])
        report["version"] = version
        report["onnx_sha256"] = sha256_file(result.directory / "model.onnx")
        reports.append(report)
    if args.json:
        print(json.dumps(reports, indent=2))
        return
    first = reports[0]
    print(f"\nWill it rain tomorrow? Trained on {first['train_period']} ({first['train_days']} days), "
          f"tested on {first['test_period']} ({first['test_days']} days, it rained on "
          f"{first['test_rain_rate']:.0%} of them).\n")
    print(f"{'forecast':<34} {'accuracy':>9} {'Brier':>7} {'ROC AUC':>8}")
    for report in reports:
        print(f"v{report['version']} {report['algorithm']:<31} {report['accuracy']:>9.3f} {report['brier']:>7.3f} "
              f"{report['roc_auc']:>8.3f}")
    print(f"{'baseline: rain iff it rained today':<34} {first['baseline_persistence_accuracy']:>9.3f} "
          f"{1 - first['baseline_persistence_accuracy']:>7.3f}")
    print(f"{'baseline: never rain (majority)':<34} {first['baseline_majority_accuracy']:>9.3f} "
          f"{first['test_rain_rate']:>7.3f}")
    print(f"{'baseline: P(rain) = training rate':<34} {first['baseline_majority_accuracy']:>9.3f} "
          f"{first['baseline_climatology_brier']:>7.3f}")
    print()
    for report in reports:
        print(f"v{report['version']} model.onnx sha256 {report['onnx_sha256']}")


if __name__ == "__main__":
    main()
