.PHONY: help setup format lint test bench stubs demo
.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

setup: ## make .venv and build attnmap into it (maturin develop --release)
	bash scripts/setup.sh

format: ## format Rust and Python
	cargo fmt
	.venv/bin/ruff format python tests benches scripts
	.venv/bin/ruff check --fix python tests benches scripts

lint: ## cargo fmt/clippy, ruff, mypy, stubtest on attnmap._native
	cargo fmt --check
	cargo clippy --all-targets --features python -- -D warnings
	.venv/bin/ruff check python tests benches scripts
	.venv/bin/mypy
	.venv/bin/python -m mypy.stubtest attnmap._native

test: ## set up and run every check and test (the README's test command)
	bash scripts/test.sh

bench: ## time the benchmarks (pytest-benchmark, full sizes)
	TRITON_INTERPRET=$${TRITON_INTERPRET:-0} .venv/bin/pytest benches --benchmark-enable --benchmark-only -p no:randomly

stubs: ## check that _native.pyi matches the built module
	.venv/bin/python -m mypy.stubtest attnmap._native

demo: ## set up and run the demo into demo_out/
	bash scripts/demo.sh demo_out
