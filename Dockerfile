# syntax=docker/dockerfile:1.7
#
# motlens images: two slim final targets, each with a CPU or a CUDA build of PyTorch.
#
#   docker build --target predictor --build-arg VARIANT=cpu  -t motlens-predictor:0.1.0-cpu  .
#   docker build --target predictor --build-arg VARIANT=cuda -t motlens-predictor:0.1.0-cuda .
#   docker build --target jobs      --build-arg VARIANT=cpu  -t motlens-jobs:0.1.0           .
#
# predictor  `motlens serve`, with the `serve` extra only (kserve, onnxruntime): no Evidently,
#            none of the drift/promote extras, MLflow's client only (mlflow-skinny, not the `local` extra). The model is NOT in the image: KServe's storage
#            initializer downloads STORAGE_URI into /mnt/models.
# jobs       the drift and promotion CronJobs: the `drift` and `promote` extras, no kserve.
#
# Both run as the non-root user 10001 and work on a read-only root filesystem: everything that
# libraries write (HOME, caches, MOTLENS_HOME) points below /tmp or /var/lib/motlens, which the
# manifests mount as emptyDir volumes. Nothing secret is read at build time or baked in.
# Base images are pinned to exact tags; pin their digests too (docs/deploy.md "Images").
#
# Layers: the dependency venvs (torch and ~150 packages) are built from pyproject.toml and
# constraints.txt alone; each final target then installs the project's wheel on top with --no-deps.
# A source change rebuilds the wheel and that one small layer, nothing below it.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --gid 10001 motlens \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin motlens \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/motlens

# ---------------------------------------------------------------------------------------------
# Build stage: the project as a wheel. The only stage that sees the sources.
FROM base AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY motlens/ motlens/
COPY predictor/ predictor/
COPY training/ training/
COPY predlog/ predlog/
COPY drift/ drift/
COPY promotion/ promotion/
RUN python -m pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------
# Dependency venvs: they see pyproject.toml and constraints.txt only, so a source change leaves
# their layers (torch and ~150 packages) cached; the final targets add the project's wheel.
FROM base AS deps
# cpu | cuda. CUDA wheels carry their own CUDA runtime; the NVIDIA driver comes from the node
# (NVIDIA container toolkit), so both variants share the same slim base.
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128
ENV VARIANT=${VARIANT} TORCH_VERSION=${TORCH_VERSION} TORCH_CUDA=${TORCH_CUDA}
WORKDIR /src
COPY pyproject.toml constraints.txt ./
COPY scripts/extra_requirements.py /usr/local/bin/
# make-venv EXTRAS: torch first (the CPU or CUDA build, so no dependency pulls another one), then
# the third-party requirements of the core and EXTRAS (not the project), pinned by constraints.txt.
COPY --chmod=0755 <<'SH' /usr/local/bin/make-venv
#!/bin/sh
set -eu
case "$VARIANT" in
  cpu)  index="https://download.pytorch.org/whl/cpu" ;;
  cuda) index="https://download.pytorch.org/whl/$TORCH_CUDA" ;;
  *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;;
esac
python -m venv /opt/venv
pip install "torch==$TORCH_VERSION" --index-url "$index"
python /usr/local/bin/extra_requirements.py /src/pyproject.toml "$1" > /tmp/requirements.txt
pip install -c /src/constraints.txt -r /tmp/requirements.txt
SH

FROM deps AS venv-predictor
RUN make-venv serve

FROM deps AS venv-jobs
RUN make-venv drift,promote

# ---------------------------------------------------------------------------------------------
# Runtime settings shared by both final targets: writable paths off the (read-only) root
# filesystem, no hub downloads, no telemetry calls (MLflow, Evidently) from inside the cluster.
FROM base AS runtime
# DL3064 takes TOKENIZERS_PARALLELISM for a secret; it is a switch.
# hadolint ignore=DL3064
ENV HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    TORCHINDUCTOR_CACHE_DIR=/tmp/.cache/torchinductor \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    MOTLENS_HOME=/var/lib/motlens \
    DO_NOT_TRACK=true \
    MLFLOW_DISABLE_TELEMETRY=true \
    ITERATIVE_DO_NOT_TRACK=1
WORKDIR /var/lib/motlens
ENTRYPOINT ["motlens"]

# ---------------------------------------------------------------------------------------------
FROM runtime AS jobs
COPY --from=venv-jobs /opt/venv /opt/venv
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-deps /wheels/motlens-*.whl && pip check
USER 10001:10001
CMD ["--help"]

# ---------------------------------------------------------------------------------------------
# Last, so that a plain `docker build .` gives the predictor.
FROM runtime AS predictor
COPY --from=venv-predictor /opt/venv /opt/venv
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-deps /wheels/motlens-*.whl && pip check
USER 10001:10001
EXPOSE 8080 8081
CMD ["serve", "--model", "/mnt/models", "--http-port", "8080", "--grpc-port", "8081"]
