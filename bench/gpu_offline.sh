#!/usr/bin/env bash
# bench/gpu_check.sh on a GPU host that reaches no package registry and whose image's python3 holds
# a CUDA torch: the wheels carried from bench/gpu_prepare.sh go into that interpreter's environment
# (the host is throw-away), the project runs from the checkout (PYTHONPATH + a `motlens` launcher
# beside the interpreter), and the carried fp16 MiniLM is the embedder.
#   carry .gpu, then: bash bench/gpu_offline.sh [gpu_check flags]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .gpu/whl ] && [ -d .gpu/minilm-fp16 ] || { echo "missing .gpu/: run bench/gpu_prepare.sh first" >&2; exit 2; }
PY=$(command -v python3)
BIN=$(dirname "$PY")
"$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check .gpu/whl/*.whl
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
printf '#!%s\nimport sys\nsys.path.insert(0, "%s")\nfrom motlens.cli import main\nsys.exit(main())\n' \
  "$PY" "$PWD" > "$BIN/motlens"
chmod +x "$BIN/motlens"
export MOTLENS_EMBEDDER_DIR="$PWD/.gpu/minilm-fp16"
GPU_VENV=$(dirname "$BIN") GPU_SKIP_INSTALL=1 exec bash bench/gpu_check.sh "$@"
