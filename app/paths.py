"""Default locations: the model repository folder. Overridden by `BROOK_MODEL_DIR` or `--model-dir`."""

from __future__ import annotations

import os
from pathlib import Path

MODEL_DIR_ENV = "BROOK_MODEL_DIR"
_PROJECT_MODELS = Path(__file__).resolve().parent.parent / "models"


def default_model_dir() -> Path:
    """`$BROOK_MODEL_DIR`, else the checkout's `models/` (Brook is installed editable), else `./models`."""
    configured = os.environ.get(MODEL_DIR_ENV)
    if configured:
        return Path(configured)
    if _PROJECT_MODELS.is_dir():
        return _PROJECT_MODELS
    return Path.cwd() / "models"
