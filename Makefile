# Common tasks. Each target is a thin wrapper over scripts/ or cargo.
.PHONY: setup run test check fmt models bench bench-docs openapi pgo

setup:          ## ONNX Runtime, Python venv, example models, release build
	scripts/setup.sh

pgo:            ## make the PGO profile in pgo/ again from a training load (commit it), then target/release/sluice with it (~25 min)
	scripts/build-pgo.sh

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

bench-docs:     ## every benchmark, then docs/benchmarks.md's generated part from their reports, its hand-written sections kept (run on a quiet machine; BEFORE=path/to/older/sluice adds it to the floor table)
	python3 scripts/bench.py
	python3 scripts/bench_floor.py $(if $(BEFORE),--binary before=$(BEFORE)) --binary this=target/release/sluice
	python3 scripts/bench_control.py
	python3 scripts/bench_pipeline.py
	cargo build --release -p sluice-server --example chaos
	python3 scripts/bench_routing.py
	scripts/flamegraph.sh --binary target/release/sluice --out docs/flamegraphs/this-c64.svg --title this
	$(if $(BEFORE),scripts/flamegraph.sh --binary $(BEFORE) --out docs/flamegraphs/before-c64.svg --title before)
	python3 scripts/bench_docs.py
