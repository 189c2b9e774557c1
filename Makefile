# polyhead: `make run` starts the server on the demo models; `make test` runs the whole suite.
# Both install what they need first (Debian packages, the Python venv, the generated models).

CARGO ?= cargo
JOBS ?= 2
PRESET ?= tiny
# The demo set, unless a config file (POLYHEAD_CONFIG) names the models: the environment
# would take precedence over the file's `models`.
ifndef POLYHEAD_CONFIG
export POLYHEAD_MODELS ?= models/generated/$(PRESET)
endif
# ONNX Runtime's official builds report usage to Microsoft unless this is set before the library
# loads; the server and the benchmark set it themselves, this covers the tests and the scripts.
export ORT_DISABLE_TELEMETRY ?= 1

.PHONY: all setup models build run test soak bench bench-smoke fuzz fuzz-smoke lint fmt clean

all: build

setup:
	PRESETS="$(PRESET)" scripts/setup.sh all

models:
	PRESETS="$(PRESET)" scripts/setup.sh venv models

# All targets at once: the tests' dependencies unify features with the binaries', so `make run`
# and `make test` share one build (and the tests that start the server binary find it).
build: setup
	$(CARGO) build --release -j$(JOBS) --workspace --all-targets

## Start the server on the demo model set (POLYHEAD_LISTEN, POLYHEAD_DEVICE, ... are honoured).
run: build
	./target/release/polyhead-server

## The whole test suite: unit tests, ONNX Runtime equivalence and end-to-end tests in Rust,
## then the server binary through real third-party gRPC peers (grpcurl, grpcio, tritonclient).
test: build
	scripts/setup.sh testtools
	$(CARGO) test --release -j$(JOBS) --workspace
	.venv/bin/python -m pytest -q tests/python
	$(MAKE) fuzz-smoke
	$(BENCH_SMOKE)
	$(BENCH_SMOKE_C1)

BENCH_ARGS ?=
BENCH_SMOKE := ./target/release/polyhead-bench --smoke --json target/bench/smoke.json
BENCH_SMOKE_C1 := ./target/release/polyhead-bench --smoke --c1-detect-only --json target/bench/smoke-c1.json
## Every variant side by side on the swin-t demo set and a real photo, with the same thread
## settings: ONNX Runtime sessions driven in-process (raw), the server over gRPC on loopback, one
## full model per task (naive). Prints a table and the targets; JSON in target/bench/bench.json.
## `make bench BENCH_ARGS="--seconds 20 --intra-threads 1"`; `polyhead-bench --help` lists all.
bench: build
	PRESETS=swin-t scripts/setup.sh venv models testdata
	./target/release/polyhead-bench $(BENCH_ARGS)

## The same on the tiny set, about a second per variant: proves every variant runs.
bench-smoke: build
	$(BENCH_SMOKE)
	$(BENCH_SMOKE_C1)

SOAK_SECONDS ?= 300
SOAK_CONCURRENCY ?= 8
## Minutes of mixed load with random cancellations on a freshly started server (demo models):
## fails on any unexpected status or RSS growth > 50 MB after warm-up; report in .cache/soak.json.
soak: build
	.venv/bin/python scripts/soak.py --seconds $(SOAK_SECONDS) --concurrency $(SOAK_CONCURRENCY) \
		--models $(POLYHEAD_MODELS) --json .cache/soak.json

FUZZ_SECONDS ?= 60
FUZZ_RUN_DIR ?= fuzz/corpus-run
FUZZ_TARGETS := image_decode video_probe request_validation
# cargo-fuzz needs nightly flags (-Zsanitizer, sancov passes): RUSTC_BOOTSTRAP=1 allows them on
# the stable toolchain. No sanitizer (-s none): a panic, an overflow (-a: debug assertions), an
# out-of-memory or a hang is still caught. AddressSanitizer adds little here, as the Rust side
# denies unsafe code (but for the device tensor views in server/src/engine/tensor.rs and one
# av_max_alloc call) and FFmpeg's C code is not instrumented either way, while on two cores it
# cost about 35% more build CPU and ran the targets 2-3 times slower.
FUZZ := PATH="$(CURDIR)/.cache/tools/cargo-fuzz/bin:$$PATH" RUSTC_BOOTSTRAP=1 CARGO_BUILD_JOBS=$(JOBS) \
	$(CARGO) fuzz
FUZZ_FLAGS := -O -a -s none
FUZZ_ARGS := -rss_limit_mb=2048 -timeout=10 -print_final_stats=1

## Fuzz each target for FUZZ_SECONDS (`make fuzz FUZZ_SECONDS=600`). New inputs go to
## FUZZ_RUN_DIR/<target> (kept between runs, not committed); the committed corpus
## fuzz/corpus/<target> is only read; a crashing input is saved to fuzz/artifacts/<target>.
fuzz:
	scripts/setup.sh system fuzztools
	$(FUZZ) build $(FUZZ_FLAGS)
	for t in $(FUZZ_TARGETS); do \
		mkdir -p $(FUZZ_RUN_DIR)/$$t && \
		$(FUZZ) run $(FUZZ_FLAGS) $$t $(FUZZ_RUN_DIR)/$$t fuzz/corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) $(FUZZ_ARGS) || exit 1; \
	done

## A short run of every fuzz target from the committed corpus alone, as `make test` does.
fuzz-smoke:
	rm -rf fuzz/corpus-smoke
	$(MAKE) fuzz FUZZ_SECONDS=20 FUZZ_RUN_DIR=fuzz/corpus-smoke

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release -j$(JOBS) --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf models/generated .cache
