#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` (chat benchmark anchor) from the llama.cpp sources vendored in the
# llama-cpp-python 0.3.36 sdist, reproducibly, under .bench/llama (gitignored; never committed).
#
#   bash scripts/build_llama_server.sh            # ~6 min on 2 cores
#   -> .bench/llama/llama-server  (symlink to the built binary)
#
# Needs: cmake, a C/C++ compiler, .venv/bin/pip (for the PyPI download). Idempotent: reuses the download and build.
set -euo pipefail

VERSION="0.3.36"
SDIST="llama_cpp_python-${VERSION}.tar.gz"
SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${ROOT}/.bench/llama"
PIP="${PIP:-${ROOT}/.venv/bin/pip}"
JOBS="${JOBS:-2}"

mkdir -p "${DEST}"
cd "${DEST}"
if [[ ! -f "${SDIST}" ]]; then
    "${PIP}" download "llama-cpp-python==${VERSION}" --no-deps --no-binary :all: -d "${DEST}"
fi
echo "${SHA256}  ${SDIST}" | sha256sum -c -

SRC="${DEST}/llama_cpp_python-${VERSION}"
if [[ ! -d "${SRC}" ]]; then
    tar -xzf "${SDIST}"
fi
cd "${SRC}/vendor/llama.cpp"
cmake -B build -DLLAMA_CURL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF
cmake --build build --target llama-server -j"${JOBS}"
ln -sf "${SRC}/vendor/llama.cpp/build/bin/llama-server" "${DEST}/llama-server"
"${DEST}/llama-server" --version || true
echo "built ${DEST}/llama-server"
