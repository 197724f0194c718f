#!/usr/bin/env bash
# One set-up command: creates .venv, installs Paddle (CPU, or GPU when nvidia-smi sees one)
# and this package with its test extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
PADDLE_VERSION="3.3.1"
# Paddle 3.x GPU wheels are not on PyPI; they come from Paddle's own index (CUDA 12.6 build).
PADDLE_GPU_INDEX="${PADDLE_GPU_INDEX:-https://www.paddlepaddle.org.cn/packages/stable/cu126/}"

fail() { echo "build_paddle_env.sh: $*" >&2; exit 1; }

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' \
  || fail "Python >= 3.9 is needed (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.x"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv || fail "could not create .venv (is the venv module installed? apt-get install python3-venv)"
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "GPU found: installing paddlepaddle-gpu==${PADDLE_VERSION} from ${PADDLE_GPU_INDEX}"
  "${PIP[@]}" "paddlepaddle-gpu==${PADDLE_VERSION}" -i "$PADDLE_GPU_INDEX" \
    || fail "could not install paddlepaddle-gpu ${PADDLE_VERSION}; set PADDLE_GPU_INDEX to the index matching your CUDA"
else
  echo "No GPU found: installing paddlepaddle==${PADDLE_VERSION} (CPU)"
  "${PIP[@]}" "paddlepaddle==${PADDLE_VERSION}" || fail "could not install paddlepaddle==${PADDLE_VERSION} from PyPI"
fi

"${PIP[@]}" -e ".[test]" || fail "could not install paddlemix_vl2 (pip install -e .[test])"
.venv/bin/python -c "import paddlemix_vl2, paddle; print('paddlemix_vl2', paddlemix_vl2.__version__, '| paddle', paddle.__version__)" \
  || fail "the environment was built but 'import paddlemix_vl2' fails"
echo "Ready: .venv"
