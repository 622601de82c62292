# `make demo` and `make test` set everything up on first use (scripts/setup.sh), then run.
.PHONY: setup demo test lint docs bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/mmret demo

lint: setup
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks
	.venv/bin/mypy

# The documentation site (mkdocs.yml, docs/) into site/; strict, so a broken link fails it.
docs: setup
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir site

test: lint docs
	.venv/bin/pytest

bench: setup
	.venv/bin/python benchmarks/encode_throughput.py
	.venv/bin/python benchmarks/search_throughput.py
	.venv/bin/python benchmarks/search_throughput.py --vectors real
	.venv/bin/python benchmarks/index_build.py
	.venv/bin/python benchmarks/query_latency.py
