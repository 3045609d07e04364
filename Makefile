# The two commands of the README: `make demo` and `make test`.
.PHONY: setup tools demo test lint bench

setup:
	bash scripts/setup.sh

tools:
	bash .ci/install-tools.sh

demo: setup
	.venv/bin/motlens demo

test: setup tools
	PATH="$(CURDIR)/.venv-tools/bin:$$PATH" .venv/bin/pytest -q

lint: setup
	.venv/bin/ruff check . && .venv/bin/mypy motlens training predictor predlog drift promotion

# Infinity pins older sentence-transformers/numpy: it gets its own venv (CPU torch first).
.venv-infinity/bin/infinity_emb:
	python3 -m venv .venv-infinity
	.venv-infinity/bin/pip install -q torch==2.13.0
	.venv-infinity/bin/pip install -q "infinity-emb[server,torch]==0.0.78"

bench: setup .venv-infinity/bin/infinity_emb
	.venv/bin/python -m bench.run_all
