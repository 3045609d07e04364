#!/usr/bin/env bash
# bench/gpu_check.sh on a GPU host that reaches no package registry (the image's python3 has a CUDA
# torch): a venv over the system site-packages, the carried wheels from bench/gpu_prepare.sh, the
# project installed without dependencies, and the carried fp16 MiniLM as the embedder.
#   carry .gpu, then: bash bench/gpu_offline.sh [gpu_check flags]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .gpu/whl ] && [ -d .gpu/minilm-fp16 ] || { echo "missing .gpu/: run bench/gpu_prepare.sh first" >&2; exit 2; }
VENV=/tmp/venv-gpu
python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install -q --no-index --no-deps --disable-pip-version-check .gpu/whl/*.whl
"$VENV/bin/pip" install -q --no-index --no-deps --no-build-isolation --disable-pip-version-check -e .
export MOTLENS_EMBEDDER_DIR="$PWD/.gpu/minilm-fp16"
GPU_VENV="$VENV" GPU_SKIP_INSTALL=1 exec bash bench/gpu_check.sh "$@"
