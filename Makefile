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

bench: setup
	.venv/bin/python bench/run_all.py
