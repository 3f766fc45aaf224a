#!/usr/bin/env bash
# Install llama-cpp-python 0.3.36's OpenAI-compatible server (chat benchmark anchor 2) into its own venv,
# .bench/llamacpp-venv (gitignored; never committed), with every dependency pinned.
#
#   bash scripts/setup_llamacpp_server.sh
#   .bench/llamacpp-venv/bin/python -m llama_cpp.server --model X.gguf --n_threads 2 ...
#
# pip reuses a llama-cpp-python wheel from its cache when one was built before (`pip cache list llama_cpp_python`);
# otherwise it compiles the sdist (several minutes on 2 cores). Idempotent.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${ROOT}/.bench/llamacpp-venv"
PYTHON="${PYTHON:-${ROOT}/.venv/bin/python}"

if [[ ! -x "${VENV}/bin/python" ]]; then
    "${PYTHON}" -m venv "${VENV}"
fi
"${VENV}/bin/pip" install --quiet \
    "llama-cpp-python[server]==0.3.36" \
    annotated-doc==0.0.7 annotated-types==0.8.0 anyio==4.16.0 click==8.5.1 diskcache==5.6.3 fastapi==0.165.0 \
    h11==0.16.0 idna==3.20 Jinja2==3.1.6 MarkupSafe==3.0.4 numpy==2.4.6 opentelemetry-api==1.45.2 \
    pydantic==2.14.4 pydantic-settings==2.16.3 pydantic_core==2.50.5 python-dotenv==1.2.4 PyYAML==6.0.4 \
    sse-starlette==3.7.0 starlette==1.10.0 starlette-context==0.3.6 typing-inspection==0.4.5 \
    typing_extensions==4.16.0 uvicorn==0.54.0
"${VENV}/bin/python" -c "import llama_cpp, llama_cpp.server.app; print('llama-cpp-python', llama_cpp.__version__)"
