#!/usr/bin/env bash
# GPU host check (≤ 8 min on a fresh machine with one NVIDIA GPU): builds its own venv with a CUDA
# torch build, installs the project, builds a bundle, serves it with `motlens serve --device cuda
# --dtype float16`, and measures fp16 golden consistency, batched throughput, single-text latency at
# several concurrencies, open-loop latency at 1,000 req/s, and GPU memory before/after 100k requests.
# The server gets GPU-sized micro-batches (--batch-max-items 1024, --batch-max-tokens 65536,
# --queue-capacity 8192; the CPU defaults 64 / 8192 / 1024 cap it far below 20k items/s) and
# tokenizers may use all cores (TOKENIZERS_PARALLELISM=true unless set: one thread tokenises ≈ 16–25k
# texts/s; the micro-batcher tokenises each served batch once, in its worker thread). Then two servers
# share the GPU (`--servers 2`: one batched load, the single-text closed loops and the 1,000 req/s open
# loop, clients spread over both): whether a second process per GPU is what the open-loop p99 needs.
# The batched loads run again on a server with the eager forward (`--variant eager=--torch-eager`),
# the baseline of the traced one (`--variant "workers2=--model-workers 2"`, measured on 2026-11-30,
# is left out for time). The load generator runs in 4 processes (`--client-procs 4`), and each load
# records the cores the servers and the load generator used and the items each server answered.
#
#   bash bench/gpu_check.sh                 # results in $OUT (if set) or bench/results/gpu/
#   bash bench/gpu_check.sh --duration 5    # extra flags go to `python -m bench.gpu_check`
#
# Writes gpu_check.json, gpu_check.txt, nvidia-smi.txt, install.log and the server log.
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
START=$(date +%s)
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
VENV=${GPU_VENV:-.venv-gpu}
PY=${PYTHON:-python3}
PIP=(--disable-pip-version-check --progress-bar off)

if [ -z "${GPU_SKIP_INSTALL:-}" ]; then
  echo "[gpu_check] venv $VENV; torch with CUDA first (torch==2.14.1 resolves to a CUDA build), then the project"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  {
    "$VENV/bin/pip" install "${PIP[@]}" "torch==${GPU_TORCH_VERSION:-2.14.1}"
    # torch stays as installed; the rest is pinned like CI (constraints.txt has no torch pin)
    "$VENV/bin/pip" install "${PIP[@]}" -c constraints.txt -e ".[serve]" aiohttp psutil uvloop
  } >"$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; exit 1; }
fi
"$VENV/bin/python" - <<'EOF' | tee "$OUT/torch.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
assert torch.cuda.is_available(), "this torch build sees no GPU"
print("device", torch.cuda.get_device_name(0))
EOF
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
echo "[gpu_check] installed after $(( $(date +%s) - START )) s"

LEFT=$(( BUDGET_S - ($(date +%s) - START) ))
if [ "$LEFT" -lt 120 ]; then
  echo "[gpu_check] only ${LEFT}s left of ${BUDGET_S}s after installing; measuring with shorter loads" >&2
  set -- --duration 4 --requests-max-s 30 "$@"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-true}
# kill-after outlasts Service.stop (30 s TERM + 10 s KILL), so no server is orphaned on the GPU
timeout --signal=TERM --kill-after=50 "$(( LEFT > 60 ? LEFT : 60 ))" \
  "$VENV/bin/python" -m bench.gpu_check --out "$OUT" --duration 8 --requests-max-s 120 \
  --batch-max-items 1024 --batch-max-tokens 65536 --queue-capacity 8192 \
  --client-procs 4 --servers 2 --variant "eager=--torch-eager" "$@"
echo "[gpu_check] done in $(( $(date +%s) - START )) s; results in $OUT"
