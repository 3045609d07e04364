#!/usr/bin/env bash
# Prepare, on a machine WITH the package registries, what a GPU host WITHOUT them needs for
# bench/gpu_check.sh (see bench/gpu_offline.sh): wheels for Python 3.12 of the serving stack that
# the host's image lacks, and MiniLM with fp16 weights (45 MB; fits the 64 MiB carry limit).
# Output: .gpu/whl/*.whl and .gpu/minilm-fp16/ (git-ignored through .git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info .gpu/whl
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
PLAT=()
for n in 2_17 2_24 2_28 2_31 2_34; do PLAT+=(--platform "manylinux_${n}_x86_64"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLAT[@]}" --platform manylinux2014_x86_64 -d .gpu/whl \
  kserve==0.21.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 \
  pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0 \
  typing-inspection==0.4.5 orjson==3.13.0 cloudevents==1.13.0 deprecation==2.1.0 timing-asgi==0.3.2 \
  grpc-interceptor==0.15.4 kubernetes==37.0.1 python-multipart==0.0.34 tabulate==0.10.0 \
  annotated-doc==0.0.7 durationpy==0.11 websocket-client==1.9.2 requests-oauthlib==2.0.0 \
  oauthlib==4.0.1 google-auth==2.63.0 opentelemetry-api==1.45.2 watchfiles==1.3.0 importlib-metadata==9.1.0 \
  httptools==0.9.0
.venv/bin/python - <<'PY'
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from motlens.embedder import default_model_dir

src, dst = default_model_dir(), Path(".gpu/minilm-fp16")
shutil.rmtree(dst, ignore_errors=True)
shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".gitattributes", "README.md"))
w = load_file(str(src / "model.safetensors"))
save_file({k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in w.items()},
          str(dst / "model.safetensors"))
PY
du -sh .gpu/whl .gpu/minilm-fp16
