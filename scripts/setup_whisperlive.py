"""Install the WhisperLive anchor into ``.bench/whisperlive-venv`` and run its server on CPU (stdlib only).

WhisperLive (PyPI ``whisper-live``) is the speech-streaming peer that ``scripts/bench_speech_load.py`` measures
Brook against. This script installs a pinned copy outside the committed tree and starts its WebSocket server with
the faster-whisper backend on a local CTranslate2 folder (Brook's own tiny.en source, so both serve the same weights):

    .venv/bin/python -m scripts.setup_whisperlive install        # idempotent; about 1 minute
    .bench/whisperlive-venv/bin/python scripts/setup_whisperlive.py serve --port 9090 --model DIR \\
        [--mode batch|single|per-client] [--threads 2] [--compute-type int8|float32] [--max-clients 64]

``install`` creates the venv and installs ``whisper-live`` with ``--no-deps``, then only the packages its
faster-whisper server path imports (faster-whisper, torch for CPU, fastapi/uvicorn, websockets), all pinned below
(``LOCK``), so the anchor is the same on every machine. whisper-live's other requirements (openvino, openai-whisper,
TensorRT/CUDA, PyAudio, ...) are for backends and client features that the benchmark does not use.

``serve`` runs inside that venv (it imports nothing from Brook) and calls WhisperLive's own
``TranscriptionServer.run``. Its options expose WhisperLive's CPU settings:

- ``--mode batch``: ``batch_enabled=True`` (one shared model, a worker batching the sessions' requests, greedy
  decoding); ``single``: one shared model behind a lock (WhisperLive's ``single_model``, beam 5 per request);
  ``per-client``: one model instance per connection (WhisperLive's default);
- ``--threads``: CTranslate2 intra-op threads (``OMP_NUM_THREADS``, which WhisperLive's ``WhisperModel`` honours);
- ``--compute-type``: WhisperLive hard-codes ``int8`` on CPU; ``float32`` is applied by wrapping its
  ``ServeClientFasterWhisper.create_model`` (the weights file is the same).

WhisperLive refuses new clients in batch mode when more than ``batch_max_admissions_per_s`` arrive per second or
its queue wait exceeds ``batch_max_queue_wait_s``; ``serve`` raises both limits so that a benchmark level opening
N sockets at once is admitted and measured (late results then show up as latency, not as refusals).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
VENV_DIR: Final = REPO_ROOT / ".bench" / "whisperlive-venv"
WHISPER_LIVE_VERSION: Final = "0.10.0"
# Everything the faster-whisper server path imports, with its dependencies, pinned (pip freeze of a working venv).
LOCK: Final = (
    "annotated-doc==0.0.7",
    "annotated-types==0.8.0",
    "anyio==4.16.0",
    "av==18.1.0",
    "certifi==2026.10.19.post1",
    "charset-normalizer==3.5.3",
    "click==8.5.1",
    "ctranslate2==4.8.5",
    "fastapi==0.165.0",
    "faster-whisper==1.2.0",
    "filelock==4.3.1",
    "flatbuffers==25.12.19",
    "fsspec==2026.9.0",
    "h11==0.16.0",
    "hf-xet==1.8.0",
    "huggingface_hub==0.36.2",
    "idna==3.20",
    "Jinja2==3.1.6",
    "MarkupSafe==3.0.4",
    "mpmath==1.3.0",
    "networkx==3.6.1",
    "numpy==2.4.6",
    "onnxruntime==1.32.0",
    "opentelemetry-api==1.45.2",
    "packaging==26.4",
    "protobuf==7.36.2",
    "pydantic==2.14.4",
    "pydantic_core==2.50.5",
    "PyYAML==6.0.4",
    "requests==2.34.2",
    "starlette==1.10.0",
    "sympy==1.14.0",
    "tokenizers==0.20.3",
    "torch==2.13.0",
    "tqdm==4.70.1",
    "typing-inspection==0.4.5",
    "typing_extensions==4.16.0",
    "urllib3==2.8.0",
    "uvicorn==0.54.0",
    "websockets==17.4",
)
MODES: Final = ("batch", "single", "per-client")
COMPUTE_TYPES: Final = ("int8", "float32", "int8_float32")
MARKER: Final = "installed.txt"


def venv_python(venv: Path = VENV_DIR) -> Path:
    return venv / "bin" / "python"


def is_installed(venv: Path = VENV_DIR) -> bool:
    marker = venv / MARKER
    return marker.is_file() and marker.read_text(encoding="utf-8") == _lock_text()


def _lock_text() -> str:
    return "\n".join((f"whisper-live=={WHISPER_LIVE_VERSION}", *LOCK)) + "\n"


def _run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def install(venv: Path = VENV_DIR) -> Path:
    """Create the venv with the pinned packages (skipped when the same pins are already installed)."""
    if is_installed(venv):
        print(f"WhisperLive {WHISPER_LIVE_VERSION} is already installed in {venv}")
        return venv_python(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", "--clear", str(venv)])
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run([*pip, "--no-deps", f"whisper-live=={WHISPER_LIVE_VERSION}"])
    _run([*pip, "--no-deps", *LOCK])
    _run([str(venv_python(venv)), "-c", "import whisper_live.server, whisper_live.batch_inference"])
    (venv / MARKER).write_text(_lock_text(), encoding="utf-8")
    print(f"installed WhisperLive {WHISPER_LIVE_VERSION} into {venv}")
    return venv_python(venv)


def serve_command(
    port: int,
    model_dir: Path,
    *,
    mode: str = "batch",
    threads: int = 2,
    compute_type: str = "int8",
    max_clients: int = 64,
    venv: Path = VENV_DIR,
) -> list[str]:
    """The command line that runs WhisperLive's server with these settings (for ``bench_common.process_server``)."""
    return [
        str(venv_python(venv)), str(Path(__file__).resolve()), "serve", "--port", str(port), "--model", str(model_dir),
        "--mode", mode, "--threads", str(threads), "--compute-type", compute_type, "--max-clients", str(max_clients),
    ]  # fmt: skip


def serve(args: argparse.Namespace) -> None:
    """Run WhisperLive's TranscriptionServer in this process (inside the WhisperLive venv)."""
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by CTranslate2 when the model is created
    home = VENV_DIR.parent / "whisperlive-home"  # WhisperLive's cache (~/.cache/whisper-live) stays in .bench
    home.mkdir(parents=True, exist_ok=True)
    os.environ["HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"
    from whisper_live.backend.faster_whisper_backend import ServeClientFasterWhisper  # type: ignore[import-not-found]
    from whisper_live.server import TranscriptionServer  # type: ignore[import-not-found]

    original_create_model = ServeClientFasterWhisper.create_model

    def create_model(self: Any, device: str) -> None:
        self.compute_type = args.compute_type
        logging.info("WhisperLive model: compute_type=%s, OMP_NUM_THREADS=%s", args.compute_type, args.threads)
        original_create_model(self, device)

    ServeClientFasterWhisper.create_model = create_model
    batch = args.mode == "batch"
    TranscriptionServer().run(
        "127.0.0.1",
        port=args.port,
        backend="faster_whisper",
        faster_whisper_custom_model_path=str(args.model),
        single_model=args.mode != "per-client",
        max_clients=args.max_clients,
        max_connection_time=3600,
        batch_enabled=batch,
        batch_max_size=args.batch_size,
        batch_window_ms=args.batch_window_ms,
        batch_max_queue_wait_s=1e9,
        batch_max_admissions_per_s=1e6,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("install", help="create .bench/whisperlive-venv with the pinned packages")
    run = commands.add_parser("serve", help="run the WhisperLive server (inside its venv)")
    run.add_argument("--port", type=int, default=9090)
    run.add_argument("--model", type=Path, required=True, help="a CTranslate2 Whisper folder (model.bin)")
    run.add_argument("--mode", choices=MODES, default="batch")
    run.add_argument("--threads", type=int, default=2, help="CTranslate2 intra-op threads")
    run.add_argument("--compute-type", choices=COMPUTE_TYPES, default="int8")
    run.add_argument("--max-clients", type=int, default=64)
    run.add_argument("--batch-size", type=int, default=16, help="batch mode: most requests per batch")
    run.add_argument("--batch-window-ms", type=int, default=50, help="batch mode: wait for a batch to fill")
    args = parser.parse_args()
    if args.command == "install":
        install()
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        serve(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
